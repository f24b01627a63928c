//! Sandfork's API: the `Sandbox` and `SandboxBranch` custom resources
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

pub use branch::{SandboxBranch, SandboxBranchSpec, SandboxBranchStatus};
pub use sandbox::{Sandbox, SandboxSpec, SandboxStatus};

/// The API group of both custom resources.
pub const GROUP: &str = "sandfork.dev";
/// The API version of both custom resources.
pub const VERSION: &str = "v1alpha1";
