//! The SandboxBranch controller: captures the source Sandbox once, on its
//! node, and creates the branch Sandboxes `<name>-<index>` that restore from
//! that capture.
//!
//! Restart safety: the capture is keyed by the SandboxBranch's UID (the agent
//! returns the existing one when asked again), branch names are fixed by
//! their index, and a create that finds its name taken checks that the
//! object is its own. No step creates a twin, whatever point a previous
//! reconcile reached.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use sandfork_api::agent::v1 as pb;
use sandfork_api::branch::{
    BranchError, BranchStatus, CaptureFigures, CaptureMode, DeletionPolicy,
};
use sandfork_api::conditions::{self, Cond};
use sandfork_api::sandbox::RestoreSource;
use sandfork_api::{Sandbox, SandboxBranch, SandboxBranchStatus, SandboxSpec, labels};
use tonic::Code;

use crate::agents::with_timeout;
use crate::context::{Context, FIELD_MANAGER, FINALIZER};
use crate::controller::{Reconcile, StatusUpdate, give_up_or_retry};
use crate::error::{Error, Result, agent_code_is_transient, is_already_exists, is_not_found};
use crate::metrics::{KindLabels, ModeLabels};
use crate::error::ErrorChain;

pub const CONTROLLER: &str = "sandboxbranch";

/// The agent's page size, for its page counts.
const PAGE_BYTES: u64 = 4096;

/// Reasons of the conditions.
pub mod reason {
    pub const SOURCE_NOT_FOUND: &str = "SourceNotFound";
    pub const WAITING_FOR_SOURCE: &str = "WaitingForSource";
    pub const SOURCE_FAILED: &str = "SourceFailed";
    pub const AGENT_UNAVAILABLE: &str = "AgentUnavailable";
    pub const CAPTURING: &str = "Capturing";
    pub const CAPTURE_FAILED: &str = "CaptureFailed";
    pub const RESTORING: &str = "Restoring";
    pub const BRANCHES_READY: &str = "BranchesReady";
    pub const BRANCH_FAILED: &str = "BranchFailed";
    pub const NAME_CONFLICT: &str = "NameConflict";
    pub const DEADLINE_EXCEEDED: &str = "DeadlineExceeded";
    pub const COMPLETE: &str = "Complete";
}

impl Reconcile for SandboxBranch {
    const CONTROLLER: &'static str = CONTROLLER;
    type Status = SandboxBranchStatus;

    fn status(&self) -> Option<&SandboxBranchStatus> {
        self.status.as_ref()
    }

    async fn apply(&self, ctx: &Context) -> Result<Action> {
        apply(self, ctx).await
    }

    async fn cleanup(&self, ctx: &Context) -> Result<Action> {
        cleanup(self, ctx).await
    }
}

fn mode_name(mode: CaptureMode) -> &'static str {
    match mode {
        CaptureMode::Live => "Live",
        CaptureMode::StopAndCopy => "StopAndCopy",
    }
}

type Update<'a> = StatusUpdate<'a, SandboxBranch>;

impl StatusUpdate<'_, SandboxBranch> {
    /// Sets the three conditions to the same reason and message.
    fn set(&mut self, ready: bool, progressing: bool, failed: bool, reason: &str, message: &str) {
        self.set_conditions(&[
            Cond::new(conditions::READY, ready, reason, message),
            Cond::new(conditions::PROGRESSING, progressing, reason, message),
            Cond::new(conditions::FAILED, failed, reason, message),
        ]);
    }

    /// Not ready yet, working on it.
    fn progress(&mut self, reason: &str, message: &str) {
        self.set(false, true, false, reason, message);
    }
}

/// When the SandboxBranch fails if it is not done.
fn deadline(branch: &SandboxBranch) -> Option<Timestamp> {
    let created = branch.metadata.creation_timestamp.as_ref()?.0;
    let limit = SignedDuration::try_from(Duration::from(branch.spec.failure_deadline)).ok()?;
    created.checked_add(limit).ok()
}

async fn apply(branch: &SandboxBranch, ctx: &Context) -> Result<Action> {
    let now = ctx.clock.now();
    let uid = branch
        .uid()
        .ok_or_else(|| Error::Permanent("SandboxBranch without a UID".into()))?;
    let name = branch.name_any();
    let namespace = branch.namespace().unwrap_or_default();
    let sandboxes: Api<Sandbox> = Api::namespaced(ctx.client.clone(), &namespace);
    let source_name = branch.spec.source_ref.name.clone();
    let mut update = Update::new(branch, now);

    if branch.is_failed() {
        return Ok(Action::await_change());
    }
    let complete = update.status.completion_time.is_some();
    let deadline = deadline(branch);
    if !complete && deadline.is_some_and(|deadline| now > deadline) {
        let last = conditions::find(&update.status.conditions, conditions::PROGRESSING)
            .map(|c| format!(" (last: {}: {})", c.reason, c.message))
            .unwrap_or_default();
        let message = format!(
            "the capture and branches were not done within failureDeadline {}{last}",
            branch.spec.failure_deadline
        );
        return fail(branch, ctx, update, reason::DEADLINE_EXCEEDED, message).await;
    }
    // How long until the deadline, for requeues and the capture timeout.
    let remaining = deadline
        .map(|deadline| Duration::try_from(deadline.duration_since(now)).unwrap_or_default())
        .unwrap_or(ctx.settings.capture_timeout);
    let poll = ctx
        .settings
        .poll
        .min(remaining + Duration::from_millis(100));

    // Capture once.
    let mut captured_note = None;
    let mut source_spec = None;
    if update.status.capture.is_none() {
        // A source the Sandbox controller's cache shows running is taken
        // from there; anything else is looked up before it is waited for.
        let cached = ctx
            .caches
            .sandboxes
            .get(&ObjectRef::new(&source_name).within(&namespace))
            .filter(|source| source.is_ready() && source.node().is_some());
        let source = match cached {
            Some(source) => Some(Sandbox::clone(&source)),
            None => sandboxes.get_opt(&source_name).await?,
        };
        let Some(source) = source else {
            let message =
                format!("Sandbox {source_name:?} does not exist in namespace {namespace}");
            update.progress(reason::SOURCE_NOT_FOUND, &message);
            update.write(ctx).await?;
            return Ok(Action::requeue(poll));
        };
        if !source.is_ready() || source.node().is_none() {
            let ready = source
                .status
                .as_ref()
                .and_then(|s| conditions::find(&s.conditions, conditions::READY).cloned());
            if let Some(ready) = &ready
                && crate::sandbox::PERMANENT_REASONS.contains(&ready.reason.as_str())
            {
                let message = format!(
                    "source Sandbox {source_name:?} failed: {}: {}",
                    ready.reason, ready.message
                );
                return fail(branch, ctx, update, reason::SOURCE_FAILED, message).await;
            }
            let why = ready
                .map(|c| format!(" ({}: {})", c.reason, c.message))
                .unwrap_or_default();
            let message = format!("waiting for Sandbox {source_name:?} to be Ready{why}");
            update.progress(reason::WAITING_FOR_SOURCE, &message);
            update.write(ctx).await?;
            return Ok(Action::requeue(poll));
        }
        let node = source.node().unwrap_or_default().to_string();
        let source_uid = source.uid().unwrap_or_default();
        let mut client = match ctx.agents.client(&node, now) {
            Ok(client) => client,
            Err(Error::AgentUnavailable { reason, .. }) => {
                let message = format!("the agent on node {node} is not available: {reason}");
                update.progress(reason::AGENT_UNAVAILABLE, &message);
                update.write(ctx).await?;
                return Ok(Action::requeue(poll));
            }
            Err(err) => return Err(err),
        };
        if update.status.source_node.as_deref() != Some(node.as_str()) {
            update.status.source_node = Some(node.clone());
        }
        let message = format!(
            "capturing Sandbox {source_name:?} on node {node} ({})",
            mode_name(branch.spec.mode)
        );
        let first_try = !conditions::find(&update.status.conditions, conditions::PROGRESSING)
            .is_some_and(|c| c.reason == reason::CAPTURING || c.reason == reason::CAPTURE_FAILED);
        update.progress(reason::CAPTURING, &message);
        let started = Instant::now();
        let request = pb::CaptureSandboxRequest {
            sandbox_uid: source_uid,
            capture_uid: uid.clone(),
            mode: match branch.spec.mode {
                CaptureMode::Live => pb::CaptureMode::Live,
                CaptureMode::StopAndCopy => pb::CaptureMode::StopAndCopy,
            } as i32,
        };
        let timeout = ctx
            .settings
            .capture_timeout
            .min(remaining.max(Duration::from_secs(1)));
        // The status and the Event go out while the agent captures, not
        // before: the capture is keyed by this SandboxBranch's UID, so a
        // pass that fails to write the status captures nothing twice.
        let announce = async {
            update.write(ctx).await?;
            if first_try {
                ctx.event(
                    branch,
                    EventType::Normal,
                    reason::CAPTURING,
                    "Capture",
                    message,
                )
                .await;
            }
            Ok::<_, Error>(())
        };
        let (captured, announced) = tokio::join!(
            client.capture_sandbox(with_timeout(request, timeout)),
            announce
        );
        announced?;
        let capture = match captured {
            Ok(capture) => capture.into_inner(),
            Err(status) => {
                let message = format!(
                    "the agent on node {node} could not capture: {}",
                    status.message()
                );
                if !agent_code_is_transient(status.code()) {
                    return fail(branch, ctx, update, reason::CAPTURE_FAILED, message).await;
                }
                update.progress(reason::CAPTURE_FAILED, &format!("{message}; retrying"));
                update.write(ctx).await?;
                ctx.event(
                    branch,
                    EventType::Warning,
                    reason::CAPTURE_FAILED,
                    "Capture",
                    message,
                )
                .await;
                return Err(Error::Agent { node, status });
            }
        };
        let stats = capture.stats.unwrap_or_default();
        let figures = CaptureFigures {
            pause_micros: stats.pause_ns / 1_000,
            bytes: stats.bytes,
            pages_copied_by_fault_handler: stats.pages_copied_by_fault_handler,
            copy_duration_millis: capture.memory_complete.then_some(stats.copy_ns / 1_000_000),
        };
        let captured_at = Timestamp::from_microsecond(capture.captured_at_unix_micros)
            .ok()
            .filter(|_| capture.captured_at_unix_micros > 0)
            .unwrap_or(now);
        update.status.capture_time = Some(Time(captured_at));
        update.status.capture = Some(figures.clone());
        let mode = ModeLabels {
            mode: mode_name(branch.spec.mode),
        };
        ctx.metrics
            .capture_pause
            .get_or_create(&mode)
            .observe(stats.pause_ns as f64 / 1e9);
        // A live capture answers at the pause; its copy goes on meanwhile.
        let copy = if capture.memory_complete {
            ctx.metrics
                .capture_duration
                .get_or_create(&mode)
                .observe(stats.copy_ns as f64 / 1e9);
            copy_summary(&stats)
        } else {
            "memory copy going on in the background".to_string()
        };
        let note = format!(
            "captured Sandbox {source_name:?} on node {node}: paused {} us, {copy}; call took {:.0} ms",
            figures.pause_micros,
            started.elapsed().as_secs_f64() * 1e3,
        );
        update.progress(
            reason::RESTORING,
            &format!("captured; starting {} branches", branch.spec.branches),
        );
        // Branches are created only once this is written: the Sandbox
        // controller reads their origin (the capture time) from it.
        update.write(ctx).await?;
        // Published once the branches exist: they need not wait for it.
        captured_note = Some(note);
        source_spec = Some(source.spec);
    }
    let node = update.status.source_node.clone().unwrap_or_default();

    // The branches that exist: ours are those restoring from this UID. A
    // pass that has just captured knows there are none: branches are made
    // only once the status holds the capture (and a create that finds its
    // name taken checks whose the object is).
    //
    // Read from the API server's watch cache as it is: a consistent list
    // waits until that cache has caught up with etcd, up to the next
    // progress request (kube-apiserver asks every 100 ms), whenever
    // anything else was written since the last Sandbox event. The passes
    // here are started by that cache's own watch events; if it lags (another
    // API server), counting a branch short only means another pass.
    let selector = format!("{}={}", labels::BRANCH, name);
    let mut existing: BTreeMap<u32, Sandbox> = BTreeMap::new();
    if source_spec.is_none() {
        for sandbox in sandboxes
            .list(&ListParams::default().labels(&selector).match_any())
            .await?
            .items
        {
            if is_ours(&sandbox, &uid)
                && let Some(index) = branch_index(&sandbox)
            {
                existing.insert(index, sandbox);
            }
        }
    }

    let wanted = branch.spec.branches;
    let missing: Vec<u32> = (0..wanted)
        .filter(|index| !existing.contains_key(index))
        .collect();
    let mut created_now = Vec::new();
    let halted = async {
        if missing.is_empty() {
            return Ok(None);
        }
        // Branches copy the source's spec; a branch made earlier has it too,
        // so the source may be gone by now.
        let template = match (existing.values().next(), source_spec) {
            (Some(sandbox), _) => Some(sandbox.spec.clone()),
            (None, Some(spec)) => Some(spec),
            (None, None) => sandboxes
                .get_opt(&source_name)
                .await?
                .map(|source| source.spec),
        };
        let Some(template) = template else {
            let message = format!(
                "source Sandbox {source_name:?} was deleted before its branches were created"
            );
            return Ok(Some(Halt::Fail(reason::SOURCE_NOT_FOUND, message)));
        };
        for index in missing {
            let object = branch_object(branch, index, &template, &node, &uid);
            let branch_name = object.name_any();
            match sandboxes
                .create(
                    &PostParams {
                        dry_run: false,
                        field_manager: Some(FIELD_MANAGER.into()),
                    },
                    &object,
                )
                .await
            {
                Ok(created) => {
                    created_now.push(created.object_ref(&()));
                    existing.insert(index, created);
                }
                Err(err) if is_already_exists(&err) => match sandboxes.get_opt(&branch_name).await?
                {
                    Some(found) if is_ours(&found, &uid) => {
                        existing.insert(index, found);
                    }
                    Some(_) => {
                        let message = format!(
                            "a Sandbox named {branch_name:?} already exists and was not made by this SandboxBranch"
                        );
                        return Ok(Some(Halt::Fail(reason::NAME_CONFLICT, message)));
                    }
                    // Deleted in between: create it on the next pass.
                    None => return Ok(Some(Halt::Retry)),
                },
                Err(err) => return Err(Error::from(err)),
            }
        }
        Ok(None)
    }
    .await;

    // This pass's Events, now that the branches are on their way.
    if let Some(note) = captured_note {
        ctx.event(branch, EventType::Normal, "Captured", "Capture", note)
            .await;
    }
    for created in created_now {
        let note = format!(
            "created Sandbox {:?} on node {node}",
            created.name.as_deref().unwrap_or_default()
        );
        ctx.event_about(
            branch,
            Some(created),
            EventType::Normal,
            "BranchCreated",
            "Restore",
            note,
        )
        .await;
    }
    match halted? {
        None => {}
        Some(Halt::Fail(reason, message)) => {
            return fail(branch, ctx, update, reason, message).await;
        }
        Some(Halt::Retry) => return Ok(Action::requeue(poll)),
    }

    // Fewer branches wanted than exist: remove the extra ones we own.
    if branch.spec.deletion_policy == DeletionPolicy::Delete {
        let extra: Vec<u32> = existing.range(wanted..).map(|(index, _)| *index).collect();
        for index in extra {
            if let Some(sandbox) = existing.remove(&index)
                && sandbox.metadata.deletion_timestamp.is_none()
            {
                delete_sandbox(&sandboxes, &sandbox.name_any()).await?;
            }
        }
    }

    // Asked only once Ready is written, to keep the call off that path.
    let copy_pending = if complete {
        record_finished_copy(branch, ctx, &mut update, &node, &uid).await
    } else {
        update
            .status
            .capture
            .as_ref()
            .is_some_and(|figures| figures.copy_duration_millis.is_none())
    };

    let mut ready = 0;
    update.status.branches = (0..wanted)
        .filter_map(|index| existing.get(&index).map(|sandbox| (index, sandbox)))
        .map(|(index, sandbox)| {
            ready += u32::from(sandbox.is_ready());
            BranchStatus {
                name: sandbox.name_any(),
                index,
                ready: sandbox.is_ready(),
            }
        })
        .collect();
    update.status.branches_ready = Some(format!("{ready}/{wanted}"));

    if !complete {
        for sandbox in existing.values() {
            let failed = sandbox
                .status
                .as_ref()
                .and_then(|s| conditions::find(&s.conditions, conditions::READY))
                .filter(|c| {
                    c.status == conditions::FALSE
                        && crate::sandbox::PERMANENT_REASONS.contains(&c.reason.as_str())
                });
            if let Some(condition) = failed {
                let message = format!(
                    "branch {:?} failed: {}: {}",
                    sandbox.name_any(),
                    condition.reason,
                    condition.message
                );
                return fail(branch, ctx, update, reason::BRANCH_FAILED, message).await;
            }
        }
    }

    if ready == wanted {
        let message = format!("{ready}/{wanted} branches ready on node {node}");
        update.set(true, false, false, reason::BRANCHES_READY, &message);
        let first = update.status.completion_time.is_none();
        if first {
            update.status.completion_time = Some(Time(now));
        }
        update.write(ctx).await?;
        if first {
            if let Some(created) = &branch.metadata.creation_timestamp {
                ctx.metrics
                    .apply_to_ready
                    .get_or_create(&KindLabels {
                        kind: "SandboxBranch",
                    })
                    .observe(now.duration_since(created.0).as_secs_f64().max(0.0));
            }
            ctx.event(branch, EventType::Normal, "Ready", "Restore", message)
                .await;
        }
        // A copy still going on is looked at again soon, for its figures.
        Ok(Action::requeue(if copy_pending {
            poll
        } else {
            ctx.settings.resync
        }))
    } else {
        update.progress(
            reason::RESTORING,
            &format!("{ready}/{wanted} branches ready on node {node}"),
        );
        update.write(ctx).await?;
        Ok(Action::requeue(poll))
    }
}

/// What a complete capture's copy did, for Events.
fn copy_summary(stats: &pb::CaptureStats) -> String {
    let copied_bytes = stats.bytes.saturating_sub(stats.zero_pages * PAGE_BYTES);
    format!(
        "{} MiB copied in {} ms ({} pages by the fault handler)",
        copied_bytes >> 20,
        stats.copy_ns / 1_000_000,
        stats.pages_copied_by_fault_handler,
    )
}

/// A live capture's copy goes on after its branches start. Once the agent
/// reports it complete, its final figures go into the status (and the
/// capture-duration metric). Returns whether the copy is still going on.
/// Failing to ask costs only figures: it is logged and tried again later.
async fn record_finished_copy(
    branch: &SandboxBranch,
    ctx: &Context,
    update: &mut Update<'_>,
    node: &str,
    uid: &str,
) -> bool {
    let pending = update
        .status
        .capture
        .as_ref()
        .is_some_and(|figures| figures.copy_duration_millis.is_none());
    if !pending {
        return false;
    }
    let answer = match ctx.agents.client(node, ctx.clock.now()) {
        Ok(mut client) => client
            .get_capture(with_timeout(
                pb::GetCaptureRequest {
                    uid: uid.to_string(),
                },
                ctx.settings.call_timeout,
            ))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| Error::Agent {
                node: node.to_string(),
                status,
            }),
        Err(err) => Err(err),
    };
    let capture = match answer {
        Ok(capture) => capture,
        // Gone (the agent lost it): its figures will never come.
        Err(Error::Agent { status, .. }) if status.code() == Code::NotFound => {
            tracing::debug!(sandboxbranch = %branch.name_any(), "the capture is gone; its copy figures stay unknown");
            return false;
        }
        Err(err) => {
            tracing::debug!(sandboxbranch = %branch.name_any(), error = %ErrorChain(&err), "could not read the capture's copy figures");
            return true;
        }
    };
    if !capture.memory_complete {
        return true;
    }
    let stats = capture.stats.unwrap_or_default();
    if let Some(figures) = update.status.capture.as_mut() {
        figures.copy_duration_millis = Some(stats.copy_ns / 1_000_000);
        figures.pages_copied_by_fault_handler = stats.pages_copied_by_fault_handler;
    }
    ctx.metrics
        .capture_duration
        .get_or_create(&ModeLabels {
            mode: mode_name(branch.spec.mode),
        })
        .observe(stats.copy_ns as f64 / 1e9);
    ctx.event(
        branch,
        EventType::Normal,
        "CopyComplete",
        "Capture",
        format!("capture's memory complete: {}", copy_summary(&stats)),
    )
    .await;
    false
}

/// Why a pass stopped creating branches.
enum Halt {
    /// For good, with this reason and message.
    Fail(&'static str, String),
    /// Until the next pass.
    Retry,
}

/// Marks the SandboxBranch `Failed` for good and releases what it holds
/// that is of no use any more: the capture, and the branches not ready.
async fn fail(
    branch: &SandboxBranch,
    ctx: &Context,
    mut update: Update<'_>,
    reason: &str,
    message: String,
) -> Result<Action> {
    update.set(false, false, true, reason, &message);
    update.status.error = Some(BranchError {
        time: Time(update.now),
        message: message.clone(),
    });
    update.write(ctx).await?;
    ctx.event(branch, EventType::Warning, reason, "Fail", message)
        .await;

    if let Err(err) = release(branch, ctx, &update.status).await {
        // The finalizer's cleanup tries again when the object is deleted.
        tracing::warn!(sandboxbranch = %branch.name_any(), error = %ErrorChain(&err), "could not release a failed SandboxBranch's resources");
    }
    Ok(Action::await_change())
}

async fn release(
    branch: &SandboxBranch,
    ctx: &Context,
    status: &SandboxBranchStatus,
) -> Result<()> {
    let uid = branch.uid().unwrap_or_default();
    let sandboxes: Api<Sandbox> =
        Api::namespaced(ctx.client.clone(), &branch.namespace().unwrap_or_default());
    let selector = format!("{}={}", labels::BRANCH, branch.name_any());
    for sandbox in sandboxes
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
    {
        if is_ours(&sandbox, &uid)
            && !sandbox.is_ready()
            && sandbox.metadata.deletion_timestamp.is_none()
        {
            delete_sandbox(&sandboxes, &sandbox.name_any()).await?;
        }
    }
    if let Some(node) = &status.source_node {
        delete_capture(ctx, node, &uid).await?;
    }
    Ok(())
}

async fn delete_capture(ctx: &Context, node: &str, uid: &str) -> Result<()> {
    let mut client = ctx.agents.client(node, ctx.clock.now())?;
    match client
        .delete_capture(with_timeout(
            pb::DeleteCaptureRequest {
                uid: uid.to_string(),
            },
            ctx.settings.call_timeout,
        ))
        .await
    {
        Ok(_) => Ok(()),
        Err(status) if status.code() == Code::NotFound => Ok(()),
        Err(status) => Err(Error::Agent {
            node: node.to_string(),
            status,
        }),
    }
}

async fn delete_sandbox(api: &Api<Sandbox>, name: &str) -> Result<()> {
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(err) if is_not_found(&err) => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// With `deletionPolicy: Delete`, deletes the branches and waits for them to
/// be gone (their own finalizers stop the VMs); then frees the capture.
/// Tolerates a SandboxBranch that never captured anything.
async fn cleanup(branch: &SandboxBranch, ctx: &Context) -> Result<Action> {
    let uid = branch.uid().unwrap_or_default();
    if branch.spec.deletion_policy == DeletionPolicy::Delete {
        let sandboxes: Api<Sandbox> =
            Api::namespaced(ctx.client.clone(), &branch.namespace().unwrap_or_default());
        let selector = format!("{}={}", labels::BRANCH, branch.name_any());
        let mut remaining = 0;
        for sandbox in sandboxes
            .list(&ListParams::default().labels(&selector))
            .await?
            .items
        {
            if !is_ours(&sandbox, &uid) {
                continue;
            }
            remaining += 1;
            if sandbox.metadata.deletion_timestamp.is_none() {
                delete_sandbox(&sandboxes, &sandbox.name_any()).await?;
            }
        }
        if remaining > 0 {
            return Err(Error::Waiting(format!(
                "{remaining} branches are being deleted"
            )));
        }
    }
    let Some(node) = branch.status.as_ref().and_then(|s| s.source_node.clone()) else {
        return Ok(Action::await_change());
    };
    match delete_capture(ctx, &node, &uid).await {
        Ok(()) => Ok(Action::await_change()),
        Err(Error::AgentUnavailable { reason, .. }) => {
            give_up_or_retry(branch, ctx, &node, &reason, ctx.clock.now()).await
        }
        Err(err) => Err(err),
    }
}

/// Whether `sandbox` is a branch restored from the capture `uid`.
fn is_ours(sandbox: &Sandbox, uid: &str) -> bool {
    sandbox
        .spec
        .restore_from
        .as_ref()
        .is_some_and(|r| r.uid == uid)
}

fn branch_index(sandbox: &Sandbox) -> Option<u32> {
    sandbox.labels().get(labels::BRANCH_INDEX)?.parse().ok()
}

/// The Sandbox object of branch `index`.
pub fn branch_object(
    branch: &SandboxBranch,
    index: u32,
    template: &SandboxSpec,
    node: &str,
    uid: &str,
) -> Sandbox {
    let name = branch.name_any();
    let meta = branch
        .spec
        .template
        .as_ref()
        .and_then(|t| t.metadata.clone())
        .unwrap_or_default();
    let mut labels = meta.labels;
    labels.insert(labels::BRANCH.into(), name.clone());
    labels.insert(labels::BRANCH_INDEX.into(), index.to_string());
    labels.insert(labels::SOURCE.into(), branch.spec.source_ref.name.clone());
    let owner_references = match branch.spec.deletion_policy {
        DeletionPolicy::Delete => branch.controller_owner_ref(&()).map(|owner| vec![owner]),
        DeletionPolicy::Retain => None,
    };
    Sandbox {
        metadata: ObjectMeta {
            name: Some(branch.branch_name(index)),
            namespace: branch.namespace(),
            labels: Some(labels),
            annotations: (!meta.annotations.is_empty()).then_some(meta.annotations),
            owner_references,
            // Made with the Sandbox controller's finalizer, so that its
            // first reconcile starts the restore instead of adding it.
            finalizers: Some(vec![FINALIZER.to_string()]),
            ..ObjectMeta::default()
        },
        spec: SandboxSpec {
            guest: template.guest.clone(),
            memory_mib: template.memory_mib,
            vcpus: template.vcpus,
            node_selector: None,
            node_name: Some(node.to_string()),
            restore_from: Some(RestoreSource {
                sandbox_branch: name,
                uid: uid.to_string(),
            }),
        },
        status: None,
    }
}
