//! `/v1/memory/restore`: put a workspace's memory bucket, or the shared one, back from the
//! log (after a NATS store was lost or wiped). The log keeps every `memory.written`; the
//! restore writes each key's latest value and records what it did.

use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use warren_schema::events::MemoryRestored;
use warren_schema::{AppendRequest, EventId, NewEvent};

use super::Api;
use super::auth::{Authorized, OperatorRole};
use super::extract::Body;
use super::problem::{ApiError, ApiResult};

/// Which bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// A workspace's bucket...
    pub workspace: Option<String>,
    /// ... or the shared one (`true`).
    #[serde(default)]
    pub shared: bool,
}

/// What was restored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Restored {
    pub bucket: String,
    /// Keys put back (those whose latest write is a delete stay absent).
    pub keys: u64,
    /// The `memory.restored` event.
    pub event_id: uuid::Uuid,
}

/// Restore a memory bucket from the log.
#[utoipa::path(post, path = "/v1/memory/restore", tag = "memory", operation_id = "restore_memory",
    security(("token" = ["operator"])), request_body = RestoreRequest,
    responses((status = 200, description = "Restored", body = Restored),
              (status = 404, description = "No such workspace", body = super::problem::Problem),
              (status = 503, description = "NATS is not configured or unreachable",
               body = super::problem::Problem)))]
pub async fn restore(
    Authorized(caller, _): Authorized<OperatorRole>,
    State(api): State<Api>,
    Body(request): Body<RestoreRequest>,
) -> ApiResult<axum::Json<Restored>> {
    let Some(nats) = &api.nats else {
        return Err(ApiError::Unavailable(
            "this control plane has no NATS (--nats-url); memory lives there".into(),
        ));
    };
    let bucket = match (&request.workspace, request.shared) {
        (Some(w), false) => {
            let known = crate::admin_api::workspaces::names(&api.view.read()).contains_key(w);
            if !known {
                return Err(ApiError::NotFound(format!("no workspace {w:?}")));
            }
            nats.namespace.workspace_bucket(w)
        }
        (None, true) => nats.namespace.shared_bucket(),
        _ => {
            return Err(ApiError::BadRequest(
                "give one of workspace or shared: true".into(),
            ));
        }
    };
    let client = api
        .nats_client
        .get_or_try_init(|| async {
            warren_schema::nats::connect_options(nats.credentials.as_deref(), None)
                .await
                .map_err(|e| e.to_string())?
                .connect(nats.url.as_str())
                .await
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "admin API: connecting to NATS");
            ApiError::Unavailable("NATS is unreachable; retry shortly".into())
        })?;
    let js = async_nats::jetstream::new(client.clone());
    let keys = crate::delivery::memory::restore(&js, &nats.namespace, &api.log, &bucket)
        .await
        .map_err(|e| match e {
            crate::error::Error::Log(e) => e.into(),
            crate::error::Error::Nats(e) => {
                tracing::warn!(error = %e, "admin API: restoring memory");
                ApiError::Unavailable("NATS refused the restore; retry shortly".into())
            }
            e => ApiError::Internal(Box::new(e)),
        })?;
    let event = NewEvent::from_domain(
        EventId::random(),
        &MemoryRestored {
            bucket: bucket.clone(),
            keys: keys as u64,
        },
        super::metadata(&caller),
    )
    .map_err(|e| ApiError::Internal(e.into()))?;
    let id = event.id;
    api.log
        .append(&AppendRequest::new("memory-restores", vec![event]))
        .await?;
    Ok(axum::Json(Restored {
        bucket,
        keys: keys as u64,
        event_id: id.0,
    }))
}
