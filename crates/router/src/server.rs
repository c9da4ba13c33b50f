//! The router's HTTP face: its own endpoints (`/health`, `/ready`, `/metrics`, `/engines`, the merged
//! `/v1/models`) and the proxy for everything else, plus start-up and graceful shutdown.

use crate::client_io::WriteDeadline;
use crate::config::{DiscoveryKind, RouterConfig};
use crate::discovery::{Discovery, StaticDiscovery};
use crate::endpoints::{Clock, Registry};
use crate::metrics::RouterMetrics;
use crate::proxy::{proxy, FLAP_WINDOW};
use crate::scrape;
use crate::state::{AppState, LearnedOutput};
use crate::upstream;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use http::{header, HeaderValue};
use hyper::body::Incoming;
use qoe_core::build_policy;
use serde_json::json;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Builds the router's state from a validated config. The endpoint table starts empty; [`serve`]
/// fills it from discovery.
pub fn build_state(config: RouterConfig) -> anyhow::Result<Arc<AppState>> {
    config.validate_settings()?;
    let (tls, server_tls) = config.tls()?;
    let client = upstream::client(
        Duration::from_millis(config.connect_timeout_ms),
        config.pool_max_idle_per_host,
        config.upstream_authorization(),
        &tls,
    );
    let metrics = RouterMetrics::new();
    let mut analyzer = config.analyzer_config();
    let mut loaded: Vec<(std::path::PathBuf, qoe_core::prompt::PromptTokenizer)> = Vec::new();
    for spec in config.tokenizers()? {
        // A file named for several models is read once.
        let tokenizer = match loaded.iter().find(|(path, _)| *path == spec.path) {
            Some((_, t)) => t.clone(),
            None => {
                let fallbacks = metrics.chat_template_fallbacks.clone();
                let t = crate::tokenizer::load(&spec.path, fallbacks)?;
                loaded.push((spec.path.clone(), t.clone()));
                t
            }
        };
        match spec.model {
            Some(model) => analyzer.model_tokenizers.push((model, tokenizer)),
            None => analyzer.tokenizer = Some(tokenizer),
        }
    }
    let clock = Clock::new();
    Ok(Arc::new(AppState {
        analyzer,
        registry: Arc::new(Registry::new(
            config.stats_config(),
            config.breaker_config(),
            upstream::PoolConfig {
                connect_timeout: Duration::from_millis(config.connect_timeout_ms),
                max_idle: config.pool_max_idle_per_host,
                idle_timeout: upstream::POOL_IDLE_TIMEOUT,
                tls: Some(tls),
            },
            clock,
        )),
        policy: build_policy(config.policy_kind(), &config.policy_config()),
        client,
        metrics,
        clock,
        learned_output: LearnedOutput::new(config.default_output_tokens),
        first_byte_timeout: Duration::from_millis(config.first_byte_timeout_ms),
        response_timeout: Duration::from_millis(config.response_timeout_ms),
        idle_timeout: Duration::from_millis(config.idle_timeout_ms),
        admission: Arc::new(crate::admission::Admission::new(config.admission_config())),
        retry_budget: qoe_core::retry_budget::RetryBudget::new(config.retry_budget()),
        server_tls,
        closing_connections: Default::default(),
        via: crate::state::Via::new(rand::random()),
        body_budget: (config.body_budget() > 0)
            .then(|| Arc::new(crate::state::BodyBudget::new(config.body_budget()))),
        config,
    }))
}

/// The router's own routes (not guarded, no fallback, no state yet).
fn own_routes() -> axum::Router<Arc<AppState>> {
    axum::Router::new()
        .route("/health", get(health).fallback(method_not_allowed))
        .route("/ready", get(ready).fallback(method_not_allowed))
        .route("/metrics", get(metrics).fallback(method_not_allowed))
        .route("/engines", get(engines).fallback(method_not_allowed))
        .route("/v1/models", get(models).fallback(method_not_allowed))
}

/// Another method than GET on one of the router's own routes: 405 in OpenAI's shape.
async fn method_not_allowed(method: http::Method, uri: http::Uri) -> Response {
    let error = crate::errors::ApiError::new(
        http::StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}; use GET", uri.path()),
    );
    let mut response = error.into_response();
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    response
}

/// Whether [`own_routes`] has `path`; every other path is proxied.
pub(crate) fn is_own_route(path: &str) -> bool {
    matches!(
        path,
        "/health" | "/ready" | "/metrics" | "/engines" | "/v1/models"
    )
}

/// The axum application over `state`, for embedding in a larger axum app. ([`serve_state`] runs
/// the same behaviour as a [`Front`]; served with `into_make_service_with_connect_info::
/// <SocketAddr>()`, it appends the client's address to `X-Forwarded-For` as `serve` does.)
///
/// One middleware layer ([`crate::security::guard`]): CORS outermost (answers preflights itself),
/// then the header size limit, then the API and admin keys; then the routes.
pub fn app(state: Arc<AppState>) -> axum::Router {
    use axum::middleware::from_fn_with_state;
    own_routes()
        .fallback(proxy)
        .layer(from_fn_with_state(state.clone(), crate::security::guard))
        .with_state(state)
}

/// What [`serve_state`] serves: [`app`]'s behaviour, with a proxied request going from the guard
/// straight to [`proxy`]. Through axum's router and layer, the request's way to the proxy took
/// about ten allocations (a clone of each boxed service, a boxed future per layer); here it takes
/// one. The router's own routes still go through axum.
#[derive(Clone)]
pub struct Front {
    state: Arc<AppState>,
    own: axum::Router,
    /// The client's address, on a connection's own copy, written once per connection: appended
    /// to `X-Forwarded-For`.
    peer: Option<http::HeaderValue>,
}

impl Front {
    pub fn new(state: Arc<AppState>) -> Self {
        Front {
            own: own_routes().with_state(state.clone()),
            state,
            peer: None,
        }
    }
}

impl tower_service::Service<Request> for Front {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let Front {
            state,
            mut own,
            peer,
        } = self.clone();
        Box::pin(async move {
            let response = crate::security::guarded(&state, request, |request| async {
                if is_own_route(request.uri().path()) {
                    let ready = std::future::poll_fn(|cx| {
                        tower_service::Service::<Request>::poll_ready(&mut own, cx)
                    });
                    let Ok(()) = ready.await;
                    let Ok(response) =
                        tower_service::Service::<Request>::call(&mut own, request).await;
                    response
                } else {
                    let mut request = request;
                    if let Some(peer) = peer {
                        crate::proxy::add_forwarded_for(request.headers_mut(), &peer);
                    }
                    proxy(State(state.clone()), request).await
                }
            })
            .await;
            Ok(response)
        })
    }
}

/// Runs the router on `listener` until `shutdown` completes, then drains in-flight requests.
pub async fn serve(
    config: RouterConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = build_state(config)?;
    serve_state(state, listener, shutdown).await
}

/// As [`serve`], with a state built by [`build_state`] (for embedding).
pub async fn serve_state(
    state: Arc<AppState>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = &state.config;
    let mut discovery: Box<dyn Discovery> = match config.service_discovery {
        DiscoveryKind::Static => Box::new(StaticDiscovery::new(config)),
        DiscoveryKind::K8s => Box::new(crate::kubernetes::K8sDiscovery::new(config)?),
    };
    let initial = discovery.initial()?;
    let k8s_set = config.k8s_namespace.is_some()
        || !config.k8s_label_selector.is_empty()
        || config.k8s_api_server.is_some();
    if config.body_budget() > config.max_buffered_body_bytes && config.max_buffered_body_bytes > 0 {
        tracing::warn!(
            max_body_bytes = config.max_body_bytes,
            "--max-buffered-body-bytes ({}) is below --max-body-bytes: raised to it, so that a \
             body the limit allows fits",
            config.max_buffered_body_bytes
        );
    }
    if config.sla_enforcement == crate::config::SlaEnforcement::Shed
        && config.policy_kind() != qoe_core::PolicyKind::Qoe
    {
        tracing::warn!(
            policy = state.policy.name(),
            "--sla-enforcement shed does nothing without --routing-logic qoe: only qoe predicts \
             the time to first token a deadline is checked against"
        );
    }
    if k8s_set && config.service_discovery == DiscoveryKind::Static {
        tracing::warn!("--k8s-* settings are ignored without --service-discovery k8s");
    }
    if initial.is_empty() && config.service_discovery == DiscoveryKind::Static {
        tracing::warn!(
            "no endpoints configured yet: add --static-backends or [[backends]] in --config"
        );
    }
    state.registry.apply(&initial);
    let (tx, mut rx) = watch::channel(initial);
    let mut tasks = vec![discovery.run(tx)];

    // Model lists first, so requests can be routed as soon as we listen.
    let timeout = config.engine_stats_interval().min(Duration::from_secs(5));
    let first_round: Vec<_> = state
        .registry
        .table()
        .endpoints
        .iter()
        .map(|e| {
            let (state, e) = (state.clone(), e.clone());
            async move { scrape::scrape_once(&state.client, &e, &state.clock, timeout).await }
        })
        .collect();
    futures_util::future::join_all(first_round).await;

    let reload_state = state.clone();
    tasks.push(tokio::spawn(async move {
        // New endpoints' model detections run beside the next change (an engine slow to list
        // its models must not hold up a removal), one at a time per endpoint; they end with
        // this task.
        let mut detecting = tokio::task::JoinSet::new();
        while rx.changed().await.is_ok() {
            let specs = rx.borrow_and_update().clone();
            reload_state.registry.apply(&specs);
            let table = reload_state.registry.table();
            tracing::info!(endpoints = table.endpoints.len(), "endpoint set applied");
            while detecting.try_join_next().is_some() {}
            // New endpoints, and those told to detect their models, learn them now, together.
            let claimed: Vec<_> = table
                .endpoints
                .iter()
                .filter(|e| e.engine_sample().is_none() || !e.knows_models())
                .filter(|e| !e.detecting_models.swap(true, Ordering::AcqRel))
                .cloned()
                .collect();
            if claimed.is_empty() {
                continue;
            }
            let state = reload_state.clone();
            detecting.spawn(async move {
                let detections = claimed.iter().map(|e| async {
                    scrape::refresh_models(&state.client, e, timeout).await;
                    e.detecting_models.store(false, Ordering::Release);
                });
                futures_util::future::join_all(detections).await;
            });
        }
    }));
    // The endpoint labels of metrics are dropped as endpoints leave even when nothing reads
    // /metrics (which refreshes them too): with Kubernetes' pod churn they would otherwise grow
    // with every endpoint ever seen.
    let s = state.clone();
    tasks.push(tokio::spawn(async move {
        let mut ticker = tokio::time::interval(METRICS_PRUNE_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            s.metrics.refresh(&s.registry, s.clock.now());
        }
    }));
    let s = state.clone();
    tasks.push(scrape::spawn_loop(
        state.registry.clone(),
        config.engine_stats_interval(),
        move |e| {
            let s = s.clone();
            async move { scrape::scrape_once(&s.client, &e, &s.clock, timeout).await }
        },
    ));
    let s = state.clone();
    let health_timeout = config.health_check_interval().min(Duration::from_secs(5));
    tasks.push(scrape::spawn_loop(
        state.registry.clone(),
        config.health_check_interval(),
        move |e| {
            let s = s.clone();
            async move {
                let c = &s.config;
                scrape::check_health_once(
                    &s.client,
                    &e,
                    &s.clock,
                    health_timeout,
                    c.unhealthy_threshold,
                    c.healthy_threshold,
                )
                .await
            }
        },
    ));

    if config.checks_api_keys() && config.admin_api_key.is_none() {
        tracing::warn!(
            "API keys are set but --admin-api-key is not: /engines and /metrics are open to anyone who can reach the router"
        );
    }
    let addr = listener.local_addr()?;
    let scheme = if state.server_tls.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(%addr, scheme, policy = state.policy.name(), "qoe-router listening");
    let max_connections =
        crate::limits::max_connections(config.max_connections, crate::limits::open_files());
    let timeouts = ConnectionTimeouts {
        max_connections,
        header: Duration::from_millis(config.request_read_timeout_ms),
        write: Duration::from_millis(config.request_read_timeout_ms),
        shutdown: Duration::from_millis(config.shutdown_timeout_ms),
    };
    let tls = state.server_tls.clone();
    serve_connections(listener, Front::new(state), tls, timeouts, shutdown).await;
    for t in tasks {
        t.abort();
    }
    Ok(())
}

/// How long a client may take over its request's headers, and to take what the router writes
/// ([`WriteDeadline`]), and how long the requests in flight at shutdown may take to finish.
#[derive(Clone, Copy)]
struct ConnectionTimeouts {
    /// Client connections open at once (`--max-connections`, resolved).
    max_connections: usize,
    header: Duration,
    write: Duration,
    shutdown: Duration,
}

/// Accepts connections and serves each with `front` until `shutdown` completes, then lets the
/// open ones finish their requests for up to `timeouts.shutdown` and closes what remains (its
/// requests' upstream connections are dropped with them: the engines abort them). A client has
/// `timeouts.header` from its connection's start to send a request's headers, and as long between
/// requests (hyper's header timeout in HTTP/1.1, [`Protocols::serve`]'s idle timer in HTTP/2): a
/// client that opens connections and never finishes a request would otherwise hold a socket each,
/// forever. With `tls`, each connection's handshake runs in its own task, within
/// [`TLS_HANDSHAKE_TIMEOUT`] (or the header timeout if shorter) and abandoned at shutdown; a
/// connection that opens with plain HTTP gets a 400 saying so.
///
/// HTTP/1.1 and HTTP/2 alike (see [`Protocols`]): over TLS as ALPN agrees, in cleartext by the
/// connection's first bytes (HTTP/2 with prior knowledge, as gRPC-style clients and service
/// meshes send it). Toward the engines it is HTTP/1.1 either way.
async fn serve_connections(
    listener: TcpListener,
    front: Front,
    tls: Option<qoe_tls::ServerTls>,
    timeouts: ConnectionTimeouts,
    shutdown: impl Future<Output = ()>,
) {
    let protocols = Protocols::new(timeouts, front.state.config.max_header_bytes);
    let mut shutdown = std::pin::pin!(shutdown);
    // Every connection, and every handshake or first read in progress, winds down when this
    // turns true.
    let (closing, closing_rx) = watch::channel(false);
    let handshake_timeout = TLS_HANDSHAKE_TIMEOUT.min(timeouts.header);
    // Every connection's task, to wait for at shutdown and close what outlasts its timeout.
    // Finished ones are reaped at each accept, so it holds at most the connections open at the
    // last accept.
    let mut connections = tokio::task::JoinSet::new();
    // At the connection limit since the last accept that was not (logged once per episode).
    let mut refusing = false;
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: give the open ones time to close.
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let accepted = tokio::time::Instant::now();
        while connections.try_join_next().is_some() {}
        if connections.len() >= timeouts.max_connections {
            // Closed at once: its descriptor is worth more to the connections the router has
            // (and their upstream ones) than an answer is to it.
            drop(tcp);
            front.state.metrics.connections_refused.inc();
            if !refusing {
                refusing = true;
                tracing::warn!(
                    open = connections.len(),
                    "connection limit reached (--max-connections): closing new connections"
                );
            }
            continue;
        }
        if refusing {
            refusing = false;
            tracing::info!(open = connections.len(), "below the connection limit again");
        }
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY not set: {e}");
        }
        let front = Front {
            peer: http::HeaderValue::try_from(peer.ip().to_canonical().to_string()).ok(),
            ..front.clone()
        };
        let (tls, protocols) = (tls.clone(), protocols.clone());
        let mut closing = closing_rx.clone();
        connections.spawn(async move {
            let Some(tls) = tls else {
                let first_bytes = tokio::time::timeout(timeouts.header, sniff(&tcp));
                let protocol = tokio::select! {
                    sniffed = first_bytes => match sniffed {
                        Ok(Ok((Some(protocol), _))) => protocol,
                        Ok(Ok((None, _))) | Ok(Err(_)) => return,
                        Err(_) => return tracing::debug!("no request within the header timeout"),
                    },
                    _ = closing.wait_for(|c| *c) => return,
                };
                return protocols
                    .serve(protocol, tcp, front, accepted, closing)
                    .await;
            };
            let handshake = tokio::time::timeout(handshake_timeout, secure(&tls, tcp));
            let stream = tokio::select! {
                secured = handshake => match secured {
                    Ok(Some(stream)) => stream,
                    Ok(None) => return,
                    Err(_) => return tracing::debug!("TLS handshake timed out"),
                },
                _ = closing.wait_for(|c| *c) => return,
            };
            let protocol = match stream.get_ref().1.alpn_protocol() {
                Some(b"h2") => Protocol::Http2,
                _ => Protocol::Http1,
            };
            protocols
                .serve(protocol, stream, front, accepted, closing)
                .await;
        });
    }
    drop(listener);
    let _ = closing.send(true);
    tracing::info!(
        timeout_ms = timeouts.shutdown.as_millis() as u64,
        "not accepting connections; waiting for the requests in flight"
    );
    let drained = tokio::time::timeout(timeouts.shutdown, async {
        while connections.join_next().await.is_some() {}
    });
    if drained.await.is_err() {
        tracing::warn!(
            connections = connections.len(),
            "requests still in flight after --shutdown-timeout-ms: closing their connections"
        );
        front
            .state
            .closing_connections
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    // Aborts what is left (dropping a connection drops its requests' upstream connections too)
    // and waits for it.
    connections.shutdown().await;
}

/// The HTTP versions a client connection may speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// The most requests one HTTP/2 connection may have in flight at once (hyper's default, stated
/// here: a client that wants more opens another connection, as with HTTP/1.1).
pub const HTTP2_MAX_CONCURRENT_STREAMS: u32 = 200;

/// How long an HTTP/2 connection draining at shutdown is still driven once its last stream has
/// ended, for what it has yet to write of it.
const HTTP2_FLUSH_GRACE: Duration = Duration::from_secs(1);

/// The most header fields a request may have: hyper's own limit for HTTP/1.1, applied to HTTP/2
/// by the router's header check.
pub const MAX_HEADER_FIELDS: usize = 100;

/// The connection settings of either HTTP version.
#[derive(Clone)]
struct Protocols {
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<hyper_util::rt::TokioExecutor>,
    /// How long a client has for a request's headers, from its connection's start or the end of
    /// its previous request (HTTP/2: until its connection has a stream open).
    header: Duration,
    /// How long a write may wait on a client that takes nothing.
    write: Duration,
}

impl Protocols {
    fn new(timeouts: ConnectionTimeouts, max_header_bytes: usize) -> Self {
        use hyper_util::rt::{TokioExecutor, TokioTimer};
        let mut http1 = hyper::server::conn::http1::Builder::new();
        // The full timeout for every request's headers and keep-alive gap; the first request's
        // deadline from the connection's start is [`run`]'s.
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(timeouts.header);
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        // HTTP/2 counts 32 bytes more per header than `--max-header-bytes` does: with room to
        // spare, the router's own check answers an oversized request, in OpenAI's shape.
        let header_list = max_header_bytes.saturating_mul(2).saturating_add(16 * 1024);
        // A client that stops reading its connection answers no PING: past the write
        // deadline's time it is let go, as over HTTP/1.1 ([`WriteDeadline`] alone cannot see
        // it here: a stream's flow-control window stops the writes before the socket does).
        let ping = timeouts.write / 2;
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(HTTP2_MAX_CONCURRENT_STREAMS)
            .max_header_list_size(u32::try_from(header_list).unwrap_or(u32::MAX))
            .keep_alive_interval(Some(ping))
            .keep_alive_timeout(ping);
        Protocols {
            http1,
            http2,
            header: timeouts.header,
            write: timeouts.write,
        }
    }

    /// Serves `io`, accepted at `accepted`, with `front`, in `protocol` until the client closes
    /// it, it stays idle past the header timeout, or `closing` turns true (then its requests in
    /// flight finish first).
    async fn serve<I>(
        &self,
        protocol: Protocol,
        io: I,
        front: Front,
        accepted: tokio::time::Instant,
        closing: watch::Receiver<bool>,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let io = hyper_util::rt::TokioIo::new(WriteDeadline::new(io, self.write));
        // The first request's headers are due within the header timeout of the connection's
        // start, the TLS handshake or the first bytes' wait included; hyper's own timer (the
        // full timeout, every request and keep-alive gap alike) starts later.
        let first_due = accepted + self.header;
        match protocol {
            Protocol::Http1 => {
                let first_arrived = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let arrived = first_arrived.clone();
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    arrived.store(true, Ordering::Relaxed);
                    let mut front = front.clone();
                    tower_service::Service::call(&mut front, request.map(axum::body::Body::new))
                });
                let connection = Box::pin(self.http1.serve_connection(io, service));
                let watch = Watch::Http1 {
                    first_due,
                    first_arrived,
                };
                run(connection, closing, watch).await;
            }
            Protocol::Http2 => {
                let streams = Arc::new(Streams::new());
                let open = streams.clone();
                let shutting_down = closing.clone();
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let open_stream = OpenStream::new(&open);
                    // A stream opened while the connection drains at shutdown is refused at
                    // once; the client retries it elsewhere (see `run`).
                    let answer = (!*shutting_down.borrow()).then(|| {
                        let mut front = front.clone();
                        tower_service::Service::call(&mut front, request.map(axum::body::Body::new))
                    });
                    async move {
                        let response = match answer {
                            Some(answer) => {
                                let Ok(response) = answer.await;
                                response
                            }
                            None => shutting_down_response(),
                        };
                        Ok::<_, Infallible>(response.map(|body| {
                            axum::body::Body::new(CountedBody {
                                body,
                                _open: open_stream,
                            })
                        }))
                    }
                });
                let connection = Box::pin(self.http2.serve_connection(io, service));
                let watch = Watch::Http2 {
                    first_due,
                    streams,
                    idle: self.header,
                };
                run(connection, closing, watch).await;
            }
        }
    }
}

/// The answer to a request that opens a stream on an HTTP/2 connection draining at shutdown.
fn shutting_down_response() -> Response {
    let mut response = crate::errors::ApiError::new(
        http::StatusCode::SERVICE_UNAVAILABLE,
        "the router is shutting down: send the request again, on a new connection",
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// What [`run`] watches besides the connection itself.
enum Watch {
    /// HTTP/1.1: the first request's deadline (hyper's header timer covers the rest).
    Http1 {
        first_due: tokio::time::Instant,
        first_arrived: Arc<std::sync::atomic::AtomicBool>,
    },
    /// HTTP/2: the count of open streams, for the first request's deadline, the idle timeout
    /// and the drain at shutdown.
    Http2 {
        first_due: tokio::time::Instant,
        streams: Arc<Streams>,
        idle: Duration,
    },
}

/// Drives `connection` to its end, and ends it early: when its first request has not come by
/// its deadline; for HTTP/2, once it has had no stream open for the idle timeout; and at
/// shutdown (`closing` true), once its requests in flight are done. HTTP/1.1 is shut down by
/// hyper (the request in flight finishes, then the connection closes). An HTTP/2 connection is
/// dropped once its open streams are done, new ones refused meanwhile: hyper's graceful HTTP/2
/// shutdown sends a PING after its GOAWAY, which Python's `h2` (httpx, the OpenAI client) takes
/// for a protocol error, failing the streams still in flight; and an idle client that reads
/// nothing never answers it, holding the shutdown for its whole timeout.
async fn run(
    mut connection: Pin<Box<Connection>>,
    mut closing: watch::Receiver<bool>,
    watch: Watch,
) {
    let (first_due, http2) = match &watch {
        Watch::Http1 { first_due, .. } => (*first_due, None),
        Watch::Http2 {
            first_due,
            streams,
            idle,
        } => (*first_due, Some((streams.clone(), *idle))),
    };
    let first_came = || match &watch {
        Watch::Http1 { first_arrived, .. } => first_arrived.load(Ordering::Relaxed),
        Watch::Http2 { .. } => true,
    };
    let idle = async {
        match http2.clone() {
            Some((streams, timeout)) => idle_for(&streams, first_due, timeout).await,
            None => std::future::pending().await,
        }
    };
    let drained = async {
        match http2.clone() {
            Some((streams, _)) => streams.drained().await,
            None => std::future::pending().await,
        }
    };
    let (mut idle, mut drained) = (std::pin::pin!(idle), std::pin::pin!(drained));
    let first_deadline = tokio::time::sleep_until(first_due);
    let mut first_deadline = std::pin::pin!(first_deadline);
    // HTTP/2's first deadline is the idle timer's first wait (a stream may open and end before
    // it).
    let (mut winding_down, mut first_checked) = (false, http2.is_some());
    loop {
        tokio::select! {
            ended = connection.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!("client connection ended: {e}");
                }
                return;
            }
            () = &mut first_deadline, if !first_checked => {
                if !first_came() {
                    return tracing::debug!("no request within the header timeout");
                }
                first_checked = true;
            }
            () = async { let _ = closing.wait_for(|c| *c).await; }, if !winding_down => {
                winding_down = true;
                if http2.is_none() {
                    connection.as_mut().graceful_shutdown();
                }
            }
            () = &mut drained, if winding_down => {
                // The last streams' final frames may still wait in the connection's buffers:
                // it is driven a moment longer (the client rarely closes it itself).
                let _ = tokio::time::timeout(HTTP2_FLUSH_GRACE, connection.as_mut()).await;
                return;
            }
            () = &mut idle, if !winding_down => {
                return tracing::debug!("idle HTTP/2 connection closed after the header timeout");
            }
        }
    }
}

/// A client connection of either HTTP version, boxed (one type to drive, whose `Send` is proven
/// where it is made: rustc cannot prove it through a generic driver's `select!`).
type Connection = dyn hyper_util::server::graceful::GracefulConnection<
        Error = hyper::Error,
        Output = Result<(), hyper::Error>,
    > + Send;

/// Completes once an HTTP/2 connection has had no stream open until `first_due` (no request
/// yet), or for `timeout` after its last stream ended. It looks at the count when its timer
/// fires, never when a stream opens or ends: at one request after another, a wake-up of the
/// connection's task per stream (as a watch channel gave) cost about 10 µs a request.
async fn idle_for(streams: &Streams, first_due: tokio::time::Instant, timeout: Duration) {
    let mut due = first_due;
    loop {
        tokio::time::sleep_until(due).await;
        let now = tokio::time::Instant::now();
        if streams.open.load(Ordering::SeqCst) > 0 {
            due = now + timeout;
            continue;
        }
        match streams.last_end() {
            // None open, and none ever ended: none ever opened.
            None => return,
            Some(end) if end + timeout <= now => return,
            Some(end) => due = end + timeout,
        }
    }
}

/// The open streams of an HTTP/2 connection (requests whose answers are not yet all sent), and
/// when the last one ended; the drain at shutdown is told when the count reaches 0.
struct Streams {
    open: std::sync::atomic::AtomicUsize,
    /// When a stream last ended, µs after `epoch` + 1 (0: none yet; every end writes it, so
    /// with none open it also tells whether any ever opened).
    last_end: std::sync::atomic::AtomicU64,
    epoch: tokio::time::Instant,
    draining: std::sync::atomic::AtomicBool,
    none_open: tokio::sync::Notify,
}

impl Streams {
    fn new() -> Self {
        Streams {
            open: Default::default(),
            last_end: Default::default(),
            epoch: tokio::time::Instant::now(),
            draining: Default::default(),
            none_open: tokio::sync::Notify::new(),
        }
    }

    fn last_end(&self) -> Option<tokio::time::Instant> {
        match self.last_end.load(Ordering::SeqCst) {
            0 => None,
            at => Some(self.epoch + Duration::from_micros(at - 1)),
        }
    }

    /// Completes once no stream is open, from now on told by the stream that ends last.
    async fn drained(&self) {
        self.draining.store(true, Ordering::SeqCst);
        while self.open.load(Ordering::SeqCst) > 0 {
            self.none_open.notified().await;
        }
    }
}

/// One open stream of an HTTP/2 connection, counted from its request's arrival until its
/// response has been sent or dropped.
struct OpenStream(Arc<Streams>);

impl OpenStream {
    fn new(streams: &Arc<Streams>) -> Self {
        streams.open.fetch_add(1, Ordering::SeqCst);
        OpenStream(streams.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        let streams = &self.0;
        // The end is written before the count falls: the idle timer, which reads the count
        // first, never sees no stream open with an older end.
        let at = streams.epoch.elapsed().as_micros() as u64 + 1;
        streams.last_end.fetch_max(at, Ordering::SeqCst);
        if streams.open.fetch_sub(1, Ordering::SeqCst) == 1
            && streams.draining.load(Ordering::SeqCst)
        {
            streams.none_open.notify_one();
        }
    }
}

/// A response body that keeps its stream counted as open while it is sent.
struct CountedBody {
    body: axum::body::Body,
    _open: OpenStream,
}

impl http_body::Body for CountedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// How often the metrics of endpoints that left are dropped, besides at each read of /metrics.
const METRICS_PRUNE_INTERVAL: Duration = Duration::from_secs(10);

/// HTTP/2's connection preface (RFC 9113 §3.4): what a client with prior knowledge sends first.
const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Which HTTP a cleartext connection speaks, from its first bytes, left unread for the server:
/// HTTP/2 if they are the preface, HTTP/1.1 from the first byte that is not. `None` if the
/// client closed first. Also returns how many times it looked (a test's measure that a
/// preface sent in pieces is waited for, not polled).
async fn sniff(tcp: &tokio::net::TcpStream) -> std::io::Result<(Option<Protocol>, usize)> {
    use std::io::ErrorKind::WouldBlock;
    let mut first = [0u8; HTTP2_PREFACE.len()];
    let mut looks = 1;
    // The first bytes decide, as a rule: a request line, or the whole preface.
    let mut n = tcp.peek(&mut first).await?;
    loop {
        if n == 0 {
            return Ok((None, looks));
        }
        if first[..n] != HTTP2_PREFACE[..n] {
            return Ok((Some(Protocol::Http1), looks));
        }
        if n == HTTP2_PREFACE.len() {
            return Ok((Some(Protocol::Http2), looks));
        }
        // The start of the preface only: wait for more. Readiness is cleared before each look,
        // so what arrives after the look wakes the wait, and what came before it is seen.
        let mut closed = false;
        loop {
            clear_readiness(tcp);
            looks += 1;
            // A second handle on the socket looks without waiting on it; it is closed before
            // the wait, so that a waiting connection holds one descriptor, not two.
            let peeked = second_handle(tcp)?.peek(&mut first);
            match peeked {
                Ok(more) if more != n => {
                    n = more;
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == WouldBlock => {}
                Err(e) => return Err(e),
            }
            if closed {
                // The client sent all it will (a peek shows its bytes, never the end behind
                // them): not a preface, not a request.
                return Ok((None, looks));
            }
            closed = tcp
                .ready(tokio::io::Interest::READABLE)
                .await?
                .is_read_closed();
        }
    }
}

/// Another handle on `tcp`'s socket, to look at it without tokio's readiness.
fn second_handle(tcp: &tokio::net::TcpStream) -> std::io::Result<std::net::TcpStream> {
    Ok(socket2::SockRef::from(tcp).try_clone()?.into())
}

/// Makes `tcp.readable()` wait for bytes that arrive from now on.
fn clear_readiness(tcp: &tokio::net::TcpStream) {
    let _ = tcp.try_io(tokio::io::Interest::READABLE, || {
        Err::<(), _>(std::io::Error::from(std::io::ErrorKind::WouldBlock))
    });
}

/// The longest a client may take over its TLS handshake (the handshake is a few round trips).
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS handshake of an accepted connection; `None` if it failed. A client that speaks plain
/// HTTP to the https port (its first byte is not a TLS record's, 0x16) is told so in a 400
/// instead of a silently closed connection.
async fn secure(
    tls: &qoe_tls::ServerTls,
    tcp: tokio::net::TcpStream,
) -> Option<qoe_tls::server::ServerStream> {
    use tokio::io::AsyncWriteExt;
    let mut first = [0u8; 1];
    if !matches!(tcp.peek(&mut first).await, Ok(1)) {
        return None;
    }
    if first[0] != 0x16 {
        let body = crate::errors::ApiError::new(
            http::StatusCode::BAD_REQUEST,
            "this port speaks https: use https:// in the URL",
        )
        .body_json()
        .to_string();
        let response = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let mut tcp = tcp;
        let _ = tcp.write_all(response.as_bytes()).await;
        let _ = tcp.shutdown().await;
        return None;
    }
    match tls.accept(tcp).await {
        Ok(stream) => Some(stream),
        Err(e) => {
            // A scanner, a client that does not trust the certificate, one without the client
            // certificate asked for.
            tracing::debug!("TLS handshake failed: {e}");
            None
        }
    }
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    let table = state.registry.table();
    let healthy = table.endpoints.iter().filter(|e| e.is_healthy()).count();
    Json(json!({"status": "ok", "endpoints": table.endpoints.len(), "healthy_endpoints": healthy}))
        .into_response()
}

/// Readiness, for a load balancer or a Kubernetes readiness probe: 200 while some endpoint passed
/// its last health check, has no open breaker and serves a model
/// ([`crate::endpoints::Endpoint::ready`]); 503 otherwise (a router that would answer every
/// request 503 or 404 should not receive traffic). `/health` stays 200 as long as the process
/// runs (liveness).
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let now = state.clock.now();
    let table = state.registry.table();
    let ready_endpoints = table.endpoints.iter().filter(|e| e.ready(now)).count();
    if ready_endpoints > 0 {
        let body = json!({"status": "ready", "ready_endpoints": ready_endpoints});
        return Json(body).into_response();
    }
    let reason = if table.endpoints.is_empty() {
        state.config.no_endpoints_reason()
    } else {
        "no endpoint passed its last health check with its breaker not open and a model served"
    };
    let body = json!({"status": "not_ready", "ready_endpoints": 0,
        "endpoints": table.endpoints.len(), "reason": reason});
    (http::StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

/// The exposition is OpenMetrics text; it is labelled so when the scraper accepts that format
/// (Prometheus asks for it first), else as Prometheus' classic text, which reads it too (curl, a
/// browser). Labelled classic to Prometheus, its counters would read as untyped: an OpenMetrics
/// counter family `x` has samples `x_total`.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const CLASSIC_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics when the `Accept` headers rank it at least as high as the classic text (`text/plain`,
/// `text/*` or `*/*`) and above 0; the classic text otherwise.
fn metrics_content_type<'a>(accept: impl Iterator<Item = &'a HeaderValue>) -> &'static str {
    let (mut openmetrics, mut classic) = (0.0f64, 0.0f64);
    for range in accept
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
    {
        let mut parts = range.split(';').map(str::trim);
        let kind = parts.next().unwrap_or_default().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .map_or(1.0, |(_, q)| q.trim().parse::<f64>().unwrap_or(0.0));
        let q = if q.is_finite() {
            q.clamp(0.0, 1.0)
        } else {
            0.0
        };
        match kind.as_str() {
            "application/openmetrics-text" => openmetrics = openmetrics.max(q),
            "text/plain" | "text/*" | "*/*" => classic = classic.max(q),
            _ => {}
        }
    }
    if openmetrics > 0.0 && openmetrics >= classic {
        OPENMETRICS
    } else {
        CLASSIC_TEXT
    }
}

async fn metrics(State(state): State<Arc<AppState>>, headers: http::HeaderMap) -> Response {
    state.metrics.refresh(&state.registry, state.clock.now());
    state
        .metrics
        .refresh_weights(state.policy.state_json().as_ref());
    state.metrics.queue_depth.set(state.admission.len() as i64);
    let mut response = state.metrics.encode().into_response();
    let response_headers = response.headers_mut();
    response_headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(metrics_content_type(headers.get_all(header::ACCEPT).iter())),
    );
    response_headers.insert(header::VARY, HeaderValue::from_static("accept"));
    response
}

/// Every endpoint's state, each signal with its age.
async fn engines(State(state): State<Arc<AppState>>) -> Response {
    let now = state.clock.now();
    let table = state.registry.table();
    let endpoints: Vec<_> = table
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let view = e.view(i as u32, now, FLAP_WINDOW);
            let health = e.health();
            let age_s = |at: Option<u64>| at.map(|t| now.saturating_sub(t) as f64 / 1e6);
            json!({
                "url": e.url,
                "models": e.models(),
                "role": e.role(),
                "healthy": health.healthy,
                "health": {
                    "consecutive_failures": health.consecutive_failures,
                    "last_check_age_s": age_s(health.last_check),
                    "last_error": health.last_error,
                    "flaps": view.availability.flaps,
                },
                "breaker": view.availability.breaker,
                "breaker_detail": e.breaker(),
                "load": view.load,
                "observed": view.observed,
                "observed_last_failure_age_s": age_s(view.observed.last_failure),
                "engine_metrics": view.engine,
                "engine_metrics_age_s": age_s(view.engine_at),
                "prefix_cache_hit_rate": view.engine.as_ref().and_then(qoe_core::EngineMetrics::hit_rate),
            })
        })
        .collect();
    Json(json!({
        "policy": state.policy.name(),
        "policy_state": state.policy.state_json(),
        "endpoints": endpoints,
    }))
    .into_response()
}

/// `/v1/models` merged across healthy endpoints (each model once).
async fn models(State(state): State<Arc<AppState>>) -> Response {
    let table = state.registry.table();
    let mut data: Vec<serde_json::Value> = Vec::new();
    // Every card is an `id`'s (see `model_cards`); the first endpoint listing an id gives its.
    let mut seen = std::collections::HashSet::new();
    for e in table.endpoints.iter().filter(|e| e.is_healthy()) {
        for card in e.model_cards() {
            let id = card.get("id").and_then(|v| v.as_str()).map(str::to_owned);
            if seen.insert(id) {
                data.push(card);
            }
        }
    }
    Json(json!({"object": "list", "data": data})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http::StatusCode;
    use tower_service::Service;

    /// A loopback pair: the client's end and the server's.
    async fn connected() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn a_connection_is_told_http2_by_its_preface_and_nothing_is_read() {
        tokio::time::timeout(Duration::from_secs(30), sniffing_cases())
            .await
            .expect("no sniff spins or hangs");
    }

    async fn sniffing_cases() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for (first, expected) in [
            (&b"POST /v1/completions HTTP/1.1\r\n"[..], Protocol::Http1),
            (b"GET /health HTTP/1.1\r\n", Protocol::Http1),
            (b"PRI * HTTP/1.1\r\n", Protocol::Http1),
            (HTTP2_PREFACE, Protocol::Http2),
        ] {
            let (mut client, mut server) = connected().await;
            client.write_all(first).await.unwrap();
            assert_eq!(sniff(&server).await.unwrap(), (Some(expected), 1));
            let mut read = vec![0; first.len()];
            server.read_exact(&mut read).await.unwrap();
            assert_eq!(read, first, "the bytes are left for the server");
        }
        // A preface in pieces is waited for, not polled: a look per piece at most, however
        // long the pieces take.
        let (mut client, server) = connected().await;
        client.write_all(&HTTP2_PREFACE[..1]).await.unwrap();
        let sniffing = tokio::spawn(async move { sniff(&server).await.unwrap() });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!sniffing.is_finished(), "one byte decides nothing");
        client.write_all(&HTTP2_PREFACE[1..5]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!sniffing.is_finished(), "five bytes decide nothing");
        client.write_all(&HTTP2_PREFACE[5..]).await.unwrap();
        let (protocol, looks) = sniffing.await.unwrap();
        assert_eq!(protocol, Some(Protocol::Http2));
        assert!(looks <= 6, "{looks} looks for three pieces");
        // Pieces that turn out not to be the preface.
        let (mut client, server) = connected().await;
        client.write_all(b"PR").await.unwrap();
        let sniffing = tokio::spawn(async move { sniff(&server).await.unwrap() });
        tokio::time::sleep(Duration::from_millis(20)).await;
        client.write_all(b"OPFIND / HTTP/1.1\r\n").await.unwrap();
        assert_eq!(sniffing.await.unwrap().0, Some(Protocol::Http1));
        // A client that closes first, or after a piece of the preface.
        let (client, server) = connected().await;
        drop(client);
        assert_eq!(sniff(&server).await.unwrap().0, None);
        let (mut client, server) = connected().await;
        client.write_all(b"PRI").await.unwrap();
        let sniffing = tokio::spawn(async move { sniff(&server).await.unwrap() });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(client);
        assert_eq!(sniffing.await.unwrap().0, None);
    }

    #[test]
    fn metrics_are_labelled_openmetrics_for_a_scraper_that_asks() {
        let kind = |accept: Option<&str>| {
            let values: Vec<HeaderValue> = accept
                .into_iter()
                .map(|a| HeaderValue::from_str(a).unwrap())
                .collect();
            metrics_content_type(values.iter())
        };
        // What Prometheus 2 and 3 send.
        for prometheus in [
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
            "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.3",
        ] {
            assert_eq!(kind(Some(prometheus)), OPENMETRICS);
        }
        for other in [
            None,
            Some("*/*"),
            Some("text/plain"),
            Some("text/plain, application/openmetrics-text; q=0"),
            Some("text/plain, application/openmetrics-text; Q=0"),
            Some("text/plain;q=1, application/openmetrics-text;q=0.1"),
            Some("application/openmetrics-textual"),
        ] {
            assert_eq!(kind(other), CLASSIC_TEXT, "{other:?}");
        }
        assert_eq!(
            kind(Some("application/openmetrics-text;q=0.5, */*;q=0.5")),
            OPENMETRICS,
            "a tie goes to OpenMetrics, asked for by name"
        );
        // Ranges split over two Accept headers count together.
        let two = [
            HeaderValue::from_static("text/plain;q=0.2"),
            HeaderValue::from_static("application/openmetrics-text;version=1.0.0"),
        ];
        assert_eq!(metrics_content_type(two.iter()), OPENMETRICS);
    }

    async fn status<S>(service: &mut S, method: &str, path: &str, key: Option<&str>) -> StatusCode
    where
        S: Service<Request, Response = Response, Error = Infallible>,
    {
        // As a client sends it: an HTTP/1.1 request without a Host is refused.
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "router");
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        let request = request.body(Body::from("{}")).unwrap();
        std::future::poll_fn(|cx| service.poll_ready(cx))
            .await
            .unwrap();
        let response = service.call(request).await.unwrap();
        // Every answer, own routes' too, carries the request's id.
        assert!(
            response.headers().contains_key("x-request-id"),
            "{method} {path}"
        );
        response.status()
    }

    /// [`Front`] and [`app`] answer alike: own routes, the guard on both kinds of route, the
    /// proxy for the rest (here: no endpoints, so 503 once past the guard).
    #[tokio::test]
    async fn front_and_app_agree() {
        let config = RouterConfig::from_args([
            "qoe-router",
            "--api-keys",
            "sk-test-key-0123456789",
            "--admin-api-key",
            "sk-admin-key-0123456789",
        ])
        .unwrap();
        let state = build_state(config).unwrap();
        let cases = [
            ("GET", "/health", None),
            ("GET", "/metrics", None),
            ("GET", "/metrics", Some("sk-admin-key-0123456789")),
            ("GET", "/engines", Some("sk-admin-key-0123456789")),
            ("POST", "/v1/models", Some("sk-test-key-0123456789")),
            ("GET", "/v1/models", Some("sk-test-key-0123456789")),
            ("POST", "/v1/chat/completions", None),
            (
                "POST",
                "/v1/chat/completions",
                Some("sk-test-key-0123456789"),
            ),
            ("GET", "/health/", None),
        ];
        let mut front = Front::new(state.clone());
        let mut app = app(state);
        let mut seen = Vec::new();
        for (method, path, key) in cases {
            let a = status(&mut front, method, path, key).await;
            let b = status(&mut app, method, path, key).await;
            assert_eq!(a, b, "{method} {path}");
            seen.push(a);
        }
        assert_eq!(seen[0], StatusCode::OK);
        assert_eq!(seen[1], StatusCode::UNAUTHORIZED);
        assert_eq!(seen[2], StatusCode::OK);
        assert_eq!(seen[4], StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(seen[6], StatusCode::UNAUTHORIZED);
        assert_eq!(seen[7], StatusCode::BAD_REQUEST);
    }
}
