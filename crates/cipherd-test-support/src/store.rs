//! [`FaultyStore`]: a [`Store`] wrapper for tests that makes the backend
//! unreachable on demand and counts reads, so that tests can show what the server
//! does when storage fails (and how often it asks).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use cipherd_store::{Change, Error, Record, Result, Store};

/// Passes every call to the wrapped store, except while [`set_unavailable`]
/// is on: then every call (ping included) fails with
/// [`Error::Unavailable`], as a lost connection would. Writes made through it
/// reach the wrapped store's change feed as usual.
///
/// [`set_unavailable`]: FaultyStore::set_unavailable
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    unavailable: AtomicBool,
    reads: Mutex<HashMap<String, usize>>,
}

impl FaultyStore {
    /// Wraps `inner`, reachable.
    pub fn new(inner: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            unavailable: AtomicBool::new(false),
            reads: Mutex::new(HashMap::new()),
        })
    }

    /// Makes the store unreachable (`true`) or reachable again (`false`).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// How many times `get` was called for `path` (successful or not).
    pub fn reads_of(&self, path: &str) -> usize {
        self.reads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    fn check(&self) -> Result<()> {
        if self.unavailable.load(Ordering::SeqCst) {
            Err(Error::Unavailable("test: the store is unplugged".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait::async_trait]
impl Store for FaultyStore {
    async fn get(&self, path: &str) -> Result<Option<Record>> {
        *self
            .reads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(path.to_owned())
            .or_default() += 1;
        self.check()?;
        self.inner.get(path).await
    }

    async fn create(&self, path: &str, value: &[u8]) -> Result<u64> {
        self.check()?;
        self.inner.create(path, value).await
    }

    async fn compare_and_set(
        &self,
        path: &str,
        expected_revision: u64,
        value: &[u8],
    ) -> Result<u64> {
        self.check()?;
        self.inner
            .compare_and_set(path, expected_revision, value)
            .await
    }

    async fn delete(&self, path: &str, expected_revision: u64) -> Result<()> {
        self.check()?;
        self.inner.delete(path, expected_revision).await
    }

    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>> {
        self.check()?;
        self.inner.list(prefix, start_after, limit).await
    }

    async fn scan(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Record)>> {
        self.check()?;
        self.inner.scan(prefix, start_after, limit).await
    }

    async fn snapshot(&self) -> Result<Box<dyn cipherd_store::Snapshot>> {
        self.check()?;
        self.inner.snapshot().await
    }

    async fn import(&self) -> Result<Box<dyn cipherd_store::Import>> {
        self.check()?;
        self.inner.import().await
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.inner.subscribe()
    }

    async fn ping(&self) -> Result<()> {
        self.check()?;
        self.inner.ping().await
    }
}
