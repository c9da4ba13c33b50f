//! The request analyzer on bodies shaped like real traffic: it parses every request's body before
//! routing, so its cost is part of the hop's added latency. Reported per request and as bytes/s.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qoe_core::analyze::{analyze, AnalyzerConfig, Route};
use qoe_core::ApiKind;
use std::hint::black_box;

/// Prose with the escapes real prompts carry (newlines, quotes).
fn prose(bytes: usize, seed: usize) -> String {
    let words = [
        "the",
        "router",
        "predicts",
        "each",
        "engine's",
        "time",
        "to",
        "first",
        "token",
        "and",
        "\\\"quoted\\\"",
        "inter-token",
        "latency",
        "before",
        "it",
        "picks",
        "one.\\n",
    ];
    let mut s = String::with_capacity(bytes + 16);
    let mut i = seed;
    while s.len() < bytes {
        s.push_str(words[i % words.len()]);
        s.push(' ');
        i = i.wrapping_mul(31).wrapping_add(7);
    }
    s
}

/// A multi-turn chat: a system prompt, then alternating turns, `total` bytes of content in all.
fn chat(turns: usize, total: usize) -> Vec<u8> {
    let mut s = String::from(
        r#"{"model":"meta-llama/Llama-3.1-8B-Instruct","stream":true,"max_tokens":256,"temperature":0.7,"stream_options":{"include_usage":true},"messages":["#,
    );
    for t in 0..turns {
        let role = match t {
            0 => "system",
            t if t % 2 == 1 => "user",
            _ => "assistant",
        };
        if t > 0 {
            s.push(',');
        }
        s.push_str(&format!(
            r#"{{"role":"{role}","content":"{}"}}"#,
            prose(total / turns, t)
        ));
    }
    s.push_str("]}");
    s.into_bytes()
}

fn completion(bytes: usize) -> Vec<u8> {
    format!(
        r#"{{"model":"meta-llama/Llama-3.1-8B-Instruct","prompt":"{}","max_tokens":128}}"#,
        prose(bytes, 3)
    )
    .into_bytes()
}

fn bench(c: &mut Criterion) {
    let config = AnalyzerConfig::default();
    let cases = [
        (
            "chat/tiny",
            ApiKind::Chat,
            br#"{"model":"m","messages":[{"role":"user","content":"Say hello in one word."}],"max_tokens":16}"#.to_vec(),
        ),
        ("chat/2-turns-2KB", ApiKind::Chat, chat(2, 2_000)),
        ("chat/16-turns-24KB", ApiKind::Chat, chat(16, 24_000)),
        ("completion/16KB", ApiKind::Completion, completion(16_000)),
        ("completion/64KB", ApiKind::Completion, completion(64_000)),
    ];
    let mut group = c.benchmark_group("analyze");
    for (name, kind, body) in &cases {
        let route = Route {
            kind: *kind,
            model_required: true,
        };
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(*name, |b| {
            b.iter(|| {
                let profile = analyze(
                    route,
                    black_box(body),
                    |name| (name == "x-request-priority").then_some(&b"1"[..]),
                    &config,
                    |_| 200,
                )
                .expect("valid body");
                black_box(profile.prompt_tokens)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
