//! Batches (invariant 6): exactly one result per input item, in order, with its
//! reference echoed; a bad item fails alone with its own reason and never fails the
//! others.
#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

use bytes::Bytes;
use cipherd_e2e::{
    Code, HEADER_LEN, Params, TestRng, TestServer, binary_version, create_key, create_key_with,
    encrypt, expect_err, flip, get_key, item_error, pb, plaintext_item, reply, rotate,
    text_version,
};

const ITEMS: usize = 1000;
const MAX_PLAINTEXT: usize = 256;

/// A dev server with small limits: plaintexts up to 256 bytes, batches up to 1,000.
async fn small_limits_server() -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut params = Params::for_data_dir(dir.path(), true);
    params.limits.max_plaintext_bytes = MAX_PLAINTEXT;
    params.limits.max_batch_items = ITEMS;
    (TestServer::start(params).await, dir)
}

fn plaintext(i: usize) -> Bytes {
    // Varying lengths, including 0 and exactly the limit.
    let len = match i % 10 {
        0 => 0,
        7 => MAX_PLAINTEXT,
        _ => 1 + i % 97,
    };
    let mut v = format!("patient-{i:04}:").into_bytes();
    v.resize(len, b'#');
    Bytes::from(v)
}

fn aad(i: usize) -> Bytes {
    if i.is_multiple_of(3) {
        Bytes::new()
    } else {
        Bytes::from(format!("row={i}"))
    }
}

fn reference(i: usize) -> String {
    format!("ref-{i}")
}

async fn batch_encrypt(
    transit: &mut cipherd_client::TransitClient,
    key: &str,
    items: Vec<pb::EncryptItem>,
    encoding: pb::CiphertextEncoding,
) -> Vec<pb::CiphertextResult> {
    let request = pb::BatchEncryptRequest {
        key: key.to_owned(),
        items,
        key_version: None,
        encoding: encoding as i32,
    };
    reply(transit.batch_encrypt(request).await).unwrap().results
}

fn good_items() -> Vec<pb::EncryptItem> {
    (0..ITEMS)
        .map(|i| pb::EncryptItem {
            plaintext: plaintext(i),
            associated_data: aad(i),
            reference: reference(i),
            ..Default::default()
        })
        .collect()
}

fn ciphertext_of(result: &pb::CiphertextResult) -> Bytes {
    match &result.result {
        Some(pb::ciphertext_result::Result::Ciphertext(ct)) => ct.clone(),
        other => panic!("{}: expected a ciphertext, got {other:?}", result.reference),
    }
}

/// A 1,000-item BatchEncrypt with oversized items mixed in answers 1,000 results in order, references echoed, only those failing (TOO_LARGE naming the limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_encrypt_fails_only_the_oversized_items() {
    let (server, _dir) = small_limits_server().await;
    let client = server.client().await;
    let mut transit = client.transit();
    create_key(&client, "patients", pb::KeyType::Xaes256Gcm).await;

    let oversized = |i: usize| i % 10 == 3 || i == ITEMS - 1;
    let items = (0..ITEMS)
        .map(|i| {
            let plaintext = if oversized(i) {
                Bytes::from(vec![b'x'; MAX_PLAINTEXT + 1 + i % 5])
            } else {
                plaintext(i)
            };
            pb::EncryptItem {
                plaintext,
                associated_data: aad(i),
                reference: reference(i),
                ..Default::default()
            }
        })
        .collect();
    let results = batch_encrypt(
        &mut transit,
        "patients",
        items,
        pb::CiphertextEncoding::Binary,
    )
    .await;
    assert_eq!(results.len(), ITEMS);

    let mut good = Vec::new();
    for (i, result) in results.iter().enumerate() {
        assert_eq!(result.reference, reference(i), "order and references");
        match &result.result {
            Some(pb::ciphertext_result::Result::Ciphertext(ct)) => {
                assert!(!oversized(i), "item {i} should have failed");
                assert_eq!(result.key_version, 1, "item {i}");
                assert_eq!(binary_version(ct), 1, "item {i}");
                good.push((i, ct.clone()));
            }
            Some(pb::ciphertext_result::Result::Error(status)) => {
                assert!(oversized(i), "item {i} failed: {status:?}");
                let (code, reason, message) = item_error(status);
                assert_eq!(
                    (code, reason.as_str()),
                    (Code::InvalidArgument, "TOO_LARGE")
                );
                assert!(
                    message.contains(&MAX_PLAINTEXT.to_string()),
                    "the limit is named: {message:?}"
                );
            }
            None => panic!("item {i}: empty result"),
        }
    }
    assert_eq!(good.len(), ITEMS - ITEMS / 10 - 1);

    // Every good ciphertext opens to its own plaintext (one batch decrypt).
    let items = good
        .iter()
        .map(|(i, ct)| pb::DecryptItem {
            ciphertext: ct.clone(),
            associated_data: aad(*i),
            reference: reference(*i),
            ..Default::default()
        })
        .collect();
    let request = pb::BatchDecryptRequest {
        key: "patients".into(),
        items,
        ..Default::default()
    };
    let decrypted = reply(transit.batch_decrypt(request).await).unwrap().results;
    assert_eq!(decrypted.len(), good.len());
    for ((i, _), result) in good.iter().zip(&decrypted) {
        assert_eq!(result.reference, reference(*i));
        assert_eq!(plaintext_item(result), Ok(plaintext(*i)), "item {i}");
    }
}

/// A 1,000-item BatchDecrypt with tampered, wrong-AAD, foreign, relabelled and random items fails only those, all with one opaque DECRYPTION_FAILED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_decrypt_fails_only_the_bad_items() {
    let (server, _dir) = small_limits_server().await;
    let client = server.client().await;
    let mut transit = client.transit();
    create_key(&client, "patients", pb::KeyType::Aes256Gcm96).await;
    create_key(&client, "other", pb::KeyType::Aes256Gcm96).await;

    let binary = batch_encrypt(
        &mut transit,
        "patients",
        good_items(),
        pb::CiphertextEncoding::Binary,
    )
    .await;
    let text = batch_encrypt(
        &mut transit,
        "patients",
        good_items(),
        pb::CiphertextEncoding::Text,
    )
    .await;
    assert_eq!((binary.len(), text.len()), (ITEMS, ITEMS));
    let foreign = encrypt(&client, "other", b"not yours").await.ciphertext;

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Kind {
        Good,
        Tampered,
        WrongAad,
        OtherKey,
        UnknownVersion,
        Garbage,
    }
    let kind = |i: usize| match i % 11 {
        1 => Kind::Tampered,
        4 => Kind::WrongAad,
        6 => Kind::OtherKey,
        8 => Kind::UnknownVersion,
        9 => Kind::Garbage,
        _ => Kind::Good,
    };
    let mut rng = TestRng::new(0xba7c4);
    let items = (0..ITEMS)
        .map(|i| {
            let good = if i % 2 == 0 {
                ciphertext_of(&binary[i])
            } else {
                ciphertext_of(&text[i])
            };
            let binary_good = ciphertext_of(&binary[i]);
            let (ciphertext, associated_data) = match kind(i) {
                Kind::Good => (good, aad(i)),
                Kind::Tampered => (flip(&binary_good, binary_good.len() - 1 - i % 16), aad(i)),
                Kind::WrongAad => (good, Bytes::from(format!("row={}", i + 1))),
                Kind::OtherKey => (foreign.clone(), Bytes::new()),
                Kind::UnknownVersion => {
                    let mut v = binary_good.to_vec();
                    v[1..5].copy_from_slice(&7u32.to_be_bytes());
                    (Bytes::from(v), aad(i))
                }
                Kind::Garbage => {
                    let len = rng.below(80) as usize;
                    (Bytes::from(rng.bytes(len)), aad(i))
                }
            };
            pb::DecryptItem {
                ciphertext,
                associated_data,
                reference: reference(i),
                ..Default::default()
            }
        })
        .collect();
    let request = pb::BatchDecryptRequest {
        key: "patients".into(),
        items,
        ..Default::default()
    };
    let results = reply(transit.batch_decrypt(request).await).unwrap().results;
    assert_eq!(results.len(), ITEMS);

    let mut messages = std::collections::BTreeSet::new();
    let mut failures = 0;
    for (i, result) in results.iter().enumerate() {
        assert_eq!(result.reference, reference(i), "order and references");
        match (plaintext_item(result), kind(i)) {
            (Ok(p), Kind::Good) => {
                assert_eq!(p, plaintext(i), "item {i}");
                assert_eq!(result.key_version, 1, "item {i}");
            }
            (Err((code, reason, message)), k) if k != Kind::Good => {
                assert_eq!(
                    (code, reason.as_str()),
                    (Code::InvalidArgument, "DECRYPTION_FAILED"),
                    "item {i} ({k:?}): {message}"
                );
                messages.insert(message);
                failures += 1;
            }
            (Ok(_), k) => panic!("item {i} ({k:?}) decrypted"),
            (Err(e), k) => panic!("item {i} ({k:?}): unexpected {e:?}"),
        }
    }
    assert!(failures > 400, "the batch really mixed in bad items");
    assert_eq!(
        messages.len(),
        1,
        "one opaque message for every cause: {messages:?}"
    );

    // The unary error is that same message.
    let unary = client
        .decrypt("patients", foreign, Bytes::new(), Bytes::new())
        .await;
    let message = expect_err(unary, Code::InvalidArgument, "DECRYPTION_FAILED");
    assert!(messages.contains(&message));
}

/// A 1,000-item BatchRewrap after a rotation moves good items to v2 with their plaintext intact and fails only the tampered and wrong-AAD ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_rewrap_fails_only_the_bad_items() {
    let (server, _dir) = small_limits_server().await;
    let client = server.client().await;
    let mut transit = client.transit();
    create_key(&client, "patients", pb::KeyType::Chacha20Poly1305).await;
    let v1 = batch_encrypt(
        &mut transit,
        "patients",
        good_items(),
        pb::CiphertextEncoding::Binary,
    )
    .await;
    assert_eq!(rotate(&client, "patients").await.latest_version, 2);

    let bad = |i: usize| i % 7 == 2 || i % 7 == 5;
    let items = (0..ITEMS)
        .map(|i| {
            let ct = ciphertext_of(&v1[i]);
            let (ciphertext, associated_data) = match i % 7 {
                2 => (flip(&ct, HEADER_LEN + i % 8), aad(i)),
                5 => (ct, Bytes::from_static(b"wrong")),
                _ => (ct, aad(i)),
            };
            pb::RewrapItem {
                ciphertext,
                associated_data,
                reference: reference(i),
                ..Default::default()
            }
        })
        .collect();
    let request = pb::BatchRewrapRequest {
        key: "patients".into(),
        items,
        destination_key: String::new(),
        encoding: pb::CiphertextEncoding::Text as i32,
        ..Default::default()
    };
    let results = reply(transit.batch_rewrap(request).await).unwrap().results;
    assert_eq!(results.len(), ITEMS);

    let mut to_check = Vec::new();
    for (i, result) in results.iter().enumerate() {
        assert_eq!(result.reference, reference(i), "order and references");
        match &result.result {
            Some(pb::ciphertext_result::Result::Ciphertext(ct)) => {
                assert!(!bad(i), "item {i} should have failed");
                assert_eq!(result.key_version, 2, "item {i}");
                assert_eq!(text_version(ct), 2, "item {i}");
                to_check.push(pb::DecryptItem {
                    ciphertext: ct.clone(),
                    associated_data: aad(i),
                    reference: reference(i),
                    ..Default::default()
                });
            }
            Some(pb::ciphertext_result::Result::Error(status)) => {
                assert!(bad(i), "item {i} failed: {status:?}");
                let (code, reason, _) = item_error(status);
                assert_eq!(
                    (code, reason.as_str()),
                    (Code::InvalidArgument, "DECRYPTION_FAILED")
                );
            }
            None => panic!("item {i}: empty result"),
        }
    }

    let request = pb::BatchDecryptRequest {
        key: "patients".into(),
        items: to_check,
        ..Default::default()
    };
    for result in reply(transit.batch_decrypt(request).await).unwrap().results {
        let i: usize = result.reference["ref-".len()..].parse().unwrap();
        assert_eq!(plaintext_item(&result), Ok(plaintext(i)));
        assert_eq!(result.key_version, 2);
    }
}

/// Per-item contexts on a derived key fail only the items without one; over max_batch_items, an unknown key or an empty batch are handled whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_contexts_and_whole_request_limits() {
    let (server, _dir) = small_limits_server().await;
    let client = server.client().await;
    let mut transit = client.transit();
    create_key_with(
        &client,
        pb::CreateKeyRequest {
            name: "tenants".into(),
            derived: true,
            ..Default::default()
        },
    )
    .await;
    let context = |i: usize| {
        if i.is_multiple_of(5) {
            Bytes::new()
        } else {
            Bytes::from(format!("tenant-{}", i % 13))
        }
    };
    let items = (0..100)
        .map(|i| pb::EncryptItem {
            plaintext: plaintext(i),
            context: context(i),
            reference: reference(i),
            ..Default::default()
        })
        .collect();
    let results = batch_encrypt(
        &mut transit,
        "tenants",
        items,
        pb::CiphertextEncoding::Binary,
    )
    .await;
    assert_eq!(results.len(), 100);
    let mut decrypt_items = Vec::new();
    for (i, result) in results.iter().enumerate() {
        assert_eq!(result.reference, reference(i));
        match &result.result {
            Some(pb::ciphertext_result::Result::Ciphertext(ct)) => {
                assert_ne!(i % 5, 0, "item {i} has no context and should fail");
                // Decrypt with the right context, and with a neighbour's.
                for (ctx, suffix) in [(context(i), "right"), (context(i + 1), "wrong")] {
                    decrypt_items.push(pb::DecryptItem {
                        ciphertext: ct.clone(),
                        context: ctx,
                        reference: format!("{i}-{suffix}"),
                        ..Default::default()
                    });
                }
            }
            Some(pb::ciphertext_result::Result::Error(status)) => {
                assert_eq!(i % 5, 0, "item {i}: {status:?}");
                let (code, reason, _) = item_error(status);
                assert_eq!(
                    (code, reason.as_str()),
                    (Code::InvalidArgument, "INVALID_ARGUMENT")
                );
            }
            None => panic!("item {i}: empty result"),
        }
    }
    let request = pb::BatchDecryptRequest {
        key: "tenants".into(),
        items: decrypt_items,
        ..Default::default()
    };
    for result in reply(transit.batch_decrypt(request).await).unwrap().results {
        let (i, which) = result.reference.split_once('-').unwrap();
        let i: usize = i.parse().unwrap();
        match (which, plaintext_item(&result)) {
            ("right", Ok(p)) => assert_eq!(p, plaintext(i)),
            ("wrong", Err((code, reason, _))) => {
                // The neighbour's context is empty for some items: that is a missing
                // context (INVALID_ARGUMENT), otherwise the wrong one.
                let expected = if (i + 1).is_multiple_of(5) {
                    "INVALID_ARGUMENT"
                } else {
                    "DECRYPTION_FAILED"
                };
                assert_eq!((code, reason.as_str()), (Code::InvalidArgument, expected));
            }
            (_, Ok(_)) => panic!("{}: decrypted", result.reference),
            (_, Err(e)) => panic!("{}: unexpected {e:?}", result.reference),
        }
    }

    // One item over the limit: the whole request is refused, naming the limit.
    let too_many = (0..=ITEMS)
        .map(|i| pb::EncryptItem {
            plaintext: plaintext(i),
            context: Bytes::from_static(b"t"),
            ..Default::default()
        })
        .collect();
    let request = pb::BatchEncryptRequest {
        key: "tenants".into(),
        items: too_many,
        ..Default::default()
    };
    let message = expect_err(
        reply(transit.batch_encrypt(request).await),
        Code::InvalidArgument,
        "TOO_LARGE",
    );
    assert!(message.contains(&ITEMS.to_string()), "{message}");

    let request = pb::BatchDecryptRequest {
        key: "no-such-key".into(),
        items: vec![pb::DecryptItem::default()],
        ..Default::default()
    };
    expect_err(
        reply(transit.batch_decrypt(request).await),
        Code::NotFound,
        "KEY_NOT_FOUND",
    );

    let request = pb::BatchEncryptRequest {
        key: "tenants".into(),
        ..Default::default()
    };
    assert!(
        reply(transit.batch_encrypt(request).await)
            .unwrap()
            .results
            .is_empty()
    );
}

/// A batch whose reply would exceed `limits.max_message_bytes` (text output grows
/// by a third) is refused with TOO_LARGE before any work: no encryption is
/// reserved under the key. The same items in binary fit and are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_whose_reply_would_not_fit_is_refused_before_the_work() {
    const ITEM: usize = 70 << 10;
    let dir = tempfile::tempdir().unwrap();
    let mut params = Params::for_data_dir(dir.path(), true);
    params.limits.max_message_bytes = 256 << 10;
    params.limits.max_plaintext_bytes = ITEM;
    let server = TestServer::start(params).await;
    let client = server.client().await;
    create_key(&client, "counted", pb::KeyType::Aes256Gcm96).await;
    let request = |encoding: pb::CiphertextEncoding| pb::BatchEncryptRequest {
        key: "counted".into(),
        items: (0..3)
            .map(|i| pb::EncryptItem {
                plaintext: Bytes::from(vec![i as u8; ITEM]),
                ..Default::default()
            })
            .collect(),
        encoding: encoding as i32,
        ..Default::default()
    };

    // 210 KiB in, about 280 KiB out.
    let message = expect_err(
        reply(
            client
                .transit()
                .batch_encrypt(request(pb::CiphertextEncoding::Text))
                .await,
        ),
        Code::InvalidArgument,
        "TOO_LARGE",
    );
    assert!(message.contains("limits.max_message_bytes"), "{message}");
    let key = get_key(&client, "counted").await;
    assert_eq!(key.versions[0].encryptions, 0, "work was done: {key:?}");

    let served = reply(
        client
            .transit()
            .batch_encrypt(request(pb::CiphertextEncoding::Binary))
            .await,
    )
    .unwrap();
    assert_eq!(served.results.len(), 3);
    assert!(
        served
            .results
            .iter()
            .all(|r| matches!(r.result, Some(pb::ciphertext_result::Result::Ciphertext(_))))
    );
}

/// `GetKey` counts, per version, the items a batch encrypted and the items it
/// decrypted (batches large enough to run on the worker pool, so several workers
/// add their counts), but not items that failed to decrypt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_key_counts_batch_items_per_version() {
    let server = TestServer::dev().await;
    let client = server.client().await;
    let mut transit = client.transit();
    create_key(&client, "counted", pb::KeyType::Xaes256Gcm).await;
    let encrypt_batch = |n: usize| pb::BatchEncryptRequest {
        key: "counted".into(),
        items: (0..n)
            .map(|i| pb::EncryptItem {
                plaintext: vec![i as u8; 4096].into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let mut cts = Vec::new();
    let first = reply(transit.batch_encrypt(encrypt_batch(300)).await).unwrap();
    rotate(&client, "counted").await;
    let second = reply(transit.batch_encrypt(encrypt_batch(200)).await).unwrap();
    for r in first.results.iter().chain(&second.results) {
        match &r.result {
            Some(pb::ciphertext_result::Result::Ciphertext(ct)) => cts.push(ct.clone()),
            other => panic!("{other:?}"),
        }
    }
    // All 500 back in one batch, plus 7 forged items that fail.
    let mut items: Vec<pb::DecryptItem> = cts
        .iter()
        .map(|ct| pb::DecryptItem {
            ciphertext: ct.clone(),
            ..Default::default()
        })
        .collect();
    for ct in &cts[..7] {
        items.push(pb::DecryptItem {
            ciphertext: flip(ct, HEADER_LEN + 3),
            ..Default::default()
        });
    }
    let results = reply(
        transit
            .batch_decrypt(pb::BatchDecryptRequest {
                key: "counted".into(),
                items,
                ..Default::default()
            })
            .await,
    )
    .unwrap()
    .results;
    assert_eq!(
        results.iter().filter(|r| plaintext_item(r).is_ok()).count(),
        500
    );

    let key = get_key(&client, "counted").await;
    let counts: Vec<(u32, u64, u64, bool)> = key
        .versions
        .iter()
        .map(|v| {
            (
                v.version,
                v.encrypt_count,
                v.decrypt_count,
                v.last_used.is_some(),
            )
        })
        .collect();
    assert_eq!(counts, [(1, 300, 300, true), (2, 200, 200, true)]);
}
