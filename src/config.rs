//! Settings: command-line flags and `CLOUDMAP_*` variables, parsed into raw strings, then validated
//! into [`Settings`] with every problem reported at once.
//!
//! The environment is injected (an [`Env`]), never read behind the caller's back: tests parse from
//! explicit argument lists and maps, and the binary passes the real process environment. Every flag
//! `--some-flag` is read from `CLOUDMAP_SOME_FLAG` when it is not on the command line; the one
//! exception is `--attribute`, whose variable is the plural `CLOUDMAP_ATTRIBUTES` (`K=V,K=V`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::attributes::{self, Attributes};
use crate::registry::Health;

/// Prefix of every variable that mirrors a flag.
pub const ENV_PREFIX: &str = "CLOUDMAP_";
/// Set by the ECS agent in every container (task metadata endpoint v4).
pub const ENV_ECS_METADATA_URI_V4: &str = "ECS_CONTAINER_METADATA_URI_V4";
/// The SDK's switch for EC2 instance metadata: `true` means there is none to ask (bridge/host mode
/// and plain EC2 then need `--ip`).
pub const ENV_EC2_METADATA_DISABLED: &str = "AWS_EC2_METADATA_DISABLED";
/// Region for the `REGION` attribute when the SDK chain has none yet (the SDK reads it too).
pub const ENV_AWS_REGION: &str = "AWS_REGION";

/// Inside ECS's default `stopTimeout` of 30 s, leaving 5 s for the application after us.
pub const DEFAULT_STOP_TIMEOUT: &str = "25s";
/// Often enough that a dying application leaves Cloud Map within seconds, rare enough to cost nothing.
pub const DEFAULT_HEALTH_INTERVAL: &str = "5s";
/// A probe slower than this counts as failing: a loopback health endpoint answers in milliseconds.
pub const DEFAULT_HEALTH_TIMEOUT: &str = "2s";
/// Consecutive passes that bring an unhealthy instance back (one blip must not flap DNS).
pub const DEFAULT_HEALTHY_THRESHOLD: &str = "2";
/// Consecutive failures that take a healthy instance out.
pub const DEFAULT_UNHEALTHY_THRESHOLD: &str = "3";
/// How long start-up (metadata, service lookup, registration) may take before we give up with exit 1:
/// long enough for a slow ECS agent, short enough that a broken task fails its deployment visibly.
pub const DEFAULT_START_TIMEOUT: &str = "2m";
/// Where `run` records its state for `healthcheck`: /tmp is writable in most containers and is
/// private per container, so two sidecars on one host (systemd) need their own `--state-file`.
pub const DEFAULT_STATE_FILE: &str = "/tmp/cloudmap-sidecar.state";
/// `discover` lists what clients would use: the healthy instances.
pub const DEFAULT_DISCOVER_HEALTH: &str = "HEALTHY";

/// No start jitter unless asked for: a single task should register at once; operators who start
/// hundreds of tasks together set it (throttling is handled by the backoff either way).
pub const DEFAULT_START_JITTER: &str = "0";
/// Rare enough to cost nothing (one GetInstance per task every 5 minutes), often enough that an
/// instance removed by hand or by a sweeper comes back before anyone notices.
pub const DEFAULT_REASSERT_INTERVAL: &str = "5m";
/// Deregistering first takes the address out of DNS at once; unhealthy-first is opt-in.
pub const DEFAULT_DRAIN_MODE: &str = "deregister";

/// Exit status of configuration problems (also clap's own usage errors).
pub const EXIT_CONFIG: u8 = 2;

/// `cloudmap-sidecar`: keep one AWS Cloud Map instance true for this task or EC2 instance.
#[derive(Parser, Debug)]
#[command(
    name = "cloudmap-sidecar",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Commands>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// Every command takes the full set of settings ([`RunArgs`]), so a flag added there is accepted,
/// documented and read from its variable by all of them.
#[derive(Subcommand, Debug)]
pub enum Commands {
    /// Register, report health, deregister on SIGTERM/SIGINT (the default when no command is given).
    Run(RunArgs),
    /// Register the instance once, print its ID, exit when Cloud Map has applied it; it stays registered.
    Register(RunArgs),
    /// Deregister the instance and exit when Cloud Map has applied it (an unknown instance is success).
    Deregister(RunArgs),
    /// Set the instance's custom health status (the service needs a custom health check).
    Health(HealthArgs),
    /// Print the service's instances as JSON lines, as clients discover them (DiscoverInstances).
    Discover(DiscoverArgs),
    /// Exit 0 while the running sidecar's instance is registered and its last health report was sent.
    Healthcheck(RunArgs),
}

/// `health HEALTHY|UNHEALTHY`.
#[derive(Args, Debug, Clone)]
pub struct HealthArgs {
    /// The status to set.
    #[arg(value_name = "HEALTHY|UNHEALTHY", value_parser = ["HEALTHY", "UNHEALTHY"], ignore_case = true)]
    pub status: String,
    #[command(flatten)]
    pub settings: RunArgs,
}

/// `discover [--health FILTER]`.
#[derive(Args, Debug, Clone)]
pub struct DiscoverArgs {
    /// Which instances to print: HEALTHY, UNHEALTHY, ALL or HEALTHY_OR_ELSE_ALL.
    #[arg(long, value_name = "FILTER", default_value = DEFAULT_DISCOVER_HEALTH)]
    pub health: Option<String>,
    #[command(flatten)]
    pub settings: RunArgs,
}

/// The settings of `run`. Every value stays a string here; [`Settings::from_raw`] validates them so
/// that all problems are reported together, each with its flag, variable and value.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Cloud Map service ID (srv-…) or ARN (for services shared from another account).
    #[arg(long, value_name = "ID|ARN")]
    pub service_id: Option<String>,
    /// Namespace name, with --service, instead of --service-id.
    #[arg(long, value_name = "NAME")]
    pub namespace: Option<String>,
    /// Service name inside --namespace.
    #[arg(long, value_name = "NAME")]
    pub service: Option<String>,
    /// Instance ID to register [default: the ECS task ID, or the EC2 instance ID].
    #[arg(long, value_name = "ID")]
    pub instance_id: Option<String>,
    /// Address to publish, skipping metadata discovery (IPv4 or IPv6).
    #[arg(long, value_name = "ADDR")]
    pub ip: Option<String>,
    /// Application port to publish as AWS_INSTANCE_PORT.
    #[arg(long, value_name = "PORT")]
    pub port: Option<String>,
    /// Application container name in the task [default: the task's only other running NORMAL container].
    #[arg(long, value_name = "NAME")]
    pub container: Option<String>,
    /// Custom attribute K=V (repeatable); variable CLOUDMAP_ATTRIBUTES takes K=V,K=V.
    #[arg(long = "attribute", value_name = "K=V")]
    pub attributes: Vec<String>,
    /// HTTP URL of the application's health endpoint; a 2xx answer is passing [default: no probe, HEALTHY].
    #[arg(long, value_name = "URL")]
    pub health_url: Option<String>,
    /// ECS only: use this container's task-definition health check (Health.status in the task metadata) as the health source instead of --health-url; no status yet counts as not healthy.
    #[arg(long, value_name = "NAME")]
    pub health_from_container: Option<String>,
    /// Time between health probes.
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_HEALTH_INTERVAL)]
    pub health_interval: Option<String>,
    /// Time a probe may take before it counts as failing.
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_HEALTH_TIMEOUT)]
    pub health_timeout: Option<String>,
    /// Consecutive passing probes that make an unhealthy instance healthy again.
    #[arg(long, value_name = "N", default_value = DEFAULT_HEALTHY_THRESHOLD)]
    pub healthy_threshold: Option<String>,
    /// Consecutive failing probes that make a healthy instance unhealthy.
    #[arg(long, value_name = "N", default_value = DEFAULT_UNHEALTHY_THRESHOLD)]
    pub unhealthy_threshold: Option<String>,
    /// Time to keep serving after deregistration, so DNS caches forget us [default: the service's largest DNS TTL, 0 without DNS; capped by the stop budget].
    #[arg(long, value_name = "DURATION")]
    pub drain: Option<String>,
    /// Budget for the whole stop (deregistration + drain); keep it below ECS stopTimeout.
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_STOP_TIMEOUT)]
    pub stop_timeout: Option<String>,
    /// Deadline for start-up (metadata, service lookup, registration).
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_START_TIMEOUT)]
    pub start_timeout: Option<String>,
    /// Log format: text (for people) or json (for CloudWatch).
    #[arg(long, value_name = "text|json", default_value = "text")]
    pub log_format: Option<String>,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: Option<String>,
    /// Endpoint for DiscoverInstances (`discover`), used as given, without the `data-` host prefix the SDK adds [default: data- + the Cloud Map endpoint's host].
    #[arg(long, value_name = "URL")]
    pub discovery_endpoint: Option<String>,
    /// File where `run` records its state at each transition, read by `healthcheck`.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_STATE_FILE)]
    pub state_file: Option<String>,
    /// How a stop takes the instance out: deregister (then drain), or unhealthy-first (mark it UNHEALTHY, drain, then deregister; services with custom health only).
    #[arg(long, value_name = "deregister|unhealthy-first", default_value = DEFAULT_DRAIN_MODE)]
    pub drain_mode: Option<String>,
    /// Random delay, up to this, before the first Cloud Map call, to spread the start of many tasks (0: none).
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_START_JITTER)]
    pub start_jitter: Option<String>,
    /// How often GetInstance confirms the instance is still registered with its attributes; it is registered again if not (0: never).
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_REASSERT_INTERVAL)]
    pub reassert_interval: Option<String>,
}

/// Where unset flags are looked up: the process environment in the binary, a map in tests.
pub trait Env {
    fn get(&self, key: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Env for BTreeMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        BTreeMap::get(self, key).cloned()
    }
}

impl<const N: usize> Env for [(&str, &str); N] {
    fn get(&self, key: &str) -> Option<String> {
        self.iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| (*v).to_string())
    }
}

/// The variable that mirrors a flag.
pub fn env_name(flag: &str) -> String {
    match flag {
        "attribute" => format!("{ENV_PREFIX}ATTRIBUTES"),
        _ => format!("{ENV_PREFIX}{}", flag.to_uppercase().replace('-', "_")),
    }
}

/// clap's command, with each flag's variable added to its help.
pub fn command() -> clap::Command {
    fn with_env(cmd: clap::Command) -> clap::Command {
        let ids: Vec<String> = cmd
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_string))
            .collect();
        ids.into_iter().fold(cmd, |cmd, long| {
            let id = cmd
                .get_arguments()
                .find(|a| a.get_long() == Some(long.as_str()))
                .map(|a| a.get_id().to_string())
                .unwrap_or_default();
            let env = env_name(&long);
            cmd.mut_arg(id, |arg| {
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                arg.help(format!("{help} [env: {env}]"))
            })
        })
    }
    let cmd = with_env(Cli::command());
    let subs: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    subs.into_iter()
        .fold(cmd, |cmd, name| cmd.mut_subcommand(name, with_env))
}

/// The log format asked for, read leniently (for reporting configuration errors when the rest of
/// the settings did not validate): `--log-format json`, `--log-format=json` or
/// `CLOUDMAP_LOG_FORMAT=json`, the flag winning.
pub fn requested_log_format(args: &[OsString], env: &dyn Env) -> LogFormat {
    let mut from_flag = None;
    let mut words = args.iter().map(|a| a.to_string_lossy());
    while let Some(word) = words.next() {
        if word == "--log-format" {
            from_flag = words.next().map(|v| v.trim().to_string());
        } else if let Some(v) = word.strip_prefix("--log-format=") {
            from_flag = Some(v.trim().to_string());
        }
    }
    let wanted = from_flag.or_else(|| env.get(&env_name("log-format")));
    match wanted.as_deref().map(str::trim) {
        Some("json") => LogFormat::Json,
        _ => LogFormat::Text,
    }
}

/// What the command line asked for.
#[derive(Debug)]
pub enum Invocation {
    Run(Box<Settings>),
    Register(Box<Settings>),
    Deregister(Box<Settings>),
    Health(Box<Settings>, Health),
    Discover(Box<Settings>, DiscoverHealth),
    /// Needs only the state file: the container's health check must not fail because an
    /// unrelated setting is missing from its environment.
    Healthcheck(PathBuf),
}

/// `discover --health`: Cloud Map's `HealthStatus` filter of DiscoverInstances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoverHealth {
    Healthy,
    Unhealthy,
    All,
    /// The healthy ones, or all when none is healthy (what DNS does: it fails open).
    HealthyOrElseAll,
}

impl DiscoverHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            DiscoverHealth::Healthy => "HEALTHY",
            DiscoverHealth::Unhealthy => "UNHEALTHY",
            DiscoverHealth::All => "ALL",
            DiscoverHealth::HealthyOrElseAll => "HEALTHY_OR_ELSE_ALL",
        }
    }
}

/// Parse and validate. `Err` carries clap's rendered message (usage, help, version) or our list of
/// configuration errors, and the exit status to use.
pub fn parse<I, T>(args: I, env: &dyn Env) -> Result<Invocation, ParseFailure>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let matches = command()
        .try_get_matches_from(args)
        .map_err(ParseFailure::Clap)?;
    let root = command();
    let (sub, sub_matches, sub_cmd) = match matches.subcommand() {
        Some((name, m)) => (
            name.to_string(),
            m.clone(),
            root.find_subcommand(name)
                .cloned()
                .unwrap_or_else(|| root.clone()),
        ),
        None => ("run".to_string(), matches.clone(), root.clone()),
    };
    let raw = Raw::collect(&sub_cmd, &sub_matches, env);
    if sub == "healthcheck" {
        return state_file(&raw)
            .map(Invocation::Healthcheck)
            .map_err(|e| ParseFailure::Invalid(ConfigErrors(vec![e])));
    }
    // `discover --health` is checked with the shared settings, so every problem shows at once.
    let filter = if sub == "discover" {
        Some(discover_health(&raw))
    } else {
        None
    };
    let settings = match (Settings::from_raw(&raw, env), filter) {
        (Ok(s), None | Some(Ok(_))) => Box::new(s),
        (Ok(_), Some(Err(e))) => return Err(ParseFailure::Invalid(ConfigErrors(vec![e]))),
        (Err(mut errors), filter) => {
            if let Some(Err(e)) = filter {
                errors.0.push(e);
            }
            return Err(ParseFailure::Invalid(errors));
        }
    };
    Ok(match sub.as_str() {
        "register" => Invocation::Register(settings),
        "deregister" => Invocation::Deregister(settings),
        "health" => {
            // clap accepted only HEALTHY or UNHEALTHY, in any case.
            let status = sub_matches
                .get_one::<String>("status")
                .map(|s| s.to_ascii_uppercase());
            let health = if status.as_deref() == Some("UNHEALTHY") {
                Health::Unhealthy
            } else {
                Health::Healthy
            };
            Invocation::Health(settings, health)
        }
        "discover" => Invocation::Discover(
            settings,
            discover_health(&raw).unwrap_or(DiscoverHealth::Healthy),
        ),
        _ => Invocation::Run(settings),
    })
}

fn state_file(raw: &Raw) -> Result<PathBuf, ConfigError> {
    let v = raw.one("state-file").unwrap_or(DEFAULT_STATE_FILE);
    if v.trim().is_empty() {
        return Err(ConfigError {
            flag: "state-file".to_string(),
            value: Some(v.to_string()),
            problem: "must not be empty".to_string(),
        });
    }
    Ok(PathBuf::from(v))
}

fn discover_health(raw: &Raw) -> Result<DiscoverHealth, ConfigError> {
    let v = raw.one("health").unwrap_or(DEFAULT_DISCOVER_HEALTH);
    match v.trim().to_ascii_uppercase().as_str() {
        "HEALTHY" => Ok(DiscoverHealth::Healthy),
        "UNHEALTHY" => Ok(DiscoverHealth::Unhealthy),
        "ALL" => Ok(DiscoverHealth::All),
        "HEALTHY_OR_ELSE_ALL" => Ok(DiscoverHealth::HealthyOrElseAll),
        _ => Err(ConfigError {
            flag: "health".to_string(),
            value: Some(v.to_string()),
            problem: "expected HEALTHY, UNHEALTHY, ALL or HEALTHY_OR_ELSE_ALL".to_string(),
        }),
    }
}

/// Why [`parse`] did not produce an invocation.
#[derive(Debug)]
pub enum ParseFailure {
    /// clap's own output: usage errors (exit 2), or `--help`/`--version` (exit 0).
    Clap(clap::Error),
    /// Values that cannot work.
    Invalid(ConfigErrors),
}

/// Each flag's values after the precedence flag > variable > default, keyed by the flag's long name.
#[derive(Debug, Default)]
pub struct Raw {
    values: BTreeMap<String, Vec<String>>,
    from_env: BTreeMap<String, bool>,
}

impl Raw {
    fn collect(cmd: &clap::Command, matches: &clap::ArgMatches, env: &dyn Env) -> Raw {
        let mut raw = Raw::default();
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if arg.get_long().is_none() || id == "help" || id == "version" {
                continue;
            }
            let from_cli = matches.value_source(id) == Some(ValueSource::CommandLine);
            let cli_values: Vec<String> = matches
                .get_raw(id)
                .map(|vals| vals.map(|v| v.to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            let flag = id.replace('_', "-");
            let flag = if flag == "attributes" {
                "attribute".to_string()
            } else {
                flag
            };
            let env_values = if from_cli {
                None
            } else {
                env.get(&env_name(&flag))
                    .filter(|v| !v.is_empty())
                    .map(|v| {
                        if flag == "attribute" {
                            split_attribute_list(&v)
                        } else {
                            vec![v]
                        }
                    })
            };
            let (values, from_env) = match env_values {
                Some(v) => (v, true),
                None => (cli_values, false),
            };
            if !values.is_empty() {
                raw.values.insert(flag.clone(), values);
                raw.from_env.insert(flag, from_env);
            }
        }
        raw
    }

    fn one(&self, flag: &str) -> Option<&str> {
        self.values
            .get(flag)
            .and_then(|v| v.last())
            .map(String::as_str)
    }

    fn all(&self, flag: &str) -> &[String] {
        self.values.get(flag).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// `K=V,K=V`, where a piece without `=` continues the previous value (values may contain commas).
fn split_attribute_list(list: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for piece in list.split(',') {
        match out.last_mut() {
            Some(prev) if !piece.contains('=') => {
                prev.push(',');
                prev.push_str(piece);
            }
            _ => out.push(piece.trim_start().to_string()),
        }
    }
    out.retain(|p| !p.is_empty());
    out
}

/// Which Cloud Map service to register in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceRef {
    /// `srv-…`, or an ARN (required for services shared through AWS RAM).
    Id(String),
    /// Looked up by name at start-up.
    Names { namespace: String, service: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// How a stop takes the instance out of Cloud Map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainMode {
    /// Deregister, then keep serving for the drain time.
    Deregister,
    /// Mark UNHEALTHY, keep serving for the drain time, then deregister (custom health only).
    UnhealthyFirst,
}

/// Health of the application: an HTTP probe or the ECS container health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    pub url: Option<String>,
    /// `--health-from-container`: the container whose ECS health status is the source.
    pub from_container: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

/// Validated settings of `run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub service: ServiceRef,
    pub instance_id: Option<String>,
    pub ip: Option<IpAddr>,
    pub port: Option<u16>,
    pub container: Option<String>,
    pub attributes: Attributes,
    pub health: HealthSettings,
    /// `None`: derive from the service's DNS TTL.
    pub drain: Option<Duration>,
    pub stop_timeout: Duration,
    pub start_timeout: Duration,
    pub log_format: LogFormat,
    pub log_level: String,
    /// `ECS_CONTAINER_METADATA_URI_V4`, when running in ECS.
    pub ecs_metadata_uri: Option<String>,
    /// `AWS_REGION`, for the `REGION` attribute (the SDK reads the rest of its chain itself).
    pub region_hint: Option<String>,
    pub drain_mode: DrainMode,
    /// Upper bound of the random delay before the first Cloud Map call.
    pub start_jitter: Duration,
    /// `ZERO`: no re-assert.
    pub reassert_interval: Duration,
    /// `AWS_EC2_METADATA_DISABLED=true`: never ask EC2 instance metadata.
    pub ec2_metadata_disabled: bool,
    /// DiscoverInstances endpoint, used without the SDK's `data-` host prefix; `None`: the SDK's.
    pub discovery_endpoint: Option<String>,
    /// Where `run` records its state for `healthcheck`.
    pub state_file: PathBuf,
}

/// One invalid setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub flag: String,
    pub value: Option<String>,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let flags = self
            .flag
            .split('+')
            .map(|flag| format!("--{flag} ({})", env_name(flag)))
            .collect::<Vec<_>>()
            .join(" and ");
        match &self.value {
            Some(v) => write!(f, "{flags} = {v:?}: {}", self.problem),
            None => write!(f, "{flags}: {}", self.problem),
        }
    }
}

/// Every invalid setting found, in flag order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "configuration error: {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Collects problems while each setting is validated.
struct Check<'a> {
    raw: &'a Raw,
    errors: Vec<ConfigError>,
}

impl Check<'_> {
    fn fail(&mut self, flag: &str, value: Option<&str>, problem: impl Into<String>) {
        self.errors.push(ConfigError {
            flag: flag.to_string(),
            value: value.map(str::to_string),
            problem: problem.into(),
        });
    }

    fn text(&mut self, flag: &str) -> Option<String> {
        let v = self.raw.one(flag)?;
        if v.trim().is_empty() {
            self.fail(flag, Some(v), "must not be empty");
            return None;
        }
        Some(v.to_string())
    }

    fn duration(&mut self, flag: &str) -> Option<Duration> {
        let v = self.raw.one(flag)?;
        match parse_duration(v) {
            Ok(d) => Some(d),
            Err(why) => {
                self.fail(flag, Some(v), why);
                None
            }
        }
    }

    fn positive_duration(&mut self, flag: &str) -> Option<Duration> {
        let d = self.duration(flag)?;
        if d.is_zero() {
            self.fail(flag, self.raw.one(flag), "must be greater than 0");
            return None;
        }
        Some(d)
    }

    fn count(&mut self, flag: &str) -> Option<u32> {
        let v = self.raw.one(flag)?;
        match v.trim().parse::<u32>() {
            Ok(n) if n >= 1 => Some(n),
            _ => {
                self.fail(flag, Some(v), "must be a whole number of at least 1");
                None
            }
        }
    }
}

/// A duration for people: whole milliseconds (`3s 989ms`, not `3s 989ms 5us 57ns`).
pub fn human(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_millis(
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
    ))
}

/// `500ms`, `10s`, `2m`, `1m30s`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if !t.is_empty() && t.chars().all(|c| c.is_ascii_digit()) {
        return t
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| "number of seconds is too large".to_string());
    }
    humantime::parse_duration(t).map_err(|_| {
        "not a duration: use e.g. 500ms, 10s, 2m, 1m30s (a bare number is seconds)".to_string()
    })
}

const SERVICE_ID_HINT: &str =
    "expected a Cloud Map service ID (srv-…) or a service ARN (arn:aws:servicediscovery:…:service/srv-…)";

impl Settings {
    /// Validate every setting; all problems are returned together.
    pub fn from_raw(raw: &Raw, env: &dyn Env) -> Result<Settings, ConfigErrors> {
        let mut c = Check {
            raw,
            errors: Vec::new(),
        };

        let service_id = c.text("service-id");
        let namespace = c.text("namespace");
        let service_name = c.text("service");
        let service = match (service_id, namespace, service_name) {
            (Some(id), None, None) => {
                if is_service_id(&id) {
                    Some(ServiceRef::Id(id))
                } else {
                    c.fail("service-id", Some(&id), SERVICE_ID_HINT);
                    None
                }
            }
            (None, Some(namespace), Some(service)) => {
                Some(ServiceRef::Names { namespace, service })
            }
            (Some(_), _, _) => {
                c.fail(
                    "service-id+namespace",
                    None,
                    "give either --service-id, or --namespace with --service, not both",
                );
                None
            }
            (None, Some(_), None) => {
                c.fail("service", None, "is required with --namespace");
                None
            }
            (None, None, Some(_)) => {
                c.fail("namespace", None, "is required with --service");
                None
            }
            (None, None, None) => {
                c.fail(
                    "service-id",
                    None,
                    "is required (or --namespace with --service): which Cloud Map service to register in",
                );
                None
            }
        };

        let instance_id = c.text("instance-id");
        if let Some(id) = &instance_id {
            if let Err(why) = attributes::check_instance_id(id) {
                c.fail("instance-id", Some(id), why);
            }
        }

        let ip = c
            .raw
            .one("ip")
            .and_then(|v| match v.trim().parse::<IpAddr>() {
                Ok(ip) if ip.is_unspecified() => {
                    c.fail(
                        "ip",
                        Some(v),
                        "an unspecified address is not one clients can reach",
                    );
                    None
                }
                Ok(ip) => Some(ip),
                Err(_) => {
                    c.fail("ip", Some(v), "not an IPv4 or IPv6 address");
                    None
                }
            });

        let port = c
            .raw
            .one("port")
            .and_then(|v| match v.trim().parse::<u16>() {
                Ok(p) if p > 0 => Some(p),
                _ => {
                    c.fail("port", Some(v), "must be a port number from 1 to 65535");
                    None
                }
            });

        let container = c.text("container");

        let mut attrs = Attributes::default();
        for kv in c.raw.all("attribute").to_vec() {
            match kv.split_once('=') {
                Some((k, v)) => match attributes::check_custom(k, v) {
                    Ok(()) => {
                        if attrs.insert(k, v).is_some() {
                            c.fail(
                                "attribute",
                                Some(&kv),
                                format!("attribute {k} is given twice"),
                            );
                        }
                    }
                    Err(why) => c.fail("attribute", Some(&kv), why),
                },
                None => c.fail("attribute", Some(&kv), "expected KEY=VALUE"),
            }
        }
        if let Err(why) = attributes::check_totals(&attrs) {
            c.fail("attribute", None, why);
        }

        let health_url = c.text("health-url");
        if let Some(url) = &health_url {
            match reqwest::Url::parse(url) {
                Ok(u) if u.scheme() == "http" && u.host().is_some() => {}
                Ok(u) if u.scheme() == "https" => c.fail(
                    "health-url",
                    Some(url),
                    "https is not supported: probe the application over http on its local address",
                ),
                _ => c.fail(
                    "health-url",
                    Some(url),
                    "expected an http URL such as http://127.0.0.1:8080/health",
                ),
            }
        }
        let ecs_metadata_uri = env
            .get(ENV_ECS_METADATA_URI_V4)
            .filter(|v| !v.trim().is_empty());
        let health_from_container = c.text("health-from-container");
        if let Some(name) = &health_from_container {
            if health_url.is_some() {
                c.fail(
                    "health-url+health-from-container",
                    None,
                    "choose one health source: --health-url probes the application over HTTP, \
                     --health-from-container reads the container's ECS health check",
                );
            }
            if ecs_metadata_uri.is_none() {
                c.fail(
                    "health-from-container",
                    Some(name),
                    format!(
                        "needs the ECS task metadata endpoint ({ENV_ECS_METADATA_URI_V4}, set by ECS in every container), \
                         which is not set: outside ECS use --health-url"
                    ),
                );
            }
        }
        let interval = c.positive_duration("health-interval");
        let timeout = c.positive_duration("health-timeout");
        let healthy_threshold = c.count("healthy-threshold");
        let unhealthy_threshold = c.count("unhealthy-threshold");
        let drain = c.duration("drain");
        let stop_timeout = c.positive_duration("stop-timeout");
        let start_timeout = c.positive_duration("start-timeout");
        if let (Some(drain), Some(stop)) = (drain, stop_timeout) {
            if drain >= stop {
                c.fail(
                    "drain",
                    c.raw.one("drain"),
                    format!(
                        "must be shorter than --stop-timeout ({}), which also has to cover deregistration",
                        humantime::format_duration(stop)
                    ),
                );
            }
        }

        let log_format = match c.raw.one("log-format").map(str::trim) {
            None | Some("text") => Some(LogFormat::Text),
            Some("json") => Some(LogFormat::Json),
            Some(other) => {
                c.fail("log-format", Some(other), "expected text or json");
                None
            }
        };
        let log_level = match c
            .raw
            .one("log-level")
            .map(|l| l.trim().to_ascii_lowercase())
        {
            None => Some("info".to_string()),
            Some(l) if ["error", "warn", "info", "debug", "trace"].contains(&l.as_str()) => Some(l),
            Some(other) => {
                c.fail(
                    "log-level",
                    Some(&other),
                    "expected error, warn, info, debug or trace",
                );
                None
            }
        };

        let discovery_endpoint = c.text("discovery-endpoint");
        if let Some(url) = &discovery_endpoint {
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => c.fail(
                    "discovery-endpoint",
                    Some(url),
                    "expected a URL such as https://data-servicediscovery.eu-west-1.amazonaws.com or your VPC endpoint's",
                ),
            }
        }
        let state_file = match state_file(c.raw) {
            Ok(p) => Some(p),
            Err(e) => {
                c.errors.push(e);
                None
            }
        };
        let drain_mode = match c.raw.one("drain-mode").map(str::trim) {
            None | Some("deregister") => Some(DrainMode::Deregister),
            Some("unhealthy-first") => Some(DrainMode::UnhealthyFirst),
            Some(other) => {
                c.fail(
                    "drain-mode",
                    Some(other),
                    "expected deregister or unhealthy-first",
                );
                None
            }
        };
        let start_jitter = c.duration("start-jitter");
        let reassert_interval = c.duration("reassert-interval");

        if !c.errors.is_empty() {
            return Err(ConfigErrors(c.errors));
        }
        // Every `None` below was reported as an error above, so the fallbacks are never used.
        let settings = Settings {
            service: service.unwrap_or(ServiceRef::Id(String::new())),
            instance_id,
            ip,
            port,
            container,
            attributes: attrs,
            health: HealthSettings {
                url: health_url,
                from_container: health_from_container,
                interval: interval.unwrap_or_default(),
                timeout: timeout.unwrap_or_default(),
                healthy_threshold: healthy_threshold.unwrap_or(1),
                unhealthy_threshold: unhealthy_threshold.unwrap_or(1),
            },
            drain,
            stop_timeout: stop_timeout.unwrap_or_default(),
            start_timeout: start_timeout.unwrap_or_default(),
            log_format: log_format.unwrap_or(LogFormat::Text),
            log_level: log_level.unwrap_or_default(),
            ecs_metadata_uri,
            region_hint: env.get(ENV_AWS_REGION).filter(|r| !r.is_empty()),
            ec2_metadata_disabled: env
                .get(ENV_EC2_METADATA_DISABLED)
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("true")),
            discovery_endpoint,
            state_file: state_file.unwrap_or_default(),
            drain_mode: drain_mode.unwrap_or(DrainMode::Deregister),
            start_jitter: start_jitter.unwrap_or_default(),
            reassert_interval: reassert_interval.unwrap_or_default(),
        };
        Ok(settings)
    }

    /// One line for the start-up log: the effective settings (nothing here is secret).
    pub fn summary(&self) -> String {
        let service = match &self.service {
            ServiceRef::Id(id) => format!("service_id={id}"),
            ServiceRef::Names { namespace, service } => {
                format!("namespace={namespace} service={service}")
            }
        };
        let opt = |v: Option<String>| v.unwrap_or_else(|| "auto".to_string());
        format!(
            "{service} instance_id={} ip={} port={} container={} attributes={} health_url={} \
             health_from_container={} health_interval={} thresholds={}/{} drain={} stop_timeout={} \
             start_timeout={} drain_mode={} start_jitter={} reassert_interval={}",
            opt(self.instance_id.clone()),
            opt(self.ip.map(|i| i.to_string())),
            opt(self.port.map(|p| p.to_string())),
            opt(self.container.clone()),
            self.attributes.len(),
            self.health.url.as_deref().unwrap_or("none"),
            self.health.from_container.as_deref().unwrap_or("none"),
            humantime::format_duration(self.health.interval),
            self.health.healthy_threshold,
            self.health.unhealthy_threshold,
            opt(self
                .drain
                .map(|d| humantime::format_duration(d).to_string())),
            humantime::format_duration(self.stop_timeout),
            humantime::format_duration(self.start_timeout),
            match self.drain_mode {
                DrainMode::Deregister => "deregister",
                DrainMode::UnhealthyFirst => "unhealthy-first",
            },
            humantime::format_duration(self.start_jitter),
            humantime::format_duration(self.reassert_interval),
        )
    }
}

/// `srv-…`, or a Cloud Map service ARN.
pub fn is_service_id(id: &str) -> bool {
    let srv = |s: &str| {
        s.strip_prefix("srv-")
            .is_some_and(|rest| !rest.is_empty() && rest.chars().all(|c| c.is_ascii_alphanumeric()))
    };
    if id.starts_with("arn:") {
        let parts: Vec<&str> = id.splitn(6, ':').collect();
        parts.len() == 6
            && parts[2] == "servicediscovery"
            && parts[5].strip_prefix("service/").is_some_and(srv)
    } else {
        srv(id)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn parse_with(args: &[&str], env: &[(&str, &str)]) -> Result<Settings, ConfigErrors> {
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut argv = vec!["cloudmap-sidecar"];
        argv.extend_from_slice(args);
        match parse(argv, &env) {
            Ok(Invocation::Run(s)) => Ok(*s),
            Ok(other) => panic!("expected run, got {other:?}"),
            Err(ParseFailure::Invalid(e)) => Err(e),
            Err(ParseFailure::Clap(e)) => panic!("clap refused the arguments: {e}"),
        }
    }

    #[test]
    fn defaults_apply_when_nothing_but_the_service_is_given() {
        let s = parse_with(&["--service-id", "srv-abc123"], &[]).unwrap();
        assert_eq!(s.service, ServiceRef::Id("srv-abc123".into()));
        assert_eq!(s.health.interval, Duration::from_secs(5));
        assert_eq!(s.health.timeout, Duration::from_secs(2));
        assert_eq!(s.health.healthy_threshold, 2);
        assert_eq!(s.health.unhealthy_threshold, 3);
        assert_eq!(s.stop_timeout, Duration::from_secs(25));
        assert_eq!(s.start_timeout, Duration::from_secs(120));
        assert_eq!(s.drain, None);
        assert_eq!(s.log_format, LogFormat::Text);
        assert_eq!(s.ecs_metadata_uri, None);
        assert_eq!(s.drain_mode, DrainMode::Deregister);
        assert_eq!(s.start_jitter, Duration::ZERO);
        assert_eq!(s.reassert_interval, Duration::from_secs(300));
    }

    #[test]
    fn every_variable_sets_its_setting() {
        let env = [
            ("CLOUDMAP_NAMESPACE", "corp.local"),
            ("CLOUDMAP_SERVICE", "ap"),
            ("CLOUDMAP_INSTANCE_ID", "task-1"),
            ("CLOUDMAP_IP", "10.0.0.7"),
            ("CLOUDMAP_PORT", "8080"),
            ("CLOUDMAP_CONTAINER", "app"),
            ("CLOUDMAP_ATTRIBUTES", "TIER=ap,VERSION=1.2"),
            ("CLOUDMAP_HEALTH_URL", "http://127.0.0.1:8080/health"),
            ("CLOUDMAP_HEALTH_INTERVAL", "500ms"),
            ("CLOUDMAP_HEALTH_TIMEOUT", "1s"),
            ("CLOUDMAP_HEALTHY_THRESHOLD", "4"),
            ("CLOUDMAP_UNHEALTHY_THRESHOLD", "5"),
            ("CLOUDMAP_DRAIN", "1m30s"),
            ("CLOUDMAP_STOP_TIMEOUT", "2m"),
            ("CLOUDMAP_START_TIMEOUT", "45"),
            ("CLOUDMAP_LOG_FORMAT", "json"),
            ("CLOUDMAP_LOG_LEVEL", "DEBUG"),
            ("CLOUDMAP_DISCOVERY_ENDPOINT", "https://vpce-1.example.com"),
            ("CLOUDMAP_STATE_FILE", "/run/cms.state"),
            (
                "ECS_CONTAINER_METADATA_URI_V4",
                "http://169.254.170.2/v4/abc",
            ),
            ("AWS_REGION", "eu-west-1"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("CLOUDMAP_DRAIN_MODE", "unhealthy-first"),
            ("CLOUDMAP_START_JITTER", "3s"),
            ("CLOUDMAP_REASSERT_INTERVAL", "0"),
        ];
        let s = parse_with(&[], &env).unwrap();
        assert_eq!(
            s.service,
            ServiceRef::Names {
                namespace: "corp.local".into(),
                service: "ap".into()
            }
        );
        assert_eq!(s.instance_id.as_deref(), Some("task-1"));
        assert_eq!(s.ip, Some("10.0.0.7".parse().unwrap()));
        assert_eq!(s.port, Some(8080));
        assert_eq!(s.container.as_deref(), Some("app"));
        assert_eq!(s.attributes.get("TIER"), Some("ap"));
        assert_eq!(s.attributes.get("VERSION"), Some("1.2"));
        assert_eq!(
            s.health.url.as_deref(),
            Some("http://127.0.0.1:8080/health")
        );
        assert_eq!(s.health.interval, Duration::from_millis(500));
        assert_eq!(s.health.timeout, Duration::from_secs(1));
        assert_eq!(s.health.healthy_threshold, 4);
        assert_eq!(s.health.unhealthy_threshold, 5);
        assert_eq!(s.drain, Some(Duration::from_secs(90)));
        assert_eq!(s.stop_timeout, Duration::from_secs(120));
        assert_eq!(s.start_timeout, Duration::from_secs(45));
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(s.log_level, "debug");
        assert_eq!(
            s.ecs_metadata_uri.as_deref(),
            Some("http://169.254.170.2/v4/abc")
        );
        assert_eq!(s.region_hint.as_deref(), Some("eu-west-1"));
        assert!(s.ec2_metadata_disabled);
        assert_eq!(s.health.from_container, None);

        // The one health source that cannot be combined with CLOUDMAP_HEALTH_URL above.
        let s = parse_with(
            &["--service-id", "srv-a"],
            &[
                ("CLOUDMAP_HEALTH_FROM_CONTAINER", "app"),
                (
                    "ECS_CONTAINER_METADATA_URI_V4",
                    "http://169.254.170.2/v4/abc",
                ),
            ],
        )
        .unwrap();
        assert_eq!(s.health.from_container.as_deref(), Some("app"));
        assert_eq!(s.health.url, None);
        assert!(!s.ec2_metadata_disabled);

        let s = parse_with(&[], &env).unwrap();
        assert_eq!(
            s.discovery_endpoint.as_deref(),
            Some("https://vpce-1.example.com")
        );
        assert_eq!(s.state_file, PathBuf::from("/run/cms.state"));
        assert_eq!(s.drain_mode, DrainMode::UnhealthyFirst);
        assert_eq!(s.start_jitter, Duration::from_secs(3));
        assert_eq!(s.reassert_interval, Duration::ZERO, "0 turns it off");

        let s = parse_with(&[], &[("CLOUDMAP_SERVICE_ID", "srv-xyz")]).unwrap();
        assert_eq!(s.service, ServiceRef::Id("srv-xyz".into()));
    }

    #[test]
    fn every_flag_has_the_variable_named_after_it_in_its_help() {
        let cmd = command();
        let run = cmd.find_subcommand("run").unwrap();
        for arg in run.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" || long == "version" {
                continue;
            }
            let help = arg.get_help().unwrap().to_string();
            assert!(
                help.contains(&format!("[env: {}]", env_name(long))),
                "--{long} help lacks its variable: {help}"
            );
        }
        assert_eq!(env_name("health-url"), "CLOUDMAP_HEALTH_URL");
        assert_eq!(env_name("attribute"), "CLOUDMAP_ATTRIBUTES");
    }

    /// Every command's `--help` (and the top level's) shows every setting with its variable,
    /// and the default of those that have one.
    #[test]
    fn every_help_lists_every_setting_with_its_variable_and_default() {
        let settings: Vec<(String, Option<String>)> =
            RunArgs::augment_args(clap::Command::new("x"))
                .get_arguments()
                .filter_map(|a| {
                    a.get_long().map(|l| {
                        (
                            l.to_string(),
                            a.get_default_values()
                                .first()
                                .map(|d| d.to_string_lossy().into_owned()),
                        )
                    })
                })
                .collect();
        assert!(settings.len() >= 20, "{settings:?}");
        let mut cmd = command();
        let mut helps = vec![(
            "cloudmap-sidecar".to_string(),
            cmd.render_long_help().to_string(),
        )];
        let names: Vec<String> = cmd
            .get_subcommands()
            .map(|s| s.get_name().to_string())
            .filter(|n| n != "help")
            .collect();
        assert_eq!(
            names,
            [
                "run",
                "register",
                "deregister",
                "health",
                "discover",
                "healthcheck"
            ]
        );
        for name in names {
            let sub = cmd.find_subcommand_mut(&name).unwrap();
            helps.push((name, sub.render_long_help().to_string()));
        }
        for (name, help) in &helps {
            for (long, default) in &settings {
                let line = help
                    .lines()
                    .skip_while(|l| !l.contains(&format!("--{long} ")))
                    .take_while(|l| {
                        !l.trim_start().starts_with("--") || l.contains(&format!("--{long} "))
                    })
                    .collect::<Vec<_>>()
                    .join(" ");
                assert!(!line.is_empty(), "{name} --help lacks --{long}:\n{help}");
                assert!(
                    line.contains(&format!("[env: {}]", env_name(long))),
                    "{name} --help: --{long} lacks its variable: {line}"
                );
                if let Some(d) = default {
                    assert!(
                        line.contains(&format!("[default: {d}]")),
                        "{name} --help: --{long} lacks its default {d}: {line}"
                    );
                }
            }
        }
    }

    #[test]
    fn each_command_takes_the_shared_settings() {
        let env = [
            ("CLOUDMAP_SERVICE_ID", "srv-env"),
            ("CLOUDMAP_INSTANCE_ID", "i-1"),
        ];
        match parse(["x", "register", "--ip", "10.0.0.1"], &env).unwrap() {
            Invocation::Register(s) => {
                assert_eq!(s.service, ServiceRef::Id("srv-env".into()));
                assert_eq!(s.instance_id.as_deref(), Some("i-1"));
                assert_eq!(s.ip, Some("10.0.0.1".parse().unwrap()));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(["x", "deregister"], &env).unwrap(),
            Invocation::Deregister(_)
        ));
        match parse(["x", "health", "unhealthy", "--stop-timeout", "9s"], &env).unwrap() {
            Invocation::Health(s, h) => {
                assert_eq!(h, Health::Unhealthy);
                assert_eq!(s.stop_timeout, Duration::from_secs(9));
            }
            other => panic!("{other:?}"),
        }
        match parse(["x", "health", "HEALTHY"], &env).unwrap() {
            Invocation::Health(_, h) => assert_eq!(h, Health::Healthy),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(["x", "health", "sick"], &env),
            Err(ParseFailure::Clap(_))
        ));
        match parse(["x", "discover"], &env).unwrap() {
            Invocation::Discover(_, f) => assert_eq!(f, DiscoverHealth::Healthy),
            other => panic!("{other:?}"),
        }
        let all = [
            ("CLOUDMAP_SERVICE_ID", "srv-env"),
            ("CLOUDMAP_HEALTH", "healthy_or_else_all"),
        ];
        match parse(["x", "discover"], &all).unwrap() {
            Invocation::Discover(_, f) => assert_eq!(f, DiscoverHealth::HealthyOrElseAll),
            other => panic!("{other:?}"),
        }
        match parse(["x", "discover", "--health", "ALL"], &env).unwrap() {
            Invocation::Discover(_, f) => assert_eq!(f, DiscoverHealth::All),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn discover_reports_a_bad_filter_with_the_other_errors() {
        let Err(ParseFailure::Invalid(e)) = parse(
            ["x", "discover", "--health", "SOME", "--port", "0"],
            &[("CLOUDMAP_SERVICE_ID", "srv-a")],
        ) else {
            panic!("expected configuration errors");
        };
        let text = e.to_string();
        assert_eq!(e.0.len(), 2, "{text}");
        assert!(
            text.contains("--health (CLOUDMAP_HEALTH) = \"SOME\""),
            "{text}"
        );
        let Err(ParseFailure::Invalid(e)) = parse(
            ["x", "discover", "--discovery-endpoint", "not a url"],
            &[("CLOUDMAP_SERVICE_ID", "srv-a")],
        ) else {
            panic!("expected configuration errors");
        };
        assert!(e
            .to_string()
            .contains("--discovery-endpoint (CLOUDMAP_DISCOVERY_ENDPOINT)"));
    }

    #[test]
    fn healthcheck_needs_only_the_state_file() {
        match parse(["x", "healthcheck"], &BTreeMap::new()).unwrap() {
            Invocation::Healthcheck(p) => assert_eq!(p, PathBuf::from(DEFAULT_STATE_FILE)),
            other => panic!("{other:?}"),
        }
        match parse(["x", "healthcheck"], &[("CLOUDMAP_STATE_FILE", "/run/x")]).unwrap() {
            Invocation::Healthcheck(p) => assert_eq!(p, PathBuf::from("/run/x")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_command_line_wins_over_the_environment() {
        let s = parse_with(
            &["--service-id", "srv-cli", "--port", "81"],
            &[("CLOUDMAP_SERVICE_ID", "srv-env"), ("CLOUDMAP_PORT", "80")],
        )
        .unwrap();
        assert_eq!(s.service, ServiceRef::Id("srv-cli".into()));
        assert_eq!(s.port, Some(81));
    }

    #[test]
    fn the_run_subcommand_and_no_subcommand_are_the_same() {
        let env = BTreeMap::new();
        let a = parse(["x", "run", "--service-id", "srv-a", "--port", "9"], &env).unwrap();
        let b = parse(["x", "--service-id", "srv-a", "--port", "9"], &env).unwrap();
        let (Invocation::Run(a), Invocation::Run(b)) = (a, b) else {
            panic!("both are run");
        };
        assert_eq!(a, b);
    }

    #[test]
    fn a_service_arn_is_accepted() {
        let arn = "arn:aws:servicediscovery:eu-west-1:111122223333:service/srv-abc";
        let s = parse_with(&["--service-id", arn], &[]).unwrap();
        assert_eq!(s.service, ServiceRef::Id(arn.into()));
    }

    #[test]
    fn all_errors_are_reported_at_once_with_flag_variable_and_value() {
        let err = parse_with(
            &[
                "--service-id",
                "web",
                "--port",
                "0",
                "--health-interval",
                "fast",
            ],
            &[("CLOUDMAP_LOG_FORMAT", "xml"), ("CLOUDMAP_IP", "10.0.0")],
        )
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.0.len(), 5, "{text}");
        assert!(
            text.contains("--service-id (CLOUDMAP_SERVICE_ID) = \"web\""),
            "{text}"
        );
        assert!(text.contains("--port (CLOUDMAP_PORT) = \"0\""), "{text}");
        assert!(
            text.contains("--health-interval (CLOUDMAP_HEALTH_INTERVAL) = \"fast\""),
            "{text}"
        );
        assert!(
            text.contains("--log-format (CLOUDMAP_LOG_FORMAT) = \"xml\""),
            "{text}"
        );
        assert!(text.contains("--ip (CLOUDMAP_IP) = \"10.0.0\""), "{text}");
        assert!(text.lines().all(|l| l.starts_with("configuration error: ")));
    }

    #[test]
    fn the_service_must_be_named_one_way() {
        let none = parse_with(&[], &[]).unwrap_err().to_string();
        assert!(
            none.contains("--service-id (CLOUDMAP_SERVICE_ID): is required"),
            "{none}"
        );
        let both = parse_with(&["--service-id", "srv-a", "--namespace", "n"], &[])
            .unwrap_err()
            .to_string();
        assert!(both.contains("not both"), "{both}");
        let half = parse_with(&["--namespace", "n"], &[])
            .unwrap_err()
            .to_string();
        assert!(
            half.contains("--service (CLOUDMAP_SERVICE): is required with --namespace"),
            "{half}"
        );
    }

    #[test]
    fn the_requested_log_format_is_read_even_from_invalid_settings() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        let none: [(&str, &str); 0] = [];
        let env = [("CLOUDMAP_LOG_FORMAT", "json")];
        assert_eq!(
            requested_log_format(&args(&["x", "--port", "0"]), &none),
            LogFormat::Text
        );
        assert_eq!(
            requested_log_format(&args(&["x", "--port", "0"]), &env),
            LogFormat::Json
        );
        assert_eq!(
            requested_log_format(&args(&["x", "--log-format", "json"]), &none),
            LogFormat::Json
        );
        assert_eq!(
            requested_log_format(&args(&["x", "--log-format=json"]), &none),
            LogFormat::Json
        );
        assert_eq!(
            requested_log_format(&args(&["x", "--log-format", "text"]), &env),
            LogFormat::Text
        );
    }

    #[test]
    fn durations_accept_humantime_and_bare_seconds() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn drain_must_leave_room_in_the_stop_budget() {
        let err = parse_with(&["--service-id", "srv-a", "--drain", "30s"], &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "--drain (CLOUDMAP_DRAIN) = \"30s\": must be shorter than --stop-timeout (25s)"
            ),
            "{err}"
        );
        let ok = parse_with(&["--service-id", "srv-a", "--drain", "0"], &[]).unwrap();
        assert_eq!(ok.drain, Some(Duration::ZERO));
    }

    #[test]
    fn attributes_are_validated_and_may_contain_commas_in_the_variable() {
        let s = parse_with(
            &["--service-id", "srv-a"],
            &[("CLOUDMAP_ATTRIBUTES", "A=x,y,B=z")],
        )
        .unwrap();
        assert_eq!(s.attributes.get("A"), Some("x,y"));
        assert_eq!(s.attributes.get("B"), Some("z"));

        let err = parse_with(
            &[
                "--service-id",
                "srv-a",
                "--attribute",
                "novalue",
                "--attribute",
                "AWS_INSTANCE_IPV4=1.2.3.4",
                "--attribute",
                "K= leading",
            ],
            &[],
        )
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.0.len(), 3, "{text}");
        assert!(text.contains("\"novalue\": expected KEY=VALUE"), "{text}");
        assert!(text.contains("AWS_INSTANCE_IPV4"), "{text}");
        assert!(text.contains("\"K= leading\""), "{text}");
    }

    #[test]
    fn drain_mode_jitter_and_reassert_are_validated() {
        let err = parse_with(
            &["--service-id", "srv-a", "--drain-mode", "unhealthy"],
            &[
                ("CLOUDMAP_START_JITTER", "soon"),
                ("CLOUDMAP_REASSERT_INTERVAL", "-5m"),
            ],
        )
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.0.len(), 3, "{text}");
        assert!(
            text.contains("--drain-mode (CLOUDMAP_DRAIN_MODE) = \"unhealthy\": expected deregister or unhealthy-first"),
            "{text}"
        );
        assert!(
            text.contains("--start-jitter (CLOUDMAP_START_JITTER) = \"soon\""),
            "{text}"
        );
        assert!(
            text.contains("--reassert-interval (CLOUDMAP_REASSERT_INTERVAL) = \"-5m\""),
            "{text}"
        );
    }

    #[test]
    fn health_url_must_be_plain_http() {
        let err = parse_with(
            &["--service-id", "srv-a", "--health-url", "https://x/h"],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("https is not supported"), "{err}");
        let err = parse_with(
            &["--service-id", "srv-a", "--health-url", "localhost:8080"],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("expected an http URL"), "{err}");
    }

    #[test]
    fn health_from_container_excludes_health_url_and_needs_ecs_metadata() {
        let ecs = (
            "ECS_CONTAINER_METADATA_URI_V4",
            "http://169.254.170.2/v4/abc",
        );
        let err = parse_with(
            &[
                "--service-id",
                "srv-a",
                "--health-url",
                "http://127.0.0.1:8080/health",
                "--health-from-container",
                "app",
            ],
            &[ecs],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--health-url (CLOUDMAP_HEALTH_URL) and --health-from-container (CLOUDMAP_HEALTH_FROM_CONTAINER): choose one health source"),
            "{err}"
        );
        let err = parse_with(
            &["--service-id", "srv-a", "--health-from-container", "app"],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--health-from-container (CLOUDMAP_HEALTH_FROM_CONTAINER) = \"app\": needs the ECS task metadata endpoint (ECS_CONTAINER_METADATA_URI_V4"),
            "{err}"
        );
        let ok = parse_with(
            &["--service-id", "srv-a", "--health-from-container", "app"],
            &[ecs],
        )
        .unwrap();
        assert_eq!(ok.health.from_container.as_deref(), Some("app"));
    }

    #[test]
    fn unknown_flags_are_usage_errors_with_exit_2() {
        let env = BTreeMap::new();
        match parse(["x", "--no-such-flag"], &env) {
            Err(ParseFailure::Clap(e)) => assert_eq!(e.exit_code(), i32::from(EXIT_CONFIG)),
            other => panic!("expected a usage error, got {other:?}"),
        }
    }
}
