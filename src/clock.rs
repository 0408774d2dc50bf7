//! Time as the engine sees it: the machine's `now` and the waits between
//! polls and retries come from one [`Clock`], so tests and benchmarks can
//! run hours of provisioning time without sleeping.
//!
//! Invariant: the machine never reads a clock; the driver reads this one and
//! passes `now` in. Infrastructure timers (lease renewal, batching windows,
//! call timeouts) stay on real time: they guard real resources.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Wall time that can skip ahead. Sleeps wait on the real timer, and
/// [`SkippingClock::skip_if_all_asleep`] moves the clock at once to the
/// earliest sleeper's deadline and wakes it. A bench that knows nothing
/// is happening but waiting (every drive asleep on this clock, no call in
/// flight) skips the wait instead of spending it; work still takes the
/// real time it takes, unlike on a [`ManualClock`].
#[derive(Debug)]
pub struct SkippingClock {
    /// Milliseconds skipped so far: `now` is the wall clock plus this.
    /// Every skip is announced here, so sleepers recompute their wait.
    skipped_ms: tokio::sync::watch::Sender<u64>,
    /// Deadlines of the sleeps under way, by ticket.
    sleepers: Mutex<BTreeMap<u64, Timestamp>>,
    next_ticket: AtomicU64,
}

impl Default for SkippingClock {
    fn default() -> SkippingClock {
        SkippingClock {
            skipped_ms: tokio::sync::watch::Sender::new(0),
            sleepers: Mutex::default(),
            next_ticket: AtomicU64::new(0),
        }
    }
}

impl SkippingClock {
    /// How many sleeps on this clock are under way.
    pub fn asleep(&self) -> usize {
        self.lock_sleepers().len()
    }

    /// When exactly `expected` sleeps are under way and none is due yet,
    /// moves the clock to the earliest of their deadlines and wakes them
    /// (each recomputes its wait; the earliest returns); returns how far it
    /// moved. Checked and done under one lock, so a sleeper that has just
    /// woken, or one whose deadline has come, stops the skip.
    pub fn skip_if_all_asleep(&self, expected: usize) -> Duration {
        let sleepers = self.lock_sleepers();
        if sleepers.len() != expected {
            return Duration::ZERO;
        }
        let Some(next) = sleepers.values().min().copied() else {
            return Duration::ZERO;
        };
        let by = self.now().millis_until(next);
        if by > 0 {
            self.skipped_ms.send_modify(|skipped| *skipped += by);
        }
        Duration::from_millis(by)
    }

    /// The time skipped so far.
    pub fn skipped(&self) -> Duration {
        Duration::from_millis(*self.skipped_ms.borrow())
    }

    fn lock_sleepers(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Timestamp>> {
        // A map of deadlines cannot be left half-written: a poisoned lock is fine.
        self.sleepers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A sleep's place among a [`SkippingClock`]'s sleepers, given up when the
/// sleep ends or is dropped (a driver's `select!` drops its sleep when an
/// input arrives).
struct Sleeper<'a> {
    clock: &'a SkippingClock,
    ticket: u64,
}

impl Drop for Sleeper<'_> {
    fn drop(&mut self) {
        self.clock.lock_sleepers().remove(&self.ticket);
    }
}

impl Clock for SkippingClock {
    fn now(&self) -> Timestamp {
        wall_clock().plus(self.skipped())
    }

    fn sleep_until(&self, at: Timestamp) -> Wait<'_> {
        Box::pin(async move {
            let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
            self.lock_sleepers().insert(ticket, at);
            let _sleeper = Sleeper {
                clock: self,
                ticket,
            };
            let mut skips = self.skipped_ms.subscribe();
            loop {
                let wait = self.now().millis_until(at);
                if wait == 0 {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                    // The sender lives as long as the clock, which this borrows.
                    _ = skips.changed() => {}
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn a_skipping_clock_skips_to_the_earliest_sleep_only_when_all_are_asleep() {
        let clock = Arc::new(SkippingClock::default());
        let start = clock.now();
        let soon = tokio::spawn({
            let clock = Arc::clone(&clock);
            async move { clock.sleep_until(start.plus(Duration::from_secs(30))).await }
        });
        let later = tokio::spawn({
            let clock = Arc::clone(&clock);
            async move {
                clock
                    .sleep_until(start.plus(Duration::from_secs(600)))
                    .await
            }
        });
        while clock.asleep() < 2 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            clock.skip_if_all_asleep(3),
            Duration::ZERO,
            "a third sleeper is awake"
        );
        let skipped = clock.skip_if_all_asleep(2);
        assert!(
            (Duration::from_millis(29_000)..=Duration::from_secs(30)).contains(&skipped),
            "skipped {skipped:?}"
        );
        tokio::time::timeout(Duration::from_secs(5), soon)
            .await
            .expect("the earliest sleep woke")
            .expect("sleep task");
        assert!(clock.now() >= start.plus(Duration::from_secs(30)));
        assert_eq!(clock.asleep(), 1, "the later sleep sleeps on");
        assert!(!later.is_finished());
        later.abort();
        let _ = later.await;
        assert_eq!(clock.asleep(), 0, "a dropped sleep leaves the sleepers");
        assert_eq!(clock.skip_if_all_asleep(0), Duration::ZERO);
        assert_eq!(clock.skipped(), skipped);
    }

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
