//! Crash safety (issue #8): the real binary is killed with SIGKILL at random
//! moments while several clients create, rotate, reconfigure and delete keys,
//! create tokens and encrypt; after every restart and unseal, everything the
//! server acknowledged must still be there, unchanged:
//!
//! - every acknowledged key exists (GetKey) with every acknowledged version, and
//!   its acknowledged `deletion_allowed`; an acknowledged deletion stays deleted;
//! - each version's material is the original one: canary ciphertexts, encrypted
//!   under that specific version before the kill, decrypt to their plaintext, and
//!   for exportable keys ExportKey gives the same material as right after the
//!   version was made;
//! - a 96-bit-nonce version's durable usage count is at least the number of
//!   encryptions acknowledged under it (a count that went backwards would let
//!   nonces repeat);
//! - every acknowledged token authenticates until its TTL, and not after.
//!
//! An operation whose reply never came (the kill cut it off) may or may not have
//! happened; the check accepts either outcome and then adopts what it finds.
//!
//! The server runs outside dev mode: initialized once, then unsealed through the
//! Unseal RPC with two of three shares after every restart (the production path;
//! dev mode's share file is covered by `process.rs`). SQLite (a data dir) and
//! PostgreSQL (a fresh database) each get `CIPHERD_CRASH_KILLS` kills (default
//! 100; `make soak` runs 1,000); `CIPHERD_CRASH_SEED` replays a run's choices
//! (operations, kill moments, shares; the interleaving with the server's timing
//! differs). The figures (kills, restarts, acknowledged operations, checks,
//! losses, time) are printed.
//!
//! PostgreSQL needs a server: `make test` starts it (`scripts/ensure-postgres.sh`).
#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

#[path = "support/daemon.rs"]
mod daemon;

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use cipherd_client::{ClientOptions, Token};
use cipherd_e2e::{ALL_KEY_TYPES, Client, Code, Error, HEADER_LEN, TestRng, nonce_len, pb, reply};
use cipherd_test_support::postgres::TestDatabase;

use crate::daemon::Daemon;

/// Writes a line of figures to the process's stderr. Not `eprintln!`: the test
/// harness captures that for passing tests, and these figures belong in every
/// CI log.
macro_rules! report {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut stderr = std::io::stderr().lock();
        let _ = writeln!(stderr, $($arg)*);
    }};
}

/// Concurrent client tasks, each the only writer of its own keys.
const WORKERS: usize = 4;
/// Keys a worker keeps; at this many it deletes one before creating another.
const KEYS_PER_WORKER: usize = 3;
/// The kill comes at a uniformly random moment this long after the workers start.
const KILL_SPAN: Duration = Duration::from_millis(400);
/// Token lifetimes are drawn from this range of seconds.
const TOKEN_TTL_S: std::ops::Range<u64> = 2..20;
/// Deletions remembered per worker for the "stays deleted" check.
const DELETED_KEPT: usize = 6;
/// DeleteKey destroys at once (no waiting period), so that an acknowledged
/// deletion means the material is gone: the two writes behind it (the schedule,
/// then the destruction) are both under the kills.
const KEYS_CONFIG: &str = "[keys]\ndeletion_waiting_period_s = 0\n";
/// The policy of the tokens the workers create.
const APP_POLICY: &str = "crash-app";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_on_sqlite_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    crash_loop("sqlite", dir.path(), KEYS_CONFIG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_on_postgres_loses_nothing_acknowledged() {
    let db = TestDatabase::create("e2e_crash").await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{KEYS_CONFIG}[storage]\nbackend = \"postgres\"\nurl = {:?}\n",
        db.url()
    );
    crash_loop("postgres", dir.path(), &config).await;
}

/// Kills the server `CIPHERD_CRASH_KILLS` times under load and checks everything
/// acknowledged after each restart; panics on the first loss.
async fn crash_loop(backend: &str, work: &Path, config: &str) {
    let kills: u32 = env_or("CIPHERD_CRASH_KILLS", 100);
    let seed: u64 = env_or(
        "CIPHERD_CRASH_SEED",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    report!("crash[{backend}]: seed {seed} (CIPHERD_CRASH_SEED={seed} replays it), {kills} kills");
    let mut rng = TestRng::new(seed);
    let data = work.join("data");
    let started = Instant::now();

    // First start: Init, the app policy.
    let daemon = Daemon::start_with(work, &data, &[], config, &[]).await;
    let anonymous = daemon.connect(ClientOptions::default()).await;
    let init = reply(
        anonymous
            .system()
            .init(pb::InitRequest {
                shares: 3,
                threshold: 2,
            })
            .await,
    )
    .unwrap();
    let root = Token::from(init.root_token.as_str());
    let shares = init.shares;
    unseal(&anonymous, &shares, &mut rng).await;
    let admin = daemon
        .connect(ClientOptions::default().with_token(root.clone()))
        .await;
    admin
        .write_policy(
            APP_POLICY,
            "[[rule]]\nkeys = [\"crash-*\"]\noperations = [\"encrypt\"]\n",
        )
        .await
        .unwrap();
    drop((anonymous, admin));

    let mut workers: Vec<Worker> = (0..WORKERS)
        .map(|id| Worker::new(id, rng.next_u64()))
        .collect();
    let mut figures = Figures::default();
    let mut daemon = daemon;
    for kill in 0..kills {
        // Load, and a kill at a random moment of it.
        let killed = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for mut worker in workers.drain(..) {
            let client = daemon.connect(no_retries(&root)).await;
            let killed = Arc::clone(&killed);
            tasks.push(tokio::spawn(async move {
                worker.work(&client, &killed).await;
                worker
            }));
        }
        // Not a readiness wait: the moment of the kill is what is under test.
        let delay = KILL_SPAN.mul_f64(rng.below(1_000) as f64 / 1_000.0);
        tokio::time::sleep(delay).await;
        killed.store(true, Ordering::SeqCst);
        let log = daemon.kill().await;
        figures.kills += 1;
        for task in tasks {
            match task.await {
                Ok(worker) => workers.push(worker),
                Err(e) => panic!(
                    "crash[{backend}] seed {seed}, kill {kill}: a worker failed before the kill: {e}\n\
                     server log:\n{log}"
                ),
            }
        }

        // Restart on the same storage, unseal, check.
        daemon = Daemon::start_with(work, &data, &[], config, &[]).await;
        figures.restarts += 1;
        let anonymous = daemon.connect(ClientOptions::default()).await;
        let status = anonymous.status().await.unwrap();
        assert!(
            status.initialized && status.sealed,
            "after kill {kill}: {status:?}"
        );
        unseal(&anonymous, &shares, &mut rng).await;
        let mut checks = Vec::new();
        for mut worker in workers.drain(..) {
            let client = daemon
                .connect(ClientOptions::default().with_token(root.clone()))
                .await;
            checks.push(tokio::spawn(async move {
                let report = worker.check(&client).await;
                (worker, report)
            }));
        }
        let mut losses = Vec::new();
        for check in checks {
            let (worker, report) = check.await.unwrap();
            figures.add(&report);
            losses.extend(report.losses);
            workers.push(worker);
        }
        workers.sort_by_key(|w| w.id);
        if (kill + 1) % 100 == 0 && kill + 1 < kills {
            report!(
                "crash[{backend}]: {}/{kills} kills, {} losses, {:.1} s",
                kill + 1,
                figures.losses,
                started.elapsed().as_secs_f64()
            );
        }
        if !losses.is_empty() {
            figures.print(backend, started.elapsed(), &workers);
            panic!(
                "crash[{backend}] seed {seed}, after kill {kill} (at {delay:?}): {} losses:\n{}",
                losses.len(),
                losses.join("\n")
            );
        }
    }
    let elapsed = started.elapsed();
    daemon.terminate().await;
    figures.print(backend, elapsed, &workers);
    assert_eq!(figures.kills, kills);
    assert_eq!(figures.losses, 0);
    // The run must have done real work, or it proves nothing.
    let acked = workers
        .iter()
        .fold(Acked::default(), |a, w| a.plus(&w.acked));
    assert!(
        acked.creations > 0
            && acked.rotations > 0
            && acked.configs > 0
            && acked.tokens > 0
            && acked.encryptions > 0,
        "{acked:?}"
    );
    assert!(figures.canaries > 0 && figures.tokens_checked > 0 && figures.versions > 0);
}

/// What the checks found, per restart or summed.
#[derive(Debug, Default)]
struct Figures {
    kills: u32,
    restarts: u32,
    keys: u64,
    versions: u64,
    canaries: u64,
    exported: u64,
    tokens_checked: u64,
    tokens_expired: u64,
    unacked_applied: u64,
    unacked_lost: u64,
    losses: u64,
}

impl Figures {
    fn add(&mut self, report: &Report) {
        self.keys += report.keys;
        self.versions += report.versions;
        self.canaries += report.canaries;
        self.exported += report.exported;
        self.tokens_checked += report.tokens_checked;
        self.tokens_expired += report.tokens_expired;
        self.unacked_applied += report.unacked_applied;
        self.unacked_lost += report.unacked_lost;
        self.losses += report.losses.len() as u64;
    }

    fn print(&self, backend: &str, elapsed: Duration, workers: &[Worker]) {
        let acked = workers
            .iter()
            .fold(Acked::default(), |a, w| a.plus(&w.acked));
        report!(
            "crash[{backend}]: {} kills, {} restarts, {} losses in {:.1} s\n\
             crash[{backend}]: acknowledged: {} key creations, {} rotations, {} config changes, \
             {} deletions, {} tokens, {} encryptions\n\
             crash[{backend}]: checked: {} keys, {} versions, {} canary decryptions, \
             {} exported versions, {} live tokens, {} expired tokens refused\n\
             crash[{backend}]: unacknowledged operations cut off by a kill: {} applied, {} not",
            self.kills,
            self.restarts,
            self.losses,
            elapsed.as_secs_f64(),
            acked.creations,
            acked.rotations,
            acked.configs,
            acked.deletions,
            acked.tokens,
            acked.encryptions,
            self.keys,
            self.versions,
            self.canaries,
            self.exported,
            self.tokens_checked,
            self.tokens_expired,
            self.unacked_applied,
            self.unacked_lost,
        );
    }
}

/// One worker's check after one restart.
#[derive(Debug, Default)]
struct Report {
    keys: u64,
    versions: u64,
    canaries: u64,
    exported: u64,
    tokens_checked: u64,
    tokens_expired: u64,
    unacked_applied: u64,
    unacked_lost: u64,
    losses: Vec<String>,
}

/// Acknowledged operations, by kind.
#[derive(Debug, Default, Clone, Copy)]
struct Acked {
    creations: u64,
    rotations: u64,
    configs: u64,
    deletions: u64,
    tokens: u64,
    encryptions: u64,
}

impl Acked {
    fn plus(self, o: &Acked) -> Acked {
        Acked {
            creations: self.creations + o.creations,
            rotations: self.rotations + o.rotations,
            configs: self.configs + o.configs,
            deletions: self.deletions + o.deletions,
            tokens: self.tokens + o.tokens,
            encryptions: self.encryptions + o.encryptions,
        }
    }
}

/// What the server acknowledged about one key.
#[derive(Debug)]
struct KeyModel {
    name: String,
    key_type: pb::KeyType,
    exportable: bool,
    /// The latest version, as acknowledged (or found after a restart).
    latest: u32,
    deletion_allowed: bool,
    /// Each version's material as ExportKey gave it right after the version was
    /// made (exportable keys only).
    material: BTreeMap<u32, Bytes>,
    /// Ciphertexts the server acknowledged, with their version and plaintext.
    canaries: Vec<Canary>,
    /// Acknowledged encryptions per version (96-bit-nonce types, which are counted).
    encryptions: BTreeMap<u32, u64>,
}

#[derive(Debug)]
struct Canary {
    version: u32,
    plaintext: Bytes,
    ciphertext: Bytes,
}

/// A token the server acknowledged.
struct TokenModel {
    token: Token,
    accessor: String,
    expires_unix: i64,
}

/// The one operation in flight when the kill came (its reply never arrived).
#[derive(Debug)]
enum Pending {
    Create {
        name: String,
        key_type: pb::KeyType,
        exportable: bool,
    },
    Rotate(String),
    Config(String, bool),
    Delete(String),
}

/// A client task and everything its calls acknowledged, kept across restarts.
struct Worker {
    id: usize,
    rng: TestRng,
    keys: Vec<KeyModel>,
    tokens: Vec<TokenModel>,
    deleted: Vec<String>,
    pending: Option<Pending>,
    next_key: u32,
    acked: Acked,
}

impl Worker {
    fn new(id: usize, seed: u64) -> Self {
        Self {
            id,
            rng: TestRng::new(seed),
            keys: Vec::new(),
            tokens: Vec::new(),
            deleted: Vec::new(),
            pending: None,
            next_key: 0,
            acked: Acked::default(),
        }
    }

    /// Runs random operations until one fails. A failure must come from the kill:
    /// one before `killed` was set is a server bug, and panics.
    async fn work(&mut self, client: &Client, killed: &AtomicBool) {
        loop {
            if let Err(e) = self.step(client).await {
                assert!(
                    killed.load(Ordering::SeqCst),
                    "worker {}: {e} (before the kill)",
                    self.id
                );
                return;
            }
            debug_assert!(self.pending.is_none());
        }
    }

    /// One random operation; on error `pending` says which change may or may not
    /// have happened.
    async fn step(&mut self, client: &Client) -> Result<(), Error> {
        let dice = self.rng.below(100);
        if self.keys.is_empty() || (dice >= 85 && self.keys.len() < KEYS_PER_WORKER) {
            return self.create(client).await;
        }
        let k = self.rng.below(self.keys.len() as u64) as usize;
        match dice {
            0..45 => self.encrypt(client, k, None).await,
            45..65 => self.rotate(client, k).await,
            65..75 => self.configure(client, k).await,
            75..85 => self.create_token(client).await,
            _ => match self.keys.iter().position(|key| key.deletion_allowed) {
                Some(k) => self.delete(client, k).await,
                None => self.configure(client, k).await,
            },
        }
    }

    async fn create(&mut self, client: &Client) -> Result<(), Error> {
        let name = format!("crash-w{}-k{}", self.id, self.next_key);
        self.next_key += 1;
        let key_type = ALL_KEY_TYPES[self.rng.below(ALL_KEY_TYPES.len() as u64) as usize].0;
        let exportable = self.rng.below(2) == 0;
        self.pending = Some(Pending::Create {
            name: name.clone(),
            key_type,
            exportable,
        });
        let key = reply(
            client
                .admin()
                .create_key(pb::CreateKeyRequest {
                    name: name.clone(),
                    r#type: key_type as i32,
                    exportable,
                    ..Default::default()
                })
                .await,
        )?
        .key
        .unwrap();
        self.pending = None;
        self.acked.creations += 1;
        assert_eq!(key.latest_version, 1, "{name}: {key:?}");
        self.keys.push(KeyModel {
            name,
            key_type,
            exportable,
            latest: 1,
            deletion_allowed: false,
            material: BTreeMap::new(),
            canaries: Vec::new(),
            encryptions: BTreeMap::new(),
        });
        let k = self.keys.len() - 1;
        self.mark_version(client, k, 1).await
    }

    async fn rotate(&mut self, client: &Client, k: usize) -> Result<(), Error> {
        let name = self.keys[k].name.clone();
        self.pending = Some(Pending::Rotate(name.clone()));
        let key = reply(
            client
                .admin()
                .rotate_key(pb::RotateKeyRequest { name: name.clone() })
                .await,
        )?
        .key
        .unwrap();
        self.pending = None;
        self.acked.rotations += 1;
        let model = &mut self.keys[k];
        assert_eq!(
            key.latest_version,
            model.latest + 1,
            "{name}: one writer, one rotation"
        );
        model.latest = key.latest_version;
        self.mark_version(client, k, key.latest_version).await
    }

    /// A canary under a new version, and (exportable keys) its material.
    async fn mark_version(&mut self, client: &Client, k: usize, version: u32) -> Result<(), Error> {
        self.encrypt(client, k, Some(version)).await?;
        let model = &mut self.keys[k];
        if model.exportable {
            let export = reply(
                client
                    .admin()
                    .export_key(pb::ExportKeyRequest {
                        name: model.name.clone(),
                        version: Some(version),
                    })
                    .await,
            )?;
            assert_eq!(export.versions.len(), 1);
            assert_eq!(export.versions[0].version, version);
            model
                .material
                .insert(version, export.versions[0].material.clone());
        }
        Ok(())
    }

    /// Encrypts under the latest version or `version`; keeps the ciphertext as a
    /// canary (the first per version always, later ones sometimes).
    async fn encrypt(
        &mut self,
        client: &Client,
        k: usize,
        version: Option<u32>,
    ) -> Result<(), Error> {
        let len = 1 + self.rng.below(64) as usize;
        let plaintext = Bytes::from(self.rng.bytes(len));
        let model = &mut self.keys[k];
        let sealed = reply(
            client
                .transit()
                .encrypt(pb::EncryptRequest {
                    key: model.name.clone(),
                    plaintext: plaintext.clone(),
                    key_version: version,
                    ..Default::default()
                })
                .await,
        )?;
        self.acked.encryptions += 1;
        let v = sealed.key_version;
        assert_eq!(v, version.unwrap_or(model.latest), "{}", model.name);
        if nonce_len(model.key_type) == 12 {
            *model.encryptions.entry(v).or_default() += 1;
        }
        let kept = model.canaries.iter().filter(|c| c.version == v).count();
        if kept == 0 || (kept < 3 && self.rng.below(4) == 0) {
            model.canaries.push(Canary {
                version: v,
                plaintext,
                ciphertext: sealed.ciphertext,
            });
        }
        Ok(())
    }

    async fn configure(&mut self, client: &Client, k: usize) -> Result<(), Error> {
        let name = self.keys[k].name.clone();
        let allowed = !self.keys[k].deletion_allowed;
        self.pending = Some(Pending::Config(name.clone(), allowed));
        let key = reply(
            client
                .admin()
                .update_key_config(pb::UpdateKeyConfigRequest {
                    name,
                    deletion_allowed: Some(allowed),
                    ..Default::default()
                })
                .await,
        )?
        .key
        .unwrap();
        self.pending = None;
        self.acked.configs += 1;
        assert_eq!(key.deletion_allowed, allowed);
        self.keys[k].deletion_allowed = allowed;
        Ok(())
    }

    async fn delete(&mut self, client: &Client, k: usize) -> Result<(), Error> {
        let name = self.keys[k].name.clone();
        self.pending = Some(Pending::Delete(name.clone()));
        reply(
            client
                .admin()
                .delete_key(pb::DeleteKeyRequest {
                    name: name.clone(),
                    ..Default::default()
                })
                .await,
        )?;
        self.pending = None;
        self.acked.deletions += 1;
        self.keys.remove(k);
        self.deleted.push(name);
        if self.deleted.len() > DELETED_KEPT {
            self.deleted.remove(0);
        }
        Ok(())
    }

    async fn create_token(&mut self, client: &Client) -> Result<(), Error> {
        let ttl = Duration::from_secs(
            TOKEN_TTL_S.start + self.rng.below(TOKEN_TTL_S.end - TOKEN_TTL_S.start),
        );
        // Nothing to remember if the reply is lost: nobody has the secret.
        let created = client
            .create_token(vec![APP_POLICY.into()], Some(ttl), "crash test")
            .await?;
        self.acked.tokens += 1;
        self.tokens.push(TokenModel {
            token: created.token,
            accessor: created.info.accessor,
            expires_unix: created.info.expires_unix,
        });
        Ok(())
    }

    /// After a restart: everything acknowledged is there and unchanged; the
    /// operation cut off by the kill either happened or did not.
    async fn check(&mut self, client: &Client) -> Report {
        let mut report = Report::default();
        match self.pending.take() {
            Some(Pending::Create {
                name,
                key_type,
                exportable,
            }) => match lookup(client, &name).await {
                Ok(Some(key)) => {
                    report.unacked_applied += 1;
                    self.keys.push(KeyModel {
                        name,
                        key_type,
                        exportable,
                        latest: key.latest_version,
                        deletion_allowed: key.deletion_allowed,
                        material: BTreeMap::new(),
                        canaries: Vec::new(),
                        encryptions: BTreeMap::new(),
                    });
                }
                Ok(None) => report.unacked_lost += 1,
                Err(e) => report
                    .losses
                    .push(format!("GetKey {name} (creation cut off): {e}")),
            },
            Some(Pending::Delete(name)) => match lookup(client, &name).await {
                // Killed between the schedule and the destruction: the key is
                // refused from now on and the housekeeping sweep destroys it.
                Ok(Some(key)) if key.deletion_time.is_some() => {
                    report.unacked_applied += 1;
                    self.keys.retain(|k| k.name != name);
                }
                Ok(Some(_)) => report.unacked_lost += 1,
                Ok(None) => {
                    report.unacked_applied += 1;
                    self.keys.retain(|k| k.name != name);
                }
                Err(e) => report
                    .losses
                    .push(format!("GetKey {name} (deletion cut off): {e}")),
            },
            Some(pending @ (Pending::Rotate(_) | Pending::Config(..))) => {
                self.pending = Some(pending);
            }
            None => {}
        }
        let pending = self.pending.take();
        for model in &mut self.keys {
            check_key(client, model, pending.as_ref(), &mut report).await;
        }
        for name in &self.deleted {
            match lookup(client, name).await {
                Ok(None) => {}
                Ok(Some(key)) => report
                    .losses
                    .push(format!("{name}: deleted (acknowledged) but back: {key:?}")),
                Err(e) => report.losses.push(format!("GetKey {name} (deleted): {e}")),
            }
        }
        self.check_tokens(client, &mut report).await;
        report
    }

    async fn check_tokens(&mut self, client: &Client, report: &mut Report) {
        let now = unix_now();
        let mut live = Vec::new();
        for model in self.tokens.drain(..) {
            let as_token = client.with_token(&model.token).unwrap();
            let lookup = as_token.lookup_token(None).await;
            if model.expires_unix > now + 1 {
                match lookup {
                    Ok(info) if info.accessor == model.accessor => report.tokens_checked += 1,
                    Ok(info) => report.losses.push(format!(
                        "token {}: looked up as {}",
                        model.accessor, info.accessor
                    )),
                    Err(e) => report.losses.push(format!(
                        "token {} (expires in {} s) refused: {e}",
                        model.accessor,
                        model.expires_unix - now
                    )),
                }
                live.push(model);
            } else if model.expires_unix < now - 1 {
                match lookup {
                    Err(e) if e.code() == Some(Code::Unauthenticated) => report.tokens_expired += 1,
                    other => report.losses.push(format!(
                        "token {} expired {} s ago, yet: {:?}",
                        model.accessor,
                        now - model.expires_unix,
                        other.map(|i| i.accessor)
                    )),
                }
            } else {
                // Within a second of its expiry: either answer is right; next time.
                live.push(model);
            }
        }
        self.tokens = live;
    }
}

/// Checks one key against what was acknowledged, then adopts what it found (a
/// cut-off rotation or config change that did happen).
async fn check_key(
    client: &Client,
    model: &mut KeyModel,
    pending: Option<&Pending>,
    report: &mut Report,
) {
    let name = model.name.clone();
    let key = match lookup(client, &name).await {
        Ok(Some(key)) => key,
        Ok(None) => {
            report
                .losses
                .push(format!("{name}: acknowledged, now NOT_FOUND"));
            return;
        }
        Err(e) => {
            report.losses.push(format!("GetKey {name}: {e}"));
            return;
        }
    };
    report.keys += 1;
    let rotating = matches!(pending, Some(Pending::Rotate(n)) if *n == name);
    if key.latest_version < model.latest || key.latest_version > model.latest + u32::from(rotating)
    {
        report.losses.push(format!(
            "{name}: latest version {}, acknowledged {}{}",
            key.latest_version,
            model.latest,
            if rotating { " (+1 cut off)" } else { "" }
        ));
    } else if key.latest_version > model.latest {
        report.unacked_applied += 1;
    } else if rotating {
        report.unacked_lost += 1;
    }
    match pending {
        Some(Pending::Config(n, value)) if *n == name => {
            if key.deletion_allowed == *value {
                report.unacked_applied += 1;
            } else if key.deletion_allowed == model.deletion_allowed {
                report.unacked_lost += 1;
            }
        }
        _ => {
            if key.deletion_allowed != model.deletion_allowed {
                report.losses.push(format!(
                    "{name}: deletion_allowed {}, acknowledged {}",
                    key.deletion_allowed, model.deletion_allowed
                ));
            }
        }
    }
    let versions: Vec<u32> = key.versions.iter().map(|v| v.version).collect();
    let expected: Vec<u32> = (1..=key.latest_version).collect();
    if versions != expected {
        report.losses.push(format!(
            "{name}: versions {versions:?}, expected {expected:?}"
        ));
    }
    report.versions += versions.len() as u64;
    for info in &key.versions {
        let acked = model.encryptions.get(&info.version).copied().unwrap_or(0);
        if info.encryptions < acked {
            report.losses.push(format!(
                "{name} v{}: usage count {} below the {acked} acknowledged encryptions",
                info.version, info.encryptions
            ));
        }
    }
    model.latest = key.latest_version;
    model.deletion_allowed = key.deletion_allowed;

    // Canaries: each decrypts, under the version it was made with.
    let items = model
        .canaries
        .iter()
        .map(|c| pb::DecryptItem {
            ciphertext: c.ciphertext.clone(),
            ..Default::default()
        })
        .collect();
    match client.batch_decrypt(&name, items).await {
        Ok(results) => {
            for (canary, result) in model.canaries.iter().zip(results) {
                let header =
                    u32::from_be_bytes(canary.ciphertext[1..HEADER_LEN].try_into().unwrap());
                assert_eq!(
                    header, canary.version,
                    "{name}: the header names the version"
                );
                match result {
                    Ok(p) if p == canary.plaintext => report.canaries += 1,
                    Ok(_) => report.losses.push(format!(
                        "{name} v{}: a canary decrypts to another plaintext",
                        canary.version
                    )),
                    Err(e) => report.losses.push(format!(
                        "{name} v{}: a canary no longer decrypts: {e}",
                        canary.version
                    )),
                }
            }
        }
        Err(e) => report.losses.push(format!("BatchDecrypt {name}: {e}")),
    }

    // Exported material: unchanged for every version it was recorded for.
    if model.exportable {
        match reply(
            client
                .admin()
                .export_key(pb::ExportKeyRequest {
                    name: name.clone(),
                    version: None,
                })
                .await,
        ) {
            Ok(export) => {
                let now: BTreeMap<u32, Bytes> = export
                    .versions
                    .into_iter()
                    .map(|v| (v.version, v.material))
                    .collect();
                for (version, material) in &model.material {
                    match now.get(version) {
                        Some(m) if m == material => report.exported += 1,
                        Some(_) => report
                            .losses
                            .push(format!("{name} v{version}: exported material changed")),
                        None => report
                            .losses
                            .push(format!("{name} v{version}: missing from ExportKey")),
                    }
                }
                // A version made by a cut-off rotation: remember it from now on.
                for (version, material) in now {
                    model.material.entry(version).or_insert(material);
                }
            }
            Err(e) => report.losses.push(format!("ExportKey {name}: {e}")),
        }
    }
}

/// GetKey: `Ok(None)` for NOT_FOUND, any other error as it came.
async fn lookup(client: &Client, name: &str) -> Result<Option<pb::Key>, Error> {
    match reply(
        client
            .admin()
            .get_key(pb::GetKeyRequest {
                name: name.to_owned(),
            })
            .await,
    ) {
        Ok(r) => Ok(r.key),
        Err(e) if e.code() == Some(Code::NotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Unseals with two of the three shares, chosen at random.
async fn unseal(client: &Client, shares: &[String], rng: &mut TestRng) {
    let first = rng.below(3) as usize;
    let second = (first + 1 + rng.below(2) as usize) % 3;
    let mut sealed = true;
    for i in [first, second] {
        sealed = reply(
            client
                .system()
                .unseal(pb::UnsealRequest {
                    share: shares[i].clone(),
                    reset: false,
                })
                .await,
        )
        .unwrap()
        .sealed;
    }
    assert!(!sealed, "unsealed with shares {first} and {second}");
}

/// Client options for the workers: the root token and no retries, so that a
/// call is sent once and its reply (or not) is the acknowledgement.
fn no_retries(root: &Token) -> ClientOptions {
    ClientOptions {
        retries: 0,
        ..ClientOptions::default().with_token(root.clone())
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
        Err(_) => default,
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
