//! Is the application serving: probes, and the thresholds that turn probe results into a status
//! change worth reporting to Cloud Map.

pub mod ecs;

use std::time::Duration;

pub use ecs::ContainerHealthProbe;

use crate::metadata::error_chain;
use crate::registry::Health;

/// One health check of the application.
#[allow(async_fn_in_trait)]
pub trait Probe {
    /// `Ok` passing; `Err` failing, with the reason for the log.
    async fn check(&self) -> Result<(), String>;
}

/// `GET url`; any 2xx within the timeout passes.
#[derive(Debug, Clone)]
pub struct HttpProbe {
    client: reqwest::Client,
    url: String,
}

impl HttpProbe {
    pub fn new(url: &str, timeout: Duration) -> Self {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .no_proxy()
            // A health endpoint that redirects is misconfigured; report it rather than follow.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        HttpProbe {
            client,
            url: url.to_string(),
        }
    }
}

impl Probe for HttpProbe {
    async fn check(&self) -> Result<(), String> {
        match self.client.get(&self.url).send().await {
            Ok(resp) if resp.status().is_success() => Ok(()),
            Ok(resp) => Err(format!("{} answered HTTP {}", self.url, resp.status())),
            Err(e) => Err(format!("{}: {}", self.url, error_chain(&e))),
        }
    }
}

/// The health source the settings chose: `--health-url` or `--health-from-container`.
#[derive(Debug, Clone)]
pub enum AnyProbe {
    Http(HttpProbe),
    Container(ContainerHealthProbe),
}

impl AnyProbe {
    /// The probe the settings ask for, if any. Settings allow one health source, and
    /// `--health-from-container` only with ECS metadata.
    pub fn from_settings(settings: &crate::config::Settings) -> Option<AnyProbe> {
        let h = &settings.health;
        match (&h.url, &h.from_container, &settings.ecs_metadata_uri) {
            (Some(url), _, _) => Some(AnyProbe::Http(HttpProbe::new(url, h.timeout))),
            (None, Some(name), Some(uri)) => Some(AnyProbe::Container(ContainerHealthProbe::new(
                uri, name, h.timeout,
            ))),
            _ => None,
        }
    }
}

impl Probe for AnyProbe {
    async fn check(&self) -> Result<(), String> {
        match self {
            AnyProbe::Http(p) => p.check().await,
            AnyProbe::Container(p) => p.check().await,
        }
    }
}

/// Consecutive-result thresholds. The first result decides at once (there is nothing to flap
/// from); after that, `healthy_threshold` passes in a row bring an unhealthy instance back and
/// `unhealthy_threshold` failures in a row take a healthy one out.
#[derive(Debug, Clone)]
pub struct Tracker {
    healthy_threshold: u32,
    unhealthy_threshold: u32,
    status: Option<Health>,
    streak: u32,
    last_passed: Option<bool>,
}

impl Tracker {
    pub fn new(healthy_threshold: u32, unhealthy_threshold: u32) -> Self {
        Tracker {
            healthy_threshold: healthy_threshold.max(1),
            unhealthy_threshold: unhealthy_threshold.max(1),
            status: None,
            streak: 0,
            last_passed: None,
        }
    }

    /// The thresholds the settings ask for.
    pub fn for_settings(health: &crate::config::HealthSettings) -> Self {
        Tracker::new(health.healthy_threshold, health.unhealthy_threshold)
    }

    pub fn status(&self) -> Option<Health> {
        self.status
    }

    /// Whether the most recent probe passed (`None` before the first).
    pub fn last_passed(&self) -> Option<bool> {
        self.last_passed
    }

    /// Record one result; returns the new status when it changed.
    pub fn observe(&mut self, passed: bool) -> Option<Health> {
        if self.last_passed == Some(passed) {
            self.streak = self.streak.saturating_add(1);
        } else {
            self.streak = 1;
        }
        self.last_passed = Some(passed);
        let next = match (self.status, passed) {
            (None, true) => Health::Healthy,
            (None, false) => Health::Unhealthy,
            (Some(Health::Healthy), false) if self.streak >= self.unhealthy_threshold => {
                Health::Unhealthy
            }
            (Some(Health::Unhealthy), true) if self.streak >= self.healthy_threshold => {
                Health::Healthy
            }
            (Some(current), _) => current,
        };
        if self.status == Some(next) {
            None
        } else {
            self.status = Some(next);
            Some(next)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_result_decides_at_once() {
        let mut t = Tracker::new(2, 3);
        assert_eq!(t.observe(true), Some(Health::Healthy));
        let mut t = Tracker::new(2, 3);
        assert_eq!(t.observe(false), Some(Health::Unhealthy));
    }

    #[test]
    fn changes_need_consecutive_results() {
        let mut t = Tracker::new(2, 3);
        t.observe(true);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(true), None, "a pass breaks the failure streak");
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), Some(Health::Unhealthy));
        assert_eq!(t.observe(false), None, "reported once, not again");
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(true), Some(Health::Healthy));
        assert_eq!(t.status(), Some(Health::Healthy));
        assert_eq!(t.last_passed(), Some(true));
    }

    #[test]
    fn thresholds_of_one_follow_every_result() {
        let mut t = Tracker::new(1, 1);
        assert_eq!(t.observe(true), Some(Health::Healthy));
        assert_eq!(t.observe(false), Some(Health::Unhealthy));
        assert_eq!(t.observe(true), Some(Health::Healthy));
    }
}
