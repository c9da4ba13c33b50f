//! The request analyzer: from a request's body and headers to a [`RequestProfile`], or to an error
//! that names the field or header at fault and what is allowed.
//!
//! It runs once per request, before routing. The body is parsed once here; the router forwards the
//! original bytes untouched, so fields it does not know pass through. It refuses a bad value only
//! in a field the route's own API defines (`body::validated`), where the engine would refuse it
//! too; what it reads from other fields (another API's prompt, a bound the API does not have) is
//! taken when well formed and ignored otherwise.

use crate::profile::OutputSource;
use crate::prompt::{
    estimate_tokens_from_len, hash_bytes, prefix_block_hashes, ChatMessage, PromptTokenizer,
    BLOCK_BYTES, BLOCK_TOKENS,
};
use crate::{ApiKind, Phase, Priority, RequestProfile, Stage};
use serde_json::Value;

mod body;
mod form;

/// Names and defaults the analyzer needs (part of the router's one config).
#[derive(Clone, Debug, PartialEq)]
pub struct AnalyzerConfig {
    /// Header carrying the priority (1 high, 2 default, 3 low).
    pub priority_header: String,
    /// Header carrying the expected output length in tokens.
    pub expected_output_len_header: String,
    /// Header carrying the TTFT deadline in milliseconds.
    pub sla_header: String,
    /// Session key: looked up as a header, then as a top-level body field of the same name.
    pub session_key: String,
    /// Prefix blocks hashed at most (bounds the work per request; 1,024 blocks of 64 bytes =
    /// 64 KiB of prompt text, about 16,000 tokens). A cache hit is credited up to this much, so it
    /// must cover the documents a RAG fleet shares: at 256 blocks (4,096 tokens) the qoe policy
    /// saw a third of a 6,000-token document's hit and sent it away from its cache
    /// (docs/EVALUATION.md).
    pub max_prefix_blocks: usize,
    /// Nominal prefill speed used by the phase rule, tokens per ms.
    pub nominal_prefill_tokens_per_ms: f64,
    /// Nominal decode time per output token used by the phase rule, ms (the ITL target).
    pub nominal_itl_ms: f64,
    /// Counts prompt text exactly for every model without its own in `model_tokenizers`;
    /// `None`: estimated from its length (see [`crate::prompt`]).
    pub tokenizer: Option<PromptTokenizer>,
    /// Tokenizers of particular models (by the request's `model`), ahead of `tokenizer`.
    pub model_tokenizers: Vec<(String, PromptTokenizer)>,
}

impl AnalyzerConfig {
    /// The tokenizer that counts `model`'s prompts: its own, else the one for every model.
    pub fn tokenizer_for(&self, model: &str) -> Option<&PromptTokenizer> {
        self.model_tokenizers
            .iter()
            .find(|(m, _)| m == model)
            .map(|(_, t)| t)
            .or(self.tokenizer.as_ref())
    }
}

impl Default for AnalyzerConfig {
    fn default() -> Self {
        AnalyzerConfig {
            priority_header: "x-request-priority".into(),
            expected_output_len_header: "x-expected-output-tokens".into(),
            sla_header: "x-sla-target-ms".into(),
            session_key: "x-session-id".into(),
            max_prefix_blocks: 1024,
            nominal_prefill_tokens_per_ms: 8.0,
            nominal_itl_ms: 50.0,
            tokenizer: None,
            model_tokenizers: Vec::new(),
        }
    }
}

/// Largest accepted `x-expected-output-tokens`.
pub const MAX_EXPECTED_OUTPUT: u32 = 1 << 20;
/// Largest accepted `x-sla-target-ms` (one hour).
pub const MAX_SLA_MS: u32 = 3_600_000;

/// A client error found by the analyzer: which parameter, and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadRequest {
    /// The body field or header at fault (OpenAI's `param`).
    pub param: Option<String>,
    pub message: String,
}

/// The message of a request without `model` on a route that needs one.
const MISSING_MODEL: &str = "'model' is required";

impl BadRequest {
    /// Whether the request lacks `model` (absent, null or empty) on a route that needs one: the router
    /// may then take the fleet's only model, as vLLM takes its first served name.
    pub fn is_missing_model(&self) -> bool {
        self.param.as_deref() == Some("model") && self.message == MISSING_MODEL
    }

    fn new(param: &str, message: impl Into<String>) -> Self {
        BadRequest {
            param: Some(param.to_string()),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for BadRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BadRequest {}

/// What the analyzer needs to know about the route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub kind: ApiKind,
    /// Whether the body must name a `model` (true for chat, completions and embeddings).
    pub model_required: bool,
}

/// What the body says, before any header is read.
#[derive(Debug, PartialEq)]
struct BodyFacts {
    model: String,
    stream: bool,
    /// The output bound of the route's API (see [`read_body`]).
    max_tokens: Option<u64>,
    prompt: body::PromptText,
    /// The hash of the body field named like the session key, if it is a string or a number.
    session_key: Option<u64>,
    stage: Stage,
}

/// Reads the body in one pass ([`body`]) and checks its fields, in the order their errors are
/// reported: the JSON itself, `model`, `stream`, `max_tokens`, `max_completion_tokens`,
/// `max_output_tokens`, then the prompt.
fn read_body(route: Route, body: &[u8], config: &AnalyzerConfig) -> Result<BodyFacts, BadRequest> {
    let chat = route.kind == ApiKind::Chat;
    let mut fields = if body.is_empty() && !route.model_required {
        body::Fields::empty_object()
    } else {
        body::read(body, route.kind, &config.session_key).map_err(|e| BadRequest {
            param: None,
            message: format!("request body is not valid JSON: {e}"),
        })?
    };
    if !fields.is_object {
        return Err(BadRequest {
            param: None,
            message: "request body must be a JSON object".into(),
        });
    }
    let session_key = session_hash(fields.take_session(&config.session_key).as_ref());
    let model = match fields.model {
        Some(Value::String(m)) if !m.is_empty() => m,
        other => model_error(other.as_ref(), route)?,
    };
    let stream = stream_flag(fields.stream.as_ref())?;
    let count = |v: Option<&Value>, field| output_bound(route.kind, v, field);
    let max_tokens = count(fields.max_tokens.as_ref(), "max_tokens")?;
    let max_completion_tokens = count(
        fields.max_completion_tokens.as_ref(),
        "max_completion_tokens",
    )?;
    let max_output_tokens = count(fields.max_output_tokens.as_ref(), "max_output_tokens")?;
    let max_tokens = api_output_bound(
        route.kind,
        max_tokens,
        max_completion_tokens,
        max_output_tokens,
    );
    if chat && !fields.has_messages && route.model_required {
        return Err(BadRequest::new("messages", "'messages' is required"));
    }
    Ok(BodyFacts {
        model,
        stream,
        max_tokens,
        prompt: fields.prompt?,
        session_key,
        stage: stage(fields.kv_transfer_params.as_ref()),
    })
}

/// What a `multipart/form-data` body says: its `model` and `stream` fields (an audio upload
/// has no prompt text to read).
fn read_form(route: Route, body: &[u8], boundary: &[u8]) -> Result<BodyFacts, BadRequest> {
    let text = |name| form::field(body, boundary, name).map(String::from_utf8_lossy);
    let model = match text("model") {
        Some(m) if !m.trim().is_empty() => m.trim().to_string(),
        _ => model_error(None, route)?,
    };
    let stream = text("stream").is_some_and(|s| s.trim().eq_ignore_ascii_case("true"));
    Ok(BodyFacts {
        model,
        stream,
        max_tokens: None,
        prompt: body::PromptText::default(),
        session_key: None,
        stage: stage(None),
    })
}

/// The model when `model` is not a non-empty string: none if the route does not need one,
/// else the error.
fn model_error(model: Option<&Value>, route: Route) -> Result<String, BadRequest> {
    match model {
        // vLLM reads an empty name as none (its first served name).
        None | Some(Value::Null) if !route.model_required => Ok(String::new()),
        Some(Value::String(s)) if s.is_empty() && !route.model_required => Ok(String::new()),
        None | Some(Value::Null) => Err(BadRequest::new("model", MISSING_MODEL)),
        Some(Value::String(s)) if s.is_empty() => Err(BadRequest::new("model", MISSING_MODEL)),
        Some(_) => Err(BadRequest::new(
            "model",
            "'model' must be a non-empty string",
        )),
    }
}

/// `stream` as vLLM's request models read it ([`crate::lax::bool`]).
fn stream_flag(stream: Option<&Value>) -> Result<bool, BadRequest> {
    match stream {
        None | Some(Value::Null) => Ok(false),
        Some(v) => {
            crate::lax::bool(v).map_err(|_| BadRequest::new("stream", "'stream' must be a boolean"))
        }
    }
}

fn session_hash(field: Option<&Value>) -> Option<u64> {
    match field {
        Some(Value::String(s)) => Some(hash_bytes(1, s.as_bytes())),
        Some(Value::Number(n)) => Some(hash_bytes(1, n.to_string().as_bytes())),
        _ => None,
    }
}

/// A request carrying `kv_transfer_params.do_remote_prefill: true` is a decode-stage request,
/// one carrying `do_remote_decode: true` a prefill-stage one.
fn stage(kv_transfer_params: Option<&Value>) -> Stage {
    let Some(Value::Object(p)) = kv_transfer_params else {
        return Stage::Whole;
    };
    let set = |key: &str| p.get(key) == Some(&Value::Bool(true));
    if set("do_remote_prefill") {
        Stage::Decode
    } else if set("do_remote_decode") {
        Stage::Prefill
    } else {
        Stage::Whole
    }
}

/// Analyzes a request. `header` looks a header up by lower-case name; `learned_output` gives the
/// router's running estimate of output length for a model, used when the request says nothing.
pub fn analyze<'h>(
    route: Route,
    body: &[u8],
    header: impl Fn(&str) -> Option<&'h [u8]>,
    config: &AnalyzerConfig,
    learned_output: impl FnOnce(&str) -> u32,
) -> Result<RequestProfile, BadRequest> {
    let headers_said = read_headers(&header, config);
    analyze_with(route, body, header, headers_said, config, learned_output)
}

/// As [`analyze`], with what the headers say already read ([`read_headers`], which the router
/// runs before it reads the body); a header's error is reported after the body's.
pub fn analyze_with<'h>(
    route: Route,
    body: &[u8],
    header: impl Fn(&str) -> Option<&'h [u8]>,
    headers_said: Result<HeaderFacts, BadRequest>,
    config: &AnalyzerConfig,
    learned_output: impl FnOnce(&str) -> u32,
) -> Result<RequestProfile, BadRequest> {
    let facts = match header("content-type").and_then(form::boundary) {
        Some(boundary) => read_form(route, body, boundary)?,
        None => read_body(route, body, config)?,
    };
    let BodyFacts {
        model,
        stream,
        max_tokens,
        prompt,
        session_key: body_session_key,
        stage,
    } = facts;

    let HeaderFacts {
        priority,
        expected_output_tokens: expected_header,
        sla_ttft_ms,
    } = headers_said?;

    let (expected_output_tokens, output_source) = match (expected_header, max_tokens) {
        (Some(n), _) => (n, OutputSource::Header),
        (None, Some(m)) if route.kind != ApiKind::Embedding => (
            m.min(MAX_EXPECTED_OUTPUT as u64) as u32,
            OutputSource::MaxTokens,
        ),
        _ if route.kind == ApiKind::Embedding => (0, OutputSource::MaxTokens),
        _ => (learned_output(&model), OutputSource::Learned),
    };

    let session_key = header(&config.session_key)
        .map(|v| hash_bytes(1, v))
        .or(body_session_key);

    let tokenizer = config.tokenizer_for(&model);
    let text_tokens = prompt.text_tokens(tokenizer, body);
    let prompt_tokens = text_tokens.saturating_add(prompt.token_ids.min(u32::MAX as u64) as u32);
    let prefill_ms = prompt_tokens as f64 / config.nominal_prefill_tokens_per_ms.max(1e-9);
    let decode_ms = expected_output_tokens as f64 * config.nominal_itl_ms;
    let phase = match stage {
        Stage::Prefill => Phase::PrefillDominant,
        Stage::Decode => Phase::DecodeDominant,
        Stage::Whole if prefill_ms >= decode_ms => Phase::PrefillDominant,
        Stage::Whole => Phase::DecodeDominant,
    };
    // The tool definitions come first in the prompt, and are cached with it.
    let with_tools;
    let hashed = if prompt.tools.is_empty() {
        prompt.text.as_bytes()
    } else {
        with_tools = [&body[prompt.tools.clone()], prompt.text.as_bytes()].concat();
        &with_tools
    };
    let prefix_hashes = prefix_block_hashes(hashed, config.max_prefix_blocks);
    let block_tokens = match tokenizer {
        // The text's own density: what a 64-byte block holds of the tokenizer's count.
        Some(_) if !prompt.text.is_empty() => {
            let bytes = prompt.text.len() + prompt.tool_bytes();
            text_tokens as f64 * BLOCK_BYTES as f64 / bytes as f64
        }
        _ => BLOCK_TOKENS as f64,
    };

    Ok(RequestProfile {
        model,
        kind: route.kind,
        stream,
        prompt_tokens,
        expected_output_tokens,
        output_source,
        priority,
        sla_ttft_ms,
        session_key,
        prefix_hashes,
        block_tokens,
        phase,
        stage,
    })
}

/// What the request's own headers say, checked before its body is read: a request refused for
/// a header need not upload its body first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderFacts {
    pub priority: Priority,
    pub expected_output_tokens: Option<u32>,
    pub sla_ttft_ms: Option<u32>,
}

/// The priority, expected output length and SLA headers ([`AnalyzerConfig`]'s names), each
/// checked as [`analyze`] checks it.
pub fn read_headers<'h>(
    header: impl Fn(&str) -> Option<&'h [u8]>,
    config: &AnalyzerConfig,
) -> Result<HeaderFacts, BadRequest> {
    let priority = match header(&config.priority_header) {
        None => Priority::DEFAULT,
        Some(raw) => header_int(raw)
            .and_then(|n| u8::try_from(n).ok())
            .and_then(Priority::new)
            .ok_or_else(|| {
                BadRequest::new(
                    &config.priority_header,
                    format!(
                        "invalid header {}: '{}'; expected 1 (high), 2 (default) or 3 (low)",
                        config.priority_header,
                        String::from_utf8_lossy(raw)
                    ),
                )
            })?,
    };
    let header_count = |name: &str, max: u32, what: &str| -> Result<Option<u32>, BadRequest> {
        match header(name) {
            None => Ok(None),
            Some(raw) => match header_int(raw) {
                Some(n) if n >= 1 && n <= max as u64 => Ok(Some(n as u32)),
                _ => Err(BadRequest::new(
                    name,
                    format!(
                        "invalid header {name}: '{}'; expected {what}, an integer from 1 to {max}",
                        String::from_utf8_lossy(raw)
                    ),
                )),
            },
        }
    };
    let expected_output_tokens = header_count(
        &config.expected_output_len_header,
        MAX_EXPECTED_OUTPUT,
        "the expected output length in tokens",
    )?;
    let sla_ttft_ms = header_count(
        &config.sla_header,
        MAX_SLA_MS,
        "the time-to-first-token deadline in milliseconds",
    )?;
    Ok(HeaderFacts {
        priority,
        expected_output_tokens,
        sla_ttft_ms,
    })
}

/// An unsigned integer from a header value (ASCII digits, surrounding spaces allowed; no sign,
/// which Rust's parser would take).
fn header_int(raw: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(raw).ok()?.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// The output bound of the route's API, read as vLLM reads it: a chat's `max_completion_tokens`
/// before its deprecated `max_tokens`; a completion has only `max_tokens`, 16 when absent or null
/// (its OpenAI default); the Responses API has only `max_output_tokens` (a `max_tokens` sent there
/// is ignored), Anthropic-style `/v1/messages` only `max_tokens`; on another route any of the
/// three is taken as a hint.
fn api_output_bound(
    kind: ApiKind,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
) -> Option<u64> {
    match kind {
        ApiKind::Chat => max_completion_tokens.or(max_tokens),
        ApiKind::Completion => max_tokens.or(Some(COMPLETION_DEFAULT_MAX_TOKENS)),
        ApiKind::Embedding => None,
        ApiKind::Responses => max_output_tokens,
        ApiKind::Messages => max_tokens,
        ApiKind::Other => max_tokens.or(max_completion_tokens).or(max_output_tokens),
    }
}

/// A completion's output bound when it sets none: OpenAI's default for the legacy completions
/// API, which vLLM and SGLang keep.
pub const COMPLETION_DEFAULT_MAX_TOKENS: u64 = 16;

/// An output bound (`max_tokens`, ...): checked where the route's API defines it
/// ([`body::validated`]), else read if it is a count and ignored if not.
fn output_bound(kind: ApiKind, v: Option<&Value>, field: &str) -> Result<Option<u64>, BadRequest> {
    if body::validated(kind, field) {
        optional_count(v, field)
    } else {
        Ok(optional_count(v, field).ok().flatten())
    }
}

fn optional_count(v: Option<&Value>, field: &str) -> Result<Option<u64>, BadRequest> {
    let v = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(v) => v,
    };
    match crate::lax::int(v).ok() {
        Some(n) => u64::try_from(n).map(Some).map_err(|_| {
            BadRequest::new(
                field,
                format!("'{field}' must be a non-negative integer, got {n}"),
            )
        }),
        None => Err(BadRequest::new(
            field,
            format!(
                "'{field}' must be a non-negative integer, got {}",
                describe(v)
            ),
        )),
    }
}

/// A value for an error message: a number as written, else its JSON type.
fn describe(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        other => type_name(other).to_string(),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl body::PromptText {
    /// The prompt text's tokens (not those given as ids): counted by `tokenizer` (a chat's
    /// messages through its chat template when it has one, `body` the request, tools and all),
    /// else estimated; tool definitions not rendered by a template are estimated.
    fn text_tokens(&self, tokenizer: Option<&PromptTokenizer>, body: &[u8]) -> u32 {
        let tools = estimate_tokens_from_len(self.tool_bytes());
        let text = match tokenizer {
            Some(t) if !self.messages.is_empty() => {
                let messages: Vec<ChatMessage<'_>> = self
                    .messages
                    .iter()
                    .map(|m| ChatMessage {
                        role: &self.text[m.role.clone()],
                        content: &self.text[m.content.clone()],
                    })
                    .collect();
                if let Some(rendered) = t.count_chat(&messages, body) {
                    return rendered;
                }
                t.count(&self.text)
            }
            Some(t) if !self.text.is_empty() => t.count(&self.text),
            Some(_) => 0,
            None => return estimate_tokens_from_len(self.text.len() + self.tool_bytes()),
        };
        text.saturating_add(tools)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT: Route = Route {
        kind: ApiKind::Chat,
        model_required: true,
    };
    const COMPLETION: Route = Route {
        kind: ApiKind::Completion,
        model_required: true,
    };

    fn run(
        route: Route,
        body: &str,
        headers: &[(&str, &str)],
    ) -> Result<RequestProfile, BadRequest> {
        let headers: Vec<(String, Vec<u8>)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect();
        analyze(
            route,
            body.as_bytes(),
            |name| {
                headers
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.as_slice())
            },
            &AnalyzerConfig::default(),
            |_| 200,
        )
    }

    #[test]
    fn chat_profile_from_body_and_headers() {
        let body = r#"{"model":"m","stream":true,"max_tokens":64,
            "messages":[{"role":"system","content":"abcd"},{"role":"user","content":[{"type":"text","text":"efgh"}]}]}"#;
        let p = run(
            CHAT,
            body,
            &[
                ("x-request-priority", "1"),
                ("x-sla-target-ms", "250"),
                ("x-session-id", "s1"),
            ],
        )
        .unwrap();
        assert_eq!(p.model, "m");
        assert!(p.stream);
        // "system: abcd\nuser: efgh\n" = 24 bytes = 6 tokens.
        assert_eq!(p.prompt_tokens, 6);
        assert_eq!(
            (p.expected_output_tokens, p.output_source),
            (64, OutputSource::MaxTokens)
        );
        assert_eq!(p.priority, Priority::HIGH);
        assert_eq!(p.sla_ttft_ms, Some(250));
        assert!(p.session_key.is_some());
        assert_eq!(p.phase, Phase::DecodeDominant);
        assert_eq!(p.stage, Stage::Whole);
    }

    #[test]
    fn expected_output_header_then_max_tokens_then_learned() {
        let p = run(
            COMPLETION,
            r#"{"model":"m","prompt":"x","max_tokens":9}"#,
            &[("x-expected-output-tokens", "33")],
        )
        .unwrap();
        assert_eq!(
            (p.expected_output_tokens, p.output_source),
            (33, OutputSource::Header)
        );
        let p = run(
            CHAT,
            r#"{"model":"m","messages":[],"max_completion_tokens":9}"#,
            &[],
        )
        .unwrap();
        assert_eq!(p.expected_output_tokens, 9);
        // vLLM's chat reads `max_completion_tokens` before the deprecated `max_tokens`.
        let both = r#"{"model":"m","messages":[],"max_tokens":50,"max_completion_tokens":9}"#;
        assert_eq!(run(CHAT, both, &[]).unwrap().expected_output_tokens, 9);
        // A completion has no `max_completion_tokens` (vLLM ignores it, so does the router) and
        // stops at 16 tokens without `max_tokens`.
        for body in [
            r#"{"model":"m","prompt":[1,2,3]}"#,
            r#"{"model":"m","prompt":[1,2,3],"max_tokens":null}"#,
            r#"{"model":"m","prompt":[1,2,3],"max_completion_tokens":9}"#,
            r#"{"model":"m","prompt":[1,2,3],"max_completion_tokens":"nine"}"#,
        ] {
            let p = run(COMPLETION, body, &[]).unwrap();
            assert_eq!(
                (p.expected_output_tokens, p.output_source),
                (16, OutputSource::MaxTokens),
                "{body}"
            );
            assert_eq!(p.prompt_tokens, 3, "token ids count one each");
        }
        let p = run(
            CHAT,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#,
            &[],
        )
        .unwrap();
        assert_eq!(
            (p.expected_output_tokens, p.output_source),
            (200, OutputSource::Learned)
        );
    }

    /// The default analyzer with `counter` as its tokenizer.
    fn counted_by(counter: impl crate::prompt::TokenCounter + 'static) -> AnalyzerConfig {
        AnalyzerConfig {
            tokenizer: Some(PromptTokenizer(std::sync::Arc::new(counter))),
            ..AnalyzerConfig::default()
        }
    }

    /// Counts words and a BOS: a stand-in tokenizer whose counts differ from the estimate.
    struct Words;

    impl crate::prompt::TokenCounter for Words {
        fn count(&self, text: &str) -> u32 {
            1 + text.split_whitespace().count() as u32
        }
    }

    #[test]
    fn a_tokenizer_counts_the_prompt_text_exactly() {
        let config = counted_by(Words);
        let profile = |route: Route, body: &str| {
            analyze(route, body.as_bytes(), |_| None, &config, |_| 200).unwrap()
        };
        let count = |route: Route, body: &str| profile(route, body).prompt_tokens;
        let chat = r#"{"model":"m","messages":[{"role":"user","content":"one two three four five six seven eight"}]}"#;
        // "user: one two ... eight\n": 9 words and the BOS, where the estimate says 12 tokens
        // (46 bytes).
        assert_eq!(count(CHAT, chat), 10);
        assert_eq!(run(CHAT, chat, &[]).unwrap().prompt_tokens, 12);
        let completion = r#"{"model":"m","prompt":"a b c","max_tokens":1}"#;
        assert_eq!(count(COMPLETION, completion), 4);
        // Token ids are counted one each, whatever the tokenizer (no text, no BOS).
        let ids = r#"{"model":"m","prompt":[1,2,3,4],"max_tokens":1}"#;
        assert_eq!(count(COMPLETION, ids), 4);
        // A prefix block (64 bytes) holds the text's own density of tokens: 32 two-byte words
        // and the BOS in 64 bytes.
        let dense = format!(
            r#"{{"model":"m","prompt":"{}","max_tokens":1}}"#,
            "a ".repeat(32)
        );
        let p = profile(COMPLETION, &dense);
        assert_eq!((p.prompt_tokens, p.prefix_hashes.len()), (33, 1));
        assert_eq!(p.block_tokens, 33.0);
        assert_eq!(run(COMPLETION, &dense, &[]).unwrap().block_tokens, 16.0);
    }

    /// A model's own tokenizer counts its prompts; the others take the one for every model, or
    /// the estimate when there is none.
    #[test]
    fn each_model_is_counted_by_its_own_tokenizer() {
        let mut config = AnalyzerConfig {
            model_tokenizers: vec![("m".into(), PromptTokenizer(std::sync::Arc::new(Words)))],
            ..AnalyzerConfig::default()
        };
        let count = |config: &AnalyzerConfig, model: &str| {
            let body = format!(r#"{{"model":"{model}","prompt":"a b c","max_tokens":1}}"#);
            analyze(COMPLETION, body.as_bytes(), |_| None, config, |_| 1)
                .unwrap()
                .prompt_tokens
        };
        // Three words and the BOS; "a b c" estimated is 2 tokens (5 bytes).
        assert_eq!((count(&config, "m"), count(&config, "other")), (4, 2));
        config.tokenizer = Some(PromptTokenizer(std::sync::Arc::new(Templated)));
        assert_eq!((count(&config, "m"), count(&config, "other")), (4, 3));
    }

    /// Tool definitions are part of the prompt on the routes whose template renders them: their
    /// JSON text estimated with the rest, or, with a tokenizer, rendered by the chat template
    /// (else estimated beside the counted text).
    #[test]
    fn tools_count_as_prompt_where_a_template_renders_them() {
        let tools = r#"[{"type":"function","function":{"name":"get_weather","parameters":{}}}]"#;
        let chat = format!(
            r#"{{"model":"m","tools":{tools},"messages":[{{"role":"user","content":"hi"}}]}}"#
        );
        // "user: hi\n" (9 bytes) and the 71 bytes of the tools: 80 bytes, 20 tokens.
        assert_eq!(tools.len(), 71);
        assert_eq!(run(CHAT, &chat, &[]).unwrap().prompt_tokens, 20);
        let none = r#"{"model":"m","tools":null,"messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(run(CHAT, none, &[]).unwrap().prompt_tokens, 3);
        // A completion renders no tools: "hi" only.
        let completion = format!(r#"{{"model":"m","prompt":"hi","max_tokens":1,"tools":{tools}}}"#);
        assert_eq!(run(COMPLETION, &completion, &[]).unwrap().prompt_tokens, 1);
        let responses = format!(r#"{{"model":"m","input":"hi","tools":{tools}}}"#);
        let route = Route {
            kind: ApiKind::Responses,
            model_required: true,
        };
        assert_eq!(run(route, &responses, &[]).unwrap().prompt_tokens, 19);
        let count = |config: &AnalyzerConfig| {
            analyze(CHAT, chat.as_bytes(), |_| None, config, |_| 1)
                .unwrap()
                .prompt_tokens
        };
        // A tokenizer without a template: "user: hi" as 2 words and the BOS, the tools
        // estimated (18 tokens); a template renders them itself: 100 + 1 word.
        assert_eq!(count(&counted_by(Words)), 3 + 18);
        assert_eq!(count(&counted_by(Templated)), 101);
        // The definitions head the prompt, and so its prefix blocks: chats that share them
        // share a cached prefix whatever their messages.
        let hashes = |tools: &str, content: &str| {
            let body = format!(
                r#"{{"model":"m","tools":{tools},"messages":[{{"role":"user","content":"{content}"}}]}}"#
            );
            run(CHAT, &body, &[]).unwrap().prefix_hashes
        };
        let (a, b) = (
            hashes(tools, &"a".repeat(60)),
            hashes(tools, &"b".repeat(60)),
        );
        assert_eq!(
            (a.len(), b.len()),
            (2, 2),
            "71 + 69 bytes: two whole blocks"
        );
        assert_eq!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
        let other = tools.replace("get_weather", "get_climate");
        assert_ne!(hashes(&other, &"a".repeat(60))[0], a[0]);
        assert_eq!(
            hashes("null", &"a".repeat(60)).len(),
            1,
            "69 bytes: one block"
        );
        // An assistant's tool calls are rendered too: their JSON text is estimated (and not
        // hashed: the calls sit among the messages).
        let calls = r#"[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]"#;
        let history = format!(
            r#"{{"model":"m","messages":[{{"role":"assistant","content":null,"tool_calls":{calls}}}]}}"#
        );
        // "assistant: \n" (12 bytes) and the calls' 72: 84 bytes, 21 tokens.
        assert_eq!(calls.len(), 72);
        let p = run(CHAT, &history, &[]).unwrap();
        assert_eq!((p.prompt_tokens, p.prefix_hashes.len()), (21, 0));
    }

    /// A chat template stand-in: 100 tokens per message plus its content's words.
    struct Templated;

    impl crate::prompt::TokenCounter for Templated {
        fn count(&self, text: &str) -> u32 {
            text.split_whitespace().count() as u32
        }
        fn count_chat(&self, messages: &[ChatMessage<'_>], _: &[u8]) -> Option<u32> {
            let words: usize = messages
                .iter()
                .map(|m| self.count(m.content) as usize)
                .sum();
            (messages[0].role != "fail").then_some(100 * messages.len() as u32 + words as u32)
        }
    }

    #[test]
    fn a_chat_is_counted_through_the_tokenizers_template() {
        let config = counted_by(Templated);
        let count = |route: Route, body: &str| {
            analyze(route, body.as_bytes(), |_| None, &config, |_| 200)
                .unwrap()
                .prompt_tokens
        };
        // Either key first, content as a string or as text parts.
        let chat = r#"{"model":"m","messages":[{"content":"a b","role":"system"},
            {"role":"user","content":[{"type":"text","text":"c d e"}]}]}"#;
        assert_eq!(count(CHAT, chat), 205);
        // A template that cannot render these messages: the flattened text's count.
        let failing = r#"{"model":"m","messages":[{"role":"fail","content":"a b"}]}"#;
        assert_eq!(count(CHAT, failing), 3, "'fail: a b'");
        // Not a chat route: no template.
        let route = Route {
            kind: ApiKind::Messages,
            model_required: true,
        };
        let anthropic =
            r#"{"model":"m","max_tokens":4,"messages":[{"role":"user","content":"a b"}]}"#;
        assert_eq!(count(route, anthropic), 3);
    }

    #[test]
    fn phase_rule_compares_prefill_and_decode_time() {
        // 8,000 tokens at 8 tok/ms = 1,000 ms of prefill vs 5 × 50 ms of decode.
        let long = "a".repeat(32_000);
        let body = format!(r#"{{"model":"m","prompt":"{long}","max_tokens":5}}"#);
        let p = run(COMPLETION, &body, &[]).unwrap();
        assert_eq!(p.prompt_tokens, 8_000);
        assert_eq!(p.phase, Phase::PrefillDominant);
        assert_eq!(p.prefix_hashes.len(), 500, "every 64-byte block of 32 KB");
        let longer = format!(
            r#"{{"model":"m","prompt":"{}","max_tokens":5}}"#,
            "a".repeat(100_000)
        );
        let p = run(COMPLETION, &longer, &[]).unwrap();
        assert_eq!(p.prefix_hashes.len(), 1024, "capped at max_prefix_blocks");
        let body = format!(r#"{{"model":"m","prompt":"{long}","max_tokens":500}}"#);
        assert_eq!(
            run(COMPLETION, &body, &[]).unwrap().phase,
            Phase::DecodeDominant
        );
    }

    #[test]
    fn remote_prefill_is_a_decode_stage() {
        let p = run(
            COMPLETION,
            r#"{"model":"m","prompt":"hi","kv_transfer_params":{"do_remote_prefill":true}}"#,
            &[],
        )
        .unwrap();
        assert_eq!(p.stage, Stage::Decode);
        assert_eq!(p.phase, Phase::DecodeDominant);
    }

    #[test]
    fn remote_decode_is_a_prefill_stage_and_false_flags_are_ordinary() {
        let prefill = r#"{"model":"m","prompt":"hi","max_tokens":500,"kv_transfer_params":{"do_remote_decode":true}}"#;
        let p = run(COMPLETION, prefill, &[]).unwrap();
        assert_eq!(p.stage, Stage::Prefill);
        assert_eq!(p.phase, Phase::PrefillDominant);
        let off = r#"{"model":"m","prompt":"hi","kv_transfer_params":{"do_remote_decode":false,"do_remote_prefill":false}}"#;
        assert_eq!(run(COMPLETION, off, &[]).unwrap().stage, Stage::Whole);
    }

    #[test]
    fn errors_name_the_field_or_header() {
        // (body, headers, the `param` the error names, a phrase of its message)
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], Option<&'a str>, &'a str);
        let cases: &[Case] = &[
            ("{not json", &[], None, "not valid JSON"),
            ("[1]", &[], None, "JSON object"),
            (
                r#"{"prompt":"x"}"#,
                &[],
                Some("model"),
                "'model' is required",
            ),
            (
                r#"{"model":3,"prompt":"x"}"#,
                &[],
                Some("model"),
                "non-empty string",
            ),
            (
                r#"{"model":"m","max_tokens":"ten"}"#,
                &[],
                Some("max_tokens"),
                "got a string",
            ),
            (
                r#"{"model":"m","max_tokens":-1}"#,
                &[],
                Some("max_tokens"),
                "got -1",
            ),
            (
                r#"{"model":"m","stream":"maybe"}"#,
                &[],
                Some("stream"),
                "boolean",
            ),
            (
                r#"{"model":"m","prompt":{}}"#,
                &[],
                Some("prompt"),
                "token ids",
            ),
            (
                r#"{"model":"m"}"#,
                &[("x-request-priority", "0")],
                Some("x-request-priority"),
                "expected 1 (high)",
            ),
            (
                r#"{"model":"m"}"#,
                &[("x-request-priority", "4")],
                Some("x-request-priority"),
                "'4'",
            ),
            (
                r#"{"model":"m"}"#,
                &[("x-request-priority", "abc")],
                Some("x-request-priority"),
                "'abc'",
            ),
            (
                r#"{"model":"m"}"#,
                &[("x-request-priority", "+1")],
                Some("x-request-priority"),
                "'+1'",
            ),
            (
                r#"{"model":"m"}"#,
                &[("x-sla-target-ms", "+500")],
                Some("x-sla-target-ms"),
                "deadline",
            ),
            (
                r#"{"model":"m"}"#,
                &[("x-sla-target-ms", "-5")],
                Some("x-sla-target-ms"),
                "deadline",
            ),
            (
                r#"{"model":"m"}"#,
                &[("x-expected-output-tokens", "0")],
                Some("x-expected-output-tokens"),
                "from 1",
            ),
        ];
        for (body, headers, param, needle) in cases {
            let err = run(COMPLETION, body, headers).unwrap_err();
            assert_eq!(err.param.as_deref(), *param, "{body} {headers:?}");
            assert!(err.message.contains(needle), "{body}: {}", err.message);
        }
        let err = run(CHAT, r#"{"model":"m","messages":[{"content":"x"}]}"#, &[]).unwrap_err();
        assert!(err.message.contains("messages[0].role"), "{}", err.message);
    }

    #[test]
    fn optional_model_on_other_routes() {
        let route = Route {
            kind: ApiKind::Other,
            model_required: false,
        };
        let p = run(route, "", &[]).unwrap();
        assert_eq!(p.model, "");
        let p = run(route, r#"{"prompt":"hello"}"#, &[]).unwrap();
        assert_eq!(p.prompt_tokens, 2);
    }

    #[test]
    fn message_keys_in_any_order_and_the_last_duplicate_counts() {
        let text = |body: &str| {
            let p = run(CHAT, body, &[]).unwrap();
            (p.prompt_tokens, p.prefix_hashes)
        };
        // 64 bytes make one prefix block, so equal hashes mean equal texts.
        let long = "x".repeat(70);
        let role_first =
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{long}"}}]}}"#);
        let content_first =
            format!(r#"{{"model":"m","messages":[{{"content":"{long}","role":"user"}}]}}"#);
        let duplicates = format!(
            r#"{{"model":"m","messages":[{{"role":"system","content":"dropped","content":"{long}","role":"user","name":"n"}}]}}"#
        );
        let escaped =
            format!(r#"{{"model":"m","messages":[{{"role":"us\u0065r","content":"{long}"}}]}}"#);
        assert_eq!(text(&role_first).1.len(), 1);
        assert_eq!(text(&content_first), text(&role_first));
        assert_eq!(text(&duplicates), text(&role_first));
        let content_role_content = format!(
            r#"{{"model":"m","messages":[{{"content":"dropped","role":"user","content":"{long}"}}]}}"#
        );
        assert_eq!(text(&content_role_content), text(&role_first));
        assert_eq!(text(&escaped), text(&role_first));
        // The last `messages` counts too.
        let twice = format!(
            r#"{{"model":"m","messages":[{{"role":"system","content":"dropped"}}],"messages":[{{"role":"user","content":"{long}"}}]}}"#
        );
        assert_eq!(text(&twice), text(&role_first));
    }

    /// Integers and booleans as vLLM (pydantic's lax mode) reads them, checked against vLLM 0.32.
    #[test]
    fn counts_and_flags_read_as_vllm_reads_them() {
        let body = |field: &str| format!(r#"{{"model":"m","prompt":"x",{field}}}"#);
        for (field, want) in [
            (r#""max_tokens":"3""#, 3),
            (r#""max_tokens":3.0"#, 3),
            (r#""max_tokens":true"#, 1),
            (r#""max_tokens":" 3 ""#, 3),
            (r#""max_tokens":"3.0""#, 3),
        ] {
            let p = run(COMPLETION, &body(field), &[]).unwrap();
            assert_eq!(p.expected_output_tokens, want, "{field}");
        }
        for field in [
            r#""max_tokens":1.5"#,
            r#""max_tokens":"1e1""#,
            r#""max_tokens":"-3""#,
            r#""max_tokens":"""#,
            r#""max_tokens":"3.5""#,
            r#""stream":2"#,
            r#""stream":"maybe""#,
            r#""stream":[]"#,
        ] {
            assert!(run(COMPLETION, &body(field), &[]).is_err(), "{field}");
        }
        for (field, want) in [
            (r#""stream":"yes""#, true),
            (r#""stream":1"#, true),
            (r#""stream":"ON""#, true),
            (r#""stream":"f""#, false),
            (r#""stream":0"#, false),
        ] {
            assert_eq!(
                run(COMPLETION, &body(field), &[]).unwrap().stream,
                want,
                "{field}"
            );
        }
    }

    /// `/v1/responses` and Anthropic-style `/v1/messages`: their prompt and output bound are read;
    /// a field of a shape they do not use is no error.
    #[test]
    fn responses_and_messages_bodies() {
        const RESPONSES: Route = Route {
            kind: ApiKind::Responses,
            model_required: false,
        };
        const MESSAGES: Route = Route {
            kind: ApiKind::Messages,
            model_required: false,
        };
        let long = "w ".repeat(400);
        let responses = format!(
            r#"{{"model":"m","instructions":"{long}","input":"{long}","max_output_tokens":77,"stream":true}}"#
        );
        let p = run(RESPONSES, &responses, &[]).unwrap();
        assert_eq!(
            (p.expected_output_tokens, p.output_source),
            (77, OutputSource::MaxTokens)
        );
        // A `max_tokens` is not the Responses API's bound (vLLM ignores it), beside
        // `max_output_tokens` or alone.
        let both = responses.replace(r#""stream""#, r#""max_tokens":5,"stream""#);
        assert_eq!(
            run(RESPONSES, &both, &[]).unwrap().expected_output_tokens,
            77
        );
        let p = run(
            RESPONSES,
            r#"{"model":"m","input":"hi","max_tokens":5}"#,
            &[],
        )
        .unwrap();
        assert_eq!(p.output_source, OutputSource::Learned);
        let input_only = run(
            RESPONSES,
            &format!(r#"{{"model":"m","input":"{long}"}}"#),
            &[],
        )
        .unwrap();
        assert!(
            p.prompt_tokens < input_only.prompt_tokens,
            "input counts: {} {}",
            p.prompt_tokens,
            input_only.prompt_tokens
        );
        let with_instructions = run(RESPONSES, &responses, &[]).unwrap();
        assert!(
            with_instructions.prompt_tokens > input_only.prompt_tokens + 100,
            "instructions count"
        );
        let messages = format!(
            r#"{{"model":"m","system":[{{"type":"text","text":"{long}"}}],"messages":[{{"role":"user","content":[{{"type":"text","text":"{long}"}}]}}],"max_tokens":5}}"#
        );
        let p = run(MESSAGES, &messages, &[]).unwrap();
        assert_eq!(p.expected_output_tokens, 5);
        // `max_tokens` is the Messages API's only bound.
        let stray = messages.replace(
            r#""max_tokens":5"#,
            r#""max_tokens":100,"max_output_tokens":5"#,
        );
        assert_eq!(
            run(MESSAGES, &stray, &[]).unwrap().expected_output_tokens,
            100
        );
        let without_system =
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{long}"}}]}}"#);
        let q = run(MESSAGES, &without_system, &[]).unwrap();
        assert!(q.prompt_tokens > 100, "messages count: {}", q.prompt_tokens);
        assert!(p.prompt_tokens > q.prompt_tokens + 100, "system counts");
        // Shapes these routes do not use add nothing and are not refused.
        for route in [RESPONSES, MESSAGES] {
            for odd in [
                r#"{"model":"m","messages":{"a":1},"system":7,"instructions":{"x":[]}}"#,
                r#"{"model":"m","messages":[{"content":"no role"}]}"#,
            ] {
                assert_eq!(run(route, odd, &[]).unwrap().prompt_tokens, 0, "{odd}");
            }
        }
        // These routes are not the router's to validate: a bad output bound is ignored.
        let p = run(
            RESPONSES,
            r#"{"model":"m","max_output_tokens":-1,"input":5}"#,
            &[],
        )
        .unwrap();
        assert_eq!(p.output_source, OutputSource::Learned);
        let p = run(MESSAGES, r#"{"model":"m","max_tokens":"many"}"#, &[]).unwrap();
        assert_eq!(p.output_source, OutputSource::Learned);
        // Another route takes any of the three as a hint.
        let other = Route {
            kind: ApiKind::Other,
            model_required: false,
        };
        for field in ["max_tokens", "max_completion_tokens", "max_output_tokens"] {
            let p = run(other, &format!(r#"{{"{field}":9}}"#), &[]).unwrap();
            assert_eq!(p.expected_output_tokens, 9, "{field}");
        }
    }

    /// The router refuses a bad field only where the route's own API defines it, as vLLM does;
    /// another API's field is read if well formed, else ignored (the engine ignores it too).
    #[test]
    fn only_the_routes_own_fields_are_validated() {
        const EMBEDDING: Route = Route {
            kind: ApiKind::Embedding,
            model_required: true,
        };
        let ok = |route, body: &str| run(route, body, &[]).unwrap();
        let refused = |route, body: &str| run(route, body, &[]).unwrap_err().param;
        let p = ok(
            COMPLETION,
            r#"{"model":"m","prompt":"x","max_output_tokens":"abc","input":5,"query":{}}"#,
        );
        assert_eq!(
            (p.expected_output_tokens, p.output_source),
            (16, OutputSource::MaxTokens),
            "max_output_tokens is not a completion's: its default bound holds"
        );
        assert_eq!(p.prompt_tokens, 1);
        assert_eq!(
            refused(COMPLETION, r#"{"model":"m","prompt":{}}"#).as_deref(),
            Some("prompt")
        );
        assert_eq!(
            refused(
                COMPLETION,
                r#"{"model":"m","prompt":"x","max_tokens":"ten"}"#
            )
            .as_deref(),
            Some("max_tokens")
        );
        assert_eq!(
            refused(EMBEDDING, r#"{"model":"m","input":{}}"#).as_deref(),
            Some("input")
        );
        let p = ok(
            EMBEDDING,
            r#"{"model":"m","input":"x","prompt":true,"max_tokens":"x"}"#,
        );
        assert_eq!(p.prompt_tokens, 1);
        let p = ok(
            CHAT,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_output_tokens":9}"#,
        );
        assert_eq!(p.output_source, OutputSource::Learned);
    }

    #[test]
    fn prompt_fields_join_in_a_fixed_order() {
        let a = "a".repeat(40);
        let b = "b".repeat(40);
        let route = Route {
            kind: ApiKind::Other,
            model_required: false,
        };
        let p1 = run(
            route,
            &format!(r#"{{"query":"{a}","documents":["{b}"]}}"#),
            &[],
        )
        .unwrap();
        let p2 = run(
            route,
            &format!(r#"{{"documents":["{b}"],"query":"{a}"}}"#),
            &[],
        )
        .unwrap();
        assert_eq!(p1.prompt_tokens, 20);
        assert_eq!(p1.prefix_hashes, p2.prefix_hashes);
        assert_eq!(p1.prefix_hashes.len(), 1);
    }

    /// The body read as it was before the one-pass parser: into a `serde_json::Value`, fields
    /// taken from the tree. Kept as the reference the one-pass parser must agree with.
    mod reference {
        use super::super::body::PromptText;
        use super::super::*;

        pub(in super::super) fn read_body(
            route: Route,
            body: &[u8],
            config: &AnalyzerConfig,
        ) -> Result<BodyFacts, BadRequest> {
            let json: Value = if body.is_empty() && !route.model_required {
                Value::Object(Default::default())
            } else {
                serde_json::from_slice(body).map_err(|e| BadRequest {
                    param: None,
                    message: format!("request body is not valid JSON: {e}"),
                })?
            };
            let Value::Object(obj) = &json else {
                return Err(BadRequest {
                    param: None,
                    message: "request body must be a JSON object".into(),
                });
            };
            let model = match obj.get("model") {
                Some(Value::String(m)) if !m.is_empty() => m.clone(),
                other => model_error(other, route)?,
            };
            let stream = stream_flag(obj.get("stream"))?;
            let count = |field| output_bound(route.kind, obj.get(field), field);
            let max_tokens = api_output_bound(
                route.kind,
                count("max_tokens")?,
                count("max_completion_tokens")?,
                count("max_output_tokens")?,
            );
            let mut prompt = PromptText::default();
            match route.kind {
                ApiKind::Chat => match obj.get("messages") {
                    Some(Value::Array(messages)) => {
                        for (i, m) in messages.iter().enumerate() {
                            add_message(&mut prompt, m, i)?;
                        }
                        prompt.call_bytes = call_bytes(body);
                    }
                    Some(_) => {
                        return Err(BadRequest::new("messages", "'messages' must be an array"))
                    }
                    None if route.model_required => {
                        return Err(BadRequest::new("messages", "'messages' is required"))
                    }
                    None => {}
                },
                _ => {
                    for field in super::super::body::PREAMBLE_FIELDS {
                        match obj.get(field) {
                            Some(Value::String(s)) => prompt.text.push_str(s),
                            Some(Value::Array(parts)) => {
                                let texts: Vec<&str> = parts
                                    .iter()
                                    .filter_map(|part| part.get("text").and_then(Value::as_str))
                                    .collect();
                                prompt.text.push_str(&texts.join("\n"));
                            }
                            _ => {}
                        }
                    }
                    if let Some(Value::Array(messages)) = obj.get("messages") {
                        let mut read = PromptText::default();
                        let ok = messages
                            .iter()
                            .enumerate()
                            .all(|(i, m)| add_message(&mut read, m, i).is_ok());
                        if ok {
                            prompt.text.push_str(&read.text);
                            prompt.call_bytes = call_bytes(body);
                        }
                    }
                    for field in ["prompt", "input", "text", "query", "documents"] {
                        let Some(v) = obj.get(field) else { continue };
                        let mut read = PromptText::default();
                        match add_prompt(&mut read, v, field) {
                            Ok(()) => {
                                prompt.text.push_str(&read.text);
                                prompt.token_ids += read.token_ids;
                            }
                            Err(e) if body::validated(route.kind, field) => return Err(e),
                            Err(_) => {}
                        }
                    }
                }
            }
            if super::super::body::renders_tools(route.kind) {
                let raw: std::collections::HashMap<String, &serde_json::value::RawValue> =
                    serde_json::from_slice(body).unwrap_or_default();
                let body = std::str::from_utf8(body).unwrap_or_default();
                prompt.tools = raw
                    .get("tools")
                    .map_or(0..0, |t| super::super::body::tool_list(body, t.get()));
            }
            Ok(BodyFacts {
                model,
                stream,
                max_tokens,
                prompt,
                session_key: session_hash(obj.get(&config.session_key)),
                stage: stage(obj.get("kv_transfer_params")),
            })
        }

        /// Bytes of the messages' `tool_calls` lists, as sent.
        fn call_bytes(body: &[u8]) -> usize {
            use serde_json::value::RawValue;
            use std::collections::HashMap;
            let text = std::str::from_utf8(body).unwrap_or_default();
            let top: HashMap<String, &RawValue> = serde_json::from_str(text).unwrap_or_default();
            let Some(messages) = top.get("messages") else {
                return 0;
            };
            let messages: Vec<HashMap<String, &RawValue>> =
                serde_json::from_str(messages.get()).unwrap_or_default();
            messages
                .iter()
                .filter_map(|m| m.get("tool_calls"))
                .map(|calls| super::super::body::tool_list(text, calls.get()).len())
                .sum()
        }

        fn add_message(p: &mut PromptText, message: &Value, i: usize) -> Result<(), BadRequest> {
            let Value::Object(m) = message else {
                return Err(BadRequest::new(
                    "messages",
                    format!("messages[{i}] must be an object with 'role' and 'content'"),
                ));
            };
            let Some(Value::String(role)) = m.get("role") else {
                return Err(BadRequest::new(
                    "messages",
                    format!("messages[{i}].role must be a string"),
                ));
            };
            let start = p.text.len();
            p.text.push_str(role);
            p.text.push_str(": ");
            let content_start = p.text.len();
            match m.get("content") {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) => p.text.push_str(s),
                Some(Value::Array(parts)) => {
                    let texts: Vec<&str> = parts
                        .iter()
                        .filter_map(|part| part.get("text").and_then(Value::as_str))
                        .collect();
                    p.text.push_str(&texts.join("\n"));
                }
                Some(_) => {
                    return Err(BadRequest::new(
                        "messages",
                        format!("messages[{i}].content must be a string or an array of parts"),
                    ))
                }
            }
            p.messages.push(super::super::body::MessageSpan {
                role: start..start + role.len(),
                content: content_start..p.text.len(),
            });
            p.text.push('\n');
            Ok(())
        }

        fn add_prompt(p: &mut PromptText, v: &Value, field: &str) -> Result<(), BadRequest> {
            let bad = || {
                BadRequest::new(
                    field,
                    format!("'{field}' must be a string, an array of strings, or token ids"),
                )
            };
            match v {
                Value::String(s) => p.text.push_str(s),
                Value::Array(items) => {
                    for item in items {
                        match item {
                            Value::String(s) => p.text.push_str(s),
                            Value::Number(_) => p.token_ids += 1,
                            Value::Array(ids) => p.token_ids += ids.len() as u64,
                            Value::Object(_) if field == "input" => {
                                p.text.push_str(&item.to_string())
                            }
                            _ => return Err(bad()),
                        }
                    }
                }
                Value::Null => {}
                _ => return Err(bad()),
            }
            Ok(())
        }
    }

    mod properties {
        //! Property tests: whatever the bytes, the analyzer returns a profile or an error that names
        //! the field or header at fault, or says the body is not a JSON object; it never panics.
        //! Case counts: 256 per property by default, `PROPTEST_CASES` for longer runs (the counts
        //! run are in docs/RELIABILITY.md).

        use super::*;
        use proptest::prelude::*;

        const PARAMS: [&str; 14] = [
            "model",
            "stream",
            "max_tokens",
            "max_completion_tokens",
            "max_output_tokens",
            "messages",
            "prompt",
            "input",
            "text",
            "query",
            "documents",
            "x-request-priority",
            "x-sla-target-ms",
            "x-expected-output-tokens",
        ];

        /// Field names the analyzer reads, plus arbitrary ones.
        fn arb_key() -> impl Strategy<Value = String> {
            prop_oneof![
                3 => prop::sample::select(vec![
                    "model", "stream", "max_tokens", "max_completion_tokens", "messages",
                    "prompt", "input", "text", "query", "documents", "role", "content",
                    "max_output_tokens", "instructions", "system",
                    "kv_transfer_params", "do_remote_prefill", "x-session-id", "type",
                    "tools", "tool_calls",
                ])
                .prop_map(str::to_string),
                1 => any::<String>(),
            ]
        }

        fn arb_json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>().prop_map(
                    |f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
                ),
                prop::sample::select(vec!["m", "user", "", "system"])
                    .prop_map(|s| Value::String(s.to_string())),
                any::<String>().prop_map(Value::String),
            ];
            leaf.prop_recursive(4, 64, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    prop::collection::btree_map(arb_key(), inner, 0..6)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// Mostly objects, with the fields the analyzer reads.
        fn arb_body() -> impl Strategy<Value = Value> {
            prop_oneof![
                4 => prop::collection::btree_map(arb_key(), arb_json(), 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
                1 => arb_json(),
            ]
        }

        fn arb_route() -> impl Strategy<Value = Route> {
            (
                prop::sample::select(vec![
                    ApiKind::Chat,
                    ApiKind::Completion,
                    ApiKind::Embedding,
                    ApiKind::Responses,
                    ApiKind::Messages,
                    ApiKind::Other,
                ]),
                any::<bool>(),
            )
                .prop_map(|(kind, model_required)| Route {
                    kind,
                    model_required,
                })
        }

        /// A header value: absent, a plausible number, or arbitrary bytes.
        fn arb_header() -> impl Strategy<Value = Option<Vec<u8>>> {
            prop_oneof![
                2 => Just(None),
                2 => (-5i64..5_000_000).prop_map(|n| Some(n.to_string().into_bytes())),
                1 => prop::collection::vec(any::<u8>(), 0..12).prop_map(Some),
            ]
        }

        fn run_any(
            route: Route,
            body: &[u8],
            headers: &[Option<Vec<u8>>; 3],
        ) -> Result<RequestProfile, BadRequest> {
            let config = AnalyzerConfig::default();
            let names = [
                config.priority_header.clone(),
                config.sla_header.clone(),
                config.expected_output_len_header.clone(),
            ];
            analyze(
                route,
                body,
                |name| {
                    names
                        .iter()
                        .position(|n| n == name)
                        .and_then(|i| headers[i].as_deref())
                },
                &config,
                |_| 100,
            )
        }

        /// The contract: a profile within bounds, or an error naming what is wrong.
        fn check(
            route: Route,
            result: Result<RequestProfile, BadRequest>,
        ) -> Result<(), TestCaseError> {
            match result {
                Ok(p) => {
                    prop_assert!((1..=3).contains(&p.priority.level()));
                    prop_assert!(p
                        .sla_ttft_ms
                        .is_none_or(|ms| (1..=MAX_SLA_MS).contains(&ms)));
                    prop_assert!(p.expected_output_tokens <= MAX_EXPECTED_OUTPUT);
                    if route.model_required {
                        prop_assert!(!p.model.is_empty());
                    }
                    prop_assert!(
                        p.prefix_hashes.len() <= AnalyzerConfig::default().max_prefix_blocks
                    );
                }
                Err(e) => {
                    prop_assert!(!e.message.is_empty());
                    match e.param.as_deref() {
                        Some(param) => {
                            prop_assert!(PARAMS.contains(&param), "unexpected param {param}");
                            prop_assert!(
                                e.message.contains(param),
                                "the message names {param}: {}",
                                e.message
                            );
                        }
                        None => prop_assert!(
                            e.message.contains("not valid JSON")
                                || e.message.contains("must be a JSON object"),
                            "an error without a param says the body is invalid: {}",
                            e.message
                        ),
                    }
                }
            }
            Ok(())
        }

        proptest! {
            #[test]
            fn arbitrary_bytes_never_panic(
                route in arb_route(),
                body in prop::collection::vec(any::<u8>(), 0..512),
                headers in [arb_header(), arb_header(), arb_header()],
            ) {
                check(route, run_any(route, &body, &headers))?;
            }

            #[test]
            fn arbitrary_json_never_panics(
                route in arb_route(),
                body in arb_body(),
                headers in [arb_header(), arb_header(), arb_header()],
            ) {
                let bytes = serde_json::to_vec(&body).unwrap();
                check(route, run_any(route, &bytes, &headers))?;
            }

            #[test]
            fn mutated_valid_bodies_never_panic(
                route in arb_route(),
                at in any::<prop::sample::Index>(),
                cut in 0usize..16,
                junk in prop::collection::vec(any::<u8>(), 0..8),
            ) {
                let valid = br#"{"model":"m","stream":true,"max_tokens":64,"messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hi"}]}],"prompt":["a",[1,2]],"kv_transfer_params":{"do_remote_prefill":true}}"#;
                let body = splice(valid, at, cut, &junk);
                check(route, run_any(route, &body, &[None, None, None]))?;
            }

            /// With a tokenizer, every chat message's role and content are sliced out of the
            /// prompt text: never out of range or off a character boundary, whatever the body.
            #[test]
            fn a_tokenizer_sees_any_body_without_panicking(
                route in arb_route(),
                body in arb_body(),
                at in any::<prop::sample::Index>(),
                cut in 0usize..16,
                junk in prop::collection::vec(any::<u8>(), 0..8),
            ) {
                let config = super::counted_by(super::Templated);
                let chat = r#"{"model":"m","messages":[{"role":"é","content":"数 🙂"},{"content":[{"type":"text","text":"🙂x"},{"text":"é"}],"role":"用户"}]}"#;
                let valid = serde_json::to_vec(&body).unwrap();
                let spliced = splice(chat.as_bytes(), at, cut, &junk);
                for (route, bytes) in [
                    (route, splice(&valid, at, cut, &junk)),
                    (route, valid),
                    (CHAT, chat.as_bytes().to_vec()),
                    (CHAT, spliced),
                ] {
                    let _ = analyze(route, &bytes, |_| None, &config, |_| 200);
                }
            }

            #[test]
            fn one_pass_agrees_with_the_tree(route in arb_route(), body in arb_body()) {
                let bytes = serde_json::to_vec(&body).unwrap();
                agree(route, &bytes)?;
            }

            #[test]
            fn one_pass_agrees_on_mutated_bodies(
                route in arb_route(),
                at in any::<prop::sample::Index>(),
                cut in 0usize..16,
                junk in prop::collection::vec(any::<u8>(), 0..8),
            ) {
                let valid = br#"{"messages":[{"content":[{"text":"hi","type":"text"},"x",{"text":1}],"role":"user"},{"role":"system","content":"be\n \"brief\""}],"model":"m","stream":true,"max_tokens":64,"prompt":["a",[1,2],3],"input":[{"b":1,"a":"x"}],"x-session-id":7}"#;
                let body = splice(valid, at, cut, &junk);
                agree(route, &body)?;
            }
        }

        /// `valid` with `cut` bytes at `at` replaced by `junk`.
        fn splice(valid: &[u8], at: prop::sample::Index, cut: usize, junk: &[u8]) -> Vec<u8> {
            let start = at.index(valid.len());
            let end = (start + cut).min(valid.len());
            [&valid[..start], junk, &valid[end..]].concat()
        }

        /// A JSON text for a chat message: `role` and `content` keys of assorted types, in any
        /// order, sometimes repeated, among other keys.
        fn arb_message_text() -> impl Strategy<Value = String> {
            let value = prop_oneof![
                3 => "[a-z \\n\"é]{0,80}".prop_map(|s| serde_json::to_string(&s).unwrap()),
                1 => Just("null".to_string()),
                1 => Just("7".to_string()),
                1 => Just(r#"[{"type":"text","text":"part"},{"text":2},"x",{"text":"a","text":"b"}]"#.to_string()),
                1 => Just(r#"{"text":"no"}"#.to_string()),
            ];
            let key = prop::sample::select(vec!["role", "content", "name", "role", "content"]);
            prop::collection::vec((key, value), 0..5).prop_map(|pairs| {
                let fields: Vec<String> =
                    pairs.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                format!("{{{}}}", fields.join(","))
            })
        }

        fn arb_chat_text() -> impl Strategy<Value = String> {
            (
                prop::collection::vec(arb_message_text(), 0..5),
                any::<bool>(),
                any::<bool>(),
            )
                .prop_map(|(messages, twice, stream_first)| {
                    let messages = format!("[{}]", messages.join(","));
                    let mut fields = vec![format!("\"messages\":{messages}")];
                    if twice {
                        fields.push(r#""messages":[{"role":"user","content":"again"}]"#.into());
                    }
                    let other = r#""model":"m","stream":false,"max_tokens":9"#.to_string();
                    if stream_first {
                        fields.insert(0, other);
                    } else {
                        fields.push(other);
                    }
                    format!("{{{}}}", fields.join(","))
                })
        }

        proptest! {
            #[test]
            fn one_pass_agrees_on_chat_messages(body in arb_chat_text()) {
                agree(CHAT_ROUTE, body.as_bytes())?;
            }
        }

        const CHAT_ROUTE: Route = Route {
            kind: ApiKind::Chat,
            model_required: true,
        };

        /// The one-pass parser and the tree-walking reference read the same facts from a body
        /// (the same prompt text, to the byte), or fail alike (syntax errors may be worded apart:
        /// both say the body is not JSON, and name no field).
        fn agree(route: Route, body: &[u8]) -> Result<(), TestCaseError> {
            let config = AnalyzerConfig::default();
            let new = read_body(route, body, &config);
            let old = super::reference::read_body(route, body, &config);
            match (&new, &old) {
                (Err(a), Err(b)) if a.param.is_none() && b.param.is_none() => {
                    prop_assert_eq!(
                        a.message.contains("not valid JSON"),
                        b.message.contains("not valid JSON")
                    );
                }
                _ => prop_assert_eq!(new, old),
            }
            Ok(())
        }
    }
}
