//! Storage faults fail closed: corrupt records are DATA_LOSS / STORAGE_INTEGRITY,
//! never retried and never replaced by a fresh key; a used version whose usage
//! record is gone is refused instead of counting from zero; health follows the
//! store's reachability. The server runs over a `FaultyStore`, which lets the test
//! write records directly (bypassing the barrier) and unplug the store.
#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

use std::time::Duration;

use bytes::Bytes;
use cipherd_e2e::{
    Code, EncryptOptions, Params, TestServer, create_key, encrypt, expect_err, get_key, pb, reply,
    rotate,
};
use cipherd_store::Store;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Bytes that are no barrier record of anything.
const GARBAGE: &[u8] = b"\x00garbage written under the key's path, not sealed by the barrier";

/// A key record overwritten with garbage: encrypt answers DATA_LOSS /
/// STORAGE_INTEGRITY with a one-line message naming nothing internal, the client
/// does not retry it (one storage read per call, though it retries UNAVAILABLE),
/// and neither that nor CreateKey ever puts a fresh key in its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_key_record_is_data_loss_not_retried_and_never_replaced() {
    let (server, store) = TestServer::dev_with_faulty_store().await;
    let client = server.client().await;
    create_key(&client, "patients", pb::KeyType::Xaes256Gcm).await;
    encrypt(&client, "patients", b"before").await;

    let path = "keys/patients";
    let current = store.get(path).await.unwrap().unwrap();
    let garbage_rev = store
        .compare_and_set(path, current.revision, GARBAGE)
        .await
        .unwrap();

    // The change feed drops the cached key soon; until then the cached copy may
    // still answer. Poll until the server has read the garbage.
    let mut failure = None;
    for _ in 0..1000 {
        let reads_before = store.reads_of(path);
        let result = client
            .encrypt(
                "patients",
                Bytes::from_static(b"after"),
                &EncryptOptions::default(),
            )
            .await;
        if result.is_err() {
            failure = Some((result, store.reads_of(path) - reads_before));
            break;
        }
        tokio::task::yield_now().await;
    }
    let (result, reads) = failure.expect("the corrupt record was never read");
    let message = expect_err(result, Code::DataLoss, "STORAGE_INTEGRITY");
    assert_eq!(
        reads, 1,
        "one read: the client did not retry (client retries: 2)"
    );
    assert!(!message.contains('\n'), "{message}");
    assert!(
        !message.contains("patients") && !message.contains("keys/"),
        "{message}"
    );

    // Other paths to the key fail the same way, and none creates anything.
    let get = reply(
        client
            .admin()
            .get_key(pb::GetKeyRequest {
                name: "patients".into(),
            })
            .await,
    );
    expect_err(get, Code::DataLoss, "STORAGE_INTEGRITY");
    let create = reply(
        client
            .admin()
            .create_key(pb::CreateKeyRequest {
                name: "patients".into(),
                r#type: pb::KeyType::Xaes256Gcm as i32,
                ..Default::default()
            })
            .await,
    );
    expect_err(create, Code::AlreadyExists, "KEY_EXISTS");
    let stored = store.get(path).await.unwrap().unwrap();
    assert_eq!(
        (stored.value.as_slice(), stored.revision),
        (GARBAGE, garbage_rev),
        "the corrupt record is left for an operator, not replaced"
    );
    assert_eq!(store.list("keys/", None, 10).await.unwrap(), [path]);
}

/// With a reservation block of 1, every encryption under an aes256-gcm96 version
/// reserves from its usage record. Deleting that record must not restart the
/// count: the next encryption is refused (DATA_LOSS / STORAGE_INTEGRITY) and the
/// record is not re-created. GetKey shows the version as used up, and a rotation
/// gives a fresh version that works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_used_versions_usage_record_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let mut params = Params::for_data_dir(dir.path(), true);
    params.usage.reservation_block = 1;
    let (server, store) = TestServer::start_with_faulty_store(params).await;
    let client = server.client().await;
    let id = create_key(&client, "counted", pb::KeyType::Aes256Gcm96)
        .await
        .id;
    assert_eq!(id.len(), 32, "{id:?}");
    encrypt(&client, "counted", b"one").await;
    encrypt(&client, "counted", b"two").await;

    // The key's usage records are under its id.
    let usage = format!("usage/counted/{id}/1");
    let usage = usage.as_str();
    let record = store.get(usage).await.unwrap().expect("usage record");
    store.delete(usage, record.revision).await.unwrap();

    let result = client
        .encrypt(
            "counted",
            Bytes::from_static(b"three"),
            &EncryptOptions::default(),
        )
        .await;
    let message = expect_err(result, Code::DataLoss, "STORAGE_INTEGRITY");
    assert!(!message.contains("usage/"), "{message}");
    assert_eq!(store.get(usage).await.unwrap(), None, "nothing re-created");

    // The key can still be read (v1 shown as used up) and rotated: a new
    // version, counted from zero, is the operator's way out.
    let key = get_key(&client, "counted").await;
    let v1 = &key.versions[0];
    assert_eq!(v1.encryptions, v1.encryption_limit, "{v1:?}");
    rotate(&client, "counted").await;
    let reply = encrypt(&client, "counted", b"four").await;
    assert_eq!(reply.key_version, 2);
    assert!(
        store
            .get(&format!("usage/counted/{id}/2"))
            .await
            .unwrap()
            .is_some()
    );
    drop(server);
}

/// Health (unauthenticated, unaudited, as before) says NOT_SERVING while the
/// store cannot be reached and SERVING once it answers again; data calls meanwhile
/// answer UNAVAILABLE / STORAGE_UNAVAILABLE. The test follows `Health/Watch`
/// instead of sleeping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_store() {
    let (server, store) = TestServer::dev_with_faulty_store().await;
    let client = server.client().await;
    create_key(&client, "patients", pb::KeyType::Xaes256Gcm).await;
    let channel = tonic::transport::Channel::from_shared(server.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut next_status = async || {
        tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("a health update within 10 s")
            .unwrap()
            .expect("the watch stream stays open")
            .status()
    };
    assert_eq!(next_status().await, ServingStatus::Serving);

    store.set_unavailable(true);
    // Seen by the periodic probe, or at once by a call that hits the store.
    let get = reply(
        client
            .admin()
            .get_key(pb::GetKeyRequest {
                name: "patients".into(),
            })
            .await,
    );
    expect_err(get, Code::Unavailable, "STORAGE_UNAVAILABLE");
    assert_eq!(next_status().await, ServingStatus::NotServing);

    store.set_unavailable(false);
    assert_eq!(next_status().await, ServingStatus::Serving);
    encrypt(&client, "patients", b"back").await;
}
