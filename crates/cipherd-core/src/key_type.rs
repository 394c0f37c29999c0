//! The key types cipherd offers and their nonce-safety properties.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::Error;

/// Encryptions allowed per key version for types with random 96-bit nonces:
/// 0.9 × 2^32, per NIST SP 800-38D §8.3 (collision probability ≤ 2^-32).
pub const RANDOM_96_BIT_NONCE_LIMIT: u64 = 3_865_470_566;

/// An AEAD algorithm a named key uses. Every version of a key has the same type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum KeyType {
    /// C2SP XAES-256-GCM: 192-bit random nonces, an AES key derived per nonce
    /// prefix (per message, or shared by up to 2^20 messages of a batch through
    /// [`crate::aead::Sealer`]). Safe for about 2^80 messages per key version.
    /// The default.
    #[default]
    #[serde(rename = "xaes-256-gcm")]
    Xaes256Gcm,
    /// AES-256-GCM with random 96-bit nonces (Vault's `aes256-gcm96`). Usage is
    /// counted durably and capped at [`RANDOM_96_BIT_NONCE_LIMIT`] per version.
    #[serde(rename = "aes256-gcm96")]
    Aes256Gcm96,
    /// ChaCha20-Poly1305 (RFC 8439) with random 96-bit nonces; counted and capped
    /// like `aes256-gcm96`.
    #[serde(rename = "chacha20-poly1305")]
    ChaCha20Poly1305,
    /// XChaCha20-Poly1305: 192-bit random nonces, safe for about 2^80 messages.
    /// Runs as HChaCha20 plus aws-lc-rs ChaCha20-Poly1305; batches share the
    /// HChaCha20 subkey like XAES-256-GCM's.
    #[serde(rename = "xchacha20-poly1305")]
    XChaCha20Poly1305,
}

impl KeyType {
    /// Every key type, in documentation order.
    pub const ALL: [KeyType; 4] = [
        KeyType::Xaes256Gcm,
        KeyType::Aes256Gcm96,
        KeyType::ChaCha20Poly1305,
        KeyType::XChaCha20Poly1305,
    ];

    /// The canonical name used in the API, config and storage.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Xaes256Gcm => "xaes-256-gcm",
            Self::Aes256Gcm96 => "aes256-gcm96",
            Self::ChaCha20Poly1305 => "chacha20-poly1305",
            Self::XChaCha20Poly1305 => "xchacha20-poly1305",
        }
    }

    /// Nonce length in bytes carried in every ciphertext of this type.
    pub fn nonce_len(self) -> usize {
        match self {
            Self::Aes256Gcm96 | Self::ChaCha20Poly1305 => 12,
            Self::Xaes256Gcm | Self::XChaCha20Poly1305 => 24,
        }
    }

    /// Authentication tag length in bytes (16 for every type).
    pub fn tag_len(self) -> usize {
        16
    }

    /// The enforced per-version encryption limit, or `None` when the nonce space
    /// makes counting unnecessary (≈2^80 messages for 192-bit random nonces).
    pub fn usage_limit(self) -> Option<u64> {
        match self {
            Self::Aes256Gcm96 | Self::ChaCha20Poly1305 => Some(RANDOM_96_BIT_NONCE_LIMIT),
            Self::Xaes256Gcm | Self::XChaCha20Poly1305 => None,
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| Error::UnknownKeyType(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for t in KeyType::ALL {
            assert_eq!(t.as_str().parse::<KeyType>().unwrap(), t);
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{t}\""));
        }
        assert!("aes128-gcm96".parse::<KeyType>().is_err());
    }

    #[test]
    fn limit_is_ninety_percent_of_two_to_the_32() {
        assert_eq!(RANDOM_96_BIT_NONCE_LIMIT, (0.9 * 4_294_967_296f64) as u64);
    }
}
