//! Processes the tests start (operator, agents), stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts `command` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> anyhow::Result<Self> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {name}: {command:?}"))?;
        Ok(Self {
            name: name.into(),
            child,
            log: log.into(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error with the end of the log if the process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its log ends:\n{}",
                self.name,
                self.log_tail(40)
            );
        }
        Ok(())
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// SIGTERM, then SIGKILL after `grace`; safe to repeat.
    pub fn stop(&mut self, grace: Duration) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        signal(self.child.id(), "TERM");
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "e2e: {} ignored SIGTERM for {grace:?}; killing it",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// Sends `signal` (a name like `TERM`) to `pid`.
pub fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Whether `pid` runs (a zombie does not).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// Processes other than this one whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && alive(pid))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(needle))
        })
        .collect()
}

/// The last `lines` lines of a file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Whether a `sandfork-agent vm-host` process runs in the cgroup of the Pod
/// with UID `pod_uid` (the kubelet names a Pod's cgroup after its UID, with
/// `_` for `-` under the systemd driver).
pub fn vm_alive_in_pod(pod_uid: &str) -> bool {
    let (dashed, underscored) = (
        format!("pod{pod_uid}"),
        format!("pod{}", pod_uid.replace('-', "_")),
    );
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| alive(pid))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains("vm-host"))
        })
        .any(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .is_ok_and(|cgroups| cgroups.contains(&dashed) || cgroups.contains(&underscored))
        })
}

/// The memory (bytes) charged to the cgroup of the VMM of the Pod with UID
/// `pod_uid` (cgroup v1 or v2), if it runs here.
pub fn vmm_memory_usage(pod_uid: &str) -> Option<u64> {
    cgroup_memory_usage(process_in_pod(pod_uid, "vm-host")?)
}

/// A process here whose command line mentions `needle`, in the cgroup of
/// the Pod with UID `pod_uid` (the kubelet names a Pod's cgroup after its
/// UID, with `_` for `-` under the systemd driver).
pub fn process_in_pod(pod_uid: &str, needle: &str) -> Option<u32> {
    let (dashed, underscored) = (
        format!("pod{pod_uid}"),
        format!("pod{}", pod_uid.replace('-', "_")),
    );
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(needle))
                && std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|cgroups| {
                    cgroups.contains(&dashed) || cgroups.contains(&underscored)
                })
        })
}

/// The memory (bytes) charged to the memory cgroup of `pid` (v1 or v2).
pub fn cgroup_memory_usage(pid: u32) -> Option<u64> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let file = if controllers.split(',').any(|c| c == "memory") {
            format!("/sys/fs/cgroup/memory{path}/memory.usage_in_bytes")
        } else if controllers.is_empty() {
            format!("/sys/fs/cgroup{path}/memory.current")
        } else {
            continue;
        };
        if let Ok(text) = std::fs::read_to_string(file) {
            return text.trim().parse().ok();
        }
    }
    None
}

/// Bytes of private (copy-on-write) pages in the mappings of `pid` that
/// are exactly `size` bytes long: for a branch's VMM, whose guest memory is
/// its capture mapped privately, the guest pages the branch wrote.
pub fn private_bytes_in_mappings_of_size(pid: u32, size: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    Some(private_bytes_in(&smaps, size))
}

fn private_bytes_in(smaps: &str, size: u64) -> u64 {
    let mut in_wanted = false;
    let mut bytes = 0;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else {
            continue;
        };
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        {
            in_wanted = end.saturating_sub(start) == size;
        } else if in_wanted && first == "Anonymous:" {
            let kib: u64 = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            bytes += kib * 1024;
        }
    }
    bytes
}

/// Sends SIGKILL to the `sandfork-agent serve` processes in the network
/// namespace `netns` (a node's: the agent uses its node's network); how
/// many it killed.
pub fn kill_agent_in_node(netns: &Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    let inode = |path: &Path| std::fs::metadata(path).ok().map(|meta| meta.ino());
    let Some(wanted) = inode(netns) else {
        return 0;
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| inode(Path::new(&format!("/proc/{pid}/ns/net"))) == Some(wanted))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                let args: Vec<&[u8]> = cmdline.split(|&byte| byte == 0).collect();
                args.first()
                    .is_some_and(|arg0| arg0.ends_with(b"sandfork-agent"))
                    && args.contains(&b"serve".as_slice())
            })
        })
        .filter(|&pid| {
            rustix::process::Pid::from_raw(pid).is_some_and(|pid| {
                rustix::process::kill_process(pid, rustix::process::Signal::KILL).is_ok()
            })
        })
        .count()
}

#[cfg(test)]
mod tests {
    #[test]
    fn private_bytes_are_summed_over_mappings_of_the_size_asked() {
        let smaps = "\
7f0000000000-7f0040000000 r--p 00000000 00:1a 12 /memfd:capture (deleted)
Size:            1048576 kB
Anonymous:          2048 kB
7f0040000000-7f0040001000 rw-p 00000000 00:00 0
Size:                  4 kB
Anonymous:             4 kB
";
        assert_eq!(super::private_bytes_in(smaps, 1 << 30), 2048 * 1024);
        assert_eq!(super::private_bytes_in(smaps, 4096), 4096);
        assert_eq!(super::private_bytes_in(smaps, 8192), 0);
    }
}
