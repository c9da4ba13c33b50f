//! Fixed-bucket latency histograms with vLLM's bucket bounds.
//!
//! The engine keeps the same histograms vLLM exports (`vllm:time_to_first_token_seconds`, ...)
//! with the same bounds, so the HTTP engine can print them verbatim and the router parses them as
//! it parses a real engine's. Fixed buckets keep memory constant however many requests are served.

use qoe_core::Micros;

/// `vllm:time_to_first_token_seconds` bounds (vLLM 0.32).
pub const TTFT_BOUNDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// `vllm:inter_token_latency_seconds` bounds (vLLM 0.32).
pub const ITL_BOUNDS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];

/// `vllm:e2e_request_latency_seconds` and `vllm:request_queue_time_seconds` bounds (vLLM 0.32).
pub const REQUEST_LATENCY_BOUNDS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// A Prometheus-style histogram of durations: upper bounds in seconds, plus `+Inf`.
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    bounds_us: Vec<Micros>,
    bounds_s: &'static [f64],
    /// Non-cumulative counts; the last is the `+Inf` overflow bucket.
    counts: Vec<u64>,
    sum_us: u64,
    count: u64,
}

impl Histogram {
    /// An empty histogram with upper bounds `bounds` (seconds, increasing).
    pub fn new(bounds: &'static [f64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        Self {
            bounds_us: bounds.iter().map(|s| (s * 1e6).round() as Micros).collect(),
            bounds_s: bounds,
            counts: vec![0; bounds.len() + 1],
            sum_us: 0,
            count: 0,
        }
    }

    /// Records one duration. A value equal to a bound falls in that bound's bucket (`le`).
    #[inline]
    pub fn observe(&mut self, d: Micros) {
        let i = self.bounds_us.partition_point(|&b| b < d);
        self.counts[i] += 1;
        self.sum_us += d;
        self.count += 1;
    }

    /// Upper bounds in seconds, without `+Inf`.
    pub fn bounds(&self) -> &'static [f64] {
        self.bounds_s
    }

    /// Cumulative counts, one per bound and a last one for `+Inf` (equal to [`Self::count`]).
    pub fn cumulative(&self) -> impl Iterator<Item = u64> + '_ {
        self.counts.iter().scan(0u64, |acc, c| {
            *acc += c;
            Some(*acc)
        })
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sum of observations in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.sum_us as f64 / 1e6
    }

    /// Sum of observations in microseconds.
    pub fn sum_micros(&self) -> u64 {
        self.sum_us
    }

    /// Mean in microseconds, `None` when empty.
    pub fn mean_micros(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum_us as f64 / self.count as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_le_and_cumulative() {
        let mut h = Histogram::new(TTFT_BOUNDS);
        h.observe(1_000); // exactly 0.001 s: first bucket
        h.observe(1_001);
        h.observe(5_000_000_000); // beyond 2560 s
        let cum: Vec<u64> = h.cumulative().collect();
        assert_eq!(cum.len(), TTFT_BOUNDS.len() + 1);
        assert_eq!(cum[0], 1);
        assert_eq!(cum[1], 2);
        assert_eq!(cum[TTFT_BOUNDS.len() - 1], 2);
        assert_eq!(*cum.last().unwrap(), 3);
        assert_eq!(h.count(), 3);
        assert!((h.sum_seconds() - 5000.002001).abs() < 1e-9);
    }
}
