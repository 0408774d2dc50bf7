//! Answers of the validation calls (DescribeImages, DescribeSubnets,
//! DescribeSecurityGroups, DescribeKeyPairs) and of the spot market's
//! (GetSpotPlacementScores, DescribeSpotPriceHistory) shared by the
//! sessions of a process for a short time: N sessions started from one
//! config make each call once, not N times. EC2 moves spot prices and
//! scores over minutes, so a minute-old answer ranks zones as well.
//!
//! Invariant: an answer is served for at most its time to live after the
//! call that produced it was sent; callers that ask while a call is in
//! flight wait for that call (one call, not one per caller, and its failure
//! too); a failure is never served to a later caller; an answer about a
//! key pair is forgotten as soon as this process creates, imports or
//! deletes that key pair.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio::time::Instant;

use super::api::{Ec2Result, SubnetInfo};
use crate::machine::{ImageChoice, MicroUsd};
use crate::request::{AmiSelector, Arch};

/// How long a validation answer is shared by default: short beside a
/// config edit, long beside a burst of sessions started together.
pub const REMEMBER_FOR: Duration = Duration::from_secs(60);

/// One kind of answer, by the request that produced it.
pub struct Remembered<K, V> {
    ttl: Duration,
    entries: Mutex<HashMap<K, Entry<V>>>,
}

struct Entry<V> {
    asked_at: Instant,
    /// A failure stays only until its call's waiters have it.
    answer: Arc<OnceCell<Ec2Result<V>>>,
}

impl<K: Eq + Hash + Clone, V: Clone> Remembered<K, V> {
    pub fn new(ttl: Duration) -> Remembered<K, V> {
        Remembered {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The answer to `key` asked less than the time to live ago, or the
    /// answer of `fetch` (shared with whoever asks while it runs).
    pub async fn get_or_fetch<F, Fut>(&self, key: &K, fetch: F) -> Ec2Result<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Ec2Result<V>>,
    {
        if self.ttl.is_zero() {
            return fetch().await;
        }
        let cell = {
            let mut entries = self.lock();
            let now = Instant::now();
            let ttl = self.ttl;
            // Expired entries go as new ones come, so the map stays as
            // small as the set of configs in use.
            entries.retain(|_, e| now.duration_since(e.asked_at) < ttl);
            let entry = entries.entry(key.clone()).or_insert_with(|| Entry {
                asked_at: now,
                answer: Arc::new(OnceCell::new()),
            });
            Arc::clone(&entry.answer)
        };
        let answer = cell.get_or_init(fetch).await.clone();
        if answer.is_err() {
            // Everyone waiting on this call has its failure; the next
            // caller asks again.
            let mut entries = self.lock();
            if entries
                .get(key)
                .is_some_and(|e| Arc::ptr_eq(&e.answer, &cell))
            {
                entries.remove(key);
            }
        }
        answer
    }

    /// Forgets the answer to `key` (this process is about to change it).
    pub fn forget(&self, key: &K) {
        self.lock().remove(key);
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, Entry<V>>> {
        // A map of shared cells: a panic elsewhere cannot tear it.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The answers a process shares.
pub struct SharedAnswers {
    pub images: Remembered<(AmiSelector, Arch), Option<ImageChoice>>,
    pub subnets: Remembered<Vec<String>, Vec<SubnetInfo>>,
    pub security_groups: Remembered<Vec<String>, ()>,
    pub key_pairs: Remembered<String, bool>,
    /// By instance type: scores by zone id.
    pub spot_scores: Remembered<String, HashMap<String, u8>>,
    /// By instance type, product description and zones: prices by zone.
    pub spot_prices: Remembered<(String, String, Vec<String>), HashMap<String, MicroUsd>>,
}

impl SharedAnswers {
    pub fn new(ttl: Duration) -> SharedAnswers {
        SharedAnswers {
            images: Remembered::new(ttl),
            subnets: Remembered::new(ttl),
            security_groups: Remembered::new(ttl),
            key_pairs: Remembered::new(ttl),
            spot_scores: Remembered::new(ttl),
            spot_prices: Remembered::new(ttl),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::effects::api::Ec2Failure;
    use crate::error_code::ErrorClass;

    #[tokio::test(start_paused = true)]
    async fn callers_share_one_call_until_the_answer_expires() {
        let memo: Remembered<String, u32> = Remembered::new(REMEMBER_FOR);
        let calls = AtomicU32::new(0);
        let fetch = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            // In flight for a while: the other callers wait for it.
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(7)
        };
        let key = "ami-1".to_string();
        let answers =
            futures_util::future::join_all((0..50).map(|_| memo.get_or_fetch(&key, fetch))).await;
        assert!(answers.iter().all(|a| a == &Ok(7)));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tokio::time::advance(REMEMBER_FOR).await;
        assert_eq!(memo.get_or_fetch(&key, fetch).await, Ok(7));
        assert_eq!(calls.load(Ordering::SeqCst), 2, "expired, asked again");
        memo.forget(&key);
        assert_eq!(memo.get_or_fetch(&key, fetch).await, Ok(7));
        assert_eq!(calls.load(Ordering::SeqCst), 3, "forgotten, asked again");
    }

    #[tokio::test(start_paused = true)]
    async fn callers_waiting_on_a_failing_call_share_its_failure() {
        let memo: Remembered<u8, u32> = Remembered::new(REMEMBER_FOR);
        let calls = AtomicU32::new(0);
        let failing = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            Err(Ec2Failure {
                answer_lost_before: false,
                action: "GetSpotPlacementScores",
                code: None,
                class: ErrorClass::Transient,
                message: "timeout".into(),
            })
        };
        let answers =
            futures_util::future::join_all((0..20).map(|_| memo.get_or_fetch(&1, failing))).await;
        assert!(answers.iter().all(Result::is_err), "{answers:?}");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "one call, not one per caller"
        );
        assert_eq!(memo.get_or_fetch(&1, || async { Ok(3) }).await, Ok(3));
    }

    #[tokio::test]
    async fn failures_are_not_remembered() {
        let memo: Remembered<u8, u32> = Remembered::new(REMEMBER_FOR);
        let failure = Ec2Failure {
            answer_lost_before: false,
            action: "DescribeImages",
            code: None,
            class: ErrorClass::Transient,
            message: "timeout".into(),
        };
        let failed = memo
            .get_or_fetch(&1, || async { Err(failure.clone()) })
            .await;
        assert_eq!(failed, Err(failure));
        assert_eq!(memo.get_or_fetch(&1, || async { Ok(3) }).await, Ok(3));
    }
}
