//! What a policy sees of one endpoint: a small, copyable snapshot.
//!
//! Three sources, each with its age: the router's own load accounting ([`Load`], exact and
//! instantaneous), what the router observed of finished and streaming requests ([`ObservedStats`],
//! fresh to the microsecond), and the engine's scraped `/metrics` ([`EngineMetrics`], seconds old).
//! Plus availability ([`Availability`]): health checks and the circuit breaker.

use crate::Micros;
use serde::Serialize;

/// Index of an endpoint in the table the views were built from. Only valid for that table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct EndpointId(pub u32);

/// What an endpoint does in disaggregated serving.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Prefill and decode on one engine (ordinary serving).
    #[default]
    Both,
    Prefill,
    Decode,
}

impl Role {
    /// Whether an endpoint of this role can take a request of `stage`: an engine set up for one
    /// stage refuses the other's requests (`kv_transfer_params`), and serves ordinary ones.
    pub fn takes(self, stage: crate::Stage) -> bool {
        !matches!(
            (self, stage),
            (Role::Prefill, crate::Stage::Decode) | (Role::Decode, crate::Stage::Prefill)
        )
    }
}

/// The router's own accounting of requests in flight on an endpoint. The same for every policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Load {
    /// Sent, no token received yet.
    pub in_prefill: u32,
    /// Streaming: at least one token received.
    pub in_decode: u32,
    /// Prompt tokens of requests still in prefill.
    pub prefill_tokens: u64,
    /// Expected output tokens still to come, summed over requests in flight.
    pub pending_output_tokens: u64,
}

impl Load {
    /// Requests in flight.
    pub fn in_flight(&self) -> u32 {
        self.in_prefill.saturating_add(self.in_decode)
    }
}

/// Router-observed statistics over the recent window (see [`crate::stats`]). `None` where no
/// request has produced the sample yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct ObservedStats {
    /// Smoothed time to first token, ms.
    pub ttft_ms: Option<f64>,
    /// Smoothed inter-token latency, ms per token.
    pub itl_ms: Option<f64>,
    /// Smoothed per-request output rate while streaming, tokens/s.
    pub tokens_per_s: Option<f64>,
    /// Smoothed end-to-end latency, ms.
    pub e2e_ms: Option<f64>,
    /// Smoothed prefill rate, prompt tokens per ms of TTFT (a lower bound on the engine's rate).
    pub prefill_tokens_per_ms: Option<f64>,
    /// Requests finished in the window (successes and failures).
    pub window_requests: u64,
    /// Requests per second finished over the window.
    pub qps: f64,
    /// Output tokens per second over the window, all requests together.
    pub output_tokens_per_s: f64,
    /// Share of the window's requests that failed (errors and timeouts), 0..1.
    pub error_rate: f64,
    /// Share of the window's requests that timed out, 0..1.
    pub timeout_rate: f64,
    /// When the last failure was seen.
    pub last_failure: Option<Micros>,
}

/// Signals read from an engine's Prometheus `/metrics`. Every field is optional: engines differ
/// (vLLM V1, vLLM V0, SGLang) and a scrape may miss some.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct EngineMetrics {
    /// Requests the engine is running (in its batch).
    pub running: Option<f64>,
    /// Requests waiting in the engine's queue.
    pub waiting: Option<f64>,
    /// KV cache usage, 0..1.
    pub kv_usage: Option<f64>,
    /// Prefix-cache queries (tokens), cumulative.
    pub prefix_queries: Option<f64>,
    /// Prefix-cache hits (tokens), cumulative.
    pub prefix_hits: Option<f64>,
    /// Prefix-cache hit rate, 0..1, where the engine reports it directly (vLLM V0, SGLang).
    pub prefix_hit_rate: Option<f64>,
    /// Preemptions, cumulative.
    pub preemptions: Option<f64>,
    /// Prompt tokens processed, cumulative.
    pub prompt_tokens: Option<f64>,
    /// Output tokens generated, cumulative.
    pub generation_tokens: Option<f64>,
    /// Sum and count of the TTFT histogram, seconds, cumulative.
    pub ttft_sum: Option<f64>,
    pub ttft_count: Option<f64>,
    /// Sum and count of the inter-token latency histogram, seconds, cumulative.
    pub itl_sum: Option<f64>,
    pub itl_count: Option<f64>,
    /// Most requests seen running at once over recent scrapes (derived, see
    /// [`EngineMetrics::follow`]): a lower bound on the engine's batch seats (`max_num_seqs`),
    /// reached once the engine has been full.
    pub peak_running: Option<f64>,
    /// The engine's batch seats when it looks seat-bound (derived, see [`EngineMetrics::follow`]):
    /// requests waited at this scrape and the one before while `running` stayed at its peak.
    pub full_seats: Option<f64>,
}

/// Per scrape, the remembered peak of `running` decays by this factor toward the current value
/// (half-life ≈ 693 scrapes, 11.5 min at the default 1 s interval), so an engine restarted with
/// fewer seats is re-learned.
pub const PEAK_RUNNING_DECAY: f64 = 0.999;

impl EngineMetrics {
    /// Whether the scrape said anything of the engine's load (requests running or waiting, KV
    /// cache usage): without, it was not an engine's metrics.
    pub fn reports_load(&self) -> bool {
        self.running.is_some() || self.waiting.is_some() || self.kv_usage.is_some()
    }

    /// The prefix-cache hit rate the engine reports, or the one its cumulative counters imply.
    pub fn hit_rate(&self) -> Option<f64> {
        self.prefix_hit_rate
            .or(match (self.prefix_hits, self.prefix_queries) {
                (Some(h), Some(q)) if q > 0.0 => Some((h / q).clamp(0.0, 1.0)),
                _ => None,
            })
    }

    /// Fills in what a scrape can only tell against the previous one of the same endpoint: the
    /// prefix-cache hit rate over the interval (vLLM V1 exports counters only) and the peak of
    /// `running`. The one derivation for every driver (the live scraper, the fleet simulator).
    pub fn follow(&mut self, prev: Option<&EngineMetrics>) {
        if let Some(prev) = prev {
            if self.prefix_hit_rate.is_none() {
                if let (Some(h), Some(q)) = (self.prefix_hits, self.prefix_queries) {
                    let dq = q - prev.prefix_queries.unwrap_or(0.0);
                    let dh = h - prev.prefix_hits.unwrap_or(0.0);
                    self.prefix_hit_rate = if dq > 0.0 && dh >= 0.0 {
                        Some((dh / dq).clamp(0.0, 1.0))
                    } else {
                        prev.hit_rate()
                    };
                }
            }
        }
        let running = self.running.filter(|r| r.is_finite() && *r >= 0.0);
        let before = prev
            .and_then(|p| p.peak_running)
            .filter(|r| r.is_finite() && *r >= 0.0)
            .map(|r| r * PEAK_RUNNING_DECAY);
        self.peak_running = match (running, before) {
            (Some(r), Some(b)) => Some(r.max(b)),
            (r, b) => r.or(b),
        };
        // Seat-bound: a queue at two scrapes in a row while the batch was at its peak both times.
        // One scrape's queue is often just the arrivals since the last iteration, and a batch
        // still climbing has seats to spare. (A batch at its peak moves by a seat or two between
        // scrapes as requests finish and queued ones take their seats: that is not growth.)
        let waits = |m: &EngineMetrics| m.waiting.is_some_and(|w| w.is_finite() && w >= 1.0);
        self.full_seats = match (prev, running, self.peak_running) {
            (Some(p), Some(r), Some(peak))
                if waits(self)
                    && waits(p)
                    && r >= 0.98 * peak
                    && p.running.is_some_and(|pr| pr >= 0.98 * peak) =>
            {
                Some(peak)
            }
            _ => None,
        };
    }
}

/// Circuit-breaker state of an endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BreakerState {
    #[default]
    Closed,
    /// One probe request is allowed through.
    HalfOpen,
    Open,
}

/// Whether the endpoint may take traffic, and how steady it has been.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Availability {
    /// Passing health checks (or not yet checked).
    pub healthy: bool,
    pub breaker: BreakerState,
    /// Health transitions (up→down or down→up) in the recent window.
    pub flaps: u32,
}

impl Default for Availability {
    fn default() -> Self {
        Availability {
            healthy: true,
            breaker: BreakerState::Closed,
            flaps: 0,
        }
    }
}

/// One endpoint as a policy sees it. Copyable and free of heap data, so building a slice of
/// views per request is cheap even for a thousand endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct EndpointView {
    pub id: EndpointId,
    /// Stable hash of the endpoint's URL: survives table reloads, used by policies that remember
    /// endpoints across requests (session ring, prefix index).
    pub key: u64,
    pub role: Role,
    pub load: Load,
    pub observed: ObservedStats,
    /// Last scraped engine metrics, if any.
    pub engine: Option<EngineMetrics>,
    /// When `engine` was scraped.
    pub engine_at: Option<Micros>,
    pub availability: Availability,
}

impl EndpointView {
    /// A fresh, idle endpoint with nothing observed: what a new endpoint looks like.
    pub fn idle(id: u32, key: u64) -> Self {
        EndpointView {
            id: EndpointId(id),
            key,
            role: Role::Both,
            load: Load::default(),
            observed: ObservedStats::default(),
            engine: None,
            engine_at: None,
            availability: Availability::default(),
        }
    }

    /// Age of the engine metrics at `now`, in microseconds; `None` if never scraped.
    pub fn engine_age(&self, now: Micros) -> Option<Micros> {
        self.engine_at.map(|at| now.saturating_sub(at))
    }
}
