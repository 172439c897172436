//! Finding the token in a request: `Authorization: Bearer`, on the
//! Anthropic route `x-api-key`, the cookie, the query parameter; the first
//! present wins. Without any, a stream ticket in its query parameter. Only finding: whether it is valid is [`super::validate`]'s
//! question.

use axum::http::HeaderMap;

use super::AuthConfig;

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

impl AuthConfig {
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

    /// The stream ticket in the query, the last source of credentials
    /// (after every token source, see [`AuthConfig::extract`]).
    pub fn ticket(&self, query: Option<&str>) -> Option<String> {
        form_urlencoded::parse(query?.as_bytes())
            .find(|(name, _)| *name == self.sources().ticket.as_str())
            .map(|(_, ticket)| ticket.into_owned())
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
                        && name == self.sources().cookie
                    {
                        return Some(token.trim_matches('"').to_owned());
                    }
                }
            }
        }
        let query = query?;
        form_urlencoded::parse(query.as_bytes())
            .find(|(name, _)| *name == self.sources().query.as_str())
            .map(|(_, token)| token.into_owned())
    }
}
