//! What the two controllers share: the reconcile wrapper (finalizer,
//! timeout, metrics, backoff bookkeeping and a tracing span naming the
//! object), the error policy, the status being built by one pass and how it
//! is written, and what cleanup does when an agent cannot be reached.
//!
//! Each kind says what is its own through [`Reconcile`]: its controller's
//! name, its status, and its `apply` and `cleanup` passes.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams};
use kube::core::NamespaceResourceScope;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use sandfork_api::conditions::{self, Cond};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::context::{Context, FIELD_MANAGER, FINALIZER, object_key};
use crate::error::{Error, ErrorChain, Result};

/// How soon to retry after a write conflict.
pub const CONFLICT_RETRY: Duration = Duration::from_millis(300);

/// A kind one of the controllers reconciles.
pub trait Reconcile:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Serialize
    + DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    /// The controller's name in metrics.
    const CONTROLLER: &'static str;

    /// Whether the object carries the operator's finalizer, so that
    /// `cleanup` runs before it goes. Without it `cleanup` is never called.
    const FINALIZED: bool = true;

    type Status: ObjectStatus;

    fn status(&self) -> Option<&Self::Status>;

    /// Brings the world in line with the object (it has the finalizer).
    fn apply(&self, ctx: &Context) -> impl Future<Output = Result<Action>> + Send;

    /// Frees what the object holds before its finalizer is removed; must
    /// tolerate `apply` never having run.
    fn cleanup(&self, ctx: &Context) -> impl Future<Output = Result<Action>> + Send;
}

/// A status with conditions, as the Kubernetes API conventions describe them.
pub trait ObjectStatus: Clone + Default + PartialEq + Serialize + Send + Sync {
    fn conditions(&self) -> &[Condition];

    /// Replaces the conditions, computed for the object's `generation`.
    fn set_conditions(&mut self, conditions: Vec<Condition>, generation: Option<i64>);
}

impl ObjectStatus for sandfork_api::SandboxStatus {
    fn conditions(&self) -> &[Condition] {
        &self.conditions
    }

    fn set_conditions(&mut self, conditions: Vec<Condition>, generation: Option<i64>) {
        self.conditions = conditions;
        self.observed_generation = generation;
    }
}

impl ObjectStatus for sandfork_api::SandboxBranchStatus {
    fn conditions(&self) -> &[Condition] {
        &self.conditions
    }

    fn set_conditions(&mut self, conditions: Vec<Condition>, generation: Option<i64>) {
        self.conditions = conditions;
        self.observed_generation = generation;
    }
}

/// Why a pass ends before its last phase.
#[derive(Debug)]
pub enum Stop {
    /// It did what it could for now; this says when to look again.
    Done(Action),
    Failed(Error),
}

impl Stop {
    /// The reconcile's result.
    pub fn into_result(self) -> Result<Action> {
        match self {
            Stop::Done(action) => Ok(action),
            Stop::Failed(err) => Err(err),
        }
    }
}

impl From<Error> for Stop {
    fn from(err: Error) -> Self {
        Stop::Failed(err)
    }
}

impl From<kube::Error> for Stop {
    fn from(err: kube::Error) -> Self {
        Stop::Failed(err.into())
    }
}

/// The outcome of one phase of a pass: go on with a `T`, or [`Stop`].
pub type Step<T = ()> = std::result::Result<T, Stop>;

/// Ends the pass here, to look again as `action` says.
pub fn done<T>(action: Action) -> Step<T> {
    Err(Stop::Done(action))
}

/// The span of everything done for `obj`: its kind, namespace and name.
fn span<K: Reconcile>(obj: &K) -> tracing::Span {
    tracing::info_span!(
        "reconcile",
        kind = %K::kind(&()),
        namespace = obj.meta().namespace.as_deref().unwrap_or_default(),
        name = obj.meta().name.as_deref().unwrap_or_default(),
    )
}

/// One reconcile of `obj`: `apply` or `cleanup` inside the finalizer, within
/// the reconcile timeout, counted in the metrics.
pub async fn reconcile<K: Reconcile>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action> {
    let span = span(obj.as_ref());
    finalized_pass(obj, ctx).instrument(span).await
}

async fn finalized_pass<K: Reconcile>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let key = object_key(obj.as_ref());
    let namespace = obj
        .namespace()
        .ok_or_else(|| Error::Permanent(format!("{} without a namespace", K::kind(&()))))?;
    if ctx.is_superseded(&key, obj.meta().resource_version.as_deref()) {
        // This operator wrote over this copy: the watch brings the newer
        // one, and with it the next pass. Working from this one would redo
        // what was done, and its writes would fail (409).
        tracing::debug!("a copy older than this operator's last write; waiting for the newer");
        return Ok(Action::requeue(CONFLICT_RETRY));
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let pass = async {
        if !K::FINALIZED {
            return match obj.meta().deletion_timestamp {
                Some(_) => Ok(Action::await_change()),
                None => obj.apply(&ctx).await,
            };
        }
        finalized(&api, obj.as_ref(), &ctx).await
    };
    let limit = ctx.settings.reconcile_timeout;
    let result = match tokio::time::timeout(limit, pass).await {
        Ok(result) => result,
        Err(_) => Err(Error::Timeout(limit)),
    };
    ctx.metrics.reconciled(K::CONTROLLER, started.elapsed());
    if result.is_ok() {
        ctx.succeeded(&key);
    }
    result
}

/// `apply` once the object carries the finalizer, which a new object gets
/// first; `cleanup` once it is being deleted, and then the finalizer goes.
/// A pass that adds the finalizer goes on to `apply` with the object the
/// API server returned: waiting for the watch to deliver that change would
/// put one more round trip on the path of every new object.
async fn finalized<K: Reconcile>(api: &Api<K>, obj: &K, ctx: &Context) -> Result<Action> {
    let has_finalizer = obj.finalizers().iter().any(|f| f == FINALIZER);
    match (obj.meta().deletion_timestamp.is_some(), has_finalizer) {
        (false, true) => obj.apply(ctx).await,
        (false, false) => {
            let mut finalizers = obj.finalizers().to_vec();
            finalizers.push(FINALIZER.to_string());
            let added = patch_finalizers(api, obj, finalizers)
                .await
                .map_err(|source| Error::Finalizer {
                    action: "add",
                    source,
                })?;
            if let Some(version) = &obj.meta().resource_version {
                ctx.note_superseded(&object_key(obj), version);
            }
            added.apply(ctx).await
        }
        (true, true) => {
            let action = obj.cleanup(ctx).await?;
            let finalizers = obj
                .finalizers()
                .iter()
                .filter(|f| *f != FINALIZER)
                .cloned()
                .collect();
            match patch_finalizers(api, obj, finalizers).await {
                Ok(_) => Ok(action),
                // Gone already: nothing holds it any more.
                Err(err) if crate::error::is_not_found(&err) => Ok(action),
                Err(source) => Err(Error::Finalizer {
                    action: "remove",
                    source,
                }),
            }
        }
        (true, false) => Ok(Action::await_change()),
    }
}

/// Sets the object's finalizers to `finalizers`, on the condition that it
/// is still at the version read (otherwise the API server answers 409, and
/// the pass is retried from a fresh copy).
async fn patch_finalizers<K: Reconcile>(
    api: &Api<K>,
    obj: &K,
    finalizers: Vec<String>,
) -> kube::Result<K> {
    let patch = serde_json::json!({
        "metadata": {
            "resourceVersion": obj.meta().resource_version,
            "finalizers": finalizers,
        },
    });
    api.patch(
        obj.meta().name.as_deref().unwrap_or_default(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
}

/// What to do after a failed reconcile: a conflict is retried soon, waiting
/// is looked at again at the poll interval, a transient error is retried with
/// a growing backoff, and a permanent one waits for a change to the object.
pub fn error_policy<K: Reconcile>(obj: Arc<K>, err: &Error, ctx: Arc<Context>) -> Action {
    let _span = span(obj.as_ref()).entered();
    ctx.metrics.failed(K::CONTROLLER, err.metric_label());
    if err.is_conflict() {
        // Reconciled from a stale copy: look again as soon as the cache catches up.
        tracing::debug!("conflict; retrying");
        Action::requeue(CONFLICT_RETRY)
    } else if err.is_waiting() {
        tracing::debug!(error = %ErrorChain(err));
        Action::requeue(ctx.settings.poll)
    } else if err.is_transient() {
        let wait = ctx.backoff(object_key(obj.as_ref()));
        tracing::warn!(error = %ErrorChain(err), ?wait, "reconcile failed; retrying");
        Action::requeue(wait)
    } else {
        tracing::error!(error = %ErrorChain(err), "reconcile failed; waiting for a change");
        Action::await_change()
    }
}

/// The status being built by one reconcile, and what was last written.
pub struct StatusUpdate<'a, K: Reconcile> {
    pub obj: &'a K,
    pub status: K::Status,
    pub now: Timestamp,
    /// The status as last written (or read), and the object's version then.
    written: Option<K::Status>,
    resource_version: Option<String>,
}

impl<'a, K: Reconcile> StatusUpdate<'a, K> {
    pub fn new(obj: &'a K, now: Timestamp) -> Self {
        Self {
            obj,
            status: obj.status().cloned().unwrap_or_default(),
            now,
            written: obj.status().cloned(),
            resource_version: obj.meta().resource_version.clone(),
        }
    }

    /// Sets the conditions in `set`, keeping the others.
    pub fn set_conditions(&mut self, set: &[Cond<'_>]) {
        let generation = self.obj.meta().generation;
        let merged = conditions::merge(self.status.conditions(), set, generation, &Time(self.now));
        self.status.set_conditions(merged, generation);
    }

    /// Writes the status if it changed.
    pub async fn write(&mut self, ctx: &Context) -> Result<()> {
        if self.written.as_ref() == Some(&self.status) {
            return Ok(());
        }
        let written = apply_status(
            ctx,
            self.obj,
            self.resource_version.as_deref(),
            &self.status,
        )
        .await?;
        if let Some(replaced) = std::mem::replace(&mut self.resource_version, written) {
            ctx.note_superseded(&object_key(self.obj), &replaced);
        }
        self.written = Some(self.status.clone());
        Ok(())
    }
}

/// Writes `status` as the whole status of `obj`, by server-side apply with
/// the operator's field manager, on the condition that the object is still
/// at `resource_version` (a reconcile that started from a stale cached copy
/// gets a conflict instead of overwriting newer state). Returns the new
/// resourceVersion.
async fn apply_status<K: Reconcile>(
    ctx: &Context,
    obj: &K,
    resource_version: Option<&str>,
    status: &K::Status,
) -> kube::Result<Option<String>> {
    let api: Api<K> = Api::namespaced(
        ctx.client.clone(),
        obj.meta().namespace.as_deref().unwrap_or_default(),
    );
    let mut patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    if let Some(resource_version) = resource_version {
        patch["metadata"] = serde_json::json!({ "resourceVersion": resource_version });
    }
    let written = api
        .patch_status(
            obj.meta().name.as_deref().unwrap_or_default(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    Ok(written.meta().resource_version.clone())
}

/// For a deleted object whose agent cannot be reached: keep retrying for a
/// while, then let the object go with a Warning (the agent, if it comes
/// back, still holds the VM or capture; nothing else is harmed).
pub async fn give_up_or_retry<K>(
    obj: &K,
    ctx: &Context,
    node: &str,
    reason: &str,
    now: Timestamp,
) -> Result<Action>
where
    K: Resource<DynamicType = ()>,
{
    let registered = ctx.agents.get(node).is_some();
    let deleted_at = obj
        .meta()
        .deletion_timestamp
        .as_ref()
        .map(|t| t.0)
        .unwrap_or(now);
    let waited = now.duration_since(deleted_at);
    let grace = SignedDuration::try_from(ctx.settings.unreachable_agent_grace).unwrap_or_default();
    if registered && waited < grace {
        return Err(Error::AgentUnavailable {
            node: node.to_string(),
            reason: reason.to_string(),
        });
    }
    let why = if registered {
        format!(
            "the agent on node {node} stayed unreachable for {}s ({reason})",
            waited.as_secs()
        )
    } else {
        format!("no agent is registered for node {node}")
    };
    ctx.event(
        obj,
        EventType::Warning,
        "CleanupSkipped",
        "Delete",
        format!("{why}; what it held there was not freed"),
    )
    .await;
    Ok(Action::await_change())
}
