//! `cloudmap-sidecar run` through the real binary against the moto server: the main job end to end.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;

const FARGATE_TASK: &str = "ecs-v4/docs-2020-fargate-pv14-task.json";
const FARGATE_TASK_ID: &str = "febee046097849aba589d4435207c04a";
const LONG: Duration = Duration::from_secs(30);

fn fargate_metadata(fail_first: usize) -> HttpFake {
    ecs_metadata(
        read_data(FARGATE_TASK),
        SIDECAR_CONTAINER.to_string(),
        fail_first,
    )
}

#[test]
fn registers_the_task_address_and_attributes_then_deregisters_on_sigterm() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let meta = fargate_metadata(0);
    let mut cmd = sidecar_command(&moto_url());
    cmd.env(
        "ECS_CONTAINER_METADATA_URI_V4",
        format!("{}/v4/test", meta.url()),
    )
    .args([
        "--service-id",
        &svc.id,
        "--port",
        "8080",
        "--attribute",
        "TIER=ap",
    ])
    .args(["--attribute", "VERSION=1.2.3", "--drain", "0"]);
    let mut sidecar = Sidecar::spawn(cmd);

    wait_until(LONG, "instance registered", || {
        !instances(&svc.id).is_empty()
    });
    let all = instances(&svc.id);
    let attrs = all
        .get(FARGATE_TASK_ID)
        .unwrap_or_else(|| panic!("task ID as instance ID: {all:?}"));
    let get = |k: &str| attrs.get(k).map(String::as_str);
    assert_eq!(get("AWS_INSTANCE_IPV4"), Some("10.0.0.108"));
    assert_eq!(get("AWS_INSTANCE_PORT"), Some("8080"));
    assert_eq!(get("AVAILABILITY_ZONE"), Some("us-west-2c"));
    assert_eq!(
        get("REGION"),
        Some("us-west-2"),
        "the task's region, from its ARN"
    );
    assert_eq!(get("ECS_CLUSTER_NAME"), Some("default"));
    assert_eq!(get("ECS_TASK_DEFINITION_FAMILY"), Some("query-metadata"));
    assert_eq!(get("TIER"), Some("ap"));
    assert_eq!(get("VERSION"), Some("1.2.3"));
    assert_eq!(get("AWS_INIT_HEALTH_STATUS"), Some("HEALTHY"));
    assert!(
        !attrs.values().any(String::is_empty),
        "no empty attribute: {attrs:?}"
    );
    assert_eq!(health(&svc.id, FARGATE_TASK_ID).as_deref(), Some("HEALTHY"));

    sidecar.signal("TERM");
    assert_eq!(sidecar.wait(LONG), 0, "{}", sidecar.log());
    assert!(instances(&svc.id).is_empty(), "deregistered");
    let log = sidecar.log();
    assert!(log.contains("event=\"deregistered\""), "{log}");
    // The metadata endpoint was read once at start-up: the container and the task.
    assert_eq!(meta.count("GET", "/v4/test"), 1);
    assert_eq!(meta.count("GET", "/v4/test/task"), 1);
}

#[test]
fn finds_the_service_by_namespace_and_service_name() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    // A second namespace with a service of the same name must not be picked.
    let _decoy = fresh_service(ServiceSpec::http_custom_health());
    let mut cmd = sidecar_command(&moto_url());
    cmd.args(["--namespace", &svc.namespace, "--service", &svc.name])
        .args([
            "--ip",
            "10.9.8.7",
            "--instance-id",
            "by-name-1",
            "--drain",
            "0",
        ]);
    let mut sidecar = Sidecar::spawn(cmd);
    wait_until(LONG, "instance registered by name", || {
        instances(&svc.id).contains_key("by-name-1")
    });
    assert!(instances(&_decoy.id).is_empty());
    sidecar.signal("INT");
    assert_eq!(sidecar.wait(LONG), 0, "{}", sidecar.log());
    assert!(instances(&svc.id).is_empty());
}

#[test]
fn a_health_flip_reaches_cloud_map() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let app = App::start(true);
    let mut cmd = sidecar_command(&moto_url());
    cmd.args([
        "--service-id",
        &svc.id,
        "--ip",
        "10.1.1.1",
        "--instance-id",
        "flip-1",
    ])
    .args([
        "--health-url",
        &app.health_url(),
        "--health-interval",
        "200ms",
    ])
    .args([
        "--unhealthy-threshold",
        "2",
        "--healthy-threshold",
        "2",
        "--drain",
        "0",
    ]);
    let mut sidecar = Sidecar::spawn(cmd);
    wait_until(LONG, "registered healthy", || {
        health(&svc.id, "flip-1").as_deref() == Some("HEALTHY")
    });

    app.set_healthy(false);
    wait_until(LONG, "UNHEALTHY in Cloud Map", || {
        health(&svc.id, "flip-1").as_deref() == Some("UNHEALTHY")
    });
    app.set_healthy(true);
    wait_until(LONG, "HEALTHY again in Cloud Map", || {
        health(&svc.id, "flip-1").as_deref() == Some("HEALTHY")
    });
    sidecar.signal("TERM");
    assert_eq!(sidecar.wait(LONG), 0, "{}", sidecar.log());
    let log = sidecar.log();
    assert_eq!(
        log.matches("event=\"health_reported\"").count(),
        2,
        "one update per change:\n{log}"
    );
}

#[test]
fn an_application_failing_at_start_is_registered_unhealthy_in_a_custom_health_service() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let app = App::start(false);
    let mut cmd = sidecar_command(&moto_url());
    cmd.args([
        "--service-id",
        &svc.id,
        "--ip",
        "10.1.1.2",
        "--instance-id",
        "cold-1",
    ])
    .args([
        "--health-url",
        &app.health_url(),
        "--health-interval",
        "200ms",
        "--drain",
        "0",
    ]);
    let mut sidecar = Sidecar::spawn(cmd);
    wait_until(LONG, "registered", || {
        instances(&svc.id).contains_key("cold-1")
    });
    assert_eq!(
        instances(&svc.id)["cold-1"]
            .get("AWS_INIT_HEALTH_STATUS")
            .map(String::as_str),
        Some("UNHEALTHY")
    );
    app.set_healthy(true);
    wait_until(LONG, "HEALTHY after the first passing probe", || {
        health(&svc.id, "cold-1").as_deref() == Some("HEALTHY")
    });
    sidecar.signal("TERM");
    assert_eq!(sidecar.wait(LONG), 0, "{}", sidecar.log());
}

#[test]
fn metadata_unavailable_at_first_then_registered() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let meta = fargate_metadata(3);
    let mut cmd = sidecar_command(&moto_url());
    cmd.env(
        "ECS_CONTAINER_METADATA_URI_V4",
        format!("{}/v4/test", meta.url()),
    )
    .args(["--service-id", &svc.id, "--port", "8080", "--drain", "0"]);
    let mut sidecar = Sidecar::spawn(cmd);
    wait_until(LONG, "registered after retries", || {
        instances(&svc.id).contains_key(FARGATE_TASK_ID)
    });
    assert!(
        meta.requests().len() >= 5,
        "3 failures, then the container and the task"
    );
    assert!(
        sidecar.log().contains("address not available yet"),
        "{}",
        sidecar.log()
    );
    sidecar.signal("TERM");
    assert_eq!(sidecar.wait(LONG), 0);
}

#[test]
fn metadata_endpoint_not_listening_yet_then_registered() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    // Reserve a port, start nothing on it yet: connections are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = sidecar_command(&moto_url());
    cmd.env(
        "ECS_CONTAINER_METADATA_URI_V4",
        format!("http://127.0.0.1:{port}/v4/test"),
    )
    .args(["--service-id", &svc.id, "--port", "8080", "--drain", "0"]);
    let mut sidecar = Sidecar::spawn(cmd);
    sidecar.wait_for_log(LONG, "address not available yet");
    let task = read_data(FARGATE_TASK);
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("port still free");
    std::thread::spawn(move || {
        use std::io::{BufRead, BufReader, Write};
        for mut stream in listener.incoming().flatten() {
            let mut line = String::new();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            reader.read_line(&mut line).unwrap();
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap() == 0 || h.trim().is_empty() {
                    break;
                }
            }
            let body = if line.contains("/task ") {
                task.clone()
            } else {
                SIDECAR_CONTAINER.to_string()
            };
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    wait_until(LONG, "registered once the endpoint listens", || {
        instances(&svc.id).contains_key(FARGATE_TASK_ID)
    });
    sidecar.signal("TERM");
    assert_eq!(sidecar.wait(LONG), 0);
}

#[test]
fn sigterm_during_start_up_retries_leaves_nothing_registered() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let meta = fargate_metadata(usize::MAX);
    let mut cmd = sidecar_command(&moto_url());
    cmd.env(
        "ECS_CONTAINER_METADATA_URI_V4",
        format!("{}/v4/test", meta.url()),
    )
    .args(["--service-id", &svc.id, "--port", "8080"]);
    let mut sidecar = Sidecar::spawn(cmd);
    sidecar.wait_for_log(LONG, "address not available yet");
    sidecar.signal("TERM");
    assert_eq!(sidecar.wait(Duration::from_secs(5)), 0, "{}", sidecar.log());
    assert!(sidecar.log().contains("nothing was registered"));
    assert!(instances(&svc.id).is_empty());
}

#[test]
fn configuration_errors_exit_2_naming_flag_variable_and_value() {
    let mut cmd = sidecar_command(&moto_url());
    cmd.args(["--service-id", "not-a-service", "--health-interval", "soon"])
        .env("CLOUDMAP_PORT", "70000");
    let (code, log) = run_to_exit(cmd, LONG);
    assert_eq!(code, 2, "{log}");
    assert!(
        log.contains("--service-id (CLOUDMAP_SERVICE_ID) = \"not-a-service\""),
        "{log}"
    );
    assert!(
        log.contains("--health-interval (CLOUDMAP_HEALTH_INTERVAL) = \"soon\""),
        "{log}"
    );
    assert!(log.contains("--port (CLOUDMAP_PORT) = \"70000\""), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn an_unknown_service_exits_2_before_registering_anything() {
    let mut cmd = sidecar_command(&moto_url());
    cmd.args([
        "--service-id",
        "srv-doesnotexist",
        "--ip",
        "10.0.0.1",
        "--instance-id",
        "x",
    ]);
    let (code, log) = run_to_exit(cmd, LONG);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("service srv-doesnotexist not found"), "{log}");

    let svc = fresh_service(ServiceSpec::http_custom_health());
    let mut cmd = sidecar_command(&moto_url());
    cmd.args(["--namespace", &svc.namespace, "--service", "nope"])
        .args(["--ip", "10.0.0.1", "--instance-id", "x"]);
    let (code, log) = run_to_exit(cmd, LONG);
    assert_eq!(code, 2, "{log}");
    assert!(
        log.contains("service \"nope\" not found in namespace"),
        "{log}"
    );
}

#[test]
fn no_region_is_a_configuration_error() {
    let mut cmd = sidecar_command(&moto_url());
    cmd.env_remove("AWS_REGION").args([
        "--service-id",
        "srv-abc",
        "--ip",
        "10.0.0.1",
        "--instance-id",
        "x",
    ]);
    let (code, log) = run_to_exit(cmd, LONG);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("AWS_REGION"), "{log}");
}

#[test]
fn the_drain_defaults_to_the_dns_ttl_and_happens_after_deregistration() {
    use aws_sdk_servicediscovery::types::RecordType;
    let svc = fresh_service(ServiceSpec {
        custom_health: true,
        records: vec![(RecordType::A, 2)],
    });
    let mut cmd = sidecar_command(&moto_url());
    cmd.args([
        "--service-id",
        &svc.id,
        "--ip",
        "10.2.2.2",
        "--instance-id",
        "drain-1",
    ]);
    let mut sidecar = Sidecar::spawn(cmd);
    wait_until(LONG, "registered", || {
        instances(&svc.id).contains_key("drain-1")
    });
    let sent = std::time::Instant::now();
    sidecar.signal("TERM");
    wait_until(LONG, "deregistered", || instances(&svc.id).is_empty());
    let gone = sent.elapsed();
    assert_eq!(sidecar.wait(LONG), 0, "{}", sidecar.log());
    let exited = sent.elapsed();
    assert!(
        exited >= Duration::from_secs(2),
        "kept serving for the 2 s TTL: {exited:?}\n{}",
        sidecar.log()
    );
    assert!(
        gone < exited,
        "gone from Cloud Map ({gone:?}) before exit ({exited:?})"
    );
}
