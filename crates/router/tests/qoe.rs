//! The QoE policy through the live router: it learns which endpoint is fast from what it observes,
//! and exposes its state and QoE metrics.

mod common;

use common::*;

#[tokio::test]
async fn qoe_learns_the_fast_endpoint_from_router_observations() {
    let (fast, slow) = (mock(&["m"]).await, mock(&["m"]).await);
    *slow.state.first_chunk_delay_ms.lock().unwrap() = 120;
    // No engine metrics at all (the mocks' /metrics are empty): only what the router sees.
    let r = router(&[
        "--static-backends",
        &format!("{},{}", fast.url, slow.url),
        "--routing-logic",
        "qoe",
    ])
    .await;
    let c = client();
    let url = format!("{}/v1/completions", r.url);
    // Prefill-dominant requests (a ~750-token prompt, 2 expected output tokens): TTFT decides.
    let prompt = "Summarize the following report in two sentences. ".repeat(60);
    let ask = |i: usize| {
        let (c, url) = (c.clone(), url.clone());
        let body = completion("m", &format!("Request {i:04}. {prompt}"), true);
        async move {
            post(
                &c,
                &url,
                &body,
                &[
                    ("x-request-priority", "1"),
                    ("x-expected-output-tokens", "2"),
                ],
            )
            .await
        }
    };
    // A burst first: load spreads it over both endpoints, so both are observed.
    let burst = futures_util::future::join_all((0..6).map(&ask)).await;
    assert!(burst.iter().all(|a| a.status == 200));
    let mut picks = Vec::new();
    for i in 6..18 {
        let ans = ask(i).await;
        assert_eq!(ans.status, 200);
        assert!(
            ans.header("x-qoe-reason").starts_with("qoe-"),
            "{}",
            ans.header("x-qoe-reason")
        );
        picks.push(ans.header("x-qoe-endpoint"));
    }
    let late_fast = picks[4..].iter().filter(|p| **p == fast.url).count();
    assert!(
        late_fast >= 7,
        "after learning, the fast endpoint wins: {picks:?} (fast = {})",
        fast.url
    );

    let engines = get(&c, &format!("{}/engines", r.url)).await.unwrap().json();
    let weights = &engines["policy_state"]["weights"];
    let sum: f64 = ["resource", "performance", "reliability", "priority"]
        .iter()
        .map(|t| weights[t].as_f64().unwrap())
        .sum();
    assert!((sum - 1.0).abs() < 1e-9, "{weights}");

    let text = metrics_text(&c, &r.url).await;
    assert!((metric_sum(&text, "qoe_router_qoe_weight{") - 1.0).abs() < 1e-6);
    let met = metric_sum(
        &text,
        "qoe_router_sla_total{priority=\"1\",outcome=\"met\"}",
    );
    let missed = metric_sum(
        &text,
        "qoe_router_sla_total{priority=\"1\",outcome=\"missed\"}",
    );
    assert_eq!(met + missed, 18.0);
    assert_eq!(
        metric_sum(&text, "qoe_router_priority_qoe_count{priority=\"1\"}"),
        18.0
    );
    assert!(
        text.contains("qoe_router_decision{") && text.contains("term=\"predicted_ttft_seconds\"")
    );
    assert_eq!(
        metric_sum(
            &text,
            "qoe_router_priority_time_to_first_token_seconds_count{priority=\"1\"}"
        ),
        18.0
    );
}

/// A `/metrics` page without an engine's load figures is no scrape (its age keeps growing), and
/// an endpoint without KV readings is not taken as the emptiest: beside an idle engine that
/// reports 10% KV use, it does not take every request.
#[tokio::test]
async fn an_endpoint_without_engine_metrics_does_not_win_by_them() {
    let (silent, reporting) = (mock(&["m"]).await, mock(&["m"]).await);
    *silent.state.metrics.lock().unwrap() = "<html>not metrics</html>".into();
    *reporting.state.metrics.lock().unwrap() = "vllm:num_requests_running{model_name=\"m\"} 0\n\
         vllm:num_requests_waiting{model_name=\"m\"} 0\n\
         vllm:kv_cache_usage_perc{model_name=\"m\"} 0.1\n"
        .into();
    let r = router(&[
        "--static-backends",
        &format!("{},{}", silent.url, reporting.url),
        "--routing-logic",
        "qoe",
        "--engine-stats-interval",
        "0.05",
    ])
    .await;
    let c = client();
    let mut engines = serde_json::Value::Null;
    for _ in 0..200 {
        engines = get(&c, &format!("{}/engines", r.url)).await.unwrap().json();
        if !endpoint(&engines, &reporting.url)["engine_metrics_age_s"].is_null() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let scraped = silent
        .requests()
        .iter()
        .filter(|s| s.path == "/metrics")
        .count();
    assert!(scraped >= 1, "its /metrics was read");
    assert!(
        endpoint(&engines, &silent.url)["engine_metrics_age_s"].is_null(),
        "a page without engine metrics is no scrape: {engines}"
    );
    let mut to_reporting = 0;
    for i in 0..20 {
        let ans = post(
            &c,
            &format!("{}/v1/completions", r.url),
            &completion("m", &format!("question {i}"), false),
            &[],
        )
        .await;
        assert_eq!(ans.status, 200);
        to_reporting += usize::from(ans.header("x-qoe-endpoint") == reporting.url);
    }
    assert!(
        to_reporting >= 10,
        "the idle engine that reports its KV use gets its share: {to_reporting} of 20"
    );
}
