//! Guest images: the built-in workloads and the loader for user-supplied
//! flat binaries, plus the checker that tells whether a copy of a `counter`
//! guest's memory is the memory of one instant.

pub mod builtin;
pub mod layout;

use std::path::PathBuf;

use kvm_bindings::kvm_regs;
use serde::{Deserialize, Serialize};

use crate::memory::{GuestMemory, MemoryError, PAGE_SIZE};
use layout::{CODE_ADDR, CODE_MAX_BYTES};

/// What a sandbox runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Workload {
    /// Increments a counter in every page of guest memory, pass after pass.
    Counter,
    /// Writes pages at a given rate (0: as fast as it can) and pattern.
    Dirty {
        pattern: DirtyPattern,
        #[serde(default)]
        pages_per_second: u64,
    },
    /// Halts.
    Idle,
    /// A user-supplied flat 64-bit binary, loaded at 1 MiB and entered there.
    Flat { path: PathBuf },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum DirtyPattern {
    Sequential,
    Random,
}

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("cannot read guest image {path}")]
    ReadImage {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("guest image is {0} bytes; it must be 1 byte to {CODE_MAX_BYTES} bytes")]
    ImageSize(usize),
}

/// Code to load at `CODE_ADDR` and the parameters its entry expects.
#[derive(Clone, Debug)]
pub struct GuestImage {
    pub code: Vec<u8>,
    pub params: [u64; 3],
}

impl GuestImage {
    /// `tsc_khz` lets a paced workload convert its rate into TSC ticks.
    pub fn for_workload(workload: &Workload, tsc_khz: u32) -> Result<Self, GuestError> {
        let image = match workload {
            Workload::Counter => Self {
                code: builtin::counter_code().to_vec(),
                params: [0; 3],
            },
            Workload::Idle => Self {
                code: builtin::idle_code().to_vec(),
                params: [0; 3],
            },
            Workload::Dirty {
                pattern,
                pages_per_second,
            } => {
                let ticks_per_write = match pages_per_second {
                    0 => 0,
                    rate => (u64::from(tsc_khz) * 1000 / rate).max(1),
                };
                let random = u64::from(*pattern == DirtyPattern::Random);
                Self {
                    code: builtin::dirty_code().to_vec(),
                    params: [random, ticks_per_write, 0x5eed_f00d],
                }
            }
            Workload::Flat { path } => {
                Self::flat(std::fs::read(path).map_err(|source| GuestError::ReadImage {
                    path: path.clone(),
                    source,
                })?)?
            }
        };
        Ok(image)
    }

    pub fn flat(code: Vec<u8>) -> Result<Self, GuestError> {
        if code.is_empty() || code.len() > CODE_MAX_BYTES {
            return Err(GuestError::ImageSize(code.len()));
        }
        Ok(Self {
            code,
            params: [0; 3],
        })
    }

    /// Writes page tables and code into fresh guest memory.
    pub fn load(&self, memory: &GuestMemory) -> Result<(), MemoryError> {
        layout::write_page_tables(memory)?;
        memory.write_slice(CODE_ADDR, &self.code)
    }

    /// General registers at entry for vCPU `index` of `vcpus`.
    pub fn entry_regs(&self, memory_bytes: u64, vcpus: usize, index: usize) -> kvm_regs {
        let slice = layout::vcpu_data_slice(memory_bytes, vcpus, index);
        kvm_regs {
            rip: CODE_ADDR,
            rsp: layout::stack_top(index),
            rflags: 0x2,
            rdi: slice.start,
            rsi: slice.end,
            rdx: index as u64,
            rcx: self.params[0],
            r8: self.params[1],
            r9: self.params[2],
            ..Default::default()
        }
    }
}

/// Summary of a consistent `counter` memory image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterState {
    /// Per vCPU: the pass being written and how many pages of it are done.
    pub vcpus: Vec<CounterProgress>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterProgress {
    pub pass: u64,
    pub pages_done: u64,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "vCPU {vcpu}: memory is not the counter guest's memory at the saved instant \
     (pass {pass}, cursor page {cursor}): {mismatched_pages} of {pages} pages differ, \
     the first is page {first_page} holding {first_value}"
)]
pub struct CounterMismatch {
    pub vcpu: usize,
    pub pass: u64,
    pub cursor: u64,
    pub mismatched_pages: u64,
    pub pages: u64,
    /// For the closest candidate instant: the first page that differs.
    pub first_page: u64,
    pub first_value: u64,
}

/// Checks that `memory` (a copy of a `counter` guest's memory) is exactly
/// the memory of the instant its vCPU registers `regs` were saved.
///
/// In each vCPU's slice, pages below the cursor (rdi) hold the pass number
/// (rbx) and the rest hold the previous pass. Depending on which instruction
/// the vCPU stopped at, the page at the cursor may already hold the new value,
/// or the pass may just have wrapped; exactly those three states are accepted.
pub fn verify_counter(memory: &[u8], regs: &[kvm_regs]) -> Result<CounterState, CounterMismatch> {
    let memory_bytes = memory.len() as u64;
    let mut vcpus = Vec::with_capacity(regs.len());
    for (index, vcpu_regs) in regs.iter().enumerate() {
        let slice = layout::vcpu_data_slice(memory_bytes, regs.len(), index);
        let pages = (slice.end - slice.start) / PAGE_SIZE as u64;
        let pass = vcpu_regs.rbx;
        let cursor = vcpu_regs
            .rdi
            .saturating_sub(slice.start)
            .min(slice.end - slice.start)
            / PAGE_SIZE as u64;
        let value_at = |page: u64| {
            let offset = (slice.start + page * PAGE_SIZE as u64) as usize;
            u64::from_le_bytes(memory[offset..offset + 8].try_into().unwrap())
        };
        // (value below the boundary, boundary page)
        let candidates = [(pass, cursor), (pass, cursor + 1), (pass, 0)];
        let mut mismatches = [0u64; 3];
        let mut first_mismatch = [(0u64, 0u64); 3];
        let lapic_page = layout::LAPIC_PAGE
            .checked_sub(slice.start)
            .map(|offset| offset / PAGE_SIZE as u64);
        for page in (0..pages).filter(|&page| Some(page) != lapic_page) {
            let value = value_at(page);
            for (slot, (new_value, boundary)) in candidates.iter().enumerate() {
                let expected = if page < *boundary {
                    *new_value
                } else {
                    new_value.wrapping_sub(1)
                };
                if value != expected {
                    if mismatches[slot] == 0 {
                        first_mismatch[slot] = (page, value);
                    }
                    mismatches[slot] += 1;
                }
            }
        }
        // Before the first store the slice is still all zeros.
        let untouched = pass <= 1
            && (0..pages)
                .filter(|&page| Some(page) != lapic_page)
                .all(|page| value_at(page) == 0);
        match mismatches.iter().position(|&count| count == 0) {
            Some(slot) => vcpus.push(CounterProgress {
                pass,
                pages_done: candidates[slot].1.min(pages),
            }),
            None if untouched => vcpus.push(CounterProgress {
                pass: 1,
                pages_done: 0,
            }),
            None => {
                let closest = (0..3).min_by_key(|&slot| mismatches[slot]).unwrap();
                return Err(CounterMismatch {
                    vcpu: index,
                    pass,
                    cursor,
                    mismatched_pages: mismatches[closest],
                    pages,
                    first_page: first_mismatch[closest].0,
                    first_value: first_mismatch[closest].1,
                });
            }
        }
    }
    Ok(CounterState { vcpus })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter_memory(memory_bytes: u64, pass: u64, pages_done: u64) -> Vec<u8> {
        let mut memory = vec![0u8; memory_bytes as usize];
        let slice = layout::vcpu_data_slice(memory_bytes, 1, 0);
        let pages = (slice.end - slice.start) / PAGE_SIZE as u64;
        for page in 0..pages {
            let value = if page < pages_done { pass } else { pass - 1 };
            let offset = (slice.start + page * PAGE_SIZE as u64) as usize;
            memory[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
        }
        memory
    }

    fn regs_at(memory_bytes: u64, pass: u64, cursor: u64) -> kvm_regs {
        let slice = layout::vcpu_data_slice(memory_bytes, 1, 0);
        kvm_regs {
            rbx: pass,
            rdi: slice.start + cursor * PAGE_SIZE as u64,
            ..Default::default()
        }
    }

    const BYTES: u64 = 4 << 20;

    #[test]
    fn accepts_the_memory_of_the_saved_instant() {
        let memory = counter_memory(BYTES, 7, 100);
        let state = verify_counter(&memory, &[regs_at(BYTES, 7, 100)]).unwrap();
        assert_eq!(
            state.vcpus[0],
            CounterProgress {
                pass: 7,
                pages_done: 100
            }
        );
        // Stopped right after the store at the cursor.
        verify_counter(&memory, &[regs_at(BYTES, 7, 99)]).unwrap();
    }

    #[test]
    fn rejects_memory_that_ran_ahead_of_the_registers() {
        let memory = counter_memory(BYTES, 7, 140);
        let err = verify_counter(&memory, &[regs_at(BYTES, 7, 100)]).unwrap_err();
        assert_eq!(err.mismatched_pages, 39);
    }

    #[test]
    fn rejects_a_torn_pass() {
        let mut memory = counter_memory(BYTES, 3, 10);
        let slice = layout::vcpu_data_slice(BYTES, 1, 0);
        let offset = (slice.start + 200 * PAGE_SIZE as u64) as usize;
        memory[offset..offset + 8].copy_from_slice(&3u64.to_le_bytes());
        assert!(verify_counter(&memory, &[regs_at(BYTES, 3, 10)]).is_err());
    }

    #[test]
    fn accepts_untouched_memory_before_the_first_store() {
        let memory = vec![0u8; BYTES as usize];
        verify_counter(&memory, &[regs_at(BYTES, 0, 0)]).unwrap();
    }
}
