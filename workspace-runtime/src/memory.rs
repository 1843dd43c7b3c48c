//! Shared memory: JetStream key-value buckets, one per workspace and one shared by all.
//!
//! Every value is stored with its provenance (`{"value": ..., "agent": ..., "workspace":
//! ...}`) and every write is also published to the outbox, where the control plane records
//! it as `memory.written`; a bucket lost with a NATS store is re-seeded from the log
//! (`warren_control_plane::delivery::memory::restore`). `update` is revision-checked, so two
//! agents cannot overwrite each other blindly.

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use warren_schema::EventId;
use warren_schema::nats::{Namespace, OutboxMessage};

use crate::outbox::Outbox;

/// A stored value and who wrote it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    pub value: Value,
    pub agent: String,
    pub workspace: String,
}

/// A value read back, with the revision to pass to [`Memory::update`].
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub stored: Stored,
    pub revision: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Someone wrote the key since `expected` was read.
    #[error("{key} changed since revision {expected}: read it again and retry")]
    Conflict { key: String, expected: u64 },
    #[error("memory {0}")]
    Nats(String),
    #[error("memory value of {key} is not Warren's format: {source}")]
    Format {
        key: String,
        source: serde_json::Error,
    },
}

fn nats(context: &'static str) -> impl Fn(&dyn std::fmt::Display) -> MemoryError {
    move |e| MemoryError::Nats(format!("{context}: {e}"))
}

/// One bucket, as seen by one agent.
#[derive(Debug, Clone)]
pub struct Memory {
    store: kv::Store,
    outbox: Outbox,
    bucket: String,
    workspace: String,
    agent: String,
    /// The conversation the writes belong to (provenance in the log).
    pub conversation: Option<EventId>,
}

/// A workspace's two buckets, opened once (created if missing) and shared by its agents.
#[derive(Debug, Clone)]
pub struct Buckets {
    own: kv::Store,
    shared: kv::Store,
    outbox: Outbox,
    ns: Namespace,
    workspace: String,
}

impl Buckets {
    pub async fn open(
        js: &jetstream::Context,
        ns: &Namespace,
        workspace: &str,
    ) -> Result<Self, MemoryError> {
        let open = |bucket: String| async move {
            warren_schema::nats::open_bucket(js, &bucket)
                .await
                .map_err(|e| MemoryError::Nats(format!("opening bucket {bucket}: {e}")))
        };
        Ok(Self {
            own: open(ns.workspace_bucket(workspace)).await?,
            shared: open(ns.shared_bucket()).await?,
            outbox: Outbox::new(js.clone(), ns, workspace),
            ns: ns.clone(),
            workspace: workspace.to_owned(),
        })
    }

    /// `agent`'s view: (the workspace's bucket, the shared one).
    pub fn for_agent(&self, agent: &str) -> (Memory, Memory) {
        let view = |store: &kv::Store, bucket: String| Memory {
            store: store.clone(),
            outbox: self.outbox.clone(),
            bucket,
            workspace: self.workspace.clone(),
            agent: agent.to_owned(),
            conversation: None,
        };
        (
            view(&self.own, self.ns.workspace_bucket(&self.workspace)),
            view(&self.shared, self.ns.shared_bucket()),
        )
    }
}

impl Memory {
    /// One bucket (created if missing) as `agent` of `workspace` sees it.
    pub async fn open(
        js: jetstream::Context,
        ns: Namespace,
        bucket: &str,
        workspace: &str,
        agent: &str,
    ) -> Result<Self, MemoryError> {
        let store = warren_schema::nats::open_bucket(&js, bucket)
            .await
            .map_err(|e| nats("opening a bucket")(&e))?;
        Ok(Self {
            store,
            outbox: Outbox::new(js, &ns, workspace),
            bucket: bucket.to_owned(),
            workspace: workspace.to_owned(),
            agent: agent.to_owned(),
            conversation: None,
        })
    }

    pub async fn get(&self, key: &str) -> Result<Option<Entry>, MemoryError> {
        let entry = self
            .store
            .entry(key)
            .await
            .map_err(|e| nats("reading a key")(&e))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => Ok(Some(Entry {
                stored: serde_json::from_slice(&e.value).map_err(|source| MemoryError::Format {
                    key: key.to_owned(),
                    source,
                })?,
                revision: e.revision,
            })),
            _ => Ok(None),
        }
    }

    /// Keys with a value, sorted.
    pub async fn list(&self) -> Result<Vec<String>, MemoryError> {
        let mut keys = self
            .store
            .keys()
            .await
            .map_err(|e| nats("listing keys")(&e))?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            out.push(key.map_err(|e| nats("listing keys")(&e))?);
        }
        out.sort();
        Ok(out)
    }

    /// Writes unconditionally; returns the new revision.
    pub async fn put(&self, key: &str, value: Value) -> Result<u64, MemoryError> {
        let bytes = self.encode(&value)?;
        let revision = self
            .store
            .put(key, bytes.into())
            .await
            .map_err(|e| nats("writing a key")(&e))?;
        self.record(key, Some(value), revision).await?;
        Ok(revision)
    }

    /// Writes only if the key is still at `expected_revision` (0: only if absent).
    pub async fn update(
        &self,
        key: &str,
        value: Value,
        expected_revision: u64,
    ) -> Result<u64, MemoryError> {
        let bytes = self.encode(&value)?;
        let result = if expected_revision == 0 {
            self.store.create(key, bytes.into()).await.map_err(|e| {
                if e.kind() == kv::CreateErrorKind::AlreadyExists {
                    MemoryError::Conflict {
                        key: key.to_owned(),
                        expected: 0,
                    }
                } else {
                    nats("creating a key")(&e)
                }
            })
        } else {
            self.store
                .update(key, bytes.into(), expected_revision)
                .await
                .map_err(|e| {
                    if e.kind() == kv::UpdateErrorKind::WrongLastRevision {
                        MemoryError::Conflict {
                            key: key.to_owned(),
                            expected: expected_revision,
                        }
                    } else {
                        nats("updating a key")(&e)
                    }
                })
        };
        if let Err(MemoryError::Conflict { .. }) = &result {
            metrics::counter!("warren_runtime_memory_conflicts_total", "agent" => self.agent.clone())
                .increment(1);
        }
        let revision = result?;
        self.record(key, Some(value), revision).await?;
        Ok(revision)
    }

    pub async fn delete(&self, key: &str) -> Result<(), MemoryError> {
        self.store
            .delete(key)
            .await
            .map_err(|e| nats("deleting a key")(&e))?;
        // The delete marker's revision.
        let revision = self
            .store
            .entry(key)
            .await
            .map_err(|e| nats("reading a deleted key")(&e))?
            .map_or(0, |e| e.revision);
        self.record(key, None, revision).await
    }

    fn encode(&self, value: &Value) -> Result<Vec<u8>, MemoryError> {
        serde_json::to_vec(&Stored {
            value: value.clone(),
            agent: self.agent.clone(),
            workspace: self.workspace.clone(),
        })
        .map_err(|source| MemoryError::Format {
            key: String::new(),
            source,
        })
    }

    /// Publishes the write to the outbox (acknowledged) so the log records it.
    async fn record(
        &self,
        key: &str,
        value: Option<Value>,
        revision: u64,
    ) -> Result<(), MemoryError> {
        let message = OutboxMessage::MemoryWritten {
            id: format!("{}:{key}:{revision}", self.bucket),
            bucket: self.bucket.clone(),
            key: key.to_owned(),
            value,
            revision,
            workspace: self.workspace.clone(),
            agent: self.agent.clone(),
            correlation_id: self.conversation,
        };
        self.outbox
            .send_stored(&message, None)
            .await
            .map_err(|e| MemoryError::Nats(format!("recording a write: {e}")))?;
        metrics::counter!("warren_runtime_memory_writes_total", "agent" => self.agent.clone())
            .increment(1);
        Ok(())
    }
}
