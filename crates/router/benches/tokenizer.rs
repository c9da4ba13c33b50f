//! Cost of counting a prompt with `--tokenizer` (`cargo bench -p qoe-router --features tokenizer
//! --bench tokenizer`): the tokenizer in `QOE_TOKENIZER_JSON` (default: the word-level test
//! fixture; give a real model's `tokenizer.json` for real numbers) on English-like text of 1, 4
//! and 16 KiB, against the length estimate it replaces.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::path::PathBuf;

fn bench(c: &mut Criterion) {
    let path = std::env::var_os("QOE_TOKENIZER_JSON").map_or_else(
        || {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/words-tokenizer.json"
            ))
        },
        PathBuf::from,
    );
    let tokenizer = qoe_router::tokenizer::load(&path).expect("a tokenizer.json");
    let sentence =
        "The router counts every prompt before it picks an endpoint, so this must be quick. ";
    let mut group = c.benchmark_group("tokenizer");
    for kib in [1usize, 4, 16] {
        let text: String =
            sentence.repeat(kib * 1024 / sentence.len() + 1)[..kib * 1024].to_string();
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_with_input(BenchmarkId::new("count", kib), &text, |b, t| {
            b.iter(|| tokenizer.count(black_box(t)))
        });
        group.bench_with_input(BenchmarkId::new("estimate", kib), &text, |b, t| {
            b.iter(|| qoe_core::prompt::estimate_tokens(black_box(t)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
