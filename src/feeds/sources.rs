//! What each demo feed publishes at each tick: pure functions of the tick
//! number and the time, so the shapes are testable without a clock. They
//! reproduce the seeds' dashboards: `/dynamic-counter`, `/sse-data`,
//! `/stream-json` and seed 000's periodic broadcast.

use serde_json::{Value, json};

/// One message for a channel: its event name and JSON data.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The `event:` name subscribers listen for.
    pub event: &'static str,
    /// The `data:`.
    pub data: Value,
}

/// The ticks of one `demo.status` cycle: `connected` first, `done` last.
pub const STATUS_CYCLE: u64 = 20;

/// Every how many ticks `demo.metrics` reports an alert (the seed's 7).
pub const ALERT_EVERY: u64 = 7;

/// `demo.counter`: a number that goes up by one every tick.
pub fn counter(tick: u64, ts: &str) -> Message {
    Message { event: "count", data: json!({ "counter": tick, "ts": ts }) }
}

/// `demo.status`: cycles of [`STATUS_CYCLE`] ticks, as `/sse-data` does:
/// `status: connected`, then values (`update`) with a `status: pause`
/// every third tick, and a terminal `status: done`; the next cycle starts
/// with `connected` again.
pub fn status(tick: u64, ts: &str) -> Message {
    let step = tick % STATUS_CYCLE + 1;
    let cycle = tick / STATUS_CYCLE;
    let base = |status: &str| json!({ "cycle": cycle, "step": step, "status": status, "ts": ts });
    match step {
        1 => Message { event: "status", data: base("connected") },
        STATUS_CYCLE => Message { event: "status", data: base("done") },
        s if s.is_multiple_of(3) => Message { event: "status", data: base("pause") },
        _ => Message { event: "update", data: json!({ "cycle": cycle, "step": step, "value": wave(tick), "ts": ts }) },
    }
}

/// `demo.metrics`: a reading per tick, as `/stream-json` does; every
/// [`ALERT_EVERY`]th is over the threshold and comes as an `alert` event.
pub fn metrics(tick: u64, ts: &str) -> Message {
    let id = tick + 1;
    if id.is_multiple_of(ALERT_EVERY) {
        let value = 90.0 + (tick % 10) as f64;
        Message { event: "alert", data: json!({ "id": id, "value": value, "status": "alert", "ts": ts }) }
    } else {
        Message { event: "metric", data: json!({ "id": id, "value": wave(tick), "status": "ok", "ts": ts }) }
    }
}

/// `demo.clock`: seed 000's periodic broadcast, an `update` with the time.
pub fn clock(unix_ms: u64, ts: &str) -> Message {
    Message { event: "update", data: json!({ "timestamp": ts, "unix_ms": unix_ms, "message": "定时更新数据" }) }
}

/// A value between 10 and 70 that moves smoothly: a readable line on a
/// chart, without a random source (the same on every replica and run).
fn wave(tick: u64) -> f64 {
    let x = tick as f64 / 3.0;
    ((40.0 + 30.0 * x.sin()) * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_cycle_is_connected_values_and_pauses_then_done() {
        let events: Vec<(&str, Option<String>)> = (0..STATUS_CYCLE)
            .map(|t| {
                let m = status(t, "t");
                (m.event, m.data["status"].as_str().map(str::to_owned))
            })
            .collect();
        assert_eq!(events[0], ("status", Some("connected".into())));
        assert_eq!(events[1].0, "update");
        assert_eq!(events[2], ("status", Some("pause".into())));
        assert_eq!(events[19], ("status", Some("done".into())));
        assert_eq!(status(STATUS_CYCLE, "t").data["status"], "connected", "the next cycle starts again");
    }

    #[test]
    fn every_seventh_reading_is_an_alert_over_the_threshold() {
        let alerts: Vec<u64> = (0..21).filter(|t| metrics(*t, "t").event == "alert").collect();
        assert_eq!(alerts, vec![6, 13, 20]);
        assert!(metrics(6, "t").data["value"].as_f64().is_some_and(|v| v >= 90.0));
        assert!(metrics(0, "t").data["value"].as_f64().is_some_and(|v| (10.0..=70.0).contains(&v)));
        assert_eq!(counter(3, "t").data["counter"], 3);
        assert_eq!(clock(5, "t").event, "update");
    }
}
