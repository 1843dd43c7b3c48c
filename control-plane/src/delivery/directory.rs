//! The agent directory, served to workspaces (what their `list_agents` tool shows).
//!
//! A workspace asks on its own [`Namespace::directory_subject`] with a [`DirectoryQuery`]
//! and gets a page of the configuration as recorded now ([`SenderCheck::page`]): agents in
//! name order, at most [`DirectoryQuery::MAX_PAGE`] at a time. Nothing about the directory
//! is in the launch contract, so a pod's Secret does not grow with the installation and a
//! workspace sees an agent configured after it started.

use async_nats::Client;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};
use warren_schema::EventLog;
use warren_schema::nats::{DirectoryAnswer, DirectoryQuery, Namespace};

use super::nats;
use super::senders::SenderCheck;
use crate::error::{Error, Result};

/// Queue group of the control plane's replicas: one answer per query.
const QUEUE: &str = "control-plane";

/// Serves directory queries until `shutdown`. NATS failures are returned (the caller
/// retries); a configuration that cannot be read is answered `failed`, and the service
/// goes on (a query changes nothing, so there is nothing to stop for).
pub async fn run(
    client: Client,
    ns: Namespace,
    log: EventLog,
    shutdown: CancellationToken,
) -> Result<()> {
    let mut queries = client
        .queue_subscribe(ns.directory_subjects(), QUEUE.into())
        .await
        .map_err(|e| nats("subscribing to directory queries")(&e))?;
    let mut directory = SenderCheck::default();
    loop {
        let query = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            query = queries.next() => query,
        };
        let Some(query) = query else {
            return Err(Error::Nats("the directory subscription ended".into()));
        };
        let Some(reply) = query.reply.clone() else {
            continue;
        };
        let workspace = ns.directory_workspace(&query.subject).unwrap_or_default();
        let span = info_span!("directory", workspace, agents = tracing::field::Empty);
        let answer = answer(&mut directory, &log, &query.payload)
            .instrument(span.clone())
            .await;
        match &answer {
            DirectoryAnswer::Page { agents, .. } => {
                span.record("agents", agents.len());
            }
            DirectoryAnswer::Refused { reason } | DirectoryAnswer::Failed { reason } => {
                warn!(parent: &span, reason, "directory query not answered");
            }
        }
        let body = serde_json::to_vec(&answer).unwrap_or_default();
        client
            .publish(reply, body.into())
            .await
            .map_err(|e| nats("answering a directory query")(&e))?;
    }
}

async fn answer(directory: &mut SenderCheck, log: &EventLog, payload: &[u8]) -> DirectoryAnswer {
    let query = match serde_json::from_slice::<DirectoryQuery>(payload) {
        Ok(q) => q,
        Err(e) => {
            return DirectoryAnswer::Refused {
                reason: format!("not a directory query: {e}"),
            };
        }
    };
    let limit = query
        .limit
        .unwrap_or(DirectoryQuery::MAX_PAGE)
        .clamp(1, DirectoryQuery::MAX_PAGE);
    match directory.page(log, query.after.as_deref(), limit).await {
        Ok((agents, next)) => DirectoryAnswer::Page { agents, next },
        Err(e) => {
            warn!(error = %e, "the configuration could not be read for the directory");
            DirectoryAnswer::Failed {
                reason: "the configuration could not be read; try again".into(),
            }
        }
    }
}
