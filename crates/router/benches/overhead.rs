//! What the router adds over going direct, in two settings measured in the same run, each cell
//! sent once straight to the upstream and once through the router:
//!
//! * **instant**: an upstream that answers at once (a 200-byte JSON body, or 16 SSE chunks and
//!   `[DONE]` written in one burst). The worst case for a proxy: the router's own work is compared
//!   with an upstream that does almost nothing, so the comparison is CPU-bound. Reports latency,
//!   throughput and the router's CPU time per request and per forwarded chunk.
//! * **paced**: an engine-like upstream. Its pacing comes from the H100 figures in FIELD-NOTES
//!   ("How long an engine iteration takes"): the first token after the prefill of a 1k-token
//!   prompt (≈ 27 ms; 1k is the Azure conversation median input), then one chunk per decode step
//!   at batch 64 (≈ 11 ms), 32 tokens; a non-streamed answer comes whole after the same 368 ms.
//!   Reports the added time to first token and end-to-end latency, and throughput.
//!
//! Against the paced upstream two more figures: each answer carries the schedule the upstream drew
//! for it (`x-bench-schedule-us`), so every request's first byte and end are also measured *past
//! its own schedule*, which takes the jitter out of the comparison (a difference of medians of two
//! jittered runs moves by more than the hop adds); and the same cells go through a **byte relay**
//! (`tokio::io::copy_bidirectional`, no parsing) as well, the floor any user-space proxy hop has on
//! the machine.
//!
//! Concurrency 1, 32 and 256, streaming and not, closed loop. Upstreams, router and load
//! generator each run on their own single-threaded runtime (named threads, so `perf` can tell
//! them apart) and share the machine's cores the way separate processes would. Router CPU time is
//! the router thread's on-CPU time from its `schedstat` file (user and kernel), less what it
//! spends idle (scrapes, health checks), per completed request; its write system calls
//! per request come from its `io` file the same way (a forwarded frame costs a write unless
//! frames already queued go out together).
//!
//! `cargo bench -p qoe-router --bench overhead`. Environment:
//! `OVERHEAD_SECS` measured seconds per instant cell (default 3), `OVERHEAD_PACED_SECS` per paced
//! cell (default 6), `OVERHEAD_ONLY` = `instant` or `paced` to run one setting,
//! `OVERHEAD_CONCURRENCY` (e.g. `32` or `1,256`) to run some concurrency levels only,
//! `OVERHEAD_MODE` = `stream` or `non-stream` to run one mode (the per-chunk figure needs both),
//! `OVERHEAD_TTFT_MS` / `OVERHEAD_ITL_MS` / `OVERHEAD_TOKENS` to change the pacing,
//! `OVERHEAD_JITTER` (e.g. `0.2`) to vary each paced request's TTFT and ITL by up to ±20%
//! (default 0: every answer takes the same time and closed-loop clients move in lockstep),
//! `OVERHEAD_ROUNDS` (default 1) to measure each paced cell that many times, direct, relay and
//! router in turn, and report the past-schedule percentiles as medians over the rounds (the
//! first table then has a row per round), `OVERHEAD_CLIENT=h2` for clients that speak HTTP/2
//! (prior knowledge) to the router, all the clients' requests multiplexed on one connection as an
//! HTTP/2 client pools them (the direct and relay runs stay HTTP/1.1).

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Chunks of an instant stream.
const INSTANT_CHUNKS: usize = 16;

/// Response header of the paced upstream: the answer's scheduled first byte and end, µs after the
/// request arrived (`first,end`).
const SCHEDULE_HEADER: &str = "x-bench-schedule-us";

/// Paced requests answered since the current cell started (see [`Pacing::draw`]).
static JITTER_DRAWS: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy)]
struct Pacing {
    ttft: Duration,
    itl: Duration,
    tokens: usize,
    /// Each request's TTFT and ITL scaled by a factor drawn uniformly from `1 ± jitter`: real
    /// prompts and batches differ, and without it closed-loop clients that all get the same
    /// answer time stay in lockstep, meeting the router as one burst.
    jitter: f64,
}

impl Pacing {
    /// This request's pacing: the next factor from a fixed sequence, restarted by every cell
    /// ([`measure`]), so the direct and the routed run of a cell draw the same factors.
    fn draw(&self) -> Pacing {
        if self.jitter <= 0.0 {
            return *self;
        }
        let mut z = JITTER_DRAWS
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let u = (z >> 11) as f64 / (1u64 << 53) as f64;
        let f = 1.0 + self.jitter * (2.0 * u - 1.0);
        Pacing {
            ttft: self.ttft.mul_f64(f),
            itl: self.itl.mul_f64(f),
            ..*self
        }
    }

    /// When a non-streamed answer is complete: the last token's time.
    fn whole(&self) -> Duration {
        self.ttft + self.itl * (self.tokens.max(1) as u32 - 1)
    }
}

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn sse_chunk(i: usize) -> Bytes {
    Bytes::from(format!(
        "data: {{\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"model\":\"m\",\"choices\":[{{\"index\":0,\"text\":\"t{i}\",\"finish_reason\":null}}]}}\n\n"
    ))
}

const JSON_ANSWER: &[u8] = br#"{"id":"cmpl-1","object":"text_completion","model":"m","choices":[{"index":0,"text":"hello world","finish_reason":"length"}],"usage":{"prompt_tokens":3,"total_tokens":19,"completion_tokens":16}}"#;

type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn upstream_handler(
    req: hyper::Request<hyper::body::Incoming>,
    pacing: Option<Pacing>,
) -> Result<hyper::Response<UpBody>, Infallible> {
    let arrived = tokio::time::Instant::now();
    let path = req.uri().path().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if path == "/v1/models" {
        let b = Full::new(Bytes::from_static(
            br#"{"object":"list","data":[{"id":"m","object":"model"}]}"#,
        ));
        return Ok(hyper::Response::new(b.boxed()));
    }
    let streaming = body.windows(14).any(|w| w == b"\"stream\":true}");
    let drawn = pacing.map(|p| p.draw());
    let body = match (streaming, drawn) {
        (false, None) => Full::new(Bytes::from_static(JSON_ANSWER)).boxed(),
        (false, Some(p)) => {
            tokio::time::sleep_until(arrived + p.whole()).await;
            Full::new(Bytes::from_static(JSON_ANSWER)).boxed()
        }
        (true, None) => {
            let chunks = (0..INSTANT_CHUNKS)
                .map(|i| Ok::<_, Infallible>(Frame::data(sse_chunk(i))))
                .chain(std::iter::once(Ok(Frame::data(Bytes::from_static(
                    b"data: [DONE]\n\n",
                )))));
            StreamBody::new(futures_util::stream::iter(chunks)).boxed()
        }
        (true, Some(p)) => {
            // Token i at ttft + i·itl (absolute deadlines: no drift), `[DONE]` right after the last.
            let stream = futures_util::stream::unfold(0usize, move |i| async move {
                if i > p.tokens {
                    return None;
                }
                if i == p.tokens {
                    let done = Bytes::from_static(b"data: [DONE]\n\n");
                    return Some((Ok::<_, Infallible>(Frame::data(done)), i + 1));
                }
                tokio::time::sleep_until(arrived + p.ttft + p.itl * i as u32).await;
                Some((Ok(Frame::data(sse_chunk(i))), i + 1))
            });
            StreamBody::new(stream).boxed()
        }
    };
    let mut resp = hyper::Response::new(body);
    if let Some(p) = drawn {
        // The schedule this answer keeps, so a client can tell the hop's delay from the pacing.
        let first = if streaming { p.ttft } else { p.whole() };
        let value = format!("{},{}", first.as_micros(), p.whole().as_micros());
        resp.headers_mut()
            .insert(SCHEDULE_HEADER, value.parse().unwrap());
    }
    if streaming {
        resp.headers_mut()
            .insert("content-type", "text/event-stream".parse().unwrap());
    }
    Ok(resp)
}

fn start_upstream(name: &str, pacing: Option<Pacing>) -> String {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            runtime().block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                loop {
                    let (tcp, _) = listener.accept().await.unwrap();
                    tcp.set_nodelay(true).unwrap();
                    tokio::spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(
                                TokioIo::new(tcp),
                                hyper::service::service_fn(move |r| upstream_handler(r, pacing)),
                            )
                            .await;
                    });
                }
            });
        })
        .unwrap();
    format!("http://{addr}")
}

/// A byte relay in front of `upstream` on its own thread: each connection copied both ways to a
/// connection of its own to the upstream, no parsing. What any user-space proxy hop costs on this
/// machine (two reads, two writes and the wake-ups between them), the floor under the router's
/// added latency. Returns its URL and its thread's `/proc` directory.
fn start_relay(upstream: &str) -> (String, std::path::PathBuf) {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    let target = upstream.trim_start_matches("http://").to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("relay".into())
        .spawn(move || {
            tx.send(thread_dir()).unwrap();
            runtime().block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                loop {
                    let (mut inbound, _) = listener.accept().await.unwrap();
                    inbound.set_nodelay(true).unwrap();
                    let target = target.clone();
                    tokio::spawn(async move {
                        let mut outbound = tokio::net::TcpStream::connect(&target).await.unwrap();
                        outbound.set_nodelay(true).unwrap();
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    });
                }
            });
        })
        .unwrap();
    (format!("http://{addr}"), rx.recv().unwrap())
}

/// The calling thread's `/proc` directory (its `schedstat` and `io`).
fn thread_dir() -> std::path::PathBuf {
    let me = std::fs::read_link("/proc/thread-self").expect("procfs");
    std::path::Path::new("/proc").join(me)
}

/// Starts one router per upstream, all on one thread; returns their URLs and the thread's `/proc`
/// directory.
fn start_routers(upstreams: &[&str]) -> (Vec<String>, std::path::PathBuf) {
    let mut urls = Vec::new();
    let mut servers = Vec::new();
    for upstream in upstreams {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        urls.push(format!("http://{}", std_listener.local_addr().unwrap()));
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
        servers.push((std_listener, config));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("router".into())
        .spawn(move || {
            tx.send(thread_dir()).unwrap();
            runtime().block_on(async move {
                let runs = servers.into_iter().map(|(l, config)| async move {
                    let listener = tokio::net::TcpListener::from_std(l).unwrap();
                    qoe_router::serve(config, listener, std::future::pending())
                        .await
                        .unwrap();
                });
                futures_util::future::join_all(runs).await;
            });
        })
        .unwrap();
    (urls, rx.recv().unwrap())
}

/// What a proxy thread has used so far: on-CPU time (the first field of `schedstat`, ns) and
/// write system calls (`syscw` of `io`; socket reads go through `recv`, which `io` does not
/// count).
#[derive(Clone, Copy)]
struct Usage {
    cpu_ns: f64,
    writes: f64,
}

impl Usage {
    fn of(thread: &std::path::Path) -> Usage {
        let s = std::fs::read_to_string(thread.join("schedstat")).unwrap();
        let cpu_ns = s.split_whitespace().next().unwrap().parse().unwrap();
        let io = std::fs::read_to_string(thread.join("io")).unwrap();
        let field = |name: &str| {
            io.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(f64::NAN)
        };
        Usage {
            cpu_ns,
            writes: field("syscw:"),
        }
    }

    /// `self - earlier - idle × seconds`, floored at zero.
    fn since(self, earlier: Usage, idle: Usage, seconds: f64) -> Usage {
        let d = |a: f64, b: f64, i: f64| (a - b - i * seconds).max(0.0);
        Usage {
            cpu_ns: d(self.cpu_ns, earlier.cpu_ns, idle.cpu_ns),
            writes: d(self.writes, earlier.writes, idle.writes),
        }
    }

    fn per(self, n: usize) -> Usage {
        let n = n.max(1) as f64;
        Usage {
            cpu_ns: self.cpu_ns / n,
            writes: self.writes / n,
        }
    }
}

struct Sample {
    start: Duration,
    first_byte: Duration,
    end: Duration,
    /// The upstream's schedule for this answer (first byte, end), when it is paced.
    schedule: Option<(Duration, Duration)>,
}

struct Cell {
    ttft_p50: f64,
    ttft_p99: f64,
    e2e_p50: f64,
    e2e_p99: f64,
    /// Percentiles (p50, p99) of each request's first byte and end past the upstream's schedule,
    /// µs: the jitter taken out, what the path itself adds.
    ttft_late: (f64, f64),
    e2e_late: (f64, f64),
    rps: f64,
    /// Requests measured (started after the warm-up, finished within the window).
    n: usize,
    /// Requests completed in the whole run, warm-up included (for CPU per request).
    completed: usize,
}

/// The value at quantile `q` of `v` (sorted in place), µs.
fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn measure(
    target: &str,
    http2: bool,
    streaming: bool,
    concurrency: usize,
    warmup: Duration,
    secs: f64,
) -> Cell {
    JITTER_DRAWS.store(0, Ordering::Relaxed);
    let url = format!("{target}/v1/completions");
    let body = Bytes::from(format!(
        r#"{{"model":"m","prompt":"hello there","max_tokens":32,"stream":{streaming}}}"#
    ));
    let window = warmup + Duration::from_secs_f64(secs);
    runtime().block_on(async move {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1024)
            .http2_only(http2)
            .build(connector);
        let stop = Arc::new(AtomicBool::new(false));
        let begun = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (client, url, body, stop) =
                (client.clone(), url.clone(), body.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut samples = Vec::with_capacity(4096);
                while !stop.load(Ordering::Relaxed) {
                    let req = hyper::Request::post(&url)
                        .header("content-type", "application/json")
                        .body(Full::new(body.clone()))
                        .unwrap();
                    let start = begun.elapsed();
                    let resp = client.request(req).await.unwrap();
                    assert!(resp.status().is_success(), "{}", resp.status());
                    let schedule = resp
                        .headers()
                        .get(SCHEDULE_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.split_once(','))
                        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
                        .map(|(a, b)| (Duration::from_micros(a), Duration::from_micros(b)));
                    let mut body = resp.into_body();
                    let mut first_byte = None;
                    let mut bytes = 0;
                    while let Some(frame) = body.frame().await {
                        if let Some(d) = frame.unwrap().data_ref() {
                            first_byte.get_or_insert_with(|| begun.elapsed());
                            bytes += d.len();
                        }
                    }
                    assert!(bytes > 0);
                    let end = begun.elapsed();
                    samples.push(Sample {
                        start,
                        first_byte: first_byte.unwrap_or(end),
                        end,
                        schedule,
                    });
                }
                samples
            }));
        }
        tokio::time::sleep(window).await;
        stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        let completed = all.len();
        let done_in_window = all
            .iter()
            .filter(|s| s.end >= warmup && s.end < window)
            .count();
        let measured: Vec<&Sample> = all
            .iter()
            .filter(|s| s.start >= warmup && s.end < window)
            .collect();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let mut ttft: Vec<f64> = measured
            .iter()
            .map(|s| us(s.first_byte - s.start))
            .collect();
        let mut e2e: Vec<f64> = measured.iter().map(|s| us(s.end - s.start)).collect();
        let late = |at: fn(&Sample) -> Duration,
                    scheduled: fn((Duration, Duration)) -> Duration| {
            let mut v: Vec<f64> = measured
                .iter()
                .filter_map(|s| Some(us(at(s) - s.start) - us(scheduled(s.schedule?))))
                .collect();
            (percentile(&mut v, 0.5), percentile(&mut v, 0.99))
        };
        Cell {
            ttft_late: late(|s| s.first_byte, |s| s.0),
            e2e_late: late(|s| s.end, |s| s.1),
            ttft_p50: percentile(&mut ttft, 0.5),
            ttft_p99: percentile(&mut ttft, 0.99),
            e2e_p50: percentile(&mut e2e, 0.5),
            e2e_p99: percentile(&mut e2e, 0.99),
            rps: done_in_window as f64 / secs,
            n: measured.len(),
            completed,
        }
    })
}

/// The router thread, and what it uses per second when no request comes (scrapes and health
/// checks), subtracted from every cell's figures.
/// A proxy's thread (the router's or the relay's): where to read its usage, and what it uses
/// idle (scrapes, health checks), per second.
struct ProxyThread {
    dir: std::path::PathBuf,
    idle_per_s: Usage,
}

impl ProxyThread {
    fn new(dir: std::path::PathBuf) -> Self {
        let (t, before) = (Instant::now(), Usage::of(&dir));
        std::thread::sleep(Duration::from_secs(2));
        let (after, secs) = (Usage::of(&dir), t.elapsed().as_secs_f64());
        let idle_per_s = Usage {
            cpu_ns: (after.cpu_ns - before.cpu_ns) / secs,
            writes: (after.writes - before.writes) / secs,
        };
        ProxyThread { dir, idle_per_s }
    }
}

/// One cell through a proxy, and what the proxy's thread used per request in it.
fn measure_via(
    proxy: &str,
    http2: bool,
    thread: &ProxyThread,
    streaming: bool,
    concurrency: usize,
    warmup: Duration,
    secs: f64,
) -> (Cell, Usage) {
    let (t, before) = (Instant::now(), Usage::of(&thread.dir));
    let cell = measure(proxy, http2, streaming, concurrency, warmup, secs);
    let used = Usage::of(&thread.dir).since(before, thread.idle_per_s, t.elapsed().as_secs_f64());
    let per_request = used.per(cell.completed);
    (cell, per_request)
}

/// Whether the load generator speaks HTTP/2 (prior knowledge) to the router (`OVERHEAD_CLIENT=h2`;
/// default HTTP/1.1). The upstreams and the byte relay are always spoken to in HTTP/1.1, as the
/// router speaks to them.
fn client_http2() -> bool {
    std::env::var("OVERHEAD_CLIENT").is_ok_and(|c| c.eq_ignore_ascii_case("h2"))
}

/// [`measure_via`] the router, its clients speaking the protocol [`client_http2`] says.
fn measure_router(
    router: &str,
    thread: &ProxyThread,
    streaming: bool,
    concurrency: usize,
    warmup: Duration,
    secs: f64,
) -> (Cell, Usage) {
    measure_via(
        router,
        client_http2(),
        thread,
        streaming,
        concurrency,
        warmup,
        secs,
    )
}

const MODES: [(bool, &str); 2] = [(false, "non-stream"), (true, "stream")];

/// The modes to run (`OVERHEAD_MODE` = `stream` or `non-stream` for one; default both).
fn modes() -> Vec<(bool, &'static str)> {
    let only = std::env::var("OVERHEAD_MODE").unwrap_or_default();
    MODES
        .into_iter()
        .filter(|(_, m)| only.is_empty() || *m == only)
        .collect()
}

/// The concurrency levels to run (`OVERHEAD_CONCURRENCY`, comma-separated; default 1, 32, 256).
fn concurrency_levels() -> Vec<usize> {
    std::env::var("OVERHEAD_CONCURRENCY")
        .ok()
        .map(|s| s.split(',').filter_map(|c| c.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 32, 256])
}

/// The router's CPU per forwarded chunk, µs: a streamed answer's extra CPU over the plain answer
/// of the same cell (measured just before, kept in `plain`), over its extra frames. Blank for the
/// plain answer itself.
fn per_chunk_cpu(streaming: bool, cpu_ns: f64, plain: &mut f64, chunks: usize) -> String {
    if streaming {
        format!("{:.1}", (cpu_ns - *plain) / 1e3 / chunks as f64)
    } else {
        *plain = cpu_ns;
        String::new()
    }
}

/// The router's CPU per request (µs), then its write system calls per request.
fn usage_cells(u: &Usage) -> String {
    format!("{:.1} | {:.1}", u.cpu_ns / 1e3, u.writes)
}

fn instant(upstream: &str, router: &str, thread: &ProxyThread, secs: f64) {
    let warmup = Duration::from_millis(300);
    println!("\n### instant upstream ({secs} s per cell)\n");
    println!("| mode | concurrency | direct p50 µs | router p50 µs | added p50 µs | direct p99 µs | router p99 µs | added p99 µs | direct req/s | router req/s | router/direct | router CPU µs/request | router writes/request | router CPU µs/chunk |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for concurrency in concurrency_levels() {
        let mut cpu_plain = f64::NAN;
        for (streaming, mode) in modes() {
            let d = measure(upstream, false, streaming, concurrency, warmup, secs);
            let (r, used) = measure_router(router, thread, streaming, concurrency, warmup, secs);
            let per_chunk = per_chunk_cpu(streaming, used.cpu_ns, &mut cpu_plain, INSTANT_CHUNKS);
            let used = usage_cells(&used);
            let mode = if streaming {
                format!("{mode} ({INSTANT_CHUNKS} chunks, one burst)")
            } else {
                mode.to_string()
            };
            println!(
                "| {mode} | {concurrency} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {used} | {per_chunk} |",
                d.e2e_p50,
                r.e2e_p50,
                r.e2e_p50 - d.e2e_p50,
                d.e2e_p99,
                r.e2e_p99,
                r.e2e_p99 - d.e2e_p99,
                d.rps,
                r.rps,
                r.rps / d.rps
            );
        }
    }
}

fn paced(
    upstream: &str,
    (relay, relay_thread): (&str, &ProxyThread),
    (router, thread): (&str, &ProxyThread),
    p: Pacing,
    secs: f64,
) {
    // Long enough for every closed-loop client to be past its first request.
    let warmup = p.whole() + Duration::from_millis(200);
    println!(
        "\n### paced upstream (TTFT {} ms, ITL {} ms, {} tokens, jitter ±{:.0}%; {secs} s per cell)\n",
        p.ttft.as_millis(),
        p.itl.as_millis(),
        p.tokens,
        p.jitter * 100.0
    );
    println!("| mode | concurrency | requests measured (direct, router) | TTFT p50 ms direct / router (added) | TTFT p99 ms direct / router (added) | e2e p50 ms direct / router (added) | e2e p99 ms direct / router (added) | direct req/s | router req/s | router/direct | router CPU µs/request | router writes/request | router CPU µs/chunk |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let ms = |us: f64| us / 1e3;
    let pair = |d: f64, r: f64| format!("{:.2} / {:.2} (+{:.2})", ms(d), ms(r), ms(r - d));
    let three = |d: f64, b: f64, r: f64| {
        format!(
            "{d:.0} / {b:.0} / {r:.0} (relay +{:.0}, router +{:.0})",
            b - d,
            r - d
        )
    };
    let rounds = env("OVERHEAD_ROUNDS", 1usize).max(1);
    let mut relay_rows = Vec::new();
    for concurrency in concurrency_levels() {
        let mut cpu_plain = f64::NAN;
        for (streaming, mode) in modes() {
            // Direct, relay and router in turn, `rounds` times: the machine's slow drifts then
            // hit all three alike, and the medians over rounds drop the rounds a burst of
            // outside load spoiled.
            let mut late: [Vec<[f64; 4]>; 3] = Default::default();
            let mut n = [0usize; 3];
            let mut cpu_us: [Vec<f64>; 2] = Default::default();
            for _ in 0..rounds {
                let d = measure(upstream, false, streaming, concurrency, warmup, secs);
                let (b, relay_used) = measure_via(
                    relay,
                    false,
                    relay_thread,
                    streaming,
                    concurrency,
                    warmup,
                    secs,
                );
                let (r, used) =
                    measure_router(router, thread, streaming, concurrency, warmup, secs);
                for (i, c) in [&d, &b, &r].into_iter().enumerate() {
                    late[i].push([c.ttft_late.0, c.e2e_late.0, c.ttft_late.1, c.e2e_late.1]);
                    n[i] += c.n;
                }
                cpu_us[0].push(relay_used.cpu_ns / 1e3);
                cpu_us[1].push(used.cpu_ns / 1e3);
                let per_chunk = per_chunk_cpu(streaming, used.cpu_ns, &mut cpu_plain, p.tokens);
                let used = usage_cells(&used);
                let (t50, t99) = if streaming {
                    (pair(d.ttft_p50, r.ttft_p50), pair(d.ttft_p99, r.ttft_p99))
                } else {
                    ("–".into(), "–".into())
                };
                println!(
                    "| {mode} | {concurrency} | {}, {} | {t50} | {t99} | {} | {} | {:.0} | {:.0} | {:.2} | {used} | {per_chunk} |",
                    d.n,
                    r.n,
                    pair(d.e2e_p50, r.e2e_p50),
                    pair(d.e2e_p99, r.e2e_p99),
                    d.rps,
                    r.rps,
                    r.rps / d.rps
                );
            }
            // Column k's median over rounds, for direct, relay and router.
            let median = |k: usize| {
                let m = |i: usize| {
                    percentile(&mut late[i].iter().map(|v| v[k]).collect::<Vec<_>>(), 0.5)
                };
                three(m(0), m(1), m(2))
            };
            let dash = || "–".to_string();
            relay_rows.push(format!(
                "| {mode} | {concurrency} | {}, {}, {} | {} | {} | {} | {} | {:.0} / {:.0} |",
                n[0],
                n[1],
                n[2],
                if streaming { median(0) } else { dash() },
                median(1),
                if streaming { median(2) } else { dash() },
                median(3),
                percentile(&mut cpu_us[0], 0.5),
                percentile(&mut cpu_us[1], 0.5),
            ));
        }
    }
    println!(
        "\nPast the upstream's schedule, µs (each request's first byte and end less the delays the \
         paced upstream drew for it): direct / byte relay / router; with several rounds, each \
         percentile is the median of the rounds' and the requests are the rounds' sum ({rounds} \
         round(s)).\n"
    );
    println!("| mode | concurrency | requests measured (direct, relay, router) | first byte p50 | end p50 | first byte p99 | end p99 | CPU µs/request, relay / router |");
    println!("|---|---|---|---|---|---|---|---|");
    for row in relay_rows {
        println!("{row}");
    }
}

fn main() {
    // `cargo bench` passes `--bench`; harness flags are ignored.
    let only = std::env::var("OVERHEAD_ONLY").unwrap_or_default();
    let pacing = Pacing {
        ttft: Duration::from_millis(env("OVERHEAD_TTFT_MS", 27)),
        itl: Duration::from_millis(env("OVERHEAD_ITL_MS", 11)),
        tokens: env("OVERHEAD_TOKENS", 32),
        jitter: env("OVERHEAD_JITTER", 0.0f64).clamp(0.0, 0.9),
    };
    let instant_up = start_upstream("upstream-instant", None);
    let paced_up = start_upstream("upstream-paced", Some(pacing));
    let (routers, schedstat) = start_routers(&[&instant_up, &paced_up]);
    let (relay, relay_dir) = start_relay(&paced_up);
    std::thread::sleep(Duration::from_millis(500));
    let thread = ProxyThread::new(schedstat);
    let relay_thread = ProxyThread::new(relay_dir);
    if only.is_empty() || only == "instant" {
        instant(&instant_up, &routers[0], &thread, env("OVERHEAD_SECS", 3.0));
    }
    if only.is_empty() || only == "paced" {
        paced(
            &paced_up,
            (&relay, &relay_thread),
            (&routers[1], &thread),
            pacing,
            env("OVERHEAD_PACED_SECS", 6.0),
        );
    }
}
