//! Built-in guest workloads, assembled into the agent binary.
//!
//! Every workload is position-independent 64-bit code loaded at
//! `layout::CODE_ADDR` and entered in long mode with:
//! rdi = start of this vCPU's data slice, rsi = its end, rdx = vCPU index,
//! rcx, r8, r9 = workload parameters.

use std::arch::global_asm;

use super::layout::{LAPIC_PAGE, REPORT_PORT};

// counter: pass after pass, store the pass number (1, 2, ...) in the first
// qword of every page of the slice, in ascending order; report each finished
// pass. rbx = pass, rdi = cursor, r12 = slice start. At any instant the slice
// holds `rbx` below the cursor and `rbx - 1` from it on (see `verify_counter`).
// The LAPIC's page is skipped: it is not RAM.
global_asm!(
    ".pushsection .rodata.sandfork_guest,\"a\"",
    ".globl sandfork_guest_counter_start",
    ".hidden sandfork_guest_counter_start",
    ".globl sandfork_guest_counter_end",
    ".hidden sandfork_guest_counter_end",
    "sandfork_guest_counter_start:",
    "    mov r12, rdi",
    "    mov r13, {lapic}",
    "    mov rbx, 1",
    "2:",
    "    mov rdi, r12",
    "3:",
    "    cmp rdi, r13",
    "    je 4f",
    "    mov qword ptr [rdi], rbx",
    "4:",
    "    add rdi, 4096",
    "    cmp rdi, rsi",
    "    jb 3b",
    "    mov eax, ebx",
    "    mov edx, {port}",
    "    out dx, eax",
    "    inc rbx",
    "    jmp 2b",
    "sandfork_guest_counter_end:",
    ".popsection",
    port = const REPORT_PORT,
    lapic = const LAPIC_PAGE,
);

// dirty: write one page after another, sequentially (rcx = 0) or at
// pseudo-random pages (rcx = 1, 64-bit LCG seeded with r9), pacing the writes
// to one per r8 TSC ticks (r8 = 0: as fast as possible). Each write stores the
// running write count (skipping the LAPIC's page); every 65536 writes the
// count is reported.
global_asm!(
    ".pushsection .rodata.sandfork_guest,\"a\"",
    ".globl sandfork_guest_dirty_start",
    ".hidden sandfork_guest_dirty_start",
    ".globl sandfork_guest_dirty_end",
    ".hidden sandfork_guest_dirty_end",
    "sandfork_guest_dirty_start:",
    "    mov r12, rdi",
    "    mov r13, rsi",
    "    sub r13, rdi",
    "    shr r13, 12",
    "    mov r14, r9",
    "    xor r15, r15",
    "    xor ebx, ebx",
    "    rdtsc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    mov r11, rax",
    "2:",
    "    test rcx, rcx",
    "    jnz 3f",
    "    mov rax, rbx",
    "    inc rbx",
    "    cmp rbx, r13",
    "    jb 4f",
    "    xor ebx, ebx",
    "    jmp 4f",
    "3:",
    "    mov rax, 6364136223846793005",
    "    imul r14, rax",
    "    mov rax, 1442695040888963407",
    "    add r14, rax",
    "    mov rax, r14",
    "    shr rax, 33",
    "    xor edx, edx",
    "    div r13",
    "    mov rax, rdx",
    "4:",
    "    shl rax, 12",
    "    add rax, r12",
    "    inc r15",
    "    mov r10, {lapic}",
    "    cmp rax, r10",
    "    je 5f",
    "    mov qword ptr [rax], r15",
    "    test r15d, 0xffff",
    "    jnz 5f",
    "    mov eax, r15d",
    "    mov edx, {port}",
    "    out dx, eax",
    "5:",
    "    test r8, r8",
    "    jz 2b",
    "    add r11, r8",
    "6:",
    "    rdtsc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    cmp rax, r11",
    "    jb 6b",
    "    jmp 2b",
    "sandfork_guest_dirty_end:",
    ".popsection",
    port = const REPORT_PORT,
    lapic = const LAPIC_PAGE,
);

// idle: halt forever (the in-kernel LAPIC keeps the vCPU blocked in KVM).
global_asm!(
    ".pushsection .rodata.sandfork_guest,\"a\"",
    ".globl sandfork_guest_idle_start",
    ".hidden sandfork_guest_idle_start",
    ".globl sandfork_guest_idle_end",
    ".hidden sandfork_guest_idle_end",
    "sandfork_guest_idle_start:",
    "2:",
    "    hlt",
    "    jmp 2b",
    "sandfork_guest_idle_end:",
    ".popsection",
);

unsafe extern "C" {
    static sandfork_guest_counter_start: u8;
    static sandfork_guest_counter_end: u8;
    static sandfork_guest_dirty_start: u8;
    static sandfork_guest_dirty_end: u8;
    static sandfork_guest_idle_start: u8;
    static sandfork_guest_idle_end: u8;
}

fn code_between(start: *const u8, end: *const u8) -> &'static [u8] {
    let len = end as usize - start as usize;
    // SAFETY: `start` and `end` are labels around one contiguous block of
    // bytes in the read-only data section of this binary (see the
    // `global_asm!` blocks above), which lives for the whole program.
    unsafe { std::slice::from_raw_parts(start, len) }
}

pub fn counter_code() -> &'static [u8] {
    code_between(
        &raw const sandfork_guest_counter_start,
        &raw const sandfork_guest_counter_end,
    )
}

pub fn dirty_code() -> &'static [u8] {
    code_between(
        &raw const sandfork_guest_dirty_start,
        &raw const sandfork_guest_dirty_end,
    )
}

pub fn idle_code() -> &'static [u8] {
    code_between(
        &raw const sandfork_guest_idle_start,
        &raw const sandfork_guest_idle_end,
    )
}
