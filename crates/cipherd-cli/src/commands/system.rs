//! Lifecycle commands: `status`, `init`, `unseal`, `seal` (the `SystemService` service).
//!
//! Unseal shares are secrets: `unseal` reads them from stdin when no argument is
//! given so they stay out of shell history, and `init` prints them and the root
//! token exactly once with a warning on stderr.

use cipherd_client::pb;

use std::io::IsTerminal as _;

use zeroize::Zeroizing;

use super::{Ctx, read_stdin_all, read_stdin_line};
use crate::{
    cli::{InitArgs, RekeyCommand, RotateRootCommand, SecretArg, UnsealArgs},
    error::Failure,
    output::{
        InitView, RekeyView, RotateRootView, SealView, StatusView, UnsealView, init_warning,
        rekey_warning,
    },
};

/// `status`.
pub(super) async fn status(ctx: &Ctx) -> anyhow::Result<()> {
    let status = ctx.client.status().await?;
    ctx.emit(&StatusView::from(status))
}

/// `init`: prints the shares and the root token on stdout, the warning on stderr.
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
    let pb::InitResponse { shares, root_token } = reply;
    let root_token = (!root_token.is_empty()).then_some(root_token);
    let has_root_token = root_token.is_some();
    ctx.emit(&InitView {
        shares,
        threshold: args.threshold,
        root_token,
    })?;
    eprintln!("\n{}", init_warning(count, args.threshold, has_root_token));
    Ok(())
}

/// `unseal`: the share comes from the argument, or from one line of stdin when the
/// argument is omitted or `-`. `--reset` without a share only resets.
pub(super) async fn unseal(ctx: &Ctx, args: UnsealArgs) -> anyhow::Result<()> {
    let share = match args.share.as_ref().map(SecretArg::expose) {
        Some("-") => read_share().await?,
        Some(share) => find_share(share)?,
        None if args.reset => Zeroizing::new(String::new()),
        None => read_share().await?,
    };
    let reply = ctx
        .client
        .system()
        .unseal(pb::UnsealRequest {
            share: share.to_string(),
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

/// `rekey start|submit|status|cancel`. The reply that completes the current
/// shares carries the new ones: they are printed once, with a warning on stderr.
pub(super) async fn rekey(ctx: &Ctx, command: RekeyCommand) -> anyhow::Result<()> {
    use pb::rekey_request::Action;
    let (action, nonce) = match command {
        RekeyCommand::Start(args) => (
            Some(Action::Start(pb::RekeyStart {
                shares: args.shares,
                threshold: args.threshold,
            })),
            String::new(),
        ),
        RekeyCommand::Submit(args) => {
            let share = share_arg(args.share.as_ref()).await?;
            (Some(Action::Share(share.to_string())), args.nonce)
        }
        RekeyCommand::Status => (None, String::new()),
        RekeyCommand::Cancel => (Some(Action::Cancel(true)), String::new()),
    };
    let reply = ctx
        .client
        .system()
        .rekey(pb::RekeyRequest { action, nonce })
        .await
        .map_err(Failure::from)?
        .into_inner();
    let handed_out =
        (!reply.shares.is_empty()).then_some((reply.shares.len(), reply.new_threshold));
    ctx.emit(&RekeyView::from(reply))?;
    if let Some((count, threshold)) = handed_out {
        eprintln!("\n{}", rekey_warning(count, threshold));
    }
    Ok(())
}

/// `rotate-root start|submit|status|cancel`.
pub(super) async fn rotate_root(ctx: &Ctx, command: RotateRootCommand) -> anyhow::Result<()> {
    use pb::rotate_root_request::Action;
    let (action, nonce) = match command {
        RotateRootCommand::Start => (Some(Action::Start(true)), String::new()),
        RotateRootCommand::Submit(args) => {
            let share = share_arg(args.share.as_ref()).await?;
            (Some(Action::Share(share.to_string())), args.nonce)
        }
        RotateRootCommand::Status => (None, String::new()),
        RotateRootCommand::Cancel => (Some(Action::Cancel(true)), String::new()),
    };
    let reply = ctx
        .client
        .system()
        .rotate_root(pb::RotateRootRequest { action, nonce })
        .await
        .map_err(Failure::from)?
        .into_inner();
    ctx.emit(&RotateRootView::from(reply))
}

/// The share given as an argument, or read from stdin when it is omitted or `-`.
async fn share_arg(arg: Option<&SecretArg>) -> anyhow::Result<Zeroizing<String>> {
    match arg.map(SecretArg::expose) {
        Some("-") | None => read_share().await,
        Some(share) => Ok(find_share(share)?),
    }
}

/// The share from stdin: one line typed at a terminal, or everything piped in
/// (such as a dev share file).
async fn read_share() -> anyhow::Result<Zeroizing<String>> {
    let input = if std::io::stdin().is_terminal() {
        Zeroizing::new(read_stdin_line("Unseal share").await?)
    } else {
        let bytes = Zeroizing::new(read_stdin_all("unseal share").await?);
        Zeroizing::new(String::from_utf8_lossy(&bytes).into_owned())
    };
    if input.trim().is_empty() {
        return Err(Failure::new("INVALID_INPUT", "no unseal share on stdin").into());
    }
    Ok(find_share(&input)?)
}

/// Picks the share out of what an operator pastes or pipes: the share alone, a
/// line of `init`'s output (`unseal share 2: cipherd-share:…`), or a file whose
/// other lines are `#` comments. Never repeats the input in an error.
fn find_share(input: &str) -> Result<Zeroizing<String>, Failure> {
    let mut found = input
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .flat_map(str::split_whitespace)
        .filter(|word| word.starts_with(SHARE_PREFIX));
    match (found.next(), found.next()) {
        (Some(share), None) => Ok(Zeroizing::new(share.to_owned())),
        (Some(_), Some(_)) => Err(Failure::new(
            "INVALID_INPUT",
            "more than one unseal share given; submit one share per `cipherctl unseal`",
        )),
        (None, _) => Err(Failure::new(
            "INVALID_INPUT",
            format!(
                "no unseal share found: expected {SHARE_PREFIX}v<N>:<hex digits>, as printed by \
                 `cipherctl init` (a whole line of its output, or a dev share file, works too)"
            ),
        )),
    }
}

/// What every share's text form starts with (followed by its encoding version).
const SHARE_PREFIX: &str = "cipherd-share:";

#[cfg(test)]
mod tests {
    use super::*;

    const SHARE: &str = "cipherd-share:v1:0a0b";

    #[test]
    fn shares_are_found_in_what_operators_paste() {
        for input in [
            SHARE.to_owned(),
            format!("  {SHARE}\n"),
            format!("unseal share 2: {SHARE}"),
            format!(
                "# INSECURE: cipherd dev-mode unseal share.\n# cipherd-share:v1:ffff is an example\n{SHARE}\n"
            ),
        ] {
            assert_eq!(find_share(&input).expect(&input).as_str(), SHARE, "{input}");
        }
    }

    #[test]
    fn no_share_or_several_are_refused_without_echoing_input() {
        let err = find_share("unseal share 2: deadbeef").expect_err("no share");
        assert_eq!(err.reason, "INVALID_INPUT");
        assert!(!err.message.contains("deadbeef"), "{}", err.message);
        let two = format!("{SHARE}\n{SHARE}2");
        assert!(find_share(&two).is_err());
    }
}
