//! The `cipherd` binary: parse flags, load configuration, start logging, bind the
//! listener, and run until SIGINT or SIGTERM.

use std::{io::IsTerminal as _, path::PathBuf};

use anyhow::Context as _;
use cipherd_server::config::{Params, RawConfig};
use clap::Parser;

/// cipherd: encryption as a service over gRPC.
///
/// Applications send sensitive fields and get ciphertext back; keys never leave
/// the service. Options come from built-in defaults, the --config file,
/// CIPHERD_SERVER_* environment variables and these flags, later ones winning
/// (every option: docs/config.reference.toml).
#[derive(Debug, Parser)]
#[command(name = "cipherd", version)]
struct Args {
    /// TOML config file (see docs/config.reference.toml).
    #[arg(long, short = 'c', env = "CIPHERD_CONFIG")]
    config: Option<PathBuf>,
    /// Dev mode: initialize and unseal automatically from the data dir. INSECURE.
    #[arg(long)]
    dev: bool,
    /// Address to listen on, host:port, e.g. 127.0.0.1:8210 (port 0: any free port).
    #[arg(long)]
    listen: Option<String>,
    /// Data directory (SQLite database, dev unseal share).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Log filter, e.g. `info` or `cipherd_server=debug`.
    #[arg(long)]
    log_level: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut overrides = Vec::new();
    if args.dev {
        overrides.push(("dev", "true".to_owned()));
    }
    if let Some(listen) = &args.listen {
        overrides.push(("listen", listen.clone()));
    }
    if let Some(dir) = &args.data_dir {
        overrides.push(("data_dir", dir.display().to_string()));
    }
    if let Some(level) = &args.log_level {
        overrides.push(("log.level", level.clone()));
    }
    let raw = RawConfig::load(args.config.as_deref(), &overrides)?;
    init_logging(&raw.log.level, &raw.log.format)?;
    let addr = raw.listen_addr()?;
    let params = Params::try_from(raw)?;
    // Before the server starts, and so before any key material exists: no core
    // dumps, and all memory locked when memory.lock is set.
    let hardened = cipherd_server::memory::harden(params.memory.lock)?;
    tracing::info!(
        memory_locked = hardened.locked,
        "core dumps disabled (RLIMIT_CORE 0, not dumpable)"
    );
    if params.dev {
        tracing::warn!(
            "DEV MODE: the unseal share is stored in {} in the clear; never use for real data",
            params
                .data_dir
                .join(cipherd_server::DEV_SHARE_FILE)
                .display()
        );
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    cipherd_server::run(listener, params, async {
        cipherd_server::shutdown_signal().await;
        tracing::info!("shutdown requested; draining");
    })
    .await?;
    Ok(())
}

fn init_logging(level: &str, format: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .with_context(|| format!("log.level = {level:?}"))?;
    // Colour only for people at a terminal; files and log shippers get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        "json" => builder.json().init(),
        "text" => builder.init(),
        other => anyhow::bail!("log.format = {other:?}: expected \"text\" or \"json\""),
    }
    Ok(())
}
