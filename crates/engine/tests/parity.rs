//! Behaviours measured on a real vLLM 0.32 (see `tests/e2e/test_engine_parity.py`), held here
//! without it: what a client sees must not tell the two apart.

mod common;

use common::*;
use qoe_engine::EngineArgs;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One request with exactly the head lines given; returns the status line's code, the head and
/// the body (the engine closes the connection after it).
async fn raw(s: &Server, head: &str, body: &str) -> (u16, String, String) {
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    let req = format!(
        "{head}\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_string())
}

fn chunks(events: &[String]) -> Vec<Value> {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

async fn stream(s: &Server, path: &str, body: Value) -> Vec<Value> {
    let mut c = s.open(path, &body).await;
    assert_eq!(c.status, 200);
    chunks(&c.events().await.unwrap())
}

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    k.sort();
    k
}

#[tokio::test]
async fn only_json_bodies_are_read_and_wrong_methods_get_a_json_405() {
    bounded(async {
        let s = Server::start(tiny_args()).await;
        let body = r#"{"model":"m","prompt":"x","max_tokens":1}"#;
        for head in [
            "POST /v1/completions HTTP/1.1",
            "POST /v1/completions HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded",
        ] {
            let (status, _, b) = raw(&s, head, body).await;
            assert_eq!(status, 400, "{head}");
            let e: Value = serde_json::from_str(&b).unwrap();
            assert_eq!(e["error"]["type"], "Bad Request");
            assert!(e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("Only 'application/json' is allowed"));
        }
        let (status, _, _) = raw(
            &s,
            "POST /v1/completions HTTP/1.1\r\nContent-Type: Application/JSON; charset=utf-8",
            body,
        )
        .await;
        assert_eq!(status, 200);
        for head in [
            "GET /v1/completions HTTP/1.1",
            "POST /health HTTP/1.1",
            "HEAD /health HTTP/1.1",
        ] {
            let (status, h, b) = raw(&s, head, "").await;
            assert_eq!(status, 405, "{head}");
            assert!(
                h.contains("content-type: application/json") && h.contains("allow:"),
                "{h}"
            );
            if !head.starts_with("HEAD") {
                assert_eq!(
                    serde_json::from_str::<Value>(&b).unwrap(),
                    json!({"detail": "Method Not Allowed"})
                );
            }
        }
    })
    .await
}

#[tokio::test]
async fn max_tokens_is_capped_to_the_context_and_defaults_like_vllm() {
    bounded(async {
        let s = Server::start(EngineArgs {
            max_model_len: Some(100),
            ..tiny_args()
        })
        .await;
        let usage = |v: Value| v["usage"]["completion_tokens"].as_u64().unwrap();
        // 90 prompt tokens and max_tokens 20: 10 fit, and are served (vLLM caps, it does not refuse).
        let r = s
            .post_json(
                "/v1/completions",
                &json!({"model": "m", "prompt": "y".repeat(360), "max_tokens": 20, "ignore_eos": true}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(usage(r.json()), 10);
        // A completion's default is 16; a chat's is what fits.
        let r = s
            .post_json("/v1/completions", &json!({"model": "m", "prompt": "x", "ignore_eos": true}))
            .await;
        assert_eq!(usage(r.json()), 16);
        let r = s
            .post_json(
                "/v1/chat/completions",
                &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "ignore_eos": true}),
            )
            .await;
        let v = r.json();
        assert_eq!(usage(v.clone()) + v["usage"]["prompt_tokens"].as_u64().unwrap(), 100);
        // A prompt that fills the context leaves no room: vLLM's message for max_tokens 0.
        let r = s
            .post_json("/v1/completions", &json!({"model": "m", "prompt": "y".repeat(400)}))
            .await;
        assert_eq!(r.status, 400);
        assert_eq!(r.json()["error"]["param"], "max_tokens");
    })
    .await
}

#[tokio::test]
async fn model_defaults_to_the_first_served_and_priority_is_ignored_under_fcfs() {
    bounded(async {
        let s = Server::start(EngineArgs {
            models: vec!["m".into(), "alias".into()],
            ..tiny_args()
        })
        .await;
        for body in [
            json!({"prompt": "x", "max_tokens": 1}),
            json!({"model": null, "prompt": "x", "max_tokens": 1}),
            json!({"model": "", "prompt": "x", "max_tokens": 1}),
            json!({"model": "alias", "prompt": "x", "max_tokens": 1, "priority": 7}),
        ] {
            let r = s.post_json("/v1/completions", &body).await;
            assert_eq!(r.status, 200, "{body}: {}", r.body);
            let want = body["model"]
                .as_str()
                .filter(|m| !m.is_empty())
                .unwrap_or("m");
            assert_eq!(r.json()["model"], want);
        }
    })
    .await
}

#[tokio::test]
async fn responses_and_chunks_carry_vllm_keys() {
    bounded(async {
        let s = Server::start(tiny_args()).await;
        let v = s
            .post_json(
                "/v1/completions",
                &json!({"model": "m", "prompt": "x", "max_tokens": 2}),
            )
            .await
            .json();
        assert_eq!(
            keys(&v),
            [
                "choices",
                "created",
                "ec_transfer_params",
                "id",
                "kv_transfer_params",
                "metrics",
                "model",
                "object",
                "service_tier",
                "system_fingerprint",
                "usage"
            ]
        );
        assert_eq!(
            keys(&v["choices"][0]),
            [
                "finish_reason",
                "index",
                "logprobs",
                "prompt_logprobs",
                "prompt_token_ids",
                "routed_experts",
                "stop_reason",
                "text",
                "token_ids"
            ]
        );
        assert_eq!(
            keys(&v["usage"]),
            [
                "completion_tokens",
                "completion_tokens_details",
                "prompt_tokens",
                "prompt_tokens_details",
                "total_tokens"
            ]
        );
        let chat =
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
        let v = s.post_json("/v1/chat/completions", &chat).await.json();
        assert_eq!(
            keys(&v),
            [
                "choices",
                "created",
                "ec_transfer_params",
                "id",
                "kv_transfer_params",
                "metrics",
                "model",
                "object",
                "prompt_logprobs",
                "prompt_text",
                "prompt_token_ids",
                "service_tier",
                "system_fingerprint",
                "usage"
            ]
        );
        assert_eq!(
            keys(&v["choices"][0]["message"]),
            [
                "annotations",
                "audio",
                "content",
                "function_call",
                "reasoning",
                "refusal",
                "role"
            ]
        );
        let mut streamed = chat.clone();
        streamed["stream"] = json!(true);
        let c = stream(&s, "/v1/chat/completions", streamed).await;
        assert_eq!(c[0]["prompt_text"], Value::Null);
        assert!(c[0].get("prompt_token_ids").is_some());
        let last = c.last().unwrap();
        assert!(last["choices"][0]["finish_reason"].is_string());
        assert!(last["system_fingerprint"].is_string(), "{last}");
        assert!(c[1].get("system_fingerprint").is_none());
    })
    .await
}

#[tokio::test]
async fn stream_options_need_a_stream_and_continuous_usage_counts_every_chunk() {
    bounded(async {
        let s = Server::start(tiny_args()).await;
        let r = s
            .post_json(
                "/v1/completions",
                &json!({"model": "m", "prompt": "x", "max_tokens": 2, "stream_options": {"include_usage": true}}),
            )
            .await;
        assert_eq!(r.status, 400);
        assert_eq!(r.json()["error"]["param"], "stream_options");
        let c = stream(
            &s,
            "/v1/completions",
            json!({"model": "m", "prompt": "abcdefgh", "max_tokens": 3, "ignore_eos": true, "stream": true,
                   "stream_options": {"include_usage": true, "continuous_usage_stats": true}}),
        )
        .await;
        assert_eq!(c.len(), 4);
        for (i, chunk) in c[..3].iter().enumerate() {
            assert_eq!(
                chunk["usage"],
                json!({"prompt_tokens": 2, "total_tokens": 3 + i, "completion_tokens": i + 1})
            );
        }
        assert_eq!(c[3]["choices"], json!([]));
        assert!(c[3]["system_fingerprint"].is_string());
    })
    .await
}

#[tokio::test]
async fn n_and_prompt_batches_are_separate_choices_and_separate_requests() {
    bounded(async {
        let s = Server::start(tiny_args()).await;
        let v = s
            .post_json(
                "/v1/completions",
                &json!({"model": "m", "prompt": ["abcd", "abcdefgh"], "n": 2, "max_tokens": 3, "ignore_eos": true}),
            )
            .await
            .json();
        let choices = v["choices"].as_array().unwrap();
        let index: Vec<u64> = choices.iter().map(|c| c["index"].as_u64().unwrap()).collect();
        assert_eq!(index, [0, 1, 2, 3]);
        assert_eq!(v["usage"]["prompt_tokens"], 3, "each prompt counted once");
        assert_eq!(v["usage"]["completion_tokens"], 12);
        assert_ne!(choices[0]["text"], choices[1]["text"], "samples differ");
        // Each choice is a request of the model, as in vLLM V1.
        assert_eq!(
            s.metric("vllm:request_success_total{engine=\"0\",finished_reason=\"length\"").await,
            4.0
        );
        let c = stream(
            &s,
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 2,
                   "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}}),
        )
        .await;
        // Two role chunks, two tokens each, the usage chunk.
        assert_eq!(c.len(), 7);
        let roles: Vec<&Value> = c.iter().filter(|c| c["choices"][0]["delta"]["role"].is_string()).collect();
        assert_eq!(roles.len(), 2);
        for i in [0, 1] {
            let ends = c
                .iter()
                .filter(|c| c["choices"][0]["index"] == i && c["choices"][0]["finish_reason"] == "length")
                .count();
            assert_eq!(ends, 1);
        }
        assert_eq!(c[6]["usage"]["completion_tokens"], 4);
        let r = s
            .post_json("/v1/completions", &json!({"model": "m", "prompt": "x", "n": 0}))
            .await;
        assert_eq!((r.status, r.json()["error"]["param"].clone()), (400, Value::Null));
        // A fan-out that can never be served is the client's error, not a retryable overload;
        // and one request cannot ask for an unbounded amount of output.
        for body in [
            json!({"model": "m", "prompt": ["a", "b", "c", "d", "e"], "n": 16384, "max_tokens": 1}),
            json!({"model": "m", "prompt": "a", "n": 16384, "max_tokens": 4000, "ignore_eos": true,
                   "stop": ["never here", "nor here"]}),
        ] {
            let r = s.post_json("/v1/completions", &body).await;
            assert_eq!(r.status, 400, "{body}");
            assert_eq!(r.json()["error"]["param"], "n");
        }
        assert_eq!(s.metric("vllm:num_requests_running{engine=\"0\"").await, 0.0);
    })
    .await
}

#[tokio::test]
async fn logprobs_echo_and_stop_shape_the_answer() {
    bounded(async {
        let s = Server::start(tiny_args()).await;
        let v = s
            .post_json(
                "/v1/completions",
                &json!({"model": "m", "prompt": "Hello", "max_tokens": 3, "ignore_eos": true, "logprobs": 2, "echo": true}),
            )
            .await
            .json();
        let c = &v["choices"][0];
        let text = c["text"].as_str().unwrap();
        assert!(text.starts_with("Hello ") && text.len() > 6, "{text}");
        let lp = &c["logprobs"];
        assert_eq!(lp["tokens"].as_array().unwrap().len(), 3);
        assert_eq!(lp["text_offset"][0], 5, "after the echoed prompt");
        assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
        let chat = s
            .post_json(
                "/v1/chat/completions",
                &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                        "logprobs": true, "top_logprobs": 3}),
            )
            .await
            .json();
        let content = chat["choices"][0]["logprobs"]["content"].as_array().unwrap();
        assert_eq!(content.len(), 2);
        assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 3);
        // A stop string ends the output before it, counting the token that completed it. (Any
        // field changes the request's text, so the stops are words common enough to appear.)
        let stops = [" the", " of", " and", " to"];
        let mut body = json!({"model": "m", "prompt": "s", "max_tokens": 200, "ignore_eos": true, "stop": stops});
        for streamed in [false, true] {
            body["stream"] = json!(streamed);
            let (text, last, tokens) = if streamed {
                let c = stream(&s, "/v1/completions", body.clone()).await;
                let text: String = c.iter().map(|c| c["choices"][0]["text"].as_str().unwrap()).collect();
                assert_eq!(c.last().unwrap()["choices"][0]["text"], "", "the stop word is dropped");
                let n = c.len();
                (text, c[n - 1]["choices"][0].clone(), n)
            } else {
                let v = s.post_json("/v1/completions", &body).await.json();
                let n = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
                (v["choices"][0]["text"].as_str().unwrap().to_string(), v["choices"][0].clone(), n)
            };
            assert_eq!(last["finish_reason"], "stop");
            assert!(stops.contains(&last["stop_reason"].as_str().unwrap()), "{last}");
            assert!(stops.iter().all(|w| !text.contains(w)), "{text}");
            assert_eq!(tokens, text.split(' ').filter(|w| !w.is_empty()).count() + 1);
        }
    })
    .await
}

#[tokio::test]
async fn tokenize_and_detokenize_like_vllm() {
    bounded(async {
        let s = Server::start(tiny_args()).await;
        let t = s
            .post_json(
                "/tokenize",
                &json!({"prompt": "abcdefgh", "return_token_strs": true}),
            )
            .await
            .json();
        assert_eq!(t["count"], 2);
        let ids = t["tokens"].clone();
        let strs: String = t["token_strs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        let d = s
            .post_json("/detokenize", &json!({"model": "m", "tokens": ids}))
            .await;
        assert_eq!(d.status, 200);
        assert_eq!(d.json()["prompt"], strs);
        for (path, body, status, param) in [
            (
                "/tokenize",
                json!({"model": "nope", "prompt": "x"}),
                404,
                json!("model"),
            ),
            ("/tokenize", json!({}), 400, json!("body.prompt")),
            (
                "/detokenize",
                json!({"tokens": "x"}),
                400,
                json!("body.tokens"),
            ),
            (
                "/detokenize",
                json!({"model": "nope", "tokens": [1]}),
                404,
                json!("model"),
            ),
        ] {
            let r = s.post_json(path, &body).await;
            assert_eq!(r.status, status, "{path} {body}");
            assert_eq!(r.json()["error"]["param"], param, "{path} {body}");
        }
    })
    .await
}

#[tokio::test]
async fn faults_still_act_on_a_request_with_several_choices() {
    bounded(async {
        let s = Server::start(EngineArgs {
            crash_rate: 1.0,
            ..tiny_args()
        })
        .await;
        let mut c = s
            .open(
                "/v1/completions",
                &json!({"model": "m", "prompt": "x", "n": 3, "max_tokens": 8, "ignore_eos": true, "stream": true}),
            )
            .await;
        let events = c.events().await;
        assert!(
            events.is_err() || !events.unwrap().contains(&"[DONE]".to_string()),
            "the stream is cut"
        );
        // The cut stream's requests are aborted: nothing stays in the engine.
        wait_metric(&s, "vllm:num_requests_running{", |v| v == 0.0).await;
    })
    .await
}
