//! In-process simulated engines (`qoe_engine`, `tiny` profile) on 127.0.0.1, for the tests that
//! need an engine's real behaviour rather than a scripted mock.

use super::*;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub const MODEL: &str = "sim-llama";

/// A simulated engine in this process.
pub struct Engine {
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Engine {
    pub async fn start(flags: &[&str]) -> Engine {
        let mut all = vec!["--port", "0", "--profile", "tiny", "--model", MODEL];
        all.extend_from_slice(flags);
        let args = qoe_router::demo::engine_args(&all).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(qoe_engine::serve(args, listener, async {
            let _ = rx.await;
        }));
        Engine {
            url,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops the engine's server: open streams and queued requests end, the port closes.
    pub async fn kill(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("the engine stopped in time")
                .unwrap()
                .unwrap();
        }
    }

    pub async fn stats(&self, c: &TestClient) -> serde_json::Value {
        get(c, &format!("{}/admin/stats", self.url))
            .await
            .unwrap()
            .json()
    }

    pub async fn faults(&self, c: &TestClient, update: serde_json::Value) {
        let ans = post(
            c,
            &format!("{}/admin/config", self.url),
            &update.to_string(),
            &[],
        )
        .await;
        assert_eq!(ans.status, 200, "{}", String::from_utf8_lossy(&ans.body));
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}
