//! Authenticated encryption for every [`KeyType`], behind one prepared-key type.
//!
//! [`AeadKey`] does the key schedule once and is then shared (it is `Send + Sync`,
//! hold it in an `Arc`). Sealing draws a fresh random nonce for every message and
//! appends `nonce || ciphertext || tag` to a caller-owned `Vec`, so a batch can be
//! written into one buffer with no per-item allocation.
//!
//! Backends:
//!
//! | key type | implementation |
//! | --- | --- |
//! | `aes256-gcm96` | aws-lc-rs AES-256-GCM |
//! | `chacha20-poly1305` | aws-lc-rs ChaCha20-Poly1305 |
//! | `xaes-256-gcm` | C2SP XAES-256-GCM: subkey from the private `xaes` module, then aws-lc-rs AES-256-GCM |
//! | `xchacha20-poly1305` | RustCrypto `chacha20poly1305` (aws-lc-rs has no XChaCha) |
//!
//! What this module does not do: it does not frame ciphertexts with a version or
//! key id (that is `ciphertext`), does not count encryptions against the 96-bit
//! nonce limit (the keyring does), and does not derive per-context keys. Callers
//! choose nonces only through [`danger::seal_with_nonce_append`], which exists for
//! known-answer and cross-implementation tests.
//!
//! Every decryption failure, whatever its cause, is [`Error::DecryptionFailed`].

use std::{cell::RefCell, fmt};

use aws_lc_rs::aead::{AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use chacha20poly1305::{
    XChaCha20Poly1305, XNonce,
    aead::{AeadInOut, KeyInit},
};
use zeroize::Zeroize;

use crate::{
    Error, KeyType, Result,
    secret::KeyMaterial,
    xaes::{XAES_NONCE_LEN, Xaes256Gcm},
};

/// A key prepared for one AEAD algorithm: key schedule done once, `Send + Sync`,
/// shareable via `Arc`.
///
/// Deliberately not `Clone` (a copy of a key should be a visible, deliberate act)
/// and its `Debug` prints the key type only.
pub struct AeadKey {
    key_type: KeyType,
    backend: Backend,
}

impl AeadKey {
    /// Prepares `material` for `key_type`.
    ///
    /// Fails with [`Error::Provider`] only if the crypto provider rejects a
    /// well-formed 256-bit key, which does not happen with a working provider.
    pub fn new(key_type: KeyType, material: &KeyMaterial) -> Result<Self> {
        let backend = match key_type {
            KeyType::Aes256Gcm96 => Backend::AwsLc(aws_lc_key(&AES_256_GCM, material)?),
            KeyType::ChaCha20Poly1305 => Backend::AwsLc(aws_lc_key(&CHACHA20_POLY1305, material)?),
            KeyType::Xaes256Gcm => Backend::Xaes(Xaes256Gcm::new(material)),
            KeyType::XChaCha20Poly1305 => {
                Backend::XChaCha(XChaCha20Poly1305::new(material.expose_secret().into()))
            }
        };
        Ok(Self { key_type, backend })
    }

    /// The algorithm this key runs.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// `nonce_len + tag_len`: bytes a sealed message adds over its plaintext.
    pub fn overhead(&self) -> usize {
        self.key_type.nonce_len() + self.key_type.tag_len()
    }

    /// Encrypts under a fresh random nonce and appends `nonce || ciphertext || tag`
    /// to `out`.
    ///
    /// The nonce comes from aws-lc's CSPRNG (drawn in blocks per thread, see
    /// `random_nonce` in the source); a failure there is [`Error::Provider`] and
    /// leaves `out` as it was. `out` grows by exactly
    /// `plaintext.len() + self.overhead()` bytes and reallocates at most once.
    pub fn seal_append(&self, aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let mut nonce_buf = [0u8; MAX_NONCE_LEN];
        let nonce = &mut nonce_buf[..self.key_type.nonce_len()];
        random_nonce(nonce)?;
        self.seal_with_nonce(nonce, aad, plaintext, out)
    }

    /// Decrypts `sealed = nonce || ciphertext || tag`, appending the plaintext to
    /// `out`.
    ///
    /// Any failure (short input, bad tag, wrong key or associated data) is
    /// [`Error::DecryptionFailed`] and leaves `out` as it was; bytes written into
    /// its spare capacity along the way are zeroized.
    pub fn open_append(&self, aad: &[u8], sealed: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let nonce_len = self.key_type.nonce_len();
        if sealed.len() < nonce_len + TAG_LEN {
            return Err(Error::DecryptionFailed);
        }
        let (nonce, ct_and_tag) = sealed.split_at(nonce_len);

        let start = out.len();
        out.extend_from_slice(ct_and_tag);
        let in_out = &mut out[start..];
        let opened = match &self.backend {
            Backend::AwsLc(key) => {
                aws_lc_nonce(nonce).and_then(|n| open_aws_lc(key, n, aad, in_out))
            }
            Backend::Xaes(xaes) => xaes_nonce(nonce)
                .and_then(|n| xaes.message_key(n))
                .and_then(|(key, n)| open_aws_lc(&key, n, aad, in_out)),
            Backend::XChaCha(cipher) => open_xchacha(cipher, nonce, aad, in_out),
        };
        match opened {
            Ok(()) => {
                out.truncate(out.len() - TAG_LEN);
                Ok(())
            }
            Err(_) => {
                discard_tail(out, start);
                Err(Error::DecryptionFailed)
            }
        }
    }

    /// Seals with the given nonce; shared by [`Self::seal_append`] and
    /// [`danger::seal_with_nonce_append`].
    fn seal_with_nonce(
        &self,
        nonce: &[u8],
        aad: &[u8],
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<()> {
        if nonce.len() != self.key_type.nonce_len() {
            return Err(Error::InvalidArgument(format!(
                "{} needs a {}-byte nonce, got {} bytes",
                self.key_type,
                self.key_type.nonce_len(),
                nonce.len()
            )));
        }

        let start = out.len();
        out.reserve(plaintext.len() + self.overhead());
        out.extend_from_slice(nonce);
        out.extend_from_slice(plaintext);
        let in_out = &mut out[start + nonce.len()..];
        let sealed = match &self.backend {
            Backend::AwsLc(key) => {
                aws_lc_nonce(nonce).and_then(|n| seal_aws_lc(key, n, aad, in_out))
            }
            Backend::Xaes(xaes) => xaes_nonce(nonce)
                .and_then(|n| xaes.message_key(n))
                .and_then(|(key, n)| seal_aws_lc(&key, n, aad, in_out)),
            Backend::XChaCha(cipher) => seal_xchacha(cipher, nonce, aad, in_out),
        };
        match sealed {
            Ok(tag) => {
                out.extend_from_slice(&tag);
                Ok(())
            }
            Err(e) => {
                discard_tail(out, start);
                Err(e)
            }
        }
    }
}

impl fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AeadKey")
            .field("key_type", &self.key_type)
            .finish_non_exhaustive()
    }
}

/// Operations that can destroy security if misused.
pub mod danger {
    use super::AeadKey;
    use crate::Result;

    /// Seal with a caller-chosen nonce. Only for known-answer tests and
    /// cross-implementation checks; reusing a nonce destroys confidentiality and
    /// authenticity. Appends `nonce || ciphertext || tag` to `out`.
    ///
    /// Fails with [`crate::Error::InvalidArgument`] (leaving `out` as it was) when
    /// `nonce` is not exactly `key.key_type().nonce_len()` bytes.
    pub fn seal_with_nonce_append(
        key: &AeadKey,
        nonce: &[u8],
        aad: &[u8],
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<()> {
        key.seal_with_nonce(nonce, aad, plaintext, out)
    }
}

/// Authentication tag length of every supported algorithm.
const TAG_LEN: usize = 16;

/// The longest nonce of any key type (192 bits).
const MAX_NONCE_LEN: usize = XAES_NONCE_LEN;

/// Bytes of CSPRNG output each thread draws at once for nonces.
const NONCE_POOL_LEN: usize = 4096;

thread_local! {
    static NONCE_POOL: RefCell<NoncePool> = const { RefCell::new(NoncePool::empty()) };
}

/// Fills `nonce` with fresh random bytes from aws-lc's CSPRNG.
///
/// Why a pool: each `aws_lc_rs::rand::fill` call costs about 0.4 to 0.6 µs
/// whatever its length (measured here), more than sealing a 1 KiB message, while
/// a 4 KiB fill costs about 1.3 µs. Drawing 4 KiB per thread and handing out
/// consecutive, never-reused slices brings a nonce to a few nanoseconds. The
/// bytes are not secret (they are published as nonces), so holding them ahead of
/// time exposes nothing. The one hazard of any user-space RNG buffer is `fork()`
/// without `exec`: the child would inherit the unused remainder. cipherd never
/// forks; a future caller that does must not seal in the child before a refill.
fn random_nonce(nonce: &mut [u8]) -> Result<()> {
    NONCE_POOL
        .try_with(|pool| pool.borrow_mut().take(nonce))
        // The thread-local is gone only while this thread is being torn down.
        .unwrap_or_else(|_| aws_lc_rs::rand::fill(nonce).map_err(|_| Error::Provider))
}

/// One thread's unused CSPRNG output; `buf[pos..]` has never been handed out.
struct NoncePool {
    buf: [u8; NONCE_POOL_LEN],
    pos: usize,
}

impl NoncePool {
    /// A pool with nothing left: the first `take` refills it.
    const fn empty() -> Self {
        Self {
            buf: [0; NONCE_POOL_LEN],
            pos: NONCE_POOL_LEN,
        }
    }

    /// Copies the next `dst.len()` unused bytes into `dst`, refilling first when
    /// too few remain. On a refill failure nothing is handed out.
    fn take(&mut self, dst: &mut [u8]) -> Result<()> {
        if NONCE_POOL_LEN - self.pos < dst.len() {
            aws_lc_rs::rand::fill(&mut self.buf).map_err(|_| Error::Provider)?;
            self.pos = 0;
        }
        let end = self.pos + dst.len();
        dst.copy_from_slice(&self.buf[self.pos..end]);
        self.pos = end;
        Ok(())
    }
}

/// The prepared key, per implementation.
// The XAES variant carries an AES key schedule (~1 KiB with the `aes` crate's
// runtime-detected backends). An `AeadKey` is built once per key version and shared
// through an `Arc`, so the size costs nothing while a `Box` would add a pointer
// chase to every XAES message.
#[allow(clippy::large_enum_variant)]
enum Backend {
    /// AES-256-GCM or ChaCha20-Poly1305 on aws-lc-rs, 96-bit nonces.
    AwsLc(LessSafeKey),
    /// XAES-256-GCM: per-message subkey, then AES-256-GCM on aws-lc-rs.
    Xaes(Xaes256Gcm),
    /// XChaCha20-Poly1305 on RustCrypto; its key is zeroized on drop
    /// (`chacha20poly1305/zeroize`).
    XChaCha(XChaCha20Poly1305),
}

fn aws_lc_key(
    algorithm: &'static aws_lc_rs::aead::Algorithm,
    material: &KeyMaterial,
) -> Result<LessSafeKey> {
    UnboundKey::new(algorithm, material.expose_secret())
        .map(LessSafeKey::new)
        .map_err(|_| Error::Provider)
}

/// A 96-bit aws-lc nonce; the caller has already checked the length, so the error
/// arm is unreachable in practice.
fn aws_lc_nonce(nonce: &[u8]) -> Result<Nonce> {
    Nonce::try_assume_unique_for_key(nonce)
        .map_err(|_| Error::InvalidArgument("nonce must be 12 bytes".into()))
}

fn xaes_nonce(nonce: &[u8]) -> Result<&[u8; XAES_NONCE_LEN]> {
    nonce
        .try_into()
        .map_err(|_| Error::InvalidArgument("nonce must be 24 bytes".into()))
}

/// Encrypts `in_out` in place and returns the tag. aws-lc fails only for inputs
/// beyond the algorithm's length limit (about 64 GiB), far above any message size
/// cipherd accepts, so a failure is reported as a provider fault.
fn seal_aws_lc(
    key: &LessSafeKey,
    nonce: Nonce,
    aad: &[u8],
    in_out: &mut [u8],
) -> Result<[u8; TAG_LEN]> {
    let tag = key
        .seal_in_place_separate_tag(nonce, Aad::from(aad), in_out)
        .map_err(|_| Error::Provider)?;
    tag.as_ref().try_into().map_err(|_| Error::Provider)
}

/// Decrypts `in_out = ciphertext || tag` in place.
fn open_aws_lc(key: &LessSafeKey, nonce: Nonce, aad: &[u8], in_out: &mut [u8]) -> Result<()> {
    key.open_in_place(nonce, Aad::from(aad), in_out)
        .map(|_| ())
        .map_err(|_| Error::DecryptionFailed)
}

fn seal_xchacha(
    cipher: &XChaCha20Poly1305,
    nonce: &[u8],
    aad: &[u8],
    in_out: &mut [u8],
) -> Result<[u8; TAG_LEN]> {
    let nonce = <&XNonce>::try_from(nonce)
        .map_err(|_| Error::InvalidArgument("nonce must be 24 bytes".into()))?;
    let tag = cipher
        .encrypt_inout_detached(nonce, aad, in_out.into())
        .map_err(|_| Error::Provider)?;
    Ok(tag.into())
}

/// Decrypts `in_out = ciphertext || tag` in place (the tag is left in place; the
/// caller truncates it).
fn open_xchacha(
    cipher: &XChaCha20Poly1305,
    nonce: &[u8],
    aad: &[u8],
    in_out: &mut [u8],
) -> Result<()> {
    let nonce = <&XNonce>::try_from(nonce).map_err(|_| Error::DecryptionFailed)?;
    let ct_len = in_out
        .len()
        .checked_sub(TAG_LEN)
        .ok_or(Error::DecryptionFailed)?;
    let (ct, tag) = in_out.split_at_mut(ct_len);
    let tag = <&chacha20poly1305::Tag>::try_from(&*tag).map_err(|_| Error::DecryptionFailed)?;
    cipher
        .decrypt_inout_detached(nonce, aad, ct.into(), tag)
        .map_err(|_| Error::DecryptionFailed)
}

/// Restores `out` to its first `len` bytes after a failure, wiping what was written
/// past them: it may be plaintext (a failed seal) or unauthenticated plaintext (a
/// failed open), and truncation alone would leave it in the spare capacity.
fn discard_tail(out: &mut Vec<u8>, len: usize) {
    out[len..].zeroize();
    out.truncate(len);
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFIX: &[u8] = b"already in the buffer";

    fn material(byte: u8) -> KeyMaterial {
        KeyMaterial::from_slice(&[byte; 32]).unwrap()
    }

    fn key(key_type: KeyType, byte: u8) -> AeadKey {
        AeadKey::new(key_type, &material(byte)).unwrap()
    }

    fn seal(key: &AeadKey, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        key.seal_append(aad, plaintext, &mut out).unwrap();
        out
    }

    /// Opens into a buffer that already holds `PREFIX` and checks that a failure
    /// leaves it exactly as it was.
    fn open(key: &AeadKey, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>> {
        let mut out = PREFIX.to_vec();
        match key.open_append(aad, sealed, &mut out) {
            Ok(()) => {
                assert_eq!(
                    &out[..PREFIX.len()],
                    PREFIX,
                    "open must append, not overwrite"
                );
                Ok(out[PREFIX.len()..].to_vec())
            }
            Err(e) => {
                assert_eq!(out, PREFIX, "a failed open must leave `out` unchanged");
                Err(e)
            }
        }
    }

    #[test]
    fn aead_key_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<AeadKey>();
    }

    #[test]
    fn round_trip_every_key_type_and_size() {
        for key_type in KeyType::ALL {
            let k = key(key_type, 1);
            assert_eq!(k.key_type(), key_type);
            for len in [0, 1, 15, 16, 17, 63, 64, 65, 1000, 4096] {
                let plaintext: Vec<u8> = (0..len).map(|i| i as u8).collect();
                for aad in [&b""[..], b"row 42, column ssn"] {
                    let mut out = PREFIX.to_vec();
                    k.seal_append(aad, &plaintext, &mut out).unwrap();
                    assert_eq!(&out[..PREFIX.len()], PREFIX, "seal must append");
                    let sealed = &out[PREFIX.len()..];
                    assert_eq!(sealed.len(), len + k.overhead(), "{key_type} len {len}");
                    if len >= 16 {
                        assert!(
                            !sealed.windows(16).any(|w| w == &plaintext[..16]),
                            "{key_type}: plaintext visible in the sealed output"
                        );
                    }
                    assert_eq!(
                        open(&k, aad, sealed).unwrap(),
                        plaintext,
                        "{key_type} {len}"
                    );
                }
            }
        }
    }

    #[test]
    fn overhead_is_nonce_plus_tag() {
        assert_eq!(key(KeyType::Aes256Gcm96, 1).overhead(), 12 + 16);
        assert_eq!(key(KeyType::ChaCha20Poly1305, 1).overhead(), 12 + 16);
        assert_eq!(key(KeyType::Xaes256Gcm, 1).overhead(), 24 + 16);
        assert_eq!(key(KeyType::XChaCha20Poly1305, 1).overhead(), 24 + 16);
    }

    #[test]
    fn tampering_with_any_byte_fails() {
        for key_type in KeyType::ALL {
            let k = key(key_type, 2);
            let sealed = seal(&k, b"aad", b"thirty-three bytes of patient PHI");
            // Every byte: nonce, ciphertext and tag, with a low and a high bit flip.
            for i in 0..sealed.len() {
                for bit in [0x01, 0x80] {
                    let mut tampered = sealed.clone();
                    tampered[i] ^= bit;
                    assert_eq!(
                        open(&k, b"aad", &tampered),
                        Err(Error::DecryptionFailed),
                        "{key_type}: flipping bit {bit:#x} of byte {i} went unnoticed"
                    );
                }
            }
            assert!(open(&k, b"aad", &sealed).is_ok(), "{key_type}: control");
        }
    }

    #[test]
    fn truncated_or_extended_input_fails() {
        for key_type in KeyType::ALL {
            let k = key(key_type, 3);
            let sealed = seal(&k, b"", b"some plaintext");
            for len in 0..sealed.len() {
                assert_eq!(
                    open(&k, b"", &sealed[..len]),
                    Err(Error::DecryptionFailed),
                    "{key_type}: truncated to {len}"
                );
            }
            let mut extended = sealed.clone();
            extended.push(0);
            assert_eq!(open(&k, b"", &extended), Err(Error::DecryptionFailed));
        }
    }

    #[test]
    fn wrong_aad_fails() {
        for key_type in KeyType::ALL {
            let k = key(key_type, 4);
            let sealed = seal(&k, b"patients/42", b"Jane Doe");
            assert_eq!(open(&k, b"patients/42", &sealed).unwrap(), b"Jane Doe");
            for aad in [&b"patients/43"[..], b"", b"patients/42\0"] {
                assert_eq!(
                    open(&k, aad, &sealed),
                    Err(Error::DecryptionFailed),
                    "{key_type}"
                );
            }
        }
    }

    #[test]
    fn wrong_key_or_key_type_fails() {
        for key_type in KeyType::ALL {
            let sealed = seal(&key(key_type, 5), b"", b"Jane Doe");
            assert_eq!(
                open(&key(key_type, 6), b"", &sealed),
                Err(Error::DecryptionFailed),
                "{key_type}: opened under a different key"
            );
            for other in KeyType::ALL.into_iter().filter(|t| *t != key_type) {
                assert_eq!(
                    open(&key(other, 5), b"", &sealed),
                    Err(Error::DecryptionFailed),
                    "{key_type} ciphertext opened as {other}"
                );
            }
        }
    }

    #[test]
    fn seals_of_the_same_message_differ() {
        for key_type in KeyType::ALL {
            let k = key(key_type, 7);
            let a = seal(&k, b"", b"same plaintext");
            let b = seal(&k, b"", b"same plaintext");
            let nonce_len = key_type.nonce_len();
            assert_ne!(a[..nonce_len], b[..nonce_len], "{key_type}: nonce repeated");
            assert_ne!(
                a[nonce_len..],
                b[nonce_len..],
                "{key_type}: ciphertext repeated"
            );
        }
    }

    #[test]
    fn danger_seal_is_deterministic_and_checks_nonce_length() {
        for key_type in KeyType::ALL {
            let k = key(key_type, 8);
            let nonce = vec![0x42; key_type.nonce_len()];
            let mut a = PREFIX.to_vec();
            danger::seal_with_nonce_append(&k, &nonce, b"aad", b"msg", &mut a).unwrap();
            let mut b = Vec::new();
            danger::seal_with_nonce_append(&k, &nonce, b"aad", b"msg", &mut b).unwrap();
            assert_eq!(&a[PREFIX.len()..], &b[..], "{key_type}");
            assert_eq!(&b[..nonce.len()], &nonce[..], "{key_type}: nonce prefix");
            assert_eq!(open(&k, b"aad", &b).unwrap(), b"msg");

            for bad_len in [0, 11, 12, 13, 23, 24, 25, 32] {
                if bad_len == key_type.nonce_len() {
                    continue;
                }
                let mut out = PREFIX.to_vec();
                let err =
                    danger::seal_with_nonce_append(&k, &vec![0; bad_len], b"", b"msg", &mut out)
                        .unwrap_err();
                assert!(
                    matches!(err, Error::InvalidArgument(_)),
                    "{key_type}: {err:?}"
                );
                assert_eq!(out, PREFIX);
            }
        }
    }

    #[test]
    fn nonce_pool_never_hands_out_a_byte_twice() {
        let mut pool = NoncePool::empty();
        let mut seen = std::collections::HashSet::new();
        // 1,000 nonces of 12 and 24 bytes cross several refills, including a
        // refill with bytes still left over (4096 is not a multiple of 36).
        for i in 0..1000 {
            let mut n12 = [0u8; 12];
            let mut n24 = [0u8; 24];
            pool.take(&mut n12).unwrap();
            pool.take(&mut n24).unwrap();
            assert!(seen.insert(n12.to_vec()), "12-byte nonce repeated at {i}");
            assert!(seen.insert(n24.to_vec()), "24-byte nonce repeated at {i}");
            assert!(pool.pos <= NONCE_POOL_LEN);
        }
        // A handed-out range is never reissued: right after a take, `pos` moved past it.
        let before = pool.pos;
        pool.take(&mut [0u8; 12]).unwrap();
        assert!(
            pool.pos == before + 12 || pool.pos == 12,
            "pos {before} -> {}",
            pool.pos
        );
    }

    #[test]
    fn nonces_differ_across_threads() {
        let k = std::sync::Arc::new(key(KeyType::Aes256Gcm96, 9));
        let nonces: Vec<Vec<u8>> = (0..4)
            .map(|_| {
                let k = k.clone();
                std::thread::spawn(move || seal(&k, b"", b"x")[..12].to_vec())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        for (i, a) in nonces.iter().enumerate() {
            for b in &nonces[i + 1..] {
                assert_ne!(a, b, "two threads drew the same nonce");
            }
        }
    }

    #[test]
    fn debug_prints_key_type_only() {
        for key_type in KeyType::ALL {
            let s = format!("{:?}", key(key_type, 0xAB));
            assert!(s.contains(&format!("{key_type:?}")), "{s}");
            assert!(!s.to_lowercase().contains("ab"), "{s}");
            assert!(!s.contains("171"), "{s}");
        }
    }
}
