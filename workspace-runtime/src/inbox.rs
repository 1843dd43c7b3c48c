//! An agent's inbox: a durable JetStream consumer, one turn at a time.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::{ConsumerInfoError, ConsumerInfoErrorKind};
use async_nats::jetstream::{self, AckKind, consumer, stream};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};
use warren_schema::nats::{InboxMessage, Namespace, PULL_HEARTBEAT, TRACEPARENT};

use crate::agent;
use crate::error::{Error, Result};
use crate::outbox::{Outbox, OutboxError, TurnRef};

/// Why a turn failed.
#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    #[error("the inbox message is not readable: {0}")]
    Unreadable(String),
    #[error("the agent's output: {0}")]
    Output(#[from] OutboxError),
    #[error(transparent)]
    Driver(#[from] agent::DriverError),
    #[error(transparent)]
    Attachment(#[from] crate::attachments::AttachmentError),
}

/// The agent's durable consumer, which the control plane made before starting the
/// workspace ([`Namespace::inbox_consumer_config`]: its inbox subject only, explicit acks, at
/// most `max_deliver` deliveries, redelivery after `ack_wait`; that is how a turn lost with
/// a crashed runtime comes back). With `create_missing` (unrestricted credentials: tests, a
/// runtime without a control plane) a missing one is created here; workspace credentials
/// may not create it.
pub async fn consumer(
    inboxes: &stream::Stream,
    ns: &Namespace,
    workspace: &str,
    agent: &str,
    tuning: &warren_schema::launch::Tuning,
    create_missing: bool,
) -> Result<consumer::PullConsumer> {
    let name = Namespace::inbox_consumer(workspace, agent);
    let config = ns.inbox_consumer_config(workspace, agent, tuning);
    let consumer: consumer::PullConsumer = match inboxes.get_consumer(&name).await {
        Ok(consumer) => consumer,
        Err(_) if create_missing => inboxes
            .create_consumer(config.clone())
            .await
            .map_err(|e| Error::jetstream(format!("creating the inbox consumer {name}"), e))?,
        Err(e) => {
            return Err(Error::jetstream(
                format!(
                    "the inbox consumer {name} (the control plane makes it before it starts \
                     the workspace)"
                ),
                e,
            ));
        }
    };
    // A consumer that already exists is reused as it is: it must be this agent's inbox, or
    // the agent would answer someone else's messages.
    let filter = consumer.cached_info().config.filter_subject.clone();
    if filter != config.filter_subject {
        return Err(Error::Config(format!(
            "the inbox consumer {name} reads {filter:?}, not {:?}; delete it",
            config.filter_subject
        )));
    }
    Ok(consumer)
}

/// `text` as a header value: a provider's multi-line JSON body in an error would make an
/// invalid header (and a panic); control characters become spaces, and it is cut at 1 KiB.
pub fn header_value(text: &str) -> String {
    let mut value: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if value.len() > 1024 {
        let mut end = 1024;
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        value.truncate(end);
    }
    value
}

/// What becomes of a message after its turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Acknowledged: its outputs are stored.
    Answered,
    /// Nak'd with a delay: it comes back.
    Failed,
    /// Its last delivery failed, or it cannot be read: to the dead-letter subject.
    DeadLettered,
}

impl Outcome {
    fn of(result: &Result<(), TurnError>, delivered: i64, max_deliver: i64) -> Self {
        match result {
            Ok(()) => Self::Answered,
            Err(TurnError::Unreadable(_)) => Self::DeadLettered,
            Err(_) if delivered >= max_deliver => Self::DeadLettered,
            Err(_) => Self::Failed,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Answered => "answered",
            Self::Failed => "failed",
            Self::DeadLettered => "dead_lettered",
        }
    }
}

/// A pull lost while its consumer still exists is made again at once, then after a delay
/// that doubles between these bounds until a message comes.
const REOPEN_DELAY_MIN: Duration = Duration::from_millis(100);
const REOPEN_DELAY_MAX: Duration = Duration::from_secs(5);

/// What the server says of the agent's consumer, asked after a pull went unanswered.
#[derive(Debug)]
enum Lookup {
    Exists,
    /// Deleted under the runtime, or lost with the NATS store: the server's answer.
    Gone(ConsumerInfoError),
    /// Not known: NATS away, the request timed out.
    Unknown,
}

async fn lookup(consumer: &consumer::PullConsumer) -> Lookup {
    match consumer.get_info().await {
        Ok(_) => Lookup::Exists,
        Err(e)
            if matches!(
                e.kind(),
                ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound
            ) =>
        {
            Lookup::Gone(e)
        }
        Err(_) => Lookup::Unknown,
    }
}

/// What comes after an error reading the inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadOn {
    /// The consumer is gone: the agent stops, and with it the runtime, which its backend
    /// starts again with its consumers made anew.
    Stop,
    /// The pull is lost but the consumer may still be there: a new pull, rather than
    /// waiting for the lost one to expire (its stream sends no other until then).
    Reopen,
    /// The stream goes on by itself (a refused pull while NATS restarts...).
    GoOn,
}

/// Whether `kind` calls for asking the server about the consumer.
fn needs_lookup(kind: consumer::pull::MessagesErrorKind) -> bool {
    use consumer::pull::MessagesErrorKind as Kind;
    matches!(kind, Kind::NoResponders | Kind::MissingHeartbeat)
}

fn after_read_error(kind: consumer::pull::MessagesErrorKind, lookup: Option<&Lookup>) -> ReadOn {
    use consumer::pull::MessagesErrorKind as Kind;
    match (kind, lookup) {
        (Kind::ConsumerDeleted, _) | (_, Some(Lookup::Gone(_))) => ReadOn::Stop,
        (Kind::NoResponders | Kind::MissingHeartbeat, _) => ReadOn::Reopen,
        _ => ReadOn::GoOn,
    }
}

/// Runs one agent's turns.
#[derive(Debug, Clone)]
pub struct Worker {
    /// For the dead-letter subject; everything else goes through `outbox`.
    pub js: jetstream::Context,
    pub ns: Namespace,
    pub outbox: Outbox,
    pub workspace: String,
    pub agent: String,
    pub driver: agent::Driver,
    pub workspace_dir: std::path::PathBuf,
    pub shared_dir: Option<std::path::PathBuf>,
    /// What `command` agents' programs run with besides the turn.
    pub environment: agent::command::Environment,
    /// This agent's view of the workspace bucket and the shared one.
    pub memory: Option<(crate::memory::Memory, crate::memory::Memory)>,
    pub max_deliver: i64,
    /// While a turn runs: tell the server it is in progress (so `ack_wait` does not
    /// redeliver it to this very agent) and the control plane that the agent is busy.
    pub heartbeat: Duration,
    /// The agent directory (`list_agents`), asked of the control plane.
    pub directory: crate::control_plane::Directory,
    /// Files attached to messages, asked of the control plane.
    pub attachments: crate::attachments::Attachments,
}

impl Worker {
    /// Takes messages until `shutdown`; the turn in progress finishes first.
    ///
    /// Only a consumer that is gone (deleted under the runtime) stops it; NATS being away
    /// does not: the client reconnects, and a message whose ack was lost comes back after
    /// `ack_wait` and is answered again under the same output ids (dropped as repeats).
    pub async fn run(
        self,
        consumer: consumer::PullConsumer,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let mut messages = self.pull(&consumer).await?;
        let mut reopen_delay = Duration::ZERO;
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                next = messages.next() => next,
            };
            let error = match next {
                None => return Ok(()),
                Some(Ok(message)) => {
                    reopen_delay = Duration::ZERO;
                    self.take(message).await;
                    continue;
                }
                Some(Err(e)) => e,
            };
            let lookup = if needs_lookup(error.kind()) {
                Some(lookup(&consumer).await)
            } else {
                None
            };
            match after_read_error(error.kind(), lookup.as_ref()) {
                ReadOn::Stop => {
                    let what = format!("the inbox consumer of {}", self.agent);
                    return Err(match lookup {
                        Some(Lookup::Gone(gone)) => Error::jetstream(
                            format!("{what} (deleted, or lost with the NATS store)"),
                            gone,
                        ),
                        _ => Error::jetstream(what, error),
                    });
                }
                ReadOn::Reopen => {
                    warn!(error = %error, delay_ms = reopen_delay.as_millis() as u64,
                        "the inbox pull went unanswered; pulling again");
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(reopen_delay) => {}
                    }
                    reopen_delay = (reopen_delay * 2).clamp(REOPEN_DELAY_MIN, REOPEN_DELAY_MAX);
                    messages = self.pull(&consumer).await?;
                }
                ReadOn::GoOn => warn!(error = %error, "reading the inbox; going on"),
            }
        }
    }

    /// A pull on the agent's consumer, with the server's heartbeat every [`PULL_HEARTBEAT`].
    async fn pull(&self, consumer: &consumer::PullConsumer) -> Result<consumer::pull::Stream> {
        consumer
            .stream()
            .heartbeat(PULL_HEARTBEAT)
            .messages()
            .await
            .map_err(|e| Error::jetstream(format!("reading the inbox of {}", self.agent), e))
    }

    /// One message: its turn, then its ack (answered), a delayed nak (failed, to be
    /// redelivered) or its dead letter (failed for the last time, or unreadable).
    async fn take(&self, message: jetstream::Message) {
        let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
        // Each turn is a span, a child of the conversation's trace (the inbox message's
        // `traceparent`); what the turn publishes carries the turn's own context.
        let span = tracing::info_span!(
            "turn",
            agent = %self.agent,
            subject = %message.subject,
            delivered
        );
        let sent_with = message
            .headers
            .as_ref()
            .and_then(|h| h.get(TRACEPARENT))
            .map(|v| v.to_string());
        let traceparent = warren_telemetry::join_trace(&span, sent_with.as_deref());
        if delivered > 1 {
            metrics::counter!("warren_runtime_redeliveries_total", "agent" => self.agent.clone())
                .increment(1);
        }
        let started = std::time::Instant::now();
        let (turn, result) = match serde_json::from_slice::<InboxMessage>(&message.payload) {
            Ok(inbox) => {
                let turn = TurnRef::of(&inbox, &self.workspace, &self.agent);
                let result = self
                    .turn_with_heartbeats(&message, &inbox, &turn, traceparent.as_deref())
                    .instrument(span.clone())
                    .await;
                (Some(turn), result)
            }
            Err(e) => (None, Err(TurnError::Unreadable(e.to_string()))),
        };
        metrics::histogram!("warren_runtime_turn_seconds", "agent" => self.agent.clone())
            .record(started.elapsed().as_secs_f64());
        let outcome = Outcome::of(&result, delivered, self.max_deliver);
        metrics::counter!(
            "warren_runtime_turns_total",
            "agent" => self.agent.clone(),
            "outcome" => outcome.label()
        )
        .increment(1);
        let settled = match result {
            Ok(()) => message.ack().await,
            Err(e) if outcome == Outcome::Failed => {
                warn!(error = %e, delivered, "turn failed; redelivery later");
                message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(
                        1 << delivered.min(5),
                    ))))
                    .await
            }
            Err(e) => {
                warn!(error = %e, delivered, "giving up on a message: dead-lettered");
                match self
                    .dead_letter(&message, turn.as_ref(), delivered, &e)
                    .await
                {
                    Ok(()) => message.ack_with(AckKind::Term).await,
                    Err(stored) => {
                        // Not terminated. An unreadable message with deliveries left comes
                        // back and is dead-lettered then; a message on its last delivery
                        // does not come back: the server's MAX_DELIVERIES advisory names
                        // it, and the control plane records the dead letter
                        // (control-plane/src/delivery/undelivered.rs).
                        warn!(error = %stored, "could not store the dead letter");
                        Ok(())
                    }
                }
            }
        };
        if let Err(e) = settled {
            // The message comes back after `ack_wait`; its outputs are repeats the server
            // drops by their ids.
            warn!(error = %e, delivered, "could not settle the message with the server");
        }
    }

    /// Publishes the message to the dead-letter subject (with the error) and tells the
    /// control plane, which records `message.dead_lettered` and tells the conversation. An
    /// unreadable message names no conversation: the dead-letter subject keeps it for an
    /// operator.
    async fn dead_letter(
        &self,
        message: &jetstream::Message,
        turn: Option<&TurnRef>,
        delivered: i64,
        error: &TurnError,
    ) -> Result<(), OutboxError> {
        let mut headers = HeaderMap::new();
        headers.insert("Warren-Error", header_value(&error.to_string()).as_str());
        self.js
            .publish_with_headers(
                self.ns.dead_letter_subject(&self.workspace, &self.agent),
                headers,
                message.payload.clone(),
            )
            .await
            .map_err(|e| OutboxError::Publish(e.to_string()))?
            .await
            .map_err(|e| OutboxError::Publish(e.to_string()))?;
        if let Some(turn) = turn {
            self.outbox
                .send_stored(&turn.dead_lettered(delivered, error.to_string()), None)
                .await?;
        }
        Ok(())
    }

    /// The turn, with a heartbeat every `self.heartbeat` while it runs.
    async fn turn_with_heartbeats(
        &self,
        message: &jetstream::Message,
        inbox: &InboxMessage,
        turn: &TurnRef,
        traceparent: Option<&str>,
    ) -> Result<(), TurnError> {
        let running = self.turn(inbox, turn, traceparent);
        tokio::pin!(running);
        let started = tokio::time::Instant::now();
        let mut beat = tokio::time::interval_at(started + self.heartbeat, self.heartbeat);
        let mut beats = 0u64;
        loop {
            tokio::select! {
                result = &mut running => return result,
                _ = beat.tick() => {
                    beats += 1;
                    let busy = started.elapsed().as_secs();
                    self.heartbeat(message, &turn.heartbeat(beats, busy), traceparent).await;
                }
            }
        }
    }

    /// The turn on `message` is still running: an in-progress ack (resets `ack_wait`) and
    /// a heartbeat to the outbox (`agent.busy`: the workspace is not idle). Failures are
    /// logged, not fatal: the turn goes on, and a missed beat costs at worst a redelivery.
    async fn heartbeat(
        &self,
        message: &jetstream::Message,
        beat: &warren_schema::nats::OutboxMessage,
        traceparent: Option<&str>,
    ) {
        if let Err(e) = message.ack_with(AckKind::Progress).await {
            warn!(error = %e, "could not report the turn in progress");
        }
        if let Err(e) = self.outbox.send_stored(beat, traceparent).await {
            warn!(error = %e, "could not send a heartbeat");
        }
    }

    /// One turn: run the driver, publish its outputs, each acknowledged by the server,
    /// before the inbox message is acknowledged.
    async fn turn(
        &self,
        inbox: &InboxMessage,
        turn: &TurnRef,
        traceparent: Option<&str>,
    ) -> Result<(), TurnError> {
        let with_conversation = |m: &crate::memory::Memory| {
            let mut m = m.clone();
            m.conversation = inbox.correlation_id;
            m
        };
        let started = std::time::Instant::now();
        let text = if inbox.files.is_empty() {
            inbox.text.clone()
        } else {
            let saved = self.attachments.save(inbox, &self.workspace_dir).await?;
            crate::attachments::annotate(&inbox.text, &saved)
        };
        let said = self
            .driver
            .turn(&agent::TurnContext {
                workspace: self.workspace.clone(),
                agent: self.agent.clone(),
                text,
                message_id: inbox.message_id.to_string(),
                routing_id: inbox.routing_id.to_string(),
                conversation: inbox.correlation_id.map(|c| c.to_string()),
                chain: inbox.chain.clone(),
                traceparent: traceparent.map(str::to_owned),
                workspace_dir: self.workspace_dir.clone(),
                shared_dir: self.shared_dir.clone(),
                environment: self.environment.clone(),
                reply_to: serde_json::to_string(&inbox.reply_to).ok(),
                memory: self.memory.as_ref().map(|(m, _)| with_conversation(m)),
                shared_memory: self.memory.as_ref().map(|(_, s)| with_conversation(s)),
                directory: Some(self.directory.clone()),
                outbox: Some(self.outbox.clone()),
            })
            .await?;
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        info!(
            routing = %inbox.routing_id,
            mentions = ?said.mentions,
            duration_ms,
            input_tokens = said.usage.input_tokens,
            output_tokens = said.usage.output_tokens,
            "turn"
        );
        // Mentions first: they are on the critical path of the next agent's turn, while a
        // reply only goes to the conversation. Then what it said along the way (the
        // `reply` tool), then its answer. An empty answer is not sent (Slack refuses empty
        // messages; the agent chose to say nothing more).
        let directed = said
            .directed
            .iter()
            .enumerate()
            .map(|(n, (to, text))| turn.mention(&format!("tool-mention:{n}:{to}"), to, text));
        let addressed = said
            .mentions
            .iter()
            .map(|to| turn.mention(&format!("mention:{to}"), to, &said.reply));
        let along = said
            .said
            .iter()
            .enumerate()
            .map(|(n, text)| turn.reply(&format!("said:{n}"), text));
        let answer = (!said.reply.trim().is_empty()).then(|| turn.reply("reply", &said.reply));
        // Last: what the turn took and used (the usage report reads it).
        let completed = turn.completed(duration_ms, said.usage.clone());
        // Publish every output, then wait for all their acknowledgements: one round trip
        // for the turn's outputs, not one each. They stay in order on the connection.
        let mut acks = Vec::new();
        for output in directed
            .chain(addressed)
            .chain(along)
            .chain(answer)
            .chain([completed])
        {
            acks.push(self.outbox.send(&output, traceparent).await?);
        }
        for ack in acks {
            ack.await.map_err(|e| OutboxError::Publish(e.to_string()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unanswered_pull_stops_the_agent_only_when_its_consumer_is_gone() {
        use consumer::pull::MessagesErrorKind as Kind;
        for kind in [Kind::NoResponders, Kind::MissingHeartbeat] {
            assert!(needs_lookup(kind), "{kind:?}");
            let gone = Lookup::Gone(ConsumerInfoError::new(ConsumerInfoErrorKind::NotFound));
            assert_eq!(after_read_error(kind, Some(&gone)), ReadOn::Stop);
            // A consumer deleted as the pull reached it may still answer its lookup: the
            // lost pull is made again, and the next one learns it is gone.
            assert_eq!(
                after_read_error(kind, Some(&Lookup::Exists)),
                ReadOn::Reopen
            );
            assert_eq!(
                after_read_error(kind, Some(&Lookup::Unknown)),
                ReadOn::Reopen
            );
        }
        assert!(!needs_lookup(Kind::ConsumerDeleted));
        assert_eq!(after_read_error(Kind::ConsumerDeleted, None), ReadOn::Stop);
        for kind in [Kind::Pull, Kind::Other] {
            assert!(!needs_lookup(kind));
            assert_eq!(after_read_error(kind, None), ReadOn::GoOn, "{kind:?}");
        }
    }

    #[test]
    fn an_error_with_a_provider_body_is_a_valid_header_value() {
        let error = format!(
            "model API: 400 Bad Request: {{\n  \"error\": \r\n \"{}\"\n}}",
            "é".repeat(900)
        );
        let value = header_value(&error);
        assert!(!value.chars().any(char::is_control), "{value}");
        assert!(value.len() <= 1024);
        let mut headers = HeaderMap::new();
        headers.insert("Warren-Error", value.as_str());
        assert!(headers.get("Warren-Error").is_some());
    }

    #[test]
    fn a_failed_turn_is_retried_until_its_last_delivery_and_an_unreadable_one_never() {
        let failed = || Err(TurnError::Driver(agent::DriverError::Api("503".into())));
        assert_eq!(Outcome::of(&Ok(()), 5, 5), Outcome::Answered);
        assert_eq!(Outcome::of(&failed(), 1, 5), Outcome::Failed);
        assert_eq!(Outcome::of(&failed(), 4, 5), Outcome::Failed);
        assert_eq!(Outcome::of(&failed(), 5, 5), Outcome::DeadLettered);
        let unreadable = Err(TurnError::Unreadable("not JSON".into()));
        assert_eq!(Outcome::of(&unreadable, 1, 5), Outcome::DeadLettered);
    }
}
