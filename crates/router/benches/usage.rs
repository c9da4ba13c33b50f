//! The usage scanner over non-streamed answers (`crates/router/src/usage.rs`): a vLLM chat answer,
//! a Responses answer with its messages after `usage`, and a 1 MB embeddings answer (numbers
//! only, the common bulk case), each fed in 16 KiB reads as hyper hands them over.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qoe_router::usage::UsageScanner;
use std::hint::black_box;

fn bodies() -> Vec<(&'static str, Vec<u8>)> {
    let chat = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today? I am a helpful assistant and I can answer questions.","tool_calls":[]},"logprobs":null,"finish_reason":"stop","stop_reason":null}],"usage":{"prompt_tokens":12,"total_tokens":32,"completion_tokens":20,"prompt_tokens_details":null},"prompt_logprobs":null,"kv_transfer_params":null}"#.to_vec();
    let responses = format!(
        r#"{{"id":"resp_1","output":[{{"type":"message","content":[{{"type":"output_text","text":"{t}"}}]}}],"usage":{{"input_tokens":15,"output_tokens":40,"total_tokens":55}},"input_messages":[{{"role":"user","content":"{t}"}}],"output_messages":[{{"role":"assistant","content":"{t}"}}]}}"#,
        t = "words and more words, ".repeat(100)
    )
    .into_bytes();
    let vector: Vec<String> = (0..1024)
        .map(|i| format!("{:.8}", i as f64 * 1e-3 - 0.5))
        .collect();
    let item = format!(
        r#"{{"object":"embedding","embedding":[{}],"index":0}}"#,
        vector.join(",")
    );
    let data = vec![item; 80].join(",");
    let embeddings = format!(
        r#"{{"object":"list","data":[{data}],"usage":{{"prompt_tokens":800,"total_tokens":800}}}}"#
    )
    .into_bytes();
    vec![
        ("chat", chat),
        ("responses", responses),
        ("embeddings", embeddings),
    ]
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("usage");
    for (name, body) in bodies() {
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::new("scan", name), &body, |b, body| {
            b.iter(|| {
                let mut scanner = UsageScanner::default();
                for read in body.chunks(16 * 1024) {
                    scanner.feed(black_box(read));
                }
                scanner.output_tokens()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
