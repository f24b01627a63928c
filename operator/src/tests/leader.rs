use std::time::Duration;

use http::Method;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;

use super::*;
use crate::leader::{LeaderElector, Outcome};

const LEASE_NS: &str = "sandfork-system";

fn elector(h: &Harness, identity: &str) -> LeaderElector {
    LeaderElector::new(
        Api::namespaced(h.client.clone(), LEASE_NS),
        "sandfork-operator-leader",
        identity,
        Duration::from_secs(15),
        h.clock.clone(),
    )
}

fn lease(h: &Harness) -> LeaseSpec {
    h.api
        .get::<Lease>(Some(LEASE_NS), "sandfork-operator-leader")
        .expect("leader lease exists")
        .spec
        .unwrap()
}

#[tokio::test]
async fn the_first_replica_creates_the_lease_and_leads() {
    let h = Harness::new().await;
    let a = elector(&h, "operator-a");
    assert_eq!(a.try_acquire_or_renew().await.unwrap(), Outcome::Leading);
    let spec = lease(&h);
    assert_eq!(spec.holder_identity.as_deref(), Some("operator-a"));
    assert_eq!(spec.lease_duration_seconds, Some(15));
    assert_eq!(spec.lease_transitions, Some(0));
}

#[tokio::test]
async fn a_second_replica_follows_until_the_lease_expires() {
    let h = Harness::new().await;
    let a = elector(&h, "operator-a");
    let b = elector(&h, "operator-b");
    assert_eq!(a.try_acquire_or_renew().await.unwrap(), Outcome::Leading);
    assert_eq!(b.try_acquire_or_renew().await.unwrap(), Outcome::Following);

    h.clock.advance(Duration::from_secs(10));
    assert_eq!(
        a.try_acquire_or_renew().await.unwrap(),
        Outcome::Leading,
        "renewal"
    );
    h.clock.advance(Duration::from_secs(10));
    assert_eq!(
        b.try_acquire_or_renew().await.unwrap(),
        Outcome::Following,
        "renewed 10 s ago"
    );

    h.clock.advance(Duration::from_secs(16));
    assert_eq!(
        b.try_acquire_or_renew().await.unwrap(),
        Outcome::Leading,
        "expired: taken over"
    );
    let spec = lease(&h);
    assert_eq!(spec.holder_identity.as_deref(), Some("operator-b"));
    assert_eq!(spec.lease_transitions, Some(1));
    assert_eq!(a.try_acquire_or_renew().await.unwrap(), Outcome::Following);
}

#[tokio::test]
async fn a_lost_race_is_following_not_leading() {
    let h = Harness::new().await;
    let a = elector(&h, "operator-a");
    assert_eq!(a.try_acquire_or_renew().await.unwrap(), Outcome::Leading);
    h.clock.advance(Duration::from_secs(20));
    let b = elector(&h, "operator-b");
    // Someone else wrote the Lease between b's read and b's write.
    h.api
        .fail(Method::PUT, "/leases/sandfork-operator-leader", 409, 1);
    assert_eq!(b.try_acquire_or_renew().await.unwrap(), Outcome::Following);
    assert_eq!(lease(&h).holder_identity.as_deref(), Some("operator-a"));
}

#[tokio::test]
async fn release_lets_another_replica_lead_at_once() {
    let h = Harness::new().await;
    let a = elector(&h, "operator-a");
    let b = elector(&h, "operator-b");
    a.try_acquire_or_renew().await.unwrap();
    a.release().await.unwrap();
    assert_eq!(lease(&h).holder_identity, None);
    assert_eq!(b.try_acquire_or_renew().await.unwrap(), Outcome::Leading);
    // Releasing a Lease one does not hold changes nothing.
    a.release().await.unwrap();
    assert_eq!(lease(&h).holder_identity.as_deref(), Some("operator-b"));
}
