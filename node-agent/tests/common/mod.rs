//! Helpers shared by the tests that need real KVM and userfaultfd.
#![allow(dead_code)]

use std::path::Path;

#[path = "../../../vmm/tests/common/mod.rs"]
mod vmm_common;
#[allow(unused_imports)]
pub use vmm_common::{devices_present, wait_until};

/// A state directory on tmpfs whose VM processes are stopped when it is
/// dropped, also when a test fails, so that no VM outlives its test.
pub struct StateDir(tempfile::TempDir);

impl StateDir {
    pub fn new() -> Self {
        Self(tempfile::tempdir_in("/dev/shm").unwrap())
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    pub fn manager(&self) -> sandfork_node_agent::manager::Manager {
        sandfork_node_agent::manager::Manager::with_agent_binary(
            self.path(),
            env!("CARGO_BIN_EXE_sandfork-agent"),
        )
        .unwrap()
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let manager = self.manager();
        let names = std::fs::read_dir(self.path().join("sandboxes"))
            .into_iter()
            .flatten()
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok());
        for name in names {
            let _ = manager.delete(&name);
        }
    }
}
