//! The HTTP/1.1 clients toward endpoints, both with keep-alive connections, TCP_NODELAY and a
//! connect timeout.
//!
//! * [`Pool`]: each endpoint's own connections for proxied requests. A lean pool of
//!   `hyper::client::conn::http1` connections: a checkout is a pop from a short stack under the
//!   endpoint's own lock, with no per-request task, URI rewriting or `Host` formatting; the
//!   connection goes back when its response body has been read to the end (see
//!   [`crate::observe`]), and a connection found closed before a request went out is replaced
//!   transparently. A connection has no task of its own: whoever is waiting on it (the request
//!   being sent, then the response body as the client's connection reads it) drives it
//!   ([`Conn::poll_frame`]), so the chunks of one burst from the engine are decoded in the same
//!   pass and leave toward the client in one write (docs/PERFORMANCE.md, "Run of 2026-12-07").
//!   The pool drives a connection when it is given back and when it is taken, which is when an
//!   engine's close of it is seen, and closes those idle past the timeout ([`Pool::prune`]).
//! * [`UpstreamClient`]: hyper-util's general client, for scrapes and health checks.
//!
//! Both speak `https` to an endpoint whose URL says so ([`qoe_tls`]); the pool's TLS
//! handshake counts toward the connect timeout.

use bytes::Bytes;
use http::HeaderValue;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1::SendRequest, TrySendError};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use qoe_tls::{ClientTls, HttpsConnector};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// The client for the router's own requests to endpoints, with the `Authorization` it sends
/// (`--upstream-api-key`).
#[derive(Clone, Debug)]
pub struct UpstreamClient {
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    authorization: Option<HeaderValue>,
    /// For what a failed https request's error should add ([`ClientTls::failure_hint`]).
    tls: ClientTls,
}

impl UpstreamClient {
    /// What the router sends endpoints as `Authorization` (`--upstream-api-key`), if anything.
    pub fn authorization(&self) -> Option<&HeaderValue> {
        self.authorization.as_ref()
    }

    /// The same client (its connections shared) sending `authorization` instead.
    pub fn with_authorization(&self, authorization: Option<HeaderValue>) -> UpstreamClient {
        UpstreamClient {
            http: self.http.clone(),
            authorization,
            tls: self.tls.clone(),
        }
    }
}

/// Builds the client.
pub fn client(
    connect_timeout: Duration,
    max_idle_per_host: usize,
    authorization: Option<HeaderValue>,
    tls: &ClientTls,
) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_keepalive(Some(TCP_KEEPALIVE));
    let connector = tls.https_or_http(connector);
    let http = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(max_idle_per_host)
        .build(connector);
    UpstreamClient {
        http,
        authorization,
        tls: tls.clone(),
    }
}

/// Settings of every endpoint's [`Pool`].
#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub connect_timeout: Duration,
    /// Idle connections kept per endpoint.
    pub max_idle: usize,
    /// An idle connection older than this is closed rather than reused.
    pub idle_timeout: Duration,
    /// TLS toward `https` endpoints; `None`: such an endpoint cannot be connected to.
    pub tls: Option<ClientTls>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            connect_timeout: Duration::from_secs(5),
            max_idle: 256,
            idle_timeout: POOL_IDLE_TIMEOUT,
            tls: None,
        }
    }
}

/// How long an idle connection is kept (both clients): under the 5 s after which vLLM's server
/// (uvicorn's default keep-alive) closes one, so a request is seldom written onto a connection
/// the engine is closing at that moment.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// TCP keep-alive probes start after this much silence (both clients).
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// A connection ready for one request; hand it back with [`Pool::put`] once the response has
/// been read to its end. Nothing reads or writes it but [`Conn::poll_frame`] and the sending of
/// a request: whoever waits on it drives it (module docs).
pub struct Conn {
    send: SendRequest<Full<Bytes>>,
    /// hyper's connection future; `None` once it has ended.
    driver: Option<Driver>,
}

type Driver = Pin<Box<dyn Future<Output = Result<(), hyper::Error>> + Send>>;

/// What polling a body for its next frame gives.
pub type PolledFrame<B> = Poll<
    Option<Result<http_body::Frame<<B as http_body::Body>::Data>, <B as http_body::Body>::Error>>,
>;

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("ended", &self.driver.is_none())
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// The next frame of `body`, this connection's response body: what hyper already decoded
    /// into it, else what driving the connection decodes now.
    pub fn poll_frame<B>(&mut self, mut body: Pin<&mut B>, cx: &mut Context<'_>) -> PolledFrame<B>
    where
        B: http_body::Body + ?Sized,
    {
        if let ready @ Poll::Ready(_) = body.as_mut().poll_frame(cx) {
            return ready;
        }
        drive(&mut self.driver, cx);
        body.poll_frame(cx)
    }

    /// Drives the connection as far as it goes without waiting (for a connection nobody waits
    /// on: one back in the pool, or taken from it).
    fn settle(&mut self) {
        drive(&mut self.driver, &mut Context::from_waker(Waker::noop()));
    }

    fn is_closed(&self) -> bool {
        self.driver.is_none() || self.send.is_closed()
    }

    /// Sends `request` and waits for the response's head, driving the connection meanwhile.
    async fn send(
        &mut self,
        request: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, TrySendError<http::Request<Full<Bytes>>>>
    {
        let Conn { send, driver } = self;
        let mut response = std::pin::pin!(send.try_send_request(request));
        // A connection that ends first fails the response future (with the request if unsent).
        std::future::poll_fn(|cx| {
            drive(driver, cx);
            response.as_mut().poll(cx)
        })
        .await
    }
}

/// Moves a connection along: writes what its request has to send, reads and decodes what arrived
/// into the response body (one frame at a time: hyper's body channel holds one). `cx` is woken
/// when there is more to do.
fn drive(driver: &mut Option<Driver>, cx: &mut Context<'_>) {
    if let Some(connection) = driver.as_mut() {
        if let Poll::Ready(result) = connection.as_mut().poll(cx) {
            if let Err(e) = result {
                tracing::debug!("upstream connection ended: {e}");
            }
            *driver = None;
        }
    }
}

/// Why [`Pool::send`] produced no response.
#[derive(Debug)]
pub enum PoolError {
    /// No connection: nothing was sent.
    Connect(String),
    /// The connection failed with the request (possibly) sent.
    Send(hyper::Error),
    /// A new connection failed before the request went out (hyper handed it back).
    Unsent(hyper::Error),
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// Keep-alive connections to one endpoint, for proxied requests (module docs).
pub struct Pool {
    config: PoolConfig,
    /// Where to connect, from the endpoint URL (an error message if it has no usable host).
    target: Result<(String, u16), String>,
    /// Whether the URL is `https`.
    https: bool,
    /// The `Host` header: the URL's authority, without a default port.
    host: Option<HeaderValue>,
    /// The URL's path, prefixed to every request's path ("" for none).
    base_path: String,
    /// Most recently returned last.
    idle: Mutex<VecDeque<Idle>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("target", &self.target)
            .field("idle", &self.idle_count())
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool toward `url` (`http[s]://host[:port][/path]`, as validated by discovery).
    pub fn new(url: &str, config: PoolConfig) -> Self {
        let uri = url.parse::<http::Uri>();
        let https = uri
            .as_ref()
            .is_ok_and(|u| u.scheme() == Some(&http::uri::Scheme::HTTPS));
        let default_port = if https { 443 } else { 80 };
        let target = match &uri {
            Ok(uri) => match uri.host() {
                Some(host) => {
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    Ok((host.to_string(), uri.port_u16().unwrap_or(default_port)))
                }
                None => Err(format!("'{url}' has no host")),
            },
            Err(e) => Err(format!("'{url}' is not a valid URL: {e}")),
        };
        let host = uri.as_ref().ok().and_then(|u| {
            let authority = u.authority()?.as_str();
            let authority = match u.port_u16() {
                Some(port) if port == default_port => authority
                    .strip_suffix(&format!(":{port}"))
                    .unwrap_or(authority),
                _ => authority,
            };
            HeaderValue::from_str(authority).ok()
        });
        let base_path = uri
            .as_ref()
            .map(|u| u.path().trim_end_matches('/').to_string())
            .unwrap_or_default();
        Pool {
            config,
            target,
            https,
            host,
            base_path,
            idle: Mutex::new(VecDeque::new()),
        }
    }

    /// The request-target (origin form) toward this endpoint for a client's request to `uri`:
    /// the URL's path, then the request's path and query, nothing else of the request's URI (an
    /// absolute-form authority is ignored, like `Host`). For an endpoint at its host's root
    /// that is the client's own target, shared rather than copied and parsed again.
    pub fn request_target(&self, uri: &http::Uri) -> Result<http::Uri, http::uri::InvalidUri> {
        match uri.path_and_query() {
            Some(pq) if self.base_path.is_empty() && pq.as_str().starts_with('/') => {
                Ok(http::Uri::from(pq.clone()))
            }
            pq => {
                let path = pq.map_or("/", |p| p.as_str());
                let path = if path.starts_with('/') { path } else { "/" };
                format!("{}{path}", self.base_path).parse()
            }
        }
    }

    /// The `Host` header requests to this endpoint carry.
    pub fn host(&self) -> Option<&HeaderValue> {
        self.host.as_ref()
    }

    /// Idle connections held now.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Sends `request` (origin-form URI, `Host` set) on an idle connection, or a new one. A
    /// reused connection that turns out closed before the request went out is replaced.
    pub async fn send(
        &self,
        mut request: http::Request<Full<Bytes>>,
    ) -> Result<(http::Response<hyper::body::Incoming>, Conn), PoolError> {
        loop {
            let (mut conn, reused) = match self.checkout() {
                Some(conn) => (conn, true),
                None => (self.connect().await?, false),
            };
            match conn.send(request).await {
                Ok(response) => return Ok((response, conn)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => request = unsent,
                    Some(_) => return Err(PoolError::Unsent(e.into_error())),
                    None => return Err(PoolError::Send(e.into_error())),
                },
            }
        }
    }

    /// Takes back a connection whose response was read to the end. Connections that sat idle
    /// past the idle timeout go on the way (see [`Pool::prune`]).
    pub fn put(&self, mut conn: Conn) {
        // Sees an engine's close if it came with the response's end, and leaves nothing
        // registered to wake the task that read the response.
        conn.settle();
        if conn.is_closed() || self.config.max_idle == 0 {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let expired = self.take_expired(&mut idle, now);
        if idle.len() < self.config.max_idle {
            idle.push_back(Idle { conn, since: now });
        }
        drop(idle);
        drop(expired);
    }

    /// Closes the connections that sat idle past the idle timeout. Nothing reads an idle
    /// connection, so an engine's close of one is only seen when it is taken; this keeps such
    /// sockets from lingering while the busier ones above them are reused (called on every
    /// put and every metrics scrape).
    pub fn prune(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let expired = self.take_expired(&mut idle, Instant::now());
        drop(idle);
        drop(expired);
    }

    /// The expired connections at the bottom of the stack (the longest idle), to be dropped
    /// once the lock is released.
    fn take_expired(&self, idle: &mut VecDeque<Idle>, now: Instant) -> Vec<Idle> {
        let mut expired = Vec::new();
        while idle
            .front()
            .is_some_and(|i| now.duration_since(i.since) >= self.config.idle_timeout)
        {
            expired.extend(idle.pop_front());
        }
        expired
    }

    /// The most recently returned connection that can take a request now. Closed and expired
    /// ones are dropped on the way; one not ready yet (hyper has not yet seen the end of its
    /// last response) is kept for later. Each is driven outside the pool's lock.
    fn checkout(&self) -> Option<Conn> {
        let now = Instant::now();
        let mut not_ready = Vec::new();
        let found = loop {
            let popped = self
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_back();
            let Some(mut i) = popped else {
                break None;
            };
            if now.duration_since(i.since) >= self.config.idle_timeout {
                continue;
            }
            // Reads what came since it was last driven: the end of its last response (hyper
            // then marks it ready), or the engine closing it.
            i.conn.settle();
            if i.conn.is_closed() {
                continue;
            }
            if i.conn.send.is_ready() {
                break Some(i.conn);
            }
            not_ready.push(i);
        };
        if !not_ready.is_empty() {
            // Back on top, the most recent first kept; any beyond the bound closed unlocked.
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let room = self.config.max_idle.saturating_sub(idle.len());
            let surplus = not_ready.split_off(room.min(not_ready.len()));
            idle.extend(not_ready.into_iter().rev());
            drop(idle);
            drop(surplus);
        }
        found
    }

    async fn connect(&self) -> Result<Conn, PoolError> {
        let (host, port) = self
            .target
            .as_ref()
            .map_err(|e| PoolError::Connect(e.clone()))?;
        // The TCP connect and the TLS handshake share one deadline.
        let timeout = self.config.connect_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let at = authority(host, *port);
        let connecting = tokio::net::TcpStream::connect((host.as_str(), *port));
        let tcp = match tokio::time::timeout_at(deadline, connecting).await {
            Err(_) => {
                return Err(PoolError::Connect(format!(
                    "connecting to {at} timed out after {timeout:?}"
                )))
            }
            Ok(Err(e)) => return Err(PoolError::Connect(format!("{at}: {e}"))),
            Ok(Ok(tcp)) => tcp,
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY not set: {e}");
        }
        let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
        if let Err(e) = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive) {
            tracing::debug!("TCP keep-alive not set: {e}");
        }
        if !self.https {
            return handshake(tcp, &at).await;
        }
        let Some(tls) = &self.config.tls else {
            return Err(PoolError::Connect(format!(
                "{at}: no TLS configured for https endpoints"
            )));
        };
        match tokio::time::timeout_at(deadline, tls.connect(host, tcp)).await {
            Err(_) => Err(PoolError::Connect(format!(
                "connecting to {at} timed out after {timeout:?} (in the TLS handshake)"
            ))),
            Ok(Err(e)) => Err(PoolError::Connect(format!(
                "{at}: {e}{}",
                tls.failure_hint(&e)
            ))),
            Ok(Ok(stream)) => handshake(stream, &at).await,
        }
    }

    /// What to add to the message of a connection that broke on its first request: for an https
    /// endpoint that asked for a client certificate the router does not have, a hint (under TLS
    /// 1.3 such an endpoint refuses the client only after the handshake, by closing).
    pub fn broken_hint(&self) -> &'static str {
        match &self.config.tls {
            Some(tls) if self.https => tls.identity_hint(),
            _ => "",
        }
    }
}

/// `host:port` as a URL writes it (an IPv6 address in brackets).
fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The HTTP/1.1 handshake over a connected (and, for https, secured) stream (no I/O yet: the
/// connection is driven by its users, see [`Conn`]).
async fn handshake<T>(io: T, authority: &str) -> Result<Conn, PoolError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| PoolError::Connect(format!("{authority}: {e}")))?;
    Ok(Conn {
        send,
        driver: Some(Box::pin(connection)),
    })
}

/// The largest `/metrics` body the router reads: vLLM's is tens of kilobytes; an engine behind
/// a bad proxy could send without end.
pub const METRICS_BODY_LIMIT: usize = 8 << 20;
/// The largest `/v1/models` or `/health` body the router reads.
pub const SMALL_BODY_LIMIT: usize = 1 << 20;

/// Why a [`get`] failed.
#[derive(Debug)]
pub enum GetError {
    /// The body exceeded the limit (bytes): a misconfigured endpoint, not a passing fault.
    TooLong(usize),
    /// An answer other than 2xx, and the start of its body (not shown by `Display`: a server
    /// may echo the credentials it refused, and these messages reach logs and `/engines`).
    Status(http::StatusCode, String),
    Failed(String),
}

impl std::fmt::Display for GetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GetError::TooLong(limit) => write!(f, "the answer is longer than {limit} bytes"),
            GetError::Status(status, _) => write!(f, "status {status}"),
            GetError::Failed(why) => f.write_str(why),
        }
    }
}

/// GETs `url` and returns the body of a 2xx answer, all within `timeout`; a body longer than
/// `limit` bytes is an error, read no further.
pub async fn get(
    client: &UpstreamClient,
    url: &str,
    timeout: Duration,
    limit: usize,
) -> Result<Bytes, GetError> {
    let failed = |e: String| GetError::Failed(e);
    let mut request = http::Request::get(url);
    if let Some(authorization) = &client.authorization {
        request = request.header(http::header::AUTHORIZATION, authorization.clone());
    }
    let request = request
        .body(Full::new(Bytes::new()))
        .map_err(|e| failed(e.to_string()))?;
    let fetch = async {
        let response = client.http.request(request).await.map_err(|e| {
            let chain = error_chain(&e);
            // A failure once connected (TLS 1.3: a server that wanted a client certificate may
            // refuse only after the handshake, by closing) is as the pool's `broken_hint` sees
            // it; a failure to connect says what it was.
            let hint = match (url.starts_with("https:"), chain.contains("(Connect)")) {
                (false, _) => "",
                (true, true) => client.tls.failure_hint(&chain),
                (true, false) => client.tls.identity_hint(),
            };
            failed(format!("{chain}{hint}"))
        })?;
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), limit)
            .collect()
            .await
            .map_err(|e| match e.is::<http_body_util::LengthLimitError>() {
                true => GetError::TooLong(limit),
                false => failed(e.to_string()),
            })?
            .to_bytes();
        if status.is_success() {
            Ok(body)
        } else {
            Err(GetError::Status(status, excerpt(&body)))
        }
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| failed(format!("no answer within {timeout:?}")))?
}

/// The start of an error answer's body on one line, control characters dropped (an API
/// server's `Status` says who may not do what).
pub fn excerpt(body: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX)]);
    let line = text
        .split_whitespace()
        .map(|word| word.chars().filter(|c| !c.is_control()).collect::<String>())
        .collect::<Vec<_>>()
        .join(" ");
    match body.len() > MAX {
        true => format!("{line}..."),
        false => line,
    }
}

/// An error and its causes, `outer: inner: ...` (hyper-util's own message is only "client error
/// (Connect)"; the cause, such as a refused connection or an untrusted certificate, is below).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // io::Error repeats its inner error's message as its own.
        if !out.ends_with(&text) {
            out = format!("{out}: {text}");
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn targets_host_headers_and_paths_come_from_the_url() {
        let p = Pool::new("http://engine-1:8000", PoolConfig::default());
        assert_eq!(p.target, Ok(("engine-1".to_string(), 8000)));
        assert_eq!(p.host().unwrap(), "engine-1:8000");
        let target = |p: &Pool, uri: &str| p.request_target(&uri.parse().unwrap()).unwrap();
        assert_eq!(target(&p, "/v1/completions?x=1"), "/v1/completions?x=1");
        assert_eq!(target(&p, "http://router:8000/v1/models"), "/v1/models");

        let p = Pool::new("http://10.0.0.7/prefix/", PoolConfig::default());
        assert_eq!(p.target, Ok(("10.0.0.7".to_string(), 80)));
        assert_eq!(p.host().unwrap(), "10.0.0.7");
        assert_eq!(target(&p, "/v1/models?a=b"), "/prefix/v1/models?a=b");
        assert_eq!(target(&p, "*"), "/prefix/");

        let p = Pool::new("http://[::1]:8100", PoolConfig::default());
        assert_eq!(p.target, Ok(("::1".to_string(), 8100)));
        assert_eq!(p.host().unwrap(), "[::1]:8100");
        assert!(!p.https);

        // https: port 443 unless given, and left out of `Host` only when it is 443.
        let p = Pool::new("https://engine-1/prefix", PoolConfig::default());
        assert_eq!(p.target, Ok(("engine-1".to_string(), 443)));
        assert_eq!(p.host().unwrap(), "engine-1");
        assert!(p.https);
        let p = Pool::new("https://engine-1:443", PoolConfig::default());
        assert_eq!(p.host().unwrap(), "engine-1");
        let p = Pool::new("https://engine-1:80", PoolConfig::default());
        assert_eq!(p.target, Ok(("engine-1".to_string(), 80)));
        assert_eq!(p.host().unwrap(), "engine-1:80");
        let p = Pool::new("http://engine-1:443", PoolConfig::default());
        assert_eq!(p.host().unwrap(), "engine-1:443");
        let p = Pool::new("https://[::1]:8443", PoolConfig::default());
        assert_eq!(p.target, Ok(("::1".to_string(), 8443)));
        assert_eq!(p.host().unwrap(), "[::1]:8443");
        let p = Pool::new("https://[::1]", PoolConfig::default());
        assert_eq!(p.target, Ok(("::1".to_string(), 443)));
        assert_eq!(p.host().unwrap(), "[::1]");
        assert_eq!(authority("::1", 443), "[::1]:443");
        assert_eq!(authority("10.0.0.7", 8443), "10.0.0.7:8443");
    }

    /// Without TLS configured an https endpoint is a connect error that says so, not a plain
    /// HTTP request sent to a TLS port.
    #[tokio::test]
    async fn https_without_tls_is_a_connect_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let p = Pool::new(
            &format!("https://{}", listener.local_addr().unwrap()),
            PoolConfig::default(),
        );
        let request = http::Request::get("/v1/models")
            .body(Full::new(Bytes::new()))
            .unwrap();
        match p.send(request).await {
            Err(PoolError::Connect(e)) => assert!(e.contains("no TLS configured"), "{e}"),
            other => panic!("{:?}", other.map(|(r, _)| r.status())),
        }
    }

    /// An engine on 127.0.0.1 that answers every request on a connection with `chunks` chunks
    /// written at once (chunked encoding); with `close_on`, after the first answer it waits for
    /// that signal, then closes the connection and notifies the `Notify` it returns;
    /// counts the connections it accepted.
    async fn bursty_engine(
        chunks: usize,
        close_on: Option<Arc<tokio::sync::Notify>>,
    ) -> (
        String,
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<tokio::sync::Notify>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let closed = Arc::new(tokio::sync::Notify::new());
        let (count, notify) = (accepted.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (notify, close_on) = (notify.clone(), close_on.clone());
                tokio::spawn(async move {
                    let mut answer =
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
                    for i in 0..chunks {
                        let event = format!("data: {i}\n\n");
                        answer.extend(format!("{:x}\r\n{event}\r\n", event.len()).bytes());
                    }
                    answer.extend(b"0\r\n\r\n");
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        let Ok(n) = socket.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            if socket.write_all(&answer).await.is_err() {
                                return;
                            }
                            if let Some(close_on) = &close_on {
                                close_on.notified().await;
                                drop(socket);
                                notify.notify_one();
                                return;
                            }
                        }
                    }
                });
            }
        });
        (url, accepted, closed)
    }

    /// Sends a GET on `pool` and reads the body to its end, driving the connection as the
    /// router's response body does; the connection goes back to the pool.
    async fn fetch(pool: &Pool) -> String {
        let request = http::Request::get("/v1/x")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (response, mut conn) = pool.send(request).await.expect("an answer");
        let mut body = response.into_body();
        let mut text = Vec::new();
        loop {
            let frame = std::future::poll_fn(|cx| conn.poll_frame(Pin::new(&mut body), cx));
            match tokio::time::timeout(Duration::from_secs(10), frame).await {
                Ok(Some(Ok(frame))) => text.extend_from_slice(frame.data_ref().unwrap()),
                Ok(None) => break,
                other => panic!("{:?}", other.map(|f| f.map(|f| f.is_ok()))),
            }
        }
        pool.put(conn);
        String::from_utf8(text).unwrap()
    }

    /// Connections have no task of their own: the reader of a response drives it, the pool
    /// settles it, and it is still reused for the next request, every chunk read through.
    #[tokio::test]
    async fn a_connection_driven_by_its_reader_is_read_through_and_reused() {
        // A burst longer than one read into hyper's buffer.
        let (url, accepted, _) = bursty_engine(3_000, None).await;
        let pool = Pool::new(&url, PoolConfig::default());
        let expected: String = (0..3_000).map(|i| format!("data: {i}\n\n")).collect();
        for _ in 0..3 {
            assert_eq!(fetch(&pool).await, expected);
            assert_eq!(pool.idle_count(), 1);
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// A pooled connection the engine closed while it sat idle is seen to be closed when taken,
    /// and the request goes out on a new one: the client never sees the old one's end.
    #[tokio::test]
    async fn an_idle_connection_the_engine_closed_is_replaced() {
        let close = Arc::new(tokio::sync::Notify::new());
        let (url, accepted, closed) = bursty_engine(2, Some(close.clone())).await;
        let pool = Pool::new(&url, PoolConfig::default());
        let expected = "data: 0\n\ndata: 1\n\n";
        assert_eq!(fetch(&pool).await, expected);
        assert_eq!(pool.idle_count(), 1);
        close.notify_one();
        closed.notified().await;
        // Lets the runtime's reactor see the engine's FIN before the next checkout.
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Seen closed when taken, not handed out for a request.
        assert!(pool.checkout().is_none());
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(fetch(&pool).await, expected);
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    /// Idle connections past the idle timeout are closed by `prune` (and on the next `put`),
    /// not kept until a checkout reaches them.
    #[tokio::test]
    async fn connections_idle_past_the_timeout_are_pruned() {
        let (url, _, _) = bursty_engine(1, None).await;
        let with_timeout = |idle_timeout| {
            Pool::new(
                &url,
                PoolConfig {
                    idle_timeout,
                    ..PoolConfig::default()
                },
            )
        };
        let (patient, brief) = (
            with_timeout(Duration::from_secs(3_600)),
            with_timeout(Duration::from_millis(50)),
        );
        for pool in [&patient, &brief] {
            assert_eq!(fetch(pool).await, "data: 0\n\n");
            assert_eq!(pool.idle_count(), 1);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        for pool in [&patient, &brief] {
            pool.prune();
        }
        assert_eq!(patient.idle_count(), 1);
        assert_eq!(brief.idle_count(), 0);
    }

    /// An endpoint that answers without end is cut off at the limit, long before the timeout,
    /// and a body within the limit is read whole.
    #[tokio::test]
    async fn get_stops_reading_at_the_limit() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = [0u8; 1024];
                    let n = socket.read(&mut request).await.unwrap_or(0);
                    let endless = request[..n].starts_with(b"GET /endless");
                    let head = match endless {
                        true => "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                        false => "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
                    };
                    let _ = socket.write_all(head.as_bytes()).await;
                    let chunk = format!("10000\r\n{}\r\n", "x".repeat(0x10000));
                    while endless && socket.write_all(chunk.as_bytes()).await.is_ok() {}
                });
            }
        });
        let c = client(
            Duration::from_secs(5),
            1,
            None,
            &ClientTls::new(None, None).unwrap(),
        );
        let timeout = Duration::from_secs(60);
        let e = get(&c, &format!("http://{addr}/endless"), timeout, 1 << 20)
            .await
            .unwrap_err();
        assert!(
            matches!(e, GetError::TooLong(limit) if limit == 1 << 20),
            "{e}"
        );
        assert_eq!(e.to_string(), "the answer is longer than 1048576 bytes");
        // A refused connection says so, not only "client error (Connect)".
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let refused = format!("http://{}/x", closed.local_addr().unwrap());
        drop(closed);
        let e = get(&c, &refused, timeout, 5).await.unwrap_err().to_string();
        assert!(
            e.starts_with("client error (Connect): ") && e.to_lowercase().contains("refused"),
            "{e}"
        );
        let body = get(&c, &format!("http://{addr}/small"), timeout, 5).await;
        assert_eq!(body.unwrap(), "hello");
        let e = get(&c, &format!("http://{addr}/small"), timeout, 4).await;
        assert!(matches!(e, Err(GetError::TooLong(4))));
    }
}
