//! The command line: global settings (shared with env and TOML, see
//! [`crate::config`]) and the subcommands.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{ConfigError, Settings};

/// tokengate: a token streaming gateway (JWT-authenticated Server-Sent
/// Events, one grapheme cluster per event).
#[derive(Debug, Parser)]
#[command(name = "tokengate", version, about)]
pub struct Cli {
    /// TOML file with settings (flags and TOKENGATE_* variables override it).
    #[arg(long, global = true, env = "TOKENGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Settings.
    #[command(flatten)]
    pub settings: Settings,
    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Exit 0 when the server on the configured address answers
    /// `/readyz` (for container health checks; no curl needed).
    Healthcheck {
        /// Path to probe.
        #[arg(long, default_value = "/readyz")]
        path: String,
    },
    /// Print a token signed with the configured key.
    Token {
        /// Subject (`sub` claim).
        #[arg(long)]
        sub: String,
        /// Space-separated scopes: stream, publish, admin.
        #[arg(long, default_value = "stream")]
        scope: String,
        /// Lifetime, e.g. `1h`, `30m`, `7d`.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
}

impl Cli {
    /// Flags and env (already merged by clap, flags first) over the file.
    pub fn effective_settings(&self) -> Result<Settings, ConfigError> {
        let file = match &self.config {
            Some(path) => Settings::from_toml_file(path)?,
            None => Settings::default(),
        };
        Ok(self.settings.clone().or(file))
    }
}
