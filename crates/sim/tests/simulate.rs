//! The fleet simulator end to end: deterministic, accounts for every request, shows speed where
//! it is, honours the scrape interval, and tells a QoE-aware policy from round-robin.
//!
//! Small fleets and short workloads, so the suite stays fast in a debug build; every assertion is
//! on simulated numbers (attainment, QoE, TTFT), never on wall-clock timing.

use qoe_core::policy::{Decision, Feedback, RoutingPolicy};
use qoe_core::profile::OutputSource;
use qoe_core::{
    build_policy, EndpointView, EngineMetrics, Micros, PolicyConfig, PolicyKind, RequestProfile,
};
use qoe_sim::fleet::Fleet;
use qoe_sim::report::RequestLine;
use qoe_sim::simulate::{
    simulate, simulate_recorded, sweep_rate, AdmissionSpec, OutputHint, SimConfig, SimOutcome,
    SweepConfig,
};
use qoe_sim::workload::Workload;
use std::sync::Mutex;

/// Two fast engines and two slow ones (the `hetero-4` shape).
const HETERO: &str = r#"
name = "hetero"
[[engines]]
profile = "h100-llama3-8b"
count = 2
[[engines]]
profile = "a100-llama3-8b"
speed = 0.5
count = 2
"#;

/// Chat-like traffic: Azure conversation lengths, a priority mix with SLAs.
fn chat(rate: f64, duration_s: f64, header: bool) -> Workload {
    Workload::from_toml_str(&format!(
        r#"
name = "chat"
seed = 5
duration_s = {duration_s}
api = "chat"
send_expected_output_header = {header}
[arrivals]
kind = "poisson"
rate = {rate}
[prompt]
kind = "preset"
trace = "azure-conversation"
max = 4000
[output]
kind = "preset"
trace = "azure-conversation"
max = 1000
[[priorities]]
level = 1
share = 0.2
ttft_ms = 500
tpot_ms = 100
[[priorities]]
level = 2
share = 0.8
ttft_ms = 1000
tpot_ms = 100
"#
    ))
    .unwrap()
}

fn run(fleet: &Fleet, w: &Workload, kind: PolicyKind, cfg: &SimConfig) -> SimOutcome {
    let policy = build_policy(kind, &PolicyConfig::default());
    simulate(fleet, w, policy.as_ref(), kind.as_str(), cfg).unwrap()
}

#[test]
fn same_seed_same_report_byte_for_byte() {
    let fleet = Fleet::from_toml_str(HETERO).unwrap();
    let w = chat(6.0, 20.0, false);
    let cfg = SimConfig {
        seed: 11,
        jitter: 0.05,
        ..SimConfig::default()
    };
    for kind in [PolicyKind::Qoe, PolicyKind::PowerOfTwo] {
        let a = run(&fleet, &w, kind, &cfg);
        let b = run(&fleet, &w, kind, &cfg);
        assert_eq!(a.report.to_json(), b.report.to_json(), "{kind:?}");
        assert_eq!(
            serde_json::to_string(&a.details).unwrap(),
            serde_json::to_string(&b.details).unwrap()
        );
        // A different seed is a different run.
        let c = run(
            &fleet,
            &w,
            kind,
            &SimConfig {
                seed: 12,
                ..cfg.clone()
            },
        );
        assert_ne!(a.report.to_json(), c.report.to_json());
    }
}

#[test]
fn every_request_is_accounted_for() {
    let fleet = Fleet::from_toml_str(HETERO).unwrap();
    let w = chat(8.0, 15.0, true);
    let cfg = SimConfig::default();
    let planned = w.generate(cfg.seed).count() as u64;
    let planned_tokens: u64 = w.generate(cfg.seed).map(|r| r.output_tokens as u64).sum();
    for kind in PolicyKind::ALL {
        let out = run(&fleet, &w, kind, &cfg);
        let o = &out.report.overall;
        assert_eq!(o.requests, planned, "{kind:?}");
        assert_eq!(o.completed + o.errors, planned);
        assert_eq!(o.errors, 0, "{kind:?}: {:?}", o.errors_by_kind);
        assert_eq!(
            o.output_tokens, planned_tokens,
            "every planned token delivered"
        );
        assert_eq!(out.details.counters.tokens, planned_tokens);
        let picks: u64 = out.details.engines.iter().map(|e| e.picks).sum();
        assert_eq!(
            picks, planned,
            "one decision per request, no retries needed"
        );
        let completed: u64 = out.details.engines.iter().map(|e| e.completed).sum();
        assert_eq!(completed, planned);
        // Per engine, met and missed split its completed requests: every miss missed a part.
        let met: u64 = out.details.engines.iter().map(|e| e.slo_met).sum();
        assert_eq!(met, (o.slo_attainment * planned as f64).round() as u64);
        for e in &out.details.engines {
            assert!(e.slo_met <= e.completed, "{kind:?}: {e:?}");
            assert!(e.ttft_missed.max(e.tpot_missed) <= e.completed - e.slo_met);
            assert!(e.ttft_missed + e.tpot_missed >= e.completed - e.slo_met);
        }
        let by_priority: u64 = out.report.by_priority.iter().map(|s| s.requests).sum();
        assert_eq!(by_priority, planned);
        assert_eq!(out.details.reasons.values().sum::<u64>(), picks);
        let cdf = &out.details.ttft_cdf;
        assert!(cdf
            .windows(2)
            .all(|p| p[0][0] < p[1][0] && p[0][1] <= p[1][1]));
        assert!((cdf.last().unwrap()[1] - 1.0).abs() < 1e-9);
    }
}

#[test]
fn request_records_agree_with_the_report() {
    let fleet = Fleet::from_toml_str(HETERO).unwrap();
    let w = chat(8.0, 10.0, true);
    let cfg = SimConfig::default();
    let planned = w.generate(cfg.seed).count();
    for kind in [PolicyKind::Qoe, PolicyKind::RoundRobin] {
        let policy = build_policy(kind, &PolicyConfig::default());
        let mut buf: Vec<u8> = Vec::new();
        let out = simulate_recorded(
            &fleet,
            &w,
            policy.as_ref(),
            kind.as_str(),
            &cfg,
            Some(&mut buf),
        )
        .unwrap();
        // Recording changes nothing about the run.
        assert_eq!(
            out.report.to_json(),
            run(&fleet, &w, kind, &cfg).report.to_json()
        );
        let lines: Vec<RequestLine> = std::str::from_utf8(&buf)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), planned, "{kind:?}: one line per request");
        let mut ids: Vec<u64> = lines.iter().map(|l| l.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), planned, "each request once");
        let met = lines.iter().filter(|l| l.slo_met).count() as f64;
        let o = &out.report.overall;
        assert_eq!(met, (o.slo_attainment * planned as f64).round());
        let tokens: u64 = lines.iter().map(|l| l.output_tokens).sum();
        assert_eq!(tokens, o.output_tokens);
        // Per engine, the lines add up to its picks (no retries in this run).
        for e in &out.details.engines {
            let n = lines
                .iter()
                .filter(|l| l.endpoint.as_deref() == Some(e.label.as_str()))
                .count() as u64;
            assert_eq!(n, e.picks, "{kind:?} {}", e.label);
        }
        for l in &lines {
            assert!(l.ttft_ms.is_some_and(|t| t > 0.0 && t <= l.e2e_ms), "{l:?}");
            // Only the cost-based policy predicts.
            assert_eq!(
                l.predicted_ttft_ms.is_some(),
                kind == PolicyKind::Qoe,
                "{l:?}"
            );
        }
    }
}

#[test]
fn a_faster_engine_gets_a_lower_ttft() {
    // The same engine at three speeds; round-robin gives each the same requests.
    let fleet = Fleet::from_toml_str(
        "[[engines]]\nprofile = \"h100-llama3-8b\"\nspeed = 2.0\n\
         [[engines]]\nprofile = \"h100-llama3-8b\"\nspeed = 1.0\n\
         [[engines]]\nprofile = \"h100-llama3-8b\"\nspeed = 0.5\n",
    )
    .unwrap();
    let out = run(
        &fleet,
        &chat(6.0, 20.0, true),
        PolicyKind::RoundRobin,
        &SimConfig::default(),
    );
    let e = &out.details.engines;
    let ttft: Vec<f64> = e.iter().map(|x| x.mean_ttft_ms.unwrap()).collect();
    assert!(e[0].picks.abs_diff(e[2].picks) <= 1);
    assert!(
        ttft[0] < ttft[1] && ttft[1] < ttft[2],
        "mean TTFT by speed 2, 1, 0.5: {ttft:?}"
    );
    assert!(ttft[2] > 2.0 * ttft[0], "{ttft:?}");
    assert!(e[2].busy > e[0].busy, "the slow engine is busier");
}

#[test]
fn qoe_beats_roundrobin_on_a_heterogeneous_fleet() {
    // Moderate load: round-robin overloads the slow engines (they get half the requests at a
    // quarter of the speed) while the fleet as a whole has room.
    let fleet = Fleet::from_toml_str(HETERO).unwrap();
    let w = chat(12.0, 60.0, false);
    let cfg = SimConfig::default();
    let qoe = run(&fleet, &w, PolicyKind::Qoe, &cfg).report;
    let rr_out = run(&fleet, &w, PolicyKind::RoundRobin, &cfg);
    // The per-engine breakdown shows where round-robin's misses are: on the slow engines.
    let missed = |e: &qoe_sim::simulate::EngineUsage| e.completed - e.slo_met;
    let engines = &rr_out.details.engines;
    assert!(
        missed(&engines[2]) + missed(&engines[3]) > 4 * (missed(&engines[0]) + missed(&engines[1])),
        "{engines:?}"
    );
    let rr = rr_out.report;
    let (q, r) = (&qoe.overall, &rr.overall);
    assert!(
        q.slo_attainment >= r.slo_attainment + 0.03,
        "SLO attainment: qoe {} vs roundrobin {}",
        q.slo_attainment,
        r.slo_attainment
    );
    assert!(
        q.mean_qoe >= r.mean_qoe + 0.08,
        "mean QoE: qoe {} vs roundrobin {}",
        q.mean_qoe,
        r.mean_qoe
    );
    assert!(q.slo_attainment >= 0.98, "{}", q.slo_attainment);
    assert!(q.ttft_ms.p90.unwrap() < r.ttft_ms.p90.unwrap());
}

/// What a recorded decision saw: `now`, endpoint 0's `engine_at` and engine metrics, the
/// profile's output source and expected output.
type Seen = (
    Micros,
    Option<Micros>,
    Option<EngineMetrics>,
    OutputSource,
    u32,
);

/// Wraps a policy and logs what it was shown.
struct Recorder {
    inner: Box<dyn RoutingPolicy>,
    seen: Mutex<Vec<Seen>>,
}

impl RoutingPolicy for Recorder {
    fn name(&self) -> &'static str {
        "recorder"
    }

    fn pick(&self, req: &RequestProfile, views: &[EndpointView], now: Micros) -> Option<Decision> {
        self.seen.lock().unwrap().push((
            now,
            views[0].engine_at,
            views[0].engine,
            req.output_source,
            req.expected_output_tokens,
        ));
        self.inner.pick(req, views, now)
    }

    fn feedback(&self, fb: &Feedback, now: Micros) {
        self.inner.feedback(fb, now)
    }
}

fn recorder() -> Recorder {
    Recorder {
        inner: build_policy(PolicyKind::LeastLoaded, &PolicyConfig::default()),
        seen: Mutex::new(Vec::new()),
    }
}

#[test]
fn engine_metrics_are_as_stale_as_the_scrape_interval() {
    let fleet = Fleet::from_toml_str(HETERO).unwrap();
    let w = chat(10.0, 30.0, true);
    for interval in [1_000_000u64, 5_000_000] {
        let rec = recorder();
        let cfg = SimConfig {
            scrape_interval: interval,
            ..SimConfig::default()
        };
        simulate(&fleet, &w, &rec, "rec", &cfg).unwrap();
        let seen = rec.seen.into_inner().unwrap();
        assert!(seen.len() > 200);
        let mut changes = 0;
        for pair in seen.windows(2) {
            let (now, at, m, ..) = pair[1];
            let at = at.expect("scraped at the start");
            assert_eq!(at % interval, 0, "scraped only on the interval");
            assert!(
                at <= now && now - at < interval,
                "the latest scrape, no older"
            );
            let (_, prev_at, prev_m, ..) = pair[0];
            if prev_at == Some(at) {
                assert_eq!(prev_m, m, "no change between scrapes");
            } else {
                changes += 1;
            }
        }
        // Metrics did move over the run, at most once per interval.
        let span = seen.last().unwrap().0 - seen[0].0;
        assert!(
            changes >= 2 && changes as u64 <= span / interval + 1,
            "{changes}"
        );
        let running: Vec<f64> = seen.iter().filter_map(|s| s.2?.running).collect();
        assert!(running.iter().any(|&r| r > 0.0));
    }
}

#[test]
fn output_length_is_known_only_from_what_the_client_sends() {
    let fleet = Fleet::from_toml_str(HETERO).unwrap();
    let cases = [
        (true, OutputHint::Header, OutputSource::Header),
        (false, OutputHint::Header, OutputSource::Learned),
        (false, OutputHint::MaxTokens, OutputSource::MaxTokens),
    ];
    for (header, hint, want) in cases {
        let w = chat(5.0, 10.0, header);
        let rec = recorder();
        let cfg = SimConfig {
            output_hint: hint,
            ..SimConfig::default()
        };
        simulate(&fleet, &w, &rec, "rec", &cfg).unwrap();
        let seen = rec.seen.into_inner().unwrap();
        let planned: Vec<u32> = w.generate(cfg.seed).map(|r| r.output_tokens).collect();
        assert!(seen.iter().all(|s| s.3 == want), "{header} {hint:?}");
        let exact = seen
            .iter()
            .zip(&planned)
            .filter(|(s, p)| s.4 == **p)
            .count();
        if want == OutputSource::Learned {
            // Starts at the default, then follows finished outputs: rarely exact.
            assert_eq!(seen[0].4, 256);
            assert!(exact < planned.len() / 4, "{exact}");
        } else {
            assert_eq!(exact, planned.len());
        }
    }
}

#[test]
fn network_delay_adds_a_round_trip_to_ttft() {
    let fleet = Fleet::from_toml_str(HETERO).unwrap();
    let w = chat(2.0, 20.0, true);
    let base = run(&fleet, &w, PolicyKind::RoundRobin, &SimConfig::default()).report;
    let delayed = run(
        &fleet,
        &w,
        PolicyKind::RoundRobin,
        &SimConfig {
            network_delay: 20_000,
            ..SimConfig::default()
        },
    )
    .report;
    let (a, b) = (
        base.overall.ttft_ms.p50.unwrap(),
        delayed.overall.ttft_ms.p50.unwrap(),
    );
    assert!(
        (b - a - 40.0).abs() < 8.0,
        "p50 TTFT {a} → {b} with 20 ms each way"
    );
    assert_eq!(delayed.overall.errors, 0);
}

#[test]
fn a_degrading_engine_loses_traffic_under_qoe() {
    // Engine 0 becomes 4× slower at 20 s: qoe learns it from TTFT and ITL feedback.
    let fleet = Fleet::from_toml_str(
        "[[engines]]\nprofile = \"h100-llama3-8b\"\ncount = 3\n\
         [[changes]]\nat_s = 20\nengine = 0\nspeed = 0.25\n",
    )
    .unwrap();
    let w = chat(6.0, 60.0, true);
    let out = run(&fleet, &w, PolicyKind::Qoe, &SimConfig::default());
    let e = &out.details.engines;
    assert!(
        e[0].picks * 2 < e[1].picks.min(e[2].picks),
        "picks: {:?}",
        e.iter().map(|x| x.picks).collect::<Vec<_>>()
    );
}

#[test]
fn sweep_finds_a_goodput_between_its_ends() {
    let fleet = Fleet::from_toml_str(HETERO).unwrap();
    let w = chat(1.0, 20.0, true);
    let make = || build_policy(PolicyKind::LeastLoaded, &PolicyConfig::default());
    let s = sweep_rate(
        &fleet,
        &w,
        &make,
        "least-loaded",
        &SimConfig::default(),
        SweepConfig {
            lo: 1.0,
            hi: 60.0,
            tolerance: 0.1,
            max_steps: 5,
            seeds: 1,
        },
    )
    .unwrap();
    let g = s.goodput.expect("1 req/s is sustained");
    assert!(!s.capped && g > 1.0 && g < 60.0, "{g}");
    assert!(s.points.windows(2).all(|p| p[0].rate < p[1].rate));
    assert!(s.points.len() >= 4);
    let at = s.points.iter().find(|p| p.rate == g).unwrap();
    assert!(at.sustained());
    assert!(s.points.iter().any(|p| p.rate > g && !p.sustained()));
    let at80 = s.at_80pct.unwrap();
    assert!((at80.rate - 0.8 * g).abs() < 1e-9);
}

#[test]
fn a_sweep_over_seeds_pools_their_requests() {
    let fleet = Fleet::from_toml_str(HETERO).unwrap();
    let w = chat(1.0, 20.0, true);
    let make = || build_policy(PolicyKind::RoundRobin, &PolicyConfig::default());
    // No bisection: the two ends only, the high one past the fleet's capacity.
    let ends = |seed: u64, seeds: u32| {
        let cfg = SimConfig {
            seed,
            ..SimConfig::default()
        };
        let sweep = SweepConfig {
            lo: 1.0,
            hi: 40.0,
            tolerance: 0.1,
            max_steps: 0,
            seeds,
        };
        let s = sweep_rate(&fleet, &w, &make, "roundrobin", &cfg, sweep).unwrap();
        assert_eq!(s.seeds, seeds);
        s.points.last().unwrap().slo_attainment
    };
    let (a, b, both) = (ends(7, 1), ends(8, 1), ends(7, 2));
    assert!(a != b, "different seeds, different runs: {a} {b}");
    assert!(
        both > a.min(b) && both < a.max(b),
        "pooled {both} between {a} and {b}"
    );
}

/// Wraps a policy and checks that every candidate it is shown is below the admission limit.
struct LimitChecker {
    inner: Box<dyn RoutingPolicy>,
    limit: u32,
    picks: Mutex<u64>,
}

impl RoutingPolicy for LimitChecker {
    fn name(&self) -> &'static str {
        "limit-checker"
    }

    fn pick(&self, req: &RequestProfile, views: &[EndpointView], now: Micros) -> Option<Decision> {
        for v in views {
            assert!(v.load.in_flight() < self.limit, "{:?}", v.load);
        }
        *self.picks.lock().unwrap() += 1;
        self.inner.pick(req, views, now)
    }

    fn feedback(&self, fb: &Feedback, now: Micros) {
        self.inner.feedback(fb, now)
    }
}

#[test]
fn admission_control_bounds_engines_and_serves_priority_first() {
    // Well past what two slow engines can take: without admission control every class drowns
    // alike; with it, the router holds the excess and lets priority 1 through first.
    let fleet =
        Fleet::from_toml_str("[[engines]]\nprofile = \"a100-llama3-8b\"\nspeed = 0.5\ncount = 2\n")
            .unwrap();
    let w = Workload::from_toml_str(
        r#"
duration_s = 30
[arrivals]
kind = "poisson"
rate = 40
[prompt]
kind = "uniform"
min = 100
max = 600
[output]
kind = "uniform"
min = 50
max = 300
[[priorities]]
level = 1
share = 0.3
ttft_ms = 1000
tpot_ms = 200
[[priorities]]
level = 3
share = 0.7
ttft_ms = 1000
tpot_ms = 200
"#,
    )
    .unwrap();
    let limit = 64;
    let mut admission = AdmissionSpec {
        queue_max: 100,
        queue_timeout: 10_000_000,
        ..AdmissionSpec::default()
    };
    admission.limits.max_inflight = limit;
    let cfg = SimConfig {
        admission,
        ..SimConfig::default()
    };
    let checker = LimitChecker {
        inner: build_policy(PolicyKind::LeastLoaded, &PolicyConfig::default()),
        limit,
        picks: Mutex::new(0),
    };
    let with = simulate(&fleet, &w, &checker, "admission", &cfg).unwrap();
    let without = run(&fleet, &w, PolicyKind::LeastLoaded, &SimConfig::default());
    let p = |o: &SimOutcome, level| o.report.priority(level).unwrap().slo_attainment;
    assert!(with.details.counters.queued > 0 && with.details.counters.shed > 0);
    assert!(with.report.overall.errors_by_kind["http_429"] > 0);
    assert!(
        p(&with, 1) >= 0.7 && p(&with, 1) > p(&with, 3) + 0.3,
        "p1 {} p3 {}",
        p(&with, 1),
        p(&with, 3)
    );
    assert!(
        p(&with, 1) > p(&without, 1) + 0.3,
        "{} vs {}",
        p(&with, 1),
        p(&without, 1)
    );
    assert!(*checker.picks.lock().unwrap() > 100);
    assert_eq!(without.details.counters.queued, 0);
    // Every request still ends exactly once.
    let planned = w.generate(cfg.seed).count() as u64;
    assert_eq!(with.report.overall.requests, planned);
}

#[test]
fn runs_that_cannot_mean_anything_are_refused() {
    let fleet = Fleet::from_toml_str(HETERO).unwrap();
    let policy = build_policy(PolicyKind::RoundRobin, &PolicyConfig::default());
    let sim = |w: &Workload, cfg: &SimConfig| {
        simulate(&fleet, w, policy.as_ref(), "rr", cfg)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    // An empty plan would report 0% attainment as if measured.
    let err = sim(&chat(1e-9, 2.0, true), &SimConfig::default());
    assert!(err.contains("plans no requests"), "{err}");
    // Time settings that would overflow virtual time.
    let w = chat(1.0, 2.0, true);
    for (cfg, want) in [
        (
            SimConfig {
                request_timeout: u64::MAX,
                ..SimConfig::default()
            },
            "request timeout",
        ),
        (
            SimConfig {
                network_delay: u64::MAX / 2,
                ..SimConfig::default()
            },
            "network delay",
        ),
        (
            SimConfig {
                max_retries: 4_000_000_000,
                ..SimConfig::default()
            },
            "max_retries",
        ),
    ] {
        let err = sim(&w, &cfg);
        assert!(err.contains(want), "{want}: {err}");
    }
}
