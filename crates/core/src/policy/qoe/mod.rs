//! The QoE policy (`--routing-logic qoe`): for every candidate, predict what *this* request would
//! experience there, price it, and take the cheapest.
//!
//! ```text
//! qoe_cost = α·resource + β·performance + γ·reliability + δ·priority      (each term in [0, 1])
//! ```
//!
//! * [`predictor`]: per-endpoint TTFT and ITL lines learned online from router feedback
//!   (exponentially weighted ridge regression toward a neutral fleet prior).
//! * [`cost`]: the four terms, pure functions.
//! * [`adapt`]: the weights, moving with fleet conditions and SLA misses, inside bounds.
//!
//! Why it is built this way, against the failures of vLLM production-stack's `QoECentricRouter`
//! proposal (issue 4): the request's phase decides whether TTFT or ITL dominates its performance
//! term, so not every request counts as prefill; the priority term depends on each endpoint's
//! utilization, so it changes which endpoint wins (priority 1 takes the headroom, priority 3 leaves
//! it); reliability is computed per endpoint from its errors, timeouts, breaker, flaps, metric
//! staleness and last failure; ITL is measured (the router times every chunk) and learned; the
//! adaptive weights are projected onto bounds that keep them positive and summing to 1.
//!
//! A decision reads the learned state under a read lock, the prefix index and the weights under two
//! short mutexes; learning (`feedback`) takes the write lock for an O(1) update. State is bounded:
//! the prefix index by `PolicyConfig::prefix_index_blocks`, the models by `max_tracked_endpoints`.
//! Decisions are deterministic for a seed (ties broken by [`SharedRng`]). The full description, with
//! every `x-qoe-reason` value, is `docs/QOE.md`.

pub mod adapt;
pub mod cost;
pub mod predictor;

#[cfg(test)]
mod tests;

use super::{
    Decision, DecisionDetail, Feedback, FeedbackEvent, PolicyConfig, PrefixIndex, Reason,
    RoutingPolicy, SharedRng,
};
use crate::{EndpointView, Micros, Phase, Priority, RequestProfile, Stage};
use adapt::{normalize, Adapt, Bounds};
use predictor::{Kind, Line, ModelTable};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::{Mutex, RwLock};

/// Largest prediction reported, ms (a day): keeps every number finite for absurd inputs.
pub const MAX_PREDICTION_MS: f64 = 86_400_000.0;
/// Costs closer than this are ties (broken at random).
pub const TIE_EPSILON: f64 = 1e-9;
/// Bounds of an endpoint's relative speed `v = sqrt(prior ms/token ÷ learned ms/token)`, which
/// scales its capacity in the utilization.
pub const SPEED_MIN: f64 = 0.5;
pub const SPEED_MAX: f64 = 2.0;
/// Deadline overflow only goes to endpoints whose reliability term is below this (healthy enough
/// to be trusted with a queue).
pub const OVERFLOW_MAX_RELIABILITY_COST: f64 = 0.5;
/// Endpoints listed in [`RoutingPolicy::state_json`] at most (most recently heard from first).
pub const STATE_JSON_ENDPOINTS: usize = 64;
/// Lowest forgetting factor accepted: a fit's effective sample count tends to `1/(1 − λ)`, which
/// must pass the counts that residual clipping (5) and the fleet prior (3) wait for.
pub const FORGETTING_MIN: f64 = 0.85;
/// An endpoint's model not heard from for this many `model_half_life_ms` is forgotten (and
/// leaves the fleet prior).
pub const FORGET_AFTER_HALF_LIVES: f64 = 12.0;

/// Settings of the QoE policy. Every field has a default and, in the router, a flag or a key of
/// the config file's `[qoe]` table.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QoeConfig {
    /// TTFT target when the request has no SLA header, ms (`--target-ttft`). Default 300.
    pub target_ttft_ms: f64,
    /// ITL target, ms per token (`--target-itl`). Default 50.
    pub target_itl_ms: f64,
    /// The reading speed a user needs, tokens/s (`--optimal-throughput`, Andes' `r`). Default 30.
    pub optimal_throughput: f64,
    /// Base weights (α resource, β performance, γ reliability, δ priority), normalized to sum 1
    /// (`--qoe-weights a,b,c,d`). Default 0.3, 0.4, 0.2, 0.1.
    pub weights: [f64; 4],
    /// Lower bounds of the adaptive weights. Default 0.1, 0.2, 0.05, 0.05. A bound that excludes
    /// the base weight is widened to include it.
    pub weight_min: [f64; 4],
    /// Upper bounds of the adaptive weights. Default 0.6, 0.7, 0.4, 0.3.
    pub weight_max: [f64; 4],
    /// Whether the weights adapt to fleet conditions (`--qoe-adaptive`). Default true.
    pub adaptive: bool,
    /// Time constant of the weights' smoothing, ms. Default 10,000.
    pub adapt_time_constant_ms: f64,
    /// Requests in flight at which an endpoint counts as saturated (`u_req = 1`). Default 64.
    pub saturation_inflight: u32,
    /// In-flight tokens (queued prompt + expected output) at which an endpoint counts as
    /// saturated (`u_tok = 1`). Default 131,072.
    pub saturation_tokens: u64,
    /// Engine metrics older than this are ignored for load and count as stale for reliability, ms.
    /// Default 3,000.
    pub metrics_staleness_ms: f64,
    /// Initial "typical prompt" (tokens) that engine-reported waiting requests are each assumed to
    /// hold; learned afterwards as a slow EWMA of routed prompts. Default 1,024.
    pub typical_prompt_tokens: u32,
    /// Prefill rate assumed before any endpoint has data, prompt tokens/s. Default 8,000.
    pub prior_prefill_tokens_per_s: f64,
    /// TTFT base assumed before any endpoint has data, ms. Default 20.
    pub prior_ttft_base_ms: f64,
    /// ITL at batch 0 assumed before any endpoint has data, ms. Default 20.
    pub prior_itl_base_ms: f64,
    /// ITL growth per request in the batch assumed before data, ms. Default 0.2.
    pub prior_itl_per_batch_ms: f64,
    /// Per-sample forgetting factor of the online fits ([`FORGETTING_MIN`]..1). Default 0.97
    /// (~33 samples).
    pub forgetting: f64,
    /// An endpoint's learned lines drift back to the fleet prior with this half-life after its last
    /// sample, ms. Default 300,000.
    pub model_half_life_ms: f64,
    /// The "recent failure" reliability signal halves every this many ms. Default 30,000.
    pub failure_half_life_ms: f64,
    /// Utilization (`u`) up to which priority 3 is glad to fill an endpoint and beyond which
    /// priority 1 pays in full. Default 0.8.
    pub priority_fill: f64,
    /// Endpoints whose models are remembered at most (least recently heard from evicted first).
    /// Default 4,096.
    pub max_tracked_endpoints: usize,
    /// Prefix affinity: an endpoint believed to hold a cached prefix of the prompt is chosen over
    /// the cheapest one when its cost exceeds the cheapest's by at most
    /// `prefix_affinity × (cached share of the prompt) × min(1, u_cheapest / priority_fill)`
    /// (the longest match first). The per-request cost sees only this request's shorter prefill;
    /// the margin prices what the fleet gains, the prefill work not done, and grows with load so
    /// an idle fleet is not herded onto one engine. 0 turns it off. Default 0.4.
    pub prefix_affinity: f64,
    /// Deadline overflow: a request with a TTFT deadline (the SLA header) that no endpoint is
    /// predicted to meet goes to the endpoint whose queue alone already exceeds the deadline the
    /// most (reason `qoe-overflow`), instead of the cheapest. It is late anywhere; there it delays
    /// no one who could still be on time, so a transient overload stays on one queue instead of
    /// pushing every endpoint past its requests' deadlines. Off by default: the overflow queue is
    /// unbounded, and where it also costs the engine its prefix cache it can grow without end
    /// (docs/EVALUATION.md, "Deadline overflow"). Sustained overload is admission control's job
    /// (`--max-inflight-per-endpoint`, 429). Default false.
    pub deadline_overflow: bool,
    /// The engines schedule by vLLM's request `priority` and the router sends it
    /// (`--engine-priority`): a priority-1 request then waits for the next free seat, not behind
    /// the whole queue. Default false.
    pub engine_priority: bool,
}

/// The default weights: α resource, β performance, γ reliability, δ priority.
pub const DEFAULT_WEIGHTS: [f64; 4] = [0.3, 0.4, 0.2, 0.1];

impl Default for QoeConfig {
    fn default() -> Self {
        QoeConfig {
            target_ttft_ms: 300.0,
            target_itl_ms: 50.0,
            optimal_throughput: 30.0,
            weights: DEFAULT_WEIGHTS,
            weight_min: [0.1, 0.2, 0.05, 0.05],
            weight_max: [0.6, 0.7, 0.4, 0.3],
            adaptive: true,
            adapt_time_constant_ms: 10_000.0,
            saturation_inflight: 64,
            saturation_tokens: 131_072,
            metrics_staleness_ms: 3_000.0,
            typical_prompt_tokens: 1_024,
            prior_prefill_tokens_per_s: 8_000.0,
            prior_ttft_base_ms: 20.0,
            prior_itl_base_ms: 20.0,
            prior_itl_per_batch_ms: 0.2,
            forgetting: 0.97,
            model_half_life_ms: 300_000.0,
            failure_half_life_ms: 30_000.0,
            priority_fill: 0.8,
            max_tracked_endpoints: 4_096,
            prefix_affinity: 0.4,
            deadline_overflow: false,
            engine_priority: false,
        }
    }
}

impl QoeConfig {
    /// Parses `--qoe-weights a,b,c,d` (non-negative numbers, not all zero; normalized to sum 1).
    pub fn parse_weights(text: &str) -> Result<[f64; 4], String> {
        let parts: Vec<&str> = text.split(',').map(str::trim).collect();
        if parts.len() != 4 {
            return Err(format!(
                "expected four comma-separated weights (resource,performance,reliability,priority), got '{text}'"
            ));
        }
        let mut w = [0.0; 4];
        for (i, p) in parts.iter().enumerate() {
            let v: f64 = p
                .parse()
                .map_err(|_| format!("weight '{p}' in '{text}' is not a number"))?;
            if !v.is_finite() || v < 0.0 {
                return Err(format!(
                    "weight '{p}' in '{text}' must be a non-negative number"
                ));
            }
            w[i] = v;
        }
        let sum: f64 = w.iter().sum();
        if sum <= 0.0 {
            return Err(format!("weights '{text}' are all zero"));
        }
        Ok(w.map(|x| x / sum))
    }

    /// A copy with every field made usable: non-finite or out-of-range values replaced by their
    /// defaults, weights normalized.
    pub fn sanitized(&self) -> QoeConfig {
        let d = QoeConfig::default();
        let pos = |v: f64, def: f64| if v.is_finite() && v > 0.0 { v } else { def };
        let nonneg = |v: f64, def: f64| if v.is_finite() && v >= 0.0 { v } else { def };
        QoeConfig {
            target_ttft_ms: pos(self.target_ttft_ms, d.target_ttft_ms),
            target_itl_ms: pos(self.target_itl_ms, d.target_itl_ms),
            optimal_throughput: pos(self.optimal_throughput, d.optimal_throughput),
            weights: normalize(self.weights, DEFAULT_WEIGHTS),
            weight_min: self.weight_min,
            weight_max: self.weight_max,
            adaptive: self.adaptive,
            adapt_time_constant_ms: pos(self.adapt_time_constant_ms, d.adapt_time_constant_ms),
            saturation_inflight: self.saturation_inflight.max(1),
            saturation_tokens: self.saturation_tokens.max(1),
            metrics_staleness_ms: nonneg(self.metrics_staleness_ms, d.metrics_staleness_ms),
            typical_prompt_tokens: self.typical_prompt_tokens,
            prior_prefill_tokens_per_s: pos(
                self.prior_prefill_tokens_per_s,
                d.prior_prefill_tokens_per_s,
            ),
            prior_ttft_base_ms: nonneg(self.prior_ttft_base_ms, d.prior_ttft_base_ms),
            prior_itl_base_ms: nonneg(self.prior_itl_base_ms, d.prior_itl_base_ms),
            prior_itl_per_batch_ms: nonneg(self.prior_itl_per_batch_ms, d.prior_itl_per_batch_ms),
            forgetting: if self.forgetting.is_finite()
                && (FORGETTING_MIN..=1.0).contains(&self.forgetting)
            {
                self.forgetting
            } else {
                d.forgetting
            },
            model_half_life_ms: pos(self.model_half_life_ms, d.model_half_life_ms),
            failure_half_life_ms: pos(self.failure_half_life_ms, d.failure_half_life_ms),
            priority_fill: if self.priority_fill.is_finite() {
                self.priority_fill.clamp(0.05, 1.0)
            } else {
                d.priority_fill
            },
            max_tracked_endpoints: self.max_tracked_endpoints.max(1),
            prefix_affinity: if self.prefix_affinity.is_finite() {
                self.prefix_affinity.clamp(0.0, 1.0)
            } else {
                d.prefix_affinity
            },
            deadline_overflow: self.deadline_overflow,
            engine_priority: self.engine_priority,
        }
    }

    fn default_ttft_line(&self) -> Line {
        Line {
            a: self.prior_ttft_base_ms,
            b: 1e3 / self.prior_prefill_tokens_per_s,
        }
    }

    fn default_itl_line(&self) -> Line {
        Line {
            a: self.prior_itl_base_ms,
            b: self.prior_itl_per_batch_ms,
        }
    }
}

/// The QoE-centric policy. See the module docs and `docs/QOE.md`.
#[derive(Debug)]
pub struct Qoe {
    cfg: QoeConfig,
    rng: SharedRng,
    prefix: Mutex<PrefixIndex>,
    models: RwLock<ModelTable>,
    adapt: Mutex<Adapt>,
}

/// One candidate scored for one request.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Eval {
    index: usize,
    ttft: f64,
    itl: f64,
    cached: u32,
    seat_wait: f64,
    terms: [f64; 4],
    /// The TTFT and the ITL/rate parts of the performance term (weighted by the phase mix).
    perf_parts: [f64; 2],
    cost: f64,
    util: f64,
    /// Queued-ahead prefill ms over the target: this endpoint's prefill pressure (unsquashed).
    pressure: f64,
    /// Predicted wait before this request's own prefill starts: queued-ahead prefill plus the
    /// seat wait, ms.
    queue_ms: f64,
    /// No sample of its own: predicted from the fleet prior.
    cold: bool,
}

/// What is fixed for one decision.
struct Ctx<'a> {
    req: &'a RequestProfile,
    weights: [f64; 4],
    typical_prompt: f64,
    prior_ttft: Line,
    prior_itl: Line,
    /// The request's TTFT target, ms.
    t0: f64,
    now: Micros,
    staleness: Micros,
    /// The performance term's side of the request: its phase mix, targets and expected output.
    perf: cost::PerfTarget,
    /// KV usage taken for an endpoint without a fresh reading ([`cost::unknown_kv`]).
    unknown_kv: f64,
}

fn finite_ms(x: f64) -> f64 {
    if x.is_nan() {
        MAX_PREDICTION_MS
    } else {
        x.clamp(0.0, MAX_PREDICTION_MS)
    }
}

impl Qoe {
    /// Builds the policy from the shared policy config (`config.qoe`, the seed and the prefix index
    /// capacity).
    pub fn new(config: &PolicyConfig) -> Self {
        let cfg = config.qoe.sanitized();
        let bounds = Bounds::new(cfg.weights, cfg.weight_min, cfg.weight_max);
        Qoe {
            rng: SharedRng::new(config.seed),
            prefix: Mutex::new(PrefixIndex::new(config.prefix_index_blocks)),
            models: RwLock::new(ModelTable::new(
                cfg.max_tracked_endpoints,
                cfg.default_ttft_line(),
                cfg.default_itl_line(),
                // By then its own line weighs 1/13 against the prior (`trust`).
                (cfg.model_half_life_ms * 1e3 * FORGET_AFTER_HALF_LIVES) as Micros,
            )),
            adapt: Mutex::new(Adapt::new(
                cfg.weights,
                bounds,
                cfg.adaptive,
                cfg.adapt_time_constant_ms,
                cfg.typical_prompt_tokens as f64,
            )),
            cfg,
        }
    }

    /// The configuration in use (sanitized).
    pub fn config(&self) -> &QoeConfig {
        &self.cfg
    }

    /// The current weights (α, β, γ, δ).
    pub fn weights(&self) -> [f64; 4] {
        self.adapt.lock().unwrap_or_else(|e| e.into_inner()).weights
    }

    /// Scores every endpoint for `req` without deciding, learning or recording anything (for
    /// admission control and monitoring): one [`DecisionDetail`] per endpoint, in order.
    pub fn evaluate(
        &self,
        req: &RequestProfile,
        endpoints: &[EndpointView],
        now: Micros,
    ) -> Vec<DecisionDetail> {
        let mut matches = Vec::new();
        if !req.prefix_hashes.is_empty() {
            self.prefix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .match_lengths(&req.prefix_hashes, &mut matches);
        }
        let (weights, typical, decode_share) = {
            let a = self.adapt.lock().unwrap_or_else(|e| e.into_inner());
            (a.weights, a.typical_prompt, a.decode_share)
        };
        let models = self.models.read().unwrap_or_else(|e| e.into_inner());
        let ctx = self.ctx(req, endpoints, &models, weights, typical, decode_share, now);
        endpoints
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let blocks = matched_blocks(&matches, v.key);
                self.detail(&self.eval(&ctx, &models, i, v, blocks), &ctx)
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn ctx<'a>(
        &self,
        req: &'a RequestProfile,
        endpoints: &[EndpointView],
        models: &ModelTable,
        weights: [f64; 4],
        typical_prompt: f64,
        decode_share: f64,
        now: Micros,
    ) -> Ctx<'a> {
        let staleness = (self.cfg.metrics_staleness_ms * 1e3) as Micros;
        let t0 = match req.sla_ttft_ms {
            Some(ms) if ms > 0 => ms as f64,
            _ => self.cfg.target_ttft_ms,
        };
        // A client that sends a TTFT deadline (the SLA header) has said the first token matters:
        // its TTFT is priced as for a prefill-dominant request, whatever its phase. Found by the
        // fleet simulator (docs/EVALUATION.md): priced by phase, decode-dominant requests with a
        // tight deadline followed the low ITL of fast engines into their seat queues.
        // Near saturation the same request stops paying for a faster decoder
        // ([`adapt::Adapt::decode_share`]), unless engines serve it first wherever it goes
        // (priority 1 with engine priority): then its seat makes only lower priorities wait.
        let decode_share = if self.first_in_line(req) {
            1.0
        } else {
            cost::unit(decode_share, 1.0)
        };
        let (phase, decode_share) = if req.sla_ttft_ms.is_some() {
            (Phase::PrefillDominant, decode_share)
        } else {
            (req.phase, 1.0)
        };
        let n = req.expected_output_tokens as f64;
        Ctx {
            req,
            weights,
            typical_prompt: if typical_prompt.is_finite() {
                typical_prompt.max(0.0)
            } else {
                self.cfg.typical_prompt_tokens as f64
            },
            prior_ttft: models.prior_ttft(),
            prior_itl: models.prior_itl(),
            t0,
            now,
            staleness,
            perf: cost::PerfTarget::new(phase, t0, n, decode_share, &self.cfg),
            unknown_kv: cost::unknown_kv(endpoints, now, staleness),
        }
    }

    /// Whether engines serve this request ahead of the queue (priority 1 with engine priority).
    fn first_in_line(&self, req: &RequestProfile) -> bool {
        self.cfg.engine_priority && req.priority == Priority::HIGH
    }

    /// How much of a line whose last sample is `age` old is still trusted (the rest is the fleet
    /// prior): `h / (h + age)`, one half after one half-life `h`, a quarter after three.
    fn trust(&self, samples: f64, last: Micros, now: Micros) -> f64 {
        if samples <= 0.0 {
            return 0.0;
        }
        let h = self.cfg.model_half_life_ms * 1e3;
        h / (h + now.saturating_sub(last) as f64)
    }

    /// Scores one endpoint. `blocks`: prefix blocks the endpoint is believed to hold.
    fn eval(
        &self,
        ctx: &Ctx<'_>,
        models: &ModelTable,
        index: usize,
        view: &EndpointView,
        blocks: usize,
    ) -> Eval {
        let cfg = &self.cfg;
        let req = ctx.req;
        let engine = cost::fresh_engine(view, ctx.now, ctx.staleness);
        let prompt = req.prompt_tokens;
        // A decode-stage request's KV was computed elsewhere: its whole prompt counts as cached.
        let cached = match req.stage {
            Stage::Decode => prompt,
            Stage::Whole | Stage::Prefill => {
                (blocks as f64 * block_tokens(req)).min(prompt as f64) as u32
            }
        };
        let own = (prompt - cached) as f64;
        let model = models.get(view.key);
        // Queued prompts count in full: the router cannot know what the engine will find cached
        // for them (a discount by the expected hit share was tried and misled the policy when the
        // engine had evicted what the index believed cached); the fit absorbs the average.
        let queued = view.load.prefill_tokens as f64
            + cost::extra_waiting(view, engine) * ctx.typical_prompt;
        let (ttft_line, itl_line, cold) = match model {
            Some(m) => {
                let wt = self.trust(m.ttft.samples(), m.ttft.last, ctx.now);
                let wi = self.trust(m.itl.samples(), m.itl.last, ctx.now);
                let itl_prior = observed_itl_prior(ctx.prior_itl, view, m.itl.samples());
                (
                    m.ttft.line().blend(ctx.prior_ttft, wt),
                    m.itl.line().blend(itl_prior, wi),
                    m.ttft.samples() <= 0.0 && m.itl.samples() <= 0.0,
                )
            }
            None => (
                ctx.prior_ttft,
                observed_itl_prior(ctx.prior_itl, view, 0.0),
                true,
            ),
        };
        let seat_wait = cost::seat_wait_ms(view, engine, self.first_in_line(req));
        let ttft = finite_ms(ttft_line.at(queued + own) + seat_wait);
        let running = engine.and_then(|m| cost::nonneg(m.running)).unwrap_or(0.0);
        let batch = cost::in_flight(view).max(running.min(1e9)) + 1.0;
        let itl = finite_ms(itl_line.at(batch));
        // Capacity scales with the endpoint's learned prefill speed relative to the fleet prior,
        // damped (square root, within [0.5, 2]) because a slope learned under load is noisy: a
        // 3× slower engine saturates at 58% of the requests. Without it, "headroom" on a slow
        // engine is counted like headroom on a fast one (priority 1 went there in simulation);
        // undamped, identical engines drifted apart.
        let speed = (ctx.prior_ttft.b / ttft_line.b).sqrt();
        let speed = if speed.is_finite() {
            speed.clamp(SPEED_MIN, SPEED_MAX)
        } else {
            1.0
        };
        let util = cost::utilization(
            view,
            prompt - cached,
            req.expected_output_tokens,
            engine,
            ctx.unknown_kv,
            speed,
            cfg,
        );
        let perf = ctx.perf.parts(ttft, itl);
        let reliability = cost::reliability(view, ctx.now, cfg);
        let terms = [
            cost::resource(util),
            perf.total,
            reliability,
            cost::priority(req.priority, util, reliability, cfg),
        ];
        let c: f64 = ctx.weights.iter().zip(terms).map(|(w, t)| w * t).sum();
        let queued_ms = finite_ms(ttft_line.b * queued);
        let pressure = queued_ms / ctx.t0.max(1.0);
        Eval {
            index,
            ttft,
            itl,
            cached,
            seat_wait,
            terms,
            perf_parts: [perf.ttft, perf.itl],
            cost: cost::unit(c, 1.0),
            util,
            pressure,
            queue_ms: finite_ms(queued_ms + seat_wait),
            cold,
        }
    }

    /// Prefix affinity (see [`QoeConfig::prefix_affinity`]): the candidate holding the longest
    /// cached prefix whose cost is within the affinity margin of `best`, if it is not `best`.
    /// Found by the fleet simulator (docs/EVALUATION.md): without it, a follow-up turn or a RAG
    /// question whose phase is decode-dominant weighs its cached prefill at a few percent of its
    /// cost and spreads over the fleet, losing the engine's prefix cache.
    fn affine(&self, best: &Eval, cached: &[Eval], prompt: u32) -> Option<Eval> {
        if self.cfg.prefix_affinity <= 0.0 || prompt == 0 {
            return None;
        }
        // Saved prefill is worth most when capacity is short: scale by how full the cheapest
        // endpoint is (toward the fill level), so an idle fleet is not herded onto one engine.
        let busy = if best.util.is_finite() {
            (best.util / self.cfg.priority_fill.max(1e-3)).clamp(0.0, 1.0)
        } else {
            1.0
        };
        let chosen = cached
            .iter()
            .filter(|e| {
                let share = e.cached as f64 / prompt as f64;
                e.cost <= best.cost + self.cfg.prefix_affinity * share * busy
            })
            .max_by(|a, b| a.cached.cmp(&b.cached).then(b.cost.total_cmp(&a.cost)))?;
        (chosen.index != best.index && chosen.cached > best.cached).then_some(*chosen)
    }

    fn detail(&self, e: &Eval, ctx: &Ctx<'_>) -> DecisionDetail {
        DecisionDetail {
            predicted_ttft_ms: e.ttft,
            predicted_itl_ms: e.itl,
            cached_tokens: e.cached,
            seat_wait_ms: e.seat_wait,
            terms: e.terms,
            weights: ctx.weights,
            cost: e.cost,
        }
    }

    /// Why `best` beat `runner` (see `docs/QOE.md`).
    fn reason(
        &self,
        ctx: &Ctx<'_>,
        models: &ModelTable,
        endpoints: &[EndpointView],
        best: &Eval,
        runner: Option<&Eval>,
        ties: u32,
    ) -> Reason {
        let Some(runner) = runner else {
            return Reason::OnlyCandidate;
        };
        if ties > 1 {
            return Reason::QoeTie;
        }
        if best.cached > runner.cached && ctx.req.stage != Stage::Decode {
            // Would it still have won outright with only the runner-up's cache hit?
            let without = self.eval(
                ctx,
                models,
                best.index,
                &endpoints[best.index],
                blocks_of(runner.cached, block_tokens(ctx.req)),
            );
            if without.cost >= runner.cost - TIE_EPSILON {
                return Reason::QoePrefix;
            }
        }
        let w = ctx.weights;
        let delta: [f64; 4] = std::array::from_fn(|k| w[k] * (runner.terms[k] - best.terms[k]));
        let mut k_max = 0;
        for k in 1..4 {
            if delta[k] > delta[k_max] {
                k_max = k;
            }
        }
        match k_max {
            0 => Reason::QoeResource,
            // A prior prediction beat a learned one.
            1 if best.cold && !runner.cold => Reason::QoeColdStart,
            1 => {
                let d_ttft = runner.perf_parts[0] - best.perf_parts[0];
                let d_itl = runner.perf_parts[1] - best.perf_parts[1];
                if d_ttft > d_itl || (d_ttft == d_itl && ctx.req.phase == Phase::PrefillDominant) {
                    Reason::QoeTtft
                } else {
                    Reason::QoeItl
                }
            }
            2 => Reason::QoeReliability,
            _ => match ctx.req.priority {
                Priority::HIGH => Reason::QoeHeadroom,
                Priority::LOW => Reason::QoeLeaveHeadroom,
                _ => Reason::QoeResource,
            },
        }
    }
}

/// The request's tokens per prefix block, the estimate rule's when it is not a positive number.
fn block_tokens(req: &RequestProfile) -> f64 {
    if req.block_tokens.is_finite() && req.block_tokens > 0.0 {
        req.block_tokens
    } else {
        crate::prompt::BLOCK_TOKENS as f64
    }
}

/// Prefix blocks that hold `tokens` cached tokens at `block_tokens` per block (rounded up).
fn blocks_of(tokens: u32, block_tokens: f64) -> usize {
    let blocks = (tokens as f64 / block_tokens.max(1e-9)).ceil();
    if blocks.is_finite() {
        blocks as usize
    } else {
        0
    }
}

/// Blocks `key` holds according to the prefix matches.
fn matched_blocks(matches: &[(u64, usize)], key: u64) -> usize {
    matches
        .iter()
        .find(|&&(k, _)| k == key)
        .map_or(0, |&(_, n)| n)
}

/// The ITL prior for an endpoint with no ITL samples of its own: the fleet prior, averaged with the
/// router-observed ITL EWMA when there is one (a sanity signal: evidence, not a default).
fn observed_itl_prior(prior: Line, view: &EndpointView, samples: f64) -> Line {
    match view.observed.itl_ms {
        Some(obs) if samples <= 0.0 && obs.is_finite() && obs > 0.0 => {
            let batch = cost::in_flight(view) + 1.0;
            let shift = 0.5 * (obs.min(MAX_PREDICTION_MS) - prior.at(batch));
            Line {
                a: (prior.a + shift).max(0.0),
                b: prior.b,
            }
        }
        _ => prior,
    }
}

impl RoutingPolicy for Qoe {
    fn name(&self) -> &'static str {
        "qoe"
    }

    fn pick(
        &self,
        req: &RequestProfile,
        endpoints: &[EndpointView],
        now: Micros,
    ) -> Option<Decision> {
        if endpoints.is_empty() {
            return None;
        }
        let (weights, typical, decode_share) = {
            let a = self.adapt.lock().unwrap_or_else(|e| e.into_inner());
            (a.weights, a.typical_prompt, a.decode_share)
        };
        let mut matches: Vec<(u64, usize)> = Vec::new();
        if !req.prefix_hashes.is_empty() {
            self.prefix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .match_lengths(&req.prefix_hashes, &mut matches);
        }
        let models = self.models.read().unwrap_or_else(|e| e.into_inner());
        let ctx = self.ctx(req, endpoints, &models, weights, typical, decode_share, now);

        let mut best: Option<Eval> = None;
        let mut runner: Option<Eval> = None;
        let mut ties = 0u32;
        let (mut pressure, mut saturation) = (0.0, 0.0);
        // Candidates believed to hold a prefix of the prompt (at most a few: see `match_lengths`).
        let mut cached: Vec<Eval> = Vec::new();
        let deadline = self.cfg.deadline_overflow && req.sla_ttft_ms.is_some();
        // Deadline overflow (see `QoeConfig::deadline_overflow`): whether any usable endpoint is
        // predicted on time, and the latest one whose queue alone misses the deadline.
        let mut on_time = false;
        let mut overflow: Option<Eval> = None;
        for (i, view) in endpoints.iter().enumerate() {
            let blocks = if matches.is_empty() {
                0
            } else {
                matched_blocks(&matches, view.key)
            };
            let e = self.eval(&ctx, &models, i, view, blocks);
            if deadline && e.terms[2] < OVERFLOW_MAX_RELIABILITY_COST {
                if e.ttft <= ctx.t0 {
                    on_time = true;
                } else if e.queue_ms > ctx.t0 && overflow.is_none_or(|o| e.queue_ms > o.queue_ms) {
                    overflow = Some(e);
                }
            }
            if e.cached > 0 {
                cached.push(e);
            }
            pressure += e.pressure;
            saturation += e.util.min(1.0);
            match best {
                None => {
                    best = Some(e);
                    ties = 1;
                }
                Some(b) if e.cost < b.cost - TIE_EPSILON => {
                    runner = best;
                    best = Some(e);
                    ties = 1;
                }
                Some(b) if e.cost <= b.cost + TIE_EPSILON => {
                    // Reservoir sampling over the tied: each equally likely to end up chosen.
                    ties += 1;
                    if self.rng.below(ties as usize) == 0 {
                        runner = best;
                        best = Some(e);
                    } else {
                        runner = Some(e);
                    }
                }
                Some(_) => {
                    if runner.is_none_or(|r| e.cost < r.cost) {
                        runner = Some(e);
                    }
                }
            }
        }
        let mut cheapest = best?;
        let mut overflowed = false;
        if let Some(o) = overflow.filter(|_| !on_time && cheapest.ttft > ctx.t0) {
            overflowed = o.index != cheapest.index;
            cheapest = o;
        }
        let (best, reason) = match self.affine(&cheapest, &cached, req.prompt_tokens) {
            Some(affine) => (affine, Reason::QoePrefix),
            None if overflowed => (cheapest, Reason::QoeOverflow),
            None => {
                let reason =
                    self.reason(&ctx, &models, endpoints, &cheapest, runner.as_ref(), ties);
                (cheapest, reason)
            }
        };
        let detail = self.detail(&best, &ctx);
        drop(models);

        let chosen = &endpoints[best.index];
        if !req.prefix_hashes.is_empty() {
            self.prefix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record(&req.prefix_hashes, chosen.key);
        }
        let n = endpoints.len() as f64;
        self.adapt
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(
                cost::squash(pressure / n),
                saturation / n,
                req.prompt_tokens,
                now,
            );
        Some(Decision {
            index: best.index,
            endpoint: chosen.id,
            reason,
            detail: Some(detail),
        })
    }

    fn feedback(&self, fb: &Feedback, now: Micros) {
        let lambda = self.cfg.forgetting;
        match fb.event {
            FeedbackEvent::FirstToken { ttft } => {
                let ttft_ms = ttft as f64 / 1e3;
                // The line learns prefill; the seat wait is predicted apart from it. It learns
                // at the router's own count of the work ahead, not the engine-reported extra the
                // prediction adds: that comes from a scrape up to an interval old, and as a
                // regressor its noise flattens the slope (docs/QOE.md, "Learning").
                let seat_wait = fb.detail.map_or(0.0, |d| d.seat_wait_ms);
                let prefill_ms = (ttft_ms - seat_wait).max(0.0);
                let cached = fb
                    .detail
                    .map_or(0, |d| d.cached_tokens)
                    .min(fb.prompt_tokens);
                let tokens =
                    fb.load_at_dispatch.prefill_tokens as f64 + (fb.prompt_tokens - cached) as f64;
                self.models
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .update(fb.endpoint_key, Kind::Ttft, tokens, prefill_ms, lambda, now);
                let target = match fb.sla_ttft_ms {
                    Some(ms) if ms > 0 => ms as f64,
                    _ => self.cfg.target_ttft_ms,
                };
                self.adapt
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .record_sla(fb.priority.index(), ttft_ms > target);
            }
            FeedbackEvent::Finished {
                ttft,
                output_tokens,
                mean_itl_ms,
                failed,
            } => {
                if failed && ttft.is_none() && fb.streamed {
                    // Never produced a token: the deadline was missed. (Only streamed requests
                    // count, as only they report a first token that meets it.)
                    self.adapt
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .record_sla(fb.priority.index(), true);
                }
                let mut models = self.models.write().unwrap_or_else(|e| e.into_inner());
                match mean_itl_ms {
                    Some(itl) if !failed && output_tokens >= 2 => {
                        let load = fb.load_at_dispatch;
                        let batch = load.in_prefill as f64 + load.in_decode as f64 + 1.0;
                        models.update(fb.endpoint_key, Kind::Itl, batch, itl, lambda, now);
                    }
                    _ => models.touch(fb.endpoint_key, now),
                }
            }
        }
    }

    fn best_predicted_ttft_ms(
        &self,
        req: &RequestProfile,
        endpoints: &[EndpointView],
        now: Micros,
    ) -> Option<f64> {
        self.evaluate(req, endpoints, now)
            .iter()
            .map(|d| d.predicted_ttft_ms)
            .filter(|t| t.is_finite())
            .min_by(f64::total_cmp)
    }

    fn state_json(&self) -> Option<serde_json::Value> {
        let a = self.adapt.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let models = self.models.read().unwrap_or_else(|e| e.into_inner());
        let named = |w: [f64; 4]| json!({"resource": w[0], "performance": w[1], "reliability": w[2], "priority": w[3]});
        let line_json = |t: Line, i: Line| {
            json!({
                "ttft_base_ms": t.a,
                "prefill_tokens_per_s": 1e3 / t.b,
                "itl_base_ms": i.a,
                "itl_per_batch_ms": i.b,
            })
        };
        let mut recent: Vec<(&u64, &predictor::EndpointModel)> = models.iter().collect();
        recent.sort_unstable_by(|x, y| y.1.last_seen.cmp(&x.1.last_seen).then(x.0.cmp(y.0)));
        let endpoints: Vec<_> = recent
            .iter()
            .take(STATE_JSON_ENDPOINTS)
            .map(|(k, m)| {
                let mut v = line_json(m.ttft.line(), m.itl.line());
                v["key"] = json!(format!("{k:016x}"));
                v["ttft_samples"] = json!(m.ttft.samples());
                v["itl_samples"] = json!(m.itl.samples());
                v["last_seen_us"] = json!(m.last_seen);
                v["feedback_events"] = json!(m.events);
                v
            })
            .collect();
        let (mature_ttft, mature_itl) = models.mature_counts();
        let mut prior = line_json(models.prior_ttft(), models.prior_itl());
        prior["mature_ttft_endpoints"] = json!(mature_ttft);
        prior["mature_itl_endpoints"] = json!(mature_itl);
        let miss = |i: usize| json!({"rate": a.miss[i], "samples": a.miss_samples[i]});
        let prefix_blocks = self.prefix.lock().unwrap_or_else(|e| e.into_inner()).len();
        Some(json!({
            "policy": "qoe",
            "weights": named(a.weights),
            "weights_target": named(a.target),
            "weights_base": named(a.base),
            "weights_min": named(a.bounds.min),
            "weights_max": named(a.bounds.max),
            "adaptive": a.enabled,
            "fleet": {
                "prefill_pressure": a.prefill_pressure,
                "saturation": a.saturation,
                "decode_share": a.decode_share,
            },
            "sla_miss": {"1": miss(0), "2": miss(1), "3": miss(2)},
            "typical_prompt_tokens": a.typical_prompt,
            "prior": prior,
            "tracked_endpoints": models.len(),
            "endpoints": endpoints,
            "prefix_index_blocks": prefix_blocks,
        }))
    }
}
