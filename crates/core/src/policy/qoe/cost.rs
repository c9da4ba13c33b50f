//! The four cost terms, each a pure function into `[0, 1]` (lower is better).
//!
//! `qoe_cost = α·resource + β·performance + γ·reliability + δ·priority`. The formulas, with the
//! numbers the unit tests check by hand, are in `docs/QOE.md`; in short:
//!
//! * **utilization** `u = max(u_req, u_tok, u_kv) + u_wait` where `u_req = (in_flight + 1) /
//!   (saturation_inflight·v)`, `u_tok = (prefill_tokens + pending_output_tokens + uncached prompt +
//!   expected_output) / (saturation_tokens·v)`, `u_kv` the engine's KV usage and `u_wait` the
//!   engine's waiting requests beyond the router's own in-prefill ones over `saturation_inflight`
//!   (both only when the metrics are fresh). `v` is the endpoint's relative speed (1 for a typical
//!   endpoint, see the policy). `u = 1` is "at capacity".
//! * **resource** `R = u⁴ / (1 + u⁴)`: capacity *risk*, negligible while lightly loaded (0.06 at
//!   u = 0.5), steep near capacity (0.29 at 0.8, 0.5 at 1, 0.84 at 1.5), always increasing so
//!   overloaded endpoints still differ. The user-felt cost of moderate load is the performance
//!   term's business (predicted TTFT/ITL grow with it); counting it here too would let load drown
//!   the priority term.
//! * **performance** `P`: predicted TTFT against the request's target `T` (its SLA, else
//!   `target_ttft_ms`), predicted ITL against `target_itl_ms`, delivery rate against
//!   `optimal_throughput`, and the predicted Andes QoE; weighted by the request's phase (a
//!   request with a TTFT deadline as prefill-dominant, its decode-speed parts scaled by the
//!   adaptive decode share, see `adapt`).
//!   Ratios go through `s(x) = 1 − 2^(−x)`: 0 at 0, 0.5 on target, 0.75 at twice the target.
//! * **reliability** `Y = 1 − (1−b)(1−e)(1−f/2)(1−0.3·st)(1−0.3·rec)`: breaker `b` (closed 0,
//!   half-open 0.5, open 1), error rate `e` (errors + timeouts again, so timeouts count double),
//!   flaps `f = n/(n+2)`, metric staleness `st`, recency of the last failure `rec` (halves every
//!   `failure_half_life_ms`). Unhealthy or open: 1.
//! * **priority** `Q`, with `ū = min(u, fill)/fill` the fill toward `priority_fill` (0.8):
//!   priority 1 `Q = ū²` (pays steeply as an endpoint nears the fill level: it takes the headroom),
//!   priority 2 `Q = ū` (proportional: neutral), priority 3 `Q = 1 − (1−Y)·ū + min(1, max(0, u−1))`
//!   clamped (a healthy endpoint filled to the fill level costs it nothing, an idle one the most: it
//!   leaves the headroom to others; past capacity it pays again).

use super::QoeConfig;
use crate::{BreakerState, EndpointView, EngineMetrics, Micros, Phase, Priority};

/// Smooth map of a ratio to `[0, 1)`: `1 − 2^(−x)`; 0 for x ≤ 0, 1 for NaN (pessimistic).
pub fn squash(x: f64) -> f64 {
    if x.is_nan() {
        return 1.0;
    }
    if x <= 0.0 {
        return 0.0;
    }
    1.0 - (-x).exp2()
}

/// `u² / (1 + u²)`: 0.5 at u = 1. NaN → 1.
pub fn hill2(u: f64) -> f64 {
    hill(u, 2)
}

/// `u⁴ / (1 + u⁴)`: 0.5 at u = 1, flat below ~0.5, steep around 1. NaN → 1.
pub fn hill4(u: f64) -> f64 {
    hill(u, 4)
}

fn hill(u: f64, power: i32) -> f64 {
    if u.is_nan() {
        return 1.0;
    }
    if u <= 0.0 {
        return 0.0;
    }
    if u > 1e8 {
        return 1.0;
    }
    let p = u.powi(power);
    p / (1.0 + p)
}

/// Clamps into `[0, 1]`; NaN → `nan_as`.
pub fn unit(x: f64, nan_as: f64) -> f64 {
    if x.is_nan() {
        nan_as
    } else {
        x.clamp(0.0, 1.0)
    }
}

/// A finite, non-negative metric value, or `None`.
pub fn nonneg(x: Option<f64>) -> Option<f64> {
    x.filter(|v| v.is_finite() && *v >= 0.0)
}

/// The engine metrics if scraped no longer than `staleness` ago.
pub fn fresh_engine(view: &EndpointView, now: Micros, staleness: Micros) -> Option<&EngineMetrics> {
    match (view.engine.as_ref(), view.engine_age(now)) {
        (Some(m), Some(age)) if age <= staleness => Some(m),
        _ => None,
    }
}

/// KV usage as a fraction. vLLM reports 0..1 (a hair above 1 is rounding: full); a value in
/// (1.001, 100] is taken as a percentage.
pub fn kv_fraction(m: &EngineMetrics) -> Option<f64> {
    let kv = nonneg(m.kv_usage)?;
    Some(if kv > 1.001 && kv <= 100.0 {
        kv / 100.0
    } else {
        kv.min(1.0)
    })
}

/// Engine-reported waiting requests beyond the router's own requests in prefill (work the router
/// does not see: other routers, clients going direct).
pub fn extra_waiting(view: &EndpointView, engine: Option<&EngineMetrics>) -> f64 {
    engine
        .and_then(|m| nonneg(m.waiting))
        .map(|w| (w - view.load.in_prefill as f64).max(0.0))
        .unwrap_or(0.0)
}

/// Predicted wait for a batch seat, ms. When the engine looks seat-bound
/// ([`EngineMetrics::full_seats`]: every seat of its batch, vLLM's `max_num_seqs`, taken at the
/// last two scrapes), the request waits behind `max(in_flight + extra_waiting, running +
/// waiting) + 1 − seats` others for seats that free as requests finish, at the endpoint's
/// observed completion rate: the router's count is fresh, the scrape's up to an interval old
/// but also holds the requests of other clients, running or waiting. 0 when seats are free, when the metrics are
/// missing or stale, or before any request has finished there (no rate to go by).
///
/// `first_in_line`: the engine schedules by priority and this request outranks the queue (a
/// priority-1 request with `QoeConfig::engine_priority`): it waits for the next seat that frees,
/// not for everyone queued (the router cannot count the other priority-1 requests waiting there).
pub fn seat_wait_ms(
    view: &EndpointView,
    engine: Option<&EngineMetrics>,
    first_in_line: bool,
) -> f64 {
    let Some(m) = engine else {
        return 0.0;
    };
    let Some(seats) = nonneg(m.full_seats) else {
        return 0.0;
    };
    let rate = view.observed.qps;
    if !(rate.is_finite() && rate > 0.0) {
        return 0.0;
    }
    let ours = in_flight(view) + extra_waiting(view, Some(m));
    let engine_reported = nonneg(m.running).unwrap_or(0.0) + nonneg(m.waiting).unwrap_or(0.0);
    let ahead = ours.max(engine_reported.min(1e9)) + 1.0 - seats;
    if ahead <= 0.0 {
        return 0.0;
    }
    let ahead = if first_in_line { ahead.min(1.0) } else { ahead };
    (1e3 * ahead / rate).min(super::MAX_PREDICTION_MS)
}

/// Requests in flight (as f64: no overflow whatever the counts).
pub fn in_flight(view: &EndpointView) -> f64 {
    view.load.in_prefill as f64 + view.load.in_decode as f64
}

/// The KV usage assumed for an endpoint without a fresh reading: the mean of the fresh ones (0
/// when none has one). An endpoint whose `/metrics` cannot be read is neutral, as the fleet's
/// typical one; taken as empty, it won every decision against endpoints that report their use.
pub fn unknown_kv(views: &[EndpointView], now: Micros, staleness: Micros) -> f64 {
    let (mut sum, mut n) = (0.0, 0u32);
    for kv in views
        .iter()
        .filter_map(|v| fresh_engine(v, now, staleness).and_then(kv_fraction))
    {
        sum += kv;
        n += 1;
    }
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// The utilization `u` (1 = at the configured capacity). Always finite and ≥ 0.
///
/// `prompt_tokens` is the request's *uncached* prompt. `speed` (1 = the fleet's typical endpoint)
/// scales the request and token capacities: a slower engine saturates sooner. The engine-reported
/// KV usage and queue are absolute and not scaled; without a KV reading, `kv_default`
/// ([`unknown_kv`]) stands for it.
pub fn utilization(
    view: &EndpointView,
    prompt_tokens: u32,
    expected_output: u32,
    engine: Option<&EngineMetrics>,
    kv_default: f64,
    speed: f64,
    cfg: &QoeConfig,
) -> f64 {
    let speed = if speed.is_finite() && speed > 0.0 {
        speed
    } else {
        1.0
    };
    // An engine seen running more than the configured capacity at once can take that many: its
    // peak (of any age: seats do not go stale) is a lower bound on its batch seats.
    let peak = view
        .engine
        .and_then(|m| nonneg(m.peak_running))
        .unwrap_or(0.0);
    let cap_req = (cfg.saturation_inflight.max(1) as f64 * speed).max(peak);
    let cap_tok = cfg.saturation_tokens.max(1) as f64 * speed;
    let u_req = (in_flight(view) + 1.0) / cap_req;
    let tokens = view.load.prefill_tokens as f64
        + view.load.pending_output_tokens as f64
        + prompt_tokens as f64
        + expected_output as f64;
    let u_tok = tokens / cap_tok;
    let kv_default = if kv_default.is_finite() {
        kv_default.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let u_kv = engine.and_then(kv_fraction).unwrap_or(kv_default);
    let extra = extra_waiting(view, engine);
    let u_wait = if extra > 0.0 {
        extra / cfg.saturation_inflight.max(1) as f64
    } else {
        0.0
    };
    let u = u_req.max(u_tok).max(u_kv) + u_wait;
    if u.is_finite() {
        u.min(1e9)
    } else {
        1e9
    }
}

/// Resource term: `hill4(u)`.
pub fn resource(util: f64) -> f64 {
    unit(hill4(util), 1.0)
}

/// Predicted Andes QoE (arXiv 2404.16283; FIELD-NOTES) of a response of `n` tokens whose first
/// token comes after `ttft_ms` and the rest every `itl_ms`, for a reader expecting the first
/// token by `t0_ms` and reading `r` tokens/s. The read timeline is `min(n, r'·(t − ttft))` with
/// `r' = min(r, 1000/itl)`; QoE = min(1, S_actual / S_expected) over the time the last token is
/// read. In `[0, 1]`, 1 when on schedule.
pub fn andes_qoe(ttft_ms: f64, itl_ms: f64, n: f64, t0_ms: f64, r: f64) -> f64 {
    AndesTarget::new(n, t0_ms, r).qoe(ttft_ms, itl_ms)
}

/// The request's side of [`andes_qoe`], computed once per decision: what stays the same for
/// every endpoint (a third of the divisions of a prediction).
#[derive(Clone, Copy, Debug)]
pub struct AndesTarget {
    n: f64,
    r: f64,
    t0: f64,
    /// When the last token is read on schedule: `t0 + n / r`, s.
    on_time_end: f64,
    /// The expected timeline's area beyond the first token: `n² / 2r`.
    ramp: f64,
}

impl AndesTarget {
    pub fn new(n: f64, t0_ms: f64, r: f64) -> Self {
        let n = if n.is_finite() { n.max(1.0) } else { 1.0 };
        let r = if r.is_finite() && r > 0.0 { r } else { 30.0 };
        let t0 = (t0_ms.max(0.0) / 1e3).min(1e9);
        AndesTarget {
            n,
            r,
            t0,
            on_time_end: t0 + n / r,
            ramp: n * n / (2.0 * r),
        }
    }

    /// [`andes_qoe`] for a first token after `ttft_ms` and the rest every `itl_ms`.
    pub fn qoe(&self, ttft_ms: f64, itl_ms: f64) -> f64 {
        let (n, t0) = (self.n, self.t0);
        if ttft_ms.is_nan() || t0.is_nan() {
            return 0.0;
        }
        let t = (ttft_ms.max(0.0) / 1e3).min(1e9);
        let delivery = if itl_ms.is_finite() && itl_ms > 0.0 {
            1e3 / itl_ms
        } else if itl_ms.is_nan() {
            0.0
        } else {
            f64::INFINITY
        };
        let r_read = self.r.min(delivery).max(1e-9);
        let t_end = t + n / r_read;
        if t_end <= self.on_time_end {
            return 1.0;
        }
        let s_exp = n * (t_end - t0) - self.ramp;
        let s_act = n * n / (2.0 * r_read);
        if s_exp.is_nan() || s_exp <= 0.0 || !s_act.is_finite() {
            return 0.0;
        }
        unit(s_act / s_exp, 0.0)
    }
}

/// The sub-weights of the performance term, by phase: (TTFT, ITL, delivery rate, 1 − QoE).
pub fn performance_mix(phase: Phase) -> [f64; 4] {
    match phase {
        Phase::PrefillDominant => [0.6, 0.1, 0.0, 0.3],
        Phase::DecodeDominant => [0.15, 0.3, 0.25, 0.3],
    }
}

/// Performance term. `t0_ms` is the request's TTFT target (SLA or `target_ttft_ms`), `n` its
/// expected output tokens.
pub fn performance(
    phase: Phase,
    ttft_ms: f64,
    itl_ms: f64,
    t0_ms: f64,
    n: f64,
    cfg: &QoeConfig,
) -> f64 {
    performance_parts(phase, ttft_ms, itl_ms, t0_ms, n, 1.0, cfg).total
}

/// The performance term and the shares of it that came from the TTFT side and the ITL/rate side
/// (weighted by the phase mix; the QoE share is in neither).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PerfParts {
    pub total: f64,
    pub ttft: f64,
    pub itl: f64,
}

/// [`performance`] with its parts. `decode_share` in `[0, 1]` scales the decode-speed components
/// (ITL, delivery rate, predicted QoE); 1 prices them as [`performance_mix`] says.
pub fn performance_parts(
    phase: Phase,
    ttft_ms: f64,
    itl_ms: f64,
    t0_ms: f64,
    n: f64,
    decode_share: f64,
    cfg: &QoeConfig,
) -> PerfParts {
    PerfTarget::new(phase, t0_ms, n, decode_share, cfg).parts(ttft_ms, itl_ms)
}

/// What the performance term holds fixed for one request (its phase mix, targets and expected
/// output), so that pricing each endpoint is [`PerfTarget::parts`] alone.
#[derive(Clone, Copy, Debug)]
pub struct PerfTarget {
    mix: [f64; 4],
    /// The TTFT target the ratio divides by, ms (at least 1).
    ttft_target: f64,
    itl_target: f64,
    optimal_throughput: f64,
    andes: AndesTarget,
}

impl PerfTarget {
    pub fn new(phase: Phase, t0_ms: f64, n: f64, decode_share: f64, cfg: &QoeConfig) -> Self {
        let d = unit(decode_share, 1.0);
        let mix = performance_mix(phase);
        PerfTarget {
            mix: [mix[0], d * mix[1], d * mix[2], d * mix[3]],
            ttft_target: t0_ms.max(1.0),
            itl_target: cfg.target_itl_ms.max(1e-3),
            optimal_throughput: cfg.optimal_throughput,
            andes: AndesTarget::new(n, t0_ms, cfg.optimal_throughput),
        }
    }

    /// The performance term of an endpoint predicted to give this request `ttft_ms` and
    /// `itl_ms`.
    pub fn parts(&self, ttft_ms: f64, itl_ms: f64) -> PerfParts {
        let mix = self.mix;
        let s_ttft = squash(ttft_ms / self.ttft_target);
        let s_itl = squash(itl_ms / self.itl_target);
        // Optimal rate over the predicted rate (1000/itl): > 1 when slower than a person reads.
        let s_rate = if mix[2] > 0.0 {
            squash(itl_ms * self.optimal_throughput / 1e3)
        } else {
            0.0
        };
        let q = self.andes.qoe(ttft_ms, itl_ms);
        let ttft = mix[0] * s_ttft;
        let itl = mix[1] * s_itl + mix[2] * s_rate;
        PerfParts {
            total: unit(ttft + itl + mix[3] * (1.0 - q), 1.0),
            ttft,
            itl,
        }
    }
}

/// Reliability term (see the module docs).
pub fn reliability(view: &EndpointView, now: Micros, cfg: &QoeConfig) -> f64 {
    let avail = view.availability;
    if !avail.healthy || avail.breaker == BreakerState::Open {
        return 1.0;
    }
    let b = match avail.breaker {
        BreakerState::Closed => 0.0,
        BreakerState::HalfOpen => 0.5,
        BreakerState::Open => 1.0,
    };
    let e = unit(
        unit(view.observed.error_rate, 1.0) + unit(view.observed.timeout_rate, 1.0),
        1.0,
    );
    let flaps = avail.flaps as f64;
    let f = if avail.flaps == 0 {
        0.0
    } else {
        flaps / (flaps + 2.0)
    };
    let staleness_us = cfg.metrics_staleness_ms.max(0.0) * 1e3;
    let st = match view.engine_age(now) {
        Some(age) if (age as f64) > staleness_us => unit(
            (age as f64 - staleness_us) / (9.0 * staleness_us).max(1.0),
            1.0,
        ),
        _ => 0.0,
    };
    let rec = match view.observed.last_failure {
        Some(at) if at > now => 1.0,
        Some(at) => {
            let half_life_us = (cfg.failure_half_life_ms * 1e3).max(1.0);
            (-((now - at) as f64 / half_life_us)).exp2()
        }
        None => 0.0,
    };
    let ok = (1.0 - b) * (1.0 - e) * (1.0 - 0.5 * f) * (1.0 - 0.3 * st) * (1.0 - 0.3 * rec);
    unit(1.0 - ok, 1.0)
}

/// Priority term (see the module docs): makes priority change *which* endpoint wins.
pub fn priority(priority: Priority, util: f64, reliability: f64, cfg: &QoeConfig) -> f64 {
    let fill = cfg.priority_fill.clamp(0.05, 1.0);
    let u = if util.is_nan() { 1e9 } else { util.max(0.0) };
    let filled = u.min(fill) / fill;
    let q = match priority.level() {
        1 => filled * filled,
        2 => filled,
        _ => 1.0 - (1.0 - unit(reliability, 1.0)) * filled + (u - 1.0).clamp(0.0, 1.0),
    };
    unit(q, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Availability;

    fn cfg() -> QoeConfig {
        QoeConfig::default()
    }

    #[test]
    fn squash_and_hill_hand_values() {
        assert_eq!(squash(0.0), 0.0);
        assert_eq!(squash(1.0), 0.5);
        assert_eq!(squash(2.0), 0.75);
        assert_eq!(squash(-3.0), 0.0);
        assert_eq!(squash(f64::NAN), 1.0);
        assert_eq!(squash(f64::INFINITY), 1.0);
        assert_eq!(hill2(1.0), 0.5);
        assert!((hill2(0.5) - 0.2).abs() < 1e-12);
        assert_eq!(hill2(f64::INFINITY), 1.0);
        assert_eq!(hill4(1.0), 0.5);
        assert!((hill4(2.0) - 16.0 / 17.0).abs() < 1e-12);
        assert_eq!(hill4(f64::NAN), 1.0);
    }

    #[test]
    fn utilization_and_resource_hand_values() {
        let c = cfg(); // 64 requests, 131,072 tokens
        let mut v = EndpointView::idle(0, 1);
        v.load.in_decode = 31;
        // u_req = 32/64 = 0.5; u_tok = (1000+200)/131072 ≈ 0.009
        let u = utilization(&v, 1000, 200, None, 0.0, 1.0, &c);
        assert!((u - 0.5).abs() < 1e-12);
        assert!((resource(u) - 0.0625 / 1.0625).abs() < 1e-12);
        assert_eq!(resource(1.0), 0.5);
        // Fresh KV usage 0.9 dominates; 20 waiting beyond 4 in prefill adds 16/64.
        v.load.in_prefill = 4;
        let m = EngineMetrics {
            kv_usage: Some(0.9),
            waiting: Some(20.0),
            ..EngineMetrics::default()
        };
        let u = utilization(&v, 1000, 200, Some(&m), 0.0, 1.0, &c);
        assert!((u - (0.9 + 0.25)).abs() < 1e-12, "{u}");
        // Tokens: 65,536 queued prompt tokens → u_tok ≈ 0.5 + small.
        let mut w = EndpointView::idle(1, 2);
        w.load.prefill_tokens = 65_536 - 1200;
        let u = utilization(&w, 1000, 200, None, 0.0, 1.0, &c);
        assert!((u - 0.5).abs() < 1e-12, "{u}");
        // A twice-as-fast endpoint has twice the capacity.
        assert!((utilization(&w, 1000, 200, None, 0.0, 2.0, &c) - 0.25).abs() < 1e-12);
        // NaN metrics are ignored.
        let bad = EngineMetrics {
            kv_usage: Some(f64::NAN),
            waiting: Some(f64::INFINITY),
            ..EngineMetrics::default()
        };
        assert!(utilization(&w, 1000, 200, Some(&bad), 0.0, 1.0, &c).is_finite());
    }

    #[test]
    fn seats_are_learned_from_scrapes_and_priced() {
        let scrape = |running: f64, waiting: f64| EngineMetrics {
            running: Some(running),
            waiting: Some(waiting),
            ..EngineMetrics::default()
        };
        // Climbing with a momentary queue: seats to spare.
        let mut a = scrape(100.0, 0.0);
        a.follow(None);
        let mut b = scrape(180.0, 2.0);
        b.follow(Some(&a));
        assert_eq!(b.peak_running, Some(180.0));
        assert_eq!(b.full_seats, None);
        // A queue twice in a row at the peak, not growing: seat-bound at 256.
        let mut c = scrape(256.0, 30.0);
        c.follow(Some(&b));
        let mut d = scrape(256.0, 40.0);
        d.follow(Some(&c));
        assert_eq!(d.full_seats, Some(256.0));
        // Still bound when the batch moves by a seat or two at its peak (requests finish, queued
        // ones take their seats): 254 then 256 running, a queue both times.
        let mut c2 = scrape(254.0, 12.0);
        c2.follow(Some(&d));
        let mut d2 = scrape(256.0, 9.0);
        d2.follow(Some(&c2));
        assert_eq!(d2.full_seats, Some(256.0));
        // But not while it climbs by more than that.
        let mut f = scrape(200.0, 3.0);
        f.follow(None);
        let mut g = scrape(240.0, 3.0);
        g.follow(Some(&f));
        assert_eq!(g.full_seats, None);
        // The peak decays slowly once running falls.
        let mut e = scrape(10.0, 0.0);
        e.follow(Some(&d));
        assert_eq!(
            e.peak_running,
            Some(256.0 * crate::endpoint::PEAK_RUNNING_DECAY)
        );
        assert_eq!(e.full_seats, None);

        // 266 in flight (216 decoding, 50 in prefill of which the engine shows 10 waiting)
        // against 256 seats, finishing 50/s: 11 ahead → 220 ms.
        let mut v = EndpointView::idle(0, 1);
        v.load.in_decode = 216;
        v.load.in_prefill = 50;
        v.observed.qps = 50.0;
        let mut mine = scrape(256.0, 10.0);
        mine.follow(Some(&d));
        mine.full_seats = Some(256.0);
        assert!((seat_wait_ms(&v, Some(&mine), false) - 220.0).abs() < 1e-9);
        // The engine holds more than the router sent (another router's requests, running or
        // waiting): its 256 + 40 count, 41 ahead → 820 ms.
        assert!((seat_wait_ms(&v, Some(&d), false) - 820.0).abs() < 1e-9);
        v.load.in_decode = 100;
        v.load.in_prefill = 0;
        assert!((seat_wait_ms(&v, Some(&d), false) - 820.0).abs() < 1e-9);
        v.load.in_decode = 216;
        v.load.in_prefill = 50;
        assert_eq!(seat_wait_ms(&v, Some(&b), false), 0.0);
        // First in line on a priority-scheduled engine: the next seat, 1/50 s.
        assert!((seat_wait_ms(&v, Some(&d), true) - 20.0).abs() < 1e-9);
        assert_eq!(seat_wait_ms(&v, Some(&b), true), 0.0);
        v.observed.qps = 0.0;
        assert_eq!(seat_wait_ms(&v, Some(&d), false), 0.0);
        // The learned peak raises the request capacity above the configured 64.
        v.engine = Some(d);
        let u = utilization(&v, 0, 0, None, 0.0, 1.0, &cfg());
        assert!((u - 267.0 / 256.0).abs() < 1e-12, "{u}");
    }

    #[test]
    fn andes_hand_values() {
        // On schedule: 1.
        assert_eq!(andes_qoe(300.0, 20.0, 200.0, 300.0, 30.0), 1.0);
        // 1 s late at the reading rate: N/(N + 2rD) = 200/260.
        let q = andes_qoe(1300.0, 20.0, 200.0, 300.0, 30.0);
        assert!((q - 200.0 / 260.0).abs() < 1e-9, "{q}");
        // On time but delivered at half the reading rate: (N²/r) / (1.5 N²/r) = 2/3.
        let q = andes_qoe(300.0, 1000.0 / 15.0, 200.0, 300.0, 30.0);
        assert!((q - 2.0 / 3.0).abs() < 1e-9, "{q}");
        assert!((0.0..=1.0).contains(&andes_qoe(f64::NAN, f64::NAN, 0.0, 0.0, 0.0)));
        assert!((0.0..=1.0).contains(&andes_qoe(1e300, 0.0, 1e300, 1e300, f64::INFINITY)));
    }

    #[test]
    fn performance_hand_values() {
        let c = cfg();
        // Prefill-dominant, TTFT 300 on a 300 target, ITL 50 (target 50), 10 tokens:
        // 0.6·0.5 + 0.1·0.5 + 0.3·(1 − q); q: t_end = 0.3 + 10/20 = 0.8 > 0.3 + 10/30,
        // s_exp = 10·0.5 − 100/60, s_act = 100/40 → q = 2.5/3.3333 = 0.75.
        let p = performance(Phase::PrefillDominant, 300.0, 50.0, 300.0, 10.0, &c);
        let want = 0.6 * 0.5 + 0.1 * 0.5 + 0.3 * 0.25;
        assert!((p - want).abs() < 1e-9, "{p} vs {want}");
        // Decode-dominant, TTFT 150, ITL 25 (rate 40 tok/s ≥ 30: QoE 1):
        // 0.15·s(0.5) + 0.3·s(0.5) + 0.25·s(0.75) + 0.
        let p = performance(Phase::DecodeDominant, 150.0, 25.0, 300.0, 100.0, &c);
        let want = 0.15 * squash(0.5) + 0.3 * squash(0.5) + 0.25 * squash(0.75);
        assert!((p - want).abs() < 1e-9, "{p} vs {want}");
    }

    #[test]
    fn reliability_hand_values() {
        let c = cfg();
        let now = 100_000_000;
        let mut v = EndpointView::idle(0, 1);
        assert_eq!(reliability(&v, now, &c), 0.0);
        v.observed.error_rate = 0.1;
        v.observed.timeout_rate = 0.05;
        v.availability.flaps = 2;
        v.availability.breaker = BreakerState::HalfOpen;
        // Last failure one half-life ago → rec 0.5. Metrics 3 s + 13.5 s old → st 0.5.
        v.observed.last_failure = Some(now - 30_000_000);
        v.engine = Some(EngineMetrics::default());
        v.engine_at = Some(now - 16_500_000);
        let ok = 0.5 * 0.85 * (1.0 - 0.25) * (1.0 - 0.15) * (1.0 - 0.15);
        assert!((reliability(&v, now, &c) - (1.0 - ok)).abs() < 1e-12);
        v.availability = Availability {
            healthy: false,
            ..Availability::default()
        };
        assert_eq!(reliability(&v, now, &c), 1.0);
    }

    #[test]
    fn priority_hand_values_and_direction() {
        let c = cfg(); // fill 0.8
        let p1 = |u| priority(Priority::HIGH, u, 0.0, &c);
        let p2 = |u| priority(Priority::DEFAULT, u, 0.0, &c);
        let p3 = |u| priority(Priority::LOW, u, 0.0, &c);
        assert!((p1(0.4) - 0.25).abs() < 1e-12);
        assert!((p2(0.4) - 0.5).abs() < 1e-12);
        assert!((p3(0.4) - 0.5).abs() < 1e-12);
        assert_eq!(p3(0.8), 0.0);
        assert!((p3(1.5) - 0.5).abs() < 1e-12);
        // Priority 1 prefers the idle endpoint, priority 3 the busy one.
        assert!(p1(0.1) < p1(0.7));
        assert!(p3(0.7) < p3(0.1));
        // Unhealthy-ish endpoints earn priority 3 less.
        assert!(priority(Priority::LOW, 0.7, 0.5, &c) > p3(0.7));
    }
}
