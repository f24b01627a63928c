//! Creating Sandboxes and SandboxBranches and waiting on their conditions.

use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, PostParams};
use sandfork_api::agent::v1 as pb;
use sandfork_api::conditions::{self, FAILED, READY};
use sandfork_api::{Sandbox, SandboxBranch};

use crate::Env;
use crate::wait::{self, Look};

/// Sandboxes of namespace `ns`.
pub fn sandboxes(env: &Env, ns: &str) -> Api<Sandbox> {
    Api::namespaced(env.client(), ns)
}

/// SandboxBranches of namespace `ns`.
pub fn branches(env: &Env, ns: &str) -> Api<SandboxBranch> {
    Api::namespaced(env.client(), ns)
}

/// Creates a Sandbox from its `spec` (JSON, as in YAML).
pub async fn create_sandbox(
    env: &Env,
    ns: &str,
    name: &str,
    spec: serde_json::Value,
) -> anyhow::Result<Sandbox> {
    let object: Sandbox = serde_json::from_value(serde_json::json!({
        "apiVersion": "sandfork.dev/v1alpha1",
        "kind": "Sandbox",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }))?;
    sandboxes(env, ns)
        .create(&PostParams::default(), &object)
        .await
        .with_context(|| format!("creating Sandbox {ns}/{name}"))
}

/// Creates a SandboxBranch from its `spec`.
pub async fn create_branch(
    env: &Env,
    ns: &str,
    name: &str,
    spec: serde_json::Value,
) -> anyhow::Result<SandboxBranch> {
    let object: SandboxBranch = serde_json::from_value(serde_json::json!({
        "apiVersion": "sandfork.dev/v1alpha1",
        "kind": "SandboxBranch",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }))?;
    branches(env, ns)
        .create(&PostParams::default(), &object)
        .await
        .with_context(|| format!("creating SandboxBranch {ns}/{name}"))
}

fn describe(conditions: &[Condition]) -> String {
    conditions
        .iter()
        .map(|c| format!("{}={} ({}: {})", c.type_, c.status, c.reason, c.message))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Waits until the Sandbox is Ready.
pub async fn sandbox_ready(
    env: &Env,
    ns: &str,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<Sandbox> {
    let api = sandboxes(env, ns);
    wait::until(
        &format!("Sandbox {ns}/{name} to be Ready"),
        timeout,
        || async {
            env.check_processes()?;
            let sandbox = api.get(name).await?;
            Ok(if sandbox.is_ready() {
                Look::Done(sandbox)
            } else {
                let conditions = sandbox.status.map(|s| s.conditions).unwrap_or_default();
                Look::NotYet(describe(&conditions))
            })
        },
    )
    .await
}

/// Waits until the SandboxBranch is Ready; fails at once if it Failed.
pub async fn branch_ready(
    env: &Env,
    ns: &str,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<SandboxBranch> {
    let api = branches(env, ns);
    wait::until(
        &format!("SandboxBranch {ns}/{name} to be Ready"),
        timeout,
        || async {
            env.check_processes()?;
            let branch = api.get(name).await?;
            let status = branch.status.clone().unwrap_or_default();
            if conditions::is_true(&status.conditions, FAILED) {
                bail!(
                    "SandboxBranch {name} failed: {}",
                    describe(&status.conditions)
                );
            }
            Ok(if conditions::is_true(&status.conditions, READY) {
                Look::Done(branch)
            } else {
                Look::NotYet(describe(&status.conditions))
            })
        },
    )
    .await
}

/// Waits until the SandboxBranch has condition Failed=True.
pub async fn branch_failed(
    env: &Env,
    ns: &str,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<SandboxBranch> {
    let api = branches(env, ns);
    wait::until(
        &format!("SandboxBranch {ns}/{name} to fail"),
        timeout,
        || async {
            env.check_processes()?;
            let branch = api.get(name).await?;
            let status = branch.status.clone().unwrap_or_default();
            Ok(if conditions::is_true(&status.conditions, FAILED) {
                Look::Done(branch)
            } else {
                Look::NotYet(describe(&status.conditions))
            })
        },
    )
    .await
}

/// The condition of `type_` in a condition list.
pub fn condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// The node and UID of a Ready Sandbox.
pub fn placement(sandbox: &Sandbox) -> anyhow::Result<(String, String)> {
    let node = sandbox
        .node()
        .context("a Ready Sandbox without status.node")?
        .to_string();
    let uid = sandbox
        .metadata
        .uid
        .clone()
        .context("a Sandbox without a UID")?;
    Ok((node, uid))
}

/// What the first vCPU of a counter guest last reported: (pass, reports).
/// A booted guest reports passes 1, 2, ... so pass == reports; a branch
/// goes on from the captured pass, its reports counted from its restore.
pub async fn counter(env: &Env, node: &str, uid: &str) -> anyhow::Result<(u64, u64)> {
    let mut agent = env.agent(node).await?;
    let sandbox = agent
        .get_sandbox(pb::GetSandboxRequest { uid: uid.into() })
        .await
        .with_context(|| format!("GetSandbox {uid} on {node}"))?
        .into_inner();
    let report = sandbox.vcpu_reports.first().cloned().unwrap_or_default();
    Ok((report.value, report.count))
}

/// Waits until the counter guest `uid` has reported at least `reports`
/// times and returns its (pass, reports).
pub async fn counter_reports(
    env: &Env,
    node: &str,
    uid: &str,
    reports: u64,
    timeout: Duration,
) -> anyhow::Result<(u64, u64)> {
    wait::until(
        &format!("sandbox {uid} on {node} to report {reports} passes"),
        timeout,
        || async {
            let (pass, count) = counter(env, node, uid).await?;
            Ok(if count >= reports {
                Look::Done((pass, count))
            } else {
                Look::NotYet(format!("pass {pass}, {count} reports"))
            })
        },
    )
    .await
}
