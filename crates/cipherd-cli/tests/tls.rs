//! `cipherctl` over TLS: `--ca-cert` (or `CIPHERD_CACERT`) turns TLS on against
//! a cipherd in this process serving certificates generated in the test;
//! without it, or with an `http://` address, cipherctl refuses or fails to
//! connect, naming the reason; with mTLS, `--client-cert`/`--client-key`.

#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

use std::{path::Path, process::Command, time::Duration};

use cipherd_client::{Client, ClientOptions, TlsOptions};
use cipherd_server::{Params, tls::TlsParams};
use serde_json::Value;

/// Runs cipherctl with `args` and `env`; returns exit code, stdout, stderr.
async fn cipherctl(args: Vec<String>, env: Vec<(&'static str, String)>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cipherctl"));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CIPHERD_") {
                command.env_remove(key);
            }
        }
        let out = command
            .args(&args)
            .envs(env)
            .output()
            .expect("run cipherctl");
        (
            out.status.code().expect("exited"),
            String::from_utf8(out.stdout).expect("UTF-8"),
            String::from_utf8(out.stderr).expect("UTF-8"),
        )
    })
    .await
    .expect("join")
}

struct Pki {
    ca_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test ca");
        let key = rcgen::KeyPair::generate().unwrap();
        let ca_pem = params.self_signed(&key).unwrap().pem();
        Self {
            ca_pem,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// Writes `NAME.pem` and `NAME.key` for `san` into `dir`.
    fn issue(&self, dir: &Path, name: &str, san: rcgen::SanType) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![san];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cipherctl_speaks_tls_with_ca_cert_and_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = Pki::new();
    std::fs::write(d.join("ca.pem"), &pki.ca_pem).unwrap();
    pki.issue(
        d,
        "server",
        rcgen::SanType::DnsName("localhost".try_into().unwrap()),
    );
    pki.issue(
        d,
        "client",
        rcgen::SanType::URI("spiffe://hospital/ns/etl/sa/loader".try_into().unwrap()),
    );
    let mut params = Params::for_data_dir(d.join("data"), true);
    params.tls = Some(TlsParams {
        client_ca_file: Some(d.join("ca.pem")),
        ..TlsParams::new(d.join("server.pem"), d.join("server.key"))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(cipherd_server::run(listener, params, async {
        let _ = stopped.await;
    }));
    let options = ClientOptions {
        tls: Some(
            TlsOptions::new(pki.ca_pem.clone())
                .with_identity(
                    std::fs::read(d.join("client.pem")).unwrap(),
                    std::fs::read(d.join("client.key")).unwrap(),
                )
                .with_domain("localhost"),
        ),
        ..ClientOptions::default()
    };
    let mut ready = false;
    for _ in 0..500 {
        if let Ok(client) =
            Client::connect_with(format!("https://127.0.0.1:{port}"), options.clone()).await
            && client.status().await.is_ok()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ready, "the TLS server never answered");

    let path = |name: &str| d.join(name).display().to_string();
    let addr = format!("127.0.0.1:{port}");
    let tls_args = |extra: &[&str]| {
        let mut args: Vec<String> = [
            "--addr",
            &addr,
            "--tls-server-name",
            "localhost",
            "--client-cert",
            &path("client.pem"),
            "--client-key",
            &path("client.key"),
            // The certificate proves the connection; the token (the dev root
            // token) says what the caller may do.
            "--token-file",
            &path("data/root-token.INSECURE"),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    };

    // --ca-cert from the environment, no scheme: https:// is assumed.
    let (code, out, err) = cipherctl(
        tls_args(&["--json", "status"]),
        vec![("CIPHERD_CACERT", path("ca.pem"))],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["initialized"], true);

    // A real data call: create, encrypt, decrypt back.
    let mut args = tls_args(&["--ca-cert", &path("ca.pem")]);
    args.extend(["key", "create", "tls-key"].map(String::from));
    let (code, _, err) = cipherctl(args, vec![]).await;
    assert_eq!(code, 0, "{err}");
    let mut args = tls_args(&["--ca-cert", &path("ca.pem")]);
    args.extend(["encrypt", "tls-key", "over TLS"].map(String::from));
    let (code, sealed, err) = cipherctl(args, vec![]).await;
    assert_eq!(code, 0, "{err}");
    let mut args = tls_args(&["--ca-cert", &path("ca.pem")]);
    args.extend(["decrypt", "tls-key", sealed.trim()].map(String::from));
    let (code, plain, err) = cipherctl(args, vec![]).await;
    assert_eq!((code, plain.trim()), (0, "over TLS"), "{err}");

    // Without --ca-cert: a plaintext client gets no answer; https:// alone and
    // --ca-cert with http:// are refused before connecting.
    let (code, _, err) = cipherctl(
        ["--addr", &addr, "--timeout", "5", "status"]
            .map(String::from)
            .to_vec(),
        vec![],
    )
    .await;
    assert_eq!(code, 1, "{err}");
    let https = format!("https://{addr}");
    let (code, _, err) = cipherctl(
        ["--addr", &https, "status"].map(String::from).to_vec(),
        vec![],
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        err.contains("error: INVALID_ADDRESS: ") && err.contains("--ca-cert"),
        "{err}"
    );
    let http = format!("http://{addr}");
    let (code, _, err) = cipherctl(
        ["--addr", &http, "--ca-cert", &path("ca.pem"), "status"]
            .map(String::from)
            .to_vec(),
        vec![],
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        err.contains("error: INVALID_ADDRESS: ") && err.contains("https://"),
        "{err}"
    );
    // No client certificate: this server requires one.
    let (code, _, err) = cipherctl(
        [
            "--addr",
            &addr,
            "--ca-cert",
            &path("ca.pem"),
            "--tls-server-name",
            "localhost",
            "status",
        ]
        .map(String::from)
        .to_vec(),
        vec![],
    )
    .await;
    assert_eq!(code, 1, "{err}");
    // --client-cert without --client-key is a usage error.
    let (code, _, _) = cipherctl(
        [
            "--addr",
            &addr,
            "--ca-cert",
            &path("ca.pem"),
            "--client-cert",
            &path("client.pem"),
            "status",
        ]
        .map(String::from)
        .to_vec(),
        vec![],
    )
    .await;
    assert_eq!(code, 2);
}
