//! `SandboxBranch`: capture a running Sandbox once and start N branches
//! from that instant.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::core::Duration;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Most branches one SandboxBranch may create.
pub const MAX_BRANCHES: u32 = 64;
/// `failureDeadline` when the spec does not set one.
pub const DEFAULT_FAILURE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);

/// Captures a running Sandbox and starts `branches` new Sandboxes from the
/// captured instant, on the source's node. The created Sandboxes are named
/// `<sandboxbranch>-<index>`.
// Several `printcolumn`s each carry `type_`; clippy reads them as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sandfork.dev",
    version = "v1alpha1",
    kind = "SandboxBranch",
    namespaced,
    status = "SandboxBranchStatus",
    shortname = "sbb",
    category = "sandfork",
    derive = "PartialEq",
    doc = "Captures a running Sandbox and starts branches from the captured instant.",
    printcolumn(name = "Source", type_ = "string", json_path = ".spec.sourceRef.name"),
    printcolumn(name = "Branches", type_ = "string", json_path = ".status.branchesReady", description = "branches ready / wanted"),
    printcolumn(name = "Pause-us", type_ = "integer", json_path = ".status.capture.pauseMicros", description = "how long the source was paused for the capture, in microseconds"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason", priority = 1),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.sourceNode", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 240").message("a SandboxBranch name may be at most 240 characters, so that its branches' names `<name>-<index>` fit")
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxBranchSpec {
    /// The Sandbox to capture, in the same namespace. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("sourceRef is immutable"))]
    pub source_ref: SourceRef,

    /// How many branches to start, 1 to 64. Raising it later starts more
    /// branches from the same capture; lowering it deletes the highest
    /// indexes (when `deletionPolicy` is `Delete`).
    #[serde(default = "default_branches")]
    #[schemars(range(min = 1, max = MAX_BRANCHES))]
    pub branches: u32,

    /// How to capture: `Live` (the source keeps running while its memory is
    /// copied; only the write-protect arm pauses it) or `StopAndCopy` (the
    /// source is paused for the whole copy). Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("mode is immutable"))]
    pub mode: CaptureMode,

    /// Metadata for the created Sandboxes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<BranchTemplate>,

    /// How long the capture and the branches may take before the
    /// SandboxBranch is marked `Failed` (a Go duration, e.g. `90s`, `5m`).
    #[serde(default = "default_failure_deadline")]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s') && duration(self) <= duration('24h')").message("failureDeadline must be a duration between 0s (exclusive) and 24h"))]
    pub failure_deadline: Duration,

    /// What happens to the branches when the SandboxBranch is deleted:
    /// `Delete` (they are owned by it and removed with it) or `Retain`.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// Guest memory each branch's Pod requests, in MiB (its
    /// `resources.memoryRequestMiB`), at most the source's memory. A branch
    /// shares its capture's memory and its Pod is charged only for the pages
    /// it writes, so this is what a branch is expected to write; its limit
    /// stays the whole guest. Default: the source's request.
    #[serde(
        rename = "branchMemoryRequestMiB",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(max = crate::sandbox::MAX_MEMORY_MIB))]
    pub branch_memory_request_mib: Option<u64>,
}

fn default_branches() -> u32 {
    1
}

fn default_failure_deadline() -> Duration {
    DEFAULT_FAILURE_DEADLINE.into()
}

/// Reference to a Sandbox in the SandboxBranch's namespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SourceRef {
    /// Name of the source Sandbox.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// How the source's state is captured.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CaptureMode {
    #[default]
    Live,
    StopAndCopy,
}

/// What happens to the branches when the SandboxBranch is deleted.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeletionPolicy {
    #[default]
    Delete,
    Retain,
}

/// Template for the created Sandboxes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BranchTemplate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<TemplateMetadata>,
}

/// Labels and annotations given to every created Sandbox.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TemplateMetadata {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Observed state of a SandboxBranch.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SandboxBranchStatus {
    /// `Ready` (all branches ready) is the summary; `Progressing` while
    /// capturing or restoring; `Failed` once the SandboxBranch gave up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::conditions::schema")]
    pub conditions: Vec<Condition>,

    /// The generation the status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The node the source ran on when it was captured; branches run there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node: Option<String>,

    /// The instant the source's state was captured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture_time: Option<Time>,

    /// Figures of the capture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<CaptureFigures>,

    /// When all branches first became ready. The failure deadline no
    /// longer applies after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,

    /// Branches ready / wanted, e.g. `2/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branches_ready: Option<String>,

    /// The created branches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub branches: Vec<BranchStatus>,

    /// Why the SandboxBranch failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<BranchError>,
}

/// Figures of a capture, as the agent measured them.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CaptureFigures {
    /// How long the source's vCPUs were paused, in microseconds.
    pub pause_micros: u64,
    /// Bytes of guest memory captured.
    pub bytes: u64,
    /// Pages the write-fault handler copied because the guest wrote them
    /// before the bulk copier reached them.
    pub pages_copied_by_fault_handler: u64,
    /// How long the memory copy took, in milliseconds. Absent while a live
    /// capture's copy goes on in the background (branches run meanwhile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_duration_millis: Option<u64>,
}

/// One created branch.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BranchStatus {
    /// Name of the branch Sandbox.
    pub name: String,
    /// Its index, 0-based.
    pub index: u32,
    /// Whether its `Ready` condition is `True`.
    pub ready: bool,
    /// Whether it runs in a warm Pod or one made for it, once it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_source: Option<crate::warmpool::PodSource>,
}

/// Why a SandboxBranch failed.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BranchError {
    pub time: Time,
    pub message: String,
}

impl SandboxBranch {
    /// The name of branch `index`: `<sandboxbranch>-<index>`.
    pub fn branch_name(&self, index: u32) -> String {
        format!(
            "{}-{index}",
            self.metadata.name.as_deref().unwrap_or_default()
        )
    }

    /// Whether the `Failed` condition is `True`.
    pub fn is_failed(&self) -> bool {
        self.status
            .as_ref()
            .is_some_and(|s| crate::conditions::is_true(&s.conditions, crate::conditions::FAILED))
    }
}
