//! Kubernetes discovery against an in-process stand-in for the API server (its pod list
//! endpoint) and a mock engine "pod" at 127.0.0.1: the router follows the pods' readiness, and
//! keeps its endpoints while the API server fails.

mod common;

use axum::extract::{RawQuery, State};
use common::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The API server: answers the pod list it holds (status, body) and counts the listings.
#[derive(Default)]
struct Api {
    answer: Mutex<(u16, String)>,
    listings: Mutex<Vec<String>>,
}

async fn list_pods(
    State(api): State<Arc<Api>>,
    uri: http::Uri,
    RawQuery(query): RawQuery,
) -> axum::response::Response {
    api.listings
        .lock()
        .unwrap()
        .push(format!("{}?{}", uri.path(), query.unwrap_or_default()));
    let (status, body) = api.answer.lock().unwrap().clone();
    axum::response::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body))
        .unwrap()
}

fn pods(ready: bool) -> String {
    format!(
        r#"{{"kind":"PodList","items":[{{"metadata":{{"name":"vllm-0","labels":{{"app":"vllm"}}}},
        "status":{{"phase":"Running","podIP":"127.0.0.1","conditions":[{{"type":"Ready","status":"{}"}}]}}}}]}}"#,
        if ready { "True" } else { "False" }
    )
}

async fn until_status(c: &TestClient, router: &str, status: u16) {
    for _ in 0..500 {
        if post_completion(c, router).await.status == status {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the router never answered {status}");
}

#[tokio::test]
async fn the_endpoints_follow_the_ready_pods() {
    let engine = mock(&["m"]).await;
    let port = engine.url.rsplit(':').next().unwrap().to_string();
    let api = Arc::new(Api::default());
    *api.answer.lock().unwrap() = (200, pods(true));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api_url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .fallback(list_pods)
        .with_state(api.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let r = router(&[
        "--service-discovery",
        "k8s",
        "--k8s-label-selector",
        "app=vllm",
        "--k8s-namespace",
        "serving",
        "--k8s-port",
        &port,
        "--k8s-api-server",
        &api_url,
        "--k8s-poll-interval",
        "0.05",
    ])
    .await;
    let c = client();
    // The ready pod is an endpoint, its model detected.
    until_status(&c, &r.url, 200).await;
    let ans = post_completion(&c, &r.url).await;
    assert_eq!(ans.header("x-qoe-endpoint"), engine.url);
    assert_eq!(
        api.listings.lock().unwrap()[0],
        "/api/v1/namespaces/serving/pods?labelSelector=app%3Dvllm&resourceVersion=0"
    );
    // Unready: no endpoint left, and the 503 says why.
    *api.answer.lock().unwrap() = (200, pods(false));
    until_status(&c, &r.url, 503).await;
    let ans = post_completion(&c, &r.url).await;
    assert!(
        String::from_utf8_lossy(&ans.body).contains("no ready pod matches"),
        "{}",
        String::from_utf8_lossy(&ans.body)
    );
    // Ready again, then the API server fails: the endpoint stays through several failed
    // listings.
    *api.answer.lock().unwrap() = (200, pods(true));
    until_status(&c, &r.url, 200).await;
    // A 500, and a 200 that is not a pod list (a Status): neither is an empty listing.
    for answer in [
        (500, r#"{"kind":"Status","code":500}"#),
        (200, r#"{"kind":"Status","status":"Failure","code":410}"#),
    ] {
        *api.answer.lock().unwrap() = (answer.0, answer.1.into());
        let failing_from = api.listings.lock().unwrap().len();
        for _ in 0..500 {
            if api.listings.lock().unwrap().len() >= failing_from + 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(api.listings.lock().unwrap().len() >= failing_from + 4);
        assert_eq!(post_completion(&c, &r.url).await.status, 200, "{answer:?}");
    }
}
