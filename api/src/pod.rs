//! What the operator's sandbox Pods and the node agent agree on.

/// The emptyDir volume of a sandbox Pod where its VMM serves its control
/// socket; the agent reaches it under the kubelet's pods directory.
pub const VMM_VOLUME: &str = "vmm";
/// Where the VMM container mounts `VMM_VOLUME`.
pub const VMM_DIR: &str = "/run/sandfork-vmm";
