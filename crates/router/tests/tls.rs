//! Endpoints served over https: a mock engine behind a TLS terminator on 127.0.0.1 whose
//! certificate a test CA signed (`qoe_tls::testing`), with the router in front.

mod common;

use common::*;
use qoe_tls::testing::TestPki;
use std::path::PathBuf;

fn ca_file(pki: &TestPki, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qoe-tls-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    pki.write_ca(&path);
    path
}

/// A streamed completion for the mock's model `m` through `base`: 200, the mock's stream byte
/// for byte.
async fn streamed_completion<C: Connect>(c: &AnyClient<C>, base: &str) -> Answer {
    let body = completion("m", "hi", true);
    let answer = post(c, &format!("{base}/v1/completions"), &body, &[]).await;
    let text = String::from_utf8_lossy(&answer.body).to_string();
    assert_eq!(answer.status, 200, "{text}");
    assert_eq!(text, sse_chunks(4).concat());
    answer
}

#[tokio::test]
async fn https_endpoints_are_detected_scraped_and_streamed_through() {
    let pki = TestPki::new();
    let engine = mock(&["m"]).await;
    *engine.state.metrics.lock().unwrap() =
        "vllm:num_requests_running{model_name=\"m\"} 3\nvllm:num_requests_waiting{model_name=\"m\"} 1\n"
            .to_string();
    let https = pki.terminator(&engine.url).await;
    let ca = ca_file(&pki, "detected.pem");
    let r = router(&[
        "--static-backends",
        &https,
        "--upstream-ca-file",
        ca.to_str().unwrap(),
        "--engine-stats-interval",
        "1",
    ])
    .await;
    let c = client();

    // The model comes from the endpoint's own /v1/models, read over TLS.
    let mut models = serde_json::Value::Null;
    for _ in 0..300 {
        models = get(&c, &format!("{}/v1/models", r.url))
            .await
            .unwrap()
            .json();
        if models["data"].as_array().is_some_and(|d| !d.is_empty()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(models["data"][0]["id"], "m", "{models}");

    // A streamed completion arrives byte for byte; the engine saw its own host as `Host`.
    let answer = streamed_completion(&c, &r.url).await;
    assert_eq!(answer.header("x-qoe-endpoint"), https);
    let seen = engine.requests();
    let proxied = seen.iter().find(|s| s.path == "/v1/completions").unwrap();
    assert_eq!(
        proxied.headers["host"],
        https.trim_start_matches("https://"),
        "Host names the endpoint's authority"
    );

    // The engine's metrics are scraped over TLS too.
    let mut engines = serde_json::Value::Null;
    for _ in 0..300 {
        engines = get(&c, &format!("{}/engines", r.url)).await.unwrap().json();
        if !engines["endpoints"][0]["engine_metrics"]["running"].is_null() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let endpoint = &engines["endpoints"][0];
    assert_eq!(endpoint["url"], https.as_str(), "{engines}");
    assert_eq!(endpoint["engine_metrics"]["running"], 3.0, "{engines}");
    assert_eq!(endpoint["engine_metrics"]["waiting"], 1.0, "{engines}");
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_bad_gateway_that_says_why() {
    let pki = TestPki::new();
    let engine = mock(&["m"]).await;
    let https = pki.terminator(&engine.url).await;
    // The built-in web roots do not include the test CA.
    let r = router(&["--static-backends", &https, "--static-models", "m"]).await;
    let c = client();
    let answer = post(
        &c,
        &format!("{}/v1/completions", r.url),
        &completion("m", "hi", false),
        &[],
    )
    .await;
    assert_eq!(
        answer.status,
        502,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let message = answer.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("TLS handshake with 127.0.0.1") && message.contains("certificate"),
        "{message}"
    );
    assert!(
        !engine
            .requests()
            .iter()
            .any(|s| s.path == "/v1/completions"),
        "nothing reached the engine"
    );
}

#[tokio::test]
async fn the_router_serves_https_on_its_own_port() {
    let pki = TestPki::new();
    let dir = std::env::temp_dir().join(format!("qoe-tls-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("router-cert.pem"), dir.join("router-key.pem"));
    pki.write_server(&cert, &key);
    let engine = mock(&["m"]).await;
    let config = qoe_router::RouterConfig::from_args([
        "qoe-router",
        "--static-backends",
        &engine.url,
        "--static-models",
        "m",
        "--tls-cert-file",
        cert.to_str().unwrap(),
        "--tls-key-file",
        key.to_str().unwrap(),
    ])
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(qoe_router::serve(config, listener, async {
        let _ = stopped.await;
    }));

    // A client that trusts the test CA, as the OpenAI client would with its CA bundle.
    let tls = qoe_tls::ClientTls::new(Some(&ca_file(&pki, "router-ca.pem")), "--ca").unwrap();
    let https: AnyClient<_> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(tls.https_or_http(hyper_util::client::legacy::connect::HttpConnector::new()));
    let url = format!("https://{addr}");
    let mut health = None;
    for _ in 0..300 {
        if let Ok(answer) = get(&https, &format!("{url}/health")).await {
            health = Some(answer);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(health.expect("the router answers over https").status, 200);
    streamed_completion(&https, &url).await;

    // Plain HTTP to the TLS port gets no answer.
    let plain = get(&client(), &format!("http://{addr}/health")).await;
    assert!(plain.is_err(), "{:?}", plain.map(|a| a.status));

    let _ = stop.send(());
    served.await.unwrap().unwrap();
}
