//! `tokengate-bench soak`: the chaos soak. Two tokengate replicas share a
//! real redis-server on loopback; many clients stream hostile text through
//! `echo`, cut their connections at random byte offsets and resume on the
//! other replica, while replicas are SIGKILLed and drained and Redis is
//! restarted. Every stream must end with its exact text, or with a
//! documented error after a contiguous prefix where the chaos explains it.
//!
//! # Layout
//! - `setup`, `procs`: the cluster (Redis + two replicas) and its processes.
//! - `client`, `wire`, `text`: what a client does, raw HTTP/1.1, the prompts.
//! - `chaos`: the failure schedule of the first round.
//! - `verify`, `summary`: the verdict per stream, the tallies, the line.
//! - `checks`: after each round: gauges, slots, RSS, logs.
//! - `shared`, `rng`: state shared by the tasks; the seeded PRNG.
//!
//! # Rounds
//! 1. The chaos round: clients run until `--disconnects` forced disconnects
//!    or `--duration` (whichever first), with the chaos schedule spread over
//!    it. Then: gauges at 0, every slot free.
//! 2. Two identical quiet rounds (same seeds, a fixed number of streams per
//!    client, cuts, resumes and cancels, but nothing restarted): after each,
//!    the same checks and each replica's RSS; round 3's must be within 10%
//!    of round 2's. Comparing only rounds in which no process restarted is
//!    what makes the comparison sound (a restarted replica starts small).
//!    Their log lines must hold no warning or error at all.

mod chaos;
mod checks;
mod client;
mod procs;
mod rng;
mod setup;
mod shared;
mod summary;
mod text;
mod verify;
mod wire;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rng::Rng;
use setup::{Cluster, Options};
use shared::{Behaviour, Counters, Shared};
use summary::{Tally, growth, list};

use crate::Result;
use crate::procfs;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Longest the chaos round runs, in seconds [default: 600; --short: 40].
    #[arg(long)]
    duration: Option<u64>,
    /// Forced disconnects after which the chaos round stops [default:
    /// 10000; --short: 2000].
    #[arg(long)]
    disconnects: Option<u64>,
    /// Concurrent clients (each its own subject, one stream at a time)
    /// [default: 48; --short: 24].
    #[arg(long)]
    clients: Option<usize>,
    /// Seed of every random choice (texts, cuts, replicas, cancels, chaos).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The tokengate binary to run as both replicas.
    #[arg(long, default_value = "target/release/tokengate")]
    binary: PathBuf,
    /// About a minute in all, for the test command.
    #[arg(long)]
    short: bool,
    /// Streams per client in each of the two quiet rounds [default: 12;
    /// --short: 4].
    #[arg(long)]
    quiet_streams: Option<u64>,
    /// Before each RSS reading, wait until both replicas have forgotten the
    /// round's finished streams (`--stream-ttl` 5 s, swept every 30 s: up
    /// to 36 s per round) [default: on; --short: off, where the reading
    /// includes one round's retained streams, which can only make round 2
    /// look bigger: a pass is still a sound bound].
    #[arg(long)]
    rss_settle: Option<bool>,
    /// The redis-server program.
    #[arg(long, default_value = "redis-server")]
    redis_server: String,
    /// Run Redis with an AOF (`appendfsync always`) instead of no
    /// persistence (what the deploy files use), to see what it changes.
    #[arg(long)]
    redis_persist: bool,
    /// Where logs and Redis files go (emptied first).
    #[arg(long, default_value = "target/soak")]
    out: PathBuf,
}

/// The run's settings, flags and `--short` resolved.
struct Plan {
    duration: Duration,
    disconnects: u64,
    clients: usize,
    quiet_streams: u64,
    rss_settle: bool,
}

impl Plan {
    fn of(a: &Args) -> Self {
        let (d, n, c, q) = if a.short { (40, 2000, 24, 4) } else { (600, 10_000, 48, 12) };
        Plan {
            duration: Duration::from_secs(a.duration.unwrap_or(d)),
            disconnects: a.disconnects.unwrap_or(n),
            clients: a.clients.unwrap_or(c).max(1),
            quiet_streams: a.quiet_streams.unwrap_or(q),
            rss_settle: a.rss_settle.unwrap_or(!a.short),
        }
    }
}

pub fn main(args: Args) -> Result<()> {
    crate::raise_nofile();
    // One thread: the replicas and Redis get the other core(s).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (line, passed) = rt.block_on(run(args))?;
    // The one line of output.
    println!("{line}");
    if passed { Ok(()) } else { Err("soak failed (details on stderr above)".into()) }
}

fn secret(seed: u64) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut r = Rng::new(seed, nanos);
    format!("soak-{:016x}{:016x}{:016x}", r.next_u64(), r.next_u64(), r.next_u64())
}

/// Runs one round of clients: until `stop` is set (limit `None`) or
/// `limit` streams each.
async fn round(
    shared: &Arc<Shared>,
    clients: usize,
    seed: u64,
    salt: u64,
    limit: Option<u64>,
) -> Vec<tokio::task::JoinHandle<Vec<summary::Judged>>> {
    shared.stop.store(false, Ordering::SeqCst);
    (0..clients).map(|i| tokio::spawn(client::run(shared.clone(), i, Rng::new(seed, salt + i as u64), limit))).collect()
}

async fn collect(handles: Vec<tokio::task::JoinHandle<Vec<summary::Judged>>>) -> Tally {
    let mut t = Tally::default();
    for h in handles {
        match h.await {
            Ok(judged) => judged.into_iter().for_each(|j| t.add(j)),
            Err(e) => {
                t.unexpected += 1;
                t.failures.push(format!("client task failed: {e}"));
            }
        }
    }
    t
}

/// After a round: the gauges back to 0, every slot free (and the cap
/// holding), the gauges at 0 again. Problems go to `fails`.
async fn settle(shared: &Shared, name: &str, fails: &mut Vec<String>) -> [u64; 2] {
    let mut last = [u64::MAX; 2];
    for phase in ["after the streams", "after the slot check"] {
        match checks::gauges_to_zero(&shared.addrs, Duration::from_secs(20)).await {
            Ok(g) => {
                if g != [0, 0] {
                    fails.push(format!("{name}: open streams {phase} a={} b={}", g[0], g[1]));
                }
                last = g;
            }
            Err(e) => fails.push(format!("{name}: metrics {phase}: {e}")),
        }
        if phase == "after the streams" {
            let problems = checks::slots_free(&shared.addrs, &shared.tokens).await;
            for p in problems.iter().take(5) {
                fails.push(format!("{name}: slots: {p}"));
            }
            if problems.len() > 5 {
                fails.push(format!("{name}: slots: {} more", problems.len() - 5));
            }
        }
    }
    last
}

async fn run(args: Args) -> Result<(String, bool)> {
    let plan = Plan::of(&args);
    if args.out.exists() {
        std::fs::remove_dir_all(&args.out)?;
    }
    let opts = Options {
        binary: args.binary.clone(),
        redis: args.redis_server.clone(),
        persist: args.redis_persist,
        dir: args.out.clone(),
    };
    let secret = secret(args.seed);
    let tokens =
        (0..plan.clients).map(|i| crate::client::mint(&secret, &format!("soak-{i}"))).collect::<Result<Vec<_>>>()?;
    let mut cluster = Cluster::start(&opts, &secret).await?;
    eprintln!(
        "soak: seed {}, {} clients, chaos round up to {} disconnects or {:?}, 2 quiet rounds of {} streams per client; binary {}, redis {} ({}), logs in {}",
        args.seed,
        plan.clients,
        plan.disconnects,
        plan.duration,
        plan.quiet_streams,
        args.binary.display(),
        args.redis_server,
        if args.redis_persist { "AOF, appendfsync always" } else { "no persistence, as deploy/ runs it" },
        args.out.display(),
    );
    let shared = Arc::new(Shared {
        addrs: [cluster.replicas[0].addr, cluster.replicas[1].addr],
        tokens,
        behaviour: Behaviour {
            pieces: (15, 90),
            pace_ms: (2, 5),
            cut_chance: 0.8,
            cut_max_bytes: 4000,
            cancel_chance: 0.04,
            stream_deadline: Duration::from_secs(45),
            stall: Duration::from_secs(5),
        },
        counters: Counters::default(),
        replica_chaos: shared::Epoch::default(),
        redis_chaos: shared::Epoch::default(),
        stop: AtomicBool::new(false),
    });
    let mut fails: Vec<String> = Vec::new();

    // Round 1: chaos.
    let t0 = Instant::now();
    let handles = round(&shared, plan.clients, args.seed, 0, None).await;
    let progress = || {
        let d = shared.counters.disconnects.load(Ordering::Relaxed) as f64 / plan.disconnects.max(1) as f64;
        let t = t0.elapsed().as_secs_f64() / plan.duration.as_secs_f64().max(1.0);
        d.max(t)
    };
    let mut chaos_rng = Rng::new(args.seed, u64::MAX);
    let chaos = chaos::run(&mut cluster, &shared, &mut chaos_rng, progress).await;
    while progress() < 1.0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shared.stop.store(true, Ordering::SeqCst);
    let chaos_tally = collect(handles).await;
    let chaos_secs = t0.elapsed().as_secs_f64();
    let chaos_disconnects = shared.counters.disconnects.load(Ordering::Relaxed);
    eprintln!("soak: chaos round done in {chaos_secs:.1} s: {chaos_disconnects} disconnects, {}", chaos_tally.brief());
    fails.extend(chaos.problems.iter().map(|p| format!("chaos: {p}")));
    if (chaos.kills, chaos.drains, chaos.redis_restarts) != (2, 1, 1) {
        fails.push(format!(
            "chaos: {} kills, {} drains, {} redis restarts of 2, 1, 1",
            chaos.kills, chaos.drains, chaos.redis_restarts
        ));
    }
    // A killed replica's slots come back when its leases lapse.
    tokio::time::sleep(Duration::from_secs(setup::LEASE_TTL_SECS + 1)).await;
    settle(&shared, "chaos round", &mut fails).await;
    // From here on, no warning or error may be logged.
    let quiet_from: Vec<(PathBuf, u64)> = cluster
        .replicas
        .iter()
        .filter_map(|r| r.logs.last().map(|p| (p.clone(), std::fs::metadata(p).map_or(0, |m| m.len()))))
        .collect();

    // Rounds 2 and 3: identical, quiet; RSS after each.
    let mut quiet = Vec::new();
    let mut rss = Vec::new();
    for k in 1..=2u32 {
        let handles = round(&shared, plan.clients, args.seed, 1 << 32, Some(plan.quiet_streams)).await;
        let tally = collect(handles).await;
        let name = format!("quiet round {k}");
        settle(&shared, &name, &mut fails).await;
        if plan.rss_settle {
            let at = cluster.swept_after(Instant::now());
            eprintln!(
                "soak: {name}: waiting {:.1} s for the replicas to forget its streams",
                at.saturating_duration_since(Instant::now()).as_secs_f64()
            );
            tokio::time::sleep_until(at.into()).await;
        } else {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let r: Vec<Option<u64>> = cluster.replicas.iter().map(|r| r.pid().and_then(procfs::rss_kib)).collect();
        eprintln!("soak: {name}: {}; RSS a {:?} KiB, b {:?} KiB", tally.brief(), r[0], r[1]);
        rss.push(r);
        quiet.push(tally);
    }
    let total_disconnects = shared.counters.disconnects.load(Ordering::Relaxed);

    if let Err(e) = cluster.stop().await {
        fails.push(format!("stop: {e}"));
    }
    let files: Vec<checks::LogFile> = cluster
        .replicas
        .iter()
        .flat_map(|r| r.logs.iter())
        .map(|p| checks::LogFile {
            path: p.clone(),
            quiet_from: quiet_from.iter().find(|(q, _)| q == p).map_or(u64::MAX, |(_, off)| *off),
        })
        .collect();
    let logs =
        checks::scan_logs(&files, checks::Causes { drain: chaos.drains > 0, redis: chaos.redis_restarts > 0 }, &secret);

    // RSS: quiet round 2 against quiet round 1, per replica.
    let mut rss_text = String::new();
    for (i, name) in ["a", "b"].iter().enumerate() {
        match (rss[0][i], rss.get(1).and_then(|r| r[i])) {
            (Some(r1), Some(r2)) => {
                let g = growth(r1, r2);
                let _ = write!(rss_text, "{}rss {name} {:+.1}%", if i == 0 { "" } else { ", " }, g);
                if g > 10.0 {
                    fails.push(format!(
                        "rss of replica {name}: {r1} KiB after quiet round 1, {r2} KiB after round 2 ({g:+.1}%)"
                    ));
                }
            }
            _ => fails.push(format!("rss of replica {name}: not readable")),
        }
    }

    let mut all = Tally::default();
    all.merge(chaos_tally);
    let quiet_streams: u64 = quiet.iter().map(|t| t.streams).sum();
    for t in quiet {
        all.merge(t);
    }
    report_details(&shared.counters, &all, &logs, &rss, chaos_secs, chaos_disconnects, quiet_streams);
    if all.failed() {
        fails.push(format!(
            "{} lost, {} duplicated, {} hung, {} unexpected, {} not final",
            all.lost, all.duplicated, all.hung, all.unexpected, all.not_final
        ));
    }
    if !logs.clean() {
        fails.push(format!(
            "logs: {} token leaks, {} panics, {} unexpected warnings/errors",
            logs.leaks.len(),
            logs.panics.len(),
            logs.unexpected.len()
        ));
    }
    for f in &fails {
        eprintln!("soak: FAIL: {f}");
    }
    let c = &shared.counters;
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let line = format!(
        "soak: {total_disconnects} disconnects ({} inside events, {} inside UTF-8), {} replica kills, {} drain, {} redis restart, {} cancels, \
         {} streams: {} ok, {} documented errors ({}), {} lost, {} duplicated, {} hung, {} unexpected, {} ends not final; \
         open streams 0 after every round: {}, slots free: {}, {rss_text}, logs clean: {}; seed {}: {}",
        ld(&c.cut_in_event),
        ld(&c.cut_in_utf8),
        chaos.kills,
        chaos.drains,
        chaos.redis_restarts,
        ld(&c.cancels),
        all.streams,
        all.ok,
        all.documented.values().sum::<u64>(),
        all.documented_list(),
        all.lost,
        all.duplicated,
        all.hung,
        all.unexpected,
        all.not_final,
        yes(!fails.iter().any(|f| f.contains("open streams") || f.contains("metrics"))),
        yes(!fails.iter().any(|f| f.contains("slots:"))),
        yes(logs.clean()),
        args.seed,
        if fails.is_empty() { "PASS" } else { "FAIL" },
    );
    Ok((line, fails.is_empty()))
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "NO" }
}

/// The figures behind the line, on stderr.
fn report_details(
    c: &Counters,
    all: &Tally,
    logs: &checks::LogReport,
    rss: &[Vec<Option<u64>>],
    chaos_secs: f64,
    chaos_disconnects: u64,
    quiet_streams: u64,
) {
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    eprintln!(
        "soak: chaos round {chaos_secs:.1} s, {chaos_disconnects} disconnects; quiet rounds {quiet_streams} streams; \
         cuts: {} in the response head, {} in chunk framing, {} inside events, {} inside UTF-8 sequences",
        ld(&c.cut_in_head),
        ld(&c.cut_in_framing),
        ld(&c.cut_in_event),
        ld(&c.cut_in_utf8)
    );
    eprintln!(
        "soak: {} resumes, {} shutdown events (drain), {} broken connections (kills), {} stalls; most connections for one stream: {}",
        ld(&c.resumes),
        ld(&c.shutdowns),
        ld(&c.broken),
        ld(&c.stalls),
        all.max_connections
    );
    let retries = c.retries.lock().map(|m| list(&m)).unwrap_or_default();
    eprintln!("soak: retried answers: {}", if retries.is_empty() { "none".into() } else { retries });
    eprintln!(
        "soak: explained non-final ends: {}",
        if all.notes.is_empty() { "none".into() } else { list(&all.notes) }
    );
    eprintln!(
        "soak: streams a Redis restart touched ended: {}",
        if all.redis_touched.is_empty() { "none".into() } else { list(&all.redis_touched) }
    );
    eprintln!("soak: RSS KiB after quiet round 1 / 2: {rss:?}");
    eprintln!("soak: logs: {} lines; expected warnings: {:?}", logs.lines, logs.expected);
    for l in logs.leaks.iter().chain(&logs.panics).chain(&logs.unexpected).take(20) {
        eprintln!("soak: log: {l}");
    }
    for f in &all.failures {
        eprintln!("soak: stream: {f}");
    }
}
