//! How many concurrent streams and streamed tokens per second one engine process sustains on one
//! core, and whether it keeps its clock meanwhile. Ignored by default (it measures, it does not
//! assert behaviour); run it in release:
//!
//! ```text
//! cargo test --release -p qoe-engine --test throughput -- --ignored --nocapture
//! ```
//!
//! The server runs on a current-thread runtime in its own OS thread (one core by construction);
//! the clients run on another thread. Reported: streamed tokens/s; the server thread's CPU use,
//! its time waiting for a CPU (the host's contention, not the engine's) and its writes (the
//! engine's count of response frames, one write each; tokens per write is above 1 when it caught
//! up, delivering several iterations at once, and CPU per write is the cost that matters, since
//! most of it is the write itself); and whether the
//! real-time loop kept its clock: time lost to resyncs (virtual time dropped after falling more
//! than the catch-up limit behind), the lag at the end and at most, and the iterations run back to
//! back to catch up. The loop is read once all streams have started (after the connection burst)
//! and at the end. Knobs: `QOE_BENCH_STREAMS` (2000), `QOE_BENCH_TOKENS` per stream (300),
//! `QOE_BENCH_SPEED` (2.5, on the h100 profile: ≈ 28 ms iterations at batch 2000, ≈ 70k
//! tokens/s of model output), `QOE_BENCH_CATCH_UP_MS` (the engine's `--catch-up-limit-ms`).

use qoe_engine::{serve, EngineArgs};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How often the lag is sampled while the streams run.
const LAG_SAMPLE: Duration = Duration::from_millis(250);

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the calling thread used so far (Linux `/proc/thread-self`).
#[derive(Clone, Copy, Default)]
struct ThreadUse {
    /// CPU time, ns.
    cpu_ns: u64,
    /// Time runnable but waiting for a CPU, ns: how much the host, not the engine, held it back.
    wait_ns: u64,
}

impl ThreadUse {
    fn now() -> Self {
        let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
        let mut f = s.split_whitespace().map(|v| v.parse().unwrap_or(0));
        Self {
            cpu_ns: f.next().unwrap_or(0),
            wait_ns: f.next().unwrap_or(0),
        }
    }

    fn since(self, before: Self) -> Self {
        Self {
            cpu_ns: self.cpu_ns - before.cpu_ns,
            wait_ns: self.wait_ns - before.wait_ns,
        }
    }
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
    let catch_up_limit_ms: u64 = env(
        "QOE_BENCH_CATCH_UP_MS",
        EngineArgs::default().catch_up_limit_ms,
    );
    let args = EngineArgs {
        port: 0,
        models: vec!["m".into()],
        profile: "h100-llama3-8b".into(),
        speed,
        max_num_seqs: streams.max(256),
        max_num_batched_tokens: (2 * streams).max(2048),
        kv_capacity_tokens: Some(streams as u64 * (tokens as u64 + 128) + 16_384),
        catch_up_limit_ms,
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
            let before = ThreadUse::now();
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                serve(args, listener, async move {
                    let _ = stop_rx.await;
                })
                .await
                .unwrap();
            });
            ThreadUse::now().since(before)
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
        // The lag now, sampled while the streams run: the last sample is the lag near the end.
        let streaming = Arc::new(AtomicBool::new(true));
        let sampler = tokio::spawn({
            let streaming = streaming.clone();
            async move {
                let mut lags = Vec::new();
                while streaming.load(Ordering::Relaxed) {
                    let lag = loop_stats(addr).await["lag_micros"].as_u64().unwrap_or(0);
                    if streaming.load(Ordering::Relaxed) {
                        lags.push(lag);
                    }
                    tokio::time::sleep(LAG_SAMPLE).await;
                }
                lags
            }
        });
        let mut total = 0u64;
        for t in tasks {
            let got = t.await.unwrap();
            assert_eq!(got, tokens, "a stream lost tokens");
            total += got as u64;
        }
        let elapsed = start.elapsed();
        streaming.store(false, Ordering::Relaxed);
        let lags = sampler.await.unwrap();
        (elapsed, ramp, total, at_ramp, loop_stats(addr).await, lags)
    });
    let (elapsed, ramp, total, at_ramp, at_end, lags) = report;
    let _ = stop_tx.send(());
    let used = server.join().unwrap();
    let server_cpu = Duration::from_nanos(used.cpu_ns).as_secs_f64();
    let secs = elapsed.as_secs_f64();
    let micros = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0) as f64 / 1e6;
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
        Duration::from_nanos(used.wait_ns).as_secs_f64()
    );
    let writes = at_end["frames_written"].as_u64().unwrap_or(0).max(1);
    println!(
        "server writes {writes}: {:.2} tokens per write, {:.2} µs of server CPU per write",
        total as f64 / writes as f64,
        1e6 * server_cpu / writes as f64
    );
    let kept = at_end["resyncs"].as_u64() == Some(0);
    println!(
        "clock {}: {:.3} s lost to {} resyncs (catch-up limit {:.1} s); lag {:.3} s at the last of {} samples while streaming ({:.3} s the largest sampled), {:.3} s at most; {} of {} iterations run back to back to catch up",
        if kept { "KEPT" } else { "NOT KEPT" },
        micros(&at_end, "lost_micros"),
        at_end["resyncs"],
        micros(&at_end, "catch_up_limit_micros"),
        lags.last().copied().unwrap_or(0) as f64 / 1e6,
        lags.len(),
        lags.iter().max().copied().unwrap_or(0) as f64 / 1e6,
        micros(&at_end, "max_lag_micros"),
        at_end["catch_up_iterations"],
        at_end["iterations"],
    );
    println!(
        "loop when all streams had started ({:.2} s): {at_ramp}",
        ramp.as_secs_f64()
    );
    println!("loop at the end: {at_end}");
}
