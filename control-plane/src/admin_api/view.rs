//! What the admin API reads: a fold of the log, kept current by following it.
//!
//! Every replica serves the API, leader or not, so the API keeps its own fold instead of
//! borrowing the leader's. [`View::apply`] is pure, so "as of position N" is the same fold
//! stopped at N. A handler that wrote waits until the fold has reached what it wrote
//! ([`ViewHandle::wait_for`]) before it answers: a caller always reads its own writes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use warren_schema::event_log::SubscriptionOptions;
use warren_schema::events::*;
use warren_schema::{EventLog, RecordedEvent};

use super::auth::{Role, TokenRecord};
use crate::config_file::CONFIG_STREAM;
use crate::decide::State;

/// The backend's last word on a workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub phase: WorkspacePhase,
    pub backend: String,
    pub instance: Option<String>,
    pub detail: Option<String>,
    pub at: DateTime<Utc>,
}

/// The admin API's read model.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Agents, routes, workspaces and the admission queue, folded as the decisions fold them.
    pub state: State,
    /// Version of the configuration stream folded so far: what a configuration change
    /// expects, so that two changes decided on the same view cannot both land.
    pub config_version: i64,
    /// The configuration stream's version at each agent's and route's last change: their
    /// `ETag`.
    pub agent_versions: HashMap<String, i64>,
    pub route_versions: HashMap<String, i64>,
    /// Tokens by id, revoked ones included (the audit names them).
    pub tokens: BTreeMap<String, TokenRecord>,
    pub observed: HashMap<String, Observed>,
    /// Webhook endpoints managed through the API, by name.
    pub endpoints: BTreeMap<String, super::endpoints::EndpointRecord>,
}

impl View {
    /// Folds one event in (events at or below the position already folded are ignored).
    pub fn apply(&mut self, event: &RecordedEvent) {
        if event.position <= self.state.position {
            return;
        }
        let config_version = (event.stream == CONFIG_STREAM).then_some(event.stream_version);
        if let Some(v) = config_version {
            self.config_version = v;
        }
        let version = config_version.unwrap_or(0);
        match event.event_type.as_str() {
            AgentConfigured::TYPE | AgentRemoved::TYPE => {
                if let Some(name) = event.payload.get("name").and_then(|n| n.as_str()) {
                    self.agent_versions.insert(name.to_owned(), version);
                }
            }
            RouteConfigured::TYPE | RouteRemoved::TYPE => {
                if let Some(route) = event.payload.get("route").and_then(|n| n.as_str()) {
                    self.route_versions.insert(route.to_owned(), version);
                }
            }
            TokenIssued::TYPE => {
                if let Ok(t) = event.decode::<TokenIssued>() {
                    let digest = hex::decode(&t.secret_sha256)
                        .ok()
                        .and_then(|d| <[u8; 32]>::try_from(d).ok());
                    if let (Some(role), Some(secret_sha256)) = (Role::parse(&t.role), digest) {
                        self.tokens.insert(
                            t.token_id.clone(),
                            TokenRecord {
                                id: t.token_id,
                                name: t.name,
                                role,
                                secret_sha256,
                                issued_at: event.recorded_at,
                                expires_at: t.expires_at,
                                revoked_at: None,
                            },
                        );
                    }
                }
            }
            TokenRevoked::TYPE => {
                if let Ok(t) = event.decode::<TokenRevoked>()
                    && let Some(record) = self.tokens.get_mut(&t.token_id)
                {
                    record.revoked_at.get_or_insert(event.recorded_at);
                }
            }
            WebhookEndpointConfigured::TYPE => {
                if let Ok(e) = event.decode::<WebhookEndpointConfigured>() {
                    self.endpoints.insert(
                        e.endpoint.clone(),
                        super::endpoints::EndpointRecord {
                            configured: e,
                            version,
                        },
                    );
                }
            }
            WebhookEndpointRemoved::TYPE => {
                if let Ok(e) = event.decode::<WebhookEndpointRemoved>() {
                    self.endpoints.remove(&e.endpoint);
                }
            }
            WorkspaceObserved::TYPE => {
                if let Ok(o) = event.decode::<WorkspaceObserved>() {
                    self.observed.insert(
                        o.workspace,
                        Observed {
                            phase: o.phase,
                            backend: o.backend,
                            instance: o.instance,
                            detail: o.detail,
                            at: event.recorded_at,
                        },
                    );
                }
            }
            _ => {}
        }
        self.state.apply(event);
    }

    /// The fold of the log up to `position` (inclusive), reading and folding overlapped.
    pub async fn replay(log: &EventLog, up_to: i64) -> warren_schema::Result<Self> {
        crate::replay::fold_range(log, Self::default(), 0, up_to, Self::apply).await
    }
}

/// A batch of events as the follower folded them, in order, none skipped.
pub type Batch = Arc<Vec<RecordedEvent>>;

/// Batches kept for slow event followers before they must re-read from the log.
const BROADCAST_BATCHES: usize = 1024;

/// The live view, shared by every handler.
#[derive(Debug, Clone)]
pub struct ViewHandle {
    view: Arc<RwLock<View>>,
    /// The position folded so far.
    position: watch::Receiver<i64>,
    /// Each batch folded, for `/v1/events/stream`: every follower shares the view's one
    /// reader of the log instead of holding a database connection of its own.
    batches: broadcast::Sender<Batch>,
}

/// Sends the fold's progress.
#[derive(Debug)]
pub struct ViewWriter {
    view: Arc<RwLock<View>>,
    position: watch::Sender<i64>,
    batches: broadcast::Sender<Batch>,
}

/// Longest a handler waits for the fold to reach its own write before answering 503.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

impl ViewHandle {
    pub fn new() -> (Self, ViewWriter) {
        let view = Arc::new(RwLock::new(View::default()));
        let (tx, rx) = watch::channel(0);
        let (batches, _) = broadcast::channel(BROADCAST_BATCHES);
        (
            Self {
                view: view.clone(),
                position: rx,
                batches: batches.clone(),
            },
            ViewWriter {
                view,
                position: tx,
                batches,
            },
        )
    }

    /// The batches folded from now on.
    pub fn batches(&self) -> broadcast::Receiver<Batch> {
        self.batches.subscribe()
    }

    /// The view now. Hold the guard briefly: the follower waits for it.
    pub fn read(&self) -> RwLockReadGuard<'_, View> {
        // A panic while folding cannot leave a half-applied event behind a poisoned lock
        // that matters more than serving: the fold of the next event repairs nothing, but
        // refusing every request forever would be worse.
        self.view.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn position(&self) -> i64 {
        *self.position.borrow()
    }

    /// Waits until the fold has reached `position`; false when `SETTLE_TIMEOUT` passed.
    pub async fn wait_for(&self, position: i64) -> bool {
        let mut rx = self.position.clone();
        tokio::time::timeout(SETTLE_TIMEOUT, rx.wait_for(|p| *p >= position))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

impl ViewWriter {
    fn apply(&self, events: Vec<RecordedEvent>) {
        let Some(last) = events.last().map(|e| e.position) else {
            return;
        };
        {
            let mut view = self.view.write().unwrap_or_else(|e| e.into_inner());
            for event in &events {
                view.apply(event);
            }
        }
        self.position.send_replace(last);
        // No follower listening is fine.
        let _ = self.batches.send(Arc::new(events));
    }

    /// Follows the log until `shutdown`, resuming after a failed read.
    pub async fn follow(self, log: EventLog, shutdown: CancellationToken) {
        let options = SubscriptionOptions {
            name: "admin-api".into(),
            batch_size: 5000,
            ..SubscriptionOptions::default()
        };
        let mut delay = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            let from = *self.position.borrow();
            let mut subscription = match log.subscribe(from, options.clone()).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin API view: subscribing failed; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            loop {
                let batch = tokio::select! {
                    () = shutdown.cancelled() => return,
                    batch = subscription.next_batch() => batch,
                };
                match batch {
                    Ok(events) => {
                        delay = Duration::from_millis(100);
                        self.apply(events);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "admin API view: reading the log failed; resubscribing");
                        break;
                    }
                }
            }
        }
    }

    /// Spawns [`ViewWriter::follow`] in its own span.
    pub fn spawn(self, log: EventLog, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(
            self.follow(log, shutdown)
                .instrument(tracing::info_span!("admin_api_view")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_schema::{EventId, Metadata, NewEvent};

    fn recorded<E: DomainEvent>(position: i64, stream: &str, version: i64, e: &E) -> RecordedEvent {
        let new = NewEvent::from_domain(EventId::random(), e, Metadata::new("test")).expect("e");
        RecordedEvent {
            position,
            id: new.id,
            stream: stream.into(),
            stream_version: version,
            event_type: new.event_type,
            event_version: new.event_version,
            payload: new.payload,
            metadata: new.metadata,
            recorded_at: Utc::now(),
        }
    }

    fn agent(name: &str) -> AgentConfigured {
        AgentConfigured {
            name: name.into(),
            workspace: "w".into(),
            driver: "echo".into(),
            settings: serde_json::json!({}),
            idle_timeout_secs: 60,
        }
    }

    #[test]
    fn an_agent_s_version_is_the_configuration_stream_s_at_its_last_change() {
        let mut view = View::default();
        view.apply(&recorded(1, CONFIG_STREAM, 1, &agent("a")));
        view.apply(&recorded(2, "slack:T1", 1, &agent("ignored-stream")));
        view.apply(&recorded(3, CONFIG_STREAM, 2, &agent("b")));
        view.apply(&recorded(4, CONFIG_STREAM, 3, &agent("a")));
        assert_eq!(view.config_version, 3);
        assert_eq!(view.agent_versions["a"], 3);
        assert_eq!(view.agent_versions["b"], 2);
        assert!(view.state.agents.contains_key("a") && view.state.agents.contains_key("b"));
        // Replayed again (a resubscription overlapping), nothing moves.
        view.apply(&recorded(3, CONFIG_STREAM, 2, &agent("b")));
        assert_eq!(view.agent_versions["b"], 2);
    }

    #[test]
    fn a_revoked_token_stays_listed_and_is_no_longer_valid() {
        let mut view = View::default();
        let issued = TokenIssued {
            token_id: "0123456789ab".into(),
            name: "ci".into(),
            role: "operator".into(),
            secret_sha256: "00".repeat(32),
            expires_at: None,
        };
        view.apply(&recorded(1, CONFIG_STREAM, 1, &issued));
        assert!(view.tokens["0123456789ab"].is_valid_at(Utc::now()));
        view.apply(&recorded(
            2,
            CONFIG_STREAM,
            2,
            &TokenRevoked {
                token_id: "0123456789ab".into(),
            },
        ));
        assert!(!view.tokens["0123456789ab"].is_valid_at(Utc::now()));
    }
}
