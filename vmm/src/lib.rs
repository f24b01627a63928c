//! Sandfork's VMM: KVM virtual machines on memfd memory, captured live with
//! userfaultfd write-protection and restored copy-on-write. It holds every
//! `unsafe` block of the project; the agent (`sandfork-node-agent`) drives
//! it from the VM host process.
//!
//! # The path of a capture
//!
//! | stage | what happens | file |
//! | --- | --- | --- |
//! | arm early | the fault handler and the copier start; all of guest memory is write-protected while the guest runs, the pages it writes meanwhile recorded and un-protected | `capture.rs` (`LiveCapture::start`, `LiveCopy::reprotect_written`) |
//! | kick and pause | each vCPU is signalled out of `KVM_RUN` and parks | `vm.rs` (`Vm::pause`) |
//! | save state | registers, FPU/XSAVE, LAPIC, MSRs, events; the irqchips and the clock | `vcpu.rs` (`VcpuState::save`, `VmState::save`) |
//! | re-protect | the pages written since the early arm are protected again, inside the pause | `capture.rs` (`LiveCopy::reprotect_written`) |
//! | resume | the vCPUs run again | `vm.rs` (`Vm::resume`) |
//! | copy and fault handler | the copier fills the capture's memory file (`UFFDIO_COPY`, first fill wins); a guest write to a page not copied yet faults to the handler, which copies the page's before-image first | `capture.rs` (`LiveCopy::run_copier`, `run_fault_handler`), `memory.rs` (`SnapshotMapping`) |
//! | snapshot | the state is recorded at once (`memory_complete: false`), then again once the copy completes; export and import of the portable file | `snapshot/mod.rs` (`CaptureDir`, `RunningCapture`), `snapshot/format.rs` |
//! | restore or early fill | a new VM on a copy-on-write mapping of the memory file; while the copy still runs, its first touch of a missing page is served by the capturing process over `fill.sock` | `snapshot/mod.rs` (`CaptureDir::restore`), `vm.rs` (`Vm::restore`), `fill.rs` |
//!
//! Stop-and-copy (`capture::stop_and_copy`) is the baseline: pause, copy
//! everything, resume.
//!
//! # Modules
//!
//! The modules form a tree (each uses only those listed before it):
//! `thread`, `devices`, `error`, `process` → `memory` → `guest` → `vcpu` → `fill` →
//! `vm` → `capture` → `snapshot`. A restored VM owns its filler; the filler
//! learns that its capture completed through a closure, and the fill server
//! serves any `fill::PageSource` (the capture's progress implements it).

pub mod capture;
pub mod devices;
pub mod error;
pub mod fill;
pub mod guest;
pub mod memory;
pub mod process;
pub mod snapshot;
pub mod thread;
pub mod vcpu;
pub mod vm;
