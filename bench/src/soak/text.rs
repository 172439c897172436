//! The hostile prompts the soak streams through the `echo` generator, and
//! the exact event sequence each one must come back as.
//!
//! Echo streams the prompt back unchanged, split into extended grapheme
//! clusters (UAX #29, the `unicode-segmentation` crate tokengate uses), one
//! `delta` per cluster. So the expected deltas are the prompt's clusters,
//! computed here with the same rules: a ZWJ family, a flag, a letter with
//! three combining marks or a CRLF is one delta, and pieces that merge when
//! put side by side (two regional indicators, CR then LF) merge here too.

use unicode_segmentation::UnicodeSegmentation;

use super::rng::Rng;

/// Building blocks, each chosen to break a naive implementation somewhere:
/// multi-byte UTF-8 (2, 3 and 4 bytes), clusters of several code points,
/// line ends inside the text (CR, LF, CRLF: an SSE `data:` line must never
/// carry one raw), JSON specials, and text that looks like SSE fields.
const PIECES: &[&str] = &[
    "a",
    "Z",
    "7",
    " ",
    ".",
    "\"",
    "\\",
    "{}",
    "data: x",
    "id: 9",
    ": comment",
    "é",
    "ß",
    "你",
    "好",
    "世界",
    "語",
    "\u{2070E}",                // CJK Extension B: 4 bytes in UTF-8
    "한국어",                   // precomposed Hangul syllables
    "\u{1100}\u{1161}\u{11A8}", // Hangul jamo L V T: one cluster
    "👩\u{200D}👩\u{200D}👧",   // ZWJ family
    "👨🏽\u{200D}💻",             // skin tone + ZWJ
    "🏳\u{FE0F}\u{200D}🌈",      // variation selector + ZWJ
    "🇯🇵",
    "🇫",                      // a lone regional indicator: pairs with the next one
    "e\u{301}",               // combining acute
    "a\u{308}\u{323}\u{30C}", // three combining marks
    "क्षि",                    // Devanagari conjunct
    "ภาษาไทย",
    "\r\n",
    "\n",
    "\r",
    "\t",
    "\u{200B}", // zero-width space
    "\u{FEFF}", // a BOM inside the text (only a leading one is special in SSE)
];

/// One prompt and the deltas it must produce, in order.
#[derive(Debug, Clone)]
pub struct Expected {
    /// The prompt as sent.
    pub prompt: String,
    /// Its extended grapheme clusters: delta `i` (seq `i + 1`) must be
    /// exactly `clusters[i]`.
    pub clusters: Vec<String>,
}

/// A prompt of `min..=max` pieces drawn from [`PIECES`]; never starts with a
/// piece that would merge into nothing before it (all of them are fine as
/// a first cluster) and never empty.
pub fn hostile(rng: &mut Rng, min: u64, max: u64) -> Expected {
    let n = rng.range(min.max(1), max.max(1));
    let mut prompt = String::new();
    for _ in 0..n {
        prompt.push_str(rng.pick(PIECES).copied().unwrap_or("x"));
    }
    let clusters = prompt.graphemes(true).map(str::to_owned).collect();
    Expected { prompt, clusters }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusters_rebuild_the_prompt_and_merge_across_pieces() {
        let mut rng = Rng::new(1, 0);
        for _ in 0..200 {
            let e = hostile(&mut rng, 5, 40);
            assert_eq!(e.clusters.concat(), e.prompt);
            assert!(!e.clusters.is_empty());
        }
        let g: Vec<&str> = "\r\n🇫🇯🇵e\u{301}".graphemes(true).collect();
        assert_eq!(g, ["\r\n", "🇫🇯", "🇵", "e\u{301}"]);
    }
}
