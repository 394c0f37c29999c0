//! Tests of the audit sinks: chains across restarts and rotation, torn lines,
//! group commit, fail-closed writing and recovery, configuration.

use std::{
    io,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use cipherd_core::audit_chain::{self, ChainHead, Problem};
use serde_json::Value;

use super::{sink::ChainState, *};

/// An in-memory sink whose writes can fail, whole or after some bytes.
#[derive(Debug, Default)]
pub struct MemorySink {
    pub data: Vec<u8>,
    /// Fail writes: `Some(n)` writes at most `n` more bytes, then fails.
    pub fail_after: Option<usize>,
    /// Each write sleeps this long (to let records queue up).
    pub delay: Duration,
    pub writes: usize,
}

impl MemorySink {
    pub(crate) fn write(&mut self, bytes: &[u8]) -> (usize, io::Result<()>) {
        std::thread::sleep(self.delay);
        self.writes += 1;
        match self.fail_after {
            None => {
                self.data.extend_from_slice(bytes);
                (bytes.len(), Ok(()))
            }
            Some(n) => {
                let n = n.min(bytes.len());
                self.data.extend_from_slice(&bytes[..n]);
                self.fail_after = Some(0);
                (n, Err(io::Error::from_raw_os_error(28))) // ENOSPC
            }
        }
    }
}

/// A [`MemorySink`] shared with the sink's thread; equal by identity.
#[derive(Debug, Clone)]
pub struct MemoryHandle(pub Arc<Mutex<MemorySink>>);

impl PartialEq for MemoryHandle {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for MemoryHandle {}

fn call(key: &str) -> AuditRecord {
    let mut r = AuditRecord::new("call", SystemTime::now());
    r.rpc = "/cipherd.v1.TransitService/Encrypt".into();
    r.request_id = "req-1".into();
    r.operation = "encrypt";
    r.key = Some(key.to_owned());
    r.items = Some(ItemCounts {
        total: 1,
        ok: 1,
        failed: 0,
    });
    r.latency_us = 17;
    r
}

fn lines(bytes: &[u8]) -> Vec<Value> {
    bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("every line is JSON"))
        .collect()
}

fn verify_files(paths: &[&Path]) -> Result<audit_chain::Summary, audit_chain::ChainError> {
    let data: Vec<(String, Vec<u8>)> = paths
        .iter()
        .map(|p| (p.display().to_string(), std::fs::read(p).expect("read log")))
        .collect();
    audit_chain::verify(data.iter().map(|(n, d)| (n.as_str(), &d[..])))
}

fn memory(sink: &Arc<Mutex<MemorySink>>) -> AuditParams {
    AuditParams {
        sinks: vec![SinkParams::Memory(MemoryHandle(sink.clone()))],
    }
}

#[tokio::test]
async fn records_are_chained_json_lines_with_seq_and_prev_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.log");
    let auditor = Auditor::open(&AuditParams::file(&path))
        .await
        .expect("open");
    auditor.ready().expect("ready");
    auditor.record(call("patients")).await.expect("recorded");
    auditor.close().await;
    assert!(auditor.ready().is_err(), "closed");
    let text = std::fs::read_to_string(&path).expect("read");
    for line in text.lines() {
        assert!(line.starts_with(r#"{"seq":"#), "{line}");
        assert!(line[..40].contains(r#","prev":""#), "{line}");
    }
    let l = lines(text.as_bytes());
    assert_eq!(l.len(), 3);
    assert_eq!(l[0]["kind"], "start");
    assert_eq!(l[0]["sink"], "file");
    assert_eq!(l[0]["sync"], "full");
    assert_eq!(l[0]["chain"], "new");
    assert_eq!(l[1]["kind"], "call");
    assert_eq!(l[1]["key"], "patients");
    assert_eq!(l[1]["items"]["ok"], 1);
    assert_eq!(l[1]["outcome"]["code"], "OK");
    let time = l[1]["time"].as_str().expect("time");
    assert!(time.ends_with('Z') && time.len() == 27, "{time}");
    assert_eq!(l[2]["kind"], "stop");
    let s = verify_files(&[&path]).expect("intact");
    assert_eq!((s.lines, s.first_seq, s.last_seq), (3, Some(0), Some(2)));
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test]
async fn the_chain_continues_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.log");
    for round in 0..3 {
        let auditor = Auditor::open(&AuditParams::file(&path))
            .await
            .expect("open");
        for i in 0..2 {
            auditor
                .record(call(&format!("k{round}-{i}")))
                .await
                .expect("recorded");
        }
        if round == 1 {
            // Dropped without close: the thread still writes its stop record.
            drop(auditor);
            wait_for(|| {
                std::fs::read_to_string(&path).is_ok_and(|t| {
                    t.lines().filter(|l| l.contains(r#""kind":"stop""#)).count() == 2
                })
            })
            .await;
        } else {
            auditor.close().await;
        }
    }
    let s = verify_files(&[&path]).expect("intact across restarts");
    assert_eq!((s.lines, s.starts, s.last_seq), (12, 3, Some(11)));
    let l = lines(&std::fs::read(&path).expect("read"));
    assert_eq!(l[4]["kind"], "start");
    assert_eq!(l[4]["chain"], "continued");
}

async fn wait_for(mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached in 5 s");
}

#[tokio::test]
async fn rotation_continues_the_chain_in_the_new_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.log");
    let rotated = dir.path().join("audit.log.1");
    let auditor = Auditor::open(&AuditParams::file(&path))
        .await
        .expect("open");
    auditor.record(call("a")).await.expect("recorded");
    // Reopening the same file changes nothing.
    auditor.reopen().await;
    auditor.record(call("b")).await.expect("recorded");
    std::fs::rename(&path, &rotated).expect("rotate");
    // Until the reopen, records still go to the renamed file.
    auditor.record(call("c")).await.expect("recorded");
    auditor.reopen().await;
    auditor.record(call("d")).await.expect("recorded");
    auditor.close().await;

    let old = lines(&std::fs::read(&rotated).expect("read"));
    assert_eq!(old.len(), 4, "start, a, b, c");
    let new = lines(&std::fs::read(&path).expect("read"));
    assert_eq!(new[0]["kind"], "reopen");
    assert_eq!(new[0]["seq"], 4);
    assert_eq!(new[1]["key"], "d");
    let s = verify_files(&[&rotated, &path]).expect("series intact");
    assert_eq!((s.lines, s.files, s.starts_mid_chain), (7, 2, false));
    let s = verify_files(&[&path]).expect("the new file alone");
    assert!(s.starts_mid_chain);
}

#[tokio::test]
async fn sighup_reopens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.log");
    let rotated = dir.path().join("audit.log.1");
    let auditor = Auditor::open(&AuditParams::file(&path))
        .await
        .expect("open");
    let task = auditor.spawn_reopen_on_sighup().expect("listener");
    std::fs::rename(&path, &rotated).expect("rotate");
    rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::HUP)
        .expect("SIGHUP");
    wait_for(|| path.exists()).await;
    auditor.record(call("after")).await.expect("recorded");
    auditor.close().await;
    verify_files(&[&rotated, &path]).expect("series intact");
    drop(auditor);
    task.abort();
}

#[tokio::test]
async fn a_torn_last_line_is_terminated_and_declared() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.log");
    let auditor = Auditor::open(&AuditParams::file(&path))
        .await
        .expect("open");
    auditor.record(call("a")).await.expect("recorded");
    auditor.close().await;
    // A crash in the middle of a write.
    let fragment = br#"{"seq":3,"prev":"0123"#;
    let mut bytes = std::fs::read(&path).expect("read");
    bytes.extend_from_slice(fragment);
    std::fs::write(&path, &bytes).expect("write");
    let s = verify_files(&[&path]).expect("an unrecovered torn tail verifies");
    assert_eq!(s.torn.len(), 1);

    let auditor = Auditor::open(&AuditParams::file(&path))
        .await
        .expect("reopen");
    auditor.record(call("b")).await.expect("recorded");
    auditor.close().await;
    let s = verify_files(&[&path]).expect("recovered");
    assert_eq!(s.torn.len(), 1);
    assert_eq!(s.torn[0].bytes, fragment.len() as u64);
    assert_eq!(s.last_seq, Some(5));
    let text = std::fs::read_to_string(&path).expect("read");
    let start = text.lines().nth(4).expect("line 5");
    let start: Value = serde_json::from_str(start).expect("json");
    assert_eq!(start["kind"], "start");
    assert_eq!(start["torn_bytes"], fragment.len());
    assert_eq!(start["chain"], "continued");
}

#[tokio::test]
async fn a_last_line_longer_than_the_first_read_is_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.log");
    let auditor = Auditor::open(&AuditParams::file(&path))
        .await
        .expect("open");
    let mut big = call("big");
    big.references = (0..5000).map(|i| format!("hmac-sha256:{i:064x}")).collect();
    auditor.record(big).await.expect("recorded");
    // Dropped without a stop record, so the 400 KB line is the last one.
    drop(auditor);
    wait_for(|| std::fs::read_to_string(&path).is_ok_and(|t| t.contains(r#""kind":"stop""#))).await;
    let text = std::fs::read_to_string(&path).expect("read");
    let without_stop: String = text.lines().take(2).map(|l| format!("{l}\n")).collect();
    assert!(without_stop.len() > 256 << 10);
    std::fs::write(&path, &without_stop).expect("write");
    let auditor = Auditor::open(&AuditParams::file(&path))
        .await
        .expect("reopen");
    auditor.close().await;
    let s = verify_files(&[&path]).expect("the chain continued after the long line");
    assert_eq!((s.lines, s.starts), (4, 2));
}

#[tokio::test]
async fn a_complete_last_line_without_newline_is_continued() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.log");
    let auditor = Auditor::open(&AuditParams::file(&path))
        .await
        .expect("open");
    auditor.close().await;
    let mut bytes = std::fs::read(&path).expect("read");
    bytes.pop();
    std::fs::write(&path, &bytes).expect("write");
    let auditor = Auditor::open(&AuditParams::file(&path))
        .await
        .expect("reopen");
    auditor.close().await;
    let s = verify_files(&[&path]).expect("intact");
    assert_eq!((s.lines, s.torn.len()), (4, 0));
}

#[tokio::test]
async fn a_file_not_ending_in_a_record_gets_a_new_chain_and_verify_says_where() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.log");
    std::fs::write(&path, "not an audit line\n").expect("write");
    let auditor = Auditor::open(&AuditParams::file(&path))
        .await
        .expect("open");
    auditor.record(call("a")).await.expect("recorded");
    auditor.close().await;
    let text = std::fs::read_to_string(&path).expect("read");
    let start: Value = serde_json::from_str(text.lines().nth(1).expect("line 2")).expect("json");
    assert_eq!(start["seq"], 0);
    assert!(
        start["note"]
            .as_str()
            .expect("note")
            .contains("not an audit record")
    );
    let err = verify_files(&[&path]).expect_err("foreign line");
    assert_eq!(err.line, 1);
    assert!(matches!(err.problem, Problem::NotARecord(_)));
}

#[tokio::test]
async fn group_commit_answers_every_waiter_with_few_writes() {
    let mem = Arc::new(Mutex::new(MemorySink {
        delay: Duration::from_millis(20),
        ..MemorySink::default()
    }));
    let auditor = Auditor::open(&memory(&mem)).await.expect("open");
    let futures: Vec<_> = (0..256)
        .map(|i| auditor.record(call(&format!("k{i}"))))
        .collect();
    let results = futures_join(futures).await;
    assert!(
        results.iter().all(Result::is_ok),
        "every waiter answered Ok"
    );
    auditor.close().await;
    let m = mem.lock().expect("lock");
    // start + 256 records + stop, in at most a handful of writes.
    assert!(m.writes <= 8, "{} writes for 256 records", m.writes);
    let s = audit_chain::verify([("memory", &m.data[..])]).expect("intact");
    assert_eq!(s.lines, 258);
    let keys: Vec<String> = lines(&m.data)
        .iter()
        .filter_map(|l| l["key"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(keys.len(), 256);
}

async fn futures_join<F: Future<Output = T>, T>(futures: Vec<F>) -> Vec<T> {
    let mut out = Vec::with_capacity(futures.len());
    for f in futures {
        out.push(f.await);
    }
    out
}

#[tokio::test]
async fn dev_full_starts_but_refuses() {
    let auditor = Auditor::open(&AuditParams::file("/dev/full"))
        .await
        .expect("a sink that opens but cannot be written does not fail start");
    assert!(matches!(auditor.ready(), Err(Error::AuditUnavailable)));
    for _ in 0..3 {
        assert!(matches!(
            auditor.record(call("k")).await,
            Err(Error::AuditUnavailable)
        ));
        assert!(auditor.ready().is_err());
    }
}

#[tokio::test]
async fn an_unopenable_path_fails_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = Auditor::open(&AuditParams::file(dir.path().join("missing/audit.log")))
        .await
        .expect_err("missing directory");
    assert!(err.to_string().contains("missing/audit.log"), "{err}");
    assert!(Auditor::open(&AuditParams::file(dir.path())).await.is_err());
}

#[tokio::test]
async fn a_sink_recovers_when_its_path_becomes_writable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.log");
    let real = dir.path().join("real.log");
    std::os::unix::fs::symlink("/dev/full", &path).expect("symlink");
    let auditor = Auditor::open(&AuditParams::file(&path))
        .await
        .expect("open");
    assert!(auditor.ready().is_err());
    assert!(auditor.record(call("refused")).await.is_err());
    assert!(auditor.ready().is_err());
    // The operator fixes the path; the next record (a refused call's) probes it.
    std::fs::remove_file(&path).expect("unlink");
    std::os::unix::fs::symlink(&real, &path).expect("symlink");
    auditor.record(call("probe")).await.expect("recovered");
    auditor.ready().expect("ready again");
    auditor.record(call("next")).await.expect("recorded");
    auditor.close().await;
    let l = lines(&std::fs::read(&real).expect("read"));
    assert_eq!(l[0]["kind"], "start");
    assert_eq!(l[0]["missed"], 1, "the refused call's record is counted");
    assert_eq!(l[1]["key"], "probe");
    verify_files(&[&real]).expect("intact");
}

#[tokio::test]
async fn a_failing_sink_recovers_with_a_resume_record() {
    let mem = Arc::new(Mutex::new(MemorySink::default()));
    let auditor = Auditor::open(&memory(&mem)).await.expect("open");
    auditor.record(call("a")).await.expect("recorded");
    mem.lock().expect("lock").fail_after = Some(0);
    assert!(auditor.record(call("lost-1")).await.is_err());
    assert!(auditor.ready().is_err());
    assert!(auditor.record(call("lost-2")).await.is_err());
    mem.lock().expect("lock").fail_after = None;
    auditor.record(call("b")).await.expect("recovered");
    auditor.ready().expect("ready");
    auditor.close().await;
    let m = mem.lock().expect("lock");
    let l = lines(&m.data);
    let kinds: Vec<&str> = l
        .iter()
        .map(|l| l["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(kinds, ["start", "call", "resume", "call", "stop"]);
    assert_eq!(l[2]["missed"], 2);
    audit_chain::verify([("memory", &m.data[..])]).expect("intact");
}

#[tokio::test]
async fn a_partial_write_leaves_a_declared_torn_line() {
    let mem = Arc::new(Mutex::new(MemorySink::default()));
    let auditor = Auditor::open(&memory(&mem)).await.expect("open");
    mem.lock().expect("lock").fail_after = Some(30);
    assert!(auditor.record(call("torn")).await.is_err());
    mem.lock().expect("lock").fail_after = None;
    auditor.record(call("b")).await.expect("recovered");
    auditor.close().await;
    let m = mem.lock().expect("lock");
    let s = audit_chain::verify([("memory", &m.data[..])]).expect("intact");
    assert_eq!(s.torn.len(), 1);
    assert_eq!(s.torn[0].bytes, 30);
}

/// Every way a group's write can stop part way leaves a log that verifies once
/// the next group is written, and no whole line is lost from the chain.
#[test]
fn chain_state_settles_every_partial_write() {
    let bodies: Vec<Vec<u8>> = (0..3)
        .map(|i| format!(r#"{{"kind":"call","key":"k{i}"}}"#).into_bytes())
        .collect();
    let note = |state: &ChainState| {
        format!(
            r#"{{"kind":"resume","torn_bytes":{}}}"#,
            state
                .torn_to_declare()
                .map_or("null".into(), |t| t.to_string())
        )
    };
    let mut first = ChainState::new(ChainHead::GENESIS);
    let len = first.build(None, bodies.iter().map(|b| &b[..])).len();
    for cut in 0..=len {
        for second_cut in [None, Some(0), Some(5), Some(200)] {
            let mut state = ChainState::new(ChainHead::GENESIS);
            let mut log = Vec::new();
            let bytes = state.build(None, bodies.iter().map(|b| &b[..])).to_vec();
            log.extend_from_slice(&bytes[..cut]);
            state.settle(cut, cut == len);
            if let Some(c) = second_cut {
                // A second failure before recovery.
                let n = note(&state);
                let bytes = state
                    .build(Some(n.as_bytes()), bodies.iter().map(|b| &b[..]))
                    .to_vec();
                let c = c.min(bytes.len() - 1);
                log.extend_from_slice(&bytes[..c]);
                state.settle(c, false);
            }
            let lifecycle = note(&state);
            let bytes = state
                .build(Some(lifecycle.as_bytes()), bodies.iter().map(|b| &b[..]))
                .to_vec();
            log.extend_from_slice(&bytes);
            state.settle(bytes.len(), true);
            let s = audit_chain::verify([("log", &log[..])]).unwrap_or_else(|e| {
                panic!(
                    "cut {cut}, then {second_cut:?}: {e}\n{}",
                    String::from_utf8_lossy(&log)
                )
            });
            assert!(s.lines >= 4, "cut {cut}: {s}");
        }
    }
}

#[tokio::test]
async fn stdout_sink_opens() {
    let auditor = Auditor::open(&AuditParams {
        sinks: vec![SinkParams::Stdout],
    })
    .await
    .expect("open");
    auditor
        .ready()
        .expect("stdout is writable under the test harness");
}

#[test]
fn audit_tables_deserialize_through_the_config_layers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        r#"
[[audit]]
type = "file"
path = "/var/log/cipherd/audit.log"

[[audit]]
type = "file"
path = "/var/log/cipherd/fast.log"
sync = "none"

[[audit]]
type = "stdout"
"#,
    )
    .expect("write");
    let raw = crate::config::RawConfig::load(Some(&file), &[]).expect("load");
    let params = AuditParams::from_raw(&raw.audit, false, &raw.data_dir).expect("valid");
    assert_eq!(
        params.sinks,
        [
            SinkParams::File {
                path: "/var/log/cipherd/audit.log".into(),
                sync: SyncMode::Full
            },
            SinkParams::File {
                path: "/var/log/cipherd/fast.log".into(),
                sync: SyncMode::None
            },
            SinkParams::Stdout,
        ]
    );

    for (toml, named) in [
        (
            "[[audit]]\ntype = \"file\"\npath = \"a\"\nsync = \"fast\"\n",
            "audit[0].sync",
        ),
        ("[[audit]]\ntype = \"file\"\npath = \"\"\n", "audit[0].path"),
        (
            "[[audit]]\ntype = \"stdout\"\n[[audit]]\ntype = \"stdout\"\n",
            "audit[1] repeats",
        ),
    ] {
        std::fs::write(&file, toml).expect("write");
        let raw = crate::config::RawConfig::load(Some(&file), &[]).expect("load");
        let err = AuditParams::from_raw(&raw.audit, false, &raw.data_dir)
            .expect_err(named)
            .to_string();
        assert!(err.contains(named), "{toml}: {err}");
    }
    // Unknown keys and types are refused by the loader.
    for toml in [
        "[[audit]]\ntype = \"file\"\npath = \"a\"\nfsync = true\n",
        "[[audit]]\ntype = \"syslog\"\n",
        "[[audit]]\ntype = \"file\"\n",
    ] {
        std::fs::write(&file, toml).expect("write");
        assert!(
            crate::config::RawConfig::load(Some(&file), &[]).is_err(),
            "{toml}"
        );
    }
}

#[test]
fn without_a_table_dev_audits_to_the_data_dir_and_production_refuses() {
    let dev = AuditParams::from_raw(&[], true, Path::new("/data")).expect("dev");
    assert_eq!(dev, AuditParams::file("/data/audit.log"));
    let err = AuditParams::from_raw(&[], false, Path::new("/data"))
        .expect_err("non-dev")
        .to_string();
    assert!(
        err.contains("at least one [[audit]] sink is required; calls are refused without one"),
        "{err}"
    );
}

#[test]
fn audit_tables_can_come_from_environment_variables() {
    #[derive(Debug, serde::Deserialize)]
    struct Only {
        #[serde(default, deserialize_with = "deserialize_sinks")]
        audit: Vec<RawAuditSink>,
    }
    let env: std::collections::HashMap<String, String> = [
        ("CIPHERD_SERVER_AUDIT__1__TYPE", "stdout"),
        ("CIPHERD_SERVER_AUDIT__0__TYPE", "file"),
        ("CIPHERD_SERVER_AUDIT__0__PATH", "/var/log/a.log"),
        ("CIPHERD_SERVER_AUDIT__0__SYNC", "none"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    // The same Environment source settings as RawConfig::load.
    let load = |env: std::collections::HashMap<String, String>| {
        config::Config::builder()
            .add_source(
                config::Environment::with_prefix(crate::config::ENV_PREFIX)
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(env)),
            )
            .build()
            .and_then(|c| c.try_deserialize::<Only>())
    };
    let only = load(env).expect("deserializes");
    let params = AuditParams::from_raw(&only.audit, false, Path::new("/d")).expect("valid");
    assert_eq!(
        params.sinks,
        [
            SinkParams::File {
                path: "/var/log/a.log".into(),
                sync: SyncMode::None
            },
            SinkParams::Stdout
        ]
    );
    let bad = [(
        "CIPHERD_SERVER_AUDIT__X__TYPE".to_owned(),
        "stdout".to_owned(),
    )];
    let err = load(bad.into_iter().collect()).expect_err("not an index");
    assert!(err.to_string().contains("expected an index"), "{err}");
}
