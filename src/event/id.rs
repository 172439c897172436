//! Stream ids: 128 random bits, so a stream cannot be guessed or enumerated.

use std::fmt;

/// A stream's id: 128 bits from the OS RNG, shown as 32 lowercase hex digits
/// (URL-safe and free of `.`, which separates the id from the sequence
/// number in event ids).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamId([u8; 16]);

impl StreamId {
    /// A fresh random id. Falls back to nothing weaker: if the OS RNG fails
    /// the process cannot keep its promises about unguessable ids.
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)?;
        Ok(Self(bytes))
    }

    /// Parses the 32-hex-digit form.
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() != 32 {
            return None;
        }
        let mut bytes = [0u8; 16];
        hex::decode_to_slice(s, &mut bytes).ok()?;
        Some(Self(bytes))
    }
}

impl StreamId {
    /// The 32 hex digits, without allocating (used once per event).
    pub fn to_hex(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        // 16 bytes always fit 32 hex digits.
        let _ = hex::encode_to_slice(self.0, &mut out);
        out
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = self.to_hex();
        f.write_str(std::str::from_utf8(&hex).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_and_round_trip() {
        let a = StreamId::random().unwrap_or(StreamId([0; 16]));
        let b = StreamId::random().unwrap_or(StreamId([0; 16]));
        assert_ne!(a, b);
        assert_eq!(a.to_string().len(), 32);
        assert_eq!(StreamId::parse(&a.to_string()), Some(a));
        assert_eq!(StreamId::parse("xyz"), None);
    }
}
