//! Delivery between the log and the agents, over NATS JetStream.
//!
//! - [`Publisher`]: every `message.routed` in the log is published to its agent's inbox
//!   subject, with the routing decision's id as `Nats-Msg-Id` (the server drops a
//!   republish inside its duplicate window) and the conversation's `traceparent` header.
//!   Progress is a checkpoint in PostgreSQL, advanced only after the server acknowledged
//!   (PubAck): after a NATS outage or a control-plane restart, publishing resumes at the
//!   first unacknowledged message, so every routed message reaches its inbox and none twice.
//! - [`ingest`]: agents' replies and mentions from the outbox stream are recorded as
//!   `agent.replied` / `agent.mentioned` (ids derived from the runtime's output id, so a
//!   redelivery is recorded once), and acknowledged only after the append committed. An
//!   output is recorded only if it came on its workspace's own subject, names one of
//!   that workspace's agents ([`senders`]) and answers a message routed to that agent; its
//!   origin, conversation and mention chain come from the control plane's record of that
//!   message ([`routed`]), not from the output. What is refused is recorded as
//!   `output.refused`.
//! - [`shared_memory`]: writes to the shared memory bucket, which workspaces ask the control
//!   plane for, so that a shared value's provenance is what the control plane checked.
//! - [`directory`]: the agent directory, which workspaces ask for page by page.
//! - [`undelivered`]: a message whose runtime stopped during its last delivery, found in
//!   the server's `MAX_DELIVERIES` advisory, is dead-lettered all the same.
//! - [`recovery`]: after the NATS store was lost, the publisher puts back from the log the
//!   routed messages not yet finished and the memory buckets, before anything new.
//! - [`files`]: files attached to messages (stored by the gateway), which workspaces ask
//!   for slice by slice, only for messages routed to them.

pub mod directory;
pub mod files;
pub mod ingest;
pub mod memory;
pub mod recovery;
pub mod routed;
pub mod senders;
pub mod shared_memory;
pub mod undelivered;

use std::time::Duration;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, instrument, warn};
use warren_schema::event_log::projection::store_checkpoint;
use warren_schema::event_log::{Subscription, SubscriptionOptions};
use warren_schema::events::*;
use warren_schema::nats::{Namespace, message_headers};
use warren_schema::{Error as LogError, EventLog, RecordedEvent};

use crate::error::{Error, Result};

/// Runs the publisher and the outbox ingest until `shutdown`. A NATS failure (the server
/// down at start, a dropped consumer) restarts the part that failed after a backoff,
/// from its checkpoint; it never stops the decisions. Database errors are returned.
pub async fn run(
    client: async_nats::Client,
    ns: Namespace,
    log: EventLog,
    shutdown: CancellationToken,
) -> Result<()> {
    let js = jetstream::new(client);
    let publishing = retry_nats("publisher", &shutdown, || {
        let (js, ns, log, shutdown) = (js.clone(), ns.clone(), log.clone(), shutdown.clone());
        async move { Publisher::new(js, ns, log).await?.run(shutdown).await }
    });
    let ingesting = retry_nats("outbox ingest", &shutdown, || {
        ingest::run(js.clone(), ns.clone(), log.clone(), shutdown.clone())
    });
    let sharing = retry_nats("shared memory", &shutdown, || {
        shared_memory::run(js.clone(), ns.clone(), log.clone(), shutdown.clone())
    });
    let listing = retry_nats("directory", &shutdown, || {
        directory::run(js.client(), ns.clone(), log.clone(), shutdown.clone())
    });
    let serving_files = retry_nats("files", &shutdown, || {
        files::run(js.client(), ns.clone(), log.clone(), shutdown.clone())
    });
    let undelivered = retry_nats("undelivered", &shutdown, || {
        undelivered::run(js.clone(), ns.clone(), log.clone(), shutdown.clone())
    });
    tokio::try_join!(
        publishing,
        ingesting,
        sharing,
        listing,
        serving_files,
        undelivered
    )
    .map(|_| ())
}

async fn retry_nats<F, Fut>(what: &str, shutdown: &CancellationToken, mut start: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    const FIRST: Duration = Duration::from_millis(500);
    let mut backoff = FIRST;
    loop {
        let started = tokio::time::Instant::now();
        match start().await {
            Err(Error::Nats(e)) => {
                // A part that ran a while failed afresh: its next try comes soon again, not
                // after the pause a long outage had grown to.
                if started.elapsed() > Duration::from_secs(10) {
                    backoff = FIRST;
                }
                warn!(part = what, error = %e, ?backoff, "NATS failed; restarting after a pause");
                metrics::counter!("warren_control_plane_nats_restarts_total", "part" => what.to_owned())
                    .increment(1);
            }
            other => return other,
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// How often the publisher looks at the inbox stream for a lost store while idle.
const STORE_CHECK: Duration = Duration::from_secs(5);

/// Checkpoint of the publisher: the last log position whose routed messages are in NATS.
pub const CHECKPOINT: &str = "control-plane.delivery";

/// Publishes routed messages to agents' inboxes.
#[derive(Debug)]
pub struct Publisher {
    js: jetstream::Context,
    ns: Namespace,
    log: EventLog,
    position: i64,
    /// The highest inbox sequence the server acknowledged ([`recovery::INBOX_SEQUENCE`]).
    acknowledged: u64,
}

/// Turns a NATS failure into the crate error (it names the operation, never a credential).
pub(crate) fn nats(context: &'static str) -> impl Fn(&dyn std::fmt::Display) -> Error {
    move |e| Error::Nats(format!("{context}: {e}"))
}

impl Publisher {
    /// Makes sure the streams exist, reads the checkpoint, and recovers what a lost NATS
    /// store took ([`recovery`]).
    pub async fn new(js: jetstream::Context, ns: Namespace, log: EventLog) -> Result<Self> {
        js.get_or_create_stream(ns.inbox_stream_config())
            .await
            .map_err(|e| nats("creating the inbox stream")(&e))?;
        js.get_or_create_stream(ns.outbox_stream_config())
            .await
            .map_err(|e| nats("creating the outbox stream")(&e))?;
        let position =
            warren_schema::event_log::projection::load_checkpoint(log.pool(), CHECKPOINT).await?;
        let acknowledged = recovery::acknowledged(&log).await?;
        let mut publisher = Self {
            js,
            ns,
            log,
            position,
            acknowledged,
        };
        publisher.recover_if_reset().await?;
        Ok(publisher)
    }

    /// If the inbox stream lost messages it had acknowledged (the NATS store was lost),
    /// publishes again the routed messages not yet finished, puts the memory buckets back,
    /// and records `nats.recovered`.
    #[instrument(skip_all, err)]
    async fn recover_if_reset(&mut self) -> Result<()> {
        let mut stream = self
            .js
            .get_stream(self.ns.inbox_stream())
            .await
            .map_err(|e| nats("reading the inbox stream")(&e))?;
        let found = stream
            .info()
            .await
            .map_err(|e| nats("reading the inbox stream")(&e))?
            .state
            .last_sequence;
        if !recovery::was_reset(self.acknowledged, found) {
            return Ok(());
        }
        warn!(
            acknowledged = self.acknowledged,
            found, "the inbox stream lost messages it had acknowledged; recovering from the log"
        );
        let retention = self.ns.inbox_stream_config().max_age;
        let since = chrono::Utc::now()
            - chrono::TimeDelta::from_std(retention).unwrap_or(chrono::TimeDelta::MAX);
        let horizon = self.log.position_at(since).await?;
        let open = recovery::unfinished(&self.log, horizon, self.position).await?;
        let mut acks = Vec::new();
        for id in &open {
            if let Some(routed) = self.log.get(*id).await? {
                acks.extend(self.publish(&routed, &[]).await?);
            }
        }
        let mut highest = found;
        for ack in acks {
            let ack = ack
                .await
                .map_err(|e| nats("awaiting an inbox PubAck")(&e))?;
            highest = highest.max(ack.sequence);
        }
        let buckets = memory::restore_all(&self.js, &self.ns, &self.log)
            .await?
            .into_iter()
            .map(|(bucket, keys)| BucketRestored {
                bucket,
                keys: keys as u64,
            })
            .collect();
        recovery::record(
            &self.log,
            NatsRecovered {
                stream: self.ns.inbox_stream(),
                acknowledged: self.acknowledged,
                found,
                republished: open.len() as u64,
                buckets,
            },
        )
        .await?;
        let mut conn = self.log.pool().acquire().await.map_err(LogError::db(
            "acquiring a connection for the inbox sequence",
        ))?;
        store_checkpoint(&mut conn, recovery::INBOX_SEQUENCE, highest as i64).await?;
        self.acknowledged = highest;
        Ok(())
    }

    /// Follows the log until `shutdown`. NATS failures are retried (with backoff) without
    /// moving the checkpoint.
    pub async fn run(&mut self, shutdown: CancellationToken) -> Result<()> {
        let options = SubscriptionOptions {
            name: CHECKPOINT.into(),
            settle_poll: Duration::from_millis(1),
            ..SubscriptionOptions::default()
        };
        let mut subscription =
            Subscription::start(self.log.pool().clone(), self.position, options).await?;
        // A store lost while nothing is published shows only when the stream is looked at.
        let mut check = tokio::time::interval(STORE_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let batch = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                _ = check.tick() => {
                    // A stream that is gone is an error: the publisher starts again and
                    // makes it anew before it recovers.
                    self.recover_if_reset().await?;
                    continue;
                }
                batch = subscription.next_batch() => batch?,
            };
            let mut backoff = Duration::from_millis(100);
            loop {
                match self.publish_batch(&batch).await {
                    Ok(()) => break,
                    Err(Error::Nats(e)) => {
                        warn!(error = %e, "publishing to NATS failed; retrying");
                        // A lost store is not waited out: a stream that is gone is an
                        // error (the publisher starts again, makes it anew and recovers
                        // first), one that lost what it had acknowledged is recovered now.
                        self.recover_if_reset().await?;
                        tokio::select! {
                            () = shutdown.cancelled() => return Ok(()),
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// Publishes the routed messages of `batch` (in order), then advances the checkpoint.
    #[instrument(skip_all, fields(events = batch.len()), err)]
    pub async fn publish_batch(&mut self, batch: &[RecordedEvent]) -> Result<()> {
        let Some(last) = batch.last().map(|e| e.position) else {
            return Ok(());
        };
        // Publish them all, then wait for the acknowledgements together: one round trip per
        // batch, not one per message. They stay in order on the connection.
        let mut acks = Vec::new();
        for event in batch
            .iter()
            .filter(|e| e.position > self.position && e.event_type == MessageRouted::TYPE)
        {
            acks.extend(self.publish(event, batch).await?);
        }
        let mut highest = self.acknowledged;
        let mut reset = false;
        for ack in acks {
            let ack = ack
                .await
                .map_err(|e| nats("awaiting an inbox PubAck")(&e))?;
            reset |=
                recovery::fresh_ack_shows_reset(self.acknowledged, ack.sequence, ack.duplicate);
            highest = highest.max(ack.sequence);
            metrics::counter!("warren_control_plane_inbox_published_total").increment(1);
        }
        // The checkpoint and the highest acknowledged sequence move together.
        let mut tx = self
            .log
            .pool()
            .begin()
            .await
            .map_err(LogError::db("beginning the delivery checkpoint"))?;
        store_checkpoint(&mut tx, CHECKPOINT, last).await?;
        if highest > self.acknowledged {
            store_checkpoint(&mut tx, recovery::INBOX_SEQUENCE, highest as i64).await?;
        }
        tx.commit()
            .await
            .map_err(LogError::db("committing the delivery checkpoint"))?;
        self.position = last;
        self.acknowledged = highest;
        // The stream was made anew under the publishes (by another part, before one could
        // fail): recovered now, not at the next idle check.
        if reset {
            self.recover_if_reset().await?;
        }
        Ok(())
    }

    /// Publishes one routed message and returns the server's acknowledgement to await (none
    /// when there is nothing to publish). The message it routes usually sits in the same
    /// batch (it is decided right after it arrives), so the log is read only when it does not.
    async fn publish(
        &self,
        routed: &RecordedEvent,
        batch: &[RecordedEvent],
    ) -> Result<Option<jetstream::context::PublishAckFuture>> {
        let r: MessageRouted = routed.decode()?;
        let fetched;
        let source = match batch.iter().find(|e| e.id == r.message_id) {
            Some(e) => e,
            None => {
                fetched = self.log.get(r.message_id).await?;
                match &fetched {
                    Some(e) => e,
                    None => {
                        warn!(message = %r.message_id, "routed message not in the log; skipped");
                        return Ok(None);
                    }
                }
            }
        };
        let Some(message) = routed::from_events(routed, source)? else {
            warn!(
                event_type = %source.event_type,
                "routed event of an unexpected type; skipped"
            );
            return Ok(None);
        };
        // In the message's trace: the routing decision is the publish's parent, and the
        // publish is the parent of the turn that takes the message (its header).
        let span = tracing::info_span!(
            "nats_publish",
            subject = %self.ns.inbox_subject(&r.workspace, &r.agent),
            agent = %r.agent,
        );
        let traceparent =
            warren_telemetry::join_trace(&span, routed.metadata.traceparent.as_deref());
        let headers = message_headers(&routed.id.to_string(), traceparent.as_deref());
        let payload = serde_json::to_vec(&message)
            .map_err(|e| Error::Nats(format!("encoding an inbox message: {e}")))?;
        let ack = self
            .js
            .publish_with_headers(
                self.ns.inbox_subject(&r.workspace, &r.agent),
                headers,
                payload.into(),
            )
            .instrument(span)
            .await
            .map_err(|e| nats("publishing to an inbox")(&e))?;
        Ok(Some(ack))
    }
}
