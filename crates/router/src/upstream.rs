//! The pooled HTTP/1.1 client toward endpoints: keep-alive connections, TCP_NODELAY, a connect
//! timeout. One client serves proxying, scraping and health checks.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::time::Duration;

pub type UpstreamClient = Client<HttpConnector, Full<Bytes>>;

/// Builds the client.
pub fn client(connect_timeout: Duration, max_idle_per_host: usize) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_keepalive(Some(Duration::from_secs(30)));
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(max_idle_per_host)
        .build(connector)
}

/// GETs `url` and returns the body of a 2xx answer, all within `timeout`.
pub async fn get(client: &UpstreamClient, url: &str, timeout: Duration) -> Result<Bytes, String> {
    let request = http::Request::get(url)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let fetch = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if status.is_success() {
            Ok(body)
        } else {
            Err(format!("status {status}"))
        }
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}
