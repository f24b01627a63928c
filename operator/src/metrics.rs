//! Prometheus metrics: reconciles and their errors, and the numbers a user
//! of branches cares about (capture pause, capture and restore durations,
//! apply-to-ready).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: &'static str,
    pub error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabels {
    pub mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Family<ControllerLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Family<ControllerLabels, Histogram>,
    pub capture_pause: Family<ModeLabels, Histogram>,
    pub capture_duration: Family<ModeLabels, Histogram>,
    pub restore_duration: Histogram,
    pub apply_to_ready: Family<KindLabels, Histogram>,
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sandfork");
        let reconciles = Family::<ControllerLabels, Counter>::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that returned an error",
            reconcile_errors.clone(),
        );
        let reconcile_duration =
            Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 16))
            });
        registry.register_with_unit(
            "reconcile_duration",
            "Time one reconcile took",
            Unit::Seconds,
            reconcile_duration.clone(),
        );
        // 10 us .. ~2.6 s
        let capture_pause = Family::<ModeLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_01, 2.0, 19))
        });
        registry.register_with_unit(
            "capture_pause",
            "How long a captured source's vCPUs were paused",
            Unit::Seconds,
            capture_pause.clone(),
        );
        // 1 ms .. ~65 s
        let capture_duration = Family::<ModeLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 17))
        });
        registry.register_with_unit(
            "capture_duration",
            "How long a capture's memory copy took",
            Unit::Seconds,
            capture_duration.clone(),
        );
        let restore_duration = Histogram::new(exponential_buckets(0.000_5, 2.0, 16));
        registry.register_with_unit(
            "restore_duration",
            "Time of an agent's RestoreBranch call, as the operator saw it",
            Unit::Seconds,
            restore_duration.clone(),
        );
        let apply_to_ready = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.01, 2.0, 16))
        });
        registry.register_with_unit(
            "apply_to_ready",
            "From an object's creation to its first Ready (a SandboxBranch: all its branches)",
            Unit::Seconds,
            apply_to_ready.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            capture_pause,
            capture_duration,
            restore_duration,
            apply_to_ready,
            leader,
        }
    }
}

impl Metrics {
    pub fn reconciled(&self, controller: &'static str, took: Duration) {
        self.reconciles
            .get_or_create(&ControllerLabels { controller })
            .inc();
        self.reconcile_duration
            .get_or_create(&ControllerLabels { controller })
            .observe(took.as_secs_f64());
    }

    pub fn failed(&self, controller: &'static str, error: &'static str) {
        self.reconcile_errors
            .get_or_create(&ErrorLabels { controller, error })
            .inc();
    }

    /// The registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_domain_histograms() {
        let metrics = Metrics::default();
        metrics.reconciled("sandboxbranch", Duration::from_millis(3));
        metrics
            .capture_pause
            .get_or_create(&ModeLabels { mode: "Live" })
            .observe(0.000_2);
        let text = metrics.encode();
        assert!(
            text.contains("sandfork_reconciles_total{controller=\"sandboxbranch\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("sandfork_capture_pause_seconds_count{mode=\"Live\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("sandfork_restore_duration_seconds_count 0"),
            "{text}"
        );
    }
}
