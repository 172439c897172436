//! The stream engine: turns a generator's text into the typed event sequence
//! every dialect renders (start, one delta per grapheme cluster, done or
//! error, heartbeats, shutdown), with pacing and stream ids. Nothing here
//! knows about HTTP or the wire format.

mod engine;
mod event;
mod graphemes;
mod id;
mod run;
mod woken;

pub use engine::{EngineSettings, events};
pub use event::{FinishReason, StreamEvent};
pub use graphemes::GraphemeSplitter;
pub use id::StreamId;
pub use run::{RunContext, RunSettings, spawn};
pub use woken::OnlyWhenWoken;
