//! Prometheus metrics, owned by the application (not a process-global
//! recorder), so every server instance, including each test's, counts on its
//! own. Handlers and streams call the typed methods here; `/metrics` renders.

use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{Counter, Gauge, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};

const META: Metadata<'static> = Metadata::new("tokengate", Level::INFO, Some("tokengate::metrics"));

/// The application's metrics.
pub struct Metrics {
    recorder: PrometheusRecorder,
    open_streams: Gauge,
    queue_high_water: Gauge,
    queue_high_water_value: AtomicU64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set of metrics.
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new().build_recorder();
        let open_streams = recorder.register_gauge(&Key::from_static_name("tokengate_open_streams"), &META);
        let queue_high_water =
            recorder.register_gauge(&Key::from_static_name("tokengate_send_queue_high_water_events"), &META);
        Self { recorder, open_streams, queue_high_water, queue_high_water_value: AtomicU64::new(0) }
    }

    fn counter(&self, name: &'static str, label: &'static str, value: &'static str) -> Counter {
        self.recorder.register_counter(&Key::from_parts(name, vec![Label::new(label, value)]), &META)
    }

    /// A request or stream refused by a limit or a bound, by reason.
    pub fn refused(&self, reason: &'static str) {
        self.counter("tokengate_refusals_total", "reason", reason).increment(1);
    }

    /// An authentication failure, by reason.
    pub fn auth_failed(&self, reason: &'static str) {
        self.counter("tokengate_auth_failures_total", "reason", reason).increment(1);
    }

    /// A stream ended, by outcome (`done`, an error code, `client_gone`, ...).
    pub fn stream_ended(&self, outcome: impl Into<std::borrow::Cow<'static, str>>) {
        let label = match outcome.into() {
            std::borrow::Cow::Borrowed(s) => Label::new("outcome", s),
            std::borrow::Cow::Owned(s) => Label::new("outcome", s),
        };
        self.recorder.register_counter(&Key::from_parts("tokengate_streams_total", vec![label]), &META).increment(1);
    }

    /// The number of open streams changed.
    pub fn set_open_streams(&self, open: usize) {
        self.open_streams.set(open as f64);
    }

    /// Records a stream's deepest send queue (events waiting for its client).
    pub fn observe_queue_depth(&self, depth: usize) {
        let previous = self.queue_high_water_value.fetch_max(depth as u64, Ordering::AcqRel);
        if depth as u64 > previous {
            self.queue_high_water.set(depth as f64);
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        self.recorder.handle().render()
    }
}
