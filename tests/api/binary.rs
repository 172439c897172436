//! The real `tokengate` binary: the no-config start, config errors and
//! precedence, the `token` subcommand, SIGTERM, and tokens kept out of logs.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use jsonwebtoken::{DecodingKey, Validation};
use serde_json::Value;

use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_tokengate");

/// A command with no TOKENGATE_* variables inherited.
fn cmd() -> Command {
    let mut c = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("TOKENGATE_") {
            c.env_remove(k);
        }
    }
    c.env_remove("RUST_LOG");
    c
}

fn run_fail(args: &[&str], envs: &[(&str, &str)]) -> String {
    let out = cmd().args(args).envs(envs.iter().copied()).stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "args {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn invalid_configuration_names_the_setting_and_exits_non_zero() {
    let dir = tempdir();
    let bad_toml = dir.join("bad.toml");
    std::fs::write(&bad_toml, "listen = \"127.0.0.1:0\"\nlisen = 1\n").unwrap();
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (vec!["--listen", "nowhere:99999"], vec![], "listen"),
        (vec![], vec![("TOKENGATE_LISTEN", "300.1.1.1:80")], "listen"),
        (vec!["--jwt-secret", "too-short"], vec![], "jwt_secret"),
        (vec!["--jwt-public-key-file", "/nonexistent/key.pem"], vec![], "jwt_public_key_file"),
        (vec!["--jwt-public-key-file", "Cargo.toml"], vec![], "jwt_public_key_file"),
        (vec!["--jwt-secret", SECRET, "--jwt-algorithms", "HS999"], vec![], "jwt_algorithms"),
        (vec!["--jwt-secret", SECRET, "--jwt-algorithms", "RS256"], vec![], "jwt_algorithms"),
        (vec!["--heartbeat", "soon"], vec![], "heartbeat"),
        (vec!["--config", bad_toml.to_str().unwrap()], vec![], "config"),
        (vec!["--config", "/nonexistent.toml"], vec![], "config"),
        (vec!["--default-generator", "gpt"], vec![], "default_generator"),
        (vec!["--generator-pace", "echo"], vec![], "generator_pace"),
    ];
    for (args, envs, setting) in cases {
        let err = run_fail(&args, &envs);
        assert!(err.contains(&format!("`{setting}`")), "{args:?} should name `{setting}`: {err}");
    }
}

fn tempdir() -> std::path::PathBuf {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).unwrap();
    let dir = std::env::temp_dir().join(format!("tokengate-test-{}", hex::encode(bytes)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn decode(token: &str, secret: &str) -> Option<Value> {
    let mut v = Validation::new(jsonwebtoken::Algorithm::HS256);
    v.validate_aud = false;
    jsonwebtoken::decode::<Value>(token, &DecodingKey::from_secret(secret.as_bytes()), &v).ok().map(|d| d.claims)
}

fn mint(args: &[&str], envs: &[(&str, &str)]) -> String {
    let out = cmd().args(args).envs(envs.iter().copied()).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn token_subcommand_signs_with_the_configured_key() {
    let token =
        mint(&["token", "--sub", "alice", "--scope", "stream publish", "--ttl", "1h", "--jwt-secret", SECRET], &[]);
    let claims = decode(&token, SECRET).expect("verifies with the secret");
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["scope"], "stream publish");
    let exp = claims["exp"].as_u64().unwrap();
    assert!((now() + 3590..=now() + 3610).contains(&exp), "exp {exp}");
    // With no key there is nothing sensible to sign with.
    let err = run_fail(&["token", "--sub", "alice"], &[]);
    assert!(err.contains("no key configured"), "{err}");
}

#[test]
fn flags_beat_env_beat_file() {
    let dir = tempdir();
    let file = dir.join("tokengate.toml");
    let (f, e, c) = (
        "file-secret-0123456789-0123456789-abc",
        "env-secret-0123456789-0123456789-abcd",
        "flag-secret-0123456789-0123456789-abc",
    );
    std::fs::write(&file, format!("jwt_secret = \"{f}\"\npace_ms = 5\n")).unwrap();
    let cfg = file.to_str().unwrap();
    let only_file = mint(&["--config", cfg, "token", "--sub", "a"], &[]);
    assert!(decode(&only_file, f).is_some());
    let env_too = mint(&["--config", cfg, "token", "--sub", "a"], &[("TOKENGATE_JWT_SECRET", e)]);
    assert!(decode(&env_too, e).is_some());
    let all = mint(&["--config", cfg, "token", "--sub", "a", "--jwt-secret", c], &[("TOKENGATE_JWT_SECRET", e)]);
    assert!(decode(&all, c).is_some());
    // The config file may also come from the environment.
    let via_env = mint(&["token", "--sub", "a"], &[("TOKENGATE_CONFIG", cfg)]);
    assert!(decode(&via_env, f).is_some());
}

#[test]
fn a_sectioned_file_is_read_and_flags_beat_env_beat_it() {
    let dir = tempdir();
    let file = dir.join("tokengate.toml");
    let (f, e, c) = (
        "file-secret-0123456789-0123456789-abc",
        "env-secret-0123456789-0123456789-abcd",
        "flag-secret-0123456789-0123456789-abc",
    );
    // `max_streams = 0` is refused: a start that succeeds shows the file's
    // value was overridden, one that fails shows it was read.
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[auth]\njwt_secret = \"{f}\"\n[limits]\nmax_streams = 0\n[stream]\npace_ms = 5\n[store]\nstream_ttl = \"1m\"\n"
    );
    std::fs::write(&file, text).unwrap();
    let cfg = file.to_str().unwrap();
    let err = run_fail(&["--config", cfg, "token", "--sub", "a"], &[]);
    assert!(err.contains("`max_streams`") && err.contains("at least 1"), "{err}");
    let from_file = mint(&["--config", cfg, "token", "--sub", "a", "--max-streams", "5"], &[]);
    assert!(decode(&from_file, f).is_some());
    let env = [("TOKENGATE_JWT_SECRET", e), ("TOKENGATE_MAX_STREAMS", "5")];
    let env_too = mint(&["--config", cfg, "token", "--sub", "a"], &env);
    assert!(decode(&env_too, e).is_some());
    let env = [("TOKENGATE_JWT_SECRET", e), ("TOKENGATE_MAX_STREAMS", "0")];
    let all = mint(&["--config", cfg, "token", "--sub", "a", "--jwt-secret", c, "--max-streams", "5"], &env);
    assert!(decode(&all, c).is_some());
}

#[test]
fn file_keys_in_the_wrong_section_or_given_twice_are_refused() {
    let dir = tempdir();
    for (name, text, wanted) in [
        ("wrong.toml", "[auth]\nmax_streams = 10\n", "`max_streams` belongs in [limits]"),
        ("unknown.toml", "[limits]\nmax_strems = 10\n", "unknown field `max_strems`"),
        ("twice.toml", "pace_ms = 1\n[stream]\npace_ms = 2\n", "`pace_ms` is set both"),
    ] {
        let file = dir.join(name);
        std::fs::write(&file, text).unwrap();
        let err = run_fail(&["--config", file.to_str().unwrap(), "token", "--sub", "a"], &[]);
        assert!(err.contains("`config`") && err.contains(wanted), "{name}: {err}");
    }
}

#[test]
fn an_out_of_range_pace_is_refused_naming_the_flag() {
    for (args, envs) in [
        (vec!["--pace-ms", "5000000000"], vec![]),
        (vec![], vec![("TOKENGATE_PACE_MS", "5000000000")]),
        (vec!["--pace-max-ms=-1"], vec![]),
    ] {
        let err = run_fail(&args, &envs);
        assert!(err.contains("--pace-"), "{args:?} {envs:?}: {err}");
    }
}

#[test]
fn help_shows_each_flags_default() {
    let out = cmd().arg("--help").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8(out.stdout).unwrap();
    // Each flag's help, up to the next flag.
    let flag_help = |flag: &str| -> String {
        let start = help.find(&format!("--{flag} ")).unwrap_or_else(|| panic!("--{flag} missing: {help}"));
        let rest = &help[start + flag.len() + 3..];
        rest[..rest.find("\n      --").unwrap_or(rest.len())].to_owned()
    };
    for (flag, default) in [
        ("listen", "127.0.0.1:8080"),
        ("listen-backlog", "4096"),
        ("heartbeat", "15s"),
        ("pace-ms", "20"),
        ("max-streams", "10000"),
        ("max-stream-duration", "30m"),
        ("token-cookie", "tokengate_token"),
        ("log-format", "text"),
    ] {
        let text = flag_help(flag);
        assert!(text.contains(&format!("[default: {default}]")), "--{flag}: {text}");
    }
    // Settings without one fixed default show none. (That a shown default
    // is not a clap default, which would override env and file, is what
    // the precedence tests above check.)
    assert!(!flag_help("jwt-secret").contains("[default:"));
    let sub = cmd().args(["token", "--help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&sub.stdout).contains("[default: 127.0.0.1:8080]"));
}

/// A running binary; killed on drop.
pub struct Server {
    pub child: Child,
    pub stdout: Vec<String>,
    pub base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary on port 0 and reads its banner up to `last_line`.
pub fn start(args: &[&str], envs: &[(&str, &str)], last_line: &str) -> Server {
    let mut child = cmd()
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    loop {
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| panic!("banner incomplete: {lines:?}"));
        let done = line.contains(last_line);
        lines.push(line);
        if done {
            break;
        }
    }
    let base = lines[0].strip_prefix("tokengate listening on ").unwrap_or_else(|| panic!("{lines:?}")).to_owned();
    Server { child, stdout: lines, base }
}

fn sigterm(server: &mut Server) -> std::process::ExitStatus {
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    for _ in 0..200 {
        if let Some(status) = server.child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no exit within 10 s of SIGTERM");
}

#[tokio::test]
async fn no_config_start_prints_a_working_demo_token_and_curl_command() {
    let mut server = start(&[], &[], "or open");
    let banner = server.stdout.join("\n");
    let curl = server
        .stdout
        .iter()
        .find(|l| l.trim_start().starts_with("curl "))
        .unwrap_or_else(|| panic!("{banner}"))
        .trim()
        .to_owned();
    let token = curl.split("Bearer ").nth(1).unwrap().split('"').next().unwrap().to_owned();
    let url = curl.rsplit('"').nth(1).unwrap().to_owned();
    assert!(url.starts_with(&server.base), "{url}");
    assert!(banner.contains(&format!("{}/#token={token}", server.base)), "{banner}");
    // The demo token: sub demo, scope "stream publish", 24 h.
    let claims: Value = jsonwebtoken::dangerous::insecure_decode::<Value>(&token).unwrap().claims;
    assert_eq!(claims["sub"], "demo");
    assert_eq!(claims["scope"], "stream publish");
    let ttl = claims["exp"].as_u64().unwrap() - now();
    assert!((86_300..=86_400).contains(&ttl), "{ttl}");
    // Doing what the banner says streams text.
    let resp = reqwest::Client::new().get(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let events = read_events(resp, Duration::from_secs(60)).await;
    assert!(delta_text(&events).chars().count() > 20);
    assert_eq!(messages(&events)[0].1["generator"], "demo");
    assert_eq!(messages(&events).pop().unwrap().0, "done");
    // The demo page is there.
    let page = reqwest::get(format!("{}/", server.base)).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("EventSource"));
    assert_eq!(sigterm(&mut server).code(), Some(0));
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero_and_logs_never_show_tokens() {
    let mut server =
        start(&["--jwt-secret", SECRET, "--shutdown-grace", "300ms"], &[("RUST_LOG", "debug")], "listening on");
    // With a configured key no token is printed at all.
    assert!(!server.stdout.join("\n").contains("eyJ"));
    let client = reqwest::Client::new();
    let token = |sub: &str| hs256(serde_json::json!({"sub": sub, "exp": now() + 600, "scope": "stream"}));
    let (t_query, t_cookie, t_bearer, t_bad) = (token("q"), token("c"), token("b"), format!("{}x", token("bad")));
    let t_key = token("k");
    let url = format!("{}/v1/stream?generator=echo&prompt=hi", server.base);
    let r = client.get(format!("{url}&access_token={t_query}")).send().await.unwrap();
    assert_eq!(delta_text(&read_events(r, Duration::from_secs(10)).await), "hi");
    let r = client.get(&url).header("cookie", format!("tokengate_token={t_cookie}")).send().await.unwrap();
    assert_eq!(delta_text(&read_events(r, Duration::from_secs(10)).await), "hi");
    let r = client.get(&url).bearer_auth(&t_bearer).send().await.unwrap();
    assert_eq!(delta_text(&read_events(r, Duration::from_secs(10)).await), "hi");
    let r = client.get(format!("{url}&access_token={t_bad}")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // The Anthropic route's `x-api-key`.
    let r = client
        .post(format!("{}/v1/messages", server.base))
        .header("x-api-key", &t_key)
        .json(&serde_json::json!({"model": "echo", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A stream that is open when SIGTERM arrives gets `shutdown`.
    let open = client
        .get(format!("{}/v1/stream?generator=echo&pace_ms=1000&prompt=long-text", server.base))
        .bearer_auth(&t_bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(open.status(), 200);
    let status = sigterm(&mut server);
    assert_eq!(status.code(), Some(0));
    let events = read_events(open, Duration::from_secs(10)).await;
    assert_eq!(messages(&events).pop().unwrap().0, "shutdown");

    let mut logs = String::new();
    std::io::Read::read_to_string(&mut server.child.stderr.take().unwrap(), &mut logs).unwrap();
    assert!(
        logs.contains("access_token=%5Bredacted%5D") || logs.contains("access_token=[redacted]"),
        "query logged redacted: {logs}"
    );
    assert!(logs.contains("/v1/stream"), "requests are logged: {logs}");
    // Text logs to a pipe or file carry no terminal colour codes.
    assert!(!logs.contains('\x1b'), "ANSI escapes in logs written to a pipe: {logs}");
    for (name, t) in [
        ("query", &t_query),
        ("cookie", &t_cookie),
        ("bearer", &t_bearer),
        ("bad", &t_bad),
        ("x-api-key", &t_key),
        ("secret", &SECRET.to_owned()),
    ] {
        assert!(!logs.contains(t.as_str()), "{name} token leaked into logs");
        // Not even the signature part alone.
        let sig = t.rsplit('.').next().unwrap();
        assert!(!logs.contains(sig), "{name} signature leaked into logs");
    }
}

#[tokio::test]
async fn json_logs_have_request_ids_and_one_line_per_stream_end_without_tokens() {
    let mut server = start(&["--jwt-secret", SECRET, "--log-format", "json"], &[], "listening on");
    let token = hs256(serde_json::json!({"sub": "logger", "exp": now() + 600, "scope": "stream"}));
    let client = reqwest::Client::new();
    let resp = client
        .get(format!("{}/v1/stream?generator=echo&prompt=hey&access_token={token}", server.base))
        .header("x-request-id", "req-abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(delta_text(&read_events(resp, Duration::from_secs(10)).await), "hey");
    // A request that opens no stream has a line of its own.
    let refused = client
        .get(format!("{}/v1/stream?generator=echo&prompt=hey", server.base))
        .header("x-request-id", "req-no-token")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sigterm(&mut server).code(), Some(0));
    let mut logs = String::new();
    std::io::Read::read_to_string(&mut server.child.stderr.take().unwrap(), &mut logs).unwrap();
    let lines: Vec<Value> =
        logs.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    let ended: Vec<&Value> = lines.iter().filter(|l| l["fields"]["message"] == "stream ended").collect();
    assert_eq!(ended.len(), 1, "{logs}");
    let fields = &ended[0]["fields"];
    assert_eq!(fields["outcome"], "done");
    assert_eq!(fields["subject"], "logger");
    assert_eq!(fields["generator"], "echo");
    assert_eq!(ended[0]["span"]["request_id"], "req-abc-123", "{logs}");
    assert_eq!(ended[0]["span"]["path"], "/v1/stream", "{logs}");
    assert!(ended[0]["fields"]["duration_ms"].is_u64(), "{logs}");
    // One line per request: the stream's line is the request's.
    let of = |id: &str| -> Vec<&Value> { lines.iter().filter(|l| l["span"]["request_id"] == id).collect() };
    assert_eq!(of("req-abc-123").len(), 1, "one line per request: {logs}");
    // (A refusal also has its `refused` line, with the code.)
    let finished: Vec<&Value> =
        of("req-no-token").into_iter().filter(|l| l["fields"]["message"] == "finished processing request").collect();
    assert_eq!(finished.len(), 1, "one line per request: {logs}");
    assert_eq!(finished[0]["fields"]["status"], 401, "{logs}");
    assert!(finished[0]["fields"]["latency"].as_str().is_some_and(|l| l.ends_with(" ms")), "{logs}");
    assert_eq!(finished[0]["span"]["path"], "/v1/stream", "{logs}");
    assert!(!logs.contains(&token), "token leaked into logs");
}

#[tokio::test]
async fn a_stalled_log_reader_does_not_stall_the_streams() {
    // Nobody reads the server's stderr here: the pipe (64 KiB) fills after
    // a few hundred debug lines. Log lines are written by a thread of their
    // own, so the streams go on regardless.
    let server = start(
        &["--jwt-secret", SECRET, "--rate-subject-per-min", "0", "--rate-ip-per-min", "0"],
        &[("RUST_LOG", "debug")],
        "listening on",
    );
    let client = reqwest::Client::new();
    let token = hs256(serde_json::json!({"sub": "quiet", "exp": now() + 600, "scope": "stream"}));
    let padding = "x".repeat(500);
    for i in 0..300 {
        // Long query strings make long log lines: ~300 KiB of logs in all.
        let url = format!("{}/v1/stream?generator=echo&pace_ms=0&prompt=hi{i}&pad={padding}", server.base);
        let response = tokio::time::timeout(Duration::from_secs(5), client.get(&url).bearer_auth(&token).send()).await;
        let response = response.unwrap_or_else(|_| panic!("stream {i} did not start: the server stalled")).unwrap();
        assert_eq!(response.status(), 200, "stream {i}");
        let events = read_events(response, Duration::from_secs(5)).await;
        assert_eq!(delta_text(&events), format!("hi{i}"), "stream {i}");
    }
}

#[tokio::test]
async fn a_flood_of_connections_that_never_send_a_head_is_counted_each_but_logged_once() {
    let mut server =
        start(&["--jwt-secret", SECRET, "--log-format", "json", "--header-timeout", "300ms"], &[], "listening on");
    let addr: std::net::SocketAddr = server.base.strip_prefix("http://").unwrap().parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let series = "tokengate_refusals_total{reason=\"header_timeout\"}";
    let mut counted = 0.0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let text = reqwest::get(format!("{}/metrics", server.base)).await.unwrap().text().await.unwrap();
        counted = text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0.0);
        if counted >= 40.0 {
            break;
        }
    }
    assert_eq!(counted, 40.0, "every refusal is counted");
    drop(held);
    assert_eq!(sigterm(&mut server).code(), Some(0));
    let mut logs = String::new();
    std::io::Read::read_to_string(&mut server.child.stderr.take().unwrap(), &mut logs).unwrap();
    let refused: Vec<Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["fields"]["message"] == "request headers not received in time; connection closed")
        .collect();
    // All 40 fall inside one 10 s throttle window: one line, for the first.
    assert_eq!(refused.len(), 1, "{logs}");
    assert_eq!(refused[0]["fields"]["suppressed"], 0, "{logs}");
}
