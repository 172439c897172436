//! The load generator. Every mode prints one JSON object on stdout (the
//! run's figures, plus the `--tag key=value` pairs it was given) and a short
//! human summary on stderr.

pub mod abuse;
mod fanout;
mod idle;
mod llm;
mod opens;
mod stream;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use tokio::sync::watch;

use crate::Result;
use crate::client::{Target, mint};
use crate::procfs::{self, Snapshot};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, clap::Subcommand)]
enum Mode {
    /// N concurrent streams run to completion; text verified; chars/s,
    /// time to first delta, inter-delta gaps.
    Stream(stream::StreamArgs),
    /// Same as `stream`, for scenario 5: point it at tokengate with
    /// `--generator openai` or at the mock upstream with `--target openai`.
    Proxy(stream::StreamArgs),
    /// Hold N open streams; server RSS per stream; heartbeats while idle.
    Idle(idle::IdleArgs),
    /// N channel subscribers, M publishes; publish-to-receive latency.
    Fanout(fanout::FanoutArgs),
    /// Many short streams per second across many subjects (open-loop).
    Opens(opens::OpensArgs),
    /// LLM-shaped load: N streams of paced upstream tokens through
    /// tokengate or the naive proxy; CPU per token, RSS per stream.
    Llm(llm::LlmArgs),
    /// Slow loris: thousands of connections that never send a request
    /// head, while a normal client keeps opening streams.
    Loris(abuse::loris::LorisArgs),
    /// Request heads and bodies sent one byte at a time, or stalled.
    Slowbody(abuse::slowbody::SlowBodyArgs),
    /// Streams of a large echo prompt whose client never reads.
    Stalled(abuse::stalled::StalledArgs),
}

/// Options every mode shares.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// Server address (loopback).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// What the server is (decides paths and wire format).
    #[arg(long, value_enum, default_value = "tokengate")]
    pub target: Target,
    /// HS256 secret to mint per-connection tokens with (tokengate's
    /// `--jwt-secret`). Tokens are sent to every target when given, so the
    /// requests are byte for byte alike; the reference ignores them.
    #[arg(long, env = "BENCH_JWT_SECRET", default_value = "", hide_env_values = true)]
    pub jwt_secret: String,
    /// PID of the server, for CPU seconds and RSS from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Load generator worker threads (1 = current-thread runtime, leaving
    /// the other core to the server on a 2-core machine).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// `key=value` copied into the JSON report (scenario, server, run...).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Connection attempts in flight at once while ramping up.
    #[arg(long, default_value_t = 128)]
    pub connect_concurrency: usize,
    /// Upper bound on the measured phase, in seconds.
    #[arg(long, default_value_t = 120)]
    pub max_secs: u64,
}

impl Common {
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// One token per index `0..n` (subject `bench-<i>`), or none without a
    /// secret.
    pub fn tokens(&self, n: usize) -> Result<Arc<Vec<String>>> {
        if self.jwt_secret.is_empty() {
            if self.target == Target::Tokengate {
                return Err("--jwt-secret is needed to talk to tokengate".into());
            }
            return Ok(Arc::new(Vec::new()));
        }
        let tokens = (0..n).map(|i| mint(&self.jwt_secret, &format!("bench-{i}"))).collect::<Result<Vec<_>>>()?;
        Ok(Arc::new(tokens))
    }

    fn tags(&self) -> Map<String, Value> {
        self.tags
            .iter()
            .map(|t| match t.split_once('=') {
                Some((k, v)) => (k.to_owned(), Value::String(v.to_owned())),
                None => (t.clone(), Value::Bool(true)),
            })
            .collect()
    }
}

pub fn main(args: Args) -> Result<()> {
    let (soft, hard) = crate::raise_nofile();
    let common = match &args.mode {
        Mode::Stream(a) | Mode::Proxy(a) => a.common.clone(),
        Mode::Idle(a) => a.common.clone(),
        Mode::Fanout(a) => a.common.clone(),
        Mode::Opens(a) => a.common.clone(),
        Mode::Llm(a) => a.common.clone(),
        Mode::Loris(a) => a.common.clone(),
        Mode::Slowbody(a) => a.common.clone(),
        Mode::Stalled(a) => a.common.clone(),
    };
    let runtime = if common.threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(common.threads).enable_all().build()?
    };
    let mut report = runtime.block_on(async move {
        match args.mode {
            Mode::Stream(a) => stream::run("stream", a).await,
            Mode::Proxy(a) => stream::run("proxy", a).await,
            Mode::Idle(a) => idle::run(a, soft).await,
            Mode::Fanout(a) => fanout::run(a).await,
            Mode::Opens(a) => opens::run(a).await,
            Mode::Llm(a) => llm::run(a).await,
            Mode::Loris(a) => abuse::loris::run(a, soft).await,
            Mode::Slowbody(a) => abuse::slowbody::run(a).await,
            Mode::Stalled(a) => abuse::stalled::run(a).await,
        }
    })?;
    if let Value::Object(map) = &mut report {
        map.insert("tags".into(), Value::Object(common.tags()));
        map.insert("target".into(), json!(common.target));
        map.insert("addr".into(), json!(common.addr.to_string()));
        map.insert("nofile".into(), json!({ "soft": soft, "hard": hard }));
        map.insert("loadgen_threads".into(), json!(common.threads));
    }
    // The one line of machine-readable output.
    println!("{report}");
    Ok(())
}

/// Error counts by kind.
pub type Errors = BTreeMap<String, u64>;

pub fn count(errors: &mut Errors, kind: impl Into<String>) {
    *errors.entry(kind.into()).or_default() += 1;
}

pub fn merge(into: &mut Errors, from: Errors) {
    for (k, v) in from {
        *into.entry(k).or_default() += v;
    }
}

/// Samples the server's RSS every `every` until stopped; returns the peak.
pub fn rss_sampler(pid: Option<u32>, every: Duration) -> (watch::Sender<bool>, tokio::task::JoinHandle<Option<u64>>) {
    let (tx, mut rx) = watch::channel(false);
    let handle = tokio::spawn(async move {
        let pid = pid?;
        let mut peak = procfs::rss_kib(pid);
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Some(r) = procfs::rss_kib(pid) {
                        peak = Some(peak.map_or(r, |p| p.max(r)));
                    }
                }
                _ = rx.changed() => return peak,
            }
        }
    });
    (tx, handle)
}

/// Server CPU/RSS and load generator CPU between two snapshots.
pub fn resources(before: &Snapshot, after: &Snapshot, peak_rss: Option<u64>) -> Value {
    let cpu = match (before.server_cpu, after.server_cpu) {
        (Some(a), Some(b)) => Some(round3(b - a)),
        _ => None,
    };
    let self_cpu = match (before.self_cpu, after.self_cpu) {
        (Some(a), Some(b)) => Some(round3(b - a)),
        _ => None,
    };
    // CPU time the rest of the machine used meanwhile (other processes:
    // anything here is noise in the figures).
    let other = match (before.machine, after.machine, cpu, self_cpu) {
        (Some((b0, _)), Some((b1, _)), Some(s), Some(l)) => {
            Some(round3(((b1 - b0) as f64 / procfs::CLK_TCK - s - l).max(0.0)))
        }
        _ => None,
    };
    json!({
        "other_cpu_s": other,
        "server_cpu_s": cpu,
        "server_rss_kib_before": before.server_rss,
        "server_rss_kib_after": after.server_rss,
        "server_rss_kib_peak": peak_rss,
        "loadgen_cpu_s": self_cpu,
        "machine_busy_pct": procfs::busy_pct(before, after).map(round3),
    })
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Seconds since `t0` at `t`, rounded.
pub fn secs(t0: Instant, t: Instant) -> f64 {
    round3(t.saturating_duration_since(t0).as_secs_f64())
}

/// Puts the server's resource figures into `report`, with its CPU per
/// unit of work as `server_cpu_us_per_<unit>` when `count` is not zero.
pub fn extend_resources(report: &mut Value, res: Value, unit: &str, count: u64) {
    if let Some(cpu) = res["server_cpu_s"].as_f64()
        && count > 0
    {
        extend(report, json!({ format!("server_cpu_us_per_{unit}"): round3(cpu * 1e6 / count as f64) }));
    }
    extend(report, res);
}

/// Puts `extra`'s keys into `report`.
pub fn extend(report: &mut Value, extra: Value) {
    if let (Value::Object(r), Value::Object(e)) = (report, extra) {
        r.extend(e);
    }
}
