//! The HTTP/1.1 clients toward endpoints, both with keep-alive connections, TCP_NODELAY and a
//! connect timeout.
//!
//! * [`Pool`]: each endpoint's own connections for proxied requests. A lean pool of
//!   `hyper::client::conn::http1` connections: a checkout is a pop from a short stack under the
//!   endpoint's own lock, with no per-request task, URI rewriting or `Host` formatting; the
//!   connection goes back when its response body has been read to the end (see
//!   [`crate::observe`]), and a connection found closed before a request went out is replaced
//!   transparently.
//! * [`UpstreamClient`]: hyper-util's general client, for scrapes and health checks.
//!
//! Both speak `https` to an endpoint whose URL says so ([`qoe_tls`]); the pool's TLS
//! handshake counts toward the connect timeout.

use bytes::Bytes;
use http::HeaderValue;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use qoe_tls::{ClientTls, HttpsConnector};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The client for the router's own requests to endpoints, with the `Authorization` it sends
/// (`--upstream-api-key`).
#[derive(Clone, Debug)]
pub struct UpstreamClient {
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    authorization: Option<HeaderValue>,
}

impl UpstreamClient {
    /// What the router sends endpoints as `Authorization` (`--upstream-api-key`), if anything.
    pub fn authorization(&self) -> Option<&HeaderValue> {
        self.authorization.as_ref()
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
/// been read to its end.
pub type Conn = SendRequest<Full<Bytes>>;

/// Why [`Pool::send`] produced no response.
#[derive(Debug)]
pub enum PoolError {
    /// No connection: nothing was sent.
    Connect(String),
    /// The connection failed with the request (possibly) sent.
    Send(hyper::Error),
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
    idle: Mutex<Vec<Idle>>,
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
            idle: Mutex::new(Vec::new()),
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
            match conn.try_send_request(request).await {
                Ok(response) => return Ok((response, conn)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(PoolError::Send(e.into_error())),
                },
            }
        }
    }

    /// Takes back a connection whose response was read to the end.
    pub fn put(&self, conn: Conn) {
        if conn.is_closed() || self.config.max_idle == 0 {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.config.max_idle {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// The most recently returned connection that can take a request now. Closed and expired
    /// ones are dropped on the way; one not ready yet (its connection task has not yet seen the
    /// end of the last response) is kept for later.
    fn checkout(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let mut not_ready = Vec::new();
        let mut found = None;
        while let Some(i) = idle.pop() {
            if i.conn.is_closed() || now.duration_since(i.since) >= self.config.idle_timeout {
                continue;
            }
            if i.conn.is_ready() {
                found = Some(i.conn);
                break;
            }
            not_ready.push(i);
        }
        idle.extend(not_ready.into_iter().rev());
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
                tls.identity_hint()
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

/// The HTTP/1.1 handshake over a connected (and, for https, secured) stream; the connection's
/// task runs until the connection ends.
async fn handshake<T>(io: T, authority: &str) -> Result<Conn, PoolError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (conn, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| PoolError::Connect(format!("{authority}: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("upstream connection ended: {e}");
        }
    });
    Ok(conn)
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
    Failed(String),
}

impl std::fmt::Display for GetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GetError::TooLong(limit) => write!(f, "the answer is longer than {limit} bytes"),
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
        let response = client
            .http
            .request(request)
            .await
            .map_err(|e| failed(error_chain(&e)))?;
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
            Err(failed(format!("status {status}")))
        }
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| failed(format!("no answer within {timeout:?}")))?
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
