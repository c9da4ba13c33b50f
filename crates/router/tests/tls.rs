//! Endpoints served over https: a mock engine behind a TLS terminator on 127.0.0.1 whose
//! certificate a test CA signed (`qoe_tls::testing`), with the router in front.

mod common;

use common::*;
use hyper_util::client::legacy::connect::HttpConnector;
use qoe_tls::testing::TestPki;
use std::path::PathBuf;

/// A fresh directory for certificate files (tests run in parallel: none shares one).
fn test_dir() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("qoe-tls-test-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn ca_file(pki: &TestPki, name: &str) -> PathBuf {
    let path = test_dir().join(name);
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
        message.contains("127.0.0.1:")
            && message.contains("TLS handshake: invalid peer certificate"),
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

/// A router serving https with `pki`'s server certificate in front of `engine`, plus `extra`
/// flags; its URL, and what stops it.
struct HttpsRouter {
    url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn https_router(pki: &TestPki, engine: &Mock, extra: &[&str]) -> HttpsRouter {
    let dir = test_dir();
    let (cert, key) = (dir.join("router-cert.pem"), dir.join("router-key.pem"));
    pki.write_server(&cert, &key);
    let mut args = vec![
        "qoe-router",
        "--static-backends",
        &engine.url,
        "--static-models",
        "m",
        "--tls-cert-file",
        cert.to_str().unwrap(),
        "--tls-key-file",
        key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let config = qoe_router::RouterConfig::from_args(args).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(qoe_router::serve(config, listener, async {
        let _ = stopped.await;
    }));
    HttpsRouter { url, stop, served }
}

/// A client that trusts `trust`'s CA (as the OpenAI client would with its CA bundle),
/// presenting the client certificate of `identity`, if any.
fn https_client(
    trust: &TestPki,
    identity: Option<&TestPki>,
) -> AnyClient<qoe_tls::HttpsConnector<HttpConnector>> {
    let dir = test_dir();
    let ca = ca_file(trust, "client-side-ca.pem");
    let (cert, key) = (dir.join("client-side.pem"), dir.join("client-side.key"));
    if let Some(pki) = identity {
        pki.write_client(&cert, &key);
    }
    let pem = qoe_tls::PemFile::new;
    let identity = identity.map(|_| (pem(&cert, "--cert"), pem(&key, "--key")));
    let tls = qoe_tls::ClientTls::new(Some(pem(&ca, "--ca")), identity).unwrap();
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(tls.https_or_http(HttpConnector::new()))
}

/// `/health` of `url`, once the router listens.
async fn health<C: Connect>(c: &AnyClient<C>, url: &str) -> Result<Answer, String> {
    let mut last = Err("never tried".to_string());
    for _ in 0..300 {
        last = get(c, &format!("{url}/health")).await;
        if last.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    last
}

#[tokio::test]
async fn the_router_serves_https_on_its_own_port() {
    let pki = TestPki::new();
    let engine = mock(&["m"]).await;
    let r = https_router(&pki, &engine, &[]).await;
    let https = https_client(&pki, None);
    assert_eq!(health(&https, &r.url).await.unwrap().status, 200);
    streamed_completion(&https, &r.url).await;

    // Plain HTTP to the TLS port is told to use https.
    let plain_url = r.url.replace("https://", "http://");
    let plain = get(&client(), &format!("{plain_url}/health"))
        .await
        .unwrap();
    assert_eq!(plain.status, 400);
    let message = plain.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("this port speaks https"), "{message}");

    let _ = r.stop.send(());
    r.served.await.unwrap().unwrap();
}

/// A client offering `h2` by ALPN gets HTTP/2; one offering only `http/1.1`, or nothing, HTTP/1.1.
#[tokio::test]
async fn the_https_port_speaks_http2_to_clients_that_offer_it() {
    use http_body_util::BodyExt;
    let pki = TestPki::new();
    let engine = mock(&["m"]).await;
    let r = https_router(&pki, &engine, &[]).await;
    assert_eq!(
        health(&https_client(&pki, None), &r.url)
            .await
            .unwrap()
            .status,
        200
    );
    let addr: std::net::SocketAddr = r.url.trim_start_matches("https://").parse().unwrap();
    for (offered, agreed) in [
        (&[&b"h2"[..], b"http/1.1"][..], Some(&b"h2"[..])),
        (&[&b"http/1.1"[..]][..], Some(&b"http/1.1"[..])),
        (&[][..], None),
    ] {
        let tls = pki.connect(addr, offered).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), agreed);
        let request = http::Request::post(format!("{}/v1/completions", r.url))
            .header("content-type", "application/json")
            .header("host", addr.to_string())
            .body(http_body_util::Full::new(bytes::Bytes::from(completion(
                "m", "hi", true,
            ))))
            .unwrap();
        let io = hyper_util::rt::TokioIo::new(tls);
        let response = if agreed == Some(b"h2") {
            let (mut send, connection) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(connection);
            send.send_request(request).await.unwrap()
        } else {
            let (mut send, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(connection);
            send.send_request(request).await.unwrap()
        };
        let expected = if agreed == Some(b"h2") {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        assert_eq!(response.version(), expected);
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, sse_chunks(4).concat().as_bytes());
    }
    let _ = r.stop.send(());
    r.served.await.unwrap().unwrap();
}

#[tokio::test]
async fn the_https_port_can_require_client_certificates() {
    let pki = TestPki::new();
    let engine = mock(&["m"]).await;
    let ca = ca_file(&pki, "clients-ca.pem");
    let r = https_router(
        &pki,
        &engine,
        &["--tls-client-ca-file", ca.to_str().unwrap()],
    )
    .await;
    let with_identity = https_client(&pki, Some(&pki));
    assert_eq!(health(&with_identity, &r.url).await.unwrap().status, 200);
    streamed_completion(&with_identity, &r.url).await;
    let anonymous = https_client(&pki, None);
    let refused = get(&anonymous, &format!("{}/health", r.url)).await;
    assert!(refused.is_err(), "{:?}", refused.map(|a| a.status));
    // A client whose certificate another CA signed is refused too.
    let stranger = https_client(&pki, Some(&TestPki::new()));
    assert!(get(&stranger, &format!("{}/health", r.url)).await.is_err());
}

#[tokio::test]
async fn endpoints_that_require_client_certificates_get_the_routers() {
    let pki = TestPki::new();
    let engine = mock(&["m"]).await;
    let https = pki.terminator_for(&engine.url, true).await;
    let dir = test_dir();
    let ca = ca_file(&pki, "mutual-ca.pem");
    let (cert, key) = (dir.join("client.pem"), dir.join("client.key"));
    pki.write_client(&cert, &key);
    let to_https = [
        "--static-backends",
        &https,
        "--static-models",
        "m",
        "--upstream-ca-file",
        ca.to_str().unwrap(),
    ];
    let identity = [
        "--upstream-client-cert",
        cert.to_str().unwrap(),
        "--upstream-client-key",
        key.to_str().unwrap(),
    ];
    let with_identity = router(&[&to_https[..], &identity].concat()).await;
    let c = client();
    streamed_completion(&c, &with_identity.url).await;

    let without = router(&[&to_https[..], &["--max-retries", "0"]].concat()).await;
    let body = completion("m", "hi", false);
    let answer = post(&c, &format!("{}/v1/completions", without.url), &body, &[]).await;
    let text = String::from_utf8_lossy(&answer.body).to_string();
    assert_eq!(answer.status, 502, "{text}");
    assert!(
        text.contains("a server asked for a client certificate and none is configured"),
        "{text}"
    );
    let served = engine.requests();
    assert_eq!(
        served
            .iter()
            .filter(|s| s.path == "/v1/completions")
            .count(),
        1,
        "only the router with a certificate reached the engine"
    );
    // Its health checks say why they fail too, where an operator looks (`/engines`).
    let mut last_error = String::new();
    for _ in 0..200 {
        let engines = get(&c, &format!("{}/engines", without.url))
            .await
            .unwrap()
            .json();
        last_error = engines["endpoints"][0]["health"]["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if !last_error.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        last_error.contains("a server asked for a client certificate and none is configured"),
        "{last_error}"
    );
}
