//! Admission control: when every candidate endpoint is saturated, requests wait in the router, in
//! priority order, instead of piling into the engines' FCFS queues where priority is lost.
//!
//! An endpoint is saturated when any configured limit is reached: requests in flight
//! (`--max-inflight-per-endpoint`), KV-cache usage or engine waiting queue from fresh metrics.
//! Waiters are ordered by priority, then deadline (earliest SLA first), then arrival. The queue
//! is bounded in length (`--queue-max`) and in wait (`--queue-timeout`); a full queue sheds the
//! lowest priority first: a priority-1 arrival displaces the worst waiter with a lower priority,
//! otherwise the arrival itself is refused. The endpoint is chosen at dispatch time, when
//! capacity frees, by the routing policy as usual.
//!
//! Order holds among requests for the same model (and stage of disaggregated serving, see
//! [`lane`]): they compete for the same endpoints. A waiter
//! for another model neither holds a request back nor takes its wake-up: capacity freed on an
//! endpoint wakes the most urgent waiter for a model that endpoint serves. A waiter keeps its
//! place from the time it joins until it is dispatched or gives up, woken or not, so a newcomer
//! cannot slip past one that is re-checking.
//!
//! No wake-up is lost between looking and waiting. A request that found every endpoint saturated
//! is not yet listening when it joins (or, re-checking, rejoins) the queue; a wake-up that found
//! no one listening is counted ([`Admission::lost_wakes`]), and a request that saw a different
//! count before it looked starts its wait already woken, to look again at once rather than
//! wait for the next tick.

use qoe_core::{EndpointView, Micros, Priority, Stage};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::oneshot;

/// Limits that make an endpoint saturated, and the queue's bounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdmissionConfig {
    /// When an endpoint counts as saturated (the rule shared with the simulator).
    pub limits: qoe_core::saturation::SaturationLimits,
    pub queue_max: usize,
    pub queue_timeout: Duration,
}

impl AdmissionConfig {
    /// Whether any limit is set.
    pub fn enabled(&self) -> bool {
        self.limits.enabled()
    }

    /// Whether `view` is saturated at `now` (the rule in `qoe_core::saturation`).
    pub fn saturated(&self, view: &EndpointView, now: Micros) -> bool {
        self.limits.saturated(view, now)
    }
}

/// A waiter's place: lower sorts first (served first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct QueueKey {
    pub priority: Priority,
    /// Absolute deadline of the first token (arrival + SLA), `Micros::MAX` without one.
    pub deadline: Micros,
    pub seq: u64,
}

/// Why a waiter was woken.
#[derive(Debug, PartialEq, Eq)]
pub enum Wake {
    /// Capacity may have freed: try again.
    Retry,
    /// A more urgent request took this place in a full queue.
    Displaced,
}

/// The lane a request waits in: its model, and for a stage of disaggregated serving the stage
/// too. Requests compete for the same endpoints only within a lane: a decode stage neither
/// waits behind prefill stages nor takes the wake-up of a prefill endpoint's capacity.
pub fn lane(model: &str, stage: Stage) -> Cow<'_, str> {
    match stage {
        Stage::Whole => Cow::Borrowed(model),
        Stage::Prefill => Cow::Owned(format!("{model}{LANE_MARK}prefill")),
        Stage::Decode => Cow::Owned(format!("{model}{LANE_MARK}decode")),
    }
}

/// Separates a lane's model from its stage (a character no model name has).
const LANE_MARK: char = '\u{1f}';

/// The model and stage of a [`lane`].
pub fn lane_parts(lane: &str) -> (&str, Stage) {
    match lane.split_once(LANE_MARK) {
        Some((model, "prefill")) => (model, Stage::Prefill),
        Some((model, "decode")) => (model, Stage::Decode),
        _ => (lane, Stage::Whole),
    }
}

/// Why a request could not wait.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The queue is full of requests at least as urgent.
    QueueFull,
}

#[derive(Debug)]
struct Waiter {
    /// Its [`lane`]: the model, and the stage of a disaggregated request.
    model: Box<str>,
    /// `None` once woken (or timed out), until the waiter waits again.
    wake: Option<oneshot::Sender<Wake>>,
}

#[derive(Debug, Default)]
struct Queue {
    waiters: BTreeMap<QueueKey, Waiter>,
}

/// The router's admission queue.
#[derive(Debug)]
pub struct Admission {
    pub config: AdmissionConfig,
    queue: Mutex<Queue>,
    /// Wake-ups that found no waiter listening (see the module docs). Written only with the
    /// queue locked, so that joining the queue and this count are one step for a waker; read
    /// without the lock before looking at the endpoints.
    lost_wakes: AtomicU64,
    /// The last [`QueueKey::seq`] handed out (arrival order, without the queue's lock).
    last_seq: AtomicU64,
}

impl Admission {
    pub fn new(config: AdmissionConfig) -> Self {
        Admission {
            config,
            queue: Mutex::new(Queue::default()),
            lost_wakes: AtomicU64::new(0),
            last_seq: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh key for a request arriving now.
    pub fn key(&self, priority: Priority, deadline: Option<Micros>) -> QueueKey {
        QueueKey {
            priority,
            deadline: deadline.unwrap_or(Micros::MAX),
            seq: self.last_seq.fetch_add(1, Ordering::Relaxed) + 1,
        }
    }

    /// Requests waiting now.
    pub fn len(&self) -> usize {
        self.lock().waiters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a request with `key` for `model` should wait even though capacity is open: true
    /// when a more urgent request for the same model is waiting (no overtaking).
    pub fn behind_someone(&self, key: &QueueKey, model: &str) -> bool {
        self.lock()
            .waiters
            .range(..*key)
            .any(|(_, w)| &*w.model == model)
    }

    /// Wake-ups so far that found no waiter listening: read before looking at the endpoints,
    /// handed to [`enqueue`](Self::enqueue) or [`rearm`](Self::rearm) when they were all
    /// saturated.
    pub fn lost_wakes(&self) -> u64 {
        // SeqCst: what freed the capacity happened before the count moved, so a request that
        // reads the new count also sees the capacity when it looks.
        self.lost_wakes.load(Ordering::SeqCst)
    }

    /// Joins the queue. Returns the receiver to await (already woken when a wake-up was lost
    /// since `seen`, see [`lost_wakes`](Self::lost_wakes)), or a refusal when the queue is full
    /// of requests at least as urgent.
    pub fn enqueue(
        &self,
        key: QueueKey,
        model: &str,
        seen: u64,
    ) -> Result<oneshot::Receiver<Wake>, Refusal> {
        let mut q = self.lock();
        if q.waiters.len() >= self.config.queue_max.max(1) {
            let worst = *q.waiters.keys().next_back().expect("full queue has a last");
            if worst.priority <= key.priority {
                return Err(Refusal::QueueFull);
            }
            // One re-checking (no sender) learns it when it waits again (`rearm`).
            if let Some(tx) = q.waiters.remove(&worst).and_then(|w| w.wake) {
                let _ = tx.send(Wake::Displaced);
            }
        }
        let missed = self.lost_wakes() != seen;
        let (wake, rx) = Self::listen(missed);
        let waiter = Waiter {
            model: model.into(),
            wake,
        };
        q.waiters.insert(key, waiter);
        Ok(rx)
    }

    /// Waits again in the same place (already woken when a wake-up was lost since `seen`);
    /// `None` when the place was taken meanwhile (displaced).
    pub fn rearm(&self, key: &QueueKey, seen: u64) -> Option<oneshot::Receiver<Wake>> {
        let mut q = self.lock();
        let missed = self.lost_wakes() != seen;
        let waiter = q.waiters.get_mut(key)?;
        let (wake, rx) = Self::listen(missed);
        waiter.wake = wake;
        Some(rx)
    }

    /// A waiter's channel: listening, or (`missed`) woken at once and so not listening.
    fn listen(missed: bool) -> (Option<oneshot::Sender<Wake>>, oneshot::Receiver<Wake>) {
        let (tx, rx) = oneshot::channel();
        if missed {
            let _ = tx.send(Wake::Retry);
            (None, rx)
        } else {
            (Some(tx), rx)
        }
    }

    /// Leaves the queue (dispatched, timed out, or the client left). A waiter that was woken
    /// passes the wake-up on to the next one for its model: it took a seat that may leave room
    /// for more, or gave up the one it was woken for.
    pub fn leave(&self, key: &QueueKey) {
        let mut q = self.lock();
        if let Some(waiter) = q.waiters.remove(key) {
            // Not waiting at the moment (woken, or between ticks): it was re-checking.
            if waiter.wake.as_ref().is_none_or(|tx| tx.is_closed()) {
                let _ = self.wake_first(&mut q, |model| model == &*waiter.model);
            }
        }
    }

    /// Capacity freed on an endpoint serving the models for which `serves` holds: wake the most
    /// urgent waiter for one of them to try again. `false` when no one was listening: the
    /// wake-up counted as lost ([`lost_wakes`](Self::lost_wakes)).
    pub fn notify(&self, serves: impl Fn(&str) -> bool) -> bool {
        self.wake_first(&mut self.lock(), serves)
    }

    /// `q`: the queue, locked.
    fn wake_first(&self, q: &mut Queue, serves: impl Fn(&str) -> bool) -> bool {
        for waiter in q.waiters.values_mut() {
            if waiter.wake.is_none() || !serves(&waiter.model) {
                continue;
            }
            if let Some(tx) = waiter.wake.take() {
                if tx.send(Wake::Retry).is_ok() {
                    return true;
                }
            }
        }
        self.lost_wakes.fetch_add(1, Ordering::SeqCst);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(queue_max: usize) -> AdmissionConfig {
        AdmissionConfig {
            limits: qoe_core::saturation::SaturationLimits {
                max_inflight: 2,
                max_kv_usage: 1.0,
                max_waiting: 0,
                metrics_max_age: 3_000_000,
            },
            queue_max,
            queue_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn saturation_by_inflight_and_fresh_metrics() {
        let mut c = config(4);
        let mut v = EndpointView::idle(0, 1);
        assert!(!c.saturated(&v, 10));
        v.load.in_decode = 2;
        assert!(c.saturated(&v, 10));
        v.load.in_decode = 0;
        c.limits.max_kv_usage = 0.9;
        v.engine = Some(qoe_core::EngineMetrics {
            kv_usage: Some(0.95),
            ..Default::default()
        });
        v.engine_at = Some(5);
        assert!(c.saturated(&v, 10));
        assert!(!c.saturated(&v, 10_000_000), "stale metrics are not used");
    }

    #[tokio::test]
    async fn serves_by_priority_then_deadline_and_sheds_low_priority_when_full() {
        let a = Admission::new(config(2));
        let any = |_: &str| true;
        let p3 = a.key(Priority::LOW, None);
        let p2_late = a.key(Priority::DEFAULT, Some(900));
        let mut rx3 = a.enqueue(p3, "m", 0).unwrap();
        let rx2 = a.enqueue(p2_late, "m", 0).unwrap();
        // Full: a priority-2 arrival cannot displace the priority-2 waiter... but can the p3.
        let p2_early = a.key(Priority::DEFAULT, Some(500));
        let rx2e = a.enqueue(p2_early, "m", 0).unwrap();
        assert_eq!(rx3.try_recv(), Ok(Wake::Displaced));
        // Full of priority 2: another priority 3 is refused.
        assert_eq!(
            a.enqueue(a.key(Priority::LOW, None), "m", 0).unwrap_err(),
            Refusal::QueueFull
        );
        assert!(a.behind_someone(&a.key(Priority::DEFAULT, Some(600)), "m"));
        assert!(!a.behind_someone(&a.key(Priority::HIGH, None), "m"));
        // Capacity frees: the earliest deadline among priority 2 goes first.
        a.notify(any);
        assert_eq!(rx2e.await, Ok(Wake::Retry));
        // Woken, it keeps its place while it re-checks: no newcomer passes it.
        assert!(a.behind_someone(&a.key(Priority::DEFAULT, None), "m"));
        a.notify(any);
        assert_eq!(rx2.await, Ok(Wake::Retry));
        a.leave(&p2_early);
        a.leave(&p2_late);
        assert!(a.is_empty());
    }

    /// The stages of disaggregated requests wait in lanes of their own: a decode stage is not
    /// behind an earlier prefill stage of its model, and a decode endpoint's capacity wakes it.
    #[tokio::test]
    async fn each_stage_waits_in_its_own_lane() {
        let a = Admission::new(config(8));
        let (prefill, decode) = (lane("m", Stage::Prefill), lane("m", Stage::Decode));
        assert_eq!(lane_parts(&prefill), ("m", Stage::Prefill));
        assert_eq!(lane_parts(&decode), ("m", Stage::Decode));
        assert_eq!(lane_parts(&lane("m", Stage::Whole)), ("m", Stage::Whole));
        let mut rx_prefill = a.enqueue(a.key(Priority::HIGH, None), &prefill, 0).unwrap();
        let later = a.key(Priority::LOW, None);
        assert!(!a.behind_someone(&later, &decode));
        assert!(a.behind_someone(&a.key(Priority::LOW, None), &prefill));
        let rx_decode = a.enqueue(later, &decode, 0).unwrap();
        // What a decode endpoint of m takes (its role's stages).
        a.notify(|l| {
            let (model, stage) = lane_parts(l);
            model == "m" && qoe_core::Role::Decode.takes(stage)
        });
        assert_eq!(rx_decode.await, Ok(Wake::Retry));
        assert_eq!(
            rx_prefill.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        );
    }

    /// Waiters for another model neither hold a request back nor take its wake-up.
    #[tokio::test]
    async fn order_and_wake_ups_are_per_model() {
        let a = Admission::new(config(8));
        let first_b = a.key(Priority::HIGH, None);
        let mut rx_b = a.enqueue(first_b, "b", 0).unwrap();
        let later_a = a.key(Priority::LOW, None);
        assert!(
            !a.behind_someone(&later_a, "a"),
            "b's waiter holds no a back"
        );
        assert!(a.behind_someone(&a.key(Priority::LOW, None), "b"));
        let rx_a = a.enqueue(later_a, "a", 0).unwrap();
        // Capacity freed on an endpoint serving only a: a's waiter, not the more urgent b.
        a.notify(|m| m == "a");
        assert_eq!(rx_a.await, Ok(Wake::Retry));
        assert_eq!(rx_b.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        // A woken waiter that leaves (dispatched, or giving up) wakes the next for its model.
        let next_a = a.key(Priority::LOW, None);
        let rx_next = a.enqueue(next_a, "a", 0).unwrap();
        a.leave(&later_a);
        assert_eq!(rx_next.await, Ok(Wake::Retry));
        assert_eq!(rx_b.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        // One that leaves while waiting (it was never woken) passes nothing on.
        let waiting_b = a.key(Priority::LOW, None);
        let _rx_waiting = a.enqueue(waiting_b, "b", 0).unwrap();
        a.leave(&waiting_b);
        assert_eq!(rx_b.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        // Displaced while re-checking: told when it would wait again.
        let small = Admission::new(config(1));
        let low = small.key(Priority::LOW, None);
        let rx = small.enqueue(low, "a", 0).unwrap();
        small.notify(|_| true);
        assert_eq!(rx.await, Ok(Wake::Retry));
        small
            .enqueue(small.key(Priority::HIGH, None), "a", 0)
            .unwrap();
        assert!(small.rearm(&low, 0).is_none());
    }

    /// A wake-up that finds no one listening is not lost on a request that was looking at the
    /// endpoints meanwhile: its wait starts woken. One that looked after it waits as usual.
    #[tokio::test]
    async fn a_wake_up_while_looking_is_not_lost() {
        let a = Admission::new(config(8));
        // A newcomer looks (every endpoint saturated); capacity frees before it joins.
        let seen = a.lost_wakes();
        assert!(!a.notify(|_| true), "no one listens yet");
        let first = a.key(Priority::DEFAULT, None);
        let mut rx = a.enqueue(first, "m", seen).unwrap();
        assert_eq!(rx.try_recv(), Ok(Wake::Retry), "it looks again at once");
        // Re-checking, it finds everything saturated again; the next wait is a real one.
        let seen = a.lost_wakes();
        let mut rx = a.rearm(&first, seen).unwrap();
        assert_eq!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        // Woken; while it re-checks, more capacity frees and finds no one listening.
        assert!(a.notify(|_| true));
        assert_eq!(rx.await, Ok(Wake::Retry));
        let seen = a.lost_wakes();
        a.notify(|_| true);
        let mut rx = a.rearm(&first, seen).unwrap();
        assert_eq!(
            rx.try_recv(),
            Ok(Wake::Retry),
            "the wake-up it missed is not lost"
        );
        // A wake-up that reached a listening waiter is no one's loss.
        let second = a.key(Priority::LOW, None);
        let seen = a.lost_wakes();
        let rx2 = a.enqueue(second, "m", seen).unwrap();
        let seen_first = a.lost_wakes();
        assert!(a.notify(|_| true));
        assert_eq!(rx2.await, Ok(Wake::Retry));
        let mut rx = a.rearm(&first, seen_first).unwrap();
        assert_eq!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty));
    }
}
