//! Background loops that keep the endpoint table informed: engine `/metrics` scraping (with model
//! detection from `/v1/models`) and active `/health` checks.
//!
//! Every endpoint is polled concurrently, each request with a timeout no longer than its interval,
//! so one stuck engine delays nothing else. Scraped values are stamped with the time they were
//! read; policies see their age.

use crate::endpoints::{Clock, Endpoint, Registry};
use crate::upstream::{get, GetError, UpstreamClient, METRICS_BODY_LIMIT, SMALL_BODY_LIMIT};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Scrapes one endpoint's `/metrics` into its state; what only the previous scrape can tell (the
/// hit rate over the interval, the peak of running requests) is derived by
/// [`qoe_core::EngineMetrics::follow`].
pub async fn scrape_once(
    client: &UpstreamClient,
    endpoint: &Endpoint,
    clock: &Clock,
    timeout: Duration,
) {
    endpoint.pool.prune();
    // Both at once: a round takes one timeout at most, so a stuck engine cannot slow the loop
    // (which waits for every endpoint's round) below one round per interval.
    let metrics = async {
        let url = format!("{}/metrics", endpoint.url);
        match get(client, &url, timeout, METRICS_BODY_LIMIT).await {
            Ok(body) => {
                let text = String::from_utf8_lossy(&body);
                let mut metrics = qoe_core::engine_metrics::parse_engine_metrics(&text, None);
                let warned = &endpoint.metrics_warned;
                if !metrics.reports_load() {
                    // Not an engine's metrics (a proxy's page, another server's, a broken
                    // exporter): no fresher than none, so the last reading ages as it would.
                    if !warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            endpoint = %endpoint.url,
                            "/metrics answered without vLLM or SGLang load metrics (running, waiting, KV cache usage)"
                        );
                    }
                    return;
                }
                warned.store(false, Ordering::Relaxed);
                metrics.follow(endpoint.engine_sample().map(|s| s.metrics).as_ref());
                endpoint.set_engine_metrics(metrics, clock.now());
            }
            // Not transient: say so where an operator looks.
            Err(e @ GetError::TooLong(_)) => {
                tracing::warn!(endpoint = %endpoint.url, "metrics scrape refused: {e}")
            }
            Err(e) => tracing::debug!(endpoint = %endpoint.url, "metrics scrape failed: {e}"),
        }
    };
    futures_util::future::join(metrics, refresh_models(client, endpoint, timeout)).await;
}

/// Reads the endpoint's `/v1/models` (its model list when none was configured, and the model
/// objects the merged `/v1/models` serves).
pub async fn refresh_models(client: &UpstreamClient, endpoint: &Endpoint, timeout: Duration) {
    let url = format!("{}/v1/models", endpoint.url);
    let warned = &endpoint.models_warned;
    match get(client, &url, timeout, SMALL_BODY_LIMIT).await {
        Ok(body) => match parse_model_cards(&body) {
            Some(cards) => {
                endpoint.set_model_cards(cards);
                warned.store(false, Ordering::Relaxed);
            }
            None => {
                tracing::warn!(endpoint = %endpoint.url, "/v1/models answered without a model list")
            }
        },
        // A healthy endpoint that knows no model takes no request (an engine run with
        // `--api-key` answers 401 here without `--upstream-api-key`): say why, once, where an
        // operator looks.
        Err(e)
            if (matches!(e, GetError::TooLong(_))
                || (endpoint.is_healthy() && !endpoint.knows_models()))
                && !warned.swap(true, Ordering::Relaxed) =>
        {
            tracing::warn!(endpoint = %endpoint.url, "model list failed: {e}")
        }
        Err(e) => tracing::debug!(endpoint = %endpoint.url, "model list failed: {e}"),
    }
}

/// The model objects of an OpenAI `/v1/models` response.
pub fn parse_model_cards(body: &[u8]) -> Option<Vec<serde_json::Value>> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let cards = v.get("data")?.as_array()?.clone();
    Some(
        cards
            .into_iter()
            .filter(|m| m.get("id").is_some_and(|id| id.is_string()))
            .collect(),
    )
}

/// One `/health` check.
pub async fn check_health_once(
    client: &UpstreamClient,
    endpoint: &Endpoint,
    clock: &Clock,
    timeout: Duration,
    unhealthy_after: u32,
    healthy_after: u32,
) {
    let url = format!("{}/health", endpoint.url);
    let result = get(client, &url, timeout, SMALL_BODY_LIMIT)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    if let Err(e) = &result {
        if endpoint.is_healthy() {
            tracing::warn!(endpoint = %endpoint.url, "health check failed: {e}");
        }
    }
    endpoint.record_health(result, clock.now(), unhealthy_after, healthy_after);
}

/// Runs `each` on every endpoint of the current table, concurrently, every `interval`.
pub fn spawn_loop<F, Fut>(
    registry: Arc<Registry>,
    interval: Duration,
    each: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(Arc<Endpoint>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let table = registry.table();
            let rounds: Vec<_> = table.endpoints.iter().cloned().map(&each).collect();
            futures_util::future::join_all(rounds).await;
        }
    })
}
