//! Measurement: the time window, per-worker counters and latency histograms, and
//! the final [`Report`].
//!
//! Each worker owns a [`WorkerStats`]; they are merged once at the end, so the hot
//! loop never touches shared state. Only requests that complete inside the measured
//! window (after the warm-up, before the end) count.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::args::Args;

/// Latencies are recorded in microseconds, from 1 µs to 10 minutes, to 3
/// significant digits.
const HIST_MAX_US: u64 = 600_000_000;

/// The phases of a run.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Load starts.
    pub start: Instant,
    /// Measuring starts (after the warm-up).
    pub measure_from: Instant,
    /// No new request starts at or after this; measuring ends.
    pub end: Instant,
}

impl Timing {
    /// A run starting now.
    pub fn starting_now(warmup: Duration, duration: Duration) -> Self {
        let start = Instant::now();
        let measure_from = start + warmup;
        Self {
            start,
            measure_from,
            end: measure_from + duration,
        }
    }

    /// The measured window's length.
    pub fn measured(&self) -> Duration {
        self.end - self.measure_from
    }
}

/// What one successful request carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Items answered with a result.
    pub items: u64,
    /// Items answered with a per-item error.
    pub item_errors: u64,
}

impl Outcome {
    /// A single-item request that succeeded.
    pub const ONE: Outcome = Outcome {
        items: 1,
        item_errors: 0,
    };
}

/// One worker's counters.
#[derive(Debug, Clone)]
pub struct WorkerStats {
    hist: Histogram<u64>,
    requests: u64,
    items: u64,
    item_errors: u64,
    request_errors: u64,
    first_error: Option<String>,
}

impl WorkerStats {
    /// Empty counters.
    pub fn new() -> Self {
        Self {
            hist: new_histogram(),
            requests: 0,
            items: 0,
            item_errors: 0,
            request_errors: 0,
            first_error: None,
        }
    }

    /// Records a request that started at `t0` and finished at `t1`.
    pub fn record(
        &mut self,
        timing: &Timing,
        t0: Instant,
        t1: Instant,
        result: Result<Outcome, String>,
    ) {
        let counted = t1 >= timing.measure_from && t1 <= timing.end;
        match result {
            Ok(o) => {
                if counted {
                    self.requests += 1;
                    self.items += o.items;
                    self.item_errors += o.item_errors;
                    let us = t1.saturating_duration_since(t0).as_micros();
                    self.hist
                        .saturating_record(u64::try_from(us).unwrap_or(u64::MAX).max(1));
                }
            }
            Err(e) => {
                if counted {
                    self.request_errors += 1;
                }
                if self.first_error.is_none() {
                    self.first_error = Some(e);
                }
            }
        }
    }

    /// Records an error outside any request (e.g. a stream that could not open).
    pub fn record_error(&mut self, error: String) {
        self.request_errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(error);
        }
    }

    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: WorkerStats) {
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.hist.add(&other.hist);
        self.requests += other.requests;
        self.items += other.items;
        self.item_errors += other.item_errors;
        self.request_errors += other.request_errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    /// The report of a run of `args` over `timing`.
    pub fn report(&self, args: &Args, timing: &Timing) -> Report {
        let secs = timing.measured().as_secs_f64();
        let items_per_sec = self.items as f64 / secs;
        let bytes_per_sec = items_per_sec * args.size as f64;
        let q = |quantile: f64| {
            if self.hist.is_empty() {
                0
            } else {
                self.hist.value_at_quantile(quantile)
            }
        };
        Report {
            target: args.target.name().to_owned(),
            mode: args.mode.name().to_owned(),
            op: args.op.name().to_owned(),
            size: args.size,
            batch: args.batch,
            concurrency: args.concurrency,
            connections: args.connection_count(),
            window: args.window,
            keys: args.keys,
            key_type: args.key_type.name().to_owned(),
            text: args.text,
            tls: args.tls_ca.is_some(),
            rate: args.rate,
            workers: args.workers,
            duration_secs: secs,
            warmup_secs: args.warmup,
            requests: self.requests,
            items: self.items,
            items_per_sec,
            requests_per_sec: self.requests as f64 / secs,
            plaintext_bytes_per_sec: bytes_per_sec,
            mb_per_sec: bytes_per_sec / 1e6,
            latency_us: Latency {
                p50: q(0.50),
                p90: q(0.90),
                p99: q(0.99),
                p999: q(0.999),
                max: q(1.0),
                mean: if self.hist.is_empty() {
                    0.0
                } else {
                    self.hist.mean()
                },
            },
            errors: Errors {
                requests: self.request_errors,
                items: self.item_errors,
                first: self.first_error.clone(),
            },
        }
    }
}

impl Default for WorkerStats {
    fn default() -> Self {
        Self::new()
    }
}

/// The result of one run; `--json` prints it as is.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `cipherd`, `openbao` or `echo`.
    pub target: String,
    /// `unary`, `batch` or `stream`.
    pub mode: String,
    /// `encrypt`, `decrypt` or `rewrap`.
    pub op: String,
    /// Plaintext bytes per item.
    pub size: usize,
    /// Items per request or stream message (1 for unary).
    pub batch: usize,
    /// Requests (or streams) in flight.
    pub concurrency: usize,
    /// Connections used.
    pub connections: usize,
    /// Stream messages in flight per stream.
    pub window: usize,
    /// Keys the requests were spread over.
    pub keys: usize,
    /// Key type named on the command line.
    pub key_type: String,
    /// Whether cipherd was asked for text ciphertexts.
    pub text: bool,
    /// Whether the connections were TLS (`--tls-ca`).
    pub tls: bool,
    /// Requested rate (0: unlimited).
    pub rate: f64,
    /// Generator threads.
    pub workers: usize,
    /// Length of the measured window.
    pub duration_secs: f64,
    /// Warm-up before it.
    pub warmup_secs: f64,
    /// Successful requests (or stream messages) in the window.
    pub requests: u64,
    /// Items answered without error in the window.
    pub items: u64,
    /// Items per second.
    pub items_per_sec: f64,
    /// Requests (stream messages) per second.
    pub requests_per_sec: f64,
    /// Plaintext bytes per second (items/s × size).
    pub plaintext_bytes_per_sec: f64,
    /// The same in MB/s (10^6 bytes).
    pub mb_per_sec: f64,
    /// Request latency percentiles, microseconds.
    pub latency_us: Latency,
    /// Errors in the window.
    pub errors: Errors,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Slowest.
    pub max: u64,
    /// Mean.
    pub mean: f64,
}

/// Error counts.
#[derive(Debug, Clone, Serialize)]
pub struct Errors {
    /// Requests that failed as a whole.
    pub requests: u64,
    /// Items of successful batch requests that carried an error.
    pub items: u64,
    /// The first error seen, for diagnosis.
    pub first: Option<String>,
}

impl Report {
    /// The human-readable form.
    pub fn human(&self) -> String {
        let shape = if self.mode == "unary" {
            format!("{} B", self.size)
        } else {
            format!("{} × {} B", self.batch, self.size)
        };
        let mut out = format!(
            "{} {} {}: {shape}, concurrency {} over {} {}connection(s), {} key(s) ({}), {:.1} s measured after {:.1} s warm-up\n",
            self.target,
            self.mode,
            self.op,
            self.concurrency,
            self.connections,
            if self.tls { "TLS " } else { "" },
            self.keys,
            self.key_type,
            self.duration_secs,
            self.warmup_secs,
        );
        out += &format!("  items/s     {:>14.0}\n", self.items_per_sec);
        out += &format!("  requests/s  {:>14.1}\n", self.requests_per_sec);
        out += &format!(
            "  MB/s        {:>14.1}  (plaintext, 10^6 bytes)\n",
            self.mb_per_sec
        );
        let l = &self.latency_us;
        out += &format!(
            "  latency     p50 {}   p99 {}   p99.9 {}   max {}\n",
            ms(l.p50),
            ms(l.p99),
            ms(l.p999),
            ms(l.max)
        );
        out += &format!(
            "  errors      {} request(s), {} item(s)\n",
            self.errors.requests, self.errors.items
        );
        if let Some(first) = &self.errors.first {
            out += &format!("  first error {first}\n");
        }
        out
    }
}

fn ms(us: u64) -> String {
    format!("{:.3} ms", us as f64 / 1000.0)
}

fn new_histogram() -> Histogram<u64> {
    // Invariant: the bounds are constants hdrhistogram accepts (low ≥ 1,
    // high ≥ 2 × low, sigfig ≤ 5), so creation cannot fail.
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("constant histogram bounds are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_window_counts_and_errors_keep_the_first_message() {
        let t = Timing::starting_now(Duration::from_secs(1), Duration::from_secs(2));
        let mut s = WorkerStats::new();
        let before = t.start;
        let inside = t.measure_from + Duration::from_millis(10);
        let after = t.end + Duration::from_millis(1);
        s.record(&t, before, before, Ok(Outcome::ONE));
        s.record(&t, before, inside, Ok(Outcome::ONE));
        s.record(
            &t,
            inside,
            inside,
            Ok(Outcome {
                items: 3,
                item_errors: 1,
            }),
        );
        s.record(&t, inside, after, Ok(Outcome::ONE));
        s.record(&t, before, before, Err("early".into()));
        s.record(&t, inside, inside, Err("late".into()));
        let mut total = WorkerStats::new();
        total.merge(s);
        let args = <Args as clap::Parser>::try_parse_from(["cipherd-bench"])
            .unwrap()
            .validated()
            .unwrap();
        let r = total.report(&args, &t);
        assert_eq!(r.requests, 2);
        assert_eq!(r.items, 4);
        assert_eq!(r.errors.items, 1);
        assert_eq!(r.errors.requests, 1, "the warm-up error is not counted");
        assert_eq!(r.errors.first.as_deref(), Some("early"));
        assert!((r.items_per_sec - 2.0).abs() < 1e-9);
        assert!(r.latency_us.max >= 10_000);
        assert!(r.human().contains("items/s"));
    }
}
