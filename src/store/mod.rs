//! Where events live between the task that produces them and the readers
//! that deliver them: per-stream event logs (for resume after a dropped
//! connection) and per-channel logs (broadcast with history).
//!
//! Generation is decoupled from HTTP: a stream's producer task appends to
//! its [`LiveStream`]'s log and every reader, the first connection or a
//! resume, follows the log the same way. Detach, resume, cancel and slow
//! readers are all rules on that one log.

mod channels;
mod streams;

pub use channels::{ChannelEvent, ChannelHub, ChannelSettings, Subscription};
pub use streams::{Attach, HubSettings, LiveStream, Reader, StreamHub, Wait, follow};
