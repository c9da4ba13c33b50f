//! Disaggregated serving through the router, against in-process simulated engines started with
//! `--role prefill` and `--role decode` (which refuse the other stage's requests, as vLLM's NIXL
//! connector does): an ordinary request is split in two stages, each routed by role.

mod common;

use common::engine::{Engine, MODEL};
use common::*;
use std::collections::HashSet;

fn config(dir: &std::path::Path, backends: &[(&str, &str)]) -> std::path::PathBuf {
    let mut text = String::from("routing_logic = \"roundrobin\"\n");
    for (url, role) in backends {
        text.push_str(&format!(
            "[[backends]]\nurl = \"{url}\"\nmodels = [\"{MODEL}\"]\nrole = \"{role}\"\n"
        ));
    }
    let path = dir.join("router.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A router (roundrobin) in front of `backends` (url, role), and its scratch directory.
async fn fleet(tag: &str, backends: &[(&str, &str)]) -> (TestRouter, std::path::PathBuf) {
    fleet_with(tag, backends, &[]).await
}

async fn fleet_with(
    tag: &str,
    backends: &[(&str, &str)],
    flags: &[&str],
) -> (TestRouter, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("qoe-pd-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = config(&dir, backends);
    let mut args = vec!["--config", path.to_str().unwrap(), "--max-retries", "0"];
    args.extend_from_slice(flags);
    let r = router(&args).await;
    (r, dir)
}

async fn complete(c: &TestClient, r: &TestRouter, body: &serde_json::Value) -> Answer {
    post(
        c,
        &format!("{}/v1/completions", r.url),
        &body.to_string(),
        &[],
    )
    .await
}

#[tokio::test]
async fn an_ordinary_request_runs_its_prefill_and_its_decode_on_engines_of_those_roles() {
    let prefill = [
        Engine::start(&["--role", "prefill"]).await,
        Engine::start(&["--role", "prefill"]).await,
    ];
    let decode = Engine::start(&["--role", "decode"]).await;
    let dir = std::env::temp_dir().join(format!("qoe-pd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = config(
        &dir,
        &[
            (&prefill[0].url, "prefill"),
            (&prefill[1].url, "prefill"),
            (&decode.url, "decode"),
        ],
    );
    let r = router(&["--config", path.to_str().unwrap()]).await;
    let c = client();
    let mut prefilled_on = HashSet::new();
    for stream in [true, false, true, false] {
        let mut body = serde_json::json!({
            "model": MODEL, "messages": [{"role": "user", "content": "tell me a story"}],
            "max_tokens": 6, "ignore_eos": true, "stream": stream,
        });
        if stream {
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
        let body = body.to_string();
        let ans = post(&c, &format!("{}/v1/chat/completions", r.url), &body, &[]).await;
        let text = String::from_utf8_lossy(&ans.body).into_owned();
        assert_eq!(ans.status, 200, "{text}");
        assert_eq!(ans.header("x-qoe-endpoint"), decode.url, "decoded there");
        prefilled_on.insert(ans.header("x-qoe-prefill-endpoint"));
        // The client gets the whole answer, not the prefill stage's one token.
        let tokens = if stream {
            assert!(text.contains("data: [DONE]"), "{text}");
            let usage = text
                .lines()
                .rev()
                .filter_map(|l| l.strip_prefix("data: "))
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find_map(|v| v["usage"]["completion_tokens"].as_u64());
            usage.expect("usage in the stream")
        } else {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            v["usage"]["completion_tokens"].as_u64().unwrap()
        };
        assert_eq!(tokens, 6, "{text}");
    }
    let expected: HashSet<String> = prefill.iter().map(|e| e.url.clone()).collect();
    assert_eq!(
        prefilled_on, expected,
        "prefills routed over both prefill engines"
    );
    // Each engine ran its stage of every request, and only that (the role engines refuse the
    // other stage's requests, so any misrouting would have failed above).
    let submitted = |stats: serde_json::Value| stats["submitted"].as_u64().unwrap();
    let on_prefill = submitted(prefill[0].stats(&c).await) + submitted(prefill[1].stats(&c).await);
    assert_eq!((on_prefill, submitted(decode.stats(&c).await)), (4, 4));
    // The prefill stages' answers are their first tokens: observed as each endpoint's TTFT.
    let text = metrics_text(&c, &r.url).await;
    let ttfts: f64 = prefill
        .iter()
        .map(|e| {
            metric_sum(
                &text,
                &format!(
                    "qoe_router_time_to_first_token_seconds_count{{endpoint=\"{}\"}}",
                    e.url
                ),
            )
        })
        .sum();
    assert_eq!(ttfts, 4.0, "{text}");

    // A request that already names its stage is the client's own split: it goes as it is.
    let ans = post(
        &c,
        &format!("{}/v1/completions", r.url),
        &serde_json::json!({"model": MODEL, "prompt": "x", "max_tokens": 2,
            "kv_transfer_params": {"do_remote_decode": true}})
        .to_string(),
        &[],
    )
    .await;
    assert_eq!(ans.status, 200);
    assert!(expected.contains(&ans.header("x-qoe-endpoint")));
    assert!(ans.headers.get("x-qoe-prefill-endpoint").is_none());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A prefill engine that fails passes its error through; the decode engine is never asked.
#[tokio::test]
async fn a_failed_prefill_is_the_answer() {
    let prefill = Engine::start(&["--role", "prefill"]).await;
    let decode = Engine::start(&["--role", "decode"]).await;
    let (r, dir) = fleet(
        "fail",
        &[(&prefill.url, "prefill"), (&decode.url, "decode")],
    )
    .await;
    let c = client();
    // Longer than the tiny profile's context: the prefill engine refuses it with a 400.
    let long = "word ".repeat(40_000);
    let body = serde_json::json!({"model": MODEL, "prompt": long, "max_tokens": 4}).to_string();
    let ans = post(&c, &format!("{}/v1/completions", r.url), &body, &[]).await;
    assert_eq!(ans.status, 400, "{}", String::from_utf8_lossy(&ans.body));
    assert_eq!(ans.header("x-qoe-endpoint"), prefill.url);
    let stats = decode.stats(&c).await;
    assert_eq!(stats["submitted"], 0, "{stats}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// What one prefill cannot hand over is served whole: `n` > 1 and batched prompts are not split.
#[tokio::test]
async fn several_sequences_are_not_split() {
    let prefill = Engine::start(&["--role", "prefill"]).await;
    let decode = Engine::start(&["--role", "decode"]).await;
    let (r, dir) = fleet("n", &[(&prefill.url, "prefill"), (&decode.url, "decode")]).await;
    let c = client();
    for body in [
        serde_json::json!({"model": MODEL, "prompt": "x", "max_tokens": 3, "n": 2}),
        serde_json::json!({"model": MODEL, "prompt": ["a", "b"], "max_tokens": 3}),
    ] {
        let ans = complete(&c, &r, &body).await;
        assert_eq!(ans.status, 200, "{}", String::from_utf8_lossy(&ans.body));
        assert!(
            ans.headers.get("x-qoe-prefill-endpoint").is_none(),
            "{body}"
        );
        let v = ans.json();
        assert_eq!(v["choices"].as_array().unwrap().len(), 2, "{v}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A prefill endpoint that answers without `kv_transfer_params` (an engine without a KV
/// connector) is a 502 that names it; the decode engine is not asked.
#[tokio::test]
async fn a_prefill_answer_without_transfer_params_is_a_502_naming_the_endpoint() {
    let plain = mock(&[MODEL]).await;
    let decode = Engine::start(&["--role", "decode"]).await;
    let (r, dir) = fleet("plain", &[(&plain.url, "prefill"), (&decode.url, "decode")]).await;
    let c = client();
    let body = serde_json::json!({"model": MODEL, "prompt": "x", "max_tokens": 3,
        "min_tokens": 2, "logprobs": 1, "stream": true, "stream_options": {"include_usage": true}});
    let ans = complete(&c, &r, &body).await;
    assert_eq!(ans.status, 502, "{}", String::from_utf8_lossy(&ans.body));
    assert_eq!(ans.header("x-qoe-prefill-endpoint"), plain.url);
    let err = ans.json();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("kv_transfer_params"),
        "{err}"
    );
    // What the prefill stage was sent: one token, not streamed, without what asks for more.
    let seen = plain.requests();
    let completions: Vec<_> = seen
        .iter()
        .filter(|s| s.path.ends_with("completions"))
        .collect();
    assert_eq!(completions.len(), 1);
    let sent: serde_json::Value = serde_json::from_slice(&completions[0].body).unwrap();
    assert_eq!(
        (sent["max_tokens"].clone(), sent["stream"].clone()),
        (1.into(), false.into())
    );
    for gone in ["min_tokens", "logprobs", "stream_options"] {
        assert!(sent.get(gone).is_none(), "{gone}: {sent}");
    }
    assert_eq!(sent["kv_transfer_params"]["do_remote_decode"], true);
    assert_eq!(decode.stats(&c).await["submitted"], 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The decode stage is the client's request as the client wrote it, plus the prefill engine's
/// `kv_transfer_params`: key order and a seed beyond 64 bits survive the split.
#[tokio::test]
async fn the_decode_stage_gets_the_clients_bytes_and_the_transfer_params() {
    let prefill = Engine::start(&["--role", "prefill"]).await;
    let recorder = mock(&[MODEL]).await;
    let (r, dir) = fleet(
        "bytes",
        &[(&prefill.url, "prefill"), (&recorder.url, "decode")],
    )
    .await;
    let c = client();
    let body = format!(
        r#"{{"seed": 18446744073709551617, "model": "{MODEL}", "prompt": "x", "max_tokens": 3}}"#
    );
    let ans = post(&c, &format!("{}/v1/completions", r.url), &body, &[]).await;
    assert_eq!(ans.status, 200, "{}", String::from_utf8_lossy(&ans.body));
    assert_eq!(ans.header("x-qoe-prefill-endpoint"), prefill.url);
    let seen = recorder.requests();
    let sent = seen
        .iter()
        .find(|s| s.path.ends_with("completions"))
        .expect("the decode stage reached its endpoint");
    let sent = String::from_utf8(sent.body.to_vec()).unwrap();
    let (client_part, params) = sent
        .split_once(r#","kv_transfer_params":"#)
        .expect("transfer params added");
    assert_eq!(
        client_part,
        format!(r#"{{"seed":18446744073709551617,"model":"{MODEL}","prompt":"x","max_tokens":3"#)
    );
    let params: serde_json::Value =
        serde_json::from_str(params.strip_suffix('}').unwrap()).unwrap();
    assert_eq!(params["do_remote_prefill"], true, "{params}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A prefill answer is read loosely: only its `kv_transfer_params` (passed on) and its first
/// choice's `finish_reason` matter, whatever shape the rest has.
#[tokio::test]
async fn only_the_transfer_params_of_a_prefill_answer_matter() {
    let (prefill, decode) = (mock(&[MODEL]).await, mock(&[MODEL]).await);
    *prefill.state.fixed.lock().unwrap() = Some((
        200,
        r#"{"choices": null, "kv_transfer_params": {"remote_engine_id": "e-1"}, "kv_transfer_params": {"remote_engine_id": "e-2"}}"#.into(),
    ));
    let (r, dir) = fleet(
        "loose",
        &[(&prefill.url, "prefill"), (&decode.url, "decode")],
    )
    .await;
    let c = client();
    let body = serde_json::json!({"model": MODEL, "prompt": "x", "max_tokens": 3});
    let ans = complete(&c, &r, &body).await;
    assert_eq!(ans.status, 200, "{}", String::from_utf8_lossy(&ans.body));
    let sent = decode.requests();
    let sent = sent
        .iter()
        .find(|s| s.path.ends_with("completions"))
        .expect("the decode stage was sent");
    let sent: serde_json::Value = serde_json::from_slice(&sent.body).unwrap();
    // The last of a member sent twice, as a JSON parser reads it.
    assert_eq!(
        sent["kv_transfer_params"]["remote_engine_id"], "e-2",
        "{sent}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// With admission control (one request in flight per endpoint), concurrent split requests all
/// get through, each stage waiting for a seat of its own role (the lanes themselves:
/// `admission::tests::each_stage_waits_in_its_own_lane`).
#[tokio::test]
async fn split_requests_pass_admission_control_stage_by_stage() {
    let prefill = Engine::start(&["--role", "prefill"]).await;
    let decode = Engine::start(&["--role", "decode"]).await;
    let (r, dir) = fleet_with(
        "admit",
        &[(&prefill.url, "prefill"), (&decode.url, "decode")],
        &["--max-inflight-per-endpoint", "1", "--queue-timeout", "30"],
    )
    .await;
    let c = client();
    let body = serde_json::json!({"model": MODEL, "prompt": "a story", "max_tokens": 4,
        "ignore_eos": true});
    let answers = answers_of(
        (0..6)
            .map(|_| {
                let (c, r, body) = (c.clone(), r.url.clone(), body.to_string());
                tokio::spawn(
                    async move { post(&c, &format!("{r}/v1/completions"), &body, &[]).await },
                )
            })
            .collect(),
    )
    .await;
    for ans in answers {
        assert_eq!(ans.status, 200, "{}", String::from_utf8_lossy(&ans.body));
        assert_eq!(ans.header("x-qoe-endpoint"), decode.url);
    }
    assert_eq!(decode.stats(&c).await["submitted"], 6);
    let _ = std::fs::remove_dir_all(&dir);
}

async fn answers_of(tasks: Vec<tokio::task::JoinHandle<Answer>>) -> Vec<Answer> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(
            tokio::time::timeout(std::time::Duration::from_secs(60), t)
                .await
                .expect("answered in time")
                .unwrap(),
        );
    }
    out
}

/// With `--sla-enforcement shed`, a priority-3 request is shed before any engine works on it,
/// never at its decode stage once its prefill has run (the work would be lost, and paid again by
/// a client obeying Retry-After): a slow prefill past the deadline is decoded all the same.
#[tokio::test]
async fn a_split_request_is_not_shed_once_its_prefill_has_run() {
    let prefill = Engine::start(&["--role", "prefill", "--slowdown", "1000"]).await;
    let decode = Engine::start(&["--role", "decode"]).await;
    let (r, dir) = fleet_with(
        "sla-split",
        &[(&prefill.url, "prefill"), (&decode.url, "decode")],
        &["--routing-logic", "qoe", "--sla-enforcement", "shed"],
    )
    .await;
    let c = client();
    let body = serde_json::json!({
        "model": MODEL, "prompt": "context ".repeat(500), "max_tokens": 4, "ignore_eos": true,
    });
    let ans = post(
        &c,
        &format!("{}/v1/completions", r.url),
        &body.to_string(),
        &[("x-request-priority", "3"), ("x-sla-target-ms", "300")],
    )
    .await;
    assert_eq!(ans.status, 200, "{}", String::from_utf8_lossy(&ans.body));
    assert_eq!(ans.header("x-qoe-prefill-endpoint"), prefill.url);
    assert_eq!(ans.header("x-qoe-endpoint"), decode.url);
    std::fs::remove_dir_all(&dir).unwrap();
}
