//! Lifecycle commands: `status`, `init`, `unseal`, `seal` (the `SystemService` service).
//!
//! Unseal shares are secrets: `unseal` reads them from stdin when no argument is
//! given so they stay out of shell history, and `init` prints them exactly once with
//! a warning on stderr.

use cipherd_client::pb;

use super::{Ctx, read_stdin_line};
use crate::{
    cli::{InitArgs, SecretArg, UnsealArgs},
    error::Failure,
    output::{InitView, SealView, StatusView, UnsealView, init_warning},
};

/// `status`.
pub(super) async fn status(ctx: &Ctx) -> anyhow::Result<()> {
    let status = ctx.client.status().await?;
    ctx.emit(&StatusView::from(status))
}

/// `init`: prints the shares on stdout and the warning on stderr.
pub(super) async fn init(ctx: &Ctx, args: InitArgs) -> anyhow::Result<()> {
    let reply = ctx
        .client
        .system()
        .init(pb::InitRequest {
            shares: args.shares,
            threshold: args.threshold,
        })
        .await
        .map_err(Failure::from)?
        .into_inner();
    let count = reply.shares.len();
    ctx.emit(&InitView {
        shares: reply.shares,
        threshold: args.threshold,
    })?;
    eprintln!("\n{}", init_warning(count, args.threshold));
    Ok(())
}

/// `unseal`: the share comes from the argument, or from one line of stdin when the
/// argument is omitted or `-`. `--reset` without a share only resets.
pub(super) async fn unseal(ctx: &Ctx, args: UnsealArgs) -> anyhow::Result<()> {
    let share = match args.share.as_ref().map(SecretArg::expose) {
        Some("-") => read_share().await?,
        Some(share) => share.to_owned(),
        None if args.reset => String::new(),
        None => read_share().await?,
    };
    let reply = ctx
        .client
        .system()
        .unseal(pb::UnsealRequest {
            share,
            reset: args.reset,
        })
        .await
        .map_err(Failure::from)?
        .into_inner();
    ctx.emit(&UnsealView::from(reply))
}

/// `seal`.
pub(super) async fn seal(ctx: &Ctx) -> anyhow::Result<()> {
    ctx.client
        .system()
        .seal(pb::SealRequest {})
        .await
        .map_err(Failure::from)?;
    ctx.emit(&SealView { sealed: true })
}

async fn read_share() -> anyhow::Result<String> {
    let share = read_stdin_line("Unseal share").await?;
    if share.trim().is_empty() {
        return Err(Failure::new("INVALID_INPUT", "no unseal share on stdin").into());
    }
    Ok(share.trim().to_owned())
}
