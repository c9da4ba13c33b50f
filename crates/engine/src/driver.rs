//! Runs the engine model in real time and hands each request its tokens.
//!
//! One task loops: `step` the model at virtual time `t`, sleep until `t + duration` on the wall
//! clock, then deliver the iteration's tokens. Virtual time is wall time since the engine started:
//! the next iteration starts where the last one ended, so a sleep that overshoots (tokio's timer
//! has millisecond granularity) is absorbed by the next one instead of accumulating. If the loop
//! falls more than [`MAX_LAG`] behind (the host is too slow for the model), it does not sleep and
//! does not try to catch up in a burst: it resynchronises virtual time to the wall clock and
//! counts it ([`LoopStats::resyncs`]).
//!
//! Delivery is a counter per request, not a queue of messages: the loop bumps `produced` and wakes
//! the request's task, which renders whatever is new. It can never fill up, so the model never
//! blocks on a slow client, and a slow client simply receives several tokens in one write. The map
//! of deliveries holds live requests only, bounded by the engine's own limits
//! (`max_num_seqs + max_num_queued_reqs`).
//!
//! A [`Ticket`] is held by whatever answers the request (the SSE body or the non-streaming
//! handler). Dropping it before the request finished, which is what happens when the client
//! disconnects, aborts the request in the model and frees its KV at once.

use qoe_core::Micros;
use qoe_sim::{Engine, EngineEvent, EngineStats, SimRequest, SubmitError};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

/// How far virtual time may trail the wall clock before the loop resynchronises (timer slack).
pub const MAX_LAG: Micros = 10_000;

/// Progress of one request, written by the loop, read by the request's task.
#[derive(Debug, Default)]
pub(crate) struct Delivery {
    /// Tokens generated so far.
    pub produced: AtomicU32,
    /// Set after the last token.
    pub finished: AtomicBool,
    /// Woken after every change (a stored permit covers a change between check and wait).
    pub notify: Notify,
}

struct Core {
    engine: Engine,
    deliveries: HashMap<u64, Arc<Delivery>>,
}

/// How well the loop keeps up with its clock (`GET /admin/stats`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoopStats {
    /// Iterations run.
    pub iterations: u64,
    /// Times virtual time fell more than `MAX_LAG` behind and was reset to the wall clock.
    pub resyncs: u64,
    /// Total virtual time lost to those resets, µs.
    pub behind_micros: u64,
    /// Largest lag of virtual time behind the wall clock seen at the start of an iteration, µs.
    pub max_lag_micros: u64,
    /// Tokens handed to requests.
    pub tokens_delivered: u64,
}

pub(crate) struct Driver {
    core: Mutex<Core>,
    wake: Notify,
    epoch: Instant,
    iterations: AtomicU64,
    resyncs: AtomicU64,
    behind: AtomicU64,
    max_lag: AtomicU64,
    delivered: AtomicU64,
}

impl Driver {
    pub fn new(engine: Engine) -> Self {
        Self {
            core: Mutex::new(Core {
                engine,
                deliveries: HashMap::new(),
            }),
            wake: Notify::new(),
            epoch: Instant::now(),
            iterations: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            behind: AtomicU64::new(0),
            max_lag: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        // A panic elsewhere must not take the engine down with it.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wall-clock microseconds since the engine started: the model's virtual time.
    pub fn now(&self) -> Micros {
        self.epoch.elapsed().as_micros() as Micros
    }

    /// Queues `req` in the model; the returned ticket follows it and aborts it when dropped early.
    pub fn submit(self: &Arc<Self>, req: SimRequest) -> Result<Ticket, SubmitError> {
        let id = req.id;
        let delivery = Arc::new(Delivery::default());
        {
            let mut core = self.lock();
            let now = self.now();
            core.engine.submit(req, now)?;
            core.deliveries.insert(id, delivery.clone());
        }
        self.wake.notify_one();
        Ok(Ticket {
            driver: self.clone(),
            id,
            delivery,
        })
    }

    fn abort(&self, id: u64) {
        let mut core = self.lock();
        let now = self.now();
        core.engine.abort(id, now);
        core.deliveries.remove(&id);
    }

    /// A copy of the model's statistics.
    pub fn stats(&self) -> EngineStats {
        self.lock().engine.stats().clone()
    }

    /// Sets the model's speed factor (the configured speed divided by the slow-down fault).
    pub fn set_speed(&self, speed: f64) {
        self.lock().engine.set_speed(speed);
    }

    pub fn loop_stats(&self) -> LoopStats {
        LoopStats {
            iterations: self.iterations.load(Ordering::Relaxed),
            resyncs: self.resyncs.load(Ordering::Relaxed),
            behind_micros: self.behind.load(Ordering::Relaxed),
            max_lag_micros: self.max_lag.load(Ordering::Relaxed),
            tokens_delivered: self.delivered.load(Ordering::Relaxed),
        }
    }

    /// The loop; returns when `shutdown` turns true (or its sender is gone).
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut events = Vec::new();
        // Virtual time at which the next iteration starts; `None` while idle.
        let mut vnow: Option<Micros> = None;
        loop {
            if *shutdown.borrow() {
                return;
            }
            if !self.lock().engine.has_work() {
                vnow = None;
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = shutdown.changed() => return,
                }
                continue;
            }
            let wall = self.now();
            if let Some(v) = vnow {
                self.max_lag
                    .fetch_max(wall.saturating_sub(v), Ordering::Relaxed);
            }
            let t = match vnow {
                None => wall,
                Some(v) if wall > v + MAX_LAG => {
                    self.resyncs.fetch_add(1, Ordering::Relaxed);
                    self.behind.fetch_add(wall - v, Ordering::Relaxed);
                    wall
                }
                Some(v) => v,
            };
            let dur = self.lock().engine.step(t, &mut events);
            self.iterations.fetch_add(1, Ordering::Relaxed);
            let end = t + dur;
            if end > self.now() {
                let deadline =
                    tokio::time::Instant::from_std(self.epoch + Duration::from_micros(end));
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => {}
                    _ = shutdown.changed() => return,
                }
            } else {
                // Behind the clock: no sleep, but let the connections run.
                tokio::task::yield_now().await;
            }
            vnow = Some(end);
            if !events.is_empty() {
                self.deliver(&mut events);
            }
        }
    }

    fn deliver(&self, events: &mut Vec<EngineEvent>) {
        let mut tokens = 0;
        let mut core = self.lock();
        for ev in events.drain(..) {
            match ev {
                EngineEvent::Token { id, .. } => {
                    if let Some(d) = core.deliveries.get(&id) {
                        d.produced.fetch_add(1, Ordering::Release);
                        d.notify.notify_one();
                        tokens += 1;
                    }
                }
                EngineEvent::Finished { id, .. } => {
                    if let Some(d) = core.deliveries.remove(&id) {
                        d.finished.store(true, Ordering::Release);
                        d.notify.notify_one();
                    }
                }
                EngineEvent::Preempted { .. } => {}
            }
        }
        drop(core);
        self.delivered.fetch_add(tokens, Ordering::Relaxed);
    }
}

/// A request in the model, owned by whatever answers it. Dropped before the request finished
/// (client gone, connection closed, server shutting down), it aborts the request.
pub(crate) struct Ticket {
    driver: Arc<Driver>,
    id: u64,
    delivery: Arc<Delivery>,
}

impl Ticket {
    pub fn delivery(&self) -> &Delivery {
        &self.delivery
    }

    /// `(finished, produced)`, read in that order: once `finished` is seen, `produced` is final.
    pub fn progress(&self) -> (bool, u32) {
        let fin = self.delivery.finished.load(Ordering::Acquire);
        (fin, self.delivery.produced.load(Ordering::Acquire))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.delivery.finished.load(Ordering::Acquire) {
            self.driver.abort(self.id);
        }
    }
}
