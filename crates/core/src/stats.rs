//! Router-observed request statistics for one endpoint: a sliding window plus EWMAs.
//!
//! The window is a fixed ring of time buckets (counts and sums only), so memory is constant however
//! many requests pass; the EWMAs react within a few requests, the window gives rates (QPS, error
//! share). Both are fed with `now` by the caller, so the simulator can drive them in virtual time.

use crate::{Micros, ObservedStats};
use serde::Serialize;

/// Sizes and smoothing of [`RequestStats`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct StatsConfig {
    /// Length of the sliding window.
    pub window: Micros,
    /// Buckets the window is split into (its resolution).
    pub buckets: usize,
    /// EWMA weight of a new sample, 0..1.
    pub ewma_alpha: f64,
}

impl Default for StatsConfig {
    fn default() -> Self {
        StatsConfig {
            window: 60 * crate::MICROS_PER_SEC,
            buckets: 30,
            ewma_alpha: 0.2,
        }
    }
}

/// How a request ended, as the router saw it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RequestOutcome {
    pub prompt_tokens: u32,
    /// Output tokens counted on the stream (or from `usage`).
    pub output_tokens: u32,
    /// Time to first token, if a token arrived.
    pub ttft: Option<Micros>,
    /// Time from first to last token (0 for a single token).
    pub decode_time: Micros,
    pub e2e: Micros,
    pub failed: bool,
    pub timed_out: bool,
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    /// Bucket start divided by the bucket width; identifies which slot time it holds.
    epoch: u64,
    requests: u64,
    failures: u64,
    timeouts: u64,
    output_tokens: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Ewma(Option<f64>);

impl Ewma {
    fn push(&mut self, alpha: f64, sample: f64) {
        if !sample.is_finite() {
            return;
        }
        self.0 = Some(match self.0 {
            None => sample,
            Some(old) => old + alpha * (sample - old),
        });
    }
}

/// Windowed counters and smoothed latencies of one endpoint.
#[derive(Clone, Debug)]
pub struct RequestStats {
    config: StatsConfig,
    bucket_width: Micros,
    ring: Vec<Bucket>,
    ttft_ms: Ewma,
    itl_ms: Ewma,
    tokens_per_s: Ewma,
    e2e_ms: Ewma,
    prefill_tokens_per_ms: Ewma,
    last_failure: Option<Micros>,
    total_requests: u64,
    /// When the statistics began (the endpoint joined): rates are never averaged over time
    /// before it.
    created: Micros,
}

impl RequestStats {
    /// Statistics beginning at `created` (the caller's clock, as every `now` passed later).
    pub fn new(config: StatsConfig, created: Micros) -> Self {
        let buckets = config.buckets.max(1);
        RequestStats {
            config,
            bucket_width: (config.window / buckets as u64).max(1),
            ring: vec![Bucket::default(); buckets],
            ttft_ms: Ewma::default(),
            itl_ms: Ewma::default(),
            tokens_per_s: Ewma::default(),
            e2e_ms: Ewma::default(),
            prefill_tokens_per_ms: Ewma::default(),
            last_failure: None,
            total_requests: 0,
            created,
        }
    }

    fn bucket(&mut self, now: Micros) -> &mut Bucket {
        let epoch = now / self.bucket_width;
        let slot = (epoch % self.ring.len() as u64) as usize;
        let bucket = &mut self.ring[slot];
        if bucket.epoch != epoch {
            *bucket = Bucket {
                epoch,
                ..Bucket::default()
            };
        }
        bucket
    }

    /// Records a first token `ttft` after sending a request of `prompt_tokens`. Called as soon
    /// as it arrives, so TTFT reacts before the request finishes.
    pub fn record_ttft(&mut self, prompt_tokens: u32, ttft: Micros) {
        let alpha = self.config.ewma_alpha;
        let ms = ttft as f64 / 1e3;
        self.ttft_ms.push(alpha, ms);
        if prompt_tokens > 0 && ms > 0.0 {
            self.prefill_tokens_per_ms
                .push(alpha, prompt_tokens as f64 / ms);
        }
    }

    /// Records one inter-token gap of `gap` spread over `tokens` tokens (a chunk may carry several).
    pub fn record_itl(&mut self, gap: Micros, tokens: u32) {
        if tokens == 0 {
            return;
        }
        let per_token_ms = gap as f64 / 1e3 / tokens as f64;
        self.itl_ms.push(self.config.ewma_alpha, per_token_ms);
    }

    /// Records a finished request (success or failure) at `now`. TTFT was recorded already.
    pub fn record_outcome(&mut self, outcome: &RequestOutcome, now: Micros) {
        let alpha = self.config.ewma_alpha;
        self.total_requests += 1;
        let bucket = self.bucket(now);
        bucket.requests += 1;
        bucket.output_tokens += outcome.output_tokens as u64;
        if outcome.failed || outcome.timed_out {
            bucket.failures += 1;
            if outcome.timed_out {
                bucket.timeouts += 1;
            }
            self.last_failure = Some(now);
            return;
        }
        self.e2e_ms.push(alpha, outcome.e2e as f64 / 1e3);
        if outcome.output_tokens > 1 && outcome.decode_time > 0 {
            let rate = (outcome.output_tokens - 1) as f64 / (outcome.decode_time as f64 / 1e6);
            self.tokens_per_s.push(alpha, rate);
        }
    }

    /// Seconds the windowed rates at `now` are averaged over: from the start of the oldest
    /// bucket the ring holds (or from when the statistics began, if later) to `now`, and at
    /// least one bucket, so that a new endpoint's first request is not a rate of thousands
    /// per second.
    pub fn span_s(&self, now: Micros) -> f64 {
        let newest = now / self.bucket_width;
        let oldest = newest.saturating_sub(self.ring.len() as u64 - 1);
        let from = oldest.saturating_mul(self.bucket_width).max(self.created);
        now.saturating_sub(from).max(self.bucket_width) as f64 / 1e6
    }

    /// Requests recorded since creation.
    pub fn total_requests(&self) -> u64 {
        self.total_requests
    }

    /// The statistics as a policy sees them at `now`.
    pub fn snapshot(&self, now: Micros) -> ObservedStats {
        let newest = now / self.bucket_width;
        let oldest = newest.saturating_sub(self.ring.len() as u64 - 1);
        let (mut requests, mut failures, mut timeouts, mut tokens) = (0u64, 0u64, 0u64, 0u64);
        for b in &self.ring {
            if b.epoch >= oldest && b.epoch <= newest && (b.requests > 0) {
                requests += b.requests;
                failures += b.failures;
                timeouts += b.timeouts;
                tokens += b.output_tokens;
            }
        }
        let span_s = self.span_s(now);
        let share = |n: u64| {
            if requests == 0 {
                0.0
            } else {
                n as f64 / requests as f64
            }
        };
        ObservedStats {
            ttft_ms: self.ttft_ms.0,
            itl_ms: self.itl_ms.0,
            tokens_per_s: self.tokens_per_s.0,
            e2e_ms: self.e2e_ms.0,
            prefill_tokens_per_ms: self.prefill_tokens_per_ms.0,
            window_requests: requests,
            qps: requests as f64 / span_s,
            output_tokens_per_s: tokens as f64 / span_s,
            error_rate: share(failures),
            timeout_rate: share(timeouts),
            last_failure: self.last_failure,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MICROS_PER_SEC;

    fn ok(output_tokens: u32) -> RequestOutcome {
        RequestOutcome {
            prompt_tokens: 100,
            output_tokens,
            ttft: Some(50_000),
            decode_time: 1_000_000,
            e2e: 1_050_000,
            failed: false,
            timed_out: false,
        }
    }

    #[test]
    fn window_counts_and_expires() {
        let mut s = RequestStats::new(
            StatsConfig {
                window: 10 * MICROS_PER_SEC,
                buckets: 10,
                ewma_alpha: 0.5,
            },
            0,
        );
        let t0 = 100 * MICROS_PER_SEC;
        for i in 0..10 {
            s.record_outcome(&ok(11), t0 + i * MICROS_PER_SEC / 10);
        }
        let mut failed = ok(0);
        failed.failed = true;
        s.record_outcome(&failed, t0 + MICROS_PER_SEC);
        let snap = s.snapshot(t0 + MICROS_PER_SEC);
        assert_eq!(snap.window_requests, 11);
        assert!((snap.error_rate - 1.0 / 11.0).abs() < 1e-12);
        // At 101 s the ring holds the buckets from 92 s on: 9 s covered.
        assert!(
            (snap.qps - 11.0 / 9.0).abs() < 1e-9,
            "11 requests over the 9 s the window covers: {}",
            snap.qps
        );
        assert!((snap.output_tokens_per_s - 110.0 / 9.0).abs() < 1e-9);
        let half = s.snapshot(t0 + 3 * MICROS_PER_SEC / 2);
        assert!((half.qps - 11.0 / 9.5).abs() < 1e-9, "{}", half.qps);
        assert_eq!(snap.last_failure, Some(t0 + MICROS_PER_SEC));
        // 10 s decode of 10 gaps → 10 tokens/s.
        assert!((snap.tokens_per_s.unwrap() - 10.0).abs() < 1e-9);
        // Eleven seconds later everything has left the window; the EWMAs remain.
        let later = s.snapshot(t0 + 12 * MICROS_PER_SEC);
        assert_eq!(later.window_requests, 0);
        assert_eq!(later.error_rate, 0.0);
        assert!(later.e2e_ms.is_some());
    }

    #[test]
    fn ewma_tracks_ttft_and_itl() {
        let mut s = RequestStats::new(
            StatsConfig {
                ewma_alpha: 0.5,
                ..StatsConfig::default()
            },
            0,
        );
        s.record_ttft(1000, 100_000);
        s.record_ttft(1000, 200_000);
        let snap = s.snapshot(1);
        assert_eq!(snap.ttft_ms, Some(150.0));
        // 1000 tokens in 100 ms = 10 tok/ms, then 5 tok/ms → 7.5.
        assert_eq!(snap.prefill_tokens_per_ms, Some(7.5));
        s.record_itl(40_000, 2);
        assert_eq!(s.snapshot(1).itl_ms, Some(20.0));
        s.record_itl(40_000, 0);
        assert_eq!(s.snapshot(1).itl_ms, Some(20.0), "zero-token gaps ignored");
    }

    #[test]
    fn memory_is_constant_over_a_million_requests() {
        let mut s = RequestStats::new(StatsConfig::default(), 0);
        let before = s.ring.len();
        for i in 0..1_000_000u64 {
            s.record_ttft(10, 1000);
            s.record_outcome(&ok(5), i * 997);
        }
        assert_eq!(s.ring.len(), before);
        assert_eq!(s.total_requests(), 1_000_000);
        assert!(s.snapshot(1_000_000 * 997).window_requests > 0);
    }

    #[test]
    fn a_new_endpoints_rates_count_from_when_it_joined() {
        let config = StatsConfig {
            window: 60 * MICROS_PER_SEC,
            buckets: 30,
            ewma_alpha: 0.2,
        };
        // Joined 10 s ago on a clock that has run 100 s: 20 requests are 2 per second.
        let joined = 90 * MICROS_PER_SEC;
        let mut s = RequestStats::new(config, joined);
        for i in 0..20 {
            s.record_outcome(&ok(3), joined + i * MICROS_PER_SEC / 2);
        }
        let now = 100 * MICROS_PER_SEC;
        assert!(
            (s.snapshot(now).qps - 2.0).abs() < 1e-9,
            "{}",
            s.snapshot(now).qps
        );
        // A first request right after joining: a rate over one bucket (2 s), not over 1 ms.
        let mut fresh = RequestStats::new(config, joined);
        fresh.record_outcome(&ok(3), joined + 1_000);
        assert!((fresh.snapshot(joined + 1_000).qps - 0.5).abs() < 1e-9);
    }
}
