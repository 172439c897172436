//! HTTP/1.1 by hand over a raw TCP socket, so that the soak's clients can
//! cut a connection at an exact byte offset of what the server sent
//! (response head and chunk framing included) rather than at a frame
//! boundary some HTTP library chose. The decoder is incremental: bytes go
//! in as they are read, and the body comes out as the chunk framing is
//! removed, still cut wherever the connection was cut.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where an HTTP/1.1 response decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading the status line and headers.
    Head,
    /// Inside a chunk-size line (or the CRLF after a chunk's data).
    Framing,
    /// Inside body data.
    Body,
    /// The body is complete.
    Done,
}

/// The parsed response head.
#[derive(Debug, Clone, Default)]
pub struct Head {
    /// Status code.
    pub status: u16,
    /// `Transfer-Encoding: chunked`.
    pub chunked: bool,
    /// `Content-Length`, when given.
    pub content_length: Option<usize>,
}

#[derive(Debug, Clone, Copy)]
enum Body {
    /// A chunk-size line is being read (its bytes are in `line`).
    Size,
    /// `n` bytes of chunk data remain.
    Data(usize),
    /// The CRLF after a chunk's data: `n` bytes of it remain.
    DataEnd(usize),
    /// After the last (empty) chunk: trailer lines until an empty one.
    Trailer,
    /// A `Content-Length` body with `n` bytes left.
    Length(usize),
    /// No length: the body runs to the end of the connection.
    UntilClose,
    Done,
}

/// Incremental response decoder: feed raw bytes, get body bytes back.
#[derive(Debug)]
pub struct Decoder {
    head: Option<Head>,
    line: Vec<u8>,
    body: Body,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A decoder at the start of a response.
    pub fn new() -> Self {
        Self { head: None, line: Vec::new(), body: Body::Size }
    }

    /// The head, once it has been read completely.
    pub fn head(&self) -> Option<&Head> {
        self.head.as_ref()
    }

    /// Where the decoder is (for classifying where a cut landed).
    pub fn phase(&self) -> Phase {
        match (self.head.is_some(), self.body) {
            (false, _) => Phase::Head,
            (true, Body::Done) => Phase::Done,
            (true, Body::Data(_) | Body::Length(_) | Body::UntilClose) => Phase::Body,
            (true, _) => Phase::Framing,
        }
    }

    /// Decodes `bytes`, handing body bytes to `body` as they come out.
    /// A malformed response is an error (the server is the one under test).
    pub fn feed(&mut self, mut bytes: &[u8], mut body: impl FnMut(&[u8])) -> Result<(), String> {
        while !bytes.is_empty() {
            if self.head.is_none() {
                let Some(end) = find_head_end(&self.line, bytes) else {
                    self.line.extend_from_slice(bytes);
                    if self.line.len() > 64 * 1024 {
                        return Err("response head over 64 KiB".into());
                    }
                    return Ok(());
                };
                self.line.extend_from_slice(&bytes[..end]);
                bytes = &bytes[end..];
                let head = parse_head(&self.line)?;
                self.line.clear();
                // 204 and 304 never have a body (RFC 9112 6.3).
                let bodiless = head.status == 204 || head.status == 304 || head.status < 200;
                self.body = match (head.chunked, head.content_length) {
                    _ if bodiless => Body::Done,
                    (true, _) => Body::Size,
                    (false, Some(0)) => Body::Done,
                    (false, Some(n)) => Body::Length(n),
                    (false, None) => Body::UntilClose,
                };
                self.head = Some(head);
                continue;
            }
            match self.body {
                Body::Done => return Err("bytes after the end of the response".into()),
                Body::UntilClose => {
                    body(bytes);
                    return Ok(());
                }
                Body::Length(n) | Body::Data(n) => {
                    let take = n.min(bytes.len());
                    body(&bytes[..take]);
                    bytes = &bytes[take..];
                    let left = n - take;
                    self.body = match (self.body, left) {
                        (Body::Length(_), 0) => Body::Done,
                        (Body::Length(_), l) => Body::Length(l),
                        (_, 0) => Body::DataEnd(2),
                        (_, l) => Body::Data(l),
                    };
                }
                Body::DataEnd(n) => {
                    let take = n.min(bytes.len());
                    let expect = &b"\r\n"[2 - n..2 - n + take];
                    if &bytes[..take] != expect {
                        return Err("chunk data not followed by CRLF".into());
                    }
                    bytes = &bytes[take..];
                    self.body = if n == take { Body::Size } else { Body::DataEnd(n - take) };
                }
                Body::Size | Body::Trailer => {
                    let Some(nl) = bytes.iter().position(|&b| b == b'\n') else {
                        self.line.extend_from_slice(bytes);
                        if self.line.len() > 1024 {
                            return Err("chunk-size line over 1 KiB".into());
                        }
                        return Ok(());
                    };
                    self.line.extend_from_slice(&bytes[..nl]);
                    bytes = &bytes[nl + 1..];
                    let line = std::mem::take(&mut self.line);
                    let line = line.strip_suffix(b"\r").unwrap_or(&line);
                    if matches!(self.body, Body::Trailer) {
                        if line.is_empty() {
                            self.body = Body::Done;
                        }
                        continue;
                    }
                    let hex = line.split(|&b| b == b';').next().unwrap_or_default();
                    let size = std::str::from_utf8(hex)
                        .ok()
                        .and_then(|h| usize::from_str_radix(h.trim(), 16).ok())
                        .ok_or_else(|| format!("bad chunk size {:?}", String::from_utf8_lossy(line)))?;
                    self.body = if size == 0 { Body::Trailer } else { Body::Data(size) };
                }
            }
        }
        Ok(())
    }
}

/// Index just past the `\r\n\r\n` ending the head, in `bytes`, given the
/// head bytes already held in `held`.
fn find_head_end(held: &[u8], bytes: &[u8]) -> Option<usize> {
    let tail = &held[held.len().saturating_sub(3)..];
    let mut joined = tail.to_vec();
    joined.extend_from_slice(bytes);
    joined.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4 - tail.len())
}

fn parse_head(raw: &[u8]) -> Result<Head, String> {
    let text = std::str::from_utf8(raw).map_err(|_| "response head is not UTF-8".to_owned())?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    if parts.next() != Some("HTTP/1.1") {
        return Err(format!("bad status line {status_line:?}"));
    }
    let status = parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut head = Head { status, ..Head::default() };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value.eq_ignore_ascii_case("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            head.content_length = value.parse().ok();
        }
    }
    Ok(head)
}

/// One request to send.
pub struct Request<'a> {
    /// `GET`, `POST`, `DELETE`.
    pub method: &'a str,
    /// Path and query.
    pub path: &'a str,
    /// Bearer token, if any.
    pub token: Option<&'a str>,
    /// `Last-Event-ID`, if any.
    pub last_event_id: Option<&'a str>,
    /// JSON body, if any.
    pub json: Option<&'a str>,
}

/// Connects (with a bound on the connect time) and writes the request.
pub async fn send(addr: SocketAddr, req: &Request<'_>) -> std::io::Result<TcpStream> {
    let connect = TcpStream::connect(addr);
    let mut tcp = tokio::time::timeout(Duration::from_secs(3), connect)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    tcp.set_nodelay(true)?;
    let mut head = format!("{} {} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n", req.method, req.path);
    if let Some(t) = req.token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if let Some(id) = req.last_event_id {
        head.push_str(&format!("Last-Event-ID: {id}\r\n"));
    }
    let body = req.json.unwrap_or_default();
    if req.json.is_some() {
        head.push_str("Content-Type: application/json\r\n");
    }
    if req.json.is_some() || req.method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_bytes());
    tcp.write_all(&out).await?;
    Ok(tcp)
}

/// A whole short response (status and body), for control requests:
/// metrics, readiness, DELETE, the slot check.
pub async fn call(addr: SocketAddr, req: &Request<'_>, limit: Duration) -> Result<(u16, Vec<u8>), String> {
    let work = async {
        let mut tcp = send(addr, req).await.map_err(|e| format!("connect: {e}"))?;
        let mut dec = Decoder::new();
        let mut body = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = tcp.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                break;
            }
            dec.feed(&buf[..n], |b| body.extend_from_slice(b))?;
            if dec.phase() == Phase::Done {
                break;
            }
        }
        match dec.head() {
            Some(h) if dec.phase() == Phase::Done || !h.chunked && h.content_length.is_none() => Ok((h.status, body)),
            _ => Err("connection closed mid-response".to_owned()),
        }
    };
    tokio::time::timeout(limit, work).await.map_err(|_| "timed out".to_owned())?
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESP: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n3;x=1\r\n, w\r\n0\r\n\r\n";

    #[test]
    fn chunked_body_decodes_whatever_the_split() {
        for split in 0..RESP.len() {
            let mut d = Decoder::new();
            let mut body = Vec::new();
            d.feed(&RESP[..split], |b| body.extend_from_slice(b)).unwrap();
            d.feed(&RESP[split..], |b| body.extend_from_slice(b)).unwrap();
            assert_eq!(body, b"hello, w", "split at {split}");
            assert_eq!(d.phase(), Phase::Done);
            assert_eq!(d.head().unwrap().status, 200);
        }
        let mut d = Decoder::new();
        let mut body = Vec::new();
        for b in RESP {
            d.feed(std::slice::from_ref(b), |x| body.extend_from_slice(x)).unwrap();
        }
        assert_eq!(body, b"hello, w");
    }

    #[test]
    fn content_length_and_phases() {
        let mut d = Decoder::new();
        let mut body = Vec::new();
        d.feed(b"HTTP/1.1 404 Not Found\r\ncontent-length: 4\r\n\r\nab", |b| body.extend_from_slice(b)).unwrap();
        assert_eq!(d.phase(), Phase::Body);
        d.feed(b"cd", |b| body.extend_from_slice(b)).unwrap();
        assert_eq!((d.phase(), body.as_slice()), (Phase::Done, &b"abcd"[..]));
        let mut d = Decoder::new();
        d.feed(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1", |_| {}).unwrap();
        assert_eq!(d.phase(), Phase::Framing);
        assert!(Decoder::new().feed(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", |_| {}).is_err());
        let mut d = Decoder::new();
        d.feed(b"HTTP/1.1 204 No Content\r\nx-request-id: 1\r\n\r\n", |_| {}).unwrap();
        assert_eq!(d.phase(), Phase::Done, "204 has no body");
    }
}
