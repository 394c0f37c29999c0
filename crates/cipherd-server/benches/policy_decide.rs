//! `auth::policy::decide` on the request path: a caller with three policies of
//! 20 rules each (globs and exact names), for an allowed call matched by the
//! last rule, a denied call (every rule examined), and a break-glass call.
//!
//! Run: `cargo bench -p cipherd-server --bench policy_decide`.

use std::{fmt::Write as _, hint::black_box, time::Duration};

use cipherd_server::auth::policy::{Access, Decision, Operation, Policy, decide};
use criterion::{Criterion, criterion_group, criterion_main};

fn policy(name: &str, prefix: &str) -> Policy {
    let mut doc = String::new();
    for i in 0..19 {
        writeln!(
            doc,
            "[[rule]]\nkeys = [\"{prefix}-{i}\", \"{prefix}-{i}-*\", \"*-{prefix}-{i}\"]\n\
             operations = [\"decrypt\", \"datakey\"]\npurposes = [\"treatment\"]\n"
        )
        .expect("write to String");
    }
    writeln!(
        doc,
        "[[rule]]\nkeys = [\"{prefix}-last-*\"]\noperations = [\"decrypt\"]\nbreak_glass = true\n"
    )
    .expect("write to String");
    Policy::parse(name, &doc).expect("valid policy")
}

fn decide_bench(c: &mut Criterion) {
    let policies = [
        policy("a", "alpha"),
        policy("b", "beta"),
        policy("c", "gamma"),
    ];
    let refs: Vec<&Policy> = policies.iter().collect();
    let mut group = c.benchmark_group("decide");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    let cases = [
        (
            "allow_last_rule",
            "gamma-18-x",
            Some("treatment"),
            None,
            Decision::Allow { break_glass: false },
        ),
        (
            "deny_all_rules",
            "delta-1",
            Some("treatment"),
            None,
            Decision::Deny,
        ),
        (
            "break_glass",
            "gamma-last-1",
            Some("emergency"),
            Some("ER"),
            Decision::Allow { break_glass: true },
        ),
    ];
    for (name, key, purpose, reason, expected) in cases {
        let access = Access {
            operation: Operation::Decrypt,
            key: Some(key),
            purpose,
            reason,
        };
        assert_eq!(decide(&refs, &access), expected, "{name}");
        group.bench_function(name, |b| {
            b.iter(|| decide(black_box(&refs), black_box(&access)))
        });
    }
    group.finish();
}

criterion_group!(benches, decide_bench);
criterion_main!(benches);
