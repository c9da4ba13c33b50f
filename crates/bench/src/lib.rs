//! # qoe-bench: live load against any OpenAI-compatible endpoint
//!
//! `qoe-router bench` drives real HTTP streams at a target (our router under any policy, a peer
//! router, a bare engine) and reports what users felt: TTFT, inter-token latency, TPOT,
//! end-to-end latency, DistServe SLO attainment and Andes QoE, per priority and overall. Claims of
//! better QoE need numbers measured the same way for every contender, so:
//!
//! * **The load is data.** A workload file ([`qoe_sim::workload`]) plans every request — when,
//!   how long, which priority and SLA, which shared prefix and session — from a seed. `--compare`
//!   runs the same plan against each target in turn.
//! * **The load is open loop.** Each request is sent at its planned time whether or not earlier
//!   ones have finished, as real users arrive (a closed loop would slow down with the system under
//!   test and hide its queueing). A bound on requests in flight (`--max-in-flight`) keeps the
//!   generator's own memory and sockets bounded: a request that would exceed it is not queued but
//!   counted as an error (`client_overload`), so an overloaded target shows up in the report
//!   instead of silently stretching the run.
//! * **The report is shared.** Records are built by [`qoe_sim::report::RequestTracker`] and summed
//!   by [`qoe_sim::report::ReportBuilder`], exactly as the fleet simulator does, so a live run and a
//!   simulated one can be laid side by side.
//!
//! Output: the Markdown table on stdout; with `--out DIR`, `DIR/report.json` (a
//! [`ReportSet`]: `{"reports": [...]}`, one per target) and `DIR/report.md`; with `--records`
//! also `DIR/requests-LABEL.jsonl` per target, a [`RequestLine`] per request.
//!
//! Only `http://` targets (the router and engines speak plain HTTP/1.1 on a private network).

pub mod client;
pub mod progress;
pub mod simulate;

use crate::client::{http_client, http_request, measure, micros_since, request_body, Target};
use crate::progress::{Counters, Progress};
use clap::{Args, Parser};
use qoe_sim::fleet::Fleet;
use qoe_sim::report::{
    Report, ReportBuilder, ReportConfig, ReportMeta, ReportSet, RequestLine, RequestRecord,
    RequestTracker, Status,
};
use qoe_sim::workload::{Trace, Workload, WorkloadSpec};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

/// Options of `qoe-router bench`.
#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// Base URL of an OpenAI-compatible server (http://host:port or https://...). Repeat, or
    /// separate with commas, to run several targets in turn with --compare.
    #[arg(long = "target", required = true, value_delimiter = ',')]
    pub targets: Vec<String>,
    /// Workload file (TOML, see bench/workloads/).
    #[arg(long)]
    pub workload: PathBuf,
    /// Run for this many seconds instead of the workload's duration or request count.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Directory to write report.json and report.md into (created if missing).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Run every target one after another with the same seed and print one side-by-side table.
    #[arg(long)]
    pub compare: bool,
    /// Label of each target in the report, in --target order (default: host:port).
    #[arg(long = "label", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Model to request (default: the workload's, else the first the target lists).
    #[arg(long)]
    pub model: Option<String>,
    /// Sent as `Authorization: Bearer KEY` to every target (a router run with --api-keys, vLLM
    /// with --api-key). Prefer the environment variable: command lines are visible to local users.
    #[arg(long, env = "QOE_BENCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// PEM file of CA certificates an https target's certificate must chain to, in place of the
    /// public web roots built in (as `curl --cacert`).
    #[arg(long, env = "QOE_BENCH_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain presented to https targets that ask for one (a router run with
    /// --tls-client-ca-file, vLLM with --ssl-cert-reqs 2); needs --client-key.
    #[arg(long, env = "QOE_BENCH_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// The PEM private key of --client-cert.
    #[arg(long, env = "QOE_BENCH_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// Most requests in flight at once; a request planned beyond it is counted as a
    /// `client_overload` error, never queued.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_in_flight: u32,
    /// Seed of the workload's random draws (default: the workload file's).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Longest a request may take, first byte to last, in seconds.
    #[arg(long, default_value_t = 300.0)]
    pub request_timeout: f64,
    /// No progress bar and no status lines (the report is still printed).
    #[arg(long)]
    pub quiet: bool,
    /// Also write `requests-LABEL.jsonl` under `--out` for each target: one JSON line per
    /// request with its measurements and the engine the router chose (`x-qoe-endpoint`).
    #[arg(long, requires = "out")]
    pub records: bool,
}

#[derive(Parser)]
struct BenchOnly {
    #[command(flatten)]
    args: BenchArgs,
}

impl BenchArgs {
    /// Options from command-line style flags (without the program or subcommand name).
    pub fn from_flags<I, T>(flags: I) -> Result<BenchArgs, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let argv = std::iter::once(std::ffi::OsString::from("bench"))
            .chain(flags.into_iter().map(Into::into));
        Ok(BenchOnly::try_parse_from(argv)?.args)
    }
}

/// Writes a report to stdout. A reader that stopped reading (`| head`) is not an error: the files
/// under `--out` are written already, and `println!` would panic on the closed pipe.
pub fn print_report(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::anyhow!("cannot write to stdout: {e}"))
        }
        _ => Ok(()),
    }
}

/// Reads a workload file, and its trace file (relative to it) when the arrivals are a trace. An
/// unnamed workload is named after its file.
pub fn load_workload(path: &Path) -> anyhow::Result<Workload> {
    load_workload_for(path, None)
}

/// [`load_workload`], run for `duration` seconds (`--duration`) instead of the file's duration or
/// request count when given.
pub fn load_workload_for(path: &Path, duration: Option<f64>) -> anyhow::Result<Workload> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read workload {}: {e}", path.display()))?;
    let mut spec = WorkloadSpec::from_toml_str(&text)
        .map_err(|e| anyhow::anyhow!("workload {}: {e}", path.display()))?;
    if let Some(d) = duration {
        spec.set_duration(d)
            .map_err(|e| anyhow::anyhow!("--duration: {e}"))?;
    }
    let trace = match spec.trace_file() {
        None => None,
        Some(file) => {
            let trace_path = path.parent().unwrap_or(Path::new(".")).join(file);
            let csv = std::fs::read_to_string(&trace_path)
                .map_err(|e| anyhow::anyhow!("cannot read trace {}: {e}", trace_path.display()))?;
            Some(
                Trace::parse_csv(&csv)
                    .map_err(|e| anyhow::anyhow!("trace {}: {e}", trace_path.display()))?,
            )
        }
    };
    let mut w = Workload::new(spec, trace)
        .map_err(|e| anyhow::anyhow!("workload {}: {e}", path.display()))?;
    if w.name().is_empty() {
        w.set_name(file_stem(path));
    }
    if let Some(warning) = w.length_warning() {
        eprintln!("workload {}: {warning}", path.display());
    }
    Ok(w)
}

/// Reads a fleet file. An unnamed fleet is named after its file.
pub fn load_fleet(path: &Path) -> anyhow::Result<Fleet> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read fleet {}: {e}", path.display()))?;
    let mut f = Fleet::from_toml_str(&text)
        .map_err(|e| anyhow::anyhow!("fleet {}: {e}", path.display()))?;
    if f.name().is_empty() {
        f.set_name(file_stem(path));
    }
    Ok(f)
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Runs the benchmark, prints the report, and writes it under `--out`.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let (stop_tx, stop) = watch::channel(false);
    let quiet = args.quiet;
    // Ctrl-C stops sending and reports what finished; a second one quits at once.
    let interrupts = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            if !quiet {
                eprintln!("bench: interrupted: finishing the report (Ctrl-C again to quit now)");
            }
            let _ = stop_tx.send(true);
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
    });
    let result = run_until(args, stop).await;
    interrupts.abort();
    result
}

/// [`run`], stopping early when `stop` turns true: no request is sent after it, those in
/// flight get [`INTERRUPT_GRACE`] to finish, and the report covers what finished (an error is
/// returned once it is written, so a script sees the run did not complete).
pub async fn run_until(args: BenchArgs, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    if let Some(dir) = &args.out {
        // Before the run, so that an unwritable --out loses no measurements.
        prepare_out_dir(dir)?;
    }
    let set = bench_until(&args, stop.clone()).await?;
    if let Some(dir) = &args.out {
        for (name, text) in [
            ("report.json", set.to_json()),
            ("report.md", set.to_markdown()),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text)
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        }
        if !args.quiet {
            eprintln!("bench: wrote {}/report.{{json,md}}", dir.display());
        }
    }
    print_report(&set.to_markdown())?;
    let interrupted = *stop.borrow();
    anyhow::ensure!(
        !interrupted,
        "bench: interrupted; the report covers the requests that finished before"
    );
    // A target that answered nothing is a failed run (a script or CI job must see it), though
    // its report was written: which errors it gave is in there.
    let dead: Vec<String> = set
        .reports
        .iter()
        .filter(|r| r.overall.requests > 0 && r.overall.completed == 0)
        .map(|r| {
            let kinds: Vec<String> = r
                .overall
                .errors_by_kind
                .iter()
                .map(|(kind, n)| format!("{n} {kind}"))
                .collect();
            format!("{} ({})", r.label, kinds.join(", "))
        })
        .collect();
    anyhow::ensure!(
        dead.is_empty(),
        "bench: every request failed at {}",
        dead.join("; ")
    );
    Ok(())
}

/// Creates `--out DIR` if missing and checks that files can be written in it.
pub fn prepare_out_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("--out: cannot create {}: {e}", dir.display()))?;
    let probe = dir.join(format!(".qoe-write-check-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .map_err(|e| anyhow::anyhow!("--out: cannot write in {}: {e}", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Requests in flight when a run is interrupted have this long to finish before the report.
pub const INTERRUPT_GRACE: Duration = Duration::from_secs(5);

/// Runs the benchmark against every target in turn and returns the reports (in --target order).
pub async fn bench(args: &BenchArgs) -> anyhow::Result<ReportSet> {
    bench_until(args, watch::channel(false).1).await
}

/// [`bench`], stopping early when `stop` turns true (see [`run_until`]); the targets not yet
/// run then have no report.
async fn bench_until(args: &BenchArgs, stop: watch::Receiver<bool>) -> anyhow::Result<ReportSet> {
    let targets = args
        .targets
        .iter()
        .filter(|t| !t.trim().is_empty())
        .map(|t| Target::parse(t))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let auth = match &args.api_key {
        Some(key) => {
            let mut value = http::HeaderValue::try_from(format!("Bearer {}", key.trim()))
                .map_err(|_| anyhow::anyhow!("--api-key: not a valid header value"))?;
            value.set_sensitive(true);
            Some(value)
        }
        None => None,
    };
    let targets: Vec<Target> = targets
        .into_iter()
        .map(|t| Target {
            auth: auth.clone(),
            ..t
        })
        .collect();
    anyhow::ensure!(!targets.is_empty(), "--target is empty");
    anyhow::ensure!(
        targets.len() == 1 || args.compare,
        "{} targets given: pass --compare to run each of them in turn",
        targets.len()
    );
    anyhow::ensure!(
        args.labels.is_empty() || args.labels.len() == targets.len(),
        "{} labels for {} targets: give one --label per --target",
        args.labels.len(),
        targets.len()
    );
    anyhow::ensure!(
        args.request_timeout.is_finite() && (0.001..=1e9).contains(&args.request_timeout),
        "--request-timeout must be in [0.001, 1e9] s"
    );
    let workload = load_workload_for(&args.workload, args.duration)?;
    let seed = args.seed.unwrap_or(workload.seed());
    anyhow::ensure!(
        workload.generate(seed).next().is_some(),
        "workload `{}` plans no requests with seed {seed}: raise its rate or duration",
        workload.name()
    );
    use qoe_tls::PemFile;
    let ca = args
        .ca_file
        .as_deref()
        .map(|p| PemFile::new(p, "--ca-file"));
    let identity = PemFile::pair(
        (args.client_cert.as_deref(), "--client-cert"),
        (args.client_key.as_deref(), "--client-key"),
    );
    let tls = qoe_tls::ClientTls::new(ca, identity)?;
    let client = http_client(args.max_in_flight as usize, &tls);
    let mut labels: Vec<String> = Vec::with_capacity(targets.len());
    for (i, t) in targets.iter().enumerate() {
        let mut label = args.labels.get(i).cloned().unwrap_or_else(|| t.authority());
        if labels.contains(&label) {
            label = format!("{label}#{i}");
        }
        labels.push(label);
    }
    let mut reports = Vec::with_capacity(targets.len());
    let mut record_paths: Vec<PathBuf> = Vec::new();
    // Every target is checked before any runs, so that a bad one loses no other's run.
    let model = args.model.clone().or_else(|| workload.spec().model.clone());
    let mut models = Vec::with_capacity(targets.len());
    for target in &targets {
        models.push(client::check_target(&client, &tls, target, model.as_deref()).await?);
    }
    for (i, ((target, label), model)) in targets.iter().zip(labels).zip(models).enumerate() {
        let stopped = *stop.borrow();
        if stopped {
            break;
        }
        if !args.quiet {
            eprintln!(
                "bench: {label}: workload `{}` (seed {seed}) against {} with model `{model}`",
                workload.name(),
                target.base
            );
        }
        let records = args.out.as_ref().filter(|_| args.records).map(|dir| {
            let mut path = records_path(dir, &label);
            if record_paths.contains(&path) {
                // Labels that differ only in replaced characters get the target's index too.
                path = records_path(dir, &format!("{label}_{i}"));
            }
            record_paths.push(path.clone());
            path
        });
        let run = Run {
            client: client.clone(),
            target,
            label,
            model,
            workload: &workload,
            seed,
            max_in_flight: args.max_in_flight,
            timeout: Duration::from_secs_f64(args.request_timeout),
            progress: !args.quiet,
            records,
            stop: stop.clone(),
        };
        reports.push(run.go().await?);
    }
    Ok(ReportSet { reports })
}

/// Resolves once `stop` is true (never, if its sender is gone while false).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// One target's run.
struct Run<'a> {
    client: client::HttpClient,
    target: &'a Target,
    label: String,
    model: String,
    workload: &'a Workload,
    seed: u64,
    max_in_flight: u32,
    timeout: Duration,
    progress: bool,
    /// Where to write the request records (`--records`).
    records: Option<PathBuf>,
    /// Turns true when the run is to stop early.
    stop: watch::Receiver<bool>,
}

/// `DIR/requests-LABEL.jsonl`, the label's characters other than letters, digits, `.`, `-` and
/// `_` replaced by `_` (a label may be a URL's host:port; see [`bench`] for two labels that
/// become the same name).
fn records_path(dir: &Path, label: &str) -> PathBuf {
    let name: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("requests-{name}.jsonl"))
}

/// Request records written as requests end, from every request's task; the first write error is
/// kept and reported when the run ends.
struct RecordFile {
    path: PathBuf,
    /// `None` once finished.
    out: Option<std::io::BufWriter<std::fs::File>>,
    error: Option<std::io::Error>,
}

impl RecordFile {
    fn create(path: PathBuf) -> anyhow::Result<RecordFile> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        }
        let file = std::fs::File::create(&path)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        Ok(RecordFile {
            path,
            // Large enough that writing rarely blocks a request's task for long.
            out: Some(std::io::BufWriter::with_capacity(1 << 18, file)),
            error: None,
        })
    }

    fn write(&mut self, line: &RequestLine) {
        let Some(out) = self.out.as_mut().filter(|_| self.error.is_none()) else {
            return;
        };
        if let Err(e) = out.write_all(line.to_json_line().as_bytes()) {
            self.error = Some(e);
        }
    }

    /// Flushes and closes the file: later lines are dropped.
    fn finish(&mut self) -> anyhow::Result<()> {
        let flushed = self.out.take().map_or(Ok(()), |mut out| out.flush());
        match self.error.take().map_or(flushed, Err) {
            Ok(()) => Ok(()),
            Err(e) => anyhow::bail!("cannot write {}: {e}", self.path.display()),
        }
    }
}

impl Run<'_> {
    async fn go(mut self) -> anyhow::Result<Report> {
        let cfg = ReportConfig::default();
        let api = self.workload.spec().api;
        let url: Arc<str> = self.target.url(api.path()).into();
        let builder = Arc::new(Mutex::new(ReportBuilder::new(cfg)));
        let records = match self.records.clone() {
            Some(path) => Some(Arc::new(Mutex::new(RecordFile::create(path)?))),
            None => None,
        };
        let add = {
            let (builder, records) = (builder.clone(), records.clone());
            move |r: &RequestRecord, endpoint: Option<String>, prompt_tokens: u32| {
                builder.lock().unwrap_or_else(|e| e.into_inner()).add(r);
                if let Some(file) = &records {
                    let line = RequestLine::new(r, endpoint, prompt_tokens, None);
                    file.lock().unwrap_or_else(|e| e.into_inner()).write(&line);
                }
            }
        };
        let slots = Arc::new(Semaphore::new(self.max_in_flight as usize));
        let counters = Arc::new(Counters::default());
        let max_lag = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let spec = self.workload.spec();
        let bar = Progress::start(
            self.progress,
            self.label.clone(),
            counters.clone(),
            start,
            spec.duration_s,
            spec.requests,
        );
        for planned in self.workload.generate(self.seed) {
            tokio::select! {
                biased;
                _ = stopped(&mut self.stop) => break,
                _ = tokio::time::sleep_until(start + Duration::from_micros(planned.at)) => {}
            }
            counters.sent.fetch_add(1, Ordering::Relaxed);
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                let now = micros_since(start);
                let record = RequestRecord::failed(
                    planned.id,
                    planned.priority,
                    planned.sla,
                    now,
                    now,
                    Status::ClientOverload,
                );
                add(&record, None, planned.prompt_tokens);
                counters.finished.fetch_add(1, Ordering::Relaxed);
                counters.errors.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let body = request_body(api, &self.model, &planned);
            let request = http_request(&url, body, &planned, self.target.auth.as_ref())?;
            let (id, priority, sla, planned_at, prompt_tokens) = (
                planned.id,
                planned.priority,
                planned.sla,
                planned.at,
                planned.prompt_tokens,
            );
            drop(planned);
            let (client, counters, max_lag, add) = (
                self.client.clone(),
                counters.clone(),
                max_lag.clone(),
                add.clone(),
            );
            let timeout = self.timeout;
            tokio::spawn(async move {
                let sent = micros_since(start);
                max_lag.fetch_max(sent.saturating_sub(planned_at), Ordering::Relaxed);
                let tracker = RequestTracker::new(id, priority, sla, sent, &cfg);
                let (record, endpoint) = measure(&client, request, tracker, start, timeout).await;
                add(&record, endpoint, prompt_tokens);
                if !record.status.is_ok() {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                }
                counters.finished.fetch_add(1, Ordering::Relaxed);
                drop(slot);
            });
        }
        // Every request in flight holds a slot until its record is in: taking them all waits for
        // the last one (each bounded by the request timeout), or, once the run is stopped, for
        // those that finish within the grace.
        let all = slots.acquire_many(self.max_in_flight);
        tokio::pin!(all);
        tokio::select! {
            r = &mut all => drop(r?),
            _ = stopped(&mut self.stop) => {
                if let Ok(r) = tokio::time::timeout(INTERRUPT_GRACE, &mut all).await {
                    drop(r?);
                } else {
                    let cut = counters.sent.load(Ordering::Relaxed)
                        .saturating_sub(counters.finished.load(Ordering::Relaxed));
                    eprintln!(
                        "bench: {}: {cut} requests still in flight after {} s are not in the report",
                        self.label,
                        INTERRUPT_GRACE.as_secs()
                    );
                }
            }
        }
        bar.finish().await;
        if let Some(file) = records {
            // Every record is in (all slots are back).
            file.lock().unwrap_or_else(|e| e.into_inner()).finish()?;
        }
        let report = builder
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .finish(ReportMeta {
                label: self.label,
                target: Some(self.target.base.clone()),
                model: Some(self.model.clone()),
                workload: self.workload.name().to_string(),
                seed: self.seed,
                max_send_lag_ms: Some(max_lag.load(Ordering::Relaxed) as f64 / 1e3),
            });
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_file_names_keep_only_safe_characters() {
        let dir = Path::new("out");
        assert_eq!(
            records_path(dir, "127.0.0.1:8000"),
            dir.join("requests-127.0.0.1_8000.jsonl")
        );
        assert_eq!(
            records_path(dir, "../qoe router#1"),
            dir.join("requests-.._qoe_router_1.jsonl")
        );
    }

    #[test]
    fn flags_parse() {
        let a = BenchArgs::from_flags([
            "--target",
            "http://a:1,http://b:2",
            "--target",
            "http://c:3",
            "--workload",
            "w.toml",
            "--label",
            "x,y,z",
            "--compare",
            "--max-in-flight",
            "8",
        ])
        .unwrap();
        assert_eq!(a.targets.len(), 3);
        assert_eq!(a.labels, ["x", "y", "z"]);
        assert_eq!(a.max_in_flight, 8);
        assert!(a.compare && !a.quiet);
        assert!(BenchArgs::from_flags(["--workload", "w.toml"]).is_err());
        assert!(BenchArgs::from_flags([
            "--target",
            "http://a:1",
            "--workload",
            "w",
            "--max-in-flight",
            "0"
        ])
        .is_err());
        // A client certificate comes with its key.
        let base = ["--target", "https://a:1", "--workload", "w"];
        let half = BenchArgs::from_flags(base.iter().copied().chain(["--client-cert", "c.pem"]));
        let err = half.unwrap_err().to_string();
        assert!(err.contains("--client-key"), "{err}");
        let both = ["--client-cert", "c.pem", "--client-key", "k.pem"];
        let a = BenchArgs::from_flags(base.iter().copied().chain(both)).unwrap();
        assert_eq!(a.client_key.as_deref(), Some(Path::new("k.pem")));
    }

    #[tokio::test]
    async fn several_targets_need_compare() {
        let a = BenchArgs::from_flags([
            "--target",
            "http://127.0.0.1:9,http://127.0.0.1:10",
            "--workload",
            "nowhere.toml",
        ])
        .unwrap();
        let err = bench(&a).await.unwrap_err().to_string();
        assert!(err.contains("--compare"), "{err}");
    }

    #[tokio::test]
    async fn an_empty_plan_is_refused() {
        let path = std::env::temp_dir().join(format!("qoe-empty-plan-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "duration_s = 1\n[arrivals]\nkind = \"poisson\"\nrate = 1e-9\n\
             [prompt]\nkind = \"fixed\"\ntokens = 2\n[output]\nkind = \"fixed\"\ntokens = 1\n",
        )
        .unwrap();
        let a = BenchArgs::from_flags([
            "--target",
            "http://127.0.0.1:9",
            "--workload",
            path.to_str().unwrap(),
        ])
        .unwrap();
        let err = bench(&a).await.unwrap_err().to_string();
        assert!(err.contains("plans no requests"), "{err}");
        let _ = std::fs::remove_file(&path);
    }

    fn repo_file(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(rel)
    }

    #[test]
    fn committed_workloads_and_fleets_load() {
        let dir = repo_file("bench/workloads");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let w = load_workload(&path).unwrap_or_else(|e| panic!("{e}"));
                assert!(!w.name().is_empty());
                // Each plans something, and every prompt fits the context.
                let first: Vec<_> = w.generate(w.seed()).take(50).collect();
                assert!(!first.is_empty(), "{}", path.display());
                let max = w.spec().max_context_tokens;
                assert!(first
                    .iter()
                    .all(|r| r.prompt_tokens + r.output_tokens <= max));
                n += 1;
            }
        }
        assert!(n >= 6, "{n} workloads");
        let mut n = 0;
        for entry in std::fs::read_dir(repo_file("bench/fleets")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                load_fleet(&path).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 3, "{n} fleets");
        let hetero = load_fleet(&repo_file("bench/fleets/hetero-4.toml")).unwrap();
        assert_eq!(hetero.len(), 4);
        let degrading = load_fleet(&repo_file("bench/fleets/degrading-4.toml")).unwrap();
        let c = degrading.changes()[0];
        assert_eq!(c.at, 60_000_000);
        assert_eq!(
            load_fleet(&repo_file("bench/fleets/hetero-200.toml"))
                .unwrap()
                .len(),
            200
        );
    }
}
