//! The service lifecycle: sealing (invariant 4) and health, init and Shamir
//! unsealing across restarts, keys surviving a restart, and concurrent rotations
//! never losing a version (invariant 2).
#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use cipherd_e2e::{
    ALL_KEY_TYPES, Client, Code, EncryptOptions, Error, Params, TestServer, binary_version,
    create_key, create_key_with, decrypt, encrypt, expect_err, get_key, pb, reply, rotate,
    without_use,
};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Sealed: every data/admin RPC is UNAVAILABLE / SEALED, health NOT_SERVING (System still SERVING, Status answers); unsealing restores service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_server_refuses_the_data_plane_and_reports_not_serving() {
    let server = TestServer::dev().await;
    let client = server.client().await;
    let mut health = health_client(&server).await;
    create_key(&client, "k", pb::KeyType::Xaes256Gcm).await;
    let ct = encrypt(&client, "k", b"before the seal").await.ciphertext;
    for service in [
        "",
        "cipherd.v1.TransitService",
        "cipherd.v1.KeyAdminService",
    ] {
        wait_for_health(&mut health, service, ServingStatus::Serving).await;
    }

    reply(client.system().seal(pb::SealRequest {}).await).unwrap();
    let status = client.status().await.unwrap();
    assert!(status.initialized && status.sealed, "{status:?}");
    assert_eq!(status.progress, 0);

    for (rpc, result) in sealed_calls(&client, &ct).await {
        let err = result.expect_err(rpc);
        assert_eq!(
            (err.code(), err.reason()),
            (Some(Code::Unavailable), Some("SEALED")),
            "{rpc}: {err}"
        );
    }

    for service in [
        "",
        "cipherd.v1.TransitService",
        "cipherd.v1.KeyAdminService",
    ] {
        wait_for_health(&mut health, service, ServingStatus::NotServing).await;
        assert_eq!(
            check(&mut health, service).await,
            ServingStatus::NotServing,
            "{service:?}"
        );
    }
    assert_eq!(
        check(&mut health, "cipherd.v1.SystemService").await,
        ServingStatus::Serving
    );

    // The dev share (kept in the data dir, by design of dev mode) unseals again.
    let share_file = server.data_dir.join(cipherd_server::DEV_SHARE_FILE);
    let share_text = std::fs::read_to_string(&share_file).unwrap();
    let share = share_text
        .lines()
        .find(|l| !l.starts_with('#') && !l.trim().is_empty())
        .unwrap();
    let unsealed = unseal(&client, share).await.unwrap();
    assert!(!unsealed.sealed);
    for service in [
        "",
        "cipherd.v1.TransitService",
        "cipherd.v1.KeyAdminService",
    ] {
        wait_for_health(&mut health, service, ServingStatus::Serving).await;
    }
    assert_eq!(
        decrypt(&client, "k", &ct).await.unwrap(),
        &b"before the seal"[..]
    );
}

/// Init 5-of-3 then unseal share by share (repeats rejected); after a restart shares of another initialization and made-up ones are refused without touching progress, another 3-subset unseals and old data decrypts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_and_unseal_with_shamir_shares_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(Params::for_data_dir(dir.path(), false)).await;
    let client = server.client().await;

    let status = client.status().await.unwrap();
    assert!(
        !status.initialized && status.sealed && !status.dev_mode,
        "{status:?}"
    );
    // Before init, data calls and unseal say what to do first: init.
    let err = expect_err(
        client
            .encrypt("k", &b"x"[..], &EncryptOptions::default())
            .await,
        Code::Unavailable,
        "NOT_INITIALIZED",
    );
    assert!(err.to_string().contains("cipherctl init"), "{err}");
    expect_err(
        unseal(&client, "anything").await,
        Code::Unavailable,
        "NOT_INITIALIZED",
    );

    let (shares, root) = init_with_root(&client, 5, 3).await;
    let client = client.with_token(&root).unwrap();
    assert_eq!(shares.len(), 5);
    let distinct: std::collections::BTreeSet<_> = shares.iter().collect();
    assert_eq!(distinct.len(), 5, "shares are distinct");
    let status = client.status().await.unwrap();
    assert!(status.initialized && status.sealed, "{status:?}");
    assert_eq!(
        (status.threshold, status.shares, status.progress),
        (3, 5, 0)
    );
    expect_err(
        init(&client, 5, 3).await,
        Code::FailedPrecondition,
        "ALREADY_INITIALIZED",
    );

    let r = unseal(&client, &shares[0]).await.unwrap();
    assert_eq!((r.sealed, r.threshold, r.progress), (true, 3, 1));
    let r = unseal(&client, &shares[1]).await.unwrap();
    assert_eq!((r.sealed, r.progress), (true, 2));
    expect_err(
        unseal(&client, &shares[1]).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    expect_err(
        unseal(&client, "not-a-share").await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    let status = client.status().await.unwrap();
    assert_eq!(
        (status.sealed, status.progress),
        (true, 2),
        "rejected shares do not count"
    );
    let r = unseal(&client, &shares[2]).await.unwrap();
    assert!(!r.sealed, "the third distinct share unseals");
    assert!(!client.status().await.unwrap().sealed);

    create_key(&client, "k", pb::KeyType::Aes256Gcm96).await;
    let ct = encrypt(&client, "k", b"kept across restarts")
        .await
        .ciphertext;
    let key_before = get_key(&client, "k").await;

    // Restart on the same data: sealed again, with no progress.
    server.stop().await;
    let server = TestServer::start(Params::for_data_dir(dir.path(), false)).await;
    let client = server.client().await.with_token(&root).unwrap();
    let status = client.status().await.unwrap();
    assert!(status.initialized && status.sealed, "{status:?}");
    assert_eq!(
        (status.threshold, status.shares, status.progress),
        (3, 5, 0)
    );
    expect_err(
        decrypt(&client, "k", &ct).await,
        Code::Unavailable,
        "SEALED",
    );
    expect_err(
        init(&client, 3, 2).await,
        Code::FailedPrecondition,
        "ALREADY_INITIALIZED",
    );

    // Shares from another initialization (another data dir) are refused as they
    // are submitted, and never reset the progress of this server's unseal.
    let other_dir = tempfile::tempdir().unwrap();
    let other = TestServer::start(Params::for_data_dir(other_dir.path(), false)).await;
    let foreign = init(&other.client().await, 5, 3).await.unwrap();
    unseal(&client, &shares[0]).await.unwrap();
    unseal(&client, &shares[1]).await.unwrap();
    // A made-up share in the right syntax is refused the same way.
    let made_up = format!("cipherd-share:v2:03{}", "5a".repeat(40));
    for bad in [&foreign[2], &foreign[3], &made_up] {
        expect_err(
            unseal(&client, bad).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        let status = client.status().await.unwrap();
        assert_eq!(
            (status.sealed, status.progress),
            (true, 2),
            "a foreign share changed the progress"
        );
    }
    // Start over for the next checks.
    let r = reply(
        client
            .system()
            .unseal(pb::UnsealRequest {
                share: String::new(),
                reset: true,
            })
            .await,
    )
    .unwrap();
    assert_eq!(r.progress, 0);

    // An explicit reset discards submitted shares.
    assert_eq!(unseal(&client, &shares[4]).await.unwrap().progress, 1);
    let r = reply(
        client
            .system()
            .unseal(pb::UnsealRequest {
                share: String::new(),
                reset: true,
            })
            .await,
    )
    .unwrap();
    assert_eq!((r.sealed, r.progress), (true, 0));

    // A different 3-subset of the right shares unseals.
    for share in [&shares[4], &shares[3]] {
        assert!(unseal(&client, share).await.unwrap().sealed);
    }
    assert!(!unseal(&client, &shares[1]).await.unwrap().sealed);
    assert_eq!(
        decrypt(&client, "k", &ct).await.unwrap(),
        &b"kept across restarts"[..]
    );
    let after = get_key(&client, "k").await;
    assert_eq!(without_use(after.clone()), without_use(key_before.clone()));
    // The use statistics were written at shutdown: the encryption before the
    // restart still counts, and the decryption after it adds to them.
    let (before, after) = (&key_before.versions[0], &after.versions[0]);
    assert_eq!(
        (after.encrypt_count, after.decrypt_count),
        (before.encrypt_count, before.decrypt_count + 1)
    );
    assert!(before.encrypt_count > 0);
}

/// Init outside shares 1..=255 / threshold 2..=shares (or 1-of-1) is INVALID_ARGUMENT and leaves the server uninitialized.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_rejects_bad_share_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(Params::for_data_dir(dir.path(), false)).await;
    let client = server.client().await;
    for (shares, threshold) in [(0, 0), (256, 3), (3, 0), (3, 5), (1, 0), (5, 1)] {
        let r = init(&client, shares, threshold).await;
        let err = r.expect_err("bad parameters");
        assert_eq!(
            (err.code(), err.reason()),
            (Some(Code::InvalidArgument), Some("INVALID_ARGUMENT")),
            "Init({shares}, {threshold}): {err}"
        );
        assert!(!client.status().await.unwrap().initialized);
    }
    // The smallest valid set-up: one share, threshold one.
    let shares = init(&client, 1, 1).await.unwrap();
    assert_eq!(shares.len(), 1);
    assert!(!unseal(&client, &shares[0]).await.unwrap().sealed);
}

/// A dev server restarted in-process on the same data dir decrypts every old ciphertext and answers GetKey/ListKeys exactly as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_keys_ciphertexts_and_metadata() {
    let server = TestServer::dev().await;
    let client = server.client().await;
    let mut saved = Vec::new();
    for (key_type, label) in ALL_KEY_TYPES {
        create_key(&client, label, key_type).await;
        let ct = encrypt(&client, label, label.as_bytes()).await.ciphertext;
        saved.push((
            label.to_owned(),
            ct,
            Bytes::new(),
            label.as_bytes().to_vec(),
        ));
    }
    create_key_with(
        &client,
        pb::CreateKeyRequest {
            name: "derived".into(),
            derived: true,
            exportable: true,
            deletion_allowed: true,
            ..Default::default()
        },
    )
    .await;
    let ct = client
        .encrypt(
            "derived",
            &b"tenant data"[..],
            &EncryptOptions {
                context: Bytes::from_static(b"tenant-a"),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .ciphertext;
    saved.push((
        "derived".into(),
        ct,
        Bytes::from_static(b"tenant-a"),
        b"tenant data".to_vec(),
    ));
    create_key(&client, "policy", pb::KeyType::Aes256Gcm96).await;
    for _ in 0..2 {
        rotate(&client, "policy").await;
    }
    let ct = encrypt(&client, "policy", b"v3 data").await.ciphertext;
    saved.push(("policy".into(), ct, Bytes::new(), b"v3 data".to_vec()));
    reply(
        client
            .admin()
            .update_key_config(pb::UpdateKeyConfigRequest {
                name: "policy".into(),
                min_decryption_version: Some(2),
                ..Default::default()
            })
            .await,
    )
    .unwrap();
    reply(
        client
            .admin()
            .trim_key(pb::TrimKeyRequest {
                name: "policy".into(),
                min_available_version: 2,
            })
            .await,
    )
    .unwrap();

    let names = list_all(&client).await;
    assert_eq!(names.len(), 6);
    let mut before = Vec::new();
    for name in &names {
        before.push(get_key(&client, name).await);
    }

    let dir = server
        .stop()
        .await
        .expect("TestServer::dev owns its data dir");
    let server = TestServer::start(Params::for_data_dir(dir.path(), true)).await;
    let client = server.client().await;
    let status = client.status().await.unwrap();
    assert!(
        status.initialized && !status.sealed && status.dev_mode,
        "{status:?}"
    );

    assert_eq!(list_all(&client).await, names);
    for (name, ct, context, plaintext) in &saved {
        let dec = client
            .decrypt(name, ct.clone(), Bytes::new(), context.clone())
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(dec.plaintext, plaintext, "{name}");
    }
    for key in &before {
        let after = get_key(&client, &key.name).await;
        assert_eq!(
            without_use(after.clone()),
            without_use(key.clone()),
            "{}",
            key.name
        );
        let counted = |k: &pb::Key| k.versions.iter().map(|v| v.encrypt_count).sum::<u64>();
        assert_eq!(
            counted(&after),
            counted(key),
            "{}: kept across the restart",
            key.name
        );
    }
    // And the keys keep working where they left off.
    assert_eq!(encrypt(&client, "policy", b"x").await.key_version, 3);
    assert_eq!(rotate(&client, "policy").await.latest_version, 4);
}

/// Eight concurrent rotations yield exactly versions 2..=9, one each, and every version decrypts its own ciphertext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rotations_never_lose_a_version() {
    const TASKS: usize = 8;
    let server = TestServer::dev().await;
    let client = server.client().await;
    create_key(&client, "hot", pb::KeyType::Xaes256Gcm).await;
    let v1 = encrypt(&client, "hot", b"version 1").await.ciphertext;

    let start = Arc::new(tokio::sync::Barrier::new(TASKS));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..TASKS {
        let client = server.client().await;
        let start = Arc::clone(&start);
        tasks.spawn(async move {
            start.wait().await;
            let version = rotate(&client, "hot").await.latest_version;
            let plaintext = format!("version {version}");
            let options = EncryptOptions {
                key_version: Some(version),
                ..Default::default()
            };
            let ct = client
                .encrypt("hot", plaintext.clone(), &options)
                .await
                .unwrap();
            assert_eq!(ct.key_version, version);
            (version, ct.ciphertext, plaintext)
        });
    }
    let mut results = tasks.join_all().await;
    results.sort_by_key(|r| r.0);
    let versions: Vec<u32> = results.iter().map(|r| r.0).collect();
    assert_eq!(
        versions,
        (2..=9).collect::<Vec<u32>>(),
        "one new version per rotation"
    );

    let key = get_key(&client, "hot").await;
    assert_eq!(key.latest_version, 9);
    let listed: Vec<u32> = key.versions.iter().map(|v| v.version).collect();
    assert_eq!(listed, (1..=9).collect::<Vec<u32>>());
    for (version, ct, plaintext) in results {
        assert_eq!(binary_version(&ct), version);
        let dec = client
            .decrypt("hot", ct, Bytes::new(), Bytes::new())
            .await
            .unwrap();
        assert_eq!(dec.plaintext, plaintext.as_bytes());
        assert_eq!(dec.key_version, version);
    }
    assert_eq!(
        decrypt(&client, "hot", &v1).await.unwrap(),
        &b"version 1"[..]
    );
}

async fn init(client: &Client, shares: u32, threshold: u32) -> Result<Vec<String>, Error> {
    reply(
        client
            .system()
            .init(pb::InitRequest { shares, threshold })
            .await,
    )
    .map(|r| r.shares)
}

/// Init, returning the shares and the root token it hands out once.
async fn init_with_root(
    client: &Client,
    shares: u32,
    threshold: u32,
) -> (Vec<String>, cipherd_client::Token) {
    let r = reply(
        client
            .system()
            .init(pb::InitRequest { shares, threshold })
            .await,
    )
    .unwrap();
    assert!(
        r.root_token.starts_with("cdt_"),
        "Init returns a root token"
    );
    (r.shares, r.root_token.into())
}

async fn unseal(client: &Client, share: &str) -> Result<pb::UnsealResponse, Error> {
    reply(
        client
            .system()
            .unseal(pb::UnsealRequest {
                share: share.to_owned(),
                reset: false,
            })
            .await,
    )
}

async fn list_all(client: &Client) -> Vec<String> {
    let mut names = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = reply(
            client
                .admin()
                .list_keys(pb::ListKeysRequest {
                    page_size: 2,
                    page_token,
                })
                .await,
        )
        .unwrap();
        names.extend(page.names);
        if page.next_page_token.is_empty() {
            return names;
        }
        page_token = page.next_page_token;
    }
}

/// Every data-plane and key-admin RPC once, named, with its outcome.
async fn sealed_calls(client: &Client, ct: &Bytes) -> Vec<(&'static str, Result<(), Error>)> {
    let mut t = client.transit();
    let mut a = client.admin();
    let k = || "k".to_owned();
    vec![
        (
            "Encrypt",
            reply(
                t.encrypt(pb::EncryptRequest {
                    key: k(),
                    plaintext: Bytes::from_static(b"x"),
                    ..Default::default()
                })
                .await,
            )
            .map(drop),
        ),
        (
            "Encrypt with an invalid name",
            reply(
                t.encrypt(pb::EncryptRequest {
                    key: "../bad name".into(),
                    ..Default::default()
                })
                .await,
            )
            .map(drop),
        ),
        (
            "Decrypt",
            reply(
                t.decrypt(pb::DecryptRequest {
                    key: k(),
                    ciphertext: ct.clone(),
                    ..Default::default()
                })
                .await,
            )
            .map(drop),
        ),
        (
            "Rewrap",
            reply(
                t.rewrap(pb::RewrapRequest {
                    key: k(),
                    ciphertext: ct.clone(),
                    ..Default::default()
                })
                .await,
            )
            .map(drop),
        ),
        (
            "BatchEncrypt",
            reply(
                t.batch_encrypt(pb::BatchEncryptRequest {
                    key: k(),
                    items: vec![pb::EncryptItem::default()],
                    ..Default::default()
                })
                .await,
            )
            .map(drop),
        ),
        (
            "BatchDecrypt",
            reply(
                t.batch_decrypt(pb::BatchDecryptRequest {
                    key: k(),
                    items: vec![pb::DecryptItem {
                        ciphertext: ct.clone(),
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .await,
            )
            .map(drop),
        ),
        (
            "BatchRewrap",
            reply(
                t.batch_rewrap(pb::BatchRewrapRequest {
                    key: k(),
                    items: vec![pb::RewrapItem {
                        ciphertext: ct.clone(),
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .await,
            )
            .map(drop),
        ),
        (
            "GenerateDataKey",
            reply(
                t.generate_data_key(pb::GenerateDataKeyRequest {
                    key: k(),
                    ..Default::default()
                })
                .await,
            )
            .map(drop),
        ),
        (
            "CreateKey",
            reply(
                a.create_key(pb::CreateKeyRequest {
                    name: "new".into(),
                    ..Default::default()
                })
                .await,
            )
            .map(drop),
        ),
        (
            "GetKey",
            reply(a.get_key(pb::GetKeyRequest { name: k() }).await).map(drop),
        ),
        (
            "ListKeys",
            reply(a.list_keys(pb::ListKeysRequest::default()).await).map(drop),
        ),
        (
            "RotateKey",
            reply(a.rotate_key(pb::RotateKeyRequest { name: k() }).await).map(drop),
        ),
        (
            "UpdateKeyConfig",
            reply(
                a.update_key_config(pb::UpdateKeyConfigRequest {
                    name: k(),
                    deletion_allowed: Some(true),
                    ..Default::default()
                })
                .await,
            )
            .map(drop),
        ),
        (
            "TrimKey",
            reply(
                a.trim_key(pb::TrimKeyRequest {
                    name: k(),
                    min_available_version: 1,
                })
                .await,
            )
            .map(drop),
        ),
        (
            "DeleteKey",
            reply(
                a.delete_key(pb::DeleteKeyRequest {
                    name: k(),
                    ..Default::default()
                })
                .await,
            )
            .map(drop),
        ),
        (
            "ExportKey",
            reply(
                a.export_key(pb::ExportKeyRequest {
                    name: k(),
                    version: None,
                })
                .await,
            )
            .map(drop),
        ),
    ]
}

async fn health_client(server: &TestServer) -> HealthClient<Channel> {
    let channel = Channel::from_shared(server.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
}

async fn check(health: &mut HealthClient<Channel>, service: &str) -> ServingStatus {
    let reply = health
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap_or_else(|e| panic!("health check of {service:?}: {e}"));
    ServingStatus::try_from(reply.into_inner().status).unwrap()
}

/// Follows `grpc.health.v1.Health/Watch` until `service` reports `want`. Health
/// follows the seal state asynchronously, so this waits for the update instead of
/// sleeping; the long timeout only turns a hang into a clear failure.
async fn wait_for_health(health: &mut HealthClient<Channel>, service: &str, want: ServingStatus) {
    let mut stream = health
        .watch(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap_or_else(|e| panic!("health watch of {service:?}: {e}"))
        .into_inner();
    let follow = async {
        while let Some(update) = stream.message().await.unwrap() {
            let status = ServingStatus::try_from(update.status).unwrap();
            if status == want {
                return;
            }
        }
        panic!("health stream of {service:?} ended");
    };
    if tokio::time::timeout(Duration::from_secs(30), follow)
        .await
        .is_err()
    {
        panic!("health of {service:?} never became {want:?}");
    }
}

/// Auto-unseal through another cipherd's transit key (`seal.transit_*`): a
/// threshold of this server's shares, encrypted under a key of the other cipherd
/// with the auto-unseal associated data, unseals it at start. A ciphertext made
/// without that associated data, or a transit cipherd that cannot be reached,
/// leaves it sealed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_unseal_through_another_cipherds_transit_key() {
    use std::os::unix::fs::PermissionsExt as _;

    let kms = TestServer::dev().await;
    let kms_client = kms.client().await;
    create_key(&kms_client, "unseal-kek", pb::KeyType::Xaes256Gcm).await;

    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(Params::for_data_dir(dir.path(), false)).await;
    let (shares, root) = init_with_root(&server.client().await, 3, 2).await;
    let client = server.client().await.with_token(&root).unwrap();
    for share in &shares[..2] {
        unseal(&client, share).await.unwrap();
    }
    create_key(&client, "k", pb::KeyType::Xaes256Gcm).await;
    let ct = encrypt(&client, "k", b"unattended restart")
        .await
        .ciphertext;
    server.stop().await;

    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("kms-token");
    std::fs::write(&token_file, kms.root_token().expect("dev root token")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let seal_share = |share: &str, aad: &'static str| {
        let kms_client = kms_client.clone();
        let share = share.to_owned();
        async move {
            let options = EncryptOptions {
                associated_data: aad.into(),
                text: true,
                ..Default::default()
            };
            let ct = kms_client
                .encrypt("unseal-kek", share.into_bytes(), &options)
                .await
                .unwrap()
                .ciphertext;
            String::from_utf8(ct.to_vec()).unwrap()
        }
    };
    let transit = |shares_file: std::path::PathBuf, address: String| {
        let mut params = Params::for_data_dir(dir.path(), false);
        params.auto_unseal = Some(cipherd_server::config::AutoUnseal::Transit(
            cipherd_server::config::TransitUnseal {
                address,
                key: "unseal-kek".into(),
                token_file: token_file.clone(),
                ca_file: None,
                shares_file,
            },
        ));
        params
    };

    // The shares file: two shares (the threshold) as text ciphertexts, a comment.
    let shares_file = secrets.path().join("unseal-shares.transit");
    let body = format!(
        "# cipherd-share ciphertexts under unseal-kek\n{}\n{}\n",
        seal_share(&shares[0], "cipherd-auto-unseal").await,
        seal_share(&shares[2], "cipherd-auto-unseal").await
    );
    assert!(
        !body.contains("cipherd-share:v"),
        "the file holds no plaintext share"
    );
    std::fs::write(&shares_file, body).unwrap();
    let server = TestServer::start(transit(shares_file.clone(), kms.endpoint())).await;
    let client = server.client().await.with_token(&root).unwrap();
    assert!(!client.status().await.unwrap().sealed, "unsealed at start");
    assert_eq!(
        decrypt(&client, "k", &ct).await.unwrap(),
        &b"unattended restart"[..]
    );
    server.stop().await;

    // A ciphertext of the same key made without the auto-unseal associated data
    // does not decrypt as a share: sealed.
    let wrong = secrets.path().join("wrong-aad.transit");
    let body = format!(
        "{}\n{}\n",
        seal_share(&shares[0], "").await,
        seal_share(&shares[1], "").await
    );
    std::fs::write(&wrong, body).unwrap();
    let server = TestServer::start(transit(wrong, kms.endpoint())).await;
    assert!(server.client().await.status().await.unwrap().sealed);
    server.stop().await;

    // The transit cipherd is gone (nothing listens on its port): sealed, and
    // retried in the background (the log says so).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let server = TestServer::start(transit(shares_file, address)).await;
    assert!(server.client().await.status().await.unwrap().sealed);
    server.stop().await;
}
