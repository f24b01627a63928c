//! A namespace per scenario, deleted afterwards (with everything in it).

use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};

use crate::wait::{self, Look};

/// Label on every namespace the tests create.
pub const LABEL: &str = "sandfork.dev/e2e";

/// Creates namespace `e2e-<scenario>-<suffix>` and returns its name.
pub async fn create(client: &kube::Client, scenario: &str) -> anyhow::Result<String> {
    // Unique across runs against one cluster (an old run's namespace may
    // still be terminating).
    let suffix = format!(
        "{:x}",
        std::time::UNIX_EPOCH.elapsed()?.as_millis() & 0xff_ffff
    );
    let name: String = format!("e2e-{scenario}-{suffix}")
        .to_lowercase()
        .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "-")
        .chars()
        .take(63)
        .collect();
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some([(LABEL.to_string(), "true".to_string())].into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    Ok(name)
}

/// Deletes the namespace and waits until it is gone: the operator's
/// finalizers ran, so the agents freed what the namespace's objects held.
pub async fn delete(client: &kube::Client, name: &str, timeout: Duration) -> anyhow::Result<()> {
    let api = Api::<Namespace>::all(client.clone());
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => return Ok(()),
        Err(err) => return Err(err).with_context(|| format!("deleting namespace {name}")),
    }
    wait::until(
        &format!("namespace {name} to be deleted"),
        timeout,
        || async {
            Ok(match api.get_opt(name).await? {
                None => Look::Done(()),
                Some(ns) => Look::NotYet(format!("{:?}", ns.status.and_then(|s| s.conditions))),
            })
        },
    )
    .await
}
