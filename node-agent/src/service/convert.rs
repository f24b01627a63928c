//! Between the gRPC messages and the manager's types, and from the
//! manager's errors to gRPC status codes.

use sandfork_api::agent::v1 as pb;
use tonic::{Code, Status};

use sandfork_vmm::capture::CaptureMode;
use sandfork_vmm::error::chain as error_chain;
use sandfork_vmm::guest::{DirtyPattern, Workload};

use crate::manager::{Capture, ManagerError, SandboxInfo, SandboxState};
use crate::vmhost::ErrorKind;

/// Each manager error as the gRPC code a caller can act on: the one place
/// where failures become status codes, those of the VM host by the kind it
/// reports.
impl From<ManagerError> for Status {
    fn from(err: ManagerError) -> Self {
        if let ManagerError::PodVmmNotReady { .. } = &err {
            // Its Pod is still starting, or not yet seen here: ask again.
            return Status::unavailable(error_chain(&err));
        }
        let kind = match &err {
            ManagerError::InvalidName(_)
            | ManagerError::InvalidSpec(_)
            | ManagerError::InvalidPodUid(_) => ErrorKind::InvalidArgument,
            ManagerError::PodVmmNotReady { .. } => ErrorKind::Internal,
            ManagerError::NotFound { .. } => ErrorKind::NotFound,
            ManagerError::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            ManagerError::Memory(err) => ErrorKind::of_memory(err),
            ManagerError::Snapshot(err) => ErrorKind::of_snapshot(err),
            ManagerError::DevicesMissing(_) | ManagerError::NotTmpfs(_) => {
                ErrorKind::FailedPrecondition
            }
            ManagerError::Vm { source, .. } => source.kind,
            ManagerError::VmUnreachable { .. }
            | ManagerError::VmStart { .. }
            | ManagerError::UnexpectedReply { .. }
            | ManagerError::Record { .. }
            | ManagerError::Io { .. } => ErrorKind::Internal,
        };
        let code = match kind {
            ErrorKind::InvalidArgument => Code::InvalidArgument,
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::AlreadyExists => Code::AlreadyExists,
            ErrorKind::ResourceExhausted => Code::ResourceExhausted,
            ErrorKind::FailedPrecondition => Code::FailedPrecondition,
            ErrorKind::Internal => Code::Internal,
        };
        Status::new(code, strip_ansi(&error_chain(&err)))
    }
}

/// Removes terminal color sequences (`ESC [ ... letter`), which VM log
/// tails quoted in messages may carry; they end up in Kubernetes status.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub fn workload_from_pb(workload: Option<pb::Workload>) -> Result<Workload, Status> {
    use pb::workload::Kind;
    match workload.and_then(|w| w.kind) {
        Some(Kind::Counter(_)) => Ok(Workload::Counter),
        Some(Kind::Idle(_)) => Ok(Workload::Idle),
        Some(Kind::Dirty(dirty)) => Ok(Workload::Dirty {
            pattern: match pb::DirtyPattern::try_from(dirty.pattern) {
                Ok(pb::DirtyPattern::Random) => DirtyPattern::Random,
                Ok(pb::DirtyPattern::Sequential | pb::DirtyPattern::Unspecified) => {
                    DirtyPattern::Sequential
                }
                Err(_) => {
                    return Err(Status::invalid_argument(format!(
                        "unknown dirty pattern {}",
                        dirty.pattern
                    )));
                }
            },
            pages_per_second: dirty.pages_per_second,
        }),
        Some(Kind::FlatImage(image)) if image.path.starts_with('/') => Ok(Workload::Flat {
            path: image.path.into(),
        }),
        Some(Kind::FlatImage(image)) => Err(Status::invalid_argument(format!(
            "flat image path {:?} is not absolute",
            image.path
        ))),
        None => Err(Status::invalid_argument(
            "workload is required: counter, dirty, idle or flat_image",
        )),
    }
}

/// The workload as the API describes it.
pub fn workload_to_pb(workload: &Workload) -> Option<pb::Workload> {
    use pb::workload::Kind;
    let kind = match workload {
        Workload::Counter => Kind::Counter(pb::Counter {}),
        Workload::Idle => Kind::Idle(pb::Idle {}),
        Workload::Dirty {
            pattern,
            pages_per_second,
        } => Kind::Dirty(pb::Dirty {
            pattern: match pattern {
                DirtyPattern::Sequential => pb::DirtyPattern::Sequential,
                DirtyPattern::Random => pb::DirtyPattern::Random,
            } as i32,
            pages_per_second: *pages_per_second,
        }),
        Workload::Flat { path } => Kind::FlatImage(pb::FlatImage {
            path: path.to_string_lossy().into_owned(),
        }),
    };
    Some(pb::Workload { kind: Some(kind) })
}

pub fn mode_from_pb(mode: i32) -> Result<CaptureMode, Status> {
    match pb::CaptureMode::try_from(mode) {
        Ok(pb::CaptureMode::Live | pb::CaptureMode::Unspecified) => Ok(CaptureMode::Live),
        Ok(pb::CaptureMode::StopAndCopy) => Ok(CaptureMode::StopAndCopy),
        Err(_) => Err(Status::invalid_argument(format!(
            "unknown capture mode {mode}"
        ))),
    }
}

pub fn mode_to_pb(mode: CaptureMode) -> pb::CaptureMode {
    match mode {
        CaptureMode::Live => pb::CaptureMode::Live,
        CaptureMode::StopAndCopy => pb::CaptureMode::StopAndCopy,
    }
}

pub fn sandbox_to_pb(info: &SandboxInfo) -> pb::Sandbox {
    let (state, failure_reason) = match &info.state {
        SandboxState::Running => (pb::SandboxState::Running, String::new()),
        SandboxState::Failed { reason } => (pb::SandboxState::Failed, strip_ansi(reason)),
    };
    pb::Sandbox {
        uid: info.name.clone(),
        state: state as i32,
        failure_reason,
        pid: info.pid,
        memory_mib: info.memory_mib,
        vcpus: info.vcpus.into(),
        workload: workload_to_pb(&info.workload),
        capture_uid: info.origin.clone().unwrap_or_default(),
        vcpu_reports: info
            .reports
            .iter()
            .zip(info.report_counts.iter().chain(std::iter::repeat(&0)))
            .map(|(value, count)| pb::VcpuReport {
                value: *value,
                count: *count,
            })
            .collect(),
    }
}

/// `captured_at_unix_micros` is filled in by the caller, which can read it.
pub fn capture_to_pb(capture: &Capture) -> pb::Capture {
    let stats = &capture.stats;
    pb::Capture {
        uid: capture.name.clone(),
        sandbox_uid: capture.source.clone(),
        memory_bytes: capture.memory_bytes,
        mode: mode_to_pb(stats.mode) as i32,
        captured_at_unix_micros: 0,
        stats: Some(pb::CaptureStats {
            pause_ns: stats.pause_ns,
            arm_ns: stats.arm_ns,
            copy_ns: stats.copy_ns,
            bytes: stats.bytes,
            pages_copied_by_fault_handler: stats.pages_copied_by_fault_handler,
            pages_copied_by_copier: stats.pages_copied_by_copier,
            write_faults: stats.write_faults,
            vcpus_stopped_ns: stats.vcpus_stopped_ns,
            pre_arm_ns: stats.pre_arm_ns,
            zero_pages: stats.zero_pages,
        }),
        memory_complete: capture.memory_complete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::VmHostError;
    use sandfork_vmm::memory::MemoryError;
    use sandfork_vmm::snapshot::SnapshotError;

    #[test]
    fn manager_errors_map_to_actionable_codes() {
        let cases = [
            (ManagerError::InvalidName("A".into()), Code::InvalidArgument),
            (
                ManagerError::InvalidSpec("0 vCPUs".into()),
                Code::InvalidArgument,
            ),
            (
                ManagerError::NotFound {
                    kind: "sandbox",
                    name: "x".into(),
                },
                Code::NotFound,
            ),
            (
                ManagerError::AlreadyExists {
                    kind: "sandbox",
                    name: "x".into(),
                },
                Code::AlreadyExists,
            ),
            (
                ManagerError::Memory(MemoryError::HostTooSmall {
                    wanted_mib: 4096,
                    available_mib: 100,
                }),
                Code::ResourceExhausted,
            ),
            (
                ManagerError::Memory(MemoryError::InvalidSize { bytes: 3 }),
                Code::InvalidArgument,
            ),
            (
                ManagerError::DevicesMissing(sandfork_vmm::devices::DeviceError {
                    path: "/dev/kvm",
                    source: std::io::ErrorKind::NotFound.into(),
                }),
                Code::FailedPrecondition,
            ),
            (
                ManagerError::Vm {
                    name: "x".into(),
                    source: VmHostError {
                        kind: ErrorKind::Internal,
                        message: "boom".into(),
                    },
                },
                Code::Internal,
            ),
            (
                ManagerError::Vm {
                    name: "x".into(),
                    source: VmHostError {
                        kind: ErrorKind::ResourceExhausted,
                        message: "no space".into(),
                    },
                },
                Code::ResourceExhausted,
            ),
            (
                ManagerError::Snapshot(SnapshotError::Abandoned("/c".into())),
                Code::FailedPrecondition,
            ),
            (
                ManagerError::Snapshot(SnapshotError::NoSpace {
                    path: "/c".into(),
                    wanted_mib: 1024,
                    available_mib: 1,
                }),
                Code::ResourceExhausted,
            ),
            (
                ManagerError::Snapshot(SnapshotError::Exists("/c".into())),
                Code::AlreadyExists,
            ),
        ];
        for (err, code) in cases {
            let message = err.to_string();
            let status = Status::from(err);
            assert_eq!(status.code(), code, "{message}");
            assert!(status.message().contains(&message), "{}", status.message());
        }
    }

    #[test]
    fn color_codes_are_stripped() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m VM running"),
            "2026  INFO VM running"
        );
        assert_eq!(strip_ansi("plain [text]"), "plain [text]");
    }

    #[test]
    fn io_errors_keep_their_cause() {
        let status = Status::from(ManagerError::Io {
            op: "create",
            path: "/run/sandfork/x".into(),
            source: std::io::Error::from(rustix::io::Errno::NOSPC),
        });
        assert_eq!(status.code(), Code::Internal);
        assert!(
            status.message().contains("No space left"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn workloads_round_trip() {
        for workload in [
            Workload::Counter,
            Workload::Idle,
            Workload::Dirty {
                pattern: DirtyPattern::Random,
                pages_per_second: 500,
            },
        ] {
            assert_eq!(
                workload_from_pb(workload_to_pb(&workload)).unwrap(),
                workload
            );
        }
        assert_eq!(
            workload_from_pb(None).unwrap_err().code(),
            Code::InvalidArgument
        );
    }
}
