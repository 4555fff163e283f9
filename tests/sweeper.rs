//! `cloudmap-sweeper` through the real binary against the moto server, whose ECS and EC2 APIs
//! play the owners. Where moto differs from the real services (it never lists unknown tasks under
//! `failures`), a loopback fake that answers like real ECS stands in, and the test says so.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use aws_sdk_ecs::types::{
    AwsVpcConfiguration, Compatibility, ContainerDefinition, LaunchType, NetworkConfiguration,
    NetworkMode,
};
use common::*;

const LONG: Duration = Duration::from_secs(60);
const MARKER: (&str, &str) = ("REGISTERED_BY", "cloudmap-sidecar");

fn sweeper_bin() -> &'static str {
    env!("CARGO_BIN_EXE_cloudmap-sweeper")
}

/// The sweeper with a clean environment pointing every AWS API at `endpoint`.
fn sweeper_command(endpoint: &str, service_id: &str) -> Command {
    let mut cmd = Command::new(sweeper_bin());
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_REGION", REGION)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .args(["--service-id", service_id]);
    cmd
}

fn sweep(cmd: Command) -> (i32, String) {
    run_to_exit(cmd, LONG)
}

// ---------------------------------------------------------------------------------------------
// Owners in moto

fn ecs() -> aws_sdk_ecs::Client {
    let conf = aws_sdk_ecs::Config::builder()
        .behavior_version(aws_sdk_ecs::config::BehaviorVersion::latest())
        .region(aws_sdk_ecs::config::Region::new(REGION))
        .credentials_provider(aws_sdk_ecs::config::Credentials::new(
            "test", "test", None, None, "tests",
        ))
        .endpoint_url(moto_url())
        .build();
    aws_sdk_ecs::Client::from_conf(conf)
}

/// By default moto moves a task one status on with every DescribeTasks that names it (RUNNING →
/// DEACTIVATING → STOPPING → DEPROVISIONING → STOPPED), so that boto3's waiters end. Real tasks do
/// not stop because someone looked at them: keep them where they are until StopTask.
fn tasks_stay_as_they_are() {
    static ONCE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        block_on(async {
            let resp = reqwest::Client::new()
                .post(format!("{}/moto-api/state-manager/set-transition", moto_url()))
                .body(r#"{"model_name": "ecs::task", "transition": {"progression": "manual", "times": 1000000}}"#)
                .send()
                .await
                .unwrap();
            assert!(resp.status().is_success(), "moto state manager: {}", resp.status());
        });
    });
}

/// A fresh cluster with a Fargate task definition in it.
struct Cluster {
    name: String,
    family: String,
}

impl Cluster {
    fn new() -> Cluster {
        tasks_stay_as_they_are();
        let name = unique("cluster");
        let family = unique("app");
        let c = ecs();
        block_on(async {
            c.create_cluster().cluster_name(&name).send().await.unwrap();
            c.register_task_definition()
                .family(&family)
                .network_mode(NetworkMode::Awsvpc)
                .requires_compatibilities(Compatibility::Fargate)
                .cpu("256")
                .memory("512")
                .container_definitions(
                    ContainerDefinition::builder()
                        .name("app")
                        .image("public.ecr.aws/docker/library/nginx:latest")
                        .memory(256)
                        .build(),
                )
                .send()
                .await
                .unwrap();
        });
        Cluster { name, family }
    }

    /// Run one task; its ARN.
    fn run_task(&self) -> String {
        let c = ecs();
        let (subnet, group) = default_network();
        block_on(async {
            let out = c
                .run_task()
                .cluster(&self.name)
                .task_definition(&self.family)
                .launch_type(LaunchType::Fargate)
                .network_configuration(
                    NetworkConfiguration::builder()
                        .awsvpc_configuration(
                            AwsVpcConfiguration::builder()
                                .subnets(subnet)
                                .security_groups(group)
                                .build()
                                .unwrap(),
                        )
                        .build(),
                )
                .count(1)
                .send()
                .await
                .unwrap();
            out.tasks()[0].task_arn().unwrap().to_string()
        })
    }

    fn stop_task(&self, arn: &str) {
        let c = ecs();
        block_on(async {
            c.stop_task()
                .cluster(&self.name)
                .task(arn)
                .reason("test")
                .send()
                .await
                .unwrap();
        });
    }
}

fn task_id(arn: &str) -> &str {
    arn.rsplit('/').next().unwrap()
}

/// EC2 through its Query API: moto does not check signatures, and the tests need no EC2 SDK.
fn ec2_call(params: &[(&str, &str)]) -> String {
    let mut form: Vec<(&str, &str)> = vec![("Version", "2016-11-15")];
    form.extend_from_slice(params);
    let body = form
        .iter()
        .map(|(k, v)| format!("{k}={}", v.replace(' ', "%20")))
        .collect::<Vec<_>>()
        .join("&");
    block_on(async {
        let resp = reqwest::Client::new()
            .post(moto_url())
            .header("Content-Type", "application/x-www-form-urlencoded")
            .header(
                "Authorization",
                format!("AWS4-HMAC-SHA256 Credential=test/20260101/{REGION}/ec2/aws4_request, SignedHeaders=host, Signature=0"),
            )
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(
            resp.status().is_success(),
            "EC2 {params:?}: {}",
            resp.status()
        );
        resp.text().await.unwrap()
    })
}

/// The text of the first `<tag>` in `xml`.
fn first(xml: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let start = xml
        .find(&open)
        .unwrap_or_else(|| panic!("no {tag} in {xml}"))
        + open.len();
    let end = start + xml[start..].find(&format!("</{tag}>")).unwrap();
    xml[start..end].to_string()
}

/// One of moto's default subnets and security groups, for Fargate tasks (awsvpc).
fn default_network() -> (String, String) {
    (
        first(&ec2_call(&[("Action", "DescribeSubnets")]), "subnetId"),
        first(
            &ec2_call(&[("Action", "DescribeSecurityGroups")]),
            "groupId",
        ),
    )
}

/// Launch one instance in moto; its ID.
fn run_instance() -> String {
    let xml = ec2_call(&[
        ("Action", "RunInstances"),
        ("ImageId", "ami-12c6146b"),
        ("MinCount", "1"),
        ("MaxCount", "1"),
        ("Placement.AvailabilityZone", "us-east-1a"),
    ]);
    first(&xml, "instanceId")
}

fn terminate_instance(id: &str) {
    ec2_call(&[("Action", "TerminateInstances"), ("InstanceId.1", id)]);
}

// ---------------------------------------------------------------------------------------------
// Cloud Map

fn register(service_id: &str, instance_id: &str, attrs: &[(&str, &str)]) {
    let c = cloudmap();
    let mut map: HashMap<String, String> = attrs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    map.insert("AWS_INSTANCE_IPV4".into(), "10.0.0.1".into());
    block_on(async {
        c.register_instance()
            .service_id(service_id)
            .instance_id(instance_id)
            .set_attributes(Some(map))
            .send()
            .await
            .unwrap();
    });
}

/// An instance as the sidecar registers it for an ECS task.
fn register_task(service_id: &str, cluster: &Cluster, arn: &str) -> String {
    let id = task_id(arn).to_string();
    register(
        service_id,
        &id,
        &[
            MARKER,
            ("ECS_TASK_ARN", arn),
            ("ECS_CLUSTER_NAME", &cluster.name),
        ],
    );
    id
}

/// An instance as the sidecar registers it on EC2.
fn register_host(service_id: &str, instance: &str) -> String {
    register(
        service_id,
        instance,
        &[
            MARKER,
            ("EC2_INSTANCE_ID", instance),
            ("AVAILABILITY_ZONE", "us-east-1a"),
        ],
    );
    instance.to_string()
}

fn ids(service_id: &str) -> Vec<String> {
    let mut ids: Vec<String> = instances(service_id).into_keys().collect();
    ids.sort();
    ids
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------------
// A fake ECS that answers like the real service

/// DescribeTasks as real ECS answers it: each requested task is either described (as `status`
/// says) or listed under `failures` with reason MISSING. moto lists nothing for unknown tasks.
fn real_ecs(status: impl Fn(&str) -> Option<&'static str> + Send + Sync + 'static) -> HttpFake {
    real_ecs_after(Duration::ZERO, status)
}

/// [`real_ecs`], answering each call after `delay`.
fn real_ecs_after(
    delay: Duration,
    status: impl Fn(&str) -> Option<&'static str> + Send + Sync + 'static,
) -> HttpFake {
    HttpFake::start(move |req| {
        std::thread::sleep(delay);
        assert_eq!(
            req.header("x-amz-target"),
            Some("AmazonEC2ContainerServiceV20141113.DescribeTasks")
        );
        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        let mut tasks = vec![];
        let mut failures = vec![];
        for arn in body["tasks"].as_array().unwrap() {
            let arn = arn.as_str().unwrap();
            match status(arn) {
                Some(s) => tasks.push(serde_json::json!({"taskArn": arn, "lastStatus": s})),
                None => failures.push(serde_json::json!({"arn": arn, "reason": "MISSING"})),
            }
        }
        Response::new(
            200,
            serde_json::json!({"tasks": tasks, "failures": failures}).to_string(),
        )
        .header("Content-Type", "application/x-amz-json-1.1")
        .into()
    })
}

fn task_arn(cluster: &str, n: usize) -> String {
    format!("arn:aws:ecs:{REGION}:123456789012:task/{cluster}/{n:032x}")
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn a_stopped_tasks_instance_is_removed_and_a_running_tasks_kept() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let cluster = Cluster::new();
    let stopped = cluster.run_task();
    let running = cluster.run_task();
    let other_running = cluster.run_task();
    let stale = register_task(&svc.id, &cluster, &stopped);
    let live = register_task(&svc.id, &cluster, &running);
    let live2 = register_task(&svc.id, &cluster, &other_running);
    cluster.stop_task(&stopped);

    let (code, log) = sweep(sweeper_command(&moto_url(), &svc.id));
    assert_eq!(code, 0, "{log}");
    assert_eq!(ids(&svc.id), sorted(vec![live, live2]), "{log}");
    assert!(log.contains("event=\"removed\""), "{log}");
    assert!(log.contains(&format!("instance_id={stale}")), "{log}");
    assert!(log.contains("task STOPPED"), "{log}");
}

#[test]
fn the_sidecar_marks_its_instance_and_after_a_sigkill_the_sweeper_removes_it() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let cluster = Cluster::new();
    let arn = cluster.run_task();
    let survivor = register_task(&svc.id, &cluster, &cluster.run_task());
    // The sidecar reads its task from the metadata endpoint: the fixture, with moto's task in it.
    let mut task: serde_json::Value =
        serde_json::from_str(&read_data("ecs-v4/docs-2020-fargate-pv14-task.json")).unwrap();
    task["TaskARN"] = arn.clone().into();
    task["Cluster"] = format!("arn:aws:ecs:{REGION}:123456789012:cluster/{}", cluster.name).into();
    let meta = ecs_metadata(task.to_string(), SIDECAR_CONTAINER.to_string(), 0);
    let mut cmd = sidecar_command(&moto_url());
    cmd.env(
        "ECS_CONTAINER_METADATA_URI_V4",
        format!("{}/v4/test", meta.url()),
    )
    .args(["--service-id", &svc.id, "--port", "8080", "--drain", "0"]);
    let sidecar = Sidecar::spawn(cmd);
    let own = task_id(&arn).to_string();
    wait_until(LONG, "sidecar registered", || {
        instances(&svc.id).contains_key(&own)
    });
    let attrs = instances(&svc.id)[&own].clone();
    assert_eq!(
        attrs.get("REGISTERED_BY").map(String::as_str),
        Some("cloudmap-sidecar")
    );
    assert_eq!(attrs.get("ECS_TASK_ARN"), Some(&arn));

    // Killed without a chance to deregister, and its task stopped: the instance is stale.
    sidecar.signal("KILL");
    cluster.stop_task(&arn);
    assert!(
        instances(&svc.id).contains_key(&own),
        "still registered after SIGKILL"
    );

    let (code, log) = sweep(sweeper_command(&moto_url(), &svc.id));
    assert_eq!(code, 0, "{log}");
    assert_eq!(ids(&svc.id), vec![survivor], "{log}");
}

#[test]
fn instances_without_the_marker_are_never_touched() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let cluster = Cluster::new();
    let stopped = cluster.run_task();
    let running = cluster.run_task();
    cluster.stop_task(&stopped);
    // As ECS's own serviceRegistries registers (no marker), and as another tool might.
    register(
        &svc.id,
        "ecs-own",
        &[
            ("ECS_CLUSTER_NAME", &cluster.name),
            ("ECS_TASK_ARN", &stopped),
        ],
    );
    register(
        &svc.id,
        "other-tool",
        &[("REGISTERED_BY", "terraform"), ("ECS_TASK_ARN", &stopped)],
    );
    let live = register_task(&svc.id, &cluster, &running);

    let (code, log) = sweep(sweeper_command(&moto_url(), &svc.id));
    assert_eq!(code, 0, "{log}");
    assert_eq!(
        ids(&svc.id),
        sorted(vec!["ecs-own".into(), "other-tool".into(), live]),
        "{log}"
    );
    assert!(log.contains("foreign=2"), "{log}");
}

#[test]
fn a_terminated_ec2_instances_instance_is_removed_and_a_running_ones_kept() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let running = run_instance();
    let terminated = run_instance();
    let also_running = run_instance();
    for id in [&running, &terminated, &also_running] {
        register_host(&svc.id, id);
    }
    terminate_instance(&terminated);

    let (code, log) = sweep(sweeper_command(&moto_url(), &svc.id));
    assert_eq!(code, 0, "{log}");
    assert_eq!(ids(&svc.id), sorted(vec![running, also_running]), "{log}");
    assert!(log.contains("instance terminated"), "{log}");
}

#[test]
fn an_ec2_instance_that_ec2_does_not_know_is_removed_only_when_its_zone_is_in_this_region() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let live = (0..3)
        .map(|_| register_host(&svc.id, &run_instance()))
        .collect::<Vec<_>>();
    // Never launched here: EC2 (and moto) fail DescribeInstances with InvalidInstanceID.NotFound.
    let forgotten = register_host(&svc.id, "i-0000000000000dead");
    register(
        &svc.id,
        "i-0000000000000beef",
        &[
            MARKER,
            ("EC2_INSTANCE_ID", "i-0000000000000beef"),
            ("AVAILABILITY_ZONE", "eu-west-1a"),
        ],
    );

    let (code, log) = sweep(sweeper_command(&moto_url(), &svc.id));
    // The other Region's instance could not be checked: kept, and the pass says it is incomplete.
    assert_eq!(code, 3, "{log}");
    let mut expected = live;
    expected.push("i-0000000000000beef".into());
    assert_eq!(ids(&svc.id), sorted(expected), "{log}");
    assert!(log.contains(&format!("instance_id={forgotten}")), "{log}");
    assert!(log.contains("instance not found"), "{log}");
}

#[test]
fn a_task_ecs_reports_missing_is_removed() {
    // moto answers unknown tasks with neither a task nor a failure; real ECS lists them under
    // `failures` with reason MISSING, which this fake does.
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let (gone, live) = (task_arn("prod", 1), task_arn("prod", 2));
    let fake = {
        let live = live.clone();
        real_ecs(move |arn| (arn == live).then_some("RUNNING"))
    };
    for arn in [&gone, &live] {
        register(&svc.id, task_id(arn), &[MARKER, ("ECS_TASK_ARN", arn)]);
    }
    let mut cmd = sweeper_command(&moto_url(), &svc.id);
    cmd.env("AWS_ENDPOINT_URL_ECS", fake.url());
    let (code, log) = sweep(cmd);
    assert_eq!(code, 0, "{log}");
    assert_eq!(ids(&svc.id), vec![task_id(&live).to_string()], "{log}");
    assert!(log.contains("task MISSING"), "{log}");
    // One DescribeTasks for both, in their cluster (given by ARN).
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 1);
    let body: serde_json::Value = serde_json::from_slice(&reqs[0].body).unwrap();
    assert_eq!(
        body["cluster"],
        format!("arn:aws:ecs:{REGION}:123456789012:cluster/prod")
    );
    assert_eq!(body["tasks"].as_array().unwrap().len(), 2);
}

#[test]
fn an_owner_lookup_error_removes_nothing() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let ecs_down = HttpFake::start(|_| {
        Response::new(
            500,
            r#"{"__type":"ServerException","message":"internal error"}"#,
        )
        .header("Content-Type", "application/x-amz-json-1.1")
        .into()
    });
    let ec2_down = HttpFake::start(|_| {
        Response::new(
            503,
            "<Response><Errors><Error><Code>Unavailable</Code><Message>down</Message></Error></Errors><RequestID>x</RequestID></Response>",
        )
        .into()
    });
    let tasks: Vec<String> = (1..=3).map(|n| task_arn("prod", n)).collect();
    for arn in &tasks {
        register(&svc.id, task_id(arn), &[MARKER, ("ECS_TASK_ARN", arn)]);
    }
    register_host(&svc.id, "i-0000000000000f00d");
    let before = ids(&svc.id);

    let mut cmd = sweeper_command(&moto_url(), &svc.id);
    cmd.env("AWS_ENDPOINT_URL_ECS", ecs_down.url())
        .env("AWS_ENDPOINT_URL_EC2", ec2_down.url());
    let (code, log) = sweep(cmd);
    assert_eq!(code, 3, "{log}");
    assert_eq!(ids(&svc.id), before, "{log}");
    assert!(!ecs_down.requests().is_empty(), "ECS was asked");
    assert!(!ec2_down.requests().is_empty(), "EC2 was asked");
    assert!(log.contains("event=\"owner_unknown\""), "{log}");
    assert!(log.contains("unverified=4"), "{log}");
}

#[test]
fn an_answer_naming_neither_the_task_nor_a_failure_removes_nothing() {
    // moto answers a task it never ran with an empty list: no task, no failure.
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let cluster = Cluster::new();
    let live = register_task(&svc.id, &cluster, &cluster.run_task());
    let unknown = task_arn(&cluster.name, 7);
    register(
        &svc.id,
        task_id(&unknown),
        &[MARKER, ("ECS_TASK_ARN", &unknown)],
    );
    register(&svc.id, "foreign-1", &[]);

    let (code, log) = sweep(sweeper_command(&moto_url(), &svc.id));
    assert_eq!(code, 3, "{log}");
    assert_eq!(ids(&svc.id).len(), 3, "{log}");
    assert!(ids(&svc.id).contains(&live));
    assert!(
        log.contains("answered neither the task nor a failure"),
        "{log}"
    );
}

#[test]
fn a_pass_never_leaves_the_service_without_instances() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let cluster = Cluster::new();
    let (a, b) = (cluster.run_task(), cluster.run_task());
    let ids_before = sorted(vec![
        register_task(&svc.id, &cluster, &a),
        register_task(&svc.id, &cluster, &b),
    ]);
    cluster.stop_task(&a);
    cluster.stop_task(&b);

    // Every instance is stale; even with no fraction limit, the last one stays.
    let mut cmd = sweeper_command(&moto_url(), &svc.id);
    cmd.args(["--max-fraction", "100%"]);
    let (code, log) = sweep(cmd);
    assert_eq!(code, 3, "{log}");
    assert_eq!(ids(&svc.id), vec![ids_before[1].clone()], "{log}");
    assert!(
        log.contains("would leave the service with no instances"),
        "{log}"
    );

    // And the next pass keeps it too.
    let mut cmd = sweeper_command(&moto_url(), &svc.id);
    cmd.args(["--max-fraction", "100%"]);
    let (code, log) = sweep(cmd);
    assert_eq!(code, 3, "{log}");
    assert_eq!(ids(&svc.id), vec![ids_before[1].clone()], "{log}");
}

#[test]
fn a_pass_that_would_remove_more_than_max_fraction_removes_nothing_and_says_so() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let cluster = Cluster::new();
    let tasks: Vec<String> = (0..3).map(|_| cluster.run_task()).collect();
    for arn in &tasks {
        register_task(&svc.id, &cluster, arn);
    }
    cluster.stop_task(&tasks[0]);
    cluster.stop_task(&tasks[1]);
    let before = ids(&svc.id);

    // 2 of 3 is more than the default 50 %.
    let (code, log) = sweep(sweeper_command(&moto_url(), &svc.id));
    assert_eq!(code, 3, "{log}");
    assert_eq!(ids(&svc.id), before, "{log}");
    assert!(log.contains("refusing to remove 2 of 3 instances"), "{log}");
    assert!(log.contains("--max-fraction 50%"), "{log}");

    // Allowed once the operator raises it.
    let mut cmd = sweeper_command(&moto_url(), &svc.id);
    cmd.env("CLOUDMAP_MAX_FRACTION", "0.7");
    let (code, log) = sweep(cmd);
    assert_eq!(code, 0, "{log}");
    assert_eq!(ids(&svc.id), vec![task_id(&tasks[2]).to_string()], "{log}");
}

#[test]
fn a_dry_run_prints_what_it_would_remove_and_removes_nothing() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let cluster = Cluster::new();
    let (stopped, running) = (cluster.run_task(), cluster.run_task());
    let stale = register_task(&svc.id, &cluster, &stopped);
    register_task(&svc.id, &cluster, &running);
    cluster.stop_task(&stopped);
    let before = ids(&svc.id);

    let mut cmd = sweeper_command(&moto_url(), &svc.id);
    cmd.arg("--dry-run");
    let (code, log) = sweep(cmd);
    assert_eq!(code, 0, "{log}");
    assert_eq!(ids(&svc.id), before, "{log}");
    assert!(log.contains("event=\"would_remove\""), "{log}");
    assert!(log.contains(&format!("instance_id={stale}")), "{log}");
    assert!(!log.contains("event=\"removed\""), "{log}");
}

#[test]
fn sigterm_during_a_pass_lets_it_finish_then_the_loop_exits() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let (gone, live) = (task_arn("prod", 11), task_arn("prod", 12));
    for arn in [&gone, &live] {
        register(&svc.id, task_id(arn), &[MARKER, ("ECS_TASK_ARN", arn)]);
    }
    // Real ECS behaviour (MISSING), answered slowly so that the signal lands mid-pass.
    let slow = {
        let live = live.clone();
        real_ecs_after(Duration::from_millis(1500), move |arn| {
            (arn == live).then_some("RUNNING")
        })
    };
    let mut cmd = sweeper_command(&moto_url(), &svc.id);
    cmd.env("AWS_ENDPOINT_URL_ECS", slow.url())
        .args(["--interval", "1h"]);
    let mut sweeper = Sidecar::spawn(cmd);
    wait_until(LONG, "DescribeTasks under way", || {
        !slow.requests().is_empty()
    });
    sweeper.signal("TERM");
    let code = sweeper.wait(LONG);
    let log = sweeper.log();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("finishing the current pass"), "{log}");
    assert_eq!(
        ids(&svc.id),
        vec![task_id(&live).to_string()],
        "the pass finished: {log}"
    );
    assert!(log.contains("stopped after the pass"), "{log}");
}

#[test]
fn between_passes_sigterm_stops_the_loop_at_once() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    register(&svc.id, "foreign-1", &[]);
    let mut cmd = sweeper_command(&moto_url(), &svc.id);
    cmd.args(["--interval", "1h"]);
    let mut sweeper = Sidecar::spawn(cmd);
    sweeper.wait_for_log(LONG, "event=\"pass_plan\"");
    sweeper.signal("TERM");
    assert_eq!(sweeper.wait(LONG), 0, "{}", sweeper.log());
    assert!(sweeper.log().contains("stopped between passes"));
}

#[test]
fn bad_settings_are_all_reported_with_exit_2_before_any_call() {
    let mut cmd = Command::new(sweeper_bin());
    cmd.env_clear()
        .args(["--service-id", "web", "--interval", "soon"])
        .env("CLOUDMAP_MAX_FRACTION", "2");
    let (code, log) = run_to_exit(cmd, LONG);
    assert_eq!(code, 2, "{log}");
    assert!(
        log.contains("--service-id (CLOUDMAP_SERVICE_ID) = \"web\""),
        "{log}"
    );
    assert!(
        log.contains("--interval (CLOUDMAP_INTERVAL) = \"soon\""),
        "{log}"
    );
    assert!(
        log.contains("--max-fraction (CLOUDMAP_MAX_FRACTION) = \"2\""),
        "{log}"
    );
}
