//! Cost of counting a prompt with `--tokenizer` (`cargo bench -p qoe-router --features tokenizer
//! --bench tokenizer`): the tokenizer whose `tokenizer.json` is in `QOE_TOKENIZER_JSON` (this
//! bench's own variable, default the word-level test fixture; the router's setting is
//! `--tokenizer` / `QOE_TOKENIZER`) on 1, 4 and 16 KiB of varied English-like text (words drawn
//! from a list by a fixed-seed generator, so word caches do not flatter it), against the length
//! estimate it replaces; and the same text as a four-message chat through the model's chat
//! template (`count-chat`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::path::PathBuf;

fn bench(c: &mut Criterion) {
    let path = std::env::var_os("QOE_TOKENIZER_JSON").map_or_else(
        || {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/words/tokenizer.json"
            ))
        },
        PathBuf::from,
    );
    let tokenizer =
        qoe_router::tokenizer::load(&path, Default::default()).expect("a tokenizer.json");
    let mut group = c.benchmark_group("tokenizer");
    for kib in [1usize, 4, 16] {
        let text = varied_text(kib * 1024);
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_with_input(BenchmarkId::new("count", kib), &text, |b, t| {
            b.iter(|| tokenizer.count(black_box(t)))
        });
        group.bench_with_input(BenchmarkId::new("estimate", kib), &text, |b, t| {
            b.iter(|| qoe_core::prompt::estimate_tokens(black_box(t)))
        });
        // The same text as a four-message chat, through the model's chat template if it has one.
        let quarter = text.len() / 4;
        let parts: Vec<&str> = (0..4)
            .map(|i| {
                let (mut a, mut b) = (i * quarter, ((i + 1) * quarter).min(text.len()));
                while !text.is_char_boundary(a) {
                    a -= 1;
                }
                while !text.is_char_boundary(b) {
                    b -= 1;
                }
                &text[a..b]
            })
            .collect();
        let roles = ["system", "user", "assistant", "user"];
        let chat: Vec<qoe_core::prompt::ChatMessage<'_>> = roles
            .iter()
            .zip(&parts)
            .map(|(role, content)| qoe_core::prompt::ChatMessage { role, content })
            .collect();
        // The request the messages came from, which the template reads too.
        let request = serde_json::json!({
            "model": "m",
            "messages": chat
                .iter()
                .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
                .collect::<Vec<_>>(),
        })
        .to_string();
        group.bench_with_input(BenchmarkId::new("count-chat", kib), &chat, |b, m| {
            b.iter(|| tokenizer.count_chat(black_box(m), black_box(request.as_bytes())))
        });
    }
    group.finish();
}

/// `len` bytes of words drawn from a list, with punctuation and numbers, by a fixed-seed LCG.
fn varied_text(len: usize) -> String {
    const WORDS: &[&str] = &[
        "the",
        "router",
        "counts",
        "every",
        "prompt",
        "before",
        "it",
        "picks",
        "an",
        "endpoint",
        "engine",
        "latency",
        "tokens",
        "stream",
        "first",
        "second",
        "request",
        "priority",
        "deadline",
        "cache",
        "prefix",
        "decode",
        "prefill",
        "queue",
        "batch",
        "seat",
        "model",
        "fleet",
        "weights",
        "adaptive",
        "health",
        "breaker",
        "retry",
        "upstream",
        "client",
        "measured",
        "predicted",
        "reliability",
        "resource",
        "performance",
        "quality",
        "person",
        "reads",
        "smoothly",
        "quickly",
        "server",
        "answer",
        "question",
        "context",
        "window",
    ];
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) as usize
    };
    let mut text = String::with_capacity(len + 32);
    while text.len() < len {
        match next() % 20 {
            0 => text.push_str(". "),
            1 => text.push_str(&format!("{} ", next() % 10_000)),
            2 => text.push_str(", "),
            _ => {
                text.push_str(WORDS[next() % WORDS.len()]);
                text.push(' ');
            }
        }
    }
    text.truncate(len);
    text
}

criterion_group!(benches, bench);
criterion_main!(benches);
