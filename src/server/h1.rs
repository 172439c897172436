//! tokengate's own HTTP/1.1 path for bodiless `GET`s, which is how every
//! `EventSource`, resume and channel subscription arrives.
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB header buffer for the
//! whole life of a connection, and an idle stream's connection lives for
//! minutes: the two buffers were 16 of the 25 KiB an open stream cost. Here
//! the request head is read into a buffer that is freed once the head is
//! parsed (with `httparse`, hyper's own parser), the router answers it as
//! it would under hyper, and the response is written with one `writev` per
//! batch of ready body frames, the head with the first of them.
//!
//! Only what is simple to get right is served here: `GET` over HTTP/1.1
//! with no body, no `Expect` and no `Upgrade`. At the first request that is
//! anything else, or that does not parse, the connection is handed to
//! hyper with the bytes read so far, and hyper serves (or refuses) the rest
//! of it, so every error answer stays hyper's.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::{Pin, pin};
use std::task::Poll;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::header::{CONNECTION, CONTENT_LENGTH, DATE, EXPECT, TRANSFER_ENCODING, UPGRADE};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri, Version};
use bytes::Bytes;
use hyper::body::Body as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::{BoxError, Conn, OpenRequest, h2c::Replay, serve_http, slow_subscriber_dropped};
use crate::stream::{ConnectionAbort, DriveHook};

/// Headers a request may have, as hyper allows by default (more: hyper
/// answers 431).
const MAX_HEADERS: usize = 100;
/// Body frames written with one `writev`, at most (1 + 3 per frame + 1
/// slices stay under Linux's `IOV_MAX` of 1024).
const MAX_BATCH_FRAMES: usize = 64;
/// Body bytes written with one `writev`, at most.
const MAX_BATCH_BYTES: usize = 256 * 1024;
/// Batches up to this many bytes are copied into one buffer and written
/// with one `write` rather than a `writev` of their pieces.
const FLAT_WRITE_MAX: usize = 4096;
/// The terminating chunk of a chunked body.
const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// What the bytes read so far make.
enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// A request this path serves, the head's length, and whether the
    /// client asked to close after it.
    Request(Box<Request<Body>>, usize, bool),
    /// Anything else: hyper takes the connection.
    HandOver,
}

/// Serves `io` until it closes, answering bodiless `GET`s here and handing
/// it to hyper at the first request that is not one.
pub(super) async fn serve<I>(mut io: I, conn: Conn<'_>) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Conn { app, peer, connections, activity, metrics } = conn;
    // One request at a time: aborting the connection ends only that one.
    let abort = CancellationToken::new();
    let max_head = connections.max_header_bytes;
    // Bytes of the next request head read so far (pipelined ones
    // included); empty, and holding no memory, while a response streams.
    let mut buf: Vec<u8> = Vec::new();
    loop {
        if connections.close.is_cancelled() {
            return Ok(());
        }
        let parsed = tokio::select! {
            read = tokio::time::timeout(connections.header_timeout, read_head(&mut io, &mut buf, max_head)) => read,
            () = connections.close.cancelled() => return Ok(()),
        };
        let (request, head_len, close) = match parsed {
            Err(_) => {
                if activity.served.load(std::sync::atomic::Ordering::Relaxed) == 0 {
                    connections.logs.header_timeout(metrics, peer);
                } else {
                    tracing::debug!(%peer, "idle connection closed");
                }
                return Ok(());
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, %peer, "connection failed before a request");
                return Ok(());
            }
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(Parsed::Request(request, len, close)))) => (request, len, close),
            Ok(Ok(Some(Parsed::HandOver | Parsed::Partial))) => {
                let replay = Replay::new(Bytes::from(std::mem::take(&mut buf)), io);
                return Box::pin(serve_http(replay, false, conn)).await;
            }
        };
        // Keep only pipelined bytes, if any; free the rest.
        buf.drain(..head_len);
        buf.shrink_to_fit();
        activity.started();
        let open = OpenRequest(activity.clone());
        // This path polls a stream's producer itself (see `DriveHook`):
        // it polls the body on every wake-up, and the hook while it writes.
        let hook = DriveHook::new();
        // The request and the response live in this block only: held
        // across the writes, their headers would sit in every streaming
        // connection. The response is taken apart before it streams.
        let (outgoing, close) = {
            let mut request = *request;
            request.extensions_mut().insert(ConnectInfo(peer));
            request.extensions_mut().insert(ConnectionAbort(abort.clone()));
            request.extensions_mut().insert(hook.clone());
            let response = match app.clone().oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            let close = close
                || connections.close.is_cancelled()
                || response
                    .headers()
                    .get_all(CONNECTION)
                    .iter()
                    .any(|v| has_token(v.to_str().unwrap_or_default(), "close"));
            (Outgoing::new(response, close), close)
        };
        match respond(&mut io, outgoing, &abort, &hook, &mut buf, max_head).await? {
            Ended::Done if !close => {}
            Ended::Done => {
                let _ = io.shutdown().await;
                return Ok(());
            }
            Ended::ClientGone => return Ok(()),
            Ended::Aborted => {
                slow_subscriber_dropped(connections, metrics, peer);
                return Ok(());
            }
        }
        drop(open);
    }
}

/// Reads until `buf` holds a whole head, and parses it. `None`: the client
/// closed before sending anything.
async fn read_head<I: AsyncRead + Unpin>(io: &mut I, buf: &mut Vec<u8>, max: usize) -> io::Result<Option<Parsed>> {
    loop {
        if !buf.is_empty() {
            match parse(buf) {
                Parsed::Partial if buf.len() < max => {}
                Parsed::Partial => return Ok(Some(Parsed::HandOver)),
                parsed => return Ok(Some(parsed)),
            }
        }
        // Straight into the buffer: a stack chunk here would sit in every
        // connection's future.
        buf.reserve(1024);
        if io.read_buf(buf).await? == 0 {
            // Closed mid-head: nothing to answer.
            return Ok(None);
        }
    }
}

/// Parses a request head at the start of `buf`.
fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut headers);
    let len = match head.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::HandOver,
    };
    if head.method != Some("GET") || head.version != Some(1) {
        return Parsed::HandOver;
    }
    let Some(Ok(uri)) = head.path.map(Uri::try_from) else { return Parsed::HandOver };
    let mut map = HeaderMap::with_capacity(head.headers.len());
    let mut close = false;
    for header in head.headers.iter() {
        let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(header.name.as_bytes()), HeaderValue::from_bytes(header.value))
        else {
            return Parsed::HandOver;
        };
        if name == TRANSFER_ENCODING || name == EXPECT || name == UPGRADE {
            return Parsed::HandOver;
        }
        if name == CONTENT_LENGTH && value.as_bytes() != b"0" {
            return Parsed::HandOver;
        }
        if name == CONNECTION {
            let tokens = value.to_str().unwrap_or_default();
            if has_token(tokens, "upgrade") {
                return Parsed::HandOver;
            }
            close |= has_token(tokens, "close");
        }
        map.append(name, value);
    }
    let mut request = Request::new(Body::empty());
    *request.method_mut() = Method::GET;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = map;
    Parsed::Request(Box::new(request), len, close)
}

/// Whether a comma-separated header value lists `token` (any case).
fn has_token(value: &str, token: &str) -> bool {
    value.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// How a response ended.
enum Ended {
    /// Written to its end.
    Done,
    /// The client closed its side (or its socket failed) first.
    ClientGone,
    /// The connection's [`ConnectionAbort`] fired.
    Aborted,
}

/// What the next body poll gave.
enum Next {
    /// Frames (or the head) to write; `true` once the body has ended.
    Write(bool),
    ClientGone,
    Aborted,
    Failed(BoxError),
}

/// A response taken apart for writing: its encoded head and its body.
struct Outgoing {
    head: Vec<u8>,
    body: Body,
    /// Framed as chunks (its length is not known).
    chunked: bool,
    /// A status that has no body.
    bodiless: bool,
}

impl Outgoing {
    /// Encodes `response`'s head (saying `connection: close` if `close`)
    /// and keeps its body; the headers and extensions are dropped.
    fn new(response: axum::response::Response, close: bool) -> Self {
        let (parts, body) = response.into_parts();
        let bodiless = parts.status.is_informational()
            || parts.status == StatusCode::NO_CONTENT
            || parts.status == StatusCode::NOT_MODIFIED;
        let length = if bodiless { Some(0) } else { body.size_hint().exact() };
        let head = encode_head(parts.status, &parts.headers, length, bodiless, close);
        Self { head, body, chunked: length.is_none(), bodiless }
    }
}

/// Writes a response: its head with the first ready frames, then each
/// batch of frames as it is ready, while watching the client's side for
/// its close (bytes it sends meanwhile, a pipelined request, are kept in
/// `pipelined`, up to `max`). A producer running inline in `hook` is
/// polled while a write is pending.
async fn respond<I>(
    io: &mut I,
    outgoing: Outgoing,
    abort: &CancellationToken,
    hook: &DriveHook,
    pipelined: &mut Vec<u8>,
    max: usize,
) -> Result<Ended, BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let Outgoing { head, mut body, chunked, bodiless } = outgoing;
    let mut head = Some(head);
    let mut frames: Vec<(ChunkHeader, Bytes)> = Vec::new();
    let mut ended = bodiless;
    let mut aborted = pin!(abort.cancelled());
    let mut reading = true;
    loop {
        let next = if ended {
            Next::Write(true)
        } else {
            poll_fn(|cx| {
                if aborted.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Next::Aborted);
                }
                // The client's side: its close ends the response.
                while reading {
                    let mut scratch = [0u8; 256];
                    let mut read = ReadBuf::new(&mut scratch);
                    match Pin::new(&mut *io).poll_read(cx, &mut read) {
                        Poll::Ready(Ok(())) if read.filled().is_empty() => return Poll::Ready(Next::ClientGone),
                        Poll::Ready(Ok(())) => {
                            pipelined.extend_from_slice(read.filled());
                            // Past a head's worth, stop reading: the
                            // socket's buffer then holds the rest.
                            reading = pipelined.len() < max;
                        }
                        Poll::Ready(Err(_)) => return Poll::Ready(Next::ClientGone),
                        Poll::Pending => break,
                    }
                }
                let mut bytes = 0;
                while frames.len() < MAX_BATCH_FRAMES && bytes < MAX_BATCH_BYTES {
                    match Pin::new(&mut body).poll_frame(cx) {
                        Poll::Ready(Some(Ok(frame))) => {
                            if let Ok(data) = frame.into_data()
                                && !data.is_empty()
                            {
                                bytes += data.len();
                                frames.push((ChunkHeader::new(data.len()), data));
                            }
                        }
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Next::Failed(e.into())),
                        Poll::Ready(None) => return Poll::Ready(Next::Write(true)),
                        Poll::Pending => break,
                    }
                }
                if frames.is_empty() && head.is_none() { Poll::Pending } else { Poll::Ready(Next::Write(false)) }
            })
            .await
        };
        match next {
            Next::Write(done) => {
                ended = done;
                let last = (done && chunked).then_some(LAST_CHUNK);
                // A write the client does not take is cut short by the
                // abort (and, without one, by the stalled-write guard).
                // Meanwhile an inline producer runs on: a slow client
                // fills its window and meets `max_lag`, as it would with
                // a producer of its own.
                let head = head.take();
                tokio::select! {
                    biased;
                    written = write_batch(io, head.as_deref(), &frames, chunked, last) => {
                        if written.is_err() {
                            return Ok(Ended::ClientGone);
                        }
                    }
                    () = aborted.as_mut() => return Ok(Ended::Aborted),
                    () = hook.drive() => {}
                }
                frames.clear();
                if done {
                    return Ok(Ended::Done);
                }
            }
            Next::ClientGone => return Ok(Ended::ClientGone),
            Next::Aborted => return Ok(Ended::Aborted),
            // As hyper does: the body is cut off without its last chunk, so
            // the client sees a broken response, not a short one.
            Next::Failed(e) => return Err(e),
        }
    }
}

/// The status line and headers, with the framing headers this path sets
/// (`content-length` or `transfer-encoding: chunked`), `date` and, when the
/// connection closes after this response, `connection: close`.
fn encode_head(status: StatusCode, headers: &HeaderMap, length: Option<u64>, bodiless: bool, close: bool) -> Vec<u8> {
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    let mut says_close = false;
    for (name, value) in headers {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        if name == CONNECTION {
            says_close |= has_token(value.to_str().unwrap_or_default(), "close");
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if !headers.contains_key(DATE) {
        head.extend_from_slice(b"date: ");
        head.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    match length {
        _ if bodiless => {}
        Some(n) => {
            head.extend_from_slice(b"content-length: ");
            head.extend_from_slice(n.to_string().as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        None => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    if close && !says_close {
        head.extend_from_slice(b"connection: close\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// A chunk's size line, `{len:x}\r\n`, without an allocation.
struct ChunkHeader {
    bytes: [u8; 18],
    len: u8,
}

impl ChunkHeader {
    fn new(size: usize) -> Self {
        let mut bytes = [0u8; 18];
        let digits = format_hex(size, &mut bytes);
        bytes[digits] = b'\r';
        bytes[digits + 1] = b'\n';
        Self { bytes, len: (digits + 2) as u8 }
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

/// Writes `n` in lowercase hex at the start of `out`; the digits written.
fn format_hex(n: usize, out: &mut [u8; 18]) -> usize {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut digits = 1;
    while digits < 16 && n >> (4 * digits) != 0 {
        digits += 1;
    }
    for (i, slot) in out.iter_mut().take(digits).enumerate() {
        *slot = DIGITS[(n >> (4 * (digits - 1 - i))) & 0xf];
    }
    digits
}

/// Writes the head (if any), the frames (chunk-framed when `chunked`) and
/// `last`, with as few `writev`s as the socket takes, then flushes.
async fn write_batch<I: AsyncWrite + Unpin>(
    io: &mut I,
    head: Option<&[u8]>,
    frames: &[(ChunkHeader, Bytes)],
    chunked: bool,
    last: Option<&[u8]>,
) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(2 + frames.len() * 3);
    if let Some(head) = head {
        slices.push(IoSlice::new(head));
    }
    for (size, data) in frames {
        if chunked {
            slices.push(IoSlice::new(size.as_slice()));
            slices.push(IoSlice::new(data));
            slices.push(IoSlice::new(b"\r\n"));
        } else {
            slices.push(IoSlice::new(data));
        }
    }
    if let Some(last) = last {
        slices.push(IoSlice::new(last));
    }
    // A small batch (a paced stream's one event) is copied into one buffer
    // and written with `write`: the kernel's `writev` costs more per call
    // than copying a few hundred bytes here.
    let total: usize = slices.iter().map(|slice| slice.len()).sum();
    if total <= FLAT_WRITE_MAX {
        let mut flat = Vec::with_capacity(total);
        for slice in &slices {
            flat.extend_from_slice(slice);
        }
        io.write_all(&flat).await?;
        return io.flush().await;
    }
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = io.write_vectored(rest).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    io.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(head: &str) -> Option<(Request<Body>, usize, bool)> {
        match parse(head.as_bytes()) {
            Parsed::Request(r, len, close) => Some((*r, len, close)),
            _ => None,
        }
    }

    #[test]
    fn a_bodiless_get_is_served_here_with_its_headers() {
        let head = "GET /v1/stream?prompt=hi HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nX-A: 1\r\nX-A: 2\r\n\r\nGET /next";
        let Some((req, len, close)) = request(head) else { panic!("not served here") };
        assert_eq!(len, head.len() - "GET /next".len());
        assert!(!close);
        assert_eq!(req.uri().path(), "/v1/stream");
        assert_eq!(req.uri().query(), Some("prompt=hi"));
        assert_eq!(req.headers().get_all("x-a").iter().collect::<Vec<_>>(), ["1", "2"]);
        assert!(request("GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n").is_some_and(|(_, _, c)| c));
        assert!(request("GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").is_some());
    }

    #[test]
    fn anything_else_goes_to_hyper() {
        for head in [
            "POST /v1/stream HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi",
            "HEAD / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            "GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET /\x01 HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
            "BREW / HTCPCP/1.0\r\n\r\n",
        ] {
            assert!(matches!(parse(head.as_bytes()), Parsed::HandOver), "{head:?}");
        }
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "A: b\r\n".repeat(MAX_HEADERS + 1));
        assert!(matches!(parse(many.as_bytes()), Parsed::HandOver), "too many headers");
        assert!(matches!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n"), Parsed::Partial));
    }

    #[test]
    fn chunk_sizes_are_lowercase_hex() {
        for (n, hex) in
            [(0, "0"), (1, "1"), (15, "f"), (16, "10"), (255, "ff"), (4096, "1000"), (usize::MAX, "ffffffffffffffff")]
        {
            assert_eq!(ChunkHeader::new(n).as_slice(), format!("{hex}\r\n").as_bytes(), "{n}");
        }
    }

    #[test]
    fn the_head_sets_the_framing_and_the_close() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/event-stream"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("999"));
        let head = String::from_utf8(encode_head(StatusCode::OK, &headers, None, false, true)).unwrap_or_default();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ndate: "), "{head}");
        assert!(head.ends_with("GMT\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"), "{head}");
        assert!(!head.contains("999"), "the app's length is replaced: {head}");
        let head = String::from_utf8(encode_head(StatusCode::UNAUTHORIZED, &HeaderMap::new(), Some(12), false, false))
            .unwrap_or_default();
        assert!(
            head.starts_with("HTTP/1.1 401 Unauthorized\r\n") && head.ends_with("content-length: 12\r\n\r\n"),
            "{head}"
        );
        let head = String::from_utf8(encode_head(StatusCode::NOT_MODIFIED, &HeaderMap::new(), Some(0), true, false))
            .unwrap_or_default();
        assert!(!head.contains("content-length") && !head.contains("chunked"), "{head}");
    }

    /// What `write_batch` writes for `frames` of these sizes after `head`.
    async fn written(sizes: &[usize], chunked: bool) -> Vec<u8> {
        let frames: Vec<(ChunkHeader, Bytes)> =
            sizes.iter().map(|&n| (ChunkHeader::new(n), Bytes::from(vec![b'x'; n]))).collect();
        let mut out: Vec<u8> = Vec::new();
        let last = chunked.then_some(LAST_CHUNK);
        assert!(write_batch(&mut out, Some(b"HEAD\r\n"), &frames, chunked, last).await.is_ok());
        out
    }

    #[tokio::test]
    async fn small_and_large_batches_are_framed_alike() {
        // One side of FLAT_WRITE_MAX is copied into one buffer, the other
        // written as slices: the bytes must not tell them apart.
        for sizes in [vec![3, 40], vec![FLAT_WRITE_MAX, 10, 5000]] {
            let mut expected = b"HEAD\r\n".to_vec();
            for &n in &sizes {
                expected.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                expected.extend(std::iter::repeat_n(b'x', n));
                expected.extend_from_slice(b"\r\n");
            }
            expected.extend_from_slice(LAST_CHUNK);
            assert_eq!(written(&sizes, true).await, expected, "{sizes:?}");
            let plain: usize = sizes.iter().sum();
            assert_eq!(written(&sizes, false).await.len(), "HEAD\r\n".len() + plain, "{sizes:?}");
        }
    }

    /// Every streaming connection holds this future while its response
    /// streams, so its size is memory per open stream; the bound catches a
    /// change that keeps the response's headers in it again (744 bytes in
    /// a debug build then, 536 without).
    #[tokio::test]
    async fn a_streaming_responses_state_stays_small() {
        let (mut io, _peer) = tokio::io::duplex(64);
        let (abort, hook, mut pipelined) = (CancellationToken::new(), DriveHook::new(), Vec::new());
        let response = axum::response::Response::new(Body::empty());
        let writing = respond(&mut io, Outgoing::new(response, false), &abort, &hook, &mut pipelined, 100);
        let size = std::mem::size_of_val(&writing);
        assert!(size <= 600, "a response's writer is {size} bytes");
    }
}
