//! cipherd storage: the [`Store`] trait over opaque records, the embedded SQLite
//! backend ([`SqliteStore`]), the shared PostgreSQL backend ([`PostgresStore`])
//! and a [`conformance`] suite every backend must pass.
//!
//! # What this crate does
//!
//! - Stores opaque byte strings under UTF-8 paths (see [`path`] for the rules),
//!   each with a store-wide, strictly increasing revision (like etcd's): writes are
//!   put-if-absent ([`Store::create`]), compare-and-set on the revision last read
//!   ([`Store::compare_and_set`]) and revision-checked delete ([`Store::delete`]).
//!   A revision is never reused, not even after a delete and re-create of the same
//!   path, so a compare-and-set based on a stale read can never succeed (no ABA).
//! - Lists paths by prefix in byte order, with cursor paging.
//! - Takes a point-in-time snapshot of every record ([`Store::snapshot`]) and
//!   imports records into an empty store in one transaction ([`Store::import`]),
//!   for backup and restore.
//! - Publishes a change feed ([`Store::subscribe`]) so caches can be invalidated;
//!   with PostgreSQL it carries every replica's writes (LISTEN/NOTIFY).
//! - Runs its schema migrations when a backend is opened, and refuses to open a
//!   database written by a newer schema.
//!
//! # What it does not do
//!
//! - No cryptography. Records arrive already encrypted under the barrier (with the
//!   path as associated data) by the caller; this crate never sees plaintext or keys
//!   and treats values as opaque bytes. It never puts values into errors or logs.
//! - No caching, no policy, no interpretation of paths beyond validation.
//! - No consensus or replication of its own: high availability is the job of the
//!   PostgreSQL backend, where replicas share one database (see [`PostgresStore`]).
//!
//! # Group commit
//!
//! [`SqliteStore`] runs `synchronous=FULL`, so every commit waits for an fsync.
//! One transaction per write would cap writes at one per fsync however many
//! callers wait. Instead, one writer task takes every write queued while it was
//! busy (up to 256 writes or 4 MiB of values), runs them in one `BEGIN IMMEDIATE`
//! transaction, each in its own `SAVEPOINT`, and commits once. A write whose
//! precondition fails rolls back only its savepoint and gets its own error; no
//! write is acknowledged or announced before the `COMMIT` returns; if the
//! `COMMIT` fails, every write of the group fails. A lone write is committed at
//! once: the writer never waits to fill a group. Revisions, ordering, the change
//! feed and cancellation behave exactly as the [`Store`] contract says.
//!
//! Measured on the development VM (2 vCPUs shared with other builds, load
//! average 4–6; ext4 on a virtio disk whose fsync'd commit took 0.5–2 ms
//! depending on neighbours, hence ranges), creating records of 256 bytes with 64
//! concurrent tasks; the last runs alternated the old and new binaries:
//!
//! | | before (one commit per write) | after (group commit) |
//! | --- | --- | --- |
//! | 10,000 records | 4.5–19 s (13 runs, median 13 s; 520–2,240 creates/s) | 0.39–0.51 s (6 runs; 19,700–26,000 creates/s), 157 commits |
//! | 100,000 records | 163 s (615 creates/s) | 6.3–9.1 s (2 runs), about 1,560 commits |
//! | one write at a time, latency | 0.5–1.1 ms | 0.4–1.4 ms (unchanged: a group of one) |
//!
//! ```text
//! cargo test --release -p cipherd-store --test group_commit_bench -- --ignored --nocapture --test-threads 1
//! CIPHERD_BENCH_RECORDS=100000 cargo test --release -p cipherd-store --test group_commit_bench -- --ignored --nocapture --exact create_10k_records_with_64_tasks
//! ```
//!
//! Groups stay at 64 writes here because only 64 callers are ever waiting; after
//! grouping, the per-write statements (one round trip to SQLite's connection
//! thread per write), not the fsync, bound throughput.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod conformance;
pub mod path;
mod postgres;
mod sqlite;

pub use postgres::{PostgresConfig, PostgresStore};
pub use sqlite::SqliteStore;
#[doc(hidden)]
pub use sqlite::SqliteWriteStats;

/// Capacity of every backend's change-feed channel: how many changes a subscriber
/// may fall behind before it receives [`tokio::sync::broadcast::error::RecvError::Lagged`].
pub const CHANGE_FEED_CAPACITY: usize = 1024;

/// One stored record: opaque bytes plus the store-wide revision of its last write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The stored bytes, exactly as written (barrier ciphertext, opaque here).
    pub value: Vec<u8>,
    /// Store-wide revision of the write that produced this value; pass it to
    /// [`Store::compare_and_set`] or [`Store::delete`]. Always at least 1.
    pub revision: u64,
}

/// A change notification from the change feed ([`Store::subscribe`]).
///
/// One value is special, the resync marker ([`Change::resync`], an empty path,
/// which names no record): the feed may have lost changes, as after
/// [`RecvError::Lagged`](tokio::sync::broadcast::error::RecvError::Lagged), and
/// the subscriber must reload everything it caches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The path that was written or deleted (empty in the resync marker).
    pub path: String,
    /// The record's new revision, or `None` if the record was deleted.
    pub revision: Option<u64>,
}

impl Change {
    /// The resync marker: "changes may have been missed, reload everything".
    ///
    /// Sent by a shared backend whose notifications can be lost: the PostgreSQL
    /// store sends it when its listener connection has been lost and restored.
    /// A backend cannot force a subscriber into `Lagged` (one that keeps reading
    /// never lags), hence a value of its own.
    pub fn resync() -> Self {
        Self {
            path: String::new(),
            revision: None,
        }
    }

    /// Whether this is the [resync marker](Self::resync).
    pub fn is_resync(&self) -> bool {
        self.path.is_empty()
    }
}

/// A key-value store of opaque, barrier-encrypted records.
///
/// # Contract (checked by [`conformance::run`])
///
/// - **Revisions** are store-wide and strictly increasing: every successful
///   [`create`](Store::create) and [`compare_and_set`](Store::compare_and_set)
///   returns a revision greater than any the store had returned before the call
///   began, including for records since deleted, and no revision is ever issued
///   twice. Revisions start at 1; 0 is never a valid revision. A delete does not
///   return a revision. (Two writes to different paths that run at the same time
///   may get theirs in either order, and on a shared backend commit in the other
///   order; for one path, revisions follow commit order.)
/// - **Paths** must pass [`path::validate`]; otherwise every method returns
///   [`Error::InvalidPath`] without touching the backend.
/// - **Atomicity**: each write either happens completely, and is then durable and
///   announced on the change feed, or does not happen at all. Concurrent writers
///   of one path are serialized: of several compare-and-sets on the same revision,
///   exactly one succeeds.
/// - **Cancellation**: dropping a write's future does not abandon a write that has
///   started; it completes (or fails) and is announced as usual. A caller that was
///   cancelled must re-read to learn the outcome.
/// - **Errors** never contain values and never contain credentials.
///
/// The trait is object-safe (`Arc<dyn Store>`), through `async_trait`.
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Reads the record at `path`, or `None` if there is none.
    async fn get(&self, path: &str) -> Result<Option<Record>>;

    /// Put-if-absent: stores `value` at `path` only if no record is there.
    ///
    /// Returns the new record's revision, or [`Error::AlreadyExists`] if the path
    /// already holds a record (which is left unchanged).
    async fn create(&self, path: &str, value: &[u8]) -> Result<u64>;

    /// Compare-and-set: replaces the record at `path` with `value` only if its
    /// revision is still `expected_revision` (the revision last read).
    ///
    /// Returns the new revision. Returns [`Error::Conflict`] if the record has been
    /// written since, **or is absent** (deleted since the read, or never created):
    /// in every case the caller's read is stale and the remedy is the same, re-read.
    async fn compare_and_set(
        &self,
        path: &str,
        expected_revision: u64,
        value: &[u8],
    ) -> Result<u64>;

    /// Deletes the record at `path` only if its revision is still `expected_revision`.
    ///
    /// Returns [`Error::NotFound`] if there is no record at `path` and
    /// [`Error::Conflict`] if there is one with another revision (left unchanged).
    async fn delete(&self, path: &str, expected_revision: u64) -> Result<()>;

    /// Lists the paths that start with `prefix`, in byte order, strictly after
    /// `start_after` if given, at most `limit` of them.
    ///
    /// `prefix` is a plain string prefix, not a directory: `"keys/a"` matches
    /// `"keys/a"`, `"keys/a/1"` and `"keys/ab"`; end it with `/` for directory
    /// semantics. Every character is literal (`%` and `_` are not wildcards). The
    /// empty prefix lists everything. A non-empty prefix must pass
    /// [`path::validate_prefix`].
    ///
    /// To page, pass the last path of one page as `start_after` of the next; a
    /// page shorter than `limit` is the last. `start_after` need not be a stored
    /// path. `limit == 0` returns an empty list.
    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>>;

    /// Like [`Store::list`], but with each record: `(path, record)` pairs in path
    /// order. For loading many records at once (the key cache after unseal).
    ///
    /// Pages together are not a snapshot: a record changed between pages shows its
    /// newer state. Backends should override the default (a `list` then one `get`
    /// per path, skipping paths deleted in between) with a single query, which
    /// also makes each page a snapshot. With the default, a page can come back
    /// short, even empty, before the end if its records were deleted meanwhile.
    async fn scan(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Record)>> {
        let mut out = Vec::new();
        for path in self.list(prefix, start_after, limit).await? {
            if let Some(record) = self.get(&path).await? {
                out.push((path, record));
            }
        }
        Ok(out)
    }

    /// Subscribes to changes made through this store (and, for shared backends,
    /// by other replicas), starting from the next change after this call.
    ///
    /// Changes arrive in the order they were committed. A shared backend may
    /// deliver a change more than once, so consumers must be idempotent (as cache
    /// invalidation is). A subscriber that falls more than
    /// [`CHANGE_FEED_CAPACITY`] changes behind receives
    /// [`RecvError::Lagged`](tokio::sync::broadcast::error::RecvError::Lagged):
    /// it has missed changes and must reload everything it caches before
    /// continuing. A shared backend that may have lost changes sends
    /// [`Change::resync`], which means the same. The channel closes when the
    /// store is dropped.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Change>;

    /// Cheap liveness check of the backend, for health and readiness probes.
    async fn ping(&self) -> Result<()>;

    /// A point-in-time view of every record, for backups: read it in pages
    /// with [`Snapshot::next_page`]. Every page comes from the same instant (the
    /// moment this call returns), whatever is written meanwhile: SQLite holds
    /// one read transaction (a WAL snapshot), PostgreSQL one `REPEATABLE READ
    /// READ ONLY` transaction. Writes go on meanwhile; the snapshot keeps a
    /// connection (and old row versions, or the WAL from being checkpointed
    /// past it) until it is dropped, so read it promptly.
    async fn snapshot(&self) -> Result<Box<dyn Snapshot>>;

    /// Starts an import into this store, which must be **empty**: for a
    /// restore. Fails with [`Error::NotEmpty`] if the store holds any record.
    ///
    /// The import is one transaction: records added with [`Import::put`] become
    /// visible all at once at [`Import::commit`], or, if the import is dropped
    /// before it or a put fails, not at all. Other writers wait (or time out
    /// with [`Error::Unavailable`]) while it is open. Imported records get fresh
    /// revisions, greater than any the store had issued, in the order they were
    /// put; after the commit, the change feed carries them (or a
    /// [resync marker](Change::resync)).
    async fn import(&self) -> Result<Box<dyn Import>>;
}

/// A point-in-time view of a whole store (see [`Store::snapshot`]).
#[async_trait::async_trait]
pub trait Snapshot: Send {
    /// How many records the snapshot holds (counted inside it).
    fn record_count(&self) -> u64;

    /// The next at most `limit` records (`limit` at least 1), in path order;
    /// an empty page means the end.
    async fn next_page(&mut self, limit: usize) -> Result<Vec<(String, Record)>>;
}

/// An import into an empty store, one transaction (see [`Store::import`]).
#[async_trait::async_trait]
pub trait Import: Send {
    /// Adds one record. A path already added fails with
    /// [`Error::AlreadyExists`]; an invalid one with [`Error::InvalidPath`].
    /// After any error the import must be dropped, not committed.
    async fn put(&mut self, path: &str, value: &[u8]) -> Result<()>;

    /// Commits every record put, atomically; returns how many there were.
    async fn commit(self: Box<Self>) -> Result<u64>;
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a [`Store`].
///
/// Messages may contain paths (which are names, not secrets) but never record
/// values and never credentials.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// [`Store::create`] found a record already at this path; nothing was written.
    #[error("a record already exists at {path:?}")]
    AlreadyExists {
        /// The path that is taken.
        path: String,
    },

    /// A compare-and-set or delete was based on a stale read: the record has been
    /// written since, or is gone. Nothing was written; re-read and retry.
    #[error("the record at {path:?} changed or was deleted since it was read")]
    Conflict {
        /// The contested path.
        path: String,
    },

    /// [`Store::import`] found records in the store: an import goes only into
    /// an empty store, and nothing was written.
    #[error("the store is not empty; an import needs an empty store")]
    NotEmpty,

    /// [`Store::delete`] found no record at this path.
    #[error("no record at {path:?}")]
    NotFound {
        /// The missing path.
        path: String,
    },

    /// A path or prefix breaks the rules in [`path`]; the message says which rule.
    /// A caller bug, never retryable.
    #[error("invalid store path: {0}")]
    InvalidPath(String),

    /// The backend is temporarily unable to serve (no connection within the
    /// timeout, database locked beyond the busy timeout, store closed). The
    /// operation did not happen, or for a write whose future was dropped, may have;
    /// retrying later may succeed.
    #[error("storage backend unavailable: {0}")]
    Unavailable(String),

    /// The backend found its own data corrupt or inconsistent: SQLite's
    /// `SQLITE_CORRUPT` or `SQLITE_NOTADB`, an impossible stored revision, a
    /// revision counter behind the records. Retrying cannot help and serving
    /// around it would mean guessing, so callers fail closed (the server answers
    /// `DATA_LOSS`/`STORAGE_INTEGRITY`). The message is for operators' logs.
    #[error("storage backend data is corrupt: {0}")]
    Corrupt(String),

    /// Any other backend failure that retrying will not fix: a database written by
    /// a newer schema, a modified migration history, a statement the backend
    /// refuses, a write that broke the backend's own contract. The store fails
    /// closed rather than serve doubtful data. The message is for operators' logs;
    /// it is redacted of credentials.
    #[error("storage backend error: {0}")]
    Backend(String),
}

impl Error {
    /// Whether the same operation may succeed later without anyone repairing
    /// anything: true only for [`Error::Unavailable`]. Corruption, schema and
    /// contract failures ([`Error::Corrupt`], [`Error::Backend`]) and caller bugs
    /// ([`Error::InvalidPath`]) are permanent; the precondition failures
    /// ([`Error::AlreadyExists`], [`Error::Conflict`], [`Error::NotFound`]) are
    /// answers, which callers handle by re-reading, not by retrying blindly.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unavailable(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_is_object_safe() {
        fn takes_dyn(_: Option<&dyn Store>) {}
        takes_dyn(None);
    }

    #[test]
    fn only_unavailability_is_transient() {
        let path = || "keys/a".to_owned();
        assert!(Error::Unavailable("busy".into()).is_transient());
        for permanent in [
            Error::Corrupt("x".into()),
            Error::Backend("x".into()),
            Error::InvalidPath("x".into()),
            Error::AlreadyExists { path: path() },
            Error::Conflict { path: path() },
            Error::NotFound { path: path() },
            Error::NotEmpty,
        ] {
            assert!(!permanent.is_transient(), "{permanent:?}");
        }
    }

    #[test]
    fn error_messages_name_the_path() {
        let err = Error::Conflict {
            path: "keys/a".into(),
        };
        assert_eq!(
            err.to_string(),
            "the record at \"keys/a\" changed or was deleted since it was read"
        );
    }
}
