//! What the load generator reads about the server (and itself) from /proc:
//! CPU seconds (utime + stime, in clock ticks of 1/100 s) and resident
//! memory (VmRSS), plus the machine-wide busy share from /proc/stat.

use std::fs;

/// Clock ticks per second for /proc/<pid>/stat (`getconf CLK_TCK`, 100 on
/// Linux x86-64 and arm64).
pub const CLK_TCK: f64 = 100.0;

/// utime + stime of a process, in seconds (all its threads).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu(&stat)
}

/// utime + stime of this process, in seconds.
pub fn self_cpu_seconds() -> Option<f64> {
    parse_cpu(&fs::read_to_string("/proc/self/stat").ok()?)
}

fn parse_cpu(stat: &str) -> Option<f64> {
    // The command name may hold spaces and parentheses: fields start after
    // the last `)`. Field 3 (state) is index 0 here; utime (14) is 11,
    // stime (15) is 12.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / CLK_TCK)
}

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS:")
}

fn status_field(pid: u32, name: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Number of threads of a process.
pub fn threads(pid: u32) -> Option<u64> {
    status_field(pid, "Threads:")
}

/// Machine-wide (busy, total) jiffies from the `cpu` line of /proc/stat.
pub fn machine_jiffies() -> Option<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().take(8).sum();
    // idle + iowait are not busy.
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// A before/after snapshot of a server process and the machine.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub server_cpu: Option<f64>,
    pub server_rss: Option<u64>,
    pub self_cpu: Option<f64>,
    pub machine: Option<(u64, u64)>,
}

impl Snapshot {
    pub fn take(pid: Option<u32>) -> Self {
        Self {
            server_cpu: pid.and_then(cpu_seconds),
            server_rss: pid.and_then(rss_kib),
            self_cpu: self_cpu_seconds(),
            machine: machine_jiffies(),
        }
    }
}

/// Machine busy share between two snapshots, in percent of all cores.
pub fn busy_pct(a: &Snapshot, b: &Snapshot) -> Option<f64> {
    let ((b0, t0), (b1, t1)) = (a.machine?, b.machine?);
    let dt = t1.checked_sub(t0)?;
    (dt > 0).then(|| 100.0 * (b1 - b0) as f64 / dt as f64)
}

#[cfg(test)]
mod tests {
    use super::parse_cpu;

    #[test]
    fn stat_with_odd_name() {
        let line = "1234 (a b) c) S 1 2 3 4 5 6 7 8 9 10 150 50 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_cpu(line), Some(2.0));
    }
}
