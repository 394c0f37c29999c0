//! The error contract seen by clients: a reason for every failure, one opaque
//! decryption error whatever the cause, size limits that name themselves, and
//! garbage input that never takes the server down.
#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

use std::fmt::Debug;

use bytes::Bytes;
use cipherd_e2e::{
    Client, Code, EncryptOptions, Error, HEADER_LEN, Params, TestRng, TestServer, create_key,
    create_key_with, encrypt, expect_err, flip, pb, plaintext_item, reply, rotate,
};

/// Every RPC naming a key that does not exist answers NOT_FOUND / KEY_NOT_FOUND.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key_is_key_not_found_on_every_rpc() {
    let server = TestServer::dev().await;
    let client = server.client().await;
    let mut t = client.transit();
    let mut a = client.admin();
    let name = || "no-such-key".to_owned();
    let not_found = |r: Result<(), Error>, rpc: &str| {
        let err = r.expect_err(rpc);
        assert_eq!(
            (err.code(), err.reason()),
            (Some(Code::NotFound), Some("KEY_NOT_FOUND")),
            "{rpc}: {err}"
        );
    };
    // A real ciphertext, so decrypt cannot fail on parsing first.
    create_key(&client, "exists", pb::KeyType::Xaes256Gcm).await;
    let ct = encrypt(&client, "exists", b"x").await.ciphertext;

    let r = t
        .encrypt(pb::EncryptRequest {
            key: name(),
            plaintext: Bytes::from_static(b"x"),
            ..Default::default()
        })
        .await;
    not_found(reply(r).map(drop), "Encrypt");
    let r = t
        .decrypt(pb::DecryptRequest {
            key: name(),
            ciphertext: ct.clone(),
            ..Default::default()
        })
        .await;
    not_found(reply(r).map(drop), "Decrypt");
    let r = t
        .rewrap(pb::RewrapRequest {
            key: name(),
            ciphertext: ct.clone(),
            ..Default::default()
        })
        .await;
    not_found(reply(r).map(drop), "Rewrap");
    let r = t
        .batch_encrypt(pb::BatchEncryptRequest {
            key: name(),
            items: vec![pb::EncryptItem::default()],
            ..Default::default()
        })
        .await;
    not_found(reply(r).map(drop), "BatchEncrypt");
    let r = t
        .batch_decrypt(pb::BatchDecryptRequest {
            key: name(),
            items: vec![pb::DecryptItem {
                ciphertext: ct.clone(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await;
    not_found(reply(r).map(drop), "BatchDecrypt");
    let r = t
        .batch_rewrap(pb::BatchRewrapRequest {
            key: name(),
            items: vec![pb::RewrapItem {
                ciphertext: ct.clone(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await;
    not_found(reply(r).map(drop), "BatchRewrap");
    let r = t
        .batch_rewrap(pb::BatchRewrapRequest {
            key: "exists".into(),
            items: vec![pb::RewrapItem {
                ciphertext: ct.clone(),
                ..Default::default()
            }],
            destination_key: name(),
            ..Default::default()
        })
        .await;
    not_found(reply(r).map(drop), "BatchRewrap to an unknown destination");
    let r = t
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: name(),
            ..Default::default()
        })
        .await;
    not_found(reply(r).map(drop), "GenerateDataKey");
    let r = a.get_key(pb::GetKeyRequest { name: name() }).await;
    not_found(reply(r).map(drop), "GetKey");
    let r = a.rotate_key(pb::RotateKeyRequest { name: name() }).await;
    not_found(reply(r).map(drop), "RotateKey");
    let r = a
        .update_key_config(pb::UpdateKeyConfigRequest {
            name: name(),
            deletion_allowed: Some(true),
            ..Default::default()
        })
        .await;
    not_found(reply(r).map(drop), "UpdateKeyConfig");
    let r = a
        .trim_key(pb::TrimKeyRequest {
            name: name(),
            min_available_version: 1,
        })
        .await;
    not_found(reply(r).map(drop), "TrimKey");
    let r = a
        .delete_key(pb::DeleteKeyRequest {
            name: name(),
            ..Default::default()
        })
        .await;
    not_found(reply(r).map(drop), "DeleteKey");
    let r = a
        .export_key(pb::ExportKeyRequest {
            name: name(),
            version: None,
        })
        .await;
    not_found(reply(r).map(drop), "ExportKey");
}

/// Tampering, wrong key/AAD/context/format byte/version and truncation all give INVALID_ARGUMENT / DECRYPTION_FAILED with one identical message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decryption_failure_is_one_identical_opaque_error() {
    let server = TestServer::dev().await;
    let client = server.client().await;
    create_key(&client, "a", pb::KeyType::Aes256Gcm96).await;
    create_key(&client, "b", pb::KeyType::Aes256Gcm96).await;
    rotate(&client, "a").await;
    create_key_with(
        &client,
        pb::CreateKeyRequest {
            name: "d".into(),
            derived: true,
            ..Default::default()
        },
    )
    .await;
    let aad = Bytes::from_static(b"row=1");
    let options = |text| EncryptOptions {
        associated_data: aad.clone(),
        text,
        ..Default::default()
    };
    let ct = client
        .encrypt("a", &b"secret"[..], &options(false))
        .await
        .unwrap()
        .ciphertext;
    assert_eq!(cipherd_e2e::binary_version(&ct), 2);
    let text = client
        .encrypt("a", &b"secret"[..], &options(true))
        .await
        .unwrap()
        .ciphertext;
    let from_b = client
        .encrypt("b", &b"secret"[..], &options(false))
        .await
        .unwrap()
        .ciphertext;
    let derived = client
        .encrypt(
            "d",
            &b"secret"[..],
            &EncryptOptions {
                context: Bytes::from_static(b"tenant-a"),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .ciphertext;

    let relabel = |version: u32| {
        let mut v = ct.to_vec();
        v[1..HEADER_LEN].copy_from_slice(&version.to_be_bytes());
        Bytes::from(v)
    };
    let text_str = std::str::from_utf8(&text).unwrap().to_owned();
    let mut tampered_text = text_str.clone().into_bytes();
    let last_data = tampered_text.len() - 3; // clear of the padding
    tampered_text[last_data] = if tampered_text[last_data] == b'A' {
        b'B'
    } else {
        b'A'
    };

    // (what, key, ciphertext, associated data, context)
    let cases: Vec<(&str, &str, Bytes, Bytes, Bytes)> = vec![
        (
            "tampered tag",
            "a",
            flip(&ct, ct.len() - 1),
            aad.clone(),
            Bytes::new(),
        ),
        (
            "tampered nonce",
            "a",
            flip(&ct, HEADER_LEN),
            aad.clone(),
            Bytes::new(),
        ),
        (
            "tampered body",
            "a",
            flip(&ct, HEADER_LEN + 12),
            aad.clone(),
            Bytes::new(),
        ),
        ("wrong key", "b", ct.clone(), aad.clone(), Bytes::new()),
        (
            "another key's ciphertext",
            "a",
            from_b,
            aad.clone(),
            Bytes::new(),
        ),
        (
            "wrong aad",
            "a",
            ct.clone(),
            Bytes::from_static(b"row=2"),
            Bytes::new(),
        ),
        ("missing aad", "a", ct.clone(), Bytes::new(), Bytes::new()),
        (
            "wrong format byte",
            "a",
            {
                let mut v = ct.to_vec();
                v[0] = 0x02;
                Bytes::from(v)
            },
            aad.clone(),
            Bytes::new(),
        ),
        (
            "version relabelled to an existing one",
            "a",
            relabel(1),
            aad.clone(),
            Bytes::new(),
        ),
        (
            "unknown version",
            "a",
            relabel(99),
            aad.clone(),
            Bytes::new(),
        ),
        ("version 0", "a", relabel(0), aad.clone(), Bytes::new()),
        (
            "huge version",
            "a",
            relabel(u32::MAX),
            aad.clone(),
            Bytes::new(),
        ),
        (
            "truncated",
            "a",
            ct.slice(..ct.len() - 1),
            aad.clone(),
            Bytes::new(),
        ),
        (
            "header only",
            "a",
            ct.slice(..HEADER_LEN),
            aad.clone(),
            Bytes::new(),
        ),
        ("empty", "a", Bytes::new(), aad.clone(), Bytes::new()),
        (
            "tampered text",
            "a",
            Bytes::from(tampered_text),
            aad.clone(),
            Bytes::new(),
        ),
        (
            "text relabelled",
            "a",
            Bytes::from(text_str.replacen("cipherd:v2:", "cipherd:v1:", 1)),
            aad.clone(),
            Bytes::new(),
        ),
        (
            "text with a leading zero",
            "a",
            Bytes::from(text_str.replacen("cipherd:v2:", "cipherd:v02:", 1)),
            aad.clone(),
            Bytes::new(),
        ),
        (
            "text without padding",
            "a",
            Bytes::from(text_str.trim_end_matches('=').to_owned()),
            aad.clone(),
            Bytes::new(),
        ),
        (
            "wrong context",
            "d",
            derived.clone(),
            Bytes::new(),
            Bytes::from_static(b"tenant-b"),
        ),
    ];

    let mut messages = std::collections::BTreeMap::new();
    for (what, key, ciphertext, associated_data, context) in cases {
        let r = client
            .decrypt(
                key,
                ciphertext.clone(),
                associated_data.clone(),
                context.clone(),
            )
            .await;
        let message = expect_err_named(r, what, Code::InvalidArgument, "DECRYPTION_FAILED");
        messages.insert(message, what);
        let r = reply(
            client
                .transit()
                .rewrap(pb::RewrapRequest {
                    key: key.to_owned(),
                    ciphertext,
                    associated_data,
                    context,
                    ..Default::default()
                })
                .await,
        );
        let what = format!("rewrap: {what}");
        let message = expect_err_named(r, &what, Code::InvalidArgument, "DECRYPTION_FAILED");
        messages.insert(message, "rewrap");
    }
    assert_eq!(messages.len(), 1, "messages differ by cause: {messages:#?}");
    let message = messages.into_keys().next().unwrap();
    assert!(!message.contains("secret"));

    // The untouched ciphertext still decrypts: the failures were the inputs'.
    let ok = client
        .decrypt("a", ct, aad.clone(), Bytes::new())
        .await
        .unwrap();
    assert_eq!(ok.plaintext, &b"secret"[..]);
}

/// An oversized plaintext is INVALID_ARGUMENT / TOO_LARGE naming the limit (the limit itself passes); an oversized gRPC message harms nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_plaintext_is_too_large_and_names_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut params = Params::for_data_dir(dir.path(), true);
    params.limits.max_plaintext_bytes = 1000;
    params.limits.max_message_bytes = 16 * 1024;
    let server = TestServer::start(params).await;
    let client = server.client().await;
    create_key(&client, "k", pb::KeyType::Xaes256Gcm).await;

    let at_limit = encrypt(&client, "k", &[7; 1000]).await;
    assert_eq!(
        cipherd_e2e::decrypt(&client, "k", &at_limit.ciphertext)
            .await
            .unwrap()
            .len(),
        1000
    );
    for text in [false, true] {
        let r = client
            .encrypt(
                "k",
                vec![7u8; 1001],
                &EncryptOptions {
                    text,
                    ..Default::default()
                },
            )
            .await;
        let message = expect_err(r, Code::InvalidArgument, "TOO_LARGE");
        assert!(message.contains("1000"), "names the limit: {message:?}");
        assert!(message.contains("1001"), "names the size: {message:?}");
    }
    let r = client
        .encrypt("k", vec![7u8; 1 << 20], &EncryptOptions::default())
        .await;
    let err = r.expect_err("a 1 MiB message is beyond max_message_bytes");
    assert!(
        matches!(
            err.code(),
            Some(Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument)
        ),
        "{err}"
    );
    assert_still_serving(&client).await;
}

/// Random ciphertexts, bad names, versions, enums and sizes get precise rejections, never a crash or INTERNAL; the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_input_never_crashes_the_server() {
    let server = TestServer::dev().await;
    let client = server.client().await;
    create_key(&client, "k", pb::KeyType::Aes256Gcm96).await;
    create_key(&client, "x", pb::KeyType::Xchacha20Poly1305).await;

    // Random ciphertexts, many of them shaped to get past the first parsing steps.
    let mut rng = TestRng::new(0x6a7ba6e);
    let prefixes: [&[u8]; 9] = [
        b"",
        b"\x01",
        b"\x01\x00\x00\x00\x01",
        b"\x01\xff\xff\xff\xff",
        b"cipherd:",
        b"cipherd:v",
        b"cipherd:v1:",
        b"cipherd:v4294967295:",
        b"cipherd:v99999999999:",
    ];
    let mut garbage = Vec::new();
    for i in 0..600 {
        let mut v = prefixes[i % prefixes.len()].to_vec();
        let len = rng.below(120) as usize;
        if i % 2 == 0 {
            v.extend(rng.bytes(len));
        } else {
            const B64: &[u8] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=:";
            v.extend((0..len).map(|_| B64[rng.below(B64.len() as u64) as usize]));
        }
        garbage.push(Bytes::from(v));
    }
    for key in ["k", "x"] {
        let items = garbage
            .iter()
            .map(|ct| pb::DecryptItem {
                ciphertext: ct.clone(),
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
        assert_eq!(results.len(), garbage.len());
        for (ct, result) in garbage.iter().zip(&results) {
            let (code, reason, _) = plaintext_item(result).expect_err("garbage decrypted");
            assert_eq!(
                (code, reason.as_str()),
                (Code::InvalidArgument, "DECRYPTION_FAILED"),
                "{ct:?}"
            );
        }
        for ct in garbage.iter().step_by(10) {
            let r = client
                .decrypt(key, ct.clone(), Bytes::new(), Bytes::new())
                .await;
            expect_err_named(r, "garbage", Code::InvalidArgument, "DECRYPTION_FAILED");
        }
    }

    // Key names outside the rules, on the data plane and the admin plane.
    let long = "n".repeat(129);
    for bad in [
        "",
        "../keys/k",
        "a/b",
        "-flag",
        ".hidden",
        "..",
        long.as_str(),
        "ünïcödé",
        "with space",
        "nul\0byte",
        "k\n",
    ] {
        let r = client
            .encrypt(bad, &b"x"[..], &EncryptOptions::default())
            .await;
        expect_err_named(r, bad, Code::InvalidArgument, "INVALID_ARGUMENT");
        let r = reply(
            client
                .admin()
                .create_key(pb::CreateKeyRequest {
                    name: bad.to_owned(),
                    ..Default::default()
                })
                .await,
        );
        expect_err_named(r, bad, Code::InvalidArgument, "INVALID_ARGUMENT");
        let r = reply(
            client
                .admin()
                .get_key(pb::GetKeyRequest {
                    name: bad.to_owned(),
                })
                .await,
        );
        expect_err_named(r, bad, Code::InvalidArgument, "INVALID_ARGUMENT");
    }
    // The longest valid name is fine.
    create_key(&client, &"n".repeat(128), pb::KeyType::Xaes256Gcm).await;

    // Versions that are not versions, and versions that do not exist.
    let pinned = |v| EncryptOptions {
        key_version: Some(v),
        ..Default::default()
    };
    let r = client.encrypt("k", &b"x"[..], &pinned(0)).await;
    expect_err_named(
        r,
        "key_version 0",
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    for v in [2, u32::MAX] {
        let r = client.encrypt("k", &b"x"[..], &pinned(v)).await;
        assert_clean_rejection(r, &format!("Encrypt key_version {v}"));
    }
    let r = reply(
        client
            .admin()
            .trim_key(pb::TrimKeyRequest {
                name: "k".into(),
                min_available_version: u32::MAX,
            })
            .await,
    );
    expect_err_named(
        r,
        "trim to u32::MAX",
        Code::FailedPrecondition,
        "FAILED_PRECONDITION",
    );
    let r = reply(
        client
            .admin()
            .trim_key(pb::TrimKeyRequest {
                name: "k".into(),
                min_available_version: 0,
            })
            .await,
    );
    expect_err_named(r, "trim to 0", Code::InvalidArgument, "INVALID_ARGUMENT");
    for (min_dec, min_enc) in [
        (Some(u32::MAX), None),
        (None, Some(u32::MAX)),
        (Some(0), None),
    ] {
        let r = reply(
            client
                .admin()
                .update_key_config(pb::UpdateKeyConfigRequest {
                    name: "k".into(),
                    min_decryption_version: min_dec,
                    min_encryption_version: min_enc,
                    ..Default::default()
                })
                .await,
        );
        assert_clean_rejection(r, &format!("UpdateKeyConfig {min_dec:?} {min_enc:?}"));
    }
    let r = reply(
        client
            .admin()
            .export_key(pb::ExportKeyRequest {
                name: "k".into(),
                version: Some(u32::MAX),
            })
            .await,
    );
    expect_err_named(r, "export", Code::FailedPrecondition, "FAILED_PRECONDITION");

    // Enum values from the future.
    let r = reply(
        client
            .transit()
            .encrypt(pb::EncryptRequest {
                key: "k".into(),
                encoding: 99,
                ..Default::default()
            })
            .await,
    );
    expect_err_named(r, "encoding 99", Code::InvalidArgument, "INVALID_ARGUMENT");
    let r = reply(
        client
            .admin()
            .create_key(pb::CreateKeyRequest {
                name: "future".into(),
                r#type: 99,
                ..Default::default()
            })
            .await,
    );
    expect_err_named(r, "key type 99", Code::InvalidArgument, "INVALID_ARGUMENT");
    let r = reply(
        client
            .transit()
            .generate_data_key(pb::GenerateDataKeyRequest {
                key: "k".into(),
                bits: u32::MAX,
                ..Default::default()
            })
            .await,
    );
    expect_err_named(r, "bits", Code::InvalidArgument, "INVALID_ARGUMENT");

    // Paging with absurd sizes and tokens answers normally.
    for (page_size, page_token) in [(u32::MAX, ""), (0, "\u{10FFFF}"), (1, "../../")] {
        reply(
            client
                .admin()
                .list_keys(pb::ListKeysRequest {
                    page_size,
                    page_token: page_token.into(),
                })
                .await,
        )
        .unwrap_or_else(|e| panic!("ListKeys {page_size} {page_token:?}: {e}"));
    }

    // Lifecycle calls out of place.
    let r = reply(
        client
            .system()
            .init(pb::InitRequest {
                shares: 5,
                threshold: 3,
            })
            .await,
    );
    expect_err_named(r, "init", Code::FailedPrecondition, "ALREADY_INITIALIZED");
    let r = reply(
        client
            .system()
            .unseal(pb::UnsealRequest {
                share: "garbage".into(),
                reset: false,
            })
            .await,
    );
    expect_err_named(r, "unseal", Code::FailedPrecondition, "ALREADY_UNSEALED");

    assert_still_serving(&client).await;
}

/// Encrypting under a key version that does not exist is rejected as a bad version, not as DECRYPTION_FAILED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypt_under_an_unknown_version_is_not_a_decryption_error() {
    let server = TestServer::dev().await;
    let client = server.client().await;
    create_key(&client, "k", pb::KeyType::Aes256Gcm96).await;
    for version in [2, u32::MAX] {
        let options = EncryptOptions {
            key_version: Some(version),
            ..Default::default()
        };
        let unary = client.encrypt("k", &b"x"[..], &options).await.map(drop);
        let batch = reply(
            client
                .transit()
                .batch_encrypt(pb::BatchEncryptRequest {
                    key: "k".into(),
                    items: vec![pb::EncryptItem::default()],
                    key_version: Some(version),
                    ..Default::default()
                })
                .await,
        )
        .map(drop);
        for (rpc, r) in [("Encrypt", unary), ("BatchEncrypt", batch)] {
            let err = r.expect_err("no such version");
            assert!(
                matches!(
                    err.code(),
                    Some(Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition)
                ) && err.reason().is_some_and(|r| r != "DECRYPTION_FAILED")
                    && !err.to_string().contains("decryption"),
                "{rpc} under version {version}: {err}"
            );
        }
    }
}

/// Client-facing error messages quote key names as written ("patients"), not as Rust debug output (KeyName("patients")).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_messages_quote_key_names_plainly() {
    let dir = tempfile::tempdir().unwrap();
    let mut params = Params::for_data_dir(dir.path(), true);
    params.usage.limit = 1;
    params.usage.on_limit = cipherd_server::config::LimitAction::Refuse;
    let server = TestServer::start(params).await;
    let client = server.client().await;
    create_key(&client, "patients", pb::KeyType::Aes256Gcm96).await;
    encrypt(&client, "patients", b"x").await;
    let exhausted = client
        .encrypt("patients", &b"x"[..], &EncryptOptions::default())
        .await;
    let exhausted = expect_err(exhausted, Code::ResourceExhausted, "KEY_USAGE_EXHAUSTED");
    let undeletable = reply(
        client
            .admin()
            .delete_key(pb::DeleteKeyRequest {
                name: "patients".into(),
                ..Default::default()
            })
            .await,
    );
    let undeletable = expect_err(undeletable, Code::FailedPrecondition, "FAILED_PRECONDITION");
    for message in [exhausted, undeletable] {
        assert!(
            message.contains("\"patients\"") && !message.contains("KeyName"),
            "{message:?}"
        );
    }
}

#[track_caller]
fn expect_err_named<T: Debug>(r: Result<T, Error>, what: &str, code: Code, reason: &str) -> String {
    match r {
        Err(Error::Status {
            code: got,
            reason: got_reason,
            message,
        }) if got == code && got_reason == reason => message,
        other => panic!("{what:?}: expected {code:?}/{reason}, got {other:?}"),
    }
}

/// A rejection with a client-error code and a reason, not a crash or an internal
/// error.
#[track_caller]
fn assert_clean_rejection<T: Debug>(r: Result<T, Error>, what: &str) {
    match r {
        Err(Error::Status { code, reason, .. })
            if matches!(
                code,
                Code::InvalidArgument
                    | Code::NotFound
                    | Code::FailedPrecondition
                    | Code::OutOfRange
            ) && !reason.is_empty() => {}
        other => panic!("{what}: expected a clean rejection, got {other:?}"),
    }
}

async fn assert_still_serving(client: &Client) {
    let status = client.status().await.expect("the server still answers");
    assert!(status.initialized && !status.sealed);
    let ct = encrypt(client, "k", b"still fine").await.ciphertext;
    assert_eq!(
        cipherd_e2e::decrypt(client, "k", &ct).await.unwrap(),
        &b"still fine"[..]
    );
}
