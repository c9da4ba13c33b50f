//! `--tokenizer`: a request's prompt tokens counted by the tokenizer, seen in the router's load
//! accounting while the request is in prefill. Built only with `--features tokenizer`.
#![cfg(feature = "tokenizer")]

mod common;

use common::*;

/// The in-prefill prompt tokens the router counts for one held request.
async fn prefill_tokens_of(prompt: &str, tokenizer: Option<&str>) -> f64 {
    let engine = mock(&["m"]).await;
    let mut args = vec!["--static-backends", engine.url.as_str()];
    if let Some(path) = tokenizer {
        args.extend(["--tokenizer", path]);
    }
    let r = router(&args).await;
    let c = client();
    let script = engine.script_next();
    let pending = start_stream(&c, &r.url, prompt);
    // Held before its first token: in prefill, its prompt counted.
    let held = script.await.unwrap();
    let metrics = metrics_text(&c, &r.url).await;
    drop(held);
    let _ = pending.await;
    metric_sum(&metrics, "qoe_router_in_prefill_tokens")
}

#[tokio::test]
async fn prompt_tokens_are_counted_by_the_tokenizer() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/words-tokenizer.json"
    );
    let prompt = "hello world hello world hello world";
    // Six words and the BOS; the length estimate says 9 (35 bytes).
    assert_eq!(prefill_tokens_of(prompt, Some(path)).await, 7.0);
    assert_eq!(prefill_tokens_of(prompt, None).await, 9.0);
}

#[tokio::test]
async fn a_tokenizer_that_cannot_be_read_stops_the_start() {
    let config = qoe_router::RouterConfig::from_args([
        "qoe-router",
        "--static-backends",
        "http://127.0.0.1:1",
        "--tokenizer",
        "/nonexistent/tokenizer.json",
    ])
    .unwrap();
    let err = qoe_router::server::build_state(config)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.starts_with("--tokenizer /nonexistent/tokenizer.json"),
        "{err}"
    );
}
