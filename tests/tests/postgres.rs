//! cipherd on PostgreSQL: a dev-mode server on a fresh database keeps its keys
//! across a restart, and two replicas sharing one database see each other's
//! rotations (a newer version in a ciphertext at once; for encryption through
//! the change feed over LISTEN/NOTIFY), and a replica whose listener was cut off
//! while a token was revoked reloads once it is back (the resync), so the
//! revoked token stops working there too.
//!
//! Needs PostgreSQL: `make test` starts it (`scripts/ensure-postgres.sh`).
#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

use std::time::{Duration, Instant};

use cipherd_e2e::{Code, TestServer, create_key, decrypt, encrypt, pb, rotate};
use cipherd_server::DEV_SHARE_FILE;
use cipherd_test_support::postgres::{TestDatabase, params_on};
use sqlx::{AssertSqlSafe, Executor};

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
    let (first, _first_dir, second, _second_dir) = two_replicas(&db).await;
    let token = first.root_token().expect("dev root token");
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
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let version = encrypt(&other, "fed", b"x").await.key_version;
        if version == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the other replica still encrypts under version {version} 10 s after the rotation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop((one, other));
    second.stop().await;
    first.stop().await;
}

/// A token created through one replica works on another at once, even when
/// that replica's change feed is cut off: it reads an unknown token from the
/// database before refusing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_token_works_on_another_replica_before_its_notification() {
    let db = TestDatabase::create("e2e_token_miss").await;
    let (first, _first_dir, second, _second_dir) = two_replicas(&db).await;
    let admin_a = first.client().await;
    // Warm both replicas' pools, then cut their listeners off and keep them off.
    let on_b_root = second
        .client_with_token(&first.root_token().expect("dev root token"))
        .await;
    on_b_root.lookup_token(None).await.unwrap();
    let mut admin = db.admin().await;
    let database = db.name();
    admin
        .execute(AssertSqlSafe(format!(
            "ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS false"
        )))
        .await
        .unwrap();
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND application_name = 'cipherd-listener'",
    )
    .bind(database)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(killed, [true, true], "one listener per replica");

    let created = admin_a
        .create_token(vec!["root".into()], None, "miss-test")
        .await
        .unwrap();
    let on_b = second
        .client_with_token(created.token.expose_secret())
        .await;
    let info = on_b.lookup_token(None).await.expect("accepted at once");
    assert_eq!(info.accessor, created.info.accessor);

    admin
        .execute(AssertSqlSafe(format!(
            "ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS true"
        )))
        .await
        .unwrap();
    drop((admin_a, on_b, on_b_root));
    second.stop().await;
    first.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_feed_was_cut_off_still_learns_of_a_revocation() {
    let db = TestDatabase::create("e2e_resync").await;
    let (first, _first_dir, second, _second_dir) = two_replicas(&db).await;
    let admin_a = first.client().await;
    let created = admin_a
        .create_token(vec!["root".into()], None, "resync-test")
        .await
        .unwrap();
    let accessor = created.info.accessor.clone();
    let on_b = second
        .client_with_token(created.token.expose_secret())
        .await;
    // The second replica learns of the new token from the change feed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = on_b.lookup_token(None).await {
        assert!(
            Instant::now() < deadline,
            "the second replica still refuses the new token 10 s after it was created: {e}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Cut both replicas' listeners off, and keep them off (no new connection to
    // the database) while the token is revoked through the first replica: the
    // second cannot hear of it.
    let mut admin = db.admin().await;
    let database = db.name();
    admin
        .execute(AssertSqlSafe(format!(
            "ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS false"
        )))
        .await
        .unwrap();
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND application_name = 'cipherd-listener'",
    )
    .bind(database)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(killed, [true, true], "one listener per replica");
    admin_a.revoke_token(&accessor).await.unwrap();
    assert!(
        on_b.lookup_token(None).await.is_ok(),
        "the second replica cannot have heard of the revocation yet"
    );

    // Once the listener is back, the replica reloads what it caches (the
    // resync), so the revoked token stops working there too.
    admin
        .execute(AssertSqlSafe(format!(
            "ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS true"
        )))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match on_b.lookup_token(None).await {
            Err(e) if e.code() == Some(Code::Unauthenticated) => break,
            Err(e) => panic!("unexpected error: {e}"),
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "the second replica still accepts a token revoked 30 s ago"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop((admin_a, on_b));
    second.stop().await;
    first.stop().await;
}

/// Two dev-mode replicas on `db`, each with its own data dir, unsealed with the
/// same dev share.
async fn two_replicas(
    db: &TestDatabase,
) -> (TestServer, tempfile::TempDir, TestServer, tempfile::TempDir) {
    let first_dir = tempfile::tempdir().unwrap();
    let first = TestServer::start(params_on(db, first_dir.path(), true)).await;
    let second_dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        first_dir.path().join(DEV_SHARE_FILE),
        second_dir.path().join(DEV_SHARE_FILE),
    )
    .unwrap();
    let second = TestServer::start(params_on(db, second_dir.path(), true)).await;
    (first, first_dir, second, second_dir)
}
