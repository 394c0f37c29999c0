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

use std::{net::SocketAddr, path::PathBuf};

use cipherd_core::key_type::RANDOM_96_BIT_NONCE_LIMIT;
use serde::Deserialize;

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
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    /// `sqlite` (the only backend so far).
    pub backend: String,
    /// SQLite file; empty means `<data_dir>/cipherd.db`.
    pub path: Option<PathBuf>,
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Largest plaintext accepted per item, in bytes.
    pub max_plaintext_bytes: usize,
    /// Most items in one batch request.
    pub max_batch_items: usize,
    /// Largest gRPC message accepted, in bytes.
    pub max_message_bytes: usize,
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
    /// Process memory hygiene, applied by the binary (see [`crate::memory`]).
    pub memory: MemoryParams,
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
}

/// Request limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest plaintext per item, in bytes.
    pub max_plaintext_bytes: usize,
    /// Most items per batch.
    pub max_batch_items: usize,
    /// Largest gRPC message, in bytes.
    pub max_message_bytes: usize,
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

/// The default `limits.max_message_bytes`: 64 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 20;

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
    ("limits.max_plaintext_bytes", "1048576"),
    ("limits.max_batch_items", "10000"),
    ("limits.max_message_bytes", "67108864"),
    ("keys.usage_limit", "3865470566"),
    ("keys.usage_reservation_block", "65536"),
    ("keys.usage_limit_action", "rotate"),
    ("memory.lock", "false"),
];

impl RawConfig {
    /// Assembles defaults, `file` (if any), [`ENV_PREFIX`]`_*` environment
    /// variables and `overrides` (from flags), later sources winning.
    pub fn load(
        file: Option<&std::path::Path>,
        overrides: &[(&str, String)],
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
        let storage = match raw.storage.backend.as_str() {
            "sqlite" => StorageParams::Sqlite {
                path: raw
                    .storage
                    .path
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or_else(|| raw.data_dir.join("cipherd.db")),
            },
            other => {
                return Err(ConfigError(format!(
                    "storage.backend = {other:?}: expected \"sqlite\""
                )));
            }
        };
        let l = &raw.limits;
        if l.max_plaintext_bytes == 0 || l.max_batch_items == 0 || l.max_message_bytes < 1024 {
            return Err(ConfigError(
                "limits.* must be positive (max_message_bytes at least 1024)".into(),
            ));
        }
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
        Ok(Params {
            dev: raw.dev,
            data_dir: raw.data_dir,
            storage,
            limits: Limits {
                max_plaintext_bytes: l.max_plaintext_bytes,
                max_batch_items: l.max_batch_items,
                max_message_bytes: l.max_message_bytes,
            },
            usage: UsagePolicy {
                limit: k.usage_limit,
                reservation_block: k.usage_reservation_block,
                on_limit,
            },
            memory: MemoryParams {
                lock: raw.memory.lock,
            },
        })
    }
}

impl Params {
    /// Parameters for a server whose data lives in `data_dir`, all else default.
    /// Convenient for tests and embedding.
    pub fn for_data_dir(data_dir: impl Into<PathBuf>, dev: bool) -> Self {
        let data_dir = data_dir.into();
        Params {
            dev,
            storage: StorageParams::Sqlite {
                path: data_dir.join("cipherd.db"),
            },
            data_dir,
            limits: Limits {
                max_plaintext_bytes: 1 << 20,
                max_batch_items: 10_000,
                max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            },
            usage: UsagePolicy {
                limit: RANDOM_96_BIT_NONCE_LIMIT,
                reservation_block: 65_536,
                on_limit: LimitAction::Rotate,
            },
            memory: MemoryParams::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_match_for_data_dir() {
        let raw = RawConfig::load(None, &[]).unwrap();
        let params = Params::try_from(raw.clone()).unwrap();
        let expected = Params::for_data_dir(&raw.data_dir, false);
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
        let from_file = RawConfig::load(Some(std::path::Path::new(path)), &[]).unwrap();
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
