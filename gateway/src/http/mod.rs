//! The HTTP surface: routes, shared state, and the mapping of failures to answers.
//!
//! Every answer is decided here, once: 200 only after the event's batch committed; 401 for a
//! bad or missing signature or a stale timestamp; 400 for a malformed body; 404 for an
//! unknown endpoint; 413 over the size limit; 503 with `Retry-After` when the log cannot take
//! the event in time. Error bodies name the problem, never a secret or internal detail.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use sqlx::PgPool;
use tracing::{info, warn};
use warren_schema::event_log::Appender;
use warren_schema::{AppendRequest, Error as LogError, Secret};

use crate::slack::commands::{self, Command};
use crate::slack::events::{self, Inbound};
use crate::verify::{self, VerifyError};
use crate::webhook::{self, Refusal};

mod listener;

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    pub appender: Appender,
    pub pool: PgPool,
    pub slack_signing_secret: Option<Secret>,
    pub webhooks: webhook::registry::Registry,
    /// Longest an append may take before the sender is told to retry (503). Slack gives an
    /// app 3 s; this must stay well inside that.
    pub append_timeout: Duration,
    /// Seconds a refused sender is asked to wait (`Retry-After`).
    pub retry_after_secs: u64,
    /// Bytes of request bodies waiting for the log.
    pub queued_bytes: QueuedBytes,
}

/// A bound on the bytes of request bodies waiting for the log at once (the append queue is
/// bounded in requests too): past it, senders get 503 at once rather than the gateway's
/// memory growing with a flood of large bodies.
#[derive(Debug, Clone)]
pub struct QueuedBytes(Arc<tokio::sync::Semaphore>);

impl QueuedBytes {
    pub fn new(max_bytes: usize) -> Self {
        Self(Arc::new(tokio::sync::Semaphore::new(
            max_bytes.clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
        )))
    }

    /// Room for `bytes` until the guard is dropped, or `None` when there is none now.
    fn take(&self, bytes: usize) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let bytes = u32::try_from(bytes.max(1)).unwrap_or(u32::MAX);
        self.0.clone().try_acquire_many_owned(bytes).ok()
    }
}

/// Builds the router. `max_body_bytes` bounds every request body (413 beyond).
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/slack/events", post(slack_events))
        .route("/slack/commands", post(slack_command))
        .route("/webhooks/{endpoint}", post(webhook))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .route_layer(axum::middleware::from_fn_with_state(
            warren_telemetry::http::HttpService {
                metric_prefix: "warren_gateway",
                span: |method, route| warren_telemetry::http_request_span!(method, route),
            },
            warren_telemetry::http::request_span,
        ))
        .with_state(state)
}

pub use listener::{Limits, bind, serve};

/// A refusal, as the sender sees it.
#[derive(Debug)]
pub enum ApiError {
    Unauthorized(VerifyError),
    BadRequest(String),
    NotFound(&'static str),
    Unavailable { retry_after_secs: u64 },
    Internal(&'static str),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match &self {
            Self::Unauthorized(e) => (StatusCode::UNAUTHORIZED, format!("unauthorized: {e}")),
            Self::BadRequest(m) => (StatusCode::BAD_REQUEST, m.clone()),
            Self::NotFound(m) => (StatusCode::NOT_FOUND, (*m).to_owned()),
            Self::Unavailable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily unable to store the event; retry later".to_owned(),
            ),
            Self::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, (*m).to_owned()),
        };
        let mut response = (status, Json(json!({ "error": message }))).into_response();
        if let Self::Unavailable { retry_after_secs } = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, retry_after_secs.into());
        }
        response
    }
}

fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

use warren_telemetry::http::event_traceparent as traceparent;

/// Appends and waits for the commit, within the state's deadline. `body_bytes`: the size of
/// the request it came from, held against [`QueuedBytes`] until the append is answered.
async fn store(
    state: &AppState,
    request: AppendRequest,
    body_bytes: usize,
) -> Result<(), ApiError> {
    let unavailable = ApiError::Unavailable {
        retry_after_secs: state.retry_after_secs,
    };
    let Some(_room) = state.queued_bytes.take(body_bytes) else {
        metrics::counter!("warren_gateway_shed_bytes_total").increment(1);
        warn!(
            body_bytes,
            "the append queue holds its most bytes; answering 503"
        );
        return Err(unavailable);
    };
    match tokio::time::timeout(state.append_timeout, state.appender.append(request)).await {
        Ok(Ok(appended)) => {
            let duplicate = appended.iter().all(|a| a.duplicate);
            info!(
                position = appended.first().map(|a| a.position),
                duplicate, "event stored"
            );
            Ok(())
        }
        // The batch may still commit after we answered; the sender's retry is then a
        // duplicate, answered 200 without a second row.
        Err(_elapsed) => {
            warn!("append timed out; answering 503");
            Err(unavailable)
        }
        Ok(Err(e)) if e.is_unavailable() => {
            warn!(
                error = e.metric_label(),
                "event log unavailable; answering 503"
            );
            Err(unavailable)
        }
        Ok(Err(LogError::InvalidEvent(m))) => Err(ApiError::BadRequest(m)),
        Ok(Err(e)) => {
            warn!(error = %e, "append failed");
            Err(ApiError::Internal("the event could not be stored"))
        }
    }
}

/// Verifies a Slack request's signature (events and commands alike).
fn verify_slack(state: &AppState, headers: &HeaderMap, body: &[u8]) -> Result<(), ApiError> {
    let secret = state
        .slack_signing_secret
        .as_ref()
        .ok_or(ApiError::NotFound(
            "Slack is not configured on this gateway",
        ))?;
    verify::slack(secret.expose().as_bytes(), headers, body, now_unix()).map_err(|e| {
        warn!(reason = %e, "refused a Slack request");
        ApiError::Unauthorized(e)
    })
}

/// A slash command answer: visible only to the person who typed it.
fn ephemeral(text: impl Into<String>) -> Response {
    Json(json!({ "response_type": "ephemeral", "text": text.into() })).into_response()
}

async fn slack_command(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    verify_slack(&state, &headers, &body)?;
    match commands::parse(&body, traceparent(&headers))
        .map_err(|e| ApiError::BadRequest(e.to_string()))?
    {
        Command::Usage => Ok(ephemeral(commands::USAGE)),
        Command::Status => {
            let position =
                sqlx::query_scalar::<_, i64>("SELECT coalesce(max(position), 0) FROM events")
                    .fetch_one(&state.pool);
            match tokio::time::timeout(state.append_timeout, position).await {
                Ok(Ok(p)) => Ok(ephemeral(format!(
                    "Warren is up. The event log holds events up to position {p}."
                ))),
                _ => Ok(ephemeral(
                    "Warren's gateway is up, but its database is not answering.",
                )),
            }
        }
        Command::Ask {
            agent,
            stream,
            event,
        } => {
            store(&state, AppendRequest::new(stream, vec![*event]), body.len()).await?;
            Ok(ephemeral(format!(
                "Asked @{agent}. The answer will be posted in this channel."
            )))
        }
    }
}

async fn slack_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    verify_slack(&state, &headers, &body)?;
    let retry = headers
        .get("x-slack-retry-num")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    match events::parse(&body, traceparent(&headers))
        .map_err(|e| ApiError::BadRequest(e.to_string()))?
    {
        Inbound::Challenge(challenge) => {
            Ok(Json(json!({ "challenge": challenge })).into_response())
        }
        Inbound::Ignore(why) => {
            info!(why, "Slack event ignored");
            Ok(StatusCode::OK.into_response())
        }
        Inbound::Store { stream, events } => {
            info!(%stream, retry = retry.as_deref(), "Slack event");
            store(&state, AppendRequest::new(stream, events), body.len()).await?;
            Ok(StatusCode::OK.into_response())
        }
    }
}

async fn webhook(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let endpoint = state
        .webhooks
        .get(&name)
        .ok_or(ApiError::NotFound("unknown webhook endpoint"))?;
    let endpoint = &endpoint;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let request = webhook::accept(
        endpoint,
        &headers,
        content_type,
        &body,
        now_unix(),
        traceparent(&headers),
    )
    .map_err(|r| match r {
        Refusal::Signature(VerifyError::BadSecret) => {
            warn!(endpoint = %name, "the configured secret is not valid for its scheme");
            ApiError::Internal("the endpoint is misconfigured")
        }
        Refusal::Signature(e) => {
            warn!(endpoint = %name, reason = %e, "refused a webhook delivery");
            ApiError::Unauthorized(e)
        }
        Refusal::Malformed(m) => ApiError::BadRequest(m),
    })?;
    store(&state, request, body.len()).await?;
    Ok(StatusCode::OK.into_response())
}

async fn readyz(State(state): State<AppState>) -> Response {
    let ping = sqlx::query("SELECT 1").execute(&state.pool);
    match tokio::time::timeout(Duration::from_secs(1), ping).await {
        Ok(Ok(_)) => "ready".into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "database unreachable").into_response(),
    }
}
