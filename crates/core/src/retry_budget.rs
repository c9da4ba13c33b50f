//! The retry budget: how many retries the router may add to the requests it was sent.
//!
//! Retrying a failed attempt on another endpoint is right when one engine fails; when the whole
//! fleet fails because it is overloaded (every engine answering 503 or timing out), each request
//! retried `--max-retries` times multiplies the load on engines failing under load, and the
//! fleet cannot recover (a retry storm). So retries are budgeted, as Linkerd and Finagle do: over
//! the last [`WINDOW_SECS`] seconds, retries may be at most `ratio` of the requests that arrived,
//! plus `min_per_sec` per second so that a quiet router still retries a lone failure. Past the
//! budget a failure is answered as if no retry were left: the engine's error passes through.
//!
//! Counts are kept per second in a ring of [`WINDOW_SECS`] slots: bounded, and exact in
//! integers (a ratio of 0.1 allows one retry per ten requests, not one per 10.000001).

use crate::{Micros, MICROS_PER_SEC};
use std::sync::Mutex;

/// The budget's window: retries and requests of this many most recent seconds count.
pub const WINDOW_SECS: usize = 10;

/// Settings: `ratio` of the window's requests may be retried, plus `min_per_sec` retries per
/// second of window. Both 0: no retries at all.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryBudgetConfig {
    pub ratio: f64,
    pub min_per_sec: f64,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig {
            ratio: 0.2,
            min_per_sec: 10.0,
        }
    }
}

/// Fixed-point unit of the ratio and the floor: millionths, so that any ratio the settings
/// accept above 1e-6 counts.
const UNIT: u64 = 1_000_000;

/// Requests and retries over the last [`WINDOW_SECS`] seconds, and whether one more retry fits.
#[derive(Debug)]
pub struct RetryBudget {
    /// The ratio in millionths.
    ratio_micro: u64,
    /// The floor over the whole window, in millionths of a retry.
    floor_micro: u64,
    window: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    /// Per second: (requests, retries); slot `second % WINDOW_SECS`.
    slots: [(u64, u64); WINDOW_SECS],
    /// The second the newest slot counts.
    second: u64,
}

impl Window {
    /// Moves the window to `now`, emptying the slots of seconds that went by.
    fn advance(&mut self, now: Micros) -> &mut (u64, u64) {
        let second = now / MICROS_PER_SEC;
        if second > self.second {
            let gone = (second - self.second).min(WINDOW_SECS as u64);
            for s in 0..gone {
                self.slots[((second - s) % WINDOW_SECS as u64) as usize] = (0, 0);
            }
            self.second = second;
        }
        // A `now` behind the window's (another thread's clock read) counts in the newest slot.
        &mut self.slots[(self.second % WINDOW_SECS as u64) as usize]
    }

    fn totals(&self) -> (u64, u64) {
        self.slots
            .iter()
            .fold((0, 0), |(q, r), &(sq, sr)| (q + sq, r + sr))
    }
}

impl RetryBudget {
    pub fn new(config: RetryBudgetConfig) -> Self {
        // NaN and what is not positive: nothing; infinity: without limit.
        let micro = |x: f64| {
            if x > 0.0 {
                (x * UNIT as f64).round().min(u64::MAX as f64 / 4.0) as u64
            } else {
                0
            }
        };
        RetryBudget {
            ratio_micro: micro(config.ratio),
            floor_micro: micro(config.min_per_sec).saturating_mul(WINDOW_SECS as u64),
            window: Mutex::new(Window::default()),
        }
    }

    /// Counts a request sent (its first attempt; one refused before it is sent is not counted).
    pub fn record_request(&self, now: Micros) {
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        window.advance(now).0 += 1;
    }

    /// Whether one more retry fits the budget; if so it is counted.
    pub fn try_retry(&self, now: Micros) -> bool {
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        window.advance(now);
        let (requests, retries) = window.totals();
        let allowed = requests
            .saturating_mul(self.ratio_micro)
            .saturating_add(self.floor_micro);
        if retries.saturating_add(1).saturating_mul(UNIT) > allowed {
            return false;
        }
        window.advance(now).1 += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(ratio: f64, min_per_sec: f64) -> RetryBudget {
        RetryBudget::new(RetryBudgetConfig { ratio, min_per_sec })
    }

    #[test]
    fn retries_are_a_share_of_the_requests() {
        let b = budget(0.1, 0.0);
        let mut granted = 0;
        for i in 0..50u64 {
            b.record_request(i * 1_000);
            granted += b.try_retry(i * 1_000) as u32;
        }
        // One per ten requests: at the 10th, 20th, ... 50th.
        assert_eq!(granted, 5);
        assert!(!b.try_retry(50_000));
        // A small ratio is not rounded away: 0.0004 of 10,000 requests is 4 retries.
        let b = budget(0.0004, 0.0);
        for _ in 0..10_000 {
            b.record_request(0);
        }
        assert_eq!((0..10).filter(|_| b.try_retry(0)).count(), 4);
    }

    #[test]
    fn the_floor_lets_a_quiet_router_retry() {
        let b = budget(0.2, 1.0);
        // Ten seconds of floor, no request at all.
        let granted = (0..20).filter(|_| b.try_retry(0)).count();
        assert_eq!(granted, WINDOW_SECS);
        assert!(!budget(0.0, 0.0).try_retry(0));
    }

    #[test]
    fn what_the_window_forgets_frees_the_budget() {
        let b = budget(0.0, 0.1);
        assert!(b.try_retry(0));
        assert!(!b.try_retry(5 * MICROS_PER_SEC));
        // Ten seconds on, the first retry has left the window.
        assert!(b.try_retry(10 * MICROS_PER_SEC));
        assert!(!b.try_retry(11 * MICROS_PER_SEC));
        // Requests of long ago count no more either.
        let b = budget(0.5, 0.0);
        for _ in 0..10 {
            b.record_request(0);
        }
        assert!(!b.try_retry(60 * MICROS_PER_SEC));
        // A clock read behind the window's counts as now.
        b.record_request(59 * MICROS_PER_SEC);
        b.record_request(60 * MICROS_PER_SEC);
        assert!(b.try_retry(60 * MICROS_PER_SEC));
    }

    #[test]
    fn nonsense_settings_mean_no_budget_and_infinity_no_limit() {
        for bad in [f64::NAN, -1.0, f64::NEG_INFINITY] {
            let b = budget(bad, bad);
            b.record_request(0);
            assert!(!b.try_retry(0));
        }
        let b = budget(f64::INFINITY, 0.0);
        b.record_request(0);
        assert!(b.try_retry(0));
    }
}
