//! Validating a token: the key source (an HMAC secret, a PEM public key, or
//! a JWKS through [`super::jwks`]), the algorithm allow-list that must fit
//! it, jsonwebtoken's checks (signature, `exp`, `nbf`, `iss`, `aud`), and
//! the folding of its many error kinds into [`AuthError`]. Also minting,
//! which needs the same keys and claim settings.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use tokio_util::sync::CancellationToken;

use super::claims::{AudienceClaim, Claims, ScopeClaim};
use super::extract::TokenSources;
use super::jwks::{Jwks, JwksSettings};
use super::verified::VerifiedTokens;
use super::{AuthError, AuthSetupError, MintError, Principal};
use crate::metrics::Metrics;
use crate::secret::Secret;

/// Where the verification key comes from. The kinds exclude each other:
/// one source of truth for which keys sign valid tokens.
#[derive(Debug, Clone)]
pub enum KeyMaterial {
    /// An HMAC secret; `generated` when it is the random per-process one.
    Secret {
        /// The secret.
        secret: Secret,
        /// True for the random no-config secret.
        generated: bool,
    },
    /// A PEM public key, and optionally its private key for minting.
    PublicKey {
        /// PEM of the public key; its type (RSA, EC, Ed25519) decides the
        /// algorithm family every allowed algorithm must belong to.
        public_pem: Vec<u8>,
        /// PEM of the private key, for `tokengate token` only: verifying
        /// needs just the public key, so a serving replica need not hold it.
        private_pem: Option<Secret>,
    },
    /// An identity provider's rotating keys (JWKS), selected by `kid`.
    /// tokengate cannot mint with them.
    Jwks(JwksSettings),
}

/// Verified tokens kept per static key: about 2 MB at most with typical
/// tokens, and more than the number of distinct callers that reconnect
/// within a token's life on most deployments.
const VERIFIED_TOKENS: usize = 4096;

/// What verifies signatures.
#[derive(Clone)]
enum Verifier {
    /// One key for every token.
    Static(DecodingKey),
    /// The key the token's `kid` names in the cached key set.
    Jwks(Arc<Jwks>),
}

/// Validated authentication settings: the key, the algorithm allow-list and
/// the claim checks.
#[derive(Clone)]
pub struct AuthConfig {
    verifier: Verifier,
    /// `None` with a public key and no private key, or a JWKS: minting then
    /// fails with [`MintError::NoSigningKey`] instead of signing with the
    /// wrong key.
    encoding: Option<EncodingKey>,
    /// Never empty; the first one signs minted tokens.
    algorithms: Vec<Algorithm>,
    /// Built once here rather than per request: it holds the allow-list,
    /// the leeway and the required claims.
    validation: Validation,
    /// The same for each allowed algorithm alone, for a JWKS: jsonwebtoken
    /// wants every algorithm of a validator to fit the key, and a key set
    /// mixes RSA, EC and Ed25519 keys. Empty for a static key.
    by_algorithm: Vec<(Algorithm, Validation)>,
    /// Kept beside `validation` so minted tokens carry the `iss` and `aud`
    /// that validation will ask for.
    issuer: Option<String>,
    audience: Option<String>,
    /// Tokens a static key verified, with their callers (see
    /// [`super::verified`]); shared by clones.
    verified: Arc<VerifiedTokens>,
    /// The start banner prints a demo token only then: a token for a real
    /// key printed to stdout would end up in log collectors.
    generated_secret: bool,
    sources: TokenSources,
    /// The claim whose value becomes [`Principal::class`].
    class_claim: Option<String>,
}

/// By hand, so that no key material can reach a log line through
/// `{:?}` of the config.
impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("algorithms", &self.algorithms)
            .field("jwks", &matches!(self.verifier, Verifier::Jwks(_)))
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("generated_secret", &self.generated_secret)
            .field("sources", &self.sources)
            .finish_non_exhaustive()
    }
}

/// `Algorithm` has no `Display`; its `Debug` is the JOSE name (`HS256`).
fn alg_name(alg: Algorithm) -> String {
    format!("{alg:?}")
}

/// Which algorithms a key source can verify.
#[derive(Clone, Copy)]
enum Fits {
    /// Those of the static key's family.
    Family(AlgorithmFamily),
    /// Any asymmetric one: which key serves which algorithm is decided per
    /// key when the key set is read ([`super::keyset`]).
    Asymmetric,
}

/// The verifying side before the allow-list is known (a JWKS is read with
/// the allow-list, to keep only keys that can serve it).
enum Source {
    Static(DecodingKey),
    Jwks(JwksSettings),
}

/// What a [`KeyMaterial`] gives: the keys, and what follows from their type.
struct Keys {
    source: Source,
    encoding: Option<EncodingKey>,
    /// Every allowed algorithm must fit this.
    fits: Fits,
    /// Allowed when no allow-list is configured.
    default_alg: Algorithm,
    generated_secret: bool,
}

impl Keys {
    /// A public key's type is found by trying each parser: PEM says
    /// `PUBLIC KEY` for all of them.
    fn new(key: KeyMaterial) -> Result<Self, AuthSetupError> {
        let (public_pem, private_pem) = match key {
            KeyMaterial::Secret { secret, generated } => {
                return Ok(Self {
                    source: Source::Static(DecodingKey::from_secret(secret.expose())),
                    encoding: Some(EncodingKey::from_secret(secret.expose())),
                    fits: Fits::Family(AlgorithmFamily::Hmac),
                    default_alg: Algorithm::HS256,
                    generated_secret: generated,
                });
            }
            KeyMaterial::Jwks(settings) => {
                // RS256 is what identity providers sign with unless told
                // otherwise (Auth0, Keycloak, Okta, Cognito, Entra ID).
                return Ok(Self {
                    source: Source::Jwks(settings),
                    encoding: None,
                    fits: Fits::Asymmetric,
                    default_alg: Algorithm::RS256,
                    generated_secret: false,
                });
            }
            KeyMaterial::PublicKey { public_pem, private_pem } => (public_pem, private_pem),
        };
        let (decoding, default_alg) = if let Ok(k) = DecodingKey::from_rsa_pem(&public_pem) {
            (k, Algorithm::RS256)
        } else if let Ok(k) = DecodingKey::from_ec_pem(&public_pem) {
            (k, Algorithm::ES256)
        } else if let Ok(k) = DecodingKey::from_ed_pem(&public_pem) {
            (k, Algorithm::EdDSA)
        } else {
            return Err(AuthSetupError::PublicKey);
        };
        let encoding = match private_pem {
            None => None,
            Some(pem) => Some(
                match default_alg {
                    Algorithm::RS256 => EncodingKey::from_rsa_pem(pem.expose()),
                    Algorithm::ES256 => EncodingKey::from_ec_pem(pem.expose()),
                    _ => EncodingKey::from_ed_pem(pem.expose()),
                }
                .map_err(|e| AuthSetupError::PrivateKey(e.to_string()))?,
            ),
        };
        let fits = Fits::Family(decoding.family());
        Ok(Self { source: Source::Static(decoding), encoding, fits, default_alg, generated_secret: false })
    }

    /// The allow-list by name, each fitting the key source; the source's
    /// default algorithm when none is configured. Never empty.
    fn allowed(&self, names: Option<&[String]>) -> Result<Vec<Algorithm>, AuthSetupError> {
        let Some(names @ [_, ..]) = names else { return Ok(vec![self.default_alg]) };
        names
            .iter()
            .map(|name| {
                let alg =
                    Algorithm::from_str(name.trim()).map_err(|_| AuthSetupError::UnknownAlgorithm(name.clone()))?;
                let fits = match self.fits {
                    Fits::Family(family) => alg.family() == family,
                    Fits::Asymmetric => alg.family() != AlgorithmFamily::Hmac,
                };
                if !fits {
                    return Err(AuthSetupError::AlgorithmMismatch(name.clone()));
                }
                Ok(alg)
            })
            .collect()
    }
}

/// The validator: the allow-list, the leeway, and `exp` and `sub` required
/// always, `iss` and `aud` when configured.
fn validation(algorithms: &[Algorithm], leeway: Duration, issuer: Option<&str>, audience: Option<&str>) -> Validation {
    let mut validation = Validation::new(algorithms[0]);
    validation.algorithms = algorithms.to_vec();
    // Whole seconds; a fraction rounds up rather than silently to zero.
    validation.leeway = leeway.as_secs() + u64::from(leeway.subsec_nanos() > 0);
    validation.validate_nbf = true;
    let mut required = vec!["exp", "sub"];
    match issuer {
        Some(iss) => {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        None => validation.iss = None,
    }
    match audience {
        Some(aud) => {
            validation.set_audience(&[aud]);
            required.push("aud");
        }
        None => validation.validate_aud = false,
    }
    validation.set_required_spec_claims(&required);
    validation
}

impl AuthConfig {
    /// Checks the key and allow-list fit together (every allowed algorithm
    /// must fit the key source, which is what rules out algorithm
    /// confusion) and builds the validator. A JWKS file is read here; a
    /// JWKS URL is first fetched by [`AuthConfig::start_key_refresh`].
    pub fn new(
        key: KeyMaterial,
        algorithms: Option<&[String]>,
        issuer: Option<String>,
        audience: Option<String>,
        leeway: Duration,
        sources: TokenSources,
    ) -> Result<Self, AuthSetupError> {
        let keys = Keys::new(key)?;
        let algorithms = keys.allowed(algorithms)?;
        let validation = validation(&algorithms, leeway, issuer.as_deref(), audience.as_deref());
        let (verifier, by_algorithm) = match keys.source {
            Source::Static(key) => (Verifier::Static(key), Vec::new()),
            Source::Jwks(settings) => {
                let by_algorithm = algorithms
                    .iter()
                    .map(|alg| (*alg, self::validation(&[*alg], leeway, issuer.as_deref(), audience.as_deref())))
                    .collect();
                (Verifier::Jwks(Arc::new(Jwks::new(settings, algorithms.clone())?)), by_algorithm)
            }
        };
        Ok(Self {
            verifier,
            encoding: keys.encoding,
            algorithms,
            validation,
            by_algorithm,
            issuer,
            audience,
            generated_secret: keys.generated_secret,
            sources,
            class_claim: None,
            verified: Arc::new(VerifiedTokens::new(VERIFIED_TOKENS)),
        })
    }

    /// Reads `claim` of every token into [`Principal::class`] (the quota
    /// class, e.g. `tier`).
    pub fn with_class_claim(mut self, claim: Option<String>) -> Self {
        self.class_claim = claim;
        // Callers kept so far were read without (or with another) claim.
        self.verified = Arc::new(VerifiedTokens::new(VERIFIED_TOKENS));
        self
    }

    /// True when verifying with an HMAC secret (then a private key file
    /// would be ignored, which config refuses rather than let pass).
    pub fn key_is_secret(&self) -> bool {
        matches!(&self.verifier, Verifier::Static(key) if key.family() == AlgorithmFamily::Hmac)
    }

    /// True when the secret is the random per-process one.
    pub fn generated_secret(&self) -> bool {
        self.generated_secret
    }

    /// Allowed algorithms, by name.
    pub fn algorithms(&self) -> Vec<String> {
        self.algorithms.iter().copied().map(alg_name).collect()
    }

    /// Where tokens are looked for.
    pub fn sources(&self) -> &TokenSources {
        &self.sources
    }

    /// With a JWKS, starts its background refresh (the first fetch at
    /// once) until `stop`, counting loads in `metrics`; nothing for a
    /// static key. Called once the server runs, since configuration does
    /// not wait on the network.
    pub fn start_key_refresh(&self, metrics: Arc<Metrics>, stop: CancellationToken) {
        if let Verifier::Jwks(jwks) = &self.verifier {
            jwks.spawn_refresh(metrics, stop);
        }
    }

    /// Validates a token and returns who it is. Async because with a JWKS
    /// an unknown `kid` may wait for one (rate-limited) refresh of the key
    /// set; with a static key it never waits.
    ///
    /// A token a static key verified is kept with its caller (see
    /// [`super::verified`]) and found again until its `exp`.
    ///
    /// With a JWKS the header is read first, only to pick the key: its
    /// `alg` must be on the allow-list and fit the key its `kid` names
    /// (see [`super::keyset`]), and jsonwebtoken then checks the signature
    /// with that key under the same allow-list.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        let claims = match &self.verifier {
            Verifier::Static(key) => {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                if let Some(principal) = self.verified.get(token, now, self.validation.leeway) {
                    return Ok(principal);
                }
                let principal =
                    self.verify(token, key, &self.validation)?.into_principal(self.class_claim.as_deref())?;
                self.verified.insert(token, &principal);
                return Ok(principal);
            }
            Verifier::Jwks(jwks) => {
                let header = jsonwebtoken::decode_header(token).map_err(|e| fold_error(e.kind(), token))?;
                let Some((_, validation)) = self.by_algorithm.iter().find(|(alg, _)| *alg == header.alg) else {
                    return Err(AuthError::Algorithm(alg_name(header.alg)));
                };
                let key = jwks.key_for(header.kid.as_deref(), header.alg).await?;
                self.verify(token, &key.decoding, validation)?
            }
        };
        claims.into_principal(self.class_claim.as_deref())
    }

    /// The signature and claim checks with `key`.
    fn verify(&self, token: &str, key: &DecodingKey, validation: &Validation) -> Result<Claims, AuthError> {
        jsonwebtoken::decode::<Claims>(token, key, validation)
            .map(|data| data.claims)
            .map_err(|e| fold_error(e.kind(), token))
    }

    /// Signs a token for `subject` with `scope` (space separated), valid for
    /// `ttl`; adds `iss`/`aud` when configured so the token passes here.
    /// No `nbf`: the token is valid at once, also on a replica whose clock
    /// is a little behind this one's.
    pub fn mint(&self, subject: &str, scope: &str, ttl: Duration) -> Result<String, MintError> {
        let key = self.encoding.as_ref().ok_or(MintError::NoSigningKey)?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let claims = Claims {
            sub: Some(subject.to_owned()),
            exp: Some(now + ttl.as_secs()),
            iat: Some(now),
            scope: Some(ScopeClaim::Text(scope.to_owned())),
            iss: self.issuer.clone(),
            aud: self.audience.clone().map(AudienceClaim::One),
            other: serde_json::Map::new(),
        };
        jsonwebtoken::encode(&Header::new(self.algorithms[0]), &claims, key).map_err(|e| MintError::Sign(e.to_string()))
    }
}

/// jsonwebtoken's many error kinds folded into the few a client can act
/// on. A key-type mismatch counts as an algorithm refusal: a token naming
/// an algorithm of another family than the key is exactly what the
/// allow-list exists to refuse.
fn fold_error(kind: &ErrorKind, token: &str) -> AuthError {
    match kind {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidIssuer => AuthError::Issuer,
        ErrorKind::InvalidAudience => AuthError::Audience,
        ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(c.clone()),
        ErrorKind::InvalidClaimFormat(_) => AuthError::InvalidClaims,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_) => AuthError::Algorithm(header_alg(token).unwrap_or_else(|| "unknown".into())),
        ErrorKind::Json(_) => match header_alg(token) {
            // A readable header with an algorithm jsonwebtoken does not
            // even know (`none`, `HS1`, ...) is an algorithm refusal.
            Some(alg) if Algorithm::from_str(&alg).is_err() => AuthError::Algorithm(alg),
            Some(_) => AuthError::InvalidClaims,
            None => AuthError::Malformed,
        },
        _ => AuthError::Malformed,
    }
}

/// The `alg` of a token's header, read without trusting anything else.
/// Only to name the algorithm in a refusal: the header never chooses the
/// key or the algorithm used to verify (that would be the `alg` confusion
/// this module guards against).
fn header_alg(token: &str) -> Option<String> {
    let header = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header.trim_end_matches('=')).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.get("alg")?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::auth::Scope;

    const SECRET: &[u8] = b"unit-test-secret-0123456789-abcdefghij";

    fn config(audience: Option<&str>) -> AuthConfig {
        let key = KeyMaterial::Secret { secret: Secret::new(SECRET.to_vec()), generated: false };
        let sources = TokenSources { cookie: "c".into(), query: "q".into(), ticket: "t".into() };
        AuthConfig::new(key, None, None, audience.map(str::to_owned), Duration::ZERO, sources)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn hs256(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn exp() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) + 600
    }

    #[tokio::test]
    async fn aud_may_be_an_array_that_names_the_audience() {
        let auth = config(Some("tokengate"));
        let ok = hs256(json!({"sub": "a", "exp": exp(), "aud": ["account", "tokengate"]}));
        assert!(auth.authenticate(&ok).await.is_ok_and(|p| p.subject == "a"));
        let one = hs256(json!({"sub": "a", "exp": exp(), "aud": "tokengate"}));
        assert!(auth.authenticate(&one).await.is_ok());
        let other = hs256(json!({"sub": "a", "exp": exp(), "aud": ["account"]}));
        assert_eq!(auth.authenticate(&other).await, Err(AuthError::Audience));
        // Without a configured audience, an array is no shape error either.
        assert!(config(None).authenticate(&ok).await.is_ok());
    }

    #[tokio::test]
    async fn a_verified_token_is_kept_and_a_changed_one_is_still_refused() {
        let auth = config(None);
        let claims = json!({"sub": "a", "exp": exp(), "scope": "stream"});
        let token = hs256(claims.clone());
        let first = auth.authenticate(&token).await;
        assert!(first.as_ref().is_ok_and(|p| p.subject == "a" && p.has(Scope::Stream)), "{first:?}");
        assert_eq!(auth.verified.len(), 1, "kept once verified");
        assert_eq!(auth.authenticate(&token).await, first, "the same caller again");
        assert_eq!(auth.clone().verified.len(), 1, "clones share the set");
        // The same token with another signature, or cut short, is verified
        // (and refused), not matched to the kept one.
        let other_key = EncodingKey::from_secret(b"another-secret-0123456789-abcdefghij");
        let forged =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &other_key).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(forged.rsplit_once('.').map(|(signed, _)| signed), token.rsplit_once('.').map(|(signed, _)| signed));
        assert_eq!(auth.authenticate(&forged).await, Err(AuthError::BadSignature));
        assert!(auth.authenticate(&token[..token.len() - 1]).await.is_err());
        let refused = hs256(json!({"sub": "a", "exp": exp() - 1200}));
        assert_eq!(auth.authenticate(&refused).await, Err(AuthError::Expired));
        assert_eq!(auth.verified.len(), 1, "refused tokens are not kept");
        // A class claim set afterwards is not served from callers read
        // without it.
        let tiered = config(None).with_class_claim(Some("tier".into()));
        let token = hs256(json!({"sub": "a", "exp": exp(), "tier": "gold"}));
        assert_eq!(tiered.authenticate(&token).await.map(|p| p.class), Ok(Some("gold".into())));
    }

    #[tokio::test]
    async fn minted_tokens_pass_their_own_checks() {
        let auth = config(Some("tokengate"));
        let token = auth.mint("bob", "stream", Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
        assert!(auth.authenticate(&token).await.is_ok_and(|p| p.subject == "bob"));
    }

    #[test]
    fn a_jwks_allows_no_hmac_algorithm_and_defaults_to_rs256() {
        let jwks = || {
            KeyMaterial::Jwks(JwksSettings {
                url: Some("https://idp.example.com/jwks".into()),
                file: None,
                refresh: Duration::from_secs(300),
                refresh_min: Duration::from_secs(30),
                refresh_max: Duration::from_secs(3600),
            })
        };
        let sources = || TokenSources { cookie: "c".into(), query: "q".into(), ticket: "t".into() };
        let names = vec!["RS256".to_owned(), "HS256".to_owned()];
        let err = AuthConfig::new(jwks(), Some(&names), None, None, Duration::ZERO, sources()).err();
        assert_eq!(err, Some(AuthSetupError::AlgorithmMismatch("HS256".into())));
        let auth = AuthConfig::new(jwks(), None, None, None, Duration::ZERO, sources());
        assert!(auth.is_ok_and(|a| a.algorithms() == ["RS256"] && !a.key_is_secret()));
        let auth = AuthConfig::new(jwks(), None, None, None, Duration::ZERO, sources());
        assert!(
            auth.is_ok_and(|a| matches!(a.mint("x", "stream", Duration::from_secs(1)), Err(MintError::NoSigningKey)))
        );
    }
}
