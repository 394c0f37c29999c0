//! The closed loop: `concurrency` workers, each sending its next request as soon as
//! the previous one is answered (or at its scheduled time under `--rate`), until the
//! end of the run.
//!
//! Protocol-specific code lives behind [`Caller`]; this module only schedules,
//! times and counts.

use std::{future::Future, time::Duration};

use tokio::task::JoinSet;

use crate::stats::{Outcome, Timing, WorkerStats};

/// Sends one request and waits for its reply. One `Caller` per in-flight request.
pub trait Caller: Send + 'static {
    /// Sends request number `seq` (used to pick its key and payloads).
    ///
    /// `Err` is a failure of the whole request, with a message for the report.
    fn call(&mut self, seq: u64) -> impl Future<Output = Result<Outcome, String>> + Send;
}

/// Runs one worker per caller over `timing` and merges their counts.
///
/// `rate` is requests per second over all workers (0: unlimited). Workers still
/// busy `grace` after the end are aborted; their in-flight requests were not going
/// to count anyway.
pub async fn run_closed_loop<C: Caller>(
    callers: Vec<C>,
    timing: Timing,
    rate: f64,
    grace: Duration,
) -> WorkerStats {
    let workers = callers.len().max(1) as u64;
    // Each worker's share of the rate, as an interval between its requests.
    let interval = (rate > 0.0).then(|| Duration::from_secs_f64(workers as f64 / rate));
    let mut set = JoinSet::new();
    for (i, mut caller) in callers.into_iter().enumerate() {
        let first_seq = i as u64;
        set.spawn(async move {
            let mut stats = WorkerStats::new();
            let mut seq = first_seq;
            // Stagger paced workers over one interval so they do not fire together.
            let mut next = interval.map(|iv| timing.start + iv.mul_f64(i as f64 / workers as f64));
            loop {
                let scheduled = match (&mut next, interval) {
                    (Some(at), Some(iv)) => {
                        let due = *at;
                        *at += iv;
                        tokio::time::sleep_until(due.into()).await;
                        due
                    }
                    _ => std::time::Instant::now(),
                };
                if scheduled >= timing.end {
                    break;
                }
                // Under a rate, latency runs from the scheduled time, so time spent
                // queued behind a slow reply counts (no coordinated omission).
                let t0 = if interval.is_some() {
                    scheduled
                } else {
                    std::time::Instant::now()
                };
                let result = caller.call(seq).await;
                stats.record(&timing, t0, std::time::Instant::now(), result);
                seq += workers;
            }
            stats
        });
    }
    collect(set, timing, grace).await
}

/// Waits for every worker until `grace` after the end, aborting the rest.
pub async fn collect(
    mut set: JoinSet<WorkerStats>,
    timing: Timing,
    grace: Duration,
) -> WorkerStats {
    let mut total = WorkerStats::new();
    let deadline = tokio::time::Instant::from_std(timing.end + grace);
    loop {
        match tokio::time::timeout_at(deadline, set.join_next()).await {
            Ok(Some(Ok(stats))) => total.merge(stats),
            Ok(Some(Err(e))) => total.record_error(format!("worker failed: {e}")),
            Ok(None) => break,
            Err(_) => {
                let stuck = set.len();
                set.abort_all();
                total.record_error(format!(
                    "{stuck} worker(s) still waiting {grace:?} after the end; aborted"
                ));
                break;
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    struct Fixed {
        delay: Duration,
    }

    impl Caller for Fixed {
        async fn call(&mut self, seq: u64) -> Result<Outcome, String> {
            tokio::time::sleep(self.delay).await;
            if seq % 10 == 9 {
                Err(format!("request {seq} failed"))
            } else {
                Ok(Outcome::ONE)
            }
        }
    }

    #[tokio::test]
    async fn the_loop_stops_by_itself_and_counts_only_the_window() {
        let timing = Timing::starting_now(Duration::from_millis(50), Duration::from_millis(200));
        let callers = (0..4)
            .map(|_| Fixed {
                delay: Duration::from_millis(5),
            })
            .collect();
        let started = Instant::now();
        let stats = run_closed_loop(callers, timing, 0.0, Duration::from_secs(1)).await;
        assert!(started.elapsed() < Duration::from_secs(2));
        let args = <crate::Args as clap::Parser>::try_parse_from(["b"])
            .unwrap()
            .validated()
            .unwrap();
        let r = stats.report(&args, &timing);
        // 4 workers × ~40 requests of 5 ms in 200 ms, a tenth failing.
        assert!(r.requests > 40 && r.requests < 200, "{}", r.requests);
        assert!(r.errors.requests > 0);
        assert!(r.latency_us.p50 >= 5_000);
    }

    #[tokio::test]
    async fn a_rate_paces_the_workers() {
        let timing = Timing::starting_now(Duration::ZERO, Duration::from_millis(500));
        let callers = (0..2)
            .map(|_| Fixed {
                delay: Duration::from_micros(100),
            })
            .collect();
        let stats = run_closed_loop(callers, timing, 100.0, Duration::from_secs(1)).await;
        let args = <crate::Args as clap::Parser>::try_parse_from(["b"])
            .unwrap()
            .validated()
            .unwrap();
        let r = stats.report(&args, &timing);
        let sent = r.requests + r.errors.requests;
        // 100/s for 0.5 s.
        assert!((40..=60).contains(&sent), "{sent}");
    }

    #[tokio::test]
    async fn stuck_workers_are_aborted_after_the_grace() {
        let timing = Timing::starting_now(Duration::ZERO, Duration::from_millis(20));
        let callers = vec![Fixed {
            delay: Duration::from_secs(3600),
        }];
        let started = Instant::now();
        let stats = run_closed_loop(callers, timing, 0.0, Duration::from_millis(50)).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        let args = <crate::Args as clap::Parser>::try_parse_from(["b"])
            .unwrap()
            .validated()
            .unwrap();
        let r = stats.report(&args, &timing);
        assert!(r.errors.first.unwrap().contains("aborted"));
    }
}
