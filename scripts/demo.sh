#!/usr/bin/env bash
# The main job: Sandfork as users meet it. Installs the Helm chart, applies a
# running Sandbox (examples/sandbox.yaml), a SandboxWarmPool of its size
# (examples/warm-pool.yaml) and a SandboxBranch of it (examples/branch.yaml),
# whose branches claim warm Pods, waits for them to be Ready and shows
# `kubectl get sandboxes,sandboxbranches`.
#
# Where it runs:
# - no cluster configured (no KUBECONFIG, no ~/.kube/config): a local
#   cluster with real nodes (e2e/cluster/local-cluster.sh: etcd,
#   kube-apiserver, kube-controller-manager, kube-scheduler, and nodes node-a
#   and node-b, each a kubelet, kube-proxy and containerd in namespaces of its
#   own), images of this checkout's operator and agent imported into the
#   nodes, and the chart installed with its defaults: the operator is its
#   Deployment's Pod, the agents its DaemonSet's. Everything is stopped and
#   removed at the end unless SANDFORK_DEMO_KEEP=1 (then it prints how to
#   reach the cluster and how to stop it).
# - a cluster in KUBECONFIG or ~/.kube/config: helm installs the chart
#   there (agents are the DaemonSet's, on nodes labelled sandfork.dev/kvm=true;
#   set the images with SANDFORK_HELM_ARGS, e.g.
#   "--set operator.image.repository=REG/sandfork-operator --set agent.image.repository=REG/sandfork-agent";
#   e2e/kind/Dockerfile builds them). The release stays; the demo's objects
#   are deleted at the end unless SANDFORK_DEMO_KEEP=1.
#
# scripts/demo-local.sh shows the agent's own command line without Kubernetes.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "demo: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
show() { echo "+ $*" >&2; "$@"; }

release=sandfork
namespace=sandfork-system
demo_ns="${SANDFORK_DEMO_NAMESPACE:-default}"

wait_and_show() {
  show kubectl -n "$demo_ns" apply -f examples/sandbox.yaml
  show kubectl -n "$demo_ns" wait --for=condition=Ready sandbox/counter --timeout=180s
  # Let the counter run a few passes, so that its branches start mid-run.
  sleep 5
  # Warm Pods of the counter's size: its branches claim them, no Pod start-up.
  show kubectl -n "$demo_ns" apply -f examples/warm-pool.yaml
  show kubectl -n "$demo_ns" wait --for=condition=Ready sandboxwarmpool/counter-size --timeout=180s
  show kubectl -n "$demo_ns" apply -f examples/branch.yaml
  show kubectl -n "$demo_ns" wait --for=condition=Ready sandboxbranch/counter-fork --timeout=300s
  show kubectl -n "$demo_ns" get sandboxes,sandboxbranches,sandboxwarmpools -o wide
  show kubectl -n "$demo_ns" get sandboxbranch counter-fork \
    -o jsonpath='{range .status.branches[*]}{.name}{" Pod: "}{.podSource}{"\n"}{end}'
  # One Pod per Sandbox, placed by the scheduler: its VMM runs the VM.
  show kubectl -n "$demo_ns" get pods -o wide -l app.kubernetes.io/component=sandbox
  show kubectl -n "$demo_ns" logs sandbox-counter --tail=5
}

# Sandboxes outlive their node's agent: delete the agent Pod of the source's
# node, wait for the DaemonSet's replacement, and show the same sandbox Pods
# still Running and their Sandboxes Ready.
agent_restart_keeps_sandboxes() {
  local node agent_pod before after
  node=$(kubectl -n "$demo_ns" get sandbox counter -o jsonpath='{.status.node}')
  agent_pod=$(kubectl -n "$namespace" get pods -l app.kubernetes.io/component=agent \
    --field-selector "spec.nodeName=$node" -o jsonpath='{.items[0].metadata.name}')
  before=$(kubectl -n "$demo_ns" get pods -l app.kubernetes.io/component=sandbox \
    -o jsonpath='{range .items[*]}{.metadata.uid}{"\n"}{end}' | sort)
  log "deleting the agent Pod $agent_pod of node $node; its sandboxes run in their own Pods"
  show kubectl -n "$namespace" delete pod "$agent_pod" --wait=true
  show kubectl -n "$namespace" rollout status daemonset/"$release"-agent --timeout=180s
  show kubectl -n "$namespace" get pods -o wide -l app.kubernetes.io/component=agent
  show kubectl -n "$demo_ns" get pods -o wide -l app.kubernetes.io/component=sandbox
  after=$(kubectl -n "$demo_ns" get pods -l app.kubernetes.io/component=sandbox \
    -o jsonpath='{range .items[*]}{.metadata.uid}{"\n"}{end}' | sort)
  [[ $before == "$after" ]] || die "the sandbox Pods changed across the agent's restart"
  show kubectl -n "$demo_ns" wait --for=condition=Ready sandbox --all --timeout=120s
  show kubectl -n "$demo_ns" get sandboxes -o wide
}

# --- a configured cluster -------------------------------------------------------

if [[ -n ${KUBECONFIG:-} || -f $HOME/.kube/config ]]; then
  for tool in kubectl helm; do command -v "$tool" >/dev/null || die "$tool not found on PATH"; done
  log "using the cluster of $(kubectl config current-context)"
  cleanup_cluster() {
    if [[ ${SANDFORK_DEMO_KEEP:-0} != 1 ]]; then
      kubectl -n "$demo_ns" delete --ignore-not-found --wait=true -f examples/branch.yaml -f examples/warm-pool.yaml -f examples/sandbox.yaml >&2 || true
    fi
  }
  trap cleanup_cluster EXIT
  trap 'exit 130' INT TERM
  # shellcheck disable=SC2086 # SANDFORK_HELM_ARGS is a list of words
  show helm upgrade --install "$release" charts/sandfork --namespace "$namespace" --create-namespace \
    --wait --timeout 5m ${SANDFORK_HELM_ARGS:-}
  wait_and_show
  agent_restart_keeps_sandboxes
  exit 0
fi

# --- the embedded local cluster ---------------------------------------------------

./scripts/setup.sh
for device in /dev/kvm /dev/userfaultfd; do
  [[ -r $device && -w $device ]] || die "$device is missing or not usable: the agent runs KVM guests with userfaultfd (run as root on a KVM host)"
done
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sandfork/target}"
log "building the operator and the agent (release)"
cargo build --release --locked -p sandfork-operator -p sandfork-node-agent
operator_bin="$CARGO_TARGET_DIR/release/sandfork-operator"
agent_bin="$CARGO_TARGET_DIR/release/sandfork-agent"

root=$(mktemp -d /tmp/sandfork-demo.XXXXXX)
cleanup() {
  local rc=$?
  set +e
  if ((rc != 0)) && [[ -n ${KUBECONFIG:-} ]]; then
    kubectl get pods -A -o wide >&2
    kubectl -n "$namespace" logs -l app.kubernetes.io/component=operator --tail=30 >&2
    kubectl -n "$namespace" logs -l app.kubernetes.io/component=agent --tail=20 >&2
  fi
  if [[ ${SANDFORK_DEMO_KEEP:-0} == 1 ]]; then
    log "kept (SANDFORK_DEMO_KEEP=1): export KUBECONFIG=$root/cluster/kubeconfig PATH=$SANDFORK_K8S_BIN:$SANDFORK_HELM_BIN:\$PATH"
    log "stop it with: e2e/cluster/local-cluster.sh down $root/cluster && rm -rf $root"
    exit "$rc"
  fi
  log "stopping the local cluster (its nodes, Pods and VMs)"
  e2e/cluster/local-cluster.sh down "$root/cluster" >/dev/null 2>&1
  rm -rf "$root"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "starting a local cluster with two nodes in $root/cluster (a first run builds Kubernetes and containerd from source: about 20 minutes)"
started=$SECONDS
eval "$(e2e/cluster/local-cluster.sh up "$root/cluster")"
log "cluster up in $((SECONDS - started)) s"
show kubectl get nodes -o wide

tag=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/sandfork/Chart.yaml)
log "importing images of the operator and the agent into the nodes (no registry)"
e2e/cluster/local-cluster.sh image "$root/cluster" "docker.io/sandfork/operator:$tag" "$operator_bin"
e2e/cluster/local-cluster.sh image "$root/cluster" "docker.io/sandfork/agent:$tag" "$agent_bin"

log "installing the chart and waiting for its Pods"
show helm install "$release" charts/sandfork --namespace "$namespace" --create-namespace --wait --timeout 5m >/dev/null
# helm's wait lets a DaemonSet be short of maxUnavailable: wait for every agent.
show kubectl -n "$namespace" rollout status daemonset/"$release"-agent --timeout=180s
show kubectl -n "$namespace" get pods -o wide
show kubectl -n "$namespace" get leases

wait_and_show
agent_restart_keeps_sandboxes
# The agent's own view: a branch's counter goes on from the pass its source
# was in at the capture (a guest booted afresh would start at 1).
sleep 3
echo >&2
node=$(kubectl -n "$demo_ns" get sandbox counter -o jsonpath='{.status.node}')
agent_pod=$(kubectl -n "$namespace" get pods -l app.kubernetes.io/component=agent \
  --field-selector "spec.nodeName=$node" -o jsonpath='{.items[0].metadata.name}')
log "on $node, agent Pod $agent_pod runs (NAME: the Sandbox's UID; REPORTS: the pass each vCPU last finished; ORIGIN: the capture, i.e. the SandboxBranch's UID):"
show kubectl -n "$demo_ns" get sandboxes -o custom-columns=NAME:.metadata.name,UID:.metadata.uid,NODE:.status.node
show kubectl -n "$namespace" exec "$agent_pod" -- /sandfork-agent --state-dir /run/sandfork list
# Through the operator, so that it stops the VMs and frees the capture.
show kubectl -n "$demo_ns" delete --timeout=120s -f examples/branch.yaml -f examples/warm-pool.yaml -f examples/sandbox.yaml
