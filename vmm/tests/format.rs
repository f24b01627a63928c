//! Golden tests of the snapshot format: the saved state's encoding and the
//! header's bytes. A change to either changes what older agents and files
//! read, so it must come with a new `FORMAT_VERSION` (and a new golden
//! file, `state-v<version>.json`, written by running this test with
//! `SANDFORK_BLESS=1`).

use sandfork_vmm::capture::{CaptureMode, CaptureStats};
use sandfork_vmm::snapshot::{FORMAT_VERSION, Header, SnapshotState};
use sandfork_vmm::vcpu::{VcpuState, VmState};

/// A state with a distinct value in every field the format carries, so
/// that renaming, dropping or re-encoding any of them shows.
fn golden_state() -> SnapshotState {
    let mut vcpu = VcpuState {
        id: 1,
        cpuid: vec![kvm_bindings::kvm_cpuid_entry2 {
            function: 1,
            index: 2,
            flags: 3,
            eax: 4,
            ebx: 5,
            ecx: 6,
            edx: 7,
            ..Default::default()
        }],
        mp_state: kvm_bindings::kvm_mp_state { mp_state: 8 },
        regs: kvm_bindings::kvm_regs {
            rip: 0x10_0000,
            rsp: 0x8_0000,
            rbx: 9,
            rflags: 2,
            ..Default::default()
        },
        sregs: kvm_bindings::kvm_sregs {
            cr3: 0x2000,
            efer: 0x500,
            ..Default::default()
        },
        xsave: vec![0; 1024],
        xcrs: Default::default(),
        debug_regs: Default::default(),
        lapic: Default::default(),
        msrs: vec![kvm_bindings::kvm_msr_entry {
            index: 0x10,
            data: 11,
            ..Default::default()
        }],
        events: Default::default(),
    };
    vcpu.xsave[0] = 0x37f;
    vcpu.xcrs.nr_xcrs = 1;
    vcpu.lapic.regs[0x20] = 12;
    SnapshotState {
        memory_bytes: 64 << 20,
        vcpus: vec![vcpu],
        vm: VmState {
            irqchips: vec![kvm_bindings::kvm_irqchip {
                chip_id: 2,
                ..Default::default()
            }],
            clock: kvm_bindings::kvm_clock_data {
                clock: 13,
                ..Default::default()
            },
        },
        stats: CaptureStats {
            mode: CaptureMode::Live,
            pause_ns: 14,
            vcpus_stopped_ns: 15,
            arm_ns: 16,
            pre_arm_ns: 17,
            reprotected_pages: 18,
            copy_ns: 19,
            bytes: 64 << 20,
            zero_pages: 20,
            pages_copied_by_fault_handler: 21,
            pages_copied_by_copier: 22,
            write_faults: 23,
        },
        source: "golden".into(),
        created_unix_ms: 24,
        memory_complete: true,
    }
}

fn golden_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("state-v{FORMAT_VERSION}.json"))
}

#[test]
fn the_state_encoding_is_the_versioned_one() {
    let encoded = golden_state().encode().unwrap();
    let path = golden_path();
    if std::env::var("SANDFORK_BLESS").is_ok_and(|value| value == "1") {
        std::fs::write(&path, &encoded).unwrap();
    }
    let golden = std::fs::read(&path).unwrap_or_else(|err| {
        panic!(
            "{}: {err}; a new FORMAT_VERSION needs its golden file (SANDFORK_BLESS=1)",
            path.display()
        )
    });
    assert!(
        encoded == golden,
        "the saved state's encoding changed: bump FORMAT_VERSION (snapshot/format.rs) \
         and write state-v<new>.json with SANDFORK_BLESS=1\nnow:    {}\ngolden: {}",
        String::from_utf8_lossy(&encoded),
        String::from_utf8_lossy(&golden)
    );
    // And what was written with this version still reads back the same.
    let decoded = SnapshotState::decode(&golden).unwrap();
    assert_eq!(decoded.encode().unwrap(), golden);
}

#[test]
fn the_header_bytes_are_the_versioned_ones() {
    let header = Header::for_state(b"{\"x\":1}", 64 << 20).encode();
    let expected: [u8; 64] = [
        b'S', b'A', b'N', b'D', b'F', b'O', b'R', b'K', // magic
        1, 0, 0, 0, // format version
        64, 0, 0, 0, // header length
        7, 0, 0, 0, 0, 0, 0, 0, // state length
        0, 0, 0, 0, // state CRC32 (compared below)
        0, 0, 0x40, 0, // chunk size: 4 MiB
        0, 0, 0, 4, 0, 0, 0, 0, // memory: 64 MiB
        16, 0, 0, 0, 0, 0, 0, 0, // chunks
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // reserved
        0, 0, 0, 0, // header CRC32 (compared below)
    ];
    assert_eq!(
        FORMAT_VERSION, 1,
        "a new version needs new expected bytes here"
    );
    let state_crc = crc32fast::hash(b"{\"x\":1}").to_le_bytes();
    assert_eq!(header[24..28], state_crc);
    assert_eq!(header[..24], expected[..24]);
    assert_eq!(header[28..60], expected[28..60]);
    assert_eq!(
        header[60..],
        crc32fast::hash(&header[..60]).to_le_bytes(),
        "header CRC"
    );
}
