//! The wire form of a channel subscription (the seeds' broadcast):
//!
//! ```text
//! retry: 3000
//! event: connected  data: {"subscriber_id":"..","channel":".."}
//! id: <id>          event: <published name or message>  data: <published JSON>
//! event: gap        data: {"code":"resume_gap","first_id":"..","message":".."}
//! event: error      data: {"code":"slow_consumer","message":".."}   (last)
//! retry: 1000       event: shutdown  data: {"reason":"..","retry_ms":1000}
//! : keep-alive
//! ```

use bytes::BytesMut;
use serde_json::json;

use super::Dialect;
use crate::event::ErrorCode;
use crate::sse::{push_comment, push_event, push_retry};
use crate::stream::{ChannelMessage, TOKEN_EXPIRED};

/// Renders one channel subscription.
#[derive(Debug, Clone)]
pub struct ChannelSse {
    /// `retry:` hint sent first, in milliseconds.
    pub retry_ms: u64,
    /// The subscriber's id, announced in `connected`.
    pub subscriber_id: String,
    /// The channel's name, announced in `connected`.
    pub channel: String,
}

impl Dialect for ChannelSse {
    type Event = ChannelMessage;

    fn preamble(&mut self, buf: &mut BytesMut) {
        push_retry(buf, self.retry_ms);
        let connected = json!({ "subscriber_id": self.subscriber_id, "channel": self.channel });
        push_event(buf, None, Some("connected"), &connected.to_string());
    }

    fn render(&mut self, event: &ChannelMessage, buf: &mut BytesMut) {
        match event {
            // Encoded once at publish, shared by every subscriber.
            ChannelMessage::Event(e) => buf.extend_from_slice(&e.wire),
            ChannelMessage::Gap { first_id } => {
                let data = json!({
                    "code": ErrorCode::ResumeGap,
                    "first_id": first_id,
                    "message": "some events are no longer retained; continuing with the oldest kept",
                });
                push_event(buf, None, Some("gap"), &data.to_string());
            }
            ChannelMessage::Heartbeat => push_comment(buf, "keep-alive"),
            // No id, like the token's end: a reconnect resumes from the last event received.
            ChannelMessage::SlowConsumer => {
                let data = json!({
                    "code": ErrorCode::SlowConsumer,
                    "message": "this subscriber read slower than the channel was published to, and fell out of its log; reconnect with Last-Event-ID",
                });
                push_event(buf, None, Some("error"), &data.to_string());
            }
            // No id: the subscriber's `Last-Event-ID` stays at the last
            // event it got, which a reconnect with fresh credentials sends.
            ChannelMessage::TokenExpired => {
                let data = json!({ "code": ErrorCode::TokenExpired, "message": TOKEN_EXPIRED });
                push_event(buf, None, Some("error"), &data.to_string());
            }
            ChannelMessage::Shutdown { retry_ms } => {
                push_retry(buf, *retry_ms);
                let data = json!({ "reason": "server shutting down", "retry_ms": retry_ms });
                push_event(buf, None, Some("shutdown"), &data.to_string());
            }
        }
    }
}
