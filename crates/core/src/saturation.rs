//! When an endpoint counts as saturated: the one rule shared by the live router's admission
//! control and the fleet simulator's model of it.

use crate::{EndpointView, Micros};

/// Limits that make an endpoint saturated; a limit at its "off" value is not checked.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SaturationLimits {
    /// Requests in flight (router-counted) at which it is saturated (0: no limit).
    pub max_inflight: u32,
    /// Engine KV-cache usage, 0..1, at which it is saturated (≥ 1: no limit).
    pub max_kv_usage: f64,
    /// Engine waiting requests at which it is saturated (0: no limit).
    pub max_waiting: u32,
    /// Engine metrics older than this are not used.
    pub metrics_max_age: Micros,
}

impl SaturationLimits {
    /// Whether any limit is set.
    pub fn enabled(&self) -> bool {
        self.max_inflight > 0 || self.max_kv_usage < 1.0 || self.max_waiting > 0
    }

    /// Whether `view` is saturated at `now`.
    pub fn saturated(&self, view: &EndpointView, now: Micros) -> bool {
        if self.max_inflight > 0 && view.load.in_flight() >= self.max_inflight {
            return true;
        }
        let fresh = view
            .engine_age(now)
            .is_some_and(|age| age <= self.metrics_max_age);
        if let (true, Some(m)) = (fresh, view.engine) {
            if self.max_kv_usage < 1.0 && m.kv_usage.is_some_and(|u| u >= self.max_kv_usage) {
                return true;
            }
            if self.max_waiting > 0 && m.waiting.is_some_and(|w| w >= self.max_waiting as f64) {
                return true;
            }
        }
        false
    }
}
