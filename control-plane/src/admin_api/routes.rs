//! `/v1/routes`: which agent a Slack channel or a webhook endpoint reaches when a message
//! names no agent. Keys: `slack_channel:{channel id}`, `webhook:{endpoint}`.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use warren_schema::events::{RouteConfigured, RouteRemoved};

use super::auth::{AdminRole, Authorized, ViewerRole};
use super::extract::{Body, Query, limit, page_of};
use super::problem::{ApiError, ApiResult};
use super::view::View;
use super::{Api, ConfigChange, Page, check_if_match, if_match, with_etag};

/// A route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Route {
    /// `slack_channel:{channel id}` or `webhook:{endpoint}`.
    pub route: String,
    pub agent: String,
    /// The configuration version of its last change (also its `ETag`).
    pub version: i64,
}

/// Where a route leads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteTarget {
    pub agent: String,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Items per page (1-1000, default 100).
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Only the routes to this agent.
    pub agent: Option<String>,
}

pub(crate) fn route_of(view: &View, route: &str, agent: &str) -> Route {
    Route {
        route: route.to_owned(),
        agent: agent.to_owned(),
        version: view.route_versions.get(route).copied().unwrap_or(0),
    }
}

fn valid_key(route: &str) -> ApiResult<()> {
    let ok = route
        .split_once(':')
        .is_some_and(|(kind, id)| matches!(kind, "slack_channel" | "webhook") && !id.is_empty());
    if ok && route.len() <= 255 {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "route {route:?}: use slack_channel:{{channel id}} or webhook:{{endpoint}}"
        )))
    }
}

/// List routes, in key order.
#[utoipa::path(get, path = "/v1/routes", tag = "routes", operation_id = "list_routes",
    security(("token" = ["viewer"])), params(ListParams),
    responses((status = 200, description = "A page of routes", body = Page<Route>)))]
pub async fn list(
    _: Authorized<ViewerRole>,
    State(api): State<Api>,
    Query(params): Query<ListParams>,
) -> ApiResult<axum::Json<Page<Route>>> {
    let limit = limit(params.limit)?;
    let view = api.view.read();
    page_of(
        &view.state.routes,
        params.cursor.as_deref(),
        limit,
        |route, agent| {
            params
                .agent
                .as_ref()
                .is_none_or(|a| a == agent)
                .then(|| route_of(&view, route, agent))
        },
    )
    .map(axum::Json)
}

/// One route.
#[utoipa::path(get, path = "/v1/routes/{route}", tag = "routes", operation_id = "get_route",
    security(("token" = ["viewer"])),
    params(("route" = String, Path, description = "`slack_channel:{id}` or `webhook:{endpoint}`")),
    responses((status = 200, description = "The route", body = Route, headers(("ETag" = String))),
              (status = 404, description = "No such route", body = super::problem::Problem)))]
pub async fn get(
    _: Authorized<ViewerRole>,
    State(api): State<Api>,
    Path(route): Path<String>,
) -> ApiResult<Response> {
    let view = api.view.read();
    let found = view
        .state
        .routes
        .get(&route)
        .map(|agent| route_of(&view, &route, agent))
        .ok_or_else(|| ApiError::NotFound(format!("no route {route:?}")))?;
    Ok(with_etag(StatusCode::OK, found.version, found))
}

/// Point a route at an agent (created or changed).
#[utoipa::path(put, path = "/v1/routes/{route}", tag = "routes", operation_id = "put_route",
    security(("token" = ["admin"])), request_body = RouteTarget,
    params(("route" = String, Path, description = "`slack_channel:{id}` or `webhook:{endpoint}`"),
           ("If-Match" = Option<String>, Header, description = "The ETag the change is based on")),
    responses((status = 200, description = "Set", body = Route, headers(("ETag" = String))),
              (status = 400, description = "Invalid key or unknown agent", body = super::problem::Problem),
              (status = 412, description = "Changed meanwhile", body = super::problem::Problem)))]
pub async fn put(
    Authorized(caller, _): Authorized<AdminRole>,
    State(api): State<Api>,
    Path(route): Path<String>,
    headers: HeaderMap,
    Body(target): Body<RouteTarget>,
) -> ApiResult<Response> {
    valid_key(&route)?;
    let precondition = if_match(&headers)?;
    api.change(&caller, None, |view| {
        check_if_match(
            &precondition,
            view.route_versions.get(&route).copied().unwrap_or(0),
        )?;
        if !view.state.agents.contains_key(&target.agent) {
            return Err(ApiError::BadRequest(format!(
                "route {route}: no agent {:?}",
                target.agent
            )));
        }
        if view.state.routes.get(&route) == Some(&target.agent) {
            return Ok((Vec::new(), ()));
        }
        Ok((
            vec![ConfigChange::of(&RouteConfigured {
                route: route.clone(),
                agent: target.agent.clone(),
            })?],
            (),
        ))
    })
    .await?;
    let view = api.view.read();
    let found = view
        .state
        .routes
        .get(&route)
        .map(|agent| route_of(&view, &route, agent))
        .ok_or_else(|| ApiError::Conflict(format!("route {route:?} was removed meanwhile")))?;
    Ok(with_etag(StatusCode::OK, found.version, found))
}

/// Remove a route.
#[utoipa::path(delete, path = "/v1/routes/{route}", tag = "routes", operation_id = "delete_route",
    security(("token" = ["admin"])),
    params(("route" = String, Path, description = "`slack_channel:{id}` or `webhook:{endpoint}`"),
           ("If-Match" = Option<String>, Header, description = "The ETag the change is based on")),
    responses((status = 204, description = "Removed"),
              (status = 404, description = "No such route", body = super::problem::Problem),
              (status = 412, description = "Changed meanwhile", body = super::problem::Problem)))]
pub async fn delete(
    Authorized(caller, _): Authorized<AdminRole>,
    State(api): State<Api>,
    Path(route): Path<String>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    let precondition = if_match(&headers)?;
    api.change(&caller, None, |view| {
        if !view.state.routes.contains_key(&route) {
            return Err(ApiError::NotFound(format!("no route {route:?}")));
        }
        check_if_match(
            &precondition,
            view.route_versions.get(&route).copied().unwrap_or(0),
        )?;
        Ok((
            vec![ConfigChange::of(&RouteRemoved {
                route: route.clone(),
            })?],
            (),
        ))
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
