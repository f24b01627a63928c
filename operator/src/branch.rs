//! The SandboxBranch controller: captures the source Sandbox once, on its
//! node, and creates the branch Sandboxes `<name>-<index>` that restore from
//! that capture.
//!
//! Restart safety: the capture is keyed by the SandboxBranch's UID (the agent
//! returns the existing one when asked again), branch names are fixed by
//! their index, and a create that finds its name taken checks that the
//! object is its own. No step creates a twin, whatever point a previous
//! reconcile reached. Nor does the failure deadline depend on it: a pass
//! judges it by the branches it finds and when they became Ready, not by
//! what the status said last or when the pass happens to run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use sandfork_api::agent::v1 as pb;
use sandfork_api::agent::v1::agent_client::AgentClient;
use sandfork_api::branch::{
    BranchError, BranchStatus, CaptureFigures, CaptureMode, DeletionPolicy,
};
use sandfork_api::conditions::{self, Cond};
use sandfork_api::sandbox::{RestoreSource, SandboxResources};
use sandfork_api::{Sandbox, SandboxBranch, SandboxBranchStatus, SandboxSpec, labels};
use tonic::Code;
use tonic::transport::Channel;

use crate::agents::with_timeout;
use crate::context::{Context, FIELD_MANAGER, FINALIZER};
use crate::controller::{Reconcile, StatusUpdate, Step, Stop, done, give_up_or_retry};
use crate::error::ErrorChain;
use crate::error::{Error, Result, agent_code_is_transient, is_already_exists, is_not_found};
use crate::metrics::{KindLabels, ModeLabels};

pub const CONTROLLER: &str = "sandboxbranch";

/// How many branch Sandboxes a pass creates at once.
const PARALLEL_CREATES: usize = 16;

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
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const DEADLINE_EXCEEDED: &str = "DeadlineExceeded";
    pub const COMPLETE: &str = "Complete";
}

impl Reconcile for SandboxBranch {
    const CONTROLLER: &'static str = CONTROLLER;
    type Status = SandboxBranchStatus;

    fn status(&self) -> Option<&SandboxBranchStatus> {
        self.status.as_ref()
    }

    /// Captures the source once, creates the missing branches and deletes the
    /// extra ones, then sums up how the branches are doing.
    async fn apply(&self, ctx: &Context) -> Result<Action> {
        Pass::new(self, ctx)?.run().await.or_else(Stop::into_result)
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

/// What the pass found or made of the capture.
struct Capture {
    /// The node the capture is on; the branches run there.
    node: String,
    /// Set on the pass that captured.
    fresh: Option<FreshCapture>,
}

struct FreshCapture {
    /// The Event's note, published once the branches are on their way.
    note: String,
    /// The source's spec, which the branches copy.
    source_spec: SandboxSpec,
}

/// The branches that exist and are ours, by index.
type Branches = BTreeMap<u32, Sandbox>;

/// One pass of `apply`: what it reads once and the status it builds.
struct Pass<'a> {
    branch: &'a SandboxBranch,
    ctx: &'a Context,
    uid: String,
    sandboxes: Api<Sandbox>,
    update: Update<'a>,
    /// Whether the status records that all branches were ready once (its
    /// `completionTime`); the deadline no longer applies.
    complete: bool,
    /// How long until the failure deadline.
    remaining: Duration,
    /// How soon to look again while working, never much past the deadline
    /// while it applies.
    poll: Duration,
}

impl<'a> Pass<'a> {
    fn new(branch: &'a SandboxBranch, ctx: &'a Context) -> Result<Self> {
        let now = ctx.clock.now();
        let uid = branch
            .uid()
            .ok_or_else(|| Error::Permanent("SandboxBranch without a UID".into()))?;
        let update = Update::new(branch, now);
        // How long until the deadline, for requeues and the capture timeout.
        let remaining = deadline(branch)
            .map(|deadline| Duration::try_from(deadline.duration_since(now)).unwrap_or_default())
            .unwrap_or(ctx.settings.capture_timeout);
        Ok(Self {
            branch,
            ctx,
            uid,
            sandboxes: Api::namespaced(ctx.client.clone(), &branch.namespace().unwrap_or_default()),
            complete: update.status.completion_time.is_some(),
            update,
            remaining,
            poll: ctx
                .settings
                .poll
                .min(remaining + Duration::from_millis(100)),
        })
    }

    async fn run(&mut self) -> Step<Action> {
        if self.branch.is_failed() {
            return Ok(Action::await_change());
        }
        // What exists first, then the clock: whether the fork failed its
        // deadline depends on when its branches became Ready, not on when
        // this pass happens to look.
        let mut branches = self.list_branches().await?;
        self.check_deadline(&branches).await?;
        let capture = self.ensure_capture().await?;
        self.create_missing(&mut branches, &capture).await?;
        self.trim_extra(&mut branches).await?;
        self.summarize(&branches, &capture.node).await
    }

    /// Marks the SandboxBranch `Failed` for good and releases what it holds
    /// that is of no use any more: the capture, and the branches not ready.
    async fn fail<T>(&mut self, reason: &str, message: String) -> Step<T> {
        let (branch, ctx) = (self.branch, self.ctx);
        self.update.set(false, false, true, reason, &message);
        self.update.status.error = Some(BranchError {
            time: Time(self.update.now),
            message: message.clone(),
        });
        self.update.write(ctx).await?;
        ctx.event(branch, EventType::Warning, reason, "Fail", message)
            .await;
        if let Err(err) = release(branch, ctx, &self.update.status).await {
            // The finalizer's cleanup tries again when the object is deleted.
            tracing::warn!(error = %ErrorChain(&err), "could not release a failed SandboxBranch's resources");
        }
        done(Action::await_change())
    }

    /// Says what the pass waits for, and looks again soon.
    async fn wait<T>(&mut self, reason: &str, message: &str) -> Step<T> {
        self.update.progress(reason, message);
        self.update.write(self.ctx).await?;
        done(Action::requeue(self.poll))
    }

    /// Fails the SandboxBranch once its failure deadline has passed, unless
    /// all its branches were ready by then: as the status records, or as the
    /// `branches` found show (each one's Ready transition). A fork whose last
    /// branch became Ready after the deadline was not done in time and fails.
    async fn check_deadline(&mut self, branches: &Branches) -> Step {
        let now = self.update.now;
        let Some(deadline) = deadline(self.branch) else {
            return Ok(());
        };
        let completed = completed_at(branches, self.branch.spec.branches);
        if self.complete || completed.is_some_and(|completed| completed <= deadline) {
            // Done in time: the deadline no longer bounds how soon to look again.
            self.poll = self.ctx.settings.poll;
            return Ok(());
        }
        if now <= deadline {
            return Ok(());
        }
        let why = match completed {
            Some(completed) => format!(
                " (the last branch became Ready at {completed}, after the deadline {deadline})"
            ),
            None => conditions::find(&self.update.status.conditions, conditions::PROGRESSING)
                .map(|c| format!(" (last: {}: {})", c.reason, c.message))
                .unwrap_or_default(),
        };
        let message = format!(
            "the capture and branches were not done within failureDeadline {}{why}",
            self.branch.spec.failure_deadline
        );
        self.fail(reason::DEADLINE_EXCEEDED, message).await
    }

    /// Captures the source once, on its node; later passes find the
    /// capture in the status.
    async fn ensure_capture(&mut self) -> Step<Capture> {
        if self.update.status.capture.is_some() {
            return Ok(Capture {
                node: self.update.status.source_node.clone().unwrap_or_default(),
                fresh: None,
            });
        }
        let source = self.ready_source().await?;
        if let Some(message) = memory_request_error(self.branch, &source.spec) {
            return self.fail(reason::INVALID_SPEC, message).await;
        }
        let node = source.node().unwrap_or_default().to_string();
        let client = self.reach_agent(&node).await?;
        let note = self.capture(&source, &node, client).await?;
        Ok(Capture {
            node,
            fresh: Some(FreshCapture {
                note,
                source_spec: source.spec,
            }),
        })
    }

    /// The source Sandbox once it runs on a node; waits for it until then,
    /// and fails if it failed for good.
    async fn ready_source(&mut self) -> Step<Sandbox> {
        let (branch, ctx) = (self.branch, self.ctx);
        let source_name = &branch.spec.source_ref.name;
        let namespace = branch.namespace().unwrap_or_default();
        // A source the Sandbox controller's cache shows running is taken
        // from there; anything else is looked up before it is waited for.
        let cached = ctx
            .caches
            .sandboxes
            .get(&ObjectRef::new(source_name).within(&namespace))
            .filter(|source| source.is_ready() && source.node().is_some());
        let source = match cached {
            Some(source) => Some(Sandbox::clone(&source)),
            None => self.sandboxes.get_opt(source_name).await?,
        };
        let Some(source) = source else {
            let message =
                format!("Sandbox {source_name:?} does not exist in namespace {namespace}");
            return self.wait(reason::SOURCE_NOT_FOUND, &message).await;
        };
        if source.is_ready() && source.node().is_some() {
            return Ok(source);
        }
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
            return self.fail(reason::SOURCE_FAILED, message).await;
        }
        let why = ready
            .map(|c| format!(" ({}: {})", c.reason, c.message))
            .unwrap_or_default();
        let message = format!("waiting for Sandbox {source_name:?} to be Ready{why}");
        self.wait(reason::WAITING_FOR_SOURCE, &message).await
    }

    /// A client for the agent of `node`; waits while there is none ready.
    async fn reach_agent(&mut self, node: &str) -> Step<AgentClient<Channel>> {
        match self.ctx.agents.client(node, self.update.now) {
            Ok(client) => Ok(client),
            Err(err @ Error::AgentUnavailable { .. }) => {
                self.wait(reason::AGENT_UNAVAILABLE, &err.to_string()).await
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Has the agent of `node` capture `source`, keyed by this
    /// SandboxBranch's UID, and records the capture in the status. Returns
    /// the note of the `Captured` Event.
    async fn capture(
        &mut self,
        source: &Sandbox,
        node: &str,
        mut client: AgentClient<Channel>,
    ) -> Step<String> {
        let (branch, ctx) = (self.branch, self.ctx);
        let source_name = &branch.spec.source_ref.name;
        if self.update.status.source_node.as_deref() != Some(node) {
            self.update.status.source_node = Some(node.to_string());
        }
        let message = format!(
            "capturing Sandbox {source_name:?} on node {node} ({})",
            mode_name(branch.spec.mode)
        );
        let first_try = !conditions::find(&self.update.status.conditions, conditions::PROGRESSING)
            .is_some_and(|c| c.reason == reason::CAPTURING || c.reason == reason::CAPTURE_FAILED);
        self.update.progress(reason::CAPTURING, &message);
        let started = Instant::now();
        let request = pb::CaptureSandboxRequest {
            sandbox_uid: source.uid().unwrap_or_default(),
            capture_uid: self.uid.clone(),
            mode: match branch.spec.mode {
                CaptureMode::Live => pb::CaptureMode::Live,
                CaptureMode::StopAndCopy => pb::CaptureMode::StopAndCopy,
            } as i32,
        };
        let timeout = ctx
            .settings
            .capture_timeout
            .min(self.remaining.max(Duration::from_secs(1)));
        // The status and the Event go out while the agent captures, not
        // before: the capture is keyed by this SandboxBranch's UID, so a
        // pass that fails to write the status captures nothing twice.
        let update = &mut self.update;
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
        match captured {
            Ok(capture) => {
                self.record_capture(capture.into_inner(), node, started)
                    .await
            }
            Err(status) => {
                let message = format!(
                    "the agent on node {node} could not capture: {}",
                    status.message()
                );
                if !agent_code_is_transient(status.code()) {
                    return self.fail(reason::CAPTURE_FAILED, message).await;
                }
                self.update
                    .progress(reason::CAPTURE_FAILED, &format!("{message}; retrying"));
                self.update.write(ctx).await?;
                ctx.event(
                    branch,
                    EventType::Warning,
                    reason::CAPTURE_FAILED,
                    "Capture",
                    message,
                )
                .await;
                Err(Error::agent(node, status).into())
            }
        }
    }

    /// Writes the capture's time and figures into the status (branches are
    /// created only once it is written: the Sandbox controller reads their
    /// origin from it) and into the metrics. Returns the `Captured` note.
    async fn record_capture(
        &mut self,
        capture: pb::Capture,
        node: &str,
        started: Instant,
    ) -> Step<String> {
        let branch = self.branch;
        let metrics = &self.ctx.metrics;
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
            .unwrap_or(self.update.now);
        self.update.status.capture_time = Some(Time(captured_at));
        self.update.status.capture = Some(figures.clone());
        let mode = ModeLabels {
            mode: mode_name(branch.spec.mode),
        };
        metrics
            .capture_pause
            .get_or_create(&mode)
            .observe(stats.pause_ns as f64 / 1e9);
        // A live capture answers at the pause; its copy goes on meanwhile.
        let copy = if capture.memory_complete {
            metrics
                .capture_duration
                .get_or_create(&mode)
                .observe(stats.copy_ns as f64 / 1e9);
            copy_summary(&stats)
        } else {
            "memory copy going on in the background".to_string()
        };
        let note = format!(
            "captured Sandbox {:?} on node {node}: paused {} us, {copy}; call took {:.0} ms",
            branch.spec.source_ref.name,
            figures.pause_micros,
            started.elapsed().as_secs_f64() * 1e3,
        );
        self.update.progress(
            reason::RESTORING,
            &format!("captured; starting {} branches", branch.spec.branches),
        );
        self.update.write(self.ctx).await?;
        Ok(note)
    }

    /// The branches that exist: ours are those restoring from this UID. While
    /// the status holds no capture there are none: branches are made only
    /// once it does (and a create that finds its name taken checks whose the
    /// object is), so a pass that has yet to capture does not look.
    ///
    /// Read from the API server's watch cache as it is: a consistent list
    /// waits until that cache has caught up with etcd, up to the next
    /// progress request (kube-apiserver asks every 100 ms), whenever
    /// anything else was written since the last Sandbox event. The passes
    /// here are started by that cache's own watch events; if it lags
    /// (another API server), counting a branch short only means another pass.
    async fn list_branches(&self) -> Result<Branches> {
        if self.update.status.capture.is_none() {
            return Ok(Branches::new());
        }
        Ok(our_branches(
            &self.sandboxes,
            self.branch,
            ListParams::default().match_any(),
        )
        .await?
        .filter_map(|sandbox| Some((branch_index(&sandbox)?, sandbox)))
        .collect())
    }

    /// Creates the branches not in `branches`, then publishes this pass's
    /// Events (the capture's, each created branch's).
    async fn create_missing(&mut self, branches: &mut Branches, capture: &Capture) -> Step {
        let mut created = Vec::new();
        let halted = self.create_branches(branches, capture, &mut created).await;
        let (branch, ctx) = (self.branch, self.ctx);
        if let Some(fresh) = &capture.fresh {
            ctx.event(
                branch,
                EventType::Normal,
                "Captured",
                "Capture",
                fresh.note.clone(),
            )
            .await;
        }
        // One Event for the branches this pass made: a fan-out's would
        // otherwise be as many API writes on its path.
        created.sort_by_key(|(index, _)| *index);
        match created.as_slice() {
            [] => {}
            [(_, only)] => {
                let note = format!(
                    "created Sandbox {:?} on node {}",
                    only.name.as_deref().unwrap_or_default(),
                    capture.node
                );
                // Naming the branch, so that these Events are not merged into one series.
                let event = Event {
                    type_: EventType::Normal,
                    reason: "BranchCreated".into(),
                    note: Some(note),
                    action: "Restore".into(),
                    secondary: Some(only.clone()),
                };
                ctx.publish(branch, event).await;
            }
            [(_, first), .., (_, last)] => {
                let note = format!(
                    "created {} Sandboxes, {:?} to {:?}, on node {}",
                    created.len(),
                    first.name.as_deref().unwrap_or_default(),
                    last.name.as_deref().unwrap_or_default(),
                    capture.node
                );
                ctx.event(
                    branch,
                    EventType::Normal,
                    "BranchesCreated",
                    "Restore",
                    note,
                )
                .await;
            }
        }
        match halted? {
            None => Ok(()),
            Some(Halt::Fail(reason, message)) => self.fail(reason, message).await,
            Some(Halt::Retry) => done(Action::requeue(self.poll)),
        }
    }

    /// Creates the missing branches, recording each in `branches` and in
    /// `created`; stops at the first that cannot be made.
    async fn create_branches(
        &self,
        branches: &mut Branches,
        capture: &Capture,
        created: &mut Vec<(u32, ObjectReference)>,
    ) -> Result<Option<Halt>> {
        let branch = self.branch;
        let missing: Vec<u32> = (0..branch.spec.branches)
            .filter(|index| !branches.contains_key(index))
            .collect();
        if missing.is_empty() {
            return Ok(None);
        }
        // Branches copy the source's spec; a branch made earlier has it too,
        // so the source may be gone by now.
        let source_name = &branch.spec.source_ref.name;
        let template = match (branches.values().next(), &capture.fresh) {
            (Some(sandbox), _) => Some(sandbox.spec.clone()),
            (None, Some(fresh)) => Some(fresh.source_spec.clone()),
            (None, None) => self
                .sandboxes
                .get_opt(source_name)
                .await?
                .map(|source| source.spec),
        };
        let Some(template) = template else {
            let message = format!(
                "source Sandbox {source_name:?} was deleted before its branches were created"
            );
            return Ok(Some(Halt::Fail(reason::SOURCE_NOT_FOUND, message)));
        };
        if let Some(message) = memory_request_error(branch, &template) {
            return Ok(Some(Halt::Fail(reason::INVALID_SPEC, message)));
        }
        // The creates go out side by side: one after another, a fan-out
        // of 64 spent seconds on them before its last branch could start.
        let creates = futures::stream::iter(missing)
            .map(|index| {
                let object = branch_object(branch, index, &template, &capture.node, &self.uid);
                async move { (index, self.create_branch(object).await) }
            })
            .buffer_unordered(PARALLEL_CREATES)
            .collect::<Vec<_>>()
            .await;
        let mut halt = None;
        let mut failed = None;
        for (index, outcome) in creates {
            match outcome {
                Ok(Made::Created(sandbox)) => {
                    created.push((index, sandbox.object_ref(&())));
                    branches.insert(index, sandbox);
                }
                Ok(Made::Found(sandbox)) => {
                    branches.insert(index, sandbox);
                }
                Ok(Made::Halted(Halt::Fail(reason, message))) => {
                    halt = Some(Halt::Fail(reason, message));
                }
                Ok(Made::Halted(Halt::Retry)) => {
                    halt = halt.or(Some(Halt::Retry));
                }
                Err(err) => failed = Some(err),
            }
        }
        match (halt, failed) {
            (Some(fail @ Halt::Fail(..)), _) => Ok(Some(fail)),
            (_, Some(err)) => Err(err),
            (halt, None) => Ok(halt),
        }
    }

    /// Creates one branch Sandbox; one of that name made by an earlier pass
    /// is taken if it is ours.
    async fn create_branch(&self, object: Sandbox) -> Result<Made> {
        let name = object.name_any();
        let params = PostParams {
            dry_run: false,
            field_manager: Some(FIELD_MANAGER.into()),
        };
        match self.sandboxes.create(&params, &object).await {
            Ok(sandbox) => Ok(Made::Created(sandbox)),
            Err(err) if is_already_exists(&err) => match self.sandboxes.get_opt(&name).await? {
                Some(found) if is_ours(&found, &self.uid) => Ok(Made::Found(found)),
                Some(_) => {
                    let message = format!(
                        "a Sandbox named {name:?} already exists and was not made by this SandboxBranch"
                    );
                    Ok(Made::Halted(Halt::Fail(reason::NAME_CONFLICT, message)))
                }
                // Deleted in between: create it on the next pass.
                None => Ok(Made::Halted(Halt::Retry)),
            },
            Err(err) => Err(err.into()),
        }
    }

    /// Fewer branches wanted than exist: deletes the extra ones we own.
    async fn trim_extra(&self, branches: &mut Branches) -> Result<()> {
        if self.branch.spec.deletion_policy != DeletionPolicy::Delete {
            return Ok(());
        }
        for (_, sandbox) in branches.split_off(&self.branch.spec.branches) {
            if sandbox.metadata.deletion_timestamp.is_none() {
                delete_sandbox(&self.sandboxes, &sandbox.name_any()).await?;
            }
        }
        Ok(())
    }

    /// Sums up the branches in the status: all ready, some still restoring,
    /// or one failed (which fails the SandboxBranch, until it is complete).
    async fn summarize(&mut self, branches: &Branches, node: &str) -> Step<Action> {
        let (branch, ctx) = (self.branch, self.ctx);
        let now = self.update.now;
        // Asked only once Ready is written, to keep the call off that path.
        let copy_pending = if self.complete {
            self.record_finished_copy(node).await
        } else {
            copy_pending(&self.update.status)
        };
        let wanted = branch.spec.branches;
        self.update.status.branches = branches
            .range(..wanted)
            .map(|(index, sandbox)| BranchStatus {
                name: sandbox.name_any(),
                index: *index,
                ready: sandbox.is_ready(),
                pod_source: sandbox.status.as_ref().and_then(|s| s.pod_source),
            })
            .collect();
        let ready = self
            .update
            .status
            .branches
            .iter()
            .filter(|b| b.ready)
            .count();
        self.update.status.branches_ready = Some(format!("{ready}/{wanted}"));

        if !self.complete
            && let Some(message) = branches.values().find_map(failed_branch)
        {
            return self.fail(reason::BRANCH_FAILED, message).await;
        }

        let message = format!("{ready}/{wanted} branches ready on node {node}");
        if ready < wanted as usize {
            self.update.progress(reason::RESTORING, &message);
            self.update.write(ctx).await?;
            return Ok(Action::requeue(self.poll));
        }
        self.update
            .set(true, false, false, reason::BRANCHES_READY, &message);
        let first = self.update.status.completion_time.is_none();
        // Complete when the last branch became Ready, which a pass may see
        // only later.
        let completed = completed_at(branches, wanted).unwrap_or(now);
        if first {
            self.update.status.completion_time = Some(Time(completed));
        }
        self.update.write(ctx).await?;
        if first {
            if let Some(created) = &branch.metadata.creation_timestamp {
                ctx.metrics
                    .apply_to_ready
                    .get_or_create(&KindLabels {
                        kind: "SandboxBranch",
                    })
                    .observe(completed.duration_since(created.0).as_secs_f64().max(0.0));
            }
            ctx.event(branch, EventType::Normal, "Ready", "Restore", message)
                .await;
        }
        // A copy still going on is looked at again soon, for its figures.
        Ok(Action::requeue(if copy_pending {
            self.poll
        } else {
            ctx.settings.resync
        }))
    }

    /// A live capture's copy goes on after its branches start. Once the agent
    /// reports it complete, its final figures go into the status (and the
    /// capture-duration metric). Returns whether the copy is still going on.
    /// Failing to ask costs only figures: it is logged and tried again later.
    async fn record_finished_copy(&mut self, node: &str) -> bool {
        let (branch, ctx) = (self.branch, self.ctx);
        if !copy_pending(&self.update.status) {
            return false;
        }
        let answer = match ctx.agents.client(node, ctx.clock.now()) {
            Ok(mut client) => client
                .get_capture(with_timeout(
                    pb::GetCaptureRequest {
                        uid: self.uid.clone(),
                    },
                    ctx.settings.call_timeout,
                ))
                .await
                .map(tonic::Response::into_inner)
                .map_err(|status| Error::agent(node, status)),
            Err(err) => Err(err),
        };
        let capture = match answer {
            Ok(capture) => capture,
            // Gone (the agent lost it): its figures will never come.
            Err(Error::Agent { status, .. }) if status.code() == Code::NotFound => {
                tracing::debug!("the capture is gone; its copy figures stay unknown");
                return false;
            }
            Err(err) => {
                tracing::debug!(error = %ErrorChain(&err), "could not read the capture's copy figures");
                return true;
            }
        };
        if !capture.memory_complete {
            return true;
        }
        let stats = capture.stats.unwrap_or_default();
        if let Some(figures) = self.update.status.capture.as_mut() {
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
}

/// Whether the status holds a capture whose copy has not finished.
fn copy_pending(status: &SandboxBranchStatus) -> bool {
    status
        .capture
        .as_ref()
        .is_some_and(|figures| figures.copy_duration_millis.is_none())
}

/// When the `wanted` branches were all Ready: the latest of their Ready
/// conditions' transitions. `None` while one is missing or not Ready.
fn completed_at(branches: &Branches, wanted: u32) -> Option<Timestamp> {
    let mut latest = None;
    for index in 0..wanted {
        let status = branches.get(&index)?.status.as_ref()?;
        let ready = conditions::find(&status.conditions, conditions::READY)?;
        if ready.status != conditions::TRUE {
            return None;
        }
        latest = latest.max(Some(ready.last_transition_time.0));
    }
    latest
}

/// Why `sandbox`, a branch, failed for good, if it did.
fn failed_branch(sandbox: &Sandbox) -> Option<String> {
    let condition = sandbox
        .status
        .as_ref()
        .and_then(|s| conditions::find(&s.conditions, conditions::READY))
        .filter(|c| {
            c.status == conditions::FALSE
                && crate::sandbox::PERMANENT_REASONS.contains(&c.reason.as_str())
        })?;
    Some(format!(
        "branch {:?} failed: {}: {}",
        sandbox.name_any(),
        condition.reason,
        condition.message
    ))
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

/// What became of one branch's create.
enum Made {
    Created(Sandbox),
    /// An earlier pass had made it.
    Found(Sandbox),
    Halted(Halt),
}

/// Why a pass stopped creating branches.
enum Halt {
    /// For good, with this reason and message.
    Fail(&'static str, String),
    /// Until the next pass.
    Retry,
}

async fn release(
    branch: &SandboxBranch,
    ctx: &Context,
    status: &SandboxBranchStatus,
) -> Result<()> {
    let sandboxes: Api<Sandbox> =
        Api::namespaced(ctx.client.clone(), &branch.namespace().unwrap_or_default());
    for sandbox in our_branches(&sandboxes, branch, ListParams::default()).await? {
        if !sandbox.is_ready() && sandbox.metadata.deletion_timestamp.is_none() {
            delete_sandbox(&sandboxes, &sandbox.name_any()).await?;
        }
    }
    if let Some(node) = &status.source_node {
        delete_capture(ctx, node, &branch.uid().unwrap_or_default()).await?;
    }
    Ok(())
}

/// The Sandboxes restored from this SandboxBranch's capture.
async fn our_branches(
    sandboxes: &Api<Sandbox>,
    branch: &SandboxBranch,
    params: ListParams,
) -> Result<impl Iterator<Item = Sandbox>> {
    let uid = branch.uid().unwrap_or_default();
    let selector = labels::branch_selector(&branch.name_any());
    let list = sandboxes.list(&params.labels(&selector)).await?;
    Ok(list
        .items
        .into_iter()
        .filter(move |sandbox| is_ours(sandbox, &uid)))
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
        Err(status) => Err(Error::agent(node, status)),
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
    if branch.spec.deletion_policy == DeletionPolicy::Delete {
        let sandboxes: Api<Sandbox> =
            Api::namespaced(ctx.client.clone(), &branch.namespace().unwrap_or_default());
        let mut remaining = 0;
        for sandbox in our_branches(&sandboxes, branch, ListParams::default()).await? {
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
    match delete_capture(ctx, &node, &branch.uid().unwrap_or_default()).await {
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

/// Why the SandboxBranch's memory request for its branches does not fit
/// its source `template`, if it does not.
fn memory_request_error(branch: &SandboxBranch, template: &SandboxSpec) -> Option<String> {
    let request = branch.spec.branch_memory_request_mib?;
    (request > template.memory_mib).then(|| {
        format!(
            "branchMemoryRequestMiB {request} is more than the source's memoryMiB {}",
            template.memory_mib
        )
    })
}

/// The source's resources, with the SandboxBranch's memory request for
/// its branches when it sets one.
fn branch_resources(branch: &SandboxBranch, template: &SandboxSpec) -> Option<SandboxResources> {
    let Some(request) = branch.spec.branch_memory_request_mib else {
        return template.resources.clone();
    };
    let mut resources = template.resources.clone().unwrap_or_default();
    resources.memory_request_mib = Some(request);
    Some(resources)
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
            // The source's node is chosen: its selector and affinity were
            // for choosing it (and might now exclude it, or the source).
            // Its taints still apply, so the tolerations go along.
            node_selector: None,
            node_name: Some(node.to_string()),
            affinity: None,
            tolerations: template.tolerations.clone(),
            priority_class_name: template.priority_class_name.clone(),
            resources: branch_resources(branch, template),
            restore_from: Some(RestoreSource {
                sandbox_branch: name,
                uid: uid.to_string(),
            }),
        },
        status: None,
    }
}
