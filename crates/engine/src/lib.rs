//! # qoe-engine: a vLLM-compatible engine you can run without a GPU
//!
//! The `qoe-sim` engine model behind vLLM's HTTP surface, in real time. The router, its tests, the
//! demo fleet and the live benchmarks talk to it exactly as they talk to vLLM: same routes, same
//! SSE chunks, same `/metrics` names and labels, same error shape. What it adds is control: named
//! hardware profiles, a speed factor, seeded jitter, and faults on demand.
//!
//! Routes:
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/completions`, `POST /v1/chat/completions` | streaming (SSE) or not, `stream_options.include_usage`, `max_tokens` / `max_completion_tokens`, `ignore_eos`, `priority`, `seed`, `kv_transfer_params` |
//! | `GET /v1/models` | served names with `max_model_len` |
//! | `GET /health`, `GET /load`, `GET /version` | readiness (200), requests in the engine, version |
//! | `POST /tokenize` | `{"count", "max_model_len", "tokens"}` by the shared prompt rule |
//! | `GET /metrics` | vLLM V1 metrics (plus V0 names with `--v0-metrics`) |
//! | `GET`/`POST /admin/config` | fault injection, read and partial update |
//! | `GET /admin/stats` | how well the real-time loop keeps its clock (lag now and at most, catch-up iterations, resyncs, time lost) |
//!
//! Output lengths: with `ignore_eos: true` exactly `max_tokens` (default: what fits in
//! `max_model_len`); otherwise a lognormal draw (`--output-len-median`, `--output-len-sigma`)
//! seeded by the engine seed, the request (prompt and body) and its `seed` field, capped by
//! `max_tokens`: unknown in advance to the router, the same on every run. Ending below the cap
//! finishes with `stop`, at the cap with `length`.
//!
//! Modules: [`args`] (options), [`faults`] (fault injection), [`metrics`] (the `/metrics` text);
//! the real-time loop, the OpenAI formats and the handlers are private.

pub mod args;
mod driver;
pub mod faults;
pub mod metrics;
mod openai;
mod server;

pub use args::{EngineArgs, Role};
pub use driver::{LoopStats, CATCH_UP_SLICE, DEFAULT_CATCH_UP_LIMIT};
pub use faults::{FaultDraw, Faults, FaultsUpdate};

use axum::serve::ListenerExt;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Serves the engine on `listener` until `shutdown` completes, then stops the model, ends open
/// streams and hung requests, and returns once every connection is closed.
pub async fn serve(
    args: EngineArgs,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let port = listener.local_addr()?.port();
    let (stop_tx, stop_rx) = watch::channel(false);
    let app = Arc::new(server::App::new(args, port, stop_rx.clone())?);
    let engine_loop = tokio::spawn(app.driver.clone().run(stop_rx));
    // Streams are written token by token: never let Nagle hold a chunk back.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    // If the model loop dies (a bug), every request would wait forever: stop serving instead.
    let (loop_done_tx, loop_done_rx) = tokio::sync::oneshot::channel::<()>();
    let watched_loop = tokio::spawn(async move {
        let result = engine_loop.await;
        let _ = loop_done_tx.send(());
        result
    });
    let signal = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = loop_done_rx => {}
        }
        let _ = stop_tx.send(true);
    };
    let served = axum::serve(listener, server::router(app))
        .with_graceful_shutdown(signal)
        .await;
    let looped = watched_loop.await?;
    served?;
    looped.map_err(|e| anyhow::anyhow!("the engine model loop failed: {e}"))
}

/// Binds `--host:--port` and serves until Ctrl-C.
pub async fn run(args: EngineArgs) -> anyhow::Result<()> {
    args.validate()?;
    let listener = TcpListener::bind((args.host.as_str(), args.port)).await?;
    let addr = listener.local_addr()?;
    tracing::info!(
        %addr,
        models = ?args.models,
        profile = %args.profile,
        role = ?args.role,
        "simulated vLLM engine listening"
    );
    serve(args, listener, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}
