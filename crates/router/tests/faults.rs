//! Faults, driven by in-process simulated engines (`qoe_engine`, `tiny` profile) behind the router,
//! over real sockets on 127.0.0.1. Each test is bounded in time and asserts behaviour and counts,
//! never timing thresholds: an engine stopped mid-run, a hung engine, the breaker's cycle, a
//! client that leaves, an engine crashing mid-stream.

mod common;

use bytes::Bytes;
use common::engine::{Engine, MODEL};
use common::*;
use http_body_util::{BodyExt, Full};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn body(max_tokens: u32, stream: bool) -> String {
    serde_json::json!({
        "model": MODEL, "prompt": "tell me a story", "max_tokens": max_tokens,
        "ignore_eos": true, "stream": stream,
    })
    .to_string()
}

/// How a streamed answer ended, as the client read it.
#[derive(Debug, Default)]
struct Stream {
    status: u16,
    /// Events carrying text before the end.
    tokens: usize,
    done: bool,
    /// The `error` object of an error event, if one came.
    error: Option<serde_json::Value>,
    /// Raw body when the answer was not a stream (an error status).
    body: String,
}

async fn stream(c: &TestClient, router: &str, max_tokens: u32) -> Stream {
    let req = http::Request::post(format!("{router}/v1/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body(max_tokens, true))))
        .unwrap();
    let read = async {
        let resp = c.request(req).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let mut out = Stream {
            status,
            ..Default::default()
        };
        if status != 200 {
            out.body = text;
            return out;
        }
        for event in text.split("\n\n").filter(|e| !e.is_empty()) {
            let data = event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data event: {event:?}"));
            assert!(out.error.is_none(), "nothing follows an error event");
            if data == "[DONE]" {
                out.done = true;
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(data)
                .unwrap_or_else(|e| panic!("event is not JSON ({e}): {data}"));
            if let Some(err) = v.get("error") {
                out.error = Some(err.clone());
            } else if v["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
            {
                out.tokens += 1;
            }
        }
        out
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the stream ended: never a hang")
}

/// Checks a well-formed error event: OpenAI's error object.
fn assert_error_event(err: &serde_json::Value) {
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{err}"
    );
    assert!(err["type"].is_string() && err["code"].is_string(), "{err}");
}

async fn engines_json(c: &TestClient, router: &str) -> serde_json::Value {
    get(c, &format!("{router}/engines")).await.unwrap().json()
}

/// The value of a counter line of the router's `/metrics` whose labels include all of `labels`.
async fn counter(c: &TestClient, router: &str, name: &str, labels: &[&str]) -> f64 {
    let text = get(c, &format!("{router}/metrics")).await.unwrap().body;
    String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|lab| l.contains(lab)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// Polls `check` (bounded: 10 s) until it holds.
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..1000 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_stopped_mid_run_loses_no_request_that_had_not_started_streaming() {
    // A has room for 4 sequences: of the requests it gets, 4 stream and the rest wait in its
    // queue (the engine has sent its headers, but no byte has reached the client).
    let mut a = Engine::start(&["--speed", "0.1", "--max-num-seqs", "4"]).await;
    let b = Engine::start(&["--speed", "0.1"]).await;
    let r = router(&[
        "--static-backends",
        &format!("{},{}", a.url, b.url),
        "--static-models",
        MODEL,
        "--retry-backoff-ms",
        "1",
    ])
    .await;
    let c = client();
    const N: usize = 24;
    let clients: Vec<_> = (0..N)
        .map(|_| {
            let (c, url) = (c.clone(), r.url.clone());
            tokio::spawn(async move { stream(&c, &url, 60).await })
        })
        .collect();
    // Kill A while it has requests both streaming and waiting for their first token.
    until(
        "A streams some requests and holds others before their first byte",
        || async {
            let e = engines_json(&c, &r.url).await;
            let load = &endpoint(&e, &a.url)["load"];
            load["in_decode"].as_u64().unwrap() >= 1 && load["in_prefill"].as_u64().unwrap() >= 1
        },
    )
    .await;
    let at_kill = endpoint(&engines_json(&c, &r.url).await, &a.url)["load"].clone();
    a.kill().await;
    let mut results = Vec::new();
    for h in clients {
        results.push(h.await.unwrap());
    }
    let broken: Vec<&Stream> = results.iter().filter(|s| s.error.is_some()).collect();
    let complete = results
        .iter()
        .filter(|s| s.done && s.error.is_none())
        .count();
    for s in &results {
        assert_eq!(s.status, 200, "no request failed outright: {s:?}");
        assert!(s.done || s.error.is_some(), "every stream ended: {s:?}");
        if let Some(err) = &s.error {
            assert_error_event(err);
            assert!(
                s.tokens > 0,
                "only a request that had started streaming may end in an error event: {s:?}"
            );
        }
    }
    assert_eq!(complete + broken.len(), N);
    assert!(
        !broken.is_empty(),
        "the requests streaming on A ended with an error event"
    );
    assert!(
        broken.len() <= 4,
        "at most A's 4 running sequences were streaming: {} broke",
        broken.len()
    );
    // The ones A held before their first byte went to B instead.
    let retries = counter(&c, &r.url, "qoe_router_retries_total", &[]).await;
    assert!(retries >= 1.0, "{retries} retries for {at_kill}");
    eprintln!(
        "engine stopped with {at_kill} on it: {complete} of {N} streams complete, {} ended with an error event after their first tokens, {retries} retries",
        broken.len()
    );
    // And new requests keep succeeding (retried off the dead port until A is marked down).
    for _ in 0..8 {
        let s = stream(&c, &r.url, 4).await;
        assert!(s.status == 200 && s.done && s.error.is_none(), "{s:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_engine_times_out_opens_its_breaker_and_traffic_fails_over() {
    let hung = Engine::start(&["--hang-rate", "1"]).await;
    let good = Engine::start(&[]).await;
    // Good first: round-robin's seventh pick is the good engine again.
    let r = router(&[
        "--static-backends",
        &format!("{},{}", good.url, hung.url),
        "--static-models",
        MODEL,
        // The requests are not streamed: their budget is the whole answer's.
        "--response-timeout-ms",
        "3000",
        "--breaker-failures",
        "3",
        "--breaker-open-secs",
        "60",
    ])
    .await;
    let c = client();
    let url = format!("{}/v1/completions", r.url);
    // Six at once: round-robin sends three to the hung engine.
    let requests: Vec<_> = (0..6)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move { post(&c, &url, &body(4, false), &[]).await })
        })
        .collect();
    until("three requests answered by the good engine", || async {
        requests.iter().filter(|h| h.is_finished()).count() >= 3
    })
    .await;
    // While three requests hang, the router answers everything else.
    let health = get(&c, &format!("{}/health", r.url)).await.unwrap();
    assert_eq!(health.status, 200);
    let ok = post(&c, &url, &body(4, false), &[]).await;
    assert_eq!(ok.status, 200);
    assert_eq!(
        requests.iter().filter(|h| h.is_finished()).count(),
        3,
        "the hung ones are still waiting"
    );
    let mut statuses = Vec::new();
    for h in requests {
        let ans = h.await.unwrap();
        if ans.status == 504 {
            let err = &ans.json()["error"];
            assert_eq!(err["code"], "upstream_timeout");
            assert!(err["message"]
                .as_str()
                .unwrap()
                .contains("--response-timeout-ms"));
            assert_eq!(ans.header("x-qoe-endpoint"), hung.url);
        }
        statuses.push(ans.status);
    }
    statuses.sort();
    assert_eq!(statuses, [200, 200, 200, 504, 504, 504]);
    let e = engines_json(&c, &r.url).await;
    assert_eq!(
        endpoint(&e, &hung.url)["breaker"],
        "open",
        "three timeouts open the breaker"
    );
    assert_eq!(
        endpoint(&e, &hung.url)["healthy"],
        true,
        "its /health still answers: the breaker, not health checks, took it out"
    );
    // Traffic fails over: everything goes to the good engine, nothing waits.
    for _ in 0..10 {
        let ans = post(&c, &url, &body(4, false), &[]).await;
        assert_eq!(
            (ans.status, ans.header("x-qoe-endpoint")),
            (200, good.url.clone())
        );
    }
    let timeouts = counter(
        &c,
        &r.url,
        "qoe_router_upstream_failures_total",
        &["kind=\"timeout\"", &hung.url],
    )
    .await;
    assert_eq!(timeouts, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_every_breaker_is_open_retry_after_says_when_one_probes() {
    let failing = Engine::start(&[]).await;
    let r = router(&[
        "--static-backends",
        &failing.url,
        "--static-models",
        MODEL,
        "--breaker-failures",
        "2",
        "--breaker-open-secs",
        "30",
        "--max-retries",
        "0",
    ])
    .await;
    let c = client();
    let url = format!("{}/v1/completions", r.url);
    failing
        .faults(
            &c,
            serde_json::json!({"error_rate": 1.0, "error_status": 503}),
        )
        .await;
    for _ in 0..2 {
        assert_eq!(post(&c, &url, &body(4, false), &[]).await.status, 503);
    }
    let ans = post(&c, &url, &body(4, false), &[]).await;
    assert_eq!(ans.status, 503);
    assert_eq!(ans.json()["error"]["code"], "no_healthy_endpoint");
    // Not "1": a client honouring it would spend its retries against the open breaker.
    let wait: u64 = ans.header("retry-after").parse().unwrap();
    assert!((2..=30).contains(&wait), "retry-after {wait}");
}

#[tokio::test]
async fn the_breaker_opens_at_its_threshold_and_closes_when_the_engine_recovers() {
    let flaky = Engine::start(&[]).await;
    let steady = Engine::start(&[]).await;
    let r = router(&[
        "--static-backends",
        &format!("{},{}", flaky.url, steady.url),
        "--static-models",
        MODEL,
        "--breaker-failures",
        "3",
        "--breaker-successes",
        "2",
        "--breaker-open-secs",
        "0.5",
        "--retry-backoff-ms",
        "1",
    ])
    .await;
    let c = client();
    let url = format!("{}/v1/completions", r.url);
    flaky
        .faults(
            &c,
            serde_json::json!({"error_rate": 1.0, "error_status": 500}),
        )
        .await;
    // Every client request succeeds: the failures are retried on the steady engine.
    for _ in 0..12 {
        let ans = post(&c, &url, &body(4, false), &[]).await;
        assert_eq!(ans.status, 200);
        assert_eq!(ans.header("x-qoe-endpoint"), steady.url);
    }
    let failures = |c: TestClient, r: String, flaky: String| async move {
        counter(
            &c,
            &r,
            "qoe_router_upstream_failures_total",
            &["kind=\"status\"", &flaky],
        )
        .await
    };
    assert_eq!(
        failures(c.clone(), r.url.clone(), flaky.url.clone()).await,
        3.0,
        "exactly the configured failures reached the flaky engine"
    );
    let e = engines_json(&c, &r.url).await;
    assert_eq!(endpoint(&e, &flaky.url)["breaker"], "open");
    assert_eq!(endpoint(&e, &flaky.url)["breaker_detail"]["opened"], 1);

    // The engine recovers; after the pause, probes go through and two successes close it.
    flaky
        .faults(&c, serde_json::json!({"error_rate": 0.0}))
        .await;
    until("the breaker closed", || async {
        let ans = post(&c, &url, &body(4, false), &[]).await;
        assert_eq!(ans.status, 200);
        endpoint(&engines_json(&c, &r.url).await, &flaky.url)["breaker"] == "closed"
    })
    .await;
    assert_eq!(
        failures(c.clone(), r.url.clone(), flaky.url.clone()).await,
        3.0,
        "no failure since"
    );
    let mut served_by_flaky = 0;
    for _ in 0..6 {
        let ans = post(&c, &url, &body(4, false), &[]).await;
        assert_eq!(ans.status, 200);
        served_by_flaky += (ans.header("x-qoe-endpoint") == flaky.url) as u32;
    }
    assert!(
        served_by_flaky >= 2,
        "the recovered engine takes traffic again"
    );
}

/// Sends a streaming request on a raw connection; returns the socket once the first `data:` line
/// arrived (or right after writing, when `wait_for_data` is false).
async fn raw_stream(router: &str, max_tokens: u32, wait_for_data: bool) -> TcpStream {
    let host = router.trim_start_matches("http://");
    let payload = body(max_tokens, true);
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{payload}",
        payload.len()
    );
    let mut s = TcpStream::connect(host).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    if wait_for_data {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        tokio::time::timeout(Duration::from_secs(10), async {
            while !seen.windows(5).any(|w| w == b"data:") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed before the first event");
                seen.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .expect("the first event arrived");
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_frees_its_engine_slot() {
    // One sequence at a time, slow tokens: a second request waits in the engine's queue.
    let engine = Engine::start(&["--speed", "0.05", "--max-num-seqs", "1"]).await;
    let r = router(&["--static-backends", &engine.url, "--static-models", MODEL]).await;
    let c = client();
    let streaming = raw_stream(&r.url, 2000, true).await;
    let waiting = raw_stream(&r.url, 2000, false).await;
    until("one request runs and one waits in the engine", || async {
        let s = engine.stats(&c).await;
        s["running"] == 1 && s["waiting"] == 1
    })
    .await;
    let load = |e: &serde_json::Value| {
        let l = &e["endpoints"][0]["load"];
        (
            l["in_prefill"].as_u64().unwrap(),
            l["in_decode"].as_u64().unwrap(),
        )
    };
    assert_eq!(load(&engines_json(&c, &r.url).await), (1, 1));
    // The waiting client leaves before its first byte: the router drops the upstream request and
    // the engine forgets it.
    drop(waiting);
    until("the engine's queue is empty", || async {
        engine.stats(&c).await["waiting"] == 0
    })
    .await;
    assert_eq!(load(&engines_json(&c, &r.url).await), (0, 1));
    assert_eq!(
        counter(
            &c,
            &r.url,
            "qoe_router_unanswered_requests_total",
            &["client_closed"]
        )
        .await,
        1.0,
        "counted, not only logged"
    );
    // The streaming client leaves mid-stream: the engine's slot frees.
    drop(streaming);
    until("the engine runs nothing", || async {
        engine.stats(&c).await["running"] == 0
    })
    .await;
    assert_eq!(load(&engines_json(&c, &r.url).await), (0, 0));
    let s = engine.stats(&c).await;
    assert_eq!(s["submitted"], 2, "{s}");
    assert!(
        s["generation_tokens"].as_u64().unwrap() < 2000,
        "the stream was cut short, not run to its end: {s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_stream_ends_in_an_error_event_never_a_hang() {
    let crashing = Engine::start(&["--crash-rate", "1"]).await;
    let r = router(&[
        "--static-backends",
        &crashing.url,
        "--static-models",
        MODEL,
        "--breaker-failures",
        "100",
    ])
    .await;
    let c = client();
    for _ in 0..5 {
        let s = stream(&c, &r.url, 20).await;
        assert_eq!(s.status, 200);
        assert!(!s.done, "{s:?}");
        assert_eq!(s.tokens, 10, "the engine sent half the answer: {s:?}");
        let err = s.error.as_ref().expect("an error event ends the stream");
        assert_error_event(err);
        assert_eq!(err["code"], "upstream_error");
    }
    // Not streaming, the crash comes before the first byte: a clean 502 (one endpoint, no retry).
    let ans = post(
        &c,
        &format!("{}/v1/completions", r.url),
        &body(20, false),
        &[],
    )
    .await;
    assert_eq!(ans.status, 502);
    assert_eq!(ans.json()["error"]["code"], "upstream_error");
    let broken = counter(
        &c,
        &r.url,
        "qoe_router_upstream_failures_total",
        &["kind=\"stream\"", &crashing.url],
    )
    .await;
    assert_eq!(broken, 6.0);
    drop(r);

    // With a healthy engine beside it, the non-streaming crash is retried there.
    let good = Engine::start(&[]).await;
    let r = router(&[
        "--static-backends",
        &format!("{},{}", crashing.url, good.url),
        "--static-models",
        MODEL,
        "--retry-backoff-ms",
        "1",
        "--breaker-failures",
        "100",
    ])
    .await;
    for _ in 0..6 {
        let ans = post(
            &c,
            &format!("{}/v1/completions", r.url),
            &body(20, false),
            &[],
        )
        .await;
        assert_eq!(ans.status, 200);
        assert_eq!(ans.header("x-qoe-endpoint"), good.url);
    }
}

/// A router listed as its own endpoint (or two routers listing each other) would forward a request
/// to itself until some limit broke; its `Via` entry stops it on the first return, with 508.
#[tokio::test]
async fn a_request_that_comes_back_to_its_router_is_refused_as_a_loop() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let config = qoe_router::RouterConfig::from_args([
        "qoe-router",
        "--static-backends",
        &url,
        "--static-models",
        "m",
        "--max-retries",
        "0",
    ])
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(qoe_router::serve(config, listener, async {
        let _ = stopped.await;
    }));
    let c = client();
    until("the router listens", || async {
        get(&c, &format!("{url}/health")).await.is_ok()
    })
    .await;
    let answer = post(
        &c,
        &format!("{url}/v1/completions"),
        &completion("m", "x", false),
        &[],
    )
    .await;
    // The looped request's 508 passes through as the engine's answer.
    assert_eq!(
        answer.status,
        508,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let error = &answer.json()["error"];
    assert_eq!(error["code"], "loop_detected");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("came back to the router"),
        "{error}"
    );
    // Two requests in all: the client's, proxied once, and its return, refused.
    let text = metrics_text(&c, &url).await;
    assert_eq!(
        metric_sum(&text, "qoe_router_requests_total{"),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric_sum(&text, "qoe_router_rejected_requests_total{code=\"508\"}"),
        1.0,
        "{text}"
    );
    let _ = stop.send(());
    served.await.unwrap().unwrap();
}

/// What the router forwards carries its `Via` entry after any the client sent.
#[tokio::test]
async fn forwarded_requests_carry_the_routers_via() {
    let engine = mock(&["m"]).await;
    let r = router(&["--static-backends", &engine.url, "--static-models", "m"]).await;
    let c = client();
    let url = format!("{}/v1/completions", r.url);
    let answer = post(
        &c,
        &url,
        &completion("m", "x", false),
        &[("via", "1.1 gateway")],
    )
    .await;
    assert_eq!(answer.status, 200);
    let seen = engine.requests();
    let proxied = seen.iter().find(|s| s.path == "/v1/completions").unwrap();
    let via: Vec<_> = proxied.headers.get_all("via").iter().collect();
    assert_eq!(via.len(), 2, "{via:?}");
    assert_eq!(via[0], "1.1 gateway");
    let ours = via[1].to_str().unwrap();
    assert!(
        ours.starts_with("1.1 qoe-router-") && ours.len() == "1.1 qoe-router-".len() + 16,
        "{ours}"
    );
}
