//! Routing policies: one trait, a registry by name.
//!
//! A policy sees the request's [`RequestProfile`], the candidate endpoints as [`EndpointView`]s
//! (already filtered by the router to those that serve the model and may take traffic) and `now`.
//! It never does load accounting: the router counts requests in flight the same way whichever
//! policy runs, so policies are comparable. Policies may keep bounded state of their own (a
//! round-robin counter, a prefix index) behind interior mutability, and must be deterministic for a
//! seed so the fleet simulator reproduces its runs.

mod baseline;
mod prefix;
pub mod qoe;
mod session;

pub use baseline::{LeastLoaded, PowerOfTwo, RandomPolicy, RoundRobin};
pub use prefix::{PrefixAware, PrefixIndex};
pub use qoe::{Qoe, QoeConfig};
pub use session::SessionAffinity;

use crate::{EndpointId, EndpointView, Micros, RequestProfile};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why an endpoint was chosen: short, machine-readable, sent back as `x-qoe-reason` and counted
/// in the router's metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// Only one candidate: nothing to choose.
    OnlyCandidate,
    RoundRobin,
    Random,
    /// Fewest requests in flight.
    LeastLoaded,
    /// The less loaded of two random candidates.
    PowerOfTwo,
    /// The session's home endpoint (highest rendezvous score).
    SessionHit,
    /// The session's home endpoint was over its load bound; the next one by score took it.
    SessionOverflow,
    /// No session key: fell back to least-loaded.
    SessionNoKey,
    /// Longest cached prefix match.
    PrefixHit,
    /// A prefix matched, but that endpoint was too loaded: least-loaded instead.
    PrefixOverloaded,
    /// No known prefix: least-loaded.
    PrefixMiss,
    // The `qoe` policy's reasons: what overrode the cheapest endpoint (prefix affinity, the
    // deadline overflow), else why it beat the runner-up: tie, prefix, then the term with the
    // largest weighted difference (docs/QOE.md).
    /// qoe: several endpoints had the same lowest cost (within 1e-9); one was drawn at random.
    QoeTie,
    /// qoe: the chosen endpoint's prefix-cache hit made the difference: with only the runner-up's
    /// cached prefix it would have lost.
    QoePrefix,
    /// qoe: the performance term decided in favour of an endpoint with no samples of its own (its
    /// latency predicted from the fleet prior: the mean learned endpoint, or the configured
    /// defaults) over one whose latency was learned.
    QoeColdStart,
    /// qoe: the predicted time to first token (performance term, TTFT side) decided.
    QoeTtft,
    /// qoe: the predicted inter-token latency and delivery rate (performance term, decode side)
    /// decided.
    QoeItl,
    /// qoe: the resource term (KV usage, queue, in-flight requests and tokens against capacity)
    /// decided; also a priority-2 request's (load-proportional) priority term.
    QoeResource,
    /// qoe: the reliability term (errors, timeouts, breaker, flaps, stale metrics, recent
    /// failure) decided.
    QoeReliability,
    /// qoe: a priority-1 request took the endpoint with the most headroom (priority term).
    QoeHeadroom,
    /// qoe: a priority-3 request went to a busy-but-healthy endpoint, leaving headroom to others
    /// (priority term).
    QoeLeaveHeadroom,
    /// qoe: no endpoint was predicted to meet the request's TTFT deadline; it went to the one
    /// whose queue already missed it the most, leaving the others to requests still on time
    /// (`QoeConfig::deadline_overflow`).
    QoeOverflow,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::OnlyCandidate => "only-candidate",
            Reason::RoundRobin => "roundrobin",
            Reason::Random => "random",
            Reason::LeastLoaded => "least-loaded",
            Reason::PowerOfTwo => "power-of-two",
            Reason::SessionHit => "session-hit",
            Reason::SessionOverflow => "session-overflow",
            Reason::SessionNoKey => "session-no-key",
            Reason::PrefixHit => "prefix-hit",
            Reason::PrefixOverloaded => "prefix-overloaded",
            Reason::PrefixMiss => "prefix-miss",
            Reason::QoeTie => "qoe-tie",
            Reason::QoePrefix => "qoe-prefix",
            Reason::QoeColdStart => "qoe-cold-start",
            Reason::QoeTtft => "qoe-ttft",
            Reason::QoeItl => "qoe-itl",
            Reason::QoeResource => "qoe-resource",
            Reason::QoeReliability => "qoe-reliability",
            Reason::QoeHeadroom => "qoe-headroom",
            Reason::QoeLeaveHeadroom => "qoe-leave-headroom",
            Reason::QoeOverflow => "qoe-overflow",
        }
    }
}

/// What a cost-based policy predicted and weighed for the endpoint it chose (for monitoring).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct DecisionDetail {
    pub predicted_ttft_ms: f64,
    pub predicted_itl_ms: f64,
    /// Prompt tokens expected to be served from the endpoint's prefix cache.
    pub cached_tokens: u32,
    /// Of `predicted_ttft_ms`, the predicted wait for a batch seat (0 while the engine has free
    /// seats); the TTFT fit learns from what remains.
    pub seat_wait_ms: f64,
    /// The four cost terms, each in 0..1: resource, performance, reliability, priority.
    pub terms: [f64; 4],
    /// The weights they were combined with (α, β, γ, δ), summing to 1.
    pub weights: [f64; 4],
    pub cost: f64,
}

/// A policy's answer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    /// Position of the chosen endpoint in the slice given to `pick`.
    pub index: usize,
    pub endpoint: EndpointId,
    pub reason: Reason,
    /// Present for cost-based policies.
    pub detail: Option<DecisionDetail>,
}

impl Decision {
    pub fn new(endpoints: &[EndpointView], index: usize, reason: Reason) -> Decision {
        Decision {
            index,
            endpoint: endpoints[index].id,
            reason,
            detail: None,
        }
    }
}

/// What the router saw of a request a policy routed, handed back so policies can learn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Feedback {
    /// [`EndpointView::key`] of the endpoint that served it.
    pub endpoint_key: u64,
    pub priority: crate::Priority,
    pub prompt_tokens: u32,
    /// The request's TTFT deadline, if it had one.
    pub sla_ttft_ms: Option<u32>,
    /// The request's first token is seen (a stream, or a prefill stage's one-token answer): only
    /// then is its deadline judged, met or missed.
    pub streamed: bool,
    /// The endpoint's load just before this request was added.
    pub load_at_dispatch: crate::Load,
    /// The decision's detail, if the policy gave one.
    pub detail: Option<DecisionDetail>,
    pub event: FeedbackEvent,
}

/// When feedback is given.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FeedbackEvent {
    /// The first token arrived `ttft` after the request was sent.
    FirstToken { ttft: Micros },
    /// The request ended.
    Finished {
        ttft: Option<Micros>,
        output_tokens: u32,
        /// Mean gap between tokens after the first, ms (None with fewer than two tokens).
        mean_itl_ms: Option<f64>,
        failed: bool,
    },
}

/// A routing policy. `pick` returns `None` only when `endpoints` is empty.
pub trait RoutingPolicy: Send + Sync {
    /// The name it is registered under (`--routing-logic`).
    fn name(&self) -> &'static str;
    fn pick(
        &self,
        req: &RequestProfile,
        endpoints: &[EndpointView],
        now: Micros,
    ) -> Option<Decision>;
    /// Learns from what happened to a request it routed. Baselines ignore it.
    fn feedback(&self, _feedback: &Feedback, _now: Micros) {}
    /// The policy's current adaptive state for monitoring (e.g. weights), as JSON.
    fn state_json(&self) -> Option<serde_json::Value> {
        None
    }
    /// The lowest TTFT, ms, the policy predicts `req` would get on any of `endpoints` (for SLA
    /// enforcement); `None` for policies that do not predict.
    fn best_predicted_ttft_ms(
        &self,
        _req: &RequestProfile,
        _endpoints: &[EndpointView],
        _now: Micros,
    ) -> Option<f64> {
        None
    }
    /// SLA enforcement's rule, shared by the router (`--sla-enforcement shed`) and the simulator:
    /// whether `req`, a priority-3 request with a TTFT deadline sent at `started`, is predicted to
    /// miss it on every one of `endpoints` with the time left at `now`. Returns the best
    /// predicted TTFT, ms, when it is; `None` when it is not, or nothing is predicted.
    fn deadline_lost(
        &self,
        req: &RequestProfile,
        endpoints: &[EndpointView],
        now: Micros,
        started: Micros,
    ) -> Option<f64> {
        let (Some(sla_ms), crate::Priority::LOW) = (req.sla_ttft_ms, req.priority) else {
            return None;
        };
        let best = self.best_predicted_ttft_ms(req, endpoints, now)?;
        let left_ms = sla_ms as f64 - now.saturating_sub(started) as f64 / 1e3;
        (best > left_ms).then_some(best)
    }
}

/// The policies the registry knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    RoundRobin,
    Random,
    LeastLoaded,
    PowerOfTwo,
    Session,
    PrefixAware,
    /// The QoE-centric policy ([`Qoe`]).
    Qoe,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 7] = [
        PolicyKind::RoundRobin,
        PolicyKind::Random,
        PolicyKind::LeastLoaded,
        PolicyKind::PowerOfTwo,
        PolicyKind::Session,
        PolicyKind::PrefixAware,
        PolicyKind::Qoe,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::RoundRobin => "roundrobin",
            PolicyKind::Random => "random",
            PolicyKind::LeastLoaded => "least-loaded",
            PolicyKind::PowerOfTwo => "power-of-two",
            PolicyKind::Session => "session",
            PolicyKind::PrefixAware => "prefix-aware",
            PolicyKind::Qoe => "qoe",
        }
    }

    /// Parses a registered name; the error lists the names that exist.
    pub fn parse(name: &str) -> Result<PolicyKind, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == name)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|k| k.as_str()).collect();
                format!(
                    "unknown routing logic '{name}'; expected one of: {}",
                    names.join(", ")
                )
            })
    }
}

/// Settings shared by the policies, with the defaults the router uses.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PolicyConfig {
    /// Seed for the policies' random choices.
    pub seed: u64,
    /// Session affinity's load bound: an endpoint takes a session only while its in-flight count
    /// is at most `ceil(factor × mean in flight)` (+1 for the request itself).
    pub session_load_factor: f64,
    /// Prefix index capacity, in block entries (each ~48 bytes).
    pub prefix_index_blocks: usize,
    /// Prefix-aware: go least-loaded when the matched endpoint has this many more requests in
    /// flight than the least-loaded one.
    pub prefix_balance_margin: u32,
    /// Settings of the `qoe` policy.
    pub qoe: QoeConfig,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            seed: 0x5eed,
            session_load_factor: 1.25,
            prefix_index_blocks: 200_000,
            prefix_balance_margin: 8,
            qoe: QoeConfig::default(),
        }
    }
}

/// Builds the policy registered as `kind`.
pub fn build_policy(kind: PolicyKind, config: &PolicyConfig) -> Box<dyn RoutingPolicy> {
    match kind {
        PolicyKind::RoundRobin => Box::new(RoundRobin::default()),
        PolicyKind::Random => Box::new(RandomPolicy::new(config.seed)),
        PolicyKind::LeastLoaded => Box::new(LeastLoaded::new(config.seed)),
        PolicyKind::PowerOfTwo => Box::new(PowerOfTwo::new(config.seed)),
        PolicyKind::Session => Box::new(SessionAffinity::new(config)),
        PolicyKind::PrefixAware => Box::new(PrefixAware::new(config)),
        PolicyKind::Qoe => Box::new(Qoe::new(config)),
    }
}

/// A lock-free, seedable random source shared by threads: splitmix64 over an atomic counter.
/// Deterministic for a seed in a single-threaded driver (the simulator).
#[derive(Debug)]
pub struct SharedRng(AtomicU64);

impl SharedRng {
    pub fn new(seed: u64) -> Self {
        SharedRng(AtomicU64::new(seed))
    }

    pub fn next_u64(&self) -> u64 {
        let x = self
            .0
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(x)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

/// splitmix64's finalizer: a good 64-bit mixer.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Index of the endpoint with the fewest requests in flight; ties broken uniformly at random
/// (never always toward the same endpoint).
pub fn least_loaded_index(endpoints: &[EndpointView], rng: &SharedRng) -> Option<usize> {
    let min = endpoints.iter().map(|e| e.load.in_flight()).min()?;
    let ties = endpoints
        .iter()
        .filter(|e| e.load.in_flight() == min)
        .count();
    let nth = if ties > 1 { rng.below(ties) } else { 0 };
    endpoints
        .iter()
        .enumerate()
        .filter(|(_, e)| e.load.in_flight() == min)
        .nth(nth)
        .map(|(i, _)| i)
}

#[cfg(test)]
pub(crate) mod test_support {
    use crate::{EndpointView, RequestProfile};

    /// Views with the given in-flight counts (all in decode), keys 1000+i.
    pub fn views(loads: &[u32]) -> Vec<EndpointView> {
        loads
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                let mut v = EndpointView::idle(i as u32, 1000 + i as u64);
                v.load.in_decode = l;
                v
            })
            .collect()
    }

    pub fn request() -> RequestProfile {
        RequestProfile::new("m", 100, 100)
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[test]
    fn registry_names_round_trip_and_unknown_lists_names() {
        for kind in PolicyKind::ALL {
            assert_eq!(PolicyKind::parse(kind.as_str()), Ok(kind));
            let policy = build_policy(kind, &PolicyConfig::default());
            assert_eq!(policy.name(), kind.as_str());
            assert!(policy.pick(&request(), &[], 0).is_none());
            let one = views(&[3]);
            assert_eq!(policy.pick(&request(), &one, 0).unwrap().index, 0);
        }
        let err = PolicyKind::parse("fastest").unwrap_err();
        assert!(
            err.contains("fastest") && err.contains("least-loaded"),
            "{err}"
        );
    }

    #[test]
    fn least_loaded_ties_spread() {
        let rng = SharedRng::new(7);
        let v = views(&[1, 0, 5, 0, 0]);
        let mut seen = [0u32; 5];
        for _ in 0..3000 {
            seen[least_loaded_index(&v, &rng).unwrap()] += 1;
        }
        assert_eq!(seen[0] + seen[2], 0);
        for i in [1, 3, 4] {
            assert!(seen[i] > 800, "tie-break not uniform: {seen:?}");
        }
    }
}
