//! Service lifecycle: initialize, unseal with Shamir shares, seal.
//!
//! The root key exists in storage only sealed under the unseal key, and the unseal
//! key exists nowhere: it is split into shares at `Init` and rebuilt in memory from
//! `threshold` of them at `Unseal`, used once to open the root key, and dropped
//! (zeroized). While sealed, no key material is in memory and every data-plane call
//! answers `UNAVAILABLE`/`SEALED` (invariant 4).
//!
//! The seal record (`sys/seal`) is the one record not under the barrier, since it is
//! needed to open it; it holds the share count, threshold and the AEAD-sealed root
//! key, so tampering with it can only make unsealing fail.

use std::sync::{
    Arc, RwLock,
    atomic::{AtomicBool, Ordering},
};

use base64::Engine as _;
use cipherd_core::{
    barrier::{self, Barrier, RootKey, UnsealKey},
    secret::KeyMaterial,
    shamir::{self, Share},
};
use cipherd_store::Store;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, watch};

use crate::{
    config::Params,
    error::{Error, Result},
    keys::KeyManager,
};

/// Storage path of the seal record.
pub const SEAL_PATH: &str = "sys/seal";

/// The state every request consults: sealed or unsealed, and the keys when unsealed.
#[derive(Debug)]
pub struct Core {
    store: Arc<dyn Store>,
    params: Params,
    state: RwLock<State>,
    /// Whether the seal record exists, as last seen by `status` or set by `init`:
    /// lets a data call on a fresh server say "not initialized" rather than
    /// "sealed" without a storage read. Never goes back to false.
    initialized: AtomicBool,
    /// Serializes `init`, `unseal` and `seal` so share collection is consistent.
    lifecycle: Mutex<()>,
    sealed_tx: watch::Sender<bool>,
}

/// What `Status` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealStatus {
    /// Whether `Init` has run on this storage.
    pub initialized: bool,
    /// Whether key material is unavailable.
    pub sealed: bool,
    /// Shares needed to unseal (0 before init).
    pub threshold: u8,
    /// Shares issued at init (0 before init).
    pub shares: u8,
    /// Distinct shares submitted towards the current unseal.
    pub progress: u8,
}

/// Everything that exists only while unsealed.
#[derive(Debug)]
pub struct Unsealed {
    /// Named keys and their cache.
    pub keys: KeyManager,
}

#[derive(Debug)]
enum State {
    Sealed { pending: Vec<Share> },
    Unsealed(Arc<Unsealed>),
}

#[derive(Serialize, Deserialize)]
struct SealRecord {
    format: u32,
    shares: u8,
    threshold: u8,
    root_generation: u32,
    /// base64 of `barrier::seal_root_key` output.
    sealed_root_key: String,
}

impl Core {
    /// A sealed core over `store`.
    pub fn new(store: Arc<dyn Store>, params: Params) -> Arc<Self> {
        let (sealed_tx, _) = watch::channel(true);
        Arc::new(Self {
            store,
            params,
            state: RwLock::new(State::Sealed {
                pending: Vec::new(),
            }),
            initialized: AtomicBool::new(false),
            lifecycle: Mutex::new(()),
            sealed_tx,
        })
    }

    /// The keys, or `Error::Sealed` (`Error::NotInitialized` before `Init`).
    pub fn unsealed(&self) -> Result<Arc<Unsealed>> {
        match &*self.read_state() {
            State::Unsealed(u) => Ok(Arc::clone(u)),
            State::Sealed { .. } if self.initialized.load(Ordering::Relaxed) => Err(Error::Sealed),
            State::Sealed { .. } => Err(Error::NotInitialized),
        }
    }

    /// Watches the sealed flag (true = sealed); health reporting follows it.
    pub fn watch_sealed(&self) -> watch::Receiver<bool> {
        self.sealed_tx.subscribe()
    }

    /// The server parameters.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Current lifecycle status.
    pub async fn status(&self) -> Result<SealStatus> {
        let record = self.seal_record().await?;
        if record.is_some() {
            self.initialized.store(true, Ordering::Relaxed);
        }
        let (sealed, progress) = match &*self.read_state() {
            State::Unsealed(_) => (false, 0),
            State::Sealed { pending } => (true, pending.len() as u8),
        };
        Ok(SealStatus {
            initialized: record.is_some(),
            sealed,
            threshold: record.as_ref().map_or(0, |r| r.threshold),
            shares: record.as_ref().map_or(0, |r| r.shares),
            progress,
        })
    }

    /// Creates the root key and returns `shares` text-encoded unseal shares, any
    /// `threshold` of which unseal. Leaves the service sealed.
    pub async fn init(&self, shares: u32, threshold: u32) -> Result<Vec<String>> {
        let _guard = self.lifecycle.lock().await;
        let (n, t) = match (u8::try_from(shares), u8::try_from(threshold)) {
            // 1-of-1 (dev and tests), or t-of-n with 2 <= t <= n.
            (Ok(1), Ok(1)) => (1, 1),
            (Ok(n), Ok(t)) if t >= 2 && t <= n => (n, t),
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "shares must be 1..=255 and threshold 2..=shares, or both 1 \
                     (got shares {shares}, threshold {threshold})"
                )));
            }
        };
        if self.seal_record().await?.is_some() {
            return Err(Error::AlreadyInitialized);
        }
        let unseal_material = KeyMaterial::generate()?;
        let split = shamir::split(&unseal_material, t, n)?;
        let unseal_key = UnsealKey::from_material(unseal_material);
        let root = RootKey::generate()?;
        let sealed_root = barrier::seal_root_key(&unseal_key, &root)?;
        let record = SealRecord {
            format: 1,
            shares: n,
            threshold: t,
            root_generation: 1,
            sealed_root_key: base64::engine::general_purpose::STANDARD.encode(sealed_root),
        };
        let json = serde_json::to_vec(&record).map_err(|e| Error::Internal(e.to_string()))?;
        match self.store.create(SEAL_PATH, &json).await {
            Ok(_) => {}
            Err(cipherd_store::Error::AlreadyExists { .. }) => {
                return Err(Error::AlreadyInitialized);
            }
            Err(e) => return Err(e.into()),
        }
        self.initialized.store(true, Ordering::Relaxed);
        tracing::info!(shares = n, threshold = t, "initialized");
        Ok(split.iter().map(|s| s.to_text().to_string()).collect())
    }

    /// Submits one share. Unseals once `threshold` distinct shares are in; a set
    /// that does not open the root key is discarded so the operator can start over.
    pub async fn unseal(&self, share_text: &str, reset: bool) -> Result<SealStatus> {
        let _guard = self.lifecycle.lock().await;
        let record = self.seal_record().await?.ok_or(Error::NotInitialized)?;
        let ready = {
            let mut state = self.write_state();
            let pending = match &mut *state {
                State::Unsealed(_) => return Err(Error::AlreadyUnsealed),
                State::Sealed { pending } => pending,
            };
            if reset {
                pending.clear();
            }
            if !share_text.trim().is_empty() {
                let share = Share::parse(share_text.trim())
                    .map_err(|_| Error::InvalidArgument("the unseal share is malformed".into()))?;
                if pending.iter().any(|s| s.x() == share.x()) {
                    return Err(Error::InvalidArgument(
                        "this share was already submitted".into(),
                    ));
                }
                pending.push(share);
            }
            if pending.len() >= usize::from(record.threshold) {
                Some(std::mem::take(pending))
            } else {
                None
            }
        };
        if let Some(shares) = ready {
            let unsealed = Arc::new(self.open(&record, &shares).await?);
            *self.write_state() = State::Unsealed(Arc::clone(&unsealed));
            self.sealed_tx.send_replace(false);
            tracing::info!("unsealed");
            tokio::spawn(warm_cache(Arc::downgrade(&unsealed)));
        }
        self.status().await
    }

    /// Drops all key material from memory.
    pub async fn seal(&self) -> Result<()> {
        let _guard = self.lifecycle.lock().await;
        if self.seal_record().await?.is_none() {
            return Err(Error::NotInitialized);
        }
        *self.write_state() = State::Sealed {
            pending: Vec::new(),
        };
        self.sealed_tx.send_replace(true);
        tracing::info!("sealed");
        Ok(())
    }

    async fn open(&self, record: &SealRecord, shares: &[Share]) -> Result<Unsealed> {
        let unseal_key = UnsealKey::from_material(shamir::combine(shares)?);
        let sealed_root = base64::engine::general_purpose::STANDARD
            .decode(&record.sealed_root_key)
            .map_err(|_| Error::Corrupt(SEAL_PATH.into()))?;
        let root = barrier::open_root_key(&unseal_key, &sealed_root).map_err(|_| {
            Error::UnsealFailed("the shares do not reconstruct the unseal key; start over".into())
        })?;
        let barrier = Barrier::new(&root, record.root_generation)?;
        let keys = KeyManager::new(
            Arc::clone(&self.store),
            Arc::new(barrier),
            self.params.usage,
        );
        Ok(Unsealed { keys })
    }

    async fn seal_record(&self) -> Result<Option<SealRecord>> {
        let Some(rec) = self.store.get(SEAL_PATH).await? else {
            return Ok(None);
        };
        let record: SealRecord =
            serde_json::from_slice(&rec.value).map_err(|_| Error::Corrupt(SEAL_PATH.into()))?;
        if record.format != 1 || record.threshold == 0 || record.threshold > record.shares {
            return Err(Error::Corrupt(SEAL_PATH.into()));
        }
        Ok(Some(record))
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // Invariant: no code panics while holding this lock (only moves of Arcs and
        // Vecs happen under it), so poisoning cannot occur; recover regardless.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Loads every key after unseal. Holds only a weak reference between keys, so
/// sealing is never delayed and material is dropped as soon as the service seals.
async fn warm_cache(unsealed: std::sync::Weak<Unsealed>) {
    let started = std::time::Instant::now();
    let Some(strong) = unsealed.upgrade() else {
        return;
    };
    // The manager is kept alive by `strong` only for the duration of this call;
    // `keep_going` notices a seal because the state then holds another value.
    let keys = &strong.keys;
    let outcome = keys.warm(|| unsealed.strong_count() > 1).await;
    match outcome {
        Ok(n) => tracing::info!(
            keys = n,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "key cache warm"
        ),
        Err(e) => tracing::warn!(error = %e, "key cache warm-up stopped"),
    }
}

/// Dev mode: initialize with one share kept in the data dir, and unseal from it.
///
/// The file is loudly named INSECURE: whoever can read the data dir can unseal.
pub async fn dev_auto_unseal(core: &Core) -> Result<()> {
    let path = core.params.data_dir.join(DEV_SHARE_FILE);
    let status = core.status().await?;
    if !status.initialized {
        let shares = core.init(1, 1).await?;
        let body = format!(
            "# INSECURE: cipherd dev-mode unseal share. Anyone who can read this file can\n\
             # unseal this server. Never use --dev for real data.\n{}\n",
            shares[0]
        );
        write_private(&path, body.as_bytes())
            .map_err(|e| Error::Internal(format!("writing {}: {e}", path.display())))?;
        tracing::warn!(path = %path.display(), "dev mode: initialized; unseal share stored in the clear");
    }
    if !core.status().await?.sealed {
        return Ok(());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Error::FailedPrecondition(format!(
            "dev mode: cannot read {} ({e}); the server stays sealed",
            path.display()
        ))
    })?;
    let share = text
        .lines()
        .find(|l| !l.starts_with('#') && !l.trim().is_empty())
        .unwrap_or_default();
    core.unseal(share, true).await?;
    tracing::warn!("dev mode: unsealed automatically; do not use for real data");
    Ok(())
}

/// File name of the dev-mode unseal share inside the data dir.
pub const DEV_SHARE_FILE: &str = "dev-unseal-share.INSECURE";

fn write_private(path: &std::path::Path, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(body)?;
    file.sync_all()
}
