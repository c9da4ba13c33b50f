//! Reports: how a run felt, per priority and overall, measured the same way by every driver.
//!
//! Numbers from the live benchmark and the fleet simulator are only comparable if they are
//! computed by one piece of code, so both drivers produce the same per-request
//! [`RequestRecord`]s (with a [`RequestTracker`] fed token arrival times as they happen) and hand
//! them to one [`ReportBuilder`]. What a [`Report`] holds, per priority and overall:
//!
//! * p50 / p90 / p99 of TTFT, inter-token latency (over every gap of every request, as vLLM's
//!   benchmark counts ITL), TPOT and end-to-end latency;
//! * **SLO attainment** as DistServe (OSDI'24) defines it: TTFT ≤ X and TPOT ≤ Y, with each
//!   request's own SLA, or [`ReportConfig::default_sla`] where it has none;
//! * **mean Andes QoE** (arXiv 2404.16283) with `T0` the request's SLA TTFT (else
//!   [`ReportConfig::target_ttft_ms`], 300 ms) and `r` = 30 tokens/s, and the share of requests
//!   with QoE ≥ 0.9 (Andes' "acceptable");
//! * errors by kind, and the achieved rate.
//!
//! A failed request counts in every share as a miss: no SLO attained, QoE 0 (the user did not get
//! the answer), because a router that sheds load must not look better for it. Latency percentiles
//! cover the requests that got that far (TTFT: a first token; end-to-end: completed).
//!
//! Reports serialize to JSON (serde; the field names are the format) and render as Markdown, one
//! report or several side by side ([`ReportSet`]).
//!
//! ## Bounded memory
//!
//! Nothing here grows with the number of requests: a tracker keeps a [`QoeAccumulator`] and a
//! sparse histogram of its gaps (at most [`BUCKETS`] entries); the builder keeps fixed-size
//! histograms ([`LatencyHistogram`]: log-linear buckets, exact below 64 µs, then 32 per power of
//! two, so a percentile is within 1.6% of the true value) and counters.

use crate::workload::Sla;
use qoe_core::qoe_metric::{QoeAccumulator, QoeParams, Slo, ACCEPTABLE_QOE};
use qoe_core::{Micros, Priority, MICROS_PER_MS};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Values below this many microseconds get a bucket each.
const LINEAR: u64 = 64;
/// Sub-buckets per power of two above [`LINEAR`].
const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
/// Largest power of two tracked (2^41 µs ≈ 25 days); larger values land in the last bucket.
const MAX_EXP: u32 = 40;
/// Buckets of a [`LatencyHistogram`].
pub const BUCKETS: usize = LINEAR as usize + ((MAX_EXP - 6 + 1) as usize) * SUB as usize;

fn bucket_of(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let e = 63 - v.leading_zeros();
    if e > MAX_EXP {
        return BUCKETS - 1;
    }
    LINEAR as usize + (e - 6) as usize * SUB as usize + ((v >> (e - SUB_BITS)) & (SUB - 1)) as usize
}

/// `[low, high)` of bucket `i`.
fn bucket_bounds(i: usize) -> (u64, u64) {
    if (i as u64) < LINEAR {
        return (i as u64, i as u64 + 1);
    }
    let j = i as u64 - LINEAR;
    let e = 6 + (j / SUB) as u32;
    let sub = j % SUB;
    let width = 1u64 << (e - SUB_BITS);
    let low = (1u64 << e) + sub * width;
    (low, low + width)
}

/// A fixed-size histogram of latencies in microseconds.
#[derive(Clone, Debug, PartialEq)]
pub struct LatencyHistogram {
    counts: Vec<u64>,
    count: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: vec![0; BUCKETS],
            count: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }
}

impl LatencyHistogram {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn record(&mut self, v: Micros) {
        self.record_n(v, 1);
    }

    /// Records `v` `n` times.
    pub fn record_n(&mut self, v: Micros, n: u64) {
        if n == 0 {
            return;
        }
        self.counts[bucket_of(v)] += n;
        self.count += n;
        self.sum += v as u128 * n as u128;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    /// Adds a request's gap histogram.
    pub fn merge_gaps(&mut self, gaps: &GapSummary) {
        for &(b, n) in &gaps.buckets {
            self.counts[b as usize] += n as u64;
        }
        if gaps.count > 0 {
            self.count += gaps.count;
            self.sum += gaps.sum_us as u128;
            self.min = self.min.min(gaps.min_us);
            self.max = self.max.max(gaps.max_us);
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum as f64 / self.count as f64)
    }

    pub fn max(&self) -> Option<Micros> {
        (self.count > 0).then_some(self.max)
    }

    /// The `q` quantile (nearest rank), as its bucket's midpoint clamped to the observed range;
    /// `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, hi) = bucket_bounds(i);
                let mid = if hi - lo == 1 {
                    lo as f64
                } else {
                    (lo + hi) as f64 / 2.0
                };
                return Some(mid.clamp(self.min as f64, self.max as f64));
            }
        }
        Some(self.max as f64)
    }

    /// p50, p90, p99, mean and max in milliseconds.
    pub fn percentiles_ms(&self) -> Percentiles {
        let ms = |v: Option<f64>| v.map(|us| us / MICROS_PER_MS as f64);
        Percentiles {
            count: self.count,
            mean: ms(self.mean()),
            p50: ms(self.quantile(0.5)),
            p90: ms(self.quantile(0.9)),
            p99: ms(self.quantile(0.99)),
            max: ms(self.max().map(|m| m as f64)),
        }
    }
}

/// The inter-token gaps of one request: count, sum, extremes and a sparse histogram (bucket,
/// count) with at most [`BUCKETS`] entries, so ITL percentiles over all gaps of a run can be
/// computed without keeping timestamps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GapSummary {
    pub count: u64,
    pub sum_us: u64,
    pub min_us: u64,
    pub max_us: u64,
    /// `(bucket, count)`, sorted by bucket.
    pub buckets: Vec<(u16, u32)>,
}

impl GapSummary {
    /// Records a gap of `gap` µs, `n` times, holding back a run of gaps in one bucket in `run`
    /// (bucket, count) and adding it to the histogram when the bucket changes: a stream's gaps mostly repeat their
    /// bucket, and `run` lives with the caller's hot state while `buckets` is a cold heap block.
    /// [`Self::flush`] before reading `buckets`.
    pub fn record_n_deferred(&mut self, gap: Micros, n: u64, run: &mut (u16, u64)) {
        if n == 0 {
            return;
        }
        self.add_to_stats(gap, n);
        let b = bucket_of(gap) as u16;
        if run.1 > 0 && run.0 == b {
            run.1 += n;
        } else {
            self.add_to_bucket(run.0, run.1);
            *run = (b, n);
        }
    }

    /// Adds the run held back by [`Self::record_n_deferred`] to the histogram.
    pub fn flush(&mut self, run: &mut (u16, u64)) {
        self.add_to_bucket(run.0, run.1);
        *run = (0, 0);
    }

    /// Counts `n` gaps of `gap` µs in the count, sum and extremes (`n` > 0).
    fn add_to_stats(&mut self, gap: Micros, n: u64) {
        if self.count == 0 {
            self.min_us = gap;
        }
        self.count += n;
        self.sum_us = self.sum_us.saturating_add(gap.saturating_mul(n));
        self.min_us = self.min_us.min(gap);
        self.max_us = self.max_us.max(gap);
    }

    /// Adds `n` gaps to bucket `b` of the histogram (count, sum and extremes are the caller's).
    fn add_to_bucket(&mut self, b: u16, n: u64) {
        if n == 0 {
            return;
        }
        let add = n.min(u32::MAX as u64) as u32;
        match self.buckets.binary_search_by_key(&b, |&(k, _)| k) {
            Ok(i) => self.buckets[i].1 = self.buckets[i].1.saturating_add(add),
            Err(i) => self.buckets.insert(i, (b, add)),
        }
    }

    /// Mean gap, µs.
    pub fn mean_us(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum_us as f64 / self.count as f64)
    }
}

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The stream completed.
    Ok,
    /// The server answered with this non-success HTTP status.
    Http(u16),
    /// Not sent: the load generator's in-flight bound was reached.
    ClientOverload,
    /// No answer, or no end of stream, within the time limit.
    Timeout,
    /// The connection could not be made or was refused.
    Connect,
    /// The stream broke, or carried an error event.
    Stream,
    /// The stream ended without its end marker (`data: [DONE]`).
    Truncated,
    /// The stream completed without a single token.
    Empty,
    /// Refused before it started (by a simulated engine's or router's admission).
    Rejected,
}

impl Status {
    pub fn is_ok(self) -> bool {
        self == Status::Ok
    }

    /// A short name for error tables: `http_503`, `client_overload`, ...
    pub fn key(self) -> String {
        match self {
            Status::Ok => "ok".into(),
            Status::Http(code) => format!("http_{code}"),
            Status::ClientOverload => "client_overload".into(),
            Status::Timeout => "timeout".into(),
            Status::Connect => "connect".into(),
            Status::Stream => "stream".into(),
            Status::Truncated => "truncated".into(),
            Status::Empty => "empty".into(),
            Status::Rejected => "rejected".into(),
        }
    }
}

/// What a request measured, once it is over.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub id: u64,
    /// 1 (high) to 3 (low).
    pub priority: u8,
    pub sla: Option<Sla>,
    /// When it was sent, on the driver's clock.
    pub sent_at: Micros,
    /// Time to first token, µs after `sent_at`.
    pub ttft: Option<Micros>,
    pub itl: GapSummary,
    /// DistServe's TPOT, seconds: `(t_last − t_first)/(n − 1)`.
    pub tpot_s: Option<f64>,
    /// Sent to finished (or failed), µs.
    pub e2e: Micros,
    pub output_tokens: u64,
    pub status: Status,
    /// Andes QoE in `[0, 1]`; 0 for a failed request.
    pub qoe: f64,
    /// TTFT ≤ SLA and TPOT ≤ SLA, for a completed request.
    pub slo_met: bool,
}

/// One request as `simulate --records` and `bench --records` write it, a JSON line each: what the
/// client measured, where the router sent it, and what the policy predicted there. Absent values
/// are `null`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestLine {
    pub id: u64,
    /// Sent at, seconds after the run started (virtual time in a simulation).
    pub sent_at_s: f64,
    pub priority: u8,
    /// Where it went: in a simulation the engine's label (`profile#index`) of the last attempt;
    /// live, the router's `x-qoe-endpoint` response header. `null` if never routed or unknown.
    pub endpoint: Option<String>,
    /// Live, as the workload planned them; in a simulation, as the router counts them (the
    /// simulated engine counts the same).
    pub prompt_tokens: u32,
    pub output_tokens: u64,
    pub status: Status,
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
    pub e2e_ms: f64,
    pub qoe: f64,
    pub slo_met: bool,
    /// What a cost-based policy predicted at the chosen endpoint (simulation only).
    pub predicted_ttft_ms: Option<f64>,
    pub predicted_itl_ms: Option<f64>,
    /// Prompt tokens the policy expected the engine to find cached.
    pub predicted_cached_tokens: Option<u32>,
}

impl RequestLine {
    pub fn new(
        record: &RequestRecord,
        endpoint: Option<String>,
        prompt_tokens: u32,
        detail: Option<&qoe_core::policy::DecisionDetail>,
    ) -> RequestLine {
        let ms = |us: Micros| us as f64 / 1e3;
        RequestLine {
            id: record.id,
            sent_at_s: record.sent_at as f64 / 1e6,
            priority: record.priority,
            endpoint,
            prompt_tokens,
            output_tokens: record.output_tokens,
            status: record.status,
            ttft_ms: record.ttft.map(ms),
            tpot_ms: record.tpot_s.map(|t| t * 1e3),
            e2e_ms: ms(record.e2e),
            qoe: record.qoe,
            slo_met: record.slo_met,
            predicted_ttft_ms: detail.map(|d| d.predicted_ttft_ms),
            predicted_itl_ms: detail.map(|d| d.predicted_itl_ms),
            predicted_cached_tokens: detail.map(|d| d.cached_tokens),
        }
    }

    /// The line as written: JSON and a newline.
    pub fn to_json_line(&self) -> String {
        let mut text = serde_json::to_string(self).expect("a request line serializes");
        text.push('\n');
        text
    }
}

impl RequestRecord {
    /// A request that failed before any token: `status` at `at`.
    pub fn failed(
        id: u64,
        priority: Priority,
        sla: Option<Sla>,
        sent_at: Micros,
        at: Micros,
        status: Status,
    ) -> RequestRecord {
        RequestRecord {
            id,
            priority: priority.level(),
            sla,
            sent_at,
            ttft: None,
            itl: GapSummary::default(),
            tpot_s: None,
            e2e: at.saturating_sub(sent_at),
            output_tokens: 0,
            status: if status.is_ok() {
                Status::Empty
            } else {
                status
            },
            qoe: 0.0,
            slo_met: false,
        }
    }
}

/// What "good" means for requests that do not say.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReportConfig {
    /// The SLO of requests without an SLA.
    pub default_sla: Sla,
    /// Andes' `T0` for requests without an SLA (the router's `target_ttft`), ms.
    pub target_ttft_ms: u32,
    /// Andes' `r`, the reading speed (the router's `optimal_throughput`), tokens/s.
    pub tokens_per_s: f64,
}

impl Default for ReportConfig {
    /// T0 300 ms and r 30 tokens/s (FIELD-NOTES); the default SLO is TTFT 300 ms (the same T0)
    /// and TPOT 100 ms (DistServe's chatbot SLO).
    fn default() -> Self {
        ReportConfig {
            default_sla: Sla {
                ttft_ms: 300,
                tpot_ms: 100,
            },
            target_ttft_ms: 300,
            tokens_per_s: 30.0,
        }
    }
}

impl ReportConfig {
    /// The QoE parameters of a request with `sla`.
    pub fn qoe_params(&self, sla: Option<Sla>) -> QoeParams {
        QoeParams {
            ttft_s: sla.map_or(self.target_ttft_ms, |s| s.ttft_ms) as f64 / 1e3,
            tokens_per_s: self.tokens_per_s,
        }
    }

    /// The SLO a request with `sla` is judged by.
    pub fn slo(&self, sla: Option<Sla>) -> Slo {
        sla.unwrap_or(self.default_sla).slo()
    }
}

/// Follows one request as its tokens arrive; [`RequestTracker::finish`] makes its record.
#[derive(Clone, Debug)]
pub struct RequestTracker {
    id: u64,
    priority: Priority,
    sla: Option<Sla>,
    slo: Slo,
    sent_at: Micros,
    acc: QoeAccumulator,
    first: Option<Micros>,
    last: Micros,
    gaps: GapSummary,
    /// The run of gaps not yet in `gaps.buckets` ([`GapSummary::record_n_deferred`]).
    run: (u16, u64),
    reported: Option<u64>,
}

impl RequestTracker {
    /// A request sent at `sent_at` (on the same clock as the token times that follow).
    pub fn new(
        id: u64,
        priority: Priority,
        sla: Option<Sla>,
        sent_at: Micros,
        cfg: &ReportConfig,
    ) -> Self {
        RequestTracker {
            id,
            priority,
            sla,
            slo: cfg.slo(sla),
            sent_at,
            acc: QoeAccumulator::new(cfg.qoe_params(sla)),
            first: None,
            last: sent_at,
            gaps: GapSummary::default(),
            run: (0, 0),
            reported: None,
        }
    }

    /// `count` tokens arrived together at `at`. A chunk of several tokens spreads its gap evenly
    /// over them (one SSE chunk per token, as vLLM streams, gives one gap per token).
    pub fn on_tokens(&mut self, at: Micros, count: u64) {
        if count == 0 {
            return;
        }
        let at = at.max(self.last);
        if self.first.is_none() {
            self.first = Some(at);
            if count > 1 {
                self.gaps.record_n_deferred(0, count - 1, &mut self.run);
            }
        } else {
            let gap = at - self.last;
            self.gaps
                .record_n_deferred(gap / count, count, &mut self.run);
        }
        self.last = at;
        self.acc.push_n_micros(at - self.sent_at, count);
    }

    /// Tokens seen so far.
    pub fn tokens(&self) -> u64 {
        self.acc.tokens()
    }

    /// The server's own count of output tokens (e.g. the final `usage.completion_tokens`); the
    /// record reports the larger of it and the tokens seen.
    pub fn set_reported_tokens(&mut self, n: u64) {
        self.reported = Some(n);
    }

    /// Ends the request at `at` with `status`. A successful stream without a token becomes
    /// [`Status::Empty`].
    pub fn finish(mut self, at: Micros, status: Status) -> RequestRecord {
        self.gaps.flush(&mut self.run);
        let tokens = self.acc.tokens();
        let status = if status.is_ok() && tokens == 0 {
            Status::Empty
        } else {
            status
        };
        let ok = status.is_ok();
        RequestRecord {
            id: self.id,
            priority: self.priority.level(),
            sla: self.sla,
            sent_at: self.sent_at,
            ttft: self.first.map(|f| f - self.sent_at),
            itl: self.gaps,
            tpot_s: self.acc.tpot(),
            e2e: at.max(self.last).saturating_sub(self.sent_at),
            output_tokens: tokens.max(self.reported.unwrap_or(0)),
            status,
            qoe: if ok { self.acc.finish() } else { 0.0 },
            slo_met: ok && self.acc.slo_met(self.slo),
        }
    }
}

/// p50 / p90 / p99 / mean / max of a latency, milliseconds (`None` with no sample).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean: Option<f64>,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

/// The numbers of one scope: all requests, or one priority.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// `None` for all requests.
    pub priority: Option<u8>,
    pub requests: u64,
    pub completed: u64,
    pub errors: u64,
    /// By [`Status::key`].
    pub errors_by_kind: BTreeMap<String, u64>,
    pub output_tokens: u64,
    /// Completed requests per second of the run.
    pub achieved_rps: f64,
    pub output_tokens_per_s: f64,
    pub ttft_ms: Percentiles,
    pub itl_ms: Percentiles,
    pub tpot_ms: Percentiles,
    pub e2e_ms: Percentiles,
    /// Share of requests meeting their SLO (DistServe), failures counted as misses.
    pub slo_attainment: f64,
    /// Mean Andes QoE, failures counted as 0.
    pub mean_qoe: f64,
    /// Share of requests with QoE ≥ 0.9.
    pub qoe_acceptable_share: f64,
}

impl Summary {
    /// `"all"` or `"p1"`, `"p2"`, `"p3"`.
    pub fn scope(&self) -> String {
        self.priority
            .map_or_else(|| "all".to_string(), |p| format!("p{p}"))
    }
}

#[derive(Clone, Debug, Default)]
struct Scope {
    requests: u64,
    completed: u64,
    errors: BTreeMap<String, u64>,
    output_tokens: u64,
    ttft: LatencyHistogram,
    itl: LatencyHistogram,
    tpot: LatencyHistogram,
    e2e: LatencyHistogram,
    slo_met: u64,
    qoe_sum: f64,
    qoe_acceptable: u64,
}

impl Scope {
    fn add(&mut self, r: &RequestRecord) {
        self.requests += 1;
        if r.status.is_ok() {
            self.completed += 1;
            self.e2e.record(r.e2e);
        } else {
            *self.errors.entry(r.status.key()).or_default() += 1;
        }
        if let Some(t) = r.ttft {
            self.ttft.record(t);
        }
        if let Some(t) = r.tpot_s {
            if r.output_tokens > 1 {
                self.tpot.record((t * 1e6).round() as Micros);
            }
        }
        self.itl.merge_gaps(&r.itl);
        self.output_tokens += r.output_tokens;
        self.slo_met += r.slo_met as u64;
        let qoe = if r.qoe.is_finite() {
            r.qoe.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.qoe_sum += qoe;
        self.qoe_acceptable += (qoe >= ACCEPTABLE_QOE) as u64;
    }

    fn summary(&self, priority: Option<u8>, duration_s: f64) -> Summary {
        let share = |n: u64| {
            if self.requests == 0 {
                0.0
            } else {
                n as f64 / self.requests as f64
            }
        };
        let per_s = |n: u64| {
            if duration_s > 0.0 {
                n as f64 / duration_s
            } else {
                0.0
            }
        };
        Summary {
            priority,
            requests: self.requests,
            completed: self.completed,
            errors: self.requests - self.completed,
            errors_by_kind: self.errors.clone(),
            output_tokens: self.output_tokens,
            achieved_rps: per_s(self.completed),
            output_tokens_per_s: per_s(self.output_tokens),
            ttft_ms: self.ttft.percentiles_ms(),
            itl_ms: self.itl.percentiles_ms(),
            tpot_ms: self.tpot.percentiles_ms(),
            e2e_ms: self.e2e.percentiles_ms(),
            slo_attainment: share(self.slo_met),
            mean_qoe: if self.requests == 0 {
                0.0
            } else {
                self.qoe_sum / self.requests as f64
            },
            qoe_acceptable_share: share(self.qoe_acceptable),
        }
    }
}

/// Who and what a report is about.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReportMeta {
    /// The name in comparison tables (a policy, a router, ...).
    pub label: String,
    /// The URL driven (live), or the fleet (simulated).
    pub target: Option<String>,
    /// The model the requests named (live runs).
    pub model: Option<String>,
    pub workload: String,
    pub seed: u64,
    /// How late, at worst, a request was sent after its planned time (live runs).
    pub max_send_lag_ms: Option<f64>,
}

/// Collects records into a [`Report`].
#[derive(Clone, Debug)]
pub struct ReportBuilder {
    cfg: ReportConfig,
    all: Scope,
    by_priority: [Scope; 3],
    first_sent: Option<Micros>,
    last_sent: Micros,
    last_end: Micros,
}

impl ReportBuilder {
    pub fn new(cfg: ReportConfig) -> Self {
        ReportBuilder {
            cfg,
            all: Scope::default(),
            by_priority: Default::default(),
            first_sent: None,
            last_sent: 0,
            last_end: 0,
        }
    }

    pub fn config(&self) -> &ReportConfig {
        &self.cfg
    }

    /// Adds one request (any order).
    pub fn add(&mut self, r: &RequestRecord) {
        self.all.add(r);
        let p = Priority::new(r.priority).unwrap_or_default();
        self.by_priority[p.index()].add(r);
        self.first_sent = Some(self.first_sent.map_or(r.sent_at, |f| f.min(r.sent_at)));
        self.last_sent = self.last_sent.max(r.sent_at);
        self.last_end = self.last_end.max(r.sent_at.saturating_add(r.e2e));
    }

    /// Requests added so far.
    pub fn requests(&self) -> u64 {
        self.all.requests
    }

    /// Errors so far.
    pub fn errors(&self) -> u64 {
        self.all.requests - self.all.completed
    }

    /// The report: overall, and one section per priority that had requests.
    pub fn finish(&self, meta: ReportMeta) -> Report {
        let first = self.first_sent.unwrap_or(0);
        let duration_s = self.last_end.saturating_sub(first) as f64 / 1e6;
        let send_span_s = self.last_sent.saturating_sub(first) as f64 / 1e6;
        let by_priority = Priority::ALL
            .iter()
            .zip(&self.by_priority)
            .filter(|(_, s)| s.requests > 0)
            .map(|(p, s)| s.summary(Some(p.level()), duration_s))
            .collect();
        Report {
            label: meta.label,
            target: meta.target,
            model: meta.model,
            workload: meta.workload,
            seed: meta.seed,
            duration_s,
            offered_rps: if send_span_s > 0.0 && self.all.requests > 1 {
                (self.all.requests - 1) as f64 / send_span_s
            } else {
                0.0
            },
            max_send_lag_ms: meta.max_send_lag_ms,
            config: self.cfg,
            overall: self.all.summary(None, duration_s),
            by_priority,
        }
    }
}

/// One run's results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub label: String,
    pub target: Option<String>,
    /// The model the requests named (live runs; simulated ones have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub workload: String,
    pub seed: u64,
    /// First request sent to last request finished, seconds.
    pub duration_s: f64,
    /// Requests per second as sent; 0 when they were all sent at once, or only one was.
    pub offered_rps: f64,
    pub max_send_lag_ms: Option<f64>,
    pub config: ReportConfig,
    pub overall: Summary,
    /// Priorities that had requests, 1 first.
    pub by_priority: Vec<Summary>,
}

impl Report {
    /// `overall`, then each priority.
    pub fn scopes(&self) -> impl Iterator<Item = &Summary> {
        std::iter::once(&self.overall).chain(&self.by_priority)
    }

    pub fn priority(&self, level: u8) -> Option<&Summary> {
        self.by_priority.iter().find(|s| s.priority == Some(level))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report serializes")
    }

    /// A heading, one table row per scope, and the errors by kind.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "### {}\n", md_escape(&self.label));
        let target = self
            .target
            .as_deref()
            .map(|t| format!(" against `{t}`"))
            .unwrap_or_default();
        let model = self
            .model
            .as_deref()
            .map(|m| format!(" (model `{}`)", m.replace('`', "'")))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "Workload `{}`{target}{model}, seed {}: {} requests in {:.1} s ({}){}.\n",
            self.workload,
            self.seed,
            self.overall.requests,
            self.duration_s,
            match self.offered_rps {
                // A trace whose requests all have one timestamp, or a single request.
                0.0 if self.overall.requests > 1 => "all offered at once".to_string(),
                0.0 => "one request".to_string(),
                rps => format!("offered {rps:.2} req/s"),
            },
            self.max_send_lag_ms
                .map(|l| format!(", sent at most {l:.1} ms late"))
                .unwrap_or_default(),
        );
        out.push_str(
            "| scope | requests | errors | done/s | TTFT p50 / p90 / p99 (ms) | ITL p50 / p90 / p99 (ms) \
             | TPOT p50 / p99 (ms) | E2E p50 / p90 / p99 (ms) | SLO met | mean QoE | QoE ≥ 0.9 |\n",
        );
        out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for s in self.scopes() {
            let three = |p: &Percentiles| format!("{} / {} / {}", ms(p.p50), ms(p.p90), ms(p.p99));
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.2} | {} | {} | {} / {} | {} | {} | {:.3} | {} |",
                s.scope(),
                s.requests,
                s.errors,
                s.achieved_rps,
                three(&s.ttft_ms),
                three(&s.itl_ms),
                ms(s.tpot_ms.p50),
                ms(s.tpot_ms.p99),
                three(&s.e2e_ms),
                pct(s.slo_attainment),
                s.mean_qoe,
                pct(s.qoe_acceptable_share),
            );
        }
        if !self.overall.errors_by_kind.is_empty() {
            let kinds: Vec<String> = self
                .overall
                .errors_by_kind
                .iter()
                .map(|(k, n)| format!("{k} × {n}"))
                .collect();
            let _ = writeln!(out, "\nErrors: {}.", kinds.join(", "));
        }
        let sla = self.config.default_sla;
        let _ = writeln!(
            out,
            "\nSLO: the request's SLA, else TTFT ≤ {} ms and TPOT ≤ {} ms. QoE: Andes, T0 = the SLA's TTFT \
             else {} ms, r = {} tok/s; failed requests count as misses and QoE 0. Percentiles: \
             nearest rank, read from histograms of 32 buckets per doubling (the bucket's midpoint, \
             within 1.6%); TTFT over requests with a first token, ITL and TPOT over those with two \
             or more (a stream cut short by a timeout included), end to end over completed ones.",
            sla.ttft_ms, sla.tpot_ms, self.config.target_ttft_ms, self.config.tokens_per_s
        );
        out
    }
}

/// Several labelled reports of the same workload: what `bench --compare` and `simulate` write.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReportSet {
    pub reports: Vec<Report>,
}

impl ReportSet {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report set serializes")
    }

    pub fn from_json(text: &str) -> Result<ReportSet, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The side-by-side table (with more than one report), then each report's own table.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        if self.reports.len() > 1 {
            out.push_str(&compare_markdown(&self.reports));
            out.push('\n');
        }
        for r in &self.reports {
            out.push_str(&r.to_markdown());
            out.push('\n');
        }
        out
    }
}

/// One table, a column per report, a row per metric: overall first, then per priority.
pub fn compare_markdown(reports: &[Report]) -> String {
    let mut out = String::new();
    out.push_str("| metric |");
    for r in reports {
        let _ = write!(out, " {} |", md_escape(&r.label));
    }
    out.push_str("\n|---|");
    for _ in reports {
        out.push_str("---:|");
    }
    out.push('\n');
    type Metric = (&'static str, fn(&Summary) -> String);
    let metrics: [Metric; 14] = [
        ("requests", |s| s.requests.to_string()),
        ("errors", |s| s.errors.to_string()),
        ("completed/s", |s| format!("{:.2}", s.achieved_rps)),
        ("TTFT p50 (ms)", |s| ms(s.ttft_ms.p50)),
        ("TTFT p90 (ms)", |s| ms(s.ttft_ms.p90)),
        ("TTFT p99 (ms)", |s| ms(s.ttft_ms.p99)),
        ("ITL p50 (ms)", |s| ms(s.itl_ms.p50)),
        ("ITL p99 (ms)", |s| ms(s.itl_ms.p99)),
        ("TPOT p50 (ms)", |s| ms(s.tpot_ms.p50)),
        ("E2E p50 (ms)", |s| ms(s.e2e_ms.p50)),
        ("E2E p99 (ms)", |s| ms(s.e2e_ms.p99)),
        ("SLO attainment", |s| pct(s.slo_attainment)),
        ("mean QoE", |s| format!("{:.3}", s.mean_qoe)),
        ("QoE ≥ 0.9", |s| pct(s.qoe_acceptable_share)),
    ];
    let row = |out: &mut String, name: &str, cell: &dyn Fn(&Report) -> String| {
        let _ = write!(out, "| {name} |");
        for r in reports {
            let _ = write!(out, " {} |", cell(r));
        }
        out.push('\n');
    };
    for (name, f) in &metrics {
        row(&mut out, name, &|r| f(&r.overall));
    }
    let per_priority: [Metric; 4] = [
        ("TTFT p50 (ms)", |s| ms(s.ttft_ms.p50)),
        ("TTFT p99 (ms)", |s| ms(s.ttft_ms.p99)),
        ("SLO attainment", |s| pct(s.slo_attainment)),
        ("mean QoE", |s| format!("{:.3}", s.mean_qoe)),
    ];
    for level in 1..=3u8 {
        if !reports.iter().any(|r| r.priority(level).is_some()) {
            continue;
        }
        for (name, f) in &per_priority {
            row(&mut out, &format!("p{level} {name}"), &|r| {
                r.priority(level).map_or_else(|| "—".to_string(), f)
            });
        }
    }
    out
}

/// Milliseconds with about three significant digits; `—` for none.
fn ms(v: Option<f64>) -> String {
    match v {
        None => "—".into(),
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) if x >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
    }
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deferred_gaps_make_the_same_summary() {
        // Runs in one bucket, bucket changes, returns to an earlier bucket, zero counts, zero
        // gaps, the last bucket.
        let gaps: [(Micros, u64); 11] = [
            (33_000, 1),
            (33_100, 3),
            (0, 2),
            (33_000, 1),
            (70_000, 0),
            (70_000, 5),
            (7, 1),
            (7, 1),
            (u64::MAX, 2),
            (33_050, 1),
            (0, 0),
        ];
        for take in 0..=gaps.len() {
            let (mut direct, mut deferred) = (GapSummary::default(), GapSummary::default());
            let mut run = (0, 0);
            for &(gap, n) in &gaps[..take] {
                // Every gap straight into its bucket.
                if n > 0 {
                    direct.add_to_stats(gap, n);
                    direct.add_to_bucket(bucket_of(gap) as u16, n);
                }
                deferred.record_n_deferred(gap, n, &mut run);
            }
            deferred.flush(&mut run);
            assert_eq!(deferred, direct, "first {take}");
            assert_eq!(run, (0, 0));
        }
    }

    const CFG: ReportConfig = ReportConfig {
        default_sla: Sla {
            ttft_ms: 300,
            tpot_ms: 100,
        },
        target_ttft_ms: 300,
        tokens_per_s: 30.0,
    };

    /// A request sent at `sent` whose `n` tokens start at `ttft` ms and come every `gap` ms.
    fn paced(
        id: u64,
        p: Priority,
        sent: Micros,
        ttft_ms: u64,
        gap_ms: u64,
        n: u64,
    ) -> RequestRecord {
        let mut t = RequestTracker::new(id, p, None, sent, &CFG);
        let mut at = sent + ttft_ms * 1000;
        for _ in 0..n {
            t.on_tokens(at, 1);
            at += gap_ms * 1000;
        }
        t.finish(at, Status::Ok)
    }

    #[test]
    fn buckets_are_contiguous_and_tight() {
        let mut prev_hi = 0;
        for i in 0..BUCKETS {
            let (lo, hi) = bucket_bounds(i);
            assert_eq!(lo, prev_hi, "bucket {i}");
            assert!(hi > lo);
            assert!((hi - lo) as f64 / lo.max(1) as f64 <= 1.0 / 32.0 + 1e-12 || lo < LINEAR);
            prev_hi = hi;
        }
        for v in [0, 1, 63, 64, 65, 127, 128, 1000, 123_456, 1 << 40, u64::MAX] {
            let b = bucket_of(v);
            let (lo, hi) = bucket_bounds(b);
            assert!(b == BUCKETS - 1 || (lo..hi).contains(&v), "{v}");
        }
    }

    #[test]
    fn histogram_percentiles_are_close() {
        let mut h = LatencyHistogram::new();
        for v in 1..=100_000u64 {
            h.record(v * 10);
        }
        for (q, want) in [(0.5, 500_000.0), (0.9, 900_000.0), (0.99, 990_000.0)] {
            let got = h.quantile(q).unwrap();
            assert!((got / want - 1.0).abs() < 0.016, "q{q}: {got}");
        }
        assert_eq!(h.quantile(1.0), Some(1_000_000.0));
        assert_eq!(h.quantile(0.0), Some(10.0));
        assert_eq!(LatencyHistogram::new().quantile(0.5), None);
        let mut small = LatencyHistogram::new();
        small.record(7);
        assert_eq!(small.percentiles_ms().p99, Some(0.007));
    }

    #[test]
    fn tracker_measures_a_paced_stream() {
        // First token at 300 ms, then one every 1/30 s: on the Andes schedule exactly.
        let mut t = RequestTracker::new(1, Priority::HIGH, None, 1_000_000, &CFG);
        for i in 0..30u64 {
            t.on_tokens(1_000_000 + 300_000 + i * 33_333, 1);
        }
        assert_eq!(t.tokens(), 30);
        let r = t.finish(2_400_000, Status::Ok);
        assert_eq!(r.ttft, Some(300_000));
        assert_eq!(r.itl.count, 29);
        assert_eq!((r.itl.min_us, r.itl.max_us), (33_333, 33_333));
        assert!((r.tpot_s.unwrap() - 0.033_333).abs() < 1e-6);
        assert_eq!(r.e2e, 1_400_000);
        assert!(r.qoe > 0.999, "{}", r.qoe);
        assert!(r.slo_met);
        assert_eq!(r.priority, 1);
    }

    #[test]
    fn slas_set_t0_and_the_slo() {
        let sla = Sla {
            ttft_ms: 100,
            tpot_ms: 20,
        };
        let mut t = RequestTracker::new(1, Priority::HIGH, Some(sla), 0, &CFG);
        t.on_tokens(200_000, 1);
        t.on_tokens(210_000, 1);
        let r = t.finish(210_000, Status::Ok);
        assert!(!r.slo_met, "TTFT 200 ms misses a 100 ms SLA");
        assert!(r.qoe < 1.0);
        // The same stream meets the default SLO and QoE target.
        let mut t = RequestTracker::new(1, Priority::HIGH, None, 0, &CFG);
        t.on_tokens(200_000, 1);
        t.on_tokens(210_000, 1);
        let r = t.finish(210_000, Status::Ok);
        assert!(r.slo_met);
        assert_eq!(r.qoe, 1.0);
    }

    #[test]
    fn batched_chunks_and_failures() {
        let mut t = RequestTracker::new(1, Priority::LOW, None, 0, &CFG);
        t.on_tokens(100_000, 3);
        t.on_tokens(160_000, 2);
        t.set_reported_tokens(6);
        let r = t.finish(200_000, Status::Truncated);
        assert_eq!(r.itl.count, 4);
        assert_eq!(r.itl.buckets.iter().map(|b| b.1 as u64).sum::<u64>(), 4);
        assert_eq!(r.output_tokens, 6);
        assert_eq!((r.qoe, r.slo_met), (0.0, false));
        let empty = RequestTracker::new(2, Priority::LOW, None, 0, &CFG).finish(5, Status::Ok);
        assert_eq!(empty.status, Status::Empty);
        let f = RequestRecord::failed(3, Priority::HIGH, None, 10, 15, Status::ClientOverload);
        assert_eq!((f.e2e, f.ttft, f.qoe), (5, None, 0.0));
    }

    #[test]
    fn report_sums_up_per_priority() {
        let mut b = ReportBuilder::new(CFG);
        for i in 0..90u64 {
            let p = if i % 3 == 0 {
                Priority::HIGH
            } else {
                Priority::DEFAULT
            };
            // TTFT grows with i: 100..=189 ms; 10 tokens 20 ms apart.
            b.add(&paced(i, p, i * 100_000, 100 + i, 20, 10));
        }
        for i in 0..10u64 {
            b.add(&RequestRecord::failed(
                100 + i,
                Priority::DEFAULT,
                None,
                9_000_000,
                9_000_000,
                if i < 7 {
                    Status::Http(503)
                } else {
                    Status::ClientOverload
                },
            ));
        }
        assert_eq!((b.requests(), b.errors()), (100, 10));
        let r = b.finish(ReportMeta {
            label: "x".into(),
            workload: "w".into(),
            seed: 3,
            ..Default::default()
        });
        assert_eq!(r.overall.requests, 100);
        assert_eq!(r.overall.completed, 90);
        assert_eq!(r.overall.errors_by_kind["http_503"], 7);
        assert_eq!(r.overall.errors_by_kind["client_overload"], 3);
        assert_eq!(r.by_priority.len(), 2);
        assert_eq!(r.priority(1).unwrap().requests, 30);
        assert_eq!(r.priority(2).unwrap().requests, 70);
        assert!(r.priority(3).is_none());
        let t = r.overall.ttft_ms;
        assert_eq!(t.count, 90);
        assert!(t.p50 <= t.p90 && t.p90 <= t.p99 && t.p99 <= t.max);
        assert!((t.p50.unwrap() - 144.0).abs() < 3.0, "{t:?}");
        let itl = r.overall.itl_ms;
        assert_eq!(itl.count, 90 * 9);
        assert!((itl.p50.unwrap() - 20.0).abs() < 0.4);
        // Every completed stream is on time: all attain, the failures do not.
        assert!((r.overall.slo_attainment - 0.9).abs() < 1e-12);
        assert!((r.overall.mean_qoe - 0.9).abs() < 1e-9);
        assert!((r.overall.qoe_acceptable_share - 0.9).abs() < 1e-12);
        assert_eq!(r.priority(1).unwrap().slo_attainment, 1.0);
        assert_eq!(r.overall.output_tokens, 900);
        assert!(r.duration_s > 9.0 && r.overall.achieved_rps > 0.0);

        let json = r.to_json();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back.overall.errors_by_kind, r.overall.errors_by_kind);
        assert_eq!(back.by_priority.len(), 2);
        assert_eq!(back.overall.ttft_ms.count, 90);
        let md = r.to_markdown();
        assert!(md.contains("| all | 100 | 10 |"), "{md}");
        assert!(md.contains("| p1 | 30 | 0 |"), "{md}");
        assert!(md.contains("http_503 × 7"), "{md}");
    }

    #[test]
    fn comparison_puts_reports_side_by_side() {
        let mk = |label: &str, ttft: u64, with_low: bool| {
            let mut b = ReportBuilder::new(CFG);
            for i in 0..10 {
                b.add(&paced(i, Priority::HIGH, i * 1000, ttft, 10, 5));
            }
            if with_low {
                b.add(&paced(99, Priority::LOW, 0, ttft, 10, 5));
            }
            b.finish(ReportMeta {
                label: label.into(),
                ..Default::default()
            })
        };
        let set = ReportSet {
            reports: vec![mk("qoe", 50, true), mk("round|robin", 500, false)],
        };
        let md = set.to_markdown();
        assert!(md.starts_with("| metric | qoe | round\\|robin |"), "{md}");
        assert!(md.contains("| TTFT p50 (ms) | 50.0 | 500 |"), "{md}");
        assert!(md.contains("| p1 SLO attainment | 100.0% | 0.0% |"), "{md}");
        assert!(md.contains("| p3 mean QoE | 1.000 | — |"), "{md}");
        let back = ReportSet::from_json(&set.to_json()).unwrap();
        assert_eq!(back.reports.len(), 2);
        assert_eq!(back.reports[1].label, "round|robin");
    }
}
