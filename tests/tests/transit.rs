//! The data plane end to end: round trips for every key type and encoding, derived
//! keys, rotation and rewrap, version policy and trimming, export, data keys, and an
//! independent implementation opening the service's ciphertexts.
#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

use aes_gcm::aead::{Aead, KeyInit, Payload};
use base64::Engine as _;
use bytes::Bytes;
use cipherd_e2e::{
    ALL_KEY_TYPES, Client, Code, EncryptOptions, Error, HEADER_LEN, Params, TAG_LEN, TestServer,
    binary_version, create_key, create_key_with, decrypt, encrypt, expect_err, expect_err_ref,
    get_key, nonce_len, pb, reply, rotate, text_version,
};

const PLAINTEXT: &[u8] = b"Jane Q. Patient, SSN 078-05-1120, dx E11.9";

/// Every key type round-trips binary and text ciphertexts with and without AAD; the format, fresh nonces and AAD binding are as documented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_type_round_trips_in_both_encodings_with_and_without_aad() {
    let server = TestServer::dev().await;
    let client = server.client().await;
    for (key_type, label) in ALL_KEY_TYPES {
        let created = create_key(&client, label, key_type).await;
        assert_eq!(created.r#type, key_type as i32, "{label}");
        assert_eq!(created.latest_version, 1, "{label}");
        for text in [false, true] {
            for aad in [&b""[..], b"patients.row=42"] {
                let what = format!(
                    "{label}, text={text}, aad={:?}",
                    String::from_utf8_lossy(aad)
                );
                let options = EncryptOptions {
                    associated_data: Bytes::copy_from_slice(aad),
                    text,
                    ..Default::default()
                };
                let enc = client.encrypt(label, PLAINTEXT, &options).await.unwrap();
                assert_eq!(enc.key_version, 1, "{what}");
                let binary = if text {
                    assert_eq!(text_version(&enc.ciphertext), 1, "{what}");
                    text_to_binary(&enc.ciphertext)
                } else {
                    enc.ciphertext.clone()
                };
                assert_eq!(binary_version(&binary), 1, "{what}");
                assert_eq!(
                    binary.len(),
                    HEADER_LEN + nonce_len(key_type) + PLAINTEXT.len() + TAG_LEN,
                    "{what}: 0x01 || version || nonce || ciphertext || tag"
                );
                assert!(!contains(&binary, PLAINTEXT), "{what}: plaintext visible");

                // The returned form and its binary twin both decrypt.
                for form in [enc.ciphertext.clone(), binary.clone()] {
                    let dec = client
                        .decrypt(label, form, Bytes::copy_from_slice(aad), Bytes::new())
                        .await
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert_eq!(dec.plaintext, PLAINTEXT, "{what}");
                    assert_eq!(dec.key_version, 1, "{what}");
                }

                // The associated data is bound to the ciphertext.
                let wrong_aad: &'static [u8] = if aad.is_empty() { b"x" } else { b"" };
                expect_err(
                    client
                        .decrypt(label, enc.ciphertext.clone(), wrong_aad, Bytes::new())
                        .await,
                    Code::InvalidArgument,
                    "DECRYPTION_FAILED",
                );

                // Same input twice: a fresh nonce, a different ciphertext.
                let again = client.encrypt(label, PLAINTEXT, &options).await.unwrap();
                assert_ne!(again.ciphertext, enc.ciphertext, "{what}: nonce reused");
            }
        }

        // The empty plaintext is a value like any other.
        let empty = encrypt(&client, label, b"").await;
        assert_eq!(
            empty.ciphertext.len(),
            HEADER_LEN + nonce_len(key_type) + TAG_LEN
        );
        assert_eq!(
            decrypt(&client, label, &empty.ciphertext).await.unwrap(),
            Bytes::new()
        );
    }
}

/// Each key type is the algorithm it claims: with exported material RustCrypto opens the service's ciphertexts and the service opens RustCrypto's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_key_type_interoperates_with_an_independent_implementation() {
    let server = TestServer::dev().await;
    let client = server.client().await;
    let aad = b"claims.id=7";
    for (key_type, label) in ALL_KEY_TYPES {
        create_key_with(
            &client,
            pb::CreateKeyRequest {
                name: label.to_owned(),
                r#type: key_type as i32,
                exportable: true,
                ..Default::default()
            },
        )
        .await;
        let v1 = encrypt_with(&client, label, b"first version", aad, false).await;
        rotate(&client, label).await;
        let v2 = encrypt_with(&client, label, b"second version", aad, true).await;
        assert_eq!((v1.key_version, v2.key_version), (1, 2), "{label}");

        let export = reply(
            client
                .admin()
                .export_key(pb::ExportKeyRequest {
                    name: label.to_owned(),
                    version: None,
                })
                .await,
        )
        .unwrap();
        assert_eq!(export.r#type, key_type as i32, "{label}");
        let versions: Vec<u32> = export.versions.iter().map(|v| v.version).collect();
        assert_eq!(versions, [1, 2], "{label}");
        let (m1, m2) = (&export.versions[0].material, &export.versions[1].material);
        assert_eq!((m1.len(), m2.len()), (32, 32), "{label}");
        assert_ne!(m1, m2, "{label}: rotation must make fresh material");

        let v2_binary = text_to_binary(&v2.ciphertext);
        assert_eq!(
            independent_open(key_type, m1, &v1.ciphertext, aad).as_deref(),
            Some(&b"first version"[..]),
            "{label}: v1 under v1 material"
        );
        assert_eq!(
            independent_open(key_type, m2, &v2_binary, aad).as_deref(),
            Some(&b"second version"[..]),
            "{label}: v2 under v2 material"
        );
        assert_eq!(
            independent_open(key_type, m2, &v1.ciphertext, aad),
            None,
            "{label}"
        );
        assert_eq!(
            independent_open(key_type, m1, &v1.ciphertext, b"other aad"),
            None,
            "{label}"
        );

        // And the other way round: made elsewhere, opened by the service.
        let made_elsewhere = independent_seal(key_type, m2, 2, b"from outside", aad);
        let dec = client
            .decrypt(label, made_elsewhere, &aad[..], Bytes::new())
            .await
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(
            (dec.plaintext.as_ref(), dec.key_version),
            (&b"from outside"[..], 2)
        );
    }
}

/// Derived keys: the right context decrypts, a wrong one is DECRYPTION_FAILED, a missing one (or one on a plain key) INVALID_ARGUMENT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn derived_keys_require_and_bind_the_context() {
    let server = TestServer::dev().await;
    let client = server.client().await;
    for (key_type, label) in ALL_KEY_TYPES {
        let name = format!("derived-{label}");
        let key = create_key_with(
            &client,
            pb::CreateKeyRequest {
                name: name.clone(),
                r#type: key_type as i32,
                derived: true,
                ..Default::default()
            },
        )
        .await;
        assert!(key.derived, "{label}");
        for text in [false, true] {
            let options = EncryptOptions {
                associated_data: Bytes::from_static(b"aad"),
                context: Bytes::from_static(b"tenant-a"),
                text,
                ..Default::default()
            };
            let enc = client.encrypt(&name, PLAINTEXT, &options).await.unwrap();
            let ok = client
                .decrypt(&name, enc.ciphertext.clone(), &b"aad"[..], &b"tenant-a"[..])
                .await
                .unwrap();
            assert_eq!(ok.plaintext, PLAINTEXT, "{label}");
            expect_err(
                client
                    .decrypt(&name, enc.ciphertext.clone(), &b"aad"[..], &b"tenant-b"[..])
                    .await,
                Code::InvalidArgument,
                "DECRYPTION_FAILED",
            );
            expect_err(
                client
                    .decrypt(&name, enc.ciphertext.clone(), &b"aad"[..], Bytes::new())
                    .await,
                Code::InvalidArgument,
                "INVALID_ARGUMENT",
            );
        }
        expect_err(
            client
                .encrypt(&name, PLAINTEXT, &EncryptOptions::default())
                .await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
    }

    create_key(&client, "plain", pb::KeyType::Xaes256Gcm).await;
    let with_context = EncryptOptions {
        context: Bytes::from_static(b"tenant-a"),
        ..Default::default()
    };
    expect_err(
        client.encrypt("plain", PLAINTEXT, &with_context).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    let ct = encrypt(&client, "plain", PLAINTEXT).await.ciphertext;
    expect_err(
        client
            .decrypt("plain", ct, Bytes::new(), &b"tenant-a"[..])
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
}

/// After a rotation v1 ciphertexts still decrypt and rewrap (single and batch) moves them to v2 in reply, header and text form, same plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_old_ciphertexts_and_rewrap_moves_them_to_the_latest_version() {
    let server = TestServer::dev().await;
    let client = server.client().await;
    let key = create_key(&client, "orders", pb::KeyType::Unspecified).await;
    assert_eq!(
        key.r#type,
        pb::KeyType::Xaes256Gcm as i32,
        "the default type"
    );
    let aad = Bytes::from_static(b"orders.id=9");
    let v1_binary = encrypt_with(&client, "orders", PLAINTEXT, &aad, false).await;
    let v1_text = encrypt_with(&client, "orders", PLAINTEXT, &aad, true).await;

    let rotated = rotate(&client, "orders").await;
    assert_eq!(rotated.latest_version, 2);
    let versions: Vec<u32> = rotated.versions.iter().map(|v| v.version).collect();
    assert_eq!(versions, [1, 2]);

    for old in [&v1_binary.ciphertext, &v1_text.ciphertext] {
        let dec = client
            .decrypt("orders", old.clone(), aad.clone(), Bytes::new())
            .await
            .unwrap();
        assert_eq!((dec.plaintext.as_ref(), dec.key_version), (PLAINTEXT, 1));
    }
    let fresh = encrypt_with(&client, "orders", PLAINTEXT, &aad, false).await;
    assert_eq!(fresh.key_version, 2);
    assert_eq!(binary_version(&fresh.ciphertext), 2);

    // An explicitly requested older version is still allowed to encrypt.
    let pinned = client
        .encrypt(
            "orders",
            PLAINTEXT,
            &EncryptOptions {
                key_version: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (pinned.key_version, binary_version(&pinned.ciphertext)),
        (1, 1)
    );

    for (input, text) in [
        (&v1_binary.ciphertext, false),
        (&v1_binary.ciphertext, true),
        (&v1_text.ciphertext, false),
        (&v1_text.ciphertext, true),
    ] {
        let rewrapped = rewrap(&client, "orders", input, &aad, "", text).await;
        assert_eq!(rewrapped.key_version, 2);
        let version = if text {
            text_version(&rewrapped.ciphertext)
        } else {
            binary_version(&rewrapped.ciphertext)
        };
        assert_eq!(version, 2, "the ciphertext itself names v2");
        let dec = client
            .decrypt(
                "orders",
                rewrapped.ciphertext.clone(),
                aad.clone(),
                Bytes::new(),
            )
            .await
            .unwrap();
        assert_eq!((dec.plaintext.as_ref(), dec.key_version), (PLAINTEXT, 2));
        expect_err(
            client
                .decrypt("orders", rewrapped.ciphertext, Bytes::new(), Bytes::new())
                .await,
            Code::InvalidArgument,
            "DECRYPTION_FAILED",
        );
    }

    // Rewrapping a ciphertext already at the latest version re-encrypts it.
    let again = rewrap(&client, "orders", &fresh.ciphertext, &aad, "", false).await;
    assert_eq!(again.key_version, 2);
    assert_ne!(again.ciphertext, fresh.ciphertext);

    // Batch rewrap does the same per item.
    let items = [
        &v1_binary.ciphertext,
        &v1_text.ciphertext,
        &fresh.ciphertext,
    ]
    .into_iter()
    .enumerate()
    .map(|(i, ct)| pb::RewrapItem {
        ciphertext: ct.clone(),
        associated_data: aad.clone(),
        reference: format!("r{i}"),
        ..Default::default()
    })
    .collect();
    let batch = client
        .batch_rewrap("orders", None, items, false)
        .await
        .unwrap();
    assert_eq!(batch.len(), 3);
    for ct in batch {
        let ct = ct.unwrap();
        assert_eq!(binary_version(&ct), 2);
        let dec = client
            .decrypt("orders", ct, aad.clone(), Bytes::new())
            .await
            .unwrap();
        assert_eq!(dec.plaintext, PLAINTEXT);
    }
}

/// Rewrap to another key (plain or derived with its own context) re-encrypts under its latest version and type; the source no longer opens it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_moves_ciphertexts_to_another_key() {
    let server = TestServer::dev().await;
    let client = server.client().await;
    create_key(&client, "src", pb::KeyType::Xaes256Gcm).await;
    create_key(&client, "dst", pb::KeyType::Aes256Gcm96).await;
    rotate(&client, "dst").await;
    rotate(&client, "dst").await;
    let aad = Bytes::from_static(b"row=1");
    let ct = encrypt_with(&client, "src", PLAINTEXT, &aad, false)
        .await
        .ciphertext;

    let moved = rewrap(&client, "src", &ct, &aad, "dst", false).await;
    assert_eq!(moved.key_version, 3, "the destination's latest version");
    assert_eq!(binary_version(&moved.ciphertext), 3);
    assert_eq!(
        moved.ciphertext.len(),
        HEADER_LEN + nonce_len(pb::KeyType::Aes256Gcm96) + PLAINTEXT.len() + TAG_LEN,
        "sealed with the destination's key type"
    );
    let dec = client
        .decrypt("dst", moved.ciphertext.clone(), aad.clone(), Bytes::new())
        .await
        .unwrap();
    assert_eq!((dec.plaintext.as_ref(), dec.key_version), (PLAINTEXT, 3));
    expect_err(
        client
            .decrypt("src", moved.ciphertext, aad.clone(), Bytes::new())
            .await,
        Code::InvalidArgument,
        "DECRYPTION_FAILED",
    );

    create_key_with(
        &client,
        pb::CreateKeyRequest {
            name: "dst-derived".into(),
            derived: true,
            ..Default::default()
        },
    )
    .await;
    let request = pb::RewrapRequest {
        key: "src".into(),
        ciphertext: ct.clone(),
        associated_data: aad.clone(),
        destination_key: "dst-derived".into(),
        destination_context: Bytes::from_static(b"tenant-a"),
        encoding: pb::CiphertextEncoding::Text as i32,
        ..Default::default()
    };
    let moved = reply(client.transit().rewrap(request).await).unwrap();
    assert_eq!(text_version(&moved.ciphertext), 1);
    let dec = client
        .decrypt(
            "dst-derived",
            moved.ciphertext.clone(),
            aad.clone(),
            &b"tenant-a"[..],
        )
        .await
        .unwrap();
    assert_eq!(dec.plaintext, PLAINTEXT);
    expect_err(
        client
            .decrypt(
                "dst-derived",
                moved.ciphertext,
                aad.clone(),
                &b"tenant-b"[..],
            )
            .await,
        Code::InvalidArgument,
        "DECRYPTION_FAILED",
    );

    let request = pb::RewrapRequest {
        key: "src".into(),
        ciphertext: ct,
        associated_data: aad,
        destination_key: "no-such-key".into(),
        ..Default::default()
    };
    expect_err(
        reply(client.transit().rewrap(request).await),
        Code::NotFound,
        "KEY_NOT_FOUND",
    );
}

/// min_decryption_version=2 makes v1 FAILED_PRECONDITION everywhere; trim shows min_available_version and trimmed versions never return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_decryption_version_is_enforced_and_trim_destroys_old_versions() {
    let server = TestServer::dev().await;
    let client = server.client().await;
    create_key(&client, "records", pb::KeyType::Aes256Gcm96).await;
    let v1 = encrypt(&client, "records", b"old").await.ciphertext;
    rotate(&client, "records").await;
    let v2 = encrypt(&client, "records", b"new").await.ciphertext;
    assert_eq!((binary_version(&v1), binary_version(&v2)), (1, 2));

    let updated = update_config(
        &client,
        pb::UpdateKeyConfigRequest {
            name: "records".into(),
            min_decryption_version: Some(2),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(updated.min_decryption_version, 2);
    assert_eq!(get_key(&client, "records").await.min_decryption_version, 2);

    expect_err(
        decrypt(&client, "records", &v1).await,
        Code::FailedPrecondition,
        "FAILED_PRECONDITION",
    );
    assert_eq!(decrypt(&client, "records", &v2).await.unwrap(), &b"new"[..]);
    expect_err(
        reply(
            client
                .transit()
                .rewrap(pb::RewrapRequest {
                    key: "records".into(),
                    ciphertext: v1.clone(),
                    ..Default::default()
                })
                .await,
        ),
        Code::FailedPrecondition,
        "FAILED_PRECONDITION",
    );
    expect_err(
        client
            .encrypt(
                "records",
                &b"x"[..],
                &EncryptOptions {
                    key_version: Some(1),
                    ..Default::default()
                },
            )
            .await,
        Code::FailedPrecondition,
        "FAILED_PRECONDITION",
    );
    let items = [&v1, &v2]
        .into_iter()
        .map(|ct| pb::DecryptItem {
            ciphertext: ct.clone(),
            ..Default::default()
        })
        .collect();
    let batch = client.batch_decrypt("records", items).await.unwrap();
    expect_err_ref(&batch[0], Code::FailedPrecondition, "FAILED_PRECONDITION");
    assert_eq!(batch[1].as_ref().unwrap(), &b"new"[..]);

    // Policy beyond what exists is refused.
    let too_high = update_config(
        &client,
        pb::UpdateKeyConfigRequest {
            name: "records".into(),
            min_decryption_version: Some(3),
            ..Default::default()
        },
    )
    .await;
    expect_err(too_high, Code::FailedPrecondition, "FAILED_PRECONDITION");

    // Trim cannot go above min_decryption_version.
    expect_err(
        trim(&client, "records", 3).await,
        Code::FailedPrecondition,
        "FAILED_PRECONDITION",
    );
    let trimmed = trim(&client, "records", 2).await.unwrap();
    assert_eq!(trimmed.min_available_version, 2);
    let key = get_key(&client, "records").await;
    assert_eq!(key.min_available_version, 2);
    assert_eq!(key.latest_version, 2);
    let versions: Vec<u32> = key.versions.iter().map(|v| v.version).collect();
    assert_eq!(versions, [2], "version 1 is gone");

    // Gone for good: neither policy nor trim can bring version 1 back.
    let lower = update_config(
        &client,
        pb::UpdateKeyConfigRequest {
            name: "records".into(),
            min_decryption_version: Some(1),
            ..Default::default()
        },
    )
    .await;
    expect_err(lower, Code::FailedPrecondition, "FAILED_PRECONDITION");
    expect_err(
        trim(&client, "records", 1).await,
        Code::FailedPrecondition,
        "FAILED_PRECONDITION",
    );
    assert!(decrypt(&client, "records", &v1).await.is_err());
    assert_eq!(decrypt(&client, "records", &v2).await.unwrap(), &b"new"[..]);

    // The key keeps working: rotation continues numbering after the trim.
    assert_eq!(rotate(&client, "records").await.latest_version, 3);
    assert_eq!(encrypt(&client, "records", b"x").await.key_version, 3);
}

/// ExportKey returns material only for keys created exportable (per version or all); exportable is fixed at creation, never turned on or off later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_is_only_for_exportable_keys() {
    let server = TestServer::dev().await;
    let client = server.client().await;
    create_key(&client, "sealed-in", pb::KeyType::Xaes256Gcm).await;
    expect_err(
        export(&client, "sealed-in", None).await,
        Code::FailedPrecondition,
        "FAILED_PRECONDITION",
    );
    expect_err(
        export(&client, "no-such-key", None).await,
        Code::NotFound,
        "KEY_NOT_FOUND",
    );

    let key = create_key_with(
        &client,
        pb::CreateKeyRequest {
            name: "portable".into(),
            exportable: true,
            ..Default::default()
        },
    )
    .await;
    assert!(key.exportable);
    rotate(&client, "portable").await;
    let all = export(&client, "portable", None).await.unwrap();
    assert_eq!(all.name, "portable");
    let versions: Vec<u32> = all.versions.iter().map(|v| v.version).collect();
    assert_eq!(versions, [1, 2]);
    let one = export(&client, "portable", Some(2)).await.unwrap();
    assert_eq!(one.versions.len(), 1);
    assert_eq!(one.versions[0], all.versions[1]);
    expect_err(
        export(&client, "portable", Some(9)).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    let off = update_config(
        &client,
        pb::UpdateKeyConfigRequest {
            name: "portable".into(),
            exportable: Some(false),
            ..Default::default()
        },
    )
    .await;
    expect_err(off, Code::FailedPrecondition, "FAILED_PRECONDITION");

    // Exportability is fixed at creation: turning it on later is refused (before
    // the fix any client could, and then export the material), and export still
    // refuses.
    let on = update_config(
        &client,
        pb::UpdateKeyConfigRequest {
            name: "sealed-in".into(),
            exportable: Some(true),
            deletion_allowed: Some(true),
            ..Default::default()
        },
    )
    .await;
    expect_err(on, Code::FailedPrecondition, "FAILED_PRECONDITION");
    let key = get_key(&client, "sealed-in").await;
    assert!(!key.exportable && !key.deletion_allowed, "{key:?}");
    expect_err(
        export(&client, "sealed-in", None).await,
        Code::FailedPrecondition,
        "FAILED_PRECONDITION",
    );
    // Restating the creation value is accepted.
    let same = update_config(
        &client,
        pb::UpdateKeyConfigRequest {
            name: "sealed-in".into(),
            exportable: Some(false),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(!same.exportable);
}

/// DeleteKey needs deletion_allowed and only schedules: the key refuses every use
/// until the deletion is cancelled (then everything works again) or its time comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_needs_permission_schedules_and_can_be_cancelled() {
    let server = TestServer::dev().await;
    let client = server.client().await;
    create_key(&client, "temp", pb::KeyType::Xaes256Gcm).await;
    let old = encrypt(&client, "temp", b"old data").await.ciphertext;
    let delete = || async {
        reply(
            client
                .admin()
                .delete_key(pb::DeleteKeyRequest {
                    name: "temp".into(),
                    ..Default::default()
                })
                .await,
        )
    };
    expect_err(
        delete().await,
        Code::FailedPrecondition,
        "FAILED_PRECONDITION",
    );
    assert_eq!(
        decrypt(&client, "temp", &old).await.unwrap(),
        &b"old data"[..]
    );
    let allowed = update_config(
        &client,
        pb::UpdateKeyConfigRequest {
            name: "temp".into(),
            deletion_allowed: Some(true),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(allowed.deletion_allowed);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let scheduled = delete().await.unwrap();
    let at = scheduled.deletion_time.expect("deletion time").seconds;
    // The default waiting period: 7 days.
    assert!((at - before - 7 * 86_400).abs() <= 5, "{at} vs {before}");
    assert_eq!(
        scheduled.key.expect("key").deletion_time.map(|t| t.seconds),
        Some(at)
    );
    expect_err(
        delete().await,
        Code::FailedPrecondition,
        "FAILED_PRECONDITION",
    );

    // Pending deletion: no encryption, decryption, rewrap, rotation, config
    // change or export; GetKey still answers.
    let pending = |r: Result<(), Error>, what: &str| {
        expect_err_ref(&r, Code::FailedPrecondition, "KEY_PENDING_DELETION");
        let _ = what;
    };
    pending(
        client
            .encrypt("temp", &b"x"[..], &EncryptOptions::default())
            .await
            .map(drop),
        "encrypt",
    );
    pending(decrypt(&client, "temp", &old).await.map(drop), "decrypt");
    pending(
        reply(
            client
                .admin()
                .rotate_key(pb::RotateKeyRequest {
                    name: "temp".into(),
                })
                .await,
        )
        .map(drop),
        "rotate",
    );
    pending(
        update_config(
            &client,
            pb::UpdateKeyConfigRequest {
                name: "temp".into(),
                min_decryption_version: Some(1),
                ..Default::default()
            },
        )
        .await
        .map(drop),
        "config",
    );
    let got = reply(
        client
            .admin()
            .get_key(pb::GetKeyRequest {
                name: "temp".into(),
            })
            .await,
    )
    .unwrap()
    .key
    .unwrap();
    assert_eq!(got.deletion_time.map(|t| t.seconds), Some(at));

    let back = reply(
        client
            .admin()
            .cancel_key_deletion(pb::CancelKeyDeletionRequest {
                name: "temp".into(),
            })
            .await,
    )
    .unwrap()
    .key
    .unwrap();
    assert_eq!(back.deletion_time, None);
    assert_eq!(
        decrypt(&client, "temp", &old).await.unwrap(),
        &b"old data"[..]
    );
    expect_err(
        reply(
            client
                .admin()
                .cancel_key_deletion(pb::CancelKeyDeletionRequest {
                    name: "temp".into(),
                })
                .await,
        ),
        Code::FailedPrecondition,
        "FAILED_PRECONDITION",
    );
}

/// When a deletion's time comes the material is destroyed (here: a waiting
/// period of zero, destroyed in the call; and a short one, destroyed by the
/// housekeeping sweep), and a key re-created under the name is new: it cannot
/// open the old key's ciphertexts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroyed_key_is_gone_and_a_recreated_key_is_new() {
    let dir = tempfile::tempdir().unwrap();
    let mut params = Params::for_data_dir(dir.path(), true);
    params.lifecycle.deletion_waiting_period = std::time::Duration::ZERO;
    params.lifecycle.housekeeping_interval = std::time::Duration::from_millis(50);
    let server = TestServer::start(params).await;
    let client = server.client().await;
    let create = |name: &'static str| {
        let client = client.clone();
        async move {
            reply(
                client
                    .admin()
                    .create_key(pb::CreateKeyRequest {
                        name: name.into(),
                        deletion_allowed: true,
                        ..Default::default()
                    })
                    .await,
            )
            .unwrap()
            .key
            .unwrap()
        }
    };
    let first = create("temp").await;
    let old = encrypt(&client, "temp", b"old data").await.ciphertext;
    let delete = |name: &'static str, wait: Option<i64>| {
        let client = client.clone();
        async move {
            reply(
                client
                    .admin()
                    .delete_key(pb::DeleteKeyRequest {
                        name: name.into(),
                        waiting_period: wait
                            .map(|seconds| prost_types::Duration { seconds, nanos: 0 }),
                    })
                    .await,
            )
        }
    };
    let gone = delete("temp", None).await.unwrap();
    assert!(gone.key.is_none(), "destroyed in the call");
    expect_err(
        decrypt(&client, "temp", &old).await,
        Code::NotFound,
        "KEY_NOT_FOUND",
    );
    expect_err(delete("temp", None).await, Code::NotFound, "KEY_NOT_FOUND");

    let again = create("temp").await;
    assert_eq!(again.latest_version, 1);
    assert_ne!(again.id, first.id);
    expect_err(
        decrypt(&client, "temp", &old).await,
        Code::InvalidArgument,
        "DECRYPTION_FAILED",
    );
    expect_err(
        reply(
            client
                .admin()
                .create_key(pb::CreateKeyRequest {
                    name: "temp".into(),
                    ..Default::default()
                })
                .await,
        ),
        Code::AlreadyExists,
        "KEY_EXISTS",
    );

    // One second's wait: the sweep destroys it (polled, never slept for).
    delete("temp", Some(1)).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let r = reply(
            client
                .admin()
                .get_key(pb::GetKeyRequest {
                    name: "temp".into(),
                })
                .await,
        );
        match r {
            Err(e) if e.reason() == Some("KEY_NOT_FOUND") => break,
            Ok(_) => {}
            Err(e) => panic!("{e:?}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not destroyed by the sweep"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// GenerateDataKey returns a fresh key of the asked size whose wrapped form decrypts to it, or only the wrapped form when asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_data_key_wraps_a_fresh_key() {
    let server = TestServer::dev().await;
    let client = server.client().await;
    create_key(&client, "envelope", pb::KeyType::Xaes256Gcm).await;
    let mut seen = Vec::new();
    for (bits, len) in [(0, 32), (128, 16), (256, 32), (512, 64)] {
        let dk = reply(
            client
                .transit()
                .generate_data_key(pb::GenerateDataKeyRequest {
                    key: "envelope".into(),
                    bits,
                    ..Default::default()
                })
                .await,
        )
        .unwrap();
        assert_eq!(dk.plaintext.len(), len, "bits={bits}");
        assert_eq!(dk.key_version, 1);
        assert_eq!(
            decrypt(&client, "envelope", &dk.ciphertext).await.unwrap(),
            dk.plaintext
        );
        assert!(!seen.contains(&dk.plaintext), "data keys must be fresh");
        seen.push(dk.plaintext);
    }
    let wrapped_only = reply(
        client
            .transit()
            .generate_data_key(pb::GenerateDataKeyRequest {
                key: "envelope".into(),
                wrapped_only: true,
                ..Default::default()
            })
            .await,
    )
    .unwrap();
    assert!(wrapped_only.plaintext.is_empty());
    assert_eq!(
        decrypt(&client, "envelope", &wrapped_only.ciphertext)
            .await
            .unwrap()
            .len(),
        32
    );
    expect_err(
        reply(
            client
                .transit()
                .generate_data_key(pb::GenerateDataKeyRequest {
                    key: "envelope".into(),
                    bits: 100,
                    ..Default::default()
                })
                .await,
        ),
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
}

async fn encrypt_with(
    client: &Client,
    key: &str,
    plaintext: &[u8],
    aad: &[u8],
    text: bool,
) -> pb::EncryptResponse {
    let options = EncryptOptions {
        associated_data: Bytes::copy_from_slice(aad),
        text,
        ..Default::default()
    };
    client
        .encrypt(key, Bytes::copy_from_slice(plaintext), &options)
        .await
        .unwrap_or_else(|e| panic!("Encrypt under {key:?}: {e}"))
}

async fn rewrap(
    client: &Client,
    key: &str,
    ciphertext: &Bytes,
    aad: &Bytes,
    destination: &str,
    text: bool,
) -> pb::RewrapResponse {
    let encoding = if text {
        pb::CiphertextEncoding::Text
    } else {
        pb::CiphertextEncoding::Binary
    };
    let request = pb::RewrapRequest {
        key: key.to_owned(),
        ciphertext: ciphertext.clone(),
        associated_data: aad.clone(),
        destination_key: destination.to_owned(),
        encoding: encoding as i32,
        ..Default::default()
    };
    reply(client.transit().rewrap(request).await).unwrap_or_else(|e| panic!("Rewrap: {e}"))
}

async fn update_config(
    client: &Client,
    request: pb::UpdateKeyConfigRequest,
) -> Result<pb::Key, Error> {
    reply(client.admin().update_key_config(request).await).map(|r| r.key.unwrap())
}

async fn trim(client: &Client, name: &str, floor: u32) -> Result<pb::Key, Error> {
    let request = pb::TrimKeyRequest {
        name: name.to_owned(),
        min_available_version: floor,
    };
    reply(client.admin().trim_key(request).await).map(|r| r.key.unwrap())
}

async fn export(
    client: &Client,
    name: &str,
    version: Option<u32>,
) -> Result<pb::ExportKeyResponse, Error> {
    let request = pb::ExportKeyRequest {
        name: name.to_owned(),
        version,
    };
    reply(client.admin().export_key(request).await)
}

/// Converts `cipherd:v<N>:<base64>` to `0x01 || N (u32 BE) || body`.
fn text_to_binary(text: &[u8]) -> Bytes {
    let version = text_version(text);
    let text = std::str::from_utf8(text).unwrap();
    let (_, body) = text.rsplit_once(':').unwrap();
    let mut out = vec![0x01];
    out.extend_from_slice(&version.to_be_bytes());
    out.extend(
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap(),
    );
    Bytes::from(out)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Opens a binary ciphertext with RustCrypto: the AEAD's associated data is the
/// 5-byte header followed by the caller's associated data.
fn independent_open(
    key_type: pb::KeyType,
    material: &[u8],
    ciphertext: &[u8],
    aad: &[u8],
) -> Option<Vec<u8>> {
    let (header, body) = ciphertext.split_at(HEADER_LEN);
    let (nonce, sealed) = body.split_at(nonce_len(key_type));
    let full_aad = [header, aad].concat();
    let payload = Payload {
        msg: sealed,
        aad: &full_aad,
    };
    match key_type {
        pb::KeyType::Aes256Gcm96 => aes_gcm::Aes256Gcm::new_from_slice(material)
            .ok()?
            .decrypt(nonce.try_into().ok()?, payload)
            .ok(),
        pb::KeyType::Chacha20Poly1305 => {
            chacha20poly1305::ChaCha20Poly1305::new_from_slice(material)
                .ok()?
                .decrypt(nonce.try_into().ok()?, payload)
                .ok()
        }
        pb::KeyType::Xchacha20Poly1305 => {
            chacha20poly1305::XChaCha20Poly1305::new_from_slice(material)
                .ok()?
                .decrypt(nonce.try_into().ok()?, payload)
                .ok()
        }
        pb::KeyType::Xaes256Gcm | pb::KeyType::Unspecified => {
            xaes_256_gcm::Xaes256Gcm::new_from_slice(material)
                .ok()?
                .decrypt(nonce.try_into().ok()?, payload)
                .ok()
        }
    }
}

/// Seals with RustCrypto into the binary format, with a fixed nonce (fine for a
/// one-off test message).
fn independent_seal(
    key_type: pb::KeyType,
    material: &[u8],
    version: u32,
    plaintext: &[u8],
    aad: &[u8],
) -> Bytes {
    let mut header = vec![0x01];
    header.extend_from_slice(&version.to_be_bytes());
    let nonce = vec![0x5a; nonce_len(key_type)];
    let full_aad = [&header[..], aad].concat();
    let payload = Payload {
        msg: plaintext,
        aad: &full_aad,
    };
    let sealed = match key_type {
        pb::KeyType::Aes256Gcm96 => aes_gcm::Aes256Gcm::new_from_slice(material)
            .unwrap()
            .encrypt(nonce[..].try_into().unwrap(), payload),
        pb::KeyType::Chacha20Poly1305 => {
            chacha20poly1305::ChaCha20Poly1305::new_from_slice(material)
                .unwrap()
                .encrypt(nonce[..].try_into().unwrap(), payload)
        }
        pb::KeyType::Xchacha20Poly1305 => {
            chacha20poly1305::XChaCha20Poly1305::new_from_slice(material)
                .unwrap()
                .encrypt(nonce[..].try_into().unwrap(), payload)
        }
        pb::KeyType::Xaes256Gcm | pb::KeyType::Unspecified => {
            xaes_256_gcm::Xaes256Gcm::new_from_slice(material)
                .unwrap()
                .encrypt(nonce[..].try_into().unwrap(), payload)
        }
    }
    .unwrap();
    Bytes::from([header, nonce, sealed].concat())
}
