//! Write measurements for the SQLite store on a real file (in `TMPDIR`, so they
//! measure that disk's fsync). Ignored by default; run them with
//!
//! ```text
//! cargo test --release -p cipherd-store --test group_commit_bench -- --ignored --nocapture --test-threads 1
//! ```
//!
//! `CIPHERD_BENCH_RECORDS` changes how many records the concurrent measurement
//! creates (default 10,000). The crate docs ("Group commit") record results.

use std::sync::Arc;
use std::time::Instant;

use cipherd_store::{SqliteStore, Store};

/// Records the concurrent measurement creates, unless `CIPHERD_BENCH_RECORDS`
/// says otherwise.
const RECORDS: usize = 10_000;

/// Tasks creating them concurrently.
const TASKS: usize = 64;

/// Writes the sequential measurement makes, one after another.
const SEQUENTIAL: usize = 500;

/// Every record's value: the size of a small barrier-encrypted key record.
const VALUE: [u8; 256] = [0xA5; 256];

async fn open_store(dir: &tempfile::TempDir) -> Arc<SqliteStore> {
    Arc::new(
        SqliteStore::open(&dir.path().join("bench.db"))
            .await
            .expect("open"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn create_10k_records_with_64_tasks() {
    let records = std::env::var("CIPHERD_BENCH_RECORDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(RECORDS);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_store(&dir).await;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            for i in (task..records).step_by(TASKS) {
                store
                    .create(&format!("keys/{i:06}"), &VALUE)
                    .await
                    .expect("create");
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let elapsed = start.elapsed();
    let stats = store.write_stats();
    println!(
        "created {records} records with {TASKS} tasks in {:.2} s ({:.0} creates/s); \
         {} commits, largest group {}",
        elapsed.as_secs_f64(),
        records as f64 / elapsed.as_secs_f64(),
        stats.commits,
        stats.largest_group,
    );
    let listed = store.list("keys/", None, records + 1).await.expect("list");
    assert_eq!(listed.len(), records);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn sequential_create_latency() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_store(&dir).await;
    let start = Instant::now();
    for i in 0..SEQUENTIAL {
        store
            .create(&format!("keys/{i:06}"), &VALUE)
            .await
            .expect("create");
    }
    let elapsed = start.elapsed();
    println!(
        "{SEQUENTIAL} sequential creates: {:.2} ms each on average ({} commits)",
        elapsed.as_secs_f64() * 1000.0 / SEQUENTIAL as f64,
        store.write_stats().commits,
    );
}
