//! Helpers shared by the tests that need real KVM and userfaultfd.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

/// True when /dev/kvm and /dev/userfaultfd are usable. Without them the test
/// says why it skips; under CI (or SANDFORK_REQUIRE_DEVICES=1) it fails instead.
pub fn devices_present() -> bool {
    let missing: Vec<&str> = ["/dev/kvm", "/dev/userfaultfd"]
        .into_iter()
        .filter(|path| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(Path::new(path))
                .is_err()
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let required = std::env::var_os("CI").is_some()
        || std::env::var("SANDFORK_REQUIRE_DEVICES").is_ok_and(|value| value == "1");
    assert!(
        !required,
        "{} not usable: these tests need real KVM and userfaultfd (run as root on a KVM host)",
        missing.join(" and ")
    );
    eprintln!(
        "SKIPPED: {} not usable on this machine",
        missing.join(" and ")
    );
    false
}

/// Polls `condition` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

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
