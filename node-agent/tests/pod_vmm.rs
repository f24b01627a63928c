//! Sandboxes whose VMM runs apart from the agent, as in a sandbox Pod: a
//! `vm-host` process started on its own with its socket in a directory laid
//! out as the kubelet lays out a Pod's emptyDir volume. The agent (the
//! manager) starts its VM, captures it into a directory it hands over, hands
//! a branch its capture as descriptors, and a second manager on the same
//! state directory (a restarted agent) finds the sandboxes again.

mod common;

use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sandfork_node_agent::manager::{ManagerError, SandboxSpec, SandboxState};
use sandfork_vmm::capture::CaptureMode;
use sandfork_vmm::guest::Workload;

const AGENT: &str = env!("CARGO_BIN_EXE_sandfork-agent");

/// A VMM process standing in for a sandbox Pod's container.
struct PodVmm {
    child: Child,
}

impl PodVmm {
    fn start(pods: &Path, uid: &str) -> Self {
        Self::start_logging_to(pods, uid, Stdio::inherit())
    }

    fn start_logging_to(pods: &Path, uid: &str, log: Stdio) -> Self {
        let dir = volume_dir(pods, uid);
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new(AGENT)
            .args(["vm-host", "--dir"])
            .arg(&dir)
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Self { child }
    }

    /// Waits for the process to exit by itself; its exit status.
    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        common::wait_until(timeout, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status
    }
}

impl Drop for PodVmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn volume_dir(pods: &Path, uid: &str) -> PathBuf {
    pods.join(uid)
        .join("volumes/kubernetes.io~empty-dir")
        .join(sandfork_api::pod::VMM_VOLUME)
}

fn counter(name: &str) -> SandboxSpec {
    SandboxSpec {
        name: name.into(),
        memory_mib: 128,
        vcpus: 1,
        workload: Workload::Counter,
    }
}

fn passes(manager: &sandfork_node_agent::manager::Manager, name: &str) -> u64 {
    manager.status(name).unwrap().reports[0]
}

const SOURCE_POD: &str = "6f1c2a50-0000-4000-8000-000000000001";
const BRANCH_POD: &str = "6f1c2a50-0000-4000-8000-000000000002";

#[test]
fn a_pod_vmm_runs_captures_and_branches_and_outlives_the_agent() {
    if !common::devices_present() {
        return;
    }
    let state = common::StateDir::new();
    let pods = tempfile::tempdir().unwrap();
    let manager = state.manager().with_pods_dir(pods.path());
    let mut source_vmm = PodVmm::start(pods.path(), SOURCE_POD);

    let source = manager
        .run_on(&counter("source"), Some(SOURCE_POD))
        .unwrap();
    assert_eq!(source.state, SandboxState::Running);
    assert_eq!(source.pod_uid.as_deref(), Some(SOURCE_POD));
    assert_eq!(source.pid, None, "a Pod's pid is not the agent's to report");
    assert!(common::wait_until(Duration::from_secs(30), || passes(
        &manager, "source"
    ) >= 2));

    // The capture is written into the agent's state directory, which the
    // VMM never sees but through the directory it was handed.
    let capture = manager
        .capture("source", "snap", CaptureMode::Live, true, true)
        .unwrap();
    assert!(capture.memory_complete);
    let captured_pass = capture.counter.expect("verified").vcpus[0].pass;
    assert!(state.path().join("captures/snap/memory").is_file());

    let mut branch_vmm = PodVmm::start(pods.path(), BRANCH_POD);
    let branch = manager
        .branch_on("branch", "snap", Some(BRANCH_POD))
        .unwrap();
    assert_eq!(branch.state, SandboxState::Running);
    assert_eq!(branch.origin.as_deref(), Some("snap"));
    // The branch continues from the captured pass, not from zero.
    assert!(common::wait_until(Duration::from_secs(30), || {
        passes(&manager, "branch") > captured_pass
    }));

    // A restarted agent finds both again, still running.
    drop(manager);
    let restarted = state.manager().with_pods_dir(pods.path());
    let before = passes(&restarted, "source");
    assert!(common::wait_until(Duration::from_secs(30), || {
        passes(&restarted, "source") > before
    }));
    assert_eq!(
        restarted.status("branch").unwrap().state,
        SandboxState::Running
    );

    // Deleting a sandbox stops its VMM, which exits by itself.
    restarted.delete("branch").unwrap();
    let exit = branch_vmm
        .wait_exit(Duration::from_secs(10))
        .expect("exited");
    assert!(exit.success(), "{exit}");
    assert!(restarted.status("branch").is_err());

    // SIGTERM (a deleted Pod) stops the VM too; the agent then sees it gone.
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&source_vmm.child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let exit = source_vmm
        .wait_exit(Duration::from_secs(10))
        .expect("exited");
    assert!(exit.success(), "{exit}");
    assert!(matches!(
        restarted.status("source").unwrap().state,
        SandboxState::Failed { .. }
    ));
    restarted.delete("source").unwrap();
}

#[test]
fn captures_beyond_the_budget_are_refused_and_leave_nothing() {
    if !common::devices_present() {
        return;
    }
    let state = common::StateDir::new();
    let pods = tempfile::tempdir().unwrap();
    // Room for one capture of the 128 MiB guest once it has written all of
    // it, not for two.
    let manager = state
        .manager()
        .with_pods_dir(pods.path())
        .with_capture_budget_mib(Some(200));
    let _vmm = PodVmm::start(pods.path(), SOURCE_POD);
    manager
        .run_on(&counter("source"), Some(SOURCE_POD))
        .unwrap();
    // A pass writes every page of the guest's memory.
    assert!(common::wait_until(Duration::from_secs(30), || passes(
        &manager, "source"
    ) >= 2));

    let first = manager
        .capture("source", "first", CaptureMode::Live, false, true)
        .unwrap();
    assert!(first.memory_complete);
    let err = manager
        .capture("source", "second", CaptureMode::Live, false, true)
        .unwrap_err();
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("does not fit") && status.message().contains("MiB are left"),
        "{status:?}"
    );
    let captures: Vec<_> = std::fs::read_dir(state.path().join("captures"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(captures, ["first"], "the refused capture left nothing");

    // The source ran on, and with the first capture gone the second fits.
    let before = passes(&manager, "source");
    assert!(common::wait_until(Duration::from_secs(30), || passes(
        &manager, "source"
    ) > before));
    manager.delete_capture("first").unwrap();
    let second = manager
        .capture("source", "second", CaptureMode::Live, false, true)
        .unwrap();
    assert!(second.memory_complete);
    manager.delete_capture("second").unwrap();
    manager.delete("source").unwrap();
}

#[test]
fn a_pod_without_its_vmm_is_reported_unready_and_nothing_is_left() {
    if !common::devices_present() {
        return;
    }
    let state = common::StateDir::new();
    let pods = tempfile::tempdir().unwrap();
    let manager = state.manager().with_pods_dir(pods.path());
    let err = manager
        .run_on(&counter("early"), Some(SOURCE_POD))
        .unwrap_err();
    assert!(
        matches!(err, ManagerError::PodVmmNotReady { .. }),
        "{err:?}"
    );
    assert!(manager.status("early").is_err(), "no record is left behind");

    let err = manager
        .run_on(&counter("bad"), Some("../../etc"))
        .unwrap_err();
    assert!(matches!(err, ManagerError::InvalidPodUid(_)), "{err:?}");

    // Once the Pod's VMM is up, the same call starts it.
    let _vmm = PodVmm::start(pods.path(), SOURCE_POD);
    let started = manager.run_on(&counter("early"), Some(SOURCE_POD)).unwrap();
    assert_eq!(started.state, SandboxState::Running);
    manager.delete("early").unwrap();
}

#[test]
fn a_pod_vmm_whose_vm_cannot_start_ends_with_the_reason() {
    if !common::devices_present() {
        return;
    }
    let state = common::StateDir::new();
    let pods = tempfile::tempdir().unwrap();
    let manager = state.manager().with_pods_dir(pods.path());
    let log = tempfile::tempfile().unwrap();
    let mut vmm =
        PodVmm::start_logging_to(pods.path(), SOURCE_POD, log.try_clone().unwrap().into());
    // The guest image is read inside the Pod, where this one is missing.
    let spec = SandboxSpec {
        workload: Workload::Flat {
            path: "/run/sandfork-guest/missing".into(),
        },
        ..counter("imageless")
    };
    let err = manager.run_on(&spec, Some(SOURCE_POD)).unwrap_err();
    assert!(err.to_string().contains("imageless"), "{err}");
    // The VMM ends, so that its Pod ends and holds no resources, and says why.
    let status = vmm
        .wait_exit(Duration::from_secs(10))
        .expect("the VMM exits");
    assert!(!status.success(), "{status}");
    let mut said = String::new();
    let mut log = log;
    log.rewind().unwrap();
    log.read_to_string(&mut said).unwrap();
    assert!(said.contains("/run/sandfork-guest/missing"), "{said}");
    assert!(
        manager.status("imageless").is_err(),
        "no record is left behind"
    );
}
