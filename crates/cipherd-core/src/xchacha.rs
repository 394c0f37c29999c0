//! XChaCha20-Poly1305 subkey derivation (draft-irtf-cfrg-xchacha-03).
//!
//! XChaCha20-Poly1305 turns a 256-bit key and a 192-bit nonce `N` into an IETF
//! ChaCha20-Poly1305 (RFC 8439) message: the subkey is `HChaCha20(K, N[..16])` and
//! the 96-bit nonce is `0x00000000 || N[16..24]`. This module derives the subkey
//! with the RustCrypto `chacha20` crate's `hchacha`; [`crate::aead`] then seals
//! and opens with aws-lc-rs ChaCha20-Poly1305, which is several times faster than
//! the RustCrypto AEAD (the RustCrypto `chacha20poly1305` crate stays in the tests
//! as an independent reference).
//!
//! Like [`crate::xaes`], this module derives keys only; nonce generation and the
//! wire layout belong to [`crate::aead`].
//!
//! Secrets: the input key and every subkey buffer are zeroized on drop, and aws-lc
//! cleanses its key context when it frees it. The `chacha20` crate's `hchacha`
//! works on a stack copy of the ChaCha state that it does not wipe; the RustCrypto
//! AEAD this replaces ran the same function, so nothing new is left behind.

use aws_lc_rs::aead::{CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use chacha20::R20;
use zeroize::{Zeroize, Zeroizing};

use crate::{Error, Result, secret::KeyMaterial};

/// Leading nonce bytes that HChaCha20 turns into the subkey.
pub(crate) const XCHACHA_PREFIX_LEN: usize = 16;

/// An XChaCha20-Poly1305 key: the 256-bit input key, kept for HChaCha20.
pub(crate) struct XChaCha20Poly1305 {
    key: Zeroizing<[u8; 32]>,
}

impl XChaCha20Poly1305 {
    /// Keeps a zeroizing copy of `material`.
    pub(crate) fn new(material: &KeyMaterial) -> Self {
        Self {
            key: Zeroizing::new(*material.expose_secret()),
        }
    }

    /// The ChaCha20-Poly1305 subkey `HChaCha20(K, prefix)` for the nonce prefix
    /// `N[..16]`, prepared for aws-lc-rs.
    pub(crate) fn subkey(&self, prefix: &[u8; XCHACHA_PREFIX_LEN]) -> Result<LessSafeKey> {
        let mut subkey = chacha20::hchacha::<R20>((&*self.key).into(), prefix.into());
        // aws-lc only rejects keys of the wrong length; ours is always 32 bytes, so
        // a failure here means the provider itself is broken.
        let key = UnboundKey::new(&CHACHA20_POLY1305, &subkey).map_err(|_| Error::Provider);
        subkey.as_mut_slice().zeroize();
        Ok(LessSafeKey::new(key?))
    }
}

/// The IETF ChaCha20-Poly1305 nonce for the XChaCha nonce suffix `N[16..24]`:
/// four zero bytes, then the suffix.
pub(crate) fn inner_nonce(suffix: &[u8; 8]) -> Nonce {
    let mut nonce = [0u8; NONCE_LEN];
    nonce[4..].copy_from_slice(suffix);
    Nonce::assume_unique_for_key(nonce)
}

#[cfg(test)]
mod tests {
    use aws_lc_rs::aead::Aad;

    use super::*;

    /// draft-irtf-cfrg-xchacha-03 §2.2.1, the HChaCha20 test vector.
    #[test]
    fn hchacha20_draft_vector() {
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        let input: [u8; 16] = hex::decode("000000090000004a0000000031415927")
            .unwrap()
            .try_into()
            .unwrap();
        let out = chacha20::hchacha::<R20>((&key).into(), (&input).into());
        assert_eq!(
            hex::encode(out),
            "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"
        );
    }

    /// The subkey and inner nonce give the same message as the RustCrypto
    /// XChaCha20-Poly1305 AEAD.
    #[test]
    fn subkey_and_inner_nonce_are_xchacha() {
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};

        let material = KeyMaterial::from_slice(&[0x5a; 32]).unwrap();
        let nonce: [u8; 24] = std::array::from_fn(|i| 0x80 + i as u8);
        let (prefix, suffix) = nonce.split_at(XCHACHA_PREFIX_LEN);
        let key = XChaCha20Poly1305::new(&material)
            .subkey(prefix.try_into().unwrap())
            .unwrap();
        let mut ours = b"XChaCha20-Poly1305 on aws-lc".to_vec();
        key.seal_in_place_append_tag(
            inner_nonce(suffix.try_into().unwrap()),
            Aad::from(b"aad"),
            &mut ours,
        )
        .unwrap();

        let theirs = chacha20poly1305::XChaCha20Poly1305::new(&[0x5a; 32].into())
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: b"XChaCha20-Poly1305 on aws-lc",
                    aad: b"aad",
                },
            )
            .unwrap();
        assert_eq!(ours, theirs);
    }
}
