//! The lifecycle against a fake registry, locator and probe, on tokio's paused clock: the order of
//! calls and the timing of the stop are asserted directly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::shutdown::{Signal, StopRequests, StopSender};
use super::*;
use crate::config::{self, Invocation};
use crate::registry::{DnsRecord, Health, RecordKind};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Resolve,
    Register(Vec<(String, String)>),
    SetHealth(Health),
    Deregister,
    Instance,
}

/// Records every call; each call can be given a latency and a scripted result.
#[derive(Default)]
struct FakeRegistry {
    service: Option<ServiceInfo>,
    resolve_error: Option<RegistryError>,
    register_results: RefCell<VecDeque<Result<(), RegistryError>>>,
    register_latency: Duration,
    deregister_latency: Duration,
    /// What `GetInstance` finds, in turn; when empty, the attributes last registered.
    instance_results: RefCell<VecDeque<Option<Attributes>>>,
    calls: RefCell<Vec<(Duration, Call)>>,
    start: RefCell<Option<Instant>>,
}

impl FakeRegistry {
    fn new(service: ServiceInfo) -> Self {
        FakeRegistry {
            service: Some(service),
            ..FakeRegistry::default()
        }
    }

    fn record(&self, call: Call) {
        let start = *self.start.borrow_mut().get_or_insert_with(Instant::now);
        self.calls.borrow_mut().push((start.elapsed(), call));
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.borrow().iter().map(|(_, c)| c.clone()).collect()
    }

    fn names(&self) -> Vec<&'static str> {
        self.calls()
            .iter()
            .map(|c| match c {
                Call::Resolve => "resolve",
                Call::Register(_) => "register",
                Call::SetHealth(Health::Healthy) => "healthy",
                Call::SetHealth(Health::Unhealthy) => "unhealthy",
                Call::Deregister => "deregister",
                Call::Instance => "instance",
            })
            .collect()
    }

    /// When each call of this name was made, from the first call.
    fn times(&self, name: &str) -> Vec<Duration> {
        let names = self.names();
        self.calls
            .borrow()
            .iter()
            .zip(names)
            .filter(|(_, n)| *n == name)
            .map(|((t, _), _)| *t)
            .collect()
    }

    fn registered_attrs(&self) -> Vec<(String, String)> {
        self.calls()
            .into_iter()
            .find_map(|c| match c {
                Call::Register(a) => Some(a),
                _ => None,
            })
            .expect("a register call")
    }
}

impl Registry for FakeRegistry {
    async fn resolve(
        &self,
        _: &crate::config::ServiceRef,
        _: Instant,
    ) -> Result<ServiceInfo, RegistryError> {
        self.record(Call::Resolve);
        match &self.resolve_error {
            Some(e) => Err(e.clone()),
            None => Ok(self.service.clone().expect("service")),
        }
    }

    async fn register(
        &self,
        _: &str,
        _: &str,
        attributes: &Attributes,
        deadline: Instant,
    ) -> Result<(), RegistryError> {
        self.record(Call::Register(
            attributes
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ));
        if Instant::now() + self.register_latency > deadline {
            tokio::time::sleep_until(deadline).await;
            return Err(RegistryError::DeadlineExceeded {
                what: "RegisterInstance".into(),
                last_error: "slow".into(),
            });
        }
        tokio::time::sleep(self.register_latency).await;
        self.register_results
            .borrow_mut()
            .pop_front()
            .unwrap_or(Ok(()))
    }

    async fn set_health(
        &self,
        _: &str,
        _: &str,
        health: Health,
        _: Instant,
    ) -> Result<(), RegistryError> {
        self.record(Call::SetHealth(health));
        Ok(())
    }

    async fn deregister(&self, _: &str, _: &str, deadline: Instant) -> Result<(), RegistryError> {
        self.record(Call::Deregister);
        if Instant::now() + self.deregister_latency > deadline {
            tokio::time::sleep_until(deadline).await;
            return Err(RegistryError::DeadlineExceeded {
                what: "DeregisterInstance".into(),
                last_error: "slow".into(),
            });
        }
        tokio::time::sleep(self.deregister_latency).await;
        Ok(())
    }

    async fn instance(
        &self,
        _: &str,
        _: &str,
        _: Instant,
    ) -> Result<Option<Attributes>, RegistryError> {
        self.record(Call::Instance);
        if let Some(next) = self.instance_results.borrow_mut().pop_front() {
            return Ok(next);
        }
        let last = self.calls().into_iter().rev().find_map(|c| match c {
            Call::Register(a) => Some(a),
            _ => None,
        });
        Ok(last.map(|a| {
            let mut attrs = Attributes::default();
            for (k, v) in a {
                attrs.insert(&k, &v);
            }
            attrs
        }))
    }
}

/// Not ready `not_ready` times, then the location (or an error for good).
struct FakeLocator {
    not_ready: RefCell<u32>,
    result: Result<Location, LocateError>,
    attempts: RefCell<u32>,
}

impl FakeLocator {
    fn ready() -> Self {
        FakeLocator::after(0)
    }

    fn after(not_ready: u32) -> Self {
        FakeLocator {
            not_ready: RefCell::new(not_ready),
            result: Ok(Location {
                ipv4: Some("10.0.0.7".parse().unwrap()),
                ipv6: None,
                port: Some(8080),
                instance_id: Some("task0123".into()),
                attributes: {
                    let mut a = Attributes::default();
                    a.insert("AVAILABILITY_ZONE", "us-east-1a");
                    a
                },
                source: "fake".into(),
            }),
            attempts: RefCell::new(0),
        }
    }
}

impl Locator for FakeLocator {
    async fn locate(&self) -> Result<Location, LocateError> {
        *self.attempts.borrow_mut() += 1;
        let mut left = self.not_ready.borrow_mut();
        if *left > 0 {
            *left -= 1;
            return Err(LocateError::NotReady("agent not ready".into()));
        }
        self.result.clone()
    }
}

/// Scripted probe results; the last one repeats.
struct FakeProbe(RefCell<VecDeque<bool>>);

impl FakeProbe {
    fn new(results: &[bool]) -> Self {
        FakeProbe(RefCell::new(results.iter().copied().collect()))
    }
}

impl Probe for FakeProbe {
    async fn check(&self) -> Result<(), String> {
        let mut q = self.0.borrow_mut();
        let pass = if q.len() > 1 {
            q.pop_front()
        } else {
            q.front().copied()
        }
        .unwrap_or(true);
        if pass {
            Ok(())
        } else {
            Err("503".into())
        }
    }
}

fn service(custom_health: bool, ttl: Option<u64>) -> ServiceInfo {
    ServiceInfo {
        id: "srv-test".into(),
        name: "ap".into(),
        namespace_id: "ns-test".into(),
        custom_health,
        route53_health: false,
        dns_records: ttl
            .map(|ttl| {
                vec![DnsRecord {
                    kind: RecordKind::A,
                    ttl,
                }]
            })
            .unwrap_or_default(),
    }
}

fn settings(args: &[&str]) -> Settings {
    let mut argv = vec!["cloudmap-sidecar", "--service-id", "srv-test"];
    argv.extend_from_slice(args);
    let env = [("AWS_REGION", "us-east-1")];
    match config::parse(argv, &env) {
        Ok(Invocation::Run(s)) => *s,
        other => panic!("{other:?}"),
    }
}

fn stop_after(tx: &StopSender, after: Duration, signal: Signal) {
    let tx = tx.clone();
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        tx.send(signal).ok();
    });
}

async fn run_fake(
    s: &Settings,
    reg: &FakeRegistry,
    loc: &FakeLocator,
    probe: Option<&FakeProbe>,
    stops: &mut StopRequests,
) -> (ExitStatus, Duration) {
    let started = Instant::now();
    let status = run(s, reg, loc, probe, stops).await;
    (status, started.elapsed())
}

#[tokio::test(start_paused = true)]
async fn registers_then_deregisters_on_sigterm_and_exits_0() {
    let s = settings(&["--attribute", "TIER=ap"]);
    let reg = FakeRegistry::new(service(false, None));
    let (tx, mut stops) = StopRequests::channel();
    stop_after(&tx, Duration::from_secs(30), Signal::Stop);
    let (status, _) = run_fake(&s, &reg, &FakeLocator::ready(), None, &mut stops).await;
    assert_eq!(status, ExitStatus::Clean);
    assert_eq!(reg.names(), ["resolve", "register", "deregister"]);
    let attrs = reg.registered_attrs();
    let get = |k: &str| {
        attrs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("AWS_INSTANCE_IPV4"), Some("10.0.0.7"));
    assert_eq!(get("AWS_INSTANCE_PORT"), Some("8080"));
    assert_eq!(get("AVAILABILITY_ZONE"), Some("us-east-1a"));
    assert_eq!(get("REGION"), Some("us-east-1"));
    assert_eq!(get("TIER"), Some("ap"));
    assert_eq!(
        get("AWS_INIT_HEALTH_STATUS"),
        None,
        "only for custom health services"
    );
}

#[tokio::test(start_paused = true)]
async fn custom_health_registers_unhealthy_until_the_first_pass_then_reports_changes_only() {
    let s = settings(&[
        "--health-url",
        "http://127.0.0.1:1/health",
        "--health-interval",
        "1s",
        "--unhealthy-threshold",
        "2",
        "--healthy-threshold",
        "1",
    ]);
    let reg = FakeRegistry::new(service(true, None));
    // first probe fails, then passes 3 times, fails 2 times, passes again.
    let probe = FakeProbe::new(&[false, true, true, true, false, false, true]);
    let (tx, mut stops) = StopRequests::channel();
    stop_after(&tx, Duration::from_millis(10_500), Signal::Stop);
    let (status, _) = run_fake(&s, &reg, &FakeLocator::ready(), Some(&probe), &mut stops).await;
    assert_eq!(status, ExitStatus::Clean);
    let attrs = reg.registered_attrs();
    assert!(
        attrs.contains(&("AWS_INIT_HEALTH_STATUS".into(), "UNHEALTHY".into())),
        "{attrs:?}"
    );
    assert_eq!(
        reg.names(),
        [
            "resolve",
            "register",
            "unhealthy",
            "healthy",
            "unhealthy",
            "healthy",
            "deregister"
        ],
        "the status is pushed again after the upsert, then only changes are sent"
    );
}

#[tokio::test(start_paused = true)]
async fn a_healthy_application_is_registered_healthy_at_once() {
    let s = settings(&["--health-url", "http://127.0.0.1:1/health"]);
    let reg = FakeRegistry::new(service(true, None));
    let probe = FakeProbe::new(&[true]);
    let (tx, mut stops) = StopRequests::channel();
    stop_after(&tx, Duration::from_secs(20), Signal::Stop);
    run_fake(&s, &reg, &FakeLocator::ready(), Some(&probe), &mut stops).await;
    assert!(reg
        .registered_attrs()
        .contains(&("AWS_INIT_HEALTH_STATUS".into(), "HEALTHY".into())));
    assert_eq!(
        reg.names(),
        ["resolve", "register", "healthy", "deregister"]
    );
}

#[tokio::test(start_paused = true)]
async fn without_custom_health_registration_waits_for_the_first_pass() {
    let s = settings(&[
        "--health-url",
        "http://127.0.0.1:1/health",
        "--health-interval",
        "1s",
    ]);
    let reg = FakeRegistry::new(service(false, None));
    let probe = FakeProbe::new(&[false, false, false, true]);
    let (tx, mut stops) = StopRequests::channel();
    stop_after(&tx, Duration::from_secs(10), Signal::Stop);
    let (status, _) = run_fake(&s, &reg, &FakeLocator::ready(), Some(&probe), &mut stops).await;
    assert_eq!(status, ExitStatus::Clean);
    let calls = reg.calls.borrow().clone();
    let (at, _) = calls
        .iter()
        .find(|(_, c)| matches!(c, Call::Register(_)))
        .expect("registered");
    assert_eq!(
        *at,
        Duration::from_secs(3),
        "registered at the first passing probe"
    );
    assert_eq!(reg.names(), ["resolve", "register", "deregister"]);
}

#[tokio::test(start_paused = true)]
async fn without_custom_health_an_unhealthy_instance_is_deregistered_and_comes_back() {
    let s = settings(&[
        "--health-url",
        "http://127.0.0.1:1/health",
        "--health-interval",
        "1s",
        "--unhealthy-threshold",
        "1",
        "--healthy-threshold",
        "1",
    ]);
    let reg = FakeRegistry::new(service(false, None));
    let probe = FakeProbe::new(&[true, true, false, true]);
    let (tx, mut stops) = StopRequests::channel();
    stop_after(&tx, Duration::from_millis(5_500), Signal::Stop);
    run_fake(&s, &reg, &FakeLocator::ready(), Some(&probe), &mut stops).await;
    assert_eq!(
        reg.names(),
        [
            "resolve",
            "register",
            "deregister",
            "register",
            "deregister"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_stop_while_metadata_is_not_ready_leaves_nothing_registered() {
    let s = settings(&[]);
    let reg = FakeRegistry::new(service(true, None));
    let loc = FakeLocator::after(1_000);
    let (tx, mut stops) = StopRequests::channel();
    stop_after(&tx, Duration::from_secs(3), Signal::Stop);
    let (status, took) = run_fake(&s, &reg, &loc, None, &mut stops).await;
    assert_eq!(status, ExitStatus::Clean);
    assert_eq!(reg.names(), ["resolve"]);
    assert!(*loc.attempts.borrow() > 1, "retried");
    assert!(took < Duration::from_secs(4), "stopped promptly: {took:?}");
}

#[tokio::test(start_paused = true)]
async fn metadata_that_never_becomes_ready_fails_at_the_start_deadline_with_exit_1() {
    let s = settings(&["--start-timeout", "10s"]);
    let reg = FakeRegistry::new(service(true, None));
    let (_tx, mut stops) = StopRequests::channel();
    let (status, took) = run_fake(&s, &reg, &FakeLocator::after(u32::MAX), None, &mut stops).await;
    assert_eq!(status, ExitStatus::Failure);
    assert_eq!(took, Duration::from_secs(10));
    assert_eq!(reg.names(), ["resolve"]);
}

#[tokio::test(start_paused = true)]
async fn metadata_late_by_a_few_attempts_still_registers() {
    let s = settings(&[]);
    let reg = FakeRegistry::new(service(true, None));
    let loc = FakeLocator::after(3);
    let (tx, mut stops) = StopRequests::channel();
    stop_after(&tx, Duration::from_secs(30), Signal::Stop);
    let (status, _) = run_fake(&s, &reg, &loc, None, &mut stops).await;
    assert_eq!(status, ExitStatus::Clean);
    assert_eq!(*loc.attempts.borrow(), 4);
    assert_eq!(
        reg.names(),
        ["resolve", "register", "healthy", "deregister"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_stop_during_registration_deregisters_once_registration_completes_then_drains() {
    let s = settings(&["--drain", "10s"]);
    let mut reg = FakeRegistry::new(service(false, Some(60)));
    reg.register_latency = Duration::from_secs(2);
    let (tx, mut stops) = StopRequests::channel();
    stop_after(&tx, Duration::from_secs(1), Signal::Stop);
    let (status, took) = run_fake(&s, &reg, &FakeLocator::ready(), None, &mut stops).await;
    assert_eq!(status, ExitStatus::Clean);
    assert_eq!(reg.names(), ["resolve", "register", "deregister"]);
    assert_eq!(reg.times("deregister"), [Duration::from_secs(2)]);
    assert_eq!(
        took,
        Duration::from_secs(2 + 10),
        "it was visible, so clients may hold it: drained"
    );

    // Two signals while registering: no drain.
    let mut reg = FakeRegistry::new(service(false, Some(60)));
    reg.register_latency = Duration::from_secs(2);
    let (tx, mut stops) = StopRequests::channel();
    stop_after(&tx, Duration::from_millis(1_000), Signal::Stop);
    stop_after(&tx, Duration::from_millis(1_500), Signal::Stop);
    let (status, took) = run_fake(&s, &reg, &FakeLocator::ready(), None, &mut stops).await;
    assert_eq!(status, ExitStatus::Clean);
    assert_eq!(took, Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn the_drain_defaults_to_the_dns_ttl_and_follows_deregistration() {
    let s = settings(&[]);
    let mut reg = FakeRegistry::new(service(false, Some(15)));
    reg.deregister_latency = Duration::from_secs(1);
    let (tx, mut stops) = StopRequests::channel();
    stop_after(&tx, Duration::from_secs(5), Signal::Stop);
    let (status, took) = run_fake(&s, &reg, &FakeLocator::ready(), None, &mut stops).await;
    assert_eq!(status, ExitStatus::Clean);
    assert_eq!(
        took,
        Duration::from_secs(5 + 1 + 15),
        "signal + deregistration + TTL"
    );
}

#[tokio::test(start_paused = true)]
async fn the_drain_is_capped_by_the_stop_budget() {
    let s = settings(&["--stop-timeout", "10s"]);
    let mut reg = FakeRegistry::new(service(false, Some(300)));
    reg.deregister_latency = Duration::from_secs(2);
    let (tx, mut stops) = StopRequests::channel();
    stop_after(&tx, Duration::from_secs(5), Signal::Stop);
    let (status, took) = run_fake(&s, &reg, &FakeLocator::ready(), None, &mut stops).await;
    assert_eq!(status, ExitStatus::Clean);
    assert_eq!(
        took,
        Duration::from_secs(5 + 10),
        "the whole stop fits in --stop-timeout"
    );
}

#[tokio::test(start_paused = true)]
async fn a_second_signal_ends_the_drain() {
    let s = settings(&["--drain", "20s"]);
    let reg = FakeRegistry::new(service(false, None));
    let (tx, mut stops) = StopRequests::channel();
    stop_after(&tx, Duration::from_secs(5), Signal::Stop);
    stop_after(&tx, Duration::from_secs(8), Signal::Stop);
    let (status, took) = run_fake(&s, &reg, &FakeLocator::ready(), None, &mut stops).await;
    assert_eq!(status, ExitStatus::Clean);
    assert_eq!(took, Duration::from_secs(8));
    assert_eq!(reg.names(), ["resolve", "register", "deregister"]);
}

#[tokio::test(start_paused = true)]
async fn an_application_already_failing_at_sigterm_gets_no_drain() {
    let s = settings(&[
        "--health-url",
        "http://127.0.0.1:1/health",
        "--health-interval",
        "1s",
        "--drain",
        "20s",
    ]);
    let reg = FakeRegistry::new(service(true, None));
    let probe = FakeProbe::new(&[true, false]);
    let (tx, mut stops) = StopRequests::channel();
    stop_after(&tx, Duration::from_millis(1_500), Signal::Stop);
    let (status, took) = run_fake(&s, &reg, &FakeLocator::ready(), Some(&probe), &mut stops).await;
    assert_eq!(status, ExitStatus::Clean);
    assert_eq!(took, Duration::from_millis(1_500));
}

#[tokio::test(start_paused = true)]
async fn deregistration_that_outlasts_the_stop_budget_exits_3() {
    let s = settings(&["--stop-timeout", "5s"]);
    let mut reg = FakeRegistry::new(service(false, None));
    reg.deregister_latency = Duration::from_secs(60);
    let (tx, mut stops) = StopRequests::channel();
    stop_after(&tx, Duration::from_secs(1), Signal::Stop);
    let (status, took) = run_fake(&s, &reg, &FakeLocator::ready(), None, &mut stops).await;
    assert_eq!(status, ExitStatus::LeftBehind);
    assert_eq!(took, Duration::from_secs(1 + 5));
}

#[tokio::test(start_paused = true)]
async fn sigquit_exits_at_once_and_reports_the_instance_left_behind() {
    let s = settings(&[]);
    let reg = FakeRegistry::new(service(false, None));
    let (tx, mut stops) = StopRequests::channel();
    stop_after(&tx, Duration::from_secs(1), Signal::Quit);
    let (status, _) = run_fake(&s, &reg, &FakeLocator::ready(), None, &mut stops).await;
    assert_eq!(status, ExitStatus::LeftBehind);
    assert_eq!(reg.names(), ["resolve", "register"]);
}

#[tokio::test(start_paused = true)]
async fn an_unknown_service_is_a_configuration_error() {
    let s = settings(&[]);
    let reg = FakeRegistry {
        resolve_error: Some(RegistryError::NotFound("service srv-test not found".into())),
        ..FakeRegistry::default()
    };
    let (_tx, mut stops) = StopRequests::channel();
    let (status, _) = run_fake(&s, &reg, &FakeLocator::ready(), None, &mut stops).await;
    assert_eq!(status, ExitStatus::Config);
    assert_eq!(reg.names(), ["resolve"]);
}

#[tokio::test(start_paused = true)]
async fn srv_records_without_a_port_are_a_configuration_error() {
    let s = settings(&[]);
    let mut svc = service(false, None);
    svc.dns_records = vec![DnsRecord {
        kind: RecordKind::Srv,
        ttl: 10,
    }];
    let reg = FakeRegistry::new(svc);
    let mut loc = FakeLocator::ready();
    if let Ok(l) = &mut loc.result {
        l.port = None;
    }
    let (_tx, mut stops) = StopRequests::channel();
    let (status, _) = run_fake(&s, &reg, &loc, None, &mut stops).await;
    assert_eq!(status, ExitStatus::Config);
    assert_eq!(reg.names(), ["resolve"], "nothing registered");
}

#[tokio::test(start_paused = true)]
async fn a_failed_registration_operation_exits_1_without_deregistering() {
    let s = settings(&[]);
    let reg = FakeRegistry::new(service(false, None));
    reg.register_results
        .borrow_mut()
        .push_back(Err(RegistryError::OperationFailed {
            operation_id: "op-1".into(),
            code: "ACCESS_DENIED".into(),
            message: "route53".into(),
        }));
    let (_tx, mut stops) = StopRequests::channel();
    let (status, _) = run_fake(&s, &reg, &FakeLocator::ready(), None, &mut stops).await;
    assert_eq!(status, ExitStatus::Failure);
    assert_eq!(reg.names(), ["resolve", "register"]);
}

#[tokio::test(start_paused = true)]
async fn a_registration_that_times_out_is_cleaned_up_and_exits_1() {
    let s = settings(&["--start-timeout", "5s"]);
    let mut reg = FakeRegistry::new(service(false, None));
    reg.register_latency = Duration::from_secs(60);
    let (_tx, mut stops) = StopRequests::channel();
    let (status, _) = run_fake(&s, &reg, &FakeLocator::ready(), None, &mut stops).await;
    assert_eq!(status, ExitStatus::Failure);
    assert_eq!(
        reg.names(),
        ["resolve", "register", "deregister"],
        "never orphaned"
    );
}

fn stop_at(tx: &StopSender, at: &[(u64, Signal)]) {
    for (ms, signal) in at {
        stop_after(tx, Duration::from_millis(*ms), *signal);
    }
}

#[tokio::test(start_paused = true)]
async fn unhealthy_first_marks_unhealthy_drains_then_deregisters() {
    let s = settings(&["--drain-mode", "unhealthy-first", "--drain", "8s"]);
    let reg = FakeRegistry::new(service(true, Some(10)));
    let (tx, mut stops) = StopRequests::channel();
    stop_at(&tx, &[(5_000, Signal::Stop)]);
    let (status, took) = run_fake(&s, &reg, &FakeLocator::ready(), None, &mut stops).await;
    assert_eq!(status, ExitStatus::Clean);
    assert_eq!(
        reg.names(),
        ["resolve", "register", "healthy", "unhealthy", "deregister"]
    );
    assert_eq!(reg.times("unhealthy"), [Duration::from_secs(5)]);
    assert_eq!(
        reg.times("deregister"),
        [Duration::from_secs(5 + 8)],
        "deregistered after the drain, while the application kept serving"
    );
    assert_eq!(
        took,
        Duration::from_secs(13),
        "no second drain after deregistering"
    );
}

#[tokio::test(start_paused = true)]
async fn unhealthy_first_drains_by_default_for_the_health_delay_plus_the_ttl() {
    let s = settings(&["--drain-mode", "unhealthy-first", "--stop-timeout", "60s"]);
    let reg = FakeRegistry::new(service(true, Some(10)));
    let (tx, mut stops) = StopRequests::channel();
    stop_at(&tx, &[(1_000, Signal::Stop)]);
    let (status, _) = run_fake(&s, &reg, &FakeLocator::ready(), None, &mut stops).await;
    assert_eq!(status, ExitStatus::Clean);
    assert_eq!(
        reg.times("deregister"),
        [Duration::from_secs(1 + 30 + 10)],
        "Cloud Map's ~30 s before applying UNHEALTHY, then the TTL"
    );
}

#[tokio::test(start_paused = true)]
async fn unhealthy_first_keeps_part_of_the_budget_for_the_deregistration() {
    // Default stop budget 25 s: the drain (30 s + TTL) is cut to leave 5 s for deregistering.
    let s = settings(&["--drain-mode", "unhealthy-first"]);
    let mut reg = FakeRegistry::new(service(true, Some(10)));
    reg.deregister_latency = Duration::from_secs(2);
    let (tx, mut stops) = StopRequests::channel();
    stop_at(&tx, &[(1_000, Signal::Stop)]);
    let (status, took) = run_fake(&s, &reg, &FakeLocator::ready(), None, &mut stops).await;
    assert_eq!(status, ExitStatus::Clean);
    assert_eq!(reg.times("deregister"), [Duration::from_secs(1 + 20)]);
    assert_eq!(took, Duration::from_secs(1 + 20 + 2));
}

#[tokio::test(start_paused = true)]
async fn unhealthy_first_second_signal_deregisters_at_once() {
    let s = settings(&["--drain-mode", "unhealthy-first", "--drain", "20s"]);
    let reg = FakeRegistry::new(service(true, None));
    let (tx, mut stops) = StopRequests::channel();
    stop_at(&tx, &[(5_000, Signal::Stop), (8_000, Signal::Stop)]);
    let (status, took) = run_fake(&s, &reg, &FakeLocator::ready(), None, &mut stops).await;
    assert_eq!(status, ExitStatus::Clean);
    assert_eq!(reg.times("deregister"), [Duration::from_secs(8)]);
    assert_eq!(took, Duration::from_secs(8));
}

#[tokio::test(start_paused = true)]
async fn unhealthy_first_sigquit_during_the_drain_leaves_the_instance_behind() {
    let s = settings(&["--drain-mode", "unhealthy-first", "--drain", "20s"]);
    let reg = FakeRegistry::new(service(true, None));
    let (tx, mut stops) = StopRequests::channel();
    stop_at(&tx, &[(5_000, Signal::Stop), (8_000, Signal::Quit)]);
    let (status, took) = run_fake(&s, &reg, &FakeLocator::ready(), None, &mut stops).await;
    assert_eq!(
        status,
        ExitStatus::LeftBehind,
        "still registered (UNHEALTHY)"
    );
    assert_eq!(reg.names(), ["resolve", "register", "healthy", "unhealthy"]);
    assert_eq!(took, Duration::from_secs(8));
}

#[tokio::test(start_paused = true)]
async fn unhealthy_first_with_a_dead_application_deregisters_without_drain() {
    let s = settings(&[
        "--drain-mode",
        "unhealthy-first",
        "--drain",
        "20s",
        "--health-url",
        "http://127.0.0.1:1/health",
        "--health-interval",
        "1h",
    ]);
    let reg = FakeRegistry::new(service(true, None));
    let probe = FakeProbe::new(&[true, false]);
    let (tx, mut stops) = StopRequests::channel();
    stop_at(&tx, &[(5_000, Signal::Stop)]);
    let (status, took) = run_fake(&s, &reg, &FakeLocator::ready(), Some(&probe), &mut stops).await;
    assert_eq!(status, ExitStatus::Clean);
    assert_eq!(reg.times("deregister"), [Duration::from_secs(5)]);
    assert_eq!(took, Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn unhealthy_first_needs_a_service_with_custom_health() {
    let s = settings(&["--drain-mode", "unhealthy-first"]);
    let reg = FakeRegistry::new(service(false, None));
    let (_tx, mut stops) = StopRequests::channel();
    let (status, _) = run_fake(&s, &reg, &FakeLocator::ready(), None, &mut stops).await;
    assert_eq!(status, ExitStatus::Config);
    assert_eq!(reg.names(), ["resolve"], "nothing registered");
}

#[tokio::test(start_paused = true)]
async fn an_application_that_stopped_answering_since_the_last_probe_gets_no_drain() {
    // The periodic probe last passed an hour-long interval ago; the probe at SIGTERM fails.
    let s = settings(&[
        "--health-url",
        "http://127.0.0.1:1/health",
        "--health-interval",
        "1h",
        "--drain",
        "20s",
    ]);
    let reg = FakeRegistry::new(service(true, None));
    let probe = FakeProbe::new(&[true, false]);
    let (tx, mut stops) = StopRequests::channel();
    stop_at(&tx, &[(5_000, Signal::Stop)]);
    let (status, took) = run_fake(&s, &reg, &FakeLocator::ready(), Some(&probe), &mut stops).await;
    assert_eq!(status, ExitStatus::Clean);
    assert_eq!(
        reg.names(),
        ["resolve", "register", "healthy", "deregister"]
    );
    assert_eq!(took, Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn reassert_registers_a_removed_instance_again_then_pushes_its_health() {
    let s = settings(&["--reassert-interval", "10s"]);
    let reg = FakeRegistry::new(service(true, None));
    reg.instance_results.borrow_mut().push_back(None);
    let (tx, mut stops) = StopRequests::channel();
    stop_at(&tx, &[(25_000, Signal::Stop)]);
    let (status, _) = run_fake(&s, &reg, &FakeLocator::ready(), None, &mut stops).await;
    assert_eq!(status, ExitStatus::Clean);
    assert_eq!(
        reg.names(),
        [
            "resolve",
            "register",
            "healthy",
            "instance",
            "register",
            "healthy",
            "instance",
            "deregister"
        ],
        "removed at the first check: registered again (full set), health pushed again; fine at the second"
    );
    let registers: Vec<_> = reg
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Register(a) => Some(a),
            _ => None,
        })
        .collect();
    assert_eq!(registers[0], registers[1], "the same full attribute set");
    assert_eq!(
        reg.times("instance"),
        [Duration::from_secs(10), Duration::from_secs(20)]
    );
}

#[tokio::test(start_paused = true)]
async fn reassert_registers_again_when_an_attribute_was_changed() {
    let s = settings(&["--reassert-interval", "10s", "--attribute", "TIER=ap"]);
    let reg = FakeRegistry::new(service(false, None));
    let mut changed = Attributes::default();
    changed.insert("AWS_INSTANCE_IPV4", "10.0.0.7");
    changed.insert("TIER", "web");
    reg.instance_results.borrow_mut().push_back(Some(changed));
    let (tx, mut stops) = StopRequests::channel();
    stop_at(&tx, &[(15_000, Signal::Stop)]);
    run_fake(&s, &reg, &FakeLocator::ready(), None, &mut stops).await;
    assert_eq!(
        reg.names(),
        ["resolve", "register", "instance", "register", "deregister"]
    );
}

#[tokio::test(start_paused = true)]
async fn reassert_leaves_an_intact_instance_alone_and_zero_turns_it_off() {
    let s = settings(&["--reassert-interval", "10s"]);
    let reg = FakeRegistry::new(service(false, None));
    let (tx, mut stops) = StopRequests::channel();
    stop_at(&tx, &[(35_000, Signal::Stop)]);
    run_fake(&s, &reg, &FakeLocator::ready(), None, &mut stops).await;
    assert_eq!(
        reg.names(),
        [
            "resolve",
            "register",
            "instance",
            "instance",
            "instance",
            "deregister"
        ]
    );

    let s = settings(&["--reassert-interval", "0"]);
    let reg = FakeRegistry::new(service(false, None));
    let (tx, mut stops) = StopRequests::channel();
    stop_at(&tx, &[(3_600_000, Signal::Stop)]);
    run_fake(&s, &reg, &FakeLocator::ready(), None, &mut stops).await;
    assert_eq!(reg.names(), ["resolve", "register", "deregister"]);
}

#[tokio::test(start_paused = true)]
async fn start_jitter_delays_the_first_call_by_at_most_the_jitter() {
    let mut delays = Vec::new();
    for _ in 0..20 {
        let s = settings(&["--start-jitter", "10s"]);
        let reg = FakeRegistry::new(service(false, None));
        let (tx, mut stops) = StopRequests::channel();
        stop_at(&tx, &[(60_000, Signal::Stop)]);
        let started = Instant::now();
        let (status, _) = run_fake(&s, &reg, &FakeLocator::ready(), None, &mut stops).await;
        assert_eq!(status, ExitStatus::Clean);
        let first = *reg.start.borrow();
        let delay = first.expect("a call was made") - started;
        assert!(delay <= Duration::from_secs(10), "{delay:?}");
        delays.push(delay);
    }
    delays.dedup();
    assert!(delays.len() > 1, "random, not fixed: {delays:?}");
}

#[tokio::test(start_paused = true)]
async fn a_stop_during_the_start_jitter_ends_it_with_nothing_registered() {
    let s = settings(&["--start-jitter", "1h"]);
    let reg = FakeRegistry::new(service(false, None));
    let (tx, mut stops) = StopRequests::channel();
    stop_at(&tx, &[(1_000, Signal::Stop)]);
    let (status, took) = run_fake(&s, &reg, &FakeLocator::ready(), None, &mut stops).await;
    assert_eq!(status, ExitStatus::Clean);
    assert_eq!(took, Duration::from_secs(1));
    // Unless the random delay happened to be under a second, no call was made at all.
    assert!(reg.names().len() <= 3, "{:?}", reg.names());
}

/// Behaves like real Cloud Map where moto does not: registering an existing instance ID is an
/// upsert that replaces the attributes, and (the worst case of what is undocumented) keeps the
/// instance's current custom health status instead of applying `AWS_INIT_HEALTH_STATUS`.
#[derive(Default)]
struct CloudMapLike {
    instances: RefCell<std::collections::BTreeMap<String, (Attributes, Health)>>,
}

impl Registry for CloudMapLike {
    async fn resolve(
        &self,
        _: &crate::config::ServiceRef,
        _: Instant,
    ) -> Result<ServiceInfo, RegistryError> {
        Ok(service(true, None))
    }

    async fn register(
        &self,
        _: &str,
        instance_id: &str,
        attributes: &Attributes,
        _: Instant,
    ) -> Result<(), RegistryError> {
        let mut all = self.instances.borrow_mut();
        let init = match attributes.get("AWS_INIT_HEALTH_STATUS") {
            Some("UNHEALTHY") => Health::Unhealthy,
            _ => Health::Healthy,
        };
        let health = all.get(instance_id).map(|(_, h)| *h).unwrap_or(init);
        all.insert(instance_id.to_string(), (attributes.clone(), health));
        Ok(())
    }

    async fn set_health(
        &self,
        _: &str,
        instance_id: &str,
        health: Health,
        _: Instant,
    ) -> Result<(), RegistryError> {
        match self.instances.borrow_mut().get_mut(instance_id) {
            Some((_, h)) => {
                *h = health;
                Ok(())
            }
            None => Err(RegistryError::InstanceNotFound(instance_id.into())),
        }
    }

    async fn deregister(
        &self,
        _: &str,
        instance_id: &str,
        _: Instant,
    ) -> Result<(), RegistryError> {
        self.instances.borrow_mut().remove(instance_id);
        Ok(())
    }

    async fn instance(
        &self,
        _: &str,
        instance_id: &str,
        _: Instant,
    ) -> Result<Option<Attributes>, RegistryError> {
        Ok(self
            .instances
            .borrow()
            .get(instance_id)
            .map(|(a, _)| a.clone()))
    }
}

#[tokio::test(start_paused = true)]
async fn a_restart_with_the_same_instance_id_replaces_the_attributes_and_pushes_the_health_again() {
    // The container restarted inside the same task: its previous run left the instance behind,
    // UNHEALTHY and with an attribute this run no longer sets.
    let reg = CloudMapLike::default();
    let mut old = Attributes::default();
    old.insert("AWS_INSTANCE_IPV4", "10.0.0.99");
    old.insert("VERSION", "1");
    reg.instances
        .borrow_mut()
        .insert("task0123".into(), (old, Health::Unhealthy));

    let s = settings(&[
        "--attribute",
        "TIER=ap",
        "--health-url",
        "http://127.0.0.1:1/health",
    ]);
    let probe = FakeProbe::new(&[true]);
    let (tx, mut stops) = StopRequests::channel();
    let check = async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let snapshot = reg.instances.borrow().get("task0123").cloned();
        tx.send(Signal::Stop).ok();
        snapshot
    };
    let loc = FakeLocator::ready();
    let (status, running) = tokio::join!(run(&s, &reg, &loc, Some(&probe), &mut stops), check);
    assert_eq!(status, ExitStatus::Clean);
    let (attrs, health) = running.expect("registered");
    assert_eq!(attrs.get("VERSION"), None, "replaced, not merged");
    assert_eq!(attrs.get("TIER"), Some("ap"));
    assert_eq!(attrs.get("AWS_INSTANCE_IPV4"), Some("10.0.0.7"));
    assert_eq!(
        health,
        Health::Healthy,
        "the current status was sent again after the upsert"
    );
    assert!(reg.instances.borrow().is_empty(), "deregistered at stop");
}

#[tokio::test(start_paused = true)]
async fn a_registration_accepted_but_unconfirmed_is_cleaned_up_and_exits_1() {
    let s = settings(&[]);
    let reg = FakeRegistry::new(service(false, None));
    reg.register_results
        .borrow_mut()
        .push_back(Err(RegistryError::Unconfirmed {
            operation_id: "op-1".into(),
            error: "GetOperation: access denied".into(),
        }));
    let (_tx, mut stops) = StopRequests::channel();
    let (status, _) = run_fake(&s, &reg, &FakeLocator::ready(), None, &mut stops).await;
    assert_eq!(status, ExitStatus::Failure);
    assert_eq!(
        reg.names(),
        ["resolve", "register", "deregister"],
        "it may have been registered: never orphaned"
    );
}
