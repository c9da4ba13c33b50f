//! Decision time of every policy at 8, 128 and 1,024 endpoints (views built once, as the router
//! hands them in; the prefix-aware policy includes recording the prompt in its index).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use qoe_core::prompt::prefix_block_hashes;
use qoe_core::{build_policy, EndpointView, PolicyConfig, PolicyKind, RequestProfile};
use std::hint::black_box;

fn fleet(n: usize) -> Vec<EndpointView> {
    (0..n)
        .map(|i| {
            let mut v = EndpointView::idle(i as u32, 0x1000 + i as u64 * 7919);
            v.load.in_decode = ((i * 37) % 11) as u32;
            v.load.in_prefill = ((i * 13) % 3) as u32;
            v
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("decision");
    let text = "You are a helpful assistant. Answer the question below concisely. ".repeat(30);
    let mut request = RequestProfile::new("m", 500, 200);
    request.prefix_hashes = prefix_block_hashes(text.as_bytes(), 256);
    request.session_key = Some(42);
    for n in [8usize, 128, 1024] {
        let views = fleet(n);
        for kind in PolicyKind::ALL {
            let policy = build_policy(kind, &PolicyConfig::default());
            group.bench_with_input(BenchmarkId::new(kind.as_str(), n), &views, |b, views| {
                b.iter(|| policy.pick(black_box(&request), black_box(views), 1))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
