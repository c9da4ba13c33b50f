//! The endpoint table: one place for everything the router knows about each endpoint.
//!
//! The table is an immutable `Arc<Table>` swapped whole when discovery changes the set, so a request
//! reads a consistent snapshot without holding a lock while it runs; endpoints that survive a reload
//! are the same `Arc<Endpoint>` (their counters and in-flight requests carry on), removed ones live
//! until their last request lets go. Per-endpoint state is lock-light: load counters are atomics,
//! statistics sit behind small mutexes held for a few hundred nanoseconds.

use crate::breaker::{Breaker, BreakerConfig, Dispatch};
use crate::discovery::BackendSpec;
use crate::metrics::EndpointMetrics;
use crate::upstream::{Pool, PoolConfig};
use qoe_core::prompt::hash_bytes;
use qoe_core::{
    Availability, EndpointView, EngineMetrics, Load, Micros, RequestOutcome, RequestStats, Role,
    StatsConfig,
};
use serde::Serialize;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

/// The router's monotonic clock, in the brain's units.
#[derive(Clone, Copy, Debug)]
pub struct Clock(Instant);

impl Clock {
    pub fn new() -> Self {
        Clock(Instant::now())
    }

    /// Microseconds since the router started (at least 1, so "0" never means "now").
    pub fn now(&self) -> Micros {
        self.0.elapsed().as_micros() as Micros + 1
    }

    pub fn at(&self, instant: Instant) -> Micros {
        instant.saturating_duration_since(self.0).as_micros() as Micros + 1
    }

    /// The instant of `at` (the inverse of [`Clock::at`]).
    pub fn instant(&self, at: Micros) -> Instant {
        self.0 + std::time::Duration::from_micros(at.saturating_sub(1))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Requests in flight on an endpoint, counted by the router for every policy alike.
#[derive(Debug, Default)]
pub struct LoadCounters {
    in_prefill: AtomicU32,
    in_decode: AtomicU32,
    prefill_tokens: AtomicU64,
    pending_output_tokens: AtomicU64,
    /// Requests holding a seat under `--max-inflight-per-endpoint` ([`LoadCounters::reserve`]).
    reserved: AtomicU32,
}

impl LoadCounters {
    /// Takes one of `cap` seats, checked and taken in one step, so that requests dispatched at
    /// the same moment cannot together exceed the cap; `false` when all are taken.
    pub fn reserve(&self, cap: u32) -> bool {
        self.reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives back a seat taken with [`LoadCounters::reserve`].
    pub fn unreserve(&self) {
        self.reserved.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn snapshot(&self) -> Load {
        Load {
            in_prefill: self.in_prefill.load(Ordering::Relaxed),
            in_decode: self.in_decode.load(Ordering::Relaxed),
            prefill_tokens: self.prefill_tokens.load(Ordering::Relaxed),
            pending_output_tokens: self.pending_output_tokens.load(Ordering::Relaxed),
        }
    }
}

/// Engine metrics as last scraped.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct EngineSample {
    pub metrics: EngineMetrics,
    pub at: Micros,
}

/// Health-check state with hysteresis.
#[derive(Debug, Default, Clone, Serialize)]
pub struct HealthState {
    pub healthy: bool,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
    /// Times of the last few up/down transitions (bounded).
    #[serde(skip)]
    transitions: [Micros; 8],
    #[serde(skip)]
    transition_count: usize,
    pub last_check: Option<Micros>,
    pub last_error: Option<String>,
}

impl HealthState {
    fn new() -> Self {
        HealthState {
            healthy: true,
            ..Default::default()
        }
    }

    /// Health transitions within `window` before `now`.
    pub fn flaps(&self, now: Micros, window: Micros) -> u32 {
        let n = self.transition_count.min(self.transitions.len());
        self.transitions[..n]
            .iter()
            .filter(|&&t| now.saturating_sub(t) <= window)
            .count() as u32
    }

    fn set_healthy(&mut self, healthy: bool, now: Micros) {
        if self.healthy != healthy {
            self.healthy = healthy;
            let slot = self.transition_count % self.transitions.len();
            self.transitions[slot] = now;
            self.transition_count += 1;
        }
    }
}

/// An endpoint's configured settings.
#[derive(Clone, Debug, PartialEq)]
struct Settings {
    role: Role,
    static_models: Vec<String>,
}

/// One endpoint and everything known about it.
#[derive(Debug)]
pub struct Endpoint {
    pub url: String,
    /// Stable hash of the URL (see [`EndpointView::key`]).
    pub key: u64,
    /// What the configuration says of it (its role, its models); changed in place by a reload,
    /// so the endpoint keeps its health, breaker, load and statistics.
    settings: RwLock<Settings>,
    detected_models: RwLock<Vec<String>>,
    /// The model objects of the endpoint's last `/v1/models` answer, served again merged.
    model_cards: RwLock<Vec<serde_json::Value>>,
    /// A failed model detection was logged as a warning, once until the next success.
    pub models_warned: std::sync::atomic::AtomicBool,
    /// A `/metrics` answer without engine metrics was logged as a warning, once until the next
    /// one with them.
    pub metrics_warned: std::sync::atomic::AtomicBool,
    /// A detection of its models started by a change of the endpoint set is running.
    pub detecting_models: std::sync::atomic::AtomicBool,
    pub load: LoadCounters,
    stats: Mutex<RequestStats>,
    engine: Mutex<Option<EngineSample>>,
    health: Mutex<HealthState>,
    breaker: Mutex<Breaker>,
    breaker_config: BreakerConfig,
    /// The URL as the `x-qoe-endpoint` response header (none if it cannot be one).
    pub header_value: Option<http::HeaderValue>,
    metrics: EndpointMetrics,
    /// Connections for requests proxied here.
    pub pool: Pool,
    /// When it joined the endpoint set.
    added: std::time::Instant,
}

/// How long an endpoint that is down and has listed no model yet may still be starting (a large
/// model loads for minutes) before a model no other endpoint serves is taken not to exist.
pub const MODEL_LISTING_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// Locks `m`, poisoned or not: a request that panicked must not stop the others.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Endpoint {
    pub fn new(
        spec: &BackendSpec,
        stats: StatsConfig,
        breaker_config: BreakerConfig,
        pool: PoolConfig,
        created: Micros,
    ) -> Self {
        Endpoint {
            url: spec.url.clone(),
            key: hash_bytes(0, spec.url.as_bytes()),
            settings: RwLock::new(Settings {
                role: spec.role,
                static_models: spec.models.clone(),
            }),
            detected_models: RwLock::new(Vec::new()),
            model_cards: RwLock::new(Vec::new()),
            models_warned: Default::default(),
            metrics_warned: Default::default(),
            detecting_models: Default::default(),
            load: LoadCounters::default(),
            stats: Mutex::new(RequestStats::new(stats, created)),
            engine: Mutex::new(None),
            health: Mutex::new(HealthState::new()),
            breaker: Mutex::new(Breaker::default()),
            breaker_config,
            header_value: http::HeaderValue::from_str(&spec.url).ok(),
            metrics: EndpointMetrics::new(&spec.url),
            pool: Pool::new(&spec.url, pool),
            added: std::time::Instant::now(),
        }
    }

    /// This endpoint's metric handles (see [`EndpointMetrics`]).
    pub fn metrics(&self) -> &EndpointMetrics {
        &self.metrics
    }

    /// Whether a request may be sent now: healthy, and the breaker lets it through.
    pub fn admits(&self, now: Micros) -> bool {
        self.is_healthy() && lock(&self.breaker).admits(now, &self.breaker_config)
    }

    /// When an endpoint that does not admit requests now may again, as far as the router can
    /// tell: when its open breaker lets a probe through; `None` when it is unhealthy (the next
    /// health check decides) or a probe is out.
    pub fn admits_again_in(&self, now: Micros) -> Option<Micros> {
        if !self.is_healthy() {
            return None;
        }
        let mut b = lock(&self.breaker);
        match b.state_at(now, &self.breaker_config) {
            qoe_core::BreakerState::Open => Some(b.reopens_in(now, &self.breaker_config)),
            _ => None,
        }
    }

    /// Lets a request go now if [`Endpoint::admits`] holds, checked and taken under one lock (so
    /// two requests cannot both be a half-open breaker's probe); `None` otherwise.
    pub fn try_dispatch(&self, now: Micros) -> Option<Dispatch> {
        if !self.is_healthy() {
            return None;
        }
        lock(&self.breaker).try_dispatch(now, &self.breaker_config)
    }

    pub fn breaker(&self) -> Breaker {
        lock(&self.breaker).clone()
    }

    /// Feeds a request's verdict to the breaker.
    pub fn record_verdict(&self, ticket: &Dispatch, failed: bool, now: Micros) {
        let mut b = lock(&self.breaker);
        if failed {
            let was_open = b.state == qoe_core::BreakerState::Open;
            b.on_failure(ticket, now, &self.breaker_config);
            if !was_open && b.state == qoe_core::BreakerState::Open {
                tracing::warn!(endpoint = %self.url, failures = b.consecutive_failures, "circuit breaker opened");
            }
        } else {
            let was_closed = b.state == qoe_core::BreakerState::Closed;
            b.on_success(ticket, &self.breaker_config);
            if !was_closed && b.state == qoe_core::BreakerState::Closed {
                tracing::info!(endpoint = %self.url, "circuit breaker closed");
            }
        }
    }

    fn settings(&self) -> std::sync::RwLockReadGuard<'_, Settings> {
        self.settings.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Its role in disaggregated serving (see [`Role`]).
    pub fn role(&self) -> Role {
        self.settings().role
    }

    /// Whether the models come from `/v1/models` rather than configuration.
    pub fn detects_models(&self) -> bool {
        self.settings().static_models.is_empty()
    }

    /// Whether it serves at least one model: configured, or detected already.
    pub fn knows_models(&self) -> bool {
        !self.detects_models()
            || !self
                .detected_models
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
    }

    /// Whether it may yet list a model it does not list now: it lists none, and it answers its
    /// health checks or joined less than [`MODEL_LISTING_GRACE`] before `now`.
    pub fn may_list_models(&self, now: std::time::Instant) -> bool {
        !self.knows_models()
            && (self.is_healthy()
                || now.saturating_duration_since(self.added) < MODEL_LISTING_GRACE)
    }

    /// The models this endpoint serves (configured, else detected).
    pub fn models(&self) -> Vec<String> {
        let settings = self.settings();
        if settings.static_models.is_empty() {
            self.detected_models
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        } else {
            settings.static_models.clone()
        }
    }

    pub fn serves(&self, model: &str) -> bool {
        self.role_if_serving(model).is_some()
    }

    /// Its role, if it serves `model` (an empty name: any); one read of its settings for both.
    pub fn role_if_serving(&self, model: &str) -> Option<Role> {
        let settings = self.settings();
        let serving = if model.is_empty() {
            true
        } else if settings.static_models.is_empty() {
            let detected = self
                .detected_models
                .read()
                .unwrap_or_else(|e| e.into_inner());
            detected.iter().any(|m| m == model)
        } else {
            settings.static_models.iter().any(|m| m == model)
        };
        serving.then_some(settings.role)
    }

    /// Stores what `/v1/models` answered: its model objects, and their ids as the served models
    /// (used when no models were configured).
    pub fn set_model_cards(&self, cards: Vec<serde_json::Value>) {
        let ids = cards
            .iter()
            .filter_map(|c| c.get("id")?.as_str().map(str::to_string))
            .collect();
        *self
            .detected_models
            .write()
            .unwrap_or_else(|e| e.into_inner()) = ids;
        *self.model_cards.write().unwrap_or_else(|e| e.into_inner()) = cards;
    }

    /// The model objects to list in the merged `/v1/models`: the endpoint's own, else minimal
    /// ones built from the configured names.
    pub fn model_cards(&self) -> Vec<serde_json::Value> {
        let cards = self.model_cards.read().unwrap_or_else(|e| e.into_inner());
        // By id, the first of each: an engine listing thousands of LoRA adapters is one pass.
        let mut by_id = std::collections::HashMap::with_capacity(cards.len());
        for card in cards.iter() {
            if let Some(id) = card.get("id").and_then(|v| v.as_str()) {
                by_id.entry(id).or_insert(card);
            }
        }
        let models = self.models();
        models
            .iter()
            .map(|id| {
                by_id
                    .get(id.as_str())
                    .map(|&card| card.clone())
                    .unwrap_or_else(|| {
                        serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "vllm", "root": id, "parent": null})
                    })
            })
            .collect()
    }

    pub fn set_engine_metrics(&self, metrics: EngineMetrics, at: Micros) {
        *lock(&self.engine) = Some(EngineSample { metrics, at });
    }

    pub fn engine_sample(&self) -> Option<EngineSample> {
        *lock(&self.engine)
    }

    pub fn is_healthy(&self) -> bool {
        lock(&self.health).healthy
    }

    /// Whether this endpoint can take traffic, for readiness: its last health check passed (an
    /// endpoint counts as healthy before its first check, and until enough checks fail), its
    /// breaker is not open (half-open counts: a request would be its probe), and it serves a
    /// model.
    pub fn ready(&self, now: Micros) -> bool {
        let checked = {
            let h = lock(&self.health);
            h.healthy && h.last_check.is_some() && h.consecutive_failures == 0
        };
        checked
            && lock(&self.breaker).state_at(now, &self.breaker_config)
                != qoe_core::BreakerState::Open
            && !self.models().is_empty()
    }

    pub fn health(&self) -> HealthState {
        lock(&self.health).clone()
    }

    /// Records a health-check result; thresholds give hysteresis.
    pub fn record_health(
        &self,
        result: Result<(), String>,
        now: Micros,
        unhealthy_after: u32,
        healthy_after: u32,
    ) {
        let mut h = lock(&self.health);
        h.last_check = Some(now);
        match result {
            Ok(()) => {
                h.consecutive_failures = 0;
                h.consecutive_successes += 1;
                if h.consecutive_successes >= healthy_after.max(1) {
                    h.set_healthy(true, now);
                }
            }
            Err(e) => {
                h.consecutive_successes = 0;
                h.consecutive_failures += 1;
                h.last_error = Some(e);
                if h.consecutive_failures >= unhealthy_after.max(1) {
                    h.set_healthy(false, now);
                }
            }
        }
    }

    pub fn with_stats<R>(&self, f: impl FnOnce(&mut RequestStats) -> R) -> R {
        f(&mut lock(&self.stats))
    }

    /// The endpoint as a policy sees it at `now`.
    pub fn view(&self, id: u32, now: Micros, flap_window: Micros) -> EndpointView {
        let engine = self.engine_sample();
        let breaker = lock(&self.breaker).state_at(now, &self.breaker_config);
        let health = lock(&self.health);
        EndpointView {
            id: qoe_core::EndpointId(id),
            key: self.key,
            role: self.role(),
            load: self.load.snapshot(),
            observed: lock(&self.stats).snapshot(now),
            engine: engine.map(|s| s.metrics),
            engine_at: engine.map(|s| s.at),
            availability: Availability {
                healthy: health.healthy,
                breaker,
                flaps: health.flaps(now, flap_window),
            },
        }
    }
}

/// A consistent snapshot of the endpoint set.
#[derive(Debug, Default)]
pub struct Table {
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Whether any endpoint has role prefill or decode (roles change only with the set).
    pub staged_roles: bool,
}

/// The live endpoint set.
#[derive(Debug)]
pub struct Registry {
    table: RwLock<Arc<Table>>,
    /// Endpoints removed from the set that something still holds (requests in flight, or a
    /// scrape or health round under way): one whose URL comes back (a Kubernetes pod unready for
    /// a moment) is taken up again with its load, breaker and statistics, not started afresh
    /// beside it. Bounded: an entry goes once nothing holds it.
    retired: std::sync::Mutex<Vec<std::sync::Weak<Endpoint>>>,
    stats_config: StatsConfig,
    breaker_config: BreakerConfig,
    pool_config: PoolConfig,
    /// The router's clock: an endpoint's statistics begin when it joins.
    clock: Clock,
}

impl Registry {
    pub fn new(
        stats_config: StatsConfig,
        breaker_config: BreakerConfig,
        pool_config: PoolConfig,
        clock: Clock,
    ) -> Self {
        Registry {
            clock,
            pool_config,
            table: RwLock::new(Arc::new(Table::default())),
            retired: Default::default(),
            stats_config,
            breaker_config,
        }
    }

    pub fn table(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The URLs of endpoints removed from the set that something (a request in flight) still
    /// holds: their metrics stay, as they may come back ([`Registry::apply`]).
    pub fn retired_urls(&self) -> Vec<String> {
        let retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        retired
            .iter()
            .filter_map(|w| w.upgrade().map(|e| e.url.clone()))
            .collect()
    }

    /// Replaces the endpoint set. An endpoint whose URL stays keeps its state (health, breaker,
    /// load, statistics, connections); a change of its role or models applies in place. So does
    /// one removed earlier whose requests in flight still run when its URL comes back.
    pub fn apply(&self, specs: &[BackendSpec]) {
        let mut guard = self.table.write().unwrap_or_else(|e| e.into_inner());
        let old = guard.clone();
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        let held: Vec<Arc<Endpoint>> = retired.iter().filter_map(|w| w.upgrade()).collect();
        let endpoints: Vec<Arc<Endpoint>> = specs
            .iter()
            .map(|spec| {
                let rejoining = || {
                    let e = held.iter().find(|e| e.url == spec.url)?;
                    // Not checked while it was out of the set: readiness waits for a check.
                    lock(&e.health).last_check = None;
                    Some(e)
                };
                old.endpoints
                    .iter()
                    .find(|e| e.url == spec.url)
                    .or_else(rejoining)
                    .inspect(|e| {
                        let wanted = Settings {
                            role: spec.role,
                            static_models: spec.models.clone(),
                        };
                        *e.settings.write().unwrap_or_else(|e| e.into_inner()) = wanted;
                    })
                    .cloned()
                    .unwrap_or_else(|| {
                        Arc::new(Endpoint::new(
                            spec,
                            self.stats_config,
                            self.breaker_config,
                            self.pool_config.clone(),
                            self.clock.now(),
                        ))
                    })
            })
            .collect();
        let gone = old
            .endpoints
            .iter()
            .chain(&held)
            .filter(|e| !endpoints.iter().any(|kept| Arc::ptr_eq(kept, e)));
        *retired = gone.map(Arc::downgrade).collect();
        let staged_roles = specs.iter().any(|s| s.role != Role::Both);
        *guard = Arc::new(Table {
            endpoints,
            staged_roles,
        });
    }
}

/// Holds an endpoint's load counters for one request: in prefill until the first token, then in
/// decode; released when dropped, whatever way the request ends (tied to the response body).
#[derive(Debug)]
pub struct LoadGuard {
    endpoint: Arc<Endpoint>,
    prompt_tokens: u64,
    pending_output: u64,
    decoding: bool,
    /// The breaker's ticket while the request has no verdict yet.
    breaker: Option<Dispatch>,
    /// Told when this request's capacity frees.
    admission: Option<Arc<crate::admission::Admission>>,
    /// Holds a seat taken with [`LoadCounters::reserve`].
    reserved: bool,
}

impl LoadGuard {
    /// Counts a request dispatched to `endpoint` with the breaker's `ticket`
    /// ([`Endpoint::try_dispatch`]).
    pub fn new(
        endpoint: Arc<Endpoint>,
        ticket: Dispatch,
        prompt_tokens: u32,
        expected_output: u32,
    ) -> Self {
        let load = &endpoint.load;
        load.in_prefill.fetch_add(1, Ordering::Relaxed);
        load.prefill_tokens
            .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        load.pending_output_tokens
            .fetch_add(expected_output as u64, Ordering::Relaxed);
        let breaker = Some(ticket);
        LoadGuard {
            endpoint,
            prompt_tokens: prompt_tokens as u64,
            pending_output: expected_output as u64,
            decoding: false,
            breaker,
            admission: None,
            reserved: false,
        }
    }

    /// Gives back the seat taken with [`LoadCounters::reserve`] when this request ends.
    pub fn holding_seat(mut self) -> Self {
        self.reserved = true;
        self
    }

    /// Tells `admission` when this request's capacity frees.
    pub fn notifying(mut self, admission: Arc<crate::admission::Admission>) -> Self {
        self.admission = Some(admission);
        self
    }

    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// Moves the request from prefill to decode (idempotent).
    pub fn first_token(&mut self) {
        if !self.decoding {
            self.decoding = true;
            let load = &self.endpoint.load;
            load.in_prefill.fetch_sub(1, Ordering::Relaxed);
            load.prefill_tokens
                .fetch_sub(self.prompt_tokens, Ordering::Relaxed);
            load.in_decode.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts `tokens` delivered against the expected output still pending.
    pub fn tokens(&mut self, tokens: u32) {
        let done = (tokens as u64).min(self.pending_output);
        if done > 0 {
            self.pending_output -= done;
            self.endpoint
                .load
                .pending_output_tokens
                .fetch_sub(done, Ordering::Relaxed);
        }
    }

    /// Records the request's outcome in the endpoint's statistics and its breaker.
    pub fn record(&mut self, outcome: &RequestOutcome, now: Micros) {
        self.endpoint.with_stats(|s| s.record_outcome(outcome, now));
        if let Some(ticket) = self.breaker.take() {
            self.endpoint
                .record_verdict(&ticket, outcome.failed || outcome.timed_out, now);
        }
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        if let Some(ticket) = self.breaker.take() {
            lock(&self.endpoint.breaker).release(&ticket);
        }
        let load = &self.endpoint.load;
        if self.decoding {
            load.in_decode.fetch_sub(1, Ordering::Relaxed);
        } else {
            load.in_prefill.fetch_sub(1, Ordering::Relaxed);
            load.prefill_tokens
                .fetch_sub(self.prompt_tokens, Ordering::Relaxed);
        }
        load.pending_output_tokens
            .fetch_sub(self.pending_output, Ordering::Relaxed);
        if self.reserved {
            load.unreserve();
        }
        if let Some(admission) = &self.admission {
            let endpoint = &self.endpoint;
            admission.notify(|lane| {
                let (model, stage) = crate::admission::lane_parts(lane);
                endpoint
                    .role_if_serving(model)
                    .is_some_and(|role| role.takes(stage))
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(url: &str) -> BackendSpec {
        BackendSpec {
            url: url.into(),
            models: vec!["m".into()],
            role: Role::Both,
        }
    }

    #[test]
    fn load_guard_moves_and_releases() {
        let e = Arc::new(Endpoint::new(
            &spec("http://127.0.0.1:1"),
            StatsConfig::default(),
            BreakerConfig::default(),
            PoolConfig::default(),
            1,
        ));
        let mut g = LoadGuard::new(e.clone(), Dispatch::default(), 100, 10);
        assert_eq!(e.load.snapshot().in_prefill, 1);
        assert_eq!(e.load.snapshot().prefill_tokens, 100);
        g.first_token();
        g.first_token();
        g.tokens(4);
        let l = e.load.snapshot();
        assert_eq!(
            (
                l.in_prefill,
                l.in_decode,
                l.prefill_tokens,
                l.pending_output_tokens
            ),
            (0, 1, 0, 6)
        );
        drop(g);
        assert_eq!(e.load.snapshot(), Load::default());
        let g = LoadGuard::new(e.clone(), Dispatch::default(), 7, 3);
        drop(g);
        assert_eq!(
            e.load.snapshot(),
            Load::default(),
            "released from prefill too"
        );
    }

    #[test]
    fn reload_keeps_surviving_endpoints() {
        let r = Registry::new(
            StatsConfig::default(),
            BreakerConfig::default(),
            PoolConfig::default(),
            Clock::new(),
        );
        r.apply(&[spec("http://a:1"), spec("http://b:1")]);
        let before = r.table();
        let guard = LoadGuard::new(before.endpoints[1].clone(), Dispatch::default(), 1, 1);
        r.apply(&[spec("http://b:1"), spec("http://c:1")]);
        let after = r.table();
        assert_eq!(after.endpoints.len(), 2);
        assert!(Arc::ptr_eq(&before.endpoints[1], &after.endpoints[0]));
        assert_eq!(
            after.endpoints[0].load.snapshot().in_prefill,
            1,
            "in-flight carried over"
        );
        drop(guard);
    }

    /// An endpoint removed while requests still run on it, then listed again (a pod unready for
    /// a moment), is the same endpoint, its load counted; once nothing runs on it, a return is a
    /// fresh start, and nothing of it stays behind.
    #[test]
    fn an_endpoint_back_while_its_requests_run_is_the_same_one() {
        let r = Registry::new(
            StatsConfig::default(),
            BreakerConfig::default(),
            PoolConfig::default(),
            Clock::new(),
        );
        r.apply(&[spec("http://a:1")]);
        let first = r.table().endpoints[0].clone();
        first.record_health(Ok(()), 1, 2, 1);
        let guard = LoadGuard::new(first.clone(), Dispatch::default(), 1, 1);
        r.apply(&[]);
        r.apply(&[spec("http://b:1")]);
        r.apply(&[spec("http://a:1"), spec("http://b:1")]);
        let back = r.table().endpoints[0].clone();
        assert!(Arc::ptr_eq(&first, &back));
        assert_eq!(back.load.snapshot().in_prefill, 1);
        assert!(
            back.health().last_check.is_none(),
            "readiness waits for a new check"
        );
        drop((guard, back, first));
        r.apply(&[spec("http://b:1")]);
        let weak = Arc::downgrade(&r.table().endpoints[0]);
        r.apply(&[]);
        r.apply(&[]);
        assert!(
            weak.upgrade().is_none(),
            "nothing holds a removed idle endpoint"
        );
        assert!(r.retired.lock().unwrap().is_empty());
        r.apply(&[spec("http://a:1")]);
        assert_eq!(r.table().endpoints[0].load.snapshot().in_prefill, 0);
    }

    /// Editing an endpoint's models or role in the file is no reason to forget that it is
    /// failing or busy: it keeps its state, with the new settings.
    #[test]
    fn reload_changes_models_and_role_in_place() {
        let r = Registry::new(
            StatsConfig::default(),
            BreakerConfig::default(),
            PoolConfig::default(),
            Clock::new(),
        );
        r.apply(&[spec("http://a:1")]);
        let before = r.table().endpoints[0].clone();
        let _guard = LoadGuard::new(before.clone(), Dispatch::default(), 1, 1);
        for _ in 0..2 {
            before.record_health(Err("down".into()), 0, 2, 1);
        }
        assert!(!before.is_healthy());
        let mut edited = spec("http://a:1");
        edited.models.push("n".into());
        edited.role = Role::Prefill;
        r.apply(&[edited]);
        let after = r.table().endpoints[0].clone();
        assert!(Arc::ptr_eq(&before, &after));
        assert_eq!(after.models(), ["m", "n"]);
        assert!(after.serves("n"));
        assert_eq!(after.role(), Role::Prefill);
        assert!(!after.is_healthy(), "still failing");
        assert_eq!(after.load.snapshot().in_prefill, 1, "still busy");
        // Emptied: detected from /v1/models again, and none known until then.
        let mut detect = spec("http://a:1");
        detect.models.clear();
        r.apply(&[detect]);
        assert!(after.detects_models() && !after.knows_models());
    }

    #[test]
    fn health_hysteresis_and_flaps() {
        let e = Endpoint::new(
            &spec("http://a:1"),
            StatsConfig::default(),
            BreakerConfig::default(),
            PoolConfig::default(),
            1,
        );
        e.record_health(Err("x".into()), 10, 2, 1);
        assert!(e.is_healthy(), "one failure is below the threshold");
        e.record_health(Err("x".into()), 20, 2, 1);
        assert!(!e.is_healthy());
        e.record_health(Ok(()), 30, 2, 1);
        assert!(e.is_healthy());
        assert_eq!(e.health().flaps(30, 100), 2);
        assert_eq!(e.health().flaps(1_000, 100), 0);
    }

    #[test]
    fn an_endpoint_down_past_the_grace_may_not_list_models_any_more() {
        let mut detect = spec("http://a:1");
        detect.models.clear();
        let e = Endpoint::new(
            &detect,
            StatsConfig::default(),
            BreakerConfig::default(),
            PoolConfig::default(),
            1,
        );
        let now = std::time::Instant::now();
        let later = now + MODEL_LISTING_GRACE;
        assert!(
            e.may_list_models(now) && e.may_list_models(later),
            "healthy"
        );
        e.record_health(Err("refused".into()), 10, 1, 1);
        assert!(e.may_list_models(now), "down, but maybe still loading");
        assert!(!e.may_list_models(later), "down for the whole grace");
        e.record_health(Ok(()), 20, 1, 1);
        assert!(e.may_list_models(later), "answering again");
        let listed = Endpoint::new(
            &spec("http://b:1"),
            StatsConfig::default(),
            BreakerConfig::default(),
            PoolConfig::default(),
            1,
        );
        assert!(!listed.may_list_models(now), "its models are configured");
    }
}
