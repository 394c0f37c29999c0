//! What the server knows about identities while unsealed: bearer tokens, policies
//! and roles, and the two MAC keys (token hashes, audit hashes). Everything is
//! stored under the barrier and held in memory in full, so that authenticating a
//! call never reads storage; the store's change feed keeps the copies current
//! when another writer (a replica) changes a record.
//!
//! Storage layout:
//!
//! | path | holds |
//! | --- | --- |
//! | `sys/auth-keys` | the token MAC key and the audit MAC key (random, 256 bits each) |
//! | `auth/token/<accessor>` | a token's HMAC-SHA256 tag (never the token), name, policies, times |
//! | `auth/policy/<name>` | a policy's TOML document |
//! | `auth/role/<name>` | a role's principal and group globs and its policies |
//!
//! A token is `cdt_<accessor>_<secret>`: the accessor (24 hex digits, not secret)
//! names the record; the secret (256 random bits, base64url) is checked against
//! the stored tag in constant time.

use std::{
    sync::{Arc, Weak},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use cipherd_core::{
    barrier::Barrier,
    mac::MacKey,
    secret::{KeyMaterial, SecretBytes},
};
use cipherd_store::{Change, Store};
use dashmap::DashMap;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::sync::broadcast::error::RecvError;
use zeroize::Zeroizing;

use super::{
    glob::Glob,
    policy::{Policy, PolicyError},
};
use crate::error::{Error, Result};

/// Storage path of the MAC keys.
pub const AUTH_KEYS_PATH: &str = "sys/auth-keys";
/// Prefix of token records.
pub const TOKEN_PREFIX: &str = "auth/token/";
/// Prefix of policy records.
pub const POLICY_PREFIX: &str = "auth/policy/";
/// Prefix of role records.
pub const ROLE_PREFIX: &str = "auth/role/";

/// The prefix of every cipherd token.
pub const TOKEN_TAG: &str = "cdt_";
/// Length of an accessor in hex digits (96 random bits).
const ACCESSOR_HEX: usize = 24;
/// Random bytes of a token's secret.
const SECRET_BYTES: usize = 32;
/// Name of the built-in policy that allows everything.
pub const ROOT_POLICY: &str = "root";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthKeysRecord {
    /// base64 of the token MAC key.
    token_mac: String,
    /// base64 of the audit MAC key.
    audit_mac: String,
}

/// A stored token (the record at `auth/token/<accessor>`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenRecord {
    /// Hex of HMAC-SHA256(token key, secret).
    pub secret_mac: String,
    /// Shown in listings and audit records.
    pub display_name: String,
    /// Policies the token carries.
    pub policies: Vec<String>,
    /// Unix seconds.
    pub created_unix: i64,
    /// Unix seconds after which the token is refused; 0 never.
    pub expires_unix: i64,
    /// The principal that created it.
    pub created_by: String,
}

impl TokenRecord {
    /// Whether the token has expired at `now` (unix seconds).
    pub fn expired_at(&self, now: i64) -> bool {
        self.expires_unix != 0 && now >= self.expires_unix
    }
}

/// A token as held in memory.
#[derive(Debug)]
pub struct TokenEntry {
    /// Its accessor.
    pub accessor: String,
    /// The stored record.
    pub record: TokenRecord,
    tag: Vec<u8>,
    revision: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyRecord {
    document: String,
}

/// A policy as held in memory: parsed, with its document as written.
#[derive(Debug)]
pub struct StoredPolicy {
    /// The parsed policy.
    pub policy: Arc<Policy>,
    /// The TOML document as written.
    pub document: String,
    revision: u64,
}

/// A stored role (the record at `auth/role/<name>`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct RoleRecord {
    /// Globs on mTLS identities and JWT principals.
    pub principals: Vec<String>,
    /// Globs on JWT groups.
    pub groups: Vec<String>,
    /// Policies the role gives.
    pub policies: Vec<String>,
}

/// A role as held in memory, with its globs compiled.
#[derive(Debug)]
pub struct StoredRole {
    /// The role's name.
    pub name: String,
    /// The stored record.
    pub record: RoleRecord,
    principals: Vec<Glob>,
    groups: Vec<Glob>,
    revision: u64,
}

/// Why a bearer token was refused; logged on the server, never told the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// Not of the `cdt_<accessor>_<secret>` form.
    Malformed,
    /// No token has this accessor (never existed, or revoked).
    Unknown,
    /// The secret does not match.
    Forged,
    /// Past its expiry.
    Expired,
}

impl TokenRefusal {
    /// A short word for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRefusal::Malformed => "malformed",
            TokenRefusal::Unknown => "unknown or revoked",
            TokenRefusal::Forged => "wrong secret",
            TokenRefusal::Expired => "expired",
        }
    }
}

/// Tokens, policies, roles and MAC keys of an unsealed server.
#[derive(Debug)]
pub struct AuthState {
    inner: Arc<Inner>,
    invalidator: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn Store>,
    barrier: Arc<Barrier>,
    token_key: MacKey,
    audit_key: MacKey,
    tokens: DashMap<String, Arc<TokenEntry>>,
    policies: DashMap<String, Arc<StoredPolicy>>,
    roles: DashMap<String, Arc<StoredRole>>,
    /// Storage reads left in the current second for tokens not in the cache.
    miss_reads: std::sync::Mutex<(std::time::Instant, u32)>,
}

/// Storage reads per second a replica makes for well-formed tokens it does not
/// know ([`AuthState::refresh_token`]): enough for tokens just created through
/// another replica, too few for random accessors to load the database.
pub const TOKEN_MISS_READS_PER_SEC: u32 = 20;

impl Drop for AuthState {
    fn drop(&mut self) {
        self.invalidator.abort();
    }
}

impl AuthState {
    /// Loads every token, policy and role; creates the MAC keys on first use (a
    /// data dir initialized before tokens existed).
    pub async fn load(store: Arc<dyn Store>, barrier: Arc<Barrier>) -> Result<Self> {
        let (token_key, audit_key) = auth_keys(&*store, &barrier).await?;
        let changes = store.subscribe();
        let inner = Arc::new(Inner {
            store,
            barrier,
            token_key,
            audit_key,
            tokens: DashMap::new(),
            policies: DashMap::new(),
            roles: DashMap::new(),
            miss_reads: std::sync::Mutex::new((std::time::Instant::now(), 0)),
        });
        for prefix in [TOKEN_PREFIX, POLICY_PREFIX, ROLE_PREFIX] {
            let mut after: Option<String> = None;
            loop {
                let page = inner.store.scan(prefix, after.as_deref(), 1000).await?;
                let Some((last, _)) = page.last() else { break };
                let last = last.clone();
                let short = page.len() < 1000;
                for (path, record) in page {
                    inner.install(&path, &record.value, record.revision)?;
                }
                if short {
                    break;
                }
                after = Some(last);
            }
        }
        let invalidator = tokio::spawn(follow_changes(changes, Arc::downgrade(&inner)));
        Ok(Self { inner, invalidator })
    }

    /// Checks a bearer token; returns its entry.
    pub fn authenticate(&self, token: &str) -> std::result::Result<Arc<TokenEntry>, TokenRefusal> {
        let (accessor, secret) = split_token(token).ok_or(TokenRefusal::Malformed)?;
        let entry = self
            .inner
            .tokens
            .get(accessor)
            .map(|e| Arc::clone(e.value()))
            .ok_or(TokenRefusal::Unknown)?;
        if !self.inner.token_key.verify(secret.as_bytes(), &entry.tag) {
            return Err(TokenRefusal::Forged);
        }
        if entry.record.expired_at(unix_now()) {
            return Err(TokenRefusal::Expired);
        }
        Ok(entry)
    }

    /// Whether `token` is well formed but its accessor is not cached: a token
    /// that may have just been created through another replica.
    pub fn is_unknown_token(&self, token: &str) -> bool {
        split_token(token).is_some_and(|(accessor, _)| !self.inner.tokens.contains_key(accessor))
    }

    /// Reads the record of a token this replica does not know from storage, for
    /// a token created through another replica whose notification has not
    /// arrived yet; returns whether it is now cached. At most
    /// [`TOKEN_MISS_READS_PER_SEC`] per second (beyond that, unknown tokens are
    /// refused until the change feed brings them).
    ///
    /// Revocation stays in force: after caching the record it is read again, and
    /// if it was deleted meanwhile (a revocation whose notification this replica
    /// may already have handled, before the record was cached) it is dropped. A
    /// deletion after that second read is announced after the record was cached,
    /// so the change feed removes it.
    pub async fn refresh_token(&self, token: &str) -> bool {
        let Some((accessor, _)) = split_token(token) else {
            return false;
        };
        let Some(path) = token_path(accessor) else {
            return false;
        };
        {
            let mut budget = self
                .inner
                .miss_reads
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if budget.0.elapsed() >= Duration::from_secs(1) {
                *budget = (std::time::Instant::now(), 0);
            }
            if budget.1 >= TOKEN_MISS_READS_PER_SEC {
                return false;
            }
            budget.1 += 1;
        }
        let Ok(Some(record)) = self.inner.store.get(&path).await else {
            return false;
        };
        if self
            .inner
            .install(&path, &record.value, record.revision)
            .is_err()
        {
            return false;
        }
        match self.inner.store.get(&path).await {
            Ok(Some(again)) if again.revision == record.revision => true,
            _ => {
                self.inner.forget(&path);
                false
            }
        }
    }

    /// The policies named, as held now; unknown names give nothing (default deny).
    pub fn policies(&self, names: &[String]) -> Vec<Arc<Policy>> {
        names
            .iter()
            .filter_map(|n| {
                if n == ROOT_POLICY {
                    static ROOT: std::sync::LazyLock<Arc<Policy>> =
                        std::sync::LazyLock::new(|| Arc::new(Policy::root().clone()));
                    Some(Arc::clone(&ROOT))
                } else {
                    self.inner.policies.get(n).map(|p| Arc::clone(&p.policy))
                }
            })
            .collect()
    }

    /// The policy names of every role matching `principal` (exactly or by glob) or
    /// one of `groups`, sorted and distinct.
    pub fn role_policies(&self, principal: &str, groups: &[String]) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for role in self.inner.roles.iter() {
            let matched = role.principals.iter().any(|g| g.matches(principal))
                || role
                    .groups
                    .iter()
                    .any(|g| groups.iter().any(|group| g.matches(group)));
            if matched {
                out.extend(role.record.policies.iter().cloned());
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// `hmac-sha256:<hex>` of `value` under the audit key.
    pub fn audit_hash(&self, value: &[u8]) -> String {
        let mut out = String::with_capacity(12 + 64);
        out.push_str("hmac-sha256:");
        out.push_str(&hex::encode(self.inner.audit_key.sign(value)));
        out
    }

    /// Creates a token; returns its text (shown once) and its entry.
    pub async fn create_token(
        &self,
        policies: Vec<String>,
        ttl: Option<Duration>,
        display_name: String,
        created_by: String,
    ) -> Result<(Zeroizing<String>, Arc<TokenEntry>)> {
        let (token, accessor, record, revision) = create_token(
            &*self.inner.store,
            &self.inner.barrier,
            &self.inner.token_key,
            policies,
            ttl,
            display_name,
            created_by,
        )
        .await?;
        let entry = self.inner.install_token(accessor, record, revision);
        tracing::info!(accessor = %entry.accessor, "token created");
        Ok((token, entry))
    }

    /// Every token, sorted by accessor.
    pub fn tokens(&self) -> Vec<Arc<TokenEntry>> {
        let mut out: Vec<_> = self
            .inner
            .tokens
            .iter()
            .map(|e| Arc::clone(e.value()))
            .collect();
        out.sort_by(|a, b| a.accessor.cmp(&b.accessor));
        out
    }

    /// One token by accessor.
    pub fn token(&self, accessor: &str) -> Option<Arc<TokenEntry>> {
        self.inner
            .tokens
            .get(accessor)
            .map(|e| Arc::clone(e.value()))
    }

    /// Revokes a token: it is refused from the next call on.
    pub async fn revoke_token(&self, accessor: &str) -> Result<()> {
        let path = token_path(accessor).ok_or_else(not_found_token)?;
        self.inner.delete(&path).await.map_err(|e| match e {
            Error::KeyNotFound(_) => not_found_token(),
            e => e,
        })?;
        self.inner.tokens.remove(accessor);
        tracing::info!(accessor, "token revoked");
        Ok(())
    }

    /// Creates or replaces a policy from its TOML document.
    pub async fn write_policy(&self, name: &str, document: &str) -> Result<()> {
        let policy = Policy::parse(name, document).map_err(invalid_policy)?;
        let path = format!("{POLICY_PREFIX}{}", policy.name());
        let body = json(&PolicyRecord {
            document: document.to_owned(),
        })?;
        let revision = self.inner.put(&path, &body).await?;
        self.inner.policies.insert(
            name.to_owned(),
            Arc::new(StoredPolicy {
                policy: Arc::new(policy),
                document: document.to_owned(),
                revision,
            }),
        );
        tracing::info!(policy = name, "policy written");
        Ok(())
    }

    /// One policy's document.
    pub fn policy(&self, name: &str) -> Option<Arc<StoredPolicy>> {
        self.inner.policies.get(name).map(|p| Arc::clone(p.value()))
    }

    /// Every policy name, sorted, `root` included.
    pub fn policy_names(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .inner
            .policies
            .iter()
            .map(|p| p.key().clone())
            .collect();
        out.push(ROOT_POLICY.to_owned());
        out.sort();
        out
    }

    /// Deletes a policy.
    pub async fn delete_policy(&self, name: &str) -> Result<()> {
        if name == ROOT_POLICY {
            return Err(Error::InvalidArgument(
                "the root policy is built in and cannot be deleted".into(),
            ));
        }
        let path = checked_path(POLICY_PREFIX, name)?;
        self.inner.delete(&path).await.map_err(|e| match e {
            Error::KeyNotFound(_) => Error::NotFound(format!("policy {name:?}")),
            e => e,
        })?;
        self.inner.policies.remove(name);
        tracing::info!(policy = name, "policy deleted");
        Ok(())
    }

    /// Creates or replaces a role.
    pub async fn write_role(&self, name: &str, record: RoleRecord) -> Result<()> {
        let path = checked_path(ROLE_PREFIX, name)?;
        let compiled = compile_role(name, record.clone(), 0)?;
        if compiled.principals.is_empty() && compiled.groups.is_empty() {
            return Err(Error::InvalidArgument(
                "a role needs at least one principal or group".into(),
            ));
        }
        let revision = self.inner.put(&path, &json(&record)?).await?;
        self.inner.roles.insert(
            name.to_owned(),
            Arc::new(StoredRole {
                revision,
                ..compiled
            }),
        );
        tracing::info!(role = name, "role written");
        Ok(())
    }

    /// One role.
    pub fn role(&self, name: &str) -> Option<Arc<StoredRole>> {
        self.inner.roles.get(name).map(|r| Arc::clone(r.value()))
    }

    /// Every role, sorted by name.
    pub fn roles(&self) -> Vec<Arc<StoredRole>> {
        let mut out: Vec<_> = self
            .inner
            .roles
            .iter()
            .map(|r| Arc::clone(r.value()))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Deletes a role.
    pub async fn delete_role(&self, name: &str) -> Result<()> {
        let path = checked_path(ROLE_PREFIX, name)?;
        self.inner.delete(&path).await.map_err(|e| match e {
            Error::KeyNotFound(_) => Error::NotFound(format!("role {name:?}")),
            e => e,
        })?;
        self.inner.roles.remove(name);
        tracing::info!(role = name, "role deleted");
        Ok(())
    }
}

/// At `Init`, while the root key is still in memory: creates the MAC keys and the
/// root token, and returns the token's text.
pub async fn bootstrap(store: &dyn Store, barrier: &Barrier) -> Result<Zeroizing<String>> {
    let (token_key, _) = auth_keys(store, barrier).await?;
    let (token, accessor, _, _) = create_token(
        store,
        barrier,
        &token_key,
        vec![ROOT_POLICY.to_owned()],
        None,
        "root".to_owned(),
        "init".to_owned(),
    )
    .await?;
    tracing::info!(accessor, "root token created");
    Ok(token)
}

impl Inner {
    /// Decodes and caches the record at `path` (a token, policy or role).
    fn install(&self, path: &str, sealed: &[u8], revision: u64) -> Result<()> {
        let plain = self.barrier.open(path, sealed)?;
        let corrupt = |e: &dyn std::fmt::Display| {
            tracing::error!(path, error = %e, "auth record does not decode");
            Error::Corrupt(path.to_owned())
        };
        if let Some(accessor) = path.strip_prefix(TOKEN_PREFIX) {
            let record: TokenRecord = decode(plain.expose_secret()).map_err(|e| corrupt(&e))?;
            self.install_token(accessor.to_owned(), record, revision);
        } else if let Some(name) = path.strip_prefix(POLICY_PREFIX) {
            let record: PolicyRecord = decode(plain.expose_secret()).map_err(|e| corrupt(&e))?;
            let policy = Policy::parse(name, &record.document).map_err(|e| corrupt(&e))?;
            self.policies.insert(
                name.to_owned(),
                Arc::new(StoredPolicy {
                    policy: Arc::new(policy),
                    document: record.document,
                    revision,
                }),
            );
        } else if let Some(name) = path.strip_prefix(ROLE_PREFIX) {
            let record: RoleRecord = decode(plain.expose_secret()).map_err(|e| corrupt(&e))?;
            let role = compile_role(name, record, revision).map_err(|e| corrupt(&e))?;
            self.roles.insert(name.to_owned(), Arc::new(role));
        }
        Ok(())
    }

    fn install_token(
        &self,
        accessor: String,
        record: TokenRecord,
        revision: u64,
    ) -> Arc<TokenEntry> {
        let tag = hex::decode(&record.secret_mac).unwrap_or_default();
        let entry = Arc::new(TokenEntry {
            accessor: accessor.clone(),
            record,
            tag,
            revision,
        });
        self.tokens.insert(accessor, Arc::clone(&entry));
        entry
    }

    /// The revision of the cached copy of `path`, if any.
    fn cached_revision(&self, path: &str) -> Option<u64> {
        if let Some(a) = path.strip_prefix(TOKEN_PREFIX) {
            self.tokens.get(a).map(|e| e.revision)
        } else if let Some(n) = path.strip_prefix(POLICY_PREFIX) {
            self.policies.get(n).map(|e| e.revision)
        } else if let Some(n) = path.strip_prefix(ROLE_PREFIX) {
            self.roles.get(n).map(|e| e.revision)
        } else {
            None
        }
    }

    fn forget(&self, path: &str) {
        if let Some(a) = path.strip_prefix(TOKEN_PREFIX) {
            self.tokens.remove(a);
        } else if let Some(n) = path.strip_prefix(POLICY_PREFIX) {
            self.policies.remove(n);
        } else if let Some(n) = path.strip_prefix(ROLE_PREFIX) {
            self.roles.remove(n);
        }
    }

    /// Create-or-replace under the barrier; returns the new revision.
    async fn put(&self, path: &str, body: &[u8]) -> Result<u64> {
        let sealed = self.barrier.seal(path, body)?;
        for _ in 0..8 {
            match self.store.get(path).await? {
                None => match self.store.create(path, &sealed).await {
                    Ok(rev) => return Ok(rev),
                    Err(cipherd_store::Error::AlreadyExists { .. }) => continue,
                    Err(e) => return Err(e.into()),
                },
                Some(current) => {
                    match self
                        .store
                        .compare_and_set(path, current.revision, &sealed)
                        .await
                    {
                        Ok(rev) => return Ok(rev),
                        Err(cipherd_store::Error::Conflict { .. }) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Err(Error::Aborted(path.to_owned()))
    }

    /// Deletes `path`; `KeyNotFound` if absent.
    async fn delete(&self, path: &str) -> Result<()> {
        for _ in 0..8 {
            let Some(current) = self.store.get(path).await? else {
                return Err(Error::KeyNotFound(path.to_owned()));
            };
            match self.store.delete(path, current.revision).await {
                Ok(()) => return Ok(()),
                Err(cipherd_store::Error::Conflict { .. }) => continue,
                Err(cipherd_store::Error::NotFound { .. }) => {
                    return Err(Error::KeyNotFound(path.to_owned()));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Aborted(path.to_owned()))
    }
}

/// Keeps the in-memory copies current with changes made by other writers.
async fn follow_changes(mut changes: tokio::sync::broadcast::Receiver<Change>, inner: Weak<Inner>) {
    loop {
        let change = changes.recv().await;
        let Some(inner) = inner.upgrade() else { return };
        let paths: Vec<String> = match change {
            Ok(change) if !change.is_resync() => {
                let Change { path, revision } = change;
                if ![TOKEN_PREFIX, POLICY_PREFIX, ROLE_PREFIX]
                    .iter()
                    .any(|p| path.starts_with(p))
                {
                    continue;
                }
                // Our own writes are installed already.
                if revision.is_some() && inner.cached_revision(&path) >= revision {
                    continue;
                }
                vec![path]
            }
            // Missed changes (or the store may have: a replica's listener
            // reconnected): re-read every auth record we know of.
            Ok(_) | Err(RecvError::Lagged(_)) => {
                let mut all: Vec<String> = Vec::new();
                all.extend(
                    inner
                        .tokens
                        .iter()
                        .map(|e| format!("{TOKEN_PREFIX}{}", e.key())),
                );
                all.extend(
                    inner
                        .policies
                        .iter()
                        .map(|e| format!("{POLICY_PREFIX}{}", e.key())),
                );
                all.extend(
                    inner
                        .roles
                        .iter()
                        .map(|e| format!("{ROLE_PREFIX}{}", e.key())),
                );
                all
            }
            Err(RecvError::Closed) => return,
        };
        for path in paths {
            match inner.store.get(&path).await {
                Ok(Some(record)) => {
                    if let Err(e) = inner.install(&path, &record.value, record.revision) {
                        tracing::error!(path, error = %e, "auth record changed but does not open");
                        inner.forget(&path);
                    }
                }
                Ok(None) => inner.forget(&path),
                // Fail closed: a record we cannot re-read is dropped from memory.
                Err(e) => {
                    tracing::error!(path, error = %e, "cannot re-read a changed auth record");
                    inner.forget(&path);
                }
            }
        }
    }
}

/// Reads the MAC keys, creating them if absent.
async fn auth_keys(store: &dyn Store, barrier: &Barrier) -> Result<(MacKey, MacKey)> {
    let b64 = &base64::engine::general_purpose::STANDARD;
    for _ in 0..2 {
        if let Some(record) = store.get(AUTH_KEYS_PATH).await? {
            let plain = barrier.open(AUTH_KEYS_PATH, &record.value)?;
            let corrupt = || Error::Corrupt(AUTH_KEYS_PATH.to_owned());
            let keys: AuthKeysRecord = decode(plain.expose_secret()).map_err(|_| corrupt())?;
            let token = Zeroizing::new(b64.decode(&keys.token_mac).map_err(|_| corrupt())?);
            let audit = Zeroizing::new(b64.decode(&keys.audit_mac).map_err(|_| corrupt())?);
            let token = KeyMaterial::from_slice(&token).map_err(|_| corrupt())?;
            let audit = KeyMaterial::from_slice(&audit).map_err(|_| corrupt())?;
            return Ok((MacKey::new(&token), MacKey::new(&audit)));
        }
        let token = KeyMaterial::generate()?;
        let audit = KeyMaterial::generate()?;
        let body = Zeroizing::new(json(&AuthKeysRecord {
            token_mac: b64.encode(token.expose_secret()),
            audit_mac: b64.encode(audit.expose_secret()),
        })?);
        let sealed = barrier.seal(AUTH_KEYS_PATH, &body)?;
        match store.create(AUTH_KEYS_PATH, &sealed).await {
            Ok(_) => return Ok((MacKey::new(&token), MacKey::new(&audit))),
            // Another writer created them first: use theirs.
            Err(cipherd_store::Error::AlreadyExists { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Aborted(AUTH_KEYS_PATH.to_owned()))
}

/// Mints and stores a token; returns (text, accessor, record, revision).
async fn create_token(
    store: &dyn Store,
    barrier: &Barrier,
    token_key: &MacKey,
    policies: Vec<String>,
    ttl: Option<Duration>,
    display_name: String,
    created_by: String,
) -> Result<(Zeroizing<String>, String, TokenRecord, u64)> {
    let accessor = hex::encode(SecretBytes::random(ACCESSOR_HEX / 2)?.expose_secret());
    let secret = SecretBytes::random(SECRET_BYTES)?;
    let secret_text = Zeroizing::new(
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret.expose_secret()),
    );
    let now = unix_now();
    let expires_unix = match ttl {
        None => 0,
        Some(ttl) => now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
    };
    let record = TokenRecord {
        secret_mac: hex::encode(token_key.sign(secret_text.as_bytes())),
        display_name,
        policies,
        created_unix: now,
        expires_unix,
        created_by,
    };
    let path = format!("{TOKEN_PREFIX}{accessor}");
    let sealed = barrier.seal(&path, &json(&record)?)?;
    let revision = store.create(&path, &sealed).await?;
    let mut token = Zeroizing::new(String::with_capacity(
        TOKEN_TAG.len() + ACCESSOR_HEX + 1 + secret_text.len(),
    ));
    token.push_str(TOKEN_TAG);
    token.push_str(&accessor);
    token.push('_');
    token.push_str(&secret_text);
    Ok((token, accessor, record, revision))
}

/// `cdt_<accessor>_<secret>` → (accessor, secret).
fn split_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(TOKEN_TAG)?;
    let (accessor, secret) = rest.split_at_checked(ACCESSOR_HEX)?;
    let secret = secret.strip_prefix('_')?;
    let valid_accessor = accessor
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (valid_accessor && secret.len() == 43).then_some((accessor, secret))
}

/// Whether `token` has the form of a cipherd token (not whether it is valid).
pub fn looks_like_token(token: &str) -> bool {
    token.starts_with(TOKEN_TAG)
}

fn token_path(accessor: &str) -> Option<String> {
    (accessor.len() == ACCESSOR_HEX
        && accessor
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then(|| format!("{TOKEN_PREFIX}{accessor}"))
}

fn not_found_token() -> Error {
    Error::NotFound("token".into())
}

/// Policy and role names: `^[a-z0-9][a-z0-9_.-]{0,63}$`.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_.-".contains(c))
}

fn checked_path(prefix: &str, name: &str) -> Result<String> {
    if !valid_name(name) {
        return Err(Error::InvalidArgument(format!(
            "name {name:?}: use 1 to 64 of a-z, 0-9, '_', '.', '-', starting with a letter or digit"
        )));
    }
    Ok(format!("{prefix}{name}"))
}

fn compile_role(name: &str, record: RoleRecord, revision: u64) -> Result<StoredRole> {
    let globs = |list: &[String], what: &str| -> Result<Vec<Glob>> {
        list.iter()
            .map(|p| {
                Glob::new(p).map_err(|e| Error::InvalidArgument(format!("role {what} {p:?}: {e}")))
            })
            .collect()
    };
    Ok(StoredRole {
        name: name.to_owned(),
        principals: globs(&record.principals, "principal")?,
        groups: globs(&record.groups, "group")?,
        record,
        revision,
    })
}

/// A policy error as a one-line message (TOML parse errors span several lines,
/// with a caret under the column; the line and column are in the first).
fn invalid_policy(e: PolicyError) -> Error {
    let text = e.to_string();
    let one_line: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('|') && !l.chars().all(|c| c == '^'))
        .collect();
    Error::InvalidPolicy(one_line.join(" "))
}

fn json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::Internal(e.to_string()))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> std::result::Result<T, serde_json::Error> {
    serde_json::from_slice(bytes)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // in tests a panic is the failure report
mod tests {
    use cipherd_core::{barrier::RootKey, secret::Derivation};
    use cipherd_store::SqliteStore;

    use super::*;

    async fn state(store: &Arc<dyn Store>, root: &RootKey) -> AuthState {
        let barrier = Arc::new(Barrier::new(root, 1, Derivation::V2).unwrap());
        AuthState::load(Arc::clone(store), barrier).await.unwrap()
    }

    #[tokio::test]
    async fn tokens_are_stored_as_keyed_tags_and_checked_in_full() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().await.unwrap());
        let root = RootKey::generate().unwrap();
        let auth = state(&store, &root).await;
        let (token, entry) = auth
            .create_token(vec!["p".into()], None, "t".into(), "test".into())
            .await
            .unwrap();
        assert!(token.starts_with(TOKEN_TAG) && token.len() == 4 + 24 + 1 + 43);
        assert_eq!(auth.authenticate(&token).unwrap().accessor, entry.accessor);

        // The stored record (opened through the barrier) has the tag, not the secret.
        let path = format!("{TOKEN_PREFIX}{}", entry.accessor);
        let sealed = store.get(&path).await.unwrap().unwrap().value;
        let barrier = Barrier::new(&root, 1, Derivation::V2).unwrap();
        let plain = barrier.open(&path, &sealed).unwrap();
        let text = String::from_utf8(plain.expose_secret().to_vec()).unwrap();
        let secret = &token[29..];
        assert!(!text.contains(secret), "{text}");
        assert!(!String::from_utf8_lossy(&sealed).contains(secret));

        // Every part is checked: a changed secret, accessor or prefix is refused.
        let mut forged = token.to_string();
        forged.replace_range(40..41, if &forged[40..41] == "A" { "B" } else { "A" });
        assert_eq!(
            auth.authenticate(&forged).unwrap_err(),
            TokenRefusal::Forged
        );
        let other = format!("cdt_{}_{}", "0".repeat(24), secret);
        assert_eq!(
            auth.authenticate(&other).unwrap_err(),
            TokenRefusal::Unknown
        );
        assert_eq!(
            auth.authenticate(&token[1..]).unwrap_err(),
            TokenRefusal::Malformed
        );
        assert_eq!(auth.authenticate("").unwrap_err(), TokenRefusal::Malformed);

        // Another server over the same storage (a replica, a restart) accepts it.
        let again = state(&store, &root).await;
        assert!(again.authenticate(&token).is_ok());
        // Revocation is at once, here and, through the change feed, there.
        auth.revoke_token(&entry.accessor).await.unwrap();
        assert_eq!(
            auth.authenticate(&token).unwrap_err(),
            TokenRefusal::Unknown
        );
        // The other copy learns it from the change feed (a storage read): poll.
        for _ in 0..500 {
            if again.authenticate(&token).is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            again.authenticate(&token).unwrap_err(),
            TokenRefusal::Unknown
        );
    }

    /// A replica reads an unknown token from storage (a token created through
    /// another replica), never one that is revoked, and at most
    /// TOKEN_MISS_READS_PER_SEC times a second.
    #[tokio::test]
    async fn unknown_tokens_are_read_from_storage_within_a_budget() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().await.unwrap());
        let root = RootKey::generate().unwrap();
        let a = state(&store, &root).await;
        let b = state(&store, &root).await;
        let (token, entry) = a
            .create_token(vec!["p".into()], None, "t".into(), "test".into())
            .await
            .unwrap();
        assert!(b.refresh_token(&token).await);
        assert!(!b.is_unknown_token(&token));
        assert_eq!(b.authenticate(&token).unwrap().accessor, entry.accessor);

        a.revoke_token(&entry.accessor).await.unwrap();
        b.inner.forget(&format!("{TOKEN_PREFIX}{}", entry.accessor));
        assert!(
            !b.refresh_token(&token).await,
            "a revoked token is not read back"
        );
        assert_eq!(b.authenticate(&token).unwrap_err(), TokenRefusal::Unknown);

        // Random accessors use up the budget; then even a real token waits for
        // the change feed.
        let (fresh, _) = a
            .create_token(vec!["p".into()], None, "t".into(), "test".into())
            .await
            .unwrap();
        let c = state(&store, &root).await;
        let secret = &fresh[29..];
        for i in 0..TOKEN_MISS_READS_PER_SEC {
            let random = format!("cdt_{i:024x}_{secret}");
            assert!(c.is_unknown_token(&random));
            assert!(!c.refresh_token(&random).await);
        }
        c.inner.forget(&format!("{TOKEN_PREFIX}{}", &fresh[4..28]));
        assert!(!c.refresh_token(&fresh).await, "over budget");
    }

    #[tokio::test]
    async fn expired_tokens_are_refused() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().await.unwrap());
        let auth = state(&store, &RootKey::generate().unwrap()).await;
        let (token, entry) = auth
            .create_token(
                vec!["p".into()],
                Some(Duration::from_secs(3600)),
                "t".into(),
                "x".into(),
            )
            .await
            .unwrap();
        assert!(auth.authenticate(&token).is_ok());
        assert!(!entry.record.expired_at(entry.record.expires_unix - 1));
        assert!(entry.record.expired_at(entry.record.expires_unix));
        let forever = TokenRecord {
            expires_unix: 0,
            ..entry.record.clone()
        };
        assert!(!forever.expired_at(i64::MAX));
    }

    #[tokio::test]
    async fn policies_and_roles_round_trip_and_bad_documents_are_refused() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().await.unwrap());
        let auth = state(&store, &RootKey::generate().unwrap()).await;
        let doc = "[[rule]]\nkeys = [\"a-*\"]\noperations = [\"encrypt\"]\n";
        auth.write_policy("enc", doc).await.unwrap();
        assert_eq!(auth.policy("enc").unwrap().document, doc);
        assert_eq!(auth.policy_names(), ["enc", "root"]);
        let err = auth.write_policy("bad", "[[rule]\n").await.unwrap_err();
        assert!(
            matches!(err, Error::InvalidPolicy(ref m) if !m.contains('\n')),
            "{err}"
        );
        assert!(auth.policy("bad").is_none());
        assert!(auth.delete_policy("root").await.is_err());

        auth.write_role(
            "ehr",
            RoleRecord {
                principals: vec!["spiffe://hospital/ns/ehr/*".into()],
                groups: vec!["nurses".into()],
                policies: vec!["enc".into()],
            },
        )
        .await
        .unwrap();
        assert_eq!(
            auth.role_policies("spiffe://hospital/ns/ehr/sa/api", &[]),
            ["enc"]
        );
        assert_eq!(auth.role_policies("someone", &["nurses".into()]), ["enc"]);
        assert!(
            auth.role_policies("spiffe://hospital/ns/billing/sa/x", &[])
                .is_empty()
        );
        auth.delete_role("ehr").await.unwrap();
        assert!(
            auth.role_policies("spiffe://hospital/ns/ehr/sa/api", &[])
                .is_empty()
        );
    }
}
