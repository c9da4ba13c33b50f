//! One streamed request over HTTP, measured as the user would feel it.
//!
//! The request is what vLLM's own serving benchmark sends (`stream: true`,
//! `stream_options.include_usage`, `ignore_eos: true`, `max_tokens` = the planned output), so the
//! output length is the workload's and not the model's whim, plus the router's hint headers. The
//! response is read frame by frame; every frame is timestamped as it arrives and fed to
//! [`qoe_core::sse::SseParser`], the same parser the router uses, so a token counts the same in
//! both. Nothing per token is stored: a [`RequestTracker`] folds arrivals into the QoE accumulator
//! and a gap histogram.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use qoe_core::sse::{SseEvent, SseParser};
use qoe_core::Micros;
use qoe_sim::report::{RequestRecord, RequestTracker, Status};
use qoe_sim::workload::{Api, PlannedRequest};
use qoe_tls::HttpsConnector;
use std::time::Duration;
use tokio::time::Instant;

/// The pooled HTTP/1 client every request of a run shares.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A pooled client with `TCP_NODELAY` (so a token chunk is never held back by Nagle's algorithm,
/// on our side either), at most `max_idle` idle connections per host, and a connect timeout;
/// `https` targets over `tls`.
pub fn http_client(max_idle: usize, tls: &qoe_tls::ClientTls) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    let connector = tls.https_or_http(connector);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(max_idle)
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// A target's base URL, checked: `http://host:port` or `https://...`, optionally with a path
/// prefix (`/v1` is understood and not doubled).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// As given, without a trailing slash.
    pub base: String,
    /// `Authorization` sent with every request to it (`--api-key`).
    pub auth: Option<http::HeaderValue>,
}

impl Target {
    pub fn parse(url: &str) -> anyhow::Result<Target> {
        let trimmed = url.trim().trim_end_matches('/');
        let uri: http::Uri = trimmed
            .parse()
            .map_err(|e| anyhow::anyhow!("--target {url}: not a URL ({e})"))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            Some(other) => anyhow::bail!(
                "--target {url}: only http:// and https:// are supported (got {other}://)"
            ),
            None => anyhow::bail!("--target {url}: give the scheme, e.g. http://127.0.0.1:8000"),
        }
        let Some(authority) = uri.authority() else {
            anyhow::bail!("--target {url}: no host");
        };
        // `http::Uri` takes `host:abc` and `host:99999` and forgets the port.
        let host_port = authority.as_str().rsplit('@').next().unwrap_or_default();
        let after_host = match host_port.rfind(']') {
            Some(i) => &host_port[i..],
            None => host_port,
        };
        let port_given = after_host
            .split_once(':')
            .is_some_and(|(_, p)| !p.is_empty());
        if port_given && uri.port_u16().is_none_or(|p| p == 0) {
            anyhow::bail!("--target {url}: the port must be a number in 1..=65535");
        }
        let base = trimmed.strip_suffix("/v1").unwrap_or(trimmed).to_string();
        Ok(Target { base, auth: None })
    }

    /// The URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `host:port`, the default label.
    pub fn authority(&self) -> String {
        self.base
            .parse::<http::Uri>()
            .ok()
            .and_then(|u| u.authority().map(|a| a.to_string()))
            .unwrap_or_else(|| self.base.clone())
    }
}

/// The JSON body of a planned request.
pub fn request_body(api: Api, model: &str, r: &PlannedRequest) -> Bytes {
    let mut body = serde_json::json!({
        "model": model,
        "max_tokens": r.output_tokens,
        "stream": true,
        "stream_options": {"include_usage": true},
        "ignore_eos": true,
    });
    match api {
        Api::Completions => body["prompt"] = r.prompt.as_str().into(),
        Api::Chat => {
            body["messages"] = serde_json::json!([{"role": "user", "content": r.prompt.as_str()}])
        }
    }
    Bytes::from(serde_json::to_vec(&body).expect("JSON body"))
}

/// The HTTP request for `r`: body plus the router's hint headers.
pub fn http_request(
    url: &str,
    body: Bytes,
    r: &PlannedRequest,
    auth: Option<&http::HeaderValue>,
) -> anyhow::Result<hyper::Request<Full<Bytes>>> {
    let mut b = hyper::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "text/event-stream")
        .header("x-request-priority", r.priority.level().to_string());
    if let Some(sla) = r.sla {
        b = b.header("x-sla-target-ms", sla.ttft_ms.to_string());
    }
    if r.send_expected_header {
        b = b.header("x-expected-output-tokens", r.output_tokens.to_string());
    }
    if let Some(s) = r.session {
        b = b.header("x-session-id", format!("session-{}", s.id));
    }
    if let Some(auth) = auth {
        b = b.header(http::header::AUTHORIZATION, auth);
    }
    Ok(b.body(Full::new(body))?)
}

/// Microseconds since `start`.
pub fn micros_since(start: Instant) -> Micros {
    start.elapsed().as_micros().min(u64::MAX as u128) as u64
}

/// The response header naming the engine a qoe-router chose (other servers send none).
pub const ENDPOINT_HEADER: &str = "x-qoe-endpoint";

/// Sends `request` and follows its stream to the end (or `timeout`), timing every chunk from
/// `start`; `tracker` was created at the send time. Also returns the response's
/// [`ENDPOINT_HEADER`], when there was a response carrying one.
pub async fn measure(
    client: &HttpClient,
    request: hyper::Request<Full<Bytes>>,
    mut tracker: RequestTracker,
    start: Instant,
    timeout: Duration,
) -> (RequestRecord, Option<String>) {
    let mut endpoint = None;
    let streamed = async {
        let resp = client.request(request).await.map_err(|e| {
            if e.is_connect() {
                Status::Connect
            } else {
                Status::Stream
            }
        })?;
        endpoint = resp
            .headers()
            .get(ENDPOINT_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let status = resp.status();
        if !status.is_success() {
            return Err(Status::Http(status.as_u16()));
        }
        let mut body = resp.into_body();
        let mut parser = SseParser::default();
        let (mut done, mut error, mut usage) = (false, false, None);
        let mut on_event = |ev: SseEvent, at: Micros, tracker: &mut RequestTracker| match ev {
            SseEvent::Tokens { count, usage: u } => {
                tracker.on_tokens(at, count as u64);
                if let Some(c) = u.and_then(|u| u.completion_tokens) {
                    usage = Some(c);
                }
            }
            SseEvent::Usage(u) => {
                if let Some(c) = u.completion_tokens {
                    usage = Some(c);
                }
            }
            SseEvent::Done => done = true,
            SseEvent::Error => error = true,
            SseEvent::Other | SseEvent::Oversized { .. } => {}
        };
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| Status::Stream)?;
            if let Some(data) = frame.data_ref() {
                let at = micros_since(start);
                parser.feed(data, |ev| on_event(ev, at, &mut tracker));
            }
        }
        let at = micros_since(start);
        parser.finish(|ev| on_event(ev, at, &mut tracker));
        if let Some(n) = usage {
            tracker.set_reported_tokens(n);
        }
        if error {
            Err(Status::Stream)
        } else if !done {
            Err(Status::Truncated)
        } else {
            Ok(())
        }
    };
    let status = match tokio::time::timeout(timeout, streamed).await {
        Err(_) => Status::Timeout,
        Ok(Err(s)) => s,
        Ok(Ok(())) => Status::Ok,
    };
    (tracker.finish(micros_since(start), status), endpoint)
}

/// Largest `GET /v1/models` answer read.
const MAX_MODELS_BODY: usize = 1 << 20;

/// An error with its causes (hyper's own text is only "client error (Connect)").
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
        source = s.source();
    }
    text
}

/// Checks that `target` answers before a run (`GET /v1/models`, at most 10 s; a target that
/// asked `tls` for a client certificate it does not have is told apart), and returns the
/// model to request: `model` if given (refused if the target lists models without it), else the
/// first the target lists.
pub async fn check_target(
    client: &HttpClient,
    tls: &qoe_tls::ClientTls,
    target: &Target,
    model: Option<&str>,
) -> anyhow::Result<String> {
    let url = target.url("/v1/models");
    let mut req = hyper::Request::get(&url);
    if let Some(auth) = &target.auth {
        req = req.header(http::header::AUTHORIZATION, auth);
    }
    let req = req.body(Full::new(Bytes::new()))?;
    let fetch = async {
        let resp = client.request(req).await.map_err(|e| {
            let causes = with_causes(&e);
            // Refused once connected (TLS 1.3: after the handshake) may be for want of a client
            // certificate; a failure to connect says what it was (as the router's health checks).
            let hint = match causes.contains("(Connect)") {
                true => tls.failure_hint(&causes),
                false => tls.identity_hint(),
            };
            anyhow::anyhow!("--target {}: cannot connect ({causes}){hint}", target.base)
        })?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_MODELS_BODY)
            .collect()
            .await
            .map(|b| b.to_bytes());
        Ok::<_, anyhow::Error>((status, body))
    };
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .map_err(|_| anyhow::anyhow!("--target {}: GET {url}: no answer in 10 s", target.base))??;
    let listed: Option<Vec<String>> = body.ok().filter(|_| status.is_success()).and_then(|b| {
        let v: serde_json::Value = serde_json::from_slice(&b).ok()?;
        let ids = v["data"].as_array()?.iter();
        Some(
            ids.filter_map(|m| m["id"].as_str().map(str::to_string))
                .collect(),
        )
    });
    match (model, listed) {
        (Some(m), Some(ids)) if !ids.is_empty() && !ids.iter().any(|id| id == m) => {
            anyhow::bail!(
                "model `{m}` is not served by {} (it lists: {}): pick one with --model",
                target.base,
                ids.join(", ")
            )
        }
        (Some(m), _) => Ok(m.to_string()),
        (None, Some(ids)) if !ids.is_empty() => Ok(ids[0].clone()),
        (None, _) => anyhow::bail!(
            "cannot find the model to request (GET {url}: HTTP {status}, no model listed); \
             pass --model"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qoe_core::Priority;
    use qoe_sim::workload::{SessionRef, Sla};

    fn planned() -> PlannedRequest {
        PlannedRequest {
            id: 3,
            at: 0,
            prompt: "abcd efgh".into(),
            prompt_tokens: 3,
            output_tokens: 17,
            priority: Priority::HIGH,
            sla: Some(Sla {
                ttft_ms: 250,
                tpot_ms: 50,
            }),
            session: Some(SessionRef { id: 9, turn: 1 }),
            prefix_group: None,
            send_expected_header: true,
        }
    }

    #[test]
    fn targets() {
        let t = Target::parse("http://127.0.0.1:8000/").unwrap();
        assert_eq!(
            t.url("/v1/completions"),
            "http://127.0.0.1:8000/v1/completions"
        );
        assert_eq!(t.authority(), "127.0.0.1:8000");
        let t = Target::parse("http://h:1/v1").unwrap();
        assert_eq!(t.url("/v1/models"), "http://h:1/v1/models");
        let t = Target::parse("https://api.example/v1").unwrap();
        assert_eq!(t.url("/v1/models"), "https://api.example/v1/models");
        assert!(Target::parse("ftp://h:1")
            .unwrap_err()
            .to_string()
            .contains("https://"));
        assert!(Target::parse("127.0.0.1:8000").is_err());
        for bad in [
            "http://127.0.0.1:abc",
            "http://127.0.0.1:99999",
            "http://h:0",
        ] {
            let e = Target::parse(bad).unwrap_err().to_string();
            assert!(e.contains("port must be a number"), "{bad}: {e}");
        }
        assert_eq!(
            Target::parse("http://[::1]:8000").unwrap().authority(),
            "[::1]:8000"
        );
        assert!(Target::parse("http://[::1]").is_ok());
        assert!(Target::parse("http://user:secret@h").is_ok());
        assert!(
            Target::parse("http://h:").is_ok(),
            "an empty port is the default one"
        );
    }

    #[test]
    fn bodies_and_headers() {
        let r = planned();
        let v: serde_json::Value =
            serde_json::from_slice(&request_body(Api::Completions, "m", &r)).unwrap();
        assert_eq!(v["prompt"], "abcd efgh");
        assert_eq!(v["max_tokens"], 17);
        assert_eq!(v["stream"], true);
        assert_eq!(v["ignore_eos"], true);
        assert_eq!(v["stream_options"]["include_usage"], true);
        let v: serde_json::Value =
            serde_json::from_slice(&request_body(Api::Chat, "m", &r)).unwrap();
        assert_eq!(v["messages"][0]["content"], "abcd efgh");
        assert!(v.get("prompt").is_none());
        let key = http::HeaderValue::from_static("Bearer k");
        let req = http_request("http://h/v1/completions", Bytes::new(), &r, Some(&key)).unwrap();
        let h = req.headers();
        assert_eq!(h["authorization"], "Bearer k");
        assert_eq!(h["x-request-priority"], "1");
        assert_eq!(h["x-sla-target-ms"], "250");
        assert_eq!(h["x-expected-output-tokens"], "17");
        assert_eq!(h["x-session-id"], "session-9");
        let mut quiet = planned();
        quiet.sla = None;
        quiet.session = None;
        quiet.send_expected_header = false;
        let req = http_request("http://h/", Bytes::new(), &quiet, None).unwrap();
        assert!(req.headers().get("authorization").is_none());
        assert!(req.headers().get("x-sla-target-ms").is_none());
        assert!(req.headers().get("x-expected-output-tokens").is_none());
        assert!(req.headers().get("x-session-id").is_none());
    }
}
