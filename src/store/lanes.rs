//! The write connection's lock, in two lanes: [`Lane::Finish`] for work that finishes work already
//! accepted (step results, acks, claims, lease extensions, a handoff's answer, a round's
//! response), [`Lane::Other`] for the rest (new work: sends, submits, handoff initiations; the
//! background loop; everything else). When the holder lets go, a waiter in the finishing lane
//! goes first, so under overload accepted work keeps finishing while new work waits (and is
//! refused at its bound, see [`crate::admission`]). The other lane is never starved: after
//! [`FINISH_STREAK`] turns in a row went to the finishing lane while it waited, it gets one.
//! Within a lane, first come, first served.
//!
//! The lock hands the value itself from holder to waiter (through a oneshot channel) instead of
//! guarding it in place: no unsafe code, and a waiter that gives up (its future dropped, e.g. a
//! cancelled request) gives back a value it was handed but never took.

use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

/// Which lane a writer waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Finishes accepted work: served first.
    Finish,
    /// Everything else.
    Other,
}

/// Turns in a row the finishing lane may take while the other lane waits.
pub const FINISH_STREAK: u32 = 8;

struct State<T> {
    /// The value, when nobody holds it (then no one waits either).
    free: Option<T>,
    finish: VecDeque<oneshot::Sender<T>>,
    other: VecDeque<oneshot::Sender<T>>,
    /// Turns given to the finishing lane in a row while the other lane waited.
    streak: u32,
}

/// A lock with two lanes around a value; cheap to clone (the clones share the value).
pub struct LaneLock<T> {
    state: Arc<Mutex<State<T>>>,
}

impl<T> Clone for LaneLock<T> {
    fn clone(&self) -> Self {
        LaneLock {
            state: self.state.clone(),
        }
    }
}

impl<T> LaneLock<T> {
    pub fn new(value: T) -> Self {
        LaneLock {
            state: Arc::new(Mutex::new(State {
                free: Some(value),
                finish: VecDeque::new(),
                other: VecDeque::new(),
                streak: 0,
            })),
        }
    }

    // A std mutex: it is held for a few pointer moves and never across an `.await`.
    fn state(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for the value in `lane`.
    pub async fn lock(&self, lane: Lane) -> LaneGuard<T> {
        let rx = {
            let mut state = self.state();
            if let Some(value) = state.free.take() {
                return LaneGuard {
                    value: Some(value),
                    lock: self.clone(),
                };
            }
            let (tx, rx) = oneshot::channel();
            match lane {
                Lane::Finish => state.finish.push_back(tx),
                Lane::Other => state.other.push_back(tx),
            }
            rx
        };
        let mut waiting = Waiting {
            rx: Some(rx),
            lock: self,
        };
        let rx = waiting.rx.as_mut().expect("set above");
        // Every queued sender is either handed the value or dropped once its receiver is gone,
        // and this receiver lives: the value comes.
        let value = rx.await.expect("the lock hands its value to every waiter");
        waiting.rx = None;
        LaneGuard {
            value: Some(value),
            lock: self.clone(),
        }
    }

    /// Hands the value to the next waiter (finishing lane first, but for the other lane's turn
    /// after a streak), or keeps it free.
    fn release(&self, mut value: T) {
        let mut state = self.state();
        loop {
            let others_turn = state.streak >= FINISH_STREAK && !state.other.is_empty();
            let next = match state.finish.pop_front() {
                Some(tx) if !others_turn => Some((tx, Lane::Finish)),
                skipped => {
                    if let Some(tx) = skipped {
                        state.finish.push_front(tx);
                    }
                    state.other.pop_front().map(|tx| (tx, Lane::Other))
                }
            };
            let Some((tx, lane)) = next else {
                state.free = Some(value);
                return;
            };
            match tx.send(value) {
                Ok(()) => {
                    state.streak = match lane {
                        Lane::Finish if !state.other.is_empty() => state.streak + 1,
                        _ => 0,
                    };
                    return;
                }
                // That waiter gave up: the next one.
                Err(back) => value = back,
            }
        }
    }
}

/// A waiter's receiver: dropped before it took the value, it gives back one it was sent.
struct Waiting<'a, T> {
    rx: Option<oneshot::Receiver<T>>,
    lock: &'a LaneLock<T>,
}

impl<T> Drop for Waiting<'_, T> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if let Ok(value) = rx.try_recv() {
                self.lock.release(value);
            }
        }
    }
}

/// The value, held; released to the next waiter on drop.
pub struct LaneGuard<T> {
    /// Always `Some` until dropped.
    value: Option<T>,
    lock: LaneLock<T>,
}

impl<T> Deref for LaneGuard<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.value.as_ref().expect("held until dropped")
    }
}

impl<T> DerefMut for LaneGuard<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.value.as_mut().expect("held until dropped")
    }
}

impl<T> Drop for LaneGuard<T> {
    fn drop(&mut self) {
        if let Some(value) = self.value.take() {
            self.lock.release(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use std::future::Future;
    use std::pin::Pin;

    type Queued = Pin<Box<dyn Future<Output = ()> + Send>>;

    /// A waiter in `lane` that records `name` once it holds the lock, polled once so it queues.
    fn queue(lock: &LaneLock<Vec<&'static str>>, lane: Lane, name: &'static str) -> Queued {
        let lock = lock.clone();
        let mut waiter: Queued = Box::pin(async move { lock.lock(lane).await.push(name) });
        assert!(waiter.as_mut().now_or_never().is_none(), "{name} waits");
        waiter
    }

    #[tokio::test]
    async fn the_finishing_lane_goes_first_and_the_other_is_not_starved() {
        let lock = LaneLock::new(Vec::new());
        let held = lock.lock(Lane::Other).await;
        let mut waiters = vec![
            queue(&lock, Lane::Other, "new-1"),
            queue(&lock, Lane::Other, "new-2"),
        ];
        for name in ["f1", "f2", "f3", "f4", "f5", "f6", "f7", "f8", "f9", "f10"] {
            waiters.push(queue(&lock, Lane::Finish, name));
        }
        drop(held);
        futures_util::future::join_all(waiters).await;
        let order = lock.lock(Lane::Other).await.clone();
        assert_eq!(
            order,
            [
                "f1", "f2", "f3", "f4", "f5", "f6", "f7", "f8", "new-1", "f9", "f10", "new-2"
            ]
        );
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_passes_the_lock_on() {
        let lock = LaneLock::new(Vec::new());
        let held = lock.lock(Lane::Other).await;
        // One gives up while queued, one after it was handed the lock but before it took it.
        let queued = queue(&lock, Lane::Finish, "gave up queued");
        let handed = queue(&lock, Lane::Finish, "gave up handed");
        let next = queue(&lock, Lane::Other, "next");
        drop(queued);
        drop(held); // hands the value to `handed`, which is never polled again
        drop(handed);
        next.await;
        assert_eq!(*lock.lock(Lane::Other).await, ["next"]);
    }
}
