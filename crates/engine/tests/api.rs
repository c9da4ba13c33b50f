//! vLLM's HTTP surface over real sockets: formats, lengths, errors, metrics, disconnects.

mod common;

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn parse_events(events: &[String]) -> (Vec<Value>, bool) {
    let done = events.last().map(String::as_str) == Some("[DONE]");
    let n = events.len() - usize::from(done);
    let chunks = events[..n]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("{err}: {e}")))
        .collect();
    (chunks, done)
}

#[tokio::test]
async fn streaming_completion_has_vllm_chunks_and_usage() {
    bounded(async {
        let s = Server::start(tiny_args()).await;
        let prompt = "x".repeat(41); // 11 tokens
        let mut c = s
            .open(
                "/v1/completions",
                &json!({"model": "m", "prompt": prompt, "max_tokens": 7, "ignore_eos": true,
                        "stream": true, "stream_options": {"include_usage": true}}),
            )
            .await;
        assert_eq!(c.status, 200);
        let ct = c.headers.iter().find(|(k, _)| k == "content-type").unwrap();
        assert!(ct.1.starts_with("text/event-stream"), "{ct:?}");
        let (chunks, done) = parse_events(&c.events().await.unwrap());
        assert!(done, "ends with data: [DONE]");
        assert_eq!(chunks.len(), 8, "7 tokens and the usage chunk");
        let id = chunks[0]["id"].as_str().unwrap();
        assert!(id.starts_with("cmpl-"));
        for (i, c) in chunks[..7].iter().enumerate() {
            assert_eq!(c["id"], id);
            assert_eq!(c["object"], "text_completion");
            assert_eq!(c["model"], "m");
            assert!(c["created"].as_u64().unwrap() > 1_600_000_000);
            let choice = &c["choices"][0];
            assert_eq!(choice["index"], 0);
            assert!(choice["text"].as_str().unwrap().starts_with(' '));
            assert_eq!(choice["logprobs"], Value::Null);
            let want = if i == 6 { json!("length") } else { Value::Null };
            assert_eq!(choice["finish_reason"], want);
        }
        let usage = &chunks[7];
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(
            usage["usage"],
            json!({"prompt_tokens": 11, "total_tokens": 18, "completion_tokens": 7})
        );
    })
    .await
}

#[tokio::test]
async fn streaming_chat_opens_with_the_role() {
    bounded(async {
        let s = Server::start(tiny_args()).await;
        let mut c = s
            .open(
                "/v1/chat/completions",
                &json!({"model": "m", "messages": [{"role": "user", "content": "hi there"}],
                        "max_completion_tokens": 5, "ignore_eos": true, "stream": true}),
            )
            .await;
        let (chunks, done) = parse_events(&c.events().await.unwrap());
        assert!(done);
        assert_eq!(
            chunks.len(),
            6,
            "role chunk + 5 tokens, no usage unless asked"
        );
        assert!(chunks[0]["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(chunks[0]["object"], "chat.completion.chunk");
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        for c in &chunks[1..] {
            assert!(c["choices"][0]["delta"]["content"].as_str().unwrap().len() > 1);
            assert!(c["choices"][0]["delta"].get("role").is_none());
        }
        assert_eq!(chunks[5]["choices"][0]["finish_reason"], "length");
        assert_eq!(chunks[4]["choices"][0]["finish_reason"], Value::Null);
    })
    .await
}

#[tokio::test]
async fn answers_are_named_after_the_clients_request_id() {
    bounded(async {
        let s = Server::start(tiny_args()).await;
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                          "max_tokens": 2})
        .to_string();
        let mut stream = TcpStream::connect(s.addr).await.unwrap();
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: \
             application/json\r\nX-Request-Id: trace-42\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.unwrap();
        let json = &raw[raw.find("\r\n\r\n").unwrap() + 4..];
        let v: Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["id"], "chatcmpl-trace-42", "as vLLM does");
        // Without one, an id of its own.
        let r = s
            .post_json("/v1/completions", &json!({"model": "m", "prompt": "x"}))
            .await;
        let id = r.json()["id"].as_str().unwrap().to_string();
        assert!(id.starts_with("cmpl-") && id.len() > 20, "{id}");
    })
    .await
}

#[tokio::test]
async fn a_seeded_answer_is_the_same_text_whatever_max_tokens_and_stop_say() {
    bounded(async {
        let s = Server::start(tiny_args()).await;
        let text = |extra: Value| {
            let mut body = json!({"model": "m", "prompt": "once upon a time", "seed": 42,
                                  "temperature": 1.0, "ignore_eos": true});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let s = &s;
            async move {
                let r = s.post_json("/v1/completions", &body).await;
                r.json()["choices"][0]["text"].as_str().unwrap().to_string()
            }
        };
        let short = text(json!({"max_tokens": 8})).await;
        let long = text(json!({"max_tokens": 20})).await;
        assert!(long.starts_with(&short), "{short:?} / {long:?}");
        assert_ne!(short, long);
        let stopped = text(json!({"max_tokens": 20, "stop": ["zzz-never"]})).await;
        assert_eq!(stopped, long);
        // Another seed, another text; another prompt, even a short one, another text.
        let other = text(json!({"max_tokens": 20, "seed": 7})).await;
        assert_ne!(other, long);
        let hi = text(json!({"max_tokens": 20, "prompt": "hi"})).await;
        let yo = text(json!({"max_tokens": 20, "prompt": "yo"})).await;
        assert_ne!(hi, yo);
    })
    .await
}

#[tokio::test]
async fn non_streaming_answers_carry_usage() {
    bounded(async {
        let s = Server::start(tiny_args()).await;
        let r = s
            .post_json(
                "/v1/completions",
                &json!({"model": "m", "prompt": "abcdefgh", "max_tokens": 9, "ignore_eos": true}),
            )
            .await;
        assert_eq!(r.status, 200);
        let v = r.json();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["prompt_tokens"], 2);
        assert_eq!(v["usage"]["completion_tokens"], 9);
        assert_eq!(v["usage"]["total_tokens"], 11);
        let text = v["choices"][0]["text"].as_str().unwrap();
        assert_eq!(
            text.split(' ').filter(|w| !w.is_empty()).count(),
            9,
            "one word per token"
        );

        // Chat: "system: be brief\nuser: hello\n" is 29 bytes, 8 tokens.
        let r = s
            .post_json(
                "/v1/chat/completions",
                &json!({"model": "m", "max_tokens": 3, "ignore_eos": true, "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "hello"}]}]}),
            )
            .await;
        let v = r.json();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["usage"]["prompt_tokens"], 8);
        assert_eq!(v["usage"]["completion_tokens"], 3);
    })
    .await
}

#[tokio::test]
async fn ignore_eos_yields_exactly_max_tokens() {
    bounded(async {
        let s = Server::start(tiny_args()).await;
        for n in [1u32, 2, 17, 100] {
            let mut c = s
                .open(
                    "/v1/completions",
                    &json!({"model": "m", "prompt": "p", "max_tokens": n, "ignore_eos": true, "stream": true}),
                )
                .await;
            let (chunks, done) = parse_events(&c.events().await.unwrap());
            assert!(done);
            assert_eq!(chunks.len() as u32, n);
        }
    })
    .await
}

#[tokio::test]
async fn output_length_is_drawn_per_request_and_reproducible() {
    bounded(async {
        let s = Server::start(EngineArgs {
            output_len_median: 30,
            ..tiny_args()
        })
        .await;
        let mut lens = Vec::new();
        for i in 0..12 {
            let body = json!({"model": "m", "prompt": format!("question {i}"), "max_tokens": 60});
            let a = s.post_json("/v1/completions", &body).await.json();
            let b = s.post_json("/v1/completions", &body).await.json();
            let n = a["usage"]["completion_tokens"].as_u64().unwrap();
            assert_eq!(
                n,
                b["usage"]["completion_tokens"].as_u64().unwrap(),
                "same request, same length"
            );
            assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
            let want = if n < 60 { "stop" } else { "length" };
            assert_eq!(a["choices"][0]["finish_reason"], want);
            assert!((1..=60).contains(&n));
            lens.push(n);
        }
        lens.sort();
        lens.dedup();
        assert!(lens.len() >= 6, "lengths vary between requests: {lens:?}");
        // A request's `seed` gives another draw.
        let body =
            |seed: u64| json!({"model": "m", "prompt": "same", "max_tokens": 60, "seed": seed});
        let mut by_seed = Vec::new();
        for seed in 0..6 {
            by_seed.push(
                s.post_json("/v1/completions", &body(seed)).await.json()["usage"]
                    ["completion_tokens"]
                    .as_u64(),
            );
        }
        by_seed.dedup();
        assert!(by_seed.len() > 1, "{by_seed:?}");
    })
    .await
}

fn assert_openai_error(r: &Resp, status: u16) -> Value {
    assert_eq!(r.status, status, "{}", r.body);
    let v = r.json();
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string());
    assert!(e.get("param").is_some());
    assert_eq!(e["code"], status);
    v
}

#[tokio::test]
async fn bad_requests_get_openai_errors() {
    bounded(async {
        let s = Server::start(EngineArgs {
            max_model_len: Some(100),
            ..tiny_args()
        })
        .await;
        assert_openai_error(&s.post("/v1/completions", "{\"model\":").await, 400);
        assert_openai_error(&s.post("/v1/chat/completions", "[1,2]").await, 400);
        let v = assert_openai_error(
            &s.post_json(
                "/v1/completions",
                &json!({"model": "m", "prompt": "x", "max_tokens": "ten"}),
            )
            .await,
            400,
        );
        assert_eq!(v["error"]["param"], "body.max_tokens");
        assert_eq!(v["error"]["type"], "Bad Request");
        let v = assert_openai_error(
            &s.post_json(
                "/v1/chat/completions",
                &json!({"model": "m", "messages": "hello"}),
            )
            .await,
            400,
        );
        assert_eq!(v["error"]["param"], "body.messages");
        // A prompt longer than the context: 101 tokens.
        let v = assert_openai_error(
            &s.post_json(
                "/v1/completions",
                &json!({"model": "m", "prompt": "y".repeat(404), "max_tokens": 20}),
            )
            .await,
            400,
        );
        assert_eq!(v["error"]["param"], "input_tokens");
        // A body of megabytes is read as vLLM reads it (no 2 MiB cap), and refused for its
        // length; one past the engine's limit gets 413, in OpenAI's shape too.
        let long = json!({"model": "m", "prompt": "y".repeat(3 << 20), "max_tokens": 20});
        let long = assert_openai_error(&s.post_json("/v1/completions", &long).await, 400);
        assert_eq!(long["error"]["param"], "input_tokens");
        let huge = format!(
            "{{\"model\":\"m\",\"prompt\":\"{}\"}}",
            "y".repeat(qoe_engine::MAX_BODY_BYTES)
        );
        let v413 = assert_openai_error(&s.post("/v1/completions", &huge).await, 413);
        assert!(
            v413["error"]["message"]
                .as_str()
                .unwrap()
                .contains("over 67108864 bytes"),
            "{v413}"
        );
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("maximum context length is 100 tokens") && msg.contains("at least 101"),
            "{msg}"
        );
        let v = assert_openai_error(
            &s.post_json(
                "/v1/completions",
                &json!({"model": "m", "prompt": "x", "max_tokens": 101}),
            )
            .await,
            400,
        );
        assert_eq!(v["error"]["param"], "max_tokens");
        let v = assert_openai_error(
            &s.post_json("/v1/completions", &json!({"model": "gpt-9", "prompt": "x"}))
                .await,
            404,
        );
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("gpt-9") && msg.contains("Valid aliases: m"),
            "{msg}"
        );
        assert_eq!(v["error"]["type"], "NotFoundError");
    })
    .await
}

use qoe_engine::EngineArgs;

#[tokio::test]
async fn priority_field_is_accepted_with_priority_scheduling() {
    bounded(async {
        let s = Server::start(EngineArgs {
            scheduling_policy: qoe_sim::Scheduling::Priority,
            ..tiny_args()
        })
        .await;
        let r = s
            .post_json(
                "/v1/completions",
                &json!({"model": "m", "prompt": "x", "priority": -5, "max_tokens": 2}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    })
    .await
}

#[tokio::test]
async fn models_health_load_tokenize() {
    bounded(async {
        let s = Server::start(EngineArgs {
            models: vec!["m".into(), "alias".into()],
            ..tiny_args()
        })
        .await;
        assert_eq!(s.get("/health").await.status, 200);
        let m = s.get("/v1/models").await.json();
        assert_eq!(m["object"], "list");
        let ids: Vec<&str> = m["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["m", "alias"]);
        assert_eq!(m["data"][0]["max_model_len"], 4096);
        assert_eq!(m["data"][1]["root"], "m");
        // Both names are served.
        let r = s
            .post_json(
                "/v1/completions",
                &json!({"model": "alias", "prompt": "x", "max_tokens": 1}),
            )
            .await;
        assert_eq!(r.status, 200);
        let t = s
            .post_json("/tokenize", &json!({"prompt": "abcdefghi"}))
            .await
            .json();
        assert_eq!(t["count"], 3);
        assert_eq!(t["max_model_len"], 4096);
        assert_eq!(t["tokens"].as_array().unwrap().len(), 3);
        let t = s
            .post_json(
                "/tokenize",
                &json!({"model": "m", "messages": [{"role": "user", "content": "hello"}]}),
            )
            .await
            .json();
        assert_eq!(t["count"], 3);
        assert_eq!(s.get("/load").await.json()["server_load"], 0);
        // `/load` counts HTTP requests, as vLLM's does: one stream of three choices is one.
        let mut three = s
            .open(
                "/v1/completions",
                &json!({"model": "m", "prompt": "x", "max_tokens": 3000, "ignore_eos": true,
                        "stream": true, "n": 3}),
            )
            .await;
        three.next_event().await.unwrap().unwrap();
        assert_eq!(s.get("/load").await.json()["server_load"], 1);
        drop(three);
        // The client gone, its request leaves the count (however long the engine takes to see).
        let mut load = Value::Null;
        for _ in 0..500 {
            load = s.get("/load").await.json()["server_load"].clone();
            if load == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(load, 0);
        assert_eq!(s.get("/nope").await.status, 404);
    })
    .await
}

#[tokio::test]
async fn metrics_have_vllm_v1_names_and_labels() {
    bounded(async {
        let s = Server::start(tiny_args()).await;
        let prompt = "z".repeat(640); // 160 tokens, 10 full blocks
        for _ in 0..2 {
            let r = s
                .post_json(
                    "/v1/completions",
                    &json!({"model": "m", "prompt": prompt, "max_tokens": 4, "ignore_eos": true}),
                )
                .await;
            assert_eq!(r.status, 200);
        }
        let r = s.get("/metrics").await;
        assert!(r.header("content-type").unwrap().starts_with("text/plain"));
        let text = r.body;
        for name in [
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "vllm:kv_cache_usage_perc",
            "vllm:prefix_cache_queries_total",
            "vllm:prefix_cache_hits_total",
            "vllm:num_preemptions_total",
            "vllm:prompt_tokens_total",
            "vllm:generation_tokens_total",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}");
            assert!(
                text.contains(&format!("{name}{{engine=\"0\",model_name=\"m\"}} ")),
                "{name}"
            );
        }
        for h in [
            "vllm:time_to_first_token_seconds",
            "vllm:inter_token_latency_seconds",
            "vllm:e2e_request_latency_seconds",
            "vllm:request_queue_time_seconds",
        ] {
            assert!(text.contains(&format!("# TYPE {h} histogram")));
            assert!(text.contains(&format!(
                "{h}_bucket{{engine=\"0\",le=\"+Inf\",model_name=\"m\"}}"
            )));
            assert!(text.contains(&format!("{h}_sum{{engine=\"0\",model_name=\"m\"}}")));
            assert!(text.contains(&format!("{h}_count{{engine=\"0\",model_name=\"m\"}}")));
        }
        assert!(!text.contains("gpu_cache_usage_perc"));
        assert_eq!(
            metric_in(&text, "vllm:generation_tokens_total{").unwrap(),
            8.0
        );
        assert_eq!(
            metric_in(&text, "vllm:prompt_tokens_total{").unwrap(),
            320.0
        );
        assert_eq!(
            metric_in(&text, "vllm:time_to_first_token_seconds_count{").unwrap(),
            2.0
        );
        assert_eq!(
            metric_in(&text, "vllm:inter_token_latency_seconds_count{").unwrap(),
            6.0
        );
        // The second request hit the first one's 9 cacheable blocks (the last token is computed).
        assert_eq!(
            metric_in(&text, "vllm:prefix_cache_hits_total{").unwrap(),
            144.0
        );
        assert_eq!(
            metric_in(&text, "vllm:prefix_cache_queries_total{").unwrap(),
            320.0
        );

        // The router's parser reads it as a V1 vLLM.
        let parsed = qoe_core::engine_metrics::parse_engine_metrics_detailed(&text, Some("m"));
        assert_eq!(
            parsed.flavour,
            qoe_core::engine_metrics::EngineFlavour::VllmV1
        );
        let m = parsed.metrics;
        assert_eq!(m.generation_tokens, Some(8.0));
        assert_eq!(m.prefix_hits, Some(144.0));
        assert_eq!(m.ttft_count, Some(2.0));
        assert!(m.itl_sum.is_some() && m.kv_usage == Some(0.0) && m.running == Some(0.0));
    })
    .await
}

#[tokio::test]
async fn v0_metric_names_on_request() {
    bounded(async {
        let s = Server::start(EngineArgs {
            v0_metrics: true,
            ..tiny_args()
        })
        .await;
        let text = s.get("/metrics").await.body;
        for name in [
            "vllm:gpu_cache_usage_perc",
            "vllm:gpu_prefix_cache_hit_rate",
            "vllm:gpu_prefix_cache_queries_total",
            "vllm:gpu_prefix_cache_hits_total",
        ] {
            assert!(
                text.contains(&format!("{name}{{model_name=\"m\"}} ")),
                "{name}"
            );
        }
        assert!(text.contains("vllm:kv_cache_usage_perc{"), "V1 names stay");
    })
    .await
}

#[tokio::test]
async fn a_disconnect_aborts_the_request_and_frees_its_kv() {
    bounded(async {
        let s = Server::start(tiny_args()).await;
        let mut c = s
            .open(
                "/v1/completions",
                &json!({"model": "m", "prompt": "w".repeat(2000), "max_tokens": 3000, "ignore_eos": true, "stream": true}),
            )
            .await;
        for _ in 0..3 {
            c.next_event().await.unwrap().unwrap();
        }
        assert_eq!(s.metric("vllm:num_requests_running{").await, 1.0);
        assert!(s.metric("vllm:kv_cache_usage_perc{").await > 0.0);
        drop(c);
        // No timing: wait until the engine notices, however long that takes (bounded by the test).
        wait_metric(&s, "vllm:num_requests_running{", |v| v == 0.0).await;
        assert_eq!(s.metric("vllm:kv_cache_usage_perc{").await, 0.0);
        assert_eq!(s.metric("vllm:request_success_total{engine=\"0\",finished_reason=\"abort\"").await, 1.0);
        assert!(s.metric("vllm:generation_tokens_total{").await < 3000.0);
    })
    .await
}

#[tokio::test]
async fn many_concurrent_streams_each_get_their_tokens() {
    bounded(async {
        let s = Server::start(tiny_args()).await;
        let mut tasks = Vec::new();
        for i in 0..300u32 {
            let addr = s.addr;
            tasks.push(tokio::spawn(async move {
                let n = 5 + i % 40;
                let body = json!({"model": "m", "prompt": format!("{i} ").repeat(20), "max_tokens": n,
                                  "ignore_eos": true, "stream": true});
                let mut c = Conn::send(addr, "POST", "/v1/completions", Some(&body.to_string())).await;
                c.read_head().await.unwrap();
                let ev = c.events().await.unwrap();
                assert_eq!(ev.last().unwrap(), "[DONE]");
                (ev.len() - 1) as u32 == n
            }));
        }
        for t in tasks {
            assert!(t.await.unwrap());
        }
        let text = s.get("/metrics").await.body;
        assert_eq!(metric_in(&text, "vllm:num_requests_running{").unwrap(), 0.0);
        assert_eq!(metric_in(&text, "vllm:e2e_request_latency_seconds_count{").unwrap(), 300.0);
    })
    .await
}

#[tokio::test]
async fn shutdown_ends_open_streams() {
    bounded(async {
        let s = Server::start(tiny_args()).await;
        let mut c = s
            .open(
                "/v1/completions",
                &json!({"model": "m", "prompt": "x", "max_tokens": 600, "ignore_eos": true, "stream": true}),
            )
            .await;
        c.next_event().await.unwrap().unwrap();
        s.stop().await.unwrap();
        // The stream was cut, not completed.
        let rest = c.events().await;
        assert!(rest.is_err() || !rest.unwrap().contains(&"[DONE]".to_string()));
    })
    .await
}

#[tokio::test]
async fn keep_alive_serves_requests_in_turn_and_shutdown_closes_idle_connections() {
    bounded(async {
        let s = Server::start(tiny_args()).await;
        let mut tcp = TcpStream::connect(s.addr).await.unwrap();
        let req = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
        let mut buf = vec![0u8; 4096];
        for _ in 0..2 {
            tcp.write_all(req.as_bytes()).await.unwrap();
            let n = tcp.read(&mut buf).await.unwrap();
            let head = String::from_utf8_lossy(&buf[..n]);
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        }
        // Idle between requests: shutdown must not wait for the client to hang up.
        s.stop().await.unwrap();
        assert_eq!(tcp.read(&mut buf).await.unwrap(), 0, "closed by the engine");
    })
    .await
}

/// Streams 300 tokens while the host (the test's only thread, shared with the server) stalls
/// 200 ms mid-stream; returns the events received and `/admin/stats`' `loop`.
async fn stream_through_a_host_stall(args: EngineArgs) -> (Vec<Value>, bool, Value) {
    let s = Server::start(args).await;
    let mut c = s
        .open(
            "/v1/completions",
            &json!({"model": "m", "prompt": "x", "max_tokens": 300, "ignore_eos": true, "stream": true}),
        )
        .await;
    let first = c.next_event().await.unwrap().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut events = vec![first];
    events.extend(c.events().await.unwrap());
    let (chunks, done) = parse_events(&events);
    let stats = s.get("/admin/stats").await.json();
    (chunks, done, stats["loop"].clone())
}

#[tokio::test]
async fn a_host_stall_is_caught_up_without_losing_time() {
    bounded(async {
        let (chunks, done, l) = stream_through_a_host_stall(tiny_args()).await;
        assert!(done);
        assert_eq!(chunks.len(), 300, "every token once");
        assert_eq!(chunks[299]["choices"][0]["finish_reason"], "length");
        assert_eq!(
            (l["resyncs"].as_u64(), l["lost_micros"].as_u64()),
            (Some(0), Some(0)),
            "{l}"
        );
        assert!(l["catch_up_iterations"].as_u64().unwrap() > 0, "{l}");
        assert!(l["max_lag_micros"].as_u64().unwrap() >= 150_000, "{l}");
        assert_eq!(l["catch_up_limit_micros"], 1_000_000);
        assert!(l["lag_micros"].is_u64(), "{l}");
        assert_eq!(l["tokens_delivered"], 300);
        // A frame carries at least one token: never more frames than tokens.
        let frames = l["frames_written"].as_u64().unwrap();
        assert!((1..=300).contains(&frames), "{l}");
    })
    .await
}

#[tokio::test]
async fn a_stall_beyond_the_catch_up_limit_is_dropped_and_counted() {
    bounded(async {
        let args = EngineArgs {
            catch_up_limit_ms: 20,
            ..tiny_args()
        };
        let (chunks, done, l) = stream_through_a_host_stall(args).await;
        assert!(done);
        assert_eq!(chunks.len(), 300, "every token once");
        assert!(l["resyncs"].as_u64().unwrap() >= 1, "{l}");
        assert!(l["lost_micros"].as_u64().unwrap() >= 150_000, "{l}");
        assert_eq!(l["catch_up_limit_micros"], 20_000);
    })
    .await
}
