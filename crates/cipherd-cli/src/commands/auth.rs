//! `token …` and `role …`: identities (the `AuthService` service).
//!
//! `token create` prints the new token's secret exactly once (stdout), with a note
//! on stderr; every other command shows only accessors, never a secret. A role's
//! commands print the role as stored after the change.

use cipherd_client::pb;
use zeroize::Zeroizing;

use super::Ctx;
use crate::{
    cli::{RoleCommand, RoleWriteArgs, TokenCommand},
    output::{
        CreatedTokenView, DeletedView, Format, RevokedView, RoleListView, RoleView, TokenListView,
        TokenView, token_warning,
    },
};

/// Dispatches one `token` subcommand.
pub(super) async fn token(ctx: &Ctx, cmd: TokenCommand) -> anyhow::Result<()> {
    let client = &ctx.client;
    match cmd {
        TokenCommand::Create(args) => {
            let created = client
                .create_token(args.policies, args.ttl, &args.display_name)
                .await?;
            let info = TokenView::from(created.info);
            let accessor = info.accessor.clone();
            ctx.emit(&CreatedTokenView {
                // The one place the secret is turned into output.
                token: Zeroizing::new(created.token.expose_secret().to_owned()),
                info,
            })?;
            if ctx.format == Format::Human {
                eprintln!("\n{}", token_warning(&accessor));
            }
            Ok(())
        }
        TokenCommand::List => {
            let tokens = client.list_tokens().await?;
            ctx.emit(&TokenListView {
                tokens: tokens.into_iter().map(TokenView::from).collect(),
            })
        }
        TokenCommand::Lookup(args) => {
            let info = client.lookup_token(args.accessor.as_deref()).await?;
            ctx.emit(&TokenView::from(info))
        }
        TokenCommand::Revoke(args) => {
            client.revoke_token(&args.accessor).await?;
            ctx.emit(&RevokedView {
                accessor: args.accessor,
                revoked: true,
            })
        }
    }
}

/// Dispatches one `role` subcommand.
pub(super) async fn role(ctx: &Ctx, cmd: RoleCommand) -> anyhow::Result<()> {
    let client = &ctx.client;
    match cmd {
        RoleCommand::Write(args) => {
            let role = role_of(args);
            client.write_role(role.clone()).await?;
            ctx.emit(&RoleView::from(role))
        }
        RoleCommand::Read(args) => {
            let role = client.read_role(&args.name).await?;
            ctx.emit(&RoleView::from(role))
        }
        RoleCommand::List => {
            let roles = client.list_roles().await?;
            ctx.emit(&RoleListView {
                roles: roles.into_iter().map(RoleView::from).collect(),
            })
        }
        RoleCommand::Delete(args) => {
            client.delete_role(&args.name).await?;
            ctx.emit(&DeletedView {
                name: args.name,
                deleted: true,
            })
        }
    }
}

fn role_of(args: RoleWriteArgs) -> pb::Role {
    pb::Role {
        name: args.name,
        principals: args.principals,
        groups: args.groups,
        policies: args.policies,
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    #[test]
    fn role_write_sends_every_repeated_flag_in_order() {
        let cli = Cli::try_parse_from([
            "cipherctl",
            "role",
            "write",
            "ehr",
            "--principal",
            "spiffe://hospital/ns/ehr/*",
            "--group",
            "nurses",
            "--principal",
            "ehr-batch",
            "--policy",
            "clinical",
            "--policy",
            "billing",
        ])
        .expect("parses");
        let Command::Role(RoleCommand::Write(args)) = cli.command else {
            panic!("role write")
        };
        assert_eq!(
            role_of(args),
            pb::Role {
                name: "ehr".into(),
                principals: vec!["spiffe://hospital/ns/ehr/*".into(), "ehr-batch".into()],
                groups: vec!["nurses".into()],
                policies: vec!["clinical".into(), "billing".into()],
            }
        );
    }
}
