//! The real `cipherd` binary as a child process, for the tests that need a
//! process of their own (`process.rs`, `crash.rs`): started on an ephemeral port
//! learnt from its own log line, polled until it answers, stopped with SIGTERM
//! (a clean exit is asserted) or SIGKILL.
//!
//! The binary is `cipherd-e2e-daemon` (the server's `main.rs` built by this
//! package, see `tests/Cargo.toml`) unless `CIPHERD_BIN` names another build.
//! Each test file includes this module with `#[path]`: cargo hands the binary's
//! path (`CARGO_BIN_EXE_cipherd-e2e-daemon`) to integration tests only, not to
//! the package's library. A file uses what it needs of it.
#![allow(dead_code)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use cipherd_client::{Client, ClientOptions};
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::{Child, Command},
    sync::oneshot,
};

/// A running `cipherd` child process; killed if the test fails before
/// [`Daemon::terminate`].
pub struct Daemon {
    child: Child,
    addr: SocketAddr,
    data: PathBuf,
    log: Arc<Mutex<String>>,
    log_reader: tokio::task::JoinHandle<()>,
}

impl Daemon {
    /// Starts the binary listening on 127.0.0.1:0 with JSON logs at debug level,
    /// learns the port from its "cipherd listening" log line, and polls Status until
    /// it answers.
    pub async fn start(work: &Path, data: &Path, extra: &[&str]) -> Self {
        Self::start_with(work, data, extra, "", &[]).await
    }

    /// Like [`Daemon::start`], with `config` appended to the config file and extra
    /// environment variables.
    pub async fn start_with(
        work: &Path,
        data: &Path,
        extra: &[&str],
        config: &str,
        env: &[(&str, &str)],
    ) -> Self {
        // Non-dev servers need an audit sink; every daemon here gets one.
        let audit = work.join("audit.log");
        let config_text = format!(
            "[log]\nformat = \"json\"\n{config}\n[[audit]]\ntype = \"file\"\npath = {:?}\n",
            audit.display().to_string()
        );
        let config = work.join("cipherd.toml");
        std::fs::write(&config, config_text).unwrap();
        let mut child = command();
        // Outside dev mode the server needs TLS (tests/tests/tls.rs) or this.
        if !extra.contains(&"--dev") {
            child.env("CIPHERD_SERVER_TLS__DISABLE", "true");
        }
        let mut child = child
            .envs(env.iter().copied())
            .args(["--listen", "127.0.0.1:0", "--log-level", "debug"])
            .arg("--data-dir")
            .arg(data)
            .arg("--config")
            .arg(&config)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", binary().display()));

        let log = Arc::new(Mutex::new(String::new()));
        let (found, listening) = oneshot::channel();
        let stderr = child.stderr.take().unwrap();
        let mut log_reader = tokio::spawn({
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
        // The long timeout only turns a hang into a clear failure.
        let addr = match tokio::time::timeout(Duration::from_secs(60), listening).await {
            Ok(Ok(addr)) => addr,
            Ok(Err(_)) => {
                let status = child.wait().await.unwrap();
                let _ = (&mut log_reader).await;
                panic!(
                    "cipherd exited ({status}) before listening:\n{}",
                    log.lock().unwrap()
                );
            }
            Err(_) => panic!(
                "cipherd never logged \"cipherd listening\":\n{}",
                log.lock().unwrap()
            ),
        };
        let daemon = Self {
            child,
            addr,
            data: data.to_owned(),
            log,
            log_reader,
        };
        daemon.wait_ready().await;
        daemon
    }

    /// A client with the dev root token when the data dir has one.
    pub async fn client(&self) -> Client {
        let client = Client::connect(format!("http://{}", self.addr))
            .await
            .unwrap();
        match std::fs::read_to_string(self.data.join(cipherd_server::DEV_ROOT_TOKEN_FILE)) {
            Ok(token) => client
                .with_token(&cipherd_client::Token::from(token.trim()))
                .unwrap(),
            Err(_) => client,
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the daemon is still running")
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A client with `options` (e.g. a token, no retries).
    pub async fn connect(&self, options: ClientOptions) -> Client {
        Client::connect_with(format!("http://{}", self.addr), options)
            .await
            .unwrap()
    }

    /// Sends SIGKILL and waits for the process to be gone; returns its log. The
    /// process gets no chance to flush, drain or close anything.
    pub async fn kill(mut self) -> String {
        self.child.start_kill().expect("SIGKILL the daemon");
        let status = self.child.wait().await.unwrap();
        (&mut self.log_reader).await.unwrap();
        let log = std::mem::take(&mut *self.log.lock().unwrap());
        assert!(
            !status.success(),
            "cipherd exited {status} instead of being killed:\n{log}"
        );
        log
    }

    /// Polls Status until the server answers (it binds before it logs, so this is
    /// normally immediate).
    async fn wait_ready(&self) {
        for _ in 0..500 {
            if let Ok(client) = Client::connect(format!("http://{}", self.addr)).await
                && client.status().await.is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "cipherd at {} never answered Status:\n{}",
            self.addr,
            self.log.lock().unwrap()
        );
    }

    /// Sends SIGTERM, asserts a clean exit (status 0), and returns the whole log.
    pub async fn terminate(mut self) -> String {
        let pid = self.child.id().expect("still running");
        let kill = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(kill.success(), "kill -TERM {pid}");
        let status: ExitStatus = self.child.wait().await.unwrap();
        (&mut self.log_reader).await.unwrap();
        let log = std::mem::take(&mut *self.log.lock().unwrap());
        assert!(status.success(), "cipherd exited with {status}:\n{log}");
        log
    }
}

/// The binary under test: `CIPHERD_BIN`, or the one cargo built for this package.
pub fn binary() -> PathBuf {
    let path = std::env::var_os("CIPHERD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_cipherd-e2e-daemon")));
    assert!(
        path.is_file(),
        "cipherd binary {} not found: build it with `cargo test -p cipherd-e2e` (which \
         builds `cipherd-e2e-daemon`) or point CIPHERD_BIN at a cipherd build",
        path.display()
    );
    path
}

/// A command for the binary with no `CIPHERD_*` variables inherited from the test's
/// environment, so only what a test sets applies.
pub fn command() -> Command {
    let mut command = Command::new(binary());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CIPHERD_") {
            command.env_remove(key);
        }
    }
    command
}

/// The address in the server's JSON "cipherd listening" line (`"addr": "IP:PORT"`).
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = value.get("fields")?;
    if fields.get("message")?.as_str()? != "cipherd listening" {
        return None;
    }
    let addr = fields.get("addr")?.as_str()?;
    addr.parse().ok()
}
