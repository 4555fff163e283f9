//! The state file that `healthcheck` reads, so that a container health check needs neither a
//! shell nor curl.
//!
//! Why a file and not a loopback listener: `run` writes it only at lifecycle transitions (a
//! handful of writes in a task's life) and it costs nothing in between, whereas a listener keeps
//! a socket and an accept task alive for the whole life of the sidecar, and needs a port that
//! must not collide with the application's (in awsvpc mode every container of the task shares
//! the network namespace). The file is replaced atomically (write beside it, then rename), so a
//! reader sees the old state or the new one, never half of one.
//!
//! `run` does not call into this module: [`StateLayer`] watches the lifecycle's own log events
//! (the `event` field: `registered`, `health_reported`, `health_report_failed`, `deregistered`,
//! `stopped`…), so the state machine needs no hook, and the events are a tested contract anyway.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// Where the sidecar is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Start-up: nothing registered yet.
    Starting,
    /// Registered; health is being reported.
    Registered,
    /// Not registered while running (a service without custom health, application unhealthy).
    Deregistered,
    /// Stop requested: deregistering and draining.
    Stopping,
    /// Exited cleanly, or failed without leaving anything registered.
    Stopped,
    /// Exited with the instance possibly still registered.
    LeftBehind,
}

/// What the file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Process ID of `run`: a file left by a process that is gone is not believed.
    pub pid: u32,
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_id: Option<String>,
    /// The last status Cloud Map was told.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    /// The last health report failed and is being retried.
    #[serde(default)]
    pub report_failed: bool,
}

impl State {
    pub fn starting() -> State {
        State {
            pid: std::process::id(),
            phase: Phase::Starting,
            instance_id: None,
            service_id: None,
            health: None,
            report_failed: false,
        }
    }

    /// Apply one lifecycle event; `true` when something changed.
    pub fn apply(&mut self, e: &Observed) -> bool {
        let before = self.clone();
        if e.instance_id.is_some() {
            self.instance_id.clone_from(&e.instance_id);
        }
        if e.service_id.is_some() {
            self.service_id.clone_from(&e.service_id);
        }
        match e.event.as_str() {
            "starting" => *self = State::starting(),
            "registered" => {
                self.phase = Phase::Registered;
                self.report_failed = false;
                if e.health.is_some() {
                    self.health.clone_from(&e.health);
                }
            }
            "health_reported" => {
                self.report_failed = false;
                self.health.clone_from(&e.health);
            }
            "health_report_failed" => self.report_failed = true,
            "deregistering" => self.phase = Phase::Stopping,
            // While running (no custom health, application unhealthy), or while stopping.
            "deregistered" if self.phase == Phase::Registered => {
                self.phase = Phase::Deregistered;
                self.report_failed = false;
            }
            "stopped" | "start_failed" | "config_error" => self.phase = Phase::Stopped,
            "left_behind" => self.phase = Phase::LeftBehind,
            _ => {}
        }
        *self != before
    }

    /// `Ok(summary)` when a container health check should pass.
    pub fn verdict(&self, pid_alive: impl Fn(u32) -> bool) -> Result<String, String> {
        let who = format!(
            "instance {} in service {}",
            self.instance_id.as_deref().unwrap_or("?"),
            self.service_id.as_deref().unwrap_or("?")
        );
        match self.phase {
            Phase::Registered if !pid_alive(self.pid) => Err(format!(
                "{who}: the sidecar (pid {}) that wrote this state is not running",
                self.pid
            )),
            Phase::Registered if self.report_failed => Err(format!(
                "{who}: the last health report to Cloud Map failed (retrying)"
            )),
            // The sidecar's own health: Cloud Map is being told the truth, whatever it is.
            Phase::Registered => Ok(format!(
                "{who} is registered and Cloud Map has the application's status ({})",
                self.health.as_deref().unwrap_or("HEALTHY")
            )),
            other if self.instance_id.is_none() => Err(format!("nothing is registered: {other}")),
            other => Err(format!("{who} is not registered: {other}")),
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Starting => "starting",
            Phase::Registered => "registered",
            Phase::Deregistered => "deregistered while unhealthy",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
            Phase::LeftBehind => "exited, instance possibly left behind",
        })
    }
}

/// Replace the file atomically.
pub fn write(path: &Path, state: &State) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let body = serde_json::to_vec(state).map_err(std::io::Error::other)?;
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&body)?;
    f.write_all(b"\n")?;
    drop(f);
    std::fs::rename(&tmp, path)
}

pub fn read(path: &Path) -> Result<State, String> {
    let body = std::fs::read(path).map_err(|e| {
        format!(
            "cannot read the state file {} (--state-file, CLOUDMAP_STATE_FILE): {e}; is `cloudmap-sidecar run` running with the same --state-file?",
            path.display()
        )
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| format!("the state file {} is not valid: {e}", path.display()))
}

/// Whether a process exists (Linux `/proc`); believed alive where `/proc` is not mounted.
fn pid_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    !proc.join("self").exists() || proc.join(pid.to_string()).exists()
}

/// `healthcheck`: exit status 0 or 1 only (Docker reserves 2), and one line on stdout.
pub fn healthcheck(path: &Path) -> u8 {
    match read(path).and_then(|s| s.verdict(pid_alive)) {
        Ok(line) => {
            println!("ok: {line}");
            0
        }
        Err(why) => {
            println!("not ok: {why}");
            1
        }
    }
}

/// The fields of a lifecycle event that the state follows.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Observed {
    pub event: String,
    pub instance_id: Option<String>,
    pub service_id: Option<String>,
    pub health: Option<String>,
}

impl Visit for Observed {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record(field, value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record(field, format!("{value:?}"));
    }
}

impl Observed {
    fn record(&mut self, field: &Field, value: String) {
        match field.name() {
            "event" => self.event = value,
            "instance_id" => self.instance_id = Some(value),
            "service_id" => self.service_id = Some(value),
            "health" => self.health = Some(value),
            _ => {}
        }
    }
}

/// A tracing layer that keeps the state file in step with the lifecycle's events.
pub struct StateLayer {
    path: PathBuf,
    state: Mutex<State>,
}

impl StateLayer {
    /// Writes the `starting` state at once, replacing whatever an earlier run left; the error
    /// says the file cannot be written (healthcheck will then fail).
    pub fn new(path: PathBuf) -> (StateLayer, std::io::Result<()>) {
        let state = State::starting();
        let written = write(&path, &state);
        (
            StateLayer {
                path,
                state: Mutex::new(state),
            },
            written,
        )
    }
}

impl<S: Subscriber> Layer<S> for StateLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut seen = Observed::default();
        event.record(&mut seen);
        if seen.event.is_empty() {
            return;
        }
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if state.apply(&seen) {
            // A failure was reported at start-up; logging here would re-enter the subscriber.
            let _ = write(&self.path, &state);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn ev(event: &str, health: Option<&str>) -> Observed {
        Observed {
            event: event.to_string(),
            instance_id: Some("i-1".to_string()),
            service_id: Some("srv-1".to_string()),
            health: health.map(str::to_string),
        }
    }

    fn alive(_: u32) -> bool {
        true
    }

    #[test]
    fn healthy_only_while_registered_and_the_last_report_was_sent() {
        let mut s = State::starting();
        assert!(s.verdict(alive).is_err(), "not registered yet");
        s.apply(&ev("registered", Some("HEALTHY")));
        assert!(s
            .verdict(alive)
            .unwrap()
            .contains("instance i-1 in service srv-1"));
        s.apply(&ev("health_report_failed", None));
        assert!(s.verdict(alive).unwrap_err().contains("last health report"));
        s.apply(&ev("health_reported", Some("UNHEALTHY")));
        assert!(
            s.verdict(alive).unwrap().contains("UNHEALTHY"),
            "registered and Cloud Map told the truth: the sidecar does its job"
        );
        s.apply(&ev("deregistering", None));
        assert!(s.verdict(alive).is_err());
        s.apply(&ev("deregistered", None));
        assert_eq!(s.phase, Phase::Stopping);
        s.apply(&ev("stopped", None));
        assert_eq!(s.phase, Phase::Stopped);
        assert!(s.verdict(alive).is_err());
    }

    #[test]
    fn deregistered_while_unhealthy_is_not_registered_until_registered_again() {
        let mut s = State::starting();
        s.apply(&ev("registered", Some("HEALTHY")));
        s.apply(&ev("deregistered", None));
        assert_eq!(s.phase, Phase::Deregistered);
        assert!(s.verdict(alive).is_err());
        s.apply(&ev("registered", None));
        assert!(s.verdict(alive).is_ok());
    }

    #[test]
    fn a_state_left_by_a_dead_process_is_not_believed() {
        let mut s = State::starting();
        s.apply(&ev("registered", Some("HEALTHY")));
        assert!(s.verdict(|_| false).unwrap_err().contains("not running"));
    }

    #[test]
    fn the_file_is_replaced_and_read_back() {
        let dir = std::env::temp_dir().join(format!("cms-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state");
        let mut s = State::starting();
        write(&path, &s).unwrap();
        s.apply(&ev("registered", Some("HEALTHY")));
        write(&path, &s).unwrap();
        assert_eq!(read(&path).unwrap(), s);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temp file left"
        );
        assert_eq!(healthcheck(&path), 0);
        assert_eq!(healthcheck(&dir.join("missing")), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
