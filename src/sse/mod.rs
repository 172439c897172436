//! Server-Sent Events wire format (WHATWG HTML, "event stream" section):
//! an encoder that writes spec-conforming blocks into a reusable buffer, and
//! an incremental parser that turns bytes back into events. The parser is
//! written from the spec independently of the encoder, so the two check each
//! other (see the property tests), and it is what the `openai` upstream
//! generator and the benchmark client use to read foreign streams.

mod decode;
mod encode;

pub use decode::{Event, EventRef, Parser};
pub use encode::{push_comment, push_event, push_json_string, push_retry, push_u64};
