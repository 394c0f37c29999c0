//! The real `cipherd` binary as a child process: flags and config file, start-up
//! on an ephemeral port (read from its own log line), serving, clean shutdown on
//! SIGTERM, restarting on the same data dir, and logs that never carry secrets
//! (invariant 1).
//!
//! The binary is `cipherd-e2e-daemon` (the server's `main.rs` built by this
//! package, see `tests/Cargo.toml`) unless `CIPHERD_BIN` names another build;
//! `support/daemon.rs` starts and stops it.
#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

#[path = "support/daemon.rs"]
mod daemon;

use std::{process::Stdio, time::Duration};

use base64::Engine as _;
use bytes::Bytes;
use cipherd_e2e::{
    Client, Code, EncryptOptions, create_key_with, encrypt, expect_err, get_key, pb, reply,
    without_use,
};
use tokio::process::Command;

use crate::daemon::{Daemon, binary, command};

/// Recognizable plaintext that must never show up in a log.
const MARKER: &str = "PHI-MARKER Jane Q. Patient 078-05-1120";

/// The real binary (--dev) serves, exits 0 on SIGTERM, and a second process on the same dir decrypts with identical metadata; no secret hits the logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_restarts_on_the_same_data_dir_and_keeps_keys() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");

    let first = Daemon::start(dir.path(), &data, &["--dev"]).await;
    let client = first.client().await;
    let status = client.status().await.unwrap();
    assert!(
        status.initialized && !status.sealed && status.dev_mode,
        "{status:?}"
    );
    create_key_with(
        &client,
        pb::CreateKeyRequest {
            name: "patients".into(),
            r#type: pb::KeyType::Aes256Gcm96 as i32,
            exportable: true,
            ..Default::default()
        },
    )
    .await;
    let options = |text| EncryptOptions {
        associated_data: Bytes::from_static(b"row=1"),
        text,
        ..Default::default()
    };
    let binary = client
        .encrypt("patients", MARKER, &options(false))
        .await
        .unwrap()
        .ciphertext;
    let text = client
        .encrypt("patients", MARKER, &options(true))
        .await
        .unwrap()
        .ciphertext;
    let before = get_key(&client, "patients").await;
    drop(client);
    let first_log = first.terminate().await;
    assert!(
        first_log.contains("cipherd stopped"),
        "drained and stopped:\n{first_log}"
    );

    let share_file = data.join(cipherd_server::DEV_SHARE_FILE);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&share_file).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o077,
            0,
            "the dev share is readable by others: {mode:o}"
        );
    }

    let second = Daemon::start(dir.path(), &data, &["--dev"]).await;
    let client = second.client().await;
    for ct in [&binary, &text] {
        let dec = client
            .decrypt("patients", ct.clone(), &b"row=1"[..], Bytes::new())
            .await
            .unwrap();
        assert_eq!(dec.plaintext, MARKER.as_bytes());
        assert_eq!(dec.key_version, 1);
    }
    let after = get_key(&client, "patients").await;
    assert_eq!(
        without_use(after.clone()),
        without_use(before.clone()),
        "key metadata survives"
    );
    // Use counts were written at SIGTERM: the two encryptions before it count.
    assert_eq!(
        after.versions[0].encrypt_count,
        before.versions[0].encrypt_count
    );
    assert_eq!(after.versions[0].encrypt_count, 2);
    assert_eq!(encrypt(&client, "patients", b"more").await.key_version, 1);
    let export = reply(
        client
            .admin()
            .export_key(pb::ExportKeyRequest {
                name: "patients".into(),
                version: None,
            })
            .await,
    )
    .unwrap();
    drop(client);
    let second_log = second.terminate().await;

    // Invariant 1: nothing secret in either process's log.
    let share_text = std::fs::read_to_string(&share_file).unwrap();
    let share = share_text
        .lines()
        .find(|l| !l.starts_with('#') && !l.trim().is_empty())
        .unwrap()
        .trim();
    let material = &export.versions[0].material;
    let mut secrets = vec![
        ("plaintext", MARKER.to_owned()),
        ("unseal share", share.to_owned()),
        (
            "key material (base64)",
            base64::engine::general_purpose::STANDARD.encode(material),
        ),
        ("key material (hex)", hex(material)),
        ("key material (debug bytes)", format!("{:?}", &material[..])),
    ];
    secrets.push((
        "plaintext (debug bytes)",
        format!("{:?}", MARKER.as_bytes()),
    ));
    for log in [&first_log, &second_log] {
        assert!(log.contains("cipherd listening"));
        for (what, secret) in &secrets {
            assert!(!log.contains(secret.as_str()), "{what} in the log:\n{log}");
        }
    }
}

/// A second process on a data dir in use refuses to start and names the holder's pid; the data dir is free again once the first exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_a_data_dir_refuses_to_start_and_names_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let first = Daemon::start(dir.path(), &data, &["--dev"]).await;
    let pid = first.pid();
    let second = command()
        .args(["--dev", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .stdin(Stdio::null())
        .output();
    let second = tokio::time::timeout(Duration::from_secs(60), second)
        .await
        .expect("the second process exits")
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{err}");
    assert!(
        err.contains(&format!("in use by another cipherd (pid {pid})")),
        "{err}"
    );
    // The first one still serves, alone.
    let client = first.client().await;
    assert!(!client.status().await.unwrap().sealed);
    drop(client);
    first.terminate().await;
    Daemon::start(dir.path(), &data, &["--dev"])
        .await
        .terminate()
        .await;
}

/// SIGKILL at moments spread over a dev server's first start never leaves a data dir that cannot start: the next start always unseals and serves (issue #8: killed after the seal record was committed and before the share file was written, a data dir could never start again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_the_first_dev_start_never_leaves_a_data_dir_that_cannot_start() {
    let dir = tempfile::tempdir().unwrap();
    // How long a first start takes here, to spread the kills over it.
    let probe = dir.path().join("probe");
    let started = std::time::Instant::now();
    Daemon::start(dir.path(), &probe, &["--dev"])
        .await
        .terminate()
        .await;
    let span = started.elapsed();
    const KILLS: u32 = 30;
    let mut killed_initialized = 0;
    for i in 0..KILLS {
        let data = dir.path().join(format!("data-{i}"));
        let mut child = command()
            .args(["--dev", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // Not a readiness wait: the moment of the kill is what is under test.
        tokio::time::sleep(span * i / KILLS).await;
        let _ = child.start_kill();
        let _ = child.wait().await;
        if data.join(cipherd_server::DEV_SHARE_FILE).exists() {
            killed_initialized += 1;
        }
        let daemon = Daemon::start(dir.path(), &data, &["--dev"]).await;
        let client = daemon.client().await;
        let status = client.status().await.unwrap();
        assert!(status.initialized && !status.sealed, "kill {i}: {status:?}");
        create_key_with(
            &client,
            pb::CreateKeyRequest {
                name: "k".into(),
                ..Default::default()
            },
        )
        .await;
        encrypt(&client, "k", b"after the kill").await;
        drop(client);
        daemon.terminate().await;
    }
    eprintln!("{KILLS} kills over {span:?}; {killed_initialized} left a share file behind");
}

/// `[seal] auto_unseal_file` and `auto_unseal_env` unseal a restarted server with no operator; a file every user may read is refused (the server stays sealed and says why); the shares never reach the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_unseal_from_a_file_or_the_environment() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let first = Daemon::start(dir.path(), &data, &[]).await;
    let client = first.client().await;
    let init = reply(
        client
            .system()
            .init(pb::InitRequest {
                shares: 3,
                threshold: 2,
            })
            .await,
    )
    .unwrap();
    let root = cipherd_client::Token::from(init.root_token.as_str());
    let shares = init.shares;
    drop(client);
    first.terminate().await;

    let file = dir.path().join("unseal-shares");
    std::fs::write(
        &file,
        format!("# two of three\n{}\n{}\n", shares[0], shares[2]),
    )
    .unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o400)).unwrap();
    let config = format!(
        "[seal]\nauto_unseal_file = {:?}\n",
        file.display().to_string()
    );
    let daemon = Daemon::start_with(dir.path(), &data, &[], &config, &[]).await;
    let client = daemon.client().await.with_token(&root).unwrap();
    assert!(
        !client.status().await.unwrap().sealed,
        "unsealed from the file"
    );
    create_key_with(
        &client,
        pb::CreateKeyRequest {
            name: "k".into(),
            ..Default::default()
        },
    )
    .await;
    drop(client);
    let mut logs = vec![daemon.terminate().await];

    let env = [("TEST_UNSEAL_SHARES", format!("{} {}", shares[1], shares[2]))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let daemon = Daemon::start_with(
        dir.path(),
        &data,
        &[],
        "[seal]\nauto_unseal_env = \"TEST_UNSEAL_SHARES\"\n",
        &env,
    )
    .await;
    let client = daemon.client().await.with_token(&root).unwrap();
    assert!(
        !client.status().await.unwrap().sealed,
        "unsealed from the environment"
    );
    encrypt(&client, "k", b"after an unattended restart").await;
    drop(client);
    logs.push(daemon.terminate().await);

    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let daemon = Daemon::start_with(dir.path(), &data, &[], &config, &[]).await;
    let client = daemon.client().await;
    assert!(
        client.status().await.unwrap().sealed,
        "a world-readable file is refused"
    );
    drop(client);
    let log = daemon.terminate().await;
    assert!(log.contains("is readable by every user"), "{log}");
    logs.push(log);
    for log in &logs {
        for share in &shares {
            assert!(!log.contains(share.as_str()), "an unseal share in the log");
        }
    }
}

/// The real binary without --dev needs Init and Unseal, comes back sealed after a restart until unsealed, and exits 0 on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_without_dev_mode_needs_init_and_unseal() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");

    let first = Daemon::start(dir.path(), &data, &[]).await;
    let client = first.client().await;
    let status = client.status().await.unwrap();
    assert!(
        !status.initialized && status.sealed && !status.dev_mode,
        "{status:?}"
    );
    let init = reply(
        client
            .system()
            .init(pb::InitRequest {
                shares: 3,
                threshold: 2,
            })
            .await,
    )
    .unwrap();
    let root = cipherd_client::Token::from(init.root_token.as_str());
    let client = client.with_token(&root).unwrap();
    let shares = init.shares;
    assert_eq!(shares.len(), 3);
    unseal(&client, &[&shares[0], &shares[2]]).await;
    create_key_with(
        &client,
        pb::CreateKeyRequest {
            name: "k".into(),
            ..Default::default()
        },
    )
    .await;
    let ct = encrypt(&client, "k", MARKER.as_bytes()).await.ciphertext;
    drop(client);
    let first_log = first.terminate().await;

    let second = Daemon::start(dir.path(), &data, &[]).await;
    let client = second.client().await.with_token(&root).unwrap();
    let status = client.status().await.unwrap();
    assert!(status.initialized && status.sealed, "{status:?}");
    expect_err(
        cipherd_e2e::decrypt(&client, "k", &ct).await,
        Code::Unavailable,
        "SEALED",
    );
    unseal(&client, &[&shares[1], &shares[0]]).await;
    assert_eq!(
        cipherd_e2e::decrypt(&client, "k", &ct).await.unwrap(),
        MARKER.as_bytes()
    );
    drop(client);
    let second_log = second.terminate().await;
    // Each start says what the server waits for.
    assert!(
        first_log.contains("not initialized: waiting for `cipherctl init`"),
        "{first_log}"
    );
    assert!(
        second_log.contains("sealed: waiting for 2 unseal shares"),
        "{second_log}"
    );
    for log in [first_log, second_log] {
        for share in &shares {
            assert!(!log.contains(share.as_str()), "an unseal share in the log");
            assert!(
                !log.contains(root.expose_secret()),
                "the root token in the log"
            );
        }
        assert!(!log.contains(MARKER), "plaintext in the log");
    }
}

/// A `/proc/<pid>/` file's line starting with `prefix`.
fn proc_line(pid: u32, file: &str, prefix: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in /proc/{pid}/{file}"))
        .to_owned()
}

/// The real binary disables core dumps at start (RLIMIT_CORE 0, soft and hard) and locks nothing by default; with `memory.lock = true` its memory is locked (VmLck), or, where it may not lock, it refuses to start naming RLIMIT_MEMLOCK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_disables_core_dumps_and_locks_memory_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let daemon = Daemon::start(dir.path(), &data, &["--dev"]).await;
    let pid = daemon.pid();
    let core: Vec<String> = proc_line(pid, "limits", "Max core file size")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(core[4..6], ["0", "0"], "{core:?}");
    assert_eq!(
        proc_line(pid, "status", "VmLck:").split_whitespace().nth(1),
        Some("0")
    );
    let log = daemon.terminate().await;
    assert!(log.contains("core dumps disabled"), "{log}");

    // CAP_IPC_LOCK (bit 14 of CapEff) lets the child lock past RLIMIT_MEMLOCK.
    let caps = proc_line(std::process::id(), "status", "CapEff:");
    let cap_ipc_lock =
        u64::from_str_radix(caps.split_whitespace().nth(1).unwrap(), 16).unwrap() & (1 << 14) != 0;
    if cap_ipc_lock {
        let daemon = Daemon::start_with(
            dir.path(),
            &data,
            &["--dev"],
            "[memory]\nlock = true\n",
            &[],
        )
        .await;
        let pid = daemon.pid();
        let locked = proc_line(pid, "status", "VmLck:");
        assert_ne!(locked.split_whitespace().nth(1), Some("0"), "{locked}");
        daemon.terminate().await;
    } else {
        std::fs::write(dir.path().join("lock.toml"), "[memory]\nlock = true\n").unwrap();
        // A memlock limit of 0 makes the failure certain.
        let out = Command::new("sh")
            .args(["-c", "ulimit -l 0 && exec \"$0\" \"$@\""])
            .arg(binary())
            .args(["--listen", "127.0.0.1:0", "--dev", "--config"])
            .arg(dir.path().join("lock.toml"))
            .arg("--data-dir")
            .arg(&data)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started without locking: {stderr}");
        assert!(stderr.contains("RLIMIT_MEMLOCK"), "{stderr}");
    }
}

/// Invalid configuration stops the real binary at start-up with a non-zero exit and a message naming the option.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_rejects_invalid_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cases = [
        ("listen", "not-an-address", None),
        (
            "keys.usage_limit",
            "127.0.0.1:0",
            Some(("CIPHERD_SERVER_KEYS__USAGE_LIMIT", "5000000000")),
        ),
        (
            "keys.usage_limit_action",
            "127.0.0.1:0",
            Some(("CIPHERD_SERVER_KEYS__USAGE_LIMIT_ACTION", "explode")),
        ),
    ];
    for (option, listen, env) in cases {
        let mut command = command();
        command.args(["--listen", listen, "--data-dir"]).arg(&data);
        if let Some((k, v)) = env {
            command.env(k, v);
        }
        let out = command.output().await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{option}: started anyway");
        assert!(stderr.contains(option), "{option} not named in: {stderr}");
    }
}

/// cipherctl's variables exported in the same shell (`CIPHERD_ADDR`, `CIPHERD_TOKEN`,
/// `CIPHERD_CACERT`) do not stop the server from starting, while its own
/// `CIPHERD_SERVER_*` variables are read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_ignores_the_client_variables_and_reads_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let daemon = Daemon::start_with(
        dir.path(),
        &data,
        &["--dev"],
        "",
        &[
            ("CIPHERD_ADDR", "http://127.0.0.1:8210"),
            ("CIPHERD_TOKEN", "not-a-server-option"),
            ("CIPHERD_CACERT", "/nonexistent/ca.pem"),
            ("CIPHERD_SERVER_LIMITS__MAX_BATCH_ITEMS", "2"),
        ],
    )
    .await;
    let client = daemon.client().await;
    create_key_with(
        &client,
        pb::CreateKeyRequest {
            name: "k".into(),
            ..Default::default()
        },
    )
    .await;
    let batch = |n: usize| pb::BatchEncryptRequest {
        key: "k".into(),
        items: vec![pb::EncryptItem::default(); n],
        ..Default::default()
    };
    assert!(reply(client.transit().batch_encrypt(batch(2)).await).is_ok());
    expect_err(
        reply(client.transit().batch_encrypt(batch(3)).await),
        Code::InvalidArgument,
        "TOO_LARGE",
    );
    drop(client);
    daemon.terminate().await;
}

/// `--version` and `--help` name the program `cipherd` and say what it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_names_itself_cipherd() {
    let version = command().arg("--version").output().await.unwrap();
    let version = String::from_utf8(version.stdout).unwrap();
    assert_eq!(
        version.trim(),
        format!("cipherd {}", env!("CARGO_PKG_VERSION"))
    );
    let help = command().arg("--help").output().await.unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(
        help.starts_with("cipherd: encryption as a service over gRPC"),
        "{help}"
    );
    assert!(help.contains("CIPHERD_SERVER_"), "{help}");
    assert!(!help.contains("cipherd-server"), "{help}");
}

async fn unseal(client: &Client, shares: &[&String]) {
    let mut sealed = true;
    for share in shares {
        sealed = reply(
            client
                .system()
                .unseal(pb::UnsealRequest {
                    share: (*share).clone(),
                    reset: false,
                })
                .await,
        )
        .unwrap()
        .sealed;
    }
    assert!(!sealed, "unsealed after {} shares", shares.len());
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The canary: a whole session with a recognisable plaintext, token and key name
/// (single, batch and stream calls, derived contexts, references, data keys, a
/// forged copy of the token, a revoked token, denied calls), then every log line
/// (JSON at debug level) and every audit record is searched for the plaintext
/// and for the tokens: zero hits. The key name must appear (audit says which key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_plaintext_and_tokens_never_reach_logs_or_audit() {
    const KEY: &str = "canary-key-7f3a";
    const CANARY: &str = "CANARY-PHI 4111-1111-1111-1111 Jane Canary";
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let daemon = Daemon::start(dir.path(), &data, &["--dev"]).await;
    let root = daemon.client().await;
    let root_token = std::fs::read_to_string(data.join(cipherd_server::DEV_ROOT_TOKEN_FILE))
        .unwrap()
        .trim()
        .to_owned();
    for (name, derived) in [(KEY, false), ("canary-derived", true)] {
        create_key_with(
            &root,
            pb::CreateKeyRequest {
                name: name.into(),
                derived,
                ..Default::default()
            },
        )
        .await;
    }
    root.write_policy(
        "canary",
        "[[rule]]\nkeys = [\"canary-*\"]\noperations = [\"encrypt\", \"rewrap\", \"datakey\"]\n\n\
         [[rule]]\nkeys = [\"canary-*\"]\noperations = [\"decrypt\"]\npurposes = [\"treatment\"]\n",
    )
    .await
    .unwrap();
    let created = root
        .create_token(vec!["canary".into()], None, "canary session")
        .await
        .unwrap();
    let token = created.token.expose_secret().to_owned();
    let user = root.with_token(&created.token).unwrap();

    let ct = encrypt(&user, KEY, CANARY.as_bytes()).await.ciphertext;
    let treated = user.with_purpose(cipherd_client::Purpose::new("treatment"));
    let back = treated
        .decrypt(KEY, ct.clone(), Bytes::new(), Bytes::new())
        .await
        .unwrap();
    assert_eq!(back.plaintext, CANARY.as_bytes());
    let items: Vec<pb::EncryptItem> = (0..20)
        .map(|i| pb::EncryptItem {
            plaintext: Bytes::from(format!("{CANARY} #{i}")),
            context: Bytes::from(format!("{CANARY} context {}", i % 3)),
            reference: format!("{CANARY} row {i}"),
            ..Default::default()
        })
        .collect();
    let sealed = user
        .batch_encrypt("canary-derived", items.clone(), true)
        .await
        .unwrap();
    let decrypt_items: Vec<pb::DecryptItem> = sealed
        .iter()
        .zip(&items)
        .map(|(ct, item)| pb::DecryptItem {
            ciphertext: ct.as_ref().unwrap().clone(),
            context: item.context.clone(),
            reference: item.reference.clone(),
            ..Default::default()
        })
        .collect();
    for r in treated
        .batch_decrypt("canary-derived", decrypt_items)
        .await
        .unwrap()
    {
        assert!(r.unwrap().starts_with(CANARY.as_bytes()));
    }
    user.batch_rewrap(
        KEY,
        None,
        vec![pb::RewrapItem {
            ciphertext: ct.clone(),
            reference: format!("{CANARY} rewrap"),
            ..Default::default()
        }],
        false,
    )
    .await
    .unwrap();
    let mut stream = user
        .transit()
        .encrypt_stream(tokio_stream::iter(vec![pb::EncryptStreamRequest {
            key: KEY.into(),
            items: vec![pb::EncryptItem {
                plaintext: Bytes::from_static(CANARY.as_bytes()),
                reference: format!("{CANARY} stream"),
                ..Default::default()
            }],
            ..Default::default()
        }]))
        .await
        .unwrap()
        .into_inner();
    while let Some(chunk) = tokio_stream::StreamExt::next(&mut stream).await {
        chunk.unwrap();
    }
    reply(
        user.transit()
            .generate_data_key(pb::GenerateDataKeyRequest {
                key: KEY.into(),
                ..Default::default()
            })
            .await,
    )
    .unwrap();
    // Refused calls: decrypt without a purpose, another key, a forged token.
    let _ = user
        .decrypt(KEY, ct.clone(), Bytes::new(), Bytes::new())
        .await
        .unwrap_err();
    let _ = encrypt_err(&user, "elsewhere").await;
    let mut forged = token.clone();
    forged.replace_range(forged.len() - 6.., "AAAAAA");
    let forger = root
        .with_token(&cipherd_client::Token::from(forged.as_str()))
        .unwrap();
    let _ = encrypt_err(&forger, KEY).await;
    root.revoke_token(&created.info.accessor).await.unwrap();
    let _ = encrypt_err(&user, KEY).await;
    drop((user, treated, forger, root));
    let log = daemon.terminate().await;
    let audit = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();

    let b64 = base64::engine::general_purpose::STANDARD.encode(CANARY.as_bytes());
    for (what, text) in [("log", &log), ("audit", &audit)] {
        for (secret, name) in [
            (CANARY, "the plaintext"),
            (b64.as_str(), "the base64 plaintext"),
            (token.as_str(), "the token"),
            (&token[29..], "the token's secret"),
            (forged.as_str(), "the forged token"),
            (root_token.as_str(), "the root token"),
            (&root_token[29..], "the root token's secret"),
            ("Jane Canary", "part of the plaintext"),
        ] {
            let hits = text.lines().filter(|l| l.contains(secret)).count();
            assert_eq!(hits, 0, "{name} appears {hits} times in the {what}");
        }
    }
    // The audit log did record the session, by key name and principal.
    assert!(audit.lines().count() > 15, "{audit}");
    assert!(audit.contains(KEY) && audit.contains("canary session"));
    assert!(
        audit.contains("hmac-sha256:"),
        "references and contexts as HMACs"
    );
}

async fn encrypt_err(client: &Client, key: &str) -> cipherd_client::Error {
    client
        .encrypt(key, &b"x"[..], &EncryptOptions::default())
        .await
        .unwrap_err()
}
