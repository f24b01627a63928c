//! Leader election on a `coordination.k8s.io/v1` Lease, the way client-go's
//! leaderelection does it: the holder renews `renewTime` every
//! `retry_period`; another replica takes the Lease over only once
//! `renewTime + leaseDurationSeconds` has passed. Every write carries the
//! `resourceVersion` it read, so two replicas racing for an expired Lease
//! cannot both win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::SignedDuration;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::context::{Clock, FIELD_MANAGER};
use crate::error::ErrorChain;

#[derive(Clone, Debug, clap::Args)]
pub struct LeaderArgs {
    /// Run the controllers only while holding the leader Lease.
    #[arg(long, env = "SANDFORK_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Name of the leader Lease (in the operator's namespace).
    #[arg(
        long,
        env = "SANDFORK_LEADER_LEASE",
        default_value = "sandfork-operator-leader"
    )]
    pub leader_lease_name: String,
    /// Seconds a leader's Lease stays valid without renewal.
    #[arg(long, default_value_t = 15)]
    pub leader_lease_seconds: u32,
    /// Seconds between renewals (and between tries to acquire).
    #[arg(long, default_value_t = 2)]
    pub leader_retry_seconds: u64,
    /// A leader that could not renew for this many seconds stops acting.
    #[arg(long, default_value_t = 10)]
    pub leader_renew_deadline_seconds: u64,
}

pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
    clock: Clock,
}

/// The result of one try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// This replica holds the Lease (acquired or renewed).
    Leading,
    /// Another replica holds a valid Lease.
    Following,
}

impl LeaderElector {
    pub fn new(
        api: Api<Lease>,
        name: &str,
        identity: &str,
        lease_duration: Duration,
        clock: Clock,
    ) -> Self {
        Self {
            api,
            name: name.into(),
            identity: identity.into(),
            lease_duration,
            clock,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Acquires or renews the Lease once. A lost race reads as `Following`.
    pub async fn try_acquire_or_renew(&self) -> kube::Result<Outcome> {
        let now = self.clock.now();
        let duration_secs = i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let Some(current) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&post_params(), &lease).await {
                Ok(_) => Ok(Outcome::Leading),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(Outcome::Following),
                Err(err) => Err(err),
            };
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let held_by_me = holder == self.identity;
        let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
            (Some(renewed), Some(secs)) => renewed.0 + SignedDuration::from_secs(secs.into()) < now,
            _ => true,
        };
        if !held_by_me && !holder.is_empty() && !expired {
            return Ok(Outcome::Following);
        }
        let mut lease = current.clone();
        let mut new_spec = spec.clone();
        if !held_by_me {
            new_spec.holder_identity = Some(self.identity.clone());
            new_spec.acquire_time = Some(MicroTime(now));
            new_spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        new_spec.renew_time = Some(MicroTime(now));
        new_spec.lease_duration_seconds = Some(duration_secs);
        lease.spec = Some(new_spec);
        // `replace` sends the resourceVersion read above: a concurrent
        // writer makes this fail with 409 instead of both winning.
        match self.api.replace(&self.name, &post_params(), &lease).await {
            Ok(_) => Ok(Outcome::Leading),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Outcome::Following),
            Err(err) => Err(err),
        }
    }

    /// Gives the Lease up so that another replica can take over at once.
    pub async fn release(&self) -> kube::Result<()> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(self.clock.now()));
        match self.api.replace(&self.name, &post_params(), &lease).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(err) => Err(err),
        }
    }
}

fn post_params() -> PostParams {
    PostParams {
        dry_run: false,
        field_manager: Some(FIELD_MANAGER.into()),
    }
}

/// One try, given up after `limit` (a hung request must not stall election).
async fn try_within(elector: &LeaderElector, limit: Duration) -> kube::Result<Outcome> {
    tokio::time::timeout(limit, elector.try_acquire_or_renew())
        .await
        .unwrap_or_else(|_| {
            Err(kube::Error::Service(
                "leader Lease request timed out".to_string().into(),
            ))
        })
}

/// Tries every `retry` until this replica leads.
pub async fn acquire(elector: &LeaderElector, retry: Duration) {
    let mut announced = false;
    loop {
        match try_within(elector, retry.max(Duration::from_secs(5))).await {
            Ok(Outcome::Leading) => return,
            Ok(Outcome::Following) => {
                if !announced {
                    tracing::info!(
                        identity = elector.identity(),
                        "another replica leads; waiting"
                    );
                    announced = true;
                }
            }
            Err(err) => {
                tracing::warn!(error = %ErrorChain(&err), "leader election: could not read or write the Lease")
            }
        }
        tokio::time::sleep(retry).await;
    }
}

/// Renews every `retry` while leading; returns when leadership is lost
/// (another holder, or no successful renewal for `renew_deadline`).
pub async fn hold(elector: &LeaderElector, retry: Duration, renew_deadline: Duration) {
    let mut last_renewal = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(retry).await;
        match try_within(elector, renew_deadline).await {
            Ok(Outcome::Leading) => last_renewal = tokio::time::Instant::now(),
            Ok(Outcome::Following) => {
                tracing::error!("leader Lease taken by another replica");
                return;
            }
            Err(err) => {
                tracing::warn!(error = %ErrorChain(&err), "could not renew the leader Lease");
                if last_renewal.elapsed() > renew_deadline {
                    tracing::error!("leader Lease not renewed within the renew deadline");
                    return;
                }
            }
        }
    }
}
