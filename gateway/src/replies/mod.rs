//! Agents' replies out to Slack.
//!
//! A follower of the log: for each `agent.replied` addressed to Slack it posts the reply
//! with `chat.postMessage` (in the originating thread), then records `reply.delivered`
//! with Slack's `ts`, in the same transaction that advances its checkpoint
//! (`gateway.replies`). Its records go in its own stream,
//! [`REPLIES_STREAM`], never in the reply's. So a restart neither loses a reply (the checkpoint has not moved)
//! nor records one twice (the record's id derives from the reply's).
//!
//! Exactly once, across a crash between Slack's accept and the record: before posting, the
//! follower records `reply.post_started` (one per reply), and every post carries the
//! reply's id in its Slack message metadata. When a restarted follower meets a reply whose
//! post was started, an earlier run may have posted it: it looks in the reply's thread
//! (`conversations.replies`, or the channel's history for a slash command's reply) for a
//! message with that id, and records the one it finds instead of posting again. A reply
//! whose post was never started is posted without a look. If Slack will not show the
//! thread (the app lacks the `*:history` scope) the reply is posted: at least once rather
//! than lost.
//!
//! Slack is never called while a database transaction is open: a transaction held across
//! HTTP calls and rate-limit waits would hold back every reader of the log.
//!
//! One replica delivers: the follower holds the lease [`DELIVERY_LEASE`] while it works
//! ([`crate::leased`]).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};
use warren_schema::event_log::projection::{self, Projection};
use warren_schema::event_log::{SubscriptionOptions, append_in_tx};
use warren_schema::events::{
    AgentConfigured, AgentRemoved, AgentReplied, DomainEvent, Origin, REPLIES_STREAM,
    ReplyDelivered, ReplyPostStarted,
};
use warren_schema::{AppendRequest, EventId, EventLog, Metadata, NewEvent, RecordedEvent, Result};

use crate::slack_api::{SlackApi, SlackApiError};

/// The checkpoint of the delivery follower.
pub const CHECKPOINT: &str = "gateway.replies";

/// Slack allows about one message per second per channel.
const CHANNEL_PACE: Duration = Duration::from_secs(1);
/// Attempts for transient failures (rate limits are waited out and do not count).
const ATTEMPTS: u32 = 5;

/// Where a reply goes in Slack, if it goes to Slack.
fn destination(reply: &AgentReplied) -> Option<(&str, Option<&str>)> {
    match &reply.reply_to {
        Origin::Slack {
            channel, thread_ts, ..
        } => Some((channel, Some(thread_ts))),
        Origin::SlackCommand { channel, .. } => Some((channel, None)),
        Origin::Webhook { .. } | Origin::Agent { .. } => None,
    }
}

/// The agents whose replies may notify a whole channel: broadcast mentions (`<!here>`, ...)
/// are escaped in every other reply ([`escape_broadcasts`]). An agent opts in with
/// `"settings": {"allow_broadcasts": true}`; folded from the configuration events, in log
/// order. `warren`'s own notices never broadcast.
#[derive(Debug, Default)]
struct Broadcasters(std::collections::HashSet<String>);

impl Broadcasters {
    /// The configuration recorded up to `until` (the follower's checkpoint).
    async fn load(log: &EventLog, until: i64) -> Result<Self> {
        let mut events = Vec::new();
        for event_type in [AgentConfigured::TYPE, AgentRemoved::TYPE] {
            let mut after = 0;
            loop {
                let page = log.read_type(event_type, after, 1000).await?;
                let Some(last) = page.last() else { break };
                after = last.position;
                events.extend(page.into_iter().filter(|e| e.position <= until));
                if after >= until {
                    break;
                }
            }
        }
        events.sort_by_key(|e| e.position);
        let mut broadcasters = Self::default();
        for event in &events {
            broadcasters.apply(event);
        }
        Ok(broadcasters)
    }

    fn apply(&mut self, event: &RecordedEvent) {
        match event.event_type.as_str() {
            AgentConfigured::TYPE => {
                if let Ok(agent) = event.decode::<AgentConfigured>() {
                    if agent.settings["allow_broadcasts"] == true {
                        self.0.insert(agent.name);
                    } else {
                        self.0.remove(&agent.name);
                    }
                }
            }
            AgentRemoved::TYPE => {
                if let Ok(agent) = event.decode::<AgentRemoved>() {
                    self.0.remove(&agent.name);
                }
            }
            _ => {}
        }
    }

    /// `reply`'s text as it is posted.
    fn text(&self, reply: &AgentReplied) -> String {
        if reply.agent != "warren" && self.0.contains(&reply.agent) {
            reply.text.clone()
        } else {
            escape_broadcasts(&reply.text)
        }
    }
}

/// Records deliveries; Slack was already called for the events handed to it.
struct Recorder {
    delivered: HashMap<EventId, (String, String)>,
}

impl Projection for Recorder {
    fn name(&self) -> &str {
        CHECKPOINT
    }

    async fn apply(&mut self, tx: &mut PgConnection, event: &RecordedEvent) -> Result<()> {
        let Some((channel, ts)) = self.delivered.get(&event.id) else {
            return Ok(());
        };
        let record = NewEvent::from_domain(
            EventId::derive(&["reply-delivered", &event.id.to_string()]),
            &ReplyDelivered {
                reply_id: event.id,
                channel: channel.clone(),
                ts: ts.clone(),
            },
            Metadata::caused_by(event, "gateway/replies"),
        )
        .map_err(|e| warren_schema::Error::InvalidEvent(e.to_string()))?;
        let request = AppendRequest::new(REPLIES_STREAM, vec![record]);
        append_in_tx(tx, &[&request]).await?.remove(0)?;
        Ok(())
    }
}

/// The lease the delivering replica holds.
pub const DELIVERY_LEASE: &str = "gateway.replies";

/// Delivers replies until `shutdown` is cancelled, while this replica holds
/// [`DELIVERY_LEASE`]; until then, and after losing it, it waits. An error ends it (the
/// caller restarts it).
pub async fn run(log: EventLog, slack: SlackApi, shutdown: CancellationToken) -> Result<()> {
    crate::leased::run(&log, DELIVERY_LEASE, &shutdown, || {
        deliver(&log, &slack, &shutdown)
    })
    .await
}

pub(crate) async fn deliver(
    log: &EventLog,
    slack: &SlackApi,
    shutdown: &CancellationToken,
) -> Result<()> {
    let from = projection::load_checkpoint(log.pool(), CHECKPOINT).await?;
    let options = SubscriptionOptions {
        name: CHECKPOINT.into(),
        ..SubscriptionOptions::default()
    };
    let mut broadcasters = Broadcasters::load(log, from).await?;
    let mut subscription = log.subscribe(from, options).await?;
    let mut last_post: HashMap<String, Instant> = HashMap::new();
    loop {
        let batch = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            batch = subscription.next_batch() => batch?,
        };
        let mut recorder = Recorder {
            delivered: HashMap::new(),
        };
        for event in &batch {
            broadcasters.apply(event);
            if event.event_type != AgentReplied::TYPE {
                continue;
            }
            let reply: AgentReplied = match event.decode() {
                Ok(r) => r,
                Err(e) => {
                    warn!(position = event.position, error = %e, "unreadable agent.replied; skipped");
                    continue;
                }
            };
            let Some((channel, thread_ts)) = destination(&reply) else {
                continue;
            };
            // Pace per channel.
            if let Some(last) = last_post.get(channel) {
                let wait = CHANNEL_PACE.saturating_sub(last.elapsed());
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(wait) => {}
                }
            }
            let text = broadcasters.text(&reply);
            // In the conversation's trace: the turn that wrote the reply is its parent.
            let span = info_span!("reply", position = event.position, %channel);
            if let Some(parent) = &event.metadata.traceparent {
                warren_telemetry::set_parent_from_traceparent(&span, parent);
            }
            let outcome = async {
                Ok::<_, warren_schema::Error>(
                    match log.get(ReplyPostStarted::event_id(event.id)).await? {
                        Some(started) => {
                            repost(
                                slack, channel, thread_ts, &text, event.id, &started, shutdown,
                            )
                            .await
                        }
                        None => {
                            record_post_started(log, event, channel, thread_ts).await?;
                            post(slack, channel, thread_ts, &text, event.id, shutdown).await
                        }
                    },
                )
            }
            .instrument(span)
            .await?;
            match outcome {
                Some(Ok(ts)) => {
                    info!(position = event.position, %channel, %ts, "reply delivered");
                    recorder
                        .delivered
                        .insert(event.id, (channel.to_owned(), ts));
                }
                Some(Err(e)) => {
                    // Refused by Slack (not in channel, channel gone): retrying cannot help.
                    warn!(position = event.position, %channel, error = %e, "reply not delivered");
                }
                // Shutting down mid-retry: nothing recorded, the checkpoint stays before
                // this reply, and the next run delivers it.
                None => return Ok(()),
            }
            last_post.insert(channel.to_owned(), Instant::now());
        }
        projection::apply_batch(log.pool(), &mut recorder, &batch).await?;
    }
}

/// `text` with Slack's broadcast mentions (`<!channel>`, `<!here>`, `<!everyone>`,
/// `<!subteam^ID>`, with or without a `|label`) escaped, so that they show as text instead of
/// notifying everyone: an agent's words are model output, and a prompt injection should not
/// page a whole workspace. User mentions (`<@U…>`) and links are left alone. Pure.
pub fn escape_broadcasts(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("<!") {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        match tail.find('>') {
            Some(end) => {
                out.push_str("&lt;");
                out.push_str(&tail[1..end]);
                out.push_str("&gt;");
                rest = &tail[end + 1..];
            }
            None => {
                out.push_str("&lt;");
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Records that `reply`'s post is starting, before the call.
async fn record_post_started(
    log: &EventLog,
    reply: &RecordedEvent,
    channel: &str,
    thread_ts: Option<&str>,
) -> Result<()> {
    let record = NewEvent::from_domain(
        ReplyPostStarted::event_id(reply.id),
        &ReplyPostStarted {
            reply_id: reply.id,
            channel: channel.to_owned(),
            thread_ts: thread_ts.map(str::to_owned),
        },
        {
            let mut metadata = Metadata::caused_by(reply, "gateway/replies");
            metadata.traceparent = warren_telemetry::current_traceparent().or(metadata.traceparent);
            metadata
        },
    )
    .map_err(|e| warren_schema::Error::InvalidEvent(e.to_string()))?;
    log.append(&AppendRequest::new(REPLIES_STREAM, vec![record]))
        .await?;
    Ok(())
}

/// How far before its `reply.post_started` a reply's message is looked for (clocks of
/// Slack and the database differ).
const LOOKUP_MARGIN: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// A reply whose post an earlier run started: the message found in Slack, or a post if
/// there is none. `None` when shutdown interrupted it.
async fn repost(
    slack: &SlackApi,
    channel: &str,
    thread_ts: Option<&str>,
    text: &str,
    reply_id: EventId,
    started: &RecordedEvent,
    shutdown: &CancellationToken,
) -> Option<std::result::Result<String, SlackApiError>> {
    let oldest = (started.recorded_at - LOOKUP_MARGIN).timestamp().max(0);
    let oldest = format!("{oldest}.000000");
    let id = reply_id.to_string();
    let found = with_retries(channel, shutdown, || {
        slack.find_reply(channel, thread_ts, &oldest, &id)
    })
    .await?;
    match found {
        Ok(Some(ts)) => {
            info!(%channel, %ts, reply = %id, "already in Slack from before a restart; not posted again");
            metrics::counter!("warren_gateway_slack_posts_total", "result" => "found").increment(1);
            Some(Ok(ts))
        }
        Ok(None) => post(slack, channel, thread_ts, text, reply_id, shutdown).await,
        Err(e) => {
            warn!(%channel, error = %e, reply = %id,
                  "could not look for a reply whose post was started; posting it (at least once)");
            post(slack, channel, thread_ts, text, reply_id, shutdown).await
        }
    }
}

/// Posts with retries: rate limits are waited out, transient failures retried with backoff.
/// `None` when shutdown interrupted it.
async fn post(
    slack: &SlackApi,
    channel: &str,
    thread_ts: Option<&str>,
    text: &str,
    reply_id: EventId,
    shutdown: &CancellationToken,
) -> Option<std::result::Result<String, SlackApiError>> {
    let id = reply_id.to_string();
    let result = with_retries(channel, shutdown, || {
        slack.post_message(channel, thread_ts, text, &id)
    })
    .await;
    let label = match &result {
        Some(Ok(_)) => "ok",
        Some(Err(_)) => "failed",
        None => "interrupted",
    };
    metrics::counter!("warren_gateway_slack_posts_total", "result" => label).increment(1);
    result
}

/// A Web API call with retries: rate limits are waited out, transient failures retried
/// with backoff up to [`ATTEMPTS`]. `None` when shutdown interrupted it.
async fn with_retries<T, F, Fut>(
    channel: &str,
    shutdown: &CancellationToken,
    mut call: F,
) -> Option<std::result::Result<T, SlackApiError>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, SlackApiError>>,
{
    let mut failures = 0;
    let attempt = |result: &'static str| {
        metrics::counter!("warren_gateway_slack_calls_total", "result" => result).increment(1);
    };
    loop {
        let wait = match call().await {
            Ok(answer) => {
                attempt("ok");
                return Some(Ok(answer));
            }
            Err(SlackApiError::RateLimited(d)) => {
                attempt("rate_limited");
                warn!(%channel, retry_after = ?d, "Slack rate limit");
                d
            }
            Err(SlackApiError::Transient(e)) if failures + 1 < ATTEMPTS => {
                attempt("transient");
                failures += 1;
                warn!(%channel, error = %e, attempt = failures, "Slack call failed; retrying");
                Duration::from_millis(250 * 2u64.pow(failures))
            }
            Err(e) => {
                attempt("failed");
                return Some(Err(e));
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod escape_tests {
    use super::escape_broadcasts;

    #[test]
    fn broadcast_mentions_are_shown_not_sent() {
        assert_eq!(
            escape_broadcasts("hey <!channel> and <!here|here>, <!subteam^S1|@ops> <!everyone>"),
            "hey &lt;!channel&gt; and &lt;!here|here&gt;, &lt;!subteam^S1|@ops&gt; &lt;!everyone&gt;"
        );
        assert_eq!(
            escape_broadcasts("ask <@U123> about <https://x.test|the doc>"),
            "ask <@U123> about <https://x.test|the doc>",
            "user mentions and links stay"
        );
        assert_eq!(
            escape_broadcasts("unclosed <!channel"),
            "unclosed &lt;!channel"
        );
    }
}
