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

use std::{
    ops::Deref,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use cipherd_core::{
    aead::AeadKey,
    barrier::Barrier,
    keyring::{CreateOptions, KeyName, KeyVersion, NamedKey},
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
    counters: DashMap<(KeyName, KeyVersion), Arc<UsageCounter>>,
    usage: UsagePolicy,
    invalidator: tokio::task::JoinHandle<()>,
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

    fn prepare(key: NamedKey, revision: u64) -> Result<Self> {
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
        })
    }
}

impl KeyManager {
    /// A manager with an empty cache; starts a task that drops cache entries when
    /// the store's change feed reports another writer's change.
    pub fn new(store: Arc<dyn Store>, barrier: Arc<Barrier>, usage: UsagePolicy) -> Self {
        let cache: Arc<DashMap<KeyName, Arc<LoadedKey>>> = Arc::new(DashMap::new());
        let invalidator = tokio::spawn(invalidate_on_change(
            store.subscribe(),
            Arc::downgrade(&cache),
        ));
        Self {
            store,
            barrier,
            cache,
            counters: DashMap::new(),
            usage,
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
        let key = NamedKey::create(name.clone(), opts, now_ms())?;
        let path = key_path(name);
        let sealed = self.barrier.seal(&path, key.to_record().expose_secret())?;
        let revision = match self.store.create(&path, &sealed).await {
            Ok(rev) => rev,
            Err(cipherd_store::Error::AlreadyExists { .. }) => {
                return Err(Error::KeyExists(name.to_string()));
            }
            Err(e) => return Err(e.into()),
        };
        let loaded = Arc::new(LoadedKey::prepare(key, revision)?);
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
            let mut key = current.key;
            if !change(&mut key)? {
                let unchanged = Arc::new(LoadedKey::prepare(key, record.revision)?);
                self.install(name, &unchanged);
                return Ok(unchanged);
            }
            let sealed = self.barrier.seal(&path, key.to_record().expose_secret())?;
            match self
                .store
                .compare_and_set(&path, record.revision, &sealed)
                .await
            {
                Ok(revision) => {
                    let loaded = Arc::new(LoadedKey::prepare(key, revision)?);
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

    /// Deletes the key (only when its config allows) and its usage records.
    pub async fn delete(&self, name: &KeyName) -> Result<()> {
        let path = key_path(name);
        let record = self
            .store
            .get(&path)
            .await?
            .ok_or_else(|| Error::KeyNotFound(name.to_string()))?;
        let key = self.open_record(&path, &record.value, record.revision)?;
        if !key.key.deletion_allowed() {
            return Err(Error::FailedPrecondition(format!(
                "key \"{name}\" does not allow deletion; set deletion_allowed first"
            )));
        }
        match self.store.delete(&path, record.revision).await {
            Ok(()) => {}
            Err(cipherd_store::Error::Conflict { .. }) => {
                return Err(Error::Aborted(name.to_string()));
            }
            Err(cipherd_store::Error::NotFound { .. }) => {
                return Err(Error::KeyNotFound(name.to_string()));
            }
            Err(e) => return Err(e.into()),
        }
        self.cache.remove(name);
        self.counters.retain(|(n, _), _| n != name);
        let prefix = format!("{USAGE_PREFIX}{name}/");
        for usage_path in self.store.list(&prefix, None, usize::MAX).await? {
            if let Some(rec) = self.store.get(&usage_path).await? {
                // Best effort: a leftover counter only over-counts a future key of
                // the same name... which has fresh material, so nothing is unsafe.
                let _ = self.store.delete(&usage_path, rec.revision).await;
            }
        }
        tracing::info!(key = %name, "key deleted");
        Ok(())
    }

    /// Loads every key into the cache, page by page, so that the first request for
    /// each key does not pay a storage read. Returns how many keys were loaded.
    /// Runs in the background after unseal; stops early if `keep_going` says so
    /// (the service was sealed). Keys that fail to load are logged and skipped:
    /// requests for them fail closed on their own.
    pub async fn warm(&self, keep_going: impl Fn() -> bool) -> Result<usize> {
        let mut after: Option<String> = None;
        let mut loaded = 0;
        loop {
            let page = self
                .store
                .scan(KEY_PREFIX, after.as_deref(), WARM_PAGE)
                .await?;
            let Some((last, _)) = page.last() else {
                return Ok(loaded);
            };
            after = Some(last.clone());
            for (path, record) in &page {
                if !keep_going() {
                    return Ok(loaded);
                }
                let Some(name) = path
                    .strip_prefix(KEY_PREFIX)
                    .and_then(|n| KeyName::new(n).ok())
                else {
                    continue;
                };
                match self.open_record(path, &record.value, record.revision) {
                    Ok(key) => {
                        self.install(&name, &Arc::new(key));
                        loaded += 1;
                    }
                    Err(e) => tracing::error!(key = %name, error = %e, "key failed to load"),
                }
            }
        }
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
        let counted = loaded.key.key_type().usage_limit().is_some();
        if counted && count > self.usage.limit {
            // No version could ever take this request; rotating would only burn
            // versions. The client must split it.
            return Err(Error::TooLarge {
                what: "request",
                actual: usize::try_from(count).unwrap_or(usize::MAX),
                limit: usize::try_from(self.usage.limit).unwrap_or(usize::MAX),
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
                return Ok((loaded, version));
            }
            match self
                .counter(name, version)
                .take(self, name, version, count)
                .await
            {
                Ok(()) => return Ok((loaded, version)),
                Err(Error::UsageExhausted(_))
                    if requested.is_none() && self.usage.on_limit == LimitAction::Rotate =>
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

    /// Encryptions reserved so far for `version` (an upper bound on those made).
    pub async fn reserved_encryptions(&self, name: &KeyName, version: KeyVersion) -> Result<u64> {
        let path = usage_path(name, version);
        match self.store.get(&path).await? {
            Some(rec) => Ok(self.open_usage(&path, &rec.value)?.reserved),
            None => Ok(0),
        }
    }

    /// The configured usage policy.
    pub fn usage_policy(&self) -> UsagePolicy {
        self.usage
    }

    fn counter(&self, name: &KeyName, version: KeyVersion) -> Arc<UsageCounter> {
        Arc::clone(
            self.counters
                .entry((name.clone(), version))
                .or_insert_with(|| Arc::new(UsageCounter::default()))
                .value(),
        )
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
        let plain = self.barrier.open(path, sealed)?;
        let key = NamedKey::from_record(plain.expose_secret()).map_err(|e| {
            tracing::error!(path, error = %e, "key record does not decode");
            Error::Corrupt(path.to_owned())
        })?;
        let expected = path.strip_prefix(KEY_PREFIX).unwrap_or_default();
        if key.name().as_str() != expected {
            return Err(Error::Corrupt(path.to_owned()));
        }
        LoadedKey::prepare(key, revision)
    }

    fn open_usage(&self, path: &str, sealed: &[u8]) -> Result<UsageRecord> {
        let plain = self.barrier.open(path, sealed)?;
        serde_json::from_slice(plain.expose_secret()).map_err(|_| Error::Corrupt(path.to_owned()))
    }

    /// Reserves a block of at least `count` encryptions for `version` in storage.
    /// Returns the reserved range `[start, end)`.
    async fn reserve_block(
        &self,
        name: &KeyName,
        version: KeyVersion,
        count: u64,
    ) -> Result<(u64, u64)> {
        let path = usage_path(name, version);
        let limit = self.usage.limit;
        for _ in 0..MAX_CAS_ATTEMPTS {
            let current = self.store.get(&path).await?;
            let reserved = match &current {
                Some(rec) => self.open_usage(&path, &rec.value)?.reserved,
                None => 0,
            };
            let want = count.max(self.usage.reservation_block);
            let end = reserved.saturating_add(want).min(limit);
            if end - reserved < count {
                return Err(Error::UsageExhausted(format!(
                    "key \"{name}\" version {version} reached its limit of {limit} encryptions; rotate the key"
                )));
            }
            let body = serde_json::to_vec(&UsageRecord { reserved: end })
                .map_err(|e| Error::Internal(e.to_string()))?;
            let sealed = self.barrier.seal(&path, &body)?;
            let written = match &current {
                Some(rec) => {
                    self.store
                        .compare_and_set(&path, rec.revision, &sealed)
                        .await
                }
                None => self.store.create(&path, &sealed).await,
            };
            match written {
                Ok(_) => return Ok((reserved, end)),
                Err(
                    cipherd_store::Error::Conflict { .. }
                    | cipherd_store::Error::AlreadyExists { .. }
                    | cipherd_store::Error::NotFound { .. },
                ) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Aborted(path))
    }
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

/// This process's current block of reserved encryptions for one key version.
#[derive(Default)]
struct UsageCounter {
    block: Mutex<Block>,
    /// Serializes storage reservations for this version within the process.
    reserving: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Block {
    next: u64,
    end: u64,
}

impl UsageCounter {
    async fn take(
        &self,
        manager: &KeyManager,
        name: &KeyName,
        version: KeyVersion,
        count: u64,
    ) -> Result<()> {
        if self.take_local(count) {
            return Ok(());
        }
        let _reserving = self.reserving.lock().await;
        if self.take_local(count) {
            return Ok(());
        }
        let (start, end) = manager.reserve_block(name, version, count).await?;
        // The unused rest of the previous block is abandoned: counting it as used
        // is the safe direction.
        let mut block = self.lock_block();
        *block = Block {
            next: start + count,
            end,
        };
        Ok(())
    }

    fn take_local(&self, count: u64) -> bool {
        let mut block = self.lock_block();
        if block.end - block.next >= count {
            block.next += count;
            true
        } else {
            false
        }
    }

    fn lock_block(&self) -> std::sync::MutexGuard<'_, Block> {
        // Invariant: the critical sections above are plain integer updates that
        // cannot panic, so the mutex is never poisoned; recover regardless.
        self.block.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Serialize, Deserialize)]
struct UsageRecord {
    reserved: u64,
}

const KEY_PREFIX: &str = "keys/";
const USAGE_PREFIX: &str = "usage/";

fn key_path(name: &KeyName) -> String {
    format!("{KEY_PREFIX}{name}")
}

fn usage_path(name: &KeyName, version: KeyVersion) -> String {
    format!("{USAGE_PREFIX}{name}/{version}")
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
) {
    loop {
        let change = changes.recv().await;
        let Some(cache) = cache.upgrade() else { return };
        match change {
            Ok(Change { path, revision }) => {
                let Some(name) = path
                    .strip_prefix(KEY_PREFIX)
                    .and_then(|n| KeyName::new(n).ok())
                else {
                    continue;
                };
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
    use cipherd_core::barrier::RootKey;
    use cipherd_store::SqliteStore;

    use super::*;
    use crate::config::Params;

    async fn manager(store: Arc<dyn Store>, root: &RootKey) -> KeyManager {
        let barrier = Arc::new(Barrier::new(root, 1).unwrap());
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
