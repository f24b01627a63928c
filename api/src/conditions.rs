//! Status conditions as the Kubernetes API conventions describe them
//! (`metav1.Condition`, a list-type map keyed by `type`), and helpers that
//! keep `lastTransitionTime` stable while a condition's status does not change.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::{Schema, SchemaGenerator, json_schema};

/// Condition types used by both kinds.
pub const READY: &str = "Ready";
/// A SandboxBranch is capturing or restoring.
pub const PROGRESSING: &str = "Progressing";
/// A SandboxBranch gave up; it will not be retried until its spec changes.
pub const FAILED: &str = "Failed";

pub const TRUE: &str = "True";
pub const FALSE: &str = "False";
pub const UNKNOWN: &str = "Unknown";

/// Schema for a `conditions` field: `metav1.Condition` items in a list-type
/// map keyed by `type`, so that server-side apply merges them by type.
pub fn schema(generator: &mut SchemaGenerator) -> Schema {
    let item = generator.subschema_for::<Condition>();
    json_schema!({
        "type": "array",
        "description": "Conditions following the Kubernetes API conventions; `Ready` is the summary.",
        "items": item,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
    })
}

/// A condition to set, without the bookkeeping fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond<'a> {
    pub type_: &'a str,
    pub status: bool,
    pub reason: &'a str,
    pub message: String,
}

impl<'a> Cond<'a> {
    pub fn new(type_: &'a str, status: bool, reason: &'a str, message: impl Into<String>) -> Self {
        Self {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// Builds the condition list to write: each condition in `set` replaces the
/// one of its type in `old`, keeping the old `lastTransitionTime` when the
/// status is unchanged; conditions of other types in `old` are kept.
pub fn merge(
    old: &[Condition],
    set: &[Cond<'_>],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    let mut out: Vec<Condition> = old
        .iter()
        .filter(|c| !set.iter().any(|s| s.type_ == c.type_))
        .cloned()
        .collect();
    for s in set {
        let status = if s.status { TRUE } else { FALSE };
        let last_transition_time = old
            .iter()
            .find(|c| c.type_ == s.type_ && c.status == status)
            .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
        out.push(Condition {
            type_: s.type_.to_string(),
            status: status.to_string(),
            reason: s.reason.to_string(),
            message: s.message.clone(),
            observed_generation: generation,
            last_transition_time,
        });
    }
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

/// The condition of type `type_`, if present.
pub fn find<'c>(conditions: &'c [Condition], type_: &str) -> Option<&'c Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of type `type_` is present with status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == TRUE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).unwrap())
    }

    #[test]
    fn keeps_transition_time_while_status_is_unchanged() {
        let first = merge(
            &[],
            &[Cond::new(READY, false, "Starting", "starting")],
            Some(1),
            &at(10),
        );
        assert_eq!(first[0].last_transition_time, at(10));
        let second = merge(
            &first,
            &[Cond::new(READY, false, "Placing", "placing")],
            Some(2),
            &at(20),
        );
        assert_eq!(second[0].last_transition_time, at(10));
        assert_eq!(second[0].reason, "Placing");
        assert_eq!(second[0].observed_generation, Some(2));
        let third = merge(
            &second,
            &[Cond::new(READY, true, "Running", "")],
            Some(2),
            &at(30),
        );
        assert_eq!(third[0].last_transition_time, at(30));
        assert_eq!(third[0].status, TRUE);
    }

    #[test]
    fn keeps_other_types_and_sorts() {
        let old = merge(&[], &[Cond::new(READY, false, "A", "")], None, &at(1));
        let new = merge(&old, &[Cond::new(FAILED, false, "B", "")], None, &at(2));
        assert_eq!(new.len(), 2);
        assert_eq!(new[0].type_, FAILED);
        assert!(!is_true(&new, READY));
        assert!(find(&new, READY).is_some());
    }
}
