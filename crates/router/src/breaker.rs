//! A circuit breaker per endpoint: stop sending to an endpoint that keeps failing, probe it with one
//! request after a pause, and trust it again after a few successes.
//!
//! Closed → Open after `failure_threshold` consecutive failures (connect errors, 5xx, timeouts,
//! 429s, broken streams: an engine answering 429 asks to be left alone, and is, until its probe). Open → HalfOpen once `open_for` has passed; HalfOpen lets exactly one probe
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

    /// How long until an open breaker lets a probe through (0 when it is not open).
    pub fn reopens_in(&self, now: Micros, config: &BreakerConfig) -> Micros {
        match (self.state, self.opened_at) {
            (BreakerState::Open, Some(t)) => config.open_for.saturating_sub(now.saturating_sub(t)),
            _ => 0,
        }
    }

    /// Whether a request may go now; in HalfOpen only when no probe is out.
    pub fn admits(&mut self, now: Micros, config: &BreakerConfig) -> bool {
        match self.state_at(now, config) {
            BreakerState::Closed => true,
            BreakerState::HalfOpen => !self.probe_in_flight,
            BreakerState::Open => false,
        }
    }

    /// Lets a request go if the breaker admits it at `now` (what [`Breaker::admits`] tells, checked
    /// and taken at once): in HalfOpen it is then the probe. Its verdict goes back with the
    /// returned ticket; `None` when it may not go (open, or another request is the probe).
    pub fn try_dispatch(&mut self, now: Micros, config: &BreakerConfig) -> Option<Dispatch> {
        if !self.admits(now, config) {
            return None;
        }
        let probe = self.state == BreakerState::HalfOpen;
        self.probe_in_flight |= probe;
        Some(Dispatch {
            probe,
            epoch: self.opened,
        })
    }

    /// Whether `ticket`'s verdict says something about the current state: in Closed every
    /// request's does; in HalfOpen only the probe's (a request sent before the breaker opened,
    /// or one that slipped past the probe check, tells nothing about the endpoint now); in Open
    /// none.
    fn counts(&self, ticket: &Dispatch) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::HalfOpen => ticket.probe && ticket.epoch == self.opened,
            BreakerState::Open => false,
        }
    }

    /// A request ended without a verdict (the client left): if it was the probe, let another go.
    pub fn release(&mut self, ticket: &Dispatch) {
        if self.counts(ticket) && ticket.probe {
            self.probe_in_flight = false;
        }
    }

    pub fn on_success(&mut self, ticket: &Dispatch, config: &BreakerConfig) {
        if !self.counts(ticket) {
            return;
        }
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

    pub fn on_failure(&mut self, ticket: &Dispatch, now: Micros, config: &BreakerConfig) {
        if !self.counts(ticket) {
            return;
        }
        self.consecutive_successes = 0;
        self.consecutive_failures += 1;
        let trip = match self.state {
            BreakerState::Closed => self.consecutive_failures >= config.failure_threshold.max(1),
            _ => true,
        };
        if trip {
            self.state = BreakerState::Open;
            self.opened_at = Some(now);
            self.probe_in_flight = false;
            self.opened += 1;
        }
    }
}

/// What [`Breaker::try_dispatch`] hands a request, for its verdict.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dispatch {
    /// This request is the half-open probe.
    pub probe: bool,
    /// The breaker's `opened` count when it was sent.
    pub epoch: u64,
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
        let closed = b.try_dispatch(0, &c).unwrap();
        b.on_failure(&closed, 1, &c);
        b.on_failure(&closed, 2, &c);
        assert!(b.admits(3, &c));
        b.on_success(&closed, &c);
        b.on_failure(&closed, 4, &c);
        b.on_failure(&closed, 5, &c);
        assert_eq!(
            b.state_at(5, &c),
            BreakerState::Closed,
            "a success resets the count"
        );
        b.on_failure(&closed, 6, &c);
        assert_eq!(b.state_at(6, &c), BreakerState::Open);
        assert!(!b.admits(500, &c));
        // After the pause: one probe at a time.
        assert!(b.admits(1_006, &c));
        let probe = b.try_dispatch(1_006, &c).unwrap();
        assert!(probe.probe);
        assert!(!b.admits(1_007, &c), "one probe at a time");
        assert_eq!(b.try_dispatch(1_007, &c), None);
        // A request sent while it was closed ends now: its verdict does not count.
        b.on_success(&closed, &c);
        b.release(&closed);
        assert!(b.probe_in_flight);
        b.on_success(&probe, &c);
        assert_eq!(b.state, BreakerState::HalfOpen, "needs two successes");
        assert!(b.admits(1_008, &c));
        let second = b.try_dispatch(1_008, &c).unwrap();
        b.on_success(&second, &c);
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
        let before = b.try_dispatch(0, &c).unwrap();
        let slow = b.try_dispatch(0, &c).unwrap();
        b.on_failure(&before, 0, &c);
        assert_eq!(b.try_dispatch(5, &c), None, "open");
        assert!(b.admits(10, &c));
        let probe = b.try_dispatch(10, &c).unwrap();
        // A request sent before the breaker opened ends now: it says nothing of the probe.
        b.on_success(&slow, &c);
        b.release(&slow);
        assert!(!b.admits(10, &c) && b.state == BreakerState::HalfOpen);
        b.on_failure(&probe, 11, &c);
        assert_eq!(b.state_at(12, &c), BreakerState::Open);
        assert_eq!(b.opened_at, Some(11));
        b.release(&probe);
        assert!(!b.admits(15, &c));
        assert!(b.admits(21, &c));
        // A probe whose client left frees the seat for the next.
        let left = b.try_dispatch(21, &c).unwrap();
        assert!(left.probe && !b.admits(22, &c));
        b.release(&left);
        assert!(b.admits(22, &c));
    }
}
