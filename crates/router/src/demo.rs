//! `qoe-router demo`: a heterogeneous simulated fleet with the router in front, in one command.
//!
//! Engines run in this process on ephemeral 127.0.0.1 ports (two fast H100-class, two slower
//! A100-class at half speed, by default); the router listens on `--host:--port`. Ctrl-C stops
//! everything cleanly: the router first, as `serve` stops (the streams in flight finish), then
//! the engines. The environment's config file, TLS, key and discovery settings (`QOE_*`) do not
//! apply.

use crate::config::RouterConfig;
use clap::{Args, Parser};
use qoe_engine::EngineArgs;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Options of `qoe-router demo`.
#[derive(Args, Clone, Debug)]
pub struct DemoArgs {
    /// Router address.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Router port (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Routing policy of the router.
    #[arg(long, default_value = "qoe")]
    pub routing_logic: String,
    /// Model name the engines serve.
    #[arg(long, default_value = "sim-llama")]
    pub model: String,
    /// Fast engines (h100-llama3-8b at full speed).
    #[arg(long, default_value_t = 2)]
    pub fast: usize,
    /// Slow engines (a100-llama3-8b at half speed).
    #[arg(long, default_value_t = 2)]
    pub slow: usize,
    /// Router log filter.
    #[arg(long, default_value = "info")]
    pub log_level: String,
}

#[derive(Parser)]
struct EngineOnly {
    #[command(flatten)]
    args: EngineArgs,
}

/// Engine options from command-line style flags.
pub fn engine_args(flags: &[&str]) -> anyhow::Result<EngineArgs> {
    let argv = std::iter::once("engine").chain(flags.iter().copied());
    Ok(EngineOnly::try_parse_from(argv)?.args)
}

/// Runs the demo until `shutdown`; calls `ready` with the router URL once it listens.
pub async fn run_demo(
    demo: DemoArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(&str, &[String]),
) -> anyhow::Result<()> {
    // The engines stop after the router has drained its streams (they are what it drains).
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut engines = Vec::new();
    let mut urls = Vec::new();
    let kinds = std::iter::repeat_n(("h100-llama3-8b", "1.0"), demo.fast)
        .chain(std::iter::repeat_n(("a100-llama3-8b", "0.5"), demo.slow));
    for (i, (profile, speed)) in kinds.enumerate() {
        let seed = (i + 1).to_string();
        let args = engine_args(&[
            "--port",
            "0",
            "--model",
            &demo.model,
            "--profile",
            profile,
            "--speed",
            speed,
            "--seed",
            &seed,
            "--jitter",
            "0.05",
        ])?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        urls.push(format!("http://{}", listener.local_addr()?));
        engines.push(tokio::spawn(qoe_engine::serve(args, listener, stopped())));
    }
    // Its own fleet: no config file's backends (`QOE_CONFIG`) join it.
    let mut config = RouterConfig::from_args_without_file([
        "qoe-router",
        "--host",
        &demo.host,
        "--port",
        &demo.port.to_string(),
        "--static-backends",
        &urls.join(","),
        "--static-models",
        &demo.model,
        "--routing-logic",
        &demo.routing_logic,
        "--log-level",
        &demo.log_level,
    ])?;
    // The demo's router speaks plain HTTP to its own engines and takes the banner's curl, as
    // the banner says, whatever QOE_TLS_*, key or discovery settings the environment holds
    // (tuning such as QOE_LOG_FORMAT or QOE_MAX_RETRIES still applies).
    config.tls_cert_file = None;
    config.tls_key_file = None;
    config.tls_client_ca_file = None;
    config.api_keys.clear();
    config.api_key_priorities.clear();
    config.admin_api_key = None;
    config.upstream_api_key = None;
    config.service_discovery = crate::config::DiscoveryKind::Static;
    config.upstream_ca_file = None;
    config.upstream_client_cert = None;
    config.upstream_client_key = None;
    config.validate()?;
    let listener = TcpListener::bind((config.host.as_str(), config.port))
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", config.host, config.port))?;
    let router_url = format!("http://{}", listener.local_addr()?);
    let router = tokio::spawn(crate::serve(config, listener, shutdown));
    ready(&router_url, &urls);
    // The router's own shutdown: it stops listening and lets the streams in flight finish
    // (`--shutdown-timeout-ms`), then the engines stop.
    let served = router.await;
    let _ = stop_tx.send(true);
    served??;
    for e in engines {
        e.await??;
    }
    Ok(())
}

/// What the demo prints once it is up.
pub fn banner(router: &str, engines: &[String], model: &str) -> String {
    format!(
        "qoe-router demo: {n} simulated engines behind {router}\n  engines: {list}\n  state:   curl -s {router}/engines\n  metrics: curl -s {router}/metrics\n\nTry it:\n  curl -N {router}/v1/chat/completions -H 'content-type: application/json' -H 'x-request-priority: 1' \\\n    -d '{{\"model\":\"{model}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}],\"max_tokens\":32,\"stream\":true}}'\n\nCtrl-C stops the fleet (streams in flight finish first; a second Ctrl-C at once).",
        n = engines.len(),
        list = engines.join(" "),
    )
}
