//! A JWKS document read into the keys tokengate may verify with, and the
//! choice of one key for a token. Pure: no I/O, no time (the cache and the
//! fetching are [`super::jwks`]'s).
//!
//! This is where algorithm confusion is ruled out for JWKS keys: a key
//! serves only the algorithms its type fits (`RSA`: RS*/PS*; `EC` P-256:
//! ES256, P-384: ES384; `OKP` Ed25519: EdDSA), narrowed by the key's own
//! `alg` when it has one, and only those on the allow-list. Symmetric
//! (`oct`) keys are never taken from a key set: a published HMAC key would
//! let anyone sign.

use std::sync::Arc;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

/// More keys than any identity provider publishes (they rotate two or
/// three); a document with more is refused rather than parsed at length.
pub(super) const MAX_KEYS: usize = 64;

/// The type of a usable key, which fixes the algorithms it can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl KeyKind {
    fn fits(self, alg: Algorithm) -> bool {
        match self {
            KeyKind::Rsa => matches!(
                alg,
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ),
            KeyKind::P256 => alg == Algorithm::ES256,
            KeyKind::P384 => alg == Algorithm::ES384,
            KeyKind::Ed25519 => alg == Algorithm::EdDSA,
        }
    }
}

/// One usable key.
pub(super) struct KeyEntry {
    /// The key's `kid`; tokens name it in their header.
    kid: Option<String>,
    kind: KeyKind,
    /// The key's own `alg`, when it states one: then only that algorithm.
    alg: Option<Algorithm>,
    /// What jsonwebtoken verifies with.
    pub(super) decoding: DecodingKey,
}

impl KeyEntry {
    fn fits(&self, alg: Algorithm) -> bool {
        self.kind.fits(alg) && self.alg.is_none_or(|own| own == alg)
    }
}

/// The usable keys of one or more JWKS documents.
#[derive(Default)]
pub(super) struct KeySet {
    keys: Vec<Arc<KeyEntry>>,
}

/// Which key a token gets.
pub(super) enum Selection {
    /// This one.
    Found(Arc<KeyEntry>),
    /// The `kid` exists but its key does not fit the token's algorithm: an
    /// algorithm confusion attempt or a misconfigured signer, never a
    /// reason to refresh.
    WrongAlgorithm,
    /// No key has that `kid` (or, for a token without `kid`, not exactly
    /// one key fits its algorithm).
    NotFound,
}

/// Why a JWKS document gives no key set.
#[derive(Debug, thiserror::Error)]
pub(super) enum KeySetError {
    /// Not a JSON object with a `keys` array.
    #[error("not a JWKS document: {0}")]
    NotJwks(String),
    /// More than [`MAX_KEYS`] keys.
    #[error("more than {MAX_KEYS} keys")]
    TooManyKeys,
    /// Keys, but none tokengate may verify with (only encryption keys,
    /// only algorithms off the allow-list, ...).
    #[error("no usable signing key for the allowed algorithms ({skipped} skipped)")]
    NoUsableKeys {
        /// Keys present but not usable.
        skipped: usize,
    },
}

/// The document's shape; each key is read on its own, so that one key of a
/// kind jsonwebtoken does not know does not spoil the others.
#[derive(Deserialize)]
struct Document {
    keys: Vec<serde_json::Value>,
}

impl KeySet {
    /// Reads a JWKS document, keeping the keys that can verify at least one
    /// of `allowed` (see the module comment). A document without a single
    /// such key is an error, so that a broken answer cannot replace a
    /// working key set with an empty one.
    pub(super) fn parse(bytes: &[u8], allowed: &[Algorithm]) -> Result<KeySet, KeySetError> {
        let document: Document = serde_json::from_slice(bytes).map_err(|e| KeySetError::NotJwks(e.to_string()))?;
        if document.keys.len() > MAX_KEYS {
            return Err(KeySetError::TooManyKeys);
        }
        let total = document.keys.len();
        let keys: Vec<Arc<KeyEntry>> =
            document.keys.into_iter().filter_map(|value| usable(value, allowed)).map(Arc::new).collect();
        if keys.is_empty() {
            return Err(KeySetError::NoUsableKeys { skipped: total });
        }
        Ok(KeySet { keys })
    }

    /// Both sets' keys, `first`'s searched first.
    pub(super) fn merged(first: Option<&KeySet>, second: Option<&KeySet>) -> KeySet {
        let keys = first.into_iter().chain(second).flat_map(|set| set.keys.iter().cloned()).collect();
        KeySet { keys }
    }

    /// Usable keys.
    pub(super) fn len(&self) -> usize {
        self.keys.len()
    }

    /// The key for a token with this header `kid` and `alg`. A token
    /// without `kid` gets the key only when exactly one fits its algorithm:
    /// guessing among several would make the outcome depend on key order.
    pub(super) fn select(&self, kid: Option<&str>, alg: Algorithm) -> Selection {
        let Some(kid) = kid else {
            let mut fitting = self.keys.iter().filter(|k| k.fits(alg));
            return match (fitting.next(), fitting.next()) {
                (Some(key), None) => Selection::Found(key.clone()),
                _ => Selection::NotFound,
            };
        };
        let mut named = self.keys.iter().filter(|k| k.kid.as_deref() == Some(kid)).peekable();
        if named.peek().is_none() {
            return Selection::NotFound;
        }
        match named.find(|k| k.fits(alg)) {
            Some(key) => Selection::Found(key.clone()),
            None => Selection::WrongAlgorithm,
        }
    }
}

/// The key in `value`, if tokengate may verify with it: a public signing
/// key (`use`, when present, is `sig`; `key_ops`, when present, has
/// `verify`) of a supported type whose own `alg`, when present, fits its
/// type and is allowed.
fn usable(value: serde_json::Value, allowed: &[Algorithm]) -> Option<KeyEntry> {
    let jwk: Jwk = serde_json::from_value(value).ok()?;
    let common = &jwk.common;
    if common.public_key_use.as_ref().is_some_and(|u| *u != PublicKeyUse::Signature) {
        return None;
    }
    if common.key_operations.as_ref().is_some_and(|ops| !ops.contains(&KeyOperations::Verify)) {
        return None;
    }
    let kind = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => KeyKind::Rsa,
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => KeyKind::P256,
            EllipticCurve::P384 => KeyKind::P384,
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => KeyKind::Ed25519,
        _ => return None,
    };
    let alg = match common.key_algorithm {
        // An encryption algorithm (RSA-OAEP, ...) or an unknown one: not a
        // signing key.
        Some(key_alg) => Some(Algorithm::try_from(key_alg).ok()?),
        None => None,
    };
    let entry = KeyEntry { kid: common.key_id.clone(), kind, alg, decoding: DecodingKey::from_jwk(&jwk).ok()? };
    allowed.iter().any(|a| entry.fits(*a)).then_some(entry)
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::EncodingKey;
    use serde_json::{Value, json};

    use super::*;

    const RSA: &str = include_str!("../../tests/fixtures/jwks/rsa-a.pem");
    const P256: &str = include_str!("../../tests/fixtures/jwks/ec-p256.pem");
    const ED: &str = include_str!("../../tests/fixtures/jwks/ed25519.pem");

    /// The public JWK of a fixture key, with `kid` and without `alg`.
    fn jwk(pem: &str, alg: Algorithm, kid: &str) -> Value {
        let key = match alg.family() {
            jsonwebtoken::AlgorithmFamily::Rsa => EncodingKey::from_rsa_pem(pem.as_bytes()),
            jsonwebtoken::AlgorithmFamily::Ec => EncodingKey::from_ec_pem(pem.as_bytes()),
            _ => EncodingKey::from_ed_pem(pem.as_bytes()),
        };
        let jwk = key.and_then(|k| Jwk::from_encoding_key(&k, alg)).unwrap_or_else(|e| panic!("{e}"));
        let mut value = serde_json::to_value(jwk).unwrap_or_else(|e| panic!("{e}"));
        value["kid"] = json!(kid);
        if let Some(map) = value.as_object_mut() {
            map.remove("alg");
        }
        value
    }

    fn parse(keys: Vec<Value>, allowed: &[Algorithm]) -> Result<KeySet, KeySetError> {
        KeySet::parse(json!({ "keys": keys }).to_string().as_bytes(), allowed)
    }

    fn found(selection: Selection) -> bool {
        matches!(selection, Selection::Found(_))
    }

    const ALL: &[Algorithm] = &[Algorithm::RS256, Algorithm::PS256, Algorithm::ES256, Algorithm::EdDSA];

    #[test]
    fn keys_are_selected_by_kid_and_must_fit_the_algorithm() {
        let set = parse(
            vec![jwk(RSA, Algorithm::RS256, "r"), jwk(P256, Algorithm::ES256, "e"), jwk(ED, Algorithm::EdDSA, "d")],
            ALL,
        );
        let Ok(set) = set else { panic!("parse failed") };
        assert_eq!(set.len(), 3);
        assert!(found(set.select(Some("r"), Algorithm::RS256)));
        assert!(found(set.select(Some("r"), Algorithm::PS256)));
        assert!(found(set.select(Some("e"), Algorithm::ES256)));
        assert!(found(set.select(Some("d"), Algorithm::EdDSA)));
        // The RSA key's kid with an EC algorithm, the EC key's with RSA.
        assert!(matches!(set.select(Some("r"), Algorithm::ES256), Selection::WrongAlgorithm));
        assert!(matches!(set.select(Some("e"), Algorithm::RS256), Selection::WrongAlgorithm));
        assert!(matches!(set.select(Some("r"), Algorithm::HS256), Selection::WrongAlgorithm));
        assert!(matches!(set.select(Some("x"), Algorithm::RS256), Selection::NotFound));
        // Without kid: the one key that fits, or none.
        assert!(found(set.select(None, Algorithm::ES256)));
        let two = parse(vec![jwk(RSA, Algorithm::RS256, "1"), jwk(RSA, Algorithm::RS256, "2")], ALL);
        assert!(two.is_ok_and(|s| matches!(s.select(None, Algorithm::RS256), Selection::NotFound)));
    }

    #[test]
    fn a_keys_own_alg_narrows_what_it_verifies() {
        let mut rs = jwk(RSA, Algorithm::RS256, "r");
        rs["alg"] = json!("RS256");
        let Ok(set) = parse(vec![rs], ALL) else { panic!("parse failed") };
        assert!(found(set.select(Some("r"), Algorithm::RS256)));
        assert!(matches!(set.select(Some("r"), Algorithm::PS256), Selection::WrongAlgorithm));
        // An `alg` that does not fit the key's type makes it unusable.
        let mut odd = jwk(RSA, Algorithm::RS256, "r");
        odd["alg"] = json!("ES256");
        assert!(matches!(parse(vec![odd], ALL), Err(KeySetError::NoUsableKeys { skipped: 1 })));
    }

    #[test]
    fn only_public_signing_keys_for_allowed_algorithms_are_kept() {
        let mut enc = jwk(RSA, Algorithm::RS256, "enc");
        enc["use"] = json!("enc");
        let mut oaep = jwk(RSA, Algorithm::RS256, "oaep");
        oaep["alg"] = json!("RSA-OAEP");
        let mut sign_only = jwk(RSA, Algorithm::RS256, "ops");
        sign_only["key_ops"] = json!(["sign"]);
        let oct = json!({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"});
        let p521 = json!({"kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA"});
        let unknown = json!({"kty": "XYZ", "kid": "what"});
        let good = jwk(P256, Algorithm::ES256, "good");
        let set = parse(vec![enc, oaep, sign_only, oct, p521, unknown, good], ALL);
        let Ok(set) = set else { panic!("parse failed") };
        assert_eq!(set.len(), 1);
        assert!(found(set.select(Some("good"), Algorithm::ES256)));
        assert!(matches!(set.select(Some("hmac"), Algorithm::HS256), Selection::NotFound));
        // An EC key when only RSA is allowed is no usable key.
        let only_rs = parse(vec![jwk(P256, Algorithm::ES256, "e")], &[Algorithm::RS256]);
        assert!(matches!(only_rs, Err(KeySetError::NoUsableKeys { skipped: 1 })));
    }

    #[test]
    fn garbage_and_oversized_documents_are_refused() {
        for garbage in [&b"<html>"[..], b"{}", b"{\"keys\": 3}", b"[]", b""] {
            assert!(matches!(KeySet::parse(garbage, ALL), Err(KeySetError::NotJwks(_))));
        }
        assert!(matches!(parse(vec![], ALL), Err(KeySetError::NoUsableKeys { skipped: 0 })));
        let many = vec![jwk(RSA, Algorithm::RS256, "r"); MAX_KEYS + 1];
        assert!(matches!(parse(many, ALL), Err(KeySetError::TooManyKeys)));
    }

    #[test]
    fn merged_sets_search_the_first_one_first() {
        let a = parse(vec![jwk(RSA, Algorithm::RS256, "a")], ALL).ok();
        let b = parse(vec![jwk(P256, Algorithm::ES256, "b")], ALL).ok();
        let both = KeySet::merged(a.as_ref(), b.as_ref());
        assert_eq!(both.len(), 2);
        assert!(found(both.select(Some("a"), Algorithm::RS256)) && found(both.select(Some("b"), Algorithm::ES256)));
        assert_eq!(KeySet::merged(None, None).len(), 0);
    }
}
