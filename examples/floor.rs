//! The floor for the lifecycle benchmark (`scripts/bench`): the least a registration sidecar can
//! do, with the same SDK and release profile as the real one. One task-metadata GET,
//! RegisterInstance, wait for SIGTERM, DeregisterInstance. No health checks, no operation
//! following, no retries beyond the SDK's, no validation: not for production.

use std::error::Error;

use aws_config::BehaviorVersion;
use signal_hook::consts::SIGTERM;
use signal_hook::iterator::Signals;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let mut signals = Signals::new([SIGTERM])?;
    let service_id = std::env::var("CLOUDMAP_SERVICE_ID")?;
    let uri = std::env::var("ECS_CONTAINER_METADATA_URI_V4")?;
    let task: serde_json::Value = reqwest::get(format!("{uri}/task")).await?.json().await?;
    let task_id = task["TaskARN"].as_str().and_then(|a| a.rsplit('/').next()).ok_or("TaskARN")?;
    let ip = task["Containers"][0]["Networks"][0]["IPv4Addresses"][0].as_str().ok_or("IPv4Addresses")?;

    let client = aws_sdk_servicediscovery::Client::new(&aws_config::load_defaults(BehaviorVersion::latest()).await);
    client
        .register_instance()
        .service_id(&service_id)
        .instance_id(task_id)
        .attributes("AWS_INSTANCE_IPV4", ip)
        .send()
        .await?;

    signals.forever().next();
    client.deregister_instance().service_id(&service_id).instance_id(task_id).send().await?;
    Ok(())
}
