//! The text of one delta: one grapheme cluster, which is almost always a few
//! bytes. Held inline up to [`INLINE`] bytes, so that producing, logging
//! and replaying a delta allocates nothing for its text: a `String` per
//! delta was two of the three heap allocations every character cost (one
//! made by the engine, one when a reader rebuilt the event from the log).
//! Longer clusters (long emoji sequences, or whatever an upstream sends as
//! one cluster) go to the heap.

use std::fmt;
use std::ops::Deref;

/// Bytes held inline: the size of a `String`, less the length byte and the
/// variant's tag.
const INLINE: usize = 22;

/// The text of a delta (see the module docs). Reads as a `str`.
#[derive(Clone)]
pub struct DeltaText(Repr);

#[derive(Clone)]
enum Repr {
    /// `len` bytes of UTF-8 at the start of `bytes`; the rest are zero.
    Inline {
        len: u8,
        bytes: [u8; INLINE],
    },
    Heap(Box<str>),
}

impl DeltaText {
    /// The text as a `str`.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Only ever filled from a `str`, at a char boundary: never
            // fails (and an empty string would be the harmless answer).
            Repr::Inline { len, bytes } => std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default(),
            Repr::Heap(text) => text,
        }
    }
}

impl From<&str> for DeltaText {
    fn from(text: &str) -> Self {
        if text.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..text.len()].copy_from_slice(text.as_bytes());
            // Fits in a u8: at most INLINE.
            Self(Repr::Inline { len: text.len() as u8, bytes })
        } else {
            Self(Repr::Heap(text.into()))
        }
    }
}

impl From<String> for DeltaText {
    fn from(text: String) -> Self {
        if text.len() <= INLINE { Self::from(text.as_str()) } else { Self(Repr::Heap(text.into_boxed_str())) }
    }
}

impl Deref for DeltaText {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for DeltaText {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for DeltaText {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for DeltaText {}

impl PartialEq<str> for DeltaText {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for DeltaText {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Debug for DeltaText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for DeltaText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_texts_read_back_the_same() {
        for text in ["", "a", "é", "你", "e\u{301}", "🇫🇷", "👩‍👩‍👧", "👩‍👩‍👧‍👦", &"x".repeat(INLINE), &"y".repeat(INLINE + 1)]
        {
            let from_str = DeltaText::from(text);
            let from_string = DeltaText::from(text.to_owned());
            assert_eq!(from_str.as_str(), text);
            assert_eq!(from_string, from_str);
            assert_eq!(&*from_string, text);
            assert_eq!(format!("{from_str}"), text);
            assert_eq!(format!("{from_str:?}"), format!("{text:?}"));
            let inline = matches!(from_str.0, Repr::Inline { .. });
            assert_eq!(inline, text.len() <= INLINE, "{text}");
        }
        assert_eq!(std::mem::size_of::<DeltaText>(), std::mem::size_of::<String>());
    }
}
