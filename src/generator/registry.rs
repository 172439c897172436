//! The set of generators a server offers, by name, with their pacing, and
//! the built-in set a server starts with.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::upstream::Upstream;
use super::{DemoGenerator, EchoGenerator, Generator, OpenAiGenerator};

/// A registered generator and its default pace.
#[derive(Clone)]
pub struct Entry {
    /// The text source.
    pub generator: Arc<dyn Generator>,
    /// Default time between deltas for this generator.
    pub pace: Duration,
}

/// Generators by name. Names are what requests put in `generator` (and
/// later `model`); iteration is in name order so listings are stable.
#[derive(Clone, Default)]
pub struct Registry {
    entries: BTreeMap<String, Entry>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a generator under `name`.
    pub fn register(&mut self, name: impl Into<String>, generator: Arc<dyn Generator>, pace: Duration) {
        self.entries.insert(name.into(), Entry { generator, pace });
    }

    /// Looks a generator up by name.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    /// Changes the default pace of a registered generator; false if unknown.
    pub fn set_pace(&mut self, name: &str, pace: Duration) -> bool {
        match self.entries.get_mut(name) {
            Some(entry) => {
                entry.pace = pace;
                true
            }
            None => false,
        }
    }

    /// Registered names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    /// Name and entry pairs, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }
}

/// Why the built-in generators cannot be set up. The caller knows which
/// setting each input came from and names it.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The demo texts directory cannot be read.
    #[error("{}: {source}", dir.display())]
    PromptsDir {
        /// The directory.
        dir: PathBuf,
        /// Why not.
        source: std::io::Error,
    },
    /// An upstream's HTTP client cannot be built (TLS roots, say).
    #[error("upstream `{upstream}`: {source}")]
    Client {
        /// The upstream's name.
        upstream: String,
        /// reqwest's reason.
        source: reqwest::Error,
    },
    /// Two upstreams (names or aliases) claim the same generator name, or
    /// one claims `demo`/`echo`: a request naming it would be ambiguous.
    #[error("the name `{0}` is used twice")]
    NameTaken(String),
}

/// The built-in generators (`demo` with the texts in `prompts_dir`, or the
/// shipped ones; `echo`), both at `default_pace`, and one `openai` generator
/// per upstream under its name and each alias. `upstreams` are validated
/// ones, so every fallback names one of them.
pub fn builtin_generators(
    prompts_dir: Option<&Path>,
    default_pace: Duration,
    upstreams: &[Upstream],
) -> Result<Registry, RegistryError> {
    let demo = match prompts_dir {
        Some(dir) => {
            DemoGenerator::from_dir(dir).map_err(|source| RegistryError::PromptsDir { dir: dir.to_owned(), source })?
        }
        None => DemoGenerator::shipped(),
    };
    let mut registry = Registry::new();
    registry.register("demo", Arc::new(demo), default_pace);
    registry.register("echo", Arc::new(EchoGenerator), default_pace);
    // One shared `Arc` per upstream, so a chain that falls back to it holds
    // the same one its own generator does.
    let by_name: HashMap<&str, Arc<Upstream>> =
        upstreams.iter().map(|u| (u.name.as_str(), Arc::new(u.clone()))).collect();
    for upstream in upstreams {
        let primary = by_name.get(upstream.name.as_str()).cloned().unwrap_or_else(|| Arc::new(upstream.clone()));
        let fallbacks = upstream.fallbacks.iter().filter_map(|f| by_name.get(f.as_str()).cloned()).collect();
        let generator: Arc<dyn Generator> = Arc::new(
            OpenAiGenerator::new(primary, fallbacks)
                .map_err(|source| RegistryError::Client { upstream: upstream.name.clone(), source })?,
        );
        // Model servers are not paced unless asked: every delay is latency.
        let pace = upstream.pace.unwrap_or(Duration::ZERO);
        for name in std::iter::once(&upstream.name).chain(&upstream.aliases) {
            if registry.get(name).is_some() {
                return Err(RegistryError::NameTaken(name.clone()));
            }
            registry.register(name.clone(), generator.clone(), pace);
        }
    }
    Ok(registry)
}
