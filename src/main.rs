//! Wiring only: signals, settings, logging, runtime, exit code. See the crate docs for the layout.

use std::process::ExitCode;

use cloudmap_sidecar::config::{self, Invocation, ParseFailure, ProcessEnv, EXIT_CONFIG};
use cloudmap_sidecar::lifecycle::{shutdown, ExitStatus};
use cloudmap_sidecar::logging;

fn main() -> ExitCode {
    // Before anything else, so that a stop during start-up is never lost.
    let stops = match shutdown::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot install signal handlers: {e}");
            return ExitCode::from(ExitStatus::Failure.code());
        }
    };
    let invocation = match config::parse(std::env::args_os(), &ProcessEnv) {
        Ok(i) => i,
        Err(ParseFailure::Clap(e)) => {
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(EXIT_CONFIG));
        }
        Err(ParseFailure::Invalid(errors)) => {
            eprintln!("{errors}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let Invocation::Run(settings) = invocation;
    logging::init(settings.log_format, &settings.log_level);
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
    let status = runtime.block_on(cloudmap_sidecar::run(*settings, stops));
    ExitCode::from(status.code())
}
