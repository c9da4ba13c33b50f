//! Who may use the router, and what a browser may see: API keys, the admin key, CORS, and the size
//! of request headers.
//!
//! Three kinds of routes:
//!
//! | routes | guarded by | why |
//! |---|---|---|
//! | `/health`, `/ready` | nothing | liveness and readiness probes carry no credentials; they reveal only endpoint counts |
//! | `/engines`, `/metrics` | `--admin-api-key` | they reveal endpoint URLs, load and traffic |
//! | everything else (`/v1/...`, the other proxied routes, unknown paths) | `--api-keys`, `--api-key-priorities` | the OpenAI API, and no route probing without a key |
//!
//! Each guard is off until its key is set: with `--api-keys` alone the admin routes stay open
//! (a warning is logged at start), so a Prometheus without credentials keeps scraping. Keys are
//! presented as `Authorization: Bearer KEY` (the scheme is case-insensitive, RFC 9110 §11.1) and
//! compared in constant time ([`ct_eq`]). A refusal is a 401 in OpenAI's shape with
//! `WWW-Authenticate: Bearer`; the message never echoes what was presented.
//!
//! Keys of `--api-key-priorities` are API keys bound to a priority ([`PriorityKey`]): the proxy
//! caps the request's priority at the key's, so a client cannot claim priority 1 by a header.
//!
//! Keys are [`Secret`]s: their `Debug` prints `***`, `--help` hides their environment values, and
//! nothing logs request headers. When the router checks keys itself, the client's `Authorization`
//! stays at the router (not forwarded to engines) unless `--forward-authorization`; without
//! `--api-keys` the header passes through untouched, so engines running vLLM's own `--api-key`
//! keep working behind a transparent router.
//!
//! CORS is off unless `--cors-allow-origin` lists origins (or `*`): then preflights are answered
//! by the router (never proxied) and responses to allowed origins carry `Access-Control-Allow-Origin`.
//! Either way, `Access-Control-*` headers an engine sends (vLLM allows `*` by default) are removed,
//! so the router's setting is the only one a browser sees.

use crate::errors::ApiError;
use crate::metrics::CodeLabel;
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use qoe_core::Priority;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A credential: compared in constant time, never printed by `Debug`.
///
/// It serializes as the plain string because the config file is merged through serde (see
/// [`crate::config`]); `RouterConfig::effective_toml`, the one other serializer of the config,
/// leaves keys out.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Keys must be usable in a header and unambiguous in a comma-separated list: visible ASCII
    /// other than `,`.
    pub fn validate(&self, flag: &str) -> Result<(), String> {
        if self.0.is_empty() {
            return Err(format!("{flag}: a key must not be empty"));
        }
        if let Some(bad) = self.0.bytes().find(|b| !b.is_ascii_graphic() || *b == b',') {
            return Err(format!(
                "{flag}: keys may only contain visible ASCII characters other than ',' (found byte 0x{bad:02x})"
            ));
        }
        Ok(())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

/// An API key bound to a priority (`--api-key-priorities KEY=PRIORITY`): its requests are served
/// at that priority, or a lower one the priority header asks for, never a higher one. Written
/// `KEY=PRIORITY` in flags, environment and the config file alike; the last `=` splits, so a key
/// may itself contain `=` (base64 padding).
///
/// Parsing never fails: an entry that is not `KEY=PRIORITY` keeps its text as the key, without
/// a priority, and [`crate::RouterConfig::validate`] refuses it with a message that does not
/// show it (a parse error would echo the whole value, key included).
#[derive(Clone, PartialEq, Eq)]
pub struct PriorityKey {
    pub key: Secret,
    /// `None` for an entry that is not `KEY=PRIORITY` (refused at start).
    pub priority: Option<Priority>,
}

impl std::str::FromStr for PriorityKey {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parsed = s.rsplit_once('=').and_then(|(key, level)| {
            let priority = level.parse::<u8>().ok().and_then(Priority::new)?;
            Some(PriorityKey {
                key: Secret::new(key),
                priority: Some(priority),
            })
        });
        Ok(parsed.unwrap_or_else(|| PriorityKey {
            key: Secret::new(s),
            priority: None,
        }))
    }
}

impl std::fmt::Debug for PriorityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.priority {
            Some(p) => write!(f, "PriorityKey(***={})", p.level()),
            None => f.write_str("PriorityKey(***)"),
        }
    }
}

impl Serialize for PriorityKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.priority {
            Some(p) => s.serialize_str(&format!("{}={}", self.key.expose(), p.level())),
            None => s.serialize_str(self.key.expose()),
        }
    }
}

impl<'de> Deserialize<'de> for PriorityKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let Ok(key) = text.parse();
        Ok(key)
    }
}

/// The priority a request's API key binds it to, for the proxy (a request extension).
#[derive(Clone, Copy, Debug)]
pub struct KeyPriority(pub Priority);

/// Compares `presented` with `key` in time that depends on the two lengths only, never on the
/// bytes' content or on where they differ.
///
/// Hand-written rather than the `subtle` crate (not otherwise in the dependency tree): every byte
/// of `presented` is XOR-ed against the key byte at the same position (or against 0 past its end)
/// and the differences are OR-ed together without branching on them; the lengths are folded in
/// the same way. `black_box` keeps the optimizer from turning the loop into an early exit. Unlike
/// `subtle`'s slice comparison, a length mismatch does not return early either.
pub fn ct_eq(presented: &[u8], key: &[u8]) -> bool {
    let mut diff = (presented.len() ^ key.len()) as u64;
    for (i, &p) in presented.iter().enumerate() {
        let k = key.get(i).copied().unwrap_or(0);
        diff |= std::hint::black_box((p ^ k) as u64);
    }
    std::hint::black_box(diff) == 0
}

/// Whether `presented` equals any of `keys`; every key is compared, match or not.
pub fn matches_any(presented: &[u8], keys: &[Secret]) -> bool {
    let mut found = false;
    for key in keys {
        found |= ct_eq(presented, key.expose().as_bytes());
    }
    found
}

/// The token of an `Authorization: Bearer TOKEN` header.
pub fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Which guard a path falls under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guard {
    Open,
    Admin,
    Api,
}

pub fn guard_of(path: &str) -> Guard {
    match path {
        "/health" | "/ready" => Guard::Open,
        "/engines" | "/metrics" => Guard::Admin,
        _ => Guard::Api,
    }
}

fn unauthorized(state: &AppState, guard: Guard, presented: bool) -> Response {
    state
        .metrics
        .rejected
        .get_or_create(&CodeLabel { code: 401 })
        .inc();
    let (what, flag) = match guard {
        Guard::Admin => ("admin key", "--admin-api-key"),
        _ => ("API key", "--api-keys and --api-key-priorities"),
    };
    let message = if presented {
        format!(
            "Incorrect {what} provided (the router checks `Authorization: Bearer` against {flag})."
        )
    } else {
        format!("You didn't provide an {what}. Send it as `Authorization: Bearer YOUR_KEY` (the router checks it against {flag}).")
    };
    tracing::info!(guard = ?guard, presented, "request rejected: {what} missing or wrong");
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// The guard as axum middleware, for [`crate::server::app`]: CORS outermost (it answers
/// preflights itself and sets the CORS headers of every answer, refusals included), then the
/// header size limit, then the API and admin keys. One layer rather than three: each axum
/// middleware layer clones its inner service and boxes a future per request. `serve` runs
/// [`guarded`] itself, with no layer at all ([`crate::server::Front`]).
pub async fn guard(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    // Served with `into_make_service_with_connect_info::<SocketAddr>()`, the client's address
    // goes on in X-Forwarded-For, as `serve` sends it.
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0.ip().to_canonical());
    if let Some(peer) = peer {
        if !crate::server::is_own_route(request.uri().path()) {
            if let Ok(value) = HeaderValue::try_from(peer.to_string()) {
                crate::proxy::add_forwarded_for(request.headers_mut(), &value);
            }
        }
    }
    guarded(&state, request, |request| next.run(request)).await
}

/// What [`guard`] does, around any `inner` handler: CORS, then the header size limit, then the
/// API and admin keys.
pub async fn guarded<F, Fut>(state: &AppState, request: Request, inner: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    // Like every answer, the router's own carry the request's id (a proxied answer has its own).
    let own_id = crate::server::is_own_route(request.uri().path())
        .then(|| crate::proxy::request_id(request.headers()));
    let checked = |mut request: Request| async {
        // Like every answer, a refusal carries the request's id.
        let id_of = |request: &Request, own_id: Option<HeaderValue>| {
            own_id.unwrap_or_else(|| crate::proxy::request_id(request.headers()))
        };
        if let Some(error) = limit_headers(state, &request) {
            // Counted and logged as every refusal of the proxy's is.
            return crate::proxy::reject(state, error, &id_of(&request, own_id));
        }
        match authenticate(state, &request) {
            Ok(None) => {}
            Ok(Some(priority)) => {
                request.extensions_mut().insert(KeyPriority(priority));
            }
            Err((guard, presented)) => {
                let mut refusal = unauthorized(state, guard, presented);
                refusal
                    .headers_mut()
                    .insert(crate::proxy::X_REQUEST_ID.clone(), id_of(&request, own_id));
                return refusal;
            }
        }
        let mut response = inner(request).await;
        if let Some(id) = own_id {
            response
                .headers_mut()
                .insert(crate::proxy::X_REQUEST_ID.clone(), id);
        }
        response
    };
    cors(state, request, checked).await
}

/// The API and admin keys: the priority the request's API key binds it to, if any
/// (`--api-key-priorities`); for a request without the key its route needs, its guard and
/// whether a key was presented at all (for the 401).
fn authenticate(state: &AppState, request: &Request) -> Result<Option<Priority>, (Guard, bool)> {
    let config = &state.config;
    let guard = guard_of(request.uri().path());
    let (keys, bound): (&[Secret], &[PriorityKey]) = match guard {
        Guard::Open => (&[], &[]),
        Guard::Admin => (config.admin_api_key.as_slice(), &[]),
        Guard::Api => (&config.api_keys, &config.api_key_priorities),
    };
    if keys.is_empty() && bound.is_empty() {
        return Ok(None);
    }
    let Some(token) = bearer(request.headers()) else {
        return Err((guard, false));
    };
    let mut found = matches_any(token, keys);
    let mut priority = None;
    // Every key compared, match or not.
    for key in bound {
        let matched = ct_eq(token, key.key.expose().as_bytes());
        found |= matched;
        if matched {
            priority = key.priority;
        }
    }
    if found {
        Ok(priority)
    } else {
        Err((guard, true))
    }
}

/// Total size of the request's headers as they came on the wire (names, values, `: ` and CRLF).
pub fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum()
}

/// Refuses requests whose headers exceed `--max-header-bytes` with an OpenAI-shaped 431. (Beyond
/// hyper's own limits, 100 headers or about 400 KiB, hyper answers a bare 431 and closes the
/// connection before the router sees the request.)
/// Why the request is refused before its key is looked at: headers past `--max-header-bytes`
/// (431), or framing the router does not take ([`framing_error`]).
fn limit_headers(state: &AppState, request: &Request) -> Option<ApiError> {
    // Cookie fields as forwarded: joined into one (HTTP/2 clients split them, one per pair).
    let cookies = request.headers().get_all(header::COOKIE).iter().count();
    let fields = request.headers().len() - cookies.saturating_sub(1);
    if fields > crate::server::MAX_HEADER_FIELDS {
        // HTTP/1.1 never gets here (hyper refuses more first); HTTP/2 does.
        return Some(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "the request has {fields} header fields, over the limit of {}",
                crate::server::MAX_HEADER_FIELDS
            ),
        ));
    }
    let size = header_bytes(request.headers());
    let limit = state.config.max_header_bytes;
    if size > limit {
        return Some(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "request headers total {size} bytes, over the limit of {limit} bytes (--max-header-bytes)"
            ),
        ));
    }
    framing_error(request)
}

/// What is wrong with how the request says where it goes and how its body is sent, if anything,
/// refused as nginx refuses it: an HTTP/1.1 request needs exactly one `Host` (RFC 9112 §3.2),
/// and a transfer coding other than `chunked` would reach the engine still encoded.
fn framing_error(request: &Request) -> Option<ApiError> {
    let headers = request.headers();
    // The router's own routes go nowhere further: a probe without a Host still gets its answer.
    if request.version() == http::Version::HTTP_11
        && headers.get_all(header::HOST).iter().count() != 1
        && !crate::server::is_own_route(request.uri().path())
    {
        return Some(ApiError::bad_request(
            "an HTTP/1.1 request needs exactly one Host header",
        ));
    }
    // Transfer-Encoding beside Content-Length never reaches here: hyper lets the chunks decide
    // and closes the connection after the answer, as RFC 9112 §6.1 asks.
    // Every coding, on one line or several (hyper itself refuses a last coding that is not
    // chunked, with a bare 400).
    let chunked_only = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .all(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"));
    (!chunked_only).then(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "Transfer-Encoding: only chunked is supported (send the body without another coding)",
        )
        .with_code("unsupported_transfer_encoding")
    })
}

/// Response headers a browser may read, when CORS is on.
const EXPOSED: &str =
    "x-qoe-endpoint, x-qoe-prefill-endpoint, x-qoe-reason, x-request-id, retry-after";
const PREFLIGHT_MAX_AGE_S: u32 = 600;

/// Removes every `Access-Control-*` header (an engine's CORS answer is not the router's).
fn strip_cors(headers: &mut HeaderMap) {
    let names: Vec<_> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("access-control-"))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// The `Access-Control-Allow-Origin` value for a request from `origin`, if allowed.
fn allowed_origin(allow: &[String], origin: Option<&HeaderValue>) -> Option<HeaderValue> {
    if allow.iter().any(|a| a == "*") {
        return Some(HeaderValue::from_static("*"));
    }
    let origin = origin?;
    allow
        .iter()
        .any(|a| a.as_bytes() == origin.as_bytes())
        .then(|| origin.clone())
}

/// CORS, only as configured, around `inner`.
async fn cors<F, Fut>(state: &AppState, request: Request, inner: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let allow = &state.config.cors_allow_origin;
    if allow.is_empty() {
        let mut response = inner(request).await;
        strip_cors(response.headers_mut());
        return response;
    }
    let origin = request.headers().get(header::ORIGIN).cloned();
    let allowed = allowed_origin(allow, origin.as_ref());
    let preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = if preflight {
        let mut r = StatusCode::NO_CONTENT.into_response();
        if allowed.is_some() {
            let a = &state.analyzer;
            let names = [
                "authorization",
                "content-type",
                "x-request-id",
                &a.priority_header,
                &a.expected_output_len_header,
                &a.sla_header,
                &a.session_key,
            ]
            .join(", ");
            let h = r.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, OPTIONS"),
            );
            if let Ok(v) = HeaderValue::from_str(&names) {
                h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
            }
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from(PREFLIGHT_MAX_AGE_S),
            );
        }
        r
    } else {
        let mut r = inner(request).await;
        strip_cors(r.headers_mut());
        if allowed.is_some() {
            r.headers_mut().insert(
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static(EXPOSED),
            );
        }
        r
    };
    let h = response.headers_mut();
    if let Some(v) = allowed {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    h.append(header::VARY, HeaderValue::from_static("origin"));
    response
}

/// Checks `--cors-allow-origin` entries: `*` alone, or origins like `https://app.example.com`.
pub fn validate_origins(origins: &[String]) -> Result<(), String> {
    if origins.iter().any(|o| o == "*") && origins.len() > 1 {
        return Err("--cors-allow-origin: '*' allows every origin; give it alone".into());
    }
    for o in origins.iter().filter(|o| *o != "*") {
        let uri: http::Uri = o
            .parse()
            .map_err(|e| format!("--cors-allow-origin: '{o}' is not an origin: {e}"))?;
        let bare = o
            .split_once("://")
            .is_some_and(|(_, rest)| !rest.contains(['/', '?', '#']));
        if uri.scheme().is_none() || uri.host().is_none() || !bare {
            return Err(format!(
                "--cors-allow-origin: '{o}' is not an origin; write scheme://host[:port], e.g. https://app.example.com"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_equality_is_equality() {
        assert!(ct_eq(b"sk-abc", b"sk-abc"));
        assert!(!ct_eq(b"sk-abd", b"sk-abc"));
        assert!(!ct_eq(b"sk-ab", b"sk-abc"), "a prefix is not the key");
        assert!(!ct_eq(b"sk-abc\0", b"sk-abc"), "nor is the key plus a NUL");
        assert!(!ct_eq(b"", b"sk-abc"));
        assert!(ct_eq(b"", b""));
        let keys = [Secret::new("one"), Secret::new("two")];
        assert!(matches_any(b"two", &keys));
        assert!(!matches_any(b"three", &keys));
        assert!(!matches_any(b"two", &[]));
    }

    #[test]
    fn bearer_tokens() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        for (value, want) in [
            ("Bearer sk-1", Some(&b"sk-1"[..])),
            ("bearer   sk-1  ", Some(b"sk-1")),
            ("BEARER sk-1", Some(b"sk-1")),
            ("Basic c2stMQ==", None),
            ("Bearer ", None),
            ("Bearer", None),
        ] {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            assert_eq!(bearer(&h), want, "{value}");
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("sk-live-123");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert!(!format!("{:?}", Some(vec![s.clone()])).contains("sk-live"));
        assert!(Secret::new("a b").validate("--api-keys").is_err());
        assert!(Secret::new("a,b").validate("--api-keys").is_err());
        assert!(Secret::new("").validate("--api-keys").is_err());
        assert!(Secret::new("sk-ok_1.2~").validate("--api-keys").is_ok());
    }

    #[test]
    fn routes_and_guards() {
        assert_eq!(guard_of("/health"), Guard::Open);
        assert_eq!(guard_of("/ready"), Guard::Open);
        assert_eq!(guard_of("/engines"), Guard::Admin);
        assert_eq!(guard_of("/metrics"), Guard::Admin);
        assert_eq!(guard_of("/v1/models"), Guard::Api);
        assert_eq!(guard_of("/v1/chat/completions"), Guard::Api);
        assert_eq!(guard_of("/anything"), Guard::Api);
    }

    #[test]
    fn origins() {
        assert!(validate_origins(&["*".into()]).is_ok());
        assert!(
            validate_origins(&["https://a.example".into(), "http://localhost:3000".into()]).is_ok()
        );
        assert!(validate_origins(&["*".into(), "https://a.example".into()]).is_err());
        assert!(validate_origins(&["a.example".into()]).is_err());
        assert!(validate_origins(&["https://a.example/".into()]).is_err());
        assert!(validate_origins(&["https://a.example/app".into()]).is_err());
        let allow = vec!["https://a.example".to_string()];
        let a = HeaderValue::from_static("https://a.example");
        let b = HeaderValue::from_static("https://b.example");
        assert_eq!(allowed_origin(&allow, Some(&a)), Some(a.clone()));
        assert_eq!(allowed_origin(&allow, Some(&b)), None);
        assert_eq!(allowed_origin(&allow, None), None);
        assert_eq!(
            allowed_origin(&["*".into()], None),
            Some(HeaderValue::from_static("*"))
        );
    }
}
