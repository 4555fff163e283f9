//! Cloud Map faults, signals and the stop budget, through the real binary against moto behind the
//! fault-injecting proxy (`common::proxy`): moto itself never throttles, fails an operation or
//! answers `DuplicateRequest`, so those are injected between the SDK and moto. Every test asserts
//! the exit code and what Cloud Map (moto) holds at the end.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use aws_sdk_servicediscovery::types::RecordType;
use common::proxy::{Fault, Proxy};
use common::*;

const LONG: Duration = Duration::from_secs(60);
const IP: &str = "10.3.0.1";

/// The sidecar talking to Cloud Map through `proxy`, with a fixed address and instance ID.
fn sidecar(proxy: &Proxy, svc: &TestService, id: &str, args: &[&str]) -> Sidecar {
    let mut cmd = sidecar_command(&proxy.url());
    cmd.args(["--service-id", &svc.id, "--ip", IP, "--instance-id", id])
        .args(args);
    Sidecar::spawn(cmd)
}

/// Poll until `check` holds; panics with the sidecar's log after `LONG`.
fn wait_for(s: &Sidecar, what: &str, mut check: impl FnMut() -> bool) {
    let end = Instant::now() + LONG;
    while !check() {
        assert!(
            Instant::now() < end,
            "timed out waiting for {what}; log:\n{}",
            s.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn registered(svc: &TestService, id: &str) -> bool {
    instances(&svc.id).contains_key(id)
}

/// Registered in Cloud Map, and the sidecar done with start-up (a stop before that is a stop
/// during registration, which has no drain).
fn wait_registered(svc: &TestService, id: &str, s: &Sidecar) {
    wait_for(s, "registered", || registered(svc, id));
    wait_for(s, "serving", || s.log().contains("event=\"serving\""));
}

/// The operations of one start and stop in a service with custom health.
const LIFECYCLE_OPS: [&str; 5] = [
    "GetService",
    "RegisterInstance",
    "GetOperation",
    "UpdateInstanceCustomHealthStatus",
    "DeregisterInstance",
];

/// `fault` on the first `times` calls of every operation: the instance is still registered,
/// then deregistered on SIGTERM, exit 0.
fn survives(fault: Fault, times: usize, id: &str) -> (Proxy, String) {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let proxy = Proxy::start();
    for op in LIFECYCLE_OPS {
        proxy.inject(op, fault.clone(), times);
    }
    let mut s = sidecar(
        &proxy,
        &svc,
        id,
        &["--drain", "0", "--reassert-interval", "0"],
    );
    wait_registered(&svc, id, &s);
    wait_for(&s, "health pushed after registration", || {
        proxy
            .calls()
            .iter()
            .any(|c| c.op == "UpdateInstanceCustomHealthStatus" && c.outcome == "forwarded")
    });
    assert_eq!(health(&svc.id, id).as_deref(), Some("HEALTHY"));
    s.signal("TERM");
    assert_eq!(s.wait(LONG), 0, "{}", s.log());
    assert!(instances(&svc.id).is_empty(), "deregistered");
    for op in LIFECYCLE_OPS {
        assert!(
            proxy.count(op) > times,
            "{op} tried again after {times} faults: {:?}",
            proxy.counts()
        );
    }
    (proxy, s.log())
}

#[test]
fn throttling_on_every_call_is_retried_beyond_the_sdk_attempts() {
    // 4 > the SDK's 3 attempts: the sidecar's own backoff has to carry on.
    let (_, log) = survives(Fault::Throttle, 4, "throttled-1");
    assert!(log.contains("ThrottlingException"), "{log}");
    assert!(log.contains("retrying"), "{log}");
}

#[test]
fn server_errors_on_every_call_are_retried() {
    let (_, log) = survives(Fault::ServerError, 4, "five-hundred-1");
    assert!(log.contains("retrying"), "{log}");
}

#[test]
fn connection_resets_on_every_call_are_retried() {
    let (proxy, _) = survives(Fault::Reset, 4, "reset-1");
    assert!(proxy.calls().iter().any(|c| c.outcome == "reset"));
}

#[test]
fn slow_answers_on_every_call_are_waited_for_or_timed_out_and_retried() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let proxy = Proxy::start();
    // Longer than the SDK's 5 s attempt timeout: that attempt times out and is sent again.
    proxy.inject("GetService", Fault::Delay(Duration::from_secs(6)), 1);
    for op in LIFECYCLE_OPS {
        proxy.inject(op, Fault::Delay(Duration::from_millis(1500)), 1);
    }
    let mut s = sidecar(
        &proxy,
        &svc,
        "slow-1",
        &["--drain", "0", "--reassert-interval", "0"],
    );
    wait_registered(&svc, "slow-1", &s);
    wait_for(&s, "health pushed", || {
        proxy.count("UpdateInstanceCustomHealthStatus") >= 1
    });
    s.signal("TERM");
    assert_eq!(s.wait(LONG), 0, "{}", s.log());
    assert!(instances(&svc.id).is_empty());
    assert!(
        proxy.count("GetService") >= 2,
        "the timed-out attempt was sent again"
    );
}

#[test]
fn duplicate_request_waits_for_the_named_operation_then_sends_again() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let proxy = Proxy::start();
    proxy.inject("RegisterInstance", Fault::Duplicate { pending: 3 }, 1);
    proxy.inject("DeregisterInstance", Fault::Duplicate { pending: 2 }, 1);
    let mut s = sidecar(
        &proxy,
        &svc,
        "dup-1",
        &["--drain", "0", "--reassert-interval", "0"],
    );
    wait_registered(&svc, "dup-1", &s);
    s.signal("TERM");
    assert_eq!(s.wait(LONG), 0, "{}", s.log());
    assert!(instances(&svc.id).is_empty(), "deregistered");

    let calls = proxy.calls();
    let pos = |pred: &dyn Fn(&common::proxy::Call) -> bool| calls.iter().position(pred).unwrap();
    let outcomes: Vec<String> = calls
        .iter()
        .map(|c| format!("{} {}", c.op, c.outcome))
        .collect();
    // Register: DuplicateRequest naming dup-op-1, which is followed (3 × PENDING, then SUCCESS)
    // before RegisterInstance is sent again.
    let dup = pos(&|c| c.op == "RegisterInstance" && c.outcome.contains("DuplicateRequest"));
    let done = pos(&|c| c.op == "GetOperation" && c.outcome == "success dup-op-1");
    let again = calls
        .iter()
        .enumerate()
        .position(|(i, c)| i > dup && c.op == "RegisterInstance")
        .unwrap();
    assert!(dup < done && done < again, "{outcomes:#?}");
    assert_eq!(
        calls
            .iter()
            .filter(|c| c.outcome == "pending dup-op-1")
            .count(),
        3,
        "{outcomes:#?}"
    );
    assert_eq!(proxy.count("RegisterInstance"), 2);
    // Deregister: the same.
    let dup = pos(&|c| c.op == "DeregisterInstance" && c.outcome.contains("DuplicateRequest"));
    let done = pos(&|c| c.op == "GetOperation" && c.outcome == "success dup-op-2");
    let again = calls
        .iter()
        .enumerate()
        .position(|(i, c)| i > dup && c.op == "DeregisterInstance")
        .unwrap();
    assert!(dup < done && done < again, "{outcomes:#?}");
}

#[test]
fn an_operation_failed_with_throttled_request_or_internal_failure_is_sent_again() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let proxy = Proxy::start();
    proxy.fail_operations(Some("REGISTER_INSTANCE"), "THROTTLED_REQUEST", 1);
    proxy.fail_operations(Some("DEREGISTER_INSTANCE"), "INTERNAL_FAILURE", 1);
    let mut s = sidecar(
        &proxy,
        &svc,
        "opfail-1",
        &["--drain", "0", "--reassert-interval", "0"],
    );
    wait_registered(&svc, "opfail-1", &s);
    wait_for(&s, "health pushed", || {
        proxy.count("UpdateInstanceCustomHealthStatus") >= 1
    });
    assert_eq!(proxy.count("RegisterInstance"), 2, "sent again after FAIL");
    s.signal("TERM");
    assert_eq!(s.wait(LONG), 0, "{}", s.log());
    assert!(instances(&svc.id).is_empty(), "deregistered");
    assert_eq!(
        proxy.count("DeregisterInstance"),
        2,
        "sent again after FAIL"
    );
    let log = s.log();
    assert!(log.contains("THROTTLED_REQUEST"), "{log}");
    assert!(log.contains("INTERNAL_FAILURE"), "{log}");
}

#[test]
fn a_registration_operation_failed_for_access_denied_exits_1_with_nothing_registered() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let proxy = Proxy::start();
    proxy.fail_operations(Some("REGISTER_INSTANCE"), "ACCESS_DENIED", 1);
    let (code, log) = run_to_exit(
        {
            let mut cmd = sidecar_command(&proxy.url());
            cmd.args([
                "--service-id",
                &svc.id,
                "--ip",
                IP,
                "--instance-id",
                "denied-1",
            ]);
            cmd
        },
        LONG,
    );
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("ACCESS_DENIED"), "{log}");
    assert_eq!(
        proxy.count("RegisterInstance"),
        1,
        "not retried: {:?}",
        proxy.counts()
    );
    assert!(instances(&svc.id).is_empty(), "nothing registered");
}

#[test]
fn a_deregistration_operation_failed_for_access_denied_exits_3_leaving_the_instance() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let proxy = Proxy::start();
    proxy.fail_operations(Some("DEREGISTER_INSTANCE"), "ACCESS_DENIED", 1);
    let mut s = sidecar(
        &proxy,
        &svc,
        "opdenied-1",
        &["--drain", "0", "--reassert-interval", "0"],
    );
    wait_registered(&svc, "opdenied-1", &s);
    s.signal("TERM");
    assert_eq!(s.wait(LONG), 3, "{}", s.log());
    assert!(registered(&svc, "opdenied-1"), "still registered");
    let log = s.log();
    assert!(log.contains("event=\"left_behind\""), "{log}");
    assert!(log.contains("ACCESS_DENIED"), "{log}");
    assert_eq!(proxy.count("DeregisterInstance"), 1, "not retried");
}

#[test]
fn deregistration_refused_for_good_exits_3_naming_the_instance_and_service() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let proxy = Proxy::start();
    proxy.always(
        "DeregisterInstance",
        Fault::Error(400, "AccessDeniedException"),
    );
    let mut s = sidecar(
        &proxy,
        &svc,
        "refused-1",
        &["--drain", "0", "--reassert-interval", "0"],
    );
    wait_registered(&svc, "refused-1", &s);
    let sent = Instant::now();
    s.signal("TERM");
    assert_eq!(s.wait(LONG), 3, "{}", s.log());
    assert!(
        sent.elapsed() < Duration::from_secs(10),
        "access denied is not retried until the budget runs out"
    );
    assert!(registered(&svc, "refused-1"), "still registered");
    let left = s
        .log()
        .lines()
        .find(|l| l.contains("event=\"left_behind\""))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("{}", s.log()));
    assert!(left.contains("instance_id=refused-1"), "{left}");
    assert!(left.contains(&format!("service_id={}", svc.id)), "{left}");
    assert!(left.contains("access denied"), "{left}");
}

#[test]
fn instance_not_found_on_deregister_is_success() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let proxy = Proxy::start();
    let mut s = sidecar(
        &proxy,
        &svc,
        "gone-1",
        &["--drain", "0", "--reassert-interval", "0"],
    );
    wait_registered(&svc, "gone-1", &s);
    // Someone (a sweeper, an operator) removed it already.
    block_on(
        cloudmap()
            .deregister_instance()
            .service_id(&svc.id)
            .instance_id("gone-1")
            .send(),
    )
    .unwrap();
    s.signal("TERM");
    assert_eq!(s.wait(LONG), 0, "{}", s.log());
    assert!(instances(&svc.id).is_empty());
    assert!(s.log().contains("already deregistered"), "{}", s.log());
}

#[test]
fn stop_budget_exhausted_exits_3_with_the_instance_and_service_in_the_log() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let proxy = Proxy::start();
    proxy.always("DeregisterInstance", Fault::Throttle);
    let mut s = sidecar(
        &proxy,
        &svc,
        "budget-1",
        &[
            "--drain",
            "0",
            "--stop-timeout",
            "3s",
            "--reassert-interval",
            "0",
        ],
    );
    wait_registered(&svc, "budget-1", &s);
    let sent = Instant::now();
    s.signal("TERM");
    assert_eq!(s.wait(LONG), 3, "{}", s.log());
    let took = sent.elapsed();
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(8),
        "kept trying for the whole budget, then stopped: {took:?}"
    );
    assert!(registered(&svc, "budget-1"), "left behind");
    let left = s
        .log()
        .lines()
        .find(|l| l.contains("event=\"left_behind\""))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("{}", s.log()));
    assert!(left.contains("instance_id=budget-1"), "{left}");
    assert!(left.contains(&format!("service_id={}", svc.id)), "{left}");
    assert!(proxy.count("DeregisterInstance") > 1, "retried meanwhile");
}

#[test]
fn a_second_signal_skips_the_rest_of_the_drain() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let proxy = Proxy::start();
    let mut s = sidecar(
        &proxy,
        &svc,
        "twice-1",
        &["--drain", "20s", "--reassert-interval", "0"],
    );
    wait_registered(&svc, "twice-1", &s);
    let sent = Instant::now();
    s.signal("TERM");
    wait_for(&s, "the drain", || s.log().contains("event=\"draining\""));
    assert!(
        instances(&svc.id).is_empty(),
        "deregistered before the drain"
    );
    s.signal("TERM");
    assert_eq!(s.wait(LONG), 0, "{}", s.log());
    assert!(sent.elapsed() < Duration::from_secs(10), "drain cut short");
}

#[test]
fn a_second_signal_during_a_slow_deregistration_means_no_drain_afterwards() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let proxy = Proxy::start();
    proxy.inject(
        "DeregisterInstance",
        Fault::Delay(Duration::from_secs(2)),
        1,
    );
    let mut s = sidecar(
        &proxy,
        &svc,
        "twice-2",
        &["--drain", "20s", "--reassert-interval", "0"],
    );
    wait_registered(&svc, "twice-2", &s);
    let sent = Instant::now();
    s.signal("TERM");
    wait_for(&s, "deregistration under way", || {
        proxy.count("DeregisterInstance") == 1
    });
    s.signal("TERM");
    assert_eq!(s.wait(LONG), 0, "{}", s.log());
    assert!(sent.elapsed() < Duration::from_secs(10), "no 20 s drain");
    assert!(instances(&svc.id).is_empty(), "deregistered all the same");
    assert!(!s.log().contains("event=\"draining\""), "{}", s.log());
}

#[test]
fn sigquit_exits_at_once_and_leaves_the_instance_registered() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let proxy = Proxy::start();
    let mut s = sidecar(
        &proxy,
        &svc,
        "quit-1",
        &["--drain", "20s", "--reassert-interval", "0"],
    );
    wait_registered(&svc, "quit-1", &s);
    s.signal("QUIT");
    assert_eq!(s.wait(Duration::from_secs(5)), 3, "{}", s.log());
    assert!(registered(&svc, "quit-1"), "left behind, as documented");
    assert_eq!(proxy.count("DeregisterInstance"), 0);
    let log = s.log();
    assert!(log.contains("event=\"left_behind\""), "{log}");
    assert!(log.contains("instance_id=quit-1"), "{log}");
}

#[test]
fn a_third_signal_exits_at_once_while_deregistration_is_still_failing() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let proxy = Proxy::start();
    proxy.always("DeregisterInstance", Fault::Throttle);
    let mut s = sidecar(
        &proxy,
        &svc,
        "third-1",
        &["--drain", "5s", "--reassert-interval", "0"],
    );
    wait_registered(&svc, "third-1", &s);
    let sent = Instant::now();
    s.signal("TERM");
    wait_for(&s, "deregistration failing", || {
        proxy.count("DeregisterInstance") >= 1
    });
    s.signal("TERM");
    s.signal("TERM");
    assert_eq!(s.wait(LONG), 3, "{}", s.log());
    assert!(
        sent.elapsed() < Duration::from_secs(10),
        "not the 25 s budget"
    );
    assert!(registered(&svc, "third-1"), "left behind");
    assert!(s.log().contains("event=\"left_behind\""), "{}", s.log());
}

#[test]
fn a_stop_during_start_up_exits_0_with_nothing_registered() {
    for signal in ["TERM", "QUIT"] {
        let svc = fresh_service(ServiceSpec::http_custom_health());
        let proxy = Proxy::start();
        proxy.always("GetService", Fault::Throttle);
        let mut s = sidecar(&proxy, &svc, "early-1", &[]);
        wait_for(&s, "start-up retrying", || proxy.count("GetService") >= 2);
        s.signal(signal);
        assert_eq!(s.wait(Duration::from_secs(5)), 0, "{signal}: {}", s.log());
        assert!(s.log().contains("nothing was registered"), "{}", s.log());
        assert_eq!(proxy.count("RegisterInstance"), 0);
        assert!(instances(&svc.id).is_empty());
    }
}

#[test]
fn a_stop_while_registering_deregisters_once_registration_completes() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let proxy = Proxy::start();
    proxy.inject("RegisterInstance", Fault::Delay(Duration::from_secs(2)), 1);
    let mut s = sidecar(
        &proxy,
        &svc,
        "racing-1",
        &["--drain", "2s", "--reassert-interval", "0"],
    );
    wait_for(&s, "registration sent", || {
        proxy.count("RegisterInstance") == 1
    });
    s.signal("TERM");
    assert_eq!(s.wait(LONG), 0, "{}", s.log());
    assert!(instances(&svc.id).is_empty(), "not left behind");
    let calls = proxy.calls();
    let reg = calls
        .iter()
        .rposition(|c| c.op == "RegisterInstance")
        .unwrap();
    let dereg = calls
        .iter()
        .position(|c| c.op == "DeregisterInstance")
        .unwrap();
    assert!(reg < dereg, "deregistered after registering");
    assert!(
        calls[dereg].at.elapsed() >= Duration::from_secs(2),
        "then drained: it was visible, clients may hold it"
    );
}

/// An application whose health endpoint can stop listening altogether (connection refused).
struct MortalApp {
    port: u16,
    dead: Arc<AtomicBool>,
    probes: Arc<AtomicUsize>,
}

impl MortalApp {
    fn start() -> MortalApp {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let dead = Arc::new(AtomicBool::new(false));
        let probes = Arc::new(AtomicUsize::new(0));
        let (d, p) = (dead.clone(), probes.clone());
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                if d.load(Ordering::SeqCst) {
                    // Dropping the listener: from now on connections are refused.
                    return;
                }
                p.fetch_add(1, Ordering::SeqCst);
                use std::io::{BufRead, BufReader, Write};
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                        break;
                    }
                }
                let mut stream = stream;
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
            }
        });
        MortalApp { port, dead, probes }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/health", self.port)
    }

    fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag and closes the listener.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        wait_until(LONG, "health endpoint closed", || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err()
        });
    }
}

#[test]
fn an_application_already_dead_at_sigterm_gets_no_drain() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let proxy = Proxy::start();
    let app = MortalApp::start();
    let url = app.url();
    // The periodic probe would not notice for an hour: the probe at SIGTERM does.
    let mut s = sidecar(
        &proxy,
        &svc,
        "dead-1",
        &[
            "--health-url",
            &url,
            "--health-interval",
            "1h",
            "--drain",
            "20s",
            "--reassert-interval",
            "0",
        ],
    );
    wait_registered(&svc, "dead-1", &s);
    assert!(app.probes.load(Ordering::SeqCst) >= 1);
    app.kill();
    let sent = Instant::now();
    s.signal("TERM");
    assert_eq!(s.wait(LONG), 0, "{}", s.log());
    assert!(
        sent.elapsed() < Duration::from_secs(10),
        "no 20 s drain: {:?}",
        sent.elapsed()
    );
    assert!(instances(&svc.id).is_empty(), "deregistered at once");
    assert!(s.log().contains("no drain"), "{}", s.log());
}

#[test]
fn an_application_failing_its_probe_at_sigterm_gets_no_drain() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let proxy = Proxy::start();
    let app = App::start(true);
    let mut s = sidecar(
        &proxy,
        &svc,
        "dead-2",
        &[
            "--health-url",
            &app.health_url(),
            "--health-interval",
            "1h",
            "--drain",
            "20s",
            "--reassert-interval",
            "0",
        ],
    );
    wait_registered(&svc, "dead-2", &s);
    app.set_healthy(false);
    let sent = Instant::now();
    s.signal("TERM");
    assert_eq!(s.wait(LONG), 0, "{}", s.log());
    assert!(sent.elapsed() < Duration::from_secs(10), "no drain");
    assert!(instances(&svc.id).is_empty());
}

#[test]
fn unhealthy_first_marks_unhealthy_drains_then_deregisters() {
    let svc = fresh_service(ServiceSpec {
        custom_health: true,
        records: vec![(RecordType::A, 5)],
    });
    let proxy = Proxy::start();
    let mut s = sidecar(
        &proxy,
        &svc,
        "unhealthy-first-1",
        &[
            "--drain-mode",
            "unhealthy-first",
            "--drain",
            "5s",
            "--reassert-interval",
            "0",
        ],
    );
    wait_registered(&svc, "unhealthy-first-1", &s);
    let sent = Instant::now();
    s.signal("TERM");
    wait_for(&s, "marked UNHEALTHY while still registered", || {
        health(&svc.id, "unhealthy-first-1").as_deref() == Some("UNHEALTHY")
    });
    assert!(
        registered(&svc, "unhealthy-first-1"),
        "not yet deregistered"
    );
    wait_for(&s, "deregistered", || instances(&svc.id).is_empty());
    let gone = sent.elapsed();
    assert_eq!(s.wait(LONG), 0, "{}", s.log());
    assert!(gone >= Duration::from_secs(5), "after the drain: {gone:?}");
    let calls = proxy.calls();
    let mark = calls
        .iter()
        .position(|c| c.op == "UpdateInstanceCustomHealthStatus" && c.body["Status"] == "UNHEALTHY")
        .unwrap();
    let dereg = calls
        .iter()
        .position(|c| c.op == "DeregisterInstance")
        .unwrap();
    assert!(mark < dereg);
    assert!(
        calls[dereg].at.duration_since(calls[mark].at) >= Duration::from_secs(5),
        "the drain sits between the mark and the deregistration"
    );
}

#[test]
fn unhealthy_first_in_a_service_without_custom_health_exits_2() {
    let svc = fresh_service(ServiceSpec {
        custom_health: false,
        records: vec![],
    });
    let mut cmd = sidecar_command(&moto_url());
    cmd.args(["--service-id", &svc.id, "--ip", IP, "--instance-id", "x"])
        .args(["--drain-mode", "unhealthy-first"]);
    let (code, log) = run_to_exit(cmd, LONG);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("--drain-mode unhealthy-first"), "{log}");
    assert!(instances(&svc.id).is_empty());
}

#[test]
fn a_stop_during_the_start_jitter_ends_it_at_once() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let proxy = Proxy::start();
    let mut s = sidecar(&proxy, &svc, "jitter-1", &["--start-jitter", "1h"]);
    wait_for(&s, "the jitter", || {
        s.log().contains("event=\"start_jitter\"")
    });
    let delay_ms: u64 = s
        .log()
        .split("delay_ms=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    let sent = Instant::now();
    s.signal("TERM");
    assert_eq!(s.wait(Duration::from_secs(5)), 0, "{}", s.log());
    assert!(sent.elapsed() < Duration::from_secs(5));
    if delay_ms > 10_000 {
        assert_eq!(
            proxy.calls().len(),
            0,
            "no Cloud Map call before the jitter ended"
        );
    }
    assert!(instances(&svc.id).is_empty());
}

#[test]
fn reassert_registers_a_removed_instance_again_and_pushes_its_health() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let proxy = Proxy::start();
    let mut s = sidecar(
        &proxy,
        &svc,
        "reassert-1",
        &["--drain", "0", "--reassert-interval", "1s"],
    );
    wait_registered(&svc, "reassert-1", &s);
    wait_for(&s, "first re-assert", || proxy.count("GetInstance") >= 1);
    assert_eq!(proxy.count("RegisterInstance"), 1, "intact: left alone");
    block_on(
        cloudmap()
            .deregister_instance()
            .service_id(&svc.id)
            .instance_id("reassert-1")
            .send(),
    )
    .unwrap();
    assert!(!registered(&svc, "reassert-1"));
    wait_registered(&svc, "reassert-1", &s);
    wait_for(&s, "health pushed again", || {
        proxy.count("UpdateInstanceCustomHealthStatus") >= 2
    });
    let bodies = proxy.bodies("RegisterInstance");
    assert_eq!(bodies.len(), 2);
    assert_eq!(
        bodies[0]["Attributes"], bodies[1]["Attributes"],
        "the full set again"
    );
    assert!(s.log().contains("event=\"reasserting\""), "{}", s.log());
    s.signal("TERM");
    assert_eq!(s.wait(LONG), 0, "{}", s.log());
    assert!(instances(&svc.id).is_empty());
}

#[test]
fn a_restart_with_the_same_instance_id_sends_the_full_set_then_the_health_again() {
    // The previous run of this container (same task, same ID) left the instance behind with an
    // attribute this run no longer sets. Real Cloud Map upserts: the new full set replaces the old
    // one. moto appends a second record instead, so the upsert itself is tested with a fake that
    // behaves like Cloud Map (src/lifecycle/tests.rs); here we assert what was sent.
    let svc = fresh_service(ServiceSpec::http_custom_health());
    block_on(
        cloudmap()
            .register_instance()
            .service_id(&svc.id)
            .instance_id("restart-1")
            .attributes("AWS_INSTANCE_IPV4", "10.9.9.9")
            .attributes("VERSION", "1")
            .send(),
    )
    .unwrap();
    let proxy = Proxy::start();
    let app = App::start(true);
    let mut s = sidecar(
        &proxy,
        &svc,
        "restart-1",
        &[
            "--attribute",
            "TIER=ap",
            "--health-url",
            &app.health_url(),
            "--drain",
            "0",
            "--reassert-interval",
            "0",
        ],
    );
    wait_for(&s, "health pushed after the upsert", || {
        proxy.count("UpdateInstanceCustomHealthStatus") >= 1
    });
    let calls = proxy.calls();
    let ops: Vec<&str> = calls.iter().map(|c| c.op.as_str()).collect();
    assert_eq!(
        ops,
        [
            "GetService",
            "RegisterInstance",
            "GetOperation",
            "UpdateInstanceCustomHealthStatus"
        ]
    );
    let reg = &calls[1].body;
    assert_eq!(reg["InstanceId"], "restart-1");
    let attrs = reg["Attributes"].as_object().unwrap();
    assert_eq!(attrs["AWS_INSTANCE_IPV4"], IP);
    assert_eq!(attrs["TIER"], "ap");
    assert_eq!(attrs["AWS_INIT_HEALTH_STATUS"], "HEALTHY");
    assert_eq!(attrs["REGION"], REGION);
    assert!(!attrs.contains_key("VERSION"), "the full set is ours alone");
    assert_eq!(calls[3].body["InstanceId"], "restart-1");
    assert_eq!(calls[3].body["Status"], "HEALTHY");
    s.signal("TERM");
    assert_eq!(s.wait(LONG), 0, "{}", s.log());
    assert_eq!(proxy.count("DeregisterInstance"), 1);
}

#[test]
fn in_steady_state_the_only_cloud_map_calls_are_the_reasserts() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let proxy = Proxy::start();
    let app = App::start(true);
    let mut s = sidecar(
        &proxy,
        &svc,
        "steady-1",
        &[
            "--health-url",
            &app.health_url(),
            "--health-interval",
            "100ms",
            "--reassert-interval",
            "1s",
            "--drain",
            "0",
        ],
    );
    wait_for(&s, "started", || {
        proxy.count("UpdateInstanceCustomHealthStatus") >= 1
    });
    let before = proxy.counts();
    let probes_before = app.server.requests().len();
    thread::sleep(Duration::from_millis(3_500));
    let after = proxy.counts();
    let probes = app.server.requests().len() - probes_before;
    assert!(probes >= 10, "the health loop ran: {probes} probes");
    for (op, n) in &after {
        let grew = n - before.get(op).copied().unwrap_or(0);
        if op == "GetInstance" {
            assert!((2..=4).contains(&grew), "one re-assert a second: {grew}");
        } else {
            assert_eq!(grew, 0, "{op} called in steady state: {after:?}");
        }
    }
    s.signal("TERM");
    assert_eq!(s.wait(LONG), 0, "{}", s.log());
    assert!(instances(&svc.id).is_empty());
}

#[test]
fn fifty_sidecars_behind_a_20_calls_per_second_limit_all_register_and_deregister() {
    let svc = fresh_service(ServiceSpec {
        custom_health: false,
        records: vec![],
    });
    let proxy = Proxy::start();
    proxy.rate_limit(20);
    let mut fleet: Vec<(String, Sidecar)> = (0..50)
        .map(|i| {
            let id = format!("fleet-{i:02}");
            let mut cmd = sidecar_command(&proxy.url());
            cmd.args(["--service-id", &svc.id, "--instance-id", &id])
                .args(["--ip", &format!("10.4.0.{}", i + 1)])
                .args(["--drain", "1s", "--stop-timeout", "60s"])
                .args(["--reassert-interval", "0", "--log-level", "warn"]);
            (id, Sidecar::spawn(cmd))
        })
        .collect();
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let n = instances(&svc.id).len();
        if n == 50 {
            break;
        }
        if Instant::now() > end {
            let there = instances(&svc.id);
            let missing: Vec<String> = fleet
                .iter()
                .filter(|(id, _)| !there.contains_key(id))
                .take(3)
                .map(|(id, s)| format!("{id}:\n{}", s.log()))
                .collect();
            panic!(
                "{n} of 50 registered; some missing:\n{}",
                missing.join("\n")
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
    assert!(
        proxy.calls().iter().any(|c| c.outcome == "throttled"),
        "the limit was actually hit"
    );
    for (_, s) in &fleet {
        s.signal("TERM");
    }
    for (id, s) in &mut fleet {
        assert_eq!(s.wait(Duration::from_secs(120)), 0, "{id}: {}", s.log());
    }
    assert!(instances(&svc.id).is_empty(), "all deregistered");
}

#[test]
fn after_sigterm_the_instance_is_gone_before_exit_and_exit_waits_for_the_drain() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let proxy = Proxy::start();
    let mut s = sidecar(
        &proxy,
        &svc,
        "drain-2",
        &["--drain", "3s", "--reassert-interval", "0"],
    );
    wait_registered(&svc, "drain-2", &s);
    let sent = Instant::now();
    s.signal("TERM");
    wait_for(&s, "deregistered", || instances(&svc.id).is_empty());
    let gone = sent.elapsed();
    assert_eq!(s.wait(LONG), 0, "{}", s.log());
    let exited = sent.elapsed();
    assert!(gone < exited, "gone ({gone:?}) before exit ({exited:?})");
    assert!(
        exited >= Duration::from_secs(3),
        "kept serving for the drain: {exited:?}"
    );
    let dereg = proxy
        .calls()
        .into_iter()
        .find(|c| c.op == "DeregisterInstance")
        .unwrap();
    assert!(
        dereg.at.elapsed() >= Duration::from_secs(3),
        "the drain came after the deregistration"
    );
}

#[test]
fn get_operation_denied_after_an_accepted_registration_is_cleaned_up() {
    // The role may call RegisterInstance but not GetOperation: the registration took effect, yet
    // the sidecar cannot confirm it. It must not exit claiming nothing is registered while the
    // instance is there: it deregisters, and as it cannot confirm that either, it exits 3 with the
    // instance named in the log.
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let proxy = Proxy::start();
    proxy.always("GetOperation", Fault::Error(400, "AccessDeniedException"));
    let mut cmd = sidecar_command(&proxy.url());
    cmd.args([
        "--service-id",
        &svc.id,
        "--ip",
        IP,
        "--instance-id",
        "blind-1",
    ]);
    let (code, log) = run_to_exit(cmd, LONG);
    assert_eq!(code, 3, "{log}");
    assert!(log.contains("servicediscovery:GetOperation"), "{log}");
    assert!(log.contains("event=\"left_behind\""), "{log}");
    assert_eq!(proxy.count("DeregisterInstance"), 1, "cleanup attempted");
    assert!(instances(&svc.id).is_empty(), "not orphaned");
}
