//! `backup FILE` and `restore FILE` (`SystemService.Backup` and `Restore`).
//!
//! A backup is written to a temporary file beside FILE (mode 0600, created
//! new), fsynced, and renamed over FILE only once the stream has ended with
//! the backup's own end marker and its SHA-256 matches: an interrupted or
//! failed backup never replaces a good one and never leaves a file that looks
//! complete. The server checks the same checksum again before a restore
//! writes anything.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use cipherd_client::pb;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::Ctx;
use crate::{
    cli::{BackupArgs, RestoreArgs},
    error::Failure,
    output::{BackupView, RestoreView},
};

/// The end marker and checksum that close every backup (see the server's
/// `backup` module and docs/operations.md, "Backup file format").
const END: &[u8; 8] = b"CIPHERDE";
const TRAILER: usize = END.len() + 32;

/// The size of the pieces a restore sends.
const CHUNK: usize = 256 * 1024;

/// `backup FILE`.
pub(super) async fn backup(ctx: &Ctx, args: BackupArgs) -> anyhow::Result<()> {
    let temp = temp_path(&args.file);
    let result = write_backup(ctx, &temp).await;
    let bytes = match result {
        Ok(bytes) => bytes,
        Err(e) => {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(e);
        }
    };
    tokio::fs::rename(&temp, &args.file)
        .await
        .with_context(|| format!("renaming the backup to {}", args.file.display()))?;
    sync_parent(&args.file).await?;
    ctx.emit(&BackupView {
        file: args.file.display().to_string(),
        bytes,
    })
}

/// `restore FILE`.
pub(super) async fn restore(ctx: &Ctx, args: RestoreArgs) -> anyhow::Result<()> {
    let mut file = tokio::fs::File::open(&args.file)
        .await
        .with_context(|| format!("opening {}", args.file.display()))?;
    let (tx, rx) = mpsc::channel(4);
    let path = args.file.clone();
    // Reads the file while the call sends it; a read error ends the stream
    // early, which the server refuses as a truncated backup.
    let reader = tokio::spawn(async move {
        loop {
            let mut chunk = vec![0u8; CHUNK];
            let n = file
                .read(&mut chunk)
                .await
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                return anyhow::Ok(());
            }
            chunk.truncate(n);
            let message = pb::RestoreRequest {
                backup_chunk: chunk.into(),
            };
            if tx.send(message).await.is_err() {
                return Ok(());
            }
        }
    });
    let reply = ctx
        .client
        .system()
        .restore(ReceiverStream::new(rx))
        .await
        .map_err(Failure::from);
    reader.await.context("the file reader task")??;
    let reply = reply?.into_inner();
    ctx.emit(&RestoreView::from(reply))
}

/// Streams the backup into `temp` (created new, 0600) and checks its end;
/// returns its size.
async fn write_backup(ctx: &Ctx, temp: &Path) -> anyhow::Result<u64> {
    let mut file = create_private(temp).await?;
    let mut stream = ctx
        .client
        .system()
        .backup(pb::BackupRequest {})
        .await
        .map_err(Failure::from)?
        .into_inner();
    let mut hash = Sha256::new();
    // The last TRAILER bytes seen, held back from the hash until the end.
    let mut tail: Vec<u8> = Vec::with_capacity(TRAILER * 2);
    let mut bytes = 0u64;
    while let Some(message) = stream.message().await.map_err(Failure::from)? {
        let chunk = message.backup_chunk;
        file.write_all(&chunk)
            .await
            .with_context(|| format!("writing {}", temp.display()))?;
        bytes += chunk.len() as u64;
        tail.extend_from_slice(&chunk);
        if tail.len() > TRAILER {
            let spill = tail.len() - TRAILER;
            hash.update(&tail[..spill]);
            tail.drain(..spill);
        }
    }
    if tail.len() < TRAILER || &tail[..END.len()] != END {
        return Err(Failure::new(
            "BACKUP_INCOMPLETE",
            "the backup stream ended without its end marker; nothing was written",
        )
        .into());
    }
    hash.update(END);
    if hash.finalize()[..] != tail[END.len()..] {
        return Err(Failure::new(
            "BACKUP_INCOMPLETE",
            "the backup's checksum does not match what was received; nothing was written",
        )
        .into());
    }
    file.sync_all()
        .await
        .with_context(|| format!("syncing {}", temp.display()))?;
    Ok(bytes)
}

/// Writes `bytes` to `file` the way `backup` does: a new temporary file beside
/// it (mode 0600), fsynced, renamed over `file`, the directory fsynced.
pub(super) async fn write_file_atomically(file: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let temp = temp_path(file);
    let written = async {
        let mut out = create_private(&temp).await?;
        out.write_all(bytes)
            .await
            .with_context(|| format!("writing {}", temp.display()))?;
        out.sync_all()
            .await
            .with_context(|| format!("syncing {}", temp.display()))
    }
    .await;
    if let Err(e) = written {
        let _ = tokio::fs::remove_file(&temp).await;
        return Err(e);
    }
    tokio::fs::rename(&temp, file)
        .await
        .with_context(|| format!("renaming {} to {}", temp.display(), file.display()))?;
    sync_parent(file).await
}

/// Creates `path` new, mode 0600.
async fn create_private(path: &Path) -> anyhow::Result<tokio::fs::File> {
    let mut options = tokio::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    options
        .open(path)
        .await
        .with_context(|| format!("creating {}", path.display()))
}

/// `FILE.tmp-<pid>` beside FILE, so the rename stays on one file system.
fn temp_path(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    file.with_file_name(name)
}

/// Makes the rename durable.
async fn sync_parent(file: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let parent = match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let dir = tokio::fs::File::open(&parent)
            .await
            .with_context(|| format!("opening {}", parent.display()))?;
        dir.sync_all()
            .await
            .with_context(|| format!("syncing {}", parent.display()))?;
    }
    #[cfg(not(unix))]
    let _ = file;
    Ok(())
}
