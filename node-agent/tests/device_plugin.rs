//! The kubelet device plugin against a fake kubelet: a `Registration`
//! server on `kubelet.sock` in a temporary device-plugin directory. The
//! plugin registers there, serves `ListAndWatch` and `Allocate` on its own
//! socket as the kubelet would call them, registers again when the kubelet's
//! socket is recreated (a kubelet restart), and removes its socket when it
//! stops. No devices needed: health is given by the test.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use sandfork_api::deviceplugin::v1beta1 as api;
use sandfork_api::deviceplugin::v1beta1::device_plugin_client::DevicePluginClient;
use sandfork_api::deviceplugin::v1beta1::registration_server::{Registration, RegistrationServer};
use sandfork_node_agent::device_plugin::{self, Options};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt as _;
use tonic::transport::{Channel, Endpoint, Server, Uri};
use tonic::{Request, Response, Status};

const WAIT: Duration = Duration::from_secs(10);

/// Records every registration.
struct FakeKubelet {
    registered: mpsc::UnboundedSender<api::RegisterRequest>,
}

#[tonic::async_trait]
impl Registration for FakeKubelet {
    async fn register(
        &self,
        request: Request<api::RegisterRequest>,
    ) -> Result<Response<api::Empty>, Status> {
        let _ = self.registered.send(request.into_inner());
        Ok(Response::new(api::Empty {}))
    }
}

/// A fake kubelet serving on `dir/kubelet.sock` until the sender is dropped or sent.
fn start_kubelet(
    dir: &Path,
    registered: &mpsc::UnboundedSender<api::RegisterRequest>,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let listener = UnixListener::bind(dir.join("kubelet.sock")).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let kubelet = FakeKubelet {
        registered: registered.clone(),
    };
    let task = tokio::spawn(async move {
        Server::builder()
            .add_service(RegistrationServer::new(kubelet))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .unwrap();
    });
    (stop, task)
}

async fn unix_channel(path: PathBuf) -> Channel {
    Endpoint::from_static("http://plugin")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .unwrap()
}

async fn next_registration(
    registered: &mut mpsc::UnboundedReceiver<api::RegisterRequest>,
) -> api::RegisterRequest {
    tokio::time::timeout(WAIT, registered.recv())
        .await
        .expect("the plugin registers in time")
        .unwrap()
}

/// Checks what the plugin at `socket` serves: 4 devices with `health`, and
/// both device files for an allocation.
async fn check_plugin(socket: PathBuf, health: &str) {
    let mut client = DevicePluginClient::new(unix_channel(socket).await);
    let mut stream = client
        .list_and_watch(api::Empty {})
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(WAIT, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let devices: Vec<(&str, &str)> = first
        .devices
        .iter()
        .map(|device| (device.id.as_str(), device.health.as_str()))
        .collect();
    assert_eq!(
        devices,
        [
            ("kvm-0", health),
            ("kvm-1", health),
            ("kvm-2", health),
            ("kvm-3", health)
        ]
    );
    let response = client
        .allocate(api::AllocateRequest {
            container_requests: vec![api::ContainerAllocateRequest {
                devices_ids: vec!["kvm-2".into()],
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.container_responses.len(), 1);
    let container = &response.container_responses[0];
    let specs: Vec<(&str, &str, &str)> = container
        .devices
        .iter()
        .map(|spec| {
            (
                spec.container_path.as_str(),
                spec.host_path.as_str(),
                spec.permissions.as_str(),
            )
        })
        .collect();
    assert_eq!(
        specs,
        [
            ("/dev/kvm", "/dev/kvm", "rw"),
            ("/dev/userfaultfd", "/dev/userfaultfd", "rw")
        ]
    );
    assert!(container.mounts.is_empty() && container.envs.is_empty());
    let unknown = client
        .allocate(api::AllocateRequest {
            container_requests: vec![api::ContainerAllocateRequest {
                devices_ids: vec!["kvm-4".into()],
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_serves_and_registers_again_after_a_kubelet_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (registered_tx, mut registered) = mpsc::unbounded_channel();
    let (kubelet_stop, kubelet) = start_kubelet(dir.path(), &registered_tx);

    let options = Options {
        poll_interval: Duration::from_millis(50),
        health_interval: Duration::from_millis(50),
        ..Options::new(dir.path(), 4)
    };
    let socket = options.socket();
    let healthy = Arc::new(AtomicBool::new(true));
    let (plugin_stop, plugin_stopped) = oneshot::channel::<()>();
    let plugin = tokio::spawn(device_plugin::run(
        options,
        {
            let healthy = healthy.clone();
            move || healthy.load(Ordering::SeqCst)
        },
        async {
            let _ = plugin_stopped.await;
        },
    ));

    let request = next_registration(&mut registered).await;
    assert_eq!(request.version, "v1beta1");
    assert_eq!(request.resource_name, "sandfork.dev/kvm");
    assert_eq!(request.endpoint, "sandfork-kvm.sock");
    assert_eq!(dir.path().join(&request.endpoint), socket);
    check_plugin(socket.clone(), "Healthy").await;

    // Health changes reach an open ListAndWatch.
    let mut client = DevicePluginClient::new(unix_channel(socket.clone()).await);
    let mut stream = client
        .list_and_watch(api::Empty {})
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert!(
        first
            .devices
            .iter()
            .all(|device| device.health == "Healthy")
    );
    healthy.store(false, Ordering::SeqCst);
    let update = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("a health change is streamed")
        .unwrap()
        .unwrap();
    assert_eq!(update.devices.len(), 4);
    assert!(
        update
            .devices
            .iter()
            .all(|device| device.health == "Unhealthy")
    );
    healthy.store(true, Ordering::SeqCst);
    drop(stream);

    // Registered once: no registration while the kubelet's socket stays.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(registered.try_recv().is_err(), "registered twice");

    // The kubelet restarts: its socket is removed and made anew.
    kubelet_stop.send(()).unwrap();
    kubelet.await.unwrap();
    std::fs::remove_file(dir.path().join("kubelet.sock")).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (kubelet_stop, kubelet) = start_kubelet(dir.path(), &registered_tx);
    let again = next_registration(&mut registered).await;
    assert_eq!(again, request);
    check_plugin(socket.clone(), "Healthy").await;

    // A real kubelet also removes the plugins' sockets when it starts.
    kubelet_stop.send(()).unwrap();
    kubelet.await.unwrap();
    std::fs::remove_file(dir.path().join("kubelet.sock")).unwrap();
    std::fs::remove_file(&socket).unwrap();
    let (kubelet_stop, kubelet) = start_kubelet(dir.path(), &registered_tx);
    let third = next_registration(&mut registered).await;
    assert_eq!(third, request);
    assert!(socket.exists(), "the plugin listens again");
    check_plugin(socket.clone(), "Healthy").await;

    plugin_stop.send(()).unwrap();
    tokio::time::timeout(WAIT, plugin)
        .await
        .expect("the plugin stops")
        .unwrap()
        .unwrap();
    assert!(!socket.exists(), "the plugin removes its socket");
    kubelet_stop.send(()).unwrap();
    kubelet.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_a_kubelet_that_is_not_there_yet() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        poll_interval: Duration::from_millis(50),
        ..Options::new(dir.path(), 4)
    };
    let socket = options.socket();
    let (plugin_stop, plugin_stopped) = oneshot::channel::<()>();
    let plugin = tokio::spawn(device_plugin::run(options, || true, async {
        let _ = plugin_stopped.await;
    }));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        socket.exists(),
        "the plugin listens before the kubelet is up"
    );
    let (registered_tx, mut registered) = mpsc::unbounded_channel();
    let (kubelet_stop, kubelet) = start_kubelet(dir.path(), &registered_tx);
    let request = next_registration(&mut registered).await;
    assert_eq!(request.resource_name, "sandfork.dev/kvm");
    plugin_stop.send(()).unwrap();
    tokio::time::timeout(WAIT, plugin)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!socket.exists());
    kubelet_stop.send(()).unwrap();
    kubelet.await.unwrap();
}
