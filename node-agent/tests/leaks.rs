//! Deleting sandboxes and captures gives back their memory, files and
//! processes. Alone in its test binary so that nothing else allocates
//! shared memory meanwhile.

mod common;

use std::time::Duration;

use sandfork_node_agent::manager::SandboxSpec;
use sandfork_vmm::capture::CaptureMode;
use sandfork_vmm::guest::Workload;
use sandfork_vmm::memory::meminfo_field;

fn shmem_mib() -> i64 {
    (meminfo_field("Shmem:").unwrap() >> 20) as i64
}

fn vm_processes(state: &std::path::Path) -> usize {
    let needle = state.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok())
        .filter(|entry| {
            std::fs::read(entry.path().join("cmdline")).is_ok_and(|cmdline| {
                let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                text.contains("vm-host") && text.contains(&needle)
            })
        })
        .count()
}

#[test]
fn deleting_sandboxes_and_captures_frees_everything() {
    if !common::devices_present() {
        return;
    }
    // Its guard stops whatever a failing run leaves running.
    let state = common::StateDir::new();
    let manager = state.manager();
    let baseline = shmem_mib();
    manager
        .run(&SandboxSpec {
            name: "leak-source".into(),
            memory_mib: 512,
            vcpus: 1,
            workload: Workload::Counter,
        })
        .unwrap();
    // Wait until the guest has touched all of its memory.
    assert!(common::wait_until(Duration::from_secs(60), || manager
        .status("leak-source")
        .unwrap()
        .report_counts[0]
        >= 1));
    // The branch starts while the capture's copy runs.
    manager
        .capture("leak-source", "snap", CaptureMode::Live, false, false)
        .unwrap();
    manager.branch("branch", "snap").unwrap();
    assert!(common::wait_until(Duration::from_secs(60), || manager
        .list_captures()
        .unwrap()[0]
        .memory_complete));
    assert!(
        mapped_anywhere("memfd:leak-source") && mapped_anywhere(&state.path().to_string_lossy()),
        "the guest memory and the capture should be mapped by the VM processes"
    );
    let loaded = shmem_mib() - baseline;
    assert!(
        loaded >= 900,
        "guest memory and capture should hold ~1 GiB of shared memory, saw {loaded} MiB"
    );
    assert_eq!(vm_processes(state.path()), 2);

    manager.delete("branch").unwrap();
    manager.delete("leak-source").unwrap();
    manager.delete_capture("snap").unwrap();
    assert_eq!(
        vm_processes(state.path()),
        0,
        "a VM process outlived its delete"
    );
    // Exact: nothing maps the guest memory or the capture any more.
    assert!(
        !mapped_anywhere("memfd:leak-source"),
        "the guest memory is still mapped"
    );
    assert!(
        !mapped_anywhere(&state.path().to_string_lossy()),
        "the capture's memory is still mapped"
    );
    // And the node's shared memory is back to where it was (allowing for
    // whatever else runs on the machine meanwhile).
    let mut leaked = 0;
    assert!(
        common::wait_until(Duration::from_secs(20), || {
            leaked = shmem_mib() - baseline;
            leaked < 32
        }),
        "{leaked} MiB of shared memory not given back"
    );
    let left: Vec<_> = walk(state.path());
    assert!(
        left.iter().all(|path| path.is_dir()),
        "files left behind: {left:?}"
    );
}

/// Whether any process maps a file whose name contains `needle`.
fn mapped_anywhere(needle: &str) -> bool {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok())
        .any(|entry| {
            std::fs::read_to_string(entry.path().join("maps"))
                .is_ok_and(|maps| maps.lines().any(|line| line.contains(needle)))
        })
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            paths.extend(walk(&path));
        }
        paths.push(path);
    }
    paths
}
