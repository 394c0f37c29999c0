//! Authenticated encryption for every [`KeyType`], behind one prepared-key type.
//!
//! [`AeadKey`] does the key schedule once and is then shared (it is `Send + Sync`,
//! hold it in an `Arc`). Sealing draws a fresh random nonce for every message and
//! appends `nonce || ciphertext || tag` to a caller-owned `Vec`, so a batch can be
//! written into one buffer with no per-item allocation.
//!
//! # Where nonces come from
//!
//! Every random byte this module uses (single-message nonces, a [`Sealer`]'s
//! draws) comes straight from aws-lc-rs's generator (`aws_lc_rs::rand::fill`) at
//! the moment it is needed. aws-lc reseeds that generator when the process forks
//! and when the VM it runs in is restored from a snapshot, so a restored or forked
//! copy never repeats the parent's nonces. No random bytes are kept ahead of time:
//! not in a thread-local or process-wide pool (one would survive a fork or a
//! snapshot restore and be handed out again, which for AES-GCM under the same key
//! reveals the authentication key), and not across calls or requests.
//!
//! The cost is one fill call (about 0.4 µs, nearly independent of length) per
//! single seal, and for batches:
//!
//! - 96-bit-nonce types: a [`Sealer`] fills [`NONCES_PER_FILL`] nonces with one
//!   call when it seals its first message, and again each time those run out, and
//!   drops what it did not use. A sealer lives for one batch (one worker of one
//!   request), so the bytes are drawn while that batch is being sealed and are
//!   gone with it; a snapshot taken mid-batch can repeat at most the rest of one
//!   chunk, exactly like a single seal whose nonce was drawn just before the
//!   snapshot.
//! - 192-bit-nonce types: a sealer draws 24 bytes per subkey (see below).
//!
//! Backends (all AEAD work runs on aws-lc-rs):
//!
//! | key type | implementation |
//! | --- | --- |
//! | `aes256-gcm96` | aws-lc-rs AES-256-GCM |
//! | `chacha20-poly1305` | aws-lc-rs ChaCha20-Poly1305 |
//! | `xaes-256-gcm` | C2SP XAES-256-GCM: subkey from the private `xaes` module, then aws-lc-rs AES-256-GCM |
//! | `xchacha20-poly1305` | HChaCha20 subkey (RustCrypto `chacha20`, private `xchacha` module), then aws-lc-rs ChaCha20-Poly1305 |
//!
//! # Batches
//!
//! The two 192-bit-nonce types derive a subkey from a prefix of the nonce (the
//! first 12 bytes for XAES, 16 for XChaCha), which costs more than sealing a short
//! message. A [`Sealer`] (from [`AeadKey::sealer`]) draws one random prefix and
//! suffix base per subkey and numbers its messages, so a batch derives one subkey
//! per [`MESSAGES_PER_SUBKEY`] messages; an [`Opener`] (from [`AeadKey::opener`])
//! keeps the subkey of the last prefix it saw. The ciphertexts are the standard
//! ones, and open with [`AeadKey::open_append`] or any other implementation. For
//! 96-bit-nonce types an opener simply calls the key's own method, and a sealer
//! only batches the generator calls for its nonces (see above).
//! `docs/ciphertext-format.md` ("Batches") gives the nonce construction and its
//! collision bound.
//!
//! What this module does not do: it does not frame ciphertexts with a version or
//! key id (that is `ciphertext`), does not count encryptions against the 96-bit
//! nonce limit (the keyring does), and does not derive per-context keys. Callers
//! choose nonces only through [`danger::seal_with_nonce_append`], which exists for
//! known-answer and cross-implementation tests.
//!
//! Every decryption failure, whatever its cause, is [`Error::DecryptionFailed`].

use std::fmt;

use aws_lc_rs::aead::{AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use zeroize::Zeroize;

use crate::{
    Error, KeyType, Result,
    secret::KeyMaterial,
    xaes::{XAES_PREFIX_LEN, Xaes256Gcm},
    xchacha::{self, XCHACHA_PREFIX_LEN, XChaCha20Poly1305},
};

/// How many messages a [`Sealer`] seals under one derived subkey before it draws a
/// fresh nonce prefix (and so a fresh subkey): 2^20.
///
/// Within one subkey the nonces are distinct by construction (see [`Sealer`]), so
/// the bound is not about collisions. It keeps each AES-GCM or ChaCha20-Poly1305
/// subkey's use many orders of magnitude below the per-key limits of those
/// algorithms (2^32 messages for AES-GCM, NIST SP 800-38D), whatever the message
/// sizes, while the one derivation per 2^20 messages costs nothing measurable.
pub const MESSAGES_PER_SUBKEY: u64 = 1 << 20;

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
            KeyType::Xaes256Gcm => Backend::Extended(Extended::Xaes(Xaes256Gcm::new(material))),
            KeyType::XChaCha20Poly1305 => {
                Backend::Extended(Extended::XChaCha(XChaCha20Poly1305::new(material)))
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
    /// The nonce is drawn from aws-lc-rs's generator for this call (see the
    /// [module docs](self)); a failure there is [`Error::Provider`] and leaves
    /// `out` as it was. `out` grows by exactly
    /// `plaintext.len() + self.overhead()` bytes and reallocates at most once.
    ///
    /// For many messages under a 192-bit-nonce key type, a [`Sealer`] is faster.
    pub fn seal_append(&self, aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let mut nonce_buf = [0u8; EXTENDED_NONCE_LEN];
        let nonce = &mut nonce_buf[..self.key_type.nonce_len()];
        fill_random(nonce)?;
        self.seal_with_nonce(nonce, aad, plaintext, out)
    }

    /// Decrypts `sealed = nonce || ciphertext || tag`, appending the plaintext to
    /// `out`.
    ///
    /// Any failure (short input, bad tag, wrong key or associated data) is
    /// [`Error::DecryptionFailed`] and leaves `out` as it was; bytes written into
    /// its spare capacity along the way are zeroized.
    pub fn open_append(&self, aad: &[u8], sealed: &[u8], out: &mut Vec<u8>) -> Result<()> {
        open_into(
            self.key_type.nonce_len(),
            sealed,
            out,
            |nonce, in_out| match &self.backend {
                Backend::AwsLc(key) => open_aws_lc(key, aws_lc_nonce(nonce)?, aad, in_out),
                Backend::Extended(ext) => {
                    let nonce = extended_nonce(nonce)?;
                    open_aws_lc(&ext.subkey(nonce)?, ext.inner_nonce(nonce), aad, in_out)
                }
            },
        )
    }

    /// A [`Sealer`] for a batch of messages under this key.
    ///
    /// For `xaes-256-gcm` and `xchacha20-poly1305` this draws the first nonce
    /// prefix and derives its subkey, so it can fail with [`Error::Provider`] (the
    /// CSPRNG failed). Create one per thread or task: a `Sealer` is `Send` but
    /// seals through `&mut self`.
    pub fn sealer(&self) -> Result<Sealer<'_>> {
        Sealer::new(self, MESSAGES_PER_SUBKEY)
    }

    /// An [`Opener`] for a batch of ciphertexts under this key.
    pub fn opener(&self) -> Opener<'_> {
        Opener {
            key: self,
            cached: None,
            #[cfg(test)]
            derivations: 0,
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
        seal_into(nonce, plaintext, out, |in_out| match &self.backend {
            Backend::AwsLc(key) => seal_aws_lc(key, aws_lc_nonce(nonce)?, aad, in_out),
            Backend::Extended(ext) => {
                let nonce = extended_nonce(nonce)?;
                seal_aws_lc(&ext.subkey(nonce)?, ext.inner_nonce(nonce), aad, in_out)
            }
        })
    }
}

impl fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AeadKey")
            .field("key_type", &self.key_type)
            .finish_non_exhaustive()
    }
}

/// Seals many messages under one [`AeadKey`], sharing derived subkeys between them.
///
/// For `xaes-256-gcm` and `xchacha20-poly1305` a sealer draws, from the CSPRNG, a
/// random 192-bit nonce `P || R` whose prefix `P` (12 bytes for XAES, 16 for
/// XChaCha) selects the derived subkey. Its `i`-th message under that subkey
/// (`i = 0, 1, …`) gets the nonce `P || R'` where `R'` is `R` with `i` (big-endian
/// `u64`) XORed into its last 8 bytes. The nonces of one subkey are therefore
/// distinct by construction; after [`MESSAGES_PER_SUBKEY`] messages the sealer
/// draws a fresh `P || R`. Two nonces from different draws (of this sealer or any
/// other) are equal with probability 2^-192, exactly as for independent random
/// nonces, so over `Q` messages in all the chance of any repeat is at most
/// `Q² / 2^193`. The ciphertexts are standard XAES-256-GCM and XChaCha20-Poly1305
/// with the full nonce in front.
///
/// For the 96-bit-nonce types each message gets a fresh random nonce, as with
/// [`AeadKey::seal_append`]; those types have no subkey to share, and the sealer
/// only draws the nonces of up to [`NONCES_PER_FILL`] messages with one call to
/// the generator, when it seals the first of them (see the [module docs](self)).
/// A sealer counts nothing against a version's usage limit: callers reserve
/// encryptions for those types exactly as for single seals.
///
/// Not `Clone`, on purpose: two copies would hand out the same nonces. A sealer is
/// `Send`, so it can be created once per worker (for example with rayon's
/// `map_init`) and moved into it.
pub struct Sealer<'a> {
    key: &'a AeadKey,
    nonces: SealerNonces,
    /// Messages per subkey: [`MESSAGES_PER_SUBKEY`], smaller only in tests.
    limit: u64,
}

/// A sealer's nonce state, per kind of key type.
// The chunk is 768 bytes inline: a sealer lives on one worker's stack for one
// batch, so a box would only add an allocation per batch.
#[allow(clippy::large_enum_variant)]
enum SealerNonces {
    /// 96-bit types: this batch's drawn nonces.
    Random(NonceChunk),
    /// 192-bit types: the current subkey and its nonce state.
    Subkey(SubkeyBatch),
}

impl<'a> Sealer<'a> {
    fn new(key: &'a AeadKey, limit: u64) -> Result<Self> {
        let nonces = match &key.backend {
            Backend::AwsLc(_) => SealerNonces::Random(NonceChunk::empty()),
            Backend::Extended(ext) => SealerNonces::Subkey(SubkeyBatch::draw(ext)?),
        };
        Ok(Self { key, nonces, limit })
    }

    /// The algorithm of the key this sealer seals under.
    pub fn key_type(&self) -> KeyType {
        self.key.key_type
    }

    /// Encrypts one message and appends `nonce || ciphertext || tag` to `out`,
    /// exactly like [`AeadKey::seal_append`] but with the nonce chosen as described
    /// on [`Sealer`].
    ///
    /// Fails with [`Error::Provider`] only if the generator fails while drawing
    /// nonces or a new prefix; `out` is then left as it was.
    pub fn seal_append(&mut self, aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let key = self.key;
        let (batch, ext) = match (&mut self.nonces, &key.backend) {
            (SealerNonces::Subkey(batch), Backend::Extended(ext)) => (batch, ext),
            (SealerNonces::Random(chunk), _) => {
                let nonce = chunk.next()?;
                return key.seal_with_nonce(&nonce, aad, plaintext, out);
            }
            // Invariant: `Sealer::new` picks the variant from the backend.
            (SealerNonces::Subkey(_), Backend::AwsLc(_)) => return Err(Error::Provider),
        };
        if batch.sealed >= self.limit {
            *batch = SubkeyBatch::draw(ext)?;
        }
        let nonce = batch.next_nonce();
        seal_into(&nonce, plaintext, out, |in_out| {
            seal_aws_lc(&batch.subkey, ext.inner_nonce(&nonce), aad, in_out)
        })
    }
}

impl fmt::Debug for Sealer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("key_type", &self.key.key_type)
            .finish_non_exhaustive()
    }
}

/// Opens many ciphertexts under one [`AeadKey`], reusing derived subkeys.
///
/// For `xaes-256-gcm` and `xchacha20-poly1305` an opener keeps the subkey of the
/// last nonce prefix it saw, so the ciphertexts of one [`Sealer`] batch open with
/// one derivation per subkey. Any ciphertext opens, whatever sealed it; one with
/// another prefix just costs a derivation (and replaces the kept subkey). For the
/// 96-bit-nonce types an opener is [`AeadKey::open_append`].
pub struct Opener<'a> {
    key: &'a AeadKey,
    /// The last prefix seen and its subkey, for 192-bit-nonce types only.
    cached: Option<CachedSubkey>,
    /// Subkeys derived so far, so tests can see the cache work.
    #[cfg(test)]
    derivations: usize,
}

impl Opener<'_> {
    /// The algorithm of the key this opener opens with.
    pub fn key_type(&self) -> KeyType {
        self.key.key_type
    }

    /// Decrypts `sealed = nonce || ciphertext || tag`, appending the plaintext to
    /// `out`, exactly like [`AeadKey::open_append`] (same opaque error, same
    /// guarantee that a failure leaves `out` as it was).
    pub fn open_append(&mut self, aad: &[u8], sealed: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let key = self.key;
        let Backend::Extended(ext) = &key.backend else {
            return key.open_append(aad, sealed, out);
        };
        open_into(EXTENDED_NONCE_LEN, sealed, out, |nonce, in_out| {
            let nonce = extended_nonce(nonce)?;
            let prefix_len = ext.prefix_len();
            let cached = match self.cached.take() {
                Some(c) if c.nonce[..prefix_len] == nonce[..prefix_len] => c,
                _ => {
                    #[cfg(test)]
                    {
                        self.derivations += 1;
                    }
                    CachedSubkey {
                        nonce: *nonce,
                        subkey: ext.subkey(nonce)?,
                    }
                }
            };
            let opened = open_aws_lc(&cached.subkey, ext.inner_nonce(nonce), aad, in_out);
            self.cached = Some(cached);
            opened
        })
    }
}

impl fmt::Debug for Opener<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("key_type", &self.key.key_type)
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

/// Nonce length of the 192-bit-nonce types, the longest of any key type.
const EXTENDED_NONCE_LEN: usize = 24;

/// How many 96-bit nonces a [`Sealer`] draws with one call to the generator: 64
/// (768 bytes). One fill costs about the same whatever its length up to a few
/// kilobytes, so this brings the cost per batch item from ~0.4 µs to a few
/// nanoseconds, while a batch of one wastes only 756 bytes of generator output.
pub const NONCES_PER_FILL: usize = 64;

/// Nonce length of the 96-bit types.
const NONCE_96_LEN: usize = 12;

#[cfg(test)]
thread_local! {
    /// Calls to the generator made by this thread (tests only): lets tests see
    /// that every seal draws fresh bytes and that nothing is kept between seals.
    static FILLS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Fills `dst` from aws-lc-rs's generator, now (see the module docs for why
/// nothing is drawn ahead of time). A failure is [`Error::Provider`].
fn fill_random(dst: &mut [u8]) -> Result<()> {
    #[cfg(test)]
    FILLS.with(|n| n.set(n.get() + 1));
    aws_lc_rs::rand::fill(dst).map_err(|_| Error::Provider)
}

/// A [`Sealer`]'s 96-bit nonces: one fill of [`NONCES_PER_FILL`] nonces, handed
/// out in order, each once. Empty until the first seal.
struct NonceChunk {
    buf: [u8; NONCE_96_LEN * NONCES_PER_FILL],
    /// Nonces handed out of `buf` so far; `NONCES_PER_FILL` means empty.
    used: usize,
}

impl NonceChunk {
    fn empty() -> Self {
        Self {
            buf: [0; NONCE_96_LEN * NONCES_PER_FILL],
            used: NONCES_PER_FILL,
        }
    }

    /// The next unused nonce, filling a fresh chunk first when all are used. On a
    /// fill failure nothing is handed out.
    fn next(&mut self) -> Result<[u8; NONCE_96_LEN]> {
        if self.used == NONCES_PER_FILL {
            fill_random(&mut self.buf)?;
            self.used = 0;
        }
        let start = self.used * NONCE_96_LEN;
        let mut nonce = [0u8; NONCE_96_LEN];
        nonce.copy_from_slice(&self.buf[start..start + NONCE_96_LEN]);
        // Wipe the handed-out slot, so the chunk never holds a used nonce.
        self.buf[start..start + NONCE_96_LEN].zeroize();
        self.used += 1;
        Ok(nonce)
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
    /// A 192-bit-nonce type: a subkey per nonce prefix, then aws-lc-rs.
    Extended(Extended),
}

/// The 192-bit-nonce types. Both split the nonce `N` into a prefix, from which
/// they derive a subkey, and a rest that becomes the 96-bit nonce of an ordinary
/// aws-lc-rs AEAD under that subkey.
#[allow(clippy::large_enum_variant)] // see `Backend`
enum Extended {
    /// XAES-256-GCM: subkey from `N[..12]`, AES-256-GCM nonce `N[12..]`.
    Xaes(Xaes256Gcm),
    /// XChaCha20-Poly1305: subkey `HChaCha20(K, N[..16])`, ChaCha20-Poly1305
    /// nonce `0^4 || N[16..]`.
    XChaCha(XChaCha20Poly1305),
}

impl Extended {
    /// Leading nonce bytes that select the subkey.
    fn prefix_len(&self) -> usize {
        match self {
            Self::Xaes(_) => XAES_PREFIX_LEN,
            Self::XChaCha(_) => XCHACHA_PREFIX_LEN,
        }
    }

    /// The subkey for `nonce`'s prefix, prepared for aws-lc-rs.
    fn subkey(&self, nonce: &[u8; EXTENDED_NONCE_LEN]) -> Result<LessSafeKey> {
        match self {
            Self::Xaes(xaes) => xaes.subkey(&std::array::from_fn(|i| nonce[i])),
            Self::XChaCha(xchacha) => xchacha.subkey(&std::array::from_fn(|i| nonce[i])),
        }
    }

    /// The 96-bit nonce of the inner AEAD for `nonce`.
    fn inner_nonce(&self, nonce: &[u8; EXTENDED_NONCE_LEN]) -> Nonce {
        match self {
            Self::Xaes(_) => {
                Nonce::assume_unique_for_key(std::array::from_fn(|i| nonce[XAES_PREFIX_LEN + i]))
            }
            Self::XChaCha(_) => {
                xchacha::inner_nonce(&std::array::from_fn(|i| nonce[XCHACHA_PREFIX_LEN + i]))
            }
        }
    }
}

/// A [`Sealer`]'s current subkey: the random `P || R` it was drawn with, how many
/// messages it has sealed, and the subkey of `P`.
struct SubkeyBatch {
    /// `P || R`; message `i` uses this with `i` XORed into the last 8 bytes.
    nonce: [u8; EXTENDED_NONCE_LEN],
    /// Messages sealed under `subkey` so far, which is also the next `i`.
    sealed: u64,
    subkey: LessSafeKey,
}

impl SubkeyBatch {
    /// Draws a fresh random `P || R` and derives the subkey of `P`.
    fn draw(ext: &Extended) -> Result<Self> {
        let mut nonce = [0u8; EXTENDED_NONCE_LEN];
        fill_random(&mut nonce)?;
        Ok(Self {
            subkey: ext.subkey(&nonce)?,
            nonce,
            sealed: 0,
        })
    }

    /// The nonce of the next message, `P || (R XOR i)`, counting it as used.
    fn next_nonce(&mut self) -> [u8; EXTENDED_NONCE_LEN] {
        let mut nonce = self.nonce;
        let (_, low) = nonce.split_at_mut(EXTENDED_NONCE_LEN - 8);
        for (byte, i) in low.iter_mut().zip(self.sealed.to_be_bytes()) {
            *byte ^= i;
        }
        self.sealed += 1;
        nonce
    }
}

/// An [`Opener`]'s kept subkey and a nonce whose prefix it belongs to.
struct CachedSubkey {
    nonce: [u8; EXTENDED_NONCE_LEN],
    subkey: LessSafeKey,
}

/// Appends `nonce || ciphertext || tag` to `out`: copies `nonce` and `plaintext`
/// in, lets `encrypt` turn the plaintext into ciphertext in place and return the
/// tag, and appends the tag. On failure `out` is restored and the bytes written
/// past its old end are wiped. Reallocates at most once.
fn seal_into(
    nonce: &[u8],
    plaintext: &[u8],
    out: &mut Vec<u8>,
    encrypt: impl FnOnce(&mut [u8]) -> Result<[u8; TAG_LEN]>,
) -> Result<()> {
    let start = out.len();
    out.reserve(nonce.len() + plaintext.len() + TAG_LEN);
    out.extend_from_slice(nonce);
    out.extend_from_slice(plaintext);
    match encrypt(&mut out[start + nonce.len()..]) {
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

/// Splits `sealed` into its `nonce_len`-byte nonce and `ciphertext || tag`, copies
/// the latter onto `out` and lets `decrypt` open it in place; on success the tag is
/// cut off. Every failure is [`Error::DecryptionFailed`] and leaves `out` as it
/// was, with the bytes written past its old end wiped.
fn open_into(
    nonce_len: usize,
    sealed: &[u8],
    out: &mut Vec<u8>,
    decrypt: impl FnOnce(&[u8], &mut [u8]) -> Result<()>,
) -> Result<()> {
    if sealed.len() < nonce_len + TAG_LEN {
        return Err(Error::DecryptionFailed);
    }
    let (nonce, ct_and_tag) = sealed.split_at(nonce_len);
    let start = out.len();
    out.extend_from_slice(ct_and_tag);
    match decrypt(nonce, &mut out[start..]) {
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

/// A 192-bit nonce; as for [`aws_lc_nonce`], callers have checked the length.
fn extended_nonce(nonce: &[u8]) -> Result<&[u8; EXTENDED_NONCE_LEN]> {
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

/// Decrypts `in_out = ciphertext || tag` in place (the tag is left in place; the
/// caller truncates it).
fn open_aws_lc(key: &LessSafeKey, nonce: Nonce, aad: &[u8], in_out: &mut [u8]) -> Result<()> {
    key.open_in_place(nonce, Aad::from(aad), in_out)
        .map(|_| ())
        .map_err(|_| Error::DecryptionFailed)
}

/// Restores `out` to its first `len` bytes after a failure, wiping what was written
/// past them: it may be plaintext (a failed seal) or unauthenticated plaintext (a
/// failed open), and truncation alone would leave it in the spare capacity.
fn discard_tail(out: &mut Vec<u8>, len: usize) {
    out[len..].zeroize();
    out.truncate(len);
}

// Compile-time proof that a `Sealer` cannot be cloned (two copies would hand out
// the same nonces): if `Sealer: Clone`, both impls below apply, the call's type
// parameter becomes ambiguous and this stops compiling.
const _: fn() = || {
    trait AmbiguousIfClone<A> {
        fn check() {}
    }
    impl<T: ?Sized> AmbiguousIfClone<()> for T {}
    impl<T: Clone> AmbiguousIfClone<u8> for T {}
    <Sealer<'static> as AmbiguousIfClone<_>>::check();
};

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

    fn fills() -> usize {
        FILLS.with(|n| n.get())
    }

    /// Every single seal draws its nonce from the generator then and there: one
    /// fill per seal, nothing left over from an earlier one. With a per-thread
    /// pool (the code before), a thousand seals made three fills.
    #[test]
    fn every_single_seal_draws_from_the_generator() {
        for key_type in KeyType::ALL {
            let k = key(key_type, 21);
            let before = fills();
            let mut nonces = std::collections::HashSet::new();
            for _ in 0..1000 {
                let sealed = seal(&k, b"", b"x");
                assert!(nonces.insert(sealed[..key_type.nonce_len()].to_vec()));
            }
            assert_eq!(fills() - before, 1000, "{key_type}");
        }
    }

    /// A sealer of a 96-bit type draws nothing when created, one chunk of
    /// `NONCES_PER_FILL` nonces at its first seal and at each exhaustion, and a new
    /// sealer draws afresh: no random bytes outlive the sealer that drew them.
    #[test]
    fn a_96_bit_sealer_draws_per_chunk_and_keeps_nothing() {
        for key_type in [KeyType::Aes256Gcm96, KeyType::ChaCha20Poly1305] {
            let k = key(key_type, 22);
            let start = fills();
            let mut sealer = k.sealer().unwrap();
            assert_eq!(fills(), start, "{key_type}: drew before sealing");
            let mut nonces = std::collections::HashSet::new();
            for i in 0..(2 * NONCES_PER_FILL + 1) {
                let mut out = Vec::new();
                sealer.seal_append(b"", b"x", &mut out).unwrap();
                assert!(
                    nonces.insert(out[..12].to_vec()),
                    "{key_type}: repeat at {i}"
                );
                assert_eq!(
                    fills() - start,
                    i / NONCES_PER_FILL + 1,
                    "{key_type}: item {i}"
                );
                assert_eq!(open(&k, b"", &out).unwrap(), b"x");
            }
            drop(sealer);
            let mut again = k.sealer().unwrap();
            let before = fills();
            again.seal_append(b"", b"y", &mut Vec::new()).unwrap();
            assert_eq!(fills() - before, 1, "{key_type}: reused an earlier draw");
        }
    }

    /// A 192-bit sealer draws once per subkey, at creation and at each limit.
    #[test]
    fn a_192_bit_sealer_draws_once_per_subkey() {
        for key_type in EXTENDED {
            let k = key(key_type, 23);
            let start = fills();
            let mut sealer = Sealer::new(&k, 4).unwrap();
            assert_eq!(fills() - start, 1);
            for i in 0..9 {
                sealer.seal_append(b"", b"x", &mut Vec::new()).unwrap();
                assert_eq!(fills() - start, 1 + i / 4, "{key_type}: item {i}");
            }
        }
    }

    /// A chunk hands out each of its nonces once, in order, wipes what it handed
    /// out, and refills only when empty.
    #[test]
    fn nonce_chunks_hand_out_each_nonce_once() {
        let mut chunk = NonceChunk::empty();
        let start = fills();
        let first = chunk.next().unwrap();
        let drawn = chunk.buf;
        assert_eq!(drawn[..12], [0; 12], "a handed-out slot is wiped");
        for i in 1..NONCES_PER_FILL {
            let nonce = chunk.next().unwrap();
            assert_eq!(nonce[..], drawn[i * 12..(i + 1) * 12]);
            assert_ne!(nonce, first);
        }
        assert_eq!(fills() - start, 1);
        assert!(chunk.buf.iter().all(|b| *b == 0));
        chunk.next().unwrap();
        assert_eq!(fills() - start, 2);
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

    // -----------------------------------------------------------------------
    // Sealer and Opener
    // -----------------------------------------------------------------------

    const EXTENDED: [KeyType; 2] = [KeyType::Xaes256Gcm, KeyType::XChaCha20Poly1305];

    fn prefix_len(key_type: KeyType) -> usize {
        match key_type {
            KeyType::Xaes256Gcm => XAES_PREFIX_LEN,
            KeyType::XChaCha20Poly1305 => XCHACHA_PREFIX_LEN,
            other => panic!("{other} has no subkey prefix"),
        }
    }

    /// Seals `n` numbered messages with a sealer of the given subkey limit.
    fn seal_batch(k: &AeadKey, limit: u64, n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut sealer = Sealer::new(k, limit).unwrap();
        (0..n)
            .map(|i| {
                let plaintext = format!("message {i}").into_bytes();
                let mut out = Vec::new();
                sealer.seal_append(b"batch", &plaintext, &mut out).unwrap();
                (plaintext, out)
            })
            .collect()
    }

    /// Opens every item with a reference implementation other than cipherd.
    fn open_with_reference(key_type: KeyType, byte: u8, aad: &[u8], sealed: &[u8]) -> Vec<u8> {
        use aes_gcm::aead::{Aead, KeyInit, Payload};
        let (nonce, msg) = sealed.split_at(24);
        let payload = Payload { msg, aad };
        match key_type {
            KeyType::Xaes256Gcm => xaes_256_gcm::Xaes256Gcm::new(&[byte; 32].into())
                .decrypt(nonce.try_into().unwrap(), payload),
            KeyType::XChaCha20Poly1305 => {
                chacha20poly1305::XChaCha20Poly1305::new(&[byte; 32].into())
                    .decrypt(nonce.try_into().unwrap(), payload)
            }
            other => panic!("no reference for {other}"),
        }
        .unwrap()
    }

    #[test]
    fn the_production_limit_is_two_to_the_twenty() {
        assert_eq!(MESSAGES_PER_SUBKEY, 1_048_576);
        let k = key(KeyType::Xaes256Gcm, 1);
        assert_eq!(k.sealer().unwrap().limit, MESSAGES_PER_SUBKEY);
    }

    /// The worked example of docs/ciphertext-format.md, "Nonce construction".
    #[test]
    fn nonce_arithmetic_matches_the_documented_example() {
        let k = key(KeyType::Xaes256Gcm, 1);
        let Backend::Extended(ext) = &k.backend else {
            panic!("xaes is extended")
        };
        let p_r: [u8; 24] = std::array::from_fn(|i| i as u8);
        let mut batch = SubkeyBatch {
            nonce: p_r,
            sealed: 0,
            subkey: ext.subkey(&p_r).unwrap(),
        };
        assert_eq!(batch.next_nonce(), p_r);
        batch.sealed = 5;
        assert_eq!(
            hex::encode(batch.next_nonce()),
            "000102030405060708090a0b0c0d0e0f1011121314151612"
        );
        assert_eq!(batch.sealed, 6);
        // The last message of a draw flips the low 20 bits.
        batch.sealed = MESSAGES_PER_SUBKEY - 1;
        assert_eq!(
            hex::encode(&batch.next_nonce()[12..]),
            "0c0d0e0f10111213141ae9e8"
        );
    }

    #[test]
    fn sealers_and_openers_are_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Sealer<'static>>();
        assert_send::<Opener<'static>>();
    }

    /// With a limit of 4, eleven messages span three subkeys. Within a subkey the
    /// nonces are `P || (R XOR i)` for i = 0, 1, 2, 3; across subkeys the prefix is
    /// fresh; no nonce ever repeats.
    #[test]
    fn sealer_nonces_follow_the_construction_across_the_limit() {
        for key_type in EXTENDED {
            let k = key(key_type, 10);
            let plen = prefix_len(key_type);
            let nonces: Vec<[u8; 24]> = seal_batch(&k, 4, 11)
                .iter()
                .map(|(_, sealed)| sealed[..24].try_into().unwrap())
                .collect();

            let distinct: std::collections::HashSet<_> = nonces.iter().collect();
            assert_eq!(distinct.len(), nonces.len(), "{key_type}: a nonce repeated");

            for (group_no, group) in nonces.chunks(4).enumerate() {
                let first = group[0];
                for (i, nonce) in group.iter().enumerate() {
                    assert_eq!(nonce[..plen], first[..plen], "{key_type}: prefix changed");
                    // Bytes between the prefix and the counter (XAES: 12..16) are R's.
                    assert_eq!(nonce[plen..16], first[plen..16], "{key_type}");
                    let xor = u64::from_be_bytes(nonce[16..].try_into().unwrap())
                        ^ u64::from_be_bytes(first[16..].try_into().unwrap());
                    assert_eq!(xor, i as u64, "{key_type}: group {group_no} item {i}");
                }
                if group_no > 0 {
                    let previous = nonces[(group_no - 1) * 4];
                    assert_ne!(
                        previous[..plen],
                        first[..plen],
                        "{key_type}: no fresh prefix after the limit"
                    );
                }
            }
        }
    }

    #[test]
    fn sealer_output_opens_with_the_key_and_a_reference_implementation() {
        for key_type in EXTENDED {
            let k = key(key_type, 11);
            for (plaintext, sealed) in seal_batch(&k, 3, 8) {
                assert_eq!(sealed.len(), plaintext.len() + k.overhead());
                assert_eq!(open(&k, b"batch", &sealed).unwrap(), plaintext);
                assert_eq!(
                    open_with_reference(key_type, 11, b"batch", &sealed),
                    plaintext,
                    "{key_type}"
                );
            }
        }
        // The 96-bit types delegate: fresh random nonces, ordinary ciphertexts.
        for key_type in [KeyType::Aes256Gcm96, KeyType::ChaCha20Poly1305] {
            let k = key(key_type, 12);
            let batch = seal_batch(&k, 2, 5);
            for (plaintext, sealed) in &batch {
                assert_eq!(&open(&k, b"batch", sealed).unwrap(), plaintext);
            }
            assert_ne!(batch[0].1[..12], batch[1].1[..12], "{key_type}");
        }
    }

    #[test]
    fn sealer_appends_and_leaves_out_alone_on_the_prefix() {
        for key_type in KeyType::ALL {
            let k = key(key_type, 13);
            let mut sealer = k.sealer().unwrap();
            assert_eq!(sealer.key_type(), key_type);
            let mut out = PREFIX.to_vec();
            sealer.seal_append(b"", b"one", &mut out).unwrap();
            let first_end = out.len();
            sealer.seal_append(b"", b"two", &mut out).unwrap();
            assert_eq!(&out[..PREFIX.len()], PREFIX);
            assert_eq!(
                open(&k, b"", &out[PREFIX.len()..first_end]).unwrap(),
                b"one"
            );
            assert_eq!(open(&k, b"", &out[first_end..]).unwrap(), b"two");
        }
    }

    /// An opener derives once per run of equal prefixes, whatever sealed the
    /// ciphertexts: two sealers interleaved, single-message seals, and batches
    /// that cross the subkey limit.
    #[test]
    fn opener_derives_once_per_prefix_run() {
        for key_type in EXTENDED {
            let k = key(key_type, 14);
            let mut opener = k.opener();
            assert_eq!(opener.key_type(), key_type);

            // One sealer, three subkeys: three derivations for nine ciphertexts.
            for (plaintext, sealed) in seal_batch(&k, 3, 9) {
                let mut out = Vec::new();
                opener.open_append(b"batch", &sealed, &mut out).unwrap();
                assert_eq!(out, plaintext);
            }
            assert_eq!(opener.derivations, 3, "{key_type}");

            // Mixed input: a, a, b, a, single, single, b, b.
            let a = seal_batch(&k, MESSAGES_PER_SUBKEY, 3);
            let b = seal_batch(&k, MESSAGES_PER_SUBKEY, 3);
            let singles: Vec<_> = (0..2)
                .map(|i| {
                    let plaintext = format!("single {i}").into_bytes();
                    (plaintext.clone(), seal(&k, b"batch", &plaintext))
                })
                .collect();
            let mixed = [
                &a[0],
                &a[1],
                &b[0],
                &a[2],
                &singles[0],
                &singles[1],
                &b[1],
                &b[2],
            ];
            let mut opener = k.opener();
            let mut out = PREFIX.to_vec();
            let mut expected = PREFIX.to_vec();
            for (plaintext, sealed) in mixed {
                opener.open_append(b"batch", sealed, &mut out).unwrap();
                expected.extend_from_slice(plaintext);
            }
            assert_eq!(out, expected, "{key_type}");
            // Runs of prefixes: [a a] [b] [a] [s0] [s1] [b b].
            assert_eq!(opener.derivations, 6, "{key_type}");
        }
    }

    #[test]
    fn opener_rejects_tampering_and_keeps_working() {
        for key_type in KeyType::ALL {
            let k = key(key_type, 15);
            let batch = seal_batch(&k, 4, 2);
            let (plaintext, sealed) = &batch[1];
            let mut opener = k.opener();
            for i in 0..sealed.len() {
                for bit in [0x01, 0x80] {
                    let mut tampered = sealed.clone();
                    tampered[i] ^= bit;
                    let mut out = PREFIX.to_vec();
                    assert_eq!(
                        opener.open_append(b"batch", &tampered, &mut out),
                        Err(Error::DecryptionFailed),
                        "{key_type}: flipping bit {bit:#x} of byte {i} went unnoticed"
                    );
                    assert_eq!(out, PREFIX, "{key_type}: a failed open changed `out`");
                }
            }
            for len in 0..sealed.len() {
                assert_eq!(
                    opener.open_append(b"batch", &sealed[..len], &mut Vec::new()),
                    Err(Error::DecryptionFailed),
                    "{key_type}: truncated to {len}"
                );
            }
            for aad in [&b""[..], b"batcH", b"batch\0"] {
                assert_eq!(
                    opener.open_append(aad, sealed, &mut Vec::new()),
                    Err(Error::DecryptionFailed),
                    "{key_type}"
                );
            }
            let mut out = Vec::new();
            opener.open_append(b"batch", sealed, &mut out).unwrap();
            assert_eq!(&out, plaintext, "{key_type}: opener broken by failures");
            // Under another key, the cached subkey of this key is no help.
            assert_eq!(
                key(key_type, 16)
                    .opener()
                    .open_append(b"batch", sealed, &mut Vec::new()),
                Err(Error::DecryptionFailed)
            );
        }
    }

    #[test]
    fn sealer_and_opener_debug_print_key_type_only() {
        for key_type in KeyType::ALL {
            let k = key(key_type, 0xAB);
            for s in [
                format!("{:?}", k.sealer().unwrap()),
                format!("{:?}", k.opener()),
            ] {
                assert!(s.contains(&format!("{key_type:?}")), "{s}");
                assert!(!s.to_lowercase().contains("ab"), "{s}");
                assert!(!s.contains("171"), "{s}");
            }
        }
    }
}
