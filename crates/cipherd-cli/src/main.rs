//! `cipherctl`, the command line for cipherd: lifecycle (init, unseal, seal), key
//! management, tokens, roles and policies, and encrypt/decrypt/rewrap for operators
//! and ETL scripts.
//!
//! This file only parses the command line and maps the outcome to an exit status:
//! 0 on success, 1 on any failure (printed as `error: <REASON>: <message>` on
//! stderr), 2 on usage errors (clap), 141 when stdout's reader went away. The work happens in `commands`, over the
//! typed client in `cipherd-client`; this binary never touches storage.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod cli;
mod commands;
mod error;
mod output;

use std::process::ExitCode;

use clap::Parser as _;

use crate::{cli::Cli, error::Failure, output::error_line};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!(
                "{}",
                error_line(&Failure::new("IO", format!("starting the runtime: {e}")))
            );
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`cipherctl … | head`): stop quietly with the status
        // a SIGPIPE death would give, as `cat` and friends do.
        Err(err) if is_broken_pipe(&err) => ExitCode::from(128 + 13),
        Err(err) => {
            eprintln!("{}", error_line(&Failure::from_anyhow(&err)));
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
