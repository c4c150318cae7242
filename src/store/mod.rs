//! The SQL store, the source of truth. SQLite in WAL mode (`synchronous=NORMAL`: survives any
//! crash of the process), one file, created if missing, migrations embedded and applied at start.
//! Space is given back, not only freed: the file uses `auto_vacuum = INCREMENTAL` (a file made
//! before that is converted once at start by a `VACUUM`), and [`Store::reclaim`] hands free pages
//! back to the file system a few at a time, so purging never holds the writer for long.
//!
//! All writes go through one owned connection, held by one user at a time: a [`Writer`] (an
//! explicit transaction) or an [`AutoCommit`] (single statements, e.g. the batches of
//! `messages::batch`). SQLite has a single writer anyway. Users wait for it in one of two
//! [`Lane`]s: work that finishes accepted work goes first (see [`lanes`]). A `Writer` appends
//! the events it emitted in one statement when it commits. Every event this connection logs is
//! also captured in a per-connection outbox (a TEMP trigger), and at each commit (in the same
//! round trip as a `Writer`'s append and `COMMIT`; after an `AutoCommit`'s statements), still
//! holding the connection, the outbox is drained to the broker: events leave in exactly the order
//! of their `seq`, including those written by triggers, and only this instance's own. Reads use a
//! separate pool and never wait for writers (WAL).

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteAutoVacuum, SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, QueryBuilder, Row, Sqlite, SqliteConnection, SqlitePool};
use tokio::sync::Mutex;

use crate::broker::Broker;
use crate::common::now_ms;
use crate::error::Result;
use crate::events::{self, NewEvent};
use crate::ops::metrics::Metrics;

pub mod intake;
pub mod lanes;
pub use lanes::Lane;
use lanes::{LaneGuard, LaneLock};

/// WAL frames (pages) after which the background checkpoint makes the writer start the WAL over.
const WAL_RESTART_FRAMES: i64 = 4096;
/// The WAL file is cut back to this size when it starts over (it otherwise keeps its largest
/// size for good).
const WAL_SIZE_LIMIT: &str = "67108864";

/// The one write connection. It is owned, not pooled: a pool's acquire and release cost several
/// times more than the statements of a typical write.
struct WriteConn {
    conn: SqliteConnection,
    /// A transaction may be open: set *before* `BEGIN` is sent and cleared only once it is known
    /// to be over, so a request cancelled halfway never leaves the connection inside one.
    in_tx: bool,
    /// Counts what this instance committed, from its events.
    metrics: Arc<Metrics>,
}

impl WriteConn {
    /// Ends a transaction a cancelled or failed user left open.
    async fn settle(&mut self) -> Result<()> {
        if self.in_tx {
            match sqlx::query("ROLLBACK").execute(&mut self.conn).await {
                Ok(_) => {}
                // The COMMIT went through (or SQLite rolled back by itself): nothing is open.
                Err(sqlx::Error::Database(e))
                    if e.message().contains("no transaction is active") => {}
                Err(e) => return Err(e.into()),
            }
            self.in_tx = false;
        }
        Ok(())
    }

    async fn begin(&mut self) -> Result<()> {
        self.in_tx = true;
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut self.conn)
            .await?;
        Ok(())
    }

    async fn commit(&mut self) -> Result<()> {
        sqlx::query("COMMIT").execute(&mut self.conn).await?;
        self.in_tx = false;
        Ok(())
    }

    /// Hands the events this connection logged since the last call to the broker, in `seq`
    /// order. A failure is logged, not returned: what it reports on is already committed, and
    /// streams re-read the log when they find a gap.
    async fn publish_logged(&mut self, broker: &Broker) {
        match events::db::drain_outbox(&mut self.conn).await {
            Ok(logged) => self.publish(broker, logged),
            Err(e) => tracing::error!(error = %e, "committed events were not published"),
        }
    }

    fn publish(&self, broker: &Broker, logged: Vec<events::Event>) {
        logged.into_iter().for_each(|event| {
            self.metrics.observe(&event);
            broker.publish(event);
        });
    }
}

/// Handle to the store: cheap to clone.
#[derive(Clone)]
pub struct Store {
    writer: LaneLock<WriteConn>,
    /// Copies the WAL back into the database file, beside the writer (never blocking it).
    checkpointer: Arc<Mutex<SqliteConnection>>,
    read: SqlitePool,
}

impl Store {
    /// Opens (creating if missing) the SQLite file at `path` and applies the migrations.
    pub async fn open(path: &str, metrics: Arc<Metrics>) -> Result<Store> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .pragma("journal_size_limit", WAL_SIZE_LIMIT)
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
            // The writer opens the file first. This takes effect on a new file only (sqlx sends
            // it before `journal_mode`, as SQLite needs); an older file is converted below.
            .auto_vacuum(SqliteAutoVacuum::Incremental)
            .connect()
            .await?;
        convert_to_incremental_vacuum(&mut conn, path).await?;
        sqlx::migrate!().run(&mut conn).await?;
        events::db::create_outbox(&mut conn).await?;
        let checkpointer = options.clone().connect().await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            // sqlx pings a connection before each checkout by default: for a file on this
            // machine that only adds a round trip to its worker thread to every read.
            .test_before_acquire(false)
            .connect_with(options.read_only(true))
            .await?;
        Ok(Store {
            writer: LaneLock::new(WriteConn {
                conn,
                in_tx: false,
                metrics,
            }),
            checkpointer: Arc::new(Mutex::new(checkpointer)),
            read,
        })
    }

    /// Applies migrations only (`ltmc migrate`).
    pub async fn migrate(path: &str) -> Result<()> {
        Store::open(path, Arc::default()).await?.close().await;
        Ok(())
    }

    /// The read pool: queries that change nothing.
    pub fn reader(&self) -> &SqlitePool {
        &self.read
    }

    /// Starts a write transaction in the other lane (`BEGIN IMMEDIATE`, so two instances on one
    /// file queue rather than deadlock on a lock upgrade).
    pub async fn begin(&self) -> Result<Writer> {
        self.begin_in(Lane::Other).await
    }

    /// Starts a write transaction, waiting for the connection in `lane`.
    pub async fn begin_in(&self, lane: Lane) -> Result<Writer> {
        self.turn(lane).await.begin().await
    }

    /// The write connection without a transaction: for single statements (a claim, a batch of
    /// acks, a batch of sends whose events triggers log), or a transaction of its own.
    pub async fn autocommit(&self) -> Result<AutoCommit> {
        self.turn(Lane::Other).await.autocommit().await
    }

    /// Waits for the write connection in `lane`, using it for nothing yet: a waiter may give
    /// up (drop the future) at any point without a trace.
    pub async fn turn(&self, lane: Lane) -> Turn {
        Turn(self.writer.lock(lane).await)
    }

    /// Sets the per-recipient cap the send triggers enforce.
    pub async fn set_queue_cap(&self, cap: u32) -> Result<()> {
        let mut writer = self.autocommit().await?;
        sqlx::query("UPDATE meta SET value = ? WHERE key = 'max_queued_per_agent'")
            .bind(cap)
            .execute(&mut *writer)
            .await?;
        Ok(())
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
            let mut writer = self.autocommit().await?;
            sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&mut *writer)
                .await?;
        }
        Ok(())
    }

    /// Whether `exists_sql` (`SELECT EXISTS (…)` with one `?` for `now`) finds anything, asked
    /// of the read pool: timer steps look before they take the write connection, so an idle tick
    /// never makes writers wait.
    pub async fn any_due(&self, exists_sql: &'static str, now: i64) -> Result<bool> {
        Ok(sqlx::query_scalar::<_, bool>(exists_sql)
            .bind(now)
            .fetch_one(&self.read)
            .await?)
    }

    /// The database file's size and the free pages inside it.
    pub async fn size(&self) -> Result<Size> {
        let row = sqlx::query(
            "SELECT (SELECT page_size FROM pragma_page_size()),
                    (SELECT page_count FROM pragma_page_count()),
                    (SELECT freelist_count FROM pragma_freelist_count()),
                    (SELECT auto_vacuum FROM pragma_auto_vacuum())",
        )
        .fetch_one(&self.read)
        .await?;
        let page_size: i64 = row.try_get(0)?;
        Ok(Size {
            bytes: page_size * row.try_get::<i64, _>(1)?,
            free_bytes: page_size * row.try_get::<i64, _>(2)?,
            incremental_vacuum: row.try_get::<i64, _>(3)? == 2,
        })
    }

    /// Hands up to `pages` free pages back to the file system (`PRAGMA incremental_vacuum`), in
    /// one short turn on the write connection. Returns how many pages were free before.
    pub async fn reclaim(&self, pages: u32) -> Result<i64> {
        let mut writer = self.autocommit().await?;
        let free: i64 = sqlx::query_scalar("SELECT freelist_count FROM pragma_freelist_count()")
            .fetch_one(&mut *writer)
            .await?;
        if free > 0 {
            // Each step of the statement frees one page: fetching every row steps it to the end.
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "PRAGMA incremental_vacuum({pages})"
            )))
            .fetch_all(&mut *writer)
            .await?;
        }
        Ok(free)
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

/// How big the database file is.
#[derive(Debug, Clone, Copy)]
pub struct Size {
    /// page_count × page_size (the WAL file not included).
    pub bytes: i64,
    /// Free pages inside the file (freelist_count × page_size), not yet given back.
    pub free_bytes: i64,
    /// Whether free pages can be given back (`auto_vacuum = INCREMENTAL`).
    pub incremental_vacuum: bool,
}

/// A file created before the store used `auto_vacuum = INCREMENTAL` keeps the mode it was made
/// with until a `VACUUM` rewrites it: done once, at start, before anything else uses the file
/// (it takes a while on a large file and needs as much free disk again).
async fn convert_to_incremental_vacuum(conn: &mut SqliteConnection, path: &str) -> Result<()> {
    let mode: i64 = sqlx::query_scalar("PRAGMA auto_vacuum")
        .fetch_one(&mut *conn)
        .await?;
    if mode != 2 {
        tracing::info!(
            path,
            "converting the database to incremental vacuum (one VACUUM)"
        );
        sqlx::query("PRAGMA auto_vacuum = INCREMENTAL")
            .execute(&mut *conn)
            .await?;
        sqlx::query("VACUUM").execute(&mut *conn).await?;
    }
    Ok(())
}

/// The write connection, held, not yet in use.
pub struct Turn(LaneGuard<WriteConn>);

impl Turn {
    /// Starts a write transaction.
    pub async fn begin(self) -> Result<Writer> {
        let mut guard = self.0;
        guard.settle().await?;
        guard.begin().await?;
        Ok(Writer {
            guard: Some(guard),
            pending: Vec::new(),
        })
    }

    /// Uses the connection without a transaction.
    pub async fn autocommit(self) -> Result<AutoCommit> {
        let mut guard = self.0;
        guard.settle().await?;
        Ok(AutoCommit(guard))
    }
}

/// Exclusive use of the write connection outside a [`Writer`].
pub struct AutoCommit(LaneGuard<WriteConn>);

impl AutoCommit {
    /// Publishes what the statements run here logged (events written by triggers).
    pub async fn publish_logged(&mut self, broker: &Broker) {
        self.0.publish_logged(broker).await;
    }

    /// `BEGIN IMMEDIATE`. Whoever uses the connection next rolls back a transaction left open.
    pub async fn begin(&mut self) -> Result<()> {
        self.0.begin().await
    }

    pub async fn commit(&mut self) -> Result<()> {
        self.0.commit().await
    }

    /// Rolls back a transaction a failed step left open, so what follows runs on its own.
    pub async fn settle(&mut self) -> Result<()> {
        self.0.settle().await
    }
}

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

/// An open write transaction. Its events are published once committed; dropping it without
/// [`Writer::commit`] rolls everything back and publishes nothing.
pub struct Writer {
    /// Always `Some` until commit or drop.
    guard: Option<LaneGuard<WriteConn>>,
    /// Events emitted so far, with the time of each.
    pending: Vec<(i64, NewEvent)>,
}

impl Writer {
    /// The connection, for a domain's `db.rs` functions.
    pub fn conn(&mut self) -> &mut SqliteConnection {
        &mut self.guard.as_mut().expect("an open writer").conn
    }

    /// Adds an event to this transaction: it is appended to the log (with the others, in one
    /// statement) when the transaction commits, and published after.
    pub fn emit(&mut self, event: NewEvent) {
        self.pending.push((now_ms(), event));
    }

    /// Appends the emitted events and commits, then hands every event the transaction logged
    /// (also those written by triggers) to the broker in `seq` order while still holding the
    /// write connection, so no later commit can be published before them.
    pub async fn commit(mut self, broker: &Broker) -> Result<()> {
        let pending = std::mem::take(&mut self.pending);
        // One round trip: the append, the outbox and the COMMIT (a failure rolls back on drop).
        let committed = events::db::append_and_commit(self.conn(), &pending).await?;
        let mut guard = self.guard.take().expect("an open writer");
        guard.in_tx = false;
        match committed.events() {
            Ok(logged) => guard.publish(broker, logged),
            Err(e) => tracing::error!(error = %e, "committed events were not published"),
        }
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Not committed (an error path, or the request was cancelled): roll back now rather
        // than at the next user's turn, so the file's write lock is not held meanwhile. The
        // guard moves into the task, keeping the connection exclusive until that is done.
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

/// Builds a statement of `rows` rows (`VALUES (…), (…)`): its text changes with the count, so
/// only the one-row text is kept in the connection's statement cache, where the others would
/// push out the statements that are used all the time.
pub fn build_rows(
    query: &mut QueryBuilder<Sqlite>,
    rows: usize,
) -> sqlx::query::Query<'_, Sqlite, <Sqlite as sqlx::Database>::Arguments> {
    query.build().persistent(rows == 1)
}
