//! `SandboxWarmPool`: empty sandbox Pods kept started on each node, so that a
//! Sandbox or a branch of its size class claims one instead of waiting for
//! a new Pod to start.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::sandbox::{MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB, SandboxResources};

/// Most warm Pods a pool may keep per node.
pub const MAX_PODS_PER_NODE: u32 = 128;

/// Keeps `podsPerNode` empty sandbox Pods started and ready on each node
/// that runs a Sandfork agent, each with its VMM waiting for a guest. A
/// Sandbox of this namespace whose memory, vCPUs and resources are the
/// pool's (its size class), and which asks for no guest image and no
/// scheduling constraint beyond its node, takes one of them over: its VM
/// starts at once. A claimed Pod is replaced in the background. Pods cannot
/// move between namespaces, so a pool serves its own namespace only.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sandfork.dev",
    version = "v1alpha1",
    kind = "SandboxWarmPool",
    namespaced,
    status = "SandboxWarmPoolStatus",
    shortname = "swp",
    category = "sandfork",
    derive = "PartialEq",
    doc = "Empty sandbox Pods kept started on each node for Sandboxes of one size class to claim.",
    printcolumn(name = "Per-node", type_ = "integer", json_path = ".spec.podsPerNode"),
    printcolumn(
        name = "Memory",
        type_ = "integer",
        json_path = ".spec.memoryMiB",
        description = "guest memory in MiB"
    ),
    printcolumn(name = "vCPUs", type_ = "integer", json_path = ".spec.vcpus"),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyPods",
        description = "warm Pods ready to be claimed"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("!has(self.resources) || !has(self.resources.memoryRequestMiB) || self.resources.memoryRequestMiB <= self.memoryMiB").message("resources.memoryRequestMiB may be at most memoryMiB"))]
#[serde(rename_all = "camelCase")]
pub struct SandboxWarmPoolSpec {
    /// Warm Pods to keep ready on each node (0 keeps none).
    #[schemars(range(max = MAX_PODS_PER_NODE))]
    pub pods_per_node: u32,

    /// Guest memory of the size class, in MiB: a Sandbox with this
    /// `memoryMiB` (and the same `vcpus` and `resources`) claims these Pods.
    #[serde(rename = "memoryMiB")]
    #[schemars(range(min = MIN_MEMORY_MIB, max = MAX_MEMORY_MIB))]
    pub memory_mib: u64,

    /// vCPUs of the size class.
    #[serde(default = "default_vcpus")]
    #[schemars(range(min = 1, max = MAX_VCPUS))]
    pub vcpus: u32,

    /// The Pods' resources, as a Sandbox's `resources` says them; a Sandbox
    /// claims a Pod only if its own come to the same requests and limits.
    /// For branches: `memoryRequestMiB` as the SandboxBranch's
    /// `branchMemoryRequestMiB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<SandboxResources>,

    /// Nodes to keep Pods on (default: every node with a live agent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub node_names: Vec<String>,
}

fn default_vcpus() -> u32 {
    1
}

/// Observed state of a SandboxWarmPool.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SandboxWarmPoolStatus {
    /// `Ready`: every node it serves has `podsPerNode` warm Pods ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::conditions::schema")]
    pub conditions: Vec<Condition>,

    /// The generation the status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Warm Pods ready to be claimed, on all nodes.
    #[serde(default)]
    pub ready_pods: u32,

    /// Warm Pods made and not ready yet (being scheduled or started).
    #[serde(default)]
    pub starting_pods: u32,

    /// Ready warm Pods per node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ready_by_node: BTreeMap<String, u32>,
}

/// How a Sandbox got its Pod, as its status and its SandboxBranch's say.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodSource {
    /// A warm Pod of a SandboxWarmPool, already running.
    Warm,
    /// A Pod made for the Sandbox (no warm Pod of its size class was ready).
    Cold,
}
