//! The sweeper's settings: flags and `CLOUDMAP_*` variables (the same convention as the sidecar:
//! `--some-flag` ↔ `CLOUDMAP_SOME_FLAG`, the command line wins), validated with every problem
//! reported at once (exit 2).

use std::ffi::OsString;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgAction, CommandFactory, Parser};

use crate::config::{
    env_name, is_service_id, parse_duration, ConfigError, ConfigErrors, Env, LogFormat,
    ParseFailure,
};

/// Half the service: a pass that finds more of it stale is more likely looking at an API or
/// permission problem (or a region mix-up) than at a real mass death, so it removes nothing.
pub const DEFAULT_MAX_FRACTION: &str = "50%";

/// `cloudmap-sweeper`: remove the Cloud Map instances whose ECS task or EC2 instance is gone.
#[derive(Parser, Debug)]
#[command(name = "cloudmap-sweeper", version, about)]
pub struct SweeperCli {
    /// Cloud Map service ID (srv-…) or ARN to sweep.
    #[arg(long, value_name = "ID|ARN")]
    pub service_id: Option<String>,
    /// Repeat a pass every DURATION until SIGTERM [default: one pass, then exit].
    #[arg(long, value_name = "DURATION")]
    pub interval: Option<String>,
    /// Refuse a pass that would remove more than this share of the service's instances (0.5 or 50%).
    #[arg(long, value_name = "FRACTION", default_value = DEFAULT_MAX_FRACTION)]
    pub max_fraction: Option<String>,
    /// Only print what a pass would remove; remove nothing.
    #[arg(long, action = ArgAction::SetTrue)]
    pub dry_run: bool,
    /// Log format: text (for people) or json (for CloudWatch).
    #[arg(long, value_name = "text|json", default_value = "text")]
    pub log_format: Option<String>,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: Option<String>,
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SweeperSettings {
    pub service_id: String,
    /// `None`: one pass.
    pub interval: Option<Duration>,
    /// In (0, 1].
    pub max_fraction: f64,
    pub dry_run: bool,
    pub log_format: LogFormat,
    pub log_level: String,
}

impl SweeperSettings {
    /// One line for the start-up log.
    pub fn summary(&self) -> String {
        format!(
            "service_id={} interval={} max_fraction={}% dry_run={}",
            self.service_id,
            self.interval
                .map(|i| humantime::format_duration(i).to_string())
                .unwrap_or_else(|| "once".to_string()),
            self.max_fraction * 100.0,
            self.dry_run
        )
    }
}

/// clap's command, with each flag's variable added to its help.
pub fn command() -> clap::Command {
    let cmd = SweeperCli::command();
    let longs: Vec<(String, String)> = cmd
        .get_arguments()
        .filter_map(|a| Some((a.get_id().to_string(), a.get_long()?.to_string())))
        .filter(|(_, long)| long != "help" && long != "version")
        .collect();
    longs.into_iter().fold(cmd, |cmd, (id, long)| {
        cmd.mut_arg(id, |arg| {
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            arg.help(format!("{help} [env: {}]", env_name(&long)))
        })
    })
}

/// Parse and validate. `Err` carries clap's own output (usage, help, version) or every invalid
/// setting.
pub fn parse<I, T>(args: I, env: &dyn Env) -> Result<SweeperSettings, ParseFailure>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let m = command()
        .try_get_matches_from(args)
        .map_err(ParseFailure::Clap)?;
    // Flag > variable > default, as in the sidecar.
    let value = |flag: &str| -> Option<String> {
        let id = flag.replace('-', "_");
        let cli = m.get_one::<String>(&id).cloned();
        if m.value_source(&id) == Some(ValueSource::CommandLine) {
            return cli;
        }
        env.get(&env_name(flag))
            .filter(|v| !v.trim().is_empty())
            .or(cli)
    };
    let mut errors = Vec::new();
    let mut fail = |flag: &str, value: Option<&str>, problem: &str| {
        errors.push(ConfigError {
            flag: flag.to_string(),
            value: value.map(str::to_string),
            problem: problem.to_string(),
        });
    };

    let service_id = match value("service-id").map(|s| s.trim().to_string()) {
        None => {
            fail("service-id", None, "is required");
            None
        }
        Some(id) if is_service_id(&id) => Some(id),
        Some(id) => {
            fail(
                "service-id",
                Some(&id),
                "expected a Cloud Map service ID (srv-…) or a service ARN (arn:aws:servicediscovery:…:service/srv-…)",
            );
            None
        }
    };
    let interval = match value("interval") {
        None => None,
        Some(v) => match parse_duration(&v) {
            Ok(d) if d >= Duration::from_secs(1) => Some(d),
            Ok(_) => {
                fail(
                    "interval",
                    Some(&v),
                    "must be at least 1s (leave it unset for one pass)",
                );
                None
            }
            Err(why) => {
                fail("interval", Some(&v), &why);
                None
            }
        },
    };
    let max_fraction = value("max-fraction").and_then(|v| match parse_fraction(&v) {
        Ok(f) => Some(f),
        Err(why) => {
            fail("max-fraction", Some(&v), &why);
            None
        }
    });
    let dry_run = if m.get_flag("dry_run") {
        true
    } else {
        match env
            .get(&env_name("dry-run"))
            .map(|v| v.trim().to_ascii_lowercase())
        {
            None => false,
            Some(v) => match v.as_str() {
                "" | "false" | "0" | "no" => false,
                "true" | "1" | "yes" => true,
                _ => {
                    fail("dry-run", Some(&v), "expected true or false");
                    false
                }
            },
        }
    };
    let log_format = match value("log-format").as_deref().map(str::trim) {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            fail("log-format", Some(other), "expected text or json");
            LogFormat::Text
        }
    };
    let log_level = match value("log-level").map(|l| l.trim().to_ascii_lowercase()) {
        None => "info".to_string(),
        Some(l) if ["error", "warn", "info", "debug", "trace"].contains(&l.as_str()) => l,
        Some(other) => {
            fail(
                "log-level",
                Some(&other),
                "expected error, warn, info, debug or trace",
            );
            "info".to_string()
        }
    };

    match (service_id, max_fraction) {
        (Some(service_id), Some(max_fraction)) if errors.is_empty() => Ok(SweeperSettings {
            service_id,
            interval,
            max_fraction,
            dry_run,
            log_format,
            log_level,
        }),
        _ => Err(ParseFailure::Invalid(ConfigErrors(errors))),
    }
}

/// `0.5`, `50%` → 0.5; the result is in (0, 1].
pub fn parse_fraction(v: &str) -> Result<f64, String> {
    let t = v.trim();
    let (number, scale) = match t.strip_suffix('%') {
        Some(p) => (p.trim(), 100.0),
        None => (t, 1.0),
    };
    let f = number
        .parse::<f64>()
        .map_err(|_| "expected a fraction like 0.5 or a percentage like 50%".to_string())?
        / scale;
    if f.is_finite() && f > 0.0 && f <= 1.0 {
        Ok(f)
    } else {
        Err("must be above 0 and at most 1 (100%)".to_string())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn parse_with(args: &[&str], env: &[(&str, &str)]) -> Result<SweeperSettings, ConfigErrors> {
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut argv = vec!["cloudmap-sweeper"];
        argv.extend_from_slice(args);
        match parse(argv, &env) {
            Ok(s) => Ok(s),
            Err(ParseFailure::Invalid(e)) => Err(e),
            Err(ParseFailure::Clap(e)) => panic!("clap refused the arguments: {e}"),
        }
    }

    #[test]
    fn one_pass_at_half_the_service_by_default() {
        let s = parse_with(&["--service-id", "srv-abc"], &[]).unwrap();
        assert_eq!(s.service_id, "srv-abc");
        assert_eq!(s.interval, None);
        assert_eq!(s.max_fraction, 0.5);
        assert!(!s.dry_run);
        assert_eq!(s.log_format, LogFormat::Text);
        assert_eq!(s.log_level, "info");
    }

    #[test]
    fn every_variable_sets_its_setting() {
        let s = parse_with(
            &[],
            &[
                ("CLOUDMAP_SERVICE_ID", "srv-env"),
                ("CLOUDMAP_INTERVAL", "1m30s"),
                ("CLOUDMAP_MAX_FRACTION", "0.25"),
                ("CLOUDMAP_DRY_RUN", "true"),
                ("CLOUDMAP_LOG_FORMAT", "json"),
                ("CLOUDMAP_LOG_LEVEL", "DEBUG"),
            ],
        )
        .unwrap();
        assert_eq!(s.service_id, "srv-env");
        assert_eq!(s.interval, Some(Duration::from_secs(90)));
        assert_eq!(s.max_fraction, 0.25);
        assert!(s.dry_run);
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(s.log_level, "debug");
    }

    #[test]
    fn the_command_line_wins_over_the_environment() {
        let s = parse_with(
            &[
                "--service-id",
                "srv-cli",
                "--max-fraction",
                "100%",
                "--dry-run",
            ],
            &[
                ("CLOUDMAP_SERVICE_ID", "srv-env"),
                ("CLOUDMAP_MAX_FRACTION", "10%"),
                ("CLOUDMAP_DRY_RUN", "false"),
            ],
        )
        .unwrap();
        assert_eq!(s.service_id, "srv-cli");
        assert_eq!(s.max_fraction, 1.0);
        assert!(s.dry_run);
    }

    #[test]
    fn all_errors_are_reported_at_once_with_flag_variable_and_value() {
        let err = parse_with(
            &[
                "--service-id",
                "web",
                "--interval",
                "soon",
                "--max-fraction",
                "0",
            ],
            &[
                ("CLOUDMAP_DRY_RUN", "maybe"),
                ("CLOUDMAP_LOG_FORMAT", "xml"),
            ],
        )
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.0.len(), 5, "{text}");
        for needle in [
            "--service-id (CLOUDMAP_SERVICE_ID) = \"web\"",
            "--interval (CLOUDMAP_INTERVAL) = \"soon\"",
            "--max-fraction (CLOUDMAP_MAX_FRACTION) = \"0\": must be above 0",
            "--dry-run (CLOUDMAP_DRY_RUN) = \"maybe\"",
            "--log-format (CLOUDMAP_LOG_FORMAT) = \"xml\"",
        ] {
            assert!(text.contains(needle), "{needle} missing from: {text}");
        }
        let none = parse_with(&[], &[]).unwrap_err().to_string();
        assert!(
            none.contains("--service-id (CLOUDMAP_SERVICE_ID): is required"),
            "{none}"
        );
    }

    #[test]
    fn fractions_and_percentages() {
        assert_eq!(parse_fraction("0.5").unwrap(), 0.5);
        assert_eq!(parse_fraction("50%").unwrap(), 0.5);
        assert_eq!(parse_fraction(" 100 %").unwrap(), 1.0);
        assert!(parse_fraction("1.5").is_err());
        assert!(parse_fraction("150%").is_err());
        assert!(parse_fraction("-0.1").is_err());
        assert!(parse_fraction("NaN").is_err());
        assert!(parse_fraction("half").is_err());
    }

    #[test]
    fn an_interval_below_a_second_is_refused() {
        let err = parse_with(&["--service-id", "srv-a", "--interval", "0"], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least 1s"), "{err}");
        let arn = "arn:aws:servicediscovery:eu-west-1:111122223333:service/srv-abc";
        assert_eq!(
            parse_with(&["--service-id", arn], &[]).unwrap().service_id,
            arn
        );
    }

    #[test]
    fn every_flag_has_its_variable_in_its_help() {
        for arg in command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" || long == "version" {
                continue;
            }
            let help = arg.get_help().unwrap().to_string();
            assert!(
                help.contains(&format!("[env: {}]", env_name(long))),
                "--{long}: {help}"
            );
        }
    }
}
