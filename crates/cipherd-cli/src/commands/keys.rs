//! `key …`: the key-management plane (the `KeyAdminService` service).
//!
//! Every command prints the key's metadata as the server returns it after the
//! change, except `list` and `export`; `delete` prints the deletion time too. Material is only ever printed by
//! `export`, for keys created exportable; the server enforces that.

use anyhow::Context as _;
use cipherd_client::pb;

use super::Ctx;
use crate::{
    cli::{KeyCommand, KeyConfigArgs, KeyCreateArgs, KeyListArgs, KeyTypeArg},
    error::Failure,
    output::{ExportView, Format, KeyDeletionView, KeyListView, KeyView},
};

/// Dispatches one `key` subcommand.
pub(super) async fn run(ctx: &Ctx, cmd: KeyCommand) -> anyhow::Result<()> {
    let mut admin = ctx.client.admin();
    match cmd {
        KeyCommand::Create(args) => {
            let reply = admin
                .create_key(create_request(args))
                .await
                .map_err(Failure::from)?;
            emit_key(ctx, reply.into_inner().key)
        }
        KeyCommand::Get(args) => {
            let reply = admin
                .get_key(pb::GetKeyRequest { name: args.name })
                .await
                .map_err(Failure::from)?;
            emit_key(ctx, reply.into_inner().key)
        }
        KeyCommand::List(args) => list(ctx, args).await,
        KeyCommand::Backup(args) => {
            let reply = admin
                .backup_key(pb::BackupKeyRequest { name: args.name })
                .await
                .map_err(Failure::from)?;
            let bytes = reply.into_inner().key_backup;
            super::backup::write_file_atomically(&args.file, &bytes).await?;
            ctx.emit(&crate::output::BackupView {
                file: args.file.display().to_string(),
                bytes: bytes.len() as u64,
            })
        }
        KeyCommand::Restore(args) => {
            let key_backup = tokio::fs::read(&args.file)
                .await
                .with_context(|| format!("reading {}", args.file.display()))?;
            let reply = admin
                .restore_key(pb::RestoreKeyRequest {
                    key_backup: key_backup.into(),
                })
                .await
                .map_err(Failure::from)?;
            emit_key(ctx, reply.into_inner().key)
        }
        KeyCommand::Rotate(args) => {
            let reply = admin
                .rotate_key(pb::RotateKeyRequest { name: args.name })
                .await
                .map_err(Failure::from)?;
            emit_key(ctx, reply.into_inner().key)
        }
        KeyCommand::Config(args) => {
            let reply = admin
                .update_key_config(config_request(args))
                .await
                .map_err(Failure::from)?;
            emit_key(ctx, reply.into_inner().key)
        }
        KeyCommand::Trim(args) => {
            let reply = admin
                .trim_key(pb::TrimKeyRequest {
                    name: args.name,
                    min_available_version: args.min_available_version,
                })
                .await
                .map_err(Failure::from)?;
            emit_key(ctx, reply.into_inner().key)
        }
        KeyCommand::Delete(args) => {
            let reply = admin
                .delete_key(pb::DeleteKeyRequest {
                    name: args.name.clone(),
                    waiting_period: args.waiting_period.map(seconds),
                })
                .await
                .map_err(Failure::from)?
                .into_inner();
            ctx.emit(&KeyDeletionView::new(args.name, reply))
        }
        KeyCommand::CancelDeletion(args) => {
            let reply = admin
                .cancel_key_deletion(pb::CancelKeyDeletionRequest { name: args.name })
                .await
                .map_err(Failure::from)?;
            emit_key(ctx, reply.into_inner().key)
        }
        KeyCommand::Export(args) => {
            let reply = admin
                .export_key(pb::ExportKeyRequest {
                    name: args.name,
                    version: args.version,
                })
                .await
                .map_err(Failure::from)?;
            ctx.emit(&ExportView::from(reply.into_inner()))
        }
    }
}

/// `key list`: one page, or every page with `--all`. In human mode the token of a
/// further page goes to stderr so stdout stays a plain list of names.
async fn list(ctx: &Ctx, args: KeyListArgs) -> anyhow::Result<()> {
    let mut admin = ctx.client.admin();
    let mut names = Vec::new();
    let mut token = args.page_token.unwrap_or_default();
    let next = loop {
        let page = admin
            .list_keys(pb::ListKeysRequest {
                page_size: args.page_size.unwrap_or(0),
                page_token: token,
            })
            .await
            .map_err(Failure::from)?
            .into_inner();
        names.extend(page.names);
        if page.next_page_token.is_empty() {
            break None;
        }
        if !args.all {
            break Some(page.next_page_token);
        }
        token = page.next_page_token;
    };
    if let (Some(token), Format::Human) = (&next, ctx.format) {
        eprintln!("more keys: continue with --page-token {token} (or use --all)");
    }
    ctx.emit(&KeyListView {
        names,
        next_page_token: next,
    })
}

fn emit_key(ctx: &Ctx, key: Option<pb::Key>) -> anyhow::Result<()> {
    let key = key.ok_or_else(|| Failure::new("PROTOCOL", "the server's reply holds no key"))?;
    ctx.emit(&KeyView::from(key))
}

fn create_request(args: KeyCreateArgs) -> pb::CreateKeyRequest {
    pb::CreateKeyRequest {
        name: args.name,
        r#type: key_type(args.key_type) as i32,
        derived: args.derived,
        exportable: args.exportable,
        deletion_allowed: args.deletion_allowed,
        auto_rotate_period: args.auto_rotate_period.map(seconds),
    }
}

fn seconds(s: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(s).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

fn config_request(args: KeyConfigArgs) -> pb::UpdateKeyConfigRequest {
    pb::UpdateKeyConfigRequest {
        name: args.name,
        min_decryption_version: args.min_decryption_version,
        min_encryption_version: args.min_encryption_version,
        deletion_allowed: args.deletion_allowed,
        // Fixed at creation: never changed from here.
        exportable: None,
        auto_rotate_period: args.auto_rotate_period.map(seconds),
    }
}

fn key_type(t: KeyTypeArg) -> pb::KeyType {
    match t {
        KeyTypeArg::Xaes256Gcm => pb::KeyType::Xaes256Gcm,
        KeyTypeArg::Aes256Gcm96 => pb::KeyType::Aes256Gcm96,
        KeyTypeArg::Chacha20Poly1305 => pb::KeyType::Chacha20Poly1305,
        KeyTypeArg::Xchacha20Poly1305 => pb::KeyType::Xchacha20Poly1305,
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::{
        cli::{Cli, Command},
        output::key_type_name,
    };

    fn key_cmd(args: &[&str]) -> KeyCommand {
        let cli = Cli::try_parse_from(["cipherctl", "key"].iter().chain(args)).expect("parses");
        match cli.command {
            Command::Key(cmd) => cmd,
            other => panic!("not a key command: {other:?}"),
        }
    }

    #[test]
    fn config_sends_only_what_was_given() {
        let KeyCommand::Config(args) = key_cmd(&["config", "k", "--min-decryption-version", "2"])
        else {
            panic!("config")
        };
        let r = config_request(args);
        assert_eq!(r.min_decryption_version, Some(2));
        assert_eq!(
            (r.min_encryption_version, r.deletion_allowed, r.exportable),
            (None, None, None)
        );

        let KeyCommand::Config(args) = key_cmd(&["config", "k", "--deletion-allowed", "true"])
        else {
            panic!("config")
        };
        let r = config_request(args);
        assert_eq!((r.exportable, r.deletion_allowed), (None, Some(true)));
    }

    #[test]
    fn create_maps_types_round_trip_with_their_display_names() {
        for name in [
            "xaes-256-gcm",
            "aes256-gcm96",
            "chacha20-poly1305",
            "xchacha20-poly1305",
        ] {
            let KeyCommand::Create(args) = key_cmd(&["create", "k", "--type", name]) else {
                panic!("create")
            };
            assert_eq!(key_type_name(create_request(args).r#type), name);
        }
    }
}
