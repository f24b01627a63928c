//! Sandfork node agent: runs each sandbox's VM in its own process and
//! serves the operator.
//!
//! Stages of a request, from the operator to the VM:
//! `service` (gRPC over mutual TLS, the node's Lease; errors become status
//! codes in `service::convert`) → `manager` (sandboxes and captures in the
//! state directory, `state_dir`; one `vm-host` process per sandbox) →
//! `vmhost` (the VM process: boots or restores the VM and runs captures
//! with `sandfork_vmm`, answering over a Unix socket with an error kind).
//! The VMM itself (memory, vCPUs, capture, snapshots) is `sandfork_vmm`,
//! the benchmark `sandfork_bench`. Beside the service, `device_plugin`
//! offers the node's KVM to the kubelet as the resource `sandfork.dev/kvm`.
#![forbid(unsafe_code)]

pub mod device_plugin;
pub mod manager;
pub mod service;
pub mod state_dir;
pub mod vmhost;
pub mod vmm_bench;
pub mod wire;
