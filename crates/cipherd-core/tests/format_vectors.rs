//! Checks the test vectors printed in `docs/ciphertext-format.md`, read from the
//! markdown itself so that the document and the code cannot drift apart.
//!
//! The document holds fenced blocks tagged `cipherd-vector` (positive) and
//! `cipherd-negative` (must fail), each a list of `field: value` lines. Byte fields
//! are hex, or ASCII in double quotes; an empty value is empty bytes.
//!
//! For every positive vector this test:
//! - recomputes the body with `aead::danger::seal_with_nonce_append` under
//!   `AAD = header || associated_data`, and checks `binary` and `text` exactly;
//! - recomputes the body with an independent RustCrypto implementation
//!   (`xaes-256-gcm`, `aes-gcm`, `chacha20poly1305`), so the vectors are not merely
//!   self-consistent;
//! - parses both encodings, checks the version, converts each into the other, and
//!   opens both with `ciphertext::open`;
//! - for derived vectors, recomputes the working key with aws-lc-rs HKDF and through
//!   `NamedKey::working_material` (loaded from a key record).
//!
//! Every negative example must fail to parse or open with `DecryptionFailed`.
//!
//! When a vector's outputs are wrong (or written as `?` while drafting), the failure
//! message prints the computed block to paste into the document.
#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

use std::collections::BTreeMap;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use base64::Engine as _;
use cipherd_core::{
    Error, KeyType,
    aead::{AeadKey, danger},
    ciphertext::{self, Ciphertext, Encoding, HEADER_LEN},
    keyring::{DERIVED_KEY_LABEL, KeyVersion, NamedKey},
    secret::KeyMaterial,
};

const DOC: &str = include_str!("../../../docs/ciphertext-format.md");

const VECTOR_FIELDS: &[&str] = &[
    "name",
    "key_type",
    "material",
    "context",
    "key",
    "nonce",
    "version",
    "associated_data",
    "plaintext",
    "binary",
    "text",
];

const NEGATIVE_FIELDS: &[&str] = &[
    "name",
    "mutation_of",
    "key_type",
    "key",
    "associated_data",
    "input_hex",
    "input_text",
];

#[test]
fn document_vectors_hold() {
    let blocks = blocks("cipherd-vector");
    assert!(!blocks.is_empty(), "no cipherd-vector blocks found");
    let mut per_type: BTreeMap<&str, usize> = BTreeMap::new();
    let mut derived = 0;
    for block in &blocks {
        let vector = Vector::from_block(block);
        vector.check();
        *per_type.entry(vector.key_type.as_str()).or_default() += 1;
        derived += usize::from(vector.material.is_some());
    }
    for key_type in KeyType::ALL {
        assert!(
            per_type.contains_key(key_type.as_str()),
            "no vector for {key_type}"
        );
    }
    assert!(derived >= 1, "no derived-key vector");
}

#[test]
fn document_negative_examples_fail() {
    let vectors: BTreeMap<String, Vector> = blocks("cipherd-vector")
        .iter()
        .map(Vector::from_block)
        .map(|v| (v.name.clone(), v))
        .collect();
    let blocks = blocks("cipherd-negative");
    assert!(blocks.len() >= 5, "expected at least 5 negative examples");
    for block in &blocks {
        let name = &block["name"];
        let key_type: KeyType = block["key_type"].parse().unwrap();
        let key_bytes = bytes(&block["key"]);
        let ad = bytes(&block["associated_data"]);
        let input = match (block.get("input_hex"), block.get("input_text")) {
            (Some(hex), None) => bytes(hex),
            (None, Some(text)) => text.as_bytes().to_vec(),
            _ => panic!("{name}: exactly one of input_hex and input_text is required"),
        };

        // The example must be exactly one change away from a valid vector, so it
        // fails for the reason it states and not for an unrelated typo.
        let base = vectors
            .get(&block["mutation_of"])
            .unwrap_or_else(|| panic!("{name}: mutation_of names no vector"));
        let changes = [
            input != hex::decode(&base.binary).unwrap() && input != base.text.as_bytes(),
            key_bytes != base.key,
            key_type != base.key_type,
            ad != base.associated_data,
        ];
        assert_eq!(
            changes.iter().filter(|c| **c).count(),
            1,
            "{name}: must differ from {:?} in exactly one of input, key, key type, \
             associated data (differs: {changes:?})",
            base.name
        );

        let key = AeadKey::new(key_type, &material(&key_bytes)).unwrap();
        let result = Ciphertext::parse(&input).and_then(|ct| ciphertext::open(&key, &ct, &ad));
        assert_eq!(
            result,
            Err(Error::DecryptionFailed),
            "negative example {name:?}"
        );
    }
}

/// A positive vector as written in the document.
struct Vector {
    name: String,
    key_type: KeyType,
    /// `(material, context)` for derived keys; `key` is then the derived key.
    material: Option<(Vec<u8>, Vec<u8>)>,
    key: Vec<u8>,
    nonce: Vec<u8>,
    version: KeyVersion,
    associated_data: Vec<u8>,
    plaintext: Vec<u8>,
    binary: String,
    text: String,
}

impl Vector {
    fn from_block(block: &BTreeMap<String, String>) -> Self {
        for field in block.keys() {
            assert!(
                VECTOR_FIELDS.contains(&field.as_str()),
                "unknown field {field}"
            );
        }
        let name = block["name"].clone();
        let material = match (block.get("material"), block.get("context")) {
            (Some(m), Some(c)) => Some((bytes(m), bytes(c))),
            (None, None) => None,
            _ => panic!("{name}: material and context go together"),
        };
        Self {
            key_type: block["key_type"].parse().unwrap(),
            material,
            key: bytes(&block["key"]),
            nonce: bytes(&block["nonce"]),
            version: KeyVersion::new(block["version"].parse().unwrap()).unwrap(),
            associated_data: bytes(&block["associated_data"]),
            plaintext: bytes(&block["plaintext"]),
            binary: block["binary"].clone(),
            text: block["text"].clone(),
            name,
        }
    }

    fn check(&self) {
        let name = &self.name;
        if let Some((material, context)) = &self.material {
            assert_eq!(
                hkdf_aws_lc(material, context),
                self.key,
                "{name}: derived key"
            );
            assert_eq!(
                derived_via_keyring(self.key_type, self.version, material, context),
                self.key,
                "{name}: NamedKey::working_material"
            );
        }

        let key = AeadKey::new(self.key_type, &material(&self.key)).unwrap();
        let mut aad = vec![ciphertext::FORMAT_V1];
        aad.extend_from_slice(&self.version.get().to_be_bytes());
        aad.extend_from_slice(&self.associated_data);

        let mut binary = aad[..HEADER_LEN].to_vec();
        danger::seal_with_nonce_append(&key, &self.nonce, &aad, &self.plaintext, &mut binary)
            .unwrap();
        let body = &binary[HEADER_LEN..];
        let text = format!(
            "cipherd:v{}:{}",
            self.version,
            base64::engine::general_purpose::STANDARD.encode(body)
        );
        let computed = format!("binary: {}\ntext: {text}", hex::encode(&binary));
        assert_eq!(
            (hex::encode(&binary), text.as_str()),
            (self.binary.clone(), self.text.as_str()),
            "{name}: document differs from computed values:\n{computed}"
        );
        assert_eq!(
            independent_body(self.key_type, &self.key, &self.nonce, &aad, &self.plaintext),
            body,
            "{name}: RustCrypto disagrees"
        );

        for (encoding, input) in [
            (Encoding::Binary, binary.clone()),
            (Encoding::Text, text.clone().into_bytes()),
        ] {
            let ct = Ciphertext::parse(&input).unwrap();
            assert_eq!(ct.version(), self.version, "{name}");
            assert_eq!(ct.encode(Encoding::Binary), binary, "{name} {encoding:?}");
            assert_eq!(
                ct.encode(Encoding::Text),
                text.as_bytes(),
                "{name} {encoding:?}"
            );
            assert_eq!(
                ciphertext::open(&key, &ct, &self.associated_data).unwrap(),
                self.plaintext,
                "{name} {encoding:?}"
            );
        }
    }
}

/// Fenced blocks with the given info string, as field maps.
fn blocks(tag: &str) -> Vec<BTreeMap<String, String>> {
    let fields = if tag == "cipherd-vector" {
        VECTOR_FIELDS
    } else {
        NEGATIVE_FIELDS
    };
    let mut out = Vec::new();
    let mut current: Option<BTreeMap<String, String>> = None;
    for (n, line) in DOC.lines().enumerate() {
        let line_no = n + 1;
        match &mut current {
            None if line.trim_end() == format!("```{tag}") => current = Some(BTreeMap::new()),
            None => {}
            Some(_) if line.trim_end() == "```" => out.extend(current.take()),
            Some(block) => {
                let (field, value) = line
                    .split_once(':')
                    .unwrap_or_else(|| panic!("line {line_no}: expected `field: value`"));
                assert!(
                    fields.contains(&field),
                    "line {line_no}: unknown field {field:?} in a {tag} block"
                );
                let previous = block.insert(field.to_owned(), value.trim().to_owned());
                assert!(previous.is_none(), "line {line_no}: {field} given twice");
            }
        }
    }
    assert!(current.is_none(), "unterminated {tag} block");
    out
}

/// Hex, or ASCII in double quotes.
fn bytes(value: &str) -> Vec<u8> {
    match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(ascii) => ascii.as_bytes().to_vec(),
        None => hex::decode(value).unwrap_or_else(|e| panic!("bad hex {value:?}: {e}")),
    }
}

fn material(key: &[u8]) -> KeyMaterial {
    KeyMaterial::from_slice(key).unwrap()
}

/// HKDF-SHA256 (empty salt, info = label || context) on aws-lc-rs, independent of
/// the RustCrypto `hkdf` crate that `cipherd-core` uses.
fn hkdf_aws_lc(material: &[u8], context: &[u8]) -> Vec<u8> {
    use aws_lc_rs::hkdf::{HKDF_SHA256, Salt};
    let prk = Salt::new(HKDF_SHA256, &[]).extract(material);
    let info = [DERIVED_KEY_LABEL, context];
    let okm = prk.expand(&info, HKDF_SHA256).unwrap();
    let mut out = vec![0u8; 32];
    okm.fill(&mut out).unwrap();
    out
}

/// The working key as the keyring computes it, for a derived key whose only
/// version is `version` with `material`.
fn derived_via_keyring(
    key_type: KeyType,
    version: KeyVersion,
    material: &[u8],
    context: &[u8],
) -> Vec<u8> {
    let v = version.get();
    let record = serde_json::json!({
        "format": 1,
        "name": "vectors",
        "key_type": key_type,
        "derived": true,
        "exportable": false,
        "deletion_allowed": false,
        "created_at_ms": 0,
        "latest_version": v,
        "min_decryption_version": v,
        "min_encryption_version": 0,
        "min_available_version": v,
        "versions": [{
            "version": v,
            "created_at_ms": 0,
            "material": base64::engine::general_purpose::STANDARD.encode(material),
        }],
    });
    let key = NamedKey::from_record(&serde_json::to_vec(&record).unwrap()).unwrap();
    key.working_material(version, context)
        .unwrap()
        .expose_secret()
        .to_vec()
}

/// `nonce || ciphertext || tag` from RustCrypto.
fn independent_body(
    key_type: KeyType,
    key: &[u8],
    nonce: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Vec<u8> {
    let payload = Payload {
        msg: plaintext,
        aad,
    };
    let sealed = match key_type {
        KeyType::Xaes256Gcm => xaes_256_gcm::Xaes256Gcm::new_from_slice(key)
            .unwrap()
            .encrypt(nonce.try_into().unwrap(), payload),
        KeyType::Aes256Gcm96 => aes_gcm::Aes256Gcm::new_from_slice(key)
            .unwrap()
            .encrypt(nonce.try_into().unwrap(), payload),
        KeyType::ChaCha20Poly1305 => chacha20poly1305::ChaCha20Poly1305::new_from_slice(key)
            .unwrap()
            .encrypt(nonce.try_into().unwrap(), payload),
        KeyType::XChaCha20Poly1305 => chacha20poly1305::XChaCha20Poly1305::new_from_slice(key)
            .unwrap()
            .encrypt(nonce.try_into().unwrap(), payload),
    }
    .unwrap();
    [nonce, &sealed].concat()
}
