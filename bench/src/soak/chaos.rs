//! The chaos schedule of the first round: two SIGKILLs, one drain, one
//! Redis restart, each at a seeded point of the round's progress (the
//! larger of disconnects/target and elapsed/duration), one at a time, each
//! followed by a wait until the cluster is ready again. Cancels are the
//! clients' doing (see `client`).

use std::time::Duration;

use super::rng::Rng;
use super::setup::Cluster;
use super::shared::Shared;
use crate::Result;

/// One failure to inject.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL replica `i`, restart it.
    Kill(usize),
    /// SIGTERM replica `i`, wait for its drain, restart it.
    Drain(usize),
    /// Stop and restart redis-server.
    RestartRedis,
}

/// What the schedule did.
#[derive(Debug, Default)]
pub struct Report {
    /// SIGKILLs.
    pub kills: u64,
    /// SIGTERM drains.
    pub drains: u64,
    /// Redis restarts.
    pub redis_restarts: u64,
    /// Anything that went wrong (a drain that did not exit 0, a replica
    /// that did not come back).
    pub problems: Vec<String>,
}

/// Time after a fault's recovery during which new streams still count as
/// touched by it (the replicas notice Redis within 500 ms; a killed
/// replica's leases lapse within 3 s, but only streams that were running
/// then are affected, and those were touched anyway).
const MARGIN: Duration = Duration::from_millis(1500);

/// Runs the schedule; `progress` says how far the round is (0..1).
pub async fn run(cluster: &mut Cluster, shared: &Shared, rng: &mut Rng, progress: impl Fn() -> f64) -> Report {
    let plan = [(0.15, Fault::Kill(0)), (0.35, Fault::Drain(1)), (0.55, Fault::RestartRedis), (0.75, Fault::Kill(1))];
    let mut report = Report::default();
    for (at, fault) in plan {
        let at = at + (rng.range(0, 60) as f64 - 30.0) / 1000.0;
        while progress() < at {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("soak: chaos at {:.0}%: {fault:?}", progress() * 100.0);
        if let Err(e) = inject(cluster, shared, fault, &mut report).await {
            report.problems.push(format!("{fault:?}: {e}"));
        }
    }
    report
}

async fn inject(cluster: &mut Cluster, shared: &Shared, fault: Fault, report: &mut Report) -> Result<()> {
    match fault {
        Fault::Kill(i) => {
            shared.replica_chaos.bump();
            let result = async {
                cluster.replicas[i].kill().await?;
                report.kills += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
                cluster.replicas[i].start().await
            }
            .await;
            tokio::time::sleep(MARGIN).await;
            shared.replica_chaos.bump();
            result
        }
        Fault::Drain(i) => {
            shared.replica_chaos.bump();
            let result = async {
                let status = cluster.replicas[i].drain(Duration::from_secs(30)).await?;
                report.drains += 1;
                if !status.success() {
                    report.problems.push(format!("drained replica exited with {status}"));
                }
                cluster.replicas[i].start().await
            }
            .await;
            tokio::time::sleep(MARGIN).await;
            shared.replica_chaos.bump();
            result
        }
        Fault::RestartRedis => {
            shared.redis_chaos.bump();
            let result = async {
                cluster.redis.stop().await?;
                report.redis_restarts += 1;
                tokio::time::sleep(Duration::from_millis(300)).await;
                cluster.redis.start().await?;
                for r in &mut cluster.replicas {
                    r.wait_ready(Duration::from_secs(20)).await?;
                }
                Ok(())
            }
            .await;
            tokio::time::sleep(MARGIN).await;
            shared.redis_chaos.bump();
            result
        }
    }
}
