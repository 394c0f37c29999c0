//! One sink's writer: a task that group-commits queued records.
//!
//! The writer takes every record queued while its previous write ran (up to
//! [`MAX_GROUP`] records or [`MAX_GROUP_BYTES`]), chains them ([`ChainState`]),
//! writes them with one `write` call and answers every waiter. Its queue is
//! bounded ([`QUEUE_CAPACITY`]): when it is full, callers wait.
//!
//! A file with `sync = "full"` has a second stage, the [`Syncer`]: a thread that
//! fdatasyncs and then answers the waiters of every group written since its
//! last sync. The writer never waits for a sync, so while one runs the next
//! group is written, and the next sync covers all of it: syncs run back to back
//! under load, each as large as the calls that arrived during the one before
//! (a WAL writer and its flusher, in a database's terms).
//!
//! [`ChainState`] is the part without I/O: it builds a group's bytes and, told
//! how many of them reached the sink, settles the chain: after a partial write
//! the chain continues from the last whole line, and the fragment left behind is
//! terminated and declared (`torn_bytes`) in the next group's first record, as
//! `cipherd_core::audit_chain` expects.

use std::{
    fs::File,
    io::{self, Write as _},
    os::unix::fs::{FileExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc as std_mpsc,
    },
    time::SystemTime,
};

use bytes::Bytes;
use cipherd_core::audit_chain::ChainHead;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::{OpenError, SinkParams, SyncMode};

/// Records (and control messages) a sink's queue holds; more callers wait.
pub(super) const QUEUE_CAPACITY: usize = 4096;

/// Most records written in one group (one `write`, one fdatasync).
pub(super) const MAX_GROUP: usize = 1024;

/// A group stops taking records once their bodies reach this many bytes (large
/// batch records carry one reference HMAC per item), which bounds the write
/// buffer.
pub(super) const MAX_GROUP_BYTES: usize = 4 << 20;

/// The longest last line read back when continuing a file's chain; a longer one
/// is treated as not an audit record (a new chain starts, and says so).
const MAX_TAIL_LINE: u64 = 64 << 20;

/// What a sink's thread is asked to do.
pub(super) enum Msg {
    /// Write a record (a JSON object without `seq`/`prev`); answer whether the
    /// sink has it per its sync mode.
    Record {
        body: Bytes,
        done: oneshot::Sender<bool>,
    },
    /// Reopen the file by its path (log rotation).
    Reopen { done: oneshot::Sender<()> },
    /// Write the `stop` record and end the thread.
    Close { done: oneshot::Sender<()> },
}

impl Msg {
    /// The record's size (0 for control messages).
    fn len(&self) -> usize {
        match self {
            Msg::Record { body, .. } => body.len(),
            Msg::Reopen { .. } | Msg::Close { .. } => 0,
        }
    }
}

/// The caller's side of one sink.
pub(super) struct SinkHandle {
    /// `file <path>` or `stdout`, for logs.
    pub label: String,
    pub is_file: bool,
    pub tx: mpsc::Sender<Msg>,
    pub healthy: Arc<AtomicBool>,
}

/// Opens a sink and writes its `start` record. Fails only when a file sink's
/// path cannot be opened or its last line read; a failed `start` write leaves
/// the sink unhealthy (it is retried with the next record).
pub(super) fn open(params: &SinkParams) -> Result<(SinkHandle, SinkThread), OpenError> {
    let (target, label, chain, note) = match params {
        SinkParams::File { path, sync } => {
            let (file, tail) = open_file(path).map_err(|source| OpenError {
                path: path.clone(),
                source,
            })?;
            let label = format!("file {}", path.display());
            let (head, needs_newline, torn, note) = match tail {
                Tail::Empty => (ChainHead::GENESIS, false, None, None),
                Tail::Continues {
                    head,
                    needs_newline,
                    torn,
                } => (head, needs_newline, torn, None),
                Tail::Unreadable { why, needs_newline } => {
                    tracing::error!(
                        sink = %label,
                        "the last line of the audit file is not an audit record ({why}); a new chain starts after it"
                    );
                    (
                        ChainHead::GENESIS,
                        needs_newline,
                        None,
                        Some(format!(
                            "the last line before this one is not an audit record ({why}); a new chain starts here"
                        )),
                    )
                }
            };
            let chain_word = if head == ChainHead::GENESIS {
                "new"
            } else {
                "continued"
            };
            let mut chain = ChainState::new(head);
            chain.needs_newline = needs_newline;
            chain.declare_torn = torn;
            chain.pending_note = Some(NoteKind::Start);
            chain.start_chain = Some(chain_word);
            (
                Target::File(FileTarget {
                    path: path.clone(),
                    file: Arc::new(file),
                    sync: *sync,
                }),
                label,
                chain,
                note,
            )
        }
        SinkParams::Stdout => {
            let mut chain = ChainState::new(ChainHead::GENESIS);
            chain.pending_note = Some(NoteKind::Start);
            chain.start_chain = Some("new");
            (Target::Stdout, "stdout".to_owned(), chain, None)
        }
        #[cfg(test)]
        SinkParams::Memory(buf) => {
            let mut chain = ChainState::new(ChainHead::GENESIS);
            chain.pending_note = Some(NoteKind::Start);
            chain.start_chain = Some("new");
            (
                Target::Memory(buf.0.clone()),
                "memory".to_owned(),
                chain,
                None,
            )
        }
    };
    let healthy = Arc::new(AtomicBool::new(false));
    let syncer = match &target {
        Target::File(t) if t.sync == SyncMode::Full => Some(
            Syncer::spawn(label.clone(), healthy.clone()).map_err(|source| OpenError {
                path: t.path.clone(),
                source,
            })?,
        ),
        _ => None,
    };
    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    let mut thread = SinkThread {
        label: label.clone(),
        target,
        chain,
        healthy: healthy.clone(),
        rx,
        start_note: note,
        outbox: Vec::new(),
        syncer,
    };
    // The start record, on disk before any call is served (`open` runs on the
    // blocking pool).
    thread.commit(&mut Vec::new());
    if let Some(syncer) = &thread.syncer {
        let (tx, rx) = oneshot::channel();
        if syncer.send(SyncJob::Flush(tx)) {
            let _ = rx.blocking_recv();
        }
    }
    let handle = SinkHandle {
        is_file: matches!(thread.target, Target::File(_)),
        label,
        tx,
        healthy,
    };
    Ok((handle, thread))
}

/// A sink's writer, run as a task by [`SinkThread::run`].
pub(super) struct SinkThread {
    label: String,
    target: Target,
    chain: ChainState,
    healthy: Arc<AtomicBool>,
    rx: mpsc::Receiver<Msg>,
    /// A remark for the `start` record (why a new chain starts).
    start_note: Option<String>,
    /// Callers of records written, and whether their record is held: answered
    /// by [`answer`](Self::answer).
    outbox: Vec<(oneshot::Sender<bool>, bool)>,
    /// A file with `sync = "full"`: the thread that syncs what was written and
    /// answers its callers.
    syncer: Option<Syncer>,
}

impl SinkThread {
    /// Serves the queue until it is closed (every `Auditor` dropped: writes a
    /// `stop` record) or a `Close` arrives. Runs as a task on the server's
    /// runtime: taking records never crosses threads (a futex wake per record
    /// cost more CPU than the write). Writes happen in place (a `write` to the
    /// page cache or a pipe); with `sync = "full"` the [`Syncer`] answers the
    /// callers once their group is on disk, one thread wake per sync.
    pub(super) async fn run(mut self) {
        let mut msgs = Vec::with_capacity(MAX_GROUP);
        loop {
            let Some(first) = self.rx.recv().await else {
                self.stop();
                self.answer();
                self.flushed().await;
                return;
            };
            let mut bytes = first.len();
            msgs.push(first);
            while msgs.len() < MAX_GROUP && bytes < MAX_GROUP_BYTES {
                match self.rx.try_recv() {
                    Ok(m) => {
                        bytes += m.len();
                        msgs.push(m);
                    }
                    Err(_) => break,
                }
            }
            let close = self.step(&mut msgs);
            self.answer();
            if let Some(done) = close {
                self.flushed().await;
                let _ = done.send(());
                return;
            }
        }
    }

    /// Waits until everything written so far is synced (and its callers
    /// answered); at once without a syncer.
    async fn flushed(&mut self) {
        let Some(syncer) = &self.syncer else {
            return;
        };
        let (tx, rx) = oneshot::channel();
        if syncer.send(SyncJob::Flush(tx)) {
            let _ = rx.await;
        }
    }

    /// Answers the callers of the records written so far.
    fn answer(&mut self) {
        for (done, ok) in self.outbox.drain(..) {
            let _ = done.send(ok);
        }
    }

    /// Handles `msgs` (drained): records are group-committed, control messages
    /// done in order. Once the sink is closed, the `Close` message's sender, to
    /// answer when the last records are synced.
    fn step(&mut self, msgs: &mut Vec<Msg>) -> Option<oneshot::Sender<()>> {
        let mut group: Vec<(Bytes, oneshot::Sender<bool>)> = Vec::with_capacity(msgs.len());
        let mut drain = msgs.drain(..);
        while let Some(msg) = drain.next() {
            match msg {
                Msg::Record { body, done } => group.push((body, done)),
                Msg::Reopen { done } => {
                    self.commit(&mut group);
                    self.reopen(true);
                    let _ = done.send(());
                }
                Msg::Close { done } => {
                    self.commit(&mut group);
                    self.stop();
                    // Refuse whatever was queued behind the close.
                    for m in drain.by_ref() {
                        refuse(m);
                    }
                    self.rx.close();
                    while let Ok(m) = self.rx.try_recv() {
                        refuse(m);
                    }
                    return Some(done);
                }
            }
        }
        drop(drain);
        self.commit(&mut group);
        None
    }

    /// Writes `group` (possibly empty: then only a pending lifecycle record) and
    /// answers its waiters.
    fn commit(&mut self, group: &mut Vec<(Bytes, oneshot::Sender<bool>)>) {
        if let Some(syncer) = &self.syncer {
            let lost = syncer.failed.swap(0, Ordering::AcqRel);
            if lost > 0 {
                // Records whose sync failed: declared by the next lifecycle
                // record, as a failed write's are.
                self.chain.missed += lost;
                self.chain.pending_note.get_or_insert(NoteKind::Resume);
            }
        }
        if group.is_empty() && self.chain.pending_note.is_none() {
            return;
        }
        if !self.healthy.load(Ordering::Relaxed) {
            // Probe: a replaced path (a fixed symlink, a recreated file) is
            // picked up before retrying.
            self.reopen(false);
        }
        let was_healthy = self.healthy.load(Ordering::Relaxed);
        let note = self.chain.pending_note.map(|kind| {
            let meta = self.target.meta();
            Lifecycle {
                time: SystemTime::now(),
                kind: kind.word(),
                sink: meta.0,
                path: meta.1,
                sync: meta.2,
                version: env!("CARGO_PKG_VERSION"),
                pid: std::process::id(),
                chain: if kind == NoteKind::Start {
                    self.chain.start_chain
                } else {
                    None
                },
                torn_bytes: self.chain.torn_to_declare(),
                missed: (self.chain.missed > 0).then_some(self.chain.missed),
                note: if kind == NoteKind::Start {
                    self.start_note.clone()
                } else {
                    None
                },
            }
            .to_json()
        });
        let bytes = self
            .chain
            .build(note.as_deref(), group.iter().map(|(b, _)| &b[..]));
        let (written, result) = self.target.write(bytes);
        let ok = result.is_ok();
        self.chain.settle(written, ok);
        match result {
            // A synced sink is healthy again once a sync succeeds (the syncer's
            // call); a written group is not yet held.
            Ok(()) if self.syncer.is_some() => {
                self.chain.started = true;
                self.start_note = None;
            }
            Ok(()) => {
                if !was_healthy {
                    self.healthy.store(true, Ordering::Release);
                    if self.chain.started {
                        tracing::warn!(sink = %self.label, "audit sink accepts records again");
                    }
                }
                self.chain.started = true;
                self.start_note = None;
            }
            Err(e) => {
                self.healthy.store(false, Ordering::Release);
                if was_healthy || !self.chain.failure_logged {
                    tracing::error!(
                        sink = %self.label,
                        error = %e,
                        "audit sink cannot be written; calls are refused while no audit sink accepts records"
                    );
                    self.chain.failure_logged = true;
                } else {
                    tracing::debug!(sink = %self.label, error = %e, "audit sink still failing");
                }
            }
        }
        match (&self.syncer, &self.target) {
            // Answered by the syncer once the group is on disk.
            (Some(syncer), Target::File(t)) if ok => {
                let waiters = group.drain(..).map(|(_, done)| done).collect();
                if let Err(SyncJob::Group { waiters, .. }) = syncer.submit(SyncJob::Group {
                    file: t.file.clone(),
                    waiters,
                }) {
                    self.outbox
                        .extend(waiters.into_iter().map(|done| (done, false)));
                }
            }
            // Answered by the task that owns the sink (on the runtime), not here.
            _ => self
                .outbox
                .extend(group.drain(..).map(|(_, done)| (done, ok))),
        }
    }

    /// Reopens a file sink by its path. A different file (rotation) gets the
    /// chain's next lines; with `announce` a `reopen` record is written to it at
    /// once. The same file is kept as it is.
    fn reopen(&mut self, announce: bool) {
        let Target::File(t) = &mut self.target else {
            return;
        };
        let replaced = match t.reopen() {
            Ok(Some(tail_needs_newline)) => {
                self.chain.needs_newline = tail_needs_newline;
                true
            }
            Ok(None) => false,
            Err(e) => {
                // Keep the old descriptor: it still works if only the directory
                // changed, and the next reopen tries again.
                tracing::error!(sink = %self.label, error = %e, "reopening the audit file failed; still writing to the old one");
                false
            }
        };
        if replaced {
            tracing::info!(sink = %self.label, "audit file reopened");
            if announce {
                // Mark the new file's first line (or, for a failing sink, probe
                // it at once with the pending `resume`).
                self.chain.pending_note.get_or_insert(NoteKind::Reopen);
                self.commit(&mut Vec::new());
            }
        }
    }

    fn stop(&mut self) {
        if self.healthy.load(Ordering::Relaxed) || self.chain.pending_note.is_some() {
            self.chain.pending_note = Some(NoteKind::Stop);
            self.commit(&mut Vec::new());
        }
        self.healthy.store(false, Ordering::Release);
    }
}

fn refuse(msg: Msg) {
    match msg {
        Msg::Record { done, .. } => {
            let _ = done.send(false);
        }
        Msg::Reopen { done } | Msg::Close { done } => {
            let _ = done.send(());
        }
    }
}

/// What the [`Syncer`] is handed.
enum SyncJob {
    /// A group written to `file`: sync, then answer its callers.
    Group {
        file: Arc<File>,
        waiters: Vec<oneshot::Sender<bool>>,
    },
    /// Answer once every group handed over before it is done.
    Flush(oneshot::Sender<()>),
}

/// The second stage of a `sync = "full"` file sink: a thread that takes every
/// group written since its last sync, fdatasyncs each file once (a sync covers
/// everything written to the file before it began) and answers their callers.
/// A failed sync answers its callers "not taken", marks the sink unhealthy
/// (calls are refused until a write succeeds again) and counts the records for
/// the writer to declare as `missed`.
struct Syncer {
    tx: std_mpsc::Sender<SyncJob>,
    /// Records whose sync failed, not yet declared by the writer.
    failed: Arc<AtomicU64>,
}

impl Syncer {
    fn spawn(label: String, healthy: Arc<AtomicBool>) -> io::Result<Self> {
        let (tx, rx) = std_mpsc::channel::<SyncJob>();
        let failed = Arc::new(AtomicU64::new(0));
        let lost = failed.clone();
        std::thread::Builder::new()
            .name("cipherd-audit-sync".into())
            .spawn(move || {
                let mut jobs = Vec::new();
                let mut state = SyncState {
                    label,
                    healthy,
                    lost,
                    failing: false,
                };
                while let Ok(first) = rx.recv() {
                    jobs.push(first);
                    jobs.extend(rx.try_iter());
                    state.round(&mut jobs);
                }
            })?;
        Ok(Syncer { tx, failed })
    }

    /// Hands `job` over; gives it back if the thread is gone.
    fn submit(&self, job: SyncJob) -> Result<(), SyncJob> {
        self.tx.send(job).map_err(|e| e.0)
    }

    /// Hands `job` over; `false` if the thread is gone.
    fn send(&self, job: SyncJob) -> bool {
        self.submit(job).is_ok()
    }
}

/// The syncer thread's own state.
struct SyncState {
    label: String,
    healthy: Arc<AtomicBool>,
    lost: Arc<AtomicU64>,
    /// The last sync failed (logged once per failure, and once on recovery).
    failing: bool,
}

impl SyncState {
    /// One round over `jobs` (drained), in the order they were written.
    fn round(&mut self, jobs: &mut Vec<SyncJob>) {
        // Each file once: every group in the round was written before the
        // round began, so one sync of its file covers it.
        let mut synced: Vec<(Arc<File>, bool)> = Vec::new();
        for job in jobs.iter() {
            if let SyncJob::Group { file, .. } = job
                && !synced.iter().any(|(f, _)| Arc::ptr_eq(f, file))
            {
                let ok = self.sync(file);
                synced.push((file.clone(), ok));
            }
        }
        for job in jobs.drain(..) {
            match job {
                SyncJob::Group { file, waiters } => {
                    let ok = synced
                        .iter()
                        .find(|(f, _)| Arc::ptr_eq(f, &file))
                        .is_some_and(|(_, ok)| *ok);
                    if !ok {
                        self.lost.fetch_add(waiters.len() as u64, Ordering::AcqRel);
                    }
                    for done in waiters {
                        let _ = done.send(ok);
                    }
                }
                SyncJob::Flush(done) => {
                    let _ = done.send(());
                }
            }
        }
    }

    /// Syncs `file`, keeping the sink's health: unhealthy while syncs fail.
    fn sync(&mut self, file: &File) -> bool {
        match file.sync_data() {
            Ok(()) => {
                self.healthy.store(true, Ordering::Release);
                if std::mem::take(&mut self.failing) {
                    tracing::warn!(sink = %self.label, "audit sink accepts records again");
                }
                true
            }
            Err(e) => {
                self.healthy.store(false, Ordering::Release);
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::error!(
                        sink = %self.label,
                        error = %e,
                        "audit file cannot be synced; calls are refused while no audit sink accepts records"
                    );
                }
                false
            }
        }
    }
}

/// Lifecycle records a sink writes itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoteKind {
    /// The sink opened (server start).
    Start,
    /// The sink accepts records again after failing.
    Resume,
    /// The file was reopened (rotation).
    Reopen,
    /// The server is stopping.
    Stop,
}

impl NoteKind {
    fn word(self) -> &'static str {
        match self {
            NoteKind::Start => "start",
            NoteKind::Resume => "resume",
            NoteKind::Reopen => "reopen",
            NoteKind::Stop => "stop",
        }
    }
}

/// A lifecycle record (`start`, `resume`, `reopen`, `stop`).
#[derive(Serialize)]
struct Lifecycle {
    #[serde(serialize_with = "super::record::serialize_time")]
    time: SystemTime,
    kind: &'static str,
    sink: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sync: Option<&'static str>,
    version: &'static str,
    pid: u32,
    /// `start`: `new` (seq 0) or `continued` (from the file's last line).
    #[serde(skip_serializing_if = "Option::is_none")]
    chain: Option<&'static str>,
    /// The length of the torn fragment on the line before.
    #[serde(skip_serializing_if = "Option::is_none")]
    torn_bytes: Option<u64>,
    /// Records this sink failed to take since its last record.
    #[serde(skip_serializing_if = "Option::is_none")]
    missed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
}

impl Lifecycle {
    fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a lifecycle record always serializes")
    }
}

/// A sink's chain and what it owes the next write: the pure part of a sink.
#[derive(Debug)]
pub(super) struct ChainState {
    /// After the last line wholly written.
    head: ChainHead,
    /// The sink ends in a fragment: the next write starts with a newline.
    needs_newline: bool,
    /// The last torn fragment's length, to declare in the next record.
    declare_torn: Option<u64>,
    /// A lifecycle record to write first in the next group.
    pending_note: Option<NoteKind>,
    /// `start`'s `chain` word.
    start_chain: Option<&'static str>,
    /// Records not confirmed since the last lifecycle record.
    missed: u64,
    /// Whether anything was ever written (to log recovery only after a failure).
    started: bool,
    failure_logged: bool,
    buf: Vec<u8>,
    /// The end offset (past the newline) of each line in `buf`, the head after
    /// it, and whether it is the lifecycle record.
    ends: Vec<(usize, ChainHead, bool)>,
    prefix: usize,
    group_records: u64,
}

impl ChainState {
    pub(super) fn new(head: ChainHead) -> Self {
        ChainState {
            head,
            needs_newline: false,
            declare_torn: None,
            pending_note: None,
            start_chain: None,
            missed: 0,
            started: false,
            failure_logged: false,
            buf: Vec::with_capacity(64 << 10),
            ends: Vec::with_capacity(MAX_GROUP + 1),
            prefix: 0,
            group_records: 0,
        }
    }

    /// The torn fragment's length the next group's lifecycle record declares.
    pub(super) fn torn_to_declare(&self) -> Option<u64> {
        self.declare_torn
    }

    /// The bytes of the next group: a newline if a fragment must be terminated,
    /// the lifecycle record `note` (if any), then one line per body.
    pub(super) fn build<'a>(
        &mut self,
        note: Option<&[u8]>,
        bodies: impl Iterator<Item = &'a [u8]>,
    ) -> &[u8] {
        self.buf.clear();
        self.ends.clear();
        self.prefix = 0;
        if self.needs_newline {
            self.buf.push(b'\n');
            self.prefix = 1;
        }
        let mut head = self.head;
        if let Some(note) = note {
            head.append(&mut self.buf, note);
            self.ends.push((self.buf.len(), head, true));
        }
        self.group_records = 0;
        for body in bodies {
            head.append(&mut self.buf, body);
            self.ends.push((self.buf.len(), head, false));
            self.group_records += 1;
        }
        &self.buf
    }

    /// Settles the chain after the group's write: `written` bytes reached the
    /// sink, and `ok` says whether the whole write (and sync) succeeded.
    pub(super) fn settle(&mut self, written: usize, ok: bool) {
        let note_in_group = self.ends.first().is_some_and(|e| e.2);
        if ok {
            if let Some(&(_, head, _)) = self.ends.last() {
                self.head = head;
            }
            self.needs_newline = false;
            if note_in_group {
                self.pending_note = None;
                self.declare_torn = None;
                self.missed = 0;
            }
            return;
        }
        // Failed. Whole lines that reached the sink are part of the chain; one
        // that lacks only its newline is whole too (the newline comes next).
        let whole = self.ends.iter().take_while(|e| e.0 - 1 <= written).count();
        let mut note_written = false;
        if written >= self.prefix {
            // The newline (if any) terminated the old fragment.
            self.needs_newline = false;
            let mut end = self.prefix;
            if whole > 0 {
                let (e, head, _) = self.ends[whole - 1];
                self.head = head;
                end = e;
                note_written = note_in_group;
            }
            if note_written {
                self.declare_torn = None;
                self.missed = 0;
            }
            if written + 1 == end {
                self.needs_newline = true;
            } else if written > end {
                self.needs_newline = true;
                self.declare_torn = Some((written - end) as u64);
            }
        }
        // Every record of the group is answered "not taken", so every one counts,
        // even those whose lines reached the sink whole.
        self.missed += self.group_records;
        self.pending_note = match self.pending_note {
            Some(kind) if !note_written => Some(kind),
            _ => Some(NoteKind::Resume),
        };
    }
}

/// Where a sink's bytes go.
enum Target {
    File(FileTarget),
    Stdout,
    #[cfg(test)]
    Memory(Arc<std::sync::Mutex<super::tests::MemorySink>>),
}

impl Target {
    /// `sink`, `path` and `sync` of lifecycle records.
    fn meta(&self) -> (&'static str, Option<String>, Option<&'static str>) {
        match self {
            Target::File(t) => (
                "file",
                Some(t.path.display().to_string()),
                Some(match t.sync {
                    SyncMode::Full => "full",
                    SyncMode::None => "none",
                }),
            ),
            Target::Stdout => ("stdout", None, None),
            #[cfg(test)]
            Target::Memory(_) => ("memory", None, None),
        }
    }

    /// Writes all of `bytes` (a file with `sync = "full"` is synced by the
    /// [`Syncer`] afterwards); returns how many bytes were written, and the
    /// first error.
    fn write(&mut self, bytes: &[u8]) -> (usize, io::Result<()>) {
        match self {
            Target::File(t) => write_counted(&mut &*t.file, bytes),
            Target::Stdout => {
                let mut out = io::stdout().lock();
                let (n, r) = write_counted(&mut out, bytes);
                (n, r.and_then(|()| out.flush()))
            }
            #[cfg(test)]
            Target::Memory(m) => m.lock().expect("test sink lock").write(bytes),
        }
    }
}

/// `write` until done or failed, counting what was written (a partial write
/// leaves a fragment the chain must account for).
fn write_counted(w: &mut impl io::Write, bytes: &[u8]) -> (usize, io::Result<()>) {
    let mut n = 0;
    while n < bytes.len() {
        match w.write(&bytes[n..]) {
            Ok(0) => return (n, Err(io::ErrorKind::WriteZero.into())),
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (n, Err(e)),
        }
    }
    (n, Ok(()))
}

struct FileTarget {
    path: PathBuf,
    /// Shared with the [`Syncer`], which syncs the file a group was written to
    /// (the old one, for groups written before a reopen).
    file: Arc<File>,
    sync: SyncMode,
}

impl FileTarget {
    /// Opens the path again; `Some(needs_newline)` when it is another file than
    /// the one being written (which is then replaced), `None` when the same.
    fn reopen(&mut self) -> io::Result<Option<bool>> {
        let (file, tail) = open_file(&self.path)?;
        let (new, old) = (file.metadata()?, self.file.metadata()?);
        if (new.dev(), new.ino()) == (old.dev(), old.ino()) {
            return Ok(None);
        }
        let needs_newline = match tail {
            Tail::Empty => false,
            Tail::Continues { needs_newline, .. } | Tail::Unreadable { needs_newline, .. } => {
                tracing::warn!(
                    path = %self.path.display(),
                    "the reopened audit file is not empty; this server's chain continues in it after the lines already there"
                );
                needs_newline
            }
        };
        self.file = Arc::new(file);
        Ok(Some(needs_newline))
    }
}

/// What the end of an existing file says about its chain.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Tail {
    /// No bytes.
    Empty,
    /// The chain continues after `head`.
    Continues {
        head: ChainHead,
        /// The file does not end with a newline.
        needs_newline: bool,
        /// The bytes after the last newline are a torn fragment of this length.
        torn: Option<u64>,
    },
    /// The last complete line is not an audit record.
    Unreadable { why: String, needs_newline: bool },
}

/// Opens (creating, mode 0600) a file for appending and reads its tail.
fn open_file(path: &Path) -> io::Result<(File, Tail)> {
    let mut options = File::options();
    options.read(true).append(true).mode(0o600);
    let file = match options.clone().create_new(true).open(path) {
        Ok(file) => {
            // A new directory entry: make it durable before relying on the file.
            if let Some(dir) = path.parent() {
                let dir = if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                };
                File::open(dir)?.sync_all()?;
            }
            file
        }
        // Exists (or is a symlink, which O_EXCL never follows).
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => options.create(true).open(path)?,
        Err(e) => return Err(e),
    };
    let tail = read_tail(&file)?;
    Ok((file, tail))
}

/// Reads the file's last complete line (and any fragment after it) from the end,
/// never the whole file.
pub(super) fn read_tail(file: &File) -> io::Result<Tail> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(Tail::Empty);
    }
    let mut window: u64 = 64 << 10;
    loop {
        let start = len.saturating_sub(window);
        let mut data = vec![0; (len - start) as usize];
        file.read_exact_at(&mut data, start)?;
        if let Some(tail) = parse_tail(&data, start == 0) {
            return Ok(tail);
        }
        if window > MAX_TAIL_LINE {
            return Ok(Tail::Unreadable {
                why: format!("longer than {MAX_TAIL_LINE} bytes"),
                needs_newline: data.last() != Some(&b'\n'),
            });
        }
        window *= 4;
    }
}

/// The tail from the file's last bytes; `None` when more bytes are needed (the
/// last line starts before `data`).
fn parse_tail(data: &[u8], at_file_start: bool) -> Option<Tail> {
    let (complete, fragment) = match data.iter().rposition(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None if at_file_start => (&data[..0], data),
        None => return None,
    };
    let needs_newline = !fragment.is_empty();
    // A fragment that is a whole record only lacks its newline.
    if needs_newline && let Ok(head) = ChainHead::after(fragment) {
        return Some(Tail::Continues {
            head,
            needs_newline,
            torn: None,
        });
    }
    let torn = needs_newline.then_some(fragment.len() as u64);
    let last_line = match complete.iter().rposition(|b| *b == b'\n') {
        Some(j) => &complete[j + 1..],
        None if at_file_start => complete,
        None => return None,
    };
    if last_line.is_empty() && at_file_start && complete.is_empty() {
        // Only a fragment: a crash during the file's very first write.
        return Some(Tail::Continues {
            head: ChainHead::GENESIS,
            needs_newline,
            torn,
        });
    }
    Some(match ChainHead::after(last_line) {
        Ok(head) => Tail::Continues {
            head,
            needs_newline,
            torn,
        },
        Err(e) => Tail::Unreadable {
            why: e.to_string(),
            needs_newline,
        },
    })
}

#[cfg(test)]
mod syncer_tests {
    use super::*;

    fn state() -> SyncState {
        SyncState {
            label: "test".into(),
            healthy: Arc::new(AtomicBool::new(false)),
            lost: Arc::new(AtomicU64::new(0)),
            failing: false,
        }
    }

    fn group(file: &Arc<File>, n: usize) -> (SyncJob, Vec<oneshot::Receiver<bool>>) {
        let (waiters, answers) = (0..n).map(|_| oneshot::channel()).unzip();
        (
            SyncJob::Group {
                file: file.clone(),
                waiters,
            },
            answers,
        )
    }

    #[test]
    fn a_synced_round_answers_every_group_and_the_flush_after_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(File::create(dir.path().join("audit.log")).unwrap());
        let mut s = state();
        let (g1, mut a1) = group(&file, 2);
        let (g2, mut a2) = group(&file, 1);
        let (flush, mut flushed) = oneshot::channel();
        let mut jobs = vec![g1, g2, SyncJob::Flush(flush)];
        s.round(&mut jobs);
        assert!(jobs.is_empty());
        for a in a1.iter_mut().chain(a2.iter_mut()) {
            assert_eq!(a.try_recv(), Ok(true));
        }
        assert_eq!(flushed.try_recv(), Ok(()));
        assert!(s.healthy.load(Ordering::Acquire));
        assert_eq!(s.lost.load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_failed_sync_refuses_its_callers_counts_them_and_marks_the_sink_unhealthy() {
        // fdatasync on a pipe fails (EINVAL): a file that takes writes but
        // cannot be synced.
        let (_reader, writer) = io::pipe().unwrap();
        let pipe = Arc::new(File::from(std::os::fd::OwnedFd::from(writer)));
        let dir = tempfile::tempdir().unwrap();
        let good = Arc::new(File::create(dir.path().join("audit.log")).unwrap());
        let mut s = state();
        s.healthy.store(true, Ordering::Release);
        // A reopen between the groups: the old file fails, the new one syncs.
        let (bad, mut refused) = group(&pipe, 3);
        let (fine, mut held) = group(&good, 1);
        s.round(&mut vec![bad, fine]);
        for a in &mut refused {
            assert_eq!(a.try_recv(), Ok(false));
        }
        assert_eq!(held[0].try_recv(), Ok(true));
        assert_eq!(s.lost.load(Ordering::Acquire), 3);
        // The later sync of the good file succeeded: healthy again.
        assert!(s.healthy.load(Ordering::Acquire));

        let (bad, mut refused) = group(&pipe, 1);
        s.round(&mut vec![bad]);
        assert_eq!(refused[0].try_recv(), Ok(false));
        assert!(!s.healthy.load(Ordering::Acquire));
        assert_eq!(s.lost.load(Ordering::Acquire), 4);
    }
}
