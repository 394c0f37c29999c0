//! Regenerates the committed code in `src/gen/` from `proto/` and fails on any
//! difference, so the `.proto` files and the Rust code cannot drift apart.
//!
//! Ordinary builds need no protoc: the generated code is committed. After editing a
//! `.proto` file run `CIPHERD_BLESS=1 cargo test -p cipherd-proto --test bootstrap`
//! to rewrite `src/gen/` and commit the result.

use std::path::{Path, PathBuf};

use prost::Message;

#[test]
fn generated_code_is_up_to_date() {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let proto_root = crate_dir.join("../../proto");
    let files = [
        "cipherd/v1/transit.proto",
        "cipherd/v1/keys.proto",
        "cipherd/v1/system.proto",
        "cipherd/v1/auth.proto",
    ];
    let fds = protox::compile(files, [&proto_root]).expect("protos compile");

    let out = tempfile::tempdir().expect("temp dir");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .emit_rerun_if_changed(false)
        // Zero-copy: bytes fields become `bytes::Bytes` sharing the request buffer.
        .bytes(".")
        .extern_path(".google.rpc", "::tonic_types::pb")
        // Malformed messages become INVALID_ARGUMENT with an ErrorInfo (src/codec.rs).
        .codec_path("crate::codec::ProtoCodec")
        // Messages that carry plaintext, key material or unseal shares get a
        // hand-written redacting Debug in `src/redact.rs` (invariant 1).
        .skip_debug(REDACTED_MESSAGES)
        .out_dir(out.path())
        .compile_fds(fds.clone())
        .expect("code generation");
    std::fs::write(
        out.path().join("cipherd_descriptor.bin"),
        fds.encode_to_vec(),
    )
    .expect("write descriptor");

    let gen_dir = crate_dir.join("src/gen");
    let mut stale = Vec::new();
    for name in ["cipherd.v1.rs", "cipherd_descriptor.bin"] {
        let fresh = std::fs::read(out.path().join(name)).expect("generated file");
        let committed_path = gen_dir.join(name);
        if std::fs::read(&committed_path).ok().as_deref() != Some(&fresh[..]) {
            if std::env::var_os("CIPHERD_BLESS").is_some() {
                std::fs::write(&committed_path, &fresh).expect("bless");
            } else {
                stale.push(committed_path);
            }
        }
    }
    assert!(
        stale.is_empty(),
        "generated code is stale: {stale:?}; run `CIPHERD_BLESS=1 cargo test -p cipherd-proto --test bootstrap` and commit"
    );
    assert_no_generated_debug_for(&gen_dir.join("cipherd.v1.rs"));
    assert_secret_fields_are_redacted(&fds);
}

/// Fully qualified names of messages whose Debug is hand-written and redacting.
const REDACTED_MESSAGES: [&str; 17] = [
    "cipherd.v1.EncryptRequest",
    "cipherd.v1.EncryptItem",
    "cipherd.v1.DecryptResponse",
    "cipherd.v1.PlaintextResult",
    "cipherd.v1.GenerateDataKeyResponse",
    "cipherd.v1.ExportKeyResponse",
    "cipherd.v1.ExportedKeyVersion",
    "cipherd.v1.InitResponse",
    "cipherd.v1.UnsealRequest",
    "cipherd.v1.CreateTokenResponse",
    "cipherd.v1.RekeyRequest",
    "cipherd.v1.RekeyResponse",
    "cipherd.v1.RotateRootRequest",
    "cipherd.v1.BackupResponse",
    "cipherd.v1.RestoreRequest",
    "cipherd.v1.BackupKeyResponse",
    "cipherd.v1.RestoreKeyRequest",
];

/// Names of `bytes` or `string` fields that carry plaintext, key material, unseal
/// shares or token secrets (a `uint32 shares` is a count, not a secret), and
/// backup bytes (encrypted, but a whole store's worth: logs get their size only).
const SECRET_FIELDS: [&str; 8] = [
    "plaintext",
    "backup_chunk",
    "key_backup",
    "material",
    "share",
    "shares",
    "token",
    "root_token",
];

/// Every message with a field named in [`SECRET_FIELDS`] (including inside a
/// oneof) must be in [`REDACTED_MESSAGES`]. Messages that only nest such messages
/// (`BatchEncryptRequest`, `EncryptStreamRequest`, ...) are covered through them.
fn assert_secret_fields_are_redacted(fds: &prost_types::FileDescriptorSet) {
    let mut missing = Vec::new();
    for file in &fds.file {
        let package = file.package();
        for message in &file.message_type {
            let full = format!("{package}.{}", message.name());
            let secret = message
                .field
                .iter()
                .any(|f| SECRET_FIELDS.contains(&f.name()) && is_text_or_bytes(f));
            if secret && !REDACTED_MESSAGES.contains(&full.as_str()) {
                missing.push(full);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "messages with secret fields need a redacting Debug in src/redact.rs and an entry in REDACTED_MESSAGES: {missing:?}"
    );
}

fn is_text_or_bytes(field: &prost_types::FieldDescriptorProto) -> bool {
    use prost_types::field_descriptor_proto::Type;
    matches!(field.r#type(), Type::Bytes | Type::String)
}

fn assert_no_generated_debug_for(path: &Path) {
    let code = std::fs::read_to_string(path).expect("generated code");
    for full in REDACTED_MESSAGES {
        let name = full.rsplit('.').next().expect("qualified name");
        let decl = format!("pub struct {name} {{");
        let at = code
            .find(&decl)
            .unwrap_or_else(|| panic!("{name} not generated"));
        let attr_line = code[..at].lines().next_back().expect("attribute line");
        assert_eq!(
            attr_line.trim(),
            "#[prost(skip_debug)]",
            "{name} must not get a generated Debug"
        );
    }
}
