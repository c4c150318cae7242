//! The real-time layer: presence, notifications between instances, and read-through caches.
//! A closed enum with two variants that pass one shared test suite: [`Broker::Memory`], the
//! embedded default, and [`Broker::Redis`], for several instances sharing one Redis.
//!
//! Nothing lives only here except presence, which agents re-establish with their next heartbeat:
//! a FLUSHALL or a restart of Redis loses no message, event or record (the store holds them).

pub mod memory;
pub mod redis;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::events::Event;
use crate::events::hub::Hub;
use crate::ops::metrics::Metrics;

/// An agent's liveness, kept with a TTL in the broker. Heartbeats write only this.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Presence {
    pub status: String,
    pub last_seen_at: i64,
    pub expires_at: i64,
    pub current_tasks: u32,
}

/// A versioned hot copy of a store record and its newest log entries (newest first): e.g. a
/// session's record with its activity counter, and its activity ring. Writers reach the broker
/// in any order, so every write carries the record's version (monotonic in the store) and never
/// replaces a newer copy; the log is only kept while it is known to be complete — filled from
/// the store, then extended one entry at a time without a gap.
#[derive(Debug, Clone, PartialEq)]
pub struct Hot {
    pub version: i64,
    /// The record at `version`; None when only its version is known.
    pub record: Option<String>,
    /// The newest log entries, newest first; None when the copy may be missing some.
    pub log: Option<Vec<String>>,
}

/// A change to a [`Hot`] copy, at a version given beside it.
#[derive(Debug, Clone, Copy)]
pub enum HotWrite<'a> {
    /// The record as read from the store, with its whole kept log when that was read too.
    Fill {
        record: &'a str,
        log: Option<&'a [String]>,
    },
    /// One log entry appended, taking the record from version `previous` to the new one. A copy
    /// that was not exactly at `previous` gets the record but forgets its (now gapped) log.
    Push {
        record: &'a str,
        entry: &'a str,
        previous: i64,
    },
    /// A change without a log entry (e.g. the session ended) from version `previous`; `None`
    /// forgets the record. A copy that was not exactly at `previous` forgets its log (a write
    /// it missed may have been an entry).
    Mark {
        record: Option<&'a str>,
        previous: i64,
    },
}

/// The broker handle: cheap to clone.
#[derive(Clone)]
pub enum Broker {
    Memory(Arc<memory::MemoryBroker>),
    Redis(Arc<redis::RedisBroker>),
}

impl Broker {
    /// The in-process broker, publishing into `hub`.
    pub fn memory(hub: Arc<Hub>) -> Broker {
        Broker::Memory(Arc::new(memory::MemoryBroker::new(hub)))
    }

    /// A Redis broker; connects lazily, so start-up works while Redis is still coming up.
    /// Its command latencies and failures are counted in `metrics`; every event, this
    /// instance's and the others', reaches this instance's streams through `hub`.
    pub fn redis(url: &str, prefix: &str, metrics: Arc<Metrics>, hub: Arc<Hub>) -> Result<Broker> {
        Ok(Broker::Redis(Arc::new(redis::RedisBroker::new(
            url, prefix, metrics, hub,
        )?)))
    }

    /// `in-process` or `redis`: which broker runs, for people (the SLA report, diagnostics).
    pub fn kind(&self) -> &'static str {
        match self {
            Broker::Memory(_) => "in-process",
            Broker::Redis(_) => "redis",
        }
    }

    /// `memory` or `redis`, for readiness answers and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Broker::Memory(_) => "memory",
            Broker::Redis(_) => "redis",
        }
    }

    /// Publishes a committed event to every instance: to this one's streams at once (the hub),
    /// to the others through Redis. Never waits: called while the store's write connection is
    /// held, so events leave in `seq` order.
    pub fn publish(&self, event: Event) {
        match self {
            Broker::Memory(b) => b.publish(event),
            Broker::Redis(b) => b.publish(event),
        }
    }

    /// Runs this instance's one subscription to the other instances' events until `shutdown`
    /// (Redis; in process there are none).
    pub async fn run_subscription(&self, shutdown: CancellationToken) {
        match self {
            Broker::Memory(_) => {}
            Broker::Redis(b) => b.run_subscription(shutdown).await,
        }
    }

    /// Runs the publisher until `shutdown` (Redis: pipelines committed events to PUBLISH for
    /// the other instances).
    pub async fn run_publisher(&self, shutdown: CancellationToken) {
        match self {
            Broker::Memory(_) => {}
            Broker::Redis(b) => b.run_publisher(shutdown).await,
        }
    }

    /// Sets an agent's presence for `ttl_ms` and marks it active.
    pub async fn set_presence(
        &self,
        agent_id: &str,
        presence: &Presence,
        ttl_ms: i64,
    ) -> Result<()> {
        match self {
            Broker::Memory(b) => {
                b.set_presence(agent_id, presence);
                Ok(())
            }
            Broker::Redis(b) => b.set_presence(agent_id, presence, ttl_ms).await,
        }
    }

    /// The presence of each agent (None: offline or unknown), in the order asked.
    pub async fn presence(&self, agent_ids: &[&str], now: i64) -> Result<Vec<Option<Presence>>> {
        match self {
            Broker::Memory(b) => Ok(b.presence(agent_ids, now)),
            Broker::Redis(b) => b.presence(agent_ids).await,
        }
    }

    /// How many agents are present (the expiry step removes the lapsed within a tick).
    pub async fn active_count(&self, now: i64) -> Result<usize> {
        match self {
            Broker::Memory(b) => Ok(b.active_count(now)),
            Broker::Redis(b) => b.active_count().await,
        }
    }

    /// Forgets an agent's presence (it was deleted).
    pub async fn remove_presence(&self, agent_id: &str) -> Result<()> {
        match self {
            Broker::Memory(b) => {
                b.remove_presence(agent_id);
                Ok(())
            }
            Broker::Redis(b) => b.remove_presence(agent_id).await,
        }
    }

    /// Removes and returns the agents (with their deadlines) whose presence expired by `now`.
    /// With several instances each expiry is returned to exactly one of them.
    pub async fn take_expired(&self, now: i64) -> Result<Vec<(String, i64)>> {
        match self {
            Broker::Memory(b) => Ok(b.take_expired(now)),
            Broker::Redis(b) => b.take_expired(now).await,
        }
    }

    /// Caches `value` under `key` for `ttl_ms` (a read-through cache: the store stays the truth,
    /// so a failure here is only logged by callers).
    pub async fn cache_put(&self, key: &str, value: &str, ttl_ms: i64, now: i64) -> Result<()> {
        match self {
            Broker::Memory(b) => {
                b.cache_put(key, value, now + ttl_ms);
                Ok(())
            }
            Broker::Redis(b) => b.cache_put(key, value, ttl_ms).await,
        }
    }

    /// The cached value under `key`, if any.
    pub async fn cache_get(&self, key: &str, now: i64) -> Result<Option<String>> {
        match self {
            Broker::Memory(b) => Ok(b.cache_get(key, now)),
            Broker::Redis(b) => b.cache_get(key).await,
        }
    }

    /// Forgets cached values (their records were deleted).
    pub async fn cache_del(&self, keys: &[String]) -> Result<()> {
        match self {
            Broker::Memory(b) => {
                b.cache_del(keys);
                Ok(())
            }
            Broker::Redis(b) => b.cache_del(keys).await,
        }
    }

    /// The hot copy under `key`, if any (see [`Hot`]).
    pub async fn hot_get(&self, key: &str, now: i64) -> Result<Option<Hot>> {
        match self {
            Broker::Memory(b) => Ok(b.hot_get(key, now)),
            Broker::Redis(b) => b.hot_get(key).await,
        }
    }

    /// Applies `write` to the hot copy under `key` unless the copy is already at `version` or
    /// newer; keeps at most `keep` log entries and the copy for `ttl_ms` after its last write.
    pub async fn hot_write(
        &self,
        key: &str,
        version: i64,
        write: HotWrite<'_>,
        keep: usize,
        ttl_ms: i64,
        now: i64,
    ) -> Result<()> {
        match self {
            Broker::Memory(b) => {
                b.hot_write(key, version, write, keep, now + ttl_ms);
                Ok(())
            }
            Broker::Redis(b) => b.hot_write(key, version, write, keep, ttl_ms).await,
        }
    }

    /// Drops expired cache entries (the in-process broker; Redis expires keys itself).
    pub fn purge_cache(&self, now: i64) {
        if let Broker::Memory(b) = self {
            b.purge_cache(now);
        }
    }

    /// A round trip to the broker, for `/readyz`.
    pub async fn ping(&self) -> Result<()> {
        match self {
            Broker::Memory(_) => Ok(()),
            Broker::Redis(b) => b.ping().await,
        }
    }
}
