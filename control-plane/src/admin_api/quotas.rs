//! `/v1/quotas`: admission caps, recorded as events. Scopes: `total`, `team` and `channel`
//! (the default for every team or channel), `team:{id}` and `channel:{id}`. The most
//! specific one recorded applies, then the control plane's `--max-running*` flags.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use warren_schema::events::{QuotaRemoved, QuotaSet};

use super::auth::{AdminRole, Authorized, ViewerRole};
use super::extract::Body;
use super::problem::{ApiError, ApiResult};
use super::{Api, ConfigChange};

/// A recorded quota.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Quota {
    pub scope: String,
    /// Most workspaces holding a runtime slot in the scope at once; `null`: no cap.
    pub max_running: Option<u64>,
}

/// The quotas recorded, and the flags they override.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Quotas {
    pub quotas: Vec<Quota>,
    /// The control plane's flags (`--max-running`, `--max-running-per-team`,
    /// `--max-running-per-channel`): what applies where no quota is recorded.
    pub defaults: Vec<Quota>,
}

/// A quota's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaValue {
    /// `null`: no cap in this scope.
    pub max_running: Option<u64>,
}

fn valid_scope(scope: &str) -> ApiResult<()> {
    let ok = match scope.split_once(':') {
        None => matches!(scope, "total" | "team" | "channel"),
        Some((kind, id)) => {
            matches!(kind, "team" | "channel")
                && !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        }
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "scope {scope:?}: total, team, channel, team:{{id}} or channel:{{id}}"
        )))
    }
}

/// The quotas in force.
#[utoipa::path(get, path = "/v1/quotas", tag = "quotas", operation_id = "list_quotas",
    security(("token" = ["viewer"])),
    responses((status = 200, description = "Quotas and the flags they override", body = Quotas)))]
pub async fn list(_: Authorized<ViewerRole>, State(api): State<Api>) -> axum::Json<Quotas> {
    let view = api.view.read();
    let quota = |scope: &str, max: Option<usize>| Quota {
        scope: scope.to_owned(),
        max_running: max.map(|m| m as u64),
    };
    axum::Json(Quotas {
        quotas: view
            .state
            .quotas
            .iter()
            .map(|(scope, max)| quota(scope, *max))
            .collect(),
        defaults: vec![
            quota("total", api.policy.max_running),
            quota("team", api.policy.max_running_per_team),
            quota("channel", api.policy.max_running_per_channel),
        ],
    })
}

/// Set a quota. Starts already decided keep their slots; new starts beyond it queue.
#[utoipa::path(put, path = "/v1/quotas/{scope}", tag = "quotas", operation_id = "set_quota",
    security(("token" = ["admin"])), request_body = QuotaValue,
    params(("scope" = String, Path, description = "total, team, channel, team:{id} or channel:{id}")),
    responses((status = 200, description = "Set", body = Quota),
              (status = 400, description = "Invalid scope", body = super::problem::Problem)))]
pub async fn set(
    Authorized(caller, _): Authorized<AdminRole>,
    State(api): State<Api>,
    Path(scope): Path<String>,
    Body(value): Body<QuotaValue>,
) -> ApiResult<axum::Json<Quota>> {
    valid_scope(&scope)?;
    let wanted = value
        .max_running
        .map(|m| usize::try_from(m).unwrap_or(usize::MAX));
    api.change(&caller, None, |view| {
        if view.state.quotas.get(&scope) == Some(&wanted) {
            return Ok((Vec::new(), ()));
        }
        Ok((
            vec![ConfigChange::of(&QuotaSet {
                scope: scope.clone(),
                max_running: value.max_running,
            })?],
            (),
        ))
    })
    .await?;
    Ok(axum::Json(Quota {
        scope,
        max_running: value.max_running,
    }))
}

/// Remove a quota: its scope falls back to the broader quota or the flag.
#[utoipa::path(delete, path = "/v1/quotas/{scope}", tag = "quotas", operation_id = "remove_quota",
    security(("token" = ["admin"])),
    params(("scope" = String, Path, description = "total, team, channel, team:{id} or channel:{id}")),
    responses((status = 204, description = "Removed"),
              (status = 404, description = "No quota recorded for it", body = super::problem::Problem)))]
pub async fn remove(
    Authorized(caller, _): Authorized<AdminRole>,
    State(api): State<Api>,
    Path(scope): Path<String>,
) -> ApiResult<StatusCode> {
    valid_scope(&scope)?;
    api.change(&caller, None, |view| {
        if !view.state.quotas.contains_key(&scope) {
            return Err(ApiError::NotFound(format!(
                "no quota recorded for {scope:?}"
            )));
        }
        Ok((
            vec![ConfigChange::of(&QuotaRemoved {
                scope: scope.clone(),
            })?],
            (),
        ))
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
