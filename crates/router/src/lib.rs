//! # qoe-router
//!
//! A QoE-aware, OpenAI-compatible router for fleets of LLM inference engines (vLLM first). This
//! crate is the live side: the HTTP proxy, discovery, engine scraping, health checks and metrics,
//! plus the command-line face of the whole project. The routing decisions themselves come from
//! [`qoe_core`], the same code the fleet simulator runs.
//!
//! Embedding the router:
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! let config = qoe_router::RouterConfig::from_args([
//!     "qoe-router",
//!     "--static-backends", "http://127.0.0.1:8100,http://127.0.0.1:8101",
//!     "--routing-logic", "least-loaded",
//! ])?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//! qoe_router::serve(config, listener, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

pub mod admission;
pub mod breaker;
pub mod cli;
pub mod client_io;
pub mod config;
pub mod demo;
pub mod discovery;
pub mod endpoints;
pub mod errors;
pub mod kubernetes;
pub mod limits;
pub mod members;
pub mod metrics;
pub mod observe;
pub mod proxy;
pub mod scrape;
pub mod security;
pub mod server;
pub mod stages;
pub mod state;
pub mod tokenizer;
pub mod upstream;
pub mod usage;

pub use config::RouterConfig;
pub use server::{app, build_state, serve, serve_state};
