//! The cluster under test: one redis-server and two replicas sharing it,
//! configured for the soak (known HS256 secret, long detach grace so that
//! resumes find their generation running, short leases so that a killed
//! replica's slots come back quickly, rate limits off: the soak's clients
//! reconnect far faster than a person would).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::procs::{Redis, Replica};
use crate::Result;

/// Per-subject stream cap the replicas run with (the slot check opens
/// exactly this many again at the end of each round).
pub const CAP: usize = 4;
/// `--stream-lease-ttl`: a killed replica's slots are free again after it.
pub const LEASE_TTL_SECS: u64 = 3;
/// `--detach-grace`: a resume must arrive within it (they arrive within
/// milliseconds, or a few seconds during an outage).
pub const DETACH_GRACE: &str = "10s";
/// `--stream-ttl`: how long a finished stream stays resumable (and in
/// memory). Short, so that the RSS readings of the quiet rounds can be
/// taken once the streams of the round are forgotten (the soak's own
/// resumes come within seconds).
pub const STREAM_TTL: Duration = Duration::from_secs(5);
/// How often a replica forgets expired streams (tokengate's
/// `PRUNE_EVERY` in `src/server/mod.rs`, ticking from its start).
pub const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Where things go and what to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The tokengate binary.
    pub binary: PathBuf,
    /// The redis-server program.
    pub redis: String,
    /// Redis with an AOF (`appendfsync always`) instead of none.
    pub persist: bool,
    /// Logs and Redis files.
    pub dir: PathBuf,
}

/// Redis and the two replicas.
pub struct Cluster {
    /// The shared Redis.
    pub redis: Redis,
    /// Replicas `a` and `b`.
    pub replicas: [Replica; 2],
}

impl Cluster {
    /// Starts Redis, then both replicas, and waits until both are ready.
    pub async fn start(opts: &Options, secret: &str) -> Result<Self> {
        std::fs::create_dir_all(&opts.dir)?;
        let mut redis = Redis::new(opts.redis.clone(), opts.persist, opts.dir.clone())?;
        redis.start().await?;
        let args: Vec<String> = [
            "--redis-url",
            &redis.url(),
            "--detach-grace",
            DETACH_GRACE,
            "--stream-lease-ttl",
            &format!("{LEASE_TTL_SECS}s"),
            "--max-streams-per-subject",
            &CAP.to_string(),
            "--rate-subject-per-min",
            "0",
            "--rate-ip-per-min",
            "0",
            // Heartbeats every second: a silent connection is a stall.
            "--heartbeat",
            "1s",
            // A drain lets short streams finish, then sends `shutdown`.
            "--shutdown-grace",
            "2s",
            "--pace-max-ms",
            "1000",
            "--stream-ttl",
            &format!("{}s", STREAM_TTL.as_secs()),
        ]
        .map(String::from)
        .to_vec();
        let make = |name| Replica::new(name, opts.binary.clone(), args.clone(), secret.to_owned(), opts.dir.clone());
        let mut replicas = [make("a")?, make("b")?];
        for r in &mut replicas {
            r.start().await?;
        }
        Ok(Self { redis, replicas })
    }

    /// The first moment at which both replicas have swept away every
    /// stream that finished before `ended` (their sweep ticks every
    /// [`SWEEP_EVERY`] from their start; one second of margin).
    pub fn swept_after(&self, ended: Instant) -> Instant {
        let due = ended + STREAM_TTL;
        let mut at = due;
        for r in &self.replicas {
            let Some(start) = r.started else { continue };
            let periods = due.saturating_duration_since(start).as_secs_f64() / SWEEP_EVERY.as_secs_f64();
            let tick = start + SWEEP_EVERY.mul_f64(periods.ceil());
            at = at.max(tick);
        }
        at + Duration::from_secs(1)
    }

    /// Stops both replicas (SIGTERM; a non-zero exit is an error) and Redis.
    pub async fn stop(&mut self) -> Result<()> {
        let mut failed = Vec::new();
        for r in &mut self.replicas {
            if let Err(e) = r.stop().await {
                failed.push(format!("{}: {e}", r.name));
            }
        }
        self.redis.stop().await?;
        if failed.is_empty() { Ok(()) } else { Err(failed.join("; ").into()) }
    }
}
