//! Real-time priority for the short, latency-critical threads of a capture
//! (the pause, the fault handler, the fill servers). Without the privilege
//! a thread stays a normal thread. Threads inherit the policy of their
//! creator, so every long-running thread started here sets its own first.

/// Moves the calling thread into (or back out of) the lowest real-time
/// priority (`SCHED_FIFO` 1, or `SCHED_OTHER`).
pub fn set_current_realtime(realtime: bool) {
    let (policy, priority) = if realtime {
        (libc::SCHED_FIFO, 1)
    } else {
        (libc::SCHED_OTHER, 0)
    };
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: pthread_self has no preconditions and names the calling
    // thread, which is alive; `param` is a valid sched_param for the call.
    let _ = unsafe { libc::pthread_setschedparam(libc::pthread_self(), policy, &param) };
}

/// Whether the calling thread runs at real-time priority.
pub fn current_is_realtime() -> bool {
    // SAFETY: sched_getscheduler(0) only queries the calling thread.
    unsafe { libc::sched_getscheduler(0) == libc::SCHED_FIFO }
}

/// Runs the current thread at real-time priority until dropped, then
/// restores the policy it had (guards nest).
pub struct RealtimeGuard {
    was_realtime: bool,
}

impl RealtimeGuard {
    pub fn new() -> Self {
        let was_realtime = current_is_realtime();
        set_current_realtime(true);
        Self { was_realtime }
    }
}

impl Default for RealtimeGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for RealtimeGuard {
    fn drop(&mut self) {
        set_current_realtime(self.was_realtime);
    }
}
