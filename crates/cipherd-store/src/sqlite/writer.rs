//! Group commit: the one task that writes to a [`SqliteStore`](super::SqliteStore).
//!
//! With `synchronous=FULL` every `COMMIT` waits for the WAL to reach the disk (an
//! fsync, milliseconds), while the statements of one write take microseconds. One
//! transaction per write would cap the store at one write per fsync however many
//! callers wait. So every write is queued to this task, which runs them in
//! groups:
//!
//! 1. It waits for a write, takes a connection and opens `BEGIN IMMEDIATE`. (If
//!    that fails, the write and those queued behind it fail at once, rather than
//!    each wait out the same busy timeout in turn.)
//! 2. It runs that write inside its own `SAVEPOINT`, then takes the next write
//!    already queued, and so on until the queue is empty or the group holds
//!    [`MAX_GROUP_OPS`] writes or [`MAX_GROUP_BYTES`] of values. It never waits
//!    for more writes to arrive, so an idle store adds no latency: a lone write is
//!    a group of one.
//! 3. It commits once (one fsync for the group), publishes the change-feed events
//!    of the successful writes in commit order, then answers every caller.
//!
//! Each write behaves exactly as if it had run alone, in queue order:
//!
//! - A write sees the effects of the writes before it in its group (a create and
//!   then a compare-and-set on the revision it will get both succeed), and a
//!   successful create or compare-and-set takes the next revision, so revisions
//!   follow queue order. The group reads the store-wide counter once, hands
//!   revisions out in memory and writes the counter back once, inside the same
//!   transaction.
//! - A write whose precondition fails (`AlreadyExists`, `Conflict`, `NotFound`)
//!   changes nothing and takes no revision; a write whose statement fails is
//!   rolled back to its savepoint, undoing its own changes and nothing else. Either
//!   way it gets its own error and the rest of the group goes on.
//! - Nobody hears of success before the `COMMIT` has returned. If the `COMMIT`
//!   fails, or the transaction is lost mid-group (SQLite rolls a transaction back
//!   by itself on some errors, such as a full disk), every write of the group
//!   fails with that error, including writes whose precondition had failed (that
//!   verdict was reached against state that never became durable), and nothing is
//!   announced. The revision counter rolls back with the rest, so those revisions
//!   are issued again later; nobody ever saw them.
//! - Cancellation: a write enters the queue as soon as there is room in it
//!   (during the first poll of its future, unless the queue is full); from then
//!   on this task owns it, so dropping the caller's future neither loses nor
//!   half-applies it. It is committed and announced as usual; only its answer is
//!   discarded. A write dropped while still waiting for room never happens.
//!
//! The queue is bounded ([`MAX_QUEUED_WRITES`]): in a write storm, callers beyond
//! it wait for room (backpressure, in queue order) instead of piling their
//! values up in memory. A cancelled caller's write, once queued, still counts
//! until it has run, so the bound holds however many callers give up.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::{Connection, SqliteConnection, SqlitePool};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::{corrupt, map_sqlx, stored_revision};
use crate::{Change, Error, Result};

/// The most writes one group (one transaction, one fsync) takes.
///
/// Large enough that the fsync is amortized to almost nothing per write; small
/// enough that the first write of a full group waits only a few milliseconds of
/// statements (tens of microseconds per write) for the others.
pub(super) const MAX_GROUP_OPS: usize = 256;

/// The most value bytes one group takes, counted up to and including the write
/// that crosses the limit (a single larger value is a group of its own). Bounds
/// how much one transaction adds to the WAL before it is committed.
pub(super) const MAX_GROUP_BYTES: usize = 4 << 20;

/// The most writes (and close requests) waiting in the queue for the writer task.
///
/// Four full groups: enough that the writer always finds a full group queued
/// while it commits the previous one, so a storm still commits [`MAX_GROUP_OPS`]
/// writes per fsync; small enough that the queued values stay in the low
/// megabytes for typical records. Callers beyond it wait for room.
pub(super) const MAX_QUEUED_WRITES: usize = 4 * MAX_GROUP_OPS;

/// One write, owned so that the writer task can run it after its caller is gone.
pub(super) enum WriteOp {
    /// [`Store::create`](crate::Store::create).
    Create {
        /// Where.
        path: String,
        /// What.
        value: Vec<u8>,
    },
    /// [`Store::compare_and_set`](crate::Store::compare_and_set).
    CompareAndSet {
        /// Where.
        path: String,
        /// The revision the record must still have.
        expected_revision: u64,
        /// What.
        value: Vec<u8>,
    },
    /// [`Store::delete`](crate::Store::delete).
    Delete {
        /// Where.
        path: String,
        /// The revision the record must still have.
        expected_revision: u64,
    },
}

impl WriteOp {
    fn into_path(self) -> String {
        match self {
            Self::Create { path, .. }
            | Self::CompareAndSet { path, .. }
            | Self::Delete { path, .. } => path,
        }
    }

    /// Bytes of value this write stores, for [`MAX_GROUP_BYTES`].
    fn value_len(&self) -> usize {
        match self {
            Self::Create { value, .. } | Self::CompareAndSet { value, .. } => value.len(),
            Self::Delete { .. } => 0,
        }
    }
}

/// What a write resolves to: the new revision, or `None` for a delete.
type Outcome = Result<Option<u64>>;

/// A queued write and the channel its caller awaits.
struct Request {
    op: WriteOp,
    reply: oneshot::Sender<Outcome>,
}

/// What the writer task receives, in order.
enum Message {
    Write(Request),
    /// Close the pool once every write queued before this is done.
    Close(oneshot::Sender<()>),
}

/// Counters of the writer task, for tests and measurements (see
/// [`SqliteStore::write_stats`](super::SqliteStore::write_stats)). Not a stable API.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SqliteWriteStats {
    /// Writes handed to the writer task (counted once queued).
    pub submitted: u64,
    /// Transactions committed, each one fsync.
    pub commits: u64,
    /// Writes answered from committed transactions, whether they succeeded or
    /// failed their own precondition.
    pub committed_ops: u64,
    /// The most writes one committed transaction held.
    pub largest_group: u64,
}

/// The shared counters behind [`SqliteWriteStats`].
#[derive(Default)]
struct Counters {
    submitted: AtomicU64,
    commits: AtomicU64,
    committed_ops: AtomicU64,
    largest_group: AtomicU64,
}

/// The store's handle on its writer task. Dropping it lets the task finish the
/// writes already queued and then stop.
pub(super) struct Writer {
    queue: mpsc::Sender<Message>,
    counters: Arc<Counters>,
}

impl Writer {
    /// Starts the writer task on the current tokio runtime.
    ///
    /// `recycle_broken` allows the task to discard a connection left in an
    /// unknown transaction state after a failure; it must be false for an
    /// in-memory database, whose data lives and dies with its one connection.
    pub(super) fn spawn(
        pool: SqlitePool,
        changes: broadcast::Sender<Change>,
        recycle_broken: bool,
    ) -> Self {
        let (queue, inbox) = mpsc::channel(MAX_QUEUED_WRITES);
        let counters = Arc::new(Counters::default());
        let task = WriterTask {
            pool,
            changes,
            inbox,
            counters: Arc::clone(&counters),
            recycle_broken,
        };
        tokio::spawn(task.run());
        Self { queue, counters }
    }

    /// Queues `op`, waiting for room if the queue is full, and waits for its
    /// outcome. Once queued (on the first poll if there is room) the op will run
    /// even if this future is dropped; dropped before that, it never runs.
    pub(super) async fn write(&self, op: WriteOp) -> Outcome {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Message::Write(Request { op, reply }))
            .await
            .map_err(|_| stopped())?;
        self.counters.submitted.fetch_add(1, Ordering::Relaxed);
        answer.await.map_err(|_| stopped())?
    }

    /// Lets every write queued so far finish, then closes `pool`.
    pub(super) async fn close(&self, pool: &SqlitePool) {
        let (done, closed) = oneshot::channel();
        if self.queue.send(Message::Close(done)).await.is_ok() && closed.await.is_ok() {
            return;
        }
        // The task is gone (its runtime shut down): nothing is queued any more.
        pool.close().await;
    }

    /// A snapshot of the counters.
    pub(super) fn stats(&self) -> SqliteWriteStats {
        let c = &self.counters;
        SqliteWriteStats {
            submitted: c.submitted.load(Ordering::Relaxed),
            commits: c.commits.load(Ordering::Relaxed),
            committed_ops: c.committed_ops.load(Ordering::Relaxed),
            largest_group: c.largest_group.load(Ordering::Relaxed),
        }
    }
}

/// The error for a write whose writer task has stopped (its runtime shut down,
/// or it panicked); the write may or may not have been committed. The store is
/// as good as closed, so this is [`Error::Unavailable`], like a closed store.
fn stopped() -> Error {
    Error::Unavailable("the SQLite writer task has stopped".into())
}

/// The writer task's state.
struct WriterTask {
    pool: SqlitePool,
    changes: broadcast::Sender<Change>,
    inbox: mpsc::Receiver<Message>,
    counters: Arc<Counters>,
    recycle_broken: bool,
}

/// A write that has run in the open transaction, with its own outcome (final only
/// once the transaction commits).
struct Ran {
    request: Request,
    outcome: Outcome,
}

impl WriterTask {
    /// Serves the queue until the store is dropped and the queue is drained.
    async fn run(mut self) {
        while let Some(message) = self.inbox.recv().await {
            let close = match message {
                Message::Write(first) => self.group(first).await,
                Message::Close(done) => Some(done),
            };
            if let Some(done) = close {
                self.pool.close().await;
                // The closer may have stopped waiting; the pool is closed anyway.
                let _ = done.send(());
            }
        }
    }

    /// Runs `first` and whatever is queued behind it as one transaction, then
    /// answers them all. Returns a close request met while taking writes, to be
    /// served after this group.
    async fn group(&mut self, first: Request) -> Option<oneshot::Sender<()>> {
        let mut close = None;
        let mut conn = match self.pool.acquire().await {
            Ok(conn) => conn,
            Err(e) => {
                self.refuse_group(first, &map_sqlx("begin write", e), &mut close);
                return close;
            }
        };
        let mut tx = match conn.begin_with("BEGIN IMMEDIATE").await {
            Ok(tx) => tx,
            Err(e) => {
                self.refuse_group(first, &map_sqlx("begin write", e), &mut close);
                return close;
            }
        };

        let mut ran: Vec<Ran> = Vec::new();
        let filled = self.fill(&mut tx, first, &mut ran, &mut close).await;
        let ended = match filled {
            Ok(()) => tx.commit().await.map_err(|e| map_sqlx("commit", e)),
            Err(fatal) => {
                if let Err(e) = tx.rollback().await {
                    tracing::warn!(error = %e, "SQLite rollback of a failed group failed");
                }
                Err(fatal)
            }
        };
        match ended {
            Ok(()) => {
                self.count_commit(ran.len());
                drop(conn);
                self.publish_and_answer(ran);
            }
            Err(err) => {
                tracing::warn!(
                    error = %err,
                    writes = ran.len(),
                    "SQLite group transaction failed; failing all of its writes"
                );
                // Flush the rollback sqlx queues when a failed commit drops its
                // transaction, then make sure the connection really is out of it.
                let clean = conn.ping().await.is_ok() && !conn.is_in_transaction();
                if !clean && self.recycle_broken {
                    tracing::warn!(
                        "discarding a SQLite connection in an unknown transaction state"
                    );
                    conn.close_on_drop();
                }
                drop(conn);
                for Ran { request, .. } in ran {
                    answer(request.reply, Err(copy_error(&err)));
                }
            }
        }
        close
    }

    /// Runs `first`, then the writes queued behind it, each in its own savepoint
    /// of the open transaction, and finally advances the revision counter past the
    /// revisions they took. Every write taken is pushed onto `ran`, with its own
    /// outcome; a close request met in the queue ends the group and is left in
    /// `close`. `Err` means the transaction is no longer usable and every write
    /// in `ran` must fail.
    async fn fill(
        &mut self,
        conn: &mut SqliteConnection,
        first: Request,
        ran: &mut Vec<Ran>,
        close: &mut Option<oneshot::Sender<()>>,
    ) -> Result<()> {
        let mut revisions = match Revisions::load(conn).await {
            Ok(revisions) => revisions,
            Err(fatal) => {
                ran.push(Ran {
                    request: first,
                    outcome: Ok(None),
                });
                return Err(fatal);
            }
        };
        let mut value_bytes = 0usize;
        let mut next = Some(first);
        while let Some(request) = next.take() {
            value_bytes = value_bytes.saturating_add(request.op.value_len());
            let step = run_in_savepoint(conn, &request.op, &mut revisions).await;
            match step {
                Ok(outcome) => ran.push(Ran { request, outcome }),
                Err(fatal) => {
                    // Its outcome is replaced by `fatal`, like everyone else's.
                    ran.push(Ran {
                        request,
                        outcome: Ok(None),
                    });
                    return Err(fatal);
                }
            }
            if ran.len() >= MAX_GROUP_OPS || value_bytes >= MAX_GROUP_BYTES {
                break;
            }
            next = self.next_queued(close);
        }
        revisions.save(conn).await
    }

    /// Takes the next write already queued, without waiting. Returns `None` if
    /// there is none, or if the next message is a close request, which is then
    /// left in `close` (it ends the group: writes queued after it come after it).
    fn next_queued(&mut self, close: &mut Option<oneshot::Sender<()>>) -> Option<Request> {
        if close.is_some() {
            return None;
        }
        match self.inbox.try_recv() {
            Ok(Message::Write(request)) => Some(request),
            Ok(Message::Close(done)) => {
                *close = Some(done);
                None
            }
            // Empty: the group is complete. Disconnected: the store is gone, and
            // what was queued is still done, for the cancelled callers' sake.
            Err(_) => None,
        }
    }

    /// When a group cannot even begin (no connection, or the database is
    /// locked past the busy timeout): fails `first` and the writes queued behind
    /// it, as many as a group would have taken, rather than make each of them
    /// wait out the same timeout in turn. None of them has happened.
    fn refuse_group(
        &mut self,
        first: Request,
        err: &Error,
        close: &mut Option<oneshot::Sender<()>>,
    ) {
        tracing::warn!(error = %err, "SQLite write group could not begin");
        answer(first.reply, Err(copy_error(err)));
        for _ in 1..MAX_GROUP_OPS {
            let Some(request) = self.next_queued(close) else {
                break;
            };
            answer(request.reply, Err(copy_error(err)));
        }
    }

    /// Updates the counters for one committed group of `writes` writes.
    fn count_commit(&self, writes: usize) {
        let writes = u64::try_from(writes).unwrap_or(u64::MAX);
        let c = &self.counters;
        c.commits.fetch_add(1, Ordering::Relaxed);
        c.committed_ops.fetch_add(writes, Ordering::Relaxed);
        c.largest_group.fetch_max(writes, Ordering::Relaxed);
    }

    /// After a commit: announces the successful writes in commit order, then
    /// answers every caller (so a caller that hears of its write finds it in the
    /// feed already, as before group commit).
    fn publish_and_answer(&self, ran: Vec<Ran>) {
        let mut replies = Vec::with_capacity(ran.len());
        for Ran { request, outcome } in ran {
            if let Ok(revision) = outcome {
                // `send` fails only when nobody is subscribed, which is fine.
                let _ = self.changes.send(Change {
                    path: request.op.into_path(),
                    revision,
                });
            }
            replies.push((request.reply, outcome));
        }
        for (reply, outcome) in replies {
            answer(reply, outcome);
        }
    }
}

/// Answers one caller; a caller that was cancelled no longer listens, which is fine.
fn answer(reply: oneshot::Sender<Outcome>, outcome: Outcome) {
    let _ = reply.send(outcome);
}

/// A group-wide failure, copied for each write of the group.
fn copy_error(err: &Error) -> Error {
    match err {
        Error::Unavailable(message) => Error::Unavailable(message.clone()),
        Error::Corrupt(message) => Error::Corrupt(message.clone()),
        Error::Backend(message) => Error::Backend(message.clone()),
        // Group-wide failures are backend failures; keep any other kind's message.
        other => Error::Backend(other.to_string()),
    }
}

/// The revision counter during one group: read when the group begins, handed
/// out in memory (one revision per successful create or compare-and-set, in
/// queue order) and written back once, in the same transaction, before the
/// commit. Nothing is cached between groups.
struct Revisions {
    /// The counter as stored when the group began.
    stored: i64,
    /// The last revision handed out (`stored` if none yet).
    last: i64,
}

impl Revisions {
    async fn load(conn: &mut SqliteConnection) -> Result<Self> {
        let current: Option<i64> =
            sqlx::query_scalar("SELECT current FROM revision_counter WHERE id = 1")
                .fetch_optional(&mut *conn)
                .await
                .map_err(|e| map_sqlx("read revision counter", e))?;
        // Never recreate a missing counter: starting again from 0 would reuse
        // revisions.
        let current = current.ok_or_else(|| corrupt("the revision counter row is missing"))?;
        Ok(Self {
            stored: current,
            last: current,
        })
    }

    /// The revision the next successful write takes.
    fn next(&self) -> Result<i64> {
        self.last
            .checked_add(1)
            .ok_or_else(|| corrupt("the revision counter is exhausted"))
    }

    async fn save(&self, conn: &mut SqliteConnection) -> Result<()> {
        if self.last == self.stored {
            return Ok(());
        }
        let updated = sqlx::query("UPDATE revision_counter SET current = ?1 WHERE id = 1")
            .bind(self.last)
            .execute(&mut *conn)
            .await
            .map_err(|e| map_sqlx("advance revision counter", e))?
            .rows_affected();
        if updated == 1 {
            Ok(())
        } else {
            Err(corrupt("the revision counter row is missing"))
        }
    }
}

/// Runs `op` inside its own savepoint of the open transaction, taking the next
/// revision from `revisions` if it succeeds.
///
/// `Ok` carries the write's own outcome, with the transaction still usable: on
/// success its changes are kept, on failure they are rolled back to the savepoint.
/// `Err` means the transaction itself is no longer usable, and the whole group
/// must fail.
async fn run_in_savepoint(
    conn: &mut SqliteConnection,
    op: &WriteOp,
    revisions: &mut Revisions,
) -> Result<Outcome> {
    let revision = match revisions.next() {
        Ok(revision) => revision,
        Err(own) => return Ok(Err(own)),
    };
    match apply(conn, op, revision).await {
        Ok(true) => Ok(match op {
            WriteOp::Create { .. } | WriteOp::CompareAndSet { .. } => {
                revisions.last = revision;
                stored_revision(revision).map(Some)
            }
            // A delete takes no revision (it offered `revision` to no record).
            WriteOp::Delete { .. } => Ok(None),
        }),
        Ok(false) => Ok(Err(refusal(conn, op).await)),
        Err(own) => {
            // One of the savepoint's statements failed: undo whatever of this
            // write happened. Every earlier savepoint has been released, so if
            // this one is missing (its `SAVEPOINT` failed, or SQLite rolled the
            // whole transaction back by itself, as it does on errors such as a
            // full disk), `ROLLBACK TO` fails and the group fails with it.
            if let Err(lost) = execute(conn, "ROLLBACK TO write_op", "roll back savepoint").await {
                tracing::warn!(error = %lost, "SQLite savepoint lost; failing the group");
                return Err(copy_error(&own));
            }
            execute(conn, "RELEASE write_op", "release savepoint").await?;
            Ok(Err(own))
        }
    }
}

/// Runs one statement that returns no rows.
async fn execute(conn: &mut SqliteConnection, sql: &'static str, context: &str) -> Result<()> {
    sqlx::query(sql)
        .execute(&mut *conn)
        .await
        .map(|_| ())
        .map_err(|e| map_sqlx(context, e))
}

/// Runs one write in a savepoint, in one round trip to the connection: `SAVEPOINT`,
/// then a single conditional statement whose `WHERE` or `ON CONFLICT` clause is
/// the precondition (so check and change are one atomic step), then `RELEASE`.
/// The change gives the record `revision`.
///
/// Returns whether the write happened; `false` means its precondition failed and
/// nothing was written (the savepoint is released, empty). `Err` means one of the
/// statements failed, and the savepoint may hold part of the write.
async fn apply(conn: &mut SqliteConnection, op: &WriteOp, revision: i64) -> Result<bool> {
    let rows: Vec<i64> = match op {
        WriteOp::Create { path, value } => sqlx::query_scalar(
            "SAVEPOINT write_op; \
             INSERT INTO records (path, value, revision) VALUES (?1, ?2, ?3) \
             ON CONFLICT (path) DO NOTHING RETURNING 1; \
             RELEASE write_op",
        )
        .bind(path.as_str())
        .bind(value.as_slice())
        .bind(revision),
        WriteOp::CompareAndSet {
            path,
            expected_revision,
            value,
        } => {
            // A revision above i64::MAX was never issued, so it cannot match.
            let Ok(expected) = i64::try_from(*expected_revision) else {
                return Ok(false);
            };
            sqlx::query_scalar(
                "SAVEPOINT write_op; \
                 UPDATE records SET value = ?2, revision = ?3 \
                 WHERE path = ?1 AND revision = ?4 RETURNING 1; \
                 RELEASE write_op",
            )
            .bind(path.as_str())
            .bind(value.as_slice())
            .bind(revision)
            .bind(expected)
        }
        WriteOp::Delete {
            path,
            expected_revision,
        } => {
            let Ok(expected) = i64::try_from(*expected_revision) else {
                return Ok(false);
            };
            sqlx::query_scalar(
                "SAVEPOINT write_op; \
                 DELETE FROM records WHERE path = ?1 AND revision = ?2 RETURNING 1; \
                 RELEASE write_op",
            )
            .bind(path.as_str())
            .bind(expected)
        }
    }
    // `fetch_all`, not `fetch_optional`: every statement, `RELEASE` included,
    // must run to completion.
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| map_sqlx("write", e))?;
    // The path is the primary key, so at most one row changes.
    Ok(!rows.is_empty())
}

/// The error for a write whose precondition failed. Only a delete needs a read
/// to tell which: no record at all, or a record at another revision.
async fn refusal(conn: &mut SqliteConnection, op: &WriteOp) -> Error {
    match op {
        WriteOp::Create { path, .. } => Error::AlreadyExists { path: path.clone() },
        // Absent or at another revision: either way the caller's read is stale.
        WriteOp::CompareAndSet { path, .. } => Error::Conflict { path: path.clone() },
        WriteOp::Delete { path, .. } => {
            let present: Result<Option<i64>, _> =
                sqlx::query_scalar("SELECT 1 FROM records WHERE path = ?1")
                    .bind(path.as_str())
                    .fetch_optional(&mut *conn)
                    .await;
            match present {
                Ok(Some(_)) => Error::Conflict { path: path.clone() },
                Ok(None) => Error::NotFound { path: path.clone() },
                Err(e) => map_sqlx("read after a refused delete", e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Group commit made visible: the tests hold every pooled connection so the
    //! writer task, which takes one per group, waits while writes queue behind it;
    //! releasing them lets it run everything queued as one group. Nothing here
    //! depends on timing: waits are for conditions, with a generous deadline.

    use std::collections::{BTreeMap, BTreeSet};
    use std::future::Future;
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Poll;
    use std::time::{Duration, Instant};

    use sqlx::Sqlite;
    use sqlx::pool::PoolConnection;
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    use tokio::task::JoinHandle;

    use super::{MAX_GROUP_OPS, MAX_QUEUED_WRITES};
    use crate::{Change, Error, Record, SqliteStore, Store};

    /// How long any wait for a condition may take before the test fails.
    const DEADLINE: Duration = Duration::from_secs(20);

    async fn memory_store() -> Arc<SqliteStore> {
        Arc::new(
            SqliteStore::in_memory()
                .await
                .expect("open in-memory store"),
        )
    }

    async fn file_store(dir: &Path) -> Arc<SqliteStore> {
        Arc::new(
            SqliteStore::open(&dir.join("cipherd.db"))
                .await
                .expect("open file store"),
        )
    }

    /// Takes every pooled connection: until they are dropped, the writer task
    /// cannot start a group, and writes queue up behind it.
    async fn hold_connections(store: &SqliteStore) -> Vec<PoolConnection<Sqlite>> {
        let mut held = Vec::new();
        for _ in 0..store.pool.options().get_max_connections() {
            held.push(store.pool.acquire().await.expect("hold a connection"));
        }
        held
    }

    /// Waits until `condition` holds, failing the test after [`DEADLINE`].
    async fn wait_for(what: &str, condition: impl Fn() -> bool) {
        let start = Instant::now();
        while !condition() {
            assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Spawns `write` and waits until the writer task has it queued, so that
    /// writes passed here one after another queue in that order.
    async fn queue<T: Send + 'static>(
        store: &SqliteStore,
        write: impl Future<Output = T> + Send + 'static,
    ) -> JoinHandle<T> {
        let before = store.write_stats().submitted;
        let task = tokio::spawn(write);
        wait_for("a write to be queued", || {
            store.write_stats().submitted > before
        })
        .await;
        task
    }

    fn create(
        store: &Arc<SqliteStore>,
        path: &'static str,
        value: &'static [u8],
    ) -> impl Future<Output = crate::Result<u64>> + Send + 'static {
        let store = Arc::clone(store);
        async move { store.create(path, value).await }
    }

    fn cas(
        store: &Arc<SqliteStore>,
        path: &'static str,
        expected: u64,
        value: &'static [u8],
    ) -> impl Future<Output = crate::Result<u64>> + Send + 'static {
        let store = Arc::clone(store);
        async move { store.compare_and_set(path, expected, value).await }
    }

    fn delete(
        store: &Arc<SqliteStore>,
        path: &'static str,
        expected: u64,
    ) -> impl Future<Output = crate::Result<()>> + Send + 'static {
        let store = Arc::clone(store);
        async move { store.delete(path, expected).await }
    }

    async fn outcome<T>(task: JoinHandle<crate::Result<T>>) -> crate::Result<T> {
        task.await.expect("write task panicked")
    }

    fn record(value: &[u8], revision: u64) -> Option<Record> {
        Some(Record {
            value: value.to_vec(),
            revision,
        })
    }

    fn change(path: &str, revision: Option<u64>) -> Change {
        Change {
            path: path.into(),
            revision,
        }
    }

    /// Takes every change already in the feed.
    fn drain(feed: &mut tokio::sync::broadcast::Receiver<Change>) -> Vec<Change> {
        let mut seen = Vec::new();
        loop {
            match feed.try_recv() {
                Ok(change) => seen.push(change),
                Err(TryRecvError::Empty) => return seen,
                Err(e) => panic!("change feed: {e}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_thousand_concurrent_creates_share_a_few_commits() {
        const WRITES: u64 = 1000;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = file_store(dir.path()).await;
        let held = hold_connections(&store).await;
        let mut tasks = Vec::new();
        for i in 0..WRITES {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                store
                    .create(&format!("keys/{i:04}"), &i.to_be_bytes())
                    .await
            }));
        }
        wait_for("every create to be queued", || {
            store.write_stats().submitted == WRITES
        })
        .await;
        drop(held);

        let mut revisions = BTreeSet::new();
        for task in tasks {
            let revision = outcome(task).await.expect("every create succeeds");
            assert!(
                revisions.insert(revision),
                "revision {revision} issued twice"
            );
        }
        // A fresh store issues 1, 2, 3...: distinct, with none skipped.
        assert_eq!(revisions, (1..=WRITES).collect::<BTreeSet<_>>());
        let stats = store.write_stats();
        let groups = WRITES.div_ceil(MAX_GROUP_OPS as u64);
        assert_eq!(stats.committed_ops, WRITES, "{stats:?}");
        assert_eq!(
            stats.commits, groups,
            "{WRITES} queued creates must take {groups} commits: {stats:?}"
        );
        assert_eq!(stats.largest_group, MAX_GROUP_OPS as u64, "{stats:?}");
        let listed = store.list("keys/", None, 2000).await.expect("list");
        assert_eq!(listed.len(), 1000);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_write_in_a_group_gets_its_own_outcome() {
        let store = memory_store().await;
        let existing = store.create("existing", b"e1").await.expect("create");
        let victim = store.create("victim", b"v1").await.expect("create");
        assert_eq!((existing, victim), (1, 2));
        let commits_before = store.write_stats().commits;
        let mut feed = store.subscribe();

        let held = hold_connections(&store).await;
        let new = queue(&store, create(&store, "new", b"n1")).await;
        let dup = queue(&store, create(&store, "existing", b"dup")).await;
        let stale_cas = queue(&store, cas(&store, "existing", victim, b"x")).await;
        let missing_cas = queue(&store, cas(&store, "missing", 1, b"x")).await;
        let missing_delete = queue(&store, delete(&store, "missing", 1)).await;
        let stale_delete = queue(&store, delete(&store, "victim", existing)).await;
        let good_cas = queue(&store, cas(&store, "existing", existing, b"e2")).await;
        // Stale only because of the write just before it, in the same group.
        let raced_cas = queue(&store, cas(&store, "existing", existing, b"x")).await;
        let good_delete = queue(&store, delete(&store, "victim", victim)).await;
        let recreate = queue(&store, create(&store, "victim", b"v2")).await;
        // Taken only because of the first write of the group.
        let dup_new = queue(&store, create(&store, "new", b"x")).await;
        drop(held);

        assert_eq!(outcome(new).await.expect("create new"), 3);
        assert!(
            matches!(outcome(dup).await, Err(Error::AlreadyExists { path }) if path == "existing")
        );
        assert!(
            matches!(outcome(stale_cas).await, Err(Error::Conflict { path }) if path == "existing")
        );
        assert!(
            matches!(outcome(missing_cas).await, Err(Error::Conflict { path }) if path == "missing")
        );
        assert!(
            matches!(outcome(missing_delete).await, Err(Error::NotFound { path }) if path == "missing")
        );
        assert!(
            matches!(outcome(stale_delete).await, Err(Error::Conflict { path }) if path == "victim")
        );
        assert_eq!(outcome(good_cas).await.expect("cas existing"), 4);
        assert!(
            matches!(outcome(raced_cas).await, Err(Error::Conflict { path }) if path == "existing")
        );
        outcome(good_delete).await.expect("delete victim");
        assert_eq!(outcome(recreate).await.expect("re-create victim"), 5);
        assert!(
            matches!(outcome(dup_new).await, Err(Error::AlreadyExists { path }) if path == "new")
        );

        let stats = store.write_stats();
        assert_eq!(stats.commits, commits_before + 1, "one group: {stats:?}");
        assert_eq!(stats.largest_group, 11, "{stats:?}");
        assert_eq!(store.get("new").await.expect("get"), record(b"n1", 3));
        assert_eq!(store.get("existing").await.expect("get"), record(b"e2", 4));
        assert_eq!(store.get("victim").await.expect("get"), record(b"v2", 5));
        assert_eq!(store.get("missing").await.expect("get"), None);
        // Exactly the successful writes are announced, in commit order.
        assert_eq!(
            drain(&mut feed),
            [
                change("new", Some(3)),
                change("existing", Some(4)),
                change("victim", None),
                change("victim", Some(5)),
            ]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn create_then_compare_and_set_in_one_group() {
        let store = memory_store().await;
        let mut feed = store.subscribe();
        let held = hold_connections(&store).await;
        // A fresh store gives the create revision 1, which the next write expects.
        let created = queue(&store, create(&store, "a", b"one")).await;
        let updated = queue(&store, cas(&store, "a", 1, b"two")).await;
        let again = queue(&store, cas(&store, "a", 2, b"three")).await;
        drop(held);

        assert_eq!(outcome(created).await.expect("create"), 1);
        assert_eq!(outcome(updated).await.expect("cas on the create"), 2);
        assert_eq!(outcome(again).await.expect("cas on the cas"), 3);
        let stats = store.write_stats();
        assert_eq!((stats.commits, stats.largest_group), (1, 3), "{stats:?}");
        assert_eq!(store.get("a").await.expect("get"), record(b"three", 3));
        assert_eq!(
            drain(&mut feed),
            [
                change("a", Some(1)),
                change("a", Some(2)),
                change("a", Some(3))
            ]
        );
    }

    /// Adds to a test database a table and trigger that make any transaction
    /// which creates the record `poison` fail at `COMMIT` (a deferred foreign key
    /// is checked only then), and a trigger that makes creating `half` fail
    /// half-way: `RAISE(FAIL)` keeps the row the statement already inserted, so
    /// only the write's savepoint can undo it.
    async fn add_failure_triggers(store: &SqliteStore) {
        sqlx::raw_sql(
            "CREATE TABLE test_parent (id INTEGER PRIMARY KEY); \
             CREATE TABLE test_child (parent INTEGER \
                 REFERENCES test_parent (id) DEFERRABLE INITIALLY DEFERRED); \
             CREATE TRIGGER test_poison AFTER INSERT ON records \
                 WHEN NEW.path = 'poison' \
                 BEGIN INSERT INTO test_child VALUES (1); END; \
             CREATE TRIGGER test_half AFTER INSERT ON records \
                 WHEN NEW.path = 'half' \
                 BEGIN SELECT RAISE(FAIL, 'refused by test trigger'); END;",
        )
        .execute(&store.pool)
        .await
        .expect("add test triggers");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_commit_fails_every_write_of_the_group() {
        let store = memory_store().await;
        add_failure_triggers(&store).await;
        let before = store.create("before", b"b1").await.expect("create");
        let commits_before = store.write_stats().commits;
        let mut feed = store.subscribe();

        let held = hold_connections(&store).await;
        let x = queue(&store, create(&store, "x", b"x")).await;
        // Refused against state that will never be committed.
        let dup_x = queue(&store, create(&store, "x", b"x")).await;
        let poison = queue(&store, create(&store, "poison", b"p")).await;
        let update = queue(&store, cas(&store, "before", before, b"b2")).await;
        drop(held);

        for (name, result) in [
            ("create x", outcome(x).await),
            ("create x again", outcome(dup_x).await),
            ("create poison", outcome(poison).await),
            ("cas before", outcome(update).await),
        ] {
            assert!(
                matches!(&result, Err(Error::Backend(m)) if m.contains("commit")),
                "{name}: expected the commit's error, got {result:?}"
            );
        }
        assert_eq!(store.write_stats().commits, commits_before);
        assert_eq!(store.get("x").await.expect("get"), None);
        assert_eq!(store.get("poison").await.expect("get"), None);
        assert_eq!(
            store.get("before").await.expect("get"),
            record(b"b1", before)
        );

        // The connection is usable again, and the revisions the failed group
        // took were never seen, so they are issued again.
        let after = store.create("after", b"a").await.expect("create after");
        assert_eq!(after, before + 1);
        assert_eq!(drain(&mut feed), [change("after", Some(after))]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_failing_half_way_is_rolled_back_alone() {
        let store = memory_store().await;
        add_failure_triggers(&store).await;
        let mut feed = store.subscribe();
        let held = hold_connections(&store).await;
        let a = queue(&store, create(&store, "a", b"a")).await;
        let half = queue(&store, create(&store, "half", b"h")).await;
        let b = queue(&store, create(&store, "b", b"b")).await;
        drop(held);

        assert_eq!(outcome(a).await.expect("create a"), 1);
        let failed = outcome(half).await;
        assert!(
            matches!(&failed, Err(Error::Backend(m)) if m.contains("refused by test trigger")),
            "{failed:?}"
        );
        assert_eq!(outcome(b).await.expect("create b"), 2);
        let stats = store.write_stats();
        assert_eq!((stats.commits, stats.largest_group), (1, 3), "{stats:?}");
        // The row the failed statement kept was rolled back with its savepoint.
        assert_eq!(store.get("half").await.expect("get"), None);
        assert_eq!(store.list("", None, 10).await.expect("list"), ["a", "b"]);
        assert_eq!(
            drain(&mut feed),
            [change("a", Some(1)), change("b", Some(2))]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_storm_waits_for_room_instead_of_growing_the_queue() {
        const EXTRA: usize = 50;
        let store = memory_store().await;
        let held = hold_connections(&store).await;
        // The writer takes one write and waits for a connection for it; the queue
        // then holds MAX_QUEUED_WRITES more, and every caller after that waits.
        let storm = MAX_QUEUED_WRITES + 1 + EXTRA;
        let started = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..storm {
            let store = Arc::clone(&store);
            let started = Arc::clone(&started);
            tasks.push(tokio::spawn(async move {
                let path = format!("storm/{i:05}");
                let mut write = std::pin::pin!(store.create(&path, b"v"));
                // A write that finds room is queued during its first poll.
                let first = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
                started.fetch_add(1, Ordering::SeqCst);
                match first {
                    Poll::Ready(done) => done,
                    Poll::Pending => write.await,
                }
            }));
        }
        wait_for("every write to have been polled once", || {
            started.load(Ordering::SeqCst) == storm
        })
        .await;
        wait_for("the queue to fill", || {
            store.write_stats().submitted == (MAX_QUEUED_WRITES + 1) as u64
        })
        .await;
        tokio::task::yield_now().await;
        assert_eq!(
            store.write_stats().submitted,
            (MAX_QUEUED_WRITES + 1) as u64,
            "writes beyond the queue's capacity must wait, not queue"
        );

        drop(held);
        for task in tasks {
            outcome(task)
                .await
                .expect("every write of the storm succeeds");
        }
        let stats = store.write_stats();
        assert_eq!(stats.committed_ops, storm as u64, "{stats:?}");
        // Still group-committed: full groups, far fewer commits than writes.
        assert_eq!(stats.largest_group, MAX_GROUP_OPS as u64, "{stats:?}");
        assert!(
            stats.commits <= storm.div_ceil(MAX_GROUP_OPS) as u64 + 4,
            "{stats:?}"
        );
    }

    #[tokio::test]
    async fn sequential_writes_are_groups_of_one() {
        let store = memory_store().await;
        // Each write is awaited before the next: every one is a group of one,
        // committed without waiting for company.
        let mut revision = store.create("a", b"0").await.expect("create");
        for i in 1..=20u8 {
            revision = store
                .compare_and_set("a", revision, &[i])
                .await
                .expect("cas");
        }
        let stats = store.write_stats();
        assert_eq!(
            (stats.submitted, stats.commits, stats.largest_group),
            (21, 21, 1),
            "{stats:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn close_waits_for_the_writes_queued_before_it() {
        let store = memory_store().await;
        let held = hold_connections(&store).await;
        let mut writes = Vec::new();
        for path in ["a", "b", "c"] {
            writes.push(queue(&store, create(&store, path, b"v")).await);
        }
        let closing = tokio::spawn({
            let store = Arc::clone(&store);
            async move { store.close().await }
        });
        drop(held);
        closing.await.expect("close");
        for write in writes {
            outcome(write).await.expect("a write queued before close");
        }
        assert!(matches!(
            store.create("d", b"v").await,
            Err(Error::Unavailable(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_queued_behind_a_group_that_cannot_begin_fail_with_it() {
        let store = memory_store().await;
        let held = hold_connections(&store).await;
        let mut writes = Vec::new();
        for path in ["a", "b", "c"] {
            writes.push(queue(&store, create(&store, path, b"v")).await);
        }
        // The writer waits for a connection for the first write; closing the
        // pool under it makes the group fail before it begins.
        let closing = tokio::spawn({
            let pool = store.pool.clone();
            async move { pool.close().await }
        });
        for write in writes {
            let result = outcome(write).await;
            assert!(
                matches!(&result, Err(Error::Unavailable(m)) if m.contains("begin write")),
                "{result:?}"
            );
        }
        drop(held);
        closing.await.expect("close");
        assert_eq!(store.write_stats().commits, 0);
    }

    /// What one task of the change-feed test did, in its own order.
    type Done = Vec<(String, Option<u64>)>;

    /// One task's work: its own record through create, updates, delete and
    /// re-create, and increments of a shared counter that races every other task.
    async fn churn(store: Arc<SqliteStore>, task: usize) -> Done {
        let own = format!("own/{task:02}");
        let mut done = Vec::new();
        let mut revision = store.create(&own, b"0").await.expect("create own");
        done.push((own.clone(), Some(revision)));
        for i in 1..=5u8 {
            revision = store
                .compare_and_set(&own, revision, &[i])
                .await
                .expect("cas own");
            done.push((own.clone(), Some(revision)));
        }
        store.delete(&own, revision).await.expect("delete own");
        done.push((own.clone(), None));
        let revision = store.create(&own, b"again").await.expect("re-create own");
        done.push((own.clone(), Some(revision)));
        for _ in 0..3 {
            loop {
                let current = store
                    .get("shared")
                    .await
                    .expect("get shared")
                    .expect("shared exists");
                match store
                    .compare_and_set("shared", current.revision, &[1])
                    .await
                {
                    Ok(revision) => {
                        done.push(("shared".into(), Some(revision)));
                        break;
                    }
                    Err(Error::Conflict { .. }) => tokio::task::yield_now().await,
                    Err(e) => panic!("cas shared: {e}"),
                }
            }
        }
        done
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn change_feed_follows_revision_order_under_concurrency() {
        const TASKS: usize = 32;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = file_store(dir.path()).await;
        let shared = store.create("shared", b"0").await.expect("create shared");
        let mut feed = store.subscribe();
        let collector = tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                match feed.recv().await {
                    Ok(change) => seen.push(change),
                    Err(RecvError::Closed) => return seen,
                    Err(RecvError::Lagged(n)) => panic!("collector lagged by {n}"),
                }
            }
        });

        // Start every task's first write in one group, then let them race.
        let held = hold_connections(&store).await;
        let tasks: Vec<_> = (0..TASKS)
            .map(|task| tokio::spawn(churn(Arc::clone(&store), task)))
            .collect();
        wait_for("every task's first write", || {
            store.write_stats().submitted == 1 + TASKS as u64
        })
        .await;
        drop(held);
        let mut done: Vec<Done> = Vec::new();
        for task in tasks {
            done.push(task.await.expect("task"));
        }
        let stats = store.write_stats();
        assert!(stats.largest_group >= TASKS as u64, "{stats:?}");
        // Dropping the store (after the tasks' clones) closes the feed once the
        // writer has finished; the collector then returns everything announced.
        drop(store);
        let seen = collector.await.expect("collector");

        // Store-wide: the announced revisions strictly increase, as committed.
        let revisions: Vec<u64> = seen.iter().filter_map(|c| c.revision).collect();
        assert!(
            revisions.windows(2).all(|w| w[0] < w[1]),
            "feed out of revision order: {revisions:?}"
        );
        // Per path: the feed shows exactly the successful writes, in the order
        // they succeeded (deletes included), and nothing else.
        let mut announced: BTreeMap<String, Vec<Option<u64>>> = BTreeMap::new();
        for c in &seen {
            announced
                .entry(c.path.clone())
                .or_default()
                .push(c.revision);
        }
        let mut shared_writes = Vec::new();
        for (task, writes) in done.iter().enumerate() {
            let own = format!("own/{task:02}");
            let own_writes: Vec<Option<u64>> = writes
                .iter()
                .filter(|(path, _)| *path == own)
                .map(|(_, r)| *r)
                .collect();
            assert_eq!(announced.get(&own), Some(&own_writes), "{own}");
            shared_writes.extend(
                writes
                    .iter()
                    .filter(|(path, _)| path == "shared")
                    .map(|(_, r)| *r),
            );
        }
        shared_writes.sort_unstable();
        assert_eq!(shared_writes.len(), 3 * TASKS);
        assert!(shared_writes.iter().all(|r| r.is_some_and(|r| r > shared)));
        assert_eq!(announced.get("shared"), Some(&shared_writes));
        assert_eq!(announced.len(), TASKS + 1);
    }
}
