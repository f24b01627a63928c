use std::time::Duration;

use http::Method;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::Action;
use kube::runtime::watcher;
use sandfork_api::Sandbox;
use sandfork_api::agent::v1 as pb;
use sandfork_api::conditions::READY;
use tonic::Status;

use super::*;
use crate::sandbox::reason;

#[tokio::test]
async fn first_pass_adds_the_finalizer_then_goes_on() {
    let h = Harness::new().await;
    h.api.insert(&sandbox_object("vm", 256));
    h.api.clear_requests();

    h.reconcile_sandbox("vm").await.unwrap();

    let requests = h.api_requests();
    assert!(adds_finalizer(&requests[0]), "{:#?}", requests[0]);
    assert!(
        requests[0]
            .path
            .ends_with("/namespaces/team-a/sandboxes/vm")
    );
    assert_eq!(
        h.sandbox("vm").unwrap().metadata.finalizers,
        Some(vec![FINALIZER.to_string()])
    );
    // The same pass made the Pod, without waiting for a watch to show the
    // finalizer, and wrote the status from the version the patch returned.
    assert_eq!(pod_requests(&h, Method::POST).len(), 1, "{requests:#?}");
    assert!(requests.iter().any(is_status_apply), "{requests:#?}");
    assert!(h.sandbox("vm").unwrap().status.is_some());
}

/// A finalizer added meanwhile by another writer fails the add with a
/// conflict (the patch is conditional on the version read), retried soon.
#[tokio::test]
async fn adding_the_finalizer_to_a_changed_object_conflicts() {
    let h = Harness::new().await;
    let stale = sandbox_object("vm", 256);
    h.api.insert(&stale);
    let stale = h.sandbox("vm").unwrap();
    h.api.edit::<Sandbox>(Some(NS), "vm", |o| {
        o["metadata"]["labels"] = serde_json::json!({"changed": "yes"});
        o["metadata"]["resourceVersion"] = serde_json::json!("changed");
    });

    let err = crate::controller::reconcile(std::sync::Arc::new(stale), h.ctx.clone())
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err:?}");
    assert!(pod_requests(&h, Method::POST).is_empty());
}

/// Requests to the Pods collection of the test namespace.
fn pod_requests(h: &Harness, method: Method) -> Vec<Recorded> {
    h.api_requests()
        .into_iter()
        .filter(|r| r.method == method && r.path.contains("/api/v1/namespaces/team-a/pods"))
        .collect()
}

#[tokio::test]
async fn makes_a_pod_then_starts_the_vm_in_it_and_reports_ready() {
    let h = Harness::new().await;
    h.api.insert(&finalized(sandbox_object("vm", 256)));
    h.api.clear_requests();

    let action = h.reconcile_sandbox("vm").await.unwrap();
    assert_eq!(action, Action::requeue(h.ctx.settings.resync));

    let creates = pod_requests(&h, Method::POST);
    assert_eq!(creates.len(), 1, "{creates:#?}");
    assert_eq!(creates[0].path, "/api/v1/namespaces/team-a/pods");
    assert_eq!(creates[0].body["metadata"]["name"], "sandbox-vm");
    let status_writes: Vec<_> = h
        .api_requests()
        .into_iter()
        .filter(is_status_apply)
        .collect();
    assert_eq!(
        status_writes.len(),
        2,
        "scheduled, then ready: {status_writes:#?}"
    );
    let pod = h.pod("vm").unwrap();
    let pod_uid = pod.metadata.uid.clone().unwrap();
    let scheduled = &status_writes[0].body["status"];
    assert_eq!(scheduled["node"], NODE);
    assert_eq!(scheduled["pod"], "sandbox-vm");
    assert_eq!(scheduled["podUID"], pod_uid.as_str());
    assert_eq!(scheduled["conditions"][0]["reason"], reason::SCHEDULED);
    assert_eq!(status_writes[0].body["kind"], "Sandbox");
    // Each write is conditional on the version it was computed from.
    assert!(status_writes[0].body["metadata"]["resourceVersion"].is_string());
    assert_ne!(
        status_writes[0].body["metadata"]["resourceVersion"],
        status_writes[1].body["metadata"]["resourceVersion"]
    );
    assert_eq!(
        status_writes[1].body["status"]["conditions"][0]["status"],
        "True"
    );

    let sandbox = h.sandbox("vm").unwrap();
    let uid = sandbox.metadata.uid.clone().unwrap();
    assert_eq!(
        h.agent_calls("CreateSandbox"),
        vec![format!("CreateSandbox {uid}")]
    );
    assert_eq!(
        h.agent.state.lock().unwrap().pod_uids.get(&uid),
        Some(&pod_uid),
        "the agent is told which Pod holds the VMM"
    );
    let status = sandbox.status.unwrap();
    assert_eq!(status.node.as_deref(), Some(NODE));
    assert_eq!(status.pod.as_deref(), Some("sandbox-vm"));
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.vm.unwrap().pid, Some(4242));
    let (ready, why, message) = condition(&status.conditions, READY);
    assert_eq!((ready.as_str(), why.as_str()), ("True", reason::RUNNING));
    assert_eq!(message, "running on node node-a");
    assert_eq!(h.events(), vec!["PodCreated", "Scheduled", "Started"]);
    let metrics = h.ctx.metrics.encode();
    assert!(
        metrics.contains("sandfork_apply_to_ready_seconds_count{kind=\"Sandbox\"} 1"),
        "{metrics}"
    );

    // Nothing changes on a second pass: no writes, no second Pod or VM.
    h.api.clear_requests();
    h.reconcile_sandbox("vm").await.unwrap();
    assert!(
        h.api_requests().iter().all(|r| r.method == Method::GET),
        "{:#?}",
        h.api_requests()
    );
    assert_eq!(h.agent_calls("CreateSandbox").len(), 1);
    assert_eq!(h.api.list::<Pod>(Some(NS)).len(), 1);
}

#[tokio::test]
async fn the_pod_is_the_sandboxes_and_asks_for_what_it_needs() {
    let h = Harness::new().await;
    h.api.hold_pods();
    let mut sandbox = sandbox_object("vm", 1024);
    sandbox.spec.vcpus = 2;
    sandbox.spec.node_selector = Some(BTreeMap::from([("disk".into(), "ssd".into())]));
    sandbox.spec.priority_class_name = Some("sandboxes".into());
    h.api.insert(&sandbox);
    h.settle_sandbox("vm").await;

    let uid = h.sandbox("vm").unwrap().metadata.uid.unwrap();
    let pod = serde_json::to_value(h.pod("vm").unwrap()).unwrap();
    let meta = &pod["metadata"];
    assert_eq!(meta["labels"]["sandfork.dev/sandbox"], "vm");
    assert_eq!(meta["labels"]["sandfork.dev/sandbox-uid"], uid.as_str());
    assert_eq!(meta["labels"]["app.kubernetes.io/component"], "sandbox");
    assert_eq!(meta["ownerReferences"][0]["kind"], "Sandbox");
    assert_eq!(meta["ownerReferences"][0]["uid"], uid.as_str());
    assert_eq!(meta["ownerReferences"][0]["controller"], true);
    assert_eq!(meta["ownerReferences"][0]["blockOwnerDeletion"], true);
    let spec = &pod["spec"];
    assert_eq!(spec["restartPolicy"], "Never");
    assert_eq!(spec["nodeSelector"]["disk"], "ssd");
    assert_eq!(spec["priorityClassName"], "sandboxes");
    assert!(spec["nodeName"].is_null(), "the scheduler binds it");
    assert!(spec["affinity"].is_null());
    let vmm = &spec["containers"][0];
    assert_eq!(vmm["image"], crate::context::DEFAULT_VMM_IMAGE);
    assert_eq!(vmm["imagePullPolicy"], "IfNotPresent");
    assert_eq!(vmm["env"][0]["value"], "team-a/vm");
    let memory = format!("{}Mi", 1024 + sandfork_api::pod::DEFAULT_OVERHEAD_MIB);
    assert_eq!(vmm["resources"]["requests"]["memory"], memory.as_str());
    assert_eq!(vmm["resources"]["limits"]["memory"], memory.as_str());
    assert_eq!(vmm["resources"]["requests"]["cpu"], "200m");
    assert_eq!(vmm["resources"]["limits"]["cpu"], "2");
    assert_eq!(vmm["resources"]["limits"]["sandfork.dev/kvm"], "1");
    assert_eq!(vmm["securityContext"]["privileged"], false);
    assert_eq!(vmm["securityContext"]["capabilities"]["drop"][0], "ALL");
}

#[tokio::test]
async fn the_agent_is_not_called_before_the_pod_is_bound_and_running() {
    let h = Harness::new().await;
    h.api.hold_pods();
    h.api.insert(&finalized(sandbox_object("vm", 256)));

    let action = h.reconcile_sandbox("vm").await.unwrap();
    assert_eq!(action, Action::requeue(h.ctx.settings.poll * 5));
    let status = h.sandbox("vm").unwrap().status.unwrap();
    let (_, why, message) = condition(&status.conditions, READY);
    assert_eq!(why, reason::SCHEDULING);
    assert_eq!(message, "Pod sandbox-vm waits for the scheduler");
    assert_eq!(status.node, None);
    assert_eq!(status.pod.as_deref(), Some("sandbox-vm"));

    // Bound, its image still being pulled.
    h.edit_pod("vm", |pod| {
        crate::fixtures::bind_pod(pod, NODE);
        pod["status"]["containerStatuses"] = serde_json::json!([{
            "name": "vmm", "image": "sandfork/agent", "imageID": "", "ready": false,
            "restartCount": 0,
            "state": {"waiting": {"reason": "ErrImagePull", "message": "pull access denied"}},
        }]);
    });
    h.reconcile_sandbox("vm").await.unwrap();
    let status = h.sandbox("vm").unwrap().status.unwrap();
    assert_eq!(status.node.as_deref(), Some(NODE));
    let (_, why, message) = condition(&status.conditions, READY);
    assert_eq!(why, reason::POD_STARTING);
    assert_eq!(message, "Pod sandbox-vm: ErrImagePull: pull access denied");
    assert!(h.agent.calls().is_empty(), "{:?}", h.agent.calls());
    assert_eq!(h.events(), vec!["PodCreated", "Scheduled"]);

    h.edit_pod("vm", crate::fixtures::run_pod);
    h.reconcile_sandbox("vm").await.unwrap();
    assert!(h.sandbox("vm").unwrap().is_ready());
    assert_eq!(h.agent_calls("CreateSandbox").len(), 1);
    assert_eq!(h.events(), vec!["PodCreated", "Scheduled", "Started"]);
}

#[tokio::test]
async fn unschedulable_carries_the_schedulers_message() {
    let h = Harness::new().await;
    h.api.hold_pods();
    h.api.insert(&sandbox_object("vm", 256));
    h.settle_sandbox("vm").await;
    let why = "0/3 nodes are available: 3 Insufficient sandfork.dev/kvm.";
    h.edit_pod("vm", |pod| {
        pod["status"] = serde_json::json!({"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": why,
        }]});
    });

    let action = h.reconcile_sandbox("vm").await.unwrap();

    assert_eq!(action, Action::requeue(h.ctx.settings.poll * 5));
    let status = h.sandbox("vm").unwrap().status.unwrap();
    assert_eq!(status.node, None);
    let (ready, reason_, message) = condition(&status.conditions, READY);
    assert_eq!(
        (ready.as_str(), reason_.as_str(), message.as_str()),
        ("False", reason::UNSCHEDULABLE, why)
    );
    assert!(h.agent.calls().is_empty());
}

#[tokio::test]
async fn the_agent_is_not_asked_before_the_binding_is_written() {
    let h = Harness::new().await;
    h.api.insert(&finalized(sandbox_object("vm", 256)));
    h.api.fail(Method::PATCH, "/sandboxes/vm/status", 500, 1);

    let err = h.reconcile_sandbox("vm").await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(h.agent.calls().is_empty(), "{:?}", h.agent.calls());
    assert!(h.sandbox("vm").unwrap().status.is_none());
    assert!(
        h.pod("vm").is_some(),
        "the Pod is made, and found next time"
    );

    h.reconcile_sandbox("vm").await.unwrap();
    assert!(h.sandbox("vm").unwrap().is_ready());
    assert_eq!(h.api.list::<Pod>(Some(NS)).len(), 1);
}

#[tokio::test]
async fn a_restart_after_the_vm_started_makes_no_twin() {
    let mut h = Harness::new().await;
    h.api.insert(&finalized(sandbox_object("vm", 256)));
    // The binding is written; the write after CreateSandbox fails, as if the
    // operator died right after the agent started the VM.
    h.api
        .fail_after(Method::PATCH, "/sandboxes/vm/status", 500, 1, 1);
    h.reconcile_sandbox("vm").await.unwrap_err();
    let sandbox = h.sandbox("vm").unwrap();
    let uid = sandbox.metadata.uid.clone().unwrap();
    assert_eq!(sandbox.node(), Some(NODE));
    assert!(!sandbox.is_ready());
    assert_eq!(h.agent_calls("CreateSandbox").len(), 1);
    h.restart();

    h.reconcile_sandbox("vm").await.unwrap();

    assert_eq!(
        h.agent_calls("CreateSandbox"),
        vec![format!("CreateSandbox {uid}")]
    );
    assert!(h.sandbox("vm").unwrap().is_ready());
    assert_eq!(pod_requests(&h, Method::POST).len(), 1, "no second Pod");
}

#[tokio::test]
async fn a_failed_vm_is_reported_and_left_alone() {
    let h = Harness::new().await;
    h.agent.state.lock().unwrap().start_state = Some(pb::SandboxState::Failed);
    h.api.insert(&sandbox_object("vm", 256));
    h.settle_sandbox("vm").await;

    let status = h.sandbox("vm").unwrap().status.unwrap();
    let (ready, why, _) = condition(&status.conditions, READY);
    assert_eq!((ready.as_str(), why.as_str()), ("False", reason::VM_FAILED));
    let calls = h.agent.calls().len();
    assert_eq!(
        h.reconcile_sandbox("vm").await.unwrap(),
        Action::await_change()
    );
    assert_eq!(
        h.agent.calls().len(),
        calls,
        "a permanent failure makes no more agent calls"
    );
}

#[tokio::test]
async fn too_little_memory_on_the_node_is_retried_with_a_condition() {
    let h = Harness::new().await;
    h.agent.fail_next(
        "CreateSandbox",
        Status::resource_exhausted("host has 100 MiB free, 256 MiB asked"),
    );
    h.api.insert(&finalized(sandbox_object("vm", 256)));

    let err = h.reconcile_sandbox("vm").await.unwrap_err();
    assert!(err.is_transient());
    let status = h.sandbox("vm").unwrap().status.unwrap();
    let (_, why, message) = condition(&status.conditions, READY);
    assert_eq!(why, reason::INSUFFICIENT_MEMORY);
    assert!(message.contains("100 MiB free"), "{message}");

    h.reconcile_sandbox("vm").await.unwrap();
    assert!(h.sandbox("vm").unwrap().is_ready());
}

#[tokio::test]
async fn a_guest_image_is_mounted_into_the_pod_and_run_from_there() {
    let h = Harness::new().await;
    let mut sandbox = sandbox_object("vm", 256);
    sandbox.spec.guest = sandfork_api::sandbox::GuestSpec {
        image: Some("registry.example/guest:1".into()),
        ..Default::default()
    };
    h.api.insert(&sandbox);
    h.settle_sandbox("vm").await;

    assert!(h.sandbox("vm").unwrap().is_ready());
    let pod = h.pod("vm").expect("a Pod");
    let spec = pod.spec.unwrap();
    let volume = spec
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == sandfork_api::pod::GUEST_VOLUME)
        .expect("the guest's image volume");
    assert_eq!(
        volume.image.and_then(|i| i.reference).as_deref(),
        Some("registry.example/guest:1")
    );
    let mount = spec.containers[0]
        .volume_mounts
        .clone()
        .unwrap()
        .into_iter()
        .find(|m| m.name == sandfork_api::pod::GUEST_VOLUME)
        .expect("mounted in the VMM container");
    assert_eq!(mount.mount_path, sandfork_api::pod::GUEST_DIR);
    assert_eq!(mount.read_only, Some(true));
    assert_eq!(h.agent_calls("CreateSandbox").len(), 1);
}

#[tokio::test]
async fn deletion_stops_the_vm_then_deletes_the_pod() {
    let h = Harness::new().await;
    h.api.insert(&sandbox_object("vm", 256));
    h.settle_sandbox("vm").await;
    let uid = h.sandbox("vm").unwrap().metadata.uid.unwrap();
    let pod_uid = h.pod("vm").unwrap().metadata.uid.unwrap();
    h.mark_deleted::<Sandbox>("vm");
    // The agent is asked first: while it cannot answer, the Pod stays.
    h.agent
        .fail_next("DeleteSandbox", Status::unavailable("agent restarting"));
    h.reconcile_sandbox("vm").await.unwrap_err();
    assert_eq!(h.pod("vm").unwrap().metadata.uid.unwrap(), pod_uid);
    h.api.clear_requests();

    h.reconcile_sandbox("vm").await.unwrap();

    assert_eq!(
        h.agent_calls("DeleteSandbox"),
        vec![
            format!("DeleteSandbox {uid}"),
            format!("DeleteSandbox {uid}")
        ]
    );
    let deletes = pod_requests(&h, Method::DELETE);
    assert_eq!(deletes.len(), 1, "{deletes:#?}");
    assert_eq!(deletes[0].path, "/api/v1/namespaces/team-a/pods/sandbox-vm");
    assert_eq!(
        deletes[0].body["preconditions"]["uid"],
        pod_uid.as_str(),
        "only the Pod that was read"
    );
    assert!(h.pod("vm").is_none());
    assert!(h.sandbox("vm").is_none(), "finalizer removed, object gone");
    assert!(h.agent.state.lock().unwrap().sandboxes.is_empty());
}

#[tokio::test]
async fn deleting_a_never_bound_sandbox_needs_no_agent() {
    let mut h = Harness::new().await;
    h.remove_agent_lease();
    h.api.hold_pods();
    h.api.insert(&sandbox_object("vm", 256));
    h.settle_sandbox("vm").await;
    assert!(h.pod("vm").is_some());
    h.mark_deleted::<Sandbox>("vm");
    h.api.clear_requests();

    h.reconcile_sandbox("vm").await.unwrap();

    assert!(h.sandbox("vm").is_none());
    assert!(h.pod("vm").is_none(), "its unbound Pod is deleted");
    // Never bound: nothing was held anywhere, so no cleanup was skipped.
    assert!(h.events().is_empty(), "{:?}", h.events());
    assert!(h.agent.calls().is_empty());
}

#[tokio::test]
async fn a_pod_of_the_same_name_that_is_not_the_sandboxes_is_left_alone() {
    let h = Harness::new().await;
    let mut foreign = Pod::default();
    foreign.metadata.name = Some("sandbox-vm".into());
    foreign.metadata.namespace = Some(NS.into());
    h.api.insert(&foreign);
    h.api.insert(&sandbox_object("vm", 256));
    h.settle_sandbox("vm").await;

    let status = h.sandbox("vm").unwrap().status.unwrap();
    let (_, why, message) = condition(&status.conditions, READY);
    assert_eq!(why, reason::INVALID_SPEC);
    assert!(
        message.contains("does not belong to this Sandbox"),
        "{message}"
    );
    assert!(h.agent.calls().is_empty());

    h.mark_deleted::<Sandbox>("vm");
    h.reconcile_sandbox("vm").await.unwrap();
    assert!(h.sandbox("vm").is_none());
    assert!(h.pod("vm").is_some(), "not ours to delete");
}

#[tokio::test]
async fn a_spec_that_makes_no_valid_pod_fails_without_one() {
    let h = Harness::new().await;
    let mut sandbox = sandbox_object("vm", 256);
    sandbox.spec.resources = Some(sandfork_api::sandbox::SandboxResources {
        cpu_request: Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
            "3".into(),
        )),
        ..Default::default()
    });
    h.api.insert(&sandbox);
    h.settle_sandbox("vm").await;

    let status = h.sandbox("vm").unwrap().status.unwrap();
    let (_, why, message) = condition(&status.conditions, READY);
    assert_eq!(why, reason::INVALID_SPEC);
    assert!(message.contains("at most the 1 vCPUs"), "{message}");
    assert!(h.pod("vm").is_none());
    assert!(pod_requests(&h, Method::POST).is_empty());
}

/// A ready Sandbox whose Pod then goes through `edit`; the Sandbox's `Ready`
/// reason and message after one pass, checked to be final.
async fn after_pod_change(h: &Harness, edit: impl FnOnce(&Harness)) -> (String, String) {
    h.api.insert(&sandbox_object("vm", 256));
    h.settle_sandbox("vm").await;
    assert!(h.sandbox("vm").unwrap().is_ready());
    edit(h);
    h.api.clear_requests();
    assert_eq!(
        h.reconcile_sandbox("vm").await.unwrap(),
        Action::await_change()
    );
    let status = h.sandbox("vm").unwrap().status.unwrap();
    let (ready, why, message) = condition(&status.conditions, READY);
    assert_eq!(ready, "False");
    assert!(h.events().contains(&why), "{:?}", h.events());
    assert!(pod_requests(h, Method::POST).is_empty(), "no new Pod");

    // Final: no more calls, no new Pod.
    let calls = h.agent.calls().len();
    h.api.clear_requests();
    h.reconcile_sandbox("vm").await.unwrap();
    assert_eq!(h.agent.calls().len(), calls);
    assert!(pod_requests(h, Method::POST).is_empty());
    assert!(crate::sandbox::PERMANENT_REASONS.contains(&why.as_str()));
    (why, message)
}

#[tokio::test]
async fn a_deleted_pod_fails_the_sandbox_for_good() {
    let h = Harness::new().await;
    let (why, message) = after_pod_change(&h, |h| {
        h.api
            .remove::<Pod>(Some(NS), &sandfork_api::pod::name("vm"))
    })
    .await;
    assert_eq!(why, reason::POD_DELETED);
    assert_eq!(
        message,
        "the Sandbox's Pod sandbox-vm was deleted, and its VM with it"
    );
    assert!(h.pod("vm").is_none());
}

#[tokio::test]
async fn a_pod_being_deleted_fails_the_sandbox() {
    let h = Harness::new().await;
    let (why, message) = after_pod_change(&h, |h| {
        h.edit_pod("vm", |pod| {
            pod["metadata"]["deletionTimestamp"] = serde_json::json!("2026-03-01T12:00:00Z")
        })
    })
    .await;
    assert_eq!(why, reason::POD_DELETED);
    assert!(message.contains("is being deleted"), "{message}");
}

#[tokio::test]
async fn a_replaced_pod_is_not_taken_for_the_sandboxes() {
    let h = Harness::new().await;
    let (why, message) = after_pod_change(&h, |h| {
        h.edit_pod("vm", |pod| {
            pod["metadata"]["uid"] = serde_json::json!("uid-other")
        })
    })
    .await;
    assert_eq!(why, reason::POD_DELETED);
    assert!(message.contains("replaced by another"), "{message}");
}

#[tokio::test]
async fn an_evicted_pod_fails_the_sandbox_with_the_kubelets_reason() {
    let h = Harness::new().await;
    let (why, message) = after_pod_change(&h, |h| {
        h.edit_pod("vm", |pod| {
            pod["status"]["phase"] = serde_json::json!("Failed");
            pod["status"]["reason"] = serde_json::json!("Evicted");
            pod["status"]["message"] = serde_json::json!("The node was low on resource: memory.");
        })
    })
    .await;
    assert_eq!(why, reason::POD_FAILED);
    assert_eq!(
        message,
        "the Sandbox's Pod sandbox-vm failed: Evicted: The node was low on resource: memory."
    );
}

#[tokio::test]
async fn an_oom_killed_vmm_fails_the_sandbox() {
    let h = Harness::new().await;
    let (why, message) = after_pod_change(&h, |h| {
        h.edit_pod("vm", |pod| {
            pod["status"]["phase"] = serde_json::json!("Failed");
            pod["status"]["containerStatuses"][0]["state"] = serde_json::json!({
                "terminated": {"reason": "OOMKilled", "exitCode": 137},
            });
        })
    })
    .await;
    assert_eq!(why, reason::POD_FAILED);
    assert_eq!(
        message,
        "the Sandbox's Pod sandbox-vm failed: container vmm terminated: OOMKilled (exit code 137)"
    );
}

#[tokio::test]
async fn a_cached_pod_spares_the_lookup() {
    let mut h = Harness::new().await;
    h.api.insert(&sandbox_object("vm", 256));
    h.settle_sandbox("vm").await;
    h.pods
        .apply_watcher_event(&watcher::Event::Apply(h.pod("vm").unwrap()));
    h.api.clear_requests();

    h.reconcile_sandbox("vm").await.unwrap();

    assert!(h.sandbox("vm").unwrap().is_ready());
    assert!(
        pod_requests(&h, Method::GET).is_empty(),
        "{:#?}",
        h.api_requests()
    );
}

#[tokio::test]
async fn an_agent_whose_vmm_is_not_up_yet_is_asked_again() {
    let h = Harness::new().await;
    h.agent.fail_next(
        "CreateSandbox",
        Status::failed_precondition("the VMM socket is not there yet"),
    );
    h.api.insert(&finalized(sandbox_object("vm", 256)));

    let err = h.reconcile_sandbox("vm").await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    let status = h.sandbox("vm").unwrap().status.unwrap();
    let (_, why, message) = condition(&status.conditions, READY);
    assert_eq!(why, reason::AGENT_UNAVAILABLE);
    assert!(message.contains("VMM socket"), "{message}");

    h.reconcile_sandbox("vm").await.unwrap();
    assert!(h.sandbox("vm").unwrap().is_ready());
    assert_eq!(h.agent_calls("CreateSandbox").len(), 2);
    assert_eq!(h.api.list::<Pod>(Some(NS)).len(), 1);
}

#[tokio::test]
async fn a_copy_older_than_its_own_write_is_not_reconciled() {
    let h = Harness::new().await;
    h.api.insert(&finalized(sandbox_object("vm", 256)));
    let stale = h.sandbox("vm").unwrap();
    h.reconcile_sandbox("vm").await.unwrap();
    let ready = h.sandbox("vm").unwrap();
    assert!(ready.is_ready());
    h.api.clear_requests();
    let calls = h.agent.calls().len();

    // The cache has yet to show the status this operator wrote: the pass
    // waits for it instead of redoing the work and failing its write.
    let action = crate::controller::reconcile(std::sync::Arc::new(stale), h.ctx.clone())
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(crate::controller::CONFLICT_RETRY));
    assert!(h.api.requests().is_empty(), "{:#?}", h.api.requests());
    assert_eq!(h.agent.calls().len(), calls, "no agent call");

    // The newer copy is reconciled as usual.
    h.reconcile_sandbox("vm").await.unwrap();
    assert!(!h.agent.calls()[calls..].is_empty());
}

#[tokio::test]
async fn a_stale_copy_cannot_start_the_vm_twice() {
    let mut h = Harness::new().await;
    h.api.insert(&finalized(sandbox_object("vm", 256)));
    let stale = h.sandbox("vm").unwrap();
    h.reconcile_sandbox("vm").await.unwrap();
    assert!(h.sandbox("vm").unwrap().is_ready());
    h.api.clear_requests();
    // A new operator knows nothing of the writes of the one before.
    h.restart();

    // A reconcile from the copy read before the Pod was made finds the Pod
    // and cannot write over the newer status.
    let err = crate::controller::reconcile(std::sync::Arc::new(stale.clone()), h.ctx.clone())
        .await
        .unwrap_err();

    assert!(err.is_conflict(), "{err}");
    assert_eq!(
        crate::controller::error_policy(std::sync::Arc::new(stale), &err, h.ctx.clone()),
        Action::requeue(crate::controller::CONFLICT_RETRY)
    );
    // Its create of the Pod (fixed name) found the one made before.
    assert!(pod_requests(&h, Method::POST).len() <= 1);
    assert_eq!(h.api.list::<Pod>(Some(NS)).len(), 1);
    assert_eq!(h.agent_calls("CreateSandbox").len(), 1);
}

#[tokio::test]
async fn a_running_sandbox_stays_ready_while_its_agent_is_away() {
    let mut h = Harness::new().await;
    h.api.insert(&sandbox_object("vm", 256));
    h.settle_sandbox("vm").await;
    assert!(h.sandbox("vm").unwrap().is_ready());
    // The agent stops renewing its Lease (deleted, upgrading, crashed).
    h.clock.advance(Duration::from_secs(60));
    h.api.clear_requests();

    h.reconcile_sandbox("vm").await.unwrap();
    let sandbox = h.sandbox("vm").unwrap();
    assert!(sandbox.is_ready(), "{:?}", sandbox.status);
    assert!(
        h.api.requests().iter().all(|r| r.method == Method::GET),
        "nothing is written while the agent is away: {:?}",
        h.api.requests()
    );

    // Its replacement registers and answers: still the same VM, Ready.
    h.renew_agent_lease();
    h.reconcile_sandbox("vm").await.unwrap();
    assert!(h.sandbox("vm").unwrap().is_ready());
    assert_eq!(h.agent_calls("CreateSandbox").len(), 1, "no second VM");
}

#[tokio::test]
async fn a_dead_agent_delays_deletion_then_lets_go_with_a_warning() {
    let h = Harness::new().await;
    h.api.insert(&sandbox_object("vm", 256));
    h.settle_sandbox("vm").await;
    h.mark_deleted::<Sandbox>("vm");
    // The agent stops renewing its lease.
    h.clock.advance(Duration::from_secs(60));
    h.api.clear_requests();

    let err = h.reconcile_sandbox("vm").await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(h.sandbox("vm").is_some());

    h.clock.advance(h.ctx.settings.unreachable_agent_grace);
    h.reconcile_sandbox("vm").await.unwrap();
    assert!(h.sandbox("vm").is_none());
    assert_eq!(h.events(), vec!["CleanupSkipped"]);
    assert!(h.agent_calls("DeleteSandbox").is_empty());
    assert!(h.pod("vm").is_none(), "deleting the Pod stops its VMM");
}

#[tokio::test]
async fn a_vm_that_vanished_from_its_node_is_lost_not_recreated() {
    let h = Harness::new().await;
    h.api.insert(&sandbox_object("vm", 256));
    h.settle_sandbox("vm").await;
    h.agent.state.lock().unwrap().sandboxes.clear();

    assert_eq!(
        h.reconcile_sandbox("vm").await.unwrap(),
        Action::await_change()
    );

    let status = h.sandbox("vm").unwrap().status.unwrap();
    let (_, why, _) = condition(&status.conditions, READY);
    assert_eq!(why, reason::LOST);
    assert_eq!(h.agent_calls("CreateSandbox").len(), 1);
}

#[tokio::test]
async fn a_sandbox_being_captured_keeps_its_status() {
    let h = Harness::new().await;
    h.api.insert(&sandbox_object("vm", 256));
    h.settle_sandbox("vm").await;
    let before = h.sandbox("vm").unwrap();
    let uid = before.metadata.uid.clone().unwrap();
    h.agent.state.lock().unwrap().busy.insert(uid);
    h.api.clear_requests();

    let action = h.reconcile_sandbox("vm").await.unwrap();

    assert_eq!(action, Action::requeue(h.ctx.settings.poll));
    assert_eq!(h.sandbox("vm").unwrap().status, before.status);
    assert!(h.api_requests().iter().all(|r| r.method == Method::GET));
}

#[tokio::test]
async fn transient_errors_back_off_and_permanent_ones_wait_for_a_change() {
    let h = Harness::new().await;
    let sandbox = std::sync::Arc::new(sandbox_object("vm", 256));
    let unavailable = crate::error::Error::AgentUnavailable {
        node: NODE.into(),
        reason: "gone".into(),
    };
    let policy = |err: &crate::error::Error| {
        crate::controller::error_policy(sandbox.clone(), err, h.ctx.clone())
    };

    assert_eq!(
        policy(&unavailable),
        Action::requeue(Duration::from_secs(1))
    );
    assert_eq!(
        policy(&unavailable),
        Action::requeue(Duration::from_secs(2))
    );
    let permanent = crate::error::Error::Permanent("a bad spec".into());
    assert_eq!(policy(&permanent), Action::await_change());
    let metrics = h.ctx.metrics.encode();
    assert!(
        metrics.contains(
            "sandfork_reconcile_errors_total{controller=\"sandbox\",error=\"agent_unavailable\"} 2"
        ),
        "{metrics}"
    );

    // A successful reconcile forgets the failures: the backoff starts over.
    h.api.insert(&sandbox_object("vm", 256));
    h.reconcile_sandbox("vm").await.unwrap();
    assert_eq!(
        policy(&unavailable),
        Action::requeue(Duration::from_secs(1))
    );
}
