//! [`CompactLog`]: one stream's events as the text once plus where each
//! event ends. A stream of N characters is N delta events; kept as
//! `Arc<StreamEvent>`s that is about 165 bytes per character (the `Arc`
//! box, the enum, a heap string per cluster and the queue slot), which for a
//! finished stream kept resumable for `stream_ttl` is nearly all of its
//! memory. Here a delta costs its UTF-8 bytes plus a 4-byte offset; the rare
//! other events (start, the terminal event) are kept whole. Events are
//! rebuilt on read, with the same id and sequence number they were
//! appended with, so readers cannot tell the difference.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::event::{StreamEvent, StreamId};

/// Bytes dropped from the front of the text before they are given back
/// (below this, or below half the buffer, dropping an event is O(1)).
const DRAIN_AT: usize = 4096;

/// A bounded log of one stream's events, stored compactly.
#[derive(Debug)]
pub(super) struct CompactLog {
    stream_id: StreamId,
    /// Every retained delta's text, in order, from byte `front` on.
    text: String,
    /// Where the retained text starts (bytes before it belong to dropped
    /// events and are given back in bulk).
    front: usize,
    /// Where each retained event's text ends in `text`: event `first_seq +
    /// i` spans `ends[i - 1]..ends[i]` (from `front` for the first). Events
    /// that are not deltas span nothing.
    ends: VecDeque<u32>,
    /// The retained events that are not deltas, by sequence number (start
    /// and terminal: at most a few).
    others: Vec<(u64, Arc<StreamEvent>)>,
    /// Sequence number of the oldest retained event.
    first_seq: u64,
}

impl CompactLog {
    /// An empty log of stream `stream_id`.
    pub(super) fn new(stream_id: StreamId) -> Self {
        Self { stream_id, text: String::new(), front: 0, ends: VecDeque::new(), others: Vec::new(), first_seq: 0 }
    }

    /// Sequence number of the oldest retained event.
    pub(super) fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// The next sequence number to be appended.
    pub(super) fn next_seq(&self) -> u64 {
        self.first_seq + self.ends.len() as u64
    }

    /// Retained events.
    pub(super) fn len(&self) -> usize {
        self.ends.len()
    }

    /// Appends the next event. Deltas are copied into the text; other
    /// events are kept as `shared` when given (the caller's own `Arc`),
    /// else cloned once.
    pub(super) fn push(&mut self, event: &StreamEvent, shared: Option<&Arc<StreamEvent>>) {
        let seq = self.next_seq();
        match event {
            StreamEvent::Delta { text, .. } => {
                // An offset is 4 bytes; a log whose retained text would not
                // fit drops its oldest events first (resuming before them is
                // a gap, as with any trimmed event). Only a pathological
                // upstream (gigabytes in 20,000 clusters) gets here.
                while !self.ends.is_empty() && self.text.len() - self.front + text.len() > u32::MAX as usize {
                    self.pop_front();
                }
                if self.text.len() + text.len() > u32::MAX as usize {
                    self.give_back(true);
                }
                self.text.push_str(text);
            }
            other => {
                let kept = shared.cloned().unwrap_or_else(|| Arc::new(other.clone()));
                self.others.push((seq, kept));
            }
        }
        // Fits: the text was trimmed to below 4 GiB just above.
        self.ends.push_back(u32::try_from(self.text.len()).unwrap_or(u32::MAX));
    }

    /// Drops the oldest event.
    pub(super) fn pop_front(&mut self) {
        let Some(end) = self.ends.pop_front() else { return };
        self.front = end as usize;
        self.first_seq += 1;
        let first = self.first_seq;
        self.others.retain(|(seq, _)| *seq >= first);
        self.give_back(false);
    }

    /// Gives back the text of dropped events once it is most of the buffer
    /// (or now, with `force`), shifting the offsets: amortised O(1) per
    /// dropped event.
    fn give_back(&mut self, force: bool) {
        if self.front == 0 || (!force && (self.front < DRAIN_AT || self.front * 2 < self.text.len())) {
            return;
        }
        self.text.drain(..self.front);
        let front = self.front as u32;
        for end in &mut self.ends {
            *end -= front;
        }
        self.front = 0;
    }

    /// Releases spare capacity (the stream is finished: nothing more comes).
    pub(super) fn shrink(&mut self) {
        self.give_back(true);
        self.text.shrink_to_fit();
        self.ends.shrink_to_fit();
        self.others.shrink_to_fit();
    }

    /// Adds events `from..` (at most `max`) to `out`, rebuilt; `from` must
    /// be at or after [`Self::first_seq`].
    pub(super) fn read(&self, from: u64, max: usize, out: &mut VecDeque<Arc<StreamEvent>>) {
        let skip = from.saturating_sub(self.first_seq) as usize;
        let end = self.ends.len().min(skip.saturating_add(max));
        for i in skip..end {
            let seq = self.first_seq + i as u64;
            if let Some((_, event)) = self.others.iter().find(|(s, _)| *s == seq) {
                out.push_back(event.clone());
                continue;
            }
            let begin = if i == 0 { self.front } else { self.ends[i - 1] as usize };
            let text = self.text.get(begin..self.ends[i] as usize).unwrap_or_default();
            out.push_back(Arc::new(StreamEvent::Delta { stream_id: self.stream_id, seq, text: text.to_owned() }));
        }
    }

    /// Bytes held on the heap (for tests and sizing).
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        self.text.capacity() + self.ends.capacity() * 4 + self.others.capacity() * 16
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::CompactLog;
    use crate::event::{ErrorCode, FinishReason, StreamEvent, StreamId};

    fn id() -> StreamId {
        StreamId::parse("0123456789abcdef0123456789abcdef").unwrap_or_else(|| unreachable!())
    }

    fn stream(texts: &[&str]) -> Vec<StreamEvent> {
        let stream_id = id();
        let mut events = vec![StreamEvent::Start { stream_id, generator: "echo".into() }];
        for (i, t) in texts.iter().enumerate() {
            events.push(StreamEvent::Delta { stream_id, seq: i as u64 + 1, text: (*t).to_owned() });
        }
        let seq = texts.len() as u64 + 1;
        events.push(StreamEvent::Done {
            stream_id,
            seq,
            finish_reason: FinishReason::Stop,
            chars: texts.len() as u64,
            usage: None,
        });
        events
    }

    fn read_all(log: &CompactLog, from: u64) -> Vec<StreamEvent> {
        let mut out = VecDeque::new();
        log.read(from, usize::MAX, &mut out);
        out.into_iter().map(|e| (*e).clone()).collect()
    }

    #[test]
    fn events_read_back_as_they_were_appended() {
        let events = stream(&["a", "👩‍👩‍👧", "e\u{301}", "\r\n", "你"]);
        let mut log = CompactLog::new(id());
        for e in &events {
            log.push(e, None);
        }
        assert_eq!(log.next_seq(), events.len() as u64);
        assert_eq!(read_all(&log, 0), events);
        assert_eq!(read_all(&log, 3), events[3..].to_vec());
        let mut out = VecDeque::new();
        log.read(1, 2, &mut out);
        assert_eq!(out.iter().map(|e| (**e).clone()).collect::<Vec<_>>(), events[1..3].to_vec());
    }

    #[test]
    fn a_shared_terminal_event_is_kept_not_copied() {
        let stream_id = id();
        let mut log = CompactLog::new(stream_id);
        log.push(&StreamEvent::Start { stream_id, generator: "g".into() }, None);
        let error = Arc::new(StreamEvent::Error { stream_id, seq: 1, code: ErrorCode::Cancelled, message: "x".into() });
        log.push(&error, Some(&error));
        let mut out = VecDeque::new();
        log.read(1, 1, &mut out);
        assert!(out.front().is_some_and(|e| Arc::ptr_eq(e, &error)));
    }

    #[test]
    fn a_retained_character_costs_its_bytes_and_an_offset() {
        let texts: Vec<String> = (0..2000).map(|i| if i % 2 == 0 { "a".to_owned() } else { "你".to_owned() }).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let mut log = CompactLog::new(id());
        for e in &stream(&refs) {
            log.push(e, None);
        }
        log.shrink();
        let per_char = log.heap_bytes() as f64 / 2000.0;
        // 2 bytes of UTF-8 on average and a 4-byte offset.
        assert!(per_char < 6.5, "{per_char} bytes per retained character");
    }

    proptest! {
        /// Any sequence of appends and trims reads back as the events last
        /// appended, numbered as appended, with the text given back in bulk.
        #[test]
        fn trimming_keeps_the_newest_events_exact(
            texts in proptest::collection::vec("\\PC{1,3}", 0..300),
            keep in 1usize..64,
        ) {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let events = stream(&refs);
            let mut log = CompactLog::new(id());
            for e in &events {
                log.push(e, None);
                if log.len() > keep {
                    log.pop_front();
                }
            }
            let first = events.len().saturating_sub(keep);
            prop_assert_eq!(log.first_seq(), first as u64);
            prop_assert_eq!(read_all(&log, log.first_seq()), events[first..].to_vec());
            log.shrink();
            prop_assert_eq!(read_all(&log, log.first_seq()), events[first..].to_vec());
        }
    }
}
