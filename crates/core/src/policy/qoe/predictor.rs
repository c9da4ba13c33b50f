//! The latency predictor: per endpoint, two straight lines learned online from router feedback.
//!
//! * **TTFT** = `a + b·x`, with `x` the prompt tokens the engine must prefill before this request's
//!   first token: the router-counted prompt tokens queued ahead (`Load::prefill_tokens` at
//!   dispatch) plus the request's own uncached prompt. `b` is ms per prompt token (1000 / the
//!   prefill rate in tok/s), `a` the base latency (network, scheduling, the first decode step).
//! * **ITL** = `a + b·batch`, with `batch` the requests in flight on the endpoint counting this one:
//!   a decode step's time grows about linearly with the batch (FIELD-NOTES: `a + b·N_tok`).
//!
//! ## The fit: exponentially weighted ridge regression toward a prior
//!
//! Each line is the weighted least-squares fit of the samples seen, each sample's weight multiplied
//! by the forgetting factor `λ` (default 0.97, an effective memory of `1/(1−λ)` ≈ 33 samples) for
//! every newer sample; this is recursive least squares with exponential forgetting, kept as five
//! running sums so an update is O(1) and cannot go numerically unstable (`x` is stored divided by a
//! reference, so the sums stay well scaled). Unlike plain RLS, two *pseudo-observations* of weight
//! [`PRIOR_WEIGHT`] (0.5 sample each) taken from the prior line (at `x = 0` and at `x = x_ref`:
//! 1,024 tokens, 32 requests) stay in the sums forever: with data that does not vary in `x` (every
//! prompt the same size) the slope falls back to the prior instead of winding up, and the 2×2
//! system is never singular; with varied data they bias the line by about 1/33 of the prior's
//! error. Once 5 samples are in, a sample farther from the current line than 4× the running mean
//! absolute residual plus 5% of the prediction is clipped to that distance, so one hiccup does not
//! undo the fit, while a real shift (an engine that slows 3×) moves the line within a few dozen
//! samples as the residual scale grows.
//!
//! Rates are constrained to sane ranges (see the `*_MIN`/`*_MAX` constants): prefill between 10 and
//! 10 million tokens/s, ITL slope non-negative, bases between 0 and a minute.
//!
//! ## Priors: neutral, never "best by default"
//!
//! An endpoint with no samples of its own is predicted with the **fleet prior**: the mean learned
//! line over endpoints with at least [`MATURE_SAMPLES`] samples, or the configured defaults when no
//! endpoint has data (8,000 prompt tokens/s + 20 ms; ITL 20 ms + 0.2 ms per request in the batch,
//! after SGLang's mock engine and the FIELD-NOTES figures). A new endpoint's fit is anchored to the
//! fleet prior of the moment, and an endpoint whose last sample is old drifts back toward the fleet
//! prior: the policy predicts with `prior + w·(learned − prior)`, `w = h / (h + age)` with `h` =
//! `model_half_life_ms` (default 5 min; w = ½ after 5 min, ¼ after 15). An endpoint that was slow
//! once is retried eventually, and one not heard of for long is neither trusted nor shunned.
//!
//! ## Bounds
//!
//! At most `max_tracked_endpoints` (default 4,096) endpoints are remembered; past that the ones
//! heard from least recently are evicted (an eighth of the table at a time, so eviction is amortised
//! O(1)). Nothing grows with the number of requests served.

use crate::Micros;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Weight of each of the two prior pseudo-observations, in samples.
pub const PRIOR_WEIGHT: f64 = 0.5;
/// Samples (effective, after forgetting) before a fit counts toward the fleet prior.
pub const MATURE_SAMPLES: f64 = 3.0;
/// Samples before residual clipping starts.
const CLIP_AFTER: f64 = 5.0;

/// TTFT slope bounds, ms per prompt token: 10M tok/s … 10 tok/s.
pub const TTFT_SLOPE_MIN: f64 = 1e-4;
pub const TTFT_SLOPE_MAX: f64 = 100.0;
/// ITL slope bounds, ms per request in the batch.
pub const ITL_SLOPE_MIN: f64 = 0.0;
pub const ITL_SLOPE_MAX: f64 = 1_000.0;
/// Base latency bounds (both lines), ms.
pub const BASE_MIN: f64 = 0.0;
pub const BASE_MAX: f64 = 60_000.0;
/// Largest sample accepted (ms): anything beyond is a broken measurement.
const SAMPLE_MAX_MS: f64 = 3_600_000.0;
/// Largest `x` accepted (tokens or batch): beyond is a broken input.
const X_MAX: f64 = 1e9;
/// Reference `x` of the TTFT prior's second pseudo-observation (tokens).
pub const TTFT_X_REF: f64 = 1_024.0;
/// Reference `x` of the ITL prior's second pseudo-observation (requests in the batch).
pub const ITL_X_REF: f64 = 32.0;

/// A line `y = a + b·x` and the bounds its coefficients live in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Line {
    /// Intercept (ms).
    pub a: f64,
    /// Slope (ms per unit of x).
    pub b: f64,
}

impl Line {
    pub fn at(self, x: f64) -> f64 {
        self.a + self.b * x
    }

    /// `self` moved toward `other` by `1 − w` (w = 1 keeps `self`).
    pub fn blend(self, other: Line, w: f64) -> Line {
        Line {
            a: other.a + w * (self.a - other.a),
            b: other.b + w * (self.b - other.b),
        }
    }
}

/// Which line a fit learns; gives its bounds and reference x.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Ttft,
    Itl,
}

impl Kind {
    fn slope_bounds(self) -> (f64, f64) {
        match self {
            Kind::Ttft => (TTFT_SLOPE_MIN, TTFT_SLOPE_MAX),
            Kind::Itl => (ITL_SLOPE_MIN, ITL_SLOPE_MAX),
        }
    }

    fn x_ref(self) -> f64 {
        match self {
            Kind::Ttft => TTFT_X_REF,
            Kind::Itl => ITL_X_REF,
        }
    }

    /// Clamps a line into the sane ranges (NaN → the prior's coefficient).
    pub fn sane(self, line: Line, fallback: Line) -> Line {
        let (lo, hi) = self.slope_bounds();
        let fix = |v: f64, fb: f64, lo: f64, hi: f64| {
            if v.is_finite() {
                v.clamp(lo, hi)
            } else if fb.is_finite() {
                fb.clamp(lo, hi)
            } else {
                lo
            }
        };
        Line {
            a: fix(line.a, fallback.a, BASE_MIN, BASE_MAX),
            b: fix(line.b, fallback.b, lo, hi),
        }
    }
}

/// One online line fit (see the module docs). `x` is stored divided by the kind's reference x, so
/// the sums stay well scaled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LineFit {
    kind: Kind,
    prior: Line,
    sw: f64,
    sx: f64,
    sy: f64,
    sxx: f64,
    sxy: f64,
    /// Running mean absolute residual (ms), for clipping.
    resid: f64,
    line: Line,
    /// When the last sample arrived.
    pub last: Micros,
}

impl LineFit {
    pub fn new(kind: Kind, prior: Line) -> Self {
        let prior = kind.sane(prior, prior);
        LineFit {
            kind,
            prior,
            sw: 0.0,
            sx: 0.0,
            sy: 0.0,
            sxx: 0.0,
            sxy: 0.0,
            resid: 0.0,
            line: prior,
            last: 0,
        }
    }

    /// The current fitted line.
    pub fn line(&self) -> Line {
        self.line
    }

    /// Effective number of samples (after forgetting).
    pub fn samples(&self) -> f64 {
        self.sw
    }

    pub fn mature(&self) -> bool {
        self.sw >= MATURE_SAMPLES
    }

    /// Adds the sample `(x, y)` seen at `now`, forgetting older ones by `lambda`. Non-finite,
    /// negative or absurd samples are ignored; returns whether the sample was used.
    pub fn update(&mut self, x: f64, y: f64, lambda: f64, now: Micros) -> bool {
        if !(0.0..=X_MAX).contains(&x) || !(0.0..=SAMPLE_MAX_MS).contains(&y) {
            return false;
        }
        let lambda = if lambda.is_finite() {
            lambda.clamp(0.5, 1.0)
        } else {
            0.97
        };
        let predicted = self.line.at(x);
        let mut y = y;
        if self.sw >= CLIP_AFTER {
            let r = y - predicted;
            let limit = 4.0 * self.resid + 0.05 * predicted.abs() + 1e-3;
            let clipped = r.clamp(-limit, limit);
            y = predicted + clipped;
            self.resid += 0.1 * (r.abs().min(2.0 * limit) - self.resid);
        } else {
            self.resid += 0.5 * ((y - predicted).abs() - self.resid);
        }
        let xs = x / self.kind.x_ref();
        self.sw = self.sw * lambda + 1.0;
        self.sx = self.sx * lambda + xs;
        self.sy = self.sy * lambda + y;
        self.sxx = self.sxx * lambda + xs * xs;
        self.sxy = self.sxy * lambda + xs * y;
        self.last = self.last.max(now);
        self.solve();
        true
    }

    fn solve(&mut self) {
        let k = PRIOR_WEIGHT;
        let (a0, b0s) = (self.prior.a, self.prior.b * self.kind.x_ref());
        // Pseudo-observations: (0, a0) and (1, a0 + b0·x_ref), in scaled x.
        let w = self.sw + 2.0 * k;
        let x = self.sx + k;
        let y = self.sy + k * (2.0 * a0 + b0s);
        let xx = self.sxx + k;
        let xy = self.sxy + k * (a0 + b0s);
        let det = w * xx - x * x;
        let x_ref = self.kind.x_ref();
        let (lo, hi) = self.kind.slope_bounds();
        let (lo, hi) = (lo * x_ref, hi * x_ref);
        let mut bs = if det > 1e-12 {
            (w * xy - x * y) / det
        } else {
            b0s
        };
        if !bs.is_finite() {
            bs = b0s;
        }
        bs = bs.clamp(lo, hi);
        let mut a = (y - bs * x) / w;
        if a < BASE_MIN {
            a = BASE_MIN;
            if xx > 1e-12 {
                bs = ((xy - a * x) / xx).clamp(lo, hi);
            }
        }
        let line = Line { a, b: bs / x_ref };
        self.line = self.kind.sane(line, self.prior);
    }
}

/// What the predictor remembers of one endpoint.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EndpointModel {
    pub ttft: LineFit,
    pub itl: LineFit,
    /// Last feedback of any kind (for eviction).
    pub last_seen: Micros,
    /// Feedback events received (monitoring).
    pub events: u64,
}

/// A hasher for keys that are already well-mixed 64-bit hashes: one multiply-xorshift round
/// instead of SipHash (the table is looked up once per candidate per decision).
#[derive(Default, Clone, Copy, Debug)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        let z = (n ^ (n >> 31)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = z ^ (z >> 29);
    }
}

pub type KeyMap<V> = HashMap<u64, V, BuildHasherDefault<KeyHasher>>;

/// Sums of the mature fits' coefficients, for the fleet prior.
#[derive(Clone, Copy, Debug, Default)]
struct FleetSums {
    n: f64,
    a: f64,
    b: f64,
}

impl FleetSums {
    fn add(&mut self, line: Line, sign: f64) {
        self.n += sign;
        self.a += sign * line.a;
        self.b += sign * line.b;
    }

    fn mean(&self, default: Line) -> Line {
        if self.n >= 0.5 {
            Line {
                a: self.a / self.n,
                b: self.b / self.n,
            }
        } else {
            default
        }
    }
}

/// All endpoints' models, bounded, plus the fleet prior.
#[derive(Debug)]
pub struct ModelTable {
    map: KeyMap<EndpointModel>,
    capacity: usize,
    default_ttft: Line,
    default_itl: Line,
    fleet_ttft: FleetSums,
    fleet_itl: FleetSums,
    /// Updates since the fleet sums were recomputed from scratch (bounds floating-point drift).
    since_recompute: u32,
    /// A model not heard from for this long is dropped when the sums are next recomputed: an
    /// endpoint that left the fleet (a pod replaced, its URL never back) stops shaping the prior.
    forget_after: Micros,
}

impl ModelTable {
    /// A table of at most `capacity` models, forgetting those silent for `forget_after`.
    pub fn new(
        capacity: usize,
        default_ttft: Line,
        default_itl: Line,
        forget_after: Micros,
    ) -> Self {
        ModelTable {
            forget_after: forget_after.max(1),
            map: KeyMap::default(),
            capacity: capacity.max(1),
            default_ttft: Kind::Ttft.sane(default_ttft, default_ttft),
            default_itl: Kind::Itl.sane(default_itl, default_itl),
            fleet_ttft: FleetSums::default(),
            fleet_itl: FleetSums::default(),
            since_recompute: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn get(&self, key: u64) -> Option<&EndpointModel> {
        self.map.get(&key)
    }

    /// The fleet prior for TTFT: mean of mature fits, else the default.
    pub fn prior_ttft(&self) -> Line {
        Kind::Ttft.sane(self.fleet_ttft.mean(self.default_ttft), self.default_ttft)
    }

    /// The fleet prior for ITL.
    pub fn prior_itl(&self) -> Line {
        Kind::Itl.sane(self.fleet_itl.mean(self.default_itl), self.default_itl)
    }

    /// Mature fits counted in the priors (TTFT, ITL).
    pub fn mature_counts(&self) -> (usize, usize) {
        let n = |s: &FleetSums| s.n.round().max(0.0) as usize;
        (n(&self.fleet_ttft), n(&self.fleet_itl))
    }

    /// Iterates over the models (any order).
    pub fn iter(&self) -> impl Iterator<Item = (&u64, &EndpointModel)> {
        self.map.iter()
    }

    /// Adds a TTFT (`kind = Ttft`) or ITL sample for `key`, creating its model if needed.
    pub fn update(&mut self, key: u64, kind: Kind, x: f64, y: f64, lambda: f64, now: Micros) {
        if !self.map.contains_key(&key) {
            self.make_room();
            let model = EndpointModel {
                ttft: LineFit::new(Kind::Ttft, self.prior_ttft()),
                itl: LineFit::new(Kind::Itl, self.prior_itl()),
                last_seen: now,
                events: 0,
            };
            self.map.insert(key, model);
        }
        let Some(model) = self.map.get_mut(&key) else {
            return;
        };
        model.last_seen = model.last_seen.max(now);
        model.events += 1;
        let (fit, sums) = match kind {
            Kind::Ttft => (&mut model.ttft, &mut self.fleet_ttft),
            Kind::Itl => (&mut model.itl, &mut self.fleet_itl),
        };
        let was = fit.mature().then(|| fit.line());
        if !fit.update(x, y, lambda, now) {
            return;
        }
        if let Some(old) = was {
            sums.add(old, -1.0);
        }
        if fit.mature() {
            sums.add(fit.line(), 1.0);
        }
        self.since_recompute += 1;
        if self.since_recompute >= 4096 {
            let forget_after = self.forget_after;
            self.map
                .retain(|_, m| now.saturating_sub(m.last_seen) <= forget_after);
            self.recompute();
        }
    }

    /// Notes that `key` was heard from (feedback without a usable sample), for eviction order.
    pub fn touch(&mut self, key: u64, now: Micros) {
        if let Some(m) = self.map.get_mut(&key) {
            m.last_seen = m.last_seen.max(now);
            m.events += 1;
        }
    }

    fn recompute(&mut self) {
        self.since_recompute = 0;
        self.fleet_ttft = FleetSums::default();
        self.fleet_itl = FleetSums::default();
        for m in self.map.values() {
            if m.ttft.mature() {
                self.fleet_ttft.add(m.ttft.line(), 1.0);
            }
            if m.itl.mature() {
                self.fleet_itl.add(m.itl.line(), 1.0);
            }
        }
    }

    /// Evicts the least recently seen eighth of the table when it is full.
    fn make_room(&mut self) {
        if self.map.len() < self.capacity {
            return;
        }
        let mut seen: Vec<Micros> = self.map.values().map(|m| m.last_seen).collect();
        let drop = (self.capacity / 8).max(1).min(seen.len());
        let (_, cutoff, _) = seen.select_nth_unstable(drop - 1);
        let cutoff = *cutoff;
        let mut removed = 0;
        self.map.retain(|_, m| {
            if removed < drop && m.last_seen <= cutoff {
                removed += 1;
                false
            } else {
                true
            }
        });
        self.recompute();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIOR_T: Line = Line { a: 20.0, b: 0.125 };
    const PRIOR_I: Line = Line { a: 20.0, b: 0.2 };

    #[test]
    fn learns_a_line_from_varied_samples() {
        let mut fit = LineFit::new(Kind::Ttft, PRIOR_T);
        for i in 0..200u64 {
            let x = 100.0 + (i % 20) as f64 * 400.0;
            fit.update(x, 20.0 + x / 16.0, 0.97, i);
        }
        let l = fit.line();
        assert!((l.b - 1.0 / 16.0).abs() < 0.002, "{l:?}");
        assert!((l.a - 20.0).abs() < 4.0, "{l:?}");
        assert!(fit.mature());
    }

    #[test]
    fn constant_x_keeps_the_prior_slope_and_fits_the_point() {
        let mut fit = LineFit::new(Kind::Itl, PRIOR_I);
        for i in 0..500 {
            fit.update(1.0, 40.0, 0.97, i);
        }
        let l = fit.line();
        assert!((l.at(1.0) - 40.0).abs() < 2.0, "{l:?}");
        assert!(l.b.is_finite() && l.b >= 0.0);
    }

    #[test]
    fn rejects_garbage_and_clamps_rates() {
        let mut fit = LineFit::new(Kind::Ttft, PRIOR_T);
        assert!(!fit.update(f64::NAN, 1.0, 0.97, 0));
        assert!(!fit.update(1.0, f64::INFINITY, 0.97, 0));
        assert!(!fit.update(-1.0, 1.0, 0.97, 0));
        assert!(!fit.update(1.0, -1.0, 0.97, 0));
        // Decreasing TTFT with size: slope would be negative; it is clamped positive.
        for i in 0..100u64 {
            let x = (i % 10) as f64 * 1000.0;
            fit.update(x, 5000.0 - x * 0.4, 0.97, i);
        }
        assert!(fit.line().b >= TTFT_SLOPE_MIN);
        assert!(fit.line().a >= 0.0);
    }

    #[test]
    fn tracks_a_slowdown_despite_clipping() {
        let mut fit = LineFit::new(Kind::Ttft, PRIOR_T);
        for i in 0..100u64 {
            let x = 500.0 + (i % 8) as f64 * 500.0;
            fit.update(x, 20.0 + x / 16.0, 0.97, i);
        }
        for i in 100..160u64 {
            let x = 500.0 + (i % 8) as f64 * 500.0;
            fit.update(x, 3.0 * (20.0 + x / 16.0), 0.97, i);
        }
        let l = fit.line();
        assert!((l.at(2000.0) / (3.0 * 145.0) - 1.0).abs() < 0.15, "{l:?}");
    }

    #[test]
    fn table_is_bounded_and_fleet_prior_is_the_mean() {
        let mut t = ModelTable::new(64, PRIOR_T, PRIOR_I, Micros::MAX);
        assert_eq!(t.prior_ttft(), PRIOR_T);
        for k in 0..1000u64 {
            for i in 0..5u64 {
                let x = 1000.0 * (i + 1) as f64;
                t.update(k, Kind::Ttft, x, 10.0 + x / 10.0, 0.97, k * 10 + i);
            }
            assert!(t.len() <= 64);
        }
        let p = t.prior_ttft();
        assert!((p.b - 0.1).abs() < 0.01, "{p:?}");
        // The most recent endpoints survive.
        assert!(t.get(999).is_some());
        assert!(t.get(0).is_none());
    }

    #[test]
    fn endpoints_long_silent_leave_the_fleet_prior() {
        let hour = 3_600_000_000;
        let mut t = ModelTable::new(64, PRIOR_T, PRIOR_I, hour);
        // A slow endpoint, then gone; a fast one keeps reporting.
        for i in 0..10u64 {
            let x = 1000.0 * (i + 1) as f64;
            t.update(1, Kind::Ttft, x, 10.0 + x, 0.97, i);
        }
        let mut now = 10;
        let step = |t: &mut ModelTable, now: u64| {
            let x = 1000.0 * (1 + now % 7) as f64;
            t.update(2, Kind::Ttft, x, 10.0 + x / 10.0, 0.97, now);
        };
        for _ in 0..100 {
            step(&mut t, now);
            now += 1;
        }
        let mixed = t.prior_ttft();
        assert!(mixed.b > 0.3, "both in the mean: {mixed:?}");
        // Past the hour, the next recomputation drops the silent one.
        now += hour;
        for _ in 0..4096 {
            step(&mut t, now);
            now += 1;
        }
        assert!(t.get(1).is_none());
        let p = t.prior_ttft();
        assert!((p.b - 0.1).abs() < 0.01, "only the fast one: {p:?}");
    }
}
