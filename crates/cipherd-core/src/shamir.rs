//! Shamir t-of-n secret sharing of a 256-bit key (the unseal key), byte-wise over
//! GF(2^8), using the `vsss-rs` crate's constant-time field arithmetic.
//!
//! A share is an x-coordinate (1..=255, never 0: f(0) is the secret) and 32 y bytes,
//! one per secret byte. Operators handle shares as text, in one of two versions:
//!
//! ```text
//! cipherd-share:v2:<82 lowercase hex digits>      (every new initialization)
//!                   └ x (1 byte) || y (32 bytes) || check (8 bytes) ┘
//! check = HMAC-SHA256(key = seal id, "cipherd/share/v2" || x || y)[..8]
//!
//! cipherd-share:v1:<74 lowercase hex digits>      (seals created before v2 only)
//!                   └ x (1 byte) || y (32 bytes) || check (4 bytes) ┘
//! check = SHA-256("cipherd/share/v1" || x || y)[..4]
//! ```
//!
//! A v2 share is bound to one seal instance: the check is keyed with the seal's
//! random 256-bit [`SealId`], which the server keeps in its seal record and never
//! returns over the API. A share from another initialization, or a well-formed
//! made-up one, fails the check at submission (a forgery passes with probability
//! 2^-64), so it cannot join, and then discard, the shares other operators have
//! entered. It also catches a mistyped or truncated share with a message naming
//! the problem. Someone who can read the seal record can compute valid checks; the
//! check is a guard against network clients, not against storage access.
//!
//! A v1 check is unkeyed (anyone can make a well-formed v1 share): it only catches
//! typos. It is accepted only by seals created with the old record format
//! ([`ShareBinding::Unbound`]).
//!
//! This module does not authenticate the secret (Shamir alone cannot detect a
//! wrong but well-formed share from the right seal, such as one from before a
//! re-split; the sealed root key's AEAD tag does that when unsealing) and does not
//! store anything. `vsss-rs` is used instead of `sharks` (RUSTSEC-2024-0398).
//!
//! Secrets: shares zeroize on drop; [`split`] evaluates the polynomial itself
//! through vsss-rs's public `Polynomial` API so that it owns the coefficient buffer
//! (vsss-rs's `split_bytes*` functions keep the coefficients in a `Vec` they drop
//! without wiping) and writes each evaluation straight into its share. What
//! remains out of reach are the few stack temporaries inside vsss-rs's field
//! arithmetic (one byte each, overwritten by later calls), which safe Rust cannot
//! wipe.

use std::convert::Infallible;
use std::fmt;

use aws_lc_rs::hmac;
use sha2::{Digest, Sha256};
use vsss_rs::{DefaultShare, Gf256, IdentifierGf256, Polynomial};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::secret::{KEY_LEN, KeyMaterial};
use crate::{Error, Result};

/// Prefix of a v2 share's text form, the form every new initialization issues.
pub const SHARE_TEXT_PREFIX: &str = "cipherd-share:v2:";

/// Prefix of a v1 share's text form (seals created before v2; accepted only by them).
pub const SHARE_TEXT_PREFIX_V1: &str = "cipherd-share:v1:";

/// Length of a [`SealId`] in bytes.
pub const SEAL_ID_LEN: usize = 32;

/// Domain-separation label of the v1 checksum.
const CHECK_LABEL_V1: &[u8] = b"cipherd/share/v1";

/// Domain-separation label of the v2 checksum.
const CHECK_LABEL_V2: &[u8] = b"cipherd/share/v2";

/// Checksum bytes of a v1 share.
const CHECK_LEN_V1: usize = 4;

/// Checksum bytes of a v2 share.
const CHECK_LEN_V2: usize = 8;

/// Longest encoded share: x, y, v2 checksum.
const MAX_SHARE_BYTES: usize = 1 + KEY_LEN + CHECK_LEN_V2;

/// The random identity of one seal instance (one initialization), which keys the
/// v2 share check. Not secret in the cryptographic sense (it is stored in the
/// clear in the seal record), but never returned to clients.
#[derive(Clone, PartialEq, Eq)]
pub struct SealId([u8; SEAL_ID_LEN]);

impl SealId {
    /// A fresh random id from the CSPRNG.
    pub fn generate() -> Result<Self> {
        let mut id = [0u8; SEAL_ID_LEN];
        aws_lc_rs::rand::fill(&mut id).map_err(|_| Error::Provider)?;
        Ok(Self(id))
    }

    /// An id read back from a seal record; fails unless exactly [`SEAL_ID_LEN`] bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        bytes
            .try_into()
            .map(Self)
            .map_err(|_| Error::InvalidArgument(format!("a seal id is {SEAL_ID_LEN} bytes")))
    }

    /// The bytes, for storing in the seal record.
    pub fn as_bytes(&self) -> &[u8; SEAL_ID_LEN] {
        &self.0
    }
}

impl fmt::Debug for SealId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealId(..)")
    }
}

/// Which shares a seal accepts, and what a new share's check is bound to.
#[derive(Debug, Clone, Copy)]
pub enum ShareBinding<'a> {
    /// A seal created with the first record format: v1 shares, unkeyed check.
    Unbound,
    /// A seal with an id: v2 shares whose check is keyed with the id.
    Seal(&'a SealId),
}

/// One share of a split key. Zeroized on drop; neither `Clone` nor printable.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct Share {
    x: u8,
    y: [u8; KEY_LEN],
}

impl Share {
    /// The x-coordinate (1..=255), which identifies the share and is not secret.
    pub fn x(&self) -> u8 {
        self.x
    }

    /// The share as text for an operator to store and later paste back: the
    /// binding's prefix followed by lowercase hex of `x || y || check`.
    pub fn to_text(&self, binding: ShareBinding<'_>) -> Zeroizing<String> {
        let mut raw = Zeroizing::new([0u8; MAX_SHARE_BYTES]);
        raw[0] = self.x;
        raw[1..1 + KEY_LEN].copy_from_slice(&self.y);
        let (prefix, check_len) = layout(binding);
        let check = checksum(binding, self.x, &self.y);
        raw[1 + KEY_LEN..1 + KEY_LEN + check_len].copy_from_slice(&check[..check_len]);
        let raw = &raw[..1 + KEY_LEN + check_len];

        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut text = Zeroizing::new(String::with_capacity(prefix.len() + 2 * raw.len()));
        text.push_str(prefix);
        for b in raw {
            text.push(char::from(HEX[usize::from(b >> 4)]));
            text.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
        text
    }

    /// Parses the text form of a share for a seal with `binding`. Surrounding
    /// whitespace is ignored and hex digits may be upper or lower case.
    ///
    /// A share of the other version, or whose check fails (for v2: a share of
    /// another seal, a made-up one, or a typo), is refused here, before it can
    /// count towards an unseal. Error messages never repeat the input.
    pub fn parse(text: &str, binding: ShareBinding<'_>) -> Result<Self> {
        let (prefix, check_len) = layout(binding);
        let text = text.trim();
        let Some(hex) = text.strip_prefix(prefix) else {
            return Err(shamir_error(match binding {
                ShareBinding::Seal(_) if text.starts_with(SHARE_TEXT_PREFIX_V1) => format!(
                    "this is a {SHARE_TEXT_PREFIX_V1} share from an older initialization; \
                     this server's seal issues and accepts {SHARE_TEXT_PREFIX} shares only"
                ),
                ShareBinding::Unbound if text.starts_with(SHARE_TEXT_PREFIX) => format!(
                    "this is a {SHARE_TEXT_PREFIX} share, from another initialization: this \
                     server's seal predates them and accepts {SHARE_TEXT_PREFIX_V1} shares only"
                ),
                _ => format!("a share must start with {prefix}"),
            }));
        };
        let len = 1 + KEY_LEN + check_len;
        if hex.len() != 2 * len {
            return Err(shamir_error(format!(
                "a share has {} hexadecimal digits after {prefix}; this one has {}",
                2 * len,
                hex.len()
            )));
        }
        let mut raw = Zeroizing::new([0u8; MAX_SHARE_BYTES]);
        for (out, pair) in raw.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
            match (hex_value(pair[0]), hex_value(pair[1])) {
                (Some(hi), Some(lo)) => *out = hi << 4 | lo,
                _ => return Err(shamir_error("a share may only contain hexadecimal digits")),
            }
        }
        let mut share = Share {
            x: raw[0],
            y: [0; KEY_LEN],
        };
        share.y.copy_from_slice(&raw[1..1 + KEY_LEN]);
        let check = checksum(binding, share.x, &share.y);
        let matches: bool =
            subtle::ConstantTimeEq::ct_eq(&check[..check_len], &raw[1 + KEY_LEN..len]).into();
        if !matches {
            return Err(shamir_error(match binding {
                ShareBinding::Seal(_) => {
                    "the share does not belong to this server's seal: it was issued by \
                     another initialization, or it was mistyped or damaged"
                }
                ShareBinding::Unbound => {
                    "share checksum mismatch: the share was mistyped or damaged"
                }
            }));
        }
        if share.x == 0 {
            return Err(shamir_error("share x-coordinate 0 is invalid"));
        }
        Ok(share)
    }
}

impl fmt::Debug for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Share {{ x: {}, y: [redacted] }}", self.x)
    }
}

/// Splits `secret` into `count` shares, any `threshold` of which reconstruct it.
///
/// Requires `1 ≤ threshold ≤ count`, and `threshold ≥ 2` unless `count == 1` (a
/// 1-of-n split with n > 1 would hand the whole secret to every holder). Shares
/// get x-coordinates `1..=count`. A 1-of-1 "split" is the secret itself at x = 1.
pub fn split(secret: &KeyMaterial, threshold: u8, count: u8) -> Result<Vec<Share>> {
    if count == 0 {
        return Err(shamir_error("at least one share is required"));
    }
    if threshold == 0 || threshold > count {
        return Err(shamir_error(format!(
            "threshold must be between 1 and the share count ({count}), got {threshold}"
        )));
    }
    let mut shares = Vec::with_capacity(usize::from(count));
    if threshold == 1 {
        if count > 1 {
            return Err(shamir_error(
                "threshold 1 with several shares would give every holder the whole key; \
                 use a threshold of at least 2",
            ));
        }
        shares.push(Share {
            x: 1,
            y: [0; KEY_LEN],
        });
        shares[0].y.copy_from_slice(secret.expose_secret());
        return Ok(shares);
    }

    // The shares are allocated once and filled in place, byte by byte.
    for x in 1..=count {
        shares.push(Share { x, y: [0; KEY_LEN] });
    }
    let ids: Vec<IdentifierGf256> = (1..=count).map(|x| IdentifierGf256(Gf256(x))).collect();
    let threshold = usize::from(threshold);
    // One polynomial of degree threshold - 1 per secret byte, in a buffer this
    // function owns and wipes: its coefficient 0 is the secret byte and the rest
    // are random (vsss-rs draws them uniformly over GF(2^8)).
    let mut polynomial: Zeroizing<Vec<GfShare>> =
        Zeroizing::new(<Vec<GfShare> as Polynomial<GfShare>>::create(threshold));
    let mut rng = ProviderRng { failed: false };
    let mut value = Zeroizing::new(IdentifierGf256::default());
    for (i, byte) in secret.expose_secret().iter().enumerate() {
        let mut intercept = Zeroizing::new(IdentifierGf256(Gf256(*byte)));
        polynomial
            .fill(&intercept, &mut rng, threshold)
            .map_err(|e| shamir_error(format!("split failed: {e}")))?;
        intercept.zeroize();
        for (share, id) in shares.iter_mut().zip(&ids) {
            polynomial.evaluate_in_place(id, threshold, &mut value);
            share.y[i] = value.0.0;
        }
    }
    if rng.failed {
        return Err(Error::Provider);
    }
    Ok(shares)
}

/// Reconstructs the secret from shares.
///
/// Rejects an empty set, x = 0 and duplicate x-coordinates before interpolating.
/// Shamir cannot tell how many shares the split required: fewer than the threshold
/// yields a wrong secret, not an error. Callers verify the result (e.g. by opening
/// the sealed root key).
pub fn combine(shares: &[Share]) -> Result<KeyMaterial> {
    if shares.is_empty() {
        return Err(shamir_error("no shares given"));
    }
    let mut seen = [false; 256];
    for share in shares {
        if share.x == 0 {
            return Err(shamir_error("share x-coordinate 0 is invalid"));
        }
        if std::mem::replace(&mut seen[usize::from(share.x)], true) {
            return Err(shamir_error(format!(
                "share {} was given more than once",
                share.x
            )));
        }
    }
    if let [only] = shares {
        // Interpolating one point gives the constant polynomial: its y is f(0).
        return KeyMaterial::from_slice(&only.y);
    }

    // vsss-rs takes and returns plain `Vec`s, each allocated once at its final
    // size; holding them in `Zeroizing` wipes them whatever happens next.
    let raw: Zeroizing<Vec<Vec<u8>>> = Zeroizing::new(
        shares
            .iter()
            .map(|s| {
                let mut bytes = Vec::with_capacity(1 + KEY_LEN);
                bytes.push(s.x);
                bytes.extend_from_slice(&s.y);
                bytes
            })
            .collect(),
    );
    let secret = Zeroizing::new(
        Gf256::combine_bytes(&*raw).map_err(|e| shamir_error(format!("combine failed: {e}")))?,
    );
    KeyMaterial::from_slice(&secret)
}

/// A polynomial coefficient slot as vsss-rs's `Polynomial` stores it.
type GfShare = DefaultShare<IdentifierGf256, IdentifierGf256>;

fn shamir_error(message: impl Into<String>) -> Error {
    Error::Shamir(message.into())
}

/// The text prefix and checksum length of shares for `binding`.
fn layout(binding: ShareBinding<'_>) -> (&'static str, usize) {
    match binding {
        ShareBinding::Unbound => (SHARE_TEXT_PREFIX_V1, CHECK_LEN_V1),
        ShareBinding::Seal(_) => (SHARE_TEXT_PREFIX, CHECK_LEN_V2),
    }
}

/// The share check for `binding` (the first 4 or 8 bytes are used).
fn checksum(binding: ShareBinding<'_>, x: u8, y: &[u8; KEY_LEN]) -> [u8; CHECK_LEN_V2] {
    let mut check = [0u8; CHECK_LEN_V2];
    match binding {
        ShareBinding::Unbound => {
            let digest = Sha256::new()
                .chain_update(CHECK_LABEL_V1)
                .chain_update([x])
                .chain_update(y)
                .finalize();
            check[..CHECK_LEN_V1].copy_from_slice(&digest[..CHECK_LEN_V1]);
        }
        ShareBinding::Seal(id) => {
            let key = hmac::Key::new(hmac::HMAC_SHA256, id.as_bytes());
            let mut ctx = hmac::Context::with_key(&key);
            ctx.update(CHECK_LABEL_V2);
            ctx.update(&[x]);
            ctx.update(y);
            let tag = ctx.sign();
            check.copy_from_slice(&tag.as_ref()[..CHECK_LEN_V2]);
        }
    }
    check
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Adapts aws-lc-rs's CSPRNG to the `rand_core` interface vsss-rs takes.
///
/// `CryptoRng` must be infallible, but the provider is not, so a failure is
/// recorded in `failed` and the bytes are zeros; [`split`] then discards the
/// result and reports [`Error::Provider`]. Nothing derived from a failed draw
/// ever leaves this module.
struct ProviderRng {
    failed: bool,
}

impl ProviderRng {
    fn fill(&mut self, dst: &mut [u8]) {
        if aws_lc_rs::rand::fill(dst).is_err() {
            self.failed = true;
            dst.zeroize();
        }
    }
}

impl rand_core::TryRng for ProviderRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        // The bytes become polynomial coefficients: wipe the buffer once read.
        let mut b = Zeroizing::new([0u8; 4]);
        self.fill(&mut b[..]);
        Ok(u32::from_le_bytes(*b))
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut b = Zeroizing::new([0u8; 8]);
        self.fill(&mut b[..]);
        Ok(u64::from_le_bytes(*b))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        self.fill(dst);
        Ok(())
    }
}

impl rand_core::TryCryptoRng for ProviderRng {}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // in tests a panic is the failure report
mod tests {
    use super::*;

    fn secret() -> KeyMaterial {
        KeyMaterial::from_slice(&core::array::from_fn::<u8, 32, _>(|i| i as u8 * 7 + 1)).unwrap()
    }

    fn seal_id(byte: u8) -> SealId {
        SealId::from_slice(&[byte; SEAL_ID_LEN]).unwrap()
    }

    /// Every subset of `0..n` of size `k`, as index lists.
    fn subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
        (0u32..1 << n)
            .filter(|mask| mask.count_ones() as usize == k)
            .map(|mask| (0..n).filter(|i| mask & (1 << i) != 0).collect())
            .collect()
    }

    /// The shares at `indices`, re-parsed from text (shares are not `Clone`).
    fn pick(shares: &[Share], indices: &[usize]) -> Vec<Share> {
        let id = seal_id(1);
        let b = ShareBinding::Seal(&id);
        indices
            .iter()
            .map(|&i| Share::parse(&shares[i].to_text(b), b).unwrap())
            .collect()
    }

    fn shamir_message(r: Result<Share>) -> String {
        match r {
            Err(Error::Shamir(m)) => m,
            other => panic!("accepted: {:?}", other.map(|s| s.x)),
        }
    }

    #[test]
    fn every_threshold_subset_reconstructs() {
        let s = secret();
        for (t, n) in [(2u8, 2u8), (2, 3), (3, 5), (5, 5), (1, 1), (4, 7)] {
            let shares = split(&s, t, n).unwrap();
            assert_eq!(shares.len(), usize::from(n));
            assert_eq!(
                shares.iter().map(Share::x).collect::<Vec<_>>(),
                (1..=n).collect::<Vec<_>>()
            );
            for size in usize::from(t)..=usize::from(n) {
                for subset in subsets(usize::from(n), size) {
                    let got = combine(&pick(&shares, &subset)).unwrap();
                    assert_eq!(
                        got.expose_secret(),
                        s.expose_secret(),
                        "{t}-of-{n} {subset:?}"
                    );
                }
            }
        }
    }

    /// The hand-rolled split agrees with vsss-rs's own: its shares combine with
    /// `Gf256::combine_bytes`, and vsss-rs's shares combine with ours.
    #[test]
    fn split_interoperates_with_vsss_rs() {
        let s = secret();
        let ours = split(&s, 3, 5).unwrap();
        let raw: Vec<Vec<u8>> = ours[1..4]
            .iter()
            .map(|sh| [&[sh.x][..], &sh.y].concat())
            .collect();
        assert_eq!(Gf256::combine_bytes(&raw).unwrap(), s.expose_secret());

        let theirs =
            Gf256::split_bytes(3, 5, s.expose_secret(), ProviderRng { failed: false }).unwrap();
        let shares: Vec<Share> = theirs[..3]
            .iter()
            .map(|b| {
                let mut sh = Share {
                    x: b[0],
                    y: [0; KEY_LEN],
                };
                sh.y.copy_from_slice(&b[1..]);
                sh
            })
            .collect();
        assert_eq!(combine(&shares).unwrap().expose_secret(), s.expose_secret());
    }

    #[test]
    fn fewer_than_threshold_does_not_reconstruct() {
        let s = secret();
        for (t, n) in [(2u8, 3u8), (3, 5), (5, 5)] {
            let shares = split(&s, t, n).unwrap();
            for subset in subsets(usize::from(n), usize::from(t) - 1) {
                let got = combine(&pick(&shares, &subset)).unwrap();
                assert_ne!(
                    got.expose_secret(),
                    s.expose_secret(),
                    "{t}-of-{n} {subset:?}"
                );
            }
        }
    }

    #[test]
    fn splits_are_randomized() {
        let s = secret();
        let a = split(&s, 2, 2).unwrap();
        let b = split(&s, 2, 2).unwrap();
        assert_ne!(a[0].y, b[0].y);
        // No share equals the secret (probability 2^-256 per share).
        assert!(a.iter().all(|sh| sh.y != *s.expose_secret()));
    }

    #[test]
    fn max_share_count() {
        let s = secret();
        let shares = split(&s, 3, 255).unwrap();
        assert_eq!(shares.last().unwrap().x(), 255);
        let got = combine(&pick(&shares, &[0, 127, 254])).unwrap();
        assert_eq!(got.expose_secret(), s.expose_secret());
    }

    #[test]
    fn split_parameters_are_checked() {
        let s = secret();
        for (t, n) in [(0u8, 3u8), (1, 3), (4, 3), (0, 0), (1, 0), (2, 1)] {
            assert!(
                matches!(split(&s, t, n), Err(Error::Shamir(_))),
                "{t}-of-{n}"
            );
        }
    }

    #[test]
    fn combine_rejects_bad_sets() {
        let s = secret();
        let shares = split(&s, 2, 3).unwrap();
        assert!(matches!(combine(&[]), Err(Error::Shamir(_))));

        let dup = pick(&shares, &[0, 1, 0]);
        match combine(&dup) {
            Err(Error::Shamir(msg)) => assert!(msg.contains("more than once"), "{msg}"),
            other => panic!("{:?}", other.map(|_| ())),
        }

        let mut zero = pick(&shares, &[0, 1]);
        zero[1].x = 0;
        match combine(&zero) {
            Err(Error::Shamir(msg)) => assert!(msg.contains("x-coordinate 0"), "{msg}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
    }

    /// Known answers, computed independently (Python `hmac`/`hashlib`) from the
    /// formulas in the module docs: x = 1, y = 0x22 × 32, seal id = 0x11 × 32.
    #[test]
    fn text_forms_match_the_documented_checks() {
        let share = Share {
            x: 1,
            y: [0x22; KEY_LEN],
        };
        let id = seal_id(0x11);
        assert_eq!(
            &*share.to_text(ShareBinding::Seal(&id)),
            "cipherd-share:v2:01222222222222222222222222222222222222222222222222222222222222222\
             25aee881fbf48f514"
        );
        assert_eq!(
            &*share.to_text(ShareBinding::Unbound),
            "cipherd-share:v1:012222222222222222222222222222222222222222222222222222222222222222\
             123883eb"
        );
    }

    #[test]
    fn text_round_trip() {
        let shares = split(&secret(), 2, 3).unwrap();
        let id = seal_id(4);
        for (binding, prefix, digits) in [
            (ShareBinding::Seal(&id), SHARE_TEXT_PREFIX, 82),
            (ShareBinding::Unbound, SHARE_TEXT_PREFIX_V1, 74),
        ] {
            for share in &shares {
                let text = share.to_text(binding);
                assert!(text.starts_with(prefix));
                assert_eq!(text.len(), prefix.len() + digits);
                let back = Share::parse(&text, binding).unwrap();
                assert_eq!((back.x, back.y), (share.x, share.y));
                let padded = format!(
                    "  {}\n",
                    text.to_uppercase().replace(&prefix.to_uppercase(), prefix)
                );
                let back = Share::parse(&padded, binding).unwrap();
                assert_eq!((back.x, back.y), (share.x, share.y));
            }
        }
    }

    /// A v2 share opens only the seal it was issued for. Shares of another seal,
    /// made-up well-formed shares and shares of the other version are refused with
    /// a message saying so. Before v2 (one unkeyed checksum for all seals), all of
    /// these parsed.
    #[test]
    fn shares_are_bound_to_their_seal() {
        let ours = seal_id(1);
        let theirs = seal_id(2);
        let share = split(&secret(), 2, 3).unwrap().remove(0);

        let foreign = share.to_text(ShareBinding::Seal(&theirs));
        let msg = shamir_message(Share::parse(&foreign, ShareBinding::Seal(&ours)));
        assert!(
            msg.contains("does not belong to this server's seal"),
            "{msg}"
        );

        // Well-formed but made up: a random y with a random check.
        let mut rejected = 0;
        for _ in 0..200 {
            let mut raw = [0u8; 1 + KEY_LEN + CHECK_LEN_V2];
            aws_lc_rs::rand::fill(&mut raw).unwrap();
            raw[0] = 1;
            let text = format!("{SHARE_TEXT_PREFIX}{}", hex::encode(raw));
            rejected += usize::from(Share::parse(&text, ShareBinding::Seal(&ours)).is_err());
        }
        assert_eq!(rejected, 200);

        let v1 = share.to_text(ShareBinding::Unbound);
        let msg = shamir_message(Share::parse(&v1, ShareBinding::Seal(&ours)));
        assert!(msg.contains("older initialization"), "{msg}");
        let msg = shamir_message(Share::parse(
            &share.to_text(ShareBinding::Seal(&ours)),
            ShareBinding::Unbound,
        ));
        assert!(msg.contains("another initialization"), "{msg}");

        // The right seal still takes it.
        let back = Share::parse(
            &share.to_text(ShareBinding::Seal(&ours)),
            ShareBinding::Seal(&ours),
        )
        .unwrap();
        assert_eq!(back.y, share.y);
    }

    #[test]
    fn malformed_text_is_rejected() {
        let share = split(&secret(), 2, 2).unwrap().remove(0);
        let id = seal_id(3);
        for binding in [ShareBinding::Seal(&id), ShareBinding::Unbound] {
            let (prefix, _) = layout(binding);
            let text = share.to_text(binding).to_string();
            let hex = &text[prefix.len()..];
            let mut typo = hex.as_bytes().to_vec();
            typo[10] = if typo[10] == b'0' { b'1' } else { b'0' };
            let typo = String::from_utf8(typo).unwrap();
            // A well-formed text (valid checksum) with x = 0; `to_text` does not check x.
            let zero_x_text = Share { x: 0, y: share.y }.to_text(binding).to_string();
            let bad = [
                String::new(),
                hex.to_owned(),
                format!("cipherd-share:v3:{hex}"),
                format!("{prefix}{}", &hex[2..]),
                format!("{prefix}{hex}00"),
                format!("{prefix}{}zz", &hex[..hex.len() - 2]),
                format!("{prefix}{typo}"),
                format!("{prefix}{}", hex.replace(|_: char| true, "é")),
                zero_x_text,
            ];
            for b in bad {
                let msg = shamir_message(Share::parse(&b, binding));
                assert!(
                    !msg.contains(&hex[4..20]),
                    "message echoes the share: {msg}"
                );
            }
        }
    }

    #[test]
    fn debug_is_redacted() {
        let share = Share {
            x: 3,
            y: [0xAB; KEY_LEN],
        };
        let s = format!("{share:?}");
        assert_eq!(s, "Share { x: 3, y: [redacted] }");
        assert_eq!(format!("{:?}", seal_id(0xAB)), "SealId(..)");
    }
}
