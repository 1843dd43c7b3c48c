//! The read models (`agents`, `routes`, `workspaces`, `messages`, `message_routes`,
//! `replies`): tables an operator or the admin API can query, derived from the log.
//!
//! Each batch of events is folded in memory ([`Batch::fold`], pure) and written with one
//! set-based statement per table, in the same transaction as the checkpoint, so every event
//! is applied exactly once however often a batch is handed over. Agents, routes and
//! workspaces are written from the same [`State`] the decisions read, so the tables show
//! what the decisions saw. [`rebuild`] truncates the tables and replays from position 0.

mod copy;

use std::collections::BTreeMap;

use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::{info, instrument};
use uuid::Uuid;
use warren_schema::event_log::projection::{lock_checkpoint, store_checkpoint};
use warren_schema::event_log::{Subscription, SubscriptionOptions};
use warren_schema::events::*;
use warren_schema::{Error as LogError, EventLog, RecordedEvent};

use crate::decide::{Phase, State};
use crate::error::Result;
use copy::CopyRows;

/// Checkpoint of the read models.
pub const CHECKPOINT: &str = "control-plane.projections";

/// The read models' writer: the fold state and the checkpoint it matches.
#[derive(Debug, Default)]
pub struct Projections {
    state: State,
}

/// What one batch changes.
#[derive(Debug, Default, PartialEq)]
pub struct Batch {
    /// Keys touched, with the position of the last event that touched each (the rows'
    /// `position`, the same however the log is cut into batches).
    agents: BTreeMap<String, i64>,
    routes: BTreeMap<String, i64>,
    workspaces: BTreeMap<String, i64>,
    /// Last `workspace.observed` per workspace in the batch: (phase, instance, detail).
    observed: BTreeMap<String, (String, Option<String>, Option<String>)>,
    messages: Vec<(Uuid, i64, Value, String, chrono::DateTime<chrono::Utc>)>,
    message_routes: Vec<(Uuid, Uuid, String, String, String, i64)>,
    replies: Vec<(Uuid, String, String, Value, String, i64)>,
    deliveries: Vec<(Uuid, String, i64)>,
    last: i64,
}

impl Batch {
    /// Folds `events` (past `state.position`) into `state` and records what changed.
    pub fn fold(state: &mut State, events: &[RecordedEvent]) -> Self {
        let mut b = Self {
            last: state.position,
            ..Self::default()
        };
        let from = state.position;
        for e in events.iter().filter(|e| e.position > from) {
            b.add(state, e);
        }
        b
    }

    /// Folds one event into `state` and records what it changed.
    fn add(&mut self, state: &mut State, e: &RecordedEvent) {
        let b = self;
        state.apply(e);
        b.last = e.position;
        match e.event_type.as_str() {
            AgentConfigured::TYPE | AgentRemoved::TYPE => {
                if let Some(name) = e.payload["name"].as_str() {
                    b.agents.insert(name.to_owned(), e.position);
                }
            }
            RouteConfigured::TYPE | RouteRemoved::TYPE => {
                if let Some(route) = e.payload["route"].as_str() {
                    b.routes.insert(route.to_owned(), e.position);
                }
            }
            MessageReceived::TYPE => {
                if let Ok(m) = e.decode::<MessageReceived>() {
                    let origin = serde_json::to_value(&m.origin).unwrap_or(Value::Null);
                    b.messages
                        .push((e.id.0, e.position, origin, m.text, e.metadata.received_at));
                }
            }
            MessageRouted::TYPE => {
                if let Ok(r) = e.decode::<MessageRouted>() {
                    b.workspaces.insert(r.workspace.clone(), e.position);
                    b.message_routes.push((
                        e.id.0,
                        r.message_id.0,
                        r.agent,
                        r.workspace,
                        r.reason,
                        e.position,
                    ));
                }
            }
            AgentReplied::TYPE => {
                if let Ok(r) = e.decode::<AgentReplied>() {
                    b.workspaces.insert(r.workspace.clone(), e.position);
                    let reply_to = serde_json::to_value(&r.reply_to).unwrap_or(Value::Null);
                    b.replies
                        .push((e.id.0, r.workspace, r.agent, reply_to, r.text, e.position));
                }
            }
            ReplyDelivered::TYPE => {
                if let Ok(d) = e.decode::<ReplyDelivered>() {
                    b.deliveries.push((d.reply_id.0, d.ts, e.position));
                }
            }
            WorkspaceObserved::TYPE => {
                if let Ok(o) = e.decode::<WorkspaceObserved>() {
                    b.workspaces.insert(o.workspace.clone(), e.position);
                    let phase = serde_json::to_value(o.phase)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default();
                    b.observed
                        .insert(o.workspace, (phase, o.instance, o.detail));
                }
            }
            _ => {
                if let Some(w) = e.payload.get("workspace").and_then(Value::as_str) {
                    b.workspaces.insert(w.to_owned(), e.position);
                }
            }
        }
    }
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Stopped => "stopped",
        Phase::Queued => "queued",
        Phase::Starting => "starting",
        Phase::Ready => "ready",
        Phase::Stopping => "stopping",
        Phase::BackingOff => "backing_off",
        Phase::Failed => "failed",
    }
}

fn desired(phase: Phase) -> &'static str {
    match phase {
        Phase::Queued | Phase::Starting | Phase::Ready | Phase::BackingOff => "running",
        Phase::Stopped | Phase::Stopping | Phase::Failed => "stopped",
    }
}

impl Projections {
    /// The fold state up to the stored checkpoint (replayed from the log).
    #[instrument(skip_all)]
    pub async fn load(log: &EventLog) -> Result<Self> {
        let (state, _) = crate::replay::to_checkpoint(log, CHECKPOINT).await?;
        Ok(Self { state })
    }

    pub fn position(&self) -> i64 {
        self.state.position
    }

    /// Applies `events` and advances the checkpoint in one transaction. On error the fold
    /// state is unchanged.
    pub async fn apply(&mut self, pool: &PgPool, events: &[RecordedEvent]) -> Result<i64> {
        let mut next = self.state.clone();
        let batch = Batch::fold(&mut next, events);
        if batch.last == self.state.position {
            return Ok(batch.last);
        }
        let mut tx = pool
            .begin()
            .await
            .map_err(LogError::db("beginning a projection batch"))?;
        let stored = lock_checkpoint(&mut tx, CHECKPOINT).await?;
        if stored != self.state.position {
            // Another runner moved it (a rebuild, another replica): start over from it.
            return Err(crate::error::Error::CheckpointMoved {
                expected: self.state.position,
                found: stored,
            });
        }
        write(&mut tx, &batch, &next).await?;
        store_checkpoint(&mut tx, CHECKPOINT, batch.last).await?;
        tx.commit()
            .await
            .map_err(LogError::db("committing a projection batch"))?;
        self.state = next;
        Ok(batch.last)
    }

    /// Follows the log until `shutdown`.
    pub async fn run(&mut self, log: &EventLog, shutdown: CancellationToken) -> Result<()> {
        let options = SubscriptionOptions {
            name: CHECKPOINT.into(),
            batch_size: 5_000,
            ..SubscriptionOptions::default()
        };
        let mut subscription =
            Subscription::start(log.pool().clone(), self.position(), options).await?;
        loop {
            let batch = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                batch = subscription.next_batch() => batch?,
            };
            self.apply(log.pool(), &batch).await?;
        }
    }
}

/// Rows encoded per `COPY` round trip in a rebuild.
const REBUILD_CHUNK_BYTES: usize = 4 << 20;

/// The rebuild's fold: the decision state, every key touched so far, and the encoded rows
/// not yet handed to the writer.
struct RebuildFold {
    state: State,
    touched: Batch,
    rows: CopyRows,
    writer: tokio::sync::mpsc::Sender<CopyRows>,
    replayed: i64,
}

fn rebuild_step(fold: &mut RebuildFold, event: &RecordedEvent) {
    fold.touched.add(&mut fold.state, event);
    fold.replayed += 1;
    fold.rows.take(&mut fold.touched);
    if fold.rows.len() >= REBUILD_CHUNK_BYTES {
        // A closed writer has failed; its error is reported when it is joined.
        let _ = fold.writer.blocking_send(std::mem::take(&mut fold.rows));
    }
}

/// Replaces every read-model row with a replay of the log from position 0 up to what is
/// settled now, in one transaction: readers see the old tables until the new ones commit,
/// and a rebuild that fails changes nothing. Returns the events replayed.
///
/// The append-only tables are written with `COPY` while their keys are dropped, and the
/// keys are built once at the end by sorting, rather than row by row. Reading, folding
/// (on a blocking thread) and writing (on a second connection) overlap. The live projector
/// waits on the checkpoint's row lock meanwhile, then carries on from the rebuilt position.
#[instrument(skip_all, err)]
pub async fn rebuild(log: &EventLog) -> Result<i64> {
    let pool = log.pool();
    let up_to =
        warren_schema::event_log::settled_head(pool, std::time::Duration::from_millis(5)).await?;
    let db = |what| LogError::db(what);
    let mut tx = pool.begin().await.map_err(db("beginning a rebuild"))?;
    lock_checkpoint(&mut tx, CHECKPOINT).await?;
    for statement in [
        "SET LOCAL maintenance_work_mem = '256MB'",
        "TRUNCATE agents, routes, workspaces, messages, message_routes, replies",
        "ALTER TABLE messages DROP CONSTRAINT messages_pkey",
        "DROP INDEX message_routes_message",
        "ALTER TABLE message_routes DROP CONSTRAINT message_routes_pkey",
        "ALTER TABLE replies DROP CONSTRAINT replies_pkey",
    ] {
        sqlx::query(statement)
            .execute(&mut *tx)
            .await
            .map_err(db("clearing the read models"))?;
    }

    let (chunks, mut received) = tokio::sync::mpsc::channel::<CopyRows>(2);
    let writer = tokio::spawn(async move {
        while let Some(rows) = received.recv().await {
            rows.copy_into(&mut tx).await?;
        }
        Ok::<_, LogError>(tx)
    });
    let fold = RebuildFold {
        state: State::default(),
        touched: Batch::default(),
        rows: CopyRows::default(),
        writer: chunks,
        replayed: 0,
    };
    let started = std::time::Instant::now();
    let fold = crate::replay::fold_range(log, fold, 0, up_to, rebuild_step).await?;
    let folded = started.elapsed();
    let RebuildFold {
        state,
        touched,
        rows,
        writer: chunks,
        replayed,
    } = fold;
    if !rows.is_empty() {
        // A closed writer has failed; its error is reported when it is joined.
        let _ = chunks.send(rows).await;
    }
    drop(chunks);
    let mut tx = writer
        .await
        .map_err(|e| LogError::InvalidEvent(format!("the rebuild's writer stopped: {e}")))??;
    let copied = started.elapsed();

    for statement in [
        "ALTER TABLE messages ADD PRIMARY KEY (message_id)",
        "ALTER TABLE message_routes ADD PRIMARY KEY (decision_id)",
        "CREATE INDEX message_routes_message ON message_routes (message_id)",
        "ALTER TABLE replies ADD PRIMARY KEY (reply_id)",
    ] {
        sqlx::query(statement)
            .execute(&mut *tx)
            .await
            .map_err(db("building the read models' keys"))?;
    }
    // Agents, routes, workspaces and deliveries: from the final state, once.
    write(&mut tx, &touched, &state).await?;
    store_checkpoint(&mut tx, CHECKPOINT, up_to).await?;
    tx.commit().await.map_err(db("committing a rebuild"))?;
    info!(
        replayed,
        position = up_to,
        folded_ms = folded.as_millis(),
        copied_ms = copied.as_millis(),
        total_ms = started.elapsed().as_millis(),
        "read models rebuilt"
    );
    Ok(replayed)
}

/// Keys a batch touched, with the position that last touched each.
type Touched<'a> = Vec<(&'a String, &'a i64)>;

async fn write(tx: &mut PgConnection, b: &Batch, state: &State) -> Result<()> {
    let db = |what| LogError::db(what);
    // Agents and routes: upsert what exists, delete what was removed.
    let (present, gone): (Touched, Touched) = b
        .agents
        .iter()
        .partition(|(n, _)| state.agents.contains_key(*n));
    let gone: Vec<&String> = gone.into_iter().map(|(n, _)| n).collect();
    if !gone.is_empty() {
        sqlx::query("DELETE FROM agents WHERE name = ANY($1)")
            .bind(&gone)
            .execute(&mut *tx)
            .await
            .map_err(db("deleting agents"))?;
    }
    if !present.is_empty() {
        let rows: Vec<_> = present.iter().map(|(n, _)| &state.agents[*n]).collect();
        sqlx::query(
            "INSERT INTO agents (name, workspace, driver, settings, idle_timeout_secs, position) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::int8[], \
                 $6::int8[]) \
             ON CONFLICT (name) DO UPDATE SET workspace = EXCLUDED.workspace, \
                 driver = EXCLUDED.driver, settings = EXCLUDED.settings, \
                 idle_timeout_secs = EXCLUDED.idle_timeout_secs, position = EXCLUDED.position",
        )
        .bind(rows.iter().map(|a| a.name.as_str()).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|a| a.workspace.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|a| a.driver.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|a| &a.settings).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|a| i64::try_from(a.idle_timeout_secs).unwrap_or(i64::MAX))
                .collect::<Vec<_>>(),
        )
        .bind(present.iter().map(|(_, p)| **p).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await
        .map_err(db("writing agents"))?;
    }
    let (present, gone): (Touched, Touched) = b
        .routes
        .iter()
        .partition(|(r, _)| state.routes.contains_key(*r));
    let gone: Vec<&String> = gone.into_iter().map(|(r, _)| r).collect();
    if !gone.is_empty() {
        sqlx::query("DELETE FROM routes WHERE route = ANY($1)")
            .bind(&gone)
            .execute(&mut *tx)
            .await
            .map_err(db("deleting routes"))?;
    }
    if !present.is_empty() {
        sqlx::query(
            "INSERT INTO routes (route, agent, position) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::int8[]) \
             ON CONFLICT (route) DO UPDATE SET agent = EXCLUDED.agent, position = EXCLUDED.position",
        )
        .bind(present.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>())
        .bind(present.iter().map(|(r, _)| state.routes[*r].as_str()).collect::<Vec<_>>())
        .bind(present.iter().map(|(_, p)| **p).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await
        .map_err(db("writing routes"))?;
    }
    // Workspaces an operator deleted have left the state: their rows go too.
    let gone: Vec<&String> = b
        .workspaces
        .keys()
        .filter(|n| !state.workspaces.contains_key(*n))
        .collect();
    if !gone.is_empty() {
        sqlx::query("DELETE FROM workspaces WHERE name = ANY($1)")
            .bind(&gone)
            .execute(&mut *tx)
            .await
            .map_err(db("deleting workspaces"))?;
    }
    let (workspaces, positions): (Vec<_>, Vec<i64>) = b
        .workspaces
        .iter()
        .filter_map(|(n, p)| state.workspaces.get(n).map(|w| (w, *p)))
        .unzip();
    if !workspaces.is_empty() {
        let observed = |n: &str, i: usize| {
            b.observed.get(n).and_then(|o| match i {
                0 => Some(o.0.clone()),
                1 => o.1.clone(),
                _ => o.2.clone(),
            })
        };
        sqlx::query(
            "INSERT INTO workspaces (name, desired, phase, observed_phase, observed_instance, \
                 observed_detail, last_activity, position) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
                 $6::text[], $7::timestamptz[], $8::int8[]) \
             ON CONFLICT (name) DO UPDATE SET desired = EXCLUDED.desired, \
                 phase = EXCLUDED.phase, \
                 observed_phase = coalesce(EXCLUDED.observed_phase, workspaces.observed_phase), \
                 observed_instance = CASE WHEN EXCLUDED.observed_phase IS NULL \
                     THEN workspaces.observed_instance ELSE EXCLUDED.observed_instance END, \
                 observed_detail = CASE WHEN EXCLUDED.observed_phase IS NULL \
                     THEN workspaces.observed_detail ELSE EXCLUDED.observed_detail END, \
                 last_activity = EXCLUDED.last_activity, position = EXCLUDED.position",
        )
        .bind(
            workspaces
                .iter()
                .map(|w| w.name.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            workspaces
                .iter()
                .map(|w| desired(w.phase))
                .collect::<Vec<_>>(),
        )
        .bind(
            workspaces
                .iter()
                .map(|w| phase_name(w.phase))
                .collect::<Vec<_>>(),
        )
        .bind(
            workspaces
                .iter()
                .map(|w| observed(&w.name, 0))
                .collect::<Vec<_>>(),
        )
        .bind(
            workspaces
                .iter()
                .map(|w| observed(&w.name, 1))
                .collect::<Vec<_>>(),
        )
        .bind(
            workspaces
                .iter()
                .map(|w| observed(&w.name, 2))
                .collect::<Vec<_>>(),
        )
        .bind(
            workspaces
                .iter()
                .map(|w| w.last_activity)
                .collect::<Vec<_>>(),
        )
        .bind(&positions)
        .execute(&mut *tx)
        .await
        .map_err(db("writing workspaces"))?;
    }
    if !b.messages.is_empty() {
        sqlx::query(
            "INSERT INTO messages (message_id, position, origin, text, received_at) \
             SELECT * FROM unnest($1::uuid[], $2::int8[], $3::jsonb[], $4::text[], \
                 $5::timestamptz[]) ON CONFLICT (message_id) DO NOTHING",
        )
        .bind(b.messages.iter().map(|m| m.0).collect::<Vec<_>>())
        .bind(b.messages.iter().map(|m| m.1).collect::<Vec<_>>())
        .bind(b.messages.iter().map(|m| &m.2).collect::<Vec<_>>())
        .bind(b.messages.iter().map(|m| m.3.as_str()).collect::<Vec<_>>())
        .bind(b.messages.iter().map(|m| m.4).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await
        .map_err(db("writing messages"))?;
    }
    if !b.message_routes.is_empty() {
        let r = &b.message_routes;
        sqlx::query(
            "INSERT INTO message_routes (decision_id, message_id, agent, workspace, reason, position) \
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], \
                 $6::int8[]) ON CONFLICT (decision_id) DO NOTHING",
        )
        .bind(r.iter().map(|x| x.0).collect::<Vec<_>>())
        .bind(r.iter().map(|x| x.1).collect::<Vec<_>>())
        .bind(r.iter().map(|x| x.2.as_str()).collect::<Vec<_>>())
        .bind(r.iter().map(|x| x.3.as_str()).collect::<Vec<_>>())
        .bind(r.iter().map(|x| x.4.as_str()).collect::<Vec<_>>())
        .bind(r.iter().map(|x| x.5).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await
        .map_err(db("writing message routes"))?;
    }
    if !b.replies.is_empty() {
        let r = &b.replies;
        sqlx::query(
            "INSERT INTO replies (reply_id, workspace, agent, reply_to, text, position) \
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::text[], \
                 $6::int8[]) ON CONFLICT (reply_id) DO NOTHING",
        )
        .bind(r.iter().map(|x| x.0).collect::<Vec<_>>())
        .bind(r.iter().map(|x| x.1.as_str()).collect::<Vec<_>>())
        .bind(r.iter().map(|x| x.2.as_str()).collect::<Vec<_>>())
        .bind(r.iter().map(|x| &x.3).collect::<Vec<_>>())
        .bind(r.iter().map(|x| x.4.as_str()).collect::<Vec<_>>())
        .bind(r.iter().map(|x| x.5).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await
        .map_err(db("writing replies"))?;
    }
    if !b.deliveries.is_empty() {
        let d = &b.deliveries;
        sqlx::query(
            "UPDATE replies r SET delivered_ts = t.ts, delivered_at = t.p \
             FROM unnest($1::uuid[], $2::text[], $3::int8[]) AS t(id, ts, p) \
             WHERE r.reply_id = t.id",
        )
        .bind(d.iter().map(|x| x.0).collect::<Vec<_>>())
        .bind(d.iter().map(|x| x.1.as_str()).collect::<Vec<_>>())
        .bind(d.iter().map(|x| x.2).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await
        .map_err(db("recording deliveries"))?;
    }
    Ok(())
}
