//! Runs the engine model in real time and hands each request its tokens.
//!
//! # Keeping the clock
//!
//! Virtual time is wall time since the engine started. One task loops: `step` the model at
//! virtual time `t`, sleep until `t + duration` on the wall clock, then deliver the iteration's
//! tokens. The next iteration starts at `t + duration`, not whenever the loop woke up, so a sleep
//! that overshoots (tokio's timer has millisecond granularity) is absorbed instead of accumulating.
//!
//! The host can stall the loop: a burst of connections to accept, a scheduling hiccup, a core
//! shared with other work. A real engine's GPU does not notice; it keeps computing while its host
//! is busy, and the host then finds several iterations' outputs waiting and sends them at once
//! (vLLM's output handler merges the deltas a slow consumer has not taken yet). The loop does the
//! same. When the next iteration's start is already past, it runs the due iterations back to back
//! without sleeping, delivering each one's tokens ([`LoopStats::catch_up_iterations`]), and lets
//! the connections run every [`CATCH_UP_SLICE`]. Each stream then writes all its new tokens in one
//! frame, so falling behind makes delivery cheaper per token, which is what lets the loop catch
//! up. No virtual time is lost. A request that arrives meanwhile is stamped with its wall-clock
//! arrival, and the model schedules no request in an iteration that starts before its arrival, so
//! catching up never streams a new request's tokens faster than the model produces them. Tokens
//! are never delivered before their virtual time, only after it (by the lag).
//!
//! Only when the lag exceeds a bound ([`DEFAULT_CATCH_UP_LIMIT`], `--catch-up-limit-ms`) does the
//! loop give up on the lost time: virtual time jumps to the wall clock, and the jump is counted
//! ([`LoopStats::resyncs`], [`LoopStats::lost_micros`]). A lag that large means the host is too
//! slow for the model, not briefly busy: a real engine in that state is CPU-bound, its iterations
//! really do take longer, and the lost time is how much longer. Catching up on more would only
//! prolong a burst of late tokens. `GET /admin/stats` reports the lag now and its maximum, so
//! "keeps its clock" is a number: no resyncs, no time lost.
//!
//! # Delivery
//!
//! Delivery is a counter per request, not a queue of messages: the loop bumps `produced` and wakes
//! the request's task, which renders whatever is new. It can never fill up, so the model never
//! blocks on a slow client, and a slow client simply receives several tokens in one write. The
//! wake-up is a single waker slot ([`AtomicWaker`]): the task registers itself before it checks
//! for news, and only the first wake-up after a registration reaches the scheduler, so a task is
//! woken at most once however many tokens arrive before it runs. The map of deliveries holds live
//! requests only, bounded by the engine's own limits (`max_num_seqs + max_num_queued_reqs`). When
//! the loop ends (shutdown, or a bug), every live delivery is closed and woken, so no request
//! waits for tokens that will not come.
//!
//! A [`Ticket`] is held by whatever answers the request (the SSE body or the non-streaming
//! handler). Dropping it before the request finished, which is what happens when the client
//! disconnects, aborts the request in the model and frees its KV at once.

use futures_util::task::AtomicWaker;
use qoe_core::Micros;
use qoe_sim::rng::mix64;
use qoe_sim::{Engine, EngineEvent, EngineStats, SimRequest, SubmitError};
use serde::Serialize;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

/// Default bound on how far virtual time may trail the wall clock and still be caught up, µs.
pub const DEFAULT_CATCH_UP_LIMIT: Micros = 1_000_000;

/// Longest run of back-to-back catch-up iterations before the loop lets the connections write
/// what accumulated (and accept, and answer), µs of wall time.
pub const CATCH_UP_SLICE: Micros = 2_000;

/// `next_start` while the engine is idle.
const IDLE: u64 = u64::MAX;

/// Progress of one request, written by the loop, read by the request's task.
#[derive(Debug, Default)]
pub(crate) struct Delivery {
    /// Tokens generated so far.
    produced: AtomicU32,
    /// Set after the last token.
    finished: AtomicBool,
    /// Set when the loop ended before the request finished: no more tokens will come.
    closed: AtomicBool,
    /// The task waiting for the next change, woken after it.
    waker: AtomicWaker,
}

impl Delivery {
    fn wake(&self) {
        self.waker.wake();
    }
}

/// Hashes request ids (a counter) for the map of deliveries, looked up once per token: one
/// multiply-xorshift mix instead of SipHash. The ids are the engine's own, not the client's.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = mix64(self.0 ^ b as u64);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = mix64(self.0 ^ v);
    }
}

type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// A snapshot of a request's [`Delivery`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Progress {
    pub produced: u32,
    /// The last token is in `produced`.
    pub finished: bool,
    /// The engine stopped: `produced` is all there will be.
    pub closed: bool,
}

struct Core {
    engine: Engine,
    deliveries: IdMap<Arc<Delivery>>,
    /// The loop has ended; submissions are refused.
    closed: bool,
}

/// Why [`Driver::submit`] refused a request.
#[derive(Debug)]
pub(crate) enum Refused {
    /// The model refused it.
    Model(SubmitError),
    /// The engine is shutting down.
    Closed,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Model(e) => e.fmt(f),
            Self::Closed => f.write_str("the engine is shutting down"),
        }
    }
}

/// How well the loop keeps its clock (`GET /admin/stats`). It kept it when `resyncs` is 0.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LoopStats {
    /// Iterations run.
    pub iterations: u64,
    /// Iterations that were already due when they were run (back to back, without sleeping),
    /// catching up after the host held the loop back.
    pub catch_up_iterations: u64,
    /// How far virtual time trails the wall clock now, µs (0 when on time or idle).
    pub lag_micros: u64,
    /// Largest lag seen at the start of an iteration, µs.
    pub max_lag_micros: u64,
    /// The lag beyond which the loop stops catching up and resynchronises, µs.
    pub catch_up_limit_micros: u64,
    /// Times the lag exceeded `catch_up_limit_micros` and virtual time jumped to the wall clock.
    pub resyncs: u64,
    /// Total virtual time dropped by those jumps, µs.
    pub lost_micros: u64,
    /// Tokens handed to requests.
    pub tokens_delivered: u64,
    /// Response body frames the streams wrote, one write each: `tokens_delivered /
    /// frames_written` is how many tokens a write carries (1 when on time, more after catching
    /// up or for a slow client).
    pub frames_written: u64,
}

pub(crate) struct Driver {
    core: Mutex<Core>,
    wake: Notify,
    epoch: Instant,
    catch_up_limit: Micros,
    /// Virtual start of the next iteration, or [`IDLE`].
    next_start: AtomicU64,
    iterations: AtomicU64,
    catch_up: AtomicU64,
    resyncs: AtomicU64,
    lost: AtomicU64,
    max_lag: AtomicU64,
    delivered: AtomicU64,
    frames: AtomicU64,
}

impl Driver {
    /// A driver that catches up on lags up to `catch_up_limit` µs and resynchronises beyond.
    pub fn new(engine: Engine, catch_up_limit: Micros) -> Self {
        Self {
            core: Mutex::new(Core {
                engine,
                deliveries: IdMap::default(),
                closed: false,
            }),
            wake: Notify::new(),
            epoch: Instant::now(),
            catch_up_limit,
            next_start: AtomicU64::new(IDLE),
            iterations: AtomicU64::new(0),
            catch_up: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            max_lag: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            frames: AtomicU64::new(0),
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
    pub fn submit(self: &Arc<Self>, req: SimRequest) -> Result<Ticket, Refused> {
        let id = req.id;
        let delivery = Arc::new(Delivery::default());
        {
            let mut core = self.lock();
            if core.closed {
                return Err(Refused::Closed);
            }
            // Stamped under the lock: arrivals reach the model in the order of their stamps.
            let now = self.now();
            core.engine.submit(req, now).map_err(Refused::Model)?;
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
        let lag = match self.next_start.load(Ordering::Relaxed) {
            IDLE => 0,
            start => self.now().saturating_sub(start),
        };
        LoopStats {
            iterations: self.iterations.load(Ordering::Relaxed),
            catch_up_iterations: self.catch_up.load(Ordering::Relaxed),
            lag_micros: lag,
            max_lag_micros: self.max_lag.load(Ordering::Relaxed),
            catch_up_limit_micros: self.catch_up_limit,
            resyncs: self.resyncs.load(Ordering::Relaxed),
            lost_micros: self.lost.load(Ordering::Relaxed),
            tokens_delivered: self.delivered.load(Ordering::Relaxed),
            frames_written: self.frames.load(Ordering::Relaxed),
        }
    }

    /// The loop; returns when `shutdown` turns true (or its sender is gone), closing every live
    /// delivery on the way out (also if it panics).
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let _close = CloseOnDrop(&self);
        let mut events = Vec::new();
        // Virtual time at which the next iteration starts; `None` while idle.
        let mut next: Option<Micros> = None;
        // Wall time at which the current run of back-to-back iterations began.
        let mut burst_from: Option<Micros> = None;
        loop {
            if *shutdown.borrow() {
                return;
            }
            if !self.lock().engine.has_work() {
                next = None;
                burst_from = None;
                self.next_start.store(IDLE, Ordering::Relaxed);
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = shutdown.changed() => return,
                }
                continue;
            }
            let wall = self.now();
            let t = match next {
                None => wall,
                Some(v) => {
                    let lag = wall.saturating_sub(v);
                    self.max_lag.fetch_max(lag, Ordering::Relaxed);
                    if lag > self.catch_up_limit {
                        self.resyncs.fetch_add(1, Ordering::Relaxed);
                        self.lost.fetch_add(lag, Ordering::Relaxed);
                        wall
                    } else {
                        v
                    }
                }
            };
            let dur = self.lock().engine.step(t, &mut events);
            self.iterations.fetch_add(1, Ordering::Relaxed);
            let end = t + dur;
            next = Some(end);
            self.next_start.store(end, Ordering::Relaxed);
            let due = end <= self.now();
            if due {
                self.catch_up.fetch_add(1, Ordering::Relaxed);
            } else {
                burst_from = None;
                let deadline =
                    tokio::time::Instant::from_std(self.epoch + Duration::from_micros(end));
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => {}
                    _ = shutdown.changed() => return,
                }
            }
            if !events.is_empty() {
                self.deliver(&mut events);
            }
            if due {
                let now = self.now();
                if now - *burst_from.get_or_insert(wall) >= CATCH_UP_SLICE {
                    burst_from = None;
                    tokio::task::yield_now().await;
                }
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
                        d.wake();
                        tokens += 1;
                    }
                }
                EngineEvent::Finished { id, .. } => {
                    if let Some(d) = core.deliveries.remove(&id) {
                        d.finished.store(true, Ordering::Release);
                        d.wake();
                    }
                }
                EngineEvent::Preempted { .. } => {}
            }
        }
        drop(core);
        self.delivered.fetch_add(tokens, Ordering::Relaxed);
    }

    /// Refuses new requests and closes every live delivery.
    fn close(&self) {
        let mut core = self.lock();
        core.closed = true;
        for (_, d) in core.deliveries.drain() {
            d.closed.store(true, Ordering::Release);
            d.wake();
        }
    }
}

struct CloseOnDrop<'a>(&'a Driver);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close();
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
    /// Where the request stands. `finished` and `closed` are read before `produced`: once either
    /// is seen, `produced` is final.
    pub fn progress(&self) -> Progress {
        let finished = self.delivery.finished.load(Ordering::Acquire);
        let closed = self.delivery.closed.load(Ordering::Acquire);
        Progress {
            produced: self.delivery.produced.load(Ordering::Acquire),
            finished,
            closed,
        }
    }

    /// Ready with the new [`Ticket::progress`] once it differs from `seen`; otherwise registers
    /// the task to be woken at the next change. Only the task that polled last is woken.
    pub fn poll_changed(&self, cx: &mut Context<'_>, seen: Progress) -> Poll<Progress> {
        // Register first, then look: a change after the look wakes the registered task.
        self.delivery.waker.register(cx.waker());
        match self.progress() {
            p if p == seen => Poll::Pending,
            p => Poll::Ready(p),
        }
    }

    /// Counts a body frame written for this request ([`LoopStats::frames_written`]).
    pub fn count_frame(&self) {
        self.driver.frames.fetch_add(1, Ordering::Relaxed);
    }

    /// Resolves with the new [`Ticket::progress`] once it differs from `seen`.
    pub async fn changed(&self, seen: Progress) -> Progress {
        std::future::poll_fn(|cx| self.poll_changed(cx, seen)).await
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.delivery.finished.load(Ordering::Acquire) {
            self.driver.abort(self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qoe_sim::{EngineConfig, Profile};

    fn start(catch_up_limit: Micros) -> (Arc<Driver>, watch::Sender<bool>) {
        let engine = Engine::new(EngineConfig::for_profile(Profile::tiny())).unwrap();
        let driver = Arc::new(Driver::new(engine, catch_up_limit));
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(driver.clone().run(stopped));
        (driver, stop)
    }

    /// Holds the runtime's only thread, as a busy host would: the loop cannot run meanwhile.
    fn stall_host(ms: u64) {
        std::thread::sleep(Duration::from_millis(ms));
    }

    async fn until_done(t: &Ticket) -> Progress {
        loop {
            let p = t.progress();
            if p.finished || p.closed {
                return p;
            }
            t.changed(p).await;
        }
    }

    const TOKENS: u32 = 500;

    #[tokio::test]
    async fn a_stall_within_the_limit_is_caught_up_and_loses_no_time() {
        let (d, stop) = start(60_000_000);
        let tickets: Vec<Ticket> = (0..8)
            .map(|i| d.submit(SimRequest::new(i, 16, TOKENS)).unwrap())
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        stall_host(300);
        // Arrives while the loop is behind: it joins the catch-up at its own arrival time.
        let late = d.submit(SimRequest::new(100, 16, 5)).unwrap();
        for t in &tickets {
            let p = until_done(t).await;
            assert_eq!((p.produced, p.finished, p.closed), (TOKENS, true, false));
        }
        assert_eq!(until_done(&late).await.produced, 5);
        let s = d.loop_stats();
        assert_eq!((s.resyncs, s.lost_micros), (0, 0), "{s:?}");
        assert!(s.catch_up_iterations > 0, "{s:?}");
        // The loop slept through the stall, less at most one (few-ms) iteration.
        assert!(s.max_lag_micros >= 200_000, "{s:?}");
        assert_eq!(s.tokens_delivered, 8 * TOKENS as u64 + 5);
        let e = d.stats();
        assert_eq!(
            (e.generation_tokens, e.submitted),
            (8 * TOKENS as u64 + 5, 9)
        );
        stop.send(true).unwrap();
    }

    #[tokio::test]
    async fn a_stall_beyond_the_limit_resyncs_and_counts_the_time_lost() {
        let (d, stop) = start(50_000);
        let tickets: Vec<Ticket> = (0..4)
            .map(|i| d.submit(SimRequest::new(i, 16, TOKENS)).unwrap())
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        stall_host(300);
        for t in &tickets {
            let p = until_done(t).await;
            assert_eq!((p.produced, p.finished), (TOKENS, true));
        }
        let s = d.loop_stats();
        assert!(s.resyncs >= 1, "{s:?}");
        assert!(s.lost_micros >= 200_000, "{s:?}");
        assert!(s.max_lag_micros >= 200_000, "{s:?}");
        assert_eq!(s.catch_up_limit_micros, 50_000);
        assert_eq!(s.tokens_delivered, 4 * TOKENS as u64);
        stop.send(true).unwrap();
    }

    #[tokio::test]
    async fn a_stopped_loop_closes_live_requests_and_refuses_new_ones() {
        let (d, stop) = start(DEFAULT_CATCH_UP_LIMIT);
        let t = d.submit(SimRequest::new(1, 16, TOKENS)).unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        stop.send(true).unwrap();
        let p = until_done(&t).await;
        assert!(p.closed && !p.finished && p.produced < TOKENS, "{p:?}");
        assert!(matches!(
            d.submit(SimRequest::new(2, 16, 1)),
            Err(Refused::Closed)
        ));
        drop(t);
        assert_eq!(
            d.stats().running,
            0,
            "the dropped ticket aborted its request"
        );
    }
}
