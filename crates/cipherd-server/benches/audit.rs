//! The audit log's cost per call: `Auditor::record` on one file sink, from 32 and
//! from 256 concurrent writers (each awaiting its record before the next, as a
//! request does before its reply), with `sync = "full"` (group-committed
//! fdatasync) and `sync = "none"`; and the serialization of one record alone.
//!
//! Criterion's time per element is the inverse of throughput (records/s). After
//! the criterion groups, a plain pass prints each configuration's records/s and
//! per-record latency percentiles (what a caller waits for its record).
//!
//! The log lives under `CARGO_TARGET_TMPDIR` (the build's disk, where fdatasync
//! is real; /tmp may be tmpfs). Run: `cargo bench -p cipherd-server --bench audit`.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use cipherd_server::audit::{
    AuditParams, AuditRecord, Auditor, ItemCounts, Outcome, SinkParams, SyncMode,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// A typical single-encrypt record: token principal, peer, one version.
fn record() -> AuditRecord {
    let mut r = AuditRecord::new("call", SystemTime::now());
    r.request_id = "7f3c2a9e-1b4d-4c6e-9a8b-2d5f6e7a8b9c".into();
    r.rpc = "/cipherd.v1.TransitService/Encrypt".into();
    r.principal = Some("ehr-api (token 3f9a1c)".into());
    r.auth_method = Some("token");
    r.token_accessor = Some("3f9a1c2b7d4e5f60".into());
    r.policies = vec!["ehr-encrypt".into()];
    r.peer = Some(SocketAddr::from(([10, 1, 2, 3], 51234)));
    r.operation = "encrypt";
    r.key = Some("patients".into());
    r.versions = vec![3];
    r.items = Some(ItemCounts {
        total: 1,
        ok: 1,
        failed: 0,
    });
    r.outcome = Outcome {
        code: "OK",
        reason: None,
    };
    r.latency_us = 17;
    r
}

fn log_path(dir: &std::path::Path, sync: SyncMode) -> PathBuf {
    dir.join(format!("audit-{sync:?}.log"))
}

fn params(dir: &std::path::Path, sync: SyncMode) -> AuditParams {
    AuditParams {
        sinks: vec![SinkParams::File {
            path: log_path(dir, sync),
            sync,
        }],
    }
}

fn bench_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("audit-bench");
    std::fs::create_dir_all(&dir).expect("bench dir");
    dir
}

/// `total` records from `writers` concurrent tasks; returns every latency.
async fn run(auditor: &Auditor, writers: usize, total: u64) -> Vec<Duration> {
    let per = total.div_ceil(writers as u64);
    let mut tasks = Vec::with_capacity(writers);
    for _ in 0..writers {
        let auditor = auditor.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per as usize);
            for _ in 0..per {
                let t = Instant::now();
                auditor.record(record()).await.expect("recorded");
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::with_capacity(total as usize);
    for t in tasks {
        all.extend(t.await.expect("writer"));
    }
    all
}

fn audit(c: &mut Criterion) {
    let dir = bench_dir();
    // Two workers, like the 2-core machine the server is measured on.
    let runtime = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime"),
    );

    let mut g = c.benchmark_group("audit_serialize");
    g.throughput(Throughput::Elements(1));
    let r = record();
    g.bench_function("record_to_json", |b| {
        b.iter(|| std::hint::black_box(r.to_json()))
    });
    g.finish();

    let mut g = c.benchmark_group("audit_record");
    g.measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20);
    for sync in [SyncMode::Full, SyncMode::None] {
        let p = params(&dir, sync);
        let auditor = runtime.block_on(Auditor::open(&p)).expect("open");
        for writers in [32usize, 256] {
            g.throughput(Throughput::Elements(1));
            g.bench_function(
                format!("sync_{sync:?}/{writers}_writers").to_lowercase(),
                |b| {
                    b.iter_custom(|iters| {
                        let w = writers as u64;
                        let written = iters.max(w).div_ceil(w) * w;
                        let start = Instant::now();
                        runtime.block_on(run(&auditor, writers, written));
                        start.elapsed().mul_f64(iters as f64 / written as f64)
                    });
                },
            );
        }
        runtime.block_on(auditor.close());
    }
    g.finish();

    // Records/s and latency percentiles, printed plainly.
    println!("\naudit_record summary (file sink, 2 tokio workers):");
    println!(
        "{:<6} {:>8} {:>12} {:>10} {:>10} {:>10}",
        "sync", "writers", "records/s", "p50 µs", "p99 µs", "max µs"
    );
    for sync in [SyncMode::Full, SyncMode::None] {
        let p = params(&dir, sync);
        let auditor = runtime.block_on(Auditor::open(&p)).expect("open");
        for writers in [32usize, 256] {
            let total = 200_000u64;
            let start = Instant::now();
            let mut lat = runtime.block_on(run(&auditor, writers, total));
            let secs = start.elapsed().as_secs_f64();
            lat.sort_unstable();
            let pct = |q: f64| lat[((lat.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1e6;
            println!(
                "{:<6} {:>8} {:>12.0} {:>10.0} {:>10.0} {:>10.0}",
                format!("{sync:?}").to_lowercase(),
                writers,
                lat.len() as f64 / secs,
                pct(0.5),
                pct(0.99),
                pct(1.0)
            );
        }
        runtime.block_on(auditor.close());
        let _ = std::fs::remove_file(log_path(&dir, sync));
    }
}

criterion_group!(benches, audit);
criterion_main!(benches);
