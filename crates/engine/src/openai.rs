//! vLLM's OpenAI-compatible surface: parsing requests, the error shape, and the exact response and
//! SSE chunk formats.
//!
//! The prompt rule is `qoe_core::analyze`'s, the one the router uses, so both count the same tokens
//! and hash the same prefix blocks: a completion's `prompt` is its text (an array of strings is
//! concatenated; token ids count one token each); a chat's prompt is its messages joined as
//! `role: content\n` (content parts' `text` concatenated), then one token per 4 bytes of UTF-8,
//! rounded up (`qoe_core::prompt`).
//!
//! Output text is made of short deterministic words, one word (with its leading space) per token
//! and one token per SSE chunk, so a client can count tokens by counting chunks.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use qoe_core::analyze::{analyze, AnalyzerConfig, Route};
use qoe_core::prompt::hash_bytes;
use qoe_core::ApiKind;
use qoe_sim::rng::{mix64, SplitMix64};
use serde_json::{json, Value};
use std::fmt::Write as _;

/// Which API a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Api {
    Completions,
    Chat,
}

/// An error in OpenAI's shape: `{"error":{"message","type","param","code"}}` (vLLM puts the status
/// in `code`).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
        }
    }

    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: param.map(str::to_string),
        }
    }

    /// vLLM's `type` for a status.
    fn kind(&self) -> &'static str {
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

/// A validated completion or chat request.
#[derive(Clone, Debug)]
pub(crate) struct ParsedRequest {
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub prompt_tokens: u32,
    pub prefix_hashes: Vec<u64>,
    pub max_tokens: Option<u32>,
    pub ignore_eos: bool,
    pub priority: i32,
    /// The body's `seed`, if any.
    pub seed: Option<u64>,
    /// Hash of the whole body: the request's own random stream.
    pub request_hash: u64,
    pub kv: KvStage,
}

/// Parses and type-checks a body. `max_prefix_blocks` bounds the hashing work (the engine hashes
/// the whole prompt up to `max_model_len`).
pub(crate) fn parse_request(
    api: Api,
    body: &[u8],
    max_prefix_blocks: usize,
) -> Result<ParsedRequest, ApiError> {
    let route = Route {
        kind: match api {
            Api::Completions => ApiKind::Completion,
            Api::Chat => ApiKind::Chat,
        },
        model_required: true,
    };
    let config = AnalyzerConfig {
        max_prefix_blocks,
        ..AnalyzerConfig::default()
    };
    let profile = analyze(route, body, |_| None, &config, |_| 0)
        .map_err(|e| ApiError::bad_request(e.message, e.param.as_deref()))?;
    // The analyzer has checked this is a JSON object.
    let json: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("request body is not valid JSON: {e}"), None))?;
    let obj = json
        .as_object()
        .ok_or_else(|| ApiError::bad_request("request body must be a JSON object", None))?;
    if api == Api::Completions && obj.get("prompt").is_none_or(Value::is_null) {
        return Err(ApiError::bad_request(
            "'prompt' is required",
            Some("prompt"),
        ));
    }
    if profile.prompt_tokens == 0 {
        let field = if api == Api::Chat {
            "messages"
        } else {
            "prompt"
        };
        return Err(ApiError::bad_request("the prompt is empty", Some(field)));
    }

    let max_tokens = match (
        count(obj, "max_tokens")?,
        count(obj, "max_completion_tokens")?,
    ) {
        (Some(m), _) | (None, Some(m)) => Some(m),
        (None, None) => None,
    };
    if max_tokens == Some(0) {
        return Err(ApiError::bad_request(
            "max_tokens must be at least 1, got 0.",
            Some("max_tokens"),
        ));
    }
    let n = count(obj, "n")?.unwrap_or(1);
    if n != 1 {
        return Err(ApiError::bad_request(
            format!("n must be 1 on this engine, got {n}"),
            Some("n"),
        ));
    }
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => boolean(o, "include_usage", "stream_options.include_usage")?,
        Some(_) => {
            return Err(type_error("stream_options", "an object"));
        }
    };
    let priority = match obj.get("priority") {
        None | Some(Value::Null) => 0,
        Some(Value::Number(n)) => n
            .as_i64()
            .and_then(|v| i32::try_from(v).ok())
            .ok_or_else(|| type_error("priority", "an integer"))?,
        Some(_) => return Err(type_error("priority", "an integer")),
    };
    let seed = match obj.get("seed") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(
            n.as_i64()
                .map(|v| v as u64)
                .or(n.as_u64())
                .ok_or_else(|| type_error("seed", "an integer"))?,
        ),
        Some(_) => return Err(type_error("seed", "an integer")),
    };
    let kv = match obj.get("kv_transfer_params") {
        None | Some(Value::Null) => KvStage::None,
        Some(Value::Object(p)) => kv_stage(p)?,
        Some(_) => return Err(type_error("kv_transfer_params", "an object")),
    };
    Ok(ParsedRequest {
        model: profile.model,
        stream: profile.stream,
        include_usage: include_usage && profile.stream,
        prompt_tokens: profile.prompt_tokens,
        prefix_hashes: profile.prefix_hashes,
        max_tokens: max_tokens.map(|m| m.min(u32::MAX as u64) as u32),
        ignore_eos: boolean(obj, "ignore_eos", "ignore_eos")?,
        priority,
        seed,
        request_hash: hash_bytes(0, body),
        kv,
    })
}

fn type_error(field: &str, what: &str) -> ApiError {
    ApiError::bad_request(format!("'{field}' must be {what}"), Some(field))
}

fn count(obj: &serde_json::Map<String, Value>, field: &str) -> Result<Option<u64>, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| type_error(field, "a non-negative integer")),
        Some(_) => Err(type_error(field, "a non-negative integer")),
    }
}

fn boolean(
    obj: &serde_json::Map<String, Value>,
    field: &str,
    name: &str,
) -> Result<bool, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(type_error(name, "a boolean")),
    }
}

fn kv_stage(p: &serde_json::Map<String, Value>) -> Result<KvStage, ApiError> {
    let flag = |k: &str| boolean(p, k, &format!("kv_transfer_params.{k}"));
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
            let blocks = p["remote_block_ids"]
                .as_array()
                .ok_or_else(|| type_error("kv_transfer_params.remote_block_ids", "an array"))?;
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

/// Token `i` of the output whose stream is `seed`.
#[inline]
pub(crate) fn token_text(seed: u64, i: u32) -> &'static str {
    WORDS[(mix64(seed.wrapping_add(i as u64)) % WORDS.len() as u64) as usize]
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

/// Pre-rendered pieces of one request's SSE chunks; each token costs a few slice copies, no JSON
/// serializer. Every piece has a `_len` twin giving its exact length, so a frame is rendered into
/// a buffer of exactly its size.
pub(crate) struct ChunkFormat {
    /// `data: {"id":..,"object":..,"created":..,"model":..,"choices":[`
    head: String,
    chat: bool,
}

const ROLE_CHOICE: &str =
    "{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n";
const CHAT_OPEN: &str = "{\"index\":0,\"delta\":{\"content\":\"";
const CHAT_CLOSE: &str = "\"}";
const TEXT_OPEN: &str = "{\"index\":0,\"text\":\"";
const TEXT_CLOSE: &str = "\"";
const FINISH: &str = ",\"logprobs\":null,\"finish_reason\":";
const TAIL: &str = ",\"stop_reason\":null}]}\n\n";

/// Decimal digits of `v`.
fn digits(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 10 {
        v /= 10;
        n += 1;
    }
    n
}

impl ChunkFormat {
    /// The stream's last event.
    pub const DONE: &'static str = "data: [DONE]\n\n";

    pub fn new(api: Api, id: &str, created: u64, model: &str) -> Self {
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
        }
    }

    /// The chat stream's opening chunk (`delta.role`), sent with the first token as vLLM does.
    pub fn role(&self, out: &mut String) {
        if self.chat {
            out.push_str(&self.head);
            out.push_str(ROLE_CHOICE);
        }
    }

    pub fn role_len(&self) -> usize {
        if self.chat {
            self.head.len() + ROLE_CHOICE.len()
        } else {
            0
        }
    }

    fn open_close(&self) -> (&'static str, &'static str) {
        if self.chat {
            (CHAT_OPEN, CHAT_CLOSE)
        } else {
            (TEXT_OPEN, TEXT_CLOSE)
        }
    }

    /// One token's chunk; `finish` on the last one. `text` must need no JSON escaping (the word
    /// list does not).
    pub fn token(&self, out: &mut String, text: &str, finish: Option<&str>) {
        let (open, close) = self.open_close();
        out.push_str(&self.head);
        out.push_str(open);
        out.push_str(text);
        out.push_str(close);
        out.push_str(FINISH);
        match finish {
            Some(r) => {
                out.push('"');
                out.push_str(r);
                out.push('"');
            }
            None => out.push_str("null"),
        }
        out.push_str(TAIL);
    }

    pub fn token_len(&self, text: &str, finish: Option<&str>) -> usize {
        let (open, close) = self.open_close();
        let reason = finish.map_or(4, |r| r.len() + 2);
        self.head.len() + open.len() + text.len() + close.len() + FINISH.len() + reason + TAIL.len()
    }

    /// `stream_options.include_usage`: the usage chunk, with empty `choices`.
    pub fn usage(&self, out: &mut String, prompt: u32, completion: u32) {
        out.push_str(&self.head);
        let _ = write!(
            out,
            "],\"usage\":{{\"prompt_tokens\":{prompt},\"total_tokens\":{},\"completion_tokens\":{completion}}}}}\n\n",
            prompt as u64 + completion as u64
        );
    }

    pub fn usage_len(&self, prompt: u32, completion: u32) -> usize {
        const FIXED: usize =
            "],\"usage\":{\"prompt_tokens\":,\"total_tokens\":,\"completion_tokens\":}}\n\n".len();
        self.head.len()
            + FIXED
            + digits(prompt as u64)
            + digits(prompt as u64 + completion as u64)
            + digits(completion as u64)
    }

    pub fn done(out: &mut String) {
        out.push_str(Self::DONE);
    }
}

/// A non-streaming response body.
#[allow(clippy::too_many_arguments)]
pub(crate) fn full_response(
    api: Api,
    id: &str,
    created: u64,
    model: &str,
    text: String,
    finish: &str,
    prompt_tokens: u32,
    completion_tokens: u32,
    kv_transfer_params: Option<Value>,
) -> Value {
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": null,
    });
    match api {
        Api::Completions => json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish,
                "stop_reason": null,
                "prompt_logprobs": null,
            }],
            "usage": usage,
            "kv_transfer_params": kv_transfer_params,
        }),
        Api::Chat => json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": null,
                "finish_reason": finish,
                "stop_reason": null,
            }],
            "usage": usage,
            "prompt_logprobs": null,
            "kv_transfer_params": kv_transfer_params,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_json_events() {
        let f = ChunkFormat::new(Api::Chat, "chatcmpl-1", 7, "m\"x");
        let mut s = String::new();
        f.role(&mut s);
        f.token(&mut s, " the", None);
        f.token(&mut s, " end", Some("length"));
        f.usage(&mut s, 3, 2);
        ChunkFormat::done(&mut s);
        let events: Vec<&str> = s.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 5);
        assert_eq!(events[4], "data: [DONE]");
        let v: Vec<Value> = events[..4]
            .iter()
            .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
            .collect();
        assert_eq!(v[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(v[1]["choices"][0]["delta"]["content"], " the");
        assert_eq!(v[1]["object"], "chat.completion.chunk");
        assert_eq!(v[1]["model"], "m\"x");
        assert_eq!(v[2]["choices"][0]["finish_reason"], "length");
        assert_eq!(v[3]["choices"].as_array().unwrap().len(), 0);
        assert_eq!(v[3]["usage"]["total_tokens"], 5);
    }

    #[test]
    fn piece_lengths_are_exact() {
        for api in [Api::Chat, Api::Completions] {
            let f = ChunkFormat::new(api, "cmpl-\u{e9}1", 1_700_000_000, "m\"x");
            let mut s = String::new();
            f.role(&mut s);
            assert_eq!(s.len(), f.role_len());
            for (text, finish) in [
                (" the", None),
                (" would", Some("length")),
                (" a", Some("stop")),
            ] {
                let mut s = String::new();
                f.token(&mut s, text, finish);
                assert_eq!(s.len(), f.token_len(text, finish), "{s}");
            }
            for (p, c) in [
                (0, 0),
                (9, 1),
                (10, 99),
                (123_456, 4_000_000_000),
                (u32::MAX, u32::MAX),
            ] {
                let mut s = String::new();
                f.usage(&mut s, p, c);
                assert_eq!(s.len(), f.usage_len(p, c), "{s}");
            }
            let mut s = String::new();
            ChunkFormat::done(&mut s);
            assert_eq!(s, ChunkFormat::DONE);
        }
    }

    #[test]
    fn completion_chunk_shape() {
        let f = ChunkFormat::new(Api::Completions, "cmpl-1", 7, "m");
        let mut s = String::new();
        f.role(&mut s);
        assert!(s.is_empty(), "no role chunk for completions");
        f.token(&mut s, " a", Some("stop"));
        let v: Value = serde_json::from_str(s.trim().strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["text"], " a");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
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
    }

    #[test]
    fn parse_reads_vllm_fields() {
        let body = br#"{"model":"m","prompt":"abcdefgh","max_tokens":5,"stream":true,
            "stream_options":{"include_usage":true},"ignore_eos":true,"priority":-2,"seed":3}"#;
        let p = parse_request(Api::Completions, body, 512).unwrap();
        assert_eq!(
            (p.prompt_tokens, p.max_tokens, p.priority),
            (2, Some(5), -2)
        );
        assert!(p.stream && p.include_usage && p.ignore_eos);
        assert_eq!(p.seed, Some(3));
        let chat = br#"{"model":"m","messages":[{"role":"user","content":"hello"}]}"#;
        // "user: hello\n" is 12 bytes: 3 tokens.
        assert_eq!(
            parse_request(Api::Chat, chat, 512).unwrap().prompt_tokens,
            3
        );
    }

    #[test]
    fn parse_rejects_bad_types() {
        for (body, param) in [
            (
                &br#"{"model":"m","prompt":"x","max_tokens":"5"}"#[..],
                "max_tokens",
            ),
            (
                br#"{"model":"m","prompt":"x","ignore_eos":1}"#,
                "ignore_eos",
            ),
            (br#"{"model":"m","prompt":"x","priority":1.5}"#, "priority"),
            (br#"{"model":"m","prompt":"x","n":2}"#, "n"),
            (
                br#"{"model":"m","prompt":"x","max_tokens":0}"#,
                "max_tokens",
            ),
            (br#"{"model":"m"}"#, "prompt"),
            (
                br#"{"model":"m","prompt":"x","kv_transfer_params":{"do_remote_prefill":true}}"#,
                "kv_transfer_params",
            ),
        ] {
            let e = parse_request(Api::Completions, body, 512).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(e.param.as_deref(), Some(param), "{}", e.message);
        }
        let e = parse_request(Api::Completions, b"{not json", 512).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }
}
