//! Behaviour of the whole policy: learning, priority, prefix affinity, ties, adaptation, bounds,
//! and property tests over arbitrary inputs.

use super::cost::squash;
use super::*;
use crate::{Availability, BreakerState, EngineMetrics, Load, MICROS_PER_SEC};
use proptest::prelude::*;

fn policy() -> Qoe {
    Qoe::new(&PolicyConfig::default())
}

fn policy_with(f: impl FnOnce(&mut QoeConfig)) -> Qoe {
    let mut cfg = PolicyConfig::default();
    f(&mut cfg.qoe);
    Qoe::new(&cfg)
}

fn idle(n: usize) -> Vec<EndpointView> {
    (0..n)
        .map(|i| EndpointView::idle(i as u32, 0xa000 + i as u64))
        .collect()
}

fn request(prompt: u32, output: u32, phase: Phase) -> RequestProfile {
    let mut r = RequestProfile::new("m", prompt, output);
    r.phase = phase;
    r
}

fn first_token(key: u64, prompt: u32, load: Load, ttft_ms: f64) -> Feedback {
    Feedback {
        endpoint_key: key,
        priority: Priority::DEFAULT,
        prompt_tokens: prompt,
        sla_ttft_ms: None,
        streamed: true,
        load_at_dispatch: load,
        detail: None,
        event: FeedbackEvent::FirstToken {
            ttft: (ttft_ms * 1e3) as Micros,
        },
    }
}

fn finished(key: u64, load: Load, itl_ms: f64) -> Feedback {
    Feedback {
        endpoint_key: key,
        priority: Priority::DEFAULT,
        prompt_tokens: 100,
        sla_ttft_ms: None,
        streamed: true,
        load_at_dispatch: load,
        detail: None,
        event: FeedbackEvent::Finished {
            ttft: Some(50_000),
            output_tokens: 100,
            mean_itl_ms: Some(itl_ms),
            failed: false,
        },
    }
}

/// Feeds `fast` TTFT = 20 + P/16 ms and `slow` 20 + P/4 ms for a spread of prompt sizes.
fn teach_fast_and_slow(p: &Qoe, fast: u64, slow: u64) {
    let mut now = NOW - MICROS_PER_SEC;
    for i in 0..60u32 {
        let prompt = 200 + (i % 12) * 350;
        let pf = prompt as f64;
        p.feedback(
            &first_token(fast, prompt, Load::default(), 20.0 + pf / 16.0),
            now,
        );
        p.feedback(
            &first_token(slow, prompt, Load::default(), 20.0 + pf / 4.0),
            now,
        );
        now += 10_000;
    }
}

const NOW: Micros = 100 * MICROS_PER_SEC;

#[test]
fn idle_endpoint_hand_computed_cost() {
    // One idle endpoint, default priors: TTFT 20 + 1000/8 = 145 ms, ITL 20 + 0.2·1 = 20.2 ms.
    let p = policy_with(|c| c.adaptive = false);
    let v = idle(2);
    let r = request(1000, 200, Phase::DecodeDominant);
    let d = p.pick(&r, &v, NOW).unwrap().detail.unwrap();
    assert!((d.predicted_ttft_ms - 145.0).abs() < 1e-9, "{d:?}");
    assert!((d.predicted_itl_ms - 20.2).abs() < 1e-9, "{d:?}");
    // u = max(1/64, 1200/131072) = 1/64.
    let u: f64 = 1.0 / 64.0;
    let resource = u.powi(4) / (1.0 + u.powi(4));
    // Decode-dominant: 0.15 s(145/300) + 0.3 s(20.2/50) + 0.25 s(20.2·30/1000) + 0.3·(1 − 1).
    let perf = 0.15 * squash(145.0 / 300.0)
        + 0.3 * squash(20.2 / 50.0)
        + 0.25 * squash(20.2 * 30.0 / 1000.0);
    // Priority 2: ū = u / 0.8.
    let prio = u / 0.8;
    let want = [resource, perf, 0.0, prio];
    for k in 0..4 {
        assert!(
            (d.terms[k] - want[k]).abs() < 1e-12,
            "term {k}: {d:?} vs {want:?}"
        );
    }
    assert_eq!(d.weights, DEFAULT_WEIGHTS);
    let cost = 0.3 * resource + 0.4 * perf + 0.1 * prio;
    assert!((d.cost - cost).abs() < 1e-12);
}

#[test]
fn the_decode_share_scales_only_the_decode_speed_components() {
    let cfg = QoeConfig::default();
    let at = |itl: f64, share: f64| {
        cost::performance_parts(
            Phase::PrefillDominant,
            400.0,
            itl,
            1000.0,
            300.0,
            share,
            &cfg,
        )
    };
    // Full share: the prefill-dominant mix 0.6 s(TTFT) + 0.1 s(ITL) + 0.3 (1 − QoE).
    let full = at(80.0, 1.0);
    let q = cost::andes_qoe(400.0, 80.0, 300.0, 1000.0, 30.0);
    let want = 0.6 * squash(0.4) + 0.1 * squash(80.0 / 50.0) + 0.3 * (1.0 - q);
    assert!((full.total - want).abs() < 1e-12, "{full:?} vs {want}");
    // Half: the decode parts halve, TTFT's stays.
    let half = at(80.0, 0.5);
    assert_eq!(half.ttft, full.ttft);
    assert!((half.total - (full.ttft + (full.total - full.ttft) / 2.0)).abs() < 1e-12);
    // None: a slow decoder costs the same as a fast one.
    assert_eq!(at(80.0, 0.0).total, at(10.0, 0.0).total);
    assert_eq!(at(80.0, 0.0).total, full.ttft);
    // Out-of-range shares are clamped, NaN counts as 1.
    assert_eq!(at(80.0, f64::NAN), full);
    assert_eq!(at(80.0, 7.0), full);
}

#[test]
fn a_saturated_fleet_prices_deadline_requests_on_ttft_alone() {
    // Default priors on an idle endpoint: TTFT 145 ms, ITL 20.2 ms (see above).
    let v = idle(1);
    let mut r = request(1000, 400, Phase::DecodeDominant);
    r.sla_ttft_ms = Some(250);
    let perf = |engine_priority: bool, priority: Priority, share: f64| {
        let p = policy_with(|c| c.engine_priority = engine_priority);
        p.adapt.lock().unwrap().decode_share = share;
        let mut r = r.clone();
        r.priority = priority;
        p.evaluate(&r, &v, NOW)[0].terms[1]
    };
    let ttft_only = 0.6 * squash(145.0 / 250.0);
    let with_itl = ttft_only + 0.1 * squash(20.2 / 50.0);
    assert!((perf(false, Priority::DEFAULT, 1.0) - with_itl).abs() < 1e-12);
    assert!((perf(false, Priority::DEFAULT, 0.0) - ttft_only).abs() < 1e-12);
    assert!((perf(false, Priority::HIGH, 0.0) - ttft_only).abs() < 1e-12);
    // With engine priority a priority-1 request is served first wherever it goes: it keeps its
    // decode preference; lower priorities do not.
    assert!((perf(true, Priority::HIGH, 0.0) - with_itl).abs() < 1e-12);
    assert!((perf(true, Priority::LOW, 0.0) - ttft_only).abs() < 1e-12);
}

#[test]
fn fast_and_slow_told_apart_from_feedback_alone() {
    let p = policy();
    let mut v = idle(2);
    let (fast, slow) = (v[0].key, v[1].key);
    teach_fast_and_slow(&p, fast, slow);
    // Both idle, long prompt: the fast one, whichever order the candidates come in.
    let r = request(4000, 20, Phase::PrefillDominant);
    for order in [[0usize, 1], [1, 0]] {
        let views: Vec<_> = order.iter().map(|&i| v[i]).collect();
        let d = p.pick(&r, &views, NOW).unwrap();
        assert_eq!(views[d.index].key, fast, "{d:?}");
        assert_eq!(d.reason, Reason::QoeTtft);
        let detail = d.detail.unwrap();
        assert!(
            (detail.predicted_ttft_ms - 270.0).abs() < 15.0,
            "{detail:?}"
        );
    }
    let all = p.evaluate(&r, &v, NOW);
    assert!((all[1].predicted_ttft_ms - 1020.0).abs() < 50.0, "{all:?}");
    // Load the fast one with 20,000 queued prompt tokens: (24,000)/16 = 1,500 ms > 1,020 ms.
    v[0].load.in_prefill = 5;
    v[0].load.prefill_tokens = 20_000;
    let d = p.pick(&r, &v, NOW).unwrap();
    assert_eq!(d.index, 1, "{d:?}");
    // A light queue (2,000 tokens: 395 ms) keeps it on the fast one.
    v[0].load.in_prefill = 1;
    v[0].load.prefill_tokens = 2_000;
    assert_eq!(p.pick(&r, &v, NOW).unwrap().index, 0);
}

#[test]
fn a_slow_endpoint_saturates_sooner() {
    let p = policy();
    let mut v = idle(2);
    teach_fast_and_slow(&p, v[0].key, v[1].key);
    for e in &mut v {
        e.load.in_decode = 40;
    }
    let all = p.evaluate(&request(100, 100, Phase::DecodeDominant), &v, NOW);
    // Same request count, but the slow one (4× slower prefill) has less capacity.
    assert!(all[1].terms[0] > all[0].terms[0] * 2.0, "{all:?}");
}

#[test]
fn an_unknown_endpoint_is_neutral_not_best() {
    let p = policy();
    let mut v = idle(3);
    teach_fast_and_slow(&p, v[0].key, v[1].key);
    v[2].key = 0xdead;
    let r = request(4000, 20, Phase::PrefillDominant);
    let all = p.evaluate(&r, &v, NOW);
    let (f, s, new) = (
        all[0].predicted_ttft_ms,
        all[1].predicted_ttft_ms,
        all[2].predicted_ttft_ms,
    );
    assert!(f < new && new < s, "fast {f}, new {new}, slow {s}");
    let d = p.pick(&r, &v, NOW).unwrap();
    assert_eq!(d.index, 0);
    // When the fast one is busy, the unknown one is tried before the known-slow one.
    v[0].load.in_prefill = 8;
    v[0].load.prefill_tokens = 40_000;
    let d = p.pick(&r, &v, NOW).unwrap();
    assert_eq!((d.index, d.reason), (2, Reason::QoeColdStart), "{d:?}");
}

#[test]
fn learned_itl_steers_decode_heavy_requests() {
    let p = policy();
    let v = idle(2);
    for i in 0..50u32 {
        let load = Load {
            in_decode: i % 16,
            ..Load::default()
        };
        let batch = (i % 16) as f64 + 1.0;
        p.feedback(&finished(v[0].key, load, 40.0 + batch), NOW);
        p.feedback(&finished(v[1].key, load, 15.0 + 0.5 * batch), NOW);
    }
    let r = request(100, 500, Phase::DecodeDominant);
    let d = p.pick(&r, &v, NOW).unwrap();
    assert_eq!((d.index, d.reason), (1, Reason::QoeItl), "{d:?}");
    let detail = d.detail.unwrap();
    assert!((detail.predicted_itl_ms - 15.5).abs() < 1.5, "{detail:?}");
}

/// A fleet where the two endpoints are close in cost, one with headroom and one busy.
fn headroom_fleet() -> (Qoe, Vec<EndpointView>) {
    let p = policy_with(|c| c.adaptive = false);
    let mut v = idle(2);
    // Endpoint 0 idle, endpoint 1 60% busy (38 + this request of 64).
    v[1].load.in_decode = 38;
    (p, v)
}

#[test]
fn priority_changes_which_endpoint_wins() {
    let (p, v) = headroom_fleet();
    let mut r = request(200, 100, Phase::DecodeDominant);
    r.priority = Priority::HIGH;
    let high = p.pick(&r, &v, NOW).unwrap();
    r.priority = Priority::LOW;
    let low = p.pick(&r, &v, NOW).unwrap();
    r.priority = Priority::DEFAULT;
    let mid = p.pick(&r, &v, NOW).unwrap();
    assert_eq!(high.index, 0, "priority 1 takes the headroom: {high:?}");
    assert_eq!(low.index, 1, "priority 3 leaves it: {low:?}");
    assert_eq!(low.reason, Reason::QoeLeaveHeadroom);
    // The priority term differs per endpoint (not one constant for all).
    let all = p.evaluate(&r, &v, NOW);
    assert_ne!(all[0].terms[3], all[1].terms[3]);
    let _ = mid;
}

#[test]
fn prefix_affinity_lowers_predicted_ttft() {
    use crate::prompt::prefix_block_hashes;
    let p = policy();
    let v = idle(3);
    let system = "You are a helpful assistant. ".repeat(200); // 5,800 bytes → 90 blocks
    let mut r1 = request(1_500, 50, Phase::PrefillDominant);
    r1.prefix_hashes = prefix_block_hashes(format!("{system} first").as_bytes(), 256);
    let first = p.pick(&r1, &v, NOW).unwrap();
    let home = first.index;
    assert_eq!(first.detail.unwrap().cached_tokens, 0);
    // The next turn shares the prefix: lower predicted TTFT where it went, and it goes there.
    let mut r2 = request(1_600, 50, Phase::PrefillDominant);
    r2.prefix_hashes = prefix_block_hashes(format!("{system} second").as_bytes(), 256);
    let all = p.evaluate(&r2, &v, NOW);
    let blocks = (system.len() / crate::prompt::BLOCK_BYTES) as u32;
    assert_eq!(all[home].cached_tokens, blocks * 16);
    for (i, d) in all.iter().enumerate() {
        if i != home {
            assert_eq!(d.cached_tokens, 0);
            assert!(all[home].predicted_ttft_ms < d.predicted_ttft_ms - 100.0);
        }
    }
    // Counted by a tokenizer at 10 tokens a block, the same blocks hold that many tokens.
    let mut r3 = r2.clone();
    r3.block_tokens = 10.0;
    assert_eq!(p.evaluate(&r3, &v, NOW)[home].cached_tokens, blocks * 10);
    let second = p.pick(&r2, &v, NOW).unwrap();
    assert_eq!((second.index, second.reason), (home, Reason::QoePrefix));
    // Feedback with the decision's detail learns from the uncached part only.
    let mut fb = first_token(v[home].key, 1_600, Load::default(), 30.0);
    fb.detail = second.detail;
    p.feedback(&fb, NOW);
}

#[test]
fn prefix_affinity_margin_keeps_a_decode_heavy_conversation_home_under_load() {
    // A decode-dominant follow-up turn (its TTFT weighs little in the performance term) whose
    // history is cached on a somewhat busier endpoint: on a busy fleet it goes home (the prefill
    // it saves is capacity); on an idle fleet, or to a far busier home, it does not.
    use crate::prompt::prefix_block_hashes;
    let history = "the conversation so far ".repeat(400); // 9,600 bytes → 150 blocks
    let mut r = request(2_600, 400, Phase::DecodeDominant);
    r.prefix_hashes = prefix_block_hashes(format!("{history} next").as_bytes(), 256);
    // (requests in decode everywhere, extra ones at home, goes home with the default affinity)
    for (base, extra, goes_home) in [(0, 16, false), (40, 16, true), (40, 100, false)] {
        for affinity in [0.0, QoeConfig::default().prefix_affinity] {
            let p = policy_with(|c| c.prefix_affinity = affinity);
            let mut v = idle(3);
            for e in v.iter_mut() {
                e.load.in_decode = base;
            }
            v[1].load.in_decode = base + extra;
            p.prefix.lock().unwrap().record(&r.prefix_hashes, v[1].key);
            let costs = p.evaluate(&r, &v, NOW);
            assert!(costs[1].cost > costs[0].cost, "home is the costlier one");
            let d = p.pick(&r, &v, NOW).unwrap();
            if affinity > 0.0 && goes_home {
                assert_eq!(
                    (d.index, d.reason),
                    (1, Reason::QoePrefix),
                    "{base} {extra}"
                );
                assert_eq!(d.detail.unwrap().cached_tokens, 150 * 16);
            } else {
                assert_ne!(d.index, 1, "{base} {extra} {affinity}");
            }
        }
    }
}

/// Three endpoints with prompt tokens queued ahead (at the prior 8,000 tokens/s: 0.125 ms each).
fn queued_fleet(queued: [u64; 3]) -> Vec<EndpointView> {
    let mut v = idle(3);
    for (e, q) in v.iter_mut().zip(queued) {
        e.load.prefill_tokens = q;
        e.load.in_prefill = (q / 1000) as u32;
    }
    v
}

#[test]
fn a_deadline_missed_everywhere_overflows_onto_the_latest_queue() {
    let p = policy_with(|c| c.deadline_overflow = true);
    // Queues of 750, 1,500 and 625 ms against a 500 ms deadline: late everywhere.
    let fleet = queued_fleet([6_000, 12_000, 5_000]);
    let mut req = request(1_000, 50, Phase::PrefillDominant);
    req.sla_ttft_ms = Some(500);
    let d = p.pick(&req, &fleet, 1).unwrap();
    assert_eq!(d.index, 1);
    assert_eq!(d.reason, Reason::QoeOverflow);

    // Without a deadline, or with overflow off (the default), the cheapest (shortest queue) wins.
    let mut soft = req.clone();
    soft.sla_ttft_ms = None;
    assert_eq!(p.pick(&soft, &fleet, 1).unwrap().index, 2);
    let d = policy().pick(&req, &fleet, 1).unwrap();
    assert_eq!(d.index, 2);
    assert_ne!(d.reason, Reason::QoeOverflow);

    // One endpoint still on time (125 + 125 ms): no overflow.
    let fleet = queued_fleet([6_000, 12_000, 1_000]);
    let d = p.pick(&req, &fleet, 1).unwrap();
    assert_eq!(d.index, 2);
    assert_ne!(d.reason, Reason::QoeOverflow);

    // Late everywhere only because of its own prompt (no queue misses the deadline): cheapest.
    let fleet = queued_fleet([1_000, 2_000, 0]);
    let mut long = request(8_000, 50, Phase::PrefillDominant);
    long.sla_ttft_ms = Some(500);
    let d = p.pick(&long, &fleet, 1).unwrap();
    assert_eq!(d.index, 2);
    assert_ne!(d.reason, Reason::QoeOverflow);
}

#[test]
fn overflow_goes_to_the_longest_queue_not_the_latest_prediction() {
    use crate::prompt::prefix_block_hashes;
    let p = policy_with(|c| {
        c.deadline_overflow = true;
        c.prefix_affinity = 0.0;
    });
    // Queues of 750, 1,125 and 875 ms against a 500 ms deadline. The 1,125 ms one holds 4,096
    // of the 8,000-token prompt cached, so its total prediction is the shortest (1.6 s against
    // 1.8 and 1.9 s): the overflow rule goes by the queue alone, and picks it.
    let fleet = queued_fleet([6_000, 9_000, 7_000]);
    let mut req = request(8_000, 50, Phase::PrefillDominant);
    req.sla_ttft_ms = Some(500);
    req.prefix_hashes =
        prefix_block_hashes("a long shared document ".repeat(2_000).as_bytes(), 256);
    p.prefix
        .lock()
        .unwrap()
        .record(&req.prefix_hashes, fleet[1].key);
    let all = p.evaluate(&req, &fleet, 1);
    assert!(all[2].predicted_ttft_ms > all[0].predicted_ttft_ms);
    assert!(all[0].predicted_ttft_ms > all[1].predicted_ttft_ms);
    assert_eq!(p.pick(&req, &fleet, 1).unwrap().index, 1);
}

#[test]
fn ties_are_broken_at_random() {
    let p = policy();
    let v = idle(4);
    let r = request(100, 100, Phase::DecodeDominant);
    let mut seen = [0u32; 4];
    for _ in 0..2000 {
        let d = p.pick(&r, &v, NOW).unwrap();
        assert_eq!(d.reason, Reason::QoeTie);
        seen[d.index] += 1;
    }
    for s in seen {
        assert!(s > 350, "not uniform: {seen:?}");
    }
}

#[test]
fn deterministic_for_a_seed() {
    let run = || {
        let p = policy();
        let v = idle(8);
        let r = request(100, 100, Phase::DecodeDominant);
        (0..100)
            .map(|i| p.pick(&r, &v, NOW + i).unwrap().index)
            .collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}

#[test]
fn reliability_steers_away_from_a_failing_endpoint() {
    let p = policy();
    let mut v = idle(3);
    v[0].observed.error_rate = 0.3;
    v[0].observed.last_failure = Some(NOW - MICROS_PER_SEC);
    v[1].availability.breaker = BreakerState::HalfOpen;
    let r = request(100, 100, Phase::DecodeDominant);
    let d = p.pick(&r, &v, NOW).unwrap();
    assert_eq!((d.index, d.reason), (2, Reason::QoeReliability));
    let all = p.evaluate(&r, &v, NOW);
    assert!(all[0].terms[2] > 0.3 && all[1].terms[2] == 0.5 && all[2].terms[2] == 0.0);
    // Unhealthy or open: reliability 1.
    v[2].availability = Availability {
        healthy: false,
        ..Availability::default()
    };
    v[1].availability.breaker = BreakerState::Open;
    let all = p.evaluate(&r, &v, NOW);
    assert_eq!((all[1].terms[2], all[2].terms[2]), (1.0, 1.0));
}

#[test]
fn fresh_engine_metrics_count_stale_ones_do_not() {
    let p = policy();
    let mut v = idle(2);
    let busy = EngineMetrics {
        waiting: Some(10.0),
        kv_usage: Some(0.95),
        running: Some(100.0),
        ..EngineMetrics::default()
    };
    v[0].engine = Some(busy);
    v[0].engine_at = Some(NOW - MICROS_PER_SEC);
    let r = request(1000, 100, Phase::PrefillDominant);
    let all = p.evaluate(&r, &v, NOW);
    // 10 waiting × the typical prompt (1,024) ahead: TTFT 20 + 11,240/8 ms.
    assert!((all[0].predicted_ttft_ms - (20.0 + 11_240.0 / 8.0)).abs() < 1e-6);
    assert!((all[0].predicted_itl_ms - (20.0 + 0.2 * 101.0)).abs() < 1e-9);
    assert!(all[0].terms[0] > 0.5);
    assert_eq!(p.pick(&r, &v, NOW).unwrap().index, 1);
    // Ten seconds old: ignored for load, but stale metrics cost reliability.
    v[0].engine_at = Some(NOW - 10 * MICROS_PER_SEC);
    let all = p.evaluate(&r, &v, NOW);
    assert!((all[0].predicted_ttft_ms - 145.0).abs() < 1e-9);
    assert!(all[0].terms[2] > 0.0);
}

/// An endpoint whose `/metrics` cannot be read is taken at the fleet's mean KV usage, not at 0:
/// otherwise it looks emptier than every endpoint that reports its use and wins them all.
#[test]
fn an_endpoint_without_kv_readings_is_neutral_not_the_emptiest() {
    let p = policy();
    let mut v = idle(3);
    for (view, kv) in v[1..].iter_mut().zip([0.2, 0.6]) {
        view.engine = Some(EngineMetrics {
            kv_usage: Some(kv),
            running: Some(0.0),
            waiting: Some(0.0),
            ..EngineMetrics::default()
        });
        view.engine_at = Some(NOW - MICROS_PER_SEC);
    }
    let r = request(1000, 100, Phase::PrefillDominant);
    let all = p.evaluate(&r, &v, NOW);
    // Utilization 0.4 (the mean of 0.2 and 0.6): hill4(0.4).
    let hill = |u: f64| u.powi(4) / (1.0 + u.powi(4));
    assert!((all[0].terms[0] - hill(0.4)).abs() < 1e-9, "{:?}", all[0]);
    assert!((all[1].terms[0] - hill(0.2)).abs() < 1e-9);
    assert!(all[1].terms[0] < all[0].terms[0] && all[0].terms[0] < all[2].terms[0]);
    // The one reporting less than the fleet's mean takes the request.
    assert_eq!(p.pick(&r, &v, NOW).unwrap().index, 1);
    // No endpoint with a reading: every one is taken as empty, alike.
    for view in &mut v {
        view.engine_at = Some(NOW - 60 * MICROS_PER_SEC);
    }
    let all = p.evaluate(&r, &v, NOW);
    assert!(all.iter().all(|d| d.terms[0] == all[0].terms[0]));
}

#[test]
fn decode_stage_counts_the_prompt_as_cached() {
    let p = policy();
    let v = idle(1);
    let mut r = request(3000, 100, Phase::DecodeDominant);
    r.stage = Stage::Decode;
    let d = p.pick(&r, &v, NOW).unwrap();
    assert_eq!(d.reason, Reason::OnlyCandidate);
    let d = d.detail.unwrap();
    assert_eq!(d.cached_tokens, 3000);
    assert!((d.predicted_ttft_ms - 20.0).abs() < 1e-9);
}

#[test]
fn weights_adapt_to_prefill_pressure_and_priority_misses() {
    let p = policy();
    let mut v = idle(4);
    for e in &mut v {
        e.load.in_prefill = 20;
        e.load.prefill_tokens = 40_000;
    }
    for i in 0..200u64 {
        let mut fb = first_token(v[0].key, 1000, Load::default(), 900.0);
        fb.priority = Priority::HIGH;
        p.feedback(&fb, i);
    }
    let r = request(2000, 10, Phase::PrefillDominant);
    let mut now = NOW;
    for _ in 0..4000 {
        p.pick(&r, &v, now);
        now += 20_000;
    }
    let w = p.weights();
    assert!(w[1] > 0.5, "performance weight rose: {w:?}");
    assert!(w[3] > 0.15, "priority weight rose: {w:?}");
    assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    let state = p.state_json().unwrap();
    assert!(state["sla_miss"]["1"]["rate"].as_f64().unwrap() > 0.9);
    assert!(state["weights"]["performance"].as_f64().unwrap() > 0.5);
}

#[test]
fn only_streamed_requests_count_toward_deadline_misses() {
    // A non-streamed request reports no first token, so its failures must not count as misses
    // either: 1% of non-streamed requests failing would otherwise read as every deadline missed.
    let p = policy();
    let key = idle(1)[0].key;
    for i in 0..200u64 {
        let mut fb = finished(key, Load::default(), 20.0);
        fb.priority = Priority::HIGH;
        fb.streamed = false;
        fb.event = FeedbackEvent::Finished {
            ttft: None,
            output_tokens: 0,
            mean_itl_ms: None,
            failed: true,
        };
        p.feedback(&fb, NOW + i);
    }
    let state = p.state_json().unwrap();
    assert_eq!(
        state["sla_miss"]["1"]["rate"].as_f64().unwrap(),
        0.0,
        "{state}"
    );
    // The same failures of streamed requests are misses.
    for i in 0..200u64 {
        let mut fb = finished(key, Load::default(), 20.0);
        fb.priority = Priority::HIGH;
        fb.event = FeedbackEvent::Finished {
            ttft: None,
            output_tokens: 0,
            mean_itl_ms: None,
            failed: true,
        };
        p.feedback(&fb, NOW + 200 + i);
    }
    let state = p.state_json().unwrap();
    assert!(
        state["sla_miss"]["1"]["rate"].as_f64().unwrap() > 0.9,
        "{state}"
    );
}

#[test]
fn fixed_weights_when_not_adaptive() {
    let p = policy_with(|c| {
        c.adaptive = false;
        c.weights = [1.0, 1.0, 1.0, 1.0];
    });
    let mut v = idle(2);
    v[0].load.prefill_tokens = 100_000;
    for i in 0..100 {
        p.pick(
            &request(1000, 10, Phase::PrefillDominant),
            &v,
            NOW + i * 100_000,
        );
    }
    assert_eq!(p.weights(), [0.25; 4]);
}

#[test]
fn state_is_bounded() {
    let p = policy_with(|c| c.max_tracked_endpoints = 100);
    for k in 0..10_000u64 {
        p.feedback(&first_token(k + 1, 500, Load::default(), 50.0), k);
    }
    let state = p.state_json().unwrap();
    assert!(state["tracked_endpoints"].as_u64().unwrap() <= 100);
    assert!(state["endpoints"].as_array().unwrap().len() <= STATE_JSON_ENDPOINTS);
    assert!(state.to_string().len() < 64 * 1024);
}

#[test]
fn reasons_have_kebab_case_names_matching_serde() {
    for r in [
        Reason::QoeTie,
        Reason::QoePrefix,
        Reason::QoeColdStart,
        Reason::QoeTtft,
        Reason::QoeItl,
        Reason::QoeResource,
        Reason::QoeReliability,
        Reason::QoeHeadroom,
        Reason::QoeLeaveHeadroom,
        Reason::QoeOverflow,
    ] {
        assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
        assert!(r.as_str().starts_with("qoe-"));
    }
}

#[test]
fn parse_weights_normalizes_and_explains() {
    assert_eq!(
        QoeConfig::parse_weights("3,4,2,1").unwrap(),
        DEFAULT_WEIGHTS.map(|w| w)
    );
    let w = QoeConfig::parse_weights("1, 1, 1, 1").unwrap();
    assert_eq!(w, [0.25; 4]);
    assert!(QoeConfig::parse_weights("1,2,3")
        .unwrap_err()
        .contains("four"));
    assert!(QoeConfig::parse_weights("1,x,3,4")
        .unwrap_err()
        .contains("'x'"));
    assert!(QoeConfig::parse_weights("1,-1,3,4").is_err());
    assert!(QoeConfig::parse_weights("0,0,0,0").is_err());
}

// ---- property tests ----

fn any_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(0.0),
        Just(-1.0),
        Just(1e300),
        0.0..2.0f64,
        0.0..1e6f64,
    ]
}

fn any_metrics() -> impl Strategy<Value = Option<EngineMetrics>> {
    proptest::option::of(
        (any_f64(), any_f64(), any_f64()).prop_map(|(running, waiting, kv)| EngineMetrics {
            running: Some(running),
            waiting: Some(waiting),
            kv_usage: Some(kv),
            ..EngineMetrics::default()
        }),
    )
}

fn any_view() -> impl Strategy<Value = EndpointView> {
    (
        0u64..6,
        (any::<u32>(), any::<u32>(), any::<u64>(), any::<u64>()),
        (proptest::option::of(any_f64()), any_f64(), any_f64()),
        any_metrics(),
        proptest::option::of(any::<u64>()),
        (any::<bool>(), 0u8..3, any::<u32>()),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(key, load, obs, engine, engine_at, avail, last_failure)| {
            let mut v = EndpointView::idle(key as u32, 1 + key);
            v.load = Load {
                in_prefill: load.0 % 5000,
                in_decode: load.1,
                prefill_tokens: load.2,
                pending_output_tokens: load.3,
            };
            v.observed.itl_ms = obs.0;
            v.observed.error_rate = obs.1;
            v.observed.timeout_rate = obs.2;
            v.observed.last_failure = last_failure;
            v.engine = engine;
            v.engine_at = engine_at;
            v.availability = Availability {
                healthy: avail.0,
                breaker: [
                    BreakerState::Closed,
                    BreakerState::HalfOpen,
                    BreakerState::Open,
                ][avail.1 as usize],
                flaps: avail.2,
            };
            v
        })
}

fn any_request() -> impl Strategy<Value = RequestProfile> {
    (
        any::<u32>(),
        any::<u32>(),
        1u8..4,
        proptest::option::of(any::<u32>()),
        any::<bool>(),
        any::<bool>(),
        proptest::collection::vec(0u64..8, 0..6),
        proptest::num::f64::ANY,
    )
        .prop_map(
            |(prompt, out, prio, sla, prefill, decode_stage, hashes, block_tokens)| {
                let mut r = RequestProfile::new("m", prompt, out);
                r.block_tokens = block_tokens;
                r.priority = Priority::new(prio).unwrap();
                r.sla_ttft_ms = sla;
                r.phase = if prefill {
                    Phase::PrefillDominant
                } else {
                    Phase::DecodeDominant
                };
                if decode_stage {
                    r.stage = Stage::Decode;
                }
                r.prefix_hashes = hashes;
                r
            },
        )
}

fn any_feedback() -> impl Strategy<Value = Feedback> {
    (
        0u64..8,
        any::<u32>(),
        (any::<u32>(), any::<u32>(), any::<u64>()),
        any::<u64>(),
        proptest::option::of(any_f64()),
        any::<bool>(),
        any::<bool>(),
        any::<u32>(),
    )
        .prop_map(
            |(key, prompt, load, t, itl, first, failed, cached)| Feedback {
                endpoint_key: key,
                priority: Priority::new(1 + (key % 3) as u8).unwrap(),
                prompt_tokens: prompt,
                sla_ttft_ms: Some((t % 5000) as u32),
                streamed: true,
                load_at_dispatch: Load {
                    in_prefill: load.0,
                    in_decode: load.1,
                    prefill_tokens: load.2,
                    pending_output_tokens: 0,
                },
                detail: Some(DecisionDetail {
                    predicted_ttft_ms: 0.0,
                    predicted_itl_ms: 0.0,
                    cached_tokens: cached,
                    seat_wait_ms: 0.0,
                    terms: [0.0; 4],
                    weights: [0.25; 4],
                    cost: 0.0,
                }),
                event: if first {
                    FeedbackEvent::FirstToken { ttft: t }
                } else {
                    FeedbackEvent::Finished {
                        ttft: None,
                        output_tokens: (t % 1000) as u32,
                        mean_itl_ms: itl,
                        failed,
                    }
                },
            },
        )
}

fn assert_sane(d: &DecisionDetail, cfg: &QoeConfig) -> Result<(), TestCaseError> {
    prop_assert!(
        d.predicted_ttft_ms.is_finite() && d.predicted_ttft_ms >= 0.0,
        "{d:?}"
    );
    prop_assert!(
        d.predicted_itl_ms.is_finite() && d.predicted_itl_ms >= 0.0,
        "{d:?}"
    );
    prop_assert!(d.cost.is_finite() && (0.0..=1.0).contains(&d.cost), "{d:?}");
    for t in d.terms {
        prop_assert!(t.is_finite() && (0.0..=1.0).contains(&t), "{d:?}");
    }
    assert_weights(d.weights, cfg)
}

fn assert_weights(w: [f64; 4], cfg: &QoeConfig) -> Result<(), TestCaseError> {
    let b = Bounds::new(
        normalize(cfg.weights, DEFAULT_WEIGHTS),
        cfg.weight_min,
        cfg.weight_max,
    );
    prop_assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{w:?}");
    for i in 0..4 {
        prop_assert!(w[i].is_finite() && w[i] >= 0.0, "{w:?}");
        prop_assert!(
            w[i] >= b.min[i] - 1e-9 && w[i] <= b.max[i] + 1e-9,
            "{w:?} {b:?}"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn no_nan_and_weights_in_bounds(
        steps in proptest::collection::vec(
            (any_request(), proptest::collection::vec(any_view(), 0..6),
             proptest::collection::vec(any_feedback(), 0..4), 0u64..10_000_000),
            1..12),
        weights in proptest::array::uniform4(any_f64()),
        adaptive in any::<bool>(),
        knobs in proptest::array::uniform8(any_f64()),
        capacity in (0u32..4, 0u64..4, 0usize..4),
    ) {
        let mut cfg = PolicyConfig::default();
        cfg.qoe.weights = weights;
        cfg.qoe.adaptive = adaptive;
        // Zero, negative, NaN and huge settings: sanitized, never a NaN out.
        cfg.qoe.prior_prefill_tokens_per_s = knobs[0];
        cfg.qoe.prior_itl_base_ms = knobs[1];
        cfg.qoe.target_ttft_ms = knobs[2];
        cfg.qoe.target_itl_ms = knobs[3];
        cfg.qoe.optimal_throughput = knobs[4];
        cfg.qoe.forgetting = knobs[5];
        cfg.qoe.model_half_life_ms = knobs[6];
        cfg.qoe.priority_fill = knobs[7];
        cfg.qoe.saturation_inflight = capacity.0;
        cfg.qoe.saturation_tokens = capacity.1;
        cfg.qoe.max_tracked_endpoints = capacity.2;
        let p = Qoe::new(&cfg);
        let qcfg = *p.config();
        let mut now: Micros = 0;
        for (req, views, feedback, dt) in steps {
            now = now.saturating_add(dt);
            for fb in &feedback {
                p.feedback(fb, now);
            }
            match p.pick(&req, &views, now) {
                None => prop_assert!(views.is_empty()),
                Some(d) => {
                    prop_assert!(d.index < views.len());
                    prop_assert_eq!(d.endpoint, views[d.index].id);
                    assert_sane(&d.detail.unwrap(), &qcfg)?;
                }
            }
            for d in p.evaluate(&req, &views, now) {
                assert_sane(&d, &qcfg)?;
            }
            assert_weights(p.weights(), &qcfg)?;
        }
        let state = p.state_json().unwrap();
        prop_assert!(!state.to_string().contains("NaN"));
    }

    #[test]
    fn weights_stay_in_bounds_under_any_signals(
        base in proptest::array::uniform4(0.0..1.0f64),
        min in proptest::array::uniform4(any_f64()),
        max in proptest::array::uniform4(any_f64()),
        signals in proptest::collection::vec((any_f64(), any_f64(), 0u64..200_000, any::<bool>(), 0usize..3), 1..60),
    ) {
        let base = normalize(base, DEFAULT_WEIGHTS);
        let bounds = Bounds::new(base, min, max);
        let mut a = Adapt::new(base, bounds, true, 1_000.0, 1000.0);
        let mut now = 0;
        for (pressure, sat, dt, missed, prio) in signals {
            now += dt;
            a.record_sla(prio, missed);
            a.observe(pressure, sat, 100, now);
            prop_assert!((a.weights.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{:?}", a.weights);
            for i in 0..4 {
                prop_assert!(a.weights[i] >= bounds.min[i] - 1e-12 && a.weights[i] <= bounds.max[i] + 1e-12);
                prop_assert!(a.weights[i] >= 0.0);
            }
            prop_assert!((0.0..=1.0).contains(&a.decode_share), "{}", a.decode_share);
        }
    }
}
