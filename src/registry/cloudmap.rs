//! The real registry: AWS Cloud Map through `aws-sdk-servicediscovery`.
//!
//! The SDK already retries each call (standard mode: throttling, 5xx, transport errors) and signs,
//! resolves credentials and honours `AWS_ENDPOINT_URL`. This module adds what the SDK does not know:
//! that RegisterInstance and DeregisterInstance are asynchronous, that `DuplicateRequest` means
//! "wait for the other operation", and that every phase has a deadline.

use std::future::Future;

use aws_sdk_servicediscovery::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_servicediscovery::operation::deregister_instance::DeregisterInstanceError;
use aws_sdk_servicediscovery::operation::get_instance::GetInstanceError;
use aws_sdk_servicediscovery::operation::get_service::GetServiceError;
use aws_sdk_servicediscovery::operation::register_instance::RegisterInstanceError;
use aws_sdk_servicediscovery::operation::update_instance_custom_health_status::UpdateInstanceCustomHealthStatusError;
use aws_sdk_servicediscovery::types::{
    CustomHealthStatus, FilterCondition, NamespaceFilter, NamespaceFilterName, OperationStatus,
    RecordType, ServiceFilter, ServiceFilterName,
};
use aws_sdk_servicediscovery::Client;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{DnsRecord, Health, RecordKind, Registry, RegistryError, ServiceInfo};
use crate::attributes::Attributes;
use crate::backoff::Backoff;
use crate::config::ServiceRef;

/// Operation error codes worth sending the same request again for (issue a new operation).
const RETRYABLE_OPERATION_CODES: [&str; 2] = ["THROTTLED_REQUEST", "INTERNAL_FAILURE"];

/// Cloud Map through the AWS SDK.
#[derive(Clone, Debug)]
pub struct CloudMap {
    client: Client,
}

/// One attempt's verdict.
enum Attempt<T> {
    Done(T),
    /// Transient: try again after a backoff, within the deadline.
    Retry(String),
    Fail(RegistryError),
}

impl CloudMap {
    pub fn new(client: Client) -> Self {
        CloudMap { client }
    }

    /// From the standard SDK configuration chain (region, credentials, `AWS_ENDPOINT_URL`).
    pub fn from_config(sdk: &aws_config::SdkConfig) -> Self {
        CloudMap::new(Client::new(sdk))
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Wait for an asynchronous operation to end. `SUBMITTED`/`PENDING` are polled with backoff from
    /// 100 ms up to 2 s; `FAIL` is returned with Cloud Map's error code and message.
    async fn follow(&self, operation_id: &str, deadline: Instant) -> Result<(), RegistryError> {
        let mut backoff = Backoff::cloud_map();
        let what = format!("operation {operation_id}");
        loop {
            let attempt = match tokio::time::timeout_at(
                deadline,
                self.client
                    .get_operation()
                    .operation_id(operation_id)
                    .send(),
            )
            .await
            {
                Err(_) => return Err(deadline_exceeded(&what, "still running")),
                Ok(Ok(out)) => {
                    let op = out.operation();
                    match op.and_then(|o| o.status()) {
                        Some(OperationStatus::Success) => Attempt::Done(()),
                        Some(OperationStatus::Fail) => {
                            Attempt::Fail(RegistryError::OperationFailed {
                                operation_id: operation_id.to_string(),
                                code: op
                                    .and_then(|o| o.error_code())
                                    .unwrap_or("UNKNOWN")
                                    .to_string(),
                                message: op
                                    .and_then(|o| o.error_message())
                                    .unwrap_or("")
                                    .to_string(),
                            })
                        }
                        status => {
                            debug!(operation_id, ?status, "operation still running");
                            Attempt::Retry(format!("status {status:?}"))
                        }
                    }
                }
                Ok(Err(e)) => classify(&e),
            };
            match attempt {
                Attempt::Done(()) => return Ok(()),
                Attempt::Fail(e) => return Err(e),
                Attempt::Retry(why) => {
                    if !backoff.wait_plain(deadline).await {
                        return Err(deadline_exceeded(&what, &why));
                    }
                }
            }
        }
    }

    /// Run `call` until it is done or fails for good, with full-jitter backoff between attempts.
    async fn retrying<T, F, Fut>(
        &self,
        what: &str,
        deadline: Instant,
        mut call: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Attempt<T>>,
    {
        let mut backoff = Backoff::cloud_map();
        // What went wrong last, so that running out of time still says why.
        let mut last: Option<String> = None;
        loop {
            let attempt = match tokio::time::timeout_at(deadline, call()).await {
                Ok(a) => a,
                Err(_) => {
                    let why = last.unwrap_or_else(|| "no answer".to_string());
                    return Err(deadline_exceeded(what, &why));
                }
            };
            match attempt {
                Attempt::Done(v) => return Ok(v),
                Attempt::Fail(e) => return Err(e),
                Attempt::Retry(why) => {
                    warn!(attempt = backoff.attempts() + 1, "{what}: {why}; retrying");
                    if !backoff.wait(deadline).await {
                        return Err(deadline_exceeded(what, &why));
                    }
                    last = Some(why);
                }
            }
        }
    }

    /// Start an operation with `send` (which returns its ID, or `None` when there is nothing to
    /// do) and follow it; a `FAIL` for throttling or an internal failure sends a new request.
    async fn operate<F, Fut>(
        &self,
        what: &str,
        deadline: Instant,
        mut send: F,
    ) -> Result<(), RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Attempt<Option<String>>>,
    {
        let mut backoff = Backoff::cloud_map();
        loop {
            let Some(operation_id) = self.retrying(what, deadline, &mut send).await? else {
                return Ok(());
            };
            info!(operation_id = %operation_id, "{what}: following operation");
            match self.follow(&operation_id, deadline).await {
                Err(RegistryError::OperationFailed { code, message, .. })
                    if RETRYABLE_OPERATION_CODES.contains(&code.as_str()) =>
                {
                    warn!(operation_id = %operation_id, code, message, "{what}: operation failed; sending it again");
                    if !backoff.wait(deadline).await {
                        return Err(deadline_exceeded(
                            what,
                            &format!("operation {operation_id} failed: {code}"),
                        ));
                    }
                }
                Ok(()) => return Ok(()),
                Err(
                    e @ (RegistryError::OperationFailed { .. }
                    | RegistryError::DeadlineExceeded { .. }),
                ) => return Err(e),
                // Accepted, but we cannot see how it ended: the caller must not assume either way
                // (a registration may have happened, a deregistration may not have).
                Err(e) => {
                    return Err(RegistryError::Unconfirmed {
                        operation_id,
                        error: e.to_string(),
                    })
                }
            }
        }
    }

    /// After `DuplicateRequest`: Cloud Map runs one operation per instance at a time, so wait for
    /// the one it names (whatever its outcome), then send ours again. The SDK does not retry this.
    async fn wait_for_duplicate(
        &self,
        duplicate: Option<&str>,
        deadline: Instant,
    ) -> Attempt<Option<String>> {
        match duplicate {
            Some(op) => {
                info!(
                    operation_id = op,
                    "another operation on this instance is running; waiting for it"
                );
                match self.follow(op, deadline).await {
                    Err(RegistryError::DeadlineExceeded { what, last_error }) => {
                        Attempt::Fail(RegistryError::DeadlineExceeded { what, last_error })
                    }
                    _ => Attempt::Retry(format!("DuplicateRequest: operation {op} was running")),
                }
            }
            None => Attempt::Retry("DuplicateRequest".to_string()),
        }
    }

    async fn namespace_id(
        &self,
        namespace: &str,
        deadline: Instant,
    ) -> Result<String, RegistryError> {
        let mut found: Vec<String> = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let filter = NamespaceFilter::builder()
                .name(NamespaceFilterName::Name)
                .values(namespace)
                .condition(FilterCondition::Eq)
                .build()
                .map_err(|e| RegistryError::Invalid(e.to_string()))?;
            let page = self
                .retrying("ListNamespaces", deadline, || {
                    let req = self
                        .client
                        .list_namespaces()
                        .filters(filter.clone())
                        .set_next_token(token.clone());
                    async move {
                        match req.send().await {
                            Ok(out) => Attempt::Done(out),
                            Err(e) => classify(&e),
                        }
                    }
                })
                .await?;
            // Filters are a hint (some implementations ignore them): check every name ourselves.
            found.extend(
                page.namespaces()
                    .iter()
                    .filter(|n| n.name() == Some(namespace))
                    .filter_map(|n| n.id().map(str::to_string)),
            );
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(RegistryError::NotFound(format!(
                "namespace {namespace:?} not found (--namespace, CLOUDMAP_NAMESPACE): check the name and AWS_REGION"
            ))),
            n => Err(RegistryError::Invalid(format!(
                "{n} namespaces are named {namespace:?} ({}): use --service-id (CLOUDMAP_SERVICE_ID) instead",
                found.join(", ")
            ))),
        }
    }

    async fn service_id_by_name(
        &self,
        namespace: &str,
        service: &str,
        deadline: Instant,
    ) -> Result<ServiceInfo, RegistryError> {
        let namespace_id = self.namespace_id(namespace, deadline).await?;
        let mut candidates: Vec<String> = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let filter = ServiceFilter::builder()
                .name(ServiceFilterName::NamespaceId)
                .values(namespace_id.clone())
                .condition(FilterCondition::Eq)
                .build()
                .map_err(|e| RegistryError::Invalid(e.to_string()))?;
            let page = self
                .retrying("ListServices", deadline, || {
                    let req = self
                        .client
                        .list_services()
                        .filters(filter.clone())
                        .set_next_token(token.clone());
                    async move {
                        match req.send().await {
                            Ok(out) => Attempt::Done(out),
                            Err(e) => classify(&e),
                        }
                    }
                })
                .await?;
            candidates.extend(
                page.services()
                    .iter()
                    .filter(|s| s.name() == Some(service))
                    .filter_map(|s| s.id().map(str::to_string)),
            );
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        // Summaries do not carry the namespace: confirm it with GetService.
        for id in candidates {
            let info = self.get_service(&id, deadline).await?;
            if info.namespace_id == namespace_id {
                return Ok(info);
            }
        }
        Err(RegistryError::NotFound(format!(
            "service {service:?} not found in namespace {namespace:?} ({namespace_id}) \
             (--service, CLOUDMAP_SERVICE): check the name, or create the service"
        )))
    }

    async fn get_service(&self, id: &str, deadline: Instant) -> Result<ServiceInfo, RegistryError> {
        let out = self
            .retrying("GetService", deadline, || {
                let req = self.client.get_service().id(id);
                async move {
                    match req.send().await {
                        Ok(out) => Attempt::Done(out),
                        Err(e) => match e.as_service_error() {
                            Some(GetServiceError::ServiceNotFound(_)) => Attempt::Fail(RegistryError::NotFound(format!(
                                "service {id} not found (--service-id, CLOUDMAP_SERVICE_ID): check the ID and AWS_REGION"
                            ))),
                            Some(GetServiceError::InvalidInput(m)) => {
                                Attempt::Fail(RegistryError::Invalid(format!("service {id}: {m}")))
                            }
                            _ => classify(&e),
                        },
                    }
                }
            })
            .await?;
        let service = out.service().ok_or_else(|| {
            RegistryError::NotFound(format!("GetService {id} returned no service"))
        })?;
        let dns_records = service
            .dns_config()
            .map(|d| d.dns_records())
            .unwrap_or_default()
            .iter()
            .filter_map(|r| {
                let kind = match r.r#type() {
                    RecordType::A => RecordKind::A,
                    RecordType::Aaaa => RecordKind::Aaaa,
                    RecordType::Srv => RecordKind::Srv,
                    RecordType::Cname => RecordKind::Cname,
                    _ => return None,
                };
                Some(DnsRecord {
                    kind,
                    ttl: u64::try_from(r.ttl()).unwrap_or(0),
                })
            })
            .collect();
        Ok(ServiceInfo {
            id: id.to_string(),
            name: service.name().unwrap_or_default().to_string(),
            namespace_id: service.namespace_id().unwrap_or_default().to_string(),
            custom_health: service.health_check_custom_config().is_some(),
            route53_health: service.health_check_config().is_some(),
            dns_records,
        })
    }
}

impl Registry for CloudMap {
    async fn resolve(
        &self,
        service: &ServiceRef,
        deadline: Instant,
    ) -> Result<ServiceInfo, RegistryError> {
        match service {
            ServiceRef::Id(id) => self.get_service(id, deadline).await,
            ServiceRef::Names { namespace, service } => {
                self.service_id_by_name(namespace, service, deadline).await
            }
        }
    }

    async fn register(
        &self,
        service_id: &str,
        instance_id: &str,
        attributes: &Attributes,
        deadline: Instant,
    ) -> Result<(), RegistryError> {
        let attrs = attributes.to_map();
        self.operate("RegisterInstance", deadline, || {
            // A new request (and so a new CreatorRequestId) per attempt: the SDK reuses the token only
            // for its own retries of the same request.
            let req = self
                .client
                .register_instance()
                .service_id(service_id)
                .instance_id(instance_id)
                .set_attributes(Some(attrs.clone()));
            async move {
                match req.send().await {
                    Ok(out) => match out.operation_id() {
                        Some(op) => Attempt::Done(Some(op.to_string())),
                        None => Attempt::Fail(RegistryError::Invalid(
                            "RegisterInstance returned no OperationId".to_string(),
                        )),
                    },
                    Err(e) => match e.as_service_error() {
                        Some(RegisterInstanceError::DuplicateRequest(d)) => {
                            self.wait_for_duplicate(d.duplicate_operation_id(), deadline)
                                .await
                        }
                        Some(RegisterInstanceError::InvalidInput(m)) => {
                            Attempt::Fail(RegistryError::Invalid(format!(
                                "RegisterInstance {instance_id}: {}",
                                m.message().unwrap_or_default()
                            )))
                        }
                        Some(RegisterInstanceError::ServiceNotFound(_)) => Attempt::Fail(
                            RegistryError::NotFound(format!("service {service_id} not found")),
                        ),
                        Some(RegisterInstanceError::ResourceLimitExceeded(m)) => {
                            Attempt::Fail(RegistryError::Invalid(format!(
                                "service {service_id} has reached its instance limit: {}",
                                m.message().unwrap_or_default()
                            )))
                        }
                        _ => classify(&e),
                    },
                }
            }
        })
        .await
    }

    async fn set_health(
        &self,
        service_id: &str,
        instance_id: &str,
        health: Health,
        deadline: Instant,
    ) -> Result<(), RegistryError> {
        let status = match health {
            Health::Healthy => CustomHealthStatus::Healthy,
            Health::Unhealthy => CustomHealthStatus::Unhealthy,
        };
        self.retrying("UpdateInstanceCustomHealthStatus", deadline, || {
            let req = self
                .client
                .update_instance_custom_health_status()
                .service_id(service_id)
                .instance_id(instance_id)
                .status(status.clone());
            async move {
                match req.send().await {
                    Ok(_) => Attempt::Done(()),
                    Err(e) => match e.as_service_error() {
                        Some(UpdateInstanceCustomHealthStatusError::InstanceNotFound(_)) => {
                            Attempt::Fail(RegistryError::InstanceNotFound(instance_id.to_string()))
                        }
                        Some(UpdateInstanceCustomHealthStatusError::CustomHealthNotFound(_)) => {
                            Attempt::Fail(RegistryError::Invalid(format!(
                                "service {service_id} has no custom health check configuration"
                            )))
                        }
                        Some(UpdateInstanceCustomHealthStatusError::ServiceNotFound(_)) => {
                            Attempt::Fail(RegistryError::NotFound(format!(
                                "service {service_id} not found"
                            )))
                        }
                        _ => classify(&e),
                    },
                }
            }
        })
        .await
    }

    async fn deregister(
        &self,
        service_id: &str,
        instance_id: &str,
        deadline: Instant,
    ) -> Result<(), RegistryError> {
        self.operate("DeregisterInstance", deadline, || {
            let req = self
                .client
                .deregister_instance()
                .service_id(service_id)
                .instance_id(instance_id);
            async move {
                match req.send().await {
                    Ok(out) => Attempt::Done(out.operation_id().map(str::to_string)),
                    Err(e) => match e.as_service_error() {
                        // Already gone is what we wanted. (Our own register operation has always
                        // finished before we deregister, so this is not propagation lag.)
                        Some(DeregisterInstanceError::InstanceNotFound(_)) => {
                            info!(instance_id, "instance was already deregistered");
                            Attempt::Done(None)
                        }
                        Some(DeregisterInstanceError::DuplicateRequest(d)) => {
                            self.wait_for_duplicate(d.duplicate_operation_id(), deadline)
                                .await
                        }
                        Some(DeregisterInstanceError::ServiceNotFound(_)) => {
                            info!(
                                service_id,
                                "service no longer exists; nothing to deregister"
                            );
                            Attempt::Done(None)
                        }
                        _ => classify(&e),
                    },
                }
            }
        })
        .await
    }

    async fn instance(
        &self,
        service_id: &str,
        instance_id: &str,
        deadline: Instant,
    ) -> Result<Option<Attributes>, RegistryError> {
        self.retrying("GetInstance", deadline, || {
            let req = self
                .client
                .get_instance()
                .service_id(service_id)
                .instance_id(instance_id);
            async move {
                match req.send().await {
                    Ok(out) => Attempt::Done(out.instance().map(|i| {
                        let mut attrs = Attributes::default();
                        for (k, v) in i.attributes().into_iter().flatten() {
                            attrs.insert(k, v);
                        }
                        attrs
                    })),
                    Err(e) => match e.as_service_error() {
                        // Removed by someone else (or never there): the caller registers it again.
                        Some(GetInstanceError::InstanceNotFound(_)) => Attempt::Done(None),
                        Some(GetInstanceError::ServiceNotFound(_)) => Attempt::Fail(
                            RegistryError::NotFound(format!("service {service_id} not found")),
                        ),
                        _ => classify(&e),
                    },
                }
            }
        })
        .await
    }
}

fn deadline_exceeded(what: &str, last_error: &str) -> RegistryError {
    RegistryError::DeadlineExceeded {
        what: what.to_string(),
        last_error: last_error.to_string(),
    }
}

/// Errors not specific to one operation: transient ones are retried, credentials and IAM
/// problems are final.
fn classify<T, E, R>(err: &SdkError<E, R>) -> Attempt<T>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + HttpStatus,
{
    // The cause chain on one line ("dispatch failure: … Connection refused"), not a Debug dump.
    let text = crate::metadata::error_chain(err);
    match err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Attempt::Retry(text)
        }
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or_default();
            let status = service.raw().status();
            if is_throttling(code) || status == 429 || status >= 500 {
                Attempt::Retry(text)
            } else if is_denied(code) || status == 403 {
                Attempt::Fail(RegistryError::Denied(text))
            } else {
                Attempt::Fail(RegistryError::Invalid(text))
            }
        }
        _ => Attempt::Fail(RegistryError::Invalid(text)),
    }
}

fn is_throttling(code: &str) -> bool {
    matches!(
        code,
        "ThrottlingException"
            | "Throttling"
            | "RequestLimitExceeded"
            | "TooManyRequestsException"
            | "RequestThrottled"
    )
}

fn is_denied(code: &str) -> bool {
    matches!(
        code,
        "AccessDeniedException"
            | "AccessDenied"
            | "UnrecognizedClientException"
            | "InvalidClientTokenId"
            | "InvalidSignatureException"
            | "ExpiredTokenException"
            | "MissingAuthenticationToken"
    )
}

/// The HTTP status of a raw response, for classifying unmodeled errors.
pub trait HttpStatus {
    fn status(&self) -> u16;
}

impl HttpStatus for aws_smithy_runtime_api::http::Response {
    fn status(&self) -> u16 {
        self.status().as_u16()
    }
}
