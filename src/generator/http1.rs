//! A streaming HTTP/1.1 client for plain-`http://` upstreams whose
//! connection is driven by the task that reads the response body.
//!
//! Why not reqwest here: its connection runs in a task of its own and hands
//! the body over through a one-slot channel, so every upstream frame (one
//! character, for a fast model server) costs two task wake-ups before the
//! gateway sees it, and the gateway can never take more than one frame at a
//! time. Driving hyper's connection from the reading task lets one poll
//! take every frame of a network read (hundreds) with no wake-up between
//! them, which is what lets the client get them in a few writes.
//!
//! The price: no connection reuse and no HTTP proxy for these upstreams (a
//! TCP connect per stream to a server on the same network; `https://`
//! upstreams keep reqwest, with its pool, TLS and proxy support).

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use axum::http::{self, HeaderMap, HeaderValue, Request, Uri};
use bytes::Bytes;
use futures_util::Stream;
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1::{self, Connection};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why a request got no response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SendFailure {
    /// The TCP connect did not finish within the connect timeout.
    ConnectTimeout,
    /// The TCP connect failed (refused, unreachable, bad host).
    ConnectFailed,
    /// Connected, but the exchange failed before a response head.
    Disconnected,
}

type Conn = Connection<TokioIo<TcpStream>, Body>;

/// Whether `url` is one this client serves: plain `http://` without
/// credentials in it (those are left to reqwest, which sends them as Basic
/// auth).
pub(super) fn serves(url: &str) -> bool {
    url.parse::<Uri>().is_ok_and(|u| {
        u.scheme_str() == Some("http") && u.host().is_some() && u.authority().is_some_and(|a| !a.as_str().contains('@'))
    })
}

/// POSTs `body` as JSON to `url` with `headers`, and returns the response
/// head and its body once the head has arrived.
pub(super) async fn post_json(
    url: &str,
    headers: &HeaderMap,
    bearer: Option<&[u8]>,
    body: Bytes,
    connect_timeout: Duration,
) -> Result<(http::response::Parts, DrivenBody), SendFailure> {
    let uri: Uri = url.parse().map_err(|_| SendFailure::ConnectFailed)?;
    let named = uri.host().ok_or(SendFailure::ConnectFailed)?;
    // A bracketed IPv6 literal connects without its brackets.
    let host = named.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    // `Host` is the host and the port as written, never any userinfo.
    let host_header = match uri.port_u16() {
        Some(port) => format!("{named}:{port}"),
        None => named.to_owned(),
    };
    let tcp = match tokio::time::timeout(connect_timeout, TcpStream::connect((host, port))).await {
        Err(_) => return Err(SendFailure::ConnectTimeout),
        Ok(Err(_)) => return Err(SendFailure::ConnectFailed),
        Ok(Ok(tcp)) => tcp,
    };
    // The request goes out in one write and must not wait for an ACK.
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = http1::handshake(TokioIo::new(tcp)).await.map_err(|_| SendFailure::Disconnected)?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = Request::post(path).body(Body::from(body)).map_err(|_| SendFailure::ConnectFailed)?;
    let request_headers = request.headers_mut();
    request_headers.extend(headers.clone());
    request_headers.insert(HOST, HeaderValue::from_str(&host_header).map_err(|_| SendFailure::ConnectFailed)?);
    request_headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(key) = bearer {
        let mut value = b"Bearer ".to_vec();
        value.extend_from_slice(key);
        let mut value = HeaderValue::from_bytes(&value).map_err(|_| SendFailure::ConnectFailed)?;
        value.set_sensitive(true);
        request_headers.insert(AUTHORIZATION, value);
    }
    let mut conn: Pin<Box<Conn>> = Box::pin(conn);
    let mut conn_done = false;
    let response = {
        let response = sender.send_request(request);
        tokio::pin!(response);
        poll_fn(|cx| {
            if !conn_done && conn.as_mut().poll(cx).is_ready() {
                // Ended or failed: the pending request then fails too.
                conn_done = true;
            }
            response.as_mut().poll(cx)
        })
        .await
        .map_err(|_| SendFailure::Disconnected)?
    };
    // No second request: the connection ends with this response's body.
    drop(sender);
    let (parts, body) = response.into_parts();
    Ok((parts, DrivenBody { conn: (!conn_done).then_some(conn), body }))
}

/// A response body that drives its own connection when polled. Dropping it
/// closes the connection (the upstream sees the client go).
pub(super) struct DrivenBody {
    conn: Option<Pin<Box<Conn>>>,
    body: Incoming,
}

impl Stream for DrivenBody {
    type Item = Result<Bytes, hyper::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            // The connection reads the socket and hands the body its next
            // frame (it holds one at a time); then the body takes it.
            if let Some(conn) = &mut this.conn
                && conn.as_mut().poll(cx).is_ready()
            {
                this.conn = None;
            }
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => return Poll::Ready(Some(Ok(data))),
                    // Trailers: nothing the gateway reads.
                    Err(_) => continue,
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_urls_are_served() {
        assert!(serves("http://127.0.0.1:8000/v1/chat/completions"));
        assert!(serves("http://[::1]:8000/v1/chat/completions"));
        assert!(!serves("https://api.openai.com/v1/chat/completions"));
        // Credentials in the URL: the pooled client turns them into Basic auth.
        assert!(!serves("http://user:pass@127.0.0.1:8000/v1/chat/completions"));
        assert!(!serves("not a url"));
    }
}
