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
use cipherd_e2e::{
    Client, Code, TestServer, create_key_with, encrypt, flip, pb, raw_unary, reply, storage_digest,
};

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
    CancelDeletion(pb::CancelKeyDeletionRequest),
    Export(pb::ExportKeyRequest),
    Init(pb::InitRequest),
    Unseal(pb::UnsealRequest),
    Seal,
    Rekey(pb::RekeyRequest),
    RotateRoot(pb::RotateRootRequest),
    /// `SystemService.Backup`, its stream read to the end.
    Backup,
    BackupKey(pb::BackupKeyRequest),
    RestoreKey(pb::RestoreKeyRequest),
    /// `SystemService.Restore` of these chunks.
    Restore(Vec<pb::RestoreRequest>),
    CreateToken(pb::CreateTokenRequest),
    WritePolicy(pb::WritePolicyRequest),
    AuditHash(pb::HashRequest),
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
                ..Default::default()
            })
        },
        NotFound,
        KNF,
    ),
    row(
        "cancel deletion: unknown key",
        |_| {
            Req::CancelDeletion(pb::CancelKeyDeletionRequest {
                name: "nope".into(),
            })
        },
        NotFound,
        KNF,
    ),
    row(
        "cancel deletion: none scheduled",
        |_| {
            Req::CancelDeletion(pb::CancelKeyDeletionRequest {
                name: "xaes".into(),
            })
        },
        FailedPrecondition,
        FP,
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
                ..Default::default()
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

    let before = storage_digest(&db, 5).await;
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
        storage_digest(&db, 5).await,
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

/// Sends one request with the client's credentials; a batch of one whose item
/// failed counts as failed.
async fn send(
    client: &Client,
    channel: &cipherd_client::AuthChannel,
    request: Req,
) -> Result<(), Error> {
    send_as(client, channel, request, None).await
}

/// Sends one request, with `authorization` (a raw header value) instead of the
/// client's credentials when given.
async fn send_as(
    client: &Client,
    channel: &cipherd_client::AuthChannel,
    request: Req,
    authorization: Option<&str>,
) -> Result<(), Error> {
    let mut t = client.transit();
    let mut a = client.admin();
    let mut s = client.system();
    let header = authorization.map(|h| {
        let mut v: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
            h.parse().expect("a header value");
        v.set_sensitive(true);
        v
    });
    let item = |status: Option<&tonic_types::pb::Status>| match status {
        Some(status) => Err(Error::from_item(status)),
        None => Ok(()),
    };
    match request {
        Req::Encrypt(m) => reply(t.encrypt(with_auth(&header, m)).await).map(drop),
        Req::Decrypt(m) => reply(t.decrypt(with_auth(&header, m)).await).map(drop),
        Req::Rewrap(m) => reply(t.rewrap(with_auth(&header, m)).await).map(drop),
        Req::BatchEncrypt(m) => {
            let reply = reply(t.batch_encrypt(with_auth(&header, m)).await)?;
            item(reply.results.first().and_then(|r| match &r.result {
                Some(pb::ciphertext_result::Result::Error(e)) => Some(e),
                _ => None,
            }))
        }
        Req::BatchDecrypt(m) => {
            let reply = reply(t.batch_decrypt(with_auth(&header, m)).await)?;
            item(reply.results.first().and_then(|r| match &r.result {
                Some(pb::plaintext_result::Result::Error(e)) => Some(e),
                _ => None,
            }))
        }
        Req::BatchRewrap(m) => {
            let reply = reply(t.batch_rewrap(with_auth(&header, m)).await)?;
            item(reply.results.first().and_then(|r| match &r.result {
                Some(pb::ciphertext_result::Result::Error(e)) => Some(e),
                _ => None,
            }))
        }
        Req::DataKey(m) => reply(t.generate_data_key(with_auth(&header, m)).await).map(drop),
        Req::Create(m) => reply(a.create_key(with_auth(&header, m)).await).map(drop),
        Req::Get(m) => reply(a.get_key(with_auth(&header, m)).await).map(drop),
        Req::Rotate(m) => reply(a.rotate_key(with_auth(&header, m)).await).map(drop),
        Req::Config(m) => reply(a.update_key_config(with_auth(&header, m)).await).map(drop),
        Req::Trim(m) => reply(a.trim_key(with_auth(&header, m)).await).map(drop),
        Req::Delete(m) => reply(a.delete_key(with_auth(&header, m)).await).map(drop),
        Req::CancelDeletion(m) => {
            reply(a.cancel_key_deletion(with_auth(&header, m)).await).map(drop)
        }
        Req::Export(m) => reply(a.export_key(with_auth(&header, m)).await).map(drop),
        Req::Init(m) => reply(s.init(with_auth(&header, m)).await).map(drop),
        Req::Unseal(m) => reply(s.unseal(with_auth(&header, m)).await).map(drop),
        Req::Seal => reply(s.seal(with_auth(&header, pb::SealRequest {})).await).map(drop),
        Req::Rekey(m) => reply(s.rekey(with_auth(&header, m)).await).map(drop),
        Req::RotateRoot(m) => reply(s.rotate_root(with_auth(&header, m)).await).map(drop),
        Req::Backup => {
            let mut stream = reply(s.backup(with_auth(&header, pb::BackupRequest {})).await)?;
            while stream.message().await.map_err(Error::from)?.is_some() {}
            Ok(())
        }
        Req::BackupKey(m) => reply(a.backup_key(with_auth(&header, m)).await).map(drop),
        Req::RestoreKey(m) => reply(a.restore_key(with_auth(&header, m)).await).map(drop),
        Req::Restore(chunks) => reply(
            s.restore(with_auth(&header, tokio_stream::iter(chunks)))
                .await,
        )
        .map(drop),
        Req::CreateToken(m) => {
            reply(client.auth().create_token(with_auth(&header, m)).await).map(drop)
        }
        Req::WritePolicy(m) => {
            reply(client.policy().write_policy(with_auth(&header, m)).await).map(drop)
        }
        Req::AuditHash(m) => reply(client.audit().hash(with_auth(&header, m)).await).map(drop),
        Req::Raw(path, body) => raw_unary(channel.clone(), path, Bytes::from_static(body))
            .await
            .map(drop),
    }
}

/// `message` as a request carrying `header` as its `authorization`, if any.
fn with_auth<T>(
    header: &Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    message: T,
) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(h) = header {
        request.metadata_mut().insert("authorization", h.clone());
    }
    request
}

// ---------------------------------------------------------------------------
// The auth rows: credentials that must not authenticate, and authenticated calls
// that their policies must not allow. Over real TLS, with JWTs from a test issuer.

/// Tokens and JWTs the auth rows use, made before the digest is taken.
struct AuthFixture {
    root: String,
    clinician: String,
    etl: String,
    reader: String,
    token_admin: String,
    revoked: String,
    expired: String,
    issuer: cipherd_test_support::jwt::TestIssuer,
    /// A ciphertext of `patients`, and one of `clinic-a`.
    ct: Bytes,
    ct_clinic: Bytes,
}

/// One auth row: the `authorization` header to send (`None`: none), the
/// request, and the expected code and reason.
struct AuthRow {
    name: &'static str,
    authorization: fn(&AuthFixture) -> Option<String>,
    request: fn(&AuthFixture) -> Req,
    code: Code,
    reason: &'static str,
}

const fn auth_row(
    name: &'static str,
    authorization: fn(&AuthFixture) -> Option<String>,
    request: fn(&AuthFixture) -> Req,
    code: Code,
    reason: &'static str,
) -> AuthRow {
    AuthRow {
        name,
        authorization,
        request,
        code,
        reason,
    }
}

const UNAUTH: &str = "UNAUTHENTICATED";
const DENIED: &str = "PERMISSION_DENIED";
const BAD_POLICY: &str = "INVALID_POLICY";

fn bearer(token: &str) -> Option<String> {
    Some(format!("Bearer {token}"))
}

fn jwt_claims(f: &AuthFixture, subject: &str) -> serde_json::Value {
    f.issuer.claims(subject)
}

fn enc_patients(_: &AuthFixture) -> Req {
    Req::Encrypt(enc("patients", b"x"))
}

fn dec_with(ct: Bytes, key: &str, purpose: &str, reason: &str) -> Req {
    Req::Decrypt(pb::DecryptRequest {
        key: key.into(),
        ciphertext: ct,
        purpose: purpose.into(),
        reason: reason.into(),
        ..Default::default()
    })
}

fn write_policy(name: &str, document: &str) -> Req {
    Req::WritePolicy(pb::WritePolicyRequest {
        name: name.into(),
        document: document.into(),
    })
}

const CLINICIAN_POLICY: &str = r#"
[[rule]]
keys = ["patients", "clinic-*"]
operations = ["encrypt"]

[[rule]]
keys = ["patients", "clinic-*"]
operations = ["decrypt"]
purposes = ["treatment"]

[[rule]]
keys = ["patients"]
operations = ["decrypt"]
break_glass = true
"#;

const ETL_POLICY: &str = r#"
[[rule]]
keys = ["patients"]
operations = ["rewrap"]

[[rule]]
keys = ["exportable", "clinic-*"]
operations = ["encrypt"]
"#;

const READER_POLICY: &str = r#"
[[rule]]
keys = ["clinic-*"]
operations = ["key.read"]
"#;

const TOKEN_ADMIN_POLICY: &str = r#"
[[rule]]
operations = ["token"]
"#;

use cipherd_test_support::jwt::{JwtAlg, TestKey, mint_hs256, mint_unsigned};
use serde_json::json;

use Code::{PermissionDenied, Unauthenticated};

const AUTH_ROWS: &[AuthRow] = &[
    // Credentials that do not authenticate: one answer for all.
    auth_row(
        "no credential",
        |_| None,
        enc_patients,
        Unauthenticated,
        UNAUTH,
    ),
    auth_row(
        "Basic scheme",
        |_| Some("Basic dXNlcjpwYXNz".into()),
        enc_patients,
        Unauthenticated,
        UNAUTH,
    ),
    auth_row(
        "Bearer without a token",
        |_| Some("Bearer".into()),
        enc_patients,
        Unauthenticated,
        UNAUTH,
    ),
    auth_row(
        "malformed cipherd token",
        |_| bearer("cdt_nothex_zzz"),
        enc_patients,
        Unauthenticated,
        UNAUTH,
    ),
    auth_row(
        "unknown accessor",
        |_| bearer(&format!("cdt_{}_{}", "0".repeat(24), "A".repeat(43))),
        enc_patients,
        Unauthenticated,
        UNAUTH,
    ),
    auth_row(
        "not a token at all",
        |_| bearer("hunter2"),
        enc_patients,
        Unauthenticated,
        UNAUTH,
    ),
    auth_row(
        "expired token",
        |f| bearer(&f.expired),
        enc_patients,
        Unauthenticated,
        UNAUTH,
    ),
    auth_row(
        "revoked token",
        |f| bearer(&f.revoked),
        enc_patients,
        Unauthenticated,
        UNAUTH,
    ),
    auth_row(
        "forged secret on a real accessor",
        |f| {
            let mut forged = f.clinician.clone();
            let last = forged.pop().unwrap();
            forged.push(if last == 'A' { 'B' } else { 'A' });
            bearer(&forged)
        },
        enc_patients,
        Unauthenticated,
        UNAUTH,
    ),
    auth_row(
        "JWT with a bad signature (another key, same kid)",
        |f| bearer(&TestKey::generate(JwtAlg::RS256, "rs256-1").mint(&jwt_claims(f, "svc-ehr-1"))),
        enc_patients,
        Unauthenticated,
        UNAUTH,
    ),
    auth_row(
        "JWT from the wrong issuer",
        |f| {
            let mut c = jwt_claims(f, "svc-ehr-1");
            c["iss"] = json!("https://evil.example/realms/x");
            bearer(&f.issuer.mint(JwtAlg::ES256, &c))
        },
        enc_patients,
        Unauthenticated,
        UNAUTH,
    ),
    auth_row(
        "JWT for another audience",
        |f| {
            let mut c = jwt_claims(f, "svc-ehr-1");
            c["aud"] = json!("some-other-service");
            bearer(&f.issuer.mint(JwtAlg::EdDSA, &c))
        },
        enc_patients,
        Unauthenticated,
        UNAUTH,
    ),
    auth_row(
        "expired JWT",
        |f| {
            let mut c = jwt_claims(f, "svc-ehr-1");
            c["exp"] = json!(cipherd_test_support::jwt::now_s() - 3600);
            bearer(&f.issuer.mint(JwtAlg::RS256, &c))
        },
        enc_patients,
        Unauthenticated,
        UNAUTH,
    ),
    auth_row(
        "JWT with alg none",
        |f| {
            bearer(&mint_unsigned(
                &json!({"alg": "none", "typ": "JWT"}),
                &jwt_claims(f, "svc-ehr-1"),
            ))
        },
        enc_patients,
        Unauthenticated,
        UNAUTH,
    ),
    auth_row(
        "JWT HS256 signed with the RSA public key",
        |f| {
            let pem = f.issuer.key(JwtAlg::RS256).public_key_pem();
            bearer(&mint_hs256(
                &json!({"alg": "HS256", "typ": "JWT", "kid": "rs256-1"}),
                &jwt_claims(f, "svc-ehr-1"),
                pem.as_bytes(),
            ))
        },
        enc_patients,
        Unauthenticated,
        UNAUTH,
    ),
    auth_row(
        "JWT signed by an unknown kid",
        |f| bearer(&TestKey::generate(JwtAlg::ES256, "es256-9").mint(&jwt_claims(f, "svc-ehr-1"))),
        enc_patients,
        Unauthenticated,
        UNAUTH,
    ),
    // Authenticated, but not allowed: PERMISSION_DENIED, never a hint whether the
    // key exists.
    auth_row(
        "clinician: key outside its globs",
        |f| bearer(&f.clinician),
        |_| Req::Encrypt(enc("secret-notes", b"x")),
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "clinician: missing key outside its globs",
        |f| bearer(&f.clinician),
        |_| Req::Encrypt(enc("no-such-key", b"x")),
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "clinician: decrypt without a purpose",
        |f| bearer(&f.clinician),
        |f| dec_with(f.ct.clone(), "patients", "", ""),
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "clinician: decrypt for a purpose its rule does not list",
        |f| bearer(&f.clinician),
        |f| dec_with(f.ct.clone(), "patients", "research", ""),
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "clinician: break-glass without a reason",
        |f| bearer(&f.clinician),
        |f| dec_with(f.ct.clone(), "patients", "emergency", ""),
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "clinician: break-glass with a blank reason",
        |f| bearer(&f.clinician),
        |f| dec_with(f.ct.clone(), "patients", "emergency", "   "),
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "clinician: break-glass on a key its rule does not name",
        |f| bearer(&f.clinician),
        |f| dec_with(f.ct_clinic.clone(), "clinic-a", "emergency", "code blue"),
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "clinician: batch decrypt without a purpose",
        |f| bearer(&f.clinician),
        |f| {
            Req::BatchDecrypt(pb::BatchDecryptRequest {
                key: "patients".into(),
                items: vec![pb::DecryptItem {
                    ciphertext: f.ct.clone(),
                    ..Default::default()
                }],
                ..Default::default()
            })
        },
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "clinician: datakey without a datakey rule",
        |f| bearer(&f.clinician),
        |_| {
            Req::DataKey(pb::GenerateDataKeyRequest {
                key: "patients".into(),
                purpose: "treatment".into(),
                ..Default::default()
            })
        },
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "clinician: rotate",
        |f| bearer(&f.clinician),
        |_| {
            Req::Rotate(pb::RotateKeyRequest {
                name: "patients".into(),
            })
        },
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "clinician: create a key",
        |f| bearer(&f.clinician),
        |_| {
            Req::Create(pb::CreateKeyRequest {
                name: "clinic-new".into(),
                ..Default::default()
            })
        },
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "clinician: delete",
        |f| bearer(&f.clinician),
        |_| {
            Req::Delete(pb::DeleteKeyRequest {
                name: "patients".into(),
                ..Default::default()
            })
        },
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "clinician: cancel deletion",
        |f| bearer(&f.clinician),
        |_| {
            Req::CancelDeletion(pb::CancelKeyDeletionRequest {
                name: "patients".into(),
            })
        },
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "clinician: export",
        |f| bearer(&f.clinician),
        |_| {
            Req::Export(pb::ExportKeyRequest {
                name: "exportable".into(),
                ..Default::default()
            })
        },
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "clinician: read key metadata",
        |f| bearer(&f.clinician),
        |_| {
            Req::Get(pb::GetKeyRequest {
                name: "patients".into(),
            })
        },
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "clinician: trim",
        |f| bearer(&f.clinician),
        |_| {
            Req::Trim(pb::TrimKeyRequest {
                name: "patients".into(),
                min_available_version: 1,
            })
        },
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "clinician: seal the server",
        |f| bearer(&f.clinician),
        |_| Req::Seal,
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "clinician: start a rekey",
        |f| bearer(&f.clinician),
        |_| Req::Rekey(rekey_start()),
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "clinician: start a root rotation",
        |f| bearer(&f.clinician),
        |_| {
            Req::RotateRoot(pb::RotateRootRequest {
                action: Some(pb::rotate_root_request::Action::Start(true)),
                nonce: String::new(),
            })
        },
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "clinician: back up the store",
        |f| bearer(&f.clinician),
        |_| Req::Backup,
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "token admin (an admin operation, not backup): back up the store",
        |f| bearer(&f.token_admin),
        |_| Req::Backup,
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "clinician: back up a key it may decrypt with",
        |f| bearer(&f.clinician),
        |_| {
            Req::BackupKey(pb::BackupKeyRequest {
                name: "patients".into(),
            })
        },
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "clinician: restore a key backup (authorized on the name in its header)",
        |f| bearer(&f.clinician),
        |_| {
            let mut key_backup = b"CIPHERDK\x01\x08patients".to_vec();
            key_backup.extend_from_slice(&[0; 64]);
            Req::RestoreKey(pb::RestoreKeyRequest {
                key_backup: key_backup.into(),
            })
        },
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "no credential: back up the store",
        |_| None,
        |_| Req::Backup,
        Unauthenticated,
        UNAUTH,
    ),
    auth_row(
        "no credential: restore over the initialized store",
        |_| None,
        |_| {
            Req::Restore(vec![pb::RestoreRequest {
                backup_chunk: Bytes::from_static(b"CIPHERDB"),
            }])
        },
        FailedPrecondition,
        "ALREADY_INITIALIZED",
    ),
    auth_row(
        "no credential: start a rekey",
        |_| None,
        |_| Req::Rekey(rekey_start()),
        Unauthenticated,
        UNAUTH,
    ),
    auth_row(
        "clinician: create a token",
        |f| bearer(&f.clinician),
        |_| {
            Req::CreateToken(pb::CreateTokenRequest {
                policies: vec!["clinician".into()],
                ..Default::default()
            })
        },
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "token admin: grant a policy it does not hold",
        |f| bearer(&f.token_admin),
        |_| {
            Req::CreateToken(pb::CreateTokenRequest {
                policies: vec!["root".into()],
                ..Default::default()
            })
        },
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "clinician: write a policy",
        |f| bearer(&f.clinician),
        |_| write_policy("mine", CLINICIAN_POLICY),
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "clinician: audit hash",
        |f| bearer(&f.clinician),
        |_| {
            Req::AuditHash(pb::HashRequest {
                value: Bytes::from_static(b"x"),
            })
        },
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "reader: a token for another policy decrypts",
        |f| bearer(&f.reader),
        |f| dec_with(f.ct.clone(), "patients", "treatment", ""),
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "reader: key metadata outside its globs",
        |f| bearer(&f.reader),
        |_| {
            Req::Get(pb::GetKeyRequest {
                name: "patients".into(),
            })
        },
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "etl: rewrap into an exportable key without decrypt on the source",
        |f| bearer(&f.etl),
        |f| {
            Req::Rewrap(pb::RewrapRequest {
                key: "patients".into(),
                ciphertext: f.ct.clone(),
                destination_key: "exportable".into(),
                ..Default::default()
            })
        },
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "etl: rewrap into a key it may not encrypt under",
        |f| bearer(&f.etl),
        |f| {
            Req::Rewrap(pb::RewrapRequest {
                key: "patients".into(),
                ciphertext: f.ct.clone(),
                destination_key: "secret-notes".into(),
                ..Default::default()
            })
        },
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "etl: rewrap a key it may not rewrap",
        |f| bearer(&f.etl),
        |f| {
            Req::Rewrap(pb::RewrapRequest {
                key: "clinic-a".into(),
                ciphertext: f.ct_clinic.clone(),
                ..Default::default()
            })
        },
        PermissionDenied,
        DENIED,
    ),
    auth_row(
        "JWT subject that no role names",
        |f| bearer(&f.issuer.token(JwtAlg::ES256, "nobody")),
        enc_patients,
        PermissionDenied,
        DENIED,
    ),
    // Policy documents that must not be stored.
    auth_row(
        "policy with bad TOML syntax",
        |f| bearer(&f.root),
        |_| write_policy("p1", "[[rule]\nkeys = "),
        InvalidArgument,
        BAD_POLICY,
    ),
    auth_row(
        "policy with an unknown operation",
        |f| bearer(&f.root),
        |_| {
            write_policy(
                "p2",
                "[[rule]]\nkeys = [\"a\"]\noperations = [\"encryp\"]\n",
            )
        },
        InvalidArgument,
        BAD_POLICY,
    ),
    auth_row(
        "policy with an unknown field",
        |f| bearer(&f.root),
        |_| {
            write_policy(
                "p3",
                "[[rule]]\nkeys = [\"a\"]\noperations = [\"encrypt\"]\nallow_all = true\n",
            )
        },
        InvalidArgument,
        BAD_POLICY,
    ),
    auth_row(
        "policy with purposes on encrypt",
        |f| bearer(&f.root),
        |_| {
            write_policy(
                "p4",
                "[[rule]]\nkeys = [\"a\"]\noperations = [\"encrypt\"]\npurposes = [\"treatment\"]\n",
            )
        },
        InvalidArgument,
        BAD_POLICY,
    ),
    auth_row(
        "policy with an empty key glob",
        |f| bearer(&f.root),
        |_| {
            write_policy(
                "p5",
                "[[rule]]\nkeys = [\"\"]\noperations = [\"encrypt\"]\n",
            )
        },
        InvalidArgument,
        BAD_POLICY,
    ),
    auth_row(
        "policy without rules",
        |f| bearer(&f.root),
        |_| write_policy("p6", ""),
        InvalidArgument,
        BAD_POLICY,
    ),
    auth_row(
        "policy named root",
        |f| bearer(&f.root),
        |_| write_policy("root", CLINICIAN_POLICY),
        InvalidArgument,
        BAD_POLICY,
    ),
    auth_row(
        "token with a TTL over auth.max_token_ttl_s",
        |f| bearer(&f.root),
        |_| {
            Req::CreateToken(pb::CreateTokenRequest {
                policies: vec!["clinician".into()],
                ttl_seconds: 10 * 365 * 24 * 3600,
                ..Default::default()
            })
        },
        InvalidArgument,
        IA,
    ),
    auth_row(
        "token with no policy",
        |f| bearer(&f.root),
        |_| Req::CreateToken(pb::CreateTokenRequest::default()),
        InvalidArgument,
        IA,
    ),
];

/// Every auth row is refused with its code and reason, over TLS; storage is
/// unchanged; denied calls appear in the audit log; and what the policies do
/// allow (a JWT through a role, break-glass with a reason) still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auth_catalogue_is_refused_and_changes_nothing() {
    use cipherd_test_support::pki::{Ca, write_leaf};
    assert!(
        AUTH_ROWS.len() >= 45,
        "the auth catalogue has {} rows",
        AUTH_ROWS.len()
    );
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let ca = Ca::new("hospital test ca");
    let mut params = cipherd_e2e::Params::for_data_dir(&data, true);
    params.tls = Some(write_leaf(dir.path(), &ca.server(1)));
    let issuer = cipherd_test_support::jwt::TestIssuer::new();
    params.jwt = Some(cipherd_server::auth::jwt::JwtParams {
        jwks_file: issuer.jwks_path().to_owned(),
        issuer: issuer.issuer.clone(),
        audience: vec![issuer.audience.clone()],
        principal_claim: "sub".into(),
        groups_claim: "groups".into(),
        clock_skew: std::time::Duration::from_secs(60),
    });
    let server = TestServer::start_with_tls(
        params,
        Some(cipherd_client::TlsOptions::new(ca.pem.as_bytes()).with_domain("localhost")),
    )
    .await;
    let root = server.client().await;
    let anonymous = server.anonymous_client().await;
    let fixture = auth_fixture(&server, &root, issuer).await;
    let channel = anonymous.transport();

    let db = data.join("cipherd.db");
    let before = storage_digest(&db, 5).await;
    let mut failures = Vec::new();
    for row in AUTH_ROWS {
        let header = (row.authorization)(&fixture);
        let outcome = send_as(
            &anonymous,
            &channel,
            (row.request)(&fixture),
            header.as_deref(),
        )
        .await;
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
        "{} of {} auth rows:\n{}",
        failures.len(),
        AUTH_ROWS.len(),
        failures.join("\n")
    );
    assert_eq!(
        storage_digest(&db, 5).await,
        before,
        "a refused call changed storage"
    );

    // What the policies allow still works: a JWT through its role, with the
    // purpose its rule lists; break-glass with a reason.
    let jwt = anonymous
        .with_token(&cipherd_client::Token::from(
            fixture.issuer.token(JwtAlg::RS256, "svc-ehr-1"),
        ))
        .unwrap();
    let plain = reply(
        jwt.transit()
            .decrypt(pb::DecryptRequest {
                key: "patients".into(),
                ciphertext: fixture.ct.clone(),
                purpose: "treatment".into(),
                ..Default::default()
            })
            .await,
    )
    .expect("a JWT subject bound to the clinician policy by a role decrypts for treatment")
    .plaintext;
    assert_eq!(plain, &b"fixture"[..]);
    let clinician = anonymous
        .with_token(&cipherd_client::Token::from(fixture.clinician.as_str()))
        .unwrap();
    reply(
        clinician
            .transit()
            .decrypt(pb::DecryptRequest {
                key: "patients".into(),
                ciphertext: fixture.ct.clone(),
                purpose: "emergency".into(),
                reason: "patient unconscious in ED bay 4".into(),
                ..Default::default()
            })
            .await,
    )
    .expect("break-glass with a reason");

    // The audit log holds the denials and flags the break-glass call.
    server.stop().await;
    let log = std::fs::read_to_string(data.join(cipherd_server::audit::DEV_AUDIT_FILE)).unwrap();
    let records: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let denied = records
        .iter()
        .filter(|r| r["outcome"]["code"] == "PERMISSION_DENIED")
        .count();
    let unauthenticated = records
        .iter()
        .filter(|r| r["outcome"]["code"] == "UNAUTHENTICATED")
        .count();
    assert!(
        denied >= 25 && unauthenticated >= 15,
        "{denied} denied, {unauthenticated} unauthenticated"
    );
    let glass: Vec<_> = records
        .iter()
        .filter(|r| r["break_glass"] == true)
        .collect();
    assert_eq!(glass.len(), 1, "one break-glass call");
    assert_eq!(glass[0]["purpose"], "emergency");
    assert_eq!(glass[0]["reason"], "patient unconscious in ED bay 4");
    assert_eq!(glass[0]["principal"], "clinician (test)");
    let via_jwt = records
        .iter()
        .find(|r| r["auth_method"] == "jwt" && r["outcome"]["code"] == "OK")
        .expect("the JWT call is audited");
    assert_eq!(via_jwt["principal"], "svc-ehr-1");
    assert_eq!(via_jwt["policies"], json!(["clinician"]));
    for r in &records {
        assert!(
            r.get("seq").is_some() && r.get("prev").is_some(),
            "chained: {r}"
        );
    }
}

async fn auth_fixture(
    server: &TestServer,
    root: &Client,
    issuer: cipherd_test_support::jwt::TestIssuer,
) -> AuthFixture {
    for (name, exportable) in [
        ("patients", false),
        ("clinic-a", false),
        ("secret-notes", false),
        ("exportable", true),
    ] {
        create_key_with(
            root,
            pb::CreateKeyRequest {
                name: name.into(),
                exportable,
                ..Default::default()
            },
        )
        .await;
    }
    for (name, doc) in [
        ("clinician", CLINICIAN_POLICY),
        ("etl", ETL_POLICY),
        ("reader", READER_POLICY),
        ("token-admin", TOKEN_ADMIN_POLICY),
    ] {
        root.write_policy(name, doc).await.unwrap();
    }
    root.write_role(pb::Role {
        name: "ehr-services".into(),
        principals: vec!["svc-ehr-*".into()],
        groups: vec![],
        policies: vec!["clinician".into()],
    })
    .await
    .unwrap();
    let token = async |policy: &str, name: &str, ttl: Option<std::time::Duration>| {
        root.create_token(vec![policy.to_owned()], ttl, name)
            .await
            .unwrap()
            .token
            .expose_secret()
            .to_owned()
    };
    let revoked = token("clinician", "revoked", None).await;
    let accessor = &revoked[4..28];
    root.revoke_token(accessor).await.unwrap();
    let expired = token(
        "clinician",
        "short-lived",
        Some(std::time::Duration::from_secs(1)),
    )
    .await;
    // Poll until the short-lived token is refused (its expiry is whole seconds).
    let short = server
        .anonymous_client()
        .await
        .with_token(&cipherd_client::Token::from(expired.as_str()))
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match reply(short.transit().encrypt(enc("patients", b"x")).await) {
            Err(e) if e.reason() == Some("UNAUTHENTICATED") => break,
            _ if std::time::Instant::now() > deadline => panic!("the 1 s token never expired"),
            _ => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
    let ct = encrypt(root, "patients", b"fixture").await.ciphertext;
    let ct_clinic = encrypt(root, "clinic-a", b"fixture").await.ciphertext;
    AuthFixture {
        root: server.root_token().unwrap(),
        clinician: token("clinician", "clinician (test)", None).await,
        etl: token("etl", "etl job", None).await,
        reader: token("reader", "reader", None).await,
        token_admin: token("token-admin", "token admin", None).await,
        revoked,
        expired,
        issuer,
        ct,
        ct_clinic,
    }
}

fn rekey_start() -> pb::RekeyRequest {
    pb::RekeyRequest {
        action: Some(pb::rekey_request::Action::Start(pb::RekeyStart {
            shares: 1,
            threshold: 1,
        })),
        nonce: String::new(),
    }
}
