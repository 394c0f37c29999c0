//! The audit log: one JSON line per call on every configured sink, written before
//! the reply leaves, hash-chained, fail closed.
//!
//! [`Auditor`] is the request path's handle: [`Auditor::ready`] before a call's
//! work (an atomic load: is any sink accepting records?), [`Auditor::record`]
//! before its reply (resolves once a sink holds the record per its sync mode).
//! Each sink has its own writer thread that group-commits: every record queued
//! while the previous write and fdatasync ran goes out in one `write` and one
//! fdatasync. Each sink keeps its own chain (`seq`, `prev`; see
//! `cipherd_core::audit_chain`); a file sink continues the chain of the file's
//! last line across restarts and into a new file after rotation
//! ([`Auditor::reopen`], on SIGHUP).
//!
//! A sink that fails a write is unhealthy until a later write succeeds; every
//! record is still offered to it, so the record of a call refused for want of a
//! healthy sink is the probe that brings a recovered sink back. This module does
//! not decide what a record holds (the request path fills [`AuditRecord`]) and
//! never sees plaintext, ciphertext or secrets. The format and operations are
//! documented in `docs/audit-log.md`.

mod record;
mod sink;

use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::{Arc, Weak, atomic::Ordering},
};

use serde::Deserialize;
use tokio::sync::{mpsc::error::TrySendError, oneshot};

pub use record::{AuditRecord, ItemCounts, Outcome};

use crate::{Error, config::ConfigError};

/// One `[[audit]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum RawAuditSink {
    /// `type = "file"`.
    File {
        /// The log file (appended to; created with mode 0600).
        path: PathBuf,
        /// `full` (the default): fdatasync before the reply; `none`: no sync.
        #[serde(default)]
        sync: Option<String>,
    },
    /// `type = "stdout"`.
    Stdout {},
}

/// Deserializes the `audit` key: an array of tables (`[[audit]]` in TOML), or a
/// map from index to table, which is what environment variables give
/// (`CIPHERD_SERVER_AUDIT__0__TYPE=stdout`, `CIPHERD_SERVER_AUDIT__1__PATH=…`);
/// the map's entries are taken in index order.
pub fn deserialize_sinks<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<RawAuditSink>, D::Error> {
    struct Sinks;
    impl<'de> serde::de::Visitor<'de> for Sinks {
        type Value = Vec<RawAuditSink>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("[[audit]] tables, or tables keyed by index (0, 1, …)")
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(sink) = seq.next_element()? {
                out.push(sink);
            }
            Ok(out)
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = std::collections::BTreeMap::new();
            while let Some((key, sink)) = map.next_entry::<String, RawAuditSink>()? {
                let index: usize = key.parse().map_err(|_| {
                    serde::de::Error::custom(format!(
                        "audit.{key}: expected an index (audit.0, audit.1, …)"
                    ))
                })?;
                out.insert(index, sink);
            }
            Ok(out.into_values().collect())
        }
    }
    d.deserialize_any(Sinks)
}

/// Validated audit configuration: the sinks, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditParams {
    /// The sinks; never empty when built by [`AuditParams::from_raw`].
    pub sinks: Vec<SinkParams>,
}

/// One validated sink.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SinkParams {
    /// Appends to a file.
    File {
        /// The file.
        path: PathBuf,
        /// When a record counts as written.
        sync: SyncMode,
    },
    /// Writes to standard output (flushed per group; cannot be synced).
    Stdout,
    /// Test only: an in-memory sink whose writes can be made to fail.
    #[cfg(test)]
    Memory(tests::MemoryHandle),
}

/// When a file sink's record counts as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// Written and fdatasync'd: on disk before the reply leaves.
    #[default]
    Full,
    /// Written to the page cache only: a crash or power cut loses the records
    /// not yet flushed by the kernel (typically the last few seconds).
    None,
}

/// The file a dev server audits to when no `[[audit]]` table is given.
pub const DEV_AUDIT_FILE: &str = "audit.log";

impl AuditParams {
    /// Validates the `[[audit]]` tables. Without any, a dev server audits to
    /// `<data_dir>/audit.log`; any other server refuses to start.
    pub fn from_raw(raw: &[RawAuditSink], dev: bool, data_dir: &Path) -> Result<Self, ConfigError> {
        if raw.is_empty() {
            if dev {
                return Ok(Self::file(data_dir.join(DEV_AUDIT_FILE)));
            }
            return Err(ConfigError(
                "at least one [[audit]] sink is required; calls are refused without one (see docs/audit-log.md)".into(),
            ));
        }
        let mut sinks = Vec::with_capacity(raw.len());
        for (i, sink) in raw.iter().enumerate() {
            let params = match sink {
                RawAuditSink::File { path, sync } => {
                    if path.as_os_str().is_empty() {
                        return Err(ConfigError(format!("audit[{i}].path is empty")));
                    }
                    let sync = match sync.as_deref() {
                        None | Some("full") => SyncMode::Full,
                        Some("none") => SyncMode::None,
                        Some(other) => {
                            return Err(ConfigError(format!(
                                "audit[{i}].sync = {other:?}: expected \"full\" or \"none\""
                            )));
                        }
                    };
                    SinkParams::File {
                        path: path.clone(),
                        sync,
                    }
                }
                RawAuditSink::Stdout {} => SinkParams::Stdout,
            };
            if sinks.iter().any(|s| same_sink(s, &params)) {
                return Err(ConfigError(format!(
                    "audit[{i}] repeats an earlier sink; two writers would break each other's chain"
                )));
            }
            sinks.push(params);
        }
        Ok(Self { sinks })
    }

    /// One file sink with `sync = "full"` (tests, embedding, dev mode).
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self {
            sinks: vec![SinkParams::File {
                path: path.into(),
                sync: SyncMode::Full,
            }],
        }
    }
}

fn same_sink(a: &SinkParams, b: &SinkParams) -> bool {
    match (a, b) {
        (SinkParams::File { path: p, .. }, SinkParams::File { path: q, .. }) => p == q,
        (SinkParams::Stdout, SinkParams::Stdout) => true,
        _ => false,
    }
}

/// A file sink's path could not be opened, or its last line not read: the
/// configuration cannot work (a missing directory, a directory as path, no
/// permission). A path that opens but cannot be written (a full disk,
/// `/dev/full`) is not an error here: the server starts and refuses calls.
#[derive(Debug, thiserror::Error)]
#[error("audit file {}: {source}", path.display())]
pub struct OpenError {
    /// The sink's path.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

/// The audit log of one server. Cheap to clone; the sinks' threads write a
/// `stop` record and end when the last clone is dropped (or at [`close`](Self::close)).
#[derive(Clone)]
pub struct Auditor {
    inner: Arc<Inner>,
}

struct Inner {
    sinks: Vec<sink::SinkHandle>,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut list = f.debug_list();
        for s in &self.inner.sinks {
            list.entry(&format_args!(
                "{} ({})",
                s.label,
                if s.healthy.load(Ordering::Relaxed) {
                    "healthy"
                } else {
                    "failing"
                }
            ));
        }
        list.finish()
    }
}

impl Auditor {
    /// Opens every sink and writes its `start` record.
    ///
    /// Fails only when a file sink's path cannot be opened at all ([`OpenError`]).
    /// A sink that opens but cannot be written is logged and left unhealthy: the
    /// server starts, [`ready`](Self::ready) is `Err` and calls are refused until
    /// a sink accepts a record.
    pub async fn open(params: &AuditParams) -> Result<Self, OpenError> {
        let mut sinks = Vec::with_capacity(params.sinks.len());
        for p in &params.sinks {
            let p = p.clone();
            let (handle, thread) = tokio::task::spawn_blocking(move || sink::open(&p))
                .await
                .map_err(|e| OpenError {
                    path: PathBuf::new(),
                    source: std::io::Error::other(e),
                })??;
            tokio::spawn(thread.run());
            sinks.push(handle);
        }
        Ok(Self {
            inner: Arc::new(Inner { sinks }),
        })
    }

    /// `Ok` when at least one sink accepts records; else
    /// [`Error::AuditUnavailable`]. One atomic load per sink: call it before
    /// any of a call's work.
    pub fn ready(&self) -> Result<(), Error> {
        if self
            .inner
            .sinks
            .iter()
            .any(|s| s.healthy.load(Ordering::Acquire))
        {
            Ok(())
        } else {
            Err(Error::AuditUnavailable)
        }
    }

    /// Writes `record` to every sink. The future resolves once every sink has
    /// answered: `Ok` if at least one holds the record per its sync mode (a file
    /// with `sync = "full"`: written and fdatasync'd), else
    /// [`Error::AuditUnavailable`].
    ///
    /// The record is serialized and queued when `record` is called, not when the
    /// future is first polled, and a queued record is written even if the future
    /// is dropped (a client that cancels after the work still leaves its record).
    /// When a sink's queue is full the record waits in a spawned task, so a
    /// tokio runtime must be running.
    pub fn record(
        &self,
        record: AuditRecord,
    ) -> impl Future<Output = Result<(), Error>> + Send + 'static {
        let body = bytes::Bytes::from(record.to_json());
        let waits: Vec<oneshot::Receiver<bool>> = self
            .inner
            .sinks
            .iter()
            .filter_map(|s| {
                let (done, wait) = oneshot::channel();
                let msg = sink::Msg::Record {
                    body: body.clone(),
                    done,
                };
                match s.tx.try_send(msg) {
                    Ok(()) => Some(wait),
                    Err(TrySendError::Full(msg)) => {
                        let tx = s.tx.clone();
                        tokio::spawn(async move {
                            let _ = tx.send(msg).await;
                        });
                        Some(wait)
                    }
                    Err(TrySendError::Closed(_)) => None,
                }
            })
            .collect();
        async move {
            let mut taken = false;
            for wait in waits {
                taken |= wait.await.unwrap_or(false);
            }
            if taken {
                Ok(())
            } else {
                Err(Error::AuditUnavailable)
            }
        }
    }

    /// Reopens every file sink by its path, for log rotation: after logrotate
    /// renamed the file, the chain continues in a new file at the path, whose
    /// first line is a `reopen` record. A path that still names the same file is
    /// left alone; one that cannot be opened is logged and the old file kept.
    pub async fn reopen(&self) {
        let mut waits = Vec::new();
        for s in self.inner.sinks.iter().filter(|s| s.is_file) {
            let (done, wait) = oneshot::channel();
            if s.tx.send(sink::Msg::Reopen { done }).await.is_ok() {
                waits.push(wait);
            }
        }
        for wait in waits {
            let _ = wait.await;
        }
    }

    /// Writes each sink's `stop` record and ends its thread; afterwards
    /// [`ready`](Self::ready) is `Err` and records are refused. Call it once the
    /// server has drained.
    pub async fn close(&self) {
        let mut waits = Vec::new();
        for s in &self.inner.sinks {
            let (done, wait) = oneshot::channel();
            if s.tx.send(sink::Msg::Close { done }).await.is_ok() {
                waits.push(wait);
            }
        }
        for wait in waits {
            let _ = wait.await;
        }
        for s in &self.inner.sinks {
            s.healthy.store(false, Ordering::Release);
        }
    }

    /// Spawns a task that calls [`reopen`](Self::reopen) on every SIGHUP, for as
    /// long as any clone of this `Auditor` lives. Other SIGHUP listeners (TLS
    /// reload) are unaffected.
    pub fn spawn_reopen_on_sighup(&self) -> std::io::Result<tokio::task::JoinHandle<()>> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = signal(SignalKind::hangup())?;
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        Ok(tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                let Some(inner) = weak.upgrade() else {
                    break;
                };
                Auditor { inner }.reopen().await;
            }
        }))
    }
}

#[cfg(test)]
pub(crate) mod tests;
