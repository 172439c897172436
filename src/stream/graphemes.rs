//! Incremental splitting of text into extended grapheme clusters.
//!
//! A generator may cut its chunks anywhere between code points, including
//! inside a cluster (between the parts of an emoji ZWJ sequence, before a
//! combining mark, between two regional indicators). Only the last cluster
//! of what has arrived can still grow, so it is held back until more text
//! shows where it ends, or the text ends.

use unicode_segmentation::UnicodeSegmentation;

/// Buffers the one cluster that may still be incomplete.
#[derive(Debug, Default)]
pub struct GraphemeSplitter {
    pending: String,
}

impl GraphemeSplitter {
    /// An empty splitter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a chunk and calls `emit` for every cluster now known complete.
    pub fn push(&mut self, chunk: &str, mut emit: impl FnMut(&str)) {
        if chunk.is_empty() {
            return;
        }
        self.pending.push_str(chunk);
        let last_start = match self.pending.grapheme_indices(true).next_back() {
            Some((i, _)) => i,
            None => return,
        };
        if last_start == 0 {
            return;
        }
        for g in self.pending[..last_start].graphemes(true) {
            emit(g);
        }
        self.pending.drain(..last_start);
    }

    /// Adds a chunk and returns the text now known to be whole clusters, in
    /// one piece (empty when none is complete yet). The engine takes the
    /// clusters from it one at a time ([`next_cluster`]), so a large chunk
    /// costs one buffer, not one allocation per cluster up front.
    pub fn push_complete(&mut self, chunk: &str) -> String {
        if chunk.is_empty() {
            return String::new();
        }
        self.pending.push_str(chunk);
        let last_start = match self.pending.grapheme_indices(true).next_back() {
            Some((i, _)) => i,
            None => return String::new(),
        };
        // The held-back cluster is copied out; the complete part keeps the
        // buffer.
        let held = self.pending.split_off(last_start);
        std::mem::replace(&mut self.pending, held)
    }

    /// The text ended: whatever is held back is complete.
    pub fn finish(&mut self) -> Option<String> {
        if self.pending.is_empty() { None } else { Some(std::mem::take(&mut self.pending)) }
    }
}

/// The first cluster of `text` (which starts at a cluster boundary), or
/// `None` when it is empty.
pub(super) fn next_cluster(text: &str) -> Option<&str> {
    text.graphemes(true).next()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn split_all(chunks: &[&str]) -> Vec<String> {
        let mut s = GraphemeSplitter::new();
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, |g| out.push(g.to_owned()));
        }
        out.extend(s.finish());
        // The lazy path (what the engine uses) splits the same way.
        let mut lazy = GraphemeSplitter::new();
        let mut again = Vec::new();
        let take = |mut text: &str, again: &mut Vec<String>| {
            while let Some(g) = next_cluster(text) {
                again.push(g.to_owned());
                text = &text[g.len()..];
            }
        };
        for c in chunks {
            let complete = lazy.push_complete(c);
            take(&complete, &mut again);
        }
        if let Some(rest) = lazy.finish() {
            take(&rest, &mut again);
        }
        assert_eq!(again, out, "lazy and eager splitting differ");
        out
    }

    #[test]
    fn zwj_sequence_cut_inside_stays_whole() {
        // 👩‍👩‍👧 = U+1F469 ZWJ U+1F469 ZWJ U+1F467, cut after the first ZWJ.
        let out = split_all(&["a👩\u{200D}", "👩\u{200D}👧b"]);
        assert_eq!(out, ["a", "👩\u{200D}👩\u{200D}👧", "b"]);
    }

    #[test]
    fn combining_mark_in_next_chunk_joins_its_base() {
        let out = split_all(&["cafe", "\u{301}!"]);
        assert_eq!(out, ["c", "a", "f", "e\u{301}", "!"]);
    }

    #[test]
    fn flags_cut_between_regional_indicators() {
        let out = split_all(&["🇯", "🇵🇫", "🇷"]);
        assert_eq!(out, ["🇯🇵", "🇫🇷"]);
    }

    #[test]
    fn crlf_is_one_cluster_even_when_cut() {
        let out = split_all(&["a\r", "\nb"]);
        assert_eq!(out, ["a", "\r\n", "b"]);
    }

    proptest! {
        /// Any text, cut at any char boundaries, gives the same clusters as
        /// splitting it whole, and they concatenate back to the text.
        #[test]
        fn chunking_never_changes_clusters(text in "\\PC{0,40}|[\\u{300}-\\u{36f}\\u{1F1E6}-\\u{1F1FF}\\u{200D}\\u{1F466}-\\u{1F469}a\r\n]{0,40}", cuts in proptest::collection::vec(0usize..64, 0..8)) {
            let chars: Vec<char> = text.chars().collect();
            let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c.min(chars.len())).collect();
            bounds.sort_unstable();
            let mut chunks = Vec::new();
            let mut prev = 0;
            for b in bounds.into_iter().chain([chars.len()]) {
                chunks.push(chars[prev..b].iter().collect::<String>());
                prev = b;
            }
            let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
            let out = split_all(&refs);
            let whole: Vec<String> = text.graphemes(true).map(str::to_owned).collect();
            prop_assert_eq!(&out, &whole);
            prop_assert_eq!(out.concat(), text);
        }
    }
}
