//! The fan-out benchmark: one SandboxBranch with many branches of one
//! source, timed from its create request until a watch shows it Ready, with
//! the memory the node gained. The branches claim warm Pods of a
//! SandboxWarmPool made for them; beside it, in the same run, the same
//! SandboxBranch with no warm Pods (a Pod made for each branch), and the
//! same number of plain Pods of the sandbox image created at once (Pod
//! start-up alone).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams, WatchEvent, WatchParams};
use sandfork_api::conditions::{self, FAILED, READY};
use sandfork_api::warmpool::PodSource;
use sandfork_api::{SandboxWarmPool, labels, pod};
use serde_json::json;

use crate::bench::{number_between, percentile, plain_pod, round, watch_from_now};
use crate::wait::{self, Look};
use crate::{Env, objects, pods, process};

/// What to measure.
#[derive(Clone, Debug)]
pub struct Options {
    pub branches: u32,
    pub memory_mib: u64,
    /// The source's built-in guest.
    pub guest: String,
    /// Each branch Pod's memory request for its guest (MiB).
    pub branch_memory_request_mib: u64,
}

/// CPU the source (and so each branch) requests: small, so that the
/// branches fit the node's CPU; they are limited to their vCPU.
const CPU_REQUEST: &str = "10m";
/// Longest wait for all branches, or all plain Pods.
const ALL_READY: Duration = Duration::from_secs(600);
const MIB: f64 = (1 << 20) as f64;
/// What the agent's and the VMMs' command lines say.
const AGENT: &str = "serve";
const VMM: &str = "vm-host";

/// Runs the fan-out in namespace `ns`; returns the benchmark's JSON.
pub async fn run(env: &Env, ns: &str, options: &Options) -> anyhow::Result<serde_json::Value> {
    let client = env.client();
    let spec = json!({
        "guest": {"builtin": options.guest},
        "memoryMiB": options.memory_mib,
        "vcpus": 1,
        "resources": {"cpuRequest": CPU_REQUEST},
    });
    objects::create_sandbox(env, ns, "source", spec).await?;
    let source = objects::sandbox_ready(env, ns, "source", Duration::from_secs(300)).await?;
    let (node, _) = objects::placement(&source)?;
    let agent = pods::agent_on(&client, &env.namespace, &node)
        .await?
        .with_context(|| format!("no agent Pod on {node}"))?;
    let agent_uid = pods::uid(&agent);
    eprintln!(
        "bench: source ({} MiB, {}) Ready on {node}",
        options.memory_mib, options.guest
    );
    // Settled: the source's boot and the agent's start-up are behind.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let source_pod_uid = pod_uid(env, ns, "source").await?;

    // The cold path first: no warm Pod, every branch's Pod is made for it.
    let branches = objects::branches(env, ns);
    let (cold_ms, _, cold_timeline) = fan_out(env, ns, "cold", options).await?;
    eprintln!(
        "bench: {} branches in Pods made for them Ready after {cold_ms:.1} ms",
        options.branches
    );
    branches.delete("cold", &DeleteParams::default()).await?;
    gone(env, ns, &format!("{}=cold", labels::BRANCH)).await?;

    // Then the warm path: a pool of as many warm Pods on the node.
    let filled = Instant::now();
    warm_pool(env, ns, &node, options).await?;
    let pool_filled_ms = filled.elapsed().as_secs_f64() * 1e3;
    eprintln!(
        "bench: {} warm Pods ready after {pool_filled_ms:.0} ms",
        options.branches
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let agent_before = pod_memory(&agent_uid, AGENT)?;
    let source_before = pod_memory(&source_pod_uid, VMM)?;
    let requests_before = api_requests(env).await?;
    let (all_ready_ms, status, timeline) = fan_out(env, ns, "fan-out", options).await?;
    let requests = requests_during(&requests_before, &api_requests(env).await?);
    // No refill: the measurement below is of the branches alone.
    Api::<SandboxWarmPool>::namespaced(env.client(), ns)
        .delete(WARM_POOL, &DeleteParams::default())
        .await?;
    let warm_branches = status
        .branches
        .iter()
        .filter(|b| b.pod_source == Some(PodSource::Warm))
        .count();
    eprintln!(
        "bench: {} branches Ready after {all_ready_ms:.1} ms ({warm_branches} in warm Pods)",
        options.branches
    );

    // The live capture's copy completes in the background; its pages are
    // part of what the node holds for the fork.
    wait::until(
        "the capture's copy to complete",
        Duration::from_secs(120),
        || async {
            let capture = branches
                .get("fan-out")
                .await?
                .status
                .and_then(|s| s.capture);
            Ok(
                match capture.as_ref().and_then(|c| c.copy_duration_millis) {
                    Some(_) => Look::Done(()),
                    None => Look::NotYet(format!("{capture:?}")),
                },
            )
        },
    )
    .await?;
    let restore_calls = restore_calls_ms(env, ns, "fan-out").await?;
    let branch_pod_uids = branch_pod_uids(env, ns).await?;
    let guest_bytes = options.memory_mib << 20;
    let mut written = 0u64;
    let mut branch_pods = 0u64;
    for uid in &branch_pod_uids {
        let pid = process::process_in_pod(uid, VMM)
            .with_context(|| format!("no VMM in branch Pod {uid}"))?;
        written += process::private_bytes_in_mappings_of_size(pid, guest_bytes).unwrap_or(0);
        branch_pods += process::cgroup_memory_usage(pid).unwrap_or(0);
    }
    let agent_after = pod_memory(&agent_uid, AGENT)?;
    let source_after = pod_memory(&source_pod_uid, VMM)?;
    let count = branch_pod_uids.len().max(1) as f64;
    let added =
        (agent_after + source_after + branch_pods) as f64 - (agent_before + source_before) as f64;
    let branch_pods_mib = branch_pods as f64 / MIB;
    let written_mib = written as f64 / MIB;
    let fixed_per_branch_mib = (branch_pods_mib - written_mib) / count;

    // The baseline: as many plain Pods at once, on the same node.
    branches.delete("fan-out", &DeleteParams::default()).await?;
    gone(env, ns, &format!("{}=fan-out", labels::BRANCH)).await?;
    let plain_ms = plain_pods_all_running_ms(env, ns, &node, options.branches).await?;
    eprintln!(
        "bench: {} plain Pods all running after {plain_ms:.1} ms",
        options.branches
    );

    Ok(json!({
        "branches": options.branches,
        "memory_mib": options.memory_mib,
        "guest": options.guest,
        "node": node,
        "branch_memory_request_mib": options.branch_memory_request_mib,
        "all_ready_ms": round(all_ready_ms),
        "warm_branches": warm_branches,
        "cold_all_ready_ms": round(cold_ms),
        "warm_pool_filled_ms": round(pool_filled_ms),
        "plain_pods_all_running_ms": round(plain_ms),
        "all_ready_over_plain_pods_ratio": (plain_ms > 0.0).then(|| (all_ready_ms / plain_ms * 100.0).round() / 100.0),
        "capture_pause_us": status.capture.as_ref().map(|c| c.pause_micros),
        "node_memory_added_mib": round(added / MIB),
        "capture_memory_added_mib": round((agent_after as f64 - agent_before as f64) / MIB),
        "branch_pods_memory_mib": round(branch_pods_mib),
        "branch_written_mib": round(written_mib),
        "fixed_per_branch_mib": round(fixed_per_branch_mib),
        "full_copies_mib": options.branches as u64 * options.memory_mib,
        "timeline": timeline.to_json(),
        "api_requests": requests,
        "restore_call_ms_p50": round(percentile(&restore_calls, 50.0)),
        "restore_call_ms_max": round(percentile(&restore_calls, 100.0)),
        "cold_timeline": cold_timeline.to_json(),
    }))
}

/// Name of the bench's SandboxWarmPool.
const WARM_POOL: &str = "fan-out";

/// Makes a SandboxWarmPool of the branches' size class with one warm Pod
/// per branch on `node`, and waits until all are ready.
async fn warm_pool(env: &Env, ns: &str, node: &str, options: &Options) -> anyhow::Result<()> {
    let pool: SandboxWarmPool = serde_json::from_value(json!({
        "apiVersion": "sandfork.dev/v1alpha1",
        "kind": "SandboxWarmPool",
        "metadata": {"name": WARM_POOL, "namespace": ns},
        "spec": {
            "podsPerNode": options.branches,
            "memoryMiB": options.memory_mib,
            "vcpus": 1,
            "resources": {
                "cpuRequest": CPU_REQUEST,
                "memoryRequestMiB": options.branch_memory_request_mib,
            },
            "nodeNames": [node],
        },
    }))?;
    let pools: Api<SandboxWarmPool> = Api::namespaced(env.client(), ns);
    pools.create(&PostParams::default(), &pool).await?;
    wait::until("the warm Pods to be ready", ALL_READY, || async {
        let status = pools.get(WARM_POOL).await?.status.unwrap_or_default();
        Ok(if status.ready_pods >= options.branches {
            Look::Done(())
        } else {
            Look::NotYet(format!("{status:?}"))
        })
    })
    .await
}

/// When each step of a fan-out was first seen through the watches, in ms
/// after its create request was sent: the SandboxBranch's capture, and each
/// branch Sandbox's creation, node and `Ready`.
#[derive(Debug, Default)]
pub struct Timeline {
    pub captured_ms: Option<f64>,
    pub created_ms: Vec<f64>,
    pub bound_ms: Vec<f64>,
    pub ready_ms: Vec<f64>,
}

impl Timeline {
    /// The first, median and last of each branch step, for the JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let spread = |values: &[f64]| {
            json!({
                "first": round(percentile(values, 0.0)),
                "p50": round(percentile(values, 50.0)),
                "last": round(percentile(values, 100.0)),
            })
        };
        json!({
            "captured_ms": self.captured_ms.map(round),
            "branch_created_ms": spread(&self.created_ms),
            "branch_bound_ms": spread(&self.bound_ms),
            "branch_ready_ms": spread(&self.ready_ms),
        })
    }
}

/// One change seen by the fan-out's watches.
enum Seen {
    Branch(Box<sandfork_api::SandboxBranch>),
    Sandbox(Box<sandfork_api::Sandbox>),
}

/// The objects `watch` shows added or changed, each as `seen` makes it.
fn changes<K>(
    watch: impl Stream<Item = kube::Result<WatchEvent<K>>>,
    seen: fn(K) -> Seen,
) -> impl Stream<Item = kube::Result<Seen>> {
    watch.filter_map(move |event| async move {
        match event {
            Ok(WatchEvent::Added(object) | WatchEvent::Modified(object)) => Some(Ok(seen(object))),
            Ok(_) => None,
            Err(err) => Some(Err(err)),
        }
    })
}

/// Applies SandboxBranch `name` of `options.branches` branches of `source`
/// and times it until a watch shows it Ready; returns that, its status and
/// the timeline of its branches.
async fn fan_out(
    env: &Env,
    ns: &str,
    name: &str,
    options: &Options,
) -> anyhow::Result<(f64, sandfork_api::SandboxBranchStatus, Timeline)> {
    let branches = objects::branches(env, ns);
    let by_name = format!("metadata.name={name}");
    let branch_watch = watch_from_now(
        &branches,
        &ListParams::default().fields(&by_name),
        &WatchParams::default().fields(&by_name),
    )
    .await?;
    let by_owner = format!("{}={name}", labels::BRANCH);
    let sandboxes = objects::sandboxes(env, ns);
    let sandbox_watch = watch_from_now(
        &sandboxes,
        &ListParams::default().labels(&by_owner),
        &WatchParams::default().labels(&by_owner),
    )
    .await?;
    let mut watch = futures::stream::select(
        changes(branch_watch, |branch| Seen::Branch(Box::new(branch))).boxed(),
        changes(sandbox_watch, |sandbox| Seen::Sandbox(Box::new(sandbox))).boxed(),
    );
    let spec = json!({
        "sourceRef": {"name": "source"},
        "branches": options.branches,
        "branchMemoryRequestMiB": options.branch_memory_request_mib,
        "deletionPolicy": "Delete",
        "failureDeadline": "10m",
    });
    let started = Instant::now();
    objects::create_branch(env, ns, name, spec).await?;
    let at = || started.elapsed().as_secs_f64() * 1e3;
    let mut timeline = Timeline::default();
    let (mut created, mut bound, mut ready) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    tokio::time::timeout(ALL_READY, async {
        while let Some(seen) = watch.next().await {
            match seen? {
                Seen::Sandbox(sandbox) => {
                    let sandbox_name = sandbox.name_any();
                    if created.insert(sandbox_name.clone()) {
                        timeline.created_ms.push(at());
                    }
                    if sandbox.node().is_some() && bound.insert(sandbox_name.clone()) {
                        timeline.bound_ms.push(at());
                    }
                    if sandbox.is_ready() && ready.insert(sandbox_name) {
                        timeline.ready_ms.push(at());
                    }
                }
                Seen::Branch(branch) => {
                    let status = branch.status.clone().unwrap_or_default();
                    if status.capture.is_some() && timeline.captured_ms.is_none() {
                        timeline.captured_ms = Some(at());
                    }
                    if conditions::is_true(&status.conditions, FAILED) {
                        bail!("SandboxBranch {name} failed: {:?}", status.error);
                    }
                    if conditions::is_true(&status.conditions, READY) {
                        return anyhow::Ok((at(), status));
                    }
                }
            }
        }
        bail!("the watches of SandboxBranch {name} ended")
    })
    .await
    .context("the branches were not all Ready in time")?
    .map(|(ms, status)| (ms, status, timeline))
}

/// The API server's request counts so far, by `VERB resource`, with the
/// code when it is not a success (`apiserver_request_total`, summed over
/// the other labels).
async fn api_requests(env: &Env) -> anyhow::Result<BTreeMap<String, f64>> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = env.client().request_text(request).await?;
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        let Some(labels) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = labels.rsplit_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|pair| pair.strip_prefix(&format!("{name}=\"")))
                .map(|value| value.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let code = label("code");
        let mut key = format!("{} {}", label("verb"), label("resource"));
        if !code.starts_with('2') {
            key = format!("{key} {code}");
        }
        *counts.entry(key).or_insert(0.0) += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    Ok(counts)
}

/// The requests between two counts, those of more than 0, with their total.
fn requests_during(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> serde_json::Value {
    let during: Vec<(String, f64)> = after
        .iter()
        .map(|(key, count)| (key.clone(), count - before.get(key).copied().unwrap_or(0.0)))
        .filter(|(_, count)| *count > 0.0)
        .collect();
    let total: f64 = during.iter().map(|(_, count)| count).sum();
    let mut out = serde_json::Map::new();
    out.insert("total".into(), json!(total));
    for (key, count) in during {
        out.insert(key, json!(count));
    }
    serde_json::Value::Object(out)
}

/// The RestoreBranch calls of the branches of SandboxBranch `name`, as the
/// operator timed them (its `Restored` Events), in ms.
async fn restore_calls_ms(env: &Env, ns: &str, name: &str) -> anyhow::Result<Vec<f64>> {
    let prefix = format!("{name}-");
    let events: Api<Event> = Api::namespaced(env.client(), ns);
    Ok(events
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|event| event.reason.as_deref() == Some("Restored"))
        .filter(|event| {
            event
                .regarding
                .as_ref()
                .and_then(|about| about.name.as_deref())
                .is_some_and(|about| about.starts_with(&prefix))
        })
        .filter_map(|event| number_between(event.note.as_deref()?, " in ", " ms"))
        .collect())
}

/// Memory charged to the cgroup of the process mentioning `program` in the
/// Pod with UID `uid`.
fn pod_memory(uid: &str, program: &str) -> anyhow::Result<u64> {
    process::process_in_pod(uid, program)
        .and_then(process::cgroup_memory_usage)
        .with_context(|| format!("no memory figure for {program} in Pod {uid}"))
}

async fn pod_uid(env: &Env, ns: &str, sandbox: &str) -> anyhow::Result<String> {
    let pod = pods::of_sandbox(&env.client(), ns, sandbox)
        .await?
        .with_context(|| format!("Sandbox {sandbox} has no Pod"))?;
    Ok(pods::uid(&pod))
}

/// The UIDs of the branch Sandboxes' Pods.
async fn branch_pod_uids(env: &Env, ns: &str) -> anyhow::Result<Vec<String>> {
    let selector = format!("{}=fan-out", labels::BRANCH);
    let sandboxes = objects::sandboxes(env, ns)
        .list(&ListParams::default().labels(&selector))
        .await?;
    let names: BTreeSet<String> = sandboxes
        .iter()
        .filter_map(|s| s.status.as_ref()?.pod.clone())
        .collect();
    let all = Api::<Pod>::namespaced(env.client(), ns)
        .list(&ListParams::default())
        .await?;
    Ok(all
        .into_iter()
        .filter(|p| names.contains(&p.name_any()))
        .map(|p| pods::uid(&p))
        .collect())
}

/// Waits until no Sandbox matching `selector` is left, nor its Pod.
async fn gone(env: &Env, ns: &str, selector: &str) -> anyhow::Result<()> {
    let sandboxes = objects::sandboxes(env, ns);
    let pods = Api::<Pod>::namespaced(env.client(), ns);
    wait::until(
        "the branches and their Pods to be gone",
        Duration::from_secs(300),
        || async {
            let left = sandboxes
                .list(&ListParams::default().labels(selector))
                .await?;
            let pods_left = pods
                .list(&ListParams::default().labels(&format!(
                    "{}={}",
                    labels::COMPONENT,
                    labels::COMPONENT_SANDBOX
                )))
                .await?
                .into_iter()
                .filter(|p| p.name_any() != pod::name("source"))
                .count();
            Ok(if left.items.is_empty() && pods_left == 0 {
                Look::Done(())
            } else {
                Look::NotYet(format!("{} Sandboxes, {pods_left} Pods", left.items.len()))
            })
        },
    )
    .await
}

/// `count` plain Pods of the sandbox image created at once on `node`,
/// timed until a watch has shown every one's container running; then deleted.
async fn plain_pods_all_running_ms(
    env: &Env,
    ns: &str,
    node: &str,
    count: u32,
) -> anyhow::Result<f64> {
    let api: Api<Pod> = Api::namespaced(env.client(), ns);
    let selector = "sandfork.dev/bench=plain";
    let mut watch = watch_from_now(
        &api,
        &ListParams::default().labels(selector),
        &WatchParams::default().labels(selector),
    )
    .await?
    .boxed();
    let started = Instant::now();
    for index in 0..count {
        let pod = plain_pod(
            &format!("plain-{index}"),
            node,
            json!({"sandfork.dev/bench": "plain"}),
        )?;
        api.create(&PostParams::default(), &pod).await?;
    }
    let mut running = BTreeSet::new();
    let all_running = tokio::time::timeout(ALL_READY, async {
        while let Some(event) = watch.next().await {
            if let WatchEvent::Modified(pod) = event? {
                let up = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .is_some_and(|c| {
                        c.iter()
                            .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
                    });
                if up {
                    running.insert(pod.name_any());
                    if running.len() == count as usize {
                        return anyhow::Ok(started.elapsed().as_secs_f64() * 1e3);
                    }
                }
            }
        }
        bail!("the watch of the plain Pods ended")
    })
    .await
    .context("the plain Pods were not all running in time")??;
    api.delete_collection(
        &DeleteParams::default().grace_period(0),
        &ListParams::default().labels(selector),
    )
    .await?;
    Ok(all_running)
}
