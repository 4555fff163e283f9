//! Who owns a Cloud Map instance, read from the attributes the sidecar registers, and what the
//! owner's API said about it.

use std::collections::HashMap;
use std::fmt;

use crate::attributes::{
    AVAILABILITY_ZONE, EC2_INSTANCE_ID, ECS_CLUSTER_NAME, ECS_TASK_ARN, REGISTERED_BY,
    REGISTERED_BY_SIDECAR,
};

/// What runs the instance's application.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    /// An ECS task; `cluster` is the cluster's ARN (never a bare name, so that a task of another
    /// account or Region makes DescribeTasks fail instead of answering "missing").
    EcsTask { cluster: String, task_arn: String },
    /// An EC2 instance, with the availability zone it reported (its name starts with the Region's).
    Ec2Instance {
        id: String,
        availability_zone: Option<String>,
    },
}

impl Owner {
    /// The Region the owner lives in, when the attributes say so.
    pub fn region(&self) -> Option<&str> {
        match self {
            Owner::EcsTask { task_arn, .. } => task_arn.split(':').nth(3),
            // AZ names are the Region's name plus a suffix (us-east-1a, us-west-2-lax-1a, …), so the
            // Region can only be confirmed against a known one (see `in_region`).
            Owner::Ec2Instance { .. } => None,
        }
    }

    /// Whether the owner is known to be in `region`: required before "not found" may count as
    /// gone, since every owner API is regional.
    pub fn in_region(&self, region: &str) -> bool {
        match self {
            Owner::EcsTask { .. } => self.region() == Some(region),
            Owner::Ec2Instance {
                availability_zone, ..
            } => availability_zone
                .as_deref()
                .and_then(|az| az.strip_prefix(region))
                .is_some_and(|rest| {
                    !rest.is_empty() && !rest.starts_with(|c: char| c.is_ascii_digit())
                }),
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::EcsTask { task_arn, .. } => write!(f, "task {task_arn}"),
            Owner::Ec2Instance { id, .. } => write!(f, "EC2 instance {id}"),
        }
    }
}

/// How an instance relates to the sweeper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    /// No `REGISTERED_BY=cloudmap-sidecar`: never touched.
    Foreign,
    /// Marked, with an owner the sweeper can check.
    Owned(Owner),
    /// Marked, but the owner attributes cannot be used: never touched, and said so.
    Unreadable(String),
}

/// Read the ownership attributes. A bridge-mode ECS task carries both `ECS_TASK_ARN` and its host's
/// `EC2_INSTANCE_ID`: the task is the owner, since the host outlives it.
pub fn ownership(attrs: &HashMap<String, String>) -> Ownership {
    if attrs.get(REGISTERED_BY).map(String::as_str) != Some(REGISTERED_BY_SIDECAR) {
        return Ownership::Foreign;
    }
    if let Some(arn) = attrs.get(ECS_TASK_ARN) {
        return match cluster_arn(arn, attrs.get(ECS_CLUSTER_NAME).map(String::as_str)) {
            Ok(cluster) => Ownership::Owned(Owner::EcsTask {
                cluster,
                task_arn: arn.clone(),
            }),
            Err(why) => Ownership::Unreadable(why),
        };
    }
    if let Some(id) = attrs.get(EC2_INSTANCE_ID) {
        return if id.starts_with("i-")
            && id.len() > 2
            && id[2..].chars().all(|c| c.is_ascii_hexdigit())
        {
            Ownership::Owned(Owner::Ec2Instance {
                id: id.clone(),
                availability_zone: attrs.get(AVAILABILITY_ZONE).cloned(),
            })
        } else {
            Ownership::Unreadable(format!(
                "{EC2_INSTANCE_ID} {id:?} is not an EC2 instance ID"
            ))
        };
    }
    Ownership::Unreadable(format!(
        "{REGISTERED_BY}={REGISTERED_BY_SIDECAR} without {ECS_TASK_ARN} or {EC2_INSTANCE_ID}"
    ))
}

/// The cluster ARN of a task: from the task ARN itself (`…:task/<cluster>/<id>`), or, for
/// old-format ARNs (`…:task/<id>`), from the `ECS_CLUSTER_NAME` attribute.
fn cluster_arn(task_arn: &str, cluster_name: Option<&str>) -> Result<String, String> {
    let bad = || format!("{ECS_TASK_ARN} {task_arn:?} is not an ECS task ARN");
    let parts: Vec<&str> = task_arn.splitn(6, ':').collect();
    let [arn, partition, service, region, account, resource] = parts[..] else {
        return Err(bad());
    };
    if arn != "arn" || service != "ecs" || [partition, region, account].iter().any(|p| p.is_empty())
    {
        return Err(bad());
    }
    let path: Vec<&str> = resource.split('/').collect();
    let cluster = match path[..] {
        ["task", cluster, id] if !cluster.is_empty() && !id.is_empty() => cluster,
        ["task", id] if !id.is_empty() => match cluster_name.map(str::trim) {
            Some(name) if !name.is_empty() => name,
            _ => {
                return Err(format!(
                    "{ECS_TASK_ARN} {task_arn:?} names no cluster and {ECS_CLUSTER_NAME} is missing"
                ))
            }
        },
        _ => return Err(bad()),
    };
    Ok(format!(
        "arn:{partition}:ecs:{region}:{account}:cluster/{cluster}"
    ))
}

/// The last segment of a task ARN (or the ID itself).
pub fn task_id(task: &str) -> &str {
    task.rsplit('/').next().unwrap_or(task)
}

/// What the owner's API said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerState {
    /// Still there (any state other than the final ones): keep.
    Alive(String),
    /// Reported stopped, terminated or missing: the instance is stale.
    Gone(String),
    /// The look-up failed, or its answer named neither the owner nor a failure for it: keep.
    Unknown(String),
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn attrs(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const ARN: &str =
        "arn:aws:ecs:eu-west-1:111122223333:task/prod/0123456789abcdef0123456789abcdef";

    #[test]
    fn instances_without_the_marker_are_foreign_whatever_else_they_carry() {
        // What ECS's own serviceRegistries integration registers: same names, no marker.
        let ecs_own = attrs(&[
            ("ECS_CLUSTER_NAME", "prod"),
            ("EC2_INSTANCE_ID", "i-0123456789abcdef0"),
        ]);
        assert_eq!(ownership(&ecs_own), Ownership::Foreign);
        let other_tool = attrs(&[("REGISTERED_BY", "terraform"), ("ECS_TASK_ARN", ARN)]);
        assert_eq!(ownership(&other_tool), Ownership::Foreign);
    }

    #[test]
    fn a_task_owns_its_instance_even_on_a_bridge_host() {
        let a = attrs(&[
            ("REGISTERED_BY", "cloudmap-sidecar"),
            ("ECS_TASK_ARN", ARN),
            ("EC2_INSTANCE_ID", "i-0123456789abcdef0"),
        ]);
        assert_eq!(
            ownership(&a),
            Ownership::Owned(Owner::EcsTask {
                cluster: "arn:aws:ecs:eu-west-1:111122223333:cluster/prod".into(),
                task_arn: ARN.into()
            })
        );
    }

    #[test]
    fn an_old_format_task_arn_takes_its_cluster_from_the_cluster_name() {
        let old = "arn:aws:ecs:us-east-1:111122223333:task/5e1d0e1a-2f4b-4b8e-9c3d-0a1b2c3d4e5f";
        let a = attrs(&[
            ("REGISTERED_BY", "cloudmap-sidecar"),
            ("ECS_TASK_ARN", old),
            ("ECS_CLUSTER_NAME", "default"),
        ]);
        let Ownership::Owned(Owner::EcsTask { cluster, .. }) = ownership(&a) else {
            panic!("expected an owned task")
        };
        assert_eq!(
            cluster,
            "arn:aws:ecs:us-east-1:111122223333:cluster/default"
        );
        let no_cluster = attrs(&[("REGISTERED_BY", "cloudmap-sidecar"), ("ECS_TASK_ARN", old)]);
        assert!(matches!(ownership(&no_cluster), Ownership::Unreadable(_)));
    }

    #[test]
    fn marked_instances_with_unusable_owners_are_unreadable() {
        for bad in [
            attrs(&[("REGISTERED_BY", "cloudmap-sidecar")]),
            attrs(&[
                ("REGISTERED_BY", "cloudmap-sidecar"),
                ("ECS_TASK_ARN", "0123abcd"),
            ]),
            attrs(&[
                ("REGISTERED_BY", "cloudmap-sidecar"),
                ("ECS_TASK_ARN", "arn:aws:s3:::bucket/x"),
            ]),
            attrs(&[
                ("REGISTERED_BY", "cloudmap-sidecar"),
                ("EC2_INSTANCE_ID", "host-7"),
            ]),
        ] {
            assert!(
                matches!(ownership(&bad), Ownership::Unreadable(_)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn an_ec2_owner_is_in_a_region_only_when_its_zone_says_so() {
        let owner = |az: Option<&str>| Owner::Ec2Instance {
            id: "i-0123456789abcdef0".into(),
            availability_zone: az.map(str::to_string),
        };
        assert!(owner(Some("us-east-1a")).in_region("us-east-1"));
        assert!(owner(Some("us-west-2-lax-1a")).in_region("us-west-2"));
        // us-east-1 is a prefix of us-east-10…: a digit after it is another Region.
        assert!(!owner(Some("us-east-10a")).in_region("us-east-1"));
        assert!(!owner(Some("eu-west-1a")).in_region("us-east-1"));
        assert!(!owner(None).in_region("us-east-1"));
        let task = Owner::EcsTask {
            cluster: String::new(),
            task_arn: ARN.into(),
        };
        assert!(task.in_region("eu-west-1"));
        assert!(!task.in_region("us-east-1"));
        assert_eq!(task_id(ARN), "0123456789abcdef0123456789abcdef");
    }
}
