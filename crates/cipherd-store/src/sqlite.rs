//! The SQLite backend, cipherd's embedded default: one database file, WAL
//! journal, `synchronous=FULL` (a write is on disk before it is acknowledged).
//!
//! Schema: `records(path, value, revision)` and a one-row `revision_counter`
//! advanced in the same transaction as the writes that take revisions (see
//! `migrations/sqlite/0001_records.sql`). Migrations are compiled into the binary
//! and run by sqlx's `Migrator` on every open.
//!
//! Concurrency: reads run on a small connection pool, in parallel under WAL.
//! Writes go through one writer task ([`writer`]) that commits them in groups:
//! every write queued while the previous group was committing goes into one
//! `BEGIN IMMEDIATE` transaction, each in its own `SAVEPOINT`, and one `COMMIT`,
//! so concurrent writers share one fsync instead of queueing for one each. Each
//! write still behaves as if it ran alone (see the [`writer`] module for how),
//! the change feed stays in commit order, and a lone write is committed at once.
//! `BEGIN IMMEDIATE` takes the write lock at the start of the transaction, so the
//! writer can never deadlock with another connection upgrading a read lock (the
//! classic `SQLITE_BUSY` trap of deferred transactions). Because the writer task
//! owns every write from the moment it is queued, a caller that is cancelled
//! cannot leave a write half-applied or committed but unannounced.
//!
//! This backend does not share a database between processes: open one file from
//! one `cipherd` at a time. For several replicas use the PostgreSQL backend.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{SqlSafeStr, Sqlite, Transaction};
use tokio::sync::broadcast;

use crate::path::KeyRange;
use crate::{CHANGE_FEED_CAPACITY, Change, Error, Import, Record, Result, Snapshot, Store, path};

mod writer;

pub use writer::SqliteWriteStats;
use writer::{WriteOp, Writer};

/// How long a connection waits on a database lock held by another connection
/// before failing with [`Error::Unavailable`].
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an operation waits for a free pooled connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// Pool size for a file store: enough for parallel WAL readers beside the one
/// writer, small because SQLite serializes writes anyway.
const FILE_POOL_SIZE: u32 = 4;

/// The SQLite [`Store`]: one database file (or a private in-memory database).
///
/// Concurrent writes are group-committed: a writer task runs every write queued
/// while it was busy in one transaction with one fsync, each write in its own
/// savepoint so that it succeeds or fails on its own, exactly as the [`Store`]
/// contract says (see the crate docs, "Group commit"). A lone write is committed
/// at once, without waiting for company.
///
/// The constructors start that writer task on the current tokio runtime; use the
/// store within that runtime (if the runtime shuts down, writes fail with
/// [`Error::Unavailable`]). When the store is dropped, the writer finishes the writes
/// already queued, then stops and closes the change feed.
///
/// Cloning is not offered: share it as `Arc<SqliteStore>` or `Arc<dyn Store>`.
pub struct SqliteStore {
    pool: SqlitePool,
    changes: broadcast::Sender<Change>,
    /// The group-commit writer task, through which every write goes.
    writer: Writer,
    location: Location,
}

impl SqliteStore {
    /// Opens (creating if missing) the database file at `path`, applies pending
    /// migrations and checks the revision counter.
    ///
    /// On unix a new file is created with mode 0600; an existing file with group
    /// or other permissions is opened, with a warning in the log. The parent
    /// directory must exist.
    ///
    /// Fails with [`Error::Backend`] if the file cannot be opened, was written by
    /// a newer cipherd (it has migrations this build does not know), has a
    /// modified migration history, or is inconsistent (a record whose revision is
    /// above the revision counter): cipherd then refuses to start rather than risk
    /// reusing a revision.
    pub async fn open(path: &Path) -> Result<Self> {
        create_private_file(path).await?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(FILE_POOL_SIZE)
            .min_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|e| {
                map_sqlx(
                    &format!("cannot open SQLite database {}", path.display()),
                    e,
                )
            })?;
        let store = Self::init(pool, Location::File(path.to_owned())).await?;
        tracing::info!(path = %path.display(), "opened SQLite store");
        Ok(store)
    }

    /// Opens a fresh private in-memory database, for tests. Its data lives as long
    /// as the store (it uses a single connection that is never recycled).
    pub async fn in_memory() -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .in_memory(true)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        // Every SQLite connection to ":memory:" is a separate database, so the pool
        // must hold exactly one connection and never close it.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|e| map_sqlx("cannot open in-memory SQLite database", e))?;
        Self::init(pool, Location::Memory).await
    }

    /// Waits for the writes queued before this call and for reads in flight,
    /// then closes every connection (letting SQLite checkpoint the WAL into the
    /// main file). Later operations fail with [`Error::Unavailable`]. Dropping the
    /// store without closing is also safe: every acknowledged write is already
    /// durable, and writes still queued are committed before the writer stops.
    pub async fn close(&self) {
        self.writer.close(&self.pool).await;
        tracing::info!(location = %self.location, "closed SQLite store");
    }

    /// Counters of the group-commit writer (writes queued, commits, group sizes),
    /// for tests and measurements. Not a stable API.
    #[doc(hidden)]
    pub fn write_stats(&self) -> SqliteWriteStats {
        self.writer.stats()
    }

    /// Runs migrations and the consistency check shared by both constructors.
    async fn init(pool: SqlitePool, location: Location) -> Result<Self> {
        migrator().run(&pool).await.map_err(map_migrate)?;
        check_revision_counter(&pool).await?;
        let (changes, _) = broadcast::channel(CHANGE_FEED_CAPACITY);
        // An in-memory database lives in its one connection, which must never be
        // discarded, whatever state a failure leaves it in.
        let recycle_broken = matches!(location, Location::File(_));
        let writer = Writer::spawn(pool.clone(), changes.clone(), recycle_broken);
        Ok(Self {
            pool,
            changes,
            writer,
            location,
        })
    }

    /// Queues one write to the writer task and waits for its outcome: the new
    /// revision, or `None` for a delete.
    async fn write(&self, op: WriteOp) -> Result<Option<u64>> {
        self.writer.write(op).await
    }
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn get(&self, path: &str) -> Result<Option<Record>> {
        path::validate(path)?;
        let row: Option<(Vec<u8>, i64)> =
            sqlx::query_as("SELECT value, revision FROM records WHERE path = ?1")
                .bind(path)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| map_sqlx("read", e))?;
        row.map(|(value, revision)| {
            Ok(Record {
                value,
                revision: stored_revision(revision)?,
            })
        })
        .transpose()
    }

    async fn create(&self, path: &str, value: &[u8]) -> Result<u64> {
        path::validate(path)?;
        let op = WriteOp::Create {
            path: path.to_owned(),
            value: value.to_vec(),
        };
        self.write(op).await?.ok_or_else(missing_revision)
    }

    async fn compare_and_set(
        &self,
        path: &str,
        expected_revision: u64,
        value: &[u8],
    ) -> Result<u64> {
        path::validate(path)?;
        let op = WriteOp::CompareAndSet {
            path: path.to_owned(),
            expected_revision,
            value: value.to_vec(),
        };
        self.write(op).await?.ok_or_else(missing_revision)
    }

    async fn delete(&self, path: &str, expected_revision: u64) -> Result<()> {
        path::validate(path)?;
        let op = WriteOp::Delete {
            path: path.to_owned(),
            expected_revision,
        };
        self.write(op).await.map(|_| ())
    }

    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>> {
        let Some(range) = KeyRange::new(prefix, start_after, limit)? else {
            return Ok(Vec::new());
        };
        // Four static statements rather than `?n IS NULL OR ...`, so SQLite plans
        // each as a plain range scan of the primary-key index.
        let query = match (range.after, &range.upper) {
            (None, None) => sqlx::query_scalar(
                "SELECT path FROM records WHERE path >= ?1 ORDER BY path LIMIT ?3",
            ),
            (None, Some(_)) => sqlx::query_scalar(
                "SELECT path FROM records WHERE path >= ?1 AND path < ?2 ORDER BY path LIMIT ?3",
            ),
            (Some(_), None) => sqlx::query_scalar(
                "SELECT path FROM records WHERE path > ?1 ORDER BY path LIMIT ?3",
            ),
            (Some(_), Some(_)) => sqlx::query_scalar(
                "SELECT path FROM records WHERE path > ?1 AND path < ?2 ORDER BY path LIMIT ?3",
            ),
        };
        query
            .bind(range.after.unwrap_or(prefix))
            .bind(range.upper.as_deref())
            .bind(range.limit)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| map_sqlx("list", e))
    }

    async fn scan(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Record)>> {
        let Some(range) = KeyRange::new(prefix, start_after, limit)? else {
            return Ok(Vec::new());
        };
        // As in `list`: four static statements, each a plain index range scan.
        let query = match (range.after, &range.upper) {
            (None, None) => sqlx::query_as(
                "SELECT path, value, revision FROM records WHERE path >= ?1 ORDER BY path LIMIT ?3",
            ),
            (None, Some(_)) => sqlx::query_as(
                "SELECT path, value, revision FROM records WHERE path >= ?1 AND path < ?2 ORDER BY path LIMIT ?3",
            ),
            (Some(_), None) => sqlx::query_as(
                "SELECT path, value, revision FROM records WHERE path > ?1 ORDER BY path LIMIT ?3",
            ),
            (Some(_), Some(_)) => sqlx::query_as(
                "SELECT path, value, revision FROM records WHERE path > ?1 AND path < ?2 ORDER BY path LIMIT ?3",
            ),
        };
        let rows: Vec<(String, Vec<u8>, i64)> = query
            .bind(range.after.unwrap_or(prefix))
            .bind(range.upper.as_deref())
            .bind(range.limit)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| map_sqlx("scan", e))?;
        rows.into_iter()
            .map(|(path, value, revision)| {
                let revision = stored_revision(revision)?;
                Ok((path, Record { value, revision }))
            })
            .collect()
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// On a file, one deferred read transaction on a pooled connection: its
    /// first statement (the count) fixes the WAL snapshot every page reads. An
    /// in-memory database has one connection, which the writer needs too, so
    /// its snapshot is read whole by one statement (itself a snapshot) up front.
    async fn snapshot(&self) -> Result<Box<dyn Snapshot>> {
        match self.location {
            Location::File(_) => {
                let mut tx = self
                    .pool
                    .begin()
                    .await
                    .map_err(|e| map_sqlx("begin snapshot", e))?;
                let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM records")
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(|e| map_sqlx("snapshot count", e))?;
                Ok(Box::new(SqliteSnapshot::Transaction {
                    tx,
                    count: stored_count(count)?,
                    after: None,
                }))
            }
            Location::Memory => {
                let rows: Vec<(String, Vec<u8>, i64)> =
                    sqlx::query_as("SELECT path, value, revision FROM records ORDER BY path")
                        .fetch_all(&self.pool)
                        .await
                        .map_err(|e| map_sqlx("snapshot", e))?;
                let rows = rows_to_records(rows)?;
                Ok(Box::new(SqliteSnapshot::Loaded {
                    count: rows.len() as u64,
                    rows: rows.into(),
                }))
            }
        }
    }

    /// One `BEGIN IMMEDIATE` transaction, so the group-commit writer (and any
    /// other connection) waits for it; the emptiness check runs inside it.
    async fn import(&self) -> Result<Box<dyn Import>> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| map_sqlx("begin import", e))?;
        let (any, counter): (bool, Option<i64>) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM records), \
                    (SELECT current FROM revision_counter WHERE id = 1)",
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| map_sqlx("import: check the store is empty", e))?;
        if any {
            return Err(Error::NotEmpty);
        }
        let counter = counter.ok_or_else(|| corrupt("the revision counter row is missing"))?;
        Ok(Box::new(SqliteImport {
            tx,
            counter,
            count: 0,
            changes: self.changes.clone(),
        }))
    }

    /// A trivial read of the database (the revision counter's one row), so that
    /// a file that cannot be read, not only a closed pool, fails the ping.
    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT current FROM revision_counter WHERE id = 1")
            .fetch_optional(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| map_sqlx("ping", e))
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("location", &format_args!("{}", self.location))
            .field("subscribers", &self.changes.receiver_count())
            .finish_non_exhaustive()
    }
}

/// A [`Snapshot`] of a [`SqliteStore`].
enum SqliteSnapshot {
    /// A file store: pages read in one read transaction, after `after`.
    Transaction {
        tx: Transaction<'static, Sqlite>,
        count: u64,
        after: Option<String>,
    },
    /// An in-memory store: every record, read by one statement.
    Loaded {
        rows: VecDeque<(String, Record)>,
        count: u64,
    },
}

#[async_trait::async_trait]
impl Snapshot for SqliteSnapshot {
    fn record_count(&self) -> u64 {
        match self {
            Self::Transaction { count, .. } | Self::Loaded { count, .. } => *count,
        }
    }

    async fn next_page(&mut self, limit: usize) -> Result<Vec<(String, Record)>> {
        let limit = limit.max(1);
        match self {
            Self::Loaded { rows, .. } => {
                let n = limit.min(rows.len());
                Ok(rows.drain(..n).collect())
            }
            Self::Transaction { tx, after, .. } => {
                let limit = i64::try_from(limit).unwrap_or(i64::MAX);
                let rows: Vec<(String, Vec<u8>, i64)> = match after {
                    None => {
                        sqlx::query_as(
                            "SELECT path, value, revision FROM records ORDER BY path LIMIT ?1",
                        )
                        .bind(limit)
                        .fetch_all(&mut **tx)
                        .await
                    }
                    Some(after) => {
                        sqlx::query_as(
                            "SELECT path, value, revision FROM records WHERE path > ?1 \
                         ORDER BY path LIMIT ?2",
                        )
                        .bind(after.as_str())
                        .bind(limit)
                        .fetch_all(&mut **tx)
                        .await
                    }
                }
                .map_err(|e| map_sqlx("snapshot page", e))?;
                let rows = rows_to_records(rows)?;
                if let Some((last, _)) = rows.last() {
                    *after = Some(last.clone());
                }
                Ok(rows)
            }
        }
    }
}

/// An [`Import`] into a [`SqliteStore`]: one `BEGIN IMMEDIATE` transaction,
/// revisions taken from the counter in memory and written back at the commit
/// (as the writer does for a group).
struct SqliteImport {
    tx: Transaction<'static, Sqlite>,
    /// The last revision issued (the counter as it will be written back).
    counter: i64,
    count: u64,
    changes: broadcast::Sender<Change>,
}

#[async_trait::async_trait]
impl Import for SqliteImport {
    async fn put(&mut self, path: &str, value: &[u8]) -> Result<()> {
        path::validate(path)?;
        let revision = self
            .counter
            .checked_add(1)
            .ok_or_else(|| corrupt("the revision counter is exhausted"))?;
        let inserted = sqlx::query(
            "INSERT INTO records (path, value, revision) VALUES (?1, ?2, ?3) \
             ON CONFLICT (path) DO NOTHING",
        )
        .bind(path)
        .bind(value)
        .bind(revision)
        .execute(&mut *self.tx)
        .await
        .map_err(|e| map_sqlx("import", e))?;
        if inserted.rows_affected() == 0 {
            return Err(Error::AlreadyExists { path: path.into() });
        }
        self.counter = revision;
        self.count += 1;
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<u64> {
        sqlx::query("UPDATE revision_counter SET current = ?1 WHERE id = 1")
            .bind(self.counter)
            .execute(&mut *self.tx)
            .await
            .map_err(|e| map_sqlx("import: advance the revision counter", e))?;
        let Self {
            tx, count, changes, ..
        } = *self;
        tx.commit()
            .await
            .map_err(|e| map_sqlx("import commit", e))?;
        // Everything changed at once: subscribers reload (no one may be
        // listening, hence the ignored error).
        let _ = changes.send(Change::resync());
        Ok(count)
    }
}

/// Rows of `(path, value, revision)` as records, failing closed on an
/// impossible revision.
fn rows_to_records(rows: Vec<(String, Vec<u8>, i64)>) -> Result<Vec<(String, Record)>> {
    rows.into_iter()
        .map(|(path, value, revision)| {
            let revision = stored_revision(revision)?;
            Ok((path, Record { value, revision }))
        })
        .collect()
}

/// A `COUNT(*)` as a u64.
fn stored_count(count: i64) -> Result<u64> {
    u64::try_from(count).map_err(|_| corrupt(&format!("a record count is {count}")))
}

/// Where the database lives (for `Debug` and logs).
enum Location {
    Memory,
    File(PathBuf),
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Memory => f.write_str("in memory"),
            Self::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// The schema history, compiled in. Append new migrations; never edit or remove
/// one that has shipped (sqlx checks each applied migration's checksum).
fn migrator() -> Migrator {
    Migrator::with_migrations(vec![Migration::new(
        1,
        Cow::Borrowed("records and revision counter"),
        MigrationType::Simple,
        include_str!("../migrations/sqlite/0001_records.sql").into_sql_str(),
        false,
    )])
}

/// Creates the database file with mode 0600 if it does not exist yet, so SQLite
/// (which gives its `-wal` and `-shm` files the main file's mode) never makes a
/// world-readable database.
async fn create_private_file(path: &Path) -> Result<()> {
    let mut options = tokio::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    match options.open(path).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            warn_if_shared(path).await;
            Ok(())
        }
        Err(e) => Err(Error::Backend(format!(
            "cannot create SQLite database {}: {e}",
            path.display()
        ))),
    }
}

/// Logs a warning if an existing database file is readable by group or others.
async fn warn_if_shared(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = tokio::fs::metadata(path).await {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format_args!("{mode:o}"),
                    "SQLite store file is accessible to group or others; chmod 600 it"
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// Fails closed if any record's revision is above the counter: the next write
/// would then reuse a revision, which would defeat compare-and-set.
async fn check_revision_counter(pool: &SqlitePool) -> Result<()> {
    let (counter, highest): (Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT (SELECT current FROM revision_counter WHERE id = 1), \
                (SELECT MAX(revision) FROM records)",
    )
    .fetch_one(pool)
    .await
    .map_err(|e| map_sqlx("check revision counter", e))?;
    match (counter, highest) {
        (None, _) => Err(corrupt("the revision counter row is missing")),
        (Some(counter), Some(highest)) if highest > counter => Err(corrupt(&format!(
            "a record has revision {highest}, above the revision counter {counter}"
        ))),
        _ => Ok(()),
    }
}

/// Converts a revision read from the database, failing closed on impossible values.
fn stored_revision(revision: i64) -> Result<u64> {
    u64::try_from(revision)
        .ok()
        .filter(|r| *r > 0)
        .ok_or_else(|| corrupt(&format!("a stored revision is {revision}")))
}

/// The error for a create or compare-and-set that committed without a revision,
/// which the writer never reports.
fn missing_revision() -> Error {
    Error::Backend("SQLite write returned no revision".into())
}

/// The error for a database that breaks an invariant of the schema.
fn corrupt(what: &str) -> Error {
    Error::Corrupt(format!(
        "SQLite store is inconsistent ({what}); refusing to continue"
    ))
}

/// Maps an sqlx error, prefixed with what was being done. SQLite messages never
/// contain bound values, and this backend has no credentials to leak.
///
/// The kind decides what callers do (see [`Error`]): a lost or refused file, a
/// lock held beyond the busy timeout, no free connection, a closed store are
/// [`Error::Unavailable`] (retry later); a file SQLite finds corrupt or not a
/// database, or a stored value of the wrong type, is [`Error::Corrupt`]; the rest
/// (SQL errors, constraint failures this code never provokes) is
/// [`Error::Backend`]. Both of the latter fail closed and are never retried.
fn map_sqlx(context: &str, err: sqlx::Error) -> Error {
    match &err {
        sqlx::Error::PoolTimedOut => {
            return Error::Unavailable(format!("{context}: timed out waiting for a connection"));
        }
        sqlx::Error::PoolClosed => {
            return Error::Unavailable(format!("{context}: the store is closed"));
        }
        _ => {}
    }
    let kind = match &err {
        sqlx::Error::Io(_) | sqlx::Error::WorkerCrashed => Kind::Unavailable,
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|code| code.parse::<i64>().ok())
            .map_or(Kind::Backend, classify_result_code),
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => Kind::Corrupt,
        _ => Kind::Backend,
    };
    kind.error(format!("{context}: {err}"))
}

/// Maps a migration failure: the database's own errors keep their kind (a file
/// that is not a database is corrupt, not a schema problem); a migration history
/// this build does not know (newer, modified, missing) is [`Error::Backend`].
fn map_migrate(err: sqlx::migrate::MigrateError) -> Error {
    use sqlx::migrate::MigrateError as M;
    match err {
        M::Execute(e) | M::ExecuteMigration(e, _) => map_sqlx("SQLite schema migration failed", e),
        other => Error::Backend(format!("SQLite schema migration failed: {other}")),
    }
}

/// What a failure means to the caller; see [`map_sqlx`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Unavailable,
    Corrupt,
    Backend,
}

impl Kind {
    fn error(self, message: String) -> Error {
        match self {
            Kind::Unavailable => Error::Unavailable(message),
            Kind::Corrupt => Error::Corrupt(message),
            Kind::Backend => Error::Backend(message),
        }
    }
}

/// Classifies an SQLite result code (primary or extended,
/// <https://www.sqlite.org/rescode.html>).
fn classify_result_code(code: i64) -> Kind {
    // Primary codes.
    const BUSY: i64 = 5;
    const LOCKED: i64 = 6;
    const NOMEM: i64 = 7;
    const READONLY: i64 = 8;
    const INTERRUPT: i64 = 9;
    const IOERR: i64 = 10;
    const CORRUPT: i64 = 11;
    const FULL: i64 = 13;
    const CANTOPEN: i64 = 14;
    const PROTOCOL: i64 = 15;
    const NOTADB: i64 = 26;
    /// SQLITE_IOERR_CORRUPTFS: the file system reported the data corrupt.
    const IOERR_CORRUPTFS: i64 = IOERR | (33 << 8);
    if code == IOERR_CORRUPTFS {
        return Kind::Corrupt;
    }
    match code & 0xff {
        // The environment, not the data: locks held too long, memory, a file made
        // read-only, a failing or full disk, a file that cannot be opened. An
        // operator (or time) fixes these; the data is as it was.
        BUSY | LOCKED | NOMEM | READONLY | INTERRUPT | IOERR | FULL | CANTOPEN | PROTOCOL => {
            Kind::Unavailable
        }
        CORRUPT | NOTADB => Kind::Corrupt,
        _ => Kind::Backend,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn file_store(dir: &tempfile::TempDir) -> (SqliteStore, PathBuf) {
        let path = dir.path().join("cipherd.db");
        let store = SqliteStore::open(&path).await.expect("open file store");
        (store, path)
    }

    #[tokio::test]
    async fn file_store_uses_wal_and_full_sync_on_every_connection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = file_store(&dir).await;
        // Hold several connections at once so the check covers more than one.
        let mut conns = Vec::new();
        for _ in 0..FILE_POOL_SIZE {
            conns.push(store.pool.acquire().await.expect("acquire"));
        }
        for conn in &mut conns {
            let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
                .fetch_one(&mut **conn)
                .await
                .expect("journal_mode");
            assert_eq!(mode, "wal");
            let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
                .fetch_one(&mut **conn)
                .await
                .expect("synchronous");
            assert_eq!(sync, 2, "synchronous must be FULL");
            let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
                .fetch_one(&mut **conn)
                .await
                .expect("foreign_keys");
            assert_eq!(fk, 1);
            let timeout: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
                .fetch_one(&mut **conn)
                .await
                .expect("busy_timeout");
            assert_eq!(timeout, 5000);
        }
    }

    #[tokio::test]
    async fn reopen_keeps_data_and_revisions_keep_increasing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, path) = file_store(&dir).await;
        let r1 = store.create("keys/a", b"one").await.expect("create a");
        let r2 = store.create("keys/b", b"two").await.expect("create b");
        store.delete("keys/b", r2).await.expect("delete b");
        store.close().await;
        drop(store);

        let store = SqliteStore::open(&path).await.expect("reopen");
        let a = store.get("keys/a").await.expect("get a");
        assert_eq!(
            a,
            Some(Record {
                value: b"one".to_vec(),
                revision: r1
            })
        );
        assert_eq!(store.get("keys/b").await.expect("get b"), None);
        // The highest revision ever issued was r2, whose record is gone: the
        // counter must still be past it.
        let r3 = store.create("keys/b", b"again").await.expect("recreate b");
        assert!(r3 > r2, "revision {r3} reused or went backwards after {r2}");
        let r4 = store
            .compare_and_set("keys/a", r1, b"uno")
            .await
            .expect("cas a");
        assert!(r4 > r3);
        assert!(matches!(
            store.compare_and_set("keys/b", r2, b"stale").await,
            Err(Error::Conflict { .. })
        ));
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn new_database_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, path) = file_store(&dir).await;
        store.create("a", b"x").await.expect("create");
        let mut checked = Vec::new();
        for suffix in ["", "-wal", "-shm"] {
            let file = PathBuf::from(format!("{}{suffix}", path.display()));
            if let Ok(meta) = std::fs::metadata(&file) {
                assert_eq!(
                    meta.permissions().mode() & 0o777,
                    0o600,
                    "{}",
                    file.display()
                );
                checked.push(suffix);
            }
        }
        assert!(checked.contains(&""), "database file missing");
        assert!(
            checked.contains(&"-wal"),
            "WAL file missing: not in WAL mode?"
        );
    }

    #[tokio::test]
    async fn refuses_a_database_from_a_newer_schema() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, path) = file_store(&dir).await;
        sqlx::query(
            "INSERT INTO _sqlx_migrations \
             (version, description, success, checksum, execution_time) \
             VALUES (999, 'from the future', 1, x'00', 0)",
        )
        .execute(&store.pool)
        .await
        .expect("fake a newer migration");
        store.close().await;
        drop(store);
        let err = SqliteStore::open(&path)
            .await
            .expect_err("open must refuse");
        assert!(matches!(err, Error::Backend(_)), "{err:?}");
    }

    #[tokio::test]
    async fn refuses_a_revision_counter_behind_the_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, path) = file_store(&dir).await;
        store.create("a", b"x").await.expect("create");
        sqlx::query("UPDATE revision_counter SET current = 0")
            .execute(&store.pool)
            .await
            .expect("rewind counter");
        store.close().await;
        drop(store);
        let err = SqliteStore::open(&path)
            .await
            .expect_err("open must refuse");
        assert!(err.to_string().contains("revision counter"), "{err}");
    }

    #[tokio::test]
    async fn missing_counter_row_fails_writes_closed() {
        let store = SqliteStore::in_memory().await.expect("open");
        sqlx::query("DELETE FROM revision_counter")
            .execute(&store.pool)
            .await
            .expect("delete counter");
        let err = store.create("a", b"x").await.expect_err("must fail");
        assert!(matches!(err, Error::Corrupt(_)), "{err:?}");
        assert_eq!(store.get("a").await.expect("get"), None, "nothing written");
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_database_is_corrupt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("garbage.db");
        std::fs::write(&path, vec![0x5a; 8192]).expect("write garbage");
        let err = SqliteStore::open(&path)
            .await
            .expect_err("open must refuse");
        assert!(matches!(err, Error::Corrupt(_)), "{err:?}");
        assert!(!err.is_transient());
    }

    #[test]
    fn result_codes_are_classified_by_what_retrying_can_do() {
        // Primary and extended codes (https://www.sqlite.org/rescode.html).
        for (code, kind) in [
            (5, Kind::Unavailable),             // SQLITE_BUSY
            (5 | (2 << 8), Kind::Unavailable),  // SQLITE_BUSY_SNAPSHOT
            (6, Kind::Unavailable),             // SQLITE_LOCKED
            (8, Kind::Unavailable),             // SQLITE_READONLY
            (10, Kind::Unavailable),            // SQLITE_IOERR
            (10 | (4 << 8), Kind::Unavailable), // SQLITE_IOERR_FSYNC
            (13, Kind::Unavailable),            // SQLITE_FULL
            (14, Kind::Unavailable),            // SQLITE_CANTOPEN
            (11, Kind::Corrupt),                // SQLITE_CORRUPT
            (11 | (1 << 8), Kind::Corrupt),     // SQLITE_CORRUPT_VTAB
            (26, Kind::Corrupt),                // SQLITE_NOTADB
            (10 | (33 << 8), Kind::Corrupt),    // SQLITE_IOERR_CORRUPTFS
            (1, Kind::Backend),                 // SQLITE_ERROR
            (19, Kind::Backend),                // SQLITE_CONSTRAINT
            (17, Kind::Backend),                // SQLITE_SCHEMA
        ] {
            assert_eq!(classify_result_code(code), kind, "code {code}");
        }
    }

    #[tokio::test]
    async fn closed_store_is_unavailable() {
        let store = SqliteStore::in_memory().await.expect("open");
        store.close().await;
        assert!(matches!(store.ping().await, Err(Error::Unavailable(_))));
        assert!(matches!(
            store.create("a", b"x").await,
            Err(Error::Unavailable(_))
        ));
    }

    #[tokio::test]
    async fn a_cancelled_write_still_commits_and_is_announced() {
        let store = SqliteStore::in_memory().await.expect("open");
        let mut feed = store.subscribe();
        // Hold the in-memory store's only connection, so the writer task cannot
        // run the write: it is certainly queued but not done when dropped.
        let held = store.pool.acquire().await.expect("hold the connection");
        let write = store.create("a", b"x");
        let dropped = tokio::time::timeout(Duration::from_millis(50), write).await;
        assert!(dropped.is_err(), "write should have been pending");
        assert_eq!(store.write_stats().submitted, 1, "the write was queued");
        drop(held);
        let change = tokio::time::timeout(Duration::from_secs(10), feed.recv())
            .await
            .expect("change within 10 s")
            .expect("feed open");
        assert_eq!(change.path, "a");
        let record = store.get("a").await.expect("get").expect("record");
        assert_eq!(change.revision, Some(record.revision));
    }

    #[tokio::test]
    async fn migrations_are_numbered_from_one_without_gaps() {
        let migrator = migrator();
        for (index, migration) in migrator.iter().enumerate() {
            assert_eq!(migration.version, i64::try_from(index).expect("small") + 1);
        }
    }

    #[tokio::test]
    async fn debug_shows_location_only() {
        let store = SqliteStore::in_memory().await.expect("open");
        let _feed = store.subscribe();
        assert_eq!(
            format!("{store:?}"),
            "SqliteStore { location: in memory, subscribers: 1, .. }"
        );
    }
}
