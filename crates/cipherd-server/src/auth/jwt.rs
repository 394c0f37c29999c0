//! JWT/OIDC access tokens verified against a JWKS file.
//!
//! SKELETON: the policy helper owns this module and replaces this file.

use serde::Deserialize;

use crate::config::ConfigError;

/// `[jwt]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawJwt {}

/// Validated JWT settings.
#[derive(Debug, Clone)]
pub struct JwtParams {}

impl JwtParams {
    /// Validates `[jwt]`; `None` when JWTs are not accepted.
    pub fn from_raw(_raw: &RawJwt) -> Result<Option<Self>, ConfigError> {
        Ok(None)
    }
}

/// A verified JWT's identity.
#[derive(Debug, Clone)]
pub struct JwtIdentity {
    /// The principal claim.
    pub subject: String,
    /// The groups claim.
    pub groups: Vec<String>,
    /// `exp`.
    pub expires_at: Option<std::time::SystemTime>,
}

/// Why a JWT was refused (server log only).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct JwtError(pub String);

/// Verifies JWTs against the configured JWKS.
#[derive(Debug)]
pub struct JwtVerifier {}

impl JwtVerifier {
    /// Loads the JWKS.
    pub fn new(_params: &JwtParams) -> Result<Self, JwtError> {
        Ok(Self {})
    }

    /// Verifies `token`.
    pub fn verify(&self, _token: &str) -> Result<JwtIdentity, JwtError> {
        Err(JwtError("JWTs are not implemented yet".into()))
    }
}
