//! The `cipherd.v1.SystemService` service: status, init, unseal, seal, rekey,
//! root rotation, backup and restore.
//!
//! `Status`, `Init`, `Unseal` and `Restore` need no credential (a sealed server
//! cannot check one, and `Init` and `Restore` create the first); they are
//! audited like every call, and `Init` and `Restore` are refused once the store
//! is initialized. `Seal`, `Rekey` and `RotateRoot` need the `system`
//! operation (and then the shares), `Backup` the `backup` operation.

use std::{
    io::{BufReader, Seek as _, SeekFrom},
    sync::Arc,
    time::SystemTime,
};

use cipherd_proto::v1::{self as pb, system_service_server::SystemService};
use tokio::{io::AsyncWriteExt as _, sync::mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;
use zeroize::Zeroizing;

use crate::{
    access::{self, CallCtx},
    audit::{ItemCounts, Outcome},
    auth::policy::Operation,
    backup,
    error::{Error, Result},
    seal::{Core, RekeyAction, RekeyPhase, RotateAction, RotatePhase, SEAL_PATH, SealStatus},
};

/// The largest backup `Restore` accepts, in bytes: it is spooled to a file in
/// the data dir before it is verified, by an unauthenticated caller (as `Init`
/// is), so the bound keeps that caller from filling the disk.
pub const MAX_RESTORE_BYTES: u64 = 8 << 30;

/// Records read from the snapshot per page while streaming a backup.
const BACKUP_PAGE: usize = 256;

/// Backup chunks produced ahead of the client reading them.
const BACKUP_CHUNKS_IN_FLIGHT: usize = 4;

/// The implementation of the `SystemService` gRPC service.
#[derive(Debug, Clone)]
pub struct SystemHandler {
    core: Arc<Core>,
}

impl SystemHandler {
    /// A service over `core`.
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }

    fn status_reply(&self, s: SealStatus) -> pb::StatusResponse {
        pb::StatusResponse {
            initialized: s.initialized,
            sealed: s.sealed,
            threshold: s.threshold.into(),
            shares: s.shares.into(),
            progress: s.progress.into(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            storage: self.core.params().storage.backend().to_owned(),
            dev_mode: self.core.params().dev,
        }
    }
}

#[tonic::async_trait]
impl SystemService for SystemHandler {
    type BackupStream = ReceiverStream<std::result::Result<pb::BackupResponse, Status>>;

    async fn backup(
        &self,
        request: Request<pb::BackupRequest>,
    ) -> std::result::Result<Response<Self::BackupStream>, Status> {
        let ctx = CallCtx::of(&request)?;
        ctx.authorize(Operation::Backup, None, "", "")?;
        // The use statistics gathered in memory go into the snapshot too.
        self.core.flush_stats().await;
        let snapshot = self.core.backup_snapshot().await?;
        let header = backup::Header {
            created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            source_backend: self.core.params().storage.backend().to_owned(),
            record_count: snapshot.record_count(),
            cipherd_version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let writer = backup::Writer::new(&header)?;
        tracing::info!(records = header.record_count, "backup started");
        let (tx, rx) = mpsc::channel(BACKUP_CHUNKS_IN_FLIGHT);
        tokio::spawn(stream_backup(ctx, snapshot, writer, tx).instrument(tracing::Span::current()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn restore(
        &self,
        request: Request<Streaming<pb::RestoreRequest>>,
    ) -> std::result::Result<Response<pb::RestoreResponse>, Status> {
        let ctx = CallCtx::of(&request)?;
        {
            let mut fields = ctx.fields();
            fields.operation = "restore";
        }
        // Refused before a byte is spooled; `Core::restore` checks again under
        // the lifecycle lock.
        if self.core.status().await?.initialized {
            return Err(Error::AlreadyInitialized.into());
        }
        let spooled = spool(request.into_inner(), &self.core.params().data_dir).await?;
        // Pass 1: the whole file is checked (framing, count, checksum) before
        // anything is written.
        let (header, seal_record, spooled) = tokio::task::spawn_blocking(move || verify(spooled))
            .await
            .map_err(|e| Error::Internal(format!("backup verification task: {e}")))??;
        // Pass 2: the records, read again (and checked again) into the import.
        let expected = header.record_count;
        let (tx, rx) = mpsc::channel(BACKUP_PAGE);
        let reader = tokio::task::spawn_blocking(move || feed_records(spooled, tx));
        let restored = self.core.restore(&seal_record, expected, rx).await;
        reader.abort();
        let restored = restored?;
        ctx.fields().items = Some(ItemCounts {
            total: restored,
            ok: restored,
            failed: 0,
        });
        Ok(Response::new(pb::RestoreResponse {
            records: restored,
            created_at: header.created_at,
            source_backend: header.source_backend,
        }))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let s = self.core.status().await?;
        Ok(Response::new(self.status_reply(s)))
    }

    async fn init(
        &self,
        request: Request<pb::InitRequest>,
    ) -> Result<Response<pb::InitResponse>, Status> {
        let r = request.into_inner();
        let (shares, root_token) = self.core.init(r.shares, r.threshold).await?;
        Ok(Response::new(pb::InitResponse {
            shares,
            // The reply is the one copy handed out; ours is wiped on drop.
            root_token: root_token.as_str().to_owned(),
        }))
    }

    async fn unseal(
        &self,
        request: Request<pb::UnsealRequest>,
    ) -> Result<Response<pb::UnsealResponse>, Status> {
        let r = request.into_inner();
        let s = self.core.unseal(r.share, r.reset).await?;
        Ok(Response::new(pb::UnsealResponse {
            sealed: s.sealed,
            threshold: s.threshold.into(),
            progress: s.progress.into(),
        }))
    }

    async fn seal(
        &self,
        request: Request<pb::SealRequest>,
    ) -> Result<Response<pb::SealResponse>, Status> {
        let ctx = CallCtx::of(&request)?;
        ctx.authorize(Operation::System, None, "", "")?;
        self.core.seal().await?;
        Ok(Response::new(pb::SealResponse {}))
    }

    async fn rotate_root(
        &self,
        request: Request<pb::RotateRootRequest>,
    ) -> Result<Response<pb::RotateRootResponse>, Status> {
        let ctx = CallCtx::of(&request)?;
        ctx.authorize(Operation::System, None, "", "")?;
        let r = request.into_inner();
        let action = match r.action {
            None => RotateAction::Status,
            Some(pb::rotate_root_request::Action::Start(_)) => RotateAction::Start,
            Some(pb::rotate_root_request::Action::Share(share)) => RotateAction::Share {
                text: Zeroizing::new(share),
                nonce: r.nonce,
            },
            Some(pb::rotate_root_request::Action::Cancel(_)) => RotateAction::Cancel,
        };
        let s = self.core.rotate_root(action).await?;
        Ok(Response::new(pb::RotateRootResponse {
            phase: match s.phase {
                RotatePhase::None => pb::RotateRootPhase::None,
                RotatePhase::Collecting => pb::RotateRootPhase::Collecting,
                RotatePhase::Resealing => pb::RotateRootPhase::Resealing,
                RotatePhase::Done => pb::RotateRootPhase::Done,
                RotatePhase::Stopped => pb::RotateRootPhase::Stopped,
            } as i32,
            nonce: s.nonce,
            progress: s.progress.into(),
            required: s.required.into(),
            root_generation: s.root_generation,
            resealed: s.resealed,
            error: s.error,
        }))
    }

    async fn rekey(
        &self,
        request: Request<pb::RekeyRequest>,
    ) -> Result<Response<pb::RekeyResponse>, Status> {
        let ctx = CallCtx::of(&request)?;
        ctx.authorize(Operation::System, None, "", "")?;
        let r = request.into_inner();
        let action = match r.action {
            None => RekeyAction::Status,
            Some(pb::rekey_request::Action::Start(start)) => RekeyAction::Start {
                shares: start.shares,
                threshold: start.threshold,
            },
            Some(pb::rekey_request::Action::Share(share)) => RekeyAction::Share {
                text: Zeroizing::new(share),
                nonce: r.nonce,
            },
            Some(pb::rekey_request::Action::Cancel(_)) => RekeyAction::Cancel,
        };
        let s = self.core.rekey(action).await?;
        Ok(Response::new(pb::RekeyResponse {
            phase: match s.phase {
                RekeyPhase::None => pb::RekeyPhase::None,
                RekeyPhase::Collecting => pb::RekeyPhase::Collecting,
                RekeyPhase::Verifying => pb::RekeyPhase::Verifying,
                RekeyPhase::Done => pb::RekeyPhase::Done,
            } as i32,
            nonce: s.nonce,
            progress: s.progress.into(),
            required: s.required.into(),
            new_shares: s.new_shares.into(),
            new_threshold: s.new_threshold.into(),
            // The reply is the one copy handed out.
            shares: s.shares,
        }))
    }
}

/// Reads `snapshot` into `writer` and sends the chunks. The last chunk (with
/// the checksum) is sent only after the call's closing audit record is
/// durable; on any error the stream ends with that error instead, so a client
/// never holds a complete-looking backup that was not audited.
async fn stream_backup(
    call: Arc<CallCtx>,
    mut snapshot: Box<dyn cipherd_store::Snapshot>,
    mut writer: backup::Writer,
    tx: mpsc::Sender<std::result::Result<pb::BackupResponse, Status>>,
) {
    let send = |chunk: Vec<u8>| {
        tx.send(Ok(pb::BackupResponse {
            backup_chunk: chunk.into(),
        }))
    };
    let result: Result<Option<(u64, Vec<u8>)>> = async {
        let mut records = 0u64;
        loop {
            let page = snapshot.next_page(BACKUP_PAGE).await?;
            if page.is_empty() {
                break;
            }
            for (path, record) in page {
                writer.record(&path, &record.value)?;
                records += 1;
                while let Some(chunk) = writer.take_chunk() {
                    if send(chunk).await.is_err() {
                        return Ok(None);
                    }
                }
            }
        }
        drop(snapshot);
        Ok(Some((records, writer.finish()?)))
    }
    .await;
    let ctx = call.child();
    ctx.fields().operation = Operation::Backup.as_str();
    let (outcome, last) = match result {
        Ok(Some((records, last))) => {
            ctx.fields().items = Some(ItemCounts {
                total: records,
                ok: records,
                failed: 0,
            });
            (access::OK, Ok(last))
        }
        // The client went away: the stream has no one to end.
        Ok(None) => (
            Outcome {
                code: "CANCELLED",
                reason: None,
            },
            Err(None),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "backup failed");
            (access::outcome_of(&e), Err(Some(e)))
        }
    };
    let audited = ctx.auditor().record(ctx.record("chunk", outcome)).await;
    match (last, audited) {
        (Ok(last), Ok(())) => {
            tracing::info!("backup streamed");
            let _ = send(last).await;
        }
        (Err(None), _) => {}
        (Err(Some(e)), _) | (Ok(_), Err(e)) => {
            let _ = tx.send(Err(Status::from(e))).await;
        }
    }
}

/// Writes the request stream into an anonymous file in `data_dir` (unlinked,
/// mode 0600, gone when closed), refusing more than [`MAX_RESTORE_BYTES`].
async fn spool(
    mut requests: Streaming<pb::RestoreRequest>,
    data_dir: &std::path::Path,
) -> Result<std::fs::File> {
    let file = tempfile::tempfile_in(data_dir)
        .map_err(|e| Error::Internal(format!("cannot create the restore spool file: {e}")))?;
    let mut file = tokio::fs::File::from_std(file);
    let mut total = 0u64;
    while let Some(message) = requests
        .message()
        .await
        .map_err(|s| Error::InvalidArgument(format!("the backup stream failed: {}", s.message())))?
    {
        total += message.backup_chunk.len() as u64;
        if total > MAX_RESTORE_BYTES {
            return Err(Error::InvalidArgument(format!(
                "the backup is larger than {MAX_RESTORE_BYTES} bytes"
            )));
        }
        file.write_all(&message.backup_chunk)
            .await
            .map_err(|e| Error::Internal(format!("cannot spool the backup: {e}")))?;
    }
    file.flush()
        .await
        .map_err(|e| Error::Internal(format!("cannot spool the backup: {e}")))?;
    Ok(file.into_std().await)
}

/// Checks the whole spooled backup; returns its header and seal record.
fn verify(mut file: std::fs::File) -> Result<(backup::Header, Vec<u8>, std::fs::File)> {
    rewind(&mut file)?;
    let mut reader = backup::Reader::new(BufReader::new(&file))?;
    let mut seal_record = None;
    while let Some((path, value)) = reader.next_record()? {
        if path == SEAL_PATH {
            seal_record = Some(value);
        }
    }
    let header = reader.header().clone();
    drop(reader);
    let seal_record = seal_record
        .ok_or_else(|| Error::InvalidArgument("invalid backup: it has no seal record".into()))?;
    Ok((header, seal_record, file))
}

/// Sends every record of the (verified) spooled backup to the import, and an
/// error if the file no longer reads as it did.
fn feed_records(mut file: std::fs::File, tx: mpsc::Sender<Result<(String, Vec<u8>)>>) {
    let records = rewind(&mut file).and_then(|()| backup::Reader::new(BufReader::new(&file)));
    let mut reader = match records {
        Ok(reader) => reader,
        Err(e) => {
            let _ = tx.blocking_send(Err(e));
            return;
        }
    };
    loop {
        match reader.next_record() {
            Ok(Some(record)) => {
                if tx.blocking_send(Ok(record)).is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        }
    }
}

fn rewind(file: &mut std::fs::File) -> Result<()> {
    file.seek(SeekFrom::Start(0))
        .map(|_| ())
        .map_err(|e| Error::Internal(format!("cannot read the restore spool file: {e}")))
}
