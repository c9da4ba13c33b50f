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
    let dir = std::env::temp_dir().join(format!("qoe-pd-fail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = config(&dir, &[(&prefill.url, "prefill"), (&decode.url, "decode")]);
    let r = router(&["--config", path.to_str().unwrap(), "--max-retries", "0"]).await;
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
