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
//!
//! Seal record formats:
//!
//! | format | written by | HKDF derivation (barrier, root wrapping) | shares |
//! | --- | --- | --- | --- |
//! | 1 | initializations before derivations were versioned | `Derivation::V1` | `cipherd-share:v1:` (unkeyed check) |
//! | 2 | initializations before the root key was bound to its parameters | `Derivation::V2` | `cipherd-share:v2:`, check keyed with the record's random `seal_id` |
//! | 3 | every new `Init`, and format 2 once unsealed | `Derivation::V2` | as format 2 |
//!
//! Under format 3 the sealed root key is bound (`barrier::seal_root_key_bound`)
//! to the seal id, `root_generation`, `threshold` and `shares`: those fields are
//! plain JSON (they are read before unsealing), and changing any of them makes
//! the root key fail to open. A format-2 record is rewritten as format 3 the
//! first time it unseals (the unseal key is in memory only then); format 1 is
//! kept as it is (its v1 shares carry no seal id to bind). Under formats 2 and 3
//! a share of another initialization, or a made-up one, is refused when it is
//! submitted and never touches the progress of an unseal in flight.
//!
//! Share texts are held in zeroizing buffers here; the copies in the gRPC request
//! and response messages (and tonic's buffers) are outside this module's reach.

use std::{
    io::Read as _,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use base64::Engine as _;
use cipherd_core::{
    barrier::{self, Barrier, RootBinding, RootKey, UnsealKey},
    secret::{Derivation, KeyMaterial},
    shamir::{self, SealId, Share, ShareBinding},
};
use cipherd_store::Store;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, watch};
use zeroize::Zeroizing;

use crate::{
    auth::state::{self as auth_state, AuthState},
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
    /// Serializes `init`, `unseal`, `seal` and `rekey` so share collection is
    /// consistent; holds the rekey in progress (in memory only: a restart
    /// abandons it, and the current shares stay in force).
    lifecycle: Mutex<Option<RekeyState>>,
    sealed_tx: watch::Sender<bool>,
    /// The root rotation's re-seal, as `RotateRoot` reports it.
    rotation: Arc<std::sync::Mutex<Rotation>>,
}

/// Where the re-seal of a root rotation stands (in memory; the seal record's
/// `rotation` field is what survives a restart).
#[derive(Debug, Clone, Default)]
pub enum Rotation {
    /// None since this process started.
    #[default]
    Idle,
    /// Re-sealing every record under `generation`.
    Resealing { generation: u32, resealed: u64 },
    /// Done: every record is under `generation`, the old root is gone.
    Done { generation: u32, resealed: u64 },
    /// Stopped (a seal, a storage error); resumes at the next unseal or
    /// `RotateRoot`.
    Stopped { generation: u32, why: String },
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
    /// Tokens, policies, roles and the MAC keys.
    pub auth: AuthState,
    /// The barrier both use (two generations during a root rotation).
    barrier: Arc<Barrier>,
}

#[derive(Debug)]
enum State {
    Sealed { pending: Vec<Share> },
    Unsealed(Arc<Unsealed>),
}

/// The seal record format every new initialization writes (see the module docs).
const SEAL_FORMAT: u32 = 3;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SealRecord {
    format: u32,
    shares: u8,
    threshold: u8,
    root_generation: u32,
    /// base64 of `barrier::seal_root_key` output.
    sealed_root_key: String,
    /// Format 2: base64 of the random seal id that keys the share check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seal_id: Option<String>,
    /// Format 3, during a root rotation: the next root key, sealed under the
    /// same unseal key and bound to its generation. Records of both
    /// generations open until every one is re-sealed under the next; then it
    /// becomes `sealed_root_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rotation: Option<PendingRoot>,
}

/// The next root key of a rotation in progress.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PendingRoot {
    root_generation: u32,
    /// base64 of `barrier::seal_root_key_bound` output.
    sealed_root_key: String,
}

/// A validated seal record: what its format means for derivation and shares.
struct Seal {
    record: SealRecord,
    /// The store revision it was read at.
    revision: u64,
    derivation: Derivation,
    /// `None` for format 1 (v1 shares, unbound).
    id: Option<SealId>,
}

impl Seal {
    fn binding(&self) -> ShareBinding<'_> {
        match &self.id {
            Some(id) => ShareBinding::Seal(id),
            None => ShareBinding::Unbound,
        }
    }

    /// What the sealed root key is bound to (format 3), for a generation.
    fn root_binding(&self, root_generation: u32) -> Option<RootBinding<'_>> {
        match (&self.id, self.record.format) {
            (Some(id), 3) => Some(RootBinding {
                seal_id: id.as_bytes(),
                root_generation,
                threshold: self.record.threshold,
                shares: self.record.shares,
            }),
            _ => None,
        }
    }
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
            lifecycle: Mutex::new(None),
            sealed_tx,
            rotation: Arc::default(),
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
            threshold: record.as_ref().map_or(0, |s| s.record.threshold),
            shares: record.as_ref().map_or(0, |s| s.record.shares),
            progress,
        })
    }

    /// Creates the root key and returns `shares` text-encoded unseal shares
    /// (`cipherd-share:v2:`, bound to this seal), any `threshold` of which unseal,
    /// and a root token (policy `root`, no expiry) created under the new barrier
    /// while the root key is still in memory. Leaves the service sealed.
    ///
    /// Each text is moved, not copied, out of the zeroizing buffer it was written
    /// in: the returned strings (which become the gRPC reply) are the only copies.
    pub async fn init(
        &self,
        shares: u32,
        threshold: u32,
    ) -> Result<(Vec<String>, Zeroizing<String>)> {
        self.init_with(shares, threshold, |_| Ok(())).await
    }

    /// [`init`](Self::init), calling `keep` with the shares before the seal
    /// record is committed: the seal record's creation is the commit point, so
    /// whatever `keep` stores (dev mode's share file) exists before the store
    /// counts as initialized. An error from `keep` leaves the store
    /// uninitialized.
    async fn init_with(
        &self,
        shares: u32,
        threshold: u32,
        keep: impl FnOnce(&[String]) -> Result<()>,
    ) -> Result<(Vec<String>, Zeroizing<String>)> {
        let _guard = self.lifecycle.lock().await;
        let (n, t) = share_counts(shares, threshold)?;
        if self.seal_record().await?.is_some() {
            return Err(Error::AlreadyInitialized);
        }
        let root = RootKey::generate()?;
        let FreshSeal { record, shares, .. } = FreshSeal::new(&root, 1, t, n)?;
        let json = serde_json::to_vec(&record).map_err(|e| Error::Internal(e.to_string()))?;
        keep(&shares)?;
        match self.store.create(SEAL_PATH, &json).await {
            Ok(_) => {}
            Err(cipherd_store::Error::AlreadyExists { .. }) => {
                return Err(Error::AlreadyInitialized);
            }
            Err(e) => return Err(e.into()),
        }
        self.initialized.store(true, Ordering::Relaxed);
        tracing::info!(shares = n, threshold = t, "initialized");
        let barrier = Barrier::new(&root, record.root_generation, Derivation::V2)?;
        let root_token = auth_state::bootstrap(&*self.store, &barrier).await?;
        Ok((shares, root_token))
    }

    /// Submits one share. Unseals once `threshold` distinct shares are in; a set
    /// that does not open the root key is discarded so the operator can start over.
    ///
    /// A share that does not parse for this seal (malformed, mistyped, of the
    /// other share version, or, under format 2, issued by another initialization)
    /// is refused with `InvalidArgument` and leaves the progress as it was. The
    /// text is wiped when this returns.
    pub async fn unseal(
        &self,
        share_text: impl Into<Zeroizing<String>>,
        reset: bool,
    ) -> Result<SealStatus> {
        let share_text = share_text.into();
        let _guard = self.lifecycle.lock().await;
        let seal = self.seal_record().await?.ok_or(Error::NotInitialized)?;
        // The lifecycle lock is held, so the state cannot change until we return.
        if matches!(*self.read_state(), State::Unsealed(_)) {
            return Err(Error::AlreadyUnsealed);
        }
        // Parsed before the state is touched: a refused share changes nothing.
        let share = match share_text.trim() {
            "" => None,
            text => Some(parse_share(text, seal.binding())?),
        };
        drop(share_text);
        let ready = {
            let mut state = self.write_state();
            let pending = match &mut *state {
                State::Unsealed(_) => return Err(Error::AlreadyUnsealed),
                State::Sealed { pending } => pending,
            };
            if reset {
                pending.clear();
            }
            if let Some(share) = share {
                if pending.iter().any(|s| s.x() == share.x()) {
                    return Err(Error::InvalidArgument(
                        "this share was already submitted".into(),
                    ));
                }
                pending.push(share);
            }
            if pending.len() >= usize::from(seal.record.threshold) {
                Some(std::mem::take(pending))
            } else {
                None
            }
        };
        if let Some(shares) = ready {
            let (unsealed, resume) = self.open(&seal, &shares).await?;
            let unsealed = Arc::new(unsealed);
            *self.write_state() = State::Unsealed(Arc::clone(&unsealed));
            self.sealed_tx.send_replace(false);
            tracing::info!("unsealed");
            if let Some(generation) = resume {
                tracing::warn!(
                    generation,
                    "a root rotation was interrupted; re-sealing resumes"
                );
                self.spawn_reseal(Arc::clone(&unsealed.barrier), generation);
            }
            tokio::spawn(warm_cache(Arc::downgrade(&unsealed)));
            tokio::spawn(housekeeping(
                Arc::downgrade(&unsealed),
                self.params().lifecycle,
            ));
        }
        self.status().await
    }

    /// Drops all key material from memory.
    pub async fn seal(&self) -> Result<()> {
        let mut guard = self.lifecycle.lock().await;
        if self.seal_record().await?.is_none() {
            return Err(Error::NotInitialized);
        }
        // A rekey needs the `system` operation, which needs the unsealed state.
        *guard = None;
        self.flush_stats().await;
        *self.write_state() = State::Sealed {
            pending: Vec::new(),
        };
        self.sealed_tx.send_replace(true);
        tracing::info!("sealed");
        Ok(())
    }

    /// Writes the key use statistics gathered since the last flush, if unsealed:
    /// before sealing and at shutdown, so that a planned restart loses none. Bounded
    /// by [`FINAL_FLUSH_TIMEOUT`]: an unreachable store never holds up a seal.
    pub async fn flush_stats(&self) {
        let Ok(unsealed) = self.unsealed() else {
            return;
        };
        match tokio::time::timeout(FINAL_FLUSH_TIMEOUT, unsealed.keys.flush_stats()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "key use statistics not written"),
            Err(_) => tracing::warn!("key use statistics not written: the store is too slow"),
        }
    }

    /// The unsealed state from `shares`, and the generation of a root rotation
    /// to resume, if one was interrupted.
    async fn open(&self, seal: &Seal, shares: &[Share]) -> Result<(Unsealed, Option<u32>)> {
        let unseal_key = UnsealKey::from_material(shamir::combine(shares)?);
        let root = self.open_root(seal, &unseal_key)?;
        if seal.record.format == 2 {
            self.bind_seal_record(seal, &unseal_key, &root).await?;
        }
        let barrier = Arc::new(Barrier::new(
            &root,
            seal.record.root_generation,
            seal.derivation,
        )?);
        drop(root);
        // A rotation interrupted by a restart: the next root opens with the same
        // unseal key, records of both generations open, and the re-seal resumes.
        let resume = match &seal.record.rotation {
            Some(pending) => {
                let next = self.open_pending_root(seal, pending, &unseal_key)?;
                barrier.add_generation(&next, pending.root_generation, seal.derivation)?;
                Some(pending.root_generation)
            }
            None => None,
        };
        drop(unseal_key);
        let auth = AuthState::load(Arc::clone(&self.store), Arc::clone(&barrier)).await?;
        let keys = KeyManager::new(
            Arc::clone(&self.store),
            Arc::clone(&barrier),
            self.params.usage,
        );
        Ok((
            Unsealed {
                keys,
                auth,
                barrier,
            },
            resume,
        ))
    }

    /// Rewrites a format-2 seal record as format 3: the same root key, sealed
    /// under the same unseal key, bound to the record's parameters. A record
    /// changed since it was read is left to whoever changed it.
    async fn bind_seal_record(
        &self,
        seal: &Seal,
        unseal_key: &UnsealKey,
        root: &RootKey,
    ) -> Result<()> {
        let Some(id) = &seal.id else {
            return Ok(());
        };
        let sealed_root = barrier::seal_root_key_bound(
            unseal_key,
            root,
            seal.derivation,
            &RootBinding {
                seal_id: id.as_bytes(),
                root_generation: seal.record.root_generation,
                threshold: seal.record.threshold,
                shares: seal.record.shares,
            },
        )?;
        let record = SealRecord {
            format: 3,
            sealed_root_key: base64::engine::general_purpose::STANDARD.encode(sealed_root),
            seal_id: seal.record.seal_id.clone(),
            rotation: None,
            ..seal.record
        };
        let json = serde_json::to_vec(&record).map_err(|e| Error::Internal(e.to_string()))?;
        match self
            .store
            .compare_and_set(SEAL_PATH, seal.revision, &json)
            .await
        {
            Ok(_) => {
                tracing::info!(
                    "seal record upgraded to format 3 (root key bound to its parameters)"
                );
                Ok(())
            }
            Err(cipherd_store::Error::Conflict { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn seal_record(&self) -> Result<Option<Seal>> {
        let Some(rec) = self.store.get(SEAL_PATH).await? else {
            return Ok(None);
        };
        Seal::parse(&rec.value, rec.revision).map(Some)
    }

    /// A point-in-time snapshot of every stored record, the seal record
    /// included, for a backup. Needs the unsealed state (a backup is an
    /// authorized administrative call, and authorization needs it); the
    /// records themselves stay as stored, barrier-encrypted.
    pub async fn backup_snapshot(&self) -> Result<Box<dyn cipherd_store::Snapshot>> {
        self.unsealed()?;
        Ok(self.store.snapshot().await?)
    }

    /// Restores a backup into this uninitialized store: checks `seal_record`
    /// (the backup's `sys/seal` value) the way an unseal will read it, then
    /// imports every record `records` yields in one transaction, committed only
    /// if they number `expected_records` (the backup's header). Whatever
    /// fails, nothing is committed and the store stays uninitialized. Leaves
    /// the service sealed; the backed-up server's shares unseal it. Returns
    /// how many records were restored.
    ///
    /// Holds the lifecycle lock throughout, so an `Init` cannot slip in.
    pub async fn restore(
        &self,
        seal_record: &[u8],
        expected_records: u64,
        mut records: tokio::sync::mpsc::Receiver<Result<(String, Vec<u8>)>>,
    ) -> Result<u64> {
        let _guard = self.lifecycle.lock().await;
        if self.seal_record().await?.is_some() {
            return Err(Error::AlreadyInitialized);
        }
        Seal::parse(seal_record, 1).map_err(|_| {
            Error::InvalidArgument("invalid backup: its seal record is not valid".into())
        })?;
        let mut import = match self.store.import().await {
            Ok(import) => import,
            Err(cipherd_store::Error::NotEmpty) => {
                return Err(Error::FailedPrecondition(
                    "the store holds records but no seal record; restore needs an empty store"
                        .into(),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        let mut seal_seen = false;
        let mut put = 0u64;
        while let Some(record) = records.recv().await {
            let (path, value) = record?;
            if path == SEAL_PATH {
                if value != seal_record {
                    return Err(Error::Internal(
                        "the backup's seal record changed between verification and import".into(),
                    ));
                }
                seal_seen = true;
            }
            match import.put(&path, &value).await {
                Ok(()) => put += 1,
                Err(cipherd_store::Error::AlreadyExists { path }) => {
                    return Err(Error::InvalidArgument(format!(
                        "invalid backup: the path {path:?} appears twice"
                    )));
                }
                Err(cipherd_store::Error::InvalidPath(why)) => {
                    return Err(Error::InvalidArgument(format!(
                        "invalid backup: a record path is invalid ({why})"
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        }
        if !seal_seen {
            return Err(Error::InvalidArgument(
                "invalid backup: it has no seal record".into(),
            ));
        }
        if put != expected_records {
            return Err(Error::Internal(format!(
                "the backup yielded {put} records at import, {expected_records} at verification"
            )));
        }
        let count = import.commit().await?;
        self.initialized.store(true, Ordering::Relaxed);
        *self.write_state() = State::Sealed {
            pending: Vec::new(),
        };
        tracing::info!(records = count, "restored from a backup; sealed");
        Ok(count)
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

impl Seal {
    /// A seal record's stored bytes, checked: the JSON, the threshold, the
    /// format and its seal id. Anything else is `Corrupt`.
    fn parse(value: &[u8], revision: u64) -> Result<Self> {
        let corrupt = || Error::Corrupt(SEAL_PATH.into());
        let record: SealRecord = serde_json::from_slice(value).map_err(|_| corrupt())?;
        if record.threshold == 0 || record.threshold > record.shares {
            return Err(corrupt());
        }
        let (derivation, id) = match (record.format, &record.seal_id) {
            (1, None) => (Derivation::V1, None),
            (2 | 3, Some(id)) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(id)
                    .map_err(|_| corrupt())?;
                let id = SealId::from_slice(&bytes).map_err(|_| corrupt())?;
                (Derivation::V2, Some(id))
            }
            _ => return Err(corrupt()),
        };
        Ok(Seal {
            record,
            revision,
            derivation,
            id,
        })
    }
}

/// A new seal for `root`: a fresh unseal key split into `shares` texts (bound
/// to a fresh seal id), the root key sealed under it and bound to the id,
/// `generation`, `threshold` and share count, and the format-3 record holding
/// it (for `Init`, and for a rekey's new shares).
struct FreshSeal {
    id: SealId,
    record: SealRecord,
    /// The sealed root key (also base64 in `record`).
    sealed_root: Vec<u8>,
    shares: Vec<String>,
}

impl FreshSeal {
    fn new(root: &RootKey, generation: u32, threshold: u8, shares: u8) -> Result<Self> {
        let material = KeyMaterial::generate()?;
        let split = shamir::split(&material, threshold, shares)?;
        let unseal_key = UnsealKey::from_material(material);
        let id = SealId::generate()?;
        let sealed_root = barrier::seal_root_key_bound(
            &unseal_key,
            root,
            Derivation::V2,
            &RootBinding {
                seal_id: id.as_bytes(),
                root_generation: generation,
                threshold,
                shares,
            },
        )?;
        let b64 = &base64::engine::general_purpose::STANDARD;
        let record = SealRecord {
            format: SEAL_FORMAT,
            shares,
            threshold,
            root_generation: generation,
            sealed_root_key: b64.encode(&sealed_root),
            seal_id: Some(b64.encode(id.as_bytes())),
            rotation: None,
        };
        let binding = ShareBinding::Seal(&id);
        let shares = split
            .iter()
            .map(|s| std::mem::take(&mut *s.to_text(binding)))
            .collect();
        Ok(FreshSeal {
            id,
            record,
            sealed_root,
            shares,
        })
    }
}

/// Validates a share count and threshold: 1-of-1 (dev and tests), or t-of-n
/// with 2 <= t <= n <= 255.
fn share_counts(shares: u32, threshold: u32) -> Result<(u8, u8)> {
    match (u8::try_from(shares), u8::try_from(threshold)) {
        (Ok(1), Ok(1)) => Ok((1, 1)),
        (Ok(n), Ok(t)) if t >= 2 && t <= n => Ok((n, t)),
        _ => Err(Error::InvalidArgument(format!(
            "shares must be 1..=255 and threshold 2..=shares, or both 1 \
             (got shares {shares}, threshold {threshold})"
        ))),
    }
}

/// A share ceremony in progress: a rekey, or a root rotation collecting shares.
#[derive(Debug)]
enum RekeyState {
    /// Collecting shares of the current seal for a root rotation.
    RotateRoot { nonce: String, pending: Vec<Share> },
    /// Collecting shares of the current seal.
    Collecting {
        nonce: String,
        new_shares: u8,
        new_threshold: u8,
        pending: Vec<Share>,
    },
    /// The new shares were handed out; collecting a threshold of them back
    /// before `record` replaces the seal record read at `base_revision`.
    Verifying {
        nonce: String,
        new_shares: u8,
        new_threshold: u8,
        pending: Vec<Share>,
        new_id: SealId,
        /// The new seal record (JSON), committed once verified.
        record: Vec<u8>,
        /// Its sealed root key, opened by the new shares to verify them.
        sealed_root: Vec<u8>,
        root_generation: u32,
        base_revision: u64,
    },
}

/// One step of a rekey ([`Core::rekey`]).
#[derive(Debug)]
pub enum RekeyAction {
    /// Where the rekey stands.
    Status,
    /// Starts a rekey to `shares` new shares, `threshold` of which unseal.
    Start { shares: u32, threshold: u32 },
    /// Submits a share for the rekey `nonce`.
    Share {
        text: Zeroizing<String>,
        nonce: String,
    },
    /// Abandons the rekey in progress.
    Cancel,
}

/// Where a rekey stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RekeyPhase {
    /// None in progress.
    None,
    /// Collecting shares of the current seal.
    Collecting,
    /// Collecting the new shares back.
    Verifying,
    /// The new shares are in force.
    Done,
}

/// What a rekey step answers.
#[derive(Debug)]
pub struct RekeyStatus {
    pub phase: RekeyPhase,
    pub nonce: String,
    /// Shares submitted in this phase, and how many it needs.
    pub progress: u8,
    pub required: u8,
    pub new_shares: u8,
    pub new_threshold: u8,
    /// The new shares, once: when the collection of the current ones completes.
    pub shares: Vec<String>,
}

impl RekeyStatus {
    fn of(state: &Option<RekeyState>, current_threshold: u8) -> Self {
        match state {
            None | Some(RekeyState::RotateRoot { .. }) => RekeyStatus {
                phase: RekeyPhase::None,
                nonce: String::new(),
                progress: 0,
                required: 0,
                new_shares: 0,
                new_threshold: 0,
                shares: Vec::new(),
            },
            Some(RekeyState::Collecting {
                nonce,
                new_shares,
                new_threshold,
                pending,
            }) => RekeyStatus {
                phase: RekeyPhase::Collecting,
                nonce: nonce.clone(),
                progress: pending.len() as u8,
                required: current_threshold,
                new_shares: *new_shares,
                new_threshold: *new_threshold,
                shares: Vec::new(),
            },
            Some(RekeyState::Verifying {
                nonce,
                new_shares,
                new_threshold,
                pending,
                ..
            }) => RekeyStatus {
                phase: RekeyPhase::Verifying,
                nonce: nonce.clone(),
                progress: pending.len() as u8,
                required: *new_threshold,
                new_shares: *new_shares,
                new_threshold: *new_threshold,
                shares: Vec::new(),
            },
        }
    }
}

/// One step of a root rotation ([`Core::rotate_root`]).
#[derive(Debug)]
pub enum RotateAction {
    /// Where it stands.
    Status,
    /// Starts collecting shares (discards a rekey or rotation collecting).
    Start,
    /// Submits a share for the rotation `nonce`.
    Share {
        text: Zeroizing<String>,
        nonce: String,
    },
    /// Abandons the collection of shares (not a re-seal under way).
    Cancel,
}

/// Where a root rotation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RotatePhase {
    /// None since this process started.
    #[default]
    None,
    /// Collecting shares.
    Collecting,
    /// Re-sealing every record under the new root.
    Resealing,
    /// Done.
    Done,
    /// Stopped; resumes at the next unseal or `RotateRoot`.
    Stopped,
}

/// What a root rotation step answers.
#[derive(Debug, Default)]
pub struct RotateStatus {
    pub phase: RotatePhase,
    pub nonce: String,
    pub progress: u8,
    pub required: u8,
    /// The generation being sealed under (re-sealing, done, stopped).
    pub root_generation: u32,
    /// Records re-sealed so far.
    pub resealed: u64,
    /// Why it stopped.
    pub error: String,
}

/// Re-seals every record (but the seal record) not yet under `generation`,
/// then makes the next root the seal record's root and drops the older
/// generation from `barrier`. A second pass checks that nothing old is left
/// (nothing writes under the old generation once the barrier seals under the
/// new one; another process on the same storage might, and then the rotation
/// stops rather than drop a root still in use). Stops, resumable, when the
/// server seals.
async fn reseal(
    store: &dyn Store,
    barrier: &Barrier,
    generation: u32,
    progress: &std::sync::Mutex<Rotation>,
    sealed: &watch::Receiver<bool>,
) -> Result<u64> {
    const PAGE: usize = 256;
    let mut total = 0;
    let mut clean = false;
    for _pass in 0..3 {
        let mut changed = 0u64;
        let mut after: Option<String> = None;
        loop {
            let page = store.scan("", after.as_deref(), PAGE).await?;
            let full = page.len() == PAGE;
            after = page.last().map(|(p, _)| p.clone());
            for (path, record) in page {
                if *sealed.borrow() {
                    return Err(Error::Sealed);
                }
                if path == SEAL_PATH {
                    continue;
                }
                if reseal_one(store, barrier, generation, &path, record).await? {
                    changed += 1;
                    if let Rotation::Resealing { resealed, .. } =
                        &mut *progress.lock().unwrap_or_else(|e| e.into_inner())
                    {
                        *resealed += 1;
                    }
                }
            }
            if !full {
                break;
            }
        }
        total += changed;
        if changed == 0 {
            clean = true;
            break;
        }
    }
    if !clean {
        return Err(Error::FailedPrecondition(
            "records are still being written under the old root generation (another process on this storage?)".into(),
        ));
    }
    finish_rotation(store, generation).await?;
    barrier.retire_older();
    Ok(total)
}

/// Re-seals one record under `generation` unless it is already; `true` if
/// it wrote. A concurrent write wins (and is already under the new generation).
async fn reseal_one(
    store: &dyn Store,
    barrier: &Barrier,
    generation: u32,
    path: &str,
    mut record: cipherd_store::Record,
) -> Result<bool> {
    for _ in 0..16 {
        if barrier::sealed_generation(&record.value) == Some(generation) {
            return Ok(false);
        }
        let plain = barrier.open(path, &record.value)?;
        let sealed = barrier.seal(path, plain.expose_secret())?;
        drop(plain);
        match store.compare_and_set(path, record.revision, &sealed).await {
            Ok(_) => return Ok(true),
            Err(cipherd_store::Error::Conflict { .. }) => match store.get(path).await? {
                Some(r) => record = r,
                None => return Ok(false),
            },
            Err(cipherd_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Aborted(path.to_owned()))
}

/// Makes the pending root the seal record's root.
async fn finish_rotation(store: &dyn Store, generation: u32) -> Result<()> {
    for _ in 0..16 {
        let rec = store.get(SEAL_PATH).await?.ok_or(Error::NotInitialized)?;
        let mut record: SealRecord =
            serde_json::from_slice(&rec.value).map_err(|_| Error::Corrupt(SEAL_PATH.into()))?;
        let Some(pending) = record.rotation.take() else {
            return Ok(());
        };
        if pending.root_generation != generation {
            return Err(Error::Corrupt(SEAL_PATH.into()));
        }
        record.root_generation = generation;
        record.sealed_root_key = pending.sealed_root_key;
        let json = serde_json::to_vec(&record).map_err(|e| Error::Internal(e.to_string()))?;
        match store.compare_and_set(SEAL_PATH, rec.revision, &json).await {
            Ok(_) => return Ok(()),
            Err(cipherd_store::Error::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Aborted(SEAL_PATH.into()))
}

/// Adds `share` to `pending` unless one with its x is there.
fn add_share(pending: &mut Vec<Share>, share: Share) -> Result<()> {
    if pending.iter().any(|s| s.x() == share.x()) {
        return Err(Error::InvalidArgument(
            "this share was already submitted".into(),
        ));
    }
    pending.push(share);
    Ok(())
}

fn parse_share(text: &str, binding: ShareBinding<'_>) -> Result<Share> {
    Share::parse(text.trim(), binding).map_err(|e| match e {
        cipherd_core::Error::Shamir(why) => {
            Error::InvalidArgument(format!("unseal share refused: {why}"))
        }
        e => e.into(),
    })
}

impl Core {
    /// One step of a rekey: replaces the unseal shares (and threshold) from a
    /// threshold of the current ones, in two phases. Collecting: shares of the
    /// current seal are submitted; the one that completes them opens the root
    /// key, which is sealed under a new unseal key split into the new shares
    /// (bound to a new seal id), and the reply carries those shares, once.
    /// Verifying: a threshold of the new shares is submitted back; the one that
    /// completes them checks they open the new sealed root, then the seal
    /// record is replaced (compare-and-set, so a concurrent change aborts the
    /// rekey). The current shares work until then and are refused afterwards
    /// (they are bound to the old seal id). Callers need the `system`
    /// operation; the server must be unsealed.
    pub async fn rekey(&self, action: RekeyAction) -> Result<RekeyStatus> {
        let mut guard = self.lifecycle.lock().await;
        let seal = self.seal_record().await?.ok_or(Error::NotInitialized)?;
        self.unsealed()?;
        let current_threshold = seal.record.threshold;
        let (text, nonce) = match action {
            RekeyAction::Status => return Ok(RekeyStatus::of(&guard, current_threshold)),
            RekeyAction::Cancel => {
                if guard.take().is_some() {
                    tracing::info!("rekey cancelled");
                }
                return Ok(RekeyStatus::of(&guard, current_threshold));
            }
            RekeyAction::Start { shares, threshold } => {
                let (new_shares, new_threshold) = share_counts(shares, threshold)?;
                if seal.record.rotation.is_some() {
                    return Err(Error::FailedPrecondition(
                        "a root rotation is under way; rekey once it is done".into(),
                    ));
                }
                if seal.id.is_none() {
                    return Err(Error::FailedPrecondition(
                        "this seal (format 1) cannot be rekeyed; its shares carry no seal id"
                            .into(),
                    ));
                }
                let nonce =
                    hex::encode(cipherd_core::secret::SecretBytes::random(16)?.expose_secret());
                *guard = Some(RekeyState::Collecting {
                    nonce,
                    new_shares,
                    new_threshold,
                    pending: Vec::new(),
                });
                tracing::info!(new_shares, new_threshold, "rekey started");
                return Ok(RekeyStatus::of(&guard, current_threshold));
            }
            RekeyAction::Share { text, nonce } => (text, nonce),
        };
        let state = guard.as_mut().ok_or_else(|| {
            Error::FailedPrecondition("no rekey in progress; start one first".into())
        })?;
        let (RekeyState::Collecting { nonce: ours, .. }
        | RekeyState::Verifying { nonce: ours, .. }
        | RekeyState::RotateRoot { nonce: ours, .. }) = &*state;
        if *ours != nonce {
            return Err(Error::InvalidArgument(
                "this share is for another rekey (nonce mismatch)".into(),
            ));
        }
        match state {
            RekeyState::RotateRoot { .. } => Err(Error::FailedPrecondition(
                "a root rotation is collecting shares, not a rekey".into(),
            )),
            RekeyState::Collecting {
                nonce,
                new_shares,
                new_threshold,
                pending,
            } => {
                add_share(pending, parse_share(&text, seal.binding())?)?;
                drop(text);
                if pending.len() < usize::from(current_threshold) {
                    return Ok(RekeyStatus::of(&guard, current_threshold));
                }
                let shares = std::mem::take(pending);
                let root =
                    self.open_root(&seal, &UnsealKey::from_material(shamir::combine(&shares)?))?;
                let (n, t) = (*new_shares, *new_threshold);
                let generation = seal.record.root_generation;
                let fresh = FreshSeal::new(&root, generation, t, n)?;
                let record = serde_json::to_vec(&fresh.record)
                    .map_err(|e| Error::Internal(e.to_string()))?;
                let (new_id, sealed_root, texts) = (fresh.id, fresh.sealed_root, fresh.shares);
                let nonce = std::mem::take(nonce);
                *guard = Some(RekeyState::Verifying {
                    nonce,
                    new_shares: n,
                    new_threshold: t,
                    pending: Vec::new(),
                    new_id,
                    record,
                    sealed_root,
                    root_generation: generation,
                    base_revision: seal.revision,
                });
                tracing::info!(
                    "rekey: current shares complete; new shares handed out, awaiting verification"
                );
                let mut status = RekeyStatus::of(&guard, current_threshold);
                status.shares = texts;
                Ok(status)
            }
            RekeyState::Verifying {
                new_shares,
                new_threshold,
                pending,
                new_id,
                record,
                sealed_root,
                root_generation,
                base_revision,
                ..
            } => {
                add_share(pending, parse_share(&text, ShareBinding::Seal(new_id))?)?;
                drop(text);
                if pending.len() < usize::from(*new_threshold) {
                    return Ok(RekeyStatus::of(&guard, current_threshold));
                }
                let shares = std::mem::take(pending);
                let key = UnsealKey::from_material(shamir::combine(&shares)?);
                let binding = RootBinding {
                    seal_id: new_id.as_bytes(),
                    root_generation: *root_generation,
                    threshold: *new_threshold,
                    shares: *new_shares,
                };
                barrier::open_root_key(&key, sealed_root, seal.derivation, Some(&binding))
                    .map_err(|_| {
                        Error::UnsealFailed(
                            "the new shares do not reconstruct the new unseal key; submit them again"
                                .into(),
                        )
                    })?;
                let outcome = self
                    .store
                    .compare_and_set(SEAL_PATH, *base_revision, record)
                    .await;
                let (n, t) = (*new_shares, *new_threshold);
                *guard = None;
                match outcome {
                    Ok(_) => {}
                    Err(cipherd_store::Error::Conflict { .. }) => {
                        return Err(Error::FailedPrecondition(
                            "the seal record changed during the rekey; start over".into(),
                        ));
                    }
                    Err(e) => return Err(e.into()),
                }
                tracing::info!(
                    shares = n,
                    threshold = t,
                    "rekey done: the new shares are in force"
                );
                Ok(RekeyStatus {
                    phase: RekeyPhase::Done,
                    nonce: String::new(),
                    progress: 0,
                    required: 0,
                    new_shares: n,
                    new_threshold: t,
                    shares: Vec::new(),
                })
            }
        }
    }

    /// Opens the next root key of a rotation in progress.
    fn open_pending_root(
        &self,
        seal: &Seal,
        pending: &PendingRoot,
        unseal_key: &UnsealKey,
    ) -> Result<RootKey> {
        let sealed = base64::engine::general_purpose::STANDARD
            .decode(&pending.sealed_root_key)
            .map_err(|_| Error::Corrupt(SEAL_PATH.into()))?;
        let binding = seal
            .root_binding(pending.root_generation)
            .ok_or_else(|| Error::Corrupt(SEAL_PATH.into()))?;
        barrier::open_root_key(unseal_key, &sealed, seal.derivation, Some(&binding))
            .map_err(|_| Error::Corrupt(SEAL_PATH.into()))
    }

    /// Starts re-sealing every record under `generation` in the background
    /// (unless a re-seal is running).
    fn spawn_reseal(&self, barrier: Arc<Barrier>, generation: u32) {
        {
            let mut progress = self.rotation.lock().unwrap_or_else(|e| e.into_inner());
            if matches!(*progress, Rotation::Resealing { .. }) {
                return;
            }
            *progress = Rotation::Resealing {
                generation,
                resealed: 0,
            };
        }
        let store = Arc::clone(&self.store);
        let progress = Arc::clone(&self.rotation);
        let sealed = self.sealed_tx.subscribe();
        tokio::spawn(async move {
            let outcome = reseal(&*store, &barrier, generation, &progress, &sealed).await;
            drop(barrier);
            let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
            *p = match outcome {
                Ok(resealed) => {
                    tracing::info!(
                        generation,
                        resealed,
                        "root rotation done; the old root key is gone"
                    );
                    Rotation::Done {
                        generation,
                        resealed,
                    }
                }
                Err(e) => {
                    tracing::error!(generation, error = %e, "root rotation stopped; it resumes at the next unseal or RotateRoot");
                    Rotation::Stopped {
                        generation,
                        why: e.to_string(),
                    }
                }
            };
        });
    }

    /// One step of a root rotation: a new root key (the next generation) from a
    /// threshold of the current shares, then every record re-sealed under it
    /// in the background, and the old root dropped. The shares are needed
    /// because the new root is sealed under the unseal key, which exists only
    /// while they are combined. Safe to interrupt: until the last record is
    /// re-sealed the seal record holds both roots (under the same unseal key)
    /// and records of both generations open; the next unseal (or `RotateRoot`)
    /// resumes. Data keys and ciphertexts are unaffected. Callers need the
    /// `system` operation; the server must be unsealed.
    pub async fn rotate_root(&self, action: RotateAction) -> Result<RotateStatus> {
        let mut guard = self.lifecycle.lock().await;
        let seal = self.seal_record().await?.ok_or(Error::NotInitialized)?;
        let unsealed = self.unsealed()?;
        let threshold = seal.record.threshold;
        let (text, nonce) = match action {
            RotateAction::Status => return Ok(self.rotate_status(&guard, threshold)),
            RotateAction::Cancel => {
                if matches!(*guard, Some(RekeyState::RotateRoot { .. })) {
                    *guard = None;
                }
                return Ok(self.rotate_status(&guard, threshold));
            }
            RotateAction::Start => {
                if seal.record.format != 3 {
                    return Err(Error::FailedPrecondition(
                        "this seal (format 1) cannot rotate its root key".into(),
                    ));
                }
                if matches!(self.rotation_progress(), Rotation::Resealing { .. }) {
                    return Err(Error::FailedPrecondition(
                        "a root rotation is re-sealing; wait for it (RotateRoot status)".into(),
                    ));
                }
                let nonce =
                    hex::encode(cipherd_core::secret::SecretBytes::random(16)?.expose_secret());
                *guard = Some(RekeyState::RotateRoot {
                    nonce,
                    pending: Vec::new(),
                });
                tracing::info!("root rotation started: collecting shares");
                return Ok(self.rotate_status(&guard, threshold));
            }
            RotateAction::Share { text, nonce } => (text, nonce),
        };
        let Some(RekeyState::RotateRoot {
            nonce: ours,
            pending,
        }) = guard.as_mut()
        else {
            return Err(Error::FailedPrecondition(
                "no root rotation is collecting shares; start one first".into(),
            ));
        };
        if *ours != nonce {
            return Err(Error::InvalidArgument(
                "this share is for another root rotation (nonce mismatch)".into(),
            ));
        }
        add_share(pending, parse_share(&text, seal.binding())?)?;
        drop(text);
        if pending.len() < usize::from(threshold) {
            return Ok(self.rotate_status(&guard, threshold));
        }
        let shares = std::mem::take(pending);
        let unseal_key = UnsealKey::from_material(shamir::combine(&shares)?);
        // The shares must open the current root before anything is written.
        drop(self.open_root(&seal, &unseal_key)?);
        let (generation, next) = match &seal.record.rotation {
            Some(p) => (
                p.root_generation,
                self.open_pending_root(&seal, p, &unseal_key)?,
            ),
            None => {
                let generation = seal
                    .record
                    .root_generation
                    .checked_add(1)
                    .ok_or_else(|| Error::Internal("root generation overflow".into()))?;
                let next = RootKey::generate()?;
                let binding = seal
                    .root_binding(generation)
                    .ok_or_else(|| Error::Corrupt(SEAL_PATH.into()))?;
                let sealed =
                    barrier::seal_root_key_bound(&unseal_key, &next, seal.derivation, &binding)?;
                let record = SealRecord {
                    format: seal.record.format,
                    shares: seal.record.shares,
                    threshold: seal.record.threshold,
                    root_generation: seal.record.root_generation,
                    sealed_root_key: seal.record.sealed_root_key.clone(),
                    seal_id: seal.record.seal_id.clone(),
                    rotation: Some(PendingRoot {
                        root_generation: generation,
                        sealed_root_key: base64::engine::general_purpose::STANDARD.encode(sealed),
                    }),
                };
                let json =
                    serde_json::to_vec(&record).map_err(|e| Error::Internal(e.to_string()))?;
                match self
                    .store
                    .compare_and_set(SEAL_PATH, seal.revision, &json)
                    .await
                {
                    Ok(_) => {}
                    Err(cipherd_store::Error::Conflict { .. }) => {
                        *guard = None;
                        return Err(Error::FailedPrecondition(
                            "the seal record changed meanwhile; start over".into(),
                        ));
                    }
                    Err(e) => return Err(e.into()),
                }
                (generation, next)
            }
        };
        drop(unseal_key);
        if !unsealed.barrier.generations().contains(&generation) {
            unsealed
                .barrier
                .add_generation(&next, generation, seal.derivation)?;
        }
        drop(next);
        *guard = None;
        tracing::info!(
            generation,
            "root rotation: new root in place; re-sealing every record"
        );
        self.spawn_reseal(Arc::clone(&unsealed.barrier), generation);
        Ok(self.rotate_status(&guard, threshold))
    }

    fn rotation_progress(&self) -> Rotation {
        self.rotation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn rotate_status(&self, ceremony: &Option<RekeyState>, threshold: u8) -> RotateStatus {
        if let Some(RekeyState::RotateRoot { nonce, pending }) = ceremony {
            return RotateStatus {
                phase: RotatePhase::Collecting,
                nonce: nonce.clone(),
                progress: pending.len() as u8,
                required: threshold,
                ..RotateStatus::default()
            };
        }
        match self.rotation_progress() {
            Rotation::Idle => RotateStatus::default(),
            Rotation::Resealing {
                generation,
                resealed,
            } => RotateStatus {
                phase: RotatePhase::Resealing,
                root_generation: generation,
                resealed,
                ..RotateStatus::default()
            },
            Rotation::Done {
                generation,
                resealed,
            } => RotateStatus {
                phase: RotatePhase::Done,
                root_generation: generation,
                resealed,
                ..RotateStatus::default()
            },
            Rotation::Stopped { generation, why } => RotateStatus {
                phase: RotatePhase::Stopped,
                root_generation: generation,
                error: why,
                ..RotateStatus::default()
            },
        }
    }

    /// Opens the root key of `seal` with `unseal_key` (no state change).
    fn open_root(&self, seal: &Seal, unseal_key: &UnsealKey) -> Result<RootKey> {
        let sealed_root = base64::engine::general_purpose::STANDARD
            .decode(&seal.record.sealed_root_key)
            .map_err(|_| Error::Corrupt(SEAL_PATH.into()))?;
        let binding = seal.root_binding(seal.record.root_generation);
        barrier::open_root_key(unseal_key, &sealed_root, seal.derivation, binding.as_ref())
            .map_err(|_| {
                Error::UnsealFailed(
                    "the shares do not reconstruct the unseal key, or the seal record was altered; start over"
                        .into(),
                )
            })
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

/// While unsealed, on every replica: flushes key use statistics every
/// `stats_flush_interval`, and sweeps for due deletions and rotations every
/// `housekeeping_interval` ([`KeyManager::sweep`](crate::keys::KeyManager::sweep)).
/// Ends when the service seals. Failures are logged and retried next time.
async fn housekeeping(
    unsealed: std::sync::Weak<Unsealed>,
    lifecycle: crate::config::LifecycleParams,
) {
    let mut flush = tokio::time::interval(lifecycle.stats_flush_interval);
    let mut sweep = tokio::time::interval(lifecycle.housekeeping_interval);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Both intervals tick at once first: skip the stats flush then (nothing is
    // counted yet) but sweep, so a deletion due while every replica was down
    // happens at start.
    flush.tick().await;
    loop {
        let sweeping = tokio::select! {
            _ = flush.tick() => false,
            _ = sweep.tick() => true,
        };
        let Some(strong) = unsealed.upgrade() else {
            return;
        };
        if sweeping {
            let outcome = strong
                .keys
                .sweep(crate::keys::now_ms(), || unsealed.strong_count() > 1)
                .await;
            match outcome {
                Ok(r) if r.rotated + r.destroyed > 0 => tracing::info!(
                    keys = r.keys,
                    rotated = r.rotated,
                    destroyed = r.destroyed,
                    "key housekeeping"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "key housekeeping failed; retrying later"),
            }
        } else if let Err(e) = strong.keys.flush_stats().await {
            tracing::warn!(error = %e, "key use statistics not written; retrying later");
        }
    }
}

/// The longest a seal or a shutdown waits for the last use statistics.
const FINAL_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Dev mode: initialize with one share kept in the data dir, and unseal from it.
///
/// The file is loudly named INSECURE: whoever can read the data dir can unseal.
pub async fn dev_auto_unseal(core: &Core) -> Result<()> {
    let path = core.params.data_dir.join(DEV_SHARE_FILE);
    let status = core.status().await?;
    let token_path = core.params.data_dir.join(DEV_ROOT_TOKEN_FILE);
    let mut root_token = None;
    if !status.initialized {
        // The share file is durable before the seal record is committed: a kill
        // at any point leaves either an uninitialized store (a share file left
        // by the attempt is replaced by the next) or one this file unseals.
        let (shares, token) = core
            .init_with(1, 1, |shares| {
                let mut body = Zeroizing::new(String::with_capacity(DEV_SHARE_HEADER.len() + 128));
                body.push_str(DEV_SHARE_HEADER);
                body.push_str(&shares[0]);
                body.push('\n');
                replace_private(&path, body.as_bytes())
                    .map_err(|e| Error::Internal(format!("writing {}: {e}", path.display())))
            })
            .await?;
        shares.into_iter().for_each(|s| drop(Zeroizing::new(s)));
        root_token = Some(token);
        tracing::warn!(path = %path.display(), "dev mode: initialized; unseal share stored in the clear");
    }
    if !core.status().await?.sealed {
        return Ok(());
    }
    let text = read_private(&path).map_err(|e| {
        Error::FailedPrecondition(format!(
            "dev mode: cannot read {} ({e}); the server stays sealed",
            path.display()
        ))
    })?;
    let share = text
        .lines()
        .find(|l| !l.starts_with('#') && !l.trim().is_empty())
        .unwrap_or_default();
    core.unseal(Zeroizing::new(share.to_owned()), true).await?;
    tracing::warn!("dev mode: unsealed automatically; do not use for real data");
    // The root token file: written at init, and again with a new root token if it
    // was deleted since (dev mode only: whoever reads the data dir is root).
    if root_token.is_none() && !token_path.exists() {
        let unsealed = core.unsealed()?;
        let (token, _) = unsealed
            .auth
            .create_token(
                vec![auth_state::ROOT_POLICY.to_owned()],
                None,
                "root (dev)".to_owned(),
                "dev mode".to_owned(),
            )
            .await?;
        root_token = Some(token);
    }
    if let Some(token) = root_token {
        let mut body = Zeroizing::new(String::with_capacity(token.len() + 1));
        body.push_str(&token);
        body.push('\n');
        write_private(&token_path, body.as_bytes())
            .map_err(|e| Error::Internal(format!("writing {}: {e}", token_path.display())))?;
    }
    tracing::warn!(
        path = %token_path.display(),
        "dev mode: the root token is in this file; cipherctl --token-file PATH, or export CIPHERD_TOKEN=$(cat PATH)"
    );
    Ok(())
}

/// One unattended unseal attempt (`[seal] auto_unseal_file`, `auto_unseal_env` or
/// `transit_*`): submits the unseal shares found in the file or variable (words
/// starting with `cipherd-share:`, `#` lines ignored), or decrypted by another
/// cipherd, until the server unseals.
///
/// The risk is the point: whoever can read that file or the process's
/// environment can unseal this server's storage, so the shares must live
/// somewhere other than the storage (a Kubernetes Secret mounted read-only with
/// mode 0400, a secrets manager's agent). A file others may read is refused.
/// An uninitialized server is left alone; a failure leaves it sealed (health
/// says NOT_SERVING) for an operator to unseal by hand. On failure: whether a
/// later attempt may succeed (a transit cipherd that is unreachable or sealed)
/// and the error.
async fn auto_unseal_attempt(
    core: &Core,
    source: &crate::config::AutoUnseal,
) -> std::result::Result<(), (bool, Error)> {
    use crate::config::AutoUnseal;
    let fatal = |e: Error| (false, e);
    if !core.status().await.map_err(fatal)?.initialized {
        tracing::warn!("auto-unseal: the server is not initialized yet; run `cipherctl init`");
        return Ok(());
    }
    let (text, from) = match source {
        AutoUnseal::File(path) => {
            let text = read_private_checked(path).map_err(fatal)?;
            (text, format!("file {}", path.display()))
        }
        AutoUnseal::Transit(transit) => {
            let shares = transit_shares(transit).await.map_err(|(retry, e)| {
                let e = format!("auto-unseal through {}: {e}", transit.address);
                (retry, Error::FailedPrecondition(e))
            })?;
            let mut text = Zeroizing::new(String::new());
            for share in shares {
                text.push_str(&share);
                text.push('\n');
            }
            (
                text,
                format!("transit key {} at {}", transit.key, transit.address),
            )
        }
        AutoUnseal::Env(var) => {
            let text = std::env::var(var).map_err(|_| {
                fatal(Error::FailedPrecondition(format!(
                    "auto-unseal: ${var} is not set or not UTF-8"
                )))
            })?;
            (Zeroizing::new(text), format!("${var}"))
        }
    };
    let shares: Vec<Zeroizing<String>> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(str::split_whitespace)
        .filter(|w| w.starts_with("cipherd-share:"))
        .map(|w| Zeroizing::new(w.to_owned()))
        .collect();
    drop(text);
    if shares.is_empty() {
        return Err(fatal(Error::FailedPrecondition(format!(
            "auto-unseal: no unseal share in {from}"
        ))));
    }
    let mut status = core.status().await.map_err(fatal)?;
    for share in shares {
        if !status.sealed {
            break;
        }
        status = core.unseal(share, false).await.map_err(fatal)?;
    }
    if status.sealed {
        return Err(fatal(Error::FailedPrecondition(format!(
            "auto-unseal: {from} holds {} of the {} shares needed",
            status.progress, status.threshold
        ))));
    }
    tracing::info!(source = %from, "auto-unsealed");
    Ok(())
}

/// Auto-unseal at start. The first attempt is made before the server listens; a
/// transit auto-unseal whose cipherd is unreachable or sealed is then retried in
/// the background with backoff (1 s doubling to 30 s) until it succeeds, fails
/// for good (a refused token, a wrong key) or someone unseals by hand. Every other
/// failure leaves the server sealed, for an operator.
pub async fn start_auto_unseal(core: &Arc<Core>, source: &crate::config::AutoUnseal) {
    let mut backoff = std::time::Duration::from_secs(1);
    match auto_unseal_attempt(core, source).await {
        Ok(()) => return,
        Err((false, e)) => {
            // Stays sealed (health NOT_SERVING) for an operator to unseal by hand.
            tracing::error!(error = %e, "auto-unseal failed; the server stays sealed");
            return;
        }
        Err((true, e)) => tracing::warn!(error = %e, "auto-unseal failed; retrying"),
    }
    let core = Arc::clone(core);
    let source = source.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(std::time::Duration::from_secs(30));
            if !matches!(core.status().await, Ok(s) if s.sealed) {
                return;
            }
            match auto_unseal_attempt(&core, &source).await {
                Ok(()) => return,
                Err((true, e)) => tracing::warn!(
                    error = %e,
                    retry_in_s = backoff.as_secs(),
                    "auto-unseal failed; retrying"
                ),
                Err((false, e)) => {
                    tracing::error!(error = %e, "auto-unseal failed; the server stays sealed");
                    return;
                }
            }
        }
    });
}

/// Reads a file of unseal shares or a token, refusing one every user can read.
fn read_private_checked(path: &std::path::Path) -> Result<Zeroizing<String>> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(path)
            .map_err(|e| {
                Error::FailedPrecondition(format!("auto-unseal: {}: {e}", path.display()))
            })?
            .permissions()
            .mode();
        if mode & 0o004 != 0 {
            return Err(Error::FailedPrecondition(format!(
                "auto-unseal: {} is readable by every user (mode {:o}); make it 0400 or 0600",
                path.display(),
                mode & 0o777
            )));
        }
    }
    read_private(path)
        .map_err(|e| Error::FailedPrecondition(format!("auto-unseal: {}: {e}", path.display())))
}

/// The unseal shares of a transit auto-unseal: each line of the shares file that
/// is a text ciphertext, decrypted by the other cipherd under its key with the
/// associated data [`TRANSIT_UNSEAL_AAD`](crate::config::TRANSIT_UNSEAL_AAD).
/// On failure, whether retrying may help (the other cipherd is unreachable or
/// sealed) and what went wrong.
async fn transit_shares(
    t: &crate::config::TransitUnseal,
) -> std::result::Result<Vec<Zeroizing<String>>, (bool, String)> {
    let fail = |e: Error| (false, e.to_string());
    let token = read_private_checked(&t.token_file).map_err(fail)?;
    let ciphertexts = std::fs::read_to_string(&t.shares_file)
        .map_err(|e| (false, format!("{}: {e}", t.shares_file.display())))?;
    let tls = match &t.ca_file {
        Some(path) => Some(cipherd_client::TlsOptions::new(
            std::fs::read(path).map_err(|e| (false, format!("{}: {e}", path.display())))?,
        )),
        None => None,
    };
    let options = cipherd_client::ClientOptions {
        token: Some(token.trim().into()),
        tls,
        timeout: std::time::Duration::from_secs(10),
        connect_timeout: std::time::Duration::from_secs(5),
        ..Default::default()
    };
    drop(token);
    let client = cipherd_client::Client::connect_with(t.address.clone(), options)
        .await
        .map_err(|e| {
            let retry = e.is_retryable() || matches!(e, cipherd_client::Error::Connect(_));
            (retry, e.to_string())
        })?;
    let mut shares = Vec::new();
    for line in ciphertexts.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let reply = client
            .decrypt(
                &t.key,
                bytes::Bytes::copy_from_slice(line.as_bytes()),
                crate::config::TRANSIT_UNSEAL_AAD,
                bytes::Bytes::new(),
            )
            .await
            .map_err(|e| {
                let sealed = e.reason() == Some("SEALED");
                (e.is_retryable() || sealed, e.to_string())
            })?;
        let share = Zeroizing::new(
            String::from_utf8(reply.plaintext.to_vec())
                .map_err(|_| (false, "a decrypted share is not text".to_owned()))?,
        );
        let share = Zeroizing::new(share.trim().to_owned());
        if !share.starts_with("cipherd-share:") {
            return Err((false, "a decrypted line is not an unseal share".to_owned()));
        }
        shares.push(share);
    }
    if shares.is_empty() {
        return Err((
            false,
            format!("no ciphertext in {}", t.shares_file.display()),
        ));
    }
    Ok(shares)
}

/// File name of the dev-mode root token inside the data dir.
pub const DEV_ROOT_TOKEN_FILE: &str = "root-token.INSECURE";

/// File name of the dev-mode unseal share inside the data dir.
pub const DEV_SHARE_FILE: &str = "dev-unseal-share.INSECURE";

/// The comment lines at the top of the dev share file; the share follows.
const DEV_SHARE_HEADER: &str = "# INSECURE: cipherd dev-mode unseal share. Anyone who can read this file can\n\
     # unseal this server. Never use --dev for real data.\n";

/// Reads a small secret file into a zeroizing buffer sized up front, so reading
/// never reallocates (which would leave copies in freed memory).
fn read_private(path: &std::path::Path) -> std::io::Result<Zeroizing<String>> {
    let mut file = std::fs::File::open(path)?;
    let len = usize::try_from(file.metadata()?.len()).unwrap_or(usize::MAX);
    if len > 64 << 10 {
        return Err(std::io::Error::other("larger than a share file can be"));
    }
    let mut text = Zeroizing::new(String::with_capacity(len + 1));
    file.read_to_string(&mut text)?;
    Ok(text)
}

/// Writes `body` to `path` (mode 0600) so that `path` holds either its old
/// content or all of `body`, durably: a temporary file, synced, renamed over
/// `path`, and the directory synced.
fn replace_private(path: &std::path::Path, body: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    write_private(&tmp, body)?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // in tests a panic is the failure report
mod tests {
    use base64::engine::general_purpose::STANDARD as BASE64;
    use cipherd_core::{
        KeyType,
        aead::AeadKey,
        ciphertext::{self, Ciphertext, Encoding},
        keyring::{DERIVED_KEY_LABEL, KeyName, KeyVersion},
    };
    use cipherd_store::SqliteStore;

    use super::*;

    async fn core() -> Arc<Core> {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().await.unwrap());
        Core::new(store, Params::for_data_dir("unused", false))
    }

    fn refused(r: Result<SealStatus>) -> String {
        match r {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("not refused: {other:?}"),
        }
    }

    /// Shares of another initialization, made-up well-formed shares and v1 shares
    /// are refused when submitted and leave the progress alone; the real shares
    /// still unseal afterwards. Before shares were bound to their seal, a foreign
    /// share counted (progress 2) and then made the whole set fail, discarding the
    /// real share already entered.
    #[tokio::test]
    async fn shares_of_another_seal_are_refused_without_touching_progress() {
        let core = core().await;
        let shares = core.init(3, 2).await.unwrap().0;
        assert!(shares.iter().all(|s| s.starts_with("cipherd-share:v2:")));
        let foreign = core_init_elsewhere().await;
        assert_eq!(
            core.unseal(shares[0].clone(), false)
                .await
                .unwrap()
                .progress,
            1
        );

        // Made up: the right syntax, random bytes and check.
        let mut raw = [0u8; 41];
        raw.copy_from_slice(
            cipherd_core::secret::SecretBytes::random(41)
                .unwrap()
                .expose_secret(),
        );
        raw[0] = 2;
        let made_up = format!("cipherd-share:v2:{}", hex::encode(raw));
        // A share of a v1 seal (any v1 text is well-formed by construction).
        let material = KeyMaterial::generate().unwrap();
        let v1 = shamir::split(&material, 2, 2).unwrap()[1].to_text(ShareBinding::Unbound);

        for (what, bad) in [
            ("foreign", foreign[1].clone()),
            ("made up", made_up),
            ("v1", v1.to_string()),
        ] {
            let msg = refused(core.unseal(bad.clone(), false).await);
            assert!(msg.starts_with("unseal share refused"), "{what}: {msg}");
            assert!(
                !msg.contains(&bad[20..40]),
                "{what}: the message echoes the share"
            );
            let status = core.status().await.unwrap();
            assert_eq!((status.sealed, status.progress), (true, 1), "{what}");
        }
        let status = core.unseal(shares[2].clone(), false).await.unwrap();
        assert!(!status.sealed);
    }

    async fn core_init_elsewhere() -> Vec<String> {
        core().await.init(3, 2).await.unwrap().0
    }

    /// A data dir initialized by the previous release (seal record format 1, V1
    /// derivations for the barrier and the root-key seal, v1 shares, a derived
    /// key version without a `derivation` field) still unseals with its v1 shares,
    /// refuses v2 shares, and decrypts its old ciphertext.
    #[tokio::test]
    async fn a_seal_record_of_the_first_format_still_unseals_and_decrypts() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().await.unwrap());
        let unseal_material = KeyMaterial::generate().unwrap();
        let split = shamir::split(&unseal_material, 2, 3).unwrap();
        let unseal_key = UnsealKey::from_material(unseal_material);
        let root = RootKey::generate().unwrap();
        let sealed_root = barrier::seal_root_key(&unseal_key, &root, Derivation::V1).unwrap();
        let record = serde_json::json!({
            "format": 1,
            "shares": 3,
            "threshold": 2,
            "root_generation": 1,
            "sealed_root_key": BASE64.encode(sealed_root),
        });
        store
            .create(SEAL_PATH, &serde_json::to_vec(&record).unwrap())
            .await
            .unwrap();

        // A derived key as the previous release stored it, and one of its ciphertexts.
        let material = [0x42u8; 32];
        let key_record = serde_json::json!({
            "format": 1, "name": "tenants", "key_type": "xaes-256-gcm", "derived": true,
            "exportable": false, "deletion_allowed": false, "created_at_ms": 0,
            "latest_version": 1, "min_decryption_version": 1, "min_encryption_version": 0,
            "min_available_version": 1,
            "versions": [{"version": 1, "created_at_ms": 0, "material": BASE64.encode(material)}],
        });
        let old_barrier = Barrier::new(&root, 1, Derivation::V1).unwrap();
        let sealed_key = old_barrier
            .seal("keys/tenants", &serde_json::to_vec(&key_record).unwrap())
            .unwrap();
        store.create("keys/tenants", &sealed_key).await.unwrap();
        let working = KeyMaterial::from_slice(&material)
            .unwrap()
            .derive(Derivation::V1, DERIVED_KEY_LABEL, b"tenant-1")
            .unwrap();
        let old_ct = ciphertext::seal(
            &AeadKey::new(KeyType::Xaes256Gcm, &working).unwrap(),
            KeyVersion::FIRST,
            b"row 1",
            b"written by the old release",
            Encoding::Binary,
        )
        .unwrap();

        let core = Core::new(Arc::clone(&store), Params::for_data_dir("unused", false));
        let id = SealId::generate().unwrap();
        let v2 = split[0].to_text(ShareBinding::Seal(&id));
        let msg = refused(core.unseal(v2.to_string(), false).await);
        assert!(
            msg.contains("accepts cipherd-share:v1: shares only"),
            "{msg}"
        );
        assert_eq!(core.status().await.unwrap().progress, 0);

        let first = split[2].to_text(ShareBinding::Unbound);
        assert_eq!(
            core.unseal(first.to_string(), false)
                .await
                .unwrap()
                .progress,
            1
        );
        let second = split[0].to_text(ShareBinding::Unbound);
        assert!(!core.unseal(second.to_string(), false).await.unwrap().sealed);

        let keys = &core.unsealed().unwrap().keys;
        let loaded = keys.get(&KeyName::new("tenants").unwrap()).await.unwrap();
        let aead = loaded.working_key(KeyVersion::FIRST, b"tenant-1").unwrap();
        let ct = Ciphertext::parse(&old_ct).unwrap();
        assert_eq!(
            ciphertext::open(&aead, &ct, b"row 1").unwrap(),
            b"written by the old release"
        );
        // The seal record was left as it was.
        let stored = store.get(SEAL_PATH).await.unwrap().unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&stored.value).unwrap(),
            record
        );
    }

    #[tokio::test]
    async fn new_seal_records_use_format_3_and_reject_mixed_fields() {
        let core = core().await;
        core.init(1, 1).await.unwrap();
        let stored = core.store.get(SEAL_PATH).await.unwrap().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&stored.value).unwrap();
        assert_eq!(json["format"], 3);
        let id = BASE64.decode(json["seal_id"].as_str().unwrap()).unwrap();
        assert_eq!(id.len(), shamir::SEAL_ID_LEN);

        // Format 3 without an id, or format 1 with one, is corrupt.
        for mutate in [
            |j: &mut serde_json::Value| {
                j.as_object_mut().unwrap().remove("seal_id");
            },
            |j: &mut serde_json::Value| j["format"] = 1.into(),
            |j: &mut serde_json::Value| j["seal_id"] = BASE64.encode([0u8; 31]).into(),
        ] {
            let mut bad = json.clone();
            mutate(&mut bad);
            let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().await.unwrap());
            store
                .create(SEAL_PATH, &serde_json::to_vec(&bad).unwrap())
                .await
                .unwrap();
            let other = Core::new(store, Params::for_data_dir("unused", false));
            assert!(matches!(other.status().await, Err(Error::Corrupt(_))));
        }
    }

    /// A store holding `record` (JSON) as its seal record, and a core over it.
    async fn core_with_seal(record: &serde_json::Value) -> (Arc<dyn Store>, Arc<Core>) {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().await.unwrap());
        store
            .create(SEAL_PATH, &serde_json::to_vec(record).unwrap())
            .await
            .unwrap();
        let core = Core::new(Arc::clone(&store), Params::for_data_dir("unused", false));
        (store, core)
    }

    async fn unseal_with(core: &Core, shares: &[String]) -> Result<SealStatus> {
        let mut status = core.status().await?;
        for share in shares {
            status = core.unseal(share.clone(), false).await?;
        }
        Ok(status)
    }

    /// The plain-JSON parameters of a format-3 seal record are bound to the
    /// root key: changing the threshold, the share count or the root generation
    /// (to values that still look valid) makes the right shares fail to unseal.
    #[tokio::test]
    async fn altering_the_seal_parameters_makes_unsealing_fail() {
        let core = core().await;
        let shares = core.init(5, 3).await.unwrap().0;
        let stored = core.store.get(SEAL_PATH).await.unwrap().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&stored.value).unwrap();
        let (_, same) = core_with_seal(&json).await;
        assert!(!unseal_with(&same, &shares[..3]).await.unwrap().sealed);
        for (field, value) in [("threshold", 2), ("shares", 4), ("root_generation", 2)] {
            let mut bad = json.clone();
            bad[field] = value.into();
            let (_, other) = core_with_seal(&bad).await;
            let need = if field == "threshold" { 2 } else { 3 };
            match unseal_with(&other, &shares[..need]).await {
                Err(Error::UnsealFailed(_)) => {}
                other => panic!("{field} = {value}: {other:?}"),
            }
        }
    }

    /// A seal record of format 2 (root key not bound) unseals with its shares
    /// and is rewritten as format 3, which the same shares unseal again and
    /// whose parameters are then bound.
    #[tokio::test]
    async fn a_format_2_seal_record_is_bound_when_it_unseals() {
        let unseal_material = KeyMaterial::generate().unwrap();
        let split = shamir::split(&unseal_material, 2, 3).unwrap();
        let unseal_key = UnsealKey::from_material(unseal_material);
        let root = RootKey::generate().unwrap();
        let id = SealId::generate().unwrap();
        let sealed_root = barrier::seal_root_key(&unseal_key, &root, Derivation::V2).unwrap();
        let record = serde_json::json!({
            "format": 2,
            "shares": 3,
            "threshold": 2,
            "root_generation": 1,
            "sealed_root_key": BASE64.encode(sealed_root),
            "seal_id": BASE64.encode(id.as_bytes()),
        });
        let shares: Vec<String> = split
            .iter()
            .map(|s| s.to_text(ShareBinding::Seal(&id)).to_string())
            .collect();
        let (store, core) = core_with_seal(&record).await;
        // Something under the barrier, to read back after the upgrade.
        let barrier = Barrier::new(&root, 1, Derivation::V2).unwrap();
        store
            .create(
                "sys/probe",
                &barrier.seal("sys/probe", b"still here").unwrap(),
            )
            .await
            .unwrap();
        assert!(!unseal_with(&core, &shares[..2]).await.unwrap().sealed);

        let stored = store.get(SEAL_PATH).await.unwrap().unwrap();
        let upgraded: serde_json::Value = serde_json::from_slice(&stored.value).unwrap();
        assert_eq!(upgraded["format"], 3);
        assert_eq!(upgraded["seal_id"], record["seal_id"]);
        assert_ne!(upgraded["sealed_root_key"], record["sealed_root_key"]);

        let (again_store, again) = core_with_seal(&upgraded).await;
        again_store
            .create("sys/probe", &stored_probe(&store).await)
            .await
            .unwrap();
        assert!(!unseal_with(&again, &shares[1..]).await.unwrap().sealed);
        let mut bad = upgraded.clone();
        bad["threshold"] = 3.into();
        let (_, tampered) = core_with_seal(&bad).await;
        assert!(matches!(
            unseal_with(&tampered, &shares).await,
            Err(Error::UnsealFailed(_))
        ));
        // The same root: what the old barrier sealed still opens.
        let opened = barrier
            .open("sys/probe", &stored_probe(&store).await)
            .unwrap();
        assert_eq!(opened.expose_secret(), b"still here");
    }

    async fn stored_probe(store: &Arc<dyn Store>) -> Vec<u8> {
        store.get("sys/probe").await.unwrap().unwrap().value
    }

    fn share(text: &str, nonce: &str) -> RekeyAction {
        RekeyAction::Share {
            text: Zeroizing::new(text.to_owned()),
            nonce: nonce.to_owned(),
        }
    }

    /// A rekey from 2-of-3 to 3-of-5: the current shares are collected (a
    /// share sent with another nonce is refused), the new shares handed out
    /// once, the current shares keep unsealing until a threshold of the new
    /// ones is verified, and afterwards the old shares are refused while the
    /// new ones unseal the same root (a key created before still reads).
    #[tokio::test]
    async fn a_rekey_replaces_the_shares_only_once_the_new_ones_are_verified() {
        let core = core().await;
        let old = core.init(3, 2).await.unwrap().0;
        unseal_with(&core, &old[..2]).await.unwrap();
        let name = KeyName::new("before-rekey").unwrap();
        core.unsealed()
            .unwrap()
            .keys
            .create(&name, Default::default())
            .await
            .unwrap();

        let started = core
            .rekey(RekeyAction::Start {
                shares: 5,
                threshold: 3,
            })
            .await
            .unwrap();
        assert_eq!(started.phase, RekeyPhase::Collecting);
        assert_eq!((started.progress, started.required), (0, 2));
        let nonce = started.nonce.clone();
        assert_eq!(nonce.len(), 32);
        assert!(matches!(
            core.rekey(share(&old[0], "0000")).await,
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(
            core.rekey(share(&old[0], &nonce)).await.unwrap().progress,
            1
        );
        assert!(matches!(
            core.rekey(share(&old[0], &nonce)).await,
            Err(Error::InvalidArgument(_))
        ));
        let handed = core.rekey(share(&old[2], &nonce)).await.unwrap();
        assert_eq!(handed.phase, RekeyPhase::Verifying);
        assert_eq!((handed.progress, handed.required), (0, 3));
        let new = handed.shares;
        assert_eq!(new.len(), 5);
        assert!(
            core.rekey(RekeyAction::Status)
                .await
                .unwrap()
                .shares
                .is_empty()
        );

        // Not yet in force: the current shares still unseal a second server.
        let stored = core.store.get(SEAL_PATH).await.unwrap().unwrap();
        let (_, second) = core_with_seal(&serde_json::from_slice(&stored.value).unwrap()).await;
        assert!(!unseal_with(&second, &old[1..]).await.unwrap().sealed);

        // An old share is not one of the new ones.
        assert!(matches!(
            core.rekey(share(&old[1], &nonce)).await,
            Err(Error::InvalidArgument(_))
        ));
        for s in &new[1..3] {
            core.rekey(share(s, &nonce)).await.unwrap();
        }
        let done = core.rekey(share(&new[4], &nonce)).await.unwrap();
        assert_eq!(done.phase, RekeyPhase::Done);
        assert_eq!((done.new_shares, done.new_threshold), (5, 3));
        let status = core.status().await.unwrap();
        assert_eq!((status.shares, status.threshold), (5, 3));
        assert_eq!(
            core.rekey(RekeyAction::Status).await.unwrap().phase,
            RekeyPhase::None
        );

        // In force: on the same storage, old shares are refused, new ones unseal.
        let reopened = Core::new(
            Arc::clone(&core.store),
            Params::for_data_dir("unused", false),
        );
        assert!(matches!(
            reopened.unseal(old[0].clone(), false).await,
            Err(Error::InvalidArgument(_))
        ));
        assert!(!unseal_with(&reopened, &new[2..5]).await.unwrap().sealed);
        reopened.unsealed().unwrap().keys.get(&name).await.unwrap();
    }

    /// A cancelled rekey leaves the seal record as it was; a rekey needs the
    /// server unsealed; a format-1 seal cannot be rekeyed.
    #[tokio::test]
    async fn a_cancelled_rekey_changes_nothing_and_a_sealed_server_refuses_one() {
        let core = core().await;
        let old = core.init(3, 2).await.unwrap().0;
        assert!(matches!(
            core.rekey(RekeyAction::Status).await,
            Err(Error::Sealed)
        ));
        unseal_with(&core, &old[..2]).await.unwrap();
        let before = core.store.get(SEAL_PATH).await.unwrap().unwrap();
        let nonce = core
            .rekey(RekeyAction::Start {
                shares: 1,
                threshold: 1,
            })
            .await
            .unwrap()
            .nonce;
        core.rekey(share(&old[0], &nonce)).await.unwrap();
        let cancelled = core.rekey(RekeyAction::Cancel).await.unwrap();
        assert_eq!(cancelled.phase, RekeyPhase::None);
        assert!(matches!(
            core.rekey(share(&old[1], &nonce)).await,
            Err(Error::FailedPrecondition(_))
        ));
        assert_eq!(core.store.get(SEAL_PATH).await.unwrap().unwrap(), before);
        assert!(matches!(
            core.rekey(RekeyAction::Start {
                shares: 2,
                threshold: 3
            })
            .await,
            Err(Error::InvalidArgument(_))
        ));
    }

    /// Polls RotateRoot's status until the re-seal is no longer running.
    async fn rotation_settles(core: &Core) -> RotateStatus {
        for _ in 0..10_000 {
            let status = core.rotate_root(RotateAction::Status).await.unwrap();
            if status.phase != RotatePhase::Resealing {
                return status;
            }
            tokio::task::yield_now().await;
        }
        panic!("the re-seal never ended");
    }

    /// The generations of every stored record but the seal record.
    async fn generations_in(store: &Arc<dyn Store>) -> Vec<Option<u32>> {
        let mut out = Vec::new();
        for (path, record) in store.scan("", None, 10_000).await.unwrap() {
            if path != SEAL_PATH {
                out.push(barrier::sealed_generation(&record.value));
            }
        }
        out
    }

    async fn seal_json(store: &Arc<dyn Store>) -> serde_json::Value {
        serde_json::from_slice(&store.get(SEAL_PATH).await.unwrap().unwrap().value).unwrap()
    }

    /// RotateRoot from a threshold of the shares: every record ends under
    /// generation 2, the seal record names generation 2 and no rotation, keys
    /// and tokens still work, and the same shares unseal a restarted server.
    #[tokio::test]
    async fn a_root_rotation_reseals_every_record_under_the_next_generation() {
        let core = core().await;
        let (shares, _root_token) = core.init(3, 2).await.unwrap();
        unseal_with(&core, &shares[..2]).await.unwrap();
        let name = KeyName::new("patients").unwrap();
        let keys = &core.unsealed().unwrap().keys;
        keys.create(&name, Default::default()).await.unwrap();
        keys.update(&name, |k| {
            k.rotate(0)?;
            Ok(true)
        })
        .await
        .unwrap();
        assert!(
            generations_in(&core.store)
                .await
                .iter()
                .all(|g| *g == Some(1))
        );

        let nonce = core.rotate_root(RotateAction::Start).await.unwrap().nonce;
        let wrong = core
            .rotate_root(RotateAction::Share {
                text: Zeroizing::new(shares[0].clone()),
                nonce: "other".into(),
            })
            .await;
        assert!(matches!(wrong, Err(Error::InvalidArgument(_))));
        for share in &shares[1..] {
            core.rotate_root(RotateAction::Share {
                text: Zeroizing::new(share.clone()),
                nonce: nonce.clone(),
            })
            .await
            .unwrap();
        }
        let done = rotation_settles(&core).await;
        assert_eq!(done.phase, RotatePhase::Done, "{done:?}");
        assert_eq!(done.root_generation, 2);
        let gens = generations_in(&core.store).await;
        assert!(done.resealed >= gens.len() as u64 && !gens.is_empty());
        assert!(gens.iter().all(|g| *g == Some(2)), "{gens:?}");
        let json = seal_json(&core.store).await;
        assert_eq!(json["root_generation"], 2);
        assert!(json.get("rotation").is_none());
        assert_eq!(core.unsealed().unwrap().barrier.generations(), vec![2]);
        core.unsealed().unwrap().keys.get(&name).await.unwrap();

        let again = Core::new(
            Arc::clone(&core.store),
            Params::for_data_dir("unused", false),
        );
        assert!(!unseal_with(&again, &shares[..2]).await.unwrap().sealed);
        let loaded = again.unsealed().unwrap().keys.get(&name).await.unwrap();
        assert_eq!(loaded.key().latest_version().get(), 2);
    }

    /// A rotation interrupted after the next root was stored and some records
    /// were re-sealed: every record still opens, and the next unseal resumes
    /// and finishes the re-seal.
    #[tokio::test]
    async fn an_interrupted_root_rotation_resumes_at_the_next_unseal() {
        let core = core().await;
        let (shares, _) = core.init(3, 2).await.unwrap();
        unseal_with(&core, &shares[..2]).await.unwrap();
        let name = KeyName::new("patients").unwrap();
        core.unsealed()
            .unwrap()
            .keys
            .create(&name, Default::default())
            .await
            .unwrap();
        let store = Arc::clone(&core.store);
        drop(core);

        // What a crash leaves: the next root in the seal record, the key record
        // already re-sealed under generation 2, the rest still under 1.
        let mut json = seal_json(&store).await;
        let id =
            SealId::from_slice(&BASE64.decode(json["seal_id"].as_str().unwrap()).unwrap()).unwrap();
        let parsed: Vec<Share> = shares[..2]
            .iter()
            .map(|s| Share::parse(s, ShareBinding::Seal(&id)).unwrap())
            .collect();
        let unseal_key = UnsealKey::from_material(shamir::combine(&parsed).unwrap());
        let binding = |g| RootBinding {
            seal_id: id.as_bytes(),
            root_generation: g,
            threshold: 2,
            shares: 3,
        };
        let sealed_root = BASE64
            .decode(json["sealed_root_key"].as_str().unwrap())
            .unwrap();
        let root =
            barrier::open_root_key(&unseal_key, &sealed_root, Derivation::V2, Some(&binding(1)))
                .unwrap();
        let next = RootKey::generate().unwrap();
        let sealed_next =
            barrier::seal_root_key_bound(&unseal_key, &next, Derivation::V2, &binding(2)).unwrap();
        json["rotation"] = serde_json::json!({
            "root_generation": 2,
            "sealed_root_key": BASE64.encode(sealed_next),
        });
        let rec = store.get(SEAL_PATH).await.unwrap().unwrap();
        store
            .compare_and_set(SEAL_PATH, rec.revision, &serde_json::to_vec(&json).unwrap())
            .await
            .unwrap();
        let both = Barrier::new(&root, 1, Derivation::V2).unwrap();
        both.add_generation(&next, 2, Derivation::V2).unwrap();
        let key_rec = store.get("keys/patients").await.unwrap().unwrap();
        let plain = both.open("keys/patients", &key_rec.value).unwrap();
        store
            .compare_and_set(
                "keys/patients",
                key_rec.revision,
                &both.seal("keys/patients", plain.expose_secret()).unwrap(),
            )
            .await
            .unwrap();
        let gens = generations_in(&store).await;
        assert!(
            gens.contains(&Some(1)) && gens.contains(&Some(2)),
            "{gens:?}"
        );

        let restarted = Core::new(Arc::clone(&store), Params::for_data_dir("unused", false));
        assert!(!unseal_with(&restarted, &shares[1..]).await.unwrap().sealed);
        restarted.unsealed().unwrap().keys.get(&name).await.unwrap();
        let done = rotation_settles(&restarted).await;
        assert_eq!(done.phase, RotatePhase::Done, "{done:?}");
        assert!(generations_in(&store).await.iter().all(|g| *g == Some(2)));
        assert_eq!(seal_json(&store).await["root_generation"], 2);
        // A rekey is refused while a rotation is pending, allowed after.
        restarted
            .rekey(RekeyAction::Start {
                shares: 3,
                threshold: 2,
            })
            .await
            .unwrap();
    }
}
