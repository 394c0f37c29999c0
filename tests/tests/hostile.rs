//! The hostile catalogue: one table of malformed, oversized, forged, misdirected
//! and forbidden requests, each row naming the status code and `ErrorInfo` reason
//! it must get. After the whole table, the server still serves and a digest of
//! every stored record is unchanged: no hostile request changed state.
//!
//! Rows are cheap to add: a name, a request built from the fixture, the expected
//! code and reason. For a batch of one item, a failure of that item counts as the
//! row's answer (the call itself succeeds, invariant 6).
#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

use bytes::Bytes;
use cipherd_client::Error;
use cipherd_e2e::{Client, Code, TestServer, create_key_with, encrypt, flip, pb, raw_unary, reply};
use cipherd_store::{SqliteStore, Store as _};
use sha2::{Digest as _, Sha256};

/// Limits of the catalogue's server, small so that limit rows stay small. A full
/// batch of the largest plaintexts fits in a message, but its text-form reply
/// would not.
const MAX_PLAINTEXT: usize = 7000;
const MAX_BATCH: usize = 8;
const MAX_MESSAGE: usize = 64 << 10;
const MAX_AAD: usize = 1024;
const MAX_CONTEXT: usize = 256;

/// What the rows work on: keys and ciphertexts made before the digest is taken.
struct Fixture {
    /// A ciphertext of `xaes` (binary), of `xaes` in text form, of `xaes` bound to
    /// associated data `row:1`, and of `derived` under context `tenant-1`.
    ct: Bytes,
    text: Bytes,
    ct_aad: Bytes,
    ct_derived: Bytes,
    /// A ciphertext of `other`, a second key.
    ct_other: Bytes,
}

/// One request of any RPC.
enum Req {
    Encrypt(pb::EncryptRequest),
    Decrypt(pb::DecryptRequest),
    Rewrap(pb::RewrapRequest),
    BatchEncrypt(pb::BatchEncryptRequest),
    BatchDecrypt(pb::BatchDecryptRequest),
    BatchRewrap(pb::BatchRewrapRequest),
    DataKey(pb::GenerateDataKeyRequest),
    Create(pb::CreateKeyRequest),
    Get(pb::GetKeyRequest),
    Rotate(pb::RotateKeyRequest),
    Config(pb::UpdateKeyConfigRequest),
    Trim(pb::TrimKeyRequest),
    Delete(pb::DeleteKeyRequest),
    Export(pb::ExportKeyRequest),
    Init(pb::InitRequest),
    Unseal(pb::UnsealRequest),
    /// Raw bytes as the request message of the unary RPC at this path.
    Raw(&'static str, &'static [u8]),
}

struct Row {
    name: &'static str,
    request: fn(&Fixture) -> Req,
    code: Code,
    reason: &'static str,
}

const fn row(
    name: &'static str,
    request: fn(&Fixture) -> Req,
    code: Code,
    reason: &'static str,
) -> Row {
    Row {
        name,
        request,
        code,
        reason,
    }
}

use Code::{AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted};

const KNF: &str = "KEY_NOT_FOUND";
const DF: &str = "DECRYPTION_FAILED";
const IA: &str = "INVALID_ARGUMENT";
const FP: &str = "FAILED_PRECONDITION";
const TL: &str = "TOO_LARGE";
const MM: &str = "MALFORMED_MESSAGE";

fn enc(key: &str, plaintext: &'static [u8]) -> pb::EncryptRequest {
    pb::EncryptRequest {
        key: key.into(),
        plaintext: Bytes::from_static(plaintext),
        ..Default::default()
    }
}

fn dec(key: &str, ciphertext: Bytes) -> pb::DecryptRequest {
    pb::DecryptRequest {
        key: key.into(),
        ciphertext,
        ..Default::default()
    }
}

fn rewrap(key: &str, ciphertext: Bytes) -> pb::RewrapRequest {
    pb::RewrapRequest {
        key: key.into(),
        ciphertext,
        ..Default::default()
    }
}

fn config(key: &str) -> pb::UpdateKeyConfigRequest {
    pb::UpdateKeyConfigRequest {
        name: key.into(),
        ..Default::default()
    }
}

fn bytes(len: usize) -> Bytes {
    Bytes::from(vec![b'x'; len])
}

/// The ciphertext with its version field (binary form, bytes 1..5) set to `v`.
fn with_version(ct: &Bytes, v: u32) -> Bytes {
    let mut b = ct.to_vec();
    b[1..5].copy_from_slice(&v.to_be_bytes());
    Bytes::from(b)
}

fn text_body(f: &Fixture) -> &str {
    std::str::from_utf8(&f.text).unwrap()
}

const ROWS: &[Row] = &[
    // Key names.
    row(
        "encrypt: empty key name",
        |_| Req::Encrypt(enc("", b"x")),
        InvalidArgument,
        IA,
    ),
    row(
        "encrypt: key name of 129 bytes",
        |_| Req::Encrypt(enc(&"k".repeat(129), b"x")),
        InvalidArgument,
        IA,
    ),
    row(
        "encrypt: key name with a slash",
        |_| Req::Encrypt(enc("a/b", b"x")),
        InvalidArgument,
        IA,
    ),
    row(
        "encrypt: key name with path traversal",
        |_| Req::Encrypt(enc("../keys/xaes", b"x")),
        InvalidArgument,
        IA,
    ),
    row(
        "encrypt: key name with a space",
        |_| Req::Encrypt(enc("x aes", b"x")),
        InvalidArgument,
        IA,
    ),
    row(
        "encrypt: key name with a NUL byte",
        |_| Req::Encrypt(enc("xaes\0", b"x")),
        InvalidArgument,
        IA,
    ),
    row(
        "encrypt: key name in Cyrillic look-alikes",
        |_| Req::Encrypt(enc("хаеs", b"x")),
        InvalidArgument,
        IA,
    ),
    row(
        "create: invalid key name",
        |_| {
            Req::Create(pb::CreateKeyRequest {
                name: "bad name!".into(),
                ..Default::default()
            })
        },
        InvalidArgument,
        IA,
    ),
    // Unknown keys, on every RPC that names one.
    row(
        "encrypt: unknown key",
        |_| Req::Encrypt(enc("nope", b"x")),
        NotFound,
        KNF,
    ),
    row(
        "decrypt: unknown key",
        |f| Req::Decrypt(dec("nope", f.ct.clone())),
        NotFound,
        KNF,
    ),
    row(
        "rewrap: unknown key",
        |f| Req::Rewrap(rewrap("nope", f.ct.clone())),
        NotFound,
        KNF,
    ),
    row(
        "rewrap: unknown destination key",
        |f| {
            Req::Rewrap(pb::RewrapRequest {
                destination_key: "nope".into(),
                ..rewrap("xaes", f.ct.clone())
            })
        },
        NotFound,
        KNF,
    ),
    row(
        "batch encrypt: unknown key",
        |_| {
            Req::BatchEncrypt(pb::BatchEncryptRequest {
                key: "nope".into(),
                items: vec![pb::EncryptItem::default()],
                ..Default::default()
            })
        },
        NotFound,
        KNF,
    ),
    row(
        "batch decrypt: unknown key",
        |f| {
            Req::BatchDecrypt(pb::BatchDecryptRequest {
                key: "nope".into(),
                items: vec![pb::DecryptItem {
                    ciphertext: f.ct.clone(),
                    ..Default::default()
                }],
                ..Default::default()
            })
        },
        NotFound,
        KNF,
    ),
    row(
        "batch rewrap: unknown key",
        |f| {
            Req::BatchRewrap(pb::BatchRewrapRequest {
                key: "nope".into(),
                items: vec![pb::RewrapItem {
                    ciphertext: f.ct.clone(),
                    ..Default::default()
                }],
                ..Default::default()
            })
        },
        NotFound,
        KNF,
    ),
    row(
        "data key: unknown key",
        |_| {
            Req::DataKey(pb::GenerateDataKeyRequest {
                key: "nope".into(),
                ..Default::default()
            })
        },
        NotFound,
        KNF,
    ),
    row(
        "get: unknown key",
        |_| {
            Req::Get(pb::GetKeyRequest {
                name: "nope".into(),
            })
        },
        NotFound,
        KNF,
    ),
    row(
        "rotate: unknown key",
        |_| {
            Req::Rotate(pb::RotateKeyRequest {
                name: "nope".into(),
            })
        },
        NotFound,
        KNF,
    ),
    row(
        "config: unknown key",
        |_| {
            Req::Config(pb::UpdateKeyConfigRequest {
                deletion_allowed: Some(true),
                ..config("nope")
            })
        },
        NotFound,
        KNF,
    ),
    row(
        "trim: unknown key",
        |_| {
            Req::Trim(pb::TrimKeyRequest {
                name: "nope".into(),
                min_available_version: 1,
            })
        },
        NotFound,
        KNF,
    ),
    row(
        "delete: unknown key",
        |_| {
            Req::Delete(pb::DeleteKeyRequest {
                name: "nope".into(),
            })
        },
        NotFound,
        KNF,
    ),
    row(
        "export: unknown key",
        |_| {
            Req::Export(pb::ExportKeyRequest {
                name: "nope".into(),
                version: None,
            })
        },
        NotFound,
        KNF,
    ),
    // Ciphertexts: malformed, tampered, misdirected. One opaque answer for all.
    row(
        "decrypt: empty ciphertext",
        |_| Req::Decrypt(dec("xaes", Bytes::new())),
        InvalidArgument,
        DF,
    ),
    row(
        "decrypt: one byte",
        |_| Req::Decrypt(dec("xaes", Bytes::from_static(&[1]))),
        InvalidArgument,
        DF,
    ),
    row(
        "decrypt: header only",
        |f| Req::Decrypt(dec("xaes", f.ct.slice(..5))),
        InvalidArgument,
        DF,
    ),
    row(
        "decrypt: unknown format byte",
        |f| Req::Decrypt(dec("xaes", flip(&f.ct, 0))),
        InvalidArgument,
        DF,
    ),
    row(
        "decrypt: truncated by one byte",
        |f| Req::Decrypt(dec("xaes", f.ct.slice(..f.ct.len() - 1))),
        InvalidArgument,
        DF,
    ),
    row(
        "decrypt: one byte appended",
        |f| Req::Decrypt(dec("xaes", Bytes::from([f.ct.as_ref(), &[0]].concat()))),
        InvalidArgument,
        DF,
    ),
    row(
        "decrypt: flipped nonce byte",
        |f| Req::Decrypt(dec("xaes", flip(&f.ct, 6))),
        InvalidArgument,
        DF,
    ),
    row(
        "decrypt: flipped ciphertext byte",
        |f| Req::Decrypt(dec("xaes", flip(&f.ct, 5 + 24))),
        InvalidArgument,
        DF,
    ),
    row(
        "decrypt: flipped tag byte",
        |f| Req::Decrypt(dec("xaes", flip(&f.ct, f.ct.len() - 1))),
        InvalidArgument,
        DF,
    ),
    row(
        "decrypt: version 0",
        |f| Req::Decrypt(dec("xaes", with_version(&f.ct, 0))),
        InvalidArgument,
        DF,
    ),
    row(
        "decrypt: a version that does not exist",
        |f| Req::Decrypt(dec("xaes", with_version(&f.ct, 7))),
        InvalidArgument,
        DF,
    ),
    row(
        "decrypt: version u32::MAX",
        |f| Req::Decrypt(dec("xaes", with_version(&f.ct, u32::MAX))),
        InvalidArgument,
        DF,
    ),
    row(
        "decrypt: another key's ciphertext",
        |f| Req::Decrypt(dec("xaes", f.ct_other.clone())),
        InvalidArgument,
        DF,
    ),
    row(
        "decrypt: missing associated data",
        |f| Req::Decrypt(dec("xaes", f.ct_aad.clone())),
        InvalidArgument,
        DF,
    ),
    row(
        "decrypt: wrong associated data",
        |f| {
            Req::Decrypt(pb::DecryptRequest {
                associated_data: Bytes::from_static(b"row:2"),
                ..dec("xaes", f.ct_aad.clone())
            })
        },
        InvalidArgument,
        DF,
    ),
    row(
        "decrypt: associated data where none was bound",
        |f| {
            Req::Decrypt(pb::DecryptRequest {
                associated_data: Bytes::from_static(b"row:1"),
                ..dec("xaes", f.ct.clone())
            })
        },
        InvalidArgument,
        DF,
    ),
    row(
        "decrypt: derived key, wrong context",
        |f| {
            Req::Decrypt(pb::DecryptRequest {
                context: Bytes::from_static(b"tenant-2"),
                ..dec("derived", f.ct_derived.clone())
            })
        },
        InvalidArgument,
        DF,
    ),
    row(
        "decrypt: text with bad base64",
        |f| Req::Decrypt(dec("xaes", Bytes::from(format!("{}!", text_body(f))))),
        InvalidArgument,
        DF,
    ),
    row(
        "decrypt: text with a leading-zero version",
        |f| {
            Req::Decrypt(dec(
                "xaes",
                Bytes::from(text_body(f).replacen("cipherd:v1:", "cipherd:v01:", 1)),
            ))
        },
        InvalidArgument,
        DF,
    ),
    row(
        "decrypt: text with another prefix",
        |f| {
            Req::Decrypt(dec(
                "xaes",
                Bytes::from(text_body(f).replacen("cipherd:", "vault:", 1)),
            ))
        },
        InvalidArgument,
        DF,
    ),
    row(
        "decrypt: text with trailing whitespace",
        |f| Req::Decrypt(dec("xaes", Bytes::from(format!("{} ", text_body(f))))),
        InvalidArgument,
        DF,
    ),
    row(
        "decrypt: text with a truncated body",
        |f| Req::Decrypt(dec("xaes", f.text.slice(..f.text.len() - 4))),
        InvalidArgument,
        DF,
    ),
    row(
        "rewrap: tampered ciphertext",
        |f| Req::Rewrap(rewrap("xaes", flip(&f.ct, f.ct.len() - 1))),
        InvalidArgument,
        DF,
    ),
    row(
        "batch decrypt item: tampered ciphertext",
        |f| {
            Req::BatchDecrypt(pb::BatchDecryptRequest {
                key: "xaes".into(),
                items: vec![pb::DecryptItem {
                    ciphertext: flip(&f.ct, 10),
                    ..Default::default()
                }],
                ..Default::default()
            })
        },
        InvalidArgument,
        DF,
    ),
    row(
        "batch rewrap item: wrong associated data",
        |f| {
            Req::BatchRewrap(pb::BatchRewrapRequest {
                key: "xaes".into(),
                items: vec![pb::RewrapItem {
                    ciphertext: f.ct_aad.clone(),
                    ..Default::default()
                }],
                ..Default::default()
            })
        },
        InvalidArgument,
        DF,
    ),
    // Contexts.
    row(
        "encrypt: context for a non-derived key",
        |_| {
            Req::Encrypt(pb::EncryptRequest {
                context: Bytes::from_static(b"t"),
                ..enc("xaes", b"x")
            })
        },
        InvalidArgument,
        IA,
    ),
    row(
        "encrypt: derived key without a context",
        |_| Req::Encrypt(enc("derived", b"x")),
        InvalidArgument,
        IA,
    ),
    row(
        "decrypt: context for a non-derived key",
        |f| {
            Req::Decrypt(pb::DecryptRequest {
                context: Bytes::from_static(b"t"),
                ..dec("xaes", f.ct.clone())
            })
        },
        InvalidArgument,
        IA,
    ),
    row(
        "batch encrypt item: derived key without a context",
        |_| {
            Req::BatchEncrypt(pb::BatchEncryptRequest {
                key: "derived".into(),
                items: vec![pb::EncryptItem::default()],
                ..Default::default()
            })
        },
        InvalidArgument,
        IA,
    ),
    // Sizes and counts.
    row(
        "encrypt: plaintext over the limit",
        |_| {
            Req::Encrypt(pb::EncryptRequest {
                plaintext: bytes(MAX_PLAINTEXT + 1),
                ..enc("xaes", b"")
            })
        },
        InvalidArgument,
        TL,
    ),
    row(
        "batch encrypt item: plaintext over the limit",
        |_| {
            Req::BatchEncrypt(pb::BatchEncryptRequest {
                key: "xaes".into(),
                items: vec![pb::EncryptItem {
                    plaintext: bytes(MAX_PLAINTEXT + 1),
                    ..Default::default()
                }],
                ..Default::default()
            })
        },
        InvalidArgument,
        TL,
    ),
    row(
        "batch encrypt: one item over the batch limit",
        |_| {
            Req::BatchEncrypt(pb::BatchEncryptRequest {
                key: "xaes".into(),
                items: vec![pb::EncryptItem::default(); MAX_BATCH + 1],
                ..Default::default()
            })
        },
        InvalidArgument,
        TL,
    ),
    row(
        "batch decrypt: over the batch limit",
        |f| {
            Req::BatchDecrypt(pb::BatchDecryptRequest {
                key: "xaes".into(),
                items: vec![
                    pb::DecryptItem {
                        ciphertext: f.ct.clone(),
                        ..Default::default()
                    };
                    MAX_BATCH + 1
                ],
                ..Default::default()
            })
        },
        InvalidArgument,
        TL,
    ),
    row(
        "batch rewrap: over the batch limit",
        |f| {
            Req::BatchRewrap(pb::BatchRewrapRequest {
                key: "xaes".into(),
                items: vec![
                    pb::RewrapItem {
                        ciphertext: f.ct.clone(),
                        ..Default::default()
                    };
                    MAX_BATCH + 1
                ],
                ..Default::default()
            })
        },
        InvalidArgument,
        TL,
    ),
    row(
        "batch encrypt: reply would exceed the message limit",
        |_| {
            Req::BatchEncrypt(pb::BatchEncryptRequest {
                key: "xaes".into(),
                items: vec![
                    pb::EncryptItem {
                        plaintext: bytes(MAX_PLAINTEXT),
                        ..Default::default()
                    };
                    MAX_BATCH
                ],
                encoding: pb::CiphertextEncoding::Text as i32,
                ..Default::default()
            })
        },
        InvalidArgument,
        TL,
    ),
    row(
        "encrypt: message over the message limit",
        |_| {
            Req::Encrypt(pb::EncryptRequest {
                associated_data: bytes(MAX_MESSAGE + 1),
                ..enc("xaes", b"x")
            })
        },
        ResourceExhausted,
        "MESSAGE_TOO_LARGE",
    ),
    row(
        "encrypt: associated data over the limit",
        |_| {
            Req::Encrypt(pb::EncryptRequest {
                associated_data: bytes(MAX_AAD + 1),
                ..enc("xaes", b"x")
            })
        },
        InvalidArgument,
        TL,
    ),
    row(
        "decrypt: associated data over the limit",
        |f| {
            Req::Decrypt(pb::DecryptRequest {
                associated_data: bytes(MAX_AAD + 1),
                ..dec("xaes", f.ct_aad.clone())
            })
        },
        InvalidArgument,
        TL,
    ),
    row(
        "encrypt: context over the limit",
        |_| {
            Req::Encrypt(pb::EncryptRequest {
                context: bytes(MAX_CONTEXT + 1),
                ..enc("derived", b"x")
            })
        },
        InvalidArgument,
        TL,
    ),
    row(
        "batch decrypt item: context over the limit",
        |f| {
            Req::BatchDecrypt(pb::BatchDecryptRequest {
                key: "derived".into(),
                items: vec![pb::DecryptItem {
                    ciphertext: f.ct_derived.clone(),
                    context: bytes(MAX_CONTEXT + 1),
                    ..Default::default()
                }],
                ..Default::default()
            })
        },
        InvalidArgument,
        TL,
    ),
    row(
        "batch rewrap item: destination context over the limit",
        |f| {
            Req::BatchRewrap(pb::BatchRewrapRequest {
                key: "derived".into(),
                items: vec![pb::RewrapItem {
                    ciphertext: f.ct_derived.clone(),
                    context: Bytes::from_static(b"tenant-1"),
                    destination_context: bytes(MAX_CONTEXT + 1),
                    ..Default::default()
                }],
                ..Default::default()
            })
        },
        InvalidArgument,
        TL,
    ),
    row(
        "data key: associated data over the limit",
        |_| {
            Req::DataKey(pb::GenerateDataKeyRequest {
                key: "xaes".into(),
                associated_data: bytes(MAX_AAD + 1),
                ..Default::default()
            })
        },
        InvalidArgument,
        TL,
    ),
    // Enumerations and numbers.
    row(
        "encrypt: unknown encoding",
        |_| {
            Req::Encrypt(pb::EncryptRequest {
                encoding: 99,
                ..enc("xaes", b"x")
            })
        },
        InvalidArgument,
        IA,
    ),
    row(
        "rewrap: unknown encoding",
        |f| {
            Req::Rewrap(pb::RewrapRequest {
                encoding: -1,
                ..rewrap("xaes", f.ct.clone())
            })
        },
        InvalidArgument,
        IA,
    ),
    row(
        "encrypt: key version 0",
        |_| {
            Req::Encrypt(pb::EncryptRequest {
                key_version: Some(0),
                ..enc("xaes", b"x")
            })
        },
        InvalidArgument,
        IA,
    ),
    row(
        "encrypt: key version that does not exist",
        |_| {
            Req::Encrypt(pb::EncryptRequest {
                key_version: Some(9),
                ..enc("xaes", b"x")
            })
        },
        InvalidArgument,
        IA,
    ),
    row(
        "data key: 7 bits",
        |_| {
            Req::DataKey(pb::GenerateDataKeyRequest {
                key: "xaes".into(),
                bits: 7,
                ..Default::default()
            })
        },
        InvalidArgument,
        IA,
    ),
    row(
        "data key: unknown encoding",
        |_| {
            Req::DataKey(pb::GenerateDataKeyRequest {
                key: "xaes".into(),
                encoding: 3,
                ..Default::default()
            })
        },
        InvalidArgument,
        IA,
    ),
    row(
        "create: unknown key type",
        |_| {
            Req::Create(pb::CreateKeyRequest {
                name: "new".into(),
                r#type: 42,
                ..Default::default()
            })
        },
        InvalidArgument,
        IA,
    ),
    // Key administration that must be refused.
    row(
        "create: a key that exists",
        |_| {
            Req::Create(pb::CreateKeyRequest {
                name: "xaes".into(),
                ..Default::default()
            })
        },
        AlreadyExists,
        "KEY_EXISTS",
    ),
    row(
        "config: min decryption version 0",
        |_| {
            Req::Config(pb::UpdateKeyConfigRequest {
                min_decryption_version: Some(0),
                ..config("xaes")
            })
        },
        InvalidArgument,
        IA,
    ),
    row(
        "config: min decryption version above the latest",
        |_| {
            Req::Config(pb::UpdateKeyConfigRequest {
                min_decryption_version: Some(2),
                ..config("xaes")
            })
        },
        FailedPrecondition,
        FP,
    ),
    row(
        "config: min encryption version above the latest",
        |_| {
            Req::Config(pb::UpdateKeyConfigRequest {
                min_encryption_version: Some(5),
                ..config("xaes")
            })
        },
        FailedPrecondition,
        FP,
    ),
    row(
        "config: turning exportable on later",
        |_| {
            Req::Config(pb::UpdateKeyConfigRequest {
                exportable: Some(true),
                ..config("xaes")
            })
        },
        FailedPrecondition,
        FP,
    ),
    row(
        "trim: above the min decryption version",
        |_| {
            Req::Trim(pb::TrimKeyRequest {
                name: "xaes".into(),
                min_available_version: 2,
            })
        },
        FailedPrecondition,
        FP,
    ),
    row(
        "trim: version 0",
        |_| {
            Req::Trim(pb::TrimKeyRequest {
                name: "xaes".into(),
                min_available_version: 0,
            })
        },
        InvalidArgument,
        IA,
    ),
    row(
        "delete: deletion not allowed",
        |_| {
            Req::Delete(pb::DeleteKeyRequest {
                name: "xaes".into(),
            })
        },
        FailedPrecondition,
        FP,
    ),
    row(
        "export: key not exportable",
        |_| {
            Req::Export(pb::ExportKeyRequest {
                name: "xaes".into(),
                version: None,
            })
        },
        FailedPrecondition,
        FP,
    ),
    row(
        "export: version that does not exist",
        |_| {
            Req::Export(pb::ExportKeyRequest {
                name: "exportable".into(),
                version: Some(9),
            })
        },
        InvalidArgument,
        IA,
    ),
    // Bytes that are not the protobuf the RPC takes.
    row(
        "encrypt: a field longer than the message",
        |_| Req::Raw("/cipherd.v1.TransitService/Encrypt", b"\x12\x64short"),
        InvalidArgument,
        MM,
    ),
    row(
        "batch decrypt: a varint that never ends",
        |_| {
            Req::Raw(
                "/cipherd.v1.TransitService/BatchDecrypt",
                b"\x0a\x04xaes\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
            )
        },
        InvalidArgument,
        MM,
    ),
    row(
        "create key: wire type 7",
        |_| Req::Raw("/cipherd.v1.KeyAdminService/CreateKey", b"\x0f\x00"),
        InvalidArgument,
        MM,
    ),
    row(
        "rewrap: a string field that is not UTF-8",
        |_| Req::Raw("/cipherd.v1.TransitService/Rewrap", b"\x0a\x02\xff\xfe"),
        InvalidArgument,
        MM,
    ),
    row(
        "unseal: a truncated share field",
        |_| {
            Req::Raw(
                "/cipherd.v1.SystemService/Unseal",
                b"\x0a\x50cipherd-share:",
            )
        },
        InvalidArgument,
        MM,
    ),
    // Lifecycle.
    row(
        "init: already initialized",
        |_| {
            Req::Init(pb::InitRequest {
                shares: 3,
                threshold: 2,
            })
        },
        FailedPrecondition,
        "ALREADY_INITIALIZED",
    ),
    row(
        "init: threshold above shares",
        |_| {
            Req::Init(pb::InitRequest {
                shares: 2,
                threshold: 3,
            })
        },
        InvalidArgument,
        IA,
    ),
    row(
        "init: zero shares",
        |_| {
            Req::Init(pb::InitRequest {
                shares: 0,
                threshold: 0,
            })
        },
        InvalidArgument,
        IA,
    ),
    row(
        "unseal: while unsealed",
        |_| {
            Req::Unseal(pb::UnsealRequest {
                share: String::new(),
                reset: false,
            })
        },
        FailedPrecondition,
        "ALREADY_UNSEALED",
    ),
];

/// Every row gets its expected answer; afterwards the server serves and the
/// stored records are exactly as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hostile_catalogue_is_refused_and_changes_nothing() {
    assert!(ROWS.len() >= 60, "the catalogue has {} rows", ROWS.len());
    let dir = tempfile::tempdir().unwrap();
    let mut params = cipherd_e2e::Params::for_data_dir(dir.path(), true);
    params.limits.max_plaintext_bytes = MAX_PLAINTEXT;
    params.limits.max_batch_items = MAX_BATCH;
    params.limits.max_message_bytes = MAX_MESSAGE;
    params.limits.max_associated_data_bytes = MAX_AAD;
    params.limits.max_context_bytes = MAX_CONTEXT;
    let db = dir.path().join("cipherd.db");
    let server = TestServer::start(params).await;
    let client = server.client().await;
    let fixture = fixture(&client).await;
    let channel = client.transport();

    let before = digest(&db).await;
    let mut failures = Vec::new();
    for row in ROWS {
        let outcome = send(&client, &channel, (row.request)(&fixture)).await;
        let got = match &outcome {
            Ok(()) => None,
            Err(e) => Some((e.code(), e.reason().unwrap_or("").to_owned())),
        };
        if got != Some((Some(row.code), row.reason.to_owned())) {
            failures.push(format!(
                "{}: expected {:?}/{}, got {outcome:?}",
                row.name, row.code, row.reason
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows:\n{}",
        failures.len(),
        ROWS.len(),
        failures.join("\n")
    );
    assert_eq!(
        digest(&db).await,
        before,
        "a hostile request changed storage"
    );

    // Still serving, with the keys it had.
    let reply = encrypt(&client, "xaes", b"after the storm").await;
    let back = cipherd_e2e::decrypt(&client, "xaes", &reply.ciphertext)
        .await
        .unwrap();
    assert_eq!(back, &b"after the storm"[..]);
    assert_eq!(
        cipherd_e2e::decrypt(&client, "xaes", &fixture.ct)
            .await
            .unwrap(),
        &b"fixture"[..]
    );
}

async fn fixture(client: &Client) -> Fixture {
    for (name, derived, exportable) in [
        ("xaes", false, false),
        ("other", false, false),
        ("derived", true, false),
        ("exportable", false, true),
    ] {
        create_key_with(
            client,
            pb::CreateKeyRequest {
                name: name.into(),
                derived,
                exportable,
                ..Default::default()
            },
        )
        .await;
    }
    let mut t = client.transit();
    let mut make = async |key: &str, context: &'static [u8], aad: &'static [u8], encoding| {
        reply(
            t.encrypt(pb::EncryptRequest {
                key: key.into(),
                plaintext: Bytes::from_static(b"fixture"),
                associated_data: Bytes::from_static(aad),
                context: Bytes::from_static(context),
                encoding: encoding as i32,
                ..Default::default()
            })
            .await,
        )
        .unwrap()
        .ciphertext
    };
    let binary = pb::CiphertextEncoding::Binary;
    Fixture {
        ct: make("xaes", b"", b"", binary).await,
        text: make("xaes", b"", b"", pb::CiphertextEncoding::Text).await,
        ct_aad: make("xaes", b"", b"row:1", binary).await,
        ct_derived: make("derived", b"tenant-1", b"", binary).await,
        ct_other: make("other", b"", b"", binary).await,
    }
}

/// Sends one request; a batch of one whose item failed counts as failed.
async fn send(
    client: &Client,
    channel: &cipherd_client::AuthChannel,
    request: Req,
) -> Result<(), Error> {
    let mut t = client.transit();
    let mut a = client.admin();
    let mut s = client.system();
    let item = |status: Option<&tonic_types::pb::Status>| match status {
        Some(status) => Err(Error::from_item(status)),
        None => Ok(()),
    };
    match request {
        Req::Encrypt(r) => reply(t.encrypt(r).await).map(drop),
        Req::Decrypt(r) => reply(t.decrypt(r).await).map(drop),
        Req::Rewrap(r) => reply(t.rewrap(r).await).map(drop),
        Req::BatchEncrypt(r) => {
            let reply = reply(t.batch_encrypt(r).await)?;
            item(reply.results.first().and_then(|r| match &r.result {
                Some(pb::ciphertext_result::Result::Error(e)) => Some(e),
                _ => None,
            }))
        }
        Req::BatchDecrypt(r) => {
            let reply = reply(t.batch_decrypt(r).await)?;
            item(reply.results.first().and_then(|r| match &r.result {
                Some(pb::plaintext_result::Result::Error(e)) => Some(e),
                _ => None,
            }))
        }
        Req::BatchRewrap(r) => {
            let reply = reply(t.batch_rewrap(r).await)?;
            item(reply.results.first().and_then(|r| match &r.result {
                Some(pb::ciphertext_result::Result::Error(e)) => Some(e),
                _ => None,
            }))
        }
        Req::DataKey(r) => reply(t.generate_data_key(r).await).map(drop),
        Req::Create(r) => reply(a.create_key(r).await).map(drop),
        Req::Get(r) => reply(a.get_key(r).await).map(drop),
        Req::Rotate(r) => reply(a.rotate_key(r).await).map(drop),
        Req::Config(r) => reply(a.update_key_config(r).await).map(drop),
        Req::Trim(r) => reply(a.trim_key(r).await).map(drop),
        Req::Delete(r) => reply(a.delete_key(r).await).map(drop),
        Req::Export(r) => reply(a.export_key(r).await).map(drop),
        Req::Init(r) => reply(s.init(r).await).map(drop),
        Req::Unseal(r) => reply(s.unseal(r).await).map(drop),
        Req::Raw(path, body) => raw_unary(channel.clone(), path, Bytes::from_static(body))
            .await
            .map(drop),
    }
}

/// SHA-256 over every stored record (path, revision and sealed value), read
/// through a second handle on the server's SQLite file.
async fn digest(db: &std::path::Path) -> String {
    let store = SqliteStore::open(db).await.unwrap();
    let mut hash = Sha256::new();
    let mut after: Option<String> = None;
    let mut count = 0;
    loop {
        let page = store.scan("", after.as_deref(), 100).await.unwrap();
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (path, record) in &page {
            hash.update((path.len() as u64).to_be_bytes());
            hash.update(path.as_bytes());
            hash.update(record.revision.to_be_bytes());
            hash.update((record.value.len() as u64).to_be_bytes());
            hash.update(&record.value);
            count += 1;
        }
    }
    store.close().await;
    assert!(count >= 5, "the seal record and four keys: {count}");
    hex::encode(hash.finalize())
}
