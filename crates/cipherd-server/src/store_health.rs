//! Readiness follows the store: a [`Store`] wrapper that notices when the backend
//! cannot be reached, and the probe that notices when it can again.
//!
//! [`WatchedStore`] passes every call through unchanged. When one fails with
//! [`cipherd_store::Error::Unavailable`] (a lost or refused connection, a lock held
//! past the busy timeout, a closed store) it marks the store unreachable at once
//! and wakes the probe. The probe ([`probe`]) calls [`Store::ping`], a trivial
//! read, every [`PROBE_INTERVAL`] and after every such failure, and publishes the
//! answer on a `watch` channel, which `server::run` combines with the seal state
//! into gRPC health: NOT_SERVING while the store is unreachable, SERVING again
//! once a ping succeeds.
//!
//! It does not retry anything, change any error, or make corruption a readiness
//! matter: a corrupt record is one key's problem (`DATA_LOSS`/`STORAGE_INTEGRITY`
//! for the calls that need it), while an unreachable store is everyone's.

use std::{sync::Arc, time::Duration};

use cipherd_store::{Change, Record, Result, Store};
use tokio::sync::{Notify, watch};

/// How often the probe pings the store when nothing fails in between.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// How long a ping may take before the store counts as unreachable (a lock held
/// by another process makes SQLite wait up to its busy timeout).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The store's reachability as last seen: by the probe, or by a failed call.
#[derive(Debug)]
pub struct StoreHealth {
    reachable: watch::Sender<bool>,
    /// Wakes the probe early after a failed call.
    failed: Notify,
}

impl StoreHealth {
    /// Reachable until shown otherwise (the store was just opened).
    fn new() -> Self {
        Self {
            reachable: watch::Sender::new(true),
            failed: Notify::new(),
        }
    }

    /// Follows reachability: `true` while the store answers.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.reachable.subscribe()
    }

    fn set(&self, reachable: bool) {
        self.reachable.send_if_modified(|current| {
            let changed = *current != reachable;
            *current = reachable;
            changed
        });
    }

    fn report<T>(&self, result: &Result<T>) {
        if let Err(e) = result
            && e.is_transient()
        {
            if *self.reachable.borrow() {
                tracing::warn!(error = %e, "storage unreachable; health is NOT_SERVING until it answers");
            }
            self.set(false);
            self.failed.notify_one();
        }
    }
}

/// A [`Store`] that reports unavailability to its [`StoreHealth`].
#[derive(Debug)]
pub struct WatchedStore {
    inner: Arc<dyn Store>,
    health: Arc<StoreHealth>,
}

impl WatchedStore {
    /// Wraps `inner`; the returned health starts reachable.
    pub fn new(inner: Arc<dyn Store>) -> (Arc<Self>, Arc<StoreHealth>) {
        let health = Arc::new(StoreHealth::new());
        let store = Arc::new(Self {
            inner,
            health: Arc::clone(&health),
        });
        (store, health)
    }
}

#[async_trait::async_trait]
impl Store for WatchedStore {
    async fn get(&self, path: &str) -> Result<Option<Record>> {
        let r = self.inner.get(path).await;
        self.health.report(&r);
        r
    }

    async fn create(&self, path: &str, value: &[u8]) -> Result<u64> {
        let r = self.inner.create(path, value).await;
        self.health.report(&r);
        r
    }

    async fn compare_and_set(
        &self,
        path: &str,
        expected_revision: u64,
        value: &[u8],
    ) -> Result<u64> {
        let r = self
            .inner
            .compare_and_set(path, expected_revision, value)
            .await;
        self.health.report(&r);
        r
    }

    async fn delete(&self, path: &str, expected_revision: u64) -> Result<()> {
        let r = self.inner.delete(path, expected_revision).await;
        self.health.report(&r);
        r
    }

    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>> {
        let r = self.inner.list(prefix, start_after, limit).await;
        self.health.report(&r);
        r
    }

    async fn scan(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Record)>> {
        let r = self.inner.scan(prefix, start_after, limit).await;
        self.health.report(&r);
        r
    }

    async fn snapshot(&self) -> Result<Box<dyn cipherd_store::Snapshot>> {
        let r = self.inner.snapshot().await;
        self.health.report(&r);
        r
    }

    async fn import(&self) -> Result<Box<dyn cipherd_store::Import>> {
        let r = self.inner.import().await;
        self.health.report(&r);
        r
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.inner.subscribe()
    }

    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }
}

/// Pings `store` every `interval`, and at once after a failed call, publishing
/// the outcome on `health`. Runs until aborted.
pub async fn probe(store: Arc<dyn Store>, health: Arc<StoreHealth>, interval: Duration) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = health.failed.notified() => {}
        }
        let reachable = match tokio::time::timeout(PROBE_TIMEOUT, store.ping()).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "storage probe failed");
                false
            }
            Err(_) => {
                tracing::debug!("storage probe timed out");
                false
            }
        };
        if reachable && !*health.reachable.borrow() {
            tracing::info!("storage reachable again; health follows the seal state");
        }
        health.set(reachable);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use cipherd_store::{Error, SqliteStore};

    use super::*;

    /// A store that is unreachable while `down` is set.
    #[derive(Debug)]
    struct Switch {
        inner: SqliteStore,
        down: AtomicBool,
    }

    impl Switch {
        fn check(&self) -> Result<()> {
            if self.down.load(Ordering::SeqCst) {
                Err(Error::Unavailable("test: unplugged".into()))
            } else {
                Ok(())
            }
        }
    }

    #[async_trait::async_trait]
    impl Store for Switch {
        async fn get(&self, path: &str) -> Result<Option<Record>> {
            self.check()?;
            self.inner.get(path).await
        }
        async fn create(&self, path: &str, value: &[u8]) -> Result<u64> {
            self.check()?;
            self.inner.create(path, value).await
        }
        async fn compare_and_set(&self, path: &str, rev: u64, value: &[u8]) -> Result<u64> {
            self.check()?;
            self.inner.compare_and_set(path, rev, value).await
        }
        async fn delete(&self, path: &str, rev: u64) -> Result<()> {
            self.check()?;
            self.inner.delete(path, rev).await
        }
        async fn list(&self, p: &str, a: Option<&str>, l: usize) -> Result<Vec<String>> {
            self.check()?;
            self.inner.list(p, a, l).await
        }
        fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Change> {
            self.inner.subscribe()
        }
        async fn ping(&self) -> Result<()> {
            self.check()?;
            self.inner.ping().await
        }
        async fn snapshot(&self) -> Result<Box<dyn cipherd_store::Snapshot>> {
            self.check()?;
            self.inner.snapshot().await
        }
        async fn import(&self) -> Result<Box<dyn cipherd_store::Import>> {
            self.check()?;
            self.inner.import().await
        }
    }

    /// A failed call turns health off at once; the probe turns it back on once
    /// the store answers, and off again when only the probe sees the outage.
    /// The probe runs every 10 ms here; the test waits on the watch channel.
    #[tokio::test]
    async fn reachability_follows_failed_calls_and_the_probe() {
        let switch = Arc::new(Switch {
            inner: SqliteStore::in_memory().await.expect("open"),
            down: AtomicBool::new(false),
        });
        let (store, health) = WatchedStore::new(Arc::clone(&switch) as Arc<dyn Store>);
        let mut reachable = health.watch();
        let prober = tokio::spawn(probe(
            Arc::clone(&switch) as Arc<dyn Store>,
            Arc::clone(&health),
            Duration::from_millis(10),
        ));
        let next = |r: &mut watch::Receiver<bool>| {
            let mut r = r.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(10), r.changed())
                    .await
                    .expect("a change within 10 s")
                    .expect("health is kept");
                *r.borrow_and_update()
            }
        };
        store.create("a", b"x").await.expect("create");
        assert!(*reachable.borrow_and_update());

        switch.down.store(true, Ordering::SeqCst);
        assert!(store.get("a").await.is_err());
        assert!(
            !*reachable.borrow_and_update(),
            "a failed call is seen at once"
        );
        // A conflict is an answer, not an outage.
        switch.down.store(false, Ordering::SeqCst);
        assert!(store.compare_and_set("a", 99, b"y").await.is_err());
        assert!(next(&mut reachable).await, "the probe reports recovery");
        reachable.borrow_and_update();

        switch.down.store(true, Ordering::SeqCst);
        assert!(!next(&mut reachable).await, "the probe reports the outage");
        prober.abort();
    }
}
