//! Time as the engine sees it: the machine's `now` and the waits between
//! polls and retries come from one [`Clock`], so tests and benchmarks can
//! run hours of provisioning time without sleeping.
//!
//! Invariant: the machine never reads a clock; the driver reads this one and
//! passes `now` in. Infrastructure timers (lease renewal, batching windows,
//! call timeouts) stay on real time: they guard real resources.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::machine::Timestamp;

/// A boxed wait, so the clock can live behind `Arc<dyn Clock>`.
pub type Wait<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
    /// Resolves once `now()` has reached `at`.
    fn sleep_until(&self, at: Timestamp) -> Wait<'_>;
}

/// The wall clock and tokio's timer.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        wall_clock()
    }

    fn sleep_until(&self, at: Timestamp) -> Wait<'_> {
        let wait = self.now().millis_until(at);
        Box::pin(tokio::time::sleep(Duration::from_millis(wait)))
    }
}

/// Milliseconds since the Unix epoch by the system clock.
pub fn wall_clock() -> Timestamp {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    Timestamp(u64::try_from(millis).unwrap_or(u64::MAX))
}

/// A clock that moves only when told to, or when someone sleeps on it: a
/// sleep jumps the clock to its deadline at once. Driving one session, this
/// replays its waits exactly without spending them; sessions driven side by
/// side see each other's jumps, so their deadlines come sooner than on a
/// real clock (fine for tests of one session's logic, not for timing).
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<Timestamp>,
}

impl ManualClock {
    pub fn starting_at(at: Timestamp) -> ManualClock {
        ManualClock {
            now: Mutex::new(at),
        }
    }

    pub fn advance(&self, by: Duration) {
        let mut now = self.lock();
        *now = now.plus(by);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Timestamp> {
        // A timestamp cannot be left half-written: a poisoned lock is fine.
        self.now.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.lock()
    }

    fn sleep_until(&self, at: Timestamp) -> Wait<'_> {
        {
            let mut now = self.lock();
            *now = (*now).max(at);
        }
        // Still a suspension point, so other tasks get their turn.
        Box::pin(tokio::task::yield_now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_clock_jumps_to_the_deadline_of_a_sleep() {
        let clock = ManualClock::starting_at(Timestamp(1_000));
        clock.sleep_until(Timestamp(61_000)).await;
        assert_eq!(clock.now(), Timestamp(61_000));
        // A deadline in the past does not move it back.
        clock.sleep_until(Timestamp(5)).await;
        assert_eq!(clock.now(), Timestamp(61_000));
        clock.advance(Duration::from_secs(1));
        assert_eq!(clock.now(), Timestamp(62_000));
    }

    #[tokio::test]
    async fn the_system_clock_sleeps_for_real() {
        let clock = SystemClock;
        let start = std::time::Instant::now();
        clock
            .sleep_until(clock.now().plus(Duration::from_millis(30)))
            .await;
        assert!(start.elapsed() >= Duration::from_millis(25));
    }
}
