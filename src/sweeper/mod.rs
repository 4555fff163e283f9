//! The stale-instance sweeper, `cloudmap-sweeper` (built with `--features sweeper`, so the
//! sidecar binary carries none of its SDKs).
//!
//! Cloud Map expires nothing: an instance whose sidecar was SIGKILLed, OOM-killed or lost with its
//! host stays registered, and HEALTHY, until someone deregisters it. A pass lists the service's
//! instances, keeps those carrying the sidecar's ownership marker (`REGISTERED_BY=cloudmap-sidecar`
//! plus `ECS_TASK_ARN` or `EC2_INSTANCE_ID`), asks ECS or EC2 whether each owner still runs, and
//! deregisters the instances of owners reported stopped, terminated or missing, inside the rails
//! of [`plan::decide`].
//!
//! - [`config`]: flags and variables.
//! - [`owner`]: ownership attributes → [`owner::Owner`]; what an owner API said.
//! - [`ecs`], [`ec2`]: the owner checks.
//! - [`plan`]: the decision and its safety rails (pure).
//! - [`run`]: passes, once or on an interval, until SIGTERM.

pub mod config;
pub mod ec2;
pub mod ecs;
pub mod owner;
pub mod plan;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use aws_sdk_servicediscovery::operation::get_instance::GetInstanceError;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::lifecycle::shutdown::{Stop, StopRequests};
use crate::registry::cloudmap::CloudMap;
use crate::registry::Registry;
use config::SweeperSettings;
use owner::{ownership, Owner, OwnerState, Ownership};
use plan::{Checked, Plan, Removal};

/// How long one deregistration (call + operation) may take: Cloud Map operations normally end in
/// seconds; a minute covers a slow Route 53 change without letting one instance stall the pass.
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(60);
/// Deregistrations in flight at once: fast enough for a large clean-up, gentle on Cloud Map's
/// unpublished rate limits.
const CONCURRENCY: usize = 4;

/// How the sweeper ended. The codes follow the sidecar's where they mean the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepStatus {
    /// Every stale instance found was removed (or listed, in a dry run); or a loop was stopped.
    Clean = 0,
    /// The pass could not run (listing failed) or a deregistration failed.
    Failure = 1,
    /// Configuration that cannot work.
    Config = 2,
    /// The pass left instances that may be stale: a rail held them back, or their owner could not
    /// be checked. The log says which and why.
    Incomplete = 3,
}

impl SweepStatus {
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// One registered instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub id: String,
    pub attributes: HashMap<String, String>,
}

/// The real parts.
pub struct Sweeper {
    cloudmap: CloudMap,
    ecs: aws_sdk_ecs::Client,
    ec2: ec2::Ec2Api,
    region: String,
}

impl Sweeper {
    pub fn from_config(sdk: &aws_config::SdkConfig, region: &str) -> Self {
        Sweeper {
            cloudmap: CloudMap::from_config(sdk),
            ecs: aws_sdk_ecs::Client::new(sdk),
            ec2: ec2::Ec2Api::from_config(sdk, region),
            region: region.to_string(),
        }
    }

    /// `ListInstances`, every page.
    async fn list(&self, service_id: &str) -> Result<Vec<Listed>, String> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .cloudmap
                .client()
                .list_instances()
                .service_id(service_id)
                .max_results(100)
                .set_next_token(token.clone())
                .send()
                .await
                .map_err(|e| {
                    format!(
                        "ListInstances for service {service_id} failed: {} (check --service-id, AWS_REGION and the servicediscovery:ListInstances permission)",
                        crate::metadata::error_chain(&e)
                    )
                })?;
            out.extend(page.instances().iter().map(|i| Listed {
                id: i.id().unwrap_or_default().to_string(),
                attributes: i.attributes().cloned().unwrap_or_default(),
            }));
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                return Ok(out);
            }
        }
    }

    /// Ask each owner's API, in batches.
    async fn check(&self, owned: &[(String, Owner)]) -> Vec<Checked> {
        let tasks: Vec<(String, String)> = owned
            .iter()
            .filter_map(|(_, o)| match o {
                Owner::EcsTask { cluster, task_arn } => Some((cluster.clone(), task_arn.clone())),
                Owner::Ec2Instance { .. } => None,
            })
            .collect();
        let hosts: Vec<(String, bool)> = owned
            .iter()
            .filter_map(|(_, o)| match o {
                Owner::Ec2Instance { id, .. } => Some((id.clone(), o.in_region(&self.region))),
                Owner::EcsTask { .. } => None,
            })
            .collect();
        let task_states = if tasks.is_empty() {
            HashMap::new()
        } else {
            ecs::check(&self.ecs, &self.region, &tasks).await
        };
        let host_states = if hosts.is_empty() {
            HashMap::new()
        } else {
            ec2::check(&self.ec2, &hosts).await
        };
        owned
            .iter()
            .map(|(id, owner)| {
                let state = match owner {
                    Owner::EcsTask { task_arn, .. } => task_states.get(task_arn).cloned(),
                    Owner::Ec2Instance { id: host, .. } => host_states.get(host).cloned(),
                };
                Checked {
                    instance_id: id.clone(),
                    owner: owner.clone(),
                    state: state.unwrap_or_else(|| {
                        OwnerState::Unknown("the owner check returned nothing for it".to_string())
                    }),
                }
            })
            .collect()
    }

    /// Just before removing: the instance must still be there with the same owner. A sidecar may
    /// have registered the same instance ID again since the listing (an upsert), and Cloud Map has
    /// no conditional delete.
    async fn still_stale(&self, service_id: &str, removal: &Removal) -> Result<bool, String> {
        match self
            .cloudmap
            .client()
            .get_instance()
            .service_id(service_id)
            .instance_id(&removal.instance_id)
            .send()
            .await
        {
            Ok(out) => {
                let attrs = out
                    .instance()
                    .and_then(|i| i.attributes())
                    .cloned()
                    .unwrap_or_default();
                Ok(ownership(&attrs) == Ownership::Owned(removal.owner.clone()))
            }
            Err(e) => match e.as_service_error() {
                Some(GetInstanceError::InstanceNotFound(_)) => Ok(false),
                _ => Err(format!(
                    "GetInstance failed: {}",
                    crate::metadata::error_chain(&e)
                )),
            },
        }
    }

    async fn remove(&self, service_id: &str, removal: &Removal) -> Result<bool, String> {
        if !self.still_stale(service_id, removal).await? {
            info!(event = "skipped", instance_id = %removal.instance_id,
                "instance changed or disappeared since the listing; leaving it");
            return Ok(false);
        }
        self.cloudmap
            .deregister(
                service_id,
                &removal.instance_id,
                Instant::now() + DEREGISTER_TIMEOUT,
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(true)
    }

    /// One pass: list, check owners, decide, deregister (unless dry run).
    pub async fn pass(&self, settings: &SweeperSettings) -> SweepStatus {
        let service_id = settings.service_id.as_str();
        let listed = match self.list(service_id).await {
            Ok(l) => l,
            Err(why) => {
                error!(event = "pass_failed", "{why}");
                return SweepStatus::Failure;
            }
        };
        let mut owned = Vec::new();
        let mut foreign = 0usize;
        let mut unreadable = Vec::new();
        for inst in &listed {
            match ownership(&inst.attributes) {
                Ownership::Foreign => foreign += 1,
                Ownership::Owned(o) => owned.push((inst.id.clone(), o)),
                Ownership::Unreadable(why) => unreadable.push((inst.id.clone(), why)),
            }
        }
        for (id, why) in &unreadable {
            warn!(event = "unreadable_owner", instance_id = %id, "marked instance left alone: {why}");
        }
        let checked = self.check(&owned).await;
        let plan = plan::decide(listed.len(), checked, settings.max_fraction);
        report(&plan, foreign, settings.dry_run);
        let mut status = if plan.incomplete() || !unreadable.is_empty() {
            SweepStatus::Incomplete
        } else {
            SweepStatus::Clean
        };
        if settings.dry_run || plan.remove.is_empty() {
            return status;
        }
        let queue = Mutex::new(plan.remove.iter());
        let failed = Mutex::new(0usize);
        let removed = Mutex::new(0usize);
        let worker = || async {
            loop {
                let next = match queue.lock() {
                    Ok(mut q) => q.next(),
                    Err(_) => None,
                };
                let Some(r) = next else { break };
                match self.remove(service_id, r).await {
                    Ok(true) => {
                        info!(event = "removed", instance_id = %r.instance_id, owner = %r.owner,
                            reason = %r.reason, "deregistered stale instance");
                        if let Ok(mut n) = removed.lock() {
                            *n += 1;
                        }
                    }
                    Ok(false) => {}
                    Err(why) => {
                        error!(event = "remove_failed", instance_id = %r.instance_id, "{why}");
                        if let Ok(mut n) = failed.lock() {
                            *n += 1;
                        }
                    }
                }
            }
        };
        join_all(
            (0..CONCURRENCY.min(plan.remove.len()))
                .map(|_| worker())
                .collect(),
        )
        .await;
        let failed = failed.into_inner().unwrap_or_default();
        let removed = removed.into_inner().unwrap_or_default();
        info!(event = "pass_done", removed, failed, "pass finished");
        if failed > 0 {
            status = SweepStatus::Failure;
        }
        status
    }
}

/// Poll futures together on the current task (they need not be `Send`).
async fn join_all<F: std::future::Future<Output = ()>>(futures: Vec<F>) {
    let mut futures: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        futures.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if futures.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}

/// The pass's decision, one line per instance that matters, then a summary.
fn report(plan: &Plan, foreign: usize, dry_run: bool) {
    for (id, why) in &plan.unverified {
        warn!(event = "owner_unknown", instance_id = %id, "owner could not be checked; keeping the instance: {why}");
    }
    if let Some(last) = &plan.kept_last {
        warn!(event = "kept_last", instance_id = %last.instance_id, owner = %last.owner, reason = %last.reason,
            "stale, but removing it would leave the service with no instances; keeping it");
    }
    if let Some(why) = &plan.refused {
        error!(event = "refused", "{why}");
    }
    for r in &plan.remove {
        if dry_run {
            info!(event = "would_remove", instance_id = %r.instance_id, owner = %r.owner,
                reason = %r.reason, "dry run: would deregister stale instance");
        }
    }
    info!(
        event = "pass_plan",
        total = plan.total,
        foreign,
        alive = plan.alive,
        stale = plan.remove.len() + usize::from(plan.kept_last.is_some()),
        to_remove = if plan.refused.is_some() {
            0
        } else {
            plan.remove.len()
        },
        unverified = plan.unverified.len(),
        dry_run,
        "pass planned"
    );
}

/// Run passes: one, or one per `--interval` until a stop request. A stop during a pass lets it
/// finish (a half-done pass is safe, but a finished one is what the operator asked for); SIGQUIT
/// or a third signal abandons it.
pub async fn run(settings: SweeperSettings, mut stops: StopRequests) -> SweepStatus {
    info!(
        event = "starting",
        version = env!("CARGO_PKG_VERSION"),
        "{}",
        settings.summary()
    );
    let sdk = match crate::aws_config_with_region().await {
        Ok(sdk) => sdk,
        Err(why) => {
            error!(event = "config_error", "{why}");
            return SweepStatus::Config;
        }
    };
    // Present: aws_config_with_region checked it.
    let region = sdk.region().map(|r| r.to_string()).unwrap_or_default();
    let sweeper = Sweeper::from_config(&sdk, &region);
    let mut stopping = false;
    loop {
        let pass = sweeper.pass(&settings);
        tokio::pin!(pass);
        let status = loop {
            tokio::select! {
                status = &mut pass => break status,
                stop = stops.next() => match stop {
                    Stop::Immediate => {
                        warn!(event = "stopping", "immediate stop: abandoning the pass");
                        return SweepStatus::Incomplete;
                    }
                    Stop::Graceful | Stop::SkipDrain => {
                        if !stopping {
                            info!(event = "stopping", "stop requested: finishing the current pass first");
                        }
                        stopping = true;
                    }
                },
            }
        };
        let Some(interval) = settings.interval else {
            return status;
        };
        if stopping {
            info!(event = "stopped", "stopped after the pass");
            return SweepStatus::Clean;
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stops.next() => {
                info!(event = "stopped", "stopped between passes");
                return SweepStatus::Clean;
            }
        }
    }
}
