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
//! - for derived vectors, recomputes the working key with the RustCrypto `hkdf`
//!   crate (independent of the aws-lc-rs HKDF that `cipherd-core` runs) for the
//!   vector's `derivation`, and through `NamedKey::working_material` of a key
//!   loaded from a stored record (a legacy record, without a `derivation` field,
//!   for derivation 1), and opens the vector's ciphertext with that working key.
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
    secret::{Derivation, KeyMaterial},
};

const DOC: &str = include_str!("../../../docs/ciphertext-format.md");

const VECTOR_FIELDS: &[&str] = &[
    "name",
    "key_type",
    "material",
    "context",
    "derivation",
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
    let mut derived = BTreeMap::new();
    for block in &blocks {
        let vector = Vector::from_block(block);
        vector.check();
        *per_type.entry(vector.key_type.as_str()).or_default() += 1;
        if let Some(d) = &vector.derived {
            *derived.entry(d.derivation.number()).or_insert(0) += 1;
        }
    }
    for key_type in KeyType::ALL {
        assert!(
            per_type.contains_key(key_type.as_str()),
            "no vector for {key_type}"
        );
    }
    for number in [1, 2] {
        assert!(
            derived.contains_key(&number),
            "no derived-key vector for derivation {number}"
        );
    }
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
    /// For derived keys; `key` is then the derived key.
    derived: Option<Derived>,
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
        let derived = match (
            block.get("material"),
            block.get("context"),
            block.get("derivation"),
        ) {
            (Some(m), Some(c), Some(d)) => Some(Derived {
                material: bytes(m),
                context: bytes(c),
                derivation: Derivation::from_number(d.parse().unwrap())
                    .unwrap_or_else(|| panic!("{name}: unknown derivation {d}")),
            }),
            (None, None, None) => None,
            _ => panic!("{name}: material, context and derivation go together"),
        };
        Self {
            key_type: block["key_type"].parse().unwrap(),
            derived,
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
        if let Some(d) = &self.derived {
            assert_eq!(
                hex::encode(hkdf_rustcrypto(d)),
                hex::encode(&self.key),
                "{name}: derived key"
            );
            let working = derived_via_keyring(self.key_type, self.version, d);
            assert_eq!(
                working.expose_secret()[..],
                self.key[..],
                "{name}: NamedKey::working_material"
            );
            // The stored key decrypts the vector's ciphertext.
            let stored = AeadKey::new(self.key_type, &working).unwrap();
            let binary = hex::decode(&self.binary).unwrap();
            let ct = Ciphertext::parse(&binary).unwrap();
            assert_eq!(
                ciphertext::open(&stored, &ct, &self.associated_data).unwrap(),
                self.plaintext,
                "{name}: opened with the stored key"
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

/// A derived vector's inputs.
struct Derived {
    material: Vec<u8>,
    context: Vec<u8>,
    derivation: Derivation,
}

/// The working key per docs/ciphertext-format.md, computed with the RustCrypto
/// `hkdf` crate (`cipherd-core` runs aws-lc-rs):
/// 1: HKDF-SHA256(salt = none, ikm = material, info = label || context);
/// 2: HKDF-Expand-SHA256(PRK = material, info = u16 BE len(label) || label || context).
fn hkdf_rustcrypto(d: &Derived) -> Vec<u8> {
    let mut out = vec![0u8; 32];
    match d.derivation {
        Derivation::V1 => hkdf::Hkdf::<sha2::Sha256>::new(None, &d.material)
            .expand_multi_info(&[DERIVED_KEY_LABEL, &d.context], &mut out)
            .unwrap(),
        Derivation::V2 => {
            let label_len = u16::try_from(DERIVED_KEY_LABEL.len())
                .unwrap()
                .to_be_bytes();
            hkdf::Hkdf::<sha2::Sha256>::from_prk(&d.material)
                .unwrap()
                .expand_multi_info(&[&label_len, DERIVED_KEY_LABEL, &d.context], &mut out)
                .unwrap()
        }
    }
    out
}

/// The working key as the keyring computes it, for a derived key whose only
/// version is `version`, loaded from a stored record: a legacy one (no
/// `derivation` field) for derivation 1, as records were written before
/// derivations were versioned.
fn derived_via_keyring(key_type: KeyType, version: KeyVersion, d: &Derived) -> KeyMaterial {
    let v = version.get();
    let mut stored_version = serde_json::json!({
        "version": v,
        "created_at_ms": 0,
        "material": base64::engine::general_purpose::STANDARD.encode(&d.material),
    });
    if d.derivation != Derivation::V1 {
        stored_version["derivation"] = d.derivation.number().into();
    }
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
        "versions": [stored_version],
    });
    let key = NamedKey::from_record(&serde_json::to_vec(&record).unwrap()).unwrap();
    assert_eq!(key.derivation(version).unwrap(), d.derivation);
    key.working_material(version, &d.context).unwrap()
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
