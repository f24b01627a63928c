//! The layout of the agent's state directory, defined once:
//!
//! ```text
//! <state>/sandboxes/<name>/   a sandbox (see `manager`)
//! <state>/captures/<name>/    a capture (`sandfork_vmm::snapshot::CaptureDir`)
//! ```

use std::path::{Path, PathBuf};

use sandfork_vmm::snapshot::CaptureDir;

/// Where the sandboxes live.
pub fn sandboxes(root: &Path) -> PathBuf {
    root.join("sandboxes")
}

/// The directory of sandbox `name`.
pub fn sandbox(root: &Path, name: &str) -> PathBuf {
    sandboxes(root).join(name)
}

/// Where the captures live.
pub fn captures(root: &Path) -> PathBuf {
    root.join("captures")
}

/// Capture `name` of the state directory `root`.
pub fn capture(root: &Path, name: &str) -> CaptureDir {
    capture_in(&captures(root), name)
}

/// Capture `name` in the captures directory `captures`.
pub fn capture_in(captures: &Path, name: &str) -> CaptureDir {
    CaptureDir::new(captures.join(name))
}
