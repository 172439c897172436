//! Authentication: finding the token (or a stream ticket) in a request
//! ([`extract`]),
//! validating it as a JWT against an explicit algorithm allow-list
//! ([`validate`]) with a static key or the keys of an identity provider's
//! JWKS ([`jwks`], [`keyset`]), reading its claims into a [`Principal`]
//! ([`claims`]), and checking scopes. Also mints tokens for the demo start
//! and `tokengate token`.
//!
//! The keys live in an [`AuthConfig`] held by the application state, not in
//! a static, so servers with different keys can run side by side (tests do).
//! This module only says *why* a token fails ([`AuthError`], each with a
//! stable code); the answer on the wire (401 with `WWW-Authenticate`, or
//! 503 while no key set could be loaded) is chosen once, in `error`. It
//! knows nothing of configuration sources either: [`AuthSetupError`] says
//! what is wrong with a key, and `config` says which setting it came from.

mod claims;
mod extract;
mod jwks;
mod keyset;
mod validate;
mod verified;

use std::time::Duration;

use crate::event::ErrorCode;

pub use extract::{API_KEY_HEADER, TokenSources};
pub use jwks::JwksSettings;
pub use validate::{AuthConfig, KeyMaterial};

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

/// A stream ticket as one request used it (see `crate::tickets`).
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

/// Why a request was not authenticated. Every variant but
/// [`AuthError::KeysUnavailable`] answers 401 with
/// `WWW-Authenticate: Bearer error="invalid_token"`: that one is the
/// server's state, not the token's fault, so it answers 503.
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
    /// The token's `kid` (or, without one, its algorithm) selects no key of
    /// the identity provider's key set, also after a refresh.
    #[error("the token's key (`kid`) is not in the identity provider's key set")]
    UnknownKey,
    /// No JWKS could be loaded yet, so no token can be checked; the client
    /// may retry after `retry_after`.
    #[error("the identity provider's keys (JWKS) could not be loaded yet; retry shortly")]
    KeysUnavailable {
        /// When the next attempt to load them may happen.
        retry_after: Duration,
    },
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
            // Spelled once, in the stream terminal codes, which end a
            // stream whose token expired the same way.
            AuthError::Expired => ErrorCode::TokenExpired.as_str(),
            AuthError::NotYetValid => "token_not_yet_valid",
            AuthError::BadSignature => "bad_signature",
            AuthError::Algorithm(_) => "algorithm_not_allowed",
            AuthError::Issuer => "invalid_issuer",
            AuthError::Audience => "invalid_audience",
            AuthError::MissingClaim(_) => "missing_claim",
            AuthError::InvalidClaims => "invalid_claims",
            AuthError::UnknownKey => "unknown_key",
            AuthError::KeysUnavailable { .. } => "jwks_unavailable",
            AuthError::InvalidTicket => "invalid_ticket",
            AuthError::TicketExpired => "ticket_expired",
            AuthError::TicketUsed => "ticket_used",
            AuthError::TicketNotAccepted => "ticket_not_accepted",
        }
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
    /// public key or a JWKS, RS256 with a secret): allowing it is how
    /// algorithm confusion attacks work.
    #[error("`{0}` does not fit the configured key")]
    AlgorithmMismatch(String),
    /// The JWKS URL is not an absolute http or https URL.
    #[error("not an http:// or https:// URL: {0}")]
    JwksUrl(String),
    /// The JWKS file cannot be read or holds no usable key.
    #[error("{0}")]
    JwksFile(String),
    /// The HTTP client for the JWKS URL cannot be built.
    #[error("cannot build the JWKS HTTP client: {0}")]
    JwksClient(String),
}

/// Why a token could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// Only a public key is configured.
    #[error(
        "no signing key: with jwt_public_key_file, set jwt_private_key_file too (with a JWKS, the identity provider mints tokens)"
    )]
    NoSigningKey,
    /// The crypto backend refused.
    #[error("signing failed: {0}")]
    Sign(String),
}
