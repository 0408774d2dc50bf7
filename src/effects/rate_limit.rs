//! EC2's account request buckets, kept on this side of the wire: every
//! call of a process takes a token from its family's bucket before it is
//! sent, and waits for one when the bucket is empty.
//!
//! EC2 throttles per account and region with token buckets per family of
//! actions (RunInstances: 5 burst, 2/s; other mutating calls: 50, 5/s;
//! Describe and other non-mutating calls: 100, 20/s). Without a bucket
//! here, 200 sessions launched together get `RequestLimitExceeded` and burn
//! their retry budgets; with one, they queue. Waiting is safe: the intent
//! of the effect that makes the call is already committed.
//!
//! Invariant: a call never leaves before its token; tokens are taken in the
//! order calls asked (a reservation may drive the bucket below zero, and
//! the caller sleeps until its token would have refilled), so nobody
//! starves. The buckets run on real (tokio) time: they guard EC2's clock,
//! not the session's.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use strum::{EnumCount, EnumIter, IntoEnumIterator};
use tokio::time::Instant;

/// Added to every wait: sent exactly when its token refills, a call could
/// reach EC2 a rounding error early (EC2's bucket at 0.9999 of a token) and
/// be throttled, and its retry would wait for another token. The margin
/// shifts sends, it does not slow the rate.
const MARGIN: Duration = Duration::from_millis(25);

/// Which of EC2's buckets an action draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, EnumCount, EnumIter, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum CallFamily {
    RunInstances,
    /// Every other call that changes something.
    Mutating,
    /// Describe*, Get*, List*: calls that only look.
    Describe,
}

impl CallFamily {
    pub fn of(action: &str) -> CallFamily {
        if action == "RunInstances" {
            CallFamily::RunInstances
        } else if ["Describe", "Get", "List"]
            .iter()
            .any(|prefix| action.starts_with(prefix))
        {
            CallFamily::Describe
        } else {
            CallFamily::Mutating
        }
    }
}

/// A bucket's size and how fast it refills.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketSize {
    pub burst: f64,
    pub per_second: f64,
}

impl BucketSize {
    /// EC2's default for a family (the account-level request limits).
    pub fn ec2_default(family: CallFamily) -> BucketSize {
        let (burst, per_second) = match family {
            CallFamily::RunInstances => (5.0, 2.0),
            CallFamily::Mutating => (50.0, 5.0),
            CallFamily::Describe => (100.0, 20.0),
        };
        BucketSize { burst, per_second }
    }
}

struct Bucket {
    size: BucketSize,
    /// Below zero when calls are queued for tokens not yet refilled.
    tokens: f64,
    at: Instant,
    /// Tokens handed out so far.
    granted: u64,
}

impl Bucket {
    fn full(size: BucketSize) -> Bucket {
        Bucket {
            size,
            tokens: size.burst,
            at: Instant::now(),
            granted: 0,
        }
    }

    /// Takes a token; how long to wait before it is really there.
    fn reserve(&mut self, now: Instant) -> Duration {
        let refilled = now.saturating_duration_since(self.at).as_secs_f64() * self.size.per_second;
        self.tokens = (self.tokens + refilled).min(self.size.burst) - 1.0;
        self.at = now;
        self.granted += 1;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.size.per_second) + MARGIN
        }
    }
}

/// The buckets of one process; share one (behind an `Arc`, or by cloning
/// the SDK layer that holds it) across every session.
pub struct RateLimits {
    /// One per family, `None` when the family is not limited.
    buckets: [Option<Mutex<Bucket>>; CallFamily::COUNT],
}

impl RateLimits {
    /// EC2's default account buckets.
    pub fn ec2_defaults() -> RateLimits {
        RateLimits::with(BucketSize::ec2_default)
    }

    /// No waiting at all (for tests of other layers).
    pub fn unlimited() -> RateLimits {
        RateLimits {
            buckets: [None, None, None],
        }
    }

    /// Buckets of the given sizes (an account with raised limits).
    pub fn with(size_of: impl Fn(CallFamily) -> BucketSize) -> RateLimits {
        let mut buckets = [None, None, None];
        for family in CallFamily::iter() {
            buckets[family as usize] = Some(Mutex::new(Bucket::full(size_of(family))));
        }
        RateLimits { buckets }
    }

    /// Waits until `action` may be sent.
    pub async fn wait_turn(&self, action: &str) {
        let family = CallFamily::of(action);
        let Some(bucket) = &self.buckets[family as usize] else {
            return;
        };
        let now = Instant::now();
        let wait = lock(bucket).reserve(now);
        if !wait.is_zero() {
            crate::telemetry::rate_limit_wait(family.into(), wait);
            tokio::time::sleep_until(now + wait).await;
        }
    }
}

impl RateLimits {
    /// How many tokens `family`'s bucket has handed out: one per call
    /// sent, retries included (0 for a family that is not limited).
    pub fn granted(&self, family: CallFamily) -> u64 {
        self.buckets[family as usize]
            .as_ref()
            .map_or(0, |bucket| lock(bucket).granted)
    }
}

impl Default for RateLimits {
    fn default() -> RateLimits {
        RateLimits::ec2_defaults()
    }
}

fn lock(bucket: &Mutex<Bucket>) -> MutexGuard<'_, Bucket> {
    // A bucket is two numbers and an instant: never left torn.
    bucket.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_fall_into_ec2s_families() {
        assert_eq!(CallFamily::of("RunInstances"), CallFamily::RunInstances);
        assert_eq!(CallFamily::of("DescribeInstances"), CallFamily::Describe);
        assert_eq!(CallFamily::of("GetConsoleOutput"), CallFamily::Describe);
        assert_eq!(CallFamily::of("TerminateInstances"), CallFamily::Mutating);
        assert_eq!(CallFamily::of("CreateKeyPair"), CallFamily::Mutating);
        assert_eq!(
            BucketSize::ec2_default(CallFamily::RunInstances),
            BucketSize {
                burst: 5.0,
                per_second: 2.0
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_goes_at_once_then_calls_queue_at_the_refill_rate() {
        let limits = RateLimits::ec2_defaults();
        let start = Instant::now();
        let mut sent = Vec::new();
        for _ in 0..9 {
            limits.wait_turn("RunInstances").await;
            sent.push(start.elapsed());
        }
        // Five at once, then one every 0.5 s.
        assert!(sent[..5].iter().all(|t| t.is_zero()), "{sent:?}");
        for (i, at) in sent[5..].iter().enumerate() {
            let expected = Duration::from_millis(500 * (i as u64 + 1)) + MARGIN;
            assert!(
                at.abs_diff(expected) < Duration::from_millis(5),
                "call {} at {at:?}",
                i + 5
            );
        }
        // Other families have their own buckets.
        let before = Instant::now();
        limits.wait_turn("DescribeInstances").await;
        assert!(before.elapsed().is_zero());
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_are_served_in_order_without_exceeding_the_rate() {
        let limits = std::sync::Arc::new(RateLimits::ec2_defaults());
        let start = Instant::now();
        let calls: Vec<_> = (0..25)
            .map(|_| {
                let limits = std::sync::Arc::clone(&limits);
                tokio::spawn(async move {
                    limits.wait_turn("RunInstances").await;
                    start.elapsed()
                })
            })
            .collect();
        let mut sent = Vec::new();
        for call in calls {
            sent.push(call.await.expect("task"));
        }
        sent.sort();
        // In any window, at most burst + rate × window calls left.
        for (i, first) in sent.iter().enumerate() {
            for (j, later) in sent.iter().enumerate().skip(i) {
                let window = (*later - *first).as_secs_f64();
                let allowed = 5.0 + 2.0 * window + 1e-6;
                assert!(
                    ((j - i + 1) as f64) <= allowed,
                    "{} calls in {window} s",
                    j - i + 1
                );
            }
        }
        let last = sent.last().copied().unwrap_or_default();
        assert!(
            last.abs_diff(Duration::from_secs(10) + MARGIN) < Duration::from_millis(5),
            "{last:?}"
        );
        assert_eq!(RateLimits::unlimited().buckets.iter().flatten().count(), 0);
    }
}
