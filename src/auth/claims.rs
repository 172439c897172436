//! The claims tokengate reads from a verified token and writes into a
//! minted one, and how they become a [`Principal`]. The signature and the
//! time, issuer and audience checks are jsonwebtoken's (configured in
//! [`super::validate`]); this is only the shape of what is read.

use serde::{Deserialize, Serialize};

use super::{AuthError, Principal, Scope};

/// `scope` may be a space-separated string (RFC 8693) or an array.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub(super) enum ScopeClaim {
    Text(String),
    List(Vec<String>),
}

/// `aud` may be one string or an array of them (RFC 7519 §4.1.3); identity
/// providers such as Auth0 and Keycloak send the array. Read only for its
/// shape: whether it names the configured audience is jsonwebtoken's
/// check, which accepts both forms.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub(super) enum AudienceClaim {
    One(String),
    Many(Vec<String>),
}

/// The claims tokengate reads and writes. Every one is optional here, also
/// the required `sub` and `exp`, so that a missing one is reported by the
/// validator as `missing_claim` rather than as a shape error.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Claims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) exp: Option<u64>,
    /// Written when minting, for whoever inspects the token; not checked:
    /// `exp` and `nbf` are what bound its validity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) iat: Option<u64>,
    /// Either form (see [`ScopeClaim`]): identity providers differ, and a
    /// token should not fail over how its scopes are spelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) scope: Option<ScopeClaim>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) iss: Option<String>,
    /// Either form (see [`AudienceClaim`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) aud: Option<AudienceClaim>,
    /// Every other claim, for the configured class claim (see
    /// [`Principal::class`]). Empty when minting.
    #[serde(flatten, skip_serializing)]
    pub(super) other: serde_json::Map<String, serde_json::Value>,
}

impl Claims {
    /// Who the verified token speaks for: its `sub`, the scopes tokengate
    /// knows (others are ignored), `exp`, and the value of `class_claim`.
    pub(super) fn into_principal(self, class_claim: Option<&str>) -> Result<Principal, AuthError> {
        let subject = match self.sub {
            Some(sub) if !sub.is_empty() => sub,
            _ => return Err(AuthError::MissingClaim("sub".into())),
        };
        let names: Vec<&str> = match &self.scope {
            None => Vec::new(),
            Some(ScopeClaim::Text(s)) => s.split_ascii_whitespace().collect(),
            Some(ScopeClaim::List(l)) => l.iter().map(String::as_str).collect(),
        };
        let scopes = names.into_iter().filter_map(Scope::parse).fold(0, |bits, s| bits | s.bit());
        let class = class_claim.and_then(|name| match self.other.get(name) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => Some(v.to_string()),
            _ => None,
        });
        Ok(Principal { subject, scopes, expires_at: self.exp.unwrap_or(0), class, ticket: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(value: serde_json::Value) -> Claims {
        serde_json::from_value(value).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn aud_reads_as_a_string_or_an_array() {
        let one = claims(serde_json::json!({"sub": "a", "aud": "tokengate"}));
        assert!(matches!(one.aud, Some(AudienceClaim::One(ref a)) if a == "tokengate"));
        let many = claims(serde_json::json!({"sub": "a", "aud": ["account", "tokengate"]}));
        assert!(matches!(many.aud, Some(AudienceClaim::Many(ref a)) if a.len() == 2));
    }

    #[test]
    fn scopes_and_class_come_from_either_form() {
        let p = claims(serde_json::json!({"sub": "a", "exp": 9, "scope": ["stream", "other"], "tier": 2}))
            .into_principal(Some("tier"));
        let Ok(p) = p else { panic!("{p:?}") };
        assert_eq!(p.scopes(), vec![Scope::Stream]);
        assert_eq!((p.expires_at, p.class.as_deref()), (9, Some("2")));
        let p = claims(serde_json::json!({"sub": "a", "scope": "publish admin"})).into_principal(None);
        assert!(p.is_ok_and(|p| p.scopes() == vec![Scope::Publish, Scope::Admin] && p.class.is_none()));
    }

    #[test]
    fn an_empty_subject_is_a_missing_claim() {
        let p = claims(serde_json::json!({"sub": ""})).into_principal(None);
        assert_eq!(p, Err(AuthError::MissingClaim("sub".into())));
    }
}
