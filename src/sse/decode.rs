//! Decoding side: an incremental event-stream parser that follows the WHATWG
//! algorithm step by step (BOM, CR/LF/CRLF line ends split across reads,
//! field parsing, one optional leading space, `id` with NUL ignored, `retry`
//! digits only, empty data not dispatched, an unterminated block dropped).
//!
//! Bytes become text only per complete line, after the line ends are found (they are ASCII and
//! cannot occur inside a multi-byte character): a character cut across two reads is whole
//! again by then, and invalid UTF-8 becomes U+FFFD within its own line.

/// One item seen on the stream, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A dispatched event, as an `EventSource` would deliver it.
    Message {
        /// The `event:` type, `"message"` when none was given.
        event: String,
        /// Data lines joined with LF.
        data: String,
        /// The last event id in force when the event was dispatched.
        /// It persists across events until the next `id:` field; `Some("")` after an empty
        /// one, which resets it. `None` only while no `id:` was ever seen.
        id: Option<String>,
    },
    /// A comment line (`: ...`); `EventSource` ignores these.
    /// One leading space is stripped, as from field values. Reported (a browser drops them) so
    /// that a client can see heartbeats arrive; the benchmark's idle clients count them.
    Comment(String),
    /// A valid `retry:` field (milliseconds).
    /// Reported when its line is read, not at dispatch. A value that is not all ASCII digits is
    /// ignored, as the spec says; so is one too large for a `u64`.
    Retry(u64),
}

/// An item as [`Parser::feed_with`] lends it: borrowed from the parser's
/// buffers, so parsing costs no allocation per event.
/// It lives only for the callback: the next line may overwrite those buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventRef<'a> {
    /// A dispatched event (see [`Event::Message`]).
    Message {
        /// The `event:` type, `"message"` when none was given.
        event: &'a str,
        /// Data lines joined with LF.
        data: &'a str,
        /// The last event id in force.
        id: Option<&'a str>,
    },
    /// A comment line.
    Comment(&'a str),
    /// A valid `retry:` field (milliseconds).
    Retry(u64),
}

impl EventRef<'_> {
    /// An owned copy, for keeping an item past the callback ([`Parser::feed`] makes one per
    /// item).
    pub fn to_owned_event(&self) -> Event {
        match *self {
            EventRef::Message { event, data, id } => {
                Event::Message { event: event.to_owned(), data: data.to_owned(), id: id.map(str::to_owned) }
            }
            EventRef::Comment(text) => Event::Comment(text.to_owned()),
            EventRef::Retry(ms) => Event::Retry(ms),
        }
    }
}

/// A line as text: invalid UTF-8 becomes U+FFFD as the spec says. Valid
/// text (nearly always) takes the fast validation path and no copy.
fn text(line: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(line) {
        Ok(text) => std::borrow::Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(line),
    }
}

/// Incremental parser: feed it bytes as they arrive, take events out.
#[derive(Debug, Default)]
pub struct Parser {
    /// A line not yet ended, carried across reads; before the stream has started, also the
    /// bytes that may still turn out to be a BOM. Its allocation is kept between lines.
    line: Vec<u8>,
    /// A CR ended the previous read; an LF opening the next one belongs to it.
    after_cr: bool,
    /// Whether the start of the stream is past: a BOM is only stripped there.
    started: bool,
    /// The data buffer: each `data:` value followed by LF; the last LF goes at dispatch.
    data: String,
    /// The event type buffer (empty means `message`), reset at every dispatch.
    event_type: String,
    /// The last event ID buffer. Unlike the other two it is not reset at dispatch: per the
    /// spec an id stays in force for the following events.
    last_id: String,
    /// Whether an `id:` field was seen (`last_id` may be empty on purpose).
    has_id: bool,
}

impl Parser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// The last event id seen (what `EventSource` would send as
    /// `Last-Event-ID` on reconnect). `Some("")` after an empty `id:` field, for which an
    /// `EventSource` sends no header at all.
    pub fn last_event_id(&self) -> Option<&str> {
        self.has_id.then_some(self.last_id.as_str())
    }

    /// Feeds bytes and returns the items they complete. Allocates for each item; the hot paths
    /// use [`Parser::feed_with`].
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Event> {
        let mut out = Vec::new();
        self.feed_with(bytes, |event| out.push(event.to_owned_event()));
        out
    }

    /// Feeds bytes and lends each item they complete to `on_item`, in
    /// order, without allocating per item (the hot path of a client or of
    /// an upstream reader).
    ///
    /// `bytes` may be cut anywhere, inside a UTF-8 character, a CRLF or the BOM included: what
    /// is incomplete waits for the next call. There is no end-of-stream call, so a last block
    /// without its blank line is never dispatched, as the spec wants.
    pub fn feed_with(&mut self, bytes: &[u8], mut on_item: impl FnMut(EventRef<'_>)) {
        if !self.started {
            // A leading BOM is dropped; it may itself arrive split across reads.
            self.line.extend_from_slice(bytes);
            const BOM: &[u8] = b"\xEF\xBB\xBF";
            if self.line.len() < BOM.len() && BOM.starts_with(&self.line) {
                return;
            }
            self.started = true;
            let mut head = std::mem::take(&mut self.line);
            if head.starts_with(BOM) {
                head.drain(..BOM.len());
            }
            self.feed_bytes(&head, &mut on_item);
            return;
        }
        self.feed_bytes(bytes, &mut on_item);
    }

    /// Splits `bytes` into lines and processes each complete one; the rest waits in `line`.
    /// A CR is a line end by itself, so its line is processed at once even when it is the last
    /// byte of a read; `after_cr` then keeps an LF opening the next read from counting as an
    /// empty line, which would dispatch too early.
    fn feed_bytes(&mut self, bytes: &[u8], out: &mut impl FnMut(EventRef<'_>)) {
        let mut i = 0;
        if self.after_cr && !bytes.is_empty() {
            // CRLF split across two reads: the LF ends nothing new.
            if bytes[0] == b'\n' {
                i = 1;
            }
            self.after_cr = false;
        }
        while i < bytes.len() {
            match memchr::memchr2(b'\r', b'\n', &bytes[i..]) {
                None => {
                    self.line.extend_from_slice(&bytes[i..]);
                    return;
                }
                Some(pos) => {
                    let start = i;
                    let end = i + pos;
                    i = end + 1;
                    if bytes[end] == b'\r' {
                        if i == bytes.len() {
                            self.after_cr = true;
                        } else if bytes[i] == b'\n' {
                            i += 1;
                        }
                    }
                    if self.line.is_empty() {
                        // The whole line is in this read: no copy.
                        self.process_line(&text(&bytes[start..end]), out);
                    } else {
                        // The line began in an earlier read; its buffer is
                        // kept (cleared) for the next partial line.
                        let mut line = std::mem::take(&mut self.line);
                        line.extend_from_slice(&bytes[start..end]);
                        self.process_line(&text(&line), out);
                        line.clear();
                        self.line = line;
                    }
                }
            }
        }
    }

    /// One line, by the spec's rules: empty dispatches, a leading colon makes a comment, unknown
    /// fields are ignored, and a line without a colon is a field with an empty value (a bare
    /// `data` adds an empty data line).
    fn process_line(&mut self, line: &str, out: &mut impl FnMut(EventRef<'_>)) {
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if let Some(comment) = line.strip_prefix(':') {
            out(EventRef::Comment(comment.strip_prefix(' ').unwrap_or(comment)));
            return;
        }
        let (field, value) = match line.find(':') {
            Some(pos) => {
                let value = &line[pos + 1..];
                (&line[..pos], value.strip_prefix(' ').unwrap_or(value))
            }
            None => (line, ""),
        };
        match field {
            "event" => {
                self.event_type.clear();
                self.event_type.push_str(value);
            }
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
            }
            "id" if !value.contains('\0') => {
                self.last_id.clear();
                self.last_id.push_str(value);
                self.has_id = true;
            }
            "retry" => {
                if !value.is_empty()
                    && value.bytes().all(|b| b.is_ascii_digit())
                    && let Ok(ms) = value.parse()
                {
                    out(EventRef::Retry(ms));
                }
            }
            _ => {}
        }
    }

    /// Ends a block: an event is dispatched only if some `data:` field came, and the data and
    /// type buffers start over either way; the id stays.
    fn dispatch(&mut self, out: &mut impl FnMut(EventRef<'_>)) {
        // The buffers are cleared, not freed: the next event reuses them.
        if !self.data.is_empty() {
            let data = self.data.strip_suffix('\n').unwrap_or(&self.data);
            let event = if self.event_type.is_empty() { "message" } else { &self.event_type };
            out(EventRef::Message { event, data, id: self.has_id.then_some(self.last_id.as_str()) });
        }
        self.data.clear();
        self.event_type.clear();
    }
}
