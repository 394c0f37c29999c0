//! Backup and restore over the API: the restore drill (keys of every type with
//! several versions, a canary corpus encrypted under each, a backup streamed
//! over `SystemService.Backup`, restored into a fresh server on SQLite and on
//! PostgreSQL, unsealed with the original shares, every canary decrypted), and
//! the refusals: a tampered or truncated backup leaves the target
//! uninitialized (and a good one then restores), a restore into an
//! initialized server, a backup while sealed. And per-key backups: sealed (no
//! material in the clear), never overwriting a key, restorable on their
//! instance and on a restore of its full backup, refused anywhere else.
//!
//! The PostgreSQL half needs PostgreSQL: `make test` starts it
//! (`scripts/ensure-postgres.sh`).
#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

use bytes::Bytes;
use cipherd_e2e::{
    ALL_KEY_TYPES, Client, Code, EncryptOptions, Error, Params, TestServer, create_key_with,
    decrypt, encrypt, expect_err, get_key, pb, reply, rotate, without_use,
};
use cipherd_test_support::postgres::{TestDatabase, params_on};

/// Versions each canary key ends with.
const VERSIONS: u32 = 3;

/// A server initialized with 3 shares (threshold 2), unsealed, holding keys of
/// every type with [`VERSIONS`] versions and canaries encrypted under each.
struct Source {
    server: TestServer,
    _dir: tempfile::TempDir,
    shares: Vec<String>,
    root: String,
    /// (key, plaintext, context, ciphertext) for every canary.
    canaries: Vec<(String, Vec<u8>, Bytes, Bytes)>,
}

async fn source() -> Source {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(params(dir.path())).await;
    let (shares, root) = init(&server.anonymous_client().await).await;
    unseal(&server.anonymous_client().await, &shares[..2]).await;
    let client = server.client_with_token(&root).await;
    let mut canaries = Vec::new();
    for (key_type, label) in ALL_KEY_TYPES {
        for derived in [false, true] {
            let name = format!("canary-{label}{}", if derived { "-derived" } else { "" });
            create_key_with(
                &client,
                pb::CreateKeyRequest {
                    name: name.clone(),
                    r#type: key_type as i32,
                    derived,
                    ..Default::default()
                },
            )
            .await;
            for version in 1..=VERSIONS {
                if version > 1 {
                    assert_eq!(rotate(&client, &name).await.latest_version, version);
                }
                for i in 0..3 {
                    let plaintext = format!("PHI {name} v{version} #{i}: 078-05-1120").into_bytes();
                    let context = if derived {
                        Bytes::from(format!("patient-{i}"))
                    } else {
                        Bytes::new()
                    };
                    let options = EncryptOptions {
                        context: context.clone(),
                        ..Default::default()
                    };
                    let sealed = client
                        .encrypt(&name, plaintext.clone(), &options)
                        .await
                        .unwrap();
                    assert_eq!(sealed.key_version, version);
                    canaries.push((name.clone(), plaintext, context, sealed.ciphertext));
                }
            }
        }
    }
    Source {
        server,
        _dir: dir,
        shares,
        root,
        canaries,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_drill_on_sqlite_and_postgres_decrypts_every_canary() {
    let source = source().await;
    let backup = backup(&source.server.client_with_token(&source.root).await)
        .await
        .unwrap();
    assert!(backup.starts_with(b"CIPHERDB"));
    // The backup is the records as stored: no canary appears in it in the clear.
    let needle = b"078-05-1120";
    assert!(
        !backup.windows(needle.len()).any(|w| w == needle),
        "a canary plaintext is in the backup"
    );

    // SQLite → SQLite.
    let dir = tempfile::tempdir().unwrap();
    let target = TestServer::start(params(dir.path())).await;
    drill(&source, &target, &backup, "sqlite", "sqlite").await;
    target.stop().await;

    // SQLite → PostgreSQL: the migration path.
    let db = TestDatabase::create("backup_drill").await;
    let dir = tempfile::tempdir().unwrap();
    let target = TestServer::start(params_on(&db, dir.path(), false)).await;
    drill(&source, &target, &backup, "sqlite", "postgres").await;

    // And back: a backup of the PostgreSQL server restores on SQLite.
    let from_postgres = backup_of(&target, &source.root).await;
    target.stop().await;
    let dir = tempfile::tempdir().unwrap();
    let again = TestServer::start(params(dir.path())).await;
    drill(&source, &again, &from_postgres, "postgres", "sqlite").await;
    again.stop().await;
}

/// Restores `backup` into the fresh `target`, unseals it with the source's
/// shares and decrypts every canary with the source's root token.
async fn drill(source: &Source, target: &TestServer, backup: &[u8], from: &str, backend: &str) {
    let anonymous = target.anonymous_client().await;
    let status = anonymous.status().await.unwrap();
    assert!(!status.initialized, "{backend}: target not fresh");
    assert_eq!(status.storage, backend);
    let restored = restore(&anonymous, backup).await.unwrap();
    assert!(restored.records > 8, "{backend}: {restored:?}");
    assert_eq!(restored.source_backend, from, "{backend}: {restored:?}");
    let status = anonymous.status().await.unwrap();
    assert!(status.initialized && status.sealed, "{backend}: {status:?}");
    assert_eq!((status.shares, status.threshold), (3, 2));
    // The original shares unseal it (two of them, not the pair used at the source).
    unseal(&anonymous, &source.shares[1..]).await;
    let client = target.client_with_token(&source.root).await;
    for (key, plaintext, context, ciphertext) in &source.canaries {
        let got = client
            .decrypt(key, ciphertext.clone(), Bytes::new(), context.clone())
            .await
            .unwrap_or_else(|e| panic!("{backend}: decrypt a canary of {key}: {e}"));
        assert_eq!(&got.plaintext[..], &plaintext[..], "{backend}: {key}");
    }
    for (_, label) in ALL_KEY_TYPES {
        let key = get_key(&client, &format!("canary-{label}")).await;
        assert_eq!(key.latest_version, VERSIONS, "{backend}: {label}");
        // The source's use statistics, still in its memory when the backup
        // began, were flushed into the snapshot: three encryptions per version.
        for v in &key.versions {
            assert!(
                v.encrypt_count >= 3,
                "{backend}: {label} v{}: {v:?}",
                v.version
            );
        }
    }
    // The restored server goes on: new keys and encryptions work.
    let name = format!("after-restore-{backend}");
    create_key_with(
        &client,
        pb::CreateKeyRequest {
            name: name.clone(),
            ..Default::default()
        },
    )
    .await;
    let sealed = encrypt(&client, &name, b"new").await;
    assert_eq!(
        &decrypt(&client, &name, &sealed.ciphertext).await.unwrap()[..],
        b"new"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_or_truncated_backup_is_refused_and_leaves_the_target_uninitialized() {
    let source = source().await;
    let good = backup_of(&source.server, &source.root).await;
    let dir = tempfile::tempdir().unwrap();
    let target = TestServer::start(params(dir.path())).await;
    let anonymous = target.anonymous_client().await;
    let mut flipped_middle = good.clone();
    flipped_middle[good.len() / 2] ^= 0x01;
    let mut flipped_checksum = good.clone();
    *flipped_checksum.last_mut().unwrap() ^= 0x80;
    let mut appended = good.clone();
    appended.push(0);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("magic only", good[..8].to_vec()),
        ("half", good[..good.len() / 2].to_vec()),
        ("all but the last byte", good[..good.len() - 1].to_vec()),
        ("without the trailer", good[..good.len() - 40].to_vec()),
        ("a byte flipped in the middle", flipped_middle),
        ("a byte flipped in the checksum", flipped_checksum),
        ("a byte appended", appended),
        ("not a backup", b"SQLite format 3\0".repeat(100)),
    ];
    for (what, bytes) in cases {
        let refused = restore(&anonymous, &bytes).await;
        let message = expect_err(refused, Code::InvalidArgument, "INVALID_ARGUMENT");
        assert!(message.contains("invalid backup"), "{what}: {message}");
        let status = anonymous.status().await.unwrap();
        assert!(
            !status.initialized,
            "{what}: the target counts as initialized"
        );
    }
    // Nothing was written: the good backup restores, and unseals.
    restore(&anonymous, &good).await.unwrap();
    unseal(&anonymous, &source.shares[..2]).await;
    let client = target.client_with_token(&source.root).await;
    let (key, plaintext, context, ciphertext) = &source.canaries[0];
    let got = client
        .decrypt(key, ciphertext.clone(), Bytes::new(), context.clone())
        .await
        .unwrap();
    assert_eq!(&got.plaintext[..], &plaintext[..]);
    target.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_and_restore_are_audited() {
    let source = source().await;
    let good = backup_of(&source.server, &source.root).await;
    let dir = tempfile::tempdir().unwrap();
    let target = TestServer::start(params(dir.path())).await;
    let anonymous = target.anonymous_client().await;
    expect_err(
        restore(&anonymous, &good[..good.len() - 1]).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    let restored = restore(&anonymous, &good).await.unwrap();

    let records = |data_dir: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(data_dir.join("audit.log"))
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    };
    let on = |records: &[serde_json::Value], rpc: &str, kind: &str| -> Vec<serde_json::Value> {
        records
            .iter()
            .filter(|r| r["rpc"] == format!("/cipherd.v1.SystemService/{rpc}") && r["kind"] == kind)
            .cloned()
            .collect()
    };
    let at_source = records(&source.server.data_dir);
    let calls = on(&at_source, "Backup", "call");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["operation"], "backup");
    assert_eq!(calls[0]["outcome"]["code"], "OK");
    let closing = on(&at_source, "Backup", "chunk");
    assert_eq!(closing.len(), 1, "{closing:?}");
    assert_eq!(closing[0]["operation"], "backup");
    assert_eq!(closing[0]["outcome"]["code"], "OK");
    assert_eq!(closing[0]["items"]["total"], restored.records);

    let at_target = records(dir.path());
    let calls = on(&at_target, "Restore", "call");
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0]["operation"], "restore");
    assert_eq!(calls[0]["outcome"]["code"], "INVALID_ARGUMENT");
    assert_eq!(calls[1]["outcome"]["code"], "OK");
    assert_eq!(calls[1]["items"]["total"], restored.records);
    target.stop().await;
}

/// A restore's one reply follows the whole upload: a restore that takes longer
/// than `limits.request_timeout` (chunks arriving within it each) still
/// succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_may_take_longer_than_the_request_timeout() {
    let source = source().await;
    let good = backup_of(&source.server, &source.root).await;
    let dir = tempfile::tempdir().unwrap();
    let mut params = params(dir.path());
    params.limits.request_timeout = std::time::Duration::from_millis(300);
    let target = TestServer::start(params).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let pieces: Vec<Bytes> = good
        .chunks(good.len() / 6 + 1)
        .map(Bytes::copy_from_slice)
        .collect();
    let started = std::time::Instant::now();
    tokio::spawn(async move {
        for backup_chunk in pieces {
            tokio::time::sleep(std::time::Duration::from_millis(120)).await;
            if tx.send(pb::RestoreRequest { backup_chunk }).await.is_err() {
                return;
            }
        }
    });
    let client = target.anonymous_client().await;
    let restored = reply(
        client
            .system()
            .restore(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await,
    );
    let elapsed = started.elapsed();
    restored.unwrap_or_else(|e| panic!("a restore of {elapsed:?} failed: {e}"));
    assert!(
        elapsed > std::time::Duration::from_millis(600),
        "the upload was not slow: {elapsed:?}"
    );
    assert!(client.status().await.unwrap().initialized);
    target.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_into_an_initialized_server_is_refused_and_changes_nothing() {
    let source = source().await;
    let good = backup_of(&source.server, &source.root).await;
    // Another initialized server: the backup must not replace its store.
    let dir = tempfile::tempdir().unwrap();
    let other = TestServer::start(params(dir.path())).await;
    let (shares, root) = init(&other.anonymous_client().await).await;
    let refused = restore(&other.anonymous_client().await, &good).await;
    expect_err(refused, Code::FailedPrecondition, "ALREADY_INITIALIZED");
    // Its own shares still unseal it, and it holds none of the source's keys.
    unseal(&other.anonymous_client().await, &shares[..2]).await;
    let client = other.client_with_token(&root).await;
    let missing = reply(
        client
            .admin()
            .get_key(pb::GetKeyRequest {
                name: "canary-xaes-256-gcm".into(),
            })
            .await,
    );
    expect_err(missing, Code::NotFound, "KEY_NOT_FOUND");
    // And the source itself (initialized, unsealed) refuses too.
    let refused = restore(&source.server.anonymous_client().await, &good).await;
    expect_err(refused, Code::FailedPrecondition, "ALREADY_INITIALIZED");
    other.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_while_sealed_is_refused() {
    let source = source().await;
    let client = source.server.client_with_token(&source.root).await;
    reply(client.system().seal(pb::SealRequest {}).await).unwrap();
    let refused = backup(&client).await;
    expect_err(refused, Code::Unavailable, "SEALED");
}

/// Init with 3 shares, threshold 2: the shares and the root token.
async fn init(client: &Client) -> (Vec<String>, String) {
    let r = reply(
        client
            .system()
            .init(pb::InitRequest {
                shares: 3,
                threshold: 2,
            })
            .await,
    )
    .unwrap();
    (r.shares, r.root_token)
}

/// Submits `shares`; the last must unseal.
async fn unseal(client: &Client, shares: &[String]) {
    let mut sealed = true;
    for share in shares {
        let r = reply(
            client
                .system()
                .unseal(pb::UnsealRequest {
                    share: share.clone(),
                    reset: false,
                })
                .await,
        )
        .unwrap();
        sealed = r.sealed;
    }
    assert!(!sealed, "the shares did not unseal");
}

/// The whole backup stream, or the error that ended it.
async fn backup(client: &Client) -> Result<Vec<u8>, Error> {
    let mut stream = reply(client.system().backup(pb::BackupRequest {}).await)?;
    let mut out = Vec::new();
    while let Some(chunk) = stream.message().await.map_err(Error::from)? {
        out.extend_from_slice(&chunk.backup_chunk);
    }
    Ok(out)
}

async fn backup_of(server: &TestServer, root: &str) -> Vec<u8> {
    backup(&server.client_with_token(root).await).await.unwrap()
}

/// Restores `bytes`, sent in pieces of 100 KiB.
async fn restore(client: &Client, bytes: &[u8]) -> Result<pb::RestoreResponse, Error> {
    let chunks: Vec<pb::RestoreRequest> = bytes
        .chunks(100 * 1024)
        .map(|c| pb::RestoreRequest {
            backup_chunk: Bytes::copy_from_slice(c),
        })
        .collect();
    reply(client.system().restore(tokio_stream::iter(chunks)).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_backup_restores_on_its_instance_and_on_a_restore_of_its_full_backup() {
    let source = source().await;
    let client = source.server.client_with_token(&source.root).await;
    // An exportable aes256-gcm96 key: its material can be compared with the
    // backup's bytes, and its usage counters must come back.
    create_key_with(
        &client,
        pb::CreateKeyRequest {
            name: "ledger".into(),
            r#type: pb::KeyType::Aes256Gcm96 as i32,
            exportable: true,
            ..Default::default()
        },
    )
    .await;
    rotate(&client, "ledger").await;
    let sealed = encrypt(&client, "ledger", b"balance 1200").await;
    let used = get_key(&client, "ledger").await;
    assert!(used.versions.iter().any(|v| v.encryptions > 0), "{used:?}");
    let exported = reply(
        client
            .admin()
            .export_key(pb::ExportKeyRequest {
                name: "ledger".into(),
                version: None,
            })
            .await,
    )
    .unwrap();
    let key_backup = backup_key(&client, "ledger").await.unwrap();
    for version in &exported.versions {
        assert!(
            !key_backup
                .windows(version.material.len())
                .any(|w| w == &version.material[..]),
            "version {} material is in the key backup in the clear",
            version.version
        );
    }
    // An existing key is never overwritten.
    expect_err(
        restore_key(&client, &key_backup).await,
        Code::AlreadyExists,
        "KEY_EXISTS",
    );
    // A byte flipped anywhere after the name: refused.
    let mut altered = key_backup.clone();
    *altered.last_mut().unwrap() ^= 1;
    delete_key(&client, "ledger").await;
    expect_err(
        restore_key(&client, &altered).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    // Deleted, then restored on the same instance: decrypts, counts kept.
    let restored = restore_key(&client, &key_backup).await.unwrap();
    assert_eq!(restored.latest_version, 2);
    // (Use statistics are not part of a key backup: they start afresh.)
    assert_eq!(
        without_use(restored.clone()).versions,
        without_use(used.clone()).versions,
        "usage counters changed"
    );
    assert_eq!(
        &decrypt(&client, "ledger", &sealed.ciphertext)
            .await
            .unwrap()[..],
        b"balance 1200"
    );

    // A full backup carries the wrapping key: a key backup made before it
    // restores on a server restored from it (the key itself deleted first, so
    // the full backup does not hold it).
    delete_key(&client, "ledger").await;
    let full = backup_of(&source.server, &source.root).await;
    let dir = tempfile::tempdir().unwrap();
    let target = TestServer::start(params(dir.path())).await;
    restore(&target.anonymous_client().await, &full)
        .await
        .unwrap();
    unseal(&target.anonymous_client().await, &source.shares[..2]).await;
    let on_target = target.client_with_token(&source.root).await;
    restore_key(&on_target, &key_backup).await.unwrap();
    assert_eq!(
        &decrypt(&on_target, "ledger", &sealed.ciphertext)
            .await
            .unwrap()[..],
        b"balance 1200"
    );
    target.stop().await;

    // Any other instance cannot open it, whether it has a wrapping key or not.
    let other = TestServer::dev().await;
    let on_other = other.client().await;
    expect_err(
        restore_key(&on_other, &key_backup).await,
        Code::FailedPrecondition,
        "FAILED_PRECONDITION",
    );
    create_key_with(
        &on_other,
        pb::CreateKeyRequest {
            name: "own".into(),
            ..Default::default()
        },
    )
    .await;
    backup_key(&on_other, "own").await.unwrap();
    expect_err(
        restore_key(&on_other, &key_backup).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert!(
        reply(
            on_other
                .admin()
                .get_key(pb::GetKeyRequest {
                    name: "ledger".into()
                })
                .await
        )
        .is_err(),
        "a refused key restore created the key"
    );
    other.stop().await;
}

async fn backup_key(client: &Client, name: &str) -> Result<Vec<u8>, Error> {
    reply(
        client
            .admin()
            .backup_key(pb::BackupKeyRequest { name: name.into() })
            .await,
    )
    .map(|r| r.key_backup.to_vec())
}

async fn restore_key(client: &Client, bytes: &[u8]) -> Result<pb::Key, Error> {
    reply(
        client
            .admin()
            .restore_key(pb::RestoreKeyRequest {
                key_backup: Bytes::copy_from_slice(bytes),
            })
            .await,
    )
    .map(|r| r.key.expect("the restored key"))
}

/// A non-dev server on `dir` whose DeleteKey destroys at once (no waiting
/// period), so that a deleted key can be restored from its key backup.
fn params(dir: &std::path::Path) -> Params {
    let mut params = Params::for_data_dir(dir, false);
    params.lifecycle.deletion_waiting_period = std::time::Duration::ZERO;
    params
}

/// Allows deletion, then deletes (destroys: see `params`).
async fn delete_key(client: &Client, name: &str) {
    reply(
        client
            .admin()
            .update_key_config(pb::UpdateKeyConfigRequest {
                name: name.into(),
                deletion_allowed: Some(true),
                ..Default::default()
            })
            .await,
    )
    .unwrap();
    reply(
        client
            .admin()
            .delete_key(pb::DeleteKeyRequest {
                name: name.into(),
                ..Default::default()
            })
            .await,
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_backup_survives_a_root_rotation() {
    let source = source().await;
    let client = source.server.client_with_token(&source.root).await;
    let name = "canary-xchacha20-poly1305";
    let key_backup = backup_key(&client, name).await.unwrap();
    let (_, plaintext, context, ciphertext) = source
        .canaries
        .iter()
        .find(|(key, ..)| key == name)
        .unwrap()
        .clone();
    // Rotate the root: a new generation, every record (the wrapping key's
    // included) re-sealed under it, the old root dropped.
    let started = rotate_root(
        &client,
        pb::rotate_root_request::Action::Start(true),
        String::new(),
    )
    .await;
    for share in &source.shares[..2] {
        rotate_root(
            &client,
            pb::rotate_root_request::Action::Share(share.clone()),
            started.nonce.clone(),
        )
        .await;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let status = reply(
            client
                .system()
                .rotate_root(pb::RotateRootRequest::default())
                .await,
        )
        .unwrap();
        if status.phase == pb::RotateRootPhase::Done as i32 {
            assert_eq!(status.root_generation, 2);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the root rotation did not finish: {status:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    delete_key(&client, name).await;
    restore_key(&client, &key_backup).await.unwrap();
    let got = client
        .decrypt(name, ciphertext, Bytes::new(), context)
        .await
        .unwrap();
    assert_eq!(&got.plaintext[..], &plaintext[..]);
}

async fn rotate_root(
    client: &Client,
    action: pb::rotate_root_request::Action,
    nonce: String,
) -> pb::RotateRootResponse {
    reply(
        client
            .system()
            .rotate_root(pb::RotateRootRequest {
                action: Some(action),
                nonce,
            })
            .await,
    )
    .unwrap()
}
