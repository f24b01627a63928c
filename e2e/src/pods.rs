//! The chart's Pods, as the API server reports them.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

/// Label that tells the chart's components apart.
const COMPONENT: &str = "app.kubernetes.io/component";

async fn list(client: &kube::Client, namespace: &str, selector: &str) -> kube::Result<Vec<Pod>> {
    let params = if selector.is_empty() {
        ListParams::default()
    } else {
        ListParams::default().labels(selector)
    };
    Ok(Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&params)
        .await?
        .items)
}

fn name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

/// Whether the Pod is Running with condition Ready=True and not being deleted.
pub fn is_ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    pod.metadata.deletion_timestamp.is_none()
        && status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|conditions| {
                conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
}

/// The Pods of a component (`operator`, `agent`).
pub async fn of_component(
    client: &kube::Client,
    namespace: &str,
    component: &str,
) -> kube::Result<Vec<Pod>> {
    list(client, namespace, &format!("{COMPONENT}={component}")).await
}

/// Names of the component's Pods that are Ready.
pub async fn running(
    client: &kube::Client,
    namespace: &str,
    component: &str,
) -> kube::Result<Vec<String>> {
    Ok(of_component(client, namespace, component)
        .await?
        .iter()
        .filter(|pod| is_ready(pod))
        .map(name)
        .collect())
}

/// Names of all Pods in the namespace.
pub async fn names(client: &kube::Client, namespace: &str) -> kube::Result<Vec<String>> {
    Ok(list(client, namespace, "")
        .await?
        .iter()
        .map(name)
        .collect())
}

/// Pods with a container waiting in CrashLoopBackOff (or another error
/// that does not go away by itself), with that reason.
pub async fn crash_looping(
    client: &kube::Client,
    namespace: &str,
) -> kube::Result<Vec<(String, String)>> {
    const STUCK: [&str; 4] = [
        "CrashLoopBackOff",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "InvalidImageName",
    ];
    Ok(list(client, namespace, "")
        .await?
        .iter()
        .filter_map(|pod| {
            let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
            statuses.iter().find_map(|status| {
                let reason = status.state.as_ref()?.waiting.as_ref()?.reason.clone()?;
                STUCK
                    .contains(&reason.as_str())
                    .then(|| (name(pod), reason))
            })
        })
        .collect())
}

/// The node a Pod was bound to.
pub fn node_of(pod: &Pod) -> Option<String> {
    pod.spec.as_ref()?.node_name.clone()
}

/// The agent Pod on `node`, if there is one (and not being deleted).
pub async fn agent_on(
    client: &kube::Client,
    namespace: &str,
    node: &str,
) -> kube::Result<Option<Pod>> {
    Ok(of_component(client, namespace, "agent")
        .await?
        .into_iter()
        .find(|pod| {
            node_of(pod).as_deref() == Some(node) && pod.metadata.deletion_timestamp.is_none()
        }))
}

/// The UID of a Pod.
pub fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

/// Deletes a Pod with its default grace period.
pub async fn delete(client: &kube::Client, namespace: &str, name: &str) -> kube::Result<()> {
    Api::<Pod>::namespaced(client.clone(), namespace)
        .delete(name, &Default::default())
        .await?;
    Ok(())
}

/// The kind and UID of the Pod's controlling owner.
pub fn controller(pod: &Pod) -> Option<(String, String)> {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|owner| owner.controller == Some(true))
        .map(|owner| (owner.kind.clone(), owner.uid.clone()))
}

/// The Pod the operator runs Sandbox `sandbox` in, if there is one: made
/// for it, or a warm Pod claimed for it (both are labelled with its name).
pub async fn of_sandbox(
    client: &kube::Client,
    namespace: &str,
    sandbox: &str,
) -> kube::Result<Option<Pod>> {
    let selector = format!("{}={sandbox}", sandfork_api::labels::SANDBOX);
    let listed = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&kube::api::ListParams::default().labels(&selector))
        .await?;
    Ok(listed.items.into_iter().next())
}
