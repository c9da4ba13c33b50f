//! Test support: a scriptable mock engine, a router on an ephemeral port, and a tiny HTTP client.
//! Everything listens on 127.0.0.1 only.
#![allow(dead_code)]

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

pub mod engine;

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// What a mock engine saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// A stream the test drives chunk by chunk.
pub struct Scripted {
    pub chunks: mpsc::Sender<Bytes>,
}

impl Scripted {
    /// Sends the next chunk of the stream.
    pub async fn send(&self, chunk: impl Into<Bytes>) {
        self.chunks.send(chunk.into()).await.unwrap();
    }
}

#[derive(Default)]
pub struct MockState {
    pub models: Vec<String>,
    pub seen: Mutex<Vec<Seen>>,
    /// When set, the next completion request streams what the test sends on this channel.
    pub scripted: Mutex<Option<oneshot::Sender<Scripted>>>,
    /// Status and body to answer every completion with, instead of streaming.
    pub fixed: Mutex<Option<(u16, String)>>,
    pub healthy: Mutex<bool>,
    pub metrics: Mutex<String>,
    /// Delay before the first streamed chunk, or before a non-streamed answer, ms.
    pub first_chunk_delay_ms: Mutex<u64>,
    /// Headers added to every response (e.g. an engine's own CORS headers).
    pub extra_headers: Mutex<Vec<(String, String)>>,
}

pub struct Mock {
    pub url: String,
    pub state: Arc<MockState>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Mock {
    pub fn requests(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Arms the next completion request to stream chunks the test sends.
    pub fn script_next(&self) -> oneshot::Receiver<Scripted> {
        let (tx, rx) = oneshot::channel();
        *self.state.scripted.lock().unwrap() = Some(tx);
        rx
    }
}

/// The chunks a mock engine streams for a normal streaming request: vLLM's completion format.
pub fn sse_chunks(n: usize) -> Vec<String> {
    let mut out: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "data: {{\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"text\":\"t{i} \",\"logprobs\":null,\"finish_reason\":{}}}]}}\n\n",
                if i + 1 == n { "\"length\"" } else { "null" }
            )
        })
        .collect();
    out.push("data: [DONE]\n\n".into());
    out
}

async fn mock_handler(State(state): State<Arc<MockState>>, request: Request) -> Response {
    let mut response = mock_answer(state.clone(), request).await;
    for (k, v) in state.extra_headers.lock().unwrap().iter() {
        response.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    response
}

async fn mock_answer(state: Arc<MockState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let path = parts.uri.path().to_string();
    state.seen.lock().unwrap().push(Seen {
        path: path.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    match path.as_str() {
        "/health" => {
            if *state.healthy.lock().unwrap() {
                "ok".into_response()
            } else {
                (http::StatusCode::SERVICE_UNAVAILABLE, "down").into_response()
            }
        }
        "/metrics" => state.metrics.lock().unwrap().clone().into_response(),
        "/v1/models" => {
            let data: Vec<_> = state
                .models
                .iter()
                .map(|m| serde_json::json!({"id": m, "object": "model", "max_model_len": 4096}))
                .collect();
            axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
        }
        _ => {
            if let Some((status, body)) = state.fixed.lock().unwrap().clone() {
                return (http::StatusCode::from_u16(status).unwrap(), body).into_response();
            }
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let streaming = json
                .get("stream")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            if !streaming {
                // A whole answer comes after its generation: the delay stands for it.
                let delay = *state.first_chunk_delay_ms.lock().unwrap();
                tokio::time::sleep(Duration::from_millis(delay)).await;
                return axum::Json(serde_json::json!({
                    "id": "cmpl-1", "object": "text_completion", "model": json["model"],
                    "choices": [{"index": 0, "text": "hello", "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 3, "total_tokens": 8, "completion_tokens": 5}
                }))
                .into_response();
            }
            let scripted = state.scripted.lock().unwrap().take();
            let (tx, rx) = mpsc::channel::<Bytes>(16);
            match scripted {
                Some(handoff) => {
                    let _ = handoff.send(Scripted { chunks: tx });
                }
                None => {
                    let delay = *state.first_chunk_delay_ms.lock().unwrap();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                        for c in sse_chunks(4) {
                            if tx.send(Bytes::from(c)).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(stream))
                .unwrap()
        }
    }
}

/// Starts a mock engine serving `models`.
pub async fn mock(models: &[&str]) -> Mock {
    let state = Arc::new(MockState {
        models: models.iter().map(|s| s.to_string()).collect(),
        healthy: Mutex::new(true),
        ..Default::default()
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .fallback(mock_handler)
        .with_state(state.clone());
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Mock { url, state, task }
}

/// A router under test.
pub struct TestRouter {
    pub url: String,
    pub shutdown: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Drop for TestRouter {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.abort();
    }
}

/// Starts a router with `args` (flags as on the command line, without the program name).
pub async fn router(args: &[&str]) -> TestRouter {
    let mut argv = vec!["qoe-router", "--host", "127.0.0.1", "--port", "0"];
    if !args.contains(&"--routing-logic") && !args.contains(&"--config") {
        // The tests of routing mechanics use the simplest policy unless they name one.
        argv.extend_from_slice(&["--routing-logic", "roundrobin"]);
    }
    argv.extend_from_slice(args);
    let config = qoe_router::RouterConfig::from_args(argv).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(qoe_router::serve(config, listener, async {
        let _ = rx.await;
    }));
    // Ready when /health answers.
    let c = client();
    for _ in 0..200 {
        if get(&c, &format!("{url}/health")).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    TestRouter {
        url,
        shutdown: Some(tx),
        task,
    }
}

pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }
}

/// A pooled client over any connector (plain, or TLS for the https tests).
pub type AnyClient<C> = Client<C, Full<Bytes>>;

pub async fn get<C: Connect>(c: &AnyClient<C>, url: &str) -> Result<Answer, String> {
    let req = http::Request::get(url)
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(c, req).await
}

pub async fn post<C: Connect>(
    c: &AnyClient<C>,
    url: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let mut req = http::Request::post(url).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(
        c,
        req.body(Full::new(Bytes::from(body.to_string()))).unwrap(),
    )
    .await
    .unwrap()
}

/// What a test client's connector must be.
pub trait Connect:
    hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static
{
}

impl<C> Connect for C where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static
{
}

async fn send<C: Connect>(
    c: &AnyClient<C>,
    req: http::Request<Full<Bytes>>,
) -> Result<Answer, String> {
    let fut = async {
        let resp = c.request(req).await.map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// Sends a streaming completion through the router at `router_url` in the background. The router
/// answers only once the engine sent its first byte, so a test driving a scripted engine sends a
/// chunk on the stream first and then awaits the returned handle for the response.
pub fn start_stream(
    c: &TestClient,
    router_url: &str,
    prompt: &str,
) -> tokio::task::JoinHandle<hyper::Response<hyper::body::Incoming>> {
    let req = http::Request::post(format!("{router_url}/v1/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(completion("m", prompt, true))))
        .unwrap();
    let fut = c.request(req);
    tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(10), fut)
            .await
            .expect("the router answered in time")
            .expect("the router answered")
    })
}

/// The first chunk of [`sse_chunks`], as bytes.
pub fn first_chunk() -> Bytes {
    Bytes::from(sse_chunks(2)[0].clone())
}

/// A non-streamed completion of model `m` through the router at `router_url`.
pub async fn post_completion(c: &TestClient, router_url: &str) -> Answer {
    let url = format!("{router_url}/v1/completions");
    post(c, &url, &completion("m", "x", false), &[]).await
}

/// A completion request body for `model`.
pub fn completion(model: &str, prompt: &str, stream: bool) -> String {
    serde_json::json!({"model": model, "prompt": prompt, "max_tokens": 4, "stream": stream})
        .to_string()
}

/// Waits (bounded) until `cond` holds.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// GET with extra headers.
pub async fn get_with(c: &TestClient, url: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = http::Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(c, req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap()
}

/// Any request, with extra headers.
pub async fn request(
    c: &TestClient,
    method: &str,
    url: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(
        c,
        req.body(Full::new(Bytes::from(body.to_string()))).unwrap(),
    )
    .await
    .unwrap()
}

/// What came back on a raw connection: the status (0 if none), the head and the body as text.
#[derive(Debug)]
pub struct RawAnswer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// Writes `request` bytes as they are on a fresh connection to `base_url` (`http://host:port`) and
/// reads until the server closes it (bounded in time), for requests no HTTP client would send.
pub async fn raw(base_url: &str, request: &[u8]) -> RawAnswer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base_url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before it has read everything (e.g. huge headers).
    let _ = stream.write_all(request).await;
    let mut out = Vec::new();
    let read = async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the server closed the connection in time");
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    RawAnswer {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// A raw HTTP/1.1 POST of `body` to `path` with extra header lines (each without CRLF), closing
/// the connection after the answer.
pub fn raw_post(path: &str, host: &str, extra: &[&[u8]], body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    )
    .into_bytes();
    for line in extra {
        req.extend_from_slice(line);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);
    req
}

/// The router's `/metrics` text.
pub async fn metrics_text(c: &TestClient, router: &str) -> String {
    let answer = get(c, &format!("{router}/metrics")).await.unwrap();
    String::from_utf8(answer.body.to_vec()).unwrap()
}

/// The endpoint with `url` in a router's `/engines` JSON.
pub fn endpoint<'a>(engines: &'a serde_json::Value, url: &str) -> &'a serde_json::Value {
    engines["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["url"] == url)
        .unwrap_or_else(|| panic!("{url} not in {engines}"))
}

/// The sum of the samples on lines of `text` that start with `prefix`.
pub fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// Shuts `r` down while `body` streams what `scripted` sends, and checks that a stream outlasting
/// the shutdown timeout is cut: `serve` returns, the engine's request is dropped, and the client's
/// stream ends with no more data.
pub async fn shut_down_while_streaming(
    r: &mut TestRouter,
    scripted: &Scripted,
    body: &mut hyper::body::Incoming,
) {
    r.shutdown.take().unwrap().send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), &mut r.task)
        .await
        .expect("serve returns after its shutdown timeout")
        .unwrap()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), scripted.chunks.closed())
        .await
        .expect("the upstream request was dropped");
    let end = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("the client's stream ended");
    assert!(
        !matches!(end, Some(Ok(ref f)) if f.is_data()),
        "no more data after the close: {end:?}"
    );
}
