//! The observer: a response body wrapper that forwards every frame the moment it arrives and, on
//! the way, timestamps it, counts tokens, and keeps the endpoint's load and statistics current.
//!
//! It is where "measure what the user feels" happens: TTFT is the first chunk that carries a token,
//! ITL the gap between token-carrying chunks divided by the tokens they carry. The request's load
//! counters are released when this body ends or is dropped (client gone), never at header time.
//! When the client disconnects, dropping this body drops the upstream body, which closes the
//! upstream connection: vLLM aborts the request and frees its KV.

use crate::endpoints::{Clock, Endpoint, LoadGuard};
use crate::errors::ApiError;
use crate::state::AppState;
use crate::upstream::{Conn, PolledFrame};
use crate::usage::UsageScanner;
use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use http_body::{Body, Frame, SizeHint};
use qoe_core::qoe_metric::{QoeAccumulator, QoeParams};
use qoe_core::sse::{SseConfig, SseEvent, SseParser};
use qoe_core::{
    DecisionDetail, Feedback, FeedbackEvent, Load, Micros, Priority, RequestOutcome, Stage,
};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Sleep;

/// What the observer knows about the request it watches.
pub struct RequestContext {
    pub request_id: HeaderValue,
    pub model: String,
    pub priority: Priority,
    pub reason: &'static str,
    pub prompt_tokens: u32,
    pub status: StatusCode,
    pub started: Micros,
    pub sent: Micros,
    /// The response is an event stream.
    pub streaming: bool,
    /// The request's first token is seen: the client asked for a stream (an error answer to
    /// one is not an event stream), or it is a prefill stage (its answer is its first token).
    pub streamed: bool,
    pub sla_ttft_ms: Option<u32>,
    /// The chosen endpoint's load when it was picked, and what the policy predicted.
    pub load_at_dispatch: Load,
    pub detail: Option<DecisionDetail>,
    /// The request's stage of disaggregated serving (see [`crate::stages`]). A prefill stage's
    /// answer, one token not streamed, arrives at its first token and says nothing of the
    /// model's answer lengths; a decode stage's first token comes after no prefill, so it does
    /// not teach the policy the endpoint's prefill.
    pub stage: qoe_core::Stage,
}

enum Mode {
    Sse(Box<SseParser>),
    Json(Box<UsageScanner>),
}

/// How the response ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Complete,
    /// The client left after the stream's `[DONE]`, before the body's own end arrived (an
    /// OpenAI client closes at `[DONE]`): the answer was whole, the connection is not reusable.
    Answered,
    ClientGone,
    UpstreamBroken,
    IdleTimeout,
}

pub struct ObservedBody<B: Body> {
    inner: Pin<Box<B>>,
    /// The first frame, read by the proxy before it answered (see [`crate::proxy`]), with its
    /// arrival time; handed out first.
    pending: Option<(Frame<Bytes>, Micros)>,
    state: Arc<AppState>,
    endpoint: Arc<Endpoint>,
    /// The connection the body comes on, driven when the body waits for it, and returned to
    /// the endpoint's pool when the body was read to its end (otherwise dropped, which closes
    /// it: that is what aborts the request on the engine when the client leaves).
    conn: Option<Conn>,
    guard: Option<LoadGuard>,
    ctx: RequestContext,
    mode: Mode,
    idle: Duration,
    /// Fires no earlier than `idle` after the last frame. It is not moved on every frame (that is
    /// a timer-wheel update per chunk): when it fires early, it is set again from `last_frame`.
    idle_timer: Pin<Box<Sleep>>,
    /// When the last frame arrived.
    last_frame: Micros,
    /// Andes QoE of the stream as the user reads it, from the router's receipt of the request.
    qoe: QoeAccumulator,
    /// The TTFT deadline: the request's SLA, else the target.
    deadline: Micros,
    first_token_at: Option<Micros>,
    /// When the response's first body frame arrived.
    first_byte_at: Micros,
    last_token_at: Option<Micros>,
    tokens: u32,
    usage_tokens: Option<u32>,
    upstream_error: bool,
    /// The stream's `[DONE]` went by.
    saw_done: bool,
    ended: Option<End>,
    /// SSE bytes received but not forwarded: the start of an event not yet complete. Only whole
    /// events reach the client, so an error event the router adds never lands inside one.
    held: Vec<u8>,
}

/// What a run of SSE events says: tokens, the latest usage count, whether one was an error.
#[derive(Default)]
struct Tally {
    tokens: u32,
    usage: Option<u64>,
    error: bool,
    done: bool,
}

impl Tally {
    fn see(&mut self, event: SseEvent) {
        match event {
            SseEvent::Tokens { count, usage } => {
                self.tokens = self.tokens.saturating_add(count);
                self.usage = usage.and_then(|u| u.completion_tokens).or(self.usage);
            }
            SseEvent::Usage(u) => self.usage = u.completion_tokens.or(self.usage),
            SseEvent::Error => self.error = true,
            SseEvent::Done => self.done = true,
            _ => {}
        }
    }
}

impl<B: Body> ObservedBody<B> {
    /// Watches `inner`, whose first frame `first` (with its arrival time) was already read.
    pub fn new(
        inner: B,
        first: Option<(Frame<Bytes>, Micros)>,
        state: Arc<AppState>,
        guard: LoadGuard,
        ctx: RequestContext,
    ) -> Self {
        let idle = state.idle_timeout;
        let endpoint = guard.endpoint().clone();
        let deadline_ms = ctx
            .sla_ttft_ms
            .map_or(state.config.target_ttft, |ms| ms as f64);
        let qoe = QoeAccumulator::new(QoeParams {
            ttft_s: deadline_ms / 1e3,
            tokens_per_s: state.config.optimal_throughput,
        });
        let mode = if ctx.streaming {
            Mode::Sse(Box::new(SseParser::new(SseConfig::default())))
        } else {
            Mode::Json(Box::default())
        };
        let last_frame = first
            .as_ref()
            .map_or_else(|| state.clock.now(), |(_, at)| *at);
        ObservedBody {
            inner: Box::pin(inner),
            pending: first,
            idle_timer: Box::pin(tokio::time::sleep(idle)),
            last_frame,
            idle,
            endpoint,
            conn: None,
            qoe,
            deadline: (deadline_ms * 1e3) as Micros,
            state,
            guard: Some(guard),
            ctx,
            mode,
            first_token_at: None,
            first_byte_at: last_frame,
            last_token_at: None,
            tokens: 0,
            usage_tokens: None,
            upstream_error: false,
            saw_done: false,
            ended: None,
            held: Vec::new(),
        }
    }

    /// Returns `conn` to the endpoint's pool once the body is read to its end.
    pub fn returning(mut self, conn: Conn) -> Self {
        self.conn = Some(conn);
        self
    }

    fn clock(&self) -> Clock {
        self.state.clock
    }

    fn on_data(&mut self, data: &Bytes, now: Micros) {
        match &mut self.mode {
            Mode::Sse(parser) => {
                let mut tally = Tally::default();
                parser.feed(data, |event| tally.see(event));
                self.apply(tally, now);
            }
            Mode::Json(usage) => usage.feed(data),
        }
    }

    /// The stream ended: a last event without its blank line still counts (its usage too).
    fn on_stream_end(&mut self, now: Micros) {
        if let Mode::Sse(parser) = &mut self.mode {
            let mut tally = Tally::default();
            parser.finish(|event| tally.see(event));
            self.apply(tally, now);
        }
    }

    fn apply(&mut self, tally: Tally, now: Micros) {
        if tally.error {
            self.upstream_error = true;
        }
        self.saw_done |= tally.done;
        if let Some(u) = tally.usage {
            self.usage_tokens = Some(u.min(u32::MAX as u64) as u32);
        }
        if tally.tokens > 0 {
            self.on_tokens(tally.tokens, now);
        }
    }

    /// What of `data` (just fed to the parser) goes to the client now: all but the unfinished
    /// event at its end, which is held until it completes (with what was held before).
    fn relay(&mut self, data: Bytes) -> Option<Bytes> {
        let Mode::Sse(parser) = &self.mode else {
            return Some(data);
        };
        // An event over the parser's size limit is not held (memory stays bounded).
        let keep = parser.unfinished_len().unwrap_or(0);
        if self.held.is_empty() {
            if keep == 0 {
                return Some(data);
            }
            let cut = data.len().saturating_sub(keep);
            self.held.extend_from_slice(&data[cut..]);
            return (cut > 0).then(|| data.slice(..cut));
        }
        self.held.extend_from_slice(&data);
        let cut = self.held.len().saturating_sub(keep);
        if cut == 0 {
            return None;
        }
        let rest = self.held.split_off(cut);
        Some(Bytes::from(std::mem::replace(&mut self.held, rest)))
    }

    /// What is still held, once the stream is over: an unterminated last event goes out as is.
    fn take_held(&mut self) -> Option<Frame<Bytes>> {
        (!self.held.is_empty()).then(|| Frame::data(Bytes::from(std::mem::take(&mut self.held))))
    }

    /// The endpoint's side of a first token: its TTFT in the endpoint's statistics and
    /// histogram, and in the policy's feedback unless a decode stage's (no prefill before it).
    fn record_endpoint_ttft(&self, ttft: Micros, now: Micros) {
        let endpoint = &self.endpoint;
        endpoint.with_stats(|s| s.record_ttft(self.ctx.prompt_tokens, ttft));
        endpoint
            .metrics()
            .ttft(&self.state.metrics)
            .observe(ttft as f64 / 1e6);
        if self.ctx.stage != Stage::Decode {
            let feedback = self.feedback(endpoint.key, FeedbackEvent::FirstToken { ttft });
            self.state.policy.feedback(&feedback, now);
        }
    }

    fn on_tokens(&mut self, tokens: u32, now: Micros) {
        let Some(guard) = self.guard.as_mut() else {
            return;
        };
        let endpoint = &self.endpoint;
        let metrics = &self.state.metrics;
        let level = self.ctx.priority.level();
        match self.last_token_at {
            None => {
                self.first_token_at = Some(now);
                let felt = now.saturating_sub(self.ctx.started);
                metrics.priority_ttft(level).observe(felt as f64 / 1e6);
                metrics.sla(level, felt <= self.deadline).inc();
                self.qoe.push_n_micros(felt, tokens as u64);
                guard.first_token();
                guard.tokens(tokens);
                self.record_endpoint_ttft(now.saturating_sub(self.ctx.sent), now);
                self.last_token_at = Some(now);
                self.tokens = self.tokens.saturating_add(tokens);
                return;
            }
            Some(last) => {
                let gap = now.saturating_sub(last);
                endpoint.with_stats(|s| s.record_itl(gap, tokens));
                let per_token = gap as f64 / 1e6 / tokens as f64;
                let (itl, priority_itl) =
                    (endpoint.metrics().itl(metrics), metrics.priority_itl(level));
                for _ in 0..tokens.min(64) {
                    itl.observe(per_token);
                    priority_itl.observe(per_token);
                }
                self.qoe
                    .push_n_micros(now.saturating_sub(self.ctx.started), tokens as u64);
            }
        }
        guard.tokens(tokens);
        self.last_token_at = Some(now);
        self.tokens = self.tokens.saturating_add(tokens);
    }

    fn feedback(&self, endpoint_key: u64, event: FeedbackEvent) -> Feedback {
        Feedback {
            endpoint_key,
            priority: self.ctx.priority,
            prompt_tokens: self.ctx.prompt_tokens,
            sla_ttft_ms: self.ctx.sla_ttft_ms,
            streamed: self.ctx.streamed,
            load_at_dispatch: self.ctx.load_at_dispatch,
            detail: self.ctx.detail,
            event,
        }
    }

    /// Records the outcome once, whatever way the body ends.
    fn finish(&mut self, end: End) {
        if self.ended.is_some() {
            return;
        }
        self.ended = Some(end);
        if end == End::Complete {
            self.on_stream_end(self.clock().now());
        }
        if let Some(conn) = self.conn.take() {
            if end == End::Complete {
                self.endpoint.pool.put(conn);
            }
        }
        let Some(mut guard) = self.guard.take() else {
            return;
        };
        let now = self.clock().now();
        let endpoint = self.endpoint.clone();
        if let Mode::Json(usage) = &self.mode {
            self.usage_tokens = usage.output_tokens();
        }
        let output_tokens = self.usage_tokens.unwrap_or(self.tokens);
        let status = self.ctx.status;
        // A 429 is the engine asking to be left alone: a failure for its breaker and its
        // statistics, whether it was retried elsewhere first (`proxy`) or passed through here.
        let failed = matches!(end, End::UpstreamBroken | End::IdleTimeout)
            || status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || self.upstream_error;
        let e2e = now.saturating_sub(self.ctx.started);
        // A client that leaves says nothing about the endpoint: no outcome recorded for it.
        if end != End::ClientGone {
            if self.first_token_at.is_none()
                && self.ctx.stage == Stage::Prefill
                && !failed
                && status.is_success()
            {
                // A prefill stage's answer is its first token: its TTFT is recorded and fed
                // back here (the policy learns the endpoint's prefill from it).
                self.first_token_at = Some(self.first_byte_at);
                self.record_endpoint_ttft(self.first_byte_at.saturating_sub(self.ctx.sent), now);
            }
            let ttft = self.first_token_at.map(|t| t.saturating_sub(self.ctx.sent));
            let decode_time = match (self.first_token_at, self.last_token_at) {
                (Some(a), Some(b)) => b.saturating_sub(a),
                _ => 0,
            };
            guard.record(
                &RequestOutcome {
                    prompt_tokens: self.ctx.prompt_tokens,
                    output_tokens,
                    ttft,
                    decode_time,
                    e2e,
                    failed,
                    timed_out: end == End::IdleTimeout,
                },
                now,
            );
            let mean_itl_ms = (self.tokens > 1 && decode_time > 0)
                .then(|| decode_time as f64 / 1e3 / (self.tokens - 1) as f64);
            let feedback = self.feedback(
                endpoint.key,
                FeedbackEvent::Finished {
                    ttft,
                    output_tokens,
                    mean_itl_ms,
                    failed,
                },
            );
            self.state.policy.feedback(&feedback, now);
            if self.ctx.stage != Stage::Prefill
                && !failed
                && status.is_success()
                && output_tokens > 0
            {
                self.state
                    .learned_output
                    .record(&self.ctx.model, output_tokens);
            }
        }
        drop(guard);
        let metrics = &self.state.metrics;
        if self.tokens > 0 {
            metrics
                .priority_qoe(self.ctx.priority.level())
                .observe(self.qoe.finish());
        }
        let handles = endpoint.metrics();
        handles.e2e(metrics).observe(e2e as f64 / 1e6);
        handles.output_tokens(metrics).inc_by(output_tokens as u64);
        let code = match end {
            End::Complete | End::Answered | End::ClientGone => status.as_u16(),
            End::IdleTimeout => 504,
            End::UpstreamBroken => 502,
        };
        handles.requests(metrics, code, self.ctx.reason).inc();
        let failure_kind = match end {
            End::IdleTimeout => Some("timeout"),
            End::UpstreamBroken => Some("stream"),
            _ if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS => {
                Some("status")
            }
            _ => None,
        };
        if let Some(kind) = failure_kind {
            self.state.metrics.count_failure(&endpoint.url, kind);
        }
        let closed_here = || {
            self.state
                .closing_connections
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let outcome = match end {
            End::Complete | End::Answered => "complete",
            End::ClientGone if closed_here() => "closed_at_shutdown",
            End::ClientGone => "client_closed",
            End::UpstreamBroken => "upstream_broken",
            End::IdleTimeout => "idle_timeout",
        };
        tracing::info!(
            request_id = %String::from_utf8_lossy(self.ctx.request_id.as_bytes()),
            model = %self.ctx.model,
            endpoint = %endpoint.url,
            reason = self.ctx.reason,
            priority = self.ctx.priority.level(),
            status = code,
            outcome,
            ttft_ms = self.first_token_at.map(|t| t.saturating_sub(self.ctx.sent) as f64 / 1e3),
            prompt_tokens = self.ctx.prompt_tokens,
            tokens = output_tokens,
            duration_ms = e2e as f64 / 1e3,
            "request"
        );
    }

    /// The next frame of the upstream body, its connection driven as needed (see [`Conn`]).
    fn poll_inner(&mut self, cx: &mut Context<'_>) -> PolledFrame<B> {
        match self.conn.as_mut() {
            Some(conn) => conn.poll_frame(self.inner.as_mut(), cx),
            None => self.inner.as_mut().poll_frame(cx),
        }
    }

    /// Whether nothing came for the idle timeout since the last frame; otherwise the timer is
    /// armed (and will wake `cx`) for when that would be.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.idle_timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            let idle = self.idle.as_micros().min(Micros::MAX as u128) as Micros;
            let due = self.last_frame.saturating_add(idle);
            let clock = self.clock();
            if clock.now() >= due {
                return true;
            }
            // Frames came since the timer was set: wait from the last one.
            let at = tokio::time::Instant::from_std(clock.instant(due));
            self.idle_timer.as_mut().reset(at);
        }
    }

    /// Ends a response the endpoint broke off or let go silent: an SSE client gets an error event
    /// (after the last whole event; the unfinished one is dropped); a JSON body is cut, which the
    /// client's parser reports.
    fn broken(
        &mut self,
        message: String,
        status: StatusCode,
        end: End,
    ) -> Result<Frame<Bytes>, std::io::Error> {
        self.held.clear();
        self.finish(end);
        match self.mode {
            Mode::Sse(_) => Ok(Frame::data(ApiError::new(status, &message).sse_event())),
            Mode::Json(_) => Err(std::io::Error::other(message)),
        }
    }
}

impl<B> Body for ObservedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.ended.is_some() {
            // What is left after the end: held bytes, then a parked trailers frame.
            let last = this
                .take_held()
                .or_else(|| this.pending.take().map(|(f, _)| f));
            return Poll::Ready(last.map(Ok));
        }
        loop {
            let (frame, at) = match this.pending.take() {
                Some(first) => first,
                None => match this.poll_inner(cx) {
                    Poll::Ready(Some(Ok(frame))) => (frame, this.clock().now()),
                    Poll::Ready(Some(Err(e))) => {
                        let message = format!("the endpoint broke the response off: {e}");
                        tracing::warn!(
                            request_id = %String::from_utf8_lossy(this.ctx.request_id.as_bytes()),
                            "{message}"
                        );
                        return Poll::Ready(Some(this.broken(
                            message,
                            StatusCode::BAD_GATEWAY,
                            End::UpstreamBroken,
                        )));
                    }
                    Poll::Ready(None) => {
                        this.finish(End::Complete);
                        return Poll::Ready(this.take_held().map(Ok));
                    }
                    Poll::Pending => {
                        if this.idle_expired(cx) {
                            let message = format!(
                                "the endpoint sent nothing for {} ms (idle timeout)",
                                this.idle.as_millis()
                            );
                            return Poll::Ready(Some(this.broken(
                                message,
                                StatusCode::GATEWAY_TIMEOUT,
                                End::IdleTimeout,
                            )));
                        }
                        return Poll::Pending;
                    }
                },
            };
            this.last_frame = at;
            let out = match frame.into_data() {
                Ok(data) => {
                    this.on_data(&data, at);
                    this.relay(data).map(Frame::data)
                }
                // Trailers end the body: what is held goes first, the trailers after it.
                Err(trailers) if !this.held.is_empty() => {
                    this.pending = Some((trailers, at));
                    this.take_held()
                }
                Err(other) => Some(other),
            };
            if this.inner.is_end_stream() {
                // The server may stop polling once we report the end: record it now.
                this.finish(End::Complete);
            }
            match out {
                Some(frame) => return Poll::Ready(Some(Ok(frame))),
                None if this.ended.is_some() => return Poll::Ready(this.take_held().map(Ok)),
                // All of it held (an event still coming): read on.
                None => continue,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_empty()
            && self.pending.is_none()
            && (self.ended.is_some() || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match self.mode {
            // The error event we may add makes the upstream length a lower bound only.
            Mode::Sse(_) => SizeHint::default(),
            Mode::Json(_) => {
                let pending = self
                    .pending
                    .as_ref()
                    .and_then(|(f, _)| f.data_ref())
                    .map_or(0, |d| d.len() as u64);
                let inner = self.inner.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + pending);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + pending);
                }
                hint
            }
        }
    }
}

impl<B: Body> Drop for ObservedBody<B> {
    fn drop(&mut self) {
        if self.ended.is_none() {
            let end = if self.pending.is_none() && self.inner.is_end_stream() {
                End::Complete
            } else if self.saw_done && self.pending.is_none() {
                End::Answered
            } else {
                End::ClientGone
            };
            self.finish(end);
        }
    }
}

use std::future::Future;
