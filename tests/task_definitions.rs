//! The files operators copy from `task-definitions/`: every JSON file there parses, and states the
//! facts the sidecar depends on. ECS accepts a task definition that gets these wrong and fails only
//! at run time (a SIGKILLed sidecar leaves its instance registered; a shell entrypoint swallows
//! SIGTERM; a missing IAM action shows up as an operation `FAIL` minutes into a deploy), so they are
//! checked here, against the code where the code is the source of truth:
//! - the sidecar's settings in each task definition are validated by the real settings parser;
//! - the IAM actions are derived from the Cloud Map calls found in `src/`;
//! - the Fargate example's sidecar, with its environment from the task definition, runs through the
//!   real binary against the moto server and a fake task metadata endpoint.
//!
//! The systemd unit (`task-definitions/ec2/*.service`) is not JSON and is not checked here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cloudmap_sidecar::config;
use serde_json::Value;

/// Each ECS task definition, with the Cloud Map service definition (`aws servicediscovery
/// create-service --cli-input-json`) it registers in.
const TASK_DEFINITIONS: [(&str, &str); 2] = [
    ("fargate-awsvpc.json", "cloudmap/service-a.json"),
    ("ec2-bridge.json", "cloudmap/service-srv.json"),
];
/// Permission policies: the ECS task role's and the plain-EC2 instance role's.
const TASK_ROLE_POLICY: &str = "iam/task-role-policy.json";
const ROLE_POLICIES: [&str; 2] = [TASK_ROLE_POLICY, "iam/ec2-instance-role-policy.json"];
/// Trust policies, with the service principal that may assume the role.
const TRUST_POLICIES: [(&str, &str); 2] = [
    ("iam/task-role-trust-policy.json", "ecs-tasks.amazonaws.com"),
    (
        "iam/ec2-instance-role-trust-policy.json",
        "ec2.amazonaws.com",
    ),
];

/// The stale-instance sweeper's permission policy and scheduled task definition.
const SWEEPER_POLICY: &str = "iam/sweeper-policy.json";
const SWEEPER_TASK: &str = "sweeper-scheduled-task.json";
/// Where ECS SIGKILLs: the largest container `stopTimeout` it accepts.
const ECS_MAX_STOP_TIMEOUT_S: u64 = 120;
/// ECS's `stopTimeout` when a container does not set one.
const ECS_DEFAULT_STOP_TIMEOUT_S: u64 = 30;
/// Between the sidecar's last log line and ECS's SIGKILL: process exit, log flush, and the agent's
/// own timing. The sidecar's budget runs from its receipt of SIGTERM, ECS's from sending it.
const STOP_MARGIN: Duration = Duration::from_secs(3);
/// What the examples allow for deregistration (the call, then following the asynchronous operation
/// until Route 53 has the change) before the drain starts, so the drain is not cut short.
const DEREGISTRATION_ALLOWANCE: Duration = Duration::from_secs(10);

/// Every Cloud Map API operation, as the Rust SDK's fluent method names them. The IAM action is the
/// same name in PascalCase.
const CLOUD_MAP_OPERATIONS: &[&str] = &[
    "create_http_namespace",
    "create_private_dns_namespace",
    "create_public_dns_namespace",
    "create_service",
    "delete_namespace",
    "delete_service",
    "delete_service_attributes",
    "deregister_instance",
    "discover_instances",
    "discover_instances_revision",
    "get_instance",
    "get_instances_health_status",
    "get_namespace",
    "get_operation",
    "get_service",
    "get_service_attributes",
    "list_instances",
    "list_namespaces",
    "list_operations",
    "list_services",
    "list_tags_for_resource",
    "register_instance",
    "tag_resource",
    "untag_resource",
    "update_http_namespace",
    "update_instance_custom_health_status",
    "update_private_dns_namespace",
    "update_public_dns_namespace",
    "update_service",
    "update_service_attributes",
];

/// Calls the code may make that the sidecar's role does not need: `discover` (DiscoverInstances,
/// and GetNamespace to name the namespace in its output) is a one-shot command for test harnesses
/// and clients, run with their own credentials. Allowed in a role policy, not required.
const NOT_FOR_THE_SIDECAR_ROLE: &[&str] = &["discover_instances", "get_namespace"];

/// Route 53 rights Cloud Map uses on the caller's behalf in DNS namespaces (missing ones surface
/// as an operation `FAIL` with `ACCESS_DENIED`, not as an error of the call itself).
const ROUTE53_FOR: &[(&str, &[&str])] = &[
    (
        "RegisterInstance",
        &[
            "route53:ChangeResourceRecordSets",
            "route53:GetHealthCheck",
            "route53:CreateHealthCheck",
            "route53:UpdateHealthCheck",
        ],
    ),
    (
        "DeregisterInstance",
        &[
            "route53:ChangeResourceRecordSets",
            "route53:GetHealthCheck",
            "route53:DeleteHealthCheck",
            "route53:UpdateHealthCheck",
        ],
    ),
];

/// Actions IAM cannot scope to a resource: the only ones allowed on `"Resource": "*"`.
const NO_RESOURCE_LEVEL: &[&str] = &[
    "servicediscovery:GetOperation",
    "servicediscovery:ListNamespaces",
    "servicediscovery:ListServices",
    "servicediscovery:DiscoverInstances",
    "route53:CreateHealthCheck",
];

// ---------------------------------------------------------------------------------------------
// Helpers

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("task-definitions")
}

fn files_with(root: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == ext) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn load(rel: &str) -> Value {
    let path = dir().join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{rel}: not valid JSON: {e}"))
}

fn str_list(v: &Value) -> Vec<String> {
    match v {
        Value::Null => vec![],
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().expect("a list of strings").to_string())
            .collect(),
        other => panic!("expected a string or a list of strings, got {other}"),
    }
}

fn containers(td: &Value) -> &Vec<Value> {
    td["containerDefinitions"]
        .as_array()
        .expect("containerDefinitions")
}

fn name(c: &Value) -> &str {
    c["name"].as_str().expect("container name")
}

/// The sidecar: the one container running the cloudmap-sidecar image.
fn sidecar<'a>(file: &str, td: &'a Value) -> &'a Value {
    let found: Vec<&Value> = containers(td)
        .iter()
        .filter(|c| {
            c["image"]
                .as_str()
                .unwrap_or("")
                .contains("cloudmap-sidecar")
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{file}: expected exactly one cloudmap-sidecar container"
    );
    found[0]
}

fn environment(c: &Value) -> BTreeMap<String, String> {
    c["environment"]
        .as_array()
        .map(|vars| {
            vars.iter()
                .map(|v| {
                    (
                        v["name"].as_str().unwrap().to_string(),
                        v["value"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The sidecar's arguments as the image runs them: ENTRYPOINT `/cloudmap-sidecar`, then the task
/// definition's `command`, or the image's CMD `run`.
fn sidecar_args(c: &Value) -> Vec<String> {
    let mut args = vec!["cloudmap-sidecar".to_string()];
    let command = str_list(&c["command"]);
    if command.is_empty() {
        args.push("run".to_string());
    } else {
        args.extend(command);
    }
    args
}

/// The sidecar's stop budget: `--stop-timeout`, else `CLOUDMAP_STOP_TIMEOUT`, else the default.
fn sidecar_stop_budget(c: &Value) -> Duration {
    let args = sidecar_args(c);
    let from_args = args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix("--stop-timeout=")
            .map(str::to_string)
            .or_else(|| (a == "--stop-timeout").then(|| args[i + 1].clone()))
    });
    let value = from_args
        .or_else(|| environment(c).get("CLOUDMAP_STOP_TIMEOUT").cloned())
        .unwrap_or_else(|| config::DEFAULT_STOP_TIMEOUT.to_string());
    config::parse_duration(&value).unwrap_or_else(|e| panic!("stop timeout {value:?}: {e}"))
}

fn pascal(snake: &str) -> String {
    snake
        .split('_')
        .map(|w| {
            let mut cs = w.chars();
            cs.next()
                .map(|f| f.to_ascii_uppercase().to_string() + cs.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// The Cloud Map operations called in `src/`: the SDK's fluent builders are `.operation()` with no
/// arguments, which is how they are found.
/// The sweeper's own code: its calls belong to its policy, not to the sidecar's roles.
fn is_sweeper(path: &Path) -> bool {
    path.components().any(|c| c.as_os_str() == "sweeper")
        || path.ends_with("bin/cloudmap-sweeper.rs")
}

/// The source of the sidecar (`sweeper == false`) or of the sweeper.
fn source_text(sweeper: bool) -> String {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    files_with(&src, "rs")
        .iter()
        .filter(|p| is_sweeper(p) == sweeper)
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect()
}

fn calls_in(text: &str) -> BTreeSet<&'static str> {
    CLOUD_MAP_OPERATIONS
        .iter()
        .copied()
        .filter(|op| text.contains(&format!(".{op}()")))
        .collect()
}

fn calls_in_src() -> BTreeSet<&'static str> {
    calls_in(&source_text(false))
}

struct Statement {
    actions: Vec<String>,
    resources: Vec<String>,
}

fn statements(file: &str) -> Vec<Statement> {
    let policy = load(file);
    assert_eq!(policy["Version"], "2012-10-17", "{file}: policy Version");
    policy["Statement"]
        .as_array()
        .unwrap_or_else(|| panic!("{file}: Statement must be a list"))
        .iter()
        .map(|s| {
            assert_eq!(s["Effect"], "Allow", "{file}: {s}");
            for negated in ["NotAction", "NotResource"] {
                assert!(
                    s.get(negated).is_none(),
                    "{file}: {negated} grants too much: {s}"
                );
            }
            Statement {
                actions: str_list(&s["Action"]),
                resources: str_list(&s["Resource"]),
            }
        })
        .collect()
}

fn is_service_arn(r: &str) -> bool {
    // arn:aws:servicediscovery:<region>:<account>:service/srv-<id>
    let parts: Vec<&str> = r.splitn(6, ':').collect();
    parts.len() == 6
        && parts[..3] == ["arn", "aws", "servicediscovery"]
        && !parts[3].is_empty()
        && parts[4].len() == 12
        && parts[4].chars().all(|c| c.is_ascii_digit())
        && parts[5]
            .strip_prefix("service/srv-")
            .is_some_and(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()))
}

fn is_hosted_zone_arn(r: &str) -> bool {
    r.strip_prefix("arn:aws:route53:::hostedzone/")
        .is_some_and(|z| !z.is_empty() && z.chars().all(|c| c.is_ascii_alphanumeric()))
}

// ---------------------------------------------------------------------------------------------
// Every file

#[test]
fn every_json_file_under_task_definitions_parses_and_is_checked_here() {
    let listed: BTreeSet<String> = TASK_DEFINITIONS
        .iter()
        .flat_map(|(td, svc)| [td.to_string(), svc.to_string()])
        .chain(ROLE_POLICIES.iter().map(|p| p.to_string()))
        .chain(TRUST_POLICIES.iter().map(|(p, _)| p.to_string()))
        .chain([SWEEPER_POLICY, SWEEPER_TASK].map(str::to_string))
        .collect();
    let found: BTreeSet<String> = files_with(&dir(), "json")
        .iter()
        .map(|p| {
            let rel = p
                .strip_prefix(dir())
                .unwrap()
                .to_string_lossy()
                .into_owned();
            load(&rel);
            rel
        })
        .collect();
    assert_eq!(
        found, listed,
        "every JSON file in task-definitions/ must be listed in this test, so that it is checked"
    );
}

// ---------------------------------------------------------------------------------------------
// Task definitions

/// Container dependencies are reversed on shutdown: depending on the app `HEALTHY` makes the
/// sidecar register only once the app serves, and deregister and drain before ECS stops the app.
#[test]
fn the_sidecar_depends_on_the_app_being_healthy_so_it_registers_after_and_stops_before_it() {
    for (file, _) in TASK_DEFINITIONS {
        let td = load(file);
        let sc = sidecar(file, &td);
        let deps = sc["dependsOn"]
            .as_array()
            .unwrap_or_else(|| panic!("{file}: the sidecar has no dependsOn"));
        assert_eq!(deps.len(), 1, "{file}: the sidecar depends on the app only");
        assert_eq!(
            deps[0]["condition"], "HEALTHY",
            "{file}: dependsOn condition"
        );
        let app_name = deps[0]["containerName"].as_str().unwrap();
        let app = containers(&td)
            .iter()
            .find(|c| name(c) == app_name)
            .unwrap_or_else(|| {
                panic!("{file}: dependsOn names {app_name}, which is not in the task")
            });
        assert!(
            app["healthCheck"]["command"].is_array(),
            "{file}: {app_name} needs a healthCheck for the HEALTHY condition"
        );
        assert_eq!(app["essential"], true, "{file}: {app_name} is essential");
        assert!(
            app["dependsOn"]
                .as_array()
                .is_none_or(|d| d.iter().all(|d| d["containerName"] != name(sc))),
            "{file}: the app must not depend on the sidecar (a cycle)"
        );
        // The sidecar names its application explicitly: a third container added later (a log
        // router, an agent) would otherwise stop it at start-up with "several possible containers".
        assert_eq!(
            environment(sc)
                .get("CLOUDMAP_CONTAINER")
                .map(String::as_str),
            Some(app_name),
            "{file}: CLOUDMAP_CONTAINER"
        );
        // A sidecar that dies leaves Cloud Map unmanaged: the task must go with it.
        assert_eq!(sc["essential"], true, "{file}: the sidecar is essential");
    }
}

/// A shell as PID 1 does not forward SIGTERM: the sidecar would never deregister, and ECS would
/// SIGKILL it at stopTimeout. The image is `scratch`: there is no shell to run anyway.
#[test]
fn no_container_is_started_through_a_shell_and_the_sidecar_runs_its_binary_directly() {
    const SHELLS: [&str; 6] = ["sh", "bash", "ash", "dash", "zsh", "busybox"];
    for (file, _) in TASK_DEFINITIONS {
        let td = load(file);
        for c in containers(&td) {
            for field in ["entryPoint", "command"] {
                let argv = str_list(&c[field]);
                let shell = argv.first().is_some_and(|a| {
                    SHELLS.contains(&a.rsplit('/').next().unwrap_or(a)) || a.contains(' ')
                });
                assert!(
                    !shell && !argv.iter().any(|a| a == "-c"),
                    "{file}: container {} has a shell {field}: {argv:?}",
                    name(c)
                );
            }
            if let Some(hc) = c["healthCheck"]["command"].as_array() {
                assert!(
                    hc[0] == "CMD" || hc[0] == "CMD-SHELL",
                    "{file}: container {} healthCheck must start with CMD or CMD-SHELL",
                    name(c)
                );
            }
        }
        let sc = sidecar(file, &td);
        let entry = str_list(&sc["entryPoint"]);
        assert!(
            entry.is_empty() || entry == ["/cloudmap-sidecar"],
            "{file}: the sidecar's entryPoint must be the image's (/cloudmap-sidecar), got {entry:?}"
        );
        assert_eq!(
            str_list(&sc["healthCheck"]["command"]),
            ["CMD", "/cloudmap-sidecar", "healthcheck"],
            "{file}: the sidecar's health check runs the binary itself (no shell, no curl in scratch)"
        );
    }
}

/// ECS sends SIGTERM, waits the container's `stopTimeout`, then SIGKILLs. The sidecar must finish
/// deregistration and drain inside that, and its own default drain (the service's DNS TTL) must
/// fit in its budget after deregistration.
#[test]
fn sidecar_stop_timeout_covers_its_stop_budget_which_covers_deregistration_and_the_dns_ttl() {
    for (file, service_file) in TASK_DEFINITIONS {
        let td = load(file);
        let sc = sidecar(file, &td);
        let budget = sidecar_stop_budget(sc);
        let ecs = sc["stopTimeout"]
            .as_u64()
            .unwrap_or(ECS_DEFAULT_STOP_TIMEOUT_S);
        assert!(
            ecs <= ECS_MAX_STOP_TIMEOUT_S,
            "{file}: stopTimeout {ecs} s is above ECS's maximum of {ECS_MAX_STOP_TIMEOUT_S} s"
        );
        assert!(
            Duration::from_secs(ecs) >= budget + STOP_MARGIN,
            "{file}: the sidecar's stopTimeout ({ecs} s) must exceed its stop budget ({budget:?}) by {STOP_MARGIN:?}"
        );
        let service = load(service_file);
        let max_ttl = service["DnsConfig"]["DnsRecords"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| Duration::from_secs(r["TTL"].as_u64().unwrap()))
            .max()
            .unwrap_or_default();
        let drain = environment(sc)
            .get("CLOUDMAP_DRAIN")
            .map(|d| config::parse_duration(d).unwrap())
            .unwrap_or(max_ttl);
        assert!(
            budget >= drain + DEREGISTRATION_ALLOWANCE,
            "{file}: a stop budget of {budget:?} cuts the drain ({drain:?}, the TTL of {service_file}) short after {DEREGISTRATION_ALLOWANCE:?} of deregistration"
        );
    }
}

/// The real settings parser accepts the sidecar's environment and command as ECS passes them, and
/// every `CLOUDMAP_*` name is one the sidecar reads (a misspelt variable is silently ignored).
#[test]
fn sidecar_settings_in_every_task_definition_are_valid_for_the_real_parser() {
    let cmd = config::command();
    let known: BTreeSet<String> = std::iter::once(&cmd)
        .chain(cmd.get_subcommands())
        .flat_map(|c| c.get_arguments())
        .filter_map(|a| a.get_long())
        .filter(|l| *l != "help" && *l != "version")
        .map(config::env_name)
        .collect();
    assert!(known.contains("CLOUDMAP_SERVICE_ID"), "{known:?}");
    for (file, _) in TASK_DEFINITIONS {
        let td = load(file);
        let sc = sidecar(file, &td);
        let env = environment(sc);
        for var in env.keys().filter(|k| k.starts_with(config::ENV_PREFIX)) {
            assert!(
                known.contains(var),
                "{file}: {var} is not a setting of the sidecar"
            );
        }
        assert!(
            env.contains_key("CLOUDMAP_SERVICE_ID")
                || (env.contains_key("CLOUDMAP_NAMESPACE") && env.contains_key("CLOUDMAP_SERVICE")),
            "{file}: the sidecar needs CLOUDMAP_SERVICE_ID, or CLOUDMAP_NAMESPACE and CLOUDMAP_SERVICE"
        );
        if let Err(e) = config::parse(sidecar_args(sc), &env) {
            panic!("{file}: the sidecar's settings are rejected: {e:?}");
        }
    }
}

#[test]
fn every_container_logs_to_cloudwatch_with_awslogs() {
    for (file, _) in TASK_DEFINITIONS {
        let td = load(file);
        for c in containers(&td) {
            let log = &c["logConfiguration"];
            assert_eq!(log["logDriver"], "awslogs", "{file}: {}", name(c));
            for option in ["awslogs-group", "awslogs-region", "awslogs-stream-prefix"] {
                assert!(
                    log["options"][option].is_string(),
                    "{file}: {} has no {option}",
                    name(c)
                );
            }
        }
        assert_eq!(
            environment(sidecar(file, &td))
                .get("CLOUDMAP_LOG_FORMAT")
                .map(String::as_str),
            Some("json"),
            "{file}: JSON logs for CloudWatch"
        );
    }
}

#[test]
fn fargate_example_is_awsvpc_and_publishes_the_task_address_in_a_records() {
    let file = "fargate-awsvpc.json";
    let td = load(file);
    assert_eq!(td["networkMode"], "awsvpc");
    assert_eq!(str_list(&td["requiresCompatibilities"]), ["FARGATE"]);
    assert!(
        td["taskRoleArn"].is_string(),
        "{file}: the sidecar's credentials come from the task role"
    );
    let service = load("cloudmap/service-a.json");
    let types: Vec<&str> = service["DnsConfig"]["DnsRecords"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["Type"].as_str().unwrap())
        .collect();
    assert!(types.contains(&"A"), "{types:?}");
    // awsvpc: every container of the task shares one network namespace, so loopback is the app.
    let url = environment(sidecar(file, &td))["CLOUDMAP_HEALTH_URL"].clone();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
}

/// Bridge mode: the app's container port is mapped to a dynamic host port, so only SRV records
/// (host IP + port) can publish it; the sidecar is told the container port to look the host port up.
#[test]
fn bridge_example_publishes_the_dynamic_host_port_through_an_srv_service() {
    let file = "ec2-bridge.json";
    let td = load(file);
    assert_eq!(td["networkMode"], "bridge");
    assert_eq!(str_list(&td["requiresCompatibilities"]), ["EC2"]);
    let sc = sidecar(file, &td);
    let env = environment(sc);
    let app_name = env["CLOUDMAP_CONTAINER"].as_str();
    let app = containers(&td)
        .iter()
        .find(|c| name(c) == app_name)
        .unwrap();
    let port: u64 = env["CLOUDMAP_PORT"].parse().unwrap();
    let mapping = app["portMappings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["containerPort"] == port)
        .unwrap_or_else(|| panic!("{file}: {app_name} maps no container port {port}"));
    assert_eq!(mapping["hostPort"], 0, "{file}: a dynamic host port");
    let service = load("cloudmap/service-srv.json");
    let types: Vec<&str> = service["DnsConfig"]["DnsRecords"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["Type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["SRV"],
        "A records would send clients to the host's port {port}"
    );
    // Bridge containers each have their own loopback: the sidecar reaches the app through a link.
    let url = &env["CLOUDMAP_HEALTH_URL"];
    let host = url
        .strip_prefix("http://")
        .and_then(|r| r.split([':', '/']).next())
        .unwrap();
    assert!(
        str_list(&sc["links"]).iter().any(|l| l.split(':').next_back() == Some(host)),
        "{file}: health URL host {host} must be a link to the app (127.0.0.1 is the sidecar's own loopback)"
    );
}

#[test]
fn cloud_map_services_have_custom_health_and_dns_records() {
    for (_, file) in TASK_DEFINITIONS {
        let service = load(file);
        assert!(
            service["HealthCheckCustomConfig"].is_object(),
            "{file}: the sidecar reports health with UpdateInstanceCustomHealthStatus, which needs HealthCheckCustomConfig"
        );
        assert!(
            service.get("HealthCheckConfig").is_none(),
            "{file}: a Route 53 health check cannot reach private addresses"
        );
        let records = service["DnsConfig"]["DnsRecords"].as_array().unwrap();
        assert!(!records.is_empty(), "{file}");
        for r in records {
            assert!(r["TTL"].as_u64().is_some_and(|t| t > 0), "{file}: {r}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// IAM

/// Every Cloud Map call in `src/` has its action in each role policy, and each policy has no
/// Cloud Map action the code does not call; the Route 53 actions are exactly those Cloud Map needs
/// for the register/deregister actions present.
#[test]
fn policy_actions_match_the_calls_the_code_makes() {
    let calls = calls_in_src();
    for must in ["register_instance", "deregister_instance", "get_operation"] {
        assert!(
            calls.contains(must),
            "the scan of src/ did not find .{must}(): {calls:?}"
        );
    }
    let required: BTreeSet<String> = calls
        .iter()
        .filter(|c| !NOT_FOR_THE_SIDECAR_ROLE.contains(c))
        .map(|c| format!("servicediscovery:{}", pascal(c)))
        .collect();
    let allowed: BTreeSet<String> = calls
        .iter()
        .map(|c| format!("servicediscovery:{}", pascal(c)))
        .collect();
    for file in ROLE_POLICIES {
        let actions: BTreeSet<String> = statements(file)
            .into_iter()
            .flat_map(|s| s.actions)
            .collect();
        for a in &actions {
            assert!(!a.contains('*'), "{file}: wildcard action {a}");
        }
        let cloud_map: BTreeSet<String> = actions
            .iter()
            .filter(|a| a.starts_with("servicediscovery:"))
            .cloned()
            .collect();
        let missing: Vec<&String> = required.difference(&cloud_map).collect();
        assert!(
            missing.is_empty(),
            "{file}: the code calls these, the policy lacks them: {missing:?}"
        );
        let unused: Vec<&String> = cloud_map.difference(&allowed).collect();
        assert!(
            unused.is_empty(),
            "{file}: no call in src/ needs these: {unused:?}"
        );

        let route53_wanted: BTreeSet<String> = ROUTE53_FOR
            .iter()
            .filter(|(sd, _)| cloud_map.contains(&format!("servicediscovery:{sd}")))
            .flat_map(|(_, r53)| r53.iter().map(|a| a.to_string()))
            .collect();
        let other: BTreeSet<String> = actions.difference(&cloud_map).cloned().collect();
        assert_eq!(
            other, route53_wanted,
            "{file}: the non-Cloud Map actions must be the Route 53 ones DNS namespaces need"
        );
    }
}

/// Register, deregister and health (and GetService) are scoped to service ARNs; Route 53 record
/// changes to a hosted zone; `*` only where IAM has no resource-level permissions.
#[test]
fn policy_resources_are_scoped() {
    for file in ROLE_POLICIES {
        for s in statements(file) {
            assert!(
                !s.resources.is_empty(),
                "{file}: statement without Resource"
            );
            for action in &s.actions {
                for r in &s.resources {
                    let ok = if r == "*" {
                        NO_RESOURCE_LEVEL.contains(&action.as_str())
                    } else if action.starts_with("servicediscovery:") {
                        is_service_arn(r)
                    } else if action == "route53:ChangeResourceRecordSets" {
                        is_hosted_zone_arn(r)
                    } else {
                        r == "arn:aws:route53:::healthcheck/*"
                    };
                    assert!(ok, "{file}: {action} on {r} is not scoped as it can be");
                }
            }
        }
    }
}

/// The service each ECS example registers in is one its task role may write to.
#[test]
fn the_task_role_policy_covers_the_service_of_every_ecs_example() {
    let scoped: Vec<String> = statements(TASK_ROLE_POLICY)
        .into_iter()
        .filter(|s| {
            s.actions
                .iter()
                .any(|a| a == "servicediscovery:RegisterInstance")
        })
        .flat_map(|s| s.resources)
        .collect();
    for (file, _) in TASK_DEFINITIONS {
        let td = load(file);
        let id = environment(sidecar(file, &td))["CLOUDMAP_SERVICE_ID"].clone();
        assert!(
            scoped
                .iter()
                .any(|r| r.ends_with(&format!(":service/{id}"))),
            "{file}: {TASK_ROLE_POLICY} does not allow RegisterInstance on {id} ({scoped:?})"
        );
    }
}

#[test]
fn trust_policies_let_only_the_intended_service_assume_the_role() {
    for (file, principal) in TRUST_POLICIES {
        let policy = load(file);
        let stmts = policy["Statement"].as_array().unwrap();
        assert_eq!(stmts.len(), 1, "{file}");
        assert_eq!(stmts[0]["Effect"], "Allow");
        assert_eq!(stmts[0]["Action"], "sts:AssumeRole");
        assert_eq!(
            stmts[0]["Principal"],
            serde_json::json!({ "Service": principal }),
            "{file}"
        );
    }
}

#[test]
fn the_iam_action_of_an_sdk_call_is_its_name_in_pascal_case() {
    assert_eq!(
        pascal("update_instance_custom_health_status"),
        "UpdateInstanceCustomHealthStatus"
    );
    assert_eq!(pascal("get_operation"), "GetOperation");
}

// ---------------------------------------------------------------------------------------------
// The example, run

/// Task metadata v4 for the Fargate example as ECS would serve it: its two containers, by their
/// names in the task definition, in one awsvpc network.
fn fargate_example_task(td: &Value, ipv4: &str) -> String {
    let family = td["family"].as_str().unwrap();
    let task_arn = "arn:aws:ecs:us-east-1:123456789012:task/prod/0123456789abcdef0123456789abcdef";
    let containers: Vec<Value> = containers(td)
        .iter()
        .map(|c| {
            let ports: Vec<Value> = c["portMappings"]
                .as_array()
                .map(|m| {
                    m.iter()
                        .map(|p| {
                            serde_json::json!({
                                "ContainerPort": p["containerPort"],
                                "Protocol": p["protocol"],
                                "HostPort": p["containerPort"],
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            serde_json::json!({
                "DockerId": if name(c) == "cloudmap-sidecar" { "cafe0000sidecar".to_string() } else { format!("d0cker{}", name(c)) },
                "Name": name(c),
                "Type": "NORMAL",
                "KnownStatus": "RUNNING",
                "DesiredStatus": "RUNNING",
                "Ports": ports,
                "Networks": [{ "NetworkMode": "awsvpc", "IPv4Addresses": [ipv4] }],
            })
        })
        .collect();
    serde_json::json!({
        "Cluster": "arn:aws:ecs:us-east-1:123456789012:cluster/prod",
        "TaskARN": task_arn,
        "Family": family,
        "Revision": "1",
        "AvailabilityZone": "us-east-1a",
        "LaunchType": "FARGATE",
        "Containers": containers,
    })
    .to_string()
}

/// The example as a user would try it against the emulator: the sidecar's environment is the task
/// definition's, except the service ID (a service created from `cloudmap/service-a.json` in moto)
/// and the health URL (the stand-in application's loopback port). It registers the task with the
/// app's address and port, deregisters on SIGTERM and exits 0.
#[test]
fn fargate_example_sidecar_registers_and_deregisters_against_the_emulator() {
    let file = "fargate-awsvpc.json";
    let td = load(file);
    let sc = sidecar(file, &td);
    let service_def = load("cloudmap/service-a.json");
    let records = service_def["DnsConfig"]["DnsRecords"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let kind =
                aws_sdk_servicediscovery::types::RecordType::from(r["Type"].as_str().unwrap());
            (kind, r["TTL"].as_i64().unwrap())
        })
        .collect();
    let svc = common::fresh_service(common::ServiceSpec {
        custom_health: service_def["HealthCheckCustomConfig"].is_object(),
        records,
    });
    let app = common::App::start(true);
    let meta = common::ecs_metadata(
        fargate_example_task(&td, "10.1.2.3"),
        common::SIDECAR_CONTAINER.to_string(),
        0,
    );

    let mut cmd = common::sidecar_command(&common::moto_url());
    let mut env = environment(sc);
    env.insert("CLOUDMAP_SERVICE_ID".into(), svc.id.clone());
    env.insert("CLOUDMAP_HEALTH_URL".into(), app.health_url());
    cmd.envs(&env)
        .env(
            "ECS_CONTAINER_METADATA_URI_V4",
            format!("{}/v4/test", meta.url()),
        )
        .args(&sidecar_args(sc)[1..]);
    let mut sidecar = common::Sidecar::spawn(cmd);

    let task_id = "0123456789abcdef0123456789abcdef";
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while !common::instances(&svc.id).contains_key(task_id) {
        assert!(
            std::time::Instant::now() < end,
            "task {task_id} not registered within 30 s; sidecar log:\n{}",
            sidecar.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let attrs = common::instances(&svc.id)[task_id].clone();
    assert_eq!(
        attrs.get("AWS_INSTANCE_IPV4").map(String::as_str),
        Some("10.1.2.3")
    );
    assert_eq!(
        attrs.get("AWS_INSTANCE_PORT").map(String::as_str),
        Some("8080")
    );
    assert_eq!(
        attrs.get("ECS_TASK_DEFINITION_FAMILY").map(String::as_str),
        Some("ap")
    );

    sidecar.signal("TERM");
    // The drain lasts the service's TTL; a second SIGTERM ends it, as the README says.
    sidecar.wait_for_log(Duration::from_secs(30), "draining");
    assert!(
        !common::instances(&svc.id).contains_key(task_id),
        "deregistered before the drain"
    );
    sidecar.signal("TERM");
    assert_eq!(
        sidecar.wait(Duration::from_secs(30)),
        0,
        "{}",
        sidecar.log()
    );
}

// ---------------------------------------------------------------------------------------------
// The sweeper

/// The sweeper's policy has exactly what its code calls: its own Cloud Map calls, the
/// deregistration it makes through the registry (which follows the operation), the owner look-ups,
/// and the Route 53 actions deregistration needs in DNS namespaces.
#[test]
fn the_sweeper_policy_has_exactly_the_actions_the_sweeper_uses() {
    let text = source_text(true);
    let mut calls = calls_in(&text);
    assert!(
        calls.contains("list_instances"),
        "the scan of src/sweeper found no .list_instances(): {calls:?}"
    );
    assert!(
        text.contains(".deregister("),
        "the sweeper deregisters through the registry"
    );
    calls.extend(["deregister_instance", "get_operation"]);
    let mut expected: BTreeSet<String> = calls
        .iter()
        .map(|c| format!("servicediscovery:{}", pascal(c)))
        .collect();
    assert!(
        text.contains(".describe_tasks()"),
        "owner look-up for tasks"
    );
    expected.insert("ecs:DescribeTasks".to_string());
    assert!(
        text.contains("DescribeInstances"),
        "owner look-up for EC2 instances"
    );
    expected.insert("ec2:DescribeInstances".to_string());
    let (_, route53) = ROUTE53_FOR
        .iter()
        .find(|(sd, _)| *sd == "DeregisterInstance")
        .unwrap();
    expected.extend(route53.iter().map(|a| a.to_string()));
    let actions: BTreeSet<String> = statements(SWEEPER_POLICY)
        .into_iter()
        .flat_map(|s| s.actions)
        .collect();
    assert_eq!(actions, expected, "{SWEEPER_POLICY}");
}

/// The scheduled sweeper runs the image's own entrypoint (no shell) against a real service ID.
#[test]
fn the_sweeper_task_runs_the_binary_without_a_shell() {
    let td = load(SWEEPER_TASK);
    for c in containers(&td) {
        for key in ["entryPoint", "command"] {
            let words = str_list(&c[key]);
            assert!(
                !words
                    .iter()
                    .any(|w| w == "sh" || w == "/bin/sh" || w == "bash" || w == "-c"),
                "{SWEEPER_TASK}: {key} runs a shell: {words:?}"
            );
        }
        let env = environment(c);
        assert!(
            env.get("CLOUDMAP_SERVICE_ID")
                .is_some_and(|id| id.starts_with("srv-")),
            "{SWEEPER_TASK}: CLOUDMAP_SERVICE_ID"
        );
    }
    assert!(td["taskRoleArn"]
        .as_str()
        .is_some_and(|r| r.contains("sweeper")));
}
