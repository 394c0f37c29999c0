//! The PostgreSQL backend, for high availability: several stateless `cipherd`
//! replicas share one database.
//!
//! Schema (`migrations/postgres/0001_records.sql`): `records(path, value,
//! revision)` with `path` in the bytewise `"C"` collation, and a sequence
//! `revisions`. Migrations are compiled in and run by sqlx's `Migrator` on every
//! open (under its advisory lock, so replicas starting together migrate once); a
//! database with a migration this build does not know is refused.
//!
//! Every write is one autocommit statement whose precondition is part of the
//! statement, so PostgreSQL's constraints and row locks, not the isolation level,
//! serialize writers in any number of processes:
//!
//! - create: `INSERT ... ON CONFLICT (path) DO NOTHING` (the primary key);
//! - compare-and-set: `UPDATE ... WHERE path = $1 AND revision = $2`;
//! - delete: `DELETE ... WHERE path = $1 AND revision = $2`.
//!
//! Revisions come from the sequence: never reused (a sequence does not roll back),
//! increasing for each path, and greater than every revision returned before the
//! write began. Two writes to *different* paths that run at the same time may
//! commit in the opposite order of their revisions; nothing in cipherd compares
//! revisions across paths.
//!
//! The change feed is PostgreSQL's LISTEN/NOTIFY: a trigger announces every
//! committed write on the channel [`CHANNEL`], whichever replica (or operator)
//! made it, and one listener task per store, on a connection of its own, feeds
//! the broadcast channel in commit order. This store's own writes reach its
//! subscribers the same way, so one source keeps the order. When the listener's
//! connection is lost, notifications sent meanwhile are lost with it: the task
//! reconnects with backoff and, once listening again, sends [`Change::resync`],
//! on which every subscriber reloads everything it caches (as on a lag). It also
//! sends one every [`PostgresConfig::resync_interval`] (5 minutes by default),
//! so that a notification lost without the connection failing (a server-side
//! queue overflow, a bug anywhere on the path) cannot leave a replica stale for
//! longer than that.
//!
//! Connection credentials never reach logs or errors: the store names its
//! database as `postgres://user@host:port/db` ([`PostgresConfig::redacted`]).

use std::borrow::Cow;
use std::fmt;
use std::io::ErrorKind;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{MigrateError, Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgSslMode};
use sqlx::{AssertSqlSafe, Postgres, SqlSafeStr, Transaction};
use tokio::sync::{broadcast, oneshot};

use crate::path::KeyRange;
use crate::{CHANGE_FEED_CAPACITY, Change, Error, Import, Record, Result, Snapshot, Store, path};

/// The NOTIFY channel of the change feed (see the migration's trigger).
pub const CHANNEL: &str = "cipherd_changes";

/// The default [`PostgresConfig::pool_size`].
pub const DEFAULT_POOL_SIZE: u32 = 10;

/// The default [`PostgresConfig::statement_timeout`].
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Default [`PostgresConfig::resync_interval`].
pub const DEFAULT_RESYNC_INTERVAL: Duration = Duration::from_secs(300);

/// How long an operation waits for a pooled connection (or a new one) before
/// failing with [`Error::Unavailable`].
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the listener checks, when no notification arrives, that its
/// connection is still alive (a silently dropped connection would otherwise
/// leave the feed mute forever).
const LISTENER_PING_INTERVAL: Duration = Duration::from_secs(15);

/// How long that check may take before the connection counts as lost.
const LISTENER_PING_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest wait between the listener's reconnection attempts.
const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(10);

/// The `application_name` of the pool's connections and of the listener's, so an
/// operator can tell them apart in `pg_stat_activity`.
const APPLICATION_NAME: &str = "cipherd";
const LISTENER_APPLICATION_NAME: &str = "cipherd-listener";

/// How to reach the database: a `postgres://` URL plus pool and timeout settings.
///
/// The URL may carry a password; `Debug` and [`redacted`](Self::redacted) never
/// show it. TLS follows the URL's `sslmode` and `sslrootcert` parameters (as with
/// libpq); setting [`ca_file`](Self::ca_file) forces `sslmode=verify-full` with
/// that CA, whatever the URL says.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    url: String,
    /// Most connections the store keeps open (the change-feed listener has one
    /// more of its own). At least 1.
    pub pool_size: u32,
    /// Longest a statement may run before PostgreSQL cancels it (the operation
    /// then fails with [`Error::Unavailable`]).
    pub statement_timeout: Duration,
    /// PEM file of the CA that signed the server's certificate: TLS is required
    /// and verified, host name included (`verify-full`).
    pub ca_file: Option<PathBuf>,
    /// How often the change feed sends [`Change::resync`] even when nothing was
    /// lost; `Duration::ZERO` never does.
    pub resync_interval: Duration,
}

impl PostgresConfig {
    /// A configuration for `url` with the default pool size and statement timeout.
    ///
    /// Fails with [`Error::Backend`] if `url` is not a PostgreSQL connection URL;
    /// the message does not repeat the URL.
    pub fn new(url: impl Into<String>) -> Result<Self> {
        let url = url.into();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(Error::Backend(
                "the PostgreSQL URL must start with postgres:// or postgresql://".into(),
            ));
        }
        PgConnectOptions::from_str(&url).map_err(|e| {
            Error::Backend(format!(
                "the PostgreSQL URL is not valid: {}",
                redact_err(&e, &url)
            ))
        })?;
        Ok(Self {
            url,
            pool_size: DEFAULT_POOL_SIZE,
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            ca_file: None,
            resync_interval: DEFAULT_RESYNC_INTERVAL,
        })
    }

    /// The connection target without credentials: `postgres://user@host:port/db`,
    /// plus the TLS mode. For logs and error messages.
    pub fn redacted(&self) -> String {
        match self.connect_options() {
            Ok(o) => format!(
                "postgres://{}@{}:{}/{} (sslmode={})",
                o.get_username(),
                o.get_host(),
                o.get_port(),
                o.get_database().unwrap_or(o.get_username()),
                ssl_mode_name(self.effective_ssl_mode(&o)),
            ),
            Err(_) => "postgres://[invalid URL]".into(),
        }
    }

    /// The sqlx options for the pool's connections.
    fn connect_options(&self) -> Result<PgConnectOptions> {
        let options = PgConnectOptions::from_str(&self.url).map_err(|e| {
            Error::Backend(format!(
                "the PostgreSQL URL is not valid: {}",
                redact_err(&e, &self.url)
            ))
        })?;
        let options = match &self.ca_file {
            Some(ca) => options.ssl_mode(PgSslMode::VerifyFull).ssl_root_cert(ca),
            None => options,
        };
        let timeout_ms = self.statement_timeout.as_millis().max(1);
        Ok(options
            .application_name(APPLICATION_NAME)
            .options([("statement_timeout", timeout_ms)]))
    }

    /// The TLS mode the connections will use.
    fn effective_ssl_mode(&self, options: &PgConnectOptions) -> PgSslMode {
        if self.ca_file.is_some() {
            PgSslMode::VerifyFull
        } else {
            options.get_ssl_mode()
        }
    }
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &format_args!("{}", self.redacted()))
            .field("pool_size", &self.pool_size)
            .field("statement_timeout", &self.statement_timeout)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// The PostgreSQL [`Store`]: a connection pool for reads and writes, plus a
/// listener task that turns NOTIFY into the change feed.
///
/// Several `PostgresStore`s, in one process or many, may share a database: each
/// sees the others' writes on its change feed. [`open`](Self::open) starts the
/// listener on the current tokio runtime; when the store is dropped, the listener
/// stops and the change feed closes.
///
/// Cloning is not offered: share it as `Arc<PostgresStore>` or `Arc<dyn Store>`.
pub struct PostgresStore {
    pool: PgPool,
    changes: broadcast::Sender<Change>,
    /// Dropped with the store, which stops the listener task.
    _stop_listener: oneshot::Sender<()>,
    target: String,
}

impl PostgresStore {
    /// Connects, applies pending migrations, checks the schema, and starts the
    /// change-feed listener; returns once the listener is listening, so a
    /// subscriber sees every change committed after `open` returns.
    ///
    /// Fails with [`Error::Unavailable`] if the database cannot be reached, and
    /// with [`Error::Backend`] if it refuses the credentials or TLS, was written
    /// by a newer cipherd (it has migrations this build does not know), has a
    /// modified migration history or does not use UTF-8, and with
    /// [`Error::Corrupt`] if it is inconsistent (a record whose revision the
    /// sequence has not issued yet).
    pub async fn open(config: &PostgresConfig) -> Result<Self> {
        if config.pool_size == 0 {
            return Err(Error::Backend(
                "the PostgreSQL pool size must be at least 1".into(),
            ));
        }
        let target = config.redacted();
        let options = config.connect_options()?;
        let pool = PgPoolOptions::new()
            .max_connections(config.pool_size)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await
            .map_err(|e| map_sqlx(&format!("cannot connect to {target}"), e))?;
        check_encoding(&pool).await?;
        migrator().run(&pool).await.map_err(map_migrate)?;
        check_revisions(&pool).await?;

        // The listener gets a pool of its own (of one connection, which sqlx's
        // PgListener holds for good), so it never takes a slot from the store.
        let listener_pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_lazy_with(options.application_name(LISTENER_APPLICATION_NAME));
        let first = listen(&listener_pool)
            .await
            .map_err(|e| map_sqlx(&format!("cannot LISTEN on {target}"), e))?;
        let (changes, _) = broadcast::channel(CHANGE_FEED_CAPACITY);
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(run_listener(
            first,
            listener_pool,
            changes.clone(),
            stopped,
            target.clone(),
            config.resync_interval,
        ));
        tracing::info!(database = %target, "opened PostgreSQL store");
        Ok(Self {
            pool,
            changes,
            _stop_listener: stop,
            target,
        })
    }

    /// Waits for operations in flight, then closes the pool's connections. Later
    /// operations fail with [`Error::Unavailable`]. Dropping the store without
    /// closing is also safe: every acknowledged write is already committed.
    pub async fn close(&self) {
        self.pool.close().await;
        tracing::info!(database = %self.target, "closed PostgreSQL store");
    }

    /// Runs one write on a task of its own, so that dropping the caller's future
    /// cannot abandon a statement half sent: once started, the write completes
    /// (or fails) and, if committed, is announced as usual.
    async fn write<T: Send + 'static>(
        &self,
        write: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        tokio::spawn(write)
            .await
            .map_err(|e| Error::Backend(format!("PostgreSQL write task failed: {e}")))?
    }
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    async fn get(&self, path: &str) -> Result<Option<Record>> {
        path::validate(path)?;
        let row: Option<(Vec<u8>, i64)> =
            sqlx::query_as("SELECT value, revision FROM records WHERE path = $1")
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
        let (pool, path, value) = (self.pool.clone(), path.to_owned(), value.to_vec());
        self.write(async move {
            let revision: Option<i64> = sqlx::query_scalar(
                "INSERT INTO records (path, value, revision) \
                 VALUES ($1, $2, nextval('revisions')) \
                 ON CONFLICT (path) DO NOTHING RETURNING revision",
            )
            .bind(&path)
            .bind(&value)
            .fetch_optional(&pool)
            .await
            .map_err(|e| map_sqlx("create", e))?;
            match revision {
                Some(revision) => stored_revision(revision),
                None => Err(Error::AlreadyExists { path }),
            }
        })
        .await
    }

    async fn compare_and_set(
        &self,
        path: &str,
        expected_revision: u64,
        value: &[u8],
    ) -> Result<u64> {
        path::validate(path)?;
        // A revision above i64::MAX was never issued: the record cannot have it.
        let Ok(expected) = i64::try_from(expected_revision) else {
            return Err(Error::Conflict { path: path.into() });
        };
        let (pool, path, value) = (self.pool.clone(), path.to_owned(), value.to_vec());
        self.write(async move {
            let revision: Option<i64> = sqlx::query_scalar(
                "UPDATE records SET value = $3, revision = nextval('revisions') \
                 WHERE path = $1 AND revision = $2 RETURNING revision",
            )
            .bind(&path)
            .bind(expected)
            .bind(&value)
            .fetch_optional(&pool)
            .await
            .map_err(|e| map_sqlx("compare-and-set", e))?;
            match revision {
                Some(revision) => stored_revision(revision),
                None => Err(Error::Conflict { path }),
            }
        })
        .await
    }

    async fn delete(&self, path: &str, expected_revision: u64) -> Result<()> {
        path::validate(path)?;
        // Never issued (see compare_and_set), but the record may exist: a Conflict
        // or NotFound still depends on the row, so -1 matches no revision.
        let expected = i64::try_from(expected_revision).unwrap_or(-1);
        let (pool, path) = (self.pool.clone(), path.to_owned());
        self.write(async move {
            // One statement, one snapshot: the outer SELECT sees the table as it
            // was before the DELETE, so `existed` tells NotFound from Conflict.
            let (deleted, existed): (bool, bool) = sqlx::query_as(
                "WITH gone AS (DELETE FROM records WHERE path = $1 AND revision = $2 RETURNING 1) \
                 SELECT EXISTS (SELECT 1 FROM gone), \
                        EXISTS (SELECT 1 FROM records WHERE path = $1)",
            )
            .bind(&path)
            .bind(expected)
            .fetch_one(&pool)
            .await
            .map_err(|e| map_sqlx("delete", e))?;
            match (deleted, existed) {
                (true, _) => Ok(()),
                (false, true) => Err(Error::Conflict { path }),
                (false, false) => Err(Error::NotFound { path }),
            }
        })
        .await
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
        let sql = range_query("path", &range);
        let query = sqlx::query_scalar(AssertSqlSafe(sql)).bind(range.after.unwrap_or(prefix));
        let query = match &range.upper {
            Some(upper) => query.bind(upper.as_str()),
            None => query,
        };
        query
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
        let sql = range_query("path, value, revision", &range);
        let query = sqlx::query_as(AssertSqlSafe(sql)).bind(range.after.unwrap_or(prefix));
        let query = match &range.upper {
            Some(upper) => query.bind(upper.as_str()),
            None => query,
        };
        let rows: Vec<(String, Vec<u8>, i64)> = query
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

    /// One `REPEATABLE READ READ ONLY` transaction: every statement in it sees
    /// the database as of its first statement (the count).
    async fn snapshot(&self) -> Result<Box<dyn Snapshot>> {
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(|e| map_sqlx("begin snapshot", e))?;
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM records")
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| map_sqlx("snapshot count", e))?;
        let count = u64::try_from(count).map_err(|_| corrupt("a negative record count"))?;
        Ok(Box::new(PostgresSnapshot {
            tx,
            count,
            after: None,
        }))
    }

    /// One transaction that first locks `records` against every other writer
    /// (`SHARE ROW EXCLUSIVE` conflicts with writes and with itself, not with
    /// reads), then checks that the table is empty. Revisions come from the
    /// sequence; the trigger announces every record at the commit.
    async fn import(&self) -> Result<Box<dyn Import>> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| map_sqlx("begin import", e))?;
        sqlx::query("LOCK TABLE records IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await
            .map_err(|e| map_sqlx("import: lock the records", e))?;
        let any: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM records)")
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| map_sqlx("import: check the store is empty", e))?;
        if any {
            return Err(Error::NotEmpty);
        }
        Ok(Box::new(PostgresImport { tx, count: 0 }))
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| map_sqlx("ping", e))
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("database", &format_args!("{}", self.target))
            .field("subscribers", &self.changes.receiver_count())
            .finish_non_exhaustive()
    }
}

/// A [`Snapshot`] of a [`PostgresStore`]: pages after `after`, in one
/// repeatable-read transaction.
struct PostgresSnapshot {
    tx: Transaction<'static, Postgres>,
    count: u64,
    after: Option<String>,
}

#[async_trait::async_trait]
impl Snapshot for PostgresSnapshot {
    fn record_count(&self) -> u64 {
        self.count
    }

    async fn next_page(&mut self, limit: usize) -> Result<Vec<(String, Record)>> {
        let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
        let rows: Vec<(String, Vec<u8>, i64)> = match &self.after {
            None => {
                sqlx::query_as("SELECT path, value, revision FROM records ORDER BY path LIMIT $1")
                    .bind(limit)
                    .fetch_all(&mut *self.tx)
                    .await
            }
            Some(after) => {
                sqlx::query_as(
                    "SELECT path, value, revision FROM records WHERE path > $1 \
                     ORDER BY path LIMIT $2",
                )
                .bind(after.as_str())
                .bind(limit)
                .fetch_all(&mut *self.tx)
                .await
            }
        }
        .map_err(|e| map_sqlx("snapshot page", e))?;
        let rows = rows
            .into_iter()
            .map(|(path, value, revision)| {
                let revision = stored_revision(revision)?;
                Ok((path, Record { value, revision }))
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some((last, _)) = rows.last() {
            self.after = Some(last.clone());
        }
        Ok(rows)
    }
}

/// An [`Import`] into a [`PostgresStore`]: one transaction holding the table
/// lock taken by [`Store::import`].
struct PostgresImport {
    tx: Transaction<'static, Postgres>,
    count: u64,
}

#[async_trait::async_trait]
impl Import for PostgresImport {
    async fn put(&mut self, path: &str, value: &[u8]) -> Result<()> {
        path::validate(path)?;
        let inserted = sqlx::query(
            "INSERT INTO records (path, value, revision) \
             VALUES ($1, $2, nextval('revisions')) ON CONFLICT (path) DO NOTHING",
        )
        .bind(path)
        .bind(value)
        .execute(&mut *self.tx)
        .await
        .map_err(|e| map_sqlx("import", e))?;
        if inserted.rows_affected() == 0 {
            return Err(Error::AlreadyExists { path: path.into() });
        }
        self.count += 1;
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<u64> {
        let Self { tx, count } = *self;
        tx.commit()
            .await
            .map_err(|e| map_sqlx("import commit", e))?;
        Ok(count)
    }
}

/// The statement of a `list` or `scan` page, built from fixed fragments only
/// (never from input, hence [`AssertSqlSafe`]): one of four texts (parameters
/// `$1` lower bound, `$2` upper bound if any, then the limit), each a plain range
/// scan of the primary-key index.
fn range_query(columns: &str, range: &KeyRange<'_>) -> String {
    let lower = if range.after.is_some() { ">" } else { ">=" };
    match range.upper {
        Some(_) => format!(
            "SELECT {columns} FROM records WHERE path {lower} $1 AND path < $2 ORDER BY path LIMIT $3"
        ),
        None => {
            format!("SELECT {columns} FROM records WHERE path {lower} $1 ORDER BY path LIMIT $2")
        }
    }
}

/// The schema history, compiled in. Append new migrations; never edit or remove
/// one that has shipped (sqlx checks each applied migration's checksum).
fn migrator() -> Migrator {
    Migrator::with_migrations(vec![Migration::new(
        1,
        Cow::Borrowed("records, revision sequence, change notification"),
        MigrationType::Simple,
        include_str!("../migrations/postgres/0001_records.sql").into_sql_str(),
        false,
    )])
}

/// The newest schema version this build knows.
fn latest_schema_version() -> i64 {
    migrator().iter().map(|m| m.version).max().unwrap_or(0)
}

/// Maps a migration failure: a database from a newer cipherd, or one whose
/// history was changed, is refused ([`Error::Backend`]); a connection failure on
/// the way is [`Error::Unavailable`].
fn map_migrate(err: MigrateError) -> Error {
    match err {
        MigrateError::VersionMissing(version) => Error::Backend(format!(
            "the PostgreSQL database has schema version {version}, newer than this cipherd \
             knows (up to {}): it was written by a newer cipherd; run that version, or \
             restore a backup taken before the upgrade",
            latest_schema_version()
        )),
        MigrateError::VersionMismatch(version) => Error::Backend(format!(
            "the PostgreSQL database's schema migration {version} differs from this \
             cipherd's: the schema history was modified; refusing to continue"
        )),
        MigrateError::Execute(e) => map_sqlx("PostgreSQL schema migration", e),
        MigrateError::ExecuteMigration(e, version) => {
            map_sqlx(&format!("PostgreSQL schema migration {version}"), e)
        }
        other => Error::Backend(format!("PostgreSQL schema migration failed: {other}")),
    }
}

/// Refuses a database whose encoding cannot hold every path (or compares them
/// other than as UTF-8).
async fn check_encoding(pool: &PgPool) -> Result<()> {
    let encoding: String = sqlx::query_scalar("SELECT current_setting('server_encoding')")
        .fetch_one(pool)
        .await
        .map_err(|e| map_sqlx("check encoding", e))?;
    if encoding != "UTF8" {
        return Err(Error::Backend(format!(
            "the PostgreSQL database uses encoding {encoding}; cipherd needs UTF8 \
             (CREATE DATABASE ... ENCODING 'UTF8' TEMPLATE template0)"
        )));
    }
    Ok(())
}

/// Fails closed if a record's revision is one the sequence has not issued yet
/// (the sequence was reset, or records were copied in from another database):
/// the next write could then reuse a revision, which would defeat
/// compare-and-set.
async fn check_revisions(pool: &PgPool) -> Result<()> {
    let (last, is_called, highest): (i64, bool, Option<i64>) = sqlx::query_as(
        "SELECT last_value, is_called, (SELECT MAX(revision) FROM records) FROM revisions",
    )
    .fetch_one(pool)
    .await
    .map_err(|e| map_sqlx("check the revision sequence", e))?;
    let issued = if is_called { last } else { last - 1 };
    match highest {
        Some(highest) if highest > issued => Err(corrupt(&format!(
            "a record has revision {highest}, above the revision sequence's {issued}"
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

/// The error for a database that breaks an invariant of the schema.
fn corrupt(what: &str) -> Error {
    Error::Corrupt(format!(
        "PostgreSQL store is inconsistent ({what}); refusing to continue"
    ))
}

/// Maps an sqlx error, prefixed with what was being done.
///
/// Unavailable (the operation did not happen, or may have if it was a write
/// whose connection broke; retrying later may succeed): the network (refused,
/// reset, timed out; but not a TLS certificate refused, which rustls reports as
/// invalid data), no pooled connection within the timeout, a closed pool,
/// and the server's own transient refusals: SQLSTATE class 08 (connection
/// exception), 53 (insufficient resources, such as too many connections), 57
/// (operator intervention: shutdown, statement timeout or cancel), and
/// serialization failures or deadlocks (40001, 40P01). Data corruption (class
/// XX) is [`Error::Corrupt`]; everything else, including authentication and
/// TLS, is [`Error::Backend`]: retrying would not help.
///
/// Messages come from sqlx and the server; neither includes bound values or
/// the connection password.
fn map_sqlx(context: &str, err: sqlx::Error) -> Error {
    match &err {
        sqlx::Error::PoolTimedOut => Error::Unavailable(format!(
            "{context}: timed out waiting for a PostgreSQL connection"
        )),
        sqlx::Error::PoolClosed => Error::Unavailable(format!("{context}: the store is closed")),
        // rustls reports a refused certificate as InvalidData: configuration (the
        // CA, the host name), not an outage.
        sqlx::Error::Io(io)
            if matches!(
                io.kind(),
                ErrorKind::InvalidData
                    | ErrorKind::InvalidInput
                    | ErrorKind::PermissionDenied
                    | ErrorKind::Unsupported
            ) =>
        {
            Error::Backend(format!("{context}: {err}"))
        }
        sqlx::Error::Io(_) => Error::Unavailable(format!("{context}: {err}")),
        sqlx::Error::Database(db) if db.code().is_some_and(|c| transient_sqlstate(&c)) => {
            Error::Unavailable(format!("{context}: {err}"))
        }
        sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("XX")) => {
            Error::Corrupt(format!(
                "{context}: PostgreSQL reports an internal error or corruption: {err}"
            ))
        }
        _ => Error::Backend(format!("{context}: {err}")),
    }
}

/// SQLSTATEs after which a retry may succeed (see [`map_sqlx`]).
fn transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57")
        || matches!(code, "40001" | "40P01")
}

/// Removes the URL from an sqlx configuration error's message, should it contain
/// it (it carries the password).
fn redact_err(err: &sqlx::Error, url: &str) -> String {
    let shown = err.to_string();
    if url.is_empty() {
        shown
    } else {
        shown.replace(url, "[the URL]")
    }
}

/// The libpq name of an sslmode.
fn ssl_mode_name(mode: PgSslMode) -> &'static str {
    match mode {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    }
}

/// Connects the listener and subscribes to [`CHANNEL`].
async fn listen(pool: &PgPool) -> std::result::Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    // Stopping is the task's business (the store's drop), not the pool's.
    listener.ignore_pool_close_event(true);
    // Reconnecting is the task's business too, so that it knows when to force
    // the subscribers to lag.
    listener.eager_reconnect(false);
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// The listener task: forwards notifications to the change feed until the store
/// is dropped; on a lost connection, reconnects with backoff and then forces
/// every subscriber to lag, since notifications sent in between are gone.
async fn run_listener(
    first: PgListener,
    pool: PgPool,
    changes: broadcast::Sender<Change>,
    mut stopped: oneshot::Receiver<()>,
    target: String,
    resync_interval: Duration,
) {
    let mut periodic = (!resync_interval.is_zero()).then(|| {
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + resync_interval,
            resync_interval,
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    });
    let mut listener = Some(first);
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut current = match listener.take() {
            Some(current) => current,
            None => {
                let attempt = tokio::select! {
                    _ = &mut stopped => return,
                    attempt = listen(&pool) => attempt,
                };
                match attempt {
                    Ok(current) => {
                        tracing::info!(
                            database = %target,
                            "change-feed listener reconnected; subscribers reload their caches"
                        );
                        announce_resync(&changes);
                        backoff = Duration::from_millis(100);
                        current
                    }
                    Err(e) => {
                        tracing::warn!(
                            database = %target,
                            error = %e,
                            retry_in = ?backoff,
                            "change-feed listener cannot reconnect"
                        );
                        tokio::select! {
                            _ = &mut stopped => return,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(MAX_RECONNECT_BACKOFF);
                        continue;
                    }
                }
            }
        };
        // Receive until the connection fails; then drop it and reconnect.
        loop {
            let received = tokio::select! {
                _ = &mut stopped => return,
                _ = async { periodic.as_mut()?.tick().await; Some(()) }, if periodic.is_some() => {
                    tracing::debug!(database = %target, "periodic resync of the change feed");
                    announce_resync(&changes);
                    continue;
                }
                received = tokio::time::timeout(LISTENER_PING_INTERVAL, current.try_recv()) => received,
            };
            match received {
                Ok(Ok(Some(notification))) => match parse_payload(notification.payload()) {
                    Some(change) => {
                        // No subscriber is not an error.
                        let _ = changes.send(change);
                    }
                    None => {
                        tracing::error!(
                            database = %target,
                            "unreadable change notification; subscribers reload their caches"
                        );
                        announce_resync(&changes);
                    }
                },
                Ok(Ok(None)) => {
                    tracing::warn!(database = %target, "change-feed listener lost its connection");
                    break;
                }
                Ok(Err(e)) => {
                    tracing::warn!(database = %target, error = %e, "change-feed listener failed");
                    break;
                }
                // Quiet for a while: make sure the connection is still there.
                // (`try_recv` is cancel-safe: no notification is lost.)
                Err(_) => {
                    let ping = sqlx::query("SELECT 1").execute(&mut current);
                    match tokio::time::timeout(LISTENER_PING_TIMEOUT, ping).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(database = %target, error = %e, "change-feed listener's connection failed its check");
                            break;
                        }
                        Err(_) => {
                            tracing::warn!(database = %target, "change-feed listener's connection did not answer its check");
                            break;
                        }
                    }
                }
            }
        }
        // Notifications may be lost from here on: the reconnection above
        // announces the resync once listening again, so subscribers re-read
        // after that and miss nothing for good.
        drop(current);
    }
}

/// Tells every subscriber that it may have missed changes: sends
/// [`Change::resync`], on which consumers reload everything they cache, as on
/// a lag.
///
/// (Forcing a real [`RecvError::Lagged`](broadcast::error::RecvError::Lagged)
/// by sending more changes than the channel holds does not work: a subscriber
/// reading meanwhile keeps up and never lags.)
fn announce_resync(changes: &broadcast::Sender<Change>) {
    // No subscriber is not an error.
    let _ = changes.send(Change::resync());
}

/// Parses a notification payload: `<revision> <path>`, or `- <path>` for a
/// delete. `None` for anything else.
fn parse_payload(payload: &str) -> Option<Change> {
    let (revision, path) = payload.split_once(' ')?;
    if path::validate(path).is_err() {
        return None;
    }
    let revision = match revision {
        "-" => None,
        number => Some(number.parse::<u64>().ok().filter(|r| *r > 0)?),
    };
    Some(Change {
        path: path.to_owned(),
        revision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_parse_and_garbage_does_not() {
        assert_eq!(
            parse_payload("42 keys/a b"),
            Some(Change {
                path: "keys/a b".into(),
                revision: Some(42)
            })
        );
        assert_eq!(
            parse_payload("- keys/a"),
            Some(Change {
                path: "keys/a".into(),
                revision: None
            })
        );
        // Nothing parses to the resync marker (an empty path is invalid).
        for bad in [
            "", "42", "0 keys/a", "x keys/a", "42 ", "- ", "42 /abs", "-1 a",
        ] {
            assert_eq!(parse_payload(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn config_debug_and_redacted_never_show_the_password() {
        let config = PostgresConfig::new("postgres://alice:s3cr3t-pw@db.example:6543/cipherd")
            .expect("valid URL");
        for shown in [format!("{config:?}"), config.redacted()] {
            assert!(!shown.contains("s3cr3t-pw"), "{shown}");
            assert!(
                shown.contains("postgres://alice@db.example:6543/cipherd"),
                "{shown}"
            );
        }
        let err = PostgresConfig::new("postgres://alice:s3cr3t-pw@db.example:99999999/x")
            .expect_err("port out of range");
        assert!(!err.to_string().contains("s3cr3t-pw"), "{err}");
    }

    #[test]
    fn ca_file_forces_verify_full() {
        let mut config =
            PostgresConfig::new("postgres://u@h/d?sslmode=disable").expect("valid URL");
        assert!(config.redacted().ends_with("(sslmode=disable)"));
        config.ca_file = Some("/etc/cipherd/db-ca.pem".into());
        assert!(config.redacted().ends_with("(sslmode=verify-full)"));
        let options = config.connect_options().expect("options");
        assert!(matches!(options.get_ssl_mode(), PgSslMode::VerifyFull));
    }

    #[test]
    fn sqlstates_are_classified() {
        for transient in [
            "08006", "08001", "53300", "57P01", "57014", "40001", "40P01",
        ] {
            assert!(transient_sqlstate(transient), "{transient}");
        }
        for permanent in ["28P01", "3D000", "XX001", "23505", "42P01"] {
            assert!(!transient_sqlstate(permanent), "{permanent}");
        }
    }

    #[test]
    fn migrations_are_numbered_from_one_without_gaps() {
        for (index, migration) in migrator().iter().enumerate() {
            assert_eq!(migration.version, i64::try_from(index).expect("small") + 1);
        }
    }
}
