//! The `sandfork.agent.v1.Agent` service on top of the blocking [`Manager`].
//!
//! Each call runs the manager on a blocking thread, holding a lock per UID
//! so that a retry that arrives while the first attempt still runs waits
//! for it instead of racing it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use sandfork_api::agent::v1 as pb;
use tonic::{Request, Response, Status};

use super::convert::{self, capture_to_pb, sandbox_to_pb};
use super::health::{self, Capacity};
use crate::manager::{Capture, Manager, SandboxSpec};

pub struct AgentService {
    manager: Arc<Manager>,
    node_name: String,
    capacity: Capacity,
    locks: Arc<KeyedLocks>,
    /// Sandboxes being captured: their VM process is busy and not asked
    /// for status meanwhile (it would not answer in time).
    capturing: Arc<Mutex<HashSet<String>>>,
}

/// Marks a sandbox as being captured while alive.
struct Capturing {
    set: Arc<Mutex<HashSet<String>>>,
    uid: String,
}

impl Capturing {
    fn new(set: &Arc<Mutex<HashSet<String>>>, uid: &str) -> Self {
        set.lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(uid.to_string());
        Self {
            set: set.clone(),
            uid: uid.to_string(),
        }
    }
}

impl Drop for Capturing {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&self.uid);
    }
}

fn being_captured(uid: &str) -> pb::Sandbox {
    pb::Sandbox {
        uid: uid.to_string(),
        state: pb::SandboxState::Unknown as i32,
        failure_reason: "the sandbox is being captured".into(),
        ..Default::default()
    }
}

/// One reader-writer lock per key, created on demand.
#[derive(Default)]
struct KeyedLocks(Mutex<HashMap<String, Arc<RwLock<()>>>>);

impl KeyedLocks {
    fn get(&self, key: &str) -> Arc<RwLock<()>> {
        let mut locks = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Forget the locks nobody holds, so the map does not grow forever.
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        locks.entry(key.to_string()).or_default().clone()
    }
}

/// A lock a call holds while it works: alone, or beside other shared holders
/// (the restores of one capture run side by side; its deletion waits for them).
enum Hold {
    Exclusive(String),
    Shared(String),
}

fn exclusive(kind: &str, uid: &str) -> Hold {
    Hold::Exclusive(format!("{kind}/{uid}"))
}

fn shared(kind: &str, uid: &str) -> Hold {
    Hold::Shared(format!("{kind}/{uid}"))
}

impl AgentService {
    pub fn new(manager: Manager, node_name: String, capacity: Capacity) -> Self {
        Self {
            manager: Arc::new(manager),
            node_name,
            capacity,
            locks: Arc::default(),
            capturing: Arc::default(),
        }
    }

    fn is_capturing(&self, uid: &str) -> bool {
        self.capturing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(uid)
    }

    /// Runs `work` on a blocking thread holding the locks of `holds` (in order).
    async fn blocking<T, F>(&self, holds: Vec<Hold>, work: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Manager) -> Result<T, Status> + Send + 'static,
    {
        let manager = self.manager.clone();
        let locks = self.locks.clone();
        tokio::task::spawn_blocking(move || {
            let held: Vec<(Arc<RwLock<()>>, bool)> = holds
                .iter()
                .map(|hold| match hold {
                    Hold::Exclusive(key) => (locks.get(key), true),
                    Hold::Shared(key) => (locks.get(key), false),
                })
                .collect();
            // Taken in order; released when this returns.
            let (mut writing, mut reading) = (Vec::new(), Vec::new());
            for (lock, exclusive) in &held {
                if *exclusive {
                    writing.push(
                        lock.write()
                            .unwrap_or_else(|poisoned| poisoned.into_inner()),
                    );
                } else {
                    reading.push(lock.read().unwrap_or_else(|poisoned| poisoned.into_inner()));
                }
            }
            work(&manager)
        })
        .await
        .map_err(|err| Status::internal(format!("agent task failed: {err}")))?
    }
}

/// The capture with the instant it was taken, read from its state file.
fn capture_with_time(manager: &Manager, capture: &Capture) -> pb::Capture {
    let mut message = capture_to_pb(capture);
    let dir = crate::state_dir::capture(manager.root(), &capture.name);
    if let Ok(state) = dir.read_state() {
        // Recorded at the pause, the captured instant.
        message.captured_at_unix_micros =
            i64::try_from(state.created_unix_ms.saturating_mul(1000)).unwrap_or(i64::MAX);
    }
    message
}

/// The sandboxes in the state directory, without asking their VMs.
fn sandbox_names(manager: &Manager) -> Result<Vec<String>, Status> {
    let dir = crate::state_dir::sandboxes(manager.root());
    let entries = std::fs::read_dir(&dir)
        .map_err(|err| Status::internal(format!("reading {}: {err}", dir.display())))?;
    let mut names: Vec<String> = entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| crate::manager::validate_name(name).is_ok())
        .collect();
    names.sort();
    Ok(names)
}

fn find_capture(manager: &Manager, uid: &str) -> Result<Capture, Status> {
    crate::manager::validate_name(uid)?;
    manager
        .list_captures()?
        .into_iter()
        .find(|c| c.name == uid)
        .ok_or_else(|| Status::not_found(format!("capture {uid:?} not found")))
}

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentService {
    async fn get_info(
        &self,
        _: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::AgentInfo>, Status> {
        let node_name = self.node_name.clone();
        let capacity = self.capacity;
        let info = self
            .blocking(Vec::new(), move |manager| {
                let sandboxes = manager.list()?;
                let captures = manager.list_captures()?;
                let used_mib = sandboxes.iter().map(|s| s.memory_mib).sum::<u64>()
                    + captures.iter().map(|c| c.memory_bytes >> 20).sum::<u64>();
                let devices = health::check();
                Ok(pb::AgentInfo {
                    node_name,
                    version: env!("CARGO_PKG_VERSION").into(),
                    memory_capacity_mib: capacity.memory_mib,
                    memory_used_mib: used_mib,
                    max_sandboxes: capacity.max_sandboxes,
                    sandboxes: u32::try_from(sandboxes.len()).unwrap_or(u32::MAX),
                    captures: u32::try_from(captures.len()).unwrap_or(u32::MAX),
                    kvm_ok: devices.kvm.is_ok(),
                    kvm_error: devices.kvm.err().unwrap_or_default(),
                    userfaultfd_ok: devices.userfaultfd.is_ok(),
                    userfaultfd_error: devices.userfaultfd.err().unwrap_or_default(),
                })
            })
            .await?;
        Ok(Response::new(info))
    }

    async fn create_sandbox(
        &self,
        request: Request<pb::CreateSandboxRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let request = request.into_inner();
        let vcpus = u8::try_from(request.vcpus).map_err(|_| {
            Status::invalid_argument(format!(
                "{} vCPUs is more than this agent runs",
                request.vcpus
            ))
        })?;
        let spec = SandboxSpec {
            name: request.uid.clone(),
            memory_mib: request.memory_mib,
            vcpus,
            workload: convert::workload_from_pb(request.workload)?,
        };
        let max = self.capacity.max_sandboxes;
        let pod = pod_of(&request.pod_uid);
        let sandbox = self
            .blocking(vec![exclusive("sandbox", &request.uid)], move |manager| {
                if manager.status(&spec.name).is_err() {
                    let running = sandbox_names(manager)?.len();
                    if max > 0 && running >= max as usize {
                        return Err(Status::resource_exhausted(format!(
                            "this node runs {running} sandboxes, its maximum"
                        )));
                    }
                }
                Ok(sandbox_to_pb(&manager.run_on(&spec, pod.as_deref())?))
            })
            .await?;
        Ok(Response::new(sandbox))
    }

    async fn restore_branch(
        &self,
        request: Request<pb::RestoreBranchRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let request = request.into_inner();
        let keys = vec![
            exclusive("sandbox", &request.uid),
            shared("capture", &request.capture_uid),
        ];
        let max = self.capacity.max_sandboxes;
        let sandbox = self
            .blocking(keys, move |manager| {
                if manager.status(&request.uid).is_err() {
                    let running = sandbox_names(manager)?.len();
                    if max > 0 && running >= max as usize {
                        return Err(Status::resource_exhausted(format!(
                            "this node runs {running} sandboxes, its maximum"
                        )));
                    }
                }
                Ok(sandbox_to_pb(&manager.branch_on(
                    &request.uid,
                    &request.capture_uid,
                    pod_of(&request.pod_uid).as_deref(),
                )?))
            })
            .await?;
        Ok(Response::new(sandbox))
    }

    async fn get_sandbox(
        &self,
        request: Request<pb::GetSandboxRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let uid = request.into_inner().uid;
        if self.is_capturing(&uid) {
            return Ok(Response::new(being_captured(&uid)));
        }
        let sandbox = self
            .blocking(Vec::new(), move |manager| {
                Ok(sandbox_to_pb(&manager.status(&uid)?))
            })
            .await?;
        Ok(Response::new(sandbox))
    }

    async fn list_sandboxes(
        &self,
        _: Request<pb::ListSandboxesRequest>,
    ) -> Result<Response<pb::ListSandboxesResponse>, Status> {
        let capturing = self.capturing.clone();
        let sandboxes = self
            .blocking(Vec::new(), move |manager| {
                let busy = capturing
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .clone();
                // Busy sandboxes are not asked (their VM would not answer in time).
                let mut sandboxes = Vec::new();
                for uid in sandbox_names(manager)? {
                    if busy.contains(&uid) {
                        sandboxes.push(being_captured(&uid));
                    } else if let Ok(info) = manager.status(&uid) {
                        sandboxes.push(sandbox_to_pb(&info));
                    }
                }
                Ok(sandboxes)
            })
            .await?;
        Ok(Response::new(pb::ListSandboxesResponse { sandboxes }))
    }

    async fn delete_sandbox(
        &self,
        request: Request<pb::DeleteSandboxRequest>,
    ) -> Result<Response<pb::DeleteSandboxResponse>, Status> {
        let uid = request.into_inner().uid;
        let existed = self
            .blocking(vec![exclusive("sandbox", &uid)], move |manager| {
                crate::manager::validate_name(&uid)?;
                let existed = manager.status(&uid).is_ok();
                manager.delete(&uid)?;
                Ok(existed)
            })
            .await?;
        Ok(Response::new(pb::DeleteSandboxResponse { existed }))
    }

    async fn capture_sandbox(
        &self,
        request: Request<pb::CaptureSandboxRequest>,
    ) -> Result<Response<pb::Capture>, Status> {
        let request = request.into_inner();
        let mode = convert::mode_from_pb(request.mode)?;
        let capturing = Capturing::new(&self.capturing, &request.sandbox_uid);
        let capture = self
            .blocking(
                vec![exclusive("capture", &request.capture_uid)],
                move |manager| {
                    let capture = manager.capture(
                        &request.sandbox_uid,
                        &request.capture_uid,
                        mode,
                        false,
                        false,
                    )?;
                    Ok(capture_with_time(manager, &capture))
                },
            )
            .await;
        drop(capturing);
        Ok(Response::new(capture?))
    }

    async fn get_capture(
        &self,
        request: Request<pb::GetCaptureRequest>,
    ) -> Result<Response<pb::Capture>, Status> {
        let uid = request.into_inner().uid;
        let capture = self
            .blocking(Vec::new(), move |manager| {
                let capture = find_capture(manager, &uid)?;
                Ok(capture_with_time(manager, &capture))
            })
            .await?;
        Ok(Response::new(capture))
    }

    async fn list_captures(
        &self,
        _: Request<pb::ListCapturesRequest>,
    ) -> Result<Response<pb::ListCapturesResponse>, Status> {
        let captures = self
            .blocking(Vec::new(), |manager| {
                Ok(manager
                    .list_captures()?
                    .iter()
                    .map(|capture| capture_with_time(manager, capture))
                    .collect())
            })
            .await?;
        Ok(Response::new(pb::ListCapturesResponse { captures }))
    }

    async fn delete_capture(
        &self,
        request: Request<pb::DeleteCaptureRequest>,
    ) -> Result<Response<pb::DeleteCaptureResponse>, Status> {
        let uid = request.into_inner().uid;
        let existed = self
            .blocking(vec![exclusive("capture", &uid)], move |manager| {
                let existed = find_capture(manager, &uid).is_ok();
                manager.delete_capture(&uid)?;
                Ok(existed)
            })
            .await?;
        Ok(Response::new(pb::DeleteCaptureResponse { existed }))
    }
}

/// A request's Pod UID: empty means none.
fn pod_of(uid: &str) -> Option<String> {
    (!uid.is_empty()).then(|| uid.to_owned())
}
