//! Stream tickets: short-lived, single-use stand-ins for a JWT, so that no
//! long-lived token sits in an `EventSource` URL (which ends up in proxy
//! logs and browser history).
//!
//! `POST /v1/tickets` ([`mint`]) turns the caller's token into a ticket: 256
//! random bits, base64url, good for [`crate::config::Config::ticket_ttl`]
//! (never past the token's `exp`) and carrying what the token granted
//! (subject, scopes, `exp`, class). The store keeps it under its SHA-256
//! digest, never the ticket itself.
//!
//! A ticket's life, enforced by [`redeem`] (called by the one extractor
//! every authenticated route uses) and [`bind`]:
//! 1. Its first request (whichever it is, decided atomically by the store,
//!    across replicas with Redis) is served. What that request opens, a
//!    stream (`StreamService::open` or a resume) or a channel
//!    subscription, is bound to the ticket by [`bind`].
//! 2. After that the ticket is accepted only for a reconnect to what it
//!    opened: a `GET` of the same path, naming its stream in
//!    `Last-Event-ID` (header or `last_event_id` query) for a stream, or of
//!    the same channel. That is what a browser `EventSource` does after a
//!    dropped connection. Anything else is `ticket_used`.
//! 3. A used ticket is kept as long as its stream can be resumed
//!    (`max_stream_duration` plus `stream_ttl`), and never works past its
//!    token's `exp`.
//!
//! Forgetting to [`bind`] on some new route only makes its tickets
//! non-reconnectable: the check that refuses reuse is in [`redeem`], which
//! no route can skip.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::auth::{AuthError, Principal, Scope, TicketUse};
use crate::event::StreamId;
use crate::store::{Store, StoreError};

/// Random bytes in a ticket (256 bits).
const TICKET_BYTES: usize = 32;
/// Length of a ticket: [`TICKET_BYTES`] in unpadded base64url.
const TICKET_LEN: usize = 43;
/// How long an unused ticket is remembered past its lifetime, so that a late
/// one is answered `ticket_expired` rather than `invalid_ticket`.
const EXPIRED_KEPT: Duration = Duration::from_secs(60);

/// Why a ticket was not issued or not accepted.
#[derive(Debug, thiserror::Error)]
pub enum TicketError {
    /// The ticket (or the token minting one) is refused: 401.
    #[error(transparent)]
    Refused(#[from] AuthError),
    /// The store could not be asked.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The in-memory ticket table is full.
    #[error("too many stream tickets are outstanding; retry shortly")]
    Full,
    /// The OS random number generator failed.
    #[error("OS RNG failed: {0}")]
    Rng(String),
    /// A ticket entry could not be written as JSON (a bug).
    #[error("ticket entry: {0}")]
    Encode(#[from] serde_json::Error),
}

/// A freshly issued ticket.
#[derive(Debug)]
pub struct Minted {
    /// The ticket, for the client only: it is not stored or logged.
    pub ticket: String,
    /// Until its first use must happen (whole seconds, rounded down).
    pub expires_in: u64,
}

/// What a request presenting a ticket asks for, as far as reuse is
/// concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    /// `METHOD /path` (no query).
    pub route: String,
    /// The stream its resume point (`Last-Event-ID`) names, if any.
    pub resumes: Option<StreamId>,
}

/// What a ticket's first use opened: the one thing it may reconnect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A stream (opened or resumed).
    Stream(StreamId),
    /// A channel subscription.
    Channel(String),
}

impl Target {
    fn encode(&self) -> String {
        match self {
            Target::Stream(id) => format!("stream:{id}"),
            Target::Channel(name) => format!("channel:{name}"),
        }
    }

    fn decode(text: &str) -> Option<Self> {
        match text.split_once(':')? {
            ("stream", id) => StreamId::parse(id).map(Target::Stream),
            ("channel", name) => Some(Target::Channel(name.to_owned())),
            _ => None,
        }
    }
}

/// What a ticket grants, as stored.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    sub: String,
    scopes: Vec<String>,
    /// The token's `exp` (Unix seconds).
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    class: Option<String>,
    /// The first use must come before this (Unix milliseconds).
    until_ms: u64,
}

/// A ticket's first use, as stored.
#[derive(Debug, Serialize, Deserialize)]
struct FirstUse {
    route: String,
    at_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The store key of a ticket.
fn digest(ticket: &str) -> String {
    hex::encode(Sha256::digest(ticket.as_bytes()))
}

/// Issues a ticket for `caller` (who authenticated with a token: a ticket
/// cannot mint a ticket), valid for `ttl` or until the token's `exp`,
/// whichever comes first.
pub async fn mint(store: &Store, caller: &Principal, ttl: Duration) -> Result<Minted, TicketError> {
    if caller.ticket.is_some() {
        return Err(AuthError::TicketNotAccepted.into());
    }
    let now = now_ms();
    let until_ms = (now + ttl.as_millis() as u64).min(caller.expires_at.saturating_mul(1000));
    if until_ms <= now {
        return Err(AuthError::Expired.into());
    }
    let mut bytes = [0u8; TICKET_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| TicketError::Rng(e.to_string()))?;
    let ticket = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let record = Record {
        sub: caller.subject.clone(),
        scopes: caller.scopes().into_iter().map(|s| s.as_str().to_owned()).collect(),
        exp: caller.expires_at,
        class: caller.class.clone(),
        until_ms,
    };
    let record = serde_json::to_string(&record)?;
    let lifetime = Duration::from_millis(until_ms - now);
    if !store.issue_ticket(&digest(&ticket), record, lifetime + EXPIRED_KEPT).await? {
        return Err(TicketError::Full);
    }
    tracing::debug!(subject = %caller.subject, "stream ticket issued");
    Ok(Minted { ticket, expires_in: lifetime.as_secs() })
}

/// The principal `ticket` stands for on a request asking for `presented`,
/// or why it is refused. A used ticket is kept `keep` (how long what it
/// opened can be reconnected to).
pub async fn redeem(
    store: &Store,
    ticket: &str,
    presented: Presented,
    keep: Duration,
) -> Result<Principal, TicketError> {
    let well_formed =
        ticket.len() == TICKET_LEN && ticket.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !well_formed {
        return Err(AuthError::InvalidTicket.into());
    }
    let key = digest(ticket);
    let now = now_ms();
    let this_use = FirstUse { route: presented.route.clone(), at_ms: now };
    let this_use = serde_json::to_string(&this_use)?;
    let taken = store.take_ticket(&key, this_use, keep).await?.ok_or(AuthError::InvalidTicket)?;
    let record: Record = serde_json::from_str(&taken.record).map_err(|_| AuthError::InvalidTicket)?;
    let first_use: FirstUse = serde_json::from_str(&taken.first_use).map_err(|_| AuthError::InvalidTicket)?;
    // Late at its first use: dead for good, however often it comes back.
    if first_use.at_ms > record.until_ms || now > record.exp.saturating_mul(1000) {
        return Err(AuthError::TicketExpired.into());
    }
    if !taken.first {
        let reconnect = presented.route.starts_with("GET ")
            && presented.route == first_use.route
            && match taken.binding.as_deref().and_then(Target::decode) {
                Some(Target::Stream(id)) => presented.resumes == Some(id),
                Some(Target::Channel(_)) => true,
                None => false,
            };
        if !reconnect {
            return Err(AuthError::TicketUsed.into());
        }
    }
    let scopes: Vec<Scope> = record.scopes.iter().filter_map(|s| Scope::parse(s)).collect();
    let mut principal = Principal::new(record.sub, &scopes, record.exp, record.class);
    principal.ticket = Some(TicketUse { key, first: taken.first });
    Ok(principal)
}

/// Binds what `caller` just opened to its ticket, if this request is the
/// ticket's first use (a no-op for tokens and for reconnects).
pub async fn bind(store: &Store, caller: &Principal, opened: Target) -> Result<(), StoreError> {
    match &caller.ticket {
        Some(TicketUse { key, first: true }) => store.bind_ticket(key, opened.encode()).await,
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreSettings;

    fn store() -> Store {
        Store::memory(StoreSettings {
            stream_max_events: 10,
            replication_window: Duration::from_millis(50),
            stream_ttl: Duration::from_secs(60),
            channel_max_events: 10,
            channel_ttl: Duration::from_secs(60),
        })
    }

    fn alice() -> Principal {
        let exp = now_ms() / 1000 + 3600;
        Principal::new("alice".into(), &[Scope::Stream], exp, Some("gold".into()))
    }

    fn get(path: &str, resumes: Option<StreamId>) -> Presented {
        Presented { route: format!("GET {path}"), resumes }
    }

    const KEEP: Duration = Duration::from_secs(60);

    fn code(result: Result<Principal, TicketError>) -> &'static str {
        match result {
            Ok(_) => "ok",
            Err(TicketError::Refused(e)) => e.code(),
            Err(_) => "other",
        }
    }

    #[tokio::test]
    async fn a_ticket_carries_its_token_and_reconnects_only_to_its_stream() {
        let store = store();
        let Ok(minted) = mint(&store, &alice(), Duration::from_secs(30)).await else { panic!("mint") };
        assert_eq!(minted.ticket.len(), TICKET_LEN);
        assert_eq!(minted.expires_in, 30);
        let Ok(first) = redeem(&store, &minted.ticket, get("/v1/stream", None), KEEP).await else { panic!("first") };
        assert_eq!(
            (first.subject.as_str(), first.scopes(), first.class.as_deref()),
            ("alice", vec![Scope::Stream], Some("gold"))
        );
        assert!(first.ticket.as_ref().is_some_and(|t| t.first && !t.key.contains(&minted.ticket)));
        let (Ok(s), Ok(other)) = (StreamId::random(), StreamId::random()) else { panic!("rng") };
        assert!(bind(&store, &first, Target::Stream(s)).await.is_ok());
        let again = redeem(&store, &minted.ticket, get("/v1/stream", Some(s)), KEEP).await;
        assert!(again.as_ref().is_ok_and(|p| p.ticket.as_ref().is_some_and(|t| !t.first)));
        assert_eq!(code(redeem(&store, &minted.ticket, get("/v1/stream", None), KEEP).await), "ticket_used");
        assert_eq!(code(redeem(&store, &minted.ticket, get("/v1/stream", Some(other)), KEEP).await), "ticket_used");
        assert_eq!(code(redeem(&store, &minted.ticket, get("/v1/streams/x", Some(s)), KEEP).await), "ticket_used");
        let post = Presented { route: "POST /v1/stream".into(), resumes: Some(s) };
        assert_eq!(code(redeem(&store, &minted.ticket, post, KEEP).await), "ticket_used");
    }

    #[tokio::test]
    async fn unknown_malformed_and_ticket_minted_tickets_are_refused() {
        let store = store();
        let unknown = "A".repeat(TICKET_LEN);
        assert_eq!(code(redeem(&store, &unknown, get("/", None), KEEP).await), "invalid_ticket");
        assert_eq!(code(redeem(&store, "short", get("/", None), KEEP).await), "invalid_ticket");
        let Ok(minted) = mint(&store, &alice(), Duration::from_secs(30)).await else { panic!("mint") };
        let Ok(holder) = redeem(&store, &minted.ticket, get("/v1/tickets", None), KEEP).await else { panic!("use") };
        assert!(matches!(
            mint(&store, &holder, Duration::from_secs(30)).await,
            Err(TicketError::Refused(AuthError::TicketNotAccepted))
        ));
    }

    #[tokio::test]
    async fn a_ticket_never_outlives_its_token() {
        let store = store();
        let mut short = alice();
        short.expires_at = now_ms() / 1000 + 5;
        let Ok(minted) = mint(&store, &short, Duration::from_secs(30)).await else { panic!("mint") };
        assert!(minted.expires_in <= 5);
        let mut gone = alice();
        gone.expires_at = now_ms() / 1000 - 1;
        assert!(matches!(
            mint(&store, &gone, Duration::from_secs(30)).await,
            Err(TicketError::Refused(AuthError::Expired))
        ));
    }
}
