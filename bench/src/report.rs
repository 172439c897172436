//! Writes BENCHMARKS.md from the JSON lines `scripts/bench.sh` collected:
//! medians of the alternating runs per scenario and server, ratios, targets
//! and whether each is met, every run's figures, the profile of scenario 6
//! and the syscall counts. Anything below the notes marker in an existing
//! BENCHMARKS.md is kept.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::PathBuf;

use serde_json::Value;

use crate::Result;

const NOTES_MARKER: &str =
    "<!-- Hand-written notes below this line are kept when scripts/bench.sh regenerates the file. -->";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// JSON lines from the load generator (one run per line).
    #[arg(long)]
    results: PathBuf,
    /// Directory with meta.txt (KEY=VALUE), commands.txt, and the profile
    /// and strace outputs.
    #[arg(long)]
    dir: PathBuf,
    /// The file to write.
    #[arg(long)]
    out: PathBuf,
}

struct Runs(Vec<Value>);

impl Runs {
    fn of(&self, scenario: &str, server: &str) -> Vec<&Value> {
        self.0.iter().filter(|r| r["tags"]["scenario"] == scenario && r["tags"]["server"] == server).collect()
    }

    /// Median over the runs of one number at a JSON pointer.
    fn median(&self, scenario: &str, server: &str, pointer: &str) -> Option<f64> {
        median(self.of(scenario, server).iter().filter_map(|r| r.pointer(pointer).and_then(Value::as_f64)).collect())
    }

    /// The medians of `pointer` for tokengate and for the reference, side
    /// by side.
    fn pair(&self, scenario: &str, pointer: &str) -> (Option<f64>, Option<f64>) {
        (self.median(scenario, "tokengate", pointer), self.median(scenario, "reference", pointer))
    }

    fn values(&self, scenario: &str, server: &str, pointer: &str) -> String {
        let v: Vec<String> =
            self.of(scenario, server).iter().map(|r| r.pointer(pointer).map_or("-".to_owned(), fmt_value)).collect();
        v.join(" / ")
    }

    /// Sum over the runs of failed streams/errors, for the "clean" column.
    fn failures(&self, scenario: &str, server: &str) -> u64 {
        self.of(scenario, server)
            .iter()
            .map(|r| {
                r["errors"].as_object().map_or(0, |e| e.values().filter_map(Value::as_u64).sum::<u64>())
                    + r["streams_failed"].as_u64().unwrap_or(0)
            })
            .sum()
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

fn fmt_value(v: &Value) -> String {
    match v {
        Value::Number(n) => n.as_f64().map_or(n.to_string(), fmt_num),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn fmt_num(x: f64) -> String {
    let a = x.abs();
    if x.fract() == 0.0 && a < 1e15 {
        return group(x as i64);
    }
    if a >= 10_000.0 {
        group(x.round() as i64)
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

fn group(n: i64) -> String {
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn opt(x: Option<f64>) -> String {
    x.map_or("-".into(), fmt_num)
}

fn met(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "**met**",
        Some(false) => "**not met**",
        None => "n/a",
    }
}

struct Row {
    scenario: &'static str,
    metric: String,
    tokengate: String,
    reference: String,
    ratio: String,
    target: String,
    met: &'static str,
}

fn row(
    scenario: &'static str,
    metric: &str,
    tg: Option<f64>,
    rf: Option<f64>,
    ratio: Option<f64>,
    target: &str,
    ok: Option<bool>,
) -> Row {
    Row {
        scenario,
        metric: metric.into(),
        tokengate: opt(tg),
        reference: opt(rf),
        ratio: ratio.map_or("-".into(), |r| format!("{r:.2}x")),
        target: target.into(),
        met: met(ok),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

pub fn main(args: Args) -> Result<()> {
    let text = fs::read_to_string(&args.results)?;
    let runs = Runs(
        text.lines().filter(|l| l.trim_start().starts_with('{')).filter_map(|l| serde_json::from_str(l).ok()).collect(),
    );
    let meta: BTreeMap<String, String> = fs::read_to_string(args.dir.join("meta.txt"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())))
        .collect();
    let m = |k: &str| meta.get(k).cloned().unwrap_or_else(|| "?".into());
    let commands = fs::read_to_string(args.dir.join("commands.txt")).unwrap_or_default();
    let notes = fs::read_to_string(&args.out)
        .ok()
        .and_then(|old| old.split_once(NOTES_MARKER).map(|(_, n)| n.to_owned()))
        .unwrap_or_else(|| "\n".into());

    let mut rows = Vec::new();
    let (tg, rf) = ("tokengate", "reference");

    // 1. Unpaced throughput.
    let (a, b) = runs.pair("s1", "/chars_per_s");
    let r = ratio(a, b);
    rows.push(row(
        "1 unpaced",
        "chars/s delivered (text verified)",
        a,
        b,
        r,
        "tokengate >= 2x reference",
        r.map(|r| r >= 2.0),
    ));
    let (a, b) = runs.pair("s1b", "/chars_per_s");
    if a.is_some() || b.is_some() {
        let r = ratio(a, b);
        rows.push(row(
            "1 unpaced",
            "chars/s, 2-thread load generator (scenario 1b)",
            a,
            b,
            r,
            "tokengate >= 2x reference",
            r.map(|r| r >= 2.0),
        ));
    }
    let (a, b) = runs.pair("s1", "/loadgen_cpu_s");
    let (wa, wb) = runs.pair("s1", "/wall_s");
    rows.push(row(
        "1 unpaced",
        "load generator busy, share of its one core (1 thread)",
        a.zip(wa).map(|(c, w)| c / w),
        b.zip(wb).map(|(c, w)| c / w),
        None,
        "-",
        None,
    ));
    let (fa, fb) =
        (runs.failures("s1", tg) + runs.failures("s1b", tg), runs.failures("s1", rf) + runs.failures("s1b", rf));
    rows.push(row(
        "1 unpaced",
        "failed streams / errors, all runs",
        Some(fa as f64),
        Some(fb as f64),
        None,
        "0",
        Some(fa == 0),
    ));
    let (a, b) = runs.pair("s1", "/server_cpu_us_per_char");
    rows.push(row("1 unpaced", "server CPU µs per char", a, b, ratio(a, b), "-", None));
    let (a, b) = runs.pair("s1", "/ttfd_ms/p50");
    rows.push(row("1 unpaced", "time to first delta p50, ms", a, b, ratio(a, b), "-", None));
    let (a, b) = runs.pair("s1", "/server_rss_bytes_per_char_retained");
    rows.push(row(
        "1 unpaced",
        "server RSS per retained character right after the last stream, bytes (connections still closing)",
        a,
        b,
        None,
        "-",
        None,
    ));
    let (a, b) = runs.pair("s1", "/server_rss_bytes_per_char_retained_settled");
    rows.push(row(
        "1 unpaced",
        "server RSS per retained character 4 s later, bytes (logs kept for resume; the reference keeps none)",
        a,
        b,
        None,
        "<= 16 B",
        a.map(|a| a <= 16.0),
    ));

    // 2. Paced.
    let pace = runs.of("s2", tg).first().and_then(|r| r["pace_ms"].as_f64()).unwrap_or(5.0);
    let (a, b) = runs.pair("s2", "/gap_ms/p50");
    let lo = pace * 0.9;
    let hi = pace * 1.1;
    rows.push(row(
        "2 paced",
        &format!("inter-delta gap p50, ms (pace {pace} ms)"),
        a,
        b,
        None,
        &format!("{lo:.1}..{hi:.1} ms (±10%)"),
        a.map(|x| x >= lo && x <= hi),
    ));
    let (a, b) = runs.pair("s2", "/gap_ms/p99");
    rows.push(row(
        "2 paced",
        "inter-delta gap p99, ms",
        a,
        b,
        None,
        &format!("<= {:.1} ms (+50%)", pace * 1.5),
        a.map(|x| x <= pace * 1.5),
    ));
    let (a, b) = runs.pair("s2", "/server_cpu_us_per_char");
    rows.push(row("2 paced", "server CPU µs per delivered char", a, b, ratio(a, b), "<= 2.5 µs", a.map(|x| x <= 2.5)));
    // Issue 14, target 1 at the saturating load: at least the reference's
    // delivered characters at no more CPU per character.
    let r = ratio(a, b);
    rows.push(row(
        "2 paced",
        "server CPU µs per delivered char against the reference's",
        a,
        b,
        r,
        "tokengate <= 1.0x reference",
        r.map(|r| r <= 1.0),
    ));
    let (a, b) = runs.pair("s2", "/chars_per_s");
    let r = ratio(a, b);
    rows.push(row(
        "2 paced",
        "chars/s delivered (the load asks for streams x 1000 / pace)",
        a,
        b,
        r,
        "tokengate >= 1.0x reference",
        r.map(|r| r >= 1.0),
    ));
    let (fa, fb) = (runs.failures("s2", tg), runs.failures("s2", rf));
    rows.push(row(
        "2 paced",
        "failed streams / errors, all runs",
        Some(fa as f64),
        Some(fb as f64),
        None,
        "0",
        Some(fa == 0),
    ));

    // 2h. Paced at a load the machine sustains, with the ceiling.
    let cpu = |server: &str| runs.median("s2h", server, "/server_cpu_us_per_char");
    let (a, b, c) = (cpu(tg), cpu(rf), cpu("ceiling"));
    if a.is_some() || c.is_some() {
        let r = ratio(a, b);
        rows.push(row(
            "2h paced, 500 streams",
            "server CPU µs per delivered char",
            a,
            b,
            r,
            "tokengate <= 0.8x reference",
            r.map(|r| r <= 0.8),
        ));
        let r = ratio(a, c);
        rows.push(row(
            "2h paced, 500 streams",
            "server CPU µs per delivered char (reference column: the one-write-per-character ceiling)",
            a,
            c,
            r,
            "tokengate <= 1.2x ceiling",
            r.map(|r| r <= 1.2),
        ));
        let rate = |server: &str| runs.median("s2h", server, "/chars_per_s");
        rows.push(row(
            "2h paced, 500 streams",
            "chars/s delivered (ceiling in brackets)",
            rate(tg),
            rate(rf),
            ratio(rate(tg), rate(rf)),
            &format!("- (ceiling {})", opt(rate("ceiling"))),
            None,
        ));
        let (fa, fb) = (runs.failures("s2h", tg), runs.failures("s2h", rf));
        rows.push(row(
            "2h paced, 500 streams",
            "failed streams / errors, all runs",
            Some(fa as f64),
            Some(fb as f64),
            None,
            "0",
            Some(fa == 0),
        ));
    }

    // 2r. Paced with Redis (issue 14, target 7).
    rows.extend(redis_rows(&runs));

    // 3. Idle.
    let (a, b) = runs.pair("s3", "/open_streams");
    rows.push(row("3 idle", "streams held open", a, b, None, "fd limit (~19,000)", a.map(|x| x >= 18_000.0)));
    let (a, b) = runs.pair("s3", "/rss_kib_per_stream");
    rows.push(row("3 idle", "server RSS per open stream, KiB", a, b, ratio(a, b), "<= 8 KiB", a.map(|x| x <= 8.0)));
    let hb = |s: &str| {
        let v = runs.of("s3", s);
        (!v.is_empty()).then(|| v.iter().all(|r| r["heartbeats_flowing"] == true))
    };
    let (ha, hb_ref) = (hb(tg), hb(rf));
    rows.push(Row {
        scenario: "3 idle",
        metric: "heartbeats flowing on every stream (all runs)".into(),
        tokengate: ha.map_or("-".into(), |x| if x { "yes".into() } else { "no".into() }),
        reference: hb_ref.map_or("-".into(), |x| if x { "yes".into() } else { "no".into() }),
        ratio: "-".into(),
        target: "yes".into(),
        met: met(ha),
    });
    let (a, b) = runs.pair("s3", "/server_cpu_s_during_hold");
    rows.push(row("3 idle", "server CPU s while holding", a, b, ratio(a, b), "-", None));

    // 4. Fan-out.
    let (a, b) = runs.pair("s4", "/latency_ms/p99");
    rows.push(row("4 fan-out", "publish-to-receive p99, ms", a, b, ratio(a, b), "<= 25 ms", a.map(|x| x <= 25.0)));
    let (a, b) = runs.pair("s4", "/latency_ms/p50");
    rows.push(row("4 fan-out", "publish-to-receive p50, ms", a, b, ratio(a, b), "-", None));
    let da = runs.median("s4", tg, "/deliveries");
    let ea = runs.median("s4", tg, "/deliveries_expected");
    let db = runs.median("s4", rf, "/deliveries");
    rows.push(row(
        "4 fan-out",
        "deliveries (of subscribers x publishes)",
        da,
        db,
        None,
        &opt(ea),
        match (da, ea) {
            (Some(d), Some(e)) => Some(d >= e && e > 0.0),
            _ => None,
        },
    ));
    let (a, b) = runs.pair("s4", "/server_cpu_s");
    rows.push(row("4 fan-out", "server CPU s for all publishes", a, b, ratio(a, b), "-", None));

    // 5. Proxy overhead (the "reference" column is the mock, directly).
    let a = runs.median("s5ttfd", tg, "/ttfd_ms/p50");
    let b = runs.median("s5ttfd", "direct", "/ttfd_ms/p50");
    let added = match (a, b) {
        (Some(a), Some(b)) => Some(a - b),
        _ => None,
    };
    rows.push(row(
        "5 proxy",
        "time to first delta p50 at 1 connection, ms (reference column: mock directly)",
        a,
        b,
        None,
        "-",
        None,
    ));
    rows.push(row(
        "5 proxy",
        "added time to first delta p50, ms",
        added,
        None,
        None,
        "<= 1 ms",
        added.map(|x| x <= 1.0),
    ));
    let a = runs.median("s5tput", tg, "/chars_per_s");
    let b = runs.median("s5tput", "direct", "/chars_per_s");
    let r = ratio(a, b);
    rows.push(row(
        "5 proxy",
        "chars/s at 50 streams (reference column: mock directly)",
        a,
        b,
        r,
        ">= 0.90x direct",
        r.map(|r| r >= 0.9),
    ));
    let (fa, fb) = (
        runs.failures("s5tput", tg) + runs.failures("s5ttfd", tg),
        runs.failures("s5tput", "direct") + runs.failures("s5ttfd", "direct"),
    );
    rows.push(row(
        "5 proxy",
        "failed streams / errors, all runs",
        Some(fa as f64),
        Some(fb as f64),
        None,
        "0",
        Some(fa == 0),
    ));

    // 6. Opens.
    let target_rate = runs.of("s6", tg).first().and_then(|r| r["rate_target"].as_f64());
    let (a, b) = runs.pair("s6", "/opens_per_s");
    rows.push(row(
        "6 opens",
        "stream opens per second completed",
        a,
        b,
        ratio(a, b),
        &format!("{} /s offered", opt(target_rate)),
        match (a, target_rate) {
            (Some(a), Some(t)) => Some(a >= 0.95 * t),
            _ => None,
        },
    ));
    let (a, b) = runs.pair("s6", "/latency_from_schedule_ms/p99");
    rows.push(row("6 opens", "open-to-done p99 from schedule, ms", a, b, ratio(a, b), "-", None));
    let (a, b) = runs.pair("s6", "/server_cpu_us_per_open");
    let r = ratio(a, b);
    rows.push(row(
        "6 opens",
        "server CPU µs per stream open",
        a,
        b,
        r,
        "tokengate <= 1.5x reference",
        r.map(|r| r <= 1.5),
    ));
    let (fa, fb) = (runs.failures("s6", tg), runs.failures("s6", rf));
    rows.push(row("6 opens", "errors, all runs", Some(fa as f64), Some(fb as f64), None, "0", Some(fa == 0)));
    let profile = profile_section(&args.dir);
    let a = runs.median("s6quiet", tg, "/server_cpu_us_per_open");
    if a.is_some() {
        rows.push(row(
            "6 opens",
            "server CPU µs per open with `RUST_LOG=warn` (diagnostic, 1 run)",
            a,
            None,
            None,
            "-",
            None,
        ));
    }
    let pct_row = |metric: &str, v: f64| Row {
        scenario: "6 opens",
        metric: metric.into(),
        tokengate: format!("{v:.1}%"),
        reference: "-".into(),
        ratio: "-".into(),
        target: "measure".into(),
        met: "measured",
    };
    if let Some((auth, limits)) = profile.shares {
        rows.push(pct_row("share of server instructions in JWT extraction + validation (callgrind)", auth));
        rows.push(pct_row("share in rate limiters + stream slots (callgrind)", limits));
    }
    if let Some(logs) = profile.logging {
        rows.push(pct_row("for comparison: share in formatting log lines (callgrind)", logs));
    }
    if let Some(jwt) = profile.perf_jwt {
        rows.push(pct_row("share of server CPU time in JWT crates, self time at the full rate (perf)", jwt));
    }

    // The document.
    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(w, "# Benchmarks\n");
    let _ = writeln!(
        w,
        "Generated by `scripts/bench.sh` (do not edit above the notes marker at the end; rerun the script). \
         Figures come from benchmarks run side by side in one session, tokengate and the reference server \
         alternately on the same scenario, {} runs each; the tables show **medians** and ratios. \
         None of these figures comes from a timed test.\n",
        m("RUNS")
    );
    let _ = writeln!(w, "## Machine and run\n");
    let _ = writeln!(w, "| | |\n|---|---|");
    for (k, label) in [
        ("DATE", "date (UTC)"),
        ("NPROC", "cores (`nproc`)"),
        ("CPU", "CPU (/proc/cpuinfo)"),
        ("MEM", "memory"),
        ("KERNEL", "kernel"),
        ("NOFILE", "fd limit (soft/hard)"),
        ("RUSTC", "rustc"),
        ("COMMIT", "tokengate commit"),
        ("LOADAVG", "load average before the run"),
        ("ELAPSED", "script wall time"),
    ] {
        let _ = writeln!(w, "| {label} | {} |", m(k).replace('|', "\\|"));
    }
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "Everything runs on this one machine over loopback: the server under test, the load generator \
         (`tokengate-bench loadgen`, a current-thread tokio runtime, i.e. one core at most) and, in \
         scenario 5, the mock upstream. Each run gets a freshly started server. Server CPU is utime+stime \
         from `/proc/<pid>/stat` (10 ms ticks) over the measured phase; RSS is `VmRSS` from \
         `/proc/<pid>/status`.\n"
    );
    if let Some(scale) = meta.get("SCALE") {
        let _ = writeln!(w, "**Scale.** {scale}\n");
    }
    let _ = writeln!(w, "## Results (medians)\n");
    let _ = writeln!(w, "| scenario | metric | tokengate | reference | ratio | target | result |");
    let _ = writeln!(w, "|---|---|---:|---:|---:|---|---|");
    for r in &rows {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.scenario, r.metric, r.tokengate, r.reference, r.ratio, r.target, r.met
        );
    }
    let _ = writeln!(w);
    let missed: Vec<String> =
        rows.iter().filter(|r| r.met == "**not met**").map(|r| format!("{} — {}", r.scenario, r.metric)).collect();
    if missed.is_empty() {
        let _ = writeln!(w, "Every target with a verdict was met in this run.\n");
    } else {
        let _ = writeln!(w, "Targets **not met** in this run:\n");
        for m in missed {
            let _ = writeln!(w, "- {m}");
        }
        let _ = writeln!(w);
    }

    let _ = writeln!(w, "## Scenarios\n");
    for (k, text) in [
        ("S1", "1. Unpaced throughput"),
        ("S1B", "1b. Unpaced throughput, 2-thread client"),
        ("S2", "2. Paced"),
        ("S2H", "2h. Paced, with the ceiling"),
        ("S2R", "2r. Paced, with Redis"),
        ("S3", "3. Idle"),
        ("S4", "4. Fan-out"),
        ("S5", "5. Proxy overhead"),
        ("S6", "6. Auth and limits on the hot path"),
    ] {
        if let Some(description) = meta.get(k) {
            let _ = writeln!(w, "- **{text}**: {description}");
        }
    }
    let _ = writeln!(w);
    let _ = writeln!(w, "### Differences in the reference's favour\n");
    let _ = writeln!(
        w,
        "The reference server (`tokengate-bench reference`, [bench/src/reference.rs](bench/src/reference.rs)) is the \
         simplest idiomatic axum program: `Sse` over a stream, one `event: delta` per `char`, a tokio `interval` for \
         pacing, `KeepAlive`, a tokio `broadcast` channel per name for fan-out. It does **not** validate JWTs (the load \
         generator sends the same `Authorization` header to both, and the reference ignores it), applies no rate limits \
         or stream caps, keeps no resumable log, sends no `id:` lines (tokengate's events carry \
         `id: <32 hex>.<seq>`, so each delta is about twice the bytes), does no grapheme segmentation (it splits on \
         `char`; the test texts are chosen so both agree), has no per-stream task, backpressure window or \
         slow-consumer handling, no metrics and no request logging. All of that is work tokengate does and the reference does not.\n"
    );

    let _ = writeln!(w, "## Every run\n");
    let _ = writeln!(
        w,
        "Values are listed per run, run 1 / run 2 / run 3 (tokengate went first in odd runs, the reference in even ones). \
         `loadgen_cpu_s` is the load generator's own CPU time; `other_cpu_s` is the CPU time every other process on the \
         machine used during the measured phase (anything but a few hundredths is noise from outside the benchmark, \
         e.g. another build or test suite sharing the 2 cores); `machine_busy_pct` is the share of both cores in use.\n"
    );
    let detail: &[(&str, &str, &[&str])] = &[
        (
            "s1",
            "1 unpaced",
            &[
                "/chars_per_s",
                "/wall_s",
                "/server_cpu_s",
                "/server_cpu_us_per_char",
                "/ttfd_ms/p50",
                "/ttfd_ms/p99",
                "/gap_ms/p99",
                "/streams_ok",
                "/server_rss_kib_peak",
                "/server_rss_kib_after",
                "/server_rss_bytes_per_char_retained",
                "/server_rss_bytes_per_char_retained_settled",
                "/loadgen_cpu_s",
                "/other_cpu_s",
                "/machine_busy_pct",
            ],
        ),
        (
            "s1b",
            "1b unpaced, 2-thread load generator",
            &[
                "/chars_per_s",
                "/wall_s",
                "/server_cpu_s",
                "/server_cpu_us_per_char",
                "/ttfd_ms/p50",
                "/streams_ok",
                "/loadgen_cpu_s",
                "/other_cpu_s",
                "/machine_busy_pct",
            ],
        ),
        (
            "s2",
            "2 paced",
            &[
                "/gap_ms/p50",
                "/gap_ms/p90",
                "/gap_ms/p99",
                "/gap_ms/max",
                "/server_cpu_us_per_char",
                "/chars_per_s",
                "/streams_ok",
                "/ttfd_ms/p99",
                "/loadgen_cpu_s",
                "/other_cpu_s",
                "/machine_busy_pct",
            ],
        ),
        (
            "s2h",
            "2h paced, 500 streams, with the ceiling",
            &[
                "/gap_ms/p50",
                "/gap_ms/p99",
                "/server_cpu_us_per_char",
                "/chars_per_s",
                "/streams_ok",
                "/loadgen_cpu_s",
                "/other_cpu_s",
                "/machine_busy_pct",
            ],
        ),
        (
            "s2r",
            "2r paced, 500 streams, memory store and Redis",
            &[
                "/gap_ms/p50",
                "/gap_ms/p99",
                "/server_cpu_s",
                "/server_cpu_us_per_char",
                "/chars_per_s",
                "/streams_ok",
                "/other_cpu_s",
                "/machine_busy_pct",
            ],
        ),
        (
            "s3",
            "3 idle",
            &[
                "/open_streams",
                "/rss_kib_per_stream",
                "/server_rss_kib_before",
                "/server_rss_kib_held",
                "/heartbeats/min",
                "/heartbeats/p50",
                "/heartbeats/expected_per_stream",
                "/ramp_s",
                "/server_cpu_s_during_hold",
                "/server_threads",
            ],
        ),
        (
            "s4",
            "4 fan-out",
            &[
                "/latency_ms/p50",
                "/latency_ms/p99",
                "/latency_ms/max",
                "/deliveries",
                "/deliveries_expected",
                "/publish_rtt_ms/p50",
                "/server_cpu_s",
                "/ramp_s",
                "/other_cpu_s",
                "/machine_busy_pct",
            ],
        ),
        (
            "s5ttfd",
            "5 proxy, 1 connection",
            &["/ttfd_ms/p50", "/ttfd_ms/p90", "/ttfd_ms/p99", "/streams_ok", "/chars_per_s"],
        ),
        (
            "s5tput",
            "5 proxy, 50 streams",
            &[
                "/chars_per_s",
                "/wall_s",
                "/server_cpu_s",
                "/ttfd_ms/p50",
                "/streams_ok",
                "/other_cpu_s",
                "/machine_busy_pct",
            ],
        ),
        (
            "s6quiet",
            "6 opens, diagnostic: tokengate with RUST_LOG=warn (1 run)",
            &["/opens_per_s", "/server_cpu_us_per_open", "/latency_from_schedule_ms/p99", "/other_cpu_s"],
        ),
        (
            "s6",
            "6 opens",
            &[
                "/opens_per_s",
                "/opens_ok",
                "/opens_scheduled",
                "/latency_from_schedule_ms/p50",
                "/latency_from_schedule_ms/p99",
                "/latency_from_send_ms/p50",
                "/server_cpu_us_per_open",
                "/late_sends",
                "/other_cpu_s",
                "/machine_busy_pct",
            ],
        ),
    ];
    for (scenario, title, pointers) in detail {
        let servers: Vec<&str> = if scenario.starts_with("s5") {
            vec![tg, "direct"]
        } else if *scenario == "s2h" {
            vec![tg, rf, "ceiling"]
        } else if *scenario == "s2r" {
            vec![tg, "tokengate-redis"]
        } else {
            vec![tg, rf]
        };
        if servers.iter().all(|s| runs.of(scenario, s).is_empty()) {
            continue;
        }
        let cells = |f: &dyn Fn(&str) -> String| servers.iter().map(|s| f(s)).collect::<Vec<_>>().join(" | ");
        let _ = writeln!(w, "### {title}\n");
        let _ = writeln!(w, "| figure | {} |", servers.join(" | "));
        let _ = writeln!(w, "|---|{}", "---|".repeat(servers.len()));
        for p in *pointers {
            let _ = writeln!(w, "| `{}` | {} |", p.trim_start_matches('/'), cells(&|s| runs.values(scenario, s, p)));
        }
        let errs = |s: &str| {
            let v: Vec<String> = runs.of(scenario, s).iter().map(|r| r["errors"].to_string()).collect();
            v.join(" / ").replace('|', "\\|")
        };
        let _ = writeln!(w, "| `errors` | {} |", cells(&errs));
        let _ = writeln!(w);
    }

    let _ = writeln!(w, "## Scenario 6 profile\n");
    let _ = writeln!(w, "{}", profile.text);
    let _ = writeln!(w, "## System calls\n");
    let _ = writeln!(w, "{}", strace_section(&args.dir, &runs));
    let _ = writeln!(w, "## Commands\n");
    let _ = writeln!(
        w,
        "Run everything with `scripts/bench.sh` (about 10 minutes on 2 cores, after the release build). The commands it ran:\n"
    );
    let _ = writeln!(w, "```sh\n{}```\n", commands);
    let _ = writeln!(
        w,
        "Raw JSON of every run: `{}` (not committed; the script leaves it in `target/bench/`).\n",
        args.results.display()
    );
    let _ = write!(w, "{NOTES_MARKER}{notes}");
    fs::write(&args.out, md)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// Scenario 2r's rows: tokengate on Redis (plus redis-server's own CPU)
/// against the memory store, in the same run; the reference column is the
/// memory store. Empty when 2r did not run.
fn redis_rows(runs: &Runs) -> Vec<Row> {
    let (mem, red) = (runs.of("s2r", "tokengate"), runs.of("s2r", "tokengate-redis"));
    let redis = runs.of("s2r-redis", "redis-server");
    if mem.is_empty() || red.is_empty() {
        return Vec::new();
    }
    let per_char = |r: &Value, cpu_s: Option<f64>| {
        let chars = r["chars_delivered"].as_f64().filter(|c| *c > 0.0)?;
        Some(cpu_s? * 1e6 / chars)
    };
    let mem_cpu = median(mem.iter().filter_map(|r| per_char(r, r["server_cpu_s"].as_f64())).collect());
    // Runs pair up in order: redis-server's CPU over tokengate's run N.
    let both = median(
        red.iter()
            .zip(&redis)
            .filter_map(|(r, x)| per_char(r, Some(r["server_cpu_s"].as_f64()? + x["redis_cpu_s"].as_f64()?)))
            .collect(),
    );
    let rate = |v: &[&Value]| median(v.iter().filter_map(|r| r["chars_per_s"].as_f64()).collect());
    let commands = median(
        redis
            .iter()
            .filter_map(|x| {
                let total: f64 = x["redis_commands"].as_object()?.values().filter_map(Value::as_f64).sum();
                Some(total / x["streams"].as_f64().filter(|s| *s > 0.0)?)
            })
            .collect(),
    );
    let scenario = "2r paced, Redis";
    let r = ratio(both, mem_cpu);
    let rate_ratio = ratio(rate(&red), rate(&mem));
    vec![
        row(
            scenario,
            "tokengate + redis-server CPU µs per char (reference column: the memory store)",
            both,
            mem_cpu,
            r,
            "<= 1.25x memory store",
            r.map(|r| r <= 1.25),
        ),
        row(
            scenario,
            "chars/s delivered (reference column: the memory store)",
            rate(&red),
            rate(&mem),
            rate_ratio,
            "the same rate (>= 0.95x)",
            rate_ratio.map(|r| r >= 0.95),
        ),
        row(scenario, "Redis commands per stream", commands, None, None, "reported", None),
    ]
}

struct Profile {
    text: String,
    /// (JWT validation %, limiters + slots %) of all instructions.
    shares: Option<(f64, f64)>,
    /// Log formatting, % of all instructions.
    logging: Option<f64>,
    /// JWT-related crates' self time under perf, % of samples.
    perf_jwt: Option<f64>,
}

/// One line of `callgrind_annotate` output: (instructions, function).
fn parse_annotate(text: &str) -> (Option<u64>, Vec<(u64, String)>) {
    let mut total = None;
    let mut out = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        let Some(first) = t.split_whitespace().next() else { continue };
        let digits: String = first.chars().filter(|c| *c != ',').collect();
        let Ok(n) = digits.parse::<u64>() else { continue };
        if t.contains("PROGRAM TOTALS") {
            total = Some(n);
            continue;
        }
        // `N (pct%)  file:function [object]`
        let rest = t[first.len()..].trim_start();
        let rest =
            if rest.starts_with('(') { rest.split_once(')').map_or(rest, |(_, r)| r.trim_start()) } else { rest };
        let Some((_, func)) = rest.split_once(':') else { continue };
        let func = match func.rfind(" [") {
            Some(i) => &func[..i],
            None => func,
        };
        out.push((n, func.trim().to_owned()));
    }
    (total, out)
}

/// Inclusive share of the largest function matching `pattern`.
fn largest(lines: &[(u64, String)], pattern: &str) -> Option<(u64, String)> {
    lines.iter().filter(|(_, f)| f.contains(pattern)).max_by_key(|(n, _)| *n).cloned()
}

fn crate_of(func: &str) -> &'static str {
    const CRATES: &[&str] = &[
        "jsonwebtoken",
        "sha2",
        "hmac",
        "base64",
        "governor",
        "dashmap",
        "serde_json",
        "hyper_util",
        "hyper",
        "h2",
        "tokio",
        "axum",
        "tower_http",
        "tower",
        "tracing_subscriber",
        "tracing",
        "metrics",
        "tokengate",
        "unicode_segmentation",
        "form_urlencoded",
        "bytes",
        "http",
        "futures_util",
        "hashbrown",
        "getrandom",
        "rand",
        "alloc",
        "core",
        "std",
    ];
    let f = func.trim_start_matches('<').trim_start_matches("core::ptr::drop_in_place<").trim_start_matches('<');
    for c in CRATES {
        if f.starts_with(&format!("{c}::")) {
            return c;
        }
    }
    if f.contains("malloc") || f.contains("free") || f.contains("realloc") || f.starts_with("_int_") {
        return "libc malloc/free";
    }
    if f.starts_with("mem") || f.starts_with("__mem") || f.starts_with("str") {
        return "libc mem*/str*";
    }
    "other"
}

fn profile_section(dir: &std::path::Path) -> Profile {
    let mut text = String::new();
    let w = &mut text;
    let mut shares = None;
    let mut logging = None;
    let mut perf_jwt = None;
    let note = fs::read_to_string(dir.join("profile-note.txt")).unwrap_or_default();
    if !note.is_empty() {
        let _ = writeln!(w, "{}\n", note.trim());
    }
    match (fs::read_to_string(dir.join("callgrind-inclusive.txt")), fs::read_to_string(dir.join("callgrind-self.txt")))
    {
        (Ok(inc), Ok(slf)) => {
            let (total, inc_lines) = parse_annotate(&inc);
            let (_, self_lines) = parse_annotate(&slf);
            let total = total.or_else(|| inc_lines.iter().map(|(n, _)| *n).max()).unwrap_or(1).max(1) as f64;
            let pct = |n: u64| 100.0 * n as f64 / total;
            let _ = writeln!(w, "Total instructions in the server during the profiled run: {}.\n", group(total as i64));
            let _ = writeln!(w, "Inclusive shares (a function with everything it calls) of the hot-path checks:\n");
            let _ = writeln!(w, "| part | function (largest match) | instructions | share |");
            let _ = writeln!(w, "|---|---|---:|---:|");
            let groups: &[(&str, &[&str])] = &[
                ("JWT validation", &["tokengate::auth::validate::AuthConfig::verify"]),
                ("token extraction", &["tokengate::auth::validate::AuthConfig>::find"]),
                ("rate limiter, per IP", &["tokengate::limits::rate::RateLimits::check_ip"]),
                ("rate limiter, per subject", &["tokengate::limits::rate::RateLimits::check_subject"]),
                (
                    "stream slots",
                    &[
                        "tokengate::limits::slots::StreamSlots::try_acquire",
                        "<tokengate::limits::slots::SlotPermit as core::ops::drop::Drop>::drop",
                    ],
                ),
                ("(inside JWT) signature check", &["jsonwebtoken::decoding::verify_signature"]),
                ("(inside JWT) claims parsing", &["jsonwebtoken::serialization::DecodedJwtPartClaims::deserialize"]),
                ("(inside JWT) HMAC-SHA256", &["hmac::"]),
                ("(inside limiters) governor's GCRA check", &["governor::gcra::Gcra::test_and_update"]),
                (
                    "start-up, not per request: limiters' construction (clock calibration)",
                    &["tokengate::limits::rate::RateLimits::new"],
                ),
                (
                    "for comparison: log events (tracing-subscriber fmt)",
                    &["as tracing_core::subscriber::Subscriber>::event"],
                ),
                ("for comparison: hyper's HTTP/1 dispatcher", &["hyper::proto::h1::dispatch::Dispatcher"]),
            ];
            let mut sums: BTreeMap<&str, f64> = BTreeMap::new();
            for (label, patterns) in groups {
                for p in *patterns {
                    match largest(&inc_lines, p) {
                        Some((n, f)) => {
                            let _ = writeln!(
                                w,
                                "| {label} | `{}` | {} | {:.2}% |",
                                f.replace('|', "\\|"),
                                group(n as i64),
                                pct(n)
                            );
                            *sums.entry(label).or_default() += pct(n);
                        }
                        None => {
                            let _ =
                                writeln!(w, "| {label} | `{p}` not in the profile (inlined or not called) | - | - |");
                        }
                    }
                }
            }
            let auth = sums.get("JWT validation").copied().unwrap_or(0.0)
                + sums.get("token extraction").copied().unwrap_or(0.0);
            let limits = sums.get("rate limiter, per IP").copied().unwrap_or(0.0)
                + sums.get("rate limiter, per subject").copied().unwrap_or(0.0)
                + sums.get("stream slots").copied().unwrap_or(0.0);
            shares = Some((auth, limits));
            logging = sums.get("for comparison: log events (tracing-subscriber fmt)").copied();
            let _ = writeln!(
                w,
                "\nJWT validation and extraction: **{auth:.1}%** of the server's instructions; rate limiters and stream slots: **{limits:.1}%**.\n"
            );
            let _ = writeln!(
                w,
                "A token is verified once and then kept with its caller until its `exp` (`auth::verified`), so the \
                 JWT share depends on how often a subject's token comes back: in this profile each of the subjects' \
                 tokens is verified on its first open (one open in three here, one in thirty in the scenario's full \
                 run); a kept token costs a lookup in the open's `Principal` extractor.\n"
            );
            // Valgrind's virtual CPU hides the SHA extensions, so sha2 runs
            // its portable code under callgrind and the hardware path
            // (SHA-NI) natively: the callgrind share overstates JWT's cost.
            if let Some((sha, _)) = largest(&self_lines, "sha2::sha256::soft::compress") {
                let auth_n = auth / 100.0 * total;
                let adj = 100.0 * (auth_n - sha as f64).max(0.0) / (total - sha as f64);
                let _ = writeln!(
                    w,
                    "Caveat: valgrind's virtual CPU does not offer the SHA extensions, so under callgrind sha2 runs its \
                     portable SHA-256 (`sha2::sha256::soft::compress`, {:.1}% of all instructions by itself), while the \
                     native server uses the CPU's SHA-NI path (`sha2::sha256::x86::*`, see perf below). Counting the \
                     portable SHA-256 as free, JWT validation and extraction are **{adj:.1}%** of the instructions: the \
                     native share lies between that and {auth:.1}%, closer to the former.\n",
                    pct(sha)
                );
            }
            let _ = writeln!(w, "Top functions by inclusive instructions:\n");
            let _ = writeln!(w, "| share | function |\n|---:|---|");
            for (n, f) in inc_lines.iter().take(25) {
                let _ = writeln!(w, "| {:.1}% | `{}` |", pct(*n), f.replace('|', "\\|"));
            }
            let _ = writeln!(w, "\nTop functions by self instructions:\n");
            let _ = writeln!(w, "| share | function |\n|---:|---|");
            for (n, f) in self_lines.iter().take(25) {
                let _ = writeln!(w, "| {:.1}% | `{}` |", pct(*n), f.replace('|', "\\|"));
            }
            let mut by_crate: BTreeMap<&str, u64> = BTreeMap::new();
            for (n, f) in &self_lines {
                *by_crate.entry(crate_of(f)).or_default() += n;
            }
            let mut by_crate: Vec<_> = by_crate.into_iter().collect();
            by_crate.sort_by_key(|e| std::cmp::Reverse(e.1));
            let _ = writeln!(w, "\nSelf instructions by crate (functions above the annotate threshold):\n");
            let _ = writeln!(w, "| share | crate |\n|---:|---|");
            for (c, n) in by_crate.iter().take(20) {
                let _ = writeln!(w, "| {:.1}% | {c} |", pct(*n));
            }
            let _ = writeln!(w);
        }
        _ => {
            let _ = writeln!(w, "No callgrind profile was recorded in this run.\n");
        }
    }
    if let Ok(perf) = fs::read_to_string(dir.join("perf-report.txt")) {
        // `  12.34%  command  object  [.] symbol`
        let mut by_crate: BTreeMap<&str, f64> = BTreeMap::new();
        let mut top = Vec::new();
        for line in perf.lines() {
            let t = line.trim();
            let Some(p) =
                t.split_whitespace().next().and_then(|p| p.strip_suffix('%')).and_then(|p| p.parse::<f64>().ok())
            else {
                continue;
            };
            let kernel = t.contains("[k]");
            let sym = t.split_once("] ").map_or("", |(_, s)| s.trim());
            if top.len() < 20 {
                top.push((p, format!("{}{sym}", if kernel { "[kernel] " } else { "" })));
            }
            *by_crate.entry(if kernel { "kernel" } else { crate_of(sym) }).or_default() += p;
        }
        let jwt: f64 = ["jsonwebtoken", "sha2", "hmac", "base64"].iter().filter_map(|c| by_crate.get(c)).sum();
        let limiter: f64 = ["governor", "dashmap"].iter().filter_map(|c| by_crate.get(c)).sum();
        perf_jwt = Some(jwt);
        let mut by_crate: Vec<_> = by_crate.into_iter().collect();
        by_crate.sort_by(|a, b| b.1.total_cmp(&a.1));
        let _ = writeln!(w, "### perf (cpu-clock sampling at full rate, self time)\n");
        let _ = writeln!(
            w,
            "Self time in the JWT crates (jsonwebtoken, sha2, hmac, base64): **{jwt:.1}%** of the server's CPU samples, \
             kernel included; in the limiter crates (governor, dashmap): **{limiter:.1}%**. Self time leaves out what \
             these call into (malloc, memcpy, serde_json), which is why it reads lower than callgrind's inclusive share.\n"
        );
        let _ = writeln!(w, "{}\n", fs::read_to_string(dir.join("perf-note.txt")).unwrap_or_default().trim());
        let _ = writeln!(w, "| share | crate |\n|---:|---|");
        for (c, p) in by_crate.iter().take(20) {
            let _ = writeln!(w, "| {p:.1}% | {c} |");
        }
        let _ = writeln!(w, "\n| share | symbol |\n|---:|---|");
        for (p, s) in top {
            let _ = writeln!(w, "| {p:.1}% | `{}` |", s.replace('|', "\\|"));
        }
        let _ = writeln!(w);
    }
    Profile { text, shares, logging, perf_jwt }
}

/// `strace -c -f` summaries joined with the run they were taken during.
fn strace_section(dir: &std::path::Path, runs: &Runs) -> String {
    let mut out = String::new();
    let w = &mut out;
    let mut any = false;
    for server in ["tokengate", "reference"] {
        let Ok(text) = fs::read_to_string(dir.join(format!("strace-{server}.txt"))) else { continue };
        any = true;
        let chars = runs.of("strace", server).first().and_then(|r| r["chars_delivered"].as_f64());
        let mut total_calls = None;
        let mut rows = Vec::new();
        for line in text.lines() {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 5 || cols[0].starts_with('%') || cols[0].starts_with('-') {
                continue;
            }
            let name = cols[cols.len() - 1];
            // calls is the 4th column; errors (optional) the 5th.
            let Ok(calls) = cols[3].parse::<f64>() else { continue };
            if name == "total" {
                total_calls = Some(calls);
            } else {
                rows.push((calls, name.to_owned()));
            }
        }
        rows.sort_by(|a, b| b.0.total_cmp(&a.0));
        let per = |c: f64| chars.map_or("-".into(), |ch| format!("{:.3}", c / ch));
        let _ = writeln!(w, "**{server}** ({} chars delivered while traced):\n", opt(chars));
        let _ = writeln!(w, "| syscall | calls | per delivered char |\n|---|---:|---:|");
        for (c, n) in rows.iter().take(8) {
            let _ = writeln!(w, "| {n} | {} | {} |", group(*c as i64), per(*c));
        }
        if let Some(t) = total_calls {
            let _ = writeln!(w, "| **total** | {} | {} |", group(t as i64), per(t));
        }
        let _ = writeln!(w);
    }
    if any {
        let note = fs::read_to_string(dir.join("strace-note.txt")).unwrap_or_default();
        format!("{}\n\n{out}", note.trim())
    } else {
        "strace was not run.\n".into()
    }
}

#[cfg(test)]
mod tests {
    use super::{group, median, parse_annotate};

    #[test]
    fn medians_and_grouping() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![1.0, 2.0]), Some(1.5));
        assert_eq!(group(1234567), "1,234,567");
    }

    #[test]
    fn annotate_lines() {
        let text = "12,345,678 (100.0%)  PROGRAM TOTALS\n\
                    1,000 (50.00%)  ???:tokengate::auth::AuthConfig::authenticate [/x/tokengate]\n\
                    500  ???:<a as b>::c [/x]\n";
        let (total, lines) = parse_annotate(text);
        assert_eq!(total, Some(12_345_678));
        assert_eq!(lines[0], (1000, "tokengate::auth::AuthConfig::authenticate".to_owned()));
        assert_eq!(lines[1], (500, "<a as b>::c".to_owned()));
    }
}
