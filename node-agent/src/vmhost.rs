//! The VMM process of one sandbox and the protocol the agent uses to talk
//! to it.
//!
//! Each sandbox's VM runs in a process of its own (`sandfork-agent vm-host`):
//! the sandbox's Pod's container on a Kubernetes node, or a process the
//! agent starts itself (node tests, benchmarks). Either way the agent can
//! crash or restart without taking VMs down, and a crashing VM cannot take
//! the agent down. The process starts empty and serves newline-delimited
//! JSON requests on a Unix socket in its directory (`wire`); the agent's
//! `Start` says what to run, and hands a branch its capture's memory as a
//! file descriptor, as it hands a capture the directory to fill. The VMM
//! never sees the agent's state directory, other sandboxes or captures.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use sandfork_vmm::capture::{Arm, CaptureError, CaptureMode, CaptureStats};
use sandfork_vmm::guest::{
    CounterMismatch, CounterState, GuestError, GuestImage, Workload, verify_counter,
};
use sandfork_vmm::memory::{MemoryError, ReadOnlyMapping};
use sandfork_vmm::snapshot::{CaptureDir, RemoteTarget, SnapshotError, SnapshotState};
use sandfork_vmm::vcpu::VcpuError;
use sandfork_vmm::vm::{Vm, VmError};

use crate::wire;

pub const CONTROL_SOCKET: &str = "control.sock";
pub const RECORD_FILE: &str = "sandbox.json";
pub const PID_FILE: &str = "pid";

/// What a sandbox is, as stored in its directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u8,
    pub workload: Workload,
    /// The capture a branch was restored from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// The UID of the Pod whose VMM runs it; none for a VMM process the
    /// agent started itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Status,
    /// Runs `record`'s VM: boots its guest or, for a branch, restores
    /// `restore` from the capture memory file sent with it (and, while the
    /// capture's copy runs, a connection to its fill socket).
    Start {
        record: SandboxRecord,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        restore: Option<Box<SnapshotState>>,
    },
    /// The byte ranges of guest memory that hold data (the rest are holes,
    /// which a capture neither copies nor allocates). Agents now send the
    /// budget with the capture; this stays for one that asks first.
    Populated,
    /// Capture into the directory sent with the request, filling its memory
    /// file through the agent's mapping of it: the userfaultfd sent second,
    /// the mapping at `target_base` in the agent.
    Capture {
        target_base: u64,
        capture: String,
        mode: CaptureMode,
        /// Check a counter guest's capture for consistency afterwards.
        #[serde(default)]
        verify: bool,
        /// Answer only once the memory copy is complete. Otherwise a live
        /// capture answers as soon as the VM runs again, and branches of it
        /// can start while the copy goes on.
        #[serde(default = "wait_by_default")]
        wait: bool,
        /// The most guest memory holding data that the capture may copy
        /// (what the agent's capture budget has left): a larger one is
        /// refused before the VM pauses. Asked here rather than in a call
        /// of its own, which cost a round trip on every capture.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_bytes: Option<u64>,
    },
    Stop,
}

fn wait_by_default() -> bool {
    true
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    Status(VmStatus),
    Started(VmStatus),
    Populated {
        /// `[offset, length]` in bytes, in order.
        ranges: Vec<[u64; 2]>,
    },
    Captured(CaptureInfo),
    Stopped,
    Error {
        /// What kind of failure, for the agent's status code (a VM host
        /// that predates it sends none: `Internal`).
        #[serde(default)]
        kind: ErrorKind,
        message: String,
    },
}

/// The kind of a failure the VM host reports: what a caller can do about
/// it (the agent maps each to a gRPC status code).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The request (or a file it names) is invalid.
    InvalidArgument,
    NotFound,
    AlreadyExists,
    /// Not enough memory or space on this node.
    ResourceExhausted,
    /// The sandbox or capture is not in a state that allows it.
    FailedPrecondition,
    #[default]
    Internal,
}

impl ErrorKind {
    /// The kind of a snapshot (capture, restore, import) failure.
    pub fn of_snapshot(err: &SnapshotError) -> Self {
        match err {
            SnapshotError::NotFound(_) => Self::NotFound,
            SnapshotError::Exists(_) => Self::AlreadyExists,
            SnapshotError::NoSpace { .. } => Self::ResourceExhausted,
            SnapshotError::Memory(err) => Self::of_memory(err),
            SnapshotError::Format { .. } => Self::InvalidArgument,
            SnapshotError::Abandoned(_) | SnapshotError::Copying(_) => Self::FailedPrecondition,
            SnapshotError::Vm(err) | SnapshotError::Capture(CaptureError::Vm(err)) => {
                Self::of_vm(err)
            }
            _ => Self::Internal,
        }
    }

    /// The kind of a VM failure.
    pub fn of_vm(err: &VmError) -> Self {
        match err {
            VmError::Memory(err) => Self::of_memory(err),
            VmError::InvalidVcpuCount(_) => Self::InvalidArgument,
            VmError::Stopped(_) | VmError::Vcpu(VcpuError::OpenKvm(_)) => Self::FailedPrecondition,
            _ => Self::Internal,
        }
    }

    /// The kind of a guest memory failure.
    pub fn of_memory(err: &MemoryError) -> Self {
        match err {
            MemoryError::InvalidSize { .. } => Self::InvalidArgument,
            MemoryError::HostTooSmall { .. } => Self::ResourceExhausted,
            _ => Self::Internal,
        }
    }
}

/// Why the VM host could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("capture failed verification")]
    Verification(#[from] CounterMismatch),
    #[error("the VM is stopping")]
    Stopping,
    #[error("the capture worker stopped")]
    WorkerGone,
    #[error("bad request")]
    BadRequest(#[source] serde_json::Error),
    #[error("a {0} request needs its descriptors")]
    MissingDescriptors(&'static str),
    #[error("no VM runs here yet")]
    NotStarted,
    #[error("a VM runs here already")]
    AlreadyStarted,
    #[error("cannot start the VM")]
    Start(#[source] Box<ServeError>),
    #[error(
        "a capture of {wanted_mib} MiB does not fit: {allowed_mib} MiB are left of what the \
         agent may hold for captures (its Pod's memory request)"
    )]
    OverBudget { wanted_mib: u64, allowed_mib: u64 },
}

impl HostError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Snapshot(err) => ErrorKind::of_snapshot(err),
            Self::Verification(_) => ErrorKind::Internal,
            Self::Stopping | Self::WorkerGone | Self::NotStarted | Self::AlreadyStarted => {
                ErrorKind::FailedPrecondition
            }
            Self::BadRequest(_) | Self::MissingDescriptors(_) => ErrorKind::InvalidArgument,
            Self::Start(err) => err.kind(),
            Self::OverBudget { .. } => ErrorKind::ResourceExhausted,
        }
    }

    fn response(&self) -> Response {
        Response::Error {
            kind: self.kind(),
            message: sandfork_vmm::error::chain(self),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmStatus {
    pub pid: u32,
    /// False while the VMM waits for its `Start`.
    #[serde(default = "started_by_default")]
    pub started: bool,
    /// Why the VM stopped running, if it did.
    pub failure: Option<String>,
    /// Last value each vCPU reported, and how many reports it made.
    pub reports: Vec<u64>,
    pub report_counts: Vec<u64>,
}

/// A capture kept on the node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaptureInfo {
    pub name: String,
    pub source: String,
    pub memory_bytes: u64,
    pub stats: CaptureStats,
    /// Per vCPU, the instruction pointer at the captured instant.
    pub vcpu_rips: Vec<u64>,
    /// For a verified counter guest: the pass each vCPU was writing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counter: Option<CounterState>,
    /// False while a live capture's memory copy is still running.
    #[serde(default = "sandfork_vmm::snapshot::complete_by_default")]
    pub memory_complete: bool,
}

fn started_by_default() -> bool {
    true
}

/// Whether the VMM serving `dir` answers a status request.
pub fn probe(dir: &Path) -> std::io::Result<()> {
    match call(dir, &Request::Status, Duration::from_secs(1))? {
        Response::Status(_) => Ok(()),
        other => Err(std::io::Error::other(format!(
            "the VMM answered {other:?} to a status request"
        ))),
    }
}

/// Sends one request to the VMM whose control socket is in `dir`.
pub fn call(dir: &Path, request: &Request, timeout: Duration) -> std::io::Result<Response> {
    call_with(dir, request, &[], timeout)
}

/// Like `call`, handing the VMM `fds` with the request.
pub fn call_with(
    dir: &Path,
    request: &Request,
    fds: &[std::os::fd::BorrowedFd<'_>],
    timeout: Duration,
) -> std::io::Result<Response> {
    let stream = connect(dir)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    wire::send(&stream, request, fds)?;
    match wire::Reader::new(&stream).next_line()? {
        Some((reply, _)) => Ok(serde_json::from_slice(&reply)?),
        None => Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "VM process closed the connection",
        )),
    }
}

/// Connects to the control socket in `dir` through a descriptor of the
/// directory: a Pod's volume path under the kubelet's directory can be
/// longer than a socket address may be.
fn connect(dir: &Path) -> std::io::Result<UnixStream> {
    let dir = rustix::fs::open(
        dir,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    UnixStream::connect(fd_path(&dir).join(CONTROL_SOCKET))
}

/// The path that names the open file `fd` in this process.
pub fn fd_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Why the VM host could not start its VM or its control socket.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot use KVM")]
    Kvm(#[from] VcpuError),
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error("cannot boot the VM")]
    Boot(#[from] VmError),
    #[error("cannot restore the branch")]
    Restore(#[from] SnapshotError),
    #[error("a branch needs its capture's state")]
    NoCaptureState,
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ServeError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Kvm(VcpuError::OpenKvm(_)) => ErrorKind::FailedPrecondition,
            Self::Guest(_) | Self::NoCaptureState => ErrorKind::InvalidArgument,
            Self::Boot(err) => ErrorKind::of_vm(err),
            Self::Restore(err) => ErrorKind::of_snapshot(err),
            _ => ErrorKind::Internal,
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ServeError + 'a {
    move |source| ServeError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Serves the control socket in `dir`: waits for the agent's `Start`, runs
/// that VM, and serves it until asked to stop (a `Stop`, or SIGTERM, as when
/// its Pod is deleted).
pub fn serve(dir: &Path) -> Result<(), ServeError> {
    // The socket is named through a descriptor of its directory, which
    // stays open while this serves: `dir` may be longer than a socket
    // address may be.
    let dir_fd = rustix::fs::open(
        dir,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|errno| io_err("open", dir)(errno.into()))?;
    let socket_path = fd_path(&dir_fd).join(CONTROL_SOCKET);
    let _ = std::fs::remove_file(&socket_path);
    let listener = UnixListener::bind(&socket_path).map_err(io_err("bind", &socket_path))?;
    std::fs::set_permissions(&socket_path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err("chmod", &socket_path))?;
    let pid_path = dir.join(PID_FILE);
    std::fs::write(&pid_path, std::process::id().to_string())
        .map_err(io_err("write", &pid_path))?;
    stop_on_sigterm(socket_path.clone());
    prepare_kvm();
    tracing::info!(pid = std::process::id(), "VMM waiting for its sandbox");
    let started = await_start(&listener);
    if let Ok(Some((vm, record))) = &started {
        serve_vm(&listener, &socket_path, vm, record);
    }
    let _ = std::fs::remove_file(&socket_path);
    drop(dir_fd);
    started.map(|_| ())
}

/// Does the KVM set-up every VM of this process shares while there is time:
/// opening KVM, reading what it supports, and calibrating the guests' TSC
/// rate (a 20 ms measurement), so that `Start` does not wait for them. A
/// failure is only logged: `Start` meets it again and reports it.
fn prepare_kvm() {
    match sandfork_vmm::vcpu::HostKvm::get() {
        Ok(host) => {
            host.tsc_khz();
        }
        Err(err) => tracing::warn!(error = %sandfork_vmm::error::chain(&err), "KVM not usable yet"),
    }
}

/// Turns SIGTERM into a `Stop` request to this process's own socket, so that
/// a capture still copying completes before the process exits.
fn stop_on_sigterm(socket_path: PathBuf) {
    let spawned = std::thread::Builder::new()
        .name("sigterm".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build();
            let Ok(runtime) = runtime else { return };
            runtime.block_on(async {
                let Ok(mut term) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                else {
                    return;
                };
                term.recv().await;
            });
            tracing::info!("SIGTERM: stopping the VM");
            let dir = socket_path.parent().unwrap_or(Path::new("/"));
            if let Err(err) = call(dir, &Request::Stop, Duration::from_secs(5)) {
                tracing::warn!(error = %err, "could not ask to stop; exiting");
                std::process::exit(0);
            }
        });
    if let Err(err) = spawned {
        tracing::warn!(error = %err, "no SIGTERM handler");
    }
}

/// Answers requests one at a time until a `Start` succeeds (the VM and what
/// it is) or a `Stop` arrives (`None`). A failed `Start` is answered, then
/// returned: the process exits, so that a Pod whose VM could not start ends
/// (with the reason in its log) and holds no resources.
fn await_start(listener: &UnixListener) -> Result<Option<(Vm, SandboxRecord)>, ServeError> {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let mut reader = wire::Reader::new(&stream);
        while let Ok(Some((line, fds))) = reader.next_line() {
            let (response, outcome) = match serde_json::from_slice::<Request>(&line) {
                Ok(Request::Status) => (Response::Status(waiting_status()), None),
                Ok(Request::Start { record, restore }) => match start(&record, restore, fds) {
                    Ok(vm) => {
                        vm.echo_console(true);
                        tracing::info!(sandbox = %record.name, "VM running");
                        (Response::Started(status(&vm)), Some(Ok(Some((vm, record)))))
                    }
                    Err(err) => {
                        let err = HostError::Start(Box::new(err));
                        (err.response(), Some(Err(err)))
                    }
                },
                Ok(Request::Capture { .. } | Request::Populated) => {
                    (HostError::NotStarted.response(), None)
                }
                Ok(Request::Stop) => (Response::Stopped, Some(Ok(None))),
                Err(err) => (HostError::BadRequest(err).response(), None),
            };
            let sent = wire::send(&stream, &response, &[]);
            match outcome {
                Some(Ok(started)) => return Ok(started),
                Some(Err(HostError::Start(err))) => return Err(*err),
                Some(Err(_)) | None => {
                    if sent.is_err() {
                        break;
                    }
                }
            }
        }
    }
    Ok(None)
}

fn waiting_status() -> VmStatus {
    VmStatus {
        pid: std::process::id(),
        started: false,
        failure: None,
        reports: Vec::new(),
        report_counts: Vec::new(),
    }
}

/// Boots `record`'s guest, or restores its branch from the capture memory
/// file in `fds` (then, while the copy runs, the capture's fill connection).
fn start(
    record: &SandboxRecord,
    restore: Option<Box<SnapshotState>>,
    fds: Vec<OwnedFd>,
) -> Result<Vm, ServeError> {
    match &record.origin {
        None => {
            let tsc_khz = sandfork_vmm::vcpu::HostKvm::get()?.tsc_khz();
            let image = GuestImage::for_workload(&record.workload, tsc_khz)?;
            Ok(Vm::boot(
                &record.name,
                record.memory_mib << 20,
                record.vcpus.into(),
                &image,
            )?)
        }
        Some(capture) => {
            let state = restore.ok_or(ServeError::NoCaptureState)?;
            let mut fds = fds.into_iter();
            let memory = File::from(fds.next().ok_or(ServeError::NoCaptureState)?);
            // The agent cannot be asked whether a copy that went quiet
            // completed: a fill connection closed without a word fails the
            // branch rather than letting it read a hole.
            let fill = fds.next().map(|fd| {
                let complete: sandfork_vmm::fill::CompleteCheck = Box::new(|| false);
                (UnixStream::from(fd), complete)
            });
            Ok(sandfork_vmm::snapshot::restore(
                memory,
                fill,
                &state,
                Path::new(capture),
            )?)
        }
    }
}

/// Serves the running VM until asked to stop.
fn serve_vm(listener: &UnixListener, socket_path: &Path, vm: &Vm, record: &SandboxRecord) {
    // One thread per connection, so that status requests are answered while
    // a capture runs; captures themselves take turns on one worker thread,
    // which also finishes each live capture's copy after answering.
    let stopping = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (jobs, queue) = mpsc::channel::<CaptureJob>();
        scope.spawn(move || {
            for job in queue {
                run_capture(vm, record, job);
            }
        });
        for stream in listener.incoming() {
            if stopping.load(Ordering::Acquire) {
                break;
            }
            let Ok(stream) = stream else { continue };
            let (stopping, jobs) = (&stopping, jobs.clone());
            scope.spawn(move || match serve_connection(vm, &jobs, stream) {
                Ok(true) => {
                    stopping.store(true, Ordering::Release);
                    // Wake the accept loop so that it sees the stop.
                    let _ = UnixStream::connect(socket_path);
                }
                Ok(false) => {}
                Err(err) => tracing::warn!(error = %err, "control connection failed"),
            });
        }
        drop(jobs);
    });
    tracing::info!(sandbox = %record.name, "VM stopping");
}

/// A capture request for the capture worker; it answers on `reply` once the
/// VM runs again and, for a live capture, again once the copy is complete.
struct CaptureJob {
    /// The directory to fill, handed over by the agent.
    dir: OwnedFd,
    /// The agent's mapping of its memory file.
    target: RemoteTarget,
    capture: String,
    mode: CaptureMode,
    verify: bool,
    reply: mpsc::Sender<Result<CaptureInfo, HostError>>,
}

/// Serves requests on one connection; returns true when asked to stop.
fn serve_connection(
    vm: &Vm,
    jobs: &mpsc::Sender<CaptureJob>,
    stream: UnixStream,
) -> std::io::Result<bool> {
    let mut reader = wire::Reader::new(&stream);
    while let Some((line, fds)) = reader.next_line()? {
        let (response, stop) = match serde_json::from_slice::<Request>(&line) {
            Ok(Request::Status) => (Response::Status(status(vm)), false),
            Ok(Request::Start { .. }) => (HostError::AlreadyStarted.response(), false),
            Ok(Request::Populated) => (
                match populated(vm) {
                    Ok(ranges) => Response::Populated { ranges },
                    Err(err) => HostError::Snapshot(SnapshotError::Memory(err)).response(),
                },
                false,
            ),
            Ok(Request::Capture {
                target_base,
                capture,
                mode,
                verify,
                wait,
                max_bytes,
            }) => {
                let mut fds = fds.into_iter();
                let response = match (fds.next(), fds.next()) {
                    (Some(dir), Some(uffd)) => {
                        let target = RemoteTarget {
                            uffd,
                            base: target_base,
                        };
                        let captured = fits(vm, max_bytes).and_then(|()| {
                            request_capture(jobs, dir, target, capture, mode, verify, wait)
                        });
                        match captured {
                            Ok(info) => Response::Captured(info),
                            Err(err) => err.response(),
                        }
                    }
                    _ => HostError::MissingDescriptors("capture").response(),
                };
                (response, false)
            }
            Ok(Request::Stop) => {
                // The guest stops now; a capture still copying finishes
                // before the process exits (its branches need it), and
                // faster without guest writes.
                let _ = vm.pause(false);
                (Response::Stopped, true)
            }
            Err(err) => (HostError::BadRequest(err).response(), false),
        };
        wire::send(&stream, &response, &[])?;
        if stop {
            return Ok(true);
        }
    }
    Ok(false)
}

fn request_capture(
    jobs: &mpsc::Sender<CaptureJob>,
    dir: OwnedFd,
    target: RemoteTarget,
    capture: String,
    mode: CaptureMode,
    verify: bool,
    wait: bool,
) -> Result<CaptureInfo, HostError> {
    let (reply, answers) = mpsc::channel();
    jobs.send(CaptureJob {
        dir,
        target,
        capture,
        mode,
        verify,
        reply,
    })
    .map_err(|_| HostError::Stopping)?;
    let mut answer = answers.recv().map_err(|_| HostError::WorkerGone)?;
    if wait {
        // A live capture answers twice; the last answer is the final one.
        while let Ok(next) = answers.recv() {
            answer = next;
        }
    }
    answer
}

/// Captures as `job` asks: a live capture answers once the VM runs again
/// (unless it is to be verified, which needs the whole memory) and again
/// when its copy is complete.
fn run_capture(vm: &Vm, record: &SandboxRecord, job: CaptureJob) {
    // The directory stays open (and so reachable by this path) until the
    // job, and with it the copy, is done.
    let dir = CaptureDir::handed_over(fd_path(&job.dir.as_fd()), job.target);
    let name = job.capture.as_str();
    if job.mode == CaptureMode::StopAndCopy || job.verify {
        let _ = job
            .reply
            .send(capture_into(vm, record, &dir, name, job.mode, job.verify));
        return;
    }
    let running = match dir.start_live(vm, &record.name, Arm::AheadOfPause) {
        Ok(running) => running,
        Err(err) => {
            let _ = job.reply.send(Err(err.into()));
            return;
        }
    };
    let _ = job
        .reply
        .send(Ok(capture_info(name, running.state(), None)));
    let finished = running.finish();
    if let Err(err) = &finished {
        tracing::warn!(capture = name, error = %err, "live capture failed during its copy");
    }
    let _ = job.reply.send(
        finished
            .map(|state| capture_info(name, &state, None))
            .map_err(Into::into),
    );
}

/// Refuses a capture that would copy more than `max_bytes` of `vm`'s memory.
fn fits(vm: &Vm, max_bytes: Option<u64>) -> Result<(), HostError> {
    let Some(max_bytes) = max_bytes else {
        return Ok(());
    };
    let ranges = populated(vm).map_err(|err| HostError::Snapshot(SnapshotError::Memory(err)))?;
    let wanted: u64 = ranges.iter().map(|[_, len]| len).sum();
    if wanted > max_bytes {
        return Err(HostError::OverBudget {
            wanted_mib: wanted.div_ceil(1 << 20),
            allowed_mib: max_bytes >> 20,
        });
    }
    Ok(())
}

/// The byte ranges of `vm`'s memory that are not holes.
fn populated(vm: &Vm) -> Result<Vec<[u64; 2]>, MemoryError> {
    let memory = vm.memory();
    let page = sandfork_vmm::memory::PAGE_SIZE as u64;
    let mut ranges = Vec::new();
    let mut next = 0u64;
    for hole in memory.holes_in(0..memory.pages())? {
        let start = hole.start as u64 * page;
        if start > next {
            ranges.push([next, start - next]);
        }
        next = hole.end as u64 * page;
    }
    let end = memory.len() as u64;
    if end > next {
        ranges.push([next, end - next]);
    }
    Ok(ranges)
}

fn status(vm: &Vm) -> VmStatus {
    VmStatus {
        pid: std::process::id(),
        started: true,
        failure: vm.failure(),
        reports: vm
            .reports()
            .iter()
            .map(|report| report.last.load(Ordering::Relaxed))
            .collect(),
        report_counts: vm
            .reports()
            .iter()
            .map(|report| report.count.load(Ordering::Relaxed))
            .collect(),
    }
}

fn capture_into(
    vm: &Vm,
    record: &SandboxRecord,
    dir: &CaptureDir,
    name: &str,
    mode: CaptureMode,
    verify: bool,
) -> Result<CaptureInfo, HostError> {
    let state = dir.capture_from(vm, mode, &record.name)?;
    let counter = if verify && record.workload == Workload::Counter {
        let memory = ReadOnlyMapping::new(&dir.open_memory()?).map_err(SnapshotError::Memory)?;
        let regs: Vec<_> = state.vcpus.iter().map(|vcpu| vcpu.regs).collect();
        match verify_counter(memory.as_slice(), &regs) {
            Ok(counter) => Some(counter),
            Err(mismatch) => {
                let _ = dir.remove();
                return Err(mismatch.into());
            }
        }
    } else {
        None
    };
    Ok(capture_info(name, &state, counter))
}

pub fn capture_info(
    name: &str,
    state: &SnapshotState,
    counter: Option<CounterState>,
) -> CaptureInfo {
    CaptureInfo {
        name: name.to_owned(),
        source: state.source.clone(),
        memory_bytes: state.memory_bytes,
        stats: state.stats.clone(),
        vcpu_rips: state.vcpus.iter().map(|vcpu| vcpu.regs.rip).collect(),
        counter,
        memory_complete: state.memory_complete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_replies_carry_their_kind() {
        let reply = HostError::Stopping.response();
        let line = serde_json::to_string(&reply).unwrap();
        assert_eq!(
            line,
            r#"{"result":"error","kind":"failed-precondition","message":"the VM is stopping"}"#
        );
        let Response::Error { kind, .. } = serde_json::from_str(&line).unwrap() else {
            panic!("not an error: {line}");
        };
        assert_eq!(kind, ErrorKind::FailedPrecondition);
    }

    #[test]
    fn error_replies_of_older_vm_hosts_are_internal() {
        let reply: Response = serde_json::from_str(r#"{"result":"error","message":"x"}"#).unwrap();
        assert!(matches!(
            reply,
            Response::Error {
                kind: ErrorKind::Internal,
                ..
            }
        ));
    }

    #[test]
    fn snapshot_failures_have_the_kind_a_caller_can_act_on() {
        let cases = [
            (SnapshotError::NotFound("/c".into()), ErrorKind::NotFound),
            (SnapshotError::Exists("/c".into()), ErrorKind::AlreadyExists),
            (
                SnapshotError::Memory(MemoryError::HostTooSmall {
                    wanted_mib: 2048,
                    available_mib: 1,
                }),
                ErrorKind::ResourceExhausted,
            ),
            (
                SnapshotError::Capture(CaptureError::Vm(VmError::Stopped("halted".into()))),
                ErrorKind::FailedPrecondition,
            ),
            (
                SnapshotError::Format {
                    path: "/f".into(),
                    source: sandfork_vmm::snapshot::FormatError::BadMagic,
                },
                ErrorKind::InvalidArgument,
            ),
            (
                SnapshotError::Capture(CaptureError::WorkerPanicked),
                ErrorKind::Internal,
            ),
        ];
        for (err, kind) in cases {
            assert_eq!(ErrorKind::of_snapshot(&err), kind, "{err}");
        }
    }
}
