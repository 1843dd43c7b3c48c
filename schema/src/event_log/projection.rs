//! Exactly-once projection: apply a batch of events and advance a named checkpoint in one
//! transaction. A crash anywhere in between rolls both back, so each event is applied once.

use std::future::Future;

use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span};

use super::{EventLog, Subscription, SubscriptionOptions};
use crate::{Error, RecordedEvent, Result};

/// State derived from the log, kept in tables of its own.
pub trait Projection: Send {
    /// Checkpoint name; unique per projection.
    fn name(&self) -> &str;

    /// Applies one event inside the batch transaction. Any error rolls back the whole batch,
    /// checkpoint included.
    fn apply(
        &mut self,
        tx: &mut PgConnection,
        event: &RecordedEvent,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// The stored checkpoint of `name` (0 when it has none).
pub async fn load_checkpoint(pool: &PgPool, name: &str) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT position FROM subscription_checkpoints WHERE name = $1")
            .bind(name)
            .fetch_optional(pool)
            .await
            .map_err(Error::db("reading a checkpoint"))?
            .unwrap_or(0),
    )
}

/// Locks the checkpoint `name` inside `tx` (creating it at 0) and returns its position. The
/// row lock serialises every writer of the same checkpoint until `tx` ends, so a batch
/// applied under it is applied once.
pub async fn lock_checkpoint(tx: &mut PgConnection, name: &str) -> Result<i64> {
    sqlx::query_scalar(
        "INSERT INTO subscription_checkpoints (name, position) VALUES ($1, 0) \
         ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name \
         RETURNING position",
    )
    .bind(name)
    .fetch_one(&mut *tx)
    .await
    .map_err(Error::db("locking a checkpoint"))
}

/// Sets the checkpoint `name` to `position` (creating it if needed).
pub async fn store_checkpoint(conn: &mut PgConnection, name: &str, position: i64) -> Result<()> {
    sqlx::query(
        "INSERT INTO subscription_checkpoints (name, position) VALUES ($1, $2) \
         ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position, updated_at = now()",
    )
    .bind(name)
    .bind(position)
    .execute(&mut *conn)
    .await
    .map_err(Error::db("storing a checkpoint"))?;
    Ok(())
}

/// Applies `events` (in order) and advances the checkpoint, in one transaction. Events at or
/// below the stored checkpoint are passed over, so a batch replayed after a crash, or
/// handed to two runners of the same projection, is applied once. Returns the checkpoint.
pub async fn apply_batch<P: Projection>(
    pool: &PgPool,
    projection: &mut P,
    events: &[RecordedEvent],
) -> Result<i64> {
    let mut tx = pool
        .begin()
        .await
        .map_err(Error::db("beginning a projection transaction"))?;
    let checkpoint = lock_checkpoint(&mut tx, projection.name()).await?;

    let mut last = checkpoint;
    for event in events.iter().filter(|e| e.position > checkpoint) {
        let span = info_span!(
            "project",
            projection = projection.name(),
            position = event.position,
            event_type = %event.event_type,
            traceparent = event.metadata.traceparent.as_deref(),
        );
        projection.apply(&mut tx, event).instrument(span).await?;
        last = event.position;
    }
    if last > checkpoint {
        store_checkpoint(&mut tx, projection.name(), last).await?;
    }
    tx.commit()
        .await
        .map_err(Error::db("committing a projection batch"))?;
    Ok(last)
}

/// Runs a projection from its checkpoint until `shutdown` is cancelled or an error occurs.
pub async fn run<P: Projection>(
    log: &EventLog,
    projection: &mut P,
    options: SubscriptionOptions,
    shutdown: CancellationToken,
) -> Result<()> {
    let from = load_checkpoint(log.pool(), projection.name()).await?;
    let mut subscription = Subscription::start(log.pool().clone(), from, options).await?;
    loop {
        let batch = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            batch = subscription.next_batch() => batch?,
        };
        apply_batch(log.pool(), projection, &batch).await?;
    }
}
