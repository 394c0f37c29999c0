//! TLS on the gRPC listener, with certificates generated in the test (rcgen):
//!
//! - a handshake negotiates TLS 1.3 with the hybrid post-quantum group
//!   X25519MLKEM768, and gRPC runs over that very connection;
//! - plaintext HTTP/2 clients get nothing;
//! - with `tls.client_ca_file`, clients without a certificate or with one from
//!   another CA are refused, and one from the client CA is served;
//! - certificates rotated on disk (a Kubernetes-style symlink swap) are picked
//!   up without a restart while an open connection keeps working;
//! - the real binary: a bad new certificate file keeps the old one serving and
//!   logs an error naming the file; SIGHUP reloads; `tls.min_version = "1.2"`.
//!
//! (The client certificate's identity reaching `ConnInfo` is tested in the
//! server's `edge::conn` unit tests.)

#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use cipherd_client::{ClientOptions, TlsOptions};
use cipherd_e2e::{Client, Params, pb};
use cipherd_server::tls::TlsParams;
use cipherd_test_support::pki::{Ca, Leaf, write_leaf};
use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, NamedGroup, ProtocolVersion, RootCertStore, SupportedProtocolVersion,
    crypto::aws_lc_rs,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _},
};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::TcpStream,
    sync::oneshot,
};
use tokio_rustls::client::TlsStream;

/// A dev-mode cipherd in this process on 127.0.0.1:0, serving TLS.
struct TlsServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), cipherd_server::RunError>>,
    _data: tempfile::TempDir,
}

impl TlsServer {
    /// Starts it and polls Status over TLS (trusting `ca`, presenting `identity`)
    /// until it answers.
    async fn start(tls: TlsParams, ca: &Ca, identity: Option<&Leaf>) -> Self {
        let data = tempfile::tempdir().unwrap();
        let mut params = Params::for_data_dir(data.path(), true);
        params.tls = Some(tls);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(cipherd_server::run(listener, params, async {
            let _ = stopped.await;
        }));
        let server = Self {
            addr,
            stop: Some(stop),
            task,
            _data: data,
        };
        for _ in 0..500 {
            if let Ok(client) = server.client(ca, identity).await
                && client.status().await.is_ok()
            {
                return server;
            }
            assert!(!server.task.is_finished(), "server exited during start-up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("TLS server at {addr} never answered");
    }

    /// A cipherd client over TLS.
    async fn client(
        &self,
        ca: &Ca,
        identity: Option<&Leaf>,
    ) -> Result<Client, cipherd_client::Error> {
        let mut options = client_options(ca, identity);
        // The dev root token, once dev mode has written it.
        if let Ok(token) =
            std::fs::read_to_string(self._data.path().join(cipherd_server::DEV_ROOT_TOKEN_FILE))
        {
            options = options.with_token(token.trim());
        }
        Client::connect_with(format!("https://{}", self.addr), options).await
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.unwrap().unwrap();
    }
}

fn client_options(ca: &Ca, identity: Option<&Leaf>) -> ClientOptions {
    let mut tls = TlsOptions::new(ca.pem.as_bytes()).with_domain("localhost");
    if let Some(leaf) = identity {
        tls = tls.with_identity(leaf.cert_pem.as_bytes(), leaf.key_pem.as_bytes());
    }
    ClientOptions {
        tls: Some(tls),
        connect_timeout: Duration::from_secs(5),
        timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    }
}

/// A rustls client config trusting `ca` with these versions and groups.
fn rustls_client(
    ca: &Ca,
    identity: Option<&Leaf>,
    versions: &[&'static SupportedProtocolVersion],
    groups: Option<Vec<&'static dyn rustls::crypto::SupportedKxGroup>>,
) -> Arc<ClientConfig> {
    let mut provider = aws_lc_rs::default_provider();
    if let Some(groups) = groups {
        provider.kx_groups = groups;
    }
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
        .unwrap();
    let builder = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

async fn handshake(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// The server's leaf certificate (DER) as a new TLS 1.3 connection sees it.
async fn served_leaf(addr: SocketAddr, ca: &Ca) -> Vec<u8> {
    let tls = handshake(
        addr,
        rustls_client(ca, None, &[&rustls::version::TLS13], None),
    )
    .await
    .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// A gRPC channel over one already-established connection. The second value
/// counts the connections the channel asked for: it gets only this one.
async fn channel_over(
    stream: TlsStream<TcpStream>,
) -> (tonic::transport::Channel, Arc<AtomicUsize>) {
    let slot = Arc::new(Mutex::new(Some(stream)));
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&asked);
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_uri| {
            counter.fetch_add(1, Ordering::SeqCst);
            let stream = slot.lock().unwrap().take();
            async move {
                stream
                    .map(TokioIo::new)
                    .ok_or_else(|| io::Error::other("this channel has only one connection"))
            }
        }))
        .await
        .unwrap();
    (channel, asked)
}

async fn status_over(
    channel: &tonic::transport::Channel,
) -> Result<pb::StatusResponse, tonic::Status> {
    pb::system_service_client::SystemServiceClient::new(channel.clone())
        .status(pb::StatusRequest {})
        .await
        .map(tonic::Response::into_inner)
}

/// A TLS 1.3 handshake with cipherd negotiates X25519MLKEM768 (offered first by
/// both sides) and h2, and a real gRPC call runs over that connection. A client
/// without ML-KEM still gets X25519; cipherd-client offers ML-KEM first too.
#[tokio::test]
async fn handshake_negotiates_x25519mlkem768_and_serves_grpc_over_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("hospital ca");
    let server = TlsServer::start(write_leaf(dir.path(), &ca.server(1)), &ca, None).await;

    let tls = handshake(
        server.addr,
        rustls_client(
            &ca,
            None,
            &[&rustls::version::TLS13, &rustls::version::TLS12],
            None,
        ),
    )
    .await
    .unwrap();
    let conn = tls.get_ref().1;
    assert_eq!(conn.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    assert_eq!(
        conn.negotiated_key_exchange_group().unwrap().name(),
        NamedGroup::X25519MLKEM768
    );
    assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
    let (channel, asked) = channel_over(tls).await;
    let status = status_over(&channel).await.unwrap();
    assert!(status.initialized && !status.sealed);
    assert_eq!(
        asked.load(Ordering::SeqCst),
        1,
        "the call ran on that connection"
    );

    // A client that knows only classical groups falls back to X25519.
    let classical = handshake(
        server.addr,
        rustls_client(
            &ca,
            None,
            &[&rustls::version::TLS13],
            Some(vec![aws_lc_rs::kx_group::X25519]),
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        classical
            .get_ref()
            .1
            .negotiated_key_exchange_group()
            .unwrap()
            .name(),
        NamedGroup::X25519
    );
    // (An open connection that never sends a request would hold the drain at
    // stop until limits.header_read_timeout_ms.)
    drop(classical);
    // TLS 1.2 is off by default.
    let old = handshake(
        server.addr,
        rustls_client(&ca, None, &[&rustls::version::TLS12], None),
    )
    .await;
    assert!(old.is_err(), "a TLS 1.2-only client was served");

    // cipherd-client (tonic's aws-lc-rs provider) offers X25519MLKEM768 first.
    assert_eq!(
        aws_lc_rs::DEFAULT_KX_GROUPS[0].name(),
        NamedGroup::X25519MLKEM768
    );
    let client = server.client(&ca, None).await.unwrap();
    let key = cipherd_e2e::create_key(&client, "tls", pb::KeyType::Xaes256Gcm).await;
    assert_eq!(key.name, "tls");
    let sealed = cipherd_e2e::encrypt(&client, "tls", b"over TLS").await;
    let plain = cipherd_e2e::decrypt(&client, "tls", &sealed.ciphertext)
        .await
        .unwrap();
    assert_eq!(&plain[..], b"over TLS");
    drop((client, channel));
    server.stop().await;
}

/// Plaintext clients get nothing from a TLS listener: not cipherd-client over
/// http://, not a raw HTTP/2 preface (no SETTINGS frame comes back); a client
/// that does not trust the server's CA is refused by its own side.
#[tokio::test]
async fn plaintext_and_untrusting_clients_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("hospital ca");
    let server = TlsServer::start(write_leaf(dir.path(), &ca.server(1)), &ca, None).await;

    let plain = async {
        Client::connect(format!("http://{}", server.addr))
            .await?
            .status()
            .await
    };
    assert!(plain.await.is_err(), "a plaintext gRPC client was served");

    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]); // an empty SETTINGS frame
    tcp.write_all(&preface).await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut reply))
        .await
        .expect("the server closes the connection");
    // At most a TLS alert record (content type 21), never an HTTP/2 frame.
    assert!(reply.is_empty() || reply[0] == 21, "{reply:?}");

    let stranger = Ca::new("some other ca");
    let untrusting = async { server.client(&stranger, None).await?.status().await };
    assert!(
        untrusting.await.is_err(),
        "a client trusting another CA connected"
    );
    // The server still serves.
    server
        .client(&ca, None)
        .await
        .unwrap()
        .status()
        .await
        .unwrap();
    server.stop().await;
}

/// With `tls.client_ca_file`, no client certificate and one from another CA are
/// refused; one from the client CA is served (its URI SAN is the identity).
#[tokio::test]
async fn mtls_requires_a_client_certificate_from_the_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("hospital ca");
    let clients = Ca::new("hospital workloads");
    std::fs::write(dir.path().join("clients.pem"), &clients.pem).unwrap();
    let tls = TlsParams {
        client_ca_file: Some(dir.path().join("clients.pem")),
        ..write_leaf(dir.path(), &ca.server(1))
    };
    let good = clients.client("spiffe://hospital/ns/ehr/sa/api");
    let server = TlsServer::start(tls, &ca, Some(&good)).await;

    let outsider = Ca::new("outsider").client("spiffe://hospital/ns/ehr/sa/api");
    for (identity, what) in [(None, "no certificate"), (Some(&outsider), "another CA")] {
        let result = async { server.client(&ca, identity).await?.status().await };
        assert!(result.await.is_err(), "{what}: served");
        // The raw handshake: TLS 1.3 reports the refusal on first read.
        let attempt = async {
            let mut tls = handshake(
                server.addr,
                rustls_client(&ca, identity, &[&rustls::version::TLS13], None),
            )
            .await?;
            tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
            let mut buf = [0; 16];
            tls.read(&mut buf).await
        };
        assert!(
            !matches!(attempt.await, Ok(n) if n > 0),
            "{what}: the server answered"
        );
    }
    let client = server.client(&ca, Some(&good)).await.unwrap();
    assert!(client.status().await.unwrap().initialized);
    server.stop().await;
}

/// Kubernetes-style rotation: `cert.pem` and `key.pem` are symlinks through a
/// `..data` symlink that is swapped atomically to a new directory. New
/// connections see the new certificate without a restart, while a connection
/// opened before keeps working.
#[tokio::test]
async fn rotated_certificates_are_picked_up_while_open_connections_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("hospital ca");
    let (first, second) = (ca.server(1), ca.server(2));
    let publish = |name: &str, leaf: &Leaf| {
        let version = dir.path().join(name);
        std::fs::create_dir(&version).unwrap();
        std::fs::write(version.join("cert.pem"), &leaf.cert_pem).unwrap();
        std::fs::write(version.join("key.pem"), &leaf.key_pem).unwrap();
        let tmp = dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(name, &tmp).unwrap();
        std::fs::rename(&tmp, dir.path().join("..data")).unwrap();
    };
    publish("v1", &first);
    for file in ["cert.pem", "key.pem"] {
        std::os::unix::fs::symlink(format!("..data/{file}"), dir.path().join(file)).unwrap();
    }
    let tls = TlsParams {
        reload_interval: Duration::from_millis(50),
        ..TlsParams::new(dir.path().join("cert.pem"), dir.path().join("key.pem"))
    };
    let server = TlsServer::start(tls, &ca, None).await;
    assert_eq!(served_leaf(server.addr, &ca).await, first.der);
    let open = handshake(
        server.addr,
        rustls_client(&ca, None, &[&rustls::version::TLS13], None),
    )
    .await
    .unwrap();
    let (channel, asked) = channel_over(open).await;
    status_over(&channel).await.unwrap();

    publish("v2", &second);
    let mut seen = Vec::new();
    for _ in 0..500 {
        seen = served_leaf(server.addr, &ca).await;
        if seen == second.der {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen, second.der, "the new certificate was never served");
    for _ in 0..3 {
        status_over(&channel)
            .await
            .expect("the open connection keeps working");
    }
    assert_eq!(asked.load(Ordering::SeqCst), 1, "on the same connection");
    // A client built now connects too.
    server
        .client(&ca, None)
        .await
        .unwrap()
        .status()
        .await
        .unwrap();
    server.stop().await;
}

/// The real binary with `[tls]` in its config file: a bad new certificate
/// keeps the old one serving (an error names the file), SIGHUP reloads a good
/// one, and `tls.min_version = "1.2"` lets a TLS 1.2 client in.
#[tokio::test]
async fn binary_keeps_the_old_certificate_when_the_new_one_is_bad_and_reloads_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("hospital ca");
    let (first, second) = (ca.server(1), ca.server(2));
    let tls = write_leaf(dir.path(), &first);
    let config = dir.path().join("cipherd.toml");
    std::fs::write(
        &config,
        format!(
            "[log]\nformat = \"json\"\n[tls]\ncert_file = {:?}\nkey_file = {:?}\nmin_version = \"1.2\"\n\
             [[audit]]\ntype = \"file\"\npath = {:?}\n",
            tls.cert_file,
            tls.key_file,
            dir.path().join("audit.log")
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&config, &dir.path().join("data")).await;
    let client = Client::connect_with(
        format!("https://{}", daemon.addr),
        client_options(&ca, None),
    )
    .await
    .unwrap();
    // Not initialized (no dev mode), but served over TLS.
    assert!(!client.status().await.unwrap().initialized);
    let tls12 = handshake(
        daemon.addr,
        rustls_client(&ca, None, &[&rustls::version::TLS12], None),
    )
    .await
    .expect("tls.min_version = \"1.2\" admits TLS 1.2");
    assert_eq!(
        tls12.get_ref().1.protocol_version(),
        Some(ProtocolVersion::TLSv1_2)
    );
    drop(tls12);

    // A half-written certificate: the old one stays, an error names the file.
    std::fs::write(&tls.cert_file, &second.cert_pem[..100]).unwrap();
    daemon.hangup();
    daemon
        .wait_for_log(|line| line.contains("TLS reload failed") && line.contains("cert.pem"))
        .await;
    assert_eq!(served_leaf(daemon.addr, &ca).await, first.der);
    client
        .status()
        .await
        .expect("the open client keeps working");
    // The rest of the new pair, and SIGHUP: the new certificate is served.
    std::fs::write(&tls.key_file, &second.key_pem).unwrap();
    std::fs::write(&tls.cert_file, &second.cert_pem).unwrap();
    daemon.hangup();
    daemon
        .wait_for_log(|line| line.contains("TLS certificates reloaded"))
        .await;
    assert_eq!(served_leaf(daemon.addr, &ca).await, second.der);
    client
        .status()
        .await
        .expect("the open client keeps working");
    daemon.terminate().await;
}

/// A non-dev binary without `[tls]` refuses to start and says how to fix it.
#[tokio::test]
async fn binary_without_tls_refuses_to_start_outside_dev_mode() {
    let dir = tempfile::tempdir().unwrap();
    let out = binary_command()
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tls.cert_file") && stderr.contains("tls.disable = true"),
        "{stderr}"
    );
    // Files that cannot be used stop the start, naming the option and the file.
    let config = dir.path().join("cipherd.toml");
    std::fs::write(
        &config,
        "[tls]\ncert_file = \"/nonexistent/cert.pem\"\nkey_file = \"/nonexistent/key.pem\"\n",
    )
    .unwrap();
    let out = binary_command()
        .args(["--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tls.cert_file (/nonexistent/cert.pem)"),
        "{stderr}"
    );
}

/// `tls.disable = true` serves plaintext outside dev mode, with a warning at start.
#[tokio::test]
async fn binary_with_tls_disabled_serves_plaintext_and_warns() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cipherd.toml");
    std::fs::write(&config, "[log]\nformat = \"json\"\n[tls]\ndisable = true\n").unwrap();
    let daemon = Daemon::start(&config, &dir.path().join("data")).await;
    daemon
        .wait_for_log(|line| {
            line.contains("\"WARN\"")
                && line.contains("TLS disabled")
                && line.contains("TLS-terminating sidecar")
        })
        .await;
    let client = Client::connect(format!("http://{}", daemon.addr))
        .await
        .unwrap();
    assert!(!client.status().await.unwrap().initialized);
    drop(client);
    daemon.terminate().await;
}

/// The real `cipherd` as a child process, its stderr collected.
struct Daemon {
    child: tokio::process::Child,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

fn binary_command() -> tokio::process::Command {
    let path: PathBuf = std::env::var_os("CIPHERD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_cipherd-e2e-daemon").into());
    let mut command = tokio::process::Command::new(path);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CIPHERD_") {
            command.env_remove(key);
        }
    }
    // Servers outside dev mode need an audit sink; a config file's [[audit]]
    // table, where a test has one, takes the same index and is replaced.
    static AUDIT_DIR: std::sync::LazyLock<tempfile::TempDir> =
        std::sync::LazyLock::new(|| tempfile::tempdir().unwrap());
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    command.env("CIPHERD_SERVER_AUDIT__0__TYPE", "file").env(
        "CIPHERD_SERVER_AUDIT__0__PATH",
        AUDIT_DIR.path().join(format!("audit-{n}.log")),
    );
    command
}

impl Daemon {
    async fn start(config: &Path, data: &Path) -> Self {
        let mut child = binary_command()
            .args(["--listen", "127.0.0.1:0", "--config"])
            .arg(config)
            .arg("--data-dir")
            .arg(data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (found, listening) = oneshot::channel();
        let stderr = child.stderr.take().unwrap();
        tokio::spawn({
            let log = Arc::clone(&log);
            async move {
                let mut found = Some(found);
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(addr) = listening_addr(&line)
                        && let Some(found) = found.take()
                    {
                        let _ = found.send(addr);
                    }
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        let addr = tokio::time::timeout(Duration::from_secs(60), listening)
            .await
            .unwrap_or_else(|_| panic!("cipherd never listened:\n{}", log.lock().unwrap()))
            .unwrap_or_else(|_| panic!("cipherd exited:\n{}", log.lock().unwrap()));
        Self { child, addr, log }
    }

    fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running");
        let ok = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} {pid}");
    }

    fn hangup(&self) {
        self.signal("HUP");
    }

    /// Polls the log until a line matches (at most ~20 s).
    async fn wait_for_log(&self, matches: impl Fn(&str) -> bool) {
        for _ in 0..1000 {
            if self.log.lock().unwrap().lines().any(&matches) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("expected log line missing:\n{}", self.log.lock().unwrap());
    }

    async fn terminate(mut self) {
        self.signal("TERM");
        let status = self.child.wait().await.unwrap();
        assert!(status.success(), "{status}:\n{}", self.log.lock().unwrap());
    }
}

/// The address in the server's JSON "cipherd listening" line.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = value.get("fields")?;
    (fields.get("message")?.as_str()? == "cipherd listening")
        .then(|| fields.get("addr")?.as_str()?.parse().ok())
        .flatten()
}
