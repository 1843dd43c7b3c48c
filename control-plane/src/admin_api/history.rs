//! Questions about the past, answered from the log: `/v1/explain` (why did this happen?),
//! `/v1/as-of` (what was configured and running then?), `/v1/what-if` (which decisions
//! would another policy have made?).

use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;
use warren_schema::{EventId, RecordedEvent};

use super::agents::Agent;
use super::auth::{Authorized, ViewerRole};
use super::events::Event;
use super::extract::{Body, Query};
use super::problem::{ApiError, ApiResult};
use super::routes::Route;
use super::view::View;
use super::workspaces::Workspace;
use super::{Api, agents, routes, workspaces};
use crate::decide::Policy;
use crate::what_if::Replay;

/// A causal chain, root cause first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Explanation {
    pub chain: Vec<Event>,
}

/// Why an event happened: its causes, back to the message or request that started it.
#[utoipa::path(get, path = "/v1/explain/events/{id}", tag = "history", operation_id = "explain_event",
    security(("token" = ["viewer"])), params(("id" = Uuid, Path, description = "Event id")),
    responses((status = 200, description = "The chain, root cause first", body = Explanation),
              (status = 404, description = "No such event", body = super::problem::Problem)))]
pub async fn explain_event(
    _: Authorized<ViewerRole>,
    State(api): State<Api>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Explanation>> {
    let id = Uuid::parse_str(&id)
        .map_err(|_| ApiError::BadRequest(format!("{id:?} is not an event id (a UUID)")))?;
    let chain = crate::explain::event(&api.log, EventId(id))
        .await
        .map_err(internal)?;
    if chain.is_empty() {
        return Err(ApiError::NotFound(format!("no event {id}")));
    }
    Ok(axum::Json(Explanation {
        chain: chain.into_iter().map(Event::from).collect(),
    }))
}

/// Why a workspace runs: its latest start decision's causes, and what the backend observed
/// of the pod or process that decision made.
#[utoipa::path(get, path = "/v1/explain/workspaces/{name}", tag = "history",
    operation_id = "explain_workspace", security(("token" = ["viewer"])),
    params(("name" = String, Path, description = "Workspace name")),
    responses((status = 200, description = "The chain, root cause first", body = Explanation),
              (status = 404, description = "Never started", body = super::problem::Problem)))]
pub async fn explain_workspace(
    _: Authorized<ViewerRole>,
    State(api): State<Api>,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<Explanation>> {
    let chain = crate::explain::workspace(&api.log, &name)
        .await
        .map_err(internal)?;
    if chain.is_empty() {
        return Err(ApiError::NotFound(format!(
            "workspace {name:?} was never started"
        )));
    }
    Ok(axum::Json(Explanation {
        chain: chain.into_iter().map(Event::from).collect(),
    }))
}

fn internal(e: crate::error::Error) -> ApiError {
    match e {
        crate::error::Error::Log(e) => e.into(),
        e => ApiError::Internal(Box::new(e)),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AsOfParams {
    /// The log position to stop at (inclusive).
    pub position: Option<i64>,
    /// Or an instant (RFC 3339): the last event recorded at or before it.
    pub at: Option<DateTime<Utc>>,
}

/// The configuration and the workspaces as the log had them at a position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AsOf {
    /// The last position folded.
    pub position: i64,
    /// When that event was recorded.
    pub recorded_at: Option<DateTime<Utc>>,
    pub agents: Vec<Agent>,
    pub routes: Vec<Route>,
    pub workspaces: Vec<Workspace>,
}

/// Takes one of the few replay slots (each replay reads the log from the start).
fn replay_slot(api: &Api) -> ApiResult<tokio::sync::OwnedSemaphorePermit> {
    api.replays.clone().try_acquire_owned().map_err(|_| {
        ApiError::Unavailable("other history replays are running; retry shortly".into())
    })
}

/// The projected agents, routes and workspaces as they were at a position or instant.
#[utoipa::path(get, path = "/v1/as-of", tag = "history", operation_id = "as_of",
    security(("token" = ["viewer"])), params(AsOfParams),
    responses((status = 200, description = "The state then", body = AsOf),
              (status = 503, description = "Too many replays at once", body = super::problem::Problem)))]
pub async fn as_of(
    _: Authorized<ViewerRole>,
    State(api): State<Api>,
    Query(params): Query<AsOfParams>,
) -> ApiResult<axum::Json<AsOf>> {
    let position = match (params.position, params.at) {
        (Some(p), None) if p >= 0 => p,
        (None, Some(at)) => api.log.position_at(at).await?,
        _ => {
            return Err(ApiError::BadRequest(
                "give one of position (>= 0) or at (RFC 3339)".into(),
            ));
        }
    };
    let _slot = replay_slot(&api)?;
    let view = View::replay(&api.log, position).await?;
    let recorded_at = match view.state.position {
        0 => None,
        p => api
            .log
            .read_positions(p - 1, p, 1)
            .await?
            .first()
            .map(|e| e.recorded_at),
    };
    Ok(axum::Json(AsOf {
        position: view.state.position,
        recorded_at,
        agents: view
            .state
            .agents
            .values()
            .map(|a| agents::agent_of(&view, a))
            .collect(),
        routes: view
            .state
            .routes
            .iter()
            .map(|(r, a)| routes::route_of(&view, r, a))
            .collect(),
        workspaces: workspaces::names(&view)
            .keys()
            .filter_map(|n| workspaces::workspace_of(&view, n))
            .collect(),
    }))
}

/// `null` (no cap) told apart from absent (as in force).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// The policy to replay under: each field absent keeps the value in force; a cap set to
/// `null` is no cap.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WhatIf {
    /// Replay the events after this position (default 0: from the start).
    #[serde(default)]
    pub after: i64,
    /// ... up to this position (default: the log's end).
    pub up_to: Option<i64>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u64>)]
    pub max_running: Option<Option<usize>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u64>)]
    pub max_running_per_team: Option<Option<usize>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u64>)]
    pub max_running_per_channel: Option<Option<usize>>,
    pub max_restarts: Option<u32>,
    pub mention_max_depth: Option<usize>,
    pub mention_max_per_window: Option<usize>,
    pub mention_window_secs: Option<u32>,
    /// Every agent's idle timeout, in place of the configured ones.
    pub idle_timeout_secs: Option<u64>,
}

impl WhatIf {
    fn policy(&self, base: &Policy) -> Policy {
        let mut p = base.clone();
        if let Some(v) = self.max_running {
            p.max_running = v;
        }
        if let Some(v) = self.max_running_per_team {
            p.max_running_per_team = v;
        }
        if let Some(v) = self.max_running_per_channel {
            p.max_running_per_channel = v;
        }
        if let Some(v) = self.max_restarts {
            p.max_restarts = v;
        }
        if let Some(v) = self.mention_max_depth {
            p.mention_max_depth = v;
        }
        if let Some(v) = self.mention_max_per_window {
            p.mention_max_per_window = v;
        }
        if let Some(v) = self.mention_window_secs {
            p.mention_window = chrono::TimeDelta::seconds(i64::from(v));
        }
        p
    }
}

/// A decision, made or not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Decision {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub event_type: String,
    #[schema(value_type = Object)]
    pub payload: Value,
    /// The event it follows from.
    pub cause: Option<Uuid>,
}

/// Which decisions the changed policy would have made differently.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WhatIfResult {
    /// The stretch replayed.
    pub after: i64,
    pub up_to: i64,
    /// Outside facts fed to the decisions.
    pub replayed_events: usize,
    /// Decisions both made.
    pub same: usize,
    /// Would have been made, and were not.
    pub would_decide: Vec<Decision>,
    /// Were made, and would not have been.
    pub would_not_decide: Vec<Decision>,
}

/// Replay a stretch of history under a changed policy (caps, mention limits, idle
/// timeouts), writing nothing, and list the decisions that would differ.
#[utoipa::path(post, path = "/v1/what-if", tag = "history", operation_id = "what_if",
    security(("token" = ["viewer"])), request_body = WhatIf,
    responses((status = 200, description = "The differences", body = WhatIfResult),
              (status = 503, description = "Too many replays at once", body = super::problem::Problem)))]
pub async fn what_if(
    _: Authorized<ViewerRole>,
    State(api): State<Api>,
    Body(request): Body<WhatIf>,
) -> ApiResult<axum::Json<WhatIfResult>> {
    let up_to = match request.up_to {
        Some(p) => p,
        None => api.log.head().await?,
    };
    if request.after < 0 || up_to < request.after {
        return Err(ApiError::BadRequest("0 <= after <= up_to".into()));
    }
    let _slot = replay_slot(&api)?;
    let start = View::replay(&api.log, request.after).await?.state;
    let quotas = [
        ("total", request.max_running),
        ("team", request.max_running_per_team),
        ("channel", request.max_running_per_channel),
    ]
    .into_iter()
    .filter_map(|(scope, cap)| cap.map(|cap| (scope.to_owned(), cap)))
    .collect();
    let recorded = crate::what_if::recorded_ids(&api.log, request.after, up_to).await?;
    let replay = Replay::new(
        start,
        request.policy(&api.policy),
        request.idle_timeout_secs,
        quotas,
        recorded,
    );
    let replay = crate::what_if::replay_range(&api.log, replay, request.after, up_to).await?;
    let replayed_events = replay.replayed;
    let d = replay.finish();
    let made = |e: &warren_schema::NewEvent| Decision {
        id: e.id.0,
        event_type: e.event_type.clone(),
        payload: e.payload.clone(),
        cause: e.metadata.causation_id.map(|c| c.0),
    };
    let recorded = |e: &RecordedEvent| Decision {
        id: e.id.0,
        event_type: e.event_type.clone(),
        payload: e.payload.clone(),
        cause: e.metadata.causation_id.map(|c| c.0),
    };
    Ok(axum::Json(WhatIfResult {
        after: request.after,
        up_to,
        replayed_events,
        same: d.same,
        would_decide: d.only_new.iter().map(made).collect(),
        would_not_decide: d.only_recorded.iter().map(recorded).collect(),
    }))
}
