//! `Sandbox`: a virtual machine running on one node.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Smallest guest memory a Sandbox may ask for, in MiB.
pub const MIN_MEMORY_MIB: u64 = 64;
/// Largest guest memory a Sandbox may ask for, in MiB (256 GiB).
pub const MAX_MEMORY_MIB: u64 = 262_144;
/// Most vCPUs a Sandbox may ask for.
pub const MAX_VCPUS: u32 = 64;

/// A virtual machine that runs on one node, started by the node's Sandfork
/// agent. The spec is immutable: delete and recreate a Sandbox to change it.
// Several `printcolumn`s each carry `type_`; clippy reads them as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sandfork.dev",
    version = "v1alpha1",
    kind = "Sandbox",
    namespaced,
    status = "SandboxStatus",
    shortname = "sbx",
    category = "sandfork",
    derive = "PartialEq",
    doc = "A KVM sandbox running on one node; branches of a running Sandbox are made with a SandboxBranch.",
    printcolumn(name = "Node", type_ = "string", json_path = ".status.node"),
    printcolumn(
        name = "Memory",
        type_ = "integer",
        json_path = ".spec.memoryMiB",
        description = "guest memory in MiB"
    ),
    printcolumn(name = "vCPUs", type_ = "integer", json_path = ".spec.vcpus"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Source",
        type_ = "string",
        json_path = ".status.origin.sourceSandbox",
        description = "the Sandbox this one was branched from"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("Sandbox spec is immutable; delete the Sandbox and create a new one"))]
#[x_kube(validation = Rule::new("!has(self.resources) || !has(self.resources.memoryRequestMiB) || self.resources.memoryRequestMiB <= self.memoryMiB").message("resources.memoryRequestMiB may be at most memoryMiB"))]
#[serde(rename_all = "camelCase")]
pub struct SandboxSpec {
    /// What the sandbox runs.
    pub guest: GuestSpec,

    /// Guest memory in MiB: 64 to 262144, a multiple of 2.
    #[serde(rename = "memoryMiB")]
    #[schemars(range(min = MIN_MEMORY_MIB, max = MAX_MEMORY_MIB), extend("multipleOf" = 2))]
    pub memory_mib: u64,

    /// Number of vCPUs: 1 to 64.
    #[serde(default = "default_vcpus")]
    #[schemars(range(min = 1, max = MAX_VCPUS))]
    pub vcpus: u32,

    /// Run only on a node whose labels contain all of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "label_map")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// The Sandbox's Pod must run on this node: it gets a required node
    /// affinity for it, and the scheduler still binds it (and accounts for
    /// what it asks). The operator sets it on the branches it creates (they
    /// run on their source's node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub node_name: Option<String>,

    /// Affinity of the Sandbox's Pod, as the scheduler reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// Tolerations of the Sandbox's Pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<Toleration>,

    /// PriorityClass of the Sandbox's Pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,

    /// What the Sandbox's Pod asks of its node beyond the guest's memory
    /// and vCPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<SandboxResources>,

    /// Start from a SandboxBranch's capture instead of booting the guest. Set
    /// by the operator on the Sandboxes a SandboxBranch creates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_from: Option<RestoreSource>,
}

/// What a Sandbox's Pod asks of its node. Its memory limit is the guest's
/// memory plus `overheadMiB`, and so is its request unless
/// `memoryRequestMiB` lowers it; its CPU limit is `vcpus` cores.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("!(has(self.cpuRequest) && has(self.guaranteedCpu) && self.guaranteedCpu)").message("set at most one of resources.cpuRequest and resources.guaranteedCpu: true"))]
#[serde(rename_all = "camelCase")]
pub struct SandboxResources {
    /// Memory for the VMM beyond the guest's, in MiB (default 64).
    #[serde(
        rename = "overheadMiB",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(max = crate::pod::MAX_OVERHEAD_MIB))]
    pub overhead_mib: Option<u64>,

    /// Guest memory the Pod requests, in MiB, at most `memoryMiB` (default:
    /// all of it); `overheadMiB` is added. The limit stays the whole guest.
    /// A branch shares its capture's memory and is charged only for the
    /// pages it writes, so its request can be what it is expected to write.
    /// Memory used beyond the request is what the kubelet evicts first under
    /// memory pressure.
    #[serde(
        rename = "memoryRequestMiB",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(max = MAX_MEMORY_MIB))]
    pub memory_request_mib: Option<u64>,

    /// CPU the Pod requests, e.g. `250m` (default 100m per vCPU); at most `vcpus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_request: Option<Quantity>,

    /// Request as much CPU as the limit (`vcpus` cores): with memory also
    /// requested at its limit, the Pod is of the Guaranteed QoS class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guaranteed_cpu: Option<bool>,
}

fn default_vcpus() -> u32 {
    1
}

/// A map of label keys to label values, bounded so that CEL rules over the
/// spec stay within the API server's cost budget.
fn label_map(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "nullable": true,
        "maxProperties": 32,
        "additionalProperties": {"type": "string", "maxLength": 63},
    })
}

/// The guest: exactly one of `builtin` or `image`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[x_kube(validation = Rule::new("has(self.builtin) != has(self.image)").message("set exactly one of guest.builtin and guest.image"))]
#[x_kube(validation = Rule::new("!has(self.dirty) || (has(self.builtin) && self.builtin == 'Dirty')").message("guest.dirty is only valid with guest.builtin: Dirty"))]
#[serde(rename_all = "camelCase")]
pub struct GuestSpec {
    /// A workload built into the agent: `Counter` increments a counter in
    /// every page, pass after pass; `Dirty` writes pages at a rate; `Idle` halts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<BuiltinWorkload>,

    /// Parameters of the `Dirty` workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty: Option<DirtySpec>,

    /// A container image that carries the guest: a flat 64-bit binary at
    /// `/guest` in the image (loaded at 1 MiB and entered there; port 0x3f8
    /// is its console, which the sandbox Pod's log shows). The sandbox Pod
    /// mounts it as an image volume, so any registry the node can pull from
    /// serves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: Option<String>,
}

impl GuestSpec {
    pub fn builtin(workload: BuiltinWorkload) -> Self {
        Self {
            builtin: Some(workload),
            ..Self::default()
        }
    }
}

/// A workload built into the agent.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuiltinWorkload {
    Counter,
    Dirty,
    Idle,
}

/// How the `Dirty` workload writes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DirtySpec {
    /// Order in which pages are written.
    #[serde(default)]
    pub pattern: DirtyPattern,
    /// Pages written per second per vCPU; 0 writes as fast as the vCPU can.
    #[serde(default)]
    #[schemars(range(max = 100_000_000))]
    pub pages_per_second: u64,
}

/// Order in which the `Dirty` workload writes pages.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DirtyPattern {
    #[default]
    Sequential,
    Random,
}

/// Where a branch Sandbox starts from.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RestoreSource {
    /// Name of the SandboxBranch (same namespace) whose capture to restore.
    #[schemars(length(min = 1, max = 253))]
    pub sandbox_branch: String,
    /// UID of that SandboxBranch; the capture on the node is keyed by it, so
    /// a SandboxBranch recreated under the same name is not mistaken for it.
    #[schemars(length(min = 1, max = 63))]
    pub uid: String,
}

/// Observed state of a Sandbox.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SandboxStatus {
    /// The node the scheduler bound the sandbox's Pod to. Set once, before
    /// the agent is asked to start it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,

    /// Name of the sandbox's Pod, recorded once it exists: a Pod that is
    /// gone after that is not replaced (the VM's state died with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,

    /// UID of that Pod, so that another Pod of the same name is not taken for it.
    #[serde(default, rename = "podUID", skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,

    /// `Warm` if the Pod was claimed from a SandboxWarmPool, `Cold` if it
    /// was made for this Sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_source: Option<crate::warmpool::PodSource>,

    /// `Ready` is the summary: `True` while the VM runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::conditions::schema")]
    pub conditions: Vec<Condition>,

    /// The generation the status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// For a branch: where it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<SandboxOrigin>,

    /// The VM as the agent last reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmStatus>,
}

/// Where a branch Sandbox came from.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SandboxOrigin {
    /// The Sandbox that was captured.
    pub source_sandbox: String,
    /// The SandboxBranch that made this branch.
    pub sandbox_branch: String,
    /// The instant the source's state was captured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture_time: Option<Time>,
}

/// The VM process as the agent reports it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VmStatus {
    /// Process id of the VM on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// `Running`, `Stopped` or `Failed`.
    pub state: String,
}

impl Sandbox {
    /// Whether the `Ready` condition is `True`.
    pub fn is_ready(&self) -> bool {
        self.status
            .as_ref()
            .is_some_and(|s| crate::conditions::is_true(&s.conditions, crate::conditions::READY))
    }

    /// The node the sandbox is bound to, if any.
    pub fn node(&self) -> Option<&str> {
        self.status.as_ref().and_then(|s| s.node.as_deref())
    }
}
