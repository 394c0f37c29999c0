//! Black-box tests of cipherctl's identity and access commands (`token`, `role`,
//! `policy`, `--token`, `CIPHERD_TOKEN`, `--token-file`, `--purpose`/`--reason`,
//! the root token from `init`) against a real cipherd in this process
//! (`cipherd-test-support`, port 0), the built binary run as a child process.
//!
//! A dev server writes its root token to `<data_dir>/root-token.INSECURE`; the
//! tests use it through `--token-file`, as an operator would. Every test also
//! checks that no token secret appears in any output but the one that creates it.

use std::{
    io::Write as _,
    path::PathBuf,
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

    /// All of stdout and stderr, for leak checks.
    fn all(&self) -> String {
        format!("{}{}", String::from_utf8_lossy(&self.stdout), self.stderr)
    }

    /// The `label: value` lines of human output.
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
        assert_eq!(
            self.code,
            1,
            "expected exit 1 ({reason}); stderr: {}; stdout: {}",
            self.stderr,
            self.out()
        );
        let last = self.stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with(&format!("error: {reason}: ")),
            "expected reason {reason}, stderr: {}",
            self.stderr
        );
        for needle in ["Status {", "code:", "Error {", "panicked"] {
            assert!(
                !self.stderr.contains(needle),
                "Debug output: {}",
                self.stderr
            );
        }
        self
    }
}

/// How a run authenticates.
#[derive(Clone)]
enum Auth {
    /// No token at all.
    None,
    /// `--token-file PATH`.
    File(PathBuf),
    /// `CIPHERD_TOKEN=TOKEN` in the environment (never on the command line).
    Env(String),
}

/// Runs `cipherctl --addr ADDR [auth] ARGS…` with `stdin` (empty when `None`).
async fn cipherctl(addr: &str, auth: &Auth, args: &[&str], stdin: Option<&[u8]>) -> Run {
    let mut argv = vec!["--addr".to_owned(), addr.to_owned()];
    let mut env = None;
    match auth {
        Auth::None => {}
        Auth::File(path) => {
            argv.push("--token-file".to_owned());
            argv.push(path.display().to_string());
        }
        Auth::Env(token) => env = Some(token.clone()),
    }
    argv.extend(args.iter().map(|s| (*s).to_owned()));
    let input = stdin.unwrap_or_default().to_vec();
    tokio::task::spawn_blocking(move || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cipherctl"));
        command
            .args(&argv)
            .env_remove("CIPHERD_ADDR")
            .env_remove("CIPHERD_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(token) = env {
            command.env("CIPHERD_TOKEN", token);
        }
        let mut child = command.spawn().expect("spawn cipherctl");
        let mut pipe = child.stdin.take().expect("stdin pipe");
        let writer = std::thread::spawn(move || {
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

/// The dev server's root token, as a `--token-file` credential.
fn root(server: &TestServer) -> Auth {
    let path = server.data_dir.join("root-token.INSECURE");
    assert!(path.exists(), "a dev server writes {}", path.display());
    Auth::File(path)
}

fn one_line(run: &Run) -> String {
    let out = run.out();
    assert_eq!(out.lines().count(), 1, "{out:?}");
    out.trim_end().to_owned()
}

/// Writes `document` to a fresh file (kept alive by the returned guard).
fn policy_file(document: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(document.as_bytes()).expect("write policy");
    file
}

const CLINICIAN: &str = "\
# Clinicians read and write patient records and their clinics' data.
[[rule]]
keys = [\"patients\", \"clinic-*\"]
operations = [\"encrypt\", \"decrypt\"]
";

/// Policies from a file and from stdin, a least-privilege token created with
/// them, allowed and denied calls made with it, listing and lookup, revocation,
/// and no secret in any output but `token create`'s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_policies_and_denied_calls() {
    let server = TestServer::dev().await;
    let addr = server.endpoint();
    let addr = addr.as_str();
    let root = root(&server);

    // Without a token nothing reaches a key.
    cipherctl(addr, &Auth::None, &["key", "create", "patients"], None)
        .await
        .failure("UNAUTHENTICATED");
    for key in ["patients", "clinic-north", "billing"] {
        cipherctl(addr, &root, &["key", "create", key], None)
            .await
            .success();
    }

    // Policies: one from a file, one from stdin; read back exactly as written.
    let file = policy_file(CLINICIAN);
    let path = file.path().to_str().expect("utf-8 path");
    let run = cipherctl(addr, &root, &["policy", "write", "clinician", path], None)
        .await
        .success();
    assert_eq!(run.out(), "written: clinician\n");
    let billing = "[[rule]]\nkeys = [\"billing\"]\noperations = [\"encrypt\"]\n";
    let v = cipherctl(
        addr,
        &root,
        &["--json", "policy", "write", "billing", "-"],
        Some(billing.as_bytes()),
    )
    .await
    .success()
    .json();
    assert_eq!(
        (v["name"].as_str(), v["written"].as_bool()),
        (Some("billing"), Some(true))
    );
    let run = cipherctl(addr, &root, &["policy", "read", "clinician"], None)
        .await
        .success();
    assert_eq!(run.out(), CLINICIAN);
    let v = cipherctl(addr, &root, &["--json", "policy", "read", "billing"], None)
        .await
        .success()
        .json();
    assert_eq!(v["document"], billing);
    let names = cipherctl(addr, &root, &["policy", "list"], None)
        .await
        .success()
        .out();
    assert!(
        names.lines().any(|l| l == "clinician") && names.lines().any(|l| l == "billing"),
        "{names}"
    );

    // Policies the server cannot parse are refused, and nothing is stored.
    for bad in [
        "[[rule]\nkeys = [\"patients\"]\n",
        "[[rule]]\nkeys = [\"patients\"]\noperations = [\"decrypt\", \"teleport\"]\n",
        "[[rule]]\nkeys = [\"patients\"]\noperations = [\"decrypt\"]\ncolour = \"red\"\n",
    ] {
        cipherctl(
            addr,
            &root,
            &["policy", "write", "broken", "-"],
            Some(bad.as_bytes()),
        )
        .await
        .failure("INVALID_POLICY");
    }
    let names = cipherctl(addr, &root, &["--json", "policy", "list"], None)
        .await
        .success()
        .json();
    assert!(
        !names["names"]
            .as_array()
            .expect("names")
            .iter()
            .any(|n| n == "broken"),
        "{names}"
    );

    // A token, created once with --json and once for people.
    let created = cipherctl(
        addr,
        &root,
        &[
            "--json",
            "token",
            "create",
            "--policy",
            "clinician",
            "--ttl",
            "1h",
            "--display-name",
            "ehr test",
        ],
        None,
    )
    .await
    .success();
    let v = created.json();
    let token = v["token"].as_str().expect("token").to_owned();
    let accessor = v["accessor"].as_str().expect("accessor").to_owned();
    assert!(!token.is_empty() && !accessor.is_empty() && token != accessor);
    assert_eq!(v["policies"], serde_json::json!(["clinician"]));
    assert_eq!(v["display_name"], "ehr test");
    assert!(v["expires"].is_string(), "a 1h token expires: {v}");

    let human = cipherctl(
        addr,
        &root,
        &["token", "create", "--policy", "billing"],
        None,
    )
    .await
    .success();
    let out = human.out();
    let other_token = out.lines().next().expect("the token line").to_owned();
    let other_accessor = human.field("accessor").expect("accessor row");
    assert_eq!(human.field("policies").as_deref(), Some("billing"));
    assert!(human.stderr.contains("shown this once"), "{}", human.stderr);
    assert!(!other_token.contains(' '), "the token is alone on its line");

    // Everything below must never show either secret.
    let mut outputs = Vec::new();

    let run = cipherctl(addr, &root, &["--json", "token", "lookup", &accessor], None)
        .await
        .success();
    let v = run.json();
    assert_eq!(v["accessor"], accessor.as_str());
    assert_eq!(v["policies"], serde_json::json!(["clinician"]));
    assert!(v.get("token").is_none(), "{v}");
    outputs.push(run.all());
    let run = cipherctl(addr, &root, &["--json", "token", "list"], None)
        .await
        .success();
    let listed: Vec<String> = run.json()["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t["accessor"].as_str().expect("accessor").to_owned())
        .collect();
    assert!(
        listed.contains(&accessor) && listed.contains(&other_accessor),
        "{listed:?}"
    );
    outputs.push(run.all());
    let run = cipherctl(addr, &root, &["token", "list"], None)
        .await
        .success();
    assert!(run.out().starts_with("ACCESSOR"), "{}", run.out());
    outputs.push(run.all());
    // Without an accessor: the token in use (here the root token).
    let run = cipherctl(addr, &root, &["--json", "token", "lookup"], None)
        .await
        .success();
    let me = run.json();
    assert!(
        me["policies"]
            .as_array()
            .expect("policies")
            .iter()
            .any(|p| p == "root"),
        "{me}"
    );
    assert_ne!(me["accessor"], accessor.as_str());
    outputs.push(run.all());

    // The clinician token (from the environment): its keys, nothing else.
    let clinician = Auth::Env(token.clone());
    let run = cipherctl(addr, &clinician, &["encrypt", "patients", "Jane Doe"], None)
        .await
        .success();
    let ct = one_line(&run);
    outputs.push(run.all());
    let run = cipherctl(addr, &clinician, &["decrypt", "patients", &ct], None)
        .await
        .success();
    assert_eq!(run.stdout, b"Jane Doe");
    outputs.push(run.all());
    cipherctl(addr, &clinician, &["encrypt", "clinic-north", "x"], None)
        .await
        .success();
    for args in [
        &["encrypt", "billing", "x"][..],
        // A missing key is denied exactly like an existing one.
        &["encrypt", "no-such-key", "x"],
        &["key", "create", "clinic-south"],
        &["key", "rotate", "patients"],
        &["token", "create", "--policy", "clinician"],
        &["policy", "list"],
    ] {
        let run = cipherctl(addr, &clinician, args, None)
            .await
            .failure("PERMISSION_DENIED");
        outputs.push(run.all());
    }
    // The billing token may encrypt under billing but not decrypt patients.
    let billing_token = Auth::Env(other_token.clone());
    cipherctl(addr, &billing_token, &["encrypt", "billing", "x"], None)
        .await
        .success();
    let run = cipherctl(addr, &billing_token, &["decrypt", "patients", &ct], None)
        .await
        .failure("PERMISSION_DENIED");
    outputs.push(run.all());

    // Revocation takes effect at once.
    let run = cipherctl(addr, &root, &["token", "revoke", &accessor], None)
        .await
        .success();
    assert_eq!(run.out(), format!("revoked: {accessor}\n"));
    outputs.push(run.all());
    let run = cipherctl(addr, &clinician, &["decrypt", "patients", &ct], None)
        .await
        .failure("UNAUTHENTICATED");
    outputs.push(run.all());
    let v = cipherctl(addr, &root, &["--json", "token", "list"], None)
        .await
        .success()
        .json();
    assert!(
        !v["tokens"]
            .as_array()
            .expect("tokens")
            .iter()
            .any(|t| t["accessor"] == accessor.as_str()),
        "{v}"
    );
    // A deleted policy takes what it allowed with it.
    let run = cipherctl(addr, &root, &["policy", "delete", "billing"], None)
        .await
        .success();
    assert_eq!(run.out(), "deleted: billing\n");
    let run = cipherctl(addr, &billing_token, &["encrypt", "billing", "x"], None)
        .await
        .failure("PERMISSION_DENIED");
    outputs.push(run.all());
    let run = cipherctl(addr, &root, &["policy", "read", "billing"], None).await;
    assert_eq!(run.code, 1, "a deleted policy is gone: {}", run.out());

    for output in &outputs {
        assert!(
            !output.contains(&token) && !output.contains(&other_token),
            "a token secret leaked: {output}"
        );
    }
}

/// `--purpose` and `--reason` on decrypt, rewrap and datakey, single and
/// `--lines`: a rule limited to `treatment`, and a break-glass rule that needs
/// `emergency` with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purpose_of_use_and_break_glass() {
    let server = TestServer::dev().await;
    let addr = server.endpoint();
    let addr = addr.as_str();
    let root = root(&server);

    cipherctl(addr, &root, &["key", "create", "patients"], None)
        .await
        .success();
    let ct = one_line(
        &cipherctl(addr, &root, &["encrypt", "patients", "v"], None)
            .await
            .success(),
    );
    let policy = "\
[[rule]]
keys = [\"patients\"]
operations = [\"decrypt\", \"rewrap\", \"datakey\"]
purposes = [\"treatment\"]

[[rule]]
keys = [\"patients\"]
operations = [\"encrypt\"]

[[rule]]
keys = [\"patients\"]
operations = [\"decrypt\"]
break_glass = true
";
    cipherctl(
        addr,
        &root,
        &["policy", "write", "ward", "-"],
        Some(policy.as_bytes()),
    )
    .await
    .success();
    let v = cipherctl(
        addr,
        &root,
        &[
            "--json", "token", "create", "--policy", "ward", "--ttl", "10m",
        ],
        None,
    )
    .await
    .success()
    .json();
    let ward = Auth::Env(v["token"].as_str().expect("token").to_owned());

    // decrypt: only with a purpose a rule lists, or break-glass with a reason.
    for extra in [
        &[][..],
        &["--purpose", "research"],
        &["--purpose", "emergency"],
    ] {
        let mut args = vec!["decrypt", "patients", ct.as_str()];
        args.extend_from_slice(extra);
        cipherctl(addr, &ward, &args, None)
            .await
            .failure("PERMISSION_DENIED");
    }
    for extra in [
        &["--purpose", "treatment"][..],
        &[
            "--purpose",
            "emergency",
            "--reason",
            "unconscious in ER bed 4",
        ],
    ] {
        let mut args = vec!["decrypt", "patients", ct.as_str()];
        args.extend_from_slice(extra);
        let run = cipherctl(addr, &ward, &args, None).await.success();
        assert_eq!(run.stdout, b"v", "{args:?}");
    }

    // decrypt --lines: the purpose goes with every batch.
    let lines = format!("{ct}\n{ct}\n");
    let run = cipherctl(
        addr,
        &ward,
        &["decrypt", "patients", "--lines", "--purpose", "treatment"],
        Some(lines.as_bytes()),
    )
    .await
    .success();
    assert_eq!(run.out(), "v\nv\n");
    cipherctl(
        addr,
        &ward,
        &["decrypt", "patients", "--lines"],
        Some(lines.as_bytes()),
    )
    .await
    .failure("PERMISSION_DENIED");

    // rewrap, single and --lines.
    cipherctl(addr, &root, &["key", "rotate", "patients"], None)
        .await
        .success();
    cipherctl(addr, &ward, &["rewrap", "patients", &ct], None)
        .await
        .failure("PERMISSION_DENIED");
    let run = cipherctl(
        addr,
        &ward,
        &["rewrap", "patients", &ct, "--purpose", "treatment"],
        None,
    )
    .await
    .success();
    assert!(one_line(&run).starts_with("cipherd:v2:"), "{}", run.out());
    let run = cipherctl(
        addr,
        &ward,
        &["rewrap", "patients", "--lines", "--purpose", "treatment"],
        Some(lines.as_bytes()),
    )
    .await
    .success();
    assert_eq!(run.out().lines().count(), 2);
    assert!(run.out().lines().all(|l| l.starts_with("cipherd:v2:")));
    cipherctl(
        addr,
        &ward,
        &["rewrap", "patients", "--lines", "--purpose", "payment"],
        Some(lines.as_bytes()),
    )
    .await
    .failure("PERMISSION_DENIED");

    // datakey.
    cipherctl(addr, &ward, &["datakey", "patients"], None)
        .await
        .failure("PERMISSION_DENIED");
    let v = cipherctl(
        addr,
        &ward,
        &["--json", "datakey", "patients", "--purpose", "treatment"],
        None,
    )
    .await
    .success()
    .json();
    assert!(
        v["ciphertext"]
            .as_str()
            .expect("wrapped")
            .starts_with("cipherd:v2:")
    );
}

/// `role write/read/list/delete`, human and JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_round_trip() {
    let server = TestServer::dev().await;
    let addr = server.endpoint();
    let addr = addr.as_str();
    let root = root(&server);
    cipherctl(
        addr,
        &root,
        &["policy", "write", "clinician", "-"],
        Some(CLINICIAN.as_bytes()),
    )
    .await
    .success();

    let run = cipherctl(
        addr,
        &root,
        &[
            "role",
            "write",
            "ehr",
            "--principal",
            "spiffe://hospital/ns/ehr/*",
            "--principal",
            "ehr-batch.hospital.internal",
            "--group",
            "nurses",
            "--policy",
            "clinician",
        ],
        None,
    )
    .await
    .success();
    assert_eq!(run.field("name").as_deref(), Some("ehr"));
    assert_eq!(
        run.field("principals").as_deref(),
        Some("spiffe://hospital/ns/ehr/*, ehr-batch.hospital.internal")
    );

    let v = cipherctl(addr, &root, &["--json", "role", "read", "ehr"], None)
        .await
        .success()
        .json();
    assert_eq!(
        v,
        serde_json::json!({
            "name": "ehr",
            "principals": ["spiffe://hospital/ns/ehr/*", "ehr-batch.hospital.internal"],
            "groups": ["nurses"],
            "policies": ["clinician"],
        })
    );
    // Writing again replaces.
    cipherctl(
        addr,
        &root,
        &[
            "role",
            "write",
            "ehr",
            "--group",
            "doctors",
            "--policy",
            "clinician",
        ],
        None,
    )
    .await
    .success();
    let v = cipherctl(addr, &root, &["--json", "role", "list"], None)
        .await
        .success()
        .json();
    let roles = v["roles"].as_array().expect("roles");
    let ehr = roles
        .iter()
        .find(|r| r["name"] == "ehr")
        .expect("ehr listed");
    assert_eq!(ehr["groups"], serde_json::json!(["doctors"]));
    assert_eq!(ehr["principals"], serde_json::json!([]));
    let run = cipherctl(addr, &root, &["role", "list"], None)
        .await
        .success();
    assert!(run.out().starts_with("NAME"), "{}", run.out());

    let run = cipherctl(addr, &root, &["role", "delete", "ehr"], None)
        .await
        .success();
    assert_eq!(run.out(), "deleted: ehr\n");
    let run = cipherctl(addr, &root, &["role", "read", "ehr"], None).await;
    assert_eq!(run.code, 1, "deleted: {}", run.out());
    // Roles are administration: a token without the right is denied.
    let v = cipherctl(
        addr,
        &root,
        &["--json", "token", "create", "--policy", "clinician"],
        None,
    )
    .await
    .success()
    .json();
    let clinician = Auth::Env(v["token"].as_str().expect("token").to_owned());
    cipherctl(addr, &clinician, &["role", "list"], None)
        .await
        .failure("PERMISSION_DENIED");
}

/// `init` prints the root token once with the shares (JSON and human) and says
/// to store and later revoke it; the token then works and nothing else does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_prints_the_root_token_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = TestServer::start(Params::for_data_dir(dir.path(), false)).await;
    let addr = server.endpoint();
    let addr = addr.as_str();

    let run = cipherctl(
        addr,
        &Auth::None,
        &["--json", "init", "--shares", "1", "--threshold", "1"],
        None,
    )
    .await
    .success();
    let v = run.json();
    let root_token = v["root_token"].as_str().expect("root_token").to_owned();
    assert!(!root_token.is_empty());
    let share = v["shares"][0].as_str().expect("share").to_owned();
    assert!(
        run.stderr.contains("root token") && run.stderr.contains("revoke"),
        "{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains(&root_token),
        "the warning never repeats it"
    );

    cipherctl(addr, &Auth::None, &["unseal", &share], None)
        .await
        .success();
    cipherctl(addr, &Auth::None, &["key", "list"], None)
        .await
        .failure("UNAUTHENTICATED");
    let root = Auth::Env(root_token.clone());
    cipherctl(addr, &root, &["key", "create", "k"], None)
        .await
        .success();
    let run = cipherctl(addr, &root, &["key", "list"], None)
        .await
        .success();
    assert_eq!(run.out(), "k\n");
    let me = cipherctl(addr, &root, &["--json", "token", "lookup"], None)
        .await
        .success();
    assert!(!me.all().contains(&root_token));
    assert!(
        me.json()["policies"]
            .as_array()
            .expect("policies")
            .iter()
            .any(|p| p == "root")
    );

    // Human form on another fresh server: a `root token:` row after the shares.
    let dir = tempfile::tempdir().expect("temp dir");
    let server = TestServer::start(Params::for_data_dir(dir.path(), false)).await;
    let run = cipherctl(
        &server.endpoint(),
        &Auth::None,
        &["init", "--shares", "3", "--threshold", "2"],
        None,
    )
    .await
    .success();
    let out = run.out();
    let labels: Vec<&str> = out
        .lines()
        .map(|l| l.split_once(':').expect("label: value").0)
        .collect();
    assert_eq!(
        labels,
        [
            "unseal share 1",
            "unseal share 2",
            "unseal share 3",
            "root token"
        ]
    );
    assert!(!run.field("root token").expect("row").is_empty());
}

/// Credentials that are wrong are refused, and never echoed: a forged token,
/// one a header cannot carry, a missing token file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_are_refused_without_echo() {
    let server = TestServer::dev().await;
    let addr = server.endpoint();
    let addr = addr.as_str();

    let forged = "cipherd-forged-token-0123456789";
    let run = cipherctl(addr, &Auth::Env(forged.into()), &["key", "list"], None)
        .await
        .failure("UNAUTHENTICATED");
    assert!(!run.all().contains(forged), "{}", run.all());

    // Refused before any call: a header cannot carry it.
    let spaced = "forged token with spaces";
    let run = cipherctl(addr, &Auth::Env(spaced.into()), &["key", "list"], None)
        .await
        .failure("INVALID_TOKEN");
    assert!(!run.all().contains(spaced), "{}", run.all());

    let missing = server.data_dir.join("no-such-token-file");
    cipherctl(addr, &Auth::File(missing), &["key", "list"], None)
        .await
        .failure("IO");

    // A file holding the forged token, with comment lines, behaves as the env var.
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    writeln!(file, "# not a real token\n{forged}").expect("write");
    let run = cipherctl(
        addr,
        &Auth::File(file.path().to_owned()),
        &["key", "list"],
        None,
    )
    .await
    .failure("UNAUTHENTICATED");
    assert!(!run.all().contains(forged), "{}", run.all());
}
