//! How a streamed answer felt: Andes QoE, and DistServe SLO attainment.
//!
//! The router optimises for what the user experiences (DESIGN, principle 2), so the router and the
//! load generator both need to *score* a finished stream from its token arrival times. Two scores,
//! as FIELD-NOTES records them:
//!
//! **Andes QoE** (arXiv 2404.16283). A request expects its first token after `T0` and then `r`
//! tokens per second, the pace a person reads: the expected timeline is
//! `E(t) = min(N, max(0, r·(t − T0)))`. The actual timeline `A(t)` counts tokens the user has
//! *read*: arriving tokens wait in a buffer that releases them no faster than `r`. QoE is
//! `min(1, S_actual / S_expected)`, the ratio of the areas under the two curves up to the time
//! the last token is read. A slow first token or a mid-stream stall lowers it; delivering faster
//! than a person reads earns nothing. Andes counts QoE ≥ 0.9 ([`ACCEPTABLE_QOE`]) as acceptable.
//!
//! How it is computed here, in O(1) per token and no storage: token `i` (1-based) arriving at `tᵢ`
//! starts being read at `sᵢ = max(tᵢ, sᵢ₋₁ + 1/r)` and is read over `[sᵢ, sᵢ + 1/r]`, so `A`
//! ramps like `E` does (a stream arriving exactly on schedule, `tᵢ = eᵢ = T0 + (i−1)/r`, gives
//! `A = E` and QoE 1). Over `[0, T_end]`, each token contributes `T_end − sᵢ − 1/(2r)` to the
//! area, hence
//!
//! ```text
//! S_exp = N·(T_end − T0) − N²/(2r)        (= N²/(2r) on schedule, T_end = T0 + N/r)
//! S_act = S_exp − Σ (sᵢ − eᵢ)             T_end = max(s_N + 1/r, T0 + N/r)
//! ```
//!
//! and only the running lag `Σ (sᵢ − eᵢ)`, `N` and `s_N` need keeping ([`QoeAccumulator`]).
//!
//! A token read ahead of its schedule (`sᵢ < eᵢ`, a first token before `T0`) adds area, as the
//! definition's `min(1, ·)` implies: a fast start offsets part of a later stall before the cap
//! applies. Clipping the read curve at the expected one instead (each lag `max(0, sᵢ − eᵢ)`)
//! would give a stall less forgiving scores (a 2 s stall after 5 early tokens of 100: 0.56
//! against 0.72).
//!
//! **DistServe SLO attainment** (OSDI'24): a request attains its SLO when `TTFT ≤ X` and
//! `TPOT ≤ Y`, with `TPOT = (t_last − t_first)/(n_out − 1)`; goodput is the highest rate at which
//! at least 90% of requests attain it ([`GOODPUT_ATTAINMENT`]).
//!
//! Every function returns a finite number for any input: times are clamped to `[0, 1e9]` s
//! (`NaN` reads as 0), `r` to `[1e-3, 1e9]` tokens/s.

use crate::Micros;

/// Andes' threshold for an acceptable experience.
pub const ACCEPTABLE_QOE: f64 = 0.9;

/// DistServe's goodput criterion: the share of requests that must attain their SLO.
pub const GOODPUT_ATTAINMENT: f64 = 0.9;

const MAX_TIME_S: f64 = 1e9;
const MIN_RATE: f64 = 1e-3;
const MAX_RATE: f64 = 1e9;

/// What the user expects of a stream: the expected TTFT `T0` and reading speed `r`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QoeParams {
    /// `T0`, seconds after the request is sent.
    pub ttft_s: f64,
    /// `r`, tokens per second.
    pub tokens_per_s: f64,
}

impl Default for QoeParams {
    /// 300 ms and 30 tokens/s, the router's `target_ttft` and `optimal_throughput` defaults
    /// (FIELD-NOTES).
    fn default() -> Self {
        QoeParams {
            ttft_s: 0.3,
            tokens_per_s: 30.0,
        }
    }
}

/// Andes QoE of a stream whose tokens arrived at `arrivals_s` (seconds since the request was
/// sent, in arrival order). 0 for an empty stream: nothing reached the user.
pub fn andes_qoe(arrivals_s: &[f64], params: QoeParams) -> f64 {
    let mut acc = QoeAccumulator::new(params);
    for &t in arrivals_s {
        acc.push(t);
    }
    acc.finish()
}

/// [`andes_qoe`] with arrival times in microseconds since the request was sent.
pub fn andes_qoe_micros(arrivals: &[Micros], params: QoeParams) -> f64 {
    let mut acc = QoeAccumulator::new(params);
    for &t in arrivals {
        acc.push_micros(t);
    }
    acc.finish()
}

/// Streaming form of [`andes_qoe`]: push arrivals as tokens come, read the score at any time.
/// Also tracks what DistServe's SLO needs ([`QoeAccumulator::ttft`], [`QoeAccumulator::tpot`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QoeAccumulator {
    t0: f64,
    /// Seconds to read one token, `1/r`.
    dt: f64,
    /// Tokens pushed.
    n: u64,
    /// When the reader is free for the next token: `s_N + 1/r`.
    reader_free: f64,
    /// `Σ (sᵢ − eᵢ)`, seconds·tokens.
    lag: f64,
    first: Option<f64>,
    last: f64,
}

impl QoeAccumulator {
    pub fn new(params: QoeParams) -> Self {
        let r = if params.tokens_per_s.is_nan() {
            QoeParams::default().tokens_per_s
        } else {
            params.tokens_per_s.clamp(MIN_RATE, MAX_RATE)
        };
        QoeAccumulator {
            t0: clean_time(params.ttft_s),
            dt: 1.0 / r,
            n: 0,
            reader_free: 0.0,
            lag: 0.0,
            first: None,
            last: 0.0,
        }
    }

    /// One token arrived at `arrival_s` seconds after the request was sent.
    pub fn push(&mut self, arrival_s: f64) {
        self.push_n(arrival_s, 1);
    }

    /// `tokens` tokens arrived together (one SSE chunk) at `arrival_s`.
    pub fn push_n(&mut self, arrival_s: f64, tokens: u64) {
        if tokens == 0 {
            return;
        }
        let t = clean_time(arrival_s);
        if self.first.is_none() {
            self.first = Some(t);
        }
        self.last = t;
        // The batch is read back to back from `s`; the expected times advance by the same 1/r,
        // so every token of it lags by the same `s − e`.
        let s = t.max(self.reader_free);
        let e = self.t0 + self.n as f64 * self.dt;
        let k = tokens as f64;
        self.lag += k * (s - e);
        self.reader_free = s + k * self.dt;
        self.n = self.n.saturating_add(tokens);
    }

    /// [`QoeAccumulator::push`] with the arrival in microseconds.
    pub fn push_micros(&mut self, arrival: Micros) {
        self.push_n(micros_to_s(arrival), 1);
    }

    /// [`QoeAccumulator::push_n`] with the arrival in microseconds.
    pub fn push_n_micros(&mut self, arrival: Micros, tokens: u64) {
        self.push_n(micros_to_s(arrival), tokens);
    }

    /// Tokens pushed so far.
    pub fn tokens(&self) -> u64 {
        self.n
    }

    /// Arrival of the first token, seconds.
    pub fn ttft(&self) -> Option<f64> {
        self.first
    }

    /// DistServe's time per output token so far (see [`tpot`]); `None` before the first token.
    pub fn tpot(&self) -> Option<f64> {
        self.first.map(|f| tpot(f, self.last, self.n))
    }

    /// Whether the stream so far attains a DistServe SLO (a stream with no token does not).
    pub fn slo_met(&self, slo: Slo) -> bool {
        match (self.ttft(), self.tpot()) {
            (Some(ttft), Some(tpot)) => slo.met(ttft, tpot),
            _ => false,
        }
    }

    /// The QoE of the stream if it ended now, in `[0, 1]`; 0 with no token.
    pub fn finish(&self) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        let n = self.n as f64;
        let t_end = self.reader_free.max(self.t0 + n * self.dt);
        let s_exp = n * (t_end - self.t0) - n * n * self.dt / 2.0;
        if !s_exp.is_finite() || s_exp <= 0.0 {
            return 0.0;
        }
        let q = (s_exp - self.lag) / s_exp;
        if q.is_nan() {
            0.0
        } else {
            q.clamp(0.0, 1.0)
        }
    }
}

fn clean_time(t: f64) -> f64 {
    if t.is_nan() {
        0.0
    } else {
        t.clamp(0.0, MAX_TIME_S)
    }
}

fn micros_to_s(t: Micros) -> f64 {
    t as f64 / crate::MICROS_PER_SEC as f64
}

/// DistServe's time per output token: `(t_last − t_first)/(n_out − 1)`. 0 for one token or none
/// (there is no inter-token gap to miss); never negative or non-finite for finite inputs.
pub fn tpot(t_first: f64, t_last: f64, n_out: u64) -> f64 {
    if n_out <= 1 {
        return 0.0;
    }
    let span = clean_time(t_last) - clean_time(t_first);
    span.max(0.0) / (n_out - 1) as f64
}

/// Whether a request attains its SLO: `ttft ≤ ttft_slo` and `tpot ≤ tpot_slo` (any `NaN` fails).
pub fn slo_met(ttft: f64, tpot: f64, ttft_slo: f64, tpot_slo: f64) -> bool {
    ttft <= ttft_slo && tpot <= tpot_slo
}

/// A DistServe latency SLO, seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Slo {
    pub ttft_s: f64,
    pub tpot_s: f64,
}

impl Slo {
    /// DistServe's chatbot SLO (13B model): TTFT 0.25 s, TPOT 0.1 s.
    pub const CHATBOT: Slo = Slo {
        ttft_s: 0.25,
        tpot_s: 0.1,
    };

    /// See [`slo_met`].
    pub fn met(&self, ttft: f64, tpot: f64) -> bool {
        slo_met(ttft, tpot, self.ttft_s, self.tpot_s)
    }
}

/// Share of requests that attained their SLO, in `[0, 1]` (1 for no requests: nothing was missed).
pub fn attainment(met: u64, total: u64) -> f64 {
    if total == 0 {
        1.0
    } else {
        met.min(total) as f64 / total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: QoeParams = QoeParams {
        ttft_s: 0.3,
        tokens_per_s: 30.0,
    };

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    /// Token i (0-based) of a stream starting at `first` at rate `rate`.
    fn paced(n: usize, first: f64, rate: f64) -> Vec<f64> {
        (0..n).map(|i| first + i as f64 / rate).collect()
    }

    #[test]
    fn on_schedule_is_one() {
        for n in [1, 2, 10, 100, 5000] {
            let q = andes_qoe(&paced(n, 0.3, 30.0), P);
            assert!(close(q, 1.0), "n={n}: {q}");
        }
    }

    #[test]
    fn faster_than_reading_earns_nothing_more() {
        // Everything at once, on time or early: read at r from T0 at best.
        assert!(close(andes_qoe(&[0.3; 50], P), 1.0));
        assert_eq!(andes_qoe(&[0.0; 50], P), 1.0);
        assert_eq!(andes_qoe(&paced(50, 0.1, 1000.0), P), 1.0);
    }

    #[test]
    fn first_token_late_by_t0() {
        // First token at 2·T0, then paced at r: lag N·T0, S_exp = N·T0 + N²/(2r),
        // QoE = N / (2·r·T0 + N).
        for n in [1usize, 10, 100, 1000] {
            let q = andes_qoe(&paced(n, 0.6, 30.0), P);
            let want = n as f64 / (2.0 * 30.0 * 0.3 + n as f64);
            assert!(close(q, want), "n={n}: {q} vs {want}");
        }
        assert!(close(andes_qoe(&paced(100, 0.6, 30.0), P), 100.0 / 118.0));
    }

    #[test]
    fn a_stall_mid_stream_lowers_qoe() {
        // 60 tokens on schedule, with a D-second stall before token 31:
        // lag 30·D, S_exp = 60 + 60·D, QoE = (60 + 30·D) / (60 + 60·D).
        for d in [0.5, 1.0, 3.0] {
            let mut a = paced(60, 0.3, 30.0);
            for t in &mut a[30..] {
                *t += d;
            }
            let q = andes_qoe(&a, P);
            assert!(close(q, (60.0 + 30.0 * d) / (60.0 + 60.0 * d)), "{d}: {q}");
        }
        let mut a = paced(60, 0.3, 30.0);
        for t in &mut a[30..] {
            *t += 1.0;
        }
        assert!(close(andes_qoe(&a, P), 0.75));
        // A stall shorter than the buffered slack costs nothing: tokens that came early cover it.
        let mut early = paced(60, 0.3, 60.0);
        for t in &mut early[30..] {
            *t += 0.4;
        }
        assert!(close(andes_qoe(&early, P), 1.0));
    }

    #[test]
    fn slow_delivery() {
        // Paced at r/2 from T0: QoE = (N² − N/2) / (1.5·N² − N), tending to 2/3.
        let q = andes_qoe(&paced(10, 0.3, 15.0), P);
        assert!(close(q, 95.0 / 140.0), "{q}");
        let q = andes_qoe(&paced(10_000, 0.3, 15.0), P);
        assert!((q - 2.0 / 3.0).abs() < 1e-4);
        assert!(q < ACCEPTABLE_QOE);
    }

    #[test]
    fn zero_and_one_token() {
        assert_eq!(andes_qoe(&[], P), 0.0);
        assert_eq!(QoeAccumulator::new(P).finish(), 0.0);
        assert!(close(andes_qoe(&[0.3], P), 1.0));
        assert_eq!(andes_qoe(&[0.01], P), 1.0);
        // One token 1 s late: (1/(2r)) / (1 + 1/(2r)) = 1/61.
        assert!(close(andes_qoe(&[1.3], P), 1.0 / 61.0));
    }

    #[test]
    fn micros_and_batches_agree_with_seconds() {
        let secs = [0.45, 0.5, 0.5, 0.5, 0.61, 2.0, 2.0, 2.04];
        let micros: Vec<Micros> = secs.iter().map(|s| (s * 1e6) as Micros).collect();
        let q = andes_qoe(&secs, P);
        assert!(close(andes_qoe_micros(&micros, P), q));
        let mut acc = QoeAccumulator::new(P);
        acc.push_n(0.45, 1);
        acc.push_n(0.5, 3);
        acc.push_n_micros(610_000, 1);
        acc.push_n(2.0, 2);
        acc.push_micros(2_040_000);
        acc.push_n(5.0, 0);
        assert_eq!(acc.tokens(), 8);
        assert!(close(acc.finish(), q));
        assert_eq!(acc.ttft(), Some(0.45));
        assert!(close(acc.tpot().unwrap(), (2.04 - 0.45) / 7.0));
    }

    #[test]
    fn distserve_slo() {
        assert_eq!(tpot(0.2, 1.2, 11), 0.1);
        assert_eq!(tpot(0.2, 0.2, 1), 0.0);
        assert_eq!(tpot(0.2, 9.0, 0), 0.0);
        assert_eq!(
            tpot(1.0, 0.5, 3),
            0.0,
            "out of order times do not go negative"
        );
        assert!(slo_met(0.25, 0.1, 0.25, 0.1), "bounds are inclusive");
        assert!(!slo_met(0.26, 0.05, 0.25, 0.1));
        assert!(!slo_met(0.1, 0.11, 0.25, 0.1));
        assert!(!slo_met(f64::NAN, 0.0, 0.25, 0.1));
        assert!(Slo::CHATBOT.met(0.2, 0.09));
        let mut acc = QoeAccumulator::new(P);
        assert!(!acc.slo_met(Slo::CHATBOT), "no token, no SLO");
        acc.push(0.2);
        assert!(acc.slo_met(Slo::CHATBOT));
        acc.push(0.25);
        acc.push(0.5);
        assert!(close(acc.tpot().unwrap(), 0.15));
        assert!(!acc.slo_met(Slo::CHATBOT));
        assert_eq!(attainment(9, 10), 0.9);
        assert_eq!(attainment(0, 0), 1.0);
        assert_eq!(attainment(5, 3), 1.0);
    }

    #[test]
    fn hostile_inputs_stay_finite() {
        let weird = [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -1.0,
            1e300,
            0.0,
            f64::MIN_POSITIVE,
        ];
        for &t0 in &weird {
            for &r in &weird {
                let p = QoeParams {
                    ttft_s: t0,
                    tokens_per_s: r,
                };
                let q = andes_qoe(&weird, p);
                assert!((0.0..=1.0).contains(&q), "t0={t0} r={r}: {q}");
            }
        }
        assert!(tpot(f64::NAN, f64::INFINITY, 5).is_finite());
        let mut acc = QoeAccumulator::new(P);
        acc.push_n(1.0, u64::MAX);
        acc.push_n(2.0, u64::MAX);
        assert!((0.0..=1.0).contains(&acc.finish()));
    }

    proptest! {
        #[test]
        fn always_in_unit_interval(
            arrivals in prop::collection::vec(any::<f64>(), 0..200),
            t0 in any::<f64>(),
            r in any::<f64>(),
        ) {
            let q = andes_qoe(&arrivals, QoeParams { ttft_s: t0, tokens_per_s: r });
            prop_assert!((0.0..=1.0).contains(&q));
        }

        #[test]
        fn never_late_means_one(
            gaps in prop::collection::vec(0.0f64..0.5, 1..300),
            t0 in 0.0f64..5.0,
            r in 0.5f64..200.0,
        ) {
            // Each token no later than its expected time eᵢ = T0 + (i−1)/r.
            let arrivals: Vec<f64> = gaps
                .iter()
                .enumerate()
                .map(|(i, g)| (t0 + i as f64 / r - g).max(0.0))
                .collect();
            let q = andes_qoe(&arrivals, QoeParams { ttft_s: t0, tokens_per_s: r });
            prop_assert!(q > 1.0 - 1e-9, "{}", q);
        }

        #[test]
        fn a_late_first_token_costs(late in 0.05f64..30.0, n in 1usize..500) {
            let q = andes_qoe(&paced(n, 0.3 + late, 30.0), P);
            let want = n as f64 / (2.0 * 30.0 * late + n as f64);
            prop_assert!((q - want).abs() < 1e-6, "{} vs {}", q, want);
            prop_assert!(q < 1.0);
        }

        #[test]
        fn batches_equal_single_pushes(
            chunks in prop::collection::vec((0.0f64..10.0, 0u64..5), 0..50),
        ) {
            let mut t = 0.0;
            let mut a = QoeAccumulator::new(P);
            let mut b = QoeAccumulator::new(P);
            let mut flat = vec![];
            for (gap, k) in &chunks {
                t += gap;
                a.push_n(t, *k);
                for _ in 0..*k {
                    b.push(t);
                    flat.push(t);
                }
            }
            prop_assert_eq!(a.tokens(), b.tokens());
            prop_assert!((a.finish() - b.finish()).abs() < 1e-9);
            prop_assert!((a.finish() - andes_qoe(&flat, P)).abs() < 1e-9);
        }

        #[test]
        fn scale_invariant(
            gaps in prop::collection::vec(0.0f64..1.0, 1..100),
            c in 0.1f64..10.0,
        ) {
            // Stretching time by c (and the reading speed by 1/c) changes nothing.
            let mut t = 0.0;
            let arrivals: Vec<f64> = gaps.iter().map(|g| { t += g; t }).collect();
            let scaled: Vec<f64> = arrivals.iter().map(|a| a * c).collect();
            let q1 = andes_qoe(&arrivals, P);
            let q2 = andes_qoe(&scaled, QoeParams { ttft_s: 0.3 * c, tokens_per_s: 30.0 / c });
            prop_assert!((q1 - q2).abs() < 1e-6, "{} vs {}", q1, q2);
        }
    }
}
