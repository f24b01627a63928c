//! The committed CRDs are the generated ones, and the schema's defaults and
//! CEL rules say what the API promises.

use kube::core::cel::{validate_cel, validate_cel_update};
use sandfork_api::branch::{CaptureMode, DeletionPolicy};
use sandfork_api::{Sandbox, SandboxBranch};

#[test]
fn committed_crds_are_current() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let mut stale = Vec::new();
    for (name, yaml) in sandfork_api::crdgen::render() {
        let committed = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        if committed != yaml {
            stale.push(name);
        }
    }
    assert!(
        stale.is_empty(),
        "crds/ is stale ({stale:?}); run `cargo run -p sandfork-api --bin crdgen` and commit the result"
    );
}

#[test]
fn the_chart_carries_the_committed_crds() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (name, _) in sandfork_api::crdgen::render() {
        let committed = std::fs::read_to_string(root.join("crds").join(name)).unwrap();
        let charted = std::fs::read_to_string(root.join("charts/sandfork/crds").join(name))
            .unwrap_or_default();
        assert!(
            committed == charted,
            "charts/sandfork/crds/{name} differs from crds/{name}; copy it over"
        );
    }
}

fn branch(yaml: &str) -> SandboxBranch {
    serde_yaml_ng::from_str(yaml).unwrap()
}

fn sandbox(yaml: &str) -> Sandbox {
    serde_yaml_ng::from_str(yaml).unwrap()
}

const BRANCH: &str = r#"
apiVersion: sandfork.dev/v1alpha1
kind: SandboxBranch
metadata: {name: fork, namespace: default}
spec:
  sourceRef: {name: src}
"#;

const SANDBOX: &str = r#"
apiVersion: sandfork.dev/v1alpha1
kind: Sandbox
metadata: {name: src, namespace: default}
spec:
  guest: {builtin: Counter}
  memoryMiB: 256
"#;

#[test]
fn branch_defaults() {
    let b = branch(BRANCH);
    assert_eq!(b.spec.branches, 1);
    assert_eq!(b.spec.mode, CaptureMode::Live);
    assert_eq!(b.spec.deletion_policy, DeletionPolicy::Delete);
    assert_eq!(
        std::time::Duration::from(b.spec.failure_deadline),
        std::time::Duration::from_secs(300)
    );
    validate_cel(&b).unwrap();
    let s = sandbox(SANDBOX);
    assert_eq!(s.spec.vcpus, 1);
    validate_cel(&s).unwrap();
}

#[test]
fn source_ref_and_mode_are_immutable() {
    let old = branch(BRANCH);
    let mut new = old.clone();
    new.spec.source_ref.name = "other".into();
    let err = validate_cel_update(&new, &old).unwrap_err().to_string();
    assert!(err.contains("sourceRef is immutable"), "{err}");

    let mut new = old.clone();
    new.spec.mode = CaptureMode::StopAndCopy;
    let err = validate_cel_update(&new, &old).unwrap_err().to_string();
    assert!(err.contains("mode is immutable"), "{err}");

    let mut new = old.clone();
    new.spec.branches = 5;
    validate_cel_update(&new, &old).unwrap();
}

#[test]
fn failure_deadline_is_bounded() {
    let mut b = branch(BRANCH);
    b.spec.failure_deadline = std::time::Duration::from_secs(25 * 3600).into();
    let err = validate_cel(&b).unwrap_err().to_string();
    assert!(err.contains("failureDeadline"), "{err}");
}

#[test]
fn long_branch_names_are_refused() {
    let mut b = branch(BRANCH);
    b.metadata.name = Some("a".repeat(241));
    let err = validate_cel(&b).unwrap_err().to_string();
    assert!(err.contains("at most 240"), "{err}");
}

#[test]
fn sandbox_spec_is_immutable_and_guest_is_one_of() {
    let old = sandbox(SANDBOX);
    let mut new = old.clone();
    new.spec.memory_mib = 512;
    let err = validate_cel_update(&new, &old).unwrap_err().to_string();
    assert!(err.contains("immutable"), "{err}");

    let mut both = old.clone();
    both.spec.guest.image = Some("example.com/guest:1".into());
    let err = validate_cel(&both).unwrap_err().to_string();
    assert!(err.contains("exactly one"), "{err}");

    let mut dirty_without_dirty = old.clone();
    dirty_without_dirty.spec.guest.dirty = Some(Default::default());
    let err = validate_cel(&dirty_without_dirty).unwrap_err().to_string();
    assert!(err.contains("guest.dirty"), "{err}");
}
