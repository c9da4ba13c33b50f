//! What the router adds over going direct: latency (p50/p99) and throughput, streaming and not,
//! at concurrency 1, 32 and 256, against an instant in-process upstream on 127.0.0.1.
//!
//! `cargo bench -p qoe-router --bench overhead` (env `OVERHEAD_SECS` per cell, default 3).
//! Upstream, router and load generator each run on their own single-threaded runtime, so the
//! three share the machine's cores the way separate processes would.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const STREAM_CHUNKS: usize = 16;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn upstream_handler(
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>, Infallible> {
    let path = req.uri().path().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let streaming = body.windows(14).any(|w| w == b"\"stream\":true}");
    if path == "/v1/models" {
        let b = Full::new(Bytes::from_static(
            br#"{"object":"list","data":[{"id":"m","object":"model"}]}"#,
        ));
        return Ok(hyper::Response::new(b.boxed()));
    }
    if !streaming {
        let b = Full::new(Bytes::from_static(
            br#"{"id":"cmpl-1","object":"text_completion","model":"m","choices":[{"index":0,"text":"hello world","finish_reason":"length"}],"usage":{"prompt_tokens":3,"total_tokens":19,"completion_tokens":16}}"#,
        ));
        return Ok(hyper::Response::new(b.boxed()));
    }
    let chunks = (0..STREAM_CHUNKS)
        .map(|i| {
            Ok::<_, Infallible>(Frame::data(Bytes::from(format!(
                "data: {{\"id\":\"c\",\"object\":\"text_completion\",\"model\":\"m\",\"choices\":[{{\"index\":0,\"text\":\"t{i}\",\"finish_reason\":null}}]}}\n\n"
            ))))
        })
        .chain(std::iter::once(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n")))));
    let body = StreamBody::new(futures_util::stream::iter(chunks));
    let mut resp = hyper::Response::new(body.boxed());
    resp.headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    Ok(resp)
}

fn start_upstream() -> String {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    std::thread::spawn(move || {
        runtime().block_on(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                tcp.set_nodelay(true).unwrap();
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(
                            TokioIo::new(tcp),
                            hyper::service::service_fn(upstream_handler),
                        )
                        .await;
                });
            }
        });
    });
    format!("http://{addr}")
}

fn start_router(upstream: &str) -> String {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    let config = qoe_router::RouterConfig::from_args([
        "qoe-router",
        "--static-backends",
        upstream,
        "--static-models",
        "m",
        "--log-level",
        "warn",
    ])
    .unwrap();
    std::thread::spawn(move || {
        runtime().block_on(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            qoe_router::serve(config, listener, std::future::pending())
                .await
                .unwrap();
        });
    });
    format!("http://{addr}")
}

struct Cell {
    p50_us: f64,
    p99_us: f64,
    rps: f64,
}

fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize] as f64
}

fn measure(target: &str, streaming: bool, concurrency: usize, secs: f64) -> Cell {
    let url = format!("{target}/v1/completions");
    let body = Bytes::from(format!(
        r#"{{"model":"m","prompt":"hello there","max_tokens":16,"stream":{streaming}}}"#
    ));
    runtime().block_on(async move {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1024)
            .build(connector);
        let stop = Arc::new(AtomicBool::new(false));
        let warmup = Duration::from_millis(300);
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (client, url, body, stop) =
                (client.clone(), url.clone(), body.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(4096);
                let begun = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let req = hyper::Request::post(&url)
                        .header("content-type", "application/json")
                        .body(Full::new(body.clone()))
                        .unwrap();
                    let t = Instant::now();
                    let resp = client.request(req).await.unwrap();
                    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
                    assert!(!bytes.is_empty());
                    if begun.elapsed() > warmup {
                        lat.push(t.elapsed().as_micros() as u32);
                    }
                }
                lat
            }));
        }
        tokio::time::sleep(warmup + Duration::from_secs_f64(secs)).await;
        stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort_unstable();
        Cell {
            p50_us: percentile(&all, 0.5),
            p99_us: percentile(&all, 0.99),
            rps: all.len() as f64 / secs,
        }
    })
}

fn main() {
    // `cargo bench` passes `--bench`; accept and ignore harness flags.
    let secs: f64 = std::env::var("OVERHEAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let upstream = start_upstream();
    let router = start_router(&upstream);
    std::thread::sleep(Duration::from_millis(500));
    println!("| mode | concurrency | direct p50 µs | router p50 µs | added p50 µs | direct p99 µs | router p99 µs | added p99 µs | direct req/s | router req/s | router/direct |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for streaming in [false, true] {
        for concurrency in [1usize, 32, 256] {
            let d = measure(&upstream, streaming, concurrency, secs);
            let r = measure(&router, streaming, concurrency, secs);
            println!(
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} |",
                if streaming { "stream (16 chunks)" } else { "non-stream" },
                concurrency,
                d.p50_us,
                r.p50_us,
                r.p50_us - d.p50_us,
                d.p99_us,
                r.p99_us,
                r.p99_us - d.p99_us,
                d.rps,
                r.rps,
                r.rps / d.rps
            );
        }
    }
}
