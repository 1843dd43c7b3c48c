//! Shared memory: JetStream key-value buckets, one per workspace and one shared by all.
//!
//! Every value is stored with its provenance (`{"value": ..., "agent": ..., "workspace":
//! ...}`) and every write is recorded in the log as `memory.written`; a bucket lost with a
//! NATS store is re-seeded from the log (`warren_control_plane::delivery::memory::restore`).
//! `update` is revision-checked, so two agents cannot overwrite each other blindly.
//!
//! A workspace writes its own bucket itself and reports each write on its outbox. It reads
//! the shared bucket directly but writes it through the control plane (a [`SharedWrite`]
//! request), which sets the provenance from what it knows and records the write: a
//! workspace cannot write a shared value in another's name, or wipe the bucket. Neither
//! bucket is created here: the control plane makes both, with their limits, before the
//! workspace starts (a runtime with unrestricted credentials creates them if missing).

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use warren_schema::EventId;
use warren_schema::nats::{Namespace, OutboxMessage, SharedWrite, SharedWriteResult};

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
    /// The control plane would not make a shared write (the reason says why).
    #[error("shared memory refused the write: {0}")]
    Refused(String),
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
    /// How writes are made: directly (its own bucket) or by the control plane (shared).
    writes: Writes,
    bucket: String,
    workspace: String,
    agent: String,
    /// The conversation the writes belong to (provenance in the log).
    pub conversation: Option<EventId>,
}

#[derive(Debug, Clone)]
enum Writes {
    Direct,
    /// Requests on the workspace's shared-write subject.
    ControlPlane {
        client: async_nats::Client,
        subject: String,
    },
}

/// A workspace's two buckets, opened once and shared by its agents.
#[derive(Debug, Clone)]
pub struct Buckets {
    own: kv::Store,
    shared: kv::Store,
    outbox: Outbox,
    client: async_nats::Client,
    ns: Namespace,
    workspace: String,
}

/// Opens `bucket`. With `create_missing` (unrestricted credentials: tests, a runtime
/// without a control plane) a missing one is created with Warren's configuration; a
/// workspace's credentials may not, and get a clear error instead.
async fn open_store(
    js: &jetstream::Context,
    ns: &Namespace,
    bucket: &str,
    create_missing: bool,
) -> Result<kv::Store, MemoryError> {
    match js.get_key_value(bucket).await {
        Ok(store) => Ok(store),
        Err(_) if create_missing => {
            warren_schema::nats::ensure_bucket(js, bucket, &ns.bucket_limits(bucket))
                .await
                .map_err(|e| MemoryError::Nats(e.to_string()))
        }
        Err(e) => Err(MemoryError::Nats(format!(
            "opening bucket {bucket}: {e} (the control plane makes it before it starts the \
             workspace)"
        ))),
    }
}

impl Buckets {
    /// Opens both; `create_missing` as in [`open_store`].
    pub async fn open(
        js: &jetstream::Context,
        ns: &Namespace,
        workspace: &str,
        create_missing: bool,
    ) -> Result<Self, MemoryError> {
        Ok(Self {
            own: open_store(js, ns, &ns.workspace_bucket(workspace), create_missing).await?,
            shared: open_store(js, ns, &ns.shared_bucket(), create_missing).await?,
            outbox: Outbox::new(js.clone(), ns, workspace),
            client: js.client(),
            ns: ns.clone(),
            workspace: workspace.to_owned(),
        })
    }

    /// `agent`'s view: (the workspace's bucket, the shared one).
    pub fn for_agent(&self, agent: &str) -> (Memory, Memory) {
        let view = |store: &kv::Store, bucket: String, writes: Writes| Memory {
            store: store.clone(),
            outbox: self.outbox.clone(),
            writes,
            bucket,
            workspace: self.workspace.clone(),
            agent: agent.to_owned(),
            conversation: None,
        };
        (
            view(
                &self.own,
                self.ns.workspace_bucket(&self.workspace),
                Writes::Direct,
            ),
            view(
                &self.shared,
                self.ns.shared_bucket(),
                Writes::ControlPlane {
                    client: self.client.clone(),
                    subject: self.ns.shared_write_subject(&self.workspace),
                },
            ),
        )
    }
}

impl Memory {
    /// One bucket as `agent` of `workspace` sees it (the shared one is written through the
    /// control plane), created if missing and allowed.
    pub async fn open(
        js: jetstream::Context,
        ns: Namespace,
        bucket: &str,
        workspace: &str,
        agent: &str,
    ) -> Result<Self, MemoryError> {
        let store = open_store(&js, &ns, bucket, true).await?;
        let writes = if bucket == ns.shared_bucket() {
            Writes::ControlPlane {
                client: js.client(),
                subject: ns.shared_write_subject(workspace),
            }
        } else {
            Writes::Direct
        };
        Ok(Self {
            store,
            outbox: Outbox::new(js, &ns, workspace),
            writes,
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

    /// Keys with a value, sorted. Read from the stream's per-subject counts (what reading
    /// allows; listing through a consumer would need the right to create one), then each
    /// key's latest entry, to leave out deleted keys.
    pub async fn list(&self) -> Result<Vec<String>, MemoryError> {
        let prefix = format!("$KV.{}.", self.bucket);
        let mut subjects = self
            .store
            .stream
            .info_with_subjects(format!("{prefix}>"))
            .await
            .map_err(|e| nats("listing keys")(&e))?;
        let mut keys = Vec::new();
        while let Some(subject) = subjects.next().await {
            let (subject, _) = subject.map_err(|e| nats("listing keys")(&e))?;
            if let Some(key) = subject.strip_prefix(&prefix) {
                keys.push(key.to_owned());
            }
        }
        let mut out = Vec::new();
        for key in keys {
            if self.get(&key).await?.is_some() {
                out.push(key);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Writes unconditionally; returns the new revision.
    pub async fn put(&self, key: &str, value: Value) -> Result<u64, MemoryError> {
        self.write(key, Some(value), None).await
    }

    /// Writes only if the key is still at `expected_revision` (0: only if absent).
    pub async fn update(
        &self,
        key: &str,
        value: Value,
        expected_revision: u64,
    ) -> Result<u64, MemoryError> {
        self.write(key, Some(value), Some(expected_revision)).await
    }

    pub async fn delete(&self, key: &str) -> Result<(), MemoryError> {
        self.write(key, None, None).await.map(|_| ())
    }

    /// One write (`value` `None`: a delete), made directly or by the control plane;
    /// returns its revision.
    async fn write(
        &self,
        key: &str,
        value: Option<Value>,
        expected: Option<u64>,
    ) -> Result<u64, MemoryError> {
        let result = match &self.writes {
            Writes::Direct => self.write_directly(key, value, expected).await,
            Writes::ControlPlane { client, subject } => {
                let request = SharedWrite {
                    agent: self.agent.clone(),
                    key: key.to_owned(),
                    value,
                    expected_revision: expected,
                    conversation: self.conversation,
                };
                ask_control_plane(client, subject, &request).await
            }
        };
        match &result {
            Ok(_) => metrics::counter!("warren_runtime_memory_writes_total", "agent" => self.agent.clone())
                .increment(1),
            Err(MemoryError::Conflict { .. }) => {
                metrics::counter!("warren_runtime_memory_conflicts_total", "agent" => self.agent.clone())
                    .increment(1)
            }
            Err(_) => {}
        }
        result
    }

    /// Writes its own bucket and reports the write on the outbox, where the control plane
    /// records it.
    async fn write_directly(
        &self,
        key: &str,
        value: Option<Value>,
        expected: Option<u64>,
    ) -> Result<u64, MemoryError> {
        let conflict = |expected| MemoryError::Conflict {
            key: key.to_owned(),
            expected,
        };
        let revision = match (&value, expected) {
            (None, _) => {
                self.store
                    .delete(key)
                    .await
                    .map_err(|e| nats("deleting a key")(&e))?;
                // The delete marker's revision.
                self.store
                    .entry(key)
                    .await
                    .map_err(|e| nats("reading a deleted key")(&e))?
                    .map_or(0, |e| e.revision)
            }
            (Some(v), None) => self
                .store
                .put(key, self.encode(v)?.into())
                .await
                .map_err(|e| nats("writing a key")(&e))?,
            (Some(v), Some(0)) => self
                .store
                .create(key, self.encode(v)?.into())
                .await
                .map_err(|e| {
                    if e.kind() == kv::CreateErrorKind::AlreadyExists {
                        conflict(0)
                    } else {
                        nats("creating a key")(&e)
                    }
                })?,
            (Some(v), Some(expected)) => self
                .store
                .update(key, self.encode(v)?.into(), expected)
                .await
                .map_err(|e| {
                    if e.kind() == kv::UpdateErrorKind::WrongLastRevision {
                        conflict(expected)
                    } else {
                        nats("updating a key")(&e)
                    }
                })?,
        };
        self.record(key, value, revision).await?;
        Ok(revision)
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
            .map_err(|e| MemoryError::Nats(format!("recording a write: {e}")))
    }
}

/// Sends a shared write to the control plane and reads its answer (waiting for one across
/// a leader hand-over: [`crate::control_plane::ask`]).
async fn ask_control_plane(
    client: &async_nats::Client,
    subject: &str,
    request: &SharedWrite,
) -> Result<u64, MemoryError> {
    let body = serde_json::to_vec(request).map_err(|source| MemoryError::Format {
        key: request.key.clone(),
        source,
    })?;
    let answer = crate::control_plane::ask(client, subject, body)
        .await
        .map_err(|e| nats("asking the control plane to write shared memory")(&e))?;
    let answer: SharedWriteResult =
        serde_json::from_slice(&answer.payload).map_err(|source| MemoryError::Format {
            key: request.key.clone(),
            source,
        })?;
    match answer {
        SharedWriteResult::Written { revision } => Ok(revision),
        SharedWriteResult::Conflict { expected } => Err(MemoryError::Conflict {
            key: request.key.clone(),
            expected,
        }),
        SharedWriteResult::Refused { reason } => Err(MemoryError::Refused(reason)),
        SharedWriteResult::Failed { reason } => Err(MemoryError::Nats(reason)),
    }
}
