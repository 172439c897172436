//! The bodies of the fuzz targets: each takes arbitrary bytes, drives one
//! parser or validator of untrusted input with them, and panics when a
//! property fails. The libFuzzer entry points in `fuzz/` call these, and so
//! does the corpus replay in the test suite, so the committed corpora are
//! checked on every `cargo test` without the fuzz build. Not an API: hidden
//! from the docs, and panicking on purpose.
//!
//! Inputs are split into fields at `0xFF` bytes (a byte that never occurs
//! in UTF-8), so seed files stay mostly readable text; a field that is not
//! UTF-8 is read lossily.

use std::borrow::Cow;

use axum::http::{HeaderMap, HeaderValue};
use bytes::BytesMut;
use serde_json::json;

use crate::api::channels::{MAX_CHANNEL_NAME, MAX_EVENT_NAME, RESERVED_EVENTS, check_event_name, check_name};
use crate::api::resume::{GAP_SEEN, last_event_id, parse_event_id, resume_point};
use crate::auth::{AuthConfig, KeyMaterial, TokenSources};
use crate::config::{Config, Settings};
use crate::event::Usage;
use crate::generator::{UpstreamEnd, UpstreamRead, read_upstream};
use crate::secret::Secret;
use crate::sse::{Event, Parser, push_comment, push_event, push_json_string, push_retry};
use crate::store::ChannelPosition;
use crate::stream::StreamId;

/// A target's body: panics when a property fails for this input.
pub type Target = fn(&[u8]);

/// Every target by name (the name of its binary in `fuzz/` and of its
/// corpus directory `fuzz/corpus/<name>/`), for the corpus replay.
pub const TARGETS: &[(&str, Target)] = &[
    ("sse_encoder", sse_encoder),
    ("upstream_stream", upstream_stream),
    ("token_extraction", token_extraction),
    ("event_ids", event_ids),
    ("names", names),
    ("config", config),
];

/// The input's fields (split at `0xFF`).
fn fields(data: &[u8]) -> Vec<&[u8]> {
    data.split(|&b| b == 0xFF).collect()
}

/// A field as text.
fn text(field: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(field)
}

/// `bytes` cut into reads of the lengths in `sizes` (one byte each, so a
/// read may be empty), the rest in one last read.
fn cut<'a>(bytes: &'a [u8], sizes: &[u8]) -> Vec<&'a [u8]> {
    let mut reads = Vec::new();
    let mut rest = bytes;
    for &size in sizes {
        let (read, after) = rest.split_at(usize::from(size).min(rest.len()));
        reads.push(read);
        rest = after;
    }
    reads.push(rest);
    reads
}

/// A small deterministic generator (xorshift), seeded from the input, for
/// the choices a target makes that the input does not spell out.
struct Rng(u64);

impl Rng {
    fn new(data: &[u8]) -> Self {
        // FNV-1a; never zero, which would stay zero under xorshift.
        let hash =
            data.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        Self(hash | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Parses `bytes` in the reads `cut` gives, through [`Parser::feed`].
fn parse_reads(reads: &[&[u8]]) -> Vec<Event> {
    let mut parser = Parser::new();
    reads.iter().flat_map(|read| parser.feed(read)).collect()
}

/// Parses `bytes` at once, through [`Parser::feed_with`].
fn parse_whole(bytes: &[u8]) -> Vec<Event> {
    let mut events = Vec::new();
    Parser::new().feed_with(bytes, |item| events.push(item.to_owned_event()));
    events
}

/// What a spec parser gives back for `data`: every line end becomes LF.
fn normalized(data: &str) -> String {
    data.replace("\r\n", "\n").replace('\r', "\n")
}

/// The SSE encoder against the spec parser. Fields: data, event name, id,
/// read sizes (the last three optional). A retry, a comment, an event with
/// the given id and name, the data again as a JSON string and a last event
/// come back exactly as the spec says, however the bytes are cut.
pub fn sse_encoder(data: &[u8]) {
    let f = fields(data);
    let body = text(f[0]);
    let event = f.get(1).map(|e| text(e));
    let id = f.get(2).map(|i| text(i));
    let sizes = f.get(3).copied().unwrap_or_default();
    let retry = Rng::new(data).next();

    let mut buf = BytesMut::new();
    push_retry(&mut buf, retry);
    push_comment(&mut buf, &body);
    push_event(&mut buf, id.as_deref(), event.as_deref(), &body);
    let mut json = BytesMut::new();
    push_json_string(&mut json, &body);
    let Ok(json) = std::str::from_utf8(&json) else { panic!("push_json_string wrote invalid UTF-8: {json:?}") };
    assert!(!json.contains(['\r', '\n']), "a raw line break in JSON: {json:?}");
    push_event(&mut buf, None, Some("json"), json);
    push_event(&mut buf, None, None, "");

    let clean = |s: &str, nul: bool| s.chars().filter(|&c| c != '\r' && c != '\n' && !(nul && c == '\0')).collect();
    let id = id.map(|i| clean(&i, true));
    let event: String = event.map(|e| clean(&e, false)).unwrap_or_default();
    let message = |event: &str, data: String| Event::Message {
        event: if event.is_empty() { "message".into() } else { event.into() },
        data,
        id: id.clone(),
    };
    let mut expected = vec![Event::Retry(retry)];
    expected.extend(normalized(&body).split('\n').map(|line| Event::Comment(line.into())));
    expected.push(message(&event, normalized(&body)));
    expected.push(message("json", json.into()));
    expected.push(message("", String::new()));

    let whole = parse_whole(&buf);
    assert_eq!(whole, expected, "encoded: {:?}", String::from_utf8_lossy(&buf));
    assert_eq!(parse_reads(&cut(&buf, sizes)), expected, "cut at {sizes:?}");
    let Some(Event::Message { data: json, .. }) = whole.get(whole.len() - 2) else { panic!("no JSON event") };
    let decoded: Result<String, _> = serde_json::from_str(json);
    assert_eq!(decoded.ok().as_deref(), Some(&*body), "JSON string {json:?}");
}

/// Everything but where the text was cut.
fn joined(read: &UpstreamRead) -> (String, Option<Usage>, bool, Option<UpstreamEnd>) {
    (read.texts.concat(), read.usage, read.finished, read.end.clone())
}

/// The upstream SSE parser and chunk decoders (OpenAI chat chunks and
/// Anthropic message events). The first byte picks the mode:
/// - 0, 1 (mod 4): fields raw bytes and read sizes, read as an OpenAI (0)
///   or Anthropic (1) stream: no panic, and the text, usage, finish and end
///   do not depend on how the bytes were cut into reads (in the given
///   sizes, at once, or one byte at a time);
/// - 2, 3: each field is one text delta, framed as a real OpenAI (2) or
///   Anthropic (3) stream with LF or CRLF line ends and cut at random: the
///   text that comes out is exactly the deltas joined, with the usage sent.
pub fn upstream_stream(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let anthropic = mode % 2 == 1;
    if mode % 4 < 2 {
        let f = fields(rest);
        let bytes = f[0];
        let sizes = f.get(1).copied().unwrap_or_default();
        let whole = read_upstream(&[bytes], anthropic);
        let reads = read_upstream(&cut(bytes, sizes), anthropic);
        assert_eq!(joined(&reads), joined(&whole), "reads of {sizes:?}");
        if bytes.len() <= 4096 {
            let bytewise: Vec<&[u8]> = bytes.chunks(1).collect();
            assert_eq!(joined(&read_upstream(&bytewise, anthropic)), joined(&whole), "bytewise");
        }
        return;
    }
    let deltas: Vec<Cow<'_, str>> = fields(rest).into_iter().map(text).collect();
    let mut rng = Rng::new(data);
    let (input, output) = (rng.next() >> rng.below(64), rng.next() >> rng.below(64));
    let mut buf = BytesMut::new();
    let mut frame =
        |event: Option<&str>, value: serde_json::Value| push_event(&mut buf, None, event, &value.to_string());
    let usage = if anthropic {
        frame(Some("message_start"), json!({"type": "message_start", "message": {"usage": {"input_tokens": input}}}));
        frame(Some("content_block_start"), json!({"type": "content_block_start", "index": 0}));
        for delta in &deltas {
            frame(Some("ping"), json!({"type": "ping"}));
            frame(
                Some("content_block_delta"),
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": delta}}),
            );
        }
        frame(Some("content_block_stop"), json!({"type": "content_block_stop", "index": 0}));
        frame(
            Some("message_delta"),
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": output}}),
        );
        frame(Some("message_stop"), json!({"type": "message_stop"}));
        Usage { prompt_tokens: input, completion_tokens: output, total_tokens: input.saturating_add(output) }
    } else {
        let usage = Usage { prompt_tokens: input, completion_tokens: output, total_tokens: rng.next() };
        for delta in &deltas {
            frame(
                None,
                json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": delta}}]}),
            );
        }
        frame(None, json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage}));
        push_event(&mut buf, None, None, "[DONE]");
        usage
    };
    let mut bytes = buf.to_vec();
    if rng.below(2) == 1 {
        // JSON has no raw line breaks: every LF here ends a line.
        bytes = String::from_utf8_lossy(&bytes).replace('\n', "\r\n").into_bytes();
    }
    let sizes: Vec<u8> = (0..rng.below(64)).map(|_| rng.below(48) as u8).collect();
    let read = read_upstream(&cut(&bytes, &sizes), anthropic);
    assert_eq!(joined(&read), (deltas.concat(), Some(usage), true, Some(UpstreamEnd::Done)), "reads of {sizes:?}");
}

/// Token sources as the default config names them.
fn auth_config() -> Option<AuthConfig> {
    let key = KeyMaterial::Secret { secret: Secret::new(vec![7; 32]), generated: false };
    let sources = TokenSources { cookie: "c".into(), query: "q".into(), ticket: "t".into() };
    AuthConfig::new(key, None, None, None, std::time::Duration::ZERO, sources).ok()
}

/// Headers with `name` set to each line of `field` that is a valid value.
fn headers_from(map: &mut HeaderMap, name: &'static str, field: Option<&[u8]>) {
    for line in field.unwrap_or_default().split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        if let Ok(value) = HeaderValue::from_bytes(line) {
            map.append(name, value);
        }
    }
}

/// Token extraction from headers, cookies and query strings, and the
/// ticket lookup. Fields: `Authorization` values (one per line), the
/// `x-api-key` value, `Cookie` values (one per line), a query string, and a
/// token. What is found is what was sent, by the documented precedence, and
/// a token put in each source is found there exactly.
pub fn token_extraction(data: &[u8]) {
    let Some(auth) = auth_config() else { panic!("the fixed auth config is refused") };
    let f = fields(data);
    let query = f.get(3).map(|q| text(q));
    let token = f.get(4).map(|t| text(t)).unwrap_or_default();
    let mut headers = HeaderMap::new();
    headers_from(&mut headers, "authorization", f.first().copied());
    headers_from(&mut headers, "cookie", f.get(2).copied());
    let mut with_key = headers.clone();
    headers_from(&mut with_key, "x-api-key", f.get(1).copied());

    let found = auth.extract(&headers, query.as_deref());
    assert_eq!(auth.extract_with_api_key(&headers, query.as_deref()), found, "no x-api-key: same answer");
    let keyed = auth.extract_with_api_key(&with_key, query.as_deref());
    let bearer = headers.get_all("authorization").iter().filter_map(|v| v.to_str().ok()).find_map(|v| {
        let (scheme, token) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
    });
    if let Some(bearer) = &bearer {
        assert_eq!(found.as_ref(), Some(bearer), "bearer first");
        assert_eq!(keyed.as_ref(), Some(bearer), "bearer before x-api-key");
    }
    let header_values: Vec<&str> = with_key.values().filter_map(|v| v.to_str().ok()).collect();
    if let Some(t) = auth.extract_with_api_key(&with_key, None) {
        assert!(header_values.iter().any(|v| v.contains(t.as_str())), "{t:?} is in no header");
    }
    let _ = auth.ticket(query.as_deref());

    // A token in each source, alone, is found exactly.
    let mut query_pairs = form_urlencoded::Serializer::new(String::new());
    query_pairs.append_pair("x", &token).append_pair("q", &token).append_pair("t", &format!("{token}!"));
    let mut query = query_pairs.finish();
    if let Some(raw) = f.get(3) {
        query.push('&');
        query.push_str(&text(raw));
    }
    assert_eq!(auth.extract(&HeaderMap::new(), Some(&query)).as_deref(), Some(&*token), "query {query:?}");
    assert_eq!(auth.ticket(Some(&query)), Some(format!("{token}!")), "ticket in {query:?}");
    let visible = |v: &HeaderValue| v.to_str().is_ok();
    if let Ok(value) = HeaderValue::from_str(&format!("Bearer {token}"))
        && visible(&value)
    {
        let expected = Some(token.trim()).filter(|t| !t.is_empty());
        let headers = HeaderMap::from_iter([(axum::http::header::AUTHORIZATION, value)]);
        assert_eq!(auth.extract(&headers, None).as_deref(), expected, "bearer {token:?}");
    }
    if let Ok(value) = HeaderValue::from_str(&format!("other=1; c={token}"))
        && visible(&value)
        && !token.contains(';')
    {
        let headers = HeaderMap::from_iter([(axum::http::header::COOKIE, value)]);
        let expected = token.trim_end().trim_matches('"');
        assert_eq!(auth.extract(&headers, None).as_deref(), Some(expected), "cookie {token:?}");
    }
    if let Ok(value) = HeaderValue::from_str(&token)
        && visible(&value)
        && !token.trim().is_empty()
    {
        let headers = HeaderMap::from_iter([(axum::http::HeaderName::from_static("x-api-key"), value)]);
        assert_eq!(auth.extract_with_api_key(&headers, None).as_deref(), Some(token.trim()), "x-api-key {token:?}");
        assert_eq!(auth.extract(&headers, None), None, "x-api-key counts only where the route takes it");
    }
}

/// `Last-Event-ID` and stream-id parsing, and channel positions. Fields:
/// a `Last-Event-ID` header value, a `last_event_id` query value, and a
/// text parsed on its own. What parses formats back to itself (up to hex
/// case and leading zeros), a number that would reach the gap marker is
/// refused, and the resume point is the header's (or else, when the header
/// is absent or blank, the query's) position plus one.
pub fn event_ids(data: &[u8]) {
    let f = fields(data);
    let lone = f.get(2).map(|t| text(t)).unwrap_or_else(|| text(f[0]));

    if let Some(id) = StreamId::parse(&lone) {
        assert_eq!(id.to_string(), lone.to_ascii_lowercase());
        assert_eq!(StreamId::parse(&id.to_string()), Some(id));
    } else {
        assert!(lone.len() != 32 || !lone.bytes().all(|b| b.is_ascii_hexdigit()), "{lone:?} is an id");
    }
    if let Ok((id, seq)) = parse_event_id(&lone) {
        let (stream, tail) = lone.split_once('.').unwrap_or_default();
        assert_eq!(id.to_string(), stream.to_ascii_lowercase());
        assert!(tail == "gap" || tail.parse::<u64>().ok() == Some(seq), "{tail:?} is not {seq}");
        let formatted = if seq == GAP_SEEN { format!("{id}.gap") } else { format!("{id}.{seq}") };
        assert_eq!(parse_event_id(&formatted).ok(), Some((id, seq)), "{formatted:?}");
    }
    if let Some((_, tail)) = lone.split_once('.')
        && tail.parse::<u64>().is_ok_and(|n| n >= GAP_SEEN - 1)
    {
        assert!(parse_event_id(&lone).is_err(), "{lone:?} spells the gap marker as a number");
    }
    match ChannelPosition::parse(&lone) {
        Some(ChannelPosition::Seq(n)) => {
            assert!(lone.bytes().all(|b| b.is_ascii_digit()));
            assert_eq!(ChannelPosition::parse(&n.to_string()), Some(ChannelPosition::Seq(n)));
        }
        Some(ChannelPosition::Entry(entry)) => {
            assert_eq!(entry, *lone);
            let (ms, seq) = entry.split_once('-').unwrap_or_default();
            assert!(ms.parse::<u64>().is_ok() && seq.parse::<u64>().is_ok(), "{entry:?}");
        }
        None => {}
    }

    let mut headers = HeaderMap::new();
    if let Some(value) = f.first().and_then(|h| HeaderValue::from_bytes(h).ok()) {
        headers.insert("last-event-id", value);
    }
    let query = f.get(1).map(|q| text(q));
    let header_blank = headers.get("last-event-id").and_then(|v| v.to_str().ok()).is_some_and(|v| v.trim().is_empty());
    if header_blank && let Some(q) = query.as_deref().map(str::trim).filter(|q| !q.is_empty()) {
        assert_eq!(last_event_id(&headers, Some(q)).ok().flatten(), Some(q), "a blank header hides the query");
    }
    let point = resume_point(&headers, query.as_deref());
    let query_bad = query.as_deref().map(str::trim).is_some_and(|q| !q.is_empty() && parse_event_id(q).is_err());
    if query_bad {
        assert!(point.is_err(), "a malformed query value is refused");
    }
    match (point, last_event_id(&headers, query.as_deref())) {
        (Ok(Some((id, from))), Ok(Some(sent))) => {
            let parsed = parse_event_id(sent).ok();
            assert_eq!(parsed.map(|(i, seq)| (i, seq.saturating_add(1))), Some((id, from)), "{sent:?}");
        }
        (Ok(None), Ok(None)) | (Err(_), _) => {}
        (point, sent) => panic!("resume point {point:?} for {sent:?}"),
    }
}

/// Channel-name and event-name validation. Fields: a channel name and an
/// event name. Each is accepted exactly when it fits the documented
/// rules; an accepted channel name is a URL path segment as it is (never
/// the dot segments `.` and `..`, which URL handling removes), and an
/// accepted event name round-trips through the SSE encoder unchanged.
pub fn names(data: &[u8]) {
    let f = fields(data);
    let channel = text(f[0]);
    let event = f.get(1).map(|e| text(e)).unwrap_or_else(|| channel.clone());

    let channel_rule = (1..=MAX_CHANNEL_NAME).contains(&channel.len())
        && channel.chars().all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c))
        && channel != "."
        && channel != "..";
    assert_eq!(check_name(&channel).is_ok(), channel_rule, "channel {channel:?}");
    if channel_rule {
        let path = format!("/v1/channels/{channel}");
        let uri: Result<axum::http::Uri, _> = path.parse();
        assert_eq!(uri.ok().map(|u| u.path().to_owned()), Some(path.clone()), "{path:?}");
    }

    let event_rule = (1..=MAX_EVENT_NAME).contains(&event.len())
        && !event.contains(['\r', '\n', '\0'])
        && !RESERVED_EVENTS.contains(&&*event);
    assert_eq!(check_event_name(&event).is_ok(), event_rule, "event {event:?}");
    if event_rule {
        let mut buf = BytesMut::new();
        push_event(&mut buf, Some("7"), Some(&event), "{}");
        let events = Parser::new().feed(&buf);
        let sent = Event::Message { event: event.to_string(), data: "{}".into(), id: Some("7".into()) };
        assert_eq!(events, vec![sent]);
    }
}

/// The config loader: TOML text to [`Settings`] to [`Config`]. It never
/// panics, and every refusal is a [`crate::config::ConfigError`] naming a
/// setting and a reason. Settings that name files are dropped before
/// validation: reading arbitrary paths (`/dev/zero`) is not the loader's
/// logic, and a fuzzer must not walk the file system.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut settings = match Settings::from_toml_str(text) {
        Ok(settings) => settings,
        Err(e) => {
            assert_eq!(e.setting(), "config");
            assert!(e.to_string().contains("<string>"), "{e}");
            return;
        }
    };
    settings.jwt_secret_file = None;
    settings.jwt_public_key_file = None;
    settings.jwt_private_key_file = None;
    settings.jwks_file = None;
    settings.prompts_dir = None;
    if let Err(e) = Config::from_settings(settings) {
        assert!(!e.setting().is_empty());
        assert!(!e.to_string().is_empty());
    }
}
