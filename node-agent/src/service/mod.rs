//! The agent's gRPC service (`sandfork.agent.v1.Agent`) over mutual TLS,
//! and its registration with the cluster (a Lease per node).
//!
//! `sandfork-agent serve` runs [`serve`]: it opens the state directory
//! (adopting VMs that kept running while the agent was away), listens for
//! the operator with TLS that requires a client certificate signed by the
//! configured CA, and renews the node's Lease.

pub mod auth;
pub mod convert;
pub mod health;
pub mod lease;
pub mod probes;
pub mod server;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use sandfork_api::agent::v1::agent_server::AgentServer;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

pub use health::Capacity;

/// Why the agent could not start serving, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the node name is empty: set NODE_NAME or --node-name")]
    NoNodeName,
    #[error(
        "listening on a wildcard address: set --advertise (or POD_IP) to the address the operator should dial"
    )]
    NoAdvertisedAddress,
    #[error("reading the {what} {path}")]
    ReadTls {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: crate::manager::ManagerError,
    },
    #[error("{what} {addr}")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("finding Kubernetes credentials to register (use --register=false to run without)")]
    Credentials(#[source] kube::config::InferConfigError),
    #[error("building the Kubernetes client")]
    Client(#[source] kube::Error),
    #[error("writing the Lease {name} in namespace {namespace}")]
    Register {
        name: String,
        namespace: String,
        #[source]
        source: kube::Error,
    },
    #[error("serving gRPC")]
    Grpc(#[source] tonic::transport::Error),
}
pub use server::AgentService;

use crate::manager::Manager;

/// `sandfork-agent serve`: how to listen, whom to trust, where to register.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeConfig {
    /// Address the gRPC service listens on.
    #[arg(long, env = "SANDFORK_LISTEN", default_value = "0.0.0.0:7443")]
    pub listen: SocketAddr,
    /// Address of the plain-HTTP `/livez` and `/readyz` for the kubelet's
    /// probes (keep it on loopback); none without it.
    #[arg(long, env = "SANDFORK_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// `host:port` the operator should dial, published in the Lease
    /// [default: POD_IP with the listening port, or the
    /// listening address when it is not a wildcard].
    #[arg(long, env = "SANDFORK_ADVERTISE")]
    pub advertise: Option<String>,
    /// This node's name (the downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// The agent's serving certificate (PEM).
    #[arg(
        long,
        env = "SANDFORK_TLS_CERT",
        default_value = "/etc/sandfork/tls/tls.crt"
    )]
    pub tls_cert: PathBuf,
    /// The agent's private key (PEM).
    #[arg(
        long,
        env = "SANDFORK_TLS_KEY",
        default_value = "/etc/sandfork/tls/tls.key"
    )]
    pub tls_key: PathBuf,
    /// CA (PEM) whose client certificates are accepted; all others are refused.
    #[arg(
        long,
        env = "SANDFORK_TLS_CLIENT_CA",
        default_value = "/etc/sandfork/tls/ca.crt"
    )]
    pub tls_client_ca: PathBuf,
    /// Name (DNS SAN or common name) the client certificate must carry; empty admits any client of the CA.
    #[arg(
        long,
        env = "SANDFORK_TLS_CLIENT_NAME",
        default_value = "sandfork-operator"
    )]
    pub tls_client_name: String,
    /// Namespace of the agent's Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "sandfork-system")]
    pub namespace: String,
    /// Keep a Lease in the cluster (needs a kubeconfig or in-cluster credentials).
    #[arg(long, env = "SANDFORK_REGISTER", default_value_t = true, action = clap::ArgAction::Set)]
    pub register: bool,
    /// Seconds the Lease stays valid without renewal.
    #[arg(long, default_value_t = 40)]
    pub lease_duration_seconds: u64,
    /// Seconds between renewals.
    #[arg(long, default_value_t = 10)]
    pub lease_renew_seconds: u64,
    /// Memory offered to sandboxes and captures, in MiB [default: host memory less --reserved-memory-mib].
    #[arg(long, env = "SANDFORK_MEMORY_MIB")]
    pub memory_mib: Option<u64>,
    /// Memory kept for the host when --memory-mib is not given, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub reserved_memory_mib: u64,
    /// Most sandboxes at once (0: no limit).
    #[arg(long, env = "SANDFORK_MAX_SANDBOXES", default_value_t = 64)]
    pub max_sandboxes: u32,
    /// Pod IP from the downward API, used for the default advertised address.
    #[arg(long, env = "POD_IP", hide = true)]
    pub pod_ip: Option<IpAddr>,
    /// The agent's Pod name and UID from the downward API: the Pod owns the Lease.
    #[arg(long, env = "POD_NAME", hide = true, requires = "pod_uid")]
    pub pod_name: Option<String>,
    #[arg(long, env = "POD_UID", hide = true, requires = "pod_name")]
    pub pod_uid: Option<String>,
    /// The executable started as each sandbox's VM process [default: this one].
    #[arg(long, env = "SANDFORK_AGENT_BINARY", hide = true)]
    pub agent_binary: Option<PathBuf>,
    /// Most memory captures of sandbox Pods may hold, in MiB: what the
    /// agent's Pod requests for them (their pages are charged to it).
    #[arg(long, env = "SANDFORK_CAPTURE_MEMORY_MIB")]
    pub capture_memory_mib: Option<u64>,
    /// The kubelet's pods directory, where sandbox Pods' VMM sockets are.
    #[arg(long, env = "SANDFORK_KUBELET_PODS_DIR", default_value = crate::manager::KUBELET_PODS_DIR)]
    pub kubelet_pods_dir: PathBuf,
    /// The kubelet device plugin for `sandfork.dev/kvm`.
    #[command(flatten)]
    pub device_plugin: crate::device_plugin::DevicePluginArgs,
    /// The state directory: set from the command line's global --state-dir.
    #[arg(skip)]
    pub state_dir: PathBuf,
}

impl ServeConfig {
    /// The same configuration with the state directory set.
    pub fn with_state_dir(mut self, state_dir: impl Into<PathBuf>) -> Self {
        self.state_dir = state_dir.into();
        self
    }

    /// What the operator should dial, given the address actually bound.
    pub fn advertised_endpoint(&self, bound: SocketAddr) -> Result<String, ServeError> {
        if let Some(advertise) = &self.advertise {
            return Ok(advertise.clone());
        }
        let ip = if bound.ip().is_unspecified() {
            self.pod_ip.ok_or(ServeError::NoAdvertisedAddress)?
        } else {
            bound.ip()
        };
        Ok(SocketAddr::new(ip, bound.port()).to_string())
    }

    /// Server TLS that requires client certificates signed by the client CA.
    pub fn tls(&self) -> Result<ServerTlsConfig, ServeError> {
        let read = |path: &PathBuf, what: &'static str| {
            std::fs::read(path).map_err(|source| ServeError::ReadTls {
                what,
                path: path.clone(),
                source,
            })
        };
        let cert = read(&self.tls_cert, "TLS certificate")?;
        let key = read(&self.tls_key, "TLS key")?;
        let ca = read(&self.tls_client_ca, "client CA")?;
        Ok(ServerTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            .client_ca_root(Certificate::from_pem(ca))
            .client_auth_optional(false))
    }
}

/// Runs [`serve`] on a new Tokio runtime (for the synchronous `main`).
pub fn run(config: ServeConfig) -> Result<(), ServeError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?
        .block_on(serve(config))
}

/// Serves until SIGTERM or Ctrl-C.
pub async fn serve(config: ServeConfig) -> Result<(), ServeError> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Listen {
            what: "listening on",
            addr: config.listen,
            source,
        })?;
    serve_on(config, listener, shutdown_signal()).await
}

/// Serves on `listener` until `shutdown` completes.
pub async fn serve_on(
    config: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    if config.node_name.is_empty() {
        return Err(ServeError::NoNodeName);
    }
    let manager = match &config.agent_binary {
        Some(binary) => Manager::with_agent_binary(&config.state_dir, binary),
        None => Manager::open(&config.state_dir),
    }
    .map(|manager| {
        manager
            .with_pods_dir(&config.kubelet_pods_dir)
            .with_capture_budget_mib(config.capture_memory_mib)
    })
    .map_err(|source| ServeError::StateDir {
        path: config.state_dir.clone(),
        source,
    })?;
    let capacity = Capacity::detect(
        config.memory_mib,
        config.reserved_memory_mib,
        config.max_sandboxes,
    );
    // Read the certificates before registering: an agent that cannot serve
    // must not advertise itself.
    let tls = config.tls()?;
    let bound = listener.local_addr().map_err(|source| ServeError::Listen {
        what: "reading the address bound for",
        addr: config.listen,
        source,
    })?;
    let endpoint = config.advertised_endpoint(bound)?;
    let devices = health::check();
    if !devices.all_ok() {
        tracing::warn!(
            ?devices,
            "this node cannot run sandboxes; serving anyway and saying so in the Lease"
        );
    }
    let readiness = probes::Readiness::new(
        config
            .register
            .then(|| Duration::from_secs(config.lease_duration_seconds)),
    );
    if !config.register {
        readiness.record(devices);
    }

    let heartbeat = if config.register {
        let mut kube_config = kube::Config::infer()
            .await
            .map_err(ServeError::Credentials)?;
        // The agent only makes short calls: none may hang the heartbeat.
        kube_config.read_timeout = Some(Duration::from_secs(20));
        let client = kube::Client::try_from(kube_config).map_err(ServeError::Client)?;
        let api = kube::Api::<Lease>::namespaced(client, &config.namespace);
        let registration = lease::Registration {
            namespace: config.namespace.clone(),
            node_name: config.node_name.clone(),
            endpoint: endpoint.clone(),
            capacity,
            lease_duration: Duration::from_secs(config.lease_duration_seconds),
            pod: config.pod_name.clone().zip(config.pod_uid.clone()),
        };
        // Register before serving, so that a broken registration is seen at once.
        let acquired = k8s_openapi::jiff::Timestamp::now();
        let devices = lease::renew(&api, &registration, acquired)
            .await
            .map_err(|source| ServeError::Register {
                name: sandfork_api::agent::lease::name(&config.node_name),
                namespace: config.namespace.clone(),
                source,
            })?;
        readiness.record(devices);
        Some(tokio::spawn(lease::heartbeat(
            api,
            registration,
            Duration::from_secs(config.lease_renew_seconds.max(1)),
            acquired,
            readiness.clone(),
        )))
    } else {
        None
    };

    let probes = match config.health_listen {
        Some(addr) => {
            Some(
                probes::spawn(addr, readiness)
                    .await
                    .map_err(|source| ServeError::Listen {
                        what: "listening for probes on",
                        addr,
                        source,
                    })?,
            )
        }
        None => None,
    };
    tracing::info!(
        node = config.node_name,
        %bound,
        endpoint,
        memory_mib = capacity.memory_mib,
        max_sandboxes = capacity.max_sandboxes,
        "agent serving"
    );
    // Stops the device plugin too when serving ends, however it ends.
    let stop = std::sync::Arc::new(tokio::sync::watch::channel(false).0);
    let device_plugin = config.device_plugin.enabled.then(|| {
        let options =
            crate::device_plugin::Options::new(&config.device_plugin.dir, capacity.max_sandboxes);
        let mut stopped = stop.subscribe();
        tokio::spawn(async move {
            let run = crate::device_plugin::run(options, || health::check().all_ok(), async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            });
            if let Err(err) = run.await {
                // The agent still serves the operator: sandboxes do not need
                // the plugin yet.
                tracing::error!(
                    err = sandfork_vmm::error::chain(&err),
                    "the device plugin stopped"
                );
            }
        })
    });
    let shutdown = {
        let stop = stop.clone();
        async move {
            shutdown.await;
            stop.send_replace(true);
        }
    };
    let service = AgentService::new(manager, config.node_name.clone(), capacity);
    let result = Server::builder()
        .tls_config(tls)
        .map_err(ServeError::Grpc)?
        .add_service(InterceptedService::new(
            AgentServer::new(service),
            client_check(config.tls_client_name.clone()),
        ))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await;
    for task in [heartbeat, probes].into_iter().flatten() {
        task.abort();
    }
    stop.send_replace(true);
    if let Some(task) = device_plugin
        && let Err(err) = task.await
    {
        tracing::warn!(%err, "the device plugin's task failed");
    }
    result.map_err(ServeError::Grpc)?;
    tracing::info!("agent stopped; its VMs keep running");
    Ok(())
}

/// The client-name check, or one that admits every client of the CA.
fn client_check(name: String) -> impl tonic::service::Interceptor + Clone {
    let check = (!name.is_empty()).then(|| auth::ClientName::new(name));
    move |request: tonic::Request<()>| match &check {
        Some(check) => tonic::service::Interceptor::call(&mut check.clone(), request),
        None => Ok(request),
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::warn!(%err, "no SIGTERM handler; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
