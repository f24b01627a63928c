use std::time::Duration;

use http::Method;
use kube::runtime::controller::Action;
use kube::runtime::watcher;
use sandfork_api::branch::{DeletionPolicy, SourceRef, TemplateMetadata};
use sandfork_api::conditions::{FAILED, PROGRESSING, READY};
use sandfork_api::{SandboxBranch, SandboxBranchSpec, SandboxBranchStatus, labels};
use tonic::Status;

use super::*;
use crate::branch::reason;

fn branch_object(name: &str, source: &str, branches: u32, policy: DeletionPolicy) -> SandboxBranch {
    let mut branch = SandboxBranch::new(
        name,
        SandboxBranchSpec {
            source_ref: SourceRef {
                name: source.into(),
            },
            branches,
            mode: Default::default(),
            template: Some(sandfork_api::branch::BranchTemplate {
                metadata: Some(TemplateMetadata {
                    labels: BTreeMap::from([("team".into(), "a".into())]),
                    annotations: BTreeMap::from([("note".into(), "from a test".into())]),
                }),
            }),
            failure_deadline: Duration::from_secs(60).into(),
            deletion_policy: policy,
            branch_memory_request_mib: None,
        },
    );
    branch.metadata.namespace = Some(NS.into());
    branch
}

/// Source ready, SandboxBranch created and given its finalizer.
async fn setup(branches: u32, policy: DeletionPolicy) -> Harness {
    let h = Harness::new().await;
    h.ready_source("src").await;
    h.api
        .insert(&finalized(branch_object("fork", "src", branches, policy)));
    assert_eq!(
        h.branch("fork").unwrap().metadata.finalizers,
        Some(vec![FINALIZER.to_string()])
    );
    h.api.clear_requests();
    h
}

/// The SandboxBranch's status, checked to be `Failed` for `why`, and the
/// condition's message.
fn failed_status(h: &Harness, why: &str) -> (SandboxBranchStatus, String) {
    let status = h.branch("fork").unwrap().status.unwrap();
    let (failed, reason, message) = condition(&status.conditions, FAILED);
    assert_eq!(
        (failed.as_str(), reason.as_str()),
        ("True", why),
        "{message}"
    );
    (status, message)
}

fn created_sandboxes(h: &Harness) -> Vec<Recorded> {
    h.api_requests()
        .into_iter()
        .filter(|r| r.method == Method::POST && r.path.ends_with("/namespaces/team-a/sandboxes"))
        .collect()
}

#[tokio::test]
async fn captures_once_and_creates_owned_branches_on_the_source_node() {
    let h = setup(3, DeletionPolicy::Delete).await;
    let branch = h.branch("fork").unwrap();
    let uid = branch.metadata.uid.clone().unwrap();
    let source_uid = h.sandbox("src").unwrap().metadata.uid.unwrap();

    h.reconcile_branch("fork").await.unwrap();

    assert_eq!(
        h.agent_calls("CaptureSandbox"),
        vec![format!("CaptureSandbox {uid}")]
    );
    assert_eq!(
        h.agent.state.lock().unwrap().captures[&uid].sandbox_uid,
        source_uid
    );
    let creates = created_sandboxes(&h);
    assert_eq!(creates.len(), 3, "{creates:#?}");
    for (index, create) in creates.iter().enumerate() {
        let body = &create.body;
        assert_eq!(body["metadata"]["name"], format!("fork-{index}"));
        assert_eq!(body["metadata"]["labels"][labels::BRANCH], "fork");
        assert_eq!(
            body["metadata"]["labels"][labels::BRANCH_INDEX],
            index.to_string()
        );
        assert_eq!(body["metadata"]["labels"]["team"], "a");
        assert_eq!(body["metadata"]["annotations"]["note"], "from a test");
        let owner = &body["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "SandboxBranch");
        assert_eq!(owner["name"], "fork");
        assert_eq!(owner["uid"], uid.as_str());
        assert_eq!(owner["controller"], true);
        assert_eq!(body["spec"]["nodeName"], NODE);
        assert_eq!(body["spec"]["restoreFrom"]["uid"], uid.as_str());
        assert_eq!(body["spec"]["restoreFrom"]["sandboxBranch"], "fork");
        assert_eq!(body["spec"]["memoryMiB"], 256);
        assert_eq!(body["spec"]["guest"]["builtin"], "Counter");
        assert_eq!(body["metadata"]["finalizers"][0], FINALIZER);
        assert_eq!(
            create.query.get("fieldManager").map(String::as_str),
            Some("sandfork-operator")
        );
    }

    let status = h.branch("fork").unwrap().status.unwrap();
    assert_eq!(status.source_node.as_deref(), Some(NODE));
    let capture = status.capture.unwrap();
    assert_eq!(capture.pause_micros, 412);
    assert_eq!(capture.bytes, 256 << 20);
    assert_eq!(capture.pages_copied_by_fault_handler, 17);
    assert_eq!(capture.copy_duration_millis, Some(35));
    assert_eq!(
        status.capture_time.unwrap().0,
        k8s_openapi::jiff::Timestamp::from_microsecond(1_700_000_000_000_000).unwrap()
    );
    assert_eq!(status.branches_ready.as_deref(), Some("0/3"));
    assert_eq!(status.branches.len(), 3);
    let (ready, _, _) = condition(&status.conditions, READY);
    let (progressing, why, _) = condition(&status.conditions, PROGRESSING);
    let (failed, _, _) = condition(&status.conditions, FAILED);
    assert_eq!(
        (ready.as_str(), progressing.as_str(), failed.as_str()),
        ("False", "True", "False")
    );
    assert_eq!(why, reason::RESTORING);
    assert_eq!(
        h.events(),
        vec!["Capturing", "Captured", "BranchesCreated"],
        "one Event for the branches the pass made"
    );
    assert!(
        h.api_requests()
            .iter()
            .filter(|r| is_status_apply(r))
            .count()
            >= 2
    );
    let metrics = h.ctx.metrics.encode();
    assert!(
        metrics.contains("sandfork_capture_pause_seconds_count{mode=\"Live\"} 1"),
        "{metrics}"
    );

    // The branches restore from the capture and become ready.
    for index in 0..3 {
        h.settle_sandbox(&format!("fork-{index}")).await;
        let sandbox = h.sandbox(&format!("fork-{index}")).unwrap();
        assert!(sandbox.is_ready(), "{:?}", sandbox.status);
        let origin = sandbox.status.unwrap().origin.unwrap();
        assert_eq!(origin.source_sandbox, "src");
        assert_eq!(origin.sandbox_branch, "fork");
        assert!(origin.capture_time.is_some());
    }
    assert_eq!(h.agent_calls("RestoreBranch").len(), 3);
    h.api.clear_requests();
    h.reconcile_branch("fork").await.unwrap();

    let status = h.branch("fork").unwrap().status.unwrap();
    assert_eq!(status.branches_ready.as_deref(), Some("3/3"));
    assert!(status.branches.iter().all(|b| b.ready));
    assert!(status.completion_time.is_some());
    let (ready, why, message) = condition(&status.conditions, READY);
    assert_eq!(
        (ready.as_str(), why.as_str()),
        ("True", reason::BRANCHES_READY)
    );
    assert_eq!(message, "3/3 branches ready on node node-a");
    assert_eq!(condition(&status.conditions, PROGRESSING).0, "False");
    assert_eq!(h.events(), vec!["Ready"]);
    // The branches are read from the API server's cache, without waiting.
    let lists: Vec<_> = h
        .api_requests()
        .into_iter()
        .filter(|r| r.method == Method::GET && r.path.ends_with("/namespaces/team-a/sandboxes"))
        .collect();
    assert_eq!(lists.len(), 1, "{lists:#?}");
    assert_eq!(
        lists[0].query.get("resourceVersion").map(String::as_str),
        Some("0")
    );
    assert_eq!(h.agent_calls("CaptureSandbox").len(), 1, "captured once");
    assert!(created_sandboxes(&h).is_empty());
}

#[tokio::test]
async fn branches_request_the_memory_the_sandboxbranch_sets_for_them() {
    let h = Harness::new().await;
    h.ready_source("src").await;
    let mut branch = branch_object("fork", "src", 2, DeletionPolicy::Delete);
    branch.spec.branch_memory_request_mib = Some(16);
    h.api.insert(&finalized(branch));
    h.reconcile_branch("fork").await.unwrap();

    let creates = created_sandboxes(&h);
    assert_eq!(creates.len(), 2, "{creates:#?}");
    for create in &creates {
        assert_eq!(create.body["spec"]["resources"]["memoryRequestMiB"], 16);
        assert_eq!(create.body["spec"]["memoryMiB"], 256);
    }
}

#[tokio::test]
async fn a_branch_memory_request_above_the_source_fails_before_capturing() {
    let h = Harness::new().await;
    h.ready_source("src").await;
    let mut branch = branch_object("fork", "src", 2, DeletionPolicy::Delete);
    branch.spec.branch_memory_request_mib = Some(258);
    h.api.insert(&finalized(branch));
    h.reconcile_branch("fork").await.unwrap();

    let (_, message) = failed_status(&h, reason::INVALID_SPEC);
    assert_eq!(
        message,
        "branchMemoryRequestMiB 258 is more than the source's memoryMiB 256"
    );
    assert!(h.agent_calls("CaptureSandbox").is_empty());
    assert!(created_sandboxes(&h).is_empty());
}

#[tokio::test]
async fn retain_policy_creates_branches_without_owner() {
    let h = setup(1, DeletionPolicy::Retain).await;
    h.reconcile_branch("fork").await.unwrap();
    let creates = created_sandboxes(&h);
    assert_eq!(creates.len(), 1);
    assert!(
        creates[0].body["metadata"]["ownerReferences"].is_null(),
        "{:#?}",
        creates[0].body
    );
}

#[tokio::test]
async fn a_restart_after_the_capture_reuses_it() {
    let mut h = setup(2, DeletionPolicy::Delete).await;
    // The operator died after the agent captured but before the status said so.
    h.api
        .fail_after(Method::PATCH, "/sandboxbranches/fork/status", 500, 1, 1);
    h.reconcile_branch("fork").await.unwrap_err();
    assert_eq!(h.agent.state.lock().unwrap().captures.len(), 1);
    assert!(h.branch("fork").unwrap().status.unwrap().capture.is_none());
    h.restart();

    h.reconcile_branch("fork").await.unwrap();

    let uid = h.branch("fork").unwrap().metadata.uid.unwrap();
    assert_eq!(
        h.agent_calls("CaptureSandbox"),
        vec![format!("CaptureSandbox {uid}"); 2],
        "asked again under the same key"
    );
    // The capture was announced by the pass that started it, not again.
    assert_eq!(h.events(), vec!["Capturing", "Captured", "BranchesCreated"]);
    assert!(h.branch("fork").unwrap().status.unwrap().capture.is_some());
    assert_eq!(created_sandboxes(&h).len(), 2);
}

#[tokio::test]
async fn a_restart_after_some_branches_were_created_makes_no_duplicates() {
    let mut h = setup(3, DeletionPolicy::Delete).await;
    // Capture, then the operator dies after creating the first branch.
    h.api
        .fail_after(Method::POST, "/namespaces/team-a/sandboxes", 500, 1, 1);
    h.reconcile_branch("fork").await.unwrap_err();
    // The creates go out together: the others may have been made.
    let missing: Vec<String> = ["fork-0", "fork-1", "fork-2"]
        .into_iter()
        .filter(|name| h.sandbox(name).is_none())
        .map(String::from)
        .collect();
    assert_eq!(missing.len(), 1, "{missing:?}");
    let made: Vec<_> = ["fork-0", "fork-1", "fork-2"]
        .iter()
        .filter_map(|name| h.sandbox(name)?.metadata.uid)
        .collect();
    h.restart();
    h.api.clear_requests();

    h.reconcile_branch("fork").await.unwrap();

    let names: Vec<_> = created_sandboxes(&h)
        .iter()
        .map(|r| r.body["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, missing);
    assert_eq!(
        h.api.list::<Sandbox>(Some(NS)).len(),
        4,
        "source + 3 branches"
    );
    assert_eq!(
        h.agent_calls("CaptureSandbox").len(),
        1,
        "the capture was recorded before the crash"
    );
    let kept: Vec<_> = ["fork-0", "fork-1", "fork-2"]
        .iter()
        .filter_map(|name| h.sandbox(name)?.metadata.uid)
        .filter(|uid| made.contains(uid))
        .collect();
    assert_eq!(
        kept, made,
        "the branches made before the crash are kept, not made again"
    );
}

#[tokio::test]
async fn a_sandbox_that_is_not_ours_under_a_branch_name_fails_the_branch() {
    let h = setup(2, DeletionPolicy::Delete).await;
    h.api.insert(&sandbox_object("fork-1", 64));

    assert_eq!(
        h.reconcile_branch("fork").await.unwrap(),
        Action::await_change()
    );

    let (status, message) = failed_status(&h, reason::NAME_CONFLICT);
    assert!(message.contains("\"fork-1\""), "{message}");
    assert_eq!(status.error.unwrap().message, message);
    // The foreign Sandbox is untouched; the capture is released.
    assert!(h.sandbox("fork-1").unwrap().spec.restore_from.is_none());
    assert_eq!(h.agent_calls("DeleteCapture").len(), 1);
}

#[tokio::test]
async fn a_missing_source_waits_then_fails_at_the_deadline_harming_nothing() {
    let h = Harness::new().await;
    h.api.insert(&finalized(branch_object(
        "fork",
        "nope",
        2,
        DeletionPolicy::Delete,
    )));

    let action = h.reconcile_branch("fork").await.unwrap();
    assert_eq!(action, Action::requeue(h.ctx.settings.poll));
    let status = h.branch("fork").unwrap().status.unwrap();
    let (_, why, message) = condition(&status.conditions, PROGRESSING);
    assert_eq!(why, reason::SOURCE_NOT_FOUND);
    assert_eq!(
        message,
        "Sandbox \"nope\" does not exist in namespace team-a"
    );

    h.clock.advance(Duration::from_secs(61));
    h.api.clear_requests();
    assert_eq!(
        h.reconcile_branch("fork").await.unwrap(),
        Action::await_change()
    );

    let (status, message) = failed_status(&h, reason::DEADLINE_EXCEEDED);
    assert!(message.contains("failureDeadline 60s"), "{message}");
    assert!(message.contains("does not exist"), "{message}");
    assert_eq!(condition(&status.conditions, READY).0, "False");
    assert_eq!(condition(&status.conditions, PROGRESSING).0, "False");
    assert!(status.error.is_some());
    assert_eq!(h.events(), vec![reason::DEADLINE_EXCEEDED]);
    assert!(h.agent.calls().is_empty());
    assert!(created_sandboxes(&h).is_empty());

    // Failed is final.
    h.api.clear_requests();
    assert_eq!(
        h.reconcile_branch("fork").await.unwrap(),
        Action::await_change()
    );
    assert!(h.api_requests().iter().all(|r| r.method == Method::GET));
}

#[tokio::test]
async fn a_stuck_restore_fails_at_the_deadline_and_releases_the_capture() {
    let mut h = setup(2, DeletionPolicy::Delete).await;
    h.reconcile_branch("fork").await.unwrap();
    // fork-0 starts; fork-1's node keeps saying it is out of memory.
    h.settle_sandbox("fork-0").await;
    for _ in 0..3 {
        h.agent.fail_next(
            "RestoreBranch",
            Status::resource_exhausted("no memory left"),
        );
    }
    h.reconcile_sandbox("fork-1").await.unwrap_err();
    h.reconcile_branch("fork").await.unwrap();
    assert_eq!(
        h.branch("fork")
            .unwrap()
            .status
            .unwrap()
            .branches_ready
            .as_deref(),
        Some("1/2")
    );

    h.clock.advance(Duration::from_secs(61));
    h.renew_agent_lease();
    h.api.clear_requests();
    h.reconcile_branch("fork").await.unwrap();

    failed_status(&h, reason::DEADLINE_EXCEEDED);
    let uid = h.branch("fork").unwrap().metadata.uid.unwrap();
    assert_eq!(
        h.agent_calls("DeleteCapture"),
        vec![format!("DeleteCapture {uid}")]
    );
    let deletes: Vec<_> = h
        .api_requests()
        .into_iter()
        .filter(|r| r.method == Method::DELETE)
        .map(|r| r.path)
        .collect();
    assert_eq!(
        deletes,
        vec!["/apis/sandfork.dev/v1alpha1/namespaces/team-a/sandboxes/fork-1"],
        "only the branch that is not ready"
    );
}

#[tokio::test]
async fn a_failed_source_fails_the_branch_at_once() {
    let h = Harness::new().await;
    h.agent.state.lock().unwrap().start_state = Some(sandfork_api::agent::v1::SandboxState::Failed);
    h.api.insert(&sandbox_object("src", 256));
    h.settle_sandbox("src").await;
    h.api.insert(&finalized(branch_object(
        "fork",
        "src",
        1,
        DeletionPolicy::Delete,
    )));

    h.reconcile_branch("fork").await.unwrap();

    let (_, message) = failed_status(&h, reason::SOURCE_FAILED);
    assert!(message.contains("VmFailed"), "{message}");
}

#[tokio::test]
async fn a_transient_capture_error_is_retried_with_a_condition() {
    let h = setup(1, DeletionPolicy::Delete).await;
    h.agent
        .fail_next("CaptureSandbox", Status::internal("copier thread died"));

    let err = h.reconcile_branch("fork").await.unwrap_err();
    assert!(err.is_transient());
    let status = h.branch("fork").unwrap().status.unwrap();
    let (_, why, message) = condition(&status.conditions, PROGRESSING);
    assert_eq!(why, reason::CAPTURE_FAILED);
    assert!(message.contains("copier thread died"), "{message}");

    h.reconcile_branch("fork").await.unwrap();
    assert!(h.branch("fork").unwrap().status.unwrap().capture.is_some());
}

#[tokio::test]
async fn deletion_removes_the_branches_then_frees_the_capture() {
    let h = setup(2, DeletionPolicy::Delete).await;
    h.reconcile_branch("fork").await.unwrap();
    for index in 0..2 {
        h.settle_sandbox(&format!("fork-{index}")).await;
    }
    let uid = h.branch("fork").unwrap().metadata.uid.unwrap();
    h.mark_deleted::<SandboxBranch>("fork");
    h.api.clear_requests();

    // First pass: the branches are asked to go; the capture stays while they run.
    let err = h.reconcile_branch("fork").await.unwrap_err();
    assert!(err.is_waiting(), "{err}");
    assert_eq!(
        crate::controller::error_policy(Arc::new(h.branch("fork").unwrap()), &err, h.ctx.clone()),
        Action::requeue(h.ctx.settings.poll)
    );
    let deletes = h
        .api_requests()
        .into_iter()
        .filter(|r| r.method == Method::DELETE)
        .count();
    assert_eq!(deletes, 2);
    assert!(h.agent_calls("DeleteCapture").is_empty());
    assert!(h.branch("fork").is_some());

    // The branches' own finalizers stop their VMs.
    for index in 0..2 {
        h.reconcile_sandbox(&format!("fork-{index}")).await.unwrap();
    }
    assert_eq!(h.agent_calls("DeleteSandbox").len(), 2);

    h.reconcile_branch("fork").await.unwrap();
    assert_eq!(
        h.agent_calls("DeleteCapture"),
        vec![format!("DeleteCapture {uid}")]
    );
    assert!(h.branch("fork").is_none(), "finalizer removed");
    assert!(h.sandbox("src").is_some(), "the source is untouched");
}

#[tokio::test]
async fn retained_branches_outlive_the_branch_object() {
    let h = setup(1, DeletionPolicy::Retain).await;
    h.reconcile_branch("fork").await.unwrap();
    h.settle_sandbox("fork-0").await;
    h.mark_deleted::<SandboxBranch>("fork");

    h.reconcile_branch("fork").await.unwrap();

    assert!(h.branch("fork").is_none());
    assert!(h.sandbox("fork-0").unwrap().is_ready());
    assert_eq!(h.agent_calls("DeleteCapture").len(), 1);
    assert!(h.agent_calls("DeleteSandbox").is_empty());
}

#[tokio::test]
async fn deleting_a_branch_that_never_captured_needs_no_agent() {
    let h = Harness::new().await;
    h.api.insert(&finalized(branch_object(
        "fork",
        "nope",
        1,
        DeletionPolicy::Delete,
    )));
    h.mark_deleted::<SandboxBranch>("fork");

    h.reconcile_branch("fork").await.unwrap();

    assert!(h.branch("fork").is_none());
    assert!(h.agent.calls().is_empty());
}

#[tokio::test]
async fn fewer_branches_wanted_deletes_the_highest_indexes() {
    let h = setup(3, DeletionPolicy::Delete).await;
    h.reconcile_branch("fork").await.unwrap();
    h.api.edit::<SandboxBranch>(Some(NS), "fork", |o| {
        o["spec"]["branches"] = serde_json::json!(1);
        o["metadata"]["generation"] = serde_json::json!(2);
    });
    h.api.clear_requests();

    h.reconcile_branch("fork").await.unwrap();

    let deletes: Vec<_> = h
        .api_requests()
        .into_iter()
        .filter(|r| r.method == Method::DELETE)
        .map(|r| r.path.rsplit('/').next().unwrap().to_string())
        .collect();
    assert_eq!(deletes, vec!["fork-1", "fork-2"]);
    let status = h.branch("fork").unwrap().status.unwrap();
    assert_eq!(status.branches_ready.as_deref(), Some("0/1"));
    assert_eq!(status.observed_generation, Some(2));
}

#[test]
fn source_changes_wake_the_branches_waiting_for_it() {
    let (store, mut writer) = kube::runtime::reflector::store::<SandboxBranch>();
    let mut waiting = branch_object("fork", "src", 1, DeletionPolicy::Delete);
    waiting.metadata.uid = Some("b1".into());
    writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(waiting));
    let mut other = branch_object("other", "elsewhere", 1, DeletionPolicy::Delete);
    other.metadata.uid = Some("b2".into());
    writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(other));
    // Captured already: what its source does no longer matters to it.
    let mut captured = branch_object("captured", "src", 1, DeletionPolicy::Delete);
    captured.metadata.uid = Some("b3".into());
    captured.status = Some(SandboxBranchStatus {
        capture: Some(Default::default()),
        ..Default::default()
    });
    writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(captured));

    let source = sandbox_object("src", 64);
    let refs = crate::run::branches_concerned(&store, &source);
    assert_eq!(refs.len(), 1);
    assert_eq!(refs[0].name, "fork");

    let mut branch0 = sandbox_object("other-0", 64);
    branch0.metadata.labels = Some(BTreeMap::from([(
        labels::BRANCH.to_string(),
        "other".to_string(),
    )]));
    let refs = crate::run::branches_concerned(&store, &branch0);
    assert_eq!(refs.len(), 1);
    assert_eq!(refs[0].name, "other");
}

#[tokio::test]
async fn the_capturing_pass_goes_straight_from_the_capture_to_the_branches() {
    let h = setup(1, DeletionPolicy::Delete).await;

    h.reconcile_branch("fork").await.unwrap();

    // One look at the source, no look for branches that cannot exist yet,
    // and no Event between the capture and the branch's creation.
    let all = h.api.requests();
    let describe = |r: &Recorded| {
        let what = if r.path.ends_with("/events") {
            format!("event {}", r.body["reason"].as_str().unwrap_or_default())
        } else if is_status_apply(r) {
            "status".to_string()
        } else {
            r.path.rsplit('/').next().unwrap_or_default().to_string()
        };
        format!("{} {what}", r.method)
    };
    let seen: Vec<String> = all.iter().map(describe).collect();
    let gets = all
        .iter()
        .filter(|r| r.method == Method::GET && r.path.ends_with("/sandboxes/src"))
        .count();
    assert_eq!(gets, 1, "{seen:#?}");
    assert!(
        !all.iter()
            .any(|r| r.method == Method::GET && r.path.ends_with("/sandboxes")),
        "{seen:#?}"
    );
    let position = |wanted: &str| {
        seen.iter()
            .position(|s| s == wanted)
            .unwrap_or_else(|| panic!("{wanted} in {seen:#?}"))
    };
    assert!(position("POST sandboxes") < position("POST event Captured"));
    assert_eq!(
        h.events(),
        vec!["Capturing", "Captured", "BranchCreated"],
        "{seen:#?}"
    );
}

#[tokio::test]
async fn a_branch_restores_on_its_first_pass_once_its_pod_runs() {
    let h = setup(1, DeletionPolicy::Delete).await;
    h.reconcile_branch("fork").await.unwrap();
    assert!(h.sandbox("fork-0").is_some());
    h.api.clear_requests();

    // Made with its finalizer: the first pass makes its Pod (bound and
    // running at once here), records where it runs, restores, then reports.
    h.reconcile_sandbox("fork-0").await.unwrap();

    assert_eq!(h.agent_calls("RestoreBranch").len(), 1);
    let requests = h.api.requests();
    assert!(!requests.iter().any(adds_finalizer), "{requests:#?}");
    let writes: Vec<_> = requests.iter().filter(|r| is_status_apply(r)).collect();
    assert_eq!(writes.len(), 2, "{writes:#?}");
    assert_eq!(writes[0].body["status"]["node"], NODE);
    assert_eq!(writes[0].body["status"]["pod"], "sandbox-fork-0");
    assert_eq!(
        writes[0].body["status"]["conditions"][0]["reason"],
        crate::sandbox::reason::SCHEDULED
    );
    assert_eq!(writes[1].body["status"]["conditions"][0]["status"], "True");
    // The Event follows the write that makes it Ready.
    assert_eq!(h.events(), vec!["PodCreated", "Scheduled", "Restored"]);
    let restored = requests
        .iter()
        .position(|r| r.path.ends_with("/events") && r.body["reason"] == "Restored")
        .unwrap();
    let last_write = requests.iter().rposition(is_status_apply).unwrap();
    assert!(last_write < restored, "{requests:#?}");
    assert!(h.sandbox("fork-0").unwrap().is_ready());
}

#[tokio::test]
async fn a_branch_takes_its_origin_from_the_cache_once_it_shows_the_capture() {
    let mut h = setup(1, DeletionPolicy::Delete).await;
    h.reconcile_branch("fork").await.unwrap();
    let branch = h.branch("fork").unwrap();
    assert!(branch.status.as_ref().unwrap().capture_time.is_some());
    h.branches
        .apply_watcher_event(&watcher::Event::Apply(branch));
    h.api.clear_requests();

    h.reconcile_sandbox("fork-0").await.unwrap();

    let requests = h.api_requests();
    assert!(
        !requests
            .iter()
            .any(|r| r.path.ends_with("/sandboxbranches/fork")),
        "{requests:#?}"
    );
    let origin = h.sandbox("fork-0").unwrap().status.unwrap().origin.unwrap();
    assert_eq!(origin.sandbox_branch, "fork");
    assert!(origin.capture_time.is_some());
}

#[tokio::test]
async fn a_source_running_in_the_cache_is_captured_without_a_lookup() {
    let mut h = setup(1, DeletionPolicy::Delete).await;
    let source = h.sandbox("src").unwrap();
    h.sandboxes
        .apply_watcher_event(&watcher::Event::Apply(source));

    h.reconcile_branch("fork").await.unwrap();

    assert_eq!(h.agent_calls("CaptureSandbox").len(), 1);
    let requests = h.api_requests();
    assert!(
        !requests
            .iter()
            .any(|r| r.method == Method::GET && r.path.ends_with("/sandboxes/src")),
        "{requests:#?}"
    );
    assert_eq!(created_sandboxes(&h).len(), 1);
}

#[tokio::test]
async fn a_live_copy_that_completes_after_the_branches_start_fills_in_its_figures() {
    let h = setup(1, DeletionPolicy::Delete).await;
    h.agent.state.lock().unwrap().copy_in_background = true;
    let uid = h.branch("fork").unwrap().metadata.uid.unwrap();

    h.reconcile_branch("fork").await.unwrap();
    let capture = h.branch("fork").unwrap().status.unwrap().capture.unwrap();
    assert_eq!(capture.copy_duration_millis, None, "{capture:?}");
    h.settle_sandbox("fork-0").await;

    // Ready while the copy goes on: looked at again soon, not at resync.
    // The agent is not asked on the way to Ready.
    h.api.clear_requests();
    let action = h.reconcile_branch("fork").await.unwrap();
    assert_eq!(action, Action::requeue(h.ctx.settings.poll));
    let status = h.branch("fork").unwrap().status.unwrap();
    assert_eq!(status.branches_ready.as_deref(), Some("1/1"));
    assert_eq!(status.capture.unwrap().copy_duration_millis, None);
    assert!(h.agent_calls("GetCapture").is_empty());
    assert_eq!(h.events(), vec!["Ready"]);

    // Ready, copy still going on: asked, and looked at again soon.
    let action = h.reconcile_branch("fork").await.unwrap();
    assert_eq!(action, Action::requeue(h.ctx.settings.poll));
    assert_eq!(
        h.agent_calls("GetCapture"),
        vec![format!("GetCapture {uid}")]
    );
    let status = h.branch("fork").unwrap().status.unwrap();
    assert_eq!(status.capture.unwrap().copy_duration_millis, None);

    h.agent.finish_copy(&uid, 1_166_000_000);
    h.api.clear_requests();
    let action = h.reconcile_branch("fork").await.unwrap();
    assert_eq!(action, Action::requeue(h.ctx.settings.resync));
    let capture = h.branch("fork").unwrap().status.unwrap().capture.unwrap();
    assert_eq!(capture.copy_duration_millis, Some(1166));
    assert_eq!(h.events(), vec!["CopyComplete"]);
    let metrics = h.ctx.metrics.encode();
    assert!(
        metrics.contains("sandfork_capture_duration_seconds_count{mode=\"Live\"} 1"),
        "{metrics}"
    );

    // Complete: the agent is not asked again.
    h.api.clear_requests();
    h.reconcile_branch("fork").await.unwrap();
    assert_eq!(h.agent_calls("GetCapture").len(), 2);
}

#[tokio::test]
async fn a_live_copy_whose_capture_is_gone_is_not_asked_about_again() {
    let h = setup(1, DeletionPolicy::Delete).await;
    h.agent.state.lock().unwrap().copy_in_background = true;
    let uid = h.branch("fork").unwrap().metadata.uid.unwrap();
    h.reconcile_branch("fork").await.unwrap();
    h.settle_sandbox("fork-0").await;
    h.reconcile_branch("fork").await.unwrap();
    h.agent.state.lock().unwrap().captures.remove(&uid);

    let action = h.reconcile_branch("fork").await.unwrap();

    assert_eq!(action, Action::requeue(h.ctx.settings.resync));
    assert_eq!(h.agent_calls("GetCapture").len(), 1);
    let status = h.branch("fork").unwrap().status.unwrap();
    assert_eq!(status.capture.unwrap().copy_duration_millis, None);
    assert_eq!(condition(&status.conditions, READY).0, "True");
}

/// A fork whose first pass captured and created `branches` branches (status
/// `Progressing`), the first `ready_now` of which become Ready at once.
async fn fork_with_branches(branches: u32, ready_now: u32) -> Harness {
    let h = setup(branches, DeletionPolicy::Delete).await;
    h.reconcile_branch("fork").await.unwrap();
    for index in 0..ready_now {
        h.settle_sandbox(&format!("fork-{index}")).await;
        assert!(h.sandbox(&format!("fork-{index}")).unwrap().is_ready());
    }
    let status = h.branch("fork").unwrap().status.unwrap();
    let (progressing, why, _) = condition(&status.conditions, PROGRESSING);
    assert_eq!(
        (progressing.as_str(), why.as_str()),
        ("True", reason::RESTORING)
    );
    assert!(status.completion_time.is_none());
    h
}

/// The DELETE requests recorded since the last `clear_requests`.
fn deletes(h: &Harness) -> Vec<String> {
    h.api_requests()
        .into_iter()
        .filter(|r| r.method == Method::DELETE)
        .map(|r| r.path)
        .collect()
}

#[tokio::test]
async fn branches_ready_before_the_deadline_make_it_ready_whenever_it_is_looked_at() {
    // The operator wrote Progressing, the branches became Ready, and the
    // next look (a new operator's) comes after the deadline.
    let mut h = fork_with_branches(3, 3).await;
    let became_ready = h.clock.now();
    h.clock.advance(Duration::from_secs(61));
    h.renew_agent_lease();
    h.restart();
    h.api.clear_requests();

    h.reconcile_branch("fork").await.unwrap();

    let status = h.branch("fork").unwrap().status.unwrap();
    let (ready, why, message) = condition(&status.conditions, READY);
    assert_eq!(
        (ready.as_str(), why.as_str()),
        ("True", reason::BRANCHES_READY),
        "{message}"
    );
    assert_eq!(condition(&status.conditions, FAILED).0, "False");
    assert_eq!(condition(&status.conditions, PROGRESSING).0, "False");
    assert!(status.error.is_none());
    assert_eq!(status.branches_ready.as_deref(), Some("3/3"));
    // Completed when the last branch became Ready, not when it was seen.
    assert_eq!(status.completion_time.unwrap().0, became_ready);
    assert_eq!(h.events(), vec!["Ready"]);
    assert!(h.agent_calls("DeleteCapture").is_empty());
    assert!(deletes(&h).is_empty(), "{:#?}", deletes(&h));
    assert!(created_sandboxes(&h).is_empty());

    // Complete: the deadline no longer applies on later passes.
    h.clock.advance(Duration::from_secs(600));
    h.renew_agent_lease();
    h.reconcile_branch("fork").await.unwrap();
    let status = h.branch("fork").unwrap().status.unwrap();
    assert_eq!(condition(&status.conditions, READY).0, "True");
}

#[tokio::test]
async fn a_branch_not_ready_at_the_deadline_still_fails_the_fork_when_looked_at_late() {
    let mut h = fork_with_branches(3, 2).await;
    h.clock.advance(Duration::from_secs(61));
    h.renew_agent_lease();
    h.restart();
    h.api.clear_requests();

    assert_eq!(
        h.reconcile_branch("fork").await.unwrap(),
        Action::await_change()
    );

    let (status, message) = failed_status(&h, reason::DEADLINE_EXCEEDED);
    assert!(message.contains("failureDeadline 60s"), "{message}");
    assert_eq!(condition(&status.conditions, READY).0, "False");
    assert!(status.completion_time.is_none());
    let uid = h.branch("fork").unwrap().metadata.uid.unwrap();
    assert_eq!(
        h.agent_calls("DeleteCapture"),
        vec![format!("DeleteCapture {uid}")]
    );
    assert_eq!(
        deletes(&h),
        vec!["/apis/sandfork.dev/v1alpha1/namespaces/team-a/sandboxes/fork-2"],
        "only the branch that is not ready"
    );
}

#[tokio::test]
async fn a_fork_whose_last_branch_became_ready_after_the_deadline_fails() {
    // The deadline bounds the fork's completion: the instant its last
    // branch became Ready.
    let mut h = fork_with_branches(3, 2).await;
    h.clock.advance(Duration::from_secs(61));
    h.renew_agent_lease();
    h.settle_sandbox("fork-2").await;
    assert!(h.sandbox("fork-2").unwrap().is_ready());
    h.restart();
    h.api.clear_requests();

    assert_eq!(
        h.reconcile_branch("fork").await.unwrap(),
        Action::await_change()
    );

    let (status, message) = failed_status(&h, reason::DEADLINE_EXCEEDED);
    assert!(message.contains("failureDeadline 60s"), "{message}");
    assert!(message.contains("after the deadline"), "{message}");
    assert!(status.completion_time.is_none());
    assert_eq!(h.agent_calls("DeleteCapture").len(), 1);
    assert!(deletes(&h).is_empty(), "the branches are Ready and kept");
}

#[tokio::test]
async fn a_fork_complete_in_time_is_looked_at_again_at_the_poll_interval_after_its_deadline() {
    let mut h = setup(1, DeletionPolicy::Delete).await;
    h.agent.state.lock().unwrap().copy_in_background = true;
    h.reconcile_branch("fork").await.unwrap();
    h.settle_sandbox("fork-0").await;
    h.clock.advance(Duration::from_secs(61));
    h.renew_agent_lease();

    // Completed in time, seen late, its live copy still going on: looked at
    // again for the copy's figures, at the poll interval, not at once.
    let action = h.reconcile_branch("fork").await.unwrap();
    assert_eq!(action, Action::requeue(h.ctx.settings.poll));
    let status = h.branch("fork").unwrap().status.unwrap();
    assert_eq!(condition(&status.conditions, READY).0, "True");

    let action = h.reconcile_branch("fork").await.unwrap();
    assert_eq!(action, Action::requeue(h.ctx.settings.poll));
    assert_eq!(h.agent_calls("GetCapture").len(), 1);
}

#[tokio::test]
async fn a_branchs_pod_is_required_on_the_source_node_and_restored_into() {
    let h = setup(1, DeletionPolicy::Delete).await;
    let mut src = h.sandbox("src").unwrap();
    // The source tolerates its node's taint; the branch must too.
    src.spec.tolerations = vec![k8s_openapi::api::core::v1::Toleration {
        key: Some("sandfork.dev/dedicated".into()),
        operator: Some("Exists".into()),
        ..Default::default()
    }];
    h.api.edit::<Sandbox>(Some(NS), "src", |o| {
        o["spec"]["tolerations"] = serde_json::to_value(&src.spec.tolerations).unwrap()
    });
    h.api.hold_pods();
    h.reconcile_branch("fork").await.unwrap();
    h.settle_sandbox("fork-0").await;

    let pod = serde_json::to_value(h.pod("fork-0").unwrap()).unwrap();
    assert!(pod["spec"]["nodeName"].is_null(), "the scheduler binds it");
    let terms = &pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"];
    assert_eq!(
        terms,
        &serde_json::json!([{"matchFields": [
            {"key": "metadata.name", "operator": "In", "values": [NODE]},
        ]}])
    );
    assert_eq!(
        pod["spec"]["tolerations"][0]["key"],
        "sandfork.dev/dedicated"
    );
    assert!(h.agent_calls("RestoreBranch").is_empty(), "not bound yet");

    h.edit_pod("fork-0", |pod| {
        crate::fixtures::bind_pod(pod, NODE);
        crate::fixtures::run_pod(pod);
    });
    h.reconcile_sandbox("fork-0").await.unwrap();
    let fork = h.sandbox("fork-0").unwrap();
    assert!(fork.is_ready(), "{:?}", fork.status);
    assert_eq!(fork.node(), Some(NODE));
    let uid = fork.metadata.uid.unwrap();
    let pod_uid = h.pod("fork-0").unwrap().metadata.uid.unwrap();
    assert_eq!(
        h.agent.state.lock().unwrap().pod_uids.get(&uid),
        Some(&pod_uid)
    );
}
