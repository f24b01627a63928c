//! What every reconcile shares: the API client, the agents, the event
//! recorder, metrics, a clock and the settings.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use sandfork_api::{Sandbox, SandboxBranch};

use crate::agents::Agents;
use crate::events::{self, Pending, Queue};
use crate::metrics::Metrics;
use crate::pod::VmmImage;

/// The field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "sandfork-operator";
/// The finalizer on every kind the operator reconciles.
pub const FINALIZER: &str = "sandfork.dev/cleanup";

/// The image sandbox Pods run when none is configured: the agent's.
pub const DEFAULT_VMM_IMAGE: &str = "docker.io/sandfork/agent:0.1.0";
/// Its pull policy when none is configured.
pub const DEFAULT_VMM_IMAGE_PULL_POLICY: &str = "IfNotPresent";

/// Timings of the controllers, and what sandbox Pods run.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How often to look again while something is in progress.
    pub poll: Duration,
    /// How often to look again at a settled object (a VM can die).
    pub resync: Duration,
    /// How long to keep trying to reach an agent to clean up a deleted
    /// object before giving up and releasing the finalizer.
    pub unreachable_agent_grace: Duration,
    /// Timeout of an ordinary agent call.
    pub call_timeout: Duration,
    /// Timeout of CreateSandbox and RestoreBranch.
    pub start_timeout: Duration,
    /// Timeout of CaptureSandbox (bounded further by the failure deadline).
    pub capture_timeout: Duration,
    /// Longest backoff after repeated transient errors.
    pub max_backoff: Duration,
    /// A reconcile that runs longer is abandoned and retried.
    pub reconcile_timeout: Duration,
    /// The image of the `vmm` container of sandbox Pods.
    pub vmm_image: VmmImage,
    /// Queue Events to be sent one at a time, not waiting for the API
    /// server's answer; otherwise each is sent before its pass goes on.
    pub events_in_background: bool,
    /// A warm pool refills once this long has passed without a claim of
    /// its Pods: starting Pods takes the CPU a burst of forks needs.
    pub refill_quiet: Duration,
    /// ... but never waits longer than this after a burst's first claim.
    pub refill_max_wait: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            poll: Duration::from_secs(2),
            resync: Duration::from_secs(30),
            unreachable_agent_grace: Duration::from_secs(120),
            call_timeout: Duration::from_secs(15),
            start_timeout: Duration::from_secs(60),
            capture_timeout: Duration::from_secs(600),
            max_backoff: Duration::from_secs(300),
            reconcile_timeout: Duration::from_secs(720),
            vmm_image: VmmImage {
                image: DEFAULT_VMM_IMAGE.into(),
                pull_policy: DEFAULT_VMM_IMAGE_PULL_POLICY.into(),
            },
            events_in_background: true,
            refill_quiet: Duration::from_millis(500),
            refill_max_wait: Duration::from_secs(5),
        }
    }
}

/// The operator's idea of now; tests set it.
#[derive(Clone, Default)]
pub struct Clock(Option<Arc<Mutex<Timestamp>>>);

impl Clock {
    pub fn system() -> Self {
        Self(None)
    }

    pub fn fixed(at: Timestamp) -> Self {
        Self(Some(Arc::new(Mutex::new(at))))
    }

    pub fn now(&self) -> Timestamp {
        match &self.0 {
            None => Timestamp::now(),
            Some(at) => *at.lock().expect("clock lock"),
        }
    }

    /// Moves a fixed clock forward.
    pub fn advance(&self, by: Duration) {
        if let Some(at) = &self.0 {
            let mut at = at.lock().expect("clock lock");
            *at = at.checked_add(by).expect("clock in range");
        }
    }
}

/// The controllers' caches of the objects they watch.
#[derive(Clone)]
pub struct Caches {
    /// All Sandboxes (the Sandbox controller's cache).
    pub sandboxes: Store<Sandbox>,
    /// All SandboxBranches (the SandboxBranch controller's cache).
    pub branches: Store<SandboxBranch>,
    /// Sandbox Pods (labelled `app.kubernetes.io/component=sandbox`), warm ones too.
    pub pods: Store<Pod>,
}

pub struct Context {
    pub client: Client,
    pub agents: Agents,
    /// To spare lookups of what they already show.
    pub caches: Caches,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// Where Events wait to be sent, when sent in the background.
    events: Option<Queue<Pending>>,
    pub clock: Clock,
    pub settings: Settings,
    failures: Mutex<HashMap<String, u32>>,
    /// Warm Pods this operator claimed or is claiming, by UID, and when.
    warm_claims: Mutex<HashMap<String, Instant>>,
    /// The warm Pod this operator claimed for each Sandbox (by UID), and
    /// when: its cache may not show the claim yet.
    claimed_for: Mutex<HashMap<String, (String, Instant)>>,
    /// Claims of each pool's Pods (by `namespace/name`): when the current
    /// burst of claims began, and its last claim.
    pool_claims: Mutex<HashMap<String, (Instant, Instant)>>,
    /// Versions of objects (by `kind/namespace/name`) that this operator's
    /// own writes replaced, and when it last wrote: a pass given one of them
    /// works from a copy its cache has yet to update.
    superseded: Mutex<HashMap<String, (Vec<String>, Instant)>>,
}

/// How long this operator remembers the versions its writes replaced: far
/// longer than its cache takes to show a write.
const SUPERSEDED_MEMORY: Duration = Duration::from_secs(60);

impl Context {
    pub fn new(
        client: Client,
        agents: Agents,
        caches: Caches,
        metrics: Arc<Metrics>,
        reporter: Reporter,
        clock: Clock,
        settings: Settings,
    ) -> Self {
        let recorder = Recorder::new(client.clone(), reporter);
        Self {
            events: settings
                .events_in_background
                .then(|| events::event_queue(recorder.clone())),
            recorder,
            client,
            agents,
            caches,
            metrics,
            clock,
            settings,
            failures: Mutex::new(HashMap::new()),
            warm_claims: Mutex::new(HashMap::new()),
            claimed_for: Mutex::new(HashMap::new()),
            pool_claims: Mutex::new(HashMap::new()),
            superseded: Mutex::new(HashMap::new()),
        }
    }

    /// Publishes an Event about `obj`; failing to publish is only logged.
    pub async fn event<K>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) where
        K: Resource<DynamicType = ()>,
    {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        self.publish(obj, event).await;
    }

    /// Publishes `event` about `obj`; failing to publish is only logged.
    /// Unless the settings say otherwise it is queued: an Event is an API
    /// write, and a fork's path would wait for each.
    pub async fn publish<K>(&self, obj: &K, event: Event)
    where
        K: Resource<DynamicType = ()>,
    {
        let pending = Pending {
            event,
            reference: obj.object_ref(&()),
            name: obj.name_any(),
        };
        match &self.events {
            Some(queue) => {
                if let Err(dropped) = queue.push(pending) {
                    tracing::warn!(object = %dropped.name, reason = dropped.event.reason, "too many Events waiting to be sent; dropped one");
                }
            }
            None => events::send(&self.recorder, pending).await,
        }
    }

    /// The next backoff for `key` after a transient error: 1 s, 2 s, 4 s, ...
    pub fn backoff(&self, key: String) -> Duration {
        let mut failures = self.failures.lock().expect("failures lock");
        let count = failures.entry(key).or_insert(0);
        *count = count.saturating_add(1);
        let secs = 1u64
            .checked_shl(count.saturating_sub(1).min(20))
            .unwrap_or(u64::MAX);
        Duration::from_secs(secs).min(self.settings.max_backoff)
    }

    /// Keeps the warm Pod `uid` from other claims of this operator for
    /// `hold`; false if one holds it already. The API server's
    /// resourceVersion check is what makes a claim safe: this only spares
    /// concurrent claims from racing for the Pod the cache shows first.
    pub fn reserve_warm_pod(&self, uid: &str, hold: Duration) -> bool {
        let mut claims = self.warm_claims.lock().expect("warm claims lock");
        let now = Instant::now();
        claims.retain(|_, at| now.duration_since(*at) < hold);
        match claims.entry(uid.to_string()) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(entry) => {
                entry.insert(now);
                true
            }
        }
    }

    /// Records that this operator claimed warm Pod `pod` for the Sandbox
    /// with UID `sandbox`; remembered for `hold`.
    pub fn record_claim(&self, sandbox: &str, pod: &str, hold: Duration) {
        let mut claimed = self.claimed_for.lock().expect("claims lock");
        let now = Instant::now();
        claimed.retain(|_, (_, at)| now.duration_since(*at) < hold);
        claimed.insert(sandbox.to_string(), (pod.to_string(), now));
    }

    /// The warm Pod this operator claimed for the Sandbox with UID `sandbox`.
    pub fn claimed_for(&self, sandbox: &str) -> Option<String> {
        let claimed = self.claimed_for.lock().expect("claims lock");
        claimed.get(sandbox).map(|(pod, _)| pod.clone())
    }

    /// Notes a claim of a Pod of pool `pool` (`namespace/name`).
    pub fn note_pool_claim(&self, pool: &str) {
        let mut claims = self.pool_claims.lock().expect("pool claims lock");
        let now = Instant::now();
        let quiet = self.settings.refill_quiet;
        claims
            .entry(pool.to_string())
            .and_modify(|(began, last)| {
                if now.duration_since(*last) >= quiet {
                    *began = now;
                }
                *last = now;
            })
            .or_insert((now, now));
    }

    /// How long pool `pool` should wait before it starts Pods: until its
    /// Pods have gone unclaimed for `refill_quiet`, and at most until
    /// `refill_max_wait` after the burst's first claim. `None`: no wait.
    pub fn refill_wait(&self, pool: &str) -> Option<Duration> {
        let claims = self.pool_claims.lock().expect("pool claims lock");
        let (began, last) = claims.get(pool)?;
        let now = Instant::now();
        let until =
            (*last + self.settings.refill_quiet).min(*began + self.settings.refill_max_wait);
        until
            .checked_duration_since(now)
            .filter(|wait| !wait.is_zero())
    }

    /// Notes that a write of this operator replaced version `version` of
    /// the object `key`.
    pub fn note_superseded(&self, key: &str, version: &str) {
        let mut superseded = self.superseded.lock().expect("superseded lock");
        let now = Instant::now();
        superseded.retain(|_, (_, at)| now.duration_since(*at) < SUPERSEDED_MEMORY);
        let (versions, at) = superseded
            .entry(key.to_string())
            .or_insert_with(|| (Vec::new(), now));
        versions.push(version.to_string());
        *at = now;
    }

    /// Whether `version` of the object `key` is one that this operator's
    /// writes replaced. Any other version means the cache has caught up (or
    /// another writer moved on): those noted for `key` are forgotten.
    pub fn is_superseded(&self, key: &str, version: Option<&str>) -> bool {
        let mut superseded = self.superseded.lock().expect("superseded lock");
        let Some((versions, _)) = superseded.get(key) else {
            return false;
        };
        if version.is_some_and(|version| versions.iter().any(|v| v == version)) {
            return true;
        }
        superseded.remove(key);
        false
    }

    /// Forgets the failures of `key` after a successful reconcile.
    pub fn succeeded(&self, key: &str) {
        self.failures.lock().expect("failures lock").remove(key);
    }
}

/// `kind/namespace/name`, the key of an object in backoff bookkeeping.
pub fn object_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.meta().namespace.as_deref().unwrap_or_default(),
        obj.meta().name.as_deref().unwrap_or_default()
    )
}
