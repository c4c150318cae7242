//! The SQL store, the source of truth. SQLite in WAL mode (`synchronous=NORMAL`: survives any
//! crash of the process), one file, created if missing, migrations embedded and applied at start.
//!
//! Writes go through one connection and one [`Writer`] at a time: SQLite has a single writer
//! anyway, and holding the order lock from `BEGIN` until the committed events are handed to the
//! publisher means events are published in exactly the order of their `seq` — a stream never
//! sees a newer event before an older one from this instance. Reads use a separate pool and never
//! wait for writers (WAL).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqliteConnection, SqlitePool, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::broker::Broker;
use crate::error::Result;
use crate::events::{self, Event, NewEvent};

/// Handle to the store: cheap to clone.
#[derive(Clone)]
pub struct Store {
    write: SqlitePool,
    read: SqlitePool,
    order: Arc<Mutex<()>>,
}

impl Store {
    /// Opens (creating if missing) the SQLite file at `path` and applies the migrations.
    pub async fn open(path: &str) -> Result<Store> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            // Another process writing the same file (a second instance) makes us wait, not fail.
            .busy_timeout(Duration::from_secs(10))
            .pragma("cache_size", "-32768")
            .pragma("temp_store", "memory");
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!().run(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .connect_with(options.read_only(true))
            .await?;
        Ok(Store {
            write,
            read,
            order: Arc::new(Mutex::new(())),
        })
    }

    /// Applies migrations only (`ltmc migrate`).
    pub async fn migrate(path: &str) -> Result<()> {
        Store::open(path).await?.close().await;
        Ok(())
    }

    /// The read pool: queries that change nothing.
    pub fn reader(&self) -> &SqlitePool {
        &self.read
    }

    /// Starts a write transaction (`BEGIN IMMEDIATE`, so two instances on one file queue rather
    /// than deadlock on a lock upgrade).
    pub async fn begin(&self) -> Result<Writer> {
        let order = self.order.clone().lock_owned().await;
        let tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        Ok(Writer {
            tx,
            events: Vec::new(),
            _order: order,
        })
    }

    /// The write connection for one autocommit statement that emits no event (a claim): no
    /// transaction round trips, no order lock.
    pub async fn autocommit(&self) -> Result<PoolConnection<Sqlite>> {
        Ok(self.write.acquire().await?)
    }

    /// A cheap liveness probe for `/readyz`.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.read).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.write.close().await;
        self.read.close().await;
    }
}

/// An open write transaction plus the events it will publish once committed. Dropping it without
/// [`Writer::commit`] rolls everything back and publishes nothing.
pub struct Writer {
    tx: Transaction<'static, Sqlite>,
    events: Vec<Event>,
    _order: OwnedMutexGuard<()>,
}

impl Writer {
    /// The connection, for a domain's `db.rs` functions.
    pub fn conn(&mut self) -> &mut SqliteConnection {
        &mut self.tx
    }

    /// Appends an event to the log in this transaction; it is published after commit.
    pub async fn emit(&mut self, event: NewEvent) -> Result<()> {
        let event = events::db::append(&mut self.tx, event).await?;
        self.events.push(event);
        Ok(())
    }

    /// Appends many events in one statement; they are published after commit, in order.
    pub async fn emit_many(&mut self, events: Vec<NewEvent>) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let appended = events::db::append_many(&mut self.tx, events).await?;
        self.events.extend(appended);
        Ok(())
    }

    /// Commits, then hands the events to the broker in `seq` order (still holding the order lock).
    pub async fn commit(self, broker: &Broker) -> Result<()> {
        let Writer { tx, events, _order } = self;
        tx.commit().await?;
        for event in events {
            broker.publish(event);
        }
        Ok(())
    }
}
