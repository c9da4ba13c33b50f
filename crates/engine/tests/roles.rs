//! Disaggregated serving as FIELD-NOTES describes it: the prefill engine returns
//! `kv_transfer_params`, the decode engine takes them and skips the prefill.

mod common;

use common::*;
use qoe_engine::{EngineArgs, Role};
use serde_json::{json, Value};

fn prefill_stage(prompt: &str) -> Value {
    json!({
        "model": "m", "prompt": prompt, "max_tokens": 1, "stream": false,
        "kv_transfer_params": {"do_remote_decode": true, "do_remote_prefill": false,
            "remote_engine_id": null, "remote_block_ids": null, "remote_host": null, "remote_port": null}
    })
}

#[tokio::test]
async fn prefill_then_decode() {
    bounded(async {
        let p = Server::start(EngineArgs {
            role: Role::Prefill,
            engine_id: Some("p-0".into()),
            ..tiny_args()
        })
        .await;
        let d = Server::start(EngineArgs {
            role: Role::Decode,
            ..tiny_args()
        })
        .await;
        let prompt = "q".repeat(1000); // 250 tokens, 16 blocks

        let r = p
            .post_json("/v1/completions", &prefill_stage(&prompt))
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        assert_eq!(v["usage"]["completion_tokens"], 1);
        let kv = v["kv_transfer_params"].clone();
        assert_eq!(kv["do_remote_prefill"], true);
        assert_eq!(kv["do_remote_decode"], false);
        assert_eq!(kv["remote_engine_id"], "p-0");
        assert_eq!(kv["remote_host"], "127.0.0.1");
        assert_eq!(kv["remote_port"], p.addr.port());
        assert_eq!(kv["remote_block_ids"].as_array().unwrap().len(), 16);
        assert_eq!(p.metric("vllm:prompt_tokens_total{").await, 250.0);

        // The original request, with the prefill engine's params, streams from the decode engine.
        let mut c = d
            .open(
                "/v1/completions",
                &json!({"model": "m", "prompt": prompt, "max_tokens": 8, "ignore_eos": true,
                        "stream": true, "kv_transfer_params": kv}),
            )
            .await;
        assert_eq!(c.status, 200);
        let ev = c.events().await.unwrap();
        assert_eq!(ev.len(), 9);
        assert_eq!(ev[8], "[DONE]");
        let text = d.get("/metrics").await.body;
        // No prefix lookup: the KV came by transfer; the prompt still counts as processed.
        assert_eq!(
            metric_in(&text, "vllm:prefix_cache_queries_total{"),
            Some(0.0)
        );
        assert_eq!(metric_in(&text, "vllm:prompt_tokens_total{"), Some(250.0));
        assert_eq!(metric_in(&text, "vllm:generation_tokens_total{"), Some(8.0));
        // Non-disaggregated requests are still served by both.
        for s in [&p, &d] {
            let r = s
                .post_json(
                    "/v1/completions",
                    &json!({"model": "m", "prompt": "x", "max_tokens": 2}),
                )
                .await;
            assert_eq!(r.status, 200);
            assert_eq!(r.json()["kv_transfer_params"], Value::Null);
        }
    })
    .await
}

#[tokio::test]
async fn a_stage_sent_to_the_wrong_role_is_refused() {
    bounded(async {
        let p = Server::start(EngineArgs { role: Role::Prefill, ..tiny_args() }).await;
        let d = Server::start(EngineArgs { role: Role::Decode, ..tiny_args() }).await;
        let r = d.post_json("/v1/completions", &prefill_stage("abc")).await;
        assert_eq!(r.status, 400);
        assert_eq!(r.json()["error"]["param"], "kv_transfer_params");
        let decode_stage = json!({"model": "m", "prompt": "abc", "max_tokens": 2, "kv_transfer_params": {
            "do_remote_prefill": true, "remote_engine_id": "x", "remote_block_ids": [1],
            "remote_host": "127.0.0.1", "remote_port": 1}});
        let r = p.post_json("/v1/completions", &decode_stage).await;
        assert_eq!(r.status, 400);
        // A decode stage without the prefill engine's coordinates is malformed.
        let r = d
            .post_json("/v1/completions", &json!({"model": "m", "prompt": "abc",
                "kv_transfer_params": {"do_remote_prefill": true}}))
            .await;
        assert_eq!(r.status, 400);
        assert!(r.json()["error"]["message"].as_str().unwrap().contains("remote_engine_id"));
        // `both` serves either stage.
        let b = Server::start(tiny_args()).await;
        assert_eq!(b.post_json("/v1/completions", &prefill_stage("abc")).await.status, 200);
        assert_eq!(b.post_json("/v1/completions", &decode_stage).await.status, 200);
    })
    .await
}
