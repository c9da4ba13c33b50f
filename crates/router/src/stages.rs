//! Disaggregated serving: one request, two engines. When the endpoints of a model include some
//! of role `prefill` and some of role `decode`, an ordinary chat or completion request of one
//! sequence is split as vLLM's NIXL connector expects: a copy with `max_tokens: 1`, no streaming
//! and `kv_transfer_params.do_remote_decode` goes to a prefill endpoint; the `kv_transfer_params`
//! it answers with go, in the original request, to a decode endpoint, whose answer is the
//! client's. Only endpoints of those two roles take the stages: an engine of role `both` may
//! have no KV connector.
//!
//! Each stage is routed as a request of its own, through the same policy, load accounting,
//! admission, retries and observation: the prefill pick sees a prefill-dominant request (the
//! qoe policy weighs its TTFT), the decode pick a decode-stage one whose prompt is cached (its
//! ITL decides). Why not one pick for both: the two stages want different engines, which is the
//! point of running them apart.

use crate::errors::ApiError;
use crate::proxy::{dispatch, reject};
use crate::state::AppState;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use http_body_util::BodyExt;
use qoe_core::{ApiKind, Micros, Phase, RequestProfile, Role, Stage};
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// The response header naming the endpoint that ran the prefill stage.
pub const X_QOE_PREFILL_ENDPOINT: &str = "x-qoe-prefill-endpoint";

/// Prefill answers are one token and the transfer parameters: more than this is not one.
const MAX_PREFILL_ANSWER_BYTES: usize = 1 << 20;

/// Whether `profile` is split in two stages: an ordinary chat or completion for a model that
/// endpoints of role `prefill` and of role `decode` serve, at least one of each admitting
/// requests now (with the whole prefill tier down, the decode engines serve requests whole). A
/// request that already names its stage (`kv_transfer_params`) is the client's own split and
/// goes as it is.
pub fn splits(state: &AppState, profile: &RequestProfile) -> bool {
    if profile.stage != Stage::Whole || !matches!(profile.kind, ApiKind::Chat | ApiKind::Completion)
    {
        return false;
    }
    let table = state.registry.table();
    if !table.staged_roles {
        return false;
    }
    let (mut prefill, mut decode) = (false, false);
    let now = state.clock.now();
    for e in table.endpoints.iter().filter(|e| e.admits(now)) {
        match e.role_if_serving(&profile.model) {
            Some(Role::Prefill) => prefill = true,
            Some(Role::Decode) => decode = true,
            _ => {}
        }
    }
    prefill && decode
}

/// Runs the two stages of `body` (a JSON object: it was analyzed as a chat or completion).
pub async fn run(
    state: Arc<AppState>,
    parts: http::request::Parts,
    body: Bytes,
    profile: RequestProfile,
    request_id: HeaderValue,
    started: Micros,
) -> Response {
    let Ok(Value::Object(request)) = serde_json::from_slice::<Value>(&body) else {
        let error = ApiError::bad_request("request body is not a JSON object");
        return reject(&state, error, &request_id);
    };
    if !splittable(&request) {
        return dispatch(state, parts, body, profile, request_id, started, false).await;
    }
    let prefill_profile = RequestProfile {
        stream: false,
        expected_output_tokens: 1,
        phase: Phase::PrefillDominant,
        stage: Stage::Prefill,
        ..profile.clone()
    };
    let mut prefill_parts = copy_parts(&parts);
    // Its answer is read here, not relayed: plain JSON.
    prefill_parts.headers.remove(http::header::ACCEPT_ENCODING);
    let answer = dispatch(
        state.clone(),
        prefill_parts,
        prefill_request(&request),
        prefill_profile,
        request_id.clone(),
        started,
        true,
    )
    .await;
    let prefill_endpoint = answer.headers().get(&crate::proxy::X_QOE_ENDPOINT).cloned();
    if answer.status() != StatusCode::OK {
        // The prefill endpoint's error (or the router's: no endpoint, shed, timeout) is the
        // answer: the request was not served.
        return answer;
    }
    let params = match transfer_params(answer).await {
        Ok(p) => p,
        Err(why) => {
            let endpoint = prefill_endpoint
                .as_ref()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default();
            let error = ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("the prefill endpoint {endpoint} answered without usable kv_transfer_params: {why}"),
            );
            let mut response = reject(&state, error, &request_id);
            if let Some(endpoint) = prefill_endpoint {
                response
                    .headers_mut()
                    .insert(X_QOE_PREFILL_ENDPOINT, endpoint);
            }
            return response;
        }
    };
    let mut decode_request = request;
    // Null when the prefill stopped at its first token (EOS, a stop string): vLLM then keeps no
    // KV to hand over, and the decode engine serves the request whole, as vLLM's own proxy does.
    if let Some(params) = params {
        decode_request.insert("kv_transfer_params".into(), params);
    }
    let decode_profile = RequestProfile {
        phase: Phase::DecodeDominant,
        stage: Stage::Decode,
        ..profile
    };
    let mut response = dispatch(
        state,
        parts,
        Bytes::from(serde_json::to_vec(&decode_request).expect("a JSON map serializes")),
        decode_profile,
        request_id,
        started,
        true,
    )
    .await;
    if let Some(endpoint) = prefill_endpoint {
        response
            .headers_mut()
            .insert(X_QOE_PREFILL_ENDPOINT, endpoint);
    }
    response
}

/// Whether the request is one sequence, which one prefill hands over: not `n` > 1 (or
/// `best_of`), not a batch of prompts. Those are served whole.
fn splittable(request: &Map<String, Value>) -> bool {
    let more_than_one = |key: &str| {
        request
            .get(key)
            .and_then(Value::as_u64)
            .is_some_and(|n| n > 1)
    };
    let batched = match request.get("prompt") {
        Some(Value::Array(items)) => items.iter().any(|i| i.is_string() || i.is_array()),
        _ => false,
    };
    !more_than_one("n") && !more_than_one("best_of") && !batched
}

/// Fields of the client's request that ask for something of the answer the prefill stage's one
/// token is not: its log-probabilities, the prompt echoed, token ids, a minimum length.
const NOT_FOR_THE_PREFILL: [&str; 9] = [
    "stream_options",
    "min_tokens",
    "logprobs",
    "top_logprobs",
    "prompt_logprobs",
    "echo",
    "return_token_ids",
    "return_tokens_as_token_ids",
    "stop_token_ids",
];

/// The prefill stage's copy of the request: one token, not streamed, its KV kept for a decode
/// engine to fetch.
fn prefill_request(request: &Map<String, Value>) -> Bytes {
    let mut copy = request.clone();
    copy.insert("max_tokens".into(), json!(1));
    if copy.contains_key("max_completion_tokens") {
        copy.insert("max_completion_tokens".into(), json!(1));
    }
    copy.insert("stream".into(), json!(false));
    for key in NOT_FOR_THE_PREFILL {
        copy.remove(key);
    }
    copy.insert(
        "kv_transfer_params".into(),
        json!({
            "do_remote_decode": true,
            "do_remote_prefill": false,
            "remote_engine_id": null,
            "remote_block_ids": null,
            "remote_host": null,
            "remote_port": null,
        }),
    );
    Bytes::from(serde_json::to_vec(&copy).expect("a JSON map serializes"))
}

/// The `kv_transfer_params` object of a prefill engine's answer; `None` when it is null (the
/// prefill stopped at its first token).
async fn transfer_params(answer: Response) -> Result<Option<Value>, String> {
    let body = http_body_util::Limited::new(answer.into_body(), MAX_PREFILL_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| format!("its answer could not be read: {e}"))?
        .to_bytes();
    let mut value: Value =
        serde_json::from_slice(&body).map_err(|e| format!("its answer is not JSON: {e}"))?;
    let stopped = value["choices"][0]["finish_reason"] == "stop";
    match value.get_mut("kv_transfer_params").map(Value::take) {
        Some(params @ Value::Object(_)) => Ok(Some(params)),
        Some(Value::Null) | None if stopped => Ok(None),
        Some(_) | None => Err(
            "no kv_transfer_params object in its answer (is it an engine \
             with a KV connector?)"
                .into(),
        ),
    }
}

/// A copy of the request's method, URI, version and headers (`Parts` itself is not `Clone`: its
/// extensions may not be).
fn copy_parts(parts: &http::request::Parts) -> http::request::Parts {
    let (mut copy, ()) = http::Request::new(()).into_parts();
    copy.method = parts.method.clone();
    copy.uri = parts.uri.clone();
    copy.version = parts.version;
    copy.headers = parts.headers.clone();
    copy
}
