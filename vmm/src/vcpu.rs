//! vCPU set-up and complete vCPU / VM state save and restore.

use std::sync::OnceLock;

use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE, Msrs, kvm_clock_data, kvm_cpuid_entry2,
    kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::guest::layout;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("{op} failed")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted only {set} of {total} MSRs (first refused: {index:#x})")]
    MsrsRefused {
        set: usize,
        total: usize,
        index: u32,
    },
    #[error("{count} {what} entries, more than KVM takes ({max})")]
    TooManyEntries {
        what: &'static str,
        count: usize,
        max: usize,
    },
}

/// Most CPUID entries a vCPU takes (`KVM_MAX_CPUID_ENTRIES`).
pub const MAX_CPUID_ENTRIES: usize = KVM_MAX_CPUID_ENTRIES;
/// Most MSRs one call takes (`KVM_MAX_MSR_ENTRIES`).
pub const MAX_MSR_ENTRIES: usize = kvm_bindings::KVM_MAX_MSR_ENTRIES;
/// u32 words in the legacy 4 KiB XSAVE area.
pub const XSAVE_WORDS: usize = 1024;

fn msr_list(entries: &[kvm_msr_entry]) -> Result<Msrs, VcpuError> {
    Msrs::from_entries(entries).map_err(|_| VcpuError::TooManyEntries {
        what: "MSR",
        count: entries.len(),
        max: MAX_MSR_ENTRIES,
    })
}

fn cpuid_list(entries: &[kvm_cpuid_entry2]) -> Result<CpuId, VcpuError> {
    CpuId::from_entries(entries).map_err(|_| VcpuError::TooManyEntries {
        what: "CPUID",
        count: entries.len(),
        max: MAX_CPUID_ENTRIES,
    })
}

pub(crate) fn kvm_op(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { op, source }
}

/// What this host's KVM offers, probed once per process.
pub struct HostKvm {
    pub kvm: Kvm,
    supported_cpuid: CpuId,
    msr_indices: OnceLock<Vec<u32>>,
}

impl HostKvm {
    pub fn get() -> Result<&'static HostKvm, VcpuError> {
        static HOST: OnceLock<HostKvm> = OnceLock::new();
        if let Some(host) = HOST.get() {
            return Ok(host);
        }
        let kvm = Kvm::new().map_err(VcpuError::OpenKvm)?;
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_op("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(HOST.get_or_init(|| HostKvm {
            kvm,
            supported_cpuid,
            msr_indices: OnceLock::new(),
        }))
    }

    /// The TSC rate guests see (they run at the host's rate), calibrated
    /// once against the monotonic clock.
    pub fn tsc_khz(&self) -> u32 {
        static TSC_KHZ: OnceLock<u32> = OnceLock::new();
        *TSC_KHZ.get_or_init(|| {
            let started = std::time::Instant::now();
            let start_ticks = read_tsc();
            std::thread::sleep(std::time::Duration::from_millis(20));
            let ticks = read_tsc() - start_ticks;
            (ticks as f64 / started.elapsed().as_secs_f64() / 1000.0) as u32
        })
    }

    /// CPUID for vCPU `id`: everything KVM supports, with this vCPU's APIC ID.
    pub fn cpuid_for(&self, id: u8) -> Vec<kvm_cpuid_entry2> {
        let mut entries = self.supported_cpuid.as_slice().to_vec();
        for entry in &mut entries {
            match entry.function {
                1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | (u32::from(id) << 24),
                0xb | 0x1f => entry.edx = u32::from(id),
                _ => {}
            }
        }
        entries
    }

    /// The MSRs that KVM lets us read on this host (KVM_GET_MSR_INDEX_LIST,
    /// less the ones a read refuses), probed on the first vCPU.
    fn msr_indices(&self, vcpu: &VcpuFd) -> Result<&[u32], VcpuError> {
        if let Some(indices) = self.msr_indices.get() {
            return Ok(indices);
        }
        let mut indices = self
            .kvm
            .get_msr_index_list()
            .map_err(kvm_op("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        loop {
            let mut msrs = msrs_for(&indices)?;
            let read = vcpu.get_msrs(&mut msrs).map_err(kvm_op("KVM_GET_MSRS"))?;
            if read == indices.len() {
                break;
            }
            indices.remove(read);
        }
        Ok(self.msr_indices.get_or_init(|| indices))
    }
}

fn read_tsc() -> u64 {
    // SAFETY: RDTSC has no memory effects; every x86-64 CPU that runs KVM has it.
    unsafe { std::arch::x86_64::_rdtsc() }
}

fn msrs_for(indices: &[u32]) -> Result<Msrs, VcpuError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    msr_list(&entries)
}

/// Creates vCPU `id` with its CPUID set.
pub fn create_vcpu(vm: &VmFd, cpuid: &[kvm_cpuid_entry2], id: u8) -> Result<VcpuFd, VcpuError> {
    let vcpu = vm
        .create_vcpu(u64::from(id))
        .map_err(kvm_op("KVM_CREATE_VCPU"))?;
    let cpuid = cpuid_list(cpuid)?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_op("KVM_SET_CPUID2"))?;
    Ok(vcpu)
}

/// Puts a new vCPU in 64-bit long mode at the guest's entry point.
pub fn enter_long_mode(vcpu: &VcpuFd, regs: &kvm_regs) -> Result<(), VcpuError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm_op("KVM_GET_SREGS"))?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: layout::GDT_CODE_SELECTOR,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: layout::GDT_DATA_SELECTOR,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    let tss = kvm_segment {
        selector: layout::GDT_TSS_SELECTOR,
        type_: 0xb,
        s: 0,
        l: 0,
        g: 0,
        limit: 0xfffff,
        ..code
    };
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = tss;
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&layout::GDT) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr3 = layout::PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm_op("KVM_SET_SREGS"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_op("KVM_SET_FPU"))?;
    vcpu.set_regs(regs).map_err(kvm_op("KVM_SET_REGS"))?;
    // With the in-kernel LAPIC, application processors start waiting for
    // INIT/SIPI; ours start directly at the entry point.
    vcpu.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .map_err(kvm_op("KVM_SET_MP_STATE"))?;
    Ok(())
}

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Everything KVM holds about one vCPU.
#[derive(Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The legacy 4 KiB XSAVE area (x87, SSE, AVX, ...).
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("id", &self.id)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .finish_non_exhaustive()
    }
}

impl VcpuState {
    /// Checks the sizes a restore relies on (a state read from a file may
    /// be anything).
    pub fn check(&self) -> Result<(), VcpuError> {
        let limits = [
            ("CPUID", self.cpuid.len(), MAX_CPUID_ENTRIES),
            ("MSR", self.msrs.len(), MAX_MSR_ENTRIES),
            ("XSAVE word", self.xsave.len(), XSAVE_WORDS),
        ];
        for (what, count, max) in limits {
            if count > max {
                return Err(VcpuError::TooManyEntries { what, count, max });
            }
        }
        Ok(())
    }

    /// Saves the state of a vCPU that is not running.
    pub fn save(vcpu: &VcpuFd, id: u8, cpuid: &[kvm_cpuid_entry2]) -> Result<Self, VcpuError> {
        let host = HostKvm::get()?;
        let mut msrs = msrs_for(host.msr_indices(vcpu)?)?;
        let read = vcpu.get_msrs(&mut msrs).map_err(kvm_op("KVM_GET_MSRS"))?;
        let msrs = msrs.as_slice()[..read].to_vec();
        Ok(Self {
            id,
            cpuid: cpuid.to_vec(),
            mp_state: vcpu.get_mp_state().map_err(kvm_op("KVM_GET_MP_STATE"))?,
            regs: vcpu.get_regs().map_err(kvm_op("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm_op("KVM_GET_SREGS"))?,
            xsave: vcpu
                .get_xsave()
                .map_err(kvm_op("KVM_GET_XSAVE"))?
                .region
                .to_vec(),
            xcrs: vcpu.get_xcrs().map_err(kvm_op("KVM_GET_XCRS"))?,
            debug_regs: vcpu.get_debug_regs().map_err(kvm_op("KVM_GET_DEBUGREGS"))?,
            lapic: vcpu.get_lapic().map_err(kvm_op("KVM_GET_LAPIC"))?,
            msrs,
            events: vcpu
                .get_vcpu_events()
                .map_err(kvm_op("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// Restores this state into a fresh vCPU (created with `self.cpuid`).
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), VcpuError> {
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm_op("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs).map_err(kvm_op("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(kvm_op("KVM_SET_SREGS"))?;
        let mut xsave = kvm_xsave::default();
        let len = self.xsave.len().min(xsave.region.len());
        xsave.region[..len].copy_from_slice(&self.xsave[..len]);
        // SAFETY: a fully sized legacy `kvm_xsave` with no extra region, as
        // KVM_SET_XSAVE (not XSAVE2) expects.
        unsafe { vcpu.set_xsave(&xsave) }.map_err(kvm_op("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(kvm_op("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(kvm_op("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(kvm_op("KVM_SET_LAPIC"))?;
        let msrs = msr_list(&self.msrs)?;
        let set = vcpu.set_msrs(&msrs).map_err(kvm_op("KVM_SET_MSRS"))?;
        if set != self.msrs.len() {
            return Err(VcpuError::MsrsRefused {
                set,
                total: self.msrs.len(),
                index: self.msrs[set].index,
            });
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm_op("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// VM-wide device state: the in-kernel interrupt controllers and the clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub irqchips: Vec<kvm_irqchip>,
    pub clock: kvm_clock_data,
}

const IRQCHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

impl VmState {
    pub fn save(vm: &VmFd) -> Result<Self, VcpuError> {
        let irqchips = IRQCHIPS
            .iter()
            .map(|&chip_id| {
                let mut chip = kvm_irqchip {
                    chip_id,
                    ..Default::default()
                };
                vm.get_irqchip(&mut chip)
                    .map_err(kvm_op("KVM_GET_IRQCHIP"))
                    .map(|()| chip)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            irqchips,
            clock: vm.get_clock().map_err(kvm_op("KVM_GET_CLOCK"))?,
        })
    }

    pub fn restore(&self, vm: &VmFd) -> Result<(), VcpuError> {
        for chip in &self.irqchips {
            vm.set_irqchip(chip).map_err(kvm_op("KVM_SET_IRQCHIP"))?;
        }
        // Only the clock value can be set; KVM rejects the other flags.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(kvm_op("KVM_SET_CLOCK"))?;
        Ok(())
    }
}
