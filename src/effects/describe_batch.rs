//! DescribeInstances, DescribeInstanceStatus and DescribeSpotInstanceRequests
//! shared by every session of one process, after Karpenter's batcher: polls
//! that arrive close together become one call.
//!
//! EC2 throttles Describe calls per account and region (about 100 burst,
//! 20/s refill), and 1,000 sessions each polling every 2 s would ask 500/s.
//!
//! A layer over any [`Ec2Api`]: `describe_instance`, `instance_status`
//! and `spot_request` (the watcher's and the spot wait's polls) and
//! `live_instances_of_session` (cleanup's sweep, by session tag) are
//! batched; the validation calls and the spot market's (placement scores,
//! price history) are answered from [`super::remembered`] for a short
//! time; every other call passes through.
//!
//! Invariant: every poll's answer comes from a call sent after it asked,
//! and a call that fails answers everyone in it with that failure.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::keys::PrivateKeyPem;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::api::{
    Ec2Api, Ec2Result, InstanceHealth, InstanceView, LaunchSpec, LaunchedView, SpotRequestView,
    SubnetInfo, malformed,
};
use super::remembered::{REMEMBER_FOR, SharedAnswers};
use crate::machine::{ImageChoice, MicroUsd};
use crate::request::{AmiSelector, Arch, KeyAlgorithm};

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

/// The batching layer: clones share its batches.
pub struct Batched<A: Ec2Api> {
    inner: Arc<A>,
    instances: Arc<Batcher<A, Instances>>,
    statuses: Arc<Batcher<A, Statuses>>,
    spot_requests: Arc<Batcher<A, SpotRequests>>,
    sweeps: Arc<Batcher<A, Sweeps>>,
    shared: Arc<SharedAnswers>,
}

impl<A: Ec2Api> Clone for Batched<A> {
    fn clone(&self) -> Self {
        Batched {
            inner: Arc::clone(&self.inner),
            instances: Arc::clone(&self.instances),
            statuses: Arc::clone(&self.statuses),
            spot_requests: Arc::clone(&self.spot_requests),
            sweeps: Arc::clone(&self.sweeps),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<A: Ec2Api> Batched<A> {
    pub fn new(inner: A, window: BatchWindow) -> Batched<A> {
        let inner = Arc::new(inner);
        Batched {
            shared: Arc::new(SharedAnswers::new(REMEMBER_FOR)),
            instances: Batcher::new(&inner, window),
            spot_requests: Batcher::new(&inner, window),
            sweeps: Batcher::new(&inner, window),
            // DescribeInstanceStatus takes at most 100 instance ids.
            statuses: Batcher::new(
                &inner,
                BatchWindow {
                    max_ids: window.max_ids.min(100),
                    ..window
                },
            ),
            inner,
        }
    }

    /// Shares validation and spot market answers for `ttl` (zero: never).
    #[must_use]
    pub fn remembering_for(mut self, ttl: Duration) -> Batched<A> {
        self.shared = Arc::new(SharedAnswers::new(ttl));
        self
    }

    pub fn inner(&self) -> &A {
        &self.inner
    }
}

/// A describe call that takes many ids and answers for each.
trait BatchedCall<A>: Send + Sync + 'static {
    type Item: Clone + Send + 'static;
    const ACTION: &'static str;
    fn call(
        api: &A,
        ids: &[String],
    ) -> impl Future<Output = Ec2Result<HashMap<String, Self::Item>>> + Send;
}

struct Instances;

impl<A: Ec2Api> BatchedCall<A> for Instances {
    type Item = InstanceView;
    const ACTION: &'static str = "DescribeInstances";
    fn call(
        api: &A,
        ids: &[String],
    ) -> impl Future<Output = Ec2Result<HashMap<String, InstanceView>>> + Send {
        api.describe_instances(ids)
    }
}

struct Statuses;

impl<A: Ec2Api> BatchedCall<A> for Statuses {
    type Item = InstanceHealth;
    const ACTION: &'static str = "DescribeInstanceStatus";
    fn call(
        api: &A,
        ids: &[String],
    ) -> impl Future<Output = Ec2Result<HashMap<String, InstanceHealth>>> + Send {
        api.describe_instance_statuses(ids)
    }
}

struct SpotRequests;

impl<A: Ec2Api> BatchedCall<A> for SpotRequests {
    type Item = SpotRequestView;
    const ACTION: &'static str = "DescribeSpotInstanceRequests";
    fn call(
        api: &A,
        ids: &[String],
    ) -> impl Future<Output = Ec2Result<HashMap<String, SpotRequestView>>> + Send {
        api.spot_requests(ids)
    }
}

/// Cleanup's sweeps: the live instances tagged with each session.
struct Sweeps;

impl<A: Ec2Api> BatchedCall<A> for Sweeps {
    type Item = Vec<String>;
    const ACTION: &'static str = "DescribeInstances";
    fn call(
        api: &A,
        session_ids: &[String],
    ) -> impl Future<Output = Ec2Result<HashMap<String, Vec<String>>>> + Send {
        api.live_instances_of_sessions(session_ids)
    }
}

type Answer<T> = Ec2Result<Option<T>>;

/// Counts a batch as being sent until dropped, and then wakes the batch
/// that waits for it.
struct Sending<'a, A, C: BatchedCall<A>>(&'a Batcher<A, C>);

impl<A, C: BatchedCall<A>> Drop for Sending<'_, A, C> {
    fn drop(&mut self) {
        self.0.sending.fetch_sub(1, Ordering::SeqCst);
        self.0.sent.notify_waiters();
    }
}

struct Batcher<A, C: BatchedCall<A>> {
    api: Arc<A>,
    window: BatchWindow,
    open: Mutex<Option<OpenBatch<C::Item>>>,
    /// Batches being sent. While one is, the next waits for it (up to its
    /// `max_wait`) and takes the ids that arrive meanwhile: the slower EC2
    /// answers, the more each call carries.
    sending: AtomicUsize,
    sent: Notify,
}

/// The batch that is still taking ids; a flusher task owns its sending.
struct OpenBatch<T> {
    waiters: HashMap<String, Vec<oneshot::Sender<Answer<T>>>>,
    first: Instant,
    newest: Instant,
    full: Arc<Notify>,
}

impl<A: Send + Sync + 'static, C: BatchedCall<A>> Batcher<A, C> {
    fn new(api: &Arc<A>, window: BatchWindow) -> Arc<Batcher<A, C>> {
        Arc::new(Batcher {
            api: Arc::clone(api),
            window,
            open: Mutex::new(None),
            sending: AtomicUsize::new(0),
            sent: Notify::new(),
        })
    }

    fn open(&self) -> MutexGuard<'_, Option<OpenBatch<C::Item>>> {
        // Only plain map and clock updates happen under the lock: a panic
        // there cannot leave it half-changed in a way that matters.
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What EC2 says of `id`, from the next batched call.
    async fn describe(self: &Arc<Self>, id: &str) -> Answer<C::Item> {
        let (answer, answered) = oneshot::channel();
        {
            let mut open = self.open();
            let now = Instant::now();
            match open.as_mut() {
                Some(batch) => {
                    batch
                        .waiters
                        .entry(id.to_string())
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
                        waiters: HashMap::from([(id.to_string(), vec![answer])]),
                        first: now,
                        newest: now,
                        full: full.clone(),
                    });
                    tokio::spawn(self.clone().send_when_due(full));
                }
            }
        }
        answered
            .await
            .unwrap_or_else(|_| Err(malformed(C::ACTION, "the batched call was abandoned")))
    }

    async fn send_when_due(self: Arc<Self>, full: Arc<Notify>) {
        loop {
            // Registered before `sending` is read, so an end of sending
            // between the two still wakes this task.
            let sent = self.sent.notified();
            let due = {
                let open = self.open();
                let Some(batch) = open.as_ref() else { return };
                if batch.waiters.len() >= self.window.max_ids {
                    break;
                }
                let latest = batch.first + self.window.max_wait;
                if self.sending.load(Ordering::SeqCst) > 0 {
                    latest
                } else {
                    (batch.newest + self.window.idle).min(latest)
                }
            };
            if Instant::now() >= due {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = full.notified() => {}
                _ = sent => {}
            }
        }
        self.sending.fetch_add(1, Ordering::SeqCst);
        let _sending = Sending(&self);
        // Later callers start the next batch from here on.
        let Some(batch) = self.open().take() else {
            return;
        };
        // Ids may still have joined after the batch filled: one call per
        // `max_ids`, the most values a call takes.
        let ids: Vec<String> = batch.waiters.keys().cloned().collect();
        let mut waiters = batch.waiters;
        for chunk in ids.chunks(self.window.max_ids.max(1)) {
            let answers = C::call(&self.api, chunk).await;
            for id in chunk {
                let answer = match &answers {
                    Ok(found) => Ok(found.get(id).cloned()),
                    Err(failure) => Err(failure.clone()),
                };
                for waiter in waiters.remove(id).unwrap_or_default() {
                    // A caller that stopped waiting needs no answer.
                    let _ = waiter.send(answer.clone());
                }
            }
        }
    }
}

impl<A: Ec2Api> Ec2Api for Batched<A> {
    async fn describe_instance(&self, id: &str) -> Ec2Result<Option<InstanceView>> {
        self.instances.describe(id).await
    }

    async fn instance_status(&self, id: &str) -> Ec2Result<Option<InstanceHealth>> {
        self.statuses.describe(id).await
    }

    async fn describe_instance_statuses(
        &self,
        ids: &[String],
    ) -> Ec2Result<HashMap<String, InstanceHealth>> {
        self.inner.describe_instance_statuses(ids).await
    }

    async fn find_image(&self, ami: &AmiSelector, arch: Arch) -> Ec2Result<Option<ImageChoice>> {
        let fetch = || self.inner.find_image(ami, arch);
        self.shared
            .images
            .get_or_fetch(&(ami.clone(), arch), fetch)
            .await
    }

    fn region(&self) -> String {
        self.inner.region()
    }

    async fn describe_subnets(&self, ids: &[String]) -> Ec2Result<Vec<SubnetInfo>> {
        let fetch = || self.inner.describe_subnets(ids);
        self.shared.subnets.get_or_fetch(&ids.to_vec(), fetch).await
    }

    async fn some_subnets(&self, limit: usize) -> Ec2Result<Vec<SubnetInfo>> {
        self.inner.some_subnets(limit).await
    }

    async fn some_security_groups(
        &self,
        vpc: Option<&str>,
        limit: usize,
    ) -> Ec2Result<Vec<String>> {
        self.inner.some_security_groups(vpc, limit).await
    }

    async fn check_security_groups(&self, ids: &[String]) -> Ec2Result<()> {
        let fetch = || self.inner.check_security_groups(ids);
        let groups = &self.shared.security_groups;
        groups.get_or_fetch(&ids.to_vec(), fetch).await
    }

    async fn instance_type_zones(
        &self,
        instance_type: &str,
        zones: &[String],
    ) -> Ec2Result<Vec<String>> {
        self.inner.instance_type_zones(instance_type, zones).await
    }

    async fn key_pair_exists(&self, name: &str) -> Ec2Result<bool> {
        let fetch = || self.inner.key_pair_exists(name);
        let key_pairs = &self.shared.key_pairs;
        key_pairs.get_or_fetch(&name.to_string(), fetch).await
    }

    async fn create_key_pair(
        &self,
        name: &str,
        algorithm: KeyAlgorithm,
        tags: &[(String, String)],
    ) -> Ec2Result<PrivateKeyPem> {
        // Forgotten before and after: an answer lost on the way still changed it.
        self.shared.key_pairs.forget(&name.to_string());
        let answer = self.inner.create_key_pair(name, algorithm, tags).await;
        self.shared.key_pairs.forget(&name.to_string());
        answer
    }

    async fn import_key_pair(
        &self,
        name: &str,
        public_key: &str,
        tags: &[(String, String)],
    ) -> Ec2Result<()> {
        self.shared.key_pairs.forget(&name.to_string());
        let answer = self.inner.import_key_pair(name, public_key, tags).await;
        self.shared.key_pairs.forget(&name.to_string());
        answer
    }

    async fn dry_run_key_pair(
        &self,
        name: &str,
        public_key: Option<&str>,
        tags: &[(String, String)],
    ) -> Ec2Result<()> {
        self.inner.dry_run_key_pair(name, public_key, tags).await
    }

    async fn delete_key_pair(&self, name: &str) -> Ec2Result<()> {
        self.shared.key_pairs.forget(&name.to_string());
        let answer = self.inner.delete_key_pair(name).await;
        self.shared.key_pairs.forget(&name.to_string());
        answer
    }

    async fn run_instance(&self, spec: LaunchSpec<'_>) -> Ec2Result<LaunchedView> {
        self.inner.run_instance(spec).await
    }

    async fn spot_placement_scores(&self, instance_type: &str) -> Ec2Result<HashMap<String, u8>> {
        let fetch = || self.inner.spot_placement_scores(instance_type);
        let scores = &self.shared.spot_scores;
        scores.get_or_fetch(&instance_type.to_string(), fetch).await
    }

    async fn spot_prices(
        &self,
        instance_type: &str,
        product_description: &str,
        zones: &[String],
    ) -> Ec2Result<HashMap<String, MicroUsd>> {
        let fetch = || {
            self.inner
                .spot_prices(instance_type, product_description, zones)
        };
        let key = (
            instance_type.to_string(),
            product_description.to_string(),
            zones.to_vec(),
        );
        self.shared.spot_prices.get_or_fetch(&key, fetch).await
    }

    async fn spot_request(&self, request_id: &str) -> Ec2Result<Option<SpotRequestView>> {
        self.spot_requests.describe(request_id).await
    }

    async fn spot_requests(&self, ids: &[String]) -> Ec2Result<HashMap<String, SpotRequestView>> {
        self.inner.spot_requests(ids).await
    }

    async fn cancel_spot_request(&self, request_id: &str) -> Ec2Result<Option<String>> {
        self.inner.cancel_spot_request(request_id).await
    }

    async fn describe_instances(&self, ids: &[String]) -> Ec2Result<HashMap<String, InstanceView>> {
        self.inner.describe_instances(ids).await
    }

    async fn live_instances_of_sessions(
        &self,
        session_ids: &[String],
    ) -> Ec2Result<HashMap<String, Vec<String>>> {
        self.inner.live_instances_of_sessions(session_ids).await
    }

    async fn live_instances_of_session(&self, session_id: &str) -> Ec2Result<Vec<String>> {
        Ok(self.sweeps.describe(session_id).await?.unwrap_or_default())
    }

    async fn terminate_instance(&self, id: &str) -> Ec2Result<()> {
        self.inner.terminate_instance(id).await
    }

    async fn console_output(&self, id: &str, latest: bool) -> Ec2Result<Option<Vec<u8>>> {
        self.inner.console_output(id, latest).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// An API whose every call takes 100 ms and answers each id with the
    /// number of the call that carried it.
    #[derive(Default)]
    struct SlowEcho {
        calls: AtomicUsize,
    }

    struct Echo;

    impl BatchedCall<SlowEcho> for Echo {
        type Item = usize;
        const ACTION: &'static str = "DescribeInstances";
        async fn call(api: &SlowEcho, ids: &[String]) -> Ec2Result<HashMap<String, usize>> {
            let call = api.calls.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(ids.iter().map(|id| (id.clone(), call)).collect())
        }
    }

    const WINDOW: BatchWindow = BatchWindow {
        idle: Duration::from_millis(20),
        max_wait: Duration::from_millis(200),
        max_ids: 200,
    };

    /// Asks for `id` after `after`; which call answered, and when.
    async fn ask(
        batcher: &Arc<Batcher<SlowEcho, Echo>>,
        id: &str,
        after: u64,
    ) -> (Option<usize>, Duration) {
        let start = Instant::now();
        tokio::time::sleep(Duration::from_millis(after)).await;
        let answer = batcher.describe(id).await.expect("answer");
        (answer, start.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_waits_for_the_call_in_flight_and_takes_the_ids_that_come_meanwhile() {
        let api = Arc::new(SlowEcho::default());
        let batcher: Arc<Batcher<SlowEcho, Echo>> = Batcher::new(&api, WINDOW);
        // a is sent at 20 ms and answered at 120 ms. b (50 ms) and c
        // (100 ms) would each have gone alone, 20 ms after they asked.
        let (a, b, c) = tokio::join!(
            ask(&batcher, "a", 0),
            ask(&batcher, "b", 50),
            ask(&batcher, "c", 100)
        );
        assert_eq!(api.calls.load(Ordering::SeqCst), 2);
        assert_eq!((a.0, b.0, c.0), (Some(1), Some(2), Some(2)));
        // b and c were sent when a's call ended, at 120 ms.
        assert_eq!(b.1, Duration::from_millis(220));
        assert_eq!(c.1, Duration::from_millis(220));
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_waits_for_the_call_in_flight_no_longer_than_its_max_wait() {
        let api = Arc::new(SlowEcho::default());
        let window = BatchWindow {
            max_wait: Duration::from_millis(50),
            ..WINDOW
        };
        let batcher: Arc<Batcher<SlowEcho, Echo>> = Batcher::new(&api, window);
        let (a, b) = tokio::join!(ask(&batcher, "a", 0), ask(&batcher, "b", 30));
        assert_eq!((a.0, b.0), (Some(1), Some(2)));
        // Sent at 80 ms (30 + 50), beside a's call, not after it.
        assert_eq!(b.1, Duration::from_millis(180));
    }
}
