//! JWT/OIDC access tokens, verified against a JWKS file: the identity providers
//! hospitals already run (Keycloak, Entra ID, Okta, …) issue them, cipherd checks
//! them offline.
//!
//! What is checked, in order: the token's size; its header's `alg`, which must be
//! RS256, ES256 or EdDSA (so `none`, the HMAC family and everything else are
//! refused before any key is touched); the key, chosen by `kid` from the JWKS
//! file only (header `jwk`, `jku`, `x5u` and `x5c` are ignored: a token never
//! brings its own key); that the header's `alg` is the key's (its key type, and
//! its `alg` if the JWK has one); the signature; then `exp` (required), `nbf`,
//! `iss` and `aud` (both required), with the configured clock skew. The
//! signature and claim checks are the `jsonwebtoken` crate's, on aws-lc-rs; this
//! module only chooses the key and the algorithm.
//!
//! The JWKS is parsed once into `DecodingKey`s, and a token that verified is
//! remembered by its SHA-256 until it expires, so a client reusing its access
//! token pays for one signature check, not one per call. Keys and remembered
//! tokens are swapped as a whole on reload
//! ([`JwtVerifier::reload`], and [`JwtVerifier::spawn_watcher`] on SIGHUP and
//! when the file's content changes). A key the verifier cannot use (encryption
//! keys, HMAC secrets, other curves, RSA below 2048 bits) is skipped with a
//! warning; a file with no usable key, or one that does not parse, is refused
//! and the keys in service stay.
//!
//! [`JwtError`] says precisely why a token was refused, for the server log only:
//! clients always get a generic UNAUTHENTICATED. Which principals and groups map
//! to which policies is the roles' business, not this module's.

use std::{
    collections::HashSet,
    fmt, io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, ED25519, ParsedPublicKey};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use dashmap::DashMap;
use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse},
};
use serde::Deserialize;
use serde_json::Value;

use crate::config::ConfigError;

/// The default `jwt.clock_skew_s`.
pub const DEFAULT_CLOCK_SKEW_S: u64 = 60;

/// The largest `jwt.clock_skew_s` accepted: five minutes. More is a broken
/// clock, not skew.
pub const MAX_CLOCK_SKEW_S: u64 = 300;

/// The longest token accepted, in bytes; longer ones are refused unparsed.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The largest JWKS file accepted, in bytes.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// How often [`JwtVerifier::spawn_watcher`] looks at the JWKS file by default.
pub const JWKS_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// The header `alg` values accepted.
pub const ACCEPTED_ALGORITHMS: [&str; 3] = ["RS256", "ES256", "EdDSA"];

/// `[jwt]`: JWT/OIDC access tokens. Off unless `jwks_file` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawJwt {
    /// The JWKS file (the identity provider's public keys, as its
    /// `jwks_uri` serves them). Unset or empty: JWTs are not accepted.
    pub jwks_file: Option<PathBuf>,
    /// The exact `iss` tokens must carry.
    pub issuer: Option<String>,
    /// The audience: one string or a list; a token's `aud` (a string, or any
    /// element of its list) must be one of them.
    pub audience: Option<RawAudience>,
    /// The claim that names the principal (default `sub`).
    pub principal_claim: String,
    /// The claim that lists the principal's groups (default `groups`).
    pub groups_claim: String,
    /// Clock skew allowed on `exp` and `nbf`, in seconds (default 60, at most 300).
    pub clock_skew_s: u64,
}

impl Default for RawJwt {
    fn default() -> Self {
        Self {
            jwks_file: None,
            issuer: None,
            audience: None,
            principal_claim: "sub".into(),
            groups_claim: "groups".into(),
            clock_skew_s: DEFAULT_CLOCK_SKEW_S,
        }
    }
}

/// `jwt.audience`: one string or a list of strings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum RawAudience {
    /// `audience = "cipherd"`
    One(String),
    /// `audience = ["cipherd", "cipherd-prod"]`
    Many(Vec<String>),
}

/// Validated JWT settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtParams {
    /// The JWKS file.
    pub jwks_file: PathBuf,
    /// The required `iss`.
    pub issuer: String,
    /// The accepted audiences (at least one).
    pub audience: Vec<String>,
    /// The claim naming the principal.
    pub principal_claim: String,
    /// The claim listing the groups.
    pub groups_claim: String,
    /// Clock skew allowed on `exp` and `nbf`.
    pub clock_skew: Duration,
}

impl JwtParams {
    /// Validates `[jwt]`; `None` when JWTs are not accepted (`jwks_file` unset).
    /// Does not read the file: [`JwtVerifier::new`] does, at start-up.
    pub fn from_raw(raw: &RawJwt) -> Result<Option<Self>, ConfigError> {
        let bad = |message: &str| Err(ConfigError(message.to_owned()));
        let Some(jwks_file) = raw.jwks_file.clone().filter(|p| !p.as_os_str().is_empty()) else {
            if non_empty(&raw.issuer).is_some() || raw.audience.is_some() {
                return bad("jwt.issuer and jwt.audience need jwt.jwks_file, which is not set");
            }
            return Ok(None);
        };
        let Some(issuer) = non_empty(&raw.issuer) else {
            return bad("jwt.issuer is required when jwt.jwks_file is set");
        };
        let audience = match &raw.audience {
            None => return bad("jwt.audience is required when jwt.jwks_file is set"),
            Some(RawAudience::One(one)) => vec![one.clone()],
            Some(RawAudience::Many(many)) => many.clone(),
        };
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            return bad("jwt.audience must be a non-empty string or a list of them");
        }
        if raw.principal_claim.is_empty() {
            return bad("jwt.principal_claim must not be empty");
        }
        if raw.groups_claim.is_empty() {
            return bad("jwt.groups_claim must not be empty");
        }
        if raw.clock_skew_s > MAX_CLOCK_SKEW_S {
            return Err(ConfigError(format!(
                "jwt.clock_skew_s = {}: at most {MAX_CLOCK_SKEW_S} seconds",
                raw.clock_skew_s
            )));
        }
        Ok(Some(Self {
            jwks_file,
            issuer: issuer.to_owned(),
            audience,
            principal_claim: raw.principal_claim.clone(),
            groups_claim: raw.groups_claim.clone(),
            clock_skew: Duration::from_secs(raw.clock_skew_s),
        }))
    }
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|v| !v.is_empty())
}

/// Who a verified token says the caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtIdentity {
    /// The principal (the configured principal claim, `sub` by default).
    pub subject: String,
    /// The groups (the configured groups claim; empty when absent).
    pub groups: Vec<String>,
    /// The token's `exp` (`None` only if it is beyond what `SystemTime` holds).
    pub expires_at: Option<SystemTime>,
}

/// Why a token was refused. For the server log only: the client always gets a
/// generic UNAUTHENTICATED. Values taken from the token are shortened.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// Longer than [`MAX_TOKEN_BYTES`].
    #[error("token is {0} bytes; at most {MAX_TOKEN_BYTES} are accepted")]
    TooLarge(usize),
    /// Not three base64url parts with a JSON header.
    #[error("token is not a JWT (three base64url parts with a JSON header)")]
    Malformed,
    /// The header's `alg` is not RS256, ES256 or EdDSA (`none`, HS256, …).
    #[error("token algorithm {0:?} is not accepted (only RS256, ES256, EdDSA)")]
    AlgorithmNotAccepted(String),
    /// No `kid` in the header, and the JWKS has several keys.
    #[error("token has no kid and the JWKS has several keys")]
    MissingKid,
    /// No key in the JWKS has the header's `kid`.
    #[error("no key in the JWKS has kid {0:?}")]
    UnknownKid(String),
    /// The header's `alg` is not the chosen key's.
    #[error("token algorithm {header} does not match the key's {key}")]
    AlgorithmMismatch {
        /// The header's algorithm.
        header: &'static str,
        /// The key's algorithm.
        key: &'static str,
    },
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// `exp` has passed (beyond the clock skew).
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future (beyond the clock skew).
    #[error("token not yet valid (nbf)")]
    NotYetValid,
    /// `iss` is not the configured issuer.
    #[error("wrong issuer")]
    WrongIssuer,
    /// `aud` names none of the configured audiences.
    #[error("wrong audience")]
    WrongAudience,
    /// A required claim is missing.
    #[error("claim {0:?} is missing")]
    MissingClaim(String),
    /// A claim has the wrong type (or the principal is empty).
    #[error("claim {0:?} is malformed")]
    BadClaim(String),
    /// Any other refusal by the `jsonwebtoken` crate.
    #[error("token refused: {0}")]
    Refused(#[source] jsonwebtoken::errors::Error),
}

/// Why a JWKS file was not loaded (at start-up: the server does not start; on
/// reload: the keys in service stay).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwksError {
    /// The file could not be read.
    #[error("cannot read JWKS file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Larger than [`MAX_JWKS_BYTES`].
    #[error("JWKS file {path} is {bytes} bytes; at most {MAX_JWKS_BYTES} are accepted")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        bytes: usize,
    },
    /// Not a JSON object with a `keys` array.
    #[error("JWKS file {path} is not a JWK set: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        message: String,
    },
    /// Two keys with one `kid`.
    #[error("JWKS file {path}: two keys have kid {kid:?}")]
    DuplicateKid {
        /// The file.
        path: PathBuf,
        /// The kid.
        kid: String,
    },
    /// Several usable keys, one of them without `kid`: it could never be chosen.
    #[error("JWKS file {path}: key {index} has no kid, but the set has several keys")]
    MissingKid {
        /// The file.
        path: PathBuf,
        /// The key's position in `keys`, from 0.
        index: usize,
    },
    /// No key the verifier can use.
    #[error(
        "JWKS file {path} has no usable key (RS256, ES256 on P-256, EdDSA on Ed25519); {skipped} skipped"
    )]
    NoUsableKey {
        /// The file.
        path: PathBuf,
        /// How many keys were skipped.
        skipped: usize,
    },
}

/// What [`JwtVerifier::reload`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// The file's content is the one in service.
    Unchanged,
    /// New keys are in service.
    Replaced {
        /// How many.
        keys: usize,
    },
}

/// Verifies JWTs against the keys of a JWKS file; shared by all requests.
pub struct JwtVerifier {
    params: JwtParams,
    /// Per algorithm: the claim checks (issuer, audience, skew, required claims).
    validations: [Validation; 3],
    keys: RwLock<Arc<KeySet>>,
    /// Serializes reloads, so two cannot interleave their compare-and-swap.
    reloading: Mutex<()>,
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("jwks_file", &self.params.jwks_file)
            .field("issuer", &self.params.issuer)
            .field("keys", &self.current().keys.len())
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// Loads the JWKS file; an error here should stop the server from starting.
    pub fn new(params: &JwtParams) -> Result<JwtVerifier, JwksError> {
        let content = read_jwks(&params.jwks_file)?;
        let keys = KeySet::parse(&params.jwks_file, content)?;
        let validation = |alg| {
            let mut v = Validation::new(alg);
            v.leeway = params.clock_skew.as_secs();
            v.validate_exp = true;
            v.validate_nbf = true;
            v.validate_aud = true;
            v.required_spec_claims = ["exp", "iss", "aud"].map(String::from).into();
            v.set_issuer(&[&params.issuer]);
            v.set_audience(&params.audience);
            v
        };
        Ok(JwtVerifier {
            validations: [
                validation(Algorithm::RS256),
                validation(Algorithm::ES256),
                validation(Algorithm::EdDSA),
            ],
            params: params.clone(),
            keys: RwLock::new(Arc::new(keys)),
            reloading: Mutex::new(()),
        })
    }

    /// Verifies `token` (without the `Bearer ` prefix).
    ///
    /// A token that verified once is remembered (by its SHA-256, never the
    /// token itself) until its `exp` plus the skew, so a client that reuses its
    /// access token pays for the signature once: later calls only look it up and
    /// check `exp` again. The memory belongs to the key set in service and is
    /// dropped with it on reload, so a key removed from the file stops
    /// verifying at once.
    pub fn verify(&self, token: &str) -> Result<JwtIdentity, JwtError> {
        self.verify_at(token, unix_now())
    }

    /// [`Self::verify`] with `now` (seconds since the epoch) for the check of
    /// remembered tokens; a first verification uses the `jsonwebtoken` clock.
    fn verify_at(&self, token: &str, now: u64) -> Result<JwtIdentity, JwtError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JwtError::TooLarge(token.len()));
        }
        let keys = self.current();
        let fingerprint = fingerprint(token);
        let leeway = self.params.clock_skew.as_secs();
        if let Some(seen) = keys.verified.get(&fingerprint) {
            if now <= seen.exp.saturating_add(leeway) {
                return Ok(seen.identity.clone());
            }
            drop(seen);
            keys.verified.remove(&fingerprint);
            return Err(JwtError::Expired);
        }

        let header = peek_header(token)?;
        let (algorithm, slot) = match header.alg.as_str() {
            "RS256" => (Algorithm::RS256, 0),
            "ES256" => (Algorithm::ES256, 1),
            "EdDSA" => (Algorithm::EdDSA, 2),
            other => return Err(JwtError::AlgorithmNotAccepted(shorten(other))),
        };
        let key = match &header.kid {
            Some(kid) => keys
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid.as_str()))
                .ok_or_else(|| JwtError::UnknownKid(shorten(kid)))?,
            None => match keys.keys.as_slice() {
                [only] => only,
                _ => return Err(JwtError::MissingKid),
            },
        };
        if key.algorithm != algorithm {
            return Err(JwtError::AlgorithmMismatch {
                header: algorithm_name(algorithm),
                key: algorithm_name(key.algorithm),
            });
        }
        let data = jsonwebtoken::decode::<serde_json::Map<String, Value>>(
            token,
            &key.key,
            &self.validations[slot],
        )
        .map_err(classify)?;
        let (identity, exp) = self.identity(&data.claims)?;
        keys.remember(fingerprint, &identity, exp, now.saturating_sub(leeway));
        Ok(identity)
    }

    /// Reads the JWKS file again and, if its content changed and it is valid,
    /// puts its keys in service. On error the keys in service stay.
    pub fn reload(&self) -> Result<Reload, JwksError> {
        let _one_at_a_time = self
            .reloading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let content = read_jwks(&self.params.jwks_file)?;
        if content == self.current().content {
            return Ok(Reload::Unchanged);
        }
        let keys = KeySet::parse(&self.params.jwks_file, content)?;
        let count = keys.keys.len();
        *self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(keys);
        Ok(Reload::Replaced { keys: count })
    }

    /// Reloads on SIGHUP and whenever the file's content changes (looked at
    /// every `interval`, [`JWKS_POLL_INTERVAL`] in production), logging what it
    /// did; a bad file is logged once per distinct error and the keys in
    /// service stay. The task ends when the verifier is dropped. Call from
    /// within a tokio runtime: the SIGHUP handler is installed before this
    /// returns.
    pub fn spawn_watcher(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        use tokio::signal::unix::{SignalKind, signal};

        let weak = Arc::downgrade(self);
        let path = self.params.jwks_file.clone();
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(hangup) => Some(hangup),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler: the JWKS file is reloaded only when it changes");
                None
            }
        };
        tokio::spawn(async move {
            let mut poll = tokio::time::interval(interval);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            poll.tick().await;
            let mut last_error: Option<String> = None;
            loop {
                let on_signal = tokio::select! {
                    _ = poll.tick() => false,
                    () = next_signal(&mut hangup) => true,
                };
                let Some(verifier) = weak.upgrade() else {
                    return;
                };
                let outcome = tokio::task::spawn_blocking(move || verifier.reload()).await;
                match outcome {
                    Ok(Ok(Reload::Replaced { keys })) => {
                        last_error = None;
                        tracing::info!(path = %path.display(), keys, "JWKS reloaded");
                    }
                    Ok(Ok(Reload::Unchanged)) => last_error = None,
                    Ok(Err(e)) => {
                        let message = e.to_string();
                        if on_signal || last_error.as_deref() != Some(message.as_str()) {
                            tracing::error!(error = %message, "JWKS not reloaded; the keys in service stay");
                        }
                        last_error = Some(message);
                    }
                    Err(e) => tracing::error!(error = %e, "JWKS reload task failed"),
                }
            }
        })
    }

    /// The `kid`s of the keys in service, in file order (diagnostics, tests).
    pub fn key_ids(&self) -> Vec<Option<String>> {
        self.current().keys.iter().map(|k| k.kid.clone()).collect()
    }

    fn current(&self) -> Arc<KeySet> {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The identity a verified token's claims name, and its `exp`.
    fn identity(
        &self,
        claims: &serde_json::Map<String, Value>,
    ) -> Result<(JwtIdentity, u64), JwtError> {
        let principal = &self.params.principal_claim;
        let subject = match claims.get(principal) {
            None => return Err(JwtError::MissingClaim(principal.clone())),
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(_) => return Err(JwtError::BadClaim(principal.clone())),
        };
        let groups_claim = &self.params.groups_claim;
        let groups = match claims.get(groups_claim) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(one)) => vec![one.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| item.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| JwtError::BadClaim(groups_claim.clone()))?,
            Some(_) => return Err(JwtError::BadClaim(groups_claim.clone())),
        };
        // `jsonwebtoken` checked that `exp` is present and a non-negative
        // number (rounding a fraction, as it does).
        let exp = claims
            .get("exp")
            .and_then(|exp| {
                exp.as_u64()
                    .or_else(|| exp.as_f64().map(|f| f.round() as u64))
            })
            .ok_or_else(|| JwtError::MissingClaim("exp".into()))?;
        let expires_at = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(exp));
        Ok((
            JwtIdentity {
                subject,
                groups,
                expires_at,
            },
            exp,
        ))
    }
}

/// The parsed keys of one JWKS file, with the bytes they came from and the
/// tokens they verified.
struct KeySet {
    keys: Vec<VerifyingKey>,
    content: Vec<u8>,
    /// Tokens verified under these keys, by SHA-256.
    verified: DashMap<[u8; 32], Verified>,
}

/// A token that verified: who it names, until when.
struct Verified {
    identity: JwtIdentity,
    exp: u64,
}

/// The most verified tokens remembered per key set; when full, expired ones
/// are dropped, and if that is not enough, all of them (they verify again).
pub const MAX_REMEMBERED_TOKENS: usize = 10_000;

struct VerifyingKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<Value>,
}

impl KeySet {
    fn parse(path: &Path, content: Vec<u8>) -> Result<KeySet, JwksError> {
        let raw: RawJwks = serde_json::from_slice(&content).map_err(|e| JwksError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let mut keys: Vec<VerifyingKey> = Vec::new();
        let mut skipped = 0;
        let mut kids = HashSet::new();
        for (index, value) in raw.keys.into_iter().enumerate() {
            let kid = value.get("kid").and_then(Value::as_str).map(str::to_owned);
            let key = serde_json::from_value::<Jwk>(value)
                .map_err(|_| "not a JWK")
                .and_then(|jwk| usable_key(&jwk));
            match key {
                Ok((algorithm, key)) => {
                    if let Some(kid) = &kid
                        && !kids.insert(kid.clone())
                    {
                        return Err(JwksError::DuplicateKid {
                            path: path.to_owned(),
                            kid: kid.clone(),
                        });
                    }
                    keys.push(VerifyingKey {
                        kid,
                        algorithm,
                        key,
                    });
                }
                Err(why) => {
                    skipped += 1;
                    tracing::warn!(path = %path.display(), index, kid = ?kid, why, "JWKS key skipped");
                }
            }
        }
        if keys.is_empty() {
            return Err(JwksError::NoUsableKey {
                path: path.to_owned(),
                skipped,
            });
        }
        if keys.len() > 1
            && let Some(index) = keys.iter().position(|k| k.kid.is_none())
        {
            return Err(JwksError::MissingKid {
                path: path.to_owned(),
                index,
            });
        }
        Ok(KeySet {
            keys,
            content,
            verified: DashMap::new(),
        })
    }

    /// Remembers a verified token; `horizon` is the oldest `exp` still valid.
    fn remember(&self, fingerprint: [u8; 32], identity: &JwtIdentity, exp: u64, horizon: u64) {
        if self.verified.len() >= MAX_REMEMBERED_TOKENS {
            self.verified.retain(|_, seen| seen.exp >= horizon);
            if self.verified.len() >= MAX_REMEMBERED_TOKENS {
                self.verified.clear();
            }
        }
        self.verified.insert(
            fingerprint,
            Verified {
                identity: identity.clone(),
                exp,
            },
        );
    }
}

/// The algorithm a JWK verifies and its decoding key, or why it is skipped.
fn usable_key(jwk: &Jwk) -> Result<(Algorithm, DecodingKey), &'static str> {
    if let Some(key_use) = &jwk.common.public_key_use
        && *key_use != PublicKeyUse::Signature
    {
        return Err("its use is not \"sig\"");
    }
    if let Some(ops) = &jwk.common.key_operations
        && !ops.contains(&KeyOperations::Verify)
    {
        return Err("its key_ops lack \"verify\"");
    }
    let algorithm = match &jwk.algorithm {
        AlgorithmParameters::RSA(rsa) => {
            let n = URL_SAFE_NO_PAD
                .decode(&rsa.n)
                .map_err(|_| "bad RSA modulus")?;
            let bits = n.iter().skip_while(|b| **b == 0).count() * 8;
            if !(2048..=8192).contains(&bits) {
                return Err("RSA modulus outside 2048 to 8192 bits");
            }
            Algorithm::RS256
        }
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            let mut point = vec![0x04];
            point.extend(URL_SAFE_NO_PAD.decode(&ec.x).map_err(|_| "bad EC x")?);
            point.extend(URL_SAFE_NO_PAD.decode(&ec.y).map_err(|_| "bad EC y")?);
            ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
                .map_err(|_| "not a point on P-256")?;
            Algorithm::ES256
        }
        AlgorithmParameters::EllipticCurve(_) => return Err("EC key on a curve other than P-256"),
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            let x = URL_SAFE_NO_PAD
                .decode(&okp.x)
                .map_err(|_| "bad Ed25519 x")?;
            ParsedPublicKey::new(&ED25519, &x).map_err(|_| "not an Ed25519 public key")?;
            Algorithm::EdDSA
        }
        AlgorithmParameters::OctetKeyPair(_) => {
            return Err("OKP key on a curve other than Ed25519");
        }
        AlgorithmParameters::OctetKey(_) => {
            return Err("a symmetric (oct) key: HMAC is not accepted");
        }
        _ => return Err("an unsupported key type"),
    };
    if let Some(alg) = jwk.common.key_algorithm
        && alg != KeyAlgorithm::from(algorithm)
    {
        return Err("its alg is not the one its key type verifies (RS256, ES256, EdDSA)");
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|_| "malformed key parameters")?;
    Ok((algorithm, key))
}

/// The header fields that choose the key; the full header is parsed (and
/// checked) again by `jsonwebtoken::decode`.
#[derive(Deserialize)]
struct HeaderPeek {
    alg: String,
    kid: Option<String>,
}

fn peek_header(token: &str) -> Result<HeaderPeek, JwtError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let json = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| JwtError::Malformed)?;
    serde_json::from_slice(&json).map_err(|_| JwtError::Malformed)
}

fn classify(error: jsonwebtoken::errors::Error) -> JwtError {
    match error.kind() {
        ErrorKind::InvalidSignature => JwtError::BadSignature,
        ErrorKind::ExpiredSignature => JwtError::Expired,
        ErrorKind::ImmatureSignature => JwtError::NotYetValid,
        ErrorKind::InvalidIssuer => JwtError::WrongIssuer,
        ErrorKind::InvalidAudience => JwtError::WrongAudience,
        ErrorKind::MissingRequiredClaim(claim) => JwtError::MissingClaim(claim.clone()),
        ErrorKind::InvalidClaimFormat(claim) => JwtError::BadClaim(claim.clone()),
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => JwtError::Malformed,
        _ => JwtError::Refused(error),
    }
}

fn algorithm_name(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::RS256 => "RS256",
        Algorithm::ES256 => "ES256",
        Algorithm::EdDSA => "EdDSA",
        _ => "other",
    }
}

fn fingerprint(token: &str) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    digest
        .as_ref()
        .try_into()
        .expect("a SHA-256 digest is 32 bytes")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A value from a token, cut for the log (it is attacker-controlled).
fn shorten(value: &str) -> String {
    value.chars().take(64).collect()
}

fn read_jwks(path: &Path) -> Result<Vec<u8>, JwksError> {
    let content = std::fs::read(path).map_err(|source| JwksError::Read {
        path: path.to_owned(),
        source,
    })?;
    if content.len() > MAX_JWKS_BYTES {
        return Err(JwksError::TooLarge {
            path: path.to_owned(),
            bytes: content.len(),
        });
    }
    Ok(content)
}

async fn next_signal(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(signal) => {
            if signal.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> RawJwt {
        RawJwt {
            jwks_file: Some("/etc/cipherd/jwks.json".into()),
            issuer: Some("https://idp.example/realms/clinical".into()),
            audience: Some(RawAudience::One("cipherd".into())),
            ..RawJwt::default()
        }
    }

    #[test]
    fn params_from_raw() {
        assert_eq!(JwtParams::from_raw(&RawJwt::default()).expect("ok"), None);
        let p = JwtParams::from_raw(&raw()).expect("ok").expect("some");
        assert_eq!(p.audience, vec!["cipherd".to_owned()]);
        assert_eq!(p.principal_claim, "sub");
        assert_eq!(p.groups_claim, "groups");
        assert_eq!(p.clock_skew, Duration::from_secs(60));

        let many = RawJwt {
            audience: Some(RawAudience::Many(vec!["a".into(), "b".into()])),
            ..raw()
        };
        let p = JwtParams::from_raw(&many).expect("ok").expect("some");
        assert_eq!(p.audience, vec!["a".to_owned(), "b".to_owned()]);

        let empty_path = RawJwt {
            jwks_file: Some(PathBuf::new()),
            issuer: None,
            audience: None,
            ..raw()
        };
        assert_eq!(JwtParams::from_raw(&empty_path).expect("ok"), None);
    }

    #[test]
    fn params_errors_name_the_option() {
        let cases = [
            (
                RawJwt {
                    issuer: None,
                    ..raw()
                },
                "jwt.issuer",
            ),
            (
                RawJwt {
                    issuer: Some(String::new()),
                    ..raw()
                },
                "jwt.issuer",
            ),
            (
                RawJwt {
                    audience: None,
                    ..raw()
                },
                "jwt.audience",
            ),
            (
                RawJwt {
                    audience: Some(RawAudience::Many(vec![])),
                    ..raw()
                },
                "jwt.audience",
            ),
            (
                RawJwt {
                    audience: Some(RawAudience::One(String::new())),
                    ..raw()
                },
                "jwt.audience",
            ),
            (
                RawJwt {
                    principal_claim: String::new(),
                    ..raw()
                },
                "jwt.principal_claim",
            ),
            (
                RawJwt {
                    groups_claim: String::new(),
                    ..raw()
                },
                "jwt.groups_claim",
            ),
            (
                RawJwt {
                    clock_skew_s: MAX_CLOCK_SKEW_S + 1,
                    ..raw()
                },
                "jwt.clock_skew_s",
            ),
            (
                RawJwt {
                    jwks_file: None,
                    ..raw()
                },
                "jwt.jwks_file",
            ),
        ];
        for (raw, option) in cases {
            let err = JwtParams::from_raw(&raw).expect_err("invalid").0;
            assert!(err.contains(option), "{err} should name {option}");
        }
        let max = RawJwt {
            clock_skew_s: MAX_CLOCK_SKEW_S,
            ..raw()
        };
        assert!(JwtParams::from_raw(&max).is_ok());
    }

    /// Through the `config` crate, as the server loads it: audience as a
    /// string or a list, defaults filled in, unknown keys refused.
    #[test]
    fn loads_through_the_config_layers() {
        let dir = tempfile::tempdir().expect("temp dir");
        let load = |body: &str| {
            let path = dir.path().join("cipherd.toml");
            std::fs::write(&path, body).expect("write");
            crate::config::RawConfig::load(Some(&path), &[]).map(|raw| raw.jwt)
        };
        let one = load("[jwt]\njwks_file = \"/j.json\"\nissuer = \"i\"\naudience = \"cipherd\"\n")
            .expect("loads");
        assert_eq!(one.audience, Some(RawAudience::One("cipherd".into())));
        assert_eq!(one.principal_claim, "sub");
        assert_eq!(one.clock_skew_s, DEFAULT_CLOCK_SKEW_S);
        let many = load(
            "[jwt]\njwks_file = \"/j.json\"\nissuer = \"i\"\naudience = [\"a\", \"b\"]\n\
             principal_claim = \"email\"\nclock_skew_s = 30\n",
        )
        .expect("loads");
        assert_eq!(
            many.audience,
            Some(RawAudience::Many(vec!["a".into(), "b".into()]))
        );
        let p = JwtParams::from_raw(&many).expect("ok").expect("some");
        assert_eq!(p.principal_claim, "email");
        assert_eq!(p.clock_skew, Duration::from_secs(30));
        assert!(load("[jwt]\njwks = \"/j.json\"\n").is_err());
        assert!(load("").expect("loads").jwks_file.is_none());
    }

    /// `docs/config.reference.toml` documents `[jwt]` with its real defaults
    /// (and leaves JWTs off).
    #[test]
    fn the_reference_file_has_the_defaults() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/config.reference.toml"
        );
        let text = std::fs::read_to_string(path).expect("reference file");
        let after = text.split("\n[jwt]\n").nth(1).expect("[jwt] section");
        // Up to the next table.
        let section = after.split("\n[").next().expect("section");
        let raw: toml::Table = toml::from_str(section).expect("TOML");
        let jwt: RawJwt = raw.try_into().expect("RawJwt");
        let defaults = RawJwt::default();
        assert_eq!(jwt.principal_claim, defaults.principal_claim);
        assert_eq!(jwt.groups_claim, defaults.groups_claim);
        assert_eq!(jwt.clock_skew_s, defaults.clock_skew_s);
        assert!(jwt.jwks_file.is_none());
        for option in ["jwks_file", "issuer", "audience"] {
            assert!(section.contains(&format!("# {option} = ")), "{option}");
        }
    }

    fn verifier_for(issuer: &cipherd_test_support::jwt::TestIssuer) -> JwtVerifier {
        JwtVerifier::new(&JwtParams {
            jwks_file: issuer.jwks_path().to_owned(),
            issuer: issuer.issuer.clone(),
            audience: vec![issuer.audience.clone()],
            principal_claim: "sub".into(),
            groups_claim: "groups".into(),
            clock_skew: Duration::from_secs(60),
        })
        .expect("JWKS loads")
    }

    #[test]
    fn verified_tokens_are_remembered_until_they_expire() {
        use cipherd_test_support::jwt::{JwtAlg, TestIssuer};

        let issuer = TestIssuer::new();
        let verifier = verifier_for(&issuer);
        let now = unix_now();
        let mut claims = issuer.claims("alice");
        claims["exp"] = serde_json::json!(now + 100);
        claims["groups"] = serde_json::json!(["ward-3"]);
        let token = issuer.mint(JwtAlg::EdDSA, &claims);
        let first = verifier.verify_at(&token, now).expect("valid");
        assert_eq!(verifier.current().verified.len(), 1);
        // Only the remembered path sees these clocks (the signature check uses
        // the real one): it still checks `exp`, with the skew.
        assert_eq!(
            verifier.verify_at(&token, now + 160).expect("in skew"),
            first
        );
        assert!(matches!(
            verifier.verify_at(&token, now + 161),
            Err(JwtError::Expired)
        ));
        assert_eq!(verifier.current().verified.len(), 0, "forgotten");
        // Verified afresh, and remembered again.
        assert_eq!(verifier.verify(&token).expect("valid"), first);
        assert_eq!(verifier.current().verified.len(), 1);
        // A refused token is never remembered.
        let tampered = format!("{}x", &token[..token.len() - 1]);
        assert!(verifier.verify(&tampered).is_err());
        assert_eq!(verifier.current().verified.len(), 1);
    }

    #[test]
    fn remembered_tokens_are_bounded() {
        let issuer = cipherd_test_support::jwt::TestIssuer::new();
        let verifier = verifier_for(&issuer);
        let keys = verifier.current();
        let identity = JwtIdentity {
            subject: "s".into(),
            groups: vec![],
            expires_at: None,
        };
        let fp = |i: usize| {
            let mut f = [0u8; 32];
            f[..8].copy_from_slice(&(i as u64).to_le_bytes());
            f
        };
        for i in 0..MAX_REMEMBERED_TOKENS {
            keys.remember(fp(i), &identity, 1_000, 0);
        }
        assert_eq!(keys.verified.len(), MAX_REMEMBERED_TOKENS);
        // Full of expired tokens: those go.
        keys.remember(fp(usize::MAX), &identity, 5_000, 2_000);
        assert_eq!(keys.verified.len(), 1);
        // Full of valid tokens: all go.
        for i in 1..MAX_REMEMBERED_TOKENS {
            keys.remember(fp(i), &identity, 5_000, 2_000);
        }
        keys.remember(fp(0), &identity, 5_000, 2_000);
        assert_eq!(keys.verified.len(), 1);
    }

    #[test]
    fn header_peek() {
        let enc = |s: &str| URL_SAFE_NO_PAD.encode(s);
        let token = format!("{}.{}.sig", enc(r#"{"alg":"RS256","kid":"k1"}"#), enc("{}"));
        let h = peek_header(&token).expect("parses");
        assert_eq!((h.alg.as_str(), h.kid.as_deref()), ("RS256", Some("k1")));
        for bad in [
            String::new(),
            "a.b".into(),
            "a.b.c.d".into(),
            format!("{}.e30.", enc("not json")),
            format!("{}.e30.", enc(r#"{"kid":"k"}"#)),
            format!("{}.e30.", enc(r#"{"alg":"RS256","alg":"HS256"}"#)),
            "!!!.e30.x".into(),
        ] {
            assert!(
                matches!(peek_header(&bad), Err(JwtError::Malformed)),
                "{bad}"
            );
        }
    }

    #[test]
    fn long_values_are_shortened_for_the_log() {
        assert_eq!(shorten(&"é".repeat(100)).chars().count(), 64);
    }
}
