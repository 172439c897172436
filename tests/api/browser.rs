//! The demo page in headless Chromium (Debian's chromium and
//! chromium-driver), driven over WebDriver: type a prompt and see the exact
//! text, streamed with a stream ticket in the `EventSource` URL (never the
//! token); cut the connection mid-stream and see the page resume with the
//! exact text on the same ticket; press Stop and see the stream end. A screenshot is saved to
//! tests/artifacts/. Missing Chromium fails the test; it never skips.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

use crate::helpers::*;

const LIMIT: Duration = Duration::from_secs(30);

/// A TCP proxy in front of the server that can cut every connection at
/// once, as a crashing proxy or a dropped mobile link would.
struct CuttableProxy {
    port: u16,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
}

impl CuttableProxy {
    async fn start(target: std::net::SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let registry = connections.clone();
        let accepted: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                registry.lock().unwrap().push(task.abort_handle());
            }
        });
        Self { port, connections, accepted }
    }

    fn cut(&self) {
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Chromium under chromedriver, both stopped on drop.
///
/// chromedriver runs in a process group of its own, which Chromium's
/// processes join; dropping kills the whole group. Killing chromedriver
/// alone left every Chromium it had started running (orphaned, about
/// 150 MB each), whenever a test did not close its session.
pub struct Browser {
    driver: Child,
    /// The WebDriver session.
    pub client: Option<Client>,
}

impl Browser {
    /// Every process chromedriver started, directly or not.
    pub fn descendants(&self) -> Vec<u32> {
        descendants(self.driver.id())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        kill_group(&mut self.driver);
    }
}

async fn browser() -> Browser {
    browser_with(&[]).await
}

/// Headless Chromium with `extra` command-line flags.
pub async fn browser_with(extra: &[&str]) -> Browser {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or_else(|| panic!("Chromium is required: install it (Debian: apt-get install chromium chromium-driver) or run scripts/test.sh, which does"));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let driver = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("chromedriver is required ({e}): apt-get install chromium-driver, or run scripts/test.sh")
        });
    let mut browser = Browser { driver, client: None };
    let profile = std::env::temp_dir().join(format!("tokengate-chromium-{port}"));
    let mut args: Vec<String> = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-crash-reporter",
        "--disable-breakpad",
        "--no-first-run",
        "--disable-quic",
        "--window-size=1000,900",
    ]
    .into_iter()
    .chain(extra.iter().copied())
    .map(str::to_owned)
    .collect();
    args.push(format!("--user-data-dir={}", profile.display()));
    let caps = json!({ "goog:chromeOptions": { "binary": chromium, "args": args } });
    let caps: fantoccini::wd::Capabilities = caps.as_object().unwrap().clone();
    for _ in 0..100 {
        let mut builder = ClientBuilder::rustls().unwrap();
        builder.capabilities(caps.clone());
        if let Ok(client) = builder.connect(&format!("http://127.0.0.1:{port}")).await {
            browser.client = Some(client);
            return browser;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("could not start a Chromium session through chromedriver");
}

async fn js(client: &Client, script: &str) -> serde_json::Value {
    client.execute(script, vec![]).await.unwrap()
}

async fn answer(client: &Client) -> String {
    js(client, "return document.getElementById('answer').textContent").await.as_str().unwrap_or_default().to_owned()
}

async fn status(client: &Client) -> String {
    js(client, "return document.getElementById('status').textContent").await.as_str().unwrap_or_default().to_owned()
}

/// The URL the page's latest `EventSource` was opened with (`streamUrl`, a
/// top-level binding of the page's script).
async fn event_source_url(client: &Client) -> String {
    let url = js(client, "return typeof streamUrl === 'string' ? streamUrl : ''").await;
    url.as_str().unwrap_or_default().to_owned()
}

async fn wait_for(client: &Client, what: &str, mut check: impl FnMut(String, String) -> bool) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let (a, s) = (answer(client).await, status(client).await);
        if check(a.clone(), s.clone()) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}; status {s:?}, answer {a:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn send(client: &Client, prompt: &str, generator: &str, pace: u32) {
    let p = client.find(Locator::Id("prompt")).await.unwrap();
    p.clear().await.unwrap();
    p.send_keys(prompt).await.unwrap();
    client.find(Locator::Id("generator")).await.unwrap().select_by_value(generator).await.unwrap();
    let pace_field = client.find(Locator::Id("pace")).await.unwrap();
    pace_field.clear().await.unwrap();
    pace_field.send_keys(&pace.to_string()).await.unwrap();
    client.find(Locator::Id("send")).await.unwrap().click().await.unwrap();
}

#[tokio::test]
async fn the_demo_page_streams_resumes_and_stops_in_chromium() {
    let mut settings = base_settings();
    settings.detach_grace = Some("20s".into());
    // EventSource waits this long before reconnecting.
    settings.retry = Some("200ms".into());
    let app = spawn_app_with(settings).await;
    let proxy = CuttableProxy::start(app.addr).await;
    let mut browser = browser().await;
    let client = browser.client.take().unwrap();
    let token = app.token("browser", "stream");
    client.goto(&format!("http://127.0.0.1:{}/#token={token}", proxy.port)).await.unwrap();
    // The token field is prefilled from the fragment, and the generator
    // picker is filled from /v1/models.
    let prefilled = js(&client, "return document.getElementById('token').value").await;
    assert_eq!(prefilled.as_str(), Some(token.as_str()));
    let deadline = tokio::time::Instant::now() + LIMIT;
    while js(&client, "return [...document.getElementById('generator').options].map(o => o.value).join(',')")
        .await
        .as_str()
        != Some("choppy,demo,echo,firehose,probe")
    {
        assert!(tokio::time::Instant::now() < deadline, "the generator picker was not filled from /v1/models");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 1. A prompt, the exact text, character by character.
    let emoji = std::fs::read_to_string("prompts/emoji.txt").unwrap();
    send(&client, "emoji", "demo", 2).await;
    wait_for(&client, "the emoji text", |a, s| s == "done" && a == emoji).await;
    // The EventSource URL carries a stream ticket, never the token.
    let first_url = event_source_url(&client).await;
    assert!(first_url.contains("ticket=") && !first_url.contains("access_token"), "{first_url}");
    assert!(!first_url.contains(&token), "{first_url}");

    // 2. The connection is cut mid-stream; EventSource reconnects with
    //    Last-Event-ID and the page ends with the exact text, no repeats.
    let chinese = std::fs::read_to_string("prompts/chinese.txt").unwrap();
    send(&client, "chinese", "demo", 25).await;
    wait_for(&client, "some text", |a, _| a.chars().count() >= 20).await;
    let before = proxy.accepted();
    proxy.cut();
    wait_for(&client, "more text after the cut", |a, _| a.chars().count() >= 60).await;
    assert!(proxy.accepted() > before, "the page reconnected");
    let second_url = event_source_url(&client).await;
    assert_ne!(second_url, first_url, "a new answer gets a fresh ticket");
    let before = proxy.accepted();
    proxy.cut();
    wait_for(&client, "the whole Chinese text", |a, s| s == "done" && a == chinese).await;
    assert!(proxy.accepted() > before, "the page reconnected again");
    assert_eq!(event_source_url(&client).await, second_url, "the reconnects reused the URL and its ticket");
    assert_eq!(app.state.store.local_streams(), 2, "the cuts resumed one stream; they did not start new ones");

    // 3. Stop ends the stream on the server (DELETE), and the text stops.
    send(&client, "english", "demo", 40).await;
    wait_for(&client, "some English", |a, _| a.chars().count() >= 10).await;
    client.find(Locator::Id("stop")).await.unwrap().click().await.unwrap();
    wait_for(&client, "stopped", |_, s| s == "stopped").await;
    eventually(LIMIT, "the stream was cancelled on the server", || app.state.slots.open() == 0).await;
    let stopped_at = answer(&client).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(answer(&client).await, stopped_at, "text kept arriving after Stop");
    assert!(stopped_at.chars().count() < 400);
    let cancelled = app.metric("tokengate_streams_total{outcome=\"cancelled\"}").await;
    assert_eq!(cancelled, 1.0, "Stop sent DELETE");

    std::fs::create_dir_all("tests/artifacts").unwrap();
    let png = client.screenshot().await.unwrap();
    std::fs::write("tests/artifacts/demo-page.png", png).unwrap();
    client.close().await.unwrap();
}
