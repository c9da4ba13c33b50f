//! The fleet simulator: qoe-core policies routing a fleet of simulated engines, in virtual time.
//!
//! # Why
//!
//! DESIGN principle 1, "one brain, two clocks": the routing brain is a pure library, and two
//! drivers feed it the same types. The live router drives it with a wall clock and HTTP; this module
//! drives it with a discrete-event clock and [`Engine`]s, so a fleet of hundreds of engines and
//! hundreds of thousands of requests can be judged in seconds on two cores, deterministically.
//! What it shows about a policy is what the router does only if the policy sees exactly what the
//! router would show it, so this driver reproduces the router's side of every request, signal by
//! signal (`crates/router/src/{proxy,observe,endpoints,scrape}.rs`):
//!
//! | router (live) | here |
//! |---|---|
//! | `analyze()` of the HTTP body and headers | the same `qoe_core::analyze::analyze` on the body and headers the live `bench` client sends (`x-request-priority`, `x-sla-target-ms`, `x-expected-output-tokens` when the workload sends it, `x-session-id`) |
//! | `LoadGuard`: in prefill until the first token, then in decode; `prefill_tokens`; `pending_output_tokens` counted down per token | the same counters, in [`EndpointView::load`] |
//! | `RequestStats`: `record_ttft` at the first token, `record_itl` per token chunk, `record_outcome` at the end (not when the client left) | the same calls on the same `qoe_core::RequestStats` |
//! | policy feedback: `FirstToken` for streamed responses, `Finished` for every request the endpoint answered | the same [`Feedback`] values |
//! | `/metrics` scraped every `--engine-stats-interval` (1 s), stamped with the scrape time | [`EngineStats`](crate::EngineStats) copied into [`EngineMetrics`] every [`SimConfig::scrape_interval`], and only then |
//! | health checks every 2 s, unhealthy after 2 failures, healthy after 1 success | the same, against the fleet file's `available` changes |
//! | nothing reaches the client before the engine's first byte (the first token of a stream); until then a connect failure, a 429/5xx answer (an engine's full queue is a 503) or a connection closed (an engine going down) goes to another endpoint, up to 2 retries within the retry budget (10 s: 20% of the requests sent + 10/s), backoff 50 ms × 1.5ⁿ ±50%, with a failed outcome recorded and nothing fed back | the same, with a seeded jitter and the same `qoe_core::retry_budget` in virtual time |
//! | no first byte within `--first-byte-timeout-ms` (60 s): 504, not retried | the same |
//! | a stream that breaks after its first byte: an SSE error event, a failed outcome, `Finished { failed }` | the same |
//!
//! The client side is the live `bench` command's: requests planned by the same [`Workload`], sent
//! open loop, measured by the same [`RequestTracker`] into the same [`ReportBuilder`], so a
//! simulated [`Report`] and a live one have one format and one meaning. A client gives up after
//! [`SimConfig::request_timeout`] (the `bench --request-timeout`, 300 s), which the router sees as a
//! client that left: load released, nothing learned.
//!
//! # What the router cannot know, modelled
//!
//! * **Stale engine metrics.** A policy sees an engine's `running`, `waiting`, KV usage and
//!   counters as of the last scrape ([`SimConfig::scrape_interval`], default 1 s as the router's
//!   default), with `engine_at` telling their age; the router's own load counters and observed
//!   latencies are fresh, as live.
//! * **Output lengths.** By default ([`OutputHint::Header`]) the policy learns a request's output
//!   length from `x-expected-output-tokens` when the workload sends it. Otherwise a chat body
//!   carries no `max_tokens` and the analyzer falls back to the learned per-model estimate (an
//!   EWMA of finished outputs, as the router's `LearnedOutput`): the realistic case for chat
//!   clients, and the harder one. A completions body always carries `max_tokens` (without it vLLM
//!   stops at 16 tokens), so a workload that hides output lengths is a chat workload. The live
//!   `bench` client sends `max_tokens` = the true output (with `ignore_eos`, as vLLM's benchmark
//!   does), which tells the router the length even without the header; [`OutputHint::MaxTokens`]
//!   reproduces that, for comparing live and simulated runs.
//! * **Network delay** ([`SimConfig::network_delay`], default 0): one way between router and
//!   engines; a request reaches its engine, and each token reaches the router, that much later.
//!
//! The router's optional admission control (a priority queue in the router when every endpoint
//! is saturated, [`AdmissionSpec`]) and engine-priority injection
//! ([`SimConfig::engine_priority`]) are modelled too, off by default as in the router.
//!
//! Not modelled: the circuit breaker (endpoints stay `Closed`; health checks and the error and
//! timeout rates of the observed statistics are modelled), SLA shedding (`--sla-enforcement`), the
//! idle timeout between later chunks (simulated engines do not stall mid-stream), and HTTP's own
//! latency beyond
//! [`SimConfig::network_delay`]. A scrape taken while an iteration computes sees that iteration
//! already committed ([`Engine::step`] commits at once): at most one iteration (tens of ms) early,
//! against a scrape interval of a second.
//!
//! # Event order
//!
//! One heap of events ordered by (time, class, sequence). An engine iteration started at `t` with
//! duration `d` commits at once and stamps its tokens `t + d` ([`Engine::step`]); the simulator
//! delivers them to the router side at `t + d` (or `t + d + delay`) and only then starts the
//! engine's next iteration, so the router never sees a token before it exists. At equal times, fleet
//! changes come first, then iteration ends (tokens delivered), scrapes and health checks,
//! then requests reaching engines, timeouts, retries, and new arrivals last: a request arriving
//! at the instant a token lands sees the load that token left behind. Ties within a class go in
//! scheduling order. Same seed, same events, same report, byte for byte.
//!
//! # Bounded memory, and speed
//!
//! Requests live in a slab only while in flight; a finished request becomes one
//! [`RequestRecord`](crate::report::RequestRecord), added to the report's fixed-size histograms and dropped. Prompt text is
//! generated, analyzed and hashed once per request and not kept. The policy's candidate slice is
//! the fleet's views, kept current in place: load counters as they change, observed statistics
//! re-snapshotted only for endpoints whose statistics changed since the last decision (the rest get
//! their rates re-derived), engine metrics at scrapes. Target: 200 engines × 200,000 requests in a
//! minute on two cores (see `docs/PERFORMANCE.md`).

use crate::engine::{Engine, EngineConfig, EngineEvent, SimRequest, SubmitError};
use crate::fleet::Fleet;
use crate::report::{
    LatencyHistogram, Report, ReportBuilder, ReportConfig, ReportMeta, RequestLine, RequestTracker,
    Status, Summary,
};
use crate::rng::{mix64, SplitMix64};
use crate::workload::{Api, PlannedRequest, Requests, Workload};
use qoe_core::analyze::{analyze, AnalyzerConfig, Route};
use qoe_core::policy::{DecisionDetail, Feedback, FeedbackEvent, RoutingPolicy};
use qoe_core::prompt::{hash_bytes, BLOCK_TOKENS};
use qoe_core::qoe_metric::GOODPUT_ATTAINMENT;
use qoe_core::retry_budget::{RetryBudget, RetryBudgetConfig};
use qoe_core::{
    ApiKind, EndpointId, EndpointView, EngineMetrics, Load, Micros, Priority, RequestOutcome,
    RequestProfile, RequestStats, StatsConfig, MICROS_PER_SEC,
};
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::fmt;

/// Health transitions counted over this window for the flap signal (the router's `FLAP_WINDOW`).
pub const FLAP_WINDOW: Micros = 300 * MICROS_PER_SEC;

/// What tells the router a request's output length (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputHint {
    /// Only the `x-expected-output-tokens` header, when the workload sends it; otherwise the
    /// router's learned estimate. The default. (A completions body carries `max_tokens` even so,
    /// as a real completions client must.)
    #[default]
    Header,
    /// The header when sent, else `max_tokens` = the true output, as the live `bench` client sends.
    MaxTokens,
}

impl std::str::FromStr for OutputHint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "header" => Ok(OutputHint::Header),
            "max-tokens" => Ok(OutputHint::MaxTokens),
            other => Err(format!(
                "unknown output hint `{other}` (header, max-tokens)"
            )),
        }
    }
}

/// Everything that configures one simulated run besides the fleet, the workload and the policy.
/// The defaults are the live router's and the live `bench` client's.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    /// Seed of the workload's draws (the workload file's seed, usually), engine jitter and retry
    /// backoff. The policy's seed is its own ([`qoe_core::PolicyConfig::seed`]).
    pub seed: u64,
    /// How often the router scrapes every engine's `/metrics` (`--engine-stats-interval`, 1 s).
    pub scrape_interval: Micros,
    /// How often the router checks every engine's `/health` (2 s).
    pub health_interval: Micros,
    /// Consecutive failed checks before an endpoint is marked unhealthy (2).
    pub unhealthy_threshold: u32,
    /// Consecutive passed checks before it is healthy again (1).
    pub healthy_threshold: u32,
    /// One-way delay between the router and every engine (0).
    pub network_delay: Micros,
    /// What tells the router the output length.
    pub output_hint: OutputHint,
    /// The learned output estimate before any request finished (`--default-output-tokens`, 256).
    pub default_output_tokens: u32,
    /// Retries of a request that failed before reaching the client (`--max-retries`, 2).
    pub max_retries: u32,
    /// Base of the retry backoff (`--retry-backoff-ms`, 50 ms), × 1.5ⁿ, ±50%.
    pub retry_backoff: Micros,
    /// The retry budget (`--retry-budget-ratio`, `--retry-budget-min-per-sec`).
    pub retry_budget: RetryBudgetConfig,
    /// Time allowed for an engine's first byte, the first token of a stream
    /// (`--first-byte-timeout-ms`, 60 s); then the router answers 504. (The idle timeout between
    /// later chunks is not modelled: simulated engines never stall mid-stream.)
    pub first_byte_timeout: Micros,
    /// The client's time limit per request (`bench --request-timeout`, 300 s).
    pub request_timeout: Micros,
    /// Lognormal jitter of engine iteration times (the engine's `--jitter`, 0).
    pub jitter: f64,
    /// The model name requested.
    pub model: String,
    /// The router's observed-statistics window (`--request-stats-window`, 60 s).
    pub stats: StatsConfig,
    /// The analyzer's settings (header names, prefix hashing bound, phase rule).
    pub analyzer: AnalyzerConfig,
    /// What the report counts as good.
    pub report: ReportConfig,
    /// Points of the TTFT CDF kept for plotting.
    pub cdf_points: usize,
    /// The router's admission control (off by default, as in the router).
    pub admission: AdmissionSpec,
    /// Add the request's priority (1..3) as vLLM's `priority` field (`--engine-priority`): engines
    /// with `scheduling = "priority"` then serve priority 1 first.
    pub engine_priority: bool,
    /// SLA enforcement (`--sla-enforcement shed`): a priority-3 request with a TTFT deadline
    /// that no endpoint is predicted to meet (the policy's
    /// [`RoutingPolicy::best_predicted_ttft_ms`]) is refused at once with 429.
    pub sla_shed: bool,
}

/// The router's admission control (`crates/router/src/admission.rs`; its flags in parentheses):
/// an endpoint is saturated at `max_inflight` requests in flight (`--max-inflight-per-endpoint`),
/// KV usage `max_kv_usage` (`--saturation-kv-usage`) or `max_waiting` engine-queued requests
/// (`--saturation-waiting`), the last two from metrics no older than `metrics_max_age`. When every
/// candidate is saturated, or a more urgent request already waits, a request waits in the router,
/// ordered by priority, then TTFT deadline (arrival + SLA), then arrival; at most `queue_max`
/// (`--queue-max`) wait, a full queue refusing (429) the least urgent; a wait longer than
/// `queue_timeout` (`--queue-timeout`) is refused (429). A request ending anywhere wakes the most
/// urgent waiter; so do a scrape (metrics change) and a health change, for as long as capacity is
/// open (the router's waiters re-check every 100 ms).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdmissionSpec {
    /// When an endpoint counts as saturated (the rule shared with the simulator).
    pub limits: qoe_core::saturation::SaturationLimits,
    pub queue_max: usize,
    pub queue_timeout: Micros,
}

impl Default for AdmissionSpec {
    /// Off, with the router's bounds (metrics up to 3 scrape intervals old, 1,024 waiters, 30 s).
    fn default() -> Self {
        AdmissionSpec {
            limits: qoe_core::saturation::SaturationLimits {
                max_inflight: 0,
                max_kv_usage: 1.0,
                max_waiting: 0,
                metrics_max_age: 3 * MICROS_PER_SEC,
            },
            queue_max: 1024,
            queue_timeout: 30 * MICROS_PER_SEC,
        }
    }
}

impl AdmissionSpec {
    /// Whether any limit is set.
    pub fn enabled(&self) -> bool {
        self.limits.enabled()
    }

    /// Whether `view` is saturated at `now` (the rule in `qoe_core::saturation`).
    pub fn saturated(&self, view: &EndpointView, now: Micros) -> bool {
        self.limits.saturated(view, now)
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: crate::workload::DEFAULT_SEED,
            scrape_interval: MICROS_PER_SEC,
            health_interval: 2 * MICROS_PER_SEC,
            unhealthy_threshold: 2,
            healthy_threshold: 1,
            network_delay: 0,
            output_hint: OutputHint::Header,
            default_output_tokens: 256,
            max_retries: 2,
            retry_backoff: 50_000,
            retry_budget: RetryBudgetConfig::default(),
            first_byte_timeout: 60 * MICROS_PER_SEC,
            request_timeout: 300 * MICROS_PER_SEC,
            jitter: 0.0,
            model: "sim-llama".into(),
            stats: StatsConfig::default(),
            analyzer: AnalyzerConfig::default(),
            report: ReportConfig::default(),
            cdf_points: 200,
            admission: AdmissionSpec::default(),
            engine_priority: false,
            sla_shed: false,
        }
    }
}

/// Longest time setting a run accepts (intervals, timeouts, delays), seconds.
pub const MAX_TIME_SETTING_S: u64 = 1_000_000_000;

/// Why a run could not start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimError(pub String);

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SimError {}

impl SimConfig {
    /// Checks the settings a run relies on.
    pub fn validate(&self) -> Result<(), SimError> {
        let bad = |m: &str| Err(SimError(m.to_string()));
        if self.scrape_interval == 0 {
            return bad("the scrape interval must be positive");
        }
        if self.health_interval == 0 {
            return bad("the health-check interval must be positive");
        }
        if self.first_byte_timeout == 0 || self.request_timeout == 0 {
            return bad("timeouts must be positive");
        }
        let max = MAX_TIME_SETTING_S * MICROS_PER_SEC;
        for (what, t) in [
            ("scrape interval", self.scrape_interval),
            ("health-check interval", self.health_interval),
            ("network delay", self.network_delay),
            ("request timeout", self.request_timeout),
            ("statistics window", self.stats.window),
            ("admission queue timeout", self.admission.queue_timeout),
            (
                "admission metrics age",
                self.admission.limits.metrics_max_age,
            ),
        ] {
            if t > max {
                return Err(SimError(format!(
                    "the {what} must be at most {MAX_TIME_SETTING_S} s, got {} s",
                    t as f64 / 1e6
                )));
            }
        }
        // The longest retry wait: backoff × 1.5^retries, +50%.
        let wait = self.retry_backoff as f64 * 1.5f64.powf(self.max_retries as f64) * 1.5;
        if wait > max as f64 {
            return Err(SimError(format!(
                "the retry backoff ({} s) × 1.5^max_retries ({}) must stay below {MAX_TIME_SETTING_S} s",
                self.retry_backoff as f64 / 1e6,
                self.max_retries
            )));
        }
        if !(self.jitter.is_finite() && (0.0..=2.0).contains(&self.jitter)) {
            return bad("jitter must be in [0, 2]");
        }
        if self.model.is_empty() {
            return bad("the model name is empty");
        }
        if self.stats.window == 0 || self.stats.buckets == 0 {
            return bad("the statistics window must be positive");
        }
        let a = &self.admission;
        if !(a.limits.max_kv_usage.is_finite() && a.limits.max_kv_usage > 0.0) {
            return bad("the admission KV-usage limit must be in (0, 1] (1: none)");
        }
        if a.queue_max == 0 || a.queue_timeout == 0 {
            return bad("the admission queue needs a positive length and timeout");
        }
        Ok(())
    }
}

/// How one engine was used in a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EngineUsage {
    pub label: String,
    /// `label` without its `#index`: the fleet group it belongs to.
    pub group: String,
    /// Speed factor at the start of the run.
    pub speed: f64,
    /// Times the policy chose it (retries count again).
    pub picks: u64,
    /// The same picks by the request's priority (1, 2, 3).
    pub picks_by_priority: [u64; 3],
    /// Requests it completed.
    pub completed: u64,
    /// Of those, how many met their SLO, and how many missed its TTFT or its TPOT part (a
    /// request can miss both).
    pub slo_met: u64,
    pub ttft_missed: u64,
    pub tpot_missed: u64,
    /// Output tokens it delivered.
    pub output_tokens: u64,
    /// Mean TTFT of its requests that got a first token, ms (`None` if none did).
    pub mean_ttft_ms: Option<f64>,
    /// Share of the run it spent computing, 0..1.
    pub busy: f64,
    /// Recompute preemptions.
    pub preemptions: u64,
    /// Prompt tokens found in its prefix cache, over prompt tokens looked up (0 with none).
    pub prefix_hit_rate: f64,
}

/// The same figures summed over a fleet group (engines of one `[[engines]]` entry).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupUsage {
    pub group: String,
    pub engines: u32,
    pub speed: f64,
    /// Share of all picks that went to this group, 0..1.
    pub pick_share: f64,
    pub completed: u64,
    pub mean_ttft_ms: Option<f64>,
    pub busy: f64,
    /// Prompt tokens found in the group's prefix caches, over prompt tokens looked up.
    pub prefix_hit_rate: f64,
}

/// Counters of the simulation itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimCounters {
    /// Requests planned by the workload.
    pub requests: u64,
    /// Policy decisions (retries included).
    pub picks: u64,
    pub retries: u64,
    /// Retries the retry budget refused (the failure was answered instead).
    #[serde(default)]
    pub retries_refused: u64,
    /// Engine iterations.
    pub iterations: u64,
    /// Tokens delivered to the router side.
    pub tokens: u64,
    /// Events processed.
    pub events: u64,
    /// Scrapes of the whole fleet.
    pub scrapes: u64,
    /// Most requests in flight at once.
    pub max_in_flight: u64,
    /// Requests that waited in the admission queue (each time they joined it).
    pub queued: u64,
    /// Requests the admission queue refused, displaced or timed out (429).
    pub shed: u64,
    /// Priority-3 requests refused because no endpoint was predicted to meet their deadline
    /// (SLA enforcement, 429).
    pub sla_shed: u64,
    /// Virtual time at the end, µs.
    pub end_micros: Micros,
}

/// What a run produced beyond the shared [`Report`]: routing, per-engine use, the TTFT CDF.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimDetails {
    pub label: String,
    pub fleet: String,
    /// Decisions by reason (`x-qoe-reason`).
    pub reasons: BTreeMap<String, u64>,
    pub groups: Vec<GroupUsage>,
    pub engines: Vec<EngineUsage>,
    pub counters: SimCounters,
    /// `[ttft_ms, share of all requests with a first token by then]`, increasing; the last share
    /// is the share of requests that got a first token at all.
    pub ttft_cdf: Vec<[f64; 2]>,
    /// The policy's own state at the end ([`RoutingPolicy::state_json`]).
    pub policy_state: Option<serde_json::Value>,
}

/// A run's results.
#[derive(Clone, Debug, PartialEq)]
pub struct SimOutcome {
    pub report: Report,
    pub details: SimDetails,
}

/// Runs `workload` against `fleet` with `policy` routing, and reports as the live `bench` does.
/// `label` names the run in the report (usually the policy's name).
pub fn simulate(
    fleet: &Fleet,
    workload: &Workload,
    policy: &dyn RoutingPolicy,
    label: &str,
    cfg: &SimConfig,
) -> Result<SimOutcome, SimError> {
    simulate_recorded(fleet, workload, policy, label, cfg, None)
}

/// [`simulate`], also writing one [`crate::report::RequestLine`] per finished request to `records`, as JSON
/// lines in the order requests end (written as they end: nothing accumulates in memory).
pub fn simulate_recorded<'a>(
    fleet: &Fleet,
    workload: &Workload,
    policy: &'a dyn RoutingPolicy,
    label: &str,
    cfg: &'a SimConfig,
    records: Option<&'a mut dyn std::io::Write>,
) -> Result<SimOutcome, SimError> {
    cfg.validate()?;
    if workload.generate(cfg.seed).next().is_none() {
        return Err(SimError(format!(
            "workload `{}` plans no requests with seed {}: raise its rate or duration",
            workload.name(),
            cfg.seed
        )));
    }
    let mut sim = Sim::new(fleet, workload, policy, cfg)?;
    sim.records = records;
    sim.run();
    if let Some(e) = sim.records_error.take() {
        return Err(SimError(format!("cannot write the request records: {e}")));
    }
    Ok(sim.finish(label, fleet, workload))
}

// ---------------------------------------------------------------------------------------------
// Events

/// Why an attempt produced nothing for the client before the endpoint's first byte (the router
/// reads the first frame, the first token of a stream, before it answers: `proxy.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Early {
    /// No connection: the engine is down.
    Connect,
    /// The engine answered with this HTTP status (503 when its queue is full, 400 for a request it
    /// cannot run).
    Status(u16),
    /// The connection closed before the first byte (the engine went down).
    Broken,
    /// No first byte within the first-byte timeout.
    Timeout,
}

impl Early {
    /// `SendError::retryable` and `proxy.rs::is_retryable`: another endpoint may take it.
    fn retryable(self) -> bool {
        match self {
            Early::Connect | Early::Broken => true,
            Early::Status(c) => matches!(c, 429 | 500 | 502 | 503 | 504),
            Early::Timeout => false,
        }
    }
}

/// Event classes, in the order they run at equal times (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
enum Class {
    Change = 0,
    IterationEnd = 1,
    Deliver = 2,
    Scrape = 3,
    Health = 4,
    ReachEngine = 5,
    Timeout = 6,
    Retry = 7,
    Arrival = 8,
}

#[derive(Clone, Copy, Debug)]
enum Ev {
    Change(usize),
    IterationEnd {
        ep: u32,
        epoch: u32,
    },
    /// Tokens of an iteration reaching the router (network delay > 0): batch index.
    Deliver {
        batch: u32,
    },
    Scrape,
    Health,
    /// A dispatched request reaching its engine (network delay > 0).
    ReachEngine {
        rid: u64,
        attempt: u32,
    },
    /// A failure answer from an engine reaching the router (network delay > 0).
    Refused {
        rid: u64,
        attempt: u32,
        why: Early,
    },
    FirstByteTimeout {
        rid: u64,
        attempt: u32,
    },
    ClientTimeout {
        rid: u64,
    },
    /// The request's wait in the admission queue runs out.
    QueueTimeout {
        rid: u64,
    },
    Retry {
        rid: u64,
    },
    Arrival,
}

impl Ev {
    fn class(&self) -> Class {
        match self {
            Ev::Change(_) => Class::Change,
            Ev::IterationEnd { .. } => Class::IterationEnd,
            Ev::Deliver { .. } => Class::Deliver,
            Ev::Scrape => Class::Scrape,
            Ev::Health => Class::Health,
            Ev::ReachEngine { .. } | Ev::Refused { .. } => Class::ReachEngine,
            Ev::FirstByteTimeout { .. } | Ev::ClientTimeout { .. } | Ev::QueueTimeout { .. } => {
                Class::Timeout
            }
            Ev::Retry { .. } => Class::Retry,
            Ev::Arrival => Class::Arrival,
        }
    }
}

/// A scheduled event: ordered by `key` = time (64 bits) · class (8) · sequence (56).
struct Scheduled {
    key: u128,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key.cmp(&other.key)
    }
}

// ---------------------------------------------------------------------------------------------
// Router-side state

/// The router's health-check state of one endpoint (`endpoints.rs::HealthState`).
#[derive(Clone, Debug, Default)]
struct Health {
    healthy: bool,
    failures: u32,
    successes: u32,
    transitions: [Micros; 8],
    transition_count: usize,
}

impl Health {
    fn new() -> Self {
        Health {
            healthy: true,
            ..Default::default()
        }
    }

    fn flaps(&self, now: Micros) -> u32 {
        let n = self.transition_count.min(self.transitions.len());
        self.transitions[..n]
            .iter()
            .filter(|&&t| now.saturating_sub(t) <= FLAP_WINDOW)
            .count() as u32
    }

    fn record(&mut self, ok: bool, now: Micros, unhealthy_after: u32, healthy_after: u32) {
        let was = self.healthy;
        if ok {
            self.failures = 0;
            self.successes += 1;
            if self.successes >= healthy_after.max(1) {
                self.healthy = true;
            }
        } else {
            self.successes = 0;
            self.failures += 1;
            if self.failures >= unhealthy_after.max(1) {
                self.healthy = false;
            }
        }
        if was != self.healthy {
            let slot = self.transition_count % self.transitions.len();
            self.transitions[slot] = now;
            self.transition_count += 1;
        }
    }
}

/// The router's running estimate of output length (`state.rs::LearnedOutput`, one model).
#[derive(Clone, Copy, Debug)]
struct LearnedOutput {
    value: Option<f64>,
    default: u32,
}

impl LearnedOutput {
    const ALPHA: f64 = 0.05;

    fn estimate(&self) -> u32 {
        self.value
            .map_or(self.default, |v| v.round().max(1.0) as u32)
    }

    fn record(&mut self, tokens: u32) {
        self.value = Some(match self.value {
            Some(v) => v + Self::ALPHA * (tokens as f64 - v),
            None => tokens as f64,
        });
    }
}

/// One endpoint: its engine, and what the router keeps about it.
struct Ep {
    label: String,
    group: String,
    key: u64,
    start_speed: f64,
    engine_cfg: EngineConfig,
    engine: Engine,
    /// False while the fleet file has taken it out of service.
    up: bool,
    /// Bumped when the engine restarts: iteration ends of the old engine are ignored.
    epoch: u32,
    stepping: bool,
    events: Vec<EngineEvent>,
    stats: RequestStats,
    /// `stats` changed since `observed` was taken.
    stats_dirty: bool,
    /// Bucket epoch and window span of the cached snapshot.
    snap_epoch: u64,
    snap_span: f64,
    health: Health,
    // Usage.
    picks: u64,
    picks_by_priority: [u64; 3],
    completed: u64,
    slo_outcomes: [u64; 3],
    output_tokens: u64,
    ttft_sum: u64,
    ttft_n: u64,
    busy_before: u64,
    preemptions_before: u64,
    prefix_before: (u64, u64),
}

impl Ep {
    fn busy_micros(&self) -> u64 {
        self.busy_before + self.engine.stats().busy_micros
    }

    fn preemptions(&self) -> u64 {
        self.preemptions_before + self.engine.stats().preemptions
    }

    /// Prefix-cache (hits, queries) in tokens, over the engine's restarts.
    fn prefix_cache(&self) -> (u64, u64) {
        let s = self.engine.stats();
        (
            self.prefix_before.0 + s.prefix_cache_hits,
            self.prefix_before.1 + s.prefix_cache_queries,
        )
    }

    fn prefix_hit_rate(&self) -> f64 {
        ratio(self.prefix_cache())
    }
}

/// What a request needs until it is accepted by an engine (for retries and delayed submission).
struct Unsent {
    profile: RequestProfile,
    sim: SimRequest,
}

/// One request in flight.
struct Live {
    gen: u32,
    active: bool,
    planned_id: u64,
    /// When the client sent it (the router received it at the same instant).
    started: Micros,
    /// When the router sent it to its current endpoint.
    sent: Micros,
    endpoint: u32,
    engine_epoch: u32,
    /// Dispatch attempts so far (1 after the first pick).
    attempt: u32,
    /// Accepted by the engine (abort it there if it ends early).
    at_engine: bool,
    /// Holds a load slot on `endpoint`.
    holds_load: bool,
    priority: Priority,
    sla_ttft_ms: Option<u32>,
    prompt_tokens: u32,
    expected: u32,
    pending_output: u64,
    decoding: bool,
    load_at_dispatch: Load,
    detail: Option<DecisionDetail>,
    first_token_at: Option<Micros>,
    last_token_at: Option<Micros>,
    tokens: u32,
    tracker: Option<RequestTracker>,
    excluded: Vec<u32>,
    /// What a retry needs, until the first token.
    unsent: Option<Box<Unsent>>,
    /// Place in the admission queue: (priority, TTFT deadline, arrival order).
    key: QueueKey,
    /// Waiting in the admission queue.
    queued: bool,
}

impl Live {
    /// What the router tells the policy about this request at `endpoint_key`.
    fn feedback(&self, endpoint_key: u64, event: FeedbackEvent) -> Feedback {
        Feedback {
            endpoint_key,
            priority: self.priority,
            prompt_tokens: self.prompt_tokens,
            sla_ttft_ms: self.sla_ttft_ms,
            streamed: true,
            load_at_dispatch: self.load_at_dispatch,
            detail: self.detail,
            event,
        }
    }
}

/// Admission order: priority, then TTFT deadline (`Micros::MAX` without an SLA), then arrival.
type QueueKey = (Priority, Micros, u64);

/// `a / b`, 0 when `b` is 0.
fn ratio((a, b): (u64, u64)) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

fn rid_of(slot: u32, gen: u32) -> u64 {
    ((slot as u64) << 32) | gen as u64
}

struct Sim<'a> {
    cfg: &'a SimConfig,
    policy: &'a dyn RoutingPolicy,
    api: Api,
    requests: Requests,
    next_planned: Option<PlannedRequest>,
    arrivals_done: bool,
    changes: Vec<crate::fleet::Change>,
    now: Micros,
    heap: BinaryHeap<Reverse<Scheduled>>,
    seq: u64,
    eps: Vec<Ep>,
    views: Vec<EndpointView>,
    /// Scratch: candidate views when some endpoints are excluded, and their fleet indices.
    cand_views: Vec<EndpointView>,
    cand_index: Vec<u32>,
    live: Vec<Live>,
    free: Vec<u32>,
    in_flight: u64,
    batches: Vec<Vec<EngineEvent>>,
    free_batches: Vec<u32>,
    learned: LearnedOutput,
    builder: ReportBuilder,
    ttft: LatencyHistogram,
    reasons: BTreeMap<&'static str, u64>,
    counters: SimCounters,
    retry_budget: RetryBudget,
    rng: SplitMix64,
    bucket_width: Micros,
    engine_hash_blocks: usize,
    route: Route,
    /// The admission queue.
    queue: BTreeMap<QueueKey, u64>,
    /// Where finished requests are written (`simulate --records`), and the first write error.
    records: Option<&'a mut dyn std::io::Write>,
    records_error: Option<std::io::Error>,
}

impl<'a> Sim<'a> {
    fn new(
        fleet: &Fleet,
        workload: &Workload,
        policy: &'a dyn RoutingPolicy,
        cfg: &'a SimConfig,
    ) -> Result<Self, SimError> {
        let mut eps = Vec::with_capacity(fleet.len());
        let mut views = Vec::with_capacity(fleet.len());
        let mut max_len = 0u32;
        for spec in fleet.engines() {
            let mut ec = EngineConfig::for_profile(spec.profile.clone());
            ec.speed = spec.speed;
            ec.scheduling = spec.scheduling;
            ec.jitter = cfg.jitter;
            ec.seed = mix64(cfg.seed ^ mix64(0x656e_6769_6e65 ^ spec.index as u64));
            let engine = Engine::new(ec.clone())
                .map_err(|e| SimError(format!("engine {}: {e}", spec.label)))?;
            max_len = max_len.max(ec.max_model_len);
            let key = hash_bytes(0, format!("sim://{}", spec.label).as_bytes());
            views.push(EndpointView::idle(spec.index, key));
            eps.push(Ep {
                group: spec
                    .label
                    .rsplit_once('#')
                    .map_or(spec.label.clone(), |(g, _)| g.to_string()),
                label: spec.label.clone(),
                key,
                start_speed: spec.speed,
                engine_cfg: ec,
                engine,
                up: true,
                epoch: 0,
                stepping: false,
                events: Vec::new(),
                stats: RequestStats::new(cfg.stats, 0),
                stats_dirty: true,
                snap_epoch: u64::MAX,
                snap_span: 0.0,
                health: Health::new(),
                picks: 0,
                picks_by_priority: [0; 3],
                slo_outcomes: [0; 3],
                completed: 0,
                output_tokens: 0,
                ttft_sum: 0,
                ttft_n: 0,
                busy_before: 0,
                preemptions_before: 0,
                prefix_before: (0, 0),
            });
        }
        let api = workload.spec().api;
        let route = Route {
            kind: match api {
                Api::Chat => ApiKind::Chat,
                Api::Completions => ApiKind::Completion,
            },
            model_required: true,
        };
        let stats = cfg.stats;
        let buckets = stats.buckets.max(1) as u64;
        let mut sim = Sim {
            cfg,
            policy,
            api,
            requests: workload.generate(cfg.seed),
            next_planned: None,
            arrivals_done: false,
            changes: fleet.changes().to_vec(),
            now: 0,
            heap: BinaryHeap::new(),
            seq: 0,
            eps,
            views,
            cand_views: Vec::new(),
            cand_index: Vec::new(),
            live: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            batches: Vec::new(),
            free_batches: Vec::new(),
            learned: LearnedOutput {
                value: None,
                default: cfg.default_output_tokens,
            },
            builder: ReportBuilder::new(cfg.report),
            ttft: LatencyHistogram::new(),
            reasons: BTreeMap::new(),
            counters: SimCounters::default(),
            retry_budget: RetryBudget::new(cfg.retry_budget),
            rng: SplitMix64::new(mix64(cfg.seed ^ 0x7265_7472_7921)),
            bucket_width: (stats.window / buckets).max(1),
            // The engine hashes every block of the prompt (as `qoe-engine` does).
            engine_hash_blocks: max_len as usize / BLOCK_TOKENS + 1,
            route,
            queue: BTreeMap::new(),
            records: None,
            records_error: None,
        };
        for i in 0..sim.changes.len() {
            let at = sim.changes[i].at;
            sim.push(at, Ev::Change(i));
        }
        sim.push(0, Ev::Scrape);
        sim.push(0, Ev::Health);
        sim.next_arrival();
        Ok(sim)
    }

    fn push(&mut self, at: Micros, ev: Ev) {
        self.seq += 1;
        let key = ((at as u128) << 64) | ((ev.class() as u128) << 56) | self.seq as u128;
        self.heap.push(Reverse(Scheduled { key, ev }));
    }

    /// Schedules the workload's next request, if any.
    fn next_arrival(&mut self) {
        match self.requests.next() {
            Some(p) => {
                let at = p.at;
                self.next_planned = Some(p);
                self.push(at, Ev::Arrival);
            }
            None => self.arrivals_done = true,
        }
    }

    /// Whether anything is left to simulate besides periodic scrapes and checks.
    fn work_left(&self) -> bool {
        !self.arrivals_done || self.in_flight > 0
    }

    fn run(&mut self) {
        // Stops when every request has ended: what is left in the heap then is periodic work and
        // timeouts of requests already over.
        while self.work_left() {
            let Some(Reverse(s)) = self.heap.pop() else {
                break;
            };
            self.now = (s.key >> 64) as Micros;
            self.counters.events += 1;
            match s.ev {
                Ev::Change(i) => self.on_change(i),
                Ev::IterationEnd { ep, epoch } => self.on_iteration_end(ep, epoch),
                Ev::Deliver { batch } => {
                    let events = std::mem::take(&mut self.batches[batch as usize]);
                    for e in &events {
                        self.deliver(*e);
                    }
                    let mut events = events;
                    events.clear();
                    self.batches[batch as usize] = events;
                    self.free_batches.push(batch);
                }
                Ev::Scrape => {
                    self.on_scrape();
                    self.drain_queue();
                    if self.work_left() {
                        self.push(self.now + self.cfg.scrape_interval, Ev::Scrape);
                    }
                }
                Ev::Health => {
                    self.on_health();
                    self.drain_queue();
                    if self.work_left() {
                        self.push(self.now + self.cfg.health_interval, Ev::Health);
                    }
                }
                Ev::ReachEngine { rid, attempt } => {
                    if let Some(slot) = self.slot_if(rid, attempt) {
                        self.reach_engine(slot);
                    }
                }
                Ev::Refused { rid, attempt, why } => {
                    if let Some(slot) = self.slot_if(rid, attempt) {
                        self.early_failure(slot, why);
                    }
                }
                Ev::FirstByteTimeout { rid, attempt } => {
                    if let Some(slot) = self.slot_if(rid, attempt) {
                        if self.live[slot as usize].first_token_at.is_none() {
                            self.abort_at_engine(slot);
                            self.early_failure(slot, Early::Timeout);
                        }
                    }
                }
                Ev::ClientTimeout { rid } => {
                    if let Some(slot) = self.slot_of(rid) {
                        self.client_timeout(slot);
                    }
                }
                Ev::QueueTimeout { rid } => {
                    if let Some(slot) = self.slot_of(rid) {
                        if self.live[slot as usize].queued {
                            self.leave_queue(slot);
                            self.counters.shed += 1;
                            self.end_failed(slot, Status::Http(429), false);
                        }
                    }
                }
                Ev::Retry { rid } => {
                    if let Some(slot) = self.slot_of(rid) {
                        self.dispatch(slot);
                    }
                }
                Ev::Arrival => {
                    if let Some(p) = self.next_planned.take() {
                        self.on_arrival(p);
                    }
                    self.next_arrival();
                }
            }
        }
        self.counters.end_micros = self.now;
    }

    /// The live slot of request `rid`, if it is still in flight.
    fn slot_of(&self, rid: u64) -> Option<u32> {
        let slot = (rid >> 32) as u32;
        let l = self.live.get(slot as usize)?;
        (l.active && l.gen == rid as u32).then_some(slot)
    }

    /// [`Self::slot_of`], and still on dispatch `attempt`.
    fn slot_if(&self, rid: u64, attempt: u32) -> Option<u32> {
        self.slot_of(rid)
            .filter(|&s| self.live[s as usize].attempt == attempt)
    }

    // ---- fleet -----------------------------------------------------------------------------

    fn on_change(&mut self, i: usize) {
        let c = self.changes[i];
        let e = c.engine as usize;
        if let Some(s) = c.speed {
            self.eps[e].engine.set_speed(s);
            self.eps[e].engine_cfg.speed = s;
        }
        match c.available {
            Some(false) if self.eps[e].up => self.take_down(e),
            Some(true) if !self.eps[e].up => self.eps[e].up = true,
            _ => {}
        }
    }

    /// The engine stops: streams break, its KV is gone; it restarts empty when it comes back.
    fn take_down(&mut self, e: usize) {
        let victims: Vec<u32> = (0..self.live.len() as u32)
            .filter(|&s| {
                let l = &self.live[s as usize];
                l.active && l.endpoint == e as u32 && l.at_engine
            })
            .collect();
        for slot in victims {
            let l = &mut self.live[slot as usize];
            l.at_engine = false;
            if l.first_token_at.is_some() {
                // Bytes reached the client: the stream breaks (an SSE error event).
                self.end_failed(slot, Status::Stream, true);
            } else {
                self.early_failure(slot, Early::Broken);
            }
        }
        let ep = &mut self.eps[e];
        ep.up = false;
        ep.epoch += 1;
        ep.stepping = false;
        ep.events.clear();
        ep.busy_before += ep.engine.stats().busy_micros;
        ep.preemptions_before += ep.engine.stats().preemptions;
        ep.prefix_before.0 += ep.engine.stats().prefix_cache_hits;
        ep.prefix_before.1 += ep.engine.stats().prefix_cache_queries;
        ep.engine = Engine::new(ep.engine_cfg.clone()).expect("validated engine config");
    }

    fn on_iteration_end(&mut self, e: u32, epoch: u32) {
        let ep = &mut self.eps[e as usize];
        if ep.epoch != epoch {
            return;
        }
        let mut events = std::mem::take(&mut ep.events);
        if self.cfg.network_delay == 0 {
            for ev in &events {
                self.deliver(*ev);
            }
            events.clear();
        } else if !events.is_empty() {
            let batch = match self.free_batches.pop() {
                Some(b) => b,
                None => {
                    self.batches.push(Vec::new());
                    (self.batches.len() - 1) as u32
                }
            };
            std::mem::swap(&mut self.batches[batch as usize], &mut events);
            self.push(self.now + self.cfg.network_delay, Ev::Deliver { batch });
        }
        let ep = &mut self.eps[e as usize];
        ep.events = events;
        ep.stepping = false;
        self.step(e as usize);
    }

    /// Starts the engine's next iteration if it has work and is not computing one.
    fn step(&mut self, e: usize) {
        let ep = &mut self.eps[e];
        if ep.stepping || !ep.up {
            return;
        }
        let dur = ep.engine.step(self.now, &mut ep.events);
        if dur > 0 {
            ep.stepping = true;
            let epoch = ep.epoch;
            self.counters.iterations += 1;
            self.push(
                self.now + dur,
                Ev::IterationEnd {
                    ep: e as u32,
                    epoch,
                },
            );
        }
    }

    fn on_scrape(&mut self) {
        self.counters.scrapes += 1;
        let now = self.now;
        for (ep, view) in self.eps.iter().zip(self.views.iter_mut()) {
            if !ep.up {
                continue; // a failed scrape keeps the last sample, which ages
            }
            let s = ep.engine.stats();
            let mut m = EngineMetrics {
                running: Some(s.running as f64),
                waiting: Some(s.waiting as f64),
                kv_usage: Some(s.kv_usage()),
                prefix_queries: Some(s.prefix_cache_queries as f64),
                prefix_hits: Some(s.prefix_cache_hits as f64),
                prefix_hit_rate: None,
                preemptions: Some(s.preemptions as f64),
                prompt_tokens: Some(s.prompt_tokens as f64),
                generation_tokens: Some(s.generation_tokens as f64),
                ttft_sum: Some(s.ttft.sum_seconds()),
                ttft_count: Some(s.ttft.count() as f64),
                itl_sum: Some(s.itl.sum_seconds()),
                itl_count: Some(s.itl.count() as f64),
                peak_running: None,
                full_seats: None,
            };
            // As the live scraper: what only the previous scrape can tell.
            m.follow(view.engine.as_ref());
            view.engine = Some(m);
            view.engine_at = Some(now);
        }
    }

    fn on_health(&mut self) {
        let now = self.now;
        let (down, up) = (self.cfg.unhealthy_threshold, self.cfg.healthy_threshold);
        for (ep, view) in self.eps.iter_mut().zip(self.views.iter_mut()) {
            ep.health.record(ep.up, now, down, up);
            view.availability.healthy = ep.health.healthy;
        }
    }

    // ---- requests --------------------------------------------------------------------------

    fn on_arrival(&mut self, p: PlannedRequest) {
        self.counters.requests += 1;
        let (profile, sim) = self.analyze(&p);
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.live.push(Live {
                    gen: 0,
                    active: false,
                    planned_id: 0,
                    started: 0,
                    sent: 0,
                    endpoint: 0,
                    engine_epoch: 0,
                    attempt: 0,
                    at_engine: false,
                    holds_load: false,
                    priority: Priority::DEFAULT,
                    sla_ttft_ms: None,
                    prompt_tokens: 0,
                    expected: 0,
                    pending_output: 0,
                    decoding: false,
                    load_at_dispatch: Load::default(),
                    detail: None,
                    first_token_at: None,
                    last_token_at: None,
                    tokens: 0,
                    tracker: None,
                    excluded: Vec::new(),
                    unsent: None,
                    key: (Priority::DEFAULT, 0, 0),
                    queued: false,
                });
                (self.live.len() - 1) as u32
            }
        };
        let l = &mut self.live[slot as usize];
        l.gen = l.gen.wrapping_add(1);
        l.active = true;
        l.planned_id = p.id;
        l.started = p.at;
        l.sent = p.at;
        l.attempt = 0;
        l.at_engine = false;
        l.holds_load = false;
        l.priority = profile.priority;
        l.sla_ttft_ms = profile.sla_ttft_ms;
        l.prompt_tokens = profile.prompt_tokens;
        l.expected = profile.expected_output_tokens;
        l.pending_output = 0;
        l.decoding = false;
        l.load_at_dispatch = Load::default();
        l.detail = None;
        l.first_token_at = None;
        l.last_token_at = None;
        l.tokens = 0;
        l.tracker = Some(RequestTracker::new(
            p.id,
            p.priority,
            p.sla,
            p.at,
            &self.cfg.report,
        ));
        l.excluded.clear();
        let deadline = profile
            .sla_ttft_ms
            .map_or(Micros::MAX, |ms| p.at + ms as Micros * 1_000);
        l.key = (profile.priority, deadline, self.counters.requests);
        l.queued = false;
        l.unsent = Some(Box::new(Unsent { profile, sim }));
        let rid = rid_of(slot, l.gen);
        self.in_flight += 1;
        self.counters.max_in_flight = self.counters.max_in_flight.max(self.in_flight);
        self.push(p.at + self.cfg.request_timeout, Ev::ClientTimeout { rid });
        if self.cfg.admission.enabled() {
            self.push(
                p.at + self.cfg.admission.queue_timeout,
                Ev::QueueTimeout { rid },
            );
        }
        self.dispatch(slot);
    }

    /// The request as the router's analyzer sees it (from the very body and headers the live
    /// `bench` client sends), and as the engine sees it.
    fn analyze(&self, p: &PlannedRequest) -> (RequestProfile, SimRequest) {
        let max_tokens = body_max_tokens(self.cfg.output_hint, self.api, p.output_tokens);
        let body = request_body(self.api, &self.cfg.model, &p.prompt, max_tokens);
        let a = &self.cfg.analyzer;
        let priority = p.priority.level().to_string();
        let sla = p.sla.map(|s| s.ttft_ms.to_string());
        let expected = p.send_expected_header.then(|| p.output_tokens.to_string());
        let session = p.session.map(|s| format!("session-{}", s.id));
        let header = |name: &str| -> Option<&[u8]> {
            if name == a.priority_header {
                Some(priority.as_bytes())
            } else if name == a.sla_header {
                sla.as_deref().map(str::as_bytes)
            } else if name == a.expected_output_len_header {
                expected.as_deref().map(str::as_bytes)
            } else if name == a.session_key {
                session.as_deref().map(str::as_bytes)
            } else {
                None
            }
        };
        let learned = self.learned.estimate();
        let profile = analyze(self.route, &body, header, a, |_| learned)
            .expect("the simulator's own requests are well formed");
        let hashes = engine_hashes(
            self.api,
            &p.prompt,
            &profile.prefix_hashes,
            self.engine_hash_blocks,
        );
        let sim = SimRequest {
            id: 0,
            prompt_tokens: profile.prompt_tokens,
            prefix_hashes: hashes,
            output_tokens: p.output_tokens,
            stops_at_eos: false,
            // The bench client sends no `priority` field; the router adds one with
            // `--engine-priority`, else forwards the body untouched.
            priority: if self.cfg.engine_priority {
                profile.priority.level() as i32
            } else {
                0
            },
            skip_prefill: false,
        };
        (profile, sim)
    }

    /// Brings the views up to date at `now` (only what changed since the last decision).
    fn refresh_views(&mut self) {
        let now = self.now;
        let epoch = now / self.bucket_width;
        for (ep, view) in self.eps.iter_mut().zip(self.views.iter_mut()) {
            let span = ep.stats.span_s(now);
            if ep.stats_dirty || ep.snap_epoch != epoch {
                view.observed = ep.stats.snapshot(now);
                ep.stats_dirty = false;
                ep.snap_epoch = epoch;
                ep.snap_span = span;
            } else if ep.snap_span != span {
                // Same buckets, a longer span (time has passed within the newest bucket): the
                // same rates `RequestStats::snapshot` would compute.
                let o = &mut view.observed;
                let tokens = (o.output_tokens_per_s * ep.snap_span).round();
                o.qps = o.window_requests as f64 / span;
                o.output_tokens_per_s = tokens / span;
                ep.snap_span = span;
            }
            if ep.health.transition_count > 0 {
                view.availability.flaps = ep.health.flaps(now);
            }
        }
    }

    /// Whether endpoint `i` may take request `slot` now: healthy, not failed on it before, and
    /// (with admission control) not saturated.
    fn open_for(&self, slot: u32, i: usize) -> bool {
        self.eps[i].health.healthy
            && !self.live[slot as usize].excluded.contains(&(i as u32))
            && !(self.cfg.admission.enabled()
                && self.cfg.admission.saturated(&self.views[i], self.now))
    }

    /// Routes request `slot` (again, after a failure or a wait): pick, count the load, send. With
    /// admission control it waits in the queue instead when every endpoint is saturated or a more
    /// urgent request already waits (`proxy.rs::dispatch`).
    fn dispatch(&mut self, slot: u32) {
        let now = self.now;
        self.refresh_views();
        let s = slot as usize;
        let open = (0..self.eps.len())
            .filter(|&i| self.open_for(slot, i))
            .count();
        if self.cfg.admission.enabled() {
            let key = self.live[s].key;
            let behind = self.queue.keys().next().is_some_and(|head| *head < key);
            let healthy = self.eps.iter().any(|e| e.health.healthy);
            if healthy && (open == 0 || behind) {
                if open > 0 {
                    // Capacity is open but someone more urgent waits: they go first.
                    self.notify();
                }
                self.enqueue(slot);
                return;
            }
        }
        let all = open == self.eps.len();
        if !all {
            self.cand_views.clear();
            self.cand_index.clear();
            for i in 0..self.eps.len() {
                if self.open_for(slot, i) {
                    let mut v = self.views[i];
                    v.id = EndpointId(self.cand_views.len() as u32);
                    self.cand_views.push(v);
                    self.cand_index.push(i as u32);
                }
            }
        }
        let views = if all { &self.views } else { &self.cand_views };
        let profile = &self.live[s]
            .unsent
            .as_ref()
            .expect("an unsent request has its profile")
            .profile;
        let priority = profile.priority.index();
        let started = self.live[s].started;
        if self.cfg.sla_shed
            && self
                .policy
                .deadline_lost(profile, views, now, started)
                .is_some()
        {
            // `proxy.rs::enforce_sla`: refused before any endpoint is picked.
            self.counters.sla_shed += 1;
            self.end_failed(slot, Status::Http(429), false);
            return;
        }
        let decision = self.policy.pick(profile, views, now);
        self.counters.picks += 1;
        let Some(d) = decision else {
            // No healthy endpoint (or none left to retry on): the router answers 503.
            self.end_failed(slot, Status::Http(503), false);
            return;
        };
        let e = if all {
            d.index
        } else {
            self.cand_index[d.index] as usize
        };
        *self.reasons.entry(d.reason.as_str()).or_default() += 1;
        let ep = &mut self.eps[e];
        ep.picks += 1;
        ep.picks_by_priority[priority.min(2)] += 1;
        let load = &mut self.views[e].load;
        let l = &mut self.live[s];
        l.load_at_dispatch = *load;
        l.detail = d.detail;
        // LoadGuard::new
        load.in_prefill += 1;
        load.prefill_tokens += l.prompt_tokens as u64;
        load.pending_output_tokens += l.expected as u64;
        l.holds_load = true;
        l.pending_output = l.expected as u64;
        l.decoding = false;
        l.endpoint = e as u32;
        l.engine_epoch = ep.epoch;
        l.sent = now;
        l.attempt += 1;
        let (rid, attempt) = (rid_of(slot, l.gen), l.attempt);
        let up = ep.up;
        if attempt == 1 {
            // Counted once sent, as `proxy.rs::dispatch` does: not when refused before.
            self.retry_budget.record_request(now);
        }
        self.push(
            now.saturating_add(self.cfg.first_byte_timeout),
            Ev::FirstByteTimeout { rid, attempt },
        );
        if !up {
            // Connection refused: known at once, nothing sent.
            self.early_failure(slot, Early::Connect);
        } else if self.cfg.network_delay == 0 {
            self.reach_engine(slot);
        } else {
            self.push(
                now + self.cfg.network_delay,
                Ev::ReachEngine { rid, attempt },
            );
        }
    }

    /// The request reaches its engine.
    fn reach_engine(&mut self, slot: u32) {
        let s = slot as usize;
        let e = self.live[s].endpoint as usize;
        if !self.eps[e].up || self.eps[e].epoch != self.live[s].engine_epoch {
            self.early_failure(slot, Early::Connect);
            return;
        }
        let rid = rid_of(slot, self.live[s].gen);
        let mut req = self.live[s]
            .unsent
            .as_ref()
            .expect("an unsent request has its engine request")
            .sim
            .clone();
        req.id = rid;
        match self.eps[e].engine.submit(req, self.now) {
            Ok(()) => {
                // Its profile and engine request stay until its first token: an engine going
                // down before then sends it elsewhere (`take_down`, `Early::Broken`).
                self.live[s].at_engine = true;
                self.step(e);
            }
            Err(err) => {
                // As `qoe-engine` answers: 503 when its queue is full, 400 otherwise.
                let why = match err {
                    SubmitError::QueueFull { .. } => Early::Status(503),
                    _ => Early::Status(400),
                };
                if self.cfg.network_delay == 0 {
                    self.early_failure(slot, why);
                } else {
                    let attempt = self.live[s].attempt;
                    self.push(
                        self.now + self.cfg.network_delay,
                        Ev::Refused { rid, attempt, why },
                    );
                }
            }
        }
    }

    /// The attempt failed before any byte reached the client. As `proxy.rs::dispatch`: a retryable
    /// failure with another endpoint left goes elsewhere after a backoff; otherwise a status the
    /// engine answered passes through the observer to the client, and anything else becomes the
    /// router's own 502 (no connection, connection closed) or 504 (no first byte in time).
    fn early_failure(&mut self, slot: u32, why: Early) {
        let s = slot as usize;
        let now = self.now;
        let e = self.live[s].endpoint as usize;
        let pool = self
            .eps
            .iter()
            .enumerate()
            .filter(|(i, ep)| ep.health.healthy && !self.live[s].excluded.contains(&(*i as u32)))
            .count();
        let may_retry = self.live[s].attempt <= self.cfg.max_retries && pool > 1;
        let retry = may_retry && why.retryable() && {
            let granted = self.retry_budget.try_retry(now);
            self.counters.retries_refused += u64::from(!granted);
            granted
        };
        if let Early::Status(code) = why {
            if !retry {
                self.end_failed(slot, Status::Http(code), true);
                return;
            }
        }
        // `fail()`: a failed outcome in the endpoint's statistics, no policy feedback.
        let outcome = RequestOutcome {
            prompt_tokens: 0,
            output_tokens: 0,
            ttft: None,
            decode_time: 0,
            e2e: now.saturating_sub(self.live[s].started),
            failed: true,
            timed_out: why == Early::Timeout,
        };
        self.eps[e].stats.record_outcome(&outcome, now);
        self.eps[e].stats_dirty = true;
        self.release_load(slot);
        if retry {
            let l = &mut self.live[s];
            l.excluded.push(e as u32);
            let rid = rid_of(slot, l.gen);
            let n = l.attempt - 1;
            let base = self.cfg.retry_backoff as f64 * 1.5f64.powi(n as i32);
            let wait = (base * (0.5 + self.rng.next_f64())).round() as Micros;
            self.counters.retries += 1;
            self.push(now + wait, Ev::Retry { rid });
            return;
        }
        let status = if why == Early::Timeout { 504 } else { 502 };
        self.end_failed(slot, Status::Http(status), false);
    }

    /// Joins the admission queue; a full queue refuses the least urgent (429): the newcomer, or a
    /// waiter of lower priority it displaces (`Admission::enqueue`).
    fn enqueue(&mut self, slot: u32) {
        let key = self.live[slot as usize].key;
        if self.queue.len() >= self.cfg.admission.queue_max.max(1) {
            let (&worst, &worst_rid) = self
                .queue
                .iter()
                .next_back()
                .expect("a full queue has a last");
            if worst.0 <= key.0 {
                self.counters.shed += 1;
                self.end_failed(slot, Status::Http(429), false);
                return;
            }
            self.queue.remove(&worst);
            if let Some(w) = self.slot_of(worst_rid) {
                self.live[w as usize].queued = false;
                self.counters.shed += 1;
                self.end_failed(w, Status::Http(429), false);
            }
        }
        let l = &mut self.live[slot as usize];
        l.queued = true;
        self.queue.insert(key, rid_of(slot, l.gen));
        self.counters.queued += 1;
    }

    fn leave_queue(&mut self, slot: u32) {
        let l = &mut self.live[slot as usize];
        if l.queued {
            l.queued = false;
            self.queue.remove(&l.key);
        }
    }

    /// Capacity may have freed: the most urgent waiter tries again (`Admission::notify`).
    fn notify(&mut self) {
        while let Some((_, rid)) = self.queue.pop_first() {
            if let Some(w) = self.slot_of(rid) {
                self.live[w as usize].queued = false;
                self.push(self.now, Ev::Retry { rid });
                return;
            }
        }
    }

    /// Metrics or health changed: waiters go, most urgent first, while an endpoint is open
    /// (the router's waiters re-check every 100 ms).
    fn drain_queue(&mut self) {
        if !self.cfg.admission.enabled() {
            return;
        }
        self.refresh_views();
        while let Some((&key, &rid)) = self.queue.iter().next() {
            let Some(w) = self.slot_of(rid) else {
                self.queue.remove(&key);
                continue;
            };
            if !(0..self.eps.len()).any(|i| self.open_for(w, i)) {
                return;
            }
            self.queue.remove(&key);
            self.live[w as usize].queued = false;
            self.dispatch(w);
            if self
                .slot_of(rid)
                .is_some_and(|x| self.live[x as usize].queued)
            {
                return; // it could not go after all
            }
        }
    }

    /// Releases the request's load slot (`LoadGuard::drop`), which wakes the admission queue.
    fn release_load(&mut self, slot: u32) {
        let l = &mut self.live[slot as usize];
        if !l.holds_load {
            return;
        }
        l.holds_load = false;
        let load = &mut self.views[l.endpoint as usize].load;
        if l.decoding {
            load.in_decode -= 1;
        } else {
            load.in_prefill -= 1;
            load.prefill_tokens -= l.prompt_tokens as u64;
        }
        load.pending_output_tokens -= l.pending_output;
        l.pending_output = 0;
        if self.cfg.admission.enabled() {
            self.notify();
        }
    }

    /// A token, end or preemption from an engine reaches the router.
    fn deliver(&mut self, ev: EngineEvent) {
        match ev {
            EngineEvent::Token { id, .. } => {
                if let Some(slot) = self.slot_of(id) {
                    self.on_token(slot);
                }
            }
            EngineEvent::Finished { id, .. } => {
                if let Some(slot) = self.slot_of(id) {
                    self.on_finished(slot);
                }
            }
            EngineEvent::Preempted { .. } => {}
        }
    }

    /// `ObservedBody::on_tokens` for one token.
    fn on_token(&mut self, slot: u32) {
        let now = self.now;
        let s = slot as usize;
        self.counters.tokens += 1;
        let l = &mut self.live[s];
        let e = l.endpoint as usize;
        let ep = &mut self.eps[e];
        let load = &mut self.views[e].load;
        if let Some(t) = l.tracker.as_mut() {
            t.on_tokens(now, 1);
        }
        match l.last_token_at {
            None => {
                let ttft = now.saturating_sub(l.sent);
                l.first_token_at = Some(now);
                // Bytes reached the client: no retry from here on.
                l.unsent = None;
                ep.stats.record_ttft(l.prompt_tokens, ttft);
                ep.stats_dirty = true;
                ep.ttft_sum += ttft;
                ep.ttft_n += 1;
                // LoadGuard::first_token
                if l.holds_load && !l.decoding {
                    l.decoding = true;
                    load.in_prefill -= 1;
                    load.prefill_tokens -= l.prompt_tokens as u64;
                    load.in_decode += 1;
                }
                let fb = l.feedback(ep.key, FeedbackEvent::FirstToken { ttft });
                self.policy.feedback(&fb, now);
            }
            Some(last) => {
                ep.stats.record_itl(now.saturating_sub(last), 1);
                ep.stats_dirty = true;
            }
        }
        // LoadGuard::tokens
        if l.holds_load && l.pending_output > 0 {
            l.pending_output -= 1;
            load.pending_output_tokens -= 1;
        }
        l.last_token_at = Some(now);
        l.tokens += 1;
    }

    /// The stream completed (`ObservedBody::finish(Complete)`).
    fn on_finished(&mut self, slot: u32) {
        let now = self.now;
        let s = slot as usize;
        self.live[s].at_engine = false;
        self.record_end(slot, false, false);
        let l = &mut self.live[s];
        let e = l.endpoint as usize;
        if l.tokens > 0 {
            self.learned.record(l.tokens);
        }
        let ep = &mut self.eps[e];
        ep.completed += 1;
        ep.output_tokens += l.tokens as u64;
        self.release_load(slot);
        let tracker = self.live[s]
            .tracker
            .take()
            .expect("a live request has a tracker");
        let record = tracker.finish(now, Status::Ok);
        self.add_record(slot, record);
    }

    /// The outcome in the endpoint's statistics and the `Finished` feedback, as `observe.rs`
    /// records a response that ended (completed, broken or timed out; not a client that left).
    fn record_end(&mut self, slot: u32, failed: bool, timed_out: bool) {
        let now = self.now;
        let l = &self.live[slot as usize];
        let e = l.endpoint as usize;
        let ttft = l.first_token_at.map(|t| t.saturating_sub(l.sent));
        let decode_time = match (l.first_token_at, l.last_token_at) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => 0,
        };
        let outcome = RequestOutcome {
            prompt_tokens: l.prompt_tokens,
            output_tokens: l.tokens,
            ttft,
            decode_time,
            e2e: now.saturating_sub(l.started),
            failed,
            timed_out,
        };
        let ep = &mut self.eps[e];
        ep.stats.record_outcome(&outcome, now);
        ep.stats_dirty = true;
        let mean_itl_ms = (l.tokens > 1 && decode_time > 0)
            .then(|| decode_time as f64 / 1e3 / (l.tokens - 1) as f64);
        let fb = l.feedback(
            ep.key,
            FeedbackEvent::Finished {
                ttft,
                output_tokens: l.tokens,
                mean_itl_ms,
                failed,
            },
        );
        self.policy.feedback(&fb, now);
    }

    /// The client gave up: the router sees a client that left (no outcome, no feedback).
    fn client_timeout(&mut self, slot: u32) {
        self.leave_queue(slot);
        self.abort_at_engine(slot);
        self.release_load(slot);
        let tracker = self.live[slot as usize]
            .tracker
            .take()
            .expect("a live request has a tracker");
        let record = tracker.finish(self.now, Status::Timeout);
        self.add_record(slot, record);
    }

    fn abort_at_engine(&mut self, slot: u32) {
        let l = &mut self.live[slot as usize];
        if l.at_engine {
            l.at_engine = false;
            let rid = rid_of(slot, l.gen);
            let e = l.endpoint as usize;
            self.eps[e].engine.abort(rid, self.now);
        }
    }

    /// Ends a request with a failure `status` the client sees. With `observed`, the response went
    /// through the router's observer: its outcome is recorded and fed back (failed for 5xx and
    /// broken streams). Without, the router answered by itself (no endpoint, or after `fail()`).
    fn end_failed(&mut self, slot: u32, status: Status, observed: bool) {
        let s = slot as usize;
        if observed && self.live[s].holds_load {
            let failed = match status {
                Status::Http(c) => c >= 500,
                _ => true,
            };
            self.record_end(slot, failed, false);
        }
        self.release_load(slot);
        let tracker = self.live[s]
            .tracker
            .take()
            .expect("a live request has a tracker");
        let record = tracker.finish(self.now, status);
        self.add_record(slot, record);
    }

    fn add_record(&mut self, slot: u32, record: crate::report::RequestRecord) {
        if let Some(t) = record.ttft {
            self.ttft.record(t);
        }
        if record.status == Status::Ok {
            let slo = self.cfg.report.slo(record.sla);
            let e = self.live[slot as usize].endpoint as usize;
            let outcomes = &mut self.eps[e].slo_outcomes;
            if record.slo_met {
                outcomes[0] += 1;
            }
            if record.ttft.is_none_or(|t| t as f64 / 1e6 > slo.ttft_s) {
                outcomes[1] += 1;
            }
            if record.tpot_s.is_some_and(|t| t > slo.tpot_s) {
                outcomes[2] += 1;
            }
        }
        self.write_record(slot, &record);
        self.builder.add(&record);
        let l = &mut self.live[slot as usize];
        l.active = false;
        l.unsent = None;
        l.excluded.clear();
        self.free.push(slot);
        self.in_flight -= 1;
    }

    fn write_record(&mut self, slot: u32, record: &crate::report::RequestRecord) {
        let Some(out) = self.records.as_mut() else {
            return;
        };
        if self.records_error.is_some() {
            return;
        }
        let l = &self.live[slot as usize];
        let endpoint = (l.attempt > 0).then(|| self.eps[l.endpoint as usize].label.clone());
        let line = RequestLine::new(record, endpoint, l.prompt_tokens, l.detail.as_ref());
        if let Err(e) = out.write_all(line.to_json_line().as_bytes()) {
            self.records_error = Some(e);
        }
    }

    // ---- results ---------------------------------------------------------------------------

    fn finish(self, label: &str, fleet: &Fleet, workload: &Workload) -> SimOutcome {
        let report = self.builder.finish(ReportMeta {
            label: label.to_string(),
            target: Some(format!("fleet {} ({} engines)", fleet.name(), fleet.len())),
            model: None,
            workload: workload.name().to_string(),
            seed: self.cfg.seed,
            max_send_lag_ms: None,
        });
        let end = self.counters.end_micros.max(1) as f64;
        let engines: Vec<EngineUsage> = self
            .eps
            .iter()
            .map(|ep| EngineUsage {
                label: ep.label.clone(),
                group: ep.group.clone(),
                speed: ep.start_speed,
                picks: ep.picks,
                picks_by_priority: ep.picks_by_priority,
                completed: ep.completed,
                slo_met: ep.slo_outcomes[0],
                ttft_missed: ep.slo_outcomes[1],
                tpot_missed: ep.slo_outcomes[2],
                output_tokens: ep.output_tokens,
                mean_ttft_ms: (ep.ttft_n > 0).then(|| ep.ttft_sum as f64 / ep.ttft_n as f64 / 1e3),
                busy: (ep.busy_micros() as f64 / end).min(1.0),
                preemptions: ep.preemptions(),
                prefix_hit_rate: ep.prefix_hit_rate(),
            })
            .collect();
        let total_picks = self.counters.picks.max(1) as f64;
        let mut groups: Vec<GroupUsage> = Vec::new();
        // (ttft_sum, ttft_n, busy sum, prefix hits, prefix queries)
        let mut sums: Vec<(u64, u64, f64, u64, u64)> = Vec::new();
        for (ep, u) in self.eps.iter().zip(&engines) {
            let key = (ep.group.clone(), ep.start_speed);
            let i = match groups
                .iter()
                .position(|g| g.group == key.0 && g.speed == key.1)
            {
                Some(i) => i,
                None => {
                    groups.push(GroupUsage {
                        group: key.0,
                        engines: 0,
                        speed: key.1,
                        pick_share: 0.0,
                        completed: 0,
                        mean_ttft_ms: None,
                        busy: 0.0,
                        prefix_hit_rate: 0.0,
                    });
                    sums.push((0, 0, 0.0, 0, 0));
                    groups.len() - 1
                }
            };
            let g = &mut groups[i];
            g.engines += 1;
            g.pick_share += ep.picks as f64 / total_picks;
            g.completed += ep.completed;
            sums[i].0 += ep.ttft_sum;
            sums[i].1 += ep.ttft_n;
            sums[i].2 += u.busy;
            let (hits, queries) = ep.prefix_cache();
            sums[i].3 += hits;
            sums[i].4 += queries;
        }
        for (g, (ts, tn, busy, hits, queries)) in groups.iter_mut().zip(sums) {
            g.mean_ttft_ms = (tn > 0).then(|| ts as f64 / tn as f64 / 1e3);
            g.busy = busy / g.engines as f64;
            g.prefix_hit_rate = ratio((hits, queries));
        }
        let requests = report.overall.requests.max(1) as f64;
        let got = self.ttft.count() as f64 / requests;
        let n = self.cfg.cdf_points.max(2);
        let mut cdf: Vec<[f64; 2]> = Vec::with_capacity(n);
        if self.ttft.count() > 0 {
            for k in 1..=n {
                let q = k as f64 / n as f64;
                let x = self.ttft.quantile(q).unwrap_or(0.0) / 1e3;
                let y = q * got;
                match cdf.last_mut() {
                    Some(last) if last[0] == x => last[1] = y,
                    _ => cdf.push([x, y]),
                }
            }
        }
        let details = SimDetails {
            label: label.to_string(),
            fleet: fleet.name().to_string(),
            reasons: self
                .reasons
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            groups,
            engines,
            counters: self.counters,
            ttft_cdf: cdf,
            policy_state: self.policy.state_json(),
        };
        SimOutcome { report, details }
    }
}

/// The engine's prefix-cache keys: the chained hashes of every full block of the prompt text as
/// the engine reads it (chat messages joined as `role: content\n`, the rule the analyzer uses
/// too), up to `max_blocks`. The analyzer hashed the first blocks already (`analyzed`, the same
/// chain over the same text); only the blocks beyond are hashed here.
fn engine_hashes(api: Api, prompt: &str, analyzed: &[u64], max_blocks: usize) -> Vec<u64> {
    let (head, tail): (&[u8], &[u8]) = match api {
        Api::Completions => (b"", b""),
        Api::Chat => (b"user: ", b"\n"),
    };
    let len = head.len() + prompt.len() + tail.len();
    let blocks = (len / qoe_core::prompt::BLOCK_BYTES).min(max_blocks);
    let mut hashes = Vec::with_capacity(blocks);
    hashes.extend_from_slice(&analyzed[..analyzed.len().min(blocks)]);
    if hashes.len() < blocks {
        let mut text = Vec::with_capacity(len);
        text.extend_from_slice(head);
        text.extend_from_slice(prompt.as_bytes());
        text.extend_from_slice(tail);
        let mut chained = hashes.last().copied().unwrap_or(0);
        let rest = text
            .chunks_exact(qoe_core::prompt::BLOCK_BYTES)
            .skip(hashes.len())
            .take(blocks - hashes.len());
        for block in rest {
            chained = hash_bytes(chained, block);
            hashes.push(chained);
        }
    }
    hashes
}

/// The `max_tokens` a client sends for a request of `output` tokens. A completions client always
/// sends one: without it vLLM stops at 16 tokens.
fn body_max_tokens(hint: OutputHint, api: Api, output: u32) -> Option<u32> {
    match (hint, api) {
        (OutputHint::MaxTokens, _) | (_, Api::Completions) => Some(output),
        (OutputHint::Header, Api::Chat) => None,
    }
}

/// The JSON body the live `bench` client sends (`stream: true`; `max_tokens` when given, see
/// [`body_max_tokens`]).
fn request_body(api: Api, model: &str, prompt: &str, max_tokens: Option<u32>) -> Vec<u8> {
    let mut b = Vec::with_capacity(prompt.len() + 160);
    let string = |b: &mut Vec<u8>, s: &str| {
        // Workload prompts are plain ASCII words: copied as they are when nothing needs escaping
        // (the common case, and much faster than escaping byte by byte).
        if s.bytes()
            .all(|c| (0x20..0x7f).contains(&c) && c != b'"' && c != b'\\')
        {
            b.push(b'"');
            b.extend_from_slice(s.as_bytes());
            b.push(b'"');
        } else {
            serde_json::to_writer(&mut *b, s).expect("a string serializes");
        }
    };
    b.extend_from_slice(b"{\"model\":");
    string(&mut b, model);
    b.extend_from_slice(b",\"stream\":true,\"stream_options\":{\"include_usage\":true}");
    if let Some(m) = max_tokens {
        b.extend_from_slice(format!(",\"max_tokens\":{m},\"ignore_eos\":true").as_bytes());
    }
    match api {
        Api::Completions => {
            b.extend_from_slice(b",\"prompt\":");
            string(&mut b, prompt);
        }
        Api::Chat => {
            b.extend_from_slice(b",\"messages\":[{\"role\":\"user\",\"content\":");
            string(&mut b, prompt);
            b.push(b'}');
            b.push(b']');
        }
    }
    b.push(b'}');
    b
}

// ---------------------------------------------------------------------------------------------
// Rate sweeps

/// A workload with its arrival rate set to `rate` requests/s (new arrivals; sessions add their
/// later turns). A trace is replayed at the speed that gives its rows that mean rate; one whose
/// rows all arrive at once has none, and `rate` is then its replay speed-up.
pub fn with_rate(workload: &Workload, rate: f64) -> Result<Workload, SimError> {
    let base = workload.arrival_rate().unwrap_or(1.0);
    let mut w = workload.clone();
    w.scale_rate(rate / base)
        .map_err(|e| SimError(format!("rate {}: {e}", crate::workload::Num(rate))))?;
    Ok(w)
}

/// One rate of a sweep.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepPoint {
    pub rate: f64,
    pub slo_attainment: f64,
    /// Attainment of priority-1 requests, if there were any.
    pub p1_attainment: Option<f64>,
    pub mean_qoe: f64,
    pub qoe_acceptable_share: f64,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    pub errors: u64,
}

impl SweepPoint {
    /// The point of runs at one rate with different seeds: shares pooled over their requests
    /// (one run: exactly its report's), TTFT percentiles the mean of the runs'.
    fn pooled(rate: f64, runs: &[Report]) -> SweepPoint {
        let pool = |scope: &dyn Fn(&Report) -> Option<(u64, f64)>| {
            let (mut n, mut sum) = (0u64, 0.0);
            if let [one] = runs {
                return scope(one).map(|(_, v)| v);
            }
            for (k, v) in runs.iter().filter_map(scope) {
                n += k;
                sum += k as f64 * v;
            }
            (n > 0).then(|| sum / n as f64)
        };
        let overall = |f: fn(&Summary) -> f64| {
            pool(&|r: &Report| Some((r.overall.requests, f(&r.overall)))).unwrap_or(0.0)
        };
        let mean_ms = |f: fn(&Summary) -> Option<f64>| {
            let v: Vec<f64> = runs.iter().filter_map(|r| f(&r.overall)).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        SweepPoint {
            rate,
            slo_attainment: overall(|s| s.slo_attainment),
            p1_attainment: pool(&|r: &Report| {
                r.priority(1).map(|s| (s.requests, s.slo_attainment))
            }),
            mean_qoe: overall(|s| s.mean_qoe),
            qoe_acceptable_share: overall(|s| s.qoe_acceptable_share),
            ttft_p50_ms: mean_ms(|s| s.ttft_ms.p50),
            ttft_p99_ms: mean_ms(|s| s.ttft_ms.p99),
            errors: runs.iter().map(|r| r.overall.errors).sum(),
        }
    }

    /// Whether the rate is sustained: at least 90% of requests attain their SLO (DistServe).
    pub fn sustained(&self) -> bool {
        self.slo_attainment >= GOODPUT_ATTAINMENT
    }
}

/// How to search.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SweepConfig {
    pub lo: f64,
    pub hi: f64,
    /// Stop when the bracket is narrower than this fraction of its low end.
    pub tolerance: f64,
    /// Most bisection steps after the two ends.
    pub max_steps: u32,
    /// Seeds each rate runs with (`cfg.seed`, `cfg.seed + 1`, ...), their requests pooled: near
    /// a knee one seed's attainment moves by several points for which heavy requests land when.
    pub seeds: u32,
}

impl Default for SweepConfig {
    fn default() -> Self {
        SweepConfig {
            lo: 1.0,
            hi: 100.0,
            tolerance: 0.02,
            max_steps: 8,
            seeds: 1,
        }
    }
}

/// A policy's goodput on a scenario.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepResult {
    pub label: String,
    /// Every rate simulated, by rate.
    pub points: Vec<SweepPoint>,
    /// The highest rate found with ≥ 90% SLO attainment; `None` if even the low end missed.
    pub goodput: Option<f64>,
    /// The high end itself was sustained: the goodput is at least `goodput`.
    pub capped: bool,
    /// Seeds pooled at every rate ([`SweepConfig::seeds`]).
    #[serde(default = "one_seed")]
    pub seeds: u32,
    /// The run at 80% of the goodput (the QoE target's load).
    pub at_80pct: Option<SweepPoint>,
}

/// Finds `make_policy`'s goodput on `workload` × `fleet` by bisection over the arrival rate in
/// `[sweep.lo, sweep.hi]`, assuming attainment falls as the rate grows. Every rate runs a fresh
/// policy and fleet with the same seed (or the same `sweep.seeds` seeds, pooled).
pub fn sweep_rate(
    fleet: &Fleet,
    workload: &Workload,
    make_policy: &dyn Fn() -> Box<dyn RoutingPolicy>,
    label: &str,
    cfg: &SimConfig,
    sweep: SweepConfig,
) -> Result<SweepResult, SimError> {
    if !(sweep.lo.is_finite() && sweep.lo > 0.0 && sweep.hi.is_finite() && sweep.hi > sweep.lo) {
        return Err(SimError(format!(
            "sweep range {}:{} must satisfy 0 < low < high",
            sweep.lo, sweep.hi
        )));
    }
    let run = |rate: f64| -> Result<SweepPoint, SimError> {
        let w = with_rate(workload, rate)?;
        let mut runs = Vec::new();
        for i in 0..sweep.seeds.max(1) {
            let cfg = SimConfig {
                seed: cfg.seed.wrapping_add(i as u64),
                ..cfg.clone()
            };
            let policy = make_policy();
            runs.push(simulate(fleet, &w, policy.as_ref(), label, &cfg)?.report);
        }
        Ok(SweepPoint::pooled(rate, &runs))
    };
    let mut points = Vec::new();
    let lo_point = run(sweep.lo)?;
    let lo_ok = lo_point.sustained();
    points.push(lo_point);
    let (mut goodput, mut capped) = (None, false);
    if lo_ok {
        let hi_point = run(sweep.hi)?;
        let hi_ok = hi_point.sustained();
        points.push(hi_point);
        if hi_ok {
            goodput = Some(sweep.hi);
            capped = true;
        } else {
            let (mut good, mut bad) = (sweep.lo, sweep.hi);
            for _ in 0..sweep.max_steps {
                if (bad - good) <= sweep.tolerance * good {
                    break;
                }
                let mid = (good + bad) / 2.0;
                let p = run(mid)?;
                if p.sustained() {
                    good = mid;
                } else {
                    bad = mid;
                }
                points.push(p);
            }
            goodput = Some(good);
        }
    }
    let at_80pct = match goodput {
        Some(g) => Some(run(0.8 * g)?),
        None => None,
    };
    points.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    Ok(SweepResult {
        label: label.to_string(),
        points,
        goodput,
        capped,
        seeds: sweep.seeds.max(1),
        at_80pct,
    })
}

fn one_seed() -> u32 {
    1
}

#[cfg(test)]
mod tests {
    use super::*;
    use qoe_core::prompt::prefix_block_hashes;

    #[test]
    fn a_trace_at_a_rate_is_replayed_at_that_many_requests_per_second() {
        use crate::workload::{Trace, WorkloadSpec};
        // 300 rows 0.1 s apart: 10 requests/s as recorded, at speed-up 2 in the file.
        let csv: String = std::iter::once("timestamp_s,prompt_tokens,output_tokens\n".into())
            .chain((0..300).map(|i| format!("{},100,10\n", i as f64 / 10.0)))
            .collect();
        let spec = WorkloadSpec::from_toml_str(
            "[arrivals]\nkind = \"trace\"\nfile = \"t.csv\"\nspeedup = 2\n",
        )
        .unwrap();
        let w = Workload::new(spec, Some(Trace::parse_csv(&csv).unwrap())).unwrap();
        assert!((w.arrival_rate().unwrap() - 20.0).abs() < 1e-9);
        let fast = with_rate(&w, 40.0).unwrap();
        assert!((fast.arrival_rate().unwrap() - 40.0).abs() < 1e-9);
        let last = fast.generate(1).map(|r| r.at).max().unwrap();
        // 299 gaps at 1/40 s.
        assert!(last.abs_diff(7_475_000) <= 1, "{last}");
    }

    #[test]
    fn bodies_parse_as_the_router_reads_them() {
        for api in [Api::Completions, Api::Chat] {
            let body = request_body(api, "m\"x", "abcd efgh\\ \u{1}é", Some(7));
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["model"], "m\"x");
            let prompt = match api {
                Api::Completions => &v["prompt"],
                Api::Chat => &v["messages"][0]["content"],
            };
            assert_eq!(prompt, "abcd efgh\\ \u{1}é");
            assert_eq!(v["max_tokens"], 7);
            assert_eq!(v["stream"], true);
            let body = request_body(api, "m", "abcd", None);
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert!(v.get("max_tokens").is_none());
        }
    }

    #[test]
    fn only_a_chat_body_hides_its_output_length() {
        assert_eq!(body_max_tokens(OutputHint::Header, Api::Chat, 300), None);
        assert_eq!(
            body_max_tokens(OutputHint::Header, Api::Completions, 300),
            Some(300)
        );
        for api in [Api::Chat, Api::Completions] {
            assert_eq!(body_max_tokens(OutputHint::MaxTokens, api, 300), Some(300));
        }
        // What the router's analyzer then expects of a completion: its real length, not the
        // 16 tokens of a body without `max_tokens`.
        let route = Route {
            kind: ApiKind::Completion,
            model_required: true,
        };
        let body = request_body(Api::Completions, "m", "abcd", Some(300));
        let p = analyze(route, &body, |_| None, &AnalyzerConfig::default(), |_| 256).unwrap();
        assert_eq!(p.expected_output_tokens, 300);
    }

    #[test]
    fn engine_hashes_continue_the_analyzers_chain() {
        let prompt = "abcdefgh ".repeat(2_000); // 18,000 bytes: 281 blocks, 282 with chat framing
        for (api, text) in [
            (Api::Completions, prompt.clone()),
            (Api::Chat, format!("user: {prompt}\n")),
        ] {
            let full = prefix_block_hashes(text.as_bytes(), 10_000);
            for analyzed in [0, 1, 256, full.len()] {
                for max in [3, 256, 300, 10_000] {
                    let got = engine_hashes(api, &prompt, &full[..analyzed.min(full.len())], max);
                    assert_eq!(got, full[..max.min(full.len())], "{api:?} {analyzed} {max}");
                }
            }
        }
    }

    #[test]
    fn health_has_hysteresis_and_counts_flaps() {
        let mut h = Health::new();
        h.record(false, 1, 2, 1);
        assert!(h.healthy);
        h.record(false, 2, 2, 1);
        assert!(!h.healthy);
        h.record(true, 3, 2, 1);
        assert!(h.healthy);
        assert_eq!(h.flaps(3), 2);
        assert_eq!(h.flaps(3 + FLAP_WINDOW + 10), 0);
    }

    /// `--sla-enforcement shed`: under overload the qoe policy refuses priority-3 requests it
    /// predicts will miss their deadline, at once with 429, and never priority 1; a policy that
    /// predicts nothing sheds nothing; nothing leaks.
    #[test]
    fn sla_enforcement_sheds_only_priority_3_and_only_with_predictions() {
        let fleet = Fleet::from_toml_str("[[engines]]\nprofile = \"tiny\"\ncount = 2\n").unwrap();
        let workload = Workload::from_toml_str(
            "duration_s = 6\nmax_context_tokens = 4096\n[arrivals]\nkind = \"poisson\"\nrate = 400\n\
             [prompt]\nkind = \"uniform\"\nmin = 200\nmax = 2000\n\
             [output]\nkind = \"uniform\"\nmin = 4\nmax = 64\n\
             [[priorities]]\nlevel = 1\nshare = 0.5\nttft_ms = 200\ntpot_ms = 500\n\
             [[priorities]]\nlevel = 3\nshare = 0.5\nttft_ms = 200\ntpot_ms = 500\n",
        )
        .unwrap();
        let run = |kind: qoe_core::PolicyKind, sla_shed: bool| {
            let cfg = SimConfig {
                seed: 5,
                sla_shed,
                ..SimConfig::default()
            };
            let policy = qoe_core::build_policy(kind, &qoe_core::PolicyConfig::default());
            let mut sim = Sim::new(&fleet, &workload, policy.as_ref(), &cfg).unwrap();
            sim.run();
            assert_eq!(sim.in_flight, 0);
            for v in &sim.views {
                assert_eq!(v.load, Load::default());
            }
            sim.finish("x", &fleet, &workload)
        };
        let refused = |o: &SimOutcome, level: u8| {
            let p = o
                .report
                .by_priority
                .iter()
                .find(|s| s.priority == Some(level));
            p.and_then(|s| s.errors_by_kind.get("http_429").copied())
                .unwrap_or(0)
        };
        let shed = run(qoe_core::PolicyKind::Qoe, true);
        assert!(
            shed.details.counters.sla_shed > 0,
            "{:?}",
            shed.details.counters
        );
        assert_eq!(refused(&shed, 3), shed.details.counters.sla_shed);
        assert_eq!(refused(&shed, 1), 0);
        let off = run(qoe_core::PolicyKind::Qoe, false);
        assert_eq!(off.details.counters.sla_shed, 0);
        assert_eq!(refused(&off, 3), 0);
        let blind = run(qoe_core::PolicyKind::LeastLoaded, true);
        assert_eq!(blind.details.counters.sla_shed, 0);
    }

    /// After a run with outages, retries and timeouts, every load counter is back to zero, every
    /// engine is empty and every request left exactly one record.
    #[test]
    fn nothing_leaks() {
        let fleet = Fleet::from_toml_str(
            "[[engines]]\nprofile = \"tiny\"\ncount = 3\n\
             [[changes]]\nat_s = 1.0\nengine = 1\navailable = false\n\
             [[changes]]\nat_s = 4.0\nengine = 1\navailable = true\n",
        )
        .unwrap();
        let workload = Workload::from_toml_str(
            "duration_s = 6\nmax_context_tokens = 2048\n[arrivals]\nkind = \"poisson\"\nrate = 300\n\
             [prompt]\nkind = \"uniform\"\nmin = 16\nmax = 600\n\
             [output]\nkind = \"uniform\"\nmin = 4\nmax = 200\n\
             [prefix]\ngroups = 3\ntokens = 128\nshare = 0.5\n",
        )
        .unwrap();
        let planned = workload.generate(3).count() as u64;
        let mut queueing = AdmissionSpec {
            queue_max: 10,
            queue_timeout: 100_000,
            ..AdmissionSpec::default()
        };
        queueing.limits.max_inflight = 6;
        for (delay, admission) in [
            (0, AdmissionSpec::default()),
            (2_000, AdmissionSpec::default()),
            (0, queueing),
        ] {
            let cfg = SimConfig {
                seed: 3,
                network_delay: delay,
                // Short enough that some requests time out at the client and at the router.
                first_byte_timeout: 20_000,
                request_timeout: 250_000,
                admission,
                ..SimConfig::default()
            };
            let policy = qoe_core::build_policy(
                qoe_core::PolicyKind::LeastLoaded,
                &qoe_core::PolicyConfig::default(),
            );
            let mut sim = Sim::new(&fleet, &workload, policy.as_ref(), &cfg).unwrap();
            sim.run();
            assert_eq!(sim.in_flight, 0);
            assert!(sim.queue.is_empty());
            assert!(sim.live.iter().all(|l| !l.active && !l.queued));
            for (ep, v) in sim.eps.iter().zip(&sim.views) {
                assert_eq!(v.load, Load::default(), "{}", ep.label);
                assert_eq!(ep.engine.live_requests(), 0, "{}", ep.label);
            }
            assert!(sim.counters.retries > 0, "the outage caused retries");
            let out = sim.finish("ll", &fleet, &workload);
            let o = &out.report.overall;
            assert_eq!(o.requests, planned);
            assert_eq!(out.details.counters.requests, planned);
            // Streams broken by the outage, the router's first-byte timeouts (504) and client
            // timeouts all happened.
            for kind in ["stream", "http_504", "timeout"] {
                assert!(o.errors_by_kind.contains_key(kind), "{kind}: {o:?}");
            }
            if admission.enabled() {
                // Queue full, displaced or waited too long.
                assert!(o.errors_by_kind.contains_key("http_429"), "{o:?}");
                assert!(out.details.counters.queued > 0);
            }
            let share = if admission.enabled() { 10 } else { 3 };
            assert!(o.completed > planned / share, "{o:?}");
            assert_eq!(o.errors, o.errors_by_kind.values().sum::<u64>());
        }
    }

    /// Round robin on two tiny engines, the first of which goes down after 1 s, under `rate`
    /// requests/s for 4 s (one retry budget window): what the retry tests count.
    fn outage_counters(rate: u32, output_tokens: u32, cfg: SimConfig) -> SimCounters {
        let fleet = Fleet::from_toml_str(
            "[[engines]]\nprofile = \"tiny\"\ncount = 2\n\
             [[changes]]\nat_s = 1.0\nengine = 0\navailable = false\n",
        )
        .unwrap();
        let workload = Workload::from_toml_str(&format!(
            "duration_s = 4\nmax_context_tokens = 2048\n[arrivals]\nkind = \"poisson\"\n\
             rate = {rate}\n[prompt]\nkind = \"fixed\"\ntokens = 64\n[output]\nkind = \"fixed\"\n\
             tokens = {output_tokens}\n"
        ))
        .unwrap();
        let policy = qoe_core::build_policy(
            qoe_core::PolicyKind::RoundRobin,
            &qoe_core::PolicyConfig::default(),
        );
        let mut sim = Sim::new(&fleet, &workload, policy.as_ref(), &cfg).unwrap();
        sim.run();
        sim.counters
    }

    /// The retry budget holds in virtual time as live: with none, an outage's failures are
    /// answered, not retried; with a floor of one per second, at most ten retries per 10 s.
    #[test]
    fn retries_stay_within_the_retry_budget() {
        let run = |ratio: f64, min_per_sec: f64| {
            let cfg = SimConfig {
                seed: 5,
                retry_budget: RetryBudgetConfig { ratio, min_per_sec },
                ..SimConfig::default()
            };
            outage_counters(200, 8, cfg)
        };
        let unlimited = run(f64::INFINITY, 0.0);
        assert!(unlimited.retries > 10, "{unlimited:?}");
        assert_eq!(unlimited.retries_refused, 0);
        let none = run(0.0, 0.0);
        assert_eq!(none.retries, 0);
        // Each failure refused once (a retry may fail again, so the unlimited run retries a
        // little more).
        assert!(none.retries_refused > 10, "{none:?}");
        assert!(none.retries_refused <= unlimited.retries, "{none:?}");
        let floor = run(0.0, 1.0);
        assert_eq!(floor.retries, 10, "{floor:?}");
    }

    /// Requests refused before they are sent (here by a full admission queue) are not requests
    /// the budget grows with: under overload retries stay a share of what reached an engine.
    #[test]
    fn requests_refused_before_sending_earn_no_retries() {
        let mut admission = AdmissionSpec {
            queue_max: 4,
            ..AdmissionSpec::default()
        };
        admission.limits.max_inflight = 8;
        let cfg = SimConfig {
            seed: 5,
            admission,
            retry_budget: RetryBudgetConfig {
                ratio: 0.1,
                min_per_sec: 0.0,
            },
            ..SimConfig::default()
        };
        let c = outage_counters(800, 64, cfg);
        assert!(c.shed > c.requests / 5, "{c:?}");
        assert!(c.retries_refused > 0, "{c:?}");
        // The whole run fits one 10 s window: a tenth of the requests sent, which are at most
        // those not refused plus those refused only when their retry queued.
        assert!(c.retries * 10 <= c.requests - c.shed + c.retries, "{c:?}");
    }

    #[test]
    fn learned_output_starts_at_the_default_and_follows() {
        let mut l = LearnedOutput {
            value: None,
            default: 256,
        };
        assert_eq!(l.estimate(), 256);
        l.record(100);
        assert_eq!(l.estimate(), 100);
        l.record(200);
        assert_eq!(l.estimate(), 105);
    }
}
