//! ECS task metadata endpoint v4: the response shapes, and the pure decision of which container is
//! the application and which address and port to publish for it.
//!
//! Every field the agent may omit is optional here (see `TMDS-FACTS.md` in the fixtures): a missing
//! field must become "not ready yet" or a clear error, never a panic.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde::Deserialize;

use super::LocateError;
use crate::attributes::{self, Attributes};

/// `GET ${ECS_CONTAINER_METADATA_URI_V4}/task`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct Task {
    #[serde(default)]
    pub cluster: Option<String>,
    #[serde(rename = "TaskARN", default)]
    pub task_arn: Option<String>,
    #[serde(default)]
    pub family: Option<String>,
    #[serde(default)]
    pub availability_zone: Option<String>,
    #[serde(default)]
    pub launch_type: Option<String>,
    #[serde(default)]
    pub service_name: Option<String>,
    #[serde(default)]
    pub containers: Vec<Container>,
}

/// One container of the task, or `GET ${ECS_CONTAINER_METADATA_URI_V4}` (the sidecar itself).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct Container {
    #[serde(default)]
    pub docker_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(rename = "Type", default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub known_status: Option<String>,
    #[serde(default)]
    pub desired_status: Option<String>,
    #[serde(default)]
    pub networks: Option<Vec<Network>>,
    #[serde(default)]
    pub ports: Option<Vec<Port>>,
    #[serde(default)]
    pub health: Option<ContainerHealth>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct Network {
    #[serde(default)]
    pub network_mode: Option<String>,
    #[serde(rename = "IPv4Addresses", default)]
    pub ipv4_addresses: Option<Vec<String>>,
    #[serde(rename = "IPv6Addresses", default)]
    pub ipv6_addresses: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct Port {
    #[serde(default)]
    pub container_port: Option<u16>,
    #[serde(default)]
    pub host_port: Option<u16>,
    #[serde(default)]
    pub protocol: Option<String>,
}

/// The container's Docker health check as ECS reports it. "Unknown" is `{}` or absent.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct ContainerHealth {
    #[serde(default)]
    pub status: Option<String>,
}

impl Container {
    pub fn label(&self) -> &str {
        self.name.as_deref().unwrap_or("<unnamed>")
    }

    /// `STOPPED` known or desired: the container is gone or going away.
    pub fn is_stopped(&self) -> bool {
        self.known_status.as_deref() == Some("STOPPED")
            || self.desired_status.as_deref() == Some("STOPPED")
    }

    /// ECS's own containers: the awsvpc/Service Connect pause container. Minimal shapes omit
    /// `Type`, so the well-known names count too.
    fn is_ecs_internal(&self) -> bool {
        let kind = self.kind.as_deref().unwrap_or("NORMAL");
        kind != "NORMAL"
            || matches!(
                self.name.as_deref(),
                Some("~internal~ecs~pause" | "internal-ecs-pause")
            )
    }

    fn is_same(&self, other: &Container) -> bool {
        match (self.docker_id.as_deref(), other.docker_id.as_deref()) {
            (Some(a), Some(b)) if !a.is_empty() && !b.is_empty() => a == b,
            _ => self.name.is_some() && self.name == other.name,
        }
    }

    /// `true` healthy, `false` unhealthy, `None` unknown (no health check, or not decided yet).
    pub fn health_status(&self) -> Option<bool> {
        match self.health.as_ref().and_then(|h| h.status.as_deref()) {
            Some("HEALTHY") => Some(true),
            Some("UNHEALTHY") => Some(false),
            _ => None,
        }
    }
}

/// Where the application can be reached, as far as the task metadata can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// awsvpc: the task ENI's own addresses.
    Task {
        ipv4: Option<Ipv4Addr>,
        ipv6: Option<Ipv6Addr>,
    },
    /// bridge or host: the container instance's address (from EC2 instance metadata).
    Host,
}

/// What the task metadata yields for registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub container: String,
    pub network_mode: String,
    pub address: Address,
    /// The port clients must use: the container port (awsvpc, host) or the mapped host port (bridge).
    pub port: Option<u16>,
    pub task_id: Option<String>,
    pub attributes: Attributes,
}

/// Choose the application container and its address.
///
/// `wanted`: `--container`; `port`: `--port` (the application's container port).
pub fn plan(
    task: &Task,
    me: Option<&Container>,
    wanted: Option<&str>,
    port: Option<u16>,
) -> Result<Plan, LocateError> {
    let app = choose_app(task, me, wanted)?;
    let name = app.label().to_string();
    if app.is_stopped() {
        return Err(LocateError::NotReady(format!(
            "application container {name} is STOPPED"
        )));
    }
    // Service Connect in bridge mode: the app shares the pause container's network namespace,
    // and the port mappings live there.
    let net_owner = match first_network(app).and_then(|n| n.network_mode.as_deref()) {
        Some(mode) if mode.starts_with("container:") => {
            let id = &mode["container:".len()..];
            task.containers
                .iter()
                .find(|c| c.docker_id.as_deref() == Some(id))
                .or_else(|| task.containers.iter().find(|c| c.kind.as_deref() == Some("CNI_PAUSE")))
                .ok_or_else(|| {
                    LocateError::NotReady(format!(
                        "container {name} uses the network of container {id}, which the task metadata does not list yet"
                    ))
                })?
        }
        _ => app,
    };
    let network = first_network(net_owner).ok_or_else(|| {
        LocateError::NotReady(format!(
            "container {name} has no network in the task metadata yet"
        ))
    })?;
    let mode = network.network_mode.clone().unwrap_or_default();

    let (address, published_port) = match mode.as_str() {
        "awsvpc" => {
            let ipv4 = first_addr::<Ipv4Addr>(network.ipv4_addresses.as_deref());
            let ipv6 = first_addr::<Ipv6Addr>(network.ipv6_addresses.as_deref());
            if ipv4.is_none() && ipv6.is_none() {
                return Err(LocateError::NotReady(format!(
                    "container {name} has no IPv4 or IPv6 address in its awsvpc network yet"
                )));
            }
            (Address::Task { ipv4, ipv6 }, port.or_else(|| single_container_port(net_owner)))
        }
        "bridge" => (Address::Host, Some(host_port(net_owner, &name, port)?)),
        "host" => (Address::Host, port.or_else(|| single_container_port(net_owner))),
        "" => {
            return Err(LocateError::NotReady(format!(
                "container {name} has a network without NetworkMode in the task metadata"
            )))
        }
        other => {
            return Err(LocateError::Invalid(format!(
                "container {name} uses network mode {other:?}, which the sidecar cannot publish: set --ip (CLOUDMAP_IP) and --port (CLOUDMAP_PORT)"
            )))
        }
    };

    let mut attrs = Attributes::default();
    attrs.insert_known(
        attributes::AVAILABILITY_ZONE,
        task.availability_zone.as_deref(),
    );
    attrs.insert_known(
        attributes::ECS_CLUSTER_NAME,
        task.cluster
            .as_deref()
            .map(|c| c.rsplit('/').next().unwrap_or(c)),
    );
    attrs.insert_known(attributes::ECS_SERVICE_NAME, task.service_name.as_deref());
    attrs.insert_known(attributes::ECS_TASK_ARN, task.task_arn.as_deref());
    attrs.insert_known(
        attributes::ECS_TASK_DEFINITION_FAMILY,
        task.family.as_deref(),
    );
    attrs.insert_known(
        attributes::REGION,
        task.task_arn.as_deref().and_then(arn_region),
    );

    Ok(Plan {
        container: name,
        network_mode: mode,
        address,
        port: published_port,
        task_id: task.task_arn.as_deref().and_then(task_id),
        attributes: attrs,
    })
}

/// The container called `name`, or the list of the task's container names for the error.
pub fn find_named<'a>(task: &'a Task, name: &str) -> Result<&'a Container, String> {
    task.containers
        .iter()
        .find(|c| c.name.as_deref() == Some(name))
        .ok_or_else(|| container_names(task))
}

fn container_names(task: &Task) -> String {
    let names: Vec<&str> = task.containers.iter().map(Container::label).collect();
    if names.is_empty() {
        "no containers".to_string()
    } else {
        names.join(", ")
    }
}

/// The application: `--container`, or the only running NORMAL container that is not the sidecar.
pub fn choose_app<'a>(
    task: &'a Task,
    me: Option<&Container>,
    wanted: Option<&str>,
) -> Result<&'a Container, LocateError> {
    // The agent omits `Containers` when it has none to report yet; a running task always has some.
    if task.containers.is_empty() {
        return Err(LocateError::NotReady(
            "the task metadata lists no containers yet".to_string(),
        ));
    }
    let names = || container_names(task);
    if let Some(wanted) = wanted {
        return find_named(task, wanted).map_err(|names| {
            LocateError::Invalid(format!(
                "--container (CLOUDMAP_CONTAINER) = {wanted:?}: the task has no such container (it has: {names})"
            ))
        });
    }
    let candidates: Vec<&Container> = task
        .containers
        .iter()
        .filter(|c| !c.is_ecs_internal() && !c.is_stopped())
        .filter(|c| me.is_none_or(|me| !c.is_same(me)))
        .collect();
    match candidates.as_slice() {
        [one] => Ok(one),
        [] => Err(LocateError::Invalid(format!(
            "no application container found in the task (containers: {}): set --container (CLOUDMAP_CONTAINER)",
            names()
        ))),
        many => Err(LocateError::Invalid(format!(
            "the task has {} possible application containers ({}): set --container (CLOUDMAP_CONTAINER) to one of them",
            many.len(),
            many.iter().map(|c| c.label()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

fn first_network(c: &Container) -> Option<&Network> {
    c.networks.as_ref().and_then(|n| n.first())
}

fn first_addr<T: std::str::FromStr>(list: Option<&[String]>) -> Option<T> {
    list?.iter().find_map(|a| a.trim().parse::<T>().ok())
}

/// awsvpc and host mode: a container with exactly one distinct TCP port needs no `--port`.
fn single_container_port(c: &Container) -> Option<u16> {
    let mut ports: Vec<u16> = c
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("tcp") == "tcp")
        .filter_map(|p| p.container_port)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    match ports.as_slice() {
        [one] => Some(*one),
        _ => None,
    }
}

/// bridge mode: the host port Docker mapped to the application's container port. Docker with IPv6
/// lists each binding twice (`0.0.0.0` and `::`); a missing mapping or `HostPort` 0 means the agent
/// has not reported the binding yet.
fn host_port(c: &Container, name: &str, wanted: Option<u16>) -> Result<u16, LocateError> {
    let tcp: Vec<&Port> = c
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("tcp") == "tcp")
        .collect();
    let container_port = match wanted {
        Some(p) => p,
        None => {
            let mut distinct: Vec<u16> = tcp.iter().filter_map(|p| p.container_port).collect();
            distinct.sort_unstable();
            distinct.dedup();
            match distinct.as_slice() {
                [one] => *one,
                [] => {
                    return Err(LocateError::NotReady(format!(
                        "container {name} has no port mapping in the task metadata yet (bridge mode publishes the host port; set --port to the container port)"
                    )))
                }
                many => {
                    return Err(LocateError::Invalid(format!(
                        "container {name} maps several ports ({}): set --port (CLOUDMAP_PORT) to the application's container port",
                        many.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
                    )))
                }
            }
        }
    };
    tcp.iter()
        .filter(|p| p.container_port == Some(container_port))
        .find_map(|p| p.host_port.filter(|hp| *hp > 0))
        .ok_or_else(|| {
            LocateError::NotReady(format!(
                "container {name} has no host port mapped to container port {container_port} yet (bridge mode publishes the host port; the task metadata has no such mapping, or HostPort 0)"
            ))
        })
}

/// The task ID: the last segment of the task ARN (32 hex characters, or a UUID on old tasks).
pub fn task_id(arn: &str) -> Option<String> {
    arn.rsplit('/')
        .next()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn arn_region(arn: &str) -> Option<&str> {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    (parts.len() == 6 && parts[0] == "arn" && !parts[3].is_empty()).then(|| parts[3])
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Task {
        let path = format!("{}/tests/data/ecs-v4/{name}", env!("CARGO_MANIFEST_DIR"));
        let body = std::fs::read_to_string(&path).expect(&path);
        serde_json::from_str(&body).expect(&path)
    }

    fn sidecar() -> Container {
        Container {
            name: Some("cloudmap-sidecar".into()),
            docker_id: Some("sidecar".into()),
            ..Container::default()
        }
    }

    #[test]
    fn fargate_awsvpc_task_publishes_the_eni_address() {
        let task = fixture("docs-2020-fargate-pv14-task.json");
        let plan = plan(&task, Some(&sidecar()), None, Some(8080)).unwrap();
        assert_eq!(plan.container, "query-metadata");
        assert_eq!(plan.network_mode, "awsvpc");
        assert_eq!(
            plan.address,
            Address::Task {
                ipv4: Some("10.0.0.108".parse().unwrap()),
                ipv6: None
            }
        );
        assert_eq!(plan.port, Some(8080));
        assert_eq!(
            plan.task_id.as_deref(),
            Some("febee046097849aba589d4435207c04a")
        );
        assert_eq!(plan.attributes.get("ECS_CLUSTER_NAME"), Some("default"));
        assert_eq!(
            plan.attributes.get("ECS_TASK_ARN"),
            Some(
                "arn:aws:ecs:us-west-2:111122223333:task/default/febee046097849aba589d4435207c04a"
            )
        );
        assert_eq!(plan.attributes.get("AVAILABILITY_ZONE"), Some("us-west-2c"));
        assert_eq!(plan.attributes.get("REGION"), Some("us-west-2"));
        assert_eq!(
            plan.attributes.get("ECS_TASK_DEFINITION_FAMILY"),
            Some("query-metadata")
        );
    }

    #[test]
    fn ec2_awsvpc_task_skips_the_pause_container_and_the_sidecar() {
        let task = fixture("docs-ec2-awsvpc-task.json");
        // The "curl" container is the one that asked: with it as the sidecar, no app remains.
        let me = task
            .containers
            .iter()
            .find(|c| c.name.as_deref() == Some("curl"))
            .cloned();
        let err = plan(&task, me.as_ref(), None, None).unwrap_err();
        assert!(
            matches!(err, LocateError::Invalid(ref m) if m.contains("no application container")),
            "{err:?}"
        );
        let plan = plan(&task, Some(&sidecar()), None, None).unwrap();
        assert_eq!(plan.container, "curl");
        assert_eq!(
            plan.address,
            Address::Task {
                ipv4: Some("10.0.2.61".parse().unwrap()),
                ipv6: None
            }
        );
        assert_eq!(
            plan.task_id.as_deref(),
            Some("158d1c8083dd49d6b527399fd6414f5c")
        );
        assert_eq!(plan.attributes.get("ECS_CLUSTER_NAME"), Some("default"));
        assert_eq!(plan.attributes.get("ECS_SERVICE_NAME"), Some("MyService"));
        assert_eq!(plan.port, None);
    }

    #[test]
    fn several_candidates_need_container_and_unknown_names_are_listed() {
        let task = fixture("datadog-integrations-fargate-task-2containers.json");
        let err = plan(&task, Some(&sidecar()), None, None).unwrap_err();
        assert!(
            matches!(err, LocateError::Invalid(ref m) if m.contains("dd-agent, apmtest-ping")),
            "{err:?}"
        );
        let ok = plan(&task, Some(&sidecar()), Some("apmtest-ping"), Some(80)).unwrap();
        assert_eq!(ok.container, "apmtest-ping");
        let err = plan(&task, Some(&sidecar()), Some("nope"), None).unwrap_err();
        assert!(
            matches!(err, LocateError::Invalid(ref m) if m.contains("no such container")),
            "{err:?}"
        );
    }

    #[test]
    fn missing_networks_or_addresses_are_not_ready_yet() {
        let task = fixture("sc-agent-containers-without-networks-minimal.json");
        assert!(matches!(
            plan(&task, None, None, None),
            Err(LocateError::NotReady(_))
        ));
        let task = fixture("sc-agent-awsvpc-networks-without-ips-minimal.json");
        assert!(matches!(
            plan(&task, None, None, None),
            Err(LocateError::NotReady(_))
        ));
    }

    #[test]
    fn the_task_id_is_the_last_arn_segment() {
        assert_eq!(
            task_id(
                "arn:aws:ecs:us-west-2:111122223333:task/default/158d1c8083dd49d6b527399fd6414f5c"
            )
            .as_deref(),
            Some("158d1c8083dd49d6b527399fd6414f5c")
        );
        assert_eq!(
            task_id("arn:aws:ecs:us-east-1:012345678910:task/9781c248-0edd-4cdb-9a93-f63cb662a5d3")
                .as_deref(),
            Some("9781c248-0edd-4cdb-9a93-f63cb662a5d3")
        );
        assert_eq!(
            arn_region("arn:aws:ecs:eu-west-1:1:task/x"),
            Some("eu-west-1")
        );
        assert_eq!(arn_region("TestTask"), None);
    }
}
