//! Clients speaking HTTP/2: with prior knowledge in cleartext (as service meshes and gRPC-style
//! clients send it) and by ALPN over TLS. The engines behind are spoken to in HTTP/1.1 as ever.
//! Also the connection timeouts both versions share.

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::time::Duration;

/// A pooled client that speaks only HTTP/2, with prior knowledge.
fn h2_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new())
}

/// One HTTP/2 connection over `io`, its connection task spawned.
async fn h2_connection<I>(io: I) -> hyper::client::conn::http2::SendRequest<Full<Bytes>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    h2_connection_task(io).await.0
}

/// [`h2_connection`] and its connection's task, which ends when the connection does.
async fn h2_connection_task<I>(
    io: I,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<()>,
)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .expect("HTTP/2 handshake");
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    (send, task)
}

fn completion_request(authority: &str, stream: bool) -> http::Request<Full<Bytes>> {
    http::Request::post(format!("http://{authority}/v1/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(completion("m", "x", stream))))
        .unwrap()
}

/// A streamed completion through `r` on a new HTTP/2 connection, the engine's first event sent
/// and received: the connection (its handle and its task), the engine's script, and the rest of
/// the body.
async fn h2_stream_begun(engine: &Mock, r: &TestRouter) -> StreamBegun {
    let authority = r.url.trim_start_matches("http://").to_string();
    let tcp = tokio::net::TcpStream::connect(&authority).await.unwrap();
    let (mut send, task) = h2_connection_task(tcp).await;
    let script = engine.script_next();
    let pending = tokio::spawn(send.send_request(completion_request(&authority, true)));
    let scripted = script.await.unwrap();
    let first = first_chunk();
    scripted.send(first.clone()).await;
    let response = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("the router answered")
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    // The first event arrives before the engine has sent the second.
    let received = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("the first event was forwarded")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(received, first);
    ((send, task), scripted, body)
}

type StreamBegun = (
    (
        hyper::client::conn::http2::SendRequest<Full<Bytes>>,
        tokio::task::JoinHandle<()>,
    ),
    Scripted,
    hyper::body::Incoming,
);

/// A mock engine, a router in front, an HTTP/2 client, the router's completions URL and a
/// non-streamed completion body.
async fn h2_setup() -> (Mock, TestRouter, TestClient, String, String) {
    let engine = mock(&["m"]).await;
    let r = router(&["--static-backends", &engine.url, "--static-models", "m"]).await;
    let url = format!("{}/v1/completions", r.url);
    (engine, r, h2_client(), url, completion("m", "x", false))
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_routed_and_reaches_the_engine_as_http1() {
    let (engine, r, c, url, body) = h2_setup().await;
    let response = c
        .request(
            http::Request::post(&url)
                .header("content-type", "application/json")
                .header("x-request-id", "h2-one")
                .body(Full::new(Bytes::from(body.clone())))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-qoe-endpoint"], engine.url.as_str());
    assert_eq!(response.headers()["x-request-id"], "h2-one");
    let answer: serde_json::Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(answer["choices"][0]["text"], "hello");

    // The engine got an ordinary HTTP/1.1 request: its own authority as Host, the body as sent.
    let seen = engine.requests();
    let proxied = seen.iter().find(|s| s.path == "/v1/completions").unwrap();
    assert_eq!(
        proxied.headers["host"],
        engine.url.trim_start_matches("http://")
    );
    assert_eq!(proxied.headers["x-request-id"], "h2-one");
    assert_eq!(proxied.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(proxied.body, body.as_bytes());

    // The router's own routes and its errors, over HTTP/2 too.
    let models = get(&c, &format!("{}/v1/models", r.url)).await.unwrap();
    assert_eq!(models.json()["data"][0]["id"], "m");
    let bad = post(&c, &url, "{not json", &[]).await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"]["type"], "invalid_request_error");
    let unknown = post(&c, &url, &completion("nope", "x", false), &[]).await;
    assert_eq!(unknown.status, 404);
    assert!(unknown.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("m"));
    let bad_priority = post(
        &c,
        &url,
        &completion("m", "x", false),
        &[("x-request-priority", "0")],
    )
    .await;
    assert_eq!(bad_priority.status, 400);
    assert!(bad_priority.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("x-request-priority"));
}

#[tokio::test]
async fn an_http2_stream_passes_each_event_on_as_it_arrives_and_a_reset_cancels_upstream() {
    let engine = mock(&["m"]).await;
    let r = router(&["--static-backends", &engine.url, "--static-models", "m"]).await;
    let (_connection, scripted, mut body) = h2_stream_begun(&engine, &r).await;
    let chunks = sse_chunks(2);
    scripted.send(chunks[1].clone()).await;
    let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(second, chunks[1].as_bytes());

    // Dropping the body resets the stream; the router drops the engine's request.
    drop(body);
    tokio::time::timeout(Duration::from_secs(10), scripted.chunks.closed())
        .await
        .expect("upstream request cancelled after the client reset its stream");
    let c = client();
    let mut load = serde_json::Value::Null;
    for _ in 0..100 {
        let engines = get(&c, &format!("{}/engines", r.url)).await.unwrap().json();
        load = engines["endpoints"][0]["load"].clone();
        if load["in_prefill"] == 0 && load["in_decode"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        (&load["in_prefill"], &load["in_decode"]),
        (&0.into(), &0.into())
    );
}

#[tokio::test]
async fn many_requests_share_one_http2_connection() {
    let engine = mock(&["m"]).await;
    let r = router(&["--static-backends", &engine.url, "--static-models", "m"]).await;
    let authority = r.url.trim_start_matches("http://").to_string();
    let tcp = tokio::net::TcpStream::connect(&authority).await.unwrap();
    let send = h2_connection(tcp).await;
    let requests = (0..24).map(|i| {
        let mut send = send.clone();
        let request = completion_request(&authority, i % 2 == 0);
        async move {
            let response = send.send_request(request).await.unwrap();
            let status = response.status();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, body)
        }
    });
    let answers = tokio::time::timeout(
        Duration::from_secs(20),
        futures_util::future::join_all(requests),
    )
    .await
    .expect("every stream answered");
    for (i, (status, body)) in answers.iter().enumerate() {
        assert_eq!(*status, 200, "{}", String::from_utf8_lossy(body));
        if i % 2 == 0 {
            assert_eq!(body, sse_chunks(4).concat().as_bytes());
        }
    }
    let proxied = engine
        .requests()
        .iter()
        .filter(|s| s.path == "/v1/completions")
        .count();
    assert_eq!(proxied, 24);
}

#[tokio::test]
async fn shutdown_ends_http2_streams_that_outlast_its_timeout() {
    let engine = mock(&["m"]).await;
    let mut r = router(&[
        "--static-backends",
        &engine.url,
        "--static-models",
        "m",
        "--shutdown-timeout-ms",
        "200",
    ])
    .await;
    let (_connection, scripted, mut body) = h2_stream_begun(&engine, &r).await;
    shut_down_while_streaming(&mut r, &scripted, &mut body).await;
}

/// An HTTP/2 connection without a stream open is closed after `--request-read-timeout-ms`, as an
/// idle HTTP/1.1 keep-alive connection is; one streaming an answer is not.
#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_the_header_timeout() {
    let engine = mock(&["m"]).await;
    let r = router(&[
        "--static-backends",
        &engine.url,
        "--static-models",
        "m",
        "--request-read-timeout-ms",
        "300",
    ])
    .await;
    let authority = r.url.trim_start_matches("http://").to_string();
    // Never a request.
    let tcp = tokio::net::TcpStream::connect(&authority).await.unwrap();
    let (_send, idle) = h2_connection_task(tcp).await;
    tokio::time::timeout(Duration::from_secs(10), idle)
        .await
        .expect("the router closed the idle connection")
        .unwrap();

    // A stream held open past the timeout keeps its connection; the end of it starts the clock.
    let ((mut send, mut task), scripted, body) = h2_stream_begun(&engine, &r).await;
    let chunks = sse_chunks(2);
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(
        !task.is_finished(),
        "a connection with a stream open is not idle"
    );
    scripted.send(chunks[1].clone()).await;
    drop(scripted);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, chunks[1].as_bytes());
    // Idle from the stream's end, not from the timer's last look at the count (while the
    // stream was open): the next request is served on the same connection.
    let next = send
        .send_request(completion_request(&authority, false))
        .await
        .expect("the connection was still open");
    assert_eq!(next.status(), 200);
    next.into_body().collect().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), &mut task)
        .await
        .expect("closed once idle")
        .unwrap();
}

/// HTTP/2 requests are held to HTTP/1.1's limits: more than 100 header fields get the router's
/// 431 (hyper refuses them itself in HTTP/1.1); split cookies reach the engine as one field.
#[tokio::test]
async fn http2_requests_meet_http1_limits_and_reach_the_engine_as_http1() {
    let (engine, _r, c, url, body) = h2_setup().await;
    let names: Vec<String> = (0..120).map(|i| format!("x-h{i}")).collect();
    let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "b")).collect();
    let refused = post(&c, &url, &body, &many).await;
    assert_eq!(refused.status, 431);
    let message = refused.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("header fields, over the limit of 100"),
        "{message}"
    );

    let answer = post(&c, &url, &body, &[("cookie", "a=1"), ("cookie", "b=2")]).await;
    assert_eq!(answer.status, 200);
    // Cookie fields count as the one field they are forwarded as.
    let pairs: Vec<String> = (0..120).map(|i| format!("c{i}=v")).collect();
    let cookies: Vec<(&str, &str)> = pairs.iter().map(|p| ("cookie", p.as_str())).collect();
    assert_eq!(post(&c, &url, &body, &cookies).await.status, 200);
    let seen = engine.requests();
    assert_eq!(
        seen.iter().filter(|s| s.path == "/v1/completions").count(),
        2,
        "the refused request never reached the engine"
    );
    let proxied = seen.iter().find(|s| s.path == "/v1/completions").unwrap();
    let cookies: Vec<_> = proxied.headers.get_all("cookie").iter().collect();
    assert_eq!(cookies, ["a=1; b=2"]);
}

/// A router (`--request-read-timeout-ms` `ms`) in front of a mock engine, and a raw connection
/// to it.
async fn connected_with_read_timeout(ms: &str) -> (Mock, TestRouter, tokio::net::TcpStream) {
    let engine = mock(&["m"]).await;
    let r = router(&[
        "--static-backends",
        &engine.url,
        "--static-models",
        "m",
        "--request-read-timeout-ms",
        ms,
    ])
    .await;
    let tcp = tokio::net::TcpStream::connect(r.url.trim_start_matches("http://"))
        .await
        .unwrap();
    (engine, r, tcp)
}

/// The header timeout runs from the connection's start: a client that waits before its first
/// byte has that much less for the rest of its headers.
#[tokio::test]
async fn the_header_timeout_counts_from_the_connections_start() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_engine, _r, mut tcp) = connected_with_read_timeout("1000").await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    tcp.write_all(b"G").await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    // 1.5 s after the connection's start: past its timeout, though 0.6 s after its first byte.
    let _ = tcp
        .write_all(b"ET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the connection was closed");
    let answer = String::from_utf8_lossy(&answer);
    assert!(!answer.contains("200 OK"), "{answer}");
}

/// The first request's deadline does not shorten the keep-alive gaps after it: a client that
/// took most of the header timeout for its first request still has all of it between requests.
#[tokio::test]
async fn a_late_first_request_keeps_the_whole_keep_alive() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_engine, _r, mut tcp) = connected_with_read_timeout("1500").await;
    let health = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut answer = vec![0u8; 4096];
    for wait_ms in [1000, 1000] {
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        tcp.write_all(health).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut answer))
            .await
            .expect("an answer")
            .unwrap();
        let text = String::from_utf8_lossy(&answer[..n]);
        assert!(
            text.starts_with("HTTP/1.1 200"),
            "after {wait_ms} ms: {text}"
        );
    }
}

/// Routers in a chain (each another's endpoint) are no loop: each adds its own `Via`.
#[tokio::test]
async fn chained_routers_each_add_their_via() {
    let engine = mock(&["m"]).await;
    let back = router(&["--static-backends", &engine.url, "--static-models", "m"]).await;
    let front = router(&["--static-backends", &back.url, "--static-models", "m"]).await;
    let c = client();
    let answer = post(
        &c,
        &format!("{}/v1/completions", front.url),
        &completion("m", "x", false),
        &[],
    )
    .await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let seen = engine.requests();
    let proxied = seen.iter().find(|s| s.path == "/v1/completions").unwrap();
    let via: Vec<_> = proxied.headers.get_all("via").iter().collect();
    assert_eq!(via.len(), 2, "{via:?}");
    assert_ne!(via[0], via[1]);
}
