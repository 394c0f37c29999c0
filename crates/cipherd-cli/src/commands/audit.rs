//! `audit verify` (offline: checks the hash chain of log files, never contacts a
//! server) and `audit hash` (the `AuditService.Hash` RPC).
//!
//! `verify` streams each file line by line into `cipherd_core::audit_chain`'s
//! verifier, so a multi-gigabyte log needs no more memory than its longest line.

use std::{
    fs::File,
    io::{self, BufRead as _, BufReader, Write as _},
    path::Path,
};

use anyhow::Context as _;
use base64::Engine as _;
use cipherd_client::pb;
use cipherd_core::audit_chain::{Summary, Verifier};
use serde::Serialize;

use super::Ctx;
use crate::{
    cli::{AuditCommand, AuditHashArgs, AuditVerifyArgs},
    error::Failure,
    output::{self, Format, View},
};

/// Runs an `audit` subcommand that needs the server (and `verify`, which does
/// not, when called this way).
pub(super) async fn run(ctx: &Ctx, cmd: AuditCommand) -> anyhow::Result<()> {
    match cmd {
        AuditCommand::Verify(args) => verify(ctx.format, &args),
        AuditCommand::Hash(args) => hash(ctx, args).await,
    }
}

/// `audit verify FILE...`: exit 0 with a summary, or an error naming the first
/// bad line (reason `AUDIT_CHAIN_BROKEN`).
pub(super) fn verify(format: Format, args: &AuditVerifyArgs) -> anyhow::Result<()> {
    let mut verifier = Verifier::new();
    let mut line = Vec::with_capacity(4096);
    for path in &args.files {
        let name = path.display().to_string();
        verifier.begin_file(name.clone());
        let mut reader = BufReader::with_capacity(
            1 << 20,
            File::open(path).with_context(|| format!("opening {name}"))?,
        );
        while !verifier.failed() {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .with_context(|| format!("reading {name}"))?;
            if n == 0 {
                break;
            }
            let terminated = line.last() == Some(&b'\n');
            if terminated {
                line.pop();
            }
            verifier.line(&line, terminated);
        }
    }
    let summary = verifier
        .finish()
        .map_err(|e| Failure::new("AUDIT_CHAIN_BROKEN", e.to_string()))?;
    let view = VerifyView::new(&summary, &args.files);
    let mut out = io::stdout().lock();
    output::emit(format, &view, &mut out).context("writing to stdout")?;
    out.flush().context("writing to stdout")?;
    Ok(())
}

/// `audit hash VALUE`: prints `hmac-sha256:<hex>`.
async fn hash(ctx: &Ctx, args: AuditHashArgs) -> anyhow::Result<()> {
    let value = if args.base64 {
        base64::engine::general_purpose::STANDARD
            .decode(args.value.trim())
            .map_err(|e| Failure::new("INVALID_INPUT", format!("VALUE is not valid base64: {e}")))?
    } else {
        args.value.into_bytes()
    };
    let reply = ctx
        .client
        .audit()
        .hash(pb::HashRequest {
            value: value.into(),
        })
        .await
        .map_err(Failure::from)?
        .into_inner();
    ctx.emit(&HashView { hmac: reply.hmac })
}

/// `audit verify`'s result.
#[derive(Debug, Serialize)]
struct VerifyView {
    /// Always true (a broken chain is an error, not a view).
    intact: bool,
    files: Vec<String>,
    lines: u64,
    first_seq: Option<u64>,
    last_seq: Option<u64>,
    starts_mid_chain: bool,
    starts: u64,
    torn: Vec<TornView>,
    /// Hex SHA-256 of the last line: keep it elsewhere to detect truncation.
    head: Option<String>,
    summary: String,
}

#[derive(Debug, Serialize)]
struct TornView {
    file: String,
    line: u64,
    bytes: u64,
}

impl VerifyView {
    fn new(s: &Summary, files: &[impl AsRef<Path>]) -> Self {
        Self {
            intact: true,
            files: files
                .iter()
                .map(|f| f.as_ref().display().to_string())
                .collect(),
            lines: s.lines,
            first_seq: s.first_seq,
            last_seq: s.last_seq,
            starts_mid_chain: s.starts_mid_chain,
            starts: s.starts,
            torn: s
                .torn
                .iter()
                .map(|t| TornView {
                    file: t.file.clone(),
                    line: t.line,
                    bytes: t.bytes,
                })
                .collect(),
            head: s.head.clone(),
            summary: s.to_string(),
        }
    }
}

impl View for VerifyView {
    fn write_human(&self, w: &mut dyn io::Write) -> io::Result<()> {
        writeln!(w, "{}", self.summary)?;
        if let Some(head) = &self.head {
            writeln!(w, "last line's SHA-256: {head}")?;
        }
        Ok(())
    }
}

/// `audit hash`'s result.
#[derive(Debug, Serialize)]
struct HashView {
    /// `hmac-sha256:<hex>`.
    hmac: String,
}

impl View for HashView {
    fn write_human(&self, w: &mut dyn io::Write) -> io::Result<()> {
        writeln!(w, "{}", self.hmac)
    }
}
