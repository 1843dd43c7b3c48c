//! `/v1/workspaces`: what the decisions want for each workspace, what its backend last
//! reported, and where it waits in the admission queue.

use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::{AdminRole, Authorized, OperatorRole, ViewerRole};
use super::extract::{Query, limit, page_of};
use super::problem::{ApiError, ApiResult};
use super::view::View;
use super::{Api, Page};

/// What the backend last reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ObservedState {
    /// `starting`, `ready`, `exited`, `failed` or `gone`.
    pub phase: String,
    /// `kubernetes` or `local`.
    pub backend: String,
    /// The pod's name or the process id.
    pub instance: Option<String>,
    pub detail: Option<String>,
    pub at: DateTime<Utc>,
}

/// A workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Workspace {
    pub name: String,
    /// Where the decisions have it: `stopped`, `queued`, `starting`, `ready`, `stopping`,
    /// `backing_off` or `failed`.
    pub phase: String,
    /// Whether the decisions want it running.
    pub desired_running: bool,
    pub observed: Option<ObservedState>,
    /// What idleness counts from.
    pub last_activity: Option<DateTime<Utc>>,
    /// Its place in the admission queue (0: next), when queued.
    pub queue_position: Option<usize>,
    /// Failed starts since it was last ready.
    pub failures: u32,
    /// Its agents, in name order.
    pub agents: Vec<String>,
}

pub(crate) fn workspace_of(view: &View, name: &str) -> Option<Workspace> {
    let decided = view.state.workspaces.get(name);
    let agents: Vec<String> = view
        .state
        .agents
        .values()
        .filter(|a| a.workspace == name)
        .map(|a| a.name.clone())
        .collect();
    if decided.is_none() && agents.is_empty() {
        return None;
    }
    let phase = decided.map_or(crate::decide::Phase::Stopped, |w| w.phase);
    Some(Workspace {
        name: name.to_owned(),
        phase: phase.name().to_owned(),
        desired_running: phase.occupies_slot() && phase != crate::decide::Phase::Stopping,
        observed: view.observed.get(name).map(|o| ObservedState {
            phase: serde_json::to_value(o.phase)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            backend: o.backend.clone(),
            instance: o.instance.clone(),
            detail: o.detail.clone(),
            at: o.at,
        }),
        last_activity: decided.map(|w| w.last_activity),
        queue_position: view.state.queue.iter().position(|q| q.workspace == name),
        failures: decided.map_or(0, |w| w.failures),
        agents,
    })
}

/// Every workspace name: those a decision named and those only agents name.
pub(crate) fn names(view: &View) -> std::collections::BTreeMap<String, ()> {
    view.state
        .workspaces
        .keys()
        .cloned()
        .chain(view.state.agents.values().map(|a| a.workspace.clone()))
        .map(|n| (n, ()))
        .collect()
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Items per page (1-1000, default 100).
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Only workspaces in this phase.
    pub phase: Option<String>,
}

/// List workspaces (every workspace an agent lives in or a decision named), in name order.
#[utoipa::path(get, path = "/v1/workspaces", tag = "workspaces", operation_id = "list_workspaces",
    security(("token" = ["viewer"])), params(ListParams),
    responses((status = 200, description = "A page of workspaces", body = Page<Workspace>)))]
pub async fn list(
    _: Authorized<ViewerRole>,
    State(api): State<Api>,
    Query(params): Query<ListParams>,
) -> ApiResult<axum::Json<Page<Workspace>>> {
    let limit = limit(params.limit)?;
    let view = api.view.read();
    page_of(&names(&view), params.cursor.as_deref(), limit, |name, _| {
        workspace_of(&view, name).filter(|w| params.phase.as_ref().is_none_or(|p| &w.phase == p))
    })
    .map(axum::Json)
}

/// One workspace.
#[utoipa::path(get, path = "/v1/workspaces/{name}", tag = "workspaces", operation_id = "get_workspace",
    security(("token" = ["viewer"])), params(("name" = String, Path, description = "Workspace name")),
    responses((status = 200, description = "The workspace", body = Workspace),
              (status = 404, description = "No such workspace", body = super::problem::Problem)))]
pub async fn get(
    _: Authorized<ViewerRole>,
    State(api): State<Api>,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<Workspace>> {
    let view = api.view.read();
    workspace_of(&view, &name)
        .map(axum::Json)
        .ok_or_else(|| ApiError::NotFound(format!("no workspace {name:?}")))
}

/// An operator's request, accepted: the leader decides on it as it follows the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ActionAccepted {
    /// The `workspace.action_requested` event: the cause the start or stop decision names.
    pub request_id: uuid::Uuid,
    pub position: i64,
    pub workspace: String,
    pub action: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ActionParams {
    /// A note for the log (why).
    pub reason: Option<String>,
}

/// Records an operator's start or stop, once the view says it would change something.
async fn act(
    api: &Api,
    caller: &super::Caller,
    name: &str,
    action: &str,
    reason: Option<String>,
) -> ApiResult<(axum::http::StatusCode, axum::Json<ActionAccepted>)> {
    use crate::decide::Phase;
    use warren_schema::events::WorkspaceActionRequested;
    if reason.as_ref().is_some_and(|r| r.chars().count() > 500) {
        return Err(ApiError::BadRequest(
            "reason: at most 500 characters".into(),
        ));
    }
    {
        let view = api.view.read();
        let workspace = workspace_of(&view, name)
            .ok_or_else(|| ApiError::NotFound(format!("no workspace {name:?}")))?;
        let phase = view
            .state
            .workspaces
            .get(name)
            .map_or(Phase::Stopped, |w| w.phase);
        match action {
            "delete" if !workspace.agents.is_empty() => {
                return Err(ApiError::Conflict(format!(
                    "workspace {name:?} hosts {}: delete the agents or move them to another \
                     workspace first",
                    workspace.agents.join(", ")
                )));
            }
            "start" if workspace.agents.is_empty() => {
                return Err(ApiError::Conflict(format!(
                    "workspace {name:?} hosts no agent; nothing would run in it"
                )));
            }
            "start" if !matches!(phase, Phase::Stopped | Phase::Stopping | Phase::Failed) => {
                return Err(ApiError::Conflict(format!(
                    "workspace {name:?} is {} already",
                    phase.name()
                )));
            }
            "restart" if !matches!(phase, Phase::Starting | Phase::Ready | Phase::BackingOff) => {
                return Err(ApiError::Conflict(format!(
                    "workspace {name:?} is {}; start it instead",
                    phase.name()
                )));
            }
            "stop"
                if !matches!(
                    phase,
                    Phase::Starting | Phase::Ready | Phase::BackingOff | Phase::Queued
                ) =>
            {
                return Err(ApiError::Conflict(format!(
                    "workspace {name:?} is {}; there is nothing to stop",
                    phase.name()
                )));
            }
            _ => {}
        }
    }
    let request = WorkspaceActionRequested {
        workspace: name.to_owned(),
        action: action.to_owned(),
        reason,
    };
    let mut metadata = warren_schema::Metadata::new(super::SOURCE);
    metadata.actor = Some(caller.actor());
    metadata.traceparent = warren_telemetry::current_traceparent();
    let event =
        warren_schema::NewEvent::from_domain(warren_schema::EventId::random(), &request, metadata)
            .map_err(|e| ApiError::Internal(e.into()))?;
    let id = event.id;
    let appended = api
        .log
        .append(&warren_schema::AppendRequest::new(
            format!("workspace-actions:{name}"),
            vec![event],
        ))
        .await?;
    let position = appended.first().map_or(0, |a| a.position);
    api.view.wait_for(position).await;
    Ok((
        axum::http::StatusCode::ACCEPTED,
        axum::Json(ActionAccepted {
            request_id: id.0,
            position,
            workspace: name.to_owned(),
            action: action.to_owned(),
        }),
    ))
}

/// Start a workspace now (it passes the admission caps like any start, and may queue).
#[utoipa::path(post, path = "/v1/workspaces/{name}/start", tag = "workspaces",
    operation_id = "start_workspace", security(("token" = ["operator"])),
    params(("name" = String, Path, description = "Workspace name"), ActionParams),
    responses((status = 202, description = "Recorded; the leader decides on it", body = ActionAccepted),
              (status = 404, description = "No such workspace", body = super::problem::Problem),
              (status = 409, description = "Running already, or hosts no agent", body = super::problem::Problem)))]
pub async fn start(
    Authorized(caller, _): Authorized<OperatorRole>,
    State(api): State<Api>,
    Path(name): Path<String>,
    Query(params): Query<ActionParams>,
) -> ApiResult<(axum::http::StatusCode, axum::Json<ActionAccepted>)> {
    act(&api, &caller, &name, "start", params.reason).await
}

/// Restart a running workspace: stopped now, started again once its instance is gone (a new
/// pod or process, with the agents' current settings).
#[utoipa::path(post, path = "/v1/workspaces/{name}/restart", tag = "workspaces",
    operation_id = "restart_workspace", security(("token" = ["operator"])),
    params(("name" = String, Path, description = "Workspace name"), ActionParams),
    responses((status = 202, description = "Recorded; the leader decides on it", body = ActionAccepted),
              (status = 404, description = "No such workspace", body = super::problem::Problem),
              (status = 409, description = "Not running", body = super::problem::Problem)))]
pub async fn restart(
    Authorized(caller, _): Authorized<OperatorRole>,
    State(api): State<Api>,
    Path(name): Path<String>,
    Query(params): Query<ActionParams>,
) -> ApiResult<(axum::http::StatusCode, axum::Json<ActionAccepted>)> {
    act(&api, &caller, &name, "restart", params.reason).await
}

/// Stop a workspace (its files stay; the next message wakes it again).
#[utoipa::path(post, path = "/v1/workspaces/{name}/stop", tag = "workspaces",
    operation_id = "stop_workspace", security(("token" = ["operator"])),
    params(("name" = String, Path, description = "Workspace name"), ActionParams),
    responses((status = 202, description = "Recorded; the leader decides on it", body = ActionAccepted),
              (status = 404, description = "No such workspace", body = super::problem::Problem),
              (status = 409, description = "Not running", body = super::problem::Problem)))]
pub async fn stop(
    Authorized(caller, _): Authorized<OperatorRole>,
    State(api): State<Api>,
    Path(name): Path<String>,
    Query(params): Query<ActionParams>,
) -> ApiResult<(axum::http::StatusCode, axum::Json<ActionAccepted>)> {
    act(&api, &caller, &name, "stop", params.reason).await
}

/// Delete a workspace that hosts no agent: it is stopped if it runs (its pod or process and
/// its credentials go), then it leaves the lists and the read models. Its files on the
/// shared volume and its memory bucket are kept (the bucket can be restored from the log
/// anyway); remove them by hand if they must go.
#[utoipa::path(delete, path = "/v1/workspaces/{name}", tag = "workspaces",
    operation_id = "delete_workspace", security(("token" = ["admin"])),
    params(("name" = String, Path, description = "Workspace name"), ActionParams),
    responses((status = 202, description = "Recorded; the leader stops it and forgets it", body = ActionAccepted),
              (status = 404, description = "No such workspace", body = super::problem::Problem),
              (status = 409, description = "It still hosts agents", body = super::problem::Problem)))]
pub async fn delete(
    Authorized(caller, _): Authorized<AdminRole>,
    State(api): State<Api>,
    Path(name): Path<String>,
    Query(params): Query<ActionParams>,
) -> ApiResult<(axum::http::StatusCode, axum::Json<ActionAccepted>)> {
    act(
        &api,
        &caller,
        &name,
        crate::decide::state::DELETE,
        params.reason,
    )
    .await
}

/// A start waiting for capacity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct QueuedStart {
    /// 0: next.
    pub position: usize,
    pub workspace: String,
    pub team: Option<String>,
    pub channel: Option<String>,
    /// The `workspace.start_queued` decision.
    pub queued_by: uuid::Uuid,
}

/// The admission queue, in order (fair across teams when capacity frees).
#[utoipa::path(get, path = "/v1/queue", tag = "workspaces", operation_id = "admission_queue",
    security(("token" = ["viewer"])),
    responses((status = 200, description = "Starts waiting for capacity", body = Vec<QueuedStart>)))]
pub async fn queue(
    _: Authorized<ViewerRole>,
    State(api): State<Api>,
) -> axum::Json<Vec<QueuedStart>> {
    let view = api.view.read();
    axum::Json(
        view.state
            .queue
            .iter()
            .enumerate()
            .map(|(position, q)| QueuedStart {
                position,
                workspace: q.workspace.clone(),
                team: q.team.clone(),
                channel: q.channel.clone(),
                queued_by: q.queued_by.0,
            })
            .collect(),
    )
}
