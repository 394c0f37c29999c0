//! `run`: the whole server as a library function over a bound listener.

use std::{future::Future, sync::Arc};

use cipherd_proto::v1::{
    audit_service_server::AuditServiceServer, auth_service_server::AuthServiceServer,
    key_admin_service_server::KeyAdminServiceServer, policy_service_server::PolicyServiceServer,
    system_service_server::SystemServiceServer, transit_service_server::TransitServiceServer,
};
use cipherd_store::{PostgresStore, SqliteStore, Store};
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic_health::ServingStatus;

use crate::{
    access::AccessLayer,
    admin::KeyAdminHandler,
    audit::Auditor,
    auth::{jwt::JwtVerifier, rate::PrincipalLimiter},
    auth_service::AuthHandler,
    config::{Params, StorageParams},
    edge::Edge,
    seal::{self, Core},
    store_health::{self, PROBE_INTERVAL, WatchedStore},
    system::SystemHandler,
    transit::TransitHandler,
};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The data directory could not be created.
    #[error("data dir {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Another process holds the data dir, or its lock file is unusable.
    #[error(transparent)]
    Lock(#[from] crate::datadir::LockError),
    /// The storage backend could not be opened.
    #[error("opening storage: {0}")]
    Store(#[from] cipherd_store::Error),
    /// Dev-mode initialization or unsealing failed.
    #[error("dev mode: {0}")]
    Dev(crate::Error),
    /// Building reflection failed.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The TLS files could not be used (the message names the option and file).
    #[error("TLS: {0}")]
    Tls(#[from] crate::edge::tls::TlsError),
    /// The gRPC transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// An audit file could not be opened.
    #[error(transparent)]
    Audit(#[from] crate::audit::OpenError),
    /// The JWKS file could not be loaded.
    #[error("jwt: {0}")]
    Jwt(#[from] crate::auth::jwt::JwksError),
}

/// Runs cipherd on `listener` until `shutdown` completes, then drains in-flight
/// requests and returns.
///
/// Opens the storage named in `params`; in dev mode initializes and unseals from
/// the data dir. Health (`grpc.health.v1`) reports NOT_SERVING while sealed and
/// while the store cannot be reached (probed every [`PROBE_INTERVAL`] and after
/// every call that finds it unavailable). Every connection and request passes the
/// edge (`edge` module) first, which enforces `params.limits`.
pub async fn run(
    listener: TcpListener,
    params: Params,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    // Held until this returns: one process per data dir, taken before the
    // store is opened.
    let lock = lock_data_dir(&params)?;
    let store: Arc<dyn Store> = match &params.storage {
        StorageParams::Sqlite { path } => Arc::new(SqliteStore::open(path).await?),
        StorageParams::Postgres { config } => Arc::new(PostgresStore::open(config).await?),
    };
    serve(listener, params, store, shutdown, lock).await
}

/// [`run`] over a store the caller opened instead of the one `params.storage`
/// names: for embedding, and for tests that wrap the store to inject faults.
/// Everything else (`params.data_dir` for the audit log and dev-mode files
/// included, and its lock) is as for [`run`].
pub async fn run_with_store(
    listener: TcpListener,
    params: Params,
    store: Arc<dyn Store>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let lock = lock_data_dir(&params)?;
    serve(listener, params, store, shutdown, lock).await
}

async fn serve(
    listener: TcpListener,
    params: Params,
    store: Arc<dyn Store>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    _lock: crate::datadir::DataDirLock,
) -> Result<(), RunError> {
    // The audit log first: a call must never be served before it can be recorded.
    let auditor = Auditor::open(&params.audit)
        .await
        .map_err(RunError::Audit)?;
    let jwt = params
        .jwt
        .as_ref()
        .map(JwtVerifier::new)
        .transpose()?
        .map(Arc::new);
    let _jwks_watcher = jwt
        .as_ref()
        .map(|v| v.spawn_watcher(crate::auth::jwt::JWKS_POLL_INTERVAL));
    let (watched, store_health) = WatchedStore::new(Arc::clone(&store));
    let prober = AbortOnDrop(tokio::spawn(store_health::probe(
        store,
        Arc::clone(&store_health),
        PROBE_INTERVAL,
    )));
    let core = Core::new(watched, params.clone());
    if params.dev {
        seal::dev_auto_unseal(&core).await.map_err(RunError::Dev)?;
    } else if let Some(source) = &params.auto_unseal {
        seal::start_auto_unseal(&core, source).await;
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(report_health(
        health,
        core.watch_sealed(),
        store_health.watch(),
    ));
    // Reflection in both versions: grpcurl and grpcui speak v1, while grpcio's
    // reflection client, older grpcurl and Postman speak only v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(cipherd_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let max = params.limits.max_message_bytes;
    let transit = TransitServiceServer::new(TransitHandler::new(Arc::clone(&core)))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let admin = KeyAdminServiceServer::new(KeyAdminHandler::new(Arc::clone(&core)))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let system = SystemServiceServer::new(SystemHandler::new(Arc::clone(&core)));
    let auth = AuthHandler::new(Arc::clone(&core));
    let auth_service = AuthServiceServer::new(auth.clone());
    let policy_service = PolicyServiceServer::new(auth.clone());
    let audit_service = AuditServiceServer::new(auth);

    let addr = listener
        .local_addr()
        .map_or_else(|e| format!("unknown ({e})"), |a| a.to_string());
    tracing::info!(%addr, dev = params.dev, "cipherd listening");
    log_lifecycle(&core).await;
    let limits = &params.limits;
    let edge = Edge::new(limits, params.tls.as_ref())?;
    let layers = tower::ServiceBuilder::new()
        .layer(edge.request_id_layer())
        // Identity and audit; services authorize against the keys they touch.
        .layer(AccessLayer::new(
            Arc::clone(&core),
            auditor.clone(),
            jwt,
            PrincipalLimiter::new(limits.principal_rate, limits.principal_burst),
        ))
        .layer(edge.limits_layer())
        .into_inner();
    tonic::transport::Server::builder()
        // Batches are megabytes: the HTTP/2 default 64 KiB windows would cost a
        // round trip per 64 KiB. Bounded, so a slow reader cannot pin much memory.
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .layer(layers)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(system)
        .add_service(admin)
        .add_service(transit)
        .add_service(auth_service)
        .add_service(policy_service)
        .add_service(audit_service)
        .serve_with_incoming_shutdown(edge.incoming(listener), shutdown)
        .await?;
    core.flush_stats().await;
    drop(prober);
    auditor.close().await;
    tracing::info!("cipherd stopped");
    Ok(())
}

/// Creates the data dir if needed and locks it for this process.
fn lock_data_dir(params: &Params) -> Result<crate::datadir::DataDirLock, RunError> {
    std::fs::create_dir_all(&params.data_dir).map_err(|source| RunError::DataDir {
        path: params.data_dir.display().to_string(),
        source,
    })?;
    Ok(crate::datadir::DataDirLock::acquire(&params.data_dir)?)
}

/// Aborts a background task when the server stops (or its future is dropped).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Tells the operator at start what the server waits for, if anything.
async fn log_lifecycle(core: &Core) {
    match core.status().await {
        Ok(s) if !s.initialized => tracing::warn!(
            "not initialized: waiting for `cipherctl init`, then `cipherctl unseal`; \
             data calls answer UNAVAILABLE/NOT_INITIALIZED until then"
        ),
        Ok(s) if s.sealed => tracing::warn!(
            threshold = s.threshold,
            "sealed: waiting for {} unseal shares (`cipherctl unseal`); \
             data calls answer UNAVAILABLE/SEALED until then",
            s.threshold
        ),
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "cannot read the seal state"),
    }
}

/// HTTP/2 flow-control windows and frame size (see `run`). The client and the
/// benchmark echo server use the same.
pub const STREAM_WINDOW: u32 = 4 << 20;
/// Connection-level window: a few streams' worth.
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// Largest HTTP/2 frame (the protocol maximum is 16 MiB - 1).
pub const MAX_FRAME: u32 = 1 << 20;

/// The health service names that follow the seal state and the store's
/// reachability. `""` is the whole server.
/// Taken from the generated servers so they cannot drift from the proto names.
const SEAL_GATED_SERVICES: [&str; 6] = [
    "",
    <TransitServiceServer<TransitHandler> as NamedService>::NAME,
    <KeyAdminServiceServer<KeyAdminHandler> as NamedService>::NAME,
    <AuthServiceServer<AuthHandler> as NamedService>::NAME,
    <PolicyServiceServer<AuthHandler> as NamedService>::NAME,
    <AuditServiceServer<AuthHandler> as NamedService>::NAME,
];

/// The health service name of the always-served lifecycle service.
const SYSTEM_SERVICE: &str = <SystemServiceServer<SystemHandler> as NamedService>::NAME;

/// Keeps health current: the gated services are SERVING only while unsealed and
/// the store is reachable. The lifecycle service stays SERVING, so operators can
/// still ask it why (its calls fail with `STORAGE_UNAVAILABLE` meanwhile).
async fn report_health(
    reporter: tonic_health::server::HealthReporter,
    mut sealed: tokio::sync::watch::Receiver<bool>,
    mut reachable: tokio::sync::watch::Receiver<bool>,
) {
    reporter
        .set_service_status(SYSTEM_SERVICE, ServingStatus::Serving)
        .await;
    loop {
        let serving = !*sealed.borrow_and_update() && *reachable.borrow_and_update();
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for service in SEAL_GATED_SERVICES {
            reporter.set_service_status(service, status).await;
        }
        let changed = tokio::select! {
            r = sealed.changed() => r,
            r = reachable.changed() => r,
        };
        if changed.is_err() {
            return;
        }
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM: the `shutdown` future for [`run`] in
/// binaries. A signal whose handler cannot be installed is simply never seen.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
