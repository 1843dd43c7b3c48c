//! `/v1/events`: the log itself, filtered and paged, one event by id, new events followed as
//! Server-Sent Events; `/v1/audit`: the changes operators made.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use chrono::{DateTime, Utc};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;
use warren_schema::event_log::EventFilter;
use warren_schema::{EventId, RecordedEvent};

use super::auth::{Authorized, Role, ViewerRole};
use super::extract::{Query, decode_cursor, encode_cursor, limit};
use super::problem::{ApiError, ApiResult};
use super::{Api, Page};

/// An event as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Global position: the log's order.
    pub position: i64,
    pub id: Uuid,
    pub stream: String,
    pub stream_version: i64,
    /// `message.received`, `workspace.start_requested`, ...
    #[serde(rename = "type")]
    pub event_type: String,
    pub type_version: i16,
    #[schema(value_type = Object)]
    pub payload: Value,
    pub traceparent: Option<String>,
    /// The conversation it belongs to.
    pub correlation_id: Option<Uuid>,
    /// The event that caused it.
    pub causation_id: Option<Uuid>,
    pub source: String,
    pub actor: Option<String>,
    pub received_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
}

impl From<RecordedEvent> for Event {
    fn from(e: RecordedEvent) -> Self {
        Self {
            position: e.position,
            id: e.id.0,
            stream: e.stream,
            stream_version: e.stream_version,
            event_type: e.event_type,
            type_version: e.event_version,
            payload: e.payload,
            traceparent: e.metadata.traceparent,
            correlation_id: e.metadata.correlation_id.map(|c| c.0),
            causation_id: e.metadata.causation_id.map(|c| c.0),
            source: e.metadata.source,
            actor: e.metadata.actor,
            received_at: e.metadata.received_at,
            recorded_at: e.recorded_at,
        }
    }
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventParams {
    /// Items per page (1-1000, default 100).
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Only positions above this.
    pub after: Option<i64>,
    /// Only positions at or below this.
    pub up_to: Option<i64>,
    /// Recorded at or after this instant (RFC 3339).
    pub since: Option<DateTime<Utc>>,
    /// Recorded before this instant (RFC 3339).
    pub until: Option<DateTime<Utc>>,
    pub stream: Option<String>,
    /// Event types, comma-separated (`message.received,message.routed`).
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub event_type: Option<String>,
    /// A conversation: its first event's id.
    pub correlation: Option<Uuid>,
    /// A W3C trace id (32 hex digits).
    pub trace_id: Option<String>,
}

impl EventParams {
    fn filter(&self) -> ApiResult<EventFilter> {
        let cursor = decode_cursor(self.cursor.as_deref())?
            .map(|c| {
                c.parse::<i64>().map_err(|_| {
                    ApiError::BadRequest("cursor: use a next_cursor this API returned".into())
                })
            })
            .transpose()?;
        if let Some(trace) = &self.trace_id
            && (trace.len() != 32 || !trace.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(ApiError::BadRequest(
                "trace_id: 32 hexadecimal digits".into(),
            ));
        }
        Ok(EventFilter {
            // The later of the two: a cursor never goes back before `after`.
            after: cursor.max(self.after),
            up_to: self.up_to,
            stream: self.stream.clone(),
            types: self
                .event_type
                .iter()
                .flat_map(|t| t.split(','))
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty())
                .collect(),
            since: self.since,
            until: self.until,
            correlation: self.correlation.map(EventId),
            trace_id: self.trace_id.as_ref().map(|t| t.to_ascii_lowercase()),
            audit: false,
        })
    }
}

/// One page of `filter`, with the cursor of the next.
async fn page(
    api: &Api,
    filter: &EventFilter,
    limit: usize,
) -> ApiResult<(Vec<RecordedEvent>, Option<String>)> {
    let mut events = api.log.query(filter, limit as i64 + 1).await?;
    let next = if events.len() > limit {
        events.truncate(limit);
        events
            .last()
            .map(|e| encode_cursor(&e.position.to_string()))
    } else {
        None
    };
    Ok((events, next))
}

/// List events in log order, filtered.
#[utoipa::path(get, path = "/v1/events", tag = "events", operation_id = "list_events",
    security(("token" = ["viewer"])), params(EventParams),
    responses((status = 200, description = "A page of events", body = Page<Event>)))]
pub async fn list(
    _: Authorized<ViewerRole>,
    State(api): State<Api>,
    Query(params): Query<EventParams>,
) -> ApiResult<axum::Json<Page<Event>>> {
    let limit = limit(params.limit)?;
    let (events, next_cursor) = page(&api, &params.filter()?, limit).await?;
    Ok(axum::Json(Page {
        items: events.into_iter().map(Event::from).collect(),
        next_cursor,
    }))
}

/// One event.
#[utoipa::path(get, path = "/v1/events/{id}", tag = "events", operation_id = "get_event",
    security(("token" = ["viewer"])), params(("id" = Uuid, Path, description = "Event id")),
    responses((status = 200, description = "The event", body = Event),
              (status = 404, description = "No such event", body = super::problem::Problem)))]
pub async fn get(
    _: Authorized<ViewerRole>,
    State(api): State<Api>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Event>> {
    let id = Uuid::parse_str(&id)
        .map_err(|_| ApiError::BadRequest(format!("{id:?} is not an event id (a UUID)")))?;
    api.log
        .get(EventId(id))
        .await?
        .map(|e| axum::Json(e.into()))
        .ok_or_else(|| ApiError::NotFound(format!("no event {id}")))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FollowParams {
    /// Start after this position (default: the current end; `Last-Event-ID` wins).
    pub after: Option<i64>,
    /// Event types, comma-separated.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub event_type: Option<String>,
}

/// One Server-Sent Event of `/v1/events/stream`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EventFrame {
    /// The event's position (what `Last-Event-ID` resumes after).
    pub id: String,
    /// The event's type.
    pub event: String,
    /// The event as JSON, as `GET /v1/events/{id}` gives it.
    pub data: String,
}

/// Most followers at once (each holds a little memory and, while catching up, reads pages
/// of the log).
pub const MAX_FOLLOWERS: usize = 256;

/// Follow new events as Server-Sent Events (`event: {type}`, `id: {position}`,
/// `data: {event}`), in log order with none skipped. A client that reconnects with
/// `Last-Event-ID` resumes after it.
#[utoipa::path(get, path = "/v1/events/stream", tag = "events", operation_id = "follow_events",
    security(("token" = ["viewer"])),
    params(FollowParams,
           ("Last-Event-ID" = Option<String>, Header, description = "Resume after this position")),
    responses((status = 200, content_type = "text/event-stream", body = EventFrame,
               description = "Server-Sent Events, one per event (see EventFrame)"),
              (status = 503, description = "Too many followers", body = super::problem::Problem)))]
pub async fn follow(
    _: Authorized<ViewerRole>,
    State(api): State<Api>,
    headers: HeaderMap,
    Query(params): Query<FollowParams>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let permit = api.followers.clone().try_acquire_owned().map_err(|_| {
        ApiError::Unavailable(format!("{MAX_FOLLOWERS} followers already; retry later"))
    })?;
    let resume = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .ok_or_else(|| {
                    ApiError::BadRequest("Last-Event-ID: a position this stream sent".into())
                })
        })
        .transpose()?;
    // Live batches from before the history read on, so none is missed between the two.
    let live = api.view.batches();
    let from = match resume.or(params.after) {
        Some(p) => p,
        None => api.view.position(),
    };
    let types: Arc<Vec<String>> = Arc::new(
        params
            .event_type
            .iter()
            .flat_map(|t| t.split(','))
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect(),
    );
    let follower = Follower {
        api,
        cursor: from,
        pending: Default::default(),
        live,
        types,
        _permit: permit,
    };
    let stream = futures_util::stream::unfold(follower, |mut f| async move {
        f.next().await.map(|e| (Ok(sse_event(e)), f))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// One `/v1/events/stream` client: reads history from the log until it reaches the view,
/// then takes the view's live batches. No database connection is held while it waits.
struct Follower {
    api: Api,
    /// The highest position examined (sent or filtered out).
    cursor: i64,
    pending: std::collections::VecDeque<RecordedEvent>,
    live: tokio::sync::broadcast::Receiver<super::view::Batch>,
    types: Arc<Vec<String>>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Follower {
    fn wanted(&self, e: &RecordedEvent) -> bool {
        self.types.is_empty() || self.types.contains(&e.event_type)
    }

    /// The next event, in log order; `None` when the stream must end.
    async fn next(&mut self) -> Option<RecordedEvent> {
        use tokio::sync::broadcast::error::RecvError;
        const PAGE: i64 = 1000;
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            // Behind the view: read the log up to where the view is (gap-free there).
            let head = self.api.view.position();
            if self.cursor < head {
                let page = match self.api.log.read_positions(self.cursor, head, PAGE).await {
                    Ok(page) => page,
                    Err(e) => {
                        tracing::warn!(error = %e, "following the log failed; ending the stream");
                        return None;
                    }
                };
                self.cursor = match page.last() {
                    Some(last) if page.len() as i64 == PAGE => last.position,
                    _ => head,
                };
                let wanted: Vec<RecordedEvent> =
                    page.into_iter().filter(|e| self.wanted(e)).collect();
                self.pending.extend(wanted);
                continue;
            }
            match self.live.recv().await {
                Ok(batch) => {
                    for e in batch.iter() {
                        if e.position <= self.cursor {
                            continue;
                        }
                        self.cursor = e.position;
                        if self.wanted(e) {
                            self.pending.push_back(e.clone());
                        }
                    }
                }
                // Fell behind the broadcast: the log has what was dropped.
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

fn sse_event(event: RecordedEvent) -> SseEvent {
    let position = event.position;
    let kind = event.event_type.clone();
    SseEvent::default()
        .id(position.to_string())
        .event(kind)
        .json_data(Event::from(event))
        .unwrap_or_else(|_| {
            SseEvent::default()
                .id(position.to_string())
                .comment("unencodable")
        })
}

/// A change an operator made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    pub position: i64,
    pub id: Uuid,
    pub recorded_at: DateTime<Utc>,
    /// `agent.configured`, `route.removed`, `token.issued`, ...
    #[serde(rename = "type")]
    pub event_type: String,
    /// `token` (the admin API), `agents_file` (the declarative file) or `bootstrap`.
    pub via: String,
    /// The token that made it (admin API).
    pub token_id: Option<String>,
    /// The role the token had.
    pub role: Option<Role>,
    #[schema(value_type = Object)]
    pub payload: Value,
}

impl From<RecordedEvent> for AuditEntry {
    fn from(e: RecordedEvent) -> Self {
        let actor = e.metadata.actor.as_deref().unwrap_or_default();
        let (via, token_id, role) = match super::Caller::from_actor(actor) {
            Some((id, role)) => ("token", Some(id.to_owned()), role),
            None if e.metadata.source == super::SOURCE => (actor, None, None),
            None => ("agents_file", None, None),
        };
        Self {
            position: e.position,
            id: e.id.0,
            recorded_at: e.recorded_at,
            event_type: e.event_type,
            via: via.to_owned(),
            token_id,
            role,
            payload: e.payload,
        }
    }
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// Items per page (1-1000, default 100).
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Recorded at or after this instant (RFC 3339).
    pub since: Option<DateTime<Utc>>,
    /// Recorded before this instant (RFC 3339).
    pub until: Option<DateTime<Utc>>,
}

/// The audit trail: every change made through the API or the agents file, oldest first,
/// with the token and role that made it.
#[utoipa::path(get, path = "/v1/audit", tag = "audit", operation_id = "list_audit",
    security(("token" = ["viewer"])), params(AuditParams),
    responses((status = 200, description = "A page of changes", body = Page<AuditEntry>)))]
pub async fn audit(
    _: Authorized<ViewerRole>,
    State(api): State<Api>,
    Query(params): Query<AuditParams>,
) -> ApiResult<axum::Json<Page<AuditEntry>>> {
    let limit = limit(params.limit)?;
    let filter = EventParams {
        cursor: params.cursor,
        since: params.since,
        until: params.until,
        ..EventParams::default()
    }
    .filter()?;
    let (events, next_cursor) = page(
        &api,
        &EventFilter {
            audit: true,
            ..filter
        },
        limit,
    )
    .await?;
    Ok(axum::Json(Page {
        items: events.into_iter().map(AuditEntry::from).collect(),
        next_cursor,
    }))
}
