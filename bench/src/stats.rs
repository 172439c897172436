//! Percentiles over collected samples (microseconds).

use serde_json::{Value, json};

/// Nearest-rank percentile of sorted samples.
pub fn pct(sorted: &[u32], q: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// p50/p90/p99/p99.9/max of microsecond samples, reported in milliseconds.
pub fn summary_ms(samples: &mut [u32]) -> Value {
    samples.sort_unstable();
    let ms = |q: f64| pct(samples, q).map(|v| (v as f64 / 1000.0 * 1000.0).round() / 1000.0);
    let mean = if samples.is_empty() {
        None
    } else {
        Some(samples.iter().map(|&v| v as f64).sum::<f64>() / samples.len() as f64 / 1000.0)
    };
    json!({
        "n": samples.len(),
        "p50": ms(0.50),
        "p90": ms(0.90),
        "p99": ms(0.99),
        "p999": ms(0.999),
        "max": ms(1.0),
        "mean": mean.map(|m| (m * 1000.0).round() / 1000.0),
    })
}

/// Microseconds in a u32 (saturating at ~71 minutes).
pub fn us(d: std::time::Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::pct;

    #[test]
    fn nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(pct(&v, 0.5), Some(50));
        assert_eq!(pct(&v, 0.99), Some(99));
        assert_eq!(pct(&v, 1.0), Some(100));
        assert_eq!(pct(&[], 0.5), None);
    }
}
