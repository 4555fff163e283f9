//! EC2 instance metadata (IMDSv2) through `aws-config`'s client: it fetches and caches the session
//! token, retries, and honours `AWS_EC2_METADATA_SERVICE_ENDPOINT` (how tests point it at a fake).

use std::net::Ipv4Addr;
use std::time::Duration;

use aws_config::imds::Client;

use super::LocateError;

/// What the sidecar needs from the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub ipv4: Ipv4Addr,
    pub instance_id: String,
    pub availability_zone: Option<String>,
}

/// A lazily built IMDS client.
#[derive(Debug, Default)]
pub struct Imds {
    client: std::sync::OnceLock<Client>,
}

impl Imds {
    fn client(&self) -> &Client {
        self.client.get_or_init(|| {
            // Short timeouts: from a bridge container with hop limit 1 the token PUT never answers,
            // and the caller's start deadline, not IMDS, should decide how long we wait.
            Client::builder()
                .max_attempts(2)
                .connect_timeout(Duration::from_secs(1))
                .read_timeout(Duration::from_secs(2))
                .build()
        })
    }

    async fn get(&self, path: &str) -> Result<String, LocateError> {
        self.client()
            .get(path)
            .await
            .map(|v| String::from(v).trim().to_string())
            .map_err(|e| {
                LocateError::NotReady(format!(
                    "EC2 instance metadata {path} did not answer: {} (on EC2 from a container, set the IMDS hop limit to 2; outside AWS set --ip and --instance-id)",
                    aws_sdk_servicediscovery::error::DisplayErrorContext(&e)
                ))
            })
    }

    /// Private IPv4, instance ID and availability zone.
    pub async fn host(&self) -> Result<Host, LocateError> {
        let ip = self.get("/latest/meta-data/local-ipv4").await?;
        let ipv4 = ip.parse::<Ipv4Addr>().map_err(|_| {
            LocateError::Invalid(format!(
                "EC2 instance metadata local-ipv4 is {ip:?}, not an IPv4 address: set --ip (CLOUDMAP_IP)"
            ))
        })?;
        let instance_id = self.get("/latest/meta-data/instance-id").await?;
        let availability_zone = self
            .get("/latest/meta-data/placement/availability-zone")
            .await
            .ok();
        Ok(Host {
            ipv4,
            instance_id,
            availability_zone,
        })
    }
}
