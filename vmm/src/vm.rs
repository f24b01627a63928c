//! A sandbox VM: KVM VM, guest memory and one thread per vCPU, with a pause
//! that stops every vCPU, optionally saves its state, and resumes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_cpuid_entry2, kvm_run, kvm_userspace_memory_region};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::fill::Filler;
use crate::guest::GuestImage;
use crate::guest::layout::{CONSOLE_PORT, REPORT_PORT};
use crate::memory::{self, GuestMemory, MemoryError};
use crate::thread::{RealtimeGuard, set_current_realtime};
use crate::vcpu::{self, HostKvm, VcpuError, VcpuState, VmState, kvm_op};

pub const MAX_VCPUS: u8 = 64;
const CONSOLE_LIMIT: usize = 64 << 10;
const KICK_SIGNAL_OFFSET: i32 = 0;
const TSS_ADDRESS: usize = 0xfffb_d000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("a sandbox needs 1 to {MAX_VCPUS} vCPUs, got {0}")]
    InvalidVcpuCount(usize),
    #[error("the VM has stopped: {0}")]
    Stopped(String),
    #[error("cannot start a vCPU thread")]
    SpawnThread(#[source] std::io::Error),
    #[error("cannot install the vCPU kick signal handler")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
}

/// Checks a VM's vCPU count against `MAX_VCPUS`.
pub fn check_vcpu_count(count: usize) -> Result<(), VmError> {
    if count == 0 || count > usize::from(MAX_VCPUS) {
        return Err(VmError::InvalidVcpuCount(count));
    }
    Ok(())
}

/// Progress a guest reported through `REPORT_PORT`, and the pauses its
/// vCPU came back from.
#[derive(Debug, Default)]
pub struct VcpuReports {
    pub last: AtomicU64,
    pub count: AtomicU64,
    /// Pauses this vCPU has resumed from.
    pub pauses: AtomicU64,
    /// The last of them as the guest saw it: from `KVM_RUN` returning to
    /// its next entry, so the vCPU's own exit and wake-up count, the time
    /// the kick takes to reach it (the guest still runs) does not.
    pub last_pause_ns: AtomicU64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Command {
    Run,
    Pause,
    Stop,
}

struct ControlState {
    command: Command,
    /// Bumped by each pause so that a vCPU parks once per pause.
    pause_generation: u64,
    save_on_pause: bool,
    parked: usize,
    saved: Vec<Option<Result<VcpuState, VcpuError>>>,
    exited: usize,
    failure: Option<String>,
}

struct Control {
    state: Mutex<ControlState>,
    changed: Condvar,
    reports: Vec<VcpuReports>,
    console: Mutex<Vec<u8>>,
    /// Whether console output also goes to stdout, line by line.
    echo: std::sync::atomic::AtomicBool,
    /// The line being echoed.
    echo_line: Mutex<Vec<u8>>,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The `kvm_run` area of a vCPU, written by the pausing thread to request
/// an immediate exit.
#[derive(Clone, Copy)]
struct KvmRunArea(*mut kvm_run);
// SAFETY: only `immediate_exit`, a byte KVM reads at each KVM_RUN entry, is
// written through this pointer from other threads, with volatile stores.
unsafe impl Send for KvmRunArea {}
// SAFETY: as for `Send`: shared access only ever does volatile byte stores
// of `immediate_exit`.
unsafe impl Sync for KvmRunArea {}

struct VcpuThread {
    /// The thread hands its `VcpuFd` back when it ends, so the `kvm_run`
    /// area stays mapped until the thread is joined.
    handle: Option<JoinHandle<VcpuFd>>,
    run_area: KvmRunArea,
}

/// A running sandbox VM.
pub struct Vm {
    vm_fd: VmFd,
    /// For a branch restored before its capture's copy completed: what
    /// serves its first touches of pages not yet copied. Dropped before
    /// the memory it serves (see `Drop`).
    filler: Option<Filler>,
    memory: Arc<GuestMemory>,
    vcpus: Vec<VcpuThread>,
    control: Arc<Control>,
}

/// The state saved at a pause, and how long the vCPUs were stopped so far.
pub struct Paused {
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    started: Instant,
    /// From the pause request until every vCPU stopped and saved its state.
    pub vcpus_stopped_ns: u64,
}

impl Paused {
    pub fn started(&self) -> Instant {
        self.started
    }
}

extern "C" fn on_kick_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> Result<(), VmError> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = register_signal_handler(SIGRTMIN() + KICK_SIGNAL_OFFSET, on_kick_signal)
            .map_err(VmError::SignalHandler);
    });
    result
}

fn new_vm_fd(memory: &GuestMemory) -> Result<VmFd, VmError> {
    let host = HostKvm::get()?;
    let vm_fd = host.kvm.create_vm().map_err(kvm_op("KVM_CREATE_VM"))?;
    vm_fd
        .set_tss_address(TSS_ADDRESS)
        .map_err(kvm_op("KVM_SET_TSS_ADDR"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: memory.len() as u64,
        userspace_addr: memory.host_base(),
        flags: 0,
    };
    // SAFETY: the region is exactly the guest memory mapping, which the `Vm`
    // keeps alive (through `Arc<GuestMemory>`) until after the VM fd is closed.
    unsafe { vm_fd.set_user_memory_region(region) }
        .map_err(kvm_op("KVM_SET_USER_MEMORY_REGION"))?;
    // After the memslot: with an in-kernel irqchip present, a memslot update
    // waits several milliseconds (measured 4-7 ms here) instead of ~0.5 ms.
    vm_fd
        .create_irq_chip()
        .map_err(kvm_op("KVM_CREATE_IRQCHIP"))?;
    Ok(vm_fd)
}

impl Vm {
    /// Boots `image` in a new VM with `memory_bytes` of fresh memory.
    pub fn boot(
        name: &str,
        memory_bytes: u64,
        vcpu_count: usize,
        image: &GuestImage,
    ) -> Result<Self, VmError> {
        check_vcpu_count(vcpu_count)?;
        memory::validate_size(memory_bytes, true)?;
        let memory = GuestMemory::new_memfd(name, memory_bytes)?;
        image.load(&memory)?;
        let vm_fd = new_vm_fd(&memory)?;
        let host = HostKvm::get()?;
        let mut vcpus = Vec::with_capacity(vcpu_count);
        for index in 0..vcpu_count {
            let cpuid = host.cpuid_for(index as u8);
            let vcpu = vcpu::create_vcpu(&vm_fd, &cpuid, index as u8)?;
            vcpu::enter_long_mode(&vcpu, &image.entry_regs(memory_bytes, vcpu_count, index))?;
            vcpus.push((vcpu, cpuid));
        }
        Self::start(vm_fd, memory, None, vcpus)
    }

    /// Creates a VM on `memory` (normally a private mapping of a capture)
    /// and restores the saved VM and vCPU state into it. `filler`, for a
    /// capture still copying, serves the memory's pages not in the file
    /// yet; the VM keeps it until it is dropped.
    pub fn restore(
        memory: GuestMemory,
        filler: Option<Filler>,
        vm_state: &VmState,
        vcpu_states: &[VcpuState],
    ) -> Result<Self, VmError> {
        check_vcpu_count(vcpu_states.len())?;
        let vm_fd = new_vm_fd(&memory)?;
        vm_state.restore(&vm_fd)?;
        let mut vcpus = Vec::with_capacity(vcpu_states.len());
        for state in vcpu_states {
            let vcpu = vcpu::create_vcpu(&vm_fd, &state.cpuid, state.id)?;
            state.restore(&vcpu)?;
            vcpus.push((vcpu, state.cpuid.clone()));
        }
        Self::start(vm_fd, memory, filler, vcpus)
    }

    fn start(
        vm_fd: VmFd,
        memory: GuestMemory,
        filler: Option<Filler>,
        vcpus: Vec<(VcpuFd, Vec<kvm_cpuid_entry2>)>,
    ) -> Result<Self, VmError> {
        install_kick_handler()?;
        let control = Arc::new(Control {
            state: Mutex::new(ControlState {
                command: Command::Run,
                pause_generation: 0,
                save_on_pause: false,
                parked: 0,
                saved: Vec::new(),
                exited: 0,
                failure: None,
            }),
            changed: Condvar::new(),
            reports: (0..vcpus.len()).map(|_| VcpuReports::default()).collect(),
            console: Mutex::new(Vec::new()),
            echo: std::sync::atomic::AtomicBool::new(false),
            echo_line: Mutex::new(Vec::new()),
        });
        let mut vm = Self {
            vm_fd,
            filler,
            memory: Arc::new(memory),
            vcpus: Vec::with_capacity(vcpus.len()),
            control,
        };
        for (index, (mut vcpu, cpuid)) in vcpus.into_iter().enumerate() {
            let run_area = KvmRunArea(vcpu.get_kvm_run());
            let control = vm.control.clone();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || run_vcpu(vcpu, index, cpuid, control))
                .map_err(VmError::SpawnThread)?;
            vm.vcpus.push(VcpuThread {
                handle: Some(handle),
                run_area,
            });
        }
        Ok(vm)
    }

    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// Waits until every page of the capture this VM was restored from is
    /// in its file; returns at once for complete captures and booted VMs.
    pub fn wait_filled(&self) {
        if let Some(filler) = &self.filler {
            filler.wait_done();
        }
    }

    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    pub fn reports(&self) -> &[VcpuReports] {
        &self.control.reports
    }

    /// Also writes what the guest writes to its serial console to stdout,
    /// line by line (`guest: ` before each): a sandbox Pod's log.
    pub fn echo_console(&self, on: bool) {
        self.control.echo.store(on, Ordering::Relaxed);
    }

    /// What the guest wrote to its serial console so far (the last 64 KiB).
    pub fn console(&self) -> Vec<u8> {
        self.control.console.lock().unwrap().clone()
    }

    /// Why the VM stopped running, if it did (a vCPU failed).
    pub fn failure(&self) -> Option<String> {
        self.control.lock().failure.clone()
    }

    fn kick_all(&self) {
        for vcpu in &self.vcpus {
            let Some(handle) = &vcpu.handle else { continue };
            // SAFETY: the kvm_run area belongs to the VcpuFd, which lives in
            // the vCPU thread and then in its join handle: it stays mapped
            // until the handle is joined, and this handle is not.
            unsafe { std::ptr::write_volatile(&raw mut (*vcpu.run_area.0).immediate_exit, 1) };
            {
                // ESRCH only means the thread is already gone.
                let _ = handle.kill(SIGRTMIN() + KICK_SIGNAL_OFFSET);
            }
        }
    }

    /// Stops every vCPU; with `save`, also saves the complete vCPU and VM
    /// state. The vCPUs stay stopped until `resume`.
    pub fn pause(&self, save: bool) -> Result<Paused, VmError> {
        let started = Instant::now();
        let count = self.vcpus.len();
        {
            let mut state = self.control.lock();
            if let Some(failure) = &state.failure {
                return Err(VmError::Stopped(failure.clone()));
            }
            state.command = Command::Pause;
            state.pause_generation += 1;
            state.save_on_pause = save;
            state.parked = 0;
            state.saved = (0..count).map(|_| None).collect();
        }
        // vCPU threads stay normal threads: one boosted while it still runs
        // guest code can starve the kernel work it needs to leave KVM_RUN.
        self.kick_all();
        let mut state = {
            let _boost = RealtimeGuard::new();
            let mut state = self.control.lock();
            while state.parked + state.exited < count {
                state = self.control.changed.wait(state).unwrap();
            }
            state
        };
        if let Some(failure) = state.failure.clone() {
            state.command = Command::Run;
            self.control.changed.notify_all();
            return Err(VmError::Stopped(failure));
        }
        let saved = std::mem::take(&mut state.saved);
        drop(state);
        let vcpus_stopped_ns = started.elapsed().as_nanos() as u64;
        let result = (|| {
            let vcpus = if save {
                saved
                    .into_iter()
                    .map(|slot| slot.expect("every parked vCPU saved its state"))
                    .collect::<Result<Vec<_>, _>>()?
            } else {
                Vec::new()
            };
            let vm = if save {
                VmState::save(&self.vm_fd)?
            } else {
                VmState {
                    irqchips: Vec::new(),
                    clock: Default::default(),
                }
            };
            Ok(Paused {
                vcpus,
                vm,
                started,
                vcpus_stopped_ns,
            })
        })();
        if result.is_err() {
            self.resume();
        }
        result
    }

    /// Pauses the VM, saving its state, and hands `inspect` that state and
    /// guest memory as it is while the vCPUs are stopped; then resumes.
    /// (For checking a guest: reading a page never written allocates it.)
    pub fn inspect_paused<R>(
        &self,
        inspect: impl FnOnce(&Paused, &[u8]) -> R,
    ) -> Result<R, VmError> {
        let paused = self.pause(true)?;
        // SAFETY: the vCPUs stay parked until `resume` below, after the call.
        let result = unsafe {
            self.memory
                .read_quiescent(|memory| inspect(&paused, memory))
        };
        self.resume();
        Ok(result)
    }

    /// Lets the vCPUs run again after `pause`.
    pub fn resume(&self) {
        let mut state = self.control.lock();
        if state.command == Command::Pause {
            state.command = Command::Run;
        }
        drop(state);
        self.control.changed.notify_all();
    }

    /// Stops the vCPU threads and waits for them.
    pub fn stop(&mut self) {
        self.control.lock().command = Command::Stop;
        self.control.changed.notify_all();
        self.kick_all();
        for vcpu in &mut self.vcpus {
            if let Some(handle) = vcpu.handle.take() {
                let _ = handle.join();
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
        // The filler works on the memory mapping: stop it before the
        // mapping can go away.
        drop(self.filler.take());
    }
}

fn run_vcpu(
    mut vcpu: VcpuFd,
    index: usize,
    cpuid: Vec<kvm_cpuid_entry2>,
    control: Arc<Control>,
) -> VcpuFd {
    set_current_realtime(false);
    let mut parked_generation = 0;
    let mut left_guest = Instant::now();
    let failure = loop {
        {
            let mut state = control.lock();
            if state.command == Command::Pause && state.pause_generation != parked_generation {
                parked_generation = state.pause_generation;
                if state.save_on_pause {
                    drop(state);
                    let saved = VcpuState::save(&vcpu, index as u8, &cpuid);
                    state = control.lock();
                    state.saved[index] = Some(saved);
                }
                state.parked += 1;
                control.changed.notify_all();
                while state.command == Command::Pause && state.pause_generation == parked_generation
                {
                    state = control.changed.wait(state).unwrap();
                }
                let reports = &control.reports[index];
                reports
                    .last_pause_ns
                    .store(left_guest.elapsed().as_nanos() as u64, Ordering::Relaxed);
                reports.pauses.fetch_add(1, Ordering::Release);
            }
            if state.command == Command::Stop {
                break None;
            }
        }
        let exit = vcpu.run();
        left_guest = Instant::now();
        match exit {
            Ok(VcpuExit::IoOut(port, data)) => handle_io_out(&control, index, port, data),
            Ok(VcpuExit::IoIn(_, data)) => data.fill(0xff),
            Ok(VcpuExit::MmioRead(_, data)) => data.fill(0),
            Ok(VcpuExit::MmioWrite(..) | VcpuExit::Intr | VcpuExit::IrqWindowOpen) => {}
            // Without an interrupt source a halt outside the in-kernel LAPIC
            // lasts until the next command.
            Ok(VcpuExit::Hlt) => {
                let state = control.lock();
                let _ = control
                    .changed
                    .wait_timeout(state, Duration::from_millis(100))
                    .unwrap();
            }
            Ok(exit) => break Some(format!("vCPU {index} stopped on {exit:?}")),
            Err(err) if err.errno() == libc::EINTR => vcpu.set_kvm_immediate_exit(0),
            Err(err) if err.errno() == libc::EAGAIN => {}
            Err(err) => break Some(format!("vCPU {index}: KVM_RUN failed: {err}")),
        }
    };
    let mut state = control.lock();
    if let Some(failure) = failure {
        tracing::warn!(vcpu = index, %failure, "vCPU stopped");
        state.failure.get_or_insert(failure);
    }
    state.exited += 1;
    control.changed.notify_all();
    drop(state);
    vcpu
}

/// Longest console line echoed whole; a longer one is cut there.
const ECHO_LINE_LIMIT: usize = 4096;

fn echo_console(control: &Control, data: &[u8]) {
    use std::io::Write;
    let mut line = control.echo_line.lock().unwrap();
    for &byte in data {
        if byte != b'\n' {
            line.push(byte);
        }
        if byte == b'\n' || line.len() >= ECHO_LINE_LIMIT {
            let text = String::from_utf8_lossy(&line).into_owned();
            let _ = writeln!(std::io::stdout().lock(), "guest: {text}");
            line.clear();
        }
    }
}

fn handle_io_out(control: &Control, index: usize, port: u16, data: &[u8]) {
    match port {
        REPORT_PORT => {
            let mut value = [0u8; 8];
            let len = data.len().min(8);
            value[..len].copy_from_slice(&data[..len]);
            let reports = &control.reports[index];
            reports
                .last
                .store(u64::from_le_bytes(value), Ordering::Relaxed);
            reports.count.fetch_add(1, Ordering::Relaxed);
        }
        CONSOLE_PORT => {
            let mut console = control.console.lock().unwrap();
            let excess = (console.len() + data.len()).saturating_sub(CONSOLE_LIMIT);
            let len = console.len();
            console.drain(..excess.min(len));
            console.extend_from_slice(data);
            drop(console);
            if control.echo.load(Ordering::Relaxed) {
                echo_console(control, data);
            }
        }
        _ => {}
    }
}
