//! `cipherd-propagation`: how long a key rotation made through one replica takes
//! to be used by another replica on the same database.
//!
//! For each of `--rotations` rotations: `RotateKey` through `--rotate`, then
//! encrypt through `--observe` as fast as replies come until the reply's
//! `key_version` is the new version. The time from the rotation's reply to that
//! encryption's reply is one sample (so it includes one encryption round trip,
//! about 0.2 ms here, and excludes the rotation's own latency). Prints the
//! percentiles; `--json` prints one JSON object.
//!
//! ```text
//! cipherd-propagation --rotate 127.0.0.1:8311 --observe 127.0.0.1:8312 \
//!     --token-file data-a/root-token.INSECURE --rotations 100
//! ```
//!
//! `scripts/bench-replicas.sh` starts the replicas and runs this.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use cipherd_client::{Client, ClientOptions, EncryptOptions, pb};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(version, about = "Rotation propagation between two cipherd replicas")]
struct Args {
    /// The replica that rotates, `HOST:PORT`.
    #[arg(long)]
    rotate: String,
    /// The replica that must start encrypting under the new version, `HOST:PORT`.
    #[arg(long)]
    observe: String,
    /// A file holding a token that may create, rotate and encrypt with the key.
    #[arg(long)]
    token_file: std::path::PathBuf,
    /// The key (created if missing).
    #[arg(long, default_value = "propagation")]
    key: String,
    /// Rotations measured.
    #[arg(long, default_value_t = 100)]
    rotations: usize,
    /// Give up on one rotation after this many seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("reading {}", args.token_file.display()))?;
    let options = ClientOptions {
        token: Some(token.trim().into()),
        ..Default::default()
    };
    let rotator = Client::connect_with(format!("http://{}", args.rotate), options.clone()).await?;
    let observer = Client::connect_with(format!("http://{}", args.observe), options).await?;
    let created = rotator
        .admin()
        .create_key(pb::CreateKeyRequest {
            name: args.key.clone(),
            ..Default::default()
        })
        .await;
    match created {
        Ok(_) => {}
        Err(s) if s.code() == tonic::Code::AlreadyExists => {}
        Err(s) => bail!("creating {}: {s}", args.key),
    }
    let plain = EncryptOptions::default();
    let limit = Duration::from_secs_f64(args.timeout);
    let mut samples = Vec::with_capacity(args.rotations);
    let mut polls = 0u64;
    for i in 0..args.rotations {
        let rotated = rotator
            .admin()
            .rotate_key(pb::RotateKeyRequest {
                name: args.key.clone(),
            })
            .await
            .with_context(|| format!("rotation {i}"))?
            .into_inner()
            .key
            .context("RotateKey replied without a key")?;
        let started = Instant::now();
        loop {
            polls += 1;
            let reply = observer.encrypt(&args.key, &b"x"[..], &plain).await?;
            if reply.key_version >= rotated.latest_version {
                samples.push(started.elapsed());
                break;
            }
            if started.elapsed() > limit {
                bail!(
                    "rotation {i}: the observer still encrypts under version {} after {limit:?}",
                    reply.key_version
                );
            }
        }
    }
    samples.sort();
    let pct = |p: f64| {
        let at = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[at].as_secs_f64() * 1e3
    };
    let (p50, p90, p99, max) = (pct(0.50), pct(0.90), pct(0.99), pct(1.0));
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "rotations": samples.len(),
                "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "max_ms": max,
                "observer_encryptions": polls,
            })
        );
    } else {
        println!(
            "{} rotations: p50 {p50:.2} ms, p90 {p90:.2} ms, p99 {p99:.2} ms, max {max:.2} ms \
             ({polls} encryptions on the observer)",
            samples.len()
        );
    }
    Ok(())
}
