//! `--health-from-container`: the application container's own ECS health check (its
//! task-definition `healthCheck`, run by the ECS agent) as the health source, read from the task
//! metadata at every interval instead of probing the application over HTTP.

use std::time::Duration;

use super::Probe;
use crate::metadata::ecs::{self, Task};
use crate::metadata::TaskMetadata;

/// Reads `Containers[].Health.status` of one container from `${ECS_CONTAINER_METADATA_URI_V4}/task`.
#[derive(Debug, Clone)]
pub struct ContainerHealthProbe {
    metadata: TaskMetadata,
    container: String,
}

impl ContainerHealthProbe {
    /// `uri`: `ECS_CONTAINER_METADATA_URI_V4`; `timeout`: `--health-timeout`.
    pub fn new(uri: &str, container: &str, timeout: Duration) -> Self {
        ContainerHealthProbe {
            metadata: TaskMetadata::new(uri, timeout),
            container: container.to_string(),
        }
    }
}

impl Probe for ContainerHealthProbe {
    async fn check(&self) -> Result<(), String> {
        let task = self.metadata.task().await.map_err(|e| e.to_string())?;
        judge(&task, &self.container)
    }
}

/// Passing only on `HEALTHY`. ECS blanks "unknown" (health check not decided yet, or none in the
/// task definition) to `{}` or drops `Health` altogether: that is not yet healthy.
pub fn judge(task: &Task, name: &str) -> Result<(), String> {
    let c = ecs::find_named(task, name).map_err(|names| {
        format!("container {name} is not in the task metadata (it has: {names})")
    })?;
    if c.is_stopped() {
        return Err(format!("container {name} is STOPPED"));
    }
    match c.health_status() {
        Some(true) => Ok(()),
        Some(false) => Err(format!("ECS reports container {name} UNHEALTHY")),
        None => Err(format!(
            "ECS reports no health status for container {name} yet (unknown until its task-definition \
             healthCheck passes; a container without a healthCheck never becomes healthy)"
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Task {
        let path = format!("{}/tests/data/ecs-v4/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(&path).expect(&path)).expect(&path)
    }

    #[test]
    fn healthy_passes_and_a_container_without_health_is_not_yet_healthy() {
        let task = fixture("ecs-exporter-fargate-task-health.json");
        assert_eq!(judge(&task, "main"), Ok(()));
        let err = judge(&task, "ecs-exporter").unwrap_err();
        assert!(err.contains("no health status"), "{err}");
        let err = judge(&task, "nonessential").unwrap_err();
        assert!(err.contains("STOPPED"), "{err}");
        let err = judge(&task, "nope").unwrap_err();
        assert!(err.contains("ecs-exporter, main, nonessential"), "{err}");
    }

    #[test]
    fn healthy_with_exit_code_minus_one_passes() {
        let task = fixture("datadog-task-with-tags-health-exitcode-minus1.json");
        assert_eq!(judge(&task, "datadog-agent"), Ok(()));
    }

    #[test]
    fn empty_health_object_unhealthy_and_unknown_status_fail() {
        for (health, expect) in [
            (r#"{}"#, "no health status"),
            (
                r#"{"statusSince":"2026-01-01T00:00:00Z"}"#,
                "no health status",
            ),
            (r#"{"status":"UNKNOWN"}"#, "no health status"),
            (r#"{"status":"UNHEALTHY","exitCode":1}"#, "UNHEALTHY"),
        ] {
            let body = format!(
                r#"{{"TaskARN":"arn:aws:ecs:us-east-1:1:task/c/t","Containers":[{{"Name":"app","KnownStatus":"RUNNING","Health":{health}}}]}}"#
            );
            let task: Task = serde_json::from_str(&body).unwrap();
            let err = judge(&task, "app").unwrap_err();
            assert!(err.contains(expect), "{health}: {err}");
        }
    }
}
