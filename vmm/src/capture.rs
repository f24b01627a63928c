//! Capturing a running VM's memory and vCPU state.
//!
//! Live capture (`LiveCapture::start`), in order: the fault handler and the
//! copier threads start (the copier waits); by default (`Arm::AheadOfPause`)
//! all of guest memory is write-protected while the guest still runs, and
//! the pages it writes meanwhile fault, are recorded and un-protected at
//! once; then the vCPUs are kicked out of `KVM_RUN` and paused, their state
//! is saved, the pages written since the early arm are re-protected, and
//! the vCPUs resume. Only then does the copier start filling the snapshot,
//! while the fault handler saves the before-image of any page the guest
//! writes first. The pause costs the vCPU state save plus a few pages,
//! whatever the memory size. `Arm::InPause` protects everything inside the
//! pause (the one-shot baseline).
//!
//! Pages enter the snapshot file atomically and the first fill of a page
//! wins (UFFDIO_COPY, see `SnapshotMapping`), and a page is un-protected
//! only once it is in the snapshot, so every fill of a page reads it
//! unchanged since the pause: the snapshot is guest memory as it was at the
//! pause. Nobody waits for anybody else's copy, so a guest write that hits
//! a protected page waits for one page's copy, never the copier.
//!
//! Stop-and-copy: pause, copy everything, resume (the baseline).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use rustix::event::{EventfdFlags, PollFd, PollFlags};
use serde::{Deserialize, Serialize};
use userfaultfd::{Event, FaultKind, FeatureFlags, RegisterMode, Uffd, UffdBuilder};

use crate::memory::{GuestMemory, MemoryError, PAGE_SIZE, ReadOnlyMapping, SnapshotMapping};
use crate::thread::{RealtimeGuard, set_current_realtime};
use crate::vcpu::{VcpuState, VmState};
use crate::vm::{Vm, VmError};

/// UFFD_FEATURE_WP_HUGETLBFS_SHMEM: write-protect on shared memory (memfd).
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// UFFD_FEATURE_WP_UNPOPULATED: protect pages never touched too, so a first
/// write to a hole still faults.
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
// The crate names the neighbouring flags; check our hand-written bits line up.
const _: () = assert!(FeatureFlags::THREAD_ID.bits() == 1 << 8);
const _: () = assert!(FeatureFlags::PAGEFAULT_FLAG_WP.bits() == 1);

/// Pages the copier fills and un-protects at a time (2 MiB).
const CHUNK_PAGES: usize = 512;

/// A page's state: not known to be in the snapshot yet, or in it.
const PAGE_CLEAN: u8 = 0;
const PAGE_COPIED: u8 = 1;
/// Never written at the pause (a hole of the memfd): zero, so nothing is
/// copied and the snapshot keeps a hole there, which a branch that asks for
/// the page before the copy completes gets filled with zeros.
const PAGE_ZERO: u8 = 2;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum CaptureMode {
    /// Pause only to save vCPU state and write-protect memory.
    #[default]
    Live,
    /// Pause for the whole copy.
    StopAndCopy,
}

/// When a live capture write-protects guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Arm {
    /// Before the pause, tracking the pages written until the pause.
    #[default]
    AheadOfPause,
    /// All of memory inside the pause.
    InPause,
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("snapshot memory is {snapshot} bytes but guest memory is {guest}")]
    SizeMismatch { snapshot: usize, guest: usize },
    #[error("userfaultfd {op} failed")]
    Userfaultfd {
        op: &'static str,
        #[source]
        source: userfaultfd::Error,
    },
    #[error("{op} failed")]
    Sys {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot {op}")]
    Memory {
        op: &'static str,
        #[source]
        source: MemoryError,
    },
    #[error("capture worker thread panicked")]
    WorkerPanicked,
    #[error("writing the snapshot failed")]
    SnapshotWrite(#[source] MemoryError),
}

fn memory_op(op: &'static str) -> impl FnOnce(MemoryError) -> CaptureError {
    move |source| CaptureError::Memory { op, source }
}

fn uffd_op(op: &'static str) -> impl FnOnce(userfaultfd::Error) -> CaptureError {
    move |source| CaptureError::Userfaultfd { op, source }
}

/// What a capture cost.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CaptureStats {
    pub mode: CaptureMode,
    /// How long the vCPUs were stopped.
    pub pause_ns: u64,
    /// Of the pause, the time until every vCPU stopped and saved its state.
    #[serde(default)]
    pub vcpus_stopped_ns: u64,
    /// Of the pause, the time spent write-protecting memory.
    pub arm_ns: u64,
    /// Write-protecting all of memory before the pause (`Arm::AheadOfPause`).
    #[serde(default)]
    pub pre_arm_ns: u64,
    /// Pages written between that and the pause, re-protected in the pause.
    #[serde(default)]
    pub reprotected_pages: u64,
    /// From resume until the snapshot was complete (live) or the copy time
    /// (stop-and-copy).
    pub copy_ns: u64,
    pub bytes: u64,
    /// Pages that held no data at the pause: not copied, left holes (unless
    /// a branch asked for them early: then filled with zeros).
    #[serde(default)]
    pub zero_pages: u64,
    pub pages_copied_by_fault_handler: u64,
    pub pages_copied_by_copier: u64,
    pub write_faults: u64,
}

impl CaptureStats {
    pub fn pause_us(&self) -> f64 {
        self.pause_ns as f64 / 1e3
    }
}

/// A finished capture: the saved state; the memory is in the snapshot mapping.
pub struct Captured {
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub stats: CaptureStats,
}

/// Stop-and-copy capture into `snapshot`.
pub fn stop_and_copy(vm: &Vm, snapshot: &SnapshotMapping) -> Result<Captured, CaptureError> {
    let guest = vm.memory();
    check_sizes(guest, snapshot)?;
    let paused = vm.pause(true)?;
    let copy_started = Instant::now();
    // Holes stay holes: reading them would allocate them in the guest.
    let copied = (|| {
        let mut zero_pages = 0;
        for first in (0..guest.pages()).step_by(CHUNK_PAGES) {
            let end = (first + CHUNK_PAGES).min(guest.pages());
            let mut page = first;
            for hole in guest
                .holes_in(first..end)?
                .into_iter()
                .chain(std::iter::once(end..end))
            {
                let (offset, len) = (page * PAGE_SIZE, (hole.start - page) * PAGE_SIZE);
                // The vCPUs are stopped: the range does not change meanwhile.
                snapshot.fill_from(offset, len, &**guest)?;
                zero_pages += hole.len() as u64;
                page = hole.end;
            }
        }
        Ok::<_, MemoryError>(zero_pages)
    })();
    let copy_ns = copy_started.elapsed().as_nanos() as u64;
    vm.resume();
    let zero_pages = copied.map_err(CaptureError::SnapshotWrite)?;
    let pause_ns = paused.started().elapsed().as_nanos() as u64;
    Ok(Captured {
        vcpus: paused.vcpus,
        vm: paused.vm,
        stats: CaptureStats {
            mode: CaptureMode::StopAndCopy,
            pause_ns,
            copy_ns,
            bytes: snapshot.len() as u64,
            pages_copied_by_copier: (snapshot.len() / PAGE_SIZE) as u64 - zero_pages,
            zero_pages,
            ..Default::default()
        },
    })
}

fn check_sizes(memory: &GuestMemory, snapshot: &SnapshotMapping) -> Result<(), CaptureError> {
    if memory.len() != snapshot.len() {
        return Err(CaptureError::SizeMismatch {
            snapshot: snapshot.len(),
            guest: memory.len(),
        });
    }
    Ok(())
}

/// State shared by the copier and the fault handler of one live capture.
struct LiveCopy {
    guest: Arc<GuestMemory>,
    /// A second, unregistered mapping of the guest's memfd: reading through
    /// it leaves the guest mapping's page tables alone. `None` for private
    /// (branch) memory, which is read through the guest mapping.
    source_view: Option<ReadOnlyMapping>,
    snapshot: Arc<SnapshotMapping>,
    uffd: Uffd,
    page_states: Vec<AtomicU8>,
    stop_handler: OwnedFd,
    /// Whether the capture is armed ahead of the pause: until the pause, the
    /// fault handler records the pages written (in `written`) and
    /// un-protects them without copying.
    tracking: Mutex<bool>,
    /// One bit per page, set by the fault handler while `tracking`. Fixed in
    /// size and allocated up front: an allocation in the handler can take
    /// the process's mmap lock for writing (a new malloc arena), which waits
    /// behind the early arm and stalls every guest fault behind it.
    written: Vec<AtomicU64>,
    pages_by_handler: AtomicU64,
    pages_by_copier: AtomicU64,
    write_faults: AtomicU64,
    /// The first error writing the snapshot. The copy goes on marking pages
    /// copied, so that no guest write waits forever, but the capture fails.
    write_error: Mutex<Option<MemoryError>>,
}

impl LiveCopy {
    /// Puts the pages of `first..end` that are not in the snapshot yet into
    /// it; returns how many this call put there. Pages other threads fill
    /// meanwhile are skipped (the first fill wins), so the result is right
    /// whoever gets there first: every page is still write-protected until
    /// it is marked copied, so any fill reads it as it was at the pause.
    fn copy_pages(&self, first: usize, end: usize) -> u64 {
        let mut filled = 0;
        let mut page = first;
        while page < end {
            if self.page_states[page].load(Ordering::Acquire) != PAGE_CLEAN {
                page += 1;
                continue;
            }
            let run_start = page;
            while page < end && self.page_states[page].load(Ordering::Acquire) == PAGE_CLEAN {
                page += 1;
            }
            let offset = run_start * PAGE_SIZE;
            let len = (page - run_start) * PAGE_SIZE;
            let fill = match &self.source_view {
                Some(view) => self.snapshot.fill_from(offset, len, view),
                None => self.snapshot.fill_from(offset, len, &*self.guest),
            };
            match fill {
                Ok(pages) => filled += pages as u64,
                // The capture fails, but no guest write may wait on it: the
                // pages are still marked copied (and so un-protected).
                Err(err) => self.record_write_error(err),
            }
            for state in &self.page_states[run_start..page] {
                state.store(PAGE_COPIED, Ordering::Release);
            }
        }
        filled
    }

    /// Keeps the first error writing the snapshot: the capture fails.
    fn record_write_error(&self, err: MemoryError) {
        self.write_error.lock().unwrap().get_or_insert(err);
    }

    fn unprotect(&self, first_page: usize, pages: usize) -> Result<(), CaptureError> {
        let (addr, len) = self.guest.host_range(first_page..first_page + pages);
        loop {
            match self.uffd.remove_write_protection(addr, len, true) {
                Err(userfaultfd::Error::SystemError(errno)) if errno as i32 == libc::EAGAIN => {
                    continue;
                }
                result => return result.map_err(uffd_op("UFFDIO_WRITEPROTECT (clear)")),
            }
        }
    }

    fn run_copier(&self) -> Result<(), CaptureError> {
        set_current_realtime(false);
        let pages = self.page_states.len();
        for first in (0..pages).step_by(CHUNK_PAGES) {
            let end = (first + CHUNK_PAGES).min(pages);
            self.mark_holes(first..end)?;
            let copied = self.copy_pages(first, end);
            self.pages_by_copier.fetch_add(copied, Ordering::Relaxed);
            self.unprotect(first, end - first)?;
        }
        Ok(())
    }

    /// Marks the pages of `pages` still to copy that are holes of the
    /// guest's memfd as zero. Call it after the pause: a hole now was one at
    /// the pause (see `GuestMemory::holes_in`); a page written since then
    /// was copied first, as any other.
    fn mark_holes(&self, pages: std::ops::Range<usize>) -> Result<(), CaptureError> {
        let holes = self
            .guest
            .holes_in(pages)
            .map_err(memory_op("find holes in guest memory"))?;
        for state in holes.into_iter().flat_map(|hole| &self.page_states[hole]) {
            let _ =
                state.compare_exchange(PAGE_CLEAN, PAGE_ZERO, Ordering::AcqRel, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Re-protects the pages written since the early arm (or the previous
    /// call); returns how many. The last call, with `paused`, needs the
    /// vCPUs stopped and ends the tracking: from then on the fault handler
    /// copies before un-protecting.
    fn reprotect_written(&self, paused: bool) -> Result<u64, CaptureError> {
        // Under the lock throughout: the handler records and un-protects a
        // page as one step, so none is un-protected after its bit is taken
        // here and re-protected. A page taken here and written again before
        // its re-protect did not fault (it was unprotected): the re-protect
        // covers that write.
        let mut tracking = self.tracking.lock().unwrap();
        if paused {
            // From now on the handler copies before un-protecting.
            *tracking = false;
        }
        let mut reprotected = 0;
        let mut run: Option<(usize, usize)> = None;
        for (index, word) in self.written.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let page = index * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                reprotected += 1;
                run = match run {
                    Some((first, end)) if end == page => Some((first, page + 1)),
                    Some((first, end)) => {
                        self.write_protect(first, end)?;
                        Some((page, page + 1))
                    }
                    None => Some((page, page + 1)),
                };
            }
        }
        if let Some((first, end)) = run {
            self.write_protect(first, end)?;
        }
        Ok(reprotected)
    }

    fn write_protect(&self, first: usize, end: usize) -> Result<(), CaptureError> {
        let (addr, len) = self.guest.host_range(first..end);
        self.uffd
            .write_protect(addr, len)
            .map_err(uffd_op("UFFDIO_WRITEPROTECT"))
    }

    fn run_fault_handler(&self) -> Result<(), CaptureError> {
        // This thread sleeps until a guest write is blocked on it: run it
        // ahead of normal threads, so that a busy copier or vCPU on this
        // machine's few cores does not delay the guest's writes.
        set_current_realtime(true);
        loop {
            let mut fds = [
                PollFd::new(&self.uffd, PollFlags::IN),
                PollFd::new(&self.stop_handler, PollFlags::IN),
            ];
            match rustix::event::poll(&mut fds, None) {
                Err(rustix::io::Errno::INTR) => continue,
                Err(errno) => {
                    return Err(CaptureError::Sys {
                        op: "poll userfaultfd",
                        source: errno.into(),
                    });
                }
                Ok(_) => {}
            }
            let stop = !fds[1].revents().is_empty();
            while let Some(event) = self.uffd.read_event().map_err(uffd_op("read event"))? {
                if let Event::Pagefault {
                    kind: FaultKind::WriteProtected,
                    addr,
                    ..
                } = event
                {
                    self.write_faults.fetch_add(1, Ordering::Relaxed);
                    let Some(page) = self.guest.page_of_host_addr(addr) else {
                        continue;
                    };
                    {
                        // Recording and un-protecting under the lock: the
                        // pause sees each page either still protected or
                        // recorded (and re-protects it).
                        let tracking = self.tracking.lock().unwrap();
                        if *tracking {
                            self.written[page / 64].fetch_or(1 << (page % 64), Ordering::AcqRel);
                            self.unprotect(page, 1)?;
                            continue;
                        }
                    }
                    let copied = self.copy_pages(page, page + 1);
                    self.pages_by_handler.fetch_add(copied, Ordering::Relaxed);
                    self.unprotect(page, 1)?;
                }
            }
            if stop {
                return Ok(());
            }
        }
    }
}

/// A live capture in progress: the vCPUs run again, the copy goes on.
pub struct LiveCapture {
    copy: Arc<LiveCopy>,
    copier: Option<JoinHandle<Result<(), CaptureError>>>,
    /// Starts the copier, which is spawned before the arm (its start-up
    /// takes the mmap lock for writing, as the handler's does) and waits
    /// for this; dropping it unstarted lets the copier end at once.
    start_copier: Option<std::sync::mpsc::SyncSender<()>>,
    handler: Option<JoinHandle<Result<(), CaptureError>>>,
    vcpus: Vec<VcpuState>,
    vm_state: VmState,
    pause_ns: u64,
    arm_ns: u64,
    vcpus_stopped_ns: u64,
    pre_arm_ns: u64,
    reprotected_pages: u64,
    resumed: Instant,
}

impl LiveCapture {
    /// Pauses `vm`, saves its state, write-protects its memory and resumes
    /// it; the copy into `snapshot` then runs in the background.
    pub fn start(vm: &Vm, snapshot: Arc<SnapshotMapping>, arm: Arm) -> Result<Self, CaptureError> {
        let guest = vm.memory().clone();
        check_sizes(&guest, &snapshot)?;
        // A branch still filling from its own capture has its memory
        // registered with another userfaultfd until then.
        vm.wait_filled();
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            // KVM's own accesses to guest memory must fault too.
            .user_mode_only(false)
            .require_features(
                FeatureFlags::PAGEFAULT_FLAG_WP
                    | FeatureFlags::from_bits_retain(
                        UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_WP_UNPOPULATED,
                    ),
            )
            .create()
            .map_err(uffd_op("create"))?;
        let (base, len) = guest.host_range(0..guest.pages());
        uffd.register_with_mode(base, len, RegisterMode::WRITE_PROTECT)
            .map_err(uffd_op("register"))?;
        let stop_handler = rustix::event::eventfd(0, EventfdFlags::CLOEXEC).map_err(|errno| {
            CaptureError::Sys {
                op: "eventfd",
                source: errno.into(),
            }
        })?;
        let source_view = guest
            .memfd()
            .map(|fd| ReadOnlyMapping::of_fd(fd, guest.len()))
            .transpose()
            .map_err(memory_op("map guest memory for reading"))?;
        let written = (0..guest.pages().div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        let copy = Arc::new(LiveCopy {
            source_view,
            page_states: (0..guest.pages())
                .map(|_| AtomicU8::new(PAGE_CLEAN))
                .collect(),
            guest,
            snapshot,
            uffd,
            stop_handler,
            tracking: Mutex::new(arm == Arm::AheadOfPause),
            written,
            pages_by_handler: AtomicU64::new(0),
            pages_by_copier: AtomicU64::new(0),
            write_faults: AtomicU64::new(0),
            write_error: Mutex::new(None),
        });
        // The handler must be running before the first protected write.
        let handler = {
            let copy = copy.clone();
            spawn_running("wp-faults", move || copy.run_fault_handler())?
        };
        let mut capture = Self {
            copy,
            copier: None,
            start_copier: None,
            handler: Some(handler),
            vcpus: Vec::new(),
            vm_state: VmState {
                irqchips: Vec::new(),
                clock: Default::default(),
            },
            pause_ns: 0,
            arm_ns: 0,
            vcpus_stopped_ns: 0,
            pre_arm_ns: 0,
            reprotected_pages: 0,
            resumed: Instant::now(),
        };
        // Spawned now, started after the pause: see `start_copier`.
        let (start_copier, copier_started) = std::sync::mpsc::sync_channel(1);
        let copy = capture.copy.clone();
        capture.copier = Some(spawn_running(
            "snapshot-copier",
            move || match copier_started.recv() {
                Ok(()) => copy.run_copier(),
                Err(_) => Ok(()),
            },
        )?);
        capture.start_copier = Some(start_copier);
        // The one-shot arm works inside the pause, where write-protecting
        // populated page tables costs ~16-35 ms per GiB but empty ones are
        // cheap: drop the guest mapping's page-table entries first (memfd
        // memory keeps its contents), so the baseline is as fast as it can
        // be. The early arm skips this: on a populated 1 GiB the drop costs
        // 40-130 ms here, more than it saves an arm that runs outside the
        // pause anyway (32-36 ms populated, 7-11 ms after the drop).
        if arm == Arm::InPause && capture.copy.guest.memfd().is_some() {
            capture
                .copy
                .guest
                .drop_page_tables()
                .map_err(memory_op("drop guest page tables"))?;
        }
        // On any error from here, dropping `capture` stops the handler and
        // closes the userfaultfd, which lifts every protection.
        if arm == Arm::AheadOfPause {
            let started = Instant::now();
            let copy = &capture.copy;
            for (first, end) in pieces(copy.page_states.len()) {
                copy.write_protect(first, end)?;
            }
            capture.pre_arm_ns = started.elapsed().as_nanos() as u64;
            // The guest kept writing during the arm (tens of ms per GiB
            // here): catch up while it runs, so that the pause re-protects
            // only what it writes in the short while since.
            capture.copy.reprotect_written(false)?;
        }
        // The pause window runs at real-time priority end to end.
        let boost = RealtimeGuard::new();
        let paused = vm.pause(true)?;
        let arm_started = Instant::now();
        let armed = match arm {
            Arm::AheadOfPause => capture.copy.reprotect_written(true).map(|pages| {
                capture.reprotected_pages = pages;
            }),
            Arm::InPause => capture
                .copy
                .write_protect(0, capture.copy.page_states.len()),
        };
        capture.arm_ns = arm_started.elapsed().as_nanos() as u64;
        capture.vcpus_stopped_ns = paused.vcpus_stopped_ns;
        vm.resume();
        capture.resumed = Instant::now();
        drop(boost);
        capture.pause_ns = (capture.resumed - paused.started()).as_nanos() as u64;
        armed?;
        capture.vcpus = paused.vcpus;
        capture.vm_state = paused.vm;
        if let Some(start) = capture.start_copier.take() {
            let _ = start.send(());
        }
        Ok(capture)
    }

    pub fn pause_ns(&self) -> u64 {
        self.pause_ns
    }

    /// The vCPU state saved at the pause.
    pub fn vcpus(&self) -> &[VcpuState] {
        &self.vcpus
    }

    pub fn vm_state(&self) -> &VmState {
        &self.vm_state
    }

    /// The statistics known once the vCPUs run again (the copy's are zero).
    pub fn stats_so_far(&self) -> CaptureStats {
        CaptureStats {
            mode: CaptureMode::Live,
            pause_ns: self.pause_ns,
            arm_ns: self.arm_ns,
            vcpus_stopped_ns: self.vcpus_stopped_ns,
            pre_arm_ns: self.pre_arm_ns,
            reprotected_pages: self.reprotected_pages,
            bytes: self.copy.guest.len() as u64,
            ..Default::default()
        }
    }

    /// A handle that copies chosen pages ahead of the copier, for branches
    /// that run before the copy completes.
    pub fn progress(&self) -> CaptureProgress {
        CaptureProgress(self.copy.clone())
    }

    /// Waits for the copy to complete.
    pub fn finish(mut self) -> Result<Captured, CaptureError> {
        let copier_result = join(self.copier.take());
        let copy_ns = self.resumed.elapsed().as_nanos() as u64;
        let handler_result = self.stop_handler();
        copier_result?;
        handler_result?;
        if let Some(error) = self.copy.write_error.lock().unwrap().take() {
            return Err(CaptureError::SnapshotWrite(error));
        }
        let copy = &self.copy;
        let stats = CaptureStats {
            copy_ns,
            pages_copied_by_fault_handler: copy.pages_by_handler.load(Ordering::Relaxed),
            pages_copied_by_copier: copy.pages_by_copier.load(Ordering::Relaxed),
            zero_pages: copy
                .page_states
                .iter()
                .filter(|state| state.load(Ordering::Relaxed) == PAGE_ZERO)
                .count() as u64,
            write_faults: copy.write_faults.load(Ordering::Relaxed),
            ..self.stats_so_far()
        };
        Ok(Captured {
            vcpus: std::mem::take(&mut self.vcpus),
            vm: self.vm_state.clone(),
            stats,
        })
    }

    fn stop_handler(&mut self) -> Result<(), CaptureError> {
        let Some(handler) = self.handler.take() else {
            return Ok(());
        };
        let _ = rustix::io::write(self.copy.stop_handler.as_fd(), &1u64.to_ne_bytes());
        join(Some(handler))
    }
}

impl Drop for LiveCapture {
    fn drop(&mut self) {
        // An unfinished capture (error or early drop) must not leave the
        // guest blocked: let the copier finish, stop the handler, and
        // unregister, which lifts every remaining protection.
        // An unstarted copier ends once its start is dropped.
        self.start_copier = None;
        let _ = join(self.copier.take());
        let _ = self.stop_handler();
        let copy = &self.copy;
        for (first, end) in pieces(copy.page_states.len()) {
            let (addr, len) = copy.guest.host_range(first..end);
            let _ = copy.uffd.unregister(addr, len);
        }
    }
}

/// Registering, protecting and unregistering walk the page tables of the
/// range they are given, and unregistering holds the process's mmap lock
/// for writing meanwhile (arming holds it for reading, and a writer queued
/// behind it holds up every reader after it): about 30 ms per populated
/// GiB here, during which any guest access that faults waits. Done in
/// pieces of this size, each wait stays near a millisecond.
const LOCKED_WALK_PAGES: usize = (32 << 20) / PAGE_SIZE;

/// Page ranges `first..end` of `LOCKED_WALK_PAGES` covering `0..pages`.
fn pieces(pages: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..pages)
        .step_by(LOCKED_WALK_PAGES)
        .map(move |first| (first, (first + LOCKED_WALK_PAGES).min(pages)))
}

/// Spawns a thread and returns once it runs: a thread's start-up maps
/// memory (its signal stack), which takes the mmap lock for writing. Done
/// during the early arm, that would wait behind the arm, and every guest
/// fault would wait behind it.
fn spawn_running(
    name: &str,
    body: impl FnOnce() -> Result<(), CaptureError> + Send + 'static,
) -> Result<JoinHandle<Result<(), CaptureError>>, CaptureError> {
    let (up, running) = std::sync::mpsc::sync_channel(0);
    let handle = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = up.send(());
            body()
        })
        .map_err(|source| CaptureError::Sys {
            op: "spawn capture thread",
            source,
        })?;
    let _ = running.recv();
    Ok(handle)
}

fn join(handle: Option<JoinHandle<Result<(), CaptureError>>>) -> Result<(), CaptureError> {
    match handle {
        None => Ok(()),
        Some(handle) => handle.join().map_err(|_| CaptureError::WorkerPanicked)?,
    }
}

/// A running live capture's copy, seen from outside: copies chosen pages
/// into the snapshot ahead of the copier.
#[derive(Clone)]
pub struct CaptureProgress(Arc<LiveCopy>);

impl CaptureProgress {
    /// Guest memory pages.
    pub fn pages(&self) -> usize {
        self.0.page_states.len()
    }

    /// Makes sure pages `first..first + count` hold their captured contents
    /// in the snapshot, copying them now if nobody has yet. Returns false if
    /// the capture failed (the snapshot is not to be used).
    pub fn ensure_copied(&self, first: usize, count: usize) -> bool {
        let end = (first + count).min(self.pages());
        self.0.copy_pages(first, end);
        // Zero pages stay holes in the snapshot until asked for.
        for page in first..end {
            if self.0.page_states[page].load(Ordering::Acquire) == PAGE_ZERO
                && let Err(err) = self.0.snapshot.zero_fill(page * PAGE_SIZE, PAGE_SIZE)
            {
                self.0.record_write_error(err);
            }
        }
        self.0.write_error.lock().unwrap().is_none()
    }

    /// Whether `page` needs no more copying: it is in the snapshot (and so
    /// no longer protected, or about to be un-protected), or it was zero.
    pub fn is_copied(&self, page: usize) -> bool {
        self.0.page_states[page].load(Ordering::Acquire) != PAGE_CLEAN
    }

    /// Pages still to copy.
    pub fn remaining_pages(&self) -> usize {
        self.0
            .page_states
            .iter()
            .filter(|state| state.load(Ordering::Relaxed) == PAGE_CLEAN)
            .count()
    }

    /// Whether the capture has failed so far.
    pub fn failed(&self) -> bool {
        self.0.write_error.lock().unwrap().is_some()
    }
}

impl crate::fill::PageSource for CaptureProgress {
    fn pages(&self) -> usize {
        CaptureProgress::pages(self)
    }

    fn ensure_copied(&self, first: usize, count: usize) -> bool {
        CaptureProgress::ensure_copied(self, first, count)
    }
}

/// Live capture into `snapshot`, waiting for the copy to complete.
pub fn live(vm: &Vm, snapshot: Arc<SnapshotMapping>) -> Result<Captured, CaptureError> {
    LiveCapture::start(vm, snapshot, Arm::AheadOfPause)?.finish()
}

/// A deliberately broken capture for tests and the benchmark's control: the
/// vCPU state is saved at a pause, but memory is copied while the guest runs,
/// without write protection. Its result is torn whenever the guest writes a
/// page before the copy gets there; the copy runs from the top of memory
/// down, against the direction the test guests write in, so that it is.
pub fn unprotected_copy(vm: &Vm, snapshot: &SnapshotMapping) -> Result<Captured, CaptureError> {
    check_sizes(vm.memory(), snapshot)?;
    let paused = vm.pause(true)?;
    vm.resume();
    let pause_ns = paused.started().elapsed().as_nanos() as u64;
    let started = Instant::now();
    for page in (0..snapshot.len() / PAGE_SIZE).rev() {
        // The guest may write the page meanwhile, which is the point of
        // this copy.
        snapshot
            .fill_from(page * PAGE_SIZE, PAGE_SIZE, &**vm.memory())
            .map_err(CaptureError::SnapshotWrite)?;
    }
    Ok(Captured {
        vcpus: paused.vcpus,
        vm: paused.vm,
        stats: CaptureStats {
            mode: CaptureMode::Live,
            pause_ns,
            copy_ns: started.elapsed().as_nanos() as u64,
            bytes: snapshot.len() as u64,
            ..Default::default()
        },
    })
}
