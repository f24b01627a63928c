//! Helpers shared by the tests that need real KVM and userfaultfd (the
//! agent's tests include this file too).
#![allow(dead_code)]

use std::time::{Duration, Instant};

/// True when /dev/kvm and /dev/userfaultfd are usable. Without them the test
/// says why it skips; under CI (or SANDFORK_REQUIRE_DEVICES=1) it fails instead.
pub fn devices_present() -> bool {
    sandfork_vmm::devices::usable_or_required()
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
