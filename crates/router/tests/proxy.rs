//! The router as a proxy, over real sockets: streaming, routing, errors, reload.

mod common;

use common::*;
use http_body_util::BodyExt;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The router's only endpoint has no request in prefill or decode.
async fn assert_no_load(router: &str) {
    let engines = get(&client(), &format!("{router}/engines"))
        .await
        .unwrap()
        .json();
    let load = &engines["endpoints"][0]["load"];
    assert_eq!(
        (load["in_prefill"].as_u64(), load["in_decode"].as_u64()),
        (Some(0), Some(0))
    );
}

fn backends(mocks: &[&Mock]) -> String {
    mocks
        .iter()
        .map(|m| m.url.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

#[tokio::test]
async fn streams_byte_exact_and_forwards_the_first_event_before_the_second_exists() {
    let (engine, _r, _c, scripted, pending) = scripted_stream(60_000).await;
    let chunks = sse_chunks(3);
    // Only the first event exists; it must reach the client now.
    scripted.send(chunks[0].clone()).await;
    let response = pending.await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-qoe-endpoint"], engine.url.as_str());
    assert_eq!(response.headers()["x-qoe-reason"], "roundrobin");
    let mut body = response.into_body();
    let mut received = Vec::new();
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("first event forwarded while the engine holds the rest")
        .unwrap()
        .unwrap();
    received.extend_from_slice(first.data_ref().unwrap());
    assert_eq!(received, chunks[0].as_bytes());
    for c in &chunks[1..] {
        scripted.send(c.clone()).await;
    }
    drop(scripted);
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .unwrap()
    {
        if let Ok(data) = frame.unwrap().into_data() {
            received.extend_from_slice(&data);
        }
    }
    assert_eq!(
        String::from_utf8(received).unwrap(),
        chunks.concat(),
        "byte for byte"
    );
}

#[tokio::test]
async fn roundrobin_cycles_and_headers_are_set() {
    let (a, b, c3) = (mock(&["m"]).await, mock(&["m"]).await, mock(&["m"]).await);
    let r = router(&["--static-backends", &backends(&[&a, &b, &c3])]).await;
    let c = client();
    let mut order = Vec::new();
    for i in 0..6 {
        let id = format!("req-{i}");
        let ans = post(
            &c,
            &format!("{}/v1/completions", r.url),
            &completion("m", "x", false),
            &[("x-request-id", &id)],
        )
        .await;
        assert_eq!(ans.status, 200);
        assert_eq!(ans.header("x-qoe-reason"), "roundrobin");
        assert_eq!(ans.header("x-request-id"), id, "kept");
        order.push(ans.header("x-qoe-endpoint"));
    }
    assert_eq!(order[0..3], order[3..6]);
    assert_eq!(order.iter().collect::<HashSet<_>>().len(), 3);
    // The id was forwarded to the engine; a request without one gets a fresh one.
    assert!(a.requests().iter().any(|s| s
        .headers
        .get("x-request-id")
        .is_some_and(|v| v.to_str().unwrap().starts_with("req-"))));
    let ans = post_completion(&c, &r.url).await;
    assert!(ans.header("x-request-id").starts_with("qoe-"));
    // Every completed request was recorded in its endpoint's statistics, usage tokens included.
    let engines = get(&c, &format!("{}/engines", r.url)).await.unwrap().json();
    let recorded: u64 = engines["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["observed"]["window_requests"].as_u64().unwrap())
        .sum();
    assert_eq!(recorded, 7);
    let metrics = metrics_text(&c, &r.url).await;
    let tokens: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("qoe_router_output_tokens_total"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(tokens, 35.0, "5 usage tokens per request");
}

#[tokio::test]
async fn least_loaded_avoids_the_endpoint_holding_a_stream() {
    let (a, b) = (mock(&["m"]).await, mock(&["m"]).await);
    let r = router(&[
        "--static-backends",
        &backends(&[&a, &b]),
        "--routing-logic",
        "least-loaded",
    ])
    .await;
    let c = client();
    // Hold a stream open on whichever endpoint takes it (the scripts stay armed while held).
    let (sa, sb) = (a.script_next(), b.script_next());
    let pending = start_stream(&c, &r.url, "x");
    let scripted = tokio::select! {
        s = sa => s.unwrap(),
        s = sb => s.unwrap(),
    };
    scripted.send(first_chunk()).await;
    let held = pending.await.unwrap();
    let busy = held.headers()["x-qoe-endpoint"]
        .to_str()
        .unwrap()
        .to_string();
    for _ in 0..5 {
        let ans = post_completion(&c, &r.url).await;
        assert_eq!(ans.header("x-qoe-reason"), "least-loaded");
        assert_ne!(
            ans.header("x-qoe-endpoint"),
            busy,
            "went to the endpoint with a request in flight"
        );
    }
    drop(held);
}

#[tokio::test]
async fn session_and_prefix_policies_keep_affinity() {
    let (a, b, c3) = (mock(&["m"]).await, mock(&["m"]).await, mock(&["m"]).await);
    let fleet = backends(&[&a, &b, &c3]);
    let c = client();
    let r = router(&["--static-backends", &fleet, "--routing-logic", "session"]).await;
    for s in ["alice", "bob", "carol"] {
        let first = post(
            &c,
            &format!("{}/v1/completions", r.url),
            &completion("m", "x", false),
            &[("x-session-id", s)],
        )
        .await;
        assert_eq!(first.header("x-qoe-reason"), "session-hit");
        for _ in 0..3 {
            let again = post(
                &c,
                &format!("{}/v1/completions", r.url),
                &completion("m", "y", false),
                &[("x-session-id", s)],
            )
            .await;
            assert_eq!(
                again.header("x-qoe-endpoint"),
                first.header("x-qoe-endpoint")
            );
        }
    }
    let no_key = post_completion(&c, &r.url).await;
    assert_eq!(no_key.header("x-qoe-reason"), "session-no-key");
    drop(r);

    let r = router(&[
        "--static-backends",
        &fleet,
        "--routing-logic",
        "prefix-aware",
    ])
    .await;
    let system = "You are a careful assistant who answers briefly. ".repeat(20);
    let first = post(
        &c,
        &format!("{}/v1/completions", r.url),
        &completion("m", &format!("{system}Q1"), false),
        &[],
    )
    .await;
    assert_eq!(first.header("x-qoe-reason"), "prefix-miss");
    for q in ["Q2", "Q3", "Q4"] {
        let ans = post(
            &c,
            &format!("{}/v1/completions", r.url),
            &completion("m", &format!("{system}{q}"), false),
            &[],
        )
        .await;
        assert_eq!(ans.header("x-qoe-reason"), "prefix-hit");
        assert_eq!(ans.header("x-qoe-endpoint"), first.header("x-qoe-endpoint"));
    }
}

#[tokio::test]
async fn random_and_power_of_two_use_every_endpoint() {
    let (a, b, c3) = (mock(&["m"]).await, mock(&["m"]).await, mock(&["m"]).await);
    let fleet = backends(&[&a, &b, &c3]);
    let c = client();
    for policy in ["random", "power-of-two"] {
        let r = router(&["--static-backends", &fleet, "--routing-logic", policy]).await;
        let mut seen = HashSet::new();
        for _ in 0..60 {
            let ans = post_completion(&c, &r.url).await;
            assert_eq!(ans.header("x-qoe-reason"), policy);
            seen.insert(ans.header("x-qoe-endpoint"));
        }
        assert_eq!(seen.len(), 3, "{policy} used {seen:?}");
    }
}

/// While an endpoint has not listed its models (vLLM still loading), a model no other endpoint
/// serves may yet be served: 503 with Retry-After, not a 404 clients would not retry.
#[tokio::test]
async fn unknown_model_while_an_endpoint_lists_none_yet_is_503() {
    let (serving, starting) = (mock(&["llama"]).await, mock(&[]).await);
    let r = router(&["--static-backends", &backends(&[&serving, &starting])]).await;
    let c = client();
    let url = format!("{}/v1/completions", r.url);
    let ans = post(&c, &url, &completion("qwen", "x", false), &[]).await;
    assert_eq!(ans.status, 503);
    assert_eq!(ans.header("retry-after"), "1");
    let err = &ans.json()["error"];
    assert_eq!(err["param"], "model");
    let msg = err["message"].as_str().unwrap();
    assert!(
        msg.contains("qwen") && msg.contains("1 of 2") && msg.contains("llama"),
        "{msg}"
    );
    let ans = post(&c, &url, &completion("llama", "x", false), &[]).await;
    assert_eq!(ans.status, 200);
}

#[tokio::test]
async fn models_filter_candidates_merge_and_unknown_is_404() {
    let (a, b) = (
        mock(&["llama", "shared"]).await,
        mock(&["qwen", "shared"]).await,
    );
    let r = router(&["--static-backends", &backends(&[&a, &b])]).await;
    let c = client();
    for _ in 0..4 {
        let ans = post(
            &c,
            &format!("{}/v1/completions", r.url),
            &completion("qwen", "x", false),
            &[],
        )
        .await;
        assert_eq!(ans.status, 200);
        assert_eq!(ans.header("x-qoe-endpoint"), b.url);
    }
    let ans = post(
        &c,
        &format!("{}/v1/completions", r.url),
        &completion("gpt-9", "x", false),
        &[],
    )
    .await;
    assert_eq!(ans.status, 404);
    let err = &ans.json()["error"];
    assert_eq!(err["param"], "model");
    let msg = err["message"].as_str().unwrap();
    assert!(
        msg.contains("gpt-9") && msg.contains("llama") && msg.contains("qwen"),
        "{msg}"
    );

    let models = get(&c, &format!("{}/v1/models", r.url))
        .await
        .unwrap()
        .json();
    let mut ids: Vec<_> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, ["llama", "qwen", "shared"], "each model once");
    assert_eq!(
        models["data"][0]["max_model_len"], 4096,
        "the engine's own model card"
    );
}

#[tokio::test]
async fn connect_failure_retries_another_endpoint() {
    let good = mock(&["m"]).await;
    // A port with nothing listening.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let r = router(&[
        "--static-backends",
        &format!("{dead},{}", good.url),
        "--static-models",
        "m",
    ])
    .await;
    let c = client();
    for _ in 0..6 {
        let ans = post_completion(&c, &r.url).await;
        assert_eq!(ans.status, 200, "{}", String::from_utf8_lossy(&ans.body));
        assert_eq!(ans.header("x-qoe-endpoint"), good.url);
    }
    let metrics = metrics_text(&c, &r.url).await;
    let retries: f64 = metrics
        .lines()
        .find(|l| l.starts_with("qoe_router_retries_total"))
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(retries >= 3.0, "{retries}");
}

/// vLLM serves a request without `model` with its first served name; through the router that
/// holds while the fleet serves a single model, and is a 400 naming the models otherwise.
#[tokio::test]
async fn a_request_without_model_goes_to_the_fleets_only_model() {
    let c = client();
    let body = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
    let (a, b) = (mock(&["m"]).await, mock(&["m"]).await);
    let r = router(&["--static-backends", &backends(&[&a, &b])]).await;
    let ans = post(&c, &format!("{}/v1/chat/completions", r.url), body, &[]).await;
    assert_eq!(ans.status, 200);
    let empty = r#"{"model":"","messages":[{"role":"user","content":"hi"}]}"#;
    let ans = post(&c, &format!("{}/v1/chat/completions", r.url), empty, &[]).await;
    assert_eq!(ans.status, 200, "an empty name reads as none, as in vLLM");
    let chats: Vec<Seen> = [&a, &b]
        .iter()
        .flat_map(|e| e.requests())
        .filter(|s| s.path == "/v1/chat/completions")
        .collect();
    assert_eq!(chats.len(), 2, "each sent to one endpoint");
    for sent in [body, empty] {
        let forwarded = chats.iter().any(|s| s.body == sent.as_bytes());
        assert!(forwarded, "forwarded untouched: {sent}");
    }
    let (x, y) = (mock(&["m"]).await, mock(&["n"]).await);
    let two = router(&[
        "--static-backends",
        &backends(&[&x, &y]),
        "--static-models",
        "m,n",
    ])
    .await;
    let ans = post(&c, &format!("{}/v1/chat/completions", two.url), body, &[]).await;
    assert_eq!(ans.status, 400);
    let error = &ans.json()["error"];
    assert_eq!(error["param"], "model");
    assert!(
        error["message"].as_str().unwrap().contains("serve m, n"),
        "{error}"
    );
}

#[tokio::test]
async fn bad_input_gets_openai_errors_with_the_right_status() {
    let engine = mock(&["m"]).await;
    let r = router(&["--static-backends", &engine.url, "--max-body-bytes", "1000"]).await;
    let c = client();
    let url = format!("{}/v1/chat/completions", r.url);
    // (body, headers, status, the `param` the error names)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], u16, Option<&'a str>);
    let cases: &[Case] = &[
        ("{oops", &[], 400, None),
        (r#"{"model":5,"messages":[]}"#, &[], 400, Some("model")),
        (
            r#"{"model":"m","messages":[],"max_tokens":"ten"}"#,
            &[],
            400,
            Some("max_tokens"),
        ),
        (
            r#"{"model":"m","messages":[]}"#,
            &[("x-request-priority", "7")],
            400,
            Some("x-request-priority"),
        ),
        (
            r#"{"model":"m","messages":[]}"#,
            &[("x-sla-target-ms", "soon")],
            400,
            Some("x-sla-target-ms"),
        ),
        (
            r#"{"model":"m","messages":[]}"#,
            &[("x-expected-output-tokens", "-3")],
            400,
            Some("x-expected-output-tokens"),
        ),
        // A compressed body would be misread by the router and the engine alike.
        (
            r#"{"model":"m","messages":[]}"#,
            &[("content-encoding", "br")],
            415,
            Some("content-encoding"),
        ),
        (
            r#"{"model":"m","messages":[]}"#,
            &[("content-encoding", "identity, gzip")],
            415,
            Some("content-encoding"),
        ),
    ];
    for (body, headers, status, param) in cases {
        let ans = post(&c, &url, body, headers).await;
        assert_eq!(ans.status, *status, "{body}");
        let err = &ans.json()["error"];
        assert_eq!(err["type"], "invalid_request_error");
        assert_eq!(err["param"].as_str(), *param, "{body}");
        assert!(!err["message"].as_str().unwrap().is_empty());
        if *status == 415 {
            assert_eq!(ans.header("accept-encoding"), "identity");
        }
    }
    let big = format!(r#"{{"model":"m","prompt":"{}"}}"#, "a".repeat(2000));
    let ans = post(&c, &format!("{}/v1/completions", r.url), &big, &[]).await;
    assert_eq!(ans.status, 413);
    assert!(ans.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--max-body-bytes"));
    assert!(
        engine
            .requests()
            .iter()
            .all(|s| !s.path.contains("completions")),
        "nothing bad reached the engine"
    );

    // Upstream errors pass through with their bodies.
    *engine.state.fixed.lock().unwrap() =
        Some((500, r#"{"error":{"message":"engine exploded"}}"#.into()));
    let ans = post_completion(&c, &r.url).await;
    assert_eq!(ans.status, 500);
    assert!(String::from_utf8_lossy(&ans.body).contains("engine exploded"));
    *engine.state.fixed.lock().unwrap() =
        Some((400, r#"{"error":{"message":"context too long"}}"#.into()));
    let ans = post_completion(&c, &r.url).await;
    assert_eq!(ans.status, 400);
    assert!(String::from_utf8_lossy(&ans.body).contains("context too long"));
}

#[tokio::test]
async fn unhealthy_fleet_answers_503_and_recovers() {
    let engine = mock(&["m"]).await;
    let r = router(&[
        "--static-backends",
        &engine.url,
        "--health-check-interval",
        "0.05",
        "--unhealthy-threshold",
        "1",
    ])
    .await;
    let c = client();
    *engine.state.healthy.lock().unwrap() = false;
    let url = format!("{}/v1/completions", r.url);
    let mut last = 0;
    for _ in 0..300 {
        last = post(&c, &url, &completion("m", "x", false), &[])
            .await
            .status;
        if last == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(last, 503);
    let ans = post(&c, &url, &completion("m", "x", false), &[]).await;
    assert_eq!(ans.json()["error"]["type"], "service_unavailable_error");
    assert_eq!(ans.header("retry-after"), "1");
    let ready = get(&c, &format!("{}/ready", r.url)).await.unwrap();
    assert_eq!(ready.status, 503, "not ready without a healthy endpoint");
    assert_eq!(ready.json()["status"], "not_ready");
    assert_eq!(ready.json()["endpoints"], 1);
    let health = get(&c, &format!("{}/health", r.url)).await.unwrap();
    assert_eq!(health.status, 200, "liveness does not depend on the fleet");
    *engine.state.healthy.lock().unwrap() = true;
    for _ in 0..300 {
        last = post(&c, &url, &completion("m", "x", false), &[])
            .await
            .status;
        if last == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(last, 200);
    let ready = get(&c, &format!("{}/ready", r.url)).await.unwrap();
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["ready_endpoints"], 1);
}

#[tokio::test]
async fn not_ready_without_endpoints_or_models() {
    let c = client();
    let empty = router(&[]).await;
    let ready = get(&c, &format!("{}/ready", empty.url)).await.unwrap();
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["reason"], "no endpoints are configured");
    let url = format!("{}/v1/completions", empty.url);
    let ans = post(&c, &url, &completion("m", "x", false), &[]).await;
    assert_eq!(ans.status, 503);
    assert_eq!(ans.header("retry-after"), "1", "a reload may add endpoints");
    // An endpoint that was never checked healthy (refused connections, models configured) is
    // not ready, though it counts as healthy until enough checks fail.
    let dead = router(&[
        "--static-backends",
        "http://127.0.0.1:1",
        "--static-models",
        "m",
    ])
    .await;
    let ready = get(&c, &format!("{}/ready", dead.url)).await.unwrap();
    assert_eq!(ready.status, 503);
    // An endpoint that lists no models (detection found none) cannot serve a request.
    let engine = mock(&[]).await;
    let r = router(&["--static-backends", &engine.url]).await;
    let ready = get(&c, &format!("{}/ready", r.url)).await.unwrap();
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["endpoints"], 1);
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_request() {
    let engine = mock(&["m"]).await;
    let r = router(&["--static-backends", &engine.url]).await;
    let c = client();
    let script = engine.script_next();
    let pending = start_stream(&c, &r.url, "x");
    let scripted = script.await.unwrap();
    scripted.send(first_chunk()).await;
    let response = pending.await.unwrap();
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap();
    drop(body);
    drop(c);
    // The engine's stream is dropped: its sender sees the receiver closed.
    tokio::time::timeout(Duration::from_secs(10), scripted.chunks.closed())
        .await
        .expect("upstream request cancelled after the client left");
    // And the router released its load accounting.
    assert_no_load(&r.url).await;
}

/// A client that stops reading a stream holds nothing for long: once the router's writes to it
/// have waited `--request-read-timeout-ms`, its connection is closed, the upstream request
/// dropped (the engine aborts it) and the load released.
#[tokio::test]
async fn a_client_that_stops_reading_is_let_go_after_the_read_timeout() {
    use tokio::io::AsyncWriteExt;
    let engine = mock(&["m"]).await;
    let r = router(&[
        "--static-backends",
        &engine.url,
        "--request-read-timeout-ms",
        "300",
    ])
    .await;
    let script = engine.script_next();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket
        .connect(r.url.trim_start_matches("http://").parse().unwrap())
        .await
        .unwrap();
    let body = completion("m", "x", true);
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stalled.write_all(request.as_bytes()).await.unwrap();
    let scripted = script.await.unwrap();
    // The engine streams on, far more than any socket buffer, while the client reads nothing;
    // the sends fail once the router has dropped the upstream request.
    let event = format!(
        "data: {{\"choices\":[{{\"index\":0,\"text\":\"{}\"}}]}}\n\n",
        "x".repeat(1000)
    );
    let pushing = tokio::spawn(async move {
        let mut sent = 0usize;
        while scripted.chunks.send(event.clone().into()).await.is_ok() {
            sent += 1;
            assert!(sent < 1_000_000, "nothing pushed back");
        }
        sent
    });
    let sent = tokio::time::timeout(Duration::from_secs(20), pushing)
        .await
        .expect("the upstream request is dropped while the client still holds its connection")
        .unwrap();
    assert!(
        sent > 100,
        "the stream filled the buffers first: {sent} events"
    );
    assert_no_load(&r.url).await;
    drop(stalled);
}

/// Token counts past any real answer (an engine's `usage` in the billions) are taken as they
/// come, saturating, never overflowing: the stream is relayed whole and its load released.
#[tokio::test]
async fn absurd_usage_counts_from_an_engine_do_not_break_the_stream() {
    let engine = mock(&["m"]).await;
    let r = router(&["--static-backends", &engine.url]).await;
    let c = client();
    let script = engine.script_next();
    let pending = start_stream(&c, &r.url, "x");
    let scripted = script.await.unwrap();
    let event = |n: u64| {
        format!(
            "data: {{\"object\":\"text_completion\",\"choices\":[{{\"index\":0,\"text\":\"a\"}}],\"usage\":{{\"prompt_tokens\":1,\"completion_tokens\":{n}}}}}\n\n"
        )
    };
    scripted.send(event(4_000_000_000)).await;
    let response = pending.await.unwrap();
    scripted.send(event(8_000_000_000)).await;
    scripted.send("data: [DONE]\n\n").await;
    drop(scripted);
    let body = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .expect("the stream ends")
        .expect("and ends whole")
        .to_bytes();
    let expected = format!(
        "{}{}data: [DONE]\n\n",
        event(4_000_000_000),
        event(8_000_000_000)
    );
    assert_eq!(String::from_utf8_lossy(&body), expected);
    assert_no_load(&r.url).await;
}

#[tokio::test]
async fn a_client_leaving_at_done_has_its_answer_counted_whole() {
    // An OpenAI client closes the stream once it reads `[DONE]`; the engine's end of body may
    // come a moment later. The answer was whole: it counts as a finished request (what the
    // policy learns from), unlike a client that leaves before `[DONE]`.
    let engine = mock(&["m"]).await;
    let r = router(&["--static-backends", &engine.url]).await;
    let c = client();
    let finished = || async {
        let engines = get(&client(), &format!("{}/engines", r.url))
            .await
            .unwrap()
            .json();
        engines["endpoints"][0]["observed"]["window_requests"]
            .as_u64()
            .unwrap()
    };
    for (leave_after_done, counted) in [(false, 0), (true, 1)] {
        let script = engine.script_next();
        let pending = start_stream(&c, &r.url, "x");
        let scripted = script.await.unwrap();
        let chunks = sse_chunks(2);
        scripted.send(chunks[0].clone()).await;
        let mut body = pending.await.unwrap().into_body();
        body.frame().await.unwrap().unwrap();
        if leave_after_done {
            for chunk in &chunks[1..] {
                scripted.send(chunk.clone()).await;
            }
            let mut seen = String::new();
            while !seen.contains("[DONE]") {
                let frame = body.frame().await.unwrap().unwrap();
                seen.push_str(std::str::from_utf8(frame.data_ref().unwrap()).unwrap());
            }
        }
        // The engine's body is still open.
        drop(body);
        tokio::time::timeout(Duration::from_secs(10), scripted.chunks.closed())
            .await
            .expect("upstream request dropped");
        assert_eq!(
            finished().await,
            counted,
            "leave after [DONE]: {leave_after_done}"
        );
    }
}

#[tokio::test]
async fn config_file_reload_changes_endpoints_live() {
    let (a, b) = (mock(&["m"]).await, mock(&["m"]).await);
    let dir = std::env::temp_dir().join(format!("qoe-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("router.toml");
    let write = |urls: &[&str]| {
        let mut text = String::from("routing_logic = \"roundrobin\"\n");
        for u in urls {
            text.push_str(&format!("[[backends]]\nurl = \"{u}\"\nmodels = [\"m\"]\n"));
        }
        // Same-second rewrites must still be seen: write a new file and rename over.
        let tmp = dir.join("router.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };
    write(&[&a.url]);
    let r = router(&["--config", path.to_str().unwrap()]).await;
    let c = client();
    // An in-flight stream on `a` survives a's removal.
    let script = a.script_next();
    let pending = start_stream(&c, &r.url, "x");
    let scripted = script.await.unwrap();
    let chunks = sse_chunks(2);
    scripted.send(chunks[0].clone()).await;
    let response = pending.await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    write(&[&b.url]);
    let mut moved = false;
    for _ in 0..300 {
        let e = get(&c, &format!("{}/engines", r.url)).await.unwrap().json();
        if e["endpoints"][0]["url"] == b.url.as_str() {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(moved, "endpoint set reloaded");
    let ans = post_completion(&c, &r.url).await;
    assert_eq!(ans.header("x-qoe-endpoint"), b.url);
    for chunk in &chunks[1..] {
        scripted.send(chunk.clone()).await;
    }
    drop(scripted);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        String::from_utf8(body.to_vec()).unwrap(),
        sse_chunks(2).concat(),
        "in-flight request unharmed"
    );
    // The removed endpoint's labels leave /metrics, that request's count (made after) included.
    let gone = format!("endpoint=\"{}\"", a.url);
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = metrics_text(&c, &r.url).await;
        if !metrics.contains(&gone) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!metrics.contains(&gone), "{metrics}");
    assert!(metrics.contains(&format!(
        "qoe_router_requests_total{{endpoint=\"{}\"",
        b.url
    )));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A non-streamed answer arrives whole, after its generation: the first-byte budget of streams
/// does not cut it off; `--response-timeout-ms` bounds it.
#[tokio::test]
async fn a_long_non_streamed_answer_has_the_response_budget() {
    let engine = mock(&["m"]).await;
    *engine.state.first_chunk_delay_ms.lock().unwrap() = 400;
    let r = router(&[
        "--static-backends",
        &engine.url,
        "--first-byte-timeout-ms",
        "100",
    ])
    .await;
    let c = client();
    let url = format!("{}/v1/completions", r.url);
    let whole = post(&c, &url, &completion("m", "x", false), &[]).await;
    assert_eq!(
        whole.status,
        200,
        "{}",
        String::from_utf8_lossy(&whole.body)
    );
    let streamed = post(&c, &url, &completion("m", "x", true), &[]).await;
    assert_eq!(streamed.status, 504);
    assert!(streamed.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--first-byte-timeout-ms"));

    let r = router(&[
        "--static-backends",
        &engine.url,
        "--response-timeout-ms",
        "100",
    ])
    .await;
    let url = format!("{}/v1/completions", r.url);
    let whole = post(&c, &url, &completion("m", "x", false), &[]).await;
    assert_eq!(whole.status, 504);
    assert!(whole.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("within 100 ms (--response-timeout-ms)"));
}

#[tokio::test]
async fn upstream_5xx_is_retried_elsewhere_before_any_byte_is_sent() {
    let (bad, good) = (mock(&["m"]).await, mock(&["m"]).await);
    *bad.state.fixed.lock().unwrap() = Some((503, r#"{"error":{"message":"queue full"}}"#.into()));
    let r = router(&[
        "--static-backends",
        &backends(&[&bad, &good]),
        "--retry-backoff-ms",
        "1",
    ])
    .await;
    let c = client();
    for _ in 0..4 {
        let ans = post(
            &c,
            &format!("{}/v1/completions", r.url),
            &completion("m", "x", true),
            &[],
        )
        .await;
        assert_eq!(ans.status, 200);
        assert_eq!(ans.header("x-qoe-endpoint"), good.url);
        assert!(String::from_utf8_lossy(&ans.body).ends_with("data: [DONE]\n\n"));
    }
    let bad_hits = bad
        .requests()
        .iter()
        .filter(|s| s.path == "/v1/completions")
        .count();
    assert!(bad_hits >= 1, "round-robin tried the failing endpoint");
}

/// A request that may have reached an engine goes to another only if doing it twice is harmless:
/// a completion is retried after a 503, a batch's creation is not (the engine may have made it).
#[tokio::test]
async fn only_requests_safe_to_repeat_are_retried_once_sent() {
    let (a, b) = (mock(&["m"]).await, mock(&["m"]).await);
    for e in [&a, &b] {
        *e.state.fixed.lock().unwrap() = Some((503, r#"{"error":{"message":"busy"}}"#.into()));
    }
    let r = router(&[
        "--static-backends",
        &backends(&[&a, &b]),
        "--retry-backoff-ms",
        "1",
    ])
    .await;
    let c = client();
    let hits = |path: &str| {
        [&a, &b]
            .iter()
            .map(|e| e.requests().iter().filter(|s| s.path == path).count())
            .sum::<usize>()
    };
    let batch = post(
        &c,
        &format!("{}/v1/batches", r.url),
        r#"{"input_file_id":"file-1","endpoint":"/v1/chat/completions"}"#,
        &[],
    )
    .await;
    assert_eq!(batch.status, 503, "the engine's answer passes through");
    assert_eq!(hits("/v1/batches"), 1, "sent once");
    let completion = post(
        &c,
        &format!("{}/v1/completions", r.url),
        &completion("m", "x", false),
        &[],
    )
    .await;
    assert_eq!(completion.status, 503);
    assert_eq!(hits("/v1/completions"), 2, "tried on both");
}

/// An engine that reads each request and closes its connection without an answer: the request
/// may have reached it. Returns its URL and how many connections it took.
async fn closing_engine() -> (String, Arc<AtomicUsize>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let taken = Arc::new(AtomicUsize::new(0));
    let counted = taken.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf).await;
        }
    });
    (url, taken)
}

/// Once the request may have reached the engine (its connection closed after it went out),
/// only a request harmless to repeat goes to another; before anything went out (no
/// connection), any request does.
#[tokio::test]
async fn a_request_not_safe_to_repeat_is_retried_only_if_it_never_went_out() {
    let good = mock(&["m"]).await;
    let (closing, taken) = closing_engine().await;
    // Round-robin over `first` and the good engine.
    let before_good = |first: String| {
        let backends = format!("{first},{}", good.url);
        async move {
            router(&[
                "--static-backends",
                &backends,
                "--static-models",
                "m",
                "--routing-logic",
                "roundrobin",
                "--retry-backoff-ms",
                "1",
            ])
            .await
        }
    };
    let r = before_good(closing).await;
    let c = client();
    let batch = r#"{"input_file_id":"file-1","endpoint":"/v1/chat/completions"}"#;
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let ans = post(&c, &format!("{}/v1/batches", r.url), batch, &[]).await;
        statuses.push(ans.status);
    }
    statuses.sort();
    assert_eq!(
        statuses,
        [200, 502],
        "the one sent to the closing engine is not re-sent"
    );
    let batches_at_good = || {
        good.requests()
            .iter()
            .filter(|s| s.path == "/v1/batches")
            .count()
    };
    assert_eq!(batches_at_good(), 1);
    // A completion is harmless to repeat: both reach an answer.
    for _ in 0..2 {
        let ans = post_completion(&c, &r.url).await;
        assert_eq!(ans.status, 200);
    }
    assert!(taken.load(Ordering::SeqCst) >= 2);
    // With nothing listening there, a batch goes to the other endpoint.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let r = before_good(dead).await;
    for _ in 0..2 {
        let ans = post(&c, &format!("{}/v1/batches", r.url), batch, &[]).await;
        assert_eq!(ans.status, 200, "{}", String::from_utf8_lossy(&ans.body));
    }
    assert_eq!(batches_at_good(), 3);
}

/// A 429 is the engine asking to be left alone: counted toward its breaker whether it was passed
/// through (here, the only endpoint) or retried elsewhere, as a `status` failure either way.
#[tokio::test]
async fn an_engine_answering_429_has_its_breaker_opened_passed_through_or_retried() {
    for alone in [true, false] {
        let (busy, good) = (mock(&["m"]).await, mock(&["m"]).await);
        *busy.state.fixed.lock().unwrap() = Some((429, r#"{"error":{"message":"busy"}}"#.into()));
        let backends = if alone {
            busy.url.clone()
        } else {
            backends(&[&busy, &good])
        };
        let r = router(&[
            "--static-backends",
            &backends,
            "--routing-logic",
            "roundrobin",
            "--breaker-failures",
            "2",
            "--retry-backoff-ms",
            "1",
        ])
        .await;
        let c = client();
        let mut statuses = Vec::new();
        for _ in 0..6 {
            let ans = post(
                &c,
                &format!("{}/v1/completions", r.url),
                &completion("m", "x", false),
                &[],
            )
            .await;
            statuses.push(ans.status);
        }
        let busy_hits = busy
            .requests()
            .iter()
            .filter(|s| s.path == "/v1/completions")
            .count();
        assert_eq!(
            busy_hits, 2,
            "left alone after two (alone: {alone}): {statuses:?}"
        );
        if alone {
            // Its two 429s pass through; then its open breaker answers for it.
            assert_eq!(statuses, [429, 429, 503, 503, 503, 503]);
        } else {
            assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
        }
        let engines = get(&c, &format!("{}/engines", r.url)).await.unwrap().json();
        let busy_view = endpoint(&engines, &busy.url);
        assert_eq!(busy_view["breaker"], "open", "{busy_view}");
        let text = metrics_text(&c, &r.url).await;
        let counted = metric_sum(
            &text,
            &format!(
                "qoe_router_upstream_failures_total{{endpoint=\"{}\",kind=\"status\"}}",
                busy.url
            ),
        );
        assert_eq!(counted, 2.0, "{text}");
    }
}

/// When the whole fleet fails, retries stay within the budget (here one per ten requests, no
/// floor): the rest are answered with the engine's own error at once instead of re-sent.
#[tokio::test]
async fn retries_stay_within_the_retry_budget_when_every_endpoint_fails() {
    let (a, b) = (mock(&["m"]).await, mock(&["m"]).await);
    for e in [&a, &b] {
        *e.state.fixed.lock().unwrap() =
            Some((503, r#"{"error":{"message":"queue full"}}"#.into()));
    }
    let r = router(&[
        "--static-backends",
        &backends(&[&a, &b]),
        "--max-retries",
        "1",
        "--retry-backoff-ms",
        "1",
        "--retry-budget-ratio",
        "0.1",
        "--retry-budget-min-per-sec",
        "0",
        // The failures must not open the breakers: every request reaches an engine.
        "--breaker-failures",
        "1000",
    ])
    .await;
    let c = client();
    for _ in 0..30 {
        let ans = post_completion(&c, &r.url).await;
        assert_eq!(ans.status, 503);
        assert!(String::from_utf8_lossy(&ans.body).contains("queue full"));
    }
    let hits = |e: &Mock| {
        e.requests()
            .iter()
            .filter(|s| s.path == "/v1/completions")
            .count()
    };
    assert_eq!(hits(&a) + hits(&b), 33, "30 requests and 3 retries");
    let text = metrics_text(&c, &r.url).await;
    assert_eq!(metric_sum(&text, "qoe_router_retries_total"), 3.0, "{text}");
    assert_eq!(metric_sum(&text, "qoe_router_retries_refused_total"), 27.0);
    // A connect failure the budget does not retry says so.
    let dead = |_| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let dead: Vec<String> = (0..2).map(dead).collect();
    let r = router(&[
        "--static-backends",
        &dead.join(","),
        "--static-models",
        "m",
        "--retry-budget-ratio",
        "0",
        "--retry-budget-min-per-sec",
        "0",
    ])
    .await;
    let ans = post_completion(&c, &r.url).await;
    assert_eq!(ans.status, 502);
    assert!(
        ans.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the retry budget is spent"),
        "{}",
        String::from_utf8_lossy(&ans.body)
    );
}

#[tokio::test]
async fn breaker_opens_after_failures_and_closes_when_the_engine_recovers() {
    let (flaky, steady) = (mock(&["m"]).await, mock(&["m"]).await);
    *flaky.state.fixed.lock().unwrap() = Some((500, r#"{"error":{"message":"boom"}}"#.into()));
    let r = router(&[
        "--static-backends",
        &backends(&[&flaky, &steady]),
        "--max-retries",
        "0",
        "--breaker-failures",
        "3",
        "--breaker-successes",
        "2",
        "--breaker-open-secs",
        "0.3",
    ])
    .await;
    let c = client();
    let url = format!("{}/v1/completions", r.url);
    let breaker_of = |engines: &serde_json::Value, url: &str| {
        endpoint(engines, url)["breaker"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // Round-robin alternates: six requests give the flaky endpoint its three failures.
    let mut failures = 0;
    for _ in 0..6 {
        if post(&c, &url, &completion("m", "x", false), &[])
            .await
            .status
            == 500
        {
            failures += 1;
        }
    }
    assert_eq!(failures, 3);
    let engines = get(&c, &format!("{}/engines", r.url)).await.unwrap().json();
    assert_eq!(breaker_of(&engines, &flaky.url), "open");
    // While open, every request goes to the steady endpoint.
    for _ in 0..6 {
        let ans = post(&c, &url, &completion("m", "x", false), &[]).await;
        assert_eq!(
            (ans.status, ans.header("x-qoe-endpoint")),
            (200, steady.url.clone())
        );
    }
    // The engine recovers; after the pause a probe goes through, and two successes close it.
    *flaky.state.fixed.lock().unwrap() = None;
    tokio::time::sleep(Duration::from_millis(350)).await;
    let mut closed = false;
    for _ in 0..40 {
        assert_eq!(
            post(&c, &url, &completion("m", "x", false), &[])
                .await
                .status,
            200
        );
        let engines = get(&c, &format!("{}/engines", r.url)).await.unwrap().json();
        if breaker_of(&engines, &flaky.url) == "closed" {
            closed = true;
            break;
        }
    }
    assert!(closed, "breaker closed after successful probes");
}

/// A mock engine, a router with `--idle-timeout-ms idle_ms` in front, and a stream started
/// through it whose chunks the test sends.
async fn scripted_stream(
    idle_ms: u64,
) -> (
    Mock,
    TestRouter,
    TestClient,
    Scripted,
    tokio::task::JoinHandle<hyper::Response<hyper::body::Incoming>>,
) {
    let engine = mock(&["m"]).await;
    let idle = idle_ms.to_string();
    let r = router(&["--static-backends", &engine.url, "--idle-timeout-ms", &idle]).await;
    let c = client();
    let script = engine.script_next();
    let pending = start_stream(&c, &r.url, "hello");
    let scripted = script.await.unwrap();
    (engine, r, c, scripted, pending)
}

#[tokio::test]
async fn a_stream_that_goes_silent_ends_in_an_idle_timeout_event_and_gaps_shorter_keep_it() {
    let (engine, r, c, scripted, pending) = scripted_stream(600).await;
    let chunks = sse_chunks(5);
    scripted.send(chunks[0].clone()).await;
    let response = pending.await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    // Four more chunks, each well within the idle timeout of the one before, together longer than
    // it: silence is measured from the last chunk, not from the start.
    let engine_side = tokio::spawn(async move {
        for c in &chunks[1..5] {
            tokio::time::sleep(Duration::from_millis(250)).await;
            scripted.send(c.clone()).await;
        }
        // Then silence, with the connection held open.
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(scripted);
    });
    let mut received = Vec::new();
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("the router ends a silent stream itself")
    {
        if let Ok(data) = frame.unwrap().into_data() {
            received.extend_from_slice(&data);
        }
    }
    engine_side.abort();
    let received = String::from_utf8(received).unwrap();
    let expected: String = sse_chunks(5)[..5].concat();
    assert!(
        received.starts_with(&expected),
        "every chunk before the silence, byte for byte: {received}"
    );
    let rest = &received[expected.len()..];
    assert!(
        rest.starts_with("data: {") && rest.contains("idle timeout"),
        "then an error event: {rest}"
    );
    let text = metrics_text(&c, &r.url).await;
    let timeouts = metric_sum(
        &text,
        &format!(
            "qoe_router_upstream_failures_total{{endpoint=\"{}\",kind=\"timeout\"}}",
            engine.url
        ),
    );
    assert_eq!(timeouts, 1.0, "{text}");
}

/// An audio upload (`multipart/form-data`, as the `openai` client sends a transcription) is
/// routed by its `model` field and forwarded byte for byte; it is not refused as bad JSON.
#[tokio::test]
async fn a_multipart_upload_is_routed_by_its_model_field() {
    let (whisper, other) = (mock(&["whisper"]).await, mock(&["llm"]).await);
    let r = router(&["--static-backends", &backends(&[&other, &whisper])]).await;
    let c = client();
    let form =
        "--b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
                Content-Type: audio/wav\r\n\r\nRIFF{not json\r\n\
                --b0undary\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n\
                --b0undary--\r\n";
    let content_type = [("content-type", "multipart/form-data; boundary=b0undary")];
    let url = format!("{}/v1/audio/transcriptions", r.url);
    for _ in 0..3 {
        let ans = request(&c, "POST", &url, form, &content_type).await;
        assert_eq!(ans.status, 200, "{}", String::from_utf8_lossy(&ans.body));
        assert_eq!(ans.header("x-qoe-endpoint"), whisper.url);
    }
    let seen = whisper.requests();
    let sent = seen
        .iter()
        .find(|s| s.path == "/v1/audio/transcriptions")
        .unwrap();
    assert_eq!(sent.body, form.as_bytes());
    assert!(other
        .requests()
        .iter()
        .all(|s| s.path != "/v1/audio/transcriptions"));
}

/// On shutdown the router stops accepting connections and lets a stream in flight finish.
#[tokio::test]
async fn shutdown_drains_the_stream_in_flight() {
    let (_engine, mut r, _c, scripted, pending) = scripted_stream(60_000).await;
    let chunks = sse_chunks(2);
    scripted.send(chunks[0].clone()).await;
    let response = pending.await.unwrap();
    let _ = r.shutdown.take().unwrap().send(());
    let addr = r.url.trim_start_matches("http://").to_string();
    let mut refused = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(&addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "no new connections after shutdown");
    assert!(!r.task.is_finished(), "still serving the stream");
    for chunk in &chunks[1..] {
        scripted.send(chunk.clone()).await;
    }
    drop(scripted);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, chunks.concat().as_bytes());
    let served = tokio::time::timeout(Duration::from_secs(10), &mut r.task).await;
    assert!(served
        .expect("serve returned once drained")
        .unwrap()
        .is_ok());
}

/// A stream still going when `--shutdown-timeout-ms` runs out is closed, toward the client and
/// toward the engine (which aborts it), and `serve` returns.
#[tokio::test]
async fn shutdown_closes_what_outlasts_its_timeout() {
    let engine = mock(&["m"]).await;
    let mut r = router(&[
        "--static-backends",
        &engine.url,
        "--shutdown-timeout-ms",
        "200",
    ])
    .await;
    let c = client();
    let script = engine.script_next();
    let pending = start_stream(&c, &r.url, "x");
    let scripted = script.await.unwrap();
    scripted.send(first_chunk()).await;
    let mut body = pending.await.unwrap().into_body();
    body.frame().await.unwrap().unwrap();

    shut_down_while_streaming(&mut r, &scripted, &mut body).await;
}

/// A stream whose last event lacks its blank line still delivers it, and its usage counts.
#[tokio::test]
async fn an_unterminated_last_event_is_delivered_and_counted() {
    let (_engine, r, c, scripted, pending) = scripted_stream(60_000).await;
    let first = sse_chunks(1)[0].clone();
    let last = "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"choices\":[],\
                \"usage\":{\"prompt_tokens\":3,\"completion_tokens\":42,\"total_tokens\":45}}";
    scripted.send(first.clone()).await;
    let response = pending.await.unwrap();
    scripted.send(last).await;
    drop(scripted);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        String::from_utf8(body.to_vec()).unwrap(),
        format!("{first}{last}")
    );
    let mut counted = 0.0;
    for _ in 0..100 {
        let text = metrics_text(&c, &r.url).await;
        counted = metric_sum(&text, "qoe_router_output_tokens_total");
        if counted > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(counted, 42.0, "the usage of the last event");
}

/// Headers a `Connection` header names are hop-by-hop too (RFC 9110 §7.6.1): neither the
/// client's nor the engine's cross the router; `Expect` stays too (the body was read already).
#[tokio::test]
async fn headers_named_by_connection_stay_on_their_hop() {
    let engine = mock(&["m"]).await;
    *engine.state.extra_headers.lock().unwrap() = vec![
        ("connection".into(), "keep-alive, x-engine-hop".into()),
        ("x-engine-hop".into(), "internal".into()),
        ("x-engine-kept".into(), "yes".into()),
    ];
    let r = router(&["--static-backends", &engine.url]).await;
    let c = client();
    let ans = post(
        &c,
        &format!("{}/v1/completions", r.url),
        &completion("m", "x", false),
        &[
            ("connection", "keep-alive, X-Client-Hop"),
            ("x-client-hop", "secret"),
            ("x-client-kept", "yes"),
            ("expect", "100-continue"),
        ],
    )
    .await;
    assert_eq!(ans.status, 200);
    assert!(
        ans.headers.get("x-engine-hop").is_none(),
        "{:?}",
        ans.headers
    );
    assert_eq!(ans.header("x-engine-kept"), "yes");
    let seen = engine.requests();
    let sent = &seen
        .iter()
        .find(|s| s.path == "/v1/completions")
        .unwrap()
        .headers;
    assert!(sent.get("x-client-hop").is_none(), "{sent:?}");
    assert_eq!(sent.get("x-client-kept").unwrap(), "yes");
    assert!(sent.get("expect").is_none());
}

/// Only whole SSE events reach the client: an event split across frames arrives intact, and an
/// error event never lands inside an unfinished one (here: the engine goes silent mid-event).
#[tokio::test]
async fn an_error_event_follows_the_last_whole_event_never_a_partial_one() {
    let (_engine, _r, _c, scripted, pending) = scripted_stream(600).await;
    let chunks = sse_chunks(3);
    scripted.send(chunks[0].clone()).await;
    let response = pending.await.unwrap();
    let mut body = response.into_body();
    let (head, tail) = chunks[1].split_at(chunks[1].len() / 2);
    scripted.send(head.to_string()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    scripted.send(tail.to_string()).await;
    // Half of the third event, then silence.
    scripted.send(chunks[2][..10].to_string()).await;
    let mut received = Vec::new();
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("the router ends a silent stream itself")
    {
        if let Ok(data) = frame.unwrap().into_data() {
            received.extend_from_slice(&data);
        }
    }
    drop(scripted);
    let received = String::from_utf8(received).unwrap();
    let whole = format!("{}{}", chunks[0], chunks[1]);
    let rest = received
        .strip_prefix(&whole)
        .unwrap_or_else(|| panic!("the whole events first, intact: {received}"));
    assert!(
        rest.starts_with("data: {\"error\"") && rest.ends_with("\n\n") && rest.contains("idle"),
        "then the error event, at an event boundary: {rest:?}"
    );
}

/// A bare HTTP/1.1 engine on 127.0.0.1: answers every request with a small JSON completion on a
/// keep-alive connection, counts the connections that carried a completion (scrapes and health
/// checks come on their own), and closes each connection once it has been idle for
/// `close_idle_after`.
async fn counting_engine(close_idle_after: Duration) -> (String, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let count = count.clone();
            tokio::spawn(async move {
                let mut counted = false;
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = match tokio::time::timeout(close_idle_after, tcp.read(&mut chunk)).await
                    {
                        Ok(Ok(n)) if n > 0 => n,
                        _ => return,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    // One request: its head, then the body its content-length announces.
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                    if buf.len() < end + 4 + length {
                        continue;
                    }
                    buf.drain(..end + 4 + length);
                    if head.starts_with("post /v1/completions") && !counted {
                        counted = true;
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    let body = if head.starts_with("get /v1/models") {
                        r#"{"object":"list","data":[{"id":"m","object":"model"}]}"#
                    } else {
                        r#"{"id":"cmpl-1","object":"text_completion","model":"m","choices":[{"index":0,"text":"hi","finish_reason":"length"}],"usage":{"prompt_tokens":1,"total_tokens":3,"completion_tokens":2}}"#
                    };
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if tcp.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, accepted)
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_replaced_when_the_engine_closes_them() {
    let (engine, accepted) = counting_engine(Duration::from_millis(300)).await;
    let r = router(&[
        "--static-backends",
        &engine,
        "--static-models",
        "m",
        "--engine-stats-interval",
        "3600",
        "--health-check-interval",
        "3600",
    ])
    .await;
    let c = client();
    let url = format!("{}/v1/completions", r.url);
    // Requests one after another share one proxied connection.
    let before = accepted.load(Ordering::SeqCst);
    for _ in 0..5 {
        let a = post(&c, &url, &completion("m", "hello", false), &[]).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.json()["choices"][0]["text"], "hi");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst) - before,
        1,
        "one connection"
    );
    // The engine closes it once idle; the next request goes out on a new one, unharmed.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let a = post(&c, &url, &completion("m", "hello", false), &[]).await;
    assert_eq!(a.status, 200);
    assert_eq!(accepted.load(Ordering::SeqCst) - before, 2);
}

/// Disaggregated serving: a decode-stage request (`do_remote_prefill`) never goes to a prefill
/// engine, a prefill-stage one (`do_remote_decode`) never to a decode engine, and ordinary
/// requests (not split without a decode engine) stay on the engines of role `both`; a stage no
/// endpoint takes gets a 503 naming it. The split itself: tests/disaggregated.rs.
#[tokio::test]
async fn requests_go_to_the_endpoints_whose_role_takes_their_stage() {
    let (prefill, decode, both) = (mock(&["m"]).await, mock(&["m"]).await, mock(&["m"]).await);
    let dir = std::env::temp_dir().join(format!("qoe-roles-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("router.toml");
    let backends = |list: &[(&str, &str)]| {
        let mut text = String::from("routing_logic = \"roundrobin\"\n");
        for (url, role) in list {
            text.push_str(&format!(
                "[[backends]]\nurl = \"{url}\"\nmodels = [\"m\"]\nrole = \"{role}\"\n"
            ));
        }
        text
    };
    std::fs::write(
        &path,
        backends(&[
            (&prefill.url, "prefill"),
            (&decode.url, "decode"),
            (&both.url, "both"),
        ]),
    )
    .unwrap();
    let r = router(&["--config", path.to_str().unwrap()]).await;
    let c = client();
    let url = format!("{}/v1/completions", r.url);
    let staged = |flag: &str| {
        format!(
            r#"{{"model":"m","prompt":"x","max_tokens":2,"kv_transfer_params":{{"{flag}":true}}}}"#
        )
    };
    let seen = |body: &str| {
        let (c, url, body) = (c.clone(), url.clone(), body.to_string());
        async move {
            let ans = post(&c, &url, &body, &[]).await;
            assert_eq!(ans.status, 200, "{body}");
            ans.header("x-qoe-endpoint")
        }
    };
    let mut decode_stage = HashSet::new();
    let mut prefill_stage = HashSet::new();
    for _ in 0..6 {
        decode_stage.insert(seen(&staged("do_remote_prefill")).await);
        prefill_stage.insert(seen(&staged("do_remote_decode")).await);
    }
    assert_eq!(
        decode_stage,
        HashSet::from([decode.url.clone(), both.url.clone()])
    );
    assert_eq!(
        prefill_stage,
        HashSet::from([prefill.url.clone(), both.url.clone()])
    );

    // With prefill engines and engines of role both (no decode engine: nothing to split),
    // ordinary requests stay on the latter; with prefill engines only, they use those, and
    // decode-stage requests are refused, naming the parameter.
    let (r2, r3) = {
        let two = dir.join("pb.toml");
        std::fs::write(
            &two,
            backends(&[(&prefill.url, "prefill"), (&both.url, "both")]),
        )
        .unwrap();
        let one = dir.join("p.toml");
        std::fs::write(&one, backends(&[(&prefill.url, "prefill")])).unwrap();
        (
            router(&["--config", two.to_str().unwrap()]).await,
            router(&["--config", one.to_str().unwrap()]).await,
        )
    };
    let mut ordinary = HashSet::new();
    for _ in 0..4 {
        let ans = post(
            &c,
            &format!("{}/v1/completions", r2.url),
            &completion("m", "x", false),
            &[],
        )
        .await;
        assert_eq!(ans.status, 200);
        ordinary.insert(ans.header("x-qoe-endpoint"));
    }
    assert_eq!(ordinary, HashSet::from([both.url.clone()]));
    let ans = post(
        &c,
        &format!("{}/v1/completions", r3.url),
        &completion("m", "x", false),
        &[],
    )
    .await;
    assert_eq!(ans.header("x-qoe-endpoint"), prefill.url);
    let ans = post(
        &c,
        &format!("{}/v1/completions", r3.url),
        &staged("do_remote_prefill"),
        &[],
    )
    .await;
    assert_eq!(ans.status, 503);
    let err = ans.json();
    assert_eq!(err["error"]["param"], "kv_transfer_params", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("role decode"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The engine learns who the client is: the router appends the address it saw to
/// `X-Forwarded-For`, after whatever the client (or a proxy before it) put there.
#[tokio::test]
async fn the_clients_address_is_appended_to_x_forwarded_for() {
    let engine = mock(&["m"]).await;
    let r = router(&["--static-backends", &engine.url]).await;
    let c = client();
    let url = format!("{}/v1/completions", r.url);
    let body = completion("m", "x", false);
    let cases: [(&[(&str, &str)], &str); 4] = [
        (&[], "127.0.0.1"),
        (
            &[("x-forwarded-for", "203.0.113.7")],
            "203.0.113.7, 127.0.0.1",
        ),
        (
            &[
                ("x-forwarded-for", "203.0.113.7"),
                ("x-forwarded-for", "10.1.2.3"),
            ],
            "203.0.113.7, 10.1.2.3, 127.0.0.1",
        ),
        // Named by the client's Connection, the earlier list is its hop's; the router's stays.
        (
            &[
                ("connection", "keep-alive, x-forwarded-for"),
                ("x-forwarded-for", "6.6.6.6"),
            ],
            "127.0.0.1",
        ),
    ];
    for (headers, seen) in cases {
        assert_eq!(post(&c, &url, &body, headers).await.status, 200);
        let sent = engine.requests();
        let last = sent
            .iter()
            .rev()
            .find(|s| s.path == "/v1/completions")
            .unwrap();
        let values: Vec<_> = last.headers.get_all("x-forwarded-for").iter().collect();
        assert_eq!(values, [seen], "{headers:?}");
    }
}

/// A router in front of `engine` holding 4 KiB of request bodies at most.
async fn with_body_budget_of_4k(engine: &Mock) -> TestRouter {
    router(&[
        "--static-backends",
        &engine.url,
        "--max-buffered-body-bytes",
        "4096",
        "--max-body-bytes",
        "4096",
    ])
    .await
}

/// Request bodies held at once are bounded (`--max-buffered-body-bytes`): while one upload
/// holds most of the budget, another that would pass it is answered 503 at once; once the
/// first is gone, it goes through.
#[tokio::test]
async fn request_bodies_held_at_once_stay_within_the_budget() {
    use tokio::io::AsyncWriteExt;
    let engine = mock(&["m"]).await;
    let r = with_body_budget_of_4k(&engine).await;
    // An upload that sends 3,000 bytes and stops, its body unfinished.
    let mut slow = tokio::net::TcpStream::connect(r.url.trim_start_matches("http://"))
        .await
        .unwrap();
    let start = format!(r#"{{"model":"m","prompt":"{}"#, "a".repeat(3000));
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{start}\r\n",
        start.len()
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    let c = client();
    let other = format!(r#"{{"model":"m","prompt":"{}"}}"#, "b".repeat(3000));
    let url = format!("{}/v1/completions", r.url);
    let mut refused = None;
    for _ in 0..200 {
        let ans = post(&c, &url, &other, &[]).await;
        if ans.status == 503 {
            refused = Some(ans);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = refused.expect("refused while the first holds the budget");
    assert_eq!(refused.header("retry-after"), "1");
    assert!(refused.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--max-buffered-body-bytes"));
    drop(slow);
    let mut status = 0;
    for _ in 0..200 {
        status = post(&c, &url, &other, &[]).await.status;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        status, 200,
        "the budget came back with the first upload's end"
    );
}

/// A body read whole stays counted until its endpoint's first byte (the router keeps it for a
/// retry): while one request waits for a slow engine, another that would pass the budget is
/// refused.
#[tokio::test]
async fn a_body_stays_counted_until_its_endpoints_first_byte() {
    let engine = mock(&["m"]).await;
    *engine.state.first_chunk_delay_ms.lock().unwrap() = 1500;
    let r = with_body_budget_of_4k(&engine).await;
    let c = client();
    let url = format!("{}/v1/completions", r.url);
    let body = |letter: &str| format!(r#"{{"model":"m","prompt":"{}"}}"#, letter.repeat(3000));
    let waiting = {
        let (c, url, body) = (c.clone(), url.clone(), body("a"));
        tokio::spawn(async move { post(&c, &url, &body, &[]).await })
    };
    let mut refused = false;
    for _ in 0..100 {
        if engine
            .requests()
            .iter()
            .any(|s| s.path == "/v1/completions")
        {
            refused = post(&c, &url, &body("b"), &[]).await.status == 503;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        refused,
        "the first body was still counted while its engine worked"
    );
    assert_eq!(waiting.await.unwrap().status, 200);
}
