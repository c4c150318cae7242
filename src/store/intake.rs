//! Where a group-commit task's requests wait for their batch: two queues, one for work that
//! finishes accepted work (results, acks, claims) and one for new work (submits, sends).
//!
//! A batch is formed once the committer holds the write connection, so it holds everything that
//! arrived while it waited: every finishing request waiting (up to a count), then new requests
//! while their cost fits the batch's budget for new work. The committer waits for the
//! connection in the finishing lane whenever a finishing request waits, moving there from the
//! other lane when one arrives meanwhile.
//!
//! New work is paced by finishing work: in a batch that finishes work, new work may cost no
//! more than the work the batch finishes (each finishing request weighs what it can finish: a
//! result one step, an ack one message, an auto-acking claim its `limit`), so while the store
//! is saturated work is let in only as fast as it leaves, and what is accepted does not pile up
//! in the agents' queues. A batch of new work alone takes the whole budget. The first new request always fits,
//! so one larger than the budget still goes, alone. Under overload accepted work keeps
//! finishing at the store's pace, and the new work's queue — bounded by [`crate::admission`]
//! — is where the wait shows.

use std::collections::VecDeque;
use std::future::Future;

use tokio::sync::mpsc;

use super::Lane;

/// What a batch may take.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Finishing requests at most.
    pub finishing: usize,
    /// New work's cost at most (see [`intake`]'s `cost`).
    pub new: u64,
    /// New work's cost allowed in a batch that finishes work, however little it finishes: new
    /// work is paced only once batches finish more than this.
    pub new_floor: u64,
}

/// The receiving side of a committer's two queues.
pub struct Intake<F, N> {
    finishing: mpsc::Receiver<F>,
    new: mpsc::Receiver<N>,
    /// Received while waiting, not yet in a batch.
    held_finishing: VecDeque<F>,
    held_new: VecDeque<N>,
    weight: fn(&F) -> u64,
    cost: fn(&N) -> u64,
}

/// A batch: the finishing requests, then the new ones.
pub struct Batch<F, N> {
    pub finishing: Vec<F>,
    pub new: Vec<N>,
}

impl<F, N> Batch<F, N> {
    pub fn is_empty(&self) -> bool {
        self.finishing.is_empty() && self.new.is_empty()
    }
}

/// The two queues of `capacity` requests each; `weight` is the work a finishing request can
/// finish, `cost` what a new request adds (both in the same units as [`Budget::new`]).
pub fn intake<F, N>(
    capacity: usize,
    weight: fn(&F) -> u64,
    cost: fn(&N) -> u64,
) -> (mpsc::Sender<F>, mpsc::Sender<N>, Intake<F, N>) {
    let (finishing_tx, finishing) = mpsc::channel(capacity);
    let (new_tx, new) = mpsc::channel(capacity);
    let intake = Intake {
        finishing,
        new,
        held_finishing: VecDeque::new(),
        held_new: VecDeque::new(),
        weight,
        cost,
    };
    (finishing_tx, new_tx, intake)
}

impl<F, N> Intake<F, N> {
    /// Waits until a request waits. False once both queues are closed and empty.
    pub async fn ready(&mut self) -> bool {
        if !self.held_finishing.is_empty() || !self.held_new.is_empty() {
            return true;
        }
        tokio::select! {
            biased;
            Some(job) = self.finishing.recv() => self.held_finishing.push_back(job),
            Some(job) = self.new.recv() => self.held_new.push_back(job),
            else => return false,
        }
        true
    }

    fn finishing_waits(&self) -> bool {
        !self.held_finishing.is_empty() || !self.finishing.is_empty()
    }

    /// Waits for the write connection with `open(lane)` in the finishing lane when finishing
    /// work waits, else in the other lane until finishing work arrives. `open` must only wait
    /// for the connection (it may be dropped while waiting), not start using it.
    pub async fn turn<T, Fut>(&mut self, open: impl Fn(Lane) -> Fut) -> T
    where
        Fut: Future<Output = T>,
    {
        if !self.finishing_waits() {
            tokio::select! {
                biased;
                turn = open(Lane::Other) => return turn,
                Some(job) = self.finishing.recv() => self.held_finishing.push_back(job),
            }
        }
        open(Lane::Finish).await
    }

    /// Takes a batch: what waits, finishing work first, within `budget`.
    pub fn take(&mut self, budget: Budget) -> Batch<F, N> {
        let mut finishing: Vec<F> = Vec::new();
        while finishing.len() < budget.finishing {
            let Some(job) = next(&mut self.held_finishing, &mut self.finishing) else {
                break;
            };
            finishing.push(job);
        }
        let budget_new = match finishing.is_empty() {
            true => budget.new,
            false => {
                let finishes: u64 = finishing.iter().map(|job| (self.weight)(job)).sum();
                budget.new.min(finishes.max(budget.new_floor))
            }
        };
        let mut new = Vec::new();
        let mut spent = 0;
        while let Some(job) = next(&mut self.held_new, &mut self.new) {
            let cost = (self.cost)(&job);
            if !new.is_empty() && spent + cost > budget_new {
                // Next batch's first.
                self.held_new.push_front(job);
                break;
            }
            spent += cost;
            new.push(job);
            if spent >= budget_new {
                break;
            }
        }
        Batch { finishing, new }
    }

    /// Stops taking requests (the service stops): what is queued can still be taken.
    pub fn close(&mut self) {
        self.finishing.close();
        self.new.close();
    }
}

/// The next request of one queue: one held back first, else one waiting in the channel.
fn next<T>(held: &mut VecDeque<T>, queue: &mut mpsc::Receiver<T>) -> Option<T> {
    held.pop_front().or_else(|| queue.try_recv().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: Budget = Budget {
        finishing: 3,
        new: 100,
        new_floor: 4,
    };

    /// Finishing requests weigh their value, new ones cost theirs.
    fn queues(finishing: &[u64], new: &[u64]) -> Intake<u64, u64> {
        let (finishing_tx, new_tx, intake) = intake(16, |f| *f, |n| *n);
        finishing
            .iter()
            .for_each(|f| finishing_tx.try_send(*f).unwrap());
        new.iter().for_each(|n| new_tx.try_send(*n).unwrap());
        intake
    }

    #[test]
    fn new_work_alone_takes_the_whole_budget_and_one_too_large_goes_alone() {
        let mut intake = queues(&[], &[60, 40, 1, 500, 1]);
        assert_eq!(intake.take(BUDGET).new, [60, 40]);
        assert_eq!(intake.take(BUDGET).new, [1]);
        assert_eq!(intake.take(BUDGET).new, [500]);
        assert_eq!(intake.take(BUDGET).new, [1]);
    }

    #[test]
    fn beside_finishing_work_new_work_costs_no_more_than_it_finishes() {
        // Finishing first, at most 3; then new work up to the 30 the three can finish.
        let mut intake = queues(&[10, 10, 10, 10], &[20, 10, 5]);
        let batch = intake.take(BUDGET);
        assert_eq!(
            (batch.finishing, batch.new),
            (vec![10, 10, 10], vec![20, 10])
        );
        // Little finished: the floor still lets new work in.
        let batch = intake.take(BUDGET);
        assert_eq!((batch.finishing, batch.new), (vec![10], vec![5]));
        let mut intake = queues(&[1], &[3, 1, 1]);
        assert_eq!(intake.take(BUDGET).new, [3, 1]);
    }
}
