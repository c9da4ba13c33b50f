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

use qoe_core::{EndpointView, Micros, Priority};
use std::collections::BTreeMap;
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

/// Why a request could not wait.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The queue is full of requests at least as urgent.
    QueueFull,
}

#[derive(Debug, Default)]
struct Queue {
    waiters: BTreeMap<QueueKey, oneshot::Sender<Wake>>,
    next_seq: u64,
}

/// The router's admission queue.
#[derive(Debug)]
pub struct Admission {
    pub config: AdmissionConfig,
    queue: Mutex<Queue>,
}

impl Admission {
    pub fn new(config: AdmissionConfig) -> Self {
        Admission {
            config,
            queue: Mutex::new(Queue::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh key for a request arriving now.
    pub fn key(&self, priority: Priority, deadline: Option<Micros>) -> QueueKey {
        let mut q = self.lock();
        q.next_seq += 1;
        QueueKey {
            priority,
            deadline: deadline.unwrap_or(Micros::MAX),
            seq: q.next_seq,
        }
    }

    /// Requests waiting now.
    pub fn len(&self) -> usize {
        self.lock().waiters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a request with `key` should wait behind the queue even though capacity is open:
    /// true when someone more urgent is already waiting (no overtaking).
    pub fn behind_someone(&self, key: &QueueKey) -> bool {
        self.lock()
            .waiters
            .keys()
            .next()
            .is_some_and(|head| head < key)
    }

    /// Joins the queue. Returns the receiver to await, or a refusal when the queue is full of
    /// requests at least as urgent.
    pub fn enqueue(&self, key: QueueKey) -> Result<oneshot::Receiver<Wake>, Refusal> {
        let mut q = self.lock();
        if q.waiters.len() >= self.config.queue_max.max(1) {
            let worst = *q.waiters.keys().next_back().expect("full queue has a last");
            if worst.priority <= key.priority {
                return Err(Refusal::QueueFull);
            }
            if let Some(tx) = q.waiters.remove(&worst) {
                let _ = tx.send(Wake::Displaced);
            }
        }
        let (tx, rx) = oneshot::channel();
        q.waiters.insert(key, tx);
        Ok(rx)
    }

    /// Leaves the queue (timed out, woken, or the client left).
    pub fn leave(&self, key: &QueueKey) {
        self.lock().waiters.remove(key);
    }

    /// Capacity freed somewhere: wake the most urgent waiter to try again.
    pub fn notify(&self) {
        let mut q = self.lock();
        while let Some((_, tx)) = q.waiters.pop_first() {
            if tx.send(Wake::Retry).is_ok() {
                return;
            }
        }
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
        let p3 = a.key(Priority::LOW, None);
        let p2_late = a.key(Priority::DEFAULT, Some(900));
        let mut rx3 = a.enqueue(p3).unwrap();
        let rx2 = a.enqueue(p2_late).unwrap();
        // Full: a priority-2 arrival cannot displace the priority-2 waiter... but can the p3.
        let p2_early = a.key(Priority::DEFAULT, Some(500));
        let rx2e = a.enqueue(p2_early).unwrap();
        assert_eq!(rx3.try_recv(), Ok(Wake::Displaced));
        // Full of priority 2: another priority 3 is refused.
        assert_eq!(
            a.enqueue(a.key(Priority::LOW, None)).unwrap_err(),
            Refusal::QueueFull
        );
        assert!(a.behind_someone(&a.key(Priority::DEFAULT, Some(600))));
        assert!(!a.behind_someone(&a.key(Priority::HIGH, None)));
        // Capacity frees: the earliest deadline among priority 2 goes first.
        a.notify();
        assert_eq!(rx2e.await, Ok(Wake::Retry));
        a.notify();
        assert_eq!(rx2.await, Ok(Wake::Retry));
        assert!(a.is_empty());
    }
}
