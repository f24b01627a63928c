//! The environment every scenario runs in: a cluster with the chart
//! installed, the operator and the agents running, and the clients to look
//! at them.

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::FutureExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use sandfork_api::agent::v1::agent_client::AgentClient;
use tonic::transport::Channel;

use crate::agents::{self, TlsFiles};
use crate::cluster::LocalCluster;
use crate::namespace;
use crate::pods;
use crate::process;
use crate::tools::{self, Tools};
use crate::wait::{self, Look};

/// Release name and namespace of the chart in the local cluster.
pub const RELEASE: &str = "sandfork";
pub const RELEASE_NAMESPACE: &str = "sandfork-system";
/// The nodes of the local cluster (`e2e/cluster/local-cluster.sh`).
pub const LOCAL_NODES: [&str; 2] = ["node-a", "node-b"];
/// Memory each local agent offers, MiB.
const AGENT_MEMORY_MIB: u64 = 4096;
/// How long the chart's pods may take to roll out.
const ROLLOUT: Duration = Duration::from_secs(180);

/// The cargo profile the local operator and agent are built with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Profile {
    /// `cargo build` (what the tests use: quick to build).
    #[default]
    Dev,
    /// `cargo build --release` (what timings should be taken with).
    Release,
}

/// Where the tests find the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A local cluster with real nodes started for this run; the operator
    /// and agents are the chart's Pods, from images of this checkout's binaries.
    Local,
    /// A cluster named by `SANDFORK_E2E_KUBECONFIG` with the chart installed;
    /// the agents are the DaemonSet's Pods.
    External,
}

/// What the local mode started, stopped when dropped.
struct Local {
    root: PathBuf,
    keep: bool,
    cluster: LocalCluster,
    watchdog: Option<std::process::Child>,
}

pub struct Env {
    pub mode: Mode,
    pub repo: PathBuf,
    pub tools: Tools,
    /// An admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// The chart's release and namespace.
    pub release: String,
    pub namespace: String,
    /// The operator's client certificate (from the chart's Secret), to
    /// call the agents as the operator does; read again after a reinstall.
    operator_tls: RwLock<TlsFiles>,
    /// The name the agents' certificates carry.
    pub agent_server_name: String,
    rt: tokio::runtime::Runtime,
    client: kube::Client,
    local: Mutex<Option<Local>>,
    /// Whether the operator and agents were started (or why they failed to).
    workloads: Mutex<Option<Result<(), String>>>,
    /// Scenarios that measure a node's totals take it exclusively.
    node_totals: RwLock<()>,
}

/// The repository root (this crate is `e2e/` in it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ has a parent")
        .to_path_buf()
}

impl Env {
    /// External mode when `SANDFORK_E2E_KUBECONFIG` is set, else local:
    /// a cluster with real nodes and the chart installed, its images built
    /// from this checkout's binaries (dev profile).
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(Profile::Dev)
    }

    /// [`Env::start`], building the local images' binaries with `profile`
    /// (external mode ignores it).
    pub fn start_with(profile: Profile) -> anyhow::Result<Self> {
        match std::env::var_os("SANDFORK_E2E_KUBECONFIG") {
            Some(path) => Self::external(PathBuf::from(path)),
            None => Self::local(profile),
        }
    }

    /// Makes sure the operator and the agents run and answer: waits for
    /// the agents of the nodes that can run sandboxes to register (they
    /// need /dev/kvm and /dev/userfaultfd) and for the operator to lead.
    pub fn start_workloads(&self) -> anyhow::Result<()> {
        let mut started = self.workloads.lock().unwrap_or_else(|e| e.into_inner());
        if started.is_none() {
            let started_at = Instant::now();
            let result = self.block_on(self.workloads_ready());
            if result.is_ok() {
                eprintln!(
                    "e2e: agents registered and the operator leads after {:.1?}",
                    started_at.elapsed()
                );
            }
            *started = Some(result.map(drop).map_err(|err| format!("{err:#}")));
        }
        match started.as_ref().expect("set above") {
            Ok(()) => Ok(()),
            Err(err) => bail!("the operator and agents did not start: {err}"),
        }
    }

    fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
        Ok(tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?)
    }

    fn external(kubeconfig: PathBuf) -> anyhow::Result<Self> {
        let rt = Self::runtime()?;
        let namespace =
            std::env::var("SANDFORK_E2E_NAMESPACE").unwrap_or_else(|_| RELEASE_NAMESPACE.into());
        let release = std::env::var("SANDFORK_E2E_RELEASE").unwrap_or_else(|_| RELEASE.into());
        let client = rt.block_on(client_from(&kubeconfig))?;
        let operator_tls = rt.block_on(TlsFiles::from_secret(
            &client,
            &namespace,
            &format!("{release}-operator-tls"),
        ))?;
        let env = Self {
            mode: Mode::External,
            repo: repo_root(),
            tools: Tools::from_env(),
            kubeconfig,
            release,
            namespace,
            operator_tls: RwLock::new(operator_tls),
            agent_server_name: sandfork_api::agent::DEFAULT_TLS_SERVER_NAME.into(),
            rt,
            client,
            local: Mutex::new(None),
            workloads: Mutex::new(None),
            node_totals: RwLock::new(()),
        };
        Ok(env)
    }

    fn local(profile: Profile) -> anyhow::Result<Self> {
        let repo = repo_root();
        let tools = Tools::pinned(&repo)?;
        let root = make_root()?;
        let keep = std::env::var_os("SANDFORK_E2E_KEEP").is_some();
        std::fs::create_dir_all(root.join("logs"))?;
        eprintln!(
            "e2e: starting a local cluster with nodes in {}",
            root.display()
        );
        let started = Instant::now();
        let cluster =
            match LocalCluster::up(&repo, &root.join("cluster"), &root.join("logs/cluster.log")) {
                Ok(cluster) => cluster,
                Err(err) => {
                    if !keep {
                        let _ = std::fs::remove_dir_all(&root);
                    }
                    return Err(err);
                }
            };
        eprintln!("e2e: cluster and nodes up in {:.1?}", started.elapsed());
        let mut local = Local {
            root: root.clone(),
            keep,
            watchdog: None,
            cluster,
        };
        local.watchdog = start_watchdog(&repo, &root).ok();

        let started = Instant::now();
        let binaries = build_binaries(&repo, profile)?;
        eprintln!(
            "e2e: operator and agent binaries ({profile:?}) ready in {:.1?}",
            started.elapsed()
        );
        let started = Instant::now();
        local.cluster.load_chart_images(&repo, &binaries)?;
        eprintln!(
            "e2e: images imported into the nodes in {:.1?}",
            started.elapsed()
        );

        let rt = Self::runtime()?;
        let kubeconfig = local.cluster.kubeconfig();
        let client = rt.block_on(client_from(&kubeconfig))?;
        let started = Instant::now();
        install_chart(&tools, &kubeconfig, &repo.join("charts/sandfork"))?;
        eprintln!("e2e: helm install done in {:.1?}", started.elapsed());
        let operator_tls = rt.block_on(TlsFiles::from_secret(
            &client,
            RELEASE_NAMESPACE,
            &format!("{RELEASE}-operator-tls"),
        ))?;
        let env = Self {
            mode: Mode::Local,
            repo,
            tools,
            kubeconfig,
            release: RELEASE.into(),
            namespace: RELEASE_NAMESPACE.into(),
            operator_tls: RwLock::new(operator_tls),
            agent_server_name: sandfork_api::agent::DEFAULT_TLS_SERVER_NAME.into(),
            rt,
            client,
            local: Mutex::new(Some(local)),
            workloads: Mutex::new(None),
            node_totals: RwLock::new(()),
        };
        let started = Instant::now();
        env.wait_for_rollout(ROLLOUT)?;
        eprintln!(
            "e2e: the chart's pods are Ready after {:.1?}",
            started.elapsed()
        );
        Ok(env)
    }

    /// Waits until the chart's Deployment and DaemonSet have rolled out.
    pub fn wait_for_rollout(&self, timeout: Duration) -> anyhow::Result<()> {
        for workload in [
            format!("deployment/{}-operator", self.release),
            format!("daemonset/{}-agent", self.release),
        ] {
            tools::run(self.tools.kubectl(&self.kubeconfig).args([
                "rollout",
                "status",
                &workload,
                "-n",
                &self.namespace,
                &format!("--timeout={}s", timeout.as_secs()),
            ]))
            .with_context(|| format!("waiting for {workload} to roll out"))?;
        }
        Ok(())
    }

    /// `helm` with the admin kubeconfig, release and namespace: `args` after
    /// the subcommand, e.g. `helm_release("upgrade", ["--set", "x=y"])`.
    pub fn helm_release<'a>(
        &self,
        subcommand: &str,
        args: impl IntoIterator<Item = &'a str>,
    ) -> anyhow::Result<String> {
        let mut command = self.tools.helm(&self.kubeconfig);
        command
            .arg(subcommand)
            .arg(&self.release)
            .args(["--namespace", &self.namespace]);
        if subcommand != "uninstall" {
            command.arg(self.repo.join("charts/sandfork"));
            command.args(local_values());
        }
        command.args(args);
        tools::run(&mut command).with_context(|| format!("helm {subcommand}"))
    }

    /// Waits until the agents answer (every local node's; at least one
    /// of an external cluster's) and an operator Pod leads.
    pub async fn workloads_ready(&self) -> anyhow::Result<()> {
        let agents = match self.mode {
            Mode::Local => LOCAL_NODES.len(),
            Mode::External => 1,
        };
        self.wait_for_agents(agents, ROLLOUT).await?;
        self.wait_for_leader(ROLLOUT).await.map(drop)
    }

    /// After a reinstall: reads the operator's client certificate again
    /// (the chart made new ones) and waits until the workloads serve.
    pub async fn reinstalled(&self) -> anyhow::Result<()> {
        let tls = TlsFiles::from_secret(
            &self.client,
            &self.namespace,
            &format!("{}-operator-tls", self.release),
        )
        .await?;
        *self.operator_tls.write().unwrap_or_else(|e| e.into_inner()) = tls;
        self.workloads_ready().await
    }

    /// The operator's client certificate, as the chart's Secret holds it.
    pub fn operator_tls(&self) -> TlsFiles {
        self.operator_tls
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until `count` agents have fresh Leases and answer over mTLS.
    async fn wait_for_agents(&self, count: usize, timeout: Duration) -> anyhow::Result<()> {
        wait::until(
            &format!("{count} agent(s) to register and answer"),
            timeout,
            || async {
                self.check_processes()?;
                let endpoints = agents::endpoints(&self.client, &self.namespace).await?;
                let mut answering = Vec::new();
                for node in endpoints.keys() {
                    if let Ok(mut agent) = self.agent(node).await
                        && let Ok(info) = agent
                            .get_info(sandfork_api::agent::v1::GetInfoRequest {})
                            .await
                    {
                        let info = info.into_inner();
                        if !info.kvm_ok || !info.userfaultfd_ok {
                            bail!(
                                "the agent on {node} reports KVM {} ({}), userfaultfd {} ({})",
                                info.kvm_ok,
                                info.kvm_error,
                                info.userfaultfd_ok,
                                info.userfaultfd_error
                            );
                        }
                        answering.push(node.clone());
                    }
                }
                Ok(if answering.len() >= count {
                    Look::Done(())
                } else {
                    Look::NotYet(format!("Leases {endpoints:?}, answering {answering:?}"))
                })
            },
        )
        .await
    }

    /// Waits until a running operator Pod holds the leader Lease; returns
    /// the Pod's name.
    pub async fn wait_for_leader(&self, timeout: Duration) -> anyhow::Result<String> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), &self.namespace);
        wait::until(
            "an operator Pod to take the leader Lease",
            timeout,
            || async {
                self.check_processes()?;
                let holder = leases
                    .get_opt("sandfork-operator-leader")
                    .await?
                    .and_then(|lease| lease.spec?.holder_identity);
                let running = pods::running(&self.client, &self.namespace, "operator").await?;
                Ok(match holder {
                    Some(holder) if running.contains(&holder) => Look::Done(holder),
                    other => Look::NotYet(format!("holder {other:?}, running {running:?}")),
                })
            },
        )
        .await
    }

    /// An error if one of the chart's Pods is crash-looping.
    pub fn check_processes(&self) -> anyhow::Result<()> {
        if self.mode != Mode::Local {
            return Ok(());
        }
        let crashing = self.block_on_nested(pods::crash_looping(&self.client, &self.namespace))?;
        if let Some((pod, reason)) = crashing.first() {
            bail!(
                "Pod {}/{pod} is {reason}; its log ends:\n{}",
                self.namespace,
                self.pod_log_tail(pod, 40)
            );
        }
        Ok(())
    }

    /// Runs `future` on the environment's runtime.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.rt.block_on(future)
    }

    /// An admin client.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// A gRPC client of the agent on `node`, found through its Lease.
    pub async fn agent(&self, node: &str) -> anyhow::Result<AgentClient<Channel>> {
        let endpoints = agents::endpoints(&self.client, &self.namespace).await?;
        let endpoint = endpoints.get(node).with_context(|| {
            format!(
                "no agent Lease for node {node} (agents: {:?})",
                endpoints.keys()
            )
        })?;
        agents::connect(endpoint, &self.operator_tls(), &self.agent_server_name).await
    }

    /// Nodes with an agent Lease.
    pub async fn agent_nodes(&self) -> anyhow::Result<Vec<String>> {
        Ok(agents::endpoints(&self.client, &self.namespace)
            .await?
            .into_keys()
            .collect())
    }

    /// Kills the agent process of local node `node` (SIGKILL), as a crash
    /// would; how many processes it killed (`None`: not a local cluster).
    pub fn kill_agent(&self, node: &str) -> Option<usize> {
        let guard = self.local.lock().expect("local lock");
        let node = guard.as_ref()?.cluster.node(node)?;
        Some(process::kill_agent_in_node(&node.netns))
    }

    /// Packs `file` as image `name` and imports it into the local nodes;
    /// false on a cluster that is not local.
    pub fn import_image(&self, name: &str, file: &Path) -> anyhow::Result<bool> {
        let guard = self.local.lock().expect("local lock");
        match guard.as_ref() {
            Some(local) => local.cluster.import_image(name, file).map(|()| true),
            None => Ok(false),
        }
    }

    /// The state directory of the agent on local node `node`, as this
    /// host sees it (local mode only).
    pub fn local_state_dir(&self, node: &str) -> Option<PathBuf> {
        let guard = self.local.lock().expect("local lock");
        guard.as_ref()?.cluster.node(node)?.state_dir()
    }

    /// Whether the VMM of the sandbox Pod with UID `pod_uid` still runs
    /// (local mode only: the nodes' processes are this machine's).
    pub fn vm_process_alive(&self, pod_uid: &str) -> Option<bool> {
        let guard = self.local.lock().expect("local lock");
        guard.as_ref()?;
        Some(process::vm_alive_in_pod(pod_uid))
    }

    /// The last `lines` lines of a Pod's log in the release namespace.
    pub fn pod_log_tail(&self, pod: &str, lines: usize) -> String {
        tools::run(self.tools.kubectl(&self.kubeconfig).args([
            "logs",
            "-n",
            &self.namespace,
            pod,
            &format!("--tail={lines}"),
        ]))
        .unwrap_or_else(|err| format!("{err:#}"))
    }

    /// Runs one scenario in a fresh namespace, deleted afterwards whatever
    /// happens. `exclusive`: no other scenario runs meanwhile (for checks of
    /// a node's totals). On failure the error carries the namespace's
    /// objects and events and the ends of the processes' logs.
    pub fn scenario<F, Fut>(&self, name: &str, exclusive: bool, body: F) -> anyhow::Result<()>
    where
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let _shared;
        let _exclusive;
        if exclusive {
            _exclusive = self.node_totals.write().unwrap_or_else(|e| e.into_inner());
        } else {
            _shared = self.node_totals.read().unwrap_or_else(|e| e.into_inner());
        }
        let started = Instant::now();
        let result = self.block_on(async {
            let ns = namespace::create(&self.client, name).await?;
            let outcome = AssertUnwindSafe(body(ns.clone())).catch_unwind().await;
            let result = match outcome {
                Ok(result) => result,
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panic".into());
                    Err(anyhow::anyhow!("panicked: {message}"))
                }
            };
            // The failure first, then what the namespace and processes show.
            let result =
                result.map_err(|err| anyhow::anyhow!("{err:#}\n{}", self.diagnostics(&ns)));
            let deleted = namespace::delete(&self.client, &ns, Duration::from_secs(120)).await;
            result?;
            deleted.with_context(|| {
                format!("cleaning up after the scenario: {}", self.diagnostics(&ns))
            })
        });
        eprintln!("e2e: scenario {name} took {:.1?}", started.elapsed());
        result
    }

    /// What a person debugging a failure wants to see.
    pub fn diagnostics(&self, ns: &str) -> String {
        let mut out = format!("--- state of namespace {ns}:\n");
        let get = tools::run(self.tools.kubectl(&self.kubeconfig).args([
            "get",
            "sandboxes,sandboxbranches",
            "-n",
            ns,
            "-o",
            "yaml",
        ]));
        out.push_str(&get.unwrap_or_else(|e| format!("{e:#}")));
        let events = tools::run(self.tools.kubectl(&self.kubeconfig).args([
            "get",
            "events",
            "-n",
            ns,
            "--sort-by=.metadata.creationTimestamp",
        ]));
        out.push_str(&events.unwrap_or_else(|e| format!("{e:#}")));
        let listed = tools::run(
            self.tools
                .kubectl(&self.kubeconfig)
                .args(["get", "pods", "-A", "-o", "wide"]),
        );
        out.push_str(&format!(
            "\n--- pods:\n{}",
            listed.unwrap_or_else(|e| format!("{e:#}"))
        ));
        let names = self.block_on_nested(pods::names(&self.client, &self.namespace));
        for pod in names.unwrap_or_default() {
            let lines = if pod.contains("operator") { 40 } else { 20 };
            out.push_str(&format!(
                "\n--- log of {pod} (end):\n{}\n",
                self.pod_log_tail(&pod, lines)
            ));
        }
        out
    }

    /// Runs `future` to completion from inside or outside the runtime.
    fn block_on_nested<F: Future>(&self, future: F) -> F::Output {
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => tokio::task::block_in_place(|| handle.block_on(future)),
            Err(_) => self.rt.block_on(future),
        }
    }

    /// Stops everything the local mode started; safe to repeat.
    pub fn teardown(&self) {
        drop(self.local.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        // Scenarios deleted their namespaces; whatever is left is a leak.
        let leftovers: BTreeMap<String, Vec<String>> = LOCAL_NODES
            .iter()
            .filter_map(|node| {
                let dir = self.cluster.node(node)?.state_dir()?;
                Some((node.to_string(), list_dir(&dir.join("sandboxes"))))
            })
            .filter(|(_, names)| !names.is_empty())
            .collect();
        if !leftovers.is_empty() {
            eprintln!("e2e: sandboxes left on the agents after all scenarios: {leftovers:?}");
        }
        // The nodes go down with every container and VM on them.
        self.cluster.down();
        let root = self.root.to_string_lossy().into_owned();
        for pid in process::processes_mentioning(&root) {
            eprintln!("e2e: killing leftover process {pid}");
            process::signal(pid, "KILL");
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        if self.keep {
            eprintln!("e2e: kept {} (SANDFORK_E2E_KEEP)", self.root.display());
        } else if let Err(err) = std::fs::remove_dir_all(&self.root) {
            eprintln!("e2e: could not remove {}: {err}", self.root.display());
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.teardown();
    }
}

async fn client_from(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    let config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(kubeconfig)
            .with_context(|| format!("reading {}", kubeconfig.display()))?,
        &KubeConfigOptions::default(),
    )
    .await?;
    client(config)
}

/// A client for `config` whose connections send each request at once
/// (TCP_NODELAY), as kubectl's and client-go's do. `kube::Client::try_from`
/// leaves Nagle's algorithm on (kube-rs/kube#2056): the first request with
/// a body on a new connection then waits for the API server's delayed ACK,
/// 40 ms on Linux, which would count in every timing that opens one.
pub fn client(config: kube::Config) -> anyhow::Result<kube::Client> {
    use kube::client::ConfigExt;
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(config.connect_timeout);
    let https = config.rustls_https_connector_with_connector(http)?;
    let hyper = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(https);
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .map_err(tower::BoxError::from)
        .service(hyper);
    Ok(kube::Client::new(service, config.default_namespace))
}

/// The values the local cluster installs the chart with: its defaults,
/// and each agent's share of this machine's memory.
fn local_values() -> Vec<String> {
    vec![
        "--set".into(),
        format!("agent.memoryMiB={AGENT_MEMORY_MIB}"),
    ]
}

/// `helm install` of the chart into the release namespace.
fn install_chart(tools: &Tools, kubeconfig: &Path, chart: &Path) -> anyhow::Result<()> {
    tools::run(
        tools
            .helm(kubeconfig)
            .args(["install", RELEASE])
            .arg(chart)
            .args(["--namespace", RELEASE_NAMESPACE, "--create-namespace"])
            .args(local_values()),
    )
    .context("helm install of charts/sandfork")?;
    Ok(())
}

/// The binaries the local mode runs.
pub struct Binaries {
    pub operator: PathBuf,
    pub agent: PathBuf,
}

/// Builds the operator and agent binaries with `profile` (a no-op when
/// current) and returns their paths, as cargo reports them.
pub fn build_binaries(repo: &Path, profile: Profile) -> anyhow::Result<Binaries> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(repo)
        .args([
            "build",
            "--locked",
            "--bins",
            "--message-format=json-render-diagnostics",
        ])
        .args(["-p", "sandfork-operator", "-p", "sandfork-node-agent"]);
    if profile == Profile::Release {
        command.arg("--release");
    }
    // What cargo set for this test process describes the e2e crate; build
    // scripts (ring's) rerun when it changes, so the same build from the
    // shell and from here would each invalidate the other's.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let per_crate = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_BIN_",
            "CARGO_CRATE_",
            "CARGO_CFG_",
        ]
        .iter()
        .any(|prefix| name.starts_with(prefix))
            || ["CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "OUT_DIR"].contains(&name.as_ref());
        if per_crate {
            command.env_remove(name.as_ref());
        }
    }
    let out = tools::run(&mut command).context("building the operator and agent")?;
    let mut found: BTreeMap<String, PathBuf> = BTreeMap::new();
    for line in out.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let (Some(name), Some(exe)) = (
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) {
            found.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    let take = |name: &str| {
        found
            .get(name)
            .cloned()
            .with_context(|| format!("cargo built no {name} binary"))
    };
    Ok(Binaries {
        operator: take("sandfork-operator")?,
        agent: take("sandfork-agent")?,
    })
}

/// A fresh directory for this run, not under /dev/shm (each node mounts
/// a /dev/shm of its own over it).
fn make_root() -> anyhow::Result<PathBuf> {
    let base = std::env::temp_dir();
    for attempt in 0..100u32 {
        let nanos = std::time::UNIX_EPOCH.elapsed()?.subsec_nanos();
        let dir = base.join(format!(
            "sandfork-e2e.{}.{:x}",
            std::process::id(),
            nanos ^ attempt
        ));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(err) => return Err(err).with_context(|| format!("creating {}", dir.display())),
        }
    }
    bail!("could not create a directory under {}", base.display())
}

fn list_dir(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A process that cleans up if this one dies without tearing down (killed,
/// interrupted): once our pid is gone it stops the cluster and kills every
/// process whose command line mentions the run's directory.
fn start_watchdog(repo: &Path, root: &Path) -> anyhow::Result<std::process::Child> {
    const SCRIPT: &str = r#"
while kill -0 "$E2E_PID" 2>/dev/null; do sleep 2; done
[ -d "$E2E_ROOT" ] || exit 0
"$E2E_CLUSTER_SCRIPT" down "$E2E_ROOT/cluster" >/dev/null 2>&1
for f in /proc/[0-9]*/cmdline; do
  pid=${f#/proc/}; pid=${pid%/cmdline}
  [ "$pid" = "$$" ] && continue
  if tr '\0' ' ' <"$f" 2>/dev/null | grep -qF -- "$E2E_ROOT"; then kill -KILL "$pid" 2>/dev/null; fi
done
rm -rf "$E2E_ROOT"
"#;
    let mut command = Command::new("setsid");
    command
        .args(["bash", "-c", SCRIPT])
        .env("E2E_PID", std::process::id().to_string())
        .env("E2E_ROOT", root)
        .env(
            "E2E_CLUSTER_SCRIPT",
            repo.join("e2e/cluster/local-cluster.sh"),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Ok(command.spawn()?)
}
