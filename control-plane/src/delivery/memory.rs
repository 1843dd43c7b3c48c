//! Re-seeding a memory bucket from the log (after a NATS store loss).

use std::collections::BTreeMap;

use async_nats::jetstream;
use serde_json::json;
use warren_schema::EventLog;
use warren_schema::events::{DomainEvent, MemoryWritten};
use warren_schema::nats::Namespace;

use super::nats;
use crate::error::{Error, Result};

/// The latest write of every key, by bucket, as the log has them (one pass over the
/// `memory.written` history); `only`: that bucket alone.
async fn latest_writes(log: &EventLog, only: Option<&str>) -> Result<BTreeMap<String, Latest>> {
    let mut buckets: BTreeMap<String, Latest> = BTreeMap::new();
    let mut after = 0;
    loop {
        let page = log.read_type(MemoryWritten::TYPE, after, 10_000).await?;
        let Some(last) = page.last() else { break };
        after = last.position;
        for event in &page {
            let write: MemoryWritten = event.decode()?;
            if only.is_none_or(|b| b == write.bucket) {
                buckets
                    .entry(write.bucket.clone())
                    .or_default()
                    .insert(write.key.clone(), write);
            }
        }
    }
    Ok(buckets)
}

/// A bucket's keys and their latest writes.
type Latest = BTreeMap<String, MemoryWritten>;

/// Puts back, into `bucket` (created if missing), the latest value of every key the log
/// has for it; keys whose latest write is a delete stay absent. Returns the keys restored.
pub async fn restore(
    js: &jetstream::Context,
    ns: &Namespace,
    log: &EventLog,
    bucket: &str,
) -> Result<usize> {
    let latest = latest_writes(log, Some(bucket))
        .await?
        .remove(bucket)
        .unwrap_or_default();
    put_back(js, ns, bucket, latest).await
}

/// [`restore`] for every bucket the log has writes for (after the NATS store was lost).
/// Returns each bucket with the keys restored.
pub async fn restore_all(
    js: &jetstream::Context,
    ns: &Namespace,
    log: &EventLog,
) -> Result<Vec<(String, usize)>> {
    let mut restored = Vec::new();
    for (bucket, latest) in latest_writes(log, None).await? {
        let keys = put_back(js, ns, &bucket, latest).await?;
        restored.push((bucket, keys));
    }
    Ok(restored)
}

async fn put_back(
    js: &jetstream::Context,
    ns: &Namespace,
    bucket: &str,
    latest: Latest,
) -> Result<usize> {
    let store = warren_schema::nats::ensure_bucket(js, bucket, &ns.bucket_limits(bucket))
        .await
        .map_err(|e| Error::Nats(e.to_string()))?;
    let mut restored = 0;
    for (key, write) in latest {
        if let Some(value) = write.value {
            let stored =
                json!({"value": value, "agent": write.agent, "workspace": write.workspace});
            store
                .put(key.as_str(), stored.to_string().into_bytes().into())
                .await
                .map_err(|e| nats("restoring a key")(&e))?;
            restored += 1;
        }
    }
    tracing::info!(bucket, restored, "memory bucket restored from the log");
    Ok(restored)
}
