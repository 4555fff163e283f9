//! Wiring only: signals, settings, logging, runtime, exit code. See `cloudmap_sidecar::sweeper`.

use std::process::ExitCode;

use cloudmap_sidecar::config::{ParseFailure, ProcessEnv, EXIT_CONFIG};
use cloudmap_sidecar::lifecycle::shutdown;
use cloudmap_sidecar::logging;
use cloudmap_sidecar::sweeper::{self, config, SweepStatus};

fn main() -> ExitCode {
    // Before anything else, so that a stop during start-up is never lost.
    let stops = match shutdown::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot install signal handlers: {e}");
            return ExitCode::from(SweepStatus::Failure.code());
        }
    };
    let settings = match config::parse(std::env::args_os(), &ProcessEnv) {
        Ok(s) => s,
        Err(ParseFailure::Clap(e)) => {
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(EXIT_CONFIG));
        }
        Err(ParseFailure::Invalid(errors)) => {
            eprintln!("{errors}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    logging::init(settings.log_format, &settings.log_level);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(SweepStatus::Failure.code());
        }
    };
    let status = runtime.block_on(sweeper::run(settings, stops));
    ExitCode::from(status.code())
}
