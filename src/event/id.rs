//! Stream ids: 128 random bits, so a stream cannot be guessed or enumerated.

use std::cell::RefCell;
use std::fmt;

/// Bytes of OS randomness fetched at a time per thread: one `getrandom`
/// call for 32 ids instead of one per id (two per stream open, with the
/// request id, were a syscall each).
const RANDOM_BATCH: usize = 512;

/// This thread's unused OS random bytes. Each byte is handed out once and
/// zeroed as it is taken, so no id can be read back from memory later.
struct RandomPool {
    bytes: [u8; RANDOM_BATCH],
    taken: usize,
}

thread_local! {
    static POOL: RefCell<RandomPool> = const { RefCell::new(RandomPool { bytes: [0; RANDOM_BATCH], taken: RANDOM_BATCH }) };
}

/// Fills `out` from the OS RNG, through this thread's pool.
fn fill_random(out: &mut [u8]) -> Result<(), getrandom::Error> {
    if out.len() > RANDOM_BATCH {
        return getrandom::fill(out);
    }
    // A thread being torn down has no pool any more: straight to the OS.
    let pooled = POOL.try_with(|pool| {
        let mut pool = pool.borrow_mut();
        if RANDOM_BATCH - pool.taken < out.len() {
            getrandom::fill(&mut pool.bytes)?;
            pool.taken = 0;
        }
        let start = pool.taken;
        let taken = &mut pool.bytes[start..start + out.len()];
        out.copy_from_slice(taken);
        taken.fill(0);
        pool.taken += out.len();
        Ok(())
    });
    pooled.unwrap_or_else(|_| getrandom::fill(out))
}

/// A stream's id: 128 bits from the OS RNG, shown as 32 lowercase hex digits
/// (URL-safe and free of `.`, which separates the id from the sequence
/// number in event ids).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamId([u8; 16]);

impl StreamId {
    /// A fresh random id, from the OS RNG (fetched in batches per thread).
    /// Falls back to nothing weaker: if the OS RNG fails the process cannot
    /// keep its promises about unguessable ids.
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; 16];
        fill_random(&mut bytes)?;
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
    fn pooled_random_bytes_are_handed_out_once_and_wiped() {
        let ids: Vec<StreamId> = (0..RANDOM_BATCH).filter_map(|_| StreamId::random().ok()).collect();
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), RANDOM_BATCH, "ids across several refills are distinct");
        POOL.with_borrow(|pool| assert!(pool.bytes[..pool.taken].iter().all(|b| *b == 0), "taken bytes are zeroed"));
        let mut large = [0u8; RANDOM_BATCH + 1];
        assert!(fill_random(&mut large).is_ok() && large.iter().any(|b| *b != 0), "larger requests go to the OS");
    }

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
