//! Sandfork's end-to-end tests: the Helm chart installed into a real
//! Kubernetes control plane, the operator and node agents running against
//! it, and Sandboxes and SandboxBranches driven through the API server the
//! way a user drives them.
//!
//! Two ways to run (see `tests/e2e.rs` and `e2e/README.md`):
//! - local (default): start `e2e/cluster/local-cluster.sh`, install the chart,
//!   and run the operator and two agents (nodes `node-a`, `node-b`) as
//!   processes here, each with a token of the ServiceAccount the chart made
//!   for it, so the chart's RBAC is what is exercised;
//! - external (`SANDFORK_E2E_KUBECONFIG`): a cluster where the chart is
//!   installed already (e.g. `e2e/kind/run.sh`); the agents are the
//!   DaemonSet's.
#![forbid(unsafe_code)]

pub mod agents;
pub mod bench;
pub mod cluster;
pub mod env;
pub mod namespace;
pub mod objects;
pub mod process;
pub mod tools;
pub mod wait;

pub use env::Env;
