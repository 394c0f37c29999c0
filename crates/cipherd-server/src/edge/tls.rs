//! TLS on the gRPC listener (rustls on aws-lc-rs), mTLS identities, reloads.
//!
//! SKELETON: the TLS helper owns this module and replaces this file.

use serde::Deserialize;

use crate::config::ConfigError;

/// `[tls]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawTls {}

/// Validated TLS settings.
#[derive(Debug, Clone)]
pub struct TlsParams {}

impl TlsParams {
    /// Validates `[tls]`; `None` serves plaintext.
    pub fn from_raw(_raw: &RawTls, _dev: bool, _listen: &str) -> Result<Option<Self>, ConfigError> {
        Ok(None)
    }
}
