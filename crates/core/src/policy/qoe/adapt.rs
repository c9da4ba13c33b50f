//! Adaptive weights: `(α, β, γ, δ)` follow fleet conditions, smoothed over time, inside bounds.
//!
//! Every decision reports two fleet signals from the candidates it scored: the **prefill pressure**
//! `p = s(mean over candidates of queued-ahead prefill ms / the request's TTFT target)`, in
//! `[0, 1)` (`s(x) = 1 − 2^(−x)`; queued-ahead ms = learned ms per token × queued prompt tokens),
//! and the **saturation** `σ` (mean of `min(1, u)`, `u` the utilization of [`super::cost`]). Feedback reports, per priority, whether the first token
//! met the request's deadline (its SLA, else `target_ttft_ms`); the miss rates `m₁, m₂, m₃` are
//! EWMAs over samples (weight [`MISS_ALPHA`]). At most every [`UPDATE_EVERY`] of `now`, the mean
//! signals since the last update give a target
//!
//! ```text
//! α* = α₀ + 0.3·max(0, σ − 0.5)/0.5        saturation → resource
//! β* = β₀ + 0.3·p + 0.2·m̄                  prefill pressure, any misses → performance (TTFT)
//! γ* = γ₀
//! δ* = δ₀ + 0.3·m₁ + 0.1·m₂                 high-priority misses → priority
//! ```
//!
//! (`α₀..δ₀` the configured weights, `m̄` the mean miss rate over priorities with samples), which is
//! projected onto `{w : min ≤ w ≤ max, Σw = 1}` by the uniform shift `w_i = clamp(w*_i + τ)` that
//! makes the sum 1 (so raising one weight lowers the others evenly, within their bounds). The
//! weights then move toward it as `w += (1 − e^(−Δt/τ_adapt))·(w* − w)`: a convex combination of
//! two points of that set, so the weights never leave their bounds, never go negative and always
//! sum to 1.
//!
//! The same update moves the **decode share** `d` toward `d* = 1 − clamp((σ − σ₀)/(1 − σ₀), 0, 1)`
//! with `σ₀` = [`DECODE_FADE_FROM`] (0.7): the part of the performance term's decode-speed
//! components (ITL, delivery rate, predicted QoE) that a request with a TTFT deadline still pays.
//! Below σ₀ it pays all of it and takes the faster decoder; as the fleet nears saturation the
//! preference fades out, because there every batch seat a fast engine gives to a deadline request
//! for its decode speed is a seat the next deadline waits for (found by the fleet simulator,
//! docs/EVALUATION.md). `d` stays in `[0, 1]` and is 1 with adaptation off.

use crate::Micros;

/// EWMA weight of one SLA sample.
pub const MISS_ALPHA: f64 = 0.05;
/// Minimum time between weight updates (µs of `now`).
pub const UPDATE_EVERY: Micros = 50_000;
/// Fleet saturation from which the decode share fades (see the module docs).
pub const DECODE_FADE_FROM: f64 = 0.7;

/// Bounds made consistent: each `min ≤ base ≤ max`, `Σmin ≤ 1 ≤ Σmax`, all in `[0, 1]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bounds {
    pub min: [f64; 4],
    pub max: [f64; 4],
}

/// Normalizes configured weights: non-finite or negative → 0, then scaled to sum 1 (all zero →
/// the defaults).
pub fn normalize(weights: [f64; 4], default: [f64; 4]) -> [f64; 4] {
    let w = weights.map(|x| if x.is_finite() && x > 0.0 { x } else { 0.0 });
    let sum: f64 = w.iter().sum();
    if sum.is_nan() || sum <= 0.0 || !sum.is_finite() {
        return default;
    }
    if (sum - 1.0).abs() <= 1e-12 {
        return w;
    }
    w.map(|x| x / sum)
}

impl Bounds {
    /// Bounds that contain `base` (a bound excluding it is widened to include it).
    pub fn new(base: [f64; 4], min: [f64; 4], max: [f64; 4]) -> Bounds {
        let mut lo = [0.0; 4];
        let mut hi = [1.0; 4];
        for i in 0..4 {
            let l = if min[i].is_finite() {
                min[i].clamp(0.0, 1.0)
            } else {
                0.0
            };
            let h = if max[i].is_finite() {
                max[i].clamp(0.0, 1.0)
            } else {
                1.0
            };
            lo[i] = l.min(base[i]);
            hi[i] = h.max(base[i]).max(lo[i]);
        }
        // base sums to 1 and lies within, so Σlo ≤ 1 ≤ Σhi holds.
        Bounds { min: lo, max: hi }
    }

    /// Projects `target` onto the bounded simplex by a uniform shift: `w_i = clamp(t_i + τ, min_i,
    /// max_i)` with τ chosen so that `Σw = 1` (exactly, up to rounding: `Σ clamp(t_i + τ)` is
    /// piecewise linear in τ, so τ is found by scanning its 8 breakpoints). A target already in
    /// the set is returned unchanged.
    pub fn project(&self, target: [f64; 4]) -> [f64; 4] {
        let t = target.map(|x| {
            if x.is_finite() {
                x.clamp(-10.0, 10.0)
            } else {
                0.0
            }
        });
        let inside = (0..4).all(|i| t[i] >= self.min[i] && t[i] <= self.max[i]);
        if inside && (t.iter().sum::<f64>() - 1.0).abs() <= 1e-12 {
            return t;
        }
        let at = |tau: f64| -> [f64; 4] {
            std::array::from_fn(|i| (t[i] + tau).clamp(self.min[i], self.max[i]))
        };
        let sum_at = |tau: f64| at(tau).iter().sum::<f64>();
        let mut bps = [0.0f64; 8];
        for i in 0..4 {
            bps[2 * i] = self.min[i] - t[i];
            bps[2 * i + 1] = self.max[i] - t[i];
        }
        bps.sort_unstable_by(f64::total_cmp);
        let mut tau = bps[7];
        if sum_at(bps[0]) >= 1.0 {
            tau = bps[0];
        } else {
            for k in 0..7 {
                let (lo, hi) = (bps[k], bps[k + 1]);
                let (f_lo, f_hi) = (sum_at(lo), sum_at(hi));
                if f_lo <= 1.0 && f_hi >= 1.0 {
                    tau = if f_hi > f_lo {
                        lo + (1.0 - f_lo) * (hi - lo) / (f_hi - f_lo)
                    } else {
                        lo
                    };
                    break;
                }
            }
        }
        let mut w = at(tau);
        // Put the rounding residue on a weight that has room for it.
        let residue = 1.0 - w.iter().sum::<f64>();
        for (wi, (lo, hi)) in w.iter_mut().zip(self.min.iter().zip(&self.max)) {
            let room = if residue > 0.0 { hi - *wi } else { *wi - lo };
            if room >= residue.abs() {
                *wi += residue;
                break;
            }
        }
        w
    }
}

/// Fleet signals accumulated between updates, the SLA miss rates, and the weights.
#[derive(Clone, Debug)]
pub struct Adapt {
    pub base: [f64; 4],
    pub bounds: Bounds,
    pub enabled: bool,
    /// Smoothing time constant (µs).
    pub tau: f64,
    pub weights: [f64; 4],
    /// Target of the last update (for monitoring).
    pub target: [f64; 4],
    /// Per-priority SLA miss rate EWMA and samples seen.
    pub miss: [f64; 3],
    pub miss_samples: [u64; 3],
    /// Mean signals of the last update period (monitoring).
    pub prefill_pressure: f64,
    pub saturation: f64,
    acc_pressure: f64,
    acc_saturation: f64,
    acc_n: f64,
    last_update: Option<Micros>,
    /// EWMA of prompt tokens of routed requests (the "typical prompt").
    pub typical_prompt: f64,
    /// Share of the decode-speed components a request with a TTFT deadline pays, `[0, 1]`.
    pub decode_share: f64,
}

impl Adapt {
    pub fn new(base: [f64; 4], bounds: Bounds, enabled: bool, tau_ms: f64, typical: f64) -> Self {
        let weights = bounds.project(base);
        Adapt {
            base: weights,
            bounds,
            enabled,
            tau: (tau_ms * 1e3).max(1.0),
            weights,
            target: weights,
            miss: [0.0; 3],
            miss_samples: [0; 3],
            prefill_pressure: 0.0,
            saturation: 0.0,
            acc_pressure: 0.0,
            acc_saturation: 0.0,
            acc_n: 0.0,
            last_update: None,
            typical_prompt: typical,
            decode_share: 1.0,
        }
    }

    /// Records an SLA outcome for a priority index (0..3).
    pub fn record_sla(&mut self, priority_index: usize, missed: bool) {
        let i = priority_index.min(2);
        let x = if missed { 1.0 } else { 0.0 };
        self.miss[i] += MISS_ALPHA * (x - self.miss[i]);
        self.miss_samples[i] += 1;
    }

    /// Records one decision's fleet signals and the request's prompt size; updates the weights when
    /// due.
    pub fn observe(&mut self, pressure: f64, saturation: f64, prompt_tokens: u32, now: Micros) {
        if pressure.is_finite() && saturation.is_finite() {
            self.acc_pressure += pressure.clamp(0.0, 1.0);
            self.acc_saturation += saturation.clamp(0.0, 1.0);
            self.acc_n += 1.0;
        }
        self.typical_prompt += 0.01 * (prompt_tokens as f64 - self.typical_prompt);
        if !self.enabled {
            return;
        }
        let due = match self.last_update {
            None => true,
            Some(last) => now.saturating_sub(last) >= UPDATE_EVERY,
        };
        if due {
            self.update(now);
        }
    }

    fn update(&mut self, now: Micros) {
        let dt = match self.last_update {
            None => 0.0,
            Some(last) => now.saturating_sub(last) as f64,
        };
        if let Some(last) = self.last_update {
            if now < last {
                return;
            }
        }
        self.last_update = Some(now);
        if self.acc_n > 0.0 {
            self.prefill_pressure = self.acc_pressure / self.acc_n;
            self.saturation = self.acc_saturation / self.acc_n;
        }
        self.acc_pressure = 0.0;
        self.acc_saturation = 0.0;
        self.acc_n = 0.0;
        let (mut miss_sum, mut miss_n) = (0.0, 0.0);
        for i in 0..3 {
            if self.miss_samples[i] > 0 {
                miss_sum += self.miss[i];
                miss_n += 1.0;
            }
        }
        let mean_miss = if miss_n > 0.0 { miss_sum / miss_n } else { 0.0 };
        let b = self.base;
        let target = [
            b[0] + 0.3 * ((self.saturation - 0.5).max(0.0) / 0.5),
            b[1] + 0.3 * self.prefill_pressure + 0.2 * mean_miss,
            b[2],
            b[3] + 0.3 * self.miss[0] + 0.1 * self.miss[1],
        ];
        self.target = self.bounds.project(target);
        let k = 1.0 - (-dt / self.tau).exp();
        if k.is_nan() || k <= 0.0 {
            return;
        }
        let k = k.min(1.0);
        let fade = (self.saturation - DECODE_FADE_FROM) / (1.0 - DECODE_FADE_FROM);
        let share = 1.0 - fade.clamp(0.0, 1.0);
        self.decode_share = (self.decode_share + k * (share - self.decode_share)).clamp(0.0, 1.0);
        let mut w = [0.0; 4];
        for (i, wi) in w.iter_mut().enumerate() {
            *wi = (self.weights[i] + k * (self.target[i] - self.weights[i]))
                .clamp(self.bounds.min[i], self.bounds.max[i]);
        }
        // Convex combination of two feasible points: the sum is 1 up to rounding; re-project to
        // remove the rounding.
        self.weights = self.bounds.project(w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: [f64; 4] = [0.3, 0.4, 0.2, 0.1];
    const MIN: [f64; 4] = [0.1, 0.2, 0.05, 0.05];
    const MAX: [f64; 4] = [0.6, 0.7, 0.4, 0.3];

    #[test]
    fn projection_keeps_bounds_and_sum() {
        let b = Bounds::new(BASE, MIN, MAX);
        assert_eq!(b.project(BASE), BASE);
        let w = b.project([10.0, -5.0, f64::NAN, 3.0]);
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{w:?}");
        for i in 0..4 {
            assert!(w[i] >= MIN[i] - 1e-12 && w[i] <= MAX[i] + 1e-12, "{w:?}");
        }
        // Uniform shift: the excess 0.2 is taken evenly from all four (0.05 each).
        let w = b.project([0.3, 0.6, 0.2, 0.1]);
        assert!((w[1] - (0.6 - 0.2 / 4.0)).abs() < 1e-9, "{w:?}");
    }

    #[test]
    fn bounds_widen_to_include_the_base() {
        let b = Bounds::new([1.0, 0.0, 0.0, 0.0], MIN, MAX);
        assert_eq!(b.max[0], 1.0);
        assert_eq!(b.min[1], 0.0);
        assert_eq!(b.project([1.0, 0.0, 0.0, 0.0]), [1.0, 0.0, 0.0, 0.0]);
    }

    fn run(a: &mut Adapt, pressure: f64, saturation: f64, periods: u32, now: &mut Micros) {
        for _ in 0..periods {
            a.observe(pressure, saturation, 1000, *now);
            *now += UPDATE_EVERY;
        }
    }

    #[test]
    fn the_decode_share_fades_only_near_saturation() {
        let b = Bounds::new(BASE, MIN, MAX);
        let mut a = Adapt::new(BASE, b, true, 10_000.0, 1000.0);
        let mut now = 0;
        run(&mut a, 0.0, DECODE_FADE_FROM, 4000, &mut now);
        assert_eq!(a.decode_share, 1.0, "untouched up to the fade point");
        // Halfway from the fade point to full saturation: d* = 1/2, reached smoothly.
        run(&mut a, 0.0, (1.0 + DECODE_FADE_FROM) / 2.0, 21, &mut now);
        assert!(
            a.decode_share < 1.0 && a.decode_share > 0.5,
            "{}",
            a.decode_share
        );
        run(&mut a, 0.0, (1.0 + DECODE_FADE_FROM) / 2.0, 4000, &mut now);
        assert!((a.decode_share - 0.5).abs() < 1e-6, "{}", a.decode_share);
        run(&mut a, 0.0, 1.0, 4000, &mut now);
        assert!(a.decode_share < 1e-6, "{}", a.decode_share);
        // Load gone: back to 1.
        run(&mut a, 0.0, 0.2, 4000, &mut now);
        assert!(a.decode_share > 1.0 - 1e-6, "{}", a.decode_share);
        // Adaptation off: always 1.
        let mut off = Adapt::new(BASE, b, false, 10_000.0, 1000.0);
        run(&mut off, 0.0, 1.0, 4000, &mut now);
        assert_eq!(off.decode_share, 1.0);
    }

    #[test]
    fn each_signal_moves_its_weight_smoothly() {
        let b = Bounds::new(BASE, MIN, MAX);
        // Saturation alone → α; partly after 1 s (τ = 10 s), fully after minutes.
        let mut a = Adapt::new(BASE, b, true, 10_000.0, 1000.0);
        let mut now = 0;
        run(&mut a, 0.0, 1.0, 21, &mut now);
        assert!(
            a.weights[0] > BASE[0] && a.weights[0] < a.target[0],
            "{:?}",
            a.weights
        );
        run(&mut a, 0.0, 1.0, 4000, &mut now);
        // Target α* = 0.6 (sum 1.3): δ stops at its minimum 0.05, the other three shift by
        // −0.25/3 each.
        assert!((a.weights[0] - a.target[0]).abs() < 1e-6);
        assert!(
            (a.target[0] - (0.6 - 0.25 / 3.0)).abs() < 1e-9,
            "{:?}",
            a.target
        );
        assert_eq!(a.target[3], MIN[3]);
        // Prefill pressure alone → β.
        let mut a = Adapt::new(BASE, b, true, 10_000.0, 1000.0);
        let mut now = 0;
        run(&mut a, 1.0, 0.0, 4000, &mut now);
        assert!(a.weights[1] > 0.6, "{:?}", a.weights);
        // Priority-1 misses → δ (and β).
        let mut a = Adapt::new(BASE, b, true, 10_000.0, 1000.0);
        for _ in 0..200 {
            a.record_sla(0, true);
            a.record_sla(2, false);
        }
        let mut now = 0;
        run(&mut a, 0.0, 0.0, 4000, &mut now);
        // δ* = 0.1 + 0.3·m₁ ≈ 0.4, β* = 0.4 + 0.2·(m₁ + m₃)/2 ≈ 0.5; the shift τ ≈ −0.1 leaves δ
        // just under its maximum 0.3.
        assert!((a.weights[3] - MAX[3]).abs() < 1e-4, "{:?}", a.weights);
        // β gains on α and γ (the uniform shift takes the excess from all alike).
        assert!(
            a.weights[1] - a.weights[0] > BASE[1] - BASE[0] + 0.05,
            "{:?}",
            a.weights
        );
        // Everything at once: all stays in bounds, the sum is 1, reliability gives way.
        run(&mut a, 1.0, 1.0, 4000, &mut now);
        assert!((a.weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        for i in 0..4 {
            assert!(
                a.weights[i] >= MIN[i] && a.weights[i] <= MAX[i],
                "{:?}",
                a.weights
            );
        }
        assert!((a.weights[2] - MIN[2]).abs() < 1e-6, "{:?}", a.weights);
    }
}
