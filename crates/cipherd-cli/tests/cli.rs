//! Black-box tests of the `cipherctl` binary: a real cipherd runs in this process
//! (`cipherd-test-support`, port 0) and the built binary runs as a child process
//! with `--addr`, its stdin, stdout, stderr and exit status checked as a user or an
//! ETL script would see them.
//!
//! The child runs inside `spawn_blocking` on a multi-thread runtime so the
//! in-process server keeps serving while a test waits for it.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use cipherd_test_support::{Params, TestServer};
use serde_json::Value;

/// What one `cipherctl` run produced.
struct Run {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

impl Run {
    fn out(&self) -> String {
        String::from_utf8(self.stdout.clone()).expect("stdout is UTF-8")
    }

    /// The `label: value` lines of human output, whitespace-insensitive.
    fn field(&self, label: &str) -> Option<String> {
        self.out().lines().find_map(|line| {
            let (l, v) = line.split_once(':')?;
            (l == label).then(|| v.trim().to_owned())
        })
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {}", self.out()))
    }

    #[track_caller]
    fn success(self) -> Self {
        assert_eq!(
            self.code,
            0,
            "expected success; stderr: {}; stdout: {}",
            self.stderr,
            String::from_utf8_lossy(&self.stdout)
        );
        self
    }

    /// Asserts exit 1 with `error: REASON: …` as the last stderr line.
    #[track_caller]
    fn failure(self, reason: &str) -> Self {
        assert_eq!(self.code, 1, "expected exit 1; stderr: {}", self.stderr);
        let last = self.stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with(&format!("error: {reason}: ")),
            "expected reason {reason}, stderr: {}",
            self.stderr
        );
        assert_no_debug_dump(&self.stderr);
        self
    }
}

/// The data dirs of the servers under test by endpoint, so that [`cipherctl`]
/// sends a server's root token (`--token-file <data_dir>/root-token.INSECURE`)
/// once it has one, as an operator would.
static DATA_DIRS: std::sync::Mutex<Vec<(String, std::path::PathBuf)>> =
    std::sync::Mutex::new(Vec::new());

/// `server`'s endpoint, remembered with its data dir (see [`DATA_DIRS`]).
fn endpoint(server: &TestServer) -> String {
    let endpoint = server.endpoint();
    DATA_DIRS
        .lock()
        .expect("lock")
        .push((endpoint.clone(), server.data_dir.clone()));
    endpoint
}

/// The root token file of the server at `addr`, if it has one yet.
fn token_file(addr: &str) -> Option<std::path::PathBuf> {
    let dirs = DATA_DIRS.lock().expect("lock");
    let (_, dir) = dirs.iter().find(|(e, _)| e == addr)?;
    let file = dir.join(cipherd_server::DEV_ROOT_TOKEN_FILE);
    file.exists().then_some(file)
}

/// Runs `cipherctl --addr ADDR ARGS…` with `stdin` (empty when `None`), with the
/// server's root token when it has one.
async fn cipherctl(addr: &str, args: &[&str], stdin: Option<&[u8]>) -> Run {
    let mut argv = vec!["--addr".to_owned(), addr.to_owned()];
    if let Some(file) = token_file(addr) {
        argv.push("--token-file".to_owned());
        argv.push(file.display().to_string());
    }
    argv.extend(args.iter().map(|s| (*s).to_owned()));
    let input = stdin.unwrap_or_default().to_vec();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cipherctl"))
            .args(&argv)
            .env_remove("CIPHERD_ADDR")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cipherctl");
        let mut pipe = child.stdin.take().expect("stdin pipe");
        // A thread, so a large input cannot deadlock against a full stdout pipe.
        let writer = std::thread::spawn(move || {
            // The child may exit without reading (usage errors); ignore EPIPE.
            let _ = pipe.write_all(&input);
        });
        let output = child.wait_with_output().expect("wait for cipherctl");
        writer.join().expect("stdin writer");
        Run {
            code: output.status.code().expect("exited, not killed"),
            stdout: output.stdout,
            stderr: String::from_utf8(output.stderr).expect("stderr is UTF-8"),
        }
    })
    .await
    .expect("join")
}

fn assert_no_debug_dump(stderr: &str) {
    for needle in ["Status {", "code:", "Error {", "panicked", "RUST_BACKTRACE"] {
        assert!(!stderr.contains(needle), "Debug output on stderr: {stderr}");
    }
}

fn one_line(run: &Run) -> String {
    let out = run.out();
    assert!(out.ends_with('\n'), "{out:?}");
    assert_eq!(out.lines().count(), 1, "{out:?}");
    out.trim_end().to_owned()
}

/// The tour from the README: status, create, encrypt (argument and stdin), decrypt
/// back, rotate, rewrap to v2, `--lines` with one bad line, datakey, export refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tour() {
    let server = TestServer::dev().await;
    let addr = endpoint(&server);
    let addr = addr.as_str();

    let status = cipherctl(addr, &["status"], None).await.success();
    assert_eq!(status.field("initialized").as_deref(), Some("yes"));
    assert_eq!(status.field("sealed").as_deref(), Some("no"));
    let status = cipherctl(addr, &["--json", "status"], None)
        .await
        .success()
        .json();
    assert_eq!(status["initialized"], true);
    assert_eq!(status["sealed"], false);
    assert_eq!(status["dev_mode"], true);

    let created = cipherctl(addr, &["key", "create", "patients"], None)
        .await
        .success();
    assert!(created.out().starts_with("name:"), "{}", created.out());
    assert!(created.out().contains("xaes-256-gcm"));

    // Encrypt from the argument: one text-form line.
    let run = cipherctl(addr, &["encrypt", "patients", "Jane Doe"], None)
        .await
        .success();
    let ct_arg = one_line(&run);
    assert!(ct_arg.starts_with("cipherd:v1:"), "{ct_arg}");

    // From stdin: raw bytes, trailing newline and binary included, byte for byte.
    let secret: &[u8] = b"SSN 078-05-1120\n\x00\xff tail\n";
    let run = cipherctl(addr, &["encrypt", "patients"], Some(secret))
        .await
        .success();
    let ct_stdin = one_line(&run);
    assert!(ct_stdin.starts_with("cipherd:v1:"));

    let back = cipherctl(addr, &["decrypt", "patients", &ct_arg], None)
        .await
        .success();
    assert_eq!(back.stdout, b"Jane Doe");
    let back = cipherctl(
        addr,
        &["decrypt", "patients"],
        Some(format!("{ct_stdin}\n").as_bytes()),
    )
    .await
    .success();
    assert_eq!(back.stdout, secret);

    // Rotate, then rewrap moves the ciphertext to v2 and it still decrypts.
    let rotated = cipherctl(addr, &["key", "rotate", "patients"], None)
        .await
        .success();
    assert_eq!(rotated.field("latest version").as_deref(), Some("2"));
    let run = cipherctl(addr, &["rewrap", "patients", &ct_stdin], None)
        .await
        .success();
    let ct_v2 = one_line(&run);
    assert!(ct_v2.starts_with("cipherd:v2:"), "{ct_v2}");
    let back = cipherctl(addr, &["decrypt", "patients", &ct_v2], None)
        .await
        .success();
    assert_eq!(back.stdout, secret);

    let key = cipherctl(addr, &["--json", "key", "get", "patients"], None)
        .await
        .success()
        .json();
    assert_eq!(key["latest_version"], 2);
    assert_eq!(key["versions"].as_array().expect("versions").len(), 2);
    assert_eq!(key["type"], "xaes-256-gcm");

    // --lines: three plaintexts in, three ciphertexts out, in order.
    let run = cipherctl(
        addr,
        &["encrypt", "patients", "--lines"],
        Some(b"alice\nbob\ncarol\n"),
    )
    .await
    .success();
    let cts: Vec<String> = run.out().lines().map(str::to_owned).collect();
    assert_eq!(cts.len(), 3);
    assert!(cts.iter().all(|c| c.starts_with("cipherd:v2:")));
    // One bad ciphertext among them: its line reports the error, the others decrypt.
    let input = format!(
        "{}\ncipherd:v2:AAAAnotvalid\n{}\n{}\n",
        cts[0], cts[1], cts[2]
    );
    let run = cipherctl(
        addr,
        &["decrypt", "patients", "--lines"],
        Some(input.as_bytes()),
    )
    .await;
    let out = run.out();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert_eq!(lines[0], "alice");
    assert!(
        lines[1].starts_with("error: DECRYPTION_FAILED: "),
        "{}",
        lines[1]
    );
    assert_eq!(&lines[2..], ["bob", "carol"]);
    let run = run.failure("ITEMS_FAILED");
    assert!(run.stderr.contains("1 of 4"), "{}", run.stderr);

    // Data key: plaintext (base64) and a wrapped key that unwraps to the same bytes.
    let run = cipherctl(addr, &["--json", "datakey", "patients"], None)
        .await
        .success();
    let dk = run.json();
    let plaintext_b64 = dk["plaintext_base64"]
        .as_str()
        .expect("plaintext")
        .to_owned();
    assert_eq!(plaintext_b64.len(), 44, "256 bits by default");
    let wrapped = dk["ciphertext"].as_str().expect("wrapped");
    assert!(wrapped.starts_with("cipherd:v2:"));
    let run = cipherctl(addr, &["decrypt", "patients", "--base64", wrapped], None)
        .await
        .success();
    assert_eq!(one_line(&run), plaintext_b64);
    let human = cipherctl(addr, &["datakey", "patients", "--bits", "128"], None)
        .await
        .success();
    assert!(
        human.out().starts_with("plaintext (base64): "),
        "{}",
        human.out()
    );
    let wrapped_only = cipherctl(addr, &["datakey", "patients", "--wrapped-only"], None)
        .await
        .success();
    assert!(
        !wrapped_only.out().contains("plaintext"),
        "{}",
        wrapped_only.out()
    );

    // Export of a key not created exportable is refused by the server.
    cipherctl(addr, &["key", "export", "patients"], None)
        .await
        .failure("FAILED_PRECONDITION");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_have_reasons_and_usage_errors_exit_2() {
    let server = TestServer::dev().await;
    let addr = endpoint(&server);
    let addr = addr.as_str();

    let run = cipherctl(addr, &["encrypt", "nope", "x"], None)
        .await
        .failure("KEY_NOT_FOUND");
    assert!(run.stdout.is_empty());
    cipherctl(addr, &["key", "get", "nope"], None)
        .await
        .failure("KEY_NOT_FOUND");
    cipherctl(addr, &["key", "create", "bad name!"], None)
        .await
        .failure("INVALID_ARGUMENT");
    cipherctl(addr, &["key", "create", "k"], None)
        .await
        .success();
    cipherctl(addr, &["key", "create", "k"], None)
        .await
        .failure("KEY_EXISTS");
    cipherctl(addr, &["key", "delete", "k"], None)
        .await
        .failure("FAILED_PRECONDITION");
    cipherctl(addr, &["encrypt", "k", "--base64", "%%%"], None)
        .await
        .failure("INVALID_INPUT");
    cipherctl(addr, &["decrypt", "k", "not a ciphertext"], None)
        .await
        .failure("DECRYPTION_FAILED");
    cipherctl(addr, &["init", "--shares", "1", "--threshold", "1"], None)
        .await
        .failure("ALREADY_INITIALIZED");

    for usage in [
        &["key", "config", "k"][..],
        &["encrypt"],
        &["datakey", "k", "--bits", "64"],
        &["frobnicate"],
    ] {
        let run = cipherctl(addr, usage, None).await;
        assert_eq!(run.code, 2, "{usage:?}: {}", run.stderr);
    }

    // Nothing listens on a port we just bound and released.
    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = format!("127.0.0.1:{}", free.local_addr().expect("addr").port());
    drop(free);
    let run = cipherctl(&dead, &["--timeout", "5", "status"], None)
        .await
        .failure("CONNECT_FAILED");
    assert!(run.stderr.contains(&dead), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn associated_data_context_and_binary_forms() {
    let server = TestServer::dev().await;
    let addr = endpoint(&server);
    let addr = addr.as_str();
    cipherctl(
        addr,
        &[
            "key",
            "create",
            "d",
            "--derived",
            "--type",
            "xchacha20-poly1305",
        ],
        None,
    )
    .await
    .success();

    // A derived key wants a context.
    cipherctl(addr, &["encrypt", "d", "x"], None)
        .await
        .failure("INVALID_ARGUMENT");

    let run = cipherctl(
        addr,
        &[
            "encrypt",
            "d",
            "--context",
            "tenant-7",
            "--aad",
            "patients.name",
            "Jane",
        ],
        None,
    )
    .await
    .success();
    let ct = one_line(&run);
    let ok = cipherctl(
        addr,
        &[
            "decrypt",
            "d",
            "--context-base64",
            "dGVuYW50LTc=",
            "--aad",
            "patients.name",
            &ct,
        ],
        None,
    )
    .await
    .success();
    assert_eq!(ok.stdout, b"Jane");
    // Wrong associated data or context: the one opaque failure.
    cipherctl(addr, &["decrypt", "d", "--context", "tenant-7", &ct], None)
        .await
        .failure("DECRYPTION_FAILED");
    cipherctl(
        addr,
        &[
            "decrypt",
            "d",
            "--context",
            "tenant-8",
            "--aad",
            "patients.name",
            &ct,
        ],
        None,
    )
    .await
    .failure("DECRYPTION_FAILED");

    // Binary plaintext via --base64, binary ciphertext via --binary, and back.
    let run = cipherctl(
        addr,
        &[
            "--json",
            "encrypt",
            "d",
            "--context",
            "c",
            "--base64",
            "--binary",
        ],
        Some(b"AP8A/w==\n"),
    )
    .await
    .success();
    let v = run.json();
    assert_eq!(v["key_version"], 1);
    let binary_ct = v["ciphertext"].as_str().expect("ciphertext").to_owned();
    assert!(!binary_ct.starts_with("cipherd:"));
    let run = cipherctl(addr, &["decrypt", "d", "--context", "c", &binary_ct], None)
        .await
        .success();
    assert_eq!(run.stdout, [0x00, 0xff, 0x00, 0xff]);
    let v = cipherctl(
        addr,
        &["--json", "decrypt", "d", "--context", "c", &binary_ct],
        None,
    )
    .await
    .success()
    .json();
    assert_eq!(v["plaintext_base64"], "AP8A/w==");
    assert_eq!(v["plaintext"], Value::Null);

    // Rewrap into another derived key under its own context.
    cipherctl(addr, &["key", "create", "d2", "--derived"], None)
        .await
        .success();
    let run = cipherctl(
        addr,
        &[
            "rewrap",
            "d",
            "--context",
            "c",
            "--to",
            "d2",
            "--dest-context",
            "c2",
            &binary_ct,
        ],
        None,
    )
    .await
    .success();
    let moved = one_line(&run);
    let run = cipherctl(addr, &["decrypt", "d2", "--context", "c2", &moved], None)
        .await
        .success();
    assert_eq!(run.stdout, [0x00, 0xff, 0x00, 0xff]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_management_commands() {
    let server = TestServer::dev().await;
    let addr = endpoint(&server);
    let addr = addr.as_str();
    for name in ["a", "b", "c"] {
        cipherctl(addr, &["key", "create", name], None)
            .await
            .success();
    }
    let run = cipherctl(
        addr,
        &[
            "key",
            "create",
            "gcm",
            "--type",
            "aes256-gcm96",
            "--exportable",
            "--deletion-allowed",
        ],
        None,
    )
    .await
    .success();
    assert_eq!(run.field("exportable").as_deref(), Some("yes"));
    assert_eq!(run.field("type").as_deref(), Some("aes256-gcm96"));

    // Paging: one page leaves a token (on stderr for humans); --all follows them.
    let run = cipherctl(addr, &["key", "list", "--page-size", "2"], None)
        .await
        .success();
    assert_eq!(run.out(), "a\nb\n");
    assert!(run.stderr.contains("--page-token b"), "{}", run.stderr);
    let v = cipherctl(addr, &["--json", "key", "list", "--page-size", "2"], None)
        .await
        .success()
        .json();
    assert_eq!(v["next_page_token"], "b");
    let v = cipherctl(addr, &["--json", "key", "list", "--page-token", "b"], None)
        .await
        .success()
        .json();
    assert_eq!(v["names"], serde_json::json!(["c", "gcm"]));
    let run = cipherctl(addr, &["key", "list", "--page-size", "1", "--all"], None)
        .await
        .success();
    assert_eq!(run.out(), "a\nb\nc\ngcm\n");

    // Counted type: the usage column shows encryptions/limit.
    cipherctl(addr, &["encrypt", "gcm", "x"], None)
        .await
        .success();
    let run = cipherctl(addr, &["key", "get", "gcm"], None)
        .await
        .success();
    assert!(
        run.out().contains("USAGE (ENCRYPTIONS/LIMIT)"),
        "{}",
        run.out()
    );
    let v = cipherctl(addr, &["--json", "key", "get", "gcm"], None)
        .await
        .success()
        .json();
    let limit = v["versions"][0]["encryption_limit"]
        .as_u64()
        .expect("limit");
    assert!(limit > 0);
    assert!(run.out().contains(&format!("/{limit} (")), "{}", run.out());

    // Rotate twice, raise the decryption floor, trim below it.
    for _ in 0..2 {
        cipherctl(addr, &["key", "rotate", "gcm"], None)
            .await
            .success();
    }
    let v = cipherctl(
        addr,
        &[
            "--json",
            "key",
            "config",
            "gcm",
            "--min-decryption-version",
            "3",
        ],
        None,
    )
    .await
    .success()
    .json();
    assert_eq!(v["min_decryption_version"], 3);
    let v = cipherctl(
        addr,
        &[
            "--json",
            "key",
            "trim",
            "gcm",
            "--min-available-version",
            "3",
        ],
        None,
    )
    .await
    .success()
    .json();
    assert_eq!(v["min_available_version"], 3);
    assert_eq!(v["versions"].as_array().expect("versions").len(), 1);

    // Export: base64 of 256-bit material, per version.
    let v = cipherctl(addr, &["--json", "key", "export", "gcm"], None)
        .await
        .success()
        .json();
    assert_eq!(v["name"], "gcm");
    assert_eq!(v["type"], "aes256-gcm96");
    assert_eq!(v["versions"][0]["version"], 3);
    assert_eq!(
        v["versions"][0]["material"]
            .as_str()
            .expect("material")
            .len(),
        44
    );
    let run = cipherctl(addr, &["key", "export", "gcm", "--version", "3"], None)
        .await
        .success();
    assert!(run.out().contains("version 3: "), "{}", run.out());

    // Deletion goes off and on. (Exportability is fixed at creation; the server
    // refusing to turn it on later is tested end to end in tests/tests/transit.rs.)
    cipherctl(
        addr,
        &["key", "config", "gcm", "--deletion-allowed", "false"],
        None,
    )
    .await
    .success();
    cipherctl(addr, &["key", "delete", "gcm"], None)
        .await
        .failure("FAILED_PRECONDITION");
    cipherctl(
        addr,
        &["key", "config", "gcm", "--deletion-allowed", "true"],
        None,
    )
    .await
    .success();
    // Deletion is scheduled (7 days by default), refuses use, and is cancelled.
    let v = cipherctl(addr, &["--json", "key", "delete", "gcm"], None)
        .await
        .success()
        .json();
    assert_eq!(v["name"], "gcm");
    assert_eq!(v["destroyed"], false);
    let when = v["deletion_time"]
        .as_str()
        .expect("deletion time")
        .to_owned();
    let got = cipherctl(addr, &["--json", "key", "get", "gcm"], None)
        .await
        .success()
        .json();
    assert_eq!(got["deletion_time"], when.as_str());
    cipherctl(addr, &["encrypt", "gcm", "x"], None)
        .await
        .failure("KEY_PENDING_DELETION");
    cipherctl(
        addr,
        &["key", "delete", "gcm", "--waiting-period", "1d"],
        None,
    )
    .await
    .failure("INVALID_ARGUMENT");
    let run = cipherctl(addr, &["key", "cancel-deletion", "gcm"], None)
        .await
        .success();
    assert_eq!(
        run.field("deletion").as_deref(),
        Some("not scheduled"),
        "{}",
        run.out()
    );
    cipherctl(addr, &["encrypt", "gcm", "x"], None)
        .await
        .success();
    let run = cipherctl(
        addr,
        &["key", "delete", "gcm", "--waiting-period", "30d"],
        None,
    )
    .await
    .success();
    assert!(
        run.out().contains("cipherctl key cancel-deletion gcm"),
        "{}",
        run.out()
    );
}

/// With a waiting period of zero (`keys.deletion_waiting_period_s = 0`) `key
/// delete` destroys the key at once; `key get` shows use counts per version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_deleted_without_waiting_is_gone_and_use_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut params = Params::for_data_dir(dir.path(), true);
    params.lifecycle.deletion_waiting_period = std::time::Duration::ZERO;
    let server = TestServer::start(params).await;
    let addr = endpoint(&server);
    let addr = addr.as_str();
    cipherctl(
        addr,
        &[
            "key",
            "create",
            "k",
            "--deletion-allowed",
            "--auto-rotate-period",
            "90d",
        ],
        None,
    )
    .await
    .success();
    let ct = cipherctl(addr, &["encrypt", "k", "hello"], None)
        .await
        .success()
        .out()
        .trim()
        .to_owned();
    cipherctl(addr, &["decrypt", "k", &ct], None)
        .await
        .success();
    let v = cipherctl(addr, &["--json", "key", "get", "k"], None)
        .await
        .success()
        .json();
    assert_eq!(v["auto_rotate_period_s"], 90 * 86_400);
    assert_eq!(v["versions"][0]["encrypt_count"], 1);
    assert_eq!(v["versions"][0]["decrypt_count"], 1);
    assert!(v["versions"][0]["last_used"].is_string(), "{v}");
    cipherctl(
        addr,
        &["key", "create", "short", "--auto-rotate-period", "5m"],
        None,
    )
    .await
    .failure("INVALID_ARGUMENT");
    let v = cipherctl(addr, &["--json", "key", "delete", "k"], None)
        .await
        .success()
        .json();
    assert_eq!(v["destroyed"], true);
    cipherctl(addr, &["key", "get", "k"], None)
        .await
        .failure("KEY_NOT_FOUND");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_stream_in_chunks_and_json_lines() {
    let server = TestServer::dev().await;
    let addr = endpoint(&server);
    let addr = addr.as_str();
    cipherctl(addr, &["key", "create", "etl"], None)
        .await
        .success();
    cipherctl(addr, &["key", "create", "etl2"], None)
        .await
        .success();

    // More lines than one batch (1000), including an empty line, no final newline.
    let rows: Vec<String> = (0..2500)
        .map(|i| {
            if i == 7 {
                String::new()
            } else {
                format!("row {i}")
            }
        })
        .collect();
    let input = rows.join("\n");
    let run = cipherctl(
        addr,
        &["encrypt", "etl", "--lines", "--aad", "t"],
        Some(input.as_bytes()),
    )
    .await
    .success();
    let cts = run.out();
    assert_eq!(cts.lines().count(), 2500);

    // Rewrap every line into another key, then decrypt there.
    let run = cipherctl(
        addr,
        &["rewrap", "etl", "--lines", "--aad", "t", "--to", "etl2"],
        Some(cts.as_bytes()),
    )
    .await
    .success();
    let moved = run.out();
    assert_eq!(moved.lines().count(), 2500);
    let run = cipherctl(
        addr,
        &["decrypt", "etl2", "--lines", "--aad", "t"],
        Some(moved.as_bytes()),
    )
    .await
    .success();
    let out = run.out();
    let back: Vec<&str> = out.lines().collect();
    assert_eq!(back, rows);

    // JSON lines: one object per input line, errors in place.
    let first = moved.lines().next().expect("a line");
    let input = format!("{first}\ngarbage\n");
    let run = cipherctl(
        addr,
        &["--json", "decrypt", "etl2", "--lines", "--aad", "t"],
        Some(input.as_bytes()),
    )
    .await;
    let out = run.out();
    let objects: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(objects.len(), 2);
    assert_eq!(objects[0]["line"], 1);
    assert_eq!(objects[0]["plaintext"], "row 0");
    assert_eq!(objects[1]["line"], 2);
    assert_eq!(objects[1]["error"]["reason"], "DECRYPTION_FAILED");
    run.failure("ITEMS_FAILED");

    // A plaintext with a line break cannot be a line: an error there, fine in base64.
    let ct = one_line(
        &cipherctl(addr, &["encrypt", "etl", "a\nb"], None)
            .await
            .success(),
    );
    let input = format!("{ct}\n");
    let run = cipherctl(addr, &["decrypt", "etl", "--lines"], Some(input.as_bytes())).await;
    assert!(
        run.out().starts_with("error: LINE_BREAK_IN_PLAINTEXT: "),
        "{}",
        run.out()
    );
    run.failure("ITEMS_FAILED");
    let run = cipherctl(
        addr,
        &["decrypt", "etl", "--lines", "--base64"],
        Some(input.as_bytes()),
    )
    .await
    .success();
    assert_eq!(run.out(), "YQpi\n");

    // A whole-request failure stops the run and says so.
    let run = cipherctl(addr, &["encrypt", "missing", "--lines"], Some(b"x\n"))
        .await
        .failure("KEY_NOT_FOUND");
    assert!(
        run.stderr.contains("resume from input line 1"),
        "{}",
        run.stderr
    );
    assert!(run.stdout.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_unseal_seal_lifecycle() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = TestServer::start(Params::for_data_dir(dir.path(), false)).await;
    let addr = endpoint(&server);
    let addr = addr.as_str();

    let v = cipherctl(addr, &["--json", "status"], None)
        .await
        .success()
        .json();
    assert_eq!(v["initialized"], false);
    // Something that is not a share is refused locally; a share-shaped input
    // reaches the server, which says what to do first.
    cipherctl(addr, &["unseal", "abc"], None)
        .await
        .failure("INVALID_INPUT");
    cipherctl(
        addr,
        &["unseal", "unseal share 1: cipherd-share:v1:00"],
        None,
    )
    .await
    .failure("NOT_INITIALIZED");

    let run = cipherctl(
        addr,
        &["--json", "init", "--shares", "3", "--threshold", "2"],
        None,
    )
    .await
    .success();
    assert!(
        run.stderr.contains("WARNING") && run.stderr.contains("separately"),
        "{}",
        run.stderr
    );
    let shares: Vec<String> = run.json()["shares"]
        .as_array()
        .expect("shares")
        .iter()
        .map(|s| s.as_str().expect("share").to_owned())
        .collect();
    assert_eq!(shares.len(), 3);
    // The operator keeps the root token in a private file for --token-file.
    let root = run.json()["root_token"]
        .as_str()
        .expect("init prints the root token")
        .to_owned();
    assert!(root.starts_with("cdt_"), "{root}");
    write_private(
        &dir.path().join(cipherd_server::DEV_ROOT_TOKEN_FILE),
        &format!("{root}\n"),
    );

    let run = cipherctl(addr, &["status"], None).await.success();
    assert!(
        run.out().contains("unseal progress: 0/2\n"),
        "{}",
        run.out()
    );
    cipherctl(addr, &["key", "list"], None)
        .await
        .failure("SEALED");

    // First share from the argument, the second from stdin.
    let run = cipherctl(addr, &["unseal", &shares[0]], None)
        .await
        .success();
    assert_eq!(run.out(), "sealed:          yes\nunseal progress: 1/2\n");
    // --reset alone discards it.
    let v = cipherctl(addr, &["--json", "unseal", "--reset"], None)
        .await
        .success()
        .json();
    assert_eq!(v["progress"], 0);
    cipherctl(addr, &["unseal", &shares[2]], None)
        .await
        .success();
    cipherctl(addr, &["unseal"], Some(b""))
        .await
        .failure("INVALID_INPUT");
    let stdin = format!("{}\n", shares[1]);
    let v = cipherctl(addr, &["--json", "unseal"], Some(stdin.as_bytes()))
        .await
        .success()
        .json();
    assert_eq!(v["sealed"], false);

    cipherctl(addr, &["key", "create", "k"], None)
        .await
        .success();
    let ct = one_line(
        &cipherctl(addr, &["encrypt", "k", "v"], None)
            .await
            .success(),
    );

    let run = cipherctl(addr, &["seal"], None).await.success();
    assert_eq!(run.out(), "sealed: yes\n");
    cipherctl(addr, &["decrypt", "k", &ct], None)
        .await
        .failure("SEALED");
    cipherctl(addr, &["unseal", &shares[1]], None)
        .await
        .success();
    cipherctl(addr, &["unseal", &shares[0]], None)
        .await
        .success();
    let run = cipherctl(addr, &["decrypt", "k", &ct], None)
        .await
        .success();
    assert_eq!(run.stdout, b"v");

    // Rekey from 2-of-3 to 2-of-2: the current shares, then the new ones back.
    let v = cipherctl(
        addr,
        &[
            "--json",
            "rekey",
            "start",
            "--shares",
            "2",
            "--threshold",
            "2",
        ],
        None,
    )
    .await
    .success()
    .json();
    assert_eq!(v["phase"], "collecting");
    let nonce = v["nonce"].as_str().expect("nonce").to_owned();
    cipherctl(
        addr,
        &["rekey", "submit", "--nonce", &nonce, &shares[0]],
        None,
    )
    .await
    .success();
    let stdin = format!("{}\n", shares[2]);
    let run = cipherctl(
        addr,
        &["--json", "rekey", "submit", "--nonce", &nonce],
        Some(stdin.as_bytes()),
    )
    .await
    .success();
    assert!(run.stderr.contains("NOT in force yet"), "{}", run.stderr);
    let v = run.json();
    assert_eq!(v["phase"], "verifying");
    let new: Vec<String> = v["shares"]
        .as_array()
        .expect("new shares")
        .iter()
        .map(|s| s.as_str().expect("share").to_owned())
        .collect();
    assert_eq!(new.len(), 2);
    let run = cipherctl(addr, &["rekey", "status"], None).await.success();
    assert!(
        run.out().contains("new shares verified: 0/2\n"),
        "{}",
        run.out()
    );
    for share in &new {
        cipherctl(addr, &["rekey", "submit", "--nonce", &nonce, share], None)
            .await
            .success();
    }
    let v = cipherctl(addr, &["--json", "status"], None)
        .await
        .success()
        .json();
    assert_eq!(
        (v["shares"].as_u64(), v["threshold"].as_u64()),
        (Some(2), Some(2))
    );
    cipherctl(addr, &["seal"], None).await.success();
    cipherctl(addr, &["unseal", &shares[1]], None)
        .await
        .failure("INVALID_ARGUMENT");
    for share in &new {
        cipherctl(addr, &["unseal", share], None).await.success();
    }
    let run = cipherctl(addr, &["decrypt", "k", &ct], None)
        .await
        .success();
    assert_eq!(run.stdout, b"v");

    // Root rotation with the new shares; the re-seal runs in the background.
    let v = cipherctl(addr, &["--json", "rotate-root", "start"], None)
        .await
        .success()
        .json();
    assert_eq!(v["phase"], "collecting");
    let nonce = v["nonce"].as_str().expect("nonce").to_owned();
    for share in &new {
        cipherctl(
            addr,
            &["rotate-root", "submit", "--nonce", &nonce, share],
            None,
        )
        .await
        .success();
    }
    let mut phase = String::new();
    for _ in 0..500 {
        let v = cipherctl(addr, &["--json", "rotate-root", "status"], None)
            .await
            .success()
            .json();
        phase = v["phase"].as_str().expect("phase").to_owned();
        if phase != "resealing" {
            assert_eq!(v["root_generation"], 2);
            break;
        }
    }
    assert_eq!(phase, "done");
    let run = cipherctl(addr, &["decrypt", "k", &ct], None)
        .await
        .success();
    assert_eq!(run.stdout, b"v");
    cipherctl(addr, &["seal"], None).await.success();
    for share in &new {
        cipherctl(addr, &["unseal", share], None).await.success();
    }
    let run = cipherctl(addr, &["decrypt", "k", &ct], None)
        .await
        .success();
    assert_eq!(run.stdout, b"v");
}

/// `cipherctl … | head -1`: when stdout's reader goes away, stop without an error
/// message and with the status a SIGPIPE death gives (141).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_stdout_stops_quietly() {
    let server = TestServer::dev().await;
    let addr = endpoint(&server);
    cipherctl(&addr, &["key", "create", "k"], None)
        .await
        .success();
    let token = token_file(&addr).expect("the dev root token");
    let (code, stderr) = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cipherctl"))
            .args(["--addr", &addr, "encrypt", "k", "--lines", "--token-file"])
            .arg(&token)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cipherctl");
        // Close the read end before the child has anything to write.
        drop(child.stdout.take());
        let mut stdin = child.stdin.take().expect("stdin pipe");
        stdin.write_all(b"a\nb\n").expect("write stdin");
        drop(stdin);
        let output = child.wait_with_output().expect("wait");
        (
            output.status.code(),
            String::from_utf8(output.stderr).expect("utf-8"),
        )
    })
    .await
    .expect("join");
    assert_eq!(code, Some(141), "stderr: {stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}

/// Writes `text` to `path`, readable by the owner only.
fn write_private(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .expect("create the token file");
    file.write_all(text.as_bytes())
        .expect("write the token file");
}

/// `backup FILE` writes a private file atomically; `restore FILE` puts it into
/// a fresh server, which the dev server's share unseals and whose root token
/// then decrypts what the dev server encrypted. A failed backup leaves neither
/// FILE nor its temporary file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_and_restore_files() {
    let source = TestServer::dev().await;
    let addr = endpoint(&source);
    let addr = addr.as_str();
    cipherctl(addr, &["key", "create", "patients"], None)
        .await
        .success();
    let ct = one_line(
        &cipherctl(addr, &["encrypt", "patients", "Jane Doe"], None)
            .await
            .success(),
    );

    let out = tempfile::tempdir().expect("temp dir");
    let file = out.path().join("cipherd.cdbk");
    let file_arg = file.display().to_string();
    std::fs::write(&file, b"an older backup").expect("write");
    let run = cipherctl(addr, &["--json", "backup", &file_arg], None)
        .await
        .success();
    let bytes = std::fs::read(&file).expect("read the backup");
    assert_eq!(run.json()["bytes"], bytes.len() as u64);
    assert!(
        bytes.starts_with(b"CIPHERDB"),
        "the old file was not replaced"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    let listed: Vec<_> = std::fs::read_dir(out.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(listed, ["cipherd.cdbk"], "a temporary file was left behind");

    let target_dir = tempfile::tempdir().expect("temp dir");
    let target = TestServer::start(Params::for_data_dir(target_dir.path(), false)).await;
    let target_addr = endpoint(&target);
    let target_addr = target_addr.as_str();
    // Uninitialized: a backup fails, and writes nothing.
    let failed = out.path().join("failed.cdbk");
    cipherctl(
        target_addr,
        &["backup", &failed.display().to_string()],
        None,
    )
    .await
    .failure("NOT_INITIALIZED");
    assert!(!failed.exists());
    assert_eq!(std::fs::read_dir(out.path()).expect("list").count(), 1);

    let restored = cipherctl(target_addr, &["--json", "restore", &file_arg], None)
        .await
        .success()
        .json();
    assert_eq!(restored["sealed"], true);
    assert_eq!(restored["source_backend"], "sqlite");
    assert!(restored["records"].as_u64().expect("records") > 1);
    // Restoring again: the server is initialized now.
    cipherctl(target_addr, &["restore", &file_arg], None)
        .await
        .failure("ALREADY_INITIALIZED");

    let share = std::fs::read(source.data_dir.join(cipherd_server::DEV_SHARE_FILE))
        .expect("dev share file");
    let unsealed = cipherctl(target_addr, &["--json", "unseal"], Some(&share))
        .await
        .success()
        .json();
    assert_eq!(unsealed["sealed"], false);
    let root = source.data_dir.join(cipherd_server::DEV_ROOT_TOKEN_FILE);
    let back = cipherctl(
        target_addr,
        &[
            "--token-file",
            &root.display().to_string(),
            "decrypt",
            "patients",
            &ct,
        ],
        None,
    )
    .await
    .success();
    assert_eq!(back.stdout, b"Jane Doe");

    // One key: written privately; restoring it over the existing key is refused.
    let key_file = out.path().join("patients.cdkey");
    let key_arg = key_file.display().to_string();
    let token = root.display().to_string();
    cipherctl(
        target_addr,
        &[
            "--token-file",
            &token,
            "key",
            "backup",
            "patients",
            &key_arg,
        ],
        None,
    )
    .await
    .success();
    let key_backup = std::fs::read(&key_file).expect("key backup");
    assert!(key_backup.starts_with(b"CIPHERDK"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key_file)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    cipherctl(
        target_addr,
        &["--token-file", &token, "key", "restore", &key_arg],
        None,
    )
    .await
    .failure("KEY_EXISTS");
}
