//! Opens N concurrent streaming completions against a URL and holds them open, reading as tokens
//! arrive, for a while: the load behind the "RSS with 1,000 concurrent slow streams" measurement
//! (`scripts/bench-rss.sh`).
//!
//! usage: hold_streams URL N SECONDS

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = format!("{}/v1/completions", args.get(1).expect("URL"));
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let secs: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(20);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(n)
        .build(HttpConnector::new());
    let open = Arc::new(AtomicU64::new(0));
    let chunks = Arc::new(AtomicU64::new(0));
    let body = Bytes::from(
        r#"{"model":"sim-llama","prompt":"Tell me a long story about routers.","max_tokens":100000,"ignore_eos":true,"stream":true}"#,
    );
    for _ in 0..n {
        let (client, url, body, open, chunks) = (
            client.clone(),
            url.clone(),
            body.clone(),
            open.clone(),
            chunks.clone(),
        );
        tokio::spawn(async move {
            let req = hyper::Request::post(url)
                .header("content-type", "application/json")
                .body(Full::new(body))
                .unwrap();
            let Ok(resp) = client.request(req).await else {
                return;
            };
            open.fetch_add(1, Ordering::Relaxed);
            let mut body = resp.into_body();
            while let Some(Ok(_)) = body.frame().await {
                chunks.fetch_add(1, Ordering::Relaxed);
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    for s in 0..secs {
        tokio::time::sleep(Duration::from_secs(1)).await;
        println!(
            "t={}s open_streams={} chunks={}",
            s + 1,
            open.load(Ordering::Relaxed),
            chunks.load(Ordering::Relaxed)
        );
    }
}
