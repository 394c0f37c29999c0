//! Runs the store conformance suite against the SQLite backend, in memory and on
//! a file, exactly as any other backend's tests call it.

use std::sync::atomic::{AtomicUsize, Ordering};

use cipherd_store::{SqliteStore, conformance};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_in_memory_conforms() {
    conformance::run(|| async {
        SqliteStore::in_memory()
            .await
            .expect("open in-memory store")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_file_conforms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let counter = AtomicUsize::new(0);
    conformance::run(|| {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let path = dir.path().join(format!("store-{n}.db"));
        async move { SqliteStore::open(&path).await.expect("open file store") }
    })
    .await;
}
