//! Snapshots: a capture kept on the node (a directory holding the raw
//! memory file and the saved state, restored copy-on-write), and the
//! portable single-file format it can be exported to and imported from
//! (`format`).

pub mod format;

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use crate::capture::{self, Arm, CaptureError, CaptureMode, LiveCapture};
use crate::fill::{CompleteCheck, FILL_SOCKET, FillError, FillServer, Filler};
use crate::memory::{self, GuestMemory, MemoryError, SnapshotMapping};
use crate::vm::{Vm, VmError};
pub use format::{
    CHUNK_BYTES, FORMAT_VERSION, FormatError, Header, MAGIC, SnapshotReader, SnapshotState,
    complete_by_default,
};

const MEMORY_FILE: &str = "memory";
const STATE_FILE: &str = "state.json";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("capture {0} already exists")]
    Exists(PathBuf),
    #[error("capture {0} does not exist or is incomplete")]
    NotFound(PathBuf),
    #[error("{path}")]
    Format {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
    #[error("memory file {path} is {file_bytes} bytes, its state says {state_bytes}")]
    MemoryFileSize {
        path: PathBuf,
        file_bytes: u64,
        state_bytes: u64,
    },
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Fill(#[from] FillError),
    #[error(
        "capture {0} is incomplete and its copy is no longer running (its source stopped mid-copy)"
    )]
    Abandoned(PathBuf),
    #[error("capture {0} is still being copied")]
    Copying(PathBuf),
    #[error("{path} has {available_mib} MiB free, too little for a capture of {wanted_mib} MiB")]
    NoSpace {
        path: PathBuf,
        wanted_mib: u64,
        available_mib: u64,
    },
}

fn format_err(path: &Path) -> impl FnOnce(FormatError) -> SnapshotError + '_ {
    move |source| SnapshotError::Format {
        path: path.to_owned(),
        source,
    }
}

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// A capture directory on the node. Its files are readable by the owner
/// only; it exists once `state.json` does, and its memory is complete once
/// that says so.
#[derive(Clone, Debug)]
pub struct CaptureDir {
    path: PathBuf,
    /// Made by whoever owns the captures and handed over (as an open
    /// descriptor's `/proc/self/fd/N` path): this side fills it, but neither
    /// creates nor removes the directory itself.
    handed_over: bool,
    /// The owner's mapping of the memory file, to fill remotely.
    target: Option<Arc<RemoteTarget>>,
}

/// The owner's mapping of a capture's memory file: its userfaultfd and its
/// address in the owner (see `SnapshotMapping::remote`).
#[derive(Debug)]
pub struct RemoteTarget {
    pub uffd: std::os::fd::OwnedFd,
    pub base: u64,
}

impl CaptureDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            handed_over: false,
            target: None,
        }
    }

    /// An existing directory to capture into, made by its owner, who made
    /// and mapped its memory file too: `target` is that mapping, which this
    /// side fills (so the pages are charged to the owner).
    pub fn handed_over(path: impl Into<PathBuf>, target: RemoteTarget) -> Self {
        Self {
            path: path.into(),
            handed_over: true,
            target: Some(Arc::new(target)),
        }
    }

    /// Makes the memory file of `memory_bytes` and maps it for filling, for
    /// a process that fills it remotely (`handed_over`): keep the mapping
    /// until the copy completes, and hand over `remote_handle()`.
    pub fn create_target(&self, memory_bytes: u64) -> Result<SnapshotMapping, SnapshotError> {
        let file = create_private(&self.memory_path())?;
        Ok(SnapshotMapping::create(file, memory_bytes)?)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn memory_path(&self) -> PathBuf {
        self.path.join(MEMORY_FILE)
    }

    pub fn fill_socket_path(&self) -> PathBuf {
        self.path.join(FILL_SOCKET)
    }

    /// Whether a capturing process is still copying into this capture.
    pub fn is_copying(&self) -> bool {
        UnixStream::connect(self.fill_socket_path()).is_ok()
    }

    /// The state, if branches can be restored from it: its memory is complete
    /// or still being copied.
    pub fn restorable_state(&self) -> Result<SnapshotState, SnapshotError> {
        self.state_for_restore().map(|(state, _)| state)
    }

    /// The state, and while the copy runs a connection to the capturing
    /// process's fill socket; an error if the copy ended incomplete.
    fn state_for_restore(&self) -> Result<(SnapshotState, Option<UnixStream>), SnapshotError> {
        let state = self.read_state()?;
        if state.memory_complete {
            return Ok((state, None));
        }
        if let Ok(stream) = UnixStream::connect(self.fill_socket_path()) {
            return Ok((state, Some(stream)));
        }
        // The copy may have completed just now.
        let state = self.read_state()?;
        if state.memory_complete {
            Ok((state, None))
        } else {
            Err(SnapshotError::Abandoned(self.path.clone()))
        }
    }

    /// Creates the directory and a memory file of `memory_bytes`, mapped and
    /// ready to be filled by a capture.
    pub fn create(&self, memory_bytes: u64) -> Result<SnapshotMapping, SnapshotError> {
        let made = if self.handed_over {
            Ok(())
        } else {
            std::fs::DirBuilder::new().mode(0o700).create(&self.path)
        };
        made.map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => SnapshotError::Exists(self.path.clone()),
            _ => SnapshotError::Io {
                op: "create",
                path: self.path.clone(),
                source,
            },
        })?;
        let result = (|| match &self.target {
            Some(target) => {
                // The owner made and mapped the file (and checked the space).
                let path = self.memory_path();
                let file = OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(&path)
                    .map_err(io_err("open", &path))?;
                let uffd = target
                    .uffd
                    .try_clone()
                    .map_err(io_err("dup userfaultfd of", &path))?;
                Ok(SnapshotMapping::remote(
                    uffd,
                    target.base,
                    memory_bytes,
                    file,
                )?)
            }
            None => {
                self.check_space(memory_bytes)?;
                let file = create_private(&self.memory_path())?;
                Ok(SnapshotMapping::create(file, memory_bytes)?)
            }
        })();
        if result.is_err() {
            let _ = self.remove();
        }
        result
    }

    /// The memory file is sparse and filled during the copy: make sure the
    /// file system can hold it before pausing anything.
    pub fn check_space(&self, memory_bytes: u64) -> Result<(), SnapshotError> {
        let stat = rustix::fs::statvfs(&self.path).map_err(|errno| SnapshotError::Io {
            op: "statvfs",
            path: self.path.clone(),
            source: errno.into(),
        })?;
        let available = stat.f_bavail.saturating_mul(stat.f_frsize);
        if available < memory_bytes {
            return Err(SnapshotError::NoSpace {
                path: self.path.clone(),
                wanted_mib: memory_bytes >> 20,
                available_mib: available >> 20,
            });
        }
        Ok(())
    }

    /// Captures `vm` (named `source`) into this new directory and waits for
    /// the memory copy. On failure the directory is removed and the VM keeps
    /// running untouched.
    pub fn capture_from(
        &self,
        vm: &Vm,
        mode: CaptureMode,
        source: &str,
    ) -> Result<SnapshotState, SnapshotError> {
        match mode {
            CaptureMode::Live => self.start_live(vm, source, Arm::AheadOfPause)?.finish(),
            CaptureMode::StopAndCopy => {
                let mapping = self.create(vm.memory().len() as u64)?;
                let result = (|| {
                    let captured = capture::stop_and_copy(vm, &mapping)?;
                    let state = SnapshotState {
                        memory_bytes: mapping.len() as u64,
                        vcpus: captured.vcpus,
                        vm: captured.vm,
                        stats: captured.stats,
                        source: source.to_owned(),
                        created_unix_ms: unix_ms_now(),
                        memory_complete: true,
                    };
                    self.commit(&state)?;
                    Ok(state)
                })();
                drop(mapping);
                if result.is_err() {
                    let _ = self.remove();
                }
                result
            }
        }
    }

    /// Starts a live capture of `vm` into this new directory and returns once
    /// the VM runs again: the state is recorded and branches can be restored
    /// at once, while the memory copy goes on until `finish`.
    pub fn start_live(
        &self,
        vm: &Vm,
        source: &str,
        arm: Arm,
    ) -> Result<RunningCapture, SnapshotError> {
        let mapping = Arc::new(self.create(vm.memory().len() as u64)?);
        let started = (|| {
            let capture = LiveCapture::start(vm, mapping.clone(), arm)?;
            let state = SnapshotState {
                memory_bytes: mapping.len() as u64,
                vcpus: capture.vcpus().to_vec(),
                vm: capture.vm_state().clone(),
                stats: capture.stats_so_far(),
                source: source.to_owned(),
                created_unix_ms: unix_ms_now(),
                memory_complete: false,
            };
            // The socket first: a branch that finds the state finds it too.
            let server = FillServer::start(&self.fill_socket_path(), capture.progress())?;
            self.commit(&state)?;
            Ok((capture, server, state))
        })();
        match started {
            Ok((capture, server, state)) => Ok(RunningCapture {
                dir: self.clone(),
                capture,
                server,
                state,
                mapping,
            }),
            Err(err) => {
                let _ = self.remove();
                Err(err)
            }
        }
    }

    /// Starts a branch: a new VM on a copy-on-write mapping of this
    /// capture's memory, continuing from the captured vCPU state.
    ///
    /// A capture whose copy is still running works too: the branch's first
    /// touches of pages not copied yet are served by the capturing process.
    pub fn restore(&self) -> Result<Vm, SnapshotError> {
        let (state, fill) = self.parts_for_restore()?;
        let dir = self.clone();
        restore(
            self.open_memory()?,
            fill.map(|stream| {
                let complete: CompleteCheck =
                    Box::new(move || dir.read_state().is_ok_and(|state| state.memory_complete));
                (stream, complete)
            }),
            &state,
            &self.path,
        )
    }

    /// What a branch is restored from: the state and, while the copy runs,
    /// a connection to the capturing process's fill socket. For handing a
    /// branch its capture as descriptors (with `open_memory`).
    pub fn parts_for_restore(&self) -> Result<(SnapshotState, Option<UnixStream>), SnapshotError> {
        self.state_for_restore()
    }

    /// Records the state, making the capture complete.
    pub fn commit(&self, state: &SnapshotState) -> Result<(), SnapshotError> {
        let tmp = self.path.join("state.json.tmp");
        let mut file = create_private(&tmp)?;
        // One write: serde_json writes to an unbuffered file piecemeal
        // (measured: 9.5 s for a state of a few hundred kB).
        let json = state.encode().map_err(format_err(&tmp))?;
        file.write_all(&json).map_err(io_err("write", &tmp))?;
        file.sync_all().map_err(io_err("sync", &tmp))?;
        std::fs::rename(&tmp, self.path.join(STATE_FILE)).map_err(io_err("rename", &tmp))
    }

    pub fn read_state(&self) -> Result<SnapshotState, SnapshotError> {
        let path = self.path.join(STATE_FILE);
        let file = File::open(&path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => SnapshotError::NotFound(self.path.clone()),
            _ => SnapshotError::Io {
                op: "open",
                path: path.clone(),
                source,
            },
        })?;
        let state: SnapshotState = serde_json::from_reader(BufReader::new(file))
            .map_err(|source| format_err(&path)(FormatError::State(source)))?;
        state.check().map_err(format_err(&path))?;
        Ok(state)
    }

    pub fn open_memory(&self) -> Result<File, SnapshotError> {
        let path = self.memory_path();
        File::open(&path).map_err(io_err("open", &path))
    }

    /// Deletes the capture. Branches that map its memory keep their view.
    /// A handed-over directory is emptied; its owner removes it.
    pub fn remove(&self) -> Result<(), SnapshotError> {
        if self.handed_over {
            for name in [MEMORY_FILE, STATE_FILE, "state.json.tmp", FILL_SOCKET] {
                let path = self.path.join(name);
                match std::fs::remove_file(&path) {
                    Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                        return Err(SnapshotError::Io {
                            op: "remove",
                            path,
                            source: err,
                        });
                    }
                    _ => {}
                }
            }
            return Ok(());
        }
        match std::fs::remove_dir_all(&self.path) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(SnapshotError::Io {
                op: "remove",
                path: self.path.clone(),
                source: err,
            }),
            _ => Ok(()),
        }
    }

    /// Writes the capture to `out` in the portable format (mode 0600).
    pub fn export(&self, out: &Path) -> Result<(), SnapshotError> {
        let state = self.read_state()?;
        if !state.memory_complete {
            return Err(SnapshotError::Copying(self.path.clone()));
        }
        let state_json = state.encode().map_err(format_err(&self.path))?;
        // Read, not mapped: reading a hole of the memory file through a
        // mapping would allocate it; read(2) returns zeros and allocates
        // nothing.
        let memory_file = self.open_memory()?;
        let memory_len = memory_file
            .metadata()
            .map_err(io_err("stat", &self.memory_path()))?
            .len();
        if memory_len != state.memory_bytes {
            return Err(SnapshotError::MemoryFileSize {
                path: self.memory_path(),
                file_bytes: memory_len,
                state_bytes: state.memory_bytes,
            });
        }
        let header = Header::for_state(&state_json, state.memory_bytes);
        let chunk_count = header.chunk_count;
        let tmp = out.with_extension("partial");
        let file = create_private(&tmp)?;
        let mut writer = BufWriter::with_capacity(1 << 20, file);
        let mut chunk = vec![0u8; CHUNK_BYTES as usize];
        let write = (|| {
            // The checksums come before the memory: written once known.
            let header = header.encode();
            writer.write_all(&header)?;
            writer.write_all(&state_json)?;
            let crcs_at = (header.len() + state_json.len()) as u64;
            let mut chunk_crcs = vec![0u8; chunk_count as usize * 4];
            writer.write_all(&chunk_crcs)?;
            let mut offset = 0;
            for crc in chunk_crcs.chunks_mut(4) {
                let len = CHUNK_BYTES.min(state.memory_bytes - offset) as usize;
                memory_file.read_exact_at(&mut chunk[..len], offset)?;
                crc.copy_from_slice(&crc32fast::hash(&chunk[..len]).to_le_bytes());
                writer.write_all(&chunk[..len])?;
                offset += len as u64;
            }
            writer.seek(SeekFrom::Start(crcs_at))?;
            writer.write_all(&chunk_crcs)?;
            writer.flush()?;
            writer.get_ref().sync_all()
        })();
        if let Err(source) = write.and_then(|()| std::fs::rename(&tmp, out)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(SnapshotError::Io {
                op: "write",
                path: out.to_owned(),
                source,
            });
        }
        Ok(())
    }

    /// Reads a portable snapshot file into this (new) capture directory,
    /// checking every checksum; on any error nothing is left behind.
    pub fn import(&self, input: &Path) -> Result<SnapshotState, SnapshotError> {
        let file = File::open(input).map_err(io_err("open", input))?;
        let file_len = file.metadata().map_err(io_err("stat", input))?.len();
        let (mut reader, state) =
            SnapshotReader::open(BufReader::with_capacity(1 << 20, file), file_len)
                .map_err(format_err(input))?;
        let mapping = self.create(reader.header().memory_bytes)?;
        let fill = (|| {
            while let Some((start, chunk)) = reader.next_chunk().map_err(format_err(input))? {
                mapping.fill_from_slice(start as usize, chunk)?;
            }
            self.commit(&state)
        })();
        drop(mapping);
        if let Err(err) = fill {
            let _ = self.remove();
            return Err(err);
        }
        Ok(state)
    }
}

/// Starts a branch from its capture's parts: a new VM on a copy-on-write
/// mapping of `memory` (the capture's memory file, which may be opened
/// read-only), continuing from `state`. `fill` is, while the copy runs, a
/// connection to the capturing process's fill socket and the check that
/// tells whether a connection closed without a word means complete.
/// `capture` names the capture in messages.
pub fn restore(
    memory: File,
    fill: Option<(UnixStream, CompleteCheck)>,
    state: &SnapshotState,
    capture: &Path,
) -> Result<Vm, SnapshotError> {
    state.check().map_err(format_err(capture))?;
    let memory = GuestMemory::map_private(memory, state.memory_bytes)?;
    let filler = match fill {
        Some((stream, complete)) => Some(Filler::start(
            &memory,
            stream,
            capture,
            complete,
            &first_touched_pages(state),
        )?),
        None => None,
    };
    Ok(Vm::restore(memory, filler, &state.vm, &state.vcpus)?)
}

/// Pages a restored VM is likely to touch first: where each vCPU's
/// instruction and stack pointers, page-table root and general registers
/// point, read as guest-physical addresses (as they are in identity-mapped
/// guests; a wrong guess only fetches a page early).
fn first_touched_pages(state: &SnapshotState) -> Vec<usize> {
    state
        .vcpus
        .iter()
        .flat_map(|vcpu| {
            let regs = &vcpu.regs;
            [
                regs.rip,
                regs.rsp,
                vcpu.sregs.cr3,
                regs.rax,
                regs.rbx,
                regs.rcx,
                regs.rdx,
                regs.rsi,
                regs.rdi,
                regs.rbp,
                regs.r8,
                regs.r9,
                regs.r10,
                regs.r11,
                regs.r12,
                regs.r13,
                regs.r14,
                regs.r15,
            ]
        })
        .filter(|&addr| addr < state.memory_bytes)
        .map(|addr| addr as usize / memory::PAGE_SIZE)
        .collect()
}

/// A live capture whose memory copy is running: the VM runs again, its
/// state is recorded, and branches of it can be restored.
pub struct RunningCapture {
    dir: CaptureDir,
    capture: LiveCapture,
    server: FillServer,
    state: SnapshotState,
    mapping: Arc<SnapshotMapping>,
}

impl RunningCapture {
    /// The state recorded at the pause.
    pub fn state(&self) -> &SnapshotState {
        &self.state
    }

    pub fn dir(&self) -> &CaptureDir {
        &self.dir
    }

    /// The capture's handle on its copy.
    pub fn progress(&self) -> capture::CaptureProgress {
        self.capture.progress()
    }

    /// Waits for the copy, then records the capture as complete. On failure
    /// the directory is removed, and branches restored meanwhile stop.
    pub fn finish(self) -> Result<SnapshotState, SnapshotError> {
        let Self {
            dir,
            capture,
            server,
            mut state,
            mapping,
        } = self;
        let captured = capture.finish();
        drop(mapping);
        match captured {
            Ok(captured) => {
                state.stats = captured.stats;
                state.memory_complete = true;
                let committed = dir.commit(&state);
                // The memory is complete whether or not the record could be
                // written (the directory may have been deleted meanwhile):
                // branches restored from it go on.
                server.finish(true);
                if committed.is_err() {
                    let _ = dir.remove();
                }
                committed.map(|()| state)
            }
            Err(err) => {
                server.finish(false);
                let _ = dir.remove();
                Err(err.into())
            }
        }
    }
}

fn create_private(path: &Path) -> Result<File, SnapshotError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err("create", path))
}

pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}
