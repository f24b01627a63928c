//! `sandfork-agent bench`: capture and restore measured on this machine,
//! the live capture beside the stop-and-copy baseline in the same run.
//!
//! Each run captures a running `counter` guest live as the agent does: the
//! state is recorded at the pause and the copy runs in the background. A
//! branch is restored at once, while the copy runs, and timed until its
//! first guest instruction (the first store it makes); then a host thread
//! writes into guest memory at native speed to measure the stall of a write
//! that hits a protected page, and the finished capture is verified. The
//! run captures again live with the one-shot write-protect arm inside the
//! pause, and with stop-and-copy (the two baselines), verifying both, and
//! times a branch of the complete capture. Finally 16 branches of one
//! capture run briefly and the node's memory is compared before and after.
//!
//! Stages of a run: boot and first pass → live capture (early arm) and a
//! branch during the copy → native-rate write stalls → verify → one-shot
//! arm and stop-and-copy baselines → restore after the copy → 16 branches'
//! memory → the emulated guest's own store stalls. `sandfork-agent bench`
//! calls `run`; its JSON fields are read by other tooling: keep them.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use sandfork_vmm::capture::{self, Arm, CaptureProgress, LiveCapture};
use sandfork_vmm::guest::layout::vcpu_data_slice;
use sandfork_vmm::guest::{GuestImage, Workload, builtin, verify_counter};
use sandfork_vmm::memory::{
    GuestMemory, PAGE_SIZE, ReadOnlyMapping, SnapshotMapping, host_available_bytes,
};
use sandfork_vmm::snapshot::CaptureDir;
use sandfork_vmm::thread::RealtimeGuard;
use sandfork_vmm::vcpu::{HostKvm, VcpuState};
use sandfork_vmm::vm::Vm;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[arg(long, default_value_t = 1024)]
    pub memory_mib: u64,
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    #[arg(long, default_value_t = 1)]
    pub vcpus: usize,
    /// Print one JSON object on stdout (the summary goes to stderr either way).
    #[arg(long)]
    pub json: bool,
    /// Where snapshot files go during the run (a tmpfs).
    #[arg(long, default_value = "/dev/shm")]
    pub dir: std::path::PathBuf,
}

#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub memory_mib: u64,
    pub runs: usize,
    pub vcpus: usize,
    /// Live capture: how long the vCPUs were stopped.
    pub live_pause_us_p50: f64,
    /// Of that pause, stopping the vCPUs and saving their state.
    pub live_vcpus_stopped_us_p50: f64,
    /// The same pause as the guest saw it: from its vCPU's exit from
    /// `KVM_RUN` to its next entry (the longest over the vCPUs). The kick's
    /// way to the vCPU, while the guest still runs, is not in it; the
    /// vCPU's wake-up after the resume is.
    pub live_guest_pause_us_p50: f64,
    /// The one-shot baseline's pause as the guest saw it, and the ratio.
    pub oneshot_guest_pause_us_p50: f64,
    pub guest_pause_ratio_oneshot_over_live: f64,
    /// Of that pause, re-protecting the pages written since the early arm.
    pub live_arm_us_p50: f64,
    /// Pages re-protected in the pause.
    pub live_reprotected_pages_p50: f64,
    /// The early arm itself, while the guest runs.
    pub live_pre_arm_us_p50: f64,
    /// Baseline, same run: live capture arming all of memory in the pause.
    pub oneshot_arm_pause_us_p50: f64,
    pub pause_ratio_oneshot_over_live: f64,
    /// Baseline, same run: stop-and-copy pause.
    pub stop_copy_pause_us_p50: f64,
    pub pause_ratio_stop_copy_over_live: f64,
    /// Live capture's background copy: guest bytes per second until complete.
    pub copy_gbps_p50: f64,
    /// A native-rate host write that hit a protected page: how long it waited.
    pub write_stall_us_p50: f64,
    pub write_stall_us_p99: f64,
    pub write_stall_us_p999: f64,
    pub write_stall_us_max: f64,
    pub write_stall_samples: usize,
    /// Writes that stalled for more than 1 ms.
    pub write_stalls_over_1ms: usize,
    /// Controls for the stalls, same run and same conditions (guest
    /// running), with no capture involved. A stalled write waits for two
    /// thread wake-ups (the fault handler's, then its own), so a wake-up's
    /// lateness on this host bounds its maximum stall from below. Measured as
    /// cyclictest does: a real-time thread sleeps 200 us, as the writer
    /// does, and records how late it wakes.
    pub machine_wake_late_us_p50: f64,
    pub machine_wake_late_us_p99: f64,
    pub machine_wake_late_us_max: f64,
    pub machine_wakes_over_1ms: usize,
    pub machine_wake_samples: usize,
    /// A real-time thread that never blocks, reading the clock in a loop:
    /// the longest it went without the CPU (time the host under this
    /// virtual machine takes shows here).
    pub machine_gap_us_max: f64,
    /// The emulated guest's own stores, timed by the guest (rdtsc around
    /// each) in a separate `timed_writes` VM captured live `runs` times: per
    /// capture, its slowest stores while armed, as many as the write faults
    /// the handler served (each at its histogram bucket's upper bound, so
    /// up to 25% high). Emulation-bound: every guest instruction is
    /// emulated here.
    pub guest_write_stall_us_p50: f64,
    pub guest_write_stall_us_p99: f64,
    pub guest_write_stall_us_max: f64,
    pub guest_write_stall_samples: usize,
    /// The control, same VM and run: as many slowest stores, in windows as
    /// long as each capture, with no capture.
    pub guest_store_control_us_p99: f64,
    pub guest_store_control_us_max: f64,
    /// `write_stall_us_p50` under its first name.
    pub fault_stall_us_p50: f64,
    /// Pages the fault handler copied ahead of the copier, per capture.
    pub pages_copied_by_fault_handler_p50: f64,
    /// Live capture: from resume until the memory copy was complete.
    pub copy_ms_p50: f64,
    /// A branch requested right after the capture's pause, while the copy
    /// runs: from the request to the branch's first guest instruction (its
    /// first store).
    pub branch_first_instruction_ms_p50: f64,
    /// Pages the copy still had to do when that branch was requested.
    pub branch_pages_left_p50: f64,
    /// The same, from a capture whose copy had completed.
    pub restore_ms_p50: f64,
    /// What a branch that waits for the copy would take: copy plus restore.
    pub branch_after_copy_ms_p50: f64,
    /// 16 branches of one capture, run briefly: node memory they added
    /// (MemAvailable before and after: includes the kernel's per-VM memory,
    /// but is noisy on a shared host), and how much of it is pages they
    /// wrote (copy-on-write copies).
    pub branch16_extra_mib: f64,
    pub branch16_written_mib: f64,
    /// The same 16 branches, counted in this process only (its anonymous
    /// memory and page tables; not noisy, but blind to kernel memory).
    pub branch16_process_extra_mib: f64,
    /// True only if every capture of the run was verified consistent.
    pub consistent: bool,
    /// Guest code is emulated on this host (PVM): guest-side rates are emulation-bound.
    pub guest_emulated: bool,
}

fn median(values: &mut [f64]) -> f64 {
    percentile(values, 50.0)
}

fn percentile(values: &mut [f64], pct: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let rank = ((pct / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[rank.min(values.len() - 1)]
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    run_with(args, |_, _| Ok(serde_json::Value::Null))
}

/// Like `run`, adding to the JSON what `more` measures after the
/// in-process figures (its fields, beside theirs).
pub fn run_with(
    args: &BenchArgs,
    more: impl FnOnce(&BenchArgs, &BenchResult) -> anyhow::Result<serde_json::Value>,
) -> anyhow::Result<()> {
    let result = measure(args)?;
    eprintln!(
        "bench {} MiB x{} runs: live pause {:.0} us (re-protect {:.0} us, as the guest saw it {:.0} us) vs one-shot arm {:.0} us \
         ({:.1}x; as the guest saw it {:.0} us, {:.1}x) vs stop-and-copy {:.0} us ({:.1}x), copy {:.2} GB/s, write stall p50 {:.1} us \
         p99 {:.1} us max {:.1} us (control: a real-time thread's wake-up late p99 {:.1} us max {:.0} us), the emulated guest's stores p50 {:.0} us p99 {:.0} us max {:.0} us (control p99 {:.0} us max {:.0} us), branch {:.2} ms during the copy ({:.2} ms after it), 16 branches +{:.0} MiB ({:.0} MiB written, process +{:.0} MiB), \
         consistent: {}",
        result.memory_mib,
        result.runs,
        result.live_pause_us_p50,
        result.live_arm_us_p50,
        result.live_guest_pause_us_p50,
        result.oneshot_arm_pause_us_p50,
        result.pause_ratio_oneshot_over_live,
        result.oneshot_guest_pause_us_p50,
        result.guest_pause_ratio_oneshot_over_live,
        result.stop_copy_pause_us_p50,
        result.pause_ratio_stop_copy_over_live,
        result.copy_gbps_p50,
        result.write_stall_us_p50,
        result.write_stall_us_p99,
        result.write_stall_us_max,
        result.machine_wake_late_us_p99,
        result.machine_wake_late_us_max,
        result.guest_write_stall_us_p50,
        result.guest_write_stall_us_p99,
        result.guest_write_stall_us_max,
        result.guest_store_control_us_p99,
        result.guest_store_control_us_max,
        result.branch_first_instruction_ms_p50,
        result.restore_ms_p50,
        result.branch16_extra_mib,
        result.branch16_written_mib,
        result.branch16_process_extra_mib,
        result.consistent
    );
    let more = more(args, &result)?;
    if args.json {
        let mut out = serde_json::to_value(&result)?;
        if let (Some(out), serde_json::Value::Object(more)) = (out.as_object_mut(), more) {
            out.extend(more);
        }
        println!("{out}");
    }
    if !result.consistent {
        bail!("a capture was not consistent");
    }
    Ok(())
}

pub fn measure(args: &BenchArgs) -> anyhow::Result<BenchResult> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let memory_bytes = args.memory_mib << 20;
    let image = GuestImage::for_workload(&Workload::Counter, 0)?;
    let vm = Vm::boot("bench", memory_bytes, args.vcpus, &image)?;
    wait_first_pass(&vm)?;
    remove_stale_scratch(&args.dir);
    let scratch = tempfile::Builder::new()
        .prefix(&format!("{SCRATCH_PREFIX}{}-", std::process::id()))
        .tempdir_in(&args.dir)
        .with_context(|| {
            format!(
                "cannot create a scratch directory in {}",
                args.dir.display()
            )
        })?;

    let mut live_pause = Vec::new();
    let mut live_guest_pause = Vec::new();
    let mut oneshot_guest_pause = Vec::new();
    let mut live_arm = Vec::new();
    let mut live_stopped = Vec::new();
    let mut live_pre_arm = Vec::new();
    let mut reprotected = Vec::new();
    let mut oneshot_pause = Vec::new();
    let mut stop_pause = Vec::new();
    let mut copy_gbps = Vec::new();
    let mut stalls = Vec::new();
    let mut machine = MachineControl::default();
    let mut handler_pages = Vec::new();
    let mut restore_ms = Vec::new();
    let mut early_branch_ms = Vec::new();
    let mut remaining_at_branch = Vec::new();
    let mut copy_ms = Vec::new();
    let mut branch16 = None;
    let mut consistent = true;

    for run in 0..args.runs {
        // Live capture, as the agent runs it (the state recorded at the
        // pause, the copy in the background, branches served meanwhile).
        let live_dir = CaptureDir::new(scratch.path().join(format!("live-{run}")));
        let pauses_before = resumed_pauses(&vm);
        let running = live_dir.start_live(&vm, "bench", Arm::AheadOfPause)?;
        live_guest_pause.push(guest_seen_pause_us(&vm, pauses_before)?);
        // A branch started at once, before the copy completes.
        let paused = vm.pause(false)?;
        let early = time_restore(&live_dir, Some(&running.progress()));
        drop(paused);
        vm.resume();
        let (early, early_remaining) = early?;
        early_branch_ms.push(early.as_secs_f64() * 1e3);
        remaining_at_branch.push(early_remaining as f64);
        // Then a native-rate writer measuring stalls while the copy goes on.
        stalls.extend(measure_write_stalls(&vm, &running.progress()));
        machine.measure(MACHINE_CONTROL_WINDOW);
        let state = running.finish()?;
        let memory = ReadOnlyMapping::new(&live_dir.open_memory()?)?;
        consistent &= check_memory(memory.as_slice(), &state.vcpus, "live");
        let stats = &state.stats;
        live_pause.push(stats.pause_ns as f64 / 1e3);
        live_arm.push(stats.arm_ns as f64 / 1e3);
        live_stopped.push(stats.vcpus_stopped_ns as f64 / 1e3);
        live_pre_arm.push(stats.pre_arm_ns as f64 / 1e3);
        reprotected.push(stats.reprotected_pages as f64);
        copy_gbps.push(memory_bytes as f64 / stats.copy_ns as f64);
        copy_ms.push(stats.copy_ns as f64 / 1e6);
        handler_pages.push(stats.pages_copied_by_fault_handler as f64);

        // One-shot arm baseline.
        let oneshot_dir = CaptureDir::new(scratch.path().join(format!("oneshot-{run}")));
        let mapping = Arc::new(oneshot_dir.create(memory_bytes)?);
        let pauses_before = resumed_pauses(&vm);
        let captured = LiveCapture::start(&vm, mapping.clone(), Arm::InPause)?.finish()?;
        oneshot_guest_pause.push(guest_seen_pause_us(&vm, pauses_before)?);
        consistent &= check(&mapping, &captured.vcpus, "one-shot live");
        oneshot_pause.push(captured.stats.pause_ns as f64 / 1e3);
        drop(mapping);
        oneshot_dir.remove()?;

        // Stop-and-copy baseline.
        let stop_dir = CaptureDir::new(scratch.path().join(format!("stop-{run}")));
        let mapping = stop_dir.create(memory_bytes)?;
        let captured = capture::stop_and_copy(&vm, &mapping)?;
        consistent &= check(&mapping, &captured.vcpus, "stop-and-copy");
        stop_pause.push(captured.stats.pause_ns as f64 / 1e3);
        drop(mapping);
        stop_dir.remove()?;

        // Restore a branch from the live capture. The source is paused
        // meanwhile so that its busy vCPU does not compete with the
        // branch's for this machine's two cores.
        let paused = vm.pause(false)?;
        let restore = time_restore(&live_dir, None);
        drop(paused);
        vm.resume();
        restore_ms.push(restore?.0.as_secs_f64() * 1e3);
        eprintln!(
            "run {run}: live pause {:.0} us (vCPUs stopped {:.0} us), one-shot arm {:.0} us, \
             stop-and-copy {:.0} us, branch during the copy {:.2} ms ({:.0} pages left), \
             after it {:.2} ms (copy {:.0} ms)",
            live_pause[run],
            live_stopped[run],
            oneshot_pause[run],
            stop_pause[run],
            early_branch_ms[run],
            remaining_at_branch[run],
            restore_ms[run],
            copy_ms[run],
        );
        if run + 1 < args.runs {
            live_dir.remove()?;
        } else {
            let paused = vm.pause(false)?;
            let shared = measure_branch_memory(&live_dir, 16);
            drop(paused);
            vm.resume();
            branch16 = Some(shared?);
            live_dir.remove()?;
        }
    }
    let (branch16_extra_mib, branch16_written_mib, branch16_process_extra_mib) =
        branch16.unwrap_or_default();
    if let Some(failure) = vm.failure() {
        bail!("the benchmark guest failed: {failure}");
    }
    drop(vm);
    let mut guest_stalls = measure_guest_write_stalls(memory_bytes, args.runs, scratch.path())?;

    let live_pause_us_p50 = median(&mut live_pause);
    let live_guest_pause_us_p50 = median(&mut live_guest_pause);
    let oneshot_guest_pause_us_p50 = median(&mut oneshot_guest_pause);
    let stop_copy_pause_us_p50 = median(&mut stop_pause);
    let oneshot_arm_pause_us_p50 = median(&mut oneshot_pause);
    let restore_ms_p50 = median(&mut restore_ms);
    let copy_ms_p50 = median(&mut copy_ms);
    let write_stall_us_p50 = percentile(&mut stalls, 50.0);
    Ok(BenchResult {
        memory_mib: args.memory_mib,
        runs: args.runs,
        vcpus: args.vcpus,
        live_pause_us_p50,
        live_arm_us_p50: median(&mut live_arm),
        live_vcpus_stopped_us_p50: median(&mut live_stopped),
        live_guest_pause_us_p50,
        oneshot_guest_pause_us_p50,
        guest_pause_ratio_oneshot_over_live: oneshot_guest_pause_us_p50 / live_guest_pause_us_p50,
        live_reprotected_pages_p50: median(&mut reprotected),
        live_pre_arm_us_p50: median(&mut live_pre_arm),
        oneshot_arm_pause_us_p50,
        pause_ratio_oneshot_over_live: oneshot_arm_pause_us_p50 / live_pause_us_p50,
        stop_copy_pause_us_p50,
        pause_ratio_stop_copy_over_live: stop_copy_pause_us_p50 / live_pause_us_p50,
        copy_gbps_p50: median(&mut copy_gbps),
        write_stall_us_p50,
        write_stall_us_p99: percentile(&mut stalls, 99.0),
        write_stall_us_p999: percentile(&mut stalls, 99.9),
        write_stall_us_max: percentile(&mut stalls, 100.0),
        write_stall_samples: stalls.len(),
        guest_write_stall_us_p50: percentile(&mut guest_stalls.captured, 50.0),
        guest_write_stall_us_p99: percentile(&mut guest_stalls.captured, 99.0),
        guest_write_stall_us_max: percentile(&mut guest_stalls.captured, 100.0),
        guest_write_stall_samples: guest_stalls.captured.len(),
        guest_store_control_us_p99: percentile(&mut guest_stalls.control, 99.0),
        guest_store_control_us_max: percentile(&mut guest_stalls.control, 100.0),
        write_stalls_over_1ms: stalls.iter().filter(|&&stall| stall > 1000.0).count(),
        machine_wake_late_us_p50: percentile(&mut machine.wake_late_us, 50.0),
        machine_wake_late_us_p99: percentile(&mut machine.wake_late_us, 99.0),
        machine_wake_late_us_max: percentile(&mut machine.wake_late_us, 100.0),
        machine_wakes_over_1ms: machine
            .wake_late_us
            .iter()
            .filter(|&&late| late > 1000.0)
            .count(),
        machine_wake_samples: machine.wake_late_us.len(),
        machine_gap_us_max: machine.longest_gap.as_nanos() as f64 / 1e3,
        fault_stall_us_p50: write_stall_us_p50,
        pages_copied_by_fault_handler_p50: median(&mut handler_pages),
        copy_ms_p50,
        branch_first_instruction_ms_p50: median(&mut early_branch_ms),
        branch_pages_left_p50: median(&mut remaining_at_branch),
        restore_ms_p50,
        branch_after_copy_ms_p50: copy_ms_p50 + restore_ms_p50,
        branch16_extra_mib,
        branch16_written_mib,
        branch16_process_extra_mib,
        consistent,
        guest_emulated: true,
    })
}

/// Scratch directories are named `sandfork-bench-<pid>-<random>`.
const SCRATCH_PREFIX: &str = "sandfork-bench-";

/// Removes the scratch directories (captures of up to several GiB, in
/// memory on tmpfs) that benchmarks killed by a signal left in `dir`: those
/// whose process is gone.
fn remove_stale_scratch(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let owner = name
            .to_str()
            .and_then(|name| name.strip_prefix(SCRATCH_PREFIX))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok());
        let Some(pid) = owner else { continue };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => eprintln!(
                "removed {}, left by an interrupted benchmark",
                entry.path().display()
            ),
            Err(err) => eprintln!("cannot remove {}: {err}", entry.path().display()),
        }
    }
}

/// Pauses the vCPUs have come back from, all of them together.
fn resumed_pauses(vm: &Vm) -> u64 {
    vm.reports()
        .iter()
        .map(|report| report.pauses.load(Ordering::Acquire))
        .sum()
}

/// Waits until every vCPU is back from the pause after `before`; returns
/// the longest any was out of the guest for it, in microseconds.
fn guest_seen_pause_us(vm: &Vm, before: u64) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(1);
    while resumed_pauses(vm) < before + vm.vcpu_count() as u64 {
        if Instant::now() > deadline {
            bail!("the vCPUs did not resume within 1 s of the capture's pause");
        }
        std::thread::yield_now();
    }
    let longest = vm
        .reports()
        .iter()
        .map(|report| report.last_pause_ns.load(Ordering::Relaxed))
        .max()
        .unwrap_or_default();
    Ok(longest as f64 / 1e3)
}

fn wait_first_pass(vm: &Vm) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while vm
        .reports()
        .iter()
        .any(|report| report.count.load(Ordering::Relaxed) == 0)
    {
        if let Some(failure) = vm.failure() {
            bail!("the benchmark guest failed: {failure}");
        }
        if Instant::now() > deadline {
            bail!("the benchmark guest made no progress");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn check(mapping: &SnapshotMapping, vcpus: &[VcpuState], what: &str) -> bool {
    match mapping.read_back() {
        Ok(memory) => check_memory(memory.as_slice(), vcpus, what),
        Err(err) => {
            eprintln!("{what} capture unreadable: {err}");
            false
        }
    }
}

fn check_memory(memory: &[u8], vcpus: &[VcpuState], what: &str) -> bool {
    let regs: Vec<_> = vcpus.iter().map(|vcpu| vcpu.regs).collect();
    match verify_counter(memory, &regs) {
        Ok(_) => true,
        Err(mismatch) => {
            eprintln!("{what} capture inconsistent: {mismatch}");
            false
        }
    }
}

/// While the copy runs, writes from a host thread into pages not yet
/// copied (so still protected) and times each write, in microseconds. The
/// write stores zero into the page's second qword, which the counter guest
/// never writes, so the capture stays checkable.
fn measure_write_stalls(vm: &Vm, capture: &CaptureProgress) -> Vec<f64> {
    let memory: &GuestMemory = vm.memory();
    let pages = memory.pages();
    let stop = AtomicBool::new(false);
    let writes = AtomicU64::new(0);
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            // The writer stands for a running vCPU: keep this busy 2-core
            // host's scheduling out of what it measures.
            let _realtime = RealtimeGuard::new();
            let mut samples = Vec::new();
            // Walk from the top of memory down, against the copier's direction.
            let mut page = pages - 1;
            while !stop.load(Ordering::Relaxed) && page > 0 {
                if !capture.is_copied(page) {
                    let started = Instant::now();
                    // A qword the counter guest keeps at zero; in bounds.
                    let _ = memory.write_u64((page * PAGE_SIZE + 8) as u64, 0);
                    samples.push(started.elapsed().as_nanos() as f64 / 1e3);
                    writes.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(WRITER_SLEEP);
                }
                page -= 1;
            }
            samples
        });
        // The copier finishes on its own; stop the writer once it has.
        while (0..pages)
            .step_by(4096)
            .any(|page| !capture.is_copied(page))
            || !capture.is_copied(pages - 1)
        {
            std::thread::sleep(Duration::from_micros(500));
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap_or_default()
    })
}

/// How long each control runs per run: below the real-time throttle (950
/// ms of every second by default) for the spinning one.
const MACHINE_CONTROL_WINDOW: Duration = Duration::from_millis(500);
const WRITER_SLEEP: Duration = Duration::from_micros(200);

#[derive(Default)]
struct MachineControl {
    wake_late_us: Vec<f64>,
    longest_gap: Duration,
}

impl MachineControl {
    /// At real-time priority, as the writer and the fault handler run:
    /// sleeps as the writer does between writes for `window`, then spins on
    /// the clock for `window`.
    fn measure(&mut self, window: Duration) {
        let _realtime = RealtimeGuard::new();
        let started = Instant::now();
        while started.elapsed() < window {
            let before = Instant::now();
            std::thread::sleep(WRITER_SLEEP);
            let late = before.elapsed().saturating_sub(WRITER_SLEEP);
            self.wake_late_us.push(late.as_nanos() as f64 / 1e3);
        }
        let started = Instant::now();
        let mut last = started;
        while last - started < window {
            let now = Instant::now();
            self.longest_gap = self.longest_gap.max(now - last);
            last = now;
        }
    }
}

/// The stalls the emulated guest sees, timed by itself: boots a
/// `timed_writes` guest, captures it live `runs` times, and takes from the
/// guest's histogram of store durations, per capture, the slowest stores
/// made while it was armed, as many as its write faults. In microseconds.
fn measure_guest_write_stalls(
    memory_bytes: u64,
    runs: usize,
    scratch: &std::path::Path,
) -> anyhow::Result<GuestStalls> {
    let image = GuestImage {
        code: builtin::timed_writes_code().to_vec(),
        params: [0; 3],
    };
    let vm = Vm::boot("bench-timed", memory_bytes, 1, &image)?;
    wait_first_pass(&vm)?;
    let ticks_per_us = f64::from(HostKvm::get()?.tsc_khz()) / 1e3;
    let histogram = vcpu_data_slice(memory_bytes, 1, 0).start;
    let read_histogram = || -> Vec<u64> {
        (0..builtin::STORE_BUCKETS as u64)
            .map(|bucket| vm.memory().read_u64(histogram + 8 * bucket).unwrap_or(0))
            .collect()
    };
    // The slowest `count` stores between two readings, in microseconds.
    let slowest = |before: &[u64], after: &[u64], mut count: u64, into: &mut Vec<f64>| {
        for bucket in (0..builtin::STORE_BUCKETS).rev() {
            if count == 0 {
                break;
            }
            let stores = after[bucket].saturating_sub(before[bucket]).min(count);
            let (_, longest) = builtin::store_bucket_ticks(bucket);
            into.extend(std::iter::repeat_n(
                longest as f64 / ticks_per_us,
                stores as usize,
            ));
            count -= stores;
        }
    };
    let mut stalls = GuestStalls::default();
    for run in 0..runs {
        let dir = CaptureDir::new(scratch.join(format!("timed-{run}")));
        let before = read_histogram();
        let started = Instant::now();
        let state = dir
            .start_live(&vm, "bench-timed", Arm::AheadOfPause)?
            .finish()?;
        let window = started.elapsed();
        let after = read_histogram();
        dir.remove()?;
        let faults = state.stats.write_faults;
        slowest(&before, &after, faults, &mut stalls.captured);
        // The control: as long again, no capture, as many slowest stores.
        std::thread::sleep(window);
        slowest(&after, &read_histogram(), faults, &mut stalls.control);
    }
    if let Some(failure) = vm.failure() {
        bail!("the timed_writes guest failed: {failure}");
    }
    Ok(stalls)
}

/// The emulated guest's slowest stores, in microseconds: during captures,
/// and in windows as long with no capture.
#[derive(Default)]
struct GuestStalls {
    captured: Vec<f64>,
    control: Vec<f64>,
}

/// Restores a branch and waits for its first guest store: the counter guest
/// writes the page at its cursor (or the next one, or the slice's first page
/// after a wrap) within a few instructions of the captured instant. With
/// `copying`, the capture's copy is still running; also returns how many
/// pages it had left when the branch was requested.
fn time_restore(
    dir: &CaptureDir,
    copying: Option<&CaptureProgress>,
) -> anyhow::Result<(Duration, usize)> {
    let state = dir.read_state()?;
    let regs = &state.vcpus[0].regs;
    let slice = vcpu_data_slice(state.memory_bytes, state.vcpus.len(), 0);
    let watched: Vec<u64> = [regs.rdi, regs.rdi + PAGE_SIZE as u64, slice.start]
        .into_iter()
        .filter(|addr| slice.contains(addr))
        .collect();
    if let Some(progress) = copying {
        // Read the captured values only from pages already in the file: a
        // read of a hole would put a zero page there.
        for &addr in &watched {
            progress.ensure_copied(addr as usize / PAGE_SIZE, 1);
        }
    }
    let captured = ReadOnlyMapping::new(&std::fs::File::open(dir.memory_path())?)?;
    let read_captured = |addr: u64| {
        u64::from_le_bytes(
            captured.as_slice()[addr as usize..addr as usize + 8]
                .try_into()
                .unwrap(),
        )
    };
    let before: Vec<u64> = watched.iter().map(|&addr| read_captured(addr)).collect();
    let remaining = copying.map_or(0, CaptureProgress::remaining_pages);

    let started = Instant::now();
    let branch = dir.restore()?;
    let deadline = started + Duration::from_secs(5);
    loop {
        let stored = watched
            .iter()
            .zip(&before)
            .any(|(&addr, &value)| branch.memory().read_u64(addr).ok() != Some(value));
        if stored {
            return Ok((started.elapsed(), remaining));
        }
        if let Some(failure) = branch.failure() {
            bail!("the branch failed: {failure}");
        }
        if Instant::now() > deadline {
            bail!("the branch executed no store within 5 s of its restore");
        }
        std::thread::yield_now();
    }
}

/// Starts `count` branches of the capture in `dir`, lets them run briefly,
/// stops them and returns (node memory they added, memory they wrote,
/// memory this process gained), in MiB.
fn measure_branch_memory(dir: &CaptureDir, count: usize) -> anyhow::Result<(f64, f64, f64)> {
    let available = || host_available_bytes().context("no MemAvailable in /proc/meminfo");
    let before = available()?;
    let process_before = process_private_bytes();
    let branches = (0..count)
        .map(|_| dir.restore())
        .collect::<Result<Vec<_>, _>>()?;
    std::thread::sleep(Duration::from_millis(100));
    let paused = branches
        .iter()
        .map(|branch| branch.pause(false))
        .collect::<Result<Vec<_>, _>>()?;
    let after = available()?;
    let process_after = process_private_bytes();
    let written: u64 = branches
        .iter()
        .map(|branch| branch.memory().private_bytes())
        .sum();
    drop(paused);
    drop(branches);
    let mib = |bytes: f64| bytes / f64::from(1 << 20);
    Ok((
        mib(before as f64 - after as f64),
        mib(written as f64),
        mib(process_after as f64 - process_before as f64),
    ))
}

/// This process's anonymous memory and page tables (`RssAnon` plus `VmPTE`
/// of /proc/self/status), in bytes.
fn process_private_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .filter(|line| line.starts_with("RssAnon:") || line.starts_with("VmPTE:"))
        .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum::<u64>()
        * 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_scratch_of_gone_processes_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let gone_pid = gone.id();
        gone.wait().unwrap();
        let own = format!("{SCRATCH_PREFIX}{}-abc", std::process::id());
        let left = format!("{SCRATCH_PREFIX}{gone_pid}-def");
        for name in [
            own.as_str(),
            left.as_str(),
            "sandfork-bench-old",
            "unrelated",
        ] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join("memory"), b"x").unwrap();
        }

        remove_stale_scratch(dir.path());

        let mut remaining: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        remaining.sort();
        let mut expected = vec![
            own,
            "sandfork-bench-old".to_string(),
            "unrelated".to_string(),
        ];
        expected.sort();
        assert_eq!(remaining, expected);
    }
}
