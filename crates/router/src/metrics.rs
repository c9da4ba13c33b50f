//! The router's own Prometheus metrics (`/metrics`).
//!
//! Counters and histograms are updated on the request path; per-endpoint gauges (load, smoothed
//! latencies, scraped engine signals and their age) are refreshed from the endpoint table when
//! `/metrics` is read, so the hot path pays nothing for them. Label sets are bounded: endpoints that
//! leave the table are removed from every family.

use crate::endpoints::{lock, Table};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use qoe_core::Micros;
use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, OnceLock};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    pub code: u16,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PriorityLabel {
    pub priority: u8,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SlaLabels {
    pub priority: u8,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TermLabel {
    pub term: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointTermLabels {
    pub endpoint: String,
    pub term: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShedLabels {
    pub priority: u8,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub endpoint: String,
    pub kind: String,
}

type FGauge = Gauge<f64, AtomicU64>;

/// The `term` label values of `qoe_router_decision`.
const DECISION_TERMS: [&str; 8] = [
    "predicted_ttft_seconds",
    "predicted_itl_seconds",
    "cached_tokens",
    "resource",
    "performance",
    "reliability",
    "priority",
    "cost",
];

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn qoe_histogram() -> Histogram {
    Histogram::new([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0])
}

fn itl_histogram() -> Histogram {
    // 0.5 ms .. ~4 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

/// All of the router's metrics.
pub struct RouterMetrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub rejected: Family<CodeLabel, Counter>,
    /// Requests that ended before any answer, by outcome (`client_closed`, `closed_at_shutdown`).
    pub unanswered: Family<OutcomeLabel, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    pub retries: Counter,
    /// Client connections closed at once at the connection limit.
    pub connections_refused: Counter,
    /// Retries the retry budget refused (the failure was answered instead).
    pub retries_refused: Counter,
    /// Chats counted as flattened text because the chat template could not render them.
    pub chat_template_fallbacks: Counter,
    pub ttft: Family<EndpointLabel, Histogram, fn() -> Histogram>,
    pub itl: Family<EndpointLabel, Histogram, fn() -> Histogram>,
    pub e2e: Family<EndpointLabel, Histogram, fn() -> Histogram>,
    pub output_tokens: Family<EndpointLabel, Counter>,
    pub priority_ttft: Family<PriorityLabel, Histogram, fn() -> Histogram>,
    pub priority_itl: Family<PriorityLabel, Histogram, fn() -> Histogram>,
    pub priority_qoe: Family<PriorityLabel, Histogram, fn() -> Histogram>,
    pub sla: Family<SlaLabels, Counter>,
    pub weights: Family<TermLabel, FGauge>,
    pub decision_terms: Family<EndpointTermLabels, FGauge>,
    pub shed: Family<ShedLabels, Counter>,
    pub queue_depth: Gauge,
    pub queued: Counter,
    gauges: Vec<(&'static str, Family<EndpointLabel, FGauge>)>,
    /// Endpoints that may have labels in the endpoint families: those of the table at the last
    /// refresh, and any a request labelled since (one in flight on an endpoint that left).
    known: Mutex<HashSet<String>>,
    /// Held by [`Self::refresh`].
    refreshing: Mutex<()>,
    /// The `requests` label sets created (a family cannot list its own), to remove those of
    /// endpoints that left.
    request_labels: Mutex<HashSet<RequestLabels>>,
    /// Handles of the priority-labelled metrics, by priority level (1..=3).
    by_priority: [PriorityMetrics; 4],
}

/// A metric of one label set, looked up in its family on first use and kept: a family lookup
/// hashes (and here allocates) the label set, which the request path should not pay per event.
struct Handle<M>(OnceLock<M>);

impl<M: Clone> Handle<M> {
    const fn new() -> Self {
        Handle(OnceLock::new())
    }

    fn get(&self, resolve: impl FnOnce() -> M) -> &M {
        self.0.get_or_init(resolve)
    }
}

/// One endpoint's metric handles, resolved on first use. The endpoint keeps them (see
/// [`crate::endpoints::Endpoint::metrics`]); when it leaves the table its labels are removed from
/// the families and handles still held by requests in flight update detached metrics.
pub struct EndpointMetrics {
    endpoint: String,
    ttft: Handle<Histogram>,
    itl: Handle<Histogram>,
    e2e: Handle<Histogram>,
    output_tokens: Handle<Counter>,
    decision: [Handle<FGauge>; DECISION_TERMS.len()],
    /// `qoe_router_requests_total` counters by status and reason: bounded by the label values.
    requests: Mutex<Vec<(u16, &'static str, Counter)>>,
}

impl std::fmt::Debug for EndpointMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointMetrics")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl EndpointMetrics {
    pub fn new(endpoint: &str) -> Self {
        EndpointMetrics {
            endpoint: endpoint.to_string(),
            ttft: Handle::new(),
            itl: Handle::new(),
            e2e: Handle::new(),
            output_tokens: Handle::new(),
            decision: [const { Handle::new() }; DECISION_TERMS.len()],
            requests: Mutex::new(Vec::new()),
        }
    }

    fn label(&self) -> EndpointLabel {
        EndpointLabel {
            endpoint: self.endpoint.clone(),
        }
    }

    /// This endpoint's metric in `family`, noted as labelled (see [`RouterMetrics::labelled`]).
    fn resolve<M: Clone, C: MetricConstructor<M>>(
        &self,
        m: &RouterMetrics,
        family: &Family<EndpointLabel, M, C>,
    ) -> M {
        m.labelled(&self.endpoint);
        family.get_or_create(&self.label()).clone()
    }

    pub fn ttft(&self, m: &RouterMetrics) -> &Histogram {
        self.ttft.get(|| self.resolve(m, &m.ttft))
    }

    pub fn itl(&self, m: &RouterMetrics) -> &Histogram {
        self.itl.get(|| self.resolve(m, &m.itl))
    }

    pub fn e2e(&self, m: &RouterMetrics) -> &Histogram {
        self.e2e.get(|| self.resolve(m, &m.e2e))
    }

    pub fn output_tokens(&self, m: &RouterMetrics) -> &Counter {
        self.output_tokens.get(|| self.resolve(m, &m.output_tokens))
    }

    /// `qoe_router_requests_total{endpoint, code, reason}`.
    pub fn requests(&self, m: &RouterMetrics, code: u16, reason: &'static str) -> Counter {
        let mut cache = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, c)) = cache.iter().find(|(k, r, _)| *k == code && *r == reason) {
            return c.clone();
        }
        let labels = RequestLabels {
            endpoint: self.endpoint.clone(),
            code,
            reason: reason.to_string(),
        };
        let counter = m.requests.get_or_create(&labels).clone();
        lock(&m.request_labels).insert(labels);
        cache.push((code, reason, counter.clone()));
        counter
    }

    /// Records what a cost-based policy decided for this endpoint.
    pub fn record_decision(&self, m: &RouterMetrics, d: &qoe_core::DecisionDetail) {
        let values = [
            d.predicted_ttft_ms / 1e3,
            d.predicted_itl_ms / 1e3,
            d.cached_tokens as f64,
            d.terms[0],
            d.terms[1],
            d.terms[2],
            d.terms[3],
            d.cost,
        ];
        for ((term, v), handle) in DECISION_TERMS.into_iter().zip(values).zip(&self.decision) {
            if v.is_finite() {
                handle
                    .get(|| {
                        m.labelled(&self.endpoint);
                        m.decision_terms
                            .get_or_create(&EndpointTermLabels {
                                endpoint: self.endpoint.clone(),
                                term,
                            })
                            .clone()
                    })
                    .set(v);
            }
        }
    }
}

/// The handles of one priority level's metrics, resolved on first use.
struct PriorityMetrics {
    ttft: Handle<Histogram>,
    itl: Handle<Histogram>,
    qoe: Handle<Histogram>,
    sla_met: Handle<Counter>,
    sla_missed: Handle<Counter>,
}

impl PriorityMetrics {
    const fn new() -> Self {
        PriorityMetrics {
            ttft: Handle::new(),
            itl: Handle::new(),
            qoe: Handle::new(),
            sla_met: Handle::new(),
            sla_missed: Handle::new(),
        }
    }
}

/// Per-endpoint gauges: name suffix and help.
const GAUGES: &[(&str, &str)] = &[
    (
        "in_prefill_requests",
        "Requests sent to the endpoint with no token back yet",
    ),
    (
        "in_decoding_requests",
        "Requests streaming tokens from the endpoint",
    ),
    (
        "in_prefill_tokens",
        "Prompt tokens of requests still in prefill",
    ),
    ("healthy", "1 when the endpoint passes health checks"),
    (
        "ttft_seconds",
        "Smoothed router-observed time to first token",
    ),
    (
        "avg_itl_seconds",
        "Smoothed router-observed inter-token latency",
    ),
    (
        "error_rate",
        "Share of failed requests over the stats window",
    ),
    ("qps", "Requests finished per second over the stats window"),
    (
        "engine_running_requests",
        "Scraped: requests running in the engine",
    ),
    (
        "engine_waiting_requests",
        "Scraped: requests waiting in the engine",
    ),
    ("engine_kv_cache_usage", "Scraped: KV cache usage, 0..1"),
    (
        "engine_prefix_cache_hit_rate",
        "Scraped: prefix cache hit rate, 0..1",
    ),
    (
        "engine_metrics_age_seconds",
        "Age of the last successful scrape",
    ),
];

impl RouterMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("qoe_router");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests proxied, by endpoint, final status and routing reason",
            requests.clone(),
        );
        let rejected = Family::<CodeLabel, Counter>::default();
        registry.register(
            "rejected_requests",
            "Requests the router answered itself with an error, by status",
            rejected.clone(),
        );
        let unanswered = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "unanswered_requests",
            "Requests that ended before any answer (their client left, or the router shut down, while they waited in the admission queue or for their endpoint's first byte), by outcome",
            unanswered.clone(),
        );
        let failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "upstream_failures",
            "Upstream failures by endpoint and kind (connect, timeout, stream)",
            failures.clone(),
        );
        let retries = Counter::default();
        registry.register(
            "retries",
            "Requests re-sent to another endpoint (connect failure, 429/5xx, or a connection closed before the first byte)",
            retries.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Client connections closed at once because --max-connections were open",
            connections_refused.clone(),
        );
        let retries_refused = Counter::default();
        registry.register(
            "retries_refused",
            "Retries the retry budget refused (--retry-budget-ratio, --retry-budget-min-per-sec): the failure was answered instead",
            retries_refused.clone(),
        );
        let chat_template_fallbacks = Counter::default();
        registry.register(
            "chat_template_fallbacks",
            "Chats whose prompt tokens (--tokenizer) were counted as their flattened text because the model's chat template could not render them (it raised, or ran past its bounds)",
            chat_template_fallbacks.clone(),
        );
        let ttft = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "time_to_first_token_seconds",
            "Router-observed time to first token",
            ttft.clone(),
        );
        let itl = Family::new_with_constructor(itl_histogram as fn() -> Histogram);
        registry.register(
            "inter_token_latency_seconds",
            "Router-observed gap between streamed chunks, per token",
            itl.clone(),
        );
        let e2e = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "e2e_request_latency_seconds",
            "Router-observed request latency, first byte in to last byte out",
            e2e.clone(),
        );
        let output_tokens = Family::<EndpointLabel, Counter>::default();
        registry.register(
            "output_tokens",
            "Output tokens counted on responses",
            output_tokens.clone(),
        );
        let priority_ttft = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "priority_time_to_first_token_seconds",
            "Router-observed time to first token, by request priority",
            priority_ttft.clone(),
        );
        let priority_itl = Family::new_with_constructor(itl_histogram as fn() -> Histogram);
        registry.register(
            "priority_inter_token_latency_seconds",
            "Router-observed inter-token latency, by request priority",
            priority_itl.clone(),
        );
        let priority_qoe = Family::new_with_constructor(qoe_histogram as fn() -> Histogram);
        registry.register(
            "priority_qoe",
            "Andes QoE of streamed responses (T0 = the SLA or target TTFT, r = optimal throughput)",
            priority_qoe.clone(),
        );
        let sla = Family::<SlaLabels, Counter>::default();
        registry.register(
            "sla",
            "Streamed requests whose first token met (or missed) their TTFT deadline, by priority",
            sla.clone(),
        );
        let weights = Family::<TermLabel, FGauge>::default();
        registry.register(
            "qoe_weight",
            "Current weight of each QoE cost term (resource, performance, reliability, priority)",
            weights.clone(),
        );
        let decision_terms = Family::<EndpointTermLabels, FGauge>::default();
        registry.register(
            "decision",
            "The QoE policy's last decision for each endpoint: predicted TTFT/ITL (seconds), cached tokens, cost terms and cost",
            decision_terms.clone(),
        );
        let shed = Family::<ShedLabels, Counter>::default();
        registry.register(
            "shed",
            "Requests refused with 429 by admission control, by priority and reason (queue_full, displaced, queue_timeout, sla)",
            shed.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Requests waiting in the router's admission queue",
            queue_depth.clone(),
        );
        let queued = Counter::default();
        registry.register(
            "queued",
            "Requests that waited in the admission queue",
            queued.clone(),
        );
        let gauges = GAUGES
            .iter()
            .map(|(name, help)| {
                let family = Family::<EndpointLabel, FGauge>::default();
                registry.register(*name, *help, family.clone());
                (*name, family)
            })
            .collect();
        RouterMetrics {
            registry,
            requests,
            rejected,
            unanswered,
            failures,
            retries,
            connections_refused,
            retries_refused,
            chat_template_fallbacks,
            ttft,
            itl,
            e2e,
            output_tokens,
            priority_ttft,
            priority_itl,
            priority_qoe,
            sla,
            weights,
            decision_terms,
            shed,
            queue_depth,
            queued,
            gauges,
            known: Mutex::new(HashSet::new()),
            refreshing: Mutex::new(()),
            request_labels: Mutex::new(HashSet::new()),
            by_priority: [const { PriorityMetrics::new() }; 4],
        }
    }

    fn priority(&self, level: u8) -> &PriorityMetrics {
        &self.by_priority[(level as usize).min(self.by_priority.len() - 1)]
    }

    /// `qoe_router_priority_time_to_first_token_seconds{priority}`.
    pub fn priority_ttft(&self, level: u8) -> &Histogram {
        self.priority(level).ttft.get(|| {
            self.priority_ttft
                .get_or_create(&PriorityLabel { priority: level })
                .clone()
        })
    }

    /// `qoe_router_priority_inter_token_latency_seconds{priority}`.
    pub fn priority_itl(&self, level: u8) -> &Histogram {
        self.priority(level).itl.get(|| {
            self.priority_itl
                .get_or_create(&PriorityLabel { priority: level })
                .clone()
        })
    }

    /// `qoe_router_priority_qoe{priority}`.
    pub fn priority_qoe(&self, level: u8) -> &Histogram {
        self.priority(level).qoe.get(|| {
            self.priority_qoe
                .get_or_create(&PriorityLabel { priority: level })
                .clone()
        })
    }

    /// `qoe_router_sla_total{priority, outcome}`: whether a first token met its deadline.
    pub fn sla(&self, level: u8, met: bool) -> &Counter {
        let p = self.priority(level);
        let (handle, outcome) = if met {
            (&p.sla_met, "met")
        } else {
            (&p.sla_missed, "missed")
        };
        handle.get(|| {
            self.sla
                .get_or_create(&SlaLabels {
                    priority: level,
                    outcome,
                })
                .clone()
        })
    }

    fn gauge(&self, name: &str, endpoint: &str, value: Option<f64>) {
        let family = &self
            .gauges
            .iter()
            .find(|(n, _)| *n == name)
            .expect("gauge is declared")
            .1;
        let label = EndpointLabel {
            endpoint: endpoint.to_string(),
        };
        match value {
            Some(v) if v.is_finite() => {
                family.get_or_create(&label).set(v);
            }
            _ => {
                family.remove(&label);
            }
        }
    }

    /// Notes that `endpoint` has labels in the endpoint families, for [`Self::refresh`] to remove
    /// once it is out of the table. Called when a label set is created, not per event.
    fn labelled(&self, endpoint: &str) {
        let mut known = lock(&self.known);
        if !known.contains(endpoint) {
            known.insert(endpoint.to_string());
        }
    }

    /// Counts an upstream failure of `kind` at `endpoint`.
    pub fn count_failure(&self, endpoint: &str, kind: &str) {
        self.labelled(endpoint);
        self.failures
            .get_or_create(&FailureLabels {
                endpoint: endpoint.to_string(),
                kind: kind.into(),
            })
            .inc();
    }

    /// Refreshes the per-endpoint gauges from `registry`'s table and drops the labels of
    /// endpoints that left. One refresh at a time, each with the table as it is once it runs: an
    /// older table applied after a newer one would bring a departed endpoint's gauges back.
    pub fn refresh(&self, registry: &crate::endpoints::Registry, now: Micros) {
        let _one_at_a_time = lock(&self.refreshing);
        let (table, retired) = (registry.table(), registry.retired_urls());
        self.refresh_with(&table, &retired, now);
    }

    fn refresh_with(&self, table: &Table, retired: &[String], now: Micros) {
        let mut known = lock(&self.known);
        // A removed endpoint that requests still hold keeps its series: it may be taken up
        // again with the handles it holds (`Registry::apply`).
        let current: HashSet<String> = table
            .endpoints
            .iter()
            .map(|e| e.url.clone())
            .chain(retired.iter().cloned())
            .collect();
        for gone in known.difference(&current) {
            let label = EndpointLabel {
                endpoint: gone.clone(),
            };
            for (_, family) in &self.gauges {
                family.remove(&label);
            }
            self.ttft.remove(&label);
            self.itl.remove(&label);
            self.e2e.remove(&label);
            self.output_tokens.remove(&label);
            for term in DECISION_TERMS {
                self.decision_terms.remove(&EndpointTermLabels {
                    endpoint: gone.clone(),
                    term,
                });
            }
            for kind in ["connect", "timeout", "stream", "status"] {
                self.failures.remove(&FailureLabels {
                    endpoint: gone.clone(),
                    kind: kind.into(),
                });
            }
        }
        // Also those a request still in flight on a departed endpoint created after it left.
        lock(&self.request_labels).retain(|labels| {
            let keep = current.contains(&labels.endpoint);
            if !keep {
                self.requests.remove(labels);
            }
            keep
        });
        *known = current;
        drop(known);
        // Its counters and histograms stay for its return; its state gauges (health, load,
        // engine samples) go with it, as nothing refreshes them out of the set.
        for url in retired {
            let label = EndpointLabel {
                endpoint: url.clone(),
            };
            for (_, family) in &self.gauges {
                family.remove(&label);
            }
        }
        for (i, e) in table.endpoints.iter().enumerate() {
            let v = e.view(i as u32, now, 60_000_000);
            let url = e.url.as_str();
            let engine = v.engine.unwrap_or_default();
            self.gauge("in_prefill_requests", url, Some(v.load.in_prefill as f64));
            self.gauge("in_decoding_requests", url, Some(v.load.in_decode as f64));
            self.gauge("in_prefill_tokens", url, Some(v.load.prefill_tokens as f64));
            self.gauge("healthy", url, Some(v.availability.healthy as u8 as f64));
            self.gauge("ttft_seconds", url, v.observed.ttft_ms.map(|x| x / 1e3));
            self.gauge("avg_itl_seconds", url, v.observed.itl_ms.map(|x| x / 1e3));
            self.gauge("error_rate", url, Some(v.observed.error_rate));
            self.gauge("qps", url, Some(v.observed.qps));
            self.gauge("engine_running_requests", url, engine.running);
            self.gauge("engine_waiting_requests", url, engine.waiting);
            self.gauge("engine_kv_cache_usage", url, engine.kv_usage);
            self.gauge("engine_prefix_cache_hit_rate", url, engine.hit_rate());
            self.gauge(
                "engine_metrics_age_seconds",
                url,
                v.engine_age(now).map(|a| a as f64 / 1e6),
            );
        }
    }

    /// Copies the policy's current weights (from its state) into the weight gauges.
    pub fn refresh_weights(&self, policy_state: Option<&serde_json::Value>) {
        let Some(weights) = policy_state.and_then(|s| s.get("weights")) else {
            return;
        };
        for term in ["resource", "performance", "reliability", "priority"] {
            if let Some(w) = weights.get(term).and_then(|v| v.as_f64()) {
                self.weights.get_or_create(&TermLabel { term }).set(w);
            }
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

impl Default for RouterMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::{BreakerConfig, Dispatch};
    use crate::discovery::BackendSpec;
    use crate::endpoints::{LoadGuard, Registry};
    use crate::upstream::PoolConfig;
    use qoe_core::StatsConfig;

    /// An endpoint out of the set while its requests still run keeps its counters (it may come
    /// back, and a counter must not restart) but not its state gauges, which nothing refreshes
    /// there; back in the set, its gauges are back.
    #[test]
    fn a_retired_endpoint_keeps_its_counters_not_its_gauges() {
        let metrics = RouterMetrics::new();
        let registry = Registry::new(
            StatsConfig::default(),
            BreakerConfig::default(),
            PoolConfig::default(),
            crate::endpoints::Clock::new(),
        );
        let spec = BackendSpec {
            url: "http://a:1".into(),
            models: vec!["m".into()],
            role: qoe_core::Role::Both,
        };
        let refresh = || {
            metrics.refresh(&registry, 0);
            metrics.encode()
        };
        let healthy = "qoe_router_healthy{endpoint=\"http://a:1\"}";
        let failures = "upstream_failures_total{endpoint=\"http://a:1\",kind=\"connect\"}";
        registry.apply(std::slice::from_ref(&spec));
        metrics.count_failure("http://a:1", "connect");
        let text = refresh();
        assert!(text.contains(healthy) && text.contains(failures), "{text}");
        let endpoint = registry.table().endpoints[0].clone();
        let in_flight = LoadGuard::new(endpoint, Dispatch::default(), 1, 1);
        registry.apply(&[]);
        let text = refresh();
        assert!(!text.contains(healthy), "{text}");
        assert!(text.contains(failures), "{text}");
        registry.apply(std::slice::from_ref(&spec));
        assert!(refresh().contains(healthy));
        drop(in_flight);
        registry.apply(&[]);
        let text = refresh();
        assert!(
            !text.contains(healthy) && !text.contains(failures),
            "{text}"
        );
    }
}
