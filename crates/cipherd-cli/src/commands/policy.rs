//! `policy …`: access policies (the `PolicyService` service).
//!
//! A policy is a TOML document of `[[rule]]` tables. `policy write` sends the file
//! as is and the server checks it (bad syntax, unknown operations or fields are
//! `INVALID_POLICY`), so this command and the server can never disagree on the
//! format; `policy read` prints the document back as written.

use std::path::Path;

use anyhow::Context as _;

use super::{Ctx, read_stdin_all};
use crate::{
    cli::PolicyCommand,
    error::Failure,
    output::{DeletedView, PolicyListView, PolicyView, PolicyWrittenView},
};

/// Dispatches one `policy` subcommand.
pub(super) async fn run(ctx: &Ctx, cmd: PolicyCommand) -> anyhow::Result<()> {
    let client = &ctx.client;
    match cmd {
        PolicyCommand::Write(args) => {
            let document = read_document(&args.file).await?;
            client.write_policy(&args.name, &document).await?;
            ctx.emit(&PolicyWrittenView {
                name: args.name,
                written: true,
            })
        }
        PolicyCommand::Read(args) => {
            let document = client.read_policy(&args.name).await?;
            ctx.emit(&PolicyView {
                name: args.name,
                document,
            })
        }
        PolicyCommand::List => {
            let names = client.list_policies().await?;
            ctx.emit(&PolicyListView { names })
        }
        PolicyCommand::Delete(args) => {
            client.delete_policy(&args.name).await?;
            ctx.emit(&DeletedView {
                name: args.name,
                deleted: true,
            })
        }
    }
}

/// The document from `file`, or from stdin for `-`; it must be UTF-8 (TOML is).
async fn read_document(file: &Path) -> anyhow::Result<String> {
    let bytes = if file == Path::new("-") {
        read_stdin_all("policy document").await?
    } else {
        tokio::fs::read(file)
            .await
            .with_context(|| format!("reading the policy file {}", file.display()))?
    };
    String::from_utf8(bytes).map_err(|_| {
        Failure::new(
            "INVALID_INPUT",
            format!("the policy document {} is not UTF-8", file.display()),
        )
        .into()
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[tokio::test]
    async fn documents_are_read_as_is_and_must_be_utf8() {
        let doc = "[[rule]]\nkeys = [\"patients\"]\noperations = [\"decrypt\"]\n";
        let mut file = tempfile::NamedTempFile::new().expect("temp");
        file.write_all(doc.as_bytes()).expect("write");
        assert_eq!(read_document(file.path()).await.expect("read"), doc);

        let mut bad = tempfile::NamedTempFile::new().expect("temp");
        bad.write_all(&[0xff, 0xfe]).expect("write");
        let err = read_document(bad.path()).await.expect_err("not utf-8");
        assert_eq!(Failure::from_anyhow(&err).reason, "INVALID_INPUT");

        let err = read_document(Path::new("/nonexistent/p.toml"))
            .await
            .expect_err("missing");
        let f = Failure::from_anyhow(&err);
        assert_eq!(f.reason, "IO");
        assert!(f.message.contains("/nonexistent/p.toml"), "{}", f.message);
    }
}
