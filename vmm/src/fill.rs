//! Branches that start before their capture's copy is complete.
//!
//! A live capture fills its memory file in the background, writing through
//! the file, so a page not copied yet is a hole in it. A branch restored
//! meanwhile maps the file copy-on-write as usual and registers that mapping
//! with userfaultfd in missing mode: its first touch of a hole faults, and
//! the branch asks the capturing process, over `fill.sock` in the capture
//! directory, to copy that page's block first. The capturing process copies
//! it from the still write-protected source, or finds its before-image
//! already saved, so the branch sees exactly the memory of the pause. When
//! the copy completes the capturing process says so, and the branch
//! unregisters and runs on the file alone.
//!
//! Protocol: the branch sends a block number (`u64`, little-endian; a block
//! is `BLOCK_PAGES` pages); the capture answers with the same number once
//! the block is in the file, `DONE` once the whole copy is, and `FAILED` if
//! the capture failed.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use rustix::event::{EventfdFlags, PollFd, PollFlags};
use userfaultfd::{Event, FaultKind, RegisterMode, Uffd, UffdBuilder};

use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::thread::set_current_realtime;

/// The socket a capture serves while its copy runs.
pub const FILL_SOCKET: &str = "fill.sock";
/// Pages copied per request (64 KiB): a guest touching one page usually
/// touches its neighbours next.
pub const BLOCK_PAGES: usize = 16;

const DONE: u64 = u64::MAX;
const FAILED: u64 = u64::MAX - 1;

const RUNNING: u8 = 0;
const COMPLETE: u8 = 1;
const FAILING: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error("userfaultfd {op} failed")]
    Userfaultfd {
        op: &'static str,
        #[source]
        source: userfaultfd::Error,
    },
    #[error("{op} failed")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the capture failed")]
    CaptureFailed,
    #[error("the capturing process went away before the copy completed")]
    CaptureGone,
    #[error("the capture answered block {block}, past the end of memory")]
    BlockPastEnd { block: u64 },
}

fn io_err(op: &'static str) -> impl FnOnce(std::io::Error) -> FillError {
    move |source| FillError::Io { op, source }
}

fn errno_err(op: &'static str) -> impl FnOnce(rustix::io::Errno) -> FillError {
    move |errno| FillError::Io {
        op,
        source: errno.into(),
    }
}

fn uffd_err(op: &'static str) -> impl FnOnce(userfaultfd::Error) -> FillError {
    move |source| FillError::Userfaultfd { op, source }
}

/// What a fill server serves from: a running capture's copy, which can put
/// chosen pages into the capture's file ahead of its copier.
pub trait PageSource: Send + Sync + 'static {
    /// Guest memory pages.
    fn pages(&self) -> usize;
    /// Makes sure pages `first..first + count` hold their captured contents
    /// in the file; false if the capture failed.
    fn ensure_copied(&self, first: usize, count: usize) -> bool;
}

/// The capturing side: serves branches' requests until the copy ends.
pub struct FillServer {
    path: PathBuf,
    /// The listening socket, to wake the acceptor (its path may be gone:
    /// the capture directory can be deleted while the copy runs).
    listener: UnixListener,
    shared: Arc<ServerShared>,
    acceptor: Option<JoinHandle<()>>,
}

struct ServerShared {
    progress: Box<dyn PageSource>,
    outcome: AtomicU8,
    /// Each connection's stream (to shut it down at the end) and thread.
    connections: Mutex<Vec<(UnixStream, JoinHandle<()>)>>,
}

impl FillServer {
    /// Listens on `path` (mode 0600) for branches of the capture `progress`
    /// belongs to.
    pub fn start(path: &Path, progress: impl PageSource) -> Result<Self, FillError> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(io_err("bind fill socket"))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err("chmod fill socket"))?;
        let shared = Arc::new(ServerShared {
            progress: Box::new(progress),
            outcome: AtomicU8::new(RUNNING),
            connections: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let shared = shared.clone();
            let listener = listener.try_clone().map_err(io_err("dup fill socket"))?;
            std::thread::Builder::new()
                .name("fill-accept".into())
                .spawn(move || accept(&listener, &shared))
                .map_err(io_err("spawn fill acceptor"))?
        };
        Ok(Self {
            path: path.to_owned(),
            listener,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// Tells every connected branch that the copy is complete (or failed)
    /// and stops serving.
    pub fn finish(mut self, complete: bool) {
        self.stop(if complete { COMPLETE } else { FAILING });
    }

    fn stop(&mut self, outcome: u8) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        self.shared.outcome.store(outcome, Ordering::Release);
        let _ = std::fs::remove_file(&self.path);
        // Shutting the listening socket down makes the acceptor's accept
        // fail, so that it sees the outcome.
        let _ = rustix::net::shutdown(&self.listener, rustix::net::Shutdown::Both);
        let _ = acceptor.join();
        let connections = std::mem::take(&mut *self.shared.connections.lock().unwrap());
        for (stream, _) in &connections {
            // Ends the connection's read; it then sends the outcome.
            let _ = stream.shutdown(std::net::Shutdown::Read);
        }
        for (_, thread) in connections {
            let _ = thread.join();
        }
    }
}

impl Drop for FillServer {
    fn drop(&mut self) {
        // Dropped without `finish`: the capture did not complete.
        self.stop(FAILING);
    }
}

fn accept(listener: &UnixListener, shared: &Arc<ServerShared>) {
    for stream in listener.incoming() {
        if shared.outcome.load(Ordering::Acquire) != RUNNING {
            return;
        }
        let Ok(stream) = stream else { continue };
        let Ok(handle) = stream.try_clone() else {
            continue;
        };
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("fill-serve".into())
                .spawn(move || serve(stream, &shared))
        };
        match thread {
            Ok(thread) => shared.connections.lock().unwrap().push((handle, thread)),
            Err(err) => tracing::warn!(error = %err, "cannot serve a branch's fill connection"),
        }
    }
}

fn serve(mut stream: UnixStream, shared: &ServerShared) {
    // A branch's vCPU waits on every answer: serve ahead of normal threads
    // (each answer is one short copy).
    set_current_realtime(true);
    let blocks = shared.progress.pages().div_ceil(BLOCK_PAGES) as u64;
    let mut request = [0u8; 8];
    while stream.read_exact(&mut request).is_ok() {
        let block = u64::from_le_bytes(request);
        if block >= blocks {
            tracing::warn!(block, "a branch asked for a block past the end of memory");
            return;
        }
        let first = block as usize * BLOCK_PAGES;
        let reply = if shared.progress.ensure_copied(first, BLOCK_PAGES) {
            block
        } else {
            FAILED
        };
        if stream.write_all(&reply.to_le_bytes()).is_err() || reply == FAILED {
            return;
        }
    }
    let outcome = match shared.outcome.load(Ordering::Acquire) {
        COMPLETE => DONE,
        _ => FAILED,
    };
    let _ = stream.write_all(&outcome.to_le_bytes());
}

/// Tells a filler whose capture closed the connection without a word
/// whether the capture is complete all the same (it finished just as the
/// branch connected): the capture's own record says.
pub type CompleteCheck = Box<dyn Fn() -> bool + Send>;

/// The branch side: fetches the pages a branch touches before its capture's
/// copy completes. Dropping it stops it; it must be dropped before the
/// memory it serves is unmapped (the restored VM owns both).
pub struct Filler {
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
    done: Arc<(Mutex<bool>, Condvar)>,
}

/// What the filler's thread works on.
struct FillerWork {
    uffd: Uffd,
    base: usize,
    len: usize,
    stream: UnixStream,
    /// The capture, for messages.
    capture: PathBuf,
    capture_complete: CompleteCheck,
    done: Arc<(Mutex<bool>, Condvar)>,
    hot_blocks: Vec<u64>,
}

impl std::fmt::Debug for Filler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filler").finish_non_exhaustive()
    }
}

impl Filler {
    /// Registers `memory` (a private mapping of the capture `capture`) for
    /// missing-page faults and serves them through `stream`, connected to
    /// the capture's fill socket. The blocks of `hot_pages`, which the
    /// vCPUs will touch first, are asked for at once rather than one fault
    /// at a time. `capture_complete` is asked when the capture closes the
    /// connection without saying why.
    pub fn start(
        memory: &GuestMemory,
        stream: UnixStream,
        capture: &Path,
        capture_complete: CompleteCheck,
        hot_pages: &[usize],
    ) -> Result<Self, FillError> {
        let (base, len) = memory.host_range(0..memory.pages());
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            // KVM's own accesses to guest memory must fault too.
            .user_mode_only(false)
            .create()
            .map_err(uffd_err("create"))?;
        uffd.register_with_mode(base, len, RegisterMode::MISSING)
            .map_err(uffd_err("register (missing)"))?;
        let stop =
            rustix::event::eventfd(0, EventfdFlags::CLOEXEC).map_err(errno_err("eventfd"))?;
        let done = Arc::new((Mutex::new(false), Condvar::new()));
        let mut hot_blocks: Vec<u64> = hot_pages
            .iter()
            .filter(|&&page| page * PAGE_SIZE < len)
            .map(|&page| (page / BLOCK_PAGES) as u64)
            .collect();
        hot_blocks.sort_unstable();
        hot_blocks.dedup();
        let work = FillerWork {
            uffd,
            base: base as usize,
            len,
            stream,
            capture: capture.to_owned(),
            capture_complete,
            done: done.clone(),
            hot_blocks,
        };
        let stop_fd = stop.try_clone().map_err(io_err("dup eventfd"))?;
        let thread = std::thread::Builder::new()
            .name("branch-fill".into())
            .spawn(move || work.run(stop_fd))
            .map_err(io_err("spawn filler"))?;
        Ok(Self {
            stop,
            thread: Some(thread),
            done,
        })
    }

    /// Waits until the capture's copy is complete and the memory no longer
    /// needs the filler.
    pub fn wait_done(&self) {
        let (done, changed) = &*self.done;
        let mut done = done.lock().unwrap();
        while !*done {
            done = changed.wait(done).unwrap();
        }
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        let _ = rustix::io::write(&self.stop, &1u64.to_ne_bytes());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl FillerWork {
    fn run(self, stop: OwnedFd) {
        // The branch's vCPUs wait on this thread.
        set_current_realtime(true);
        let served = match self.serve(&stop) {
            // The capture closes its socket once the copy completes: a
            // connection lost at that moment (reset before the capture said
            // so) loses nothing if its state says the file is whole.
            Err(_) if (self.capture_complete)() => Ok(true),
            served => served,
        };
        match served {
            Ok(true) => {
                // Unregistering wakes any fault still waiting; every page is
                // in the file now.
                let _ = self.uffd.unregister(self.base as *mut _, self.len);
                let (done, changed) = &*self.done;
                *done.lock().unwrap() = true;
                changed.notify_all();
            }
            Ok(false) => {}
            Err(err) => {
                // Pages this branch has not touched yet can no longer be
                // fetched, and letting a fault through would read a hole as
                // zeros: the branch cannot go on. Its whole process ends so
                // that no vCPU runs another instruction.
                let reason = crate::error::chain(&err);
                tracing::error!(capture = %self.capture.display(), %reason,
                    "branch memory cannot be completed; stopping the branch");
                eprintln!(
                    "sandfork: branch of {} stopped: {reason}",
                    self.capture.display()
                );
                std::process::exit(70);
            }
        }
    }

    /// Serves faults until the copy is complete (true), the filler is
    /// stopped (false), or the capture cannot complete (an error).
    fn serve(&self, stop: &OwnedFd) -> Result<bool, FillError> {
        let mut pending: HashSet<u64> = HashSet::new();
        let mut received = Vec::with_capacity(64);
        for &block in &self.hot_blocks {
            pending.insert(block);
            if let Err(err) = self.ask(block) {
                return self.after_failed_ask(err, &received);
            }
        }
        loop {
            let mut fds = [
                PollFd::new(&self.uffd, PollFlags::IN),
                PollFd::new(&self.stream, PollFlags::IN),
                PollFd::new(stop, PollFlags::IN),
            ];
            match rustix::event::poll(&mut fds, None) {
                Err(rustix::io::Errno::INTR) => continue,
                Err(errno) => return Err(errno_err("poll")(errno)),
                Ok(_) => {}
            }
            if !fds[2].revents().is_empty() {
                return Ok(false);
            }
            let faults = !fds[0].revents().is_empty();
            let replies = !fds[1].revents().is_empty();
            if faults {
                while let Some(event) = self.uffd.read_event().map_err(uffd_err("read event"))? {
                    if let Event::Pagefault {
                        kind: FaultKind::Missing,
                        addr,
                        ..
                    } = event
                    {
                        let block = ((addr as usize - self.base) / PAGE_SIZE / BLOCK_PAGES) as u64;
                        if pending.insert(block)
                            && let Err(err) = self.ask(block)
                        {
                            return self.after_failed_ask(err, &received);
                        }
                    }
                }
            }
            if replies {
                let mut buffer = [0u8; 512];
                let read =
                    rustix::net::recv(&self.stream, &mut buffer, rustix::net::RecvFlags::DONTWAIT);
                match read {
                    Ok((0, _)) => return self.complete_after_close(),
                    Ok((count, _)) => received.extend_from_slice(&buffer[..count]),
                    Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
                    Err(errno) => return Err(errno_err("read from the capture")(errno)),
                }
                let whole = received.len() / 8 * 8;
                for message in received[..whole].chunks_exact(8) {
                    match u64::from_le_bytes(message.try_into().unwrap()) {
                        DONE => return Ok(true),
                        FAILED => return Err(FillError::CaptureFailed),
                        block => {
                            pending.remove(&block);
                            self.wake(block)?;
                        }
                    }
                }
                received.drain(..whole);
            }
        }
    }

    fn ask(&self, block: u64) -> Result<(), FillError> {
        (&self.stream)
            .write_all(&block.to_le_bytes())
            .map_err(io_err("ask the capture for a page"))
    }

    /// An ask the capture no longer reads, as when its copy has just ended
    /// (it stops reading, says how it ended, and closes): what it said
    /// before closing decides, read after the `received` bytes not yet
    /// taken; `err` if it said nothing.
    fn after_failed_ask(&self, err: FillError, received: &[u8]) -> Result<bool, FillError> {
        let mut said = received.to_vec();
        if self
            .stream
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .is_ok()
        {
            let _ = (&self.stream).read_to_end(&mut said);
        }
        let whole = said.len() / 8 * 8;
        for message in said[..whole].chunks_exact(8) {
            match u64::from_le_bytes(message.try_into().unwrap()) {
                DONE => return Ok(true),
                FAILED => return Err(FillError::CaptureFailed),
                _ => {}
            }
        }
        Err(err)
    }

    fn wake(&self, block: u64) -> Result<(), FillError> {
        let start = (block as usize)
            .checked_mul(BLOCK_PAGES * PAGE_SIZE)
            .filter(|&start| start < self.len)
            .ok_or(FillError::BlockPastEnd { block })?;
        let len = (BLOCK_PAGES * PAGE_SIZE).min(self.len - start);
        self.uffd
            .wake((self.base + start) as *mut _, len)
            .map_err(uffd_err("wake faults"))
    }

    /// The capture closed the connection without saying why: it is complete
    /// if its record says so (it finished just as we connected), and lost
    /// otherwise (its process went away).
    fn complete_after_close(&self) -> Result<bool, FillError> {
        if (self.capture_complete)() {
            Ok(true)
        } else {
            Err(FillError::CaptureGone)
        }
    }
}
