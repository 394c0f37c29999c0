//! The audit log end to end: fail closed when no sink can write. (A real
//! server's log under `cipherctl audit verify` is in the cipherd-cli tests, which
//! have the binary; the canary is in `process.rs`.)
#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

use std::time::Duration;

use cipherd_e2e::{Client, Code, EncryptOptions, Params, expect_err, pb, storage_digest};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// With the only sink on `/dev/full`, every call, `Status` included, is refused
/// UNAVAILABLE / `AUDIT_UNAVAILABLE` before it does anything: storage is
/// unchanged; health (not audited) still answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_writable_sink_every_call_is_refused_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let mut params = Params::for_data_dir(dir.path(), true);
    params.audit = cipherd_server::audit::AuditParams::file("/dev/full");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(cipherd_server::run(listener, params, async {
        let _ = stopped.await;
    }));
    // Readiness by polling health: it answers without an audit record.
    let endpoint = format!("http://{addr}");
    let mut ready = false;
    for _ in 0..500 {
        if let Ok(channel) = tonic::transport::Channel::from_shared(endpoint.clone())
            .unwrap()
            .connect()
            .await
            && let Ok(r) = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
            && r.into_inner().status() == ServingStatus::Serving
        {
            ready = true;
            break;
        }
        assert!(!task.is_finished(), "the server exited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ready, "health never said SERVING");
    let db = dir.path().join("cipherd.db");
    let before = storage_digest(&db, 1).await;

    let token =
        std::fs::read_to_string(dir.path().join(cipherd_server::DEV_ROOT_TOKEN_FILE)).unwrap();
    let client = Client::connect(endpoint.clone())
        .await
        .unwrap()
        .with_token(&cipherd_client::Token::from(token.trim()))
        .unwrap();
    let unavailable = |r: Result<(), cipherd_client::Error>| {
        expect_err(r, Code::Unavailable, "AUDIT_UNAVAILABLE");
    };
    unavailable(client.status().await.map(drop));
    unavailable(
        client
            .encrypt("k", &b"x"[..], &EncryptOptions::default())
            .await
            .map(drop),
    );
    unavailable(
        cipherd_e2e::reply(
            client
                .admin()
                .create_key(pb::CreateKeyRequest {
                    name: "k".into(),
                    ..Default::default()
                })
                .await,
        )
        .map(drop),
    );
    unavailable(
        client
            .create_token(vec!["root".into()], None, "x")
            .await
            .map(drop),
    );
    unavailable(cipherd_e2e::reply(client.system().seal(pb::SealRequest {}).await).map(drop));
    // Unauthenticated calls are refused the same way (nothing is learned).
    let anonymous = Client::connect(endpoint).await.unwrap();
    unavailable(
        anonymous
            .encrypt("k", &b"x"[..], &EncryptOptions::default())
            .await
            .map(drop),
    );
    assert_eq!(
        storage_digest(&db, 1).await,
        before,
        "a refused call changed storage"
    );
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
