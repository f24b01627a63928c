//! The agent's gRPC service: called in-process, and over a real TCP socket
//! with mutual TLS, with real VMs. Tests that start VMs need /dev/kvm and
//! /dev/userfaultfd: without them they say why they skip, and under CI
//! (or SANDFORK_REQUIRE_DEVICES=1) they fail.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sandfork_api::agent::DEFAULT_TLS_SERVER_NAME;
use sandfork_api::agent::v1 as pb;
use sandfork_api::agent::v1::agent_client::AgentClient;
use sandfork_api::agent::v1::agent_server::Agent;
use sandfork_api::test_pki::{Pem, TestCa};
use sandfork_node_agent::service::{AgentService, Capacity, ServeConfig};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request};

const AGENT: &str = env!("CARGO_BIN_EXE_sandfork-agent");

use common::StateDir;

fn service(state: &StateDir, max_sandboxes: u32) -> AgentService {
    AgentService::new(
        state.manager(),
        "node-a".into(),
        Capacity {
            memory_mib: 4096,
            max_sandboxes,
        },
    )
}

fn counter() -> Option<pb::Workload> {
    Some(pb::Workload {
        kind: Some(pb::workload::Kind::Counter(pb::Counter {})),
    })
}

fn create(uid: &str, memory_mib: u64) -> pb::CreateSandboxRequest {
    pb::CreateSandboxRequest {
        uid: uid.into(),
        memory_mib,
        vcpus: 1,
        workload: counter(),
        ..Default::default()
    }
}

fn code<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> (Code, String) {
    let status = result.unwrap_err();
    (status.code(), status.message().to_string())
}

#[tokio::test]
async fn bad_requests_get_the_right_codes_in_process() {
    let state = StateDir::new();
    let agent = service(&state, 8);

    let (c, message) = code(
        agent
            .get_sandbox(Request::new(pb::GetSandboxRequest { uid: "nope".into() }))
            .await,
    );
    assert_eq!(c, Code::NotFound, "{message}");
    assert!(message.contains("\"nope\""), "{message}");

    let (c, message) = code(
        agent
            .create_sandbox(Request::new(create("Not_A_Uid", 64)))
            .await,
    );
    assert_eq!(c, Code::InvalidArgument, "{message}");

    let mut many = create("many", 64);
    many.vcpus = 300;
    let (c, message) = code(agent.create_sandbox(Request::new(many)).await);
    assert_eq!(c, Code::InvalidArgument, "{message}");

    let mut odd = create("odd", 65);
    odd.memory_mib = 65;
    assert_eq!(
        code(agent.create_sandbox(Request::new(odd)).await).0,
        Code::InvalidArgument
    );

    let (c, message) = code(
        agent
            .create_sandbox(Request::new(create("huge", 200 << 10)))
            .await,
    );
    assert_eq!(c, Code::ResourceExhausted, "{message}");
    assert!(message.contains("exceeds what this host has"), "{message}");

    let mut no_workload = create("empty", 64);
    no_workload.workload = None;
    let (c, message) = code(agent.create_sandbox(Request::new(no_workload)).await);
    assert_eq!(c, Code::InvalidArgument);
    assert!(message.contains("workload is required"), "{message}");

    let (c, _) = code(
        agent
            .restore_branch(Request::new(pb::RestoreBranchRequest {
                uid: "b".into(),
                capture_uid: "no-capture".into(),
                ..Default::default()
            }))
            .await,
    );
    assert_eq!(c, Code::NotFound);

    let (c, _) = code(
        agent
            .capture_sandbox(Request::new(pb::CaptureSandboxRequest {
                sandbox_uid: "no-sandbox".into(),
                capture_uid: "c".into(),
                mode: pb::CaptureMode::Live as i32,
            }))
            .await,
    );
    assert_eq!(c, Code::NotFound);

    let (c, _) = code(
        agent
            .capture_sandbox(Request::new(pb::CaptureSandboxRequest {
                sandbox_uid: "s".into(),
                capture_uid: "c".into(),
                mode: 42,
            }))
            .await,
    );
    assert_eq!(c, Code::InvalidArgument);

    // Deleting what does not exist succeeds.
    let deleted = agent
        .delete_sandbox(Request::new(pb::DeleteSandboxRequest {
            uid: "nope".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(!deleted.existed);
    let deleted = agent
        .delete_capture(Request::new(pb::DeleteCaptureRequest {
            uid: "nope".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(!deleted.existed);

    let info = agent
        .get_info(Request::new(pb::GetInfoRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_name, "node-a");
    assert_eq!(info.memory_capacity_mib, 4096);
    assert_eq!(info.max_sandboxes, 8);
    assert_eq!(info.sandboxes, 0);
}

/// Waits until the sandbox's vCPU 0 has reported at least `at_least` times.
async fn wait_reports(agent: &mut AgentClient<Channel>, uid: &str, at_least: u64) -> pb::Sandbox {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let sandbox = agent
            .get_sandbox(pb::GetSandboxRequest { uid: uid.into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            sandbox.state,
            pb::SandboxState::Running as i32,
            "{sandbox:?}"
        );
        if sandbox
            .vcpu_reports
            .first()
            .is_some_and(|r| r.count >= at_least)
        {
            return sandbox;
        }
        assert!(
            Instant::now() < deadline,
            "no reports from {uid}: {sandbox:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Pki {
    ca: TestCa,
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        Self {
            ca: TestCa::new("sandfork test CA"),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// Starts the real server (TLS, no registration) on a loopback port.
async fn start_server(
    pki: &Pki,
    state: &StateDir,
    max_sandboxes: u32,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), sandfork_node_agent::service::ServeError>>,
) {
    let server = pki.ca.server(&[DEFAULT_TLS_SERVER_NAME]);
    let config = ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        health_listen: None,
        advertise: None,
        node_name: "node-a".into(),
        tls_cert: pki.write("tls.crt", &server.cert),
        tls_key: pki.write("tls.key", &server.key),
        tls_client_ca: pki.write("ca.crt", &pki.ca.cert),
        tls_client_name: "sandfork-operator".into(),
        namespace: "sandfork-system".into(),
        register: false,
        lease_duration_seconds: 40,
        lease_renew_seconds: 10,
        memory_mib: Some(4096),
        reserved_memory_mib: 0,
        max_sandboxes,
        pod_ip: None,
        pod_name: None,
        pod_uid: None,
        agent_binary: Some(AGENT.into()),
        kubelet_pods_dir: sandfork_node_agent::manager::KUBELET_PODS_DIR.into(),
        capture_memory_mib: None,
        device_plugin: sandfork_node_agent::device_plugin::DevicePluginArgs {
            enabled: false,
            dir: PathBuf::from("/nonexistent"),
        },
        state_dir: PathBuf::new(),
    }
    .with_state_dir(state.path());
    let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
    let endpoint = config
        .advertised_endpoint(listener.local_addr().unwrap())
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(sandfork_node_agent::service::serve_on(
        config,
        listener,
        async {
            let _ = stopped.await;
        },
    ));
    (endpoint, stop, handle)
}

async fn client(
    endpoint: &str,
    ca: &str,
    identity: Option<&Pem>,
) -> Result<AgentClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(DEFAULT_TLS_SERVER_NAME);
    if let Some(identity) = identity {
        tls = tls.identity(Identity::from_pem(&identity.cert, &identity.key));
    }
    let channel = Endpoint::from_shared(format!("https://{endpoint}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(AgentClient::new(channel))
}

async fn get_info(
    endpoint: &str,
    ca: &str,
    identity: Option<&Pem>,
) -> Result<pb::AgentInfo, String> {
    let mut agent = client(endpoint, ca, identity)
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    agent
        .get_info(pb::GetInfoRequest {})
        .await
        .map(|r| r.into_inner())
        .map_err(|e| format!("call: {e}"))
}

#[tokio::test]
async fn clients_without_a_certificate_from_the_ca_are_refused() {
    let pki = Pki::new();
    let state = StateDir::new();
    let (endpoint, stop, handle) = start_server(&pki, &state, 8).await;

    let operator = pki.ca.client("sandfork-operator");
    let info = get_info(&endpoint, &pki.ca.cert, Some(&operator))
        .await
        .expect("a client of the CA is served");
    assert_eq!(info.node_name, "node-a");

    let err = get_info(&endpoint, &pki.ca.cert, None)
        .await
        .expect_err("no client certificate");
    assert!(
        err.contains("CertificateRequired"),
        "without a client certificate: {err}"
    );

    // Another holder of a certificate from the same CA (an agent, say) is
    // not the operator.
    let other = pki.ca.client("sandfork-agent");
    let err = get_info(&endpoint, &pki.ca.cert, Some(&other))
        .await
        .expect_err("not the operator");
    assert!(err.contains("does not have permission"), "{err}");

    let rogue = TestCa::new("rogue CA").client("sandfork-operator");
    let err = get_info(&endpoint, &pki.ca.cert, Some(&rogue))
        .await
        .expect_err("client certificate from another CA");
    assert!(
        err.contains("UnknownCA"),
        "with another CA's certificate: {err}"
    );

    // Plain text is not spoken at all.
    let plain = Endpoint::from_shared(format!("http://{endpoint}"))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain {
        AgentClient::new(channel)
            .get_info(pb::GetInfoRequest {})
            .await
            .expect_err("a plain-text call is refused");
    }

    stop.send(()).unwrap();
    handle.await.unwrap().unwrap();
}

#[tokio::test]
async fn sandboxes_capture_and_branch_over_mutual_tls() {
    if !common::devices_present() {
        return;
    }
    let pki = Pki::new();
    let state = StateDir::new();
    let (endpoint, stop, handle) = start_server(&pki, &state, 3).await;
    let operator = pki.ca.client("sandfork-operator");
    let mut agent = client(&endpoint, &pki.ca.cert, Some(&operator))
        .await
        .unwrap();

    // Create is idempotent by UID; a different spec under the same UID is refused.
    let source = agent
        .create_sandbox(create("src-uid", 64))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(source.state, pb::SandboxState::Running as i32);
    let again = agent
        .create_sandbox(create("src-uid", 64))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.pid, source.pid, "no twin");
    let (c, message) = code(agent.create_sandbox(create("src-uid", 128)).await);
    assert_eq!(c, Code::AlreadyExists, "{message}");
    let before = wait_reports(&mut agent, "src-uid", 2).await;

    // Capture, twice under the same key: one capture.
    let capture = agent
        .capture_sandbox(pb::CaptureSandboxRequest {
            sandbox_uid: "src-uid".into(),
            capture_uid: "branch-uid".into(),
            mode: pb::CaptureMode::Live as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(capture.sandbox_uid, "src-uid");
    assert_eq!(capture.memory_bytes, 64 << 20);
    let stats = capture.stats.unwrap();
    assert!(stats.pause_ns > 0 && stats.bytes == 64 << 20, "{stats:?}");
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    assert!(
        (now_us - capture.captured_at_unix_micros).abs() < 120_000_000,
        "captured_at {} vs now {now_us}",
        capture.captured_at_unix_micros
    );
    let same = agent
        .capture_sandbox(pb::CaptureSandboxRequest {
            sandbox_uid: "src-uid".into(),
            capture_uid: "branch-uid".into(),
            mode: pb::CaptureMode::Live as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(same.stats.unwrap().pause_ns, stats.pause_ns);
    let captures = agent
        .list_captures(pb::ListCapturesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(captures.captures.len(), 1);

    // Restore a branch (twice: one VM) that continues from the captured state.
    let branch = agent
        .restore_branch(pb::RestoreBranchRequest {
            uid: "b0-uid".into(),
            capture_uid: "branch-uid".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(branch.capture_uid, "branch-uid");
    assert_eq!(branch.memory_mib, 64);
    let again = agent
        .restore_branch(pb::RestoreBranchRequest {
            uid: "b0-uid".into(),
            capture_uid: "branch-uid".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.pid, branch.pid);
    let branched = wait_reports(&mut agent, "b0-uid", 1).await;
    assert!(
        branched.vcpu_reports[0].value >= before.vcpu_reports[0].value,
        "the branch continues from the capture: {:?} after {:?}",
        branched.vcpu_reports,
        before.vcpu_reports
    );

    // The node's maximum (3) counts running sandboxes.
    agent.create_sandbox(create("third", 64)).await.unwrap();
    let (c, message) = code(agent.create_sandbox(create("fourth", 64)).await);
    assert_eq!(c, Code::ResourceExhausted, "{message}");

    let listed = agent
        .list_sandboxes(pb::ListSandboxesRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut uids: Vec<_> = listed.sandboxes.iter().map(|s| s.uid.as_str()).collect();
    uids.sort();
    assert_eq!(uids, vec!["b0-uid", "src-uid", "third"]);
    let info = agent
        .get_info(pb::GetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(info.kvm_ok && info.userfaultfd_ok, "{info:?}");
    assert_eq!((info.sandboxes, info.captures), (3, 1));

    // Deleting frees the VM process; deleting again reports nothing to delete.
    let pid = branch.pid.unwrap();
    for uid in ["b0-uid", "src-uid", "third"] {
        let deleted = agent
            .delete_sandbox(pb::DeleteSandboxRequest { uid: uid.into() })
            .await
            .unwrap()
            .into_inner();
        assert!(deleted.existed, "{uid}");
    }
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "branch VM process {pid} gone"
    );
    let deleted = agent
        .delete_sandbox(pb::DeleteSandboxRequest {
            uid: "src-uid".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!deleted.existed);
    let deleted = agent
        .delete_capture(pb::DeleteCaptureRequest {
            uid: "branch-uid".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.existed);
    assert_eq!(
        code(
            agent
                .get_capture(pb::GetCaptureRequest {
                    uid: "branch-uid".into()
                })
                .await
        )
        .0,
        Code::NotFound
    );

    stop.send(()).unwrap();
    handle.await.unwrap().unwrap();
}

#[tokio::test]
async fn in_process_calls_run_real_vms() {
    if !common::devices_present() {
        return;
    }
    let state = StateDir::new();
    let agent = service(&state, 8);
    let created = agent
        .create_sandbox(Request::new(create("vm-uid", 64)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.state, pb::SandboxState::Running as i32);
    assert_eq!(created.workload, counter());
    let stopped = agent
        .capture_sandbox(Request::new(pb::CaptureSandboxRequest {
            sandbox_uid: "vm-uid".into(),
            capture_uid: "cap-uid".into(),
            mode: pb::CaptureMode::StopAndCopy as i32,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stopped.mode, pb::CaptureMode::StopAndCopy as i32);
    let got = agent
        .get_capture(Request::new(pb::GetCaptureRequest {
            uid: "cap-uid".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.stats, stopped.stats);
    agent
        .delete_sandbox(Request::new(pb::DeleteSandboxRequest {
            uid: "vm-uid".into(),
        }))
        .await
        .unwrap();
}

#[tokio::test]
async fn status_during_a_capture_is_not_a_failure() {
    if !common::devices_present() {
        return;
    }
    let state = StateDir::new();
    let agent = std::sync::Arc::new(service(&state, 8));
    agent
        .create_sandbox(Request::new(create("busy-uid", 256)))
        .await
        .unwrap();
    let capturing = {
        let agent = agent.clone();
        tokio::spawn(async move {
            agent
                .capture_sandbox(Request::new(pb::CaptureSandboxRequest {
                    sandbox_uid: "busy-uid".into(),
                    capture_uid: "busy-cap".into(),
                    mode: pb::CaptureMode::StopAndCopy as i32,
                }))
                .await
        })
    };
    let mut seen = Vec::new();
    while !capturing.is_finished() {
        let sandbox = agent
            .get_sandbox(Request::new(pb::GetSandboxRequest {
                uid: "busy-uid".into(),
            }))
            .await
            .unwrap()
            .into_inner();
        seen.push(sandbox.state);
        assert_ne!(
            sandbox.state,
            pb::SandboxState::Failed as i32,
            "{}",
            sandbox.failure_reason
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    capturing.await.unwrap().unwrap();
    eprintln!(
        "{} status calls during the capture, {} answered Unknown",
        seen.len(),
        seen.iter()
            .filter(|s| **s == pb::SandboxState::Unknown as i32)
            .count()
    );
    let after = agent
        .get_sandbox(Request::new(pb::GetSandboxRequest {
            uid: "busy-uid".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.state, pb::SandboxState::Running as i32);
}
