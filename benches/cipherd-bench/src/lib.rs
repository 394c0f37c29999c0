//! `cipherd-bench`: a closed-loop load generator for cipherd, for OpenBao's Transit
//! engine, and for `cipherd-echo`, a no-crypto gRPC baseline of the same API.
//!
//! The binary `cipherd-bench` ([`Args`] are its flags) drives one workload — a
//! target, a mode (unary, batch or stream), an operation (encrypt, decrypt, rewrap),
//! an item size, items per request, in-flight requests and a duration — and prints
//! items/s, requests/s, plaintext MB/s, request latency percentiles and error counts
//! ([`Report`]), or one JSON object with `--json`. `scripts/bench-compare.py` runs a
//! matrix of such workloads against every target in one go and writes
//! `docs/performance.md`.
//!
//! The generator shares the machine with the server it measures, so it keeps its own
//! cost low: payloads are generated once and held as `'static` [`bytes::Bytes`]
//! (cloning one is a pointer copy, no reference count), request messages are
//! assembled from them without copying payload bytes, each worker keeps its own
//! latency histogram, and nothing is shared between workers in the hot loop.
//!
//! What it does not do: TLS, authentication beyond OpenBao's token header, or
//! correctness checks beyond "one result per item, no error" (the test suites do
//! those). Traffic goes only to the address given.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod args;
pub mod echo;
pub mod grpc;
pub mod openbao;
pub mod payload;
pub mod runner;
pub mod stats;

pub use args::{Args, Mode, Op, Target};
pub use stats::Report;

/// Runs the workload `args` describes: waits for the target to be ready, creates
/// keys if asked, prepares payloads (for decrypt and rewrap: ciphertexts made by the
/// target itself), then measures.
///
/// Returns `None` for `--setup-only`.
pub async fn run(args: Args) -> anyhow::Result<Option<Report>> {
    let args = args.validated()?;
    match args.target {
        Target::Cipherd | Target::Echo => grpc::run(&args).await,
        Target::Openbao => openbao::run(&args).await,
    }
}
