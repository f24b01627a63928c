use std::time::Duration;

use http::Method;
use kube::runtime::controller::Action;
use kube::runtime::watcher;
use sandfork_api::Sandbox;
use sandfork_api::agent::v1 as pb;
use sandfork_api::conditions::READY;
use tonic::Status;

use super::*;
use crate::sandbox::reason;

#[tokio::test]
async fn first_pass_only_adds_the_finalizer() {
    let h = Harness::new().await;
    h.api.insert(&sandbox_object("vm", 256));
    h.api.clear_requests();

    h.reconcile_sandbox("vm").await.unwrap();

    let requests = h.api_requests();
    assert_eq!(requests.len(), 1, "{requests:#?}");
    assert!(adds_finalizer(&requests[0]), "{:#?}", requests[0]);
    assert!(
        requests[0]
            .path
            .ends_with("/namespaces/team-a/sandboxes/vm")
    );
    assert!(h.agent.calls().is_empty());
    assert_eq!(
        h.sandbox("vm").unwrap().metadata.finalizers,
        Some(vec![FINALIZER.to_string()])
    );
}

#[tokio::test]
async fn binds_to_a_node_then_starts_and_reports_ready() {
    let h = Harness::new().await;
    h.api.insert(&sandbox_object("vm", 256));
    h.reconcile_sandbox("vm").await.unwrap();
    h.api.clear_requests();

    let action = h.reconcile_sandbox("vm").await.unwrap();
    assert_eq!(action, Action::requeue(h.ctx.settings.resync));

    let status_writes: Vec<_> = h
        .api_requests()
        .into_iter()
        .filter(is_status_apply)
        .collect();
    assert_eq!(
        status_writes.len(),
        2,
        "bind, then ready: {status_writes:#?}"
    );
    assert_eq!(status_writes[0].body["status"]["node"], NODE);
    assert_eq!(
        status_writes[0].body["status"]["conditions"][0]["reason"],
        reason::SCHEDULED
    );
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
    let status = sandbox.status.unwrap();
    assert_eq!(status.node.as_deref(), Some(NODE));
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.vm.unwrap().pid, Some(4242));
    let (ready, why, _) = condition(&status.conditions, READY);
    assert_eq!((ready.as_str(), why.as_str()), ("True", reason::RUNNING));
    assert_eq!(h.events(), vec!["Scheduled", "Started"]);
    let metrics = h.ctx.metrics.encode();
    assert!(
        metrics.contains("sandfork_apply_to_ready_seconds_count{kind=\"Sandbox\"} 1"),
        "{metrics}"
    );

    // Nothing changes on a second pass: no writes, no second VM.
    h.api.clear_requests();
    h.reconcile_sandbox("vm").await.unwrap();
    assert!(
        h.api_requests().iter().all(|r| r.method == Method::GET),
        "{:#?}",
        h.api_requests()
    );
    assert_eq!(h.agent_calls("CreateSandbox").len(), 1);
}

#[tokio::test]
async fn the_agent_is_not_asked_before_the_binding_is_written() {
    let h = Harness::new().await;
    h.api.insert(&sandbox_object("vm", 256));
    h.reconcile_sandbox("vm").await.unwrap();
    h.api.fail(Method::PATCH, "/sandboxes/vm/status", 500, 1);

    let err = h.reconcile_sandbox("vm").await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(h.agent.calls().is_empty(), "{:?}", h.agent.calls());
    assert!(h.sandbox("vm").unwrap().status.is_none());
}

#[tokio::test]
async fn a_restart_after_the_vm_started_makes_no_twin() {
    let mut h = Harness::new().await;
    h.api.insert(&sandbox_object("vm", 256));
    h.reconcile_sandbox("vm").await.unwrap();
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
}

#[tokio::test]
async fn no_agent_means_unschedulable_with_a_reason() {
    let mut h = Harness::new().await;
    h.remove_agent_lease();
    h.api.insert(&sandbox_object("vm", 256));
    h.reconcile_sandbox("vm").await.unwrap();

    let action = h.reconcile_sandbox("vm").await.unwrap();
    assert_eq!(action, Action::requeue(h.ctx.settings.poll * 5));

    let status = h.sandbox("vm").unwrap().status.unwrap();
    assert_eq!(status.node, None);
    let (ready, why, message) = condition(&status.conditions, READY);
    assert_eq!(
        (ready.as_str(), why.as_str()),
        ("False", reason::UNSCHEDULABLE)
    );
    assert_eq!(message, "no node agent has registered");
}

#[tokio::test]
async fn placement_skips_a_full_node_and_a_stale_agent() {
    let mut h = Harness::new().await;
    h.add_agent_lease("node-b", 8192, start_time());
    let stale = start_time() - k8s_openapi::jiff::SignedDuration::from_secs(300);
    h.add_agent_lease("node-c", 65536, stale);
    // node-a already holds 8000 MiB of sandboxes.
    let mut big = sandbox_object("big", 8000);
    big.metadata.uid = Some("uid-big".into());
    big.spec.node_name = Some(NODE.into());
    h.sandboxes.apply_watcher_event(&watcher::Event::Apply(big));

    h.api.insert(&sandbox_object("vm", 512));
    h.reconcile_sandbox("vm").await.unwrap();
    h.reconcile_sandbox("vm").await.unwrap();

    assert_eq!(h.sandbox("vm").unwrap().node(), Some("node-b"));
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
    h.api.insert(&sandbox_object("vm", 256));
    h.reconcile_sandbox("vm").await.unwrap();

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
async fn a_user_image_is_refused_with_a_clear_reason() {
    let h = Harness::new().await;
    let mut sandbox = sandbox_object("vm", 256);
    sandbox.spec.guest = sandfork_api::sandbox::GuestSpec {
        image: Some("registry.example/guest:1".into()),
        ..Default::default()
    };
    h.api.insert(&sandbox);
    h.settle_sandbox("vm").await;

    let status = h.sandbox("vm").unwrap().status.unwrap();
    let (_, why, message) = condition(&status.conditions, READY);
    assert_eq!(why, reason::IMAGE_UNSUPPORTED);
    assert!(message.contains("registry.example/guest:1"), "{message}");
    assert!(h.agent.calls().is_empty());
}

#[tokio::test]
async fn deletion_stops_the_vm_and_releases_the_finalizer() {
    let h = Harness::new().await;
    h.api.insert(&sandbox_object("vm", 256));
    h.settle_sandbox("vm").await;
    let uid = h.sandbox("vm").unwrap().metadata.uid.unwrap();
    h.mark_deleted::<Sandbox>("vm");

    h.reconcile_sandbox("vm").await.unwrap();

    assert_eq!(
        h.agent_calls("DeleteSandbox"),
        vec![format!("DeleteSandbox {uid}")]
    );
    assert!(h.sandbox("vm").is_none(), "finalizer removed, object gone");
    assert!(h.agent.state.lock().unwrap().sandboxes.is_empty());
}

#[tokio::test]
async fn deleting_a_never_started_sandbox_needs_no_agent() {
    let mut h = Harness::new().await;
    h.remove_agent_lease();
    h.api.insert(&sandbox_object("vm", 256));
    h.reconcile_sandbox("vm").await.unwrap();
    h.mark_deleted::<Sandbox>("vm");

    h.reconcile_sandbox("vm").await.unwrap();

    assert!(h.sandbox("vm").is_none());
    // Never bound: nothing was held anywhere, so no cleanup was skipped.
    assert!(h.events().is_empty(), "{:?}", h.events());
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
async fn a_stale_copy_cannot_bind_the_sandbox_elsewhere() {
    let mut h = Harness::new().await;
    h.api.insert(&sandbox_object("vm", 1024));
    h.reconcile_sandbox("vm").await.unwrap();
    let stale = h.sandbox("vm").unwrap();
    h.reconcile_sandbox("vm").await.unwrap();
    assert_eq!(h.sandbox("vm").unwrap().node(), Some(NODE));
    // A roomier node appears; a reconcile that starts from the copy read
    // before the binding would place the Sandbox there.
    h.add_agent_lease("node-b", 65536, start_time());
    h.api.clear_requests();

    let err = crate::controller::reconcile(std::sync::Arc::new(stale.clone()), h.ctx.clone())
        .await
        .unwrap_err();

    assert!(err.is_conflict(), "{err}");
    assert_eq!(
        crate::controller::error_policy(std::sync::Arc::new(stale), &err, h.ctx.clone()),
        Action::requeue(crate::controller::CONFLICT_RETRY)
    );
    assert_eq!(h.agent_calls("CreateSandbox").len(), 1, "no twin on node-b");
    assert_eq!(h.sandbox("vm").unwrap().node(), Some(NODE));
}

#[tokio::test]
async fn back_to_back_placements_spread_before_the_cache_catches_up() {
    let mut h = Harness::new().await;
    h.add_agent_lease("node-b", 8192, start_time());
    // The harness's Sandbox cache stays empty: neither binding is visible.
    for name in ["one", "two"] {
        h.api.insert(&sandbox_object(name, 4096));
        h.reconcile_sandbox(name).await.unwrap();
        h.reconcile_sandbox(name).await.unwrap();
    }
    let mut nodes = vec![
        h.sandbox("one").unwrap().node().unwrap().to_string(),
        h.sandbox("two").unwrap().node().unwrap().to_string(),
    ];
    nodes.sort();
    assert_eq!(nodes, vec!["node-a", "node-b"]);
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
