//! Test fixtures: a small in-memory Kubernetes API server behind a
//! `kube::Client` that records every request, and an in-process mock node
//! agent served over a real gRPC socket.
//!
//! The fake API server implements just what the controllers use: get, list
//! with equality label selectors, create, replace with resourceVersion
//! checks, JSON patch (finalizers), server-side apply of the status
//! subresource, delete with finalizers, and Events. It does no garbage
//! collection and no watches; tests call the reconcilers directly. Unless
//! told to hold them, it also plays the scheduler and the kubelet: a Pod is
//! bound and running as soon as it is created.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Client;
use sandfork_api::agent::v1 as pb;
use serde_json::{Value, json};
use tonic::Status;

use crate::context::Clock;

/// One request the fake API server received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    /// Path without the query, e.g. `/apis/sandfork.dev/v1alpha1/namespaces/ns/sandboxes/a/status`.
    pub path: String,
    pub query: HashMap<String, String>,
    pub content_type: String,
    pub body: Value,
}

#[derive(Default)]
struct State {
    /// collection path -> name -> object
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    requests: Vec<Recorded>,
    next_uid: u64,
    resource_version: u64,
    faults: Vec<Fault>,
    /// Where created Pods are bound at once when their affinity names no
    /// node; `None`: they stay pending.
    instant_pods: Option<String>,
}

struct Fault {
    method: Method,
    suffix: String,
    code: u16,
    /// Matching requests to let through first.
    skip: u32,
    /// Matching requests to fail after that.
    times: u32,
}

#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    clock: Clock,
}

struct Target {
    collection: String,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let prefix_len = match *parts.first()? {
        "api" => 2,
        "apis" => 3,
        _ => return None,
    };
    let mut rest = &parts[prefix_len.min(parts.len())..];
    let mut collection = parts[..prefix_len].join("/");
    if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        collection = format!("{collection}/namespaces/{}", rest[1]);
        rest = &rest[2..];
    }
    let plural = rest.first()?;
    collection = format!("/{collection}/{plural}");
    Some(Target {
        collection,
        name: rest.get(1).map(|s| s.to_string()),
        subresource: rest.get(2).map(|s| s.to_string()),
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(byte) => {
                        out.push(byte);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(query: Option<&str>) -> HashMap<String, String> {
    query
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn status(code: u16, reason: &str, message: String) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

fn labels_match(object: &Value, selector: &str) -> bool {
    selector
        .split(',')
        .filter(|s| !s.is_empty())
        .all(|term| match term.split_once('=') {
            Some((key, value)) => object["metadata"]["labels"][key].as_str() == Some(value),
            None => !object["metadata"]["labels"][term].is_null(),
        })
}

impl FakeApi {
    pub fn new(clock: Clock) -> (Self, Client) {
        let api = Self {
            state: Arc::new(Mutex::new(State::default())),
            clock,
        };
        let server = api.clone();
        let service = tower::service_fn(move |request: Request<kube::client::Body>| {
            let server = server.clone();
            async move {
                let (parts, body) = request.into_parts();
                let bytes = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let body: Value = if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                        Value::String(String::from_utf8_lossy(&bytes).into_owned())
                    })
                };
                let recorded = Recorded {
                    method: parts.method.clone(),
                    path: parts.uri.path().to_string(),
                    query: parse_query(parts.uri.query()),
                    content_type: parts
                        .headers
                        .get(http::header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string(),
                    body,
                };
                let (code, value) = server.handle(recorded);
                let response = Response::builder()
                    .status(StatusCode::from_u16(code).expect("status code"))
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(bytes::Bytes::from(
                        serde_json::to_vec(&value).expect("json"),
                    )))
                    .expect("response");
                Ok::<_, Infallible>(response)
            }
        });
        let client = Client::new(service, "default");
        (api, client)
    }

    fn handle(&self, request: Recorded) -> (u16, Value) {
        let mut state = self.state.lock().expect("fake api lock");
        state.requests.push(request.clone());
        if let Some(fault) = state.faults.iter_mut().find(|f| {
            f.times > 0 && f.method == request.method && request.path.ends_with(f.suffix.as_str())
        }) {
            if fault.skip > 0 {
                fault.skip -= 1;
            } else {
                fault.times -= 1;
                let code = fault.code;
                let reason = if code == 409 {
                    "Conflict"
                } else {
                    "InternalError"
                };
                return status(code, reason, format!("injected fault {code}"));
            }
        }
        let Some(target) = parse_path(&request.path) else {
            return status(404, "NotFound", format!("no route {}", request.path));
        };
        let now = Time(self.clock.now());
        match (request.method.clone(), target.name.clone()) {
            (Method::GET, Some(name)) => match state
                .objects
                .get(&target.collection)
                .and_then(|c| c.get(&name))
            {
                Some(object) => (200, object.clone()),
                None => status(
                    404,
                    "NotFound",
                    format!("{} {name:?} not found", target.collection),
                ),
            },
            (Method::GET, None) => {
                let selector = request
                    .query
                    .get("labelSelector")
                    .cloned()
                    .unwrap_or_default();
                let items: Vec<Value> = state
                    .objects
                    .get(&target.collection)
                    .map(|c| {
                        c.values()
                            .filter(|o| labels_match(o, &selector))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                let rv = state.resource_version.to_string();
                (
                    200,
                    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": rv}, "items": items}),
                )
            }
            (Method::POST, None) => {
                let mut object = request.body.clone();
                if object["metadata"]["name"].is_null()
                    && let Some(prefix) = object["metadata"]["generateName"].as_str()
                {
                    object["metadata"]["name"] = json!(format!("{prefix}{}", state.next_uid + 1));
                }
                let name = object["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if state
                    .objects
                    .get(&target.collection)
                    .is_some_and(|c| c.contains_key(&name))
                {
                    return status(409, "AlreadyExists", format!("{name:?} already exists"));
                }
                if target.collection.ends_with("/pods")
                    && let Some(default_node) = state.instant_pods.clone()
                {
                    let node = required_node(&object).unwrap_or(default_node);
                    bind_pod(&mut object, &node);
                    run_pod(&mut object);
                }
                state.next_uid += 1;
                state.resource_version += 1;
                let meta = &mut object["metadata"];
                meta["uid"] = json!(format!("uid-{}", state.next_uid));
                meta["resourceVersion"] = json!(state.resource_version.to_string());
                meta["generation"] = json!(1);
                meta["creationTimestamp"] = serde_json::to_value(&now).expect("time");
                if let Some(ns) = target
                    .collection
                    .split("/namespaces/")
                    .nth(1)
                    .and_then(|r| r.split('/').next())
                {
                    meta["namespace"] = json!(ns);
                }
                state
                    .objects
                    .entry(target.collection.clone())
                    .or_default()
                    .insert(name, object.clone());
                (201, object)
            }
            (Method::PUT, Some(name)) => {
                let collection = state.objects.entry(target.collection.clone()).or_default();
                let Some(current) = collection.get(&name).cloned() else {
                    return status(404, "NotFound", format!("{name:?} not found"));
                };
                let mut object = request.body.clone();
                if object["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                    return status(409, "Conflict", "the object has been modified".into());
                }
                state.resource_version += 1;
                object["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
                state
                    .objects
                    .get_mut(&target.collection)
                    .expect("collection")
                    .insert(name, object.clone());
                (200, object)
            }
            (Method::PATCH, Some(name)) => {
                let Some(mut object) = state
                    .objects
                    .get(&target.collection)
                    .and_then(|c| c.get(&name))
                    .cloned()
                else {
                    return status(404, "NotFound", format!("{name:?} not found"));
                };
                let before_spec = object["spec"].clone();
                // A resourceVersion in the patch is a precondition.
                let expected = &request.body["metadata"]["resourceVersion"];
                if (request.content_type == "application/apply-patch+yaml"
                    || request.content_type == "application/merge-patch+json")
                    && !expected.is_null()
                    && *expected != object["metadata"]["resourceVersion"]
                {
                    return status(409, "Conflict", "the object has been modified; please apply your changes to the latest version".into());
                }
                match request.content_type.as_str() {
                    "application/apply-patch+yaml"
                        if target.subresource.as_deref() == Some("status") =>
                    {
                        object["status"] = request.body["status"].clone();
                    }
                    "application/json-patch+json" => {
                        let patch: json_patch::Patch =
                            match serde_json::from_value(request.body.clone()) {
                                Ok(patch) => patch,
                                Err(err) => return status(400, "BadRequest", err.to_string()),
                            };
                        // Like the API server's JSON patch, a missing field tests equal to null.
                        if object["metadata"].get("finalizers").is_none() {
                            object["metadata"]["finalizers"] = Value::Null;
                        }
                        if let Err(err) = json_patch::patch(&mut object, &patch) {
                            return status(422, "Invalid", err.to_string());
                        }
                        if object["metadata"]["finalizers"].is_null()
                            && let Some(meta) = object["metadata"].as_object_mut()
                        {
                            meta.remove("finalizers");
                        }
                    }
                    "application/merge-patch+json" | "application/apply-patch+yaml" => {
                        json_patch::merge(&mut object, &request.body);
                    }
                    other => return status(415, "UnsupportedMediaType", other.to_string()),
                }
                if object["spec"] != before_spec {
                    let generation = object["metadata"]["generation"].as_i64().unwrap_or(1);
                    object["metadata"]["generation"] = json!(generation + 1);
                }
                state.resource_version += 1;
                object["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
                let gone = !object["metadata"]["deletionTimestamp"].is_null()
                    && object["metadata"]["finalizers"]
                        .as_array()
                        .is_none_or(|f| f.is_empty());
                let collection = state
                    .objects
                    .get_mut(&target.collection)
                    .expect("collection");
                if gone {
                    collection.remove(&name);
                } else {
                    collection.insert(name, object.clone());
                }
                (200, object)
            }
            (Method::DELETE, Some(name)) => {
                let Some(collection) = state.objects.get_mut(&target.collection) else {
                    return status(404, "NotFound", format!("{name:?} not found"));
                };
                let Some(object) = collection.get_mut(&name) else {
                    return status(404, "NotFound", format!("{name:?} not found"));
                };
                for field in ["uid", "resourceVersion"] {
                    let expected = &request.body["preconditions"][field];
                    if !expected.is_null() && *expected != object["metadata"][field] {
                        return status(
                            409,
                            "Conflict",
                            format!("Precondition failed: {field} {expected}"),
                        );
                    }
                }
                if object["metadata"]["finalizers"]
                    .as_array()
                    .is_some_and(|f| !f.is_empty())
                {
                    if object["metadata"]["deletionTimestamp"].is_null() {
                        object["metadata"]["deletionTimestamp"] =
                            serde_json::to_value(&now).expect("time");
                    }
                    (200, object.clone())
                } else {
                    let object = collection.remove(&name).expect("present");
                    (200, object)
                }
            }
            (method, _) => status(
                405,
                "MethodNotAllowed",
                format!("{method} {}", request.path),
            ),
        }
    }

    /// Stores `object` as if created through the API (uid, generation,
    /// creationTimestamp, resourceVersion filled in when missing).
    pub fn insert<K: serde::Serialize + kube::Resource<DynamicType = ()>>(
        &self,
        object: &K,
    ) -> Value {
        let mut value = serde_json::to_value(object).expect("serializable");
        let mut state = self.state.lock().expect("fake api lock");
        state.next_uid += 1;
        state.resource_version += 1;
        let uid = format!("uid-{}", state.next_uid);
        let rv = state.resource_version.to_string();
        let meta = &mut value["metadata"];
        if meta["uid"].is_null() {
            meta["uid"] = json!(uid);
        }
        if meta["generation"].is_null() {
            meta["generation"] = json!(1);
        }
        if meta["creationTimestamp"].is_null() {
            meta["creationTimestamp"] = serde_json::to_value(Time(self.clock.now())).expect("time");
        }
        meta["resourceVersion"] = json!(rv);
        let collection = collection_of::<K>(object.meta().namespace.as_deref());
        let name = object.meta().name.clone().expect("named object");
        state
            .objects
            .entry(collection)
            .or_default()
            .insert(name, value.clone());
        value
    }

    /// The stored object, deserialized.
    pub fn get<K: serde::de::DeserializeOwned + kube::Resource<DynamicType = ()>>(
        &self,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<K> {
        let state = self.state.lock().expect("fake api lock");
        let value = state
            .objects
            .get(&collection_of::<K>(namespace))?
            .get(name)?
            .clone();
        Some(serde_json::from_value(value).expect("stored object deserializes"))
    }

    /// Every stored object of kind `K` in `namespace`.
    pub fn list<K: serde::de::DeserializeOwned + kube::Resource<DynamicType = ()>>(
        &self,
        namespace: Option<&str>,
    ) -> Vec<K> {
        let state = self.state.lock().expect("fake api lock");
        state
            .objects
            .get(&collection_of::<K>(namespace))
            .map(|c| {
                c.values()
                    .map(|v| serde_json::from_value(v.clone()).expect("stored object deserializes"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Edits a stored object in place.
    pub fn edit<K: kube::Resource<DynamicType = ()>>(
        &self,
        namespace: Option<&str>,
        name: &str,
        edit: impl FnOnce(&mut Value),
    ) {
        let mut state = self.state.lock().expect("fake api lock");
        let object = state
            .objects
            .get_mut(&collection_of::<K>(namespace))
            .and_then(|c| c.get_mut(name))
            .expect("object to edit exists");
        edit(object);
    }

    /// Created Pods are bound to `node` (or the one their affinity
    /// requires) and running at once.
    pub fn run_pods_at_once(&self, node: &str) {
        self.state.lock().expect("fake api lock").instant_pods = Some(node.to_string());
    }

    /// Created Pods stay unbound and pending until a test edits them.
    pub fn hold_pods(&self) {
        self.state.lock().expect("fake api lock").instant_pods = None;
    }

    /// Removes a stored object at once, as the API server does once its
    /// finalizers are gone.
    pub fn remove<K: kube::Resource<DynamicType = ()>>(&self, namespace: Option<&str>, name: &str) {
        let mut state = self.state.lock().expect("fake api lock");
        state
            .objects
            .get_mut(&collection_of::<K>(namespace))
            .and_then(|c| c.remove(name))
            .expect("object to remove exists");
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().expect("fake api lock").requests.clone()
    }

    pub fn clear_requests(&self) {
        self.state.lock().expect("fake api lock").requests.clear();
    }

    /// Makes the next `times` requests `method` to a path ending in `suffix` fail with `code`.
    pub fn fail(&self, method: Method, suffix: &str, code: u16, times: u32) {
        self.fail_after(method, suffix, code, 0, times);
    }

    /// Like `fail`, after letting `skip` matching requests through.
    pub fn fail_after(&self, method: Method, suffix: &str, code: u16, skip: u32, times: u32) {
        self.state
            .lock()
            .expect("fake api lock")
            .faults
            .push(Fault {
                method,
                suffix: suffix.to_string(),
                code,
                skip,
                times,
            });
    }
}

/// The node a Pod's required node affinity names by `metadata.name`.
pub fn required_node(pod: &Value) -> Option<String> {
    let terms = pod["spec"]["affinity"]["nodeAffinity"]
        ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        .as_array()?;
    terms.iter().find_map(|term| {
        term["matchFields"].as_array()?.iter().find_map(|field| {
            (field["key"] == "metadata.name" && field["operator"] == "In")
                .then(|| field["values"][0].as_str().map(String::from))
                .flatten()
        })
    })
}

/// Binds a Pod to `node`, as the scheduler does.
pub fn bind_pod(pod: &mut Value, node: &str) {
    pod["spec"]["nodeName"] = json!(node);
    pod["status"]["phase"] = json!("Pending");
    pod["status"]["conditions"] = json!([{"type": "PodScheduled", "status": "True"}]);
}

/// Runs a bound Pod's containers, as the kubelet does; they are ready.
pub fn run_pod(pod: &mut Value) {
    pod["status"]["phase"] = json!("Running");
    pod["status"]["conditions"] = json!([
        {"type": "PodScheduled", "status": "True"},
        {"type": "Ready", "status": "True"},
    ]);
    pod["status"]["containerStatuses"] = json!([{
        "name": "vmm", "image": "sandfork/agent", "imageID": "", "ready": true,
        "restartCount": 0, "state": {"running": {"startedAt": "2026-03-01T12:00:00Z"}},
    }]);
}

/// The collection path of kind `K`.
pub fn collection_of<K: kube::Resource<DynamicType = ()>>(namespace: Option<&str>) -> String {
    let group = K::group(&());
    let version = K::version(&());
    let plural = K::plural(&());
    let prefix = if group.is_empty() {
        format!("/api/{version}")
    } else {
        format!("/apis/{group}/{version}")
    };
    match namespace {
        Some(ns) => format!("{prefix}/namespaces/{ns}/{plural}"),
        None => format!("{prefix}/{plural}"),
    }
}

/// A node agent that keeps sandboxes and captures in memory and records
/// every call.
#[derive(Default)]
pub struct MockAgent {
    pub state: Mutex<AgentState>,
}

#[derive(Default)]
pub struct AgentState {
    pub sandboxes: BTreeMap<String, pb::Sandbox>,
    pub captures: BTreeMap<String, pb::Capture>,
    /// `method uid` of every call.
    pub calls: Vec<String>,
    /// The Pod UID each sandbox was started in, by sandbox UID.
    pub pod_uids: BTreeMap<String, String>,
    /// Errors to return from the next calls of a method, by method name.
    pub faults: HashMap<&'static str, Vec<Status>>,
    /// New sandboxes start in this state.
    pub start_state: Option<pb::SandboxState>,
    /// Sandboxes reported as being captured.
    pub busy: std::collections::BTreeSet<String>,
    /// New captures answer at the pause, their copy still going on, as a
    /// live capture does; `finish_copy` completes one.
    pub copy_in_background: bool,
}

impl MockAgent {
    fn enter(
        &self,
        method: &'static str,
        uid: &str,
    ) -> Result<std::sync::MutexGuard<'_, AgentState>, Status> {
        let mut state = self.state.lock().expect("agent lock");
        state.calls.push(format!("{method} {uid}"));
        if let Some(faults) = state.faults.get_mut(method)
            && !faults.is_empty()
        {
            return Err(faults.remove(0));
        }
        Ok(state)
    }

    pub fn calls(&self) -> Vec<String> {
        self.state.lock().expect("agent lock").calls.clone()
    }

    /// Completes a capture's background copy, as taking `copy_ns`.
    pub fn finish_copy(&self, uid: &str, copy_ns: u64) {
        let mut state = self.state.lock().unwrap();
        let capture = state.captures.get_mut(uid).expect("the capture exists");
        capture.memory_complete = true;
        if let Some(stats) = capture.stats.as_mut() {
            stats.copy_ns = copy_ns;
        }
    }

    pub fn fail_next(&self, method: &'static str, status: Status) {
        self.state
            .lock()
            .expect("agent lock")
            .faults
            .entry(method)
            .or_default()
            .push(status);
    }
}

#[tonic::async_trait]
impl pb::agent_server::Agent for MockAgent {
    async fn get_info(
        &self,
        _: tonic::Request<pb::GetInfoRequest>,
    ) -> Result<tonic::Response<pb::AgentInfo>, Status> {
        let _state = self.enter("GetInfo", "")?;
        Ok(tonic::Response::new(pb::AgentInfo {
            node_name: "node-a".into(),
            kvm_ok: true,
            userfaultfd_ok: true,
            ..Default::default()
        }))
    }

    async fn create_sandbox(
        &self,
        request: tonic::Request<pb::CreateSandboxRequest>,
    ) -> Result<tonic::Response<pb::Sandbox>, Status> {
        let request = request.into_inner();
        let mut state = self.enter("CreateSandbox", &request.uid)?;
        state
            .pod_uids
            .insert(request.uid.clone(), request.pod_uid.clone());
        let start_state = state.start_state.unwrap_or(pb::SandboxState::Running);
        let sandbox = state
            .sandboxes
            .entry(request.uid.clone())
            .or_insert_with(|| pb::Sandbox {
                uid: request.uid.clone(),
                state: start_state as i32,
                pid: Some(4242),
                memory_mib: request.memory_mib,
                vcpus: request.vcpus,
                workload: request.workload,
                ..Default::default()
            })
            .clone();
        Ok(tonic::Response::new(sandbox))
    }

    async fn restore_branch(
        &self,
        request: tonic::Request<pb::RestoreBranchRequest>,
    ) -> Result<tonic::Response<pb::Sandbox>, Status> {
        let request = request.into_inner();
        let mut state = self.enter("RestoreBranch", &request.uid)?;
        state
            .pod_uids
            .insert(request.uid.clone(), request.pod_uid.clone());
        let capture = found(&state.captures, "capture", &request.capture_uid)?;
        let start_state = state.start_state.unwrap_or(pb::SandboxState::Running);
        let sandbox = state
            .sandboxes
            .entry(request.uid.clone())
            .or_insert_with(|| pb::Sandbox {
                uid: request.uid.clone(),
                state: start_state as i32,
                pid: Some(4343),
                memory_mib: capture.memory_bytes >> 20,
                capture_uid: request.capture_uid.clone(),
                ..Default::default()
            })
            .clone();
        Ok(tonic::Response::new(sandbox))
    }

    async fn get_sandbox(
        &self,
        request: tonic::Request<pb::GetSandboxRequest>,
    ) -> Result<tonic::Response<pb::Sandbox>, Status> {
        let request = request.into_inner();
        let state = self.enter("GetSandbox", &request.uid)?;
        if state.busy.contains(&request.uid) {
            return Ok(tonic::Response::new(pb::Sandbox {
                uid: request.uid.clone(),
                state: pb::SandboxState::Unknown as i32,
                ..Default::default()
            }));
        }
        found(&state.sandboxes, "sandbox", &request.uid).map(tonic::Response::new)
    }

    async fn list_sandboxes(
        &self,
        _: tonic::Request<pb::ListSandboxesRequest>,
    ) -> Result<tonic::Response<pb::ListSandboxesResponse>, Status> {
        let state = self.enter("ListSandboxes", "")?;
        Ok(tonic::Response::new(pb::ListSandboxesResponse {
            sandboxes: state.sandboxes.values().cloned().collect(),
        }))
    }

    async fn delete_sandbox(
        &self,
        request: tonic::Request<pb::DeleteSandboxRequest>,
    ) -> Result<tonic::Response<pb::DeleteSandboxResponse>, Status> {
        let request = request.into_inner();
        let mut state = self.enter("DeleteSandbox", &request.uid)?;
        let existed = state.sandboxes.remove(&request.uid).is_some();
        Ok(tonic::Response::new(pb::DeleteSandboxResponse { existed }))
    }

    async fn capture_sandbox(
        &self,
        request: tonic::Request<pb::CaptureSandboxRequest>,
    ) -> Result<tonic::Response<pb::Capture>, Status> {
        let request = request.into_inner();
        let mut state = self.enter("CaptureSandbox", &request.capture_uid)?;
        if let Some(capture) = state.captures.get(&request.capture_uid) {
            return Ok(tonic::Response::new(capture.clone()));
        }
        let source = found(&state.sandboxes, "sandbox", &request.sandbox_uid)?;
        let capture = pb::Capture {
            uid: request.capture_uid.clone(),
            sandbox_uid: request.sandbox_uid.clone(),
            memory_bytes: source.memory_mib << 20,
            mode: request.mode,
            captured_at_unix_micros: 1_700_000_000_000_000,
            stats: Some(pb::CaptureStats {
                pause_ns: 412_000,
                arm_ns: 300_000,
                copy_ns: 35_000_000,
                bytes: source.memory_mib << 20,
                pages_copied_by_fault_handler: 17,
                pages_copied_by_copier: (source.memory_mib << 8) - 17,
                write_faults: 17,
                vcpus_stopped_ns: 250_000,
                pre_arm_ns: 30_000_000,
                zero_pages: 0,
            }),
            memory_complete: true,
        };
        let capture = if state.copy_in_background {
            let mut capture = capture;
            capture.memory_complete = false;
            if let Some(stats) = capture.stats.as_mut() {
                stats.copy_ns = 0;
            }
            capture
        } else {
            capture
        };
        state
            .captures
            .insert(request.capture_uid.clone(), capture.clone());
        Ok(tonic::Response::new(capture))
    }

    async fn get_capture(
        &self,
        request: tonic::Request<pb::GetCaptureRequest>,
    ) -> Result<tonic::Response<pb::Capture>, Status> {
        let request = request.into_inner();
        let state = self.enter("GetCapture", &request.uid)?;
        found(&state.captures, "capture", &request.uid).map(tonic::Response::new)
    }

    async fn list_captures(
        &self,
        _: tonic::Request<pb::ListCapturesRequest>,
    ) -> Result<tonic::Response<pb::ListCapturesResponse>, Status> {
        let state = self.enter("ListCaptures", "")?;
        Ok(tonic::Response::new(pb::ListCapturesResponse {
            captures: state.captures.values().cloned().collect(),
        }))
    }

    async fn delete_capture(
        &self,
        request: tonic::Request<pb::DeleteCaptureRequest>,
    ) -> Result<tonic::Response<pb::DeleteCaptureResponse>, Status> {
        let request = request.into_inner();
        let mut state = self.enter("DeleteCapture", &request.uid)?;
        let existed = state.captures.remove(&request.uid).is_some();
        Ok(tonic::Response::new(pb::DeleteCaptureResponse { existed }))
    }
}

/// The `what` keyed `uid`, or the agent's NotFound.
fn found<T: Clone>(map: &BTreeMap<String, T>, what: &str, uid: &str) -> Result<T, Status> {
    map.get(uid)
        .cloned()
        .ok_or_else(|| Status::not_found(format!("{what} {uid:?} not found")))
}

/// Serves `agent` on a loopback port in plain text; returns `host:port`.
pub async fn serve_agent(agent: Arc<MockAgent>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::agent_server::AgentServer::from_arc(agent))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr.to_string()
}
