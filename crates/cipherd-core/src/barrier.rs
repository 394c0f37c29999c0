//! The storage barrier, and sealing of the root key under the unseal key.
//!
//! Storage is untrusted. Every record cipherd stores goes through a [`Barrier`]:
//! AEAD-encrypted under the barrier key with its storage path in the associated
//! data, so a record that is altered, truncated, moved to another path or replayed
//! from another root generation fails to open.
//!
//! ```text
//! unseal key ──seal_root_key──► sealed root key (stored)
//! sealed root key (bound) = 0x02 || nonce (24) || ciphertext (32) || tag (16)
//!          AAD   = "cipherd/root-key/v1\0" || 0x02 || seal id (32)
//!                  || root generation (u32 BE) || threshold || shares
//! root key (generation g) ──HKDF label "cipherd/barrier/v1", context g──► barrier key
//! barrier record = 0x01 || g (u32 BE) || nonce (24) || ciphertext || tag (16)
//!          AAD   = "cipherd/barrier/v1\0" || 0x01 || g || path
//! ```
//!
//! The barrier key is XAES-256-GCM: 192-bit random nonces, so the number of writes
//! over the key's life needs no counting.
//!
//! Both HKDF steps (barrier key, root-key wrapping key) take a [`Derivation`]. It
//! belongs to the seal instance: the server stores it with the seal record
//! (records of the first format use [`Derivation::V1`], new initializations
//! [`Derivation::V2`]), so existing data dirs keep opening while new ones use the
//! injective encoding.
//!
//! This module does no I/O and keeps no state beyond the prepared key: callers read
//! and write the records, store the sealed root key, and decide when to rotate the
//! root (re-sealing every record under the next generation).

use std::fmt;

use zeroize::Zeroizing;

use crate::aead::AeadKey;
use crate::ciphertext::with_joined;
use crate::secret::{Derivation, KeyMaterial, SecretBytes};
use crate::{Error, KeyType, Result};

/// HKDF label deriving the barrier key from the root key.
pub const BARRIER_LABEL: &[u8] = b"cipherd/barrier/v1";

/// HKDF label deriving the root-key wrapping key from the unseal key.
pub const ROOT_KEY_LABEL: &[u8] = b"cipherd/root-key/v1";

/// First byte of a barrier record and of a sealed root key.
pub const RECORD_FORMAT_V1: u8 = 0x01;

/// Barrier record header: format byte and big-endian root generation.
pub const RECORD_HEADER_LEN: usize = 5;

/// Associated-data prefix of barrier records (the label and a NUL separator).
const BARRIER_AAD_PREFIX: &[u8] = b"cipherd/barrier/v1\0";

/// Associated data of a sealed root key (label, NUL, format byte).
const ROOT_KEY_AAD: &[u8] = b"cipherd/root-key/v1\0\x01";

/// First byte of a sealed root key bound to its seal parameters
/// ([`RootBinding`]).
pub const ROOT_FORMAT_BOUND: u8 = 0x02;

/// Associated-data prefix of a bound sealed root key (label, NUL, format byte).
const ROOT_KEY_BOUND_AAD: &[u8] = b"cipherd/root-key/v1\0\x02";

/// The seal parameters stored in the clear next to a sealed root key, bound
/// into its associated data so that none can be changed without the root key
/// failing to open: the seal's random id, the root generation the key is for,
/// and the Shamir threshold and share count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootBinding<'a> {
    /// The seal's random id (`crate::shamir::SealId`'s bytes).
    pub seal_id: &'a [u8; crate::shamir::SEAL_ID_LEN],
    /// The root generation.
    pub root_generation: u32,
    /// Shares needed to unseal.
    pub threshold: u8,
    /// Shares issued.
    pub shares: u8,
}

impl RootBinding<'_> {
    fn aad(&self) -> Vec<u8> {
        let mut aad = Vec::with_capacity(ROOT_KEY_BOUND_AAD.len() + self.seal_id.len() + 6);
        aad.extend_from_slice(ROOT_KEY_BOUND_AAD);
        aad.extend_from_slice(self.seal_id);
        aad.extend_from_slice(&self.root_generation.to_be_bytes());
        aad.push(self.threshold);
        aad.push(self.shares);
        aad
    }
}

/// The algorithm under both the barrier and the root-key seal.
const BARRIER_KEY_TYPE: KeyType = KeyType::Xaes256Gcm;

/// The root key: the top of the key hierarchy, stored only sealed.
pub struct RootKey(KeyMaterial);

impl RootKey {
    /// A fresh random root key.
    pub fn generate() -> Result<Self> {
        KeyMaterial::generate().map(Self)
    }

    /// Wraps existing material (e.g. reconstructed during unseal or a test fixture).
    pub fn from_material(material: KeyMaterial) -> Self {
        Self(material)
    }

    /// The raw material. Callers say why they need it; nothing but sealing and
    /// derivation should.
    pub fn expose_material(&self) -> &KeyMaterial {
        &self.0
    }
}

impl fmt::Debug for RootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RootKey([redacted])")
    }
}

/// The key that seals the root key: reconstructed from Shamir shares, or supplied
/// by an auto-unseal mechanism.
pub struct UnsealKey(KeyMaterial);

impl UnsealKey {
    /// A fresh random unseal key (at initialisation, before it is split).
    pub fn generate() -> Result<Self> {
        KeyMaterial::generate().map(Self)
    }

    /// Wraps existing material (e.g. the output of [`crate::shamir::combine`]).
    pub fn from_material(material: KeyMaterial) -> Self {
        Self(material)
    }

    /// The raw material, for splitting into shares.
    pub fn expose_material(&self) -> &KeyMaterial {
        &self.0
    }
}

impl fmt::Debug for UnsealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UnsealKey([redacted])")
    }
}

/// Encrypts and authenticates stored records. It seals under one root
/// generation (the newest it holds) and opens records of every generation it
/// holds: one normally, two while a root rotation re-seals the store
/// ([`add_generation`](Self::add_generation), then
/// [`retire_older`](Self::retire_older) once no record needs the old one).
pub struct Barrier {
    /// Generation keys, newest last; never empty.
    keys: std::sync::RwLock<Vec<(u32, std::sync::Arc<AeadKey>)>>,
}

impl Barrier {
    /// Prepares the barrier of root generation `generation`.
    ///
    /// The barrier key is `root.derive(derivation, BARRIER_LABEL, generation as
    /// u32 BE)`, so each generation has its own key even if the root material were
    /// reused. `derivation` is the seal instance's (see the module docs).
    pub fn new(root: &RootKey, generation: u32, derivation: Derivation) -> Result<Self> {
        Ok(Self {
            keys: std::sync::RwLock::new(vec![(
                generation,
                std::sync::Arc::new(generation_key(root, generation, derivation)?),
            )]),
        })
    }

    /// The root generation this barrier seals under (the newest it holds).
    pub fn generation(&self) -> u32 {
        self.read().last().map_or(0, |(g, _)| *g)
    }

    /// Every generation this barrier opens, oldest first.
    pub fn generations(&self) -> Vec<u32> {
        self.read().iter().map(|(g, _)| *g).collect()
    }

    /// Adds generation `generation` of `root`, newer than every one held, and
    /// seals under it from now on; older records still open.
    pub fn add_generation(
        &self,
        root: &RootKey,
        generation: u32,
        derivation: Derivation,
    ) -> Result<()> {
        let key = std::sync::Arc::new(generation_key(root, generation, derivation)?);
        let mut keys = self.write();
        if keys.last().is_some_and(|(g, _)| *g >= generation) {
            return Err(Error::Precondition(format!(
                "root generation {generation} is not newer than {}",
                newest(&keys)
            )));
        }
        keys.push((generation, key));
        Ok(())
    }

    /// Drops every generation older than the one it seals under: their records
    /// no longer open.
    pub fn retire_older(&self) {
        let mut keys = self.write();
        let keep = keys.len().saturating_sub(1);
        keys.drain(..keep);
    }

    fn current(&self) -> (u32, std::sync::Arc<AeadKey>) {
        let keys = self.read();
        let (g, key) = keys.last().expect("a barrier holds a generation");
        (*g, std::sync::Arc::clone(key))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<(u32, std::sync::Arc<AeadKey>)>> {
        // No code panics while holding the lock; recover regardless.
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<(u32, std::sync::Arc<AeadKey>)>> {
        self.keys.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Seals `plaintext` for storage at `path`.
    pub fn seal(&self, path: &str, plaintext: &[u8]) -> Result<Vec<u8>> {
        let (generation, key) = self.current();
        let header = record_header(generation);
        let mut out = Vec::with_capacity(RECORD_HEADER_LEN + key.overhead() + plaintext.len());
        out.extend_from_slice(&header);
        with_joined(&[BARRIER_AAD_PREFIX, &header, path.as_bytes()], |aad| {
            key.seal_append(aad, plaintext, &mut out)
        })?;
        Ok(out)
    }

    /// Opens a record read from `path`.
    ///
    /// Any failure (altered, truncated, moved from another path, sealed under
    /// another generation or root) is [`Error::Barrier`] naming the path.
    pub fn open(&self, path: &str, sealed: &[u8]) -> Result<SecretBytes> {
        let failed = || Error::Barrier {
            path: path.to_owned(),
        };
        let (header, body) = sealed
            .split_first_chunk::<RECORD_HEADER_LEN>()
            .ok_or_else(failed)?;
        let key = {
            let keys = self.read();
            let found = keys
                .iter()
                .find(|(g, _)| *header == record_header(*g))
                .map(|(_, k)| std::sync::Arc::clone(k));
            found.ok_or_else(failed)?
        };
        let plaintext_len = body.len().checked_sub(key.overhead()).ok_or_else(failed)?;
        // The AEAD copies `ciphertext || tag` into `out`, decrypts in place and
        // then cuts the tag off: reserve room for the tag too, or the copy
        // reallocates.
        let mut out = Zeroizing::new(Vec::with_capacity(plaintext_len + key.key_type().tag_len()));
        with_joined(&[BARRIER_AAD_PREFIX, header, path.as_bytes()], |aad| {
            key.open_append(aad, body, &mut out)
        })
        .map_err(|_| failed())?;
        Ok(SecretBytes::new(std::mem::take(&mut *out)))
    }
}

impl fmt::Debug for Barrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Barrier")
            .field("generations", &self.generations())
            .finish_non_exhaustive()
    }
}

/// The barrier key of `generation` of `root`: `root.derive(derivation,
/// BARRIER_LABEL, generation as u32 BE)`.
fn generation_key(root: &RootKey, generation: u32, derivation: Derivation) -> Result<AeadKey> {
    let material = root
        .0
        .derive(derivation, BARRIER_LABEL, &generation.to_be_bytes())?;
    AeadKey::new(BARRIER_KEY_TYPE, &material)
}

fn newest(keys: &[(u32, std::sync::Arc<AeadKey>)]) -> u32 {
    keys.last().map_or(0, |(g, _)| *g)
}

/// The root generation a barrier record claims, without authenticating it.
///
/// For root rotation and diagnostics (finding records still under an old
/// generation); only [`Barrier::open`] says whether the record is genuine.
pub fn sealed_generation(sealed: &[u8]) -> Option<u32> {
    match sealed.split_first_chunk::<RECORD_HEADER_LEN>()? {
        ([RECORD_FORMAT_V1, g @ ..], _) => Some(u32::from_be_bytes(*g)),
        _ => None,
    }
}

/// Seals the root key under the unseal key:
/// `0x01 || nonce (24) || ciphertext (32) || tag (16)`.
///
/// The wrapping key is `unseal.derive(derivation, ROOT_KEY_LABEL, "")` and the
/// associated data is the same label, so a sealed root key and a barrier record
/// can never be mistaken for each other.
pub fn seal_root_key(
    unseal: &UnsealKey,
    root: &RootKey,
    derivation: Derivation,
) -> Result<Vec<u8>> {
    let key = root_wrapping_key(unseal, derivation)?;
    let mut out = Vec::with_capacity(1 + key.overhead() + root.0.expose_secret().len());
    out.push(RECORD_FORMAT_V1);
    key.seal_append(ROOT_KEY_AAD, root.0.expose_secret(), &mut out)?;
    Ok(out)
}

/// Seals the root key under the unseal key, bound to `binding`:
/// `0x02 || nonce (24) || ciphertext (32) || tag (16)`, the associated data
/// holding the binding (see the module docs). Opened only by
/// [`open_root_key`] given the same binding.
pub fn seal_root_key_bound(
    unseal: &UnsealKey,
    root: &RootKey,
    derivation: Derivation,
    binding: &RootBinding<'_>,
) -> Result<Vec<u8>> {
    let key = root_wrapping_key(unseal, derivation)?;
    let mut out = Vec::with_capacity(1 + key.overhead() + root.0.expose_secret().len());
    out.push(ROOT_FORMAT_BOUND);
    key.seal_append(&binding.aad(), root.0.expose_secret(), &mut out)?;
    Ok(out)
}

/// Opens a root key sealed by [`seal_root_key`] (`binding` `None`) or
/// [`seal_root_key_bound`] (`binding` the same as at sealing) with the same
/// `derivation`. A wrong unseal key, derivation or binding, a blob of the other
/// kind, or a damaged blob, is [`Error::DecryptionFailed`].
pub fn open_root_key(
    unseal: &UnsealKey,
    sealed: &[u8],
    derivation: Derivation,
    binding: Option<&RootBinding<'_>>,
) -> Result<RootKey> {
    let aad = match (sealed.first(), binding) {
        (Some(&RECORD_FORMAT_V1), None) => ROOT_KEY_AAD.to_vec(),
        (Some(&ROOT_FORMAT_BOUND), Some(b)) => b.aad(),
        _ => return Err(Error::DecryptionFailed),
    };
    let body = &sealed[1..];
    let key = root_wrapping_key(unseal, derivation)?;
    let mut out = Zeroizing::new(Vec::with_capacity(body.len()));
    key.open_append(&aad, body, &mut out)
        .map_err(|_| Error::DecryptionFailed)?;
    KeyMaterial::from_slice(&out)
        .map(RootKey)
        .map_err(|_| Error::DecryptionFailed)
}

fn root_wrapping_key(unseal: &UnsealKey, derivation: Derivation) -> Result<AeadKey> {
    AeadKey::new(
        BARRIER_KEY_TYPE,
        &unseal.0.derive(derivation, ROOT_KEY_LABEL, b"")?,
    )
}

fn record_header(generation: u32) -> [u8; RECORD_HEADER_LEN] {
    let g = generation.to_be_bytes();
    [RECORD_FORMAT_V1, g[0], g[1], g[2], g[3]]
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // in tests a panic is the failure report
mod tests {
    use super::*;

    fn root(byte: u8) -> RootKey {
        RootKey::from_material(KeyMaterial::from_slice(&[byte; 32]).unwrap())
    }

    fn unseal(byte: u8) -> UnsealKey {
        UnsealKey::from_material(KeyMaterial::from_slice(&[byte; 32]).unwrap())
    }

    fn is_barrier_error(result: Result<SecretBytes>, path: &str) -> bool {
        matches!(result, Err(Error::Barrier { path: p }) if p == path)
    }

    #[test]
    fn round_trip() {
        let b = Barrier::new(&root(1), 7, Derivation::V2).unwrap();
        assert_eq!(b.generation(), 7);
        for pt in [&b""[..], b"{\"name\":\"patients\"}", &[0x5A; 4096]] {
            let sealed = b.seal("keys/patients", pt).unwrap();
            assert_eq!(sealed.len(), RECORD_HEADER_LEN + 24 + pt.len() + 16);
            assert_eq!(&sealed[..RECORD_HEADER_LEN], &[1, 0, 0, 0, 7]);
            assert_eq!(sealed_generation(&sealed), Some(7));
            assert_eq!(
                b.open("keys/patients", &sealed).unwrap().expose_secret(),
                pt
            );
        }
        // Two seals of the same record differ (random nonces).
        assert_ne!(b.seal("p", b"x").unwrap(), b.seal("p", b"x").unwrap());
        // Long paths take the heap path for the associated data.
        let long = "k/".repeat(300);
        let sealed = b.seal(&long, b"x").unwrap();
        assert_eq!(b.open(&long, &sealed).unwrap().expose_secret(), b"x");
    }

    #[test]
    fn any_flipped_byte_fails() {
        let b = Barrier::new(&root(1), 1, Derivation::V2).unwrap();
        let sealed = b.seal("keys/a", b"material record").unwrap();
        for i in 0..sealed.len() {
            for mask in [0x01, 0x80, 0xFF] {
                let mut bad = sealed.clone();
                bad[i] ^= mask;
                assert!(
                    is_barrier_error(b.open("keys/a", &bad), "keys/a"),
                    "byte {i}"
                );
            }
        }
    }

    #[test]
    fn truncated_or_extended_fails() {
        let b = Barrier::new(&root(1), 1, Derivation::V2).unwrap();
        let sealed = b.seal("keys/a", b"record").unwrap();
        for n in 0..sealed.len() {
            assert!(
                is_barrier_error(b.open("keys/a", &sealed[..n]), "keys/a"),
                "{n}"
            );
        }
        let mut longer = sealed.clone();
        longer.push(0);
        assert!(is_barrier_error(b.open("keys/a", &longer), "keys/a"));
    }

    #[test]
    fn record_moved_to_another_path_fails() {
        let b = Barrier::new(&root(1), 1, Derivation::V2).unwrap();
        let sealed = b.seal("keys/a", b"record").unwrap();
        for other in ["keys/b", "keys/a/", "keys/", "", "keys/a\0"] {
            assert!(is_barrier_error(b.open(other, &sealed), other), "{other:?}");
        }
    }

    #[test]
    fn other_generation_or_root_fails() {
        let g1 = Barrier::new(&root(1), 1, Derivation::V2).unwrap();
        let g2 = Barrier::new(&root(1), 2, Derivation::V2).unwrap();
        let sealed = g1.seal("keys/a", b"record").unwrap();
        assert!(is_barrier_error(g2.open("keys/a", &sealed), "keys/a"));
        // Relabelling the header to generation 2 does not help: the key differs and
        // the header is authenticated.
        let mut relabelled = sealed.clone();
        relabelled[4] = 2;
        assert!(is_barrier_error(g2.open("keys/a", &relabelled), "keys/a"));
        let other_root = Barrier::new(&root(2), 1, Derivation::V2).unwrap();
        assert!(is_barrier_error(
            other_root.open("keys/a", &sealed),
            "keys/a"
        ));
        assert_eq!(sealed_generation(&[2, 0, 0, 0, 1]), None);
        assert_eq!(sealed_generation(&[1, 0, 0]), None);
    }

    #[test]
    fn root_key_seal_round_trip() {
        let r = root(9);
        let sealed = seal_root_key(&unseal(3), &r, Derivation::V2).unwrap();
        assert_eq!(sealed.len(), 1 + 24 + 32 + 16);
        let back = open_root_key(&unseal(3), &sealed, Derivation::V2, None).unwrap();
        assert_eq!(
            back.expose_material().expose_secret(),
            r.expose_material().expose_secret()
        );
    }

    /// A bound root key opens only with the binding it was sealed with: any
    /// change to the seal id, generation, threshold or share count, dropping
    /// the binding, or relabelling the blob as unbound fails.
    #[test]
    fn a_bound_root_key_opens_only_with_its_binding() {
        let r = root(9);
        let id = [7u8; crate::shamir::SEAL_ID_LEN];
        let other_id = [8u8; crate::shamir::SEAL_ID_LEN];
        let b = RootBinding {
            seal_id: &id,
            root_generation: 3,
            threshold: 2,
            shares: 5,
        };
        let sealed = seal_root_key_bound(&unseal(3), &r, Derivation::V2, &b).unwrap();
        assert_eq!(sealed[0], ROOT_FORMAT_BOUND);
        let back = open_root_key(&unseal(3), &sealed, Derivation::V2, Some(&b)).unwrap();
        assert_eq!(
            back.expose_material().expose_secret(),
            r.expose_material().expose_secret()
        );
        for changed in [
            RootBinding {
                seal_id: &other_id,
                ..b
            },
            RootBinding {
                root_generation: 4,
                ..b
            },
            RootBinding { threshold: 1, ..b },
            RootBinding { shares: 4, ..b },
        ] {
            assert_eq!(
                open_root_key(&unseal(3), &sealed, Derivation::V2, Some(&changed)).unwrap_err(),
                Error::DecryptionFailed,
                "{changed:?}"
            );
        }
        assert!(open_root_key(&unseal(3), &sealed, Derivation::V2, None).is_err());
        let mut relabelled = sealed.clone();
        relabelled[0] = RECORD_FORMAT_V1;
        assert!(open_root_key(&unseal(3), &relabelled, Derivation::V2, None).is_err());
        // And an unbound blob does not open as a bound one.
        let unbound = seal_root_key(&unseal(3), &r, Derivation::V2).unwrap();
        assert!(open_root_key(&unseal(3), &unbound, Derivation::V2, Some(&b)).is_err());
    }

    /// During a root rotation the barrier opens both generations and seals
    /// under the new one; once the old one is retired its records fail.
    #[test]
    fn a_second_generation_seals_while_the_first_still_opens_until_retired() {
        let b = Barrier::new(&root(1), 1, Derivation::V2).unwrap();
        let old = b.seal("keys/a", b"old").unwrap();
        assert!(b.add_generation(&root(2), 1, Derivation::V2).is_err());
        b.add_generation(&root(2), 2, Derivation::V2).unwrap();
        assert_eq!((b.generation(), b.generations()), (2, vec![1, 2]));
        let new = b.seal("keys/a", b"new").unwrap();
        assert_eq!(sealed_generation(&new), Some(2));
        assert_eq!(b.open("keys/a", &old).unwrap().expose_secret(), b"old");
        assert_eq!(b.open("keys/a", &new).unwrap().expose_secret(), b"new");
        b.retire_older();
        assert_eq!(b.generations(), vec![2]);
        assert!(b.open("keys/a", &old).is_err());
        assert_eq!(b.open("keys/a", &new).unwrap().expose_secret(), b"new");
        // Generation 2 of root 2 is not generation 2 of root 1.
        let other = Barrier::new(&root(1), 2, Derivation::V2).unwrap();
        assert!(other.open("keys/a", &new).is_err());
    }

    #[test]
    fn wrong_unseal_key_or_damage_fails() {
        let sealed = seal_root_key(&unseal(3), &root(9), Derivation::V2).unwrap();
        assert_eq!(
            open_root_key(&unseal(4), &sealed, Derivation::V2, None).unwrap_err(),
            Error::DecryptionFailed
        );
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert_eq!(
                open_root_key(&unseal(3), &bad, Derivation::V2, None).unwrap_err(),
                Error::DecryptionFailed,
                "byte {i}"
            );
        }
        assert_eq!(
            open_root_key(&unseal(3), &[], Derivation::V2, None).unwrap_err(),
            Error::DecryptionFailed
        );
    }

    #[test]
    fn root_blobs_and_barrier_records_are_domain_separated() {
        // Same 32 bytes as unseal key and root key: neither format opens as the other.
        let unseal_key = unseal(5);
        let as_root = root(5);
        let barrier = Barrier::new(&as_root, 0, Derivation::V2).unwrap();
        let record = barrier.seal("", &[0x11; 32]).unwrap();
        assert!(open_root_key(&unseal_key, &record, Derivation::V2, None).is_err());
        let sealed_root = seal_root_key(&unseal_key, &root(6), Derivation::V2).unwrap();
        assert!(barrier.open("", &sealed_root).is_err());
    }

    /// The derivation is part of the seal instance: records and root keys sealed
    /// under one do not open under the other, and V1 is still what it was (the
    /// barrier key of generation 1 checked against the RustCrypto `hkdf` crate,
    /// which derived it before).
    #[test]
    fn derivations_are_separate_and_v1_is_unchanged() {
        let v1 = Barrier::new(&root(1), 1, Derivation::V1).unwrap();
        let v2 = Barrier::new(&root(1), 1, Derivation::V2).unwrap();
        let record = v1.seal("keys/a", b"record").unwrap();
        assert!(is_barrier_error(v2.open("keys/a", &record), "keys/a"));
        assert_eq!(
            v1.open("keys/a", &record).unwrap().expose_secret(),
            b"record"
        );

        let mut legacy_key = [0u8; 32];
        hkdf::Hkdf::<sha2::Sha256>::new(None, &[1; 32])
            .expand_multi_info(&[BARRIER_LABEL, &1u32.to_be_bytes()], &mut legacy_key)
            .unwrap();
        let legacy = AeadKey::new(
            BARRIER_KEY_TYPE,
            &KeyMaterial::from_slice(&legacy_key).unwrap(),
        )
        .unwrap();
        let (header, body) = record.split_at(RECORD_HEADER_LEN);
        let mut out = Vec::new();
        with_joined(&[BARRIER_AAD_PREFIX, header, b"keys/a"], |aad| {
            legacy.open_append(aad, body, &mut out)
        })
        .unwrap();
        assert_eq!(out, b"record");

        let sealed = seal_root_key(&unseal(3), &root(9), Derivation::V1).unwrap();
        assert!(open_root_key(&unseal(3), &sealed, Derivation::V1, None).is_ok());
        assert_eq!(
            open_root_key(&unseal(3), &sealed, Derivation::V2, None).unwrap_err(),
            Error::DecryptionFailed
        );
    }

    #[test]
    fn debug_is_redacted() {
        let r = root(0xAB);
        let u = unseal(0xCD);
        let b = Barrier::new(&r, 3, Derivation::V2).unwrap();
        for s in [format!("{r:?}"), format!("{u:?}"), format!("{b:?}")] {
            let lower = s.to_lowercase();
            assert!(
                !lower.contains("ab") && !lower.contains("cd") && !lower.contains("171"),
                "{s}"
            );
        }
        assert!(format!("{b:?}").contains("generations: [3]"));
    }
}
