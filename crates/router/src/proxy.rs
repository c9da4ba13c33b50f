//! The proxy path: analyze the request once, choose among the endpoints that serve its model, send
//! it on a pooled connection, and hand the response back through the observer.
//!
//! Nothing reaches the client before the endpoint's first body byte: the router reads that first
//! frame (within `--first-byte-timeout-ms` of sending) before it answers. So while no byte has
//! been sent, a failure can still go elsewhere: a connect error, a 429/5xx status, or a
//! connection closed before the first byte (an engine killed or restarting) sends the request to
//! another endpoint, up to `--max-retries`, after a jittered backoff (once the request may have
//! reached the engine, only if repeating it is harmless: [`repeatable`]). A first-byte timeout
//! is not retried (the client has already waited the whole budget): it is a 504. Once bytes flow,
//! statuses and bodies pass through untouched, and a break becomes an SSE error event (see
//! [`crate::observe`]).
//!
//! The upstream URL is always an endpoint's configured base URL plus the request's path and
//! query: the request's authority (absolute-form URI) and `Host` header are never used to choose
//! where to connect.

use crate::admission::{Admission, QueueKey, Wake};
use crate::config::SlaEnforcement;
use crate::endpoints::{Endpoint, LoadGuard};
use crate::errors::ApiError;
use crate::metrics::{CodeLabel, ShedLabels};
use crate::observe::{ObservedBody, RequestContext};
use crate::state::AppState;
use crate::upstream::{Conn, PoolError};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body::{Body as _, Frame};
use http_body_util::Full;
use qoe_core::analyze::{analyze_with, Route};
use qoe_core::Role;
use qoe_core::{ApiKind, EndpointView, Micros, RequestOutcome, RequestProfile};
use std::future::Future;
use std::io::Write as _;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use tokio::time::Sleep;

pub static X_QOE_ENDPOINT: HeaderName = HeaderName::from_static("x-qoe-endpoint");
pub static X_QOE_REASON: HeaderName = HeaderName::from_static("x-qoe-reason");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Health transitions counted over this window for the reliability signal.
pub const FLAP_WINDOW: Micros = 300_000_000;

/// The route a path belongs to, or `None` for paths the router does not proxy.
pub fn route_of(path: &str) -> Option<Route> {
    let (kind, model_required) = match path {
        "/v1/chat/completions" => (ApiKind::Chat, true),
        "/v1/completions" => (ApiKind::Completion, true),
        "/v1/embeddings" => (ApiKind::Embedding, true),
        "/v1/responses" => (ApiKind::Responses, false),
        "/v1/messages" => (ApiKind::Messages, false),
        p if p.starts_with("/v1/") || p.starts_with("/v2/") => (ApiKind::Other, false),
        "/tokenize" | "/detokenize" | "/pooling" | "/classify" | "/score" | "/rerank"
        | "/invocations" | "/version" => (ApiKind::Other, false),
        _ => return None,
    };
    Some(Route {
        kind,
        model_required,
    })
}

/// Whether `path` has a `.` or `..` segment, as it is or percent-encoded (`%2e`). The path goes
/// upstream as it is, and a hop that resolves dot segments (nginx and many gateways do) would
/// take the request out of the endpoint's base path and past the routes proxied.
fn has_dot_segment(path: &str) -> bool {
    if memchr::memchr2(b'.', b'%', path.as_bytes()).is_none() {
        return false;
    }
    // A hop may decode an encoded slash (or take a backslash for one) before it resolves dots.
    let decoded = path
        .replace("%2e", ".")
        .replace("%2E", ".")
        .replace("%2f", "/")
        .replace("%2F", "/")
        .replace("%5c", "/")
        .replace("%5C", "/")
        .replace('\\', "/");
    decoded
        .split('/')
        .any(|segment| segment == "." || segment == "..")
}

/// The methods proxied at all (as `Allow` lists them).
const FORWARDED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

fn forwarded_method(method: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
    ]
    .contains(method)
}

/// Routes vLLM serves for POST only: another method gets 405 here rather than a body error, or
/// the engine's bare 405.
fn post_only(path: &str) -> bool {
    matches!(
        path,
        "/v1/chat/completions"
            | "/v1/completions"
            | "/v1/embeddings"
            | "/v1/responses"
            | "/v1/messages"
            | "/v1/rerank"
            | "/v1/score"
            | "/tokenize"
            | "/detokenize"
            | "/pooling"
            | "/classify"
            | "/score"
            | "/rerank"
            | "/invocations"
    )
}

/// Why a request body could not be read.
enum BodyError {
    /// Past `--max-body-bytes`.
    TooLarge,
    /// Past what is left of `--max-buffered-body-bytes`.
    OverBudget,
    Read(axum::Error),
}

/// Reads `body` whole, up to `limit` bytes, taking its size from the router's body budget as
/// it arrives (`held` keeps what it took; a body over what is left is refused at once rather
/// than waited for: the budget is for bursts of uploads that would exhaust memory).
async fn read_body(
    state: &AppState,
    body: axum::body::Body,
    limit: usize,
    held: &mut Option<crate::state::HeldBody>,
) -> Result<Bytes, BodyError> {
    use http_body_util::BodyExt;
    let mut body = pin!(body);
    // Most bodies come in one frame: kept as it came, nothing allocated or copied.
    let mut first: Option<Bytes> = None;
    let mut rest: Vec<Bytes> = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(BodyError::Read)?.into_data() else {
            continue;
        };
        total += data.len();
        if total > limit {
            return Err(BodyError::TooLarge);
        }
        if let Some(budget) = &state.body_budget {
            if !budget.take(data.len(), held) {
                return Err(BodyError::OverBudget);
            }
        }
        if first.is_none() {
            first = Some(data);
        } else {
            rest.push(data);
        }
    }
    let first = first.unwrap_or_default();
    if rest.is_empty() {
        return Ok(first);
    }
    let mut all = Vec::with_capacity(total);
    for chunk in std::iter::once(&first).chain(&rest) {
        all.extend_from_slice(chunk);
    }
    Ok(Bytes::from(all))
}

/// The request's `Content-Encoding`, unless it is absent or only `identity`.
fn encoded_body(headers: &HeaderMap) -> Option<String> {
    let mut values = headers.get_all(header::CONTENT_ENCODING).iter().peekable();
    values.peek()?;
    let all: Vec<String> = values
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    let identity = all
        .iter()
        .flat_map(|v| v.split(','))
        .all(|coding| coding.trim().eq_ignore_ascii_case("identity") || coding.trim().is_empty());
    (!identity).then(|| all.join(", "))
}

/// Whether sending a request twice is harmless, so that one which may have reached an engine
/// (its connection broke before the answer, or the engine answered 429/5xx) can go to another:
/// idempotent methods (RFC 9110 §9.2.2), and the POST routes that only compute an answer
/// (generation, embeddings, tokenizing, scoring, transcription; a response the engine also
/// stores, `store` on `/v1/responses`, is stored twice at worst). A POST that may change the
/// engine's state (`/v1/files`, `/v1/batches`, a LoRA adapter's loading, ...) is retried only
/// when its connection failed, before anything was sent.
fn repeatable(method: &http::Method, path: &str) -> bool {
    use http::Method;
    match *method {
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE => true,
        Method::POST => {
            post_only(path)
                || matches!(
                    path,
                    "/v1/audio/transcriptions" | "/v1/audio/translations" | "/v2/rerank"
                )
        }
        _ => false,
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1): not forwarded either way, nor any header a
/// `Connection` header names ([`named_by_connection`]).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Not forwarded upstream besides the hop-by-hop ones: `host` and `content-length`, which the
/// router sets itself, and `expect` (the router has read the whole body already).
const NOT_FORWARDED_UPSTREAM: [&str; 3] = ["host", "content-length", "expect"];

/// The header names `headers`' `Connection` headers list (hop-by-hop too); empty, without
/// allocating, when there is no `Connection` header.
fn named_by_connection(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect()
}

/// Removes the hop-by-hop headers of `headers`, those its `Connection` names included.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in named_by_connection(headers) {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// HTTP/2 clients may split `Cookie` into several fields; an HTTP/1.1 request carries one, the
/// pairs joined with `; ` (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    if cookies.next().is_none() || cookies.next().is_none() {
        return;
    }
    let joined = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    if let Ok(joined) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, joined);
    }
}

/// Appends `client` to the request's `X-Forwarded-For` (its lines joined into one, as RFC 9110
/// §5.3 allows), as a reverse proxy does: the engine sees the router's address, and the last
/// address in the list is the one the router itself saw, whatever the client claimed before it.
pub(crate) fn add_forwarded_for(headers: &mut HeaderMap, client: &HeaderValue) {
    // One the client's `Connection` names is the previous hop's: dropped, and the router's own
    // goes on (`send` forwards it though `Connection` names it).
    if headers.contains_key(header::CONNECTION)
        && named_by_connection(headers).contains(&X_FORWARDED_FOR)
    {
        headers.remove(&X_FORWARDED_FOR);
    }
    let mut earlier = headers.get_all(&X_FORWARDED_FOR).iter().peekable();
    if earlier.peek().is_none() {
        // The usual case: the connection's value, shared, not copied.
        headers.insert(X_FORWARDED_FOR.clone(), client.clone());
        return;
    }
    let mut list = Vec::with_capacity(64);
    for value in earlier {
        list.extend_from_slice(value.as_bytes());
        list.extend_from_slice(b", ");
    }
    list.extend_from_slice(client.as_bytes());
    if let Ok(value) = HeaderValue::from_bytes(&list) {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

pub(crate) fn request_id(headers: &HeaderMap) -> HeaderValue {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        // Printable ASCII without spaces, quotes or backslashes: an id goes into every log line
        // as it is, where a space or a quote would let a client write fields of its own.
        let plain = |b: &u8| b.is_ascii_graphic() && *b != b'"' && *b != b'\\';
        if !v.is_empty() && v.len() <= 256 && v.as_bytes().iter().all(plain) {
            return v.clone();
        }
    }
    // Distinct across processes and restarts: the process id and start time, drawn once (the
    // process id is a system call).
    static SALT: OnceLock<u64> = OnceLock::new();
    let salt = *SALT.get_or_init(|| {
        std::process::id() as u64
            ^ (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0))
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Written on the stack and copied once into shared bytes, so that the clones for the
    // upstream request and the response are reference counts, not copies.
    let mut id = *b"qoe-0000000000000000";
    let hex = qoe_core::policy::mix64(salt.wrapping_add(n));
    write!(&mut id[4..], "{hex:016x}").expect("16 hex digits fit");
    HeaderValue::from_maybe_shared(Bytes::copy_from_slice(&id))
        .expect("hex is a valid header value")
}

/// Answers an error the router produced itself, counting and logging it.
pub(crate) fn reject(state: &AppState, error: ApiError, request_id: &HeaderValue) -> Response {
    state
        .metrics
        .rejected
        .get_or_create(&CodeLabel {
            code: error.status.as_u16(),
        })
        .inc();
    tracing::info!(
        request_id = %String::from_utf8_lossy(request_id.as_bytes()),
        status = error.status.as_u16(),
        // Quoted and escaped: it may hold what the client sent.
        error = ?error.message,
        "request rejected"
    );
    let mut response = error.into_response();
    response
        .headers_mut()
        .insert(X_REQUEST_ID.clone(), request_id.clone());
    response
}

/// Every proxied route lands here.
pub async fn proxy(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let started = state.clock.now();
    let (parts, body) = request.into_parts();
    let request_id = request_id(&parts.headers);
    let mut unanswered = Unanswered {
        state: &state,
        request_id: &request_id,
        started,
        answered: false,
    };
    let response = handle(&state, parts, body, &request_id, started).await;
    unanswered.answered = true;
    response
}

/// Logs the request's line when it ends before any answer: its client left (or the router shut
/// down) while it waited in the admission queue or for its endpoint's first byte. Every other
/// end logs its own line (`reject`, the observed response).
struct Unanswered<'a> {
    state: &'a AppState,
    request_id: &'a HeaderValue,
    started: Micros,
    answered: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let at_shutdown = self
            .state
            .closing_connections
            .load(std::sync::atomic::Ordering::Relaxed);
        let duration_ms = self.state.clock.now().saturating_sub(self.started) as f64 / 1e3;
        let request_id = String::from_utf8_lossy(self.request_id.as_bytes());
        if std::thread::panicking() {
            // A bug of the router's, not a client leaving: its connection is dropped.
            tracing::error!(
                request_id = %request_id,
                status = 500,
                outcome = "router_panic",
                duration_ms,
                "request ended by a panic in the router"
            );
            return;
        }
        let outcome = if at_shutdown {
            "closed_at_shutdown"
        } else {
            "client_closed"
        };
        self.state
            .metrics
            .unanswered
            .get_or_create(&crate::metrics::OutcomeLabel { outcome })
            .inc();
        tracing::info!(
            request_id = %request_id,
            // nginx's code for a request its client closed before the answer.
            status = 499,
            outcome,
            duration_ms,
            "request ended before an answer"
        );
    }
}

async fn handle(
    state: &Arc<AppState>,
    parts: http::request::Parts,
    body: axum::body::Body,
    request_id: &HeaderValue,
    started: Micros,
) -> Response {
    let state = state.clone();
    let request_id = request_id.clone();
    if has_dot_segment(parts.uri.path()) {
        let error = ApiError::bad_request(format!(
            "the path {} has a '.' or '..' segment: not allowed (the router forwards paths as \
             they are)",
            parts.uri.path()
        ))
        .with_code("invalid_path");
        return reject(&state, error, &request_id);
    }
    if !forwarded_method(&parts.method) {
        // TRACE would echo the request, credentials included (cross-site tracing); CONNECT
        // would ask for a tunnel; no engine serves either, nor an extension method.
        let error = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "{} is not allowed: the router forwards {FORWARDED_METHODS}",
                parts.method
            ),
        );
        let mut response = reject(&state, error, &request_id);
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(FORWARDED_METHODS));
        return response;
    }
    if state.via.seen_in(&parts.headers) {
        let error = ApiError::new(
            StatusCode::LOOP_DETECTED,
            format!(
                "this request came back to the router that sent it (its Via has {}): an \
                 endpoint leads back to this router; check --static-backends and the discovered \
                 endpoints",
                state.via.token
            ),
        )
        .with_code("loop_detected");
        return reject(&state, error, &request_id);
    }
    let Some(route) = route_of(parts.uri.path()) else {
        let error = ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no route for {} {}", parts.method, parts.uri.path()),
        )
        .with_code("unknown_route");
        return reject(&state, error, &request_id);
    };
    if parts.method != http::Method::POST && post_only(parts.uri.path()) {
        let error = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "{} is not allowed on {}; use POST",
                parts.method,
                parts.uri.path()
            ),
        );
        let mut response = reject(&state, error, &request_id);
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    if let Some(encoding) = encoded_body(&parts.headers) {
        // The router reads the body (model, prompt, priority) as it is, and so do the engines
        // (vLLM decodes no request body): a compressed one would be misread by both.
        let error = ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "Content-Encoding '{encoding}' is not supported: send the request body \
                 uncompressed (identity)"
            ),
        )
        .with_code("unsupported_content_encoding")
        .with_param(Some("content-encoding".into()));
        let mut response = reject(&state, error, &request_id);
        // RFC 9110 §15.5.16: a 415 for the coding says which codings are accepted.
        response.headers_mut().insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        return response;
    }
    // The headers first: a request they refuse need not upload its body (nor be sent
    // `100 Continue`).
    let headers_checked = conflicting_qoe_header(&state.analyzer, &parts.headers).and_then(|()| {
        qoe_core::analyze::read_headers(
            |name| parts.headers.get(name).map(|v| v.as_bytes()),
            &state.analyzer,
        )
    });
    let headers_said = match headers_checked {
        Ok(said) => said,
        Err(e) => return reject(&state, e.into(), &request_id),
    };
    let limit = state.config.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body exceeds the limit of {limit} bytes (--max-body-bytes)"),
        )
    };
    if let Some(len) = parts.headers.get(header::CONTENT_LENGTH) {
        if len
            .to_str()
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .is_some_and(|n| n > limit)
        {
            return reject(&state, too_large(), &request_id);
        }
    }
    let read_timeout = std::time::Duration::from_millis(state.config.request_read_timeout_ms);
    // Held until the request is done with its body (this function's end).
    let mut _body_held = None;
    let read = read_body(&state, body, limit, &mut _body_held);
    let body = match tokio::time::timeout(read_timeout, read).await {
        Ok(Ok(b)) => b,
        Ok(Err(BodyError::OverBudget)) => {
            let mut error = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the router holds {} bytes of request bodies at most (--max-buffered-body-bytes), and has them: send again shortly",
                    state.config.body_budget()
                ),
            )
            .with_code("overloaded");
            error.retry_after = Some(1);
            return reject(&state, error, &request_id);
        }
        Ok(Err(BodyError::TooLarge)) => return reject(&state, too_large(), &request_id),
        Ok(Err(BodyError::Read(e))) => {
            let error = ApiError::bad_request(format!("could not read the request body: {e}"));
            return reject(&state, error, &request_id);
        }
        Err(_) => {
            let error = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} ms (--request-read-timeout-ms)",
                    read_timeout.as_millis()
                ),
            );
            return reject(&state, error, &request_id);
        }
    };
    let analyze_as = |route: Route, model: Option<String>| {
        analyzed(&state, route, &body, &parts.headers, headers_said, model)
    };
    let profile = match analyze_as(route, None).await {
        Ok(p) => p,
        Err(e) if e.is_missing_model() => match only_model(&state) {
            // vLLM serves a request without `model` with its first served name; a fleet that
            // serves one model can do the same (the engine reads the body as it would direct).
            Some(model) => {
                let lenient = Route {
                    model_required: false,
                    ..route
                };
                match analyze_as(lenient, Some(model.clone())).await {
                    Ok(p) => qoe_core::RequestProfile { model, ..p },
                    Err(e) => return reject(&state, e.into(), &request_id),
                }
            }
            None => {
                let mut error: ApiError = e.into();
                let models = served_models(&state);
                error.message = if models.is_empty() {
                    "'model' is required (no model is known on the endpoints yet)".to_string()
                } else {
                    format!(
                        "'model' is required: the endpoints serve {}",
                        models.join(", ")
                    )
                };
                return reject(&state, error, &request_id);
            }
        },
        Err(e) => return reject(&state, e.into(), &request_id),
    };
    let (profile, body) = with_key_priority(&state, &parts, profile, body);
    if crate::stages::splits(&state, &profile) {
        return crate::stages::run(state, parts, body, profile, request_id, started).await;
    }
    dispatch(state, parts, body, profile, request_id, started, false).await
}

/// The request's priority when its API key is bound to one (`--api-key-priorities`): the key's,
/// or the lower one the priority header asks for. vLLM's own `priority` field in the body (lower
/// runs first) is capped too, on the scale the engines see: with `--engine-priority` the router's
/// levels (a value more urgent than the key allows becomes the key's), without it vLLM's own,
/// where a request that leaves the field out runs at 0 (a more urgent value becomes 0).
fn with_key_priority(
    state: &AppState,
    parts: &http::request::Parts,
    profile: qoe_core::RequestProfile,
    body: Bytes,
) -> (qoe_core::RequestProfile, Bytes) {
    let Some(&crate::security::KeyPriority(bound)) = parts.extensions.get() else {
        return (profile, body);
    };
    let asked = parts.headers.contains_key(&state.analyzer.priority_header);
    // Priority 1 is the most urgent: the larger level is the lower priority.
    let priority = if asked {
        profile.priority.max(bound)
    } else {
        bound
    };
    let floor = match state.config.engine_priority {
        true => i64::from(bound.level()),
        false => VLLM_DEFAULT_PRIORITY,
    };
    let body = capped_engine_priority(body, floor);
    (
        qoe_core::RequestProfile {
            priority,
            ..profile
        },
        body,
    )
}

/// vLLM's `priority` for a request without the field.
const VLLM_DEFAULT_PRIORITY: i64 = 0;

/// `body` with a top-level `priority` below `floor` (or not an integer) set to `floor`; the rest
/// as it was.
fn capped_engine_priority(body: Bytes, floor: i64) -> Bytes {
    let Ok(members) = crate::members::Members::parse(&body) else {
        return body;
    };
    let allowed = members
        .get("priority")
        .is_none_or(|p| serde_json::from_str::<i64>(p.get()).is_ok_and(|level| level >= floor));
    if allowed {
        return body;
    }
    members.edited(&[], &[("priority", &floor.to_string())], &[])
}

/// Request bodies past which a tokenizer's count runs on tokio's blocking pool: ≈ 0.35 ms of CPU
/// at the tokenizer's ≈ 175 µs per KiB, far more than handing it over costs. On the worker
/// thread it would hold up every stream that thread relays meanwhile.
const COUNT_OFF_WORKER_BYTES: usize = 2048;

/// Counts running on the blocking pool at once: one per CPU. More would only share the CPUs
/// with the worker threads they are kept off; the rest wait their turn without a thread (and a
/// request whose client leaves meanwhile costs nothing more).
fn counting_slots() -> Arc<tokio::sync::Semaphore> {
    static SLOTS: OnceLock<Arc<tokio::sync::Semaphore>> = OnceLock::new();
    SLOTS
        .get_or_init(|| {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            Arc::new(tokio::sync::Semaphore::new(cpus))
        })
        .clone()
}

/// A priority, SLA or expected-output header sent more than once with different values: which
/// one the client meant cannot be told, so it is refused rather than one of them taken.
fn conflicting_qoe_header(
    analyzer: &qoe_core::analyze::AnalyzerConfig,
    headers: &HeaderMap,
) -> Result<(), qoe_core::analyze::BadRequest> {
    // Every header name once: nothing to look at (the usual case, without a lookup).
    if headers.len() == headers.keys_len() {
        return Ok(());
    }
    for name in [
        &analyzer.priority_header,
        &analyzer.expected_output_len_header,
        &analyzer.sla_header,
    ] {
        let mut values = headers.get_all(name.as_str()).iter();
        let Some(first) = values.next() else { continue };
        if let Some(other) = values.find(|v| *v != first) {
            return Err(qoe_core::analyze::BadRequest {
                param: Some(name.clone()),
                message: format!(
                    "header {name} is given more than once with different values ('{}', '{}'); \
                     send it once",
                    String::from_utf8_lossy(first.as_bytes()),
                    String::from_utf8_lossy(other.as_bytes()),
                ),
            });
        }
    }
    Ok(())
}

/// Whether a tokenizer may count `body`'s prompt: there is one for every model, or the name of
/// a model with its own is `model` or appears in the body (a cheap look; a false positive costs
/// only the hand-over to the blocking pool).
fn may_be_counted(
    analyzer: &qoe_core::analyze::AnalyzerConfig,
    body: &[u8],
    model: &Option<String>,
) -> bool {
    analyzer.tokenizer.is_some()
        || analyzer.model_tokenizers.iter().any(|(name, _)| {
            model.as_deref() == Some(name) || memchr::memmem::find(body, name.as_bytes()).is_some()
        })
}

/// The request's profile (`model` stands in for the body's when the router supplies it: the
/// learned output length and the tokenizer), analyzed off the worker thread when a tokenizer
/// counts a long body.
async fn analyzed(
    state: &Arc<AppState>,
    route: Route,
    body: &Bytes,
    headers: &HeaderMap,
    said: qoe_core::analyze::HeaderFacts,
    model: Option<String>,
) -> Result<RequestProfile, qoe_core::analyze::BadRequest> {
    let run = move |state: &AppState, body: &[u8], headers: &HeaderMap, model: Option<&str>| {
        // A body without `model` is counted by the tokenizer of the model the router supplies.
        let supplied;
        let config = match model {
            Some(m) if !state.analyzer.model_tokenizers.is_empty() => {
                supplied = qoe_core::analyze::AnalyzerConfig {
                    tokenizer: state.analyzer.tokenizer_for(m).cloned(),
                    model_tokenizers: Vec::new(),
                    ..state.analyzer.clone()
                };
                &supplied
            }
            _ => &state.analyzer,
        };
        // The headers were read before the body: not again.
        analyze_with(
            route,
            body,
            |name| headers.get(name).map(|v| v.as_bytes()),
            Ok(said),
            config,
            |m| state.learned_output.estimate(model.unwrap_or(m)),
        )
    };
    if body.len() <= COUNT_OFF_WORKER_BYTES || !may_be_counted(&state.analyzer, body, &model) {
        return run(state, body, headers, model.as_deref());
    }
    let Ok(slot) = counting_slots().acquire_owned().await else {
        return run(state, body, headers, model.as_deref());
    };
    let owned = (state.clone(), body.clone(), headers.clone(), model.clone());
    let counted = tokio::task::spawn_blocking(move || {
        let (state, body, headers, model) = owned;
        let profile = run(&state, &body, &headers, model.as_deref());
        drop(slot);
        profile
    });
    match counted.await {
        Ok(profile) => profile,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // The runtime is shutting down: counted here instead.
        Err(_) => run(state, body, headers, model.as_deref()),
    }
}

/// Every model the endpoints serve, sorted, each once.
fn served_models(state: &AppState) -> Vec<String> {
    let table = state.registry.table();
    let mut models: Vec<String> = table.endpoints.iter().flat_map(|e| e.models()).collect();
    models.sort();
    models.dedup();
    models
}

/// The fleet's model, when every endpoint serves the same one and only it.
fn only_model(state: &AppState) -> Option<String> {
    let mut models = served_models(state);
    (models.len() == 1).then(|| models.remove(0))
}

/// Endpoints serving the model (healthy or not: health and breakers are checked before every
/// pick, since a request may wait in the queue or retry) whose role takes the request's stage.
/// An ordinary request goes to the endpoints of role `both` when some serve the model: a
/// prefill or decode engine serves it too, but it is kept for its own stage.
fn candidates(
    state: &AppState,
    model: &str,
    stage: qoe_core::Stage,
    split: bool,
) -> Result<Vec<Arc<Endpoint>>, ApiError> {
    let table = state.registry.table();
    let mut serving = Vec::new();
    let (mut serving_model, mut both) = (0usize, 0usize);
    for e in table.endpoints.iter() {
        let Some(role) = e.role_if_serving(model) else {
            continue;
        };
        serving_model += 1;
        if role.takes(stage) && !(split && role == Role::Both) {
            both += usize::from(role == Role::Both);
            serving.push(e.clone());
        }
    }
    if stage == qoe_core::Stage::Whole && both > 0 && both < serving.len() {
        serving.retain(|e| e.role() == Role::Both);
    }
    if serving.is_empty() && serving_model > 0 {
        let role = match stage {
            qoe_core::Stage::Prefill => "prefill",
            _ => "decode",
        };
        if split {
            // The router's own split: the stage's endpoints went since it began (a reload).
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "no endpoint of role {role} serves the model '{model}' any more for the \
                     {role} stage of this request"
                ),
            );
            e.retry_after = Some(1);
            return Err(e);
        }
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "no endpoint of role {role} or both serves the model '{model}' for this \
                 kv_transfer_params stage (roles are set per backend in the config file)"
            ),
        )
        .with_param(Some("kv_transfer_params".into())));
    }
    if serving.is_empty() {
        if table.endpoints.is_empty() {
            // A reload may add some.
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                state.config.no_endpoints_reason(),
            );
            e.retry_after = Some(1);
            return Err(e);
        }
        let models = served_models(state);
        let known = if models.is_empty() {
            "none".to_string()
        } else {
            models.join(", ")
        };
        // An endpoint still starting (vLLM loads its weights before it lists a model) may serve
        // it: a moment later, not never. One down for longer than that, never.
        let now = std::time::Instant::now();
        let pending = table
            .endpoints
            .iter()
            .filter(|e| e.may_list_models(now))
            .count();
        if pending > 0 {
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "no endpoint serves the model '{model}' so far; {pending} of {} endpoints \
                     have not listed their models yet (models known: {known})",
                    table.endpoints.len()
                ),
            )
            .with_param(Some("model".into()));
            e.retry_after = Some(1);
            return Err(e);
        }
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("the model '{model}' does not exist; available models: {known}"),
        )
        .with_param(Some("model".into())));
    }
    Ok(serving)
}

/// The answer when endpoints serve the model but none may take a request now. `Retry-After`
/// says when the first of them may: an open breaker's pause left, or a second when one is
/// unhealthy (its next health check may clear it) or probing.
fn none_admitted(model: &str, pool: &[Arc<Endpoint>], now: Micros) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "no healthy endpoint serves the model '{model}' (failing health checks or circuit open)"
        ),
    );
    let soonest = pool
        .iter()
        .map(|e| e.admits_again_in(now).unwrap_or(0))
        .min()
        .unwrap_or(0);
    e.retry_after = Some(soonest.div_ceil(qoe_core::MICROS_PER_SEC).max(1));
    e
}

/// Why an attempt at one endpoint produced nothing for the client.
enum SendError {
    /// No connection (nothing was sent).
    Connect(String),
    /// A 429/5xx status, with another endpoint left to try.
    Status(StatusCode),
    /// The connection closed or the body broke before the first byte of the answer.
    Broken(String),
    /// No first byte within `--first-byte-timeout-ms`.
    Timeout,
    /// The request could not be built.
    Other(String),
}

impl SendError {
    /// Whether another endpoint may take the request: nothing reached the client, and the
    /// failure says something about this endpoint rather than about the request or the budget.
    fn retryable(&self) -> bool {
        matches!(
            self,
            SendError::Connect(_) | SendError::Status(_) | SendError::Broken(_)
        )
    }

    /// The `kind` label of `qoe_router_upstream_failures_total`.
    fn kind(&self) -> &'static str {
        match self {
            SendError::Connect(_) => "connect",
            SendError::Status(_) | SendError::Other(_) => "status",
            SendError::Broken(_) => "stream",
            SendError::Timeout => "timeout",
        }
    }

    fn describe(&self) -> String {
        match self {
            SendError::Connect(e) | SendError::Broken(e) | SendError::Other(e) => e.clone(),
            SendError::Status(s) => format!("status {s}"),
            SendError::Timeout => "no first byte in time".into(),
        }
    }
}

/// `future`'s output, or `None` if `timer` fires first.
async fn before<F: Future>(mut timer: Pin<&mut Sleep>, future: F) -> Option<F::Output> {
    let mut future = pin!(future);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = future.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        timer.as_mut().poll(cx).map(|()| None)
    })
    .await
}

async fn send(
    state: &AppState,
    endpoint: &Endpoint,
    parts: &http::request::Parts,
    body: &Bytes,
    request_id: &HeaderValue,
    timer: Pin<&mut Sleep>,
) -> Result<(Response<hyper::body::Incoming>, Conn), SendError> {
    let target = endpoint
        .pool
        .request_target(&parts.uri)
        .map_err(|e| SendError::Other(e.to_string()))?;
    let mut builder = http::Request::builder()
        .method(parts.method.clone())
        .uri(target);
    let headers = builder.headers_mut().expect("fresh builder");
    // The client's, and the router's own: `Host`, `x-request-id`, `Via`, `X-Forwarded-For`,
    // the upstream key. Sized once, not grown (and rehashed) along the way.
    headers.reserve(parts.headers.len() + 5);
    if let Some(host) = endpoint.pool.host() {
        headers.insert(header::HOST, host.clone());
    }
    // The router's own keys stay here unless asked otherwise (see `crate::security`); an
    // `--upstream-api-key` replaces whatever the client sent.
    let upstream_key = state.client.authorization();
    let keep_authorization = upstream_key.is_none()
        && (!state.config.checks_api_keys() || state.config.forward_authorization);
    let named = named_by_connection(&parts.headers);
    for (name, value) in &parts.headers {
        if HOP_BY_HOP.contains(&name.as_str())
            || NOT_FORWARDED_UPSTREAM.contains(&name.as_str())
            || (named.contains(name) && name != X_FORWARDED_FOR)
            || name == X_REQUEST_ID
            || (name == header::AUTHORIZATION && !keep_authorization)
        {
            continue;
        }
        headers.append(name.clone(), value.clone());
    }
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());
    headers.append(header::VIA, state.via.entry(parts.version).clone());
    if parts.version == http::Version::HTTP_2 {
        join_cookies(headers);
    }
    if let Some(key) = upstream_key {
        headers.insert(header::AUTHORIZATION, key.clone());
    }
    let request = builder
        .body(Full::new(body.clone()))
        .map_err(|e| SendError::Other(e.to_string()))?;
    match before(timer, endpoint.pool.send(request)).await {
        None => Err(SendError::Timeout),
        Some(Err(PoolError::Connect(e))) => Err(SendError::Connect(e)),
        // Handed back unsent: as good as no connection.
        Some(Err(PoolError::Unsent(e))) => Err(SendError::Connect(format!(
            "the connection failed before the request went out: {}",
            crate::upstream::error_chain(&e)
        ))),
        Some(Err(PoolError::Send(e))) => Err(SendError::Broken(format!(
            "{}{}",
            crate::upstream::error_chain(&e),
            endpoint.pool.broken_hint()
        ))),
        Some(Ok(sent)) => Ok(sent),
    }
}

/// The first frame of a response (none when the body is empty) and when it arrived, read before
/// anything goes to the client.
type FirstFrame = Option<(Frame<Bytes>, Micros)>;

async fn first_frame(
    state: &AppState,
    body: &mut hyper::body::Incoming,
    conn: &mut Conn,
    timer: Pin<&mut Sleep>,
) -> Result<FirstFrame, SendError> {
    if body.is_end_stream() {
        return Ok(None);
    }
    let frame = std::future::poll_fn(|cx| conn.poll_frame(Pin::new(&mut *body), cx));
    match before(timer, frame).await {
        None => Err(SendError::Timeout),
        Some(None) => Ok(None),
        Some(Some(Err(e))) => Err(SendError::Broken(format!(
            "the response broke off before its first byte: {e}"
        ))),
        Some(Some(Ok(frame))) => Ok(Some((frame, state.clock.now()))),
    }
}

/// Routes one request (or one stage of one, see [`crate::stages`]) and answers it.
/// `split`: a stage of the router's own split ([`crate::stages`]), which only endpoints of that
/// stage's role take.
pub(crate) async fn dispatch(
    state: Arc<AppState>,
    parts: http::request::Parts,
    body: Bytes,
    mut profile: RequestProfile,
    request_id: HeaderValue,
    started: Micros,
    split: bool,
) -> Response {
    let mut pool = match candidates(&state, &profile.model, profile.stage, split) {
        Ok(c) => c,
        Err(e) => return reject(&state, e, &request_id),
    };
    let mut views: Vec<EndpointView> = Vec::with_capacity(pool.len());
    // Filled only when admission control is on; otherwise every view is open.
    let mut open_views: Vec<EndpointView> = Vec::new();
    let mut attempt = 0u32;
    let admission = &state.admission;
    // A non-streamed answer comes whole, after the last token: its first byte is its end.
    // A prefill stage's answer is its first token.
    let first_byte_budget_applies = profile.stream || profile.stage == qoe_core::Stage::Prefill;
    let (first_byte_budget, budget_flag) = match first_byte_budget_applies {
        true => (state.first_byte_timeout, "--first-byte-timeout-ms"),
        false => (state.response_timeout, "--response-timeout-ms"),
    };
    // The request's place in the admission queue, from when it first waits until dispatched.
    let mut queued: Option<QueueSlot> = None;
    let key = admission.key(
        profile.priority,
        profile.sla_ttft_ms.map(|ms| started + ms as u64 * 1_000),
    );
    // `--queue-timeout` counts from when the request starts to wait, each time: a retry after a
    // slow failure gets its own wait, not what is left of the first.
    let mut queue_deadline: Option<tokio::time::Instant> = None;
    // The model itself for an ordinary request: nothing allocated.
    let lane = crate::admission::lane(&profile.model, profile.stage);
    // Counted once in `qoe_router_queued_total`, however often a retry queues it again.
    let mut ever_queued = false;
    // vLLM's `priority` field belongs to the generation and embedding requests only.
    let takes_priority = matches!(
        profile.kind,
        ApiKind::Chat | ApiKind::Completion | ApiKind::Embedding | ApiKind::Responses
    );
    let body = if state.config.engine_priority && takes_priority {
        with_engine_priority(body, profile.priority.level())
    } else {
        body
    };
    loop {
        // Read before looking: a wake-up lost while it looks makes its wait end at once.
        let mut seen = if admission.config.enabled() {
            admission.lost_wakes()
        } else {
            0
        };
        let now = state.clock.now();
        views.clear();
        views.extend(
            pool.iter()
                .enumerate()
                .filter(|(_, e)| e.admits(now))
                .map(|(i, e)| e.view(i as u32, now, FLAP_WINDOW)),
        );
        if views.is_empty() {
            return reject(
                &state,
                none_admitted(&profile.model, &pool, now),
                &request_id,
            );
        }
        let open: &[EndpointView] = if admission.config.enabled() {
            open_views.clear();
            open_views.extend(views.iter().filter(|v| !admission.config.saturated(v, now)));
            let behind = admission.behind_someone(&key, &lane);
            if open_views.is_empty() || behind {
                // Capacity is open but someone more urgent waits: let them have it first. If
                // no one was listening, that lost wake-up is theirs to see, not this request's
                // (it would only wake itself, and spin).
                if !open_views.is_empty() && !admission.notify(|l| l == lane) {
                    seen += 1;
                }
                let deadline = *queue_deadline.get_or_insert_with(|| {
                    tokio::time::Instant::now() + admission.config.queue_timeout
                });
                let waited = wait_in_queue(
                    &state,
                    key,
                    &lane,
                    &mut queued,
                    deadline,
                    &mut ever_queued,
                    seen,
                );
                if let Err(e) = waited.await {
                    return reject(&state, e, &request_id);
                }
                // The endpoint set may have changed while it waited (a reload): an endpoint
                // added is a candidate, one removed is not. One an earlier attempt failed on is
                // a candidate again: time has passed, health and the breaker judge it now, and a
                // waiter that could not use it would hold back newcomers that can.
                pool = match candidates(&state, &profile.model, profile.stage, split) {
                    Ok(c) => c,
                    Err(e) => return reject(&state, e, &request_id),
                };
                continue;
            }
            &open_views
        } else {
            &views
        };
        // The decode stage of the router's own split comes after its prefill ran: shedding it
        // then would waste that work, and a client obeying Retry-After would pay for it again.
        let prefilled = split && profile.stage == qoe_core::Stage::Decode;
        let checked = match prefilled {
            true => Ok(()),
            false => enforce_sla(&state, &profile, open, now, started),
        };
        if let Err(e) = checked {
            return reject(&state, e, &request_id);
        }
        let Some(decision) = state.policy.pick(&profile, open, now) else {
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no endpoint could take the request for '{}'", profile.model),
            );
            e.retry_after = Some(1);
            return reject(&state, e, &request_id);
        };
        // Views carry their index in `pool` as their id.
        let chosen = decision.endpoint.0 as usize;
        let endpoint = pool[chosen].clone();
        if let Some(detail) = &decision.detail {
            endpoint.metrics().record_decision(&state.metrics, detail);
        }
        // The in-flight cap, checked in the views, is taken here in one step: requests picking
        // the same endpoint at once (on other threads) must not overshoot it together.
        let cap = admission.config.limits.max_inflight;
        if cap > 0 && !endpoint.load.reserve(cap) {
            // Another took the last seat since the views were taken: look again (and queue).
            tokio::task::yield_now().await;
            continue;
        }
        let Some(ticket) = endpoint.try_dispatch(state.clock.now()) else {
            if cap > 0 {
                endpoint.load.unreserve();
            }
            // Its breaker opened, or another request became its half-open probe, since the
            // views were taken: pick again without it.
            continue;
        };
        // A decode stage's prompt was prefilled elsewhere: no prefill work on this endpoint.
        let prefill_tokens = match profile.stage {
            qoe_core::Stage::Decode => 0,
            _ => profile.prompt_tokens,
        };
        let guard = LoadGuard::new(
            endpoint.clone(),
            ticket,
            prefill_tokens,
            profile.expected_output_tokens,
        );
        // Without admission limits no request ever waits: no one to tell of freed capacity.
        let guard = if admission.config.enabled() {
            guard.notifying(state.admission.clone())
        } else {
            guard
        };
        let guard = if cap > 0 { guard.holding_seat() } else { guard };
        // Out of the queue with its seat counted (the next waiter is told, `Admission::leave`).
        drop(queued.take());
        queue_deadline = None;
        let sent = state.clock.now();
        // The retry budget counts requests sent, once each: not those refused before (by
        // admission control, a lost deadline, no endpoint), nor the second stage of a split.
        if attempt == 0 && !(split && profile.stage == qoe_core::Stage::Decode) {
            state.retry_budget.record_request(sent);
        }
        // One timer for the headers and the first frame: both count against the same budget.
        let mut timer = pin!(tokio::time::sleep(first_byte_budget));
        let may_retry = attempt < state.config.max_retries && views.len() > 1;
        // A request that may have reached the engine goes again only if doing it twice is
        // harmless; any may, that never left.
        let may_resend = may_retry && repeatable(&parts.method, parts.uri.path());
        let sending = send(
            &state,
            &endpoint,
            &parts,
            &body,
            &request_id,
            timer.as_mut(),
        );
        // The retry budget is asked only once a retry is due (a granted retry counts), and not
        // again in the same attempt once it refused.
        let mut budget_refused = false;
        let result = match sending.await {
            Ok((response, _))
                if may_resend
                    && is_retryable(response.status())
                    && retry_granted(&state, &mut budget_refused) =>
            {
                Err(SendError::Status(response.status()))
            }
            Ok((mut response, mut conn)) => {
                first_frame(&state, response.body_mut(), &mut conn, timer.as_mut())
                    .await
                    .map(|first| (response, conn, first))
            }
            Err(e) => Err(e),
        };
        match result {
            // A retryable status asked the budget already, above.
            Err(e)
                if (may_resend || (may_retry && matches!(e, SendError::Connect(_))))
                    && e.retryable()
                    && (matches!(e, SendError::Status(_))
                        || retry_granted(&state, &mut budget_refused)) =>
            {
                // Nothing reached the client yet: try another endpoint.
                fail(&state, guard, &endpoint, e.kind(), started, &e.describe());
                state.metrics.retries.inc();
                pool.remove(chosen);
                backoff(&state, attempt).await;
                attempt += 1;
            }
            Ok((response, conn, first)) => {
                let ctx = RequestContext {
                    request_id: request_id.clone(),
                    // The request is done with its profile: this attempt is the last.
                    model: std::mem::take(&mut profile.model),
                    priority: profile.priority,
                    reason: decision.reason.as_str(),
                    prompt_tokens: profile.prompt_tokens,
                    status: response.status(),
                    started,
                    sent,
                    streaming: is_event_stream(response.headers()),
                    // A prefill stage's one-token answer is its first token.
                    streamed: profile.stream || profile.stage == qoe_core::Stage::Prefill,
                    sla_ttft_ms: profile.sla_ttft_ms,
                    load_at_dispatch: views
                        .iter()
                        .find(|v| v.id == decision.endpoint)
                        .map(|v| v.load)
                        .unwrap_or_default(),
                    detail: decision.detail,
                    stage: profile.stage,
                };
                return respond(
                    state.clone(),
                    response,
                    conn,
                    first,
                    guard,
                    ctx,
                    &endpoint,
                    &request_id,
                );
            }
            Err(err) => {
                let kind = err.kind();
                // What ended it is what the budget was asked about (a 5xx whose body then timed
                // out is a timeout, never retried anyway).
                let budget_refused = budget_refused && err.retryable();
                let error = match err {
                    SendError::Timeout => ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!(
                            "the endpoint sent nothing within {} ms ({budget_flag})",
                            first_byte_budget.as_millis()
                        ),
                    ),
                    SendError::Connect(e) => ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "could not connect to any endpoint serving '{}': {e}",
                            profile.model
                        ),
                    ),
                    SendError::Broken(e) => ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        format!("the endpoint closed the connection before answering: {e}"),
                    ),
                    SendError::Status(s) => {
                        ApiError::new(StatusCode::BAD_GATEWAY, format!("the endpoint failed: {s}"))
                    }
                    SendError::Other(e) => {
                        ApiError::new(StatusCode::BAD_GATEWAY, format!("the endpoint failed: {e}"))
                    }
                };
                let mut error = error;
                if budget_refused {
                    error.message += "; not retried elsewhere: the retry budget is spent \
                                      (--retry-budget-ratio, --retry-budget-min-per-sec)";
                }
                fail(&state, guard, &endpoint, kind, started, &error.message);
                let mut response = reject(&state, error, &request_id);
                add_routing_headers(response.headers_mut(), &endpoint, decision.reason.as_str());
                return response;
            }
        }
    }
}

/// Whether the retry budget takes one more retry (counted if so); a refusal is counted and
/// noted in `refused`, and once refused it is not asked again.
fn retry_granted(state: &AppState, refused: &mut bool) -> bool {
    if *refused {
        return false;
    }
    let granted = state.retry_budget.try_retry(state.clock.now());
    if !granted {
        *refused = true;
        state.metrics.retries_refused.inc();
    }
    granted
}

fn fail(
    state: &AppState,
    mut guard: LoadGuard,
    endpoint: &Endpoint,
    kind: &str,
    started: Micros,
    why: &str,
) {
    let now = state.clock.now();
    guard.record(
        &RequestOutcome {
            prompt_tokens: 0,
            output_tokens: 0,
            ttft: None,
            decode_time: 0,
            e2e: now.saturating_sub(started),
            failed: true,
            timed_out: kind == "timeout",
        },
        now,
    );
    state.metrics.count_failure(&endpoint.url, kind);
    tracing::warn!(endpoint = %endpoint.url, kind, "upstream failure: {why}");
}

/// A 429 from admission control, counted by priority and reason.
fn shed(
    state: &AppState,
    priority: qoe_core::Priority,
    reason: &'static str,
    message: String,
) -> ApiError {
    state
        .metrics
        .shed
        .get_or_create(&ShedLabels {
            priority: priority.level(),
            reason,
        })
        .inc();
    let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, message);
    e.retry_after = Some(1);
    e
}

/// Waits in the admission queue until woken (capacity may have freed), a short tick passes
/// (engine metrics may have changed), or the request's wait runs out.
/// A place in the admission queue, left however the request ends, the client leaving included.
struct QueueSlot {
    admission: Arc<Admission>,
    key: QueueKey,
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.admission.leave(&self.key);
    }
}

/// Waits in the admission queue (joining it the first time, keeping the place after) until
/// woken, or a tick passes; refuses when the queue is full, the place was taken by a more urgent
/// request, or the wait is over. `seen`: [`crate::admission::Admission::lost_wakes`] read before
/// the endpoints were looked at (a wake-up lost since then ends the wait at once).
async fn wait_in_queue(
    state: &AppState,
    key: QueueKey,
    lane: &str,
    queued: &mut Option<QueueSlot>,
    deadline: tokio::time::Instant,
    ever_queued: &mut bool,
    seen: u64,
) -> Result<(), ApiError> {
    let admission = &state.admission;
    let timeout = admission.config.queue_timeout;
    let displaced = || {
        shed(
            state,
            key.priority,
            "displaced",
            "the admission queue is full and a higher-priority request took this place; retry later".into(),
        )
    };
    let rx = match queued {
        Some(_) => admission.rearm(&key, seen).ok_or_else(displaced)?,
        None => {
            let rx = admission.enqueue(key, lane, seen).map_err(|_| {
                shed(
                    state,
                    key.priority,
                    "queue_full",
                    format!(
                        "every endpoint is saturated and the admission queue is full ({} waiting, --queue-max); retry later",
                        admission.config.queue_max
                    ),
                )
            })?;
            *queued = Some(QueueSlot {
                admission: admission.clone(),
                key,
            });
            if !std::mem::replace(ever_queued, true) {
                state.metrics.queued.inc();
            }
            rx
        }
    };
    let timed_out = || {
        shed(
            state,
            key.priority,
            "queue_timeout",
            format!(
                "every endpoint stayed saturated for {} s (--queue-timeout); retry later",
                timeout.as_secs_f64()
            ),
        )
    };
    let now = tokio::time::Instant::now();
    // Checked before waiting too: a wait that starts woken returns at once, every time.
    if now >= deadline {
        return Err(timed_out());
    }
    let tick = deadline.saturating_duration_since(now).min(QUEUE_TICK);
    match tokio::time::timeout(tick, rx).await {
        Ok(Ok(Wake::Displaced)) => Err(displaced()),
        Ok(_) => Ok(()),
        Err(_) if tokio::time::Instant::now() >= deadline => Err(timed_out()),
        Err(_) => Ok(()),
    }
}

/// How often a waiter re-checks saturation without being woken (engine metrics change too).
const QUEUE_TICK: std::time::Duration = std::time::Duration::from_millis(100);

/// With `--sla-enforcement shed`, refuses a priority-3 request whose TTFT deadline no endpoint is
/// predicted to meet.
fn enforce_sla(
    state: &AppState,
    profile: &RequestProfile,
    views: &[EndpointView],
    now: Micros,
    started: Micros,
) -> Result<(), ApiError> {
    if state.config.sla_enforcement != SlaEnforcement::Shed {
        return Ok(());
    }
    let Some(best) = state.policy.deadline_lost(profile, views, now, started) else {
        return Ok(());
    };
    let sla_ms = profile.sla_ttft_ms.unwrap_or_default();
    Err(shed(
        state,
        profile.priority,
        "sla",
        format!(
            "no endpoint can meet the {} deadline of {sla_ms} ms (best predicted time to first token {best:.0} ms); priority-3 requests are shed (--sla-enforcement shed)",
            state.config.sla_header
        ),
    ))
}

/// The body with vLLM's `priority` field set to the request's priority, unless it has one. The
/// field is written into the text: the rest of the body goes on byte for byte (a round trip
/// through a JSON value would reorder keys and turn big integers into floats).
fn with_engine_priority(body: Bytes, level: u8) -> Bytes {
    /// Reads only whether the object has a top-level `priority` (`null` included).
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(default, deserialize_with = "present")]
        priority: bool,
    }
    fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        <serde::de::IgnoredAny as serde::Deserialize>::deserialize(d).map(|_| true)
    }
    let Ok(Probe { priority: false }) = serde_json::from_slice::<Probe>(&body) else {
        return body;
    };
    let Some(open) = body.iter().position(|b| !b.is_ascii_whitespace()) else {
        return body;
    };
    if body[open] != b'{' {
        return body;
    }
    let empty = body[open + 1..]
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'}');
    let field = format!("\"priority\":{level}{}", if empty { "" } else { "," });
    let mut out = Vec::with_capacity(body.len() + field.len());
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(field.as_bytes());
    out.extend_from_slice(&body[open + 1..]);
    Bytes::from(out)
}

/// Upstream statuses worth another endpoint: overloaded or failing, with nothing sent yet.
fn is_retryable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 500 | 502 | 503 | 504)
}

/// Waits before retry `attempt` (0-based): `--retry-backoff-ms` × 1.5^attempt, with ±50% jitter so
/// retries of many requests do not arrive in step.
async fn backoff(state: &AppState, attempt: u32) {
    let base = state.config.retry_backoff_ms as f64 * 1.5f64.powi(attempt as i32);
    let jittered = base * (0.5 + rand::random::<f64>());
    if jittered >= 1.0 {
        tokio::time::sleep(std::time::Duration::from_micros((jittered * 1e3) as u64)).await;
    }
}

fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

fn add_routing_headers(headers: &mut HeaderMap, endpoint: &Endpoint, reason: &'static str) {
    if let Some(v) = &endpoint.header_value {
        headers.insert(X_QOE_ENDPOINT.clone(), v.clone());
    }
    headers.insert(X_QOE_REASON.clone(), HeaderValue::from_static(reason));
}

#[allow(clippy::too_many_arguments)]
fn respond(
    state: Arc<AppState>,
    response: Response<hyper::body::Incoming>,
    conn: Conn,
    first: FirstFrame,
    guard: LoadGuard,
    ctx: RequestContext,
    endpoint: &Endpoint,
    request_id: &HeaderValue,
) -> Response {
    let reason = ctx.reason;
    let (mut parts, upstream) = response.into_parts();
    // Hop-by-hop headers stay on their hop. A JSON body's length is the body's own; a stream's
    // is not (the router may end it with an error event), nor one the engine also sent chunked
    // (the chunks decide where it ends, RFC 9112 §6.3: a length beside them is wrong).
    let chunked = parts.headers.contains_key(header::TRANSFER_ENCODING);
    strip_hop_by_hop(&mut parts.headers);
    if ctx.streaming || chunked {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    add_routing_headers(&mut parts.headers, endpoint, reason);
    parts
        .headers
        .insert(X_REQUEST_ID.clone(), request_id.clone());
    let body = ObservedBody::new(upstream, first, state, guard, ctx).returning(conn);
    Response::from_parts(parts, Body::new(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panic while a request waits is the router's failure, logged as such: not a client that
    /// left (status 499).
    #[test]
    fn a_panic_before_the_answer_is_logged_as_the_routers() {
        #[derive(Clone, Default)]
        struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Captured {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let state = crate::server::build_state(crate::config::RouterConfig::default()).unwrap();
        let request_id = HeaderValue::from_static("req-1");
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let left = Unanswered {
                state: &state,
                request_id: &request_id,
                started: state.clock.now(),
                answered: false,
            };
            drop(left);
            let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let _waiting = Unanswered {
                    state: &state,
                    request_id: &request_id,
                    started: state.clock.now(),
                    answered: false,
                };
                panic!("a bug");
            }));
            assert!(panicked.is_err());
        });
        let logged = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = logged.lines().collect();
        assert_eq!(lines.len(), 2, "{logged}");
        assert!(lines[0].contains("status=499") && lines[0].contains("client_closed"));
        assert!(lines[1].contains("status=500") && lines[1].contains("router_panic"));
        assert!(lines.iter().all(|l| l.contains("req-1")));
    }

    #[test]
    fn only_requests_harmless_to_repeat_are_repeatable() {
        use http::Method;
        for (method, path, expected) in [
            (Method::POST, "/v1/chat/completions", true),
            (Method::POST, "/v1/embeddings", true),
            (Method::POST, "/tokenize", true),
            (Method::POST, "/v1/audio/transcriptions", true),
            (Method::POST, "/v2/rerank", true),
            (Method::GET, "/v1/files/file-1", true),
            (Method::DELETE, "/v1/files/file-1", true),
            (Method::POST, "/v1/files", false),
            (Method::POST, "/v1/batches", false),
            (Method::POST, "/v1/load_lora_adapter", false),
            (Method::PATCH, "/v1/chat/completions", false),
        ] {
            assert_eq!(repeatable(&method, path), expected, "{method} {path}");
        }
    }

    #[test]
    fn engine_priority_is_written_into_the_text_and_the_rest_kept() {
        let inject = |body: &str| {
            let out = with_engine_priority(Bytes::from(body.to_string()), 1);
            String::from_utf8(out.to_vec()).unwrap()
        };
        let big = r#" {"z":1,"seed":18446744073709551616,"a":[1.0e2]}"#;
        assert_eq!(
            inject(big),
            r#" {"priority":1,"z":1,"seed":18446744073709551616,"a":[1.0e2]}"#
        );
        assert_eq!(inject("{ }"), r#"{"priority":1 }"#);
        let kept = [
            r#"{"priority":0,"a":1}"#,
            r#"{"a":1,"priority":null}"#,
            "[1]",
            "not json",
            r#"{"a":}"#,
        ];
        for body in kept {
            assert_eq!(inject(body), body);
        }
        let parsed: serde_json::Value =
            serde_json::from_str(&inject(r#"{"a":{"priority":5}}"#)).unwrap();
        assert_eq!(
            parsed["priority"], 1,
            "a nested priority is not the request's"
        );
    }

    #[test]
    fn routes() {
        assert_eq!(
            route_of("/v1/chat/completions").unwrap().kind,
            ApiKind::Chat
        );
        assert!(route_of("/v1/embeddings").unwrap().model_required);
        assert!(!route_of("/tokenize").unwrap().model_required);
        assert!(!route_of("/v1/responses").unwrap().model_required);
        assert_eq!(route_of("/v1/responses").unwrap().kind, ApiKind::Responses);
        assert_eq!(route_of("/v1/messages").unwrap().kind, ApiKind::Messages);
        assert_eq!(route_of("/v1/rerank").unwrap().kind, ApiKind::Other);
        assert!(route_of("/admin").is_none());
    }

    #[test]
    fn dot_segments_are_found_however_written() {
        for path in [
            "/v1/../x",
            "/v1/..",
            "/v1/./chat/completions",
            "/v1/%2e%2e/x",
            "/v1/.%2E/x",
            "/v1/%2e/x",
            "/v1/..%2fmetrics",
            "/v1/%2e%2e%2Fx",
            "/v1/..%5cx",
            "/v1/x/..",
        ] {
            assert!(has_dot_segment(path), "{path}");
        }
        for path in [
            "/v1/chat/completions",
            "/v1/files/a.b",
            "/v1/...",
            "/v1/%2e%2e%2e",
            "/v1/x%20y",
        ] {
            assert!(!has_dot_segment(path), "{path}");
        }
    }

    #[test]
    fn request_ids_are_kept_or_created() {
        let mut h = HeaderMap::new();
        let a = request_id(&h);
        let b = request_id(&h);
        assert_ne!(a, b);
        let a = a.to_str().unwrap();
        assert_eq!(a.len(), 20, "{a}");
        assert!(a.starts_with("qoe-"), "{a}");
        assert!(a[4..].bytes().all(|c| c.is_ascii_hexdigit()), "{a}");
        assert_ne!(&a[4..], "0000000000000000");
        for kept in ["abc", "0af7651916cd43dd8448eb211c80319c", "a-b_c.d:e/f+g=="] {
            h.insert(X_REQUEST_ID.clone(), HeaderValue::from_static(kept));
            assert_eq!(request_id(&h), kept);
        }
        for replaced in ["x model=gpt-4o status=500", "a\"b", "a\\b", "tab\there", ""] {
            h.insert(
                X_REQUEST_ID.clone(),
                HeaderValue::from_str(replaced).unwrap(),
            );
            assert!(request_id(&h).as_bytes().starts_with(b"qoe-"), "{replaced}");
        }
        let obs_text = HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap();
        h.insert(X_REQUEST_ID.clone(), obs_text);
        assert!(request_id(&h).as_bytes().starts_with(b"qoe-"));
    }
}
