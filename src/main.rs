//! Wiring only: signals, settings, logging, runtime, exit code. See the crate docs for the layout.

use std::process::ExitCode;

use cloudmap_sidecar::config::{
    self, Invocation, LogFormat, ParseFailure, ProcessEnv, EXIT_CONFIG,
};
use cloudmap_sidecar::lifecycle::{shutdown, ExitStatus};
use cloudmap_sidecar::state::{self, StateLayer};
use cloudmap_sidecar::{commands, logging};

fn main() -> ExitCode {
    // Before anything else, so that a stop during start-up is never lost.
    let stops = match shutdown::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot install signal handlers: {e}");
            return ExitCode::from(ExitStatus::Failure.code());
        }
    };
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let invocation = match config::parse(args.clone(), &ProcessEnv) {
        Ok(i) => i,
        Err(ParseFailure::Clap(e)) => {
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(EXIT_CONFIG));
        }
        Err(ParseFailure::Invalid(errors)) => {
            // The same `event="config_error"` lines as later configuration errors, so that a log
            // filter on them also sees the failures found before logging could be set up.
            if config::requested_log_format(&args, &ProcessEnv) == LogFormat::Json {
                logging::init(LogFormat::Json, "error");
                for e in &errors.0 {
                    tracing::error!(event = "config_error", "configuration error: {e}");
                }
            } else {
                eprintln!("{errors}");
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // No runtime, no network: a container health check runs this every few seconds.
    if let Invocation::Healthcheck(path) = &invocation {
        return ExitCode::from(state::healthcheck(path));
    }
    let mut state_error = None;
    match &invocation {
        Invocation::Run(s) => {
            let (layer, written) = StateLayer::new(s.state_file.clone());
            state_error = written
                .err()
                .map(|e| format!("cannot write the state file {} (--state-file, CLOUDMAP_STATE_FILE): {e}; `healthcheck` will report unhealthy", s.state_file.display()));
            logging::init_with_state(s.log_format, &s.log_level, Some(layer));
        }
        Invocation::Register(s)
        | Invocation::Deregister(s)
        | Invocation::Health(s, _)
        | Invocation::Discover(s, _) => logging::init(s.log_format, &s.log_level),
        Invocation::Healthcheck(_) => {}
    }
    if let Some(why) = state_error {
        tracing::warn!("{why}");
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(ExitStatus::Failure.code());
        }
    };
    let status = match invocation {
        Invocation::Run(settings) => runtime.block_on(cloudmap_sidecar::run(*settings, stops)),
        other => runtime.block_on(commands::execute(other, stops)),
    };
    // Nothing is left to finish once the lifecycle has returned: do not wait for idle connection
    // pools or blocking threads on the way out (it shows in SIGTERM → exit).
    runtime.shutdown_background();
    ExitCode::from(status.code())
}
