//! HMAC-SHA256 under keys held in the barrier: the keyed hash that stores bearer
//! tokens (only the tag of a token's secret is stored), and the audit log's hash
//! of batch references and derivation contexts.

use std::fmt;

use aws_lc_rs::hmac;

use crate::secret::KeyMaterial;

/// Length of a tag, in bytes.
pub const TAG_LEN: usize = 32;

/// An HMAC-SHA256 key. Prints as `[redacted]`; aws-lc-rs wipes its key schedule
/// on drop.
pub struct MacKey(hmac::Key);

impl MacKey {
    /// A key over `material`'s 256 bits.
    pub fn new(material: &KeyMaterial) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, material.expose_secret()))
    }

    /// The tag of `data`.
    pub fn sign(&self, data: &[u8]) -> [u8; TAG_LEN] {
        let tag = hmac::sign(&self.0, data);
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Whether `tag` is the tag of `data`, compared in constant time.
    pub fn verify(&self, data: &[u8], tag: &[u8]) -> bool {
        hmac::verify(&self.0, data, tag).is_ok()
    }
}

impl fmt::Debug for MacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MacKey([redacted])")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rfc4231_case_2_style_vector_and_constant_time_verify() {
        // HMAC-SHA256 with a 32-byte key of 0x0b, data "Hi There" (checked with
        // Python's hmac module).
        let key = MacKey::new(&KeyMaterial::from_slice(&[0x0b; 32]).unwrap());
        let tag = key.sign(b"Hi There");
        assert_eq!(
            hex::encode(tag),
            "198a607eb44bfbc69903a0f1cf2bbdc5ba0aa3f3d9ae3c1c7a3b1696a0b68cf7"
        );
        assert!(key.verify(b"Hi There", &tag));
        let mut bad = tag;
        bad[0] ^= 1;
        assert!(!key.verify(b"Hi There", &bad));
        assert!(!key.verify(b"Hi There", &tag[..16]));
        assert_eq!(format!("{key:?}"), "MacKey([redacted])");
    }
}
