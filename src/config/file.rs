//! The TOML file: the settings grouped in sections by concern, read into
//! the same flat [`Settings`] that flags and env fill.
//!
//! ```toml
//! [server]                  # or at the top level
//! listen = "0.0.0.0:8080"
//! [auth]
//! jwt_secret_file = "/etc/tokengate/secret"
//! [limits]
//! max_streams = 10000
//! [stream]
//! pace_ms = 20
//! [store]
//! redis_url = "redis://redis:6379/0"
//! [upstreams.local]
//! base_url = "http://127.0.0.1:8000/v1"
//! model = "llama3.1"
//! ```
//!
//! Keys keep their flat names inside a section (`[limits] max_streams`, not
//! `[limits] streams`), so a setting has one name in flags, env and file.
//! Every key is also accepted at the top level, which is how files were
//! written before sections existed; a key given both ways is refused rather
//! than one silently winning. A key in the wrong section is refused with a
//! hint naming the right one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ConfigError, Settings};
use crate::generator::upstream::UpstreamSettings;
use crate::quota::plan::QuotaSettings;

/// Declares the sections once: each becomes a `deny_unknown_fields` struct
/// (so a stray key is a parse error with its line and column), the file
/// struct gets each key once more at the top level, and
/// `File::into_settings` builds [`Settings`] with a struct literal that has
/// no `..` — so a setting missing here, or listed in two sections, does not
/// compile.
macro_rules! sections {
    ($($section:ident: $Section:ident { $($key:ident: $ty:ty),* $(,)? })*) => {
        $(
            #[derive(Debug, Default, Deserialize)]
            #[serde(deny_unknown_fields)]
            struct $Section {
                $($key: Option<$ty>,)*
            }
        )*

        /// The file as written.
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            $(
                #[serde(default)]
                $section: $Section,
            )*
            upstreams: Option<BTreeMap<String, UpstreamSettings>>,
            quota: Option<QuotaSettings>,
            $($($key: Option<$ty>,)*)*
        }

        impl File {
            fn into_settings(self) -> Result<Settings, String> {
                Ok(Settings {
                    $($($key: once(stringify!($key), stringify!($section), self.$key, self.$section.$key)?,)*)*
                    upstreams: self.upstreams,
                    quota: self.quota,
                })
            }
        }

        /// Each section's name and keys, for the wrong-section hint.
        const SECTIONS: &[(&str, &[&str])] = &[$((stringify!($section), &[$(stringify!($key)),*]),)*];
    };
}

sections! {
    server: ServerSection {
        listen: String,
        listen_backlog: u32,
        cors_origins: Vec<String>,
        log_format: String,
        shutdown_grace: String,
        shutdown_retry: String,
        tls_cert: PathBuf,
        tls_key: PathBuf,
        tls_reload_interval: String,
        h2c: bool,
        max_concurrent_streams: u32,
    }
    auth: AuthSection {
        jwt_secret: String,
        jwt_secret_file: PathBuf,
        jwt_public_key_file: PathBuf,
        jwt_private_key_file: PathBuf,
        jwt_algorithms: Vec<String>,
        jwt_issuer: String,
        jwt_audience: String,
        jwt_leeway: String,
        token_cookie: String,
        token_query: String,
        token_grace: String,
        jwks_url: String,
        jwks_file: PathBuf,
        jwks_refresh: String,
        jwks_refresh_min: String,
        jwks_refresh_max: String,
        ticket_query: String,
        ticket_ttl: String,
    }
    limits: LimitsSection {
        rate_subject_per_min: u32,
        rate_subject_burst: u32,
        rate_ip_per_min: u32,
        rate_ip_burst: u32,
        trusted_proxies: Vec<String>,
        max_streams: usize,
        max_streams_per_subject: usize,
        send_queue: usize,
        max_lag: String,
        max_body_bytes: usize,
        max_prompt_bytes: usize,
        max_messages: usize,
        max_stream_duration: String,
        max_header_bytes: usize,
        header_timeout: String,
        body_timeout: String,
        max_connections: usize,
        send_buffer_bytes: usize,
        limits_on_store_failure: String,
        stream_lease_ttl: String,
        max_channels: usize,
        max_channels_per_subject: usize,
    }
    stream: StreamSection {
        heartbeat: String,
        retry: String,
        pace_ms: u32,
        pace_min_ms: u32,
        pace_max_ms: u32,
        generator_pace: Vec<String>,
        default_generator: String,
        demo_feeds: bool,
        demo_feeds_every: String,
        prompts_dir: PathBuf,
        openai_chunk_graphemes: usize,
        upstream_url: String,
        upstream_model: String,
        upstream_api_key_env: String,
    }
    store: StoreSection {
        redis_url: String,
        redis_ca_file: PathBuf,
        detach_grace: String,
        stream_ttl: String,
        stream_max_events: usize,
        replication_window: String,
        channel_max_events: usize,
        channel_ttl: String,
        max_publish_bytes: usize,
    }
}

/// A key's value, from the top level or from its section, not both.
fn once<T>(key: &str, section: &str, top: Option<T>, sectioned: Option<T>) -> Result<Option<T>, String> {
    match (top, sectioned) {
        (Some(_), Some(_)) => Err(format!("`{key}` is set both at the top level and in [{section}]; keep one")),
        (top, sectioned) => Ok(top.or(sectioned)),
    }
}

/// The section a key belongs in, if it is a setting at all.
fn section_of(key: &str) -> Option<&'static str> {
    SECTIONS.iter().find(|(_, keys)| keys.contains(&key)).map(|(section, _)| *section)
}

/// serde names an unknown key but cannot know it is a real setting in the
/// wrong section; this adds that, which is the likely mistake.
fn hint(error: &toml::de::Error) -> Option<String> {
    let rest = error.message().strip_prefix("unknown field `")?;
    let key = &rest[..rest.find('`')?];
    section_of(key).map(|section| format!("`{key}` belongs in [{section}] (or at the top level)"))
}

/// Reads settings from the text of the TOML file at `path` (named in errors).
pub(super) fn parse(path: &Path, text: &str) -> Result<Settings, ConfigError> {
    let invalid = |reason: String| ConfigError::invalid("config", format!("{}: {reason}", path.display()));
    let file: File = toml::from_str(text).map_err(|e| {
        let mut reason = e.to_string().trim_end().to_owned();
        if let Some(hint) = hint(&e) {
            reason.push('\n');
            reason.push_str(&hint);
        }
        invalid(reason)
    })?;
    file.into_settings().map_err(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Settings, String> {
        parse(Path::new("test.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn a_sectioned_file_reads_like_the_flat_one() {
        let sectioned = parse_str(
            r#"
            [server]
            listen = "0.0.0.0:9000"
            log_format = "json"
            [auth]
            jwt_issuer = "https://auth.example.com"
            [limits]
            max_streams = 10
            trusted_proxies = ["10.0.0.0/8"]
            [stream]
            pace_ms = 5
            generator_pace = ["echo=0"]
            [store]
            stream_ttl = "1m"
            [upstreams.local]
            base_url = "http://127.0.0.1:8000/v1"
            model = "m"
            "#,
        );
        let flat = parse_str(
            r#"
            listen = "0.0.0.0:9000"
            log_format = "json"
            jwt_issuer = "https://auth.example.com"
            max_streams = 10
            trusted_proxies = ["10.0.0.0/8"]
            pace_ms = 5
            generator_pace = ["echo=0"]
            stream_ttl = "1m"
            [upstreams.local]
            base_url = "http://127.0.0.1:8000/v1"
            model = "m"
            "#,
        );
        // Settings has no PartialEq (UpstreamSettings neither): compare the
        // Debug forms, which show every field.
        let (sectioned, flat) = (format!("{sectioned:?}"), format!("{flat:?}"));
        assert_eq!(sectioned, flat);
        assert!(sectioned.starts_with("Ok("), "{sectioned}");
        for wanted in ["0.0.0.0:9000", "max_streams: Some(10)", "pace_ms: Some(5)", "\"1m\"", "\"local\""] {
            assert!(sectioned.contains(wanted), "{wanted} missing: {sectioned}");
        }
    }

    #[test]
    fn a_key_in_the_wrong_section_is_refused_with_the_right_one() {
        let err = parse_str("[auth]\nmax_streams = 10\n").err().unwrap_or_default();
        assert!(err.contains("`config`"), "{err}");
        assert!(err.contains("unknown field `max_streams`"), "{err}");
        assert!(err.contains("line 2"), "the position is kept: {err}");
        assert!(err.contains("`max_streams` belongs in [limits]"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused_in_sections_and_at_the_top() {
        let err = parse_str("[limits]\nmax_stream = 10\n").err().unwrap_or_default();
        assert!(err.contains("unknown field `max_stream`") && !err.contains("belongs in"), "{err}");
        let err = parse_str("lisen = \"x\"\n").err().unwrap_or_default();
        assert!(err.contains("unknown field `lisen`"), "{err}");
        let err = parse_str("[limit]\nmax_streams = 10\n").err().unwrap_or_default();
        assert!(err.contains("unknown field `limit`"), "{err}");
    }

    #[test]
    fn a_key_both_at_the_top_and_in_its_section_is_refused() {
        let err = parse_str("pace_ms = 1\n[stream]\npace_ms = 2\n").err().unwrap_or_default();
        assert!(err.contains("`pace_ms` is set both at the top level and in [stream]"), "{err}");
    }

    #[test]
    fn every_flag_belongs_to_exactly_one_section() {
        // The struct literal in `into_settings` already makes every field
        // appear exactly once; this checks the hint table says the same.
        let command = <Settings as clap::Args>::augment_args(clap::Command::new("t"));
        let flags: Vec<&str> = command.get_arguments().map(|a| a.get_id().as_str()).collect();
        for flag in &flags {
            let sections: Vec<_> = SECTIONS.iter().filter(|(_, keys)| keys.contains(flag)).collect();
            assert_eq!(sections.len(), 1, "`{flag}` is in {} sections", sections.len());
        }
        let listed: usize = SECTIONS.iter().map(|(_, keys)| keys.len()).sum();
        assert_eq!(listed, flags.len());
    }
}
