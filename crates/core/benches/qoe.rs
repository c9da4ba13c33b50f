//! Decision time of the `qoe` policy at 16, 128 and 1,024 endpoints, with every endpoint's model
//! trained, engine metrics on half the fleet, and a prompt carrying prefix hashes (recorded in the
//! policy's prefix index on every decision, as in production). Also the cost of one feedback.
//!
//! Targets (issue 4): ≤ 10 µs at 16 endpoints, ≤ 200 µs at 1,024.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use qoe_core::prompt::prefix_block_hashes;
use qoe_core::{
    build_policy, EndpointView, EngineMetrics, Feedback, FeedbackEvent, Load, Phase, PolicyConfig,
    PolicyKind, Priority, RequestProfile, MICROS_PER_SEC,
};
use std::hint::black_box;

const NOW: u64 = 600 * MICROS_PER_SEC;

fn fleet(n: usize) -> Vec<EndpointView> {
    (0..n)
        .map(|i| {
            let mut v = EndpointView::idle(i as u32, 0x1000 + i as u64 * 7919);
            v.load.in_decode = ((i * 37) % 11) as u32;
            v.load.in_prefill = ((i * 13) % 3) as u32;
            v.load.prefill_tokens = v.load.in_prefill as u64 * 900;
            v.load.pending_output_tokens = v.load.in_decode as u64 * 150;
            v.observed.itl_ms = Some(20.0 + (i % 7) as f64);
            v.observed.error_rate = if i % 17 == 0 { 0.05 } else { 0.0 };
            if i % 2 == 0 {
                v.engine = Some(EngineMetrics {
                    running: Some(v.load.in_decode as f64),
                    waiting: Some((i % 4) as f64),
                    kv_usage: Some((i % 10) as f64 / 10.0),
                    ..EngineMetrics::default()
                });
                v.engine_at = Some(NOW - MICROS_PER_SEC);
            }
            v
        })
        .collect()
}

fn train(policy: &dyn qoe_core::RoutingPolicy, views: &[EndpointView]) {
    for (i, v) in views.iter().enumerate() {
        let speed = 8.0 + (i % 5) as f64 * 4.0; // tokens per ms
        for s in 0..8u32 {
            let prompt = 200 + s * 500;
            let load = Load {
                in_prefill: s % 3,
                in_decode: s % 9,
                prefill_tokens: (s % 3) as u64 * 800,
                pending_output_tokens: 0,
            };
            let ttft_ms = 20.0 + (prompt as f64 + load.prefill_tokens as f64) / speed;
            let base = Feedback {
                endpoint_key: v.key,
                priority: Priority::DEFAULT,
                prompt_tokens: prompt,
                sla_ttft_ms: None,
                streamed: true,
                load_at_dispatch: load,
                detail: None,
                event: FeedbackEvent::FirstToken {
                    ttft: (ttft_ms * 1e3) as u64,
                },
            };
            policy.feedback(&base, NOW - MICROS_PER_SEC);
            let done = Feedback {
                event: FeedbackEvent::Finished {
                    ttft: Some((ttft_ms * 1e3) as u64),
                    output_tokens: 100,
                    mean_itl_ms: Some(15.0 + 0.3 * load.in_flight() as f64),
                    failed: false,
                },
                ..base
            };
            policy.feedback(&done, NOW - MICROS_PER_SEC);
        }
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("qoe");
    // ~500 tokens of prompt: 31 prefix blocks (a shared system prompt plus a question).
    let text = "You are a helpful assistant. Answer the question below concisely. ".repeat(30);
    let mut request = RequestProfile::new("m", 500, 200);
    request.prefix_hashes = prefix_block_hashes(text.as_bytes(), 256);
    let mut long = RequestProfile::new("m", 4000, 20);
    long.phase = Phase::PrefillDominant;
    long.prefix_hashes = prefix_block_hashes(text.repeat(8).as_bytes(), 256);
    // The analyzer's cap: 1,024 blocks, a 16k-token prompt.
    let mut longest = RequestProfile::new("m", 16_000, 20);
    longest.phase = Phase::PrefillDominant;
    longest.prefix_hashes = prefix_block_hashes(text.repeat(32).as_bytes(), 1024);
    for n in [16usize, 128, 1024] {
        let views = fleet(n);
        let policy = build_policy(PolicyKind::Qoe, &PolicyConfig::default());
        train(policy.as_ref(), &views);
        group.bench_with_input(BenchmarkId::new("pick", n), &views, |b, views| {
            b.iter(|| policy.pick(black_box(&request), black_box(views), NOW))
        });
        group.bench_with_input(BenchmarkId::new("pick-4k-prompt", n), &views, |b, views| {
            b.iter(|| policy.pick(black_box(&long), black_box(views), NOW))
        });
        group.bench_with_input(
            BenchmarkId::new("pick-16k-prompt", n),
            &views,
            |b, views| b.iter(|| policy.pick(black_box(&longest), black_box(views), NOW)),
        );
        let fb = Feedback {
            endpoint_key: views[n / 2].key,
            priority: Priority::HIGH,
            prompt_tokens: 500,
            sla_ttft_ms: Some(250),
            streamed: true,
            load_at_dispatch: views[n / 2].load,
            detail: None,
            event: FeedbackEvent::FirstToken { ttft: 80_000 },
        };
        group.bench_with_input(BenchmarkId::new("feedback", n), &fb, |b, fb| {
            b.iter(|| policy.feedback(black_box(fb), NOW))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
