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

// timed_writes: as counter (pass after pass, the pass number into every page
// of the slice, reported at the end of each pass), but from the slice's second
// page on, timing each store with rdtsc. The slice's first page holds a
// histogram of those durations: STORE_BUCKETS qwords, 4 per power of two of
// the duration in TSC ticks (bucket 4 * e + the two bits below the leading
// one, at bit e; durations under 4 ticks count in the bucket of their value).
global_asm!(
    ".pushsection .rodata.sandfork_guest,\"a\"",
    ".globl sandfork_guest_timed_writes_start",
    ".hidden sandfork_guest_timed_writes_start",
    ".globl sandfork_guest_timed_writes_end",
    ".hidden sandfork_guest_timed_writes_end",
    "sandfork_guest_timed_writes_start:",
    "    mov r12, rdi",
    "    lea r13, [rdi + 4096]",
    "    mov r14, {lapic}",
    "    mov rbx, 1",
    "2:",
    "    mov rdi, r13",
    "3:",
    "    cmp rdi, r14",
    "    je 5f",
    "    rdtsc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    mov r10, rax",
    "    mov qword ptr [rdi], rbx",
    "    rdtsc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    sub rax, r10",
    "    or rax, 1",
    "    bsr rcx, rax",
    "    cmp rcx, 2",
    "    jb 4f",
    "    mov r11, rax",
    "    sub rcx, 2",
    "    shr r11, cl",
    "    and r11, 3",
    "    lea rax, [rcx * 4 + 8]",
    "    add rax, r11",
    "4:",
    "    inc qword ptr [r12 + rax * 8]",
    "5:",
    "    add rdi, 4096",
    "    cmp rdi, rsi",
    "    jb 3b",
    "    mov eax, ebx",
    "    mov edx, {port}",
    "    out dx, eax",
    "    inc rbx",
    "    jmp 2b",
    "sandfork_guest_timed_writes_end:",
    ".popsection",
    port = const REPORT_PORT,
    lapic = const LAPIC_PAGE,
);

/// Buckets of the `timed_writes` histogram (the largest is for durations of
/// 2^63 ticks and more).
pub const STORE_BUCKETS: usize = 256;

/// The shortest duration, in TSC ticks, that `timed_writes` counts in
/// `bucket`, and the shortest it counts in the next one (buckets 4 to 7
/// stay empty).
pub fn store_bucket_ticks(bucket: usize) -> (u64, u64) {
    if bucket < 8 {
        return (bucket as u64, bucket as u64 + 1);
    }
    let (exponent, below) = (bucket / 4, (bucket % 4) as u64);
    ((4 + below) << (exponent - 2), (5 + below) << (exponent - 2))
}

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
    static sandfork_guest_timed_writes_start: u8;
    static sandfork_guest_timed_writes_end: u8;
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

pub fn timed_writes_code() -> &'static [u8] {
    code_between(
        &raw const sandfork_guest_timed_writes_start,
        &raw const sandfork_guest_timed_writes_end,
    )
}

pub fn idle_code() -> &'static [u8] {
    code_between(
        &raw const sandfork_guest_idle_start,
        &raw const sandfork_guest_idle_end,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_buckets_follow_each_other_without_gaps() {
        assert_eq!(store_bucket_ticks(3), (3, 4));
        assert_eq!(store_bucket_ticks(8), (4, 5));
        assert_eq!(store_bucket_ticks(12), (8, 10));
        for bucket in 8..STORE_BUCKETS - 1 {
            let (low, high) = store_bucket_ticks(bucket);
            assert!(low < high, "bucket {bucket}");
            assert_eq!(high, store_bucket_ticks(bucket + 1).0, "bucket {bucket}");
        }
        // What the guest computes for a duration lands in the bucket whose
        // range holds it.
        for ticks in [4_u64, 5, 7, 8, 9, 1000, 123_456, u64::MAX >> 1] {
            let exponent = 63 - ticks.leading_zeros() as usize;
            let bucket = 4 * exponent + ((ticks >> (exponent - 2)) & 3) as usize;
            let (low, high) = store_bucket_ticks(bucket);
            assert!(low <= ticks && ticks < high, "{ticks} in bucket {bucket}");
        }
    }
}
