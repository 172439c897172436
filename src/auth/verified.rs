//! Tokens verified recently, so that a client that opens stream after
//! stream with one token (every message of a chat) is not verified again
//! each time: decoding, the HMAC or signature check and the claims' JSON
//! were about a quarter of the CPU of a stream open, measured side by side
//! (BENCHMARKS.md, scenario 6).
//!
//! Only tokens that passed every check are kept, with the caller they
//! named, and only for a key that cannot change while the server runs (a
//! static secret or public key: a JWKS's keys rotate, so its tokens are
//! always verified). A kept token is still refused once its `exp` (with the
//! leeway) has passed: it is then verified again, which says why. Entries
//! are looked up by the whole token, never a prefix or digest, and the set
//! is bounded: when full it starts over.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use super::Principal;

/// Verified tokens and their callers, at most `capacity` of them.
#[derive(Debug)]
pub(super) struct VerifiedTokens {
    tokens: Mutex<HashMap<Box<str>, Principal>>,
    capacity: usize,
}

impl VerifiedTokens {
    /// An empty set holding at most `capacity` tokens.
    pub(super) fn new(capacity: usize) -> Self {
        Self { tokens: Mutex::new(HashMap::new()), capacity }
    }

    /// The caller `token` named when it was verified, if it was and its
    /// `exp` plus `leeway` is not before `now` (Unix seconds), as
    /// jsonwebtoken decides it; an expired entry is dropped.
    pub(super) fn get(&self, token: &str, now: u64, leeway: u64) -> Option<Principal> {
        let mut tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        let principal = tokens.get(token)?;
        if principal.expires_at.saturating_add(leeway) < now {
            tokens.remove(token);
            return None;
        }
        Some(principal.clone())
    }

    /// Keeps `token`, which has just passed every check, as naming
    /// `principal`.
    pub(super) fn insert(&self, token: &str, principal: &Principal) {
        if self.capacity == 0 {
            return;
        }
        let mut tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        if tokens.len() >= self.capacity && !tokens.contains_key(token) {
            // Starting over costs one verification per token in use, and
            // keeps the bound without any bookkeeping per lookup.
            tokens.clear();
        }
        tokens.insert(token.into(), principal.clone());
    }

    /// Tokens held.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.tokens.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(subject: &str, expires_at: u64) -> Principal {
        Principal { subject: subject.into(), scopes: 0, expires_at, class: None, ticket: None }
    }

    #[test]
    fn a_kept_token_is_found_until_its_exp_and_leeway_pass() {
        let kept = VerifiedTokens::new(8);
        kept.insert("tok.en.sig", &caller("a", 100));
        assert_eq!(kept.get("tok.en.sig", 100, 0).map(|p| p.subject), Some("a".into()));
        assert_eq!(kept.get("tok.en.sig", 105, 5).map(|p| p.subject), Some("a".into()), "within the leeway");
        assert_eq!(kept.get("tok.en.sig", 106, 5), None, "expired");
        assert_eq!(kept.len(), 0, "an expired entry is dropped");
    }

    #[test]
    fn only_the_whole_token_matches() {
        let kept = VerifiedTokens::new(8);
        kept.insert("tok.en.sig", &caller("a", u64::MAX));
        for other in ["tok.en.si", "tok.en.sig2", "tok.en.siG", ""] {
            assert_eq!(kept.get(other, 0, 0), None, "{other}");
        }
    }

    #[test]
    fn the_set_stays_within_its_bound() {
        let kept = VerifiedTokens::new(3);
        for i in 0..10 {
            kept.insert(&format!("t{i}"), &caller("a", u64::MAX));
            assert!(kept.len() <= 3);
        }
        assert!(kept.get("t9", 0, 0).is_some(), "the latest is kept");
        let none = VerifiedTokens::new(0);
        none.insert("t", &caller("a", u64::MAX));
        assert_eq!(none.len(), 0);
    }
}
