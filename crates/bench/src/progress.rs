//! A one-line progress bar on stderr while a run goes.
//!
//! Hand-rolled rather than a dependency: it is one line redrawn four times a second from a few
//! atomic counters, and shown only when stderr is a terminal (never in CI logs or pipes).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Counters a run updates and the bar reads.
#[derive(Debug, Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub finished: AtomicU64,
    pub errors: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.finished.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }
}

/// A running bar; [`Progress::finish`] erases it.
pub struct Progress {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

const WIDTH: usize = 24;

impl Progress {
    /// Starts drawing if `enabled` and stderr is a terminal. `planned_s` and `planned_requests`
    /// (either may be unknown) set how full the bar is.
    pub fn start(
        enabled: bool,
        label: String,
        counters: Arc<Counters>,
        start: Instant,
        planned_s: Option<f64>,
        planned_requests: Option<u64>,
    ) -> Progress {
        let (stop, mut stopped) = watch::channel(false);
        let task = (enabled && std::io::stderr().is_terminal()).then(|| {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stopped.changed() => break,
                    }
                    let line = render(
                        &label,
                        &counters,
                        start.elapsed().as_secs_f64(),
                        planned_s,
                        planned_requests,
                    );
                    let mut err = std::io::stderr().lock();
                    let _ = write!(err, "\r{line}\x1b[K");
                    let _ = err.flush();
                }
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "\r\x1b[K");
                let _ = err.flush();
            })
        });
        Progress { stop, task }
    }

    /// Stops and erases the bar.
    pub async fn finish(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// The bar's text.
pub fn render(
    label: &str,
    counters: &Counters,
    elapsed_s: f64,
    planned_s: Option<f64>,
    planned_requests: Option<u64>,
) -> String {
    let (sent, finished, errors) = counters.snapshot();
    let by_time = planned_s.map(|p| elapsed_s / p);
    let by_count = planned_requests.map(|n| sent as f64 / n.max(1) as f64);
    let frac = by_time
        .into_iter()
        .chain(by_count)
        .fold(0.0f64, f64::max)
        .clamp(0.0, 1.0);
    let full = (frac * WIDTH as f64).round() as usize;
    let bar = format!("{}{}", "#".repeat(full), "-".repeat(WIDTH - full));
    let time = match planned_s {
        Some(p) => format!("{elapsed_s:.1}/{p} s"),
        None => format!("{elapsed_s:.1} s"),
    };
    format!(
        "{label} [{bar}] {time}  sent {sent}  in flight {}  done {finished}  errors {errors}",
        sent.saturating_sub(finished)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_fill() {
        let c = Counters::default();
        c.sent.store(10, Ordering::Relaxed);
        c.finished.store(7, Ordering::Relaxed);
        c.errors.store(1, Ordering::Relaxed);
        let line = render("router", &c, 30.0, Some(60.0), None);
        assert!(
            line.starts_with("router [############------------] 30.0/60 s"),
            "{line}"
        );
        assert!(
            line.ends_with("sent 10  in flight 3  done 7  errors 1"),
            "{line}"
        );
        let line = render("x", &c, 1.0, None, Some(10));
        assert!(line.contains(&"#".repeat(WIDTH)), "{line}");
    }
}
