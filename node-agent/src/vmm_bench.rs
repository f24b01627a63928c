//! The second half of `sandfork-agent bench`: capture and restore the way a
//! sandbox Pod runs them, against the same steps in this process.
//!
//! Each VMM is a process of its own, started empty as a Pod's container
//! is, with its socket in a directory laid out as the kubelet lays out a
//! Pod's volume; this process is the agent (its manager): it hands the
//! source's VMM the capture to fill through its own mapping and userfaultfd,
//! and a branch's VMM its capture as descriptors. The control is the same
//! sequence on a VM in this process, in turns with it: a live capture, its
//! copy, and a branch restored once the copy is complete with its source
//! held still (as the in-process `restore_ms` is measured). Whichever side
//! is not being measured is held still too, so the two never compete for
//! the machine's cores.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rustix::process::{Pid, Signal};
use serde_json::json;

use sandfork_bench::{BenchArgs, BenchResult};
use sandfork_vmm::capture::{Arm, CaptureMode};
use sandfork_vmm::guest::{GuestImage, Workload};
use sandfork_vmm::snapshot::CaptureDir;
use sandfork_vmm::vm::Vm;

use crate::manager::{Manager, SandboxSpec};

const SOURCE: &str = "bench-source";
const FIRST_PASS_TIMEOUT: Duration = Duration::from_secs(600);
const COPY_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a finished capture's teardown is given before its source is
/// stopped (see `pod_run`).
const TEARDOWN_SETTLE: Duration = Duration::from_secs(1);

/// VMM processes standing in for Pods' containers; killed when dropped.
struct PodVmms {
    pods: PathBuf,
    children: Vec<Child>,
}

impl PodVmms {
    /// Starts the VMM of "Pod" `uid`; returns its process.
    fn start(&mut self, uid: &str) -> anyhow::Result<Pid> {
        let dir = self
            .pods
            .join(uid)
            .join("volumes/kubernetes.io~empty-dir")
            .join(sandfork_api::pod::VMM_VOLUME);
        std::fs::create_dir_all(&dir)?;
        let exe = std::env::current_exe()?;
        let child = Command::new(exe)
            .args(["vm-host", "--dir"])
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting a VMM process")?;
        let pid = Pid::from_child(&child);
        self.children.push(child);
        Ok(pid)
    }
}

impl Drop for PodVmms {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A process held still (SIGSTOP) until dropped, as `Vm::pause` holds a
/// VM in this process.
struct Stopped(Pid);

impl Stopped {
    fn new(pid: Pid) -> anyhow::Result<Self> {
        rustix::process::kill_process(pid, Signal::STOP).context("stopping a VMM process")?;
        Ok(Self(pid))
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process(self.0, Signal::CONT);
    }
}

fn pod_uid(index: usize) -> String {
    format!("00000000-0000-4000-8000-{index:012}")
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or_default()
}

fn ratio(value: f64, baseline: f64) -> f64 {
    if baseline > 0.0 {
        (value / baseline * 100.0).round() / 100.0
    } else {
        0.0
    }
}

fn ms(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64() * 1e3
}

/// What one side measures, a sample per run.
#[derive(Default)]
struct Samples {
    pause_us: Vec<f64>,
    copy_ms: Vec<f64>,
    restore_ms: Vec<f64>,
    /// The agent's whole capture call (VMM processes only).
    capture_call_ms: Vec<f64>,
}

/// `runs` live captures of a `counter` guest of `memory_mib` MiB in a VMM
/// process, each followed by a branch restored in another, in turns with
/// the same in this process; the figures with their ratios, and the
/// ratios over `in_process`'s (whose copy runs beside its probes).
pub fn measure(args: &BenchArgs, in_process: &BenchResult) -> anyhow::Result<serde_json::Value> {
    let state = tempfile::Builder::new()
        .prefix("sandfork-bench-vmm-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("a state directory in {}", args.dir.display()))?;
    let pods = state.path().join("pods");
    let manager = Manager::open(state.path().join("state"))?.with_pods_dir(&pods);
    let mut vmms = PodVmms {
        pods,
        children: Vec::new(),
    };
    let measured = run(&manager, &mut vmms, args, state.path());
    for sandbox in manager.list().unwrap_or_default() {
        let _ = manager.delete(&sandbox.name);
    }
    for capture in manager.list_captures().unwrap_or_default() {
        let _ = manager.delete_capture(&capture.name);
    }
    drop(vmms);
    let (mut pod, mut control) = measured?;
    let pause = median(&mut pod.pause_us);
    let copy = median(&mut pod.copy_ms);
    let restore = median(&mut pod.restore_ms);
    let control_pause = median(&mut control.pause_us);
    let control_copy = median(&mut control.copy_ms);
    let control_restore = median(&mut control.restore_ms);
    let figures = json!({
        "vmm_process_pause_us_p50": pause,
        "vmm_process_capture_call_ms_p50": median(&mut pod.capture_call_ms),
        "vmm_process_copy_ms_p50": copy,
        "vmm_process_restore_call_ms_p50": restore,
        "vmm_control_pause_us_p50": control_pause,
        "vmm_control_copy_ms_p50": control_copy,
        "vmm_control_restore_ms_p50": control_restore,
        "vmm_process_over_control_pause_ratio": ratio(pause, control_pause),
        "vmm_process_over_control_copy_ratio": ratio(copy, control_copy),
        "vmm_process_over_control_restore_ratio": ratio(restore, control_restore),
        "vmm_process_over_in_process_pause_ratio": ratio(pause, in_process.live_pause_us_p50),
        "vmm_process_over_in_process_copy_ratio": ratio(copy, in_process.copy_ms_p50),
        "vmm_process_over_in_process_restore_ratio": ratio(restore, in_process.restore_ms_p50),
    });
    eprintln!(
        "bench, VMM processes as in sandbox Pods, and the control in this process: {figures}"
    );
    Ok(figures)
}

fn run(
    manager: &Manager,
    vmms: &mut PodVmms,
    args: &BenchArgs,
    scratch: &Path,
) -> anyhow::Result<(Samples, Samples)> {
    let vcpus = u8::try_from(args.vcpus).context("--vcpus")?;
    let source_pod = pod_uid(0);
    let source_pid = vmms.start(&source_pod)?;
    let spec = SandboxSpec {
        name: SOURCE.into(),
        memory_mib: args.memory_mib,
        vcpus,
        workload: Workload::Counter,
    };
    manager.run_on(&spec, Some(&source_pod))?;
    let tsc_khz = sandfork_vmm::vcpu::HostKvm::get()?.tsc_khz();
    let image = GuestImage::for_workload(&Workload::Counter, tsc_khz)?;
    let control_vm = Vm::boot("bench-control", args.memory_mib << 20, vcpus.into(), &image)?;
    // Each source's first pass has written every page.
    wait(FIRST_PASS_TIMEOUT, "the sources' first passes", || {
        let written = |counts: &[u64]| counts.first().copied().unwrap_or(0) >= 1;
        let control: Vec<u64> = control_vm
            .reports()
            .iter()
            .map(|report| report.count.load(std::sync::atomic::Ordering::Relaxed))
            .collect();
        Ok(written(&manager.status(SOURCE)?.report_counts) && written(&control))
    })?;
    let mut pod = Samples::default();
    let mut control = Samples::default();
    for run in 0..args.runs {
        {
            let _still = Stopped::new(source_pid)?;
            control_run(&control_vm, scratch, run, &mut control)?;
        }
        let paused = control_vm.pause(false)?;
        let measured = pod_run(manager, vmms, source_pid, run, &mut pod);
        drop(paused);
        control_vm.resume();
        measured?;
    }
    if let Some(failure) = control_vm.failure() {
        bail!("the control guest failed: {failure}");
    }
    Ok((pod, control))
}

/// A live capture of `vm` in this process, its copy, and a branch of it
/// restored with `vm` held still.
fn control_run(vm: &Vm, scratch: &Path, run: usize, out: &mut Samples) -> anyhow::Result<()> {
    let dir = CaptureDir::new(scratch.join(format!("control-{run}")));
    let state = dir
        .start_live(vm, "bench-control", Arm::AheadOfPause)?
        .finish()?;
    out.pause_us.push(state.stats.pause_ns as f64 / 1e3);
    out.copy_ms.push(state.stats.copy_ns as f64 / 1e6);
    let paused = vm.pause(false)?;
    let started = Instant::now();
    let branch = dir.restore();
    let elapsed = started.elapsed();
    drop(paused);
    vm.resume();
    drop(branch?);
    out.restore_ms.push(ms(elapsed));
    dir.remove()?;
    Ok(())
}

/// The same through the VMM processes: the agent's capture call, the copy,
/// and its restore call into a waiting VMM with the source held still.
fn pod_run(
    manager: &Manager,
    vmms: &mut PodVmms,
    source_pid: Pid,
    run: usize,
    out: &mut Samples,
) -> anyhow::Result<()> {
    let capture = format!("bench-capture-{run}");
    let branch = format!("bench-branch-{run}");
    let branch_pod = pod_uid(run + 1);
    vmms.start(&branch_pod)?;
    let started = Instant::now();
    let info = manager.capture(SOURCE, &capture, CaptureMode::Live, false, false)?;
    out.capture_call_ms.push(ms(started.elapsed()));
    out.pause_us.push(info.stats.pause_ns as f64 / 1e3);
    let mut copy_ns = 0;
    wait(COPY_TIMEOUT, "the capture's copy", || {
        let found = manager
            .list_captures()?
            .into_iter()
            .find(|c| c.name == capture);
        match found {
            Some(c) if c.memory_complete => {
                copy_ns = c.stats.copy_ns;
                Ok(true)
            }
            Some(_) => Ok(false),
            None => bail!("capture {capture} went away mid-copy"),
        }
    })?;
    out.copy_ms.push(copy_ns as f64 / 1e6);
    // The capture's teardown (lifting its write protection and unmapping
    // its view of 1 GiB: ~0.2 s here) runs on in the source after the copy
    // is complete; stopping the process now would leave it for the next
    // capture to wait behind.
    std::thread::sleep(TEARDOWN_SETTLE);
    let restored = {
        let _still = Stopped::new(source_pid)?;
        let started = Instant::now();
        manager
            .branch_on(&branch, &capture, Some(&branch_pod))
            .map(|_| started.elapsed())
    };
    out.restore_ms.push(ms(restored?));
    manager.delete(&branch)?;
    manager.delete_capture(&capture)?;
    Ok(())
}

fn wait(
    timeout: Duration,
    what: &str,
    mut done: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !done()? {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
