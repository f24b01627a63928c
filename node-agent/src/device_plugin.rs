//! A kubelet device plugin for `/dev/kvm` and `/dev/userfaultfd`
//! (`k8s.io/kubelet` `pkg/apis/deviceplugin/v1beta1`), as KubeVirt's
//! virt-handler serves `/dev/kvm`.
//!
//! The kubelet grants a container a device only through a device plugin:
//! the runtime's device cgroup lets an unprivileged container open none but
//! the defaults. With this plugin the node's capacity carries
//! [`KVM_RESOURCE`] (`sandfork.dev/kvm`), one unit per sandbox the agent may
//! run, and a container whose limits ask for one unit gets both devices
//! read-write.
//!
//! [`run`] serves the `DevicePlugin` service on [`SOCKET_NAME`] in the
//! kubelet's device-plugin directory and registers with the kubelet's
//! `kubelet.sock` there. A kubelet that restarts removes every socket in
//! that directory, recreates its own and forgets its plugins, so `run`
//! checks both sockets every [`Options::poll_interval`]: when its own is
//! gone or `kubelet.sock` is a new file, it listens afresh and registers
//! again (the reference `sample-device-plugin` and KubeVirt watch the same
//! file). Device health is the agent's own check ([`crate::service::health`]),
//! repeated every [`Options::health_interval`] and streamed to the kubelet
//! through `ListAndWatch` when it changes.

use std::future::Future;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use sandfork_api::deviceplugin::KVM_RESOURCE;
use sandfork_api::deviceplugin::v1beta1 as api;
use sandfork_api::deviceplugin::v1beta1::device_plugin_server::{DevicePlugin, DevicePluginServer};
use sandfork_api::deviceplugin::v1beta1::registration_client::RegistrationClient;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::transport::{Endpoint, Server, Uri};
use tonic::{Request, Response, Status};

/// The plugin's socket in the device-plugin directory.
pub const SOCKET_NAME: &str = "sandfork-kvm.sock";
/// Devices advertised when the agent has no sandbox limit (`--max-sandboxes 0`).
pub const UNLIMITED_DEVICES: u32 = 1024;
/// Prefix of the device IDs: `kvm-0`, `kvm-1`, ...
pub const DEVICE_ID_PREFIX: &str = "kvm-";

/// `sandfork-agent serve`'s device plugin settings.
#[derive(Clone, Debug, clap::Args)]
pub struct DevicePluginArgs {
    /// Serve a kubelet device plugin for `sandfork.dev/kvm` (/dev/kvm and
    /// /dev/userfaultfd for unprivileged Pods).
    #[arg(
        long = "device-plugin",
        env = "SANDFORK_DEVICE_PLUGIN",
        default_value_t = false,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub enabled: bool,
    /// The kubelet's device-plugin directory (its `kubelet.sock` and the plugins' sockets).
    #[arg(
        long = "device-plugin-dir",
        env = "SANDFORK_DEVICE_PLUGIN_DIR",
        default_value = api::DEVICE_PLUGIN_PATH
    )]
    pub dir: PathBuf,
}

/// What [`run`] serves, where, and how often it looks again.
#[derive(Clone, Debug)]
pub struct Options {
    /// The kubelet's device-plugin directory.
    pub dir: PathBuf,
    /// Devices advertised (the agent's sandbox limit).
    pub devices: u32,
    /// How often the kubelet's socket and the plugin's are checked.
    pub poll_interval: Duration,
    /// How often device health is checked again.
    pub health_interval: Duration,
}

impl Options {
    /// The defaults for `dir` and the agent's `max_sandboxes` (0: no limit).
    pub fn new(dir: impl Into<PathBuf>, max_sandboxes: u32) -> Self {
        Self {
            dir: dir.into(),
            devices: device_count(max_sandboxes),
            poll_interval: Duration::from_secs(1),
            health_interval: Duration::from_secs(10),
        }
    }

    /// The plugin's own socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join(SOCKET_NAME)
    }

    /// The kubelet's Registration socket.
    pub fn kubelet_socket(&self) -> PathBuf {
        self.dir.join(api::KUBELET_SOCKET)
    }
}

/// What went wrong serving the plugin or registering it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot remove the old socket {path}")]
    RemoveSocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach the kubelet at {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the kubelet refused to register {resource}")]
    Register {
        resource: &'static str,
        #[source]
        status: Status,
    },
}

/// Devices to advertise for a sandbox limit (0: no limit).
pub fn device_count(max_sandboxes: u32) -> u32 {
    if max_sandboxes == 0 {
        UNLIMITED_DEVICES
    } else {
        max_sandboxes
    }
}

/// `count` devices `kvm-0`.., all Healthy or all Unhealthy: each stands for
/// the same two device files.
pub fn devices(count: u32, healthy: bool) -> Vec<api::Device> {
    let health = if healthy {
        api::HEALTHY
    } else {
        api::UNHEALTHY
    };
    (0..count)
        .map(|index| api::Device {
            id: format!("{DEVICE_ID_PREFIX}{index}"),
            health: health.to_owned(),
            topology: None,
        })
        .collect()
}

/// What the runtime gives a container, whatever units it got: both devices
/// read-write at their own paths (no `m`: it may not create device nodes).
pub fn container_devices() -> Vec<api::DeviceSpec> {
    sandfork_vmm::devices::REQUIRED
        .into_iter()
        .map(|path| api::DeviceSpec {
            container_path: path.to_owned(),
            host_path: path.to_owned(),
            permissions: "rw".to_owned(),
        })
        .collect()
}

/// The answer to Allocate: the two device specs for each container, nothing
/// else. Unknown device IDs are refused.
pub fn allocate(
    count: u32,
    request: &api::AllocateRequest,
) -> Result<api::AllocateResponse, Status> {
    let known = |id: &str| {
        id.strip_prefix(DEVICE_ID_PREFIX)
            .and_then(|index| index.parse::<u32>().ok())
            .is_some_and(|index| index < count && id == format!("{DEVICE_ID_PREFIX}{index}"))
    };
    let container_responses = request
        .container_requests
        .iter()
        .map(|container| {
            if let Some(unknown) = container.devices_ids.iter().find(|id| !known(id)) {
                return Err(Status::invalid_argument(format!(
                    "unknown device {unknown:?} of {KVM_RESOURCE}"
                )));
            }
            Ok(api::ContainerAllocateResponse {
                devices: container_devices(),
                ..Default::default()
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(api::AllocateResponse {
        container_responses,
    })
}

/// The `DevicePlugin` service: the device list follows `health`.
struct Plugin {
    count: u32,
    health: watch::Receiver<bool>,
    /// Ends every `ListAndWatch` stream when this socket's server stops.
    stop: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl DevicePlugin for Plugin {
    async fn get_device_plugin_options(
        &self,
        _: Request<api::Empty>,
    ) -> Result<Response<api::DevicePluginOptions>, Status> {
        Ok(Response::new(api::DevicePluginOptions::default()))
    }

    type ListAndWatchStream = ReceiverStream<Result<api::ListAndWatchResponse, Status>>;

    async fn list_and_watch(
        &self,
        _: Request<api::Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        let mut health = self.health.clone();
        let mut stop = self.stop.clone();
        let count = self.count;
        tokio::spawn(async move {
            loop {
                let healthy = *health.borrow_and_update();
                tracing::debug!(count, healthy, "sending the device list to the kubelet");
                let list = api::ListAndWatchResponse {
                    devices: devices(count, healthy),
                };
                if tx.send(Ok(list)).await.is_err() {
                    return;
                }
                tokio::select! {
                    changed = health.changed() => if changed.is_err() { return },
                    _ = stop.wait_for(|stop| *stop) => return,
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<api::PreferredAllocationRequest>,
    ) -> Result<Response<api::PreferredAllocationResponse>, Status> {
        // Not announced in the options; any devices do, so take the first.
        let container_responses = request
            .into_inner()
            .container_requests
            .into_iter()
            .map(|container| {
                let size = usize::try_from(container.allocation_size).unwrap_or(0);
                let mut ids = container.must_include_device_i_ds;
                for id in container.available_device_i_ds {
                    if ids.len() >= size {
                        break;
                    }
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
                api::ContainerPreferredAllocationResponse { device_i_ds: ids }
            })
            .collect();
        Ok(Response::new(api::PreferredAllocationResponse {
            container_responses,
        }))
    }

    async fn allocate(
        &self,
        request: Request<api::AllocateRequest>,
    ) -> Result<Response<api::AllocateResponse>, Status> {
        let request = request.into_inner();
        let response = allocate(self.count, &request)?;
        tracing::info!(
            devices = ?request
                .container_requests
                .iter()
                .map(|container| &container.devices_ids)
                .collect::<Vec<_>>(),
            "allocated /dev/kvm and /dev/userfaultfd"
        );
        Ok(Response::new(response))
    }

    async fn pre_start_container(
        &self,
        _: Request<api::PreStartContainerRequest>,
    ) -> Result<Response<api::PreStartContainerResponse>, Status> {
        Ok(Response::new(api::PreStartContainerResponse {}))
    }
}

/// Which file a path is now: a recreated socket is another file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
}

fn file_id(path: &Path) -> Option<FileId> {
    std::fs::symlink_metadata(path).ok().map(|meta| FileId {
        dev: meta.dev(),
        ino: meta.ino(),
        ctime: meta.ctime(),
        ctime_nsec: meta.ctime_nsec(),
    })
}

fn remove_socket(path: &Path) -> Result<(), Error> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::RemoveSocket {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Calls the kubelet's `Register` over its unix socket.
pub async fn register(options: &Options) -> Result<(), Error> {
    let path = options.kubelet_socket();
    let connect_path = path.clone();
    // The URI is not used: every connection goes to the socket.
    let channel = Endpoint::from_static("http://kubelet.sock")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = connect_path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|source| Error::Connect {
            path: path.clone(),
            source,
        })?;
    RegistrationClient::new(channel)
        .register(api::RegisterRequest {
            version: api::VERSION.to_owned(),
            endpoint: SOCKET_NAME.to_owned(),
            resource_name: KVM_RESOURCE.to_owned(),
            options: Some(api::DevicePluginOptions::default()),
        })
        .await
        .map_err(|status| Error::Register {
            resource: KVM_RESOURCE,
            status,
        })?;
    Ok(())
}

/// The plugin's server on a fresh socket, until its `stop` is sent.
struct Listening {
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    socket: FileId,
}

impl Listening {
    fn start(options: &Options, health: &watch::Receiver<bool>) -> Result<Self, Error> {
        let path = options.socket();
        remove_socket(&path)?;
        let listener = UnixListener::bind(&path).map_err(|source| Error::Listen {
            path: path.clone(),
            source,
        })?;
        let socket = file_id(&path).ok_or_else(|| Error::Listen {
            path: path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "gone after bind"),
        })?;
        let (stop, stopped) = watch::channel(false);
        let plugin = Plugin {
            count: options.devices,
            health: health.clone(),
            stop: stopped.clone(),
        };
        let mut shutdown = stopped;
        let server = tokio::spawn(
            Server::builder()
                .add_service(DevicePluginServer::new(plugin))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
                    let _ = shutdown.wait_for(|stop| *stop).await;
                }),
        );
        Ok(Self {
            stop,
            server,
            socket,
        })
    }

    /// Ends the streams and the server (the kubelet's connections with it).
    async fn stop(self) {
        let _ = self.stop.send(true);
        let mut server = self.server;
        match tokio::time::timeout(Duration::from_secs(5), &mut server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => tracing::warn!(%err, "the device plugin's server failed"),
            Ok(Err(err)) => tracing::warn!(%err, "the device plugin's server panicked"),
            Err(_) => {
                tracing::warn!("the device plugin's server did not stop in 5 s; aborting it");
                server.abort();
            }
        }
    }
}

/// Serves the plugin and keeps it registered until `shutdown` completes,
/// then removes its socket. `healthy` is called every
/// [`Options::health_interval`] (the agent passes its device check).
pub async fn run(
    options: Options,
    healthy: impl Fn() -> bool + Send + Sync + 'static,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let healthy = Arc::new(healthy);
    let (health_tx, health) = watch::channel(healthy());
    let health_task = {
        let healthy = healthy.clone();
        let interval = options.health_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let now = healthy();
                health_tx.send_if_modified(|was| {
                    let changed = *was != now;
                    if changed {
                        tracing::warn!(healthy = now, "KVM and userfaultfd health changed");
                    }
                    *was = now;
                    changed
                });
            }
        })
    };
    let result = serve_registered(&options, &health, shutdown).await;
    health_task.abort();
    result
}

async fn serve_registered(
    options: &Options,
    health: &watch::Receiver<bool>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    tokio::pin!(shutdown);
    let mut listening = Listening::start(options, health)?;
    // The kubelet's socket when it accepted the registration.
    let mut registered: Option<FileId> = None;
    let mut last_error: Option<String> = None;
    let mut tick = tokio::time::interval(options.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = tick.tick() => {}
        }
        let kubelet = file_id(&options.kubelet_socket());
        let ours = file_id(&options.socket());
        if ours != Some(listening.socket) {
            // A restarting kubelet removes every socket in the directory.
            tracing::info!(socket = %options.socket().display(), "the device plugin's socket is gone; listening again");
            listening.stop().await;
            listening = Listening::start(options, health)?;
            registered = None;
        }
        let Some(kubelet) = kubelet else {
            if registered.take().is_some() {
                tracing::info!("the kubelet's socket is gone; registering again when it is back");
            }
            continue;
        };
        if registered == Some(kubelet) {
            continue;
        }
        if registered.is_some() {
            // The kubelet restarted: it forgot the plugin and its connections.
            tracing::info!("the kubelet's socket is new; registering again");
            listening.stop().await;
            listening = Listening::start(options, health)?;
        }
        match register(options).await {
            Ok(()) => {
                tracing::info!(
                    resource = KVM_RESOURCE,
                    devices = options.devices,
                    endpoint = %options.socket().display(),
                    "registered the device plugin with the kubelet"
                );
                registered = Some(kubelet);
                last_error = None;
            }
            Err(err) => {
                let message = sandfork_vmm::error::chain(&err);
                // Once per distinct failure, not every poll.
                if last_error.as_deref() != Some(message.as_str()) {
                    tracing::warn!(err = message, "cannot register the device plugin; retrying");
                    last_error = Some(message);
                }
                registered = None;
            }
        }
    }
    listening.stop().await;
    remove_socket(&options.socket())?;
    tracing::info!("device plugin stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_device_per_sandbox_all_of_one_health() {
        let healthy = devices(3, true);
        let ids: Vec<&str> = healthy.iter().map(|device| device.id.as_str()).collect();
        assert_eq!(ids, ["kvm-0", "kvm-1", "kvm-2"]);
        assert!(healthy.iter().all(|device| device.health == "Healthy"));
        assert!(
            devices(2, false)
                .iter()
                .all(|device| device.health == "Unhealthy")
        );
        assert_eq!(device_count(64), 64);
        assert_eq!(device_count(0), UNLIMITED_DEVICES);
        assert_eq!(devices(device_count(64), true).len(), 64);
    }

    #[test]
    fn allocate_gives_each_container_both_devices_read_write() {
        let request = api::AllocateRequest {
            container_requests: vec![
                api::ContainerAllocateRequest {
                    devices_ids: vec!["kvm-0".into()],
                },
                api::ContainerAllocateRequest {
                    devices_ids: vec!["kvm-1".into(), "kvm-3".into()],
                },
            ],
        };
        let response = allocate(4, &request).unwrap();
        assert_eq!(response.container_responses.len(), 2);
        for container in &response.container_responses {
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
            assert!(container.mounts.is_empty());
            assert!(container.envs.is_empty());
            assert!(container.annotations.is_empty());
            assert!(container.cdi_devices.is_empty());
        }
    }

    #[test]
    fn allocate_refuses_devices_it_does_not_have() {
        for id in ["kvm-4", "gpu-0", "kvm-01", "kvm-"] {
            let request = api::AllocateRequest {
                container_requests: vec![api::ContainerAllocateRequest {
                    devices_ids: vec![id.into()],
                }],
            };
            let status = allocate(4, &request).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{id}");
        }
    }

    #[test]
    fn the_flag_is_off_unless_given() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            plugin: DevicePluginArgs,
        }
        let parse = |args: &[&str]| {
            <Cli as clap::Parser>::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
                .unwrap()
                .plugin
        };
        // Only when the environment does not turn it on.
        if std::env::var_os("SANDFORK_DEVICE_PLUGIN").is_none() {
            assert!(!parse(&[]).enabled);
        }
        assert!(parse(&["--device-plugin"]).enabled);
        assert!(!parse(&["--device-plugin=false"]).enabled);
        let dir = parse(&["--device-plugin-dir", "/tmp/dp"]).dir;
        assert_eq!(dir, PathBuf::from("/tmp/dp"));
    }
}
