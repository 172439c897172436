//! Limits that keep the gateway up and fair under misbehaving clients:
//! request rates per subject and per client IP (governor's GCRA), concurrent
//! stream slots (global and per subject), and the client IP as seen through
//! trusted proxies. Connection-level bounds (header size and time, total
//! connections, stalled writes) live in [`crate::server`].
//!
//! With a shared store, the rates and the per-subject stream cap hold for
//! the whole cluster ([`SharedLimits`]: the failure policy; [`Leases`]:
//! stream leases); without one, everything here is per process.

mod client_ip;
mod leases;
mod rate;
mod shared;
mod slots;

pub use client_ip::client_ip;
pub use leases::{Lease, Leases};
pub use rate::{Rate, RateLimited, RateLimits, RateRefused, RateScope};
pub use shared::{LimitsUnavailable, OnStoreFailure, SharedLimits};
pub use slots::{SlotPermit, SlotRefused, StreamSlots};
