//! [`AppState`]: what every handler may use, shared by all requests. Kept
//! apart from the router ([`crate::app`]) so that handlers depend on the
//! state, the router on the handlers, and neither on the other's module.

use std::ops::Deref;
use std::sync::Arc;

use crate::config::Config;
use crate::limits::{RateLimits, StreamSlots};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::store::Store;
use crate::stream::StreamService;

/// Everything a handler may need.
pub struct Inner {
    /// Validated configuration (keys included).
    pub config: Config,
    /// Shutdown phases.
    pub shutdown: Shutdown,
    /// Request rate limiters.
    pub rates: RateLimits,
    /// Open stream slots.
    pub slots: Arc<StreamSlots>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The store (memory, or shared through Redis): channels use it
    /// directly, streams through [`Inner::streams`].
    pub store: Store,
    /// Opens, resumes and cancels streams for every route and dialect.
    pub streams: StreamService,
}

/// Cheaply cloneable application state.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl AppState {
    /// Wraps the shared state.
    pub fn new(inner: Inner) -> Self {
        Self(Arc::new(inner))
    }
}

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}
