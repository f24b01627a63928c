//! The Sandbox controller: runs each Sandbox in a Pod of its own (see
//! [`crate::pod`]), which the scheduler binds to a node and the kubelet
//! starts; then has the agent of that node start (or, for a branch,
//! restore) the VM inside the Pod, and reports the VM's state.
//!
//! Restart safety: the Pod is labelled with the Sandbox's UID, whether made
//! for it (under a fixed name, so creating it again finds the one made
//! before) or claimed from a warm pool (see [`crate::warmpool`]), so a pass
//! finds it before the status records it; the name, UID and node of a Pod
//! made for it are written into the status before the agent is asked to
//! start anything (a claimed one's go in with the VM's state: the claim
//! itself marks the Pod as the Sandbox's); and every agent call is keyed by
//! the Sandbox's UID. A reconcile interrupted at any point repeats
//! harmlessly, and a Pod that is gone once recorded is never replaced (the
//! VM's state died with it).

use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use sandfork_api::agent::v1 as pb;
use sandfork_api::agent::v1::agent_client::AgentClient;
use sandfork_api::conditions::{self, Cond};
use sandfork_api::sandbox::{BuiltinWorkload, DirtyPattern, GuestSpec, SandboxOrigin, VmStatus};
use sandfork_api::warmpool::PodSource;
use sandfork_api::{Sandbox, SandboxBranch, SandboxStatus, labels};
use tonic::Code;
use tonic::transport::Channel;

use crate::agents::with_timeout;
use crate::context::Context;
use crate::controller::{Reconcile, StatusUpdate, Step, Stop, done, give_up_or_retry};
use crate::error::{Error, Result, agent_code_is_transient, is_already_exists, is_not_found};
use crate::pod::sandbox_pod;

pub const CONTROLLER: &str = "sandbox";

/// `Ready` reasons after which the Sandbox stays as it is until it is deleted.
pub const PERMANENT_REASONS: &[&str] = &[
    reason::INVALID_SPEC,
    reason::CAPTURE_NOT_FOUND,
    reason::VM_FAILED,
    reason::LOST,
    reason::POD_DELETED,
    reason::POD_FAILED,
];

/// Reasons of the `Ready` condition.
pub mod reason {
    pub const RUNNING: &str = "Running";
    pub const POD_CREATED: &str = "PodCreated";
    pub const SCHEDULING: &str = "Scheduling";
    pub const UNSCHEDULABLE: &str = "Unschedulable";
    pub const SCHEDULED: &str = "Scheduled";
    pub const POD_STARTING: &str = "PodStarting";
    pub const POD_DELETED: &str = "PodDeleted";
    pub const POD_FAILED: &str = "PodFailed";
    pub const AGENT_UNAVAILABLE: &str = "AgentUnavailable";
    pub const INSUFFICIENT_MEMORY: &str = "InsufficientMemory";
    pub const START_FAILED: &str = "StartFailed";
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

    /// Checks the guest and, for a branch, its origin; makes the Sandbox's
    /// Pod and waits for it to be bound and running; has the agent of its
    /// node start the VM in it if it never ran; reports it.
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
        // The Pod mounts the image; its VMM reads the guest from there.
        (None, Some(_)) => Kind::FlatImage(pb::FlatImage {
            path: format!(
                "{}/{}",
                sandfork_api::pod::GUEST_DIR,
                sandfork_api::pod::GUEST_FILE
            ),
        }),
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
    /// The warm Pod this pass claimed, as the start's Event names it.
    claimed: Option<String>,
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
            claimed: None,
        })
    }

    async fn run(&mut self) -> Step<Action> {
        self.check_not_failed()?;
        let workload = self.check_guest().await?;
        self.check_origin().await?;
        let pod = self.ensure_pod().await?;
        let node = self.scheduled(&pod).await?;
        self.pod_running(&pod).await?;
        let pod_uid = pod.uid().unwrap_or_default();
        let mut client = self.reach_agent(&node).await?;
        let (vm, start_event) = self
            .observe_or_start(&mut client, &node, &pod_uid, workload)
            .await?;
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
            Err(message) => self.fail(reason::INVALID_SPEC, "Start", message).await,
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

    /// The Sandbox's Pod: if the Sandbox never had one, a warm Pod claimed
    /// for it or else one made for it; then the one recorded. One that is
    /// gone, being deleted, replaced or ended fails the Sandbox for good:
    /// its VM cannot be brought back.
    async fn ensure_pod(&mut self) -> Step<Pod> {
        let recorded = self.update.status.pod_uid.clone();
        let found = match self.update.status.pod.clone() {
            Some(name) => self.find_pod(&name, recorded.as_deref()).await?,
            None => self.find_own_pod().await?,
        };
        let name = (self.update.status.pod.clone())
            .unwrap_or_else(|| sandfork_api::pod::name(&self.sandbox.name_any()));
        let pod = match found {
            Some(pod) => pod,
            None if recorded.is_some() => {
                let message = format!("the Sandbox's Pod {name} was deleted, and its VM with it");
                return self.fail(reason::POD_DELETED, "Observe", message).await;
            }
            None if self.update.status.vm.is_some() => {
                let message = format!(
                    "the VM ran without a Pod (started by an earlier operator) and Pod {name} does not exist; recreate the Sandbox"
                );
                return self.fail(reason::POD_DELETED, "Observe", message).await;
            }
            None => match crate::warmpool::claim(self.ctx, self.sandbox, &self.uid).await? {
                Some(pod) => {
                    self.claimed = Some(crate::warmpool::claimed_pod_note(&pod));
                    pod
                }
                None => self.create_pod().await?,
            },
        };
        let name = pod.name_any();
        if !is_owned_by(&pod, &self.uid) {
            let message = format!(
                "a Pod named {name} already exists and does not belong to this Sandbox; delete it or rename the Sandbox"
            );
            return self.fail(reason::INVALID_SPEC, "CreatePod", message).await;
        }
        let pod_uid = pod.uid().unwrap_or_default();
        if recorded.as_ref().is_some_and(|r| *r != pod_uid) {
            let message = format!(
                "the Sandbox's Pod {name} was deleted and replaced by another, and its VM is gone"
            );
            return self.fail(reason::POD_DELETED, "Observe", message).await;
        }
        if pod.metadata.deletion_timestamp.is_some() {
            let message = format!("the Sandbox's Pod {name} is being deleted, and its VM with it");
            return self.fail(reason::POD_DELETED, "Observe", message).await;
        }
        if let Some(why) = pod_ended(&pod) {
            let message = format!("the Sandbox's Pod {name} {why}");
            return self.fail(reason::POD_FAILED, "Observe", message).await;
        }
        self.update.status.pod = Some(name);
        self.update.status.pod_uid = Some(pod_uid);
        self.update.status.pod_source = Some(if pod.labels().contains_key(labels::WARM_POOL) {
            PodSource::Warm
        } else {
            PodSource::Cold
        });
        Ok(pod)
    }

    /// The Pod `name` from the cache when it shows the one expected running,
    /// else from the API server: the cache is a watch of its own, which can
    /// lag behind the event that started this reconcile (a Pod that just
    /// started running).
    async fn find_pod(&self, name: &str, recorded: Option<&str>) -> Result<Option<Pod>> {
        let namespace = self.sandbox.namespace().unwrap_or_default();
        let cached = self
            .ctx
            .caches
            .pods
            .get(&ObjectRef::new(name).within(&namespace))
            .filter(|pod| {
                // A claimed warm Pod may still show its pool as owner here.
                is_owned_by(pod, &self.uid)
                    && recorded.is_none_or(|uid| pod.uid().as_deref() == Some(uid))
            })
            .filter(|pod| vmm_running(pod));
        if let Some(pod) = cached {
            return Ok(Some(pod.as_ref().clone()));
        }
        let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &namespace);
        Ok(pods.get_opt(name).await?)
    }

    /// A warm Pod an earlier pass claimed for this Sandbox before its status
    /// recorded it: the cache shows it labelled with the Sandbox's UID (the
    /// operator waits for a full cache at start-up, so also after a
    /// restart), or this operator remembers the claim its cache does not
    /// show yet. (A Pod made for it has a fixed name: creating it again
    /// finds it.) No list: a consistent one waits for the API server's
    /// watch cache, up to 100 ms.
    async fn find_own_pod(&self) -> Result<Option<Pod>> {
        let namespace = self.sandbox.namespace().unwrap_or_default();
        let cached = self.ctx.caches.pods.state().into_iter().find(|pod| {
            pod.namespace().as_deref() == Some(namespace.as_str())
                && pod.labels().get(labels::SANDBOX_UID) == Some(&self.uid)
                && is_owned_by(pod, &self.uid)
        });
        if let Some(pod) = cached {
            return Ok(Some(pod.as_ref().clone()));
        }
        let Some(name) = self.ctx.claimed_for(&self.uid) else {
            return Ok(None);
        };
        let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &namespace);
        Ok(pods
            .get_opt(&name)
            .await?
            .filter(|pod| is_owned_by(pod, &self.uid)))
    }

    /// Creates the Pod; one made by an earlier, interrupted pass is read back.
    async fn create_pod(&mut self) -> Step<Pod> {
        let (sandbox, ctx) = (self.sandbox, self.ctx);
        let pod = match sandbox_pod(sandbox, &ctx.settings.vmm_image) {
            Ok(pod) => pod,
            Err(message) => return self.fail(reason::INVALID_SPEC, "CreatePod", message).await,
        };
        let name = pod.name_any();
        let pods: Api<Pod> =
            Api::namespaced(ctx.client.clone(), &sandbox.namespace().unwrap_or_default());
        match pods.create(&PostParams::default(), &pod).await {
            Ok(created) => {
                ctx.event(
                    sandbox,
                    EventType::Normal,
                    reason::POD_CREATED,
                    "CreatePod",
                    format!("created Pod {name}"),
                )
                .await;
                Ok(created)
            }
            Err(err) if is_already_exists(&err) => Ok(pods.get(&name).await?),
            Err(err) => Err(Error::from(err).into()),
        }
    }

    /// The node the scheduler bound the Pod to, recorded in the status
    /// before anything starts there; waits until there is one.
    async fn scheduled(&mut self, pod: &Pod) -> Step<String> {
        let (sandbox, ctx) = (self.sandbox, self.ctx);
        let name = pod.name_any();
        let node = pod
            .spec
            .as_ref()
            .and_then(|spec| spec.node_name.clone())
            .filter(|node| !node.is_empty());
        let Some(node) = node else {
            let unschedulable = pod_condition(pod, "PodScheduled")
                .filter(|c| c.status == "False" && c.reason.as_deref() == Some("Unschedulable"));
            match unschedulable {
                Some(condition) => {
                    let message = condition
                        .message
                        .clone()
                        .unwrap_or_else(|| format!("no node fits Pod {name}"));
                    self.update.ready(false, reason::UNSCHEDULABLE, message);
                }
                None => self.update.ready(
                    false,
                    reason::SCHEDULING,
                    format!("Pod {name} waits for the scheduler"),
                ),
            }
            self.update.write(ctx).await?;
            // A change to the Pod triggers a reconcile; this is a backstop.
            return done(Action::requeue(ctx.settings.poll * 5));
        };
        if self.update.status.node.as_deref() != Some(node.as_str()) {
            self.update.status.node = Some(node.clone());
            if self.claimed.is_some() {
                // Claimed in this pass, bound long before: the claim
                // labelled it with this Sandbox's UID, so a later pass finds
                // it again; its node goes into the status with the VM's state.
                return Ok(node);
            }
            let message = format!("Pod {name} bound to node {node}");
            self.update.ready(false, reason::SCHEDULED, message.clone());
            self.update.write(ctx).await?;
            if self.update.status.pod_source != Some(PodSource::Warm) {
                ctx.event(
                    sandbox,
                    EventType::Normal,
                    reason::SCHEDULED,
                    "Bind",
                    message,
                )
                .await;
            }
        }
        Ok(node)
    }

    /// Waits until the Pod runs, and so its VMM.
    async fn pod_running(&mut self, pod: &Pod) -> Step {
        if vmm_running(pod) {
            return Ok(());
        }
        let status = pod.status.clone().unwrap_or_default();
        let vmm = status
            .container_statuses
            .iter()
            .flatten()
            .find(|c| c.name == sandfork_api::pod::VMM_CONTAINER);
        let state = vmm.and_then(|c| c.state.as_ref());
        let name = pod.name_any();
        let waiting = state.and_then(|s| s.waiting.as_ref());
        let message = match waiting.and_then(|w| w.reason.as_deref()) {
            Some(why) => match waiting.and_then(|w| w.message.as_deref()) {
                Some(detail) => format!("Pod {name}: {why}: {detail}"),
                None => format!("Pod {name}: {why}"),
            },
            None => format!(
                "Pod {name} is {}",
                status.phase.as_deref().unwrap_or("Pending")
            ),
        };
        self.update.ready(false, reason::POD_STARTING, message);
        self.update.write(self.ctx).await?;
        done(Action::requeue(self.ctx.settings.poll * 5))
    }

    /// A client for the agent of `node`; waits while there is none ready.
    async fn reach_agent(&mut self, node: &str) -> Step<AgentClient<Channel>> {
        match self.ctx.agents.client(node, self.update.now) {
            Ok(client) => Ok(client),
            Err(Error::AgentUnavailable { reason, .. }) if self.update.status.vm.is_some() => {
                // The VM lives in its Pod, which runs: an agent away
                // (restarting, upgrading, crashed) changes nothing about it.
                // The Sandbox stays as it was until the agent is back.
                tracing::info!(node, reason, "agent unavailable; the VM's Pod runs on");
                done(Action::requeue(self.ctx.settings.poll * 5))
            }
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
        pod_uid: &str,
        workload: pb::Workload,
    ) -> Step<(pb::Sandbox, StartEvent)> {
        if self.claimed.is_some() {
            // No VM of this Sandbox runs in a Pod it did not own until now:
            // one an earlier pass started would be in a Pod labelled as its
            // own, which that pass would have found instead.
            return self.start(client, node, pod_uid, workload).await;
        }
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
            None => self.start(client, node, pod_uid, workload).await,
        }
    }

    /// Has the agent create the VM in Pod `pod_uid`, or restore it there
    /// from its capture.
    async fn start(
        &mut self,
        client: &mut AgentClient<Channel>,
        node: &str,
        pod_uid: &str,
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
                        pod_uid: pod_uid.to_string(),
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
                            pod_uid: pod_uid.to_string(),
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
        // The claim has no Event of its own: one write less per fork.
        let place = match &self.claimed {
            Some(claimed) => format!("in {claimed} on node {node}"),
            None => format!("on node {node}"),
        };
        let event = match &sandbox.spec.restore_from {
            Some(restore) => (
                "Restored",
                format!(
                    "restored {place} from SandboxBranch {} in {:.1} ms",
                    restore.sandbox_branch,
                    started.elapsed().as_secs_f64() * 1e3
                ),
            ),
            None => ("Started", format!("started {place}")),
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

/// Whether the Pod runs, and its VMM container in it.
pub(crate) fn vmm_running(pod: &Pod) -> bool {
    let Some(status) = &pod.status else {
        return false;
    };
    status.phase.as_deref() == Some("Running")
        && status
            .container_statuses
            .iter()
            .flatten()
            .find(|c| c.name == sandfork_api::pod::VMM_CONTAINER)
            .and_then(|c| c.state.as_ref())
            .is_some_and(|state| state.running.is_some())
}

/// Publishes the Event about a VM this pass started.
async fn publish_start(sandbox: &Sandbox, ctx: &Context, started: StartEvent) {
    if let Some((reason, note)) = started {
        ctx.event(sandbox, EventType::Normal, reason, "Start", note)
            .await;
    }
}

/// Whether `pod` is controlled by the Sandbox with UID `uid`.
fn is_owned_by(pod: &Pod, uid: &str) -> bool {
    pod.owner_references()
        .iter()
        .any(|owner| owner.controller == Some(true) && owner.uid == uid)
}

/// A condition of `pod` by type.
pub(crate) fn pod_condition<'p>(
    pod: &'p Pod,
    type_: &str,
) -> Option<&'p k8s_openapi::api::core::v1::PodCondition> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

/// How `pod` ended, if it did (it never restarts): the Pod's reason (e.g.
/// `Evicted`), else how its `vmm` container terminated (e.g. `OOMKilled`).
pub(crate) fn pod_ended(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let phase = status.phase.as_deref()?;
    if phase != "Failed" && phase != "Succeeded" {
        return None;
    }
    let verb = if phase == "Failed" { "failed" } else { "ended" };
    if let Some(reason) = &status.reason {
        let message = status.message.as_deref().unwrap_or_default();
        return Some(
            format!("{verb}: {reason}: {message}")
                .trim_end_matches([':', ' '])
                .to_string(),
        );
    }
    let terminated = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == sandfork_api::pod::VMM_CONTAINER)
        .and_then(|c| c.state.as_ref()?.terminated.as_ref());
    Some(match terminated {
        Some(t) => {
            let mut why = format!(
                "{verb}: container {} terminated: {} (exit code {})",
                sandfork_api::pod::VMM_CONTAINER,
                t.reason.as_deref().unwrap_or("no reason given"),
                t.exit_code
            );
            if let Some(message) = t.message.as_deref().filter(|m| !m.is_empty()) {
                why.push_str(&format!(": {message}"));
            }
            why
        }
        None => format!("{verb} (phase {phase})"),
    })
}

/// Stops the VM, then deletes the Pod it ran in. Tolerates a Sandbox whose
/// Pod was never made or never bound (no agent holds anything for it).
async fn cleanup(sandbox: &Sandbox, ctx: &Context) -> Result<Action> {
    if let Some(node) = sandbox.node() {
        stop_vm(sandbox, ctx, node).await?;
    }
    delete_pod(sandbox, ctx).await?;
    Ok(Action::await_change())
}

/// Has the agent of `node` stop the VM and forget it (a capture's copy from
/// it finishes first); gives up after a while on an unreachable agent.
async fn stop_vm(sandbox: &Sandbox, ctx: &Context, node: &str) -> Result<()> {
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
                Ok(_) => Ok(()),
                Err(status) if status.code() == Code::NotFound => Ok(()),
                Err(status) => Err(Error::agent(node, status)),
            }
        }
        Err(Error::AgentUnavailable { reason, .. }) => {
            give_up_or_retry(sandbox, ctx, node, &reason, now)
                .await
                .map(drop)
        }
        Err(err) => Err(err),
    }
}

/// Deletes the Sandbox's Pod, if it has one (the garbage collector would
/// too, through the owner reference, and does for a claimed warm Pod the
/// status did not record yet; this is sooner). A Pod of that name that is
/// not the Sandbox's is left alone.
async fn delete_pod(sandbox: &Sandbox, ctx: &Context) -> Result<()> {
    let uid = sandbox.uid().unwrap_or_default();
    let name = sandbox
        .status
        .as_ref()
        .and_then(|s| s.pod.clone())
        .unwrap_or_else(|| sandfork_api::pod::name(&sandbox.name_any()));
    let pods: Api<Pod> =
        Api::namespaced(ctx.client.clone(), &sandbox.namespace().unwrap_or_default());
    let Some(pod) = pods.get_opt(&name).await? else {
        return Ok(());
    };
    if !is_owned_by(&pod, &uid) || pod.metadata.deletion_timestamp.is_some() {
        return Ok(());
    }
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: pod.uid(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match pods.delete(&name, &params).await {
        Ok(_) => Ok(()),
        Err(err) if is_not_found(&err) => Ok(()),
        Err(err) => Err(err.into()),
    }
}
