//! Encoding side of the event-stream format.
//!
//! Every function appends to a caller-owned [`BytesMut`], so the hot path can
//! reuse one buffer for many events and hand them to the socket in one write.

use bytes::{BufMut, BytesMut};

/// Appends one event block: optional `id:` and `event:` fields, then `data`
/// split into one `data:` line per line, then the blank line that dispatches.
///
/// Any CR/LF in `id` or `event` is dropped (a line break there would let a
/// value inject fields), as is NUL in `id` (the spec makes parsers ignore such
/// ids). `data` is split on CRLF, CR and LF, which a conforming parser joins
/// back with LF; payloads that must keep exact line endings go in JSON, whose
/// string escapes carry no raw line breaks.
///
/// An empty `data` still gets one `data:` line, so the event is dispatched (with empty data)
/// instead of being dropped by the parser as a block without data. Every field gets one space
/// after its colon, which is the one a parser strips, so a value that starts with a space
/// keeps it.
pub fn push_event(buf: &mut BytesMut, id: Option<&str>, event: Option<&str>, data: &str) {
    if let Some(id) = id {
        push_field(buf, b"id: ", id, true);
    }
    if let Some(event) = event {
        push_field(buf, b"event: ", event, false);
    }
    for line in split_lines(data) {
        buf.put_slice(b"data: ");
        buf.put_slice(line.as_bytes());
        buf.put_u8(b'\n');
    }
    buf.put_u8(b'\n');
}

/// Appends a `retry:` block telling `EventSource` how long to wait before it
/// reconnects. A block of its own: without data it dispatches nothing, and a parser applies
/// the field as soon as it reads the line, so it can go anywhere in the stream.
pub fn push_retry(buf: &mut BytesMut, retry_ms: u64) {
    buf.put_slice(b"retry: ");
    push_u64(buf, retry_ms);
    buf.put_slice(b"\n\n");
}

/// Appends a comment block (`: text`), used as a heartbeat: parsers ignore it
/// but it keeps proxies and load balancers from timing the connection out.
/// Text with line breaks becomes one comment line per line, so a break cannot turn the rest
/// into a field.
pub fn push_comment(buf: &mut BytesMut, text: &str) {
    for line in split_lines(text) {
        buf.put_slice(b": ");
        buf.put_slice(line.as_bytes());
        buf.put_u8(b'\n');
    }
    buf.put_u8(b'\n');
}

/// Appends `s` as a JSON string literal (with quotes), escaping exactly what
/// RFC 8259 requires. This is the per-character hot path, so it copies runs
/// of plain bytes at once instead of going through a serializer.
///
/// No raw CR or LF survives, so the literal always fits on one `data:` line. Working on bytes is
/// sound: every byte that needs escaping is ASCII, never part of a multi-byte character. What
/// JSON allows raw (DEL, U+2028, U+2029, `/`) is left as it is.
pub fn push_json_string(buf: &mut BytesMut, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    buf.put_u8(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x00..=0x1f => b"",
            _ => continue,
        };
        buf.put_slice(&bytes[start..i]);
        if escape.is_empty() {
            buf.put_slice(b"\\u00");
            buf.put_u8(HEX[(b >> 4) as usize]);
            buf.put_u8(HEX[(b & 0xf) as usize]);
        } else {
            buf.put_slice(escape);
        }
        start = i + 1;
    }
    buf.put_slice(&bytes[start..]);
    buf.put_u8(b'"');
}

/// Writes one field line. The value is checked first and copied in one piece when clean (the
/// common case); otherwise the forbidden bytes are dropped, which keeps the text valid UTF-8
/// since CR, LF and NUL are single bytes. NUL is only dropped from `id` (`is_id`), the one field
/// where a parser rejects it.
fn push_field(buf: &mut BytesMut, name: &[u8], value: &str, is_id: bool) {
    buf.put_slice(name);
    if value.bytes().any(|b| b == b'\r' || b == b'\n' || (is_id && b == 0)) {
        for b in value.bytes() {
            if b != b'\r' && b != b'\n' && !(is_id && b == 0) {
                buf.put_u8(b);
            }
        }
    } else {
        buf.put_slice(value.as_bytes());
    }
    buf.put_u8(b'\n');
}

/// Splits on CRLF, lone CR and lone LF, as the parser does. An empty string
/// is one empty line, and a trailing line break yields a trailing empty line,
/// so that the parser's "join with LF" restores the text.
fn split_lines(s: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(s);
    std::iter::from_fn(move || {
        let current = rest?;
        match current.find(['\r', '\n']) {
            None => {
                rest = None;
                Some(current)
            }
            Some(pos) => {
                let skip = if current[pos..].starts_with("\r\n") { 2 } else { 1 };
                rest = Some(&current[pos + skip..]);
                Some(&current[..pos])
            }
        }
    })
}

/// Small stack buffer for decimal integers (no allocation on the hot path).
struct DecimalBuf {
    /// 20 digits: exactly as many as `u64::MAX` has.
    bytes: [u8; 20],
    /// Index of the first digit; the digits fill the buffer from the end.
    start: usize,
}

impl DecimalBuf {
    /// The digits written, without the unused front of the buffer.
    fn as_bytes(&self) -> &[u8] {
        &self.bytes[self.start..]
    }
}

/// `n` in decimal, written from the last digit backwards: no reversal, and no need to know the
/// length first. Zero is one digit, `0`.
fn itoa_buf(mut n: u64) -> DecimalBuf {
    let mut out = DecimalBuf { bytes: [0; 20], start: 20 };
    loop {
        out.start -= 1;
        out.bytes[out.start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out
}

/// Appends `n` in decimal (no allocation).
pub fn push_u64(buf: &mut BytesMut, n: u64) {
    buf.put_slice(itoa_buf(n).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(f: impl FnOnce(&mut BytesMut)) -> String {
        let mut b = BytesMut::new();
        f(&mut b);
        String::from_utf8(b.to_vec()).unwrap_or_default()
    }

    #[test]
    fn multi_line_data_becomes_several_data_lines() {
        let s = enc(|b| push_event(b, Some("s.1"), Some("delta"), "a\r\nb\rc\nd"));
        assert_eq!(s, "id: s.1\nevent: delta\ndata: a\ndata: b\ndata: c\ndata: d\n\n");
    }

    #[test]
    fn line_breaks_cannot_escape_id_or_event() {
        let s = enc(|b| push_event(b, Some("x\r\ndata: evil\0"), Some("a\nb"), "ok"));
        assert_eq!(s, "id: xdata: evil\nevent: ab\ndata: ok\n\n");
    }

    #[test]
    fn retry_and_comment() {
        assert_eq!(enc(|b| push_retry(b, 3000)), "retry: 3000\n\n");
        assert_eq!(enc(|b| push_retry(b, 0)), "retry: 0\n\n");
        assert_eq!(enc(|b| push_comment(b, "keep-alive")), ": keep-alive\n\n");
    }

    #[test]
    fn json_string_matches_serde() {
        for s in ["", "plain", "q\"b\\s", "\n\r\t\u{0}\u{1f}\u{7f}", "你好👩‍👩‍👧", "\u{2028}"] {
            let ours = enc(|b| push_json_string(b, s));
            let back: String = serde_json::from_str(&ours).unwrap_or_default();
            assert_eq!(back, s, "{ours}");
        }
    }
}
