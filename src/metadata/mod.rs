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
}

/// One attempt at finding where we are; the lifecycle retries `NotReady` within its deadline.
#[allow(async_fn_in_trait)]
pub trait Locator {
    async fn locate(&self) -> Result<Location, LocateError>;
}

/// The real locator.
#[derive(Debug)]
pub struct Discovery {
    http: reqwest::Client,
    ecs_uri: Option<String>,
    imds: imds::Imds,
    selection: Selection,
}

impl Discovery {
    pub fn new(ecs_uri: Option<String>, selection: Selection) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(3))
            .no_proxy()
            .build()
            .unwrap_or_default();
        Discovery {
            http,
            ecs_uri: ecs_uri.map(|u| u.trim_end_matches('/').to_string()),
            imds: imds::Imds::default(),
            selection,
        }
    }

    /// `GET` a metadata document. Errors are "not ready": the agent answers 5xx or 404 while it
    /// starts, and its error bodies are bare JSON strings.
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
            let detail: String = serde_json::from_str::<String>(&body)
                .unwrap_or(body)
                .chars()
                .take(200)
                .collect();
            return Err(not_ready(format!("HTTP {status}: {detail}")));
        }
        serde_json::from_str(&body).map_err(|e| not_ready(format!("unexpected response ({e})")))
    }

    async fn locate_ecs(&self, uri: &str) -> Result<Location, LocateError> {
        let me: ecs::Container = self.get_json(uri).await?;
        let task: ecs::Task = self.get_json(&format!("{uri}/task")).await?;
        let sel = &self.selection;
        let plan = ecs::plan(&task, Some(&me), sel.container.as_deref(), sel.port)?;
        let mut attrs = plan.attributes.clone();
        let (mut ipv4, mut ipv6) = (None, None);
        match plan.address {
            ecs::Address::Task { ipv4: v4, ipv6: v6 } => {
                ipv4 = v4;
                ipv6 = v6;
            }
            // bridge/host publish the instance's address; --ip saves the IMDS round trip.
            ecs::Address::Host if sel.ip.is_none() => {
                let host = self.imds.host().await?;
                ipv4 = Some(host.ipv4);
                attrs.insert(attributes::EC2_INSTANCE_ID, &host.instance_id);
                attrs.insert_known(
                    attributes::AVAILABILITY_ZONE,
                    host.availability_zone.as_deref(),
                );
            }
            ecs::Address::Host => {}
        }
        Ok(Location {
            ipv4,
            ipv6,
            port: plan.port,
            instance_id: plan.task_id,
            attributes: attrs,
            source: format!("ecs {}", plan.network_mode),
        })
    }

    async fn locate_ec2(&self) -> Result<Location, LocateError> {
        let host = self.imds.host().await?;
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
            source: "ec2".to_string(),
        })
    }
}

impl Locator for Discovery {
    async fn locate(&self) -> Result<Location, LocateError> {
        let sel = &self.selection;
        let mut loc = match (&self.ecs_uri, sel.ip, &sel.instance_id) {
            (Some(uri), _, _) => self.locate_ecs(uri).await?,
            // Everything given: no metadata at all (local runs, tests, unusual hosts).
            (None, Some(_), Some(_)) => Location {
                ipv4: None,
                ipv6: None,
                port: sel.port,
                instance_id: None,
                attributes: Attributes::default(),
                source: "static".to_string(),
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
