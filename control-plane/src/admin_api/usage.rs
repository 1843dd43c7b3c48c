//! `/v1/usage`: what each agent, workspace and team used over a period, read from the log:
//! process- or pod-seconds (from the backend's observations), turns (messages routed to an
//! agent), and the time and model tokens of the turns that completed (`agent.turn_completed`,
//! which the runtime reports with each turn's outputs, from the providers' usage fields).

use std::collections::BTreeMap;

use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::{IntoParams, ToSchema};
use warren_schema::event_log::EventFilter;
use warren_schema::events::{WorkspaceObserved, WorkspacePhase};

use super::Api;
use super::auth::{Authorized, ViewerRole};
use super::extract::Query;
use super::problem::{ApiError, ApiResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    Agent,
    Workspace,
    Team,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageParams {
    /// `agent`, `workspace` or `team`.
    #[param(inline)]
    pub by: GroupBy,
    /// From this instant (RFC 3339; default: the beginning).
    pub since: Option<DateTime<Utc>>,
    /// To this instant (default: now).
    pub until: Option<DateTime<Utc>>,
}

/// One row of a usage report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UsageRow {
    /// The agent, workspace or team.
    pub key: String,
    /// The agent's workspace (rows by agent).
    pub workspace: Option<String>,
    /// Messages routed to the agent(s): turns taken.
    pub turns: u64,
    /// Seconds a runtime (process or pod) of the workspace existed, from the backend's
    /// observations, within the period (rows by workspace).
    pub runtime_seconds: Option<f64>,
    /// Turns that completed with an answer.
    pub completed_turns: u64,
    /// Seconds the completed turns took (the driver's time: model calls, tools, a
    /// command's run).
    pub turn_seconds: f64,
    /// Model calls and tokens, as the providers reported them. Input tokens include the
    /// cached ones (for every provider); 0 for agents that call no model.
    pub model_calls: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
}

/// A usage report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub since: Option<DateTime<Utc>>,
    pub until: DateTime<Utc>,
    pub rows: Vec<UsageRow>,
}

/// Seconds each workspace had a runtime within `[since, until)`, from its observations in
/// log order: a run begins at `starting` or `ready` and ends at `exited`, `failed` or `gone`;
/// one still running at `until` counts up to it. Pure.
pub fn runtime_seconds(
    observations: &[(DateTime<Utc>, WorkspaceObserved)],
    since: Option<DateTime<Utc>>,
    until: DateTime<Utc>,
) -> BTreeMap<String, f64> {
    let mut began: BTreeMap<&str, DateTime<Utc>> = BTreeMap::new();
    let mut seconds: BTreeMap<String, f64> = BTreeMap::new();
    let mut add = |workspace: &str, from: DateTime<Utc>, to: DateTime<Utc>| {
        let from = since.map_or(from, |s| from.max(s));
        let to = to.min(until);
        if to > from {
            *seconds.entry(workspace.to_owned()).or_default() +=
                (to - from).num_milliseconds() as f64 / 1000.0;
        }
    };
    for (at, o) in observations {
        match o.phase {
            WorkspacePhase::Starting | WorkspacePhase::Ready => {
                began.entry(o.workspace.as_str()).or_insert(*at);
            }
            WorkspacePhase::Exited | WorkspacePhase::Failed | WorkspacePhase::Gone => {
                if let Some(from) = began.remove(o.workspace.as_str()) {
                    add(&o.workspace, from, *at);
                }
            }
        }
    }
    for (workspace, from) in began {
        add(workspace, from, until);
    }
    seconds
}

/// Usage per agent, workspace or team over a period.
#[utoipa::path(get, path = "/v1/usage", tag = "usage", operation_id = "usage",
    security(("token" = ["viewer"])), params(UsageParams),
    responses((status = 200, description = "The report", body = Usage)))]
pub async fn usage(
    _: Authorized<ViewerRole>,
    State(api): State<Api>,
    Query(params): Query<UsageParams>,
) -> ApiResult<axum::Json<Usage>> {
    let until = params.until.unwrap_or_else(Utc::now);
    if params.since.is_some_and(|s| s >= until) {
        return Err(ApiError::BadRequest("since must be before until".into()));
    }
    let db = |e: sqlx::Error| ApiError::from(warren_schema::Error::db("reading usage")(e));
    // Turns: routings in the period, keyed as asked. A team is the origin's Slack team or,
    // for a webhook, its endpoint (the admission scopes).
    let sql = match params.by {
        GroupBy::Agent => {
            "SELECT r.payload->>'agent' AS key, max(r.payload->>'workspace') AS workspace, \
                    count(*) AS turns \
             FROM events r WHERE r.event_type = 'message.routed' \
               AND ($1::timestamptz IS NULL OR r.recorded_at >= $1) AND r.recorded_at < $2 GROUP BY 1 ORDER BY 1"
        }
        GroupBy::Workspace => {
            "SELECT r.payload->>'workspace' AS key, NULL::text AS workspace, count(*) AS turns \
             FROM events r WHERE r.event_type = 'message.routed' \
               AND ($1::timestamptz IS NULL OR r.recorded_at >= $1) AND r.recorded_at < $2 GROUP BY 1 ORDER BY 1"
        }
        GroupBy::Team => {
            "SELECT coalesce(m.payload->'origin'->>'team_id', m.payload->'origin'->>'endpoint', \
                             'agents') AS key, NULL::text AS workspace, count(*) AS turns \
             FROM events r LEFT JOIN events m ON m.event_id = (r.payload->>'message_id')::uuid \
             WHERE r.event_type = 'message.routed' \
               AND ($1::timestamptz IS NULL OR r.recorded_at >= $1) AND r.recorded_at < $2 GROUP BY 1 ORDER BY 1"
        }
    };
    let rows = sqlx::query(sql)
        .bind(params.since)
        .bind(until)
        .fetch_all(api.log.pool())
        .await
        .map_err(db)?;
    let mut report: BTreeMap<String, UsageRow> = BTreeMap::new();
    for row in rows {
        let key: Option<String> = row.try_get("key").map_err(db)?;
        let key = key.unwrap_or_default();
        report.insert(
            key.clone(),
            UsageRow {
                key,
                workspace: row.try_get("workspace").map_err(db)?,
                turns: row.try_get::<i64, _>("turns").map_err(db)?.max(0) as u64,
                ..UsageRow::default()
            },
        );
    }
    // The completed turns' time and tokens, keyed the same way (a team through the turn's
    // routing and its message).
    // Only a team needs the turn's routing and message: the other keys are in the turn.
    let (key, joins) = match params.by {
        GroupBy::Agent => ("t.payload->>'agent'", ""),
        GroupBy::Workspace => ("t.payload->>'workspace'", ""),
        GroupBy::Team => (
            "coalesce(m.payload->'origin'->>'team_id', m.payload->'origin'->>'endpoint', 'agents')",
            "LEFT JOIN events r ON r.event_id = (t.payload->>'routing_id')::uuid \
             LEFT JOIN events m ON m.event_id = (r.payload->>'message_id')::uuid",
        ),
    };
    let sum = |field: &str| {
        format!("coalesce(sum((t.payload->'usage'->>'{field}')::bigint), 0)::bigint AS {field}")
    };
    let sql = format!(
        "SELECT {key} AS key, max(t.payload->>'workspace') AS workspace, count(*) AS completed, \
                coalesce(sum((t.payload->>'duration_ms')::bigint), 0)::bigint AS duration_ms, \
                {}, {}, {}, {}, {} \
         FROM events t {joins} \
         WHERE t.event_type = 'agent.turn_completed' \
           AND ($1::timestamptz IS NULL OR t.recorded_at >= $1) AND t.recorded_at < $2 \
         GROUP BY 1",
        sum("model_calls"),
        sum("input_tokens"),
        sum("output_tokens"),
        sum("cache_read_tokens"),
        sum("cache_write_tokens"),
    );
    // Built only from the constants above; the period is bound.
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(params.since)
        .bind(until)
        .fetch_all(api.log.pool())
        .await
        .map_err(db)?;
    let count = |row: &sqlx::postgres::PgRow, column: &str| -> ApiResult<u64> {
        Ok(row.try_get::<i64, _>(column).map_err(db)?.max(0) as u64)
    };
    for row in rows {
        let key: Option<String> = row.try_get("key").map_err(db)?;
        let key = key.unwrap_or_default();
        let entry = report.entry(key.clone()).or_insert_with(|| UsageRow {
            key,
            workspace: None,
            ..UsageRow::default()
        });
        if params.by == GroupBy::Agent && entry.workspace.is_none() {
            entry.workspace = row.try_get("workspace").map_err(db)?;
        }
        entry.completed_turns = count(&row, "completed")?;
        entry.turn_seconds = count(&row, "duration_ms")? as f64 / 1000.0;
        entry.model_calls = count(&row, "model_calls")?;
        entry.input_tokens = count(&row, "input_tokens")?;
        entry.output_tokens = count(&row, "output_tokens")?;
        entry.cache_read_tokens = count(&row, "cache_read_tokens")?;
        entry.cache_write_tokens = count(&row, "cache_write_tokens")?;
    }
    if params.by == GroupBy::Workspace {
        let mut observations = Vec::new();
        let mut filter = EventFilter {
            types: vec!["workspace.observed".into()],
            until: Some(until),
            ..EventFilter::default()
        };
        loop {
            let page = api.log.query(&filter, 10_000).await?;
            for e in &page {
                if let Ok(o) = e.decode::<WorkspaceObserved>() {
                    observations.push((e.recorded_at, o));
                }
            }
            match page.last() {
                Some(last) if page.len() == 10_000 => filter.after = Some(last.position),
                _ => break,
            }
        }
        for (workspace, seconds) in runtime_seconds(&observations, params.since, until) {
            report
                .entry(workspace.clone())
                .or_insert_with(|| UsageRow {
                    key: workspace,
                    ..UsageRow::default()
                })
                .runtime_seconds = Some(seconds);
        }
        for row in report.values_mut() {
            row.runtime_seconds.get_or_insert(0.0);
        }
    }
    Ok(axum::Json(Usage {
        since: params.since,
        until,
        rows: report.into_values().collect(),
    }))
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn observed(workspace: &str, phase: WorkspacePhase) -> WorkspaceObserved {
        WorkspaceObserved {
            workspace: workspace.into(),
            phase,
            backend: "local".into(),
            instance: None,
            detail: None,
            replaced: false,
        }
    }

    #[test]
    fn runs_are_clipped_to_the_period_and_a_running_one_counts_up_to_its_end() {
        let t = |s: i64| Utc.timestamp_opt(1_700_000_000 + s, 0).single().expect("t");
        let obs = vec![
            (t(0), observed("a", WorkspacePhase::Starting)),
            (t(2), observed("a", WorkspacePhase::Ready)),
            (t(10), observed("a", WorkspacePhase::Exited)),
            (t(20), observed("a", WorkspacePhase::Ready)),
            (t(5), observed("b", WorkspacePhase::Starting)),
        ];
        let all = runtime_seconds(&obs, None, t(30));
        assert_eq!(all["a"], 10.0 + 10.0);
        assert_eq!(all["b"], 25.0);
        let clipped = runtime_seconds(&obs, Some(t(8)), t(25));
        assert_eq!(clipped["a"], 2.0 + 5.0);
        assert_eq!(clipped["b"], 17.0);
    }
}
