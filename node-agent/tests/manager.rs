//! Sandboxes as VM processes, driven through the manager and the CLI.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sandfork_node_agent::manager::{Manager, ManagerError, SandboxSpec, SandboxState};
use sandfork_vmm::capture::CaptureMode;
use sandfork_vmm::guest::Workload;

const AGENT: &str = env!("CARGO_BIN_EXE_sandfork-agent");

fn manager(dir: &Path) -> Manager {
    Manager::with_agent_binary(dir, AGENT).unwrap()
}

fn counter(name: &str, memory_mib: u64) -> SandboxSpec {
    SandboxSpec {
        name: name.into(),
        memory_mib,
        vcpus: 1,
        workload: Workload::Counter,
    }
}

fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| !stat.rsplit_once(") ").unwrap().1.starts_with('Z'))
}

fn wait_reports(manager: &Manager, name: &str, at_least: u64) -> Vec<u64> {
    let mut reports = Vec::new();
    assert!(
        common::wait_until(Duration::from_secs(60), || {
            let info = manager.status(name).unwrap();
            reports = info.reports.clone();
            info.report_counts.iter().all(|&count| count >= at_least)
        }),
        "{name} made no progress"
    );
    reports
}

#[test]
fn run_capture_branch_delete_through_vm_processes() {
    if !common::devices_present() {
        return;
    }
    let state = common::StateDir::new();
    let manager = manager(state.path());
    let source = manager.run(&counter("source", 128)).unwrap();
    assert_eq!(source.state, SandboxState::Running);
    let source_pid = source.pid.unwrap();
    assert_ne!(source_pid, std::process::id());
    // Idempotent: the same spec returns the same sandbox.
    assert_eq!(
        manager.run(&counter("source", 128)).unwrap().pid,
        Some(source_pid)
    );
    let err = manager.run(&counter("source", 256)).unwrap_err();
    assert!(matches!(err, ManagerError::AlreadyExists { .. }), "{err}");

    wait_reports(&manager, "source", 1);
    let capture = manager
        .capture("source", "snap", CaptureMode::Live, true, true)
        .unwrap();
    let counter_state = capture.counter.clone().expect("verified counter capture");
    assert_eq!(
        manager
            .capture("source", "snap", CaptureMode::Live, true, true)
            .unwrap()
            .stats
            .pause_ns,
        capture.stats.pause_ns,
        "a repeated capture must return the first"
    );

    let branch = manager.branch("branch", "snap").unwrap();
    assert_eq!(branch.origin.as_deref(), Some("snap"));
    let reports = wait_reports(&manager, "branch", 1);
    assert!(
        reports[0] >= counter_state.vcpus[0].pass,
        "branch reported pass {} but the capture was in pass {}",
        reports[0],
        counter_state.vcpus[0].pass
    );
    let names: Vec<String> = manager
        .list()
        .unwrap()
        .into_iter()
        .map(|info| info.name)
        .collect();
    assert_eq!(names, ["branch", "source"]);

    // A restarted agent (a new manager on the same state) adopts the VMs.
    let restarted = manager_for_restart(state.path());
    assert_eq!(restarted.status("source").unwrap().pid, Some(source_pid));

    let branch_pid = branch.pid.unwrap();
    manager.delete("branch").unwrap();
    assert!(!process_alive(branch_pid));
    manager.delete("branch").unwrap();
    manager.delete_capture("snap").unwrap();
    assert!(manager.list_captures().unwrap().is_empty());
    manager.delete("source").unwrap();
    assert!(!process_alive(source_pid));
    assert!(
        std::fs::read_dir(state.path().join("sandboxes"))
            .unwrap()
            .next()
            .is_none()
    );
}

#[test]
fn branches_started_during_the_copy_outlive_a_deleted_source_but_not_a_crashed_one() {
    if !common::devices_present() {
        return;
    }
    let state = common::StateDir::new();
    let manager = manager(state.path());
    let source = manager.run(&counter("source", 512)).unwrap();
    wait_reports(&manager, "source", 1);

    // Without waiting, a live capture answers once the source runs again;
    // a branch starts while the copy goes on and continues normally, also
    // when its source is deleted before the copy completes.
    let capture = manager
        .capture("source", "snap", CaptureMode::Live, false, false)
        .unwrap();
    assert!(!capture.memory_complete, "the copy was not running");
    manager.branch("early", "snap").unwrap();
    manager.delete("source").unwrap();
    assert!(!process_alive(source.pid.unwrap()));
    assert!(manager.list_captures().unwrap()[0].memory_complete);
    wait_reports(&manager, "early", 1);
    assert_eq!(
        manager.status("early").unwrap().state,
        SandboxState::Running
    );

    // The source dies mid-copy: a branch started meanwhile cannot complete
    // its memory and stops instead of running on holes; the capture is
    // abandoned, and a new branch of it is refused with a clear error.
    let source = manager.run(&counter("source", 512)).unwrap();
    wait_reports(&manager, "source", 1);
    // A capture deleted while it copies does not hold up the next one.
    manager
        .capture("source", "dropped", CaptureMode::Live, false, false)
        .unwrap();
    manager.delete_capture("dropped").unwrap();
    let capture = manager
        .capture("source", "doomed", CaptureMode::Live, false, false)
        .unwrap();
    let doomed = manager.branch("doomed-branch", "doomed").unwrap();
    let source_pid = source.pid.unwrap();
    Command::new("kill")
        .args(["-9", &source_pid.to_string()])
        .status()
        .unwrap();
    let killed_mid_copy = !manager
        .list_captures()
        .unwrap()
        .iter()
        .find(|info| info.name == "doomed")
        .unwrap()
        .memory_complete;
    assert!(
        !capture.memory_complete && killed_mid_copy,
        "the copy completed before the source was killed"
    );
    assert!(
        common::wait_until(Duration::from_secs(30), || !process_alive(
            doomed.pid.unwrap()
        )),
        "a branch whose memory can no longer be completed kept running"
    );
    assert!(matches!(
        manager.status("doomed-branch").unwrap().state,
        SandboxState::Failed { .. }
    ));
    // Gone, not only a zombie leader: its other threads may still be
    // exiting, holding its fill socket open, until it is reaped.
    assert!(common::wait_until(Duration::from_secs(30), || {
        !Path::new(&format!("/proc/{source_pid}")).exists()
    }));
    let err = manager.branch("late", "doomed").unwrap_err();
    assert!(err.to_string().contains("no longer running"), "{err}");
    // The earlier branch, whose memory was complete, is unaffected.
    let before = wait_reports(&manager, "early", 1)[0];
    assert!(common::wait_until(Duration::from_secs(60), || {
        manager.status("early").unwrap().reports[0] > before
    }));

    for name in ["early", "doomed-branch", "late", "source"] {
        manager.delete(name).unwrap();
    }
    for name in ["snap", "doomed"] {
        manager.delete_capture(name).unwrap();
    }
    assert!(manager.list().unwrap().is_empty());
    assert!(
        std::fs::read_dir(state.path().join("captures"))
            .unwrap()
            .next()
            .is_none()
    );
}

/// The agent owns a capture's memory mapping and the VMM fills it: the agent
/// must keep it until the VMM has stopped filling, not until the capture
/// looks complete or gone, or the branches still being filled stop.
#[test]
fn a_capture_deleted_mid_copy_leaves_its_branches_running() {
    if !common::devices_present() {
        return;
    }
    let state = common::StateDir::new();
    let manager = manager(state.path());
    let source = manager.run(&counter("source", 512)).unwrap();
    wait_reports(&manager, "source", 1);
    let capture = manager
        .capture("source", "snap", CaptureMode::Live, false, false)
        .unwrap();
    let branch = manager.branch("orphan", "snap").unwrap();
    manager.delete_capture("snap").unwrap();
    assert!(
        !capture.memory_complete && manager.list_captures().unwrap().is_empty(),
        "the copy completed before the capture was deleted"
    );
    // Running past the copy's end, on memory the copy completed.
    let mut first_pass = None;
    let progressed = common::wait_until(Duration::from_secs(60), || {
        let info = manager.status("orphan").unwrap();
        if info.state != SandboxState::Running {
            return true;
        }
        let Some(&pass) = info.reports.first() else {
            return false;
        };
        pass > *first_pass.get_or_insert(pass) + 1
    });
    let state = manager.status("orphan").unwrap().state;
    assert!(
        progressed && state == SandboxState::Running,
        "the branch did not run on: {state:?}"
    );
    assert!(process_alive(branch.pid.unwrap()));
    assert!(process_alive(source.pid.unwrap()));
    manager.delete("orphan").unwrap();
    manager.delete("source").unwrap();
}

fn manager_for_restart(dir: &Path) -> Manager {
    manager(dir)
}

#[test]
fn a_crashed_vm_is_reported_and_harms_nothing_else() {
    if !common::devices_present() {
        return;
    }
    let state = common::StateDir::new();
    let manager = manager(state.path());
    let doomed = manager.run(&counter("doomed", 64)).unwrap();
    manager.run(&counter("survivor", 64)).unwrap();
    Command::new("kill")
        .args(["-9", &doomed.pid.unwrap().to_string()])
        .status()
        .unwrap();
    assert!(common::wait_until(Duration::from_secs(5), || {
        !process_alive(doomed.pid.unwrap())
    }));
    match manager.status("doomed").unwrap().state {
        SandboxState::Failed { reason } => assert!(reason.contains("not reachable"), "{reason}"),
        state => panic!("a killed VM reported {state:?}"),
    }
    assert_eq!(
        manager.status("survivor").unwrap().state,
        SandboxState::Running
    );
    manager.delete("doomed").unwrap();
    manager.delete("survivor").unwrap();
}

#[test]
fn bad_requests_get_clear_errors() {
    if !common::devices_present() {
        return;
    }
    let state = common::StateDir::new();
    let manager = manager(state.path());
    let err = manager.status("missing").unwrap_err();
    assert_eq!(err.to_string(), "sandbox \"missing\" not found");
    let err = manager.run(&counter("Bad_Name", 64)).unwrap_err();
    assert!(matches!(err, ManagerError::InvalidName(_)), "{err}");
    let err = manager.run(&counter("huge", 200 << 10)).unwrap_err();
    assert!(
        err.to_string()
            .contains("exceeds what this host has available"),
        "{err}"
    );
    let err = manager.run(&counter("odd", 65)).unwrap_err();
    assert!(err.to_string().contains("2 MiB steps"), "{err}");
    let mut spec = counter("novcpu", 64);
    spec.vcpus = 0;
    assert!(matches!(
        manager.run(&spec).unwrap_err(),
        ManagerError::InvalidSpec(_)
    ));
    let err = manager.branch("b", "no-such-capture").unwrap_err();
    assert!(matches!(err, ManagerError::NotFound { .. }), "{err}");
    let err = manager
        .capture("missing", "c", CaptureMode::Live, false, true)
        .unwrap_err();
    assert!(matches!(err, ManagerError::NotFound { .. }), "{err}");
    assert!(
        manager.list().unwrap().is_empty(),
        "a failed run left a sandbox"
    );

    // Captures are filled in place in shared memory: a state directory on
    // disk is refused up front.
    let on_disk = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let on_tmpfs = rustix::fs::statfs(on_disk.path()).unwrap().f_type == 0x0102_1994;
    if !on_tmpfs {
        let Err(err) = Manager::with_agent_binary(on_disk.path(), AGENT) else {
            panic!("a state directory on disk was accepted");
        };
        assert!(matches!(err, ManagerError::NotTmpfs(_)), "{err}");
        assert!(err.to_string().contains("not on a tmpfs"), "{err}");
    }
}

/// The command line: VMs outlive the `sandfork-agent` process that started them.
#[test]
fn cli_runs_sandboxes_that_outlive_it() {
    if !common::devices_present() {
        return;
    }
    let state = common::StateDir::new();
    let agent = |args: &[&str]| {
        let output = Command::new(AGENT)
            .arg("--state-dir")
            .arg(state.path())
            .args(args)
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ok, out, err) = agent(&["run", "cli", "--guest", "idle", "--memory-mib", "64"]);
    assert!(ok, "{err}");
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["state"], "running");
    let (ok, out, _) = agent(&["list"]);
    assert!(
        ok && out.contains("cli") && out.contains("Running"),
        "{out}"
    );
    let (ok, _, err) = agent(&["status", "nope"]);
    assert!(!ok && err.contains("sandbox \"nope\" not found"), "{err}");
    let (ok, _, err) = agent(&["run", "x", "--guest", "flat"]);
    assert!(!ok && err.contains("--guest flat needs --image"), "{err}");
    let (ok, _, err) = agent(&["delete", "cli"]);
    assert!(ok, "{err}");
    let (_, out, _) = agent(&["list", "--json"]);
    assert_eq!(out.trim(), "[]");
}
