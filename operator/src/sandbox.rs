//! The Sandbox controller: binds each Sandbox to a node, has that node's
//! agent start (or, for a branch, restore) its VM, and reports the VM's state.
//!
//! Restart safety: a Sandbox is bound to its node before the agent is asked
//! to start anything (by its spec's `nodeName`, else by writing the node into
//! its status), and every agent call is keyed by the Sandbox's UID, so a
//! reconcile interrupted at any point repeats harmlessly.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::ResourceExt;
use sandfork_api::agent::v1 as pb;
use sandfork_api::conditions::{self, Cond};
use sandfork_api::sandbox::{BuiltinWorkload, DirtyPattern, GuestSpec, SandboxOrigin, VmStatus};
use sandfork_api::{Sandbox, SandboxBranch, SandboxStatus};
use tonic::Code;

use crate::agents::with_timeout;
use crate::context::Context;
use crate::controller::{Reconcile, StatusUpdate, give_up_or_retry};
use crate::error::{Error, Result, agent_code_is_transient};
use crate::placement;

pub const CONTROLLER: &str = "sandbox";

/// `Ready` reasons after which the Sandbox stays as it is until it is deleted.
pub const PERMANENT_REASONS: &[&str] = &[
    reason::IMAGE_UNSUPPORTED,
    reason::INVALID_SPEC,
    reason::CAPTURE_NOT_FOUND,
    reason::VM_FAILED,
    reason::LOST,
];

/// Reasons of the `Ready` condition.
pub mod reason {
    pub const RUNNING: &str = "Running";
    pub const UNSCHEDULABLE: &str = "Unschedulable";
    pub const SCHEDULED: &str = "Scheduled";
    pub const AGENT_UNAVAILABLE: &str = "AgentUnavailable";
    pub const INSUFFICIENT_MEMORY: &str = "InsufficientMemory";
    pub const START_FAILED: &str = "StartFailed";
    pub const IMAGE_UNSUPPORTED: &str = "ImageUnsupported";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const CAPTURE_NOT_FOUND: &str = "CaptureNotFound";
    pub const VM_FAILED: &str = "VmFailed";
    pub const VM_STOPPED: &str = "VmStopped";
    pub const LOST: &str = "Lost";
}

impl Reconcile for Sandbox {
    const CONTROLLER: &'static str = CONTROLLER;
    type Status = SandboxStatus;

    fn status(&self) -> Option<&SandboxStatus> {
        self.status.as_ref()
    }

    async fn apply(&self, ctx: &Context) -> Result<Action> {
        apply(self, ctx).await
    }

    async fn cleanup(&self, ctx: &Context) -> Result<Action> {
        cleanup(self, ctx).await
    }
}

/// The agent's description of a guest, or why there is none.
pub fn workload(guest: &GuestSpec) -> Result<pb::Workload, String> {
    use pb::workload::Kind;
    let kind = match (guest.builtin, &guest.image) {
        (Some(BuiltinWorkload::Counter), _) => Kind::Counter(pb::Counter {}),
        (Some(BuiltinWorkload::Idle), _) => Kind::Idle(pb::Idle {}),
        (Some(BuiltinWorkload::Dirty), _) => {
            let dirty = guest.dirty.clone().unwrap_or_default();
            Kind::Dirty(pb::Dirty {
                pattern: match dirty.pattern {
                    DirtyPattern::Sequential => pb::DirtyPattern::Sequential,
                    DirtyPattern::Random => pb::DirtyPattern::Random,
                } as i32,
                pages_per_second: dirty.pages_per_second,
            })
        }
        (None, Some(image)) => {
            return Err(format!(
                "guest image {image:?}: this version of Sandfork runs only built-in guests (guest.builtin)"
            ));
        }
        (None, None) => {
            return Err("the guest names neither a built-in workload nor an image".into());
        }
    };
    Ok(pb::Workload { kind: Some(kind) })
}

type Update<'a> = StatusUpdate<'a, Sandbox>;

impl StatusUpdate<'_, Sandbox> {
    /// Sets the `Ready` condition.
    fn ready(&mut self, ready: bool, reason: &str, message: impl Into<String>) {
        self.set_conditions(&[Cond::new(conditions::READY, ready, reason, message)]);
    }
}

async fn apply(sandbox: &Sandbox, ctx: &Context) -> Result<Action> {
    let now = ctx.clock.now();
    let uid = sandbox
        .uid()
        .ok_or_else(|| Error::Permanent("Sandbox without a UID".into()))?;
    let mut update = Update::new(sandbox, now);

    if let Some(ready) = conditions::find(&update.status.conditions, conditions::READY)
        && ready.status == conditions::FALSE
        && PERMANENT_REASONS.contains(&ready.reason.as_str())
    {
        // Nothing will change that; the spec is immutable.
        return Ok(Action::await_change());
    }

    let workload = match workload(&sandbox.spec.guest) {
        Ok(workload) => workload,
        Err(message) => {
            let reason = if sandbox.spec.guest.image.is_some() {
                reason::IMAGE_UNSUPPORTED
            } else {
                reason::INVALID_SPEC
            };
            update.ready(false, reason, message.clone());
            update.write(ctx).await?;
            ctx.event(sandbox, EventType::Warning, reason, "Start", message)
                .await;
            return Ok(Action::await_change());
        }
    };

    // A branch: check that its SandboxBranch (and so its capture) is the one named.
    if let Some(restore) = &sandbox.spec.restore_from
        && update.status.vm.is_none()
    {
        let namespace = sandbox.namespace().unwrap_or_default();
        // The SandboxBranch controller's cache has it once it has captured
        // (it creates its branches only then); anything less is looked up.
        let cached = ctx
            .caches
            .branches
            .get(&ObjectRef::new(&restore.sandbox_branch).within(&namespace))
            .filter(|branch| {
                branch.uid().as_deref() == Some(restore.uid.as_str())
                    && branch
                        .status
                        .as_ref()
                        .is_some_and(|s| s.capture_time.is_some())
            });
        let origin = match cached {
            Some(branch) => Some(branch),
            None => Api::<SandboxBranch>::namespaced(ctx.client.clone(), &namespace)
                .get_opt(&restore.sandbox_branch)
                .await?
                .map(Arc::new),
        };
        match origin {
            Some(branch) if branch.uid().as_deref() == Some(restore.uid.as_str()) => {
                update.status.origin = Some(SandboxOrigin {
                    source_sandbox: branch.spec.source_ref.name.clone(),
                    sandbox_branch: restore.sandbox_branch.clone(),
                    capture_time: branch.status.as_ref().and_then(|s| s.capture_time.clone()),
                });
            }
            _ => {
                let message = format!(
                    "SandboxBranch {:?} with UID {} does not exist, so there is no capture to start from",
                    restore.sandbox_branch, restore.uid
                );
                update.ready(false, reason::CAPTURE_NOT_FOUND, message.clone());
                update.write(ctx).await?;
                ctx.event(
                    sandbox,
                    EventType::Warning,
                    reason::CAPTURE_NOT_FOUND,
                    "Start",
                    message,
                )
                .await;
                return Ok(Action::await_change());
            }
        }
    }

    // Bind to a node before starting anything there.
    let node = match update
        .status
        .node
        .clone()
        .or_else(|| sandbox.spec.node_name.clone())
    {
        Some(node) => node,
        None => match place(sandbox, &uid, ctx, now).await? {
            Ok(node) => node,
            Err(why) => {
                update.ready(false, reason::UNSCHEDULABLE, why);
                update.write(ctx).await?;
                return Ok(Action::requeue(ctx.settings.poll * 5));
            }
        },
    };
    if update.status.node.as_deref() != Some(node.as_str()) {
        update.status.node = Some(node.clone());
        // A Sandbox placed here is bound by this write before anything
        // starts on the node, so that no later pass places it elsewhere. One
        // whose spec names its node (a branch) is bound by its spec: the
        // node goes into the status with the next write.
        if sandbox.spec.node_name.is_none() {
            update.ready(false, reason::SCHEDULED, format!("bound to node {node}"));
            if let Err(err) = update.write(ctx).await {
                ctx.reservations.release(&uid);
                return Err(err);
            }
            ctx.event(
                sandbox,
                EventType::Normal,
                reason::SCHEDULED,
                "Bind",
                format!("bound to node {node}"),
            )
            .await;
        }
    }

    let mut client = match ctx.agents.client(&node, now) {
        Ok(client) => client,
        Err(Error::AgentUnavailable { reason, .. }) => {
            update.ready(
                false,
                reason::AGENT_UNAVAILABLE,
                format!("the agent on node {node} is not available: {reason}"),
            );
            update.write(ctx).await?;
            return Ok(Action::requeue(ctx.settings.poll * 5));
        }
        Err(err) => return Err(err),
    };
    let agent_err = |status: tonic::Status| Error::Agent {
        node: node.clone(),
        status,
    };

    let observed = match client
        .get_sandbox(with_timeout(
            pb::GetSandboxRequest { uid: uid.clone() },
            ctx.settings.call_timeout,
        ))
        .await
    {
        Ok(vm) => Some(vm.into_inner()),
        Err(status) if status.code() == Code::NotFound => None,
        Err(status) => return Err(agent_err(status)),
    };

    // The Event about a start follows the status write that reports it.
    let mut start_event = None;
    let vm = match observed {
        Some(vm) => vm,
        None if update.status.vm.is_some() => {
            let message = format!(
                "the VM is gone from node {node}: its agent no longer knows it (node rebooted or agent state lost)"
            );
            update.ready(false, reason::LOST, message.clone());
            update.status.vm = None;
            update.write(ctx).await?;
            ctx.event(
                sandbox,
                EventType::Warning,
                reason::LOST,
                "Observe",
                message,
            )
            .await;
            return Ok(Action::await_change());
        }
        None => {
            let started = Instant::now();
            let result = match &sandbox.spec.restore_from {
                Some(restore) => client
                    .restore_branch(with_timeout(
                        pb::RestoreBranchRequest {
                            uid: uid.clone(),
                            capture_uid: restore.uid.clone(),
                        },
                        ctx.settings.start_timeout,
                    ))
                    .await
                    .inspect(|_| {
                        ctx.metrics
                            .restore_duration
                            .observe(started.elapsed().as_secs_f64())
                    }),
                None => {
                    client
                        .create_sandbox(with_timeout(
                            pb::CreateSandboxRequest {
                                uid: uid.clone(),
                                memory_mib: sandbox.spec.memory_mib,
                                vcpus: sandbox.spec.vcpus,
                                workload: Some(workload),
                            },
                            ctx.settings.start_timeout,
                        ))
                        .await
                }
            };
            match result {
                Ok(vm) => {
                    start_event = Some(match &sandbox.spec.restore_from {
                        Some(restore) => (
                            "Restored",
                            format!(
                                "restored on node {node} from SandboxBranch {} in {:.1} ms",
                                restore.sandbox_branch,
                                started.elapsed().as_secs_f64() * 1e3
                            ),
                        ),
                        None => ("Started", format!("started on node {node}")),
                    });
                    vm.into_inner()
                }
                Err(status) => return start_failed(sandbox, ctx, update, &node, status).await,
            }
        }
    };

    let state = pb::SandboxState::try_from(vm.state).unwrap_or(pb::SandboxState::Unspecified);
    if state == pb::SandboxState::Unknown {
        // The agent cannot look right now (a capture is running): keep what
        // the status says and look again soon.
        update.write(ctx).await?;
        publish_start(sandbox, ctx, start_event).await;
        return Ok(Action::requeue(ctx.settings.poll));
    }
    let state_name = match state {
        pb::SandboxState::Running => "Running",
        pb::SandboxState::Stopped => "Stopped",
        pb::SandboxState::Failed => "Failed",
        pb::SandboxState::Unspecified | pb::SandboxState::Unknown => "Unknown",
    };
    update.status.vm = Some(VmStatus {
        pid: vm.pid,
        state: state_name.into(),
    });
    let was_ready = conditions::is_true(&update.status.conditions, conditions::READY);
    let action = match state {
        pb::SandboxState::Running => {
            update.ready(true, reason::RUNNING, format!("running on node {node}"));
            Action::requeue(ctx.settings.resync)
        }
        pb::SandboxState::Failed => {
            let message = format!("the VM failed on node {node}: {}", vm.failure_reason);
            update.ready(false, reason::VM_FAILED, message.clone());
            ctx.event(
                sandbox,
                EventType::Warning,
                reason::VM_FAILED,
                "Observe",
                message,
            )
            .await;
            Action::await_change()
        }
        pb::SandboxState::Stopped | pb::SandboxState::Unspecified | pb::SandboxState::Unknown => {
            update.ready(
                false,
                reason::VM_STOPPED,
                format!("the VM on node {node} is {state_name}"),
            );
            Action::requeue(ctx.settings.resync)
        }
    };
    update.write(ctx).await?;
    publish_start(sandbox, ctx, start_event).await;
    if !was_ready && conditions::is_true(&update.status.conditions, conditions::READY) {
        let ever_ready_before = sandbox
            .status
            .as_ref()
            .and_then(|s| s.vm.as_ref())
            .is_some();
        if !ever_ready_before && let Some(created) = &sandbox.metadata.creation_timestamp {
            let seconds = now.duration_since(created.0).as_secs_f64();
            ctx.metrics
                .apply_to_ready
                .get_or_create(&crate::metrics::KindLabels { kind: "Sandbox" })
                .observe(seconds.max(0.0));
        }
    }
    Ok(action)
}

/// Publishes the Event about a VM this pass started: (reason, note).
async fn publish_start(sandbox: &Sandbox, ctx: &Context, started: Option<(&str, String)>) {
    if let Some((reason, note)) = started {
        ctx.event(sandbox, EventType::Normal, reason, "Start", note)
            .await;
    }
}

/// Records why the agent refused to start the VM; returns what to do next.
async fn start_failed(
    sandbox: &Sandbox,
    ctx: &Context,
    mut update: Update<'_>,
    node: &str,
    status: tonic::Status,
) -> Result<Action> {
    let (reason, permanent) = match status.code() {
        Code::InvalidArgument | Code::AlreadyExists => (reason::INVALID_SPEC, true),
        Code::NotFound if sandbox.spec.restore_from.is_some() => (reason::CAPTURE_NOT_FOUND, true),
        Code::ResourceExhausted => (reason::INSUFFICIENT_MEMORY, false),
        Code::FailedPrecondition | Code::Unavailable => (reason::AGENT_UNAVAILABLE, false),
        _ => (
            reason::START_FAILED,
            !agent_code_is_transient(status.code()),
        ),
    };
    let message = format!(
        "the agent on node {node} could not start the VM: {}",
        status.message()
    );
    update.ready(false, reason, message.clone());
    update.write(ctx).await?;
    ctx.event(sandbox, EventType::Warning, reason, "Start", message)
        .await;
    if permanent {
        Ok(Action::await_change())
    } else {
        Err(Error::Agent {
            node: node.to_string(),
            status,
        })
    }
}

/// Chooses a node; the outer error is a failed API call, the inner one why
/// no node fits.
async fn place(
    sandbox: &Sandbox,
    uid: &str,
    ctx: &Context,
    now: Timestamp,
) -> Result<Result<String, String>> {
    let _placing = ctx.reservations.lock.lock().await;
    let agents = ctx.agents.all();
    let state = ctx.caches.sandboxes.state();
    let mut load = placement::load_by_node(state.iter().map(|s| s.as_ref()), uid);
    ctx.reservations
        .add_to(&mut load, state.iter().map(|s| s.as_ref()), uid);
    let selector = sandbox.spec.node_selector.clone().unwrap_or_default();
    let mut allowed: BTreeMap<String, bool> = BTreeMap::new();
    if !selector.is_empty() {
        let nodes: Api<Node> = Api::all(ctx.client.clone());
        for agent in &agents {
            let labels = nodes
                .get_opt(&agent.node)
                .await?
                .and_then(|node| node.metadata.labels)
                .unwrap_or_default();
            let matches = selector.iter().all(|(k, v)| labels.get(k) == Some(v));
            allowed.insert(agent.node.clone(), matches);
        }
    }
    let chosen = placement::choose(
        &agents,
        &load,
        sandbox.spec.memory_mib,
        |node| selector.is_empty() || allowed.get(node).copied().unwrap_or(false),
        now,
    );
    if let Ok(node) = &chosen {
        ctx.reservations.reserve(uid, node, sandbox.spec.memory_mib);
    }
    Ok(chosen)
}

/// Stops the VM. Tolerates a Sandbox that was never bound or started.
async fn cleanup(sandbox: &Sandbox, ctx: &Context) -> Result<Action> {
    let Some(node) = sandbox.node().or(sandbox.spec.node_name.as_deref()) else {
        return Ok(Action::await_change());
    };
    let uid = sandbox.uid().unwrap_or_default();
    let now = ctx.clock.now();
    match ctx.agents.client(node, now) {
        Ok(mut client) => {
            match client
                .delete_sandbox(with_timeout(
                    pb::DeleteSandboxRequest { uid },
                    ctx.settings.call_timeout,
                ))
                .await
            {
                Ok(_) => {}
                Err(status) if status.code() == Code::NotFound => {}
                Err(status) => {
                    return Err(Error::Agent {
                        node: node.to_string(),
                        status,
                    });
                }
            }
            Ok(Action::await_change())
        }
        Err(Error::AgentUnavailable { reason, .. }) => {
            give_up_or_retry(sandbox, ctx, node, &reason, now).await
        }
        Err(err) => Err(err),
    }
}
