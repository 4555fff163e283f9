//! The one-shot commands, for scripts and integration-test harnesses: `register`, `deregister`,
//! `health` and `discover`. They take the same settings as `run`, do one thing and exit with the
//! same codes (0 done; 1 runtime failure; 2 configuration; 3 the instance may be left registered).
//! Their output goes to stdout (`register`: the instance ID; `discover`: JSON lines), logs to
//! stderr.

use std::future::Future;
use std::io::Write;

use tokio::time::Instant;
use tracing::{error, info};

use crate::config::{DiscoverHealth, Invocation, Settings};
use crate::health::AnyProbe;
use crate::lifecycle::oneshot::{self, Error};
use crate::lifecycle::shutdown::{Stop, StopRequests};
use crate::lifecycle::ExitStatus;
use crate::metadata::Discovery;
use crate::registry::cloudmap::CloudMap;
use crate::registry::discover;

/// Run one one-shot command (`run` and `healthcheck` are not handled here).
pub async fn execute(invocation: Invocation, mut stops: StopRequests) -> ExitStatus {
    let (settings, name) = match &invocation {
        Invocation::Register(s) => (s.as_ref(), "register"),
        Invocation::Deregister(s) => (s.as_ref(), "deregister"),
        Invocation::Health(s, _) => (s.as_ref(), "health"),
        Invocation::Discover(s, _) => (s.as_ref(), "discover"),
        Invocation::Run(_) | Invocation::Healthcheck(_) => return ExitStatus::Config,
    };
    let sdk = match crate::aws_config_with_region().await {
        Ok(sdk) => sdk,
        Err(why) => {
            error!(event = "config_error", "{why}");
            return ExitStatus::Config;
        }
    };
    let registry = CloudMap::from_config(&sdk);
    let locator = Discovery::from_settings(settings);
    let result = match &invocation {
        Invocation::Register(s) => {
            let probe = AnyProbe::from_settings(s);
            // Start-up changes nothing in Cloud Map: a stop request ends it at once.
            let ready = tokio::select! {
                biased;
                _ = stops.next() => {
                    error!(event = "interrupted", "register interrupted before anything was registered");
                    return ExitStatus::Failure;
                }
                r = oneshot::prepare(s, &registry, &locator, probe.as_ref()) => r,
            };
            match ready {
                Ok(ready) => finish_first(
                    oneshot::register_ready(s, &registry, ready),
                    &mut stops,
                    name,
                )
                .await
                .map(|r| print_line(&r.instance_id)),
                Err(e) => Err(e),
            }
        }
        Invocation::Deregister(s) => finish_first(
            oneshot::deregister(s, &registry, &locator),
            &mut stops,
            name,
        )
        .await
        .map(|_| ()),
        Invocation::Health(s, health) => stop_at_once(
            oneshot::set_health(s, &registry, &locator, *health),
            &mut stops,
            name,
        )
        .await
        .map(|_| ()),
        Invocation::Discover(s, filter) => {
            stop_at_once(
                discover_and_print(s, &sdk, &registry, *filter),
                &mut stops,
                name,
            )
            .await
        }
        Invocation::Run(_) | Invocation::Healthcheck(_) => Ok(()),
    };
    match result {
        Ok(()) => ExitStatus::Clean,
        Err(e) => {
            let event = match e {
                Error::Config(_) => "config_error",
                Error::Runtime(_) => "failed",
                Error::LeftBehind(_) => "left_behind",
            };
            error!(event, "{name}: {e}");
            e.exit_status()
        }
    }
}

/// Registration and deregistration are not abandoned half-way (one operation per instance at a
/// time; an unknown outcome is worse than a short wait): a first stop request waits for the
/// operation, a second one aborts with exit 3.
async fn finish_first<T>(
    work: impl Future<Output = Result<T, Error>>,
    stops: &mut StopRequests,
    name: &str,
) -> Result<T, Error> {
    tokio::pin!(work);
    let mut asked = false;
    loop {
        tokio::select! {
            r = &mut work => return r,
            s = stops.next() => {
                if !asked && s != Stop::Immediate {
                    asked = true;
                    info!("stop requested: finishing {name} first (send another signal to abort)");
                    continue;
                }
                return Err(Error::LeftBehind(format!(
                    "{name} aborted: the instance may or may not be registered"
                )));
            }
        }
    }
}

/// Reads and health updates stop at the first request (exit 1).
async fn stop_at_once<T>(
    work: impl Future<Output = Result<T, Error>>,
    stops: &mut StopRequests,
    name: &str,
) -> Result<T, Error> {
    tokio::select! {
        r = work => r,
        _ = stops.next() => Err(Error::Runtime(format!("{name} interrupted"))),
    }
}

async fn discover_and_print(
    settings: &Settings,
    sdk: &aws_config::SdkConfig,
    registry: &CloudMap,
    filter: DiscoverHealth,
) -> Result<(), Error> {
    let endpoint = settings.discovery_endpoint.as_deref();
    let data = discover::data_client(sdk, endpoint);
    let deadline = Instant::now() + settings.start_timeout;
    let found = discover::discover(
        registry,
        &data,
        &settings.service,
        filter,
        endpoint.is_some(),
        deadline,
    )
    .await?;
    info!(
        event = "discovered",
        count = found.len(),
        health = filter.as_str(),
        "instances found"
    );
    for instance in &found {
        match serde_json::to_string(instance) {
            Ok(line) => print_line(&line),
            Err(e) => return Err(Error::Runtime(format!("cannot print an instance: {e}"))),
        }
    }
    Ok(())
}

/// One line on stdout; a closed pipe (`| head`) is not an error worth a panic.
fn print_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
