//! Labels the operator puts on the objects it makes.

/// Name of the SandboxBranch that created the Sandbox.
pub const BRANCH: &str = "sandfork.dev/sandbox-branch";
/// The Sandbox's index among that SandboxBranch's branches (0-based).
pub const BRANCH_INDEX: &str = "sandfork.dev/branch-index";
/// Name of the Sandbox the branch was captured from.
pub const SOURCE: &str = "sandfork.dev/source";

/// On a sandbox Pod: the name of its Sandbox.
pub const SANDBOX: &str = "sandfork.dev/sandbox";
/// On a sandbox Pod: the UID of its Sandbox.
pub const SANDBOX_UID: &str = "sandfork.dev/sandbox-uid";
/// On a warm sandbox Pod: the SandboxWarmPool that made it (kept once claimed).
pub const WARM_POOL: &str = "sandfork.dev/warm-pool";

/// The recommended `app.kubernetes.io/*` labels, as every Sandfork object has them.
pub const NAME: &str = "app.kubernetes.io/name";
pub const COMPONENT: &str = "app.kubernetes.io/component";
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Value of [`NAME`].
pub const NAME_VALUE: &str = "sandfork";
/// Value of [`COMPONENT`] on sandbox Pods.
pub const COMPONENT_SANDBOX: &str = "sandbox";
/// Value of [`MANAGED_BY`] on what the operator makes.
pub const MANAGED_BY_OPERATOR: &str = "sandfork-operator";

/// Label selector matching the Sandboxes SandboxBranch `name` created.
pub fn branch_selector(name: &str) -> String {
    format!("{BRANCH}={name}")
}

/// Label selector matching every sandbox Pod.
pub fn sandbox_pod_selector() -> String {
    format!("{COMPONENT}={COMPONENT_SANDBOX}")
}

/// Label selector matching the Pods SandboxWarmPool `name` made.
pub fn warm_pool_selector(name: &str) -> String {
    format!("{WARM_POOL}={name}")
}
