//! # cloudmap-sidecar
//!
//! Keeps one AWS Cloud Map instance true for the ECS task or EC2 instance it runs beside: registers
//! it on start, reports the application's health on changes, and deregisters and drains on
//! SIGTERM/SIGINT within a stop budget.
//!
//! ## Layout
//! One data path, top to bottom:
//! `config` → `metadata` → `registry` → `health` → `lifecycle` (→ exit status).
//!
//! - [`config`]: flags and `CLOUDMAP_*` variables → validated [`config::Settings`] (all errors at once).
//! - [`attributes`]: Cloud Map attribute names and limits.
//! - [`metadata`]: where am I: ECS task metadata v4 ([`metadata::ecs`]), EC2 IMDSv2 ([`metadata::imds`]).
//! - [`registry`]: the [`registry::Registry`] trait; [`registry::cloudmap`] implements it with the AWS SDK.
//! - [`health`]: probes (HTTP, ECS container health) and consecutive-result thresholds.
//! - [`lifecycle`]: the state machine; [`lifecycle::shutdown`] owns every signal.
//! - [`backoff`]: exponential backoff with full jitter, inside deadlines.
//! - [`commands`]: the one-shot commands (`register`, `deregister`, `health`, `discover`);
//!   [`lifecycle::oneshot`] holds the lifecycle steps they and the library API share.
//! - [`state`]: the state file `run` keeps for `healthcheck`.
//! - [`logging`]: text or JSON logs with stable field names.
//! - [`Registration`]: the library API for Rust test harnesses.
//! - `sweeper` (feature `sweeper`): the `cloudmap-sweeper` binary, which removes instances whose
//!   owning task or EC2 instance is gone.
//!
//! ## Environment
//! Every flag `--some-flag` is also read from `CLOUDMAP_SOME_FLAG` (`--attribute`: `CLOUDMAP_ATTRIBUTES`).
//! `ECS_CONTAINER_METADATA_URI_V4` (set by ECS) selects ECS discovery; without it, EC2 instance metadata
//! is used (`AWS_EC2_METADATA_SERVICE_ENDPOINT` overrides its address, `AWS_EC2_METADATA_DISABLED=true`
//! turns it off). AWS settings come from the
//! SDK's standard chain (`AWS_REGION`, `AWS_ENDPOINT_URL`, credentials).
//!
//! ## Exit codes
//! - 0: stopped and deregistered, or stopped before anything was registered.
//! - 1: runtime failure; nothing is left registered.
//! - 2: the configuration cannot work, found before anything was registered.
//! - 3: the instance may still be registered (stop budget exhausted, deregistration refused, or an
//!   immediate stop by SIGQUIT or a third signal); the log names the instance and service.

pub mod api;
pub mod attributes;
pub mod backoff;
pub mod commands;
pub mod config;
pub mod health;
pub mod lifecycle;
pub mod logging;
pub mod metadata;
pub mod registry;
pub mod state;

pub use api::{Registration, RegistrationBuilder};
pub use lifecycle::oneshot::Error;
pub use registry::Health;
#[cfg(feature = "sweeper")]
pub mod sweeper;

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use tracing::{error, info};

use config::Settings;
use health::AnyProbe;
use lifecycle::shutdown::StopRequests;
use lifecycle::ExitStatus;
use metadata::Discovery;
use registry::cloudmap::CloudMap;

/// The AWS SDK configuration from the standard chain, with timeouts that fit inside our deadlines.
pub async fn aws_config() -> aws_config::SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .retry_config(RetryConfig::standard().with_max_attempts(3))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3))
                .operation_attempt_timeout(Duration::from_secs(5))
                .build(),
        )
        .load()
        .await
}

/// [`aws_config`], or the one-line reason it cannot work: without a region no call can be made.
pub async fn aws_config_with_region() -> Result<aws_config::SdkConfig, &'static str> {
    let sdk = aws_config().await;
    match sdk.region() {
        Some(_) => Ok(sdk),
        None => Err("no AWS region: set AWS_REGION (ECS sets it on Fargate; on EC2 the instance metadata provides it)"),
    }
}

/// `run`: wire the real parts together and run the lifecycle.
pub async fn run(settings: Settings, mut stops: StopRequests) -> ExitStatus {
    info!(
        event = "starting",
        version = env!("CARGO_PKG_VERSION"),
        "{}",
        settings.summary()
    );
    let sdk = match aws_config_with_region().await {
        Ok(sdk) => sdk,
        Err(why) => {
            error!(event = "config_error", "{why}");
            return ExitStatus::Config;
        }
    };
    let registry = CloudMap::from_config(&sdk);
    let locator = Discovery::from_settings(&settings);
    let probe = AnyProbe::from_settings(&settings);
    lifecycle::run(&settings, &registry, &locator, probe.as_ref(), &mut stops).await
}
