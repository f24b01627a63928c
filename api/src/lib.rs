//! Sandfork's API: the `Sandbox`, `SandboxBranch` and `SandboxWarmPool` custom resources
//! (group `sandfork.dev`, version `v1alpha1`), the conventions the operator
//! and the node agents share (agent Lease annotations, labels), and the code
//! generated from the node agent's gRPC service in `proto/`, and from the
//! kubelet's device plugin API that the agent serves.
#![forbid(unsafe_code)]

pub mod agent;
pub mod branch;
pub mod conditions;
pub mod crdgen;
pub mod deviceplugin;
pub mod labels;
pub mod pod;
pub mod sandbox;
#[cfg(feature = "test-pki")]
pub mod test_pki;
pub mod warmpool;

pub use branch::{SandboxBranch, SandboxBranchSpec, SandboxBranchStatus};
pub use sandbox::{Sandbox, SandboxSpec, SandboxStatus};
pub use warmpool::{SandboxWarmPool, SandboxWarmPoolSpec, SandboxWarmPoolStatus};

/// The API group of the custom resources.
pub const GROUP: &str = "sandfork.dev";
/// The API version of the custom resources.
pub const VERSION: &str = "v1alpha1";
