//! The command line: one binary, one subcommand per job, each with its own options struct.

use crate::config::{LogFormat, RouterConfig};
use crate::demo::{banner, run_demo, DemoArgs};
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "qoe-router",
    version,
    about = "A QoE-aware router for fleets of LLM inference engines"
)]
pub struct Cli {
    /// Threads of the async runtime (0: one per core). One thread costs less CPU per request
    /// (no cross-thread wake-ups); more scale past one core.
    #[arg(long, global = true, env = "QOE_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the router in front of a fleet of OpenAI-compatible engines.
    Serve(Box<RouterConfig>),
    /// Run a simulated vLLM-compatible engine on a port.
    Engine(Box<qoe_engine::EngineArgs>),
    /// Run a local simulated fleet (fast and slow engines) with the router in front.
    Demo(DemoArgs),
    /// Drive open-loop streaming load at OpenAI-compatible endpoints and report TTFT, ITL,
    /// SLO attainment and QoE.
    Bench(qoe_bench::BenchArgs),
    /// Simulate a fleet in virtual time under each routing policy and report as `bench` does.
    Simulate(qoe_bench::simulate::SimulateArgs),
}

/// Sets up logging: `format` text or JSON, `filter` in tracing's env-filter syntax. Text is
/// coloured only on a terminal (and not under `NO_COLOR`): a log file or journal gets plain lines.
pub fn init_logging(format: LogFormat, filter: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Resolves when the process gets Ctrl-C or SIGTERM; a second one ends the process at once
/// (the first started a drain that may last `--shutdown-timeout-ms`). The signals are handled
/// from this call on (in a runtime), by a task of their own: one that arrives while the router
/// is still starting shuts it down once it listens, and a second one then exits at once too.
/// For the binary: the task outlives the router.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut signals = StopSignals::new();
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let first = signals.next().await;
        tracing::info!("{first}: shutting down (send it again to exit at once)");
        let _ = first_tx.send(());
        let second = signals.next().await;
        tracing::warn!("{second} again: exiting without waiting for the requests in flight");
        std::process::exit(1);
    });
    async move {
        let _ = first_rx.await;
    }
}

/// Ctrl-C and SIGTERM, listened to from creation on (on Unix): one arriving while the previous
/// is handled is not lost; two arriving together count as one.
struct StopSignals {
    #[cfg(unix)]
    listeners: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl StopSignals {
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let listeners = signal(SignalKind::interrupt())
                .and_then(|i| Ok((i, signal(SignalKind::terminate())?)))
                .map_err(|e| tracing::warn!("cannot listen for Ctrl-C or SIGTERM: {e}"))
                .ok();
            Self { listeners }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// The next one, by name.
    async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            let Some((interrupt, terminate)) = &mut self.listeners else {
                return std::future::pending().await;
            };
            tokio::select! {
                _ = interrupt.recv() => "interrupt",
                _ = terminate.recv() => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "interrupt"
        }
    }
}

fn subcommand_matches<'a>(matches: &'a ArgMatches, name: &str) -> &'a ArgMatches {
    matches
        .subcommand_matches(name)
        .expect("clap matched this subcommand")
}

/// Parses the command line `args`, builds the runtime it asks for, and runs it to completion.
pub fn main_with_args<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = Cli::command().get_matches_from(args);
    let cli = Cli::from_arg_matches(&matches)?;
    let runtime = match cli.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if n > 1 {
                builder.worker_threads(n);
            }
            builder.enable_all().build()?
        }
    };
    runtime.block_on(run_command(cli, &matches))
}

/// Runs the command line `args` to completion on the current runtime.
pub async fn run<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches = Cli::command().get_matches_from(args);
    let cli = Cli::from_arg_matches(&matches)?;
    run_command(cli, &matches).await
}

async fn run_command(cli: Cli, matches: &ArgMatches) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(config) => {
            let config = config.with_file(subcommand_matches(matches, "serve"))?;
            if config.print_config {
                config.validate()?;
                // The endpoints' source, checked as `serve` checks it.
                match config.service_discovery {
                    crate::config::DiscoveryKind::Static => {
                        crate::discovery::Discovery::initial(
                            &mut crate::discovery::StaticDiscovery::new(&config),
                        )?;
                    }
                    crate::config::DiscoveryKind::K8s => {
                        crate::kubernetes::K8sDiscovery::new(&config)?;
                    }
                }
                return qoe_bench::print_report(config.effective_toml()?.trim_end());
            }
            // Before the slow part of starting (the first scrape round): a SIGTERM meanwhile
            // stops the router cleanly once it listens.
            let shutdown = shutdown_signal();
            init_logging(config.log_format, &config.log_level);
            config.validate()?;
            if let Some((before, after)) = crate::limits::raise_open_files() {
                tracing::info!(
                    before,
                    after = after.map_or("unlimited".to_string(), |n| n.to_string()),
                    "open-files limit raised to its hard limit"
                );
            }
            let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
                .await
                .map_err(|e| {
                    anyhow::anyhow!("cannot listen on {}:{}: {e}", config.host, config.port)
                })?;
            crate::serve(config, listener, shutdown).await
        }
        Command::Engine(args) => {
            init_logging(LogFormat::Text, "info");
            qoe_engine::run(*args).await
        }
        Command::Demo(demo) => {
            init_logging(LogFormat::Text, &demo.log_level);
            let model = demo.model.clone();
            run_demo(demo, shutdown_signal(), |router, engines| {
                println!("{}", banner(router, engines, &model));
            })
            .await
        }
        Command::Bench(args) => {
            init_logging(LogFormat::Text, "warn");
            qoe_bench::run(args).await
        }
        Command::Simulate(args) => {
            let router = match &args.config {
                Some(file) => RouterConfig::from_args([
                    "qoe-router-serve".as_ref(),
                    "--config".as_ref(),
                    file.as_os_str(),
                ])?,
                None => RouterConfig::from_args(["qoe-router-serve"])?,
            };
            // The simulated engines count tokens by the estimate rule: a tokenizer is not read
            // (the report lists it among the settings not simulated).
            let checked = RouterConfig {
                tokenizer: Vec::new(),
                ..router.clone()
            };
            checked
                .validate()
                .map_err(|e| anyhow::anyhow!("simulate, the router's settings: {e}"))?;
            // The file's [[backends]] are not simulated (the fleet file is), but a file `serve`
            // would refuse is refused here too.
            crate::discovery::Discovery::initial(&mut crate::discovery::StaticDiscovery::new(
                &checked,
            ))
            .map_err(|e| anyhow::anyhow!("simulate, the router's settings: {e:#}"))?;
            qoe_bench::simulate::run(args, &router.simulation_settings())
        }
    }
}
