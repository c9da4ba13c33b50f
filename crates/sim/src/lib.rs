//! # qoe-sim: a vLLM-like engine in virtual time
//!
//! Routing quality can only be judged against engines that behave like real ones under load, and
//! there is no GPU here. This crate is that engine, built once and used twice: behind a real HTTP
//! port (`qoe-engine`, for tests, the demo and live benchmarks) and inside the offline fleet
//! simulator (thousands of engines in virtual time on two cores).
//!
//! It is pure: no I/O, no clock, no async, no global state. Time is a [`Micros`](qoe_core::Micros)
//! handed in by the driver, and the same seed gives the same behaviour, event for event.
//!
//! * [`engine`]: the model itself: continuous batching, chunked prefill, KV blocks with a prefix
//!   cache, recompute preemption, FCFS or priority scheduling, disaggregated decode.
//! * [`profile`]: how long an iteration takes (FIELD-NOTES' cost model) and the named hardware
//!   profiles (`h100-llama3-8b`, `a100-llama3-8b`, `tiny`).
//! * [`histogram`]: vLLM's latency histograms with vLLM's bucket bounds.
//! * [`rng`]: the seeded random source shared with the HTTP engine.
//!
//! The prompt rule (tokens from bytes, chained block hashes) is `qoe_core::prompt`'s, so the
//! router's prefix index and this engine's prefix cache agree block for block.

pub mod engine;
pub mod histogram;
mod kv;
pub mod profile;
pub mod rng;

pub use engine::{
    ConfigError, Engine, EngineConfig, EngineEvent, EngineStats, FinishReason, Scheduling,
    SimRequest, SubmitError,
};
pub use histogram::Histogram;
pub use profile::{BatchShape, Profile, PROFILE_NAMES};
pub mod fleet;
pub mod report;
pub mod simulate;
pub mod workload;
