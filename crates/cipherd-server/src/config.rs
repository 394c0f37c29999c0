//! Configuration in two stages: layered raw sources, then validated parameters.
//!
//! [`RawConfig`] is what the `config` crate assembles from built-in defaults, an
//! optional TOML file, `CIPHERD_SERVER_*` environment variables (nested keys
//! joined by `__`, e.g. `CIPHERD_SERVER_LIMITS__MAX_BATCH_ITEMS`) and command-line
//! flags, in that order of precedence (flags win). The server's prefix is its own
//! so that the client's variables (`CIPHERD_ADDR`, `CIPHERD_TOKEN`,
//! `CIPHERD_CACERT`, exported for cipherctl in the same shell) never reach it. [`Params`] is the validated, immutable result the
//! server runs on; invalid combinations are rejected here, at start-up, with a
//! message naming the option. Every option is documented in
//! `docs/config.reference.toml`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use cipherd_core::key_type::RANDOM_96_BIT_NONCE_LIMIT;
use serde::Deserialize;

use crate::Error;

/// Raw configuration as deserialized from all sources (see the module docs).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Address to listen on.
    pub listen: String,
    /// Directory for the SQLite database and, in dev mode, the dev unseal key.
    pub data_dir: PathBuf,
    /// Dev mode: initialize and unseal automatically (insecure).
    pub dev: bool,
    /// Logging.
    pub log: RawLog,
    /// Storage backend.
    pub storage: RawStorage,
    /// Request limits.
    pub limits: RawLimits,
    /// Key usage policy.
    pub keys: RawKeys,
    /// Process memory hygiene.
    pub memory: RawMemory,
    /// TLS on the gRPC listener (`[tls]`).
    #[serde(default)]
    pub tls: crate::edge::tls::RawTls,
    /// Audit sinks (`[[audit]]` tables).
    #[serde(default, deserialize_with = "crate::audit::deserialize_sinks")]
    pub audit: Vec<crate::audit::RawAuditSink>,
    /// Tokens (`[auth]`).
    pub auth: RawAuth,
    /// JWT/OIDC access tokens (`[jwt]`).
    #[serde(default)]
    pub jwt: crate::auth::jwt::RawJwt,
    /// Unattended unseal (`[seal]`).
    #[serde(default)]
    pub seal: RawSeal,
}

/// `[seal]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSeal {
    /// A file holding a threshold of unseal shares, one per line, submitted at
    /// start (a mounted Kubernetes Secret, say).
    pub auto_unseal_file: Option<PathBuf>,
    /// The name of an environment variable holding them (whitespace-separated).
    pub auto_unseal_env: Option<String>,
    /// Another cipherd whose transit key decrypts this server's shares:
    /// `https://host:port` (plain `http://` only on loopback).
    pub transit_address: Option<String>,
    /// The key on `transit_address` the shares are encrypted under.
    pub transit_key: Option<String>,
    /// A file holding the token for `transit_address` (not world-readable).
    pub transit_token_file: Option<PathBuf>,
    /// PEM CA certificate of `transit_address`'s TLS certificate.
    pub transit_ca_file: Option<PathBuf>,
    /// A file of text ciphertexts (one per line), each a share encrypted under
    /// `transit_key` with the associated data [`TRANSIT_UNSEAL_AAD`].
    pub transit_shares_file: Option<PathBuf>,
}

/// The associated data every share's ciphertext for transit auto-unseal is made
/// with (`cipherctl encrypt KEY --aad cipherd-auto-unseal --lines`), so that no
/// other ciphertext of the same key can be passed off as one.
pub const TRANSIT_UNSEAL_AAD: &str = "cipherd-auto-unseal";

/// `[auth]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// Lifetime of a token created without a TTL, in seconds.
    pub default_token_ttl_s: u64,
    /// Longest lifetime a token may be created with, in seconds.
    pub max_token_ttl_s: u64,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    /// A `tracing` filter, e.g. `info` or `cipherd_server=debug,info`.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

/// `[storage]`
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    /// `sqlite` (the default) or `postgres`.
    pub backend: String,
    /// SQLite file; empty means `<data_dir>/cipherd.db`.
    pub path: Option<PathBuf>,
    /// PostgreSQL connection URL (may carry a password: never logged).
    pub url: Option<String>,
    /// PostgreSQL: most pooled connections.
    pub pool_size: u32,
    /// PostgreSQL: longest a statement may run, in milliseconds.
    pub statement_timeout_ms: u64,
    /// PostgreSQL: CA file for `sslmode=verify-full`.
    pub ca_file: Option<PathBuf>,
    /// PostgreSQL: seconds between forced cache reloads (0: only after a lost
    /// listener connection).
    pub resync_interval_s: u64,
}

/// By hand, so that the URL's password never reaches a log line.
impl std::fmt::Debug for RawStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawStorage")
            .field("backend", &self.backend)
            .field("path", &self.path)
            .field("url", &self.url.as_ref().map(|_| "[redacted]"))
            .field("pool_size", &self.pool_size)
            .field("statement_timeout_ms", &self.statement_timeout_ms)
            .field("ca_file", &self.ca_file)
            .field("resync_interval_s", &self.resync_interval_s)
            .finish()
    }
}

/// `[limits]` (each option is described in `docs/config.reference.toml`)
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Largest plaintext accepted per item, in bytes.
    pub max_plaintext_bytes: usize,
    /// Largest associated data accepted per item, in bytes.
    pub max_associated_data_bytes: usize,
    /// Largest derivation context accepted per item, in bytes.
    pub max_context_bytes: usize,
    /// Most items in one batch request.
    pub max_batch_items: usize,
    /// Largest gRPC message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Request message bytes all requests together may hold at once.
    pub max_buffered_request_bytes: usize,
    /// Requests (streams included) served at once; more are refused.
    pub max_concurrent_requests: usize,
    /// Client connections open at once; more are closed at once.
    pub max_connections: usize,
    /// HTTP/2 streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Time to the response, and for each request message, in milliseconds.
    pub request_timeout_ms: u64,
    /// Time for a new connection to deliver its first request, in milliseconds.
    pub header_read_timeout_ms: u64,
    /// Time a connection may sit with no request in flight, in milliseconds.
    pub idle_timeout_ms: u64,
    /// Quiet time after which the server pings a connection, in milliseconds.
    pub keepalive_interval_ms: u64,
    /// Time a ping may go unanswered before the connection is closed, in milliseconds.
    pub keepalive_timeout_ms: u64,
    /// Requests per second one principal may make; 0: no per-principal limit.
    pub principal_rate: u32,
    /// Requests one principal may make at once above its rate; 0: the rate.
    pub principal_burst: u32,
}

/// `[keys]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeys {
    /// Encryptions allowed per version of a 96-bit-nonce key (≤ 0.9 × 2^32).
    pub usage_limit: u64,
    /// Encryptions reserved from storage at a time, per version and replica.
    pub usage_reservation_block: u64,
    /// At the limit: `rotate` (add a version and continue) or `refuse`.
    pub usage_limit_action: String,
    /// Default and shortest waiting period of `DeleteKey`, in seconds.
    pub deletion_waiting_period_s: u64,
    /// Shortest `auto_rotate_period` a key may have, in seconds.
    pub min_auto_rotate_period_s: u64,
    /// How often scheduled deletions and rotations are looked for, in ms.
    pub housekeeping_interval_ms: u64,
    /// How often per-version use statistics are written to storage, in ms.
    pub stats_flush_interval_ms: u64,
}

/// `[memory]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMemory {
    /// Lock all memory into RAM (`mlockall`) so no secret is ever swapped out.
    pub lock: bool,
}

/// Validated, immutable server parameters.
#[derive(Debug, Clone)]
pub struct Params {
    /// Dev mode (auto init/unseal from `<data_dir>/dev-unseal-share.INSECURE`).
    pub dev: bool,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Storage backend.
    pub storage: StorageParams,
    /// Request limits.
    pub limits: Limits,
    /// Usage policy of 96-bit-nonce key types.
    pub usage: UsagePolicy,
    /// Scheduled deletion and rotation, use statistics.
    pub lifecycle: LifecycleParams,
    /// Process memory hygiene, applied by the binary (see [`crate::memory`]).
    pub memory: MemoryParams,
    /// TLS on the listener; `None` serves plaintext (dev on loopback, or
    /// `tls.disable = true` behind a TLS-terminating sidecar).
    pub tls: Option<crate::edge::tls::TlsParams>,
    /// Audit sinks.
    pub audit: crate::audit::AuditParams,
    /// Token lifetimes.
    pub auth: AuthParams,
    /// JWT verification; `None` when JWTs are not accepted.
    pub jwt: Option<crate::auth::jwt::JwtParams>,
    /// Where unseal shares for an unattended start come from, if anywhere.
    pub auto_unseal: Option<AutoUnseal>,
}

/// The source of the unseal shares submitted at start (`[seal]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AutoUnseal {
    /// `seal.auto_unseal_file`: one share per line (other lines ignored).
    File(PathBuf),
    /// `seal.auto_unseal_env`: the variable's name.
    Env(String),
    /// `seal.transit_*`: shares encrypted under another cipherd's key.
    Transit(TransitUnseal),
}

/// Auto-unseal through another cipherd's transit key (`seal.transit_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransitUnseal {
    /// `seal.transit_address`, e.g. `https://kms.internal:8210`.
    pub address: String,
    /// `seal.transit_key`.
    pub key: String,
    /// `seal.transit_token_file`.
    pub token_file: PathBuf,
    /// `seal.transit_ca_file` (required for `https://`).
    pub ca_file: Option<PathBuf>,
    /// `seal.transit_shares_file`.
    pub shares_file: PathBuf,
}

/// Token lifetimes (`[auth]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthParams {
    /// Lifetime of a token created without a TTL.
    pub default_token_ttl: Duration,
    /// Longest lifetime a token may be created with.
    pub max_token_ttl: Duration,
}

impl AuthParams {
    /// The built-in defaults: tokens live 8 hours (a shift) unless asked for
    /// longer, and at most 32 days.
    pub const DEFAULT: AuthParams = AuthParams {
        default_token_ttl: Duration::from_secs(8 * 3600),
        max_token_ttl: Duration::from_secs(32 * 24 * 3600),
    };
}

/// Process memory hygiene (`[memory]`). The `cipherd` binary applies it at start;
/// [`crate::run`] does not (an embedding process keeps its own settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryParams {
    /// `memory.lock`: lock all memory with `mlockall`; failing to is a start-up error.
    pub lock: bool,
}

/// Which store to open.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StorageParams {
    /// The embedded SQLite file.
    Sqlite {
        /// Path of the database file.
        path: PathBuf,
    },
    /// A PostgreSQL database, possibly shared with other replicas.
    Postgres {
        /// URL, pool size, statement timeout and TLS (its `Debug` hides the
        /// password).
        config: cipherd_store::PostgresConfig,
    },
}

impl StorageParams {
    /// The backend's name, as in `storage.backend` (and `Status.storage`).
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sqlite { .. } => "sqlite",
            Self::Postgres { .. } => "postgres",
        }
    }
}

/// Request limits: per item, per message, and the edge's bounds on connections,
/// streams, concurrency, buffered bytes and time (see `docs/config.reference.toml`
/// for what each protects against).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest plaintext per item, in bytes.
    pub max_plaintext_bytes: usize,
    /// Largest associated data per item, in bytes.
    pub max_associated_data_bytes: usize,
    /// Largest derivation context per item, in bytes.
    pub max_context_bytes: usize,
    /// Most items per batch.
    pub max_batch_items: usize,
    /// Largest gRPC message, in bytes (at most `u32::MAX`, the gRPC framing's).
    pub max_message_bytes: usize,
    /// Request message bytes all requests together may hold at once (at least
    /// `max_message_bytes`).
    pub max_buffered_request_bytes: usize,
    /// Requests (streams included) served at once; more are shed.
    pub max_concurrent_requests: usize,
    /// Client connections open at once; more are closed on accept.
    pub max_connections: usize,
    /// HTTP/2 streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Deadline for a response to start, and for each request message to arrive.
    pub request_timeout: Duration,
    /// Deadline for a new connection's first request.
    pub header_read_timeout: Duration,
    /// How long a connection may have no request in flight.
    pub idle_timeout: Duration,
    /// Quiet time after which the server sends an HTTP/2 PING.
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// Requests per second per principal (0: unlimited).
    pub principal_rate: u32,
    /// Burst per principal above the rate (0: the rate).
    pub principal_burst: u32,
}

impl Limits {
    /// The built-in defaults (the `limits.*` rows of [`DEFAULTS`]).
    pub const DEFAULT: Limits = Limits {
        max_plaintext_bytes: 1 << 20,
        max_associated_data_bytes: 64 << 10,
        max_context_bytes: 4 << 10,
        max_batch_items: 10_000,
        max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        max_buffered_request_bytes: 256 << 20,
        max_concurrent_requests: 1024,
        max_connections: 512,
        max_concurrent_streams: 100,
        request_timeout: Duration::from_secs(30),
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(300),
        keepalive_interval: Duration::from_secs(60),
        keepalive_timeout: Duration::from_secs(20),
        principal_rate: 0,
        principal_burst: 0,
    };

    /// Checks one item's variable-length fields against the per-item limits:
    /// `plaintext` (empty for decrypt and rewrap items), `associated_data` and
    /// `context`. Rewrap checks its destination context with
    /// [`check_context`](Self::check_context) as well.
    ///
    /// The error is INVALID_ARGUMENT / `TOO_LARGE`, naming the option; in a batch
    /// it fails only that item.
    pub fn check_item(
        &self,
        plaintext: &[u8],
        associated_data: &[u8],
        context: &[u8],
    ) -> Result<(), Error> {
        self.check_plaintext(plaintext.len())?;
        self.check_associated_data(associated_data.len())?;
        self.check_context(context.len())
    }

    /// `limits.max_plaintext_bytes` for a plaintext of `len` bytes.
    pub fn check_plaintext(&self, len: usize) -> Result<(), Error> {
        too_large(
            "plaintext",
            len,
            self.max_plaintext_bytes,
            "limits.max_plaintext_bytes",
        )
    }

    /// `limits.max_associated_data_bytes` for associated data of `len` bytes.
    pub fn check_associated_data(&self, len: usize) -> Result<(), Error> {
        too_large(
            "associated data",
            len,
            self.max_associated_data_bytes,
            "limits.max_associated_data_bytes",
        )
    }

    /// `limits.max_context_bytes` for a derivation context of `len` bytes.
    pub fn check_context(&self, len: usize) -> Result<(), Error> {
        too_large(
            "context",
            len,
            self.max_context_bytes,
            "limits.max_context_bytes",
        )
    }
}

fn too_large(
    what: &'static str,
    actual: usize,
    limit: usize,
    setting: &'static str,
) -> Result<(), Error> {
    if actual <= limit {
        return Ok(());
    }
    Err(Error::TooLarge {
        what,
        actual,
        limit,
        unit: "bytes",
        setting,
    })
}

/// Scheduled deletion, automatic rotation and use statistics (`[keys]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LifecycleParams {
    /// Default and shortest wait between `DeleteKey` and the destruction.
    pub deletion_waiting_period: Duration,
    /// Shortest `auto_rotate_period` accepted.
    pub min_auto_rotate_period: Duration,
    /// Interval of the sweep for due deletions and rotations.
    pub housekeeping_interval: Duration,
    /// Interval of the use-statistics flush.
    pub stats_flush_interval: Duration,
}

impl LifecycleParams {
    /// The defaults: 7 days, 1 hour, 60 s, 10 s.
    pub const DEFAULT: Self = Self {
        deletion_waiting_period: Duration::from_secs(7 * 24 * 3600),
        min_auto_rotate_period: Duration::from_secs(3600),
        housekeeping_interval: Duration::from_secs(60),
        stats_flush_interval: Duration::from_secs(10),
    };

    /// The longest waiting period a `DeleteKey` may ask for (365 days).
    pub const MAX_DELETION_WAITING_PERIOD: Duration = Duration::from_secs(365 * 24 * 3600);
}

/// How encryptions under 96-bit random nonce key types are counted and capped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsagePolicy {
    /// Encryptions allowed per key version.
    pub limit: u64,
    /// Reservation granularity (encryptions reserved per storage write).
    pub reservation_block: u64,
    /// What to do when the latest version is exhausted.
    pub on_limit: LimitAction,
}

/// What happens when the latest version of a counted key reaches its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitAction {
    /// Add a new version and continue under it.
    Rotate,
    /// Refuse with RESOURCE_EXHAUSTED until an operator rotates.
    Refuse,
}

/// A configuration that cannot be used; the message names the option.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

/// The default `limits.max_message_bytes`: 16 MiB, a client's largest batch
/// (1,000 items of up to 16 KiB, its default chunk) with room for the framing;
/// larger items go in smaller batches. See `docs/config.reference.toml`.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Environment variables `CIPHERD_SERVER_<KEY>` set server options. Distinct from
/// the `CIPHERD_*` variables of cipherctl and the client library.
pub const ENV_PREFIX: &str = "CIPHERD_SERVER";

/// Built-in defaults, the first layer of every configuration.
pub const DEFAULTS: &[(&str, &str)] = &[
    ("listen", "127.0.0.1:8210"),
    ("data_dir", "./cipherd-data"),
    ("dev", "false"),
    ("log.level", "info"),
    ("log.format", "text"),
    ("storage.backend", "sqlite"),
    ("storage.pool_size", "10"),
    ("storage.statement_timeout_ms", "30000"),
    ("storage.resync_interval_s", "300"),
    ("limits.max_plaintext_bytes", "1048576"),
    ("limits.max_associated_data_bytes", "65536"),
    ("limits.max_context_bytes", "4096"),
    ("limits.max_batch_items", "10000"),
    ("limits.max_message_bytes", "16777216"),
    ("limits.max_buffered_request_bytes", "268435456"),
    ("limits.max_concurrent_requests", "1024"),
    ("limits.max_connections", "512"),
    ("limits.max_concurrent_streams", "100"),
    ("limits.request_timeout_ms", "30000"),
    ("limits.header_read_timeout_ms", "10000"),
    ("limits.idle_timeout_ms", "300000"),
    ("limits.keepalive_interval_ms", "60000"),
    ("limits.keepalive_timeout_ms", "20000"),
    ("limits.principal_rate", "0"),
    ("limits.principal_burst", "0"),
    ("keys.usage_limit", "3865470566"),
    ("keys.usage_reservation_block", "65536"),
    ("keys.usage_limit_action", "rotate"),
    ("keys.deletion_waiting_period_s", "604800"),
    ("keys.min_auto_rotate_period_s", "3600"),
    ("keys.housekeeping_interval_ms", "60000"),
    ("keys.stats_flush_interval_ms", "10000"),
    ("memory.lock", "false"),
    ("auth.default_token_ttl_s", "28800"),
    ("auth.max_token_ttl_s", "2764800"),
];

impl RawConfig {
    /// Assembles defaults, `file` (if any), [`ENV_PREFIX`]`_*` environment
    /// variables and `overrides` (from flags), later sources winning.
    pub fn load(
        file: Option<&std::path::Path>,
        overrides: &[(&str, String)],
    ) -> Result<Self, ConfigError> {
        Self::load_with_env(file, overrides, None)
    }

    /// [`load`](Self::load), reading the environment from `env` instead of the
    /// process's when given (tests: setting process variables needs `unsafe`).
    fn load_with_env(
        file: Option<&std::path::Path>,
        overrides: &[(&str, String)],
        env: Option<config::Map<String, String>>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        for (key, value) in DEFAULTS {
            builder = builder
                .set_default(*key, *value)
                .map_err(|e| ConfigError(e.to_string()))?;
        }
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__")
                .source(env)
                .try_parsing(true),
        );
        for (key, value) in overrides {
            builder = builder
                .set_override(*key, value.as_str())
                .map_err(|e| ConfigError(e.to_string()))?;
        }
        builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError(e.to_string()))
    }

    /// The listen address, validated.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen
            .parse()
            .map_err(|e| ConfigError(format!("listen = {:?}: {e}", self.listen)))
    }
}

impl TryFrom<RawConfig> for Params {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, ConfigError> {
        let storage = storage_params(&raw.storage, &raw.data_dir)?;
        let limits = Limits::try_from(&raw.limits)?;
        let k = &raw.keys;
        if k.usage_limit == 0 || k.usage_limit > RANDOM_96_BIT_NONCE_LIMIT {
            return Err(ConfigError(format!(
                "keys.usage_limit = {}: must be between 1 and {RANDOM_96_BIT_NONCE_LIMIT} (0.9 × 2^32, NIST SP 800-38D)",
                k.usage_limit
            )));
        }
        if k.usage_reservation_block == 0 || k.usage_reservation_block > 1 << 24 {
            return Err(ConfigError(
                "keys.usage_reservation_block must be between 1 and 16777216".into(),
            ));
        }
        let on_limit = match k.usage_limit_action.as_str() {
            "rotate" => LimitAction::Rotate,
            "refuse" => LimitAction::Refuse,
            other => {
                return Err(ConfigError(format!(
                    "keys.usage_limit_action = {other:?}: expected \"rotate\" or \"refuse\""
                )));
            }
        };
        if k.deletion_waiting_period_s > LifecycleParams::MAX_DELETION_WAITING_PERIOD.as_secs() {
            return Err(ConfigError(
                "keys.deletion_waiting_period_s must be at most 31536000 (365 days)".into(),
            ));
        }
        for (setting, ms) in [
            ("keys.housekeeping_interval_ms", k.housekeeping_interval_ms),
            ("keys.stats_flush_interval_ms", k.stats_flush_interval_ms),
        ] {
            if ms == 0 {
                return Err(ConfigError(format!("{setting} must be at least 1")));
            }
        }
        let lifecycle = LifecycleParams {
            deletion_waiting_period: Duration::from_secs(k.deletion_waiting_period_s),
            min_auto_rotate_period: Duration::from_secs(k.min_auto_rotate_period_s),
            housekeeping_interval: Duration::from_millis(k.housekeeping_interval_ms),
            stats_flush_interval: Duration::from_millis(k.stats_flush_interval_ms),
        };
        let tls = crate::edge::tls::TlsParams::from_raw(&raw.tls, raw.dev, &raw.listen)?;
        let audit = crate::audit::AuditParams::from_raw(&raw.audit, raw.dev, &raw.data_dir)?;
        Ok(Params {
            dev: raw.dev,
            data_dir: raw.data_dir,
            storage,
            limits,
            usage: UsagePolicy {
                limit: k.usage_limit,
                reservation_block: k.usage_reservation_block,
                on_limit,
            },
            lifecycle,
            memory: MemoryParams {
                lock: raw.memory.lock,
            },
            tls,
            audit,
            auth: auth_params(&raw.auth)?,
            jwt: crate::auth::jwt::JwtParams::from_raw(&raw.jwt)?,
            auto_unseal: match (
                raw.seal.auto_unseal_file.clone(),
                raw.seal.auto_unseal_env.clone(),
            ) {
                (None, None) => transit_unseal(&raw.seal)?.map(AutoUnseal::Transit),
                (_, _) if transit_unseal(&raw.seal)?.is_some() => {
                    return Err(ConfigError(
                        "seal.transit_* and seal.auto_unseal_file / auto_unseal_env: set one way to auto-unseal, not two".into(),
                    ));
                }
                (Some(path), None) if !path.as_os_str().is_empty() => Some(AutoUnseal::File(path)),
                (None, Some(var)) if !var.is_empty() => Some(AutoUnseal::Env(var)),
                (Some(_), Some(_)) => {
                    return Err(ConfigError(
                        "seal.auto_unseal_file and seal.auto_unseal_env: set one, not both".into(),
                    ));
                }
                _ => {
                    return Err(ConfigError(
                        "seal.auto_unseal_file / seal.auto_unseal_env must not be empty".into(),
                    ));
                }
            },
        })
    }
}

/// `seal.transit_*`: all of address, key, token file and shares file, or none.
fn transit_unseal(seal: &RawSeal) -> Result<Option<TransitUnseal>, ConfigError> {
    let any = seal.transit_address.is_some()
        || seal.transit_key.is_some()
        || seal.transit_token_file.is_some()
        || seal.transit_ca_file.is_some()
        || seal.transit_shares_file.is_some();
    if !any {
        return Ok(None);
    }
    let (Some(address), Some(key), Some(token_file), Some(shares_file)) = (
        seal.transit_address.clone(),
        seal.transit_key.clone(),
        seal.transit_token_file.clone(),
        seal.transit_shares_file.clone(),
    ) else {
        return Err(ConfigError(
            "seal.transit_address, seal.transit_key, seal.transit_token_file and \
             seal.transit_shares_file are all needed for transit auto-unseal"
                .into(),
        ));
    };
    let uri: http::Uri = address
        .parse()
        .map_err(|e| ConfigError(format!("seal.transit_address = {address:?}: {e}")))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("https"), Some(_)) => {
            if seal.transit_ca_file.is_none() {
                return Err(ConfigError(
                    "seal.transit_ca_file is needed for an https:// seal.transit_address".into(),
                ));
            }
        }
        (Some("http"), Some("127.0.0.1" | "localhost" | "[::1]")) => {}
        _ => {
            return Err(ConfigError(format!(
                "seal.transit_address = {address:?}: expected https://HOST:PORT \
                 (plain http:// only on loopback: the replies are unseal shares)"
            )));
        }
    }
    Ok(Some(TransitUnseal {
        address,
        key,
        token_file,
        ca_file: seal.transit_ca_file.clone(),
        shares_file,
    }))
}

/// `[storage]`: the backend and its options; options of the other backend are
/// refused rather than silently ignored.
fn storage_params(
    raw: &RawStorage,
    data_dir: &std::path::Path,
) -> Result<StorageParams, ConfigError> {
    let path = raw.path.clone().filter(|p| !p.as_os_str().is_empty());
    let url = raw.url.clone().filter(|u| !u.is_empty());
    let ca_file = raw.ca_file.clone().filter(|p| !p.as_os_str().is_empty());
    match raw.backend.as_str() {
        "sqlite" => {
            if url.is_some() || ca_file.is_some() {
                return Err(ConfigError(
                    "storage.url and storage.ca_file are for storage.backend = \"postgres\"; \
                     the backend is \"sqlite\""
                        .into(),
                ));
            }
            Ok(StorageParams::Sqlite {
                path: path.unwrap_or_else(|| data_dir.join("cipherd.db")),
            })
        }
        "postgres" => {
            if path.is_some() {
                return Err(ConfigError(
                    "storage.path is the SQLite file; with storage.backend = \"postgres\" \
                     set storage.url instead"
                        .into(),
                ));
            }
            let url = url.ok_or_else(|| {
                ConfigError(
                    "storage.backend = \"postgres\" needs storage.url \
                     (or CIPHERD_SERVER_STORAGE__URL), e.g. \
                     postgres://cipherd@db.internal:5432/cipherd?sslmode=verify-full"
                        .into(),
                )
            })?;
            // The store's message never repeats the URL (it may carry a password).
            let mut config = cipherd_store::PostgresConfig::new(url)
                .map_err(|e| ConfigError(format!("storage.url: {e}")))?;
            if raw.pool_size == 0 || raw.pool_size > MAX_POOL_SIZE {
                return Err(ConfigError(format!(
                    "storage.pool_size = {}: must be between 1 and {MAX_POOL_SIZE}",
                    raw.pool_size
                )));
            }
            if raw.statement_timeout_ms == 0 || raw.statement_timeout_ms > MAX_TIMEOUT_MS {
                return Err(ConfigError(format!(
                    "storage.statement_timeout_ms = {}: must be between 1 and {MAX_TIMEOUT_MS} (milliseconds)",
                    raw.statement_timeout_ms
                )));
            }
            if let Some(ca) = &ca_file
                && !ca.is_file()
            {
                return Err(ConfigError(format!(
                    "storage.ca_file = {}: no such file",
                    ca.display()
                )));
            }
            config.pool_size = raw.pool_size;
            config.statement_timeout = Duration::from_millis(raw.statement_timeout_ms);
            config.ca_file = ca_file;
            if raw.resync_interval_s > 86_400 {
                return Err(ConfigError(format!(
                    "storage.resync_interval_s = {}: at most 86400 (a day); 0 turns it off",
                    raw.resync_interval_s
                )));
            }
            config.resync_interval = Duration::from_secs(raw.resync_interval_s);
            Ok(StorageParams::Postgres { config })
        }
        other => Err(ConfigError(format!(
            "storage.backend = {other:?}: expected \"sqlite\" or \"postgres\""
        ))),
    }
}

/// The largest `storage.pool_size`: more is a typo (PostgreSQL's own default
/// `max_connections` is 100, for every client together).
const MAX_POOL_SIZE: u32 = 1000;

fn auth_params(raw: &RawAuth) -> Result<AuthParams, ConfigError> {
    if raw.max_token_ttl_s == 0 || raw.default_token_ttl_s == 0 {
        return Err(ConfigError(
            "auth.default_token_ttl_s and auth.max_token_ttl_s must be at least 1".into(),
        ));
    }
    if raw.default_token_ttl_s > raw.max_token_ttl_s {
        return Err(ConfigError(format!(
            "auth.default_token_ttl_s = {} exceeds auth.max_token_ttl_s = {}",
            raw.default_token_ttl_s, raw.max_token_ttl_s
        )));
    }
    Ok(AuthParams {
        default_token_ttl: Duration::from_secs(raw.default_token_ttl_s),
        max_token_ttl: Duration::from_secs(raw.max_token_ttl_s),
    })
}

impl TryFrom<&RawLimits> for Limits {
    type Error = ConfigError;

    fn try_from(l: &RawLimits) -> Result<Self, ConfigError> {
        for (name, value) in [
            ("max_plaintext_bytes", l.max_plaintext_bytes),
            ("max_associated_data_bytes", l.max_associated_data_bytes),
            ("max_context_bytes", l.max_context_bytes),
            ("max_batch_items", l.max_batch_items),
            ("max_concurrent_requests", l.max_concurrent_requests),
            ("max_connections", l.max_connections),
        ] {
            if value == 0 {
                return Err(ConfigError(format!("limits.{name} must be at least 1")));
            }
        }
        if l.max_concurrent_streams == 0 {
            return Err(ConfigError(
                "limits.max_concurrent_streams must be at least 1".into(),
            ));
        }
        // The gRPC length prefix is a u32.
        if !(1024..=u32::MAX as usize).contains(&l.max_message_bytes) {
            return Err(ConfigError(format!(
                "limits.max_message_bytes = {}: must be between 1024 and {} (the gRPC length prefix is 32 bits)",
                l.max_message_bytes,
                u32::MAX
            )));
        }
        if l.max_buffered_request_bytes < l.max_message_bytes
            || l.max_buffered_request_bytes > MAX_BUFFER_BUDGET
        {
            return Err(ConfigError(format!(
                "limits.max_buffered_request_bytes = {}: must be at least limits.max_message_bytes ({}), or a message of the largest size could never be read, and at most {MAX_BUFFER_BUDGET}",
                l.max_buffered_request_bytes, l.max_message_bytes
            )));
        }
        let millis = |name: &str, ms: u64| {
            if ms == 0 || ms > MAX_TIMEOUT_MS {
                Err(ConfigError(format!(
                    "limits.{name} = {ms}: must be between 1 and {MAX_TIMEOUT_MS} (milliseconds)"
                )))
            } else {
                Ok(Duration::from_millis(ms))
            }
        };
        Ok(Limits {
            max_plaintext_bytes: l.max_plaintext_bytes,
            max_associated_data_bytes: l.max_associated_data_bytes,
            max_context_bytes: l.max_context_bytes,
            max_batch_items: l.max_batch_items,
            max_message_bytes: l.max_message_bytes,
            max_buffered_request_bytes: l.max_buffered_request_bytes,
            max_concurrent_requests: l.max_concurrent_requests,
            max_connections: l.max_connections,
            max_concurrent_streams: l.max_concurrent_streams,
            request_timeout: millis("request_timeout_ms", l.request_timeout_ms)?,
            header_read_timeout: millis("header_read_timeout_ms", l.header_read_timeout_ms)?,
            idle_timeout: millis("idle_timeout_ms", l.idle_timeout_ms)?,
            keepalive_interval: millis("keepalive_interval_ms", l.keepalive_interval_ms)?,
            keepalive_timeout: millis("keepalive_timeout_ms", l.keepalive_timeout_ms)?,
            principal_rate: l.principal_rate,
            principal_burst: l.principal_burst,
        })
    }
}

/// The largest `limits.max_buffered_request_bytes`: what tokio's semaphore,
/// which holds the budget, can count.
const MAX_BUFFER_BUDGET: usize = tokio::sync::Semaphore::MAX_PERMITS;

/// The longest timeout accepted: one day. Longer is a typo, not a policy.
const MAX_TIMEOUT_MS: u64 = 86_400_000;

impl Params {
    /// Parameters for a server whose data lives in `data_dir`, all else default
    /// (auditing to `<data_dir>/audit.log`, synced). Convenient for tests and
    /// embedding.
    pub fn for_data_dir(data_dir: impl Into<PathBuf>, dev: bool) -> Self {
        let data_dir = data_dir.into();
        Params {
            audit: crate::audit::AuditParams::file(data_dir.join(crate::audit::DEV_AUDIT_FILE)),
            dev,
            storage: StorageParams::Sqlite {
                path: data_dir.join("cipherd.db"),
            },
            data_dir,
            limits: Limits::DEFAULT,
            usage: UsagePolicy {
                limit: RANDOM_96_BIT_NONCE_LIMIT,
                reservation_block: 65_536,
                on_limit: LimitAction::Rotate,
            },
            lifecycle: LifecycleParams::DEFAULT,
            memory: MemoryParams::default(),
            tls: None,
            auth: AuthParams::DEFAULT,
            jwt: None,
            auto_unseal: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(&str, &str)]) -> Result<Params, ConfigError> {
        let mut overrides: Vec<(&str, String)> = vec![("dev", "true".into())];
        overrides.extend(pairs.iter().map(|(k, v)| (*k, (*v).to_owned())));
        Params::try_from(RawConfig::load(None, &overrides)?)
    }

    #[test]
    fn transit_auto_unseal_needs_all_its_settings_and_tls_off_loopback() {
        let full = [
            ("seal.transit_address", "https://kms.internal:8210"),
            ("seal.transit_key", "cipherd-unseal"),
            ("seal.transit_token_file", "/run/secrets/kms-token"),
            ("seal.transit_ca_file", "/etc/cipherd/kms-ca.pem"),
            (
                "seal.transit_shares_file",
                "/etc/cipherd/unseal-shares.transit",
            ),
        ];
        let params = with(&full).unwrap();
        let Some(AutoUnseal::Transit(t)) = params.auto_unseal else {
            panic!("{:?}", params.auto_unseal);
        };
        assert_eq!(t.key, "cipherd-unseal");
        assert_eq!(
            t.ca_file.as_deref(),
            Some(std::path::Path::new("/etc/cipherd/kms-ca.pem"))
        );
        // Loopback over plain HTTP needs no CA.
        let mut local = full[..4].to_vec();
        local[0] = ("seal.transit_address", "http://127.0.0.1:8210");
        local[3] = full[4];
        assert!(with(&local).is_ok());
        for (broken, needle) in [
            (vec![full[0], full[1], full[2], full[4]], "transit_ca_file"),
            (vec![full[0], full[1], full[3]], "all needed"),
            (
                vec![
                    ("seal.transit_address", "http://kms.internal:8210"),
                    full[1],
                    full[2],
                    full[4],
                ],
                "loopback",
            ),
            (
                [&full[..], &[("seal.auto_unseal_env", "SHARES")]].concat(),
                "not two",
            ),
        ] {
            let err = with(&broken).unwrap_err().to_string();
            assert!(err.contains(needle), "{broken:?}: {err}");
        }
    }

    #[test]
    fn lifecycle_settings_are_read_and_checked() {
        let params = with(&[
            ("keys.deletion_waiting_period_s", "0"),
            ("keys.housekeeping_interval_ms", "250"),
        ])
        .unwrap();
        assert_eq!(params.lifecycle.deletion_waiting_period, Duration::ZERO);
        assert_eq!(
            params.lifecycle.housekeeping_interval,
            Duration::from_millis(250)
        );
        assert_eq!(with(&[]).unwrap().lifecycle, LifecycleParams::DEFAULT);
        for bad in [
            ("keys.deletion_waiting_period_s", "31536001"),
            ("keys.stats_flush_interval_ms", "0"),
        ] {
            let err = with(&[bad]).unwrap_err().to_string();
            assert!(err.contains(bad.0), "{err}");
        }
    }

    #[test]
    fn defaults_validate_and_match_for_data_dir() {
        // Dev mode: a production server needs an [[audit]] sink configured.
        let raw = RawConfig::load(None, &[("dev", "true".into())]).unwrap();
        let params = Params::try_from(raw.clone()).unwrap();
        let expected = Params::for_data_dir(&raw.data_dir, true);
        assert_eq!(params.audit, expected.audit);
        assert_eq!(params.limits, expected.limits);
        assert_eq!(params.usage, expected.usage);
        assert_eq!(params.storage, expected.storage);
        assert_eq!(params.memory, expected.memory);
        assert!(!params.memory.lock);
    }

    #[test]
    fn flags_override_and_bad_values_name_the_option() {
        let raw = RawConfig::load(
            None,
            &[
                ("keys.usage_limit", "5000000000".into()),
                ("dev", "true".into()),
            ],
        )
        .unwrap();
        assert!(raw.dev);
        let err = Params::try_from(raw).unwrap_err().to_string();
        assert!(err.contains("keys.usage_limit"), "{err}");
    }

    #[test]
    fn reference_file_lists_every_option_with_its_default() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/config.reference.toml"
        );
        let from_file = RawConfig::load(
            Some(std::path::Path::new(path)),
            &[("tls.disable", "true".into())],
        )
        .unwrap();
        let text = std::fs::read_to_string(path).unwrap();
        for (key, default) in DEFAULTS {
            let leaf = key.rsplit('.').next().unwrap();
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("{leaf} = ")))
                .unwrap_or_else(|| panic!("{key} missing from config.reference.toml"));
            let value = line.split_once(" = ").unwrap().1.trim_matches('"');
            assert_eq!(
                value, *default,
                "{key}: reference says {value}, default is {default}"
            );
        }
        let p = Params::try_from(from_file).unwrap();
        assert_eq!(p.limits, Params::for_data_dir("x", false).limits);
    }

    #[test]
    fn edge_limits_are_validated_naming_the_option() {
        for (key, value, named) in [
            (
                "limits.max_message_bytes",
                "4294967296",
                "limits.max_message_bytes",
            ),
            (
                "limits.max_message_bytes",
                "100",
                "limits.max_message_bytes",
            ),
            // Smaller than a message of the largest size: it could never be read.
            (
                "limits.max_buffered_request_bytes",
                "1048576",
                "limits.max_buffered_request_bytes",
            ),
            (
                "limits.max_concurrent_requests",
                "0",
                "limits.max_concurrent_requests",
            ),
            ("limits.max_connections", "0", "limits.max_connections"),
            (
                "limits.max_concurrent_streams",
                "0",
                "limits.max_concurrent_streams",
            ),
            (
                "limits.max_associated_data_bytes",
                "0",
                "limits.max_associated_data_bytes",
            ),
            ("limits.max_context_bytes", "0", "limits.max_context_bytes"),
            (
                "limits.request_timeout_ms",
                "0",
                "limits.request_timeout_ms",
            ),
            (
                "limits.header_read_timeout_ms",
                "0",
                "limits.header_read_timeout_ms",
            ),
            (
                "limits.idle_timeout_ms",
                "86400001",
                "limits.idle_timeout_ms",
            ),
            (
                "limits.keepalive_interval_ms",
                "0",
                "limits.keepalive_interval_ms",
            ),
            (
                "limits.keepalive_timeout_ms",
                "0",
                "limits.keepalive_timeout_ms",
            ),
        ] {
            let raw = RawConfig::load(None, &[(key, value.into())]).unwrap();
            let err = Params::try_from(raw).unwrap_err().to_string();
            assert!(err.contains(named), "{key} = {value}: {err}");
        }
        let raw = RawConfig::load(
            None,
            &[
                ("limits.request_timeout_ms", "250".into()),
                ("limits.max_concurrent_streams", "7".into()),
                ("dev", "true".into()),
            ],
        )
        .unwrap();
        let limits = Params::try_from(raw).unwrap().limits;
        assert_eq!(limits.request_timeout, Duration::from_millis(250));
        assert_eq!(limits.max_concurrent_streams, 7);
    }

    #[test]
    fn check_item_names_the_limit_an_item_exceeds() {
        let limits = Limits {
            max_plaintext_bytes: 10,
            max_associated_data_bytes: 5,
            max_context_bytes: 3,
            ..Limits::DEFAULT
        };
        assert!(limits.check_item(&[0; 10], &[0; 5], &[0; 3]).is_ok());
        for (plaintext, aad, context, setting) in [
            (11, 0, 0, "limits.max_plaintext_bytes"),
            (0, 6, 0, "limits.max_associated_data_bytes"),
            (0, 0, 4, "limits.max_context_bytes"),
        ] {
            let err = limits
                .check_item(&vec![0; plaintext], &vec![0; aad], &vec![0; context])
                .unwrap_err();
            let c = err.classify();
            assert_eq!(
                (c.code, c.reason),
                (tonic::Code::InvalidArgument, "TOO_LARGE")
            );
            assert!(c.message.contains(setting), "{}", c.message);
        }
        // The defaults hold a 60 MB associated data or context far off.
        let big = vec![0; 60 << 20];
        assert!(Limits::DEFAULT.check_associated_data(big.len()).is_err());
        assert!(Limits::DEFAULT.check_item(b"", b"", &big).is_err());
    }

    #[test]
    fn postgres_storage_from_flags_and_environment() {
        let load = |pairs: &[(&str, &str)]| {
            let overrides: Vec<(&str, String)> =
                pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
            Params::try_from(RawConfig::load(None, &overrides).unwrap())
        };
        let params = load(&[
            ("dev", "true"),
            ("storage.backend", "postgres"),
            (
                "storage.url",
                "postgres://cipherd:pw-7f3a@db.internal:5432/cipherd",
            ),
            ("storage.pool_size", "4"),
            ("storage.statement_timeout_ms", "2500"),
            ("storage.resync_interval_s", "60"),
        ])
        .unwrap();
        let StorageParams::Postgres { config } = &params.storage else {
            panic!("expected postgres, got {:?}", params.storage);
        };
        assert_eq!(config.pool_size, 4);
        assert_eq!(config.statement_timeout, Duration::from_millis(2500));
        assert_eq!(config.resync_interval, Duration::from_secs(60));
        assert!(!format!("{params:?}").contains("pw-7f3a"), "{params:?}");

        for (pairs, named) in [
            (&[("storage.backend", "postgres")][..], "storage.url"),
            (
                &[
                    ("storage.backend", "postgres"),
                    ("storage.url", "mysql://x"),
                ][..],
                "storage.url",
            ),
            (
                &[
                    ("storage.backend", "postgres"),
                    ("storage.url", "postgres://h/d"),
                    ("storage.pool_size", "0"),
                ][..],
                "storage.pool_size",
            ),
            (
                &[
                    ("storage.backend", "postgres"),
                    ("storage.url", "postgres://h/d"),
                    ("storage.ca_file", "/nonexistent/ca.pem"),
                ][..],
                "storage.ca_file",
            ),
            (&[("storage.url", "postgres://h/d")][..], "storage.url"),
            (&[("storage.backend", "etcd")][..], "storage.backend"),
        ] {
            let err = load(&[&[("dev", "true")], pairs].concat())
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn storage_url_comes_from_the_environment() {
        let env = [
            ("CIPHERD_SERVER_STORAGE__BACKEND", "postgres"),
            (
                "CIPHERD_SERVER_STORAGE__URL",
                "postgres://cipherd@db:5432/c",
            ),
            ("CIPHERD_SERVER_STORAGE__STATEMENT_TIMEOUT_MS", "1234"),
            ("CIPHERD_SERVER_DEV", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let raw = RawConfig::load_with_env(None, &[], Some(env)).unwrap();
        let params = Params::try_from(raw).unwrap();
        let StorageParams::Postgres { config } = params.storage else {
            panic!("expected postgres");
        };
        assert_eq!(config.statement_timeout, Duration::from_millis(1234));
        assert!(
            config
                .redacted()
                .starts_with("postgres://cipherd@db:5432/c")
        );
    }

    #[test]
    fn file_layer_is_read_and_unknown_keys_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[limits]\nmax_batch_items = 7\n").unwrap();
        let raw = RawConfig::load(Some(&path), &[]).unwrap();
        assert_eq!(raw.limits.max_batch_items, 7);
        std::fs::write(&path, "[limits]\nmax_batch_itemz = 7\n").unwrap();
        assert!(RawConfig::load(Some(&path), &[]).is_err());
    }
}
