//! Fans events out to this instance's WebSocket connections.
//!
//! Each connection registers a bounded channel. Dispatch never waits: a connection whose buffer
//! is full is dropped from the hub and flagged, and its socket task closes it with 4008 (slow
//! consumer). A `std::sync::Mutex` is right here: it is held only to walk the subscriber lists,
//! never across an `.await`. Dispatch only hands out a shared [`Dispatched`] event: the frames
//! are rendered outside the lock by the first connection that sends each kind, so dispatching
//! costs the committer that publishes (it holds the write connection) next to nothing.
//!
//! Events may arrive out of `seq` order: with several instances each publishes its own commits.
//! A connection only ever moves forward, so the hub watches the sequence: a gap (an older event
//! still on its way, or lost by pub/sub) sends every connection back to the log, which already
//! holds everything up to the newest event seen (the store commits in `seq` order); the late
//! event, when it comes, is dropped.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::mpsc;

use super::Event;

/// What a connection receives.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// An event, shared by every connection it is dispatched to.
    Frame(Arc<Dispatched>),
    /// The broker subscription was interrupted: events may have been missed, re-read the log.
    Resync,
}

/// An event as the hub hands it out, with its two frames, each rendered once (by the first
/// connection that sends it) and shared by the others.
#[derive(Debug)]
pub struct Dispatched {
    pub event: Event,
    agent_frame: OnceLock<String>,
    firehose_frame: OnceLock<String>,
}

impl Dispatched {
    pub fn new(event: Event) -> Arc<Dispatched> {
        Arc::new(Dispatched {
            event,
            agent_frame: OnceLock::new(),
            firehose_frame: OnceLock::new(),
        })
    }

    /// The frame of an agent's stream ([`Event::agent_frame`]).
    pub fn agent_frame(&self) -> &str {
        self.agent_frame.get_or_init(|| self.event.agent_frame())
    }

    /// The frame of the firehose ([`Event::firehose_frame`]).
    pub fn firehose_frame(&self) -> &str {
        self.firehose_frame
            .get_or_init(|| self.event.firehose_frame())
    }
}

/// What a connection listens to.
#[derive(Debug, Clone)]
pub enum Interest {
    Agent(String),
    Topics(HashSet<String>),
}

struct Subscriber {
    id: u64,
    tx: mpsc::Sender<Delivery>,
    overflowed: Arc<AtomicBool>,
}

#[derive(Default)]
struct Subscribers {
    agents: HashMap<String, Vec<Subscriber>>,
    firehose: Vec<(HashSet<String>, Subscriber)>,
    /// The newest `seq` dispatched or covered by a gap's resync; None right after a broker
    /// resync, when the next event sets it (the streams' own catch-up covers what came before).
    last_seq: Option<i64>,
}

impl Subscribers {
    fn resync(&mut self) {
        for list in self.agents.values_mut() {
            list.retain(|s| offer(s, Delivery::Resync));
        }
        self.agents.retain(|_, list| !list.is_empty());
        self.firehose.retain(|(_, s)| offer(s, Delivery::Resync));
    }
}

/// The per-instance fan-out.
#[derive(Default)]
pub struct Hub {
    subscribers: Mutex<Subscribers>,
    next_id: AtomicU64,
}

/// A connection's handle on the hub; unsubscribes when dropped.
pub struct Subscription {
    hub: Arc<Hub>,
    id: u64,
    interest: Interest,
    pub rx: mpsc::Receiver<Delivery>,
    overflowed: Arc<AtomicBool>,
}

impl Subscription {
    /// True when the hub dropped this connection because its buffer was full.
    pub fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.unsubscribe(self.id, &self.interest);
    }
}

/// Offers a delivery; false when the subscriber must be dropped (full or gone).
fn offer(subscriber: &Subscriber, delivery: Delivery) -> bool {
    match subscriber.tx.try_send(delivery) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            subscriber.overflowed.store(true, Ordering::Release);
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

impl Hub {
    /// A hub for an instance starting when the log ends at `last_seq`.
    pub fn new(last_seq: i64) -> Arc<Hub> {
        let hub = Hub::default();
        hub.subscribers.lock().expect("hub lock").last_seq = Some(last_seq);
        Arc::new(hub)
    }

    /// Registers a connection with a buffer of `capacity` deliveries.
    pub fn subscribe(self: &Arc<Self>, interest: Interest, capacity: usize) -> Subscription {
        let (tx, rx) = mpsc::channel(capacity);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let overflowed = Arc::new(AtomicBool::new(false));
        let subscriber = Subscriber {
            id,
            tx,
            overflowed: overflowed.clone(),
        };
        {
            let mut subs = self.subscribers.lock().expect("hub lock");
            match &interest {
                Interest::Agent(agent) => subs
                    .agents
                    .entry(agent.clone())
                    .or_default()
                    .push(subscriber),
                Interest::Topics(topics) => subs.firehose.push((topics.clone(), subscriber)),
            }
        }
        Subscription {
            hub: self.clone(),
            id,
            interest,
            rx,
            overflowed,
        }
    }

    fn unsubscribe(&self, id: u64, interest: &Interest) {
        let mut subs = self.subscribers.lock().expect("hub lock");
        match interest {
            Interest::Agent(agent) => {
                if let Some(list) = subs.agents.get_mut(agent) {
                    list.retain(|s| s.id != id);
                    if list.is_empty() {
                        subs.agents.remove(agent);
                    }
                }
            }
            Interest::Topics(_) => subs.firehose.retain(|(_, s)| s.id != id),
        }
    }

    /// Whether any connection on this instance listens to `agent_id`.
    pub fn has_agent_listener(&self, agent_id: &str) -> bool {
        self.subscribers
            .lock()
            .expect("hub lock")
            .agents
            .contains_key(agent_id)
    }

    /// Delivers one event to every interested connection, dropping the ones that cannot keep up.
    pub fn dispatch(&self, dispatched: &Arc<Dispatched>) {
        let event = &dispatched.event;
        let mut subs = self.subscribers.lock().expect("hub lock");
        if let Some(last) = subs.last_seq {
            if event.seq <= last {
                // Late (or from before this instance started): a resync already covered it.
                return;
            }
            if event.seq > last + 1 {
                subs.last_seq = Some(event.seq);
                subs.resync();
                return;
            }
        }
        subs.last_seq = Some(event.seq);
        if let Some(agent) = &event.agent_id
            && let Some(list) = subs.agents.get_mut(agent)
        {
            list.retain(|s| offer(s, Delivery::Frame(dispatched.clone())));
            if list.is_empty() {
                subs.agents.remove(agent);
            }
        }
        subs.firehose.retain(|(topics, s)| {
            !topics.contains(&event.topic) || offer(s, Delivery::Frame(dispatched.clone()))
        });
    }

    /// Tells every connection to re-read the log (after the broker subscription was interrupted).
    pub fn resync(&self) {
        let mut subs = self.subscribers.lock().expect("hub lock");
        subs.last_seq = None;
        subs.resync();
    }
}
