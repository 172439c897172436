//! [`CompactLog`]: one stream's events as the text once plus where each
//! event ends. A stream of N characters is N delta events; kept as
//! `Arc<StreamEvent>`s that is about 165 bytes per character (the `Arc`
//! box, the enum, a heap string per cluster and the queue slot), which for a
//! finished stream kept resumable for `stream_ttl` is nearly all of its
//! memory. Here a delta costs its UTF-8 bytes plus a 4-byte offset while the
//! stream runs, and its bytes plus one once it has finished (the log is then
//! sealed); the rare other events (start, the terminal event) are kept
//! whole. Events are rebuilt on read, with the same id and sequence number
//! they were appended with, so readers cannot tell the difference.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::event::{StreamEvent, StreamId};

/// Bytes dropped from the front of the text before they are given back
/// (below this, or below half the buffer, dropping an event is O(1)).
const DRAIN_AT: usize = 4096;

/// Events per checkpoint of a sealed log: a read sums at most this many
/// lengths to find where an event starts.
const MARK_EVERY: usize = 64;

/// A bounded log of one stream's events, stored compactly.
#[derive(Debug)]
pub(super) struct CompactLog {
    stream_id: StreamId,
    /// The retained events that are not deltas, by sequence number (start
    /// and terminal: at most a few).
    others: Vec<(u64, Arc<StreamEvent>)>,
    /// Sequence number of the oldest retained event.
    first_seq: u64,
    /// The deltas' text and where each event ends.
    body: Body,
}

/// A log's text and boundaries: growable while the stream runs, then sealed
/// into exact-size slices with a one-byte length per event, since a finished
/// log is only read, for `stream_ttl`.
#[derive(Debug)]
enum Body {
    /// Appends and trims are O(1): a 4-byte end offset per event.
    Live(LiveBody),
    /// Read-only, about the text's bytes plus one per event.
    Sealed(SealedBody),
}

#[derive(Debug, Default)]
struct LiveBody {
    /// Every retained delta's text, in order, from byte `front` on.
    text: String,
    /// Where the retained text starts (bytes before it belong to dropped
    /// events and are given back in bulk).
    front: usize,
    /// Where each retained event's text ends in `text`: event `first_seq +
    /// i` spans `ends[i - 1]..ends[i]` (from `front` for the first). Events
    /// that are not deltas span nothing.
    ends: VecDeque<u32>,
}

#[derive(Debug)]
struct SealedBody {
    /// The retained deltas' text, in order.
    text: Box<str>,
    /// Each event's text length in bytes; `u8::MAX` means "look it up in
    /// `long`" (a cluster of 255 bytes or more: rare, but an upstream can
    /// send one).
    lens: Box<[u8]>,
    /// Where event `k * MARK_EVERY` starts in `text`.
    marks: Box<[u32]>,
    /// The lengths of at least `u8::MAX` bytes, by event index, ascending.
    long: Box<[(u32, u32)]>,
}

impl SealedBody {
    fn seal(live: LiveBody) -> Self {
        let LiveBody { mut text, front, ends } = live;
        text.drain(..front);
        let mut lens = Vec::with_capacity(ends.len());
        let mut marks = Vec::with_capacity(ends.len().div_ceil(MARK_EVERY));
        let mut long = Vec::new();
        let mut begin = front as u32;
        for (i, &end) in ends.iter().enumerate() {
            if i % MARK_EVERY == 0 {
                marks.push(begin - front as u32);
            }
            let len = end - begin;
            match u8::try_from(len) {
                Ok(l) if l < u8::MAX => lens.push(l),
                _ => {
                    lens.push(u8::MAX);
                    long.push((i as u32, len));
                }
            }
            begin = end;
        }
        Self {
            text: text.into_boxed_str(),
            lens: lens.into_boxed_slice(),
            marks: marks.into_boxed_slice(),
            long: long.into_boxed_slice(),
        }
    }

    fn len_of(&self, i: usize) -> usize {
        match self.lens[i] {
            u8::MAX => {
                self.long.binary_search_by_key(&(i as u32), |&(at, _)| at).map_or(0, |k| self.long[k].1 as usize)
            }
            l => l as usize,
        }
    }

    /// Where event `i` starts in `text`.
    fn start_of(&self, i: usize) -> usize {
        let block = i / MARK_EVERY;
        let mut at = self.marks.get(block).map_or(0, |&m| m as usize);
        for j in block * MARK_EVERY..i {
            at += self.len_of(j);
        }
        at
    }

    /// Back to the growable form (only if something is appended after the
    /// stream finished, which the hub does not do).
    fn unseal(self) -> LiveBody {
        let mut ends = VecDeque::with_capacity(self.lens.len());
        let mut end = 0u32;
        for i in 0..self.lens.len() {
            end += self.len_of(i) as u32;
            ends.push_back(end);
        }
        LiveBody { text: self.text.into_string(), front: 0, ends }
    }
}

impl CompactLog {
    /// An empty log of stream `stream_id`.
    pub(super) fn new(stream_id: StreamId) -> Self {
        Self { stream_id, others: Vec::new(), first_seq: 0, body: Body::Live(LiveBody::default()) }
    }

    /// Sequence number of the oldest retained event.
    pub(super) fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// The next sequence number to be appended.
    pub(super) fn next_seq(&self) -> u64 {
        self.first_seq + self.len() as u64
    }

    /// Retained events.
    pub(super) fn len(&self) -> usize {
        match &self.body {
            Body::Live(live) => live.ends.len(),
            Body::Sealed(sealed) => sealed.lens.len(),
        }
    }

    /// The growable body, unsealing a sealed one.
    fn live(&mut self) -> &mut LiveBody {
        if let Body::Sealed(_) = self.body {
            let Body::Sealed(sealed) = std::mem::replace(&mut self.body, Body::Live(LiveBody::default())) else {
                unreachable!("matched just above")
            };
            self.body = Body::Live(sealed.unseal());
        }
        match &mut self.body {
            Body::Live(live) => live,
            Body::Sealed(_) => unreachable!("unsealed just above"),
        }
    }

    /// Appends the next event. Deltas are copied into the text; other
    /// events are kept as `shared` when given (the caller's own `Arc`),
    /// else cloned once.
    pub(super) fn push(&mut self, event: &StreamEvent, shared: Option<&Arc<StreamEvent>>) {
        let seq = self.next_seq();
        if let StreamEvent::Delta { text, .. } = event {
            // An offset is 4 bytes; a log whose retained text would not
            // fit drops its oldest events first (resuming before them is
            // a gap, as with any trimmed event). Only a pathological
            // upstream (gigabytes in 20,000 clusters) gets here.
            loop {
                let live = self.live();
                if live.ends.is_empty() || live.text.len() - live.front + text.len() <= u32::MAX as usize {
                    break;
                }
                self.pop_front();
            }
            let live = self.live();
            if live.text.len() + text.len() > u32::MAX as usize {
                live.give_back(true);
            }
            live.text.push_str(text);
        } else {
            let kept = shared.cloned().unwrap_or_else(|| Arc::new(event.clone()));
            self.others.push((seq, kept));
        }
        let live = self.live();
        // Fits: the text was trimmed to below 4 GiB just above.
        live.ends.push_back(u32::try_from(live.text.len()).unwrap_or(u32::MAX));
    }

    /// Drops the oldest event.
    pub(super) fn pop_front(&mut self) {
        let live = self.live();
        let Some(end) = live.ends.pop_front() else { return };
        live.front = end as usize;
        live.give_back(false);
        self.first_seq += 1;
        let first = self.first_seq;
        self.others.retain(|(seq, _)| *seq >= first);
    }

    /// Seals the log (the stream is finished: nothing more comes), into
    /// exact-size slices about a byte per event smaller than the text.
    pub(super) fn shrink(&mut self) {
        let body = std::mem::replace(&mut self.body, Body::Live(LiveBody::default()));
        self.body = match body {
            Body::Live(live) => Body::Sealed(SealedBody::seal(live)),
            sealed => sealed,
        };
        self.others.shrink_to_fit();
    }

    /// Adds events `from..` (at most `max`) to `out`, rebuilt; `from` must
    /// be at or after [`Self::first_seq`].
    pub(super) fn read(&self, from: u64, max: usize, out: &mut VecDeque<Arc<StreamEvent>>) {
        let skip = from.saturating_sub(self.first_seq) as usize;
        let end = self.len().min(skip.saturating_add(max));
        if skip >= end {
            return;
        }
        let mut begin = match &self.body {
            Body::Live(live) => match skip {
                0 => live.front,
                i => live.ends[i - 1] as usize,
            },
            Body::Sealed(sealed) => sealed.start_of(skip),
        };
        for i in skip..end {
            let seq = self.first_seq + i as u64;
            let (text, stop) = match &self.body {
                Body::Live(live) => (live.text.as_str(), live.ends[i] as usize),
                Body::Sealed(sealed) => (&*sealed.text, begin + sealed.len_of(i)),
            };
            let span = begin..stop;
            begin = stop;
            if let Some((_, event)) = self.others.iter().find(|(s, _)| *s == seq) {
                out.push_back(event.clone());
                continue;
            }
            let text = text.get(span).unwrap_or_default();
            out.push_back(Arc::new(StreamEvent::Delta { stream_id: self.stream_id, seq, text: text.into() }));
        }
    }

    /// Bytes held on the heap (for tests and sizing).
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        let body = match &self.body {
            Body::Live(live) => live.text.capacity() + live.ends.capacity() * 4,
            Body::Sealed(s) => s.text.len() + s.lens.len() + s.marks.len() * 4 + s.long.len() * 8,
        };
        body + self.others.capacity() * 16
    }
}

impl LiveBody {
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
            events.push(StreamEvent::Delta { stream_id, seq: i as u64 + 1, text: (*t).into() });
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
        let live = log.heap_bytes() as f64 / 2000.0;
        // 2 bytes of UTF-8 on average and a 4-byte offset (with growth).
        assert!(live < 8.5, "{live} bytes per character while the stream runs");
        log.shrink();
        let sealed = log.heap_bytes() as f64 / 2000.0;
        // 2 bytes of UTF-8 on average, a length byte, a checkpoint per 64.
        assert!(sealed < 3.2, "{sealed} bytes per retained character once sealed");
    }

    #[test]
    fn a_sealed_log_reads_clusters_of_any_length_from_any_event() {
        let long = "e".to_owned() + &"\u{301}".repeat(200);
        let longer = "x".repeat(70_000);
        let mut texts: Vec<&str> = Vec::new();
        for i in 0..300 {
            texts.push(match i % 50 {
                7 => &long,
                33 => &longer,
                n if n % 2 == 0 => "a",
                _ => "你",
            });
        }
        let events = stream(&texts);
        let mut log = CompactLog::new(id());
        for e in &events {
            log.push(e, None);
        }
        log.shrink();
        for from in 0..events.len() as u64 + 1 {
            assert_eq!(read_all(&log, from), events[from as usize..].to_vec(), "from {from}");
        }
        let mut out = VecDeque::new();
        log.read(63, 3, &mut out);
        assert_eq!(out.iter().map(|e| (**e).clone()).collect::<Vec<_>>(), events[63..66].to_vec());
    }

    #[test]
    fn appending_to_a_sealed_log_unseals_it() {
        let events = stream(&["a", "b", "c"]);
        let mut log = CompactLog::new(id());
        log.push(&events[0], None);
        log.push(&events[1], None);
        log.shrink();
        for e in &events[2..] {
            log.push(e, None);
        }
        log.pop_front();
        assert_eq!(read_all(&log, 1), events[1..].to_vec());
    }

    proptest! {
        /// Any sequence of appends and trims reads back as the events last
        /// appended, numbered as appended, with the text given back in bulk.
        #[test]
        fn trimming_keeps_the_newest_events_exact(
            texts in proptest::collection::vec(prop_oneof![9 => "\\PC{1,3}", 1 => "e\u{301}{100,140}"], 0..300),
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
            for from in log.first_seq()..log.next_seq() + 1 {
                prop_assert_eq!(read_all(&log, from), events[from as usize..].to_vec());
            }
        }
    }
}
