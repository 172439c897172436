//! Prometheus metrics, owned by the application (not a process-global
//! recorder), so every server instance, including each test's, counts on its
//! own. Handlers and streams call the typed methods here; `/metrics` renders.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};

use crate::event::{ErrorCode, Outcome, Protocol};

const META: Metadata<'static> = Metadata::new("tokengate", Level::INFO, Some("tokengate::metrics"));

/// Histogram buckets in seconds, from 1 ms (first delta of a local
/// generator) to 30 minutes (the longest default stream).
const BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0];

/// The application's metrics.
pub struct Metrics {
    recorder: PrometheusRecorder,
    open_streams: Gauge,
    queue_high_water: Gauge,
    queue_high_water_value: AtomicU64,
    deltas: Counter,
    bytes: Counter,
    first_delta: Histogram,
    duration: Histogram,
    /// The labelled counters registered so far, by name and label value:
    /// registering builds a key and a handle (allocations), and some of
    /// these are counted on every stream.
    labelled: Mutex<Vec<(&'static str, &'static str, Counter)>>,
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
        let builder = PrometheusBuilder::new();
        // Valid, fixed buckets: this cannot fail; without buckets the
        // exporter would render summaries instead of histograms.
        let builder = match builder.set_buckets(BUCKETS) {
            Ok(b) => b,
            Err(_) => PrometheusBuilder::new(),
        };
        let recorder = builder.build_recorder();
        let name = Key::from_static_name;
        let open_streams = recorder.register_gauge(&name("tokengate_open_streams"), &META);
        let queue_high_water = recorder.register_gauge(&name("tokengate_send_queue_high_water_events"), &META);
        let deltas = recorder.register_counter(&name("tokengate_deltas_sent_total"), &META);
        let bytes = recorder.register_counter(&name("tokengate_stream_bytes_sent_total"), &META);
        let first_delta = recorder.register_histogram(&name("tokengate_time_to_first_delta_seconds"), &META);
        let duration = recorder.register_histogram(&name("tokengate_stream_duration_seconds"), &META);
        Self {
            recorder,
            open_streams,
            queue_high_water,
            queue_high_water_value: AtomicU64::new(0),
            deltas,
            bytes,
            first_delta,
            duration,
            labelled: Mutex::new(Vec::new()),
        }
    }

    /// The counter `name{label="value"}`, registered on its first use. Each
    /// name has one label, so the name and the value find it; the few dozen
    /// series are scanned rather than hashed.
    fn counter(&self, name: &'static str, label: &'static str, value: &'static str) -> Counter {
        let mut labelled = self.labelled.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, _, counter)) = labelled.iter().find(|(n, v, _)| *n == name && *v == value) {
            return counter.clone();
        }
        let counter = self.recorder.register_counter(&Key::from_parts(name, vec![Label::new(label, value)]), &META);
        labelled.push((name, value, counter.clone()));
        counter
    }

    /// A request or stream refused by a limit or a bound, by reason.
    pub fn refused(&self, reason: &'static str) {
        self.counter("tokengate_refusals_total", "reason", reason).increment(1);
    }

    /// A connection was taken, by the protocol it speaks (`http1`, `h2`):
    /// shows whether clients get HTTP/2.
    pub fn connection_opened(&self, protocol: &'static str) {
        self.counter("tokengate_connections_total", "protocol", protocol).increment(1);
    }

    /// A TLS certificate reload, by result (`ok`, `error`: the old
    /// certificate stays).
    pub fn tls_reload(&self, result: &'static str) {
        self.counter("tokengate_tls_reloads_total", "result", result).increment(1);
    }

    /// A heap trim ran ([`crate::heap_trim`]), by whether it gave any
    /// memory back (`released`: `true`, `false`).
    pub fn heap_trimmed(&self, released: bool) {
        let value = if released { "true" } else { "false" };
        self.counter("tokengate_heap_trims_total", "released", value).increment(1);
    }

    /// An authentication failure, by reason.
    pub fn auth_failed(&self, reason: &'static str) {
        self.counter("tokengate_auth_failures_total", "reason", reason).increment(1);
    }

    /// A stream's producer started, polled by its reader's connection
    /// (`connection`) or by a task of its own (`task`).
    pub fn producer_started(&self, inline: bool) {
        let driven = if inline { "connection" } else { "task" };
        self.counter("tokengate_producers_total", "driven", driven).increment(1);
    }

    /// A producer polled by its reader's connection moved to a task of its
    /// own: the reader left before the stream ended.
    pub fn producer_moved(&self) {
        self.recorder.register_counter(&Key::from_static_name("tokengate_producers_moved_total"), &META).increment(1);
    }

    /// A stream was opened, by the protocol it is served in.
    pub fn stream_opened(&self, protocol: Protocol) {
        self.counter("tokengate_streams_opened_total", "dialect", protocol.as_str()).increment(1);
    }

    /// A stream ended, by outcome (`done`, `shutdown` or the error code).
    /// The outcomes that are also a refusal, an upstream failure or a store
    /// failure are counted there too, so every label comes from the one
    /// [`Outcome`] enum.
    pub fn stream_ended(&self, outcome: Outcome) {
        self.counter("tokengate_streams_total", "outcome", outcome.as_str()).increment(1);
        let Outcome::Error(code) = outcome else { return };
        if code == ErrorCode::SlowConsumer {
            self.refused(code.as_str());
        }
        if code.is_upstream() {
            self.upstream_error(code);
        }
        if code == ErrorCode::StoreUnavailable {
            self.store_error("replicate");
        }
    }

    /// Deltas and bytes handed to a client connection (counted per write,
    /// not per character).
    pub fn sent(&self, deltas: u64, bytes: u64) {
        if deltas > 0 {
            self.deltas.increment(deltas);
        }
        self.bytes.increment(bytes);
    }

    /// Time from a stream's start to its first delta.
    pub fn first_delta(&self, after: std::time::Duration) {
        self.first_delta.record(after.as_secs_f64());
    }

    /// A stream's whole duration.
    pub fn stream_duration(&self, took: std::time::Duration) {
        self.duration.record(took.as_secs_f64());
    }

    /// An upstream failure, by code.
    pub fn upstream_error(&self, code: ErrorCode) {
        self.counter("tokengate_upstream_errors_total", "code", code.as_str()).increment(1);
    }

    /// A shared store (Redis) failure, by operation.
    pub fn store_error(&self, operation: &'static str) {
        self.counter("tokengate_store_errors_total", "operation", operation).increment(1);
    }

    /// Quota units charged to subjects (`chars` as streams end, `tokens`
    /// as generators report them).
    pub fn quota_charged(&self, unit: &'static str, n: u64) {
        self.counter("tokengate_quota_charged_total", "unit", unit).increment(n);
    }

    /// A quota reservation was made (one store call; with Redis, one
    /// script run) and granted `granted` characters.
    pub fn quota_reserved(&self, granted: u64) {
        let outcome = if granted == 0 { "exhausted" } else { "granted" };
        self.counter("tokengate_quota_reservations_total", "outcome", outcome).increment(1);
    }

    /// One load of the JWKS (a URL fetch or a file read), by result
    /// (`ok`, `failed`); a failed one kept the last good key set.
    pub fn jwks_refreshed(&self, ok: bool) {
        self.counter("tokengate_jwks_refreshes_total", "result", if ok { "ok" } else { "failed" }).increment(1);
    }

    /// A JWKS refresh triggered by a token's unknown `kid` (rate-limited,
    /// so a burst of forged `kid`s shows as at most one).
    pub fn jwks_kid_refresh(&self) {
        self.recorder
            .register_counter(&Key::from_static_name("tokengate_jwks_kid_refreshes_total"), &META)
            .increment(1);
    }

    /// The usable keys in the served JWKS changed.
    pub fn set_jwks_keys(&self, keys: usize) {
        self.recorder.register_gauge(&Key::from_static_name("tokengate_jwks_keys"), &META).set(keys as f64);
    }

    /// A limit check that could not ask the shared store, by the failure
    /// policy then applied (`closed`: refused, `open`: local limits).
    pub fn limit_store_failure(&self, policy: &'static str) {
        self.counter("tokengate_limit_store_failures_total", "policy", policy).increment(1);
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

    /// Folds the histogram samples recorded since the last upkeep into
    /// their buckets. The exporter keeps every raw sample until then (two
    /// per stream): without a periodic upkeep, or a scrape, they would grow
    /// without bound on a server nobody scrapes.
    pub fn upkeep(&self) {
        self.recorder.handle().run_upkeep();
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        self.recorder.handle().render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_labelled_counter_is_registered_once_and_counts_every_use() {
        let metrics = Metrics::new();
        for _ in 0..3 {
            metrics.stream_opened(Protocol::Native);
        }
        metrics.refused("rate_limited");
        metrics.refused("too_many_streams");
        metrics.refused("rate_limited");
        let text = metrics.render();
        assert!(text.contains("tokengate_streams_opened_total{dialect=\"native\"} 3"), "{text}");
        assert!(text.contains("tokengate_refusals_total{reason=\"rate_limited\"} 2"), "{text}");
        assert!(text.contains("tokengate_refusals_total{reason=\"too_many_streams\"} 1"), "{text}");
        let kept = metrics.labelled.lock().unwrap_or_else(PoisonError::into_inner).len();
        assert_eq!(kept, 3, "one handle per series");
    }

    #[test]
    fn upkeep_keeps_every_sample_in_the_histogram() {
        let metrics = Metrics::new();
        for ms in 0..1000 {
            metrics.stream_duration(std::time::Duration::from_millis(ms));
        }
        metrics.upkeep();
        metrics.stream_duration(std::time::Duration::from_secs(2));
        metrics.upkeep();
        let text = metrics.render();
        assert!(text.contains("tokengate_stream_duration_seconds_count 1001"), "{text}");
        assert!(text.contains("tokengate_stream_duration_seconds_bucket{le=\"0.5\"} 501"), "{text}");
    }
}
