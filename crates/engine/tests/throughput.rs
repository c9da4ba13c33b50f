//! How many concurrent streams and streamed tokens per second one engine process sustains on one
//! core without falling behind its clock. Ignored by default (it measures, it does not assert
//! behaviour); run it in release:
//!
//! ```text
//! cargo test --release -p qoe-engine --test throughput -- --ignored --nocapture
//! ```
//!
//! The server runs on a current-thread runtime in its own OS thread (one core by construction);
//! the clients run on another thread. Reported: streamed tokens/s, the server thread's CPU use,
//! and the real-time loop's statistics (resyncs: times virtual time fell too far
//! behind the wall clock), once all streams are started (after the connection burst) and at the
//! end. Knobs: `QOE_BENCH_STREAMS` (2000), `QOE_BENCH_TOKENS` per stream (300),
//! `QOE_BENCH_SPEED` (2.5, on the h100 profile: ≈ 28 ms iterations at batch 2000, ≈ 70k
//! tokens/s of model output).

use qoe_engine::{serve, EngineArgs};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (CPU time, time spent runnable but waiting for a CPU) of the calling thread, ns (Linux
/// `schedstat`). The second shows how much the host, not the engine, held the thread back.
fn thread_sched_ns() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let mut f = s.split_whitespace().map(|v| v.parse().unwrap_or(0));
    (f.next().unwrap_or(0), f.next().unwrap_or(0))
}

/// One streamed completion; returns the tokens received.
async fn one_stream(addr: SocketAddr, i: u32, tokens: u32, started: Arc<AtomicU32>) -> u32 {
    let body = json!({"model": "m", "prompt": format!("stream {i} ").repeat(25),
                      "max_tokens": tokens, "ignore_eos": true, "stream": true})
    .to_string();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    // Complete lines are counted; a partial last line waits for the next read. Every frame holds
    // whole SSE events, so chunk-size lines never split an event line.
    let mut pending: Vec<u8> = Vec::new();
    let mut got = 0;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            return got;
        }
        pending.extend_from_slice(&buf[..n]);
        let Some(last_nl) = pending.iter().rposition(|&b| b == b'\n') else {
            continue;
        };
        let mut done = false;
        for line in pending[..last_nl].split(|&b| b == b'\n') {
            if line.starts_with(b"data: {") {
                if got == 0 {
                    started.fetch_add(1, Ordering::Relaxed);
                }
                got += 1;
            } else if line.starts_with(b"data: [DONE]") {
                done = true;
            }
        }
        pending.drain(..=last_nl);
        if done {
            return got;
        }
    }
}

async fn loop_stats(addr: SocketAddr) -> Value {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /admin/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("");
    let v: Value = serde_json::from_str(body).unwrap_or_default();
    v["loop"].clone()
}

#[test]
#[ignore]
fn streams_and_tokens_per_second_on_one_core() {
    let streams: u32 = env("QOE_BENCH_STREAMS", 2000);
    let tokens: u32 = env("QOE_BENCH_TOKENS", 300);
    let speed: f64 = env("QOE_BENCH_SPEED", 2.5);
    let args = EngineArgs {
        port: 0,
        models: vec!["m".into()],
        profile: "h100-llama3-8b".into(),
        speed,
        max_num_seqs: streams.max(256),
        max_num_batched_tokens: (2 * streams).max(2048),
        kv_capacity_tokens: Some(streams as u64 * (tokens as u64 + 128) + 16_384),
        ..EngineArgs::default()
    };

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::Builder::new()
        .name("engine-server".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let (cpu0, wait0) = thread_sched_ns();
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                serve(args, listener, async move {
                    let _ = stop_rx.await;
                })
                .await
                .unwrap();
            });
            let (cpu1, wait1) = thread_sched_ns();
            (cpu1 - cpu0, wait1 - wait0)
        })
        .unwrap();

    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let report = client.block_on(async move {
        let start = Instant::now();
        let started = Arc::new(AtomicU32::new(0));
        let tasks: Vec<_> = (0..streams)
            .map(|i| tokio::spawn(one_stream(addr, i, tokens, started.clone())))
            .collect();
        while started.load(Ordering::Relaxed) < streams {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let ramp = start.elapsed();
        let at_ramp = loop_stats(addr).await;
        let mut total = 0u64;
        for t in tasks {
            let got = t.await.unwrap();
            assert_eq!(got, tokens, "a stream lost tokens");
            total += got as u64;
        }
        let elapsed = start.elapsed();
        (elapsed, ramp, total, at_ramp, loop_stats(addr).await)
    });
    let (elapsed, ramp, total, at_ramp, at_end) = report;
    let _ = stop_tx.send(());
    let (cpu_ns, wait_ns) = server.join().unwrap();
    let server_cpu = Duration::from_nanos(cpu_ns).as_secs_f64();
    let secs = elapsed.as_secs_f64();
    println!("streams {streams}, tokens/stream {tokens}, model speed {speed} (h100 profile)");
    println!(
        "streamed {total} tokens in {secs:.2} s: {:.0} tokens/s",
        total as f64 / secs
    );
    println!(
        "server thread CPU {server_cpu:.2} s ({:.0}% of one core); {:.0} tokens per CPU-second",
        100.0 * server_cpu / secs,
        total as f64 / server_cpu
    );
    println!(
        "server thread waited {:.2} s for a CPU while runnable (host contention)",
        Duration::from_nanos(wait_ns).as_secs_f64()
    );
    println!(
        "loop when all streams had started ({:.2} s): {at_ramp}",
        ramp.as_secs_f64()
    );
    println!("loop at the end: {at_end}");
}
