//! The one-shot commands (`register`, `deregister`, `health`, `discover`) and `healthcheck`
//! through the real binary against the moto server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use aws_sdk_servicediscovery::types::CustomHealthStatus;
use common::*;

const LONG: Duration = Duration::from_secs(30);

/// What a command printed and how it ended.
struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Run to completion with stdout and stderr apart; panics after `LONG`.
fn run(mut cmd: Command) -> Outcome {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the binary");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).unwrap();
        s
    });
    let err = thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).unwrap();
        s
    });
    let end = Instant::now() + LONG;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("command did not exit within {LONG:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Outcome {
        code: status.code().unwrap_or(-1),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn cmd(args: &[&str]) -> Command {
    let mut c = sidecar_command(&moto_url());
    c.args(args);
    c
}

fn register(svc: &TestService, id: &str, ip: &str) -> Outcome {
    run(cmd(&[
        "register",
        "--service-id",
        &svc.id,
        "--instance-id",
        id,
        "--ip",
        ip,
        "--port",
        "8080",
        "--attribute",
        "TIER=ap",
    ]))
}

#[test]
fn register_prints_the_instance_id_and_leaves_it_registered_until_deregister() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let o = register(&svc, "one-1", "10.3.0.1");
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stdout, "one-1\n", "only the ID on stdout");
    assert!(o.stderr.contains("event=\"registered\""), "{}", o.stderr);
    let all = instances(&svc.id);
    let attrs = &all["one-1"];
    assert_eq!(
        attrs.get("AWS_INSTANCE_IPV4").map(String::as_str),
        Some("10.3.0.1")
    );
    assert_eq!(
        attrs.get("AWS_INSTANCE_PORT").map(String::as_str),
        Some("8080")
    );
    assert_eq!(attrs.get("TIER").map(String::as_str), Some("ap"));
    assert_eq!(health(&svc.id, "one-1").as_deref(), Some("HEALTHY"));

    let o = run(cmd(&[
        "deregister",
        "--service-id",
        &svc.id,
        "--instance-id",
        "one-1",
    ]));
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(instances(&svc.id).is_empty());
    assert!(o.stderr.contains("event=\"deregistered\""), "{}", o.stderr);
}

#[test]
fn register_in_ecs_uses_the_task_id_and_address_like_run() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let meta = ecs_metadata(
        read_data("ecs-v4/docs-2020-fargate-pv14-task.json"),
        SIDECAR_CONTAINER.to_string(),
        0,
    );
    let mut c = cmd(&["register", "--service-id", &svc.id, "--port", "8080"]);
    c.env(
        "ECS_CONTAINER_METADATA_URI_V4",
        format!("{}/v4/test", meta.url()),
    );
    let o = run(c);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stdout.trim(), "febee046097849aba589d4435207c04a");
    assert_eq!(
        instances(&svc.id)["febee046097849aba589d4435207c04a"]
            .get("AWS_INSTANCE_IPV4")
            .map(String::as_str),
        Some("10.0.0.108")
    );
    // Without --instance-id, deregister finds the same task ID in the metadata.
    let mut c = cmd(&["deregister", "--service-id", &svc.id]);
    c.env(
        "ECS_CONTAINER_METADATA_URI_V4",
        format!("{}/v4/test", meta.url()),
    );
    let o = run(c);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(instances(&svc.id).is_empty());
}

/// Cloud Map: DeregisterInstance of an unknown instance answers InstanceNotFound, which means
/// the wanted end state already holds.
#[test]
fn deregistering_an_unknown_instance_succeeds() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let o = run(cmd(&[
        "deregister",
        "--service-id",
        &svc.id,
        "--instance-id",
        "never-registered",
    ]));
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("already deregistered"), "{}", o.stderr);
}

#[test]
fn health_sets_the_custom_status_both_ways() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    assert_eq!(register(&svc, "h-1", "10.3.0.2").code, 0);
    let args = |status: &'static str| {
        cmd(&[
            "health",
            status,
            "--service-id",
            &svc.id,
            "--instance-id",
            "h-1",
        ])
    };
    let o = run(args("UNHEALTHY"));
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(health(&svc.id, "h-1").as_deref(), Some("UNHEALTHY"));
    let o = run(args("healthy"));
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(health(&svc.id, "h-1").as_deref(), Some("HEALTHY"));
}

#[test]
fn health_in_a_service_without_custom_health_is_a_configuration_error() {
    let svc = fresh_service(ServiceSpec {
        custom_health: false,
        records: vec![],
    });
    let o = run(cmd(&[
        "health",
        "UNHEALTHY",
        "--service-id",
        &svc.id,
        "--instance-id",
        "x-1",
    ]));
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("no custom health check"), "{}", o.stderr);
}

#[test]
fn health_of_an_unregistered_instance_exits_1() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let o = run(cmd(&[
        "health",
        "HEALTHY",
        "--service-id",
        &svc.id,
        "--instance-id",
        "ghost",
    ]));
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stderr.contains("ghost is not registered"), "{}", o.stderr);
}

#[test]
fn one_shot_configuration_errors_exit_2_before_anything_is_registered() {
    let o = run(cmd(&[
        "register",
        "--service-id",
        "srv-doesnotexist",
        "--ip",
        "10.0.0.1",
        "--instance-id",
        "x",
    ]));
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(
        o.stderr.contains("srv-doesnotexist not found"),
        "{}",
        o.stderr
    );

    let o = run(cmd(&[
        "discover",
        "--service-id",
        "srv-a",
        "--health",
        "MOSTLY",
    ]));
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(
        o.stderr.contains("--health (CLOUDMAP_HEALTH) = \"MOSTLY\""),
        "{}",
        o.stderr
    );
    let o = run(cmd(&["health", "SICK", "--service-id", "srv-a"]));
    assert_eq!(o.code, 2, "clap usage error: {}", o.stderr);
}

#[test]
fn sigterm_while_register_waits_for_metadata_exits_1_with_nothing_registered() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let meta = ecs_metadata(
        read_data("ecs-v4/docs-2020-fargate-pv14-task.json"),
        SIDECAR_CONTAINER.to_string(),
        usize::MAX,
    );
    let mut c = cmd(&["register", "--service-id", &svc.id, "--port", "8080"]);
    c.env(
        "ECS_CONTAINER_METADATA_URI_V4",
        format!("{}/v4/test", meta.url()),
    );
    let mut register = Sidecar::spawn(c);
    register.wait_for_log(LONG, "address not available yet");
    register.signal("TERM");
    assert_eq!(
        register.wait(Duration::from_secs(5)),
        1,
        "{}",
        register.log()
    );
    assert!(
        register
            .log()
            .contains("interrupted before anything was registered"),
        "{}",
        register.log()
    );
    assert!(instances(&svc.id).is_empty());
}

fn discover(svc: &TestService, extra: &[&str]) -> Outcome {
    let mut c = cmd(&[
        "discover",
        "--namespace",
        &svc.namespace,
        "--service",
        &svc.name,
        "--discovery-endpoint",
        &moto_url(),
    ]);
    c.args(extra);
    run(c)
}

fn ids(stdout: &str) -> Vec<String> {
    let mut ids: Vec<String> = stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("one JSON object per line");
            v["instance_id"].as_str().unwrap().to_string()
        })
        .collect();
    ids.sort();
    ids
}

#[test]
fn discover_prints_instances_as_json_lines_filtered_by_health() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    assert_eq!(register(&svc, "d-1", "10.3.1.1").code, 0);
    assert_eq!(register(&svc, "d-2", "10.3.1.2").code, 0);
    set_health(&svc.id, "d-2", CustomHealthStatus::Unhealthy);

    let o = discover(&svc, &[]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(ids(&o.stdout), ["d-1"], "healthy only by default");
    let line: serde_json::Value = serde_json::from_str(o.stdout.lines().next().unwrap()).unwrap();
    assert_eq!(line["namespace"], svc.namespace.as_str());
    assert_eq!(line["service"], "ap");
    assert_eq!(line["health"], "HEALTHY");
    assert_eq!(line["attributes"]["AWS_INSTANCE_IPV4"], "10.3.1.1");
    assert_eq!(line["attributes"]["TIER"], "ap");

    assert_eq!(
        ids(&discover(&svc, &["--health", "ALL"]).stdout),
        ["d-1", "d-2"]
    );
    assert_eq!(
        ids(&discover(&svc, &["--health", "UNHEALTHY"]).stdout),
        ["d-2"]
    );

    // By service ID: the names DiscoverInstances needs are looked up first.
    let mut c = cmd(&["discover", "--service-id", &svc.id, "--health", "ALL"]);
    c.env("CLOUDMAP_DISCOVERY_ENDPOINT", moto_url());
    let o = run(c);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(ids(&o.stdout), ["d-1", "d-2"]);
}

/// The SDK sends DiscoverInstances to `data-` + the endpoint's host; with `--discovery-endpoint`
/// the request must reach exactly the endpoint given (a VPC endpoint has no `data-` twin). The
/// fake answers like Cloud Map's data plane and records the Host header, which is signed.
#[test]
fn discover_sends_to_the_configured_endpoint_without_the_data_prefix() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let body = format!(
        r#"{{"Instances":[{{"InstanceId":"fake-1","NamespaceName":"{}","ServiceName":"ap","HealthStatus":"HEALTHY","Attributes":{{"AWS_INSTANCE_IPV4":"10.9.9.9"}}}}],"InstancesRevision":1}}"#,
        svc.namespace
    );
    let data_plane = HttpFake::start(move |_| {
        Response::new(200, body.clone())
            .header("Content-Type", "application/x-amz-json-1.1")
            .into()
    });
    let mut c = cmd(&[
        "discover",
        "--namespace",
        &svc.namespace,
        "--service",
        "ap",
        "--discovery-endpoint",
        &data_plane.url(),
    ]);
    c.env("CLOUDMAP_HEALTH", "HEALTHY_OR_ELSE_ALL");
    let o = run(c);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(ids(&o.stdout), ["fake-1"]);
    let reqs = data_plane.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    let req = &reqs[0];
    assert_eq!(
        req.header("host"),
        Some(format!("127.0.0.1:{}", data_plane.port).as_str())
    );
    assert_eq!(
        req.header("x-amz-target"),
        Some("Route53AutoNaming_v20170314.DiscoverInstances")
    );
    let sent: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
    assert_eq!(sent["HealthStatus"], "HEALTHY_OR_ELSE_ALL");
    assert_eq!(sent["NamespaceName"], svc.namespace.as_str());
    assert!(
        req.header("authorization")
            .is_some_and(|a| a.contains("SignedHeaders=") && a.contains("host")),
        "signed, host included: {:?}",
        req.header("authorization")
    );
}

/// Without `--discovery-endpoint` the SDK's rule applies: `data-127.0.0.1` does not resolve, and
/// the error says which setting fixes it.
#[test]
fn discover_without_the_setting_names_it_when_the_data_endpoint_fails() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let o = run(cmd(&[
        "discover",
        "--namespace",
        &svc.namespace,
        "--service",
        "ap",
        "--start-timeout",
        "20s",
    ]));
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(
        o.stderr
            .contains("--discovery-endpoint (CLOUDMAP_DISCOVERY_ENDPOINT)"),
        "{}",
        o.stderr
    );
    assert!(o.stdout.is_empty());
}

#[test]
fn healthcheck_passes_only_while_run_has_the_instance_registered() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let dir = std::env::temp_dir().join(unique("cms-hc"));
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("state");
    let state_s = state.to_str().unwrap().to_string();
    let healthcheck = || {
        let mut c = Command::new(bin());
        c.env_clear()
            .args(["healthcheck", "--state-file", &state_s]);
        run(c)
    };
    let o = healthcheck();
    assert_eq!(o.code, 1, "no sidecar yet");
    assert!(
        o.stdout.contains("cannot read the state file"),
        "{}",
        o.stdout
    );

    let mut c = cmd(&[
        "--service-id",
        &svc.id,
        "--instance-id",
        "hc-1",
        "--ip",
        "10.3.2.1",
        "--drain",
        "0",
    ]);
    // The state follows transitions even when the log is quiet.
    c.env("CLOUDMAP_STATE_FILE", &state)
        .env("CLOUDMAP_LOG_LEVEL", "error");
    let mut sidecar = Sidecar::spawn(c);
    wait_until(LONG, "healthcheck passes", || healthcheck().code == 0);
    let o = healthcheck();
    assert!(
        o.stdout.contains("instance hc-1 in service") && o.stdout.contains("HEALTHY"),
        "{}",
        o.stdout
    );
    assert!(instances(&svc.id).contains_key("hc-1"));

    sidecar.signal("TERM");
    assert_eq!(sidecar.wait(LONG), 0, "{}", sidecar.log());
    let o = healthcheck();
    assert_eq!(o.code, 1, "{}", o.stdout);
    assert!(o.stdout.contains("not registered: stopped"), "{}", o.stdout);
    std::fs::remove_dir_all(&dir).unwrap();
}
