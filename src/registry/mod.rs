//! Where instances are registered: a narrow trait, so the lifecycle can be tested against a fake
//! that records calls, and [`cloudmap::CloudMap`], the real AWS Cloud Map client.

pub mod cloudmap;
pub mod discover;

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use crate::attributes::Attributes;
use crate::config::ServiceRef;

/// What `GetService` told us, decided once at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    /// The ID (or ARN, for shared services) to pass as `ServiceId` in every call.
    pub id: String,
    pub name: String,
    pub namespace_id: String,
    /// `HealthCheckCustomConfig` is set: `UpdateInstanceCustomHealthStatus` works.
    pub custom_health: bool,
    /// A Route 53 health check probes the instance itself.
    pub route53_health: bool,
    /// DNS records Cloud Map creates per instance; empty for HTTP-only services.
    pub dns_records: Vec<DnsRecord>,
}

impl ServiceInfo {
    /// The longest a DNS client may keep our address after deregistration.
    pub fn max_ttl(&self) -> Duration {
        self.dns_records
            .iter()
            .map(|r| Duration::from_secs(r.ttl))
            .max()
            .unwrap_or_default()
    }

    pub fn has_record(&self, kind: RecordKind) -> bool {
        self.dns_records.iter().any(|r| r.kind == kind)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    A,
    Aaaa,
    Srv,
    Cname,
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RecordKind::A => "A",
            RecordKind::Aaaa => "AAAA",
            RecordKind::Srv => "SRV",
            RecordKind::Cname => "CNAME",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsRecord {
    pub kind: RecordKind,
    pub ttl: u64,
}

/// Custom health status as Cloud Map knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Unhealthy,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "HEALTHY",
            Health::Unhealthy => "UNHEALTHY",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a registry call did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryError {
    /// The service or namespace does not exist (or is not visible to these credentials).
    NotFound(String),
    /// Cloud Map refused the request as invalid; retrying the same request cannot help.
    Invalid(String),
    /// Credentials or IAM policy do not allow it.
    Denied(String),
    /// The asynchronous operation ended in `FAIL`.
    OperationFailed {
        operation_id: String,
        code: String,
        message: String,
    },
    /// The instance is not registered (only reported where that is not success).
    InstanceNotFound(String),
    /// The phase deadline passed; the last error is kept for the log.
    DeadlineExceeded { what: String, last_error: String },
    /// Cloud Map accepted the request (it returned an operation), but its outcome could not be
    /// learnt (e.g. `GetOperation` denied): the change may or may not have happened.
    Unconfirmed { operation_id: String, error: String },
}

impl RegistryError {
    /// A problem the operator must fix in configuration or IAM (exit 2 at start-up, when
    /// nothing is registered yet).
    pub fn is_configuration(&self) -> bool {
        matches!(self, RegistryError::NotFound(_) | RegistryError::Invalid(_))
    }
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryError::NotFound(m) => write!(f, "{m}"),
            RegistryError::Invalid(m) => write!(f, "Cloud Map rejected the request: {m}"),
            RegistryError::Denied(m) => write!(
                f,
                "access denied: {m} (grant the IAM actions listed in the README to the task role)"
            ),
            RegistryError::OperationFailed {
                operation_id,
                code,
                message,
            } => write!(f, "operation {operation_id} failed: {code}: {message}"),
            RegistryError::InstanceNotFound(id) => write!(f, "instance {id} is not registered"),
            RegistryError::Unconfirmed {
                operation_id,
                error,
            } => write!(
                f,
                "operation {operation_id} was accepted but its outcome is unknown: {error} \
                 (grant servicediscovery:GetOperation)"
            ),
            RegistryError::DeadlineExceeded { what, last_error } => {
                write!(
                    f,
                    "{what} did not complete in time; last error: {last_error}"
                )
            }
        }
    }
}

impl std::error::Error for RegistryError {}

/// The calls the lifecycle makes. Every call finishes (or gives up) by `deadline`.
#[allow(async_fn_in_trait)]
pub trait Registry {
    /// `GetService` (after name lookup, when names were given).
    async fn resolve(
        &self,
        service: &ServiceRef,
        deadline: Instant,
    ) -> Result<ServiceInfo, RegistryError>;

    /// `RegisterInstance`, followed until its operation succeeds. An upsert: `attributes` is the
    /// full set, which replaces whatever the instance had.
    async fn register(
        &self,
        service_id: &str,
        instance_id: &str,
        attributes: &Attributes,
        deadline: Instant,
    ) -> Result<(), RegistryError>;

    /// `UpdateInstanceCustomHealthStatus`.
    async fn set_health(
        &self,
        service_id: &str,
        instance_id: &str,
        health: Health,
        deadline: Instant,
    ) -> Result<(), RegistryError>;

    /// `DeregisterInstance`, followed until its operation succeeds; an instance that is already
    /// gone counts as success.
    async fn deregister(
        &self,
        service_id: &str,
        instance_id: &str,
        deadline: Instant,
    ) -> Result<(), RegistryError>;

    /// `GetInstance`: the attributes Cloud Map holds for the instance, or `None` when it is not
    /// registered (for the periodic re-assert).
    async fn instance(
        &self,
        service_id: &str,
        instance_id: &str,
        deadline: Instant,
    ) -> Result<Option<Attributes>, RegistryError>;
}
