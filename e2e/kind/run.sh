#!/usr/bin/env bash
# The e2e tests on a kind cluster with KVM-capable workers: creates the
# cluster (e2e/kind/kind-config.yaml), builds the operator and agent images
# and loads them into the nodes, installs charts/sandfork with
# e2e/kind/values.yaml, and runs the e2e test binary against it
# (SANDFORK_E2E_KUBECONFIG: the agents are the DaemonSet's, the operator the
# Deployment's). Needs docker, kind, kubectl, helm, cargo, and /dev/kvm and
# /dev/userfaultfd on the host.
#
# Environment:
#   SANDFORK_KIND_CLUSTER  cluster name (default sandfork-e2e)
#   SANDFORK_KIND_KEEP=1   keep the cluster afterwards (default: delete it)
#   SANDFORK_KIND_REUSE=1  use the cluster if it exists already
#   SANDFORK_IMAGE_TAG     image tag (default e2e; e2e/kind/values.yaml uses e2e)
# Extra arguments go to the test binary (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/../.."

cluster="${SANDFORK_KIND_CLUSTER:-sandfork-e2e}"
tag="${SANDFORK_IMAGE_TAG:-e2e}"
namespace=sandfork-system
workdir="$(mktemp -d)"
kubeconfig="$workdir/kubeconfig"

log() { echo "kind-e2e: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for tool in docker kind kubectl helm cargo; do
  command -v "$tool" >/dev/null || die "$tool not found on PATH"
done
for device in /dev/kvm /dev/userfaultfd; do
  [[ -c $device ]] || die "$device is missing: the workers need it (see e2e/README.md)"
done

created=0
cleanup() {
  local rc=$?
  if ((rc != 0)) && [[ -f $kubeconfig ]]; then
    log "failed ($rc); state of the cluster:"
    kubectl --kubeconfig "$kubeconfig" -n "$namespace" get all,leases -o wide >&2 || true
    kubectl --kubeconfig "$kubeconfig" -n "$namespace" logs -l app.kubernetes.io/component=operator --tail=100 >&2 || true
    kubectl --kubeconfig "$kubeconfig" -n "$namespace" logs -l app.kubernetes.io/component=agent --tail=100 --prefix >&2 || true
  fi
  if ((created)) && [[ ${SANDFORK_KIND_KEEP:-0} != 1 ]]; then
    kind delete cluster --name "$cluster" >&2 || true
  fi
  rm -rf "$workdir"
  exit "$rc"
}
trap cleanup EXIT

log "building images sandfork/operator:$tag and sandfork/agent:$tag"
for target in operator agent; do
  DOCKER_BUILDKIT=1 docker build -f e2e/kind/Dockerfile --target "$target" -t "sandfork/$target:$tag" .
done

if [[ ${SANDFORK_KIND_REUSE:-0} == 1 ]] && kind get clusters 2>/dev/null | grep -qx "$cluster"; then
  log "reusing cluster $cluster"
else
  log "creating cluster $cluster"
  created=1
  kind create cluster --name "$cluster" --config e2e/kind/kind-config.yaml --wait 180s
fi
kind get kubeconfig --name "$cluster" >"$kubeconfig"
kind load docker-image --name "$cluster" "sandfork/operator:$tag" "sandfork/agent:$tag"

log "installing charts/sandfork"
helm --kubeconfig "$kubeconfig" upgrade --install sandfork charts/sandfork \
  --namespace "$namespace" --create-namespace \
  -f e2e/kind/values.yaml \
  --set "operator.image.tag=$tag" --set "agent.image.tag=$tag" \
  --wait --timeout 5m
kubectl --kubeconfig "$kubeconfig" -n "$namespace" rollout status daemonset/sandfork-agent --timeout=180s
kubectl --kubeconfig "$kubeconfig" -n "$namespace" rollout status deployment/sandfork-operator --timeout=180s

log "running the e2e tests against the kind cluster"
SANDFORK_E2E_KUBECONFIG="$kubeconfig" SANDFORK_E2E_NAMESPACE="$namespace" SANDFORK_E2E_RELEASE=sandfork \
SANDFORK_REQUIRE_DEVICES=1 \
  cargo test --locked -p sandfork-e2e --test e2e -- --test-threads 2 "$@"
