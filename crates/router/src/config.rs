//! The router's one configuration struct, with one set of defaults, fed by flags, environment
//! variables and a config file (TOML, YAML or JSON), in that order of precedence.
//!
//! The defaults live only in the clap attributes below. A config file uses the same names as the
//! flags (`routing_logic` or `routing-logic`); a key given there replaces the default but not a flag
//! or environment variable the user set. Unknown keys are errors that name the key. The file's
//! `[[backends]]` tables list endpoints and are re-read live (see [`crate::discovery`]); other keys
//! are read at start.

use crate::breaker::BreakerConfig;
use crate::security::{PriorityKey, Secret};
use clap::{parser::ValueSource, ArgMatches, Args, CommandFactory, FromArgMatches, Parser};
use qoe_core::analyze::AnalyzerConfig;
use qoe_core::policy::QoeConfig;
use qoe_core::retry_budget::RetryBudgetConfig;
use qoe_core::{PolicyConfig, PolicyKind, StatsConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    Text,
    Json,
}

/// What the router does with requests whose SLA no endpoint can meet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlaEnforcement {
    /// Route every request.
    Off,
    /// Refuse priority 3 at once with 429; send priority 1 and 2 to the best endpoint.
    Shed,
}

/// How endpoints are found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiscoveryKind {
    /// `--static-backends` (and `[[backends]]` in the config file, re-read live).
    Static,
    /// The ready pods of `--k8s-label-selector` in `--k8s-namespace`, listed from the
    /// Kubernetes API every `--k8s-poll-interval`.
    K8s,
}

/// `qoe-router serve`: every option of the router.
#[derive(Clone, Debug, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// Config file (TOML; YAML if named .yaml or .yml, JSON if .json) with these same keys and `[[backends]]` tables; re-read on change or SIGHUP.
    #[arg(long, env = "QOE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Check the settings, print them as the config file they amount to (flags, environment,
    /// file and defaults merged; keys not printed) and exit.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
    /// The settings given by flag or `QOE_*` variable (as serialized keys), which win over the
    /// config file: at start-up and when a reloaded file is checked.
    #[arg(skip)]
    #[serde(skip)]
    pub from_user: Vec<String>,

    /// Address to listen on.
    #[arg(long, env = "QOE_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "QOE_PORT", default_value_t = 8000)]
    pub port: u16,

    /// How endpoints are discovered.
    #[arg(long, env = "QOE_SERVICE_DISCOVERY", value_enum, default_value_t = DiscoveryKind::Static)]
    pub service_discovery: DiscoveryKind,
    /// Kubernetes discovery: the namespace of the engine pods (default: the router's own, from
    /// its service account; else `default`).
    #[arg(long, env = "QOE_K8S_NAMESPACE")]
    pub k8s_namespace: Option<String>,
    /// Kubernetes discovery: the label selector of the engine pods, e.g. `app=vllm` (required).
    #[arg(long, env = "QOE_K8S_LABEL_SELECTOR", default_value = "")]
    pub k8s_label_selector: String,
    /// Kubernetes discovery: the port the engines serve on in their pods.
    #[arg(long, env = "QOE_K8S_PORT", default_value_t = 8000)]
    pub k8s_port: u16,
    /// Kubernetes discovery: the API server's URL (default: in the cluster, from
    /// `KUBERNETES_SERVICE_HOST` and `_PORT`, with the service account's token and CA; outside,
    /// e.g. `http://127.0.0.1:8001` for `kubectl proxy`).
    #[arg(long, env = "QOE_K8S_API_SERVER")]
    pub k8s_api_server: Option<String>,
    /// Kubernetes discovery: seconds between two listings of the pods.
    #[arg(long, env = "QOE_K8S_POLL_INTERVAL", default_value_t = 2.0)]
    pub k8s_poll_interval: f64,
    /// Comma-separated endpoint base URLs, e.g. `http://127.0.0.1:8100,http://127.0.0.1:8101`.
    #[arg(long, env = "QOE_STATIC_BACKENDS", value_delimiter = ',')]
    pub static_backends: Vec<String>,
    /// Comma-separated models, one per backend (or one for all); detected from each endpoint's
    /// `/v1/models` when omitted.
    #[arg(long, env = "QOE_STATIC_MODELS", value_delimiter = ',')]
    pub static_models: Vec<String>,

    /// Routing policy: qoe, roundrobin, random, least-loaded, power-of-two, session, prefix-aware.
    #[arg(long, env = "QOE_ROUTING_LOGIC", default_value = "qoe")]
    pub routing_logic: String,
    /// Seed for the policies' random choices.
    #[arg(long, env = "QOE_SEED", default_value_t = PolicyConfig::default().seed)]
    pub seed: u64,
    /// Session key for `session` routing: a header name, else a top-level body field of that name.
    #[arg(long, env = "QOE_SESSION_KEY", default_value = "x-session-id")]
    pub session_key: String,
    /// Session affinity load bound factor (consistent hashing with bounded load).
    #[arg(long, env = "QOE_SESSION_LOAD_FACTOR", default_value_t = PolicyConfig::default().session_load_factor)]
    pub session_load_factor: f64,
    /// Prefix-aware: prefix index capacity in prompt blocks.
    #[arg(long, env = "QOE_PREFIX_INDEX_BLOCKS", default_value_t = PolicyConfig::default().prefix_index_blocks)]
    pub prefix_index_blocks: usize,
    /// Prefix-aware: leave the matched endpoint when it has this many more requests in flight than
    /// the least-loaded one.
    #[arg(long, env = "QOE_PREFIX_BALANCE_MARGIN", default_value_t = PolicyConfig::default().prefix_balance_margin)]
    pub prefix_balance_margin: u32,

    /// Header carrying the request priority (1 high, 2 default, 3 low).
    #[arg(
        long,
        env = "QOE_PRIORITY_HEADER",
        default_value = "x-request-priority"
    )]
    pub priority_header: String,
    /// Header carrying the expected output length in tokens.
    #[arg(
        long,
        env = "QOE_EXPECTED_OUTPUT_LEN_HEADER",
        default_value = "x-expected-output-tokens"
    )]
    pub expected_output_len_header: String,
    /// Header carrying the TTFT deadline in milliseconds.
    #[arg(long, env = "QOE_SLA_HEADER", default_value = "x-sla-target-ms")]
    pub sla_header: String,
    /// Hugging Face `tokenizer.json` of the served models: prompt tokens counted exactly instead
    /// of estimated (one per 4 bytes). `PATH` counts every model's prompts, `MODEL=PATH` one
    /// model's (comma-separated; a model without its own takes the `PATH` one, else the
    /// estimate). Needs a build with `--features tokenizer`; read at start.
    #[arg(
        long,
        env = "QOE_TOKENIZER",
        value_delimiter = ',',
        value_name = "[MODEL=]PATH"
    )]
    #[serde(deserialize_with = "one_or_many")]
    pub tokenizer: Vec<String>,
    /// TTFT target, ms (used when a request has no SLA header).
    #[arg(long, env = "QOE_TARGET_TTFT", default_value_t = QoeConfig::default().target_ttft_ms)]
    pub target_ttft: f64,
    /// Inter-token latency target, ms.
    #[arg(long, env = "QOE_TARGET_ITL", default_value_t = QoeConfig::default().target_itl_ms)]
    pub target_itl: f64,
    /// Token delivery rate a reader needs, tokens/s.
    #[arg(long, env = "QOE_OPTIMAL_THROUGHPUT", default_value_t = QoeConfig::default().optimal_throughput)]
    pub optimal_throughput: f64,
    /// QoE policy base weights α,β,γ,δ (resource, performance, reliability, priority);
    /// normalized to sum 1.
    #[arg(long, env = "QOE_WEIGHTS", value_delimiter = ',', num_args = 1..=4,
          default_values_t = QoeConfig::default().weights)]
    pub qoe_weights: Vec<f64>,
    /// Whether the QoE weights adapt to fleet conditions (within their bounds).
    #[arg(long, env = "QOE_ADAPTIVE", default_value_t = QoeConfig::default().adaptive,
          action = clap::ArgAction::Set)]
    pub qoe_adaptive: bool,
    /// QoE deadline overflow: a request whose SLA deadline no endpoint is predicted to meet goes
    /// to the queue that already misses it most (its queue is unbounded; see docs/QOE.md).
    #[arg(long, env = "QOE_DEADLINE_OVERFLOW", default_value_t = QoeConfig::default().deadline_overflow,
          action = clap::ArgAction::Set)]
    pub qoe_deadline_overflow: bool,
    /// Requests in flight at which the QoE policy counts an endpoint as saturated.
    #[arg(long, env = "QOE_SATURATION_INFLIGHT", default_value_t = QoeConfig::default().saturation_inflight)]
    pub saturation_inflight: u32,
    /// Output length assumed for a model before any request of it finished (tokens).
    #[arg(long, env = "QOE_DEFAULT_OUTPUT_TOKENS", default_value_t = 256)]
    pub default_output_tokens: u32,

    /// Seconds between scrapes of every endpoint's `/metrics` (and `/v1/models` when detecting).
    #[arg(long, env = "QOE_ENGINE_STATS_INTERVAL", default_value_t = 1.0)]
    pub engine_stats_interval: f64,
    /// Seconds between active health checks (`/health`).
    #[arg(long, env = "QOE_HEALTH_CHECK_INTERVAL", default_value_t = 2.0)]
    pub health_check_interval: f64,
    /// Consecutive failed health checks that mark an endpoint unhealthy.
    #[arg(long, env = "QOE_UNHEALTHY_THRESHOLD", default_value_t = 2)]
    pub unhealthy_threshold: u32,
    /// Consecutive passed health checks that mark it healthy again.
    #[arg(long, env = "QOE_HEALTHY_THRESHOLD", default_value_t = 1)]
    pub healthy_threshold: u32,
    /// Seconds of router-observed request statistics kept (sliding window).
    #[arg(long, env = "QOE_REQUEST_STATS_WINDOW", default_value_t = 60.0)]
    pub request_stats_window: f64,

    /// Largest request body accepted, bytes.
    #[arg(long, env = "QOE_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Bytes of request bodies the router holds at once (read, waiting to be routed or for
    /// their endpoint's first byte), across all requests; past it a request is answered 503.
    /// Bounds what slow or large uploads on many connections can take. 0: no limit; below
    /// --max-body-bytes it is raised to it (a body the limit allows fits).
    #[arg(long, env = "QOE_MAX_BUFFERED_BODY_BYTES", default_value_t = 1 << 30)]
    pub max_buffered_body_bytes: usize,
    /// Client connections open at once; past it a new one is closed at once. 0: half the
    /// open-files limit (each request in flight holds an upstream connection too), so that a
    /// flood of connections leaves the router the descriptors to serve the ones it has.
    #[arg(long, env = "QOE_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,
    /// Other endpoints tried when one fails before any byte reached the client (connect error,
    /// 429/5xx, connection closed before the first byte).
    #[arg(long, env = "QOE_MAX_RETRIES", default_value_t = 2)]
    pub max_retries: u32,
    /// First pause before a retry, ms; each further retry waits 1.5× longer (±50% jitter).
    #[arg(long, env = "QOE_RETRY_BACKOFF_MS", default_value_t = 50)]
    pub retry_backoff_ms: u64,
    /// Retry budget: over the last 10 s, retries may add at most this share of the requests
    /// (0.2: one retry per five requests), plus --retry-budget-min-per-sec; past it a failure is
    /// answered as if no retry were left. Keeps a fleet failing under load from a retry storm.
    #[arg(long, env = "QOE_RETRY_BUDGET_RATIO", default_value_t = RetryBudgetConfig::default().ratio)]
    pub retry_budget_ratio: f64,
    /// Retries per second the budget allows whatever the traffic (a quiet router still retries).
    #[arg(long, env = "QOE_RETRY_BUDGET_MIN_PER_SEC", default_value_t = RetryBudgetConfig::default().min_per_sec)]
    pub retry_budget_min_per_sec: f64,
    /// Consecutive failures that open an endpoint's circuit breaker.
    #[arg(long, env = "QOE_BREAKER_FAILURES", default_value_t = BreakerConfig::default().failure_threshold)]
    pub breaker_failures: u32,
    /// Consecutive successful probes that close it again.
    #[arg(long, env = "QOE_BREAKER_SUCCESSES", default_value_t = BreakerConfig::default().success_threshold)]
    pub breaker_successes: u32,
    /// Seconds an open breaker waits before letting a probe through.
    #[arg(long, env = "QOE_BREAKER_OPEN_SECS", default_value_t = BreakerConfig::default().open_for as f64 / 1e6)]
    pub breaker_open_secs: f64,
    /// Connect timeout toward an endpoint, ms.
    #[arg(long, env = "QOE_CONNECT_TIMEOUT_MS", default_value_t = 2_000)]
    pub connect_timeout_ms: u64,
    /// Time allowed for a streamed response's first byte (its headers and the first body frame,
    /// i.e. the first token), ms; then 504. Nothing reaches the client before it.
    #[arg(long, env = "QOE_FIRST_BYTE_TIMEOUT_MS", default_value_t = 60_000)]
    pub first_byte_timeout_ms: u64,
    /// Time allowed for a non-streamed response's first byte, ms; then 504. An engine sends a
    /// non-streamed answer only once it has generated all of it, so this bounds the whole
    /// generation.
    #[arg(long, env = "QOE_RESPONSE_TIMEOUT_MS", default_value_t = 600_000)]
    pub response_timeout_ms: u64,
    /// Time a client may take to send a request's headers, and then its body, ms; a slower one
    /// is disconnected (headers) or answered 408 (body): each open connection holds a socket.
    /// Also how long an idle keep-alive connection (HTTP/2: one with no request open) is kept:
    /// keep it above the idle timeouts of the clients and load balancers in front (60 s for most
    /// load balancers, 90 s for Go). And how long a write may wait on a client that reads
    /// nothing of its answer before its connection is closed.
    #[arg(long, env = "QOE_REQUEST_READ_TIMEOUT_MS", default_value_t = 120_000)]
    pub request_read_timeout_ms: u64,
    /// Longest silence allowed inside a streamed response body, ms.
    #[arg(long, env = "QOE_IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    pub idle_timeout_ms: u64,
    /// On SIGTERM or Ctrl-C the router stops accepting connections and lets the requests in
    /// flight finish for up to this long, ms; then it closes what remains (engines abort those
    /// requests) and exits. Below Kubernetes' default 30 s grace period, so the router, not a
    /// SIGKILL, ends the last streams. 0 closes them at once; a second signal exits at once.
    #[arg(long, env = "QOE_SHUTDOWN_TIMEOUT_MS", default_value_t = 25_000)]
    pub shutdown_timeout_ms: u64,
    /// Idle upstream keep-alive connections kept per endpoint.
    #[arg(long, env = "QOE_POOL_MAX_IDLE_PER_HOST", default_value_t = 256)]
    pub pool_max_idle_per_host: usize,

    /// Admission: requests in flight per endpoint at which it counts as saturated (0: no limit).
    #[arg(long, env = "QOE_MAX_INFLIGHT_PER_ENDPOINT", default_value_t = 0)]
    pub max_inflight_per_endpoint: u32,
    /// Admission: engine KV-cache usage (0..1) at which an endpoint counts as saturated (1: no limit).
    #[arg(long, env = "QOE_SATURATION_KV_USAGE", default_value_t = 1.0)]
    pub saturation_kv_usage: f64,
    /// Admission: engine waiting requests at which an endpoint counts as saturated (0: no limit).
    #[arg(long, env = "QOE_SATURATION_WAITING", default_value_t = 0)]
    pub saturation_waiting: u32,
    /// Admission: requests that may wait in the router when every endpoint is saturated.
    #[arg(long, env = "QOE_QUEUE_MAX", default_value_t = 1024)]
    pub queue_max: usize,
    /// Admission: longest wait in the router's queue, seconds (then 429).
    #[arg(long, env = "QOE_QUEUE_TIMEOUT", default_value_t = 30.0)]
    pub queue_timeout: f64,
    /// SLA enforcement: `off`, or `shed` (a priority-3 request whose `x-sla-target-ms` no endpoint
    /// is predicted to meet is refused at once with 429; priority 1 and 2 go to the best endpoint).
    /// Needs `--routing-logic qoe`, the policy that predicts time to first token.
    #[arg(long, env = "QOE_SLA_ENFORCEMENT", value_enum, default_value_t = SlaEnforcement::Off)]
    pub sla_enforcement: SlaEnforcement,
    /// Add vLLM's `priority` field (the request's priority, 1..3) to bodies that lack one, so
    /// engines run with `--scheduling-policy priority` keep the router's order.
    #[arg(long, env = "QOE_ENGINE_PRIORITY", default_value_t = false)]
    pub engine_priority: bool,

    /// API keys the OpenAI routes require as `Authorization: Bearer KEY`, comma-separated (none:
    /// open). Prefer the environment variable or the config file to the flag: command lines are
    /// visible to other local users (README, "Security").
    #[arg(
        long,
        env = "QOE_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<Secret>,
    /// API keys bound to a priority, `KEY=PRIORITY` (1 high, 2 default, 3 low), accepted like
    /// --api-keys: a request with one is served at its priority, or at a lower one its priority
    /// header asks for, never a higher one. Without them the priority header is the client's word.
    #[arg(
        long,
        env = "QOE_API_KEY_PRIORITIES",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_key_priorities: Vec<PriorityKey>,
    /// Key the admin routes (`/engines`, `/metrics`) require as `Authorization: Bearer KEY`
    /// (unset: open). `/health` is always open.
    #[arg(long, env = "QOE_ADMIN_API_KEY", hide_env_values = true)]
    pub admin_api_key: Option<Secret>,
    /// Forward the client's `Authorization` header to endpoints even though the router checked it
    /// against --api-keys (by default the router's keys stay at the router). Without --api-keys
    /// the header always passes through.
    #[arg(long, env = "QOE_FORWARD_AUTHORIZATION", default_value_t = false)]
    pub forward_authorization: bool,
    /// Key the endpoints require (vLLM's `--api-key`): sent as `Authorization: Bearer KEY` on
    /// every request the router makes to them, its own model detection, scrapes and health checks
    /// included, in place of any client's header.
    #[arg(long, env = "QOE_UPSTREAM_API_KEY", hide_env_values = true)]
    pub upstream_api_key: Option<Secret>,
    /// PEM file of CA certificates that `https` endpoints' certificates must chain to, in place
    /// of the public web roots built in (as `curl --cacert`): a private CA's, or the machine's
    /// bundle (`/etc/ssl/certs/ca-certificates.crt`). Read at start.
    #[arg(long, env = "QOE_UPSTREAM_CA_FILE")]
    pub upstream_ca_file: Option<std::path::PathBuf>,
    /// PEM certificate chain the router presents to https endpoints that ask for one (vLLM run
    /// with `--ssl-ca-certs` and `--ssl-cert-reqs 2`); needs --upstream-client-key. Re-read, with the key, when the files
    /// change (checked at most every 10 s) for the connections opened after.
    #[arg(long, env = "QOE_UPSTREAM_CLIENT_CERT")]
    pub upstream_client_cert: Option<std::path::PathBuf>,
    /// The PEM private key of --upstream-client-cert.
    #[arg(long, env = "QOE_UPSTREAM_CLIENT_KEY")]
    pub upstream_client_key: Option<std::path::PathBuf>,
    /// Origins a browser may call the router from (CORS), comma-separated, or `*` for any. None:
    /// no CORS headers at all (an engine's own are removed too).
    #[arg(long, env = "QOE_CORS_ALLOW_ORIGIN", value_delimiter = ',')]
    pub cors_allow_origin: Vec<String>,
    /// Largest total size of a request's headers, bytes; larger gets 431.
    #[arg(long, env = "QOE_MAX_HEADER_BYTES", default_value_t = 32 * 1024)]
    pub max_header_bytes: usize,
    /// Serve TLS on the router's port with this PEM certificate chain (the router's own
    /// certificate first, then intermediates); needs --tls-key-file. Re-read when it changes.
    #[arg(long, env = "QOE_TLS_CERT_FILE")]
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// The PEM private key of --tls-cert-file (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "QOE_TLS_KEY_FILE")]
    pub tls_key_file: Option<std::path::PathBuf>,
    /// Require every client of the https port to present a certificate that chains to one in
    /// this PEM file (mutual TLS). Read at start.
    #[arg(long, env = "QOE_TLS_CLIENT_CA_FILE")]
    pub tls_client_ca_file: Option<std::path::PathBuf>,

    /// The qoe policy's settings that have no flag: the config file's `[qoe]` table, keys named
    /// as the fields of `qoe_core::QoeConfig` (docs/QOE.md, "Configuration"). Read at start.
    #[arg(skip)]
    #[serde(default)]
    pub qoe: Option<serde_json::Value>,

    /// Log format.
    #[arg(long, env = "QOE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (tracing's env-filter syntax), e.g. `info` or `qoe_router=debug`.
    #[arg(long, env = "QOE_LOG", default_value = "info")]
    pub log_level: String,
}

/// Parses a standalone `RouterConfig` (for tests and embedding): `args` as on the command line.
#[derive(Parser, Debug)]
#[command(name = "qoe-router-serve")]
struct Standalone {
    #[command(flatten)]
    config: RouterConfig,
}

impl Default for RouterConfig {
    /// The defaults, exactly as the flags define them (`QOE_*` variables ignored).
    fn default() -> Self {
        let matches = Standalone::command()
            .mut_args(|a| a.env(None))
            .try_get_matches_from(["qoe-router-serve"])
            .expect("the defaults parse");
        Standalone::from_arg_matches(&matches)
            .expect("the defaults parse")
            .config
    }
}

impl RouterConfig {
    /// Parses `args` (with the program name first), then overlays the config file it names, if any.
    pub fn from_args<I, T>(args: I) -> anyhow::Result<Self>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Standalone::command().try_get_matches_from(args)?;
        let config = Standalone::from_arg_matches(&matches)?.config;
        config.with_file(&matches)
    }

    /// `--max-buffered-body-bytes` in effect: never below `--max-body-bytes` (0: no limit).
    pub fn body_budget(&self) -> usize {
        match self.max_buffered_body_bytes {
            0 => 0,
            n => n.max(self.max_body_bytes),
        }
    }

    /// Like [`RouterConfig::from_args`], without a config file (`--config` or `QOE_CONFIG` is
    /// dropped unread): the flags, the environment and the defaults only.
    pub fn from_args_without_file<I, T>(args: I) -> anyhow::Result<Self>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Standalone::command().try_get_matches_from(args)?;
        let mut config = Standalone::from_arg_matches(&matches)?.config;
        config.config = None;
        Ok(config)
    }

    /// Overlays the config file's keys onto the options the user left at their defaults.
    pub fn with_file(self, matches: &ArgMatches) -> anyhow::Result<Self> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let file = ConfigFile::read(&path)?;
        let from_user: Vec<String> = matches
            .ids()
            .map(|id| id.as_str())
            .filter(|id| {
                matches!(
                    matches.value_source(id),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                )
            })
            .map(str::to_string)
            .collect();
        let user = RouterConfig { from_user, ..self };
        user.overlay(&file.settings, &path, |key| user.file_sets(key))
    }

    /// Whether the config file's value of `key` applies: `[qoe]` always (it has no flag), any
    /// other setting unless a flag or variable gave it.
    pub fn file_sets(&self, key: &str) -> bool {
        key == "qoe" || !self.from_user.iter().any(|k| k == key)
    }

    /// These settings with what the file's `settings` gave put back to their defaults: the
    /// flags, variables and defaults a reloaded file is laid over, as at start-up.
    pub fn without_file(&self, settings: &toml::Table) -> anyhow::Result<Self> {
        let defaults = serde_json::to_value(RouterConfig::default())?;
        let mut base = serde_json::to_value(self)?;
        let fields = base
            .as_object_mut()
            .expect("a struct serializes to an object");
        for key in settings.keys().map(|k| k.replace('-', "_")) {
            if self.file_sets(&key) {
                let default = defaults.get(&key).cloned().unwrap_or_default();
                fields.insert(key, default);
            }
        }
        let base: RouterConfig = serde_json::from_value(base)?;
        Ok(base.keeping_unserialized(self, self.config.clone()))
    }

    /// These settings with what serde skips (no file key sets it) taken from `of`: the config
    /// file's path (`config`), `--print-config`, and which settings came from the user.
    fn keeping_unserialized(mut self, of: &RouterConfig, config: Option<PathBuf>) -> Self {
        self.config = config;
        self.print_config = of.print_config;
        self.from_user = of.from_user.clone();
        self
    }

    /// These settings with the file's `settings` (read from `path`) laid over those for which
    /// `take(key)` holds; unknown keys and values of the wrong type are errors naming the file.
    pub fn overlay(
        &self,
        settings: &toml::Table,
        path: &Path,
        take: impl Fn(&str) -> bool,
    ) -> anyhow::Result<Self> {
        let base = serde_json::to_value(self)?;
        let mut merged = base.clone();
        let fields = merged
            .as_object_mut()
            .expect("a struct serializes to an object");
        let mut taken = Vec::new();
        for (key, value) in settings {
            let key = key.replace('-', "_");
            if !fields.contains_key(&key) {
                let hint = if key == "worker_threads" {
                    "worker_threads is set only as --worker-threads or QOE_WORKER_THREADS (the \
                     runtime starts before the file is read)"
                } else {
                    "keys are the flag names of `qoe-router serve --help`"
                };
                anyhow::bail!("{}: unknown key '{key}'; {hint}", path.display());
            }
            if take(&key) {
                let value = serde_json::to_value(value)?;
                fields.insert(key.clone(), value.clone());
                taken.push((key, value));
            }
        }
        let merged: RouterConfig = serde_json::from_value(merged).map_err(|e| {
            // serde names no field: find the key whose value alone fails, to name it.
            let culprit = taken.iter().find_map(|(key, value)| {
                let mut one = base.clone();
                one.as_object_mut()?.insert(key.clone(), value.clone());
                serde_json::from_value::<RouterConfig>(one)
                    .err()
                    .map(|e| match SECRET_SETTINGS.contains(&key.as_str()) {
                        // serde's message quotes the value: a key.
                        true => {
                            let expected = match key.as_str() {
                                "api_keys" | "api_key_priorities" => "a list of strings",
                                _ => "a string",
                            };
                            format!("{key}: expected {expected} (the value is not shown: it holds keys)")
                        }
                        false => format!("{key}: {e}"),
                    })
            });
            anyhow::anyhow!("{}: {}", path.display(), culprit.unwrap_or(e.to_string()))
        })?;
        Ok(merged.keeping_unserialized(self, Some(path.to_path_buf())))
    }

    /// `Authorization: Bearer KEY` for `--upstream-api-key` (validated: a header value).
    pub fn upstream_authorization(&self) -> Option<http::HeaderValue> {
        let key = self.upstream_api_key.as_ref()?;
        let mut value = http::HeaderValue::from_str(&format!("Bearer {}", key.expose())).ok()?;
        value.set_sensitive(true);
        Some(value)
    }

    /// TLS toward endpoints and, with `--tls-cert-file`, on the router's port, from the files
    /// the options name (read now: an error names the option and the file).
    pub fn tls(&self) -> anyhow::Result<(qoe_tls::ClientTls, Option<qoe_tls::ServerTls>)> {
        use qoe_tls::PemFile;
        let identity = PemFile::pair(
            (
                self.upstream_client_cert.as_deref(),
                "--upstream-client-cert",
            ),
            (self.upstream_client_key.as_deref(), "--upstream-client-key"),
        );
        let ca = self.upstream_ca_file.as_deref();
        let client =
            qoe_tls::ClientTls::new(ca.map(|p| PemFile::new(p, "--upstream-ca-file")), identity)?;
        let served = PemFile::pair(
            (self.tls_cert_file.as_deref(), "--tls-cert-file"),
            (self.tls_key_file.as_deref(), "--tls-key-file"),
        );
        let server = match served {
            Some((cert, key)) => Some(qoe_tls::ServerTls::new(
                cert,
                key,
                self.tls_client_ca_file
                    .as_deref()
                    .map(|p| PemFile::new(p, "--tls-client-ca-file")),
                qoe_tls::RELOAD_CHECK,
            )?),
            None => None,
        };
        Ok((client, server))
    }

    /// Checks values that clap cannot, with messages naming the option, and reads the TLS
    /// files the options name, so that a check of the settings catches a bad one.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.validate_settings()?;
        self.tls().map(drop)
    }

    /// [`RouterConfig::validate`] without reading any file (for a caller that builds the TLS
    /// configs next, with [`RouterConfig::tls`]).
    pub fn validate_settings(&self) -> anyhow::Result<()> {
        PolicyKind::parse(&self.routing_logic)
            .map_err(|e| anyhow::anyhow!("--routing-logic: {e}"))?;
        // (Seconds have their own range below.)
        let positive = [
            ("--optimal-throughput", self.optimal_throughput),
            ("--target-ttft", self.target_ttft),
            ("--target-itl", self.target_itl),
            ("--saturation-kv-usage", self.saturation_kv_usage),
        ];
        for spec in self.tokenizers()? {
            // Read at start (`build_state`); here only what a check can say without loading it.
            crate::tokenizer::check(&spec.path)?;
        }
        // A config file (TOML) holds signed 64-bit integers: a larger value could not be saved
        // (`--print-config`), nor given in a file; no setting means anything near it.
        if let Ok(serde_json::Value::Object(settings)) = serde_json::to_value(self) {
            for (key, value) in &settings {
                if let Some(n) = value.as_u64().filter(|n| *n > i64::MAX as u64) {
                    anyhow::bail!(
                        "--{} must be at most {} (a config-file integer), got {n}",
                        key.replace('_', "-"),
                        i64::MAX
                    );
                }
            }
        }
        anyhow::ensure!(
            self.qoe_weights.len() == 4
                && self.qoe_weights.iter().all(|w| w.is_finite() && *w >= 0.0)
                && self.qoe_weights.iter().sum::<f64>() > 0.0,
            "--qoe-weights takes four non-negative numbers α,β,γ,δ with a positive sum, got {:?}",
            self.qoe_weights
        );
        for (flag, v) in positive {
            anyhow::ensure!(
                v.is_finite() && v > 0.0,
                "{flag} must be a positive number, got {v}"
            );
        }
        let millis = [
            ("--connect-timeout-ms", self.connect_timeout_ms),
            ("--first-byte-timeout-ms", self.first_byte_timeout_ms),
            ("--response-timeout-ms", self.response_timeout_ms),
            ("--request-read-timeout-ms", self.request_read_timeout_ms),
            ("--idle-timeout-ms", self.idle_timeout_ms),
        ];
        for (flag, ms) in millis {
            anyhow::ensure!(ms >= 1, "{flag} must be at least 1 ms, got {ms}");
        }
        let counts = [
            ("--unhealthy-threshold", self.unhealthy_threshold as usize),
            ("--healthy-threshold", self.healthy_threshold as usize),
            ("--breaker-failures", self.breaker_failures as usize),
            ("--breaker-successes", self.breaker_successes as usize),
            ("--queue-max", self.queue_max),
        ];
        for (flag, n) in counts {
            anyhow::ensure!(n >= 1, "{flag} must be at least 1, got {n}");
        }
        // Seconds that become timers: below a millisecond a ticker spins; the upper bound keeps
        // the conversion to a duration from overflowing (a billion seconds is 31 years).
        let seconds = [
            ("--engine-stats-interval", self.engine_stats_interval),
            ("--health-check-interval", self.health_check_interval),
            ("--request-stats-window", self.request_stats_window),
            ("--breaker-open-secs", self.breaker_open_secs),
            ("--queue-timeout", self.queue_timeout),
            ("--k8s-poll-interval", self.k8s_poll_interval),
        ];
        for (flag, v) in seconds {
            anyhow::ensure!(
                (0.001..=1e9).contains(&v),
                "{flag} must be between 0.001 and 1e9 seconds, got {v:?}"
            );
        }
        for (flag, v) in [
            ("--retry-budget-ratio", self.retry_budget_ratio),
            ("--retry-budget-min-per-sec", self.retry_budget_min_per_sec),
        ] {
            anyhow::ensure!(
                (0.0..=1e6).contains(&v),
                "{flag} must be between 0 and 1e6, got {v:?}"
            );
        }
        anyhow::ensure!(
            self.saturation_kv_usage <= 1.0,
            "--saturation-kv-usage is a fraction of the KV cache in (0, 1] (1: no limit), got {}",
            self.saturation_kv_usage
        );
        anyhow::ensure!(
            self.max_body_bytes >= 1,
            "--max-body-bytes must be at least 1 (there is no 'unlimited'), got {}",
            self.max_body_bytes
        );
        let headers = [
            ("--priority-header", &self.priority_header),
            (
                "--expected-output-len-header",
                &self.expected_output_len_header,
            ),
            ("--sla-header", &self.sla_header),
        ];
        for (flag, name) in headers {
            anyhow::ensure!(
                http::HeaderName::from_bytes(name.as_bytes()).is_ok(),
                "{flag} must be an HTTP header name (letters, digits and -), got '{name}'"
            );
        }
        tracing_subscriber::EnvFilter::try_new(&self.log_level).map_err(|e| {
            anyhow::anyhow!(
                "--log-level '{}' is not a log filter (e.g. info, or qoe_router=debug): {e}",
                self.log_level
            )
        })?;
        anyhow::ensure!(
            self.session_load_factor.is_finite() && self.session_load_factor >= 1.0,
            "--session-load-factor must be a finite number of at least 1.0, got {}",
            self.session_load_factor
        );
        if self.service_discovery == DiscoveryKind::K8s {
            anyhow::ensure!(
                !self.k8s_label_selector.trim().is_empty(),
                "--service-discovery k8s needs --k8s-label-selector (e.g. app=vllm): the engine \
                 pods are those it selects"
            );
            anyhow::ensure!(
                self.static_backends.is_empty() && self.static_models.is_empty(),
                "--service-discovery k8s takes the endpoints from the pods and their models from \
                 the engines: --static-backends and --static-models are for --service-discovery \
                 static"
            );
            anyhow::ensure!(self.k8s_port >= 1, "--k8s-port must be a port, 1 to 65535");
            if let Some(url) = &self.k8s_api_server {
                crate::kubernetes::validate_api_server(url)
                    .map_err(|e| anyhow::anyhow!("--k8s-api-server: {e}"))?;
            }
        }
        if self.static_models.len() > 1 {
            anyhow::ensure!(
                self.static_models.len() == self.static_backends.len(),
                "--static-models lists {} models for {} backends; give one per backend, or one for all",
                self.static_models.len(),
                self.static_backends.len()
            );
        }
        for key in self.api_keys.iter() {
            key.validate("--api-keys").map_err(anyhow::Error::msg)?;
        }
        for (i, bound) in self.api_key_priorities.iter().enumerate() {
            let flag = "--api-key-priorities";
            anyhow::ensure!(
                bound.priority.is_some(),
                "{flag}: entry {} is not KEY=PRIORITY with PRIORITY 1 (high), 2 or 3 (low) \
                 (not shown: it holds a key)",
                i + 1
            );
            bound.key.validate(flag).map_err(anyhow::Error::msg)?;
            anyhow::ensure!(
                self.api_key_priorities[..i]
                    .iter()
                    .all(|other| other.key != bound.key || other.priority == bound.priority),
                "{flag} binds one key to two priorities"
            );
            anyhow::ensure!(
                self.admin_api_key.as_ref() != Some(&bound.key),
                "--admin-api-key must differ from every {flag} key"
            );
        }
        if let Some(admin) = &self.admin_api_key {
            admin
                .validate("--admin-api-key")
                .map_err(anyhow::Error::msg)?;
            anyhow::ensure!(
                !self.api_keys.contains(admin),
                "--admin-api-key must differ from every --api-keys key"
            );
        }
        if let Some(upstream) = &self.upstream_api_key {
            upstream
                .validate("--upstream-api-key")
                .map_err(anyhow::Error::msg)?;
            anyhow::ensure!(
                !self.forward_authorization,
                "--upstream-api-key and --forward-authorization both say what goes to the \
                 endpoints as Authorization; give one"
            );
        }
        crate::security::validate_origins(&self.cors_allow_origin).map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            self.tls_cert_file.is_some() == self.tls_key_file.is_some(),
            "--tls-cert-file and --tls-key-file go together: give both or neither"
        );
        anyhow::ensure!(
            self.tls_client_ca_file.is_none() || self.tls_cert_file.is_some(),
            "--tls-client-ca-file needs --tls-cert-file and --tls-key-file (client certificates \
             are asked for in the TLS handshake)"
        );
        anyhow::ensure!(
            self.upstream_client_cert.is_some() == self.upstream_client_key.is_some(),
            "--upstream-client-cert and --upstream-client-key go together: give both or neither"
        );
        anyhow::ensure!(
            self.max_header_bytes >= 1024,
            "--max-header-bytes must be at least 1024, got {}",
            self.max_header_bytes
        );
        for (i, url) in self.static_backends.iter().enumerate() {
            crate::discovery::validate_url(url)
                .map_err(|e| anyhow::anyhow!("--static-backends: {e}"))?;
            let normal = crate::discovery::normalize_url(url);
            anyhow::ensure!(
                !self.static_backends[..i]
                    .iter()
                    .any(|u| crate::discovery::normalize_url(u) == normal),
                "--static-backends lists '{normal}' twice"
            );
        }
        self.qoe_table()?;
        Ok(())
    }

    /// The qoe policy's settings from the `[qoe]` table over `QoeConfig`'s defaults, checked: an
    /// unknown key, a key that has a flag, a value of the wrong type or out of range is an error
    /// naming the key and what is allowed.
    pub fn qoe_table(&self) -> anyhow::Result<QoeConfig> {
        let defaults = QoeConfig::default();
        let Some(table) = &self.qoe else {
            return Ok(defaults);
        };
        let serde_json::Value::Object(table) = table else {
            anyhow::bail!("[qoe] must be a table of settings");
        };
        let mut merged = serde_json::to_value(defaults)?;
        for (key, value) in table {
            if let Some((_, flag)) = QOE_FLAGGED.iter().find(|(field, _)| field == key) {
                anyhow::bail!(
                    "[qoe] {key}: set it with --{flag} (config key `{}`)",
                    flag.replace('-', "_")
                );
            }
            anyhow::ensure!(
                merged.get(key).is_some(),
                "[qoe] unknown key '{key}'; the keys are QoeConfig's fields, listed in docs/QOE.md"
            );
            // One key at a time, so that a type error names its key.
            let mut one = serde_json::to_value(defaults)?;
            one[key.as_str()] = value.clone();
            serde_json::from_value::<QoeConfig>(one)
                .map_err(|e| anyhow::anyhow!("[qoe] {key}: {e}"))?;
            merged[key.as_str()] = value.clone();
        }
        let q: QoeConfig = serde_json::from_value(merged)?;
        check_qoe(&q)?;
        Ok(q)
    }

    /// The retry budget's settings.
    pub fn retry_budget(&self) -> RetryBudgetConfig {
        RetryBudgetConfig {
            ratio: self.retry_budget_ratio,
            min_per_sec: self.retry_budget_min_per_sec,
        }
    }

    /// Why the endpoint set is empty, for a 503 and `/ready`.
    pub fn no_endpoints_reason(&self) -> &'static str {
        match self.service_discovery {
            DiscoveryKind::Static => "no endpoints are configured",
            DiscoveryKind::K8s => {
                "no ready pod matches --k8s-label-selector, or the pods could not be listed \
                 (the router's log says which)"
            }
        }
    }

    /// Whether the router checks API keys on the API routes (`--api-keys` or
    /// `--api-key-priorities`).
    pub fn checks_api_keys(&self) -> bool {
        !self.api_keys.is_empty() || !self.api_key_priorities.is_empty()
    }

    /// The settings in effect as a config file `--config` reads back to the same settings: every
    /// key, the `[qoe]` table in full, the file's `[[backends]]`. API keys are left out (a comment
    /// says how many are set): this text goes to terminals and tickets.
    pub fn effective_toml(&self) -> anyhow::Result<String> {
        let mut table = toml::Table::try_from(self)?;
        table.remove("api_keys");
        table.remove("api_key_priorities");
        table.remove("admin_api_key");
        table.remove("upstream_api_key");
        let mut qoe = toml::Table::try_from(self.qoe_table()?)?;
        for (field, _) in QOE_FLAGGED {
            qoe.remove(field);
        }
        table.insert("qoe".into(), qoe.into());
        if let Some(path) = &self.config {
            let backends = ConfigFile::read(path)?.backends;
            if !backends.is_empty() {
                table.insert("backends".into(), toml::Value::try_from(backends)?);
            }
        }
        let mut out = String::from(
            "# qoe-router serve: the settings in effect (flags, QOE_* environment, config file, defaults)\n",
        );
        if !self.api_keys.is_empty() {
            out += &format!("# api_keys: {} set, not printed\n", self.api_keys.len());
        }
        if !self.api_key_priorities.is_empty() {
            out += &format!(
                "# api_key_priorities: {} set, not printed\n",
                self.api_key_priorities.len()
            );
        }
        if self.admin_api_key.is_some() {
            out += "# admin_api_key: set, not printed\n";
        }
        if self.upstream_api_key.is_some() {
            out += "# upstream_api_key: set, not printed\n";
        }
        out += &toml::to_string(&table)?;
        Ok(out)
    }

    pub fn policy_kind(&self) -> PolicyKind {
        PolicyKind::parse(&self.routing_logic).expect("validated")
    }

    pub fn policy_config(&self) -> PolicyConfig {
        // Checked by `validate`; an unchecked bad table falls back to the defaults.
        let table = self.qoe_table().unwrap_or_default();
        PolicyConfig {
            seed: self.seed,
            session_load_factor: self.session_load_factor,
            prefix_index_blocks: self.prefix_index_blocks,
            prefix_balance_margin: self.prefix_balance_margin,
            qoe: QoeConfig {
                target_ttft_ms: self.target_ttft,
                target_itl_ms: self.target_itl,
                optimal_throughput: self.optimal_throughput,
                weights: [
                    self.qoe_weights[0],
                    self.qoe_weights[1],
                    self.qoe_weights[2],
                    self.qoe_weights[3],
                ],
                adaptive: self.qoe_adaptive,
                saturation_inflight: self.saturation_inflight,
                engine_priority: self.engine_priority,
                deadline_overflow: self.qoe_deadline_overflow,
                ..table
            },
        }
    }

    /// The analyzer's settings, without the tokenizer (loaded from `tokenizer` by
    /// [`crate::server::build_state`]).
    pub fn analyzer_config(&self) -> AnalyzerConfig {
        AnalyzerConfig {
            priority_header: self.priority_header.to_ascii_lowercase(),
            expected_output_len_header: self.expected_output_len_header.to_ascii_lowercase(),
            sla_header: self.sla_header.to_ascii_lowercase(),
            session_key: self.session_key.to_ascii_lowercase(),
            nominal_itl_ms: self.target_itl,
            ..AnalyzerConfig::default()
        }
    }

    /// The `--tokenizer` entries: which model each is for and its file; at most one for every
    /// model and one per model.
    pub fn tokenizers(&self) -> anyhow::Result<Vec<TokenizerSpec>> {
        let mut specs: Vec<TokenizerSpec> = Vec::new();
        for entry in &self.tokenizer {
            // `MODEL=PATH`; `PATH` (or `=PATH`, for a path with `=` in it) for every model.
            let (model, path) = match entry.split_once('=') {
                Some(("", path)) => (None, path),
                Some((model, path)) => (Some(model.trim().to_string()), path),
                None => (None, entry.as_str()),
            };
            anyhow::ensure!(
                !path.trim().is_empty(),
                "--tokenizer '{entry}': no path (give [MODEL=]PATH)"
            );
            if specs.iter().any(|s| s.model == model) {
                anyhow::bail!(match &model {
                    Some(m) => format!("--tokenizer: two tokenizers for the model '{m}'"),
                    None => "--tokenizer: two tokenizers for every model; name the model of \
                             one as MODEL=PATH"
                        .to_string(),
                });
            }
            specs.push(TokenizerSpec {
                model,
                path: PathBuf::from(path.trim()),
            });
        }
        Ok(specs)
    }

    pub fn stats_config(&self) -> StatsConfig {
        StatsConfig {
            window: (self.request_stats_window * 1e6) as u64,
            ..StatsConfig::default()
        }
    }

    pub fn breaker_config(&self) -> BreakerConfig {
        BreakerConfig {
            failure_threshold: self.breaker_failures,
            success_threshold: self.breaker_successes,
            open_for: (self.breaker_open_secs * 1e6) as u64,
        }
    }

    pub fn admission_config(&self) -> crate::admission::AdmissionConfig {
        crate::admission::AdmissionConfig {
            limits: qoe_core::saturation::SaturationLimits {
                max_inflight: self.max_inflight_per_endpoint,
                max_kv_usage: self.saturation_kv_usage,
                max_waiting: self.saturation_waiting,
                metrics_max_age: (self.engine_stats_interval * 3e6) as u64,
            },
            queue_max: self.queue_max,
            queue_timeout: Duration::from_secs_f64(self.queue_timeout),
        }
    }

    /// The settings a simulated router runs with in `qoe-router simulate`: these, as `serve`
    /// would apply them to live traffic.
    pub fn simulation_settings(&self) -> qoe_bench::simulate::RouterSettings {
        let micros = |secs: f64| (secs * 1e6).round() as u64;
        let admission = self.admission_config();
        qoe_bench::simulate::RouterSettings {
            source: self.config.as_ref().map(|p| p.display().to_string()),
            policy: self.policy_config(),
            sim: qoe_sim::simulate::SimConfig {
                scrape_interval: micros(self.engine_stats_interval),
                health_interval: micros(self.health_check_interval),
                unhealthy_threshold: self.unhealthy_threshold,
                healthy_threshold: self.healthy_threshold,
                default_output_tokens: self.default_output_tokens,
                max_retries: self.max_retries,
                retry_backoff: self.retry_backoff_ms.saturating_mul(1_000),
                retry_budget: self.retry_budget(),
                first_byte_timeout: self.first_byte_timeout_ms.saturating_mul(1_000),
                stats: self.stats_config(),
                analyzer: self.analyzer_config(),
                admission: qoe_sim::simulate::AdmissionSpec {
                    limits: admission.limits,
                    queue_max: admission.queue_max,
                    queue_timeout: admission.queue_timeout.as_micros() as u64,
                },
                engine_priority: self.engine_priority,
                sla_shed: self.sla_enforcement == SlaEnforcement::Shed,
                ..qoe_sim::simulate::SimConfig::default()
            },
            ignored: self.not_simulated(),
        }
    }

    /// The settings other than the defaults that the simulator does not model, `key = value`
    /// (secrets by name only), the config file's `[[backends]]` last.
    fn not_simulated(&self) -> Vec<String> {
        let json = |c: &RouterConfig| match serde_json::to_value(c) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        let (now, defaults) = (json(self), json(&RouterConfig::default()));
        let mut ignored: Vec<String> = NOT_SIMULATED
            .iter()
            .filter(|key| now.get(**key) != defaults.get(**key))
            .map(|key| match (*key, now.get(*key)) {
                ("api_keys" | "api_key_priorities" | "admin_api_key" | "upstream_api_key", _)
                | (_, None) => key.to_string(),
                (_, Some(value)) => format!("{key} = {value}"),
            })
            .collect();
        let backends = self.config.as_ref().and_then(|p| ConfigFile::read(p).ok());
        if backends.is_some_and(|f| !f.backends.is_empty()) {
            ignored.push("[[backends]] (the fleet file gives the engines)".into());
        }
        ignored
    }

    pub fn engine_stats_interval(&self) -> Duration {
        Duration::from_secs_f64(self.engine_stats_interval)
    }

    pub fn health_check_interval(&self) -> Duration {
        Duration::from_secs_f64(self.health_check_interval)
    }
}

/// One `--tokenizer` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizerSpec {
    /// The model whose prompts it counts; `None`: every model without its own.
    pub model: Option<String>,
    pub path: PathBuf,
}

/// A list setting that a config file may also give as one string (`tokenizer = "PATH"`).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// Settings that hold credentials: their values are never printed, errors included.
const SECRET_SETTINGS: [&str; 4] = [
    "api_keys",
    "api_key_priorities",
    "admin_api_key",
    "upstream_api_key",
];

/// One endpoint in the config file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendEntry {
    pub url: String,
    /// Models served; detected from `/v1/models` when empty.
    #[serde(default)]
    pub models: Vec<String>,
    /// `both` (default), `prefill` or `decode`.
    #[serde(default)]
    pub role: Option<String>,
}

/// The settings the fleet simulator models (`simulation_settings`), as they serialize; the
/// test keeps this list and `NOT_SIMULATED` covering every setting exactly once.
#[cfg(test)]
const SIMULATED: [&str; 34] = [
    "seed",
    "session_key",
    "session_load_factor",
    "prefix_index_blocks",
    "prefix_balance_margin",
    "priority_header",
    "expected_output_len_header",
    "sla_header",
    "target_ttft",
    "target_itl",
    "optimal_throughput",
    "qoe_weights",
    "qoe_adaptive",
    "qoe_deadline_overflow",
    "saturation_inflight",
    "default_output_tokens",
    "engine_stats_interval",
    "health_check_interval",
    "unhealthy_threshold",
    "healthy_threshold",
    "request_stats_window",
    "max_retries",
    "retry_backoff_ms",
    "retry_budget_ratio",
    "retry_budget_min_per_sec",
    "first_byte_timeout_ms",
    "max_inflight_per_endpoint",
    "saturation_kv_usage",
    "saturation_waiting",
    "queue_max",
    "queue_timeout",
    "sla_enforcement",
    "engine_priority",
    "qoe",
];

/// The settings it does not: the fleet file gives the engines and `--policies` the policies;
/// the rest (HTTP, security, breaker, connect, idle and shutdown timeouts, logging) have no counterpart
/// in virtual time, simulated clients always stream (no response timeout), and simulated
/// engines count tokens by the estimate rule (no tokenizer).
const NOT_SIMULATED: [&str; 39] = [
    "host",
    "max_connections",
    "max_buffered_body_bytes",
    "port",
    "service_discovery",
    "k8s_namespace",
    "k8s_label_selector",
    "k8s_port",
    "k8s_api_server",
    "k8s_poll_interval",
    "static_backends",
    "static_models",
    "routing_logic",
    "max_body_bytes",
    "breaker_failures",
    "breaker_successes",
    "breaker_open_secs",
    "connect_timeout_ms",
    "response_timeout_ms",
    "request_read_timeout_ms",
    "idle_timeout_ms",
    "shutdown_timeout_ms",
    "pool_max_idle_per_host",
    "api_keys",
    "api_key_priorities",
    "admin_api_key",
    "forward_authorization",
    "upstream_api_key",
    "upstream_ca_file",
    "upstream_client_cert",
    "upstream_client_key",
    "cors_allow_origin",
    "max_header_bytes",
    "tls_cert_file",
    "tls_key_file",
    "tls_client_ca_file",
    "tokenizer",
    "log_format",
    "log_level",
];

/// `QoeConfig` fields that have a flag (field, flag): set there, not in `[qoe]`.
const QOE_FLAGGED: [(&str, &str); 8] = [
    ("target_ttft_ms", "target-ttft"),
    ("target_itl_ms", "target-itl"),
    ("optimal_throughput", "optimal-throughput"),
    ("weights", "qoe-weights"),
    ("adaptive", "qoe-adaptive"),
    ("saturation_inflight", "saturation-inflight"),
    ("engine_priority", "engine-priority"),
    ("deadline_overflow", "qoe-deadline-overflow"),
];

/// Range checks of the `[qoe]` settings: the policy clamps what it is given, but an operator
/// should hear about a typo.
fn check_qoe(q: &QoeConfig) -> anyhow::Result<()> {
    let in_range = |key: &str, v: f64, lo: f64, hi: f64, allowed: &str| {
        anyhow::ensure!(
            v.is_finite() && v >= lo && v <= hi,
            "[qoe] {key} must be {allowed}, got {v}"
        );
        Ok(())
    };
    for i in 0..4 {
        let four = "four numbers in [0, 1]";
        in_range("weight_min", q.weight_min[i], 0.0, 1.0, four)?;
        in_range("weight_max", q.weight_max[i], 0.0, 1.0, four)?;
        anyhow::ensure!(
            q.weight_min[i] <= q.weight_max[i],
            "[qoe] weight_min must not exceed weight_max, got {:?} and {:?}",
            q.weight_min,
            q.weight_max
        );
    }
    let positive = [
        ("adapt_time_constant_ms", q.adapt_time_constant_ms),
        ("metrics_staleness_ms", q.metrics_staleness_ms),
        ("prior_prefill_tokens_per_s", q.prior_prefill_tokens_per_s),
        ("model_half_life_ms", q.model_half_life_ms),
        ("failure_half_life_ms", q.failure_half_life_ms),
    ];
    for (key, v) in positive {
        in_range(key, v, f64::MIN_POSITIVE, f64::MAX, "a positive number")?;
    }
    let non_negative = [
        ("prior_ttft_base_ms", q.prior_ttft_base_ms),
        ("prior_itl_base_ms", q.prior_itl_base_ms),
        ("prior_itl_per_batch_ms", q.prior_itl_per_batch_ms),
    ];
    for (key, v) in non_negative {
        in_range(key, v, 0.0, f64::MAX, "a number ≥ 0")?;
    }
    in_range(
        "forgetting",
        q.forgetting,
        qoe_core::policy::qoe::FORGETTING_MIN,
        1.0,
        "in [0.85, 1] (below, a fit never holds the samples its outlier clipping waits for)",
    )?;
    in_range("priority_fill", q.priority_fill, 0.05, 1.0, "in [0.05, 1]")?;
    in_range(
        "prefix_affinity",
        q.prefix_affinity,
        0.0,
        1.0,
        "in [0, 1] (0: off)",
    )?;
    let at_least_one = [
        ("saturation_tokens", q.saturation_tokens),
        ("typical_prompt_tokens", q.typical_prompt_tokens as u64),
        ("max_tracked_endpoints", q.max_tracked_endpoints as u64),
    ];
    for (key, v) in at_least_one {
        anyhow::ensure!(v >= 1, "[qoe] {key} must be at least 1, got {v}");
    }
    Ok(())
}

/// The config file: settings (flag names) plus `[[backends]]`.
#[derive(Debug, Default)]
pub struct ConfigFile {
    pub settings: toml::Table,
    pub backends: Vec<BackendEntry>,
    /// Whether the file has a `backends` key at all (`[[backends]]` or `backends = []`).
    pub backends_listed: bool,
}

/// What a config file is written in, by its name: `.yaml` or `.yml` YAML, `.json` JSON, any
/// other TOML. The keys and values are the same in all three.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileFormat {
    Toml,
    Yaml,
    Json,
}

impl FileFormat {
    pub fn of(path: &Path) -> FileFormat {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml") => {
                FileFormat::Yaml
            }
            Some(e) if e.eq_ignore_ascii_case("json") => FileFormat::Json,
            _ => FileFormat::Toml,
        }
    }
}

/// `value` with every `null` member of an object left out: in YAML and JSON a key set to null
/// (`static_models:` with nothing after it) is a setting not given, as an absent TOML key.
fn without_nulls(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(members) => members
            .into_iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k, without_nulls(v)))
            .collect(),
        serde_json::Value::Array(items) => items.into_iter().map(without_nulls).collect(),
        other => other,
    }
}

/// A YAML or JSON document read as TOML would read it: a key given twice in one mapping, or a
/// number that is not finite (YAML's `.inf`, `.nan`), is an error, not silently the last value
/// or a setting left out (`serde_json::Value` alone keeps the last and turns them into null).
struct Strict(serde_json::Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{Error, MapAccess, SeqAccess, Visitor};
        use serde_json::Value;
        struct Read;
        impl<'de> Visitor<'de> for Read {
            type Value = Strict;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a setting's value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Strict, E> {
                Ok(Strict(Value::Bool(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Strict, E> {
                Ok(Strict(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Strict, E> {
                Ok(Strict(v.into()))
            }
            fn visit_f64<E: Error>(self, v: f64) -> Result<Strict, E> {
                serde_json::Number::from_f64(v)
                    .map(|n| Strict(Value::Number(n)))
                    .ok_or_else(|| E::custom("a number that is not finite (.inf, .nan)"))
            }
            fn visit_str<E>(self, v: &str) -> Result<Strict, E> {
                Ok(Strict(Value::String(v.to_string())))
            }
            fn visit_unit<E>(self) -> Result<Strict, E> {
                Ok(Strict(Value::Null))
            }
            fn visit_none<E>(self) -> Result<Strict, E> {
                Ok(Strict(Value::Null))
            }
            fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Strict, D::Error> {
                Strict::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
                let mut items = Vec::new();
                while let Some(Strict(item)) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Strict(Value::Array(items)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
                let mut members = serde_json::Map::new();
                while let Some((key, Strict(value))) = map.next_entry::<String, Strict>()? {
                    if members.contains_key(&key) {
                        return Err(A::Error::custom(format!("the key {key} is given twice")));
                    }
                    members.insert(key, value);
                }
                Ok(Strict(Value::Object(members)))
            }
        }
        d.deserialize_any(Read)
    }
}

/// Whether `text` may hold a credential: a secret setting's name (`api_keys` or `api-keys`), or
/// a URL's user info (`https://user:password@host`). Its parse errors then say only where.
fn may_hold_secrets(text: &str) -> bool {
    text.contains('@')
        || SECRET_SETTINGS
            .iter()
            .any(|key| text.contains(key) || text.contains(&key.replace('_', "-")))
}

/// A YAML or JSON error: its message, unless it quotes a value (a type error does) in a file that
/// may hold credentials; then only where.
fn document_error(
    format: &str,
    text: &str,
    message: String,
    at: Option<(usize, usize)>,
) -> anyhow::Error {
    if !may_hold_secrets(text) || !message.contains(['"', '\'']) {
        return anyhow::anyhow!("{format}: {message}");
    }
    match at {
        Some((line, column)) => anyhow::anyhow!(
            "{format}: a value that is not what its setting takes, at line {line}, column \
             {column} (not shown: the file holds keys)"
        ),
        None => anyhow::anyhow!(
            "{format}: a value that is not what its setting takes (not shown: the file holds keys)"
        ),
    }
}

impl ConfigFile {
    pub fn read(path: &Path) -> anyhow::Result<ConfigFile> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        Self::parse_as(&text, FileFormat::of(path))
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// A TOML config file's text.
    pub fn parse(text: &str) -> anyhow::Result<ConfigFile> {
        Self::parse_as(text, FileFormat::Toml)
    }

    pub fn parse_as(text: &str, format: FileFormat) -> anyhow::Result<ConfigFile> {
        let tree = |parsed: Option<Strict>| -> anyhow::Result<toml::Table> {
            match parsed.map(|Strict(value)| without_nulls(value)) {
                // An empty document: no settings.
                None => Ok(toml::Table::new()),
                Some(serde_json::Value::Object(members)) => {
                    serde_json::from_value(serde_json::Value::Object(members))
                        .map_err(|e| anyhow::anyhow!("{e} (a list may not hold null)"))
                }
                Some(_) => anyhow::bail!("the file is not a mapping of settings to values"),
            }
        };
        let mut settings: toml::Table = match format {
            FileFormat::Toml => text.parse().map_err(|e| syntax_error(text, &e))?,
            FileFormat::Yaml => tree(serde_yaml_ng::from_str(text).map_err(|e| {
                let at = e.location().map(|l| (l.line(), l.column()));
                document_error("YAML", text, e.to_string(), at)
            })?)?,
            FileFormat::Json => tree(serde_json::from_str(text).map_err(|e| {
                document_error("JSON", text, e.to_string(), Some((e.line(), e.column())))
            })?)?,
        };
        // `routing-logic` and `routing_logic` are one key: given both ways, one would be
        // silently dropped.
        let mut seen = std::collections::HashSet::new();
        for key in settings.keys() {
            let canonical = key.replace('-', "_");
            if !seen.insert(canonical.clone()) {
                anyhow::bail!(
                    "the key {canonical} is given twice (with '-' and with '_': they are one key)"
                );
            }
        }
        let listed = settings.remove("backends");
        let backends_listed = listed.is_some();
        let backends = match listed {
            None => Vec::new(),
            // Entry by entry, so an error names which one (counting from 1, as in the file).
            Some(toml::Value::Array(entries)) => entries
                .into_iter()
                .enumerate()
                .map(|(i, entry)| {
                    let url = entry
                        .get("url")
                        .and_then(|u| u.as_str())
                        .map(str::to_string);
                    entry.try_into().map_err(|e| match url {
                        Some(url) => anyhow::anyhow!("[[backends]] entry {} ({url}): {e}", i + 1),
                        None => anyhow::anyhow!("[[backends]] entry {}: {e}", i + 1),
                    })
                })
                .collect::<anyhow::Result<_>>()?,
            Some(other) => other
                .try_into()
                .map_err(|e| anyhow::anyhow!("[[backends]]: {e}"))?,
        };
        Ok(ConfigFile {
            settings,
            backends,
            backends_listed,
        })
    }
}

/// A TOML syntax error. toml's message quotes the offending line, which in a file that sets
/// credentials may be (or continue) one of them: there it says only where, and what was expected.
fn syntax_error(text: &str, e: &toml::de::Error) -> anyhow::Error {
    if !may_hold_secrets(text) {
        return anyhow::anyhow!("{e}");
    }
    let Some(span) = e.span() else {
        return anyhow::anyhow!(
            "TOML syntax error: {} (the line is not shown: the file holds keys)",
            e.message()
        );
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    anyhow::anyhow!(
        "TOML syntax error at line {line}, column {column}: {} (the line is not shown: the file \
         holds keys)",
        e.message().trim_end()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TOML syntax error in a file that sets keys says where, never what the line holds;
    /// elsewhere it quotes the line as toml does.
    #[test]
    fn a_syntax_error_beside_keys_does_not_quote_them() {
        let text = "port = 8000\napi_keys = [\n  \"sk-one-SECRET\"\n  \"sk-two\",\n]\n";
        let e = format!("{:#}", ConfigFile::parse(text).unwrap_err());
        assert!(!e.contains("SECRET") && !e.contains("sk-two"), "{e}");
        assert!(e.contains("line 4, column 3"), "{e}");
        // Keys spelled as flags, and credentials in a URL, are secrets too.
        for text in [
            "admin-api-key = \"sk-SECRET-xyz\n",
            "api-keys = [\"sk-SECRET-1\" \"sk-2\"]\n",
            "k8s_api_server = \"https://u:SECRET@h:1\" x\n",
        ] {
            let e = format!("{:#}", ConfigFile::parse(text).unwrap_err());
            assert!(!e.contains("SECRET") && e.contains("line 1"), "{text}: {e}");
        }
        let e = format!(
            "{:#}",
            ConfigFile::parse("port = 8000\nlog_level = \"info\" x\n").unwrap_err()
        );
        assert!(e.contains("log_level = \"info\" x"), "{e}");
    }

    /// A directory for one test's config files, removed when the test ends (pass or fail).
    struct TestDir(PathBuf);

    impl TestDir {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("qoe-config-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            TestDir(dir)
        }

        fn file(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn defaults_come_from_the_flags() {
        let c = RouterConfig::default();
        assert_eq!(c.port, 8000);
        assert_eq!(c.routing_logic, "qoe");
        assert_eq!(c.target_ttft, 300.0);
        assert_eq!(c.target_itl, 50.0);
        assert_eq!(c.qoe_weights, [0.3, 0.4, 0.2, 0.1]);
        assert_eq!(c.optimal_throughput, 30.0);
        assert_eq!(c.priority_header, "x-request-priority");
        c.validate().unwrap();
    }

    #[test]
    fn weights_are_taken_comma_or_space_separated() {
        for args in [
            &["--qoe-weights", "0.5,0.2,0.2,0.1"][..],
            &["--qoe-weights", "0.5", "0.2", "0.2", "0.1"][..],
        ] {
            let c =
                RouterConfig::from_args(std::iter::once("x").chain(args.iter().copied())).unwrap();
            assert_eq!(c.qoe_weights, [0.5, 0.2, 0.2, 0.1], "{args:?}");
        }
        let two = RouterConfig::from_args(["x", "--qoe-weights", "0.5,0.5"]).unwrap();
        assert!(two.validate().is_err());
    }

    /// A number no config file can hold is refused by name, the way `--print-config` would
    /// otherwise fail without one.
    #[test]
    fn the_body_budget_is_never_below_the_body_limit() {
        let budget = |flags: &[&str]| {
            let args = std::iter::once("x").chain(flags.iter().copied());
            RouterConfig::from_args(args).unwrap().body_budget()
        };
        assert_eq!(budget(&[]), 1 << 30);
        assert_eq!(budget(&["--max-body-bytes", "2147483648"]), 1 << 31);
        assert_eq!(budget(&["--max-buffered-body-bytes", "1000"]), 16 << 20);
        assert_eq!(budget(&["--max-buffered-body-bytes", "0"]), 0);
    }

    #[test]
    fn integers_past_what_a_config_file_holds_are_refused_by_name() {
        for flag in [
            "--max-body-bytes",
            "--seed",
            "--connect-timeout-ms",
            "--queue-max",
        ] {
            let config = RouterConfig::from_args(["x", flag, "9223372036854775808"]).unwrap();
            let e = config.validate_settings().unwrap_err().to_string();
            assert!(e.starts_with(&format!("{flag} must be at most")), "{e}");
            let fits = RouterConfig::from_args(["x", flag, "9223372036854775807"]).unwrap();
            assert!(fits.effective_toml().is_ok(), "{flag}");
        }
    }

    #[test]
    fn the_default_simulated_router_is_the_simulators_default() {
        let s = RouterConfig::default().simulation_settings();
        assert_eq!(s.source, None);
        assert_eq!(s.policy, PolicyConfig::default());
        assert_eq!(s.sim, qoe_sim::simulate::SimConfig::default());
    }

    #[test]
    fn every_setting_is_either_simulated_or_said_not_to_be() {
        let serde_json::Value::Object(keys) =
            serde_json::to_value(RouterConfig::default()).unwrap()
        else {
            panic!("the config serializes to a map");
        };
        for key in keys.keys() {
            let (yes, no) = (
                SIMULATED.contains(&key.as_str()),
                NOT_SIMULATED.contains(&key.as_str()),
            );
            assert!(
                yes != no,
                "`{key}` must be in exactly one of SIMULATED and NOT_SIMULATED"
            );
        }
        assert_eq!(keys.len(), SIMULATED.len() + NOT_SIMULATED.len());
        assert!(RouterConfig::default()
            .simulation_settings()
            .ignored
            .is_empty());
        let shed =
            RouterConfig::from_args(["x", "--sla-enforcement", "shed", "--port", "1"]).unwrap();
        let settings = shed.simulation_settings();
        assert!(settings.sim.sla_shed);
        assert_eq!(settings.ignored, ["port = 1"]);
    }

    #[test]
    fn simulate_runs_the_router_config_file_and_its_flags_win() {
        use qoe_bench::simulate::{simulate_all, to_markdown, SimulateArgs};
        let dir = TestDir::new("sim");
        let path = dir.file("router.toml");
        std::fs::write(
            &path,
            "target_itl = 80\nengine_stats_interval = 0.5\nmax_inflight_per_endpoint = 2\n\
             queue_max = 4\npriority_header = \"x-prio\"\nbreaker_failures = 9\n\
             log_level = \"debug\"\n[qoe]\nprefix_affinity = 0.0\n\
             [[backends]]\nurl = \"http://127.0.0.1:9\"\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let settings = RouterConfig::from_args(["x", "--config", p])
            .unwrap()
            .simulation_settings();
        assert_eq!(settings.source.as_deref(), Some(p));
        assert_eq!(settings.policy.qoe.target_itl_ms, 80.0);
        assert_eq!(settings.policy.qoe.prefix_affinity, 0.0);
        assert_eq!(settings.sim.analyzer.nominal_itl_ms, 80.0);
        assert_eq!(settings.sim.analyzer.priority_header, "x-prio");
        assert_eq!(settings.sim.scrape_interval, 500_000);
        assert_eq!(settings.sim.admission.queue_max, 4);
        assert_eq!(
            settings.ignored,
            [
                "breaker_failures = 9",
                "log_level = \"debug\"",
                "[[backends]] (the fleet file gives the engines)"
            ]
        );

        let repo = |rel: &str| format!("{}/../../{rel}", env!("CARGO_MANIFEST_DIR"));
        let (fleet, workload) = (
            repo("bench/fleets/hetero-4.toml"),
            repo("bench/workloads/smoke.toml"),
        );
        let run = |extra: &[&str]| {
            let mut flags = vec!["--fleet", &fleet, "--workload", &workload, "--quiet"];
            flags.extend(["--policies", "qoe,least-loaded", "--rate", "300"]);
            flags.extend(extra);
            simulate_all(&SimulateArgs::from_flags(flags).unwrap(), &settings).unwrap()
        };
        let from_file = run(&[]);
        assert_eq!(from_file.admission.limits.max_inflight, 2);
        assert_eq!(from_file.admission.limits.metrics_max_age, 1_500_000);
        assert_eq!(from_file.scrape_interval_s, 0.5);
        let md = to_markdown(&from_file);
        assert!(md.contains(&format!("Router settings from `{p}`")), "{md}");
        assert!(md.contains("saturated at 2 in flight"), "{md}");
        for change in [
            "qoe.prefix_affinity = 0.0",
            "qoe.target_itl_ms = 80.0",
            "priority_header = \"x-prio\"",
        ] {
            assert!(from_file.router_changes.iter().any(|c| c == change), "{md}");
        }
        assert!(
            md.contains("Router settings other than the defaults: `"),
            "{md}"
        );
        assert!(
            md.contains("Not modelled by the simulator, so without effect here: `breaker_failures = 9`, `log_level = \"debug\"`, `[[backends]]"),
            "{md}"
        );
        // At 300 req/s, two in flight per endpoint hold requests in the router: some find the
        // queue's four seats taken and are refused.
        let refused = |o: &qoe_bench::simulate::SimulateOutput| {
            o.reports
                .reports
                .iter()
                .map(|r| r.overall.errors)
                .sum::<u64>()
        };
        assert!(refused(&from_file) > 0);

        let flags_win = run(&["--max-inflight-per-endpoint", "0", "--scrape-interval", "2"]);
        assert!(!flags_win.admission.enabled());
        assert_eq!(flags_win.scrape_interval_s, 2.0);
        assert_eq!(refused(&flags_win), 0);
        let defaults = RouterConfig::default().simulation_settings();
        let plain = simulate_all(
            &SimulateArgs::from_flags(["--fleet", &fleet, "--workload", &workload, "--quiet"])
                .unwrap(),
            &defaults,
        )
        .unwrap();
        assert!(
            plain.router_changes.is_empty(),
            "{:?}",
            plain.router_changes
        );
        assert!(plain.router_ignored.is_empty());
        let md = to_markdown(&plain);
        assert!(
            !md.contains("Router settings") && !md.contains("Not modelled"),
            "{md}"
        );
    }

    #[test]
    fn the_printed_config_reads_back_to_the_same_settings_without_keys() {
        let dir = TestDir::new("print");
        let path = dir.file("router.toml");
        std::fs::write(
            &path,
            "routing_logic = \"session\"\nqueue_max = 7\n[qoe]\npriority_fill = 0.6\n\n\
             [[backends]]\nurl = \"http://127.0.0.1:9\"\nmodels = [\"m\"]\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let flags = [
            "x",
            "--config",
            p,
            "--target-itl",
            "70",
            "--api-keys",
            "sk-one,sk-two",
        ];
        let c = RouterConfig::from_args(flags).unwrap();
        let text = c.effective_toml().unwrap();
        assert!(
            !text.contains("sk-one") && !text.contains("sk-two"),
            "{text}"
        );
        assert!(text.contains("# api_keys: 2 set, not printed"), "{text}");
        assert!(text.contains("url = \"http://127.0.0.1:9\""), "{text}");

        let printed = dir.file("printed.toml");
        std::fs::write(&printed, &text).unwrap();
        let back = RouterConfig::from_args(["x", "--config", printed.to_str().unwrap()]).unwrap();
        back.validate().unwrap();
        assert_eq!(back.policy_config(), c.policy_config());
        assert_eq!(back.policy_config().qoe.priority_fill, 0.6);
        assert_eq!(back.policy_config().qoe.target_itl_ms, 70.0);
        let plain = |c: &RouterConfig| {
            let mut v = serde_json::to_value(c).unwrap();
            for key in ["qoe", "api_keys"] {
                v.as_object_mut().unwrap().remove(key);
            }
            v
        };
        assert_eq!(plain(&back), plain(&c));
        assert!(back.api_keys.is_empty());
        // JSON, through which the file is merged, has no infinity: refused at the flag instead.
        let inf = RouterConfig::from_args(["x", "--session-load-factor", "inf"]).unwrap();
        let e = inf.validate().unwrap_err().to_string();
        assert!(
            e.contains("--session-load-factor must be a finite number"),
            "{e}"
        );
        assert_eq!(
            ConfigFile::read(&printed).unwrap().backends,
            ConfigFile::read(&path).unwrap().backends
        );
    }

    #[test]
    fn file_fills_defaults_but_flags_win() {
        let dir = TestDir::new("test");
        let path = dir.file("router.toml");
        std::fs::write(
            &path,
            "routing-logic = \"least-loaded\"\nport = 9001\ntarget_ttft = 200\n\n[[backends]]\nurl = \"http://127.0.0.1:1\"\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let c = RouterConfig::from_args(["x", "--config", p, "--port", "9100"]).unwrap();
        assert_eq!(c.routing_logic, "least-loaded");
        assert_eq!(c.target_ttft, 200.0);
        assert_eq!(c.port, 9100, "the flag wins over the file");

        std::fs::write(&path, "rooting_logic = \"x\"\n").unwrap();
        let err = RouterConfig::from_args(["x", "--config", p])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown key 'rooting_logic'"), "{err}");
        // A bad backend is named by its place in the file.
        let err = ConfigFile::parse(
            "[[backends]]\nurl = \"http://a:1\"\n[[backends]]\nmodels = [\"m\"]\n\
             [[backends]]\nurl = \"http://c:1\"\nmodels = \"m\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("[[backends]] entry 2: missing field `url`"),
            "{err}"
        );
        let err = ConfigFile::parse("[[backends]]\nurl = \"http://c:1\"\nmodels = \"m\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("entry 1 (http://c:1)"), "{err}");
        // A value of the wrong type is named by its key, among others that are fine.
        for (text, key) in [
            ("routing_logic = \"qoe\"\nport = \"eighty\"\n", "port: "),
            ("max_retries = -1\n", "max_retries: "),
            ("log_format = \"xml\"\n", "log_format: "),
            ("queue_max = 1.5\nport = 9001\n", "queue_max: "),
            ("engine_priority = \"yes\"\n", "engine_priority: "),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = RouterConfig::from_args(["x", "--config", p])
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    /// The same settings in TOML, YAML and JSON are the same config, `[[backends]]` and the
    /// `[qoe]` table included; a key set to null in YAML or JSON is a setting not given.
    #[test]
    fn yaml_and_json_files_say_what_toml_says() {
        let dir = TestDir::new("formats");
        let files = [
            (
                "router.toml",
                "routing_logic = \"least-loaded\"\nengine_stats_interval = 1.5\n\
                 api_keys = [\"sk-a\"]\n[qoe]\nprefix_affinity = 0.5\n\
                 [[backends]]\nurl = \"http://127.0.0.1:9001\"\nmodels = [\"m\"]\n\
                 [[backends]]\nurl = \"http://127.0.0.1:9002\"\nrole = \"decode\"\n",
            ),
            (
                "router.yaml",
                "# the same, in YAML\nrouting_logic: least-loaded\nengine_stats_interval: 1.5\n\
                 api_keys: [sk-a]\nstatic_models:\nqoe:\n  prefix_affinity: 0.5\nbackends:\n\
                 \x20 - url: http://127.0.0.1:9001\n    models: [m]\n\
                 \x20 - url: http://127.0.0.1:9002\n    role: decode\n",
            ),
            (
                "router.JSON",
                r#"{"routing_logic": "least-loaded", "engine_stats_interval": 1.5,
                    "api_keys": ["sk-a"], "static_models": null, "qoe": {"prefix_affinity": 0.5},
                    "backends": [{"url": "http://127.0.0.1:9001", "models": ["m"]},
                                 {"url": "http://127.0.0.1:9002", "role": "decode"}]}"#,
            ),
        ];
        let mut seen = Vec::new();
        for (name, text) in files {
            let path = dir.file(name);
            std::fs::write(&path, text).unwrap();
            let config = RouterConfig::from_args(["x", "--config", path.to_str().unwrap()])
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
            assert_eq!(config.routing_logic, "least-loaded", "{name}");
            let keys: Vec<&str> = config.api_keys.iter().map(|k| k.expose()).collect();
            assert_eq!(keys, ["sk-a"], "{name}");
            let backends = ConfigFile::read(&path).unwrap().backends;
            seen.push((config.effective_toml().unwrap(), format!("{backends:?}")));
        }
        assert!(seen[0].1.contains("9002") && seen[0].0.contains("prefix_affinity = 0.5"));
        assert_eq!(seen[0], seen[1]);
        assert_eq!(seen[0], seen[2]);
        // An empty YAML file sets nothing; one that is not a mapping, or does not parse, says so,
        // and never quotes what it holds.
        let yaml = dir.file("router.yml");
        std::fs::write(&yaml, "# nothing yet\n").unwrap();
        assert!(ConfigFile::read(&yaml).unwrap().settings.is_empty());
        for (text, said) in [
            ("- routing_logic\n", "not a mapping"),
            ("api_keys: [sk-SECRET\nport: 1\n", "YAML: "),
            ("api_keys: [sk-SECRET, null]\n", "null"),
            ("admin_api_key: !!int sk-SECRET\n", "line 1"),
            ("api-keys: [!!bool sk-SECRET]\n", "line 1"),
            (
                "api_keys: [sk-SECRET]\nbackends:\n  - url: http://a:1\nbackends: []\n",
                "the key backends is given twice",
            ),
            (
                "api_keys: [sk-SECRET]\nretry_budget_ratio: .inf\n",
                "not finite",
            ),
            ("engine_stats_interval: .nan\n", "not finite"),
            (
                "routing-logic: random\nrouting_logic: roundrobin\n",
                "the key routing_logic is given twice (with '-' and with '_'",
            ),
        ] {
            std::fs::write(&yaml, text).unwrap();
            let err = format!("{:#}", ConfigFile::read(&yaml).unwrap_err());
            assert!(
                err.contains(said) && err.contains("router.yml"),
                "{text}: {err}"
            );
            assert!(!err.contains("SECRET"), "{text}: {err}");
        }
        let json = dir.file("router.json");
        std::fs::write(&json, r#"{"port": 8000, "port": 8001}"#).unwrap();
        let err = format!("{:#}", ConfigFile::read(&json).unwrap_err());
        assert!(err.contains("the key port is given twice"), "{err}");
        let toml = dir.file("router.toml");
        std::fs::write(&toml, "queue_max = 1\nqueue-max = 2\n").unwrap();
        let err = format!("{:#}", ConfigFile::read(&toml).unwrap_err());
        assert!(
            err.contains("the key queue_max is given twice") && err.contains("router.toml"),
            "{err}"
        );
    }

    #[test]
    fn the_qoe_table_sets_the_policy_and_names_bad_keys() {
        let dir = TestDir::new("table");
        let path = dir.file("router.toml");
        let p = path.to_str().unwrap();
        let load = |text: &str| {
            std::fs::write(&path, text).unwrap();
            RouterConfig::from_args(["x", "--config", p, "--target-ttft", "250"])
                .and_then(|c| c.validate().map(|_| c))
        };
        let c = load(
            "target_ttft = 400\n[qoe]\nprefix_affinity = 0.5\nweight_max = [0.5, 0.8, 0.4, 0.3]\n\
             model_half_life_ms = 60000\n",
        )
        .unwrap();
        let q = c.policy_config().qoe;
        assert_eq!(q.prefix_affinity, 0.5);
        assert_eq!(q.weight_max, [0.5, 0.8, 0.4, 0.3]);
        assert_eq!(q.model_half_life_ms, 60_000.0);
        let d = QoeConfig::default();
        assert_eq!(
            q.priority_fill, d.priority_fill,
            "untouched keys keep their default"
        );
        assert_eq!(q.forgetting, d.forgetting);
        assert_eq!(q.target_ttft_ms, 250.0, "the flag wins over the file");
        // No table: the defaults.
        let c = load("port = 9000\n").unwrap();
        assert_eq!(c.policy_config().qoe.prefix_affinity, d.prefix_affinity);

        let err = |text: &str| load(text).unwrap_err().to_string();
        let e = err("worker_threads = 2\n");
        assert!(e.contains("only as --worker-threads"), "{e}");
        let e = err("[qoe]\nforgetting = 2\n");
        assert!(e.contains("[qoe] forgetting must be in [0.85, 1]"), "{e}");
        let e = err("[qoe]\nprefix_afinity = 0.2\n");
        assert!(e.contains("[qoe] unknown key 'prefix_afinity'"), "{e}");
        let e = err("[qoe]\nprefix_affinity = \"high\"\n");
        assert!(e.contains("[qoe] prefix_affinity: invalid type"), "{e}");
        let e = err("[qoe]\ntarget_ttft_ms = 100\n");
        assert!(
            e.contains("set it with --target-ttft (config key `target_ttft`)"),
            "{e}"
        );
        let e =
            err("[qoe]\nweight_min = [0.7, 0.2, 0.05, 0.05]\nweight_max = [0.6, 0.7, 0.4, 0.3]\n");
        assert!(e.contains("weight_min must not exceed weight_max"), "{e}");
        let e = err("[qoe]\nmax_tracked_endpoints = 0\n");
        assert!(
            e.contains("[qoe] max_tracked_endpoints must be at least 1"),
            "{e}"
        );
        let e = err("qoe = 3\n");
        assert!(e.contains("[qoe] must be a table"), "{e}");
    }

    /// `--tokenizer [MODEL=]PATH,...`, or `tokenizer` in the file as one path or a list.
    #[test]
    fn tokenizers_are_named_by_model_or_for_every_model() {
        let spec = |model: Option<&str>, path: &str| TokenizerSpec {
            model: model.map(str::to_string),
            path: PathBuf::from(path),
        };
        let c = RouterConfig::from_args([
            "x",
            "--tokenizer",
            "meta-llama/Llama-3.1-8B=/m/llama/tokenizer.json,/m/any/tokenizer.json",
        ])
        .unwrap();
        assert_eq!(
            c.tokenizers().unwrap(),
            [
                spec(Some("meta-llama/Llama-3.1-8B"), "/m/llama/tokenizer.json"),
                spec(None, "/m/any/tokenizer.json"),
            ]
        );
        let c = RouterConfig::from_args(["x", "--tokenizer", "=/m/a=b/tokenizer.json"]).unwrap();
        assert_eq!(
            c.tokenizers().unwrap(),
            [spec(None, "/m/a=b/tokenizer.json")]
        );
        for (args, says) in [
            ("/a.json,/b.json", "two tokenizers for every model"),
            ("m=/a.json,m=/b.json", "two tokenizers for the model 'm'"),
            ("m=", "no path"),
        ] {
            let c = RouterConfig::from_args(["x", "--tokenizer", args]).unwrap();
            let err = c.tokenizers().unwrap_err().to_string();
            assert!(err.contains(says), "{args}: {err}");
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(says), "{args}: {err}");
        }
        let dir = TestDir::new("tokenizers");
        let path = dir.file("router.toml");
        for (text, expected) in [
            ("tokenizer = \"/t.json\"\n", vec![spec(None, "/t.json")]),
            (
                "tokenizer = [\"a=/a.json\", \"/t.json\"]\n",
                vec![spec(Some("a"), "/a.json"), spec(None, "/t.json")],
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let c = RouterConfig::from_args(["x", "--config", path.to_str().unwrap()]).unwrap();
            assert_eq!(c.tokenizers().unwrap(), expected, "{text}");
        }
    }

    #[test]
    fn keys_come_from_the_file_and_never_print() {
        let dir = TestDir::new("keys");
        let path = dir.file("router.toml");
        std::fs::write(
            &path,
            "api_keys = [\"sk-file-1\", \"sk-file-2\"]\napi_key_priorities = [\"sk-file-gold=1\"]\nadmin_api_key = \"adm-file\"\ncors_allow_origin = [\"https://a.example\"]\n",
        )
        .unwrap();
        let c = RouterConfig::from_args(["x", "--config", path.to_str().unwrap()]).unwrap();
        c.validate().unwrap();
        assert_eq!(c.api_keys.len(), 2);
        assert_eq!(c.api_keys[1].expose(), "sk-file-2");
        assert_eq!(c.admin_api_key.as_ref().unwrap().expose(), "adm-file");
        let gold = &c.api_key_priorities[0];
        assert_eq!(
            (gold.key.expose(), gold.priority),
            ("sk-file-gold", Some(qoe_core::Priority::HIGH))
        );
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("sk-file") && !debug.contains("adm-file"),
            "{debug}"
        );
    }

    #[test]
    fn validation_names_the_option() {
        let c = RouterConfig::from_args(["x", "--routing-logic", "best"]).unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--routing-logic"));
        let c = RouterConfig::from_args([
            "x",
            "--static-backends",
            "http://127.0.0.1:1,http://127.0.0.1:2,http://127.0.0.1:3",
            "--static-models",
            "a,b",
        ])
        .unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--static-models"));
        let c = RouterConfig::from_args(["x", "--seed", &u64::MAX.to_string()]).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("--seed"));
        let c = RouterConfig::from_args(["x", "--seed", &i64::MAX.to_string()]).unwrap();
        assert!(c
            .effective_toml()
            .unwrap()
            .contains(&format!("seed = {}", i64::MAX)));
        let refused = [
            ("--engine-stats-interval", "1e-12"),
            ("--health-check-interval", "1e20"),
            ("--queue-timeout", "20000000000"),
            ("--breaker-open-secs", "0.0001"),
            ("--request-stats-window", "inf"),
            ("--saturation-kv-usage", "80"),
            ("--max-body-bytes", "0"),
            ("--priority-header", "x prio"),
            ("--sla-header", "x:sla"),
            ("--log-level", "qoe_router=loud"),
            ("--breaker-failures", "0"),
            ("--healthy-threshold", "0"),
            ("--queue-max", "0"),
            ("--first-byte-timeout-ms", "0"),
            ("--idle-timeout-ms", "0"),
        ];
        for (flag, value) in refused {
            let c = RouterConfig::from_args(["x", flag, value]).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(flag) && e.contains(value), "{flag} {value}: {e}");
        }
        let forever = i64::MAX.to_string();
        for (flag, value) in [
            ("--engine-stats-interval", "0.001"),
            ("--health-check-interval", "86400"),
            ("--queue-timeout", "1e9"),
            ("--response-timeout-ms", forever.as_str()),
            ("--saturation-kv-usage", "0.9"),
            ("--log-level", "warn,qoe_router=debug"),
        ] {
            let c = RouterConfig::from_args(["x", flag, value]).unwrap();
            c.validate().unwrap();
        }
    }

    /// TLS options that only work together are refused alone, naming both; files are read at
    /// the check.
    #[test]
    fn tls_options_come_in_pairs_and_their_files_are_read() {
        let refused = |args: &[&str]| {
            let mut argv = vec!["x"];
            argv.extend_from_slice(args);
            let c = RouterConfig::from_args(argv).unwrap();
            c.validate().unwrap_err().to_string()
        };
        let e = refused(&["--tls-cert-file", "/c.pem"]);
        assert!(
            e.contains("--tls-cert-file and --tls-key-file go together"),
            "{e}"
        );
        let e = refused(&["--tls-key-file", "/k.pem"]);
        assert!(
            e.contains("--tls-cert-file and --tls-key-file go together"),
            "{e}"
        );
        let e = refused(&["--tls-client-ca-file", "/ca.pem"]);
        assert!(
            e.contains("--tls-client-ca-file needs --tls-cert-file"),
            "{e}"
        );
        let e = refused(&["--upstream-client-cert", "/c.pem"]);
        assert!(
            e.contains("--upstream-client-cert and --upstream-client-key go together"),
            "{e}"
        );
        let e = refused(&["--upstream-client-key", "/k.pem"]);
        assert!(e.contains("go together"), "{e}");
        let e = refused(&["--upstream-ca-file", "/nonexistent/ca.pem"]);
        assert!(
            e.starts_with("--upstream-ca-file /nonexistent/ca.pem: "),
            "{e}"
        );
        let e = refused(&[
            "--tls-cert-file",
            "/nonexistent/c.pem",
            "--tls-key-file",
            "/k.pem",
        ]);
        assert!(e.starts_with("--tls-cert-file /nonexistent/c.pem: "), "{e}");
    }
}
