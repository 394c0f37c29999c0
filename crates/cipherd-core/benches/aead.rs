//! Criterion micro-benchmarks for the AEAD hot path (issue #3).
//!
//! Run with `cargo bench -p cipherd-core --bench aead`; filter with a substring,
//! e.g. `cargo bench -p cipherd-core --bench aead -- xaes`.
//!
//! Groups:
//!
//! - `seal/<key type>` and `open/<key type>`: one message through `AeadKey`, 64 B,
//!   1 KiB and 16 KiB, into a reused buffer (so allocation is not measured).
//! - `batch/<key type>`: the same message sealed and opened one at a time through
//!   `AeadKey` (`single`) and through a `Sealer`/`Opener` that shares the derived
//!   subkey (`sealer`, `opener`), 64 B and 1 KiB, for the two 192-bit-nonce types;
//!   for the 96-bit types `seal/single` and `seal/sealer` only (their sealer
//!   draws `NONCES_PER_FILL` nonces per generator call).
//! - `batch100/<key type>`: 100 × 64 B sealed as the server seals a batch: a fresh
//!   `Sealer` per batch (`sealer`, so the per-batch generator draw is counted)
//!   against 100 single seals (`single`, one generator call each).
//! - `reference`: the primitives underneath with no cipherd code in the way:
//!   raw aws-lc-rs AES-256-GCM and ChaCha20-Poly1305 under a prepared key, and the
//!   RustCrypto XChaCha20-Poly1305 that the `xchacha20-poly1305` key type used to
//!   run on; and base64 of a 1 KiB body with the `base64` crate (what the text
//!   form used to run on) and `base64-simd` (what it runs on). A cipherd line far above its reference line is overhead to look at.
//! - `ciphertext`: the framing layer, as the server calls it (one `Vec` per item):
//!   parse, seal and open, binary and text, 1 KiB.
//!
//! Machine noise: these run on shared machines; compare lines of the same run
//! rather than numbers across runs.
#![allow(missing_docs, clippy::unwrap_used)] // a bench binary; a panic is the report

use std::{hint::black_box, time::Duration};

use aws_lc_rs::aead::{AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use chacha20poly1305::{
    XChaCha20Poly1305,
    aead::{AeadInOut, KeyInit},
};
use cipherd_core::{
    KeyType,
    aead::AeadKey,
    ciphertext::{self, Ciphertext, Encoding},
    keyring::KeyVersion,
    secret::KeyMaterial,
};
use criterion::{
    BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main, measurement::WallTime,
};

const SIZES: [usize; 3] = [64, 1024, 16 * 1024];
const AAD: &[u8] = b"patients/42/ssn";

fn material() -> KeyMaterial {
    KeyMaterial::from_slice(&[0x42; 32]).unwrap()
}

fn key(key_type: KeyType) -> AeadKey {
    AeadKey::new(key_type, &material()).unwrap()
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    // The CSPRNG seeds itself (jitter entropy, milliseconds) on first use: do it
    // outside every measurement so no sample, and no instruction-count profile of
    // a bench, includes it.
    aws_lc_rs::rand::fill(&mut [0u8; 16]).unwrap();
    group
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
}

fn single_message(c: &mut Criterion) {
    for key_type in KeyType::ALL {
        let k = key(key_type);

        let mut group = c.benchmark_group(format!("seal/{key_type}"));
        configure(&mut group);
        for size in SIZES {
            let plaintext = vec![0xA5; size];
            let mut out = Vec::with_capacity(size + k.overhead());
            group.throughput(Throughput::Bytes(size as u64));
            group.bench_function(size.to_string(), |b| {
                b.iter(|| {
                    out.clear();
                    k.seal_append(AAD, black_box(&plaintext), &mut out).unwrap();
                    black_box(&out);
                })
            });
        }
        group.finish();

        let mut group = c.benchmark_group(format!("open/{key_type}"));
        configure(&mut group);
        for size in SIZES {
            let mut sealed = Vec::new();
            k.seal_append(AAD, &vec![0xA5; size], &mut sealed).unwrap();
            let mut out = Vec::with_capacity(sealed.len());
            group.throughput(Throughput::Bytes(size as u64));
            group.bench_function(size.to_string(), |b| {
                b.iter(|| {
                    out.clear();
                    k.open_append(AAD, black_box(&sealed), &mut out).unwrap();
                    black_box(&out);
                })
            });
        }
        group.finish();
    }
}

fn batch(c: &mut Criterion) {
    for key_type in [KeyType::Aes256Gcm96, KeyType::ChaCha20Poly1305] {
        let k = key(key_type);
        let mut group = c.benchmark_group(format!("batch/{key_type}"));
        configure(&mut group);
        for size in [64, 1024] {
            let plaintext = vec![0xA5; size];
            let mut out = Vec::with_capacity(size + k.overhead());
            group.throughput(Throughput::Bytes(size as u64));
            group.bench_function(format!("seal/single/{size}"), |b| {
                b.iter(|| {
                    out.clear();
                    k.seal_append(AAD, black_box(&plaintext), &mut out).unwrap();
                    black_box(&out);
                })
            });
            let mut sealer = k.sealer().unwrap();
            group.bench_function(format!("seal/sealer/{size}"), |b| {
                b.iter(|| {
                    out.clear();
                    sealer
                        .seal_append(AAD, black_box(&plaintext), &mut out)
                        .unwrap();
                    black_box(&out);
                })
            });
        }
        group.finish();
    }
    for key_type in KeyType::ALL {
        let k = key(key_type);
        let mut group = c.benchmark_group(format!("batch100/{key_type}"));
        configure(&mut group);
        let plaintext = vec![0xA5; 64];
        let mut out = Vec::with_capacity(100 * (64 + k.overhead()));
        group.throughput(Throughput::Elements(100));
        group.bench_function("single/64", |b| {
            b.iter(|| {
                out.clear();
                for _ in 0..100 {
                    k.seal_append(AAD, black_box(&plaintext), &mut out).unwrap();
                }
                black_box(&out);
            })
        });
        group.bench_function("sealer/64", |b| {
            b.iter(|| {
                out.clear();
                let mut sealer = k.sealer().unwrap();
                for _ in 0..100 {
                    sealer
                        .seal_append(AAD, black_box(&plaintext), &mut out)
                        .unwrap();
                }
                black_box(&out);
            })
        });
        group.finish();
    }
    for key_type in [KeyType::Xaes256Gcm, KeyType::XChaCha20Poly1305] {
        let k = key(key_type);
        let mut group = c.benchmark_group(format!("batch/{key_type}"));
        configure(&mut group);
        for size in [64, 1024] {
            let plaintext = vec![0xA5; size];
            let mut out = Vec::with_capacity(size + k.overhead());
            group.throughput(Throughput::Bytes(size as u64));
            group.bench_function(format!("seal/single/{size}"), |b| {
                b.iter(|| {
                    out.clear();
                    k.seal_append(AAD, black_box(&plaintext), &mut out).unwrap();
                    black_box(&out);
                })
            });
            // One sealer for the whole measurement: it re-derives every
            // `MESSAGES_PER_SUBKEY` messages, as it would in a long batch.
            let mut sealer = k.sealer().unwrap();
            group.bench_function(format!("seal/sealer/{size}"), |b| {
                b.iter(|| {
                    out.clear();
                    sealer
                        .seal_append(AAD, black_box(&plaintext), &mut out)
                        .unwrap();
                    black_box(&out);
                })
            });

            // A batch's ciphertexts share a prefix: the opener derives once.
            let mut sealed = Vec::new();
            k.sealer()
                .unwrap()
                .seal_append(AAD, &plaintext, &mut sealed)
                .unwrap();
            group.bench_function(format!("open/single/{size}"), |b| {
                b.iter(|| {
                    out.clear();
                    k.open_append(AAD, black_box(&sealed), &mut out).unwrap();
                    black_box(&out);
                })
            });
            let mut opener = k.opener();
            group.bench_function(format!("open/opener/{size}"), |b| {
                b.iter(|| {
                    out.clear();
                    opener
                        .open_append(AAD, black_box(&sealed), &mut out)
                        .unwrap();
                    black_box(&out);
                })
            });
        }
        group.finish();
    }
}

fn reference(c: &mut Criterion) {
    let mut group = c.benchmark_group("reference");
    configure(&mut group);
    for (name, algorithm) in [
        ("aws-lc-aes-256-gcm", &AES_256_GCM),
        ("aws-lc-chacha20-poly1305", &CHACHA20_POLY1305),
    ] {
        let key = LessSafeKey::new(UnboundKey::new(algorithm, &[0x42; 32]).unwrap());
        for size in SIZES {
            let mut buf = vec![0xA5; size];
            group.throughput(Throughput::Bytes(size as u64));
            group.bench_function(format!("{name}/seal/{size}"), |b| {
                b.iter(|| {
                    let nonce = Nonce::assume_unique_for_key([7; 12]);
                    let tag = key
                        .seal_in_place_separate_tag(nonce, Aad::from(AAD), black_box(&mut buf))
                        .unwrap();
                    black_box(&tag);
                })
            });
        }
    }
    // The text form's base64 of a 1 KiB XAES body (1064 bytes): the `base64`
    // crate it used to run on against `base64-simd`, which it runs on now.
    let body = vec![0xA5; 1024 + 40];
    let text = base64_simd::STANDARD.encode_to_string(&body);
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("base64/encode/1064", |b| {
        b.iter(|| black_box(BASE64.encode(black_box(&body))))
    });
    group.bench_function("base64-simd/encode/1064", |b| {
        b.iter(|| black_box(base64_simd::STANDARD.encode_to_string(black_box(&body))))
    });
    group.bench_function("base64/decode/1064", |b| {
        b.iter(|| black_box(BASE64.decode(black_box(&text)).unwrap()))
    });
    group.bench_function("base64-simd/decode/1064", |b| {
        b.iter(|| {
            black_box(
                base64_simd::STANDARD
                    .decode_to_vec(black_box(&text))
                    .unwrap(),
            )
        })
    });

    let xchacha = XChaCha20Poly1305::new(&[0x42; 32].into());
    for size in SIZES {
        let mut buf = vec![0xA5; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("rustcrypto-xchacha20-poly1305/seal/{size}"), |b| {
            b.iter(|| {
                let tag = xchacha
                    .encrypt_inout_detached(&[7; 24].into(), AAD, black_box(&mut buf[..]).into())
                    .unwrap();
                black_box(&tag);
            })
        });
    }
    group.finish();
}

fn framing(c: &mut Criterion) {
    let k = key(KeyType::Xaes256Gcm);
    let version = KeyVersion::new(3).unwrap();
    let plaintext = vec![0xA5; 1024];
    let mut group = c.benchmark_group("ciphertext");
    configure(&mut group);
    group.throughput(Throughput::Bytes(plaintext.len() as u64));
    for (name, encoding) in [("binary", Encoding::Binary), ("text", Encoding::Text)] {
        let ct = ciphertext::seal(&k, version, AAD, &plaintext, encoding).unwrap();
        group.bench_function(format!("parse/{name}/1024"), |b| {
            b.iter(|| black_box(Ciphertext::parse(black_box(&ct)).unwrap()))
        });
        group.bench_function(format!("seal/{name}/1024"), |b| {
            b.iter(|| {
                black_box(
                    ciphertext::seal(&k, version, AAD, black_box(&plaintext), encoding).unwrap(),
                )
            })
        });
        let mut sealer = k.sealer().unwrap();
        group.bench_function(format!("seal_with/{name}/1024"), |b| {
            b.iter(|| {
                black_box(
                    ciphertext::seal_with(
                        &mut sealer,
                        version,
                        AAD,
                        black_box(&plaintext),
                        encoding,
                    )
                    .unwrap(),
                )
            })
        });
        group.bench_function(format!("open/{name}/1024"), |b| {
            b.iter(|| {
                let parsed = Ciphertext::parse(black_box(&ct)).unwrap();
                black_box(ciphertext::open(&k, &parsed, AAD).unwrap())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, single_message, batch, reference, framing);
criterion_main!(benches);
