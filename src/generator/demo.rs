//! `demo`: streams one of the texts in `prompts/`, chosen deterministically
//! from the prompt, in small token-like chunks, as an LLM would.
//!
//! The shipped texts are compiled in, so the binary works from any
//! directory; `--prompts-dir` replaces them with the `*.txt` files of a
//! directory.

use std::path::Path;

use futures_util::stream;

use super::{Chunk, GenerateRequest, Generator, TextStream};

/// One demo text and the name (file stem) that selects it directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// File stem, e.g. `emoji`.
    pub name: String,
    /// The full text.
    pub text: String,
}

const SHIPPED: &[(&str, &str)] = &[
    ("chinese", include_str!("../../prompts/chinese.txt")),
    ("combining", include_str!("../../prompts/combining.txt")),
    ("emoji", include_str!("../../prompts/emoji.txt")),
    ("english", include_str!("../../prompts/english.txt")),
    ("mixed", include_str!("../../prompts/mixed.txt")),
];

/// Picks a text by prompt: a prompt equal to a text's name (ignoring case and
/// surrounding space) selects it, any other prompt is hashed (FNV-1a, stable
/// across runs and platforms) onto the list.
#[derive(Debug, Clone)]
pub struct DemoGenerator {
    prompts: Vec<Prompt>,
}

impl DemoGenerator {
    /// The texts shipped in the binary.
    pub fn shipped() -> Self {
        Self {
            prompts: SHIPPED
                .iter()
                .map(|(name, text)| Prompt { name: (*name).to_owned(), text: (*text).to_owned() })
                .collect(),
        }
    }

    /// The `*.txt` files of `dir`, sorted by name; errors if there are none.
    pub fn from_dir(dir: &Path) -> std::io::Result<Self> {
        let mut prompts = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "txt") {
                let text = std::fs::read_to_string(&path)?;
                let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                prompts.push(Prompt { name, text });
            }
        }
        if prompts.is_empty() {
            return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no *.txt files"));
        }
        prompts.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self { prompts })
    }

    /// The texts this generator chooses from.
    pub fn prompts(&self) -> &[Prompt] {
        &self.prompts
    }

    /// The text a prompt selects.
    pub fn choose(&self, prompt: &str) -> &Prompt {
        let key = prompt.trim();
        if let Some(p) = self.prompts.iter().find(|p| p.name.eq_ignore_ascii_case(key)) {
            return p;
        }
        let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        // `prompts` is never empty (both constructors guarantee it).
        &self.prompts[(hash % self.prompts.len() as u64) as usize]
    }
}

impl Generator for DemoGenerator {
    fn description(&self) -> &str {
        "Streams one of the shipped demo texts (Chinese, emoji, combining marks, ...)"
    }

    fn generate(&self, request: GenerateRequest) -> TextStream {
        let text = self.choose(request.effective_prompt()).text.clone();
        Box::pin(stream::iter(token_like_chunks(&text).into_iter().map(|c| Ok(Chunk::Text(c)))))
    }
}

/// Cuts text into chunks of 1 to 4 chars (cycling), like an LLM's tokens.
/// The cuts ignore grapheme boundaries on purpose: the engine must cope.
fn token_like_chunks(text: &str) -> Vec<String> {
    let mut chunks = Vec::new();
    let mut current = String::new();
    let mut size = 1;
    for ch in text.chars() {
        current.push(ch);
        if current.chars().count() == size {
            chunks.push(std::mem::take(&mut current));
            size = size % 4 + 1;
        }
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_is_deterministic_and_by_name() {
        let d = DemoGenerator::shipped();
        assert_eq!(d.choose(" Emoji ").name, "emoji");
        assert_eq!(d.choose("hello there"), d.choose("hello there"));
        // Different prompts reach more than one text.
        let names: std::collections::BTreeSet<_> = (0..50).map(|i| d.choose(&format!("q{i}")).name.clone()).collect();
        assert!(names.len() > 1);
    }

    #[test]
    fn chunks_reassemble_exactly() {
        for p in DemoGenerator::shipped().prompts() {
            assert_eq!(token_like_chunks(&p.text).concat(), p.text);
        }
    }
}
