//! Gap-free subscription: events in global order from a checkpoint, none skipped.

use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tracing::{debug, warn};

use super::append::NOTIFY_CHANNEL;
use super::horizon::{Horizon, Watermark};
use super::read::{self, event_columns};
use crate::{Error, RecordedEvent, Result};

/// How a subscription reads and waits.
#[derive(Debug, Clone)]
pub struct SubscriptionOptions {
    /// Label of the subscriber in metrics and logs.
    pub name: String,
    /// Most events returned by one read.
    pub batch_size: i64,
    /// Fallback poll when idle: covers a lost notification or a dropped LISTEN connection.
    pub idle_poll: Duration,
    /// Re-check interval while allocated positions are still unsettled (a transaction is
    /// in flight). A committing writer also notifies, so this only bounds the wait behind
    /// rolled-back or unrelated transactions.
    pub settle_poll: Duration,
}

impl Default for SubscriptionOptions {
    fn default() -> Self {
        Self {
            name: "subscriber".into(),
            batch_size: 1000,
            idle_poll: Duration::from_millis(500),
            settle_poll: Duration::from_millis(5),
        }
    }
}

/// What a subscriber reports about its own progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionStats {
    /// Last position handed out (or skipped as a settled hole).
    pub position: i64,
    /// Highest position known settled.
    pub safe_horizon: i64,
    /// Positions allocated by in-flight transactions that hold this reader back.
    pub blocked_positions: i64,
    /// How long the reader has been held back.
    pub blocked_for: Duration,
}

/// A reader of the log in global order, starting after a checkpoint.
///
/// Wakes on `LISTEN warren_events`, falls back to polling, and never returns a position
/// beyond the safe horizon (see [`super::horizon`]). Holes left by rolled-back transactions
/// are passed over once settled.
#[derive(Debug)]
pub struct Subscription {
    pool: PgPool,
    listener: Option<PgListener>,
    cursor: i64,
    horizon: Horizon,
    options: SubscriptionOptions,
}

impl Subscription {
    /// Starts reading after `position` (0 reads from the beginning).
    pub async fn start(pool: PgPool, position: i64, options: SubscriptionOptions) -> Result<Self> {
        // LISTEN before the first read, so a commit between the read and the wait is not
        // missed. Without LISTEN (for example behind a transaction-mode pooler) the
        // subscription still works, by polling.
        let listener = match PgListener::connect_with(&pool).await {
            Ok(mut l) => match l.listen(NOTIFY_CHANNEL).await {
                Ok(()) => Some(l),
                Err(e) => {
                    warn!(subscriber = %options.name, error = %e, "LISTEN failed; polling only");
                    None
                }
            },
            Err(e) => {
                warn!(subscriber = %options.name, error = %e, "LISTEN connection failed; polling only");
                None
            }
        };
        Ok(Self {
            pool,
            listener,
            cursor: position,
            horizon: Horizon::new(position),
            options,
        })
    }

    /// Position of the last event returned (the value to checkpoint).
    pub fn position(&self) -> i64 {
        self.cursor
    }

    pub fn stats(&self) -> SubscriptionStats {
        SubscriptionStats {
            position: self.cursor,
            safe_horizon: self.horizon.safe(),
            blocked_positions: self.horizon.blocked_positions(),
            blocked_for: self.horizon.blocked_for(Instant::now()),
        }
    }

    /// The next events in order; waits until there is at least one.
    pub async fn next_batch(&mut self) -> Result<Vec<RecordedEvent>> {
        loop {
            let batch = self.poll().await?;
            if !batch.is_empty() {
                return Ok(batch);
            }
            self.wait().await;
        }
    }

    /// One read attempt: the next settled events, possibly none. Does not wait.
    pub async fn poll(&mut self) -> Result<Vec<RecordedEvent>> {
        if self.cursor >= self.horizon.safe() {
            let watermark = watermark(&self.pool).await?;
            self.horizon.observe(watermark, Instant::now());
            self.record_metrics();
        }
        let safe = self.horizon.safe();
        if self.cursor >= safe {
            return Ok(Vec::new());
        }
        let sql = concat!(
            "SELECT ",
            event_columns!(),
            " FROM events WHERE position > $1 AND position <= $2 ORDER BY position LIMIT $3"
        );
        let rows = sqlx::query(sql)
            .bind(self.cursor)
            .bind(safe)
            .bind(self.options.batch_size)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::db("reading events"))?;
        let batch = rows
            .iter()
            .map(read::decode_row)
            .collect::<Result<Vec<_>>>()?;
        self.cursor = if (batch.len() as i64) < self.options.batch_size {
            // Everything up to the horizon is read: what is missing there is a settled hole.
            safe
        } else {
            batch.last().map_or(safe, |e| e.position)
        };
        Ok(batch)
    }

    async fn wait(&mut self) {
        let timeout = if self.horizon.has_pending() {
            self.options.settle_poll
        } else {
            self.options.idle_poll
        };
        let Some(listener) = self.listener.as_mut() else {
            tokio::time::sleep(timeout).await;
            return;
        };
        match tokio::time::timeout(timeout, listener.recv()).await {
            Ok(Ok(_)) => {
                // Several commits may have notified; one read serves them all.
                while listener.next_buffered().is_some() {}
            }
            Ok(Err(e)) => {
                // PgListener reconnects on the next recv; polling covers the gap.
                debug!(subscriber = %self.options.name, error = %e, "LISTEN connection error");
                tokio::time::sleep(timeout).await;
            }
            Err(_elapsed) => {}
        }
    }

    fn record_metrics(&self) {
        let stats = self.stats();
        let name = self.options.name.clone();
        metrics::gauge!("warren_event_log_subscriber_blocked_positions", "subscriber" => name.clone())
            .set(stats.blocked_positions as f64);
        metrics::gauge!("warren_event_log_subscriber_blocked_seconds", "subscriber" => name.clone())
            .set(stats.blocked_for.as_secs_f64());
        metrics::gauge!("warren_event_log_subscriber_position", "subscriber" => name)
            .set(stats.position as f64);
    }
}

/// Reads the log's watermark (see the migration's `event_log_watermark`).
pub async fn watermark(pool: &PgPool) -> Result<Watermark> {
    let (allocated, next_xid, oldest_running) = sqlx::query_as::<_, (i64, i64, i64)>(
        "SELECT allocated, next_xid, oldest_running FROM event_log_watermark()",
    )
    .fetch_one(pool)
    .await
    .map_err(Error::db("reading the log watermark"))?;
    Ok(Watermark {
        allocated,
        next_xid,
        oldest_running,
    })
}

/// The highest position allocated now, once every position up to it is settled (committed
/// or rolled back): a reader that reads up to it misses nothing that was in flight when it
/// was called. Waits for the transactions in flight now, re-checking every `poll`.
pub async fn settled_head(pool: &PgPool, poll: Duration) -> Result<i64> {
    let mut horizon = Horizon::new(0);
    let head = watermark(pool).await?.allocated;
    loop {
        let safe = horizon.observe(watermark(pool).await?, Instant::now());
        if safe >= head {
            return Ok(head);
        }
        tokio::time::sleep(poll).await;
    }
}
