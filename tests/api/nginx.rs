//! Real nginx with `deploy/nginx.conf` (addresses templated to loopback
//! ports) in front of two replicas sharing a real redis-server: events pass
//! through unbuffered, and a stream resumes across replicas through nginx.
//! A missing nginx fails the test; it never skips.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokengate::sse::{Event, Parser};

use crate::helpers::*;
use crate::redis::RedisServer;

const LIMIT: Duration = Duration::from_secs(20);

struct Nginx {
    child: Child,
    port: u16,
    _dir: std::path::PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // The group: a SIGKILLed master leaves its workers running.
        kill_group(&mut self.child);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn nginx_binary() -> String {
    ["nginx", "/usr/sbin/nginx"]
        .into_iter()
        .find(|b| Command::new(b).arg("-v").output().is_ok_and(|o| o.status.success()))
        .unwrap_or_else(|| {
            panic!("nginx is required: install it (Debian: apt-get install nginx) or run scripts/test.sh, which does")
        })
        .to_owned()
}

fn start_nginx(a: std::net::SocketAddr, b: std::net::SocketAddr) -> Nginx {
    let binary = nginx_binary();
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("tokengate-nginx-{port}"));
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let conf = std::fs::read_to_string("deploy/nginx.conf").unwrap();
    for needle in ["tokengate-a:8080", "tokengate-b:8080", "listen 80;"] {
        assert!(
            conf.contains(needle),
            "deploy/nginx.conf no longer contains `{needle}`: update this test's templating"
        );
    }
    let conf = conf
        .replace("tokengate-a:8080", &a.to_string())
        .replace("tokengate-b:8080", &b.to_string())
        .replace("listen 80;", &format!("listen 127.0.0.1:{port};"))
        .replace("worker_processes auto;", "worker_processes 1;");
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let mut child = Command::new(binary)
        .args(["-p", dir.to_str().unwrap(), "-c", path.to_str().unwrap()])
        .args(["-g", &format!("daemon off; pid {}/nginx.pid; error_log {}/error.log;", dir.display(), dir.display())])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Nginx { child, port, _dir: dir };
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    kill_group(&mut child);
    panic!("nginx did not start: {}", std::fs::read_to_string(dir.join("error.log")).unwrap_or_default());
}

async fn two_replicas_behind_nginx() -> (RedisServer, TestApp, TestApp, Nginx) {
    let redis = RedisServer::start();
    let mut settings = base_settings();
    settings.redis_url = Some(redis.url());
    settings.detach_grace = Some("10s".into());
    settings.trusted_proxies = Some(vec!["127.0.0.1".into()]);
    let a = spawn_app_with(settings.clone()).await;
    let b = spawn_app_with(settings).await;
    for app in [&a, &b] {
        for _ in 0..200 {
            if app.get("/readyz", None).await.status() == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    let nginx = start_nginx(a.addr, b.addr);
    (redis, a, b, nginx)
}

#[tokio::test]
async fn deltas_pass_through_nginx_as_they_are_produced() {
    let (_redis, a, _b, nginx) = two_replicas_behind_nginx().await;
    let url =
        format!("http://127.0.0.1:{}/v1/stream?generator=echo&pace_ms=100&prompt=abcdefghijklmnopqrst", nginx.port);
    let started = Instant::now();
    let resp = a.client.get(&url).bearer_auth(a.token("alice", "stream")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream; charset=utf-8");
    let mut body = resp.bytes_stream();
    let mut parser = Parser::new();
    let (mut first_delta, mut done) = (None, None);
    let mut text = String::new();
    while done.is_none() {
        let chunk = tokio::time::timeout(LIMIT, body.next()).await.expect("bounded").expect("open").unwrap();
        for e in parser.feed(&chunk) {
            if let Event::Message { event, data, .. } = e {
                match event.as_str() {
                    "delta" => {
                        first_delta.get_or_insert_with(|| started.elapsed());
                        text.push_str(
                            serde_json::from_str::<serde_json::Value>(&data).unwrap()["text"].as_str().unwrap(),
                        );
                    }
                    "done" => done = Some(started.elapsed()),
                    _ => {}
                }
            }
        }
    }
    assert_eq!(text, "abcdefghijklmnopqrst");
    let (first, done) = (first_delta.unwrap(), done.unwrap());
    // 20 deltas 100 ms apart: a buffering proxy would deliver them all at
    // the end; through this config the first arrives about 2 s earlier.
    assert!(done - first >= Duration::from_millis(1500), "first delta at {first:?}, done at {done:?}");
    // Stopping it stops its workers too (a killed master alone left them
    // running, orphaned).
    let workers = descendants(nginx.child.id());
    assert!(!workers.is_empty(), "nginx has no worker?");
    drop(nginx);
    for _ in 0..200 {
        if !workers.iter().any(|&pid| alive(pid)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nginx workers {workers:?} outlived their master");
}

#[tokio::test]
async fn a_stream_resumes_across_replicas_through_nginx() {
    let (_redis, a, b, nginx) = two_replicas_behind_nginx().await;
    let text = std::fs::read_to_string("prompts/mixed.txt").unwrap();
    let url = format!("http://127.0.0.1:{}/v1/stream", nginx.port);
    let token = a.token("alice", "stream");
    // Fresh connections each time (no pooling), so nginx alternates replicas.
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let resp = client
        .post(&url)
        .bearer_auth(&token)
        .json(&serde_json::json!({"generator": "echo", "prompt": text, "pace_ms": 5}))
        .send()
        .await
        .unwrap();
    let mut got = String::new();
    let mut parser = Parser::new();
    let mut body = resp.bytes_stream();
    let mut reconnects = 0;
    loop {
        let mut seen = 0;
        let mut finished = false;
        while seen < 15 && !finished {
            let chunk = tokio::time::timeout(LIMIT, body.next()).await.expect("bounded").expect("open").unwrap();
            for e in parser.feed(&chunk) {
                if let Event::Message { event, data, .. } = e {
                    match event.as_str() {
                        "delta" => {
                            got.push_str(
                                serde_json::from_str::<serde_json::Value>(&data).unwrap()["text"].as_str().unwrap(),
                            );
                            seen += 1;
                        }
                        "done" => finished = true,
                        "error" => panic!("{data}"),
                        _ => {}
                    }
                }
            }
        }
        if finished {
            break;
        }
        drop(body);
        reconnects += 1;
        assert!(reconnects < 100, "bounded");
        let last = parser.last_event_id().unwrap().to_owned();
        let resp = client.get(&url).bearer_auth(&token).header("last-event-id", last).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        body = resp.bytes_stream();
    }
    assert_eq!(got, text);
    assert!(reconnects >= 3);
    // One replica generated; the other served resumes from Redis.
    let (producer, other) = if a.state.store.local_streams() == 1 { (&a, &b) } else { (&b, &a) };
    assert_eq!(producer.state.store.local_streams(), 1);
    assert_eq!(other.state.store.local_streams(), 0);
    assert!(other.metric("tokengate_deltas_sent_total").await > 0.0, "the other replica served part of the stream");
}
