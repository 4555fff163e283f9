//! Logs on stderr (stdout is for the one-shot commands' output): text for people, JSON for
//! CloudWatch. The AWS SDK's own logs are kept at `warn` unless `trace` is asked for.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat, level: &str) {
    let sdk = if level == "trace" { "trace" } else { "warn" };
    let filter = EnvFilter::new(format!(
        "{level},aws_config={sdk},aws_smithy_runtime={sdk},aws_smithy_runtime_api={sdk},aws_sdk_servicediscovery={sdk},hyper={sdk},hyper_util={sdk},reqwest={sdk},rustls={sdk}"
    ));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(false).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}
