//! End-to-end tests: the Helm chart, the operator and the node agents
//! against a real API server. One cluster serves every scenario of this
//! binary; each scenario has its own namespace. See `e2e/README.md`.
//!
//! Local mode (default): starts `e2e/cluster/local-cluster.sh` (a control
//! plane and two real nodes, `node-a` and `node-b`), imports images of this
//! checkout's operator and agent into the nodes and `helm install`s
//! `charts/sandfork`: the scenarios run against its Pods.
//! External mode: `SANDFORK_E2E_KUBECONFIG=FILE` names a cluster with the
//! chart installed (`e2e/kind/run.sh`).
//!
//! The scenarios that run VMs need /dev/kvm and /dev/userfaultfd. Without
//! them they are ignored with a message, unless `CI` or
//! `SANDFORK_REQUIRE_DEVICES` is set: then they fail.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use libtest_mimic::{Arguments, Failed, Trial};
use sandfork_api::SandboxWarmPool;
use sandfork_api::agent::v1 as pb;
use sandfork_api::conditions::{self, FAILED, READY};
use sandfork_api::deviceplugin::KVM_RESOURCE;
use sandfork_api::labels;
use sandfork_api::warmpool::PodSource;
use sandfork_e2e::bench::{self, Step};
use sandfork_e2e::env::Env;
use sandfork_e2e::objects::{self, condition, counter_reports, placement};
use sandfork_e2e::pods;
use sandfork_e2e::tools::{self, Tools};
use sandfork_e2e::wait::{self, Look};
use serde_json::json;

/// How long a Sandbox may take to become Ready (a VM boots in about a
/// second; the machine may be busy).
const SANDBOX_READY: Duration = Duration::from_secs(120);
/// How long a SandboxBranch may take to become Ready.
const BRANCH_READY: Duration = Duration::from_secs(180);
/// Guest memory of the test sandboxes, MiB.
const MEMORY_MIB: u64 = 64;

/// The environment, started by the first scenario that needs it.
struct Shared {
    env: OnceLock<Result<Env, String>>,
}

impl Shared {
    fn env(&self) -> Result<&Env, Failed> {
        match self
            .env
            .get_or_init(|| Env::start().map_err(|err| format!("{err:#}")))
        {
            Ok(env) => Ok(env),
            Err(err) => Err(format!("the test environment did not start: {err}").into()),
        }
    }
}

/// Why VM scenarios cannot run here, if they cannot.
fn devices_missing() -> Option<String> {
    ["/dev/kvm", "/dev/userfaultfd"].iter().find_map(|device| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(device)
            .err()
            .map(|err| format!("{device} cannot be opened ({err})"))
    })
}

fn devices_required() -> bool {
    let set =
        |var: &str| std::env::var(var).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    set("CI") || set("SANDFORK_REQUIRE_DEVICES")
}

type Body = fn(&Env) -> anyhow::Result<()>;

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let external = std::env::var_os("SANDFORK_E2E_KUBECONFIG").is_some();
    let missing = if external { None } else { devices_missing() };
    let skip_vms = missing.is_some() && !devices_required();
    if let (true, Some(why)) = (skip_vms, &missing) {
        eprintln!(
            "e2e: ignoring the scenarios that run VMs: {why}. \
             They fail instead of being ignored when CI or SANDFORK_REQUIRE_DEVICES is set."
        );
    }
    let shared = Arc::new(Shared {
        env: OnceLock::new(),
    });

    // (name, needs VMs, body)
    let scenarios: [(&str, bool, Body); 20] = [
        (
            "chart_accepted_by_api_server",
            false,
            chart_accepted_by_api_server,
        ),
        (
            "chart_rbac_is_least_privilege",
            false,
            chart_rbac_is_least_privilege,
        ),
        ("invalid_branch_rejected", false, invalid_branch_rejected),
        (
            "missing_source_fails_cleanly",
            true,
            missing_source_fails_cleanly,
        ),
        ("sandbox_becomes_ready", true, sandbox_becomes_ready),
        (
            "sandbox_memory_is_accounted",
            true,
            sandbox_memory_is_accounted,
        ),
        (
            "busy_guests_get_the_cpu_they_ask_for",
            true,
            busy_guests_get_the_cpu_they_ask_for,
        ),
        ("guest_image_runs", true, guest_image_runs),
        ("device_plugin_serves_kvm", true, device_plugin_serves_kvm),
        (
            "branches_continue_from_capture",
            true,
            branches_continue_from_capture,
        ),
        ("branch_of_a_branch", true, branch_of_a_branch),
        ("warm_pods_serve_branches", true, warm_pods_serve_branches),
        (
            "deleting_branch_frees_node",
            true,
            deleting_branch_frees_node,
        ),
        ("fork_is_timed_by_watch", true, fork_is_timed_by_watch),
        ("agent_pod_replaced", true, agent_pod_replaced),
        (
            "agent_crash_loses_no_sandbox",
            true,
            agent_crash_loses_no_sandbox,
        ),
        (
            "deleted_pod_fails_its_sandbox",
            true,
            deleted_pod_fails_its_sandbox,
        ),
        (
            "operator_pod_replaced_mid_fork",
            true,
            operator_pod_replaced_mid_fork,
        ),
        ("helm_upgrade_rolls_pods", true, helm_upgrade_rolls_pods),
        (
            "helm_uninstall_leaves_nothing",
            true,
            helm_uninstall_leaves_nothing,
        ),
    ];
    let mut trials = vec![
        Trial::test("chart_crds_are_current", || {
            chart_crds_are_current().map_err(failed)
        }),
        Trial::test("chart_lint", || chart_lint().map_err(failed)),
    ];
    for (name, needs_vms, body) in scenarios {
        let shared = shared.clone();
        let missing = missing.clone();
        trials.push(
            Trial::test(name, move || {
                if needs_vms && let Some(why) = &missing {
                    // Only reached when devices are required (else ignored).
                    return Err(format!("needs /dev/kvm and /dev/userfaultfd: {why}").into());
                }
                let env = shared.env()?;
                if needs_vms {
                    env.start_workloads().map_err(failed)?;
                }
                body(env).map_err(failed)
            })
            .with_ignored_flag(needs_vms && skip_vms),
        );
    }

    let conclusion = libtest_mimic::run(&args, trials);
    if let Some(Ok(env)) = shared.env.get() {
        env.teardown();
    }
    conclusion.exit_code()
}

fn failed(err: anyhow::Error) -> Failed {
    format!("{err:#}").into()
}

// --- the chart ------------------------------------------------------------

fn chart_dir() -> std::path::PathBuf {
    sandfork_e2e::env::repo_root().join("charts/sandfork")
}

/// The values files the chart is checked with (besides its defaults).
fn values_files() -> Vec<std::path::PathBuf> {
    let repo = sandfork_e2e::env::repo_root();
    vec![
        repo.join("e2e/kind/values.yaml"),
        repo.join("charts/sandfork/ci/existing-secrets-values.yaml"),
        repo.join("charts/sandfork/ci/minimal-values.yaml"),
    ]
}

/// The chart carries the CRDs that `crdgen` generates into `crds/`.
fn chart_crds_are_current() -> anyhow::Result<()> {
    let repo = sandfork_e2e::env::repo_root();
    let mut stale = Vec::new();
    for (name, yaml) in sandfork_api::crdgen::render() {
        let in_chart = std::fs::read_to_string(repo.join("charts/sandfork/crds").join(name))
            .unwrap_or_default();
        if in_chart != yaml {
            stale.push(name);
        }
    }
    ensure!(
        stale.is_empty(),
        "charts/sandfork/crds is stale ({stale:?}): run `cargo run -p sandfork-api --bin crdgen charts/sandfork/crds`"
    );
    Ok(())
}

/// `helm lint --strict` with the default values and each values file.
fn chart_lint() -> anyhow::Result<()> {
    let tools = lint_tools()?;
    let chart = chart_dir();
    let mut runs: Vec<Vec<std::ffi::OsString>> = vec![vec![]];
    for file in values_files() {
        runs.push(vec!["-f".into(), file.into()]);
    }
    for extra in runs {
        tools::run(
            std::process::Command::new(&tools.helm)
                .args(["lint", "--strict"])
                .arg(&chart)
                .args(&extra),
        )
        .with_context(|| format!("helm lint {extra:?}"))?;
    }
    Ok(())
}

fn lint_tools() -> anyhow::Result<Tools> {
    if std::env::var_os("SANDFORK_E2E_KUBECONFIG").is_some() {
        Ok(Tools::from_env())
    } else {
        Tools::pinned(&sandfork_e2e::env::repo_root())
    }
}

/// Every manifest the chart renders (CRDs included), with the default
/// values and each values file, passes the API server's validation and
/// admission in a server-side dry run; so do the examples.
fn chart_accepted_by_api_server(env: &Env) -> anyhow::Result<()> {
    env.scenario("chart-dry-run", false, |ns| async move {
        let mut runs: Vec<Vec<std::ffi::OsString>> = vec![vec![]];
        for file in values_files() {
            runs.push(vec!["-f".into(), file.into()]);
        }
        for (i, extra) in runs.into_iter().enumerate() {
            let release = format!("dryrun{i}");
            let rendered = tools::run(
                std::process::Command::new(&env.tools.helm)
                    .args(["template", &release])
                    .arg(chart_dir())
                    .args(["--namespace", &ns, "--include-crds"])
                    .args(&extra),
            )
            .with_context(|| format!("helm template {extra:?}"))?;
            let applied = tools::run_with_input(
                env.tools.kubectl(&env.kubeconfig).args([
                    "apply",
                    "--dry-run=server",
                    "-n",
                    &ns,
                    "-f",
                    "-",
                ]),
                Some(&rendered),
            )
            .with_context(|| format!("server-side dry run of the chart rendered with {extra:?}"))?;
            let mut kinds = vec![
                "customresourcedefinition.apiextensions.k8s.io/sandboxes.sandfork.dev",
                "customresourcedefinition.apiextensions.k8s.io/sandboxbranches.sandfork.dev",
                "customresourcedefinition.apiextensions.k8s.io/sandboxwarmpools.sandfork.dev",
                "deployment.apps/",
                "daemonset.apps/",
                "clusterrole.rbac.authorization.k8s.io/",
                "role.rbac.authorization.k8s.io/",
            ];
            if extra.is_empty() {
                // Everything the defaults turn on.
                kinds.extend([
                    "serviceaccount/",
                    "secret/",
                    "service/",
                    "validatingadmissionpolicy.admissionregistration.k8s.io/",
                    "validatingadmissionpolicybinding.admissionregistration.k8s.io/",
                ]);
            }
            for kind in kinds {
                ensure!(
                    applied.contains(kind),
                    "dry run with {extra:?} did not include {kind}:\n{applied}"
                );
            }
        }
        // The examples users apply first are valid too.
        let examples = sandfork_e2e::env::repo_root().join("examples");
        tools::run(
            env.tools
                .kubectl(&env.kubeconfig)
                .args(["apply", "--dry-run=server", "-n", &ns, "-f"])
                .arg(&examples),
        )
        .context("server-side dry run of examples/")?;
        Ok(())
    })
}

/// Each ServiceAccount can do what its binary needs and no more: checked
/// by the API server's authorizer (`kubectl auth can-i --as`) and, for the
/// Lease names RBAC cannot express, by the admission policy.
fn chart_rbac_is_least_privilege(env: &Env) -> anyhow::Result<()> {
    let ns = &env.namespace;
    let operator = format!("system:serviceaccount:{ns}:{}-operator", env.release);
    let agent = format!("system:serviceaccount:{ns}:{}-agent", env.release);
    let can = |user: &str, args: &[&str]| -> anyhow::Result<bool> {
        let out = env
            .tools
            .kubectl(&env.kubeconfig)
            .args(["auth", "can-i", "--as", user])
            .args(args)
            .output()?;
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
        match answer.as_str() {
            "yes" => Ok(true),
            "no" => Ok(false),
            _ => bail!(
                "kubectl auth can-i {args:?}: {answer} {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    };
    // (who, `kubectl auth can-i` arguments, allowed)
    let expect = [
        (
            "operator",
            "create sandboxes.sandfork.dev -n anywhere",
            true,
        ),
        (
            "operator",
            "delete sandboxes.sandfork.dev -n anywhere",
            true,
        ),
        (
            "operator",
            "patch sandboxbranches.sandfork.dev --subresource=status -n anywhere",
            true,
        ),
        (
            "operator",
            "update sandboxbranches.sandfork.dev --subresource=finalizers -n x",
            true,
        ),
        (
            "operator",
            "update sandboxes.sandfork.dev --subresource=finalizers -n x",
            true,
        ),
        ("operator", "create events.events.k8s.io -n anywhere", true),
        ("operator", "create pods -n anywhere", true),
        ("operator", "delete pods -n anywhere", true),
        ("operator", "watch pods -A", true),
        ("operator", "patch pods -n anywhere", true),
        (
            "operator",
            "patch sandboxwarmpools.sandfork.dev --subresource=status -n anywhere",
            true,
        ),
        (
            "operator",
            "create sandboxwarmpools.sandfork.dev -n x",
            false,
        ),
        (
            "operator",
            "patch pods --subresource=status -n anywhere",
            false,
        ),
        ("operator", "update pods -n anywhere", false),
        (
            "operator",
            "create pods --subresource=exec -n anywhere",
            false,
        ),
        (
            "operator",
            "create pods --subresource=binding -n anywhere",
            false,
        ),
        ("operator", "get nodes", false),
        ("operator", "watch leases.coordination.k8s.io -n NS", true),
        (
            "operator",
            "update leases.coordination.k8s.io/sandfork-operator-leader -n NS",
            true,
        ),
        (
            "operator",
            "update leases.coordination.k8s.io/sandfork-agent-node-a -n NS",
            false,
        ),
        (
            "operator",
            "list leases.coordination.k8s.io -n kube-system",
            false,
        ),
        ("operator", "get secrets -n NS", false),
        ("operator", "list nodes", false),
        (
            "operator",
            "delete sandboxes.sandfork.dev --subresource=status -n x",
            false,
        ),
        (
            "agent",
            "patch leases.coordination.k8s.io/sandfork-agent-node-a -n NS",
            true,
        ),
        ("agent", "create leases.coordination.k8s.io -n NS", true),
        ("agent", "list leases.coordination.k8s.io -n NS", false),
        (
            "agent",
            "delete leases.coordination.k8s.io/sandfork-agent-node-a -n NS",
            false,
        ),
        (
            "agent",
            "patch leases.coordination.k8s.io -n kube-node-lease",
            false,
        ),
        ("agent", "list sandboxes.sandfork.dev -A", false),
        ("agent", "get secrets -n NS", false),
    ];
    let mut wrong = Vec::new();
    for (who, question, want) in expect {
        let user = if who == "operator" { &operator } else { &agent };
        let args: Vec<&str> = question
            .split_whitespace()
            .map(|word| if word == "NS" { ns.as_str() } else { word })
            .collect();
        if can(user, &args)? != want {
            wrong.push(format!(
                "{who}: can-i {question}: expected {}",
                if want { "yes" } else { "no" }
            ));
        }
    }
    ensure!(
        wrong.is_empty(),
        "RBAC differs from what each binary needs:\n{}",
        wrong.join("\n")
    );

    // RBAC lets the agent write the namespace's Leases; the admission
    // policy keeps it to sandfork-agent-<node>.
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "sandfork-operator-leader-impostor", "namespace": ns},
        "spec": {"holderIdentity": "impostor"},
    })
    .to_string();
    let denied = tools::run_with_input(
        env.tools
            .kubectl(&env.kubeconfig)
            .args(["--as", &agent, "create", "-f", "-"]),
        Some(&lease),
    );
    match denied {
        Ok(out) => {
            bail!("the agent's ServiceAccount created a Lease that is not an agent Lease: {out}")
        }
        Err(err) => {
            let err = format!("{err:#}");
            ensure!(
                err.contains("may only write Leases named sandfork-agent-"),
                "expected the admission policy's message, got: {err}"
            );
        }
    }
    Ok(())
}

// --- validation -------------------------------------------------------------

/// The API server rejects bad SandboxBranches with messages that say what is wrong.
fn invalid_branch_rejected(env: &Env) -> anyhow::Result<()> {
    env.scenario("invalid-branch", false, |ns| async move {
        let api: kube::Api<kube::core::DynamicObject> = kube::Api::namespaced_with(
            env.client(),
            &ns,
            &kube::core::ApiResource::erase::<sandfork_api::SandboxBranch>(&()),
        );
        let object =
            |name: &str, spec: serde_json::Value| -> anyhow::Result<kube::core::DynamicObject> {
                Ok(serde_json::from_value(json!({
                    "apiVersion": "sandfork.dev/v1alpha1",
                    "kind": "SandboxBranch",
                    "metadata": {"name": name},
                    "spec": spec,
                }))?)
            };
        let cases = [
            (
                "zero",
                json!({"sourceRef": {"name": "src"}, "branches": 0}),
                "spec.branches",
            ),
            (
                "too-many",
                json!({"sourceRef": {"name": "src"}, "branches": 65}),
                "spec.branches",
            ),
            (
                "bad-mode",
                json!({"sourceRef": {"name": "src"}, "mode": "Sideways"}),
                "Unsupported value: \"Sideways\"",
            ),
            (
                "no-source",
                json!({"branches": 1}),
                "spec.sourceRef: Required value",
            ),
            (
                "long-deadline",
                json!({"sourceRef": {"name": "src"}, "failureDeadline": "48h"}),
                "failureDeadline must be a duration between",
            ),
            (
                "bad-policy",
                json!({"sourceRef": {"name": "src"}, "deletionPolicy": "Orphan"}),
                "spec.deletionPolicy",
            ),
        ];
        for (name, spec, expected) in cases {
            match api
                .create(&Default::default(), &object(name, spec.clone())?)
                .await
            {
                Ok(_) => bail!("the API server accepted an invalid SandboxBranch {name}: {spec}"),
                Err(kube::Error::Api(status)) => {
                    ensure!(
                        status.code == 422 && status.message.contains(expected),
                        "{name}: expected 422 with {expected:?}, got {} {:?}",
                        status.code,
                        status.message
                    );
                }
                Err(err) => bail!("{name}: {err}"),
            }
        }
        // Changing the source of an existing SandboxBranch is refused.
        api.create(
            &Default::default(),
            &object("fixed", json!({"sourceRef": {"name": "src"}}))?,
        )
        .await?;
        let moved = api
            .patch(
                "fixed",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"sourceRef": {"name": "other"}}})),
            )
            .await;
        match moved {
            Err(kube::Error::Api(status))
                if status.code == 422 && status.message.contains("sourceRef is immutable") => {}
            other => {
                bail!("changing sourceRef: expected 422 `sourceRef is immutable`, got {other:?}")
            }
        }
        // A Sandbox may not request more of its guest's memory than it has.
        let mut spec = counter_spec();
        spec["resources"] = json!({"memoryRequestMiB": MEMORY_MIB + 2});
        match objects::create_sandbox(env, &ns, "over-requested", spec).await {
            Err(err) => {
                let message = format!("{err:#}");
                ensure!(
                    message.contains("resources.memoryRequestMiB may be at most memoryMiB"),
                    "memoryRequestMiB above memoryMiB: {message}"
                );
            }
            Ok(_) => bail!("the API server accepted memoryRequestMiB above memoryMiB"),
        }
        Ok(())
    })
}

// --- scenarios that run VMs -----------------------------------------------------

fn counter_spec() -> serde_json::Value {
    json!({"guest": {"builtin": "Counter"}, "memoryMiB": MEMORY_MIB, "vcpus": 1})
}

/// A Sandbox runs in a Pod of its own, which the scheduler binds to a node
/// with an agent; its VM runs in that Pod, which passes the "baseline" Pod
/// Security level (the namespace enforces it).
fn sandbox_becomes_ready(env: &Env) -> anyhow::Result<()> {
    env.scenario("sandbox-ready", false, |ns| async move {
        let labels = json!({"metadata": {"labels": {
            "pod-security.kubernetes.io/enforce": "baseline",
            "pod-security.kubernetes.io/enforce-version": "latest",
        }}});
        Api::<Namespace>::all(env.client())
            .patch(&ns, &PatchParams::default(), &Patch::Merge(&labels))
            .await?;
        objects::create_sandbox(env, &ns, "counter", counter_spec()).await?;
        let sandbox = objects::sandbox_ready(env, &ns, "counter", SANDBOX_READY).await?;
        let (node, uid) = placement(&sandbox)?;
        let nodes = env.agent_nodes().await?;
        ensure!(
            nodes.contains(&node),
            "placed on {node}, which has no agent ({nodes:?})"
        );
        let status = sandbox.status.clone().unwrap_or_default();
        let ready = condition(&status.conditions, READY).context("no Ready condition")?;
        ensure!(
            ready.observed_generation == sandbox.metadata.generation,
            "Ready is for another generation: {ready:?}"
        );

        // The agent on that node runs it, and the guest makes progress.
        let mut agent = env.agent(&node).await?;
        let vm = agent
            .get_sandbox(pb::GetSandboxRequest { uid: uid.clone() })
            .await?
            .into_inner();
        ensure!(
            vm.state == pb::SandboxState::Running as i32,
            "the agent reports {vm:?}"
        );
        ensure!(
            vm.memory_mib == MEMORY_MIB,
            "the agent runs {} MiB, not {MEMORY_MIB}",
            vm.memory_mib
        );
        let pod = pods::of_sandbox(&env.client(), &ns, "counter")
            .await?
            .context("no Pod for Sandbox counter")?;
        ensure!(
            pods::node_of(&pod).as_deref() == Some(node.as_str()),
            "status.node {node}, its Pod's node {:?}",
            pods::node_of(&pod)
        );
        let owner = pods::controller(&pod);
        ensure!(
            owner == Some(("Sandbox".into(), uid.clone())),
            "the Pod's controller is {owner:?}"
        );
        let container = pod
            .spec
            .as_ref()
            .and_then(|spec| spec.containers.first())
            .context("a Pod without containers")?;
        let limits = container
            .resources
            .as_ref()
            .and_then(|r| r.limits.clone())
            .unwrap_or_default();
        ensure!(
            limits.get(KVM_RESOURCE).map(|q| q.0.as_str()) == Some("1"),
            "the Pod does not ask for {KVM_RESOURCE}: {limits:?}"
        );
        let security = container.security_context.clone().unwrap_or_default();
        ensure!(
            security.privileged != Some(true) && security.allow_privilege_escalation == Some(false),
            "the sandbox Pod is privileged: {security:?}"
        );
        if let Some(alive) = env.vm_process_alive(&pods::uid(&pod)) {
            ensure!(alive, "no VMM runs in the Pod {}", pods::uid(&pod));
        }
        let (first, _) = counter_reports(env, &node, &uid, 1, Duration::from_secs(60)).await?;
        counter_reports(env, &node, &uid, first + 1, Duration::from_secs(60)).await?;
        Ok(())
    })
}

/// A flat 64-bit guest (entered at 1 MiB in long mode): writes a line to
/// its console (port 0x3f8), then reports 1, 2, 3, ... to port 0x5f0 with a
/// short busy loop between reports.
const HELLO_GUEST: &[u8] = &[
    0x66, 0xBA, 0xF8, 0x03, // mov dx, 0x3f8
    0x48, 0x8D, 0x35, 0x20, 0x00, 0x00, 0x00, // lea rsi, [rip + message]
    0x8A, 0x06, // next: mov al, [rsi]
    0x84, 0xC0, // test al, al
    0x74, 0x06, // jz done
    0xEE, // out dx, al
    0x48, 0xFF, 0xC6, // inc rsi
    0xEB, 0xF4, // jmp next
    0x31, 0xC0, // done: xor eax, eax
    0x66, 0xBA, 0xF0, 0x05, // mov dx, 0x5f0
    0xFF, 0xC0, // report: inc eax
    0xEF, // out dx, eax
    0xB9, 0xA0, 0x86, 0x01, 0x00, // mov ecx, 100000
    0xFF, 0xC9, // spin: dec ecx
    0x75, 0xFC, // jnz spin
    0xEB, 0xF2, // jmp report
];
const HELLO_LINE: &str = "sandfork guest image up";

/// `guest.image`: a container image carrying a flat guest at `/guest`,
/// which the sandbox Pod mounts as an image volume; the guest runs (its
/// reports go on) and its console line is in the Pod's log.
fn guest_image_runs(env: &Env) -> anyhow::Result<()> {
    env.scenario("guest-image", false, |ns| async move {
        let image = "docker.io/sandfork/guest-hello:test";
        let dir = tempfile::tempdir()?;
        let file = dir.path().join(sandfork_api::pod::GUEST_FILE);
        let mut code = HELLO_GUEST.to_vec();
        code.extend_from_slice(HELLO_LINE.as_bytes());
        code.extend_from_slice(b"\n\0");
        std::fs::write(&file, code)?;
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        if !env.import_image(image, &file)? {
            eprintln!("e2e: not a local cluster: guest image scenario skipped");
            return Ok(());
        }
        objects::create_sandbox(
            env,
            &ns,
            "hello",
            json!({"guest": {"image": image}, "memoryMiB": 64, "vcpus": 1}),
        )
        .await?;
        let sandbox = objects::sandbox_ready(env, &ns, "hello", SANDBOX_READY).await?;
        let (node, uid) = placement(&sandbox)?;
        let (value, reports) =
            counter_reports(env, &node, &uid, 3, Duration::from_secs(60)).await?;
        ensure!(
            value >= 3,
            "the guest reported {value} after {reports} reports"
        );
        let pod = sandfork_api::pod::name("hello");
        let log = wait::until(
            "the guest's console line in its Pod's log",
            Duration::from_secs(30),
            || async {
                let log = Api::<Pod>::namespaced(env.client(), &ns)
                    .logs(&pod, &Default::default())
                    .await?;
                Ok(if log.contains(&format!("guest: {HELLO_LINE}")) {
                    Look::Done(log)
                } else {
                    Look::NotYet(log)
                })
            },
        )
        .await?;
        eprintln!(
            "e2e: guest image {image} runs ({reports} reports); its Pod's log:\n{}",
            log.trim_end()
        );

        // An image without /guest: the Sandbox fails with the reason, and
        // its Pod ends, so it holds no memory on its node.
        let misnamed = dir.path().join("not-the-guest");
        std::fs::rename(&file, &misnamed)?;
        let empty = "docker.io/sandfork/guest-missing:test";
        env.import_image(empty, &misnamed)?;
        objects::create_sandbox(
            env,
            &ns,
            "no-guest",
            json!({"guest": {"image": empty}, "memoryMiB": 64, "vcpus": 1}),
        )
        .await?;
        let (_, message) = ready_reason(env, &ns, "no-guest", SANDBOX_READY, |reason| {
            reason == "InvalidSpec"
        })
        .await?;
        ensure!(
            message.contains(sandfork_api::pod::GUEST_DIR),
            "the reason names the missing guest: {message}"
        );
        let client = env.client();
        wait::until("its Pod to end", Duration::from_secs(60), || async {
            let pod = pods::of_sandbox(&client, &ns, "no-guest").await?;
            let phase = pod.and_then(|pod| pod.status?.phase);
            Ok(match phase.as_deref() {
                Some("Failed") => Look::Done(()),
                other => Look::NotYet(format!("phase {other:?}")),
            })
        })
        .await?;
        eprintln!("e2e: an image without a guest fails its Sandbox, its Pod ended: {message}");
        Ok(())
    })
}

/// Mebibytes in a Kubernetes memory quantity such as `2176Mi` or `11Gi`
/// (what the kubelet and the chart write).
fn quantity_mib(quantity: &Quantity) -> anyhow::Result<u64> {
    let text = quantity.0.as_str();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let number: u64 = number.parse().with_context(|| format!("quantity {text}"))?;
    Ok(match unit {
        "" => number >> 20,
        "Ki" => number >> 10,
        "Mi" => number,
        "Gi" => number << 10,
        other => bail!("quantity {text}: unit {other:?}"),
    })
}

/// Millicores in a Kubernetes CPU quantity such as `100m` or `2`.
fn quantity_millicores(quantity: &Quantity) -> anyhow::Result<u64> {
    let text = quantity.0.as_str();
    Ok(match text.strip_suffix('m') {
        Some(millis) => millis.parse().with_context(|| format!("quantity {text}"))?,
        None => {
            let cores: u64 = text.parse().with_context(|| format!("quantity {text}"))?;
            cores * 1000
        }
    })
}

/// What the Pods bound to `node` request of `resource`, in the units of
/// `amount` (Pods that ended hold none).
async fn node_requested(
    env: &Env,
    node: &str,
    resource: &str,
    amount: fn(&Quantity) -> anyhow::Result<u64>,
) -> anyhow::Result<u64> {
    let pods = Api::<Pod>::all(env.client())
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await?;
    let mut total = 0;
    for pod in pods.items {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        for container in pod.spec.map(|s| s.containers).unwrap_or_default() {
            if let Some(requested) = container
                .resources
                .and_then(|r| r.requests)
                .and_then(|r| r.get(resource).cloned())
            {
                total += amount(&requested)?;
            }
        }
    }
    Ok(total)
}

/// What `node` can give Pods of `resource`, in the units of `amount`.
async fn node_allocatable(
    env: &Env,
    node: &str,
    resource: &str,
    amount: fn(&Quantity) -> anyhow::Result<u64>,
) -> anyhow::Result<u64> {
    let allocatable = Api::<Node>::all(env.client())
        .get(node)
        .await?
        .status
        .and_then(|s| s.allocatable)
        .and_then(|a| a.get(resource).cloned())
        .with_context(|| format!("{node} has no allocatable {resource}"))?;
    amount(&allocatable)
}

/// A sandbox's memory is its Pod's: the VMM's own use beside a guest that
/// touched all of its memory stays within the overhead its Pod asks for;
/// Sandboxes fill a node's allocatable memory, and the next one is
/// `Unschedulable` with the scheduler's reason while the others run on,
/// none OOM-killed.
fn sandbox_memory_is_accounted(env: &Env) -> anyhow::Result<()> {
    env.scenario("accounting", true, |ns| async move {
        let client = env.client();
        // The VMM's overhead, measured in its Pod's memory cgroup.
        let guest_mib = 256;
        objects::create_sandbox(
            env,
            &ns,
            "measured",
            json!({"guest": {"builtin": "Counter"}, "memoryMiB": guest_mib, "vcpus": 1}),
        )
        .await?;
        let sandbox = objects::sandbox_ready(env, &ns, "measured", SANDBOX_READY).await?;
        let (node, uid) = placement(&sandbox)?;
        // Two passes: the guest has written every page.
        counter_reports(env, &node, &uid, 2, Duration::from_secs(120)).await?;
        let pod_uid = vm_pod(env, &ns, "measured").await?;
        if let Some(used) = sandfork_e2e::process::vmm_memory_usage(&pod_uid) {
            let overhead_mib = (used >> 20).saturating_sub(guest_mib);
            eprintln!(
                "e2e: VMM memory beside a {guest_mib} MiB guest that wrote all of it: \
                 {} MiB in its Pod's cgroup, overhead {overhead_mib} MiB (the Pod asks for {} MiB)",
                used >> 20,
                sandfork_api::pod::DEFAULT_OVERHEAD_MIB
            );
            ensure!(
                overhead_mib < sandfork_api::pod::DEFAULT_OVERHEAD_MIB,
                "the VMM uses {overhead_mib} MiB beside its guest, more than its Pod asks for"
            );
        }
        // A capture's pages are charged to the agent, not to the source's
        // Pod (whose limit covers its guest alone).
        if let Some(before) = sandfork_e2e::process::vmm_memory_usage(&pod_uid) {
            objects::create_branch(
                env,
                &ns,
                "measured-fork",
                json!({"sourceRef": {"name": "measured"}, "branches": 1, "deletionPolicy": "Delete"}),
            )
            .await?;
            objects::branch_ready(env, &ns, "measured-fork", BRANCH_READY).await?;
            wait::until(
                "the capture's copy to complete",
                Duration::from_secs(60),
                || async {
                    let captures = env
                        .agent(&node)
                        .await?
                        .list_captures(pb::ListCapturesRequest {})
                        .await?
                        .into_inner()
                        .captures;
                    Ok(if captures.iter().all(|c| c.memory_complete) {
                        Look::Done(())
                    } else {
                        Look::NotYet(format!("{captures:?}"))
                    })
                },
            )
            .await?;
            let after = sandfork_e2e::process::vmm_memory_usage(&pod_uid).unwrap_or_default();
            let grown_mib = (after.saturating_sub(before)) >> 20;
            eprintln!(
                "e2e: the source's Pod held {} MiB before its capture of {guest_mib} MiB, {} MiB after",
                before >> 20,
                after >> 20
            );
            ensure!(
                grown_mib < guest_mib / 4,
                "the source's Pod grew by {grown_mib} MiB with its capture: the capture is charged to it"
            );
            objects::branches(env, &ns)
                .delete("measured-fork", &DeleteParams::default())
                .await?;
        }
        objects::sandboxes(env, &ns)
            .delete("measured", &DeleteParams::default())
            .await?;

        // Fill node-a's allocatable memory with Sandboxes (idle guests: the
        // scheduler counts what Pods request, not what they use).
        let node = "node-a";
        let allocatable_mib = node_allocatable(env, node, "memory", quantity_mib).await?;
        wait::until(
            "the measured Sandbox's Pods to be gone",
            Duration::from_secs(60),
            || async {
                let left = pods::of_component(&client, &ns, "sandbox").await?;
                Ok(if left.is_empty() {
                    Look::Done(())
                } else {
                    Look::NotYet(format!("{} sandbox Pods", left.len()))
                })
            },
        )
        .await?;
        let free_mib = allocatable_mib
            .saturating_sub(node_requested(env, node, "memory", quantity_mib).await?);
        let guest_mib: u64 = 2048;
        let pod_mib = guest_mib + sandfork_api::pod::DEFAULT_OVERHEAD_MIB;
        let fitting = free_mib / pod_mib;
        eprintln!(
            "e2e: {node}: {allocatable_mib} MiB allocatable, {free_mib} MiB not requested: \
             {fitting} sandboxes of {pod_mib} MiB fit"
        );
        ensure!(fitting >= 1, "not even one sandbox fits on {node}");
        let spec = json!({
            "guest": {"builtin": "Idle"},
            "memoryMiB": guest_mib,
            "vcpus": 1,
            "nodeSelector": {"kubernetes.io/hostname": node},
        });
        let names: Vec<String> = (0..fitting).map(|index| format!("fill-{index}")).collect();
        let message = fill_until_unschedulable(env, &ns, &names, &spec, "memory").await?;
        eprintln!("e2e: the sandbox that does not fit: {message}");
        let sandboxes = objects::sandboxes(env, &ns);
        for index in 0..fitting {
            let name = format!("fill-{index}");
            let sandbox = sandboxes.get(&name).await?;
            ensure!(sandbox.is_ready(), "{name} is no longer Ready");
            let pod = pods::of_sandbox(&client, &ns, &name)
                .await?
                .with_context(|| format!("{name} has no Pod"))?;
            let restarts: i32 = pod
                .status
                .and_then(|s| s.container_statuses)
                .unwrap_or_default()
                .iter()
                .map(|c| c.restart_count)
                .sum();
            ensure!(restarts == 0, "{name}'s Pod restarted {restarts} times");
        }
        Ok(())
    })
}

/// Creates a Sandbox of `spec` for each of `names` and waits until all are
/// Ready, then one more, "one-too-many", which must be `Unschedulable` for
/// want of `resource` ("Insufficient memory", "Insufficient cpu"); returns
/// the scheduler's message.
async fn fill_until_unschedulable(
    env: &Env,
    ns: &str,
    names: &[String],
    spec: &serde_json::Value,
    resource: &str,
) -> anyhow::Result<String> {
    for name in names {
        objects::create_sandbox(env, ns, name, spec.clone()).await?;
    }
    for name in names {
        objects::sandbox_ready(env, ns, name, SANDBOX_READY).await?;
    }
    objects::create_sandbox(env, ns, "one-too-many", spec.clone()).await?;
    let message = ready_reason(env, ns, "one-too-many", Duration::from_secs(60), |reason| {
        reason == "Unschedulable"
    })
    .await?
    .1;
    ensure!(
        message.contains(&format!("Insufficient {resource}")),
        "Unschedulable without the scheduler's reason: {message}"
    );
    Ok(message)
}

/// Waits until the Sandbox's `Ready` condition has a reason `wanted`
/// accepts; returns (reason, message).
async fn ready_reason(
    env: &Env,
    ns: &str,
    name: &str,
    timeout: Duration,
    wanted: impl Fn(&str) -> bool,
) -> anyhow::Result<(String, String)> {
    let sandboxes = objects::sandboxes(env, ns);
    wait::until(
        &format!("Sandbox {ns}/{name}'s Ready reason"),
        timeout,
        || async {
            let sandbox = sandboxes.get(name).await?;
            let conditions = sandbox.status.map(|s| s.conditions).unwrap_or_default();
            Ok(match condition(&conditions, READY) {
                Some(ready) if wanted(&ready.reason) => {
                    Look::Done((ready.reason.clone(), ready.message.clone()))
                }
                other => Look::NotYet(format!("{other:?}")),
            })
        },
    )
    .await
}

/// Seconds of load over which busy guests' CPU use and the operator's
/// leader Lease are watched.
const BUSY_WINDOW: Duration = Duration::from_secs(20);

/// Busy guests get the CPU their Pods ask for and no more: their CPU
/// requests bound how many the scheduler places on a node (the next one is
/// `Unschedulable`, "Insufficient cpu"), each stays within its CPU limit
/// (its vCPUs, by the kubelet's own figures), and while they all spin the
/// operator keeps renewing its leader Lease and still starts a Sandbox.
fn busy_guests_get_the_cpu_they_ask_for(env: &Env) -> anyhow::Result<()> {
    env.scenario("busy-guests", true, |ns| async move {
        let node = "node-a";
        let free = node_allocatable(env, node, "cpu", quantity_millicores)
            .await?
            .saturating_sub(node_requested(env, node, "cpu", quantity_millicores).await?);
        let per_guest = u64::from(sandfork_api::pod::DEFAULT_CPU_REQUEST_MILLIS_PER_VCPU);
        let fitting = free / per_guest;
        ensure!(fitting >= 1, "{node} has {free}m CPU unrequested: no guest fits");
        eprintln!("e2e: {node}: {free}m CPU not requested: {fitting} busy guests of {per_guest}m fit");
        let spec = json!({
            "guest": {"builtin": "Counter"},
            "memoryMiB": MEMORY_MIB,
            "vcpus": 1,
            "nodeSelector": {"kubernetes.io/hostname": node},
        });
        let names: Vec<String> = (0..fitting).map(|index| format!("busy-{index}")).collect();
        let message = fill_until_unschedulable(env, &ns, &names, &spec, "cpu").await?;

        // All of them spinning: their CPU by the kubelet's figures, and the
        // operator's leader Lease, watched for a while.
        let leases: Api<Lease> = Api::namespaced(env.client(), &env.namespace);
        let leader = env.wait_for_leader(Duration::from_secs(30)).await?;
        let used_before = pod_cpu_seconds(env, node).await?;
        let watch_started = Instant::now();
        let mut last_renewal = (None, watch_started);
        let mut longest_gap = Duration::ZERO;
        let mut api_ms = Vec::new();
        while watch_started.elapsed() < BUSY_WINDOW {
            let asked = Instant::now();
            let spec = leases
                .get("sandfork-operator-leader")
                .await?
                .spec
                .context("the leader Lease has no spec")?;
            api_ms.push(asked.elapsed().as_secs_f64() * 1e3);
            ensure!(
                spec.holder_identity.as_deref() == Some(leader.as_str()),
                "the leader Lease moved from {leader} to {:?} under load",
                spec.holder_identity
            );
            if spec.renew_time != last_renewal.0 {
                longest_gap = longest_gap.max(last_renewal.1.elapsed());
                last_renewal = (spec.renew_time, Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        longest_gap = longest_gap.max(last_renewal.1.elapsed());
        let used_after = pod_cpu_seconds(env, node).await?;
        let window = watch_started.elapsed().as_secs_f64();
        let mut busiest = 0.0f64;
        let mut total = 0.0;
        for name in &names {
            let pod = sandfork_api::pod::name(name);
            let (Some(before), Some(after)) = (used_before.get(&pod), used_after.get(&pod)) else {
                bail!("the kubelet reports no CPU use of Pod {pod}");
            };
            let cores = (after - before) / window;
            busiest = busiest.max(cores);
            total += cores;
        }
        // Its limit is its one vCPU; allow for the two samples' timing.
        ensure!(
            busiest <= 1.1,
            "a guest of one vCPU used {busiest:.2} cores"
        );
        api_ms.sort_by(f64::total_cmp);
        let renew_deadline = Duration::from_secs(10);
        ensure!(
            longest_gap < renew_deadline,
            "the operator went {longest_gap:?} without renewing its Lease under load"
        );

        // The operator still does its work: a Sandbox on the other node.
        let started = Instant::now();
        let mut late = spec.clone();
        late["nodeSelector"] = json!({"kubernetes.io/hostname": "node-b"});
        objects::create_sandbox(env, &ns, "latecomer", late).await?;
        objects::sandbox_ready(env, &ns, "latecomer", SANDBOX_READY).await?;
        eprintln!(
            "e2e: {fitting} busy guests on {node} for {window:.0} s: {total:.2} cores in all, \
             the busiest {busiest:.2}; the operator renewed its Lease at most {:.1} s apart, \
             API reads p50 {:.1} ms max {:.1} ms; a new Sandbox Ready in {:.1} s; the next guest: {message}",
            longest_gap.as_secs_f64(),
            api_ms[api_ms.len() / 2],
            api_ms[api_ms.len() - 1],
            started.elapsed().as_secs_f64()
        );
        Ok(())
    })
}

/// CPU seconds each Pod on `node` has used, by Pod name, from the
/// kubelet's summary (through the API server's node proxy).
async fn pod_cpu_seconds(
    env: &Env,
    node: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
    let request =
        http::Request::get(format!("/api/v1/nodes/{node}/proxy/stats/summary")).body(Vec::new())?;
    let summary: serde_json::Value =
        serde_json::from_str(&env.client().request_text(request).await?)?;
    let mut used = std::collections::BTreeMap::new();
    for pod in summary["pods"].as_array().into_iter().flatten() {
        if let (Some(name), Some(nanos)) = (
            pod["podRef"]["name"].as_str(),
            pod["cpu"]["usageCoreNanoSeconds"].as_f64(),
        ) {
            used.insert(name.to_owned(), nanos / 1e9);
        }
    }
    Ok(used)
}

/// Units of `sandfork.dev/kvm` each agent node offers: the chart's
/// `agent.maxSandboxes`.
const KVM_UNITS: &str = "100";

/// The agents' device plugin: every agent node reports `sandfork.dev/kvm`
/// in its capacity and allocatable, an unprivileged Pod that asks for one
/// unit opens /dev/kvm and /dev/userfaultfd read-write (the agent image's
/// `check-devices`), and the same Pod without the limit cannot.
fn device_plugin_serves_kvm(env: &Env) -> anyhow::Result<()> {
    env.scenario("device-plugin", false, |ns| async move {
        let client = env.client();
        let nodes = env.agent_nodes().await?;
        ensure!(!nodes.is_empty(), "no agent has registered");
        let node_api = Api::<Node>::all(client.clone());
        for node in &nodes {
            let started = Instant::now();
            let (capacity, allocatable) = wait::until(
                &format!("{KVM_RESOURCE} on node {node}"),
                Duration::from_secs(60),
                || async {
                    let status = node_api.get(node).await?.status.unwrap_or_default();
                    let units = |list: &Option<std::collections::BTreeMap<String, Quantity>>| {
                        list.as_ref()
                            .and_then(|list| list.get(KVM_RESOURCE))
                            .map(|quantity| quantity.0.clone())
                    };
                    let (capacity, allocatable) = (units(&status.capacity), units(&status.allocatable));
                    Ok(
                        if capacity.as_deref() == Some(KVM_UNITS)
                            && allocatable.as_deref() == Some(KVM_UNITS)
                        {
                            Look::Done((capacity, allocatable))
                        } else {
                            Look::NotYet(format!(
                                "capacity {capacity:?}, allocatable {allocatable:?}"
                            ))
                        },
                    )
                },
            )
            .await?;
            eprintln!(
                "e2e: node {node}: {KVM_RESOURCE} capacity {capacity:?}, allocatable {allocatable:?} \
                 (seen after {:.1?})",
                started.elapsed()
            );
        }

        // The Pods must meet the baseline Pod Security Standard.
        Api::<Namespace>::all(client.clone())
            .patch(
                &ns,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {
                    "pod-security.kubernetes.io/enforce": "baseline",
                }}})),
            )
            .await?;
        // The agent image, as the DaemonSet runs it (the harness imported it).
        let agents = pods::of_component(&client, &env.namespace, "agent").await?;
        let image = agents
            .iter()
            .find_map(|pod| pod.spec.as_ref()?.containers.first()?.image.clone())
            .context("no agent Pod to take the image from")?;
        let pod_api = Api::<Pod>::namespaced(client.clone(), &ns);

        let started = Instant::now();
        let granted = check_devices_pod(&pod_api, "with-kvm", &image, true).await?;
        let log = pod_api.logs("with-kvm", &Default::default()).await?;
        eprintln!(
            "e2e: Pod with {KVM_RESOURCE}: {granted} after {:.1?}; it printed:\n{log}",
            started.elapsed()
        );
        ensure!(
            granted == "Succeeded",
            "the Pod with {KVM_RESOURCE}: 1 ended {granted}; its output:\n{log}"
        );
        for device in ["/dev/kvm", "/dev/userfaultfd"] {
            ensure!(
                log.contains(&format!("{device}: opened read-write")),
                "the Pod with {KVM_RESOURCE} did not open {device}:\n{log}"
            );
        }

        let started = Instant::now();
        let denied = check_devices_pod(&pod_api, "without-kvm", &image, false).await?;
        let log = pod_api.logs("without-kvm", &Default::default()).await?;
        eprintln!(
            "e2e: Pod without {KVM_RESOURCE}: {denied} after {:.1?}; it printed:\n{log}",
            started.elapsed()
        );
        ensure!(
            denied == "Failed",
            "the Pod without {KVM_RESOURCE} ended {denied}; its output:\n{log}"
        );
        ensure!(
            !log.contains("/dev/kvm: opened read-write"),
            "the Pod without {KVM_RESOURCE} opened /dev/kvm:\n{log}"
        );
        Ok(())
    })
}

/// Runs `sandfork-agent check-devices` in an unprivileged Pod, with one unit
/// of `sandfork.dev/kvm` or none, and returns the phase it ended in.
async fn check_devices_pod(
    pods: &Api<Pod>,
    name: &str,
    image: &str,
    with_kvm: bool,
) -> anyhow::Result<String> {
    let resources = if with_kvm {
        json!({"limits": {KVM_RESOURCE: "1"}})
    } else {
        json!({})
    };
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            // Where the agents are; with the limit the scheduler picks a node
            // that has a unit free.
            "nodeSelector": {"sandfork.dev/kvm": "true"},
            "securityContext": {
                // The device files are root's and mode 0600 on these nodes,
                // and the runtime gives the container's device nodes the
                // host's owner and mode: only uid 0 may open them, so the Pod
                // runs as root. Still unprivileged: no capability at all, no
                // privilege escalation, the runtime's seccomp profile. What
                // lets it open them is the device cgroup grant from the
                // agent's Allocate answer.
                "runAsUser": 0,
                "runAsGroup": 0,
                "runAsNonRoot": false,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [{
                "name": "check",
                "image": image,
                "imagePullPolicy": "Never",
                "args": ["check-devices"],
                "resources": resources,
                "securityContext": {
                    "privileged": false,
                    "allowPrivilegeEscalation": false,
                    "capabilities": {"drop": ["ALL"]},
                },
            }],
        },
    }))?;
    // A new namespace's default ServiceAccount may not exist yet.
    wait::until(
        &format!("creating Pod {name}"),
        Duration::from_secs(30),
        || async {
            match pods.create(&Default::default(), &pod).await {
                Ok(_) => Ok(Look::Done(())),
                Err(kube::Error::Api(err)) if err.code == 409 => Ok(Look::Done(())),
                Err(err) => Ok(Look::NotYet(format!("{err}"))),
            }
        },
    )
    .await?;
    wait::until(
        &format!("Pod {name} to end"),
        Duration::from_secs(120),
        || async {
            let phase = pods
                .get(name)
                .await?
                .status
                .and_then(|status| status.phase)
                .unwrap_or_default();
            Ok(match phase.as_str() {
                "Succeeded" | "Failed" => Look::Done(phase),
                _ => Look::NotYet(format!("phase {phase:?}")),
            })
        },
    )
    .await
}

/// Starts a counter Sandbox and waits until it is Ready and has finished
/// at least `passes` passes; returns (node, uid, last pass seen).
async fn running_counter(
    env: &Env,
    ns: &str,
    name: &str,
    passes: u64,
) -> anyhow::Result<(String, String, u64)> {
    objects::create_sandbox(env, ns, name, counter_spec()).await?;
    let sandbox = objects::sandbox_ready(env, ns, name, SANDBOX_READY).await?;
    let (node, uid) = placement(&sandbox)?;
    let (pass, _) = counter_reports(env, &node, &uid, passes, Duration::from_secs(120)).await?;
    Ok((node, uid, pass))
}

/// The pass a branch was restored in: its first report is that pass, each
/// report after it one more. A guest booted afresh would give 1.
async fn restored_pass(env: &Env, node: &str, uid: &str) -> anyhow::Result<u64> {
    let (pass, reports) = counter_reports(env, node, uid, 1, Duration::from_secs(60)).await?;
    Ok(pass + 1 - reports)
}

/// Checks the branches of a Ready SandboxBranch: all on the source's node,
/// Ready, marked with their origin, and all restored in the same pass, one
/// after `before` (the source's pass seen before the SandboxBranch existed)
/// and not after `after` (seen once it was Ready). Returns that pass.
async fn check_branches(
    env: &Env,
    ns: &str,
    branch: &sandfork_api::SandboxBranch,
    source: &str,
    source_node: &str,
    before: u64,
) -> anyhow::Result<u64> {
    let name = branch.metadata.name.clone().unwrap_or_default();
    let status = branch.status.clone().unwrap_or_default();
    let wanted = branch.spec.branches as usize;
    ensure!(
        status.branches.len() == wanted,
        "status lists {:?}",
        status.branches
    );
    ensure!(
        status.branches.iter().all(|b| b.ready),
        "not all ready: {:?}",
        status.branches
    );
    ensure!(
        status.branches_ready.as_deref() == Some(format!("{wanted}/{wanted}").as_str()),
        "branchesReady {:?}",
        status.branches_ready
    );
    ensure!(
        status.source_node.as_deref() == Some(source_node),
        "sourceNode {:?}",
        status.source_node
    );
    let capture = status.capture.as_ref().context("no capture figures")?;
    ensure!(
        capture.bytes == MEMORY_MIB << 20,
        "captured {} bytes",
        capture.bytes
    );
    ensure!(status.capture_time.is_some(), "no captureTime");

    // The capture exists on the agent, keyed by the SandboxBranch's UID.
    let branch_uid = branch.metadata.uid.clone().unwrap_or_default();
    let mut agent = env.agent(source_node).await?;
    let captured = agent
        .get_capture(pb::GetCaptureRequest { uid: branch_uid })
        .await
        .context("GetCapture")?
        .into_inner();
    ensure!(
        captured.memory_bytes == MEMORY_MIB << 20,
        "agent capture {captured:?}"
    );

    let mut passes = BTreeSet::new();
    for entry in &status.branches {
        let sandbox = objects::sandboxes(env, ns).get(&entry.name).await?;
        ensure!(sandbox.is_ready(), "{} is not Ready", entry.name);
        let (node, uid) = placement(&sandbox)?;
        ensure!(
            node == source_node,
            "{} runs on {node}, its source on {source_node}",
            entry.name
        );
        let origin = sandbox
            .status
            .as_ref()
            .and_then(|s| s.origin.clone())
            .context("no status.origin")?;
        ensure!(
            origin.source_sandbox == source && origin.sandbox_branch == name,
            "{} origin {origin:?}",
            entry.name
        );
        ensure!(
            sandbox
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(labels::BRANCH))
                == Some(&name),
            "{} lacks label {}",
            entry.name,
            labels::BRANCH
        );
        passes.insert(restored_pass(env, &node, &uid).await?);
    }
    ensure!(
        passes.len() == 1,
        "branches restored in different passes {passes:?}: not one instant"
    );
    let pass = passes.into_iter().next().unwrap_or_default();
    ensure!(
        pass > before,
        "branches restored in pass {pass}, but the source had finished pass {before} before the capture"
    );
    Ok(pass)
}

/// Three branches of a running counter continue from the captured
/// instant, and the source keeps running.
fn branches_continue_from_capture(env: &Env) -> anyhow::Result<()> {
    env.scenario("three-branches", false, |ns| async move {
        let (node, uid, before) = running_counter(env, &ns, "source", 3).await?;
        objects::create_branch(
            env,
            &ns,
            "fork",
            json!({"sourceRef": {"name": "source"}, "branches": 3, "branchMemoryRequestMiB": 8}),
        )
        .await?;
        let branch = objects::branch_ready(env, &ns, "fork", BRANCH_READY).await?;
        let (after, _) = objects::counter(env, &node, &uid).await?;
        let pass = check_branches(env, &ns, &branch, "source", &node, before).await?;
        check_branch_pod_memory(env, &ns, "fork-0", 8).await?;
        ensure!(
            pass <= after + 1,
            "branches restored in pass {pass}, after the source's pass {after}"
        );
        // The source ran on through the capture.
        let (_, reports) = objects::counter(env, &node, &uid).await?;
        counter_reports(env, &node, &uid, reports + 1, Duration::from_secs(60)).await?;
        // The live capture's copy, still going on when the branches started,
        // shows its duration in the status once it completes.
        let branches = objects::branches(env, &ns);
        wait::until(
            "the capture's copy duration in the SandboxBranch status",
            Duration::from_secs(60),
            || async {
                let figures = branches.get("fork").await?.status.and_then(|s| s.capture);
                Ok(
                    match figures.as_ref().and_then(|f| f.copy_duration_millis) {
                        Some(millis) => Look::Done(millis),
                        None => Look::NotYet(format!("{figures:?}")),
                    },
                )
            },
        )
        .await?;
        Ok(())
    })
}

/// The pool's warm Pods, claimed or not (they keep the pool's label).
async fn warm_pods(env: &Env, ns: &str, pool: &str) -> anyhow::Result<Vec<Pod>> {
    Ok(Api::<Pod>::namespaced(env.client(), ns)
        .list(&ListParams::default().labels(&labels::warm_pool_selector(pool)))
        .await?
        .items)
}

/// Waits until SandboxWarmPool `pool` reports `ready` warm Pods.
async fn warm_pool_ready(env: &Env, ns: &str, pool: &str, ready: u32) -> anyhow::Result<()> {
    let pools: Api<SandboxWarmPool> = Api::namespaced(env.client(), ns);
    wait::until(
        &format!("SandboxWarmPool {pool} to have {ready} ready Pods"),
        SANDBOX_READY,
        || async {
            env.check_processes()?;
            let status = pools.get(pool).await?.status.unwrap_or_default();
            Ok(if status.ready_pods == ready {
                Look::Done(())
            } else {
                Look::NotYet(format!("{status:?}"))
            })
        },
    )
    .await
}

/// Branches claim the warm Pods of a SandboxWarmPool of their size class
/// (Pods that were Ready, their VMM answering, before the branch existed),
/// one Pod each, and a branch finding none gets a Pod made for it; the
/// SandboxBranch's status says which. The pool refills in the background,
/// claimed Pods go with their branches, unclaimed ones with the pool.
fn warm_pods_serve_branches(env: &Env) -> anyhow::Result<()> {
    env.scenario("warm-pool", false, |ns| async move {
        let (node, _, before) = running_counter(env, &ns, "source", 2).await?;
        let pool: SandboxWarmPool = serde_json::from_value(json!({
            "apiVersion": "sandfork.dev/v1alpha1",
            "kind": "SandboxWarmPool",
            "metadata": {"name": "warm", "namespace": ns},
            "spec": {"podsPerNode": 2, "memoryMiB": MEMORY_MIB, "vcpus": 1,
                     "resources": {"memoryRequestMiB": 8}, "nodeNames": [node]},
        }))?;
        let pools: Api<SandboxWarmPool> = Api::namespaced(env.client(), &ns);
        pools.create(&Default::default(), &pool).await?;
        warm_pool_ready(env, &ns, "warm", 2).await?;
        let warm: BTreeSet<String> = warm_pods(env, &ns, "warm")
            .await?
            .iter()
            .map(|pod| pod.metadata.name.clone().unwrap_or_default())
            .collect();
        ensure!(warm.len() == 2, "warm Pods {warm:?}");

        objects::create_branch(
            env,
            &ns,
            "fork",
            json!({"sourceRef": {"name": "source"}, "branches": 3, "branchMemoryRequestMiB": 8}),
        )
        .await?;
        let branch = objects::branch_ready(env, &ns, "fork", BRANCH_READY).await?;
        check_branches(env, &ns, &branch, "source", &node, before).await?;
        let entries = branch.status.clone().unwrap_or_default().branches;
        let mut claimed = BTreeSet::new();
        for entry in &entries {
            let sandbox = objects::sandboxes(env, &ns).get(&entry.name).await?;
            let status = sandbox.status.clone().unwrap_or_default();
            let pod_name = status.pod.clone().unwrap_or_default();
            ensure!(
                status.pod_source == entry.pod_source,
                "{}: the SandboxBranch says {:?}, the Sandbox {:?}",
                entry.name,
                entry.pod_source,
                status.pod_source
            );
            match entry.pod_source {
                Some(PodSource::Warm) => {
                    ensure!(
                        warm.contains(&pod_name),
                        "{} runs in {pod_name}",
                        entry.name
                    );
                    ensure!(claimed.insert(pod_name.clone()), "{pod_name} claimed twice");
                }
                Some(PodSource::Cold) => ensure!(
                    pod_name == sandfork_api::pod::name(&entry.name),
                    "{} runs in {pod_name}",
                    entry.name
                ),
                None => bail!("{} has no pod source", entry.name),
            }
            let pod = pods::of_sandbox(&env.client(), &ns, &entry.name)
                .await?
                .with_context(|| format!("{} has no Pod", entry.name))?;
            let owner = pods::controller(&pod);
            ensure!(
                owner
                    == Some((
                        "Sandbox".into(),
                        sandbox.metadata.uid.clone().unwrap_or_default()
                    )),
                "{pod_name} is controlled by {owner:?}"
            );
        }
        ensure!(
            claimed.len() == 2 && entries.len() == 3,
            "two branches in the two warm Pods, one in a cold Pod: {entries:?}"
        );
        check_branch_pod_memory(env, &ns, &entries[0].name, 8).await?;

        // Refilled in the background: two more ready, not counting the claimed.
        warm_pool_ready(env, &ns, "warm", 2).await?;
        ensure!(
            warm_pods(env, &ns, "warm").await?.len() == 4,
            "two claimed and two new warm Pods"
        );

        // The claimed Pods go with their branches, the others with the pool.
        objects::branches(env, &ns)
            .delete("fork", &DeleteParams::default())
            .await?;
        pools.delete("warm", &DeleteParams::default()).await?;
        wait::until(
            "the warm Pods to be gone",
            Duration::from_secs(120),
            || async {
                let left: Vec<String> = warm_pods(env, &ns, "warm")
                    .await?
                    .iter()
                    .map(|p| p.metadata.name.clone().unwrap_or_default())
                    .collect();
                Ok(if left.is_empty() {
                    Look::Done(())
                } else {
                    Look::NotYet(format!("left: {left:?}"))
                })
            },
        )
        .await?;
        Ok(())
    })
}

/// The Pod of branch `name` requests `guest_request_mib` of its guest's
/// memory (plus the overhead) and is limited to the whole guest, so it is
/// Burstable: the kubelet admitted it so.
async fn check_branch_pod_memory(
    env: &Env,
    ns: &str,
    name: &str,
    guest_request_mib: u64,
) -> anyhow::Result<()> {
    let pod = pods::of_sandbox(&env.client(), ns, name)
        .await?
        .with_context(|| format!("branch {name} has no Pod"))?;
    let resources = pod
        .spec
        .as_ref()
        .and_then(|spec| spec.containers.first())
        .and_then(|vmm| vmm.resources.clone())
        .unwrap_or_default();
    let memory = |quantities: Option<std::collections::BTreeMap<String, Quantity>>| {
        quantities
            .and_then(|q| q.get("memory").map(|m| m.0.clone()))
            .unwrap_or_default()
    };
    let overhead = sandfork_api::pod::DEFAULT_OVERHEAD_MIB;
    let guest = counter_spec()["memoryMiB"].as_u64().unwrap_or_default();
    ensure!(
        memory(resources.requests.clone()) == format!("{}Mi", guest_request_mib + overhead)
            && memory(resources.limits.clone()) == format!("{}Mi", guest + overhead),
        "branch Pod {name}: memory requests {:?}, limits {:?}",
        resources.requests,
        resources.limits
    );
    let qos = pod.status.and_then(|s| s.qos_class).unwrap_or_default();
    ensure!(qos == "Burstable", "branch Pod {name}: QoS class {qos:?}");
    Ok(())
}

/// A branch can be branched again; the second generation continues from
/// the first branch's state.
fn branch_of_a_branch(env: &Env) -> anyhow::Result<()> {
    env.scenario("branch-of-branch", false, |ns| async move {
        let (node, _, before) = running_counter(env, &ns, "source", 3).await?;
        objects::create_branch(
            env,
            &ns,
            "first",
            json!({"sourceRef": {"name": "source"}, "branches": 1}),
        )
        .await?;
        let first = objects::branch_ready(env, &ns, "first", BRANCH_READY).await?;
        let first_pass = check_branches(env, &ns, &first, "source", &node, before).await?;

        // Let the branch run on past its restored pass, then branch it.
        let child = objects::sandboxes(env, &ns).get("first-0").await?;
        let (_, child_uid) = placement(&child)?;
        let (_, reports) = objects::counter(env, &node, &child_uid).await?;
        let (child_pass, _) =
            counter_reports(env, &node, &child_uid, reports + 2, Duration::from_secs(60)).await?;
        ensure!(
            child_pass > first_pass,
            "the branch did not run on ({child_pass} <= {first_pass})"
        );

        objects::create_branch(
            env,
            &ns,
            "second",
            json!({"sourceRef": {"name": "first-0"}, "branches": 1}),
        )
        .await?;
        let second = objects::branch_ready(env, &ns, "second", BRANCH_READY).await?;
        check_branches(env, &ns, &second, "first-0", &node, child_pass).await?;
        Ok(())
    })
}

/// Deleting a SandboxBranch with deletionPolicy Delete removes its
/// branches and its capture: their processes end and the node's memory
/// in use drops by what they held. The source is untouched.
fn deleting_branch_frees_node(env: &Env) -> anyhow::Result<()> {
    // Exclusive: the node's totals are compared before and after.
    env.scenario("delete-branches", true, |ns| async move {
        let (node, source_uid, _) = running_counter(env, &ns, "source", 1).await?;
        objects::create_branch(
            env,
            &ns,
            "doomed",
            json!({"sourceRef": {"name": "source"}, "branches": 2, "deletionPolicy": "Delete"}),
        )
        .await?;
        let branch = objects::branch_ready(env, &ns, "doomed", BRANCH_READY).await?;
        let branch_uid = branch.metadata.uid.clone().unwrap_or_default();
        let mut vms = Vec::new();
        for entry in branch.status.clone().unwrap_or_default().branches {
            let sandbox = objects::sandboxes(env, &ns).get(&entry.name).await?;
            let (_, uid) = placement(&sandbox)?;
            let pod = vm_pod(env, &ns, &entry.name).await?;
            vms.push((entry.name, uid, pod));
        }
        let mut agent = env.agent(&node).await?;
        let info_before = agent.get_info(pb::GetInfoRequest {}).await?.into_inner();

        objects::branches(env, &ns)
            .delete("doomed", &DeleteParams::default())
            .await?;
        let sandboxes = objects::sandboxes(env, &ns);
        let branches = objects::branches(env, &ns);
        wait::until(
            "the SandboxBranch and its branches to be gone",
            Duration::from_secs(120),
            || async {
                let left = sandboxes
                    .list(&ListParams::default().labels(&format!("{}=doomed", labels::BRANCH)))
                    .await?
                    .items
                    .len();
                let branch_left = branches.get_opt("doomed").await?.is_some();
                Ok(if left == 0 && !branch_left {
                    Look::Done(())
                } else {
                    Look::NotYet(format!(
                        "{left} branch Sandboxes, SandboxBranch present: {branch_left}"
                    ))
                })
            },
        )
        .await?;

        // The agent no longer runs them nor keeps the capture.
        let running: Vec<String> = agent
            .list_sandboxes(pb::ListSandboxesRequest {})
            .await?
            .into_inner()
            .sandboxes
            .into_iter()
            .map(|s| s.uid)
            .collect();
        for (name, uid, pod) in &vms {
            ensure!(
                !running.contains(uid),
                "the agent still runs branch {name} ({uid})"
            );
            let client = env.client();
            wait::until(
                &format!("branch {name}'s Pod to be gone"),
                Duration::from_secs(60),
                || async {
                    Ok(match pods::of_sandbox(&client, &ns, name).await? {
                        None => Look::Done(()),
                        Some(pod) => Look::NotYet(format!(
                            "{} ({:?})",
                            pods::uid(&pod),
                            pod.status.and_then(|s| s.phase)
                        )),
                    })
                },
            )
            .await?;
            if let Some(alive) = env.vm_process_alive(pod) {
                ensure!(!alive, "branch {name}'s VMM (Pod {pod}) still runs");
            }
        }
        ensure!(running.contains(&source_uid), "the source stopped running");
        let captures = agent
            .list_captures(pb::ListCapturesRequest {})
            .await?
            .into_inner()
            .captures;
        ensure!(
            !captures.iter().any(|c| c.uid == branch_uid),
            "the agent still keeps the capture"
        );

        let info_after = agent.get_info(pb::GetInfoRequest {}).await?.into_inner();
        let freed = info_before
            .memory_used_mib
            .saturating_sub(info_after.memory_used_mib);
        ensure!(
            freed >= 2 * MEMORY_MIB,
            "memory in use went from {} to {} MiB: the branches' {} MiB were not freed",
            info_before.memory_used_mib,
            info_after.memory_used_mib,
            2 * MEMORY_MIB
        );
        ensure!(
            info_after.sandboxes + 2 == info_before.sandboxes,
            "sandboxes on the node went from {} to {}",
            info_before.sandboxes,
            info_after.sandboxes
        );
        let source = sandboxes.get("source").await?;
        ensure!(source.is_ready(), "the source is no longer Ready");
        Ok(())
    })
}

/// A SandboxBranch whose source does not exist fails with a reason that
/// says so, and leaves everything else as it was.
fn missing_source_fails_cleanly(env: &Env) -> anyhow::Result<()> {
    env.scenario("missing-source", false, |ns| async move {
        let (node, bystander_uid, _) = running_counter(env, &ns, "bystander", 1).await?;
        let bystander_pod = vm_pod(env, &ns, "bystander").await?;

        objects::create_branch(
            env,
            &ns,
            "orphan",
            json!({"sourceRef": {"name": "nonexistent"}, "branches": 2, "failureDeadline": "15s"}),
        )
        .await?;
        let branch = objects::branch_failed(env, &ns, "orphan", Duration::from_secs(90)).await?;
        let status = branch.status.clone().unwrap_or_default();
        let failed = condition(&status.conditions, FAILED).context("no Failed condition")?;
        let ready = condition(&status.conditions, READY).context("no Ready condition")?;
        ensure!(ready.status == "False", "Ready is {ready:?}");
        let said = format!("{}: {}", failed.reason, failed.message);
        ensure!(
            failed.message.contains("\"nonexistent\"") && failed.message.contains("does not exist"),
            "the Failed condition does not say that the source is missing: {said}"
        );
        let error = status.error.as_ref().context("no status.error")?;
        ensure!(
            error.message.contains("nonexistent"),
            "status.error: {error:?}"
        );

        // Nothing was created, captured or disturbed.
        let made = objects::sandboxes(env, &ns)
            .list(&ListParams::default().labels(&format!("{}=orphan", labels::BRANCH)))
            .await?;
        ensure!(
            made.items.is_empty(),
            "it created Sandboxes: {:?}",
            made.items.len()
        );
        let branch_uid = branch.metadata.uid.clone().unwrap_or_default();
        for agent_node in env.agent_nodes().await? {
            let mut agent = env.agent(&agent_node).await?;
            let captures = agent
                .list_captures(pb::ListCapturesRequest {})
                .await?
                .into_inner()
                .captures;
            ensure!(
                !captures.iter().any(|c| c.uid == branch_uid),
                "a capture exists on {agent_node}"
            );
        }
        let bystander = objects::sandboxes(env, &ns).get("bystander").await?;
        ensure!(bystander.is_ready(), "the bystander is no longer Ready");
        let pod = vm_pod(env, &ns, "bystander").await?;
        ensure!(
            pod == bystander_pod,
            "the bystander's Pod changed: {bystander_pod} -> {pod}"
        );
        let (_, reports) = objects::counter(env, &node, &bystander_uid).await?;
        counter_reports(
            env,
            &node,
            &bystander_uid,
            reports + 1,
            Duration::from_secs(60),
        )
        .await?;

        // It goes away cleanly.
        objects::branches(env, &ns)
            .delete("orphan", &DeleteParams::default())
            .await?;
        let branches = objects::branches(env, &ns);
        wait::until(
            "the failed SandboxBranch to be deleted",
            Duration::from_secs(60),
            || async {
                Ok(match branches.get_opt("orphan").await? {
                    None => Look::Done(()),
                    Some(b) => Look::NotYet(format!("finalizers {:?}", b.metadata.finalizers)),
                })
            },
        )
        .await
    })
}

/// What `sandfork-e2e-bench` measures, once: a fork of a running counter
/// timed from its create request to the watch event that shows it Ready,
/// each step seen on the way and the agent's figures read from the
/// operator's Events; afterwards the agent holds neither its branch nor its
/// capture.
fn fork_is_timed_by_watch(env: &Env) -> anyhow::Result<()> {
    env.scenario("timed-fork", false, |ns| async move {
        let (node, _) = bench::start_source(env, &ns, "source", "Counter", MEMORY_MIB).await?;
        let fork = bench::fork(env, &ns, "source", &node, "timed", bench::Mode::Live, None).await?;
        let at = |step: Step| fork.seen_ms.get(&step).copied();
        let missing: Vec<Step> = Step::ALL
            .into_iter()
            .filter(|step| at(*step).is_none())
            .collect();
        ensure!(
            missing.is_empty(),
            "steps not seen: {missing:?} in {fork:?}"
        );
        // Each watch delivers its object's changes in order.
        for steps in [
            [
                Step::BranchFinalizer,
                Step::Capturing,
                Step::Captured,
                Step::Ready,
            ],
            [
                Step::SandboxCreated,
                Step::SandboxFinalizer,
                Step::SandboxBound,
                Step::SandboxReady,
            ],
        ] {
            ensure!(
                steps.windows(2).all(|pair| at(pair[0]) <= at(pair[1])),
                "steps {steps:?} out of order: {:?}",
                fork.seen_ms
            );
        }
        ensure!(
            at(Step::Ready) == Some(fork.apply_to_ready_ms)
                && fork
                    .seen_ms
                    .values()
                    .all(|ms| *ms <= fork.apply_to_ready_ms),
            "Ready was not the last step: {fork:?}"
        );
        ensure!(
            fork.capture_call_ms.is_some() && fork.restore_call_ms.is_some(),
            "the operator's Events gave no call durations: {fork:?}"
        );
        ensure!(
            fork.copy_ms.is_some_and(|ms| ms > 0.0),
            "no copy duration: {fork:?}"
        );
        Ok(())
    })
}

/// The UID of the Pod that runs Sandbox `name`'s VM.
async fn vm_pod(env: &Env, ns: &str, name: &str) -> anyhow::Result<String> {
    let pod = pods::of_sandbox(&env.client(), ns, name)
        .await?
        .with_context(|| format!("Sandbox {name} has no Pod"))?;
    Ok(pods::uid(&pod))
}

/// The agent's Lease on `node`: (acquireTime, the UID of the Pod that owns it).
async fn agent_lease(env: &Env, node: &str) -> anyhow::Result<Option<(String, String)>> {
    let leases: Api<Lease> = Api::namespaced(env.client(), &env.namespace);
    Ok(leases
        .get_opt(&sandfork_api::agent::lease::name(node))
        .await?
        .map(|lease| {
            let acquired = lease
                .spec
                .and_then(|s| s.acquire_time)
                .map(|t| t.0.to_string())
                .unwrap_or_default();
            let owner = lease
                .metadata
                .owner_references
                .unwrap_or_default()
                .first()
                .map(|o| o.uid.clone())
                .unwrap_or_default();
            (acquired, owner)
        }))
}

/// Waits until a new agent Pod (not `old_uid`) runs on `node`, owns the
/// node's Lease, has written it anew and answers over mTLS.
async fn agent_replaced(env: &Env, node: &str, old_uid: &str) -> anyhow::Result<String> {
    let client = env.client();
    wait::until(
        &format!("a new agent Pod on {node} to register and answer"),
        Duration::from_secs(120),
        || async {
            let Some(pod) = pods::agent_on(&client, &env.namespace, node).await? else {
                return Ok(Look::NotYet("no agent Pod".into()));
            };
            let uid = pods::uid(&pod);
            if uid == old_uid || !pods::is_ready(&pod) {
                return Ok(Look::NotYet(format!(
                    "agent Pod {uid}, ready {}",
                    pods::is_ready(&pod)
                )));
            }
            let lease = agent_lease(env, node).await?;
            if lease.as_ref().map(|(_, owner)| owner.as_str()) != Some(uid.as_str()) {
                return Ok(Look::NotYet(format!("Lease {lease:?}, new Pod {uid}")));
            }
            let mut agent = env.agent(node).await?;
            agent.get_info(pb::GetInfoRequest {}).await?;
            Ok(Look::Done(uid))
        },
    )
    .await
}

/// An agent Pod deleted: the DaemonSet's replacement registers again (a
/// new Lease owned by the new Pod) and adopts the sandbox that kept running
/// in its own Pod meanwhile: the same Pod, its counter guest's passes going
/// on, its Sandbox Ready. The new agent runs new sandboxes too.
fn agent_pod_replaced(env: &Env) -> anyhow::Result<()> {
    env.scenario("agent-replaced", true, |ns| async move {
        let (node, uid, _) = running_counter(env, &ns, "before", 1).await?;
        let pod = vm_pod(env, &ns, "before").await?;
        let (_, reports_before) = objects::counter(env, &node, &uid).await?;
        let client = env.client();
        let old = pods::agent_on(&client, &env.namespace, &node)
            .await?
            .with_context(|| format!("no agent Pod on {node}"))?;
        let old_name = old.metadata.name.clone().unwrap_or_default();
        let started = Instant::now();
        pods::delete(&client, &env.namespace, &old_name).await?;
        let new_uid = agent_replaced(env, &node, &pods::uid(&old)).await?;
        eprintln!(
            "e2e: agent Pod {old_name} on {node} replaced by {new_uid}, registered and answering after {:.1?}",
            started.elapsed()
        );
        ensure!(
            vm_pod(env, &ns, "before").await? == pod,
            "the sandbox's Pod was replaced"
        );
        if let Some(alive) = env.vm_process_alive(&pod) {
            ensure!(alive, "the VMM of Pod {pod} did not outlive the agent");
        }
        // The new agent finds the same VM, which went on counting.
        let (pass, reports) =
            counter_reports(env, &node, &uid, reports_before + 2, Duration::from_secs(60)).await?;
        let sandbox = objects::sandbox_ready(env, &ns, "before", SANDBOX_READY).await?;
        ensure!(sandbox.is_ready(), "the adopted Sandbox is not Ready");
        eprintln!(
            "e2e: the sandbox on {node} outlived its agent: {reports_before} -> {reports} reports (pass {pass})"
        );
        // The new agent runs sandboxes.
        objects::create_sandbox(
            env,
            &ns,
            "after",
            json!({"guest": {"builtin": "Counter"}, "memoryMiB": MEMORY_MIB, "vcpus": 1, "nodeName": node}),
        )
        .await?;
        let after = objects::sandbox_ready(env, &ns, "after", SANDBOX_READY).await?;
        let (after_node, after_uid) = placement(&after)?;
        ensure!(after_node == node, "the new sandbox runs on {after_node}");
        counter_reports(env, &node, &after_uid, 1, Duration::from_secs(60)).await?;
        Ok(())
    })
}

/// The agent process killed (SIGKILL, as a crash): the kubelet restarts its
/// container, and the sandbox ran on in its own Pod, adopted again.
fn agent_crash_loses_no_sandbox(env: &Env) -> anyhow::Result<()> {
    env.scenario("agent-crash", true, |ns| async move {
        let (node, uid, _) = running_counter(env, &ns, "survivor", 1).await?;
        let pod = vm_pod(env, &ns, "survivor").await?;
        let client = env.client();
        let agent = pods::agent_on(&client, &env.namespace, &node)
            .await?
            .with_context(|| format!("no agent Pod on {node}"))?;
        let agent_name = agent.metadata.name.clone().unwrap_or_default();
        let restarts = |pod: &Pod| -> i32 {
            pod.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .map(|statuses| statuses.iter().map(|c| c.restart_count).sum())
                .unwrap_or_default()
        };
        let restarts_before = restarts(&agent);
        let (_, reports_before) = objects::counter(env, &node, &uid).await?;
        let Some(killed) = env.kill_agent(&node) else {
            eprintln!("e2e: not a local cluster: agent crash scenario skipped");
            return Ok(());
        };
        ensure!(killed == 1, "killed {killed} agent processes on {node}");
        let started = Instant::now();
        let pods_api = Api::<Pod>::namespaced(client.clone(), &env.namespace);
        wait::until(
            "the agent's container to restart and answer",
            Duration::from_secs(120),
            || async {
                let agent = pods_api.get(&agent_name).await?;
                if restarts(&agent) <= restarts_before || !pods::is_ready(&agent) {
                    return Ok(Look::NotYet(format!("{} restarts", restarts(&agent))));
                }
                Ok(match env.agent(&node).await {
                    Ok(mut agent) => match agent.get_info(pb::GetInfoRequest {}).await {
                        Ok(_) => Look::Done(()),
                        Err(err) => Look::NotYet(err.to_string()),
                    },
                    Err(err) => Look::NotYet(format!("{err:#}")),
                })
            },
        )
        .await?;
        eprintln!(
            "e2e: agent on {node} killed; its container restarted and answers after {:.1?}",
            started.elapsed()
        );
        ensure!(
            vm_pod(env, &ns, "survivor").await? == pod,
            "the sandbox's Pod was replaced"
        );
        let (pass, reports) =
            counter_reports(env, &node, &uid, reports_before + 2, Duration::from_secs(60)).await?;
        objects::sandbox_ready(env, &ns, "survivor", SANDBOX_READY).await?;
        eprintln!(
            "e2e: the sandbox outlived the agent's crash: {reports_before} -> {reports} reports (pass {pass})"
        );
        Ok(())
    })
}

/// A sandbox's Pod deleted under it: its VMM stops with the Pod, and the
/// Sandbox fails for good with a reason that says so (a VM's state cannot
/// be recreated), with no new Pod made.
fn deleted_pod_fails_its_sandbox(env: &Env) -> anyhow::Result<()> {
    env.scenario("pod-deleted", false, |ns| async move {
        running_counter(env, &ns, "orphaned", 1).await?;
        let pod = vm_pod(env, &ns, "orphaned").await?;
        let client = env.client();
        pods::delete(&client, &ns, &sandfork_api::pod::name("orphaned")).await?;
        let (reason, message) =
            ready_reason(env, &ns, "orphaned", Duration::from_secs(120), |reason| {
                reason == "PodDeleted" || reason == "PodFailed"
            })
            .await?;
        ensure!(
            reason == "PodDeleted" || reason == "PodFailed",
            "reason {reason}: {message}"
        );
        eprintln!("e2e: a deleted sandbox Pod fails its Sandbox: {reason}: {message}");
        wait::until(
            "the Pod to be gone, and no other made",
            Duration::from_secs(60),
            || async {
                Ok(match pods::of_sandbox(&client, &ns, "orphaned").await? {
                    None => Look::Done(()),
                    Some(other) => Look::NotYet(format!("Pod {}", pods::uid(&other))),
                })
            },
        )
        .await?;
        if let Some(alive) = env.vm_process_alive(&pod) {
            ensure!(!alive, "the VMM of the deleted Pod {pod} still runs");
        }
        Ok(())
    })
}

/// The operator's Pod deleted while a fork is in flight: the Deployment's
/// replacement takes the leader Lease and finishes the fork.
fn operator_pod_replaced_mid_fork(env: &Env) -> anyhow::Result<()> {
    env.scenario("operator-replaced", true, |ns| async move {
        let (node, _, before) = running_counter(env, &ns, "source", 2).await?;
        let leader = env.wait_for_leader(Duration::from_secs(60)).await?;
        objects::create_branch(
            env,
            &ns,
            "fork",
            json!({"sourceRef": {"name": "source"}, "branches": 3}),
        )
        .await?;
        let client = env.client();
        pods::delete(&client, &env.namespace, &leader).await?;
        let started = Instant::now();
        let branch = objects::branch_ready(env, &ns, "fork", BRANCH_READY).await?;
        let new_leader = env.wait_for_leader(Duration::from_secs(60)).await?;
        ensure!(
            new_leader != leader,
            "the fork finished but {leader} still leads"
        );
        eprintln!(
            "e2e: operator Pod {leader} deleted mid-fork; {new_leader} finished it in {:.1?}",
            started.elapsed()
        );
        check_branches(env, &ns, &branch, "source", &node, before).await?;
        Ok(())
    })
}

/// `helm upgrade` to a changed agent image rolls the operator's and agents'
/// Pods while a fork is in progress, and back again with a second fork: a
/// sandbox runs on in its Pod throughout, and each fork either completes
/// with branches that continue from the capture or fails with a reason.
fn helm_upgrade_rolls_pods(env: &Env) -> anyhow::Result<()> {
    env.scenario("helm-upgrade", true, |ns| async move {
        let client = env.client();
        let names = |component: &'static str| {
            let client = client.clone();
            async move {
                anyhow::Ok(
                    pods::of_component(&client, &env.namespace, component)
                        .await?
                        .iter()
                        .map(pods::uid)
                        .collect::<BTreeSet<_>>(),
                )
            }
        };
        let (operators, agents) = (names("operator").await?, names("agent").await?);
        let (node, uid, before) = running_counter(env, &ns, "kept", 1).await?;
        let kept_pod = vm_pod(env, &ns, "kept").await?;
        let tag = sandfork_e2e::cluster::chart_app_version(&chart_dir().join("Chart.yaml"))?;
        let level = "info,sandfork_operator=debug,sandfork_node_agent=debug";
        for (round, set) in [
            vec![
                "--set".to_string(),
                format!(
                    "agent.image.tag={tag}{}",
                    sandfork_e2e::cluster::UPGRADE_TAG_SUFFIX
                ),
                "--set".into(),
                format!("operator.logLevel={level}"),
            ],
            Vec::new(),
        ]
        .into_iter()
        .enumerate()
        {
            let fork = format!("mid-upgrade-{round}");
            objects::create_branch(
                env,
                &ns,
                &fork,
                json!({"sourceRef": {"name": "kept"}, "branches": 2}),
            )
            .await?;
            let started = Instant::now();
            env.helm_release("upgrade", set.iter().map(String::as_str))?;
            env.wait_for_rollout(Duration::from_secs(180))?;
            eprintln!(
                "e2e: helm upgrade {set:?} rolled out in {:.1?}",
                started.elapsed()
            );
            let branches = objects::branches(env, &ns);
            let outcome = wait::until(
                &format!("SandboxBranch {fork} to complete or fail"),
                BRANCH_READY,
                || async {
                    let branch = branches.get(&fork).await?;
                    let status = branch.status.clone().unwrap_or_default();
                    Ok(
                        if conditions::is_true(&status.conditions, READY)
                            || conditions::is_true(&status.conditions, FAILED)
                        {
                            Look::Done(branch)
                        } else {
                            Look::NotYet(format!("{:?}", status.conditions))
                        },
                    )
                },
            )
            .await?;
            let status = outcome.status.clone().unwrap_or_default();
            if conditions::is_true(&status.conditions, READY) {
                check_branches(env, &ns, &outcome, "kept", &node, before).await?;
                eprintln!("e2e: fork {fork} across the upgrade completed");
            } else {
                let failed = condition(&status.conditions, FAILED).context("no Failed")?;
                ensure!(
                    !failed.message.is_empty(),
                    "fork {fork} failed without a reason"
                );
                eprintln!(
                    "e2e: fork {fork} across the upgrade failed cleanly: {}: {}",
                    failed.reason, failed.message
                );
            }
        }
        let (new_operators, new_agents) = (names("operator").await?, names("agent").await?);
        ensure!(
            operators.is_disjoint(&new_operators) && agents.is_disjoint(&new_agents),
            "not every Pod was replaced: operators {operators:?} -> {new_operators:?}, agents {agents:?} -> {new_agents:?}"
        );
        ensure!(
            new_agents.len() == agents.len(),
            "agents {agents:?} -> {new_agents:?}"
        );
        // The sandbox ran on in its Pod through both upgrades.
        ensure!(
            vm_pod(env, &ns, "kept").await? == kept_pod,
            "the kept sandbox's Pod was replaced"
        );
        let (_, reports) = objects::counter(env, &node, &uid).await?;
        counter_reports(env, &node, &uid, reports + 1, Duration::from_secs(60)).await?;
        ensure!(
            objects::sandboxes(env, &ns).get("kept").await?.is_ready(),
            "the kept sandbox is not Ready after the upgrades"
        );
        env.wait_for_leader(Duration::from_secs(60)).await?;
        // The rolled-out release serves: a sandbox starts.
        let (_, _, _) = running_counter(env, &ns, "after-upgrade", 1).await?;
        Ok(())
    })
}

/// `helm uninstall` leaves no Pod, Lease or Secret of the release. A
/// Sandbox is the user's, not the release's: its Pod runs on, and a
/// reinstall serves again and adopts it.
fn helm_uninstall_leaves_nothing(env: &Env) -> anyhow::Result<()> {
    env.scenario("helm-uninstall", true, |ns| async move {
        let (node, uid, _) = running_counter(env, &ns, "orphan", 1).await?;
        let pod = vm_pod(env, &ns, "orphan").await?;
        env.helm_release("uninstall", ["--wait", "--timeout", "3m"])?;
        let client = env.client();
        let release_ns = env.namespace.clone();
        wait::until(
            "no Pod, Lease or Secret of the release left",
            Duration::from_secs(120),
            || async {
                let pods = pods::names(&client, &release_ns).await?;
                let leases: Vec<String> = Api::<Lease>::namespaced(client.clone(), &release_ns)
                    .list(&ListParams::default())
                    .await?
                    .items
                    .into_iter()
                    .filter_map(|l| l.metadata.name)
                    .collect();
                let secrets: Vec<String> = Api::<Secret>::namespaced(client.clone(), &release_ns)
                    .list(&ListParams::default())
                    .await?
                    .items
                    .into_iter()
                    .filter_map(|s| s.metadata.name)
                    .filter(|name| name.starts_with(&env.release))
                    .collect();
                Ok(
                    if pods.is_empty() && leases.is_empty() && secrets.is_empty() {
                        Look::Done(())
                    } else {
                        Look::NotYet(format!(
                            "Pods {pods:?}, Leases {leases:?}, Secrets {secrets:?}"
                        ))
                    },
                )
            },
        )
        .await?;
        if let Some(alive) = env.vm_process_alive(&pod) {
            ensure!(
                alive,
                "the Sandbox's VMM (Pod {pod}) ended with the release"
            );
        }
        let started = Instant::now();
        env.helm_release("install", [])?;
        env.wait_for_rollout(Duration::from_secs(180))?;
        env.reinstalled().await?;
        eprintln!("e2e: reinstalled and serving in {:.1?}", started.elapsed());
        let (_, reports) = objects::counter(env, &node, &uid).await?;
        counter_reports(env, &node, &uid, reports + 1, Duration::from_secs(60)).await?;
        objects::sandbox_ready(env, &ns, "orphan", SANDBOX_READY).await?;
        Ok(())
    })
}
