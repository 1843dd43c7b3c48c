//! What a workspace has in NATS, made by the control plane before the workspace starts: its
//! memory bucket (with its limits, no rollups) and a durable inbox consumer per agent.
//!
//! Workspaces may create nothing in NATS ([`Namespace::workspace_permissions`]): a consumer
//! they could create could be a push consumer delivering into another workspace's subjects,
//! and a stream they could create could source another's messages. So the control plane
//! makes both, with the same configuration a runtime would have asked for.

use async_nats::jetstream::{self, consumer};
use tracing::{info, instrument};
use warren_schema::nats::{BucketLimits, Namespace};

use crate::backend::WorkspaceSpec;
use crate::delivery::nats;
use crate::error::{Error, Result};

/// Makes workspaces' NATS resources.
#[derive(Debug, Clone)]
pub struct NatsResources {
    js: jetstream::Context,
    ns: Namespace,
}

impl NatsResources {
    pub fn new(client: async_nats::Client, ns: Namespace) -> Self {
        Self {
            js: jetstream::new(client),
            ns,
        }
    }

    /// Makes `spec`'s bucket and its agents' inbox consumers, or checks the ones that exist:
    /// an existing consumer must read its own agent's subject. A consumer left by an older
    /// Warren under the ambiguous `{workspace}-{agent}` name is deleted.
    #[instrument(skip_all, fields(workspace = %spec.name), err)]
    pub async fn prepare(&self, spec: &WorkspaceSpec) -> Result<()> {
        warren_schema::nats::ensure_bucket(
            &self.js,
            &self.ns.workspace_bucket(&spec.name),
            &BucketLimits::WORKSPACE,
        )
        .await
        .map_err(|e| Error::Nats(e.to_string()))?;
        let inboxes = self
            .js
            .get_or_create_stream(self.ns.inbox_stream_config())
            .await
            .map_err(|e| nats("the inbox stream")(&e))?;
        for agent in &spec.agents {
            let config = self
                .ns
                .inbox_consumer_config(&spec.name, &agent.name, &spec.tuning);
            let name = Namespace::inbox_consumer(&spec.name, &agent.name);
            let made: consumer::PullConsumer = inboxes
                .get_or_create_consumer(&name, config.clone())
                .await
                .map_err(|e| Error::Nats(format!("the inbox consumer {name}: {e}")))?;
            let filter = &made.cached_info().config.filter_subject;
            if *filter != config.filter_subject {
                return Err(Error::Nats(format!(
                    "the inbox consumer {name} reads {filter:?}, not {:?}; delete it",
                    config.filter_subject
                )));
            }
            let legacy = format!("{}-{}", spec.name, agent.name);
            if let Ok(old) = inboxes.consumer_info(&legacy).await
                && old.config.filter_subject == config.filter_subject
            {
                inboxes
                    .delete_consumer(&legacy)
                    .await
                    .map_err(|e| Error::Nats(format!("deleting the old consumer {legacy}: {e}")))?;
                info!(consumer = %legacy, "deleted the inbox consumer of an older name");
            }
        }
        Ok(())
    }
}
