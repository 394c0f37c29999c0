//! Usage limits of the 96-bit random-nonce key types (invariant 3): encryptions are
//! counted per version, durably, and at the limit the key rotates or refuses; the
//! count never goes backwards across restarts or under concurrency.
#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

use std::{collections::BTreeSet, sync::Arc};

use bytes::Bytes;
use cipherd_e2e::{
    ALL_KEY_TYPES, Client, Code, EncryptOptions, Params, TestServer, binary_version, create_key,
    decrypt, encrypt, get_key, pb, reply, rotate,
};
use cipherd_server::config::LimitAction;

const LIMIT: u64 = 10;
const BLOCK: u64 = 4;

fn params(dir: &tempfile::TempDir, on_limit: LimitAction) -> Params {
    let mut params = Params::for_data_dir(dir.path(), true);
    params.usage.limit = LIMIT;
    params.usage.reservation_block = BLOCK;
    params.usage.on_limit = on_limit;
    params
}

/// Under a limit of 10 (rotate policy) the 11th encryption of a counted key type is served by an automatic v2 and v1 shows 10 encryptions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_limit_rotates_to_a_new_version() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(params(&dir, LimitAction::Rotate)).await;
    let client = server.client().await;

    for (key_type, label) in ALL_KEY_TYPES {
        create_key(&client, label, key_type).await;
        let counted = matches!(
            key_type,
            pb::KeyType::Aes256Gcm96 | pb::KeyType::Chacha20Poly1305
        );
        let mut made = Vec::new();
        for i in 0..=LIMIT {
            let reply = encrypt(&client, label, format!("message {i}").as_bytes()).await;
            let expected = if counted && i == LIMIT { 2 } else { 1 };
            assert_eq!(
                reply.key_version,
                expected,
                "{label}: encryption #{}",
                i + 1
            );
            assert_eq!(binary_version(&reply.ciphertext), expected, "{label}");
            made.push((i, reply.ciphertext));
        }

        let key = get_key(&client, label).await;
        if counted {
            assert_eq!(key.latest_version, 2, "{label}");
            assert_eq!(key.versions.len(), 2, "{label}");
            assert_eq!(key.versions[0].encryptions, LIMIT, "{label}");
            assert_eq!(key.versions[0].encryption_limit, LIMIT, "{label}");
            assert!(
                (1..=LIMIT).contains(&key.versions[1].encryptions),
                "{label}: {:?}",
                key.versions[1]
            );
        } else {
            assert_eq!(key.latest_version, 1, "{label}");
            assert_eq!(
                (
                    key.versions[0].encryptions,
                    key.versions[0].encryption_limit
                ),
                (0, 0),
                "{label}: not counted"
            );
        }
        for (i, ct) in made {
            assert_eq!(
                decrypt(&client, label, &ct).await.unwrap(),
                format!("message {i}").as_bytes(),
                "{label}"
            );
        }
    }
}

/// Under the refuse policy every encrypting RPC past the limit is RESOURCE_EXHAUSTED / KEY_USAGE_EXHAUSTED until an operator rotates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_limit_refuses_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(params(&dir, LimitAction::Refuse)).await;
    let client = server.client().await;
    create_key(&client, "capped", pb::KeyType::Aes256Gcm96).await;
    create_key(&client, "source", pb::KeyType::Xaes256Gcm).await;

    let mut made = Vec::new();
    for _ in 0..LIMIT {
        let reply = encrypt(&client, "capped", b"data").await;
        assert_eq!(reply.key_version, 1);
        made.push(reply.ciphertext);
    }
    let exhausted = |r: Result<(), cipherd_e2e::Error>, what: &str| {
        let err = r.expect_err(what);
        assert_eq!(
            (err.code(), err.reason()),
            (Some(Code::ResourceExhausted), Some("KEY_USAGE_EXHAUSTED")),
            "{what}: {err}"
        );
    };
    exhausted(
        client
            .encrypt("capped", &b"data"[..], &EncryptOptions::default())
            .await
            .map(drop),
        "Encrypt",
    );
    exhausted(
        client
            .encrypt(
                "capped",
                &b"data"[..],
                &EncryptOptions {
                    key_version: Some(1),
                    ..Default::default()
                },
            )
            .await
            .map(drop),
        "Encrypt pinned to v1",
    );
    let batch = pb::BatchEncryptRequest {
        key: "capped".into(),
        items: vec![pb::EncryptItem::default()],
        ..Default::default()
    };
    exhausted(
        reply(client.transit().batch_encrypt(batch).await).map(drop),
        "BatchEncrypt",
    );
    let gdk = pb::GenerateDataKeyRequest {
        key: "capped".into(),
        ..Default::default()
    };
    exhausted(
        reply(client.transit().generate_data_key(gdk).await).map(drop),
        "GenerateDataKey",
    );
    let foreign = encrypt(&client, "source", b"data").await.ciphertext;
    let rewrap = pb::RewrapRequest {
        key: "source".into(),
        ciphertext: foreign,
        destination_key: "capped".into(),
        ..Default::default()
    };
    exhausted(
        reply(client.transit().rewrap(rewrap).await).map(drop),
        "Rewrap into the key",
    );

    let key = get_key(&client, "capped").await;
    assert_eq!(key.latest_version, 1, "refuse never rotates by itself");
    assert_eq!(key.versions[0].encryptions, LIMIT);
    for ct in &made {
        assert_eq!(decrypt(&client, "capped", ct).await.unwrap(), &b"data"[..]);
    }

    assert_eq!(rotate(&client, "capped").await.latest_version, 2);
    assert_eq!(encrypt(&client, "capped", b"data").await.key_version, 2);
}

/// Usage counts survive restarts: they never go backwards and encryptions before plus after a restart never exceed the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counters_survive_restarts_and_never_go_backwards() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(params(&dir, LimitAction::Refuse)).await;
    let client = server.client().await;
    create_key(&client, "capped", pb::KeyType::Aes256Gcm96).await;
    const BEFORE: u64 = 3;
    for _ in 0..BEFORE {
        encrypt(&client, "capped", b"x").await;
    }
    let counted_before = get_key(&client, "capped").await.versions[0].encryptions;
    assert!(counted_before >= BEFORE, "{counted_before}");
    server.stop().await;

    let server = TestServer::start(params(&dir, LimitAction::Refuse)).await;
    let client = server.client().await;
    let counted_after = get_key(&client, "capped").await.versions[0].encryptions;
    assert!(
        counted_after >= counted_before,
        "the count went backwards: {counted_before} -> {counted_after}"
    );
    let after = encrypt_until_refused(&client, "capped").await;
    assert!(after >= 1, "room was left under the limit");
    assert!(
        BEFORE + after <= LIMIT,
        "{BEFORE} encryptions before the restart and {after} after exceed the limit of {LIMIT}"
    );
    assert_eq!(
        get_key(&client, "capped").await.versions[0].encryptions,
        LIMIT
    );
    server.stop().await;

    let server = TestServer::start(params(&dir, LimitAction::Refuse)).await;
    let client = server.client().await;
    assert_eq!(
        encrypt_until_refused(&client, "capped").await,
        0,
        "exhausted stays exhausted across restarts"
    );
    assert_eq!(
        get_key(&client, "capped").await.versions[0].encryptions,
        LIMIT
    );

    // With the rotate policy the exhausted v1 is skipped at once after a restart.
    server.stop().await;
    let server = TestServer::start(params(&dir, LimitAction::Rotate)).await;
    let client = server.client().await;
    assert_eq!(encrypt(&client, "capped", b"x").await.key_version, 2);
    let key = get_key(&client, "capped").await;
    assert_eq!(
        (key.latest_version, key.versions[0].encryptions),
        (2, LIMIT)
    );
}

/// Eight tasks encrypting concurrently until refused get at most the limit of 10 encryptions, all counted, distinct and decryptable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_encryptions_never_exceed_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(params(&dir, LimitAction::Refuse)).await;
    let client = server.client().await;
    create_key(&client, "busy", pb::KeyType::Aes256Gcm96).await;

    let made = hammer(&server, "busy", |_, _| false).await;
    assert!(
        made.len() as u64 <= LIMIT,
        "{} encryptions under a limit of {LIMIT}",
        made.len()
    );
    assert!(!made.is_empty());
    let key = get_key(&client, "busy").await;
    assert_eq!(key.latest_version, 1);
    assert!(key.versions[0].encryptions >= made.len() as u64);
    assert!(key.versions[0].encryptions <= LIMIT);
    check_all_distinct_and_decrypt(&client, "busy", &made).await;
}

/// Concurrent encryptions under a small limit with the rotate policy all succeed, no version exceeding the limit, with no gaps in versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_encryptions_rotate_without_failing() {
    const EACH: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(params(&dir, LimitAction::Rotate)).await;
    let client = server.client().await;
    create_key(&client, "busy", pb::KeyType::Aes256Gcm96).await;

    let made = hammer(&server, "busy", |_, i| i == EACH).await;
    assert_eq!(made.len(), TASKS * EACH);

    let key = get_key(&client, "busy").await;
    let versions: Vec<u32> = key.versions.iter().map(|v| v.version).collect();
    assert_eq!(versions, (1..=key.latest_version).collect::<Vec<u32>>());
    for v in &key.versions {
        assert!(
            v.encryptions <= LIMIT,
            "version {} counted {}",
            v.version,
            v.encryptions
        );
    }
    let total: u64 = key.versions.iter().map(|v| v.encryptions).sum();
    assert!(
        total >= made.len() as u64,
        "counted {total} of {} encryptions",
        made.len()
    );
    for version in 1..=key.latest_version {
        let used = made
            .iter()
            .filter(|(_, r)| r.key_version == version)
            .count() as u64;
        assert!(used <= LIMIT, "{used} encryptions under version {version}");
    }
    check_all_distinct_and_decrypt(&client, "busy", &made).await;
}

const TASKS: usize = 8;

/// Runs `TASKS` tasks, each on its own connection, released together, encrypting
/// under `key` until `done(task, count)` or the key refuses (KEY_USAGE_EXHAUSTED).
/// Any other error fails the test. Returns every (plaintext, reply).
async fn hammer(
    server: &TestServer,
    key: &'static str,
    done: fn(usize, usize) -> bool,
) -> Vec<(String, pb::EncryptResponse)> {
    let start = Arc::new(tokio::sync::Barrier::new(TASKS));
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let client = server.client().await;
        let start = Arc::clone(&start);
        tasks.spawn(async move {
            start.wait().await;
            let mut made = Vec::new();
            for i in 0.. {
                if done(t, i) {
                    break;
                }
                let plaintext = format!("{t}/{i}");
                match client
                    .encrypt(key, plaintext.clone(), &EncryptOptions::default())
                    .await
                {
                    Ok(reply) => made.push((plaintext, reply)),
                    Err(e) if e.reason() == Some("KEY_USAGE_EXHAUSTED") => break,
                    Err(e) => panic!("task {t} encryption {i}: {e}"),
                }
            }
            made
        });
    }
    tasks.join_all().await.into_iter().flatten().collect()
}

async fn check_all_distinct_and_decrypt(
    client: &Client,
    key: &str,
    made: &[(String, pb::EncryptResponse)],
) {
    let distinct: BTreeSet<&Bytes> = made.iter().map(|(_, r)| &r.ciphertext).collect();
    assert_eq!(distinct.len(), made.len(), "ciphertexts repeat");
    let items = made
        .iter()
        .map(|(p, r)| pb::DecryptItem {
            ciphertext: r.ciphertext.clone(),
            reference: p.clone(),
            ..Default::default()
        })
        .collect();
    let results = reply(
        client
            .transit()
            .batch_decrypt(pb::BatchDecryptRequest {
                key: key.into(),
                items,
                ..Default::default()
            })
            .await,
    )
    .unwrap()
    .results;
    assert_eq!(results.len(), made.len());
    for result in &results {
        assert_eq!(
            cipherd_e2e::plaintext_item(result).as_deref().ok(),
            Some(result.reference.as_bytes())
        );
    }
}

/// A batch larger than the usage limit (rotate policy) is spread over versions or refused with a client error, never INTERNAL or burnt versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_larger_than_the_usage_limit_is_handled_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(params(&dir, LimitAction::Rotate)).await;
    let client = server.client().await;
    create_key(&client, "capped", pb::KeyType::Aes256Gcm96).await;
    let items: Vec<_> = (0..=LIMIT)
        .map(|i| pb::EncryptItem {
            plaintext: Bytes::from(format!("item {i}")),
            reference: i.to_string(),
            ..Default::default()
        })
        .collect();
    let request = pb::BatchEncryptRequest {
        key: "capped".into(),
        items,
        ..Default::default()
    };
    match reply(client.transit().batch_encrypt(request).await) {
        Ok(batch) => {
            assert_eq!(batch.results.len() as u64, LIMIT + 1);
            let key = get_key(&client, "capped").await;
            for v in &key.versions {
                assert!(v.encryptions <= LIMIT, "{v:?}");
            }
            for r in &batch.results {
                let Some(pb::ciphertext_result::Result::Ciphertext(ct)) = &r.result else {
                    panic!("item {} failed", r.reference);
                };
                assert_eq!(
                    decrypt(&client, "capped", ct).await.unwrap(),
                    format!("item {}", r.reference).as_bytes()
                );
            }
        }
        Err(err) => {
            assert!(
                matches!(
                    (err.code(), err.reason()),
                    (Some(Code::ResourceExhausted), Some("KEY_USAGE_EXHAUSTED"))
                        | (
                            Some(Code::InvalidArgument),
                            Some("TOO_LARGE" | "INVALID_ARGUMENT")
                        )
                ),
                "a batch over the usage limit: {err}"
            );
            let key = get_key(&client, "capped").await;
            assert_eq!(
                key.latest_version, 1,
                "refusing the batch must not burn versions: {key:?}"
            );
            // The key still serves normal requests under v1.
            assert_eq!(encrypt(&client, "capped", b"ok").await.key_version, 1);
        }
    }
}

async fn encrypt_until_refused(client: &Client, key: &str) -> u64 {
    let mut made = 0;
    loop {
        match client
            .encrypt(key, &b"x"[..], &EncryptOptions::default())
            .await
        {
            Ok(_) => made += 1,
            Err(e) if e.reason() == Some("KEY_USAGE_EXHAUSTED") => return made,
            Err(e) => panic!("unexpected: {e}"),
        }
        assert!(
            made <= LIMIT,
            "more than {LIMIT} encryptions under one version"
        );
    }
}
