//! Test helpers for cipherd: a real server on an ephemeral port with a temporary
//! data dir, a connected client, and readiness by polling, never sleeping.
//!
//! Used by the server's and the end-to-end tests; not published. [`postgres`]
//! gives a test its own PostgreSQL database.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod jwt;
pub mod pki;
pub mod postgres;
pub mod store;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use cipherd_client::Client;
pub use cipherd_server::Params;
use cipherd_store::{SqliteStore, Store};
pub use store::FaultyStore;
use tokio::{sync::oneshot, task::JoinHandle};

/// A cipherd running in this process via `cipherd_server::run` on 127.0.0.1:0.
pub struct TestServer {
    /// The bound address.
    pub addr: SocketAddr,
    /// The data dir (kept alive as long as the server value, unless handed over).
    pub data_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    /// How clients reach a TLS-serving server (`None`: plaintext).
    tls: Option<cipherd_client::TlsOptions>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), cipherd_server::RunError>>>,
}

impl TestServer {
    /// A dev-mode server (initialized and unsealed) on a fresh data dir.
    pub async fn dev() -> Self {
        let temp = tempfile::tempdir().expect("temp dir");
        let params = Params::for_data_dir(temp.path(), true);
        let mut server = Self::start(params).await;
        server._temp = Some(temp);
        server
    }

    /// A dev-mode server on a fresh data dir whose store (the usual SQLite file)
    /// is wrapped in a [`FaultyStore`], returned for the test to break, read and
    /// write directly, bypassing the server and its barrier.
    pub async fn dev_with_faulty_store() -> (Self, Arc<FaultyStore>) {
        let temp = tempfile::tempdir().expect("temp dir");
        let params = Params::for_data_dir(temp.path(), true);
        let (mut server, store) = Self::start_with_faulty_store(params).await;
        server._temp = Some(temp);
        (server, store)
    }

    /// A server with `params` whose SQLite store (`params.storage`) is opened
    /// here and wrapped in a [`FaultyStore`] (the data dir is the caller's).
    pub async fn start_with_faulty_store(params: Params) -> (Self, Arc<FaultyStore>) {
        let cipherd_server::config::StorageParams::Sqlite { path } = &params.storage else {
            panic!("FaultyStore wraps the SQLite store only");
        };
        std::fs::create_dir_all(&params.data_dir).expect("data dir");
        let sqlite: Arc<dyn Store> = Arc::new(SqliteStore::open(path).await.expect("open store"));
        let store = FaultyStore::new(sqlite);
        let server = Self::launch(params, Some(Arc::clone(&store) as Arc<dyn Store>), None).await;
        (server, store)
    }

    /// A server with `params` (the data dir is the caller's to manage).
    pub async fn start(params: Params) -> Self {
        Self::start_with_tls(params, None).await
    }

    /// A server with `params` whose clients connect with `tls` (for `params.tls`).
    pub async fn start_with_tls(params: Params, tls: Option<cipherd_client::TlsOptions>) -> Self {
        Self::launch(params, None, tls).await
    }

    /// Binds 127.0.0.1:0 and runs the server (over `store` if given, else the
    /// store `params` names) until it answers.
    async fn launch(
        params: Params,
        store: Option<Arc<dyn Store>>,
        tls: Option<cipherd_client::TlsOptions>,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let data_dir = params.data_dir.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async {
            let _ = stopped.await;
        };
        let task = match store {
            Some(store) => tokio::spawn(cipherd_server::run_with_store(
                listener, params, store, shutdown,
            )),
            None => tokio::spawn(cipherd_server::run(listener, params, shutdown)),
        };
        let server = Self {
            addr,
            data_dir,
            _temp: None,
            tls,
            stop: Some(stop),
            task: Some(task),
        };
        server.wait_ready().await;
        server
    }

    /// `http://ADDR` for clients, `https://ADDR` when the server serves TLS.
    pub fn endpoint(&self) -> String {
        match self.tls {
            Some(_) => format!("https://{}", self.addr),
            None => format!("http://{}", self.addr),
        }
    }

    /// Client options that reach this server (TLS when it serves TLS).
    pub fn client_options(&self) -> cipherd_client::ClientOptions {
        cipherd_client::ClientOptions {
            tls: self.tls.clone(),
            ..Default::default()
        }
    }

    /// A connected client with the dev root token, when the data dir has one
    /// (`root-token.INSECURE`, written by dev mode), else without a token.
    pub async fn client(&self) -> Client {
        match self.root_token() {
            Some(token) => self.client_with_token(&token).await,
            None => self.anonymous_client().await,
        }
    }

    /// A connected client that sends `token`.
    pub async fn client_with_token(&self, token: &str) -> Client {
        let options = self.client_options().with_token(token);
        Client::connect_with(self.endpoint(), options)
            .await
            .expect("connect")
    }

    /// A connected client that sends no credential.
    pub async fn anonymous_client(&self) -> Client {
        Client::connect_with(self.endpoint(), self.client_options())
            .await
            .expect("connect")
    }

    /// The dev-mode root token from the data dir, if there is one.
    pub fn root_token(&self) -> Option<String> {
        std::fs::read_to_string(self.data_dir.join(cipherd_server::DEV_ROOT_TOKEN_FILE))
            .ok()
            .map(|t| t.trim().to_owned())
    }

    /// Stops the server, waits for it to drain, and returns the temp dir (if this
    /// server owned one) so a new server can reopen the same data.
    pub async fn stop(mut self) -> Option<tempfile::TempDir> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("server task")
                .expect("server ran cleanly");
        }
        self._temp.take()
    }

    /// Polls `SystemService.Status` until the server answers (at most ~10 s).
    async fn wait_ready(&self) {
        for _ in 0..1000 {
            if let Ok(client) = Client::connect_with(self.endpoint(), self.client_options()).await
                && client.status().await.is_ok()
            {
                return;
            }
            if self.task.as_ref().is_some_and(|t| t.is_finished()) {
                panic!("server exited during start-up");
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("server at {} did not become ready", self.addr);
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
