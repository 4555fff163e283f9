//! Where am I: the address, port, instance ID and placement attributes to register, from the ECS
//! task metadata endpoint, EC2 instance metadata, or the operator's `--ip`/`--instance-id`.

pub mod ecs;
pub mod imds;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use crate::attributes::{self, Attributes};

/// What one look-up found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    pub port: Option<u16>,
    /// Task ID in ECS, instance ID on EC2; `None` when neither is known.
    pub instance_id: Option<String>,
    /// Placement attributes (AZ, cluster, family…), only those whose value is known.
    pub attributes: Attributes,
    /// For the log: "ecs awsvpc", "ecs bridge", "ec2", "static".
    pub source: String,
}

/// Why a look-up did not produce a location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocateError {
    /// Not there yet (agent starting, address not assigned, port not mapped): retry until the
    /// start deadline.
    NotReady(String),
    /// Can never work with this configuration (exit 2).
    Invalid(String),
}

impl fmt::Display for LocateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LocateError::NotReady(m) | LocateError::Invalid(m) => f.write_str(m),
        }
    }
}

/// The operator's choices that shape discovery.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    pub ip: Option<IpAddr>,
    pub port: Option<u16>,
    pub container: Option<String>,
    pub instance_id: Option<String>,
    /// `--health-from-container`: must name a container of the task.
    pub health_container: Option<String>,
}

/// One attempt at finding where we are; the lifecycle retries `NotReady` within its deadline.
#[allow(async_fn_in_trait)]
pub trait Locator {
    async fn locate(&self) -> Result<Location, LocateError>;
}

/// The ECS task metadata endpoint v4 (`ECS_CONTAINER_METADATA_URI_V4`): this container at the
/// base URL, the whole task at `…/task`.
#[derive(Debug, Clone)]
pub struct TaskMetadata {
    http: reqwest::Client,
    uri: String,
}

impl TaskMetadata {
    pub fn new(uri: &str, timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1).min(timeout))
            .timeout(timeout)
            .no_proxy()
            .build()
            .unwrap_or_default();
        TaskMetadata {
            http,
            uri: uri.trim_end_matches('/').to_string(),
        }
    }

    /// The sidecar's own container.
    pub async fn container(&self) -> Result<ecs::Container, LocateError> {
        self.get_json(&self.uri).await
    }

    /// The task with all its containers.
    pub async fn task(&self) -> Result<ecs::Task, LocateError> {
        self.get_json(&format!("{}/task", self.uri)).await
    }

    /// `GET` a metadata document. Errors are "not ready": the agent answers 5xx, 404 or 429 while it
    /// starts or is busy, and its error bodies are bare JSON strings, not objects.
    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, LocateError> {
        let not_ready =
            |why: String| LocateError::NotReady(format!("ECS task metadata {url}: {why}"));
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| not_ready(error_chain(&e)))?;
        let status = resp.status();
        let body = resp.text().await.map_err(|e| not_ready(error_chain(&e)))?;
        if !status.is_success() {
            let detail = excerpt(&serde_json::from_str::<String>(&body).unwrap_or(body));
            return Err(not_ready(format!("HTTP {status}: {detail}")));
        }
        let value: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| not_ready(format!("not JSON ({e}): {}", excerpt(&body))))?;
        match value {
            serde_json::Value::Object(_) => serde_json::from_value(value)
                .map_err(|e| not_ready(format!("unexpected response ({e})"))),
            // The agent's error bodies are JSON strings; one with status 200 is still an error.
            serde_json::Value::String(msg) => Err(not_ready(format!(
                "the ECS agent answered with an error message: {}",
                excerpt(&msg)
            ))),
            // `/tasks` (ECS Managed Instances) answers with an array of tasks; `/task` never does,
            // so the variable points at something other than this container's endpoint.
            serde_json::Value::Array(items) => Err(LocateError::Invalid(format!(
                "ECS task metadata {url} answered with a JSON array of {} tasks (the shape of the /tasks endpoint), not one task: \
                 ECS_CONTAINER_METADATA_URI_V4 must be the endpoint the ECS agent sets for this container",
                items.len()
            ))),
            other => Err(not_ready(format!(
                "unexpected response: {}",
                excerpt(&other.to_string())
            ))),
        }
    }
}

fn excerpt(s: &str) -> String {
    let one_line: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out: String = one_line.chars().take(200).collect();
    if one_line.chars().count() > 200 {
        out.push('…');
    }
    out
}

/// The real locator.
#[derive(Debug)]
pub struct Discovery {
    ecs: Option<TaskMetadata>,
    imds: imds::Imds,
    selection: Selection,
}

impl Discovery {
    /// IMDS as the SDK finds it (`AWS_EC2_METADATA_SERVICE_ENDPOINT` or the link-local address).
    pub fn new(ecs_uri: Option<String>, selection: Selection) -> Self {
        Discovery {
            ecs: ecs_uri.map(|u| TaskMetadata::new(&u, Duration::from_secs(3))),
            imds: imds::Imds::default(),
            selection,
        }
    }

    /// Use this IMDS client instead (tests point it at a loopback fake without touching the
    /// process environment; the binary passes `AWS_EC2_METADATA_DISABLED`).
    pub fn with_imds(mut self, imds: imds::Imds) -> Self {
        self.imds = imds;
        self
    }

    async fn locate_ecs(&self, meta: &TaskMetadata) -> Result<Location, LocateError> {
        let (me, task) = tokio::try_join!(meta.container(), meta.task())?;
        let sel = &self.selection;
        if let Some(name) = &sel.health_container {
            ecs::find_named(&task, name).map_err(|names| {
                LocateError::Invalid(format!(
                    "--health-from-container (CLOUDMAP_HEALTH_FROM_CONTAINER) = {name:?}: the task has no such container (it has: {names})"
                ))
            })?;
        }
        let plan = ecs::plan(&task, Some(&me), sel.container.as_deref(), sel.port)?;
        let mut attrs = plan.attributes.clone();
        let (mut ipv4, mut ipv6) = (None, None);
        let mut source = format!("ecs {} (container {}", plan.network_mode, plan.container);
        match plan.address {
            ecs::Address::Task { ipv4: v4, ipv6: v6 } => {
                ipv4 = v4;
                ipv6 = v6;
                source.push_str(match (v4, v6) {
                    (Some(_), Some(_)) => ", task ENI: dual-stack",
                    (None, Some(_)) => ", task ENI: IPv6 only",
                    _ => ", task ENI: IPv4 only",
                });
            }
            // bridge/host publish the instance's address, never the container's Docker network
            // address; --ip saves the IMDS round trip.
            ecs::Address::Host if sel.ip.is_none() => {
                let host = self.imds.host(imds::Purpose::EcsHost).await?;
                ipv4 = Some(host.ipv4);
                attrs.insert(attributes::EC2_INSTANCE_ID, &host.instance_id);
                // The task's own AZ, when it reports one, is the authority; IMDS fills the gap.
                if attrs.get(attributes::AVAILABILITY_ZONE).is_none() {
                    attrs.insert_known(
                        attributes::AVAILABILITY_ZONE,
                        host.availability_zone.as_deref(),
                    );
                }
                source.push_str(", container instance IPv4 from EC2 instance metadata");
            }
            ecs::Address::Host => source.push_str(", address from --ip"),
        }
        source.push(')');
        Ok(Location {
            ipv4,
            ipv6,
            port: plan.port,
            instance_id: plan.task_id,
            attributes: attrs,
            source,
        })
    }

    async fn locate_ec2(&self) -> Result<Location, LocateError> {
        if self.selection.ip.is_some() {
            // The address is given (and applied by `apply_overrides`): only the ID is missing.
            let (instance_id, az) = self.imds.instance(imds::Purpose::InstanceId).await?;
            let mut attrs = Attributes::default();
            attrs.insert(attributes::EC2_INSTANCE_ID, &instance_id);
            attrs.insert_known(attributes::AVAILABILITY_ZONE, az.as_deref());
            return Ok(Location {
                ipv4: None,
                ipv6: None,
                port: self.selection.port,
                instance_id: Some(instance_id),
                attributes: attrs,
                source: "ec2 (EC2 instance metadata: instance ID; address from --ip)".to_string(),
            });
        }
        let host = self.imds.host(imds::Purpose::PlainEc2).await?;
        let mut attrs = Attributes::default();
        attrs.insert(attributes::EC2_INSTANCE_ID, &host.instance_id);
        attrs.insert_known(
            attributes::AVAILABILITY_ZONE,
            host.availability_zone.as_deref(),
        );
        Ok(Location {
            ipv4: Some(host.ipv4),
            ipv6: None,
            port: self.selection.port,
            instance_id: Some(host.instance_id),
            attributes: attrs,
            source: "ec2 (EC2 instance metadata: private IPv4)".to_string(),
        })
    }
}

impl Discovery {
    /// The discovery every command uses, from the settings.
    pub fn from_settings(settings: &crate::config::Settings) -> Discovery {
        let selection = Selection {
            ip: settings.ip,
            port: settings.port,
            container: settings.container.clone(),
            instance_id: settings.instance_id.clone(),
            health_container: settings.health.from_container.clone(),
        };
        Discovery::new(settings.ecs_metadata_uri.clone(), selection)
            .with_imds(imds::Imds::new(None, settings.ec2_metadata_disabled))
    }
}

impl Locator for Discovery {
    async fn locate(&self) -> Result<Location, LocateError> {
        let sel = &self.selection;
        let mut loc = match (&self.ecs, sel.ip, &sel.instance_id) {
            (Some(meta), _, _) => self.locate_ecs(meta).await?,
            // Everything given: no metadata at all (local runs, tests, unusual hosts).
            (None, Some(_), Some(_)) => Location {
                ipv4: None,
                ipv6: None,
                port: sel.port,
                instance_id: None,
                attributes: Attributes::default(),
                source: "static (--ip and --instance-id)".to_string(),
            },
            (None, _, _) => self.locate_ec2().await?,
        };
        apply_overrides(&mut loc, sel);
        Ok(loc)
    }
}

/// `--ip` replaces the discovered address (of its family; the other is dropped, since it would
/// point somewhere else), `--instance-id` the discovered ID.
pub fn apply_overrides(loc: &mut Location, sel: &Selection) {
    match sel.ip {
        Some(IpAddr::V4(v4)) => {
            loc.ipv4 = Some(v4);
            loc.ipv6 = None;
        }
        Some(IpAddr::V6(v6)) => {
            loc.ipv6 = Some(v6);
            loc.ipv4 = None;
        }
        None => {}
    }
    if let Some(id) = &sel.instance_id {
        loc.instance_id = Some(id.clone());
    }
    if loc.port.is_none() {
        loc.port = sel.port;
    }
}

/// An error and its causes on one line (reqwest hides the interesting part in `source()`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        cur = s.source();
    }
    out
}
