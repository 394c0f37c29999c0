//! JWT verification against tokens minted independently (aws-lc-rs in
//! `cipherd-test-support`): the accepted algorithms, every claim check, the
//! hostile header catalogue, JWKS parsing and reloading.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use cipherd_server::auth::jwt::{
    JwksError, JwtError, JwtParams, JwtVerifier, MAX_TOKEN_BYTES, Reload,
};
use cipherd_test_support::jwt::{
    JwtAlg, TestIssuer, TestKey, mint_hs256, mint_unsigned, now_s, signing_input,
};
use serde_json::{Value, json};

const ALGS: [JwtAlg; 3] = [JwtAlg::RS256, JwtAlg::ES256, JwtAlg::EdDSA];

fn params(issuer: &TestIssuer) -> JwtParams {
    JwtParams {
        jwks_file: issuer.jwks_path().to_owned(),
        issuer: issuer.issuer.clone(),
        audience: vec![issuer.audience.clone()],
        principal_claim: "sub".into(),
        groups_claim: "groups".into(),
        clock_skew: Duration::from_secs(60),
    }
}

fn setup() -> (TestIssuer, JwtVerifier) {
    let issuer = TestIssuer::new();
    let verifier = JwtVerifier::new(&params(&issuer)).expect("JWKS loads");
    (issuer, verifier)
}

fn with(mut claims: Value, field: &str, value: Value) -> Value {
    claims[field] = value;
    claims
}

fn without(mut claims: Value, field: &str) -> Value {
    claims.as_object_mut().expect("object").remove(field);
    claims
}

#[test]
fn valid_tokens_of_each_algorithm() {
    let (issuer, verifier) = setup();
    for alg in ALGS {
        let identity = verifier
            .verify(&issuer.token(alg, "dr.house"))
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert_eq!(identity.subject, "dr.house");
        assert!(identity.groups.is_empty());
        let expires = identity.expires_at.expect("exp");
        let in_s = expires
            .duration_since(SystemTime::now())
            .expect("in the future")
            .as_secs();
        assert!((290..=300).contains(&in_s), "{in_s}");
    }
}

#[test]
fn groups_and_principal_claims() {
    let (issuer, verifier) = setup();
    let claims = with(
        issuer.claims("alice"),
        "groups",
        json!(["clinicians", "ward-3"]),
    );
    let id = verifier
        .verify(&issuer.mint(JwtAlg::ES256, &claims))
        .expect("valid");
    assert_eq!(
        id.groups,
        vec!["clinicians".to_owned(), "ward-3".to_owned()]
    );

    let one = with(issuer.claims("alice"), "groups", json!("clinicians"));
    let id = verifier
        .verify(&issuer.mint(JwtAlg::ES256, &one))
        .expect("valid");
    assert_eq!(id.groups, vec!["clinicians".to_owned()]);

    for bad in [json!([1, 2]), json!({"a": 1}), json!(7)] {
        let claims = with(issuer.claims("alice"), "groups", bad);
        assert!(matches!(
            verifier.verify(&issuer.mint(JwtAlg::ES256, &claims)),
            Err(JwtError::BadClaim(c)) if c == "groups"
        ));
    }
    for bad_sub in [json!(""), json!(42)] {
        let claims = with(issuer.claims("x"), "sub", bad_sub);
        assert!(matches!(
            verifier.verify(&issuer.mint(JwtAlg::ES256, &claims)),
            Err(JwtError::BadClaim(c)) if c == "sub"
        ));
    }
    let claims = without(issuer.claims("x"), "sub");
    assert!(matches!(
        verifier.verify(&issuer.mint(JwtAlg::ES256, &claims)),
        Err(JwtError::MissingClaim(c)) if c == "sub"
    ));

    // Another principal claim and groups claim.
    let custom = JwtVerifier::new(&JwtParams {
        principal_claim: "email".into(),
        groups_claim: "roles".into(),
        ..params(&issuer)
    })
    .expect("loads");
    let claims = with(
        with(
            issuer.claims("uuid-1"),
            "email",
            json!("alice@hospital.test"),
        ),
        "roles",
        json!(["billing"]),
    );
    let id = custom
        .verify(&issuer.mint(JwtAlg::EdDSA, &claims))
        .expect("valid");
    assert_eq!(id.subject, "alice@hospital.test");
    assert_eq!(id.groups, vec!["billing".to_owned()]);
}

#[test]
fn bad_signatures() {
    let (issuer, verifier) = setup();
    for alg in ALGS {
        // Signed by a key the JWKS does not have, under a kid it does.
        let forger = TestKey::generate(alg, issuer.key(alg).kid());
        let forged = forger.mint(&issuer.claims("mallory"));
        assert!(
            matches!(verifier.verify(&forged), Err(JwtError::BadSignature)),
            "{alg:?}"
        );
        // A genuine token whose claims were edited.
        let genuine = issuer.token(alg, "alice");
        let parts: Vec<&str> = genuine.split('.').collect();
        let edited_claims = signing_input(&json!({}), &issuer.claims("admin"));
        let edited_payload = edited_claims.split('.').nth(1).expect("two parts");
        let edited = format!("{}.{}.{}", parts[0], edited_payload, parts[2]);
        assert!(
            matches!(verifier.verify(&edited), Err(JwtError::BadSignature)),
            "{alg:?}"
        );
        // Truncated signature.
        let truncated = &genuine[..genuine.len() - 4];
        assert!(verifier.verify(truncated).is_err(), "{alg:?}");
    }
}

#[test]
fn issuer_and_audience() {
    let (issuer, verifier) = setup();
    let wrong_iss = with(issuer.claims("a"), "iss", json!("https://evil.test"));
    assert!(matches!(
        verifier.verify(&issuer.mint(JwtAlg::RS256, &wrong_iss)),
        Err(JwtError::WrongIssuer)
    ));
    let wrong_aud = with(issuer.claims("a"), "aud", json!("another-service"));
    assert!(matches!(
        verifier.verify(&issuer.mint(JwtAlg::RS256, &wrong_aud)),
        Err(JwtError::WrongAudience)
    ));
    let list_without = with(issuer.claims("a"), "aud", json!(["x", "y"]));
    assert!(matches!(
        verifier.verify(&issuer.mint(JwtAlg::RS256, &list_without)),
        Err(JwtError::WrongAudience)
    ));
    let list_with = with(issuer.claims("a"), "aud", json!(["x", "cipherd"]));
    assert!(
        verifier
            .verify(&issuer.mint(JwtAlg::RS256, &list_with))
            .is_ok()
    );
    for claim in ["iss", "aud", "exp"] {
        let missing = without(issuer.claims("a"), claim);
        assert!(
            matches!(
                verifier.verify(&issuer.mint(JwtAlg::RS256, &missing)),
                Err(JwtError::MissingClaim(c)) if c == claim
            ),
            "{claim}"
        );
    }
    // Configured with several audiences, any one will do.
    let several = JwtVerifier::new(&JwtParams {
        audience: vec!["other".into(), "cipherd-prod".into()],
        ..params(&issuer)
    })
    .expect("loads");
    let prod = with(issuer.claims("a"), "aud", json!("cipherd-prod"));
    assert!(several.verify(&issuer.mint(JwtAlg::RS256, &prod)).is_ok());
    assert!(matches!(
        several.verify(&issuer.token(JwtAlg::RS256, "a")),
        Err(JwtError::WrongAudience)
    ));
}

#[test]
fn expiry_and_not_before_with_clock_skew() {
    let (issuer, verifier) = setup();
    let now = now_s();
    let token = |field: &str, at: i64| {
        issuer.mint(JwtAlg::EdDSA, &with(issuer.claims("a"), field, json!(at)))
    };
    assert!(matches!(
        verifier.verify(&token("exp", now - 120)),
        Err(JwtError::Expired)
    ));
    assert!(
        verifier.verify(&token("exp", now - 30)).is_ok(),
        "within skew"
    );
    assert!(matches!(
        verifier.verify(&token("nbf", now + 120)),
        Err(JwtError::NotYetValid)
    ));
    assert!(
        verifier.verify(&token("nbf", now + 30)).is_ok(),
        "within skew"
    );
    assert!(verifier.verify(&token("nbf", now - 30)).is_ok());
    assert!(matches!(
        verifier.verify(&issuer.mint(
            JwtAlg::EdDSA,
            &with(issuer.claims("a"), "exp", json!("tomorrow"))
        )),
        Err(JwtError::MissingClaim(_) | JwtError::BadClaim(_))
    ));

    let strict = JwtVerifier::new(&JwtParams {
        clock_skew: Duration::ZERO,
        ..params(&issuer)
    })
    .expect("loads");
    assert!(matches!(
        strict.verify(&token("exp", now - 30)),
        Err(JwtError::Expired)
    ));
}

#[test]
fn alg_none_and_hmac_are_refused() {
    let (issuer, verifier) = setup();
    let claims = issuer.claims("mallory");
    let rsa = issuer.key(JwtAlg::RS256);
    for alg in ["none", "None", "NONE", ""] {
        let header = json!({"alg": alg, "typ": "JWT", "kid": rsa.kid()});
        assert!(
            matches!(
                verifier.verify(&mint_unsigned(&header, &claims)),
                Err(JwtError::AlgorithmNotAccepted(a)) if a == alg
            ),
            "{alg}"
        );
        // Even with a real signature attached.
        let signed = rsa.mint_with_header(&header, &claims);
        assert!(matches!(
            verifier.verify(&signed),
            Err(JwtError::AlgorithmNotAccepted(_))
        ));
    }
    // HS256 keyed with the RSA public key in every form an attacker might try.
    let secrets: Vec<Vec<u8>> = vec![
        rsa.public_key_pem().into_bytes(),
        rsa.public_key_pem().trim_end().as_bytes().to_vec(),
        rsa.public_key_der(),
        serde_json::to_vec(&rsa.public_jwk()).expect("JSON"),
    ];
    for alg in ["HS256", "HS384", "HS512"] {
        for secret in &secrets {
            for kid in [Some(rsa.kid()), None] {
                let mut header = json!({"alg": alg, "typ": "JWT"});
                if let Some(kid) = kid {
                    header["kid"] = json!(kid);
                }
                assert!(matches!(
                    verifier.verify(&mint_hs256(&header, &claims, secret)),
                    Err(JwtError::AlgorithmNotAccepted(a)) if a == alg
                ));
            }
        }
    }
    for alg in ["PS256", "RS384", "ES384", "ES512", "Ed25519", "RS256 "] {
        let header = json!({"alg": alg, "kid": rsa.kid()});
        assert!(
            matches!(
                verifier.verify(&rsa.mint_with_header(&header, &claims)),
                Err(JwtError::AlgorithmNotAccepted(_))
            ),
            "{alg}"
        );
    }
}

#[test]
fn algorithm_must_match_the_key() {
    let (issuer, verifier) = setup();
    let claims = issuer.claims("a");
    let cases = [
        (JwtAlg::ES256, JwtAlg::RS256),
        (JwtAlg::RS256, JwtAlg::EdDSA),
        (JwtAlg::EdDSA, JwtAlg::ES256),
    ];
    for (header_alg, key_alg) in cases {
        let header = json!({"alg": header_alg.as_str(), "kid": issuer.key(key_alg).kid()});
        // Signed with the header's algorithm by the matching-type key: the kid
        // points elsewhere.
        let token = issuer.mint_with_header(header_alg, &header, &claims);
        assert!(
            matches!(
                verifier.verify(&token),
                Err(JwtError::AlgorithmMismatch { .. })
            ),
            "{header_alg:?} with {key_alg:?}'s kid"
        );
    }
}

#[test]
fn key_selection_by_kid() {
    let (issuer, verifier) = setup();
    let claims = issuer.claims("a");
    let rsa = issuer.key(JwtAlg::RS256);
    let unknown = rsa.mint_with_header(&json!({"alg": "RS256", "kid": "rs256-9"}), &claims);
    assert!(matches!(
        verifier.verify(&unknown),
        Err(JwtError::UnknownKid(k)) if k == "rs256-9"
    ));
    let no_kid = rsa.mint_with_header(&json!({"alg": "RS256"}), &claims);
    assert!(matches!(
        verifier.verify(&no_kid),
        Err(JwtError::MissingKid)
    ));

    // A token never brings its own key: an embedded jwk (and jku, x5u) is ignored.
    let mallory = TestKey::generate(JwtAlg::RS256, rsa.kid());
    let header = json!({
        "alg": "RS256",
        "kid": rsa.kid(),
        "jwk": mallory.public_jwk(),
        "jku": "https://evil.test/jwks.json",
        "x5u": "https://evil.test/cert.pem",
    });
    assert!(matches!(
        verifier.verify(&mallory.mint_with_header(&header, &claims)),
        Err(JwtError::BadSignature)
    ));

    // With a single key in the JWKS, the kid may be left out.
    issuer.write_raw_jwks(&serde_json::to_vec(&json!({"keys": [rsa.public_jwk()]})).expect("JSON"));
    let single = JwtVerifier::new(&params(&issuer)).expect("loads");
    assert!(single.verify(&no_kid).is_ok());
    assert!(single.verify(&rsa.mint(&claims)).is_ok());
    assert!(matches!(
        single.verify(&issuer.token(JwtAlg::ES256, "a")),
        Err(JwtError::UnknownKid(_))
    ));
}

#[test]
fn malformed_and_oversized_tokens() {
    let (issuer, verifier) = setup();
    for bad in ["", "abc", "a.b", "a.b.c", "a.b.c.d", "...", "e30.e30.e30"] {
        assert!(
            matches!(verifier.verify(bad), Err(JwtError::Malformed)),
            "{bad:?}"
        );
    }
    let huge = with(
        issuer.claims("a"),
        "pad",
        json!("x".repeat(MAX_TOKEN_BYTES)),
    );
    assert!(matches!(
        verifier.verify(&issuer.mint(JwtAlg::EdDSA, &huge)),
        Err(JwtError::TooLarge(_))
    ));
    // Claims that are not JSON.
    let token = issuer.token(JwtAlg::EdDSA, "a");
    let parts: Vec<&str> = token.split('.').collect();
    let garbage = format!("{}.bm90IGpzb24.{}", parts[0], parts[2]);
    assert!(verifier.verify(&garbage).is_err());
}

#[test]
fn jwks_parsing() {
    let issuer = TestIssuer::new();
    let write = |v: Value| issuer.write_raw_jwks(&serde_json::to_vec(&v).expect("JSON"));
    let load = || JwtVerifier::new(&params(&issuer));
    let rsa = issuer.key(JwtAlg::RS256).public_jwk();
    let ec = issuer.key(JwtAlg::ES256).public_jwk();

    // Unusable keys are skipped, the rest load.
    write(json!({"keys": [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        with(rsa.clone(), "use", json!("enc")),
        with(with(rsa.clone(), "kid", json!("ops")), "key_ops", json!(["encrypt"])),
        with(with(rsa.clone(), "kid", json!("alg")), "alg", json!("ES256")),
        with(with(rsa.clone(), "kid", json!("oaep")), "alg", json!("RSA-OAEP")),
        {"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AAAA", "y": "AAAA"},
        with(with(ec.clone(), "kid", json!("off-curve")), "y", ec["x"].clone()),
        {"kty": "RSA", "kid": "small", "n": "AQAB", "e": "AQAB"},
        {"kty": "weird", "kid": "weird"},
        ec.clone(),
    ]}));
    let verifier = load().expect("the EC key loads");
    assert_eq!(verifier.key_ids(), vec![Some("es256-1".to_owned())]);
    assert!(verifier.verify(&issuer.token(JwtAlg::ES256, "a")).is_ok());

    // Only unusable keys: refused.
    write(json!({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}]}));
    assert!(matches!(
        load(),
        Err(JwksError::NoUsableKey { skipped: 1, .. })
    ));
    write(json!({"keys": []}));
    assert!(matches!(
        load(),
        Err(JwksError::NoUsableKey { skipped: 0, .. })
    ));
    // Two keys with one kid.
    write(json!({"keys": [rsa.clone(), with(ec.clone(), "kid", rsa["kid"].clone())]}));
    assert!(matches!(load(), Err(JwksError::DuplicateKid { .. })));
    // Several keys, one without kid.
    write(json!({"keys": [rsa.clone(), without(ec.clone(), "kid")]}));
    assert!(matches!(
        load(),
        Err(JwksError::MissingKid { index: 1, .. })
    ));
    // Not a JWK set.
    for bad in [&b"not json"[..], b"{}", b"[]", b"{\"keys\": 1}"] {
        issuer.write_raw_jwks(bad);
        assert!(matches!(load(), Err(JwksError::Parse { .. })));
    }
    // Missing file.
    let missing = JwtParams {
        jwks_file: issuer.jwks_path().with_file_name("absent.json"),
        ..params(&issuer)
    };
    assert!(matches!(
        JwtVerifier::new(&missing),
        Err(JwksError::Read { .. })
    ));
}

#[test]
fn reload_picks_up_new_keys_and_keeps_old_ones_on_a_bad_file() {
    let (mut issuer, verifier) = setup();
    let old = issuer.token(JwtAlg::RS256, "a");
    assert_eq!(verifier.reload().expect("reads"), Reload::Unchanged);

    let claims = issuer.claims("b");
    let new = issuer
        .add_key(TestKey::generate(JwtAlg::EdDSA, "eddsa-2"))
        .mint(&claims);
    assert!(matches!(
        verifier.verify(&new),
        Err(JwtError::UnknownKid(_))
    ));
    issuer.write_jwks();
    assert_eq!(
        verifier.reload().expect("valid"),
        Reload::Replaced { keys: 4 }
    );
    assert_eq!(verifier.verify(&new).expect("new key").subject, "b");
    assert!(verifier.verify(&old).is_ok());

    // A broken file keeps the keys in service.
    issuer.write_raw_jwks(b"{\"keys\": [");
    assert!(matches!(verifier.reload(), Err(JwksError::Parse { .. })));
    assert!(verifier.verify(&new).is_ok());
    issuer.write_raw_jwks(br#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#);
    assert!(matches!(
        verifier.reload(),
        Err(JwksError::NoUsableKey { .. })
    ));
    assert!(verifier.verify(&old).is_ok());
    std::fs::remove_file(issuer.jwks_path()).expect("remove");
    assert!(matches!(verifier.reload(), Err(JwksError::Read { .. })));
    assert!(verifier.verify(&old).is_ok());

    // A key removed from the file stops verifying.
    issuer.write_raw_jwks(
        &serde_json::to_vec(&json!({"keys": [issuer.key(JwtAlg::ES256).public_jwk()]}))
            .expect("JSON"),
    );
    assert_eq!(
        verifier.reload().expect("valid"),
        Reload::Replaced { keys: 1 }
    );
    assert!(matches!(
        verifier.verify(&old),
        Err(JwtError::UnknownKid(_))
    ));
}

/// Polls `check` until it holds, for at most ten seconds.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_watcher_reloads_when_the_file_changes() {
    let (mut issuer, verifier) = setup();
    let verifier = Arc::new(verifier);
    let watcher = verifier.spawn_watcher(Duration::from_millis(50));
    let claims = issuer.claims("c");
    let token = issuer
        .add_key(TestKey::generate(JwtAlg::ES256, "es256-2"))
        .mint(&claims);
    issuer.write_jwks();
    eventually("the new key", || verifier.verify(&token).is_ok()).await;

    // The task ends with the verifier.
    drop(verifier);
    tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .expect("watcher ends")
        .expect("no panic");
}

#[tokio::test]
async fn the_watcher_reloads_on_sighup() {
    let (mut issuer, verifier) = setup();
    let verifier = Arc::new(verifier);
    // Polls rarely: only the signal can explain a quick reload.
    let _watcher = verifier.spawn_watcher(Duration::from_secs(3600));
    let claims = issuer.claims("d");
    let token = issuer
        .add_key(TestKey::generate(JwtAlg::RS256, "rs256-2"))
        .mint(&claims);
    issuer.write_jwks();
    assert!(verifier.verify(&token).is_err());
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    eventually("the new key after SIGHUP", || {
        verifier.verify(&token).is_ok()
    })
    .await;
}

/// Verification cost per algorithm, first and remembered (printed; the bounds
/// only catch a pathological regression, such as re-reading the JWKS per call
/// or remembering nothing). `benches/jwt_verify.rs` measures properly.
#[test]
fn verification_is_fast() {
    let (issuer, verifier) = setup();
    for alg in ALGS {
        let tokens: Vec<String> = (0..50)
            .map(|i| issuer.token(alg, &format!("user-{i}")))
            .collect();
        let started = Instant::now();
        for token in &tokens {
            verifier.verify(token).expect("valid");
        }
        let first = started.elapsed() / tokens.len() as u32;
        let started = Instant::now();
        for _ in 0..20 {
            for token in &tokens {
                verifier.verify(token).expect("valid");
            }
        }
        let remembered = started.elapsed() / (20 * tokens.len() as u32);
        println!("verify {alg:?}: first {first:?}, remembered {remembered:?}");
        assert!(first < Duration::from_millis(5), "{alg:?}: {first:?}");
        assert!(remembered < first, "{alg:?}: {remembered:?} vs {first:?}");
    }
}
