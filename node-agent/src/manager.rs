//! Sandboxes and captures on one node, kept in a state directory:
//!
//! ```text
//! <state>/sandboxes/<name>/sandbox.json  what the sandbox is, and its Pod
//!                          control.sock  its VMM's control socket, pid, vm.log
//!                                        (a VMM process the agent started)
//! <state>/captures/<name>/memory, state.json
//! ```
//!
//! A sandbox in a Pod has its VMM's control socket in the Pod's `vmm`
//! emptyDir volume, which the agent reaches under the kubelet's pods
//! directory, as the kubelet lays it out. Everything is found again from
//! these files, so a restarted agent adopts the VMMs that kept running.
//! Every call is idempotent.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use sandfork_vmm::capture::CaptureMode;
use sandfork_vmm::devices::{self, DeviceError};
use sandfork_vmm::guest::Workload;
use sandfork_vmm::memory::{self, MemoryError};
use sandfork_vmm::snapshot::{CaptureDir, SnapshotError, SnapshotState};

use crate::state_dir;
use crate::vmhost::{
    self, CaptureInfo, ErrorKind, PID_FILE, RECORD_FILE, Request, Response, SandboxRecord,
};

pub use crate::vmhost::CaptureInfo as Capture;

const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a Pod's VMM may take to open its socket once the Pod runs.
const POD_VMM_TIMEOUT: Duration = Duration::from_secs(10);
/// Where the kubelet keeps its Pods' volumes.
pub const KUBELET_PODS_DIR: &str = "/var/lib/kubelet/pods";
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
const CAPTURE_TIMEOUT: Duration = Duration::from_secs(600);
const LOG_FILE: &str = "vm.log";
/// `f_type` of a tmpfs in statfs(2).
const TMPFS_MAGIC: i64 = 0x0102_1994;

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("invalid name {0:?}: use 1 to 63 lowercase letters, digits and '-'")]
    InvalidName(String),
    #[error("invalid sandbox spec: {0}")]
    InvalidSpec(String),
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} {name:?} already exists with a different spec")]
    AlreadyExists { kind: &'static str, name: String },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(
        "a device is missing or not usable: sandboxes need KVM and userfaultfd (run as root on a KVM host)"
    )]
    DevicesMissing(#[source] DeviceError),
    /// The sandbox's VM host reported a failure.
    #[error("sandbox {name:?}")]
    Vm {
        name: String,
        #[source]
        source: VmHostError,
    },
    #[error("sandbox {name:?}: the VMM of Pod {pod_uid} is not on this node or not up yet")]
    PodVmmNotReady { name: String, pod_uid: String },
    #[error("invalid Pod UID {0:?}")]
    InvalidPodUid(String),
    #[error("sandbox {name:?}: VM process not reachable")]
    VmUnreachable {
        name: String,
        #[source]
        source: std::io::Error,
    },
    /// The VM process did not come up; `reason` is its own account (its
    /// failure, or its log's tail).
    #[error("sandbox {name:?}: {reason}")]
    VmStart { name: String, reason: String },
    #[error("sandbox {name:?}: unexpected reply {reply}")]
    UnexpectedReply { name: String, reply: String },
    #[error("invalid record {path}")]
    Record {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "state directory {0} is not on a tmpfs: captures hold guest memory and are filled in \
         place while branches run, which needs shared memory (use e.g. /run/sandfork on a host \
         whose /run is a tmpfs, or /dev/shm/sandfork)"
    )]
    NotTmpfs(PathBuf),
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A failure the VM host reported, with its kind.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct VmHostError {
    pub kind: ErrorKind,
    pub message: String,
}

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ManagerError + 'a {
    move |source| ManagerError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// What a branch is restored from: its capture's state and, while the
/// capture's copy runs, a connection to its fill socket.
struct Restore {
    state: Box<SnapshotState>,
    fill: Option<std::os::unix::net::UnixStream>,
}

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSpec {
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u8,
    pub workload: Workload,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum SandboxState {
    Running,
    /// The VM stopped on an error, or its process died.
    Failed {
        reason: String,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SandboxInfo {
    pub name: String,
    pub pid: Option<u32>,
    #[serde(flatten)]
    pub state: SandboxState,
    pub memory_mib: u64,
    pub vcpus: u8,
    pub workload: Workload,
    pub origin: Option<String>,
    /// The Pod whose VMM runs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    pub reports: Vec<u64>,
    pub report_counts: Vec<u64>,
}

pub fn validate_name(name: &str) -> Result<(), ManagerError> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-');
    if valid {
        Ok(())
    } else {
        Err(ManagerError::InvalidName(name.to_owned()))
    }
}

/// Checks that KVM and userfaultfd can be opened.
pub fn check_devices() -> Result<(), ManagerError> {
    devices::check().map_err(ManagerError::DevicesMissing)
}

pub struct Manager {
    root: PathBuf,
    /// The agent binary, started as `vm-host` for a sandbox without a Pod.
    exe: PathBuf,
    /// The kubelet's pods directory, where Pods' VMM sockets are.
    pods_dir: PathBuf,
    /// Most bytes captures of sandboxes in Pods may hold.
    capture_budget: Option<u64>,
}

/// The Pod UIDs the API server makes are UUIDs; nothing else becomes a path.
pub fn validate_pod_uid(uid: &str) -> Result<(), ManagerError> {
    let valid = !uid.is_empty()
        && uid.len() <= 64
        && uid
            .bytes()
            .all(|byte| byte.is_ascii_hexdigit() || byte == b'-');
    if valid {
        Ok(())
    } else {
        Err(ManagerError::InvalidPodUid(uid.to_owned()))
    }
}

impl Manager {
    /// Opens (creating if needed) the state directory `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, ManagerError> {
        let exe = std::env::current_exe().map_err(io_err("find", Path::new("current exe")))?;
        Self::with_agent_binary(root, exe)
    }

    /// Like `open`, starting VM processes from `exe` (tests use this).
    pub fn with_agent_binary(
        root: impl Into<PathBuf>,
        exe: impl Into<PathBuf>,
    ) -> Result<Self, ManagerError> {
        let root = root.into();
        let captures = state_dir::captures(&root);
        for dir in [root.clone(), state_dir::sandboxes(&root), captures.clone()] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io_err("create", &dir))?;
        }
        let stat = rustix::fs::statfs(&captures)
            .map_err(|errno| io_err("statfs", &captures)(errno.into()))?;
        if stat.f_type != TMPFS_MAGIC {
            return Err(ManagerError::NotTmpfs(root));
        }
        Ok(Self {
            root,
            exe: exe.into(),
            pods_dir: KUBELET_PODS_DIR.into(),
            capture_budget: None,
        })
    }

    /// Holds captures of sandboxes in Pods to `mib` MiB in all: what the
    /// agent's Pod requests for them.
    pub fn with_capture_budget_mib(mut self, mib: Option<u64>) -> Self {
        self.capture_budget = mib.map(|mib| mib << 20);
        self
    }

    /// Bytes the captures' memory files hold now.
    fn capture_bytes_held(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        list_dir(&self.captures_dir())
            .unwrap_or_default()
            .iter()
            .filter_map(|name| std::fs::metadata(self.capture_dir(name).memory_path()).ok())
            .map(|meta| meta.blocks() * 512)
            .sum()
    }

    /// How much more memory captures may take, if this agent has a budget.
    /// The VMM refuses a capture whose guest memory holds more data now
    /// (the capture's holes cost nothing).
    fn capture_allowance(&self) -> Option<u64> {
        self.capture_budget
            .map(|budget| budget.saturating_sub(self.capture_bytes_held()))
    }

    /// Looks for Pods' VMM sockets under `dir` instead of the kubelet's
    /// default pods directory.
    pub fn with_pods_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.pods_dir = dir.into();
        self
    }

    /// Where the VMM of `record` has its control socket.
    fn control_dir(&self, record: &SandboxRecord) -> PathBuf {
        match &record.pod_uid {
            Some(uid) => self
                .pods_dir
                .join(uid)
                .join("volumes/kubernetes.io~empty-dir")
                .join(sandfork_api::pod::VMM_VOLUME),
            None => self.sandbox_dir(&record.name),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn sandbox_dir(&self, name: &str) -> PathBuf {
        state_dir::sandbox(&self.root, name)
    }

    fn captures_dir(&self) -> PathBuf {
        state_dir::captures(&self.root)
    }

    fn capture_dir(&self, name: &str) -> CaptureDir {
        state_dir::capture(&self.root, name)
    }

    /// Starts a sandbox. Running an identical spec again returns the
    /// existing sandbox.
    pub fn run(&self, spec: &SandboxSpec) -> Result<SandboxInfo, ManagerError> {
        self.run_on(spec, None)
    }

    /// Starts a sandbox in the VMM of Pod `pod_uid`, or (with `None`) in a
    /// VMM process started now.
    pub fn run_on(
        &self,
        spec: &SandboxSpec,
        pod_uid: Option<&str>,
    ) -> Result<SandboxInfo, ManagerError> {
        validate_name(&spec.name)?;
        pod_uid.map(validate_pod_uid).transpose()?;
        sandfork_vmm::vm::check_vcpu_count(spec.vcpus.into())
            .map_err(|err| ManagerError::InvalidSpec(err.to_string()))?;
        let bytes = spec
            .memory_mib
            .checked_mul(1 << 20)
            .ok_or_else(|| ManagerError::InvalidSpec("memory too large".into()))?;
        memory::validate_size(bytes, true)?;
        // A Pod's guest image is in the Pod, where its VMM reads it.
        if let Workload::Flat { path } = &spec.workload
            && pod_uid.is_none()
            && !path.is_file()
        {
            return Err(ManagerError::InvalidSpec(format!(
                "guest image {} does not exist",
                path.display()
            )));
        }
        let record = SandboxRecord {
            name: spec.name.clone(),
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            workload: spec.workload.clone(),
            origin: None,
            pod_uid: pod_uid.map(str::to_owned),
        };
        self.start(record, None)
    }

    /// Starts sandbox `name` as a branch of `capture`.
    pub fn branch(&self, name: &str, capture: &str) -> Result<SandboxInfo, ManagerError> {
        self.branch_on(name, capture, None)
    }

    /// Starts sandbox `name` as a branch of `capture`, in the VMM of Pod
    /// `pod_uid` or in a VMM process started now.
    pub fn branch_on(
        &self,
        name: &str,
        capture: &str,
        pod_uid: Option<&str>,
    ) -> Result<SandboxInfo, ManagerError> {
        validate_name(name)?;
        validate_name(capture)?;
        pod_uid.map(validate_pod_uid).transpose()?;
        let dir = self.capture_dir(capture);
        let (state, fill) = dir.parts_for_restore().map_err(|err| match err {
            SnapshotError::NotFound(_) => ManagerError::NotFound {
                kind: "capture",
                name: capture.to_owned(),
            },
            other => other.into(),
        })?;
        let source = self.read_record(&state.source).ok();
        let record = SandboxRecord {
            name: name.to_owned(),
            memory_mib: state.memory_bytes >> 20,
            vcpus: state.vcpus.len() as u8,
            workload: source.map_or(Workload::Idle, |record| record.workload),
            origin: Some(capture.to_owned()),
            pod_uid: pod_uid.map(str::to_owned),
        };
        self.start(
            record,
            Some(Restore {
                state: Box::new(state),
                fill,
            }),
        )
    }

    fn start(
        &self,
        record: SandboxRecord,
        restore: Option<Restore>,
    ) -> Result<SandboxInfo, ManagerError> {
        check_devices()?;
        let dir = self.sandbox_dir(&record.name);
        if let Ok(existing) = self.read_record(&record.name) {
            let same = existing == record
                || (existing.origin.is_some() && existing.origin == record.origin);
            if !same {
                return Err(ManagerError::AlreadyExists {
                    kind: "sandbox",
                    name: record.name,
                });
            }
            if let Ok(info) = self.status(&record.name)
                && info.state == SandboxState::Running
            {
                return Ok(info);
            }
            // A record without a live VM (a crash mid-start): start afresh;
            // a Pod's VMM stays, waiting for its start.
            if record.pod_uid.is_some() {
                std::fs::remove_dir_all(&dir).map_err(io_err("remove", &dir))?;
            } else {
                self.delete(&record.name)?;
            }
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("create", &dir))?;
        let record_path = dir.join(RECORD_FILE);
        let write_record = match serde_json::to_vec_pretty(&record) {
            Ok(json) => std::fs::write(&record_path, json).map_err(io_err("write", &record_path)),
            Err(source) => Err(ManagerError::Record {
                path: record_path.clone(),
                source,
            }),
        };
        if let Err(err) = write_record {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(err);
        }
        match self.launch(&record, &dir, restore) {
            Ok(info) => Ok(info),
            Err(err) => {
                let _ = self.delete(&record.name);
                Err(err)
            }
        }
    }

    /// Finds the sandbox's VMM (its Pod's, or a process started now) and has
    /// it start the VM.
    fn launch(
        &self,
        record: &SandboxRecord,
        dir: &Path,
        restore: Option<Restore>,
    ) -> Result<SandboxInfo, ManagerError> {
        let name = record.name.as_str();
        let control = self.control_dir(record);
        let mut child = match &record.pod_uid {
            Some(pod_uid) => {
                wait_for_vmm(&control, POD_VMM_TIMEOUT).map_err(|()| {
                    ManagerError::PodVmmNotReady {
                        name: name.to_owned(),
                        pod_uid: pod_uid.clone(),
                    }
                })?;
                None
            }
            None => Some(self.spawn_vm_process(name, dir)?),
        };
        let (restore, fds) = match (&record.origin, restore) {
            (Some(capture), Some(Restore { state, fill })) => {
                let memory = self.capture_dir(capture).open_memory()?;
                let mut fds: Vec<OwnedFd> = vec![memory.into()];
                fds.extend(fill.map(OwnedFd::from));
                (Some(state), fds)
            }
            _ => (None, Vec::new()),
        };
        let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
        let request = Request::Start {
            record: record.clone(),
            restore,
        };
        let asked = Instant::now();
        let reply = vmhost::call_with(&control, &request, &borrowed, START_TIMEOUT);
        tracing::info!(
            sandbox = name,
            branch = record.origin.is_some(),
            vmm_us = asked.elapsed().as_micros() as u64,
            "start answered"
        );
        drop(fds);
        let result = match reply {
            Ok(Response::Started(status)) => match status.failure {
                None => Ok(self.info(record.clone(), Ok(Response::Status(status)))),
                Some(reason) => Err(ManagerError::VmStart {
                    name: name.to_owned(),
                    reason,
                }),
            },
            other => Err(failed_reply(name, other)),
        };
        if let Some(mut child) = child.take() {
            if result.is_err() {
                let _ = vmhost::call(&control, &Request::Stop, STATUS_TIMEOUT);
                let _ = child.kill();
                let _ = child.wait();
            } else {
                // Reap the VM process whenever it exits, so no zombie stays.
                std::thread::spawn(move || child.wait());
            }
        }
        result
    }

    /// Starts a VMM process for the sandbox in `dir`; returns once it
    /// serves its control socket.
    fn spawn_vm_process(
        &self,
        name: &str,
        dir: &Path,
    ) -> Result<std::process::Child, ManagerError> {
        let log_path = dir.join(LOG_FILE);
        let log = std::fs::File::create(&log_path).map_err(io_err("create", &log_path))?;
        let log_err = log.try_clone().map_err(io_err("dup", &log_path))?;
        let mut command = Command::new(&self.exe);
        command
            .arg("vm-host")
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        sandfork_vmm::process::in_new_session(&mut command);
        let mut child = command.spawn().map_err(io_err("start", &self.exe))?;
        let started = Instant::now();
        loop {
            if let Ok(Response::Status(_)) = vmhost::call(dir, &Request::Status, STATUS_TIMEOUT) {
                return Ok(child);
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(ManagerError::VmStart {
                    name: name.to_owned(),
                    reason: format!("VM process exited ({status}): {}", log_tail(&log_path)),
                });
            }
            if started.elapsed() > START_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ManagerError::VmStart {
                    name: name.to_owned(),
                    reason: format!("VM process did not start in {START_TIMEOUT:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn read_record(&self, name: &str) -> Result<SandboxRecord, ManagerError> {
        let path = self.sandbox_dir(name).join(RECORD_FILE);
        let bytes = std::fs::read(&path).map_err(|_| ManagerError::NotFound {
            kind: "sandbox",
            name: name.to_owned(),
        })?;
        serde_json::from_slice(&bytes).map_err(|source| ManagerError::Record { path, source })
    }

    fn pid_of(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.sandbox_dir(name).join(PID_FILE))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn status(&self, name: &str) -> Result<SandboxInfo, ManagerError> {
        validate_name(name)?;
        let record = self.read_record(name)?;
        let control = self.control_dir(&record);
        let reply = vmhost::call(&control, &Request::Status, STATUS_TIMEOUT);
        Ok(self.info(record, reply))
    }

    /// What `record`'s VMM said of its VM in `reply`.
    fn info(&self, record: SandboxRecord, reply: std::io::Result<Response>) -> SandboxInfo {
        let in_pod = record.pod_uid.is_some();
        let mut info = SandboxInfo {
            // A Pod's VMM has its pid in the Pod's namespace: none to report.
            pid: if in_pod {
                None
            } else {
                self.pid_of(&record.name)
            },
            name: record.name,
            state: SandboxState::Running,
            memory_mib: record.memory_mib,
            vcpus: record.vcpus,
            workload: record.workload,
            origin: record.origin,
            pod_uid: record.pod_uid,
            reports: Vec::new(),
            report_counts: Vec::new(),
        };
        match reply {
            Ok(Response::Status(status)) if !status.started => {
                info.state = SandboxState::Failed {
                    reason: "its VMM has not started the VM".into(),
                };
            }
            Ok(Response::Status(status)) => {
                if !in_pod {
                    info.pid = Some(status.pid);
                }
                info.reports = status.reports;
                info.report_counts = status.report_counts;
                if let Some(reason) = status.failure {
                    info.state = SandboxState::Failed { reason };
                }
            }
            Ok(other) => {
                info.state = SandboxState::Failed {
                    reason: format!("unexpected reply {other:?}"),
                }
            }
            Err(err) => {
                info.state = SandboxState::Failed {
                    reason: format!(
                        "VM process not reachable ({err}): {}",
                        log_tail(&self.sandbox_dir(&info.name).join(LOG_FILE))
                    ),
                }
            }
        }
        info
    }

    pub fn list(&self) -> Result<Vec<SandboxInfo>, ManagerError> {
        let mut names = list_dir(&state_dir::sandboxes(&self.root))?;
        names.sort();
        Ok(names
            .iter()
            .filter_map(|name| self.status(name).ok())
            .collect())
    }

    /// Captures sandbox `sandbox` as `capture`. If the capture exists, returns it.
    ///
    /// Without `wait`, a live capture returns once the sandbox runs again, and
    /// its memory copy goes on in the sandbox's VM process; branches can be
    /// started from it at once. `verify` implies `wait`.
    pub fn capture(
        &self,
        sandbox: &str,
        capture: &str,
        mode: CaptureMode,
        verify: bool,
        wait: bool,
    ) -> Result<CaptureInfo, ManagerError> {
        validate_name(sandbox)?;
        validate_name(capture)?;
        let dir = self.capture_dir(capture);
        if let Ok(state) = dir.read_state() {
            if state.source != sandbox {
                return Err(ManagerError::AlreadyExists {
                    kind: "capture",
                    name: capture.to_owned(),
                });
            }
            if let Ok(state) = dir.restorable_state() {
                return Ok(vmhost::capture_info(capture, &state, None));
            }
            // Its copy ended without completing (the VM process died).
            tracing::warn!(capture, "removing a capture whose copy never completed");
        }
        // A directory without state is what a crash mid-capture leaves.
        dir.remove()?;
        let record = self.read_record(sandbox)?;
        // The VMM fills a directory made here, handed over as a descriptor:
        // it sees this capture and nothing else of the state directory.
        let control = self.control_dir(&record);
        let started = Instant::now();
        let max_bytes = self.capture_allowance();
        let budget_checked = started.elapsed();
        let memory_bytes = record.memory_mib << 20;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir.path())
            .map_err(io_err("create", dir.path()))?;
        // The agent maps the memory file and the VMM fills that mapping
        // through its userfaultfd: the pages are the agent's, charged to its
        // Pod, which requests memory for captures.
        let target = match dir
            .check_space(memory_bytes)
            .and_then(|()| dir.create_target(memory_bytes))
        {
            Ok(target) => target,
            Err(err) => {
                let _ = dir.remove();
                return Err(err.into());
            }
        };
        let (target_uffd, target_base) = target.remote_handle();
        let request = Request::Capture {
            target_base,
            capture: capture.to_owned(),
            mode,
            verify,
            wait,
            max_bytes,
        };
        let handed = rustix::fs::open(
            dir.path(),
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|errno| io_err("open", dir.path())(errno.into()))?;
        let prepared = started.elapsed();
        let reply = vmhost::call_with(
            &control,
            &request,
            &[handed.as_fd(), target_uffd],
            CAPTURE_TIMEOUT,
        );
        drop(handed);
        if let Ok(Response::Captured(info)) = &reply {
            tracing::info!(
                capture,
                budget_us = budget_checked.as_micros() as u64,
                target_us = (prepared - budget_checked).as_micros() as u64,
                vmm_us = (started.elapsed() - prepared).as_micros() as u64,
                pre_arm_us = info.stats.pre_arm_ns / 1000,
                pause_us = info.stats.pause_ns / 1000,
                "captured"
            );
        }
        match &reply {
            Ok(Response::Captured(info)) if !info.memory_complete => {
                keep_until_copied(target);
            }
            Ok(Response::Captured(_)) => drop(target),
            _ => {
                drop(target);
                let _ = dir.remove();
            }
        }
        match reply {
            Ok(Response::Captured(info)) => Ok(info),
            other => Err(failed_reply(sandbox, other)),
        }
    }

    pub fn list_captures(&self) -> Result<Vec<CaptureInfo>, ManagerError> {
        let mut names = list_dir(&self.captures_dir())?;
        names.sort();
        Ok(names
            .iter()
            .filter_map(|name| {
                let dir = self.capture_dir(name);
                let state = dir.read_state().ok()?;
                Some(vmhost::capture_info(name, &state, None))
            })
            .collect())
    }

    pub fn delete_capture(&self, name: &str) -> Result<(), ManagerError> {
        validate_name(name)?;
        Ok(self.capture_dir(name).remove()?)
    }

    /// Whether a capture of sandbox `name` is still copying.
    fn copying_from(&self, name: &str) -> bool {
        list_dir(&self.captures_dir())
            .unwrap_or_default()
            .iter()
            .map(|capture| self.capture_dir(capture))
            .any(|dir| {
                dir.read_state()
                    .is_ok_and(|state| state.source == name && !state.memory_complete)
                    && dir.is_copying()
            })
    }

    /// Stops the sandbox's VM process and removes its files. Deleting a
    /// sandbox that does not exist succeeds.
    pub fn delete(&self, name: &str) -> Result<(), ManagerError> {
        validate_name(name)?;
        let dir = self.sandbox_dir(name);
        if !dir.exists() {
            return Ok(());
        }
        if let Ok(record) = self.read_record(name)
            && record.pod_uid.is_some()
        {
            // The VMM finishes its captures' copies, then exits; its Pod is
            // the operator's to delete.
            let control = self.control_dir(&record);
            let _ = vmhost::call(&control, &Request::Stop, STATUS_TIMEOUT);
            let deadline = Instant::now() + CAPTURE_TIMEOUT;
            while vmhost::call(&control, &Request::Status, STATUS_TIMEOUT).is_ok()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            return std::fs::remove_dir_all(&dir).map_err(io_err("remove", &dir));
        }
        let pid = self.pid_of(name);
        // A VM process finishes its captures' copies before it exits:
        // branches started during a copy still need it.
        let timeout = if self.copying_from(name) {
            CAPTURE_TIMEOUT
        } else {
            STOP_TIMEOUT
        };
        let _ = vmhost::call(&dir, &Request::Stop, STATUS_TIMEOUT);
        if let Some(pid) = pid
            && !wait_for_exit(pid, timeout)
            && is_vm_host_of(pid, &dir)
        {
            tracing::warn!(sandbox = name, pid, "VM process ignored stop; killing it");
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
            wait_for_exit(pid, STOP_TIMEOUT);
        }
        std::fs::remove_dir_all(&dir).map_err(io_err("remove", &dir))
    }
}

fn list_dir(dir: &Path) -> Result<Vec<String>, ManagerError> {
    Ok(std::fs::read_dir(dir)
        .map_err(io_err("read", dir))?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| validate_name(name).is_ok())
        .collect())
}

/// Whether `pid` is still the VM host serving `dir` (guards against
/// signalling a reused pid).
fn is_vm_host_of(pid: u32, dir: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
        let args: Vec<&[u8]> = cmdline.split(|&byte| byte == 0).collect();
        args.contains(&b"vm-host".as_slice()) && args.contains(&dir.as_os_str().as_encoded_bytes())
    })
}

/// The error for a VMM's reply that is not the one asked for: its own
/// failure, another reply, or none.
fn failed_reply(name: &str, reply: std::io::Result<Response>) -> ManagerError {
    let name = name.to_owned();
    match reply {
        Ok(Response::Error { kind, message }) => ManagerError::Vm {
            name,
            source: VmHostError { kind, message },
        },
        Ok(other) => ManagerError::UnexpectedReply {
            name,
            reply: format!("{other:?}"),
        },
        Err(source) => ManagerError::VmUnreachable { name, source },
    }
}

/// Keeps the agent's mapping of a capture whose copy runs until the VMM is
/// done filling it: the copy completed or failed and the VMM answers its
/// branches no more, or the VMM exited. A capture deleted meanwhile is no
/// different: its branches still need the rest of its memory.
fn keep_until_copied(target: sandfork_vmm::memory::SnapshotMapping) {
    let kept = std::thread::Builder::new()
        .name("capture-target".into())
        .spawn(move || {
            if let Err(err) = target.wait_for_fillers() {
                tracing::error!(error = %err, "cannot tell when a capture's copy ends: its copy may fail");
            }
            drop(target);
        });
    if let Err(err) = kept {
        tracing::error!(error = %err, "cannot keep a capture's mapping: its copy fails");
    }
}

/// Waits until the VMM in `dir` answers; `Err` after `timeout`.
fn wait_for_vmm(dir: &Path, timeout: Duration) -> Result<(), ()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Response::Status(_)) = vmhost::call(dir, &Request::Status, STATUS_TIMEOUT) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn process_alive(pid: u32) -> bool {
    // A zombie has exited; only its parent's wait is pending.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

fn wait_for_exit(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while process_alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}
