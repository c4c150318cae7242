//! The Redis broker. Data structures, every name under the configured prefix `P`:
//!
//! - `P agent:{agent_id}` — STRING, the agent's [`Presence`] as JSON, with a `PX` TTL.
//! - `P agents:active` — SET of present agent ids.
//! - `P agents:deadlines` — ZSET agent id → presence deadline (ms); the expiry loop takes due
//!   members atomically (one Lua script), so with several instances each expiry fires once.
//! - `P cache:{key}` — STRING with a `PX` TTL: read-through caches of store records (e.g.
//!   `cache:chk:{checkpoint_id}`); a miss reads the store and refills.
//! - `P hot:{key}` — HASH `v` (version), `rec` (record), `c` (1 while the log is complete) and
//!   `P hot:{key}:log` — LIST, newest first: versioned hot copies (e.g. `hot:sess:{session_id}`, a
//!   session with its activity ring), written by one Lua script so out-of-order writers never
//!   leave an older copy or a gapped log; `PX` TTL; a miss reads the store and refills.
//! - `P ev:{instance}:{topic}` — pub/sub channels carrying committed events as JSON. Each instance
//!   dispatches its own events to its streams as it commits them, and holds one dedicated
//!   (non-pooled) connection subscribed to the pattern `P ev:*` for everyone else's (skipping its
//!   own channel), reconnected with backoff and a ping every few seconds; after a reconnect every
//!   stream re-reads the event log, so no gap survives an outage.
//!
//! Commands share one multiplexed connection made by a deadpool-redis pool, with short timeouts:
//! while Redis is down, calls fail fast with 503 instead of hanging requests. An outage is logged
//! once when it starts, then summarised at growing intervals, and once when Redis answers again
//! ([`OutageLog`]): every request and tick fails while it lasts, and a line per failure would bury
//! everything else.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_redis::redis;
use deadpool_redis::redis::aio::MultiplexedConnection;
use deadpool_redis::{Config, PoolConfig, Runtime, Timeouts};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Hot, HotWrite, Presence};
use crate::error::{Error, Result};
use crate::events::Event;
use crate::events::hub::{Dispatched, Hub};
use crate::ops::metrics::Metrics;

/// Events queued for PUBLISH; beyond this the publisher is hopelessly behind (Redis down) and
/// further events are dropped from pub/sub (never from the log: streams resync when Redis returns).
const PUBLISH_QUEUE: usize = 1 << 16;
/// Longest a single Redis command may take before the request fails with 503.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the subscription connection proves it is alive.
const SUBSCRIPTION_PING: Duration = Duration::from_secs(5);
/// The first summary of an outage comes this long after its first failure; each next one twice as
/// long after the previous, at most [`OUTAGE_REPORT_MAX`].
const OUTAGE_REPORT_FIRST: Duration = Duration::from_secs(1);
const OUTAGE_REPORT_MAX: Duration = Duration::from_secs(60);

/// Logs Redis failures by outage rather than by call: the first failure at once, then how many
/// failed since, at 1 s, 2 s, 4 s … (at most a minute apart), and one line when a call succeeds
/// again.
#[derive(Default)]
struct OutageLog {
    /// Set while an outage lasts, so a success costs one atomic load.
    failing: AtomicBool,
    outage: Mutex<Option<Outage>>,
}

struct Outage {
    since: Instant,
    failures: u64,
    unreported: u64,
    interval: Duration,
    next_report: Instant,
}

impl OutageLog {
    fn failed(&self, what: &str, error: &dyn std::fmt::Display) {
        let now = Instant::now();
        let mut outage = self.outage.lock().expect("outage lock");
        let Some(o) = outage.as_mut() else {
            tracing::warn!(error = %error, what, "redis is unavailable; retrying, failures are summarised");
            *outage = Some(Outage {
                since: now,
                failures: 1,
                unreported: 0,
                interval: OUTAGE_REPORT_FIRST,
                next_report: now + OUTAGE_REPORT_FIRST,
            });
            self.failing.store(true, Ordering::Release);
            return;
        };
        o.failures += 1;
        o.unreported += 1;
        if now >= o.next_report {
            tracing::warn!(
                error = %error,
                failures = o.unreported,
                down_for_s = o.since.elapsed().as_secs(),
                "redis is still unavailable"
            );
            o.unreported = 0;
            o.interval = (o.interval * 2).min(OUTAGE_REPORT_MAX);
            o.next_report = now + o.interval;
        }
    }

    fn succeeded(&self) {
        if !self.failing.load(Ordering::Acquire) {
            return;
        }
        let mut outage = self.outage.lock().expect("outage lock");
        if let Some(o) = outage.take() {
            self.failing.store(false, Ordering::Release);
            tracing::info!(
                failures = o.failures,
                down_for_ms = o.since.elapsed().as_millis() as u64,
                "redis is available again"
            );
        }
    }
}

const TAKE_EXPIRED: &str = r"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, 1000)
for i = 1, #due, 2 do
  redis.call('ZREM', KEYS[1], due[i])
  redis.call('SREM', KEYS[2], due[i])
  redis.call('DEL', ARGV[2] .. due[i])
end
return due
";

/// Applies a [`HotWrite`] (see [`super::Broker::hot_write`]). KEYS: the copy's hash (`v`
/// version, `rec` record, `c` = 1 while the log is complete) and its log list. ARGV: mode,
/// version, ttl_ms, keep, record ('' for none), then for `fill` 1|0 (log given) and the log, for
/// `push` the previous version and the entry, for `mark` the previous version.
const HOT_WRITE: &str = r"
local v = tonumber(ARGV[2])
local cur = tonumber(redis.call('HGET', KEYS[1], 'v') or '-1')
local complete = redis.call('HGET', KEYS[1], 'c') == '1'
local mode = ARGV[1]
if cur > v or (cur == v and mode ~= 'fill') then return 0 end
if mode == 'fill' then
  if cur < v then
    redis.call('DEL', KEYS[1], KEYS[2])
    complete = false
  end
  if ARGV[6] == '1' and not complete then
    redis.call('DEL', KEYS[2])
    if #ARGV > 6 then
      redis.call('RPUSH', KEYS[2], unpack(ARGV, 7, math.min(#ARGV, 6 + tonumber(ARGV[4]))))
    end
    redis.call('HSET', KEYS[1], 'c', '1')
  end
elseif mode == 'push' then
  if cur == tonumber(ARGV[6]) and complete then
    redis.call('LPUSH', KEYS[2], ARGV[7])
    redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[4]) - 1)
  else
    redis.call('DEL', KEYS[2])
    redis.call('HSET', KEYS[1], 'c', '0')
  end
elseif cur ~= tonumber(ARGV[6]) then
  -- mark, from a version other than the copy's: a missed write may have been a log entry
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'c', '0')
end
if ARGV[5] == '' then
  redis.call('HDEL', KEYS[1], 'rec')
else
  redis.call('HSET', KEYS[1], 'rec', ARGV[5])
end
redis.call('HSET', KEYS[1], 'v', v)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
";

pub struct RedisBroker {
    pool: deadpool_redis::Pool,
    client: redis::Client,
    prefix: String,
    /// This instance's streams: its own events as they are published, everyone else's from the
    /// subscription.
    hub: Arc<Hub>,
    publish_tx: mpsc::Sender<Arc<Dispatched>>,
    publish_rx: Mutex<Option<mpsc::Receiver<Arc<Dispatched>>>>,
    take_expired: redis::Script,
    hot_write: redis::Script,
    /// The connection commands share (see [`RedisBroker::conn`]).
    shared: Mutex<Option<MultiplexedConnection>>,
    /// Names this instance's channels, so its subscription can skip its own events.
    instance: String,
    /// Whether the pattern subscription is established (readiness).
    subscribed: AtomicBool,
    /// Command latencies and failures go here.
    metrics: Arc<Metrics>,
    /// Failures are logged here.
    outages: OutageLog,
}

impl RedisBroker {
    pub fn new(url: &str, prefix: &str, metrics: Arc<Metrics>, hub: Arc<Hub>) -> Result<Self> {
        let mut config = Config::from_url(url);
        config.pool = Some(PoolConfig {
            max_size: 32,
            timeouts: Timeouts {
                wait: Some(COMMAND_TIMEOUT),
                create: Some(COMMAND_TIMEOUT),
                recycle: Some(COMMAND_TIMEOUT),
            },
            ..PoolConfig::default()
        });
        let pool = config
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|e| Error::Internal(format!("redis pool: {e}")))?;
        let client =
            redis::Client::open(url).map_err(|e| Error::Internal(format!("redis url: {e}")))?;
        let (publish_tx, publish_rx) = mpsc::channel(PUBLISH_QUEUE);
        Ok(RedisBroker {
            pool,
            client,
            prefix: prefix.to_owned(),
            hub,
            publish_tx,
            publish_rx: Mutex::new(Some(publish_rx)),
            take_expired: redis::Script::new(TAKE_EXPIRED),
            hot_write: redis::Script::new(HOT_WRITE),
            shared: Mutex::new(None),
            subscribed: AtomicBool::new(false),
            instance: crate::common::random_hex(6),
            metrics,
            outages: OutageLog::default(),
        })
    }

    /// The cause is logged (by outage); the client is told only which service is down.
    fn unavailable(&self, what: &str, error: impl std::fmt::Display) -> Error {
        self.outages.failed(what, &error);
        Error::Unavailable("redis is unavailable".into())
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    /// A handle on the shared multiplexed connection. The pool creates it (with its timeouts)
    /// and it is then kept: a multiplexed connection already pipelines concurrent commands, and
    /// a pool checkout per command would cost a `PING` round trip each time (deadpool-redis's
    /// health check). A failed command drops it, and the next call takes a fresh one.
    async fn conn(&self) -> Result<MultiplexedConnection> {
        if let Some(conn) = self.shared.lock().expect("connection lock").as_ref() {
            return Ok(conn.clone());
        }
        let started = std::time::Instant::now();
        let pooled = self
            .pool
            .get()
            .await
            .map_err(|e| self.unavailable("connect", e));
        if pooled.is_err() {
            // Counted like a failed command: while Redis is down, every call ends here.
            let metrics = &self.metrics;
            metrics.broker_errors.with_label_values(&["connect"]).inc();
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            let now = crate::common::now_ms();
            metrics
                .sla
                .record(crate::ops::sla::Measure::BrokerOperation, now, ms);
        }
        let conn = deadpool_redis::Connection::take(pooled?);
        *self.shared.lock().expect("connection lock") = Some(conn.clone());
        Ok(conn)
    }

    /// Runs one command future with the command timeout, timed into the metrics under
    /// `operation`; a failure drops the shared connection.
    async fn timed<T>(
        &self,
        operation: &str,
        future: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        let started = std::time::Instant::now();
        let result = match tokio::time::timeout(COMMAND_TIMEOUT, future).await {
            Ok(result) => result.map_err(|e| self.unavailable(operation, e)),
            Err(_) => Err(self.unavailable(operation, "command timed out")),
        };
        let elapsed = started.elapsed().as_secs_f64();
        self.metrics
            .broker_ops
            .with_label_values(&[operation])
            .observe(elapsed);
        let now = crate::common::now_ms();
        self.metrics.sla.record(
            crate::ops::sla::Measure::BrokerOperation,
            now,
            elapsed * 1000.0,
        );
        if result.is_err() {
            self.metrics
                .broker_errors
                .with_label_values(&[operation])
                .inc();
            self.shared.lock().expect("connection lock").take();
        } else {
            self.outages.succeeded();
        }
        result
    }

    pub fn publish(&self, event: Event) {
        // Local streams never wait for, or depend on, Redis: they hear of it at once.
        let dispatched = Dispatched::new(event);
        self.hub.dispatch(&dispatched);
        if let Err(mpsc::error::TrySendError::Full(event)) = self.publish_tx.try_send(dispatched) {
            tracing::warn!(
                seq = event.event.seq,
                "publish queue full; streams will resync from the log"
            );
        }
    }

    /// PUBLISHes this instance's committed events for the other instances, in batches.
    pub async fn run_publisher(&self, shutdown: CancellationToken) {
        let Some(mut rx) = self.publish_rx.lock().expect("publisher lock").take() else {
            return;
        };
        let mut batch = Vec::with_capacity(256);
        loop {
            let received = tokio::select! {
                _ = shutdown.cancelled() => 0,
                n = rx.recv_many(&mut batch, 256) => n,
            };
            if received == 0 {
                // Shutting down: flush what was committed before the stop, then leave.
                rx.close();
                while let Some(event) = rx.recv().await {
                    batch.push(event);
                }
                self.publish_batch(&mut batch).await;
                return;
            }
            self.publish_batch(&mut batch).await;
        }
    }

    async fn publish_batch(&self, batch: &mut Vec<Arc<Dispatched>>) {
        if batch.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for event in batch.iter().map(|d| &d.event) {
            let channel = self.key(&format!("ev:{}:{}", self.instance, event.topic));
            match serde_json::to_string(event) {
                Ok(payload) => {
                    pipe.publish(channel, payload).ignore();
                }
                Err(e) => tracing::error!(error = %e, "event not serializable"),
            }
        }
        let result = async {
            let mut conn = self.conn().await?;
            self.timed("publish_batch", pipe.query_async::<()>(&mut conn))
                .await
        }
        .await;
        if let Err(e) = result {
            // The outage itself is logged by `unavailable`.
            tracing::debug!(error = %e, events = batch.len(), "publish failed; streams resync when redis returns");
        }
        batch.clear();
    }

    pub async fn run_subscription(&self, shutdown: CancellationToken) {
        let hub = &self.hub;
        let pattern = self.key("ev:*");
        let own = self.key(&format!("ev:{}:", self.instance));
        let mut backoff = Duration::from_millis(50);
        loop {
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = tokio::time::timeout(COMMAND_TIMEOUT, self.client.get_async_pubsub()) => c,
            };
            match connected {
                Ok(Ok(pubsub)) => match tokio::time::timeout(COMMAND_TIMEOUT, async {
                    let (mut sink, messages) = pubsub.split();
                    sink.psubscribe(&pattern).await.map(|()| (sink, messages))
                })
                .await
                .unwrap_or_else(|_| {
                    Err(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "psubscribe timed out",
                    )))
                }) {
                    Ok((mut sink, mut messages)) => {
                        tracing::info!(%pattern, "redis subscription established");
                        self.outages.succeeded();
                        backoff = Duration::from_millis(50);
                        self.subscribed.store(true, Ordering::Release);
                        // Anything published while we were away is in the log: streams re-read it.
                        hub.resync();
                        // A half-open TCP connection delivers nothing and reports no error:
                        // a ping that goes unanswered ends the subscription, which reconnects.
                        let mut liveness = tokio::time::interval(SUBSCRIPTION_PING);
                        liveness.tick().await;
                        loop {
                            tokio::select! {
                                _ = shutdown.cancelled() => return,
                                _ = liveness.tick() => {
                                    match tokio::time::timeout(COMMAND_TIMEOUT, sink.ping::<redis::Value>()).await {
                                        Ok(Ok(_)) => {}
                                        _ => break,
                                    }
                                }
                                message = messages.next() => match message {
                                    // This instance's own events were dispatched when committed.
                                    Some(message) if message.get_channel_name().starts_with(&own) => {}
                                    Some(message) => {
                                        match serde_json::from_slice::<Event>(message.get_payload_bytes()) {
                                            Ok(event) => hub.dispatch(&Dispatched::new(event)),
                                            Err(e) => tracing::warn!(error = %e, "ignoring a malformed event"),
                                        }
                                    }
                                    None => break,
                                },
                            }
                        }
                        self.subscribed.store(false, Ordering::Release);
                        tracing::warn!("redis subscription lost; reconnecting");
                    }
                    Err(e) => self.outages.failed("psubscribe", &e),
                },
                Ok(Err(e)) => self.outages.failed("subscribe", &e),
                Err(_) => self.outages.failed("subscribe", &"connect timed out"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    pub async fn set_presence(
        &self,
        agent_id: &str,
        presence: &Presence,
        ttl_ms: i64,
    ) -> Result<()> {
        let json = serde_json::to_string(presence).map_err(|e| Error::Internal(e.to_string()))?;
        let mut conn = self.conn().await?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(self.key(&format!("agent:{agent_id}")))
            .arg(json)
            .arg("PX")
            .arg(ttl_ms.max(1))
            .ignore()
            .sadd(self.key("agents:active"), agent_id)
            .ignore()
            .zadd(self.key("agents:deadlines"), agent_id, presence.expires_at)
            .ignore();
        self.timed("set_presence", pipe.query_async::<()>(&mut conn))
            .await
    }

    pub async fn presence(&self, agent_ids: &[&str]) -> Result<Vec<Option<Presence>>> {
        if agent_ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = agent_ids
            .iter()
            .map(|id| self.key(&format!("agent:{id}")))
            .collect();
        let mut conn = self.conn().await?;
        // MGET with one key answers a bare value, so always ask through the command form.
        let values: Vec<Option<String>> = self
            .timed(
                "presence",
                redis::cmd("MGET").arg(&keys).query_async(&mut conn),
            )
            .await?;
        Ok(values
            .into_iter()
            .map(|v| v.and_then(|json| serde_json::from_str(&json).ok()))
            .collect())
    }

    pub async fn active_count(&self) -> Result<usize> {
        let mut conn = self.conn().await?;
        let cmd = redis::cmd("SCARD").arg(self.key("agents:active")).clone();
        self.timed("active_count", cmd.query_async::<usize>(&mut conn))
            .await
    }

    pub async fn remove_presence(&self, agent_id: &str) -> Result<()> {
        let mut conn = self.conn().await?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .del(self.key(&format!("agent:{agent_id}")))
            .ignore()
            .srem(self.key("agents:active"), agent_id)
            .ignore()
            .zrem(self.key("agents:deadlines"), agent_id)
            .ignore();
        self.timed("remove_presence", pipe.query_async::<()>(&mut conn))
            .await
    }

    pub async fn take_expired(&self, now: i64) -> Result<Vec<(String, i64)>> {
        let mut conn = self.conn().await?;
        let mut invocation = self.take_expired.key(self.key("agents:deadlines"));
        invocation
            .key(self.key("agents:active"))
            .arg(now)
            .arg(self.key("agent:"));
        let due: Vec<(String, f64)> = self
            .timed("take_expired", invocation.invoke_async(&mut conn))
            .await?;
        Ok(due
            .into_iter()
            .map(|(id, deadline)| (id, deadline as i64))
            .collect())
    }

    pub async fn cache_put(&self, key: &str, value: &str, ttl_ms: i64) -> Result<()> {
        let mut conn = self.conn().await?;
        let cmd = redis::cmd("SET")
            .arg(self.key(&format!("cache:{key}")))
            .arg(value)
            .arg("PX")
            .arg(ttl_ms.max(1))
            .clone();
        self.timed("cache_put", cmd.query_async::<()>(&mut conn))
            .await
    }

    pub async fn cache_get(&self, key: &str) -> Result<Option<String>> {
        let mut conn = self.conn().await?;
        let cmd = redis::cmd("GET")
            .arg(self.key(&format!("cache:{key}")))
            .clone();
        self.timed("cache_get", cmd.query_async::<Option<String>>(&mut conn))
            .await
    }

    pub async fn cache_del(&self, keys: &[String]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        let keys: Vec<String> = keys
            .iter()
            .map(|k| self.key(&format!("cache:{k}")))
            .collect();
        self.timed(
            "cache_del",
            redis::cmd("DEL").arg(keys).query_async::<()>(&mut conn),
        )
        .await
    }

    fn hot_keys(&self, key: &str) -> (String, String) {
        (
            self.key(&format!("hot:{key}")),
            self.key(&format!("hot:{key}:log")),
        )
    }

    pub async fn hot_get(&self, key: &str) -> Result<Option<Hot>> {
        let mut conn = self.conn().await?;
        let (hash, log) = self.hot_keys(key);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HMGET")
            .arg(&hash)
            .arg(&["v", "rec", "c"])
            .lrange(&log, 0, -1);
        type Fields = (Option<i64>, Option<String>, Option<String>);
        let ((version, record, complete), entries): (Fields, Vec<String>) =
            self.timed("hot_get", pipe.query_async(&mut conn)).await?;
        Ok(version.map(|version| Hot {
            version,
            record,
            log: (complete.as_deref() == Some("1")).then_some(entries),
        }))
    }

    pub async fn hot_write(
        &self,
        key: &str,
        version: i64,
        write: HotWrite<'_>,
        keep: usize,
        ttl_ms: i64,
    ) -> Result<()> {
        let mut conn = self.conn().await?;
        let (hash, log) = self.hot_keys(key);
        let mut invocation = self.hot_write.key(hash);
        invocation.key(log);
        let (mode, record) = match write {
            HotWrite::Fill { record, .. } => ("fill", record),
            HotWrite::Push { record, .. } => ("push", record),
            HotWrite::Mark { record, .. } => ("mark", record.unwrap_or("")),
        };
        invocation
            .arg(mode)
            .arg(version)
            .arg(ttl_ms.max(1))
            .arg(keep.max(1))
            .arg(record);
        match write {
            HotWrite::Fill { log, .. } => {
                invocation.arg(u8::from(log.is_some()));
                for entry in log.unwrap_or_default() {
                    invocation.arg(entry);
                }
            }
            HotWrite::Push {
                entry, previous, ..
            } => {
                invocation.arg(previous).arg(entry);
            }
            HotWrite::Mark { previous, .. } => {
                invocation.arg(previous);
            }
        }
        self.timed("hot_write", invocation.invoke_async::<i64>(&mut conn))
            .await
            .map(drop)
    }

    /// Ready when a command round trip works and the event subscription is established.
    pub async fn ping(&self) -> Result<()> {
        let mut conn = self.conn().await?;
        self.timed("ping", redis::cmd("PING").query_async::<()>(&mut conn))
            .await?;
        if !self.subscribed.load(Ordering::Acquire) {
            return Err(Error::Unavailable(
                "redis: the event subscription is not established".into(),
            ));
        }
        Ok(())
    }
}
