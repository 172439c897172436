//! `ceiling`: the floor for "one write per character" on this machine. Per
//! connection one task, one interval timer and one `write` system call per
//! character, no HTTP framing beyond a fixed response head (the body is
//! delimited by closing the connection), no auth, no log, no buffers kept.
//! It speaks just enough of `GET /v1/stream?prompt=...&pace_ms=...` (and
//! `/healthz`) for the load generator's `reference` target, with the same
//! event bytes the reference server writes, so its figures compare with
//! both servers' in one run. Whatever tokengate or the reference spends
//! above it per character is their own work.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::Result;

/// Command line of `ceiling`.
#[derive(Debug, Parser)]
pub struct Args {
    /// Address to listen on (loopback).
    #[arg(long, default_value = "127.0.0.1:18091")]
    listen: SocketAddr,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

const HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nconnection: close\r\n\r\n";
const HEALTHY: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\nconnection: close\r\n\r\n{\"status\":\"ok\"}";
const BAD: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

pub fn main(args: Args) -> Result<()> {
    let (soft, hard) = crate::raise_nofile();
    crate::server_runtime(args.threads)?.block_on(async move {
        let listener = TcpListener::bind(args.listen).await?;
        eprintln!("ceiling listening on http://{} (nofile {soft}/{hard})", args.listen);
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors: back off instead of spinning.
                    eprintln!("ceiling: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let _ = serve(tcp).await;
            });
        }
    })
}

/// One connection: one request, then its stream, then close.
async fn serve(mut tcp: TcpStream) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tcp.read(&mut buf).await?;
        if n == 0 || head.len() + n > 64 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let target = std::str::from_utf8(line).unwrap_or_default().split(' ').nth(1).unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path == "/healthz" {
        return tcp.write_all(HEALTHY).await;
    }
    if path != "/v1/stream" {
        return tcp.write_all(BAD).await;
    }
    let (mut prompt, mut pace_ms) = (String::from("hello"), 0u64);
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "prompt" => prompt = v.into_owned(),
            "pace_ms" => pace_ms = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    tcp.write_all(HEAD).await?;
    let mut ticks = tokio::time::interval(Duration::from_millis(pace_ms.max(1)));
    let mut event = Vec::with_capacity(64);
    let mut count = 0u64;
    for c in prompt.chars() {
        if pace_ms > 0 {
            ticks.tick().await;
        }
        event.clear();
        event.extend_from_slice(b"event: delta\ndata: ");
        event.extend_from_slice(serde_json::json!({ "text": c }).to_string().as_bytes());
        event.extend_from_slice(b"\n\n");
        tcp.write_all(&event).await?;
        count += 1;
    }
    let done = format!("event: done\ndata: {}\n\n", serde_json::json!({ "chars": count, "finish_reason": "stop" }));
    tcp.write_all(done.as_bytes()).await?;
    tcp.shutdown().await
}
