//! The SandboxWarmPool controller, and the claim a Sandbox makes of a warm Pod.
//!
//! A pool keeps `podsPerNode` warm Pods on each node it serves: sandbox Pods
//! of its size class, owned by the pool, whose VMM runs and waits for a
//! guest. A Sandbox of the same namespace and size class claims one by a
//! single patch of the Pod's labels and owner, made on the condition that the
//! Pod is still at the resourceVersion the claim saw: of two claims of one
//! Pod (two Sandboxes, or an operator before and after a restart) only one
//! succeeds. The claimed Pod is labelled with its Sandbox's UID, which is
//! how the Sandbox finds it again before its status records it. The pool no
//! longer owns it and makes another in the background.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use sandfork_api::conditions::{self, Cond};
use sandfork_api::{Sandbox, SandboxWarmPool, SandboxWarmPoolStatus, labels};
use serde_json::json;

use crate::context::Context;
use crate::controller::{ObjectStatus, Reconcile, StatusUpdate};
use crate::error::{Error, Result, is_not_found};
use crate::pod::{self, warm_pod};

pub const CONTROLLER: &str = "sandboxwarmpool";

/// Warm Pods a pool starts at once on one node.
const MAX_STARTING_PER_NODE: usize = 8;
/// Warm Pods a claim tries before it gives up and a cold Pod is made.
const CLAIM_ATTEMPTS: usize = 4;
/// How long a claim this operator made keeps its Pod from other claims of
/// this operator (the cache shows it claimed well before).
const CLAIM_MEMORY: Duration = Duration::from_secs(60);

/// Reasons of the `Ready` condition.
pub mod reason {
    pub const PODS_READY: &str = "PodsReady";
    pub const FILLING: &str = "Filling";
    pub const NO_NODES: &str = "NoNodes";
    pub const INVALID_SPEC: &str = "InvalidSpec";
}

impl ObjectStatus for SandboxWarmPoolStatus {
    fn conditions(&self) -> &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition] {
        &self.conditions
    }

    fn set_conditions(
        &mut self,
        conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
        generation: Option<i64>,
    ) {
        self.conditions = conditions;
        self.observed_generation = generation;
    }
}

impl Reconcile for SandboxWarmPool {
    const CONTROLLER: &'static str = CONTROLLER;
    /// A pool holds nothing the garbage collector does not free: its
    /// unclaimed Pods are owned by it. Without a finalizer, a pool is never
    /// stuck after the operator is uninstalled.
    const FINALIZED: bool = false;
    type Status = SandboxWarmPoolStatus;

    fn status(&self) -> Option<&SandboxWarmPoolStatus> {
        self.status.as_ref()
    }

    /// Makes the warm Pods each node lacks, deletes the extra and the ended
    /// ones, and reports how many are ready.
    async fn apply(&self, ctx: &Context) -> Result<Action> {
        fill(self, ctx).await
    }

    /// Not called (no finalizer): the garbage collector deletes the pool's
    /// unclaimed Pods after it; claimed ones belong to their Sandboxes.
    async fn cleanup(&self, _ctx: &Context) -> Result<Action> {
        Ok(Action::await_change())
    }
}

fn namespace_of(pool: &SandboxWarmPool) -> String {
    pool.namespace().unwrap_or_default()
}

type Update<'a> = StatusUpdate<'a, SandboxWarmPool>;

/// The Pods `pool` made and still owns, read from the API server (not the
/// cache: a Pod made by the previous pass must be counted).
async fn unclaimed_pods(pool: &SandboxWarmPool, pods: &Api<Pod>) -> Result<Vec<Pod>> {
    let uid = pool.uid().unwrap_or_default();
    let listed = pods
        .list(&ListParams::default().labels(&labels::warm_pool_selector(&pool.name_any())))
        .await?;
    Ok(listed
        .items
        .into_iter()
        .filter(|pod| controlled_by(pod, &uid))
        .collect())
}

async fn fill(pool: &SandboxWarmPool, ctx: &Context) -> Result<Action> {
    let mut update = Update::new(pool, ctx.clock.now());
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &namespace_of(pool));
    let wanted = pool.spec.pods_per_node as usize;
    let nodes = served_nodes(pool, ctx, update.now);
    if let Err(message) = warm_pod(pool, "node", &ctx.settings.vmm_image) {
        update.set_conditions(&[Cond::new(
            conditions::READY,
            false,
            reason::INVALID_SPEC,
            message,
        )]);
        update.write(ctx).await?;
        return Ok(Action::await_change());
    }

    // While its Pods are being claimed the pool neither lists nor writes:
    // in a fan-out each claim brought a pass, and each pass's list of
    // every Pod of the pool and its status write took the API server's CPU
    // from the claims. The status catches up once they pause.
    if let Some(wait) = ctx.refill_wait(&pool_key(&namespace_of(pool), &pool.name_any())) {
        return Ok(Action::requeue(wait));
    }

    let mut by_node: BTreeMap<String, Vec<Pod>> = BTreeMap::new();
    for pod in unclaimed_pods(pool, &pods).await? {
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let node = pod_node(&pod);
        if crate::sandbox::pod_ended(&pod).is_some() || node.is_none() {
            // An ended warm Pod serves nobody; one without a node is not ours to keep.
            delete_pod(&pods, &pod).await?;
            continue;
        }
        by_node
            .entry(node.unwrap_or_default())
            .or_default()
            .push(pod);
    }

    let explicit = !pool.spec.node_names.is_empty();
    let mut ready_by_node = BTreeMap::new();
    let (mut ready_total, mut starting_total, mut short) = (0u32, 0u32, false);
    for node in &nodes {
        let mut kept = by_node.remove(node).unwrap_or_default();
        // The extra ones go, those not ready first.
        kept.sort_by_key(|pod| !is_claimable(pod));
        for pod in kept.split_off(wanted.min(kept.len())) {
            delete_pod(&pods, &pod).await?;
        }
        // A few at a time: a node starting many Pods at once has little CPU
        // left for the forks that just claimed them.
        let starting = kept.iter().filter(|pod| !is_claimable(pod)).count();
        let missing = wanted.saturating_sub(kept.len());
        let startable = missing.min(MAX_STARTING_PER_NODE.saturating_sub(starting));
        for _ in 0..startable {
            let made = warm_pod(pool, node, &ctx.settings.vmm_image).map_err(Error::Permanent)?;
            kept.push(pods.create(&PostParams::default(), &made).await?);
        }
        let ready = kept.iter().filter(|pod| is_claimable(pod)).count() as u32;
        short |= (ready as usize) < wanted;
        ready_total += ready;
        starting_total += kept.len() as u32 - ready;
        ready_by_node.insert(node.clone(), ready);
    }
    // Pods on nodes the pool no longer names go; those on a node whose
    // agent is away stay (it may be restarting) and are not counted.
    for pod in by_node.into_values().flatten() {
        if explicit {
            delete_pod(&pods, &pod).await?;
        }
    }

    update.status.ready_pods = ready_total;
    update.status.starting_pods = starting_total;
    update.status.ready_by_node = ready_by_node;
    let (ready, why, message) = if nodes.is_empty() {
        (
            false,
            reason::NO_NODES,
            "no node with a ready Sandfork agent to keep warm Pods on".to_string(),
        )
    } else if short {
        (
            false,
            reason::FILLING,
            format!(
                "{ready_total} of {} warm Pods ready on {} nodes",
                wanted * nodes.len(),
                nodes.len()
            ),
        )
    } else {
        (
            true,
            reason::PODS_READY,
            format!("{ready_total} warm Pods ready on {} nodes", nodes.len()),
        )
    };
    update.set_conditions(&[Cond::new(conditions::READY, ready, why, message)]);
    update.write(ctx).await?;
    Ok(if ready {
        Action::requeue(ctx.settings.resync)
    } else {
        // Pod changes trigger passes; this is a backstop (and finds new agents).
        Action::requeue(ctx.settings.poll * 5)
    })
}

/// How a pool is known in the context's claim records.
fn pool_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// The nodes the pool keeps Pods on: those it names, else every node whose
/// agent is ready.
fn served_nodes(
    pool: &SandboxWarmPool,
    ctx: &Context,
    now: k8s_openapi::jiff::Timestamp,
) -> Vec<String> {
    if !pool.spec.node_names.is_empty() {
        let mut nodes = pool.spec.node_names.clone();
        nodes.sort();
        nodes.dedup();
        return nodes;
    }
    ctx.agents
        .all()
        .into_iter()
        .filter(|agent| agent.is_ready(now))
        .map(|agent| agent.node)
        .collect()
}

/// The node a warm Pod is for: where it is bound, else the node its
/// affinity requires.
fn pod_node(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if let Some(node) = spec.node_name.clone().filter(|n| !n.is_empty()) {
        return Some(node);
    }
    let terms = &spec
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms;
    terms
        .iter()
        .flat_map(|term| term.match_fields.iter().flatten())
        .find(|field| field.key == "metadata.name" && field.operator == "In")
        .and_then(|field| field.values.as_ref()?.first().cloned())
}

fn controlled_by(pod: &Pod, uid: &str) -> bool {
    pod.owner_references()
        .iter()
        .any(|owner| owner.controller == Some(true) && owner.uid == uid)
}

/// Whether a warm Pod can be claimed now: running, its VMM answering (the
/// Pod is Ready only once its startup probe reached the VMM), not going away.
pub fn is_claimable(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && crate::sandbox::vmm_running(pod)
        && crate::sandbox::pod_condition(pod, "Ready").is_some_and(|c| c.status == "True")
}

/// Deletes `pod` as the pool saw it: one claimed (or changed) since is not
/// deleted (409), and the next pass looks at it again.
pub(crate) async fn delete_pod(pods: &Api<Pod>, pod: &Pod) -> Result<()> {
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: pod.uid(),
            resource_version: pod.resource_version(),
        }),
        ..DeleteParams::default()
    };
    match pods.delete(&pod.name_any(), &params).await {
        Ok(_) => Ok(()),
        Err(err) if is_not_found(&err) => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// A claimed Pod as the Event of its VM's start names it.
pub fn claimed_pod_note(pod: &Pod) -> String {
    format!(
        "warm Pod {} of SandboxWarmPool {}",
        pod.name_any(),
        pod.labels()
            .get(labels::WARM_POOL)
            .map(String::as_str)
            .unwrap_or_default(),
    )
}

/// Whether a Sandbox with `spec` can run in a warm Pod: a built-in guest (a
/// guest image is a volume of its own Pod) and no scheduling wish beyond its
/// node. Its resources are compared Pod by Pod.
fn may_use_warm_pod(sandbox: &Sandbox) -> bool {
    let spec = &sandbox.spec;
    spec.guest.image.is_none()
        && spec.node_selector.as_ref().is_none_or(|s| s.is_empty())
        && spec.affinity.is_none()
        && spec.priority_class_name.is_none()
}

/// Claims a ready warm Pod of `sandbox`'s size class (on its node, if it
/// names one) for it; `None` when there is none to take.
pub async fn claim(ctx: &Context, sandbox: &Sandbox, uid: &str) -> Result<Option<Pod>> {
    if !may_use_warm_pod(sandbox) {
        return Ok(None);
    }
    let Ok(resources) = pod::resources(&sandbox.spec) else {
        return Ok(None);
    };
    let namespace = sandbox.namespace().unwrap_or_default();
    let mut candidates: Vec<_> = ctx
        .caches
        .pods
        .state()
        .into_iter()
        .filter(|pod| {
            pod.namespace().as_deref() == Some(namespace.as_str())
                && pod.labels().contains_key(labels::WARM_POOL)
                && !pod.labels().contains_key(labels::SANDBOX_UID)
                && pod
                    .owner_references()
                    .iter()
                    .any(|o| o.controller == Some(true) && o.kind == "SandboxWarmPool")
                && is_claimable(pod)
                && sandbox
                    .spec
                    .node_name
                    .as_deref()
                    .is_none_or(|node| pod_node(pod).as_deref() == Some(node))
                && pod
                    .spec
                    .as_ref()
                    .and_then(|spec| spec.containers.first())
                    .and_then(|c| c.resources.as_ref())
                    == Some(&resources)
        })
        .collect();
    if candidates.is_empty() {
        return Ok(None);
    }
    // Concurrent claims (a SandboxBranch's branches) start at different Pods.
    candidates.sort_by_key(|pod| pod.name_any());
    let start = {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        uid.hash(&mut hasher);
        hasher.finish() as usize % candidates.len()
    };
    candidates.rotate_left(start);
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &namespace);
    let owner = crate::pod::owner_reference(sandbox).map_err(Error::Permanent)?;
    let mut attempts = 0;
    for pod in candidates {
        let pod_uid = pod.uid().unwrap_or_default();
        if !ctx.reserve_warm_pod(&pod_uid, CLAIM_MEMORY) {
            continue;
        }
        attempts += 1;
        let patch = json!({
            "metadata": {
                "resourceVersion": pod.resource_version(),
                "labels": {
                    labels::SANDBOX: sandbox.name_any(),
                    labels::SANDBOX_UID: uid,
                },
                "ownerReferences": [owner],
            }
        });
        let started = Instant::now();
        match pods
            .patch(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(claimed) => {
                ctx.record_claim(uid, &claimed.name_any(), CLAIM_MEMORY);
                if let Some(pool) = claimed.labels().get(labels::WARM_POOL) {
                    ctx.note_pool_claim(&pool_key(&namespace, pool));
                }
                tracing::info!(
                    pod = claimed.name_any(),
                    patch_ms = started.elapsed().as_secs_f64() * 1e3,
                    "claimed a warm Pod"
                );
                return Ok(Some(claimed));
            }
            // Claimed, changed or deleted since the cache saw it: another one.
            Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => {
                tracing::debug!(pod = pod.name_any(), code = status.code, "warm Pod taken");
            }
            Err(err) => return Err(err.into()),
        }
        if attempts == CLAIM_ATTEMPTS {
            break;
        }
    }
    Ok(None)
}
