//! Each fault mode does what it says, set by flag or at run time through `/admin/config`.

mod common;

use common::*;
use qoe_engine::EngineArgs;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn stream_body(n: u32) -> Value {
    json!({"model": "m", "prompt": "fault", "max_tokens": n, "ignore_eos": true, "stream": true})
}

#[tokio::test]
async fn admin_config_reads_updates_and_validates() {
    bounded(async {
        let s = Server::start(tiny_args()).await;
        let c = s.get("/admin/config").await.json();
        assert_eq!(c["error_rate"], 0.0);
        assert_eq!(c["slowdown"], 1.0);
        assert_eq!(c["role"], "both");
        let r = s
            .post_json("/admin/config", &json!({"stall_ms": 5, "stall_rate": 0.5}))
            .await;
        assert_eq!(r.status, 200);
        let c = s.get("/admin/config").await.json();
        assert_eq!(
            (c["stall_ms"].as_u64(), c["stall_rate"].as_f64()),
            (Some(5), Some(0.5))
        );
        assert_eq!(c["error_status"], 500, "untouched fields keep their value");
        // Out of range, or unknown: 400 and nothing changes.
        assert_eq!(
            s.post_json("/admin/config", &json!({"error_rate": 1.5}))
                .await
                .status,
            400
        );
        assert_eq!(
            s.post_json("/admin/config", &json!({"eror_rate": 0.5}))
                .await
                .status,
            400
        );
        assert_eq!(s.post("/admin/config", "{").await.status, 400);
        assert_eq!(s.get("/admin/config").await.json()["error_rate"], 0.0);
    })
    .await
}

#[tokio::test]
async fn error_rate_answers_with_the_status_in_openai_shape() {
    bounded(async {
        let s = Server::start(EngineArgs {
            error_rate: 1.0,
            error_status: 503,
            ..tiny_args()
        })
        .await;
        for _ in 0..5 {
            let r = s
                .post_json(
                    "/v1/completions",
                    &json!({"model": "m", "prompt": "x", "max_tokens": 2}),
                )
                .await;
            assert_eq!(r.status, 503);
            let e = &r.json()["error"];
            assert_eq!(e["code"], 503);
            assert_eq!(e["type"], "ServiceUnavailableError");
        }
        s.post_json(
            "/admin/config",
            &json!({"error_rate": 0.5, "error_status": 500}),
        )
        .await;
        let mut statuses = Vec::new();
        for _ in 0..60 {
            let r = s
                .post_json(
                    "/v1/completions",
                    &json!({"model": "m", "prompt": "x", "max_tokens": 1}),
                )
                .await;
            statuses.push(r.status);
        }
        let errors = statuses.iter().filter(|&&c| c == 500).count();
        assert!(
            (10..=50).contains(&errors),
            "{errors} of 60 failed at rate 0.5"
        );
        assert!(statuses.iter().all(|&c| c == 500 || c == 200));
        // Health and metrics are not affected.
        assert_eq!(s.get("/health").await.status, 200);
        assert_eq!(s.get("/metrics").await.status, 200);
    })
    .await
}

#[tokio::test]
async fn faults_are_reproducible_for_a_seed() {
    bounded(async {
        let pattern = |seed: u64| async move {
            let s = Server::start(EngineArgs {
                error_rate: 0.5,
                seed,
                ..tiny_args()
            })
            .await;
            let mut out = Vec::new();
            for _ in 0..24 {
                let r = s
                    .post_json(
                        "/v1/completions",
                        &json!({"model": "m", "prompt": "x", "max_tokens": 1}),
                    )
                    .await;
                out.push(r.status);
            }
            out
        };
        assert_eq!(pattern(11).await, pattern(11).await);
        assert_ne!(pattern(11).await, pattern(12).await);
    })
    .await
}

#[tokio::test]
async fn hang_reads_the_request_and_never_answers() {
    bounded(async {
        let s = Server::start(EngineArgs {
            hang_rate: 1.0,
            ..tiny_args()
        })
        .await;
        let mut hung = Conn::send(
            s.addr,
            "POST",
            "/v1/completions",
            Some(&stream_body(3).to_string()),
        )
        .await;
        // Nothing comes back, however long we wait (here: while other requests complete).
        s.post_json("/admin/config", &json!({"hang_rate": 0.0}))
            .await;
        for _ in 0..5 {
            let r = s
                .post_json(
                    "/v1/completions",
                    &json!({"model": "m", "prompt": "x", "max_tokens": 3}),
                )
                .await;
            assert_eq!(r.status, 200);
        }
        let still = tokio::time::timeout(Duration::from_millis(300), hung.read_head()).await;
        assert!(still.is_err(), "the hung request got an answer");
        // It never reached the model.
        assert_eq!(s.metric("vllm:num_requests_running{").await, 0.0);
        // Shutdown releases it: the connection closes without a response.
        s.stop().await.unwrap();
        assert!(hung.read_head().await.is_err() || hung.read_body().await.is_err());
    })
    .await
}

#[tokio::test]
async fn crash_closes_the_connection_mid_stream() {
    bounded(async {
        let s = Server::start(EngineArgs {
            crash_rate: 1.0,
            ..tiny_args()
        })
        .await;
        let mut c = s.open("/v1/completions", &stream_body(20)).await;
        assert_eq!(c.status, 200);
        let mut tokens = 0;
        let end = loop {
            match c.next_event().await {
                Ok(Some(e)) => {
                    assert_ne!(e, "[DONE]");
                    tokens += 1;
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        assert!(end.is_err(), "the body ended cleanly instead of breaking");
        assert_eq!(tokens, 10, "half the answer, then the connection closed");
        // The model aborted the request and freed its KV.
        wait_metric(&s, "vllm:num_requests_running{", |v| v == 0.0).await;
        assert_eq!(s.metric("vllm:kv_cache_usage_perc{").await, 0.0);

        // Non-streaming: the response breaks off too.
        let mut c = Conn::send(
            s.addr,
            "POST",
            "/v1/completions",
            Some(
                &json!({"model": "m", "prompt": "x", "max_tokens": 8, "ignore_eos": true})
                    .to_string(),
            ),
        )
        .await;
        let broken = match c.read_head().await {
            Err(_) => true,
            Ok(_) => c.read_body().await.is_err(),
        };
        assert!(broken);
    })
    .await
}

#[tokio::test]
async fn stall_pauses_a_stream_half_way() {
    bounded(async {
        let s = Server::start(EngineArgs {
            stall_rate: 1.0,
            stall_ms: 300,
            ..tiny_args()
        })
        .await;
        let mut c = s.open("/v1/completions", &stream_body(20)).await;
        let mut last = Instant::now();
        let mut gaps = Vec::new();
        let mut events = Vec::new();
        while let Some(e) = c.next_event().await.unwrap() {
            gaps.push(last.elapsed());
            last = Instant::now();
            events.push(e);
        }
        assert_eq!(events.len(), 21, "every token and [DONE] still arrive");
        // A sleep never returns early: the pause is at least stall_ms, right after token 10.
        let (i, longest) = gaps
            .iter()
            .enumerate()
            .skip(1)
            .max_by_key(|(_, g)| **g)
            .unwrap();
        assert!(*longest >= Duration::from_millis(300), "{gaps:?}");
        assert_eq!(i, 10, "the pause comes after half the tokens: {gaps:?}");
    })
    .await
}

#[tokio::test]
async fn slowdown_slows_every_iteration() {
    bounded(async {
        // 40 tokens on the tiny profile: each iteration is at least 1.2 ms, so ≥ 48 ms normally
        // and ≥ 480 ms ten times slower, counted from the first iteration starting after the
        // request arrived (less a little rounding). Lower bounds only: a sleep never returns
        // early.
        let s = Server::start(tiny_args()).await;
        let body = json!({"model": "m", "prompt": "x", "max_tokens": 40, "ignore_eos": true});
        s.post_json("/admin/config", &json!({"slowdown": 10.0}))
            .await;
        let t = Instant::now();
        assert_eq!(s.post_json("/v1/completions", &body).await.status, 200);
        assert!(
            t.elapsed() >= Duration::from_millis(470),
            "{:?}",
            t.elapsed()
        );
        // The engine's own clock saw it too.
        assert!(s.metric("vllm:e2e_request_latency_seconds_sum{").await >= 0.47);
        s.post_json("/admin/config", &json!({"slowdown": 1.0}))
            .await;
        assert_eq!(s.post_json("/v1/completions", &body).await.status, 200);
    })
    .await
}

#[tokio::test]
async fn frozen_metrics_repeat_the_last_snapshot() {
    bounded(async {
        let s = Server::start(tiny_args()).await;
        let body = json!({"model": "m", "prompt": "x", "max_tokens": 5, "ignore_eos": true});
        s.post_json("/v1/completions", &body).await;
        let before = s.get("/metrics").await.body;
        s.post_json("/admin/config", &json!({"freeze_metrics": true}))
            .await;
        s.post_json("/v1/completions", &body).await;
        let frozen = s.get("/metrics").await.body;
        assert_eq!(before, frozen);
        assert_eq!(
            metric_in(&frozen, "vllm:generation_tokens_total{"),
            Some(5.0)
        );
        s.post_json("/admin/config", &json!({"freeze_metrics": false}))
            .await;
        assert_eq!(s.metric("vllm:generation_tokens_total{").await, 10.0);
    })
    .await
}
