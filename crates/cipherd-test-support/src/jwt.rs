//! An identity provider in a box, for JWT tests: RS256, ES256 and EdDSA key
//! pairs generated in the test, their JWKS written to a temporary file, and
//! tokens minted with chosen claims and headers, including hostile ones
//! (`alg: none`, HS256 keyed with the RSA public key, a foreign signer).
//!
//! Tokens are assembled and signed here with aws-lc-rs directly, independently
//! of the `jsonwebtoken` crate the server verifies with, so a test that passes
//! is two implementations agreeing.

use std::{
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use aws_lc_rs::{
    encoding::AsDer,
    hmac,
    rand::SystemRandom,
    rsa::{KeySize, PublicKeyComponents},
    signature::{
        ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RSA_PKCS1_SHA256,
        RsaKeyPair,
    },
};
use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use serde_json::{Value, json};

/// The algorithms the server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtAlg {
    /// RSASSA-PKCS1-v1_5 with SHA-256, 2048-bit key.
    RS256,
    /// ECDSA on P-256 with SHA-256.
    ES256,
    /// Ed25519.
    EdDSA,
}

impl JwtAlg {
    /// The header `alg` value.
    pub fn as_str(self) -> &'static str {
        match self {
            JwtAlg::RS256 => "RS256",
            JwtAlg::ES256 => "ES256",
            JwtAlg::EdDSA => "EdDSA",
        }
    }
}

/// One signing key pair with its `kid`.
pub struct TestKey {
    kid: String,
    alg: JwtAlg,
    pair: Pair,
}

enum Pair {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
}

impl TestKey {
    /// A fresh key pair.
    pub fn generate(alg: JwtAlg, kid: impl Into<String>) -> Self {
        let pair = match alg {
            JwtAlg::RS256 => Pair::Rsa(RsaKeyPair::generate(KeySize::Rsa2048).expect("RSA keygen")),
            JwtAlg::ES256 => Pair::Ec(
                EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("P-256 keygen"),
            ),
            JwtAlg::EdDSA => Pair::Ed(Ed25519KeyPair::generate().expect("Ed25519 keygen")),
        };
        Self {
            kid: kid.into(),
            alg,
            pair,
        }
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The algorithm.
    pub fn alg(&self) -> JwtAlg {
        self.alg
    }

    /// The public key as a JWK (with `kid`, `use: sig` and `alg`).
    pub fn public_jwk(&self) -> Value {
        let b64 = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
        let mut jwk = match &self.pair {
            Pair::Rsa(pair) => {
                let c = PublicKeyComponents::<Vec<u8>>::from(pair.public_key());
                json!({"kty": "RSA", "n": b64(&c.n), "e": b64(&c.e)})
            }
            Pair::Ec(pair) => {
                let point = pair.public_key().as_ref();
                json!({"kty": "EC", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..])})
            }
            Pair::Ed(pair) => {
                json!({"kty": "OKP", "crv": "Ed25519", "x": b64(pair.public_key().as_ref())})
            }
        };
        jwk["kid"] = json!(self.kid);
        jwk["use"] = json!("sig");
        jwk["alg"] = json!(self.alg.as_str());
        jwk
    }

    /// The public key as SubjectPublicKeyInfo DER (the bytes an algorithm
    /// confusion attack feeds to HMAC).
    pub fn public_key_der(&self) -> Vec<u8> {
        match &self.pair {
            Pair::Rsa(pair) => pair.public_key().as_der().expect("SPKI").as_ref().to_vec(),
            Pair::Ec(pair) => pair.public_key().as_der().expect("SPKI").as_ref().to_vec(),
            Pair::Ed(pair) => pair.public_key().as_der().expect("SPKI").as_ref().to_vec(),
        }
    }

    /// The public key as a PEM `PUBLIC KEY` block (what the classic HS256
    /// confusion attack uses as the HMAC secret).
    pub fn public_key_pem(&self) -> String {
        let body = STANDARD.encode(self.public_key_der());
        let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
        for line in body.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            pem.push('\n');
        }
        pem.push_str("-----END PUBLIC KEY-----\n");
        pem
    }

    /// Signs `message` with this key's algorithm (JWS signature bytes).
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &self.pair {
            Pair::Rsa(pair) => {
                let mut signature = vec![0; pair.public_modulus_len()];
                pair.sign(&RSA_PKCS1_SHA256, &rng, message, &mut signature)
                    .expect("RSA sign");
                signature
            }
            Pair::Ec(pair) => pair
                .sign(&rng, message)
                .expect("ECDSA sign")
                .as_ref()
                .to_vec(),
            Pair::Ed(pair) => pair.sign(message).as_ref().to_vec(),
        }
    }

    /// A token with the standard header (`alg`, `typ`, `kid`) signed by this key.
    pub fn mint(&self, claims: &Value) -> String {
        self.mint_with_header(
            &json!({"alg": self.alg.as_str(), "typ": "JWT", "kid": self.kid}),
            claims,
        )
    }

    /// A token with `header` exactly as given, signed by this key whatever the
    /// header says.
    pub fn mint_with_header(&self, header: &Value, claims: &Value) -> String {
        let message = signing_input(header, claims);
        let signature = self.sign(message.as_bytes());
        format!("{message}.{}", URL_SAFE_NO_PAD.encode(signature))
    }
}

/// `base64url(header) . base64url(claims)`.
pub fn signing_input(header: &Value, claims: &Value) -> String {
    let part = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).expect("JSON"));
    format!("{}.{}", part(header), part(claims))
}

/// An unsigned token (`alg: none` style): `header.claims.` with an empty
/// signature.
pub fn mint_unsigned(header: &Value, claims: &Value) -> String {
    format!("{}.", signing_input(header, claims))
}

/// A token MACed with HMAC-SHA256 under `secret`, e.g. an RSA public key's PEM
/// or DER (the algorithm confusion attack).
pub fn mint_hs256(header: &Value, claims: &Value, secret: &[u8]) -> String {
    let message = signing_input(header, claims);
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, secret),
        message.as_bytes(),
    );
    format!("{message}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

/// Seconds since the Unix epoch, now.
pub fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// An issuer with one key of each algorithm (kids `rs256-1`, `es256-1`,
/// `eddsa-1`) and its JWKS in a temporary file.
pub struct TestIssuer {
    /// The `iss` its tokens carry.
    pub issuer: String,
    /// The `aud` its tokens carry.
    pub audience: String,
    keys: Vec<TestKey>,
    jwks_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Default for TestIssuer {
    fn default() -> Self {
        Self::new()
    }
}

impl TestIssuer {
    /// Generates the keys and writes the JWKS file.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let issuer = Self {
            issuer: "https://idp.hospital.test/realms/clinical".into(),
            audience: "cipherd".into(),
            keys: vec![
                TestKey::generate(JwtAlg::RS256, "rs256-1"),
                TestKey::generate(JwtAlg::ES256, "es256-1"),
                TestKey::generate(JwtAlg::EdDSA, "eddsa-1"),
            ],
            jwks_path: dir.path().join("jwks.json"),
            _dir: dir,
        };
        issuer.write_jwks();
        issuer
    }

    /// The JWKS file (for `jwt.jwks_file`).
    pub fn jwks_path(&self) -> &Path {
        &self.jwks_path
    }

    /// The first key of `alg`.
    pub fn key(&self, alg: JwtAlg) -> &TestKey {
        self.keys
            .iter()
            .find(|k| k.alg == alg)
            .expect("one key of each algorithm")
    }

    /// All keys, in JWKS order.
    pub fn keys(&self) -> &[TestKey] {
        &self.keys
    }

    /// Adds a key (not yet in the file: call [`Self::write_jwks`]).
    pub fn add_key(&mut self, key: TestKey) -> &TestKey {
        self.keys.push(key);
        self.keys.last().expect("just pushed")
    }

    /// The public JWK set of all keys.
    pub fn jwks(&self) -> Value {
        json!({"keys": self.keys.iter().map(TestKey::public_jwk).collect::<Vec<_>>()})
    }

    /// Writes [`Self::jwks`] to the file, atomically (a reader never sees half).
    pub fn write_jwks(&self) {
        self.write_raw_jwks(&serde_json::to_vec_pretty(&self.jwks()).expect("JSON"));
    }

    /// Writes `content` to the JWKS file as is, atomically.
    pub fn write_raw_jwks(&self, content: &[u8]) {
        let temp = self.jwks_path.with_extension("json.tmp");
        std::fs::write(&temp, content).expect("write JWKS");
        std::fs::rename(&temp, &self.jwks_path).expect("rename JWKS");
    }

    /// Claims valid for five minutes: `iss`, `aud`, `sub`, `iat`, `exp`.
    pub fn claims(&self, subject: &str) -> Value {
        let now = now_s();
        json!({
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            "iat": now,
            "exp": now + 300,
        })
    }

    /// A valid token for `subject` signed with the key of `alg`.
    pub fn token(&self, alg: JwtAlg, subject: &str) -> String {
        self.key(alg).mint(&self.claims(subject))
    }

    /// A token with `claims`, signed with the key of `alg`, standard header.
    pub fn mint(&self, alg: JwtAlg, claims: &Value) -> String {
        self.key(alg).mint(claims)
    }

    /// A token with `header` as given, signed with the key of `alg`.
    pub fn mint_with_header(&self, alg: JwtAlg, header: &Value, claims: &Value) -> String {
        self.key(alg).mint_with_header(header, claims)
    }
}
