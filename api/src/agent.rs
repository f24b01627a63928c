//! The node agent: its gRPC service (generated from
//! `proto/sandfork/agent/v1/agent.proto`) and the Lease through which each
//! agent registers itself and keeps a heartbeat.

/// Generated gRPC messages, client and server of `sandfork.agent.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("sandfork.agent.v1");
}

/// Every agent keeps a `coordination.k8s.io/v1` Lease named
/// `sandfork-agent-<node>` in the agent's namespace, renewed every few
/// seconds. The operator treats an agent as alive while
/// `renewTime + leaseDurationSeconds` is in the future, and reads from the
/// annotations where to reach it and what it can hold.
pub mod lease {
    /// Prefix of the Lease names; the node name follows.
    pub const NAME_PREFIX: &str = "sandfork-agent-";
    /// Label on every agent Lease, with value [`COMPONENT_VALUE`].
    pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
    pub const COMPONENT_VALUE: &str = "sandfork-agent";
    /// Label naming the node.
    pub const NODE_LABEL: &str = "sandfork.dev/node";
    /// `host:port` of the agent's gRPC service.
    pub const ENDPOINT: &str = "sandfork.dev/endpoint";
    /// Memory the agent may give to sandboxes, in MiB.
    pub const MEMORY_MIB: &str = "sandfork.dev/memory-mib";
    /// Most sandboxes the agent runs at once.
    pub const MAX_SANDBOXES: &str = "sandfork.dev/max-sandboxes";
    /// `true` when `/dev/kvm` works.
    pub const KVM: &str = "sandfork.dev/kvm";
    /// `true` when userfaultfd with write-protection works.
    pub const USERFAULTFD: &str = "sandfork.dev/userfaultfd";
    /// Agent version.
    pub const VERSION: &str = "sandfork.dev/version";

    /// The Lease name for `node`.
    pub fn name(node: &str) -> String {
        format!("{NAME_PREFIX}{node}")
    }

    /// Label selector matching every agent Lease.
    pub fn selector() -> String {
        format!("{COMPONENT_LABEL}={COMPONENT_VALUE}")
    }
}

/// The DNS name the agents' serving certificates carry and the operator
/// verifies, whatever address it dials (agents are reached by node IP).
pub const DEFAULT_TLS_SERVER_NAME: &str = "sandfork-agent";
