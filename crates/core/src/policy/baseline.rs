//! The load-blind and load-only baselines every router ships: round-robin, random, least-loaded,
//! power-of-two choices.

use super::{least_loaded_index, Decision, Reason, RoutingPolicy, SharedRng};
use crate::{EndpointView, Micros, RequestProfile, Stage};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Cycles through the candidates in order, one cycle per request stage: the two stages of a
/// disaggregated request pick from different endpoints, and one shared counter would advance
/// twice per request, leaving every other prefill (or decode) endpoint idle.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: [AtomicUsize; 3],
}

impl RoutingPolicy for RoundRobin {
    fn name(&self) -> &'static str {
        "roundrobin"
    }

    fn pick(
        &self,
        req: &RequestProfile,
        endpoints: &[EndpointView],
        _: Micros,
    ) -> Option<Decision> {
        if endpoints.is_empty() {
            return None;
        }
        let counter = &self.next[match req.stage {
            Stage::Whole => 0,
            Stage::Prefill => 1,
            Stage::Decode => 2,
        }];
        let index = counter.fetch_add(1, Ordering::Relaxed) % endpoints.len();
        Some(Decision::new(endpoints, index, Reason::RoundRobin))
    }
}

/// Uniformly random candidate.
#[derive(Debug)]
pub struct RandomPolicy {
    rng: SharedRng,
}

impl RandomPolicy {
    pub fn new(seed: u64) -> Self {
        RandomPolicy {
            rng: SharedRng::new(seed),
        }
    }
}

impl RoutingPolicy for RandomPolicy {
    fn name(&self) -> &'static str {
        "random"
    }

    fn pick(&self, _: &RequestProfile, endpoints: &[EndpointView], _: Micros) -> Option<Decision> {
        if endpoints.is_empty() {
            return None;
        }
        let index = self.rng.below(endpoints.len());
        Some(Decision::new(endpoints, index, Reason::Random))
    }
}

/// Fewest requests in flight (router-counted), random tie-break.
#[derive(Debug)]
pub struct LeastLoaded {
    rng: SharedRng,
}

impl LeastLoaded {
    pub fn new(seed: u64) -> Self {
        LeastLoaded {
            rng: SharedRng::new(seed),
        }
    }
}

impl RoutingPolicy for LeastLoaded {
    fn name(&self) -> &'static str {
        "least-loaded"
    }

    fn pick(&self, _: &RequestProfile, endpoints: &[EndpointView], _: Micros) -> Option<Decision> {
        let index = least_loaded_index(endpoints, &self.rng)?;
        Some(Decision::new(endpoints, index, Reason::LeastLoaded))
    }
}

/// Power of two choices: two distinct random candidates, the less loaded wins (ties: the first
/// drawn, itself random).
#[derive(Debug)]
pub struct PowerOfTwo {
    rng: SharedRng,
}

impl PowerOfTwo {
    pub fn new(seed: u64) -> Self {
        PowerOfTwo {
            rng: SharedRng::new(seed),
        }
    }
}

impl RoutingPolicy for PowerOfTwo {
    fn name(&self) -> &'static str {
        "power-of-two"
    }

    fn pick(&self, _: &RequestProfile, endpoints: &[EndpointView], _: Micros) -> Option<Decision> {
        let n = endpoints.len();
        if n <= 1 {
            return (n == 1).then(|| Decision::new(endpoints, 0, Reason::OnlyCandidate));
        }
        let a = self.rng.below(n);
        let b = (a + 1 + self.rng.below(n - 1)) % n;
        let index = if endpoints[b].load.in_flight() < endpoints[a].load.in_flight() {
            b
        } else {
            a
        };
        Some(Decision::new(endpoints, index, Reason::PowerOfTwo))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[test]
    fn roundrobin_cycles_in_order() {
        let p = RoundRobin::default();
        let v = views(&[9, 0, 4]);
        let picks: Vec<_> = (0..6)
            .map(|_| p.pick(&request(), &v, 0).unwrap().index)
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn roundrobin_cycles_each_stage_on_its_own() {
        let p = RoundRobin::default();
        let (prefills, decodes) = (views(&[0, 0]), views(&[0, 0]));
        let stage = |stage| RequestProfile { stage, ..request() };
        // Each request picks a prefill endpoint, then a decode one: both sets still alternate.
        let picks: Vec<_> = (0..4)
            .map(|_| {
                let a = p.pick(&stage(Stage::Prefill), &prefills, 0).unwrap().index;
                let b = p.pick(&stage(Stage::Decode), &decodes, 0).unwrap().index;
                (a, b)
            })
            .collect();
        assert_eq!(picks, [(0, 0), (1, 1), (0, 0), (1, 1)]);
    }

    #[test]
    fn random_covers_all_and_is_seeded() {
        let v = views(&[0; 4]);
        let run = |seed| {
            let p = RandomPolicy::new(seed);
            (0..400)
                .map(|_| p.pick(&request(), &v, 0).unwrap().index)
                .collect::<Vec<_>>()
        };
        let a = run(1);
        assert_eq!(a, run(1), "same seed, same choices");
        assert_ne!(a, run(2));
        for i in 0..4 {
            let count = a.iter().filter(|&&x| x == i).count();
            assert!((60..140).contains(&count), "endpoint {i}: {count}");
        }
    }

    #[test]
    fn least_loaded_picks_minimum() {
        let p = LeastLoaded::new(1);
        let v = views(&[4, 2, 7, 3]);
        for _ in 0..20 {
            let d = p.pick(&request(), &v, 0).unwrap();
            assert_eq!(d.index, 1);
            assert_eq!(d.reason, Reason::LeastLoaded);
        }
    }

    #[test]
    fn power_of_two_never_picks_the_worst_of_two_and_avoids_the_max() {
        let p = PowerOfTwo::new(3);
        // With two endpoints, it always compares both.
        let two = views(&[5, 1]);
        for _ in 0..50 {
            assert_eq!(p.pick(&request(), &two, 0).unwrap().index, 1);
        }
        // The most loaded of many is never chosen (it loses every comparison).
        let many = views(&[3, 1, 9, 2, 4]);
        for _ in 0..500 {
            assert_ne!(p.pick(&request(), &many, 0).unwrap().index, 2);
        }
    }
}
