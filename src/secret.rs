//! [`Secret`]: bytes that must never reach a log. Its own module because
//! secrets are held by several layers (the JWT key in `auth`, the Redis URL
//! in `config`, upstream API keys in `generator`), none of which should
//! import another just for this wrapper.

use std::fmt;

/// Bytes that must never be printed: `Debug` shows only the length.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps secret bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The bytes, for the one place that needs them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret([redacted; {} bytes])", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_the_length_only() {
        let secret = Secret::new(b"hunter2-hunter2".to_vec());
        assert_eq!(format!("{secret:?}"), "Secret([redacted; 15 bytes])");
        assert_eq!(secret.expose(), b"hunter2-hunter2");
    }
}
