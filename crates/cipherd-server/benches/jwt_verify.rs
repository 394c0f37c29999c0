//! `JwtVerifier::verify` per algorithm: what a JWT-authenticated request pays
//! on top of a token one. `first/*` is a token's first verification (header,
//! key choice, signature, claims); `remembered/*` a token seen before (SHA-256
//! lookup and the `exp` check), the usual case for a client that reuses its
//! access token.
//!
//! Run: `cargo bench -p cipherd-server --bench jwt_verify`.

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use cipherd_server::auth::jwt::{JwtParams, JwtVerifier};
use cipherd_test_support::jwt::{JwtAlg, TestIssuer};
use criterion::{Criterion, criterion_group, criterion_main};

/// Distinct tokens per algorithm for the first-verification runs; a fresh
/// verifier (untimed) starts each pass over them.
const POOL: usize = 500;

fn verify_bench(c: &mut Criterion) {
    let issuer = TestIssuer::new();
    let params = JwtParams {
        jwks_file: issuer.jwks_path().to_owned(),
        issuer: issuer.issuer.clone(),
        audience: vec![issuer.audience.clone()],
        principal_claim: "sub".into(),
        groups_claim: "groups".into(),
        clock_skew: Duration::from_secs(60),
    };
    let fresh = || JwtVerifier::new(&params).expect("JWKS loads");
    let mut group = c.benchmark_group("jwt_verify");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    for alg in [JwtAlg::RS256, JwtAlg::ES256, JwtAlg::EdDSA] {
        let pool: Vec<String> = (0..POOL)
            .map(|i| issuer.token(alg, &format!("user-{i}")))
            .collect();
        group.bench_function(format!("first/{}", alg.as_str()), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut done = 0u64;
                while done < iters {
                    let verifier = fresh();
                    let n = (iters - done).min(POOL as u64) as usize;
                    let started = Instant::now();
                    for token in &pool[..n] {
                        black_box(verifier.verify(black_box(token)).expect("valid"));
                    }
                    total += started.elapsed();
                    done += n as u64;
                }
                total
            })
        });
        let verifier = fresh();
        let token = &pool[0];
        verifier.verify(token).expect("valid");
        group.bench_function(format!("remembered/{}", alg.as_str()), |b| {
            b.iter(|| verifier.verify(black_box(token)).expect("valid"))
        });
    }
    group.finish();
}

criterion_group!(benches, verify_bench);
criterion_main!(benches);
