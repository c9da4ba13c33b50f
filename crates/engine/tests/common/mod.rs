//! A tiny HTTP/1.1 client over raw sockets (so tests control disconnects and see broken
//! connections as they are) and a server harness on an ephemeral port of 127.0.0.1.

#![allow(dead_code)]

use qoe_engine::{serve, EngineArgs};
use serde_json::Value;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Every test body runs under this bound.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test exceeded its time bound")
}

/// Options of a fast test engine: the tiny profile, one model named `m`.
pub fn tiny_args() -> EngineArgs {
    EngineArgs {
        port: 0,
        models: vec!["m".into()],
        profile: "tiny".into(),
        ..EngineArgs::default()
    }
}

pub struct Server {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    pub async fn start(args: EngineArgs) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(args, listener, async move {
            let _ = rx.await;
        }));
        Server {
            addr,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Triggers shutdown and waits for `serve` to return.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap()
    }

    pub async fn get(&self, path: &str) -> Resp {
        request(self.addr, "GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: &str) -> Resp {
        request(self.addr, "POST", path, Some(body)).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Resp {
        self.post(path, &body.to_string()).await
    }

    /// Opens a request and reads its head; the body is read by the caller.
    pub async fn open(&self, path: &str, body: &Value) -> Conn {
        let mut c = Conn::send(self.addr, "POST", path, Some(&body.to_string())).await;
        c.read_head().await.unwrap();
        c
    }

    /// A metric's value (the first sample whose line starts with `prefix`).
    pub async fn metric(&self, prefix: &str) -> f64 {
        let text = self.get("/metrics").await.body;
        metric_in(&text, prefix).unwrap_or_else(|| panic!("no {prefix} in /metrics"))
    }
}

pub fn metric_in(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub async fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Resp {
    let mut c = Conn::send(addr, method, path, body).await;
    let (status, headers) = c.read_head().await.unwrap();
    let body = c.read_body().await.unwrap();
    Resp {
        status,
        headers,
        body: String::from_utf8(body).unwrap(),
    }
}

/// One HTTP/1.1 exchange on its own connection (`Connection: close`).
pub struct Conn {
    reader: BufReader<TcpStream>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    chunked: bool,
    length: Option<usize>,
    /// Bytes of the body not yet split into SSE events.
    pending: Vec<u8>,
    body_done: bool,
}

impl Conn {
    pub async fn send(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Conn {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let mut reader = BufReader::new(stream);
        let body = body.unwrap_or("");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        reader.get_mut().write_all(req.as_bytes()).await.unwrap();
        Conn {
            reader,
            status: 0,
            headers: Vec::new(),
            chunked: false,
            length: None,
            pending: Vec::new(),
            body_done: false,
        }
    }

    pub async fn read_head(&mut self) -> std::io::Result<(u16, Vec<(String, String)>)> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "no response",
            ));
        }
        let status: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut headers = Vec::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line).await?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').unwrap();
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        self.chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        self.length = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map(|(_, v)| v.parse().unwrap());
        self.status = status;
        self.headers = headers.clone();
        Ok((status, headers))
    }

    /// The next piece of body; `Ok(None)` at a clean end, `Err` if the connection broke first.
    pub async fn next_piece(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        if self.body_done {
            return Ok(None);
        }
        if self.chunked {
            let mut line = String::new();
            if self.reader.read_line(&mut line).await? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed inside a chunked body",
                ));
            }
            let size = usize::from_str_radix(line.trim(), 16).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("bad chunk size {line:?}"),
                )
            })?;
            let mut data = vec![0; size + 2];
            self.reader.read_exact(&mut data).await?;
            data.truncate(size);
            if size == 0 {
                self.body_done = true;
                return Ok(None);
            }
            Ok(Some(data))
        } else if let Some(len) = self.length {
            let mut data = vec![0; len];
            self.reader.read_exact(&mut data).await?;
            self.body_done = true;
            Ok(Some(data))
        } else {
            let mut data = Vec::new();
            self.reader.read_to_end(&mut data).await?;
            self.body_done = true;
            Ok(Some(data))
        }
    }

    pub async fn read_body(&mut self) -> std::io::Result<Vec<u8>> {
        let mut all = Vec::new();
        while let Some(p) = self.next_piece().await? {
            all.extend_from_slice(&p);
        }
        Ok(all)
    }

    /// The next SSE event's data (without `data: `); `Ok(None)` at the end of the body.
    pub async fn next_event(&mut self) -> std::io::Result<Option<String>> {
        loop {
            if let Some(pos) = self.pending.windows(2).position(|w| w == b"\n\n") {
                let ev: Vec<u8> = self.pending.drain(..pos + 2).collect();
                let text = String::from_utf8(ev).unwrap();
                let data = text
                    .trim_end()
                    .strip_prefix("data: ")
                    .expect("an SSE data line");
                return Ok(Some(data.to_string()));
            }
            match self.next_piece().await? {
                Some(p) => self.pending.extend_from_slice(&p),
                None => {
                    assert!(
                        self.pending.is_empty(),
                        "trailing bytes: {:?}",
                        self.pending
                    );
                    return Ok(None);
                }
            }
        }
    }

    /// All remaining SSE events.
    pub async fn events(&mut self) -> std::io::Result<Vec<String>> {
        let mut out = Vec::new();
        while let Some(e) = self.next_event().await? {
            out.push(e);
        }
        Ok(out)
    }
}

/// Polls `/metrics` until `prefix`'s value satisfies `ok` (bounded by the test timeout).
pub async fn wait_metric(server: &Server, prefix: &str, ok: impl Fn(f64) -> bool) -> f64 {
    loop {
        let v = server.metric(prefix).await;
        if ok(v) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
