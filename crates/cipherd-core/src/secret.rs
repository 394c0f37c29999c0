//! Secret byte containers that zeroize on drop and never print their contents.
//!
//! None of these types implement `Clone`, `Hash` or a derived `Debug`. Turning a
//! secret into plain bytes is an explicit, named call (`expose_secret`) so that
//! every such place is easy to audit.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::{Error, Result};

/// Length of every symmetric key in cipherd: 256 bits.
pub const KEY_LEN: usize = 32;

/// 256 bits of key material (a key version's material, a root, barrier or unseal key).
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct KeyMaterial([u8; KEY_LEN]);

impl KeyMaterial {
    /// Fresh random material from the CSPRNG.
    pub fn generate() -> Result<Self> {
        let mut bytes = [0u8; KEY_LEN];
        aws_lc_rs::rand::fill(&mut bytes).map_err(|_| Error::Provider)?;
        Ok(Self(bytes))
    }

    /// Wraps existing bytes; fails unless exactly [`KEY_LEN`] long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        let arr: [u8; KEY_LEN] = bytes
            .try_into()
            .map_err(|_| Error::InvalidArgument(format!("key material must be {KEY_LEN} bytes")))?;
        Ok(Self(arr))
    }

    /// The raw bytes. Callers must not log, store in the clear, or return them except
    /// through a deliberate export path.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// An independent copy. Named rather than `Clone` so copies of secrets are visible.
    pub fn duplicate(&self) -> Self {
        Self(self.0)
    }

    /// Derives a 256-bit subkey with HKDF-SHA256: `info = label || context`.
    ///
    /// Used for derived (per-context) keys and for the barrier key. The label
    /// separates uses so the same input never yields the same subkey for two purposes.
    pub fn derive(&self, label: &[u8], context: &[u8]) -> Self {
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(None, &self.0);
        let mut out = [0u8; KEY_LEN];
        // Invariant: 32 bytes is far below HKDF-SHA256's 255 * 32 byte output limit.
        hk.expand_multi_info(&[label, context], &mut out)
            .expect("HKDF-SHA256 can always expand 32 bytes");
        Self(out)
    }
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyMaterial([redacted])")
    }
}

/// A variable-length secret (plaintext, a serialized record holding key material).
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Takes ownership of `bytes`; they are zeroized when this value drops.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// `len` random bytes from the CSPRNG (e.g. a data key for envelope encryption).
    pub fn random(len: usize) -> Result<Self> {
        let mut bytes = Zeroizing::new(vec![0u8; len]);
        aws_lc_rs::rand::fill(&mut bytes).map_err(|_| Error::Provider)?;
        Ok(Self(bytes))
    }

    /// The raw bytes; see [`KeyMaterial::expose_secret`] for the rules.
    pub fn expose_secret(&self) -> &[u8] {
        &self.0
    }

    /// Length in bytes (safe to log).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the secret is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([redacted; {} bytes])", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_material() {
        let k = KeyMaterial::from_slice(&[0xAB; KEY_LEN]).unwrap();
        let s = format!("{k:?}");
        assert!(!s.to_lowercase().contains("ab"), "{s}");
        let b = SecretBytes::new(b"patient: Jane Doe".to_vec());
        assert!(!format!("{b:?}").contains("Jane"));
    }

    #[test]
    fn derive_separates_labels_and_contexts() {
        let k = KeyMaterial::from_slice(&[7; KEY_LEN]).unwrap();
        let a = k.derive(b"a", b"ctx");
        let b = k.derive(b"b", b"ctx");
        let c = k.derive(b"a", b"ctx2");
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert_ne!(a.expose_secret(), c.expose_secret());
        assert_eq!(a.expose_secret(), k.derive(b"a", b"ctx").expose_secret());
    }
}
