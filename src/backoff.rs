//! Exponential backoff with full jitter, always inside a deadline: hundreds of tasks start at once
//! during a deploy, and synchronized retries would hit Cloud Map (or the ECS agent) in waves.

use std::time::Duration;

use tokio::time::Instant;

/// Delays of `random(0 ..= min(cap, base * 2^attempt))`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// For Cloud Map calls and operation polling: from ~100 ms up to 2 s.
    pub fn cloud_map() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(2))
    }

    /// Attempts so far.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// The next delay, with full jitter.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(fastrand::u64(0..=nanos))
    }

    /// The next delay without jitter: for polling an operation whose end we wait for.
    pub fn next_plain(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        ceiling
    }

    fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// Sleep for the next delay unless that would pass `deadline`; `false` when there is no time left.
    pub async fn wait(&mut self, deadline: Instant) -> bool {
        let delay = self.next_delay();
        sleep_within(delay, deadline).await
    }

    /// Like [`Backoff::wait`] without jitter.
    pub async fn wait_plain(&mut self, deadline: Instant) -> bool {
        let delay = self.next_plain();
        sleep_within(delay, deadline).await
    }
}

async fn sleep_within(delay: Duration, deadline: Instant) -> bool {
    let now = Instant::now();
    if now >= deadline {
        return false;
    }
    tokio::time::sleep_until((now + delay).min(deadline)).await;
    Instant::now() < deadline
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_stay_jittered_below_it() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let plain: Vec<u128> = (0..7).map(|_| b.next_plain().as_millis()).collect();
        assert_eq!(plain, vec![100, 200, 400, 800, 1600, 2000, 2000]);
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for _ in 0..50 {
            assert!(b.next_delay() <= Duration::from_secs(2));
        }
        assert_eq!(b.attempts(), 50);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_never_passes_the_deadline() {
        let start = Instant::now();
        let deadline = start + Duration::from_millis(250);
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut waits = 0;
        while b.wait_plain(deadline).await {
            waits += 1;
        }
        assert_eq!(
            waits, 1,
            "100 ms; the next 200 ms is cut to the deadline, leaving no time"
        );
        assert_eq!(Instant::now(), deadline);
    }
}
