//! Live capture, restore and snapshot files against real KVM and userfaultfd.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sandfork_vmm::capture::{self, Arm, CaptureMode};
use sandfork_vmm::guest::{CounterState, DirtyPattern, GuestImage, Workload, verify_counter};
use sandfork_vmm::memory::{ReadOnlyMapping, SnapshotMapping};
use sandfork_vmm::snapshot::{CaptureDir, FormatError, SnapshotError, SnapshotState};
use sandfork_vmm::vm::Vm;

fn boot(workload: &Workload, memory_mib: u64, vcpus: usize) -> Vm {
    let image = GuestImage::for_workload(workload, 1_000_000).unwrap();
    Vm::boot("test", memory_mib << 20, vcpus, &image).unwrap()
}

/// Boots the counter guest and waits until every vCPU finished a pass, so
/// that all of memory is being rewritten.
fn boot_counter(memory_mib: u64, vcpus: usize) -> Vm {
    let vm = boot(&Workload::Counter, memory_mib, vcpus);
    wait_reports(&vm, 1);
    vm
}

fn report_count(vm: &Vm, vcpu: usize) -> u64 {
    vm.reports()[vcpu].count.load(Ordering::Relaxed)
}

fn wait_reports(vm: &Vm, at_least: u64) {
    assert!(
        common::wait_until(Duration::from_secs(120), || (0..vm.vcpu_count())
            .all(|vcpu| report_count(vm, vcpu) >= at_least)),
        "guest made no progress: {:?}",
        vm.failure()
    );
}

fn scratch_snapshot(bytes: u64) -> (tempfile::TempDir, Arc<SnapshotMapping>) {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.path().join("memory"))
        .unwrap();
    (dir, Arc::new(SnapshotMapping::create(file, bytes).unwrap()))
}

fn snapshot_bytes(snapshot: &SnapshotMapping) -> ReadOnlyMapping {
    snapshot.read_back().unwrap()
}

/// Pauses `vm` and checks that its own live memory is consistent with its
/// registers, i.e. that it is still a healthy counter guest.
fn verify_live(vm: &Vm) -> CounterState {
    vm.inspect_paused(|paused, memory| {
        let regs: Vec<_> = paused.vcpus.iter().map(|state| state.regs).collect();
        verify_counter(memory, &regs)
    })
    .unwrap()
    .unwrap()
}

fn live_capture_is_consistent(memory_mib: u64, vcpus: usize) {
    let vm = boot_counter(memory_mib, vcpus);
    let (_dir, snapshot) = scratch_snapshot(memory_mib << 20);
    let captured = capture::live(&vm, snapshot.clone()).unwrap();
    eprintln!("{memory_mib} MiB x{vcpus}: {:?}", captured.stats);
    let regs: Vec<_> = captured.vcpus.iter().map(|state| state.regs).collect();
    verify_counter(snapshot_bytes(&snapshot).as_slice(), &regs).unwrap();
    assert!(
        captured.stats.write_faults > 0,
        "the guest never hit a protected page, so the test proved nothing"
    );
    assert_eq!(
        captured.stats.pages_copied_by_copier
            + captured.stats.pages_copied_by_fault_handler
            + captured.stats.zero_pages,
        (memory_mib << 20) / 4096
    );
    // The source keeps running, consistent with itself.
    let before = report_count(&vm, 0);
    wait_reports(&vm, before + 1);
    verify_live(&vm);
}

#[test]
fn live_capture_256mib_is_consistent() {
    if common::devices_present() {
        live_capture_is_consistent(256, 1);
    }
}

#[test]
fn live_capture_1gib_is_consistent() {
    if common::devices_present() {
        live_capture_is_consistent(1024, 1);
    }
}

/// Above 4 GiB guest memory spans the LAPIC's page, which is not RAM.
#[test]
fn live_capture_above_4gib_is_consistent() {
    if common::devices_present() {
        live_capture_is_consistent(4200, 2);
    }
}

#[test]
fn live_capture_pauses_every_vcpu() {
    if common::devices_present() {
        live_capture_is_consistent(256, 3);
    }
}

#[test]
fn stop_and_copy_capture_is_consistent() {
    if !common::devices_present() {
        return;
    }
    let vm = boot_counter(256, 1);
    let (_dir, snapshot) = scratch_snapshot(256 << 20);
    let pauses = &vm.reports()[0].pauses;
    let pauses_before = pauses.load(Ordering::Acquire);
    let captured = capture::stop_and_copy(&vm, &snapshot).unwrap();
    let regs: Vec<_> = captured.vcpus.iter().map(|state| state.regs).collect();
    verify_counter(snapshot_bytes(&snapshot).as_slice(), &regs).unwrap();
    // The vCPU itself times how long it stayed out of the guest: the whole
    // copy must lie inside that, or the guest ran during the copy.
    assert!(common::wait_until(Duration::from_secs(10), || pauses
        .load(Ordering::Acquire)
        > pauses_before));
    let guest_pause_ns = vm.reports()[0].last_pause_ns.load(Ordering::Relaxed);
    assert!(
        guest_pause_ns >= captured.stats.copy_ns && captured.stats.copy_ns > 0,
        "the vCPU was out of the guest {guest_pause_ns} ns, the copy took {} ns",
        captured.stats.copy_ns
    );
}

/// The control: the same copy without write protection is torn, so the
/// consistency check above can fail.
#[test]
fn copy_without_write_protection_is_torn() {
    if !common::devices_present() {
        return;
    }
    let vm = boot_counter(256, 1);
    let (_dir, snapshot) = scratch_snapshot(256 << 20);
    let captured = capture::unprotected_copy(&vm, &snapshot).unwrap();
    let regs: Vec<_> = captured.vcpus.iter().map(|state| state.regs).collect();
    let mismatch = verify_counter(snapshot_bytes(&snapshot).as_slice(), &regs)
        .expect_err("a copy taken while the guest runs must be torn");
    eprintln!("{mismatch}");
    assert!(mismatch.mismatched_pages > 1);
}

/// Checks a finished counter capture's memory file against its registers.
fn verify_capture_file(dir: &CaptureDir, state: &SnapshotState) {
    let memory = ReadOnlyMapping::new(&std::fs::File::open(dir.memory_path()).unwrap()).unwrap();
    let regs: Vec<_> = state.vcpus.iter().map(|vcpu| vcpu.regs).collect();
    verify_counter(memory.as_slice(), &regs).unwrap();
}

fn capture_dir(root: &tempfile::TempDir, name: &str) -> CaptureDir {
    CaptureDir::new(root.path().join(name))
}

#[test]
fn branches_continue_from_the_captured_instant_and_diverge() {
    if !common::devices_present() {
        return;
    }
    let source = boot_counter(256, 2);
    let root = tempfile::tempdir_in("/dev/shm").unwrap();
    let dir = capture_dir(&root, "capture");
    let state = dir
        .capture_from(&source, CaptureMode::Live, "source")
        .unwrap();
    let captured_passes: Vec<u64> = state.vcpus.iter().map(|vcpu| vcpu.regs.rbx).collect();
    verify_capture_file(&dir, &state);
    let memory_file = std::fs::File::open(dir.memory_path()).unwrap();

    let branch_a = dir.restore().unwrap();
    let branch_b = dir.restore().unwrap();
    for branch in [&branch_a, &branch_b] {
        wait_reports(branch, 1);
        // The first pass a branch finishes is the one in progress at the capture.
        for (vcpu, &pass) in captured_passes.iter().enumerate() {
            let first = branch.reports()[vcpu].last.load(Ordering::Relaxed);
            assert!(
                report_count(branch, vcpu) > 1 || first == pass,
                "vCPU {vcpu} of a branch reported pass {first} first, captured pass {pass}"
            );
        }
        let live = verify_live(branch);
        for (vcpu, progress) in live.vcpus.iter().enumerate() {
            assert!(progress.pass >= captured_passes[vcpu]);
        }
    }

    // Independent: a write into branch A is seen neither by B nor by the capture,
    // and stopping A does not stop B.
    let paused_a = branch_a.pause(false).unwrap();
    let marker_addr = (256u64 << 20) - 4096 + 64;
    branch_a.memory().write_u64(marker_addr, 0xfeed).unwrap();
    assert_eq!(branch_a.memory().read_u64(marker_addr).unwrap(), 0xfeed);
    assert_eq!(branch_b.memory().read_u64(marker_addr).unwrap(), 0);
    assert_eq!(
        ReadOnlyMapping::new(&memory_file).unwrap().as_slice()[marker_addr as usize],
        0
    );
    let b_before = report_count(&branch_b, 0);
    let a_before = report_count(&branch_a, 0);
    wait_reports(&branch_b, b_before + 2);
    assert_eq!(report_count(&branch_a, 0), a_before);
    drop(paused_a);
    branch_a.resume();

    // The source is unaffected by its branches.
    verify_live(&source);
    assert_eq!(source.memory().read_u64(marker_addr).unwrap(), 0);
}

#[test]
fn a_branch_started_before_the_copy_completes_sees_the_captured_memory() {
    if !common::devices_present() {
        return;
    }
    let source = boot_counter(512, 2);
    let root = tempfile::tempdir_in("/dev/shm").unwrap();
    let dir = capture_dir(&root, "early");
    let running = dir
        .start_live(&source, "source", Arm::AheadOfPause)
        .unwrap();
    let captured_passes: Vec<u64> = running
        .state()
        .vcpus
        .iter()
        .map(|vcpu| vcpu.regs.rbx)
        .collect();
    let remaining = running.progress().remaining_pages();
    let branch = dir.restore().unwrap();
    assert!(
        remaining > 0 && !dir.read_state().unwrap().memory_complete,
        "the copy completed before the branch started"
    );
    eprintln!(
        "branch restored with {remaining} of {} pages still to copy",
        running.progress().pages()
    );
    // Read all of the branch's memory while the copy goes on: pages not
    // copied yet are fetched from the capture, and the whole is consistent
    // with the branch's registers.
    verify_live(&branch);
    let state = running.finish().unwrap();
    assert!(state.memory_complete && dir.read_state().unwrap().memory_complete);
    verify_capture_file(&dir, &state);

    // The branch continued from the captured pass and keeps running.
    wait_reports(&branch, 1);
    for (vcpu, &pass) in captured_passes.iter().enumerate() {
        let first = branch.reports()[vcpu].last.load(Ordering::Relaxed);
        assert!(report_count(&branch, vcpu) > 1 || first == pass);
    }
    let live = verify_live(&branch);
    for (vcpu, progress) in live.vcpus.iter().enumerate() {
        assert!(progress.pass >= captured_passes[vcpu]);
    }
    verify_live(&source);
    // A branch of a branch that started early waits for its memory first.
    let second = capture_dir(&root, "second");
    second
        .capture_from(&branch, CaptureMode::Live, "branch")
        .unwrap();
}

/// A branch handed a fill connection just before the copy completed (as a
/// branch Pod's VMM is, by the agent): the capture says "complete" and
/// closes before the branch asks for its first pages. The branch goes on
/// from the whole file, with no way to ask the capture's record (as in a
/// Pod), instead of taking the closed connection for a lost capture.
#[test]
fn a_branch_connected_as_the_copy_completes_goes_on() {
    if !common::devices_present() {
        return;
    }
    let source = boot_counter(64, 1);
    let root = tempfile::tempdir_in("/dev/shm").unwrap();
    let dir = capture_dir(&root, "closing");
    let running = dir
        .start_live(&source, "source", Arm::AheadOfPause)
        .unwrap();
    let (state, fill) = dir.parts_for_restore().unwrap();
    let fill = fill.expect("the copy still runs: a fill connection");
    running.finish().unwrap();
    let no_record: sandfork_vmm::fill::CompleteCheck = Box::new(|| false);
    let branch = sandfork_vmm::snapshot::restore(
        dir.open_memory().unwrap(),
        Some((fill, no_record)),
        &state,
        dir.path(),
    )
    .unwrap();
    wait_reports(&branch, 2);
    assert_eq!(branch.failure(), None);
    verify_live(&branch);
}

/// Bytes of `file` backed by memory (tmpfs allocates on first write).
fn allocated_bytes(file: &std::fs::File) -> u64 {
    use std::os::unix::fs::MetadataExt;
    file.metadata().unwrap().blocks() * 512
}

#[test]
fn pages_never_written_are_neither_copied_nor_allocated() {
    if !common::devices_present() {
        return;
    }
    let memory_bytes = 512u64 << 20;
    let root = tempfile::tempdir_in("/dev/shm").unwrap();
    let source = boot(&Workload::Idle, 512, 1);
    let source_memfd = || {
        std::fs::File::from(
            source
                .memory()
                .memfd()
                .unwrap()
                .try_clone_to_owned()
                .unwrap(),
        )
    };
    let before = allocated_bytes(&source_memfd());
    for mode in [CaptureMode::Live, CaptureMode::StopAndCopy] {
        let dir = capture_dir(&root, &format!("{mode:?}").to_lowercase());
        let state = dir.capture_from(&source, mode, "idle").unwrap();
        let memory_file = std::fs::File::open(dir.memory_path()).unwrap();
        eprintln!(
            "{mode:?}: {:?}, file {} KiB, source {} KiB",
            state.stats,
            allocated_bytes(&memory_file) >> 10,
            allocated_bytes(&source_memfd()) >> 10
        );
        // The idle guest wrote its page tables and code, nothing else.
        assert!(state.stats.zero_pages > (memory_bytes / 4096) * 9 / 10);
        assert!(allocated_bytes(&memory_file) < memory_bytes / 10);
        assert_eq!(
            allocated_bytes(&source_memfd()),
            before,
            "the copy allocated the source"
        );
        assert!(dir.restore().unwrap().failure().is_none());
    }

    // A counter guest captured in its first pass: memory past its cursor
    // is still holes. A branch started before the copy completes reads
    // them (fetched as zeros) and is consistent throughout.
    let counter = boot(&Workload::Counter, 512, 1);
    std::thread::sleep(Duration::from_millis(20));
    let dir = capture_dir(&root, "first-pass");
    let running = dir
        .start_live(&counter, "counter", Arm::AheadOfPause)
        .unwrap();
    let branch = dir.restore().unwrap();
    verify_live(&branch);
    let state = running.finish().unwrap();
    eprintln!("first pass: {:?}", state.stats);
    assert!(
        state.stats.zero_pages > 0,
        "the guest finished its first pass too soon"
    );
    assert_eq!(state.vcpus[0].regs.rbx, 1, "captured after the first pass");
    verify_capture_file(&dir, &state);
    verify_live(&counter);
}

#[test]
fn a_branch_can_be_branched() {
    if !common::devices_present() {
        return;
    }
    let source = boot_counter(128, 1);
    let root = tempfile::tempdir_in("/dev/shm").unwrap();
    let first = capture_dir(&root, "first");
    first
        .capture_from(&source, CaptureMode::Live, "source")
        .unwrap();
    let branch = first.restore().unwrap();
    wait_reports(&branch, 2);
    let second = capture_dir(&root, "second");
    let state = second
        .capture_from(&branch, CaptureMode::Live, "branch")
        .unwrap();
    verify_capture_file(&second, &state);
    let grandchild = second.restore().unwrap();
    wait_reports(&grandchild, 1);
    verify_live(&grandchild);
    verify_live(&branch);
}

#[test]
fn other_workloads_capture_and_restore() {
    if !common::devices_present() {
        return;
    }
    let root = tempfile::tempdir_in("/dev/shm").unwrap();
    for (name, workload) in [
        (
            "dirty",
            Workload::Dirty {
                pattern: DirtyPattern::Random,
                pages_per_second: 0,
            },
        ),
        ("idle", Workload::Idle),
    ] {
        let vm = boot(&workload, 64, 2);
        std::thread::sleep(Duration::from_millis(200));
        let dir = capture_dir(&root, name);
        let state = dir.capture_from(&vm, CaptureMode::Live, name).unwrap();
        assert_eq!(state.vcpus.len(), 2);
        let branch = dir.restore().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(branch.failure(), None, "{name} branch failed");
        assert_eq!(vm.failure(), None, "{name} source failed");
    }
}

#[test]
fn snapshot_files_round_trip_and_reject_damage() {
    if !common::devices_present() {
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let vm = boot_counter(64, 1);
    let root = tempfile::tempdir_in("/dev/shm").unwrap();
    let dir = capture_dir(&root, "original");
    let state = dir.capture_from(&vm, CaptureMode::Live, "vm").unwrap();
    for file in [dir.memory_path(), dir.path().join("state.json")] {
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is readable by others", file.display());
    }
    // Exporting reads the capture's holes as zeros without allocating them.
    let allocated = || std::fs::metadata(dir.memory_path()).unwrap().blocks() * 512;
    let allocated_before = allocated();
    assert!(
        allocated_before < state.memory_bytes,
        "the capture has no holes ({allocated_before} bytes allocated)"
    );
    let exported = root.path().join("snapshot.sfk");
    dir.export(&exported).unwrap();
    assert_eq!(allocated(), allocated_before, "export allocated holes");
    let mode = std::fs::metadata(&exported).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let imported = capture_dir(&root, "imported");
    imported.import(&exported).unwrap();
    let original_memory = std::fs::read(dir.memory_path()).unwrap();
    assert_eq!(
        std::fs::read(imported.memory_path()).unwrap(),
        original_memory
    );
    let branch = imported.restore().unwrap();
    wait_reports(&branch, 1);
    assert_eq!(
        branch.reports()[0].last.load(Ordering::Relaxed),
        state.vcpus[0].regs.rbx
    );

    let bytes = std::fs::read(&exported).unwrap();
    let damaged = |name: &str, contents: Vec<u8>| {
        let path = root.path().join(name);
        std::fs::write(&path, contents).unwrap();
        let target = capture_dir(&root, &format!("from-{name}"));
        let err = target.import(&path).expect_err(name);
        assert!(
            !target.path().exists(),
            "{name}: a partial capture was left"
        );
        err
    };
    let format_error = |err: SnapshotError| match err {
        SnapshotError::Format { source, .. } => source,
        other => panic!("not a format error: {other}"),
    };
    let err = format_error(damaged("truncated", bytes[..bytes.len() - 4096].to_vec()));
    assert!(matches!(err, FormatError::ShortFile { .. }), "{err}");
    let mut flipped = bytes.clone();
    let last = flipped.len() - 100;
    flipped[last] ^= 0x40;
    let err = format_error(damaged("flipped", flipped));
    let last_chunk = (state.memory_bytes - 1) / sandfork_vmm::snapshot::CHUNK_BYTES;
    assert!(
        matches!(err, FormatError::ChunkChecksum { index } if index == last_chunk),
        "{err}"
    );
    let mut magic = bytes.clone();
    magic[0] = b'X';
    let err = format_error(damaged("magic", magic));
    assert!(matches!(err, FormatError::BadMagic), "{err}");
    let mut version = bytes.clone();
    version[8] = 9;
    let err = format_error(damaged("version", version));
    assert!(
        matches!(err, FormatError::UnsupportedVersion { found: 9 }),
        "{err}"
    );
    let err = format_error(damaged("empty", Vec::new()));
    assert!(
        matches!(err, FormatError::Truncated { part: "header", .. }),
        "{err}"
    );
}
