//! vLLM's OpenAI-compatible surface: reading requests as vLLM 0.32 reads them, its error shapes,
//! and the exact response and SSE chunk formats.
//!
//! A client should not be able to tell this engine from vLLM by anything but the text, so requests
//! are read the way vLLM's pydantic models read them: lax types (`"5"`, `5.0` and `true` are
//! integers, `"yes"` and `1` are booleans), its defaults (`max_tokens` 16 for completions, what fits
//! for chats; `model` the first served name), and its checks with their messages. Errors of the
//! request's shape are FastAPI's (`type` `"Bad Request"`, `param` the field's location such as
//! `body.max_tokens`); vLLM's own checks answer `BadRequestError` with the field in `param` and a
//! `(parameter=…, value=…)` suffix. Both are `{"error":{"message","type","param","code"}}`.
//!
//! The prompt rule is `qoe_core::analyze`'s, the one the router uses, so both count the same tokens
//! and hash the same prefix blocks: a completion's `prompt` is its text (token ids count one token
//! each); a chat's prompt is its messages joined as `role: content\n` (content parts' `text`
//! concatenated), then one token per 4 bytes of UTF-8, rounded up (`qoe_core::prompt`). A list of
//! prompts is a batch, one choice each, as in vLLM.
//!
//! Output text is made of short deterministic words, one word (with its leading space) per token
//! and one token per SSE chunk, so a client can count tokens by counting chunks. Log-probabilities,
//! when asked for, are deterministic too: the sampled word is always the most likely one.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use qoe_core::analyze::{analyze, AnalyzerConfig, Route};
use qoe_core::prompt::hash_bytes;
use qoe_core::ApiKind;
use qoe_sim::rng::{mix64, SplitMix64};
use serde_json::{json, Map, Value};
use std::fmt::Write as _;

/// Which API a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Api {
    Completions,
    Chat,
}

/// vLLM's `system_fingerprint`.
pub(crate) const FINGERPRINT: &str = concat!("qoe-sim-", env!("CARGO_PKG_VERSION"));

/// Most choices one request may ask for (vLLM's default `VLLM_MAX_N_SEQUENCES`).
pub(crate) const MAX_N: i64 = 16_384;

/// Most log-probabilities per token (vLLM's default `max_logprobs`).
const MAX_LOGPROBS: i64 = 20;

/// Default `max_tokens` of a completion (OpenAI's, kept by vLLM); a chat's is what fits.
pub(crate) const COMPLETION_DEFAULT_MAX_TOKENS: u64 = 16;

/// An error in OpenAI's shape: `{"error":{"message","type","param","code"}}` (vLLM puts the status
/// in `code`).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    /// A request that does not fit the schema (FastAPI's validation error, `type` "Bad Request").
    pub validation: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            validation: false,
        }
    }

    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            param: param.map(str::to_string),
            ..Self::new(StatusCode::BAD_REQUEST, message)
        }
    }

    /// One of vLLM's own checks, with its `(parameter=…, value=…)` suffix.
    pub fn check(message: impl std::fmt::Display, param: &str, value: Option<&str>) -> Self {
        let message = match value {
            Some(v) => format!("{message} (parameter={param}, value={v})"),
            None => format!("{message} (parameter={param})"),
        };
        Self::bad_request(message, Some(param))
    }

    /// A validation error at `loc` (a body field path; empty for the body itself), worded as
    /// pydantic words it.
    pub fn invalid(loc: &str, kind: &str, msg: &str, input: Option<&Value>) -> Self {
        let loc = if loc.is_empty() {
            "body".to_string()
        } else {
            format!("body.{loc}")
        };
        let input = input.map_or_else(|| "None".to_string(), py_repr);
        Self::schema(
            format!("{{'type': '{kind}', 'loc': '{loc}', 'msg': '{msg}', 'input': '{input}'}}"),
            Some(loc),
        )
    }

    fn schema(detail: String, param: Option<String>) -> Self {
        Self {
            param,
            validation: true,
            ..Self::new(
                StatusCode::BAD_REQUEST,
                format!("1 validation error:\n  {detail}"),
            )
        }
    }

    /// A body that is not JSON, at the byte `offset` where parsing failed.
    fn json_invalid(offset: usize, error: &str) -> Self {
        let loc = format!("body.{offset}");
        let error = error.replace('\'', "\\'");
        Self::schema(
            format!("{{'type': 'json_invalid', 'loc': '{loc}', 'msg': 'JSON decode error', 'input': '<dict of 0 items>', 'ctx': {{'error': '{error}'}}}}"),
            Some(loc),
        )
    }

    /// vLLM reads JSON bodies only.
    pub fn unsupported_media_type() -> Self {
        Self::schema(
            "Unsupported Media Type: Only 'application/json' is allowed".into(),
            None,
        )
    }

    /// The 404 of a model this engine does not serve.
    pub fn unknown_model(model: &str, served: &[String]) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "The model `{model}` does not exist. Valid aliases: {}.",
                served.join(", ")
            ),
            param: Some("model".into()),
            validation: false,
        }
    }

    /// vLLM's `type` for a status.
    fn kind(&self) -> &'static str {
        if self.validation {
            return "Bad Request";
        }
        match self.status.as_u16() {
            400 => "BadRequestError",
            401 => "AuthenticationError",
            404 => "NotFoundError",
            413 => "RequestEntityTooLarge",
            429 => "RateLimitError",
            503 => "ServiceUnavailableError",
            s if s >= 500 => "InternalServerError",
            _ => "BadRequestError",
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.status.as_u16(),
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// An input as pydantic's error messages show it.
fn py_repr(v: &Value) -> String {
    let s = match v {
        Value::Null => "None".to_string(),
        Value::Bool(true) => "True".to_string(),
        Value::Bool(false) => "False".to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) if s.chars().count() > 100 => {
            format!("{}...", s.chars().take(100).collect::<String>())
        }
        Value::String(s) => s.clone(),
        Value::Array(a) => format!("<list of {} items>", a.len()),
        Value::Object(o) => format!("<dict of {} items>", o.len()),
    };
    s.replace('\'', "\\'")
}

/// A float as Python prints it (`-1.0`, `0.5`).
fn py_float(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e16 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

/// Reads a JSON object body, or the validation error vLLM answers.
pub(crate) fn read_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid("", "missing", "Field required", None));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(other) => Err(ApiError::invalid(
            "",
            "model_attributes_type",
            "Input should be a valid dictionary or object to extract fields from",
            Some(&other),
        )),
        Err(e) => {
            let offset = byte_offset(body, e.line(), e.column());
            let text = e.to_string();
            let text = text.split(" at line ").next().unwrap_or(&text);
            Err(ApiError::json_invalid(offset, text))
        }
    }
}

/// The byte offset of a 1-based (line, column) position.
fn byte_offset(body: &[u8], line: usize, column: usize) -> usize {
    let start: usize = body
        .split(|&b| b == b'\n')
        .take(line.saturating_sub(1))
        .map(|l| l.len() + 1)
        .sum();
    (start + column.saturating_sub(1)).min(body.len())
}

type Obj = Map<String, Value>;

/// A field under pydantic's lax rules: `None` when absent or null.
fn lax<T>(
    obj: &Obj,
    field: &str,
    loc: &str,
    read: fn(&Value) -> Result<T, (&'static str, &'static str)>,
) -> Result<Option<T>, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => read(v)
            .map(Some)
            .map_err(|(kind, msg)| ApiError::invalid(loc, kind, msg, Some(v))),
    }
}

/// An integer as vLLM reads it ([`qoe_core::lax::int`]), with pydantic's error kind and message.
fn int_of(v: &Value) -> Result<i64, (&'static str, &'static str)> {
    use qoe_core::lax::IntError;
    match qoe_core::lax::int(v) {
        Ok(i) => Ok(i.clamp(i64::MIN as i128, i64::MAX as i128) as i64),
        Err(IntError::Fraction) => Err((
            "int_from_float",
            "Input should be a valid integer, got a number with a fractional part",
        )),
        Err(IntError::Parsing) => Err((
            "int_parsing",
            "Input should be a valid integer, unable to parse string as an integer",
        )),
        Err(IntError::Type) => Err(("int_type", "Input should be a valid integer")),
    }
}

/// A boolean as vLLM reads it ([`qoe_core::lax::bool`]), with pydantic's error kind and message.
fn bool_of(v: &Value) -> Result<bool, (&'static str, &'static str)> {
    use qoe_core::lax::BoolError;
    qoe_core::lax::bool(v).map_err(|e| match e {
        BoolError::Parsing => (
            "bool_parsing",
            "Input should be a valid boolean, unable to interpret input",
        ),
        BoolError::Type => ("bool_type", "Input should be a valid boolean"),
    })
}

fn float_of(v: &Value) -> Result<f64, (&'static str, &'static str)> {
    match v {
        Value::Number(n) => Ok(n.as_f64().unwrap_or(f64::NAN)),
        Value::Bool(b) => Ok(*b as u8 as f64),
        Value::String(s) => s.trim().parse().map_err(|_| {
            (
                "float_parsing",
                "Input should be a valid number, unable to parse string as a number",
            )
        }),
        _ => Err(("float_type", "Input should be a valid number")),
    }
}

fn object_of(v: &Value) -> Result<&Obj, (&'static str, &'static str)> {
    v.as_object().ok_or((
        "model_attributes_type",
        "Input should be a valid dictionary or object to extract fields from",
    ))
}

const NOT_A_STRING: (&str, &str) = ("string_type", "Input should be a valid string");

/// The disaggregated-serving stage a request asks for (`kv_transfer_params`).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum KvStage {
    /// Ordinary request.
    None,
    /// `do_remote_decode: true`: compute the prompt here, hand the KV to a decode engine.
    Prefill,
    /// `do_remote_prefill: true`: the KV comes from `remote_engine_id`; skip the prefill.
    Decode { remote_blocks: usize },
}

/// One prompt of a request (a chat has one, a completion one per batch element).
#[derive(Clone, Debug)]
pub(crate) struct Prompt {
    pub tokens: u32,
    pub prefix_hashes: Vec<u64>,
    /// The prompt's text, for `echo`.
    pub echo: Option<String>,
}

/// `logprobs` as asked: how many alternatives per token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Logprobs {
    pub top: u32,
}

/// A validated completion or chat request.
#[derive(Clone, Debug)]
pub(crate) struct ParsedRequest {
    /// The `model` named, if any (vLLM then serves its first name).
    pub model: Option<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// `stream_options.continuous_usage_stats`: usage in every chunk.
    pub continuous_usage: bool,
    pub prompts: Vec<Prompt>,
    /// `max_tokens` (a chat's `max_completion_tokens` first), at least 1.
    pub max_tokens: Option<u64>,
    pub n: u32,
    pub ignore_eos: bool,
    pub priority: i32,
    /// The body's `seed`, if any.
    pub seed: Option<u64>,
    /// The request's own random stream: a hash of its prompts when the sampling is reproducible
    /// (a `seed`, or `temperature` 0: vLLM then writes the same text whatever `max_tokens` or
    /// `stop` say, cut where they say), else of the whole body.
    pub request_hash: u64,
    pub kv: KvStage,
    pub logprobs: Option<Logprobs>,
    pub stop: Vec<String>,
    pub include_stop: bool,
}

/// Reads and checks a body the way vLLM 0.32 does. `max_prefix_blocks` bounds the hashing work.
pub(crate) fn parse_request(
    api: Api,
    body: &[u8],
    max_prefix_blocks: usize,
) -> Result<ParsedRequest, ApiError> {
    let chat = api == Api::Chat;
    let mut obj = read_object(body)?;
    // Fields the shared analyzer reads are put in canonical form when a lax one was sent.
    let mut canonical = true;
    let model = match obj.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) if m.is_empty() => None,
        Some(Value::String(m)) => Some(m.clone()),
        Some(v) => {
            let (kind, msg) = NOT_A_STRING;
            return Err(ApiError::invalid("model", kind, msg, Some(v)));
        }
    };
    if chat {
        match obj.get("messages") {
            None => {
                return Err(ApiError::invalid(
                    "messages",
                    "missing",
                    "Field required",
                    Some(&Value::Object(obj.clone())),
                ))
            }
            Some(Value::Array(_)) => {}
            Some(v) => {
                return Err(ApiError::invalid(
                    "messages",
                    "list_type",
                    "Input should be a valid list",
                    Some(v),
                ))
            }
        }
    }
    canonical &= obj.get("model").is_none_or(|m| m.as_str() != Some(""));
    let stream = lax(&obj, "stream", "stream", bool_of)?;
    canonical &= matches!(obj.get("stream"), None | Some(Value::Null | Value::Bool(_)));
    let (include_usage, continuous_usage, has_stream_options) = match obj.get("stream_options") {
        None | Some(Value::Null) => (false, false, false),
        Some(v) => {
            let o = object_of(v)
                .map_err(|(k, m)| ApiError::invalid("stream_options", k, m, Some(v)))?;
            (
                lax(o, "include_usage", "stream_options.include_usage", bool_of)?.unwrap_or(false),
                lax(
                    o,
                    "continuous_usage_stats",
                    "stream_options.continuous_usage_stats",
                    bool_of,
                )?
                .unwrap_or(false),
                true,
            )
        }
    };
    let max_tokens = lax(&obj, "max_tokens", "max_tokens", int_of)?;
    let max_completion = if chat {
        lax(
            &obj,
            "max_completion_tokens",
            "max_completion_tokens",
            int_of,
        )?
    } else {
        None
    };
    for f in ["max_tokens", "max_completion_tokens"] {
        canonical &= obj.get(f).is_none_or(|v| v.is_null() || v.is_u64());
    }
    let n = lax(&obj, "n", "n", int_of)?.unwrap_or(1);
    let ignore_eos = lax(&obj, "ignore_eos", "ignore_eos", bool_of)?.unwrap_or(false);
    let priority = match lax(&obj, "priority", "priority", int_of)? {
        None => 0,
        Some(p) => i32::try_from(p).map_err(|_| {
            ApiError::invalid(
                "priority",
                "int_parsing_size",
                "Input should be a valid integer, unable to parse input as an integer",
                obj.get("priority"),
            )
        })?,
    };
    let seed = lax(&obj, "seed", "seed", int_of)?.map(|s| s as u64);
    let echo = !chat && lax(&obj, "echo", "echo", bool_of)?.unwrap_or(false);
    let include_stop = lax(
        &obj,
        "include_stop_str_in_output",
        "include_stop_str_in_output",
        bool_of,
    )?
    .unwrap_or(false);
    let temperature = lax(&obj, "temperature", "temperature", float_of)?;
    let top_p = lax(&obj, "top_p", "top_p", float_of)?;
    let presence_penalty = lax(&obj, "presence_penalty", "presence_penalty", float_of)?;
    let frequency_penalty = lax(&obj, "frequency_penalty", "frequency_penalty", float_of)?;
    let repetition_penalty = lax(&obj, "repetition_penalty", "repetition_penalty", float_of)?;
    let top_k = lax(&obj, "top_k", "top_k", int_of)?;
    let min_p = lax(&obj, "min_p", "min_p", float_of)?;
    let min_tokens = lax(&obj, "min_tokens", "min_tokens", int_of)?;
    let stop = stop_strings(obj.get("stop"))?;
    let logprobs = if chat {
        let on = lax(&obj, "logprobs", "logprobs", bool_of)?.unwrap_or(false);
        let top = lax(&obj, "top_logprobs", "top_logprobs", int_of)?;
        match top {
            Some(t) if t < -1 => {
                return Err(ApiError::check(
                    "`top_logprobs` must be a positive value or -1.",
                    "top_logprobs",
                    Some(&t.to_string()),
                ))
            }
            Some(t) if t != 0 && !on => {
                return Err(ApiError::check(
                    "when using `top_logprobs`, `logprobs` must be set to true.",
                    "top_logprobs",
                    None,
                ))
            }
            _ => {}
        }
        on.then_some(top.unwrap_or(0))
    } else {
        lax(&obj, "logprobs", "logprobs", int_of)?
    };
    let kv = match obj.get("kv_transfer_params") {
        None | Some(Value::Null) => KvStage::None,
        Some(v) => kv_stage(
            object_of(v)
                .map_err(|(k, m)| ApiError::invalid("kv_transfer_params", k, m, Some(v)))?,
        )?,
    };

    // vLLM's own checks, in its order.
    if has_stream_options && stream != Some(true) {
        return Err(ApiError::check(
            "Stream options can only be defined when `stream=True`.",
            "stream_options",
            None,
        ));
    }
    if n < 1 {
        return Err(ApiError::bad_request(
            format!("n must be at least 1, got {n}."),
            None,
        ));
    }
    if n > MAX_N {
        return Err(ApiError::bad_request(
            format!("n must be at most {MAX_N}, got {n}. To increase this limit, set the VLLM_MAX_N_SEQUENCES environment variable."),
            None,
        ));
    }
    for (name, penalty) in [
        ("presence_penalty", presence_penalty),
        ("frequency_penalty", frequency_penalty),
    ] {
        if let Some(v) = penalty.filter(|v| !(-2.0..=2.0).contains(v)) {
            return Err(ApiError::bad_request(
                format!("{name} must be in [-2, 2], got {}.", py_float(v)),
                None,
            ));
        }
    }
    if let Some(v) = repetition_penalty.filter(|v| *v <= 0.0) {
        return Err(ApiError::bad_request(
            format!(
                "repetition_penalty must be greater than zero, got {}.",
                py_float(v)
            ),
            None,
        ));
    }
    if let Some(t) = temperature.filter(|t| *t < 0.0) {
        return Err(ApiError::check(
            format!("temperature must be non-negative, got {}.", py_float(t)),
            "temperature",
            Some(&py_float(t)),
        ));
    }
    if let Some(p) = top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
        return Err(ApiError::check(
            format!("top_p must be in (0, 1], got {}.", py_float(p)),
            "top_p",
            Some(&py_float(p)),
        ));
    }
    if let Some(k) = top_k.filter(|k| *k < -1) {
        return Err(ApiError::bad_request(
            format!("top_k must be 0 (disable), or at least 1, got {k}."),
            None,
        ));
    }
    if let Some(p) = min_p.filter(|p| !(0.0..=1.0).contains(p)) {
        return Err(ApiError::bad_request(
            format!("min_p must be in [0, 1], got {}.", py_float(p)),
            None,
        ));
    }
    let max_tokens = match max_completion.or(max_tokens) {
        Some(m) if m < 1 => {
            return Err(ApiError::check(
                format!("max_tokens must be at least 1, got {m}."),
                "max_tokens",
                Some(&m.to_string()),
            ))
        }
        m => m.map(|m| m as u64),
    };
    match (min_tokens, max_tokens) {
        (Some(min), _) if min < 0 => {
            return Err(ApiError::bad_request(
                format!("min_tokens must be greater than or equal to 0, got {min}."),
                None,
            ))
        }
        (Some(min), Some(max)) if min as u64 > max => {
            return Err(ApiError::bad_request(
                format!("min_tokens must be less than or equal to max_tokens={max}, got {min}."),
                None,
            ))
        }
        _ => {}
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::bad_request(
            "stop cannot contain an empty string.",
            None,
        ));
    }
    let logprobs = match logprobs {
        None => None,
        Some(k) if !(0..=MAX_LOGPROBS).contains(&k) => {
            // -1 asks for the whole vocabulary.
            let k = if k < 0 { 128_000 } else { k };
            return Err(ApiError::check(
                format!("Requested sample logprobs of {k}, which is greater than max allowed: {MAX_LOGPROBS}"),
                "logprobs",
                Some(&k.to_string()),
            ));
        }
        Some(k) => Some(Logprobs { top: k as u32 }),
    };

    let config = AnalyzerConfig {
        max_prefix_blocks,
        ..AnalyzerConfig::default()
    };
    let prompts = if chat {
        check_tools(&obj)?;
        if obj["messages"].as_array().is_some_and(Vec::is_empty) {
            return Err(ApiError::bad_request(
                "Cannot apply chat template to an empty conversation. Provide at least one message.",
                None,
            ));
        }
        let p = if canonical {
            analyze_prompt(ApiKind::Chat, body, &config)?
        } else {
            canonicalize(&mut obj, stream, max_tokens);
            let bytes = serde_json::to_vec(&obj).expect("JSON serializes");
            analyze_prompt(ApiKind::Chat, &bytes, &config)?
        };
        vec![Prompt {
            tokens: p.0,
            prefix_hashes: p.1,
            echo: None,
        }]
    } else {
        completion_prompts(&mut obj, body, canonical, stream, max_tokens, echo, &config)?
    };
    let request_hash = if seed.is_some() || temperature == Some(0.0) {
        // The prompt as sent (the messages, or the prompt field), whole.
        let prompt = obj.get(if chat { "messages" } else { "prompt" });
        hash_bytes(1, &serde_json::to_vec(&prompt).expect("JSON serializes"))
    } else {
        hash_bytes(0, body)
    };
    Ok(ParsedRequest {
        model,
        stream: stream.unwrap_or(false),
        include_usage: include_usage && stream == Some(true),
        continuous_usage: include_usage && continuous_usage && stream == Some(true),
        prompts,
        max_tokens,
        n: n as u32,
        ignore_eos,
        priority,
        seed,
        request_hash,
        kv,
        logprobs,
        stop,
        include_stop,
    })
}

/// vLLM 0.32's checks of `tools` and `tool_choice`, as a server started without
/// `--tool-call-parser` makes them: the simulated engine writes text only, so a request that
/// needs a tool call (named, `required`, or `auto`, the default when tools are given) is refused
/// as such a vLLM refuses it; `tool_choice: "none"` is served.
fn check_tools(obj: &Map<String, Value>) -> Result<(), ApiError> {
    let tools = obj.get("tools").filter(|t| !t.is_null());
    if tools.and_then(Value::as_array).is_some_and(Vec::is_empty) {
        return Err(ApiError::check(
            "`tools` must not be an empty array. Either provide at least one tool or omit the \
             field entirely.",
            "tools",
            None,
        ));
    }
    let choice = match obj.get("tool_choice").filter(|c| !c.is_null()) {
        Some(c) => c,
        None if tools.is_some() => &Value::String("auto".into()),
        None => return Ok(()),
    };
    if choice == "none" {
        return Ok(());
    }
    let Some(tools) = tools else {
        return Err(ApiError::check(
            "When using `tool_choice`, `tools` must be set.",
            "tool_choice",
            None,
        ));
    };
    let named = match choice {
        Value::String(c) if c == "auto" => {
            return Err(ApiError::bad_request(
                "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser \
                 to be set",
                None,
            ));
        }
        Value::String(c) if c == "required" => {
            return Err(ApiError::bad_request(
                "tool_choice=\"required\" requires --tool-call-parser to be set",
                None,
            ));
        }
        Value::Object(o) => o
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .unwrap_or(""),
        other => {
            let shown = match other {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            return Err(ApiError::check(
                format!(
                    "Invalid value for `tool_choice`: {shown}! Only named tools, \"none\", \
                     \"auto\" or \"required\" are supported."
                ),
                "tool_choice",
                None,
            ));
        }
    };
    let listed = tools.as_array().is_some_and(|ts| {
        ts.iter()
            .any(|t| t.pointer("/function/name").and_then(Value::as_str) == Some(named))
    });
    if !listed {
        return Err(ApiError::check(
            "The tool specified in `tool_choice` does not match any of the specified `tools`",
            "tool_choice",
            None,
        ));
    }
    Err(ApiError::bad_request(
        format!("tool_choice=function \"{named}\" requires --tool-call-parser to be set"),
        None,
    ))
}

/// `stop`: a string or at most four of them.
fn stop_strings(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let (kind, msg) = NOT_A_STRING;
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => {
            if a.len() > 4 {
                return Err(ApiError::invalid(
                    "stop",
                    "too_long",
                    &format!(
                        "List should have at most 4 items after validation, not {}",
                        a.len()
                    ),
                    v,
                ));
            }
            a.iter()
                .enumerate()
                .map(|(i, s)| match s {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(ApiError::invalid(
                        &format!("stop.{i}"),
                        kind,
                        msg,
                        Some(other),
                    )),
                })
                .collect()
        }
        Some(other) => Err(ApiError::invalid("stop", kind, msg, Some(other))),
    }
}

/// Writes the fields the analyzer reads in the form it reads them.
fn canonicalize(obj: &mut Obj, stream: Option<bool>, max_tokens: Option<u64>) {
    if obj.get("model").is_some_and(|m| m.as_str() == Some("")) {
        obj.remove("model");
    }
    obj.insert("stream".into(), json!(stream.unwrap_or(false)));
    obj.remove("max_completion_tokens");
    match max_tokens {
        Some(m) => obj.insert("max_tokens".into(), json!(m)),
        None => obj.remove("max_tokens"),
    };
}

/// Token count and prefix hashes of one prompt by the shared rule.
fn analyze_prompt(
    kind: ApiKind,
    body: &[u8],
    config: &AnalyzerConfig,
) -> Result<(u32, Vec<u64>), ApiError> {
    let route = Route {
        kind,
        model_required: false,
    };
    let profile = analyze(route, body, |_| None, config, |_| 0).map_err(|e| {
        // What is left for the analyzer to refuse is the prompt's or the messages' shape.
        let param = e.param.unwrap_or_default();
        ApiError::schema(
            format!(
                "{{'type': 'value_error', 'loc': 'body.{param}', 'msg': '{}'}}",
                e.message.replace('\'', "\\'")
            ),
            Some(format!("body.{param}")),
        )
    })?;
    Ok((profile.prompt_tokens, profile.prefix_hashes))
}

/// A completion's prompts: one, or one per element of a batch (a list of strings or of token-id
/// lists).
fn completion_prompts(
    obj: &mut Obj,
    body: &[u8],
    canonical: bool,
    stream: Option<bool>,
    max_tokens: Option<u64>,
    echo: bool,
    config: &AnalyzerConfig,
) -> Result<Vec<Prompt>, ApiError> {
    let missing = || {
        ApiError::check(
            "Either prompt or prompt_embeds must be provided and non-empty.",
            "prompt",
            None,
        )
    };
    let prompt = match obj.get("prompt") {
        None | Some(Value::Null) => return Err(missing()),
        Some(Value::String(s)) if s.is_empty() => return Err(missing()),
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::bad_request(
                "You must pass at least one prompt",
                None,
            ))
        }
        Some(p) => p,
    };
    let batch = match prompt {
        Value::Array(a) if a.iter().all(|e| e.is_string() || e.is_array()) => Some(a.clone()),
        _ => None,
    };
    let one = |p: &Value, bytes: &[u8]| -> Result<Prompt, ApiError> {
        if p.as_array().is_some_and(Vec::is_empty) {
            // Token ids, none of them: not even the BOS token a text prompt gets.
            return Err(ApiError::bad_request(
                "The decoder prompt cannot be empty",
                None,
            ));
        }
        let (tokens, prefix_hashes) = analyze_prompt(ApiKind::Completion, bytes, config)?;
        Ok(Prompt {
            // An empty text of a batch still holds the BOS token.
            tokens: tokens.max(1),
            prefix_hashes,
            echo: echo.then(|| prompt_text(p)),
        })
    };
    match batch {
        None if canonical => Ok(vec![one(prompt, body)?]),
        None => {
            let p = prompt.clone();
            canonicalize(obj, stream, max_tokens);
            let bytes = serde_json::to_vec(&obj).expect("JSON serializes");
            Ok(vec![one(&p, &bytes)?])
        }
        Some(elements) => elements
            .iter()
            .map(|p| {
                let bytes = serde_json::to_vec(&json!({"prompt": p})).expect("JSON serializes");
                one(p, &bytes)
            })
            .collect(),
    }
}

/// A prompt's text: itself, or its token ids read back by [`detokenize`].
fn prompt_text(p: &Value) -> String {
    match p {
        Value::String(s) => s.clone(),
        Value::Array(ids) => detokenize(ids.iter().filter_map(Value::as_i64)),
        _ => String::new(),
    }
}

fn kv_stage(p: &Obj) -> Result<KvStage, ApiError> {
    let flag = |k: &str| {
        lax(p, k, &format!("kv_transfer_params.{k}"), bool_of).map(|b| b.unwrap_or(false))
    };
    let (decode, prefill) = (flag("do_remote_decode")?, flag("do_remote_prefill")?);
    match (decode, prefill) {
        (true, true) => Err(ApiError::bad_request(
            "kv_transfer_params: do_remote_decode and do_remote_prefill are exclusive",
            Some("kv_transfer_params"),
        )),
        (true, false) => Ok(KvStage::Prefill),
        (false, true) => {
            // A decode stage must say where the KV comes from, as a prefill engine returned it.
            let missing: Vec<&str> = [
                "remote_engine_id",
                "remote_block_ids",
                "remote_host",
                "remote_port",
            ]
            .into_iter()
            .filter(|k| p.get(*k).is_none_or(Value::is_null))
            .collect();
            if !missing.is_empty() {
                return Err(ApiError::bad_request(
                    format!(
                        "kv_transfer_params.do_remote_prefill needs {} (copy them from the prefill engine's response)",
                        missing.join(", ")
                    ),
                    Some("kv_transfer_params"),
                ));
            }
            let blocks = p["remote_block_ids"].as_array().ok_or_else(|| {
                ApiError::invalid(
                    "kv_transfer_params.remote_block_ids",
                    "list_type",
                    "Input should be a valid list",
                    p.get("remote_block_ids"),
                )
            })?;
            Ok(KvStage::Decode {
                remote_blocks: blocks.len(),
            })
        }
        (false, false) => Ok(KvStage::None),
    }
}

/// Words of the simulated output, one per token, each with its leading space (part of the token,
/// as in BPE vocabularies). None needs JSON escaping.
const WORDS: [&str; 64] = [
    " the", " of", " and", " to", " in", " is", " that", " it", " for", " as", " with", " was",
    " on", " be", " at", " by", " this", " had", " not", " are", " but", " from", " or", " have",
    " an", " they", " which", " one", " you", " were", " all", " we", " her", " she", " there",
    " would", " their", " will", " when", " who", " him", " been", " has", " more", " if", " no",
    " out", " so", " said", " what", " up", " its", " about", " into", " than", " them", " can",
    " only", " other", " new", " some", " could", " time", " these",
];

/// Ids the placeholder tokenizer hands out are below this.
pub(crate) const VOCAB: i64 = 128_000;

/// Log-probabilities by rank, most likely first (shortest float forms, so they print as written).
const LOGPROBS: [&str; 32] = [
    "-0.0127", "-0.0841", "-0.1932", "-0.3105", "-0.4577", "-0.6234", "-0.8016", "-0.9958",
    "-1.2043", "-1.4271", "-1.6645", "-1.9167", "-2.1838", "-2.4662", "-2.7639", "-3.0772",
    "-3.4062", "-3.7511", "-4.1121", "-4.4893", "-4.8829", "-5.2931", "-5.7201", "-6.164",
    "-6.625", "-7.1033", "-7.5991", "-8.1126", "-8.644", "-9.1934", "-9.7611", "-10.3472",
];

fn word_index(seed: u64, i: u32) -> usize {
    (mix64(seed.wrapping_add(i as u64)) % WORDS.len() as u64) as usize
}

/// Token `i` of the output whose stream is `seed`.
#[inline]
pub(crate) fn token_text(seed: u64, i: u32) -> &'static str {
    WORDS[word_index(seed, i)]
}

/// The word a token id reads back as (`/detokenize`, `echo` of token ids); ids outside the
/// vocabulary read as nothing.
pub(crate) fn detokenize(ids: impl Iterator<Item = i64>) -> String {
    ids.filter(|id| (0..VOCAB).contains(id))
        .map(|id| WORDS[(id % WORDS.len() as i64) as usize])
        .collect()
}

/// The placeholder word of a token id, as `/tokenize`'s `token_strs` shows it.
pub(crate) fn token_str(id: u64) -> &'static str {
    WORDS[(id % WORDS.len() as u64) as usize]
}

/// The candidates of token `i` with their log-probabilities, the sampled word first: `top` of
/// them for a chat's `top_logprobs`, at least the sampled one for a completion's `logprobs`.
fn candidates(
    seed: u64,
    i: u32,
    top: u32,
    chat: bool,
) -> impl Iterator<Item = (&'static str, &'static str)> {
    let w = word_index(seed, i);
    let rank = (mix64(seed ^ 0x6c62_272e_07bb_0142 ^ i as u64) % 8) as usize;
    let count = if chat { top } else { top.max(1) } as usize;
    (0..count).map(move |j| (WORDS[(w + j) % WORDS.len()], LOGPROBS[rank + j]))
}

/// The sampled token's log-probability.
fn sampled_logprob(seed: u64, i: u32) -> &'static str {
    let rank = (mix64(seed ^ 0x6c62_272e_07bb_0142 ^ i as u64) % 8) as usize;
    LOGPROBS[rank]
}

/// Output length for a request without `ignore_eos`: lognormal with median `median` and log-space
/// deviation `sigma`, seeded by the request, capped by `max_tokens`. Returns the length and whether
/// it ended by itself (`stop`) rather than at the cap (`length`).
pub(crate) fn draw_output_len(seed: u64, median: u32, sigma: f64, max_tokens: u32) -> (u32, bool) {
    let z = SplitMix64::new(seed).next_normal();
    let n = (median as f64 * (sigma * z).exp()).round().max(1.0);
    if n >= max_tokens as f64 {
        (max_tokens, false)
    } else {
        (n as u32, true)
    }
}

/// Where a stop string first appears in an output: the tokens generated up to the one that
/// completes it, and the bytes of text kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StopHit {
    pub tokens: u32,
    pub visible: usize,
    /// Which of the stop strings.
    pub which: usize,
}

/// Scans the first `n` tokens of the output `seed` for `stops` (vLLM drops the stop string from
/// the text unless `include` asks to keep it). Work and memory are bounded by `n` and the stop
/// strings' lengths.
pub(crate) fn find_stop(seed: u64, n: u32, stops: &[String], include: bool) -> Option<StopHit> {
    // The words hold lower-case letters and spaces only: other strings can never match.
    let viable: Vec<(usize, &str)> = stops
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.is_empty() && s.bytes().all(|b| b == b' ' || b.is_ascii_lowercase()))
        .map(|(i, s)| (i, s.as_str()))
        .collect();
    let longest = viable.iter().map(|(_, s)| s.len()).max()?;
    let mut window = String::new();
    let mut base = 0usize;
    for i in 0..n {
        window.push_str(token_text(seed, i));
        let hit = viable
            .iter()
            .filter_map(|&(w, s)| window.find(s).map(|p| (base + p, w)))
            .min();
        if let Some((pos, which)) = hit {
            let visible = if include {
                pos + stops[which].len()
            } else {
                pos
            };
            return Some(StopHit {
                tokens: i + 1,
                visible,
                which,
            });
        }
        if window.len() >= longest {
            let cut = window.len() + 1 - longest;
            window.drain(..cut);
            base += cut;
        }
    }
    None
}

/// Where rendered text goes: a buffer, or a counter that sizes the buffer exactly beforehand (both
/// run the same code, so the size cannot drift from the text).
pub(crate) trait Out {
    fn put(&mut self, s: &str);
    fn num(&mut self, v: u64);
}

impl Out for String {
    #[inline]
    fn put(&mut self, s: &str) {
        self.push_str(s);
    }

    fn num(&mut self, v: u64) {
        let _ = write!(self, "{v}");
    }
}

/// Counts the bytes an [`Out`] would receive.
#[derive(Default)]
pub(crate) struct Measure(pub usize);

impl Out for Measure {
    #[inline]
    fn put(&mut self, s: &str) {
        self.0 += s.len();
    }

    #[inline]
    fn num(&mut self, v: u64) {
        self.0 += digits(v);
    }
}

/// Decimal digits of `v`.
fn digits(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 10 {
        v /= 10;
        n += 1;
    }
    n
}

/// One token's chunk of one choice.
pub(crate) struct Piece<'a> {
    pub index: u32,
    /// JSON-escaped prompt text sent ahead of the first token (`echo`), else empty.
    pub echo: &'a str,
    /// The token's visible text (a word, or less of it where a stop string cut the output).
    pub text: &'a str,
    /// For `logprobs`: the output's seed, the token's position and its offset in the text.
    pub seed: u64,
    pub position: u32,
    pub offset: usize,
    /// On the choice's last token: the finish reason and the stop reason as JSON.
    pub finish: Option<(&'a str, &'a str)>,
    /// `continuous_usage_stats`: the choice's prompt and completion tokens so far.
    pub usage: Option<(u32, u32)>,
}

/// The constant parts of one request's SSE chunks, pre-rendered; each token costs a few slice
/// copies, no JSON serializer.
pub(crate) struct ChunkFormat {
    /// `data: {"id":..,"object":..,"created":..,"model":..,"choices":[`
    head: String,
    chat: bool,
    logprobs: Option<Logprobs>,
    include_usage: bool,
}

impl ChunkFormat {
    /// The stream's last event.
    pub const DONE: &'static str = "data: [DONE]\n\n";

    pub fn new(
        api: Api,
        id: &str,
        created: u64,
        model: &str,
        logprobs: Option<Logprobs>,
        include_usage: bool,
    ) -> Self {
        let object = match api {
            Api::Completions => "text_completion",
            Api::Chat => "chat.completion.chunk",
        };
        let model = serde_json::to_string(model).expect("a string serializes");
        let id = serde_json::to_string(id).expect("a string serializes");
        Self {
            head: format!(
                "data: {{\"id\":{id},\"object\":\"{object}\",\"created\":{created},\"model\":{model},\"choices\":["
            ),
            chat: api == Api::Chat,
            logprobs,
            include_usage,
        }
    }

    pub fn is_chat(&self) -> bool {
        self.chat
    }

    fn usage_object<O: Out>(&self, out: &mut O, prompt: u64, completion: u64, details: bool) {
        out.put("\"usage\":{\"prompt_tokens\":");
        out.num(prompt);
        out.put(",\"total_tokens\":");
        out.num(prompt + completion);
        out.put(",\"completion_tokens\":");
        out.num(completion);
        out.put(if details {
            ",\"completion_tokens_details\":null}"
        } else {
            "}"
        });
    }

    /// A chat choice's opening chunk (`delta.role`), sent with the first tokens as vLLM does.
    pub fn role<O: Out>(&self, out: &mut O, index: u32, usage: Option<u32>) {
        out.put(&self.head);
        out.put("{\"index\":");
        out.num(index as u64);
        out.put(",\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}]");
        if let Some(prompt) = usage {
            out.put(",");
            self.usage_object(out, prompt as u64, 0, true);
        }
        out.put(",\"prompt_token_ids\":null,\"prompt_text\":null}\n\n");
    }

    /// One token's chunk.
    pub fn token<O: Out>(&self, out: &mut O, p: &Piece) {
        out.put(&self.head);
        out.put("{\"index\":");
        out.num(p.index as u64);
        out.put(if self.chat {
            ",\"delta\":{\"content\":\""
        } else {
            ",\"text\":\""
        });
        out.put(p.echo);
        out.put(p.text);
        out.put(if self.chat {
            "\"},\"logprobs\":"
        } else {
            "\",\"logprobs\":"
        });
        match self.logprobs {
            Some(l) => self.token_logprobs(out, p, l.top),
            None => out.put("null"),
        }
        out.put(",\"finish_reason\":");
        match p.finish {
            Some((reason, stop_reason)) => {
                out.put("\"");
                out.put(reason);
                out.put("\",\"stop_reason\":");
                out.put(stop_reason);
            }
            // A chat chunk names its stop reason only when it finishes.
            None if self.chat => out.put("null"),
            None => out.put("null,\"stop_reason\":null"),
        }
        out.put(if self.chat {
            ",\"token_ids\":null}]"
        } else {
            ",\"prompt_token_ids\":null,\"token_ids\":null}]"
        });
        if let Some((prompt, completion)) = p.usage {
            out.put(",");
            self.usage_object(out, prompt as u64, completion as u64, self.chat);
        }
        if p.finish.is_some() && !self.include_usage {
            out.put(",\"system_fingerprint\":\"");
            out.put(FINGERPRINT);
            out.put("\"");
        }
        out.put("}\n\n");
    }

    fn token_logprobs<O: Out>(&self, out: &mut O, p: &Piece, top: u32) {
        let word = token_text(p.seed, p.position);
        let lp = sampled_logprob(p.seed, p.position);
        if self.chat {
            out.put("{\"content\":[{\"token\":\"");
            out.put(word);
            out.put("\",\"logprob\":");
            out.put(lp);
            out.put(",\"bytes\":");
            bytes_list(out, word);
            out.put(",\"top_logprobs\":[");
            for (j, (w, l)) in candidates(p.seed, p.position, top, true).enumerate() {
                out.put(if j == 0 {
                    "{\"token\":\""
                } else {
                    ",{\"token\":\""
                });
                out.put(w);
                out.put("\",\"logprob\":");
                out.put(l);
                out.put(",\"bytes\":");
                bytes_list(out, w);
                out.put("}");
            }
            out.put("]}]}");
        } else {
            out.put("{\"text_offset\":[");
            out.num(p.offset as u64);
            out.put("],\"token_logprobs\":[");
            out.put(lp);
            out.put("],\"tokens\":[\"");
            out.put(word);
            out.put("\"],\"top_logprobs\":[{");
            for (j, (w, l)) in candidates(p.seed, p.position, top, false).enumerate() {
                out.put(if j == 0 { "\"" } else { ",\"" });
                out.put(w);
                out.put("\":");
                out.put(l);
            }
            out.put("}]}");
        }
    }

    /// `stream_options.include_usage`: the usage chunk, with empty `choices`.
    pub fn usage<O: Out>(&self, out: &mut O, prompt: u64, completion: u64) {
        out.put(&self.head);
        out.put("],");
        self.usage_object(out, prompt, completion, false);
        out.put(",\"system_fingerprint\":\"");
        out.put(FINGERPRINT);
        out.put("\"}\n\n");
    }
}

fn bytes_list<O: Out>(out: &mut O, word: &str) {
    out.put("[");
    for (i, b) in word.bytes().enumerate() {
        if i > 0 {
            out.put(",");
        }
        out.num(b as u64);
    }
    out.put("]");
}

/// The `logprobs` of a non-streamed choice: tokens `0..n` of the output `seed`, the first at
/// text offset `offset`.
pub(crate) fn choice_logprobs(api: Api, seed: u64, n: u32, top: u32, mut offset: usize) -> Value {
    let lp = |s: &str| -> Value { json!(s.parse::<f64>().unwrap_or(0.0)) };
    match api {
        Api::Chat => {
            let entry =
                |w: &str, l: &str| json!({"token": w, "logprob": lp(l), "bytes": w.as_bytes()});
            let content: Vec<Value> = (0..n)
                .map(|i| {
                    let w = token_text(seed, i);
                    let mut e = entry(w, sampled_logprob(seed, i));
                    e["top_logprobs"] = candidates(seed, i, top, true)
                        .map(|(w, l)| entry(w, l))
                        .collect();
                    e
                })
                .collect();
            json!({"content": content})
        }
        Api::Completions => {
            let mut offsets = Vec::with_capacity(n as usize);
            for i in 0..n {
                offsets.push(offset);
                offset += token_text(seed, i).len();
            }
            json!({
                "text_offset": offsets,
                "token_logprobs": (0..n).map(|i| lp(sampled_logprob(seed, i))).collect::<Vec<_>>(),
                "tokens": (0..n).map(|i| token_text(seed, i)).collect::<Vec<_>>(),
                "top_logprobs": (0..n)
                    .map(|i| {
                        candidates(seed, i, top, false)
                            .map(|(w, l)| (w.to_string(), lp(l)))
                            .collect::<Map<String, Value>>()
                    })
                    .collect::<Vec<_>>(),
            })
        }
    }
}

/// One choice of a non-streamed answer.
pub(crate) struct Choice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<Value>,
    pub finish: &'static str,
    pub stop_reason: Option<String>,
}

/// A non-streaming response body, with vLLM 0.32's keys.
#[allow(clippy::too_many_arguments)]
pub(crate) fn full_response(
    api: Api,
    id: &str,
    created: u64,
    model: &str,
    choices: Vec<Choice>,
    prompt_tokens: u64,
    completion_tokens: u64,
    kv_transfer_params: Option<Value>,
) -> Value {
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": null,
        "completion_tokens_details": null,
    });
    let choices: Vec<Value> = choices
        .into_iter()
        .map(|c| match api {
            Api::Completions => json!({
                "index": c.index,
                "text": c.text,
                "logprobs": c.logprobs,
                "finish_reason": c.finish,
                "stop_reason": c.stop_reason,
                "token_ids": null,
                "prompt_logprobs": null,
                "prompt_token_ids": null,
                "routed_experts": null,
            }),
            Api::Chat => json!({
                "index": c.index,
                "message": {
                    "role": "assistant",
                    "content": c.text,
                    "refusal": null,
                    "annotations": null,
                    "audio": null,
                    "function_call": null,
                    "reasoning": null,
                },
                "logprobs": c.logprobs,
                "finish_reason": c.finish,
                "stop_reason": c.stop_reason,
                "token_ids": null,
                "routed_experts": null,
            }),
        })
        .collect();
    let mut v = json!({
        "id": id,
        "object": if api == Api::Chat { "chat.completion" } else { "text_completion" },
        "created": created,
        "model": model,
        "choices": choices,
        "service_tier": null,
        "system_fingerprint": FINGERPRINT,
        "usage": usage,
        "kv_transfer_params": kv_transfer_params,
        "ec_transfer_params": null,
        "metrics": null,
    });
    if api == Api::Chat {
        for k in ["prompt_logprobs", "prompt_token_ids", "prompt_text"] {
            v[k] = Value::Null;
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece<'a>(index: u32, text: &'a str, finish: Option<(&'a str, &'a str)>) -> Piece<'a> {
        Piece {
            index,
            echo: "",
            text,
            seed: 1,
            position: 0,
            offset: 0,
            finish,
            usage: None,
        }
    }

    fn events(s: &str) -> Vec<Value> {
        s.split("\n\n")
            .filter(|e| !e.is_empty() && *e != "data: [DONE]")
            .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn chat_chunks_have_vllm_keys() {
        let f = ChunkFormat::new(Api::Chat, "chatcmpl-1", 7, "m\"x", None, true);
        let mut s = String::new();
        f.role(&mut s, 0, None);
        f.token(&mut s, &piece(0, " the", None));
        f.token(&mut s, &piece(0, " end", Some(("length", "null"))));
        f.usage(&mut s, 3, 2);
        s.push_str(ChunkFormat::DONE);
        assert!(s.ends_with("\n\ndata: [DONE]\n\n"));
        let v = events(&s);
        assert_eq!(v.len(), 4);
        assert_eq!(
            v[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        assert_eq!(v[0]["prompt_token_ids"], Value::Null);
        let keys = |c: &Value| {
            let mut k: Vec<String> = c.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        // vLLM names `stop_reason` in a chat chunk only when the choice finishes.
        assert_eq!(
            keys(&v[1]["choices"][0]),
            ["delta", "finish_reason", "index", "logprobs", "token_ids"]
        );
        assert_eq!(
            keys(&v[2]["choices"][0]),
            [
                "delta",
                "finish_reason",
                "index",
                "logprobs",
                "stop_reason",
                "token_ids"
            ]
        );
        assert_eq!(v[1]["model"], "m\"x");
        assert_eq!(v[2]["choices"][0]["finish_reason"], "length");
        assert!(
            v[2].get("system_fingerprint").is_none(),
            "on the usage chunk instead"
        );
        assert_eq!(v[3]["choices"], json!([]));
        assert_eq!(v[3]["usage"]["total_tokens"], 5);
        assert_eq!(v[3]["system_fingerprint"], FINGERPRINT);
    }

    #[test]
    fn completion_chunks_have_vllm_keys() {
        let f = ChunkFormat::new(Api::Completions, "cmpl-1", 7, "m", None, false);
        let mut s = String::new();
        f.role(&mut Measure::default(), 0, None);
        f.token(&mut s, &piece(1, " a", None));
        f.token(&mut s, &piece(1, "", Some(("stop", "\" b\""))));
        let v = events(&s);
        let c = &v[0]["choices"][0];
        assert_eq!(v[0]["object"], "text_completion");
        assert_eq!(
            (c["index"].clone(), c["text"].clone()),
            (json!(1), json!(" a"))
        );
        for k in [
            "logprobs",
            "finish_reason",
            "stop_reason",
            "prompt_token_ids",
            "token_ids",
        ] {
            assert_eq!(c[k], Value::Null, "{k}");
        }
        assert_eq!(v[1]["choices"][0]["stop_reason"], " b");
        // Without the usage chunk, each choice's last chunk carries the fingerprint.
        assert_eq!(v[1]["system_fingerprint"], FINGERPRINT);
    }

    #[test]
    fn measured_lengths_are_exact() {
        for api in [Api::Chat, Api::Completions] {
            for logprobs in [None, Some(Logprobs { top: 0 }), Some(Logprobs { top: 20 })] {
                let f =
                    ChunkFormat::new(api, "cmpl-\u{e9}1", 1_700_000_000, "m\"x", logprobs, false);
                let mut s = String::new();
                let mut m = Measure::default();
                f.role(&mut s, 12, Some(99));
                f.role(&mut m, 12, Some(99));
                for (i, finish) in [(0, None), (1, Some(("length", "null")))] {
                    let p = Piece {
                        usage: Some((10, i + 1)),
                        echo: "hi\\n",
                        position: i,
                        offset: 1234,
                        ..piece(3, " would", finish)
                    };
                    f.token(&mut s, &p);
                    f.token(&mut m, &p);
                }
                for (p, c) in [
                    (0, 0),
                    (9, 1),
                    (123_456, 4_000_000_000),
                    (u32::MAX as u64, u32::MAX as u64),
                ] {
                    f.usage(&mut s, p, c);
                    f.usage(&mut m, p, c);
                }
                assert_eq!(s.len(), m.0, "{s}");
                assert_eq!(events(&s).len(), 7, "{s}");
            }
        }
    }

    #[test]
    fn streamed_logprobs_have_vllm_shapes() {
        let seed = 42;
        let chat = ChunkFormat::new(Api::Chat, "c", 1, "m", Some(Logprobs { top: 2 }), false);
        let cmpl = ChunkFormat::new(
            Api::Completions,
            "c",
            1,
            "m",
            Some(Logprobs { top: 0 }),
            false,
        );
        let p = Piece {
            seed,
            position: 3,
            offset: 17,
            ..piece(0, token_text(seed, 3), None)
        };
        let (mut a, mut b) = (String::new(), String::new());
        chat.token(&mut a, &p);
        cmpl.token(&mut b, &p);
        let lp = &events(&a)[0]["choices"][0]["logprobs"]["content"][0];
        let word = token_text(seed, 3);
        assert_eq!(lp["token"], word);
        assert_eq!(lp["bytes"], json!(word.as_bytes()));
        let top = lp["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert_eq!(top[0]["token"], word, "the sampled word is the most likely");
        assert!(top[0]["logprob"].as_f64() > top[1]["logprob"].as_f64());
        let lp = &events(&b)[0]["choices"][0]["logprobs"];
        assert_eq!(lp["text_offset"], json!([17]));
        assert_eq!(lp["tokens"], json!([word]));
        assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 1);
        // The non-streamed form agrees with the streamed one.
        let full = choice_logprobs(Api::Completions, seed, 4, 0, 14);
        assert_eq!(full["tokens"][3], word);
        assert_eq!(full["token_logprobs"][3], lp["token_logprobs"][0]);
        assert_eq!(full["text_offset"][0], 14);
        let full = choice_logprobs(Api::Chat, seed, 4, 2, 0);
        assert_eq!(full["content"][3]["top_logprobs"], json!(top));
    }

    #[test]
    fn stop_strings_cut_the_output_where_they_appear() {
        let seed = 9;
        let text: String = (0..40).map(|i| token_text(seed, i)).collect();
        // A string spanning the boundary of tokens 4 and 5.
        let w4 = token_text(seed, 4);
        let w5 = token_text(seed, 5);
        let stop = format!("{}{}", &w4[w4.len() - 1..], &w5[..2]);
        let first = text.find(&stop).unwrap();
        let hit = find_stop(seed, 40, &["\n".into(), stop.clone()], false).unwrap();
        assert_eq!(hit.which, 1);
        assert_eq!(hit.visible, first);
        let upto: usize = (0..hit.tokens).map(|i| token_text(seed, i).len()).sum();
        assert!(
            upto >= first + stop.len()
                && upto - token_text(seed, hit.tokens - 1).len() < first + stop.len()
        );
        let kept = find_stop(seed, 40, std::slice::from_ref(&stop), true).unwrap();
        assert_eq!(kept.visible, first + stop.len());
        assert_eq!(
            find_stop(seed, 40, &["###".into(), "\n".into()], false),
            None
        );
        assert_eq!(
            find_stop(seed, hit.tokens - 1, &[stop], false),
            None,
            "not there yet"
        );
    }

    #[test]
    fn output_lengths_have_the_median_and_respect_the_cap() {
        let mut lens: Vec<u32> = (0..5001)
            .map(|s| draw_output_len(mix64(s), 100, 0.8, 10_000).0)
            .collect();
        lens.sort();
        let median = lens[2500];
        assert!((90..=110).contains(&median), "median {median}");
        assert!((0..1000).all(|s| draw_output_len(s, 100, 0.8, 50).0 <= 50));
        assert_eq!(draw_output_len(1, 100, 0.0, 50), (50, false));
        assert_eq!(draw_output_len(1, 10, 0.0, 50), (10, true));
    }

    #[test]
    fn words_are_spaced_and_deterministic() {
        for i in 0..100 {
            let t = token_text(5, i);
            assert!(t.starts_with(' ') && t.len() > 1 && WORDS.contains(&t));
            assert_eq!(t, token_text(5, i));
        }
        for w in LOGPROBS.windows(2) {
            assert!(w[0].parse::<f64>().unwrap() > w[1].parse::<f64>().unwrap());
        }
        assert_eq!(detokenize([0, 1, -1, VOCAB].into_iter()), " the of");
    }

    #[test]
    fn parse_reads_vllm_fields() {
        let body = br#"{"model":"m","prompt":"abcdefgh","max_tokens":5,"stream":true,
            "stream_options":{"include_usage":true},"ignore_eos":true,"priority":-2,"seed":3,
            "n":2,"logprobs":1,"echo":true,"stop":" of"}"#;
        let p = parse_request(Api::Completions, body, 512).unwrap();
        assert_eq!(
            (p.prompts[0].tokens, p.max_tokens, p.priority, p.n),
            (2, Some(5), -2, 2)
        );
        assert!(p.stream && p.include_usage && p.ignore_eos);
        assert_eq!(p.seed, Some(3));
        assert_eq!(p.logprobs, Some(Logprobs { top: 1 }));
        assert_eq!(p.stop, [" of"]);
        assert_eq!(p.prompts[0].echo.as_deref(), Some("abcdefgh"));
        let chat = br#"{"messages":[{"role":"user","content":"hello"}],"max_tokens":9,
            "max_completion_tokens":4,"logprobs":true}"#;
        // "user: hello\n" is 12 bytes: 3 tokens.
        let p = parse_request(Api::Chat, chat, 512).unwrap();
        assert_eq!((p.model, p.prompts[0].tokens), (None, 3));
        assert_eq!(
            p.max_tokens,
            Some(4),
            "max_completion_tokens wins, as in vLLM"
        );
        assert_eq!(p.logprobs, Some(Logprobs { top: 0 }));
        // A completion has no `max_completion_tokens`; a batch is one prompt per element.
        let p = parse_request(
            Api::Completions,
            br#"{"prompt":["abcd","abcdefgh",""],"max_completion_tokens":3}"#,
            512,
        )
        .unwrap();
        assert_eq!(p.max_tokens, None);
        let tokens: Vec<u32> = p.prompts.iter().map(|p| p.tokens).collect();
        assert_eq!(tokens, [1, 2, 1]);
        let p = parse_request(Api::Completions, br#"{"prompt":[[5,6,7]],"echo":1}"#, 512).unwrap();
        assert_eq!(p.prompts[0].tokens, 3);
        assert_eq!(
            p.prompts[0].echo.as_deref(),
            Some(detokenize([5, 6, 7].into_iter()).as_str())
        );
    }

    #[test]
    fn parse_takes_lax_types_as_pydantic_does() {
        let body = br#"{"model":"m","prompt":"abcdefgh","max_tokens":"5","stream":"true",
            "stream_options":{"include_usage":1},"ignore_eos":"yes","n":2.0,"seed":"3"}"#;
        let p = parse_request(Api::Completions, body, 512).unwrap();
        assert_eq!((p.max_tokens, p.n, p.seed), (Some(5), 2, Some(3)));
        assert!(p.stream && p.include_usage && p.ignore_eos);
        assert_eq!(p.prompts[0].tokens, 2);
        let p = parse_request(
            Api::Chat,
            br#"{"model":"","messages":[{"role":"user","content":"hi"}],"max_tokens":true}"#,
            512,
        )
        .unwrap();
        assert_eq!((p.model, p.max_tokens), (None, Some(1)));
    }

    #[test]
    fn parse_rejects_like_vllm() {
        // (body, type, param) for completions.
        for (body, validation, param) in [
            (
                &br#"{"prompt":"x","max_tokens":"ten"}"#[..],
                true,
                Some("body.max_tokens"),
            ),
            (
                br#"{"prompt":"x","max_tokens":2.5}"#,
                true,
                Some("body.max_tokens"),
            ),
            (
                br#"{"prompt":"x","ignore_eos":"maybe"}"#,
                true,
                Some("body.ignore_eos"),
            ),
            (
                br#"{"prompt":"x","priority":1.5}"#,
                true,
                Some("body.priority"),
            ),
            (br#"{"prompt":"x","model":5}"#, true, Some("body.model")),
            (br#"{"prompt":"x","stop":5}"#, true, Some("body.stop")),
            (
                br#"{"prompt":"x","stop":["a","b","c","d","e"]}"#,
                true,
                Some("body.stop"),
            ),
            (
                br#"{"prompt":"x","stream_options":"x","stream":true}"#,
                true,
                Some("body.stream_options"),
            ),
            (br#"{not json"#, true, Some("body.1")),
            (br#"[1,2]"#, true, Some("body")),
            (b"", true, Some("body")),
            (br#"{"prompt":5}"#, true, Some("body.prompt")),
            (
                br#"{"prompt":"x","max_tokens":0}"#,
                false,
                Some("max_tokens"),
            ),
            (
                br#"{"prompt":"x","max_tokens":-1}"#,
                false,
                Some("max_tokens"),
            ),
            (br#"{"prompt":"x","n":0}"#, false, None),
            (br#"{"prompt":"x","n":16385}"#, false, None),
            (br#"{"prompt":"x","logprobs":21}"#, false, Some("logprobs")),
            (
                br#"{"prompt":"x","temperature":-1}"#,
                false,
                Some("temperature"),
            ),
            (br#"{"prompt":"x","top_p":0}"#, false, Some("top_p")),
            (br#"{"prompt":"x","presence_penalty":2.5}"#, false, None),
            (br#"{"prompt":"x","frequency_penalty":-9}"#, false, None),
            (br#"{"prompt":"x","repetition_penalty":0}"#, false, None),
            (br#"{"prompt":"x","top_k":-5}"#, false, None),
            (br#"{"prompt":"x","top_k":1.5}"#, true, Some("body.top_k")),
            (br#"{"prompt":"x","min_p":2}"#, false, None),
            (br#"{"prompt":"x","min_tokens":-1}"#, false, None),
            (
                br#"{"prompt":"x","min_tokens":5,"max_tokens":3}"#,
                false,
                None,
            ),
            (br#"{"prompt":[[]]}"#, false, None),
            (br#"{"prompt":["x",[]]}"#, false, None),
            (br#"{"prompt":"x","stop":""}"#, false, None),
            (
                br#"{"prompt":"x","stream_options":{"include_usage":true}}"#,
                false,
                Some("stream_options"),
            ),
            (br#"{"model":"m"}"#, false, Some("prompt")),
            (br#"{"prompt":""}"#, false, Some("prompt")),
            (br#"{"prompt":[]}"#, false, None),
            (
                br#"{"prompt":"x","kv_transfer_params":{"do_remote_prefill":true}}"#,
                false,
                Some("kv_transfer_params"),
            ),
        ] {
            let e = parse_request(Api::Completions, body, 512).unwrap_err();
            let what = String::from_utf8_lossy(body);
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{what}");
            assert_eq!(
                (e.validation, e.param.as_deref()),
                (validation, param),
                "{what}: {}",
                e.message
            );
            let want = if validation {
                "Bad Request"
            } else {
                "BadRequestError"
            };
            assert_eq!(e.body()["error"]["type"], want);
        }
        // vLLM's sampling bounds, inclusive where it is: these pass.
        for body in [
            &br#"{"prompt":"x","top_k":-1,"min_p":1,"presence_penalty":2,"frequency_penalty":-2}"#
                [..],
            br#"{"prompt":"x","top_k":0,"repetition_penalty":1.1,"min_tokens":3,"max_tokens":3}"#,
            br#"{"prompt":["",[1,2]],"min_tokens":0}"#,
        ] {
            let parsed = parse_request(Api::Completions, body, 512);
            assert!(parsed.is_ok(), "{}", String::from_utf8_lossy(body));
        }
        let e = parse_request(
            Api::Completions,
            br#"{"prompt":"x","min_tokens":5,"max_tokens":3}"#,
            512,
        )
        .unwrap_err();
        assert_eq!(
            e.message,
            "min_tokens must be less than or equal to max_tokens=3, got 5."
        );
        let e =
            parse_request(Api::Completions, br#"{"prompt":"x","max_tokens":-1}"#, 512).unwrap_err();
        assert_eq!(
            e.message,
            "max_tokens must be at least 1, got -1. (parameter=max_tokens, value=-1)"
        );
        for (body, param) in [
            (&br#"{"model":"m"}"#[..], Some("body.messages")),
            (br#"{"messages":{"a":1}}"#, Some("body.messages")),
            (br#"{"messages":[]}"#, None),
            (
                br#"{"messages":[{"role":"user","content":"x"}],"top_logprobs":2}"#,
                Some("top_logprobs"),
            ),
            (
                br#"{"messages":[{"role":"user","content":"x"}],"logprobs":2}"#,
                Some("body.logprobs"),
            ),
            (
                br#"{"messages":[{"role":"user","content":"x"}],"max_completion_tokens":-3}"#,
                Some("max_tokens"),
            ),
            (br#"{"messages":[{"content":"x"}]}"#, Some("body.messages")),
        ] {
            let e = parse_request(Api::Chat, body, 512).unwrap_err();
            assert_eq!(
                e.param.as_deref(),
                param,
                "{}: {}",
                String::from_utf8_lossy(body),
                e.message
            );
        }
    }
}
