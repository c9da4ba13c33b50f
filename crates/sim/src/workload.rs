//! Workloads as data: what requests arrive, when, and how long they are.
//!
//! The live benchmark (`qoe-router bench`) and the fleet simulator must replay *the same* load for
//! every policy and every peer router, or their numbers cannot be compared. So a workload is a
//! TOML file, not code, and [`Workload::generate`] turns it into a deterministic, lazily generated
//! stream of [`PlannedRequest`]s: the same file and seed give the same requests, byte for byte,
//! in any driver.
//!
//! What a file describes (see `bench/workloads/` for complete examples):
//!
//! * **Arrivals** ([`ArrivalSpec`]): `poisson` at a rate (Azure's conversation trace is near
//!   Poisson, CV 1.09), `gamma` with a coefficient of variation for bursts (Azure's code trace has
//!   CV 13.2), or a `trace` CSV of timestamps and, optionally, lengths ([`Trace`]).
//! * **Lengths** ([`LengthSpec`]) of the prompt and of the output: `fixed`, `uniform`,
//!   `lognormal` given its median and p90, or a `preset` matched to a public trace
//!   ([`TracePreset`], figures from FIELD-NOTES).
//! * **Shared prefixes** ([`PrefixSpec`]): `groups` system prompts or RAG documents of `tokens`
//!   tokens each, used by a `share` of requests; a group's prefix is byte-identical in every request
//!   that uses it, so prefix caches hit (llm-d's benchmark: 150 groups × 6k tokens).
//! * **Sessions** ([`SessionSpec`]): multi-turn chats whose later turns resend the whole history
//!   (earlier questions and answers) plus a new question, again byte-identical.
//! * **Priorities** ([`PriorityClass`]): a mix of priorities 1–3, each with its own SLA.
//! * Whether the `x-expected-output-tokens` header is sent (the router's best output-length hint).
//!
//! Example:
//!
//! ```toml
//! name = "conversation"
//! seed = 7
//! duration_s = 60
//! api = "chat"
//! send_expected_output_header = false
//!
//! [arrivals]
//! kind = "poisson"
//! rate = 5.5
//!
//! [prompt]
//! kind = "preset"
//! trace = "azure-conversation"
//!
//! [output]
//! kind = "lognormal"
//! median = 129
//! p90 = 424
//!
//! [prefix]
//! groups = 8
//! tokens = 512
//! share = 0.5
//!
//! [sessions]
//! share = 0.3
//! turns = [2, 5]
//! think_time_s = 10
//!
//! [[priorities]]
//! level = 1
//! share = 0.2
//! ttft_ms = 250
//! tpot_ms = 100
//!
//! [[priorities]]
//! level = 2
//! share = 0.8
//! ```
//!
//! ## Prompt text
//!
//! Engines here have no tokenizer: the router and the simulated engine count tokens by
//! [`qoe_core::prompt::estimate_tokens`] (one token per four bytes). Prompt text is therefore made
//! of exactly `4 × tokens` bytes of pseudo-random lowercase words, so the estimate equals the
//! planned length, and each piece of text (a group's prefix, a session's earlier turns, a new
//! question) is drawn from its own seed so that it is reproduced identically wherever it recurs.
//!
//! ## Open loop and sessions
//!
//! Every time is planned in advance, independent of how fast answers come (an open-loop load, as in
//! DistServe's and vLLM's benchmarks): a later turn of a session is planned at the previous turn's
//! arrival plus a think time drawn from an exponential distribution with mean `think_time_s`
//! (choose it longer than an answer takes). The arrival process places *first* turns; with
//! sessions the total request rate is `rate × (1 + share × (mean turns − 1))`.
//!
//! ## Bounded memory
//!
//! Generation is lazy: the iterator keeps the next arrival and one small record per open session
//! (a few numbers per turn; history text is regenerated from seeds, never stored), so a 200,000-
//! request workload costs no more memory than a 200-request one. A trace is held in memory
//! (16 bytes per row, at most [`MAX_TRACE_ROWS`] rows).
//!
//! ## Limits
//!
//! A plan lasts at most [`MAX_DURATION_S`] (`duration_s`, `--duration`, a trace at its speed-up,
//! or `requests` / rate) and holds at most [`MAX_REQUESTS`] requests (`requests`, rate ×
//! duration); `max_context_tokens` ≤ [`MAX_CONTEXT_TOKENS`]; SLA `ttft_ms` and `tpot_ms` are in
//! 1..=3,600,000 (the router's bound on `x-sla-target-ms`).

use crate::rng::{mix64, SplitMix64};
use qoe_core::analyze::MAX_SLA_MS;
use qoe_core::qoe_metric::Slo;
use qoe_core::{Micros, Priority, MICROS_PER_MS, MICROS_PER_SEC};
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::sync::Arc;

/// The standard normal's 90th percentile, for lognormals given by median and p90.
const Z90: f64 = 1.281_551_565_544_600_4;

/// Most rows a trace file may have (16 bytes each in memory).
pub const MAX_TRACE_ROWS: usize = 10_000_000;

/// Most turns a session may have (bounds the per-session state).
pub const MAX_TURNS: u32 = 1_000;

/// Most shared-prefix groups (each group's prefix is regenerated on use, not stored, so this
/// bounds nothing but typos).
pub const MAX_PREFIX_GROUPS: u32 = 1_000_000;

/// Most requests a workload may plan (`requests`, or rate × duration).
pub const MAX_REQUESTS: u64 = 100_000_000;

/// Longest a workload may last, seconds (a week of trace fits).
pub const MAX_DURATION_S: f64 = 1e6;

/// Largest `max_context_tokens` (each prompt is built in memory, 4 bytes a token).
pub const MAX_CONTEXT_TOKENS: u32 = qoe_core::analyze::MAX_EXPECTED_OUTPUT;

/// Default `max_context_tokens`: the `max_model_len` of the simulated Llama-3-8B profiles.
pub const DEFAULT_MAX_CONTEXT_TOKENS: u32 = 8192;

/// Default workload seed.
pub const DEFAULT_SEED: u64 = 1;

/// A request's latency SLA: DistServe's pair, TTFT ≤ `ttft_ms` and TPOT ≤ `tpot_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sla {
    pub ttft_ms: u32,
    pub tpot_ms: u32,
}

impl Sla {
    /// As a [`Slo`] in seconds, for [`qoe_core::qoe_metric`].
    pub fn slo(&self) -> Slo {
        Slo {
            ttft_s: self.ttft_ms as f64 / 1e3,
            tpot_s: self.tpot_ms as f64 / 1e3,
        }
    }
}

/// Which OpenAI API the requests use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// `POST /v1/completions` with `prompt`.
    #[default]
    Completions,
    /// `POST /v1/chat/completions` with the prompt as one user message.
    Chat,
}

impl Api {
    /// The request path.
    pub fn path(self) -> &'static str {
        match self {
            Api::Completions => "/v1/completions",
            Api::Chat => "/v1/chat/completions",
        }
    }
}

/// When requests (first turns of sessions) arrive.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ArrivalSpec {
    /// Exponential gaps: `rate` requests per second on average, coefficient of variation 1.
    Poisson { rate: f64 },
    /// Gamma-distributed gaps with mean `1/rate` and coefficient of variation `cv` (> 1: bursts
    /// separated by lulls; 1: Poisson; < 1: more regular than Poisson).
    Gamma { rate: f64, cv: f64 },
    /// Timestamps (and optionally lengths) from a CSV file, see [`Trace::parse_csv`]. `file` is
    /// relative to the workload file. `speedup` > 1 replays the trace faster.
    Trace {
        file: String,
        #[serde(default = "one")]
        speedup: f64,
    },
}

fn one() -> f64 {
    1.0
}

impl ArrivalSpec {
    /// Multiplies the arrival rate by `factor` (a trace is replayed `factor` times faster): what a
    /// rate sweep varies.
    pub fn scale(&mut self, factor: f64) {
        match self {
            ArrivalSpec::Poisson { rate } | ArrivalSpec::Gamma { rate, .. } => *rate *= factor,
            ArrivalSpec::Trace { speedup, .. } => *speedup *= factor,
        }
    }

    /// The mean rate of new arrivals, requests/s, where the spec states one.
    pub fn rate(&self) -> Option<f64> {
        match self {
            ArrivalSpec::Poisson { rate } | ArrivalSpec::Gamma { rate, .. } => Some(*rate),
            ArrivalSpec::Trace { .. } => None,
        }
    }
}

/// A public trace whose length distributions a [`LengthSpec::Preset`] reproduces as lognormals
/// (median and p90 from FIELD-NOTES).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TracePreset {
    /// Azure LLM inference trace 2023, conversation: prompt 1020 / 2734, output 129 / 424.
    AzureConversation,
    /// Azure LLM inference trace 2023, code: prompt 1469 / 5188, output 13 / 55.
    AzureCode,
    /// ShareGPT first turns. Only the means are published (prompt ≈ 215, output ≈ 195); the
    /// lognormals assume σ = 1 (est.): prompt median 130 / p90 470, output 118 / 426.
    Sharegpt,
}

impl TracePreset {
    /// Prompt length `(median, p90)` in tokens.
    pub fn prompt(self) -> (f64, f64) {
        match self {
            TracePreset::AzureConversation => (1020.0, 2734.0),
            TracePreset::AzureCode => (1469.0, 5188.0),
            TracePreset::Sharegpt => (130.0, 470.0),
        }
    }

    /// Output length `(median, p90)` in tokens.
    pub fn output(self) -> (f64, f64) {
        match self {
            TracePreset::AzureConversation => (129.0, 424.0),
            TracePreset::AzureCode => (13.0, 55.0),
            TracePreset::Sharegpt => (118.0, 426.0),
        }
    }
}

/// A distribution of lengths in tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum LengthSpec {
    /// Always `tokens`.
    Fixed { tokens: u32 },
    /// Uniform over `min..=max`.
    Uniform { min: u32, max: u32 },
    /// Lognormal with this median and 90th percentile, rounded, then clamped to `min..=max`
    /// (defaults 1 and unbounded; the workload's `max_context_tokens` applies in any case).
    Lognormal {
        median: f64,
        p90: f64,
        min: Option<u32>,
        max: Option<u32>,
    },
    /// The lognormal of a public trace ([`TracePreset`]), for prompts or outputs as the field
    /// it appears in says; clamped as `lognormal` is.
    Preset {
        trace: TracePreset,
        min: Option<u32>,
        max: Option<u32>,
    },
}

/// Whether a length is a prompt's or an output's (presets differ).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LengthRole {
    Prompt,
    Output,
}

/// A [`LengthSpec`] ready to sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LengthDist {
    Fixed(u32),
    Uniform {
        min: u32,
        max: u32,
    },
    Lognormal {
        mu: f64,
        sigma: f64,
        min: u32,
        max: u32,
    },
}

impl LengthSpec {
    /// Checks the parameters and resolves presets.
    pub fn resolve(&self, role: LengthRole) -> Result<LengthDist, String> {
        let lognormal = |median: f64, p90: f64, min: Option<u32>, max: Option<u32>| {
            if !(median.is_finite() && median >= 1.0) {
                return Err(format!("lognormal median must be ≥ 1, got {}", Num(median)));
            }
            if !(p90.is_finite() && p90 >= median) {
                return Err(format!(
                    "lognormal p90 must be ≥ the median ({median}), got {}",
                    Num(p90)
                ));
            }
            let min = min.unwrap_or(1).max(1);
            let max = max.unwrap_or(u32::MAX);
            if max < min {
                return Err(format!("max ({max}) is below min ({min})"));
            }
            Ok(LengthDist::Lognormal {
                mu: median.ln(),
                sigma: (p90 / median).ln() / Z90,
                min,
                max,
            })
        };
        match *self {
            LengthSpec::Fixed { tokens } => {
                if tokens == 0 {
                    return Err("fixed length must be ≥ 1".into());
                }
                Ok(LengthDist::Fixed(tokens))
            }
            LengthSpec::Uniform { min, max } => {
                if min == 0 || max < min {
                    return Err(format!("uniform needs 1 ≤ min ≤ max, got {min}..{max}"));
                }
                Ok(LengthDist::Uniform { min, max })
            }
            LengthSpec::Lognormal {
                median,
                p90,
                min,
                max,
            } => lognormal(median, p90, min, max),
            LengthSpec::Preset { trace, min, max } => {
                let (median, p90) = match role {
                    LengthRole::Prompt => trace.prompt(),
                    LengthRole::Output => trace.output(),
                };
                lognormal(median, p90, min, max)
            }
        }
    }
}

impl LengthDist {
    /// One draw, ≥ 1.
    pub fn sample(&self, rng: &mut SplitMix64) -> u32 {
        match *self {
            LengthDist::Fixed(n) => n,
            LengthDist::Uniform { min, max } => {
                let span = (max - min) as u64 + 1;
                min + (rng.next_u64() % span) as u32
            }
            LengthDist::Lognormal {
                mu,
                sigma,
                min,
                max,
            } => {
                let x = (mu + sigma * rng.next_normal()).exp().round();
                // `as` saturates: a huge draw becomes u32::MAX, then the clamp.
                (x as u32).clamp(min, max)
            }
        }
    }
}

/// Shared prefixes: `groups` distinct prefixes of `tokens` tokens; a request uses one (chosen
/// uniformly) with probability `share`, prepended to its own prompt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixSpec {
    pub groups: u32,
    pub tokens: u32,
    pub share: f64,
}

/// How many turns a session has: a fixed number, or `[min, max]` drawn uniformly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Turns {
    Fixed(u32),
    Range([u32; 2]),
}

/// Multi-turn sessions: a `share` of arrivals open a session of `turns` turns; each later turn
/// comes after an exponential think time of mean `think_time_s` and resends the history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSpec {
    #[serde(default = "one")]
    pub share: f64,
    pub turns: Turns,
    pub think_time_s: f64,
}

/// One class of the priority mix: `share` of requests (or sessions) get priority `level`, and
/// the SLA `ttft_ms`/`tpot_ms` if both are given (sent as `x-sla-target-ms`). The classes'
/// shares add up to 1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorityClass {
    pub level: u8,
    pub share: f64,
    pub ttft_ms: Option<u32>,
    pub tpot_ms: Option<u32>,
}

/// A workload file, as written. [`Workload::new`] checks it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Seed used when the driver is given none.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Stop planning at this time (seconds after the start).
    pub duration_s: Option<f64>,
    /// Stop after this many requests (all turns count).
    pub requests: Option<u64>,
    #[serde(default)]
    pub api: Api,
    /// Model name to request; drivers may override it.
    pub model: Option<String>,
    /// Send `x-expected-output-tokens` with the planned output length.
    #[serde(default)]
    pub send_expected_output_header: bool,
    /// Prompt plus output never exceed this (the engines' `max_model_len`): prompts are cut to
    /// fit, and a session ends when its history no longer fits.
    #[serde(default = "default_max_context")]
    pub max_context_tokens: u32,
    pub arrivals: ArrivalSpec,
    /// Prompt lengths (of the request's own part, excluding a shared prefix and session history).
    /// Optional only when a trace gives them.
    pub prompt: Option<LengthSpec>,
    /// Output lengths (`max_tokens`, sent with `ignore_eos`). Optional only when a trace gives them.
    pub output: Option<LengthSpec>,
    pub prefix: Option<PrefixSpec>,
    pub sessions: Option<SessionSpec>,
    /// Empty: every request is priority 2 with no SLA.
    #[serde(default)]
    pub priorities: Vec<PriorityClass>,
}

fn default_seed() -> u64 {
    DEFAULT_SEED
}

fn default_max_context() -> u32 {
    DEFAULT_MAX_CONTEXT_TOKENS
}

impl WorkloadSpec {
    /// Parses a workload file's text (not yet checked: see [`Workload::new`]).
    pub fn from_toml_str(text: &str) -> Result<Self, WorkloadError> {
        toml::from_str(text).map_err(|e| WorkloadError::Parse(e.to_string()))
    }

    /// Runs for `secs` seconds instead, whatever the file's duration and request count (before
    /// [`Workload::new`], so that a long trace cut short is accepted).
    pub fn set_duration(&mut self, secs: f64) -> Result<(), WorkloadError> {
        if !(secs.is_finite() && secs > 0.0 && secs <= MAX_DURATION_S) {
            return Err(invalid(format!(
                "duration must be in (0, {MAX_DURATION_S}] s, got {}",
                Num(secs)
            )));
        }
        self.duration_s = Some(secs);
        self.requests = None;
        Ok(())
    }

    /// The trace file the arrivals name, if any (relative to the workload file).
    pub fn trace_file(&self) -> Option<&str> {
        match &self.arrivals {
            ArrivalSpec::Trace { file, .. } => Some(file),
            _ => None,
        }
    }
}

/// Why a workload, fleet or trace file was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkloadError {
    /// Not valid TOML, or not the expected fields.
    Parse(String),
    /// Valid TOML, impossible values.
    Invalid(String),
    /// A bad trace CSV line (1-based).
    Trace { line: usize, message: String },
}

impl fmt::Display for WorkloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkloadError::Parse(m) => write!(f, "cannot parse: {m}"),
            WorkloadError::Invalid(m) => write!(f, "invalid: {m}"),
            WorkloadError::Trace { line, message } => write!(f, "trace line {line}: {message}"),
        }
    }
}

impl std::error::Error for WorkloadError {}

/// A number for a message: plain, or in exponent form when huge or tiny.
pub(crate) struct Num(pub f64);

impl fmt::Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = self.0.abs();
        if a.is_finite() && a != 0.0 && !(1e-6..1e9).contains(&a) {
            write!(f, "{:e}", self.0)
        } else {
            write!(f, "{}", self.0)
        }
    }
}

fn invalid(m: impl Into<String>) -> WorkloadError {
    WorkloadError::Invalid(m.into())
}

/// One row of a [`Trace`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceRow {
    /// Arrival, after the first row's.
    pub at: Micros,
    /// Prompt tokens, 0 when the trace has no prompt column.
    pub prompt_tokens: u32,
    /// Output tokens, 0 when the trace has no output column.
    pub output_tokens: u32,
}

/// Arrival times (and lengths) read from a CSV file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Trace {
    rows: Vec<TraceRow>,
    has_prompt: bool,
    has_output: bool,
}

impl Trace {
    /// Parses a CSV with a header line. Columns are found by name (case-insensitive, others
    /// ignored):
    ///
    /// * time: `timestamp_s`, `time_s`, `arrival_s` (seconds), or `timestamp`/`time` holding
    ///   seconds or a date-time `YYYY-MM-DD HH:MM:SS[.fraction]` (the Azure 2023 traces'
    ///   `TIMESTAMP`);
    /// * prompt (optional): `prompt_tokens`, `input_tokens`, `context_tokens`, `ContextTokens`;
    /// * output (optional): `output_tokens`, `generated_tokens`, `GeneratedTokens`.
    ///
    /// Times are taken relative to the first row and must not decrease.
    pub fn parse_csv(text: &str) -> Result<Trace, WorkloadError> {
        let mut lines = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty());
        let Some((_, header)) = lines.next() else {
            return Err(WorkloadError::Trace {
                line: 1,
                message: "empty trace".into(),
            });
        };
        let names: Vec<String> = header
            .split(',')
            .map(|h| h.trim().trim_matches('"').to_ascii_lowercase())
            .collect();
        let find = |cands: &[&str]| names.iter().position(|n| cands.contains(&n.as_str()));
        let time_col = find(&["timestamp_s", "time_s", "arrival_s", "timestamp", "time"])
            .ok_or_else(|| WorkloadError::Trace {
                line: 1,
                message: format!("no time column (timestamp_s, timestamp, ...) in `{header}`"),
            })?;
        let prompt_col = find(&[
            "prompt_tokens",
            "input_tokens",
            "context_tokens",
            "contexttokens",
        ]);
        let output_col = find(&["output_tokens", "generated_tokens", "generatedtokens"]);
        let mut rows = Vec::new();
        let mut first: Option<f64> = None;
        let mut prev = f64::NEG_INFINITY;
        for (i, line) in lines {
            let lineno = i + 1;
            let bad = |message: String| WorkloadError::Trace {
                line: lineno,
                message,
            };
            if rows.len() >= MAX_TRACE_ROWS {
                return Err(bad(format!("more than {MAX_TRACE_ROWS} rows")));
            }
            let fields: Vec<&str> = line
                .split(',')
                .map(|f| f.trim().trim_matches('"'))
                .collect();
            let field = |col: usize| {
                fields
                    .get(col)
                    .copied()
                    .ok_or_else(|| bad(format!("missing column {}", col + 1)))
            };
            let t = parse_time(field(time_col)?).ok_or_else(|| {
                bad(format!(
                    "`{}` is neither seconds nor YYYY-MM-DD HH:MM:SS",
                    fields[time_col]
                ))
            })?;
            if t < prev {
                return Err(bad(format!("time goes backwards ({t} after {prev})")));
            }
            prev = t;
            let t0 = *first.get_or_insert(t);
            let tokens = |col: Option<usize>| -> Result<u32, WorkloadError> {
                match col {
                    None => Ok(0),
                    Some(c) => {
                        let f = field(c)?;
                        f.parse::<u32>()
                            .map_err(|_| bad(format!("`{f}` is not a token count")))
                    }
                }
            };
            rows.push(TraceRow {
                at: ((t - t0) * MICROS_PER_SEC as f64).round() as Micros,
                prompt_tokens: tokens(prompt_col)?,
                output_tokens: tokens(output_col)?,
            });
        }
        if rows.is_empty() {
            return Err(WorkloadError::Trace {
                line: 2,
                message: "no rows".into(),
            });
        }
        Ok(Trace {
            rows,
            has_prompt: prompt_col.is_some(),
            has_output: output_col.is_some(),
        })
    }

    pub fn rows(&self) -> &[TraceRow] {
        &self.rows
    }

    /// Whether the trace gives prompt lengths.
    pub fn has_prompt(&self) -> bool {
        self.has_prompt
    }

    /// Whether the trace gives output lengths.
    pub fn has_output(&self) -> bool {
        self.has_output
    }
}

/// Seconds, or a `YYYY-MM-DD HH:MM:SS[.frac]` date-time as seconds since 1970 (UTC assumed).
fn parse_time(s: &str) -> Option<f64> {
    if let Ok(x) = s.parse::<f64>() {
        return x.is_finite().then_some(x);
    }
    let (date, time) = s.split_once([' ', 'T'])?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.trim_end_matches('Z').splitn(3, ':');
    let h = t.next()?.parse::<i64>().ok()?;
    let min = t.next()?.parse::<i64>().ok()?;
    let sec = t.next()?.parse::<f64>().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || !(0.0..61.0).contains(&sec) {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + min * 60) as f64 + sec)
}

/// A priority class ready to draw.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Class {
    priority: Priority,
    /// Cumulative share, in (0, 1].
    upto: f64,
    sla: Option<Sla>,
}

/// A checked workload, ready to [`generate`](Workload::generate) requests.
#[derive(Clone, Debug)]
pub struct Workload {
    spec: WorkloadSpec,
    trace: Option<Arc<Trace>>,
    prompt: Option<LengthDist>,
    output: Option<LengthDist>,
    classes: Vec<Class>,
}

impl Workload {
    /// Checks `spec`. `trace` is required when the arrivals are a trace (read the file
    /// [`WorkloadSpec::trace_file`] names and [`Trace::parse_csv`] it), and refused otherwise.
    pub fn new(spec: WorkloadSpec, trace: Option<Trace>) -> Result<Workload, WorkloadError> {
        match (&spec.arrivals, &trace) {
            (ArrivalSpec::Poisson { rate }, None) => check_rate(*rate)?,
            (ArrivalSpec::Gamma { rate, cv }, None) => {
                check_rate(*rate)?;
                if !(cv.is_finite() && *cv > 0.0 && *cv <= 1000.0) {
                    return Err(invalid(format!(
                        "gamma cv must be in (0, 1000], got {}",
                        Num(*cv)
                    )));
                }
            }
            (ArrivalSpec::Trace { file, speedup }, Some(_)) => {
                if !(speedup.is_finite() && *speedup > 0.0) {
                    return Err(invalid(format!(
                        "trace speedup must be > 0, got {}",
                        Num(*speedup)
                    )));
                }
                if file.is_empty() {
                    return Err(invalid("trace file name is empty"));
                }
            }
            (ArrivalSpec::Trace { file, .. }, None) => {
                return Err(invalid(format!(
                    "arrivals come from the trace `{file}`: load it and pass it in"
                )))
            }
            (_, Some(_)) => return Err(invalid("a trace was given but arrivals are not `trace`")),
        }
        if let Some(d) = spec.duration_s {
            if !(d.is_finite() && d > 0.0 && d <= MAX_DURATION_S) {
                return Err(invalid(format!(
                    "duration_s must be in (0, {MAX_DURATION_S}] s, got {}",
                    Num(d)
                )));
            }
        }
        if let Some(n) = spec.requests {
            if !(1..=MAX_REQUESTS).contains(&n) {
                return Err(invalid(format!(
                    "requests must be in 1..={MAX_REQUESTS}, got {n}"
                )));
            }
        }
        if !(2..=MAX_CONTEXT_TOKENS).contains(&spec.max_context_tokens) {
            return Err(invalid(format!(
                "max_context_tokens must be in 2..={MAX_CONTEXT_TOKENS}, got {}",
                spec.max_context_tokens
            )));
        }
        if spec.duration_s.is_none() && spec.requests.is_none() && trace.is_none() {
            return Err(invalid(
                "the workload never ends: give duration_s or requests",
            ));
        }
        let prefix_tokens = spec.prefix.as_ref().map_or(0, |p| p.tokens);
        if spec.max_context_tokens < prefix_tokens.saturating_add(2) {
            return Err(invalid(format!(
                "max_context_tokens ({}) leaves no room after the {prefix_tokens}-token prefix",
                spec.max_context_tokens
            )));
        }
        let dist = |spec: &Option<LengthSpec>, role, from_trace: bool, what: &str| match spec {
            Some(s) => s
                .resolve(role)
                .map(Some)
                .map_err(|e| invalid(format!("{what}: {e}"))),
            None if from_trace => Ok(None),
            None => Err(invalid(format!("{what} lengths are missing"))),
        };
        let prompt = dist(
            &spec.prompt,
            LengthRole::Prompt,
            trace.as_ref().is_some_and(|t| t.has_prompt),
            "prompt",
        )?;
        let output = dist(
            &spec.output,
            LengthRole::Output,
            trace.as_ref().is_some_and(|t| t.has_output),
            "output",
        )?;
        if let Some(p) = &spec.prefix {
            if p.groups == 0 || p.groups > MAX_PREFIX_GROUPS {
                return Err(invalid(format!(
                    "prefix groups must be in 1..={MAX_PREFIX_GROUPS}, got {}",
                    p.groups
                )));
            }
            if p.tokens == 0 {
                return Err(invalid("prefix tokens must be ≥ 1"));
            }
            check_share(p.share, "prefix share")?;
        }
        if let Some(s) = &spec.sessions {
            check_share(s.share, "sessions share")?;
            let (lo, hi) = match s.turns {
                Turns::Fixed(n) => (n, n),
                Turns::Range([a, b]) => (a, b),
            };
            if lo == 0 || hi < lo || hi > MAX_TURNS {
                return Err(invalid(format!(
                    "session turns must satisfy 1 ≤ min ≤ max ≤ {MAX_TURNS}, got {lo}..{hi}"
                )));
            }
            if !(s.think_time_s.is_finite()
                && s.think_time_s >= 0.0
                && s.think_time_s <= MAX_DURATION_S)
            {
                return Err(invalid(format!(
                    "think_time_s must be in [0, {MAX_DURATION_S}], got {}",
                    Num(s.think_time_s)
                )));
            }
        }
        let classes = priority_classes(&spec.priorities)?;
        if spec.model.as_deref() == Some("") {
            return Err(invalid("model is empty"));
        }
        let w = Workload {
            spec,
            trace: trace.map(Arc::new),
            prompt,
            output,
            classes,
        };
        w.check_extent()?;
        Ok(w)
    }

    /// Refuses plans too long or too large to run: more than [`MAX_REQUESTS`] requests expected,
    /// or longer than [`MAX_DURATION_S`].
    fn check_extent(&self) -> Result<(), WorkloadError> {
        let s = &self.spec;
        let (span, what) = match (&s.arrivals, s.duration_s, &self.trace) {
            (ArrivalSpec::Trace { speedup, .. }, d, Some(t)) => {
                let last = t.rows.last().map_or(0.0, |r| r.at as f64 / 1e6) / speedup;
                (d.map_or(last, |d| d.min(last)), "the trace at this speedup")
            }
            (_, Some(d), _) => (d, "duration"),
            (a, None, _) => {
                let n = s.requests.unwrap_or(0) as f64;
                (n / a.rate().unwrap_or(f64::INFINITY), "requests / rate")
            }
        };
        if span > MAX_DURATION_S {
            return Err(invalid(format!(
                "{what} spans {} s, more than {MAX_DURATION_S} s",
                Num(span)
            )));
        }
        if let (Some(rate), Some(d)) = (s.arrivals.rate(), s.duration_s) {
            let expected = (rate * d).min(s.requests.map_or(f64::INFINITY, |n| n as f64));
            if expected > MAX_REQUESTS as f64 {
                return Err(invalid(format!(
                    "rate × duration plans about {} requests, more than {MAX_REQUESTS}",
                    Num(expected.round())
                )));
            }
        }
        Ok(())
    }

    /// Parses and checks a workload file whose arrivals are not a trace.
    pub fn from_toml_str(text: &str) -> Result<Workload, WorkloadError> {
        Workload::new(WorkloadSpec::from_toml_str(text)?, None)
    }

    pub fn spec(&self) -> &WorkloadSpec {
        &self.spec
    }

    /// A warning when the typical request does not fit `max_context_tokens`: its prompt (with
    /// the shared prefix, if any) and output medians add up to more, so most requests are cut to
    /// fit (each keeps at least one token of question and answer) and the run measures shorter
    /// requests than the file describes. `None` when they fit.
    pub fn length_warning(&self) -> Option<String> {
        let median = |d: Option<LengthDist>| -> f64 {
            match d {
                None => 1.0,
                Some(LengthDist::Fixed(t)) => t as f64,
                Some(LengthDist::Uniform { min, max }) => (min as f64 + max as f64) / 2.0,
                Some(LengthDist::Lognormal { mu, min, max, .. }) => {
                    mu.exp().clamp(min as f64, max.max(min) as f64)
                }
            }
        };
        let prefix = self
            .spec
            .prefix
            .as_ref()
            .map_or(0.0, |p| p.tokens as f64 * p.share);
        let (prompt, output) = (median(self.prompt), median(self.output));
        let max = self.spec.max_context_tokens as f64;
        (prefix + prompt + output > max).then(|| {
            format!(
                "the typical request (prompt {prompt:.0}{}, output {output:.0} tokens) does not \
                 fit max_context_tokens = {max}: most requests are cut to fit",
                if prefix > 0.0 {
                    format!(" after a {prefix:.0}-token prefix")
                } else {
                    String::new()
                }
            )
        })
    }

    /// The mean rate of new arrivals, requests/s: the stated rate, or a trace's at its speed-up
    /// (its rows' mean inter-arrival time). `None` for a trace whose rows all arrive at once.
    pub fn arrival_rate(&self) -> Option<f64> {
        match (&self.spec.arrivals, &self.trace) {
            (ArrivalSpec::Trace { speedup, .. }, Some(t)) => {
                let span_s = t.rows.last().map_or(0.0, |r| r.at as f64 / 1e6);
                (t.rows.len() > 1 && span_s > 0.0)
                    .then(|| (t.rows.len() - 1) as f64 / span_s * speedup)
            }
            (arrivals, _) => arrivals.rate(),
        }
    }

    /// The file's name (may be empty).
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The file's seed.
    pub fn seed(&self) -> u64 {
        self.spec.seed
    }

    pub fn set_name(&mut self, name: impl Into<String>) {
        self.spec.name = name.into();
    }

    /// Runs for `secs` seconds instead, whatever the file's duration and request count.
    pub fn set_duration(&mut self, secs: f64) -> Result<(), WorkloadError> {
        let mut spec = self.spec.clone();
        spec.set_duration(secs)?;
        self.checked(spec)
    }

    /// Replaces the spec by `spec` if the result is still runnable.
    fn checked(&mut self, spec: WorkloadSpec) -> Result<(), WorkloadError> {
        let old = std::mem::replace(&mut self.spec, spec);
        let ok = match self.spec.arrivals.rate() {
            Some(rate) => check_rate(rate),
            None => Ok(()),
        }
        .and_then(|()| self.check_extent());
        if ok.is_err() {
            self.spec = old;
        }
        ok
    }

    /// Multiplies the arrival rate by `factor` (see [`ArrivalSpec::scale`]).
    pub fn scale_rate(&mut self, factor: f64) -> Result<(), WorkloadError> {
        if !(factor.is_finite() && factor > 0.0) {
            return Err(invalid(format!(
                "rate factor must be > 0, got {}",
                Num(factor)
            )));
        }
        let mut spec = self.spec.clone();
        spec.arrivals.scale(factor);
        self.checked(spec)
    }

    /// The planned requests for `seed`, in arrival order, generated lazily.
    pub fn generate(&self, seed: u64) -> Requests {
        let arrival_rng = SplitMix64::new(mix64(seed ^ SALT_ARRIVALS));
        let mut r = Requests {
            w: self.clone(),
            seed,
            arrival_rng,
            next_arrival: None,
            arrival_clock: 0.0,
            trace_pos: 0,
            arrivals: 0,
            pending: BinaryHeap::new(),
            seq: 0,
            emitted: 0,
            done: false,
            end: self
                .spec
                .duration_s
                .map(|d| (d * MICROS_PER_SEC as f64).round() as Micros),
        };
        r.next_arrival = r.draw_arrival();
        r
    }
}

fn check_rate(rate: f64) -> Result<(), WorkloadError> {
    if rate.is_finite() && rate > 0.0 && rate <= 1e7 {
        Ok(())
    } else {
        Err(invalid(format!(
            "rate must be in (0, 1e7] req/s, got {}",
            Num(rate)
        )))
    }
}

fn check_share(share: f64, what: &str) -> Result<(), WorkloadError> {
    if (0.0..=1.0).contains(&share) {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} must be in [0, 1], got {}",
            Num(share)
        )))
    }
}

fn priority_classes(classes: &[PriorityClass]) -> Result<Vec<Class>, WorkloadError> {
    if classes.is_empty() {
        return Ok(vec![Class {
            priority: Priority::DEFAULT,
            upto: 1.0,
            sla: None,
        }]);
    }
    let total: f64 = classes.iter().map(|c| c.share).sum();
    let mut out = Vec::with_capacity(classes.len());
    let mut acc = 0.0;
    for (i, c) in classes.iter().enumerate() {
        let priority = Priority::new(c.level)
            .ok_or_else(|| invalid(format!("priority level must be 1, 2 or 3, got {}", c.level)))?;
        if classes[..i].iter().any(|earlier| earlier.level == c.level) {
            // Two classes of one level would be reported as one, under two SLAs.
            return Err(invalid(format!(
                "priority level {} is given twice: one [[priorities]] entry per level",
                c.level
            )));
        }
        if !(c.share.is_finite() && c.share >= 0.0) {
            return Err(invalid(format!(
                "priority share must be ≥ 0, got {}",
                c.share
            )));
        }
        let sla = match (c.ttft_ms, c.tpot_ms) {
            (Some(ttft_ms), Some(tpot_ms)) => {
                for (key, ms) in [("ttft_ms", ttft_ms), ("tpot_ms", tpot_ms)] {
                    if !(1..=MAX_SLA_MS).contains(&ms) {
                        return Err(invalid(format!(
                            "priority {}: {key} must be in 1..={MAX_SLA_MS}, got {ms}",
                            c.level
                        )));
                    }
                }
                Some(Sla { ttft_ms, tpot_ms })
            }
            (None, None) => None,
            _ => {
                return Err(invalid(format!(
                    "priority {}: give both ttft_ms and tpot_ms, or neither",
                    c.level
                )))
            }
        };
        acc += c.share;
        out.push(Class {
            priority,
            upto: acc / total,
            sla,
        });
    }
    // Not normalized silently: a lone class of share 0.2 would get every request.
    if (total - 1.0).abs() > 1e-6 {
        return Err(invalid(format!(
            "priority shares must add up to 1, got {}",
            Num(total)
        )));
    }
    if let Some(last) = out.last_mut() {
        last.upto = 1.0;
    }
    Ok(out)
}

/// Which turn of which session a request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRef {
    /// Unique within one generated workload.
    pub id: u64,
    /// 0 for the first turn.
    pub turn: u32,
}

/// One request of a workload, as planned.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedRequest {
    /// 0, 1, 2, ... in arrival order.
    pub id: u64,
    /// When to send it, after the start of the run.
    pub at: Micros,
    /// Prompt text: `estimate_tokens(prompt) == prompt_tokens`.
    pub prompt: String,
    pub prompt_tokens: u32,
    /// Tokens to generate (`max_tokens`, with `ignore_eos`).
    pub output_tokens: u32,
    pub priority: Priority,
    pub sla: Option<Sla>,
    pub session: Option<SessionRef>,
    /// The shared-prefix group the prompt starts with.
    pub prefix_group: Option<u32>,
    /// Send `x-expected-output-tokens: output_tokens`.
    pub send_expected_header: bool,
}

const SALT_ARRIVALS: u64 = 0x6172_7269_7661_6c73;
const SALT_REQUEST: u64 = 0x7265_7175_6573_7473;
const SALT_PREFIX: u64 = 0x7072_6566_6978_6573;
const SALT_TEXT: u64 = 0x7465_7874_7465_7874;
const SALT_THINK: u64 = 0x7468_696e_6b74_696d;

/// The state of an open session between its turns.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Session {
    id: u64,
    /// Seed of everything this session draws.
    key: u64,
    turns: u32,
    priority: Priority,
    sla: Option<Sla>,
    group: Option<u32>,
    /// (question, answer) tokens of each past turn: the history, regenerated from `key`.
    past: Vec<(u32, u32)>,
}

/// A planned later turn, ordered by time then creation.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Pending {
    at: Micros,
    seq: u64,
    session: Session,
}

impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// A new arrival: its time and its trace row, if any.
#[derive(Clone, Copy, Debug)]
struct Arrival {
    at: Micros,
    seq: u64,
    row: Option<TraceRow>,
}

/// The iterator [`Workload::generate`] returns.
#[derive(Clone, Debug)]
pub struct Requests {
    w: Workload,
    seed: u64,
    arrival_rng: SplitMix64,
    next_arrival: Option<Arrival>,
    /// Seconds of the last drawn arrival (kept in f64 so gaps do not accumulate rounding).
    arrival_clock: f64,
    trace_pos: usize,
    /// New arrivals drawn so far.
    arrivals: u64,
    pending: BinaryHeap<Reverse<Pending>>,
    seq: u64,
    emitted: u64,
    done: bool,
    end: Option<Micros>,
}

impl Requests {
    /// Sessions waiting for their next turn (the generator's only growing state).
    pub fn open_sessions(&self) -> usize {
        self.pending.len()
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn draw_arrival(&mut self) -> Option<Arrival> {
        let at_s = match &self.w.spec.arrivals {
            ArrivalSpec::Poisson { rate } => {
                let gap = -(1.0 - self.arrival_rng.next_f64()).ln() / rate;
                self.arrival_clock += gap;
                self.arrival_clock
            }
            ArrivalSpec::Gamma { rate, cv } => {
                let shape = 1.0 / (cv * cv);
                let scale = 1.0 / (rate * shape);
                let gap = sample_gamma(&mut self.arrival_rng, shape) * scale;
                self.arrival_clock += gap;
                self.arrival_clock
            }
            ArrivalSpec::Trace { speedup, .. } => {
                let trace = self.w.trace.as_ref()?;
                let row = *trace.rows.get(self.trace_pos)?;
                self.trace_pos += 1;
                let at = (row.at as f64 / speedup).round() as Micros;
                let seq = self.next_seq();
                return Some(Arrival {
                    at,
                    seq,
                    row: Some(row),
                });
            }
        };
        let at = (at_s * MICROS_PER_SEC as f64).round().min(u64::MAX as f64) as Micros;
        let seq = self.next_seq();
        Some(Arrival { at, seq, row: None })
    }

    fn class(&self, rng: &mut SplitMix64) -> Class {
        let u = rng.next_f64();
        let cs = &self.w.classes;
        *cs.iter().find(|c| u < c.upto).unwrap_or(&cs[cs.len() - 1])
    }

    /// A new arrival becomes a request, and maybe opens a session.
    fn start(&mut self, a: Arrival) -> Option<PlannedRequest> {
        let index = self.arrivals;
        self.arrivals += 1;
        let key = mix64(self.seed ^ SALT_REQUEST ^ mix64(index));
        let mut rng = SplitMix64::new(key);
        let class = self.class(&mut rng);
        let group = self.w.spec.prefix.as_ref().and_then(|p| {
            rng.chance(p.share)
                .then(|| (rng.next_u64() % p.groups as u64) as u32)
        });
        let turns = match &self.w.spec.sessions {
            Some(s) if rng.chance(s.share) => match s.turns {
                Turns::Fixed(n) => n,
                Turns::Range([lo, hi]) => lo + (rng.next_u64() % (hi - lo + 1) as u64) as u32,
            },
            _ => 1,
        };
        let row = a.row.unwrap_or(TraceRow {
            at: a.at,
            prompt_tokens: 0,
            output_tokens: 0,
        });
        let question = match (self.w.prompt, row.prompt_tokens) {
            (Some(d), 0) => d.sample(&mut rng),
            (None, 0) => 1,
            (_, n) => n,
        };
        let answer = match (self.w.output, row.output_tokens) {
            (Some(d), 0) => d.sample(&mut rng),
            (None, 0) => 1,
            (_, n) => n,
        };
        let prefix = self.prefix_tokens(group);
        let max = self.w.spec.max_context_tokens;
        // Fit prefix + question + answer into the context, keeping at least one token of each.
        let answer = answer.min(max - prefix - 1).max(1);
        let question = question.min(max - prefix - answer).max(1);
        let session = (turns > 1).then(|| Session {
            id: index,
            key,
            turns,
            priority: class.priority,
            sla: class.sla,
            group,
            past: Vec::new(),
        });
        let req = self.build(
            a.at,
            class.priority,
            class.sla,
            group,
            session.as_ref().map(|s| (s, 0)),
            key,
            question,
            answer,
        );
        if let Some(mut s) = session {
            s.past.push((question, answer));
            self.schedule(a.at, s);
        }
        Some(req)
    }

    /// Plans the next turn of `s`, whose previous turn was sent at `prev`.
    fn schedule(&mut self, prev: Micros, s: Session) {
        let turn = s.past.len() as u32;
        if turn >= s.turns {
            return;
        }
        let mut rng = SplitMix64::new(mix64(s.key ^ mix64(turn as u64 ^ SALT_THINK)));
        let mean = self
            .w
            .spec
            .sessions
            .as_ref()
            .map_or(0.0, |x| x.think_time_s);
        let think = -(1.0 - rng.next_f64()).ln() * mean;
        let at = prev.saturating_add((think * MICROS_PER_SEC as f64).round() as Micros);
        if self.end.is_some_and(|end| at >= end) {
            return;
        }
        let seq = self.next_seq();
        self.pending.push(Reverse(Pending {
            at,
            seq,
            session: s,
        }));
    }

    /// A later turn of a session: the history plus a new question, if it still fits.
    fn continue_session(&mut self, p: Pending) -> Option<PlannedRequest> {
        let mut s = p.session;
        let turn = s.past.len() as u32;
        let mut rng = SplitMix64::new(mix64(s.key ^ mix64(turn as u64)));
        let question = self.w.prompt.map_or(1, |d| d.sample(&mut rng));
        let answer = self.w.output.map_or(1, |d| d.sample(&mut rng));
        let history: u64 = s.past.iter().map(|&(q, a)| q as u64 + a as u64).sum();
        let total = self.prefix_tokens(s.group) as u64 + history + question as u64 + answer as u64;
        if total > self.w.spec.max_context_tokens as u64 {
            // The conversation outgrew the context window: it ends here.
            return None;
        }
        let req = self.build(
            p.at,
            s.priority,
            s.sla,
            s.group,
            Some((&s, turn)),
            s.key,
            question,
            answer,
        );
        s.past.push((question, answer));
        self.schedule(p.at, s);
        Some(req)
    }

    fn prefix_tokens(&self, group: Option<u32>) -> u32 {
        match (group, &self.w.spec.prefix) {
            (Some(_), Some(p)) => p.tokens,
            _ => 0,
        }
    }

    /// Assembles the prompt: [group prefix] [history of the session] [this question].
    #[allow(clippy::too_many_arguments)]
    fn build(
        &self,
        at: Micros,
        priority: Priority,
        sla: Option<Sla>,
        group: Option<u32>,
        session: Option<(&Session, u32)>,
        key: u64,
        question: u32,
        answer: u32,
    ) -> PlannedRequest {
        let prefix = self.prefix_tokens(group);
        let history: u32 = session.map_or(0, |(s, _)| s.past.iter().map(|&(q, a)| q + a).sum());
        let tokens = prefix + history + question;
        let mut text = String::with_capacity(tokens as usize * qoe_core::prompt::BYTES_PER_TOKEN);
        if let Some(g) = group {
            push_text(
                &mut text,
                mix64(self.seed ^ SALT_PREFIX ^ mix64(g as u64)),
                prefix,
            );
        }
        let turn = session.map_or(0, |(_, t)| t);
        if let Some((s, _)) = session {
            for (j, &(q, a)) in s.past.iter().enumerate() {
                push_text(&mut text, segment_key(key, j as u32, 0), q);
                push_text(&mut text, segment_key(key, j as u32, 1), a);
            }
        }
        push_text(&mut text, segment_key(key, turn, 0), question);
        debug_assert_eq!(qoe_core::prompt::estimate_tokens(&text), tokens);
        PlannedRequest {
            id: self.emitted,
            at,
            prompt: text,
            prompt_tokens: tokens,
            output_tokens: answer,
            priority,
            sla,
            session: session.map(|(s, t)| SessionRef { id: s.id, turn: t }),
            prefix_group: group,
            send_expected_header: self.w.spec.send_expected_output_header,
        }
    }
}

impl Iterator for Requests {
    type Item = PlannedRequest;

    fn next(&mut self) -> Option<PlannedRequest> {
        // Each round emits a request or consumes an event; ending sessions consume pending
        // events without emitting, so the loop is bounded by the pending queue's length + 1.
        while !self.done {
            if self.w.spec.requests.is_some_and(|cap| self.emitted >= cap) {
                self.done = true;
                break;
            }
            let pending_first = match (&self.next_arrival, self.pending.peek()) {
                (None, None) => {
                    self.done = true;
                    break;
                }
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some(a), Some(Reverse(p))) => (p.at, p.seq) < (a.at, a.seq),
            };
            let at = if pending_first {
                self.pending.peek().map(|Reverse(p)| p.at)
            } else {
                self.next_arrival.map(|a| a.at)
            };
            if let (Some(at), Some(end)) = (at, self.end) {
                if at >= end {
                    // Everything else is later still.
                    self.done = true;
                    break;
                }
            }
            let planned = if pending_first {
                let Reverse(p) = self.pending.pop().expect("peeked");
                self.continue_session(p)
            } else {
                let a = self.next_arrival.take().expect("peeked");
                self.next_arrival = self.draw_arrival();
                self.start(a)
            };
            if let Some(r) = planned {
                self.emitted += 1;
                return Some(r);
            }
        }
        None
    }
}

fn segment_key(key: u64, turn: u32, part: u64) -> u64 {
    mix64(key ^ SALT_TEXT ^ mix64(((turn as u64) << 1) | part))
}

/// Lowercase letters and spaces, looking vaguely like words (a space about one byte in six).
const ALPHABET: &[u8; 32] = b"etaoinshrdlucmfwypvbgkjqxz   eao";

/// Appends exactly `tokens × BYTES_PER_TOKEN` bytes of ASCII text drawn from `seed`.
fn push_text(out: &mut String, seed: u64, tokens: u32) {
    let n = tokens as usize * qoe_core::prompt::BYTES_PER_TOKEN;
    let mut rng = SplitMix64::new(seed);
    let mut bytes = Vec::with_capacity(n);
    while bytes.len() < n {
        let mut x = rng.next_u64();
        for _ in 0..12.min(n - bytes.len()) {
            bytes.push(ALPHABET[(x & 31) as usize]);
            x >>= 5;
        }
    }
    // Only ASCII bytes were pushed.
    out.push_str(std::str::from_utf8(&bytes).expect("ASCII"));
}

/// A Gamma(shape, 1) draw: Marsaglia and Tsang (2000) for shape ≥ 1, and for shape < 1 the
/// boost `G(a) = G(a + 1)·U^(1/a)`, computed in logarithms so tiny shapes (CV 13 gives 0.0057)
/// neither underflow wrongly nor lose the rare huge gaps.
fn sample_gamma(rng: &mut SplitMix64, shape: f64) -> f64 {
    if shape < 1.0 {
        let g = sample_gamma(rng, shape + 1.0);
        let u = 1.0 - rng.next_f64(); // (0, 1]
        return (g.ln() + u.ln() / shape).exp();
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    // Acceptance is above 95%; the bound only guards against a broken random source.
    for _ in 0..1000 {
        let x = rng.next_normal();
        let v = 1.0 + c * x;
        if v <= 0.0 {
            continue;
        }
        let v = v * v * v;
        let u = 1.0 - rng.next_f64();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
    shape
}

/// `ms` milliseconds in [`Micros`].
pub fn ms_to_micros(ms: f64) -> Micros {
    (ms * MICROS_PER_MS as f64).round().max(0.0) as Micros
}

#[cfg(test)]
mod tests {
    use super::*;
    use qoe_core::prompt::estimate_tokens;

    fn base(extra: &str) -> String {
        format!(
            "name = \"t\"\nrequests = 2000\n[arrivals]\nkind = \"poisson\"\nrate = 10\n\
             [prompt]\nkind = \"fixed\"\ntokens = 20\n[output]\nkind = \"fixed\"\ntokens = 5\n{extra}"
        )
    }

    fn gaps(w: &Workload, seed: u64) -> Vec<f64> {
        let times: Vec<f64> = w.generate(seed).map(|r| r.at as f64 / 1e6).collect();
        times.windows(2).map(|p| p[1] - p[0]).collect()
    }

    fn mean_cv(xs: &[f64]) -> (f64, f64) {
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt() / mean)
    }

    fn quantile(xs: &mut [u32], q: f64) -> f64 {
        xs.sort_unstable();
        xs[((xs.len() as f64 * q) as usize).min(xs.len() - 1)] as f64
    }

    #[test]
    fn poisson_rate_and_cv() {
        let w = Workload::from_toml_str(
            "requests = 100000\n[arrivals]\nkind = \"poisson\"\nrate = 50\n\
             [prompt]\nkind = \"fixed\"\ntokens = 1\n[output]\nkind = \"fixed\"\ntokens = 1\n",
        )
        .unwrap();
        let (mean, cv) = mean_cv(&gaps(&w, 3));
        assert!((mean - 0.02).abs() / 0.02 < 0.02, "mean gap {mean}");
        assert!((cv - 1.0).abs() < 0.03, "cv {cv}");
    }

    #[test]
    fn gamma_rate_and_cv() {
        for (rate, cv_want) in [(20.0, 3.0), (5.0, 0.5)] {
            let w = Workload::from_toml_str(&format!(
                "requests = 200000\n[arrivals]\nkind = \"gamma\"\nrate = {rate}\ncv = {cv_want}\n\
                 [prompt]\nkind = \"fixed\"\ntokens = 1\n[output]\nkind = \"fixed\"\ntokens = 1\n"
            ))
            .unwrap();
            let (mean, cv) = mean_cv(&gaps(&w, 11));
            assert!(
                (mean * rate - 1.0).abs() < 0.05,
                "rate {rate}: mean gap {mean}"
            );
            assert!((cv / cv_want - 1.0).abs() < 0.08, "cv {cv} vs {cv_want}");
        }
    }

    #[test]
    fn very_bursty_gamma_keeps_its_mean() {
        // Azure code's CV 13.2: the sample mean converges slowly, so a loose bound.
        let mut r = SplitMix64::new(5);
        let shape = 1.0 / (13.2f64 * 13.2);
        let n = 400_000;
        let mean = (0..n).map(|_| sample_gamma(&mut r, shape)).sum::<f64>() / n as f64;
        assert!((mean / shape - 1.0).abs() < 0.25, "{mean} vs {shape}");
    }

    #[test]
    fn lognormal_matches_median_and_p90() {
        let spec = LengthSpec::Lognormal {
            median: 1020.0,
            p90: 2734.0,
            min: None,
            max: None,
        };
        let d = spec.resolve(LengthRole::Prompt).unwrap();
        let mut r = SplitMix64::new(9);
        let mut xs: Vec<u32> = (0..100_000).map(|_| d.sample(&mut r)).collect();
        let med = quantile(&mut xs, 0.5);
        let p90 = quantile(&mut xs, 0.9);
        assert!((med / 1020.0 - 1.0).abs() < 0.03, "median {med}");
        assert!((p90 / 2734.0 - 1.0).abs() < 0.03, "p90 {p90}");
    }

    #[test]
    fn presets_follow_their_traces() {
        for (preset, role, (m, p)) in [
            (
                TracePreset::AzureConversation,
                LengthRole::Output,
                (129.0, 424.0),
            ),
            (TracePreset::AzureCode, LengthRole::Prompt, (1469.0, 5188.0)),
            (TracePreset::Sharegpt, LengthRole::Prompt, (130.0, 470.0)),
        ] {
            let d = LengthSpec::Preset {
                trace: preset,
                min: None,
                max: None,
            }
            .resolve(role)
            .unwrap();
            let mut r = SplitMix64::new(1);
            let mut xs: Vec<u32> = (0..100_000).map(|_| d.sample(&mut r)).collect();
            let med = quantile(&mut xs, 0.5);
            let p90 = quantile(&mut xs, 0.9);
            assert!((med / m - 1.0).abs() < 0.04, "{preset:?} median {med}");
            assert!((p90 / p - 1.0).abs() < 0.04, "{preset:?} p90 {p90}");
        }
        // ShareGPT's published means are what the σ = 1 assumption reproduces.
        let d = LengthSpec::Preset {
            trace: TracePreset::Sharegpt,
            min: None,
            max: None,
        }
        .resolve(LengthRole::Output)
        .unwrap();
        let mut r = SplitMix64::new(2);
        let mean = (0..200_000).map(|_| d.sample(&mut r) as f64).sum::<f64>() / 200_000.0;
        assert!((mean / 195.0 - 1.0).abs() < 0.05, "mean {mean}");
    }

    #[test]
    fn uniform_and_fixed() {
        let d = LengthSpec::Uniform { min: 10, max: 20 }
            .resolve(LengthRole::Prompt)
            .unwrap();
        let mut r = SplitMix64::new(4);
        let xs: Vec<u32> = (0..50_000).map(|_| d.sample(&mut r)).collect();
        assert!(xs.iter().all(|x| (10..=20).contains(x)));
        assert!(xs.contains(&10) && xs.contains(&20));
        let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / xs.len() as f64;
        assert!((mean - 15.0).abs() < 0.1, "{mean}");
        assert_eq!(
            LengthSpec::Fixed { tokens: 7 }
                .resolve(LengthRole::Output)
                .unwrap()
                .sample(&mut r),
            7
        );
        assert!(LengthSpec::Uniform { min: 5, max: 4 }
            .resolve(LengthRole::Prompt)
            .is_err());
        assert!(LengthSpec::Lognormal {
            median: 10.0,
            p90: 5.0,
            min: None,
            max: None
        }
        .resolve(LengthRole::Prompt)
        .is_err());
    }

    #[test]
    fn deterministic_for_a_seed() {
        let w = Workload::from_toml_str(&base(
            "[prefix]\ngroups = 3\ntokens = 40\nshare = 0.5\n\
             [sessions]\nshare = 0.5\nturns = [2, 4]\nthink_time_s = 1\n\
             [[priorities]]\nlevel = 1\nshare = 0.5\nttft_ms = 100\ntpot_ms = 50\n\
             [[priorities]]\nlevel = 3\nshare = 0.5\n",
        ))
        .unwrap();
        let a: Vec<_> = w.generate(5).take(500).collect();
        let b: Vec<_> = w.generate(5).take(500).collect();
        assert_eq!(a, b);
        let c: Vec<_> = w.generate(6).take(500).collect();
        assert_ne!(a, c);
        // Ordered in time, ids in order, every prompt's estimate is its planned length.
        for (i, r) in a.iter().enumerate() {
            assert_eq!(r.id, i as u64);
            assert_eq!(estimate_tokens(&r.prompt), r.prompt_tokens);
            assert!(r.prompt_tokens + r.output_tokens <= 8192);
        }
        assert!(a.windows(2).all(|p| p[0].at <= p[1].at));
        // Both classes appear, with their SLA or none.
        assert!(a
            .iter()
            .any(|r| r.priority == Priority::HIGH && r.sla.is_some()));
        assert!(a
            .iter()
            .any(|r| r.priority == Priority::LOW && r.sla.is_none()));
    }

    #[test]
    fn shared_prefixes_are_byte_identical() {
        let w = Workload::from_toml_str(&base("[prefix]\ngroups = 4\ntokens = 64\nshare = 0.75\n"))
            .unwrap();
        let reqs: Vec<_> = w.generate(1).take(400).collect();
        let prefix_bytes = 64 * qoe_core::prompt::BYTES_PER_TOKEN;
        let mut seen: std::collections::HashMap<u32, String> = Default::default();
        let mut with = 0;
        for r in &reqs {
            match r.prefix_group {
                Some(g) => {
                    with += 1;
                    assert_eq!(r.prompt_tokens, 64 + 20);
                    let p = &r.prompt[..prefix_bytes];
                    let first = seen.entry(g).or_insert_with(|| p.to_string());
                    assert_eq!(first, p, "group {g}");
                }
                None => assert_eq!(r.prompt_tokens, 20),
            }
        }
        assert_eq!(seen.len(), 4);
        let share = with as f64 / reqs.len() as f64;
        assert!((share - 0.75).abs() < 0.07, "{share}");
        // Different groups differ, and the parts after the prefix differ between requests.
        let prefixes: std::collections::HashSet<_> = seen.values().collect();
        assert_eq!(prefixes.len(), 4);
        let tails: std::collections::HashSet<_> = reqs
            .iter()
            .map(|r| r.prompt[r.prompt.len() - 80..].to_string())
            .collect();
        assert_eq!(tails.len(), reqs.len());
        // Same group, same prefix blocks for the router's prefix index.
        let g0: Vec<_> = reqs.iter().filter(|r| r.prefix_group == Some(0)).collect();
        let h0 = qoe_core::prompt::prefix_block_hashes(g0[0].prompt.as_bytes(), 64);
        let h1 = qoe_core::prompt::prefix_block_hashes(g0[1].prompt.as_bytes(), 64);
        assert_eq!(h0[..4], h1[..4]);
    }

    #[test]
    fn sessions_resend_their_history() {
        let w = Workload::from_toml_str(&base(
            "[prefix]\ngroups = 1\ntokens = 16\nshare = 1\n\
             [sessions]\nturns = 3\nthink_time_s = 2\n",
        ))
        .unwrap();
        let reqs: Vec<_> = w.generate(2).take(300).collect();
        let mut by_session: std::collections::BTreeMap<u64, Vec<&PlannedRequest>> =
            Default::default();
        for r in &reqs {
            by_session.entry(r.session.unwrap().id).or_default().push(r);
        }
        let mut checked = 0;
        for turns in by_session.values() {
            for pair in turns.windows(2) {
                let (a, b) = (pair[0], pair[1]);
                assert_eq!(b.session.unwrap().turn, a.session.unwrap().turn + 1);
                assert!(b.at >= a.at);
                // The earlier prompt is a prefix of the later one, followed by the answer.
                assert!(b.prompt.starts_with(&a.prompt));
                assert_eq!(b.prompt_tokens, a.prompt_tokens + a.output_tokens + 20);
                assert_eq!(b.priority, a.priority);
                checked += 1;
            }
        }
        assert!(checked > 100, "{checked}");
        assert!(w.generate(2).take(300).all(|r| r.session.unwrap().turn < 3));
    }

    #[test]
    fn sessions_end_when_the_context_is_full() {
        let text = format!(
            "max_context_tokens = 100\n{}",
            base("[sessions]\nturns = 50\nthink_time_s = 0.1\n")
        );
        let w = Workload::from_toml_str(&text).unwrap();
        // 25 tokens per turn: turn 3 would need 3·25 + 25 = 100, turn 4 does not fit.
        for r in w.generate(1).take(200) {
            assert!(r.session.unwrap().turn <= 3);
            assert!(r.prompt_tokens + r.output_tokens <= 100);
        }
    }

    #[test]
    fn duration_and_count_bound_the_plan() {
        let mut w = Workload::from_toml_str(&base("")).unwrap();
        assert_eq!(w.generate(1).count(), 2000);
        w.set_duration(3.0).unwrap();
        let reqs: Vec<_> = w.generate(1).collect();
        assert!(reqs.iter().all(|r| r.at < 3_000_000));
        assert!((15..=50).contains(&reqs.len()), "{}", reqs.len());
        w.scale_rate(10.0).unwrap();
        let n = w.generate(1).count();
        assert!((240..=360).contains(&n), "{n}");
    }

    #[test]
    fn long_prompts_are_cut_to_the_context() {
        let w = Workload::from_toml_str(
            "requests = 50\nmax_context_tokens = 300\n[arrivals]\nkind = \"poisson\"\nrate = 1\n\
             [prompt]\nkind = \"fixed\"\ntokens = 1000\n[output]\nkind = \"fixed\"\ntokens = 500\n\
             [prefix]\ngroups = 1\ntokens = 100\nshare = 1\n",
        )
        .unwrap();
        for r in w.generate(1) {
            assert_eq!(r.prompt_tokens, 101);
            assert_eq!(r.output_tokens, 199);
        }
    }

    #[test]
    fn a_typical_request_that_does_not_fit_the_context_is_warned_of() {
        let w =
            |text: &str| Workload::new(WorkloadSpec::from_toml_str(text).unwrap(), None).unwrap();
        assert_eq!(w(&base("")).length_warning(), None);
        let long = base("").replace("tokens = 20", "tokens = 9000");
        let warning = w(&long).length_warning().unwrap();
        assert!(
            warning.contains("prompt 9000") && warning.contains("8192"),
            "{warning}"
        );
        // With a shared prefix that leaves too little room.
        let prefixed = w(&format!(
            "max_context_tokens = 100\n{}",
            base("[prefix]\ngroups = 2\ntokens = 90\nshare = 1.0\n")
        ));
        assert!(prefixed
            .length_warning()
            .unwrap()
            .contains("90-token prefix"));
    }

    #[test]
    fn traces_drive_arrivals_and_lengths() {
        let csv = "TIMESTAMP,ContextTokens,GeneratedTokens\n\
                   2023-11-16 18:15:46.6805900,374,44\n\
                   2023-11-16 18:15:50.9951690,396,109\n\
                   2023-11-16 18:15:51.0000000,879,34\n";
        let trace = Trace::parse_csv(csv).unwrap();
        assert!(trace.has_prompt() && trace.has_output());
        let spec = WorkloadSpec::from_toml_str(
            "[arrivals]\nkind = \"trace\"\nfile = \"t.csv\"\nspeedup = 2\n",
        )
        .unwrap();
        assert_eq!(spec.trace_file(), Some("t.csv"));
        assert!(Workload::new(spec.clone(), None).is_err());
        let w = Workload::new(spec, Some(trace)).unwrap();
        let reqs: Vec<_> = w.generate(1).collect();
        assert_eq!(reqs.len(), 3);
        assert_eq!(reqs[0].at, 0);
        // 4.314579 s at speedup 2.
        assert!(reqs[1].at.abs_diff(2_157_290) <= 1, "{}", reqs[1].at);
        assert_eq!((reqs[2].prompt_tokens, reqs[2].output_tokens), (879, 34));

        let plain = Trace::parse_csv("timestamp_s\n0.5\n1.5\n").unwrap();
        assert_eq!(plain.rows()[1].at, 1_000_000);
        assert!(!plain.has_prompt());
        let err = Trace::parse_csv("timestamp_s\n2\n1\n").unwrap_err();
        assert!(matches!(err, WorkloadError::Trace { line: 3, .. }), "{err}");
        assert!(Trace::parse_csv("foo,bar\n1,2\n").is_err());
        // Without lengths in the trace, the distributions are required.
        let spec =
            WorkloadSpec::from_toml_str("[arrivals]\nkind = \"trace\"\nfile = \"t\"\n").unwrap();
        assert!(Workload::new(spec, Some(plain)).is_err());
    }

    #[test]
    fn bad_files_explain_themselves() {
        let cases = [
            ("[arrivals]\nkind = \"poisson\"\nrate = 1\n", "never ends"),
            (
                "requests = 1\n[arrivals]\nkind = \"poisson\"\nrate = 0\n",
                "rate",
            ),
            (
                "requests = 1\n[arrivals]\nkind = \"zipf\"\nrate = 1\n",
                "zipf",
            ),
            (
                "requests = 1\nreqests = 2\n[arrivals]\nkind = \"poisson\"\nrate = 1\n",
                "reqests",
            ),
            (
                "requests = 1\n[arrivals]\nkind = \"poisson\"\nrate = 1\nburst = 2\n",
                "burst",
            ),
        ];
        for (text, want) in cases {
            let err = Workload::from_toml_str(text).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        let err =
            Workload::from_toml_str(&base("[[priorities]]\nlevel = 4\nshare = 1\n")).unwrap_err();
        assert!(err.to_string().contains("1, 2 or 3"), "{err}");
        let err = Workload::from_toml_str(&base(
            "[[priorities]]\nlevel = 2\nshare = 0.5\n[[priorities]]\nlevel = 2\nshare = 0.5\n",
        ))
        .unwrap_err();
        assert!(err.to_string().contains("level 2 is given twice"), "{err}");
        let err =
            Workload::from_toml_str(&base("[[priorities]]\nlevel = 1\nshare = 1\nttft_ms = 5\n"))
                .unwrap_err();
        assert!(err.to_string().contains("both"), "{err}");
    }

    #[test]
    fn absurd_values_are_refused() {
        let head = |top: &str, rate: &str| {
            format!(
                "{top}\n[arrivals]\nkind = \"poisson\"\nrate = {rate}\n\
                 [prompt]\nkind = \"fixed\"\ntokens = 2\n[output]\nkind = \"fixed\"\ntokens = 1\n"
            )
        };
        let sla = |ttft: u32, tpot: u32| {
            base(&format!(
                "[[priorities]]\nlevel = 1\nshare = 1\nttft_ms = {ttft}\ntpot_ms = {tpot}\n"
            ))
        };
        let cases = [
            // The engine's analyzer refuses these SLAs: they must not reach it.
            (sla(0, 50), "ttft_ms must be in 1..=3600000"),
            (sla(4_000_000_000, 50), "ttft_ms"),
            (sla(100, 0), "tpot_ms"),
            // Prompts are built in memory.
            (
                format!("max_context_tokens = 4000000000\n{}", base("")),
                "max_context_tokens must be in",
            ),
            (head("duration_s = 1e12", "1"), "duration_s must be in"),
            (head("duration_s = 1e308", "1"), "got 1e308"),
            (head("requests = 1000000000000", "1"), "requests must be in"),
            (head("requests = 10", "1e-9"), "requests / rate spans"),
            (head("duration_s = 1e6", "1e6"), "plans about 1e12 requests"),
            (
                base("[sessions]\nturns = 2\nthink_time_s = 1e300\n"),
                "think_time_s",
            ),
            (
                base("[[priorities]]\nlevel = 1\nshare = 1e308\n[[priorities]]\nlevel = 2\nshare = 1e308\n"),
                "got inf",
            ),
            (
                base("[[priorities]]\nlevel = 1\nshare = 0.2\n[[priorities]]\nlevel = 2\nshare = 0.2\n"),
                "must add up to 1, got 0.4",
            ),
        ];
        for (text, want) in cases {
            let err = Workload::from_toml_str(&text).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
        // Flags are held to the same bounds, and a refused change changes nothing.
        let mut w = Workload::from_toml_str(&head("duration_s = 10", "5")).unwrap();
        assert!(w.scale_rate(1e7).unwrap_err().to_string().contains("1e7"));
        assert!(w.set_duration(1e12).is_err());
        w.scale_rate(1e5).unwrap();
        assert!(w
            .set_duration(1e6)
            .unwrap_err()
            .to_string()
            .contains("plans about"));
        assert_eq!(
            (w.spec().duration_s, w.spec().arrivals.rate()),
            (Some(10.0), Some(5e5))
        );
    }

    #[test]
    fn a_trace_may_span_at_most_the_longest_run() {
        let trace = Trace::parse_csv("timestamp_s\n0\n1\n2000000\n").unwrap();
        let mut spec = WorkloadSpec::from_toml_str(
            "[arrivals]\nkind = \"trace\"\nfile = \"t\"\n\
             [prompt]\nkind = \"fixed\"\ntokens = 2\n[output]\nkind = \"fixed\"\ntokens = 1\n",
        )
        .unwrap();
        let err = Workload::new(spec.clone(), Some(trace.clone())).unwrap_err();
        assert!(err.to_string().contains("spans 2000000 s"), "{err}");
        // Cut short before the check, it runs.
        spec.set_duration(5.0).unwrap();
        let w = Workload::new(spec, Some(trace)).unwrap();
        assert_eq!(w.generate(1).count(), 2);
    }

    #[test]
    fn generation_is_lazy() {
        let w = Workload::from_toml_str(
            "requests = 100000000\n[arrivals]\nkind = \"poisson\"\nrate = 1000\n\
             [prompt]\nkind = \"fixed\"\ntokens = 4\n[output]\nkind = \"fixed\"\ntokens = 1\n\
             [sessions]\nshare = 0.5\nturns = 3\nthink_time_s = 1\n",
        )
        .unwrap();
        let mut it = w.generate(1);
        let mut max_open = 0;
        for _ in 0..20_000 {
            it.next().unwrap();
            max_open = max_open.max(it.open_sessions());
        }
        // About rate × share × think time × turns sessions wait at once, not all of them.
        assert!(max_open < 2_000, "{max_open}");
    }

    #[test]
    fn date_times_parse() {
        assert_eq!(parse_time("1970-01-01 00:00:00"), Some(0.0));
        assert_eq!(parse_time("1970-01-02T00:00:01Z"), Some(86_401.0));
        assert_eq!(parse_time("2000-03-01 00:00:00"), Some(951_868_800.0));
        assert_eq!(parse_time("12.5"), Some(12.5));
        assert_eq!(parse_time("yesterday"), None);
    }
}
