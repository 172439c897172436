//! Where events live between the task that produces them and the readers
//! that deliver them: per-stream event logs (for resume after a dropped
//! connection) and per-channel logs (broadcast with history).
//!
//! Generation is decoupled from HTTP: a stream's producer task appends to
//! its [`LiveStream`]'s log and every reader, the first connection or a
//! resume, follows the log the same way. Detach, resume, cancel and slow
//! readers are all rules on that one log.
//!
//! With `--redis-url` ([`RedisStore`]) every log is also replicated to
//! Redis: readers on other replicas follow it there, and channels are
//! published through Redis and fanned out locally by one tail per replica.

mod channels;
mod redis;
mod remote;
mod streams;

pub use channels::{ChannelEvent, ChannelHub, ChannelSettings, Start, Subscription};
pub use redis::{REMOTE_READER, RedisSettings, RedisStore, Replicator, StoreError};
pub use remote::{ChannelTail, TailGuard, follow_remote};
pub use streams::{Attach, HubSettings, LiveStream, Reader, StreamHub, Wait, follow};
