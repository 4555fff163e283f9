//! Every place the application can run: each published ECS task metadata body in
//! `tests/data/ecs-v4/` served over HTTP (awsvpc, dual-stack, IPv6-only, bridge with dynamic host
//! ports, Service Connect, Managed Instances, the agent's error bodies), EC2 instance metadata from
//! a loopback IMDSv2 fake that behaves like EC2, plain EC2 without ECS, and the ECS container
//! health check as the health source.
//!
//! The table test drives the library's `Discovery` directly (one look-up per fixture); the other
//! tests run the real binary against the moto server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_servicediscovery::types::RecordType;
use cloudmap_sidecar::metadata::imds::Imds;
use cloudmap_sidecar::metadata::{Discovery, LocateError, Locator, Selection};
use common::*;

const LONG: Duration = Duration::from_secs(30);
const BRIDGE_TASK: &str = "ecs-v4/ecs-exporter-ec2-bridge-task-dynamic-hostport.json";
const BRIDGE_TASK_ID: &str = "506f22fab0414cde856201584703fed9";
const SIDECAR: &str = "<the sidecar's own container>";

/// A metadata endpoint answering `/v4/test` (the sidecar's container) and `/v4/test/task` with the
/// given status and body: the ECS agent's answers, errors included.
fn metadata(me: (u16, String), task: (u16, String)) -> HttpFake {
    HttpFake::start(move |req| {
        let (status, body) = match req.path.as_str() {
            "/v4/test" => &me,
            "/v4/test/task" => &task,
            _ => return Response::new(404, "\"unknown path\"").into(),
        };
        Response::new(*status, body.clone())
            .header("Content-Type", "application/json")
            .into()
    })
}

/// A task metadata endpoint whose task body the test can change while the sidecar runs.
fn changing_metadata(task: Arc<Mutex<String>>) -> HttpFake {
    HttpFake::start(move |req| match req.path.as_str() {
        "/v4/test" => Response::json(SIDECAR_CONTAINER).into(),
        "/v4/test/task" => Response::json(task.lock().unwrap().clone()).into(),
        _ => Response::new(404, "\"unknown path\"").into(),
    })
}

/// A fixture with one edit applied to the container called `name`.
fn edited(path: &str, name: &str, edit: impl Fn(&mut serde_json::Value)) -> String {
    let mut task: serde_json::Value = serde_json::from_str(&read_data(path)).unwrap();
    let c = task["Containers"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|c| c["Name"] == name)
        .unwrap();
    edit(c);
    task.to_string()
}

fn body(source: &str) -> String {
    if source == SIDECAR {
        SIDECAR_CONTAINER.to_string()
    } else {
        read_data(source)
    }
}

#[derive(Debug)]
enum Expect {
    Located {
        ipv4: Option<&'static str>,
        ipv6: Option<&'static str>,
        port: Option<u16>,
        id: &'static str,
        /// Bridge/host: the address is the instance's, from IMDS.
        from_imds: bool,
    },
    /// Retried until the start deadline (exit 1 then); the message must contain each part.
    NotReady(&'static [&'static str]),
    /// Exit 2 at once.
    Invalid(&'static [&'static str]),
}

struct Case {
    what: &'static str,
    /// Fixture (or `SIDECAR`) served as the sidecar's own container, and its HTTP status.
    me: (&'static str, u16),
    /// Fixture served as the task, and its HTTP status; `task_body` replaces its contents.
    task: (&'static str, u16),
    task_body: Option<String>,
    container: Option<&'static str>,
    port: Option<u16>,
    expect: Expect,
}

fn case(what: &'static str, task: &'static str, expect: Expect) -> Case {
    Case {
        what,
        me: (SIDECAR, 200),
        task: (task, 200),
        task_body: None,
        container: None,
        port: None,
        expect,
    }
}

impl Case {
    fn me(mut self, me: &'static str, status: u16) -> Case {
        self.me = (me, status);
        self
    }
    fn status(mut self, status: u16) -> Case {
        self.task.1 = status;
        self
    }
    fn body(mut self, body: String) -> Case {
        self.task_body = Some(body);
        self
    }
    fn container(mut self, c: &'static str) -> Case {
        self.container = Some(c);
        self
    }
    fn port(mut self, p: u16) -> Case {
        self.port = Some(p);
        self
    }
}

fn ok(
    ipv4: Option<&'static str>,
    ipv6: Option<&'static str>,
    port: Option<u16>,
    id: &'static str,
) -> Expect {
    Expect::Located {
        ipv4,
        ipv6,
        port,
        id,
        from_imds: false,
    }
}

fn host(port: u16, id: &'static str) -> Expect {
    Expect::Located {
        ipv4: Some(IMDS_LOCAL_IPV4),
        ipv6: None,
        port: Some(port),
        id,
        from_imds: true,
    }
}

fn cases() -> Vec<Case> {
    use Expect::{Invalid, NotReady};
    vec![
        // awsvpc (Fargate and EC2): the task ENI's address, shared by every container.
        case("Fargate platform 1.4 task", "ecs-v4/docs-2020-fargate-pv14-task.json",
            ok(Some("10.0.0.108"), None, Some(8080), "febee046097849aba589d4435207c04a"))
            .me("ecs-v4/docs-2020-fargate-pv14-container.json", 200).port(8080),
        case("EC2 awsvpc task: the pause container is skipped, no port without --port",
            "ecs-v4/docs-ec2-awsvpc-task.json",
            ok(Some("10.0.2.61"), None, None, "158d1c8083dd49d6b527399fd6414f5c"))
            .me("ecs-v4/docs-ec2-awsvpc-container.json", 200),
        case("taskWithTags body with an Errors array", "ecs-v4/docs-ec2-awsvpc-taskWithTags-error.json",
            ok(Some("10.0.2.61"), None, Some(80), "158d1c8083dd49d6b527399fd6414f5c")).port(80),
        case("two application containers need --container",
            "ecs-v4/datadog-integrations-fargate-task-2containers.json",
            Invalid(&["2 possible application containers", "dd-agent, apmtest-ping", "--container (CLOUDMAP_CONTAINER)"])),
        case("--container picks one of two", "ecs-v4/datadog-integrations-fargate-task-2containers.json",
            ok(Some("172.31.38.118"), None, Some(8126), "67cd8a22b533459696d4ccab5278e009"))
            .container("apmtest-ping").port(8126),
        case("--container naming no container of the task",
            "ecs-v4/datadog-integrations-fargate-task-2containers.json",
            Invalid(&["--container (CLOUDMAP_CONTAINER) = \"web\"", "no such container", "dd-agent, apmtest-ping"]))
            .container("web"),
        case("containers with their own addresses: the chosen one's", "ecs-v4/datadog-task-with-tags-health-exitcode-minus1.json",
            ok(Some("172.31.115.123"), None, Some(8126), "938f6d263c464aa5985dc67ab7f38a7e"))
            .container("datadog-agent").port(8126),
        case("stopped and pause containers are not candidates", "ecs-v4/ecs-exporter-ec2-awsvpc-task-health.json",
            Invalid(&["2 possible application containers (ecs-exporter, main)"])),
        case("EC2 awsvpc task with a health check", "ecs-v4/ecs-exporter-ec2-awsvpc-task-health.json",
            ok(Some("10.0.130.99"), None, Some(80), "7982a8670adf49fab4297ee5ed51c0ba"))
            .container("main").port(80),
        case("Fargate task with a health check", "ecs-v4/ecs-exporter-fargate-task-health.json",
            ok(Some("10.0.186.183"), None, Some(80), "8204edb71692468dba0dcaedf9445d45"))
            .container("main").port(80),
        case("Managed Instances task", "ecs-v4/ecs-exporter-managed-instances-task-health.json",
            ok(Some("10.0.161.205"), None, Some(80), "de02d89bb57c4ef0b6e3745d7c2c9347"))
            .container("main").port(80),
        case("a STOPPED application container is not ready", "ecs-v4/ecs-exporter-managed-instances-task-health.json",
            NotReady(&["application container nonessential is STOPPED"]))
            .container("nonessential"),
        // Dual-stack and IPv6-only: both addresses, or only IPv6 (lower-case).
        case("Fargate dual-stack task (mixed-case IPv6 in the metadata)", "ecs-v4/docs-fargate-task-dualstack.json",
            ok(Some("192.0.2.3"), Some("2001:db8:10b:1a00:32bf:a372:d80f:e958"), Some(80), "e9028f8d5d8e4f258373e7b93ce9a3c3"))
            .me("ecs-v4/docs-fargate-container.json", 200).port(80),
        case("Fargate dual-stack task with a stopped container", "ecs-v4/ecs-exporter-fargate-task-dualstack.json",
            ok(Some("10.0.117.145"), Some("2600:1f18:4ae8:400:7ca9:f2:a4c:8285"), Some(9779), "bae32def0ab64f06818e8862e58f8d6d"))
            .container("ecs-exporter").port(9779),
        case("IPv6-only awsvpc task (minimal shape without Type)", "ecs-v4/sc-agent-awsvpc-ipv6-only-minimal.json",
            ok(None, Some("2600:1f13:604:c601:e861:7b20:91fe:881e"), None, "TestTask")),
        case("awsvpc networks without addresses yet", "ecs-v4/sc-agent-awsvpc-networks-without-ips-minimal.json",
            NotReady(&["container test has no IPv4 or IPv6 address"])),
        case("containers without Networks yet", "ecs-v4/sc-agent-containers-without-networks-minimal.json",
            NotReady(&["container test has no network"])),
        // bridge: the instance's IPv4 from IMDS and the host port; never 172.17.x.
        case("bridge task with a dynamic host port", BRIDGE_TASK, host(32768, BRIDGE_TASK_ID))
            .container("ecs-exporter"),
        case("bridge task, --port names the container port", BRIDGE_TASK, host(32768, BRIDGE_TASK_ID))
            .container("ecs-exporter").port(9779),
        case("bridge task, --port that is not mapped", BRIDGE_TASK,
            NotReady(&["container ecs-exporter has no host port mapped to container port 8080"]))
            .container("ecs-exporter").port(8080),
        case("bridge task, HostPort 0 (not bound yet)", BRIDGE_TASK,
            NotReady(&["container ecs-exporter has no host port mapped to container port 9779", "HostPort 0"]))
            .container("ecs-exporter")
            .body(edited(BRIDGE_TASK, "ecs-exporter", |c| {
                for p in c["Ports"].as_array_mut().unwrap() {
                    p["HostPort"] = 0.into();
                }
            })),
        case("bridge task, container without port mappings", BRIDGE_TASK,
            NotReady(&["container prometheus has no port mapping", "set --port"]))
            .container("prometheus"),
        case("bridge task with two candidates", BRIDGE_TASK,
            Invalid(&["2 possible application containers (ecs-exporter, prometheus)"])),
        case("bridge task with three nginx containers", "ecs-v4/otel-contrib-ec2-bridge-task-3containers.json",
            Invalid(&["3 possible application containers (nginx100, nginx300, nginx200)"])),
        case("bridge task without Ports", "ecs-v4/otel-contrib-ec2-bridge-task-3containers.json",
            NotReady(&["container nginx200 has no host port mapped to container port 80"]))
            .container("nginx200").port(80),
        // Service Connect in bridge mode: the app runs in the pause container's namespace.
        case("Service Connect bridge task, no port mappings reported",
            "ecs-v4/sc-agent-bridge-serviceconnect-pause-ipv4-minimal.json",
            NotReady(&["container nginx-client has no host port mapped to container port 80"]))
            .container("nginx-client").port(80),
        case("Service Connect bridge task, mapping on the pause container",
            "ecs-v4/sc-agent-bridge-serviceconnect-pause-ipv4-minimal.json", host(49153, "TestTask"))
            .container("nginx-client").port(80)
            .body(edited("ecs-v4/sc-agent-bridge-serviceconnect-pause-ipv4-minimal.json", "pause", |c| {
                c["Ports"] = serde_json::json!([{"ContainerPort": 80, "Protocol": "tcp", "HostPort": 49153, "HostIp": "0.0.0.0"}]);
            })),
        // Bodies that are not one task.
        case("the /tasks array shape (Managed Instances)", "ecs-v4/otel-contrib-managed-instances-tasks-array-no-networks.json",
            Invalid(&["JSON array of 2 tasks", "ECS_CONTAINER_METADATA_URI_V4"])),
        case("agent error body on the task endpoint (HTTP 404)", "ecs-v4/agent-error-404-task-lookup.json",
            NotReady(&["HTTP 404", "V4 task metadata handler: unable to get task arn from request"]))
            .status(404),
        case("agent error body with HTTP 200", "ecs-v4/agent-error-404-task-lookup.json",
            NotReady(&["the ECS agent answered with an error message: V4 task metadata handler"])),
        case("agent error body on the container endpoint (HTTP 404)", "ecs-v4/docs-2020-fargate-pv14-task.json",
            NotReady(&["/v4/test: HTTP 404", "V4 container metadata handler: unable to get container ID"]))
            .me("ecs-v4/agent-error-404-container-lookup.json", 404),
        case("a container body where the task belongs", "ecs-v4/docs-fargate-container.json",
            NotReady(&["the task metadata lists no containers"])),
        case("agent internal error (HTTP 500)", "ecs-v4/agent-error-404-task-lookup.json",
            NotReady(&["HTTP 500"]))
            .status(500),
    ]
}

/// Every fixture served over HTTP yields the right address, port and instance ID, or a clear
/// error of the right kind; none panics. Bridge cases get the host address from the IMDS fake,
/// awsvpc cases never ask IMDS.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn every_ecs_metadata_fixture_yields_the_right_address_or_a_clear_error() {
    let imds = imds_fake();
    let mut served = BTreeSet::new();
    let mut failures = Vec::new();
    for c in cases() {
        served.insert(c.me.0.to_string());
        served.insert(c.task.0.to_string());
        let task = c.task_body.clone().unwrap_or_else(|| body(c.task.0));
        let meta = metadata((c.me.1, body(c.me.0)), (c.task.1, task));
        let selection = Selection {
            container: c.container.map(str::to_string),
            port: c.port,
            ..Selection::default()
        };
        let discovery = Discovery::new(Some(format!("{}/v4/test", meta.url())), selection)
            .with_imds(Imds::new(Some(imds.url()), false));
        let imds_before = imds.requests().len();
        let result = discovery.locate().await;
        let asked_imds = imds.requests().len() > imds_before;
        let problem = match (&c.expect, &result) {
            (
                Expect::Located {
                    ipv4,
                    ipv6,
                    port,
                    id,
                    from_imds,
                },
                Ok(loc),
            ) => {
                let got = (
                    loc.ipv4.map(|i| i.to_string()),
                    loc.ipv6.map(|i| i.to_string()),
                    loc.port,
                    loc.instance_id.clone(),
                );
                let want = (
                    ipv4.map(str::to_string),
                    ipv6.map(str::to_string),
                    *port,
                    Some(id.to_string()),
                );
                let imds_id = loc.attributes.get("EC2_INSTANCE_ID");
                if got != want {
                    Some(format!("got {got:?}, want {want:?}"))
                } else if asked_imds != *from_imds {
                    Some(format!("asked IMDS: {asked_imds}, expected {from_imds}"))
                } else if *from_imds && imds_id != Some(IMDS_INSTANCE_ID) {
                    Some(format!("EC2_INSTANCE_ID {imds_id:?}"))
                } else {
                    None
                }
            }
            (Expect::NotReady(parts), Err(LocateError::NotReady(m)))
            | (Expect::Invalid(parts), Err(LocateError::Invalid(m))) => parts
                .iter()
                .find(|p| !m.contains(*p))
                .map(|p| format!("message lacks {p:?}: {m}")),
            (want, got) => Some(format!("expected {want:?}, got {got:?}")),
        };
        if let Some(p) = problem {
            failures.push(format!("{} ({}): {p}", c.what, c.task.0));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));

    // Every fixture in tests/data/ecs-v4 is in the table.
    let all: BTreeSet<String> = std::fs::read_dir(data("ecs-v4"))
        .unwrap()
        .map(|e| format!("ecs-v4/{}", e.unwrap().file_name().to_string_lossy()))
        .filter(|n| n.ends_with(".json"))
        .collect();
    let missing: Vec<&String> = all.difference(&served).collect();
    assert!(missing.is_empty(), "fixtures not served: {missing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn the_imds_fake_behaves_like_ec2_with_tokens_required() {
    let imds = imds_fake();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = |p: &str| format!("{}{p}", imds.url());
    let no_ttl = http.put(url("/latest/api/token")).send().await.unwrap();
    assert_eq!(no_ttl.status(), 400);
    let token = http
        .put(url("/latest/api/token"))
        .header("X-aws-ec2-metadata-token-ttl-seconds", "60")
        .send()
        .await
        .unwrap();
    assert_eq!(token.status(), 200);
    assert_eq!(
        token.headers()["x-aws-ec2-metadata-token-ttl-seconds"],
        "60"
    );
    assert_eq!(token.text().await.unwrap(), imds_token());
    let versioned = http
        .put(url("/2021-03-23/api/token"))
        .header("X-aws-ec2-metadata-token-ttl-seconds", "60")
        .send()
        .await
        .unwrap();
    assert_eq!(versioned.status(), 403);
    let without = http
        .get(url("/latest/meta-data/local-ipv4"))
        .send()
        .await
        .unwrap();
    assert_eq!(without.status(), 401);
    assert_eq!(without.headers()["server"], "EC2ws");
    let wrong = http
        .get(url("/latest/meta-data/local-ipv4"))
        .header("X-aws-ec2-metadata-token", "stale")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let get = |p: &'static str| {
        let req = http
            .get(url(p))
            .header("X-aws-ec2-metadata-token", imds_token());
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    assert_eq!(
        get("/latest/meta-data/local-ipv4").await,
        (200, IMDS_LOCAL_IPV4.to_string())
    );
    assert_eq!(
        get("/latest/meta-data/instance-id").await,
        (200, IMDS_INSTANCE_ID.to_string())
    );
    assert_eq!(
        get("/latest/meta-data/placement/availability-zone").await,
        (200, IMDS_AZ.to_string())
    );
    assert_eq!(get("/latest/meta-data/spot/instance-action").await.0, 404);
}

/// aws-config's IMDS client against the fake: token first, then every GET with it.
fn assert_token_before_gets(imds: &HttpFake) {
    let reqs = imds.requests();
    assert!(!reqs.is_empty(), "IMDS was not asked");
    assert_eq!(
        (reqs[0].method.as_str(), reqs[0].path.as_str()),
        ("PUT", "/latest/api/token"),
        "the token PUT comes first: {reqs:?}"
    );
    assert!(reqs[0]
        .header("x-aws-ec2-metadata-token-ttl-seconds")
        .is_some());
    for r in reqs.iter().filter(|r| r.method == "GET") {
        assert_eq!(
            r.header("x-aws-ec2-metadata-token"),
            Some(imds_token().as_str()),
            "GET {} without the token",
            r.path
        );
    }
}

/// IMDS-enabled command: the harness turns IMDS off by default.
fn with_imds(cmd: &mut std::process::Command, imds_url: &str) {
    cmd.env_remove("AWS_EC2_METADATA_DISABLED")
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds_url);
}

// ECS's own integration registers bridge tasks as SRV records with the container instance's IP
// and the host port; a Docker-internal 172.17.x address would send traffic nowhere.
#[test]
fn bridge_task_is_registered_with_the_instance_ip_and_the_dynamic_host_port_in_an_srv_service() {
    let svc = fresh_service(ServiceSpec {
        custom_health: true,
        records: vec![(RecordType::Srv, 1)],
    });
    let meta = ecs_metadata(read_data(BRIDGE_TASK), SIDECAR_CONTAINER.to_string(), 0);
    let imds = imds_fake();
    let mut cmd = sidecar_command(&moto_url());
    with_imds(&mut cmd, &imds.url());
    cmd.env(
        "ECS_CONTAINER_METADATA_URI_V4",
        format!("{}/v4/test", meta.url()),
    )
    .args(["--service-id", &svc.id, "--container", "ecs-exporter"])
    .args(["--drain", "0"]);
    let mut sidecar = Sidecar::spawn(cmd);
    wait_until(LONG, "bridge task registered", || {
        instances(&svc.id).contains_key(BRIDGE_TASK_ID)
    });
    let attrs = instances(&svc.id)[BRIDGE_TASK_ID].clone();
    let get = |k: &str| attrs.get(k).map(String::as_str);
    assert_eq!(get("AWS_INSTANCE_IPV4"), Some(IMDS_LOCAL_IPV4), "{attrs:?}");
    assert_eq!(get("AWS_INSTANCE_PORT"), Some("32768"), "the host port");
    assert_eq!(get("EC2_INSTANCE_ID"), Some(IMDS_INSTANCE_ID));
    assert_eq!(get("AWS_INSTANCE_IPV6"), None);
    assert_eq!(
        get("AVAILABILITY_ZONE"),
        Some("us-east-1a"),
        "the task's AZ"
    );
    assert_eq!(
        get("ECS_SERVICE_NAME"),
        Some("prom-ecs-exporter-sandbox-main-ec2")
    );
    assert!(
        !attrs.values().any(|v| v.starts_with("172.17.")),
        "never the Docker network address: {attrs:?}"
    );
    assert_token_before_gets(&imds);
    sidecar.signal("TERM");
    assert_eq!(sidecar.wait(LONG), 0, "{}", sidecar.log());
    assert!(instances(&svc.id).is_empty());
}

#[test]
fn plain_ec2_instance_is_registered_under_its_ec2_instance_id() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let imds = imds_fake();
    let mut cmd = sidecar_command(&moto_url());
    with_imds(&mut cmd, &imds.url());
    cmd.args(["--service-id", &svc.id, "--port", "8080", "--drain", "0"]);
    let mut sidecar = Sidecar::spawn(cmd);
    wait_until(LONG, "EC2 instance registered", || {
        instances(&svc.id).contains_key(IMDS_INSTANCE_ID)
    });
    let attrs = instances(&svc.id)[IMDS_INSTANCE_ID].clone();
    let get = |k: &str| attrs.get(k).map(String::as_str);
    assert_eq!(get("AWS_INSTANCE_IPV4"), Some(IMDS_LOCAL_IPV4));
    assert_eq!(get("AWS_INSTANCE_PORT"), Some("8080"));
    assert_eq!(get("EC2_INSTANCE_ID"), Some(IMDS_INSTANCE_ID));
    assert_eq!(get("AVAILABILITY_ZONE"), Some(IMDS_AZ));
    assert_eq!(
        get("ECS_CLUSTER_NAME"),
        None,
        "no ECS attributes outside ECS"
    );
    assert_token_before_gets(&imds);
    sidecar.signal("TERM");
    assert_eq!(sidecar.wait(LONG), 0, "{}", sidecar.log());
    assert!(instances(&svc.id).is_empty());
}

#[test]
fn plain_ec2_with_ip_still_overrides_the_imds_address() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let imds = imds_fake();
    let mut cmd = sidecar_command(&moto_url());
    with_imds(&mut cmd, &imds.url());
    cmd.args([
        "--service-id",
        &svc.id,
        "--ip",
        "10.20.30.40",
        "--drain",
        "0",
    ]);
    let mut sidecar = Sidecar::spawn(cmd);
    wait_until(LONG, "EC2 instance registered", || {
        instances(&svc.id).contains_key(IMDS_INSTANCE_ID)
    });
    let attrs = instances(&svc.id)[IMDS_INSTANCE_ID].clone();
    assert_eq!(
        attrs.get("AWS_INSTANCE_IPV4").map(String::as_str),
        Some("10.20.30.40")
    );
    sidecar.signal("TERM");
    assert_eq!(sidecar.wait(LONG), 0, "{}", sidecar.log());
}

// Decision: "no ECS metadata and no IMDS answer" is retried until --start-timeout (IMDS can be
// briefly unreachable while an instance boots, and systemd's Restart=on-failure then tries again),
// then exit 1 with what to set. IMDS turned off on purpose can never work: exit 2 at once.
#[test]
fn neither_ecs_metadata_nor_imds_answering_exits_1_saying_what_to_set() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = sidecar_command(&moto_url());
    with_imds(&mut cmd, &format!("http://127.0.0.1:{closed}"));
    cmd.args(["--service-id", &svc.id, "--start-timeout", "2s"]);
    let (code, log) = run_to_exit(cmd, LONG);
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains("no usable address before the start deadline"),
        "{log}"
    );
    assert!(
        log.contains("ECS_CONTAINER_METADATA_URI_V4 is not set"),
        "{log}"
    );
    assert!(log.contains("EC2 instance metadata"), "{log}");
    assert!(
        log.contains("--ip (CLOUDMAP_IP)") && log.contains("--instance-id"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    assert!(instances(&svc.id).is_empty());

    let mut cmd = sidecar_command(&moto_url());
    cmd.args(["--service-id", &svc.id, "--start-timeout", "30s"]);
    let (code, log) = run_to_exit(cmd, LONG);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("AWS_EC2_METADATA_DISABLED=true"), "{log}");
}

#[test]
fn dual_stack_task_publishes_ipv4_and_lower_case_ipv6_for_a_and_aaaa_records() {
    let svc = fresh_service(ServiceSpec {
        custom_health: true,
        records: vec![(RecordType::A, 1), (RecordType::Aaaa, 1)],
    });
    let meta = ecs_metadata(
        read_data("ecs-v4/docs-fargate-task-dualstack.json"),
        SIDECAR_CONTAINER.to_string(),
        0,
    );
    let mut cmd = sidecar_command(&moto_url());
    cmd.env(
        "ECS_CONTAINER_METADATA_URI_V4",
        format!("{}/v4/test", meta.url()),
    )
    .args(["--service-id", &svc.id, "--port", "80", "--drain", "0"]);
    let mut sidecar = Sidecar::spawn(cmd);
    let id = "e9028f8d5d8e4f258373e7b93ce9a3c3";
    wait_until(LONG, "dual-stack task registered", || {
        instances(&svc.id).contains_key(id)
    });
    let attrs = instances(&svc.id)[id].clone();
    assert_eq!(
        attrs.get("AWS_INSTANCE_IPV4").map(String::as_str),
        Some("192.0.2.3")
    );
    assert_eq!(
        attrs.get("AWS_INSTANCE_IPV6").map(String::as_str),
        Some("2001:db8:10b:1a00:32bf:a372:d80f:e958"),
        "canonical lower-case (the metadata says 2001:dB8:…)"
    );
    sidecar.signal("TERM");
    assert_eq!(sidecar.wait(LONG), 0, "{}", sidecar.log());
}

#[test]
fn ipv6_only_task_registers_for_aaaa_and_exits_2_for_a_records_naming_aws_instance_ipv4() {
    let task = read_data("ecs-v4/sc-agent-awsvpc-ipv6-only-minimal.json");
    let aaaa = fresh_service(ServiceSpec {
        custom_health: true,
        records: vec![(RecordType::Aaaa, 1)],
    });
    let meta = ecs_metadata(task.clone(), SIDECAR_CONTAINER.to_string(), 0);
    let mut cmd = sidecar_command(&moto_url());
    cmd.env(
        "ECS_CONTAINER_METADATA_URI_V4",
        format!("{}/v4/test", meta.url()),
    )
    .args(["--service-id", &aaaa.id, "--drain", "0"]);
    let mut sidecar = Sidecar::spawn(cmd);
    wait_until(LONG, "IPv6-only task registered", || {
        instances(&aaaa.id).contains_key("TestTask")
    });
    let attrs = instances(&aaaa.id)["TestTask"].clone();
    assert_eq!(
        attrs.get("AWS_INSTANCE_IPV6").map(String::as_str),
        Some("2600:1f13:604:c601:e861:7b20:91fe:881e")
    );
    assert_eq!(attrs.get("AWS_INSTANCE_IPV4"), None, "only IPv6");
    sidecar.signal("TERM");
    assert_eq!(sidecar.wait(LONG), 0, "{}", sidecar.log());

    let a = fresh_service(ServiceSpec {
        custom_health: true,
        records: vec![(RecordType::A, 1)],
    });
    let mut cmd = sidecar_command(&moto_url());
    cmd.env(
        "ECS_CONTAINER_METADATA_URI_V4",
        format!("{}/v4/test", meta.url()),
    )
    .args(["--service-id", &a.id]);
    let (code, log) = run_to_exit(cmd, LONG);
    assert_eq!(code, 2, "{log}");
    assert!(
        log.contains("has A records, which need AWS_INSTANCE_IPV4"),
        "{log}"
    );
    assert!(log.contains("IPv6 only"), "says why: {log}");
    assert!(instances(&a.id).is_empty());
}

#[test]
fn srv_service_without_a_port_exits_2_naming_aws_instance_port() {
    let svc = fresh_service(ServiceSpec {
        custom_health: true,
        records: vec![(RecordType::Srv, 1)],
    });
    let meta = ecs_metadata(
        read_data("ecs-v4/docs-2020-fargate-pv14-task.json"),
        SIDECAR_CONTAINER.to_string(),
        0,
    );
    let mut cmd = sidecar_command(&moto_url());
    cmd.env(
        "ECS_CONTAINER_METADATA_URI_V4",
        format!("{}/v4/test", meta.url()),
    )
    .args(["--service-id", &svc.id]);
    let (code, log) = run_to_exit(cmd, LONG);
    assert_eq!(code, 2, "{log}");
    assert!(
        log.contains("has SRV records, which need AWS_INSTANCE_PORT: set --port (CLOUDMAP_PORT)"),
        "{log}"
    );
    assert!(instances(&svc.id).is_empty());
}

#[test]
fn the_tasks_array_shape_exits_2_at_once() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let meta = ecs_metadata(
        read_data("ecs-v4/otel-contrib-managed-instances-tasks-array-no-networks.json"),
        SIDECAR_CONTAINER.to_string(),
        0,
    );
    let mut cmd = sidecar_command(&moto_url());
    cmd.env(
        "ECS_CONTAINER_METADATA_URI_V4",
        format!("{}/v4/test", meta.url()),
    )
    .args(["--service-id", &svc.id, "--port", "80"]);
    let (code, log) = run_to_exit(cmd, LONG);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("JSON array of 2 tasks"), "{log}");
    assert!(instances(&svc.id).is_empty());
}

#[test]
fn agent_error_bodies_exit_1_at_the_start_deadline_quoting_the_agent() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let meta = metadata(
        (200, SIDECAR_CONTAINER.to_string()),
        (404, read_data("ecs-v4/agent-error-404-task-lookup.json")),
    );
    let mut cmd = sidecar_command(&moto_url());
    cmd.env(
        "ECS_CONTAINER_METADATA_URI_V4",
        format!("{}/v4/test", meta.url()),
    )
    .args([
        "--service-id",
        &svc.id,
        "--port",
        "80",
        "--start-timeout",
        "2s",
    ]);
    let (code, log) = run_to_exit(cmd, LONG);
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains("HTTP 404 Not Found: V4 task metadata handler: unable to get task arn"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    assert!(instances(&svc.id).is_empty());
}

#[test]
fn bridge_host_port_never_bound_exits_1_naming_the_container_and_port() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let task = edited(BRIDGE_TASK, "ecs-exporter", |c| {
        for p in c["Ports"].as_array_mut().unwrap() {
            p["HostPort"] = 0.into();
        }
    });
    let meta = ecs_metadata(task, SIDECAR_CONTAINER.to_string(), 0);
    let imds = imds_fake();
    let mut cmd = sidecar_command(&moto_url());
    with_imds(&mut cmd, &imds.url());
    cmd.env(
        "ECS_CONTAINER_METADATA_URI_V4",
        format!("{}/v4/test", meta.url()),
    )
    .args(["--service-id", &svc.id, "--container", "ecs-exporter"])
    .args(["--start-timeout", "2s"]);
    let (code, log) = run_to_exit(cmd, LONG);
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains("container ecs-exporter has no host port mapped to container port 9779"),
        "{log}"
    );
    assert!(
        meta.count("GET", "/v4/test/task") >= 2,
        "retried until the deadline"
    );
    assert!(instances(&svc.id).is_empty());
}

fn set_main_health(task: &Mutex<String>, base: &str, health: serde_json::Value) {
    *task.lock().unwrap() = edited(base, "main", |c| {
        c["Health"] = health.clone();
    });
}

#[test]
fn health_from_container_follows_the_ecs_health_status() {
    const BASE: &str = "ecs-v4/ecs-exporter-fargate-task-health.json";
    const ID: &str = "8204edb71692468dba0dcaedf9445d45";
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let task = Arc::new(Mutex::new(String::new()));
    // `{}` is how ECS shows "unknown": not yet healthy.
    set_main_health(&task, BASE, serde_json::json!({}));
    let meta = changing_metadata(task.clone());
    let mut cmd = sidecar_command(&moto_url());
    cmd.env(
        "ECS_CONTAINER_METADATA_URI_V4",
        format!("{}/v4/test", meta.url()),
    )
    .args([
        "--service-id",
        &svc.id,
        "--container",
        "main",
        "--port",
        "80",
    ])
    .args([
        "--health-from-container",
        "main",
        "--health-interval",
        "200ms",
    ])
    .args(["--healthy-threshold", "1", "--unhealthy-threshold", "1"])
    .args(["--drain", "0"]);
    let mut sidecar = Sidecar::spawn(cmd);
    wait_until(LONG, "registered", || instances(&svc.id).contains_key(ID));
    assert_eq!(
        instances(&svc.id)[ID]
            .get("AWS_INIT_HEALTH_STATUS")
            .map(String::as_str),
        Some("UNHEALTHY"),
        "unknown health is not healthy"
    );
    wait_until(LONG, "UNHEALTHY in Cloud Map", || {
        health(&svc.id, ID).as_deref() == Some("UNHEALTHY")
    });
    set_main_health(
        &task,
        BASE,
        serde_json::json!({"status": "HEALTHY", "statusSince": "2026-09-26T17:47:10Z"}),
    );
    wait_until(LONG, "HEALTHY in Cloud Map", || {
        health(&svc.id, ID).as_deref() == Some("HEALTHY")
    });
    set_main_health(
        &task,
        BASE,
        serde_json::json!({"status": "UNHEALTHY", "exitCode": 1}),
    );
    wait_until(LONG, "UNHEALTHY again", || {
        health(&svc.id, ID).as_deref() == Some("UNHEALTHY")
    });
    sidecar.signal("TERM");
    assert_eq!(sidecar.wait(LONG), 0, "{}", sidecar.log());
    assert!(sidecar
        .log()
        .contains("ECS reports container main UNHEALTHY"));
    assert!(instances(&svc.id).is_empty());
}

#[test]
fn health_from_container_naming_no_container_or_with_health_url_exits_2() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let meta = ecs_metadata(
        read_data("ecs-v4/ecs-exporter-fargate-task-health.json"),
        SIDECAR_CONTAINER.to_string(),
        0,
    );
    let uri = format!("{}/v4/test", meta.url());
    let mut cmd = sidecar_command(&moto_url());
    cmd.env("ECS_CONTAINER_METADATA_URI_V4", &uri)
        .args([
            "--service-id",
            &svc.id,
            "--container",
            "main",
            "--port",
            "80",
        ])
        .env("CLOUDMAP_HEALTH_FROM_CONTAINER", "mian");
    let (code, log) = run_to_exit(cmd, LONG);
    assert_eq!(code, 2, "{log}");
    assert!(
        log.contains("--health-from-container (CLOUDMAP_HEALTH_FROM_CONTAINER) = \"mian\": the task has no such container"),
        "{log}"
    );

    let mut cmd = sidecar_command(&moto_url());
    cmd.env("ECS_CONTAINER_METADATA_URI_V4", &uri)
        .args(["--service-id", &svc.id, "--health-from-container", "main"])
        .args(["--health-url", "http://127.0.0.1:1/health"]);
    let (code, log) = run_to_exit(cmd, LONG);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("choose one health source"), "{log}");

    let mut cmd = sidecar_command(&moto_url());
    cmd.args(["--service-id", &svc.id, "--health-from-container", "main"]);
    let (code, log) = run_to_exit(cmd, LONG);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("ECS_CONTAINER_METADATA_URI_V4"), "{log}");
    assert!(instances(&svc.id).is_empty());
}

/// The EC2 systemd unit must let the graceful stop finish: SIGTERM, and systemd's SIGKILL only
/// after more than the default stop budget.
#[test]
fn the_systemd_unit_sends_sigterm_and_allows_the_stop_budget() {
    let unit = std::fs::read_to_string(format!(
        "{}/task-definitions/ec2/cloudmap-sidecar.service",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let value = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.trim().strip_prefix(&format!("{key}=")))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(value("KillSignal"), ["SIGTERM"]);
    assert_eq!(value("Restart"), ["on-failure"]);
    assert_eq!(
        value("RestartPreventExitStatus"),
        ["2"],
        "config errors do not loop"
    );
    let stop = cloudmap_sidecar::config::parse_duration(&value("TimeoutStopSec")[0]).unwrap();
    let budget =
        cloudmap_sidecar::config::parse_duration(cloudmap_sidecar::config::DEFAULT_STOP_TIMEOUT)
            .unwrap();
    assert!(
        stop > budget,
        "TimeoutStopSec {stop:?} must exceed --stop-timeout {budget:?}"
    );
    assert!(value("After").iter().any(|v| v == "network-online.target"));
    assert!(value("Wants").iter().any(|v| v == "network-online.target"));
    assert!(
        value("After").iter().any(|v| v.ends_with(".service")),
        "after the application"
    );
    assert_eq!(
        value("ExecStart"),
        ["/usr/local/bin/cloudmap-sidecar"],
        "no shell wrapper"
    );
    assert!(!value("EnvironmentFile").is_empty());
}

// EC2 answers the token PUT with 403 when instance metadata is turned off for the instance
// (`http-endpoint=disabled`): that can never work, so exit 2 at once rather than retrying until
// --start-timeout. With --ip given, only the instance ID is missing, and the hint says so.
#[test]
fn imds_refusing_the_session_token_exits_2_at_once_naming_what_to_set() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let forbidden = HttpFake::start(|_| Response::new(403, "").into());
    let mut cmd = sidecar_command(&moto_url());
    with_imds(&mut cmd, &forbidden.url());
    cmd.args([
        "--service-id",
        &svc.id,
        "--ip",
        "10.1.2.3",
        "--start-timeout",
        "60s",
    ]);
    let started = std::time::Instant::now();
    let (code, log) = run_to_exit(cmd, LONG);
    assert_eq!(code, 2, "{log}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "not retried until the deadline"
    );
    assert!(log.contains("refused a session token (HTTP 403"), "{log}");
    assert!(
        log.contains("set --instance-id (CLOUDMAP_INSTANCE_ID)"),
        "{log}"
    );
    assert!(!log.contains("set --ip"), "--ip is already set: {log}");
    assert!(
        forbidden
            .requests()
            .iter()
            .all(|r| r.method == "PUT" && r.path == "/latest/api/token"),
        "only the token was asked for"
    );
    assert!(instances(&svc.id).is_empty());
}
