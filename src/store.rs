//! The SQL store, the source of truth. SQLite in WAL mode (`synchronous=NORMAL`: survives any
//! crash of the process), one file, created if missing, migrations embedded and applied at start.
//!
//! Writes go through one connection and one [`Writer`] at a time: SQLite has a single writer
//! anyway, and holding the connection from `BEGIN` until the committed events are handed to the
//! publisher means events are published in exactly the order of their `seq` — a stream never
//! sees a newer event before an older one from this instance. Reads use a separate pool and never
//! wait for writers (WAL).

use std::ops::{Deref, DerefMut};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, Row, SqliteConnection, SqlitePool};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::broker::Broker;
use crate::error::Result;
use crate::events::{self, Event, NewEvent};

/// WAL frames (pages) after which the background checkpoint makes the writer start the WAL over.
const WAL_RESTART_FRAMES: i64 = 4096;

/// The one write connection. It is owned, not pooled: a pool's acquire and release cost several
/// times more than the statements of a typical write.
struct WriteConn {
    conn: SqliteConnection,
    /// A transaction was begun and neither committed nor rolled back yet (its [`Writer`] was
    /// dropped on an error path); the next user rolls it back first.
    in_tx: bool,
}

impl WriteConn {
    async fn settle(&mut self) -> Result<()> {
        if self.in_tx {
            sqlx::query("ROLLBACK").execute(&mut self.conn).await?;
            self.in_tx = false;
        }
        Ok(())
    }
}

/// Handle to the store: cheap to clone.
#[derive(Clone)]
pub struct Store {
    writer: Arc<Mutex<WriteConn>>,
    /// Copies the WAL back into the database file, beside the writer (never blocking it).
    checkpointer: Arc<Mutex<SqliteConnection>>,
    read: SqlitePool,
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
            .pragma("temp_store", "memory");
        // The writer never checkpoints inside a commit (a checkpoint fsyncs the database file:
        // milliseconds in the tail of a request); `checkpoint` does it in the background.
        let mut conn = options
            .clone()
            .pragma("wal_autocheckpoint", "0")
            .connect()
            .await?;
        sqlx::migrate!().run(&mut conn).await?;
        let checkpointer = options.clone().connect().await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .connect_with(options.read_only(true))
            .await?;
        Ok(Store {
            writer: Arc::new(Mutex::new(WriteConn { conn, in_tx: false })),
            checkpointer: Arc::new(Mutex::new(checkpointer)),
            read,
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
        let mut guard = self.writer.clone().lock_owned().await;
        guard.settle().await?;
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut guard.conn)
            .await?;
        guard.in_tx = true;
        Ok(Writer {
            guard: Some(guard),
            events: Vec::new(),
        })
    }

    /// The write connection for one autocommit statement that emits no event (a claim): no
    /// transaction round trips.
    pub async fn autocommit(&self) -> Result<AutoCommit> {
        let mut guard = self.writer.clone().lock_owned().await;
        guard.settle().await?;
        Ok(AutoCommit(guard))
    }

    /// Keeps the WAL bounded without putting a checkpoint (and its fsync) inside a commit: a
    /// passive checkpoint on its own connection copies the bulk of the WAL back into the
    /// database file without blocking anyone; once the WAL has grown past [`WAL_RESTART_FRAMES`],
    /// the small remainder is copied while holding the writer, so the next write transaction
    /// starts the WAL over. Called by the background loop.
    pub async fn checkpoint(&self) -> Result<()> {
        let frames: i64 = {
            let mut conn = self.checkpointer.lock().await;
            let row = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .fetch_one(&mut *conn)
                .await?;
            row.try_get(1)?
        };
        if frames > WAL_RESTART_FRAMES {
            let mut writer = self.writer.lock().await;
            writer.settle().await?;
            sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&mut writer.conn)
                .await?;
        }
        Ok(())
    }

    /// A cheap liveness probe for `/readyz`.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.read).await?;
        Ok(())
    }

    /// Closes the read pool (the write connection closes when the last handle is dropped).
    pub async fn close(&self) {
        self.read.close().await;
    }
}

/// Exclusive use of the write connection outside a transaction.
pub struct AutoCommit(OwnedMutexGuard<WriteConn>);

impl Deref for AutoCommit {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        &self.0.conn
    }
}

impl DerefMut for AutoCommit {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.0.conn
    }
}

/// An open write transaction plus the events it will publish once committed. Dropping it without
/// [`Writer::commit`] rolls everything back and publishes nothing.
pub struct Writer {
    /// Always `Some` until commit or drop.
    guard: Option<OwnedMutexGuard<WriteConn>>,
    events: Vec<Event>,
}

impl Writer {
    /// The connection, for a domain's `db.rs` functions.
    pub fn conn(&mut self) -> &mut SqliteConnection {
        &mut self.guard.as_mut().expect("an open writer").conn
    }

    /// Appends an event to the log in this transaction; it is published after commit.
    pub async fn emit(&mut self, event: NewEvent) -> Result<()> {
        let event = events::db::append(self.conn(), event).await?;
        self.events.push(event);
        Ok(())
    }

    /// Appends many events in one statement; they are published after commit, in order.
    pub async fn emit_many(&mut self, events: Vec<NewEvent>) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let appended = events::db::append_many(self.conn(), events).await?;
        self.events.extend(appended);
        Ok(())
    }

    /// Commits, then hands the events to the broker in `seq` order while still holding the
    /// write connection, so no later commit can be published before them.
    pub async fn commit(mut self, broker: &Broker) -> Result<()> {
        let mut guard = self.guard.take().expect("an open writer");
        sqlx::query("COMMIT").execute(&mut guard.conn).await?;
        guard.in_tx = false;
        for event in std::mem::take(&mut self.events) {
            broker.publish(event);
        }
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Not committed (an error path): roll back now rather than at the next user's turn, so
        // the file's write lock is not held meanwhile. The guard moves into the task, keeping
        // the connection exclusive until the rollback is done.
        if let Some(mut guard) = self.guard.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                if let Err(e) = guard.settle().await {
                    tracing::error!(error = %e, "rollback failed");
                }
            });
        }
    }
}
