//! `--tokenizer`: a request's prompt tokens counted by the tokenizer, seen in the router's load
//! accounting while the request is in prefill. Built only with `--features tokenizer`.
#![cfg(feature = "tokenizer")]

mod common;

use common::*;

const WORDS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/words/tokenizer.json"
);

/// The in-prefill prompt tokens the router counts for one held completion.
async fn prefill_tokens_of(prompt: &str, tokenizer: Option<&str>) -> f64 {
    held_prefill_tokens("/v1/completions", completion("m", prompt, true), tokenizer).await
}

/// The in-prefill prompt tokens the router counts for one request to `path` with `body`, held
/// before its first token.
async fn held_prefill_tokens(path: &str, body: String, tokenizer: Option<&str>) -> f64 {
    let metrics = held_metrics(path, body, tokenizer).await;
    metric_sum(&metrics, "qoe_router_in_prefill_tokens")
}

/// The router's metrics while one request to `path` with `body` is held before its first token.
async fn held_metrics(path: &str, body: String, tokenizer: Option<&str>) -> String {
    held_metrics_of(&["m"], path, body, tokenizer).await
}

/// [`held_metrics`] with an engine that serves `models`; `tokenizer`: the `--tokenizer` value.
async fn held_metrics_of(
    models: &[&str],
    path: &str,
    body: String,
    tokenizer: Option<&str>,
) -> String {
    let engine = mock(models).await;
    let mut args = vec!["--static-backends", engine.url.as_str()];
    if let Some(path) = tokenizer {
        args.extend(["--tokenizer", path]);
    }
    let r = router(&args).await;
    let c = client();
    let script = engine.script_next();
    let req = http::Request::post(format!("{}{path}", r.url))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let pending = tokio::spawn(c.request(req));
    // Held before its first token: in prefill, its prompt counted.
    let held = script.await.unwrap();
    let metrics = metrics_text(&c, &r.url).await;
    drop(held);
    let _ = pending.await;
    metrics
}

#[tokio::test]
async fn prompt_tokens_are_counted_by_the_tokenizer() {
    let prompt = "hello world hello world hello world";
    // Six words and the BOS; the length estimate says 9 (35 bytes).
    assert_eq!(prefill_tokens_of(prompt, Some(WORDS)).await, 7.0);
    assert_eq!(prefill_tokens_of(prompt, None).await, 9.0);
    // A body long enough to be counted off the worker thread, counted the same way.
    let long = "hello world ".repeat(400);
    assert_eq!(prefill_tokens_of(&long, Some(WORDS)).await, 801.0);
    assert_eq!(prefill_tokens_of(&long, None).await, 1200.0);
}

#[tokio::test]
async fn a_chat_is_counted_through_the_models_chat_template() {
    let body = serde_json::json!({"model": "m", "stream": true, "max_tokens": 4, "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "world!!"}]},
    ]})
    .to_string();
    // "<s> system be brief\n<s> user hello\nworld!!\n<s> assistant" (tests/fixtures/words/).
    let n = held_prefill_tokens("/v1/chat/completions", body.clone(), Some(WORDS)).await;
    assert_eq!(n, 10.0);
    // Estimated: "system: be brief\nuser: hello\nworld!!\n", 37 bytes (36, 9 tokens, if the
    // parts were not joined by a newline).
    assert_eq!(
        held_prefill_tokens("/v1/chat/completions", body, None).await,
        10.0
    );
    // The request's own settings reach the template: no generation prompt, "<s> assistant".
    let body = serde_json::json!({"model": "m", "stream": true, "max_tokens": 4,
        "add_generation_prompt": false,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
    })
    .to_string();
    let n = held_prefill_tokens("/v1/chat/completions", body, Some(WORDS)).await;
    assert_eq!(n, 7.0);
}

#[tokio::test]
async fn each_model_is_counted_by_its_own_tokenizer() {
    let prompt = "hello world hello world hello world";
    let held = |model: &'static str, tokenizer: String| async move {
        let body = completion(model, prompt, true);
        let metrics = held_metrics_of(&["m", "n"], "/v1/completions", body, Some(&tokenizer)).await;
        metric_sum(&metrics, "qoe_router_in_prefill_tokens")
    };
    // Six words and the BOS for `m`, which has a tokenizer; `n` has none: 35 bytes, 9 tokens.
    let only_m = format!("m={WORDS}");
    assert_eq!(held("m", only_m.clone()).await, 7.0);
    assert_eq!(held("n", only_m).await, 9.0);
    // The tokenizer for every model counts `n`; `m` keeps its own (the same file here).
    assert_eq!(held("n", format!("m={WORDS},{WORDS}")).await, 7.0);
    // A body without `model`, to a fleet of one model: counted as that model's, by its own
    // tokenizer (a long one too, counted off the worker thread).
    for (prompt, tokens) in [(prompt.to_string(), 7.0), ("hello ".repeat(500), 501.0)] {
        let body = serde_json::json!({"prompt": prompt, "max_tokens": 4, "stream": true});
        let tokenizer = format!("m={WORDS}");
        let metrics = held_metrics_of(
            &["m"],
            "/v1/completions",
            body.to_string(),
            Some(&tokenizer),
        )
        .await;
        assert_eq!(metric_sum(&metrics, "qoe_router_in_prefill_tokens"), tokens);
    }
}

#[tokio::test]
async fn a_chat_the_template_cannot_render_is_counted_flat_and_in_the_metrics() {
    // The fixture's template raises for a tool message.
    let body = serde_json::json!({"model": "m", "stream": true, "max_tokens": 4,
        "messages": [{"role": "tool", "content": "x"}]})
    .to_string();
    let metrics = held_metrics("/v1/chat/completions", body, Some(WORDS)).await;
    // "tool: x\n" as words, and the BOS.
    assert_eq!(metric_sum(&metrics, "qoe_router_in_prefill_tokens"), 3.0);
    assert_eq!(
        metric_sum(&metrics, "qoe_router_chat_template_fallbacks_total"),
        1.0
    );
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
