//! The one place that owns signals. The lifecycle receives stop requests from a channel, so tests
//! feed the channel instead of sending real signals.
//!
//! Who sends what: ECS sends SIGTERM at task stop and SIGKILL after the container's `stopTimeout`;
//! systemd sends SIGTERM (then SIGKILL after `TimeoutStopSec`); a person at a terminal sends SIGINT
//! (Ctrl-C), and SIGQUIT (Ctrl-\) when they want out now.

use std::io;

use signal_hook::consts::{SIGINT, SIGQUIT, SIGTERM};
use signal_hook::iterator::Signals;
use tokio::sync::mpsc;

/// One signal, as the lifecycle sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT.
    Stop,
    /// SIGQUIT.
    Quit,
}

/// How urgent the stop has become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// First SIGTERM/SIGINT: deregister, drain, exit.
    Graceful,
    /// Second: skip (the rest of) the drain.
    SkipDrain,
    /// Third, or SIGQUIT: exit now, even if the instance stays registered.
    Immediate,
}

/// Stop requests, escalating with each signal.
#[derive(Debug)]
pub struct StopRequests {
    rx: mpsc::UnboundedReceiver<Signal>,
    seen: u32,
    closed: bool,
}

/// The sending side, for tests and for the signal thread.
pub type StopSender = mpsc::UnboundedSender<Signal>;

impl StopRequests {
    pub fn channel() -> (StopSender, StopRequests) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            tx,
            StopRequests {
                rx,
                seen: 0,
                closed: false,
            },
        )
    }

    /// The next request; pending forever once every sender is gone.
    pub async fn next(&mut self) -> Stop {
        if !self.closed {
            if let Some(signal) = self.rx.recv().await {
                self.seen += 1;
                return match (signal, self.seen) {
                    (Signal::Quit, _) => Stop::Immediate,
                    (Signal::Stop, 1) => Stop::Graceful,
                    (Signal::Stop, 2) => Stop::SkipDrain,
                    (Signal::Stop, _) => Stop::Immediate,
                };
            }
            self.closed = true;
        }
        std::future::pending().await
    }
}

/// Install the handlers (before any network call, so a stop during start-up is not lost) and
/// forward signals from a thread of their own.
pub fn install() -> io::Result<StopRequests> {
    let (tx, requests) = StopRequests::channel();
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGQUIT])?;
    std::thread::Builder::new()
        .name("signals".to_string())
        .spawn(move || {
            for sig in signals.forever() {
                let signal = if sig == SIGQUIT {
                    Signal::Quit
                } else {
                    Signal::Stop
                };
                if tx.send(signal).is_err() {
                    break;
                }
            }
        })?;
    Ok(requests)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_signal_escalates_and_quit_is_immediate() {
        let (tx, mut stops) = StopRequests::channel();
        for s in [Signal::Stop, Signal::Stop, Signal::Stop] {
            tx.send(s).ok();
        }
        assert_eq!(stops.next().await, Stop::Graceful);
        assert_eq!(stops.next().await, Stop::SkipDrain);
        assert_eq!(stops.next().await, Stop::Immediate);

        let (tx, mut stops) = StopRequests::channel();
        tx.send(Signal::Quit).ok();
        assert_eq!(stops.next().await, Stop::Immediate);
    }
}
