//! The lifecycle's steps one at a time, for the one-shot commands and the library API: start-up
//! and registration without the health loop, and single operations on an instance. They live
//! beside the state machine so that they share its checks (service records, attributes, instance
//! ID) instead of copying them.

use std::fmt;

use tokio::time::Instant;
use tracing::{error, info};

use super::{locate_until, ExitStatus, Prepared, Sidecar, StartError};
use crate::attributes;
use crate::config::Settings;
use crate::health::Probe;
use crate::metadata::Locator;
use crate::registry::{Health, Registry, RegistryError, ServiceInfo};

/// Why a one-shot operation did not succeed. Each maps to one of the documented exit codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The configuration cannot work (exit 2); nothing was changed in Cloud Map.
    Config(String),
    /// Runtime failure (exit 1); nothing was left registered by this call.
    Runtime(String),
    /// The instance may be registered although the call failed (exit 3).
    LeftBehind(String),
}

impl Error {
    pub fn exit_status(&self) -> ExitStatus {
        match self {
            Error::Config(_) => ExitStatus::Config,
            Error::Runtime(_) => ExitStatus::Failure,
            Error::LeftBehind(_) => ExitStatus::LeftBehind,
        }
    }

    fn from_registry(e: RegistryError) -> Self {
        if e.is_configuration() {
            Error::Config(e.to_string())
        } else {
            Error::Runtime(e.to_string())
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(m) | Error::Runtime(m) | Error::LeftBehind(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

impl From<StartError> for Error {
    fn from(e: StartError) -> Self {
        match e {
            StartError::Config(m) => Error::Config(m),
            StartError::Runtime(m) => Error::Runtime(m),
        }
    }
}

/// An instance this process registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub service: ServiceInfo,
    pub instance_id: String,
    /// The status it was registered with.
    pub health: Health,
}

/// Start-up and registration as `run` does them (service, address, attributes, one probe when
/// `--health-url` is set), then return with the instance left registered.
pub async fn register<R: Registry, L: Locator, P: Probe>(
    settings: &Settings,
    registry: &R,
    locator: &L,
    probe: Option<&P>,
) -> Result<Registered, Error> {
    let ready = prepare(settings, registry, locator, probe).await?;
    register_ready(settings, registry, ready).await
}

/// What start-up established; nothing has been sent to Cloud Map that changes anything yet, so
/// this step can be abandoned at any point.
#[derive(Debug)]
pub struct Ready {
    p: Prepared,
    health: Health,
    deadline: Instant,
}

/// Start-up: service, address, instance ID, attributes and the first probe.
pub async fn prepare<R: Registry, L: Locator, P: Probe>(
    settings: &Settings,
    registry: &R,
    locator: &L,
    probe: Option<&P>,
) -> Result<Ready, Error> {
    let deadline = Instant::now() + settings.start_timeout;
    let mut sidecar = Sidecar::new(settings, registry, probe);
    let p = sidecar.prepare(locator, deadline).await?;
    let health = match probe {
        Some(probe) => sidecar.probe_once(probe).await,
        None => Health::Healthy,
    };
    if health == Health::Unhealthy && !p.service.custom_health {
        return Err(Error::Runtime(format!(
            "the application fails its health check (--health-url) and service {} has no custom \
             health check, so Cloud Map cannot hold it as unhealthy: nothing was registered",
            p.service.id
        )));
    }
    Ok(Ready {
        p,
        health,
        deadline,
    })
}

/// Register what [`prepare`] established and follow the operation. Not to be abandoned half-way:
/// Cloud Map runs one operation per instance at a time, and the outcome would be unknown.
pub async fn register_ready<R: Registry>(
    settings: &Settings,
    registry: &R,
    ready: Ready,
) -> Result<Registered, Error> {
    let Ready {
        p,
        health,
        deadline,
    } = ready;
    let mut attrs = p.attributes.clone();
    if p.service.custom_health {
        attrs.insert(attributes::AWS_INIT_HEALTH_STATUS, health.as_str());
    }
    let (service_id, id) = (&p.service.id, &p.instance_id);
    match registry.register(service_id, id, &attrs, deadline).await {
        Ok(()) => {}
        // Cloud Map may have accepted it after all: make sure nothing is left behind.
        Err(e @ RegistryError::DeadlineExceeded { .. }) => {
            return Err(undo(settings, registry, &p, e).await)
        }
        Err(e) => return Err(Error::from_registry(e)),
    }
    info!(event = "registered", instance_id = %id, service_id = %service_id, health = %health,
        attributes = %attrs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
        "instance registered");
    // Whether an upsert resets the custom status is undocumented: send it again.
    if p.service.custom_health {
        if let Err(e) = registry.set_health(service_id, id, health, deadline).await {
            return Err(undo(settings, registry, &p, e).await);
        }
    }
    Ok(Registered {
        service: p.service,
        instance_id: p.instance_id,
        health,
    })
}

/// A registration that did not complete: deregister within the stop budget, so that a failed
/// `register` leaves nothing behind (exit 1), or say that it may have (exit 3).
async fn undo<R: Registry>(
    settings: &Settings,
    registry: &R,
    p: &Prepared,
    why: RegistryError,
) -> Error {
    let (service_id, id) = (&p.service.id, &p.instance_id);
    let deadline = Instant::now() + settings.stop_timeout;
    match registry.deregister(service_id, id, deadline).await {
        Ok(()) => Error::Runtime(format!(
            "registration of {id} in {service_id} failed: {why}; nothing was left registered"
        )),
        Err(e) => {
            error!(event = "left_behind", instance_id = %id, service_id = %service_id,
                "registration failed ({why}) and so did the clean-up: {e}");
            Error::LeftBehind(format!(
                "instance {id} may still be registered in service {service_id}: registration \
                 failed ({why}), clean-up failed ({e}); remove it with \
                 `cloudmap-sidecar deregister --service-id {service_id} --instance-id {id}`"
            ))
        }
    }
}

/// The service and the instance ID an operation on an existing instance is about: `--instance-id`,
/// or the one `run` would register (ECS task ID, EC2 instance ID).
pub async fn target<R: Registry, L: Locator>(
    settings: &Settings,
    registry: &R,
    locator: &L,
    deadline: Instant,
) -> Result<(ServiceInfo, String), Error> {
    let service = registry
        .resolve(&settings.service, deadline)
        .await
        .map_err(Error::from_registry)?;
    let instance_id = match &settings.instance_id {
        Some(id) => id.clone(),
        None => locate_until(locator, deadline)
            .await?
            .instance_id
            .ok_or_else(|| {
                Error::Config(
                    "cannot tell the instance ID: set --instance-id (CLOUDMAP_INSTANCE_ID) when running outside ECS and EC2"
                        .to_string(),
                )
            })?,
    };
    Ok((service, instance_id))
}

/// Deregister and follow the operation, within `--stop-timeout`. An instance that is already
/// gone is success.
pub async fn deregister<R: Registry, L: Locator>(
    settings: &Settings,
    registry: &R,
    locator: &L,
) -> Result<(ServiceInfo, String), Error> {
    let deadline = Instant::now() + settings.stop_timeout;
    let (service, id) = target(settings, registry, locator, deadline).await?;
    deregister_instance(registry, &service.id, &id, deadline).await?;
    Ok((service, id))
}

/// `DeregisterInstance` for a known instance; a failure leaves it possibly registered (exit 3).
pub async fn deregister_instance<R: Registry>(
    registry: &R,
    service_id: &str,
    id: &str,
    deadline: Instant,
) -> Result<(), Error> {
    info!(event = "deregistering", instance_id = %id, service_id = %service_id, "deregistering");
    if let Err(e) = registry.deregister(service_id, id, deadline).await {
        error!(event = "left_behind", instance_id = %id, service_id = %service_id,
            "instance {id} may still be registered in service {service_id}: {e}");
        return Err(Error::LeftBehind(format!(
            "instance {id} may still be registered in service {service_id}: {e}"
        )));
    }
    info!(event = "deregistered", instance_id = %id, service_id = %service_id, "instance deregistered");
    Ok(())
}

/// `UpdateInstanceCustomHealthStatus` for the instance, within `--start-timeout`.
pub async fn set_health<R: Registry, L: Locator>(
    settings: &Settings,
    registry: &R,
    locator: &L,
    health: Health,
) -> Result<(ServiceInfo, String), Error> {
    let deadline = Instant::now() + settings.start_timeout;
    let (service, id) = target(settings, registry, locator, deadline).await?;
    set_instance_health(registry, &service, &id, health, deadline).await?;
    Ok((service, id))
}

/// Send a custom status for a known instance. The service's health configuration is fixed at its
/// creation: without `HealthCheckCustomConfig` there is nothing to send to.
pub async fn set_instance_health<R: Registry>(
    registry: &R,
    service: &ServiceInfo,
    id: &str,
    health: Health,
    deadline: Instant,
) -> Result<(), Error> {
    if !service.custom_health {
        return Err(Error::Config(format!(
            "service {} has no custom health check (HealthCheckCustomConfig), so its instances' \
             health cannot be set: create the service with one",
            service.id
        )));
    }
    match registry.set_health(&service.id, id, health, deadline).await {
        Ok(()) => {}
        Err(RegistryError::InstanceNotFound(_)) => {
            return Err(Error::Runtime(format!(
                "instance {id} is not registered in service {}",
                service.id
            )))
        }
        Err(e) => return Err(Error::from_registry(e)),
    }
    info!(event = "health_reported", instance_id = %id, service_id = %service.id, health = %health,
        "custom health status sent (Cloud Map applies it after about 30 s)");
    Ok(())
}
