#!/usr/bin/env bash
# Smoke test of the local control plane: up, a few real API checks (versions,
# namespaces, RBAC identity, garbage collection of an owned object, namespace
# deletion, a service-account token), helm, then down and a check that no
# process is left. Prints "N passed, N failed" at the end; exit 1 on failure.
#
#   e2e/cluster/smoke-test.sh [DIR]     (default: a new temp dir, removed afterwards)
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CLUSTER="$HERE/local-cluster.sh"
if [[ -n "${1:-}" ]]; then DIR=$1; KEEP=1; else DIR="$(mktemp -d /tmp/sandfork-cluster.XXXXXX)"; KEEP=0; fi

pass=0 fail=0
ok() { echo "ok   - $*"; pass=$((pass + 1)); }
bad() { echo "FAIL - $*"; fail=$((fail + 1)); }
check() { local d=$1; shift; if "$@" >/tmp/smoke.$$ 2>&1; then ok "$d"; else bad "$d"; sed 's/^/       /' /tmp/smoke.$$; fi; }

finish() {
  "$CLUSTER" down "$DIR" >/dev/null 2>&1 || true
  rm -f /tmp/smoke.$$
  [[ $KEEP == 1 ]] || rm -rf "$DIR"
}
trap finish EXIT

t0=$(date +%s%N)
if ! envlines="$("$CLUSTER" up "$DIR")"; then
  bad "local-cluster.sh up"
  echo "0 passed, 1 failed"
  exit 1
fi
ms=$((($(date +%s%N) - t0) / 1000000))
ok "local-cluster.sh up ($((ms / 1000)).$(printf %03d $((ms % 1000)))s)"
eval "$envlines"

k() { kubectl --request-timeout=10s "$@"; }

check "kubectl get ns lists default and kube-system" bash -c 'kubectl get ns -o name | grep -qx namespace/default && kubectl get ns -o name | grep -qx namespace/kube-system'
check "server version is v1.37.2" bash -c 'kubectl version -o json | grep -q "\"gitVersion\": \"v1.37.2\""'
check "/version reports major 1 minor 37" bash -c 'kubectl get --raw /version | tr -d " \n" | grep -q "\"major\":\"1\",\"minor\":\"37\""'
check "admin is in system:masters" bash -c 'kubectl auth whoami -o jsonpath="{.status.userInfo.groups}" | grep -q system:masters'

ns=smoke-$$
check "create namespace" k create namespace "$ns"
check "default ServiceAccount appears in the new namespace" bash -c "for i in \$(seq 1 60); do kubectl -n $ns get sa default >/dev/null 2>&1 && exit 0; sleep 0.5; done; exit 1"
check "create owner ConfigMap" k -n "$ns" create configmap owner --from-literal=a=1
uid="$(k -n "$ns" get configmap owner -o jsonpath='{.metadata.uid}')"
check "create dependent ConfigMap with ownerReference" bash -c "cat <<EOF | kubectl -n $ns apply -f -
apiVersion: v1
kind: ConfigMap
metadata:
  name: dependent
  ownerReferences:
  - apiVersion: v1
    kind: ConfigMap
    name: owner
    uid: $uid
data:
  b: \"2\"
EOF"
check "delete the owner" k -n "$ns" delete configmap owner --wait=true
check "garbage collector removes the dependent" bash -c "for i in \$(seq 1 120); do kubectl -n $ns get configmap dependent >/dev/null 2>&1 || exit 0; sleep 0.5; done; kubectl -n $ns get configmap dependent -o yaml; exit 1"
check "service-account token request" k -n "$ns" create token default --duration=10m
check "delete namespace completes (namespace controller)" k delete namespace "$ns" --timeout=90s
check "helm version is v3.22.0" bash -c 'helm version --short | grep -q "^v3.22.0"'
check "helm can list releases against the cluster" helm list -A
chart="$DIR/smoke-chart"
mkdir -p "$chart/templates"
cat >"$chart/Chart.yaml" <<EOF
apiVersion: v2
name: smoke
version: 0.1.0
kubeVersion: ">=1.30.0-0"
EOF
cat >"$chart/templates/cm.yaml" <<'EOF'
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-cm
data:
  kube: {{ .Capabilities.KubeVersion.Version | quote }}
EOF
check "helm install (kubeVersion >=1.30 check passes)" helm install smoke "$chart" -n default --wait --timeout 60s
# shellcheck disable=SC2016
check "helm-installed ConfigMap records kube v1.37.2" bash -c '[ "$(kubectl -n default get cm smoke-cm -o jsonpath={.data.kube})" = v1.37.2 ]'
check "helm uninstall" helm uninstall smoke -n default --wait

pids="$(cat "$DIR"/*.pid 2>/dev/null | tr '\n' ' ')"
check "local-cluster.sh down" "$CLUSTER" down "$DIR"
# Any etcd / kube-* process whose command line names DIR?
leftovers() {
  local f exe
  for f in /proc/[0-9]*; do
    exe="$(readlink "$f/exe" 2>/dev/null)" || continue
    case "${exe##*/}" in etcd | kube-apiserver | kube-controller-manager) ;; *) continue ;; esac
    if tr '\0' ' ' <"$f/cmdline" 2>/dev/null | grep -qF -- "$DIR"; then echo "left: ${f#/proc/} $exe"; fi
  done
  for f in $pids; do
    if [[ -d /proc/$f ]] && ! grep -q '^State:.*Z' "/proc/$f/status" 2>/dev/null; then echo "left: recorded pid $f"; fi
  done
}
check "no process left (were: $pids)" bash -c "[ -z \"\$1\" ]" _ "$(leftovers)"
leftovers
check "down is idempotent" "$CLUSTER" down "$DIR"

echo "$pass passed, $fail failed"
[[ $fail == 0 ]]
