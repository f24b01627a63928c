//! Starting the VM host processes in their own session. Here rather than in
//! the agent so that every `unsafe` block of the project is in this crate
//! and the agent can `forbid(unsafe_code)`.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes `command`'s child call `setsid` before it executes, so that it
/// leaves the caller's session and process group: a VM outlives the agent
/// that started it, and signals sent to the agent's group or terminal do
/// not reach it. (`CommandExt::process_group` would leave the child in the
/// agent's session, and spawning through `setsid(1)` would depend on that
/// tool and change the child's command line.)
pub fn in_new_session(command: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the child between fork and exec, where
    // only async-signal-safe calls are allowed: setsid is one, and the
    // closure allocates nothing and takes no lock.
    unsafe {
        command.pre_exec(|| {
            rustix::process::setsid()?;
            Ok(())
        })
    }
}
