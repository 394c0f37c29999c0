//! Key lookup on the request path: `KeyManager::get` with 1 and with 100,000 cached
//! keys (name parsing, cache lookup, `Arc` clone). The target is that p99
//! latency with 100,000 keys stays within 20% of the one-key case; this measures
//! the part of a request that depends on the number of keys.
//!
//! Run: `cargo bench -p cipherd-server --bench key_lookup`.

use std::{hint::black_box, sync::Arc, time::Duration};

use cipherd_core::{
    barrier::{Barrier, RootKey},
    keyring::{CreateOptions, KeyName},
    secret::Derivation,
};
use cipherd_server::{Params, keys::KeyManager};
use cipherd_store::{SqliteStore, Store};
use criterion::{Criterion, criterion_group, criterion_main};

fn key_lookup(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut group = c.benchmark_group("key_lookup");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    for count in [1usize, 100_000] {
        let (manager, names) = runtime.block_on(populate(count));
        let mut i = 0usize;
        group.bench_function(format!("get/{count}_keys"), |b| {
            b.iter(|| {
                i = (i + 7919) % names.len();
                let name = KeyName::new(black_box(&names[i])).expect("valid name");
                let key = runtime.block_on(manager.get(&name)).expect("cached key");
                black_box(key);
            });
        });
    }
    group.finish();
}

async fn populate(count: usize) -> (KeyManager, Vec<String>) {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().await.expect("store"));
    let root = RootKey::generate().expect("root key");
    let barrier = Arc::new(Barrier::new(&root, 1, Derivation::V2).expect("barrier"));
    let manager = KeyManager::new(store, barrier, Params::for_data_dir("unused", false).usage);
    let names: Vec<String> = (0..count).map(|i| format!("tenant-{i:06}")).collect();
    for name in &names {
        let name = KeyName::new(name).expect("valid name");
        manager
            .create(&name, CreateOptions::default())
            .await
            .expect("create");
    }
    (manager, names)
}

criterion_group!(benches, key_lookup);
criterion_main!(benches);
