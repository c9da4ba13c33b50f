//! Security over real sockets: API keys on the OpenAI routes, the admin key on `/engines` and
//! `/metrics`, keys kept out of logs and (by default) away from engines, CORS only when
//! configured, and upstream connections only to configured endpoints.

mod common;

use common::*;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

const KEY_A: &str = "sk-test-alpha-5f1c9a";
const KEY_B: &str = "sk-test-bravo-77d2e0";
const ADMIN: &str = "adm-test-charlie-0b6e";

/// Everything the router logs in this test binary (all tests share one global subscriber).
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_ansi(false)
            .with_writer(move || Capture(writer.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("first subscriber");
        buf
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

#[tokio::test]
async fn keys_guard_the_api_and_admin_routes_separately() {
    let logs = captured_logs();
    let engine = mock(&["m"]).await;
    let keys = format!("{KEY_A},{KEY_B}");
    let r = router(&[
        "--static-backends",
        &engine.url,
        "--api-keys",
        &keys,
        "--admin-api-key",
        ADMIN,
    ])
    .await;
    let c = client();
    let comp = format!("{}/v1/completions", r.url);
    let body = completion("m", "x", false);

    // No key, a wrong key, the wrong scheme, the admin key: 401 in OpenAI's shape.
    let wrong = "sk-test-alpha-5f1c9b";
    let admin = bearer(ADMIN);
    let wrong_bearer = bearer(wrong);
    let basic = format!("Basic {KEY_A}");
    for auth in [
        None,
        Some(wrong_bearer.as_str()),
        Some(&basic),
        Some(&admin),
    ] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        let ans = post(&c, &comp, &body, &headers).await;
        assert_eq!(ans.status, 401, "{auth:?}");
        assert_eq!(ans.header("www-authenticate"), "Bearer");
        let err = &ans.json()["error"];
        assert_eq!(err["type"], "invalid_request_error");
        assert_eq!(err["code"], "invalid_api_key");
        assert!(err["param"].is_null());
        let text = String::from_utf8_lossy(&ans.body);
        assert!(
            !text.contains(wrong) && !text.contains(ADMIN) && !text.contains(KEY_A),
            "the answer echoes no key: {text}"
        );
    }
    assert_eq!(
        engine.requests().len(),
        engine
            .requests()
            .iter()
            .filter(|s| !s.path.contains("completions"))
            .count(),
        "no refused request reached the engine"
    );
    // Either key works, whatever the scheme's case.
    for auth in [bearer(KEY_A), format!("bearer {KEY_B}")] {
        let ans = post(&c, &comp, &body, &[("authorization", &auth)]).await;
        assert_eq!(ans.status, 200, "{auth}");
    }
    // The router's keys stay at the router.
    let sent: Vec<_> = engine
        .requests()
        .into_iter()
        .filter(|s| s.path == "/v1/completions")
        .collect();
    assert_eq!(sent.len(), 2);
    assert!(sent
        .iter()
        .all(|s| !s.headers.contains_key("authorization")));

    // /v1/models and unknown paths need an API key too; /health never does.
    let key_a = bearer(KEY_A);
    let models = format!("{}/v1/models", r.url);
    assert_eq!(get_with(&c, &models, &[]).await.status, 401);
    assert_eq!(
        get_with(&c, &models, &[("authorization", &key_a)])
            .await
            .status,
        200
    );
    let nope = format!("{}/nope", r.url);
    assert_eq!(get_with(&c, &nope, &[]).await.status, 401);
    assert_eq!(
        get_with(&c, &nope, &[("authorization", &key_a)])
            .await
            .status,
        404
    );
    assert_eq!(
        get_with(&c, &format!("{}/health", r.url), &[]).await.status,
        200
    );

    // Admin routes: the admin key only.
    for path in ["/engines", "/metrics"] {
        let url = format!("{}{path}", r.url);
        assert_eq!(get_with(&c, &url, &[]).await.status, 401, "{path}");
        let ans = get_with(&c, &url, &[("authorization", &key_a)]).await;
        assert_eq!(ans.status, 401, "{path}: an API key is not an admin key");
        assert!(ans.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--admin-api-key"));
        assert_eq!(
            get_with(&c, &url, &[("authorization", &admin)])
                .await
                .status,
            200,
            "{path}"
        );
    }
    let metrics = get_with(
        &c,
        &format!("{}/metrics", r.url),
        &[("authorization", &admin)],
    )
    .await;
    let metrics = String::from_utf8_lossy(&metrics.body);
    assert!(
        metrics.contains("qoe_router_rejected_requests_total{code=\"401\"}"),
        "refusals are counted"
    );

    // Nothing logged a key, right or wrong.
    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        logs.contains("request rejected"),
        "the refusals were logged"
    );
    for secret in [KEY_A, KEY_B, ADMIN, wrong] {
        assert!(!logs.contains(secret), "{secret} appears in the logs");
    }
}

#[tokio::test]
async fn authorization_reaches_engines_only_when_the_router_does_not_own_it() {
    let _logs = captured_logs();
    let engine = mock(&["m"]).await;
    let c = client();
    let body = completion("m", "x", false);
    let last_auth = |engine: &Mock| {
        engine
            .requests()
            .iter()
            .rev()
            .find(|s| s.path == "/v1/completions")
            .and_then(|s| s.headers.get("authorization").cloned())
    };
    // Without --api-keys the router is transparent: an engine with its own key sees it.
    let r = router(&["--static-backends", &engine.url]).await;
    let ans = post(
        &c,
        &format!("{}/v1/completions", r.url),
        &body,
        &[("authorization", "Bearer engine-key")],
    )
    .await;
    assert_eq!(ans.status, 200);
    assert_eq!(last_auth(&engine).unwrap(), "Bearer engine-key");
    drop(r);
    // With --api-keys and --forward-authorization, the checked header goes on.
    let r = router(&[
        "--static-backends",
        &engine.url,
        "--api-keys",
        KEY_A,
        "--forward-authorization",
    ])
    .await;
    let auth = bearer(KEY_A);
    let ans = post(
        &c,
        &format!("{}/v1/completions", r.url),
        &body,
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(ans.status, 200);
    assert_eq!(last_auth(&engine).unwrap(), auth.as_str());
    // With --api-keys alone the admin routes stay open (documented; a warning is logged).
    assert_eq!(
        get_with(&c, &format!("{}/engines", r.url), &[])
            .await
            .status,
        200
    );
}

/// An engine run with vLLM's `--api-key` checks every `/v1` request, the router's own model
/// detection included: `--upstream-api-key` is what the router sends it, whatever the client sent.
#[tokio::test]
async fn the_upstream_key_goes_with_every_request_to_the_engines() {
    let _logs = captured_logs();
    let engine = mock(&["m"]).await;
    let r = router(&[
        "--static-backends",
        &engine.url,
        "--upstream-api-key",
        "sk-engine-delta-41",
        "--api-keys",
        KEY_A,
    ])
    .await;
    let c = client();
    let ans = post(
        &c,
        &format!("{}/v1/completions", r.url),
        &completion("m", "x", false),
        &[("authorization", &bearer(KEY_A))],
    )
    .await;
    assert_eq!(ans.status, 200);
    let requests = engine.requests();
    for path in ["/v1/models", "/v1/completions"] {
        let seen = requests.iter().find(|s| s.path == path).unwrap();
        assert_eq!(
            seen.headers
                .get_all("authorization")
                .iter()
                .collect::<Vec<_>>(),
            ["Bearer sk-engine-delta-41"],
            "{path}"
        );
    }
    // It and --forward-authorization would both say what the engines get.
    let both = qoe_router::RouterConfig::from_args([
        "x",
        "--upstream-api-key",
        "k",
        "--forward-authorization",
    ])
    .unwrap();
    assert!(both
        .validate()
        .unwrap_err()
        .to_string()
        .contains("--upstream-api-key"));
    let printed = qoe_router::RouterConfig::from_args(["x", "--upstream-api-key", "sk-hidden-9"])
        .unwrap()
        .effective_toml()
        .unwrap();
    assert!(
        !printed.contains("sk-hidden-9") && printed.contains("upstream_api_key: set"),
        "{printed}"
    );
}

/// A key bound to a priority sets its requests' priority: the key's without the header, the
/// header's only when it is lower. Keys without one leave the header the client's word. Seen in
/// the `priority` field the router writes for engines that schedule by it.
#[tokio::test]
async fn keys_bound_to_a_priority_cap_what_the_header_may_ask() {
    let engine = mock(&["m"]).await;
    let r = router(&[
        "--static-backends",
        &engine.url,
        "--engine-priority",
        "--api-keys",
        KEY_A,
        "--api-key-priorities",
        "sk-gold=1,sk-batch==3",
    ])
    .await;
    let c = client();
    let cases = [
        ("sk-gold", None, 1),
        ("sk-gold", Some("2"), 2),
        ("sk-gold", Some("1"), 1),
        // The last `=` splits: this key is `sk-batch=`.
        ("sk-batch=", None, 3),
        ("sk-batch=", Some("1"), 3),
        (KEY_A, Some("1"), 1),
        (KEY_A, None, 2),
    ];
    let complete = |headers: Vec<(&'static str, String)>| {
        let (c, url) = (c.clone(), format!("{}/v1/completions", r.url));
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            post(&c, &url, &completion("m", "x", false), &headers)
                .await
                .status
        }
    };
    for (key, header, _) in cases {
        let mut headers = vec![("authorization", bearer(key))];
        if let Some(level) = header {
            headers.push(("x-request-priority", level.to_string()));
        }
        assert_eq!(complete(headers).await, 200, "{key} {header:?}");
    }
    let sent: Vec<i64> = engine
        .requests()
        .iter()
        .filter(|s| s.path == "/v1/completions")
        .map(|s| {
            serde_json::from_slice::<serde_json::Value>(&s.body).unwrap()["priority"]
                .as_i64()
                .unwrap()
        })
        .collect();
    let expected: Vec<i64> = cases.iter().map(|c| c.2).collect();
    assert_eq!(sent, expected);
    // vLLM's own field in the body is capped too, on the scale the engines see. With
    // --engine-priority the router's: a batch key's -100 runs as 3, not first; a priority-1 key
    // may ask for 5. Without it vLLM's own, where a request without the field runs at 0: no key
    // may run ahead of that, and a priority-1 key's 0 stays 0.
    let native = router(&[
        "--static-backends",
        &engine.url,
        "--api-key-priorities",
        "sk-gold=1,sk-batch==3",
    ])
    .await;
    let with_field =
        |field: &str| format!(r#"{{"model":"m","prompt":"x","max_tokens":2,"priority":{field}}}"#);
    for (url, key, field, capped) in [
        (&r.url, "sk-batch=", "-100", "3"),
        (&r.url, "sk-batch=", "null", "3"),
        (&r.url, "sk-gold", "5", "5"),
        (&native.url, "sk-gold", "0", "0"),
        (&native.url, "sk-gold", "-1", "0"),
        (&native.url, "sk-batch=", "-100", "0"),
        (&native.url, "sk-batch=", "2", "2"),
    ] {
        let headers = [("authorization", bearer(key))];
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let ans = post(
            &c,
            &format!("{url}/v1/completions"),
            &with_field(field),
            &headers,
        )
        .await;
        assert_eq!(ans.status, 200);
        // The last completion: both routers' health checks reach the engine meanwhile.
        let seen = engine.requests();
        let last = seen.iter().rev().find(|s| s.path == "/v1/completions");
        let last = String::from_utf8(last.unwrap().body.to_vec()).unwrap();
        assert_eq!(last, with_field(capped), "{url} {key} {field}");
    }
    // The bound keys are API keys like the others: without one, or with another, 401.
    for auth in [None, Some(bearer("sk-batch")), Some(bearer("sk-gold=1"))] {
        let headers = auth.iter().map(|a| ("authorization", a.clone())).collect();
        assert_eq!(complete(headers).await, 401, "{auth:?}");
    }
    // The router owns these keys: the client's Authorization stays here.
    assert!(engine
        .requests()
        .iter()
        .all(|s| s.headers.get("authorization").is_none()));
}

#[test]
fn priority_keys_are_checked_and_never_printed() {
    let parse = |value: &str| {
        qoe_router::RouterConfig::from_args(["x", "--api-key-priorities", value])
            .map_err(|e| e.to_string())
            .and_then(|c| c.validate().map(|()| c).map_err(|e| e.to_string()))
    };
    for bad in [
        "sk-x",
        "sk-x=0",
        "sk-x=4",
        "sk-x=high",
        "=1",
        "a b=1",
        "k=1,k=2",
    ] {
        let err = parse(bad).expect_err(bad);
        assert!(err.contains("--api-key-priorities"), "{bad}: {err}");
        // The message never shows the key.
        assert!(
            !err.contains("sk-x") && !err.contains("a b"),
            "{bad}: {err}"
        );
    }
    // Nor does the config file's error for a value of the wrong type.
    let dir = std::env::temp_dir().join(format!("qoe-keyprio-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("router.toml");
    for text in [
        "api_key_priorities = \"sk-hidden-file=1\"\n",
        "api_keys = \"sk-hidden-file\"\n",
    ] {
        std::fs::write(&path, text).unwrap();
        let err = qoe_router::RouterConfig::from_args(["x", "--config", path.to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected a list of strings"), "{err}");
        assert!(!err.contains("sk-hidden"), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let config = parse("sk-hidden-gold=1,sk-hidden-gold=1").unwrap();
    assert!(config.checks_api_keys());
    let printed = format!("{config:?}\n{}", config.effective_toml().unwrap());
    assert!(!printed.contains("sk-hidden"), "{printed}");
    assert!(
        printed.contains("# api_key_priorities: 2 set, not printed"),
        "{printed}"
    );
}

/// A request whose client leaves before any answer (here while its engine is silent) still
/// logs its line, status 499. (In this binary because it holds the log capture.)
#[tokio::test]
async fn a_request_left_before_its_answer_logs_a_line() {
    let logs = captured_logs();
    let engine = mock(&["m"]).await;
    *engine.state.first_chunk_delay_ms.lock().unwrap() = 10_000;
    let r = router(&["--static-backends", &engine.url]).await;
    let c = client();
    let id = "left-before-the-answer-7c1";
    let url = format!("{}/v1/completions", r.url);
    let body = completion("m", "x", false);
    let left = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        post(&c, &url, &body, &[("x-request-id", id)]),
    )
    .await;
    assert!(left.is_err(), "the client left before the answer");
    drop(c);
    let mut line = None;
    for _ in 0..500 {
        let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
        line = text
            .lines()
            .find(|l| l.contains(id) && l.contains("before an answer"))
            .map(str::to_string);
        if line.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let line = line.expect("a log line for the request");
    assert!(
        line.contains("status=499") && line.contains("client_closed"),
        "{line}"
    );
}

#[tokio::test]
async fn config_debug_output_hides_keys() {
    let config = qoe_router::RouterConfig::from_args([
        "x",
        "--api-keys",
        "sk-visible-nowhere-1,sk-visible-nowhere-2",
        "--admin-api-key",
        "adm-visible-nowhere",
    ])
    .unwrap();
    config.validate().unwrap();
    let debug = format!("{config:?}");
    assert!(!debug.contains("visible-nowhere"), "{debug}");
    assert_eq!(config.api_keys.len(), 2);
    // The same key for API and admin is refused; so is a key with a space.
    for (flag, value) in [("--api-keys", "k1"), ("--api-key-priorities", "k1=1")] {
        let same = qoe_router::RouterConfig::from_args(["x", flag, value, "--admin-api-key", "k1"])
            .unwrap();
        assert!(same
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--admin-api-key"));
    }
    let spaced = qoe_router::RouterConfig::from_args(["x", "--api-keys", "a b"]).unwrap();
    assert!(spaced.validate().is_err());
}

#[tokio::test]
async fn no_cors_unless_configured() {
    let _logs = captured_logs();
    let engine = mock(&["m"]).await;
    // vLLM allows every origin by default: the engine's own CORS headers must not leak through.
    *engine.state.extra_headers.lock().unwrap() = vec![
        ("access-control-allow-origin".into(), "*".into()),
        ("access-control-allow-credentials".into(), "true".into()),
    ];
    let c = client();
    let body = completion("m", "x", false);
    let origin = [("origin", "https://app.example")];
    let r = router(&["--static-backends", &engine.url]).await;
    let ans = post(&c, &format!("{}/v1/completions", r.url), &body, &origin).await;
    assert_eq!(ans.status, 200);
    assert!(
        ans.headers
            .keys()
            .all(|k| !k.as_str().starts_with("access-control-")),
        "{:?}",
        ans.headers
    );
    drop(r);

    let r = router(&[
        "--static-backends",
        &engine.url,
        "--cors-allow-origin",
        "https://app.example",
        "--api-keys",
        KEY_A,
    ])
    .await;
    let url = format!("{}/v1/chat/completions", r.url);
    // A preflight is answered by the router, without a key, and never proxied.
    let chats = |engine: &Mock| {
        engine
            .requests()
            .iter()
            .filter(|s| s.path == "/v1/chat/completions")
            .count()
    };
    let pre = request(
        &c,
        "OPTIONS",
        &url,
        "",
        &[
            ("origin", "https://app.example"),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization, content-type, x-request-priority",
            ),
        ],
    )
    .await;
    assert_eq!(pre.status, 204);
    assert_eq!(
        pre.header("access-control-allow-origin"),
        "https://app.example"
    );
    assert!(pre.header("access-control-allow-methods").contains("POST"));
    let allowed = pre.header("access-control-allow-headers");
    for h in ["authorization", "content-type", "x-request-priority"] {
        assert!(allowed.contains(h), "{allowed}");
    }
    assert_eq!(chats(&engine), 0, "the preflight was not proxied");
    // From another origin: no CORS headers (the browser refuses).
    let pre = request(
        &c,
        "OPTIONS",
        &url,
        "",
        &[
            ("origin", "https://evil.example"),
            ("access-control-request-method", "POST"),
        ],
    )
    .await;
    assert!(pre.header("access-control-allow-origin").is_empty());
    // Actual requests: the allowed origin gets our headers (and no credentials flag); errors too.
    let auth = bearer(KEY_A);
    let comp = format!("{}/v1/completions", r.url);
    let ans = post(
        &c,
        &comp,
        &body,
        &[("origin", "https://app.example"), ("authorization", &auth)],
    )
    .await;
    assert_eq!(ans.status, 200);
    assert_eq!(
        ans.header("access-control-allow-origin"),
        "https://app.example"
    );
    assert!(ans
        .header("access-control-expose-headers")
        .contains("x-qoe-endpoint"));
    assert!(ans.header("access-control-allow-credentials").is_empty());
    let refused = post(&c, &comp, &body, &[("origin", "https://app.example")]).await;
    assert_eq!(refused.status, 401);
    assert_eq!(
        refused.header("access-control-allow-origin"),
        "https://app.example"
    );
    let other = post(
        &c,
        &comp,
        &body,
        &[("origin", "https://evil.example"), ("authorization", &auth)],
    )
    .await;
    assert_eq!(other.status, 200);
    assert!(other.header("access-control-allow-origin").is_empty());
}

#[tokio::test]
async fn the_router_connects_only_to_configured_endpoints() {
    let _logs = captured_logs();
    let (configured, elsewhere) = (mock(&["m"]).await, mock(&["m"]).await);
    let r = router(&["--static-backends", &configured.url]).await;
    let router_host = r.url.trim_start_matches("http://");
    let other_host = elsewhere.url.trim_start_matches("http://");
    let body = completion("m", "x", false);
    let absolute = format!("http://{other_host}/v1/completions");
    let forwarded = format!("x-forwarded-host: {other_host}");
    // (request-target, Host header, extra lines)
    let cases: [(&str, &str, Vec<&[u8]>); 4] = [
        // Absolute-form URI naming another server (as sent to a forward proxy).
        (&absolute, other_host, vec![]),
        // Origin-form with a Host header naming another server.
        ("/v1/completions", other_host, vec![]),
        // Forwarding headers naming another server.
        ("/v1/completions", router_host, vec![forwarded.as_bytes()]),
        // A path that looks like a network-path reference.
        (
            &format!("//{other_host}/v1/completions"),
            router_host,
            vec![],
        ),
    ];
    for (target, host, extra) in &cases {
        let ans = raw(&r.url, &raw_post(target, host, extra, body.as_bytes())).await;
        if target.starts_with("//") {
            // Not a route the router serves.
            assert_eq!(ans.status, 404, "{target}: {}", ans.head);
        } else {
            assert_eq!(ans.status, 200, "{target}: {}", ans.head);
            assert!(
                ans.head
                    .to_ascii_lowercase()
                    .contains(&format!("x-qoe-endpoint: {}", configured.url)),
                "{}",
                ans.head
            );
        }
    }
    let served = configured
        .requests()
        .iter()
        .filter(|s| s.path == "/v1/completions")
        .count();
    assert_eq!(
        served, 3,
        "every routable request went to the configured endpoint"
    );
    assert!(
        elsewhere.requests().is_empty(),
        "the router never connected to an address taken from a request: {:?}",
        elsewhere
            .requests()
            .iter()
            .map(|s| &s.path)
            .collect::<Vec<_>>()
    );
}

/// Past `--max-connections` a new connection is closed at once and counted; once the open ones
/// end, connections are served again.
#[tokio::test]
async fn connections_past_the_limit_are_closed_at_once() {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let engine = mock(&["m"]).await;
    let r = router(&["--static-backends", &engine.url, "--max-connections", "3"]).await;
    let addr = r.url.trim_start_matches("http://").to_string();
    // Keep-alive connections, each served once and held open, until one is refused (the test
    // harness's own client may still hold one).
    let mut held = Vec::new();
    let refused = loop {
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let _ = conn
            .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            .await;
        let mut answer = [0u8; 12];
        let read = tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut answer))
            .await
            .expect("answered or closed, not left waiting");
        match read {
            Ok(_) => {
                assert_eq!(&answer, b"HTTP/1.1 200");
                held.push(conn);
                assert!(held.len() <= 3, "the limit holds");
            }
            Err(_) => break held.len(),
        }
    };
    assert!(refused >= 2, "served up to the limit first: {refused}");
    drop(held);
    // Once the router has seen them go, connections are served again.
    let c = client();
    let mut text = String::new();
    for _ in 0..200 {
        if let Ok(ans) = get(&c, &format!("{}/metrics", r.url)).await {
            text = String::from_utf8_lossy(&ans.body).into_owned();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        metric_sum(&text, "qoe_router_connections_refused_total") >= 1.0,
        "{text}"
    );
}
