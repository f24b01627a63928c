//! The Pod each Sandbox runs in: what the operator that makes it and the
//! agent that starts the VM inside it both rely on.

/// Name of the Pod's only container, the one that runs the VMM.
pub const VMM_CONTAINER: &str = "vmm";
/// Name of the emptyDir volume through which the agent reaches the VMM.
pub const VMM_VOLUME: &str = "vmm";
/// The image volume of a Sandbox's `guest.image`, mounted read-only in the
/// VMM container at `GUEST_DIR`.
pub const GUEST_VOLUME: &str = "guest";
pub const GUEST_DIR: &str = "/run/sandfork-guest";
/// Where a guest image carries its guest: a flat 64-bit binary (loaded at
/// 1 MiB and entered there), at `/guest` in the image.
pub const GUEST_FILE: &str = "guest";

/// Where the VMM container mounts [`VMM_VOLUME`].
pub const VMM_DIR: &str = "/run/sandfork-vmm";

/// Memory the Pod asks for on top of the guest's when the Sandbox does not
/// say (the VMM process, its page tables and buffers), in MiB.
pub const DEFAULT_OVERHEAD_MIB: u64 = 64;
/// Largest overhead a Sandbox may ask for, in MiB (64 GiB).
pub const MAX_OVERHEAD_MIB: u64 = 65_536;
/// CPU the Pod requests per vCPU when the Sandbox does not say, in millicores.
pub const DEFAULT_CPU_REQUEST_MILLIS_PER_VCPU: u32 = 100;

/// Prefix of sandbox Pod names; the Sandbox's name follows.
pub const NAME_PREFIX: &str = "sandbox-";
/// Prefix of warm Pod names; the SandboxWarmPool's name and a generated
/// suffix follow. A claimed warm Pod keeps its name.
pub const WARM_NAME_PREFIX: &str = "warm-";

/// Name of the Pod of Sandbox `sandbox`.
pub fn name(sandbox: &str) -> String {
    format!("{NAME_PREFIX}{sandbox}")
}
