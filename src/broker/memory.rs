//! The in-process broker: presence in a map with deadlines, caches and hot copies in maps with
//! expiry; a published event goes straight to this instance's hub (there is no other instance
//! to hear it, and the hub never waits).
//! `std::sync::Mutex` because no lock is held across an `.await`.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use super::{Hot, HotWrite, Presence};
use crate::events::Event;
use crate::events::hub::{Dispatched, Hub};

#[derive(Default)]
struct PresenceTable {
    agents: HashMap<String, Presence>,
    /// (expires_at, agent_id): the expiry loop pops from the front.
    deadlines: BTreeSet<(i64, String)>,
}

pub struct MemoryBroker {
    presence: Mutex<PresenceTable>,
    /// key → (value, expires_at): the read-through caches.
    cache: Mutex<HashMap<String, (Arc<str>, i64)>>,
    /// key → (copy, expires_at): the versioned hot copies.
    hot: Mutex<HashMap<String, (Hot, i64)>>,
    /// Where published events go.
    hub: Arc<Hub>,
}

impl MemoryBroker {
    pub fn new(hub: Arc<Hub>) -> Self {
        MemoryBroker {
            presence: Mutex::default(),
            cache: Mutex::default(),
            hot: Mutex::default(),
            hub,
        }
    }

    pub fn publish(&self, event: Event) {
        self.hub.dispatch(&Dispatched::new(event));
    }

    pub fn set_presence(&self, agent_id: &str, presence: &Presence) {
        let mut table = self.presence.lock().expect("presence lock");
        if let Some(old) = table.agents.insert(agent_id.to_owned(), presence.clone()) {
            table
                .deadlines
                .remove(&(old.expires_at, agent_id.to_owned()));
        }
        table
            .deadlines
            .insert((presence.expires_at, agent_id.to_owned()));
    }

    pub fn presence(&self, agent_ids: &[&str], now: i64) -> Vec<Option<Presence>> {
        let table = self.presence.lock().expect("presence lock");
        agent_ids
            .iter()
            .map(|id| {
                table
                    .agents
                    .get(*id)
                    .filter(|p| p.expires_at > now)
                    .cloned()
            })
            .collect()
    }

    pub fn active_count(&self, now: i64) -> usize {
        let table = self.presence.lock().expect("presence lock");
        table.agents.values().filter(|p| p.expires_at > now).count()
    }

    pub fn remove_presence(&self, agent_id: &str) {
        let mut table = self.presence.lock().expect("presence lock");
        if let Some(old) = table.agents.remove(agent_id) {
            table
                .deadlines
                .remove(&(old.expires_at, agent_id.to_owned()));
        }
    }

    pub fn cache_put(&self, key: &str, value: &str, expires_at: i64) {
        self.cache
            .lock()
            .expect("cache lock")
            .insert(key.to_owned(), (value.into(), expires_at));
    }

    pub fn cache_get(&self, key: &str, now: i64) -> Option<String> {
        let cache = self.cache.lock().expect("cache lock");
        cache
            .get(key)
            .filter(|(_, expires_at)| *expires_at > now)
            .map(|(value, _)| value.to_string())
    }

    pub fn cache_del(&self, keys: &[String]) {
        let mut cache = self.cache.lock().expect("cache lock");
        keys.iter().for_each(|key| drop(cache.remove(key)));
    }

    pub fn purge_cache(&self, now: i64) {
        self.cache
            .lock()
            .expect("cache lock")
            .retain(|_, (_, expires_at)| *expires_at > now);
        self.hot
            .lock()
            .expect("hot lock")
            .retain(|_, (_, expires_at)| *expires_at > now);
    }

    pub fn hot_get(&self, key: &str, now: i64) -> Option<Hot> {
        let hot = self.hot.lock().expect("hot lock");
        hot.get(key)
            .filter(|(_, expires_at)| *expires_at > now)
            .map(|(copy, _)| copy.clone())
    }

    pub fn hot_write(
        &self,
        key: &str,
        version: i64,
        write: HotWrite<'_>,
        keep: usize,
        expires_at: i64,
    ) {
        let mut hot = self.hot.lock().expect("hot lock");
        let entry = hot.entry(key.to_owned()).or_insert_with(|| {
            let absent = Hot {
                version: -1,
                record: None,
                log: None,
            };
            (absent, expires_at)
        });
        let copy = &mut entry.0;
        match write {
            HotWrite::Fill { record, log } => {
                if copy.version > version {
                    return;
                }
                if copy.version < version {
                    copy.log = None;
                }
                if copy.log.is_none() {
                    copy.log = log.map(|log| log.iter().take(keep).cloned().collect());
                }
                copy.record = Some(record.to_owned());
            }
            HotWrite::Push {
                record,
                entry,
                previous,
            } => {
                if copy.version >= version {
                    return;
                }
                match &mut copy.log {
                    Some(log) if copy.version == previous => {
                        log.insert(0, entry.to_owned());
                        log.truncate(keep);
                    }
                    _ => copy.log = None,
                }
                copy.record = Some(record.to_owned());
            }
            HotWrite::Mark { record, previous } => {
                if copy.version >= version {
                    return;
                }
                if copy.version != previous {
                    copy.log = None;
                }
                copy.record = record.map(str::to_owned);
            }
        }
        copy.version = version;
        entry.1 = expires_at;
    }

    pub fn take_expired(&self, now: i64) -> Vec<(String, i64)> {
        let mut table = self.presence.lock().expect("presence lock");
        let mut expired = Vec::new();
        while let Some((at, _)) = table.deadlines.first()
            && *at <= now
        {
            let (deadline, agent_id) = table.deadlines.pop_first().expect("checked non-empty");
            table.agents.remove(&agent_id);
            expired.push((agent_id, deadline));
        }
        expired
    }
}
