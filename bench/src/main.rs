//! tokengate's benchmark harness: one binary, nine subcommands.
//!
//! - `loadgen`: the load generator (modes `stream`, `idle`, `fanout`,
//!   `proxy`, `opens`, `llm`, and the abuse modes `loris`, `slowbody`,
//!   `stalled`); prints one JSON object per run on stdout and a human
//!   summary on stderr.
//! - `reference`: the comparison server, written the simplest idiomatic way
//!   (axum `Sse` + `KeepAlive`, one event per character, a tokio `interval`
//!   for pacing, a tokio `broadcast` channel for fan-out; no auth).
//! - `ceiling`: the paced floor, one task, one timer and one write per
//!   character, no HTTP framing (scenario 2h).
//! - `mock-upstream`: a local OpenAI-compatible chat completions server that
//!   streams the last user message back, one character per chunk, or (with
//!   `--mode llm`) answers like a model server: fixed-size tokens at a
//!   fixed rate.
//! - `naive-proxy`: the LLM-shaped scenario's baseline, the hand-written
//!   proxy (reqwest, an SSE parser, axum `Sse`, one event per upstream
//!   chunk; no auth, no log).
//! - `report`: turns the collected JSON lines into BENCHMARKS.md.
//! - `llm-report`: writes the LLM-shaped scenario's section of BENCHMARKS.md
//!   (a delimited block below the notes marker, which `report` keeps).
//! - `abuse-report`: writes the abuse scenarios' section of BENCHMARKS.md
//!   (below the notes marker, one block per scenario).
//! - `soak`: the chaos soak (two replicas, Redis, disconnects, kills, a
//!   drain, a Redis restart); one summary line, non-zero exit on failure.
//!
//! `scripts/bench.sh` drives all of it.

mod ceiling;
mod client;
mod llm_report;
mod loadgen;
mod mock;
mod naive_proxy;
mod procfs;
mod reference;
mod report;
mod soak;
mod stats;
mod text;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "tokengate-bench", about = "tokengate's benchmark harness")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate load against tokengate, the reference server or an
    /// OpenAI-compatible server and report JSON.
    Loadgen(loadgen::Args),
    /// Run the reference server (axum Sse, no auth).
    Reference(reference::Args),
    /// Run the paced ceiling: one task, one timer, one write per character.
    Ceiling(ceiling::Args),
    /// Run the mock OpenAI-compatible upstream.
    MockUpstream(mock::Args),
    /// Run the naive hand-written proxy (reqwest + SSE parser + axum Sse).
    NaiveProxy(naive_proxy::Args),
    /// Write BENCHMARKS.md from collected results.
    Report(report::Args),
    /// Write the LLM-shaped scenario's section of BENCHMARKS.md.
    LlmReport(llm_report::Args),
    /// Write the abuse scenarios' blocks of BENCHMARKS.md.
    AbuseReport(loadgen::abuse::report::Args),
    /// Chaos soak: two replicas and Redis under disconnects, kills, a
    /// drain and a Redis restart; every stream verified.
    Soak(soak::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Loadgen(args) => loadgen::main(args),
        Command::Reference(args) => reference::main(args),
        Command::Ceiling(args) => ceiling::main(args),
        Command::MockUpstream(args) => mock::main(args),
        Command::NaiveProxy(args) => naive_proxy::main(args),
        Command::Report(args) => report::main(args),
        Command::LlmReport(args) => llm_report::main(args),
        Command::AbuseReport(args) => loadgen::abuse::report::main(args),
        Command::Soak(args) => soak::main(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokengate-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Errors are reported as text; this is a harness, not a library.
pub type Result<T, E = Box<dyn std::error::Error + Send + Sync>> = std::result::Result<T, E>;

/// The multi-threaded runtime every server of the harness runs on:
/// `threads` workers, or one per core when 0.
pub fn server_runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        builder.worker_threads(threads);
    }
    builder.enable_all().build()
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard).
pub fn raise_nofile() -> (u64, u64) {
    if let Ok((_, hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
        let _ = rlimit::increase_nofile_limit(hard);
    }
    rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((0, 0))
}
