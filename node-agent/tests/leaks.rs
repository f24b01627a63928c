//! Deleting sandboxes and captures gives back their memory, files and
//! processes. Alone in its test binary so that nothing else allocates
//! shared memory meanwhile.

mod common;

use std::time::Duration;

use sandfork_node_agent::capture::CaptureMode;
use sandfork_node_agent::guest::Workload;
use sandfork_node_agent::manager::{Manager, SandboxSpec};
use sandfork_node_agent::memory::meminfo_field;

const AGENT: &str = env!("CARGO_BIN_EXE_sandfork-agent");

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
    let state = tempfile::tempdir_in("/dev/shm").unwrap();
    let manager = Manager::with_agent_binary(state.path(), AGENT).unwrap();
    let baseline = shmem_mib();
    manager
        .run(&SandboxSpec {
            name: "source".into(),
            memory_mib: 512,
            vcpus: 1,
            workload: Workload::Counter,
        })
        .unwrap();
    // Wait until the guest has touched all of its memory.
    assert!(common::wait_until(Duration::from_secs(60), || manager
        .status("source")
        .unwrap()
        .report_counts[0]
        >= 1));
    manager
        .capture("source", "snap", CaptureMode::Live, false)
        .unwrap();
    manager.branch("branch", "snap").unwrap();
    let loaded = shmem_mib() - baseline;
    assert!(
        loaded >= 900,
        "guest memory and capture should hold ~1 GiB of shared memory, saw {loaded} MiB"
    );
    assert_eq!(vm_processes(state.path()), 2);

    manager.delete("branch").unwrap();
    manager.delete("source").unwrap();
    manager.delete_capture("snap").unwrap();
    assert_eq!(
        vm_processes(state.path()),
        0,
        "a VM process outlived its delete"
    );
    let leaked = shmem_mib() - baseline;
    assert!(leaked < 32, "{leaked} MiB of shared memory not given back");
    let left: Vec<_> = walk(state.path());
    assert!(
        left.iter().all(|path| path.is_dir()),
        "files left behind: {left:?}"
    );
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
