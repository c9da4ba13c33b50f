//! The HTTP face: vLLM's routes over the real-time model, with fault injection.
//!
//! A generation request goes through, in order: the fault draw (hang, injected error: a broken
//! engine fails before it looks at the request), the content type, parsing and vLLM's checks
//! (400), the model name (404; none named is the first served), the role check of a disaggregated
//! stage, context length (a prompt longer than `max_model_len`, or `max_tokens` above it: 400;
//! otherwise `max_tokens` is capped to what fits, as vLLM does), the output-length draw and stop
//! strings, and submission to the model (503 when its queue is full). Each choice (`n`, and each
//! prompt of a batch) is its own request in the model, as vLLM V1 fans them out. From then on a
//! [`Ticket`] per choice, owned by the response, follows it: an SSE body renders whatever tokens
//! are new each time it is woken, a non-streaming handler waits for the last one. Either way,
//! dropping the response early aborts the requests in the model. `priority` is honoured under
//! `--scheduling-policy priority` and ignored otherwise, as vLLM 0.32 does.

use crate::args::{EngineArgs, Role};
use crate::driver::{Driver, Progress, Refused, Ticket};
use crate::faults::{FaultDraw, Faults, FaultsUpdate};
use crate::metrics;
use crate::openai::{
    choice_logprobs, detokenize, draw_output_len, find_stop, full_response, parse_request,
    read_object, token_str, token_text, Api, ApiError, Choice, ChunkFormat, KvStage, Logprobs,
    Measure, Out, ParsedRequest, Piece, COMPLETION_DEFAULT_MAX_TOKENS, VOCAB,
};
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::State;
use axum::handler::Handler;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, on, post, MethodFilter, MethodRouter};
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
    /// Generation requests in flight (`/load`), from arrival to the end of their answer.
    in_flight: Arc<AtomicU64>,
    /// Ids of the model's requests (one per choice).
    next_seq: AtomicU64,
    /// Most sequences the model holds at once, running and waiting.
    capacity: u64,
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
        let capacity = cfg.max_num_seqs as u64 + cfg.max_num_queued_reqs as u64;
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
            in_flight: Arc::default(),
            next_seq: AtomicU64::new(0),
            capacity,
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

/// The largest request body read, bytes: far beyond any prompt an engine's context holds (vLLM's
/// server sets none; a body this large fails the context-length check anyway), and a bound on
/// what one request may make the engine buffer.
pub const MAX_BODY_BYTES: usize = 64 << 20;

/// A request body of at most [`MAX_BODY_BYTES`]; a larger or broken one is refused in OpenAI's
/// shape (axum's own refusal is plain text).
struct RequestBody(Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for RequestBody {
    type Rejection = Response;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, Response> {
        match Bytes::from_request(request, state).await {
            Ok(body) => Ok(RequestBody(body)),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::new(
                e.status(),
                format!("the request body is over {MAX_BODY_BYTES} bytes"),
            )
            .into_response()),
            Err(e) => Err(ApiError::new(e.status(), e.body_text()).into_response()),
        }
    }
}

/// All routes.
pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get_only(models))
        .route("/health", get_only(|| async { StatusCode::OK }))
        .route("/load", get_only(load))
        .route(
            "/version",
            get_only(|| async {
                Json(json!({"version": concat!("qoe-sim-", env!("CARGO_PKG_VERSION"))}))
            }),
        )
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize_handler))
        .route("/metrics", get_only(metrics_handler))
        .route("/admin/config", get(get_config).post(set_config))
        .route("/admin/stats", get(admin_stats))
        // FastAPI's bodies: a known route with another method is a JSON 405 (with `allow`).
        .method_not_allowed_fallback(|| async {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                Json(json!({"detail": "Method Not Allowed"})),
            )
        })
        .fallback(|| async { (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"}))) })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(app)
}

/// A GET route that, like FastAPI's, does not answer HEAD (405).
fn get_only<H, T>(handler: H) -> MethodRouter<Arc<App>>
where
    H: Handler<T, Arc<App>>,
    T: 'static,
{
    // axum answers HEAD with the GET handler unless HEAD has its own.
    on(MethodFilter::GET, handler).head(|| async {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET")],
            Json(json!({"detail": "Method Not Allowed"})),
        )
    })
}

/// vLLM reads only `application/json` bodies (any parameters after the media type).
fn json_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let media = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim());
    match media {
        Some(m) if m.eq_ignore_ascii_case("application/json") => Ok(()),
        _ => Err(ApiError::unsupported_media_type()),
    }
}

async fn completions(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    RequestBody(body): RequestBody,
) -> Response {
    generate(app, Api::Completions, &headers, body).await
}

async fn chat(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    RequestBody(body): RequestBody,
) -> Response {
    generate(app, Api::Chat, &headers, body).await
}

/// Most output tokens one request may generate over all its sequences (or `max_model_len`, if
/// larger). The stop-string scan and a non-streamed answer (text, logprobs) are built per request
/// up front: this bounds their time and memory (a few hundred MB at 20 logprobs per token), far
/// above what a real client asks for.
const MAX_REQUEST_OUTPUT_TOKENS: u64 = 1 << 18;

/// One output sequence: a choice of the answer, a request in the model.
struct Seq {
    /// The choice's `index`.
    index: u32,
    /// Index into [`Plan::prompts`].
    prompt: usize,
    output_tokens: u32,
    finish: &'static str,
    /// The stop string that ended it, as JSON, else `null`.
    stop_reason: String,
    text_seed: u64,
    /// Bytes of text shown when a stop string cut it.
    visible: Option<usize>,
}

impl Seq {
    /// Token `i`'s visible text, given the bytes of text before it.
    fn piece(&self, i: u32, before: usize) -> &'static str {
        let w = token_text(self.text_seed, i);
        match self.visible {
            Some(v) => &w[..w.len().min(v.saturating_sub(before))],
            None => w,
        }
    }
}

/// What a prompt contributes to every chunk of its choices.
struct PromptInfo {
    tokens: u32,
    /// `echo`: the prompt's text, JSON-escaped (without quotes) for the stream.
    echo: Option<String>,
}

/// Everything decided about a request before it enters the model.
struct Plan {
    api: Api,
    id: String,
    created: u64,
    model: String,
    prompts: Vec<PromptInfo>,
    seqs: Vec<Seq>,
    logprobs: Option<Logprobs>,
    include_usage: bool,
    continuous_usage: bool,
    stream: bool,
    /// Returned to the router after a prefill stage (`do_remote_decode`).
    kv_transfer_params: Option<Value>,
    faults: FaultDraw,
}

impl Plan {
    fn prompt_tokens(&self) -> u64 {
        self.prompts.iter().map(|p| p.tokens as u64).sum()
    }
}

async fn generate(app: Arc<App>, api: Api, headers: &HeaderMap, body: Bytes) -> Response {
    let in_flight = InFlight::new(&app.in_flight);
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
    if let Err(e) = json_content_type(headers) {
        return e.into_response();
    }
    let max_prefix_blocks = app.max_model_len as usize / BLOCK_TOKENS + 1;
    let p = match parse_request(api, &body, max_prefix_blocks) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    // vLLM names the answer after the client's request id when it sends one.
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty());
    match admit(&app, api, n, p, draw, request_id) {
        Ok((plan, tickets)) if plan.stream => stream_response(app, plan, tickets, in_flight),
        Ok((plan, tickets)) => full(app, plan, tickets).await,
        Err(e) => e.into_response(),
    }
}

/// vLLM's context-length checks of one prompt; returns its `max_tokens` (capped to what fits).
fn fit(max_len: u32, prompt: u32, max_tokens: Option<u64>, api: Api) -> Result<u32, ApiError> {
    if prompt > max_len {
        let at_least = max_len as u64 + 1;
        return Err(ApiError::check(
            format!("This model's maximum context length is {max_len} tokens. However, your prompt contains at least {at_least} input tokens, which exceeds this limit even without any output tokens. Please reduce the length of the input prompt."),
            "input_tokens",
            Some(&at_least.to_string()),
        ));
    }
    if let Some(m) = max_tokens.filter(|m| *m > max_len as u64) {
        return Err(ApiError::check(
            format!("max_tokens={m} cannot be greater than max_model_len={max_len}. Please request fewer output tokens."),
            "max_tokens",
            Some(&m.to_string()),
        ));
    }
    let room = max_len - prompt;
    let wanted = match (max_tokens, api) {
        (Some(m), _) => m,
        (None, Api::Completions) => COMPLETION_DEFAULT_MAX_TOKENS,
        (None, Api::Chat) => room as u64,
    };
    let fitted = wanted.min(room as u64) as u32;
    if fitted == 0 {
        return Err(ApiError::check(
            "max_tokens must be at least 1, got 0.",
            "max_tokens",
            Some("0"),
        ));
    }
    Ok(fitted)
}

/// Validates a parsed request against this engine and submits its sequences to the model.
fn admit(
    app: &Arc<App>,
    api: Api,
    n: u64,
    p: ParsedRequest,
    faults: FaultDraw,
    request_id: Option<&str>,
) -> Result<(Plan, Vec<Ticket>), ApiError> {
    let model = match p.model {
        None => app.model_name().to_string(),
        Some(m) if app.args.models.contains(&m) => m,
        Some(m) => return Err(ApiError::unknown_model(&m, &app.args.models)),
    };
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
    let budgets = p
        .prompts
        .iter()
        .map(|q| fit(max_len, q.tokens, p.max_tokens, api))
        .collect::<Result<Vec<u32>, ApiError>>()?;
    let total = p.prompts.len() as u64 * p.n as u64;
    // A request that can never fit is the client's error (400), not a transient overload (a
    // router retries a 503 elsewhere and counts it against the engine).
    if total > app.capacity {
        return Err(ApiError::bad_request(
            format!(
                "n × prompts is {total} sequences; this engine holds at most {} \
                 (max_num_seqs + max_num_queued_reqs)",
                app.capacity
            ),
            Some("n"),
        ));
    }

    let seed = mix64(app.args.seed ^ p.request_hash ^ p.seed.map(mix64).unwrap_or(0));
    let mut seqs = Vec::with_capacity(total as usize);
    let output_limit = MAX_REQUEST_OUTPUT_TOKENS.max(max_len as u64);
    let mut planned = 0u64;
    for (q, &max_tokens) in budgets.iter().enumerate() {
        for j in 0..p.n {
            let index = q as u32 * p.n + j;
            // The first sequence keeps the request's own stream.
            let text_seed = if index == 0 {
                seed
            } else {
                mix64(seed ^ mix64(index as u64))
            };
            let (mut output_tokens, eos) = if p.ignore_eos {
                (max_tokens, false)
            } else {
                draw_output_len(
                    text_seed,
                    app.args.output_len_median,
                    app.args.output_len_sigma,
                    max_tokens,
                )
            };
            planned += output_tokens as u64;
            if planned > output_limit {
                return Err(ApiError::bad_request(
                    format!(
                        "n × prompts asks for more than {output_limit} output tokens in all; \
                         this simulated engine generates at most that for one request"
                    ),
                    Some("n"),
                ));
            }
            let mut finish = if eos { "stop" } else { "length" };
            let mut stop_reason = "null".to_string();
            let mut visible = None;
            if let Some(hit) = find_stop(text_seed, output_tokens, &p.stop, p.include_stop) {
                output_tokens = hit.tokens;
                finish = "stop";
                stop_reason = serde_json::to_string(&p.stop[hit.which]).expect("a string");
                visible = Some(hit.visible);
            }
            seqs.push(Seq {
                index,
                prompt: q,
                output_tokens,
                finish,
                stop_reason,
                text_seed,
                visible,
            });
        }
    }
    let kv_transfer_params = (p.kv == KvStage::Prefill).then(|| {
        // Opaque block ids for the decode engine, which only counts them: one per prompt block,
        // laid out where this engine's allocator would plausibly have put them.
        let blocks = p.prompts[0].tokens.div_ceil(BLOCK_TOKENS as u32) as u64;
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
    // Each sequence is a request of the model, as vLLM V1 fans `n` out; dropping the tickets
    // taken so far aborts them if a later one is refused.
    let mut tickets = Vec::with_capacity(seqs.len());
    for s in &seqs {
        let prompt = &p.prompts[s.prompt];
        let sim = SimRequest {
            id: app.next_seq.fetch_add(1, Ordering::Relaxed),
            prompt_tokens: prompt.tokens,
            prefix_hashes: prompt.prefix_hashes.clone(),
            output_tokens: s.output_tokens,
            stops_at_eos: s.finish == "stop",
            // vLLM ignores `priority` unless it schedules by priority.
            priority: if app.scheduling == Scheduling::Priority {
                p.priority
            } else {
                0
            },
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
        tickets.push(ticket);
    }
    let stream = p.stream;
    let prompts = p
        .prompts
        .into_iter()
        .map(|q| PromptInfo {
            tokens: q.tokens,
            echo: q.echo.map(|t| {
                if stream {
                    let quoted = serde_json::to_string(&t).expect("a string");
                    quoted[1..quoted.len() - 1].to_string()
                } else {
                    t
                }
            }),
        })
        .collect();
    let prefix = if api == Api::Chat { "chatcmpl" } else { "cmpl" };
    let plan = Plan {
        api,
        id: match request_id {
            Some(rid) => format!("{prefix}-{rid}"),
            None => format!(
                "{prefix}-{:016x}{n:016x}",
                mix64(app.args.seed ^ app.started)
            ),
        },
        created: unix_now(),
        model,
        prompts,
        seqs,
        logprobs: p.logprobs,
        include_usage: p.include_usage,
        continuous_usage: p.continuous_usage,
        stream,
        kv_transfer_params,
        faults,
    };
    Ok((plan, tickets))
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

/// A non-streaming answer: wait for every token of every choice, then one JSON body. Faults act on
/// the first choice.
async fn full(app: Arc<App>, plan: Plan, tickets: Vec<Ticket>) -> Response {
    let mut shutdown = app.shutdown.clone();
    let shutting_down = || {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the engine is shutting down",
        )
        .into_response()
    };
    if plan.faults.crash {
        if !wait_for(&tickets[0], plan.seqs[0].output_tokens / 2).await {
            return shutting_down();
        }
        return broken_body(StatusCode::OK);
    }
    for (t, s) in tickets.iter().zip(&plan.seqs) {
        if !wait_for(t, s.output_tokens).await {
            return shutting_down();
        }
    }
    if let Some(ms) = plan.faults.stall_ms {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
            _ = shutdown.changed() => {}
        }
    }
    let mut completion_tokens = 0u64;
    let choices = tickets
        .iter()
        .zip(&plan.seqs)
        .map(|(t, s)| {
            let produced = t.progress().produced.min(s.output_tokens);
            completion_tokens += produced as u64;
            let echo = plan.prompts[s.prompt].echo.as_deref().unwrap_or("");
            let mut text = String::with_capacity(echo.len() + produced as usize * 6);
            text.push_str(echo);
            for i in 0..produced {
                text.push_str(token_text(s.text_seed, i));
            }
            if let Some(v) = s.visible {
                text.truncate(echo.len() + v);
            }
            Choice {
                index: s.index,
                text,
                logprobs: plan
                    .logprobs
                    .map(|l| choice_logprobs(plan.api, s.text_seed, produced, l.top, echo.len())),
                finish: s.finish,
                stop_reason: serde_json::from_str::<Option<String>>(&s.stop_reason).unwrap_or(None),
            }
        })
        .collect();
    let body = full_response(
        plan.api,
        &plan.id,
        plan.created,
        &plan.model,
        choices,
        plan.prompt_tokens(),
        completion_tokens,
        plan.kv_transfer_params,
    );
    drop(tickets);
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

/// One choice of a stream: its request in the model and what has been sent of it.
struct SeqStream {
    ticket: Ticket,
    /// The progress last read; a change from it wakes the body.
    seen: Progress,
    sent: u32,
    /// Bytes of full words sent (where the next token's text starts).
    text_bytes: usize,
    /// Tokens to render in the frame being built.
    upto: u32,
}

/// One SSE response body, polled by the connection directly: each poll renders every token
/// produced since the last frame, of every choice, into one frame (one write), or registers the
/// connection's task with each unfinished choice's delivery and waits. Dropping it (client gone)
/// drops the tickets, which aborts the requests. Faults act on the first choice.
struct SseBody {
    plan: Plan,
    streams: Vec<SeqStream>,
    fmt: ChunkFormat,
    started: bool,
    stall_at: Option<u32>,
    crash_at: Option<u32>,
    shutdown: watch::Receiver<bool>,
    /// A fault's timed pause in progress (rare: faults only).
    wait: Option<(Wait, AfterWait)>,
    done: bool,
    /// Counted in `/load` until the stream is dropped.
    _in_flight: InFlight,
}

impl SseBody {
    fn end_by_shutdown(&mut self) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.done = true;
        Poll::Ready(Some(Err(io::Error::other("engine shutting down"))))
    }

    /// Reads every choice's progress and sets what the next frame holds; true if it holds anything.
    fn take_progress(&mut self) -> bool {
        let mut any = false;
        for (k, s) in self.streams.iter_mut().enumerate() {
            s.seen = s.ticket.progress();
            let mut upto = s.seen.produced.min(self.plan.seqs[k].output_tokens);
            if k == 0 {
                if let Some(c) = self.crash_at {
                    upto = upto.min(c);
                }
                if let Some(st) = self.stall_at {
                    upto = upto.min(st);
                }
            }
            s.upto = upto.max(s.sent);
            any |= s.upto > s.sent;
        }
        any
    }

    fn finished(&self) -> bool {
        self.streams
            .iter()
            .zip(&self.plan.seqs)
            .all(|(s, q)| s.upto == q.output_tokens)
    }

    /// Writes the frame `take_progress` set up.
    fn emit<O: Out>(&self, out: &mut O) {
        let plan = &self.plan;
        if !self.started && self.fmt.is_chat() {
            for s in &plan.seqs {
                let usage = plan.continuous_usage.then(|| plan.prompts[s.prompt].tokens);
                self.fmt.role(out, s.index, usage);
            }
        }
        for (s, q) in self.streams.iter().zip(&plan.seqs) {
            let prompt = &plan.prompts[q.prompt];
            let mut before = s.text_bytes;
            for i in s.sent..s.upto {
                let piece = Piece {
                    index: q.index,
                    echo: if i == 0 {
                        prompt.echo.as_deref().unwrap_or("")
                    } else {
                        ""
                    },
                    text: q.piece(i, before),
                    seed: q.text_seed,
                    position: i,
                    offset: before.min(q.visible.unwrap_or(usize::MAX)),
                    finish: (i + 1 == q.output_tokens)
                        .then_some((q.finish, q.stop_reason.as_str())),
                    usage: plan.continuous_usage.then_some((prompt.tokens, i + 1)),
                };
                self.fmt.token(out, &piece);
                before += token_text(q.text_seed, i).len();
            }
        }
        if self.finished() {
            if plan.include_usage {
                let completion = plan.seqs.iter().map(|q| q.output_tokens as u64).sum();
                self.fmt.usage(out, plan.prompt_tokens(), completion);
            }
            out.put(ChunkFormat::DONE);
        }
    }

    fn render(&mut self) -> Bytes {
        let mut size = Measure::default();
        self.emit(&mut size);
        // Sized exactly, so the buffer becomes the frame without a copy or a second allocation.
        let mut out = String::with_capacity(size.0);
        self.emit(&mut out);
        debug_assert_eq!(out.len(), size.0, "frame length");
        self.done = self.finished();
        self.started = true;
        for (s, q) in self.streams.iter_mut().zip(&self.plan.seqs) {
            for i in s.sent..s.upto {
                s.text_bytes += token_text(q.text_seed, i).len();
            }
            s.sent = s.upto;
        }
        self.streams[0].ticket.count_frame();
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
            loop {
                if this.take_progress() {
                    return Poll::Ready(Some(Ok(Frame::data(this.render()))));
                }
                let first = this.streams[0].sent;
                if this.crash_at == Some(first)
                    || this.stall_at == Some(first)
                    || this.streams.iter().any(|s| s.seen.closed)
                {
                    break;
                }
                // Nothing new: register for the next change of every unfinished choice (one
                // wake-up source per token; the loop closes the tickets when the engine stops).
                let mut changed = false;
                for (s, q) in this.streams.iter_mut().zip(&this.plan.seqs) {
                    if s.sent < q.output_tokens && s.ticket.poll_changed(cx, s.seen).is_ready() {
                        changed = true;
                    }
                }
                if !changed {
                    return Poll::Pending;
                }
            }
            if this.crash_at == Some(this.streams[0].sent) {
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
            if this.streams.iter().any(|s| s.seen.closed) {
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

fn stream_response(
    app: Arc<App>,
    plan: Plan,
    tickets: Vec<Ticket>,
    in_flight: InFlight,
) -> Response {
    let first = plan.seqs[0].output_tokens;
    let half = first / 2;
    let streams = tickets
        .into_iter()
        .map(|ticket| SeqStream {
            seen: ticket.progress(),
            ticket,
            sent: 0,
            text_bytes: 0,
            upto: 0,
        })
        .collect();
    let body = SseBody {
        fmt: ChunkFormat::new(
            plan.api,
            &plan.id,
            plan.created,
            &plan.model,
            plan.logprobs,
            plan.include_usage,
        ),
        stall_at: plan.faults.stall_ms.map(|_| half.max(1).min(first)),
        crash_at: plan.faults.crash.then_some(half),
        shutdown: app.shutdown.clone(),
        started: false,
        wait: None,
        done: false,
        streams,
        plan,
        _in_flight: in_flight,
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

/// vLLM's `/load`: the generation requests in flight, as its API server counts them (one per
/// HTTP request, whatever its `n`, until its answer has been sent).
async fn load(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({"server_load": app.in_flight.load(Ordering::Relaxed)}))
}

/// One generation request counted in `/load` while it lives.
struct InFlight(Arc<AtomicU64>);

impl InFlight {
    fn new(count: &Arc<AtomicU64>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A known model, or the first served one when the body names none.
fn served_model(app: &App, obj: &serde_json::Map<String, Value>) -> Result<(), ApiError> {
    match obj.get("model") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(m)) if m.is_empty() || app.args.models.contains(m) => Ok(()),
        Some(Value::String(m)) => Err(ApiError::unknown_model(m, &app.args.models)),
        Some(v) => Err(ApiError::invalid(
            "model",
            "string_type",
            "Input should be a valid string",
            Some(v),
        )),
    }
}

/// `/tokenize` with the shared prompt rule. The ids are placeholders (the rule has no vocabulary):
/// a deterministic id per token position and prompt, so only `count` carries meaning;
/// `/detokenize` reads every id back as a word.
async fn tokenize(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    RequestBody(body): RequestBody,
) -> Response {
    let answer = || -> Result<Value, ApiError> {
        json_content_type(&headers)?;
        let obj = read_object(&body)?;
        let chat = obj.contains_key("messages");
        if !chat {
            match obj.get("prompt") {
                Some(Value::String(_)) => {}
                None => {
                    return Err(ApiError::invalid(
                        "prompt",
                        "missing",
                        "Field required",
                        Some(&Value::Object(obj.clone())),
                    ))
                }
                Some(v) => {
                    return Err(ApiError::invalid(
                        "prompt",
                        "string_type",
                        "Input should be a valid string",
                        Some(v),
                    ))
                }
            }
        }
        served_model(&app, &obj)?;
        let strs = matches!(obj.get("return_token_strs"), Some(Value::Bool(true)));
        let api = if chat { Api::Chat } else { Api::Completions };
        // Only the prompt matters here; the parser must not refuse what only a generation checks.
        let mut only = serde_json::Map::new();
        for k in ["prompt", "messages"] {
            if let Some(v) = obj.get(k) {
                only.insert(k.into(), v.clone());
            }
        }
        let bytes = serde_json::to_vec(&only).expect("JSON serializes");
        let p = parse_request(api, &bytes, 0)?;
        let count = p.prompts[0].tokens;
        let tokens: Vec<u64> = (0..count as u64)
            .map(|i| mix64(p.request_hash.wrapping_add(i)) % VOCAB as u64)
            .collect();
        let token_strs = strs.then(|| tokens.iter().map(|&t| token_str(t)).collect::<Vec<_>>());
        Ok(json!({
            "count": count,
            "max_model_len": app.max_model_len,
            "tokens": tokens,
            "token_strs": token_strs,
        }))
    };
    match answer() {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `/detokenize`: `{"tokens": [ids]}` to `{"prompt": text}`, each id read as a word.
async fn detokenize_handler(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    RequestBody(body): RequestBody,
) -> Response {
    let answer = || -> Result<Value, ApiError> {
        json_content_type(&headers)?;
        let obj = read_object(&body)?;
        let ids = match obj.get("tokens") {
            None => {
                return Err(ApiError::invalid(
                    "tokens",
                    "missing",
                    "Field required",
                    Some(&Value::Object(obj.clone())),
                ))
            }
            Some(Value::Array(ids)) => ids,
            Some(v) => {
                return Err(ApiError::invalid(
                    "tokens",
                    "list_type",
                    "Input should be a valid list",
                    Some(v),
                ))
            }
        };
        let ids = ids
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_i64().ok_or_else(|| {
                    ApiError::invalid(
                        &format!("tokens.{i}"),
                        "int_type",
                        "Input should be a valid integer",
                        Some(v),
                    )
                })
            })
            .collect::<Result<Vec<i64>, ApiError>>()?;
        served_model(&app, &obj)?;
        Ok(json!({"prompt": detokenize(ids.into_iter())}))
    };
    match answer() {
        Ok(v) => Json(v).into_response(),
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

async fn set_config(State(app): State<Arc<App>>, RequestBody(body): RequestBody) -> Response {
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
