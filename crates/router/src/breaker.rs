//! A circuit breaker per endpoint: stop sending to an endpoint that keeps failing, probe it with one
//! request after a pause, and trust it again after a few successes.
//!
//! Closed → Open after `failure_threshold` consecutive failures (connect errors, 5xx, timeouts,
//! broken streams). Open → HalfOpen once `open_for` has passed; HalfOpen lets exactly one probe
//! through at a time; `success_threshold` consecutive successes close it, one failure opens it
//! again. The state feeds routing (an Open endpoint is no candidate) and the QoE reliability term.

use qoe_core::{BreakerState, Micros};
use serde::Serialize;

/// Thresholds of a breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BreakerConfig {
    pub failure_threshold: u32,
    pub success_threshold: u32,
    pub open_for: Micros,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            success_threshold: 2,
            open_for: 10_000_000,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Breaker {
    pub state: BreakerState,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
    pub opened_at: Option<Micros>,
    pub probe_in_flight: bool,
    /// Times the breaker opened since start.
    pub opened: u64,
}

impl Breaker {
    /// The state at `now`, moving Open to HalfOpen once the pause is over.
    pub fn state_at(&mut self, now: Micros, config: &BreakerConfig) -> BreakerState {
        if self.state == BreakerState::Open
            && self
                .opened_at
                .is_some_and(|t| now.saturating_sub(t) >= config.open_for)
        {
            self.state = BreakerState::HalfOpen;
            self.consecutive_successes = 0;
            self.probe_in_flight = false;
        }
        self.state
    }

    /// Whether a request may go now; in HalfOpen only when no probe is out.
    pub fn admits(&mut self, now: Micros, config: &BreakerConfig) -> bool {
        match self.state_at(now, config) {
            BreakerState::Closed => true,
            BreakerState::HalfOpen => !self.probe_in_flight,
            BreakerState::Open => false,
        }
    }

    /// A request was dispatched; in HalfOpen it is the probe. Returns whether it is the probe.
    pub fn on_dispatch(&mut self) -> bool {
        if self.state == BreakerState::HalfOpen {
            self.probe_in_flight = true;
            return true;
        }
        false
    }

    /// A probe ended without a verdict (the client left): let another probe go.
    pub fn release_probe(&mut self) {
        self.probe_in_flight = false;
    }

    pub fn on_success(&mut self, config: &BreakerConfig) {
        self.consecutive_failures = 0;
        self.consecutive_successes += 1;
        if self.state == BreakerState::HalfOpen {
            self.probe_in_flight = false;
            if self.consecutive_successes >= config.success_threshold.max(1) {
                self.state = BreakerState::Closed;
                self.opened_at = None;
            }
        }
    }

    pub fn on_failure(&mut self, now: Micros, config: &BreakerConfig) {
        self.consecutive_successes = 0;
        self.consecutive_failures += 1;
        let trip = match self.state {
            BreakerState::Closed => self.consecutive_failures >= config.failure_threshold.max(1),
            BreakerState::HalfOpen => true,
            BreakerState::Open => false,
        };
        if trip {
            self.state = BreakerState::Open;
            self.opened_at = Some(now);
            self.probe_in_flight = false;
            self.opened += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_probes_then_closes() {
        let c = BreakerConfig {
            failure_threshold: 3,
            success_threshold: 2,
            open_for: 1_000,
        };
        let mut b = Breaker::default();
        b.on_failure(1, &c);
        b.on_failure(2, &c);
        assert!(b.admits(3, &c));
        b.on_success(&c);
        b.on_failure(4, &c);
        b.on_failure(5, &c);
        assert_eq!(
            b.state_at(5, &c),
            BreakerState::Closed,
            "a success resets the count"
        );
        b.on_failure(6, &c);
        assert_eq!(b.state_at(6, &c), BreakerState::Open);
        assert!(!b.admits(500, &c));
        // After the pause: one probe at a time.
        assert!(b.admits(1_006, &c));
        assert!(b.on_dispatch());
        assert!(!b.admits(1_007, &c), "one probe at a time");
        b.on_success(&c);
        assert_eq!(b.state, BreakerState::HalfOpen, "needs two successes");
        assert!(b.admits(1_008, &c));
        b.on_dispatch();
        b.on_success(&c);
        assert_eq!(b.state, BreakerState::Closed);
        assert_eq!(b.opened, 1);
    }

    #[test]
    fn a_failed_probe_reopens() {
        let c = BreakerConfig {
            failure_threshold: 1,
            success_threshold: 1,
            open_for: 10,
        };
        let mut b = Breaker::default();
        b.on_failure(0, &c);
        assert!(b.admits(10, &c));
        b.on_dispatch();
        b.on_failure(11, &c);
        assert_eq!(b.state_at(12, &c), BreakerState::Open);
        assert_eq!(b.opened_at, Some(11));
        b.release_probe();
        assert!(!b.admits(15, &c));
        assert!(b.admits(21, &c));
    }
}
