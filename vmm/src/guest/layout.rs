//! Guest-physical memory layout shared by every guest image: identity-mapped
//! long mode with 2 MiB pages, code at 1 MiB, workload data from 2 MiB up.

use std::ops::Range;

use crate::memory::{GuestMemory, MemoryError, PAGE_SIZE};

pub const GDT_ADDR: u64 = 0x1000;
pub const PML4_ADDR: u64 = 0x2000;
pub const PDPT_ADDR: u64 = 0x3000;
/// One page directory per GiB of guest memory follows here.
pub const PD_ADDR: u64 = 0x4000;
/// Per-vCPU stacks grow down from here (one page each).
pub const STACK_TOP: u64 = 0x8_0000;
pub const CODE_ADDR: u64 = 0x10_0000;
pub const CODE_MAX_BYTES: usize = 0x10_0000;
/// Workload data (what `counter` and `dirty` write) starts here.
pub const DATA_ADDR: u64 = 0x20_0000;

/// I/O port a guest writes a 32-bit progress value to (counter: the pass just
/// finished; dirty: writes done).
pub const REPORT_PORT: u16 = 0x5f0;
/// Serial console (COM1) data port: bytes written there are the guest's console.
pub const CONSOLE_PORT: u16 = 0x3f8;

/// The in-kernel LAPIC answers guest accesses to this page (KVM does not let
/// the APIC base move), so guests with more than ~4 GiB must not use it as RAM.
pub const LAPIC_PAGE: u64 = 0xfee0_0000;

pub const GDT_CODE_SELECTOR: u16 = 0x8;
pub const GDT_DATA_SELECTOR: u16 = 0x10;
pub const GDT_TSS_SELECTOR: u16 = 0x18;

const PAGE_PRESENT_WRITABLE: u64 = 0x3;
const PAGE_HUGE: u64 = 0x80;
const TWO_MIB: u64 = 2 << 20;
const ONE_GIB: u64 = 1 << 30;

/// GDT entries: null, 64-bit code, data, TSS (flat).
pub const GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0080_8b00_0000_ffff,
];

/// Writes the GDT and identity-mapping page tables (2 MiB pages) covering
/// all of guest memory.
pub fn write_page_tables(memory: &GuestMemory) -> Result<(), MemoryError> {
    let gdt: Vec<u8> = GDT.iter().flat_map(|entry| entry.to_le_bytes()).collect();
    memory.write_slice(GDT_ADDR, &gdt)?;

    let gibs = (memory.len() as u64).div_ceil(ONE_GIB);
    assert!(PD_ADDR + gibs * PAGE_SIZE as u64 <= STACK_TOP - 64 * PAGE_SIZE as u64);
    memory.write_slice(
        PML4_ADDR,
        &(PDPT_ADDR | PAGE_PRESENT_WRITABLE).to_le_bytes(),
    )?;
    for gib in 0..gibs {
        let pd = PD_ADDR + gib * PAGE_SIZE as u64;
        memory.write_slice(
            PDPT_ADDR + gib * 8,
            &(pd | PAGE_PRESENT_WRITABLE).to_le_bytes(),
        )?;
        let entries: Vec<u8> = (0..512u64)
            .map(|i| gib * ONE_GIB + i * TWO_MIB)
            .take_while(|&addr| addr < memory.len() as u64)
            .flat_map(|addr| (addr | PAGE_PRESENT_WRITABLE | PAGE_HUGE).to_le_bytes())
            .collect();
        memory.write_slice(pd, &entries)?;
    }
    Ok(())
}

/// The stack top of vCPU `index`.
pub fn stack_top(index: usize) -> u64 {
    STACK_TOP - (index as u64) * PAGE_SIZE as u64
}

/// The part of the data area that vCPU `index` of `vcpus` works on: equal,
/// page-aligned, disjoint slices.
pub fn vcpu_data_slice(memory_bytes: u64, vcpus: usize, index: usize) -> Range<u64> {
    let pages = (memory_bytes - DATA_ADDR) / PAGE_SIZE as u64;
    let per_vcpu = pages / vcpus as u64;
    let start = DATA_ADDR + index as u64 * per_vcpu * PAGE_SIZE as u64;
    start..start + per_vcpu * PAGE_SIZE as u64
}
