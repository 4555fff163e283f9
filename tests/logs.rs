//! Logs through the real binary against the moto server: JSON lines with stable field names, one
//! per lifecycle transition, and no credentials even at `trace`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

const LONG: Duration = Duration::from_secs(30);

fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .map(|l| {
            serde_json::from_str::<Value>(l)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}\nwhole log:\n{log}"))
        })
        .collect()
}

fn events(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| l["event"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn json_logs_of_a_full_run_have_one_line_per_transition_with_stable_fields() {
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let app = App::start(true);
    let mut cmd = sidecar_command(&moto_url());
    cmd.args([
        "--service-id",
        &svc.id,
        "--instance-id",
        "log-1",
        "--ip",
        "10.5.0.1",
    ])
    .args([
        "--health-url",
        &app.health_url(),
        "--health-interval",
        "200ms",
        "--unhealthy-threshold",
        "1",
        "--drain",
        "0",
    ])
    .env("CLOUDMAP_LOG_FORMAT", "json");
    let mut sidecar = Sidecar::spawn(cmd);
    wait_until(LONG, "registered", || {
        health(&svc.id, "log-1").as_deref() == Some("HEALTHY")
    });
    app.set_healthy(false);
    wait_until(LONG, "UNHEALTHY reported", || {
        health(&svc.id, "log-1").as_deref() == Some("UNHEALTHY")
    });
    sidecar.signal("TERM");
    assert_eq!(sidecar.wait(LONG), 0, "{}", sidecar.log());

    let lines = json_lines(&sidecar.log());
    for l in &lines {
        assert!(l["timestamp"].is_string(), "{l}");
        assert!(l["level"].is_string(), "{l}");
        assert!(l["message"].is_string(), "{l}");
    }
    assert_eq!(
        events(&lines),
        [
            "starting",
            "service_resolved",
            "located",
            "registered",
            "serving",
            "health_changed",
            "health_reported",
            "deregistering",
            "deregistered",
            "stopped",
        ],
        "one line per transition, in order"
    );
    for l in lines.iter().filter(|l| {
        matches!(
            l["event"].as_str(),
            Some("registered" | "health_reported" | "deregistering" | "deregistered" | "stopped")
        )
    }) {
        assert_eq!(l["instance_id"], "log-1", "{l}");
        assert_eq!(l["service_id"], svc.id.as_str(), "{l}");
    }
    let reported = lines
        .iter()
        .find(|l| l["event"] == "health_reported")
        .unwrap();
    assert_eq!(reported["health"], "UNHEALTHY");
    // RegisterInstance and DeregisterInstance are asynchronous: each operation is named.
    let operations: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["operation_id"].as_str())
        .collect();
    assert_eq!(
        operations.len(),
        2,
        "register and deregister: {operations:?}"
    );
    assert_ne!(operations[0], operations[1]);
}

/// The secret key and session token never reach the log, whatever the level or command.
#[test]
fn credentials_never_appear_in_logs_even_at_trace() {
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzSECRETzKEY";
    const TOKEN: &str = "IQoJb3JpZ2luX2VjEXAMPLEsessionTOKENvalue";
    let svc = fresh_service(ServiceSpec::http_custom_health());
    let with_secret = |args: &[&str], format: &str| {
        let mut cmd = sidecar_command(&moto_url());
        cmd.env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("AWS_SESSION_TOKEN", TOKEN)
            .env("CLOUDMAP_LOG_LEVEL", "trace")
            .env("CLOUDMAP_LOG_FORMAT", format)
            .args(args);
        cmd
    };
    let mut sidecar = Sidecar::spawn(with_secret(
        &[
            "--service-id",
            &svc.id,
            "--instance-id",
            "secret-1",
            "--ip",
            "10.5.0.2",
            "--drain",
            "0",
        ],
        "json",
    ));
    wait_until(LONG, "registered", || {
        instances(&svc.id).contains_key("secret-1")
    });
    sidecar.signal("TERM");
    assert_eq!(sidecar.wait(LONG), 0, "{}", sidecar.log());
    let run_log = sidecar.log();

    let (code, oneshot_log) = run_to_exit(
        with_secret(
            &[
                "register",
                "--service-id",
                &svc.id,
                "--instance-id",
                "secret-2",
                "--ip",
                "10.5.0.3",
            ],
            "text",
        ),
        LONG,
    );
    assert_eq!(code, 0, "{oneshot_log}");

    for log in [&run_log, &oneshot_log] {
        // It is the SDK's trace output that could leak, so make sure it was there.
        assert!(
            log.contains("TRACE") && log.lines().count() > 50,
            "trace logging was on:\n{log}"
        );
        assert!(!log.contains(SECRET), "secret key in the log");
        assert!(!log.contains(TOKEN), "session token in the log");
    }
}

/// Configuration errors are found before the settings (the log format among them) validate; when
/// JSON was asked for, they still come as JSON lines with `event="config_error"`, so a CloudWatch
/// filter on that event sees the most common deploy failure too.
#[test]
fn configuration_errors_are_json_lines_when_json_is_asked_for() {
    let mut cmd = sidecar_command(&moto_url());
    cmd.env("CLOUDMAP_LOG_FORMAT", "json").args([
        "--service-id",
        "srv-abc",
        "--port",
        "0",
        "--health-interval",
        "soon",
    ]);
    let (code, log) = run_to_exit(cmd, Duration::from_secs(30));
    assert_eq!(code, 2, "{log}");
    let lines = json_lines(&log);
    assert_eq!(lines.len(), 2, "one line per error: {log}");
    for l in &lines {
        assert_eq!(l["event"], "config_error", "{l}");
        assert_eq!(l["level"], "ERROR", "{l}");
    }
    assert!(lines[0]["message"]
        .as_str()
        .unwrap()
        .contains("--port (CLOUDMAP_PORT) = \"0\""));
    assert!(lines[1]["message"]
        .as_str()
        .unwrap()
        .contains("--health-interval (CLOUDMAP_HEALTH_INTERVAL)"));
}
