//! Limits that keep the gateway up and fair under misbehaving clients:
//! request rates per subject and per client IP (governor's GCRA), concurrent
//! stream slots (global and per subject), and the client IP as seen through
//! trusted proxies. Connection-level bounds (header size and time, total
//! connections, stalled writes) live in [`crate::server`].

mod client_ip;
mod rate;
mod slots;

pub use client_ip::client_ip;
pub use rate::{Rate, RateLimited, RateLimits, RateScope};
pub use slots::{SlotPermit, SlotRefused, StreamSlots};
