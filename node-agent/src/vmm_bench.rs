//! The second half of `sandfork-agent bench`: capture and restore the way a
//! sandbox Pod runs them, beside the in-process figures of `sandfork_bench`.
//! Each VMM is a process of its own, started empty as a Pod's container
//! is, with its socket in a directory laid out as the kubelet lays out a
//! Pod's volume; this process is the agent (its manager): it hands the
//! source's VMM the capture to fill through its own mapping and userfaultfd,
//! and a branch's VMM its capture as descriptors.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

use sandfork_bench::{BenchArgs, BenchResult};
use sandfork_vmm::capture::CaptureMode;
use sandfork_vmm::guest::Workload;

use crate::manager::{Manager, SandboxSpec};

const SOURCE: &str = "bench-source";
const FIRST_PASS_TIMEOUT: Duration = Duration::from_secs(600);
const COPY_TIMEOUT: Duration = Duration::from_secs(600);

/// VMM processes standing in for Pods' containers; killed when dropped.
struct PodVmms {
    pods: PathBuf,
    children: Vec<Child>,
}

impl PodVmms {
    /// Starts the VMM of "Pod" `uid`.
    fn start(&mut self, uid: &str) -> anyhow::Result<()> {
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
        self.children.push(child);
        Ok(())
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

/// `runs` live captures of a `counter` guest of `memory_mib` MiB in a VMM
/// process, each with a branch restored at once in another; the figures
/// beside `in_process`'s, with their ratios.
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
    let measured = run(&manager, &mut vmms, args);
    for sandbox in manager.list().unwrap_or_default() {
        let _ = manager.delete(&sandbox.name);
    }
    for capture in manager.list_captures().unwrap_or_default() {
        let _ = manager.delete_capture(&capture.name);
    }
    drop(vmms);
    let (mut capture_call_ms, mut pause_us, mut copy_ms, mut restore_call_ms) = measured?;
    let pause = median(&mut pause_us);
    let copy = median(&mut copy_ms);
    let restore = median(&mut restore_call_ms);
    let figures = json!({
        "vmm_process_pause_us_p50": pause,
        "vmm_process_capture_call_ms_p50": median(&mut capture_call_ms),
        "vmm_process_copy_ms_p50": copy,
        "vmm_process_restore_call_ms_p50": restore,
        "vmm_process_over_in_process_pause_ratio": ratio(pause, in_process.live_pause_us_p50),
        "vmm_process_over_in_process_copy_ratio": ratio(copy, in_process.copy_ms_p50),
        "vmm_process_over_in_process_restore_ratio": ratio(restore, in_process.restore_ms_p50),
    });
    eprintln!("bench, VMM processes as in sandbox Pods: {figures}");
    Ok(figures)
}

type Samples = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);

fn run(manager: &Manager, vmms: &mut PodVmms, args: &BenchArgs) -> anyhow::Result<Samples> {
    let source_pod = pod_uid(0);
    vmms.start(&source_pod)?;
    let spec = SandboxSpec {
        name: SOURCE.into(),
        memory_mib: args.memory_mib,
        vcpus: u8::try_from(args.vcpus).context("--vcpus")?,
        workload: Workload::Counter,
    };
    manager.run_on(&spec, Some(&source_pod))?;
    // Its first pass has written every page.
    wait(FIRST_PASS_TIMEOUT, "the source's first pass", || {
        Ok(manager
            .status(SOURCE)?
            .report_counts
            .first()
            .copied()
            .unwrap_or(0)
            >= 1)
    })?;
    let mut samples: Samples = Default::default();
    for run in 0..args.runs {
        let capture = format!("bench-capture-{run}");
        let branch = format!("bench-branch-{run}");
        let branch_pod = pod_uid(run + 1);
        vmms.start(&branch_pod)?;
        let started = Instant::now();
        let info = manager.capture(SOURCE, &capture, CaptureMode::Live, false, false)?;
        samples.0.push(started.elapsed().as_secs_f64() * 1e3);
        samples.1.push(info.stats.pause_ns as f64 / 1e3);
        let started = Instant::now();
        manager.branch_on(&branch, &capture, Some(&branch_pod))?;
        samples.3.push(started.elapsed().as_secs_f64() * 1e3);
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
        samples.2.push(copy_ns as f64 / 1e6);
        manager.delete(&branch)?;
        manager.delete_capture(&capture)?;
    }
    Ok(samples)
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
