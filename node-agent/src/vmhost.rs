//! The per-sandbox VM process and the protocol the agent uses to talk to it.
//!
//! Each sandbox runs in its own process (`sandfork-agent vm-host`), in its
//! own session, so that the agent can crash or restart without taking VMs
//! down and a crashing VM cannot take the agent down. The process serves
//! newline-delimited JSON requests on a Unix socket in the sandbox's
//! directory; the agent re-adopts running VMs by finding those sockets.

use std::io::{BufRead, BufReader, Write};
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
use sandfork_vmm::snapshot::{CaptureDir, SnapshotError, SnapshotState};
use sandfork_vmm::vcpu::VcpuError;
use sandfork_vmm::vm::{Vm, VmError};

use crate::state_dir;

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
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Status,
    /// Capture into `<state>/captures/<capture>`.
    Capture {
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
}

impl HostError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Snapshot(err) => ErrorKind::of_snapshot(err),
            Self::Verification(_) => ErrorKind::Internal,
            Self::Stopping | Self::WorkerGone => ErrorKind::FailedPrecondition,
            Self::BadRequest(_) => ErrorKind::InvalidArgument,
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

/// Sends one request to the VM process of the sandbox in `dir`.
pub fn call(dir: &Path, request: &Request, timeout: Duration) -> std::io::Result<Response> {
    let stream = UnixStream::connect(dir.join(CONTROL_SOCKET))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply)?;
    if reply.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "VM process closed the connection",
        ));
    }
    Ok(serde_json::from_str(&reply)?)
}

/// Why the VM host could not start its VM or its control socket.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid sandbox record {path}")]
    Record {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot use KVM")]
    Kvm(#[from] VcpuError),
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error("cannot boot the VM")]
    Boot(#[from] VmError),
    #[error("cannot restore the branch")]
    Restore(#[from] SnapshotError),
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ServeError + 'a {
    move |source| ServeError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Runs the VM of the sandbox in `dir` and serves its control socket until
/// asked to stop. `captures` is where captures are written.
pub fn serve(dir: &Path, captures: &Path) -> Result<(), ServeError> {
    let record_path = dir.join(RECORD_FILE);
    let record = std::fs::read(&record_path).map_err(io_err("read", &record_path))?;
    let record: SandboxRecord =
        serde_json::from_slice(&record).map_err(|source| ServeError::Record {
            path: record_path.clone(),
            source,
        })?;
    let vm = match &record.origin {
        None => {
            let tsc_khz = sandfork_vmm::vcpu::HostKvm::get()?.tsc_khz();
            let image = GuestImage::for_workload(&record.workload, tsc_khz)?;
            Vm::boot(
                &record.name,
                record.memory_mib << 20,
                record.vcpus.into(),
                &image,
            )?
        }
        Some(capture) => state_dir::capture_in(captures, capture).restore()?,
    };
    let socket_path = dir.join(CONTROL_SOCKET);
    let _ = std::fs::remove_file(&socket_path);
    let listener = UnixListener::bind(&socket_path).map_err(io_err("bind", &socket_path))?;
    std::fs::set_permissions(&socket_path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err("chmod", &socket_path))?;
    let pid_path = dir.join(PID_FILE);
    std::fs::write(&pid_path, std::process::id().to_string())
        .map_err(io_err("write", &pid_path))?;
    tracing::info!(sandbox = %record.name, pid = std::process::id(), "VM running");

    // One thread per connection, so that status requests are answered while
    // a capture runs; captures themselves take turns on one worker thread,
    // which also finishes each live capture's copy after answering.
    let stopping = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (jobs, queue) = mpsc::channel::<CaptureJob>();
        {
            let (vm, record) = (&vm, &record);
            scope.spawn(move || {
                for job in queue {
                    run_capture(vm, record, captures, job);
                }
            });
        }
        for stream in listener.incoming() {
            if stopping.load(Ordering::Acquire) {
                break;
            }
            let Ok(stream) = stream else { continue };
            let (vm, stopping, jobs) = (&vm, &stopping, jobs.clone());
            let socket_path = &socket_path;
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
    let _ = std::fs::remove_file(&socket_path);
    Ok(())
}

/// A capture request for the capture worker; it answers on `reply` once the
/// VM runs again and, for a live capture, again once the copy is complete.
struct CaptureJob {
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
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    while reader.read_line(&mut line)? != 0 {
        let (response, stop) = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Status) => (Response::Status(status(vm)), false),
            Ok(Request::Capture {
                capture,
                mode,
                verify,
                wait,
            }) => (
                match request_capture(jobs, capture, mode, verify, wait) {
                    Ok(info) => Response::Captured(info),
                    Err(err) => err.response(),
                },
                false,
            ),
            Ok(Request::Stop) => {
                // The guest stops now; a capture still copying finishes
                // before the process exits (its branches need it), and
                // faster without guest writes.
                let _ = vm.pause(false);
                (Response::Stopped, true)
            }
            Err(err) => (HostError::BadRequest(err).response(), false),
        };
        let mut reply = serde_json::to_vec(&response)?;
        reply.push(b'\n');
        (&stream).write_all(&reply)?;
        if stop {
            return Ok(true);
        }
        line.clear();
    }
    Ok(false)
}

fn request_capture(
    jobs: &mpsc::Sender<CaptureJob>,
    capture: String,
    mode: CaptureMode,
    verify: bool,
    wait: bool,
) -> Result<CaptureInfo, HostError> {
    let (reply, answers) = mpsc::channel();
    jobs.send(CaptureJob {
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
fn run_capture(vm: &Vm, record: &SandboxRecord, captures: &Path, job: CaptureJob) {
    let dir = state_dir::capture_in(captures, &job.capture);
    if job.mode == CaptureMode::StopAndCopy || job.verify {
        let _ = job
            .reply
            .send(capture_into(vm, record, &dir, job.mode, job.verify));
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
        .send(Ok(capture_info(&dir, running.state(), None)));
    let finished = running.finish();
    if let Err(err) = &finished {
        tracing::warn!(capture = %job.capture, error = %err, "live capture failed during its copy");
    }
    let _ = job.reply.send(
        finished
            .map(|state| capture_info(&dir, &state, None))
            .map_err(Into::into),
    );
}

fn status(vm: &Vm) -> VmStatus {
    VmStatus {
        pid: std::process::id(),
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
    Ok(capture_info(dir, &state, counter))
}

pub fn capture_info(
    dir: &CaptureDir,
    state: &SnapshotState,
    counter: Option<CounterState>,
) -> CaptureInfo {
    CaptureInfo {
        name: dir
            .path()
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default(),
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
