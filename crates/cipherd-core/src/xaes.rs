//! C2SP XAES-256-GCM subkey derivation (<https://c2sp.org/XAES-256-GCM>).
//!
//! XAES-256-GCM turns a 256-bit key and a 192-bit nonce `N` into an AES-256-GCM
//! message: the subkey comes from the first half `N[..12]` through the NIST
//! SP 800-108r1 counter-mode KDF with AES-256-CMAC as the PRF, and the second half
//! `N[12..]` is the GCM nonce. Because every CMAC input is exactly one block, the
//! whole derivation is three AES-256 block encryptions, and one of them (the CMAC
//! subkey `K1`) depends on the key only, so [`Xaes256Gcm::new`] computes it once.
//! Messages whose nonces share the first half share the subkey, which is what lets
//! [`crate::aead::Sealer`] derive one subkey per batch rather than per message.
//!
//! This module only derives subkeys. It does not encrypt: [`crate::aead`] runs
//! AES-256-GCM on aws-lc-rs with the key returned by [`Xaes256Gcm::subkey`], and
//! owns nonce generation and the wire layout.
//!
//! Secrets: the AES-256 key schedule is zeroized on drop (the `aes` crate's
//! `zeroize` feature), `K1` and every derived subkey buffer are zeroized on drop,
//! and aws-lc frees the GCM key context with `OPENSSL_free`, which cleanses it.

use aes::{
    Aes256Enc, Block,
    cipher::{BlockCipherEncrypt, KeyInit, array::Array},
};
use aws_lc_rs::aead::{AES_256_GCM, LessSafeKey, UnboundKey};
use zeroize::Zeroizing;

use crate::{Error, Result, secret::KeyMaterial};

/// Leading nonce bytes that select the XAES-256-GCM subkey (the KDF context).
pub(crate) const XAES_PREFIX_LEN: usize = 12;

/// The NIST SP 800-108r1 `Label` for XAES-256-GCM: ASCII `X`.
const LABEL: u8 = 0x58;

/// An XAES-256-GCM key: the AES-256 key schedule of `K` and the CMAC subkey `K1`.
///
/// Deriving a subkey costs two AES-256 block encryptions plus an AES-256-GCM key
/// setup; nothing else is recomputed per subkey.
pub(crate) struct Xaes256Gcm {
    /// AES-256 (encryption only) with the input key `K`; zeroized on drop by the `aes` crate.
    aes: Aes256Enc,
    /// CMAC subkey `K1 = dbl(AES-256_K(0^128))`.
    k1: Zeroizing<[u8; 16]>,
}

impl Xaes256Gcm {
    /// Runs the AES-256 key schedule and derives `K1` (steps 1 and 2 of the spec).
    pub(crate) fn new(material: &KeyMaterial) -> Self {
        let aes = Aes256Enc::new(material.expose_secret().into());
        let mut l = Zeroizing::new([0u8; 16]);
        aes.encrypt_block(Array::cast_from_core_mut(&mut l));
        let k1 = Zeroizing::new(double(&l));
        Self { aes, k1 }
    }

    /// The AES-256-GCM subkey for the nonce prefix `N[..12]` (the KDF context),
    /// prepared for aws-lc-rs. The message's GCM nonce is `N[12..]` unchanged.
    ///
    /// The subkey bytes live only in a zeroizing buffer until aws-lc has copied
    /// them into its own (cleansed-on-free) key context.
    pub(crate) fn subkey(&self, prefix: &[u8; XAES_PREFIX_LEN]) -> Result<LessSafeKey> {
        let subkey = self.derive_subkey(prefix);
        // aws-lc only rejects keys of the wrong length; ours is always 32 bytes, so
        // a failure here means the provider itself is broken.
        let key = UnboundKey::new(&AES_256_GCM, subkey.as_slice()).map_err(|_| Error::Provider)?;
        Ok(LessSafeKey::new(key))
    }

    /// `Kx = AES-256_K(M1 ⊕ K1) || AES-256_K(M2 ⊕ K1)` (steps 3 to 5 of the spec),
    /// where `Mi = 0x00 || i || 'X' || 0x00 || N[..12]`.
    fn derive_subkey(&self, kdf_context: &[u8; XAES_PREFIX_LEN]) -> Zeroizing<[u8; 32]> {
        let mut blocks = Zeroizing::new([[0u8; 16]; 2]);
        for (counter, block) in (1u8..).zip(blocks.iter_mut()) {
            block[..4].copy_from_slice(&[0x00, counter, LABEL, 0x00]);
            block[4..].copy_from_slice(kdf_context);
            for (b, k) in block.iter_mut().zip(self.k1.iter()) {
                *b ^= k;
            }
        }
        // Both blocks in one call, so the AES backend can pipeline them.
        let as_blocks: &mut [Block] = Array::cast_slice_from_core_mut(&mut blocks[..]);
        self.aes.encrypt_blocks(as_blocks);

        let mut subkey = Zeroizing::new([0u8; 32]);
        subkey.copy_from_slice(blocks.as_flattened());
        subkey
    }
}

/// Doubling in GF(2^128) as CMAC defines it (NIST SP 800-38B §6.1): shift the
/// big-endian 128-bit value left by one and, if a bit fell off, XOR `0x87` into
/// the last byte. Branch-free, since `l` is secret.
fn double(l: &[u8; 16]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for i in 0..16 {
        let carry_in = l.get(i + 1).map_or(0, |next| next >> 7);
        out[i] = (l[i] << 1) | carry_in;
    }
    let msb_mask = 0u8.wrapping_sub(l[0] >> 7);
    out[15] ^= 0x87 & msb_mask;
    out
}

// Compile-time proof that the AES key schedule is wiped on drop: this stops
// compiling if the `aes/zeroize` feature is ever dropped from Cargo.toml.
const _: fn() = || {
    fn assert_zeroize_on_drop<T: zeroize::ZeroizeOnDrop>() {}
    assert_zeroize_on_drop::<Aes256Enc>();
};

#[cfg(test)]
mod tests {
    use aws_lc_rs::aead::{Aad, Nonce};

    use super::*;

    fn unhex<const N: usize>(s: &str) -> [u8; N] {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    /// Intermediate values from both C2SP vectors; the second has MSB₁(L) = 1 so it
    /// exercises the `0x87` reduction in `double`.
    #[test]
    fn c2sp_intermediate_values() {
        let nonce: [u8; 24] = *b"ABCDEFGHIJKLMNOPQRSTUVWX";
        for (key_byte, l_hex, k1_hex, kx_hex) in [
            (
                0x01,
                "7298caa565031eadc6ce23d23ea66378",
                "e531954aca063d5b8d9c47a47d4cc6f0",
                "c8612c9ed53fe43e8e005b828a1631a0bbcb6ab2f46514ec4f439fcfd0fa969b",
            ),
            (
                0x03,
                "91c08762876dccf9ba204a33768fa5fe",
                "23810ec50edb99f374409466ed1f4b7b",
                "e9c621d4cdd9b11b00a6427ad7e559aeedd66b3857646677748f8ca796cb3fd8",
            ),
        ] {
            let material = KeyMaterial::from_slice(&[key_byte; 32]).unwrap();
            let xaes = Xaes256Gcm::new(&material);

            let l: [u8; 16] = unhex(l_hex);
            assert_eq!(double(&l), unhex::<16>(k1_hex));
            assert_eq!(*xaes.k1, unhex::<16>(k1_hex));

            let context: &[u8; 12] = nonce[..12].try_into().unwrap();
            assert_eq!(*xaes.derive_subkey(context), unhex::<32>(kx_hex));
        }
    }

    #[test]
    fn subkey_is_aes_256_gcm_under_the_second_nonce_half() {
        let material = KeyMaterial::from_slice(&[0x01; 32]).unwrap();
        let key = Xaes256Gcm::new(&material).subkey(b"ABCDEFGHIJKL").unwrap();
        let nonce = Nonce::assume_unique_for_key(*b"MNOPQRSTUVWX");
        let mut in_out = b"XAES-256-GCM".to_vec();
        let tag = key
            .seal_in_place_separate_tag(nonce, Aad::empty(), &mut in_out)
            .unwrap();
        in_out.extend_from_slice(tag.as_ref());
        assert_eq!(
            hex::encode(in_out),
            "ce546ef63c9cc60765923609b33a9a1974e96e52daf2fcf7075e2271"
        );
    }

    #[test]
    fn double_matches_shift_and_reduce_on_edge_values() {
        assert_eq!(double(&[0; 16]), [0; 16]);
        let mut one = [0u8; 16];
        one[15] = 1;
        let mut two = [0u8; 16];
        two[15] = 2;
        assert_eq!(double(&one), two);
        // Carry across a byte boundary.
        let mut carry = [0u8; 16];
        carry[15] = 0x80;
        let mut carried = [0u8; 16];
        carried[14] = 1;
        assert_eq!(double(&carry), carried);
        // Top bit set: shifted out and reduced by 0x87.
        let mut top = [0u8; 16];
        top[0] = 0x80;
        let mut reduced = [0u8; 16];
        reduced[15] = 0x87;
        assert_eq!(double(&top), reduced);
    }
}
