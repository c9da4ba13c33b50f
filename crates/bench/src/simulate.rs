//! `qoe-router simulate`: the offline fleet simulator on the command line.
//!
//! The live `bench` measures a real router over HTTP; this runs the very same policy code
//! ([`qoe_core::build_policy`]) over simulated engines in virtual time
//! ([`qoe_sim::simulate`]), with the same workload files, the same fleet files and the same report
//! format, so the two can be laid side by side. It exists because a live run of hundreds of
//! engines is impossible on two cores, and a simulated one takes seconds and is exactly
//! repeatable: the same seed gives the same `report.json`, byte for byte (wall-clock timings go to
//! stderr only, never into a file).
//!
//! Output: the Markdown comparison on stdout; with `--out DIR`,
//!
//! * `report.json`, `report.md`: a [`ReportSet`], one report per policy, as `bench` writes;
//! * `simulate.json`: what only a simulation knows (routing reasons, per-engine and per-group
//!   use, the TTFT CDF, the policy's final state, the rate sweep);
//! * `ttft-cdf.svg`: TTFT CDF per policy; `attainment-vs-rate.svg` (with `--sweep-rate`): SLO
//!   attainment against the arrival rate, with the 90% goodput line. Drawn by hand: two small
//!   plots do not justify a plotting dependency.
//! * with `--records`, `requests-POLICY.jsonl`: every request of each policy's run at the set
//!   rate, a [`qoe_sim::report::RequestLine`] per line, for readings per engine or per second
//!   that no summary anticipates.
//!
//! The simulated router runs with [`RouterSettings`]: what `qoe-router serve` would start with,
//! built by the router crate from its one config struct (with `--config FILE`, the router's config
//! file); a test keeps `SimConfig::default()` equal to the router's defaults. A few settings that
//! change what a policy sees or what happens to a request have flags here too, which win:
//! `--scrape-interval` (`--engine-stats-interval`), admission control
//! (`--max-inflight-per-endpoint`, `--saturation-kv-usage`, `--saturation-waiting`, `--queue-max`,
//! `--queue-timeout`), `--engine-priority`, `--saturation-inflight`, `--prefix-affinity`,
//! `--deadline-overflow`.
//!
//! `--sweep-rate LO:HI` finds each policy's goodput (DistServe: the highest rate at which ≥ 90% of
//! requests attain their SLO) by bisection, and runs once more at 80% of it (the load at which the
//! issue asks for mean QoE ≥ 0.9).

use crate::{load_fleet, load_workload_for};
use clap::{Args, Parser};
use qoe_core::{build_policy, PolicyConfig, PolicyKind, RoutingPolicy, MICROS_PER_SEC};
use qoe_sim::report::{Report, ReportSet};
use qoe_sim::simulate::{
    simulate, simulate_recorded, sweep_rate, with_rate, AdmissionSpec, OutputHint, SimConfig,
    SimDetails, SweepConfig, SweepResult, MAX_TIME_SETTING_S,
};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Options of `qoe-router simulate`.
#[derive(Args, Clone, Debug)]
pub struct SimulateArgs {
    /// Fleet file (TOML, see bench/fleets/).
    #[arg(long)]
    pub fleet: PathBuf,
    /// Workload file (TOML, see bench/workloads/).
    #[arg(long)]
    pub workload: PathBuf,
    /// Routing policies to compare, by registry name.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "qoe,roundrobin,least-loaded,power-of-two,prefix-aware"
    )]
    pub policies: Vec<String>,
    /// Run for this many seconds of virtual time instead of the workload's duration or count.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Arrival rate, requests/s of new arrivals (a trace is replayed at the speed that gives its
    /// rows this mean rate) [default: the workload's].
    #[arg(long)]
    pub rate: Option<f64>,
    /// Find each policy's goodput by bisection over the rate in LO:HI (requests/s).
    #[arg(long, value_name = "LO:HI", value_parser = parse_range)]
    pub sweep_rate: Option<(f64, f64)>,
    /// Most bisection steps of a sweep (each one a full simulation).
    #[arg(long, default_value_t = 8)]
    pub sweep_steps: u32,
    /// Seeds every rate of a sweep runs with (the seed, the seed + 1, ...), their requests pooled
    /// for the attainment: steadier goodputs near a knee, at this many times the cost.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=32))]
    pub sweep_seeds: u32,
    /// Seed of the workload and the engines [default: the workload file's].
    #[arg(long)]
    pub seed: Option<u64>,
    /// The router's config file, as `serve --config` reads it: the simulated router runs with
    /// the settings `serve` would start with (policies, the qoe settings and `[qoe]` table,
    /// analyzer headers, admission control, scrape and health intervals, retries, timeouts).
    /// The flags below that name a router setting win over it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Seconds between scrapes of the engines' metrics (the router's --engine-stats-interval)
    /// [default: the router's].
    #[arg(long)]
    pub scrape_interval: Option<f64>,
    /// One-way network delay between the router and the engines, ms.
    #[arg(long, default_value_t = 0.0)]
    pub network_delay_ms: f64,
    /// What tells the router the output length: `header` (x-expected-output-tokens, when the
    /// workload sends it; a completions body carries max_tokens even so, as a real one must) or
    /// `max-tokens` (also max_tokens on chat, as the live bench client sends).
    #[arg(long, default_value = "header")]
    pub output_hint: OutputHint,
    /// Lognormal jitter of engine iteration times (0.05 ≈ ±5%).
    #[arg(long, default_value_t = 0.0)]
    pub jitter: f64,
    /// The client's limit per request, seconds.
    #[arg(long, default_value_t = 300.0)]
    pub request_timeout: f64,
    /// Directory for report.{json,md}, simulate.json and the SVG plots (created if missing).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Admission control, as the router's flag: requests in flight per endpoint at which it is
    /// saturated (0: no limit; with no limit at all, admission control is off, the router's
    /// default) [default: the router's].
    #[arg(long)]
    pub max_inflight_per_endpoint: Option<u32>,
    /// Admission control: engine KV-cache usage (0..1] at which an endpoint is saturated
    /// (1: no limit) [default: the router's].
    #[arg(long)]
    pub saturation_kv_usage: Option<f64>,
    /// Admission control: engine-queued requests at which an endpoint is saturated (0: no limit)
    /// [default: the router's].
    #[arg(long)]
    pub saturation_waiting: Option<u32>,
    /// Admission control: requests that may wait in the router [default: the router's].
    #[arg(long)]
    pub queue_max: Option<usize>,
    /// Admission control: longest wait in the router's queue, seconds (then 429)
    /// [default: the router's].
    #[arg(long)]
    pub queue_timeout: Option<f64>,
    /// Add the request's priority as vLLM's `priority` field, for engines with
    /// `scheduling = "priority"` in the fleet file (the router's --engine-priority; on here or
    /// in the router's settings turns it on).
    #[arg(long)]
    pub engine_priority: bool,
    /// Refuse (429) priority-3 requests whose TTFT deadline no endpoint is predicted to meet, as
    /// the router's --sla-enforcement shed (on here or in the router's settings turns it on; only
    /// the qoe policy predicts, so only it sheds).
    #[arg(long)]
    pub sla_shed: bool,
    /// The qoe policy's requests in flight at capacity for a typical endpoint (the router's
    /// --saturation-inflight) [default: the router's].
    #[arg(long)]
    pub saturation_inflight: Option<u32>,
    /// The qoe policy's prefix affinity (`QoeConfig::prefix_affinity`; 0 turns it off)
    /// [default: the policy's].
    #[arg(long)]
    pub prefix_affinity: Option<f64>,
    /// Turn the qoe policy's deadline overflow on (`QoeConfig::deadline_overflow`; on here or
    /// in the router's settings turns it on).
    #[arg(long)]
    pub deadline_overflow: bool,
    /// Also write `requests-POLICY.jsonl` under `--out`: one JSON line per request of each
    /// policy's run at the set rate (not of a sweep's runs), with where it went, what it
    /// measured and what the policy predicted for it.
    #[arg(long, requires = "out")]
    pub records: bool,
    /// Simulations run at once (each is single-threaded; results do not depend on this).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub jobs: u32,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Parser)]
struct SimulateOnly {
    #[command(flatten)]
    args: SimulateArgs,
}

impl SimulateArgs {
    /// Options from command-line style flags (without the program or subcommand name).
    pub fn from_flags<I, T>(flags: I) -> Result<SimulateArgs, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let argv = std::iter::once(std::ffi::OsString::from("simulate"))
            .chain(flags.into_iter().map(Into::into));
        Ok(SimulateOnly::try_parse_from(argv)?.args)
    }
}

fn parse_range(s: &str) -> Result<(f64, f64), String> {
    let (lo, hi) = s
        .split_once(':')
        .ok_or_else(|| format!("expected LO:HI, got `{s}`"))?;
    let num = |x: &str| {
        x.trim()
            .parse::<f64>()
            .map_err(|_| format!("`{x}` is not a number"))
    };
    let (lo, hi) = (num(lo)?, num(hi)?);
    if !(lo.is_finite() && lo > 0.0 && hi.is_finite() && hi > lo) {
        return Err(format!("expected 0 < LO < HI, got {lo}:{hi}"));
    }
    Ok((lo, hi))
}

/// Everything `simulate` produced.
#[derive(Clone, Debug)]
pub struct SimulateOutput {
    pub fleet: String,
    pub workload: String,
    pub seed: u64,
    /// The arrival rate simulated (`None`: the workload's, which states none).
    pub rate: Option<f64>,
    /// The router config file the simulated router's settings came from (`None`: defaults).
    pub router_settings: Option<String>,
    /// The simulated router's settings that differ from the defaults, as `key = value`
    /// (from the file, the environment or the flags: the report says what it ran with).
    pub router_changes: Vec<String>,
    /// The router settings other than the defaults that the simulator does not model
    /// ([`RouterSettings::ignored`]).
    pub router_ignored: Vec<String>,
    pub scrape_interval_s: f64,
    pub network_delay_ms: f64,
    pub output_hint: OutputHint,
    pub admission: AdmissionSpec,
    pub engine_priority: bool,
    pub sla_shed: bool,
    /// One report per policy, in `--policies` order.
    pub reports: ReportSet,
    pub details: Vec<SimDetails>,
    pub sweeps: Vec<SweepResult>,
}

/// Past this many requests a run (or at a sweep's top rate), `simulate` warns that it will be slow.
const LARGE_SWEEP_REQUESTS: f64 = 5e6;

/// Runs the simulations, prints the report, and writes the files under `--out`.
pub fn run(args: SimulateArgs, router: &RouterSettings) -> anyhow::Result<()> {
    if let Some(dir) = &args.out {
        // Before the runs, so that an unwritable --out loses no work.
        crate::prepare_out_dir(dir)?;
    }
    let out = simulate_all(&args, router)?;
    let markdown = to_markdown(&out);
    if let Some(dir) = &args.out {
        let mut files = vec![
            ("report.json", out.reports.to_json()),
            ("report.md", markdown.clone()),
            (
                "simulate.json",
                serde_json::to_string_pretty(&details_json(&out)).expect("the output serializes"),
            ),
            ("ttft-cdf.svg", svg::ttft_cdf(&out)),
        ];
        if !out.sweeps.is_empty() {
            files.push(("attainment-vs-rate.svg", svg::attainment(&out)));
        }
        for (name, text) in files {
            write(&dir.join(name), &text)?;
        }
        if !args.quiet {
            eprintln!("simulate: wrote {}/", dir.display());
        }
    }
    crate::print_report(&markdown)
}

/// `simulate.json`: the run's settings, then per policy what only a simulation knows, and the
/// sweeps.
pub fn details_json(out: &SimulateOutput) -> serde_json::Value {
    serde_json::json!({
        "fleet": out.fleet,
        "workload": out.workload,
        "seed": out.seed,
        "rate": out.rate,
        "router_settings": out.router_settings,
        "router_changes": out.router_changes,
        "router_ignored": out.router_ignored,
        "scrape_interval_s": out.scrape_interval_s,
        "network_delay_ms": out.network_delay_ms,
        "output_hint": out.output_hint,
        "admission": admission_json(out),
        "engine_priority": out.engine_priority,
        "sla_shed": out.sla_shed,
        "details": out.details,
        "sweeps": out.sweeps,
    })
}

/// The policy and router settings of a run that differ from the defaults, `key = value` (qoe keys
/// as `qoe.KEY`), in a fixed order. Admission control, engine priority, SLA enforcement and the scrape interval
/// have their own words in the report and are left out here.
fn router_changes(policy: &PolicyConfig, sim: &SimConfig) -> Vec<String> {
    let mut changes = Vec::new();
    let mut diff = |prefix: &str, now: serde_json::Value, default: serde_json::Value| {
        let (serde_json::Value::Object(now), serde_json::Value::Object(default)) = (now, default)
        else {
            return;
        };
        for (key, value) in now {
            if default.get(&key) != Some(&value) && !value.is_object() {
                changes.push(format!("{prefix}{key} = {value}"));
            }
        }
    };
    let defaults = PolicyConfig::default();
    let (now, default) = (serde_json::to_value(policy), serde_json::to_value(defaults));
    diff("", now.unwrap_or_default(), default.unwrap_or_default());
    let qoe_defaults = qoe_core::policy::QoeConfig {
        engine_priority: policy.qoe.engine_priority,
        ..defaults.qoe
    };
    let qoe = serde_json::to_value(policy.qoe).unwrap_or_default();
    diff(
        "qoe.",
        qoe,
        serde_json::to_value(qoe_defaults).unwrap_or_default(),
    );
    let d = SimConfig::default();
    let micros = |us: u64| format!("{} s", us as f64 / 1e6);
    let (a, da) = (&sim.analyzer, &d.analyzer);
    let counts = |now: u32, default: u32| (now != default, now.to_string());
    let times = |now: u64, default: u64| (now != default, micros(now));
    let names = |now: &String, default: &String| (now != default, format!("{now:?}"));
    let router_side = [
        (
            "health_check_interval",
            times(sim.health_interval, d.health_interval),
        ),
        (
            "unhealthy_threshold",
            counts(sim.unhealthy_threshold, d.unhealthy_threshold),
        ),
        (
            "healthy_threshold",
            counts(sim.healthy_threshold, d.healthy_threshold),
        ),
        (
            "default_output_tokens",
            counts(sim.default_output_tokens, d.default_output_tokens),
        ),
        ("max_retries", counts(sim.max_retries, d.max_retries)),
        ("retry_backoff", times(sim.retry_backoff, d.retry_backoff)),
        (
            "first_byte_timeout",
            times(sim.first_byte_timeout, d.first_byte_timeout),
        ),
        (
            "request_stats_window",
            times(sim.stats.window, d.stats.window),
        ),
        // The analyzer's ITL follows `target_itl`, listed above; the router sets only these besides.
        (
            "priority_header",
            names(&a.priority_header, &da.priority_header),
        ),
        (
            "expected_output_len_header",
            names(
                &a.expected_output_len_header,
                &da.expected_output_len_header,
            ),
        ),
        ("sla_header", names(&a.sla_header, &da.sla_header)),
        ("session_key", names(&a.session_key, &da.session_key)),
    ];
    for (key, (differs, value)) in router_side {
        if differs {
            changes.push(format!("{key} = {value}"));
        }
    }
    changes
}

fn admission_json(out: &SimulateOutput) -> serde_json::Value {
    let a = &out.admission;
    if !a.enabled() {
        return serde_json::Value::Null;
    }
    serde_json::json!({
        "max_inflight_per_endpoint": a.limits.max_inflight,
        "saturation_kv_usage": a.limits.max_kv_usage,
        "saturation_waiting": a.limits.max_waiting,
        "queue_max": a.queue_max,
        "queue_timeout_s": a.queue_timeout as f64 / 1e6,
    })
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
}

/// One policy's run at the set rate, its request records written when `--records` asks.
fn run_one(
    args: &SimulateArgs,
    fleet: &qoe_sim::fleet::Fleet,
    workload: &qoe_sim::workload::Workload,
    policy: &dyn RoutingPolicy,
    label: &str,
    cfg: &SimConfig,
) -> anyhow::Result<qoe_sim::simulate::SimOutcome> {
    let dir = args.out.as_ref().filter(|_| args.records);
    let Some(dir) = dir else {
        return Ok(simulate(fleet, workload, policy, label, cfg)?);
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    let path = dir.join(format!("requests-{label}.jsonl"));
    let file = std::fs::File::create(&path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let outcome = simulate_recorded(fleet, workload, policy, label, cfg, Some(&mut out))?;
    std::io::Write::flush(&mut out)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(outcome)
}

/// What one job computes.
enum Task {
    Run(usize),
    Sweep(usize),
}

enum Done {
    Run(Box<(Report, SimDetails)>),
    Sweep(SweepResult),
}

/// The simulated router's settings: what `qoe-router serve` would run with (the router crate
/// builds them from its config, `--config` file included), before `simulate`'s own flags.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouterSettings {
    /// Where they came from, for the report (`None`: the router's defaults).
    pub source: Option<String>,
    pub policy: PolicyConfig,
    /// The router's side of a run (scrape and health intervals, retries, timeouts, the
    /// statistics window, the analyzer, admission control, engine priority, the first output
    /// estimate); its client and workload fields are replaced by `simulate`'s flags.
    pub sim: SimConfig,
    /// Settings other than the defaults that the simulator does not model (listening address,
    /// security, breaker, connect and idle timeouts, body limits, logging, the endpoint list), as
    /// `key = value`: the report names them so that nobody reads a run as having tested them.
    pub ignored: Vec<String>,
}

/// Runs every policy (and its sweep) and collects the results in `--policies` order.
pub fn simulate_all(
    args: &SimulateArgs,
    router: &RouterSettings,
) -> anyhow::Result<SimulateOutput> {
    let kinds = args
        .policies
        .iter()
        .filter(|p| !p.trim().is_empty())
        .map(|p| PolicyKind::parse(p.trim()).map_err(|e| anyhow::anyhow!("--policies: {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!kinds.is_empty(), "--policies is empty");
    let mut dedup = kinds.clone();
    dedup.sort_by_key(|k| k.as_str());
    dedup.dedup();
    anyhow::ensure!(
        dedup.len() == kinds.len(),
        "--policies names a policy twice"
    );
    let fleet = load_fleet(&args.fleet)?;
    let mut workload = load_workload_for(&args.workload, args.duration)?;
    if let Some(rate) = args.rate {
        anyhow::ensure!(
            rate.is_finite() && rate > 0.0,
            "--rate must be a positive number"
        );
        workload = with_rate(&workload, rate)?;
    }
    if let (Some(d), Some(last)) = (workload.spec().duration_s, fleet.changes().last()) {
        anyhow::ensure!(
            (last.at as f64) < d * MICROS_PER_SEC as f64,
            "fleet {}: the change at {} s to engine {} is not before the end of the run ({d} s, \
             the workload's duration_s or --duration): it would never happen",
            args.fleet.display(),
            last.at as f64 / 1e6,
            last.engine
        );
    }
    let seconds = |s: f64, flag: &str| -> anyhow::Result<u64> {
        let max = MAX_TIME_SETTING_S as f64;
        anyhow::ensure!(
            s.is_finite() && (0.0..=max).contains(&s),
            "{flag} must be in [0, {max}] s"
        );
        Ok((s * MICROS_PER_SEC as f64).round() as u64)
    };
    let base = &router.sim;
    let scrape = match args.scrape_interval {
        Some(s) => seconds(s, "--scrape-interval")?,
        None => base.scrape_interval,
    };
    anyhow::ensure!(scrape > 0, "--scrape-interval must be > 0");
    let request_timeout = seconds(args.request_timeout, "--request-timeout")?;
    anyhow::ensure!(request_timeout > 0, "--request-timeout must be > 0");
    let mut admission = base.admission;
    let limits = &mut admission.limits;
    limits.max_inflight = args
        .max_inflight_per_endpoint
        .unwrap_or(limits.max_inflight);
    limits.max_waiting = args.saturation_waiting.unwrap_or(limits.max_waiting);
    if let Some(kv) = args.saturation_kv_usage {
        anyhow::ensure!(
            kv.is_finite() && kv > 0.0 && kv <= 1.0,
            "--saturation-kv-usage must be in (0, 1]"
        );
        limits.max_kv_usage = kv;
    }
    // As the router: metrics up to three scrape intervals old.
    limits.metrics_max_age = 3 * scrape;
    if let Some(n) = args.queue_max {
        anyhow::ensure!(n > 0, "--queue-max must be ≥ 1");
        admission.queue_max = n;
    }
    if let Some(t) = args.queue_timeout {
        admission.queue_timeout = seconds(t, "--queue-timeout")?;
        anyhow::ensure!(admission.queue_timeout > 0, "--queue-timeout must be > 0");
    }
    let max_ms = MAX_TIME_SETTING_S as f64 * 1e3;
    anyhow::ensure!(
        args.network_delay_ms.is_finite() && (0.0..=max_ms).contains(&args.network_delay_ms),
        "--network-delay-ms must be in [0, {max_ms}] ms"
    );
    let network_delay = (args.network_delay_ms * 1e3).round() as u64;
    let engine_priority = args.engine_priority || base.engine_priority;
    let cfg = SimConfig {
        seed: args.seed.unwrap_or(workload.seed()),
        scrape_interval: scrape,
        network_delay,
        output_hint: args.output_hint,
        jitter: args.jitter,
        request_timeout,
        admission,
        engine_priority,
        sla_shed: args.sla_shed || base.sla_shed,
        model: workload
            .spec()
            .model
            .clone()
            .unwrap_or_else(|| SimConfig::default().model),
        ..base.clone()
    };
    cfg.validate()?;
    let sweep = args.sweep_rate.map(|(lo, hi)| SweepConfig {
        lo,
        hi,
        max_steps: args.sweep_steps,
        seeds: args.sweep_seeds,
        ..SweepConfig::default()
    });
    if let (Some((_, hi)), Some(duration)) = (args.sweep_rate, workload.spec().duration_s) {
        // About 100 bytes of memory per request while a run lasts, and its share of the time.
        let requests = hi * duration * args.sweep_seeds.max(1) as f64;
        if requests > LARGE_SWEEP_REQUESTS {
            eprintln!(
                "simulate: --sweep-rate's top, {hi} req/s for {duration} s, is about {:.1} M requests a \
                 run ({:.1} GB while it lasts, minutes of work): lower it to a rate the fleet \
                 could come near",
                requests / 1e6,
                requests * 100.0 / 1e9
            );
        }
    }
    if let (None, Some(rate), Some(duration)) = (
        args.sweep_rate,
        workload.arrival_rate(),
        workload.spec().duration_s,
    ) {
        let requests = rate * duration;
        if requests > LARGE_SWEEP_REQUESTS {
            eprintln!(
                "simulate: {rate} req/s for {duration} s is about {:.1} M requests a run ({:.1} GB \
                 while it lasts, minutes of work per policy)",
                requests / 1e6,
                requests * 100.0 / 1e9
            );
        }
    }
    let mut tasks: Vec<Task> = (0..kinds.len()).map(Task::Run).collect();
    if sweep.is_some() {
        tasks.extend((0..kinds.len()).map(Task::Sweep));
    }
    let mut policy_cfg = router.policy;
    if let Some(n) = args.saturation_inflight {
        anyhow::ensure!(n > 0, "--saturation-inflight must be ≥ 1");
        policy_cfg.qoe.saturation_inflight = n;
    }
    if let Some(a) = args.prefix_affinity {
        anyhow::ensure!(
            a.is_finite() && (0.0..=1.0).contains(&a),
            "--prefix-affinity must be in [0, 1]"
        );
        policy_cfg.qoe.prefix_affinity = a;
    }
    policy_cfg.qoe.deadline_overflow |= args.deadline_overflow;
    policy_cfg.qoe.engine_priority = engine_priority;
    let make = |k: PolicyKind| -> Box<dyn RoutingPolicy> { build_policy(k, &policy_cfg) };
    let results: Vec<Mutex<Option<anyhow::Result<Done>>>> =
        tasks.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(task) = tasks.get(i) else { break };
        let started = Instant::now();
        let result = match *task {
            Task::Run(p) => {
                let policy = make(kinds[p]);
                run_one(
                    args,
                    &fleet,
                    &workload,
                    policy.as_ref(),
                    kinds[p].as_str(),
                    &cfg,
                )
                .map(|o| Done::Run(Box::new((o.report, o.details))))
            }
            Task::Sweep(p) => {
                let k = kinds[p];
                sweep_rate(
                    &fleet,
                    &workload,
                    &|| make(k),
                    k.as_str(),
                    &cfg,
                    sweep.expect("sweep tasks only with --sweep-rate"),
                )
                .map(Done::Sweep)
                .map_err(anyhow::Error::from)
            }
        };
        if !args.quiet {
            let (what, p) = match *task {
                Task::Run(p) => ("run", p),
                Task::Sweep(p) => ("sweep", p),
            };
            let extra = match &result {
                Ok(Done::Run(r)) => format!(
                    ": {} requests, {} tokens, {} events",
                    r.1.counters.requests, r.1.counters.tokens, r.1.counters.events
                ),
                Ok(Done::Sweep(s)) => format!(
                    ": goodput {} req/s after {} runs",
                    s.goodput
                        .map_or_else(|| "below the low end".into(), |g| format!("{g:.2}")),
                    s.points.len() + s.at_80pct.is_some() as usize
                ),
                Err(e) => format!(": {e}"),
            };
            eprintln!(
                "simulate: {what} {} done in {:.2} s (wall){extra}",
                kinds[p].as_str(),
                started.elapsed().as_secs_f64()
            );
        }
        *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
    };
    let jobs = (args.jobs as usize).clamp(1, tasks.len());
    std::thread::scope(|s| {
        for _ in 1..jobs {
            s.spawn(work);
        }
        work();
    });
    let mut reports = Vec::new();
    let mut details = Vec::new();
    let mut sweeps = Vec::new();
    for slot in results {
        match slot.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(Ok(Done::Run(r))) => {
                let (report, d) = *r;
                reports.push(report);
                details.push(d);
            }
            Some(Ok(Done::Sweep(s))) => sweeps.push(s),
            Some(Err(e)) => return Err(e),
            None => anyhow::bail!("a simulation did not run"),
        }
    }
    Ok(SimulateOutput {
        fleet: fleet.name().to_string(),
        workload: workload.name().to_string(),
        seed: cfg.seed,
        rate: workload.spec().arrivals.rate(),
        router_settings: router.source.clone(),
        router_changes: router_changes(&policy_cfg, &cfg),
        router_ignored: router.ignored.clone(),
        scrape_interval_s: scrape as f64 / 1e6,
        network_delay_ms: args.network_delay_ms,
        output_hint: args.output_hint,
        admission: cfg.admission,
        engine_priority: cfg.engine_priority,
        sla_shed: cfg.sla_shed,
        reports: ReportSet { reports },
        details,
        sweeps,
    })
}

/// The report set's Markdown, then where the requests went and, with a sweep, the goodputs.
pub fn to_markdown(out: &SimulateOutput) -> String {
    let mut md = String::new();
    let a = &out.admission;
    let mut router = Vec::new();
    if a.enabled() {
        let mut limits = Vec::new();
        if a.limits.max_inflight > 0 {
            limits.push(format!("{} in flight", a.limits.max_inflight));
        }
        if a.limits.max_kv_usage < 1.0 {
            limits.push(format!("KV usage {}", a.limits.max_kv_usage));
        }
        if a.limits.max_waiting > 0 {
            limits.push(format!("{} engine-queued", a.limits.max_waiting));
        }
        router.push(format!(
            " Admission control: an endpoint is saturated at {}; up to {} requests wait up to {} s.",
            limits.join(" or "),
            a.queue_max,
            a.queue_timeout as f64 / 1e6
        ));
    }
    if out.engine_priority {
        router.push(" Engine priority: on.".to_string());
    }
    if out.sla_shed {
        router.push(
            " SLA enforcement: priority-3 requests no endpoint is predicted to start within their \
             deadline are refused (429)."
                .to_string(),
        );
    }
    if let Some(file) = &out.router_settings {
        router.push(format!(" Router settings from `{file}`."));
    }
    if !out.router_changes.is_empty() {
        let changes: Vec<String> = out
            .router_changes
            .iter()
            .map(|c| format!("`{c}`"))
            .collect();
        router.push(format!(
            " Router settings other than the defaults: {}.",
            changes.join(", ")
        ));
    }
    if !out.router_ignored.is_empty() {
        let ignored: Vec<String> = out
            .router_ignored
            .iter()
            .map(|c| format!("`{c}`"))
            .collect();
        router.push(format!(
            " Not modelled by the simulator, so without effect here: {}.",
            ignored.join(", ")
        ));
    }
    let _ = writeln!(
        md,
        "## Simulated: workload `{}` on fleet `{}`\n\nSeed {}, {}, metrics scraped every {} s, \
         network delay {} ms, output length known from: {}.{}\n",
        out.workload,
        out.fleet,
        out.seed,
        out.rate
            .map_or_else(|| "trace arrivals".to_string(), |r| format!("{r} req/s")),
        out.scrape_interval_s,
        out.network_delay_ms,
        match out.output_hint {
            OutputHint::Header => "the header (else max_tokens on completions, else learned)",
            OutputHint::MaxTokens => "the header or max_tokens",
        },
        router.concat()
    );
    md.push_str(&out.reports.to_markdown());
    if let Some(first) = out.details.first() {
        md.push_str("### Where requests went\n\nShare of routing decisions per engine group, and the mean TTFT there (ms).\n\n| group | engines | speed |");
        for d in &out.details {
            let _ = write!(md, " {} |", d.label);
        }
        md.push_str("\n|---|---:|---:|");
        for _ in &out.details {
            md.push_str("---:|");
        }
        md.push('\n');
        for (gi, g) in first.groups.iter().enumerate() {
            let _ = write!(md, "| {} | {} | {} |", g.group, g.engines, g.speed);
            for d in &out.details {
                let x = &d.groups[gi];
                let _ = write!(
                    md,
                    " {:.1}% / {} |",
                    x.pick_share * 100.0,
                    x.mean_ttft_ms
                        .map_or_else(|| "—".to_string(), |t| format!("{t:.0}"))
                );
            }
            md.push('\n');
        }
        md.push('\n');
    }
    if !out.sweeps.is_empty() {
        md.push_str(
            "### Goodput\n\nHighest arrival rate with ≥ 90% SLO attainment (bisection), and the run at 80% of it.\n\n",
        );
        let seeds = out.sweeps[0].seeds;
        if seeds > 1 {
            md.push_str(&format!(
                "Every rate ran with {seeds} seeds (from seed {}), their requests pooled.\n\n",
                out.seed
            ));
        }
        md.push_str(
            "| policy | goodput (req/s) | at 80%: rate | SLO met | mean QoE | QoE ≥ 0.9 | p1 SLO met |\n\
             |---|---:|---:|---:|---:|---:|---:|\n",
        );
        for s in &out.sweeps {
            let g = match s.goodput {
                None => "below range".to_string(),
                Some(g) if s.capped => format!("≥ {g:.2}"),
                Some(g) => format!("{g:.2}"),
            };
            match &s.at_80pct {
                Some(p) => {
                    let _ = writeln!(
                        md,
                        "| {} | {g} | {:.2} | {:.1}% | {:.3} | {:.1}% | {} |",
                        s.label,
                        p.rate,
                        p.slo_attainment * 100.0,
                        p.mean_qoe,
                        p.qoe_acceptable_share * 100.0,
                        p.p1_attainment
                            .map_or_else(|| "—".into(), |a| format!("{:.1}%", a * 100.0))
                    );
                }
                None => {
                    let _ = writeln!(md, "| {} | {g} | — | — | — | — | — |", s.label);
                }
            }
        }
        md.push_str("\nEvery rate simulated (SLO attainment, p1 attainment, mean QoE):\n\n| policy | rate → attainment / p1 / QoE |\n|---|---|\n");
        for s in &out.sweeps {
            let pts: Vec<String> = s
                .points
                .iter()
                .map(|p| {
                    format!(
                        "{:.2} → {:.1}% / {} / {:.3}",
                        p.rate,
                        p.slo_attainment * 100.0,
                        p.p1_attainment
                            .map_or_else(|| "—".into(), |a| format!("{:.1}%", a * 100.0)),
                        p.mean_qoe
                    )
                })
                .collect();
            let _ = writeln!(md, "| {} | {} |", s.label, pts.join("; "));
        }
        md.push('\n');
    }
    md
}

/// Two small SVG plots, written by hand.
mod svg {
    use super::SimulateOutput;
    use std::fmt::Write as _;

    const W: f64 = 720.0;
    const H: f64 = 440.0;
    const LEFT: f64 = 64.0;
    const RIGHT: f64 = 170.0;
    const TOP: f64 = 40.0;
    const BOTTOM: f64 = 56.0;
    const COLORS: [&str; 8] = [
        "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    ];

    fn esc(s: &str) -> String {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    }

    struct Frame {
        out: String,
        x0: f64,
        x1: f64,
        log_x: bool,
    }

    impl Frame {
        fn new(title: &str, x_label: &str, y_label: &str, x0: f64, x1: f64, log_x: bool) -> Frame {
            let mut out = String::new();
            let _ = writeln!(
                out,
                r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
            );
            let _ = writeln!(out, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
            let _ = writeln!(
                out,
                r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
                (LEFT + W - RIGHT) / 2.0,
                esc(title)
            );
            let _ = writeln!(
                out,
                r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
                (LEFT + W - RIGHT) / 2.0,
                H - 14.0,
                esc(x_label)
            );
            let _ = writeln!(
                out,
                r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>"#,
                (TOP + H - BOTTOM) / 2.0,
                (TOP + H - BOTTOM) / 2.0,
                esc(y_label)
            );
            let mut f = Frame { out, x0, x1, log_x };
            // Y grid: 0, 25, 50, 75, 100%.
            for k in 0..=4 {
                let y = k as f64 / 4.0;
                let py = f.py(y);
                let _ = writeln!(
                    f.out,
                    r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}%</text>"##,
                    W - RIGHT,
                    LEFT - 6.0,
                    py + 4.0,
                    k * 25
                );
            }
            f.x_ticks();
            let _ = writeln!(
                f.out,
                r##"<rect x="{LEFT}" y="{TOP}" width="{:.1}" height="{:.1}" fill="none" stroke="#444"/>"##,
                W - RIGHT - LEFT,
                H - BOTTOM - TOP
            );
            f
        }

        fn px(&self, x: f64) -> f64 {
            let t = if self.log_x {
                (x.max(self.x0).ln() - self.x0.ln()) / (self.x1.ln() - self.x0.ln())
            } else {
                (x - self.x0) / (self.x1 - self.x0)
            };
            LEFT + t.clamp(0.0, 1.0) * (W - RIGHT - LEFT)
        }

        fn py(&self, y: f64) -> f64 {
            H - BOTTOM - y.clamp(0.0, 1.0) * (H - BOTTOM - TOP)
        }

        fn x_ticks(&mut self) {
            let mut ticks = Vec::new();
            if self.log_x {
                let mut d = 10f64.powf(self.x0.log10().floor());
                while d <= self.x1 * 1.0001 {
                    for m in [1.0, 2.0, 5.0] {
                        let t = d * m;
                        if t >= self.x0 * 0.9999 && t <= self.x1 * 1.0001 {
                            ticks.push(t);
                        }
                    }
                    d *= 10.0;
                }
            } else {
                let span = self.x1 - self.x0;
                let raw = span / 6.0;
                let mag = 10f64.powf(raw.log10().floor());
                let step = [1.0, 2.0, 5.0, 10.0]
                    .iter()
                    .map(|m| m * mag)
                    .find(|s| *s >= raw)
                    .unwrap_or(10.0 * mag);
                let mut t = (self.x0 / step).ceil() * step;
                while t <= self.x1 + 1e-9 {
                    ticks.push(t);
                    t += step;
                }
            }
            for t in ticks {
                let px = self.px(t);
                let label = if t >= 1000.0 {
                    format!("{:.0}k", t / 1000.0)
                } else if t >= 1.0 {
                    format!("{t:.0}")
                } else {
                    format!("{t}")
                };
                let _ = writeln!(
                    self.out,
                    r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#eee"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
                    H - BOTTOM,
                    H - BOTTOM + 16.0
                );
            }
        }

        fn series(&mut self, i: usize, label: &str, points: &[[f64; 2]], markers: bool) {
            let color = COLORS[i % COLORS.len()];
            let pts: Vec<String> = points
                .iter()
                .map(|p| format!("{:.1},{:.1}", self.px(p[0]), self.py(p[1])))
                .collect();
            let _ = writeln!(
                self.out,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                pts.join(" ")
            );
            if markers {
                for p in points {
                    let _ = writeln!(
                        self.out,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                        self.px(p[0]),
                        self.py(p[1])
                    );
                }
            }
            let ly = TOP + 14.0 + 20.0 * i as f64;
            let lx = W - RIGHT + 14.0;
            let _ = writeln!(
                self.out,
                r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
                lx + 22.0,
                lx + 28.0,
                ly + 4.0,
                esc(label)
            );
        }

        fn finish(mut self) -> String {
            self.out.push_str("</svg>\n");
            self.out
        }
    }

    /// TTFT CDF per policy, log-scaled time axis.
    pub fn ttft_cdf(out: &SimulateOutput) -> String {
        let xs = out
            .details
            .iter()
            .flat_map(|d| d.ttft_cdf.iter().map(|p| p[0]))
            .filter(|x| *x > 0.0);
        let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
        for x in xs {
            lo = lo.min(x);
            hi = hi.max(x);
        }
        if !lo.is_finite() {
            lo = 1.0;
            hi = 10.0;
        }
        let x0 = 10f64.powf(lo.log10().floor());
        let x1 = 10f64.powf(hi.log10().ceil()).max(x0 * 10.0);
        let mut f = Frame::new(
            &format!("TTFT CDF: {} on {}", out.workload, out.fleet),
            "time to first token (ms, log scale)",
            "requests with a first token",
            x0,
            x1,
            true,
        );
        for (i, d) in out.details.iter().enumerate() {
            let mut pts = Vec::with_capacity(d.ttft_cdf.len() + 1);
            if let Some(first) = d.ttft_cdf.first() {
                pts.push([first[0], 0.0]);
            }
            pts.extend(d.ttft_cdf.iter().copied());
            f.series(i, &d.label, &pts, false);
        }
        f.finish()
    }

    /// SLO attainment against the arrival rate, from the sweeps, with the 90% line.
    pub fn attainment(out: &SimulateOutput) -> String {
        let rates = out
            .sweeps
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.rate));
        let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
        for r in rates {
            lo = lo.min(r);
            hi = hi.max(r);
        }
        if !lo.is_finite() || hi <= lo {
            lo = 0.0;
            hi = lo + 1.0;
        }
        let mut f = Frame::new(
            &format!("SLO attainment vs rate: {} on {}", out.workload, out.fleet),
            "arrival rate (requests/s)",
            "requests attaining their SLO",
            lo,
            hi,
            false,
        );
        let y90 = f.py(0.9);
        let _ = writeln!(
            f.out,
            r##"<line x1="{LEFT}" y1="{y90:.1}" x2="{:.1}" y2="{y90:.1}" stroke="#555" stroke-dasharray="6 4"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">90% (goodput)</text>"##,
            W - RIGHT,
            W - RIGHT - 4.0,
            y90 - 4.0
        );
        for (i, s) in out.sweeps.iter().enumerate() {
            let pts: Vec<[f64; 2]> = s
                .points
                .iter()
                .map(|p| [p.rate, p.slo_attainment])
                .collect();
            let label = match s.goodput {
                Some(g) => format!("{} ({g:.1})", s.label),
                None => s.label.clone(),
            };
            f.series(i, &label, &pts, true);
        }
        f.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_file(rel: &str) -> String {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(rel)
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn writes_reports_and_plots_deterministically() {
        let dir = std::env::temp_dir().join(format!("qoe-simulate-test-{}", std::process::id()));
        let args = |out: &Path| {
            SimulateArgs::from_flags([
                "--fleet",
                &repo_file("bench/fleets/hetero-4.toml"),
                "--workload",
                &repo_file("bench/workloads/smoke.toml"),
                "--policies",
                "qoe,roundrobin",
                "--sweep-rate",
                "5:80",
                "--sweep-steps",
                "2",
                "--jobs",
                "2",
                "--quiet",
                "--records",
                "--out",
                &out.to_string_lossy(),
            ])
            .unwrap()
        };
        let (a, b) = (dir.join("a"), dir.join("b"));
        run(args(&a), &RouterSettings::default()).unwrap();
        run(args(&b), &RouterSettings::default()).unwrap();
        for name in [
            "report.json",
            "report.md",
            "simulate.json",
            "ttft-cdf.svg",
            "attainment-vs-rate.svg",
            "requests-qoe.jsonl",
            "requests-roundrobin.jsonl",
        ] {
            let x = std::fs::read_to_string(a.join(name)).unwrap();
            let y = std::fs::read_to_string(b.join(name)).unwrap();
            assert_eq!(x, y, "{name} differs between identical runs");
        }
        let set =
            ReportSet::from_json(&std::fs::read_to_string(a.join("report.json")).unwrap()).unwrap();
        let labels: Vec<&str> = set.reports.iter().map(|r| r.label.as_str()).collect();
        assert_eq!(labels, ["qoe", "roundrobin"]);
        assert!(set.reports.iter().all(|r| r.overall.requests > 10));
        // The records are of the run at the workload's rate, one line per request.
        for r in &set.reports {
            let text = std::fs::read_to_string(a.join(format!("requests-{}.jsonl", r.label)));
            let lines = text.unwrap().lines().count() as u64;
            assert_eq!(lines, r.overall.requests, "{}", r.label);
        }
        let md = std::fs::read_to_string(a.join("report.md")).unwrap();
        assert!(md.contains("| metric | qoe | roundrobin |"), "{md}");
        assert!(md.contains("### Goodput") && md.contains("### Where requests went"));
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(a.join("simulate.json")).unwrap())
                .unwrap();
        assert_eq!(json["sweeps"].as_array().unwrap().len(), 2);
        assert_eq!(json["details"][0]["label"], "qoe");
        for svg in ["ttft-cdf.svg", "attainment-vs-rate.svg"] {
            let text = std::fs::read_to_string(a.join(svg)).unwrap();
            assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
            assert_eq!(
                text.matches("<polyline").count(),
                2,
                "{svg}: one line per policy"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn refuses_unknown_and_repeated_policies() {
        for (policies, want) in [("qoe,fastest", "fastest"), ("qoe,qoe", "twice")] {
            let a = SimulateArgs::from_flags([
                "--fleet",
                &repo_file("bench/fleets/hetero-4.toml"),
                "--workload",
                &repo_file("bench/workloads/smoke.toml"),
                "--policies",
                policies,
            ])
            .unwrap();
            let err = simulate_all(&a, &RouterSettings::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn refuses_absurd_flags_and_changes_that_never_happen() {
        let hetero = repo_file("bench/fleets/hetero-4.toml");
        let degrading = repo_file("bench/fleets/degrading-4.toml");
        let smoke = repo_file("bench/workloads/smoke.toml");
        let cases: [(&str, &[&str], &str); 7] = [
            (&hetero, &["--duration", "1e12"], "--duration"),
            (&hetero, &["--rate", "1e9"], "rate 1e9"),
            (
                &hetero,
                &["--request-timeout", "1e300"],
                "--request-timeout",
            ),
            (
                &hetero,
                &["--network-delay-ms", "1e300"],
                "--network-delay-ms",
            ),
            (
                &hetero,
                &["--scrape-interval", "1e300"],
                "--scrape-interval",
            ),
            (&hetero, &["--queue-timeout", "1e300"], "--queue-timeout"),
            // Engine 2 slows at 60 s, after a 30 s run.
            (&degrading, &["--duration", "30"], "the change at 60 s"),
        ];
        for (fleet, flags, want) in cases {
            let mut all = vec!["--fleet", fleet, "--workload", &smoke, "--policies", "qoe"];
            all.extend(flags);
            let a = SimulateArgs::from_flags(all).unwrap();
            let err = simulate_all(&a, &RouterSettings::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{flags:?}: {err}");
        }
    }

    #[test]
    fn an_unwritable_out_fails_before_the_runs() {
        let file = std::env::temp_dir().join(format!("qoe-simulate-file-{}", std::process::id()));
        std::fs::write(&file, "").unwrap();
        let out = file.join("out");
        let a = SimulateArgs::from_flags([
            "--fleet",
            &repo_file("bench/fleets/hetero-4.toml"),
            // Unreadable too: only a check before the runs names --out.
            "--workload",
            "/nonexistent/workload.toml",
            "--quiet",
            "--out",
            &out.to_string_lossy(),
        ])
        .unwrap();
        let err = run(a, &RouterSettings::default()).unwrap_err().to_string();
        assert!(err.contains("--out"), "{err}");
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn records_need_an_out_directory() {
        let err = SimulateArgs::from_flags(["--fleet", "f", "--workload", "w", "--records"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--out"), "{err}");
    }

    #[test]
    fn flags_parse() {
        let a = SimulateArgs::from_flags([
            "--fleet",
            "f.toml",
            "--workload",
            "w.toml",
            "--policies",
            "qoe,roundrobin",
            "--sweep-rate",
            "2:30",
            "--output-hint",
            "max-tokens",
        ])
        .unwrap();
        assert_eq!(a.policies, ["qoe", "roundrobin"]);
        assert_eq!(a.sweep_rate, Some((2.0, 30.0)));
        assert_eq!(a.output_hint, OutputHint::MaxTokens);
        assert_eq!(a.scrape_interval, None, "the router's");
        assert!(
            !a.engine_priority && a.max_inflight_per_endpoint.is_none(),
            "the router's"
        );
        let a = SimulateArgs::from_flags([
            "--fleet",
            "f",
            "--workload",
            "w",
            "--max-inflight-per-endpoint",
            "32",
            "--queue-timeout",
            "5",
            "--engine-priority",
        ])
        .unwrap();
        assert_eq!(
            (a.max_inflight_per_endpoint, a.queue_timeout),
            (Some(32), Some(5.0))
        );
        assert!(a.engine_priority);
        for bad in ["3:2", "x:2", "5", "0:1"] {
            assert!(
                SimulateArgs::from_flags(["--fleet", "f", "--workload", "w", "--sweep-rate", bad])
                    .is_err(),
                "{bad}"
            );
        }
    }
}
