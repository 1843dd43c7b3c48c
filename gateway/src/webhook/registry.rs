//! The endpoints the gateway verifies against: those of its file, fixed at start, and those
//! the admin API manages (`webhook_endpoints`), reloaded whenever the API changes one, so a
//! new, rotated or deleted endpoint takes effect without a restart.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;
use warren_schema::Secret;

use super::{Endpoint, Scheme};

/// The channel the admin API notifies after each endpoint change.
pub const NOTIFY_CHANNEL: &str = "warren_webhook_endpoints";
/// Reload this often even without a notification (a lost one, a dropped LISTEN).
const POLL: Duration = Duration::from_secs(10);

/// File endpoints and managed ones.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    file: Arc<HashMap<String, Endpoint>>,
    managed: Arc<RwLock<Arc<HashMap<String, Endpoint>>>>,
}

impl Registry {
    pub fn new(file: HashMap<String, Endpoint>) -> Self {
        Self {
            file: Arc::new(file),
            managed: Default::default(),
        }
    }

    /// The endpoint named `name`. The file's wins over a managed one of the same name.
    pub fn get(&self, name: &str) -> Option<Endpoint> {
        if let Some(e) = self.file.get(name) {
            return Some(e.clone());
        }
        self.managed
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Reads the managed endpoints now.
    pub async fn reload(&self, pool: &PgPool) -> Result<usize, sqlx::Error> {
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT name, scheme, agent, signature_header, delivery_header, secret, \
                    previous_secret, previous_expires_at FROM webhook_endpoints",
        )
        .fetch_all(pool)
        .await?;
        let mut managed = HashMap::with_capacity(rows.len());
        for row in rows {
            let name = row.name.clone();
            if self.file.contains_key(&name) {
                tracing::warn!(endpoint = %name, "an endpoint of the gateway's file shadows the managed one of the same name");
            }
            match row.endpoint() {
                Some(e) => {
                    managed.insert(name, e);
                }
                None => {
                    tracing::warn!(endpoint = %name, "a managed endpoint has an unknown scheme; skipped")
                }
            }
        }
        let n = managed.len();
        *self.managed.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(managed);
        Ok(n)
    }

    /// Keeps the managed endpoints current until `shutdown`: reloads on each notification
    /// and every [`POLL`]. The `LISTEN` connection comes from a pool of its own, not from
    /// `pool`, whose connections the appender counts on.
    pub async fn follow(self, pool: PgPool, shutdown: CancellationToken) {
        let own = warren_schema::EventLog::new(pool.clone()).with_own_pool(1);
        let mut listener = match PgListener::connect_with(own.pool()).await {
            Ok(mut l) => match l.listen(NOTIFY_CHANNEL).await {
                Ok(()) => Some(l),
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN for webhook endpoints failed; polling");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "LISTEN for webhook endpoints failed; polling");
                None
            }
        };
        loop {
            if let Err(e) = self.reload(&pool).await {
                tracing::warn!(error = %e, "reloading webhook endpoints failed; keeping the last ones");
            }
            let notified = async {
                match listener.as_mut() {
                    Some(l) => {
                        if l.recv().await.is_err() {
                            tokio::time::sleep(POLL).await;
                        }
                    }
                    None => tokio::time::sleep(POLL).await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = notified => {}
                () = tokio::time::sleep(POLL) => {}
            }
        }
    }
}

#[derive(Debug, sqlx::FromRow)]
struct Row {
    name: String,
    scheme: String,
    agent: String,
    signature_header: Option<String>,
    delivery_header: Option<String>,
    secret: String,
    previous_secret: Option<String>,
    previous_expires_at: Option<DateTime<Utc>>,
}

impl Row {
    fn endpoint(self) -> Option<Endpoint> {
        let scheme = match self.scheme.as_str() {
            "github" => Scheme::Github,
            "standard_webhooks" => Scheme::StandardWebhooks,
            "hmac_sha256" => Scheme::HmacSha256,
            _ => return None,
        };
        Some(Endpoint {
            name: self.name,
            scheme,
            secret: Secret::new(self.secret),
            previous: match (self.previous_secret, self.previous_expires_at) {
                (Some(s), Some(until)) => Some((Secret::new(s), until.timestamp())),
                _ => None,
            },
            agent: self.agent,
            signature_header: self
                .signature_header
                .as_deref()
                .map_or("x-signature-256", intern),
            delivery_header: self.delivery_header.as_deref().map(intern),
        })
    }
}

/// A header name as a `&'static str`: each distinct name is allocated once for the life of
/// the process (there are a handful; reloads do not grow it).
pub fn intern(name: &str) -> &'static str {
    static NAMES: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);
    let name = name.to_ascii_lowercase();
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    let names = names.get_or_insert_with(HashSet::new);
    if let Some(existing) = names.get(name.as_str()) {
        return existing;
    }
    let leaked: &'static str = Box::leak(name.into_boxed_str());
    names.insert(leaked);
    leaked
}
