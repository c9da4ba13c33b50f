//! Bad input over real sockets: every malformed request gets a clear 4xx in OpenAI's shape (or,
//! beyond hyper's own parser limits, hyper's bare 4xx), and nothing bad reaches an engine.

mod common;

use common::*;

fn completions_seen(engine: &Mock) -> usize {
    engine
        .requests()
        .iter()
        .filter(|s| s.path.ends_with("completions"))
        .count()
}

/// Checks an OpenAI-shaped error: `{"error": {"message", "type", "param", "code"}}`.
fn assert_openai_error(body: &str, status: u16, param: Option<&str>) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {body:?}"));
    let err = &v["error"];
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(err["type"].is_string(), "{body}");
    assert!(err["code"].is_string(), "{body}");
    assert_eq!(err["param"].as_str(), param, "{body}");
    err.clone()
}

#[tokio::test]
async fn wrong_types_and_values_name_the_param() {
    let engine = mock(&["m"]).await;
    let r = router(&["--static-backends", &engine.url]).await;
    let c = client();
    let chat = format!("{}/v1/chat/completions", r.url);
    let comp = format!("{}/v1/completions", r.url);
    // (url, body, headers, the `param` the error names)
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], Option<&'a str>);
    let cases: &[Case] = &[
        (&comp, "", &[], None),
        (&comp, "[]", &[], None),
        (&comp, "null", &[], None),
        (&comp, r#""a string""#, &[], None),
        (&comp, r#"{"model":5,"prompt":"x"}"#, &[], Some("model")),
        (
            &comp,
            r#"{"model":"m","prompt":"x","max_tokens":-1}"#,
            &[],
            Some("max_tokens"),
        ),
        (
            &comp,
            r#"{"model":"m","prompt":"x","max_tokens":1.5}"#,
            &[],
            Some("max_tokens"),
        ),
        (
            &chat,
            r#"{"model":"m","messages":[],"max_completion_tokens":[1]}"#,
            &[],
            Some("max_completion_tokens"),
        ),
        (
            &comp,
            r#"{"model":"m","prompt":"x","stream":"maybe"}"#,
            &[],
            Some("stream"),
        ),
        (&comp, r#"{"model":"m","prompt":{}}"#, &[], Some("prompt")),
        (&comp, r#"{"model":"m","prompt":[{}]}"#, &[], Some("prompt")),
        (
            &chat,
            r#"{"model":"m","messages":"hi"}"#,
            &[],
            Some("messages"),
        ),
        (
            &chat,
            r#"{"model":"m","messages":[1]}"#,
            &[],
            Some("messages"),
        ),
        (
            &chat,
            r#"{"model":"m","messages":[{"role":"user","content":5}]}"#,
            &[],
            Some("messages"),
        ),
        (&chat, r#"{"model":"m"}"#, &[], Some("messages")),
    ];
    for (url, body, headers, param) in cases {
        let ans = post(&c, url, body, headers).await;
        assert_eq!(ans.status, 400, "{body}");
        let err = assert_openai_error(&String::from_utf8_lossy(&ans.body), 400, *param);
        assert_eq!(err["type"], "invalid_request_error");
        assert_eq!(err["code"], "bad_request");
    }
    // Header values: priority 0, 4, abc, 1.5, empty; SLA negative, zero, too long, not a number;
    // expected output negative or zero.
    let body = completion("m", "x", false);
    let header_cases: &[(&str, &str)] = &[
        ("x-request-priority", "0"),
        ("x-request-priority", "4"),
        ("x-request-priority", "abc"),
        ("x-request-priority", "1.5"),
        ("x-request-priority", ""),
        ("x-request-priority", "-1"),
        ("x-sla-target-ms", "-5"),
        ("x-sla-target-ms", "0"),
        ("x-sla-target-ms", "3600001"),
        ("x-sla-target-ms", "1e3"),
        ("x-expected-output-tokens", "-3"),
        ("x-expected-output-tokens", "0"),
    ];
    for (name, value) in header_cases {
        let ans = post(&c, &comp, &body, &[(name, value)]).await;
        assert_eq!(ans.status, 400, "{name}: {value:?}");
        let err = assert_openai_error(&String::from_utf8_lossy(&ans.body), 400, Some(name));
        let message = err["message"].as_str().unwrap();
        assert!(message.contains(&format!("'{value}'")), "{message}");
    }
    assert_eq!(
        completions_seen(&engine),
        0,
        "nothing bad reached the engine"
    );
    // A valid request still goes through.
    assert_eq!(post(&c, &comp, &body, &[]).await.status, 200);
}

#[tokio::test]
async fn invalid_utf8_in_the_body_and_in_header_values() {
    let engine = mock(&["m"]).await;
    let r = router(&["--static-backends", &engine.url]).await;
    let host = r.url.trim_start_matches("http://");
    // Invalid UTF-8 inside a JSON string.
    let body = b"{\"model\":\"m\",\"prompt\":\"\xff\xfe\xc3\"}";
    let ans = raw(&r.url, &raw_post("/v1/completions", host, &[], body)).await;
    assert_eq!(ans.status, 400, "{ans:?}");
    let err = assert_openai_error(&ans.body, 400, None);
    assert!(
        err["message"].as_str().unwrap().contains("not valid JSON"),
        "{err}"
    );
    // Invalid UTF-8 (obs-text bytes, which HTTP/1.1 parsers accept) in the headers the router reads.
    let good = br#"{"model":"m","prompt":"x","max_tokens":2}"#;
    for name in [
        "x-request-priority",
        "x-sla-target-ms",
        "x-expected-output-tokens",
    ] {
        let line = [name.as_bytes(), b": 1\xff\xfe"].concat();
        let ans = raw(&r.url, &raw_post("/v1/completions", host, &[&line], good)).await;
        assert_eq!(ans.status, 400, "{name}: {ans:?}");
        assert_openai_error(&ans.body, 400, Some(name));
    }
    assert_eq!(completions_seen(&engine), 0);
    // In a header the router does not read, such bytes pass through untouched.
    let ans = raw(
        &r.url,
        &raw_post("/v1/completions", host, &[b"x-vendor-tag: caf\xe9"], good),
    )
    .await;
    assert_eq!(ans.status, 200, "{ans:?}");
    let seen = engine.requests();
    let last = seen.last().unwrap();
    assert_eq!(last.headers["x-vendor-tag"].as_bytes(), b"caf\xe9");
    // A wrong or missing key on a route with keys: see tests/security.rs.
}

/// A QoE header sent twice with different values is refused, naming it; twice the same is fine.
#[tokio::test]
async fn a_qoe_header_given_twice_with_different_values_is_refused() {
    let engine = mock(&["m"]).await;
    let r = router(&["--static-backends", &engine.url]).await;
    let host = r.url.trim_start_matches("http://");
    let good = br#"{"model":"m","prompt":"x","max_tokens":2}"#;
    for (name, a, b) in [
        ("x-request-priority", "1", "3"),
        ("x-sla-target-ms", "500", "2000"),
        ("x-expected-output-tokens", "10", "900"),
    ] {
        let (first, second) = (format!("{name}: {a}"), format!("{name}: {b}"));
        let lines: [&[u8]; 3] = [first.as_bytes(), b"x-other: y", second.as_bytes()];
        let ans = raw(&r.url, &raw_post("/v1/completions", host, &lines, good)).await;
        assert_eq!(ans.status, 400, "{name}: {ans:?}");
        let err = assert_openai_error(&ans.body, 400, Some(name));
        let message = err["message"].as_str().unwrap();
        assert!(
            message.contains("more than once") && message.contains(&format!("'{a}', '{b}'")),
            "{message}"
        );
        let same = [first.as_bytes(), first.as_bytes()];
        let ans = raw(&r.url, &raw_post("/v1/completions", host, &same, good)).await;
        assert_eq!(ans.status, 200, "{name} twice alike: {ans:?}");
    }
    assert_eq!(completions_seen(&engine), 3, "only the unambiguous ones");
}

#[tokio::test]
async fn huge_and_malformed_headers_are_refused() {
    let engine = mock(&["m"]).await;
    let r = router(&["--static-backends", &engine.url]).await;
    let host = r.url.trim_start_matches("http://");
    let good = br#"{"model":"m","prompt":"x","max_tokens":2}"#;

    // Over --max-header-bytes (32 KiB by default), within hyper's buffer: an OpenAI-shaped 431.
    let line = format!("x-big: {}", "a".repeat(40 * 1024));
    let ans = raw(
        &r.url,
        &raw_post("/v1/completions", host, &[line.as_bytes()], good),
    )
    .await;
    assert_eq!(ans.status, 431, "{}", ans.head);
    let err = assert_openai_error(&ans.body, 431, None);
    assert_eq!(err["type"], "invalid_request_error");
    assert!(err["message"]
        .as_str()
        .unwrap()
        .contains("--max-header-bytes"));
    // Many small headers that add up: the same.
    let lines: Vec<String> = (0..90)
        .map(|i| format!("x-h{i}: {}", "b".repeat(400)))
        .collect();
    let refs: Vec<&[u8]> = lines.iter().map(|l| l.as_bytes()).collect();
    let ans = raw(&r.url, &raw_post("/v1/completions", host, &refs, good)).await;
    assert_eq!(ans.status, 431, "{}", ans.head);
    assert_openai_error(&ans.body, 431, None);

    // Beyond hyper's own limits (about 400 KiB of head, or more than 100 headers) hyper answers
    // before the router sees anything: a bare 431, and the connection is closed.
    let line = format!("x-huge: {}", "a".repeat(600 * 1024));
    let ans = raw(
        &r.url,
        &raw_post("/v1/completions", host, &[line.as_bytes()], good),
    )
    .await;
    assert_eq!(ans.status, 431, "{}", ans.head);
    let lines: Vec<String> = (0..150).map(|i| format!("x-n{i}: 1")).collect();
    let refs: Vec<&[u8]> = lines.iter().map(|l| l.as_bytes()).collect();
    let ans = raw(&r.url, &raw_post("/v1/completions", host, &refs, good)).await;
    assert_eq!(ans.status, 431, "{}", ans.head);

    // A control character in a header value, or a header line without a colon: not HTTP; hyper
    // answers a bare 400.
    for line in [&b"x-bad: a\x01b"[..], b"no-colon-here"] {
        let ans = raw(&r.url, &raw_post("/v1/completions", host, &[line], good)).await;
        assert_eq!(ans.status, 400, "{line:?}: {}", ans.head);
    }
    assert_eq!(completions_seen(&engine), 0, "nothing reached the engine");
    // The router is unharmed.
    let c = client();
    let ans = post_completion(&c, &r.url).await;
    assert_eq!(ans.status, 200);
}

#[tokio::test]
async fn oversized_bodies_without_content_length_are_refused() {
    let engine = mock(&["m"]).await;
    let r = router(&["--static-backends", &engine.url, "--max-body-bytes", "1000"]).await;
    let host = r.url.trim_start_matches("http://");
    // Chunked, so the size is only known while reading.
    let payload = format!(r#"{{"model":"m","prompt":"{}"}}"#, "a".repeat(3000));
    let mut req = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n",
        payload.len()
    )
    .into_bytes();
    req.extend_from_slice(payload.as_bytes());
    req.extend_from_slice(b"\r\n0\r\n\r\n");
    let ans = raw(&r.url, &req).await;
    assert_eq!(ans.status, 413, "{}", ans.head);
    let err = assert_openai_error(&ans.body, 413, None);
    assert_eq!(err["code"], "request_too_large");
    assert_eq!(completions_seen(&engine), 0);
}

/// A body that arrives in many chunks reaches the engine whole, byte for byte.
#[tokio::test]
async fn a_body_in_many_chunks_is_forwarded_whole() {
    let engine = mock(&["m"]).await;
    let r = router(&["--static-backends", &engine.url]).await;
    let host = r.url.trim_start_matches("http://");
    let payload = format!(r#"{{"model":"m","prompt":"{}"}}"#, "chunk ".repeat(50));
    let mut req = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )
    .into_bytes();
    for piece in payload.as_bytes().chunks(7) {
        req.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        req.extend_from_slice(piece);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let ans = raw(&r.url, &req).await;
    assert_eq!(ans.status, 200, "{}", ans.head);
    let seen = engine.requests();
    let forwarded = seen
        .iter()
        .find(|s| s.path == "/v1/completions")
        .expect("forwarded");
    assert_eq!(forwarded.body, payload.as_bytes());
}

/// The router's own routes, unknown paths and key refusals answer in OpenAI's shape too, with the
/// request's id.
#[tokio::test]
async fn wrong_methods_unknown_routes_and_refusals_are_openai_errors() {
    let engine = mock(&["m"]).await;
    let r = router(&[
        "--static-backends",
        &engine.url,
        "--api-keys",
        "sk-test-key-0001",
    ])
    .await;
    let c = client();
    let key = [("authorization", "Bearer sk-test-key-0001")];
    let ans = request(&c, "POST", &format!("{}/v1/models", r.url), "{}", &key).await;
    assert_eq!(ans.status, 405);
    let err = assert_openai_error(std::str::from_utf8(&ans.body).unwrap(), 405, None);
    assert_eq!(err["code"], "method_not_allowed");
    assert!(err["message"].as_str().unwrap().contains("use GET"));
    assert_eq!(ans.header("allow"), "GET, HEAD");
    let ans = request(&c, "DELETE", &format!("{}/health", r.url), "", &[]).await;
    assert_eq!(ans.status, 405);
    // A proxied route vLLM serves for POST only: 405 from the router, in its shape.
    for (method, body) in [("GET", ""), ("PUT", "{\"model\":\"m\"}")] {
        let url = format!("{}/v1/chat/completions", r.url);
        let ans = request(&c, method, &url, body, &key).await;
        assert_eq!(ans.status, 405, "{method}");
        let err = assert_openai_error(std::str::from_utf8(&ans.body).unwrap(), 405, None);
        assert!(
            err["message"].as_str().unwrap().contains("use POST"),
            "{err}"
        );
        assert_eq!(ans.header("allow"), "POST");
    }

    // TRACE (it would echo the credentials back), CONNECT and extension methods go nowhere.
    for method in ["TRACE", "CONNECT", "PROPFIND"] {
        let url = format!("{}/v1/models/m", r.url);
        let ans = request(&c, method, &url, "", &key).await;
        assert_eq!(ans.status, 405, "{method}");
        let err = assert_openai_error(std::str::from_utf8(&ans.body).unwrap(), 405, None);
        let message = err["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("{method} is not allowed")),
            "{message}"
        );
        assert_eq!(
            ans.header("allow"),
            "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
        );
    }
    assert!(
        !engine.requests().iter().any(|s| s.path == "/v1/models/m"),
        "nothing reached the engine"
    );

    let ans = request(&c, "GET", &format!("{}/nope", r.url), "", &key).await;
    assert_eq!(ans.status, 404);
    let err = assert_openai_error(std::str::from_utf8(&ans.body).unwrap(), 404, None);
    assert_eq!(err["code"], "unknown_route");

    let id = [("x-request-id", "client-id-7")];
    let ans = post(&c, &format!("{}/v1/completions", r.url), "{}", &id).await;
    assert_eq!(ans.status, 401);
    assert_eq!(ans.header("x-request-id"), "client-id-7");
    // The router's own routes answer with the request's id too, or a new one.
    let ans = get_with(&c, &format!("{}/health", r.url), &id).await;
    assert_eq!(ans.header("x-request-id"), "client-id-7");
    let ans = get_with(&c, &format!("{}/v1/models", r.url), &key).await;
    assert_eq!(ans.status, 200);
    assert!(ans.header("x-request-id").starts_with("qoe-"));
    assert_eq!(completions_seen(&engine), 0);
}

/// A client that never finishes its headers is disconnected, and one that never finishes its
/// body is answered 408, after `--request-read-timeout-ms`: neither holds a connection for good.
#[tokio::test]
async fn stalled_headers_and_bodies_are_cut_off() {
    let engine = mock(&["m"]).await;
    let r = router(&[
        "--static-backends",
        &engine.url,
        "--request-read-timeout-ms",
        "300",
    ])
    .await;
    let stalled = raw(&r.url, b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n").await;
    assert_eq!(stalled.status, 0, "closed without an answer: {stalled:?}");
    let mut request =
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
        content-length: 100\r\nconnection: close\r\n\r\n"
            .to_vec();
    request.extend_from_slice(b"{\"model\"");
    let ans = raw(&r.url, &request).await;
    assert_eq!(ans.status, 408, "{ans:?}");
    let err = assert_openai_error(&ans.body, 408, None);
    assert!(err["message"]
        .as_str()
        .unwrap()
        .contains("--request-read-timeout-ms"));
    assert_eq!(completions_seen(&engine), 0);
}

/// A path with a `.` or `..` segment, as it is or percent-encoded, is refused: forwarded as it
/// is, a hop that resolves it would take the request out of the endpoint's base path.
#[tokio::test]
async fn paths_with_dot_segments_are_refused() {
    let engine = mock(&["m"]).await;
    let r = router(&["--static-backends", &engine.url]).await;
    for path in ["/v1/../admin", "/v1/%2e%2e/%2E%2e/x", "/v1/./completions"] {
        let ans = raw(&r.url, &raw_post(path, "h", &[], br#"{"model":"m"}"#)).await;
        assert_eq!(ans.status, 400, "{path}: {ans:?}");
        let err = assert_openai_error(&ans.body, 400, None);
        assert_eq!(err["code"], "invalid_path", "{path}");
    }
    let requests = engine.requests();
    assert!(
        requests.iter().all(|s| !s.path.contains("..")),
        "{requests:?}"
    );
    assert_eq!(completions_seen(&engine), 0);
}

/// What nginx refuses is refused here too, in OpenAI's shape: a proxied HTTP/1.1 request
/// without exactly one Host, and a transfer coding other than chunked (it would reach the engine still
/// encoded). HTTP/1.0 needs no Host; with Content-Length beside chunked, the chunks decide.
#[tokio::test]
async fn ambiguous_framing_and_missing_hosts_are_refused() {
    let engine = mock(&["m"]).await;
    let r = router(&["--static-backends", &engine.url]).await;
    let body = br#"{"model":"m","prompt":"x","max_tokens":2}"#;
    let chunked = |coding: &str, extra: &str| {
        format!(
            "POST /v1/completions HTTP/1.1\r\nhost: h\r\ncontent-type: application/json\r\n\
             transfer-encoding: {coding}\r\n{extra}connection: close\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n",
            body.len(),
            std::str::from_utf8(body).unwrap()
        )
    };
    let cases: [(Vec<u8>, u16, &str); 3] = [
        (
            chunked("gzip, chunked", "").into_bytes(),
            501,
            "only chunked",
        ),
        (
            b"GET /version HTTP/1.1\r\nconnection: close\r\n\r\n".to_vec(),
            400,
            "Host",
        ),
        (
            b"GET /version HTTP/1.1\r\nhost: a\r\nhost: b\r\nconnection: close\r\n\r\n".to_vec(),
            400,
            "Host",
        ),
    ];
    for (request, status, said) in cases {
        let ans = raw(&r.url, &request).await;
        assert_eq!(ans.status, status, "{ans:?}");
        let err = assert_openai_error(&ans.body, status, None);
        assert!(err["message"].as_str().unwrap().contains(said), "{err}");
    }
    assert_eq!(completions_seen(&engine), 0);
    // What passes: chunked, alone or beside a (wrong) length, and HTTP/1.0 without a Host.
    for extra in ["", "content-length: 4\r\n"] {
        let ans = raw(&r.url, chunked("chunked", extra).as_bytes()).await;
        assert_eq!(ans.status, 200, "{ans:?}");
    }
    let ans = raw(&r.url, b"GET /v1/models HTTP/1.0\r\n\r\n").await;
    assert_eq!(ans.status, 200, "{ans:?}");
    // The router's own routes answer a probe without a Host: they send nothing further.
    let ans = raw(&r.url, b"GET /health HTTP/1.1\r\nconnection: close\r\n\r\n").await;
    assert_eq!(ans.status, 200, "{ans:?}");
    assert_eq!(completions_seen(&engine), 2);
    let bodies: Vec<String> = engine
        .requests()
        .iter()
        .filter(|s| s.path == "/v1/completions")
        .map(|s| String::from_utf8_lossy(&s.body).into_owned())
        .collect();
    assert!(bodies.iter().all(|b| b.as_bytes() == body), "{bodies:?}");
}

/// An engine answer with both Content-Length and chunked framing: the chunks say where it ends
/// (RFC 9112 §6.3), so the client gets the whole body, not as many bytes as the length said.
#[tokio::test]
async fn an_engine_length_beside_chunks_is_not_forwarded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut chunk).await {
                        Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        _ => return,
                    }
                }
                let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                              content-length: 3\r\ntransfer-encoding: chunked\r\n\
                              connection: close\r\n\r\n9\r\n{\"a\":123}\r\n0\r\n\r\n";
                let _ = tcp.write_all(answer.as_bytes()).await;
            });
        }
    });
    let r = router(&["--static-backends", &url, "--static-models", "m"]).await;
    let ans = post(
        &client(),
        &format!("{}/v1/completions", r.url),
        r#"{"model":"m","prompt":"x","max_tokens":2}"#,
        &[],
    )
    .await;
    assert_eq!(ans.status, 200);
    assert_eq!(&ans.body[..], br#"{"a":123}"#);
}

/// A bad priority, SLA or expected-output header is refused before the body is read: the client
/// is not sent `100 Continue`, nor kept waiting for a body it never sends.
#[tokio::test]
async fn bad_qoe_headers_are_refused_before_the_body() {
    let engine = mock(&["m"]).await;
    let r = router(&["--static-backends", &engine.url]).await;
    for header in [
        "x-request-priority: 9",
        "x-sla-target-ms: soon",
        "x-expected-output-tokens: 0",
    ] {
        let head = format!(
            "POST /v1/completions HTTP/1.1\r\nhost: h\r\ncontent-type: application/json\r\n\
             content-length: 1000\r\nexpect: 100-continue\r\n{header}\r\n\r\n"
        );
        let ans = raw(&r.url, head.as_bytes()).await;
        assert_eq!(ans.status, 400, "{header}: {ans:?}");
        let name = header.split(':').next().unwrap();
        assert_openai_error(&ans.body, 400, Some(name));
    }
    assert_eq!(completions_seen(&engine), 0);
}
