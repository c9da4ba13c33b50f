//! The engine model's behaviour, asserted with numbers: each test states the effect a router must
//! be able to see, and the figure that shows it.

use qoe_core::prompt::prefix_block_hashes;
use qoe_core::Micros;
use qoe_sim::rng::SplitMix64;
use qoe_sim::{
    Engine, EngineConfig, EngineEvent, FinishReason, Profile, Scheduling, SimRequest, SubmitError,
};
use std::collections::HashMap;

fn engine(profile: Profile, tweak: impl FnOnce(&mut EngineConfig)) -> Engine {
    let mut cfg = EngineConfig::for_profile(profile);
    tweak(&mut cfg);
    Engine::new(cfg).expect("valid config")
}

/// Steps until idle, appending events; returns the final time.
fn run(e: &mut Engine, mut now: Micros, events: &mut Vec<EngineEvent>) -> Micros {
    let mut guard = 0;
    while e.has_work() {
        now += e.step(now, events);
        guard += 1;
        assert!(guard < 10_000_000, "engine did not drain");
    }
    now
}

/// Token timestamps per request, in order.
fn token_times(events: &[EngineEvent]) -> HashMap<u64, Vec<Micros>> {
    let mut m: HashMap<u64, Vec<Micros>> = HashMap::new();
    for ev in events {
        if let EngineEvent::Token { id, at, .. } = *ev {
            m.entry(id).or_default().push(at);
        }
    }
    m
}

fn ms(us: Micros) -> f64 {
    us as f64 / 1000.0
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    xs[xs.len() / 2]
}

/// TTFT of one request of `prompt` tokens on an idle engine, ms.
fn idle_ttft_ms(profile: Profile, prompt: u32) -> f64 {
    let mut e = engine(profile, |_| {});
    e.submit(SimRequest::new(1, prompt, 1), 0).unwrap();
    let mut ev = Vec::new();
    run(&mut e, 0, &mut ev);
    ms(token_times(&ev)[&1][0])
}

/// Least squares `y = a + b x`; returns (a, b, r²).
fn linear_fit(xs: &[f64], ys: &[f64]) -> (f64, f64, f64) {
    let n = xs.len() as f64;
    let mx = xs.iter().sum::<f64>() / n;
    let my = ys.iter().sum::<f64>() / n;
    let sxy: f64 = xs.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let sxx: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    let b = sxy / sxx;
    let a = my - b * mx;
    let ss_res: f64 = xs
        .iter()
        .zip(ys)
        .map(|(x, y)| (y - a - b * x).powi(2))
        .sum();
    let ss_tot: f64 = ys.iter().map(|y| (y - my).powi(2)).sum();
    (a, b, 1.0 - ss_res / ss_tot)
}

fn within(value: f64, expected: f64, tolerance: f64) -> bool {
    (value - expected).abs() <= expected * tolerance
}

#[test]
fn ttft_is_linear_in_prompt_tokens_on_an_idle_engine() {
    let prompts = [128u32, 256, 512, 1024, 2048, 3072, 4096, 6144, 8000];
    let xs: Vec<f64> = prompts.iter().map(|&p| p as f64).collect();
    let ys: Vec<f64> = prompts
        .iter()
        .map(|&p| idle_ttft_ms(Profile::h100_llama3_8b(), p))
        .collect();
    let (a, b, r2) = linear_fit(&xs, &ys);
    // Chunked prefill keeps it linear: each 2048-token chunk costs about the same.
    assert!(r2 >= 0.99, "r² = {r2:.4} (fit {a:.2} ms + {b:.4} ms/token)");
    // Slope near the profile's per-token cost (0.0215 ms) plus the per-chunk overheads.
    assert!((0.018..0.032).contains(&b), "slope {b:.4} ms/token");
    // Strictly increasing.
    assert!(ys.windows(2).all(|w| w[0] < w[1]), "{ys:?}");
}

#[test]
fn h100_profile_matches_field_notes_within_30_percent() {
    let h100 = Profile::h100_llama3_8b;
    let p1k = idle_ttft_ms(h100(), 1024);
    let p4k = idle_ttft_ms(h100(), 4096);
    assert!(
        within(p1k, 27.0, 0.3),
        "prefill 1k: {p1k:.1} ms, expected ≈ 27"
    );
    assert!(
        within(p4k, 101.0, 0.3),
        "prefill 4k: {p4k:.1} ms, expected ≈ 101"
    );
    let d64 = decode_step_ms(h100(), 64, 1024);
    let d128 = decode_step_ms(h100(), 128, 1024);
    assert!(
        within(d64, 11.0, 0.3),
        "decode b64: {d64:.1} ms, expected ≈ 11"
    );
    assert!(
        within(d128, 14.0, 0.3),
        "decode b128: {d128:.1} ms, expected ≈ 14"
    );
    // The KV cache of an 80 GB card: ≈ 430k tokens.
    assert!((430_000..=445_000).contains(&h100().kv_capacity_tokens));
}

/// Duration of one pure-decode iteration at `batch` sequences of ≈ `ctx` tokens of context, ms.
fn decode_step_ms(profile: Profile, batch: u32, ctx: u32) -> f64 {
    let mut e = engine(profile, |_| {});
    for id in 0..batch as u64 {
        e.submit(SimRequest::new(id, ctx, 1000), 0).unwrap();
    }
    let (mut now, mut ev) = (0, Vec::new());
    // Until every sequence has its first token: from then on, iterations are pure decode.
    while ev
        .iter()
        .filter(|e| matches!(e, EngineEvent::Token { first: true, .. }))
        .count()
        < batch as usize
    {
        now += e.step(now, &mut ev);
    }
    ms(e.step(now, &mut ev))
}

#[test]
fn a100_is_slower_than_h100() {
    assert!(
        idle_ttft_ms(Profile::a100_llama3_8b(), 2048)
            > idle_ttft_ms(Profile::h100_llama3_8b(), 2048) * 1.5
    );
    assert!(
        decode_step_ms(Profile::a100_llama3_8b(), 64, 1024)
            > decode_step_ms(Profile::h100_llama3_8b(), 64, 1024)
    );
}

#[test]
fn tiny_profile_iterates_in_a_few_milliseconds() {
    let d = decode_step_ms(Profile::tiny(), 32, 256);
    assert!((1.0..3.0).contains(&d), "tiny decode step {d:.2} ms");
    let full_chunk = idle_ttft_ms(Profile::tiny(), 2048);
    assert!(
        (1.0..6.0).contains(&full_chunk),
        "tiny 2k prefill {full_chunk:.2} ms"
    );
}

#[test]
fn itl_rises_with_batch_size() {
    let batches = [1u32, 8, 32, 64, 128, 256];
    let mut itls = Vec::new();
    for &b in &batches {
        let mut e = engine(Profile::h100_llama3_8b(), |_| {});
        for id in 0..b as u64 {
            e.submit(SimRequest::new(id, 512, 64), 0).unwrap();
        }
        let mut ev = Vec::new();
        run(&mut e, 0, &mut ev);
        let gaps: Vec<f64> = token_times(&ev)
            .values()
            .flat_map(|t| t.windows(2).map(|w| ms(w[1] - w[0])).collect::<Vec<_>>())
            .collect();
        itls.push(median(gaps));
    }
    assert!(
        itls.windows(2).all(|w| w[0] < w[1]),
        "median ITL by batch {batches:?}: {itls:?}"
    );
    assert!(itls[5] > 2.0 * itls[0], "batch 256 vs 1: {itls:?}");
}

#[test]
fn a_long_prefill_slows_the_decodes_sharing_its_iterations() {
    let mut e = engine(Profile::h100_llama3_8b(), |_| {});
    for id in 0..32 {
        e.submit(SimRequest::new(id, 256, 400), 0).unwrap();
    }
    let (mut now, mut ev) = (0, Vec::new());
    for _ in 0..30 {
        now += e.step(now, &mut ev);
    }
    let t_submit = now;
    e.submit(SimRequest::new(99, 6000, 1), now).unwrap();
    run(&mut e, now, &mut ev);
    let times = token_times(&ev);
    let long_done = times[&99][0];
    let mut before = Vec::new();
    let mut during = Vec::new();
    for id in 0..32 {
        for w in times[&id].windows(2) {
            if w[1] <= t_submit && w[0] > 0 {
                before.push(ms(w[1] - w[0]));
            } else if w[0] >= t_submit && w[1] <= long_done {
                during.push(ms(w[1] - w[0]));
            }
        }
    }
    let base = median(before);
    let slowed = median(during.clone());
    // 32 decodes alone ≈ 7.7 ms; sharing with a ~2k-token chunk ≈ 50 ms.
    assert!(
        slowed > 4.0 * base,
        "ITL {base:.1} ms alone, {slowed:.1} ms with the prefill"
    );
    // Every decode was slowed for the whole prefill (3 chunks), not starved of it.
    assert!(during.len() >= 32 * 3, "{} slowed gaps", during.len());
}

/// A prompt of `tokens` tokens made of `seed`-dependent text, and its block hashes.
fn prompt(tokens: usize, shared_prefix: &str, tail_seed: u64) -> (u32, Vec<u64>) {
    let mut text = shared_prefix.to_string();
    let mut r = SplitMix64::new(tail_seed);
    while text.len() < tokens * 4 {
        text.push((b'a' + (r.next_u64() % 26) as u8) as char);
    }
    text.truncate(tokens * 4);
    (
        qoe_core::prompt::estimate_tokens(&text),
        prefix_block_hashes(text.as_bytes(), usize::MAX),
    )
}

#[test]
fn a_prefix_hit_cuts_ttft() {
    let shared = "s".repeat(4000 * 4); // 4,000 tokens = 250 blocks
    let mut e = engine(Profile::h100_llama3_8b(), |_| {});
    let (pa, ha) = prompt(4096, &shared, 1);
    let (pb, hb) = prompt(4096, &shared, 2);
    let (pc, hc) = prompt(4096, "", 3);
    assert_eq!(ha[..250], hb[..250]);
    assert_ne!(ha[250], hb[250]);

    let mut ev = Vec::new();
    let mut now = 0;
    let mut ttft = |e: &mut Engine, id: u64, p: u32, h: Vec<u64>, now: &mut Micros| {
        let mut r = SimRequest::new(id, p, 1);
        r.prefix_hashes = h;
        let start = *now;
        e.submit(r, start).unwrap();
        *now = run(e, start, &mut ev);
        ms(*now - start)
    };
    let ta = ttft(&mut e, 1, pa, ha, &mut now);
    let hits_before = e.stats().prefix_cache_hits;
    let tb = ttft(&mut e, 2, pb, hb, &mut now);
    let hits_b = e.stats().prefix_cache_hits - hits_before;
    let tc = ttft(&mut e, 3, pc, hc, &mut now);

    assert_eq!(hits_before, 0);
    assert_eq!(hits_b, 4000, "B reuses the 250 shared blocks");
    assert!(tb < 0.3 * ta, "TTFT with hit {tb:.1} ms vs cold {ta:.1} ms");
    assert!(
        within(tc, ta, 0.05),
        "unrelated prompt: {tc:.1} ms vs {ta:.1} ms"
    );
    assert_eq!(e.stats().prefix_cache_queries, 3 * 4096);
}

#[test]
fn kv_exhaustion_raises_waiting_and_preemptions() {
    // 4,096 tokens of KV for 32 requests that each grow to 500 tokens.
    let mut e = engine(Profile::tiny(), |c| {
        c.kv_capacity_tokens = 4096;
        c.max_num_seqs = 64;
    });
    for id in 0..32 {
        e.submit(SimRequest::new(id, 100, 400), 0).unwrap();
    }
    let (mut now, mut ev) = (0, Vec::new());
    let (mut max_waiting, mut max_usage) = (0, 0.0f64);
    while e.has_work() {
        now += e.step(now, &mut ev);
        max_waiting = max_waiting.max(e.stats().waiting);
        max_usage = max_usage.max(e.stats().kv_usage());
    }
    let s = e.stats();
    assert!(s.preemptions >= 10, "{} preemptions", s.preemptions);
    assert!(max_waiting >= 10, "max waiting {max_waiting}");
    assert!(max_usage > 0.95, "max KV usage {max_usage:.3}");
    // Preempted requests recompute and still deliver every token, exactly once.
    let times = token_times(&ev);
    assert!((0..32).all(|id| times[&id].len() == 400));
    let preempted = ev
        .iter()
        .filter(|e| matches!(e, EngineEvent::Preempted { .. }))
        .count();
    assert_eq!(preempted as u64, s.preemptions);
    assert_eq!(s.kv_blocks_used, 0);
    assert_eq!((s.running, s.waiting), (0, 0));
    assert_eq!(s.finished_length, 32);
}

#[test]
fn fcfs_preempts_the_newest_and_priority_the_lowest_priority() {
    for scheduling in [Scheduling::Fcfs, Scheduling::Priority] {
        let mut e = engine(Profile::tiny(), |c| {
            c.kv_capacity_tokens = 1024;
            c.scheduling = scheduling;
        });
        // Ids in arrival order; the oldest two are the least urgent.
        for (id, prio) in [(0u64, 3), (1, 3), (2, 1), (3, 1)] {
            let mut r = SimRequest::new(id, 64, 300);
            r.priority = prio;
            e.submit(r, 0).unwrap();
        }
        let mut ev = Vec::new();
        run(&mut e, 0, &mut ev);
        let first_victim = ev
            .iter()
            .find_map(|e| match e {
                EngineEvent::Preempted { id, .. } => Some(*id),
                _ => None,
            })
            .expect("a preemption");
        match scheduling {
            Scheduling::Fcfs => assert_eq!(first_victim, 3, "newest"),
            Scheduling::Priority => assert_eq!(first_victim, 1, "lowest priority, newest"),
        }
    }
}

#[test]
fn priority_scheduling_serves_priority_1_before_3_under_load() {
    let ttfts = |scheduling: Scheduling| {
        let mut e = engine(Profile::tiny(), |c| {
            c.max_num_seqs = 4;
            c.scheduling = scheduling;
        });
        let req = |id: u64, prio: i32, e: &mut Engine, now: Micros| {
            let mut r = SimRequest::new(id, 200, 50);
            r.priority = prio;
            e.submit(r, now).unwrap();
        };
        // 12 low-priority requests arrive first and fill the 4 seats...
        for id in 0..12 {
            req(id, 3, &mut e, 0);
        }
        let mut ev = Vec::new();
        let now = e.step(0, &mut ev);
        assert_eq!(e.stats().running, 4);
        // ...then 12 urgent ones arrive behind the 8 still waiting.
        for id in 100..112 {
            req(id, 1, &mut e, now);
        }
        run(&mut e, now, &mut ev);
        let t = token_times(&ev);
        let first = |ids: &mut dyn Iterator<Item = u64>| -> Vec<Micros> {
            ids.map(|id| t[&id][0]).collect()
        };
        (first(&mut (0..12)), first(&mut (100..112)))
    };

    let (low, high) = ttfts(Scheduling::Priority);
    let last_high = *high.iter().max().unwrap();
    // Only the 4 low-priority requests already running start before the last urgent one.
    let low_before = low.iter().filter(|&&t| t < last_high).count();
    assert_eq!(low_before, 4, "low {low:?}\nhigh {high:?}");

    // FCFS ignores the field: the urgent requests wait behind all 12.
    let (low, high) = ttfts(Scheduling::Fcfs);
    assert!(high.iter().min().unwrap() > low.iter().max().unwrap());
}

#[test]
fn an_abort_frees_capacity_at_once() {
    let mut e = engine(Profile::tiny(), |c| c.kv_capacity_tokens = 1024); // 64 blocks
    e.submit(SimRequest::new(1, 900, 100), 0).unwrap(); // 57 blocks
    e.submit(SimRequest::new(2, 500, 10), 0).unwrap(); // 32 blocks: does not fit beside 1
    let mut ev = Vec::new();
    let now = e.step(0, &mut ev);
    assert_eq!((e.stats().running, e.stats().waiting), (1, 1));
    assert!(e.stats().kv_usage() > 0.85);

    assert!(e.abort(1, now));
    assert!(!e.abort(1, now), "already gone");
    assert!(!e.is_live(1));
    assert_eq!(e.stats().kv_blocks_used, 0);
    assert_eq!(e.stats().finished_abort, 1);
    let now = now + e.step(now, &mut ev);
    assert_eq!((e.stats().running, e.stats().waiting), (1, 0), "2 admitted");
    // Aborting a waiting request removes it from the queue.
    e.submit(SimRequest::new(3, 900, 10), now).unwrap();
    e.step(now, &mut ev);
    assert_eq!(e.stats().waiting, 1);
    assert!(e.abort(3, now));
    assert_eq!(e.stats().waiting, 0);
    run(&mut e, now, &mut ev);
    let t = token_times(&ev);
    assert_eq!(t[&1].len(), 1, "1 produced its first token, then nothing");
    assert!(!t.contains_key(&3));
    assert_eq!(t[&2].len(), 10);
    assert_eq!(e.live_requests(), 0);
}

/// A mixed workload with arrivals over time; returns the events and the final stats' key figures.
fn mixed_run(seed: u64, jitter: f64) -> (Vec<EngineEvent>, (u64, u64, u64, u64)) {
    let mut e = engine(Profile::tiny(), |c| {
        c.kv_capacity_tokens = 8192;
        c.jitter = jitter;
        c.seed = seed;
        c.max_num_seqs = 16;
    });
    let mut r = SplitMix64::new(1234); // the workload is fixed; only the engine's seed varies
    let (mut now, mut ev) = (0, Vec::new());
    for id in 0..200u64 {
        let mut req = SimRequest::new(
            id,
            1 + (r.next_u64() % 1500) as u32,
            1 + (r.next_u64() % 200) as u32,
        );
        req.prefix_hashes = (0..(req.prompt_tokens / 16) as u64)
            .map(|b| b + (r.next_u64() % 3) * 1000)
            .collect();
        e.submit(req, now).unwrap();
        for _ in 0..(r.next_u64() % 4) {
            now += e.step(now, &mut ev);
        }
    }
    run(&mut e, now, &mut ev);
    let s = e.stats();
    (
        ev,
        (
            s.preemptions,
            s.prefix_cache_hits,
            s.busy_micros,
            s.ttft.sum_micros(),
        ),
    )
}

#[test]
fn same_seed_same_behaviour() {
    let (a, sa) = mixed_run(7, 0.1);
    let (b, sb) = mixed_run(7, 0.1);
    assert_eq!(a, b);
    assert_eq!(sa, sb);
    let (c, sc) = mixed_run(8, 0.1);
    assert_ne!(a, c, "another seed jitters differently");
    assert_ne!(sa.2, sc.2);
    // Jitter changes timing, never the work: same tokens per request.
    let count = |ev: &[EngineEvent]| {
        token_times(ev)
            .into_iter()
            .map(|(k, v)| (k, v.len()))
            .collect::<HashMap<_, _>>()
    };
    assert_eq!(count(&a), count(&c));
}

#[test]
fn jitter_is_median_preserving_and_bounded() {
    let mut plain = Vec::new();
    let mut jittered = Vec::new();
    for (jitter, out) in [(0.0, &mut plain), (0.1, &mut jittered)] {
        let mut e = engine(Profile::h100_llama3_8b(), |c| {
            c.jitter = jitter;
            c.seed = 3;
        });
        e.submit(SimRequest::new(1, 16, 2000), 0).unwrap();
        let mut ev = Vec::new();
        run(&mut e, 0, &mut ev);
        let t = &token_times(&ev)[&1];
        out.extend(t.windows(2).map(|w| ms(w[1] - w[0])));
    }
    let (m0, m1) = (median(plain.clone()), median(jittered.clone()));
    assert!(within(m1, m0, 0.02), "median {m1:.3} vs {m0:.3}");
    let spread = jittered.iter().cloned().fold(0.0f64, f64::max)
        / jittered.iter().cloned().fold(f64::MAX, f64::min);
    assert!(spread > 1.2 && spread < 4.0, "max/min {spread:.2}");
}

#[test]
fn speed_factor_scales_time() {
    let t1 = idle_ttft_ms(Profile::h100_llama3_8b(), 2000);
    let mut e = engine(Profile::h100_llama3_8b(), |c| c.speed = 2.0);
    e.submit(SimRequest::new(1, 2000, 1), 0).unwrap();
    let t2 = ms(run(&mut e, 0, &mut Vec::new()));
    assert!(within(t2, t1 / 2.0, 0.01), "{t2} vs {t1}");
}

#[test]
fn skip_prefill_pays_the_transfer_not_the_prefill() {
    let p = Profile::h100_llama3_8b();
    let cold = idle_ttft_ms(p.clone(), 4000);
    let mut e = engine(p.clone(), |_| {});
    let mut r = SimRequest::new(1, 4000, 20);
    r.skip_prefill = true;
    e.submit(r, 0).unwrap();
    let mut ev = Vec::new();
    let now = e.step(0, &mut ev);
    // Its KV is held while in flight, and it counts as waiting.
    assert_eq!((e.stats().running, e.stats().waiting), (0, 1));
    assert_eq!(e.stats().kv_blocks_used, 250);
    assert!(ev.is_empty());
    let transfer = p.kv_transfer_ms(4000);
    assert!(
        within(ms(now), transfer, 0.01),
        "idle until the transfer lands: {now}"
    );
    run(&mut e, now, &mut ev);
    let t = &token_times(&ev)[&1];
    assert_eq!(t.len(), 20);
    let ttft = ms(t[0]);
    assert!(
        ttft > transfer && ttft < 0.3 * cold,
        "decode-stage TTFT {ttft:.1} ms vs prefill {cold:.1} ms"
    );
    assert_eq!(e.stats().prompt_tokens, 4000);
}

#[test]
fn submit_rejects_what_could_never_run() {
    let mut e = engine(Profile::tiny(), |c| {
        c.kv_capacity_tokens = 1024;
        c.max_model_len = 2048;
        c.max_num_queued_reqs = 2;
    });
    assert_eq!(
        e.submit(SimRequest::new(1, 0, 5), 0),
        Err(SubmitError::EmptyPrompt)
    );
    assert_eq!(
        e.submit(SimRequest::new(1, 5, 0), 0),
        Err(SubmitError::NoOutput)
    );
    assert!(matches!(
        e.submit(SimRequest::new(1, 2048, 1), 0),
        Err(SubmitError::TooLong { .. })
    ));
    assert!(matches!(
        e.submit(SimRequest::new(1, 1000, 100), 0),
        Err(SubmitError::ExceedsKvCapacity { .. })
    ));
    e.submit(SimRequest::new(1, 10, 5), 0).unwrap();
    assert_eq!(
        e.submit(SimRequest::new(1, 10, 5), 0),
        Err(SubmitError::DuplicateId(1))
    );
    e.submit(SimRequest::new(2, 10, 5), 0).unwrap();
    assert_eq!(
        e.submit(SimRequest::new(3, 10, 5), 0),
        Err(SubmitError::QueueFull { limit: 2 })
    );
    assert_eq!(e.stats().submitted, 2);
}

#[test]
fn max_model_len_truncates_with_length_and_eos_stops() {
    let mut e = engine(Profile::tiny(), |c| c.max_model_len = 100);
    let mut eos = SimRequest::new(1, 10, 5);
    eos.stops_at_eos = true;
    e.submit(eos, 0).unwrap();
    let mut long = SimRequest::new(2, 90, 50);
    long.stops_at_eos = true;
    e.submit(long, 0).unwrap();
    let mut ev = Vec::new();
    run(&mut e, 0, &mut ev);
    let reasons: HashMap<u64, FinishReason> = ev
        .iter()
        .filter_map(|e| match *e {
            EngineEvent::Finished { id, reason, .. } => Some((id, reason)),
            _ => None,
        })
        .collect();
    assert_eq!(reasons[&1], FinishReason::Stop);
    assert_eq!(reasons[&2], FinishReason::Length);
    assert_eq!(token_times(&ev)[&2].len(), 10);
    assert_eq!((e.stats().finished_stop, e.stats().finished_length), (1, 1));
}

#[test]
fn histograms_count_every_request_and_token() {
    let mut e = engine(Profile::tiny(), |_| {});
    for id in 0..50 {
        e.submit(SimRequest::new(id, 100 + id as u32, 20), 0)
            .unwrap();
    }
    run(&mut e, 0, &mut Vec::new());
    let s = e.stats();
    assert_eq!(s.ttft.count(), 50);
    assert_eq!(s.e2e.count(), 50);
    assert_eq!(s.queue_time.count(), 50);
    assert_eq!(s.itl.count(), 50 * 19);
    assert_eq!(s.generation_tokens, 50 * 20);
    assert_eq!(s.prompt_tokens, (0..50).map(|i| 100 + i).sum::<u64>());
}

#[test]
fn memory_does_not_grow_with_requests_served() {
    let mut e = engine(Profile::tiny(), |_| {});
    let (mut now, mut ev) = (0, Vec::new());
    let mut next = 0u64;
    for _ in 0..20_000 {
        while e.live_requests() < 32 {
            e.submit(SimRequest::new(next, 64, 8), now).unwrap();
            next += 1;
        }
        ev.clear();
        now += e.step(now, &mut ev);
    }
    assert!(next > 10_000, "served {next}");
    assert!(e.live_requests() <= 32);
    run(&mut e, now, &mut ev);
    assert_eq!(e.live_requests(), 0);
    assert_eq!(e.stats().kv_blocks_used, 0);
}

#[test]
fn a_request_is_never_scheduled_before_it_arrives() {
    // A live driver stamps arrivals by wall clock; while it catches up after a host stall its
    // steps start earlier than that. Such a step must leave the request waiting.
    for scheduling in [Scheduling::Fcfs, Scheduling::Priority] {
        let mut e = engine(Profile::tiny(), |c| c.scheduling = scheduling);
        e.submit(SimRequest::new(1, 10, 50), 0).unwrap();
        let late = SimRequest {
            priority: -1,
            ..SimRequest::new(2, 10, 3)
        };
        e.submit(late, 20_000).unwrap();
        let (mut now, mut ev) = (0, Vec::new());
        while e.has_work() {
            now += e.step(now, &mut ev);
        }
        let times = token_times(&ev);
        assert_eq!(
            (times[&1].len(), times[&2].len()),
            (50, 3),
            "{scheduling:?}"
        );
        assert!(times[&2][0] > 20_000, "{scheduling:?}: {:?}", times[&2]);
        // It joined the first iteration starting at or after its arrival: no waiting beyond it.
        let starts: Vec<Micros> = times[&1].iter().copied().filter(|&t| t >= 20_000).collect();
        assert!(times[&2][0] <= starts[1], "{scheduling:?}");
    }
    // Alone in the engine, it waits for its arrival instead of being computed early.
    let mut e = engine(Profile::tiny(), |_| {});
    e.submit(SimRequest::new(1, 10, 3), 5_000).unwrap();
    let mut ev = Vec::new();
    let end = run(&mut e, 4_000, &mut ev);
    assert_eq!(token_times(&ev)[&1].len(), 3);
    assert!(token_times(&ev)[&1][0] > 5_000);
    assert!(end > 5_000);
    assert_eq!(e.stats().queue_time.sum_micros(), 0);
}

/// Prints the figures of the calibration table in `profile.rs`:
/// `cargo test -p qoe-sim --test model -- --ignored --nocapture`. The tiny profile gets a large
/// KV cache and context here so every row is comparable.
#[test]
#[ignore]
fn print_calibration_figures() {
    for mut p in [
        Profile::h100_llama3_8b(),
        Profile::a100_llama3_8b(),
        Profile::tiny(),
    ] {
        p.kv_capacity_tokens = p.kv_capacity_tokens.max(500_000);
        p.max_model_len = p.max_model_len.max(8192);
        println!("profile {}", p.name);
        for prompt in [128u32, 512, 1024, 2048, 4096, 8000] {
            println!(
                "  idle TTFT prompt {prompt:>5}: {:>8.2} ms",
                idle_ttft_ms(p.clone(), prompt)
            );
        }
        for batch in [1u32, 16, 64, 128, 256] {
            println!(
                "  decode step batch {batch:>3} @1k ctx: {:>6.2} ms",
                decode_step_ms(p.clone(), batch, 1024)
            );
        }
    }
}
