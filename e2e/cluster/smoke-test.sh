#!/usr/bin/env bash
# Smoke test of the local cluster: up, a few real API checks (versions,
# namespaces, RBAC identity, garbage collection of an owned object, namespace
# deletion, a service-account token), helm, the nodes (Ready, each kubelet
# with its own system:node identity, a Pod scheduled and run on each, kubectl
# logs and exec, a ClusterIP Service reached from a Pod), then down and a
# check that nothing is left on this host: no process, mount, network
# namespace, interface, route, iptables rule, sysctl change or cgroup. The
# same check follows a killed cluster (every process SIGKILLed, as when a
# test run dies) and a failed `up`. Prints "N passed, N failed" at the end;
# exit 1 on failure.
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

# What a cluster could leave on this host, to compare before and after.
host_state() {
  local f
  echo "== processes naming $DIR"
  for f in /proc/[0-9]*; do
    [[ ${f#/proc/} == "$$" || ${f#/proc/} == "$BASHPID" ]] && continue
    grep -q '^State:.*Z' "$f/status" 2>/dev/null && continue
    tr '\0' ' ' <"$f/cmdline" 2>/dev/null | grep -qF -- "$DIR" && tr '\0' ' ' <"$f/cmdline" && echo
  done
  echo "== mounts naming $DIR"; grep -F -- "$DIR" /proc/self/mountinfo
  echo "== network namespaces"; ip netns list
  echo "== interfaces"; ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//'
  echo "== routes"; ip route show
  echo "== iptables"; iptables -S; iptables -t nat -S
  echo "== sysctls"; sysctl -n net.ipv4.ip_forward net.ipv4.conf.all.route_localnet
  echo "== cgroups"; ls -d /sys/fs/cgroup/*/sandfork-* 2>/dev/null
  echo "== paths"; ls -d /var/lib/kubelet /var/log/pods /var/log/containers /var/lib/cni /run/containerd /run/nri 2>/dev/null
  return 0
}
before="$(host_state)"
same_as_before() { diff <(echo "$before") <(host_state); }

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

# --- the nodes -------------------------------------------------------------------
pause=sandfork.local/pause:local
check "both nodes are Ready" bash -c 'kubectl get nodes --no-headers | awk "\$2 == \"Ready\"" | wc -l | grep -qx 2'
check "each kubelet is its own system:node identity (Node authorizer)" bash -c '
  for n in node-a node-b; do
    kubectl auth can-i get nodes/$n --as=system:node:$n --as-group=system:nodes | grep -qx yes || exit 1
  done
  kubectl auth can-i get secrets/other -n default --as=system:node:node-a --as-group=system:nodes | grep -q "^no"'
check "NodeRestriction: a kubelet cannot label another node" bash -c '
  ! kubectl label node node-b smoke=1 --as=system:node:node-a --as-group=system:nodes 2>/dev/null'
ns=smoke-nodes-$$
k create namespace "$ns" >/dev/null
for n in node-a node-b; do
  cat <<EOF | k -n "$ns" apply -f - >/dev/null
apiVersion: v1
kind: Pod
metadata: {name: on-$n, labels: {app: smoke}}
spec:
  nodeSelector: {kubernetes.io/hostname: $n}
  containers: [{name: pause, image: $pause, imagePullPolicy: Never}]
EOF
done
check "a Pod runs on each node (scheduler, kubelet, containerd, runc, CNI)" \
  k -n "$ns" wait --for=condition=Ready pod/on-node-a pod/on-node-b --timeout=120s
check "Pods get addresses from their node's range" bash -c "
  kubectl -n $ns get pod on-node-a -o jsonpath={.status.podIP} | grep -q '^10\.213\.1\.' &&
  kubectl -n $ns get pod on-node-b -o jsonpath={.status.podIP} | grep -q '^10\.213\.2\.'"
check "kubectl exec (API server to kubelet, client certificates)" bash -c \
  "kubectl -n $ns exec on-node-a -- /pause -v | grep -q pause"
check "kubectl logs" k -n "$ns" logs on-node-b
check "the kubernetes Service reaches the API server from a node (kube-proxy)" bash -c "
  holder=\$(sed -n 's/^NODE_HOLDER_PID=//p' $DIR/nodes/node-a/node.env)
  timeout 5 nsenter --net=/run/netns/\$(sed -n 's/^NODE_NETNS=//p' $DIR/nodes/node-a/node.env) \
    bash -c ': </dev/tcp/10.213.128.1/443'"
check "delete the Pods" k delete namespace "$ns" --timeout=90s

pids="$(cat "$DIR"/*.pid 2>/dev/null | tr '\n' ' ')"
check "local-cluster.sh down" "$CLUSTER" down "$DIR"
check "nothing left on the host after down (were: $pids)" same_as_before
check "down is idempotent" "$CLUSTER" down "$DIR"

# --- a killed cluster ---------------------------------------------------------------
if "$CLUSTER" up "$DIR" >/dev/null 2>&1; then
  cat <<EOF | k -n default apply -f - >/dev/null
apiVersion: v1
kind: Pod
metadata: {name: killed}
spec:
  containers: [{name: pause, image: $pause, imagePullPolicy: Never}]
EOF
  k -n default wait --for=condition=Ready pod/killed --timeout=120s >/dev/null 2>&1
  # Every process of the cluster, its containers included, killed at once.
  for f in /proc/[0-9]*; do
    tr '\0' ' ' <"$f/cmdline" 2>/dev/null | grep -qF -- "$DIR" && kill -KILL "${f#/proc/}" 2>/dev/null
  done
  sleep 1
  check "down after every process was killed" "$CLUSTER" down "$DIR"
  check "nothing left on the host after a killed cluster" same_as_before
else
  bad "local-cluster.sh up again"
fi

# --- a failed up ----------------------------------------------------------------------
rm -rf "$DIR/ports.env"
if SANDFORK_APISERVER_EXTRA_ARGS=--no-such-flag SANDFORK_CLUSTER_TIMEOUT=20 "$CLUSTER" up "$DIR" >/dev/null 2>&1; then
  bad "up with a broken API server flag fails"
else
  ok "up with a broken API server flag fails"
fi
check "nothing left on the host after a failed up" same_as_before

echo "$pass passed, $fail failed"
[[ $fail == 0 ]]
