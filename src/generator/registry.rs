//! The set of generators a server offers, by name, with their pacing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::Generator;

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
