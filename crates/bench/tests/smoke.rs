//! End to end: two simulated engines (`tiny` profile) and a router on 127.0.0.1 ephemeral ports,
//! the smoke workload run for 2 s against the router, against one engine directly, and against
//! that engine over https (a TLS terminator in front that asks for a client certificate, its CA
//! given with `--ca-file`, the bench's certificate with `--client-cert`) with `--compare`, and
//! the written report checked for structure and counts (no timing thresholds).

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use qoe_bench::{load_workload, BenchArgs};
use qoe_sim::report::{Report, ReportSet, RequestLine, Status};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

const MODEL: &str = "sim-llama";
const SEED: u64 = 7;
const DURATION_S: f64 = 2.0;

const API_KEY: &str = "sk-smoke-test-key-0123456789";

fn smoke_workload() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/workloads/smoke.toml")
}

/// A fresh, unique directory under the system temp dir.
fn temp_dir() -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!("qoe-bench-test-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Waits (bounded) until `url` answers 200.
async fn wait_healthy(url: &str) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    for _ in 0..300 {
        let req = http::Request::get(url)
            .body(Full::new(Bytes::new()))
            .unwrap();
        if let Ok(Ok(resp)) =
            tokio::time::timeout(Duration::from_millis(500), client.request(req)).await
        {
            if resp.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{url} never became healthy");
}

fn check_report(r: &Report, planned: u64) {
    let all = &r.overall;
    assert_eq!(
        all.requests, planned,
        "{}: every planned request is accounted for",
        r.label
    );
    assert_eq!(
        all.errors, 0,
        "{}: errors {:?}",
        r.label, all.errors_by_kind
    );
    assert_eq!(all.completed, planned);
    assert!(all.errors_by_kind.is_empty());
    // All three priorities of the smoke workload have a section, and they add up.
    let levels: Vec<u8> = r.by_priority.iter().filter_map(|s| s.priority).collect();
    assert_eq!(levels, [1, 2, 3], "{}", r.label);
    assert_eq!(
        r.by_priority.iter().map(|s| s.requests).sum::<u64>(),
        planned
    );
    assert_eq!(
        r.by_priority.iter().map(|s| s.output_tokens).sum::<u64>(),
        all.output_tokens
    );
    for s in r.scopes() {
        assert!(
            (0.0..=1.0).contains(&s.mean_qoe),
            "{}: {}",
            s.scope(),
            s.mean_qoe
        );
        assert!((0.0..=1.0).contains(&s.qoe_acceptable_share));
        assert!((0.0..=1.0).contains(&s.slo_attainment));
        for p in [&s.ttft_ms, &s.e2e_ms] {
            assert_eq!(p.count, s.requests, "{}: one sample per request", s.scope());
        }
        for p in [&s.ttft_ms, &s.itl_ms, &s.e2e_ms] {
            let (p50, p90, p99, max) = (
                p.p50.unwrap(),
                p.p90.unwrap(),
                p.p99.unwrap(),
                p.max.unwrap(),
            );
            assert!(
                0.0 <= p50 && p50 <= p90 && p90 <= p99 && p99 <= max,
                "{p:?}"
            );
        }
        // A request's first token comes before its end.
        assert!(s.ttft_ms.p50.unwrap() <= s.e2e_ms.max.unwrap());
    }
    // ignore_eos + max_tokens: every request streamed exactly its planned output.
    assert!(all.output_tokens > 0);
    assert!(all.itl_ms.count > 0);
    assert!(r.duration_s > 0.0 && all.achieved_rps > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_against_a_router_and_an_engine() {
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut tasks = Vec::new();
    let mut engines = Vec::new();
    for seed in ["1", "2"] {
        let args = qoe_router::demo::engine_args(&[
            "--port",
            "0",
            "--model",
            MODEL,
            "--profile",
            "tiny",
            "--seed",
            seed,
        ])
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        engines.push(format!("http://{}", listener.local_addr().unwrap()));
        tasks.push(tokio::spawn(qoe_engine::serve(args, listener, stopped())));
    }
    let config = qoe_router::RouterConfig::from_args([
        "qoe-router",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--static-backends",
        &engines.join(","),
        "--static-models",
        MODEL,
        "--routing-logic",
        "least-loaded",
        // The bench authenticates (--api-key): without it every request would be a 401.
        "--api-keys",
        API_KEY,
    ])
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let router = format!("http://{}", listener.local_addr().unwrap());
    tasks.push(tokio::spawn(qoe_router::serve(config, listener, stopped())));
    for url in engines.iter().chain([&router]) {
        wait_healthy(&format!("{url}/health")).await;
    }
    let pki = qoe_tls::testing::TestPki::new();
    // It asks for a client certificate (mutual TLS): without --client-cert every request fails.
    let engine_tls = pki.terminator_for(&engines[0], true).await;

    let out = temp_dir();
    let ca = out.join("ca.pem");
    pki.write_ca(&ca);
    let (client_cert, client_key) = (out.join("client.pem"), out.join("client.key"));
    pki.write_client(&client_cert, &client_key);
    let workload = smoke_workload();
    let duration = DURATION_S.to_string();
    let seed = SEED.to_string();
    let args = BenchArgs::from_flags([
        "--target",
        &router,
        "--target",
        &engines[0],
        "--target",
        &engine_tls,
        "--ca-file",
        ca.to_str().unwrap(),
        "--client-cert",
        client_cert.to_str().unwrap(),
        "--client-key",
        client_key.to_str().unwrap(),
        "--compare",
        "--label",
        "router,engine,engine-tls",
        "--workload",
        workload.to_str().unwrap(),
        "--duration",
        &duration,
        "--seed",
        &seed,
        "--model",
        MODEL,
        "--api-key",
        API_KEY,
        "--max-in-flight",
        "64",
        "--request-timeout",
        "20",
        "--quiet",
        "--records",
        "--out",
        out.to_str().unwrap(),
    ])
    .unwrap();
    tokio::time::timeout(Duration::from_secs(45), qoe_bench::run(args))
        .await
        .expect("the bench finishes")
        .unwrap();

    // What the plan holds: the same generator, the same seed and duration.
    let mut w = load_workload(&workload).unwrap();
    w.set_duration(DURATION_S).unwrap();
    let planned = w.generate(SEED).count() as u64;
    assert!(planned >= 10, "{planned}");
    assert!(w
        .generate(SEED)
        .any(|r| r.session.is_some_and(|s| s.turn > 0)));

    let json = std::fs::read_to_string(out.join("report.json")).unwrap();
    let set = ReportSet::from_json(&json).unwrap();
    assert_eq!(set.reports.len(), 3);
    assert_eq!(set.reports[0].label, "router");
    assert_eq!(set.reports[1].label, "engine");
    assert_eq!(set.reports[2].label, "engine-tls");
    for r in &set.reports {
        assert_eq!(r.workload, "smoke");
        assert_eq!(r.seed, SEED);
        assert_eq!(r.model.as_deref(), Some(MODEL));
        check_report(r, planned);
    }
    // The same plan, so the same tokens were asked of each.
    assert_eq!(
        set.reports[0].overall.output_tokens,
        set.reports[1].overall.output_tokens
    );
    assert_eq!(
        set.reports[1].overall.output_tokens,
        set.reports[2].overall.output_tokens
    );
    // One record per planned request and target; through the router each names the engine
    // that served it, going direct none does.
    for (r, via_router) in set.reports.iter().zip([true, false, false]) {
        let text = std::fs::read_to_string(out.join(format!("requests-{}.jsonl", r.label)));
        let lines: Vec<RequestLine> = text
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len() as u64, planned, "{}", r.label);
        let met = lines.iter().filter(|l| l.slo_met).count() as f64;
        assert_eq!(met, (r.overall.slo_attainment * planned as f64).round());
        for l in &lines {
            let ok = l.status == Status::Ok;
            assert_eq!(l.ttft_ms.is_some(), ok, "{l:?}");
            if via_router && ok {
                let e = l.endpoint.as_deref().unwrap_or_default();
                assert!(engines.iter().any(|u| e.starts_with(u.as_str())), "{l:?}");
            } else if !via_router {
                assert_eq!(l.endpoint, None);
            }
            assert!(
                l.predicted_ttft_ms.is_none(),
                "live records carry no prediction"
            );
        }
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.starts_with("| metric | router | engine |"), "{md}");
    assert!(md.contains("| p1 SLO attainment |"), "{md}");
    assert!(
        md.contains("### router") && md.contains("### engine"),
        "{md}"
    );
    assert!(md.contains("(model `sim-llama`)"), "{md}");
    let _ = std::fs::remove_dir_all(&out);

    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
}

/// A simulated engine (`tiny`, serving [`MODEL`], with `extra` flags) on an ephemeral port, once
/// healthy: its URL, the sender that stops it, and its task.
async fn start_engine(
    extra: &[&str],
) -> (
    String,
    watch::Sender<bool>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut flags = vec!["--port", "0", "--model", MODEL, "--profile", "tiny"];
    flags.extend_from_slice(extra);
    let args = qoe_router::demo::engine_args(&flags).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let engine = format!("http://{}", listener.local_addr().unwrap());
    let mut rx = stop_rx.clone();
    let task = tokio::spawn(qoe_engine::serve(args, listener, async move {
        let _ = rx.wait_for(|s| *s).await;
    }));
    wait_healthy(&format!("{engine}/health")).await;
    (engine, stop_tx, task)
}

/// Bad targets and outputs fail before any load is sent, with a message naming them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_targets_fail_fast() {
    let (engine, stop_tx, task) = start_engine(&[]).await;
    // A port nobody listens on.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let workload = smoke_workload();
    let file = workload.to_str().unwrap();
    let out = temp_dir();
    // The engine behind TLS that asks for a client certificate; the bench has none.
    let pki = qoe_tls::testing::TestPki::new();
    let wants_a_certificate = pki.terminator_for(&engine, true).await;
    let ca = out.join("ca.pem");
    pki.write_ca(&ca);
    let under_a_file = out.join("report.toml");
    std::fs::write(&under_a_file, "").unwrap();
    let under_a_file = under_a_file.join("out");
    let long = ["--duration", "60"];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--target", &engine, "--model", "nope"], "not served"),
        (
            vec!["--target", &closed, "--model", MODEL],
            "cannot connect",
        ),
        (vec!["--target", &closed], "cannot connect"),
        (
            vec!["--target", &engine, "--target", &closed, "--compare"],
            "cannot connect",
        ),
        (
            vec!["--target", &engine, "--out", under_a_file.to_str().unwrap()],
            "--out",
        ),
        (
            vec!["--target", &engine, "--request-timeout", "1e300"],
            "--request-timeout",
        ),
        (
            vec![
                "--target",
                &wants_a_certificate,
                "--ca-file",
                ca.to_str().unwrap(),
            ],
            "(a server asked for a client certificate and none is configured)",
        ),
    ];
    let huge = (
        vec!["--target", &engine, "--duration", "1e12"],
        "--duration",
    );
    let runs = cases
        .into_iter()
        .map(|(mut flags, want)| {
            flags.extend(long);
            (flags, want)
        })
        .chain([huge]);
    for (flags, want) in runs {
        let mut all = flags.clone();
        all.extend(["--workload", file, "--quiet"]);
        let args = BenchArgs::from_flags(&all).unwrap();
        // Far less than the 60 s the workload would run.
        let err = tokio::time::timeout(Duration::from_secs(15), qoe_bench::run(args))
            .await
            .unwrap_or_else(|_| panic!("{flags:?}: no answer in 15 s"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{flags:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&out);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
}

/// A run in which every request failed ends in an error (a script or CI job must see it), after
/// its report was written.
/// A quiet run of the smoke workload against `engine` for `duration` seconds, reported in `out`.
fn quiet_run(engine: &str, duration: &str, out: &Path) -> BenchArgs {
    let workload = smoke_workload();
    BenchArgs::from_flags([
        "--target",
        engine,
        "--model",
        MODEL,
        "--workload",
        workload.to_str().unwrap(),
        "--duration",
        duration,
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ])
    .unwrap()
}

/// The `report.json` a run wrote in `out`.
fn written_report(out: &Path) -> ReportSet {
    serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_every_request_failed_is_an_error() {
    let (engine, stop_tx, task) =
        start_engine(&["--error-rate", "1", "--error-status", "503"]).await;
    let out = temp_dir();
    let args = quiet_run(&engine, "1", &out);
    let err = tokio::time::timeout(Duration::from_secs(30), qoe_bench::run(args))
        .await
        .expect("the run ends")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("every request failed") && err.contains("http_503"),
        "{err}"
    );
    let report = written_report(&out);
    assert_eq!(report.reports[0].overall.completed, 0);
    assert!(report.reports[0].overall.errors > 0);
    let _ = std::fs::remove_dir_all(&out);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
}

/// A run stopped early (Ctrl-C) still writes the report of what finished, and says it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_run_reports_what_finished() {
    let (engine, stop_engine, task) = start_engine(&[]).await;
    let out = temp_dir();
    let args = quiet_run(&engine, "600", &out);
    let (stop_tx, stop) = watch::channel(false);
    let run = tokio::spawn(qoe_bench::run_until(args, stop));
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_tx.send(true).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the run stops well before its 600 s")
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(err.contains("interrupted"), "{err}");
    let report = written_report(&out);
    let overall = &report.reports[0].overall;
    assert!(overall.completed > 0, "what finished is reported");
    let _ = std::fs::remove_dir_all(&out);
    let _ = stop_engine.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
}
