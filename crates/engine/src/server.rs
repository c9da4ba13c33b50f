//! The HTTP face: vLLM's routes over the real-time model, with fault injection.
//!
//! A generation request goes through, in order: the fault draw (hang, injected error: a broken
//! engine fails before it looks at the request), parsing and type checks (400), the model name
//! (404), engine-specific checks (priority without priority scheduling, a disaggregated stage sent
//! to the wrong role, context length: 400), the output-length draw, and submission to the model
//! (503 when its queue is full). From then on a [`Ticket`] owned by the response follows the
//! request: an SSE body renders whatever tokens are new each time it is woken, a non-streaming
//! handler waits for the last one. Either way, dropping the response early aborts the request in
//! the model.

use crate::args::{EngineArgs, Role};
use crate::driver::{Driver, Refused, Ticket};
use crate::faults::{FaultDraw, Faults, FaultsUpdate};
use crate::metrics;
use crate::openai::{
    draw_output_len, full_response, parse_request, token_text, Api, ApiError, ChunkFormat, KvStage,
    ParsedRequest,
};
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body::Frame;
use qoe_core::prompt::BLOCK_TOKENS;
use qoe_sim::rng::mix64;
use qoe_sim::{Engine, Scheduling, SimRequest, SubmitError};
use serde_json::{json, Value};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// Longest a hung request is held before its connection is closed (a bound, so hung requests
/// cannot pile up forever; far beyond any client timeout).
const HANG_LIMIT: Duration = Duration::from_secs(600);

/// Pause between the last chunk and an injected crash, so that chunk leaves the socket first.
const CRASH_FLUSH: Duration = Duration::from_millis(20);

/// Shared state of one engine server.
pub(crate) struct App {
    args: EngineArgs,
    pub driver: Arc<Driver>,
    faults: Mutex<Faults>,
    /// Arrival counter: request ids and the fault draw's index.
    next_request: AtomicU64,
    /// The last `/metrics` text, returned while `freeze_metrics` is on.
    metrics_snapshot: Mutex<Option<String>>,
    shutdown: watch::Receiver<bool>,
    started: u64,
    engine_id: String,
    port: u16,
    max_model_len: u32,
    kv_blocks: u32,
    scheduling: Scheduling,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl App {
    pub fn new(
        args: EngineArgs,
        port: u16,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Self> {
        args.validate()?;
        let cfg = args.engine_config()?;
        let faults = args.faults();
        let (max_model_len, kv_blocks, scheduling) =
            (cfg.max_model_len, cfg.kv_blocks(), cfg.scheduling);
        let speed = cfg.speed / faults.slowdown;
        let mut engine = Engine::new(cfg)?;
        engine.set_speed(speed);
        let engine_id = args
            .engine_id
            .clone()
            .unwrap_or_else(|| format!("sim-{}-{port}", args.host));
        Ok(Self {
            driver: Arc::new(Driver::new(
                engine,
                args.catch_up_limit_ms.saturating_mul(1000),
            )),
            faults: Mutex::new(faults),
            next_request: AtomicU64::new(0),
            metrics_snapshot: Mutex::new(None),
            shutdown,
            started: unix_now(),
            engine_id,
            port,
            max_model_len,
            kv_blocks,
            scheduling,
            args,
        })
    }

    fn model_name(&self) -> &str {
        &self.args.models[0]
    }
}

/// All routes.
pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/load", get(load))
        .route(
            "/version",
            get(|| async {
                Json(json!({"version": concat!("qoe-sim-", env!("CARGO_PKG_VERSION"))}))
            }),
        )
        .route("/tokenize", post(tokenize))
        .route("/metrics", get(metrics_handler))
        .route("/admin/config", get(get_config).post(set_config))
        .route("/admin/stats", get(admin_stats))
        .fallback(|| async { (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"}))) })
        .with_state(app)
}

async fn completions(State(app): State<Arc<App>>, body: Bytes) -> Response {
    generate(app, Api::Completions, body).await
}

async fn chat(State(app): State<Arc<App>>, body: Bytes) -> Response {
    generate(app, Api::Chat, body).await
}

/// Everything decided about a request before it enters the model.
struct Plan {
    api: Api,
    id: String,
    created: u64,
    model: String,
    prompt_tokens: u32,
    output_tokens: u32,
    finish: &'static str,
    text_seed: u64,
    include_usage: bool,
    stream: bool,
    /// Returned to the router after a prefill stage (`do_remote_decode`).
    kv_transfer_params: Option<Value>,
    faults: FaultDraw,
}

async fn generate(app: Arc<App>, api: Api, body: Bytes) -> Response {
    let n = app.next_request.fetch_add(1, Ordering::Relaxed);
    let draw = lock(&app.faults).draw(app.args.seed, n);
    if draw.hang {
        return hang(&app).await;
    }
    if let Some(status) = draw.error {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return ApiError::new(
            status,
            format!("injected fault: request {n} fails with {}", status.as_u16()),
        )
        .into_response();
    }
    let max_prefix_blocks = app.max_model_len as usize / BLOCK_TOKENS + 1;
    let p = match parse_request(api, &body, max_prefix_blocks) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    match admit(&app, api, n, p, draw) {
        Ok((plan, ticket)) if plan.stream => stream_response(app, plan, ticket),
        Ok((plan, ticket)) => full(app, plan, ticket).await,
        Err(e) => e.into_response(),
    }
}

/// Validates a parsed request against this engine and submits it to the model.
fn admit(
    app: &Arc<App>,
    api: Api,
    n: u64,
    p: ParsedRequest,
    faults: FaultDraw,
) -> Result<(Plan, Ticket), ApiError> {
    if !app.args.models.contains(&p.model) {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "The model `{}` does not exist. Served models: {}.",
                p.model,
                app.args.models.join(", ")
            ),
            param: Some("model".into()),
        });
    }
    if p.priority != 0 && app.scheduling != Scheduling::Priority {
        // vLLM's answer: the field only means something with `--scheduling-policy priority`.
        return Err(ApiError::bad_request(
            format!(
                "Got priority {} but Priority scheduling is not enabled.",
                p.priority
            ),
            Some("priority"),
        ));
    }
    match (&p.kv, app.args.role) {
        (KvStage::Prefill, Role::Decode) => {
            return Err(ApiError::bad_request(
                "this engine has role decode: it cannot serve kv_transfer_params.do_remote_decode",
                Some("kv_transfer_params"),
            ))
        }
        (KvStage::Decode { .. }, Role::Prefill) => return Err(ApiError::bad_request(
            "this engine has role prefill: it cannot serve kv_transfer_params.do_remote_prefill",
            Some("kv_transfer_params"),
        )),
        _ => {}
    }
    let max_len = app.max_model_len;
    let what = if api == Api::Chat {
        "messages"
    } else {
        "prompt"
    };
    let max_tokens = p
        .max_tokens
        .unwrap_or(max_len.saturating_sub(p.prompt_tokens));
    let total = p.prompt_tokens as u64 + max_tokens as u64;
    if total > max_len as u64 || max_tokens == 0 {
        return Err(ApiError::bad_request(
            format!(
                "This model's maximum context length is {max_len} tokens. However, you requested {total} tokens ({} in the {what}, {max_tokens} in the completion). Please reduce the length of the {what} or completion.",
                p.prompt_tokens
            ),
            None,
        ));
    }
    let seed = mix64(app.args.seed ^ p.request_hash ^ p.seed.map(mix64).unwrap_or(0));
    let (output_tokens, eos) = if p.ignore_eos {
        (max_tokens, false)
    } else {
        draw_output_len(
            seed,
            app.args.output_len_median,
            app.args.output_len_sigma,
            max_tokens,
        )
    };
    let kv_transfer_params = (p.kv == KvStage::Prefill).then(|| {
        // Opaque block ids for the decode engine, which only counts them: one per prompt block,
        // laid out where this engine's allocator would plausibly have put them.
        let blocks = p.prompt_tokens.div_ceil(BLOCK_TOKENS as u32) as u64;
        let base = mix64(n) % app.kv_blocks.max(1) as u64;
        let ids: Vec<u64> = (0..blocks)
            .map(|b| (base + b) % app.kv_blocks as u64)
            .collect();
        json!({
            "do_remote_prefill": true,
            "do_remote_decode": false,
            "remote_engine_id": app.engine_id,
            "remote_block_ids": ids,
            "remote_host": app.args.host,
            "remote_port": app.port,
            "tp_size": 1,
        })
    });
    let sim = SimRequest {
        id: n,
        prompt_tokens: p.prompt_tokens,
        prefix_hashes: p.prefix_hashes,
        output_tokens,
        stops_at_eos: eos,
        priority: p.priority,
        skip_prefill: matches!(p.kv, KvStage::Decode { .. }),
    };
    let ticket = app.driver.submit(sim).map_err(|e| match e {
        Refused::Model(e @ SubmitError::QueueFull { .. }) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the engine is overloaded: {e}"),
        ),
        Refused::Model(other) => ApiError::bad_request(other.to_string(), None),
        Refused::Closed => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    })?;
    let prefix = if api == Api::Chat { "chatcmpl" } else { "cmpl" };
    let plan = Plan {
        api,
        id: format!(
            "{prefix}-{:016x}{n:016x}",
            mix64(app.args.seed ^ app.started)
        ),
        created: unix_now(),
        model: p.model,
        prompt_tokens: p.prompt_tokens,
        output_tokens,
        finish: if eos { "stop" } else { "length" },
        text_seed: seed,
        include_usage: p.include_usage,
        stream: p.stream,
        kv_transfer_params,
        faults,
    };
    Ok((plan, ticket))
}

/// Never answers (until shutdown or [`HANG_LIMIT`]), then drops the connection.
async fn hang(app: &App) -> Response {
    let mut shutdown = app.shutdown.clone();
    tokio::select! {
        _ = tokio::time::sleep(HANG_LIMIT) => {}
        _ = shutdown.changed() => {}
    }
    broken_body(StatusCode::OK)
}

/// A response whose body fails at once: the connection is closed without a complete answer.
fn broken_body(status: StatusCode) -> Response {
    let stream = futures_util::stream::once(async {
        Err::<Bytes, io::Error>(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "injected crash",
        ))
    });
    (status, Body::from_stream(stream)).into_response()
}

/// Waits until `ticket` has produced `target` tokens (or finished); false if the engine stopped
/// first.
async fn wait_for(ticket: &Ticket, target: u32) -> bool {
    loop {
        let p = ticket.progress();
        if p.finished || p.produced >= target {
            return true;
        }
        if p.closed {
            return false;
        }
        ticket.changed(p).await;
    }
}

/// A non-streaming answer: wait for every token, then one JSON body.
async fn full(app: Arc<App>, plan: Plan, ticket: Ticket) -> Response {
    let mut shutdown = app.shutdown.clone();
    let target = if plan.faults.crash {
        plan.output_tokens / 2
    } else {
        plan.output_tokens
    };
    if !wait_for(&ticket, target).await {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the engine is shutting down",
        )
        .into_response();
    }
    if plan.faults.crash {
        return broken_body(StatusCode::OK);
    }
    if let Some(ms) = plan.faults.stall_ms {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
            _ = shutdown.changed() => {}
        }
    }
    let produced = ticket.progress().produced;
    let text: String = (0..produced)
        .map(|i| token_text(plan.text_seed, i))
        .collect();
    let body = full_response(
        plan.api,
        &plan.id,
        plan.created,
        &plan.model,
        text,
        plan.finish,
        plan.prompt_tokens,
        produced,
        plan.kv_transfer_params,
    );
    drop(ticket);
    Json(body).into_response()
}

/// What an [`SseBody`] does once its pending wait ends.
enum AfterWait {
    /// Break the connection (the injected crash, after the flush pause).
    Crash,
    /// Resume streaming (the injected stall), unless the engine is shutting down.
    Resume,
}

/// A pending wait of an [`SseBody`]; resolves to true if the engine began shutting down.
type Wait = Pin<Box<dyn Future<Output = bool> + Send>>;

/// One SSE response body, polled by the connection directly: each poll renders every token
/// produced since the last frame into one frame (one write), or registers the connection's task
/// with the request's delivery and waits. Dropping it (client gone) drops the ticket, which aborts
/// the request.
struct SseBody {
    plan: Plan,
    ticket: Ticket,
    fmt: ChunkFormat,
    sent: u32,
    stall_at: Option<u32>,
    crash_at: Option<u32>,
    shutdown: watch::Receiver<bool>,
    /// A fault's timed pause in progress (rare: faults only).
    wait: Option<(Wait, AfterWait)>,
    done: bool,
}

impl SseBody {
    fn end_by_shutdown(&mut self) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.done = true;
        Poll::Ready(Some(Err(io::Error::other("engine shutting down"))))
    }

    fn render(&mut self, upto: u32) -> Bytes {
        let last = self.plan.output_tokens;
        let seed = self.plan.text_seed;
        let finish = |i: u32| (i + 1 == last).then_some(self.plan.finish);
        let mut len = 0;
        if self.sent == 0 {
            len += self.fmt.role_len();
        }
        for i in self.sent..upto {
            len += self.fmt.token_len(token_text(seed, i), finish(i));
        }
        let end = upto == last;
        if end {
            if self.plan.include_usage {
                len += self.fmt.usage_len(self.plan.prompt_tokens, last);
            }
            len += ChunkFormat::DONE.len();
        }
        // Sized exactly, so the buffer becomes the frame without a copy or a second allocation.
        let mut out = String::with_capacity(len);
        if self.sent == 0 {
            self.fmt.role(&mut out);
        }
        for i in self.sent..upto {
            self.fmt.token(&mut out, token_text(seed, i), finish(i));
        }
        self.sent = upto;
        if end {
            if self.plan.include_usage {
                self.fmt.usage(&mut out, self.plan.prompt_tokens, last);
            }
            ChunkFormat::done(&mut out);
            self.done = true;
        }
        debug_assert_eq!(out.len(), len, "frame length");
        self.ticket.count_frame();
        Bytes::from(out)
    }
}

impl HttpBody for SseBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            if let Some((wait, _)) = &mut this.wait {
                let shutting_down = ready!(wait.as_mut().poll(cx));
                let (_, after) = this.wait.take().expect("a wait in progress");
                match after {
                    AfterWait::Crash => {
                        this.done = true;
                        return Poll::Ready(Some(Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            "injected crash",
                        ))));
                    }
                    AfterWait::Resume if shutting_down => return this.end_by_shutdown(),
                    AfterWait::Resume => {}
                }
            }
            if this.done {
                return Poll::Ready(None);
            }
            let mut p = this.ticket.progress();
            loop {
                let mut upto = p.produced.min(this.plan.output_tokens);
                if let Some(c) = this.crash_at {
                    upto = upto.min(c);
                }
                if let Some(s) = this.stall_at {
                    upto = upto.min(s);
                }
                if upto > this.sent {
                    return Poll::Ready(Some(Ok(Frame::data(this.render(upto)))));
                }
                if this.crash_at == Some(this.sent) || p.closed || this.stall_at == Some(this.sent)
                {
                    break;
                }
                // Nothing new: register for the next change (one wake-up source per token; the
                // loop closes the ticket when the engine stops).
                p = ready!(this.ticket.poll_changed(cx, p));
            }
            if this.crash_at == Some(this.sent) {
                // Let the connection flush the tokens already written, then break it: the client
                // sees exactly the first half of the answer.
                this.crash_at = None;
                let wait: Wait = Box::pin(async {
                    tokio::task::yield_now().await;
                    tokio::time::sleep(CRASH_FLUSH).await;
                    false
                });
                this.wait = Some((wait, AfterWait::Crash));
                continue;
            }
            if p.closed {
                return this.end_by_shutdown();
            }
            // The stall point.
            this.stall_at = None;
            let ms = this.plan.faults.stall_ms.unwrap_or(0);
            let mut shutdown = this.shutdown.clone();
            let wait: Wait = Box::pin(async move {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(ms)) => false,
                    _ = shutdown.changed() => true,
                }
            });
            this.wait = Some((wait, AfterWait::Resume));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.wait.is_none()
    }
}

fn stream_response(app: Arc<App>, plan: Plan, ticket: Ticket) -> Response {
    let half = plan.output_tokens / 2;
    let body = SseBody {
        fmt: ChunkFormat::new(plan.api, &plan.id, plan.created, &plan.model),
        stall_at: plan
            .faults
            .stall_ms
            .map(|_| half.max(1).min(plan.output_tokens)),
        crash_at: plan.faults.crash.then_some(half),
        shutdown: app.shutdown.clone(),
        sent: 0,
        wait: None,
        done: false,
        plan,
        ticket,
    };
    let mut resp = Body::new(body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    let root = app.model_name();
    let data: Vec<Value> = app
        .args
        .models
        .iter()
        .map(|m| {
            json!({
                "id": m,
                "object": "model",
                "created": app.started,
                "owned_by": "vllm",
                "root": root,
                "parent": null,
                "max_model_len": app.max_model_len,
                "permission": [{
                    "id": format!("modelperm-{m}"),
                    "object": "model_permission",
                    "created": app.started,
                    "allow_create_engine": false,
                    "allow_sampling": true,
                    "allow_logprobs": true,
                    "allow_search_indices": false,
                    "allow_view": true,
                    "allow_fine_tuning": false,
                    "organization": "*",
                    "group": null,
                    "is_blocking": false,
                }],
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// vLLM's `/load`: requests in the engine (running + waiting).
async fn load(State(app): State<Arc<App>>) -> Json<Value> {
    let s = app.driver.stats();
    Json(json!({"server_load": s.running + s.waiting}))
}

/// `/tokenize` with the shared prompt rule. The ids are placeholders (the rule has no vocabulary):
/// a deterministic id per token position and prompt, so only `count` carries meaning.
async fn tokenize(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let has_messages = serde_json::from_slice::<Value>(&body)
        .ok()
        .is_some_and(|v| v.get("messages").is_some());
    let api = if has_messages {
        Api::Chat
    } else {
        Api::Completions
    };
    // /tokenize does not require a model; default to the served one for the shared parser.
    let body = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(mut o)) => {
            o.entry("model")
                .or_insert_with(|| Value::String(app.model_name().to_string()));
            Bytes::from(serde_json::to_vec(&o).unwrap_or_default())
        }
        _ => body,
    };
    match parse_request(api, &body, 0) {
        Ok(p) => {
            let tokens: Vec<u64> = (0..p.prompt_tokens as u64)
                .map(|i| mix64(p.request_hash.wrapping_add(i)) % 128_000)
                .collect();
            Json(json!({
                "count": p.prompt_tokens,
                "max_model_len": app.max_model_len,
                "tokens": tokens,
                "token_strs": null,
            }))
            .into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn metrics_handler(State(app): State<Arc<App>>) -> Response {
    let frozen = lock(&app.faults).freeze_metrics;
    let mut snapshot = lock(&app.metrics_snapshot);
    let text = match (&*snapshot, frozen) {
        (Some(text), true) => text.clone(),
        _ => {
            let text = metrics::render(&app.driver.stats(), app.model_name(), app.args.v0_metrics);
            *snapshot = Some(text.clone());
            text
        }
    };
    drop(snapshot);
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}

fn config_view(app: &App) -> Value {
    let mut v = serde_json::to_value(&*lock(&app.faults)).unwrap_or(Value::Null);
    if let Value::Object(o) = &mut v {
        o.insert("role".into(), json!(app.args.role));
    }
    v
}

async fn get_config(State(app): State<Arc<App>>) -> Json<Value> {
    Json(config_view(&app))
}

async fn set_config(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let update: FaultsUpdate = match serde_json::from_slice(&body) {
        Ok(u) => u,
        Err(e) => {
            return ApiError::bad_request(format!("invalid fault config: {e}"), None)
                .into_response()
        }
    };
    let slowdown = {
        let mut f = lock(&app.faults);
        if let Err(e) = f.apply(&update) {
            return ApiError::bad_request(e, None).into_response();
        }
        f.slowdown
    };
    app.driver.set_speed(app.args.speed / slowdown);
    Json(config_view(&app)).into_response()
}

async fn admin_stats(State(app): State<Arc<App>>) -> Json<Value> {
    let s = app.driver.stats();
    Json(json!({
        "loop": app.driver.loop_stats(),
        "running": s.running,
        "waiting": s.waiting,
        "kv_usage": s.kv_usage(),
        "preemptions": s.preemptions,
        "generation_tokens": s.generation_tokens,
        "submitted": s.submitted,
    }))
}
