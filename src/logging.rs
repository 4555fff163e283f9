//! Logs on stderr (stdout is for the one-shot commands' output): text for people, JSON for
//! CloudWatch. The AWS SDK's own logs are kept at `warn` unless `trace` is asked for.
//!
//! JSON lines carry stable top-level fields: `timestamp`, `level`, `message`, and where they
//! apply `event` (one per lifecycle transition: `starting`, `service_resolved`, `located`,
//! `registered`, `health_changed`, `health_reported`, `health_report_failed`, `deregistering`,
//! `deregistered`, `draining`, `stopped`, `left_behind`, `start_failed`, `config_error`),
//! `instance_id`, `service_id` and `operation_id`. Credentials are never logged: settings hold
//! none, and the SDK redacts them even at `trace` (a test runs at `trace` and looks for the
//! secret).

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::config::LogFormat;
use crate::state::StateLayer;

pub fn init(format: LogFormat, level: &str) {
    init_with_state(format, level, None);
}

/// As [`init`], plus the layer that keeps `run`'s state file for `healthcheck`. The state layer
/// has its own filter, so a quiet `--log-level` does not starve it of transitions.
pub fn init_with_state(format: LogFormat, level: &str, state: Option<StateLayer>) {
    // `Targets`, not `EnvFilter`: the same per-crate levels without a regex engine in the binary.
    let level = level.parse::<LevelFilter>().unwrap_or(LevelFilter::INFO);
    let sdk = if level == LevelFilter::TRACE {
        LevelFilter::TRACE
    } else {
        LevelFilter::WARN.min(level)
    };
    let filter = Targets::new().with_default(level).with_targets(
        [
            "aws_config",
            "aws_smithy_runtime",
            "aws_smithy_runtime_api",
            "aws_sdk_servicediscovery",
            "hyper",
            "hyper_util",
            "reqwest",
            "rustls",
        ]
        .map(|target| (target, sdk)),
    );
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => Box::new(fmt.with_ansi(false).with_filter(filter)),
        LogFormat::Json => Box::new(
            fmt.json()
                .flatten_event(true)
                .with_current_span(false)
                .with_filter(filter),
        ),
    };
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(state.map(|s| s.with_filter(LevelFilter::INFO)))
        .try_init();
}
