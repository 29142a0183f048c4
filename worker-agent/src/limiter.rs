//! The concurrency limit of one version: at most `limit` invocations run at once, at most
//! `max_waiting` more wait for a slot, and anything beyond that is refused at once (the listener
//! answers 429). The limit changes when reconciliation changes the instance count; invocations
//! already running keep their slots.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// A version's slots and queue.
#[derive(Debug)]
pub struct Limiter {
    state: Mutex<State>,
    freed: Notify,
}

#[derive(Debug)]
struct State {
    limit: usize,
    running: usize,
    waiting: usize,
    max_waiting: usize,
}

/// Why no slot was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

/// A running invocation's slot; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    limiter: Arc<Limiter>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limiter.lock().running -= 1;
        self.limiter.freed.notify_one();
    }
}

/// Counts a waiter out again however its wait ends (a slot, or the caller going away).
struct Waiting<'a>(&'a Limiter);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.lock().waiting -= 1;
    }
}

impl Limiter {
    /// `limit` running at once (at least one), `max_waiting` queued.
    pub fn new(limit: usize, max_waiting: usize) -> Arc<Limiter> {
        Arc::new(Limiter {
            state: Mutex::new(State { limit: limit.max(1), running: 0, waiting: 0, max_waiting }),
            freed: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the limit; waiters get the new slots at once.
    pub fn set_limit(&self, limit: usize) {
        self.lock().limit = limit.max(1);
        self.freed.notify_waiters();
    }

    /// The limit now.
    pub fn limit(&self) -> usize {
        self.lock().limit
    }

    /// Invocations waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.lock().waiting
    }

    /// A slot: at once when one is free, after waiting when the queue has room, else
    /// [`QueueFull`].
    pub async fn acquire(self: &Arc<Self>) -> Result<Slot, QueueFull> {
        {
            let mut s = self.lock();
            if s.running < s.limit {
                s.running += 1;
                return Ok(Slot { limiter: self.clone() });
            }
            if s.waiting >= s.max_waiting {
                return Err(QueueFull);
            }
            s.waiting += 1;
        }
        let _waiting = Waiting(self);
        loop {
            // Registered before the check, so a slot freed in between still wakes this waiter.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut s = self.lock();
                if s.running < s.limit {
                    s.running += 1;
                    return Ok(Slot { limiter: self.clone() });
                }
            }
            freed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn slots_then_queue_then_refusal() {
        let l = Limiter::new(1, 1);
        let first = l.acquire().await.unwrap();
        let waiter = tokio::spawn({
            let l = l.clone();
            async move { l.acquire().await.map(drop) }
        });
        while l.waiting() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(l.acquire().await.unwrap_err(), QueueFull);
        drop(first);
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert_eq!(l.waiting(), 0);
        let _again = l.acquire().await.unwrap();
    }

    #[tokio::test]
    async fn raising_the_limit_lets_waiters_in_and_cancelled_waiters_leave_the_queue() {
        let l = Limiter::new(1, 4);
        let _held = l.acquire().await.unwrap();
        let waiter = tokio::spawn({
            let l = l.clone();
            async move { l.acquire().await.map(drop) }
        });
        let cancelled = tokio::spawn({
            let l = l.clone();
            async move { l.acquire().await.map(drop) }
        });
        while l.waiting() < 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        cancelled.abort();
        let _ = cancelled.await;
        assert_eq!(l.waiting(), 1);
        l.set_limit(2);
        assert_eq!(waiter.await.unwrap(), Ok(()));
    }
}
