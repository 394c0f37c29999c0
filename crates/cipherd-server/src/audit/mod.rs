//! The audit log: one JSON line per call on every configured sink, written before
//! the reply leaves, hash-chained, fail closed.
//!
//! SKELETON: the audit helper owns this module and replaces this file. The
//! contract with the request path is [`Auditor`] and [`AuditRecord`].

mod record;

use std::path::Path;

use serde::Deserialize;

pub use record::{AuditRecord, ItemCounts, Outcome};

use crate::config::ConfigError;

/// One `[[audit]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum RawAuditSink {
    /// `type = "file"`.
    File {
        /// The log file (appended to).
        path: std::path::PathBuf,
    },
    /// `type = "stdout"`.
    Stdout {},
}

/// Validated audit configuration.
#[derive(Debug, Clone, Default)]
pub struct AuditParams {}

impl AuditParams {
    /// Validates the `[[audit]]` tables.
    pub fn from_raw(
        _raw: &[RawAuditSink],
        _dev: bool,
        _data_dir: &Path,
    ) -> Result<Self, ConfigError> {
        Ok(Self {})
    }
}

/// The audit log of one server. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Auditor {}

impl Auditor {
    /// Opens every sink.
    pub async fn open(_params: &AuditParams) -> Result<Self, crate::Error> {
        Ok(Self {})
    }

    /// `Ok` when at least one sink accepts records.
    pub fn ready(&self) -> Result<(), crate::Error> {
        Ok(())
    }

    /// Writes a `stop` record and flushes.
    pub async fn close(&self) {}

    /// Writes `record`; resolves once a sink holds it.
    pub async fn record(&self, _record: AuditRecord) -> Result<(), crate::Error> {
        Ok(())
    }
}
