//! Guest memory: a sealed memfd for booted sandboxes, or a copy-on-write
//! private mapping of a capture's memory file for branches; the memory
//! file a capture fills; read-only views of files.
//!
//! Every access to these mappings goes through the bounds-checked methods
//! here (volatile where the guest may be running, as rust-vmm's `vm-memory`
//! does): callers never do pointer arithmetic on a mapping. The host
//! addresses handed out (`host_range`) are for the kernel only (KVM
//! memslots, userfaultfd ranges), never dereferenced outside this module.

use std::fs::File;
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::ptr::NonNull;

use rustix::fs::{FlockOperation, MemfdFlags, SealFlags, SeekFrom};
use rustix::mm::{Advice, MapFlags, ProtFlags};
use userfaultfd::{RegisterMode, Uffd, UffdBuilder};

pub const PAGE_SIZE: usize = 4096;

/// Smallest and largest guest memory the agent accepts.
pub const MIN_MEMORY_BYTES: u64 = 64 << 20;
pub const MAX_MEMORY_BYTES: u64 = 256 << 30;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "guest memory must be {min_mib} MiB to {max_gib} GiB in whole 2 MiB steps, got {bytes} bytes",
        min_mib = MIN_MEMORY_BYTES >> 20,
        max_gib = MAX_MEMORY_BYTES >> 30
    )]
    InvalidSize { bytes: u64 },
    #[error(
        "guest memory of {wanted_mib} MiB exceeds what this host has available ({available_mib} MiB)"
    )]
    HostTooSmall { wanted_mib: u64, available_mib: u64 },
    #[error("memory file is {file_bytes} bytes, expected {expected_bytes}")]
    FileSizeMismatch {
        file_bytes: u64,
        expected_bytes: u64,
    },
    #[error("{len} bytes at {offset:#x} are outside memory of {size} bytes")]
    OutOfBounds { offset: u64, len: u64, size: u64 },
    #[error("{op} failed")]
    Sys {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("userfaultfd {op} failed")]
    Userfaultfd {
        op: &'static str,
        #[source]
        source: userfaultfd::Error,
    },
}

fn sys(op: &'static str) -> impl FnOnce(rustix::io::Errno) -> MemoryError {
    move |errno| MemoryError::Sys {
        op,
        source: errno.into(),
    }
}

/// Checks a guest memory size against the agent's limits and, when
/// `check_host` is set, against the memory the host has available.
pub fn validate_size(bytes: u64, check_host: bool) -> Result<(), MemoryError> {
    if !(MIN_MEMORY_BYTES..=MAX_MEMORY_BYTES).contains(&bytes) || !bytes.is_multiple_of(2 << 20) {
        return Err(MemoryError::InvalidSize { bytes });
    }
    if check_host
        && let Some(available) = host_available_bytes()
        && bytes > available
    {
        return Err(MemoryError::HostTooSmall {
            wanted_mib: bytes >> 20,
            available_mib: available >> 20,
        });
    }
    Ok(())
}

/// `MemAvailable` from /proc/meminfo, in bytes.
pub fn host_available_bytes() -> Option<u64> {
    meminfo_field("MemAvailable:")
}

/// A field of /proc/meminfo (given in kB there), in bytes.
pub fn meminfo_field(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|line| line.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Where a guest memory mapping comes from.
#[derive(Debug)]
enum Backing {
    /// A fresh memfd, size-sealed; the guest's writes land in it.
    Memfd(OwnedFd),
    /// A private (copy-on-write) mapping of a capture's memory file: reads
    /// share the capture's pages, writes get private copies.
    PrivateFile(#[allow(dead_code, reason = "held open for the mapping's lifetime")] File),
}

/// A host mapping of guest-physical memory starting at guest address 0.
#[derive(Debug)]
pub struct GuestMemory {
    base: NonNull<u8>,
    len: usize,
    backing: Backing,
    /// Host writes (`write_slice`, `write_u64`) hold it shared; a reader
    /// of all of memory as a slice holds it exclusively, so that no host
    /// write overlaps the slice.
    host_writes: std::sync::RwLock<()>,
}

// SAFETY: the mapping is plain shared memory owned by this value; concurrent
// access is coordinated by its users (vCPUs write through KVM, the capture
// code reads it only through the volatile or kernel-side accessors here,
// under its page-state protocol).
unsafe impl Send for GuestMemory {}
// SAFETY: see `Send`; `&GuestMemory` only offers volatile or bounds-checked
// accesses and addresses for the kernel.
unsafe impl Sync for GuestMemory {}

/// Checks that `offset..offset + len` lies inside `size` bytes.
fn check_range(offset: usize, len: usize, size: usize) -> Result<(), MemoryError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(MemoryError::OutOfBounds {
            offset: offset as u64,
            len: len as u64,
            size: size as u64,
        }),
    }
}

/// A mapping a capture can fill the snapshot from: guest memory, or a
/// read-only view of it. Sealed: only the mappings of this module.
pub trait FillSource: sealed::Sealed {
    /// The host address of `offset..offset + len`, checked to lie inside
    /// the mapping, for the kernel to read from.
    fn source_range(&self, offset: usize, len: usize) -> Result<*const u8, MemoryError>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::GuestMemory {}
    impl Sealed for super::ReadOnlyMapping {}
}

impl FillSource for GuestMemory {
    fn source_range(&self, offset: usize, len: usize) -> Result<*const u8, MemoryError> {
        check_range(offset, len, self.len)?;
        Ok(self.base.as_ptr().wrapping_add(offset).cast_const())
    }
}

impl GuestMemory {
    /// Creates `len` bytes of zeroed guest memory in a new memfd, sealed
    /// against shrinking and growing, mapped shared.
    pub fn new_memfd(name: &str, len: u64) -> Result<Self, MemoryError> {
        let fd = rustix::fs::memfd_create(
            name,
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING | MemfdFlags::NOEXEC_SEAL,
        )
        .or_else(|_| {
            rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
        })
        .map_err(sys("memfd_create"))?;
        rustix::fs::ftruncate(&fd, len).map_err(sys("ftruncate memfd"))?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
            .map_err(sys("seal memfd"))?;
        let base = map(fd.as_fd(), len as usize, MapFlags::SHARED)?;
        Ok(Self {
            base,
            len: len as usize,
            backing: Backing::Memfd(fd),
            host_writes: Default::default(),
        })
    }

    /// Maps a capture's memory file copy-on-write. The file must be exactly
    /// `len` bytes long.
    pub fn map_private(file: File, len: u64) -> Result<Self, MemoryError> {
        check_file_size(&file, len)?;
        let base = map(
            file.as_fd(),
            len as usize,
            MapFlags::PRIVATE | MapFlags::NORESERVE,
        )?;
        Ok(Self {
            base,
            len: len as usize,
            backing: Backing::PrivateFile(file),
            host_writes: Default::default(),
        })
    }

    /// The host address where guest address 0 is mapped, for the kernel
    /// (KVM's memslot); not to be dereferenced.
    pub fn host_base(&self) -> u64 {
        self.base.as_ptr() as u64
    }

    /// The host address and length of guest pages `pages`, for userfaultfd
    /// calls on them. Panics if the range is outside memory.
    pub fn host_range(&self, pages: Range<usize>) -> (*mut libc::c_void, usize) {
        assert!(
            pages.start <= pages.end && pages.end <= self.pages(),
            "page range past the end of memory"
        );
        (
            self.base
                .as_ptr()
                .wrapping_add(pages.start * PAGE_SIZE)
                .cast(),
            pages.len() * PAGE_SIZE,
        )
    }

    /// The guest page that host address `addr` (from a fault) falls in.
    pub fn page_of_host_addr(&self, addr: *mut libc::c_void) -> Option<usize> {
        let offset = (addr as usize).checked_sub(self.base.as_ptr() as usize)?;
        (offset < self.len).then_some(offset / PAGE_SIZE)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn pages(&self) -> usize {
        self.len / PAGE_SIZE
    }

    /// The runs of `pages` that are holes of a memfd (never written, so
    /// zero); none for other memory. Holes only fill in (nothing here
    /// punches them), so a page seen with data stays so, and one seen as a
    /// hole was one at any earlier instant. `mincore` proposes the pages
    /// that are not in memory without walking the ones that are, and
    /// `SEEK_DATA` confirms each run (a swapped-out page is data).
    pub fn holes_in(&self, pages: Range<usize>) -> Result<Vec<Range<usize>>, MemoryError> {
        let Backing::Memfd(fd) = &self.backing else {
            return Ok(Vec::new());
        };
        let (start, len) = self.host_range(pages.clone());
        let mut resident = vec![0u8; pages.len()];
        // SAFETY: the range lies inside our mapping (checked by host_range)
        // and `resident` holds one byte per page of it; mincore only reads
        // page tables and the cache.
        let result = unsafe { libc::mincore(start, len, resident.as_mut_ptr()) };
        if result != 0 {
            return Err(MemoryError::Sys {
                op: "mincore",
                source: std::io::Error::last_os_error(),
            });
        }
        let mut holes = Vec::new();
        let mut index = 0;
        while index < resident.len() {
            if resident[index] & 1 != 0 {
                index += 1;
                continue;
            }
            let run_end = index + resident[index..].iter().take_while(|r| *r & 1 == 0).count();
            let start = pages.start + index;
            let data = match rustix::fs::seek(fd, SeekFrom::Data((start * PAGE_SIZE) as u64)) {
                Ok(offset) => offset as usize / PAGE_SIZE,
                // No data from `start` on.
                Err(rustix::io::Errno::NXIO) => self.pages(),
                Err(errno) => return Err(sys("lseek(SEEK_DATA)")(errno)),
            };
            let hole_end = data.min(pages.start + run_end);
            if hole_end > start {
                holes.push(start..hole_end);
            }
            index = run_end;
        }
        Ok(holes)
    }

    /// The file behind the mapping, when it is a memfd (shared mapping).
    pub fn memfd(&self) -> Option<BorrowedFd<'_>> {
        match &self.backing {
            Backing::Memfd(fd) => Some(fd.as_fd()),
            Backing::PrivateFile(_) => None,
        }
    }

    /// Copies `data` into guest memory at guest address `addr` (for loading
    /// a guest that does not run yet).
    pub fn write_slice(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        let offset = usize::try_from(addr).unwrap_or(usize::MAX);
        check_range(offset, data.len(), self.len)?;
        let _writing = self.host_write();
        // SAFETY: the range is inside the mapping (checked above) and `data`
        // cannot overlap it (it is a Rust slice, the mapping is not).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.as_ptr().add(offset), data.len())
        };
        Ok(())
    }

    /// Hands `read` all of guest memory as a byte slice, holding off host
    /// writes through this value meanwhile.
    ///
    /// # Safety
    /// The guest must not write its memory meanwhile: its vCPUs must be
    /// stopped for the whole call (see `Vm::inspect_paused`).
    pub(crate) unsafe fn read_quiescent<R>(&self, read: impl FnOnce(&[u8]) -> R) -> R {
        let _no_host_writes = self
            .host_writes
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // SAFETY: the mapping is `len` readable bytes owned by `self`; host
        // writes wait for the lock held above and the caller guarantees
        // that the guest does not write, so the bytes do not change while
        // the slice lives (it does not outlive this call).
        read(unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.len) })
    }

    fn host_write(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.host_writes
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The address of the aligned u64 at guest address `addr`, checked.
    fn u64_at(&self, addr: u64) -> Result<*mut u64, MemoryError> {
        let offset = usize::try_from(addr).unwrap_or(usize::MAX);
        check_range(offset, 8, self.len)?;
        if !offset.is_multiple_of(8) {
            return Err(MemoryError::OutOfBounds {
                offset: addr,
                len: 8,
                size: self.len as u64,
            });
        }
        Ok(self.base.as_ptr().wrapping_add(offset).cast())
    }

    /// Reads the u64 at guest address `addr` (volatile: the guest may be
    /// running). `addr` must be 8-aligned and inside memory.
    pub fn read_u64(&self, addr: u64) -> Result<u64, MemoryError> {
        let ptr = self.u64_at(addr)?;
        // SAFETY: aligned and inside the mapping (checked by `u64_at`).
        Ok(unsafe { std::ptr::read_volatile(ptr) })
    }

    /// Writes the u64 at guest address `addr` (volatile: the guest may be
    /// running). `addr` must be 8-aligned and inside memory.
    pub fn write_u64(&self, addr: u64, value: u64) -> Result<(), MemoryError> {
        let ptr = self.u64_at(addr)?;
        let _writing = self.host_write();
        // SAFETY: aligned and inside the mapping (checked by `u64_at`).
        unsafe { std::ptr::write_volatile(ptr, value) };
        Ok(())
    }

    /// Bytes of this mapping that are private copies (for a branch: the
    /// pages it wrote), from /proc/self/smaps.
    pub fn private_bytes(&self) -> u64 {
        let start = format!("{:x}-", self.base.as_ptr() as usize);
        let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
            return 0;
        };
        smaps
            .lines()
            .skip_while(|line| !line.starts_with(&start))
            .skip(1)
            // Field lines ("Name:   123 kB") until the next mapping's header.
            .take_while(|line| {
                line.split_whitespace()
                    .next()
                    .is_some_and(|key| key.ends_with(':'))
            })
            .find_map(|line| line.strip_prefix("Anonymous:"))
            .and_then(|kib| kib.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    }

    /// Drops this process's page-table entries for the whole mapping; the data
    /// stays in the memfd and is faulted back in on the next access.
    pub fn drop_page_tables(&self) -> Result<(), MemoryError> {
        // SAFETY: the range is exactly our mapping; for a shared memfd mapping
        // MADV_DONTNEED drops mappings only, never contents.
        unsafe { rustix::mm::madvise(self.base.as_ptr().cast(), self.len, Advice::LinuxDontNeed) }
            .map_err(sys("madvise(DONTNEED)"))
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `map`; nothing uses it
        // after drop (KVM memslots referencing it are torn down with the VM fd first).
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

fn map(fd: BorrowedFd<'_>, len: usize, flags: MapFlags) -> Result<NonNull<u8>, MemoryError> {
    // SAFETY: a fresh mapping at a kernel-chosen address of a file we own;
    // it overlaps nothing existing.
    let ptr = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            flags,
            fd,
            0,
        )
    }
    .map_err(sys("mmap guest memory"))?;
    Ok(NonNull::new(ptr.cast()).expect("mmap returned null"))
}

/// The memory file a capture fills. Pages go in with UFFDIO_COPY through a
/// shared mapping registered for missing pages, which puts each page into
/// the file only once its contents are complete. (A plain write is not
/// enough: the page cache shows a page being written, and a branch that
/// touched it at that moment would read zeros.) A page not filled yet stays
/// a hole, and branches restored before the copy ends fault on exactly
/// those.
///
/// The mapping may be another process's (`remote`): UFFDIO_COPY writes into
/// the address space of the process that registered the userfaultfd, and
/// the kernel charges the pages it allocates to that process's memory
/// cgroup. So the agent maps a capture's file and registers it, and the
/// sandbox's VMM fills it through the handed-over userfaultfd: the capture's
/// memory is charged to the agent, not to the sandbox's Pod.
///
/// A remote filler holds an exclusive `flock` on its descriptor of the file
/// for as long as it may fill; the owner waits for it (`wait_for_fillers`)
/// before unmapping, since a fill into a mapping that is gone fails the
/// capture and with it the branches still being filled. A lock rather than
/// a look at the capture's state: the filler still answers branches, and
/// zero-fills holes they ask for, after its state says complete, and a
/// capture deleted mid-copy has no state at all; and a filler that dies
/// drops its lock with it.
pub struct SnapshotMapping {
    base: NonNull<u8>,
    len: usize,
    uffd: Uffd,
    file: File,
    /// Whether `base` is a mapping of this process's (unmapped on drop).
    local: bool,
}

impl std::fmt::Debug for SnapshotMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotMapping")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

// SAFETY: the mapping is owned by this value and only written through
// UFFDIO_COPY; writers coordinate through the capture's page-state protocol.
unsafe impl Send for SnapshotMapping {}
// SAFETY: see `Send`.
unsafe impl Sync for SnapshotMapping {}

impl SnapshotMapping {
    /// Sizes `file` to `len` bytes (a sparse file: nothing is allocated
    /// until it is filled) and maps it for filling.
    pub fn create(file: File, len: u64) -> Result<Self, MemoryError> {
        rustix::fs::ftruncate(&file, len).map_err(sys("ftruncate snapshot"))?;
        let base = map(file.as_fd(), len as usize, MapFlags::SHARED)?;
        let unmap = |err| {
            // SAFETY: the mapping just created, used by nothing else.
            let _ = unsafe { rustix::mm::munmap(base.as_ptr().cast(), len as usize) };
            err
        };
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .create()
            .map_err(|err| unmap(uffd_err("create userfaultfd")(err)))?;
        uffd.register_with_mode(base.as_ptr().cast(), len as usize, RegisterMode::MISSING)
            .map_err(|err| unmap(uffd_err("register snapshot for filling")(err)))?;
        Ok(Self {
            base,
            len: len as usize,
            uffd,
            file,
            local: true,
        })
    }

    /// What another process needs to fill this mapping (see `remote`): the
    /// userfaultfd it is registered with, and its address here.
    pub fn remote_handle(&self) -> (BorrowedFd<'_>, u64) {
        (self.uffd.as_fd(), self.base.as_ptr() as u64)
    }

    /// Fills another process's mapping of `file` (`len` bytes at `base` in
    /// that process, registered for missing pages with `uffd`), as that
    /// process's `remote_handle` gives it. A wrong `base` or `len` fails the
    /// fills (the kernel checks the range is registered), it cannot touch
    /// this process's memory; if the other process exits, fills fail.
    pub fn remote(uffd: OwnedFd, base: u64, len: u64, file: File) -> Result<Self, MemoryError> {
        check_file_size(&file, len)?;
        // Held until this value is dropped (its descriptor closed).
        rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive)
            .map_err(sys("lock snapshot for filling"))?;
        let base = NonNull::new(base as *mut u8).ok_or(MemoryError::Sys {
            op: "remote snapshot mapping",
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        Ok(Self {
            base,
            len: len as usize,
            // SAFETY: the descriptor is ours (owned) and passes to the Uffd,
            // which closes it. Were it not a userfaultfd, its ioctls fail.
            uffd: unsafe { Uffd::from_raw_fd(uffd.into_raw_fd()) },
            file,
            local: false,
        })
    }

    /// Blocks until no other process fills this mapping: each remote filler
    /// holds its lock on the file until it is done with it, or exits.
    pub fn wait_for_fillers(&self) -> Result<(), MemoryError> {
        loop {
            match rustix::fs::flock(&self.file, FlockOperation::LockShared) {
                Err(rustix::io::Errno::INTR) => continue,
                result => return result.map_err(sys("wait for snapshot fillers")),
            }
        }
    }

    /// Fills the pages of `offset..offset + len` (page-aligned) from the
    /// same range of `source`, leaving any page already filled as it is:
    /// the first fill of a page wins, atomically. Returns how many pages
    /// this call filled.
    pub fn fill_from(
        &self,
        offset: usize,
        len: usize,
        source: &impl FillSource,
    ) -> Result<usize, MemoryError> {
        let from = source.source_range(offset, len)?;
        // SAFETY: `source_range` checked that `len` bytes from `from` lie
        // inside the source mapping, which `source` keeps alive.
        unsafe { self.write_from(offset, from, len) }
    }

    /// Fills the pages of `offset..offset + data.len()` (page-aligned) with
    /// `data`, as `fill_from` does.
    pub fn fill_from_slice(&self, offset: usize, data: &[u8]) -> Result<usize, MemoryError> {
        // SAFETY: `data` is a slice: `data.len()` readable bytes.
        unsafe { self.write_from(offset, data.as_ptr(), data.len()) }
    }

    /// # Safety
    /// `source` must be readable for `len` bytes.
    unsafe fn write_from(
        &self,
        offset: usize,
        source: *const u8,
        len: usize,
    ) -> Result<usize, MemoryError> {
        check_range(offset, len, self.len)?;
        assert!(
            offset.is_multiple_of(PAGE_SIZE) && len.is_multiple_of(PAGE_SIZE),
            "snapshot fill unaligned"
        );
        let mut done = 0;
        let mut filled = 0;
        while done < len {
            // SAFETY: the destination is inside our registered mapping; the
            // caller guarantees the source is readable.
            let copied = unsafe {
                self.uffd.copy(
                    source.add(done).cast(),
                    self.base.as_ptr().add(offset + done).cast(),
                    len - done,
                    false,
                )
            };
            match copied {
                Ok(bytes) | Err(userfaultfd::Error::PartiallyCopied(bytes)) => {
                    done += bytes;
                    filled += bytes / PAGE_SIZE;
                }
                // Filled already (by another thread): skip the page.
                Err(userfaultfd::Error::CopyFailed(errno)) if errno as i32 == libc::EEXIST => {
                    done += PAGE_SIZE;
                }
                Err(err) => return Err(uffd_err("fill snapshot")(err)),
            }
        }
        Ok(filled)
    }

    /// Fills the pages of `offset..offset + len` (page-aligned) that are
    /// not filled yet with zeros.
    pub fn zero_fill(&self, offset: usize, len: usize) -> Result<(), MemoryError> {
        assert!(
            offset.is_multiple_of(PAGE_SIZE)
                && len.is_multiple_of(PAGE_SIZE)
                && offset + len <= self.len,
            "snapshot fill out of bounds or unaligned"
        );
        for page_offset in (offset..offset + len).step_by(PAGE_SIZE) {
            // SAFETY: one page inside our registered mapping.
            let zeroed = unsafe {
                self.uffd
                    .zeropage(self.base.as_ptr().add(page_offset).cast(), PAGE_SIZE, false)
            };
            match zeroed {
                Ok(_) => {}
                Err(userfaultfd::Error::ZeropageFailed(errno)) if errno as i32 == libc::EEXIST => {}
                Err(err) => return Err(uffd_err("zero-fill snapshot")(err)),
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A read-only view of the file, for checking a finished capture.
    pub fn read_back(&self) -> Result<ReadOnlyMapping, MemoryError> {
        ReadOnlyMapping::of_fd(self.file.as_fd(), self.len)
    }
}

/// Fails unless `file` is exactly `len` bytes long.
fn check_file_size(file: &File, len: u64) -> Result<(), MemoryError> {
    let file_bytes = file
        .metadata()
        .map_err(|source| MemoryError::Sys {
            op: "stat memory file",
            source,
        })?
        .len();
    if file_bytes != len {
        return Err(MemoryError::FileSizeMismatch {
            file_bytes,
            expected_bytes: len,
        });
    }
    Ok(())
}

fn uffd_err(op: &'static str) -> impl FnOnce(userfaultfd::Error) -> MemoryError {
    move |source| MemoryError::Userfaultfd { op, source }
}

impl Drop for SnapshotMapping {
    fn drop(&mut self) {
        if !self.local {
            return;
        }
        // SAFETY: unmaps exactly the mapping created in `create`.
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// A read-only view of a whole file, for verifying or exporting captures.
pub struct ReadOnlyMapping {
    base: NonNull<u8>,
    len: usize,
}

impl ReadOnlyMapping {
    pub fn new(file: &File) -> Result<Self, MemoryError> {
        let len = file
            .metadata()
            .map_err(|source| MemoryError::Sys {
                op: "stat file",
                source,
            })?
            .len() as usize;
        Self::of_fd(file.as_fd(), len)
    }

    /// Maps the first `len` bytes of `fd` read-only.
    pub fn of_fd(fd: BorrowedFd<'_>, len: usize) -> Result<Self, MemoryError> {
        if len == 0 {
            return Ok(Self {
                base: NonNull::dangling(),
                len,
            });
        }
        // SAFETY: a fresh read-only mapping of a file we hold open.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ,
                MapFlags::SHARED,
                fd,
                0,
            )
        }
        .map_err(sys("mmap file"))?;
        Ok(Self {
            base: NonNull::new(ptr.cast()).expect("mmap returned null"),
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes and lives as long as `self`.
        // Capture files are not written once complete.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.len) }
    }
}

impl FillSource for ReadOnlyMapping {
    fn source_range(&self, offset: usize, len: usize) -> Result<*const u8, MemoryError> {
        check_range(offset, len, self.len)?;
        Ok(self.base.as_ptr().wrapping_add(offset).cast_const())
    }
}

// SAFETY: a read-only mapping owned by this value.
unsafe impl Send for ReadOnlyMapping {}
// SAFETY: see `Send`.
unsafe impl Sync for ReadOnlyMapping {}

impl Drop for ReadOnlyMapping {
    fn drop(&mut self) {
        if self.len != 0 {
            // SAFETY: unmaps exactly the mapping created in `new`.
            let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
        }
    }
}
