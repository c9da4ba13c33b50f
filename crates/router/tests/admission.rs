//! Admission control over real sockets: the router's queue serves priority first, sheds the
//! lowest priority when full, bounds the wait, and enforces SLAs when asked.

mod common;

use common::*;
use std::time::Duration;

/// Sends a streaming request and holds its response open; returns the scripted stream.
async fn hold(
    r: &TestRouter,
    engine: &Mock,
    c: &TestClient,
) -> (Scripted, hyper::Response<hyper::body::Incoming>) {
    let script = engine.script_next();
    let pending = start_stream(c, &r.url, "held");
    let scripted = script.await.unwrap();
    // The router answers once the first byte came: the request is then streaming.
    scripted.send(first_chunk()).await;
    (scripted, pending.await.unwrap())
}

/// Sends a non-streaming completion with `priority` in the background.
fn spawn_post(
    c: &TestClient,
    url: &str,
    prompt: &'static str,
    priority: &'static str,
) -> tokio::task::JoinHandle<Answer> {
    let (c, url) = (c.clone(), url.to_string());
    tokio::spawn(async move {
        post(
            &c,
            &url,
            &completion("m", prompt, false),
            &[("x-request-priority", priority)],
        )
        .await
    })
}

fn priority_of(seen: &Seen) -> String {
    seen.headers
        .get("x-request-priority")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn queued_requests_are_served_by_priority_when_capacity_frees() {
    let engine = mock(&["m"]).await;
    let r = router(&[
        "--static-backends",
        &engine.url,
        "--max-inflight-per-endpoint",
        "1",
    ])
    .await;
    let c = client();
    let (held, response) = hold(&r, &engine, &c).await;
    let url = format!("{}/v1/completions", r.url);
    let low = spawn_post(&c, &url, "low", "3");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let high = spawn_post(&c, &url, "high", "1");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let metrics = metrics_text(&c, &r.url).await;
    assert!(
        metrics.contains("qoe_router_queue_depth 2"),
        "both wait in the router"
    );
    // Nothing reached the engine but the held stream.
    assert_eq!(
        engine
            .requests()
            .iter()
            .filter(|s| s.path == "/v1/completions")
            .count(),
        1
    );
    drop(held);
    drop(response);
    assert_eq!(high.await.unwrap().status, 200);
    assert_eq!(low.await.unwrap().status, 200);
    let order: Vec<String> = engine
        .requests()
        .iter()
        .filter(|s| s.path == "/v1/completions")
        .skip(1)
        .map(priority_of)
        .collect();
    assert_eq!(
        order,
        ["1", "3"],
        "priority 1 went first although it came second"
    );
}

/// A request that waited in the queue is checked again when capacity frees: the endpoint that
/// failed its health checks meanwhile does not get it.
#[tokio::test]
async fn a_queued_request_does_not_go_to_an_endpoint_that_fell_ill_while_it_waited() {
    let engine = mock(&["m"]).await;
    let r = router(&[
        "--static-backends",
        &engine.url,
        "--max-inflight-per-endpoint",
        "1",
        "--health-check-interval",
        "0.05",
        "--unhealthy-threshold",
        "1",
    ])
    .await;
    let c = client();
    let (held, response) = hold(&r, &engine, &c).await;
    let url = format!("{}/v1/completions", r.url);
    let waiting = spawn_post(&c, &url, "waiting", "2");
    *engine.state.healthy.lock().unwrap() = false;
    let mut unhealthy = false;
    for _ in 0..300 {
        let e = get(&c, &format!("{}/engines", r.url)).await.unwrap().json();
        if e["endpoints"][0]["healthy"] == false {
            unhealthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(unhealthy, "the health checks saw the endpoint fail");
    drop(held);
    drop(response);
    let ans = waiting.await.unwrap();
    assert_eq!(ans.status, 503, "{}", String::from_utf8_lossy(&ans.body));
    assert!(ans.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no healthy endpoint"));
    let sent = engine.requests();
    let completions = sent.iter().filter(|s| s.path == "/v1/completions");
    assert_eq!(completions.count(), 1, "only the held request reached it");
}

/// Waiting for one model's endpoints holds back no request for another model, and a waiter
/// counts once in `qoe_router_queued_total`, however long it waits.
#[tokio::test]
async fn a_waiter_for_one_model_holds_back_no_other_model() {
    let (busy, free) = (mock(&["m"]).await, mock(&["b"]).await);
    let backends = format!("{},{}", busy.url, free.url);
    let r = router(&[
        "--static-backends",
        &backends,
        "--static-models",
        "m,b",
        "--max-inflight-per-endpoint",
        "1",
    ])
    .await;
    let c = client();
    let (held, response) = hold(&r, &busy, &c).await;
    let url = format!("{}/v1/completions", r.url);
    let waiting = spawn_post(&c, &url, "waiting", "1");
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(metrics_text(&c, &r.url)
        .await
        .contains("qoe_router_queue_depth 1"));
    let body = completion("b", "other", false);
    let other = post(&c, &url, &body, &[("x-request-priority", "3")]);
    let other = tokio::time::timeout(Duration::from_secs(5), other)
        .await
        .expect("model b's request is not held behind model m's waiter");
    assert_eq!(other.status, 200);
    assert!(!waiting.is_finished(), "m's endpoint is still busy");
    drop(held);
    drop(response);
    assert_eq!(waiting.await.unwrap().status, 200);
    let metrics = metrics_text(&c, &r.url).await;
    assert_eq!(metric_sum(&metrics, "qoe_router_queued_total"), 1.0);
}

#[tokio::test]
async fn a_full_queue_sheds_the_lowest_priority_with_429() {
    let engine = mock(&["m"]).await;
    let r = router(&[
        "--static-backends",
        &engine.url,
        "--max-inflight-per-endpoint",
        "1",
        "--queue-max",
        "1",
    ])
    .await;
    let c = client();
    let (held, response) = hold(&r, &engine, &c).await;
    let url = format!("{}/v1/completions", r.url);
    let low = spawn_post(&c, &url, "low", "3");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let high = spawn_post(&c, &url, "high", "1");
    // The priority-1 arrival displaces the waiting priority 3.
    let low = low.await.unwrap();
    assert_eq!(low.status, 429);
    assert_eq!(low.header("retry-after"), "1");
    assert_eq!(low.json()["error"]["type"], "rate_limit_error");
    assert!(low.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("higher-priority"));
    // The queue now holds priority 1: a priority-2 arrival is refused at once.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mid = post(
        &c,
        &url,
        &completion("m", "mid", false),
        &[("x-request-priority", "2")],
    )
    .await;
    assert_eq!(mid.status, 429);
    assert!(mid.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--queue-max"));
    drop(held);
    drop(response);
    assert_eq!(high.await.unwrap().status, 200);
    let metrics = metrics_text(&c, &r.url).await;
    assert!(
        metrics.contains("qoe_router_shed_total{priority=\"3\",reason=\"displaced\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("qoe_router_shed_total{priority=\"2\",reason=\"queue_full\"} 1"));
}

#[tokio::test]
async fn the_wait_is_bounded() {
    let engine = mock(&["m"]).await;
    let r = router(&[
        "--static-backends",
        &engine.url,
        "--max-inflight-per-endpoint",
        "1",
        "--queue-timeout",
        "0.3",
    ])
    .await;
    let c = client();
    let (_held, _response) = hold(&r, &engine, &c).await;
    let ans = post_completion(&c, &r.url).await;
    assert_eq!(ans.status, 429);
    assert!(ans.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--queue-timeout"));
}

#[tokio::test]
async fn engine_priority_is_injected_and_unknown_fields_pass_untouched() {
    let engine = mock(&["m"]).await;
    let r = router(&["--static-backends", &engine.url, "--engine-priority"]).await;
    let c = client();
    let body = r#"{"model":"m","prompt":"x","max_tokens":2,"vendor_extension":{"keep":[1,2,{"me":true}]}}"#;
    let ans = post(
        &c,
        &format!("{}/v1/completions", r.url),
        body,
        &[("x-request-priority", "1")],
    )
    .await;
    assert_eq!(ans.status, 200);
    let ans = post(
        &c,
        &format!("{}/v1/completions", r.url),
        &body
            .replace("\"x\"", "\"y\"")
            .replace("}}", "},\"priority\":-5}"),
        &[("x-request-priority", "3")],
    )
    .await;
    assert_eq!(ans.status, 200);
    let sent: Vec<serde_json::Value> = engine
        .requests()
        .iter()
        .filter(|s| s.path == "/v1/completions")
        .map(|s| serde_json::from_slice(&s.body).unwrap())
        .collect();
    assert_eq!(sent[0]["priority"], 1);
    assert_eq!(
        sent[0]["vendor_extension"],
        serde_json::json!({"keep":[1,2,{"me":true}]})
    );
    assert_eq!(sent[1]["priority"], -5, "a client's own priority is kept");
    // vLLM's Responses API takes the field too; its Anthropic-style Messages API has none.
    for path in ["/v1/responses", "/v1/messages"] {
        let ans = post(
            &c,
            &format!("{}{path}", r.url),
            r#"{"model":"m","input":"x","messages":[]}"#,
            &[("x-request-priority", "3")],
        )
        .await;
        assert_eq!(ans.status, 200, "{path}");
    }
    let priority_sent = |path: &str| {
        let requests = engine.requests();
        let sent = requests.iter().find(|s| s.path == path).unwrap();
        serde_json::from_slice::<serde_json::Value>(&sent.body).unwrap()["priority"].clone()
    };
    assert_eq!(priority_sent("/v1/responses"), 3);
    assert_eq!(priority_sent("/v1/messages"), serde_json::Value::Null);
}

#[tokio::test]
async fn sla_enforcement_sheds_priority_3_but_serves_priority_1() {
    let engine = mock(&["m"]).await;
    let r = router(&[
        "--static-backends",
        &engine.url,
        "--routing-logic",
        "qoe",
        "--sla-enforcement",
        "shed",
    ])
    .await;
    let c = client();
    let url = format!("{}/v1/completions", r.url);
    // A 1 ms deadline no endpoint is predicted to meet.
    let low = post(
        &c,
        &url,
        &completion("m", "x", true),
        &[("x-request-priority", "3"), ("x-sla-target-ms", "1")],
    )
    .await;
    assert_eq!(low.status, 429);
    let msg = low.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("x-sla-target-ms") && msg.contains("1 ms"),
        "{msg}"
    );
    let high = post(
        &c,
        &url,
        &completion("m", "x", true),
        &[("x-request-priority", "1"), ("x-sla-target-ms", "1")],
    )
    .await;
    assert_eq!(high.status, 200);
    // A deadline that can be met is routed whatever the priority.
    let easy = post(
        &c,
        &url,
        &completion("m", "x", true),
        &[("x-request-priority", "3"), ("x-sla-target-ms", "60000")],
    )
    .await;
    assert_eq!(easy.status, 200);
}

/// `--max-inflight-per-endpoint` is a hard cap, also when requests arrive at the same moment on
/// several threads: counted at the engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_inflight_cap_holds_under_concurrent_arrivals() {
    use axum::response::IntoResponse;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let (now, max) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let engine = format!("http://{}", listener.local_addr().unwrap());
    let (n, m) = (now.clone(), max.clone());
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let (now, max) = (n.clone(), m.clone());
        async move {
            if req.uri().path() != "/v1/completions" {
                return "ok".into_response();
            }
            max.fetch_max(now.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
            now.fetch_sub(1, Ordering::SeqCst);
            axum::Json(
                serde_json::json!({"choices":[{"text":"x"}],"usage":{"completion_tokens":1}}),
            )
            .into_response()
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let r = router(&[
        "--static-backends",
        &engine,
        "--static-models",
        "m",
        "--max-inflight-per-endpoint",
        "1",
        "--queue-timeout",
        "60",
    ])
    .await;
    let c = client();
    let url = format!("{}/v1/completions", r.url);
    for _ in 0..25 {
        let barrier = Arc::new(tokio::sync::Barrier::new(8));
        let requests: Vec<_> = (0..8)
            .map(|_| {
                let (c, url, barrier) = (c.clone(), url.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    post(&c, &url, &completion("m", "x", false), &[])
                        .await
                        .status
                })
            })
            .collect();
        for request in requests {
            assert_eq!(request.await.unwrap(), 200);
        }
    }
    assert_eq!(
        max.load(Ordering::SeqCst),
        1,
        "requests at once at the engine"
    );
}

/// A request waiting in the queue while the endpoint set changes (a reload) goes to an endpoint
/// of the new set, not to the one removed.
#[tokio::test]
async fn a_waiter_follows_a_reload() {
    let (old, new) = (mock(&["m"]).await, mock(&["m"]).await);
    let dir = std::env::temp_dir().join(format!("qoe-admission-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("router.toml");
    let write = |url: &str| {
        let text = format!(
            "max_inflight_per_endpoint = 1\nqueue_timeout = 10.0\n[[backends]]\nurl = \"{url}\"\nmodels = [\"m\"]\n"
        );
        std::fs::write(dir.join("router.toml.tmp"), text).unwrap();
        std::fs::rename(dir.join("router.toml.tmp"), &path).unwrap();
    };
    write(&old.url);
    let r = router(&["--config", path.to_str().unwrap()]).await;
    let c = client();
    let (held, response) = hold(&r, &old, &c).await;
    let waiter = {
        let (c, url) = (c.clone(), format!("{}/v1/completions", r.url));
        tokio::spawn(async move { post(&c, &url, &completion("m", "w", false), &[]).await })
    };
    // Past the file's modification-time granularity, then the new set.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    write(&new.url);
    let engines = format!("{}/engines", r.url);
    for _ in 0..500 {
        let table = get(&c, &engines).await.unwrap().json();
        if table["endpoints"][0]["url"] == new.url.as_str() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let answer = waiter.await.unwrap();
    drop((held, response));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-qoe-endpoint"), new.url);
}

/// A router in front of `e1` and `e2` with one seat each, `retries` quick retries and a breaker
/// that opens after `breaker_failures` failures.
async fn one_seat_each(e1: &Mock, e2: &Mock, retries: &str, breaker_failures: &str) -> TestRouter {
    router(&[
        "--static-backends",
        &format!("{},{}", e1.url, e2.url),
        "--max-inflight-per-endpoint",
        "1",
        "--max-retries",
        retries,
        "--retry-backoff-ms",
        "1",
        "--breaker-failures",
        breaker_failures,
        "--queue-timeout",
        "30",
    ])
    .await
}

/// A request retried after a failure that then waits in the queue may use the endpoint it failed
/// on once that endpoint is open again: it neither waits out its queue timeout beside an idle
/// endpoint nor holds back newcomers that could use it.
#[tokio::test]
async fn a_retried_waiter_takes_the_endpoint_it_failed_on_when_it_recovers() {
    let (e1, e2) = (mock(&["m"]).await, mock(&["m"]).await);
    let r = one_seat_each(&e1, &e2, "1", "100").await;
    let c = client();
    *e1.state.fixed.lock().unwrap() = Some((503, r#"{"error":{"message":"busy"}}"#.into()));
    // E2 busy with a held stream (E1 refuses it with 503; the retry lands on E2).
    let (held, response) = hold(&r, &e2, &c).await;
    let url = format!("{}/v1/completions", r.url);
    let first = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move { post(&c, &url, &completion("m", "a", false), &[]).await })
    };
    let metrics = format!("{}/metrics", r.url);
    let mut queued = false;
    for _ in 0..500 {
        let text = String::from_utf8_lossy(&get(&c, &metrics).await.unwrap().body).to_string();
        if text.contains("qoe_router_queue_depth 1") {
            queued = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(queued, "the retried request waits in the queue");
    *e1.state.fixed.lock().unwrap() = None;
    let newcomer = post(&c, &url, &completion("m", "n", false), &[]).await;
    let first = first.await.unwrap();
    assert_eq!((first.status, newcomer.status), (200, 200));
    assert_eq!(
        first.header("x-qoe-endpoint"),
        e1.url,
        "served while E2 is held"
    );
    drop((held, response));
}

/// A request that waits, fails on the endpoint it was given and waits again is one queued
/// request in `qoe_router_queued_total`, not two.
#[tokio::test]
async fn a_request_that_waits_twice_is_queued_once() {
    let (e1, e2) = (mock(&["m"]).await, mock(&["m"]).await);
    let r = one_seat_each(&e1, &e2, "3", "1").await;
    let c = client();
    // One held stream on each endpoint: with one seat each, the second goes where the first is not.
    let (s1, s2) = (e1.script_next(), e2.script_next());
    let (p1, p2) = (
        start_stream(&c, &r.url, "h1"),
        start_stream(&c, &r.url, "h2"),
    );
    let (h1, h2) = (s1.await.unwrap(), s2.await.unwrap());
    h1.send(first_chunk()).await;
    h2.send(first_chunk()).await;
    let (r1, r2) = (p1.await.unwrap(), p2.await.unwrap());
    // Which client's stream each endpoint holds.
    let on = |r: &hyper::Response<hyper::body::Incoming>, m: &Mock| {
        r.headers().get("x-qoe-endpoint").unwrap().to_str().unwrap() == m.url
    };
    let (r1, r2) = if on(&r1, &e1) { (r1, r2) } else { (r2, r1) };
    assert!(on(&r1, &e1) && on(&r2, &e2));
    let url = format!("{}/v1/completions", r.url);
    let waiting = spawn_post(&c, &url, "waiting", "2");
    let depth_is_one = || async {
        for _ in 0..500 {
            if metrics_text(&c, &r.url)
                .await
                .contains("qoe_router_queue_depth 1")
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    };
    assert!(depth_is_one().await, "the request waits for a seat");
    // E1 frees its seat and then fails the waiter (its breaker opens on that one failure): the
    // retry waits again, for E2.
    *e1.state.fixed.lock().unwrap() = Some((503, r#"{"error":{"message":"busy"}}"#.into()));
    drop((h1, r1));
    let completions = |m: &Mock| {
        m.requests()
            .iter()
            .filter(|s| s.path == "/v1/completions")
            .count()
    };
    for _ in 0..500 {
        if completions(&e1) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(completions(&e1), 2, "the waiter was sent to E1");
    assert!(depth_is_one().await, "the retried request waits again");
    drop((h2, r2));
    let answer = waiting.await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-qoe-endpoint"), e2.url);
    let metrics = metrics_text(&c, &r.url).await;
    assert_eq!(metric_sum(&metrics, "qoe_router_queued_total"), 1.0);
}
