//! Wiring: watches, the two controllers, leader election, the HTTP endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::controller::{Config, Controller};
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use sandfork_api::{Sandbox, SandboxBranch, SandboxWarmPool, labels};

use crate::agents::{AgentTlsArgs, Agents, Dial, TlsDialer};
use crate::context::{
    Caches, Clock, Context, DEFAULT_VMM_IMAGE, DEFAULT_VMM_IMAGE_PULL_POLICY, FIELD_MANAGER,
    Settings,
};
use crate::controller::{error_policy, reconcile};
use crate::error::{ErrorChain, RunError};
use crate::http::{self, HttpState};
use crate::leader::{self, LeaderArgs, LeaderElector};
use crate::metrics::Metrics;
use crate::pod::VmmImage;

#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "sandfork-operator",
    version,
    about = "Runs Sandboxes and SandboxBranches on Sandfork node agents"
)]
pub struct Args {
    /// Address of the /metrics, /healthz and /readyz endpoint.
    #[arg(long, env = "SANDFORK_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// The operator's namespace (holds the leader Lease).
    #[arg(long, env = "POD_NAMESPACE", default_value = "sandfork-system")]
    pub namespace: String,
    /// Namespace of the agents' Leases [default: the operator's namespace].
    #[arg(long, env = "SANDFORK_AGENT_NAMESPACE")]
    pub agent_namespace: Option<String>,
    /// This replica's name in leader election [default: POD_NAME, else the host name and pid].
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Concurrent reconciles per controller.
    #[arg(long, default_value_t = 16)]
    pub concurrency: u16,
    /// Image of the `vmm` container of sandbox Pods: the agent's image.
    #[arg(long, env = "SANDFORK_VMM_IMAGE", default_value = DEFAULT_VMM_IMAGE)]
    pub vmm_image: String,
    /// Pull policy of that image.
    #[arg(
        long,
        env = "SANDFORK_VMM_IMAGE_PULL_POLICY",
        default_value = DEFAULT_VMM_IMAGE_PULL_POLICY,
        value_parser = ["Always", "IfNotPresent", "Never"]
    )]
    pub vmm_image_pull_policy: String,
    #[command(flatten)]
    pub tls: AgentTlsArgs,
    #[command(flatten)]
    pub leader: LeaderArgs,
}

pub async fn run(args: Args) -> Result<(), RunError> {
    let mut config = kube::Config::infer().await?;
    // Watches time out server-side after 290 s; nothing else may hang longer.
    config.read_timeout = Some(Duration::from_secs(295));
    let client = crate::client::new(config)?;
    let metrics = Arc::new(Metrics::default());
    let active = Arc::new(AtomicBool::new(false));
    let http_state = HttpState {
        metrics: metrics.clone(),
        active: active.clone(),
    };
    let http = tokio::spawn(http::serve(args.metrics_addr, http_state));
    let dialer: Arc<dyn Dial> = Arc::new(TlsDialer::from_args(&args.tls)?);
    let identity = args.identity.clone().unwrap_or_else(default_identity);

    let elector = args.leader.leader_elect.then(|| {
        LeaderElector::new(
            Api::namespaced(client.clone(), &args.namespace),
            &args.leader.leader_lease_name,
            &identity,
            Duration::from_secs(args.leader.leader_lease_seconds.into()),
            Clock::system(),
        )
    });
    let retry = Duration::from_secs(args.leader.leader_retry_seconds);
    if let Some(elector) = &elector {
        tracing::info!(
            identity,
            lease = args.leader.leader_lease_name,
            "waiting to lead"
        );
        tokio::select! {
            () = leader::acquire(elector, retry) => {}
            () = shutdown_signal() => return Ok(()),
        }
        tracing::info!(identity, "leading");
    }
    active.store(true, Ordering::Relaxed);
    metrics.leader.set(1);

    let controllers = controllers(client, dialer, metrics, &args, &identity);
    let renew_deadline = Duration::from_secs(args.leader.leader_renew_deadline_seconds);
    let hold = async {
        match &elector {
            Some(elector) => leader::hold(elector, retry, renew_deadline).await,
            None => futures::future::pending().await,
        }
    };
    tokio::select! {
        result = controllers => result?,
        () = hold => {
            // Another replica may act now: stop at once, as client-go does.
            return Err(RunError::LostLeadership);
        }
        result = http => {
            return Err(match result {
                Ok(Err(err)) => err,
                Ok(Ok(())) => RunError::HttpStopped(None),
                Err(err) => RunError::HttpStopped(Some(err)),
            });
        }
    }
    if let Some(elector) = &elector
        && let Err(err) = elector.release().await
    {
        tracing::warn!(error = %ErrorChain(&err), "could not release the leader Lease");
    }
    Ok(())
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Runs the three controllers until a shutdown signal.
async fn controllers(
    client: Client,
    dialer: Arc<dyn Dial>,
    metrics: Arc<Metrics>,
    args: &Args,
    identity: &str,
) -> Result<(), RunError> {
    let agent_namespace = args
        .agent_namespace
        .clone()
        .unwrap_or_else(|| args.namespace.clone());
    let (leases, lease_writer) = reflector::store::<Lease>();
    let lease_watch = watcher(
        Api::<Lease>::namespaced(client.clone(), &agent_namespace),
        watcher::Config::default().labels(&sandfork_api::agent::lease::selector()),
    )
    .default_backoff()
    .reflect(lease_writer)
    .for_each(|event| async move {
        if let Err(err) = event {
            tracing::warn!(error = %ErrorChain(&err), "watching agent Leases");
        }
    });
    tokio::spawn(lease_watch);
    // Cleanup decisions read the Leases: wait until they are all known.
    leases.wait_until_ready().await?;
    tracing::info!(
        agents = leases.state().len(),
        namespace = agent_namespace,
        "agent Leases read"
    );

    // The controller's own watch of the Pods it owns only triggers
    // reconciles (a stream it could share is an unstable kube feature);
    // this one keeps them at hand.
    let sandbox_pods = || watcher::Config::default().labels(&labels::sandbox_pod_selector());
    let (pods, pod_writer) = reflector::store::<Pod>();
    let pod_watch = watcher(Api::<Pod>::all(client.clone()), sandbox_pods())
        .default_backoff()
        .reflect(pod_writer)
        .for_each(|event| async move {
            if let Err(err) = event {
                tracing::warn!(error = %ErrorChain(&err), "watching sandbox Pods");
            }
        });
    tokio::spawn(pod_watch);
    // A warm Pod claimed just before a restart is found there (see
    // `Sandbox::find_own_pod`): the controllers start once it is full.
    pods.wait_until_ready().await?;

    let config = Config::default().concurrency(args.concurrency);
    let sandbox_controller = Controller::new(
        Api::<Sandbox>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<Pod>::all(client.clone()), sandbox_pods())
    .with_config(config.clone())
    .shutdown_on_signal();
    let branch_controller = Controller::new(
        Api::<SandboxBranch>::all(client.clone()),
        watcher::Config::default(),
    )
    .with_config(config.clone());
    // A warm Pod's pool is named by its label, which a claim keeps: a claim
    // (the Pod no longer owned) triggers the pool's refill.
    let warm_pods = watcher::Config::default().labels(labels::WARM_POOL);
    let pool_controller = Controller::new(
        Api::<SandboxWarmPool>::all(client.clone()),
        watcher::Config::default(),
    )
    .watches(Api::<Pod>::all(client.clone()), warm_pods, |pod: Pod| {
        let pool = pod.labels().get(labels::WARM_POOL).cloned();
        let namespace = pod.namespace().unwrap_or_default();
        pool.map(|pool| ObjectRef::new(&pool).within(&namespace))
    })
    .with_config(config)
    .shutdown_on_signal();
    let branches = branch_controller.store();
    let ctx = Arc::new(Context::new(
        client.clone(),
        Agents::new(leases, dialer),
        Caches {
            sandboxes: sandbox_controller.store(),
            branches: branches.clone(),
            pods,
        },
        metrics,
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(identity.to_string()),
        },
        Clock::system(),
        Settings {
            vmm_image: VmmImage {
                image: args.vmm_image.clone(),
                pull_policy: args.vmm_image_pull_policy.clone(),
            },
            ..Settings::default()
        },
    ));
    let branch_controller = branch_controller
        .watches(
            Api::<Sandbox>::all(client.clone()),
            watcher::Config::default(),
            move |sandbox: Sandbox| branches_concerned(&branches, &sandbox),
        )
        .shutdown_on_signal();

    let sandboxes = sandbox_controller
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(error = %ErrorChain(&err), "sandbox controller");
            }
        });
    let branches = branch_controller
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(error = %ErrorChain(&err), "sandboxbranch controller");
            }
        });
    let pools = pool_controller
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(error = %ErrorChain(&err), "sandboxwarmpool controller");
            }
        });
    tracing::info!("controllers running");
    futures::join!(sandboxes, branches, pools);
    Ok(())
}

/// The SandboxBranches a change to `sandbox` may matter to: the one that
/// made it, and those waiting to capture it.
pub fn branches_concerned(
    branches: &reflector::Store<SandboxBranch>,
    sandbox: &Sandbox,
) -> Vec<ObjectRef<SandboxBranch>> {
    let namespace = sandbox.namespace().unwrap_or_default();
    let mut refs: Vec<ObjectRef<SandboxBranch>> = Vec::new();
    if let Some(owner) = sandbox.labels().get(labels::BRANCH) {
        refs.push(ObjectRef::new(owner).within(&namespace));
    }
    let name = sandbox.name_any();
    for branch in branches.state() {
        if branch.namespace().as_deref() == Some(namespace.as_str())
            && branch.spec.source_ref.name == name
            && branch.status.as_ref().is_none_or(|s| s.capture.is_none())
        {
            refs.push(ObjectRef::from_obj(branch.as_ref()));
        }
    }
    refs
}
