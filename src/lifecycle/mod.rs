//! The state machine: start-up (service, address) → registration → health loop → stop
//! (deregister, drain) → exit status. Each phase has a deadline; stop requests arrive on a
//! channel ([`shutdown::StopRequests`]).

pub mod oneshot;
pub mod shutdown;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior};
use tracing::{debug, error, info, warn};

use crate::attributes::{self, Attributes};
use crate::backoff::Backoff;
use crate::config::{DrainMode, Settings};
use crate::health::{Probe, Tracker};
use crate::metadata::{LocateError, Location, Locator};
use crate::registry::{Health, RecordKind, Registry, RegistryError, ServiceInfo};
use shutdown::{Stop, StopRequests};

/// Cloud Map applies a custom health change only about 30 s after the update: an UNHEALTHY mark
/// takes that long to reach DNS and `DiscoverInstances`.
pub const CUSTOM_HEALTH_DELAY: Duration = Duration::from_secs(30);

/// In unhealthy-first mode the deregistration comes after the drain: keep this much of the stop
/// budget for it (or half the budget, when that is smaller).
pub const DEREGISTER_RESERVE: Duration = Duration::from_secs(5);

/// Budget of one call made while serving (a health report, a re-assert); a stop preempts it.
const SERVING_CALL_BUDGET: Duration = Duration::from_secs(10);

/// How the process ends. The numbers are the documented exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Stopped and deregistered, or stopped before anything was registered.
    Clean = 0,
    /// Runtime failure; nothing is left registered.
    Failure = 1,
    /// The configuration cannot work (found before anything was registered).
    Config = 2,
    /// The instance may still be registered: the stop budget ran out, deregistration was refused,
    /// or an immediate stop (SIGQUIT, third signal) was asked for.
    LeftBehind = 3,
}

impl ExitStatus {
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// Start-up could not complete.
#[derive(Debug)]
enum StartError {
    Config(String),
    Runtime(String),
}

impl From<RegistryError> for StartError {
    fn from(e: RegistryError) -> Self {
        if e.is_configuration() {
            StartError::Config(e.to_string())
        } else {
            StartError::Runtime(e.to_string())
        }
    }
}

/// What start-up established.
#[derive(Debug, Clone)]
struct Prepared {
    service: ServiceInfo,
    instance_id: String,
    /// The full set, without `AWS_INIT_HEALTH_STATUS` (added per registration).
    attributes: Attributes,
}

/// Run the sidecar until it is stopped.
pub async fn run<R, L, P>(
    settings: &Settings,
    registry: &R,
    locator: &L,
    probe: Option<&P>,
    stops: &mut StopRequests,
) -> ExitStatus
where
    R: Registry,
    L: Locator,
    P: Probe,
{
    Sidecar::new(settings, registry, probe)
        .run(locator, stops)
        .await
}

struct Sidecar<'a, R, P> {
    settings: &'a Settings,
    registry: &'a R,
    probe: Option<&'a P>,
    tracker: Tracker,
}

impl<'a, R: Registry, P: Probe> Sidecar<'a, R, P> {
    fn new(settings: &'a Settings, registry: &'a R, probe: Option<&'a P>) -> Self {
        Sidecar {
            settings,
            registry,
            probe,
            tracker: Tracker::for_settings(&settings.health),
        }
    }

    async fn run<L: Locator>(mut self, locator: &L, stops: &mut StopRequests) -> ExitStatus {
        // Start-up can be abandoned at any point before the registration request is sent,
        // including during the start jitter.
        let prepared = tokio::select! {
            biased;
            _ = stops.next() => {
                info!(event = "stopped", "stop requested during start-up; nothing was registered");
                return ExitStatus::Clean;
            }
            r = async {
                self.start_jitter().await;
                // The start deadline counts from the end of the jitter, so that a large jitter
                // cannot eat the time start-up needs.
                let deadline = Instant::now() + self.settings.start_timeout;
                (self.prepare(locator, deadline).await, deadline)
            } => r,
        };
        let (prepared, start_deadline) = prepared;
        let p = match prepared {
            Ok(p) => p,
            Err(StartError::Config(m)) => {
                error!(event = "config_error", "{m}");
                return ExitStatus::Config;
            }
            Err(StartError::Runtime(m)) => {
                error!(event = "start_failed", "{m}; nothing was registered");
                return ExitStatus::Failure;
            }
        };

        let Some(initial) = self.initial_health(&p.service, stops).await else {
            info!(
                event = "stopped",
                "stop requested before the application became healthy; nothing was registered"
            );
            return ExitStatus::Clean;
        };

        // Registration itself is not abandoned half-way: a stop that arrives now is acted on once
        // the operation has finished, so we never deregister while our register is still running.
        let mut pending: Option<Stop> = None;
        let registered = {
            let reg = self.register(&p, initial, start_deadline);
            tokio::pin!(reg);
            loop {
                tokio::select! {
                    r = &mut reg => break r,
                    s = stops.next(), if pending != Some(Stop::Immediate) => {
                        info!("stop requested while registering; deregistering as soon as registration completes");
                        pending = Some(s);
                    }
                }
            }
        };
        match registered {
            Ok(()) => {}
            Err(RegistryError::DeadlineExceeded { what, last_error }) => {
                error!(
                    event = "start_failed",
                    "{what} did not complete before the start deadline: {last_error}"
                );
                // Cloud Map may have accepted it after all: make sure nothing is left behind.
                return self.stop(&p, true, true, stops).await.min_failure();
            }
            Err(e @ RegistryError::Unconfirmed { .. }) => {
                error!(event = "start_failed", instance_id = %p.instance_id, service_id = %p.service.id,
                    "registration failed: {e}; deregistering in case it took effect");
                return self.stop(&p, true, true, stops).await.min_failure();
            }
            Err(e) => {
                let status = if e.is_configuration() {
                    ExitStatus::Config
                } else {
                    ExitStatus::Failure
                };
                error!(event = "start_failed", instance_id = %p.instance_id, service_id = %p.service.id,
                    "registration failed: {e}; nothing was registered");
                return status;
            }
        }
        match pending {
            Some(Stop::Immediate) => return self.abandon(&p),
            // The instance was visible in Cloud Map, however briefly, and clients may have cached
            // it: a first stop request gets the full graceful stop, drain included.
            Some(Stop::Graceful) => return self.stop(&p, true, false, stops).await,
            Some(Stop::SkipDrain) => return self.stop(&p, true, true, stops).await,
            None => {}
        }
        info!(event = "serving", instance_id = %p.instance_id, service_id = %p.service.id,
            "registration complete; watching health until stopped");

        let (stop, registered) = self.serve(&p, initial, stops).await;
        match stop {
            Stop::Immediate => self.abandon(&p),
            Stop::SkipDrain => self.stop(&p, registered, true, stops).await,
            Stop::Graceful => self.stop(&p, registered, false, stops).await,
        }
    }

    /// Hundreds of tasks of a deploy start together: a random delay spreads their first Cloud Map
    /// calls (throttling is still handled by the backoff).
    async fn start_jitter(&self) {
        let max = self.settings.start_jitter;
        if max.is_zero() {
            return;
        }
        let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        let delay = Duration::from_nanos(fastrand::u64(0..=nanos));
        info!(
            event = "start_jitter",
            delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "waiting {} before the first Cloud Map call (--start-jitter)",
            crate::config::human(delay)
        );
        tokio::time::sleep(delay).await;
    }

    /// Service, address, instance ID and the attribute set, all validated.
    async fn prepare<L: Locator>(
        &self,
        locator: &L,
        deadline: Instant,
    ) -> Result<Prepared, StartError> {
        // Independent look-ups, side by side: start-up sits on every deploy's critical path.
        let (service, location) = tokio::try_join!(
            async {
                self.registry
                    .resolve(&self.settings.service, deadline)
                    .await
                    .map_err(StartError::from)
            },
            locate_until(locator, deadline),
        )?;
        info!(event = "service_resolved", service_id = %service.id, custom_health = service.custom_health,
            route53_health = service.route53_health,
            dns_records = %dns_records_summary(&service),
            "service {}", service.name);
        if self.settings.drain_mode == DrainMode::UnhealthyFirst && !service.custom_health {
            return Err(StartError::Config(format!(
                "--drain-mode unhealthy-first (CLOUDMAP_DRAIN_MODE) needs a service with custom health \
                 (HealthCheckCustomConfig), and service {} ({}) has none: use --drain-mode deregister",
                service.name, service.id
            )));
        }
        let instance_id = location.instance_id.clone().ok_or_else(|| {
            StartError::Config(
                "cannot tell the instance ID: set --instance-id (CLOUDMAP_INSTANCE_ID) when running outside ECS and EC2"
                    .to_string(),
            )
        })?;
        attributes::check_instance_id(&instance_id).map_err(|why| {
            StartError::Config(format!(
                "instance ID {instance_id:?} {why}: set --instance-id"
            ))
        })?;
        let attributes = instance_attributes(self.settings, &location);
        // Say where the addresses came from, so "no IPv4" reads as e.g. an IPv6-only task.
        check_records(&service, &instance_id, &attributes)
            .map_err(|m| StartError::Config(format!("{m} (address from {})", location.source)))?;
        attributes::check_all(&attributes)
            .map_err(|why| StartError::Config(format!("{why} (--attribute)")))?;
        info!(event = "located", instance_id = %instance_id, source = %location.source,
            ipv4 = location.ipv4.map(tracing::field::display),
            ipv6 = location.ipv6.map(tracing::field::display),
            port = location.port,
            "address found");
        Ok(Prepared {
            service,
            instance_id,
            attributes,
        })
    }

    /// The status to register with. One probe first, so a healthy application is registered
    /// HEALTHY at once (Cloud Map applies a later change only after ~30 s). In a service without
    /// custom health Cloud Map cannot hold "unhealthy", so we wait for the first pass. `None`: a
    /// stop came first.
    async fn initial_health(
        &mut self,
        service: &ServiceInfo,
        stops: &mut StopRequests,
    ) -> Option<Health> {
        let Some(probe) = self.probe else {
            return Some(Health::Healthy);
        };
        let first = self.probe_once(probe).await;
        if first == Health::Healthy || service.custom_health {
            return Some(first);
        }
        info!(event = "waiting_for_healthy",
            "service has no custom health check: registering only after the application passes its health check");
        let mut failures: u32 = 1;
        loop {
            tokio::select! {
                _ = stops.next() => return None,
                _ = tokio::time::sleep(self.settings.health.interval) => {}
            }
            if let Ok(()) = probe.check().await {
                // Start the thresholds afresh from this first pass.
                self.tracker = Tracker::for_settings(&self.settings.health);
                self.tracker.observe(true);
                return Some(Health::Healthy);
            }
            failures += 1;
            if failures % 12 == 0 {
                warn!(
                    failures,
                    "application still failing its health check; still waiting to register"
                );
            }
        }
    }

    async fn probe_once(&mut self, probe: &P) -> Health {
        let result = probe.check().await;
        if let Err(why) = &result {
            info!("health probe failed: {why}");
        }
        self.tracker.observe(result.is_ok());
        self.tracker.status().unwrap_or(Health::Unhealthy)
    }

    /// Register (an upsert with the full attribute set), then, with custom health, send the status
    /// again: whether an upsert resets it is undocumented.
    async fn register(
        &self,
        p: &Prepared,
        health: Health,
        deadline: Instant,
    ) -> Result<(), RegistryError> {
        let mut attrs = p.attributes.clone();
        if p.service.custom_health {
            attrs.insert(attributes::AWS_INIT_HEALTH_STATUS, health.as_str());
        }
        self.registry
            .register(&p.service.id, &p.instance_id, &attrs, deadline)
            .await?;
        info!(event = "registered", instance_id = %p.instance_id, service_id = %p.service.id,
            health = %health, attributes = %attrs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
            "instance registered");
        if p.service.custom_health {
            self.registry
                .set_health(&p.service.id, &p.instance_id, health, deadline)
                .await?;
        }
        Ok(())
    }

    /// Probe and report until a stop request, re-asserting the registration every
    /// `--reassert-interval`. Returns the request and whether the instance is registered then.
    async fn serve(
        &mut self,
        p: &Prepared,
        initial: Health,
        stops: &mut StopRequests,
    ) -> (Stop, bool) {
        let interval = self.settings.health.interval;
        let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let every = self.settings.reassert_interval;
        let mut reassert = (!every.is_zero()).then(|| {
            let mut t = tokio::time::interval_at(Instant::now() + every, every);
            t.set_missed_tick_behavior(MissedTickBehavior::Delay);
            t
        });
        // What Cloud Map has been told: the custom status, or (without custom health) whether we
        // are registered at all.
        let mut reported = initial;
        let registered = |reported: Health| reported == Health::Healthy || p.service.custom_health;
        loop {
            let work = tokio::select! {
                s = stops.next() => return (s, registered(reported)),
                _ = ticker.tick(), if self.probe.is_some() => Work::Probe,
                _ = tick(&mut reassert) => Work::Reassert,
            };
            if work == Work::Reassert {
                if !registered(reported) {
                    // Deregistered on purpose while unhealthy (no custom health): nothing to confirm.
                    continue;
                }
                let deadline = Instant::now() + SERVING_CALL_BUDGET;
                let check = self.reassert(p, reported, deadline);
                tokio::select! {
                    s = stops.next() => return (s, registered(reported)),
                    r = check => match r {
                        Ok(()) => {}
                        Err(RegistryError::Denied(e)) => {
                            warn!(instance_id = %p.instance_id, "re-assert turned off: {e} \
                                (grant servicediscovery:GetInstance, or set --reassert-interval 0)");
                            reassert = None;
                        }
                        Err(e) => warn!(instance_id = %p.instance_id,
                            "could not re-assert the registration: {e}; trying again in {}",
                            crate::config::human(every)),
                    },
                }
                continue;
            }
            let Some(probe) = self.probe else { continue };
            let result = probe.check().await;
            if let Some(changed) = self.tracker.observe(result.is_ok()) {
                info!(event = "health_changed", instance_id = %p.instance_id, health = %changed,
                    reason = result.err().map(tracing::field::display), "application health changed");
            }
            let desired = self.tracker.status().unwrap_or(reported);
            if desired == reported {
                continue;
            }
            // A stop request wins over an update in flight; an update that fails is tried again
            // at the next probe, since `reported` still differs.
            let deadline = Instant::now() + interval.max(SERVING_CALL_BUDGET);
            let report = self.report(p, desired, deadline);
            tokio::select! {
                s = stops.next() => return (s, registered(reported)),
                r = report => match r {
                    Ok(()) => reported = desired,
                    Err(e) => warn!(event = "health_report_failed", instance_id = %p.instance_id, service_id = %p.service.id,
                        "could not report {desired}: {e}; retrying at the next probe"),
                },
            }
        }
    }

    /// Confirm with `GetInstance` that the instance is still there with the attributes we
    /// registered; register it again (the full set, then the current health) if it was removed or
    /// changed. Only our attributes are compared: Cloud Map may add its own, and an extra
    /// attribute does not change where clients are sent.
    async fn reassert(
        &self,
        p: &Prepared,
        health: Health,
        deadline: Instant,
    ) -> Result<(), RegistryError> {
        let found = self
            .registry
            .instance(&p.service.id, &p.instance_id, deadline)
            .await?;
        let holds = |attrs: &Attributes| p.attributes.iter().all(|(k, v)| attrs.get(k) == Some(v));
        match found {
            Some(attrs) if holds(&attrs) => {
                debug!(instance_id = %p.instance_id, "re-assert: instance registered as expected");
                Ok(())
            }
            found => {
                warn!(event = "reasserting", instance_id = %p.instance_id, service_id = %p.service.id,
                    removed = found.is_none(),
                    "instance {} in Cloud Map; registering it again",
                    if found.is_none() { "was removed" } else { "has different attributes" });
                self.register(p, health, deadline).await
            }
        }
    }

    /// Tell Cloud Map about a health change: the custom status, or (services without custom
    /// health) deregister while unhealthy and register again when healthy.
    async fn report(
        &self,
        p: &Prepared,
        health: Health,
        deadline: Instant,
    ) -> Result<(), RegistryError> {
        let (service_id, id) = (&p.service.id, &p.instance_id);
        if p.service.custom_health {
            self.registry
                .set_health(service_id, id, health, deadline)
                .await?;
            info!(event = "health_reported", instance_id = %id, service_id = %service_id, health = %health,
                "custom health status sent (Cloud Map applies it after about 30 s)");
            return Ok(());
        }
        match health {
            Health::Unhealthy => {
                self.registry.deregister(service_id, id, deadline).await?;
                info!(event = "deregistered", instance_id = %id, service_id = %service_id,
                    "deregistered while unhealthy (the service has no custom health check)");
            }
            Health::Healthy => {
                self.registry
                    .register(service_id, id, &p.attributes, deadline)
                    .await?;
                info!(event = "registered", instance_id = %id, service_id = %service_id, "registered again: healthy");
            }
        }
        Ok(())
    }

    /// Take the instance out and drain, all within the stop budget.
    ///
    /// `deregister` mode: deregister, confirm the operation, then keep serving for the drain time
    /// (DNS clients hold the address for up to the record TTL). `unhealthy-first` mode: mark the
    /// instance UNHEALTHY, keep serving for the drain time (which must cover Cloud Map's ~30 s
    /// delay before applying the status, plus the TTL), then deregister. Either way a second stop
    /// request ends the drain and deregisters at once, an immediate one exits leaving the instance
    /// behind, and an application that is already failing its probe gets no drain.
    async fn stop(
        &self,
        p: &Prepared,
        registered: bool,
        skip_drain: bool,
        stops: &mut StopRequests,
    ) -> ExitStatus {
        let deadline = Instant::now() + self.settings.stop_timeout;
        let (service_id, id) = (&p.service.id, &p.instance_id);
        let mut skip_drain = skip_drain || !registered;
        let unhealthy_first = self.settings.drain_mode == DrainMode::UnhealthyFirst
            && p.service.custom_health
            && registered;

        if unhealthy_first && !skip_drain {
            info!(event = "marking_unhealthy", instance_id = %id, service_id = %service_id,
                "stopping: marking the instance UNHEALTHY before deregistering it");
            // Probe the application at the same time: the drain is for one that still serves.
            let work = async {
                tokio::join!(
                    self.registry
                        .set_health(service_id, id, Health::Unhealthy, deadline),
                    self.still_serving()
                )
            };
            tokio::pin!(work);
            match race(work.as_mut(), stops).await {
                Raced::Done((marked, serving)) => {
                    if serving == Some(false) {
                        info!("the application is failing its health check: no drain");
                        skip_drain = true;
                    }
                    if let Err(e) = marked {
                        warn!(instance_id = %id, "could not mark the instance UNHEALTHY: {e}; deregistering now");
                        skip_drain = true;
                    }
                }
                Raced::Stop(Stop::Immediate) => return self.abandon(p),
                Raced::Stop(_) => {
                    info!("second stop request: deregistering at once");
                    skip_drain = true;
                }
            }
            if !skip_drain {
                let wanted = self
                    .settings
                    .drain
                    .unwrap_or_else(|| CUSTOM_HEALTH_DELAY + p.service.max_ttl());
                let reserve = DEREGISTER_RESERVE.min(self.settings.stop_timeout / 2);
                let until = deadline.checked_sub(reserve).unwrap_or(deadline);
                match self.drain(wanted, until, stops).await {
                    Some(()) => {}
                    None => return self.abandon(p),
                }
            }
        }

        if registered {
            info!(event = "deregistering", instance_id = %id, service_id = %service_id, "stopping: deregistering");
            let work = async {
                tokio::join!(self.registry.deregister(service_id, id, deadline), async {
                    if unhealthy_first {
                        None
                    } else {
                        self.still_serving().await
                    }
                })
            };
            tokio::pin!(work);
            let (result, serving) = loop {
                match race(work.as_mut(), stops).await {
                    Raced::Done(r) => break r,
                    Raced::Stop(Stop::Immediate) => return self.abandon(p),
                    Raced::Stop(_) => {
                        info!("second stop request: no drain after deregistration");
                        skip_drain = true;
                    }
                }
            };
            if let Err(e) = result {
                error!(event = "left_behind", instance_id = %id, service_id = %service_id,
                    "instance {id} may still be registered in service {service_id}: {e}; remove it with \
                     `cloudmap-sidecar deregister --service-id {service_id} --instance-id {id}`");
                return ExitStatus::LeftBehind;
            }
            info!(event = "deregistered", instance_id = %id, service_id = %service_id, "instance deregistered");
            if serving == Some(false) && !skip_drain {
                info!("the application is failing its health check: no drain");
                skip_drain = true;
            }
        }

        if !unhealthy_first && !skip_drain {
            let wanted = self.settings.drain.unwrap_or_else(|| p.service.max_ttl());
            // After deregistration there is nothing left to do but wait, and even an instance
            // deregistered early is clean: any further stop request just ends the drain.
            let _ = self.drain(wanted, deadline, stops).await;
        }
        info!(event = "stopped", instance_id = %id, service_id = %service_id, "stopped cleanly");
        ExitStatus::Clean
    }

    /// Keep serving for `wanted`, cut at `until`. `None`: an immediate stop was asked for; a second
    /// stop request ends the drain early.
    async fn drain(
        &self,
        wanted: Duration,
        until: Instant,
        stops: &mut StopRequests,
    ) -> Option<()> {
        let left = until.saturating_duration_since(Instant::now());
        let drain = wanted.min(left);
        if drain < wanted {
            warn!(
                "drain cut from {} to {} by --stop-timeout: DNS clients may still use this address after exit",
                crate::config::human(wanted),
                crate::config::human(drain)
            );
        }
        if drain.is_zero() {
            return Some(());
        }
        info!(
            event = "draining",
            drain_ms = u64::try_from(drain.as_millis()).unwrap_or(u64::MAX),
            "waiting {} for DNS caches to forget this instance",
            crate::config::human(drain)
        );
        let sleep = tokio::time::sleep(drain);
        tokio::pin!(sleep);
        match race(sleep.as_mut(), stops).await {
            Raced::Done(()) => Some(()),
            Raced::Stop(Stop::Immediate) => None,
            Raced::Stop(s) => {
                let why = match s {
                    Stop::Immediate => "an immediate stop",
                    _ => "a second stop request",
                };
                info!("{why}: ending the drain early");
                Some(())
            }
        }
    }

    /// One probe at the time of the stop (not the last periodic result, which may be a whole
    /// interval old). `None` without a probe.
    async fn still_serving(&self) -> Option<bool> {
        let probe = self.probe?;
        let result = probe.check().await;
        if let Err(why) = &result {
            info!("health probe at stop failed: {why}");
        }
        Some(result.is_ok())
    }

    fn abandon(&self, p: &Prepared) -> ExitStatus {
        error!(event = "left_behind", instance_id = %p.instance_id, service_id = %p.service.id,
            "immediate stop: instance {} is left registered in service {}", p.instance_id, p.service.id);
        ExitStatus::LeftBehind
    }
}

impl ExitStatus {
    /// After a failed start-up, a clean cleanup is still a failure.
    fn min_failure(self) -> ExitStatus {
        match self {
            ExitStatus::Clean => ExitStatus::Failure,
            other => other,
        }
    }
}

/// A piece of stop work, or the next stop request, whichever comes first.
enum Raced<T> {
    Done(T),
    Stop(Stop),
}

async fn race<T>(work: Pin<&mut impl Future<Output = T>>, stops: &mut StopRequests) -> Raced<T> {
    tokio::select! {
        r = work => Raced::Done(r),
        s = stops.next() => Raced::Stop(s),
    }
}

/// What woke the serving loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    Probe,
    Reassert,
}

/// The next tick of an optional timer; pending forever without one.
async fn tick(timer: &mut Option<Interval>) {
    match timer {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// `A:10,SRV:10`, or `none` for a service without DNS records (HTTP namespaces).
fn dns_records_summary(service: &ServiceInfo) -> String {
    if service.dns_records.is_empty() {
        return "none".to_string();
    }
    service
        .dns_records
        .iter()
        .map(|r| format!("{}:{}", r.kind, r.ttl))
        .collect::<Vec<_>>()
        .join(",")
}

/// Retry "not ready" until the deadline.
async fn locate_until<L: Locator>(locator: &L, deadline: Instant) -> Result<Location, StartError> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let attempt = tokio::time::timeout_at(deadline, locator.locate()).await;
        let why = match attempt {
            Ok(Ok(loc)) => return Ok(loc),
            Ok(Err(LocateError::Invalid(m))) => return Err(StartError::Config(m)),
            Ok(Err(LocateError::NotReady(m))) => m,
            Err(_) => "metadata look-up did not answer".to_string(),
        };
        warn!(
            attempt = backoff.attempts() + 1,
            "address not available yet: {why}"
        );
        if !backoff.wait(deadline).await {
            return Err(StartError::Runtime(format!(
                "no usable address before the start deadline (--start-timeout): {why}"
            )));
        }
    }
}

/// The full attribute set: the user's, then placement, then the reserved address attributes.
fn instance_attributes(settings: &Settings, location: &Location) -> Attributes {
    let mut attrs = settings.attributes.clone();
    attrs.fill_from(&location.attributes);
    if attrs.get(attributes::REGION).is_none() {
        attrs.insert_known(attributes::REGION, settings.region_hint.as_deref());
    }
    if let Some(v4) = location.ipv4 {
        attrs.insert(attributes::AWS_INSTANCE_IPV4, &attributes::ipv4_value(v4));
    }
    if let Some(v6) = location.ipv6 {
        attrs.insert(attributes::AWS_INSTANCE_IPV6, &attributes::ipv6_value(v6));
    }
    if let Some(port) = location.port {
        attrs.insert(attributes::AWS_INSTANCE_PORT, &port.to_string());
    }
    attributes::mark_owned(&mut attrs);
    attrs
}

/// The instance must carry what the service's DNS records are built from.
fn check_records(
    service: &ServiceInfo,
    instance_id: &str,
    attrs: &Attributes,
) -> Result<(), String> {
    let has = |k| attrs.get(k).is_some();
    let name = &service.name;
    if service.has_record(RecordKind::A) && !has(attributes::AWS_INSTANCE_IPV4) {
        return Err(format!(
            "service {name} has A records, which need AWS_INSTANCE_IPV4, but no IPv4 address was found: set --ip (CLOUDMAP_IP) to an IPv4 address"
        ));
    }
    if service.has_record(RecordKind::Aaaa) && !has(attributes::AWS_INSTANCE_IPV6) {
        return Err(format!(
            "service {name} has AAAA records, which need AWS_INSTANCE_IPV6, but no IPv6 address was found: set --ip (CLOUDMAP_IP) to an IPv6 address"
        ));
    }
    if service.has_record(RecordKind::Srv) {
        if !has(attributes::AWS_INSTANCE_PORT) {
            return Err(format!(
                "service {name} has SRV records, which need AWS_INSTANCE_PORT: set --port (CLOUDMAP_PORT)"
            ));
        }
        if !has(attributes::AWS_INSTANCE_IPV4) && !has(attributes::AWS_INSTANCE_IPV6) {
            return Err(format!(
                "service {name} has SRV records, which need AWS_INSTANCE_IPV4 or AWS_INSTANCE_IPV6: set --ip (CLOUDMAP_IP)"
            ));
        }
        attributes::check_dns_label(instance_id)
            .map_err(|why| format!("{why}: set --instance-id"))?;
    }
    if service.route53_health && !has(attributes::AWS_INSTANCE_PORT) {
        warn!("service {name} has a Route 53 health check: without --port it probes port 80");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
