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
//! | `POST /v1/completions`, `POST /v1/chat/completions` | streaming (SSE) or not, `stream_options` (`include_usage`, `continuous_usage_stats`), `max_tokens` / `max_completion_tokens`, `n`, prompt batches, `logprobs` / `top_logprobs`, `echo`, `stop`, `ignore_eos`, `priority`, `seed`, `kv_transfer_params` |
//! | `GET /v1/models` | served names with `max_model_len` |
//! | `GET /health`, `GET /load`, `GET /version` | readiness (200), requests in the engine, version |
//! | `POST /tokenize`, `POST /detokenize` | `{"count", "max_model_len", "tokens", "token_strs"}` by the shared prompt rule; ids back to words |
//! | `GET /metrics` | vLLM V1 metrics (plus V0 names with `--v0-metrics`) |
//! | `GET`/`POST /admin/config` | fault injection, read and partial update |
//! | `GET /admin/stats` | how well the real-time loop keeps its clock (lag now and at most, catch-up iterations, resyncs, time lost), tokens delivered and frames written |
//!
//! Requests are read and refused as vLLM 0.32 reads and refuses them (see `tests/e2e/
//! test_engine_parity.py`, which compares the two). Output lengths: with `ignore_eos: true` exactly
//! `max_tokens` (capped to what fits in `max_model_len`; default 16 for a completion, what fits for
//! a chat, as in vLLM); otherwise a lognormal draw (`--output-len-median`, `--output-len-sigma`)
//! seeded by the engine seed, the request (prompt and body) and its `seed` field, capped by
//! `max_tokens`: unknown in advance to the router, the same on every run. Ending below the cap
//! finishes with `stop`, at the cap with `length`; a `stop` string in the text ends it there.
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
pub use server::MAX_BODY_BYTES;

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Pause after an accept error that is not about one connection (out of file descriptors, ...).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves the engine on `listener` until `shutdown` completes, then stops the model, ends open
/// streams and hung requests, and returns once every connection is closed.
///
/// Connections are served by hyper's HTTP/1.1 server directly (vLLM speaks HTTP/1.1 only), each
/// in its own task: a wake-up of a streaming connection polls its response body and writes what
/// it rendered, nothing else.
pub async fn serve(
    args: EngineArgs,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let port = listener.local_addr()?.port();
    let (stop_tx, stop_rx) = watch::channel(false);
    let app = Arc::new(server::App::new(args, port, stop_rx.clone())?);
    let engine_loop = tokio::spawn(app.driver.clone().run(stop_rx.clone()));
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
    let service = TowerToHyperService::new(server::router(app));
    // Every connection task holds a receiver; `closed()` resolves once the last one is gone.
    let (open_tx, open_rx) = watch::channel(());
    {
        let mut signal = pin!(signal);
        loop {
            let (tcp, _) = tokio::select! {
                biased;
                _ = &mut signal => break,
                accepted = listener.accept() => match accepted {
                    Ok(c) => c,
                    Err(e) if is_connection_error(&e) => continue,
                    Err(e) => {
                        tracing::error!(error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            // Streams are written token by token: never let Nagle hold a chunk back.
            let _ = tcp.set_nodelay(true);
            let service = service.clone();
            let mut stop = stop_rx.clone();
            let open = open_rx.clone();
            tokio::spawn(async move {
                // One frame is a few hundred bytes: copying it behind its chunk header and writing
                // one flat buffer costs less than a three-piece writev.
                let conn = hyper::server::conn::http1::Builder::new()
                    .writev(false)
                    .serve_connection(TokioIo::new(tcp), service);
                let mut conn = pin!(conn);
                let stopping = async move {
                    let _ = stop.wait_for(|stopped| *stopped).await;
                };
                tokio::select! {
                    biased;
                    _ = conn.as_mut() => {}
                    _ = stopping => {
                        // Finish the response in progress (streams end on their own), then close.
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
                drop(open);
            });
        }
    }
    drop(listener);
    drop(open_rx);
    open_tx.closed().await;
    let looped = watched_loop.await?;
    looped.map_err(|e| anyhow::anyhow!("the engine model loop failed: {e}"))
}

/// Errors of `accept` that concern only the connection being accepted.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
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
