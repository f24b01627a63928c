//! `/livez` and `/readyz` for the kubelet's probes, on a plain HTTP port
//! (by default on the node's loopback only: they say nothing secret, but
//! nothing reaches the agent unauthenticated from outside the node).
//!
//! Ready means what the operator needs from this node: KVM and
//! userfaultfd work (as the last Lease renewal found them) and the Lease
//! that tells the operator where to dial was renewed within its duration.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;

use super::health::Devices;

/// What the readiness probe answers from, updated by the Lease heartbeat.
#[derive(Debug)]
pub struct Readiness {
    /// `None` when the agent keeps no Lease (`--register=false`).
    lease_duration: Option<Duration>,
    last: Mutex<Option<(Instant, Devices)>>,
}

impl Readiness {
    pub fn new(lease_duration: Option<Duration>) -> Arc<Self> {
        Arc::new(Self {
            lease_duration,
            last: Mutex::new(None),
        })
    }

    /// A check of the devices, made with a renewal of the Lease (or, with
    /// no Lease, on its own).
    pub fn record(&self, devices: Devices) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), devices));
    }

    /// `Ok` with a short word, or why not ready.
    pub fn check(&self, now: Instant) -> Result<&'static str, String> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let Some((at, devices)) = last.as_ref() else {
            return Err("not registered yet".into());
        };
        if let Err(why) = &devices.kvm {
            return Err(format!("KVM does not work on this node: {why}"));
        }
        if let Err(why) = &devices.userfaultfd {
            return Err(format!("userfaultfd does not work on this node: {why}"));
        }
        if let Some(duration) = self.lease_duration {
            let age = now.saturating_duration_since(*at);
            if age > duration {
                return Err(format!(
                    "the Lease was last renewed {}s ago, past its {}s",
                    age.as_secs(),
                    duration.as_secs()
                ));
            }
        }
        Ok("ok")
    }
}

fn router(readiness: Arc<Readiness>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(readiness)
}

async fn ready(State(readiness): State<Arc<Readiness>>) -> (StatusCode, String) {
    match readiness.check(Instant::now()) {
        Ok(word) => (StatusCode::OK, word.to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

/// Binds `addr` and serves the probes in the background.
pub async fn spawn(
    addr: SocketAddr,
    readiness: Arc<Readiness>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /livez and /readyz");
    Ok(tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, router(readiness)).await {
            tracing::error!(%err, "the probe server stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn working() -> Devices {
        Devices {
            kvm: Ok(()),
            userfaultfd: Ok(()),
        }
    }

    #[test]
    fn ready_only_with_working_devices_and_a_fresh_lease() {
        let readiness = Readiness::new(Some(Duration::from_secs(40)));
        let start = Instant::now();
        assert_eq!(
            readiness.check(start).unwrap_err(),
            "not registered yet".to_string()
        );
        readiness.record(working());
        assert_eq!(readiness.check(start), Ok("ok"));
        let stale = readiness
            .check(start + Duration::from_secs(41))
            .unwrap_err();
        assert!(stale.contains("past its 40s"), "{stale}");
        readiness.record(Devices {
            kvm: Ok(()),
            userfaultfd: Err("cannot open /dev/userfaultfd: Permission denied".into()),
        });
        let broken = readiness.check(Instant::now()).unwrap_err();
        assert!(broken.contains("userfaultfd"), "{broken}");
    }

    #[test]
    fn without_a_lease_only_the_devices_count() {
        let readiness = Readiness::new(None);
        readiness.record(working());
        assert_eq!(
            readiness.check(Instant::now() + Duration::from_secs(3600)),
            Ok("ok")
        );
    }
}
