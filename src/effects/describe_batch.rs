//! DescribeInstances shared by every session of one process, after
//! Karpenter's batcher: polls that arrive close together become one call.
//!
//! EC2 throttles Describe calls per account and region (about 100 burst,
//! 20/s refill), and 1,000 sessions each polling every 2 s would ask 500/s.
//!
//! Invariant: every caller's answer comes from a call sent after it asked,
//! and a call that fails answers everyone in it with that failure.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use aws_sdk_ec2::Client;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::ec2;
use crate::machine::Input;

/// When a batch is sent: `idle` after its newest id, `max_wait` after its
/// first, or at once when it holds `max_ids`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchWindow {
    pub idle: Duration,
    pub max_wait: Duration,
    pub max_ids: usize,
}

impl Default for BatchWindow {
    /// Short enough to vanish beside a 2 s poll interval; 200 ids is the
    /// most values EC2 takes in one filter.
    fn default() -> BatchWindow {
        BatchWindow {
            idle: Duration::from_millis(20),
            max_wait: Duration::from_millis(200),
            max_ids: 200,
        }
    }
}

pub struct DescribeBatcher {
    ec2: Client,
    window: BatchWindow,
    open: Mutex<Option<OpenBatch>>,
}

/// The batch that is still taking ids; a flusher task owns its sending.
struct OpenBatch {
    waiters: HashMap<String, Vec<oneshot::Sender<Input>>>,
    first: Instant,
    newest: Instant,
    full: Arc<Notify>,
}

impl DescribeBatcher {
    pub fn new(ec2: Client, window: BatchWindow) -> Arc<DescribeBatcher> {
        Arc::new(DescribeBatcher {
            ec2,
            window,
            open: Mutex::new(None),
        })
    }

    fn open(&self) -> MutexGuard<'_, Option<OpenBatch>> {
        // Only plain map and clock updates happen under the lock: a panic
        // there cannot leave it half-changed in a way that matters.
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What EC2 says of `instance_id`, from the next batched call.
    pub async fn describe(self: &Arc<Self>, instance_id: &str) -> Input {
        let (answer, answered) = oneshot::channel();
        {
            let mut open = self.open();
            let now = Instant::now();
            match open.as_mut() {
                Some(batch) => {
                    batch
                        .waiters
                        .entry(instance_id.to_string())
                        .or_default()
                        .push(answer);
                    batch.newest = now;
                    if batch.waiters.len() >= self.window.max_ids {
                        batch.full.notify_one();
                    }
                }
                None => {
                    let full = Arc::new(Notify::new());
                    *open = Some(OpenBatch {
                        waiters: HashMap::from([(instance_id.to_string(), vec![answer])]),
                        first: now,
                        newest: now,
                        full: full.clone(),
                    });
                    tokio::spawn(self.clone().send_when_due(full));
                }
            }
        }
        answered.await.unwrap_or_else(|_| Input::TransientFailure {
            message: "the batched DescribeInstances call was abandoned".into(),
        })
    }

    async fn send_when_due(self: Arc<Self>, full: Arc<Notify>) {
        loop {
            let due = {
                let open = self.open();
                let Some(batch) = open.as_ref() else { return };
                if batch.waiters.len() >= self.window.max_ids {
                    break;
                }
                (batch.newest + self.window.idle).min(batch.first + self.window.max_wait)
            };
            if Instant::now() >= due {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = full.notified() => {}
            }
        }
        // Later callers start the next batch from here on.
        let Some(batch) = self.open().take() else {
            return;
        };
        // Ids may still have joined after the batch filled: one call per
        // `max_ids`, the most values a filter takes.
        let ids: Vec<String> = batch.waiters.keys().cloned().collect();
        let mut waiters = batch.waiters;
        for chunk in ids.chunks(self.window.max_ids.max(1)) {
            let answers = ec2::describe_instances(&self.ec2, chunk).await;
            for id in chunk {
                let input = match &answers {
                    Ok(found) => found.get(id).cloned().unwrap_or(Input::InstanceNotVisible),
                    Err(failure) => failure.clone(),
                };
                for waiter in waiters.remove(id).unwrap_or_default() {
                    // A caller that stopped waiting needs no answer.
                    let _ = waiter.send(input.clone());
                }
            }
        }
    }
}
