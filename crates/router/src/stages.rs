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
//!
//! The stages' bodies are the client's top-level members with some replaced, added or removed:
//! every other member keeps its place and its value's exact text (a `seed` beyond 64 bits stays
//! an integer, key order stays the client's).

use crate::errors::ApiError;
use crate::members::Members;
use crate::proxy::{dispatch, reject};
use crate::state::AppState;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use http_body_util::BodyExt;
use qoe_core::{ApiKind, Micros, Phase, RequestProfile, Role, Stage};
use serde_json::value::RawValue;
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
    let Ok(request) = Members::parse(&body) else {
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
        prefill_stage(&request),
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
    // None when the prefill stopped at its first token (EOS, a stop string): vLLM then keeps no
    // KV to hand over, and the decode engine serves the request whole, as vLLM's own proxy does.
    let decode_request = match params {
        Some(params) => request.edited(&[("kv_transfer_params", params.get())], &[], &[]),
        None => body.clone(),
    };
    let decode_profile = RequestProfile {
        phase: Phase::DecodeDominant,
        stage: Stage::Decode,
        ..profile
    };
    let mut response = dispatch(
        state,
        parts,
        decode_request,
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

/// What the prefill stage asks its engine for: keep the KV for a decode engine to fetch.
const DO_REMOTE_DECODE: &str = r#"{"do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,"remote_block_ids":null,"remote_host":null,"remote_port":null}"#;

/// Whether the request is one sequence, which one prefill hands over: not `n` > 1 (or
/// `best_of`), not a batch of prompts. Those are served whole.
fn splittable(request: &Members) -> bool {
    let more_than_one = |key: &str| {
        request
            .get(key)
            .and_then(|v| serde_json::from_str::<u64>(v.get()).ok())
            .is_some_and(|n| n > 1)
    };
    let batched = request.get("prompt").is_some_and(|prompt| {
        serde_json::from_str::<Vec<&RawValue>>(prompt.get())
            .is_ok_and(|items| items.iter().any(|i| i.get().starts_with(['"', '['])))
    });
    !more_than_one("n") && !more_than_one("best_of") && !batched
}

/// The prefill stage's copy of the request: one token, not streamed, its KV kept for a
/// decode engine to fetch.
fn prefill_stage(request: &Members) -> Bytes {
    request.edited(
        &[
            ("max_tokens", "1"),
            ("stream", "false"),
            ("kv_transfer_params", DO_REMOTE_DECODE),
        ],
        &[("max_completion_tokens", "1")],
        &NOT_FOR_THE_PREFILL,
    )
}

/// The `kv_transfer_params` object of a prefill engine's answer, as the engine wrote it; `None`
/// when it is null or absent and the prefill stopped at its first token.
async fn transfer_params(answer: Response) -> Result<Option<Box<RawValue>>, String> {
    let body = http_body_util::Limited::new(answer.into_body(), MAX_PREFILL_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| format!("its answer could not be read: {e}"))?
        .to_bytes();
    // Read loosely: only these two members matter, whatever shape the rest has.
    let answer =
        Members::parse(&body).map_err(|e| format!("its answer is not a JSON object: {e}"))?;
    let stopped = answer
        .get("choices")
        .and_then(|c| serde_json::from_str::<serde_json::Value>(c.get()).ok())
        .is_some_and(|c| c[0]["finish_reason"] == "stop");
    match answer.get("kv_transfer_params") {
        Some(params) if params.get().starts_with('{') => Ok(Some(params.to_owned())),
        Some(params) if params.get() == "null" && stopped => Ok(None),
        None if stopped => Ok(None),
        _ => Err(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn text(bytes: Bytes) -> String {
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[test]
    fn edits_keep_every_other_member_as_the_client_wrote_it() {
        let body = br#"{ "stream" : true, "seed": 18446744073709551617, "model":"m",
            "logprobs": 2, "temperature": 0.70, "x\"y": [1, 2] }"#;
        let members = Members::parse(body).unwrap();
        assert_eq!(
            text(prefill_stage(&members)),
            format!(
                r#"{{"stream":false,"seed":18446744073709551617,"model":"m","temperature":0.70,"x\"y":[1, 2],"max_tokens":1,"kv_transfer_params":{DO_REMOTE_DECODE}}}"#
            )
        );
    }

    #[test]
    fn a_member_sent_twice_and_set_appears_once_where_it_first_was() {
        let body = br#"{"max_tokens":5,"model":"m","max_tokens":7,"max_completion_tokens":9}"#;
        let members = Members::parse(body).unwrap();
        assert_eq!(members.get("max_tokens").unwrap().get(), "7");
        assert_eq!(
            text(prefill_stage(&members)),
            format!(
                r#"{{"max_tokens":1,"model":"m","max_completion_tokens":1,"stream":false,"kv_transfer_params":{DO_REMOTE_DECODE}}}"#
            )
        );
    }

    #[test]
    fn one_sequence_splits_several_do_not() {
        let splits = |body: &str| splittable(&Members::parse(body.as_bytes()).unwrap());
        assert!(splits(r#"{"prompt":"x","n":1}"#));
        assert!(splits(r#"{"prompt":[1,2,3]}"#));
        assert!(splits(
            r#"{"messages":[{"role":"user","content":"x"}],"best_of":1}"#
        ));
        assert!(!splits(r#"{"prompt":"x","n":2}"#));
        assert!(!splits(r#"{"prompt":"x","best_of":3}"#));
        assert!(!splits(r#"{"prompt":["a","b"]}"#));
        assert!(!splits(r#"{"prompt":[[1],[2]]}"#));
    }
}
