//! Dialects render the engine's typed events on the wire. Generation and
//! framing never depend on the dialect, so each wire format ([`native`],
//! [`openai`] chunks, [`anthropic`] events, ...) is one renderer. Channel subscriptions are
//! rendered the same way ([`channel`]).
//!
//! [`sse_body`] is the shared framing: it turns any event stream into the
//! HTTP body, coalescing every event that is already available into one
//! write (without waiting for events that are not).

pub mod ai_sdk;
pub mod anthropic;
pub mod channel;
pub mod native;
pub mod openai;
pub mod responses;

use std::convert::Infallible;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};

use std::sync::Arc;

use crate::metrics::Metrics;

/// Stop adding ready events to one write past this many bytes.
const MAX_WRITE: usize = 16 * 1024;
/// The buffer a stream starts with again after a quiet spell.
const MIN_BUFFER: usize = 512;

/// What a dialect renders: whether an event is a text delta is the one
/// thing the shared framing asks (deltas are counted per write).
pub trait Rendered {
    /// Whether this is a text delta.
    fn is_delta(&self) -> bool {
        false
    }
    /// Whether this is a heartbeat: a write of heartbeats alone means the
    /// stream is quiet, and its buffer is let go.
    fn is_heartbeat(&self) -> bool {
        false
    }
}

impl Rendered for crate::event::StreamEvent {
    fn is_delta(&self) -> bool {
        matches!(self, crate::event::StreamEvent::Delta { .. })
    }
    fn is_heartbeat(&self) -> bool {
        matches!(self, crate::event::StreamEvent::Heartbeat)
    }
}

impl Rendered for crate::stream::ChannelMessage {
    fn is_heartbeat(&self) -> bool {
        matches!(self, crate::stream::ChannelMessage::Heartbeat)
    }
}

/// Renders the events of one stream (or one subscription) into SSE bytes.
pub trait Dialect: Send + 'static {
    /// What it renders: [`crate::event::StreamEvent`] for streams.
    type Event: Rendered;
    /// Bytes written before the first event (e.g. `retry:`); none unless
    /// the dialect says so.
    fn preamble(&mut self, _buf: &mut BytesMut) {}
    /// Appends the wire form of one event (possibly nothing).
    fn render(&mut self, event: &Self::Event, buf: &mut BytesMut);
}

/// Why a stream stopped early where a dialect ends it as a length stop
/// (the quota): the `tokengate` member its last chunk or object carries,
/// beside the dialect's own fields, which the official clients keep as an
/// extra field the application can read.
pub fn stop_note(code: crate::event::ErrorCode, message: &str) -> serde_json::Value {
    serde_json::json!({ "code": code.as_str(), "message": message })
}

/// The HTTP body for a stream of events in `dialect`. Every event that is
/// ready when the body is polled goes out in the same chunk, so a fast
/// generator costs one write per batch instead of one per character, while
/// a paced one is written the moment each event exists.
///
/// `events` is taken `Unpin` (a stream the caller boxed once, as the stream
/// service does) so that each event is not behind a second box here.
pub fn sse_body<S, D>(
    events: S,
    mut dialect: D,
    metrics: Arc<Metrics>,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static
where
    S: Stream + Unpin + Send + 'static,
    S::Item: AsRef<D::Event>,
    D: Dialect,
{
    let mut events = events;
    let mut buf = BytesMut::new();
    dialect.preamble(&mut buf);
    let mut finished = false;
    let mut deltas = 0u64;
    // Whether the buffer holds heartbeats only.
    let mut quiet = true;
    // One counter update per write, never per character. A write that is
    // all heartbeats takes the whole buffer with it: a quiet stream then
    // holds none (it held up to 512 bytes). Otherwise the rest of the
    // buffer is kept for the next events.
    let take = move |buf: &mut BytesMut, deltas: &mut u64, quiet: &mut bool| {
        metrics.sent(std::mem::take(deltas), buf.len() as u64);
        let out = if std::mem::replace(quiet, true) { std::mem::take(buf) } else { buf.split() };
        Ok(out.freeze())
    };
    futures_util::stream::poll_fn(move |cx| {
        if finished {
            return Poll::Ready(None);
        }
        loop {
            match events.poll_next_unpin(cx) {
                Poll::Ready(Some(event)) => {
                    let event = event.as_ref();
                    deltas += u64::from(event.is_delta());
                    quiet &= event.is_heartbeat();
                    if buf.capacity() == 0 {
                        buf.reserve(MIN_BUFFER);
                    }
                    dialect.render(event, &mut buf);
                    if buf.len() >= MAX_WRITE {
                        return Poll::Ready(Some(take(&mut buf, &mut deltas, &mut quiet)));
                    }
                }
                Poll::Ready(None) => {
                    finished = true;
                    return Poll::Ready((!buf.is_empty()).then(|| take(&mut buf, &mut deltas, &mut quiet)));
                }
                Poll::Pending => {
                    return if buf.is_empty() {
                        Poll::Pending
                    } else {
                        Poll::Ready(Some(take(&mut buf, &mut deltas, &mut quiet)))
                    };
                }
            }
        }
    })
}
