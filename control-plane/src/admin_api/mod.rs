//! The admin API: agents, routes, tokens, workspaces, the event log and the audit trail over
//! HTTP, on a listener of its own (never beside the Slack and webhook paths).
//!
//! - Every change is an event in the configuration stream, carrying its caller as `actor`
//!   ([`auth::Caller::actor`]); `GET /v1/audit` lists them. Changes take effect on the
//!   leader as it follows the log: no restart, no failover.
//! - Reads come from a fold of the log ([`view`]) that every replica keeps; a handler that
//!   wrote answers only once the fold has its write.
//! - `ETag` is the configuration stream's version at the resource's last change; `If-Match`
//!   with an older one is refused (412). The append itself expects the version the checks
//!   were made against, so two concurrent changes cannot both pass a check.
//! - `Idempotency-Key` on creates: the event id derives from the caller and the key, so a
//!   repeat is the log's own duplicate and creates nothing.
//! - Errors are `application/problem+json` ([`problem`]); lists page with opaque cursors.
//! - The OpenAPI 3.1 document is generated from the handlers ([`openapi`]), served at
//!   `/openapi.json` and committed as `docs/openapi.json`.

// utoipa's `#[utoipa::path(params(...))]` expands to fully qualified paths of the
// parameter types, which the workspace's `unused_qualifications` lint flags in each handler
// module; the lint stays on everywhere else.
#[allow(unused_qualifications)]
pub mod agents;
pub mod auth;
#[allow(unused_qualifications)]
pub mod endpoints;
#[allow(unused_qualifications)]
pub mod events;
mod extract;
#[allow(unused_qualifications)]
mod history;
#[allow(unused_qualifications)]
mod memory;
pub mod problem;
#[allow(unused_qualifications)]
mod quotas;
#[allow(unused_qualifications)]
pub mod routes;
#[allow(unused_qualifications)]
pub mod tokens;
#[allow(unused_qualifications)]
mod usage;
pub mod view;
#[allow(unused_qualifications)]
pub mod workspaces;

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::IntoResponse;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use utoipa::openapi::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use warren_schema::{AppendRequest, EventId, EventLog, ExpectedVersion, Metadata, NewEvent};

pub use auth::{Authenticator, Caller, Role, TokenAuthenticator};
use problem::{ApiError, ApiResult};
use view::{View, ViewHandle};

use crate::config_file::CONFIG_STREAM;

/// `metadata.source` of every event the API records (see `warren_schema::event_log::AUDIT_SOURCES`).
pub const SOURCE: &str = "admin-api";

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct Api {
    pub log: EventLog,
    pub view: ViewHandle,
    pub auth: Arc<dyn Authenticator>,
    /// Set once the view has caught up with the log as it was at start (`/readyz`).
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    /// Room for event followers (`/v1/events/stream`).
    pub followers: Arc<tokio::sync::Semaphore>,
    /// Room for replays of history (as-of, what-if): each reads the log from the start.
    pub replays: Arc<tokio::sync::Semaphore>,
    /// The decisions' policy in force (what-if changes it).
    pub policy: crate::decide::Policy,
    /// NATS, for memory restores (connected on first use).
    pub nats: Option<crate::controller::NatsConfig>,
    pub nats_client: Arc<tokio::sync::OnceCell<async_nats::Client>>,
}

/// What the API needs besides the log.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// The decisions' policy in force (what-if changes it).
    pub policy: crate::decide::Policy,
    /// NATS, for memory restores; without it they answer 503.
    pub nats: Option<crate::controller::NatsConfig>,
}

impl Api {
    pub fn new(
        log: EventLog,
        view: ViewHandle,
        auth: Arc<dyn Authenticator>,
        settings: Settings,
    ) -> Self {
        Self {
            log,
            view,
            auth,
            ready: Default::default(),
            followers: Arc::new(tokio::sync::Semaphore::new(events::MAX_FOLLOWERS)),
            replays: Arc::new(tokio::sync::Semaphore::new(2)),
            policy: settings.policy,
            nats: settings.nats,
            nats_client: Default::default(),
        }
    }
}

/// The routes, without state: the router and the document come from the same list.
fn api_routes() -> OpenApiRouter<Api> {
    OpenApiRouter::with_openapi(base_document())
        .routes(routes!(agents::list, agents::create))
        .routes(routes!(agents::get, agents::replace, agents::delete))
        .routes(routes!(routes::list))
        .routes(routes!(routes::get, routes::put, routes::delete))
        .routes(routes!(endpoints::list, endpoints::create))
        .routes(routes!(endpoints::get, endpoints::delete))
        .routes(routes!(endpoints::rotate))
        .routes(routes!(tokens::list, tokens::issue))
        .routes(routes!(tokens::revoke))
        .routes(routes!(workspaces::list))
        .routes(routes!(workspaces::get, workspaces::delete))
        .routes(routes!(workspaces::start))
        .routes(routes!(workspaces::stop))
        .routes(routes!(workspaces::restart))
        .routes(routes!(events::list))
        .routes(routes!(events::follow))
        .routes(routes!(events::get))
        .routes(routes!(events::audit))
        .routes(routes!(history::explain_event))
        .routes(routes!(history::explain_workspace))
        .routes(routes!(history::as_of))
        .routes(routes!(history::what_if))
        .routes(routes!(memory::restore))
        .routes(routes!(quotas::list))
        .routes(routes!(quotas::set, quotas::remove))
        .routes(routes!(workspaces::queue))
        .routes(routes!(usage::usage))
}

/// The OpenAPI document (what `/openapi.json` serves and `docs/openapi.json` holds).
pub fn openapi() -> OpenApi {
    finish(api_routes().into_openapi())
}

/// Adds what every authenticated operation can answer (400, 401, 403, 500, 503), and marks
/// every error body `application/problem+json`, which the handler annotations cannot say
/// per response without repeating it everywhere.
fn finish(mut doc: OpenApi) -> OpenApi {
    use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
    let problem = |description: &str| -> RefOr<utoipa::openapi::Response> {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/problem+json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build()
            .into()
    };
    for item in doc.paths.paths.values_mut() {
        for operation in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            let responses = &mut operation.responses.responses;
            for (status, response) in responses.iter_mut() {
                if let RefOr::T(response) = response
                    && (status.starts_with('4') || status.starts_with('5'))
                    && let Some(json) = response.content.shift_remove("application/json")
                {
                    response
                        .content
                        .insert("application/problem+json".into(), json);
                }
            }
            for (status, description) in [
                (
                    "400",
                    "The request is malformed (a parameter, header or body)",
                ),
                (
                    "401",
                    "No valid bearer token (missing, unknown, revoked or expired)",
                ),
                ("403", "The token's role is below what the operation needs"),
                ("500", "An internal error (logged; the body has no detail)"),
                (
                    "503",
                    "The event log is unavailable; retry after Retry-After",
                ),
            ] {
                responses
                    .entry(status.into())
                    .or_insert_with(|| problem(description));
            }
        }
    }
    doc
}

fn base_document() -> OpenApi {
    let mut doc = utoipa::openapi::OpenApiBuilder::new()
        .info(
            utoipa::openapi::InfoBuilder::new()
                .title("Warren admin API")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "Manage Warren's agents, routes, tokens and workspaces, and read its \
                     event log. Every change is an event; `GET /v1/audit` lists them. \
                     Authenticate with `Authorization: Bearer wrn_...`; each operation's \
                     security requirement names the least role it needs \
                     (viewer < operator < admin).",
                ))
                .build(),
        )
        .build();
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "token",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("wrn_{id}_{secret}")
                .build(),
        ),
    );
    components.schemas.insert(
        "Problem".into(),
        <problem::Problem as utoipa::PartialSchema>::schema(),
    );
    doc
}

/// The router: the API, `/openapi.json`, `/healthz`, `/readyz` and `/metrics`.
pub fn router(api: Api, metrics: Router) -> Router {
    let (routes, document) = api_routes().split_for_parts();
    let document = Arc::new(finish(document));
    let ready = api.ready.clone();
    routes
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let document = document.clone();
                async move { axum::Json(document.as_ref().clone()) }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let ready = ready.load(std::sync::atomic::Ordering::Relaxed);
                async move {
                    if ready {
                        (http::StatusCode::OK, "ready")
                    } else {
                        (
                            http::StatusCode::SERVICE_UNAVAILABLE,
                            "catching up with the event log",
                        )
                    }
                }
            }),
        )
        .layer(axum::extract::DefaultBodyLimit::max(1 << 20))
        .route_layer(axum::middleware::from_fn_with_state(
            warren_telemetry::http::HttpService {
                metric_prefix: "warren_admin_api",
                span: |method, route| warren_telemetry::http_request_span!(method, route),
            },
            warren_telemetry::http::request_span,
        ))
        .with_state(api)
        .merge(metrics)
}

/// Connections the API's requests use, in a pool of their own: a burst of API calls (or a
/// replay of history) never waits on, or starves, the leader's pool.
pub const API_CONNECTIONS: u32 = 4;

/// Starts following the log and serves the API on `listener` until `shutdown`. `log`'s
/// pool is not used: the API opens pools of its own on the same database. `metrics` is
/// merged in (`GET /metrics`); it must not answer the API's own paths (`/healthz`,
/// `/readyz`, `/openapi.json`, `/v1/...`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    log: EventLog,
    settings: Settings,
    metrics: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    // The view's follower keeps its LISTEN connection for as long as it runs.
    let follower_log = log.with_own_pool(2);
    let log = log.with_own_pool(API_CONNECTIONS);
    let (view, writer) = ViewHandle::new();
    let api = Api::new(
        log.clone(),
        view.clone(),
        Arc::new(TokenAuthenticator { view: view.clone() }),
        settings,
    );
    let follower = writer.spawn(follower_log, shutdown.clone());
    let ready = api.ready.clone();
    tokio::spawn(async move {
        // Ready once the fold holds everything committed when it started.
        loop {
            match log.head().await {
                Ok(head) => {
                    if view.wait_for(head).await {
                        ready.store(true, std::sync::atomic::Ordering::Relaxed);
                        return;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "admin API: reading the log's head"),
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    });
    tracing::info!(listen = %listener.local_addr()?, "admin API listening");
    let served = axum::serve(listener, router(api, metrics))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    follower.abort();
    served
}

/// Serves the API on an ephemeral loopback port until `shutdown` (for embedding it, and for
/// tests): its base URL. The API answers at once; `/readyz` says when it has caught up.
pub async fn serve_on_loopback(
    log: EventLog,
    settings: Settings,
    shutdown: CancellationToken,
) -> std::io::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(serve(listener, log, settings, Router::new(), shutdown));
    Ok(url)
}

impl Api {
    /// Records configuration events decided by `decide` against the current view.
    ///
    /// The append expects the configuration stream at the version the view had, so a
    /// change made meanwhile (by another request or replica) fails it; the view then catches
    /// up and `decide` runs again on what is now true. Returns `decide`'s value and the
    /// position of the last event, once the view holds it.
    async fn change<T>(
        &self,
        caller: &Caller,
        id: Option<EventId>,
        decide: impl Fn(&View) -> ApiResult<(Vec<ConfigChange>, T)>,
    ) -> ApiResult<T> {
        // Each lost race means another change landed, so every round makes progress; this
        // bounds a burst of concurrent changes (8 at once lost up to 7 rounds), not a stall.
        const ATTEMPTS: usize = 64;
        for _ in 0..ATTEMPTS {
            let (changes, out, expected) = {
                let view = self.view.read();
                let (changes, out) = decide(&view)?;
                (changes, out, view.config_version)
            };
            if changes.is_empty() {
                return Ok(out);
            }
            let mut writes = Vec::new();
            let mut events = Vec::with_capacity(changes.len());
            for (i, change) in changes.into_iter().enumerate() {
                writes.extend(change.write);
                events.push(stamped(change.event, caller, id, i));
            }
            let request = AppendRequest::new(CONFIG_STREAM, events).expecting(match expected {
                0 => ExpectedVersion::NoStream,
                v => ExpectedVersion::Exact(v),
            });
            match self.commit(&request, &writes).await {
                Ok(appended) => {
                    let last = appended.iter().map(|a| a.position).max().unwrap_or(0);
                    if !self.view.wait_for(last).await {
                        return Err(ApiError::Unavailable(
                            "the change was recorded but is not visible yet; read it again shortly"
                                .into(),
                        ));
                    }
                    return Ok(out);
                }
                Err(warren_schema::Error::WrongExpectedVersion { .. }) => {
                    // Someone changed the configuration since the view was read: wait until
                    // the view holds everything committed now (that change included), then
                    // decide again.
                    let head = self.log.head().await?;
                    if !self.view.wait_for(head).await {
                        break;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::Unavailable(
            "the configuration kept changing under this request; retry it".into(),
        ))
    }

    /// Appends `request` and applies `writes` in one transaction: both or neither.
    async fn commit(
        &self,
        request: &AppendRequest,
        writes: &[endpoints::SecretWrite],
    ) -> warren_schema::Result<Vec<warren_schema::Appended>> {
        let mut tx = self
            .log
            .pool()
            .begin()
            .await
            .map_err(warren_schema::Error::db("beginning a configuration change"))?;
        for write in writes {
            write
                .apply(&mut tx)
                .await
                .map_err(warren_schema::Error::db(
                    "writing a webhook endpoint's secret",
                ))?;
        }
        let appended = warren_schema::event_log::append_in_tx(&mut tx, &[request])
            .await?
            .remove(0)?;
        tx.commit().await.map_err(warren_schema::Error::db(
            "committing a configuration change",
        ))?;
        Ok(appended)
    }

    /// For a create with an `Idempotency-Key`: the event that key already recorded, if any.
    /// The same key with a different request is refused (422).
    async fn replayed(
        &self,
        id: Option<EventId>,
        key: Option<&str>,
        same_request: impl Fn(&warren_schema::RecordedEvent) -> bool,
    ) -> ApiResult<Option<warren_schema::RecordedEvent>> {
        let (Some(id), Some(key)) = (id, key) else {
            return Ok(None);
        };
        match self.log.get(id).await? {
            Some(event) if same_request(&event) => {
                self.view.wait_for(event.position).await;
                Ok(Some(event))
            }
            Some(_) => Err(ApiError::IdempotencyKeyReused(key.to_owned())),
            None => Ok(None),
        }
    }
}

/// One configuration event to record, and what must be written with it outside the log.
#[derive(Debug)]
pub(crate) struct ConfigChange {
    event: NewEvent,
    write: Option<endpoints::SecretWrite>,
}

impl ConfigChange {
    pub(crate) fn of<E: warren_schema::events::DomainEvent>(event: &E) -> ApiResult<Self> {
        NewEvent::from_domain(EventId::random(), event, Metadata::new(SOURCE))
            .map(|event| Self { event, write: None })
            .map_err(|e| ApiError::Internal(Box::new(e)))
    }

    /// With a write to the secrets table, committed with the event.
    pub(crate) fn with(mut self, write: endpoints::SecretWrite) -> Self {
        self.write = Some(write);
        self
    }
}

/// The metadata of an event a caller's request records: the API as source, the caller as
/// actor, the request's trace.
pub(crate) fn metadata(caller: &Caller) -> Metadata {
    let mut metadata = Metadata::new(SOURCE);
    metadata.actor = Some(caller.actor());
    metadata.traceparent = warren_telemetry::current_traceparent();
    metadata
}

/// `change`'s event as recorded: the caller's metadata and, for an idempotent create, the id
/// derived from the key (the `i`th event of the change).
fn stamped(change: NewEvent, caller: &Caller, id: Option<EventId>, i: usize) -> NewEvent {
    let mut event = change;
    if let Some(id) = id {
        event.id = match i {
            0 => id,
            i => EventId::derive(&[&id.to_string(), &i.to_string()]),
        };
    }
    event.metadata = metadata(caller);
    event
}

/// The event id an idempotent create records: from the caller and the key, so the same
/// caller repeating the key lands on the same id.
fn idempotent_id(
    caller: &Caller,
    headers: &HeaderMap,
) -> ApiResult<(Option<EventId>, Option<String>)> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok((None, None));
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .ok_or_else(|| {
            ApiError::BadRequest("Idempotency-Key: 1-255 visible ASCII characters".into())
        })?;
    Ok((
        Some(EventId::derive(&[
            "admin-api",
            "idempotency",
            &caller.id,
            key,
        ])),
        Some(key.to_owned()),
    ))
}

/// An `ETag` value for a configuration version.
fn etag(version: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

/// The `If-Match` precondition: `None` when absent or `*`, else the versions it allows.
fn if_match(headers: &HeaderMap) -> ApiResult<Option<Vec<i64>>> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::BadRequest("If-Match is not text".into()))?
        .trim();
    if text == "*" {
        return Ok(None);
    }
    text.split(',')
        .map(|tag| {
            tag.trim()
                .trim_start_matches("W/")
                .trim_matches('"')
                .parse::<i64>()
                .map_err(|_| {
                    ApiError::BadRequest(format!("If-Match {tag:?}: use an ETag this API returned"))
                })
        })
        .collect::<ApiResult<Vec<_>>>()
        .map(Some)
}

/// Refuses the change when `If-Match` names another version than `current`.
fn check_if_match(wanted: &Option<Vec<i64>>, current: i64) -> ApiResult<()> {
    match wanted {
        Some(versions) if !versions.contains(&current) => Err(ApiError::PreconditionFailed {
            expected: versions
                .iter()
                .map(|v| format!("\"{v}\""))
                .collect::<Vec<_>>()
                .join(", "),
            current: format!("\"{current}\""),
        }),
        _ => Ok(()),
    }
}

/// A JSON answer with an `ETag`.
fn with_etag<T: Serialize>(
    status: http::StatusCode,
    version: i64,
    body: T,
) -> axum::response::Response {
    let mut response = (status, axum::Json(body)).into_response();
    response.headers_mut().insert(header::ETAG, etag(version));
    response
}

/// A page of a list, and the cursor of the next one.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` for the next page; absent on the last.
    pub next_cursor: Option<String>,
}
