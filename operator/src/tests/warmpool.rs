use http::Method;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::watcher;
use sandfork_api::conditions::READY;
use sandfork_api::warmpool::PodSource;
use sandfork_api::{SandboxWarmPool, SandboxWarmPoolSpec, labels};

use super::*;
use crate::warmpool::reason;

fn pool_object(name: &str, pods_per_node: u32, memory_mib: u64) -> SandboxWarmPool {
    let mut pool = SandboxWarmPool::new(
        name,
        SandboxWarmPoolSpec {
            pods_per_node,
            memory_mib,
            vcpus: 1,
            resources: None,
            node_names: Vec::new(),
        },
    );
    pool.metadata.namespace = Some(NS.into());
    pool
}

impl Harness {
    fn pool(&self, name: &str) -> SandboxWarmPool {
        self.api.get::<SandboxWarmPool>(Some(NS), name).unwrap()
    }

    async fn reconcile_pool(&self, name: &str) -> Result<Action> {
        crate::controller::reconcile(Arc::new(self.pool(name)), self.ctx.clone()).await
    }

    /// Makes a pool and reconciles it until its Pods exist (the fake API
    /// runs them at once).
    async fn filled_pool(&self, name: &str, pods_per_node: u32, memory_mib: u64) {
        self.api
            .insert(&pool_object(name, pods_per_node, memory_mib));
        for _ in 0..2 {
            self.reconcile_pool(name).await.expect("pool reconcile");
        }
    }

    /// The Pod cache shows what the API server holds now.
    fn cache_pods(&mut self) {
        for pod in self.api.list::<Pod>(Some(NS)) {
            self.pods.apply_watcher_event(&watcher::Event::Apply(pod));
        }
    }

    fn warm_pods(&self, pool: &str) -> Vec<Pod> {
        self.api
            .list::<Pod>(Some(NS))
            .into_iter()
            .filter(|pod| pod.labels().get(labels::WARM_POOL).map(String::as_str) == Some(pool))
            .collect()
    }
}

fn controller_kind(pod: &Pod) -> String {
    pod.owner_references()
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| o.kind.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_pool_keeps_its_pods_on_each_node_with_a_ready_agent() {
    let mut h = Harness::new().await;
    let now = h.clock.now();
    h.add_agent_lease("node-b", 8192, now);
    h.filled_pool("small", 2, 256).await;

    let pods = h.warm_pods("small");
    assert_eq!(pods.len(), 4, "2 per node on 2 nodes");
    for node in [NODE, "node-b"] {
        let on_node = pods
            .iter()
            .filter(|p| p.spec.as_ref().unwrap().node_name.as_deref() == Some(node))
            .count();
        assert_eq!(on_node, 2, "{node}");
    }
    let pod = &pods[0];
    assert!(
        pod.name_any().starts_with("warm-small-"),
        "{}",
        pod.name_any()
    );
    assert_eq!(controller_kind(pod), "SandboxWarmPool");
    assert!(!pod.labels().contains_key(labels::SANDBOX_UID));
    let container = &pod.spec.as_ref().unwrap().containers[0];
    let probe = container.startup_probe.clone().expect("a startup probe");
    assert_eq!(
        probe.exec.unwrap().command.unwrap(),
        [
            "/sandfork-agent",
            "vm-host-probe",
            "--dir",
            "/run/sandfork-vmm"
        ]
    );
    let limits = container.resources.clone().unwrap().limits.unwrap();
    assert_eq!(
        limits["memory"].0, "320Mi",
        "256 MiB guest + 64 MiB overhead"
    );

    let status = h.pool("small").status.unwrap();
    assert_eq!(status.ready_pods, 4);
    assert_eq!(status.starting_pods, 0);
    assert_eq!(status.ready_by_node[NODE], 2);
    let (ready, why, _) = condition(&status.conditions, READY);
    assert_eq!((ready.as_str(), why.as_str()), ("True", reason::PODS_READY));

    // A settled pool makes nothing more.
    h.api.clear_requests();
    h.reconcile_pool("small").await.unwrap();
    assert!(
        h.api_requests().iter().all(|r| r.method == Method::GET),
        "{:#?}",
        h.api_requests()
    );
}

#[tokio::test]
async fn a_smaller_pool_deletes_its_extra_pods_and_ended_ones_are_replaced() {
    let h = Harness::new().await;
    h.filled_pool("small", 3, 256).await;
    let pods = h.warm_pods("small");
    assert_eq!(pods.len(), 3);
    h.api.edit::<Pod>(Some(NS), &pods[0].name_any(), |pod| {
        pod["status"]["phase"] = serde_json::json!("Failed");
        pod["status"]["reason"] = serde_json::json!("Evicted");
    });
    h.api.edit::<SandboxWarmPool>(Some(NS), "small", |pool| {
        pool["spec"]["podsPerNode"] = serde_json::json!(1);
    });
    h.api.clear_requests();
    h.reconcile_pool("small").await.unwrap();

    let deleted: Vec<_> = h
        .api_requests()
        .into_iter()
        .filter(|r| r.method == Method::DELETE)
        .map(|r| r.path.rsplit('/').next().unwrap().to_string())
        .collect();
    assert_eq!(deleted.len(), 2, "the ended one and one extra: {deleted:?}");
    assert!(deleted.contains(&pods[0].name_any()));
    assert_eq!(h.warm_pods("small").len(), 1);
}

#[tokio::test]
async fn a_warm_pod_claimed_since_the_pool_listed_it_is_not_deleted() {
    let h = Harness::new().await;
    h.filled_pool("small", 1, 256).await;
    let listed = h.warm_pods("small").remove(0);
    // A claim lands between the pool's list and its delete.
    h.api.edit::<Pod>(Some(NS), &listed.name_any(), |pod| {
        pod["metadata"]["labels"][labels::SANDBOX_UID] = serde_json::json!("claimer");
        pod["metadata"]["resourceVersion"] = serde_json::json!("claimed");
    });
    let pods = kube::Api::<Pod>::namespaced(h.client.clone(), NS);

    let err = crate::warmpool::delete_pod(&pods, &listed)
        .await
        .unwrap_err();

    assert!(err.is_conflict(), "{err:?}");
    assert!(h.api.get::<Pod>(Some(NS), &listed.name_any()).is_some());
}

#[tokio::test]
async fn a_sandbox_of_the_size_class_claims_a_warm_pod_which_the_pool_replaces() {
    let mut h = Harness::new().await;
    h.filled_pool("small", 1, 256).await;
    let warm = h.warm_pods("small").remove(0);
    h.cache_pods();
    h.api.insert(&sandbox_object("vm", 256));
    h.settle_sandbox("vm").await;

    let sandbox = h.sandbox("vm").unwrap();
    assert!(sandbox.is_ready(), "{:?}", sandbox.status);
    let status = sandbox.status.clone().unwrap();
    assert_eq!(status.pod.as_deref(), Some(warm.name_any().as_str()));
    assert_eq!(status.pod_uid, warm.uid());
    assert_eq!(status.pod_source, Some(PodSource::Warm));
    assert!(h.pod("vm").is_none(), "no Pod was made for it");

    let claimed = h.api.get::<Pod>(Some(NS), &warm.name_any()).unwrap();
    assert_eq!(controller_kind(&claimed), "Sandbox");
    assert_eq!(
        claimed.labels().get(labels::SANDBOX_UID),
        sandbox.metadata.uid.as_ref()
    );
    assert_eq!(claimed.labels()[labels::SANDBOX], "vm");
    let uid = sandbox.metadata.uid.clone().unwrap();
    assert_eq!(
        h.agent.state.lock().unwrap().pod_uids.get(&uid),
        warm.uid().as_ref(),
        "the VM starts in the claimed Pod"
    );
    let claims: Vec<_> = h
        .api_requests()
        .into_iter()
        .filter(|r| r.method == Method::PATCH && r.path.contains("/pods/"))
        .collect();
    assert_eq!(claims.len(), 1);
    assert_eq!(
        claims[0].body["metadata"]["resourceVersion"],
        warm.metadata.resource_version.clone().unwrap().as_str(),
        "the claim is conditional on the version seen"
    );
    // One status write records the claimed Pod, its node and the running
    // VM, and the start's Event names the Pod: the claim adds no write.
    let status_writes = h
        .api_requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/sandboxes/vm/status"))
        .count();
    assert_eq!(status_writes, 1);
    assert_eq!(h.events(), ["Started"]);
    let started = h
        .api
        .requests()
        .into_iter()
        .find(|r| r.method == Method::POST && r.body["reason"] == "Started")
        .unwrap();
    let note = started.body["note"].as_str().unwrap();
    assert!(
        note.contains(&format!(
            "in warm Pod {} of SandboxWarmPool small",
            warm.name_any()
        )),
        "{note}"
    );
    let calls = h.agent.calls();
    assert!(
        calls[0].starts_with("CreateSandbox "),
        "no VM runs in a Pod claimed just now, so none is looked for: {calls:?}"
    );

    h.reconcile_pool("small").await.unwrap();
    let pods = h.warm_pods("small");
    assert_eq!(pods.len(), 2, "the claimed Pod and its replacement");
    assert_eq!(
        pods.iter()
            .filter(|p| controller_kind(p) == "SandboxWarmPool")
            .count(),
        1
    );
    assert!(
        h.pool("small").metadata.finalizers.is_none(),
        "the garbage collector frees a pool's Pods"
    );
}

#[tokio::test]
async fn a_burst_of_claims_delays_the_refill_until_it_pauses() {
    let mut h = Harness::new().await;
    h.filled_pool("small", 2, 256).await;
    let quiet = Duration::from_millis(300);
    h.restart_with(Settings {
        refill_quiet: quiet,
        ..test_settings()
    });
    h.cache_pods();
    h.api.insert(&sandbox_object("vm", 256));
    h.settle_sandbox("vm").await;
    assert_eq!(
        h.sandbox("vm").unwrap().status.unwrap().pod_source,
        Some(PodSource::Warm)
    );
    h.api.clear_requests();

    // Right after the claim the pool sends nothing to the API server (no
    // list, no status write, no Pod), and looks again once the claims
    // have paused.
    let action = h.reconcile_pool("small").await.unwrap();
    assert_eq!(h.api_requests().len(), 0, "{:#?}", h.api_requests());
    let settled = [
        Action::await_change(),
        Action::requeue(h.ctx.settings.resync),
        Action::requeue(h.ctx.settings.poll * 5),
    ];
    assert!(!settled.contains(&action), "{action:?}");
    assert_eq!(
        h.pool("small").status.unwrap().ready_pods,
        2,
        "not written yet"
    );

    tokio::time::sleep(quiet).await;
    h.reconcile_pool("small").await.unwrap();
    let unclaimed = h
        .warm_pods("small")
        .iter()
        .filter(|p| controller_kind(p) == "SandboxWarmPool")
        .count();
    assert_eq!(unclaimed, 2, "refilled once the claims paused");
}

#[tokio::test]
async fn two_claims_never_take_the_same_pod_even_across_a_restart() {
    let mut h = Harness::new().await;
    h.filled_pool("small", 1, 256).await;
    let warm = h.warm_pods("small").remove(0);
    // The cache shows the Pod unclaimed throughout: it lags.
    h.cache_pods();
    h.api.insert(&sandbox_object("first", 256));
    h.settle_sandbox("first").await;
    h.restart();
    h.api.insert(&sandbox_object("second", 256));
    h.settle_sandbox("second").await;

    let first = h.sandbox("first").unwrap().status.unwrap();
    let second = h.sandbox("second").unwrap().status.unwrap();
    assert_eq!(first.pod.as_deref(), Some(warm.name_any().as_str()));
    assert_eq!(first.pod_source, Some(PodSource::Warm));
    assert_eq!(
        second.pod.as_deref(),
        Some("sandbox-second"),
        "the stale claim was refused; a cold Pod was made"
    );
    assert_eq!(second.pod_source, Some(PodSource::Cold));
    assert!(h.sandbox("second").unwrap().is_ready());
    let claimed = h.api.get::<Pod>(Some(NS), &warm.name_any()).unwrap();
    assert_eq!(claimed.labels()[labels::SANDBOX], "first");
}

#[tokio::test]
async fn a_claim_whose_status_was_not_written_is_found_again_after_a_restart() {
    let mut h = Harness::new().await;
    h.filled_pool("small", 2, 256).await;
    h.cache_pods();
    h.api.insert(&finalized(sandbox_object("vm", 256)));
    // The claim lands, the status write after it fails: the operator dies here.
    h.api.fail(Method::PATCH, "/sandboxes/vm/status", 500, 1);
    assert!(h.reconcile_sandbox("vm").await.is_err());
    assert!(h.sandbox("vm").unwrap().status.is_none());
    // A new operator process starts from a full list of the Pods.
    h.restart();
    h.cache_pods();
    h.settle_sandbox("vm").await;

    let sandbox = h.sandbox("vm").unwrap();
    assert!(sandbox.is_ready());
    let owned: Vec<_> = h
        .api
        .list::<Pod>(Some(NS))
        .into_iter()
        .filter(|p| controller_kind(p) == "Sandbox")
        .collect();
    assert_eq!(
        owned.len(),
        1,
        "one Pod claimed, no second claim or cold Pod"
    );
    assert_eq!(
        sandbox.status.unwrap().pod.as_deref(),
        Some(owned[0].name_any().as_str())
    );
    assert_eq!(h.agent_calls("CreateSandbox").len(), 1);
}

#[tokio::test]
async fn only_ready_pods_of_the_same_size_class_are_claimed() {
    let mut h = Harness::new().await;
    h.filled_pool("small", 1, 256).await;
    let warm = h.warm_pods("small").remove(0);
    h.cache_pods();
    // Another size: a Pod made for it.
    h.api.insert(&sandbox_object("big", 512));
    h.settle_sandbox("big").await;
    let big = h.sandbox("big").unwrap().status.unwrap();
    assert_eq!(big.pod.as_deref(), Some("sandbox-big"));
    assert_eq!(big.pod_source, Some(PodSource::Cold));

    // The right size, but its VMM has not answered the probe yet.
    h.api.edit::<Pod>(Some(NS), &warm.name_any(), |pod| {
        pod["status"]["conditions"][1]["status"] = serde_json::json!("False");
    });
    h.cache_pods();
    h.api.insert(&sandbox_object("early", 256));
    h.settle_sandbox("early").await;
    let early = h.sandbox("early").unwrap().status.unwrap();
    assert_eq!(early.pod_source, Some(PodSource::Cold));

    // A guest image needs a Pod of its own, which mounts it.
    h.api.edit::<Pod>(Some(NS), &warm.name_any(), |pod| {
        pod["status"]["conditions"][1]["status"] = serde_json::json!("True");
    });
    h.cache_pods();
    let mut imaged = sandbox_object("imaged", 256);
    imaged.spec.guest = sandfork_api::sandbox::GuestSpec {
        builtin: None,
        dirty: None,
        image: Some("registry.example/guest:1".into()),
    };
    h.api.insert(&imaged);
    h.settle_sandbox("imaged").await;
    let imaged = h.sandbox("imaged").unwrap().status.unwrap();
    assert_eq!(imaged.pod_source, Some(PodSource::Cold));
    let unclaimed = h.api.get::<Pod>(Some(NS), &warm.name_any()).unwrap();
    assert_eq!(controller_kind(&unclaimed), "SandboxWarmPool");
}

#[tokio::test]
async fn a_retried_pass_finds_its_claim_when_the_cache_lags() {
    let mut h = Harness::new().await;
    h.filled_pool("small", 2, 256).await;
    h.cache_pods();
    h.api.insert(&finalized(sandbox_object("vm", 256)));
    h.api.fail(Method::PATCH, "/sandboxes/vm/status", 500, 1);
    assert!(h.reconcile_sandbox("vm").await.is_err());
    // Same operator, its cache still shows both Pods unclaimed.
    h.settle_sandbox("vm").await;

    assert!(h.sandbox("vm").unwrap().is_ready());
    let owned = h
        .api
        .list::<Pod>(Some(NS))
        .into_iter()
        .filter(|p| controller_kind(p) == "Sandbox")
        .count();
    assert_eq!(owned, 1, "no second claim");
}
