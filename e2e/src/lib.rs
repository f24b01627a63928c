//! Sandfork's end-to-end tests: the Helm chart installed into a real
//! Kubernetes control plane, the operator and node agents running against
//! it, and Sandboxes and SandboxBranches driven through the API server the
//! way a user drives them.
//!
//! Two ways to run (see `tests/e2e.rs` and `e2e/README.md`):
//! - local (default): start `e2e/cluster/local-cluster.sh` (a control plane
//!   and two real nodes, `node-a` and `node-b`: kubelet, containerd, runc),
//!   import images of this checkout's operator and agent into the nodes,
//!   `helm install` the chart, and test against its Pods;
//! - external (`SANDFORK_E2E_KUBECONFIG`): a cluster where the chart is
//!   installed already (e.g. `e2e/kind/run.sh`); the agents are the
//!   DaemonSet's.
#![forbid(unsafe_code)]

pub mod agents;
pub mod bench;
pub mod cluster;
pub mod env;
pub mod fanout;
pub mod namespace;
pub mod objects;
pub mod pods;
pub mod process;
pub mod tools;
pub mod wait;

pub use env::Env;
