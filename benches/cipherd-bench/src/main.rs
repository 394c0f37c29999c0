//! `cipherd-bench`: measure one workload against cipherd, OpenBao or cipherd-echo.
//!
//! `cipherd-bench --help` lists the flags; the crate docs say what is measured.
//! Exit status: 0 after a run with at least one successful request, 2 when no
//! request succeeded (the report is printed either way), 1 on a setup error.

use anyhow::Context as _;
use cipherd_bench::Args;
use clap::Parser as _;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers.max(1))
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let json = args.json;
    let Some(report) = runtime.block_on(cipherd_bench::run(args))? else {
        return Ok(());
    };
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.human());
    }
    if report.requests == 0 {
        std::process::exit(2);
    }
    Ok(())
}
