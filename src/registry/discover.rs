//! `DiscoverInstances`: the service as clients see it.
//!
//! Cloud Map serves DiscoverInstances from a separate endpoint: the SDK's model puts the host
//! prefix `data-` in front of whatever endpoint it resolves (`data-servicediscovery.<region>…`),
//! and it does so for a custom endpoint (`AWS_ENDPOINT_URL`) too. That is wrong for a VPC
//! endpoint, whose host has no `data-` twin, and for a local emulator (`data-127.0.0.1` does not
//! resolve). This SDK version has no switch to turn host prefixes off, so `--discovery-endpoint`
//! does two things on a client of its own: it sets the endpoint, and an interceptor removes the
//! `EndpointPrefix` the operation stores in the request's configuration before the endpoint is
//! applied (and so before signing, which covers the host). Without the setting, the SDK's own rule
//! applies unchanged.

use std::collections::BTreeMap;

use aws_sdk_servicediscovery::config::interceptors::BeforeTransmitInterceptorContextMut;
use aws_sdk_servicediscovery::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_servicediscovery::error::{BoxError, SdkError};
use aws_sdk_servicediscovery::operation::discover_instances::DiscoverInstancesError;
use aws_sdk_servicediscovery::types::HealthStatusFilter;
use aws_sdk_servicediscovery::Client;
use aws_smithy_runtime_api::client::endpoint::EndpointPrefix;
use serde::Serialize;
use tokio::time::Instant;

use super::cloudmap::CloudMap;
use super::Registry;
use crate::config::{DiscoverHealth, ServiceRef};
use crate::lifecycle::oneshot::Error;

/// Cloud Map's limit of instances per service: one page holds them all.
const MAX_RESULTS: i32 = 1000;

/// Removes the operation's host prefix, so the request goes to the configured endpoint as given.
#[derive(Debug)]
struct NoHostPrefix;

impl Intercept for NoHostPrefix {
    fn name(&self) -> &'static str {
        "NoHostPrefix"
    }

    // Runs after the operation stored its prefix (before execution) and before the endpoint is
    // resolved and applied (inside each attempt).
    fn modify_before_retry_loop(
        &self,
        _context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        cfg.interceptor_state().unset::<EndpointPrefix>();
        Ok(())
    }
}

/// A client for DiscoverInstances: `endpoint` (from `--discovery-endpoint`) used as given, or
/// the SDK's `data-` endpoint when `None`.
pub fn data_client(sdk: &aws_config::SdkConfig, endpoint: Option<&str>) -> Client {
    let mut conf = aws_sdk_servicediscovery::config::Builder::from(sdk);
    if let Some(url) = endpoint {
        conf = conf.endpoint_url(url).interceptor(NoHostPrefix);
    }
    Client::from_conf(conf.build())
}

/// One instance as DiscoverInstances returns it; printed as one JSON line by `discover`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Discovered {
    pub instance_id: String,
    pub namespace: String,
    pub service: String,
    /// `HEALTHY`, `UNHEALTHY` or `UNKNOWN`; absent when Cloud Map does not say.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    pub attributes: BTreeMap<String, String>,
}

/// The namespace and service names DiscoverInstances wants, from whichever way the service was
/// named.
async fn names(
    registry: &CloudMap,
    service: &ServiceRef,
    deadline: Instant,
) -> Result<(String, String), Error> {
    match service {
        ServiceRef::Names { namespace, service } => Ok((namespace.clone(), service.clone())),
        ServiceRef::Id(_) => {
            let info = registry
                .resolve(service, deadline)
                .await
                .map_err(|e| match e {
                    e if e.is_configuration() => Error::Config(e.to_string()),
                    e => Error::Runtime(e.to_string()),
                })?;
            let out = tokio::time::timeout_at(
                deadline,
                registry
                    .client()
                    .get_namespace()
                    .id(&info.namespace_id)
                    .send(),
            )
            .await
            .map_err(|_| Error::Runtime("GetNamespace did not answer in time".to_string()))?
            .map_err(|e| {
                Error::Runtime(format!(
                    "GetNamespace {} (the namespace of service {}): {}",
                    info.namespace_id,
                    info.id,
                    crate::metadata::error_chain(&e)
                ))
            })?;
            let namespace = out
                .namespace()
                .and_then(|n| n.name())
                .unwrap_or_default()
                .to_string();
            Ok((namespace, info.name))
        }
    }
}

/// The service's instances that pass `filter`.
pub async fn discover(
    registry: &CloudMap,
    data: &Client,
    service: &ServiceRef,
    filter: DiscoverHealth,
    endpoint_given: bool,
    deadline: Instant,
) -> Result<Vec<Discovered>, Error> {
    let (namespace, name) = names(registry, service, deadline).await?;
    let request = data
        .discover_instances()
        .namespace_name(&namespace)
        .service_name(&name)
        .health_status(HealthStatusFilter::from(filter.as_str()))
        .max_results(MAX_RESULTS)
        .send();
    let out = match tokio::time::timeout_at(deadline, request).await {
        Err(_) => {
            return Err(Error::Runtime(
                "DiscoverInstances did not answer before --start-timeout".to_string(),
            ))
        }
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(discover_error(&e, &namespace, &name, endpoint_given)),
    };
    Ok(out
        .instances()
        .iter()
        .map(|i| Discovered {
            instance_id: i.instance_id().unwrap_or_default().to_string(),
            namespace: i.namespace_name().unwrap_or(&namespace).to_string(),
            service: i.service_name().unwrap_or(&name).to_string(),
            health: i.health_status().map(|h| h.as_str().to_string()),
            attributes: i
                .attributes()
                .map(|a| a.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default(),
        })
        .collect())
}

fn discover_error<R: std::fmt::Debug>(
    e: &SdkError<DiscoverInstancesError, R>,
    namespace: &str,
    service: &str,
    endpoint_given: bool,
) -> Error {
    let text = crate::metadata::error_chain(e);
    match e.as_service_error() {
        Some(DiscoverInstancesError::NamespaceNotFound(_)) => Error::Config(format!(
            "namespace {namespace:?} not found: check --namespace (CLOUDMAP_NAMESPACE) and AWS_REGION"
        )),
        Some(DiscoverInstancesError::ServiceNotFound(_)) => Error::Config(format!(
            "service {service:?} not found in namespace {namespace:?}: check --service (CLOUDMAP_SERVICE)"
        )),
        Some(DiscoverInstancesError::InvalidInput(_)) => {
            Error::Config(format!("Cloud Map rejected DiscoverInstances: {text}"))
        }
        Some(_) => Error::Runtime(format!(
            "DiscoverInstances failed: {text} (it needs the IAM action servicediscovery:DiscoverInstances)"
        )),
        None if !endpoint_given => Error::Runtime(format!(
            "DiscoverInstances failed: {text}; it goes to Cloud Map's data- endpoint: set \
             --discovery-endpoint (CLOUDMAP_DISCOVERY_ENDPOINT) for a VPC endpoint or an emulator"
        )),
        None => Error::Runtime(format!(
            "DiscoverInstances failed: {text}; check --discovery-endpoint (CLOUDMAP_DISCOVERY_ENDPOINT)"
        )),
    }
}
