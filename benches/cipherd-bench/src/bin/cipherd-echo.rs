//! `cipherd-echo`: cipherd's Transit API without the crypto, as a transport
//! baseline for `cipherd-bench --target echo` (see `cipherd_bench::echo`).
//!
//! Prints one JSON line to stdout once listening,
//! `{"message":"cipherd-echo listening","addr":"IP:PORT"}`, and runs until SIGINT
//! or SIGTERM.

use anyhow::Context as _;
use cipherd_bench::echo;
use clap::Parser;

/// A no-crypto gRPC echo of cipherd's Transit service.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// Largest gRPC message accepted or sent (cipherd's default).
    #[arg(long, default_value_t = echo::DEFAULT_MAX_MESSAGE_BYTES)]
    max_message_bytes: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    println!(
        "{}",
        serde_json::json!({ "message": "cipherd-echo listening", "addr": addr.to_string() })
    );
    echo::serve(
        listener,
        args.max_message_bytes,
        cipherd_server::shutdown_signal(),
    )
    .await?;
    Ok(())
}
