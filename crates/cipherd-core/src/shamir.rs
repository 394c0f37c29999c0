//! Shamir t-of-n secret sharing of a 256-bit key (the unseal key), byte-wise over
//! GF(2^8), using the `vsss-rs` crate's constant-time field arithmetic.
//!
//! A share is an x-coordinate (1..=255, never 0: f(0) is the secret) and 32 y bytes,
//! one per secret byte. Operators handle shares as text:
//!
//! ```text
//! cipherd-share:v1:<74 lowercase hex digits>
//!                   └ x (1 byte) || y (32 bytes) || check (4 bytes) ┘
//! check = SHA-256("cipherd/share/v1" || x || y)[..4]
//! ```
//!
//! The check catches a mistyped or truncated share when it is entered, with a
//! message naming the problem, instead of an opaque unseal failure later. It is not
//! a MAC and says nothing about whether a share belongs to a given secret.
//!
//! This module does not authenticate shares (Shamir alone cannot detect a wrong but
//! well-formed share; the sealed root key's AEAD tag does that when unsealing) and
//! does not store anything. `vsss-rs` is used instead of `sharks`
//! (RUSTSEC-2024-0398).

use std::convert::Infallible;
use std::fmt;

use sha2::{Digest, Sha256};
use vsss_rs::{Gf256, IdentifierGf256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::secret::{KEY_LEN, KeyMaterial};
use crate::{Error, Result};

/// Prefix of a share's text form; `v1` is the share encoding's version.
pub const SHARE_TEXT_PREFIX: &str = "cipherd-share:v1:";

/// Domain-separation label of the share checksum.
const CHECK_LABEL: &[u8] = b"cipherd/share/v1";

/// Checksum bytes appended to a share's text form.
const CHECK_LEN: usize = 4;

/// Encoded share: x, y, checksum.
const SHARE_BYTES: usize = 1 + KEY_LEN + CHECK_LEN;

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

    /// The share as text for an operator to store and later paste back:
    /// `cipherd-share:v1:` followed by lowercase hex of `x || y || check`.
    pub fn to_text(&self) -> Zeroizing<String> {
        let mut raw = Zeroizing::new([0u8; SHARE_BYTES]);
        raw[0] = self.x;
        raw[1..1 + KEY_LEN].copy_from_slice(&self.y);
        let check = checksum(self.x, &self.y);
        raw[1 + KEY_LEN..].copy_from_slice(&check);

        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut text = Zeroizing::new(String::with_capacity(
            SHARE_TEXT_PREFIX.len() + 2 * SHARE_BYTES,
        ));
        text.push_str(SHARE_TEXT_PREFIX);
        for b in raw.iter() {
            text.push(char::from(HEX[usize::from(b >> 4)]));
            text.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
        text
    }

    /// Parses the text form. Surrounding whitespace is ignored and hex digits may be
    /// upper or lower case. Error messages never repeat the input.
    pub fn parse(text: &str) -> Result<Self> {
        let hex = text
            .trim()
            .strip_prefix(SHARE_TEXT_PREFIX)
            .ok_or_else(|| shamir_error(format!("a share must start with {SHARE_TEXT_PREFIX}")))?;
        if hex.len() != 2 * SHARE_BYTES {
            return Err(shamir_error(format!(
                "a share has {} hexadecimal digits after {SHARE_TEXT_PREFIX}; this one has {}",
                2 * SHARE_BYTES,
                hex.len()
            )));
        }
        let mut raw = Zeroizing::new([0u8; SHARE_BYTES]);
        for (out, pair) in raw.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
            match (hex_value(pair[0]), hex_value(pair[1])) {
                (Some(hi), Some(lo)) => *out = hi << 4 | lo,
                _ => return Err(shamir_error("a share may only contain hexadecimal digits")),
            }
        }
        let share = Share {
            x: raw[0],
            // Invariant: `raw` is SHARE_BYTES long, so this range is exactly KEY_LEN.
            y: raw[1..1 + KEY_LEN]
                .try_into()
                .expect("slice of KEY_LEN bytes"),
        };
        if checksum(share.x, &share.y)[..] != raw[1 + KEY_LEN..] {
            return Err(shamir_error(
                "share checksum mismatch: the share was mistyped or damaged",
            ));
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
    if threshold == 1 {
        if count > 1 {
            return Err(shamir_error(
                "threshold 1 with several shares would give every holder the whole key; \
                 use a threshold of at least 2",
            ));
        }
        return Ok(vec![Share {
            x: 1,
            y: *secret.expose_secret(),
        }]);
    }

    let mut rng = ProviderRng { failed: false };
    let ids = (1..=count).map(|x| IdentifierGf256(Gf256(x)));
    let raw = Gf256::split_bytes_with_participant_ids_iter(
        usize::from(threshold),
        usize::from(count),
        secret.expose_secret(),
        &mut rng,
        ids,
    );
    // vsss-rs returns plain `Vec`s; hold them in `Zeroizing` so they are wiped
    // whatever happens next.
    let raw = Zeroizing::new(raw.map_err(|e| shamir_error(format!("split failed: {e}")))?);
    if rng.failed {
        return Err(Error::Provider);
    }
    let mut shares = Vec::with_capacity(raw.len());
    for (expected_x, bytes) in (1..=count).zip(raw.iter()) {
        match bytes.split_first() {
            Some((&x, y)) if x == expected_x && y.len() == KEY_LEN => {
                let mut share = Share { x, y: [0; KEY_LEN] };
                share.y.copy_from_slice(y);
                shares.push(share);
            }
            _ => return Err(shamir_error("split produced a malformed share")),
        }
    }
    if shares.len() != usize::from(count) {
        return Err(shamir_error("split produced the wrong number of shares"));
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

fn shamir_error(message: impl Into<String>) -> Error {
    Error::Shamir(message.into())
}

fn checksum(x: u8, y: &[u8; KEY_LEN]) -> [u8; CHECK_LEN] {
    let digest = Sha256::new()
        .chain_update(CHECK_LABEL)
        .chain_update([x])
        .chain_update(y)
        .finalize();
    let mut check = [0u8; CHECK_LEN];
    check.copy_from_slice(&digest[..CHECK_LEN]);
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
        let mut b = [0u8; 4];
        self.fill(&mut b);
        Ok(u32::from_le_bytes(b))
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut b = [0u8; 8];
        self.fill(&mut b);
        Ok(u64::from_le_bytes(b))
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

    /// Every subset of `0..n` of size `k`, as index lists.
    fn subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
        (0u32..1 << n)
            .filter(|mask| mask.count_ones() as usize == k)
            .map(|mask| (0..n).filter(|i| mask & (1 << i) != 0).collect())
            .collect()
    }

    /// The shares at `indices`, re-parsed from text (shares are not `Clone`).
    fn pick(shares: &[Share], indices: &[usize]) -> Vec<Share> {
        indices
            .iter()
            .map(|&i| Share::parse(&shares[i].to_text()).unwrap())
            .collect()
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

    #[test]
    fn text_round_trip() {
        let shares = split(&secret(), 2, 3).unwrap();
        for share in &shares {
            let text = share.to_text();
            assert!(text.starts_with(SHARE_TEXT_PREFIX));
            assert_eq!(text.len(), SHARE_TEXT_PREFIX.len() + 74);
            let back = Share::parse(&text).unwrap();
            assert_eq!((back.x, back.y), (share.x, share.y));
            let padded = format!(
                "  {}\n",
                text.to_uppercase()
                    .replace("CIPHERD-SHARE:V1:", SHARE_TEXT_PREFIX)
            );
            let back = Share::parse(&padded).unwrap();
            assert_eq!((back.x, back.y), (share.x, share.y));
        }
    }

    #[test]
    fn malformed_text_is_rejected() {
        let share = split(&secret(), 2, 2).unwrap().remove(0);
        let text = share.to_text().to_string();
        let hex = &text[SHARE_TEXT_PREFIX.len()..];
        let mut typo = hex.as_bytes().to_vec();
        typo[10] = if typo[10] == b'0' { b'1' } else { b'0' };
        let typo = String::from_utf8(typo).unwrap();
        // A well-formed text (valid checksum) with x = 0; `to_text` does not check x.
        let zero_x_text = Share { x: 0, y: share.y }.to_text().to_string();
        let bad = [
            String::new(),
            hex.to_owned(),
            format!("cipherd-share:v2:{hex}"),
            format!("{SHARE_TEXT_PREFIX}{}", &hex[2..]),
            format!("{SHARE_TEXT_PREFIX}{hex}00"),
            format!("{SHARE_TEXT_PREFIX}{}zz", &hex[..hex.len() - 2]),
            format!("{SHARE_TEXT_PREFIX}{typo}"),
            format!("{SHARE_TEXT_PREFIX}{}", hex.replace(|_: char| true, "é")),
            zero_x_text,
        ];
        for b in bad {
            match Share::parse(&b) {
                Err(Error::Shamir(msg)) => {
                    assert!(
                        !msg.contains(&hex[4..20]),
                        "message echoes the share: {msg}"
                    )
                }
                other => panic!("accepted {b:?}: {other:?}"),
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
    }
}
