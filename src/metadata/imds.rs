//! EC2 instance metadata (IMDSv2) through `aws-config`'s client: it fetches and caches the session
//! token (`PUT /latest/api/token`, then `X-aws-ec2-metadata-token` on every `GET`), retries, and
//! honours `AWS_EC2_METADATA_SERVICE_ENDPOINT` (how the binary's tests point it at a fake).

use std::net::Ipv4Addr;
use std::sync::OnceLock;
use std::time::Duration;

use super::{error_chain, LocateError};
use aws_config::imds::client::error::{ImdsError, TokenError};
use aws_config::imds::Client;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;

/// What the sidecar needs from the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub ipv4: Ipv4Addr,
    pub instance_id: String,
    pub availability_zone: Option<String>,
}

/// Why we are asking, for the hint in an error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// No ECS metadata: the instance itself is what gets registered.
    PlainEc2,
    /// ECS bridge or host mode: the container instance's address is published.
    EcsHost,
    /// Not in ECS, `--ip` given: only the instance ID is missing.
    InstanceId,
}

impl Purpose {
    fn hint(self) -> &'static str {
        match self {
            Purpose::PlainEc2 => {
                "not in ECS (ECS_CONTAINER_METADATA_URI_V4 is not set), so the EC2 instance itself is registered: \
                 outside EC2 set --ip (CLOUDMAP_IP) and --instance-id (CLOUDMAP_INSTANCE_ID); \
                 in a container on EC2 set the instance's IMDS hop limit to 2"
            }
            Purpose::InstanceId => {
                "not in ECS (ECS_CONTAINER_METADATA_URI_V4 is not set) and --ip is set, so the instance ID comes from \
                 EC2 instance metadata: outside EC2 set --instance-id (CLOUDMAP_INSTANCE_ID)"
            }
            Purpose::EcsHost => {
                "bridge and host mode publish the container instance's address from EC2 instance metadata: \
                 set the instance's IMDS hop limit to 2 (a bridge container is one hop further), or set --ip (CLOUDMAP_IP)"
            }
        }
    }
}

/// A lazily built IMDS client.
#[derive(Debug, Default)]
pub struct Imds {
    /// `None`: the SDK's own choice (`AWS_EC2_METADATA_SERVICE_ENDPOINT`, else `169.254.169.254`).
    endpoint: Option<String>,
    /// `AWS_EC2_METADATA_DISABLED=true`: the operator said there is no IMDS to ask.
    disabled: bool,
    client: OnceLock<Result<Client, String>>,
}

impl Imds {
    pub fn new(endpoint: Option<String>, disabled: bool) -> Self {
        Imds {
            endpoint,
            disabled,
            client: OnceLock::new(),
        }
    }

    fn client(&self) -> Result<&Client, LocateError> {
        let built = self.client.get_or_init(|| {
            // Short timeouts: from a bridge container with hop limit 1 the token PUT never answers,
            // and the caller's start deadline, not IMDS, should decide how long we wait.
            let builder = Client::builder()
                .max_attempts(2)
                .connect_timeout(Duration::from_secs(1))
                .read_timeout(Duration::from_secs(2));
            let builder = match &self.endpoint {
                Some(ep) => builder.endpoint(ep).map_err(|e| {
                    format!("EC2 instance metadata endpoint {ep:?} is not a URL: {e}")
                })?,
                None => builder,
            };
            Ok(builder.build())
        });
        built.as_ref().map_err(|m| LocateError::Invalid(m.clone()))
    }

    async fn get(&self, path: &str, purpose: Purpose) -> Result<String, LocateError> {
        if self.disabled {
            return Err(LocateError::Invalid(format!(
                "EC2 instance metadata is turned off (AWS_EC2_METADATA_DISABLED=true): {}",
                purpose.hint()
            )));
        }
        match self.client()?.get(path).await {
            Ok(v) => Ok(String::from(v).trim().to_string()),
            Err(ImdsError::ErrorResponse(r)) => {
                let status = r.response().status().as_u16();
                let why = format!("EC2 instance metadata {path} answered HTTP {status}");
                Err(match status {
                    // 403: IMDS turned off for the instance (`http-endpoint=disabled`); not
                    // retryable, and retrying would not change it.
                    403 => LocateError::Invalid(format!(
                        "{why} (instance metadata is turned off for this instance): {}",
                        purpose.hint()
                    )),
                    _ => LocateError::NotReady(format!("{why}: {}", purpose.hint())),
                })
            }
            // 403 on the token PUT: the same "turned off" as a 403 on an item.
            Err(e) if token_forbidden(&e) => Err(LocateError::Invalid(format!(
                "EC2 instance metadata refused a session token (HTTP 403: instance metadata is turned off, \
                 or not reachable from here): {}",
                purpose.hint()
            ))),
            // The cause chain on one line (a connection refused, a token PUT that timed out).
            Err(e) => Err(LocateError::NotReady(format!(
                "EC2 instance metadata {path} did not answer: {} ({})",
                error_chain(&e),
                purpose.hint()
            ))),
        }
    }

    /// The instance ID and availability zone (when the address is given).
    pub async fn instance(
        &self,
        purpose: Purpose,
    ) -> Result<(String, Option<String>), LocateError> {
        let instance_id = self.get("/latest/meta-data/instance-id", purpose).await?;
        Ok((instance_id, self.availability_zone(purpose).await))
    }

    /// Only an attribute: left out (never sent empty) when IMDS does not give it.
    async fn availability_zone(&self, purpose: Purpose) -> Option<String> {
        self.get("/latest/meta-data/placement/availability-zone", purpose)
            .await
            .ok()
            .filter(|az| !az.is_empty())
    }

    /// Private IPv4, instance ID and availability zone.
    pub async fn host(&self, purpose: Purpose) -> Result<Host, LocateError> {
        let ip = self.get("/latest/meta-data/local-ipv4", purpose).await?;
        let ipv4 = ip.parse::<Ipv4Addr>().map_err(|_| {
            LocateError::Invalid(format!(
                "EC2 instance metadata local-ipv4 is {ip:?}, not an IPv4 address: set --ip (CLOUDMAP_IP)"
            ))
        })?;
        let (instance_id, availability_zone) = self.instance(purpose).await?;
        Ok(Host {
            ipv4,
            instance_id,
            availability_zone,
        })
    }
}

/// The token request was answered 403 (aws-config keeps the status in the error's raw response).
fn token_forbidden(e: &ImdsError) -> bool {
    matches!(e, ImdsError::FailedToLoadToken(_))
        && std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<SdkError<TokenError, HttpResponse>>())
            .and_then(|s| s.raw_response())
            .is_some_and(|r| r.status().as_u16() == 403)
}
