//! Registration and heartbeat: the agent keeps a `coordination.k8s.io/v1`
//! Lease `sandfork-agent-<node>` whose annotations say where its gRPC
//! service listens, what it can hold and whether its devices work (see
//! [`sandfork_api::agent::lease`]). It renews `renewTime` every
//! `renew_interval`; the operator treats it as dead once
//! `renewTime + leaseDurationSeconds` has passed.
//!
//! Every renewal is a server-side apply of the whole Lease with the field
//! manager `sandfork-agent`, so it creates the Lease when missing and needs
//! no read-modify-write. On shutdown the Lease is left to expire: the VMs
//! outlive the agent, and a missing Lease would tell the operator that the
//! node has no agent at all. In a Pod, the Lease is owned by that Pod, so
//! it goes when the agent's Pod is deleted for good (`helm uninstall`); a
//! replacement Pod takes it over at its first renewal.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ObjectMeta, Patch, PatchParams};
use sandfork_api::agent::lease as keys;

use super::health::{self, Capacity};
use super::probes::Readiness;

pub const FIELD_MANAGER: &str = "sandfork-agent";

/// What the Lease says.
#[derive(Clone, Debug)]
pub struct Registration {
    /// Namespace of the Lease.
    pub namespace: String,
    pub node_name: String,
    /// `host:port` the operator dials.
    pub endpoint: String,
    pub capacity: Capacity,
    pub lease_duration: Duration,
    /// The agent's Pod (name, UID), which owns the Lease.
    pub pod: Option<(String, String)>,
}

impl Registration {
    /// The Lease as of `now`, with the devices as `devices` found them.
    pub fn lease(&self, now: Timestamp, acquired: Timestamp, devices: &health::Devices) -> Lease {
        let bool_str = |ok: bool| if ok { "true" } else { "false" }.to_string();
        let mut annotations = BTreeMap::from([
            (keys::ENDPOINT.to_string(), self.endpoint.clone()),
            (
                keys::MEMORY_MIB.to_string(),
                self.capacity.memory_mib.to_string(),
            ),
            (
                keys::MAX_SANDBOXES.to_string(),
                self.capacity.max_sandboxes.to_string(),
            ),
            (keys::KVM.to_string(), bool_str(devices.kvm.is_ok())),
            (
                keys::USERFAULTFD.to_string(),
                bool_str(devices.userfaultfd.is_ok()),
            ),
            (
                keys::VERSION.to_string(),
                env!("CARGO_PKG_VERSION").to_string(),
            ),
        ]);
        if let Err(why) = &devices.kvm {
            annotations.insert("sandfork.dev/kvm-error".into(), why.clone());
        }
        if let Err(why) = &devices.userfaultfd {
            annotations.insert("sandfork.dev/userfaultfd-error".into(), why.clone());
        }
        Lease {
            metadata: ObjectMeta {
                name: Some(keys::name(&self.node_name)),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([
                    (
                        keys::COMPONENT_LABEL.to_string(),
                        keys::COMPONENT_VALUE.to_string(),
                    ),
                    (keys::NODE_LABEL.to_string(), self.node_name.clone()),
                ])),
                annotations: Some(annotations),
                owner_references: self.pod.as_ref().map(|(name, uid)| {
                    vec![OwnerReference {
                        api_version: "v1".into(),
                        kind: "Pod".into(),
                        name: name.clone(),
                        uid: uid.clone(),
                        block_owner_deletion: Some(false),
                        controller: Some(false),
                    }]
                }),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.node_name.clone()),
                lease_duration_seconds: Some(
                    i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX),
                ),
                acquire_time: Some(MicroTime(acquired)),
                renew_time: Some(MicroTime(now)),
                ..LeaseSpec::default()
            }),
        }
    }
}

/// Writes the Lease once; returns the devices as it found them.
pub async fn renew(
    api: &Api<Lease>,
    registration: &Registration,
    acquired: Timestamp,
) -> kube::Result<health::Devices> {
    let devices = tokio::task::spawn_blocking(health::check)
        .await
        .unwrap_or_else(|err| health::Devices {
            kvm: Err(err.to_string()),
            userfaultfd: Err(err.to_string()),
        });
    let mut lease = registration.lease(Timestamp::now(), acquired, &devices);
    // Server-side apply wants the kind spelled out.
    let mut value = serde_json::to_value(&lease).expect("a Lease serializes");
    value["apiVersion"] = "coordination.k8s.io/v1".into();
    value["kind"] = "Lease".into();
    let name = lease.metadata.name.take().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&value),
    )
    .await?;
    Ok(devices)
}

/// Renews the Lease every `interval` until the future is dropped. Errors are
/// logged and retried at the next tick. `acquired` is when this agent
/// process first wrote it. Each renewal is recorded in `readiness`.
pub async fn heartbeat(
    api: Api<Lease>,
    registration: Registration,
    interval: Duration,
    acquired: Timestamp,
    readiness: std::sync::Arc<Readiness>,
) {
    let mut failing = false;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let attempt = tokio::time::timeout(
            interval.max(Duration::from_secs(5)),
            renew(&api, &registration, acquired),
        )
        .await;
        let result = attempt
            .unwrap_or_else(|_| Err(kube::Error::Service("renewal timed out".to_string().into())));
        match result {
            Ok(devices) => {
                readiness.record(devices);
                if failing {
                    tracing::info!("agent Lease renewed again");
                }
                failing = false;
            }
            Err(err) => {
                tracing::warn!(%err, lease = keys::name(&registration.node_name), "could not renew the agent Lease");
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_says_where_and_what() {
        let registration = Registration {
            namespace: "sandfork-system".into(),
            node_name: "node-a".into(),
            endpoint: "10.0.0.7:7443".into(),
            capacity: Capacity {
                memory_mib: 16384,
                max_sandboxes: 32,
            },
            lease_duration: Duration::from_secs(40),
            pod: Some(("sandfork-agent-x7k2p".into(), "0d3f-uid".into())),
        };
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let devices = health::Devices {
            kvm: Ok(()),
            userfaultfd: Err("cannot open /dev/userfaultfd: Permission denied".into()),
        };
        let lease = registration.lease(now, now, &devices);
        assert_eq!(
            lease.metadata.name.as_deref(),
            Some("sandfork-agent-node-a")
        );
        let annotations = lease.metadata.annotations.unwrap();
        assert_eq!(annotations[keys::ENDPOINT], "10.0.0.7:7443");
        assert_eq!(annotations[keys::MEMORY_MIB], "16384");
        assert_eq!(annotations[keys::MAX_SANDBOXES], "32");
        assert_eq!(annotations[keys::KVM], "true");
        assert_eq!(annotations[keys::USERFAULTFD], "false");
        assert!(annotations["sandfork.dev/userfaultfd-error"].contains("Permission denied"));
        let owners = lease.metadata.owner_references.unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(
            (
                owners[0].kind.as_str(),
                owners[0].name.as_str(),
                owners[0].uid.as_str()
            ),
            ("Pod", "sandfork-agent-x7k2p", "0d3f-uid")
        );
        let labels = lease.metadata.labels.unwrap();
        assert_eq!(labels[keys::NODE_LABEL], "node-a");
        assert_eq!(labels[keys::COMPONENT_LABEL], keys::COMPONENT_VALUE);
        let spec = lease.spec.unwrap();
        assert_eq!(spec.lease_duration_seconds, Some(40));
        assert_eq!(spec.renew_time.unwrap().0, now);
    }
}
