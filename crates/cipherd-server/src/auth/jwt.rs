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
