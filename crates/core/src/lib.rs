//! # qoe-core: the routing brain
//!
//! Everything that decides *where a request goes* lives here, and nothing else does: no sockets, no
//! async runtime, no wall clock, no global state. A decision is a pure function of
//!
//! * a [`RequestProfile`] (what the request is: model, prompt size, expected output, priority, SLA),
//! * a slice of [`EndpointView`]s (what each candidate endpoint looks like right now), and
//! * `now`, a [`Micros`] timestamp handed in by the caller.
//!
//! Two drivers feed these same types: the live router (wall clock, HTTP) and the fleet simulator
//! (virtual time). Because the brain cannot tell them apart, what the simulator shows about a
//! policy is what the router does.

pub mod analyze;
pub mod endpoint;
pub mod lax;
pub mod policy;
pub mod profile;
pub mod prompt;
pub mod retry_budget;
pub mod saturation;
pub mod stats;

pub use endpoint::{
    Availability, BreakerState, EndpointId, EndpointView, EngineMetrics, Load, ObservedStats, Role,
};
pub use policy::{
    build_policy, Decision, DecisionDetail, Feedback, FeedbackEvent, PolicyConfig, PolicyKind,
    Reason, RoutingPolicy,
};
pub use profile::{ApiKind, Phase, Priority, RequestProfile, Stage};
pub use stats::{RequestOutcome, RequestStats, StatsConfig};

/// Microseconds on a monotonic clock chosen by the driver (process start for the live router,
/// simulation start for the simulator). Only differences between two values are meaningful.
pub type Micros = u64;

/// Microseconds in one millisecond, for readable conversions.
pub const MICROS_PER_MS: u64 = 1_000;
/// Microseconds in one second.
pub const MICROS_PER_SEC: u64 = 1_000_000;

pub mod engine_metrics;
pub mod prom;
pub mod qoe_metric;
pub mod sse;
