//! TLS and HTTP/2: a test CA made at test time (rcgen), curl over TLS with
//! ALPN `h2` and h2c with prior knowledge, a Rust HTTP/2 client with many
//! streams on one connection, flow-control backpressure and the slow-reader
//! bound over HTTP/2, `max_concurrent_streams`, shutdown with GOAWAY,
//! certificate reload (polled and on SIGHUP, a bad pair kept out), and TLS
//! on the way out: `rediss://` and an `https://` upstream with the test CA.
//! A missing `curl` or `redis-server` fails these tests; none is skipped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, ServerName};
use tokengate::config::Settings;
use tokengate::sse::{Event, Parser};
use tokio::task::JoinHandle;

use crate::helpers::*;

const LIMIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------- the PKI

/// A test CA with an intermediate; leaves for 127.0.0.1 and localhost are
/// issued by the intermediate and served with it (a chain).
pub struct Pki {
    pub dir: PathBuf,
    pub ca_pem: String,
    ca_der: CertificateDer<'static>,
    intermediate_pem: String,
    intermediate_params: CertificateParams,
    intermediate_key: KeyPair,
}

/// One issued certificate.
pub struct Leaf {
    /// The leaf then the intermediate, PEM.
    pub chain_pem: String,
    pub key_pem: String,
    /// The leaf alone, DER: what a client sees as the peer certificate.
    pub der: Vec<u8>,
}

impl Pki {
    pub fn new() -> Self {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).unwrap();
        let dir = std::env::temp_dir().join(format!("tokengate-tls-{}", hex::encode(bytes)));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.distinguished_name.push(DnType::CommonName, "tokengate test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let intermediate_key = KeyPair::generate().unwrap();
        let mut intermediate_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        intermediate_params.distinguished_name.push(DnType::CommonName, "tokengate test intermediate");
        intermediate_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        intermediate_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let intermediate =
            intermediate_params.signed_by(&intermediate_key, &Issuer::from_params(&ca_params, &ca_key)).unwrap();
        let pki = Self {
            dir,
            ca_pem: ca.pem(),
            ca_der: ca.der().clone(),
            intermediate_pem: intermediate.pem(),
            intermediate_params,
            intermediate_key,
        };
        std::fs::write(pki.ca_path(), &pki.ca_pem).unwrap();
        pki
    }

    /// A leaf for 127.0.0.1 and localhost named `name` (its CN).
    pub fn leaf(&self, name: &str) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        let cert =
            params.signed_by(&key, &Issuer::from_params(&self.intermediate_params, &self.intermediate_key)).unwrap();
        Leaf {
            chain_pem: format!("{}{}", cert.pem(), self.intermediate_pem),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// Writes `leaf` where the server reads its pair (each file replaced
    /// whole, by rename, as cert-manager and certbot do).
    pub fn install(&self, leaf: &Leaf) {
        replace(&self.cert_path(), &leaf.chain_pem);
        replace(&self.key_path(), &leaf.key_pem);
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.join("key.pem")
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A rustls client config trusting only the test CA, offering `alpn`.
    fn client_config(&self, alpn: &[&[u8]]) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }

    /// A reqwest client trusting the test CA.
    fn reqwest_client(&self) -> reqwest::Client {
        let certs = reqwest::Certificate::from_pem_bundle(self.ca_pem.as_bytes()).unwrap();
        reqwest::Client::builder().tls_certs_merge(certs).pool_max_idle_per_host(0).build().unwrap()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// ------------------------------------------------------------ the servers

/// Test settings serving TLS with `pki`'s current pair.
fn tls_settings(pki: &Pki) -> Settings {
    let mut settings = base_settings();
    settings.tls_cert = Some(pki.cert_path());
    settings.tls_key = Some(pki.key_path());
    settings
}

/// A test server over TLS; its `base` and `client` speak https with the CA.
async fn spawn_tls_app(pki: &Pki, settings: Settings) -> TestApp {
    let mut app = spawn_app_with(settings).await;
    app.base = format!("https://127.0.0.1:{}", app.addr.port());
    app.client = pki.reqwest_client();
    app
}

/// A fresh PKI with one leaf installed, and a TLS server using it.
async fn tls_app(configure: impl FnOnce(&mut Settings)) -> (TestApp, Pki, Leaf) {
    let pki = Pki::new();
    let leaf = pki.leaf("first");
    pki.install(&leaf);
    let mut settings = tls_settings(&pki);
    configure(&mut settings);
    (spawn_tls_app(&pki, settings).await, pki, leaf)
}

// ------------------------------------------------------ the HTTP/2 client

/// One TLS connection (ALPN `h2` only) to `addr`: the negotiated peer
/// certificate (leaf, DER) and the TLS stream.
async fn tls_connect(
    pki: &Pki,
    addr: SocketAddr,
    alpn: &[&[u8]],
) -> (Vec<u8>, tokio_rustls::client::TlsStream<tokio::net::TcpStream>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(pki.client_config(alpn)));
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio::time::timeout(LIMIT, connector.connect(name, tcp)).await.expect("handshake in time").unwrap();
    let peer = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    (peer, tls)
}

/// An HTTP/2 connection over TLS, with the client's receive windows.
struct H2 {
    sender: SendRequest<Body>,
    conn: JoinHandle<Result<(), hyper::Error>>,
    authority: String,
}

async fn h2_connect(pki: &Pki, addr: SocketAddr, stream_window: u32, connection_window: u32) -> H2 {
    let (_, tls) = tls_connect(pki, addr, &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "the server chose h2");
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder.initial_stream_window_size(stream_window).initial_connection_window_size(connection_window);
    let (sender, conn) = builder.handshake(TokioIo::new(tls)).await.unwrap();
    H2 { sender, conn: tokio::spawn(conn), authority: format!("127.0.0.1:{}", addr.port()) }
}

impl H2 {
    /// Sends `GET path` with a bearer token; resolves at the response head.
    fn get(&self, path: &str, token: &str) -> impl Future<Output = hyper::Result<hyper::Response<Incoming>>> + use<> {
        let request = hyper::Request::get(format!("https://{}{path}", self.authority))
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap();
        let mut sender = self.sender.clone();
        async move { sender.send_request(request).await }
    }
}

/// The data frames of a response body.
fn frames(body: Incoming) -> Pin<Box<dyn Stream<Item = Result<Bytes, hyper::Error>> + Send>> {
    Box::pin(futures_util::stream::unfold(body, |mut body| async move {
        loop {
            match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await? {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        return Some((Ok(data), body));
                    }
                }
                Err(e) => return Some((Err(e), body)),
            }
        }
    }))
}

/// Reads events until `pred` holds (bounded), returning them all.
async fn h2_read_until(
    body: &mut Pin<Box<dyn Stream<Item = Result<Bytes, hyper::Error>> + Send>>,
    parser: &mut Parser,
    pred: impl Fn(&Event) -> bool,
) -> Vec<Event> {
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(LIMIT, body.next()).await {
            Ok(Some(Ok(bytes))) => {
                let events = parser.feed(&bytes);
                let hit = events.iter().any(&pred);
                out.extend(events);
                if hit {
                    return out;
                }
            }
            Ok(Some(Err(e))) => panic!("body error: {e}; got {out:?}"),
            Ok(None) => panic!("stream ended before the expected event; got {out:?}"),
            Err(_) => panic!("no expected event within {LIMIT:?}; got {out:?}"),
        }
    }
}

/// Reads a whole body (bounded) into events.
async fn h2_read_all(body: Incoming) -> Vec<Event> {
    let mut body = frames(body);
    let mut parser = Parser::new();
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(LIMIT, body.next()).await {
            Ok(Some(Ok(bytes))) => out.extend(parser.feed(&bytes)),
            Ok(Some(Err(e))) => panic!("body error: {e}; got {out:?}"),
            Ok(None) => return out,
            Err(_) => panic!("stream did not end within {LIMIT:?}; got {out:?}"),
        }
    }
}

fn is_delta(e: &Event) -> bool {
    matches!(e, Event::Message { event, .. } if event == "delta")
}

// ------------------------------------------------------------------- curl

/// Runs curl (bounded); a missing curl fails with a clear message.
async fn curl(args: &[&str]) -> (bool, String, String) {
    let run = tokio::process::Command::new("curl").args(args).kill_on_drop(true).output();
    let out = tokio::time::timeout(LIMIT, run)
        .await
        .expect("curl finished in time")
        .unwrap_or_else(|e| panic!("cannot run curl ({e}): install it (Debian: apt-get install curl)"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn parse_all(text: &str) -> Vec<Event> {
    Parser::new().feed(text.as_bytes())
}

const PROMPT: &str = "héllo, 👩‍👩‍👧 and 🇫🇷 over h2";

#[tokio::test]
async fn curl_speaks_http2_over_tls_and_gets_the_exact_stream() {
    let (app, pki, _) = tls_app(|_| {}).await;
    let token = app.token("alice", "stream");
    let url = format!("{}/v1/stream?generator=echo&prompt={}", app.base, urlencode(PROMPT));
    let auth = format!("Authorization: Bearer {token}");
    let ca = pki.ca_path();
    let ca = ca.to_str().unwrap();
    let (ok, out, log) = curl(&["-sSvN", "--http2", "--cacert", ca, "-H", &auth, &url]).await;
    assert!(ok, "{log}");
    assert!(log.contains("ALPN: server accepted h2") || log.contains("ALPN, server accepted to use h2"), "{log}");
    assert!(log.contains("< HTTP/2 200"), "{log}");
    let events = parse_all(&out);
    assert_eq!(delta_text(&events), PROMPT);
    assert_eq!(messages(&events).last().map(|m| m.0.clone()).as_deref(), Some("done"));
    // A client without h2 in its ALPN gets HTTP/1.1 on the same port.
    let (ok, out, log) = curl(&["-sSvN", "--http1.1", "--cacert", ca, "-H", &auth, &url]).await;
    assert!(ok && log.contains("< HTTP/1.1 200"), "{log}");
    assert_eq!(delta_text(&parse_all(&out)), PROMPT);
    // Auth holds on HTTP/2 as on HTTP/1.1.
    let (_, out, log) = curl(&["-sSv", "--http2", "--cacert", ca, &url]).await;
    assert!(log.contains("< HTTP/2 401") && log.contains("www-authenticate: Bearer"), "{log}");
    assert!(out.contains("\"status\":401"), "{out}");
    // The two HTTP/2 curls, and the client asking for /metrics now.
    assert_eq!(app.metric("tokengate_connections_total{protocol=\"h2\"}").await, 3.0);
    // And a client that does not trust the CA does not get through.
    let (ok, _, log) = curl(&["-sS", "--http2", &url]).await;
    assert!(!ok, "{log}");
}

#[tokio::test]
async fn h2c_with_prior_knowledge_is_an_option_of_plain_listeners() {
    let mut settings = base_settings();
    settings.h2c = Some(true);
    let app = spawn_app_with(settings).await;
    let token = app.token("alice", "stream");
    let url = format!("{}/v1/stream?generator=echo&prompt={}", app.base, urlencode(PROMPT));
    let auth = format!("Authorization: Bearer {token}");
    let (ok, out, log) = curl(&["-sSvN", "--http2-prior-knowledge", "-H", &auth, &url]).await;
    assert!(ok && log.contains("< HTTP/2 200"), "{log}");
    assert_eq!(delta_text(&parse_all(&out)), PROMPT);
    // HTTP/1.1 on the same listener still works.
    let (ok, out, log) = curl(&["-sSvN", "--http1.1", "-H", &auth, &url]).await;
    assert!(ok && log.contains("< HTTP/1.1 200"), "{log}");
    assert_eq!(delta_text(&parse_all(&out)), PROMPT);

    // Without the option, a plain listener is HTTP/1.1 only.
    let plain = spawn_app().await;
    let url = format!("{}/healthz", plain.base);
    let (ok, _, log) = curl(&["-sSv", "--http2-prior-knowledge", &url]).await;
    assert!(!ok || !log.contains("< HTTP/2 200"), "{log}");
}

#[tokio::test]
async fn a_hundred_streams_share_one_http2_connection_each_with_its_exact_text() {
    let (app, pki, _) = tls_app(|s| s.max_streams_per_subject = Some(1000)).await;
    let h2 = h2_connect(&pki, app.addr, 65_535, 1 << 20).await;
    let token = app.token("alice", "stream");
    let texts: Vec<String> = (0..100).map(|i| format!("stream {i}: e\u{301}🇫🇷👍🏽 {}", "x".repeat(i))).collect();
    let opened: Vec<_> = texts
        .iter()
        .map(|text| h2.get(&format!("/v1/stream?generator=echo&pace_ms=1&prompt={}", urlencode(text)), &token))
        .collect();
    let responses = futures_util::future::join_all(opened).await;
    let reads = responses.into_iter().map(|r| {
        let r = r.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.version(), hyper::Version::HTTP_2);
        h2_read_all(r.into_body())
    });
    let all = futures_util::future::join_all(reads).await;
    for (text, events) in texts.iter().zip(&all) {
        assert_eq!(&delta_text(events), text);
        assert_eq!(messages(events).last().map(|m| m.0.clone()).as_deref(), Some("done"));
    }
    // That one, and the client asking for /metrics now.
    assert_eq!(app.metric("tokengate_connections_total{protocol=\"h2\"}").await, 2.0, "one connection for all");
    assert!(!h2.conn.is_finished());
}

#[tokio::test]
async fn max_concurrent_streams_holds_the_next_stream_until_one_ends() {
    // The default, 250: the 251st stream waits in the client, by the protocol.
    let (app, pki, _) = tls_app(|s| s.max_streams_per_subject = Some(1000)).await;
    let h2 = h2_connect(&pki, app.addr, 65_535, 1 << 20).await;
    let token = app.token("alice", "stream");
    let open: Vec<_> = (0..250).map(|_| h2.get("/v1/stream?generator=probe&prompt=x", &token)).collect();
    let mut bodies: Vec<_> = futures_util::future::join_all(open)
        .await
        .into_iter()
        .map(|r| {
            let r = r.unwrap();
            assert_eq!(r.status(), 200);
            r.into_body()
        })
        .collect();
    eventually(LIMIT, "250 streams open", || app.probe.started.load(Ordering::SeqCst) == 250).await;
    let mut next = Box::pin(h2.get("/v1/stream?generator=probe&prompt=y", &token));
    assert!(tokio::time::timeout(Duration::from_millis(500), &mut next).await.is_err(), "the 251st was not held");
    assert_eq!(app.probe.started.load(Ordering::SeqCst), 250, "the server never saw it");
    bodies.pop();
    let r = tokio::time::timeout(LIMIT, next).await.expect("it goes once a stream ends").unwrap();
    assert_eq!(r.status(), 200);
    eventually(LIMIT, "the 251st started", || app.probe.started.load(Ordering::SeqCst) == 251).await;
}

#[tokio::test]
async fn a_stalled_http2_stream_is_backpressured_by_flow_control_while_its_neighbours_flow() {
    let (app, pki, _) = tls_app(|s| {
        s.send_queue = Some(8);
        s.max_lag = Some("1s".into());
    })
    .await;
    let h2 = h2_connect(&pki, app.addr, 65_535, 1 << 20).await;
    let token = app.token("alice", "stream");
    let resp = h2.get("/v1/stream?generator=firehose", &token).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut firehose = frames(resp.into_body());
    let mut parser = Parser::new();
    h2_read_until(&mut firehose, &mut parser, is_delta).await;
    // Stop reading it: its window closes, hyper stops polling its body, the
    // queue fills, the generator stops being pulled; after max_lag it ends.
    eventually(LIMIT, "slow consumer ended", || app.firehose.dropped.load(Ordering::SeqCst) == 1).await;
    assert_eq!(app.state.slots.open(), 0, "slot freed without the client reading");
    let pulls = app.firehose_pulls.load(Ordering::SeqCst);
    eprintln!("firehose chunks pulled before the end (h2): {pulls}");
    // A 64 KiB stream window, 64 KiB buffered by the server and 8 queued
    // events: a few hundred chunks, far from the HTTP/1.1 bound.
    assert!(pulls < 20_000, "generator kept running for a stream nobody read: {pulls} chunks");
    // The connection is not stalled: another stream on it flows.
    let other = h2.get(&format!("/v1/stream?generator=echo&prompt={}", urlencode(PROMPT)), &token).await.unwrap();
    assert_eq!(delta_text(&h2_read_all(other.into_body()).await), PROMPT);
    // Reading the stalled one again: what was queued, then the terminal error.
    let mut events = Vec::new();
    while let Ok(Some(chunk)) = tokio::time::timeout(LIMIT, firehose.next()).await {
        events.extend(parser.feed(&chunk.unwrap()));
    }
    let (last, data, _) = messages(&events).pop().unwrap();
    assert_eq!((last.as_str(), data["code"].as_str()), ("error", Some("slow_consumer")));
    assert_eq!(app.metric("tokengate_refusals_total{reason=\"slow_consumer\"}").await, 1.0);
    assert!(app.metric("tokengate_send_queue_high_water_events").await <= 8.0);
    assert_eq!(app.firehose_pulls.load(Ordering::SeqCst), pulls, "nothing pulled after the end");
}

#[tokio::test]
async fn a_hundred_stalled_streams_on_one_connection_stay_bounded() {
    // `max_lag` 2 s: the connection's write-stall guard (twice that) must not
    // fire while a loaded machine's client is still taking in the windows'
    // 16 MiB, or the streams would end as `client_gone`, not slow consumers.
    let (app, pki, _) = tls_app(|s| {
        s.send_queue = Some(8);
        s.max_lag = Some("2s".into());
        s.max_streams_per_subject = Some(1000);
    })
    .await;
    // The client opens 100 firehoses and reads none of them. Its windows
    // are generous (1 MiB per stream, 16 MiB for the connection): what
    // bounds the server is its own per-stream send buffer and queue.
    let h2 = h2_connect(&pki, app.addr, 1 << 20, 16 << 20).await;
    let token = app.token("alice", "stream");
    let open: Vec<_> = (0..100).map(|_| h2.get("/v1/stream?generator=firehose", &token)).collect();
    let stalled: Vec<_> = futures_util::future::join_all(open).await.into_iter().map(|r| r.unwrap()).collect();
    eventually(LIMIT, "all 100 ended as slow consumers", || app.firehose.dropped.load(Ordering::SeqCst) == 100).await;
    assert_eq!(app.state.slots.open(), 0);
    let pulls = app.firehose_pulls.load(Ordering::SeqCst);
    eprintln!("firehose chunks pulled by 100 stalled h2 streams: {pulls}");
    // Each stream may fill the client's 1 MiB window plus 64 KiB held by
    // the server: about 1.1 MiB of ~40-byte events, 10 a chunk, so below
    // 3000 chunks a stream. Unbounded buffering would pull without end.
    assert!(pulls < 100 * 3000, "{pulls} chunks");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.firehose_pulls.load(Ordering::SeqCst), pulls, "nothing pulled after the end");
    assert_eq!(app.metric("tokengate_refusals_total{reason=\"slow_consumer\"}").await, 100.0);
    drop(stalled);
}

#[tokio::test]
async fn shutdown_sends_the_shutdown_event_then_goaway() {
    let (mut app, pki, _) = tls_app(|s| {
        s.shutdown_grace = Some("300ms".into());
        s.shutdown_retry = Some("1500ms".into());
    })
    .await;
    let mut h2 = h2_connect(&pki, app.addr, 65_535, 1 << 20).await;
    let token = app.token("alice", "stream");
    let resp = h2.get("/v1/stream?generator=probe&prompt=hello", &token).await.unwrap();
    let mut body = frames(resp.into_body());
    let mut parser = Parser::new();
    h2_read_until(&mut body, &mut parser, is_delta).await;
    app.signal_shutdown();
    let mut rest = Vec::new();
    while let Ok(Some(chunk)) = tokio::time::timeout(LIMIT, body.next()).await {
        rest.extend(parser.feed(&chunk.unwrap()));
    }
    let tail: Vec<&Event> = rest.iter().filter(|e| !matches!(e, Event::Comment(_))).collect();
    assert_eq!(tail.len(), 2, "{rest:?}");
    assert_eq!(*tail[0], Event::Retry(1500));
    assert!(matches!(tail[1], Event::Message { event, .. } if event == "shutdown"), "{tail:?}");
    // Then GOAWAY: the client connection ends cleanly and takes no request.
    let ended = tokio::time::timeout(LIMIT, &mut h2.conn).await.expect("the connection closed").unwrap();
    assert!(ended.is_ok(), "{ended:?}");
    assert!(h2.sender.is_closed());
    let result = tokio::time::timeout(LIMIT, &mut app.server).await.expect("server stopped").unwrap();
    assert!(result.is_ok());
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_like_an_idle_http1_one() {
    let (app, pki, _) = tls_app(|s| {
        s.header_timeout = Some("300ms".into());
        s.heartbeat = Some("100ms".into());
    })
    .await;
    let mut h2 = h2_connect(&pki, app.addr, 65_535, 1 << 20).await;
    let token = app.token("alice", "stream");
    // A stream open for longer than the timeout keeps the connection.
    // (The probe holds its last character back: a mark could follow.)
    let resp = h2.get("/v1/stream?generator=probe&prompt=xy", &token).await.unwrap();
    let mut body = frames(resp.into_body());
    let mut parser = Parser::new();
    h2_read_until(&mut body, &mut parser, is_delta).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    h2_read_until(&mut body, &mut parser, |e| matches!(e, Event::Comment(_))).await;
    assert!(!h2.conn.is_finished(), "closed with a stream open");
    // Once nothing is open, it is closed within about two timeouts.
    drop(body);
    let ended = tokio::time::timeout(Duration::from_secs(3), &mut h2.conn).await;
    assert!(ended.is_ok(), "idle connection still open");
}

#[tokio::test]
async fn the_tls_handshake_is_bounded_and_counted_against_the_connection_limit() {
    use tokio::io::AsyncReadExt;
    let (app, pki, _) = tls_app(|s| {
        s.header_timeout = Some("2s".into());
        s.max_connections = Some(2);
    })
    .await;
    // A client that connects and never says hello holds a slot, a real
    // one the other...
    let mut silent = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (peer, held) = tls_connect(&pki, app.addr, &[b"h2"]).await;
    assert!(!peer.is_empty());
    let mut other = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let mut buf = [0u8; 16];
    // (Well before the 2 s handshake timeout could have closed it.)
    let n = tokio::time::timeout(Duration::from_secs(1), other.read(&mut buf)).await.expect("refused at once");
    assert!(matches!(n, Ok(0) | Err(_)), "over the cap: closed");
    // ...until the handshake timeout closes it.
    let n = tokio::time::timeout(LIMIT, silent.read(&mut buf)).await.expect("closed by the timeout");
    assert!(matches!(n, Ok(0) | Err(_)));
    drop(held);
    assert_eq!(app.metric("tokengate_refusals_total{reason=\"tls_handshake_timeout\"}").await, 1.0);
    assert!(app.metric("tokengate_refusals_total{reason=\"connection_limit\"}").await >= 1.0);
}

#[tokio::test]
async fn certificates_reload_when_the_files_change_and_a_bad_pair_keeps_the_old_one() {
    let (app, pki, first) = tls_app(|s| s.tls_reload_interval = Some("100ms".into())).await;
    let (peer, _tls) = tls_connect(&pki, app.addr, &[b"h2"]).await;
    assert_eq!(peer, first.der);
    let kept = h2_connect(&pki, app.addr, 65_535, 1 << 20).await;

    let second = pki.leaf("second");
    pki.install(&second);
    let mut seen = Vec::new();
    for _ in 0..100 {
        seen = tls_connect(&pki, app.addr, &[b"h2"]).await.0;
        if seen == second.der {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, second.der, "new connections get the new certificate");
    assert!(app.metric("tokengate_tls_reloads_total{result=\"ok\"}").await >= 1.0);
    // The connection made before the rotation goes on.
    let r = kept.get("/healthz", "").await.unwrap();
    assert_eq!(r.status(), 200);

    // A broken certificate, then a certificate with someone else's key:
    // both refused, the second pair stays.
    let errors = app.metric("tokengate_tls_reloads_total{result=\"error\"}").await;
    replace(&pki.cert_path(), "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n");
    let wait_error = |before: f64| {
        let app = &app;
        async move {
            for _ in 0..100 {
                if app.metric("tokengate_tls_reloads_total{result=\"error\"}").await > before {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("the bad pair was never looked at");
        }
    };
    wait_error(errors).await;
    assert_eq!(tls_connect(&pki, app.addr, &[b"h2"]).await.0, second.der);
    let errors = app.metric("tokengate_tls_reloads_total{result=\"error\"}").await;
    let third = pki.leaf("third");
    replace(&pki.cert_path(), &third.chain_pem);
    wait_error(errors).await;
    assert_eq!(tls_connect(&pki, app.addr, &[b"h2"]).await.0, second.der, "mismatched key refused");
    // Fixing the key completes the rotation.
    replace(&pki.key_path(), &third.key_pem);
    for _ in 0..100 {
        if tls_connect(&pki, app.addr, &[b"h2"]).await.0 == third.der {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the fixed pair was not loaded");
}

#[tokio::test]
async fn sighup_reloads_the_certificate_of_the_binary() {
    let pki = Pki::new();
    let first = pki.leaf("first");
    pki.install(&first);
    let (cert, key) = (pki.cert_path(), pki.key_path());
    let args = [
        "--jwt-secret",
        SECRET,
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--tls-reload-interval",
        "0s",
    ];
    let server = crate::binary::start(&args, &[], "mint a token with");
    let base = server.base.clone();
    assert!(base.starts_with("https://127.0.0.1:"), "{base}");
    let addr: SocketAddr = base.trim_start_matches("https://").parse().unwrap();
    assert_eq!(tls_connect(&pki, addr, &[b"h2"]).await.0, first.der);
    let second = pki.leaf("second");
    pki.install(&second);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(tls_connect(&pki, addr, &[b"h2"]).await.0, first.der, "no polling with 0s");
    let pid = server.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    let mut seen = Vec::new();
    for _ in 0..100 {
        seen = tls_connect(&pki, addr, &[b"h2"]).await.0;
        if seen == second.der {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, second.der, "SIGHUP reloaded");
    let health = pki.reqwest_client().get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200, "still serving after SIGHUP");
    // `tokengate healthcheck` (the image's HEALTHCHECK) speaks TLS too.
    let probe = |cert: &Path| {
        let bin = env!("CARGO_BIN_EXE_tokengate");
        let listen = addr.to_string();
        let args = ["--listen", &listen, "--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()];
        std::process::Command::new(bin).args(args).args(["healthcheck", "--path", "/healthz"]).output().unwrap()
    };
    let out = probe(&cert);
    assert!(out.status.success(), "{out:?}");
    // It trusts exactly the configured certificate.
    let other = pki.dir.join("other.pem");
    std::fs::write(&other, pki.leaf("other").chain_pem).unwrap();
    assert!(!probe(&other).status.success());
}

#[tokio::test]
async fn tls_settings_are_checked_at_start() {
    let pki = Pki::new();
    let err = |s: Settings| tokengate::config::Config::from_settings(s).err().map(|e| e.setting());
    let mut s = base_settings();
    s.tls_cert = Some(pki.cert_path());
    assert_eq!(err(s.clone()), Some("tls_key"));
    s.tls_key = Some(pki.key_path());
    assert_eq!(err(s.clone()), Some("tls_cert"), "the files do not exist yet");
    let leaf = pki.leaf("x");
    pki.install(&leaf);
    s.h2c = Some(true);
    assert_eq!(err(s.clone()), Some("h2c"));
    s.h2c = None;
    s.max_concurrent_streams = Some(0);
    assert_eq!(err(s.clone()), Some("max_concurrent_streams"));
    s.max_concurrent_streams = None;
    // A key that does not match stops start-up, naming the files.
    replace(&pki.key_path(), &pki.leaf("other").key_pem);
    let config = tokengate::config::Config::from_settings(s).unwrap();
    let built = tokengate::server::Application::build(config).await;
    let message = built.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("tls_cert") && message.contains("does not fit"), "{message}");
    assert!(!message.contains("PRIVATE KEY"), "{message}");
}

// ---------------------------------------------------------------- browser

/// Opens `count` `EventSource`s to `origin` from one page at once and
/// returns how many got their first delta within `wait`.
async fn event_sources_receiving(
    client: &fantoccini::Client,
    origin: &str,
    token: &str,
    count: usize,
    wait: Duration,
) -> usize {
    client.goto(&format!("{origin}/healthz")).await.unwrap();
    let script = format!(
        "window.got = 0; for (let i = 0; i < {count}; i++) {{ \
           const es = new EventSource('{origin}/v1/stream?generator=probe&prompt=xy&access_token={token}'); \
           let seen = false; \
           es.addEventListener('delta', () => {{ if (!seen) {{ seen = true; window.got++; }} }}); }} \
         return true;"
    );
    client.execute(&script, vec![]).await.unwrap();
    let deadline = tokio::time::Instant::now() + wait;
    let mut got = 0;
    while tokio::time::Instant::now() < deadline {
        got = client.execute("return window.got", vec![]).await.unwrap().as_u64().unwrap_or(0) as usize;
        if got == count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    got
}

#[tokio::test]
async fn chromium_over_tls_holds_twenty_event_sources_on_one_origin_and_http1_stalls_the_seventh() {
    // HTTP/2 over TLS (the test CA is not the browser's: loopback only, so
    // certificate errors are ignored for this profile).
    let (app, _pki, _) = tls_app(|s| s.max_streams_per_subject = Some(100)).await;
    let token = app.token("alice", "stream");
    let mut browser = crate::browser::browser_with(&["--ignore-certificate-errors"]).await;
    let client = browser.client.take().unwrap();
    let origin = format!("https://127.0.0.1:{}", app.addr.port());
    let got = event_sources_receiving(&client, &origin, &token, 20, LIMIT).await;
    assert_eq!(got, 20, "all 20 receive over HTTP/2, none waits for another");
    assert_eq!(app.state.slots.open(), 20);
    assert!(app.metric("tokengate_connections_total{protocol=\"h2\"}").await >= 1.0);
    assert_eq!(app.metric("tokengate_connections_total{protocol=\"http1\"}").await, 0.0);

    // The same page over HTTP/1.1: six connections per origin, so the 7th
    // and later wait. That is the browser's limit, not tokengate's.
    let mut settings = base_settings();
    settings.max_streams_per_subject = Some(100);
    let plain = spawn_app_with(settings).await;
    let origin = format!("http://127.0.0.1:{}", plain.addr.port());
    let got = event_sources_receiving(&client, &origin, &token, 20, Duration::from_secs(3)).await;
    assert_eq!(got, 6, "HTTP/1.1: only 6 EventSources per origin receive");
    client.close().await.unwrap();
}

// ------------------------------------------------------------ TLS outbound

#[tokio::test]
async fn an_https_upstream_is_reached_with_the_configured_ca() {
    use std::collections::BTreeMap;
    use tokengate::generator::upstream::UpstreamSettings;
    let pki = Pki::new();
    let leaf = pki.leaf("upstream");
    let mock = crate::mock_upstream::start_tls(&leaf.chain_pem, &leaf.key_pem).await;
    assert!(mock.base_url().starts_with("https://"));
    let upstream = |ca: Option<PathBuf>| UpstreamSettings {
        base_url: mock.base_url(),
        model: "normal".into(),
        ca_file: ca,
        first_byte_timeout: Some("2s".into()),
        retries: Some(0),
        ..UpstreamSettings::default()
    };
    let mut settings = base_settings();
    settings.upstreams = Some(BTreeMap::from([
        ("private".to_owned(), upstream(Some(pki.ca_path()))),
        ("untrusted".to_owned(), upstream(None)),
    ]));
    let app = spawn_app_with(settings).await;
    let events = read_events(app.stream(&format!("generator=private&prompt={}", urlencode(PROMPT))).await, LIMIT).await;
    assert_eq!(messages(&events).last().map(|m| m.0.clone()).as_deref(), Some("done"), "{events:?}");
    assert_eq!(delta_text(&events), PROMPT, "exact text through TLS");
    assert_eq!(mock.seen.requests.load(Ordering::SeqCst), 1);
    // Without the CA the certificate is refused: a terminal error, and the
    // mock never sees a request.
    let events = read_events(app.stream("generator=untrusted&prompt=hi").await, LIMIT).await;
    let (last, data, _) = messages(&events).pop().unwrap();
    assert_eq!(last, "error", "{data}");
    assert_eq!(mock.seen.requests.load(Ordering::SeqCst), 1);
    // A CA file on a plain upstream is a mistake, named at start.
    let mut plain = upstream(Some(pki.ca_path()));
    plain.base_url = "http://127.0.0.1:9/v1".into();
    let settings = Settings { upstreams: Some(BTreeMap::from([("p".to_owned(), plain)])), ..base_settings() };
    let err = tokengate::config::Config::from_settings(settings).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("ca_file") && err.contains("https://"), "{err}");
}

/// A `redis-server` with TLS only (no plain port), killed on drop.
struct TlsRedis {
    child: std::process::Child,
    port: u16,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_tls_redis(pki: &Pki, leaf: &Leaf) -> TlsRedis {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (cert, key) = (pki.dir.join("redis-cert.pem"), pki.dir.join("redis-key.pem"));
    std::fs::write(&cert, &leaf.chain_pem).unwrap();
    std::fs::write(&key, &leaf.key_pem).unwrap();
    let child = std::process::Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--tls-cert-file", cert.to_str().unwrap(), "--tls-key-file", key.to_str().unwrap()])
        .args(["--tls-ca-cert-file", pki.ca_path().to_str().unwrap(), "--tls-auth-clients", "no"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run redis-server ({e}): install it (Debian: apt-get install redis-server)"));
    let mut redis = TlsRedis { child, port };
    for _ in 0..200 {
        if let Some(status) = redis.child.try_wait().unwrap() {
            let mut log = String::new();
            if let Some(mut err) = redis.child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut err, &mut log);
            }
            panic!("redis-server with TLS exited ({status}): is it built with TLS? {log}");
        }
        if std::net::TcpStream::connect(("127.0.0.1", redis.port)).is_ok() {
            return redis;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("redis-server with TLS never listened");
}

#[tokio::test]
async fn rediss_reaches_a_tls_redis_with_the_configured_ca() {
    let pki = Pki::new();
    let leaf = pki.leaf("redis");
    let redis = start_tls_redis(&pki, &leaf);
    let mut settings = base_settings();
    settings.redis_url = Some(format!("rediss://127.0.0.1:{}/0", redis.port));
    settings.redis_ca_file = Some(pki.ca_path());
    let app = spawn_app_with(settings.clone()).await;
    let mut ready = false;
    for _ in 0..200 {
        if app.get("/readyz", None).await.status() == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ready, "never ready over rediss://");
    // A stream goes through the Redis log.
    let events = read_events(app.stream(&format!("generator=echo&prompt={}", urlencode(PROMPT))).await, LIMIT).await;
    assert_eq!(delta_text(&events), PROMPT);

    // Without the CA, the system roots do not know the server: not ready.
    settings.redis_ca_file = None;
    let untrusted = spawn_app_with(settings).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(untrusted.get("/readyz", None).await.status(), 503);
    // redis_ca_file without rediss:// is refused.
    let s = Settings {
        redis_url: Some("redis://127.0.0.1:6379".into()),
        redis_ca_file: Some(pki.ca_path()),
        ..base_settings()
    };
    assert_eq!(tokengate::config::Config::from_settings(s).err().map(|e| e.setting()), Some("redis_ca_file"));
}

/// The dashboard over HTTP/2: all seven panels connect and update at once
/// on one connection (the alert panel shows `alert` events), and a
/// screenshot is saved to tests/artifacts/dashboard.png.
#[tokio::test]
async fn the_dashboard_over_http2_updates_every_panel() {
    let (app, _pki, _) = tls_app(|s| {
        s.demo_feeds = Some(true);
        s.demo_feeds_every = Some("300ms".into());
        s.rate_subject_per_min = Some(6000);
        s.rate_subject_burst = Some(200);
    })
    .await;
    let token = app.token("viewer", "stream");
    let mut browser = crate::browser::browser_with(&["--ignore-certificate-errors"]).await;
    let client = browser.client.take().unwrap();
    client.goto(&format!("https://127.0.0.1:{}/dashboard#token={token}", app.addr.port())).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = crate::dashboard::panels(&client).await;
        if now.len() == 7 && now.iter().all(|(_, open, n)| *open && *n > 0) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not every panel updated over HTTP/2: {now:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let alerts =
        client.execute("return document.querySelectorAll('#alerts-list li.alert').length", vec![]).await.unwrap();
    assert!(alerts.as_u64().unwrap() >= 1, "the alert panel shows alert events");
    assert!(app.metric("tokengate_connections_total{protocol=\"h2\"}").await >= 1.0);
    assert_eq!(app.metric("tokengate_connections_total{protocol=\"http1\"}").await, 0.0);
    let png = client.screenshot().await.unwrap();
    std::fs::create_dir_all("tests/artifacts").unwrap();
    std::fs::write("tests/artifacts/dashboard.png", png).unwrap();
    client.close().await.unwrap();
}

/// `deploy/nginx-tls.conf` with real nginx: TLS terminated in nginx,
/// HTTP/2 to the client (curl), the stream passed through unbuffered from
/// a plain replica, with its exact text.
#[tokio::test]
async fn nginx_terminates_tls_with_http2_to_clients() {
    let nginx = ["nginx", "/usr/sbin/nginx"]
        .into_iter()
        .find(|b| std::process::Command::new(b).arg("-v").output().is_ok_and(|o| o.status.success()))
        .unwrap_or_else(|| {
            panic!("nginx is required: install it (Debian: apt-get install nginx) or run scripts/test.sh")
        });
    let pki = Pki::new();
    let leaf = pki.leaf("nginx");
    pki.install(&leaf);
    let app = spawn_app().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = std::env::temp_dir().join(format!("tokengate-nginx-tls-{port}"));
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let conf = std::fs::read_to_string("deploy/nginx-tls.conf").unwrap();
    let needles = [
        "server tokengate-a:8080 max_fails=0;",
        "server tokengate-b:8080 max_fails=0;",
        "listen 443 ssl http2;",
        "/etc/nginx/tls/fullchain.pem",
        "/etc/nginx/tls/privkey.pem",
        "worker_processes auto;",
        "shared:tls:10m",
    ];
    for needle in needles {
        assert!(conf.contains(needle), "deploy/nginx-tls.conf no longer contains `{needle}`: update this test");
    }
    let conf = conf
        .replace("server tokengate-a:8080 max_fails=0;", &format!("server {} max_fails=0;", app.addr))
        .replace("server tokengate-b:8080 max_fails=0;", "")
        .replace("listen 443 ssl http2;", &format!("listen 127.0.0.1:{port} ssl http2;"))
        .replace("/etc/nginx/tls/fullchain.pem", pki.cert_path().to_str().unwrap())
        .replace("/etc/nginx/tls/privkey.pem", pki.key_path().to_str().unwrap())
        .replace("worker_processes auto;", "worker_processes 1;")
        .replace("shared:tls:10m", "shared:tls:1m");
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let mut command = std::process::Command::new(nginx);
    command
        .args(["-p", dir.to_str().unwrap(), "-c", path.to_str().unwrap()])
        .args(["-g", &format!("daemon off; pid {}/nginx.pid; error_log {}/error.log;", dir.display(), dir.display())])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // Its own process group, killed whole (workers and all).
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command.spawn().unwrap();
    let up = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(25));
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(up, "nginx did not start: {}", std::fs::read_to_string(dir.join("error.log")).unwrap_or_default());
    let token = app.token("alice", "stream");
    let url = format!("https://127.0.0.1:{port}/v1/stream?generator=echo&prompt={}", urlencode(PROMPT));
    let auth = format!("Authorization: Bearer {token}");
    let ca = pki.ca_path();
    let (ok, out, log) = curl(&["-sSvN", "--http2", "--cacert", ca.to_str().unwrap(), "-H", &auth, &url]).await;
    kill_group(&mut child);
    assert!(ok, "{log}");
    assert!(log.contains("< HTTP/2 200"), "nginx speaks HTTP/2 to the client: {log}");
    let events = parse_all(&out);
    assert_eq!(delta_text(&events), PROMPT);
    assert_eq!(messages(&events).last().map(|m| m.0.clone()).as_deref(), Some("done"));
}

/// Every dialect, resume and a refusal over HTTP/2 (ALPN-negotiated by an
/// ordinary client): the same answers as over HTTP/1.1.
#[tokio::test]
async fn every_dialect_and_resume_work_over_http2() {
    let (app, _pki, _) = tls_app(|s| s.detach_grace = Some("10s".into())).await;
    let token = app.token("alice", "stream");
    let post = |path: &str, body: serde_json::Value| {
        app.client.post(format!("{}{path}", app.base)).bearer_auth(&token).json(&body).send()
    };
    let chat = post(
        "/v1/chat/completions",
        serde_json::json!({"model": "echo", "stream": true, "messages": [{"role": "user", "content": "hi h2"}]}),
    )
    .await
    .unwrap();
    assert_eq!(chat.version(), reqwest::Version::HTTP_2);
    let body = chat.text().await.unwrap();
    assert!(body.contains("\"finish_reason\":\"stop\"") && body.ends_with("data: [DONE]\n\n"), "{body}");
    let messages_ = post(
        "/v1/messages",
        serde_json::json!({"model": "echo", "max_tokens": 10, "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .unwrap();
    assert_eq!(messages_.version(), reqwest::Version::HTTP_2);
    assert!(messages_.text().await.unwrap().contains("event: message_stop"));
    let responses =
        post("/v1/responses", serde_json::json!({"model": "echo", "stream": true, "input": "hi"})).await.unwrap();
    assert!(responses.text().await.unwrap().contains("event: response.completed"));
    let ui = post(
        "/v1/ui/chat",
        serde_json::json!({"id": "c", "model": "echo", "messages": [{"id": "m", "role": "user", "parts": [{"type": "text", "text": "hi"}]}]}),
    )
    .await
    .unwrap();
    assert!(ui.text().await.unwrap().contains("\"type\":\"finish\""));

    // Resume over HTTP/2: the events after the second delta, exactly.
    let native = app
        .client
        .get(format!("{}/v1/stream?generator=echo&prompt=abcdef", app.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(native.version(), reqwest::Version::HTTP_2);
    let events = parse_all(&native.text().await.unwrap());
    let second =
        messages(&events).iter().filter(|(e, _, _)| e == "delta").nth(1).and_then(|(_, _, id)| id.clone()).unwrap();
    let stream_id = second.split('.').next().unwrap().to_owned();
    let resumed = app
        .client
        .get(format!("{}/v1/streams/{stream_id}", app.base))
        .bearer_auth(&token)
        .header("last-event-id", &second)
        .send()
        .await
        .unwrap();
    assert_eq!(delta_text(&parse_all(&resumed.text().await.unwrap())), "cdef");

    // A refusal keeps its shape and challenge.
    let refused = app.client.get(format!("{}/v1/stream?prompt=x", app.base)).send().await.unwrap();
    assert_eq!((refused.version(), refused.status().as_u16()), (reqwest::Version::HTTP_2, 401));
    assert_eq!(refused.headers()["www-authenticate"], r#"Bearer realm="tokengate""#);
}
