//! `cipherctl audit verify` on logs written by the server's real `Auditor`: exit
//! 0 with a summary for intact logs and rotated series, exit 1 naming the first
//! line removed, reordered or edited. No server runs: `--addr` points at a port
//! nobody listens on, so any attempt to connect would fail the test.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::SystemTime,
};

use cipherd_server::audit::{AuditParams, AuditRecord, Auditor};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn cipherctl(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_cipherctl"))
        .args(["--addr", "http://127.0.0.1:1"])
        .args(args)
        .output()
        .expect("run cipherctl");
    Run {
        code: out.status.code().expect("exit code"),
        stdout: String::from_utf8(out.stdout).expect("utf-8"),
        stderr: String::from_utf8(out.stderr).expect("utf-8"),
    }
}

fn verify(files: &[&Path]) -> Run {
    let mut args = vec!["audit", "verify"];
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    args.extend(names.iter().map(String::as_str));
    cipherctl(&args)
}

fn call(key: &str) -> AuditRecord {
    let mut r = AuditRecord::new("call", SystemTime::now());
    r.operation = "decrypt";
    r.key = Some(key.to_owned());
    r
}

/// A log of a start, `n` calls and a stop (`n + 2` lines).
async fn write_log(path: &Path, n: usize) -> Auditor {
    let auditor = Auditor::open(&AuditParams::file(path)).await.expect("open");
    for i in 0..n {
        auditor
            .record(call(&format!("key-{i}")))
            .await
            .expect("recorded");
    }
    auditor
}

fn rewrite(path: &Path, edit: impl FnOnce(&mut Vec<String>)) -> PathBuf {
    let text = std::fs::read_to_string(path).expect("read");
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    edit(&mut lines);
    let out = path.with_extension("tampered");
    std::fs::write(&out, lines.join("\n") + "\n").expect("write");
    out
}

#[track_caller]
fn assert_broken(run: &Run, file: &Path, line: u64, what: &str) {
    assert_eq!(run.code, 1, "stderr: {}", run.stderr);
    let expected = format!(
        "error: AUDIT_CHAIN_BROKEN: {}:{line}: {what}",
        file.display()
    );
    assert!(run.stderr.starts_with(&expected), "{}", run.stderr);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
}

#[tokio::test]
async fn intact_logs_and_rotated_series_exit_0_with_a_summary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.log");
    let rotated = dir.path().join("audit.log.1");
    let auditor = write_log(&path, 3).await;
    std::fs::rename(&path, &rotated).expect("rotate");
    auditor.reopen().await;
    auditor.record(call("after")).await.expect("recorded");
    auditor.close().await;

    let run = verify(&[&rotated, &path]);
    assert_eq!(run.code, 0, "stderr: {}", run.stderr);
    let first = run.stdout.lines().next().expect("summary");
    assert_eq!(first, "7 lines, seq 0..6, chain intact");
    assert!(
        run.stdout.contains("last line's SHA-256: "),
        "{}",
        run.stdout
    );

    let json = cipherctl(&[
        "--json",
        "audit",
        "verify",
        &rotated.display().to_string(),
        &path.display().to_string(),
    ]);
    assert_eq!(json.code, 0, "stderr: {}", json.stderr);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).expect("JSON");
    assert_eq!(v["intact"], true);
    assert_eq!(v["lines"], 7);
    assert_eq!(v["files"].as_array().expect("files").len(), 2);
    assert_eq!(v["head"].as_str().expect("head").len(), 64);

    // The newer file alone begins mid-chain: intact, and said so.
    let run = verify(&[&path]);
    assert_eq!(run.code, 0, "stderr: {}", run.stderr);
    assert!(run.stdout.contains("begins mid-chain"), "{}", run.stdout);

    // Files in the wrong order: the older file's seq 0 follows seq 6.
    let run = verify(&[&path, &rotated]);
    assert_broken(&run, &rotated, 1, "a new chain (seq 0) starts");
    assert!(run.stderr.contains("oldest first"), "{}", run.stderr);
}

#[tokio::test]
async fn a_removed_a_reordered_and_an_edited_line_exit_1_naming_the_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.log");
    write_log(&path, 6).await.close().await;
    assert_eq!(verify(&[&path]).code, 0);

    let removed = rewrite(&path, |l| {
        l.remove(3);
    });
    assert_broken(&verify(&[&removed]), &removed, 4, "line(s) removed");

    let reordered = rewrite(&path, |l| l.swap(2, 3));
    assert_broken(&verify(&[&reordered]), &reordered, 3, "reordered");

    let edited = rewrite(&path, |l| {
        l[2] = l[2].replace("key-1", "key-9");
    });
    assert_broken(&verify(&[&edited]), &edited, 3, "edited");
}

#[test]
fn unreadable_files_and_no_files_fail() {
    let run = cipherctl(&["audit", "verify", "/nonexistent/audit.log"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .starts_with("error: IO: opening /nonexistent/audit.log"),
        "{}",
        run.stderr
    );
    assert_eq!(cipherctl(&["audit", "verify"]).code, 2, "usage error");
}

/// A real server's log (dev mode: every call audited to `<data_dir>/audit.log`)
/// verifies, across a restart that continues the chain; editing the key a call
/// named is caught at that line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_servers_log_verifies_across_a_restart_and_an_edit_is_caught() {
    use cipherd_test_support::TestServer;
    let dir = tempfile::tempdir().expect("tempdir");
    for round in 0..2 {
        let server =
            TestServer::start(cipherd_server::Params::for_data_dir(dir.path(), true)).await;
        let client = server.client().await;
        if round == 0 {
            client
                .admin()
                .create_key(cipherd_client::pb::CreateKeyRequest {
                    name: "patients".into(),
                    ..Default::default()
                })
                .await
                .expect("create");
        }
        for i in 0..5 {
            client
                .encrypt(
                    "patients",
                    format!("v{i}").into_bytes(),
                    &Default::default(),
                )
                .await
                .expect("encrypt");
        }
        server.stop().await;
    }
    let path = dir.path().join(cipherd_server::audit::DEV_AUDIT_FILE);
    let run = verify(&[&path]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let text = std::fs::read_to_string(&path).expect("read");
    let at = text
        .lines()
        .position(|l| l.contains("\"key\":\"patients\"") && l.contains("Encrypt"))
        .expect("an audited encrypt");
    let edited = rewrite(&path, |l| {
        l[at] = l[at].replace("\"key\":\"patients\"", "\"key\":\"other\"");
    });
    assert_broken(&verify(&[&edited]), &edited, at as u64 + 1, "edited");
}
