//! Shared router state: built once at start, read by every request.

use crate::config::RouterConfig;
use crate::endpoints::{Clock, Registry};
use crate::metrics::RouterMetrics;
use crate::upstream::UpstreamClient;
use qoe_core::analyze::AnalyzerConfig;
use qoe_core::RoutingPolicy;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct AppState {
    pub config: RouterConfig,
    pub analyzer: AnalyzerConfig,
    pub registry: Arc<Registry>,
    pub policy: Box<dyn RoutingPolicy>,
    pub client: UpstreamClient,
    pub metrics: RouterMetrics,
    pub clock: Clock,
    pub learned_output: LearnedOutput,
    pub first_byte_timeout: Duration,
    pub response_timeout: Duration,
    pub idle_timeout: Duration,
    pub admission: Arc<crate::admission::Admission>,
    pub retry_budget: qoe_core::retry_budget::RetryBudget,
    /// TLS on the router's own port (`--tls-cert-file`), if any.
    pub server_tls: Option<qoe_tls::ServerTls>,
    /// Set when the shutdown timeout ran out and the router closes the connections left: their
    /// requests end by its hand, not their clients'.
    pub closing_connections: std::sync::atomic::AtomicBool,
    /// The `Via` this router adds to what it forwards, and finds again in a request that came
    /// back to it.
    pub via: Via,
    /// `--max-buffered-body-bytes`; `None` without a limit.
    pub body_budget: Option<Arc<BodyBudget>>,
}

/// The bytes of request bodies the router may hold at once, and those it holds. Nothing waits
/// for room (a body past it is refused), so a counter is all it takes: no lock on either side.
#[derive(Debug)]
pub struct BodyBudget {
    limit: usize,
    held: std::sync::atomic::AtomicUsize,
}

impl BodyBudget {
    pub fn new(limit: usize) -> Self {
        BodyBudget {
            limit,
            held: Default::default(),
        }
    }

    /// Takes `bytes` more for `holding` (created on its first take), if they fit.
    pub fn take(self: &Arc<Self>, bytes: usize, holding: &mut Option<HeldBody>) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let fits = self
            .held
            .fetch_update(Relaxed, Relaxed, |held| {
                held.checked_add(bytes).filter(|&after| after <= self.limit)
            })
            .is_ok();
        if fits {
            holding
                .get_or_insert_with(|| HeldBody {
                    budget: self.clone(),
                    bytes: 0,
                })
                .bytes += bytes;
        }
        fits
    }
}

/// Bytes of one request's body counted in the [`BodyBudget`], given back when dropped.
#[derive(Debug)]
pub struct HeldBody {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl Drop for HeldBody {
    fn drop(&mut self) {
        self.budget
            .held
            .fetch_sub(self.bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

/// This router's `Via` entry (RFC 9110 §7.6.3): `1.1 qoe-router-<id>`, the id drawn at random per
/// process. A request that already carries it has been through this very router: an endpoint
/// leads back to it (the router listed as its own backend, or two routers listing each other),
/// and forwarding it again would loop until some limit broke.
#[derive(Debug, Clone)]
pub struct Via {
    /// This process's pseudonym, `qoe-router-` and 16 hex digits.
    pub token: String,
    http10: http::HeaderValue,
    http11: http::HeaderValue,
    http2: http::HeaderValue,
}

impl Via {
    pub fn new(id: u64) -> Self {
        let token = format!("qoe-router-{id:016x}");
        let value = |version: &str| {
            http::HeaderValue::try_from(format!("{version} {token}")).expect("ASCII")
        };
        Via {
            http10: value("1.0"),
            http11: value("1.1"),
            http2: value("2"),
            token,
        }
    }

    /// The entry for a request received in `version`.
    pub fn entry(&self, version: http::Version) -> &http::HeaderValue {
        match version {
            http::Version::HTTP_10 => &self.http10,
            http::Version::HTTP_2 => &self.http2,
            _ => &self.http11,
        }
    }

    /// Whether `headers` hold this router's entry already.
    pub fn seen_in(&self, headers: &http::HeaderMap) -> bool {
        headers
            .get_all(http::header::VIA)
            .iter()
            .any(|v| memchr::memmem::find(v.as_bytes(), self.token.as_bytes()).is_some())
    }
}

/// Running estimate of output length per model, for requests that give neither the header nor
/// `max_tokens`. Bounded: at most [`LearnedOutput::MAX_MODELS`] models are remembered (only models
/// some endpoint serves ever reach it).
#[derive(Debug)]
pub struct LearnedOutput {
    default: u32,
    by_model: Mutex<HashMap<String, f64>>,
}

impl LearnedOutput {
    pub const MAX_MODELS: usize = 1024;
    const ALPHA: f64 = 0.05;

    pub fn new(default: u32) -> Self {
        LearnedOutput {
            default,
            by_model: Mutex::new(HashMap::new()),
        }
    }

    pub fn estimate(&self, model: &str) -> u32 {
        let map = self.by_model.lock().unwrap_or_else(|e| e.into_inner());
        map.get(model)
            .map_or(self.default, |v| v.round().max(1.0) as u32)
    }

    /// Learns from a finished answer's length, capped as a `max_tokens` is (an engine's count,
    /// not a client's, but no sounder for that).
    pub fn record(&self, model: &str, output_tokens: u32) {
        let output_tokens = output_tokens.min(qoe_core::analyze::MAX_EXPECTED_OUTPUT);
        let mut map = self.by_model.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = map.get_mut(model) {
            *v += Self::ALPHA * (output_tokens as f64 - *v);
        } else if map.len() < Self::MAX_MODELS {
            map.insert(model.to_string(), output_tokens as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_budget_counts_bytes_and_gives_them_back() {
        let budget = Arc::new(BodyBudget::new(4000));
        let (mut a, mut b) = (None, None);
        assert!(budget.take(3000, &mut a));
        assert!(budget.take(1000, &mut a), "exactly the limit fits");
        assert!(!budget.take(1, &mut b), "one byte more does not");
        assert!(b.is_none());
        drop(a);
        assert!(budget.take(4000, &mut b));
        assert!(!budget.take(usize::MAX, &mut b), "no overflow");
        drop(b);
        assert!(budget.take(4000, &mut None));
    }

    #[test]
    fn an_absurd_engine_count_is_learned_capped() {
        let learned = LearnedOutput::new(256);
        learned.record("m", u32::MAX);
        assert_eq!(
            learned.estimate("m"),
            qoe_core::analyze::MAX_EXPECTED_OUTPUT
        );
        learned.record("m", u32::MAX);
        assert_eq!(
            learned.estimate("m"),
            qoe_core::analyze::MAX_EXPECTED_OUTPUT
        );
        assert_eq!(learned.estimate("other"), 256);
    }
}
