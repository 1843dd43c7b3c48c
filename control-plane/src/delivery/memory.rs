//! Re-seeding a memory bucket from the log (after a NATS store loss).

use async_nats::jetstream;
use serde_json::json;
use warren_schema::EventLog;
use warren_schema::events::{DomainEvent, MemoryWritten};
use warren_schema::nats::Namespace;

use super::nats;
use crate::error::{Error, Result};

/// Puts back, into `bucket` (created if missing), the latest value of every key the log
/// has for it; keys whose latest write is a delete stay absent. Returns the keys restored.
pub async fn restore(
    js: &jetstream::Context,
    ns: &Namespace,
    log: &EventLog,
    bucket: &str,
) -> Result<usize> {
    let mut latest: std::collections::BTreeMap<String, MemoryWritten> = Default::default();
    let mut after = 0;
    loop {
        let page = log.read_type(MemoryWritten::TYPE, after, 10_000).await?;
        let Some(last) = page.last() else { break };
        after = last.position;
        for event in &page {
            let write: MemoryWritten = event.decode()?;
            if write.bucket == bucket {
                latest.insert(write.key.clone(), write);
            }
        }
    }
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
