//! `/v1/agents`: what each agent is (driver, model, prompt, tools, allowed keys, pod
//! resources, who may address it: all in `settings`) and where it lives.
//!
//! A change is checked exactly as the agents file is ([`crate::config_file::validate`]),
//! against the whole configuration it would produce, so the API cannot record what the file
//! would refuse.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use warren_schema::events::{AgentConfigured, AgentRemoved, DomainEvent};

use super::auth::{AdminRole, Authorized, ViewerRole};
use super::extract::{Body, Query, limit, page_of};
use super::problem::{ApiError, ApiResult};
use super::view::View;
use super::{Api, ConfigChange, Page, check_if_match, idempotent_id, if_match, with_etag};
use crate::config_file::{AgentEntry, ConfigFile};

/// An agent as configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Agent {
    /// A DNS label: 1-63 lowercase letters, digits and '-'.
    pub name: String,
    /// The workspace it lives in (agents of one workspace share a runtime and files).
    pub workspace: String,
    /// `echo`, `command`, `anthropic` or `openai`.
    pub driver: String,
    /// Driver settings: `model`, `system_prompt`, `tools`, `allowed_keys`, `pod`
    /// (resources, image, runtime class), `access` (channels, users, endpoints), ...
    #[schema(value_type = Object)]
    pub settings: Value,
    /// Seconds without activity before its workspace may be stopped.
    pub idle_timeout_secs: u64,
    /// The configuration version of its last change (also its `ETag`).
    pub version: i64,
}

/// A new agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAgent {
    pub name: String,
    pub workspace: String,
    #[serde(default = "default_driver")]
    pub driver: String,
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub settings: Value,
    #[serde(default = "default_idle")]
    pub idle_timeout_secs: u64,
}

/// An agent's new settings (all of them: a replace, not a patch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    pub workspace: String,
    #[serde(default = "default_driver")]
    pub driver: String,
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub settings: Value,
    #[serde(default = "default_idle")]
    pub idle_timeout_secs: u64,
}

fn default_driver() -> String {
    "echo".into()
}
fn empty_object() -> Value {
    Value::Object(Default::default())
}
fn default_idle() -> u64 {
    900
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Items per page (1-1000, default 100).
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Only the agents of this workspace.
    pub workspace: Option<String>,
}

pub(crate) fn agent_of(view: &View, a: &crate::decide::Agent) -> Agent {
    Agent {
        name: a.name.clone(),
        workspace: a.workspace.clone(),
        driver: a.driver.clone(),
        settings: a.settings.clone(),
        idle_timeout_secs: a.idle_timeout_secs,
        version: view.agent_versions.get(&a.name).copied().unwrap_or(0),
    }
}

/// The configuration as it would be with `agent` set (or removed, when `None`), checked as
/// the agents file is.
fn check_configuration(view: &View, name: &str, agent: Option<&AgentConfigured>) -> ApiResult<()> {
    let mut file = ConfigFile {
        agents: view
            .state
            .agents
            .values()
            .filter(|a| a.name != name)
            .map(|a| AgentEntry {
                name: a.name.clone(),
                workspace: a.workspace.clone(),
                driver: a.driver.clone(),
                settings: a.settings.clone(),
                idle_timeout_secs: a.idle_timeout_secs,
            })
            .collect(),
        routes: view
            .state
            .routes
            .iter()
            .map(|(route, agent)| warren_schema::events::RouteConfigured {
                route: route.clone(),
                agent: agent.clone(),
            })
            .collect(),
    };
    if let Some(a) = agent {
        file.agents.push(AgentEntry {
            name: a.name.clone(),
            workspace: a.workspace.clone(),
            driver: a.driver.clone(),
            settings: a.settings.clone(),
            idle_timeout_secs: a.idle_timeout_secs,
        });
    }
    crate::config_file::validate(&file).map_err(ApiError::BadRequest)
}

/// List agents, in name order.
#[utoipa::path(get, path = "/v1/agents", tag = "agents", operation_id = "list_agents",
    security(("token" = ["viewer"])), params(ListParams),
    responses((status = 200, description = "A page of agents", body = Page<Agent>)))]
pub async fn list(
    _: Authorized<ViewerRole>,
    State(api): State<Api>,
    Query(params): Query<ListParams>,
) -> ApiResult<axum::Json<Page<Agent>>> {
    let limit = limit(params.limit)?;
    let view = api.view.read();
    page_of(
        &view.state.agents,
        params.cursor.as_deref(),
        limit,
        |_, a| {
            params
                .workspace
                .as_ref()
                .is_none_or(|w| &a.workspace == w)
                .then(|| agent_of(&view, a))
        },
    )
    .map(axum::Json)
}

/// One agent. Its `ETag` is what `If-Match` takes.
#[utoipa::path(get, path = "/v1/agents/{name}", tag = "agents", operation_id = "get_agent",
    security(("token" = ["viewer"])), params(("name" = String, Path, description = "Agent name")),
    responses((status = 200, description = "The agent", body = Agent,
               headers(("ETag" = String, description = "Its version"))),
              (status = 404, description = "No such agent", body = super::problem::Problem)))]
pub async fn get(
    _: Authorized<ViewerRole>,
    State(api): State<Api>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let agent = current(&api, &name, |name| {
        ApiError::NotFound(format!("no agent {name:?}"))
    })?;
    Ok(with_etag(StatusCode::OK, agent.version, agent))
}

/// Create an agent. With `Idempotency-Key`, a repeat of the same request creates nothing
/// and answers as the first did.
#[utoipa::path(post, path = "/v1/agents", tag = "agents", operation_id = "create_agent",
    security(("token" = ["admin"])), request_body = NewAgent,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retry safe")),
    responses((status = 201, description = "Created", body = Agent,
               headers(("ETag" = String), ("Location" = String))),
              (status = 400, description = "Invalid", body = super::problem::Problem),
              (status = 409, description = "The name is taken", body = super::problem::Problem),
              (status = 422, description = "Idempotency-Key reused for another request",
               body = super::problem::Problem)))]
pub async fn create(
    Authorized(caller, _): Authorized<AdminRole>,
    State(api): State<Api>,
    headers: HeaderMap,
    Body(new): Body<NewAgent>,
) -> ApiResult<Response> {
    let (id, key) = idempotent_id(&caller, &headers)?;
    let wanted = AgentConfigured {
        name: new.name.clone(),
        workspace: new.workspace,
        driver: new.driver,
        settings: new.settings,
        idle_timeout_secs: new.idle_timeout_secs,
    };
    let wanted_payload = serde_json::to_value(&wanted).map_err(|e| ApiError::Internal(e.into()))?;
    if let Some(event) = api
        .replayed(id, key.as_deref(), |e| {
            e.event_type == AgentConfigured::TYPE && e.payload == wanted_payload
        })
        .await?
    {
        return Ok(created(&api, &new.name, Some(event.stream_version)));
    }
    api.change(&caller, id, |view| {
        if view.state.agents.contains_key(&wanted.name) {
            return Err(ApiError::Conflict(format!(
                "agent {:?} exists; PUT /v1/agents/{} changes it",
                wanted.name, wanted.name
            )));
        }
        check_configuration(view, &wanted.name, Some(&wanted))?;
        Ok((vec![ConfigChange::of(&wanted)?], ()))
    })
    .await?;
    Ok(created(&api, &new.name, None))
}

/// The agent as the view holds it now, or `missing(name)`.
fn current(api: &Api, name: &str, missing: fn(&str) -> ApiError) -> ApiResult<Agent> {
    let view = api.view.read();
    view.state
        .agents
        .get(name)
        .map(|a| agent_of(&view, a))
        .ok_or_else(|| missing(name))
}

/// Changed, then removed by someone else before this answer.
fn removed_meanwhile(name: &str) -> ApiError {
    ApiError::Conflict(format!("agent {name:?} was removed meanwhile"))
}

/// 201 with the agent as the view holds it now.
fn created(api: &Api, name: &str, version: Option<i64>) -> Response {
    let agent = match current(api, name, removed_meanwhile) {
        Ok(agent) => agent,
        Err(e) => return e.into_response(),
    };
    let mut response = with_etag(StatusCode::CREATED, version.unwrap_or(agent.version), agent);
    if let Ok(location) = format!("/v1/agents/{name}").parse() {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

/// Replace an agent's settings (or create it under this name). `If-Match` with an older
/// `ETag` is refused with 412.
#[utoipa::path(put, path = "/v1/agents/{name}", tag = "agents", operation_id = "replace_agent",
    security(("token" = ["admin"])), request_body = AgentSettings,
    params(("name" = String, Path, description = "Agent name"),
           ("If-Match" = Option<String>, Header, description = "The ETag the change is based on")),
    responses((status = 200, description = "Changed", body = Agent, headers(("ETag" = String))),
              (status = 400, description = "Invalid", body = super::problem::Problem),
              (status = 412, description = "Changed meanwhile", body = super::problem::Problem)))]
pub async fn replace(
    Authorized(caller, _): Authorized<AdminRole>,
    State(api): State<Api>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Body(settings): Body<AgentSettings>,
) -> ApiResult<Response> {
    let precondition = if_match(&headers)?;
    let wanted = AgentConfigured {
        name: name.clone(),
        workspace: settings.workspace,
        driver: settings.driver,
        settings: settings.settings,
        idle_timeout_secs: settings.idle_timeout_secs,
    };
    api.change(&caller, None, |view| {
        check_if_match(
            &precondition,
            view.agent_versions.get(&name).copied().unwrap_or(0),
        )?;
        check_configuration(view, &name, Some(&wanted))?;
        let unchanged = view.state.agents.get(&name).is_some_and(|a| {
            a.workspace == wanted.workspace
                && a.driver == wanted.driver
                && a.settings == wanted.settings
                && a.idle_timeout_secs == wanted.idle_timeout_secs
        });
        Ok((
            if unchanged {
                Vec::new()
            } else {
                vec![ConfigChange::of(&wanted)?]
            },
            (),
        ))
    })
    .await?;
    let agent = current(&api, &name, removed_meanwhile)?;
    Ok(with_etag(StatusCode::OK, agent.version, agent))
}

/// Remove an agent. Refused while a route still reaches it (remove or re-point the route
/// first), so no route is left pointing nowhere.
#[utoipa::path(delete, path = "/v1/agents/{name}", tag = "agents", operation_id = "delete_agent",
    security(("token" = ["admin"])),
    params(("name" = String, Path, description = "Agent name"),
           ("If-Match" = Option<String>, Header, description = "The ETag the change is based on")),
    responses((status = 204, description = "Removed"),
              (status = 404, description = "No such agent", body = super::problem::Problem),
              (status = 409, description = "Routes still reach it", body = super::problem::Problem),
              (status = 412, description = "Changed meanwhile", body = super::problem::Problem)))]
pub async fn delete(
    Authorized(caller, _): Authorized<AdminRole>,
    State(api): State<Api>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    let precondition = if_match(&headers)?;
    api.change(&caller, None, |view| {
        if !view.state.agents.contains_key(&name) {
            return Err(ApiError::NotFound(format!("no agent {name:?}")));
        }
        check_if_match(
            &precondition,
            view.agent_versions.get(&name).copied().unwrap_or(0),
        )?;
        let routes: Vec<&String> = view
            .state
            .routes
            .iter()
            .filter(|(_, agent)| **agent == name)
            .map(|(route, _)| route)
            .collect();
        if !routes.is_empty() {
            return Err(ApiError::Conflict(format!(
                "routes {routes:?} reach agent {name:?}; remove or re-point them first"
            )));
        }
        let endpoints: Vec<&String> = view
            .endpoints
            .values()
            .filter(|e| e.configured.agent == name)
            .map(|e| &e.configured.endpoint)
            .collect();
        if !endpoints.is_empty() {
            return Err(ApiError::Conflict(format!(
                "webhook endpoints {endpoints:?} address agent {name:?}; delete them first"
            )));
        }
        Ok((
            vec![ConfigChange::of(&AgentRemoved { name: name.clone() })?],
            (),
        ))
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
