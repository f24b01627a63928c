//! The host devices a sandbox needs, probed in one place.

use std::path::Path;

/// KVM, for the VMs.
pub const KVM: &str = "/dev/kvm";
/// userfaultfd, for live capture and early branches (root only here).
pub const USERFAULTFD: &str = "/dev/userfaultfd";
/// Every device a sandbox needs.
pub const REQUIRED: [&str; 2] = [KVM, USERFAULTFD];

/// A device that does not open read-write.
#[derive(Debug, thiserror::Error)]
#[error("cannot open {path}")]
pub struct DeviceError {
    pub path: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// Opens `path` read-write and closes it again.
pub fn probe(path: &'static str) -> Result<(), DeviceError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(Path::new(path))
        .map(drop)
        .map_err(|source| DeviceError { path, source })
}

/// The first required device that does not open, if any.
pub fn check() -> Result<(), DeviceError> {
    REQUIRED.into_iter().try_for_each(probe)
}

/// For tests that need the devices: true when they are usable. Without
/// them the caller skips and this says why, unless `CI` is set or
/// `SANDFORK_REQUIRE_DEVICES=1`: then a skip is a failure, and this panics.
pub fn usable_or_required() -> bool {
    let missing: Vec<&str> = REQUIRED
        .into_iter()
        .filter(|path| probe(path).is_err())
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
