//! Unit tests of the controllers against the fake API server and a mock
//! agent (see `fixtures`). They call the reconcilers directly, one pass at a
//! time, and assert the requests each pass made.

mod branch;
mod leader;
mod sandbox;
mod tls;
mod warmpool;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::ObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use sandfork_api::agent::lease as keys;
use sandfork_api::sandbox::{BuiltinWorkload, GuestSpec};
use sandfork_api::{Sandbox, SandboxBranch, SandboxSpec};

use crate::agents::{Agents, PlainDialer};
use crate::context::{Caches, Clock, Context, FINALIZER, Settings};
use crate::error::Result;
use crate::fixtures::{FakeApi, MockAgent, Recorded, serve_agent};
use crate::metrics::Metrics;

pub const NS: &str = "team-a";
pub const NODE: &str = "node-a";

pub fn start_time() -> Timestamp {
    "2026-03-01T12:00:00Z".parse().unwrap()
}

pub struct Harness {
    pub api: FakeApi,
    pub client: kube::Client,
    pub agent: Arc<MockAgent>,
    pub endpoint: String,
    pub clock: Clock,
    pub leases: Writer<Lease>,
    lease_store: reflector::Store<Lease>,
    pub sandboxes: Writer<Sandbox>,
    sandbox_store: reflector::Store<Sandbox>,
    /// The SandboxBranch controller's cache (empty unless a test fills it).
    pub branches: Writer<SandboxBranch>,
    branch_store: reflector::Store<SandboxBranch>,
    /// The sandbox Pod cache (empty unless a test fills it).
    pub pods: Writer<Pod>,
    pod_store: reflector::Store<Pod>,
    pub ctx: Arc<Context>,
}

pub fn agent_lease(node: &str, endpoint: &str, memory_mib: u64, renewed: Timestamp) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(keys::name(node)),
            namespace: Some("sandfork-system".into()),
            labels: Some(BTreeMap::from([
                (keys::COMPONENT_LABEL.into(), keys::COMPONENT_VALUE.into()),
                (keys::NODE_LABEL.into(), node.into()),
            ])),
            annotations: Some(BTreeMap::from([
                (keys::ENDPOINT.into(), endpoint.into()),
                (keys::MEMORY_MIB.into(), memory_mib.to_string()),
                (keys::MAX_SANDBOXES.into(), "16".into()),
                (keys::KVM.into(), "true".into()),
                (keys::USERFAULTFD.into(), "true".into()),
            ])),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(node.into()),
            lease_duration_seconds: Some(30),
            renew_time: Some(MicroTime(renewed)),
            ..LeaseSpec::default()
        }),
    }
}

pub fn sandbox_object(name: &str, memory_mib: u64) -> Sandbox {
    let mut sandbox = Sandbox::new(
        name,
        SandboxSpec {
            guest: GuestSpec::builtin(BuiltinWorkload::Counter),
            memory_mib,
            vcpus: 1,
            node_selector: None,
            node_name: None,
            affinity: None,
            tolerations: Vec::new(),
            priority_class_name: None,
            resources: None,
            restore_from: None,
        },
    );
    sandbox.metadata.namespace = Some(NS.into());
    sandbox
}

/// The caches a context reads.
struct Stores {
    leases: reflector::Store<Lease>,
    sandboxes: reflector::Store<Sandbox>,
    branches: reflector::Store<SandboxBranch>,
    pods: reflector::Store<Pod>,
}

impl Harness {
    pub async fn new() -> Self {
        let clock = Clock::fixed(start_time());
        let (api, client) = FakeApi::new(clock.clone());
        api.run_pods_at_once(NODE);
        let agent = Arc::new(MockAgent::default());
        let endpoint = serve_agent(agent.clone()).await;
        let (lease_store, mut leases) = reflector::store::<Lease>();
        leases.apply_watcher_event(&watcher::Event::Apply(agent_lease(
            NODE,
            &endpoint,
            8192,
            start_time(),
        )));
        let (sandbox_store, sandboxes) = reflector::store::<Sandbox>();
        let (branch_store, branches) = reflector::store::<SandboxBranch>();
        let (pod_store, pods) = reflector::store::<Pod>();
        let stores = Stores {
            leases: lease_store.clone(),
            sandboxes: sandbox_store.clone(),
            branches: branch_store.clone(),
            pods: pod_store.clone(),
        };
        let ctx = Self::context(&client, &stores, &clock, test_settings());
        Self {
            api,
            client,
            agent,
            endpoint,
            clock,
            leases,
            lease_store,
            sandboxes,
            sandbox_store,
            branches,
            branch_store,
            pods,
            pod_store,
            ctx,
        }
    }

    fn context(
        client: &kube::Client,
        stores: &Stores,
        clock: &Clock,
        settings: Settings,
    ) -> Arc<Context> {
        Arc::new(Context::new(
            client.clone(),
            Agents::new(stores.leases.clone(), Arc::new(PlainDialer)),
            Caches {
                sandboxes: stores.sandboxes.clone(),
                branches: stores.branches.clone(),
                pods: stores.pods.clone(),
            },
            Arc::new(Metrics::default()),
            Reporter {
                controller: "sandfork-operator".into(),
                instance: Some("test".into()),
            },
            clock.clone(),
            settings,
        ))
    }

    /// A fresh operator process (new caches of its own, same cluster and agents).
    pub fn restart(&mut self) {
        self.restart_with(test_settings());
    }

    /// A fresh operator process with `settings`.
    pub fn restart_with(&mut self, settings: Settings) {
        let stores = Stores {
            leases: self.lease_store.clone(),
            sandboxes: self.sandbox_store.clone(),
            branches: self.branch_store.clone(),
            pods: self.pod_store.clone(),
        };
        self.ctx = Self::context(&self.client, &stores, &self.clock, settings);
    }

    /// The agent renews its Lease now.
    pub fn renew_agent_lease(&mut self) {
        let now = self.clock.now();
        self.add_agent_lease(NODE, 8192, now);
    }

    /// An agent (served by the same mock) registers for `node`.
    pub fn add_agent_lease(&mut self, node: &str, memory_mib: u64, renewed: Timestamp) {
        let lease = agent_lease(node, &self.endpoint, memory_mib, renewed);
        self.leases
            .apply_watcher_event(&watcher::Event::Apply(lease));
    }

    /// node-a's agent Lease is gone: no agent is registered there.
    pub fn remove_agent_lease(&mut self) {
        let lease = agent_lease(NODE, &self.endpoint, 8192, start_time());
        self.leases
            .apply_watcher_event(&watcher::Event::Delete(lease));
    }

    /// Marks a stored object deleted, as the API server does for one with
    /// finalizers.
    pub fn mark_deleted<K: kube::Resource<DynamicType = ()>>(&self, name: &str) {
        self.api.edit::<K>(Some(NS), name, |o| {
            o["metadata"]["deletionTimestamp"] = serde_json::json!("2026-03-01T12:00:00Z")
        });
    }

    pub fn sandbox(&self, name: &str) -> Option<Sandbox> {
        self.api.get::<Sandbox>(Some(NS), name)
    }

    /// The Pod of Sandbox `sandbox`.
    pub fn pod(&self, sandbox: &str) -> Option<Pod> {
        self.api
            .get::<Pod>(Some(NS), &sandfork_api::pod::name(sandbox))
    }

    /// Edits the Pod of Sandbox `sandbox`, as the scheduler or kubelet would.
    pub fn edit_pod(&self, sandbox: &str, edit: impl FnOnce(&mut serde_json::Value)) {
        self.api
            .edit::<Pod>(Some(NS), &sandfork_api::pod::name(sandbox), edit);
    }

    pub fn branch(&self, name: &str) -> Option<SandboxBranch> {
        self.api.get::<SandboxBranch>(Some(NS), name)
    }

    pub async fn reconcile_sandbox(&self, name: &str) -> Result<Action> {
        let sandbox = self
            .sandbox(name)
            .unwrap_or_else(|| panic!("Sandbox {name} exists"));
        crate::controller::reconcile(Arc::new(sandbox), self.ctx.clone()).await
    }

    pub async fn reconcile_branch(&self, name: &str) -> Result<Action> {
        let branch = self
            .branch(name)
            .unwrap_or_else(|| panic!("SandboxBranch {name} exists"));
        crate::controller::reconcile(Arc::new(branch), self.ctx.clone()).await
    }

    /// Reconciles a Sandbox until it has its finalizer and a first status.
    pub async fn settle_sandbox(&self, name: &str) {
        for _ in 0..3 {
            self.reconcile_sandbox(name)
                .await
                .expect("sandbox reconcile");
        }
    }

    /// Creates a Sandbox and brings it to Ready on node-a.
    pub async fn ready_source(&self, name: &str) -> Sandbox {
        self.api.insert(&sandbox_object(name, 256));
        self.settle_sandbox(name).await;
        let sandbox = self.sandbox(name).unwrap();
        assert!(sandbox.is_ready(), "source ready: {:?}", sandbox.status);
        sandbox
    }

    /// Requests recorded since the last `clear_requests`, without Events.
    pub fn api_requests(&self) -> Vec<Recorded> {
        self.api
            .requests()
            .into_iter()
            .filter(|r| !r.path.contains("/events"))
            .collect()
    }

    /// Reasons of the Events posted since the last `clear_requests`.
    pub fn events(&self) -> Vec<String> {
        self.api
            .requests()
            .into_iter()
            .filter(|r| r.method == Method::POST && r.path.ends_with("/events"))
            .map(|r| r.body["reason"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    pub fn agent_calls(&self, method: &str) -> Vec<String> {
        self.agent
            .calls()
            .into_iter()
            .filter(|c| c.starts_with(&format!("{method} ")))
            .collect()
    }
}

/// The condition `type_` of a status as (status, reason, message).
pub fn condition(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> (String, String, String) {
    let c = sandfork_api::conditions::find(conditions, type_)
        .unwrap_or_else(|| panic!("condition {type_} in {conditions:?}"));
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

/// The operator's settings in tests.
pub fn test_settings() -> Settings {
    Settings {
        // Tests look at the Events a pass sent as soon as it returns.
        events_in_background: false,
        // ... and at a pool's refill right after a claim.
        refill_quiet: Duration::ZERO,
        ..Settings::default()
    }
}

/// `object` as a first pass leaves it: with the operator's finalizer.
pub fn finalized<K: kube::Resource>(mut object: K) -> K {
    object.meta_mut().finalizers = Some(vec![FINALIZER.to_string()]);
    object
}

/// Whether `request` is the patch that adds our finalizer, on the
/// condition of the version read.
pub fn adds_finalizer(request: &Recorded) -> bool {
    let metadata = &request.body["metadata"];
    request.method == Method::PATCH
        && request.content_type == "application/merge-patch+json"
        && !metadata["resourceVersion"].is_null()
        && metadata["finalizers"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == FINALIZER))
}

/// Whether `request` is a server-side apply of a status with our field manager.
pub fn is_status_apply(request: &Recorded) -> bool {
    request.method == Method::PATCH
        && request.path.ends_with("/status")
        && request.content_type == "application/apply-patch+yaml"
        && request.query.get("fieldManager").map(String::as_str) == Some("sandfork-operator")
        && request.query.get("force").map(String::as_str) == Some("true")
}
