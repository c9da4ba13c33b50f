//! The SSE observer on a realistic vLLM chat stream: one event per token, as the router sees it.
//! Reported as events per second (criterion's "elements").

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qoe_core::sse::{SseConfig, SseEvent, SseParser};
use std::hint::black_box;

const EVENTS: usize = 1000;

fn stream(continuous_usage: bool) -> Vec<u8> {
    let words = [
        "The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".",
    ];
    let mut s = String::new();
    s.push_str("data: {\"id\":\"chatcmpl-9b1f0c2e\",\"object\":\"chat.completion.chunk\",\"created\":1718000000,\"model\":\"meta-llama/Llama-3.1-8B-Instruct\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n");
    for i in 0..EVENTS - 3 {
        let usage = if continuous_usage {
            format!(
                ",\"usage\":{{\"prompt_tokens\":812,\"total_tokens\":{},\"completion_tokens\":{}}}",
                813 + i,
                i + 1
            )
        } else {
            String::new()
        };
        s.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-9b1f0c2e\",\"object\":\"chat.completion.chunk\",\"created\":1718000000,\"model\":\"meta-llama/Llama-3.1-8B-Instruct\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{}\"}},\"logprobs\":null,\"finish_reason\":null}}]{usage}}}\n\n",
            words[i % words.len()]
        ));
    }
    s.push_str("data: {\"id\":\"chatcmpl-9b1f0c2e\",\"object\":\"chat.completion.chunk\",\"created\":1718000000,\"model\":\"meta-llama/Llama-3.1-8B-Instruct\",\"choices\":[],\"usage\":{\"prompt_tokens\":812,\"total_tokens\":1809,\"completion_tokens\":997}}\n\n");
    s.push_str("data: [DONE]\n\n");
    s.into_bytes()
}

/// Splits at event boundaries, as a proxy usually receives them (one event per read).
fn per_event(s: &[u8]) -> Vec<&[u8]> {
    let mut out = vec![];
    let mut start = 0;
    for i in 1..s.len() {
        if s[i - 1] == b'\n' && s[i] == b'\n' {
            out.push(&s[start..=i]);
            start = i + 1;
        }
    }
    out
}

fn run(pieces: &[&[u8]]) -> u64 {
    let mut p = SseParser::new(SseConfig::default());
    let mut tokens = 0u64;
    for piece in pieces {
        p.feed(black_box(piece), |e| {
            if let SseEvent::Tokens { count, .. } = e {
                tokens += count as u64;
            }
        });
    }
    tokens
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("sse");
    g.throughput(Throughput::Elements(EVENTS as u64));
    for (label, continuous) in [("plain", false), ("continuous_usage", true)] {
        let s = stream(continuous);
        let events = per_event(&s);
        assert_eq!(events.len(), EVENTS);
        assert_eq!(run(&events), 997);
        g.bench_function(format!("{label}/one_event_per_feed"), |b| {
            b.iter(|| run(&events))
        });
        g.bench_function(format!("{label}/whole_stream"), |b| {
            b.iter(|| run(&[&s[..]]))
        });
        let odd: Vec<&[u8]> = s.chunks(61).collect();
        g.bench_function(format!("{label}/61_byte_feeds"), |b| b.iter(|| run(&odd)));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
