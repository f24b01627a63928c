//! What the agent can offer: capacity, and whether its devices work.

/// What the agent may hold at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Memory for sandboxes and captures, in MiB.
    pub memory_mib: u64,
    /// Most sandboxes at once; 0 for no limit.
    pub max_sandboxes: u32,
}

impl Capacity {
    /// `memory_mib` if given, else the host's memory less `reserved_mib`.
    pub fn detect(memory_mib: Option<u64>, reserved_mib: u64, max_sandboxes: u32) -> Self {
        let memory_mib = memory_mib.unwrap_or_else(|| {
            let total_mib = sandfork_vmm::memory::meminfo_field("MemTotal:").unwrap_or(0) >> 20;
            total_mib.saturating_sub(reserved_mib)
        });
        Self {
            memory_mib,
            max_sandboxes,
        }
    }
}

/// Whether each device opens, and if not, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Devices {
    pub kvm: Result<(), String>,
    pub userfaultfd: Result<(), String>,
}

impl Devices {
    pub fn all_ok(&self) -> bool {
        self.kvm.is_ok() && self.userfaultfd.is_ok()
    }
}

fn open_rw(path: &'static str) -> Result<(), String> {
    sandfork_vmm::devices::probe(path).map_err(|err| sandfork_vmm::error::chain(&err))
}

/// Opens `/dev/kvm` and `/dev/userfaultfd`.
pub fn check() -> Devices {
    Devices {
        kvm: open_rw(sandfork_vmm::devices::KVM),
        userfaultfd: open_rw(sandfork_vmm::devices::USERFAULTFD),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_defaults_to_host_memory_less_the_reserve() {
        let explicit = Capacity::detect(Some(2048), 1024, 8);
        assert_eq!(explicit.memory_mib, 2048);
        let detected = Capacity::detect(None, 512, 8);
        let total_mib = sandfork_vmm::memory::meminfo_field("MemTotal:").unwrap() >> 20;
        assert_eq!(detected.memory_mib, total_mib - 512);
    }
}
