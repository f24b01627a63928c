//! Sandfork node agent: runs sandboxes as KVM virtual machines on memfd
//! memory, captures them live with userfaultfd write-protection, and
//! restores branches copy-on-write from the captures.

pub mod bench;
pub mod capture;
pub mod fill;
pub mod guest;
pub mod manager;
pub mod memory;
pub mod service;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
pub mod vmhost;
