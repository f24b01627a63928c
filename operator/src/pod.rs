//! The Pod a Sandbox runs in: one `vmm` container that the scheduler places
//! and the kubelet starts like any other, inside which the node's agent then
//! starts the VM (KubeVirt's virt-launcher, one Pod per VM).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, EmptyDirVolumeSource, EnvVar, ExecAction, ImageVolumeSource,
    NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod, PodSpec, Probe,
    ResourceRequirements, SeccompProfile, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use sandfork_api::deviceplugin::KVM_RESOURCE;
use sandfork_api::sandbox::{BuiltinWorkload, GuestSpec};
use sandfork_api::{Sandbox, SandboxSpec, SandboxWarmPool, labels, pod};

/// Where the VMM binary lies in the agent image.
const VMM_BINARY: &str = "/sandfork-agent";
/// Longest name the API server takes for a Pod (a DNS subdomain).
const MAX_POD_NAME: usize = 253;
/// Long enough for a capture's copy in the Pod to finish after it is told to stop.
const TERMINATION_GRACE_SECONDS: i64 = 30;

/// The image the `vmm` container runs, and when to pull it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmmImage {
    pub image: String,
    pub pull_policy: String,
}

/// The VMM's socket volume and, for a guest image, that image as a volume.
fn volumes(guest_image: Option<&str>) -> Vec<Volume> {
    let mut volumes = vec![Volume {
        name: pod::VMM_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }];
    if let Some(reference) = guest_image {
        volumes.push(Volume {
            name: pod::GUEST_VOLUME.into(),
            image: Some(ImageVolumeSource {
                reference: Some(reference.into()),
                pull_policy: Some("IfNotPresent".into()),
            }),
            ..Volume::default()
        });
    }
    volumes
}

fn volume_mounts(guest_image: bool) -> Vec<VolumeMount> {
    let mut mounts = vec![VolumeMount {
        name: pod::VMM_VOLUME.into(),
        mount_path: pod::VMM_DIR.into(),
        ..VolumeMount::default()
    }];
    if guest_image {
        mounts.push(VolumeMount {
            name: pod::GUEST_VOLUME.into(),
            mount_path: pod::GUEST_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    mounts
}

/// The Pod of `sandbox`, or why its spec cannot make one.
pub fn sandbox_pod(sandbox: &Sandbox, image: &VmmImage) -> Result<Pod, String> {
    let sandbox_name = sandbox.name_any();
    let name = pod::name(&sandbox_name);
    check_pod_name(&name)?;
    let uid = sandbox
        .uid()
        .ok_or_else(|| "the Sandbox has no UID yet".to_string())?;
    let namespace = sandbox.namespace().unwrap_or_default();
    let mut labels = common_labels();
    labels.insert(labels::SANDBOX.to_string(), sandbox_name.clone());
    labels.insert(labels::SANDBOX_UID.to_string(), uid);
    let metadata = ObjectMeta {
        name: Some(name),
        namespace: Some(namespace.clone()),
        labels: Some(labels),
        owner_references: Some(vec![owner_reference(sandbox)?]),
        ..ObjectMeta::default()
    };
    let env = EnvVar {
        name: "SANDFORK_SANDBOX".into(),
        value: Some(format!("{namespace}/{sandbox_name}")),
        value_from: None,
    };
    vmm_pod(&sandbox.spec, metadata, env, image)
}

/// A warm Pod of `pool` for `node`: the Pod of a Sandbox of the pool's size
/// class, owned by the pool, whose VMM waits for whichever Sandbox claims it.
/// It is Ready once its VMM answers (a startup probe), and only then claimable.
pub fn warm_pod(pool: &SandboxWarmPool, node: &str, image: &VmmImage) -> Result<Pod, String> {
    let pool_name = pool.name_any();
    let namespace = pool.namespace().unwrap_or_default();
    let mut labels = common_labels();
    labels.insert(labels::WARM_POOL.to_string(), pool_name.clone());
    let mut owner = pool
        .controller_owner_ref(&())
        .ok_or_else(|| "the SandboxWarmPool has no name or UID".to_string())?;
    owner.block_owner_deletion = Some(true);
    let metadata = ObjectMeta {
        generate_name: Some(format!("{}{pool_name}-", pod::WARM_NAME_PREFIX)),
        namespace: Some(namespace.clone()),
        labels: Some(labels),
        owner_references: Some(vec![owner]),
        ..ObjectMeta::default()
    };
    let env = EnvVar {
        name: "SANDFORK_WARM_POOL".into(),
        value: Some(format!("{namespace}/{pool_name}")),
        value_from: None,
    };
    let mut pod = vmm_pod(&warm_spec(pool, node), metadata, env, image)?;
    if let Some(spec) = pod.spec.as_mut() {
        spec.containers[0].startup_probe = Some(vmm_answers_probe());
    }
    Ok(pod)
}

/// The spec of the Sandboxes a warm Pod of `pool` on `node` can serve.
pub fn warm_spec(pool: &SandboxWarmPool, node: &str) -> SandboxSpec {
    SandboxSpec {
        guest: GuestSpec::builtin(BuiltinWorkload::Idle),
        memory_mib: pool.spec.memory_mib,
        vcpus: pool.spec.vcpus,
        node_selector: None,
        node_name: Some(node.to_string()),
        affinity: None,
        tolerations: Vec::new(),
        priority_class_name: None,
        resources: pool.spec.resources.clone(),
        restore_from: None,
    }
}

/// Succeeds once the VMM answers on its control socket (run once: a VMM
/// that stops later ends its container, and so the Pod).
fn vmm_answers_probe() -> Probe {
    Probe {
        exec: Some(ExecAction {
            command: Some(
                [VMM_BINARY, "vm-host-probe", "--dir", pod::VMM_DIR]
                    .map(String::from)
                    .to_vec(),
            ),
        }),
        period_seconds: Some(1),
        timeout_seconds: Some(2),
        failure_threshold: Some(120),
        ..Probe::default()
    }
}

/// The labels every sandbox Pod has, warm or not.
fn common_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::NAME.to_string(), labels::NAME_VALUE.to_string()),
        (
            labels::COMPONENT.to_string(),
            labels::COMPONENT_SANDBOX.to_string(),
        ),
        (
            labels::MANAGED_BY.to_string(),
            labels::MANAGED_BY_OPERATOR.to_string(),
        ),
    ])
}

/// The Pod that runs the VMM of a Sandbox with `spec`.
fn vmm_pod(
    spec: &SandboxSpec,
    metadata: ObjectMeta,
    env: EnvVar,
    image: &VmmImage,
) -> Result<Pod, String> {
    let container = Container {
        name: pod::VMM_CONTAINER.into(),
        image: Some(image.image.clone()),
        image_pull_policy: Some(image.pull_policy.clone()),
        command: Some(
            [VMM_BINARY, "vm-host", "--dir", pod::VMM_DIR]
                .map(String::from)
                .to_vec(),
        ),
        env: Some(vec![env]),
        volume_mounts: Some(volume_mounts(spec.guest.image.is_some())),
        resources: Some(resources(spec)?),
        // A VMM that could not start its VM exits with the reason as its
        // last log lines; they become the Pod's message.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        // Root, for /dev/kvm (root:0600 on the nodes), but nothing more: the
        // Pod meets the "baseline" Pod Security level.
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            read_only_root_filesystem: Some(true),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    Ok(Pod {
        metadata,
        spec: Some(PodSpec {
            containers: vec![container],
            volumes: Some(volumes(spec.guest.image.as_deref())),
            // A VM's state cannot be recreated: a Pod that ended stays ended.
            restart_policy: Some("Never".into()),
            termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
            enable_service_links: Some(false),
            automount_service_account_token: Some(false),
            host_network: Some(false),
            node_selector: spec.node_selector.clone().filter(|s| !s.is_empty()),
            affinity: affinity(spec.affinity.clone(), spec.node_name.as_deref()),
            tolerations: (!spec.tolerations.is_empty()).then(|| spec.tolerations.clone()),
            priority_class_name: spec.priority_class_name.clone(),
            ..PodSpec::default()
        }),
        status: None,
    })
}

/// The Sandbox as the Pod's controlling owner: the garbage collector deletes
/// the Pod after it, and not before the Pod is gone when deletion is in the
/// foreground.
pub(crate) fn owner_reference(
    sandbox: &Sandbox,
) -> Result<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference, String> {
    let mut owner = sandbox
        .controller_owner_ref(&())
        .ok_or_else(|| "the Sandbox has no name or UID".to_string())?;
    owner.controller = Some(true);
    owner.block_owner_deletion = Some(true);
    Ok(owner)
}

/// A Pod name the API server takes: a DNS subdomain.
fn check_pod_name(name: &str) -> Result<(), String> {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let valid_ends = name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if name.len() > MAX_POD_NAME {
        return Err(format!(
            "the Sandbox's Pod name {name:?} would be {} characters, more than {MAX_POD_NAME}; use a shorter Sandbox name",
            name.len()
        ));
    }
    if !valid_chars || !valid_ends {
        return Err(format!("{name:?} is not a valid Pod name"));
    }
    Ok(())
}

/// The Sandbox's affinity, with (for a Sandbox that names its node) a
/// required term for that node ANDed into each of its node selector terms:
/// the scheduler still binds the Pod, as it does a DaemonSet's.
fn affinity(affinity: Option<Affinity>, node: Option<&str>) -> Option<Affinity> {
    let Some(node) = node else {
        return affinity;
    };
    let on_node = NodeSelectorRequirement {
        key: "metadata.name".into(),
        operator: "In".into(),
        values: Some(vec![node.to_string()]),
    };
    let mut affinity = affinity.unwrap_or_default();
    let node_affinity = affinity
        .node_affinity
        .get_or_insert_with(NodeAffinity::default);
    let required = node_affinity
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(NodeSelector::default);
    if required.node_selector_terms.is_empty() {
        required
            .node_selector_terms
            .push(NodeSelectorTerm::default());
    }
    for term in &mut required.node_selector_terms {
        term.match_fields
            .get_or_insert_with(Vec::new)
            .push(on_node.clone());
    }
    Some(affinity)
}

/// Memory limit = guest + overhead, request = the guest's requested part
/// (default all of it) + overhead; CPU limit = vCPUs; one
/// `sandfork.dev/kvm`, which the agent's device plugin counts per node.
pub fn resources(spec: &SandboxSpec) -> Result<ResourceRequirements, String> {
    let options = spec.resources.clone().unwrap_or_default();
    let overhead = options.overhead_mib.unwrap_or(pod::DEFAULT_OVERHEAD_MIB);
    if overhead > pod::MAX_OVERHEAD_MIB {
        return Err(format!(
            "resources.overheadMiB {overhead} is more than {}",
            pod::MAX_OVERHEAD_MIB
        ));
    }
    let guest_request = options.memory_request_mib.unwrap_or(spec.memory_mib);
    if guest_request > spec.memory_mib {
        return Err(format!(
            "resources.memoryRequestMiB {guest_request} is more than the guest's memoryMiB {}",
            spec.memory_mib
        ));
    }
    let limit_millis = u64::from(spec.vcpus) * 1000;
    let request_millis = match (&options.cpu_request, options.guaranteed_cpu) {
        (Some(_), Some(true)) => {
            return Err(
                "set at most one of resources.cpuRequest and resources.guaranteedCpu: true".into(),
            );
        }
        (_, Some(true)) => limit_millis,
        (Some(quantity), _) => {
            let millis = cpu_millis(&quantity.0).ok_or_else(|| {
                format!(
                    "resources.cpuRequest {:?} is not a CPU quantity such as 250m or 0.5",
                    quantity.0
                )
            })?;
            if millis == 0 || millis > limit_millis {
                return Err(format!(
                    "resources.cpuRequest {:?} must be more than 0 and at most the {} vCPUs",
                    quantity.0, spec.vcpus
                ));
            }
            millis
        }
        (None, _) => u64::from(spec.vcpus) * u64::from(pod::DEFAULT_CPU_REQUEST_MILLIS_PER_VCPU),
    };
    let memory = Quantity(format!("{}Mi", spec.memory_mib + overhead));
    let memory_request = Quantity(format!("{}Mi", guest_request + overhead));
    let kvm = Quantity("1".into());
    let requests = BTreeMap::from([
        ("cpu".to_string(), Quantity(format!("{request_millis}m"))),
        ("memory".to_string(), memory_request),
        (KVM_RESOURCE.to_string(), kvm.clone()),
    ]);
    let limits = BTreeMap::from([
        ("cpu".to_string(), Quantity(spec.vcpus.to_string())),
        ("memory".to_string(), memory),
        (KVM_RESOURCE.to_string(), kvm),
    ]);
    Ok(ResourceRequirements {
        requests: Some(requests),
        limits: Some(limits),
        ..ResourceRequirements::default()
    })
}

/// Millicores of a CPU quantity written as whole or decimal cores (`2`,
/// `0.5`) or millicores (`250m`); `None` for any other form.
fn cpu_millis(quantity: &str) -> Option<u64> {
    if let Some(millis) = quantity.strip_suffix('m') {
        return all_digits(millis).then(|| millis.parse().ok()).flatten();
    }
    let (whole, fraction) = quantity.split_once('.').unwrap_or((quantity, ""));
    if (whole.is_empty() && fraction.is_empty())
        || !all_digits_or_empty(whole)
        || !all_digits_or_empty(fraction)
        || fraction.len() > 3
    {
        return None;
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let fraction: u64 = format!("{fraction:0<3}").parse().ok()?;
    whole.checked_mul(1000)?.checked_add(fraction)
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn all_digits_or_empty(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandfork_api::SandboxSpec;
    use sandfork_api::sandbox::{BuiltinWorkload, GuestSpec, SandboxResources};

    fn image() -> VmmImage {
        VmmImage {
            image: "registry.example/sandfork/agent:1.2.3".into(),
            pull_policy: "Always".into(),
        }
    }

    fn sandbox(name: &str) -> Sandbox {
        let mut sandbox = Sandbox::new(
            name,
            SandboxSpec {
                guest: GuestSpec::builtin(BuiltinWorkload::Counter),
                memory_mib: 512,
                vcpus: 2,
                node_selector: None,
                node_name: None,
                affinity: None,
                tolerations: Vec::new(),
                priority_class_name: None,
                resources: None,
                restore_from: None,
            },
        );
        sandbox.metadata.namespace = Some("team-a".into());
        sandbox.metadata.uid = Some("uid-7".into());
        sandbox
    }

    fn container(pod: &Pod) -> &Container {
        let containers = &pod.spec.as_ref().unwrap().containers;
        assert_eq!(containers.len(), 1);
        &containers[0]
    }

    fn quantities(pod: &Pod) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
        let resources = container(pod).resources.clone().unwrap();
        let plain = |m: Option<BTreeMap<String, Quantity>>| {
            m.unwrap()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect::<BTreeMap<_, _>>()
        };
        (plain(resources.requests), plain(resources.limits))
    }

    #[test]
    fn the_pod_is_owned_labelled_and_runs_the_vmm() {
        let pod = sandbox_pod(&sandbox("vm"), &image()).unwrap();
        let meta = &pod.metadata;
        assert_eq!(meta.name.as_deref(), Some("sandbox-vm"));
        assert_eq!(meta.namespace.as_deref(), Some("team-a"));
        let labels = meta.labels.clone().unwrap();
        assert_eq!(labels[labels::SANDBOX], "vm");
        assert_eq!(labels[labels::SANDBOX_UID], "uid-7");
        assert_eq!(labels["app.kubernetes.io/name"], "sandfork");
        assert_eq!(labels["app.kubernetes.io/component"], "sandbox");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "sandfork-operator");
        let owners = meta.owner_references.clone().unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].kind, "Sandbox");
        assert_eq!(owners[0].api_version, "sandfork.dev/v1alpha1");
        assert_eq!(owners[0].name, "vm");
        assert_eq!(owners[0].uid, "uid-7");
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(owners[0].block_owner_deletion, Some(true));

        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.termination_grace_period_seconds, Some(30));
        assert_eq!(spec.enable_service_links, Some(false));
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.host_network, Some(false));
        assert_eq!(spec.node_name, None, "the scheduler binds it");
        assert_eq!(spec.affinity, None);
        let volumes = spec.volumes.clone().unwrap();
        assert_eq!(volumes.len(), 1);
        assert_eq!(volumes[0].name, "vmm");
        assert!(volumes[0].empty_dir.is_some());
        assert!(volumes[0].host_path.is_none());

        let vmm = container(&pod);
        assert_eq!(vmm.name, "vmm");
        assert_eq!(
            vmm.image.as_deref(),
            Some("registry.example/sandfork/agent:1.2.3")
        );
        assert_eq!(vmm.image_pull_policy.as_deref(), Some("Always"));
        assert_eq!(
            vmm.termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
        assert_eq!(
            vmm.command.clone().unwrap(),
            ["/sandfork-agent", "vm-host", "--dir", "/run/sandfork-vmm"]
        );
        let env = vmm.env.clone().unwrap();
        assert_eq!(env[0].name, "SANDFORK_SANDBOX");
        assert_eq!(env[0].value.as_deref(), Some("team-a/vm"));
        let mounts = vmm.volume_mounts.clone().unwrap();
        assert_eq!(
            (mounts[0].name.as_str(), mounts[0].mount_path.as_str()),
            ("vmm", "/run/sandfork-vmm")
        );
    }

    #[test]
    fn the_container_meets_the_baseline_pod_security_level() {
        let pod = sandbox_pod(&sandbox("vm"), &image()).unwrap();
        let security = container(&pod).security_context.clone().unwrap();
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(security.privileged, Some(false));
        assert_eq!(security.read_only_root_filesystem, Some(true));
        let capabilities = security.capabilities.unwrap();
        assert_eq!(capabilities.drop, Some(vec!["ALL".to_string()]));
        assert_eq!(capabilities.add, None);
        assert_eq!(security.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let spec = pod.spec.unwrap();
        assert_eq!(spec.host_pid, None);
        assert_eq!(spec.host_ipc, None);
    }

    #[test]
    fn resources_follow_the_guest_with_defaults() {
        let pod = sandbox_pod(&sandbox("vm"), &image()).unwrap();
        let (requests, limits) = quantities(&pod);
        let expected_memory = format!("{}Mi", 512 + pod::DEFAULT_OVERHEAD_MIB);
        assert_eq!(requests["memory"], expected_memory);
        assert_eq!(limits["memory"], expected_memory);
        assert_eq!(requests["cpu"], "200m", "100m per vCPU");
        assert_eq!(limits["cpu"], "2");
        assert_eq!(requests["sandfork.dev/kvm"], "1");
        assert_eq!(limits["sandfork.dev/kvm"], "1");
    }

    #[test]
    fn resources_as_the_sandbox_sets_them() {
        let mut vm = sandbox("vm");
        vm.spec.resources = Some(SandboxResources {
            overhead_mib: Some(128),
            cpu_request: Some(Quantity("250m".into())),
            ..SandboxResources::default()
        });
        let (requests, limits) = quantities(&sandbox_pod(&vm, &image()).unwrap());
        assert_eq!(requests["memory"], "640Mi");
        assert_eq!(limits["memory"], "640Mi");
        assert_eq!(requests["cpu"], "250m");

        vm.spec.resources = Some(SandboxResources {
            guaranteed_cpu: Some(true),
            ..SandboxResources::default()
        });
        let (requests, limits) = quantities(&sandbox_pod(&vm, &image()).unwrap());
        assert_eq!(requests["cpu"], "2000m");
        assert_eq!(limits["cpu"], "2");
        assert_eq!(requests["memory"], limits["memory"]);

        vm.spec.resources = Some(SandboxResources {
            cpu_request: Some(Quantity("2.5".into())),
            ..SandboxResources::default()
        });
        let err = sandbox_pod(&vm, &image()).unwrap_err();
        assert!(err.contains("at most the 2 vCPUs"), "{err}");
        vm.spec.resources = Some(SandboxResources {
            cpu_request: Some(Quantity("1Ki".into())),
            ..SandboxResources::default()
        });
        let err = sandbox_pod(&vm, &image()).unwrap_err();
        assert!(err.contains("not a CPU quantity"), "{err}");
    }

    #[test]
    fn a_lower_memory_request_keeps_the_whole_guest_as_the_limit() {
        let mut vm = sandbox("vm");
        vm.spec.resources = Some(SandboxResources {
            memory_request_mib: Some(32),
            ..SandboxResources::default()
        });
        let (requests, limits) = quantities(&sandbox_pod(&vm, &image()).unwrap());
        assert_eq!(
            requests["memory"],
            format!("{}Mi", 32 + pod::DEFAULT_OVERHEAD_MIB)
        );
        assert_eq!(
            limits["memory"],
            format!("{}Mi", 512 + pod::DEFAULT_OVERHEAD_MIB)
        );

        vm.spec.resources = Some(SandboxResources {
            memory_request_mib: Some(0),
            ..SandboxResources::default()
        });
        let (requests, _) = quantities(&sandbox_pod(&vm, &image()).unwrap());
        assert_eq!(
            requests["memory"],
            format!("{}Mi", pod::DEFAULT_OVERHEAD_MIB)
        );

        vm.spec.resources = Some(SandboxResources {
            memory_request_mib: Some(514),
            ..SandboxResources::default()
        });
        let err = sandbox_pod(&vm, &image()).unwrap_err();
        assert!(err.contains("more than the guest's memoryMiB 512"), "{err}");
    }

    #[test]
    fn cpu_quantities_in_millicores() {
        assert_eq!(cpu_millis("250m"), Some(250));
        assert_eq!(cpu_millis("2"), Some(2000));
        assert_eq!(cpu_millis("0.5"), Some(500));
        assert_eq!(cpu_millis(".25"), Some(250));
        assert_eq!(cpu_millis("1.125"), Some(1125));
        for bad in ["", "m", ".", "1.0005", "1e3", "-1", "2k", "1.5m"] {
            assert_eq!(cpu_millis(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn scheduling_fields_pass_through() {
        let mut vm = sandbox("vm");
        vm.spec.node_selector = Some(BTreeMap::from([("disk".into(), "ssd".into())]));
        vm.spec.tolerations = vec![k8s_openapi::api::core::v1::Toleration {
            key: Some("sandfork.dev/dedicated".into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        }];
        vm.spec.priority_class_name = Some("sandboxes".into());
        let spec = sandbox_pod(&vm, &image()).unwrap().spec.unwrap();
        assert_eq!(spec.node_selector.unwrap()["disk"], "ssd");
        assert_eq!(
            spec.tolerations.unwrap()[0].key.as_deref(),
            Some("sandfork.dev/dedicated")
        );
        assert_eq!(spec.priority_class_name.as_deref(), Some("sandboxes"));
    }

    #[test]
    fn a_named_node_is_required_by_affinity_anded_with_the_sandboxes() {
        let mut vm = sandbox("vm");
        vm.spec.node_name = Some("node-b".into());
        let spec = sandbox_pod(&vm, &image()).unwrap().spec.unwrap();
        assert_eq!(spec.node_name, None, "the scheduler still binds it");
        let terms = spec
            .affinity
            .unwrap()
            .node_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap()
            .node_selector_terms;
        assert_eq!(terms.len(), 1);
        let fields = terms[0].match_fields.clone().unwrap();
        assert_eq!(fields[0].key, "metadata.name");
        assert_eq!(fields[0].operator, "In");
        assert_eq!(fields[0].values, Some(vec!["node-b".to_string()]));

        // Terms are ORed: the node goes into each, so every way of matching
        // also requires it. Other affinities are kept.
        let zone = |zone: &str| NodeSelectorTerm {
            match_expressions: Some(vec![NodeSelectorRequirement {
                key: "topology.kubernetes.io/zone".into(),
                operator: "In".into(),
                values: Some(vec![zone.into()]),
            }]),
            match_fields: None,
        };
        vm.spec.affinity = Some(Affinity {
            node_affinity: Some(NodeAffinity {
                required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                    node_selector_terms: vec![zone("a"), zone("b")],
                }),
                ..NodeAffinity::default()
            }),
            pod_anti_affinity: Some(Default::default()),
            ..Affinity::default()
        });
        let affinity = sandbox_pod(&vm, &image()).unwrap().spec.unwrap().affinity;
        let affinity = affinity.unwrap();
        assert!(affinity.pod_anti_affinity.is_some());
        let terms = affinity
            .node_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap()
            .node_selector_terms;
        assert_eq!(terms.len(), 2);
        for (term, zone) in terms.iter().zip(["a", "b"]) {
            assert_eq!(
                term.match_expressions.as_ref().unwrap()[0].values,
                Some(vec![zone.to_string()])
            );
            assert_eq!(
                term.match_fields.as_ref().unwrap()[0].values,
                Some(vec!["node-b".to_string()])
            );
        }
    }

    #[test]
    fn a_name_too_long_for_a_pod_is_refused() {
        let longest = "a".repeat(MAX_POD_NAME - pod::NAME_PREFIX.len());
        assert!(sandbox_pod(&sandbox(&longest), &image()).is_ok());
        let err = sandbox_pod(&sandbox(&format!("{longest}b")), &image()).unwrap_err();
        assert!(err.contains("more than 253"), "{err}");
        let err = sandbox_pod(&sandbox("Upper"), &image()).unwrap_err();
        assert!(err.contains("not a valid Pod name"), "{err}");
    }
}
