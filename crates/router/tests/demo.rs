//! `qoe-router demo` in-process: its fleet serves through the router, and stopping it lets the
//! streams in flight finish before the engines stop.

mod common;

use bytes::Bytes;
use clap::Parser;
use common::*;
use http_body_util::{BodyExt, Full};
use std::time::Duration;

#[derive(Parser)]
struct Demo {
    #[command(flatten)]
    args: qoe_router::demo::DemoArgs,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_demo_lets_its_streams_finish() {
    let demo = Demo::parse_from(["demo", "--port", "0", "--fast", "1", "--slow", "1"]).args;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (url_tx, url_rx) = tokio::sync::oneshot::channel::<String>();
    let running = tokio::spawn(qoe_router::demo::run_demo(
        demo,
        async move {
            let _ = stopped.await;
        },
        move |router, _| {
            let _ = url_tx.send(router.to_string());
        },
    ));
    let router = tokio::time::timeout(Duration::from_secs(30), url_rx)
        .await
        .expect("the demo comes up")
        .unwrap();
    let body = r#"{"model":"sim-llama","prompt":"Hello","max_tokens":120,"ignore_eos":true,"stream":true}"#;
    let request = http::Request::post(format!("{router}/v1/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = client().request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    // Stopped with the stream under way: it still ends whole.
    stop.send(()).unwrap();
    let rest = tokio::time::timeout(Duration::from_secs(30), body.collect())
        .await
        .expect("the stream ends")
        .expect("without an error")
        .to_bytes();
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
    assert!(!rest.contains("\"error\""), "{rest}");
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the demo exits")
        .unwrap()
        .unwrap();
}
