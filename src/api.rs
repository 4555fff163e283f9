//! The library API for Rust test harnesses: [`Registration`] registers one instance the way
//! `cloudmap-sidecar register` does, and removes it again when it is shut down or dropped.

use std::ffi::OsString;
use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::config::{self, Env, Invocation, ParseFailure, Settings, ENV_PREFIX};
use crate::lifecycle::oneshot::{self, Error};
use crate::registry::cloudmap::CloudMap;
use crate::registry::{Health, ServiceInfo};

/// Settings for a [`Registration`]: the same as the command line's, checked the same way.
#[derive(Debug, Clone, Default)]
pub struct RegistrationBuilder {
    args: Vec<String>,
    sdk: Option<aws_config::SdkConfig>,
}

impl RegistrationBuilder {
    /// `--service-id`: the service ID (`srv-…`) or ARN.
    pub fn service_id(self, id: impl Into<String>) -> Self {
        self.setting("service-id", id)
    }

    /// `--namespace`, with [`service`](Self::service), instead of a service ID.
    pub fn namespace(self, name: impl Into<String>) -> Self {
        self.setting("namespace", name)
    }

    /// `--service`: the service name inside the namespace.
    pub fn service(self, name: impl Into<String>) -> Self {
        self.setting("service", name)
    }

    /// `--instance-id` [default: the ECS task ID, or the EC2 instance ID].
    pub fn instance_id(self, id: impl Into<String>) -> Self {
        self.setting("instance-id", id)
    }

    /// `--ip`: the address to publish, instead of discovering it from ECS or EC2 metadata.
    pub fn ip(self, ip: impl Into<IpAddr>) -> Self {
        self.setting("ip", ip.into().to_string())
    }

    /// `--port`: published as `AWS_INSTANCE_PORT`.
    pub fn port(self, port: u16) -> Self {
        self.setting("port", port.to_string())
    }

    /// `--attribute KEY=VALUE`, repeatable.
    pub fn attribute(self, key: &str, value: &str) -> Self {
        self.setting("attribute", format!("{key}={value}"))
    }

    /// Any other setting, by its flag name without the dashes, e.g.
    /// `.setting("stop-timeout", "10s")`. Checked when [`register`](Self::register) is called.
    pub fn setting(mut self, flag: &str, value: impl Into<String>) -> Self {
        self.args.push(format!("--{flag}"));
        self.args.push(value.into());
        self
    }

    /// The AWS configuration to use [default: [`crate::aws_config`], the SDK's standard chain].
    /// Harnesses point it at an emulator with `endpoint_url`.
    pub fn sdk_config(mut self, sdk: aws_config::SdkConfig) -> Self {
        self.sdk = Some(sdk);
        self
    }

    /// Register and wait until Cloud Map has applied it.
    pub async fn register(self) -> Result<Registration, Error> {
        let mut argv: Vec<OsString> = vec!["cloudmap-sidecar".into(), "register".into()];
        argv.extend(self.args.into_iter().map(OsString::from));
        let settings: Settings = match config::parse(argv, &LibraryEnv) {
            Ok(Invocation::Register(s)) => *s,
            Ok(_) => return Err(Error::Config("not a registration".to_string())),
            Err(ParseFailure::Invalid(errors)) => return Err(Error::Config(errors.to_string())),
            Err(ParseFailure::Clap(e)) => return Err(Error::Config(e.to_string())),
        };
        let sdk = match self.sdk {
            Some(sdk) => sdk,
            None => crate::aws_config().await,
        };
        if sdk.region().is_none() {
            return Err(Error::Config(
                "no AWS region: set AWS_REGION or pass an SdkConfig with a region".to_string(),
            ));
        }
        let registry = CloudMap::from_config(&sdk);
        let probe = crate::health::AnyProbe::from_settings(&settings);
        let registered = oneshot::register(
            &settings,
            &registry,
            &crate::metadata::Discovery::from_settings(&settings),
            probe.as_ref(),
        )
        .await?;
        Ok(Registration {
            inner: Some(Inner {
                registry,
                sdk,
                service: registered.service,
                instance_id: registered.instance_id,
                start_timeout: settings.start_timeout,
                stop_timeout: settings.stop_timeout,
            }),
        })
    }
}

/// The process environment without the `CLOUDMAP_*` variables: a harness is configured by its
/// code, not by whatever the shell that runs the tests exports. (ECS metadata and the AWS SDK's
/// own variables are still read.)
struct LibraryEnv;

impl Env for LibraryEnv {
    fn get(&self, key: &str) -> Option<String> {
        if key.starts_with(ENV_PREFIX) {
            None
        } else {
            std::env::var(key).ok()
        }
    }
}

/// One registered Cloud Map instance, removed again when this value is shut down or dropped.
///
/// Prefer [`shutdown`](Self::shutdown): it deregisters, waits for Cloud Map to apply it and
/// returns the outcome. Dropping a `Registration` that was not shut down deregisters too (within
/// `--stop-timeout`, default 25 s) and never panics: the deregistration runs on a thread of its
/// own, with its own small runtime and its own connections, and `drop` waits for it. So it works
/// from synchronous code, from inside any tokio runtime (current-thread ones included, which the
/// thread does not need to make progress), and at the very end of a test, when the runtime is
/// about to go away and a spawned task would be cancelled. The cost is that `drop` blocks the
/// thread it runs on for as long as the deregistration takes (usually well under a second); a
/// failure is logged (`event="left_behind"`) rather than returned.
///
/// ```no_run
/// use std::net::Ipv4Addr;
///
/// use cloudmap_sidecar::{Health, Registration};
///
/// # async fn example() -> Result<(), cloudmap_sidecar::Error> {
/// let registration = Registration::builder()
///     .service_id("srv-0123456789abcdef")
///     .instance_id("test-instance-1")
///     .ip(Ipv4Addr::new(10, 0, 0, 7))
///     .port(8080)
///     .attribute("TIER", "ap")
///     .register()
///     .await?;
/// assert_eq!(registration.instance_id(), "test-instance-1");
///
/// // The service has a custom health check: say the instance is failing.
/// registration.set_health(Health::Unhealthy).await?;
///
/// // Deregister and wait for Cloud Map (dropping it would do the same, without the result).
/// registration.shutdown().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Registration {
    /// `None` once shut down.
    inner: Option<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: CloudMap,
    sdk: aws_config::SdkConfig,
    service: ServiceInfo,
    instance_id: String,
    start_timeout: Duration,
    stop_timeout: Duration,
}

impl Registration {
    pub fn builder() -> RegistrationBuilder {
        RegistrationBuilder::default()
    }

    pub fn instance_id(&self) -> &str {
        self.inner
            .as_ref()
            .map(|i| i.instance_id.as_str())
            .unwrap_or_default()
    }

    /// The service ID (or ARN) the instance is registered in.
    pub fn service_id(&self) -> &str {
        self.inner
            .as_ref()
            .map(|i| i.service.id.as_str())
            .unwrap_or_default()
    }

    /// Set the instance's custom health status (`UpdateInstanceCustomHealthStatus`; the service
    /// must have a custom health check). Cloud Map applies it after about 30 s.
    pub async fn set_health(&self, health: Health) -> Result<(), Error> {
        let Some(i) = &self.inner else {
            return Err(Error::Config("the registration was shut down".to_string()));
        };
        let deadline = Instant::now() + i.start_timeout;
        oneshot::set_instance_health(&i.registry, &i.service, &i.instance_id, health, deadline)
            .await
    }

    /// Deregister and wait until Cloud Map has applied it (within `--stop-timeout`). An
    /// instance that is already gone is success.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        let Some(i) = self.inner.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + i.stop_timeout;
        oneshot::deregister_instance(&i.registry, &i.service.id, &i.instance_id, deadline).await
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let Some(i) = self.inner.take() else {
            return;
        };
        warn!(instance_id = %i.instance_id, service_id = %i.service.id,
            "Registration dropped without shutdown(): deregistering now");
        let (service_id, instance_id) = (i.service.id.clone(), i.instance_id.clone());
        let worker = std::thread::Builder::new()
            .name("cloudmap-deregister".to_string())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| Error::Runtime(format!("cannot start a runtime: {e}")))?;
                runtime.block_on(async {
                    // A client of its own: pooled connections of the first one belong to the
                    // runtime being dropped from, which may not be able to drive them now.
                    let registry = CloudMap::from_config(&i.sdk);
                    let deadline = Instant::now() + i.stop_timeout;
                    oneshot::deregister_instance(&registry, &i.service.id, &i.instance_id, deadline)
                        .await
                })
            });
        let outcome = match worker {
            Ok(handle) => handle
                .join()
                .unwrap_or_else(|_| Err(Error::Runtime("deregistration panicked".to_string()))),
            Err(e) => Err(Error::Runtime(format!("cannot start a thread: {e}"))),
        };
        match outcome {
            Ok(()) => {
                info!(instance_id = %instance_id, service_id = %service_id, "deregistered on drop")
            }
            Err(e) => {
                error!(event = "left_behind", instance_id = %instance_id, service_id = %service_id,
                "deregistration on drop failed: {e}")
            }
        }
    }
}
