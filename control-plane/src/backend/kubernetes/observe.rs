//! What a pod's status says about its workspace (pure): the phase recorded as
//! `workspace.observed`, with the reason a user needs (image pull, OOMKilled,
//! unschedulable, crash, evicted).

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use warren_schema::events::WorkspacePhase;

/// Waiting reasons that mean the container will not start without someone changing
/// something (the image, a secret, the node).
const STUCK: [&str; 6] = [
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// The phase of a pod that exists, and why. `None` while it is being deleted (its
/// deletion is observed when it is gone).
pub fn phase_of(pod: &Pod) -> Option<(WorkspacePhase, Option<String>)> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.clone().unwrap_or_default();
    let containers = status.container_statuses.clone().unwrap_or_default();
    let terminated = containers.iter().find_map(terminated_reason);
    match status.phase.as_deref() {
        Some("Succeeded") => {
            return Some((
                WorkspacePhase::Exited,
                Some(terminated.unwrap_or_else(|| "completed".into())),
            ));
        }
        Some("Failed") => {
            let reason = match (status.reason.as_deref(), terminated) {
                (Some(reason), _) => with_message(reason, status.message.as_deref()),
                (None, Some(container)) => container,
                (None, None) => "failed".into(),
            };
            return Some((WorkspacePhase::Failed, Some(reason)));
        }
        _ => {}
    }
    if let Some(reason) = terminated.filter(|r| r.starts_with("OOMKilled")) {
        return Some((WorkspacePhase::Failed, Some(reason)));
    }
    for c in &containers {
        if let Some(waiting) = c.state.as_ref().and_then(|s| s.waiting.as_ref())
            && let Some(reason) = waiting.reason.as_deref()
            && STUCK.contains(&reason)
        {
            return Some((
                WorkspacePhase::Failed,
                Some(with_message(reason, waiting.message.as_deref())),
            ));
        }
    }
    let condition = |kind: &str| {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == kind)
            .cloned()
    };
    if let Some(scheduled) = condition("PodScheduled")
        && scheduled.status == "False"
        && scheduled.reason.as_deref() == Some("Unschedulable")
    {
        return Some((
            WorkspacePhase::Failed,
            Some(with_message("Unschedulable", scheduled.message.as_deref())),
        ));
    }
    if condition("Ready").is_some_and(|c| c.status == "True") {
        return Some((WorkspacePhase::Ready, None));
    }
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    Some((
        WorkspacePhase::Starting,
        Some(match node {
            Some(node) => format!("scheduled on {node}"),
            None => "created".into(),
        }),
    ))
}

/// How long a termination message's line may be in a recorded reason.
const MESSAGE_CHARS: usize = 300;

fn terminated_reason(c: &ContainerStatus) -> Option<String> {
    let t = c.state.as_ref()?.terminated.as_ref()?;
    let reason = t.reason.clone().unwrap_or_else(|| "Terminated".into());
    // The last line of the termination message (with `FallbackToLogsOnError`, the end of
    // the container's log): usually the error the runtime stopped on.
    let last_line = t
        .message
        .as_deref()
        .and_then(|m| m.lines().rev().map(str::trim).find(|l| !l.is_empty()))
        .map(|l| l.chars().take(MESSAGE_CHARS).collect::<String>());
    Some(match last_line {
        Some(line) => format!("{reason} (exit code {}): {line}", t.exit_code),
        None => format!("{reason} (exit code {})", t.exit_code),
    })
}

fn with_message(reason: &str, message: Option<&str>) -> String {
    match message.filter(|m| !m.is_empty()) {
        Some(message) => format!("{reason}: {message}"),
        None => reason.to_owned(),
    }
}

/// Whether the pod still counts as the workspace's running instance: not deleted, not
/// finished, not stuck.
pub fn is_live(pod: &Pod) -> bool {
    matches!(
        phase_of(pod),
        Some((WorkspacePhase::Starting | WorkspacePhase::Ready, _))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "warren-w"},
            "spec": {"containers": [{"name": "runtime"}], "nodeName": "node-1"},
            "status": status,
        }))
        .expect("a pod")
    }

    #[test]
    fn each_failure_is_recorded_with_its_reason() {
        let cases = [
            (
                json!({"phase": "Pending", "containerStatuses": [{"name": "runtime", "image": "i",
                    "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"waiting": {"reason": "ImagePullBackOff",
                                          "message": "Back-off pulling image \"i\""}}}]}),
                "ImagePullBackOff: Back-off pulling image \"i\"",
            ),
            (
                json!({"phase": "Failed", "containerStatuses": [{"name": "runtime", "image": "i",
                    "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}]}),
                "OOMKilled (exit code 137)",
            ),
            (
                json!({"phase": "Pending", "conditions": [{"type": "PodScheduled",
                    "status": "False", "reason": "Unschedulable",
                    "message": "0/3 nodes are available"}]}),
                "Unschedulable: 0/3 nodes are available",
            ),
            (
                json!({"phase": "Failed", "reason": "Evicted",
                       "message": "The node was low on resource: memory."}),
                "Evicted: The node was low on resource: memory.",
            ),
            (
                json!({"phase": "Failed", "containerStatuses": [{"name": "runtime", "image": "i",
                    "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"terminated": {"reason": "Error", "exitCode": 3}}}]}),
                "Error (exit code 3)",
            ),
            (
                // With `FallbackToLogsOnError`, the end of its log: the last line says why.
                json!({"phase": "Failed", "containerStatuses": [{"name": "runtime", "image": "i",
                    "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"terminated": {"reason": "Error", "exitCode": 1,
                        "message": "starting\nerror: cannot reach NATS at nats://n:4222\n\n"}}}]}),
                "Error (exit code 1): error: cannot reach NATS at nats://n:4222",
            ),
        ];
        for (status, reason) in cases {
            let p = pod(status);
            assert_eq!(
                phase_of(&p),
                Some((WorkspacePhase::Failed, Some(reason.to_owned())))
            );
            assert!(!is_live(&p));
        }
    }

    #[test]
    fn scheduled_then_ready() {
        let scheduled = pod(json!({"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "True"}]}));
        assert_eq!(
            phase_of(&scheduled),
            Some((WorkspacePhase::Starting, Some("scheduled on node-1".into())))
        );
        assert!(is_live(&scheduled));
        let ready = pod(json!({"phase": "Running", "conditions": [
            {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]}));
        assert_eq!(phase_of(&ready), Some((WorkspacePhase::Ready, None)));
        let mut deleting = ready.clone();
        deleting.metadata.deletion_timestamp =
            serde_json::from_value(json!("2026-12-03T10:00:00Z")).ok();
        assert!(deleting.metadata.deletion_timestamp.is_some());
        assert_eq!(phase_of(&deleting), None);
        assert!(!is_live(&deleting));
    }
}
