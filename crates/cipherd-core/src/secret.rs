//! Secret byte containers that zeroize on drop and never print their contents, and
//! the HKDF key derivation over them.
//!
//! None of these types implement `Clone`, `Hash` or a derived `Debug`. Turning a
//! secret into plain bytes is an explicit, named call (`expose_secret`) so that
//! every such place is easy to audit.
//!
//! [`KeyMaterial`] keeps its 32 bytes in one heap allocation that is written in
//! place (generation, parsing, derivation) and wiped on drop, so moving the value
//! around moves a pointer, never the bytes: no stale copies are left in the stack
//! frames or containers it passed through. What this module cannot reach: copies
//! made by the crypto provider inside its own (cleansed) contexts, and registers
//! or stack slots of the compiled code, which safe Rust has no way to wipe.
//!
//! Derivation ([`KeyMaterial::derive`]) runs on aws-lc-rs's HKDF, which cleanses
//! its HMAC state; [`Derivation`] names the two encodings of its `info` input, the
//! legacy one kept only so existing ciphertexts and data dirs still open.

use std::fmt;

use aws_lc_rs::hkdf::{HKDF_SHA256, Prk, Salt};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::{Error, Result};

/// Length of every symmetric key in cipherd: 256 bits.
pub const KEY_LEN: usize = 32;

/// How [`KeyMaterial::derive`] turns (material, label, context) into a subkey.
///
/// Stored with what it derived (a key version, a seal record), so data written
/// under one derivation keeps opening after the default changes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Derivation {
    /// Legacy: `HKDF-SHA256(salt = none, ikm = material, info = label || context)`.
    ///
    /// The `info` encoding is not injective (label `"a"` with context `"bc"` and
    /// label `"ab"` with context `"c"` give the same key), so nothing new uses it;
    /// it stays for key versions and seal records created before
    /// [`Derivation::V2`].
    V1,
    /// `HKDF-Expand-SHA256(PRK = material, info = len(label) || label || context)`,
    /// with `len(label)` as a 2-byte big-endian integer.
    ///
    /// The length prefix makes `(label, context) ↦ info` injective, so two uses
    /// with different labels can never share a subkey whatever their contexts.
    /// HKDF-Extract is skipped (RFC 5869 §3.3) because every input is already a
    /// uniformly random 256-bit key from the CSPRNG.
    #[default]
    V2,
}

impl Derivation {
    /// The derivation's number as stored: 1 or 2.
    pub fn number(self) -> u32 {
        match self {
            Self::V1 => 1,
            Self::V2 => 2,
        }
    }

    /// The derivation stored as `number`; `None` for numbers this code does not know.
    pub fn from_number(number: u32) -> Option<Self> {
        match number {
            1 => Some(Self::V1),
            2 => Some(Self::V2),
            _ => None,
        }
    }
}

/// 256 bits of key material (a key version's material, a root, barrier or unseal key).
///
/// The bytes live in one heap allocation for the value's whole life (see the
/// [module docs](self)) and are zeroized when it drops.
pub struct KeyMaterial(Box<[u8; KEY_LEN]>);

impl KeyMaterial {
    /// Fresh random material from the CSPRNG.
    pub fn generate() -> Result<Self> {
        let mut material = Self::zeroed();
        aws_lc_rs::rand::fill(&mut material.0[..]).map_err(|_| Error::Provider)?;
        Ok(material)
    }

    /// Copies existing bytes into new material; fails unless exactly [`KEY_LEN`] long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != KEY_LEN {
            return Err(Error::InvalidArgument(format!(
                "key material must be {KEY_LEN} bytes"
            )));
        }
        let mut material = Self::zeroed();
        material.0.copy_from_slice(bytes);
        Ok(material)
    }

    /// The raw bytes. Callers must not log, store in the clear, or return them except
    /// through a deliberate export path.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// An independent copy. Named rather than `Clone` so copies of secrets are visible.
    pub fn duplicate(&self) -> Self {
        let mut copy = Self::zeroed();
        copy.0.copy_from_slice(&self.0[..]);
        copy
    }

    /// Derives a 256-bit subkey with HKDF-SHA256 as `derivation` says.
    ///
    /// Used for derived (per-context) keys, the barrier key and the root-key
    /// wrapping key. The label separates uses so the same input never yields the
    /// same subkey for two purposes; with [`Derivation::V2`] that holds whatever the
    /// contexts are. Labels are this crate's constants, far below the 64 KiB a
    /// V2 length prefix can express; a longer one is refused.
    ///
    /// Fails with [`Error::Provider`] only if aws-lc-rs refuses a 32-byte expansion,
    /// which a working provider never does.
    pub fn derive(&self, derivation: Derivation, label: &[u8], context: &[u8]) -> Result<Self> {
        let mut out = Self::zeroed();
        match derivation {
            Derivation::V1 => {
                let prk = Salt::none(HKDF_SHA256).extract(&self.0[..]);
                prk.expand(&[label, context], HKDF_SHA256)
                    .and_then(|okm| okm.fill(&mut out.0[..]))
                    .map_err(|_| Error::Provider)?;
            }
            Derivation::V2 => {
                let label_len = u16::try_from(label.len())
                    .map_err(|_| Error::InvalidArgument("HKDF label too long".into()))?
                    .to_be_bytes();
                let prk = Prk::new_less_safe(HKDF_SHA256, &self.0[..]);
                prk.expand(&[&label_len, label, context], HKDF_SHA256)
                    .and_then(|okm| okm.fill(&mut out.0[..]))
                    .map_err(|_| Error::Provider)?;
            }
        }
        Ok(out)
    }

    /// All-zero material in its final heap place, to be written into.
    fn zeroed() -> Self {
        Self(Box::new([0u8; KEY_LEN]))
    }
}

impl Drop for KeyMaterial {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl ZeroizeOnDrop for KeyMaterial {}

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
#[allow(clippy::unwrap_used)] // in tests a panic is the failure report
mod tests {
    use super::*;

    fn material(byte: u8) -> KeyMaterial {
        KeyMaterial::from_slice(&[byte; KEY_LEN]).unwrap()
    }

    /// The reference for V1: what the code derived with the RustCrypto `hkdf` crate
    /// before moving to aws-lc-rs.
    fn rustcrypto_v1(ikm: &[u8], label: &[u8], context: &[u8]) -> [u8; KEY_LEN] {
        let mut out = [0u8; KEY_LEN];
        hkdf::Hkdf::<sha2::Sha256>::new(None, ikm)
            .expand_multi_info(&[label, context], &mut out)
            .unwrap();
        out
    }

    #[test]
    fn debug_never_prints_material() {
        let k = material(0xAB);
        let s = format!("{k:?}");
        // A derived `Debug` would print the bytes in decimal (171) or hex (ab).
        assert!(
            !s.contains("171") && !s.to_lowercase().contains("ab"),
            "{s}"
        );
        assert_eq!(s, "KeyMaterial([redacted])");
        let b = SecretBytes::new(b"patient: Jane Doe".to_vec());
        assert!(!format!("{b:?}").contains("Jane"));
    }

    #[test]
    fn material_is_written_in_place_and_never_moves() {
        let k = KeyMaterial::generate().unwrap();
        let at = k.expose_secret().as_ptr();
        // Moving the value (into a Vec, out of it, through a Box) moves a pointer.
        let mut held = vec![k];
        let k = held.pop().unwrap();
        let boxed = Box::new(k);
        assert_eq!(boxed.expose_secret().as_ptr(), at);

        assert!(KeyMaterial::from_slice(&[1; 31]).is_err());
        assert!(KeyMaterial::from_slice(&[1; 33]).is_err());
        let copy = boxed.duplicate();
        assert_eq!(copy.expose_secret(), boxed.expose_secret());
        assert_ne!(copy.expose_secret().as_ptr(), at);
    }

    /// V1 is bit-for-bit what the RustCrypto `hkdf` crate computed, so every key
    /// version and seal record created before V2 still opens.
    #[test]
    fn v1_matches_the_previous_implementation() {
        let k = material(7);
        for (label, context) in [
            (&b"cipherd/derived-key/v1"[..], &b"tenant-7"[..]),
            (b"cipherd/barrier/v1", &1u32.to_be_bytes()),
            (b"cipherd/root-key/v1", b""),
            (b"", b"only context"),
        ] {
            assert_eq!(
                *k.derive(Derivation::V1, label, context)
                    .unwrap()
                    .expose_secret(),
                rustcrypto_v1(k.expose_secret(), label, context),
                "{label:?}"
            );
        }
    }

    /// Known-answer vectors for both derivations: material 0xc0..0xdf, label
    /// "cipherd/derived-key/v1", context "tenant-7". The V1 value also appears in
    /// docs/ciphertext-format.md. V2 was computed independently as HMAC-SHA256(
    /// key = material, msg = 0x0016 || label || context || 0x01) (Python `hmac`).
    #[test]
    fn known_answers_for_both_derivations() {
        let m =
            KeyMaterial::from_slice(&std::array::from_fn::<u8, 32, _>(|i| 0xc0 + i as u8)).unwrap();
        let label = b"cipherd/derived-key/v1";
        let v1 = m.derive(Derivation::V1, label, b"tenant-7").unwrap();
        assert_eq!(
            hex::encode(v1.expose_secret()),
            "35cd0cee32277ded8d105dfe0bae27f251ff97108af0d53a8c9cfe31d690b6fd"
        );
        assert_eq!(
            v1.expose_secret(),
            &rustcrypto_v1(m.expose_secret(), label, b"tenant-7")
        );
        let v2 = m.derive(Derivation::V2, label, b"tenant-7").unwrap();
        assert_eq!(hex::encode(v2.expose_secret()), V2_KAT);
        // V2 is HKDF-Expand with the material as PRK, checked against RustCrypto.
        let mut reference = [0u8; KEY_LEN];
        hkdf::Hkdf::<sha2::Sha256>::from_prk(m.expose_secret())
            .unwrap()
            .expand_multi_info(&[&[0, 22], label, b"tenant-7"], &mut reference)
            .unwrap();
        assert_eq!(v2.expose_secret(), &reference);
        assert_ne!(v1.expose_secret(), v2.expose_secret());
    }

    /// The V2 answer, from the independent computation described above.
    const V2_KAT: &str = "b50fc9e570e0762e7f35f4e84e673f4dd542bb0c92bafef34fdcd0c1e6cd8dad";

    #[test]
    fn v2_labels_and_contexts_cannot_be_confused() {
        let k = material(7);
        // The V1 ambiguity: "a" + "bc" and "ab" + "c" are the same `info`.
        assert_eq!(
            k.derive(Derivation::V1, b"a", b"bc")
                .unwrap()
                .expose_secret(),
            k.derive(Derivation::V1, b"ab", b"c")
                .unwrap()
                .expose_secret()
        );
        assert_ne!(
            k.derive(Derivation::V2, b"a", b"bc")
                .unwrap()
                .expose_secret(),
            k.derive(Derivation::V2, b"ab", b"c")
                .unwrap()
                .expose_secret()
        );
        // An empty context and an empty label are distinct too.
        assert_ne!(
            k.derive(Derivation::V2, b"ab", b"")
                .unwrap()
                .expose_secret(),
            k.derive(Derivation::V2, b"", b"ab")
                .unwrap()
                .expose_secret()
        );
    }

    #[test]
    fn derive_separates_labels_and_contexts() {
        let k = material(7);
        for d in [Derivation::V1, Derivation::V2] {
            let a = k.derive(d, b"a", b"ctx").unwrap();
            let b = k.derive(d, b"b", b"ctx").unwrap();
            let c = k.derive(d, b"a", b"ctx2").unwrap();
            assert_ne!(a.expose_secret(), b.expose_secret());
            assert_ne!(a.expose_secret(), c.expose_secret());
            assert_eq!(
                a.expose_secret(),
                k.derive(d, b"a", b"ctx").unwrap().expose_secret()
            );
        }
        assert!(k.derive(Derivation::V2, &vec![b'x'; 1 << 16], b"").is_err());
    }

    #[test]
    fn derivation_numbers_round_trip() {
        for d in [Derivation::V1, Derivation::V2] {
            assert_eq!(Derivation::from_number(d.number()), Some(d));
        }
        assert_eq!(Derivation::from_number(0), None);
        assert_eq!(Derivation::from_number(3), None);
        assert_eq!(Derivation::default(), Derivation::V2);
    }
}
