//! Session affinity: consistent hashing with bounded load.
//!
//! Rendezvous (highest-random-weight) hashing gives every (session, endpoint) pair a score; the
//! session's home is the highest-scoring endpoint, and when endpoints come or go only the sessions
//! whose home changed move (the consistent-hashing property), with no ring to rebuild. Bounded
//! load (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with Bounded Loads", 2018): an
//! endpoint whose in-flight count would exceed `ceil(c × mean)` passes the session to the next one
//! by score, so one hot session cannot drown its endpoint.

use super::{least_loaded_index, mix64, Decision, PolicyConfig, Reason, RoutingPolicy, SharedRng};
use crate::{EndpointView, Micros, RequestProfile};

#[derive(Debug)]
pub struct SessionAffinity {
    load_factor: f64,
    rng: SharedRng,
}

impl SessionAffinity {
    pub fn new(config: &PolicyConfig) -> Self {
        SessionAffinity {
            load_factor: config.session_load_factor.max(1.0),
            rng: SharedRng::new(config.seed),
        }
    }
}

impl RoutingPolicy for SessionAffinity {
    fn name(&self) -> &'static str {
        "session"
    }

    fn pick(
        &self,
        req: &RequestProfile,
        endpoints: &[EndpointView],
        _: Micros,
    ) -> Option<Decision> {
        let Some(session) = req.session_key else {
            let index = least_loaded_index(endpoints, &self.rng)?;
            return Some(Decision::new(endpoints, index, Reason::SessionNoKey));
        };
        if endpoints.is_empty() {
            return None;
        }
        // The load bound counts the new request itself.
        let total: u64 = endpoints
            .iter()
            .map(|e| e.load.in_flight() as u64)
            .sum::<u64>()
            + 1;
        let bound = (self.load_factor * total as f64 / endpoints.len() as f64).ceil() as u64;
        let score = |e: &EndpointView| mix64(session ^ mix64(e.key));
        let home = (0..endpoints.len()).max_by_key(|&i| score(&endpoints[i]))?;
        if (endpoints[home].load.in_flight() as u64) < bound {
            return Some(Decision::new(endpoints, home, Reason::SessionHit));
        }
        let index = (0..endpoints.len())
            .filter(|&i| (endpoints[i].load.in_flight() as u64) < bound)
            .max_by_key(|&i| score(&endpoints[i]))
            // The bound always admits the least-loaded endpoint; this is only for safety.
            .unwrap_or(home);
        Some(Decision::new(endpoints, index, Reason::SessionOverflow))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    fn with_session(key: u64) -> RequestProfile {
        let mut r = request();
        r.session_key = Some(key);
        r
    }

    #[test]
    fn same_session_same_endpoint_and_sessions_spread() {
        let p = SessionAffinity::new(&PolicyConfig::default());
        let v = views(&[0; 4]);
        let mut per_endpoint = [0; 4];
        for s in 0..400u64 {
            let first = p.pick(&with_session(s), &v, 0).unwrap();
            assert_eq!(first.reason, Reason::SessionHit);
            for _ in 0..3 {
                assert_eq!(p.pick(&with_session(s), &v, 0).unwrap().index, first.index);
            }
            per_endpoint[first.index] += 1;
        }
        for n in per_endpoint {
            assert!(
                (60..140).contains(&n),
                "sessions unevenly spread: {per_endpoint:?}"
            );
        }
    }

    #[test]
    fn removing_an_endpoint_moves_only_its_sessions() {
        let p = SessionAffinity::new(&PolicyConfig::default());
        let all = views(&[0; 5]);
        let without_last: Vec<_> = all[..4].to_vec();
        for s in 0..300u64 {
            let before = p.pick(&with_session(s), &all, 0).unwrap();
            let after = p.pick(&with_session(s), &without_last, 0).unwrap();
            if before.index != 4 {
                assert_eq!(before.index, after.index, "session {s} moved needlessly");
            }
        }
    }

    #[test]
    fn overloaded_home_overflows_and_no_key_is_least_loaded() {
        let p = SessionAffinity::new(&PolicyConfig::default());
        let idle = views(&[0; 3]);
        let home = p.pick(&with_session(42), &idle, 0).unwrap().index;
        let mut loads = [1u32; 3];
        loads[home] = 20;
        let busy = views(&loads);
        let d = p.pick(&with_session(42), &busy, 0).unwrap();
        assert_ne!(d.index, home);
        assert_eq!(d.reason, Reason::SessionOverflow);

        let d = p.pick(&request(), &views(&[3, 0, 2]), 0).unwrap();
        assert_eq!((d.index, d.reason), (1, Reason::SessionNoKey));
    }
}
