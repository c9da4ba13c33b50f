//! Property tests: whatever the workload, the engine conserves tokens, frees all KV, and keeps its
//! events consistent.

use proptest::prelude::*;
use qoe_core::Micros;
use qoe_sim::{Engine, EngineConfig, EngineEvent, Profile, Scheduling, SimRequest};
use std::collections::HashMap;

#[derive(Clone, Debug)]
struct Req {
    prompt: u32,
    output: u32,
    priority: i32,
    group: u64,
    skip_prefill: bool,
    gap_steps: u8,
    abort_after: Option<u8>,
}

fn req() -> impl Strategy<Value = Req> {
    (
        1u32..600,
        1u32..120,
        0i32..4,
        0u64..3,
        prop::bool::weighted(0.15),
        0u8..3,
        prop::option::weighted(0.1, 0u8..20),
    )
        .prop_map(
            |(prompt, output, priority, group, skip_prefill, gap_steps, abort_after)| Req {
                prompt,
                output,
                priority,
                group,
                skip_prefill,
                gap_steps,
                abort_after,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn tokens_conserved_and_kv_freed(
        reqs in prop::collection::vec(req(), 1..40),
        priority in any::<bool>(),
        kv_blocks in 48u64..256,
        budget in 64u32..2048,
    ) {
        let mut cfg = EngineConfig::for_profile(Profile::tiny());
        cfg.kv_capacity_tokens = kv_blocks * 16;
        cfg.max_num_batched_tokens = budget;
        cfg.max_num_seqs = 8.min(budget);
        cfg.scheduling = if priority { Scheduling::Priority } else { Scheduling::Fcfs };
        let mut e = Engine::new(cfg).unwrap();
        let (mut now, mut ev): (Micros, Vec<EngineEvent>) = (0, Vec::new());
        let mut expected: HashMap<u64, u32> = HashMap::new();
        let mut aborts: Vec<(u64, u8)> = Vec::new();
        for (id, r) in reqs.iter().enumerate() {
            let id = id as u64;
            let mut s = SimRequest::new(id, r.prompt, r.output);
            s.priority = r.priority;
            s.skip_prefill = r.skip_prefill;
            // Requests of a group share their leading blocks.
            s.prefix_hashes = (0..(r.prompt / 16) as u64).map(|b| r.group * 1_000_000 + b).collect();
            if e.submit(s, now).is_ok() {
                expected.insert(id, r.output);
                if let Some(k) = r.abort_after { aborts.push((id, k)); }
            }
            for _ in 0..r.gap_steps {
                now += e.step(now, &mut ev);
            }
        }
        let mut steps = 0u32;
        while e.has_work() {
            for (id, k) in &aborts {
                if *k as u32 == steps && e.abort(*id, now) {
                    expected.remove(id);
                }
            }
            now += e.step(now, &mut ev);
            steps += 1;
            prop_assert!(steps < 200_000);
            let s = e.stats();
            prop_assert!(s.kv_blocks_used <= s.kv_blocks_total);
        }
        let mut tokens: HashMap<u64, (u32, bool, Micros)> = HashMap::new();
        let mut finished: HashMap<u64, u32> = HashMap::new();
        for x in &ev {
            match *x {
                EngineEvent::Token { id, at, first } => {
                    let t = tokens.entry(id).or_insert((0, false, 0));
                    prop_assert_eq!(first, t.0 == 0, "first flag of {}", id);
                    prop_assert!(at >= t.2, "time goes forward");
                    prop_assert!(!finished.contains_key(&id), "token after finish");
                    t.0 += 1;
                    t.2 = at;
                }
                EngineEvent::Finished { id, .. } => {
                    *finished.entry(id).or_default() += 1;
                }
                EngineEvent::Preempted { .. } => {}
            }
        }
        for (id, out) in &expected {
            prop_assert_eq!(tokens.get(id).map(|t| t.0), Some(*out), "tokens of {}", id);
            prop_assert_eq!(finished.get(id), Some(&1));
        }
        let s = e.stats();
        prop_assert_eq!(s.kv_blocks_used, 0);
        prop_assert_eq!((s.running, s.waiting), (0, 0));
        prop_assert!(s.prefix_cache_hits <= s.prefix_cache_queries);
        prop_assert_eq!(e.live_requests(), 0);
        prop_assert_eq!(s.finished_length + s.finished_stop, expected.len() as u64);
    }
}
