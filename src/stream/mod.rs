//! The stream engine and lifecycle: everything that happens to a stream
//! between a request and the wire, and nothing about HTTP or the wire
//! format.
//!
//! - [`engine`](events): turns a generator's text into the typed event
//!   sequence (start, one delta per grapheme cluster, done or error) with
//!   pacing, ids and the duration limit;
//! - `produce`: the producer appending those events to the stream's
//!   log, applying `flow` (backpressure, slow consumers, detach grace);
//! - `drive`: who polls the producer: the first reader's connection while
//!   it can ([`DriveHook`]), else a task of its own;
//! - [`follow`]: the one reader, over a store [`Cursor`](crate::store::Cursor),
//!   adding heartbeats, `shutdown` and terminal errors for logs that cannot
//!   continue; [`follow_channel`] does the same for channel feeds;
//! - [`StreamService`]: open, resume and cancel, called by every route and
//!   dialect.

mod channel;
mod drive;
mod engine;
mod flow;
mod graphemes;
mod produce;
mod reader;
mod service;
mod woken;

pub use channel::{ChannelMessage, ConnectionAbort, follow_channel};
pub use drive::DriveHook;
pub use engine::{EngineSettings, events};
pub use graphemes::GraphemeSplitter;
pub use reader::{FollowSettings, TOKEN_EXPIRED, follow};
pub use service::{
    EventStream, OpenRequest, Opened, Resumed, ServiceParts, ServiceSettings, StreamError, StreamService,
};
pub use woken::OnlyWhenWoken;

pub use crate::event::{ErrorCode, FinishReason, Outcome, StreamEvent, StreamId};
