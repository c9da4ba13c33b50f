//! Fault injection: the ways a real engine misbehaves, on demand, so the router's retries, timeouts,
//! circuit breaker and stall detection can be tested against something that actually fails.
//!
//! Set by flags at start and changed at run time with `POST /admin/config` (a partial JSON update;
//! `GET /admin/config` shows the current values). Every decision is drawn from a generator seeded by
//! `--seed` and the request's arrival number, so a run with the same seed and the same request
//! order fails the same requests.

use qoe_sim::rng::{mix64, SplitMix64};
use serde::{Deserialize, Serialize};

/// Current fault settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Faults {
    /// Share of requests answered at once with `error_status`, in OpenAI's error shape.
    pub error_rate: f64,
    /// HTTP status of those errors (400..=599; typically 500 or 503).
    pub error_status: u16,
    /// How long a stalled stream pauses, ms.
    pub stall_ms: u64,
    /// Share of requests whose stream pauses `stall_ms` half-way through (the engine keeps
    /// generating; the tokens arrive in a burst after the pause, as after a network stall).
    pub stall_rate: f64,
    /// Share of requests that are read and never answered (the connection stays open).
    pub hang_rate: f64,
    /// Share of requests whose connection is closed half-way through the answer, without the
    /// final chunk.
    pub crash_rate: f64,
    /// Every iteration takes this many times longer (1.0 = normal).
    pub slowdown: f64,
    /// `/metrics` keeps returning the last snapshot taken before freezing.
    pub freeze_metrics: bool,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            error_rate: 0.0,
            error_status: 500,
            stall_ms: 0,
            stall_rate: 0.0,
            hang_rate: 0.0,
            crash_rate: 0.0,
            slowdown: 1.0,
            freeze_metrics: false,
        }
    }
}

/// A partial update: absent fields keep their value. Unknown fields are refused, so a typo does
/// not silently do nothing.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultsUpdate {
    pub error_rate: Option<f64>,
    pub error_status: Option<u16>,
    pub stall_ms: Option<u64>,
    pub stall_rate: Option<f64>,
    pub hang_rate: Option<f64>,
    pub crash_rate: Option<f64>,
    pub slowdown: Option<f64>,
    pub freeze_metrics: Option<bool>,
}

/// Longest accepted stall (10 minutes): a bound, not a realistic value.
pub const MAX_STALL_MS: u64 = 600_000;

impl Faults {
    /// Checks ranges; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("error_rate", self.error_rate),
            ("stall_rate", self.stall_rate),
            ("hang_rate", self.hang_rate),
            ("crash_rate", self.crash_rate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{name} must be in [0, 1], got {v}"));
            }
        }
        if !(400..=599).contains(&self.error_status) {
            return Err(format!(
                "error_status must be an HTTP error status (400..=599), got {}",
                self.error_status
            ));
        }
        if self.stall_ms > MAX_STALL_MS {
            return Err(format!("stall_ms must be at most {MAX_STALL_MS}"));
        }
        if !(self.slowdown.is_finite() && self.slowdown > 0.0 && self.slowdown <= 1000.0) {
            return Err(format!(
                "slowdown must be in (0, 1000], got {}",
                self.slowdown
            ));
        }
        Ok(())
    }

    /// Applies `u` and validates the result; on error nothing changes.
    pub fn apply(&mut self, u: &FaultsUpdate) -> Result<(), String> {
        let mut next = self.clone();
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = u.$f { next.$f = v; } )* };
        }
        set!(
            error_rate,
            error_status,
            stall_ms,
            stall_rate,
            hang_rate,
            crash_rate,
            slowdown,
            freeze_metrics
        );
        next.validate()?;
        *self = next;
        Ok(())
    }

    /// The faults that hit request number `n` (its arrival order) under `seed`.
    pub fn draw(&self, seed: u64, n: u64) -> FaultDraw {
        let mut r = SplitMix64::new(mix64(seed ^ FAULT_STREAM).wrapping_add(mix64(n)));
        // Always draw all four so one rate does not shift the others' outcomes.
        let (e, h, c, s) = (r.next_f64(), r.next_f64(), r.next_f64(), r.next_f64());
        FaultDraw {
            error: (e < self.error_rate).then_some(self.error_status),
            hang: h < self.hang_rate,
            crash: c < self.crash_rate,
            stall_ms: (s < self.stall_rate && self.stall_ms > 0).then_some(self.stall_ms),
        }
    }
}

/// Separates the fault generator's stream from the other uses of `--seed`.
const FAULT_STREAM: u64 = 0xfa17_5eed_0000_0001;

/// What happens to one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultDraw {
    /// Answer with this status instead.
    pub error: Option<u16>,
    /// Never answer.
    pub hang: bool,
    /// Close the connection half-way.
    pub crash: bool,
    /// Pause the stream half-way for this long, ms.
    pub stall_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_update_validates_atomically() {
        let mut f = Faults::default();
        f.apply(&FaultsUpdate {
            error_rate: Some(0.5),
            error_status: Some(503),
            ..Default::default()
        })
        .unwrap();
        assert_eq!((f.error_rate, f.error_status), (0.5, 503));
        let bad = FaultsUpdate {
            hang_rate: Some(0.1),
            crash_rate: Some(2.0),
            ..Default::default()
        };
        assert!(f.apply(&bad).unwrap_err().contains("crash_rate"));
        assert_eq!(f.hang_rate, 0.0, "nothing applied");
    }

    #[test]
    fn draws_follow_rates_and_seed() {
        let f = Faults {
            error_rate: 0.3,
            crash_rate: 1.0,
            ..Default::default()
        };
        let errors = (0..10_000)
            .filter(|&n| f.draw(9, n).error.is_some())
            .count();
        assert!((2_700..3_300).contains(&errors), "{errors}");
        assert!((0..100).all(|n| f.draw(9, n).crash && !f.draw(9, n).hang));
        assert_eq!(f.draw(9, 5), f.draw(9, 5));
        let differ = (0..100).any(|n| f.draw(9, n).error != f.draw(10, n).error);
        assert!(differ);
    }
}
