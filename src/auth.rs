//! Authentication: finding the token in a request (bearer header, on the
//! Anthropic route `x-api-key`, cookie, query, then a stream ticket; first
//! present wins),
//! validating it as a JWT against an explicit algorithm allow-list, and
//! checking scopes. Also mints tokens for the
//! demo start and `tokengate token`.
//!
//! The key lives in an [`AuthConfig`] held by the application state, not in
//! a static, so servers with different keys can run side by side (tests do).
//! This module only says *why* a token fails ([`AuthError`], each with a
//! stable code); the answer on the wire (401, `WWW-Authenticate`) is chosen
//! once, in `error`. It knows nothing of configuration sources either:
//! [`AuthSetupError`] says what is wrong with a key, and `config` says which
//! setting it came from.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// Where the verification key comes from.
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
}

/// Names under which the token may arrive besides `Authorization: Bearer`.
/// Configurable because the cookie may have to fit the site's own cookie
/// names, and an `EventSource` (which cannot send headers) needs one of the
/// two.
#[derive(Debug, Clone)]
pub struct TokenSources {
    /// Cookie name.
    pub cookie: String,
    /// Query parameter name.
    pub query: String,
    /// Query parameter carrying a stream ticket (`crate::tickets`), the
    /// last source looked at: a ticket is a stand-in for a token, used only
    /// when no token was sent.
    pub ticket: String,
}

/// The header the Anthropic SDKs send their API key in; the Anthropic
/// route takes a tokengate JWT there. Marked sensitive in `app` like
/// `Authorization`.
pub const API_KEY_HEADER: &str = "x-api-key";

/// A permission carried in the token's `scope` claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Open streams.
    Stream,
    /// Publish to channels.
    Publish,
    /// Any stream of any subject; satisfies every scope check.
    Admin,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 3] = [Scope::Stream, Scope::Publish, Scope::Admin];

    /// The scope a name in a token means, if tokengate knows it.
    pub fn parse(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// The scope's name in tokens.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Stream => "stream",
            Scope::Publish => "publish",
            Scope::Admin => "admin",
        }
    }

    /// Scopes are a bit set: a check is one AND, and a [`Principal`], made
    /// for every authenticated request, stays small and cheap to clone.
    fn bit(self) -> u8 {
        match self {
            Scope::Stream => 1,
            Scope::Publish => 2,
            Scope::Admin => 4,
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's `sub`; streams are bound to it.
    pub subject: String,
    /// [`Scope::bit`]s; scope names a token carries that tokengate does not
    /// know are ignored, so one token can serve several services.
    scopes: u8,
    /// The token's `exp` (Unix seconds): a stream or subscription opened
    /// with it ends (`token_expired`) a grace period after this.
    pub expires_at: u64,
    /// The value of the configured class claim (e.g. `tier`), which picks
    /// the subject's quota; `None` without that setting or claim.
    pub class: Option<String>,
    /// The stream ticket the request came with instead of a token (`None`
    /// for a token): what a ticket's first request opens is bound to it.
    pub ticket: Option<TicketUse>,
}

/// A stream ticket as one request used it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketUse {
    /// The store's key for the ticket: a digest, never the ticket itself,
    /// so a `Principal` in a log line leaks nothing usable.
    pub key: String,
    /// True only for the request that used the ticket first (decided
    /// atomically in the store): what it opens becomes the ticket's.
    pub first: bool,
}

impl Principal {
    /// A principal from its parts: for credentials that are not a JWT
    /// (a stream ticket carries what its token granted).
    pub fn new(subject: String, scopes: &[Scope], expires_at: u64, class: Option<String>) -> Self {
        let scopes = scopes.iter().fold(0, |bits, s| bits | s.bit());
        Self { subject, scopes, expires_at, class, ticket: None }
    }

    /// The scopes held, in [`Scope::ALL`] order.
    pub fn scopes(&self) -> Vec<Scope> {
        Scope::ALL.into_iter().filter(|s| self.scopes & s.bit() != 0).collect()
    }

    /// Whether the token carries `admin` (any subject's streams).
    pub fn is_admin(&self) -> bool {
        self.scopes & Scope::Admin.bit() != 0
    }

    /// Whether the caller may do what `scope` guards (`admin` may do all).
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes & (scope.bit() | Scope::Admin.bit()) != 0
    }
}

/// Why a request was not authenticated. Every variant answers 401 with
/// `WWW-Authenticate: Bearer error="invalid_token"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token in any of the accepted places.
    #[error("no token: send `Authorization: Bearer <jwt>`, the token cookie or the token query parameter")]
    Missing,
    /// Not a JWT at all.
    #[error("the token is not a well-formed JWT")]
    Malformed,
    /// Past `exp` (plus leeway).
    #[error("the token has expired")]
    Expired,
    /// Before `nbf` (minus leeway).
    #[error("the token is not valid yet")]
    NotYetValid,
    /// Signature does not verify with the configured key.
    #[error("the token signature is invalid")]
    BadSignature,
    /// Signed with an algorithm outside the allow-list (including `none`).
    #[error("the token's algorithm `{0}` is not allowed")]
    Algorithm(String),
    /// `iss` is not the configured issuer.
    #[error("the token's issuer is not accepted")]
    Issuer,
    /// `aud` is not the configured audience.
    #[error("the token's audience is not accepted")]
    Audience,
    /// A required claim is absent.
    #[error("the token lacks the required `{0}` claim")]
    MissingClaim(String),
    /// Claims present but of the wrong shape.
    #[error("the token's claims are invalid")]
    InvalidClaims,
    /// A stream ticket this server never issued, or one long gone.
    #[error("the stream ticket is not valid")]
    InvalidTicket,
    /// A stream ticket past its lifetime (or its token's `exp`).
    #[error("the stream ticket has expired; get a new one from POST /v1/tickets")]
    TicketExpired,
    /// A stream ticket already used, presented for something other than a
    /// reconnect to what it opened.
    #[error("the stream ticket was already used; it only reconnects to what it opened")]
    TicketUsed,
    /// A stream ticket where only a token will do (minting a ticket).
    #[error("a stream ticket is not accepted here; send the token")]
    TicketNotAccepted,
}

impl AuthError {
    /// Stable code for the problem body and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_token",
            AuthError::Malformed => "malformed_token",
            AuthError::Expired => "token_expired",
            AuthError::NotYetValid => "token_not_yet_valid",
            AuthError::BadSignature => "bad_signature",
            AuthError::Algorithm(_) => "algorithm_not_allowed",
            AuthError::Issuer => "invalid_issuer",
            AuthError::Audience => "invalid_audience",
            AuthError::MissingClaim(_) => "missing_claim",
            AuthError::InvalidClaims => "invalid_claims",
            AuthError::InvalidTicket => "invalid_ticket",
            AuthError::TicketExpired => "ticket_expired",
            AuthError::TicketUsed => "ticket_used",
            AuthError::TicketNotAccepted => "ticket_not_accepted",
        }
    }
}

/// `scope` may be a space-separated string (RFC 8693) or an array.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum ScopeClaim {
    Text(String),
    List(Vec<String>),
}

/// The claims tokengate reads and writes. Every one is optional here, also
/// the required `sub` and `exp`, so that a missing one is reported by the
/// validator as `missing_claim` rather than as a shape error.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Claims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exp: Option<u64>,
    /// Written when minting, for whoever inspects the token; not checked:
    /// `exp` and `nbf` are what bound its validity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    /// Either form (see [`ScopeClaim`]): identity providers differ, and a
    /// token should not fail over how its scopes are spelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scope: Option<ScopeClaim>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aud: Option<String>,
    /// Every other claim, for the configured class claim (see
    /// [`Principal::class`]). Empty when minting.
    #[serde(flatten, skip_serializing)]
    other: serde_json::Map<String, serde_json::Value>,
}

/// Validated authentication settings: the key, the algorithm allow-list and
/// the claim checks.
#[derive(Clone)]
pub struct AuthConfig {
    decoding: DecodingKey,
    /// `None` with a public key and no private key: minting then fails with
    /// [`MintError::NoSigningKey`] instead of signing with the wrong key.
    encoding: Option<EncodingKey>,
    /// Never empty; the first one signs minted tokens.
    algorithms: Vec<Algorithm>,
    /// Built once here rather than per request: it holds the allow-list,
    /// the leeway and the required claims.
    validation: Validation,
    /// Kept beside `validation` so minted tokens carry the `iss` and `aud`
    /// that validation will ask for.
    issuer: Option<String>,
    audience: Option<String>,
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

/// What a [`KeyMaterial`] gives: the keys, and what follows from their type.
struct Keys {
    decoding: DecodingKey,
    encoding: Option<EncodingKey>,
    /// Every allowed algorithm must be of this family.
    family: AlgorithmFamily,
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
                    decoding: DecodingKey::from_secret(secret.expose()),
                    encoding: Some(EncodingKey::from_secret(secret.expose())),
                    family: AlgorithmFamily::Hmac,
                    default_alg: Algorithm::HS256,
                    generated_secret: generated,
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
        let family = decoding.family();
        Ok(Self { decoding, encoding, family, default_alg, generated_secret: false })
    }

    /// The allow-list by name, each of the key's family; the key's default
    /// algorithm when none is configured. Never empty.
    fn allowed(&self, names: Option<&[String]>) -> Result<Vec<Algorithm>, AuthSetupError> {
        let Some(names @ [_, ..]) = names else { return Ok(vec![self.default_alg]) };
        names
            .iter()
            .map(|name| {
                let alg =
                    Algorithm::from_str(name.trim()).map_err(|_| AuthSetupError::UnknownAlgorithm(name.clone()))?;
                if alg.family() != self.family {
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
    /// must belong to the key's family, which is what rules out algorithm
    /// confusion) and builds the validator.
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
        Ok(Self {
            decoding: keys.decoding,
            encoding: keys.encoding,
            algorithms,
            validation,
            issuer,
            audience,
            generated_secret: keys.generated_secret,
            sources,
            class_claim: None,
        })
    }

    /// Reads `claim` of every token into [`Principal::class`] (the quota
    /// class, e.g. `tier`).
    pub fn with_class_claim(mut self, claim: Option<String>) -> Self {
        self.class_claim = claim;
        self
    }

    /// True when verifying with an HMAC secret (then a private key file
    /// would be ignored, which config refuses rather than let pass).
    pub fn key_is_secret(&self) -> bool {
        self.decoding.family() == AlgorithmFamily::Hmac
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

    /// Finds the token: `Authorization: Bearer`, then the cookie, then the
    /// query parameter. An `Authorization` header of another scheme is not
    /// ours and is passed over. Only when none is found does a stream ticket
    /// count ([`AuthConfig::ticket`]).
    ///
    /// The header comes first because it is the one a client sets on
    /// purpose; a browser sends the cookie on every request, so a page must
    /// be able to override it by sending a header.
    pub fn extract<'a>(&self, headers: &'a HeaderMap, query: Option<&'a str>) -> Option<String> {
        self.find(headers, query, false)
    }

    /// [`AuthConfig::extract`] on a route that also takes the token in
    /// [`API_KEY_HEADER`] (where the Anthropic SDKs put their key): bearer,
    /// then `x-api-key`, then the cookie, then the query parameter. The
    /// header is a deliberate choice of the client too, so it beats the
    /// cookie; a client that sends both headers means the bearer one, as
    /// everywhere else.
    pub fn extract_with_api_key<'a>(&self, headers: &'a HeaderMap, query: Option<&'a str>) -> Option<String> {
        self.find(headers, query, true)
    }

    fn find(&self, headers: &HeaderMap, query: Option<&str>, api_key: bool) -> Option<String> {
        for value in headers.get_all(axum::http::header::AUTHORIZATION) {
            if let Ok(text) = value.to_str()
                && let Some((scheme, token)) = text.trim().split_once(' ')
                && scheme.eq_ignore_ascii_case("bearer")
            {
                return Some(token.trim().to_owned());
            }
        }
        if api_key
            && let Some(token) = headers.get(API_KEY_HEADER).and_then(|v| v.to_str().ok()).map(str::trim)
            && !token.is_empty()
        {
            return Some(token.to_owned());
        }
        for value in headers.get_all(axum::http::header::COOKIE) {
            if let Ok(text) = value.to_str() {
                for pair in text.split(';') {
                    if let Some((name, token)) = pair.trim().split_once('=')
                        && name == self.sources.cookie
                    {
                        return Some(token.trim_matches('"').to_owned());
                    }
                }
            }
        }
        let query = query?;
        form_urlencoded::parse(query.as_bytes())
            .find(|(name, _)| *name == self.sources.query.as_str())
            .map(|(_, token)| token.into_owned())
    }

    /// The stream ticket in the query, the last source of credentials
    /// (after every token source, see [`AuthConfig::extract`]).
    pub fn ticket(&self, query: Option<&str>) -> Option<String> {
        form_urlencoded::parse(query?.as_bytes())
            .find(|(name, _)| *name == self.sources.ticket.as_str())
            .map(|(_, ticket)| ticket.into_owned())
    }

    /// Validates a token and returns who it is.
    ///
    /// jsonwebtoken's many error kinds are folded into the few a client can
    /// act on. A key-type mismatch counts as an algorithm refusal: a token
    /// naming an algorithm of another family than the key is exactly what
    /// the allow-list exists to refuse.
    pub fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| match e.kind() {
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
                | ErrorKind::InvalidRsaKey(_) => {
                    AuthError::Algorithm(header_alg(token).unwrap_or_else(|| "unknown".into()))
                }
                ErrorKind::Json(_) => match header_alg(token) {
                    // A readable header with an algorithm jsonwebtoken does not
                    // even know (`none`, `HS1`, ...) is an algorithm refusal.
                    Some(alg) if Algorithm::from_str(&alg).is_err() => AuthError::Algorithm(alg),
                    Some(_) => AuthError::InvalidClaims,
                    None => AuthError::Malformed,
                },
                _ => AuthError::Malformed,
            })?;
        let claims = data.claims;
        let subject = match claims.sub {
            Some(sub) if !sub.is_empty() => sub,
            _ => return Err(AuthError::MissingClaim("sub".into())),
        };
        let mut scopes = 0;
        let names: Vec<&str> = match &claims.scope {
            None => Vec::new(),
            Some(ScopeClaim::Text(s)) => s.split_ascii_whitespace().collect(),
            Some(ScopeClaim::List(l)) => l.iter().map(String::as_str).collect(),
        };
        for scope in names.into_iter().filter_map(Scope::parse) {
            scopes |= scope.bit();
        }
        let class = self.class_claim.as_ref().and_then(|name| match claims.other.get(name) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => Some(v.to_string()),
            _ => None,
        });
        Ok(Principal { subject, scopes, expires_at: claims.exp.unwrap_or(0), class, ticket: None })
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
            aud: self.audience.clone(),
            other: serde_json::Map::new(),
        };
        jsonwebtoken::encode(&Header::new(self.algorithms[0]), &claims, key).map_err(|e| MintError::Sign(e.to_string()))
    }
}

/// Why the key and the algorithm allow-list cannot be used together. Each
/// variant names what is wrong, not where it was configured: the caller
/// (`config`) knows which setting it came from and says so.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthSetupError {
    /// The public key is none of the kinds jsonwebtoken can verify with.
    #[error("not a PEM RSA, EC or Ed25519 public key")]
    PublicKey,
    /// The private key does not parse as the public key's kind (which is
    /// what would sign tokens that this server then refuses).
    #[error("not a PEM private key of the public key's type: {0}")]
    PrivateKey(String),
    /// An allow-list entry that names no algorithm.
    #[error("unknown algorithm `{0}` (use e.g. HS256, RS256, ES256, EdDSA)")]
    UnknownAlgorithm(String),
    /// An allow-list entry of another family than the key (HS256 with a
    /// public key, RS256 with a secret): allowing it is how algorithm
    /// confusion attacks work.
    #[error("`{0}` does not fit the configured key")]
    AlgorithmMismatch(String),
}

/// Why a token could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// Only a public key is configured.
    #[error("no signing key: with jwt_public_key_file, set jwt_private_key_file too")]
    NoSigningKey,
    /// The crypto backend refused.
    #[error("signing failed: {0}")]
    Sign(String),
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
