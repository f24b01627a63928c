#!/usr/bin/env bash
# The main job: Sandfork as users meet it. Installs the Helm chart, applies a
# running Sandbox (examples/sandbox.yaml) and a SandboxBranch of it
# (examples/branch.yaml), waits for both to be Ready and shows
# `kubectl get sandboxes,sandboxbranches`.
#
# Where it runs:
# - no cluster configured (no KUBECONFIG, no ~/.kube/config): a local
#   control plane (e2e/cluster/local-cluster.sh: etcd, kube-apiserver,
#   kube-controller-manager on 127.0.0.1) with the chart installed, and the
#   operator and one agent run here as processes, each with a token of the
#   ServiceAccount the chart made for it. Everything is stopped at the end.
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
  show kubectl -n "$demo_ns" apply -f examples/branch.yaml
  show kubectl -n "$demo_ns" wait --for=condition=Ready sandboxbranch/counter-fork --timeout=300s
  show kubectl -n "$demo_ns" get sandboxes,sandboxbranches -o wide
}

# --- a configured cluster -------------------------------------------------------

if [[ -n ${KUBECONFIG:-} || -f $HOME/.kube/config ]]; then
  for tool in kubectl helm; do command -v "$tool" >/dev/null || die "$tool not found on PATH"; done
  log "using the cluster of $(kubectl config current-context)"
  cleanup_cluster() {
    if [[ ${SANDFORK_DEMO_KEEP:-0} != 1 ]]; then
      kubectl -n "$demo_ns" delete --ignore-not-found --wait=true -f examples/branch.yaml -f examples/sandbox.yaml >&2 || true
    fi
  }
  trap cleanup_cluster EXIT
  trap 'exit 130' INT TERM
  # shellcheck disable=SC2086 # SANDFORK_HELM_ARGS is a list of words
  show helm upgrade --install "$release" charts/sandfork --namespace "$namespace" --create-namespace \
    --wait --timeout 5m ${SANDFORK_HELM_ARGS:-}
  wait_and_show
  exit 0
fi

# --- the embedded local control plane -------------------------------------------

./scripts/setup.sh
for device in /dev/kvm /dev/userfaultfd; do
  [[ -r $device && -w $device ]] || die "$device is missing or not usable: the agent runs KVM guests with userfaultfd (run as root on a KVM host)"
done
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sandfork/target}"
log "building the operator and the agent"
cargo build --release --locked -p sandfork-operator -p sandfork-node-agent
operator_bin="$CARGO_TARGET_DIR/release/sandfork-operator"
agent_bin="$CARGO_TARGET_DIR/release/sandfork-agent"

root=$(mktemp -d /dev/shm/sandfork-demo.XXXXXX)
node=demo-node
pids=()
cleanup() {
  local rc=$?
  set +e
  if ((rc != 0)); then
    for f in "$root"/*.log; do
      [[ -f $f ]] && { echo "--- $(basename "$f") (end)"; tail -n 20 "$f"; } >&2
    done
  fi
  if [[ -n ${KUBECONFIG:-} ]]; then
    # Through the operator, so that it stops the VMs and frees the capture.
    kubectl -n "$demo_ns" delete --ignore-not-found --timeout=60s -f examples/branch.yaml -f examples/sandbox.yaml >/dev/null 2>&1
  fi
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null; done
  # The agent leaves VMs running by design (they outlive an agent restart).
  if [[ -d $root/agent/sandboxes ]]; then
    for name in $(ls "$root/agent/sandboxes"); do
      "$agent_bin" --state-dir "$root/agent" delete "$name" >/dev/null 2>&1
    done
  fi
  e2e/cluster/local-cluster.sh down "$root/cluster" >/dev/null 2>&1
  rm -rf "$root"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "starting a local control plane in $root/cluster"
eval "$(e2e/cluster/local-cluster.sh up "$root/cluster")"
server=$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')

show helm install "$release" charts/sandfork --namespace "$namespace" --create-namespace >/dev/null

# Each process gets its own ServiceAccount's token and certificates from
# the Secrets the chart generated: the chart's RBAC and mTLS are what run.
secret_files() { # SECRET DIR
  mkdir -p "$2"
  local key
  for key in ca.crt tls.crt tls.key; do
    kubectl -n "$namespace" get secret "$1" -o "go-template={{index .data \"$key\" | base64decode}}" >"$2/$key"
  done
  chmod 600 "$2"/*
}
token_kubeconfig() { # SERVICEACCOUNT FILE
  local token
  token=$(kubectl -n "$namespace" create token "$1" --duration=2h)
  cat >"$2" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: local, cluster: {server: "$server", certificate-authority: "$root/cluster/pki/ca.crt"}}]
users: [{name: $1, user: {token: "$token"}}]
contexts: [{name: $1, context: {cluster: local, user: $1, namespace: $namespace}}]
current-context: $1
EOF
}

secret_files "$release-agent-tls" "$root/tls/agent"
secret_files "$release-operator-tls" "$root/tls/operator"
token_kubeconfig "$release-agent" "$root/agent.kubeconfig"
token_kubeconfig "$release-operator" "$root/operator.kubeconfig"

# Port 0: the agent publishes the port it got in its Lease.
log "starting the agent (node $node) and the operator"
KUBECONFIG="$root/agent.kubeconfig" NODE_NAME=$node POD_NAMESPACE=$namespace \
  SANDFORK_TLS_CERT="$root/tls/agent/tls.crt" SANDFORK_TLS_KEY="$root/tls/agent/tls.key" \
  SANDFORK_TLS_CLIENT_CA="$root/tls/agent/ca.crt" \
  "$agent_bin" --state-dir "$root/agent" serve --listen 127.0.0.1:0 >"$root/agent.log" 2>&1 &
pids+=($!)
KUBECONFIG="$root/operator.kubeconfig" POD_NAMESPACE=$namespace POD_NAME=demo-operator \
  "$operator_bin" --metrics-addr 127.0.0.1:0 \
  --agent-ca "$root/tls/operator/ca.crt" --client-cert "$root/tls/operator/tls.crt" \
  --client-key "$root/tls/operator/tls.key" >"$root/operator.log" 2>&1 &
pids+=($!)

for _ in $(seq 1 120); do
  kubectl -n "$namespace" get lease "sandfork-agent-$node" >/dev/null 2>&1 && break
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null || die "a process exited early"; done
  sleep 0.5
done
kubectl -n "$namespace" get lease "sandfork-agent-$node" >/dev/null || die "the agent did not register"
show kubectl -n "$namespace" get leases

wait_and_show
# The agent's own view: a branch's counter goes on from the pass its source
# was in at the capture (a guest booted afresh would start at 1).
sleep 3
echo >&2
log "on the node, the agent runs (NAME: the Sandbox's UID; REPORTS: the pass each vCPU last finished; ORIGIN: the capture, i.e. the SandboxBranch's UID):"
show kubectl -n "$demo_ns" get sandboxes -o custom-columns=NAME:.metadata.name,UID:.metadata.uid
"$agent_bin" --state-dir "$root/agent" list
