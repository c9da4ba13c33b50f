//! Parsing a real vLLM `/metrics` scrape (~58 KB, 681 lines): the router does this for every
//! endpoint every scrape interval, so throughput here bounds how many endpoints one core can watch.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qoe_core::engine_metrics::parse_engine_metrics_detailed;
use qoe_core::prom;
use std::hint::black_box;

const UNDER_LOAD: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/reference/vllm-0.32-metrics-under-load.txt"
));

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("prom");
    g.throughput(Throughput::Bytes(UNDER_LOAD.len() as u64));
    g.bench_function("samples", |b| {
        b.iter(|| {
            let mut sum = 0.0;
            let mut labels = 0;
            for s in prom::parse(black_box(UNDER_LOAD)) {
                sum += s.value;
                labels += s.labels.raw().len();
            }
            (sum, labels)
        })
    });
    g.bench_function("entries", |b| {
        b.iter(|| prom::parse(black_box(UNDER_LOAD)).entries().count())
    });
    g.bench_function("samples_with_label_lookup", |b| {
        b.iter(|| {
            prom::parse(black_box(UNDER_LOAD))
                .filter(|s| s.label("model_name").is_some_and(|m| m == "tiny-llama"))
                .count()
        })
    });
    g.bench_function("engine_metrics", |b| {
        b.iter(|| parse_engine_metrics_detailed(black_box(UNDER_LOAD), Some("tiny-llama")))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
