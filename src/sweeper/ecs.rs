//! Are the owning ECS tasks still there? `DescribeTasks`, per cluster, at most 100 tasks a call.
//!
//! ECS answers unknown tasks under `failures` with reason `MISSING` (also for tasks stopped long
//! enough ago that ECS forgot them, about an hour), and keeps stopped tasks visible with
//! `lastStatus` `STOPPED` until then. Anything else (an error, another failure reason, a task it
//! names nowhere) leaves the owner unknown, and its instance is kept.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use aws_sdk_ecs::Client;
use tracing::{debug, warn};

use super::owner::{task_id, OwnerState};

/// DescribeTasks accepts at most 100 tasks per call.
pub const BATCH: usize = 100;

/// One DescribeTasks call: the tasks ECS described and its `failures`, or why it failed.
#[allow(async_fn_in_trait)]
pub trait DescribeTasks {
    async fn describe(
        &self,
        cluster: &str,
        tasks: &[String],
    ) -> Result<(Vec<Described>, Vec<Failure>), String>;
}

/// One task as DescribeTasks described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    pub task_arn: String,
    pub last_status: String,
}

/// One entry of DescribeTasks' `failures`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub arn: String,
    pub reason: String,
    pub detail: String,
}

/// The state of each `(cluster ARN, task ARN)`, keyed by task ARN: one DescribeTasks call per
/// cluster and 100 tasks.
pub async fn check<D: DescribeTasks>(
    api: &D,
    region: &str,
    tasks: &[(String, String)],
) -> HashMap<String, OwnerState> {
    let mut out = HashMap::new();
    let mut by_cluster: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (cluster, arn) in tasks {
        let task_region = arn.split(':').nth(3).unwrap_or_default();
        if task_region == region {
            by_cluster.entry(cluster).or_default().insert(arn);
        } else {
            // ECS is regional: asked here about another Region's task, it could only answer
            // "missing". A sweeper in that Region can check it.
            out.insert(
                arn.clone(),
                OwnerState::Unknown(format!(
                    "task is in Region {task_region:?}, the sweeper runs in {region:?}"
                )),
            );
        }
    }
    for (cluster, arns) in by_cluster {
        let arns: Vec<String> = arns.into_iter().map(str::to_string).collect();
        for batch in arns.chunks(BATCH) {
            debug!(cluster, tasks = batch.len(), "DescribeTasks");
            match api.describe(cluster, batch).await {
                Ok((described, failures)) => out.extend(interpret(batch, &described, &failures)),
                Err(why) => {
                    warn!(
                        cluster,
                        tasks = batch.len(),
                        "{why}; keeping their instances"
                    );
                    out.extend(
                        batch
                            .iter()
                            .map(|arn| (arn.clone(), OwnerState::Unknown(why.clone()))),
                    );
                }
            }
        }
    }
    out
}

/// The real DescribeTasks.
impl DescribeTasks for Client {
    async fn describe(
        &self,
        cluster: &str,
        tasks: &[String],
    ) -> Result<(Vec<Described>, Vec<Failure>), String> {
        let out = self
            .describe_tasks()
            .cluster(cluster)
            .set_tasks(Some(tasks.to_vec()))
            .send()
            .await
            .map_err(|e| {
                format!(
                    "DescribeTasks in cluster {cluster} failed: {}",
                    crate::metadata::error_chain(&e)
                )
            })?;
        let described = out
            .tasks()
            .iter()
            .map(|t| Described {
                task_arn: t.task_arn().unwrap_or_default().to_string(),
                last_status: t.last_status().unwrap_or_default().to_string(),
            })
            .collect();
        let failures = out
            .failures()
            .iter()
            .map(|f| Failure {
                arn: f.arn().unwrap_or_default().to_string(),
                reason: f.reason().unwrap_or_default().to_string(),
                detail: f.detail().unwrap_or_default().to_string(),
            })
            .collect();
        Ok((described, failures))
    }
}

/// Judge each requested task from one DescribeTasks answer. Tasks are matched by task ID, so an
/// answer with the other ARN format still counts.
pub fn interpret(
    requested: &[String],
    described: &[Described],
    failures: &[Failure],
) -> HashMap<String, OwnerState> {
    requested
        .iter()
        .map(|arn| {
            let id = task_id(arn);
            let state = if let Some(t) = described.iter().find(|t| task_id(&t.task_arn) == id) {
                match t.last_status.as_str() {
                    // Final states only: a task that is STOPPING or DEPROVISIONING may still be
                    // deregistering itself; the next pass sees it STOPPED.
                    "STOPPED" | "DELETED" => OwnerState::Gone(format!("task {}", t.last_status)),
                    "" => OwnerState::Unknown("DescribeTasks gave the task no status".to_string()),
                    other => OwnerState::Alive(other.to_string()),
                }
            } else if let Some(f) = failures.iter().find(|f| task_id(&f.arn) == id) {
                if f.reason == "MISSING" {
                    OwnerState::Gone("task MISSING".to_string())
                } else {
                    OwnerState::Unknown(format!("DescribeTasks failure {}: {}", f.reason, f.detail))
                }
            } else {
                OwnerState::Unknown(
                    "DescribeTasks answered neither the task nor a failure for it".to_string(),
                )
            };
            (arn.clone(), state)
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// ECS as documented: every requested task is described or listed as MISSING.
    struct FakeEcs {
        calls: Mutex<Vec<(String, usize)>>,
        fail_cluster: Option<String>,
    }

    impl DescribeTasks for FakeEcs {
        async fn describe(
            &self,
            cluster: &str,
            tasks: &[String],
        ) -> Result<(Vec<Described>, Vec<Failure>), String> {
            self.calls
                .lock()
                .unwrap()
                .push((cluster.to_string(), tasks.len()));
            if self.fail_cluster.as_deref() == Some(cluster) {
                return Err(format!(
                    "DescribeTasks in cluster {cluster} failed: HTTP 500"
                ));
            }
            Ok((
                vec![],
                tasks.iter().map(|t| failure(t, "MISSING")).collect(),
            ))
        }
    }

    fn cluster(name: &str) -> String {
        format!("arn:aws:ecs:us-east-1:123456789012:cluster/{name}")
    }

    fn arn_in(region: &str, cluster: &str, n: usize) -> String {
        format!("arn:aws:ecs:{region}:123456789012:task/{cluster}/{n:032}")
    }

    #[tokio::test]
    async fn one_call_per_cluster_and_hundred_tasks_and_a_failed_call_leaves_its_tasks_unknown() {
        let mut tasks: Vec<(String, String)> = (0..150)
            .map(|n| (cluster("a"), arn_in("us-east-1", "a", n)))
            .collect();
        tasks.extend((0..3).map(|n| (cluster("b"), arn_in("us-east-1", "b", n))));
        // The same task twice (two instances with one owner) is asked about once.
        tasks.push(tasks[0].clone());
        let api = FakeEcs {
            calls: Mutex::new(vec![]),
            fail_cluster: Some(cluster("b")),
        };
        let out = check(&api, "us-east-1", &tasks).await;
        assert_eq!(
            *api.calls.lock().unwrap(),
            [(cluster("a"), 100), (cluster("a"), 50), (cluster("b"), 3)]
        );
        assert_eq!(
            out[&arn_in("us-east-1", "a", 7)],
            OwnerState::Gone("task MISSING".into())
        );
        assert!(
            matches!(out[&arn_in("us-east-1", "b", 1)], OwnerState::Unknown(ref w) if w.contains("HTTP 500"))
        );
    }

    #[tokio::test]
    async fn tasks_of_another_region_are_not_asked_about() {
        let tasks = vec![(cluster("a"), arn_in("eu-west-1", "a", 1))];
        let api = FakeEcs {
            calls: Mutex::new(vec![]),
            fail_cluster: None,
        };
        let out = check(&api, "us-east-1", &tasks).await;
        assert!(api.calls.lock().unwrap().is_empty());
        assert!(matches!(out[&tasks[0].1], OwnerState::Unknown(ref w) if w.contains("eu-west-1")));
    }

    const A: &str = "arn:aws:ecs:us-east-1:123456789012:task/prod/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "arn:aws:ecs:us-east-1:123456789012:task/prod/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const C: &str = "arn:aws:ecs:us-east-1:123456789012:task/prod/cccccccccccccccccccccccccccccccc";
    const D: &str = "arn:aws:ecs:us-east-1:123456789012:task/prod/dddddddddddddddddddddddddddddddd";

    fn described(arn: &str, status: &str) -> Described {
        Described {
            task_arn: arn.to_string(),
            last_status: status.to_string(),
        }
    }

    fn failure(arn: &str, reason: &str) -> Failure {
        Failure {
            arn: arn.to_string(),
            reason: reason.to_string(),
            detail: String::new(),
        }
    }

    #[test]
    fn stopped_and_missing_tasks_are_gone_others_alive_and_unanswered_ones_unknown() {
        let requested: Vec<String> = [A, B, C, D].iter().map(|s| s.to_string()).collect();
        let out = interpret(
            &requested,
            &[described(A, "STOPPED"), described(B, "RUNNING")],
            &[failure(C, "MISSING")],
        );
        assert_eq!(out[A], OwnerState::Gone("task STOPPED".into()));
        assert_eq!(out[B], OwnerState::Alive("RUNNING".into()));
        assert_eq!(out[C], OwnerState::Gone("task MISSING".into()));
        assert!(matches!(out[D], OwnerState::Unknown(_)));
    }

    #[test]
    fn a_task_on_its_way_down_is_still_alive() {
        let requested = vec![A.to_string(), B.to_string()];
        let out = interpret(
            &requested,
            &[described(A, "STOPPING"), described(B, "DEPROVISIONING")],
            &[],
        );
        assert!(matches!(out[A], OwnerState::Alive(_)));
        assert!(matches!(out[B], OwnerState::Alive(_)));
    }

    #[test]
    fn a_failure_other_than_missing_keeps_the_instance() {
        let requested = vec![A.to_string()];
        let out = interpret(&requested, &[], &[failure(A, "ACCESS_DENIED")]);
        assert!(matches!(out[A], OwnerState::Unknown(ref why) if why.contains("ACCESS_DENIED")));
    }

    #[test]
    fn tasks_are_matched_by_id_whatever_the_arn_format() {
        let requested = vec![A.to_string()];
        let short = "arn:aws:ecs:us-east-1:123456789012:task/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let out = interpret(&requested, &[described(short, "STOPPED")], &[]);
        assert!(matches!(out[A], OwnerState::Gone(_)));
    }
}
