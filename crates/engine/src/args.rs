//! Command-line options of `qoe-router engine`, named after vLLM's where vLLM has the option.

use crate::driver::DEFAULT_CATCH_UP_LIMIT;
use crate::faults::Faults;
use clap::{Args, ValueEnum};
use qoe_sim::{EngineConfig, Profile, Scheduling, PROFILE_NAMES};
use serde::Serialize;

/// What the engine does in disaggregated serving (FIELD-NOTES, "Disaggregated prefill").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Computes prompts and hands their KV over: accepts `kv_transfer_params.do_remote_decode`.
    Prefill,
    /// Receives KV from a prefill engine: accepts `kv_transfer_params.do_remote_prefill`.
    Decode,
    /// Ordinary serving; accepts both stages too (vLLM's `kv_both`).
    #[default]
    Both,
}

impl From<Role> for qoe_core::Role {
    fn from(r: Role) -> Self {
        match r {
            Role::Prefill => qoe_core::Role::Prefill,
            Role::Decode => qoe_core::Role::Decode,
            Role::Both => qoe_core::Role::Both,
        }
    }
}

/// Options of a simulated vLLM engine.
#[derive(Args, Clone, Debug)]
pub struct EngineArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Served model name(s); the first one labels `/metrics`.
    #[arg(long = "model", num_args = 1.., value_delimiter = ',', default_value = "sim-llama")]
    pub models: Vec<String>,
    /// Hardware profile of the engine model.
    #[arg(long, default_value = "h100-llama3-8b", value_parser = parse_profile)]
    pub profile: String,
    /// Speed factor: 2.0 runs every iteration twice as fast.
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Lognormal jitter of iteration times (0.05 ≈ ±5%).
    #[arg(long, default_value_t = 0.0)]
    pub jitter: f64,
    /// Seed of jitter, output lengths and faults.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most sequences in one batch.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: u32,
    /// Token budget of one iteration (chunked prefill).
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: u32,
    /// Most requests waiting in the engine; more are refused with 503.
    #[arg(long, default_value_t = 65_536)]
    pub max_num_queued_reqs: u32,
    /// KV-cache capacity in tokens [default: the profile's].
    #[arg(long)]
    pub kv_capacity_tokens: Option<u64>,
    /// Longest prompt + output in tokens [default: the profile's].
    #[arg(long)]
    pub max_model_len: Option<u32>,
    /// `fcfs`, or `priority` (the request's `priority` field, lower first).
    #[arg(long, default_value = "fcfs")]
    pub scheduling_policy: Scheduling,
    /// Disables the prefix cache.
    #[arg(long)]
    pub no_enable_prefix_caching: bool,
    /// Role in disaggregated serving.
    #[arg(long, value_enum, default_value_t = Role::Both)]
    pub role: Role,
    /// Also export vLLM V0 metric names (`vllm:gpu_cache_usage_perc`, ...).
    #[arg(long)]
    pub v0_metrics: bool,
    /// Median output length when `ignore_eos` is not set (lognormal, capped by `max_tokens`).
    #[arg(long, default_value_t = 128)]
    pub output_len_median: u32,
    /// Log-space standard deviation of that output length.
    #[arg(long, default_value_t = 0.8)]
    pub output_len_sigma: f64,
    /// Identity reported as `remote_engine_id` to decode engines [default: derived from the port].
    #[arg(long)]
    pub engine_id: Option<String>,
    /// How far the real-time loop may fall behind its clock (a stalled host) and still catch up,
    /// running the due iterations back to back; beyond it the lost time is dropped and counted
    /// in `/admin/stats`, ms.
    #[arg(long, default_value_t = DEFAULT_CATCH_UP_LIMIT / 1000)]
    pub catch_up_limit_ms: u64,

    /// Share of requests answered with `--error-status` (0..1).
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// HTTP status of injected errors.
    #[arg(long, default_value_t = 500)]
    pub error_status: u16,
    /// Length of an injected mid-stream stall, ms.
    #[arg(long, default_value_t = 0)]
    pub stall_ms: u64,
    /// Share of requests that stall mid-stream (0..1).
    #[arg(long, default_value_t = 0.0)]
    pub stall_rate: f64,
    /// Share of requests read and never answered (0..1).
    #[arg(long, default_value_t = 0.0)]
    pub hang_rate: f64,
    /// Share of requests whose connection is closed mid-stream (0..1).
    #[arg(long, default_value_t = 0.0)]
    pub crash_rate: f64,
    /// Slow-down factor of the whole engine (2.0 = every iteration takes twice as long).
    #[arg(long, default_value_t = 1.0)]
    pub slowdown: f64,
    /// `/metrics` keeps returning its last snapshot.
    #[arg(long)]
    pub freeze_metrics: bool,
}

fn parse_profile(s: &str) -> Result<String, String> {
    match Profile::by_name(s) {
        Some(p) => Ok(p.name),
        None => Err(format!(
            "unknown profile `{s}`; known: {}",
            PROFILE_NAMES.join(", ")
        )),
    }
}

impl Default for EngineArgs {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8000,
            models: vec!["sim-llama".into()],
            profile: "h100-llama3-8b".into(),
            speed: 1.0,
            jitter: 0.0,
            seed: 0,
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            max_num_queued_reqs: 65_536,
            kv_capacity_tokens: None,
            max_model_len: None,
            scheduling_policy: Scheduling::Fcfs,
            no_enable_prefix_caching: false,
            role: Role::Both,
            v0_metrics: false,
            output_len_median: 128,
            output_len_sigma: 0.8,
            engine_id: None,
            catch_up_limit_ms: DEFAULT_CATCH_UP_LIMIT / 1000,
            error_rate: 0.0,
            error_status: 500,
            stall_ms: 0,
            stall_rate: 0.0,
            hang_rate: 0.0,
            crash_rate: 0.0,
            slowdown: 1.0,
            freeze_metrics: false,
        }
    }
}

impl EngineArgs {
    /// The engine model's configuration these options describe.
    pub fn engine_config(&self) -> anyhow::Result<EngineConfig> {
        let profile = Profile::by_name(&self.profile)
            .ok_or_else(|| anyhow::anyhow!("unknown profile `{}`", self.profile))?;
        let mut cfg = EngineConfig::for_profile(profile);
        cfg.max_num_seqs = self.max_num_seqs;
        cfg.max_num_batched_tokens = self.max_num_batched_tokens;
        cfg.max_num_queued_reqs = self.max_num_queued_reqs;
        if let Some(kv) = self.kv_capacity_tokens {
            cfg.kv_capacity_tokens = kv;
        }
        if let Some(len) = self.max_model_len {
            cfg.max_model_len = len;
        }
        cfg.scheduling = self.scheduling_policy;
        cfg.speed = self.speed;
        cfg.jitter = self.jitter;
        cfg.seed = self.seed;
        cfg.enable_prefix_caching = !self.no_enable_prefix_caching;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The fault settings given on the command line.
    pub fn faults(&self) -> Faults {
        Faults {
            error_rate: self.error_rate,
            error_status: self.error_status,
            stall_ms: self.stall_ms,
            stall_rate: self.stall_rate,
            hang_rate: self.hang_rate,
            crash_rate: self.crash_rate,
            slowdown: self.slowdown,
            freeze_metrics: self.freeze_metrics,
        }
    }

    /// Checks what clap cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.models.iter().any(|m| m.is_empty()) || self.models.is_empty() {
            anyhow::bail!("--model needs at least one non-empty name");
        }
        if self.output_len_median == 0 {
            anyhow::bail!("--output-len-median must be at least 1");
        }
        if !(self.output_len_sigma.is_finite() && (0.0..=4.0).contains(&self.output_len_sigma)) {
            anyhow::bail!("--output-len-sigma must be in [0, 4]");
        }
        self.faults().validate().map_err(anyhow::Error::msg)?;
        self.engine_config()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        engine: EngineArgs,
    }

    #[test]
    fn flags_parse_like_vllm() {
        let cli = Cli::try_parse_from([
            "engine",
            "--port",
            "9000",
            "--model",
            "a,b",
            "--profile",
            "tiny",
            "--scheduling-policy",
            "priority",
            "--role",
            "prefill",
            "--max-num-seqs",
            "8",
            "--kv-capacity-tokens",
            "4096",
            "--error-rate",
            "0.5",
            "--v0-metrics",
        ])
        .unwrap();
        let a = cli.engine;
        assert_eq!(a.models, ["a", "b"]);
        assert_eq!(a.role, Role::Prefill);
        assert!(a.v0_metrics);
        a.validate().unwrap();
        let cfg = a.engine_config().unwrap();
        assert_eq!(cfg.scheduling, Scheduling::Priority);
        assert_eq!((cfg.max_num_seqs, cfg.kv_capacity_tokens), (8, 4096));
        assert_eq!(cfg.max_model_len, Profile::tiny().max_model_len);
        assert_eq!(a.faults().error_rate, 0.5);
    }

    #[test]
    fn defaults_match_the_default_struct_and_bad_values_are_refused() {
        let parsed = Cli::try_parse_from(["engine"]).unwrap().engine;
        let d = EngineArgs::default();
        assert_eq!(
            (
                parsed.port,
                parsed.models.clone(),
                parsed.profile.clone(),
                parsed.max_num_seqs
            ),
            (d.port, d.models.clone(), d.profile.clone(), d.max_num_seqs)
        );
        assert_eq!(parsed.faults(), d.faults());
        assert_eq!(parsed.catch_up_limit_ms, d.catch_up_limit_ms);
        assert!(Cli::try_parse_from(["engine", "--profile", "b200"]).is_err());
        assert!(Cli::try_parse_from(["engine", "--scheduling-policy", "lifo"]).is_err());
        let bad = EngineArgs {
            crash_rate: 2.0,
            ..EngineArgs::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("crash_rate"));
        let bad = EngineArgs {
            max_num_seqs: 4096,
            ..EngineArgs::default()
        };
        assert!(
            bad.validate().is_err(),
            "max_num_batched_tokens < max_num_seqs"
        );
        let bad = EngineArgs {
            max_num_queued_reqs: 0,
            ..EngineArgs::default()
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("max_num_queued_reqs"), "{e}");
    }
}
