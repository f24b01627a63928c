//! The fork benchmark of `sandfork-e2e-bench`: SandboxBranches of one
//! running Sandbox made through the API server, one at a time, each timed
//! from its create request to the watch event that shows it `Ready`.
//!
//! Besides that number, each fork records when each step of the operator's
//! work became visible (through watches of the SandboxBranch and of its
//! branch Sandbox, started before the create request), the times of the
//! operator's Events, and the durations of the agent calls the operator
//! reports in them; the steps' medians are the breakdown.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::{Resource, ResourceExt};
use sandfork_api::agent::v1 as pb;
use sandfork_api::conditions::{self, FAILED, PROGRESSING, READY};
use sandfork_api::warmpool::PodSource;
use sandfork_api::{Sandbox, SandboxBranch, SandboxWarmPool, labels};
use serde::Serialize;
use serde_json::json;

use crate::Env;
use crate::objects;
use crate::wait::{self, Look};

/// How long one fork may take to become Ready.
pub const FORK_READY: Duration = Duration::from_secs(120);
/// How long a deleted fork may take to be gone from the agent.
pub const FORK_GONE: Duration = Duration::from_secs(120);
/// The finalizer the operator puts on both kinds.
const FINALIZER: &str = "sandfork.dev/cleanup";

/// How a SandboxBranch captures its source (`spec.mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Mode {
    Live,
    StopAndCopy,
}

/// A step of a fork, in the order the operator takes them; each is
/// recorded when a watch first shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// The create request returned.
    Created,
    /// The SandboxBranch carries the operator's finalizer.
    BranchFinalizer,
    /// Its `Progressing` condition says `Capturing`.
    Capturing,
    /// Its status has the capture's figures.
    Captured,
    /// The branch Sandbox exists.
    SandboxCreated,
    /// The branch Sandbox carries the operator's finalizer.
    SandboxFinalizer,
    /// The branch Sandbox's status names its node.
    SandboxBound,
    /// The branch Sandbox is `Ready`.
    SandboxReady,
    /// The SandboxBranch is `Ready`.
    Ready,
}

impl Step {
    pub const ALL: [Step; 9] = [
        Step::Created,
        Step::BranchFinalizer,
        Step::Capturing,
        Step::Captured,
        Step::SandboxCreated,
        Step::SandboxFinalizer,
        Step::SandboxBound,
        Step::SandboxReady,
        Step::Ready,
    ];

    /// The name of the interval that ends with this step (it starts with
    /// the step seen before it).
    pub fn interval(self) -> &'static str {
        match self {
            Step::Created => "create_request",
            Step::BranchFinalizer => "to_branch_finalizer",
            Step::Capturing => "to_capturing",
            Step::Captured => "to_captured",
            Step::SandboxCreated => "to_sandbox_created",
            Step::SandboxFinalizer => "to_sandbox_finalizer",
            Step::SandboxBound => "to_sandbox_bound",
            Step::SandboxReady => "to_sandbox_ready",
            Step::Ready => "to_ready",
        }
    }
}

/// One fork, timed. Times are milliseconds after the create request was sent.
#[derive(Clone, Debug, Serialize)]
pub struct Fork {
    pub name: String,
    pub mode: Mode,
    /// Whether the branch got a warm Pod or one made for it.
    pub pod_source: Option<PodSource>,
    /// Until the watch delivered the SandboxBranch with `Ready=True`.
    pub apply_to_ready_ms: f64,
    /// When each step was first seen through the watches.
    pub seen_ms: BTreeMap<Step, f64>,
    /// The operator's Events about the SandboxBranch and its branch
    /// (`Kind/Reason`), by their eventTime (the operator's clock).
    pub events_ms: BTreeMap<String, f64>,
    /// The CaptureSandbox call, as the operator timed it (its Event).
    pub capture_call_ms: Option<f64>,
    /// The RestoreBranch call, as the operator timed it (its Event).
    pub restore_call_ms: Option<f64>,
    /// The pause of the source, from the SandboxBranch's status.
    pub pause_us: Option<u64>,
    /// The capture's copy, as the agent reports it once complete.
    pub copy_ms: Option<f64>,
    /// From the delete request until the SandboxBranch, its branch Sandbox
    /// and its capture were gone (the agent lists neither).
    pub teardown_ms: f64,
}

impl Fork {
    /// The length of each interval between consecutive steps seen (a step
    /// not seen is skipped: the next interval starts at the previous step).
    pub fn intervals(&self) -> BTreeMap<&'static str, f64> {
        let mut out = BTreeMap::new();
        let mut last = 0.0;
        for step in Step::ALL {
            if let Some(&at) = self.seen_ms.get(&step) {
                out.insert(step.interval(), (at - last).max(0.0));
                last = at.max(last);
            }
        }
        out
    }
}

/// What the forks of one mode measured.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub p50: f64,
    pub p90: f64,
    pub samples: Vec<f64>,
    /// Median of each interval between the steps, and of the other figures
    /// of the forks (the medians do not add up to the median total).
    pub breakdown_p50: BTreeMap<String, f64>,
}

impl Summary {
    pub fn of(forks: &[Fork]) -> Option<Self> {
        if forks.is_empty() {
            return None;
        }
        let samples: Vec<f64> = forks.iter().map(|f| round(f.apply_to_ready_ms)).collect();
        let mut figures: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut add = |name: String, value: Option<f64>| {
            if let Some(value) = value {
                figures.entry(name).or_default().push(value);
            }
        };
        for fork in forks {
            for (name, value) in fork.intervals() {
                add(format!("step_{name}"), Some(value));
            }
            for (name, value) in &fork.events_ms {
                add(format!("event_{name}"), Some(*value));
            }
            add("capture_call".into(), fork.capture_call_ms);
            add("restore_call".into(), fork.restore_call_ms);
            add("capture_pause_us".into(), fork.pause_us.map(|v| v as f64));
            add("capture_copy".into(), fork.copy_ms);
            add("teardown".into(), Some(fork.teardown_ms));
        }
        Some(Self {
            p50: percentile(&samples, 50.0),
            p90: percentile(&samples, 90.0),
            samples,
            breakdown_p50: figures
                .into_iter()
                .map(|(name, values)| (name, round(percentile(&values, 50.0))))
                .collect(),
        })
    }
}

/// The nearest-rank percentile `p` (0..=100) of `values`; 0 when empty.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Rounded to 0.1.
pub fn round(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Creates Sandbox `name` running `guest` with `memory_mib` and waits until
/// it is Ready; returns (node, uid).
pub async fn start_source(
    env: &Env,
    ns: &str,
    name: &str,
    guest: &str,
    memory_mib: u64,
) -> anyhow::Result<(String, String)> {
    let spec = json!({"guest": {"builtin": guest}, "memoryMiB": memory_mib, "vcpus": 1});
    objects::create_sandbox(env, ns, name, spec).await?;
    let sandbox = objects::sandbox_ready(env, ns, name, FORK_READY).await?;
    objects::placement(&sandbox)
}

/// The image of the chart's sandbox Pods (the agent's), which the plain-Pod
/// baseline runs too, so both start the same image.
pub const SANDBOX_IMAGE: &str = "docker.io/sandfork/agent:0.1.0";

/// A plain Pod `name` of the sandbox image on `node` with `labels`: an
/// empty VMM that gets no sandbox.
pub(crate) fn plain_pod(
    name: &str,
    node: &str,
    labels: serde_json::Value,
) -> anyhow::Result<k8s_openapi::api::core::v1::Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0,
            "nodeSelector": {"kubernetes.io/hostname": node},
            "containers": [{
                "name": "plain",
                "image": SANDBOX_IMAGE,
                "imagePullPolicy": "IfNotPresent",
                "command": ["/sandfork-agent", "vm-host", "--dir", "/tmp"],
            }],
        },
    }))?)
}

/// Pod start-up on `node`, as a baseline for the cold path: a plain Pod of
/// the sandbox image (doing nothing: an empty VMM that gets no sandbox),
/// timed from its creation until a watch shows its container running.
pub async fn plain_pod_start_ms(
    env: &Env,
    ns: &str,
    node: &str,
    name: &str,
) -> anyhow::Result<f64> {
    use k8s_openapi::api::core::v1::Pod;
    let api: Api<Pod> = Api::namespaced(env.client(), ns);
    let mut events = watch_named(&api, name).await?;
    let pod = plain_pod(name, node, json!({}))?;
    let started = Instant::now();
    api.create(&PostParams::default(), &pod).await?;
    let running = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(event) = events.next().await {
            if let WatchEvent::Modified(pod) = event? {
                let running = pod
                    .status
                    .and_then(|s| s.container_statuses)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()));
                if running {
                    return anyhow::Ok(ms(started));
                }
            }
        }
        bail!("the watch of Pod {name} ended")
    })
    .await
    .with_context(|| format!("Pod {name} did not run in 120 s"))??;
    api.delete(name, &DeleteParams::default().grace_period(0))
        .await?;
    Ok(running)
}

/// A new Sandbox on `node`, timed from its creation until a watch shows it
/// Ready: the cold path of a sandbox (its Pod's start-up, then the VM's
/// boot), then deleted.
pub async fn cold_sandbox_ms(
    env: &Env,
    ns: &str,
    node: &str,
    name: &str,
    guest: &str,
    memory_mib: u64,
) -> anyhow::Result<f64> {
    let api = objects::sandboxes(env, ns);
    let mut events = watch_named(&api, name).await?;
    let spec = json!({
        "guest": {"builtin": guest},
        "memoryMiB": memory_mib,
        "vcpus": 1,
        "nodeSelector": {"kubernetes.io/hostname": node},
    });
    let started = Instant::now();
    objects::create_sandbox(env, ns, name, spec).await?;
    let ready = tokio::time::timeout(FORK_READY, async {
        while let Some(event) = events.next().await {
            if let WatchEvent::Modified(sandbox) = event?
                && sandbox.is_ready()
            {
                return anyhow::Ok(ms(started));
            }
        }
        bail!("the watch of Sandbox {name} ended")
    })
    .await
    .with_context(|| format!("Sandbox {name} was not Ready in {FORK_READY:?}"))??;
    api.delete(name, &DeleteParams::default()).await?;
    Ok(ready)
}

/// How long a write takes, and how long until a watch delivers it:
/// `probes` patches of a ConfigMap in `ns`. Returns the medians (ms).
pub async fn watch_latency(env: &Env, ns: &str, probes: u32) -> anyhow::Result<(f64, f64)> {
    let api: Api<ConfigMap> = Api::namespaced(env.client(), ns);
    let name = "bench-watch-probe";
    let probe = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let created = api.create(&PostParams::default(), &probe).await?;
    let mut version = created.resource_version().unwrap_or_default();
    let params = WatchParams::default().fields(&format!("metadata.name={name}"));
    let (mut writes, mut deliveries) = (Vec::new(), Vec::new());
    for n in 0..probes {
        let mut watch = Box::pin(api.watch(&params, &version).await?);
        let sent = Instant::now();
        let patch = json!({"data": {"n": n.to_string()}});
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        writes.push(ms(sent));
        loop {
            let event = tokio::time::timeout(Duration::from_secs(30), watch.next())
                .await
                .context("no watch event for the probe within 30 s")?
                .context("the probe's watch ended")??;
            if let WatchEvent::Modified(map) = event {
                version = map.resource_version().unwrap_or_default();
                if map.data.and_then(|d| d.get("n").cloned()) == Some(n.to_string()) {
                    deliveries.push(ms(sent));
                    break;
                }
            }
        }
    }
    api.delete(name, &DeleteParams::default()).await?;
    Ok((
        round(percentile(&writes, 50.0)),
        round(percentile(&deliveries, 50.0)),
    ))
}

enum Seen {
    Branch(Box<SandboxBranch>),
    BranchGone,
    Sandbox(Box<Sandbox>),
}

/// A watch of object `name` of `api`, from now on (see `watch_from_now`).
async fn watch_named<K>(
    api: &Api<K>,
    name: &str,
) -> anyhow::Result<impl Stream<Item = kube::Result<WatchEvent<K>>> + use<K>>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + 'static,
{
    let fields = format!("metadata.name={name}");
    Ok(watch_from_now(
        api,
        &ListParams::default().fields(&fields),
        &WatchParams::default().fields(&fields),
    )
    .await?
    .boxed())
}

/// A watch of `api` restricted by `params`, from the current version, and
/// established (the API server answered) when this returns.
pub(crate) async fn watch_from_now<K>(
    api: &Api<K>,
    list: &ListParams,
    params: &WatchParams,
) -> anyhow::Result<impl Stream<Item = kube::Result<WatchEvent<K>>> + use<K>>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + 'static,
{
    let version = api
        .list_metadata(list)
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    Ok(api.watch(params, &version).await?)
}

/// Forks `source` once: a SandboxBranch `name` (1 branch, `mode`,
/// deletionPolicy Delete), timed until a watch shows it Ready; then deletes
/// it and waits until its branch and capture are gone from the agent on
/// `node`.
pub async fn fork(
    env: &Env,
    ns: &str,
    source: &str,
    node: &str,
    name: &str,
    mode: Mode,
    branch_memory_request_mib: Option<u64>,
) -> anyhow::Result<Fork> {
    let branches = objects::branches(env, ns);
    let sandboxes = objects::sandboxes(env, ns);
    let by_name = format!("metadata.name={name}");
    let by_owner = format!("{}={name}", labels::BRANCH);

    // Both watches answer before the clock starts.
    let branch_watch = watch_from_now(
        &branches,
        &ListParams::default().fields(&by_name),
        &WatchParams::default().fields(&by_name),
    )
    .await?
    .map(|event| {
        Ok(match event? {
            WatchEvent::Added(b) | WatchEvent::Modified(b) => Some(Seen::Branch(Box::new(b))),
            WatchEvent::Deleted(_) => Some(Seen::BranchGone),
            WatchEvent::Bookmark(_) => None,
            WatchEvent::Error(status) => bail!("watch of SandboxBranches: {status:?}"),
        })
    });
    let sandbox_watch = watch_from_now(
        &sandboxes,
        &ListParams::default().labels(&by_owner),
        &WatchParams::default().labels(&by_owner),
    )
    .await?
    .map(|event| {
        Ok(match event? {
            WatchEvent::Added(s) | WatchEvent::Modified(s) => Some(Seen::Sandbox(Box::new(s))),
            WatchEvent::Deleted(_) | WatchEvent::Bookmark(_) => None,
            WatchEvent::Error(status) => bail!("watch of Sandboxes: {status:?}"),
        })
    });
    let mut events = futures::stream::select(branch_watch.boxed(), sandbox_watch.boxed());

    let mode_name = match mode {
        Mode::Live => "Live",
        Mode::StopAndCopy => "StopAndCopy",
    };
    let mut spec = json!({
        "sourceRef": {"name": source},
        "branches": 1,
        "mode": mode_name,
        "deletionPolicy": "Delete",
    });
    if let Some(request) = branch_memory_request_mib {
        spec["branchMemoryRequestMiB"] = json!(request);
    }
    let started_wall = Timestamp::now();
    let started = Instant::now();
    let created = objects::create_branch(env, ns, name, spec).await?;
    let mut seen_ms = BTreeMap::from([(Step::Created, ms(started))]);
    let branch_uid = created.uid().context("a SandboxBranch without a UID")?;

    let mark = |step: Step, seen_ms: &mut BTreeMap<Step, f64>| {
        seen_ms.entry(step).or_insert_with(|| ms(started));
    };
    let deadline = tokio::time::Instant::now() + FORK_READY;
    let mut sandbox_uid = None;
    let (ready_ms, ready) = loop {
        let next = tokio::time::timeout_at(deadline, events.next())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "SandboxBranch {ns}/{name} not Ready within {FORK_READY:?}; seen: {seen_ms:?}"
                )
            })?
            .with_context(|| format!("the watches of {ns}/{name} ended"))??;
        match next {
            None => {}
            Some(Seen::BranchGone) => bail!("SandboxBranch {ns}/{name} was deleted"),
            Some(Seen::Sandbox(sandbox)) => {
                sandbox_uid = sandbox.uid();
                mark(Step::SandboxCreated, &mut seen_ms);
                if sandbox.finalizers().iter().any(|f| f == FINALIZER) {
                    mark(Step::SandboxFinalizer, &mut seen_ms);
                }
                if sandbox.node().is_some() {
                    mark(Step::SandboxBound, &mut seen_ms);
                }
                if sandbox.is_ready() {
                    mark(Step::SandboxReady, &mut seen_ms);
                }
            }
            Some(Seen::Branch(branch)) => {
                let status = branch.status.clone().unwrap_or_default();
                if branch.finalizers().iter().any(|f| f == FINALIZER) {
                    mark(Step::BranchFinalizer, &mut seen_ms);
                }
                if conditions::find(&status.conditions, PROGRESSING)
                    .is_some_and(|c| c.reason == "Capturing")
                {
                    mark(Step::Capturing, &mut seen_ms);
                }
                if status.capture.is_some() {
                    mark(Step::Captured, &mut seen_ms);
                }
                if conditions::is_true(&status.conditions, FAILED) {
                    let why = conditions::find(&status.conditions, FAILED)
                        .map(|c| format!("{}: {}", c.reason, c.message))
                        .unwrap_or_default();
                    bail!("SandboxBranch {ns}/{name} failed: {why}");
                }
                if conditions::is_true(&status.conditions, READY) {
                    let at = ms(started);
                    seen_ms.insert(Step::Ready, at);
                    break (at, branch);
                }
            }
        }
    };
    drop(events);

    let status = ready.status.clone().unwrap_or_default();
    let sandbox_name = status
        .branches
        .first()
        .map(|b| b.name.clone())
        .unwrap_or_else(|| format!("{name}-0"));
    let mut fork = Fork {
        name: name.to_string(),
        mode,
        pod_source: status.branches.first().and_then(|b| b.pod_source),
        apply_to_ready_ms: ready_ms,
        seen_ms,
        events_ms: BTreeMap::new(),
        capture_call_ms: None,
        restore_call_ms: None,
        pause_us: status.capture.as_ref().map(|c| c.pause_micros),
        copy_ms: None,
        teardown_ms: 0.0,
    };
    read_events(env, ns, &[name, &sandbox_name], started_wall, &mut fork).await?;

    // A live capture's copy goes on after the branch is Ready. Let it end
    // before the next fork, so that each fork starts from a quiet source
    // (the agent reports the copy's duration once it is complete).
    let agent = env.agent(node).await?;
    let stats = wait::until(
        &format!("the copy of capture {branch_uid} to complete"),
        FORK_GONE,
        || async {
            let capture = agent
                .clone()
                .get_capture(pb::GetCaptureRequest {
                    uid: branch_uid.clone(),
                })
                .await?
                .into_inner();
            let stats = capture.stats.unwrap_or_default();
            Ok(if stats.copy_ns > 0 {
                Look::Done(stats)
            } else {
                Look::NotYet(format!("{stats:?}"))
            })
        },
    )
    .await?;
    fork.copy_ms = Some(round(stats.copy_ns as f64 / 1e6));

    // Delete it and wait until the agent holds neither its branch nor its
    // capture (each capture holds the guest's memory).
    let deleting = Instant::now();
    branches.delete(name, &DeleteParams::default()).await?;
    let (branches, sandboxes, agent) = (&branches, &sandboxes, &agent);
    let (by_owner, branch_uid, sandbox_uid) = (&by_owner, &branch_uid, &sandbox_uid);
    wait::until(
        &format!("SandboxBranch {ns}/{name}, its branch and its capture to be gone"),
        FORK_GONE,
        || async move {
            let mut agent = agent.clone();
            let branch_left = branches.get_opt(name).await?.is_some();
            let sandboxes_left = sandboxes
                .list_metadata(&ListParams::default().labels(by_owner))
                .await?
                .items
                .len();
            let running = agent
                .list_sandboxes(pb::ListSandboxesRequest {})
                .await?
                .into_inner()
                .sandboxes;
            let vm_left = running.iter().any(|s| Some(&s.uid) == sandbox_uid.as_ref());
            let captures = agent
                .list_captures(pb::ListCapturesRequest {})
                .await?
                .into_inner()
                .captures;
            let capture_left = captures.iter().any(|c| &c.uid == branch_uid);
            Ok(
                if !branch_left && sandboxes_left == 0 && !vm_left && !capture_left {
                    Look::Done(())
                } else {
                    Look::NotYet(format!(
                        "SandboxBranch present: {branch_left}, branch Sandboxes: {sandboxes_left}, \
                         VM on the agent: {vm_left}, capture on the agent: {capture_left}"
                    ))
                },
            )
        },
    )
    .await?;
    fork.teardown_ms = ms(deleting);
    Ok(fork)
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct Options {
    /// Live forks.
    pub forks: u32,
    /// StopAndCopy forks, the baseline (0: none).
    pub baseline_forks: u32,
    pub memory_mib: u64,
    /// The source's built-in guest.
    pub guest: String,
}

/// What one run measured; [`Report::to_json`] is the benchmark's output.
#[derive(Clone, Debug)]
pub struct Report {
    pub options: Options,
    pub node: String,
    /// Medians of a write's round trip and of its delivery to a watch (ms).
    pub api_write_ms_p50: f64,
    pub watch_delivery_ms_p50: f64,
    /// Live forks whose branch is of the warm pool's size class (the
    /// default path: a warm Pod).
    pub live: Vec<Fork>,
    /// Live forks whose branch is of no pool's size class (a Pod made for it).
    pub cold: Vec<Fork>,
    pub stop_and_copy: Vec<Fork>,
    /// A plain Pod's start-up (ms), one per fork, in the same run.
    pub pod_start_ms: Vec<f64>,
    /// A new Sandbox's creation to Ready (ms): its Pod's start-up, then its boot.
    pub cold_sandbox_ms: Vec<f64>,
}

impl Report {
    /// One JSON object; `timelines` adds every fork's steps.
    pub fn to_json(&self, extra: serde_json::Value, timelines: bool) -> serde_json::Value {
        let live = Summary::of(&self.live);
        let cold = Summary::of(&self.cold);
        let baseline = Summary::of(&self.stop_and_copy);
        let in_warm_pods = self
            .live
            .iter()
            .filter(|f| f.pod_source == Some(PodSource::Warm))
            .count();
        let ratio = match (&live, &baseline) {
            (Some(live), Some(baseline)) if live.p50 > 0.0 => {
                Some((baseline.p50 / live.p50 * 100.0).round() / 100.0)
            }
            _ => None,
        };
        let mut out = json!({
            "forks": self.options.forks,
            "baseline_forks": self.options.baseline_forks,
            "memory_mib": self.options.memory_mib,
            "guest": self.options.guest,
            "node": self.node,
            "apply_to_ready_ms_p50": live.as_ref().map(|s| s.p50),
            "apply_to_ready_ms_p90": live.as_ref().map(|s| s.p90),
            "apply_to_ready_ms": live.as_ref().map(|s| s.samples.clone()).unwrap_or_default(),
            "warm_forks_in_warm_pods": in_warm_pods,
            "cold_apply_to_ready_ms_p50": cold.as_ref().map(|s| s.p50),
            "cold_apply_to_ready_ms_p90": cold.as_ref().map(|s| s.p90),
            "cold_apply_to_ready_ms": cold.as_ref().map(|s| s.samples.clone()).unwrap_or_default(),
            "cold_over_warm_p50_ratio": match (&live, &cold) {
                (Some(live), Some(cold)) if live.p50 > 0.0 => Some((cold.p50 / live.p50 * 100.0).round() / 100.0),
                _ => None,
            },
            "stop_and_copy_apply_to_ready_ms_p50": baseline.as_ref().map(|s| s.p50),
            "stop_and_copy_apply_to_ready_ms_p90": baseline.as_ref().map(|s| s.p90),
            "stop_and_copy_apply_to_ready_ms": baseline.as_ref().map(|s| s.samples.clone()).unwrap_or_default(),
            "stop_and_copy_to_live_p50_ratio": ratio,
            "api_write_ms_p50": self.api_write_ms_p50,
            "watch_delivery_ms_p50": self.watch_delivery_ms_p50,
            "pod_start_ms_p50": median(&self.pod_start_ms),
            "pod_start_ms_p90": p90(&self.pod_start_ms),
            "cold_sandbox_ready_ms_p50": median(&self.cold_sandbox_ms),
            "cold_sandbox_ready_ms_p90": p90(&self.cold_sandbox_ms),
            "breakdown_ms_p50": {
                "live": live.as_ref().map(|s| s.breakdown_p50.clone()),
                "cold": cold.as_ref().map(|s| s.breakdown_p50.clone()),
                "stop_and_copy": baseline.as_ref().map(|s| s.breakdown_p50.clone()),
            },
        });
        if let (Some(out), serde_json::Value::Object(extra)) = (out.as_object_mut(), extra) {
            out.extend(extra);
        }
        if timelines {
            out["timelines"] =
                json!({"live": self.live, "cold": self.cold, "stop_and_copy": self.stop_and_copy});
        }
        out
    }
}

fn median(samples: &[f64]) -> Option<f64> {
    (!samples.is_empty()).then(|| round(percentile(samples, 50.0)))
}

fn p90(samples: &[f64]) -> Option<f64> {
    (!samples.is_empty()).then(|| round(percentile(samples, 90.0)))
}

/// The whole benchmark in namespace `ns`: the watch probe, the source, then
/// the Live and StopAndCopy forks alternately (so that a change in the
/// machine's load falls on both).
pub async fn run(env: &Env, ns: &str, options: &Options) -> anyhow::Result<Report> {
    let (api_write_ms_p50, watch_delivery_ms_p50) = watch_latency(env, ns, 5).await?;
    eprintln!(
        "bench: a write takes {api_write_ms_p50} ms, a watch sees it after {watch_delivery_ms_p50} ms (medians)"
    );
    let started = Instant::now();
    let (node, uid) = start_source(env, ns, "source", &options.guest, options.memory_mib).await?;
    if options.guest == "Counter" {
        // Its first pass has written every page: all its memory is in use.
        objects::counter_reports(env, &node, &uid, 1, Duration::from_secs(600)).await?;
    }
    eprintln!(
        "bench: source Sandbox ({} MiB, {}) running on {node} after {:.1?}",
        options.memory_mib,
        options.guest,
        started.elapsed()
    );
    let mut report = Report {
        options: options.clone(),
        node: node.clone(),
        api_write_ms_p50,
        watch_delivery_ms_p50,
        live: Vec::new(),
        cold: Vec::new(),
        stop_and_copy: Vec::new(),
        pod_start_ms: Vec::new(),
        cold_sandbox_ms: Vec::new(),
    };
    warm_pool(env, ns, &node, options.memory_mib).await?;
    for i in 0..options.forks.max(options.baseline_forks) {
        for (mode, path, count, prefix) in [
            (Mode::Live, Path::Warm, options.forks, "live"),
            (Mode::Live, Path::Cold, options.forks, "cold"),
            (
                Mode::StopAndCopy,
                Path::Warm,
                options.baseline_forks,
                "stop-and-copy",
            ),
        ] {
            if i >= count {
                continue;
            }
            let request = match path {
                Path::Warm => {
                    warm_pod_ready(env, ns).await?;
                    Some(WARM_REQUEST_MIB)
                }
                Path::Cold => None,
            };
            let name = format!("{prefix}-{i}");
            let fork = fork(env, ns, "source", &node, &name, mode, request).await?;
            eprintln!(
                "bench: {mode:?} fork {}/{count} ({:?} Pod): Ready after {:.1} ms (captured at {}, branch Ready at {}; capture call {}, restore call {}); gone {:.0} ms after its deletion",
                i + 1,
                fork.pod_source,
                fork.apply_to_ready_ms,
                shown(fork.seen_ms.get(&Step::Captured).copied()),
                shown(fork.seen_ms.get(&Step::SandboxReady).copied()),
                shown(fork.capture_call_ms),
                shown(fork.restore_call_ms),
                fork.teardown_ms,
            );
            match (mode, path) {
                (Mode::Live, Path::Warm) => report.live.push(fork),
                (Mode::Live, Path::Cold) => report.cold.push(fork),
                (Mode::StopAndCopy, _) => report.stop_and_copy.push(fork),
            }
        }
        // The baselines of the cold path, between the forks.
        let pod_ms = plain_pod_start_ms(env, ns, &node, &format!("plain-{i}")).await?;
        let cold_ms = cold_sandbox_ms(
            env,
            ns,
            &node,
            &format!("cold-{i}"),
            &options.guest,
            options.memory_mib,
        )
        .await?;
        eprintln!(
            "bench: plain Pod running after {pod_ms:.1} ms; a new Sandbox Ready after {cold_ms:.1} ms"
        );
        report.pod_start_ms.push(pod_ms);
        report.cold_sandbox_ms.push(cold_ms);
    }
    Ok(report)
}

/// Which Pod a fork's branch is meant to get.
#[derive(Clone, Copy, Debug)]
enum Path {
    /// Of the warm pool's size class: a warm Pod (one is ready before it).
    Warm,
    /// Of no pool's size class: a Pod made for it.
    Cold,
}

/// The memory request of warm forks' branches for their guest (MiB): the
/// size class of the bench's SandboxWarmPool. Cold forks' branches request
/// the whole guest, which no pool offers.
const WARM_REQUEST_MIB: u64 = 32;
/// Name of the bench's SandboxWarmPool.
const WARM_POOL: &str = "bench";

/// Makes the SandboxWarmPool of warm forks: two Pods on `node`.
async fn warm_pool(env: &Env, ns: &str, node: &str, memory_mib: u64) -> anyhow::Result<()> {
    let pool: SandboxWarmPool = serde_json::from_value(json!({
        "apiVersion": "sandfork.dev/v1alpha1",
        "kind": "SandboxWarmPool",
        "metadata": {"name": WARM_POOL, "namespace": ns},
        "spec": {
            "podsPerNode": 2,
            "memoryMiB": memory_mib,
            "vcpus": 1,
            "resources": {"memoryRequestMiB": WARM_REQUEST_MIB},
            "nodeNames": [node],
        },
    }))?;
    Api::<SandboxWarmPool>::namespaced(env.client(), ns)
        .create(&PostParams::default(), &pool)
        .await?;
    Ok(())
}

/// Waits until the bench's pool has a warm Pod ready (refilled after the
/// previous fork's claim).
async fn warm_pod_ready(env: &Env, ns: &str) -> anyhow::Result<()> {
    let pools: Api<SandboxWarmPool> = Api::namespaced(env.client(), ns);
    wait::until("a warm Pod to be ready", FORK_READY, || async {
        let status = pools.get(WARM_POOL).await?.status.unwrap_or_default();
        Ok(if status.ready_pods > 0 {
            Look::Done(())
        } else {
            Look::NotYet(format!("{status:?}"))
        })
    })
    .await
}

fn shown(ms: Option<f64>) -> String {
    ms.map(|ms| format!("{ms:.1} ms"))
        .unwrap_or_else(|| "?".into())
}

/// Reads the operator's Events about `regarding` (the SandboxBranch and its
/// branch Sandbox) into `fork`: their times, and the call durations their
/// notes give.
async fn read_events(
    env: &Env,
    ns: &str,
    regarding: &[&str],
    started: Timestamp,
    fork: &mut Fork,
) -> anyhow::Result<()> {
    let events: Api<Event> = Api::namespaced(env.client(), ns);
    for event in events.list(&ListParams::default()).await?.items {
        let Some(about) = event.regarding.as_ref() else {
            continue;
        };
        let (Some(name), Some(kind)) = (about.name.as_deref(), about.kind.as_deref()) else {
            continue;
        };
        if !regarding.contains(&name) {
            continue;
        }
        let reason = event.reason.clone().unwrap_or_default();
        if let Some(time) = &event.event_time {
            let after = time.0.duration_since(started).as_secs_f64() * 1e3;
            fork.events_ms
                .entry(format!("{kind}/{reason}"))
                .or_insert(round(after));
        }
        let note = event.note.as_deref().unwrap_or_default();
        match reason.as_str() {
            "Captured" => fork.capture_call_ms = number_between(note, "call took ", " ms"),
            "Restored" => fork.restore_call_ms = number_between(note, " in ", " ms"),
            _ => {}
        }
    }
    Ok(())
}

/// The number in `text` after the last `before` and up to `after`.
pub(crate) fn number_between(text: &str, before: &str, after: &str) -> Option<f64> {
    let (_, rest) = text.rsplit_once(before)?;
    let (number, _) = rest.split_once(after)?;
    number.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), 10.0);
        assert_eq!(percentile(&values, 90.0), 18.0);
        assert_eq!(percentile(&values, 100.0), 20.0);
        assert_eq!(percentile(&[3.0], 50.0), 3.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn reads_call_durations_from_notes() {
        let captured = "captured Sandbox \"source\" on node node-a: paused 412 us, 1024 MiB copied in 350 ms (17 pages by the fault handler); call took 41 ms";
        assert_eq!(number_between(captured, "call took ", " ms"), Some(41.0));
        let restored = "restored on node node-a from SandboxBranch fork in 12.5 ms";
        assert_eq!(number_between(restored, " in ", " ms"), Some(12.5));
        assert_eq!(
            number_between("started on node node-a", " in ", " ms"),
            None
        );
    }

    #[test]
    fn intervals_skip_steps_not_seen() {
        let fork = Fork {
            name: "f".into(),
            mode: Mode::Live,
            pod_source: None,
            apply_to_ready_ms: 50.0,
            seen_ms: BTreeMap::from([
                (Step::Created, 5.0),
                (Step::Capturing, 12.0),
                (Step::Ready, 50.0),
            ]),
            events_ms: BTreeMap::new(),
            capture_call_ms: None,
            restore_call_ms: None,
            pause_us: None,
            copy_ms: None,
            teardown_ms: 0.0,
        };
        let intervals = fork.intervals();
        assert_eq!(intervals["create_request"], 5.0);
        assert_eq!(intervals["to_capturing"], 7.0);
        assert_eq!(intervals["to_ready"], 38.0);
        assert_eq!(intervals.len(), 3);
    }
}
