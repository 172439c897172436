//! h2c with prior knowledge on a plain listener: the first bytes tell an
//! HTTP/2 client (its 24-byte connection preface) from an HTTP/1.1 one,
//! and are then handed back to whichever protocol serves the connection.
//!
//! hyper-util's auto builder can do the same, but its look at the first
//! bytes has no deadline; here the caller bounds it with the header
//! timeout, so a client that sends nothing cannot hold a connection slot.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// What an HTTP/2 client sends first (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads until the bytes are the whole preface (`true`) or cannot be
/// (`false`, at the first byte that differs, or at end of stream), and
/// returns what was read, to be replayed.
pub(super) async fn sniff<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<(Bytes, bool)> {
    let mut buf = [0u8; PREFACE.len()];
    let mut filled = 0;
    while filled < PREFACE.len() {
        let n = io.read(&mut buf[filled..]).await?;
        if n == 0 || buf[filled..filled + n] != PREFACE[filled..filled + n] {
            filled += n;
            return Ok((Bytes::copy_from_slice(&buf[..filled]), false));
        }
        filled += n;
    }
    Ok((Bytes::copy_from_slice(&buf), true))
}

/// An I/O object whose first reads return `prefix` (the bytes [`sniff`]
/// took), then the rest of the stream.
#[derive(Debug)]
pub(super) struct Replay<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Replay<T> {
    /// `prefix`, then `inner`.
    pub(super) fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Replay<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Replay<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn sniffed(sent: &[u8]) -> Option<(bool, Vec<u8>)> {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(sent).await.ok()?;
        drop(client);
        let (prefix, h2) = sniff(&mut server).await.ok()?;
        let mut replayed = Vec::new();
        Replay::new(prefix, server).read_to_end(&mut replayed).await.ok()?;
        Some((h2, replayed))
    }

    #[tokio::test]
    async fn the_preface_is_http2_and_everything_is_replayed() {
        let mut sent = PREFACE.to_vec();
        sent.extend_from_slice(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00");
        assert_eq!(sniffed(&sent).await, Some((true, sent)));
    }

    #[tokio::test]
    async fn an_http1_request_is_seen_at_its_first_byte_and_replayed() {
        let sent = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(sniffed(&sent).await, Some((false, sent)));
        assert_eq!(sniffed(b"PRI").await, Some((false, b"PRI".to_vec())), "a cut-off preface is not HTTP/2");
    }
}
