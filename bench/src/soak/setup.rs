//! The cluster under test: one redis-server and two replicas sharing it,
//! configured for the soak (known HS256 secret, long detach grace so that
//! resumes find their generation running, short leases so that a killed
//! replica's slots come back quickly, rate limits off: the soak's clients
//! reconnect far faster than a person would).

use std::path::PathBuf;

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
