//! Named keys at run time: loading them through the barrier, the in-memory cache
//! of prepared AEAD keys, read-modify-write updates, and durable usage counters.
//!
//! Each key is one barrier-sealed record at `keys/<name>` holding its metadata and
//! every available version's material. Updates are compare-and-set on the record's
//! revision, so concurrent rotations on several replicas never lose a version.
//!
//! For 96-bit random-nonce key types the number of encryptions per version is
//! reserved from storage in blocks (`usage/<name>/<version>`), before any nonce of
//! the block is used. A crash loses at most the unused part of a block; a restart
//! never reuses a count, and replicas sharing storage reserve disjoint blocks, so the
//! stored total bounds the encryptions made under a version (invariant 3).
//!
//! # A usage record cannot vanish alone
//!
//! A usage record is a separate record, so it could be deleted (by an operator, a
//! bad restore, a tool) while the key stays. Counting a missing record as zero
//! would then restart the count and allow nonce reuse. So the key record remembers
//! which versions have been counted (`NamedKey::usage_reserved`, a flag per version
//! that is set once and never cleared), and the ledger keeps to these rules:
//!
//! 1. The first block of a version creates its usage record (put-if-absent), and
//!    before any encryption of that block is handed out the version's flag is set
//!    in the key record (compare-and-set, one extra write per version's lifetime).
//!    A version counted before the flag existed gets it at its next block.
//! 2. A usage record that is absent while the key record's flag says the version
//!    was counted (and still absent when read again after the flag: another
//!    replica may have created the record and set the flag between our two
//!    reads) is refused: `DATA_LOSS`/`STORAGE_INTEGRITY` for encryption (and
//!    from [`KeyManager::reserved_encryptions`]; `GetKey` shows such a version as
//!    used up). Nothing is re-created; an operator restores the record or
//!    rotates the key.
//! 3. "Absent" is only ever concluded from a successful read: a read error is
//!    that error (retryable or not), never zero.
//!
//! The absent-record check reads the key record from storage rather than the
//! cache, since another replica may have set the flag. What this does not catch:
//! a usage record deleted in the moment between its creation and the flag's (a
//! crash there leaves the record, which rule 1 flags at the next block).
//!
//! # Rollback of a key record
//!
//! The barrier authenticates a record's content and path, not its freshness: an
//! older sealed copy of `keys/<name>` put back in place of the current one (a
//! partial restore, a storage attacker) opens fine. So every write of a key
//! record advances its generation ([`NamedKey::generation`]), and the manager
//! remembers, per key, the highest generation it has opened and at which store
//! revision. A record of the same key (same [`KeyId`]) read at a later revision
//! with a lower generation is refused as `Corrupt` (`STORAGE_INTEGRITY`). A read
//! at an older revision is a stale read racing a write, not a rollback. The memory
//! is per process: a replica started after the rollback cannot tell.
//!
//! # Identity
//!
//! A key created again after its deletion is another key: it has a new random
//! [`KeyId`], and its usage records (`usage/<name>/<id>/<version>`), in-memory
//! reservation blocks and statistics are keyed by it, so no replica can go on
//! using a block reserved for the deleted key. Keys created before ids existed
//! keep `usage/<name>/<version>`.
//!
//! # Scheduled deletion and rotation
//!
//! `DeleteKey` only schedules: the key record gets a deletion time, and until it
//! the key refuses every use (`KEY_PENDING_DELETION`) but can be cancelled.
//! [`KeyManager::sweep`], run periodically on every replica, destroys keys whose
//! time has come (the record is deleted with compare-and-set, which crypto-shreds
//! every ciphertext under it) and rotates keys whose `auto_rotate_period` has
//! passed since their latest version. Both decide on the freshly read record
//! inside a compare-and-set, so of several replicas sweeping at once exactly one
//! acts, once per period.
//!
//! # Use statistics
//!
//! Per version, encryptions, decryptions and the last use are counted in memory
//! ([`KeyUse`], shared by every cached copy of a key) and merged into
//! `stats/<name>` by [`KeyManager::flush_stats`] every few seconds, adding to
//! what other replicas wrote. They are operational figures, not a bound: a crash
//! loses the unflushed part (the 96-bit-nonce usage counters above are the bound).

use std::{
    future::Future,
    ops::Deref,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use cipherd_core::{
    aead::AeadKey,
    barrier::Barrier,
    key_type::KeyType,
    keyring::{CreateOptions, KeyId, KeyName, KeyVersion, NamedKey},
    secret::KeyMaterial,
};
use cipherd_store::{Change, Store};
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;

use crate::{
    config::{LimitAction, UsagePolicy},
    error::{Error, Result},
};

/// Minimum age of a cached key before an unknown version may trigger a reload.
pub const RELOAD_MIN_INTERVAL: Duration = Duration::from_millis(250);

/// Rounds of reserve-or-rotate before an encryption gives up (ABORTED). Only
/// reached with a tiny usage limit under heavy contention.
const MAX_RESERVE_ROUNDS: usize = 64;

/// Keys listed per storage call while warming the cache.
const WARM_PAGE: usize = 1000;

/// How many times a read-modify-write retries on conflicting concurrent updates.
const MAX_CAS_ATTEMPTS: usize = 16;

/// Named keys, cached, over the barrier and the store.
pub struct KeyManager {
    store: Arc<dyn Store>,
    barrier: Arc<Barrier>,
    cache: Arc<DashMap<KeyName, Arc<LoadedKey>>>,
    usage: UsageLedger,
    /// Per key: the id, highest generation and its store revision opened so far
    /// (rollback detection, see the module docs).
    seen: Arc<DashMap<KeyName, Seen>>,
    /// Per key: use statistics not yet merged into storage.
    uses: DashMap<KeyName, Arc<KeyUse>>,
    invalidator: tokio::task::JoinHandle<()>,
}

#[derive(Clone, Copy)]
struct Seen {
    id: Option<KeyId>,
    generation: u64,
    revision: u64,
}

/// One key's use counts gathered in this process since the last flush, shared by
/// every cached copy of the key.
#[derive(Debug)]
pub struct KeyUse {
    id: Option<KeyId>,
    pending: Mutex<Vec<VersionUse>>,
}

/// Use of one key version: encryptions, decryptions, last use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionUse {
    /// The version.
    pub version: u32,
    /// Items encrypted under it (as requested; an item refused after the key was
    /// chosen still counts).
    pub encryptions: u64,
    /// Items decrypted under it (successfully).
    pub decryptions: u64,
    /// The last encryption or decryption, ms since the epoch.
    pub last_used_ms: u64,
}

impl KeyUse {
    fn new(id: Option<KeyId>) -> Self {
        Self {
            id,
            pending: Mutex::new(Vec::new()),
        }
    }

    /// Counts `encryptions` and `decryptions` of `version` now.
    pub fn note(&self, version: KeyVersion, encryptions: u64, decryptions: u64) {
        if encryptions == 0 && decryptions == 0 {
            return;
        }
        let now = now_ms();
        let mut pending = self.lock();
        merge_use(
            &mut pending,
            VersionUse {
                version: version.get(),
                encryptions,
                decryptions,
                last_used_ms: now,
            },
        );
    }

    fn take(&self) -> Vec<VersionUse> {
        std::mem::take(&mut *self.lock())
    }

    fn snapshot(&self) -> Vec<VersionUse> {
        self.lock().clone()
    }

    fn put_back(&self, uses: Vec<VersionUse>) {
        let mut pending = self.lock();
        for u in uses {
            merge_use(&mut pending, u);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<VersionUse>> {
        // Invariant: the critical sections are plain arithmetic on a Vec.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Adds `u` into `into` (counts add, the last use is the later one).
fn merge_use(into: &mut Vec<VersionUse>, u: VersionUse) {
    match into.iter_mut().find(|e| e.version == u.version) {
        Some(e) => {
            e.encryptions = e.encryptions.saturating_add(u.encryptions);
            e.decryptions = e.decryptions.saturating_add(u.decryptions);
            e.last_used_ms = e.last_used_ms.max(u.last_used_ms);
        }
        None => into.push(u),
    }
}

/// What one [`KeyManager::sweep`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    /// Keys examined.
    pub keys: usize,
    /// Keys rotated because their `auto_rotate_period` had passed.
    pub rotated: usize,
    /// Keys destroyed because their deletion time had come.
    pub destroyed: usize,
}

/// A key as loaded: its metadata and material plus AEAD keys prepared per version.
pub struct LoadedKey {
    key: NamedKey,
    revision: u64,
    /// When this copy was read from storage (bounds reloads, see `reload_for_version`).
    loaded_at: Instant,
    /// Prepared AEAD keys of non-derived keys, one per available version, sorted
    /// by version. A `Vec` of exact size: an `AeadKey` is about 1 KiB, and a
    /// `BTreeMap` node would reserve room for eleven of them per key.
    prepared: Vec<(KeyVersion, AeadKey)>,
    /// Use counts of the key, shared with every other copy of it.
    uses: Arc<KeyUse>,
}

/// An AEAD key to use for one operation: prepared and cached, or derived for a
/// context and owned by the caller.
pub enum WorkingKey<'a> {
    /// A cached key (non-derived key types).
    Cached(&'a AeadKey),
    /// Derived from the version material and the caller's context.
    Derived(Box<AeadKey>),
}

impl Deref for WorkingKey<'_> {
    type Target = AeadKey;

    fn deref(&self) -> &AeadKey {
        match self {
            WorkingKey::Cached(k) => k,
            WorkingKey::Derived(k) => k,
        }
    }
}

impl LoadedKey {
    /// The key's metadata and material.
    pub fn key(&self) -> &NamedKey {
        &self.key
    }

    /// Where uses of this key are counted.
    pub fn uses(&self) -> &KeyUse {
        &self.uses
    }

    /// Refuses a key scheduled for deletion (`KEY_PENDING_DELETION`).
    pub fn check_usable(&self) -> Result<()> {
        refuse_pending(&self.key)
    }

    /// The prepared AEAD key of `version` for non-derived keys (`None` for derived
    /// keys, whose working key depends on the context, and for unknown versions).
    pub fn prepared(&self, version: KeyVersion) -> Option<&AeadKey> {
        self.prepared
            .binary_search_by_key(&version, |(v, _)| *v)
            .ok()
            .map(|at| &self.prepared[at].1)
    }

    /// The AEAD key for `version` and `context` (derived keys need a context).
    pub fn working_key(&self, version: KeyVersion, context: &[u8]) -> Result<WorkingKey<'_>> {
        if !self.key.derived() {
            if !context.is_empty() {
                return Err(Error::InvalidArgument(
                    "context is only accepted for derived keys".into(),
                ));
            }
            return self
                .prepared(version)
                .map(WorkingKey::Cached)
                .ok_or(Error::DecryptionFailed);
        }
        let material = self.key.working_material(version, context)?;
        Ok(WorkingKey::Derived(Box::new(AeadKey::new(
            self.key.key_type(),
            &material,
        )?)))
    }

    fn prepare(key: NamedKey, revision: u64, uses: Arc<KeyUse>) -> Result<Self> {
        let mut prepared = Vec::new();
        if !key.derived() {
            prepared.reserve_exact(key.versions().count());
            // `versions()` yields in ascending order, so `prepared` is sorted.
            for (version, _) in key.versions() {
                prepared.push((
                    version,
                    AeadKey::new(key.key_type(), key.material(version)?)?,
                ));
            }
        }
        Ok(Self {
            key,
            revision,
            loaded_at: Instant::now(),
            prepared,
            uses,
        })
    }
}

impl KeyManager {
    /// A manager with an empty cache; starts a task that drops cache entries when
    /// the store's change feed reports another writer's change.
    pub fn new(store: Arc<dyn Store>, barrier: Arc<Barrier>, usage: UsagePolicy) -> Self {
        let cache: Arc<DashMap<KeyName, Arc<LoadedKey>>> = Arc::new(DashMap::new());
        let seen = Arc::new(DashMap::new());
        let invalidator = tokio::spawn(invalidate_on_change(
            store.subscribe(),
            Arc::downgrade(&cache),
            Arc::clone(&seen),
        ));
        Self {
            usage: UsageLedger::new(Arc::clone(&store), Arc::clone(&barrier), usage),
            store,
            barrier,
            cache,
            seen,
            uses: DashMap::new(),
            invalidator,
        }
    }

    /// The key, from the cache or loaded from storage.
    pub async fn get(&self, name: &KeyName) -> Result<Arc<LoadedKey>> {
        if let Some(k) = self.cache.get(name) {
            return Ok(Arc::clone(k.value()));
        }
        self.reload(name).await
    }

    /// Loads the key from storage, replacing any cached copy. Used when a
    /// ciphertext names a version newer than the cached key knows.
    pub async fn reload(&self, name: &KeyName) -> Result<Arc<LoadedKey>> {
        let path = key_path(name);
        let record = self
            .store
            .get(&path)
            .await?
            .ok_or_else(|| Error::KeyNotFound(name.to_string()))?;
        let loaded = Arc::new(self.open_record(&path, &record.value, record.revision)?);
        self.install(name, &loaded);
        Ok(loaded)
    }

    /// Returns a copy of the key that knows `version` if storage has one: reloads
    /// when `version` is newer than `cached` knows (another replica may have just
    /// rotated), but at most once per [`RELOAD_MIN_INTERVAL`] per key, so forged
    /// ciphertexts naming future versions cannot drive storage reads.
    pub async fn reload_for_version(
        &self,
        name: &KeyName,
        cached: Arc<LoadedKey>,
        version: KeyVersion,
    ) -> Result<Arc<LoadedKey>> {
        if version <= cached.key.latest_version()
            || cached.loaded_at.elapsed() < RELOAD_MIN_INTERVAL
        {
            return Ok(cached);
        }
        self.reload(name).await
    }

    /// Creates a key with version 1.
    pub async fn create(&self, name: &KeyName, opts: CreateOptions) -> Result<Arc<LoadedKey>> {
        let mut key = NamedKey::create(name.clone(), opts, now_ms())?;
        key.next_generation();
        let path = key_path(name);
        let sealed = self.barrier.seal(&path, key.to_record().expose_secret())?;
        let revision = match self.store.create(&path, &sealed).await {
            Ok(rev) => rev,
            Err(cipherd_store::Error::AlreadyExists { .. }) => {
                return Err(Error::KeyExists(name.to_string()));
            }
            Err(e) => return Err(e.into()),
        };
        self.note_seen(&key, revision)?;
        let uses = self.uses_of(&key);
        let loaded = Arc::new(LoadedKey::prepare(key, revision, uses)?);
        self.install(name, &loaded);
        tracing::info!(key = %name, "key created");
        Ok(loaded)
    }

    /// Applies `change` to the stored key with compare-and-set, retrying on
    /// concurrent updates. `change` sees the freshest stored state each attempt and
    /// returns whether it changed anything; if not, nothing is written.
    pub async fn update<F>(&self, name: &KeyName, mut change: F) -> Result<Arc<LoadedKey>>
    where
        F: FnMut(&mut NamedKey) -> Result<bool>,
    {
        let path = key_path(name);
        for _ in 0..MAX_CAS_ATTEMPTS {
            let record = self
                .store
                .get(&path)
                .await?
                .ok_or_else(|| Error::KeyNotFound(name.to_string()))?;
            let current = self.open_record(&path, &record.value, record.revision)?;
            let uses = Arc::clone(&current.uses);
            let mut key = current.key;
            if !change(&mut key)? {
                let unchanged = Arc::new(LoadedKey::prepare(key, record.revision, uses)?);
                self.install(name, &unchanged);
                return Ok(unchanged);
            }
            key.next_generation();
            let sealed = self.barrier.seal(&path, key.to_record().expose_secret())?;
            match self
                .store
                .compare_and_set(&path, record.revision, &sealed)
                .await
            {
                Ok(revision) => {
                    self.note_seen(&key, revision)?;
                    let loaded = Arc::new(LoadedKey::prepare(key, revision, uses)?);
                    self.install(name, &loaded);
                    return Ok(loaded);
                }
                Err(cipherd_store::Error::Conflict { .. }) => continue,
                Err(cipherd_store::Error::NotFound { .. }) => {
                    return Err(Error::KeyNotFound(name.to_string()));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Aborted(name.to_string()))
    }

    /// Schedules the key's destruction at `at_ms` (only when its config allows
    /// deletion). Until then it refuses every use and the deletion can be
    /// cancelled; [`KeyManager::sweep`] destroys it when the time comes.
    pub async fn schedule_deletion(&self, name: &KeyName, at_ms: u64) -> Result<Arc<LoadedKey>> {
        let key = self
            .update(name, |k| {
                k.schedule_deletion(at_ms)?;
                Ok(true)
            })
            .await?;
        tracing::warn!(key = %name, deletion_time_ms = at_ms, "key scheduled for deletion");
        Ok(key)
    }

    /// Cancels the key's scheduled deletion; `FAILED_PRECONDITION` if none is.
    pub async fn cancel_deletion(&self, name: &KeyName) -> Result<Arc<LoadedKey>> {
        let key = self
            .update(name, |k| {
                if k.cancel_deletion() {
                    Ok(true)
                } else {
                    Err(Error::FailedPrecondition(format!(
                        "key \"{name}\" is not scheduled for deletion"
                    )))
                }
            })
            .await?;
        tracing::warn!(key = %name, "key deletion cancelled");
        Ok(key)
    }

    /// Destroys the key if its deletion time is at or before `now_ms`: deletes
    /// the record (compare-and-set on the revision read, so a cancellation that
    /// got in first wins), then its usage records and statistics. Returns whether
    /// it destroyed the key.
    pub async fn destroy_if_due(&self, name: &KeyName, now_ms: u64) -> Result<bool> {
        let path = key_path(name);
        let Some(record) = self.store.get(&path).await? else {
            return Ok(false);
        };
        let key = self.open_record(&path, &record.value, record.revision)?;
        if key.key.deletion_time_ms().is_none_or(|at| at > now_ms) {
            return Ok(false);
        }
        match self.store.delete(&path, record.revision).await {
            Ok(()) => {}
            // Cancelled, changed or destroyed by another replica meanwhile.
            Err(cipherd_store::Error::Conflict { .. } | cipherd_store::Error::NotFound { .. }) => {
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        }
        self.cache.remove(name);
        self.uses.remove(name);
        self.seen.remove(name);
        self.usage.remove(name).await?;
        let stats = stats_path(name);
        if let Some(rec) = self.store.get(&stats).await? {
            // A leftover only shows old figures for a key of the same name until
            // its id differs, which makes them ignored: nothing unsafe.
            let _ = self.store.delete(&stats, rec.revision).await;
        }
        tracing::warn!(key = %name, "key destroyed: its scheduled deletion time came");
        Ok(true)
    }

    /// One pass of key housekeeping at `now_ms`: destroys every key whose
    /// deletion time has come and rotates every key whose `auto_rotate_period`
    /// has passed since its latest version. Each decision is taken again on the
    /// freshly read record inside a compare-and-set, so replicas sweeping at the
    /// same time act once between them. A key that fails is logged and skipped.
    pub async fn sweep(&self, now_ms: u64, keep_going: impl Fn() -> bool) -> Result<SweepReport> {
        let mut report = SweepReport::default();
        let mut after = None;
        while let Some(page) = self.key_page(&mut after).await? {
            for (name, path, record) in page {
                if !keep_going() {
                    return Ok(report);
                }
                report.keys += 1;
                let key = match open_key(&self.barrier, &path, &record.value) {
                    Ok(key) => key,
                    Err(e) => {
                        tracing::error!(key = %name, error = %e, "key failed to load");
                        continue;
                    }
                };
                let outcome = if key.deletion_time_ms().is_some_and(|at| at <= now_ms) {
                    self.destroy_if_due(&name, now_ms)
                        .await
                        .map(|destroyed| report.destroyed += usize::from(destroyed))
                } else if key.rotation_due(now_ms) {
                    self.rotate_if_due(&name, now_ms)
                        .await
                        .map(|rotated| report.rotated += usize::from(rotated))
                } else {
                    Ok(())
                };
                if let Err(e) = outcome {
                    tracing::error!(key = %name, error = %e, "key housekeeping failed");
                }
            }
        }
        Ok(report)
    }

    /// The next page of stored key records (at most [`WARM_PAGE`], in name
    /// order) after `after`, which it advances; `None` at the end. Paths that
    /// name no valid key are left out.
    async fn key_page(
        &self,
        after: &mut Option<String>,
    ) -> Result<Option<Vec<(KeyName, String, cipherd_store::Record)>>> {
        let page = self
            .store
            .scan(KEY_PREFIX, after.as_deref(), WARM_PAGE)
            .await?;
        let Some((last, _)) = page.last() else {
            return Ok(None);
        };
        *after = Some(last.clone());
        Ok(Some(
            page.into_iter()
                .filter_map(|(path, record)| {
                    let name = KeyName::new(path.strip_prefix(KEY_PREFIX)?).ok()?;
                    Some((name, path, record))
                })
                .collect(),
        ))
    }

    /// Rotates the key if its automatic rotation is due at `now_ms` on the stored
    /// record; returns whether it rotated.
    async fn rotate_if_due(&self, name: &KeyName, now_ms: u64) -> Result<bool> {
        let mut rotated = false;
        let key = self
            .update(name, |k| {
                rotated = k.rotation_due(now_ms);
                if rotated {
                    k.rotate(now_ms)?;
                }
                Ok(rotated)
            })
            .await?;
        if rotated {
            tracing::info!(
                key = %name,
                version = %key.key().latest_version(),
                "key rotated: its auto_rotate_period passed"
            );
        }
        Ok(rotated)
    }

    /// Merges the use counts gathered since the last flush into `stats/<name>`,
    /// adding to what other replicas wrote. Counts that cannot be written are
    /// kept for the next flush. Returns how many keys were written.
    pub async fn flush_stats(&self) -> Result<usize> {
        let pending: Vec<(KeyName, Arc<KeyUse>)> = self
            .uses
            .iter()
            .map(|e| (e.key().clone(), Arc::clone(e.value())))
            .collect();
        let mut written = 0;
        let mut first_error = None;
        for (name, uses) in pending {
            let taken = uses.take();
            if taken.is_empty() {
                continue;
            }
            match self.merge_stats(&name, uses.id, &taken).await {
                Ok(()) => written += 1,
                Err(e) => {
                    uses.put_back(taken);
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(written),
        }
    }

    async fn merge_stats(
        &self,
        name: &KeyName,
        id: Option<KeyId>,
        add: &[VersionUse],
    ) -> Result<()> {
        let path = stats_path(name);
        for _ in 0..MAX_CAS_ATTEMPTS {
            let current = self.store.get(&path).await?;
            let mut record = match &current {
                Some(rec) => self.open_stats(&path, &rec.value)?,
                None => StatsRecord {
                    id,
                    versions: Vec::new(),
                },
            };
            if record.id != id {
                // Figures of a deleted key of the same name.
                record = StatsRecord {
                    id,
                    versions: Vec::new(),
                };
            }
            for u in add {
                merge_use(&mut record.versions, *u);
            }
            let body = serde_json::to_vec(&record).map_err(|e| Error::Internal(e.to_string()))?;
            let sealed = self.barrier.seal(&path, &body)?;
            if write_over(&*self.store, &path, current.as_ref(), &sealed)
                .await?
                .is_some()
            {
                return Ok(());
            }
        }
        Err(Error::Aborted(path))
    }

    /// Per version: uses recorded in storage by every replica plus this
    /// process's unflushed ones, sorted by version.
    pub async fn version_uses(&self, loaded: &LoadedKey) -> Result<Vec<VersionUse>> {
        let path = stats_path(loaded.key.name());
        let mut versions = match self.store.get(&path).await? {
            Some(rec) => {
                let record = self.open_stats(&path, &rec.value)?;
                if record.id == loaded.key.id() {
                    record.versions
                } else {
                    Vec::new()
                }
            }
            None => Vec::new(),
        };
        for u in loaded.uses.snapshot() {
            merge_use(&mut versions, u);
        }
        versions.sort_by_key(|u| u.version);
        Ok(versions)
    }

    fn open_stats(&self, path: &str, sealed: &[u8]) -> Result<StatsRecord> {
        let plain = self.barrier.open(path, sealed)?;
        serde_json::from_slice(plain.expose_secret()).map_err(|_| Error::Corrupt(path.to_owned()))
    }

    /// Loads every key into the cache, page by page, so that the first request for
    /// each key does not pay a storage read. Returns how many keys were loaded.
    /// Runs in the background after unseal; stops early if `keep_going` says so
    /// (the service was sealed). Keys that fail to load are logged and skipped:
    /// requests for them fail closed on their own.
    pub async fn warm(&self, keep_going: impl Fn() -> bool) -> Result<usize> {
        let mut loaded = 0;
        let mut after = None;
        while let Some(page) = self.key_page(&mut after).await? {
            for (name, path, record) in page {
                if !keep_going() {
                    return Ok(loaded);
                }
                match self.open_record(&path, &record.value, record.revision) {
                    Ok(key) => {
                        self.install(&name, &Arc::new(key));
                        loaded += 1;
                    }
                    Err(e) => tracing::error!(key = %name, error = %e, "key failed to load"),
                }
            }
        }
        Ok(loaded)
    }

    /// Key names in byte order, after `start_after`, at most `limit`.
    pub async fn list(&self, start_after: Option<&str>, limit: usize) -> Result<Vec<String>> {
        let after = start_after.map(|n| format!("{KEY_PREFIX}{n}"));
        let paths = self.store.list(KEY_PREFIX, after.as_deref(), limit).await?;
        Ok(paths
            .into_iter()
            .filter_map(|p| p.strip_prefix(KEY_PREFIX).map(str::to_owned))
            .collect())
    }

    /// Reserves `count` encryptions under the key's encryption version (the latest
    /// unless `requested`) and returns the key and version to encrypt with.
    ///
    /// For 96-bit-nonce types this is where the usage limit is enforced: when the
    /// latest version is exhausted and the policy says `rotate`, a new version is
    /// added and used; otherwise the call fails with `KEY_USAGE_EXHAUSTED`.
    pub async fn reserve_encryptions(
        &self,
        name: &KeyName,
        requested: Option<KeyVersion>,
        count: u64,
    ) -> Result<(Arc<LoadedKey>, KeyVersion)> {
        let mut loaded = self.get(name).await?;
        loaded.check_usable()?;
        let counted = loaded.key.key_type().usage_limit().is_some();
        let policy = self.usage.policy();
        if counted && count > policy.limit {
            // No version could ever take this request; rotating would only burn
            // versions. The client must split it.
            return Err(Error::TooLarge {
                what: "request",
                actual: usize::try_from(count).unwrap_or(usize::MAX),
                limit: usize::try_from(policy.limit).unwrap_or(usize::MAX),
                unit: "encryptions",
                setting: "keys.usage_limit",
            });
        }
        // Under concurrency, other requests may use up a freshly rotated version
        // before this one gets to it; each round either reserves, rotates, or
        // sees someone else's rotation, so a few rounds always suffice unless the
        // limit is tiny and the contention extreme.
        for _ in 0..MAX_RESERVE_ROUNDS {
            let version = loaded
                .key
                .encryption_version(requested)
                .map_err(|e| match e {
                    cipherd_core::Error::VersionNotFound(v) => Error::InvalidArgument(format!(
                        "key \"{name}\" has no version {v} to encrypt with"
                    )),
                    e => e.into(),
                })?;
            if !counted || count == 0 {
                loaded.uses.note(version, count, 0);
                return Ok((loaded, version));
            }
            let flagged = loaded.key.usage_reserved(version)?;
            let mark = || async move {
                if flagged {
                    Ok(())
                } else {
                    self.mark_usage_reserved(name, version).await
                }
            };
            match self
                .usage
                .reserve(name, loaded.key.id(), version, count, mark)
                .await
            {
                Ok(()) => {
                    loaded.uses.note(version, count, 0);
                    return Ok((loaded, version));
                }
                Err(Error::UsageExhausted(_))
                    if requested.is_none() && policy.on_limit == LimitAction::Rotate =>
                {
                    // Another request or replica may have rotated already: then
                    // use its version rather than write again.
                    loaded = self.reload(name).await?;
                    if loaded.key.latest_version() == version {
                        tracing::warn!(key = %name, %version, "usage limit reached; rotating");
                        loaded = self
                            .update(name, |k| {
                                if k.latest_version() != version {
                                    return Ok(false);
                                }
                                refuse_pending(k)?;
                                k.rotate(now_ms())?;
                                Ok(true)
                            })
                            .await?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Aborted(name.to_string()))
    }

    /// Encryptions reserved so far for `version` of `key` (an upper bound on
    /// those made).
    pub async fn reserved_encryptions(&self, key: &NamedKey, version: KeyVersion) -> Result<u64> {
        self.usage.reserved(key.name(), key.id(), version).await
    }

    /// Sets `version`'s usage flag in the stored key record (rule 1 of the module
    /// docs). A version trimmed meanwhile needs no flag: it can no longer encrypt.
    async fn mark_usage_reserved(&self, name: &KeyName, version: KeyVersion) -> Result<()> {
        self.update(name, |k| match k.mark_usage_reserved(version) {
            Ok(changed) => Ok(changed),
            Err(cipherd_core::Error::VersionNotFound(_)) => Ok(false),
            Err(e) => Err(e.into()),
        })
        .await?;
        Ok(())
    }

    /// Backs up one key: its record (config, versions, material) and the usage
    /// records of its versions, sealed under the instance's backup wrapping key
    /// (created on first use; see [`KEY_BACKUP_PATH`]). The plaintext record
    /// exists only in memory here; what is returned is ciphertext bound to the
    /// key's name.
    pub async fn backup_key(&self, name: &KeyName) -> Result<Vec<u8>> {
        let path = key_path(name);
        let record = self
            .store
            .get(&path)
            .await?
            .ok_or_else(|| Error::KeyNotFound(name.to_string()))?;
        let key = open_key(&self.barrier, &path, &record.value)?;
        let mut usage = Vec::new();
        for (version, _) in key.versions() {
            let reserved = self.usage.reserved(name, key.id(), version).await?;
            if reserved > 0 {
                usage.push((version.get(), reserved));
            }
        }
        let payload = KeyBackupPayload {
            key: base64::engine::general_purpose::STANDARD.encode(key.to_record().expose_secret()),
            usage,
        };
        let plain = zeroize::Zeroizing::new(
            serde_json::to_vec(&payload).map_err(|e| Error::Internal(e.to_string()))?,
        );
        drop(payload);
        let wrapping = self.backup_wrapping_key(true).await?;
        let mut out = key_backup_header(name);
        let aad = out.clone();
        wrapping.seal_append(&aad, &plain, &mut out)?;
        tracing::info!(key = %name, "key backed up");
        Ok(out)
    }

    /// Restores a key from [`backup_key`](Self::backup_key)'s bytes under its
    /// original name: the usage records first (only ever raised, never
    /// lowered), then the key record, put-if-absent, so an existing key of that
    /// name is never overwritten (`KeyExists`).
    pub async fn restore_key(&self, backup: &[u8]) -> Result<Arc<LoadedKey>> {
        let name = key_backup_name(backup)?;
        let header_len = key_backup_header(&name).len();
        let path = key_path(&name);
        if self.store.get(&path).await?.is_some() {
            return Err(Error::KeyExists(name.to_string()));
        }
        let wrapping = self.backup_wrapping_key(false).await?;
        let mut plain = zeroize::Zeroizing::new(Vec::new());
        wrapping
            .open_append(&backup[..header_len], &backup[header_len..], &mut plain)
            .map_err(|_| {
                Error::InvalidArgument(
                    "the key backup does not open on this instance: it was made by another \
                     instance (restore it where it was made, or into a restore of that \
                     instance's full backup), or it was altered"
                        .into(),
                )
            })?;
        let payload: KeyBackupPayload = serde_json::from_slice(&plain)
            .map_err(|_| Error::InvalidArgument("the key backup's content is invalid".into()))?;
        let record = zeroize::Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(&payload.key)
                .map_err(|_| {
                    Error::InvalidArgument("the key backup's content is invalid".into())
                })?,
        );
        let mut key = NamedKey::from_record(&record)
            .map_err(|_| Error::InvalidArgument("the key backup's key record is invalid".into()))?;
        drop(record);
        // Restoring is the undoing of a deletion: the copy taken while the key
        // was scheduled for deletion must not be destroyed again by the sweep.
        key.cancel_deletion();
        key.next_generation();
        if key.name() != &name {
            return Err(Error::InvalidArgument(
                "the key backup's record names another key".into(),
            ));
        }
        for &(version, reserved) in &payload.usage {
            let version = KeyVersion::new(version)
                .map_err(|_| Error::InvalidArgument("the key backup names version 0".into()))?;
            self.usage.raise(&name, key.id(), version, reserved).await?;
        }
        let sealed = self.barrier.seal(&path, key.to_record().expose_secret())?;
        let revision = match self.store.create(&path, &sealed).await {
            Ok(rev) => rev,
            Err(cipherd_store::Error::AlreadyExists { .. }) => {
                return Err(Error::KeyExists(name.to_string()));
            }
            Err(e) => return Err(e.into()),
        };
        // An older copy of a key this process saw deleted: not a rollback.
        self.seen.remove(&name);
        self.note_seen(&key, revision)?;
        let uses = self.uses_of(&key);
        let loaded = Arc::new(LoadedKey::prepare(key, revision, uses)?);
        self.install(&name, &loaded);
        tracing::info!(key = %name, "key restored from a key backup");
        Ok(loaded)
    }

    /// The backup wrapping key, from its barrier-sealed record; created (if
    /// `create`) on first use, put-if-absent so replicas agree on one.
    async fn backup_wrapping_key(&self, create: bool) -> Result<AeadKey> {
        for _ in 0..MAX_CAS_ATTEMPTS {
            if let Some(rec) = self.store.get(KEY_BACKUP_PATH).await? {
                let plain = self.barrier.open(KEY_BACKUP_PATH, &rec.value)?;
                let material = KeyMaterial::from_slice(plain.expose_secret())
                    .map_err(|_| Error::Corrupt(KEY_BACKUP_PATH.to_owned()))?;
                return Ok(AeadKey::new(KeyType::Xaes256Gcm, &material)?);
            }
            if !create {
                return Err(Error::FailedPrecondition(
                    "this instance has never made a key backup, so none opens here: restore \
                     a key backup on the instance that made it, or on a restore of that \
                     instance's full backup"
                        .into(),
                ));
            }
            let material = KeyMaterial::generate()?;
            let sealed = self
                .barrier
                .seal(KEY_BACKUP_PATH, material.expose_secret())?;
            match self.store.create(KEY_BACKUP_PATH, &sealed).await {
                Ok(_) => return Ok(AeadKey::new(KeyType::Xaes256Gcm, &material)?),
                // Another call or replica made one first: use that one.
                Err(cipherd_store::Error::AlreadyExists { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Aborted(KEY_BACKUP_PATH.to_owned()))
    }

    /// The key name in a key backup's clear header (to authorize a restore
    /// before anything is opened).
    pub fn key_backup_name(&self, backup: &[u8]) -> Result<KeyName> {
        key_backup_name(backup)
    }

    /// The configured usage policy.
    pub fn usage_policy(&self) -> UsagePolicy {
        self.usage.policy()
    }

    fn install(&self, name: &KeyName, loaded: &Arc<LoadedKey>) {
        // Never replace a newer cached copy with an older one.
        self.cache
            .entry(name.clone())
            .and_modify(|cur| {
                if cur.revision < loaded.revision {
                    *cur = Arc::clone(loaded);
                }
            })
            .or_insert_with(|| Arc::clone(loaded));
    }

    fn open_record(&self, path: &str, sealed: &[u8], revision: u64) -> Result<LoadedKey> {
        let key = open_key(&self.barrier, path, sealed)?;
        self.note_seen(&key, revision)?;
        let uses = self.uses_of(&key);
        LoadedKey::prepare(key, revision, uses)
    }

    /// Records that `key` was read or written at store `revision`, refusing a
    /// rollback: the same key at a later revision with a lower generation than
    /// seen before (see the module docs).
    fn note_seen(&self, key: &NamedKey, revision: u64) -> Result<()> {
        let now = Seen {
            id: key.id(),
            generation: key.generation(),
            revision,
        };
        let mut entry = self.seen.entry(key.name().clone()).or_insert(now);
        let seen = *entry;
        if seen.id != now.id {
            // Another key of this name (deleted and created again), or an old
            // copy read late: follow the one at the later revision.
            if revision > seen.revision {
                *entry = now;
            }
            return Ok(());
        }
        if revision > seen.revision && now.generation < seen.generation {
            drop(entry);
            tracing::error!(
                key = %key.name(),
                generation = now.generation,
                seen_generation = seen.generation,
                revision,
                "key record is older than one already seen: rolled back in storage; refusing it"
            );
            return Err(Error::Corrupt(key_path(key.name())));
        }
        if now.generation >= seen.generation && revision >= seen.revision {
            *entry = now;
        }
        Ok(())
    }

    /// The shared use counter of `key`, fresh if the key's id changed.
    fn uses_of(&self, key: &NamedKey) -> Arc<KeyUse> {
        let mut entry = self
            .uses
            .entry(key.name().clone())
            .or_insert_with(|| Arc::new(KeyUse::new(key.id())));
        if entry.id != key.id() {
            *entry = Arc::new(KeyUse::new(key.id()));
        }
        Arc::clone(&entry)
    }
}

/// Writes `sealed` at `path` over what the caller read there (`current`):
/// compare-and-set on its revision, or put-if-absent if it read nothing. The
/// new revision, or `None` if another writer got in first (re-read, retry).
async fn write_over(
    store: &dyn Store,
    path: &str,
    current: Option<&cipherd_store::Record>,
    sealed: &[u8],
) -> Result<Option<u64>> {
    let written = match current {
        Some(rec) => store.compare_and_set(path, rec.revision, sealed).await,
        None => store.create(path, sealed).await,
    };
    match written {
        Ok(revision) => Ok(Some(revision)),
        Err(
            cipherd_store::Error::Conflict { .. }
            | cipherd_store::Error::AlreadyExists { .. }
            | cipherd_store::Error::NotFound { .. },
        ) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// `KEY_PENDING_DELETION` for a key scheduled for deletion.
pub fn refuse_pending(key: &NamedKey) -> Result<()> {
    match key.deletion_time_ms() {
        Some(_) => Err(Error::KeyPendingDeletion(key.name().to_string())),
        None => Ok(()),
    }
}

/// The stored use statistics of one key (`stats/<name>`).
#[derive(Serialize, Deserialize)]
struct StatsRecord {
    id: Option<KeyId>,
    versions: Vec<VersionUse>,
}

/// Opens a key record through the barrier and decodes it, failing closed
/// (`Corrupt`) on anything the barrier refuses, that does not decode, or that
/// names another key than its path.
fn open_key(barrier: &Barrier, path: &str, sealed: &[u8]) -> Result<NamedKey> {
    let plain = barrier.open(path, sealed)?;
    let key = NamedKey::from_record(plain.expose_secret()).map_err(|e| {
        tracing::error!(path, error = %e, "key record does not decode");
        Error::Corrupt(path.to_owned())
    })?;
    let expected = path.strip_prefix(KEY_PREFIX).unwrap_or_default();
    if key.name().as_str() != expected {
        tracing::error!(path, "key record names another key");
        return Err(Error::Corrupt(path.to_owned()));
    }
    Ok(key)
}

impl Drop for KeyManager {
    fn drop(&mut self) {
        self.invalidator.abort();
    }
}

impl std::fmt::Debug for KeyManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyManager")
            .field("cached_keys", &self.cache.len())
            .finish_non_exhaustive()
    }
}

/// The durable encryption counts of 96-bit-nonce key versions, and this process's
/// reserved blocks of them: the one owner of usage reservation.
///
/// A count is reserved from storage (`usage/<name>/<version>`) in blocks of
/// `keys.usage_reservation_block` before any encryption of the block happens, and
/// handed out from memory until the block runs out. The stored count only ever
/// grows: a reservation that would not fit under the limit is refused
/// (`UsageExhausted`), including when the stored count already meets or exceeds
/// the limit because an operator lowered it. All arithmetic is checked. A missing
/// record counts as zero only for a version the key record says was never
/// counted (see the module docs, "A usage record cannot vanish alone").
struct UsageLedger {
    store: Arc<dyn Store>,
    barrier: Arc<Barrier>,
    policy: UsagePolicy,
    /// Keyed by the key's id too: a key deleted and created again under the same
    /// name never inherits the deleted key's block.
    blocks: DashMap<(KeyName, Option<KeyId>, KeyVersion), Arc<Reservation>>,
}

/// This process's current block of one key version, and the lock that makes
/// storage reservations for it one at a time.
#[derive(Default)]
struct Reservation {
    block: Mutex<Block>,
    reserving: tokio::sync::Mutex<()>,
}

/// Encryptions `[next, end)` reserved in storage and not yet handed out.
#[derive(Default)]
struct Block {
    next: u64,
    end: u64,
}

impl Block {
    /// Hands out `count` encryptions if the block still holds them.
    fn take(&mut self, count: u64) -> bool {
        match self.next.checked_add(count) {
            Some(next) if next <= self.end => {
                self.next = next;
                true
            }
            _ => false,
        }
    }
}

impl UsageLedger {
    fn new(store: Arc<dyn Store>, barrier: Arc<Barrier>, policy: UsagePolicy) -> Self {
        Self {
            store,
            barrier,
            policy,
            blocks: DashMap::new(),
        }
    }

    fn policy(&self) -> UsagePolicy {
        self.policy
    }

    /// Takes `count` encryptions of `version`: from this process's block, or by
    /// reserving a new block in storage. `UsageExhausted` when the version's limit
    /// leaves no room for `count` more.
    ///
    /// After a block is reserved in storage and before any of it is handed out
    /// (to this call or a concurrent one), `mark` runs: it sets the version's
    /// usage flag in the key record (rule 1 of the module docs). If it fails, the
    /// block is abandoned (counted as used, the safe direction) and so is the call.
    async fn reserve<F, Fut>(
        &self,
        name: &KeyName,
        id: Option<KeyId>,
        version: KeyVersion,
        count: u64,
        mark: F,
    ) -> Result<()>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        if count == 0 {
            return Ok(());
        }
        let reservation = Arc::clone(
            self.blocks
                .entry((name.clone(), id, version))
                .or_default()
                .value(),
        );
        if lock_block(&reservation).take(count) {
            return Ok(());
        }
        let _reserving = reservation.reserving.lock().await;
        if lock_block(&reservation).take(count) {
            return Ok(());
        }
        let (start, end) = self.reserve_block(name, id, version, count).await?;
        mark().await?;
        // The unused rest of the previous block is abandoned: counting it as used
        // is the safe direction.
        let mut block = Block { next: start, end };
        let taken = block.take(count);
        // `reserve_block` returns at least `count` encryptions.
        debug_assert!(taken, "a fresh block holds the request");
        if !taken {
            return Err(Error::Internal("usage block smaller than requested".into()));
        }
        *lock_block(&reservation) = block;
        Ok(())
    }

    /// Encryptions reserved so far for `version` (an upper bound on those made).
    async fn reserved(
        &self,
        name: &KeyName,
        id: Option<KeyId>,
        version: KeyVersion,
    ) -> Result<u64> {
        let path = usage_path(name, id, version);
        for _ in 0..MAX_CAS_ATTEMPTS {
            match self.store.get(&path).await? {
                Some(rec) => return Ok(self.open(&path, &rec.value)?.reserved),
                None if self.check_never_counted(name, id, version, &path).await? => return Ok(0),
                // Created by another replica between the two reads: read it.
                None => continue,
            }
        }
        Err(Error::Aborted(path))
    }

    /// For a usage record found absent: `true` if the stored key record (read
    /// afresh, not cached) says `version` was never counted, so the count is 0.
    /// If the flag says it was counted, the usage record is read once more: the
    /// first block's record is created before the flag is set, so another
    /// replica may have done both between our two reads; then `false` (read it
    /// again). Still absent: it vanished, and that fails closed (`Corrupt`).
    async fn check_never_counted(
        &self,
        name: &KeyName,
        id: Option<KeyId>,
        version: KeyVersion,
        path: &str,
    ) -> Result<bool> {
        let key_path = key_path(name);
        let record = self
            .store
            .get(&key_path)
            .await?
            .ok_or_else(|| Error::KeyNotFound(name.to_string()))?;
        let key = open_key(&self.barrier, &key_path, &record.value)?;
        if key.id() != id {
            // Deleted and created again since the caller loaded it: its copy is
            // stale, and a retry loads the new key.
            return Err(Error::Aborted(name.to_string()));
        }
        if key.usage_reserved(version)? {
            if self.store.get(path).await?.is_some() {
                return Ok(false);
            }
            tracing::error!(
                key = %name,
                %version,
                path,
                "usage record missing for a version that has been used; refusing to count from zero"
            );
            return Err(Error::Corrupt(path.to_owned()));
        }
        Ok(true)
    }

    /// Raises the stored count of `version` to at least `reserved` (a key
    /// restore): creates the record, or raises a lower one; never lowers it.
    async fn raise(
        &self,
        name: &KeyName,
        id: Option<KeyId>,
        version: KeyVersion,
        reserved: u64,
    ) -> Result<()> {
        let path = usage_path(name, id, version);
        let body = serde_json::to_vec(&UsageRecord { reserved })
            .map_err(|e| Error::Internal(e.to_string()))?;
        let sealed = self.barrier.seal(&path, &body)?;
        for _ in 0..MAX_CAS_ATTEMPTS {
            let current = self.store.get(&path).await?;
            if let Some(rec) = &current
                && self.open(&path, &rec.value)?.reserved >= reserved
            {
                return Ok(());
            }
            if write_over(&*self.store, &path, current.as_ref(), &sealed)
                .await?
                .is_some()
            {
                return Ok(());
            }
        }
        Err(Error::Aborted(path))
    }

    /// Forgets a deleted key's blocks and deletes its usage records.
    async fn remove(&self, name: &KeyName) -> Result<()> {
        self.blocks.retain(|(n, _, _), _| n != name);
        let prefix = format!("{USAGE_PREFIX}{name}/");
        for usage_path in self.store.list(&prefix, None, usize::MAX).await? {
            if let Some(rec) = self.store.get(&usage_path).await? {
                // Best effort: a leftover counter only over-counts a future key of
                // the same name, which has fresh material, so nothing is unsafe.
                let _ = self.store.delete(&usage_path, rec.revision).await;
            }
        }
        Ok(())
    }

    /// Reserves a block of at least `count` encryptions for `version` in storage
    /// and returns it as `[start, end)`. The stored count moves from `start` to
    /// `end > start`, never down.
    async fn reserve_block(
        &self,
        name: &KeyName,
        id: Option<KeyId>,
        version: KeyVersion,
        count: u64,
    ) -> Result<(u64, u64)> {
        let path = usage_path(name, id, version);
        let limit = self.policy.limit;
        for _ in 0..MAX_CAS_ATTEMPTS {
            let current = self.store.get(&path).await?;
            let reserved = match &current {
                Some(rec) => self.open(&path, &rec.value)?.reserved,
                None if self.check_never_counted(name, id, version, &path).await? => 0,
                // Created by another replica between the two reads: read it.
                None => continue,
            };
            let Some(end) = next_reservation(reserved, count, self.policy.reservation_block, limit)
            else {
                return Err(Error::UsageExhausted(format!(
                    "key \"{name}\" version {version} reached its limit of {limit} encryptions; rotate the key"
                )));
            };
            let body = serde_json::to_vec(&UsageRecord { reserved: end })
                .map_err(|e| Error::Internal(e.to_string()))?;
            let sealed = self.barrier.seal(&path, &body)?;
            if write_over(&*self.store, &path, current.as_ref(), &sealed)
                .await?
                .is_some()
            {
                return Ok((reserved, end));
            }
        }
        Err(Error::Aborted(path))
    }

    fn open(&self, path: &str, sealed: &[u8]) -> Result<UsageRecord> {
        let plain = self.barrier.open(path, sealed)?;
        serde_json::from_slice(plain.expose_secret()).map_err(|_| Error::Corrupt(path.to_owned()))
    }
}

/// The stored count after reserving room for `count` more encryptions on top of
/// `reserved`: a block of `max(count, block)`, cut at `limit`. `None` when the
/// version cannot take `count` more, which includes `reserved >= limit` (a limit
/// lowered below the stored count). A returned count is always above `reserved`.
fn next_reservation(reserved: u64, count: u64, block: u64, limit: u64) -> Option<u64> {
    if count == 0 || reserved >= limit {
        return None;
    }
    let end = reserved.saturating_add(count.max(block)).min(limit);
    let room = end.checked_sub(reserved)?;
    (room >= count).then_some(end)
}

fn lock_block(reservation: &Reservation) -> std::sync::MutexGuard<'_, Block> {
    // Invariant: the critical sections are plain integer updates that cannot
    // panic, so the mutex is never poisoned; recover regardless.
    reservation.block.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Serialize, Deserialize)]
struct UsageRecord {
    reserved: u64,
}

/// Storage path of the backup wrapping key: 256 random bits, barrier-sealed
/// like every record, so it never leaves the barrier, survives root rotations
/// (which re-seal it with the rest) and travels inside full backups.
pub const KEY_BACKUP_PATH: &str = "sys/key-backup-key";

/// The first bytes of a key backup.
const KEY_BACKUP_MAGIC: &[u8; 8] = b"CIPHERDK";

/// The key backup format this build writes and reads.
const KEY_BACKUP_FORMAT: u8 = 1;

/// What a key backup seals: the key record and its versions' usage counts.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyBackupPayload {
    /// base64 of the key record (material included).
    key: String,
    /// `(version, encryptions reserved)` for each counted version.
    usage: Vec<(u32, u64)>,
}

impl Drop for KeyBackupPayload {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.key);
    }
}

/// The clear header of a key backup, also its associated data: magic, format,
/// the name's length (at most 128) and the name.
fn key_backup_header(name: &KeyName) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + name.as_str().len());
    out.extend_from_slice(KEY_BACKUP_MAGIC);
    out.push(KEY_BACKUP_FORMAT);
    // Key names are at most MAX_KEY_NAME_LEN (128) bytes.
    out.push(name.as_str().len() as u8);
    out.extend_from_slice(name.as_str().as_bytes());
    out
}

/// The key name in a key backup's header.
fn key_backup_name(backup: &[u8]) -> Result<KeyName> {
    let invalid = || Error::InvalidArgument("not a cipherd key backup".into());
    let rest = backup.strip_prefix(KEY_BACKUP_MAGIC).ok_or_else(invalid)?;
    let (&format, rest) = rest.split_first().ok_or_else(invalid)?;
    if format != KEY_BACKUP_FORMAT {
        return Err(Error::InvalidArgument(format!(
            "key backup format {format} is not supported (this build reads {KEY_BACKUP_FORMAT})"
        )));
    }
    let (&len, rest) = rest.split_first().ok_or_else(invalid)?;
    let name = rest.get(..usize::from(len)).ok_or_else(invalid)?;
    let name = std::str::from_utf8(name).map_err(|_| invalid())?;
    KeyName::new(name).map_err(|_| invalid())
}

const KEY_PREFIX: &str = "keys/";
const USAGE_PREFIX: &str = "usage/";
const STATS_PREFIX: &str = "stats/";

fn key_path(name: &KeyName) -> String {
    format!("{KEY_PREFIX}{name}")
}

/// `usage/<name>/<id>/<version>`, or `usage/<name>/<version>` for a key created
/// before ids existed.
fn usage_path(name: &KeyName, id: Option<KeyId>, version: KeyVersion) -> String {
    match id {
        Some(id) => format!("{USAGE_PREFIX}{name}/{id}/{version}"),
        None => format!("{USAGE_PREFIX}{name}/{version}"),
    }
}

fn stats_path(name: &KeyName) -> String {
    format!("{STATS_PREFIX}{name}")
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn invalidate_on_change(
    mut changes: tokio::sync::broadcast::Receiver<Change>,
    cache: Weak<DashMap<KeyName, Arc<LoadedKey>>>,
    seen: Arc<DashMap<KeyName, Seen>>,
) {
    loop {
        let change = changes.recv().await;
        let Some(cache) = cache.upgrade() else { return };
        match change {
            // The store may have lost changes (a replica's listener reconnected).
            Ok(change) if change.is_resync() => cache.clear(),
            Ok(Change { path, revision }) => {
                let Some(name) = path
                    .strip_prefix(KEY_PREFIX)
                    .and_then(|n| KeyName::new(n).ok())
                else {
                    continue;
                };
                // A deleted key's generation no longer binds: a key restored
                // from a key backup is an older copy put back on purpose.
                if revision.is_none() {
                    seen.remove(&name);
                }
                // Our own writes are installed already; drop only older copies.
                let stale = cache
                    .get(&name)
                    .is_some_and(|k| revision.is_none_or(|r| k.revision < r));
                if stale {
                    cache.remove(&name);
                }
            }
            Err(RecvError::Lagged(_)) => cache.clear(),
            Err(RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use cipherd_core::{barrier::RootKey, secret::Derivation};
    use cipherd_store::SqliteStore;

    use super::*;
    use crate::config::Params;

    impl KeyManager {
        async fn reserved_by_name(&self, name: &KeyName, version: KeyVersion) -> Result<u64> {
            let key = self.reload(name).await?;
            self.reserved_encryptions(key.key(), version).await
        }
    }

    async fn stored_id(store: &Arc<dyn Store>, barrier: &Barrier, name: &KeyName) -> Option<KeyId> {
        let path = key_path(name);
        let record = store.get(&path).await.unwrap().unwrap();
        open_key(barrier, &path, &record.value).unwrap().id()
    }

    async fn manager(store: Arc<dyn Store>, root: &RootKey) -> KeyManager {
        let barrier = Arc::new(Barrier::new(root, 1, Derivation::V2).unwrap());
        KeyManager::new(store, barrier, Params::for_data_dir("unused", false).usage)
    }

    #[tokio::test]
    async fn warm_loads_every_stored_key_and_stops_when_told() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().await.unwrap());
        let root = RootKey::generate().unwrap();
        let writer = manager(Arc::clone(&store), &root).await;
        for i in 0..(WARM_PAGE + 5) {
            let name = KeyName::new(&format!("k{i:05}")).unwrap();
            writer
                .create(&name, CreateOptions::default())
                .await
                .unwrap();
        }

        let fresh = manager(Arc::clone(&store), &root).await;
        assert_eq!(fresh.cache.len(), 0);
        assert_eq!(fresh.warm(|| true).await.unwrap(), WARM_PAGE + 5);
        assert_eq!(fresh.cache.len(), WARM_PAGE + 5);

        let stopped = manager(store, &root).await;
        assert_eq!(stopped.warm(|| false).await.unwrap(), 0);
        assert_eq!(stopped.cache.len(), 0);
    }

    fn policy(limit: u64, on_limit: LimitAction) -> UsagePolicy {
        UsagePolicy {
            limit,
            reservation_block: 350,
            on_limit,
        }
    }

    /// An operator lowers `keys.usage_limit` below a version's stored count: the
    /// version is exhausted (refused, or rotated away from), and the stored count
    /// never goes down. Before the fix, `end - reserved` underflowed (a panic in
    /// debug builds, a wrap in release that wrote back a smaller count).
    #[tokio::test]
    async fn a_lowered_limit_exhausts_the_version_and_never_lowers_its_count() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().await.unwrap());
        let root = RootKey::generate().unwrap();
        let barrier = || Arc::new(Barrier::new(&root, 1, Derivation::V2).unwrap());
        let name = KeyName::new("capped").unwrap();
        let v1 = KeyVersion::FIRST;

        let before = KeyManager::new(
            Arc::clone(&store),
            barrier(),
            policy(1000, LimitAction::Refuse),
        );
        let opts = CreateOptions {
            key_type: KeyType::Aes256Gcm96,
            ..Default::default()
        };
        before.create(&name, opts).await.unwrap();
        before.reserve_encryptions(&name, None, 1).await.unwrap();
        assert_eq!(before.reserved_by_name(&name, v1).await.unwrap(), 350);
        drop(before);

        // "Restart" with the limit lowered below the stored count.
        let refusing = KeyManager::new(
            Arc::clone(&store),
            barrier(),
            policy(100, LimitAction::Refuse),
        );
        for count in [1, 50, 100] {
            let r = refusing.reserve_encryptions(&name, None, count).await;
            assert!(matches!(r, Err(Error::UsageExhausted(_))), "{count}");
            let pinned = refusing.reserve_encryptions(&name, Some(v1), count).await;
            assert!(matches!(pinned, Err(Error::UsageExhausted(_))), "{count}");
            assert_eq!(refusing.reserved_by_name(&name, v1).await.unwrap(), 350);
        }
        drop(refusing);

        // Exactly at the limit is exhausted too.
        let at_limit = KeyManager::new(
            Arc::clone(&store),
            barrier(),
            policy(350, LimitAction::Refuse),
        );
        let r = at_limit.reserve_encryptions(&name, None, 1).await;
        assert!(matches!(r, Err(Error::UsageExhausted(_))));
        drop(at_limit);

        // With `rotate`, a new version takes over and v1 keeps its count.
        let rotating = KeyManager::new(store, barrier(), policy(100, LimitAction::Rotate));
        let (_, version) = rotating.reserve_encryptions(&name, None, 1).await.unwrap();
        assert_eq!(version.get(), 2);
        assert_eq!(rotating.reserved_by_name(&name, v1).await.unwrap(), 350);
        assert_eq!(
            rotating.reserved_by_name(&name, version).await.unwrap(),
            100
        );
    }

    #[test]
    fn next_reservation_is_checked_and_only_grows() {
        // Ordinary blocks, cut at the limit.
        assert_eq!(next_reservation(0, 1, 350, 1000), Some(350));
        assert_eq!(next_reservation(700, 1, 350, 1000), Some(1000));
        assert_eq!(next_reservation(999, 1, 350, 1000), Some(1000));
        assert_eq!(next_reservation(0, 500, 350, 1000), Some(500));
        // Not enough room, at the limit, above it (a lowered limit).
        assert_eq!(next_reservation(999, 2, 350, 1000), None);
        assert_eq!(next_reservation(1000, 1, 350, 1000), None);
        assert_eq!(next_reservation(350, 1, 350, 100), None);
        assert_eq!(next_reservation(u64::MAX, 1, 350, 100), None);
        // Near u64::MAX nothing wraps.
        assert_eq!(
            next_reservation(u64::MAX - 1, 1, 350, u64::MAX),
            Some(u64::MAX)
        );
        assert_eq!(next_reservation(u64::MAX - 1, 2, 350, u64::MAX), None);
        assert_eq!(next_reservation(5, 0, 350, 1000), None);
        for reserved in [0, 1, 99, 100, 101, 349, 350, 351, u64::MAX] {
            for count in [1, 2, 100, 350, u64::MAX] {
                if let Some(end) = next_reservation(reserved, count, 350, 350) {
                    assert!(end > reserved && end - reserved >= count && end <= 350);
                }
            }
        }
    }

    #[test]
    fn blocks_hand_out_exactly_their_range() {
        let mut block = Block { next: 10, end: 13 };
        assert!(block.take(2));
        assert!(!block.take(2));
        assert!(block.take(1));
        assert!(!block.take(1));
        let mut high = Block {
            next: u64::MAX - 1,
            end: u64::MAX,
        };
        assert!(!high.take(u64::MAX));
        assert!(high.take(1));
    }

    /// Deleting the usage record of a used 96-bit-nonce version must not restart
    /// its count: the next reservation (here by a restarted manager, which has no
    /// block in memory) fails closed, and nothing is re-created in its place. A
    /// version never used still starts from zero.
    #[tokio::test]
    async fn a_deleted_usage_record_of_a_used_version_fails_closed() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().await.unwrap());
        let root = RootKey::generate().unwrap();
        let barrier = || Arc::new(Barrier::new(&root, 1, Derivation::V2).unwrap());
        let name = KeyName::new("gcm").unwrap();
        let v1 = KeyVersion::FIRST;
        let opts = CreateOptions {
            key_type: KeyType::Aes256Gcm96,
            ..Default::default()
        };
        let first = KeyManager::new(
            Arc::clone(&store),
            barrier(),
            policy(1000, LimitAction::Refuse),
        );
        first.create(&name, opts).await.unwrap();
        first.reserve_encryptions(&name, None, 1).await.unwrap();
        assert_eq!(first.reserved_by_name(&name, v1).await.unwrap(), 350);
        // The key record now says v1 is counted, in storage and in the cache.
        let stored = store.get(&key_path(&name)).await.unwrap().unwrap();
        let key = open_key(&barrier(), &key_path(&name), &stored.value).unwrap();
        assert!(key.usage_reserved(v1).unwrap());
        assert!(
            first
                .get(&name)
                .await
                .unwrap()
                .key()
                .usage_reserved(v1)
                .unwrap()
        );
        // Rotate: v2 is not used yet.
        let v2 = first
            .update(&name, |k| {
                k.rotate(now_ms()).map(|_| true).map_err(Into::into)
            })
            .await
            .unwrap()
            .key()
            .latest_version();
        drop(first);

        let usage = usage_path(&name, stored_id(&store, &barrier(), &name).await, v1);
        let rec = store.get(&usage).await.unwrap().unwrap();
        store.delete(&usage, rec.revision).await.unwrap();

        let restarted = KeyManager::new(
            Arc::clone(&store),
            barrier(),
            policy(1000, LimitAction::Refuse),
        );
        let pinned = restarted.reserve_encryptions(&name, Some(v1), 1).await;
        match pinned {
            Err(Error::Corrupt(p)) => assert_eq!(p, usage),
            Err(e) => panic!("expected Corrupt, got {e:?}"),
            Ok(_) => panic!("a used version without its usage record encrypted"),
        }
        let shown = restarted.reserved_by_name(&name, v1).await;
        assert!(matches!(shown, Err(Error::Corrupt(_))), "{shown:?}");
        assert_eq!(store.get(&usage).await.unwrap(), None, "nothing re-created");
        // The never-used latest version is unaffected.
        let (_, version) = restarted.reserve_encryptions(&name, None, 1).await.unwrap();
        assert_eq!(version, v2);
        assert_eq!(restarted.reserved_by_name(&name, v2).await.unwrap(), 350);
    }

    /// A version counted before the flag existed (a usage record, no flag) gets
    /// the flag at its next block, and from then on is protected as well.
    #[tokio::test]
    async fn a_version_counted_before_the_flag_gets_it_at_its_next_block() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().await.unwrap());
        let root = RootKey::generate().unwrap();
        let barrier = || Arc::new(Barrier::new(&root, 1, Derivation::V2).unwrap());
        let name = KeyName::new("legacy").unwrap();
        let v1 = KeyVersion::FIRST;
        let opts = CreateOptions {
            key_type: KeyType::Aes256Gcm96,
            ..Default::default()
        };
        let manager = || {
            KeyManager::new(
                Arc::clone(&store),
                barrier(),
                policy(1000, LimitAction::Refuse),
            )
        };
        manager().create(&name, opts).await.unwrap();
        // What an older server left: a count of 350, no flag in the key record.
        let usage = usage_path(&name, stored_id(&store, &barrier(), &name).await, v1);
        let body = serde_json::to_vec(&UsageRecord { reserved: 350 }).unwrap();
        store
            .create(&usage, &barrier().seal(&usage, &body).unwrap())
            .await
            .unwrap();
        let flagged = |store: Arc<dyn Store>| async move {
            let path = key_path(&KeyName::new("legacy").unwrap());
            let stored = store.get(&path).await.unwrap().unwrap();
            let key = open_key(&barrier(), &path, &stored.value).unwrap();
            key.usage_reserved(KeyVersion::FIRST).unwrap()
        };
        assert!(!flagged(Arc::clone(&store)).await);

        let upgraded = manager();
        upgraded.reserve_encryptions(&name, None, 1).await.unwrap();
        assert_eq!(upgraded.reserved_by_name(&name, v1).await.unwrap(), 700);
        assert!(
            flagged(Arc::clone(&store)).await,
            "flagged at the next block"
        );
        drop(upgraded);

        let rec = store.get(&usage).await.unwrap().unwrap();
        store.delete(&usage, rec.revision).await.unwrap();
        let refused = manager().reserve_encryptions(&name, None, 1).await;
        assert!(
            matches!(refused, Err(Error::Corrupt(_))),
            "counted from zero"
        );
    }

    fn gcm96() -> CreateOptions {
        CreateOptions {
            key_type: KeyType::Aes256Gcm96,
            deletion_allowed: true,
            ..Default::default()
        }
    }

    /// An older sealed copy of a key record put back in storage (it opens: same
    /// root, same path) is refused by a manager that has seen a newer one; a
    /// stale read racing a write (an older revision) is not mistaken for one.
    #[tokio::test]
    async fn a_rolled_back_key_record_is_refused() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().await.unwrap());
        let root = RootKey::generate().unwrap();
        let keys = manager(Arc::clone(&store), &root).await;
        let name = KeyName::new("patients").unwrap();
        let path = key_path(&name);
        keys.create(&name, CreateOptions::default()).await.unwrap();
        let old = store.get(&path).await.unwrap().unwrap();
        let rotated = keys
            .update(&name, |k| {
                k.rotate(now_ms()).map(|_| true).map_err(Into::into)
            })
            .await
            .unwrap();
        assert_eq!(rotated.key().generation(), 2);

        // A stale read: the generation-1 copy at its own, older revision.
        keys.open_record(&path, &old.value, old.revision).unwrap();

        // The rollback: the generation-1 copy written back (a new revision).
        let now = store.get(&path).await.unwrap().unwrap();
        store
            .compare_and_set(&path, now.revision, &old.value)
            .await
            .unwrap();
        match keys.reload(&name).await {
            Err(Error::Corrupt(p)) => assert_eq!(p, path),
            other => panic!(
                "expected Corrupt, got {:?}",
                other.map(|k| k.key().generation())
            ),
        }
        assert!(matches!(
            keys.update(&name, |_| Ok(true)).await,
            Err(Error::Corrupt(_))
        ));
        // A process that never saw the newer copy cannot tell (documented).
        let fresh = manager(store, &root).await;
        assert_eq!(fresh.reload(&name).await.unwrap().key().generation(), 1);
    }

    /// Two replicas sweeping at the same moment rotate a key once per period.
    #[tokio::test]
    async fn scheduled_rotation_happens_once_per_period_across_replicas() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().await.unwrap());
        let root = RootKey::generate().unwrap();
        let a = manager(Arc::clone(&store), &root).await;
        let b = manager(Arc::clone(&store), &root).await;
        let name = KeyName::new("rotating").unwrap();
        let created = a.create(&name, CreateOptions::default()).await.unwrap();
        let t0 = created.key().versions().next().unwrap().1;
        a.update(&name, |k| {
            k.set_auto_rotate_period_s(3600);
            Ok(true)
        })
        .await
        .unwrap();
        let latest = || async { a.reload(&name).await.unwrap().key().latest_version().get() };

        let early = a.sweep(t0 + 3_599_000, || true).await.unwrap();
        assert_eq!((early.keys, early.rotated), (1, 0));
        assert_eq!(latest().await, 1);

        for round in 1..=3u64 {
            let now = t0 + round * 3_600_000;
            let (ra, rb) = tokio::join!(a.sweep(now, || true), b.sweep(now, || true));
            assert_eq!(
                ra.unwrap().rotated + rb.unwrap().rotated,
                1,
                "round {round}"
            );
            assert_eq!(latest().await, 1 + round as u32);
            // The same moment again: the new version is fresh.
            assert_eq!(b.sweep(now, || true).await.unwrap().rotated, 0);
        }
        // Turned off: never again.
        a.update(&name, |k| {
            k.set_auto_rotate_period_s(0);
            Ok(true)
        })
        .await
        .unwrap();
        assert_eq!(a.sweep(u64::MAX, || true).await.unwrap().rotated, 0);
    }

    /// A scheduled deletion refuses use until it is cancelled or destroys the key
    /// at its time; the re-created key of the same name is another key, and a
    /// replica's reservation block of the deleted key is never used for it.
    #[tokio::test]
    async fn scheduled_deletion_refuses_use_and_destroys_at_its_time() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().await.unwrap());
        let root = RootKey::generate().unwrap();
        let barrier = Arc::new(Barrier::new(&root, 1, Derivation::V2).unwrap());
        let a = KeyManager::new(
            Arc::clone(&store),
            Arc::clone(&barrier),
            policy(1000, LimitAction::Refuse),
        );
        let b = KeyManager::new(
            Arc::clone(&store),
            Arc::clone(&barrier),
            policy(1000, LimitAction::Refuse),
        );
        let name = KeyName::new("erasable").unwrap();
        let v1 = KeyVersion::FIRST;
        let old = a.create(&name, gcm96()).await.unwrap();
        let old_id = old.key().id().unwrap();
        // Replica A holds a block of 350 for v1 of the old key.
        a.reserve_encryptions(&name, None, 1).await.unwrap();
        let old_usage = usage_path(&name, Some(old_id), v1);
        assert!(store.get(&old_usage).await.unwrap().is_some());

        let t = now_ms() + 60_000;
        b.schedule_deletion(&name, t).await.unwrap();
        for m in [&a, &b] {
            let refused = m.reserve_encryptions(&name, None, 1).await;
            assert!(
                matches!(refused, Err(Error::KeyPendingDeletion(_))),
                "{:?}",
                refused.err()
            );
        }
        assert!(
            b.schedule_deletion(&name, t).await.is_err(),
            "already scheduled"
        );
        assert_eq!(b.sweep(t - 1, || true).await.unwrap().destroyed, 0);
        b.cancel_deletion(&name).await.unwrap();
        a.reserve_encryptions(&name, None, 1).await.unwrap();
        assert!(matches!(
            b.cancel_deletion(&name).await,
            Err(Error::FailedPrecondition(_))
        ));

        b.schedule_deletion(&name, t).await.unwrap();
        assert_eq!(b.sweep(t, || true).await.unwrap().destroyed, 1);
        assert!(matches!(b.get(&name).await, Err(Error::KeyNotFound(_))));
        assert_eq!(
            store.get(&old_usage).await.unwrap(),
            None,
            "usage records go too"
        );
        assert_eq!(a.sweep(t, || true).await.unwrap().destroyed, 0, "once");

        // Created again through B; A's cache learns of it by the change feed, or
        // here by a reload. A's old block must not count encryptions of the new key.
        let new = b.create(&name, gcm96()).await.unwrap();
        assert_ne!(new.key().id(), Some(old_id));
        a.reload(&name).await.unwrap();
        a.reserve_encryptions(&name, None, 1).await.unwrap();
        assert_eq!(
            a.reserved_by_name(&name, v1).await.unwrap(),
            350,
            "the encryption was reserved in the new key's own record"
        );
    }

    /// Use counts from two replicas add up in storage, with the last use.
    #[tokio::test]
    async fn use_statistics_from_replicas_add_up() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().await.unwrap());
        let root = RootKey::generate().unwrap();
        let a = manager(Arc::clone(&store), &root).await;
        let b = manager(Arc::clone(&store), &root).await;
        let name = KeyName::new("counted").unwrap();
        let v1 = KeyVersion::FIRST;
        a.create(&name, CreateOptions::default()).await.unwrap();
        let before = now_ms();
        a.reserve_encryptions(&name, None, 5).await.unwrap();
        let (kb, _) = b.reserve_encryptions(&name, None, 2).await.unwrap();
        kb.uses().note(v1, 0, 7);
        // Unflushed counts show in the process that made them.
        let shown = a.version_uses(&a.get(&name).await.unwrap()).await.unwrap();
        assert_eq!(shown[0].encryptions, 5);
        assert_eq!(a.flush_stats().await.unwrap(), 1);
        assert_eq!(b.flush_stats().await.unwrap(), 1);
        assert_eq!(b.flush_stats().await.unwrap(), 0, "nothing new");
        let fresh = manager(store, &root).await;
        let uses = fresh
            .version_uses(&fresh.get(&name).await.unwrap())
            .await
            .unwrap();
        assert_eq!(uses.len(), 1);
        assert_eq!(
            (uses[0].version, uses[0].encryptions, uses[0].decryptions),
            (1, 7, 7)
        );
        assert!(uses[0].last_used_ms >= before);
    }

    #[tokio::test]
    async fn a_key_under_another_root_fails_closed() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().await.unwrap());
        let writer = manager(Arc::clone(&store), &RootKey::generate().unwrap()).await;
        let name = KeyName::new("patients").unwrap();
        writer
            .create(&name, CreateOptions::default())
            .await
            .unwrap();
        let other = manager(store, &RootKey::generate().unwrap()).await;
        assert!(matches!(other.get(&name).await, Err(Error::Corrupt(_))));
    }
}
