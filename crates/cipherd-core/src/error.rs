//! The one error type of `cipherd-core`.

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the crypto core.
///
/// Decryption failures are deliberately opaque: a bad tag, a malformed ciphertext,
/// a wrong key, version, context or associated data all surface as
/// [`Error::DecryptionFailed`], so callers cannot learn which check failed.
/// Messages never contain plaintext or key material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The ciphertext could not be authenticated or parsed (opaque by design).
    #[error("decryption failed")]
    DecryptionFailed,
    /// A caller-supplied value is invalid; the message says which and why.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The key type name is not one this crate implements.
    #[error(
        "unknown key type {0:?}; expected one of xaes-256-gcm, aes256-gcm96, chacha20-poly1305, xchacha20-poly1305"
    )]
    UnknownKeyType(String),
    /// The key name does not follow the naming rules.
    #[error("invalid key name: {0}")]
    InvalidKeyName(String),
    /// The requested key version does not exist (never created, or trimmed).
    #[error("key version {0} does not exist")]
    VersionNotFound(u32),
    /// The key version exists but policy forbids its use for this operation.
    #[error("key version {version} is below the minimum {minimum} for {operation}")]
    VersionBelowMinimum {
        /// The version that was asked for.
        version: u32,
        /// The configured minimum.
        minimum: u32,
        /// `"encryption"` or `"decryption"`.
        operation: &'static str,
    },
    /// A derived key needs a non-empty context, or a non-derived key was given one.
    #[error("{0}")]
    Context(&'static str),
    /// A configuration change would break an invariant (e.g. trimming above the
    /// minimum decryption version).
    #[error("precondition failed: {0}")]
    Precondition(String),
    /// A key version has used up its safe number of encryptions.
    #[error("key version {version} reached its limit of {limit} encryptions; rotate the key")]
    UsageLimitExceeded {
        /// The exhausted version.
        version: u32,
        /// The enforced limit.
        limit: u64,
    },
    /// Shamir splitting or reconstruction failed.
    #[error("secret sharing: {0}")]
    Shamir(String),
    /// A stored record failed to authenticate under the barrier or could not be
    /// decoded: storage was corrupted or tampered with.
    #[error("stored record {path:?} failed integrity check")]
    Barrier {
        /// The storage path of the record.
        path: String,
    },
    /// The CSPRNG or the crypto provider failed. Never expected in practice.
    #[error("crypto provider failure")]
    Provider,
}
