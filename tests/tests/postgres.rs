//! cipherd on PostgreSQL: a dev-mode server on a fresh database keeps its keys
//! across a restart, and two replicas sharing one database see each other's
//! rotations (a newer version in a ciphertext at once; for encryption through
//! the change feed over LISTEN/NOTIFY).
//!
//! Needs PostgreSQL: `make test` starts it (`scripts/ensure-postgres.sh`).
#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

use cipherd_e2e::{TestServer, create_key, decrypt, encrypt, pb, rotate};
use cipherd_server::DEV_SHARE_FILE;
use cipherd_test_support::postgres::{TestDatabase, params_on};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dev_server_on_postgres_keeps_its_keys_across_a_restart() {
    let db = TestDatabase::create("e2e_restart").await;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(params_on(&db, dir.path(), true)).await;
    let client = server.client().await;
    create_key(&client, "patients", pb::KeyType::Aes256Gcm96).await;
    let sealed = encrypt(&client, "patients", b"record 1").await.ciphertext;
    drop(client);
    server.stop().await;

    let server = TestServer::start(params_on(&db, dir.path(), true)).await;
    let client = server.client().await;
    let status = client.status().await.unwrap();
    assert!(status.initialized && !status.sealed, "{status:?}");
    assert_eq!(status.storage, "postgres");
    assert_eq!(
        decrypt(&client, "patients", &sealed).await.unwrap(),
        &b"record 1"[..]
    );
    // The key goes on where it left off.
    assert_eq!(rotate(&client, "patients").await.latest_version, 2);
    drop(client);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_on_one_replica_is_usable_on_the_other_at_once() {
    let db = TestDatabase::create("e2e_replicas").await;
    let first_dir = tempfile::tempdir().unwrap();
    let first = TestServer::start(params_on(&db, first_dir.path(), true)).await;
    let token = first.root_token().expect("dev root token");
    // A second replica: its own data dir (one process per data dir), the same
    // database, unsealed with the same dev share.
    let second_dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        first_dir.path().join(DEV_SHARE_FILE),
        second_dir.path().join(DEV_SHARE_FILE),
    )
    .unwrap();
    let second = TestServer::start(params_on(&db, second_dir.path(), true)).await;
    let one = first.client().await;
    let other = second.client_with_token(&token).await;

    create_key(&one, "shared", pb::KeyType::Aes256Gcm96).await;
    let v1 = encrypt(&one, "shared", b"from one").await.ciphertext;
    assert_eq!(
        decrypt(&other, "shared", &v1).await.unwrap(),
        &b"from one"[..]
    );
    // The other replica has the key cached at version 1 now; rotate on the first.
    assert_eq!(rotate(&one, "shared").await.latest_version, 2);
    let v2 = encrypt(&one, "shared", b"after rotation").await;
    assert_eq!(v2.key_version, 2);
    assert_eq!(
        decrypt(&other, "shared", &v2.ciphertext).await.unwrap(),
        &b"after rotation"[..]
    );
    // Encrypting picks the latest version from the cache, which only the change
    // feed (NOTIFY from the first replica) invalidates: wait for it to arrive.
    create_key(&one, "fed", pb::KeyType::Aes256Gcm96).await;
    assert_eq!(encrypt(&other, "fed", b"x").await.key_version, 1);
    rotate(&one, "fed").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let version = encrypt(&other, "fed", b"x").await.key_version;
        if version == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the other replica still encrypts under version {version} 10 s after the rotation"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    drop((one, other));
    second.stop().await;
    first.stop().await;
}
