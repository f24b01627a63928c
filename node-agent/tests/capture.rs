//! Live capture and restore against real KVM and userfaultfd.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sandfork_node_agent::capture;
use sandfork_node_agent::guest::{GuestImage, Workload, verify_counter};
use sandfork_node_agent::memory::SnapshotMapping;
use sandfork_node_agent::vm::Vm;

fn boot_counter(memory_mib: u64, vcpus: usize) -> Vm {
    let image = GuestImage::for_workload(&Workload::Counter, 0).unwrap();
    let vm = Vm::boot("test-counter", memory_mib << 20, vcpus, &image).unwrap();
    // Let every vCPU finish at least one pass so that memory is busy.
    assert!(
        common::wait_until(Duration::from_secs(60), || vm
            .reports()
            .iter()
            .all(|report| report.count.load(Ordering::Relaxed) >= 1)),
        "counter guest made no progress: {:?}",
        vm.failure()
    );
    vm
}

fn scratch_snapshot(bytes: u64) -> (tempfile::TempDir, Arc<SnapshotMapping>) {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.path().join("memory"))
        .unwrap();
    (dir, Arc::new(SnapshotMapping::create(file, bytes).unwrap()))
}

fn snapshot_bytes(snapshot: &SnapshotMapping) -> &[u8] {
    // SAFETY (test): the capture is finished, nothing writes the mapping anymore.
    unsafe { std::slice::from_raw_parts(snapshot.as_ptr(), snapshot.len()) }
}

#[test]
fn live_capture_of_a_running_counter_guest_is_consistent() {
    if !common::devices_present() {
        return;
    }
    let vm = boot_counter(256, 1);
    let (_dir, snapshot) = scratch_snapshot(256 << 20);
    let captured = capture::live(&vm, snapshot.clone()).unwrap();
    eprintln!("{:?}", captured.stats);
    let regs: Vec<_> = captured.vcpus.iter().map(|state| state.regs).collect();
    let state = verify_counter(snapshot_bytes(&snapshot), &regs).unwrap();
    eprintln!("{state:?}");
    assert!(captured.stats.write_faults > 0, "the guest never wrote during the copy");
}
