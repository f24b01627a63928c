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
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use sandfork_api::agent::v1 as pb;
use sandfork_api::agent::v1::agent_client::AgentClient;
use sandfork_api::conditions::{self, Cond};
use sandfork_api::sandbox::{BuiltinWorkload, DirtyPattern, GuestSpec, SandboxOrigin, VmStatus};
use sandfork_api::{Sandbox, SandboxBranch, SandboxStatus};
use tonic::Code;
use tonic::transport::Channel;

use crate::agents::with_timeout;
use crate::context::Context;
use crate::controller::{Reconcile, StatusUpdate, Step, Stop, done, give_up_or_retry};
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

    /// Checks the guest and, for a branch, its origin; binds the Sandbox to a
    /// node; has that node's agent start the VM if it never ran; reports it.
    async fn apply(&self, ctx: &Context) -> Result<Action> {
        Pass::new(self, ctx)?.run().await.or_else(Stop::into_result)
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

/// The Event about a VM this pass started, (reason, note): published after
/// the status write that reports it.
type StartEvent = Option<(&'static str, String)>;

/// One pass of `apply`: what it reads once and the status it builds.
struct Pass<'a> {
    sandbox: &'a Sandbox,
    ctx: &'a Context,
    uid: String,
    update: Update<'a>,
}

impl<'a> Pass<'a> {
    fn new(sandbox: &'a Sandbox, ctx: &'a Context) -> Result<Self> {
        let uid = sandbox
            .uid()
            .ok_or_else(|| Error::Permanent("Sandbox without a UID".into()))?;
        Ok(Self {
            sandbox,
            ctx,
            uid,
            update: Update::new(sandbox, ctx.clock.now()),
        })
    }

    async fn run(&mut self) -> Step<Action> {
        self.check_not_failed()?;
        let workload = self.check_guest().await?;
        self.check_origin().await?;
        let node = self.bind().await?;
        let mut client = self.reach_agent(&node).await?;
        let (vm, start_event) = self.observe_or_start(&mut client, &node, workload).await?;
        self.report(&node, vm, start_event).await
    }

    /// A Sandbox that failed for good stays as it is: its spec is immutable.
    fn check_not_failed(&self) -> Step {
        match conditions::find(&self.update.status.conditions, conditions::READY) {
            Some(ready)
                if ready.status == conditions::FALSE
                    && PERMANENT_REASONS.contains(&ready.reason.as_str()) =>
            {
                done(Action::await_change())
            }
            _ => Ok(()),
        }
    }

    /// Marks the Sandbox failed for good, with a Warning about `action`.
    async fn fail<T>(&mut self, reason: &str, action: &str, message: String) -> Step<T> {
        self.update.ready(false, reason, message.clone());
        self.update.write(self.ctx).await?;
        self.ctx
            .event(self.sandbox, EventType::Warning, reason, action, message)
            .await;
        done(Action::await_change())
    }

    /// The agent's description of the guest; a guest it cannot run fails the Sandbox.
    async fn check_guest(&mut self) -> Step<pb::Workload> {
        let guest = &self.sandbox.spec.guest;
        match workload(guest) {
            Ok(workload) => Ok(workload),
            Err(message) => {
                let reason = if guest.image.is_some() {
                    reason::IMAGE_UNSUPPORTED
                } else {
                    reason::INVALID_SPEC
                };
                self.fail(reason, "Start", message).await
            }
        }
    }

    /// A branch not yet started: checks that its SandboxBranch (and so its
    /// capture) is the one named, and records where the branch came from.
    async fn check_origin(&mut self) -> Step {
        let Some(restore) = &self.sandbox.spec.restore_from else {
            return Ok(());
        };
        if self.update.status.vm.is_some() {
            return Ok(());
        }
        let namespace = self.sandbox.namespace().unwrap_or_default();
        // The SandboxBranch controller's cache has it once it has captured
        // (it creates its branches only then); anything less is looked up.
        let cached = self
            .ctx
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
            None => Api::<SandboxBranch>::namespaced(self.ctx.client.clone(), &namespace)
                .get_opt(&restore.sandbox_branch)
                .await?
                .map(Arc::new),
        };
        match origin {
            Some(branch) if branch.uid().as_deref() == Some(restore.uid.as_str()) => {
                self.update.status.origin = Some(SandboxOrigin {
                    source_sandbox: branch.spec.source_ref.name.clone(),
                    sandbox_branch: restore.sandbox_branch.clone(),
                    capture_time: branch.status.as_ref().and_then(|s| s.capture_time.clone()),
                });
                Ok(())
            }
            _ => {
                let message = format!(
                    "SandboxBranch {:?} with UID {} does not exist, so there is no capture to start from",
                    restore.sandbox_branch, restore.uid
                );
                self.fail(reason::CAPTURE_NOT_FOUND, "Start", message).await
            }
        }
    }

    /// The Sandbox's node: its spec's, the one its status is bound to, or
    /// one chosen now and bound by a status write before anything starts
    /// there, so that no later pass places it elsewhere.
    async fn bind(&mut self) -> Step<String> {
        let (sandbox, ctx) = (self.sandbox, self.ctx);
        let bound = self.update.status.node.clone();
        let node = match bound.or_else(|| sandbox.spec.node_name.clone()) {
            Some(node) => node,
            None => match place(sandbox, &self.uid, ctx, self.update.now).await? {
                Ok(node) => node,
                Err(why) => {
                    self.update.ready(false, reason::UNSCHEDULABLE, why);
                    self.update.write(ctx).await?;
                    return done(Action::requeue(ctx.settings.poll * 5));
                }
            },
        };
        if self.update.status.node.as_deref() != Some(node.as_str()) {
            self.update.status.node = Some(node.clone());
            // One whose spec names its node (a branch) is bound by its spec:
            // the node goes into the status with the next write.
            if sandbox.spec.node_name.is_none() {
                self.update
                    .ready(false, reason::SCHEDULED, format!("bound to node {node}"));
                if let Err(err) = self.update.write(ctx).await {
                    ctx.reservations.release(&self.uid);
                    return Err(err.into());
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
        Ok(node)
    }

    /// A client for the agent of `node`; waits while there is none ready.
    async fn reach_agent(&mut self, node: &str) -> Step<AgentClient<Channel>> {
        match self.ctx.agents.client(node, self.update.now) {
            Ok(client) => Ok(client),
            Err(err @ Error::AgentUnavailable { .. }) => {
                self.update
                    .ready(false, reason::AGENT_UNAVAILABLE, err.to_string());
                self.update.write(self.ctx).await?;
                done(Action::requeue(self.ctx.settings.poll * 5))
            }
            Err(err) => Err(err.into()),
        }
    }

    /// The VM as the agent knows it. One that never ran is started now (a
    /// branch: restored); one that ran and is gone is lost, not recreated.
    async fn observe_or_start(
        &mut self,
        client: &mut AgentClient<Channel>,
        node: &str,
        workload: pb::Workload,
    ) -> Step<(pb::Sandbox, StartEvent)> {
        let observed = match client
            .get_sandbox(with_timeout(
                pb::GetSandboxRequest {
                    uid: self.uid.clone(),
                },
                self.ctx.settings.call_timeout,
            ))
            .await
        {
            Ok(vm) => Some(vm.into_inner()),
            Err(status) if status.code() == Code::NotFound => None,
            Err(status) => return Err(Error::agent(node, status).into()),
        };
        match observed {
            Some(vm) => Ok((vm, None)),
            None if self.update.status.vm.is_some() => {
                let message = format!(
                    "the VM is gone from node {node}: its agent no longer knows it (node rebooted or agent state lost)"
                );
                self.update.status.vm = None;
                self.fail(reason::LOST, "Observe", message).await
            }
            None => self.start(client, node, workload).await,
        }
    }

    /// Has the agent create the VM, or restore it from its capture.
    async fn start(
        &mut self,
        client: &mut AgentClient<Channel>,
        node: &str,
        workload: pb::Workload,
    ) -> Step<(pb::Sandbox, StartEvent)> {
        let (sandbox, ctx) = (self.sandbox, self.ctx);
        let started = Instant::now();
        let result = match &sandbox.spec.restore_from {
            Some(restore) => client
                .restore_branch(with_timeout(
                    pb::RestoreBranchRequest {
                        uid: self.uid.clone(),
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
                            uid: self.uid.clone(),
                            memory_mib: sandbox.spec.memory_mib,
                            vcpus: sandbox.spec.vcpus,
                            workload: Some(workload),
                        },
                        ctx.settings.start_timeout,
                    ))
                    .await
            }
        };
        let vm = match result {
            Ok(vm) => vm.into_inner(),
            Err(status) => return self.start_failed(node, status).await,
        };
        let event = match &sandbox.spec.restore_from {
            Some(restore) => (
                "Restored",
                format!(
                    "restored on node {node} from SandboxBranch {} in {:.1} ms",
                    restore.sandbox_branch,
                    started.elapsed().as_secs_f64() * 1e3
                ),
            ),
            None => ("Started", format!("started on node {node}")),
        };
        Ok((vm, Some(event)))
    }

    /// Records why the agent refused to start the VM: for good, or to be retried.
    async fn start_failed<T>(&mut self, node: &str, status: tonic::Status) -> Step<T> {
        let (reason, permanent) = match status.code() {
            Code::InvalidArgument | Code::AlreadyExists => (reason::INVALID_SPEC, true),
            Code::NotFound if self.sandbox.spec.restore_from.is_some() => {
                (reason::CAPTURE_NOT_FOUND, true)
            }
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
        if permanent {
            return self.fail(reason, "Start", message).await;
        }
        self.update.ready(false, reason, message.clone());
        self.update.write(self.ctx).await?;
        self.ctx
            .event(self.sandbox, EventType::Warning, reason, "Start", message)
            .await;
        Err(Error::agent(node, status).into())
    }

    /// Reports the VM's state in `Ready`, then the Event about its start;
    /// says when to look again.
    async fn report(
        &mut self,
        node: &str,
        vm: pb::Sandbox,
        start_event: StartEvent,
    ) -> Step<Action> {
        let (sandbox, ctx) = (self.sandbox, self.ctx);
        let state = pb::SandboxState::try_from(vm.state).unwrap_or(pb::SandboxState::Unspecified);
        if state == pb::SandboxState::Unknown {
            // The agent cannot look right now (a capture is running): keep
            // what the status says and look again soon.
            self.update.write(ctx).await?;
            publish_start(sandbox, ctx, start_event).await;
            return Ok(Action::requeue(ctx.settings.poll));
        }
        let state_name = match state {
            pb::SandboxState::Running => "Running",
            pb::SandboxState::Stopped => "Stopped",
            pb::SandboxState::Failed => "Failed",
            pb::SandboxState::Unspecified | pb::SandboxState::Unknown => "Unknown",
        };
        self.update.status.vm = Some(VmStatus {
            pid: vm.pid,
            state: state_name.into(),
        });
        let was_ready = conditions::is_true(&self.update.status.conditions, conditions::READY);
        let action = match state {
            pb::SandboxState::Running => {
                self.update
                    .ready(true, reason::RUNNING, format!("running on node {node}"));
                Action::requeue(ctx.settings.resync)
            }
            pb::SandboxState::Failed => {
                let message = format!("the VM failed on node {node}: {}", vm.failure_reason);
                self.update.ready(false, reason::VM_FAILED, message.clone());
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
            pb::SandboxState::Stopped
            | pb::SandboxState::Unspecified
            | pb::SandboxState::Unknown => {
                self.update.ready(
                    false,
                    reason::VM_STOPPED,
                    format!("the VM on node {node} is {state_name}"),
                );
                Action::requeue(ctx.settings.resync)
            }
        };
        self.update.write(ctx).await?;
        publish_start(sandbox, ctx, start_event).await;
        let first_ready = !was_ready
            && conditions::is_true(&self.update.status.conditions, conditions::READY)
            && sandbox
                .status
                .as_ref()
                .and_then(|s| s.vm.as_ref())
                .is_none();
        if first_ready && let Some(created) = &sandbox.metadata.creation_timestamp {
            let seconds = self.update.now.duration_since(created.0).as_secs_f64();
            ctx.metrics
                .apply_to_ready
                .get_or_create(&crate::metrics::KindLabels { kind: "Sandbox" })
                .observe(seconds.max(0.0));
        }
        Ok(action)
    }
}

/// Publishes the Event about a VM this pass started.
async fn publish_start(sandbox: &Sandbox, ctx: &Context, started: StartEvent) {
    if let Some((reason, note)) = started {
        ctx.event(sandbox, EventType::Normal, reason, "Start", note)
            .await;
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
                    return Err(Error::agent(node, status));
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
