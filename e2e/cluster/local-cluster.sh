#!/usr/bin/env bash
# A real, local Kubernetes cluster for Sandfork's e2e tests and demo: etcd,
# kube-apiserver, kube-controller-manager and kube-scheduler on this host, and
# nodes (default node-a and node-b), each a kubelet, a kube-proxy and a
# containerd with runc and the CNI plugins in network and mount namespaces of
# their own (see nodes.sh). Every address is on loopback or on the bridge and
# namespaces the cluster creates; nothing routes off the machine. No registry:
# images are imported into the nodes (`image`).
#
# Usage:
#   e2e/cluster/local-cluster.sh up DIR      start (or reuse) a cluster whose state lives in DIR;
#                                            returns once /readyz is ok and the `default`
#                                            ServiceAccount exists; prints the env lines
#   e2e/cluster/local-cluster.sh down DIR    stop it (TERM, then KILL); safe to repeat, or after
#                                            a failed `up`; keeps DIR (logs, data) in place
#   e2e/cluster/local-cluster.sh env DIR     print `export KUBECONFIG=...` and PATH lines
#   e2e/cluster/local-cluster.sh status DIR  exit 0 when all components run, /readyz is ok
#                                            and every node is Ready
#   e2e/cluster/local-cluster.sh image DIR NAME PROGRAM
#                                            pack PROGRAM as image NAME (oci-image.sh) and
#                                            import it into every node's runtime
#
# Files in DIR: kubeconfig (admin, group system:masters), pki/, etcd/ (data),
# *.pid, *.log (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, and per
# node NODE-containerd, NODE-kubelet, NODE-kube-proxy), ports.env, nodes/NODE/.
#
# Environment:
#   SANDFORK_TOOLS_DIR, SANDFORK_*_VERSION  passed to e2e/tools/build-tools.sh, which `up`
#                                 runs to find the binaries (building them when missing)
#   SANDFORK_CLUSTER_NO_BUILD=1   fail instead of building missing binaries
#   SANDFORK_ETCD_PORT, SANDFORK_ETCD_PEER_PORT, SANDFORK_APISERVER_PORT,
#   SANDFORK_KCM_PORT             fixed ports (default: free ports picked at random, then
#                                 kept in DIR/ports.env for restarts of the same DIR)
#   SANDFORK_CLUSTER_TIMEOUT      seconds `up` waits for readiness (default 180)
#   SANDFORK_CLUSTER_STOP_TIMEOUT seconds `down` waits after TERM before KILL (default 15)
#   SANDFORK_CLUSTER_KEEP_ON_FAILURE=1  leave processes running when `up` fails
#   SANDFORK_APISERVER_EXTRA_ARGS, SANDFORK_KCM_EXTRA_ARGS  extra flags (word-split)
#   SANDFORK_CLUSTER_NODES        node names (default "node-a node-b"; "" for none)
#   SANDFORK_CLUSTER_KVM_NODES    nodes labelled sandfork.dev/kvm=true (default: all of them
#                                 when /dev/kvm and /dev/userfaultfd exist, else none)
#   SANDFORK_CLUSTER_SUBNET_PREFIX  first two octets of the cluster's addresses (default 10.213)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BUILD_TOOLS="$HERE/../tools/build-tools.sh"
CONTROL_PLANE=(etcd kube-apiserver kube-controller-manager kube-scheduler)

log() { echo "local-cluster: $*" >&2; }
die() { echo "local-cluster: ERROR: $*" >&2; exit 1; }

usage() { sed -n '2,45p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

[[ $# -ge 2 ]] || usage
CMD=$1
if [[ ! -d "$2" ]]; then
  case "$CMD" in
    up) mkdir -p "$2" ;;
    down) echo "local-cluster: $2 does not exist: nothing to stop" >&2; exit 0 ;;
    *) die "$2 does not exist" ;;
  esac
fi
DIR="$(cd "$2" && pwd)"
# shellcheck source=nodes.sh
. "$HERE/nodes.sh"
# Every process of the cluster, in start order.
COMPONENTS=("${CONTROL_PLANE[@]}")
for n in "${NODES[@]}"; do
  COMPONENTS+=("$n-ns" "$n-containerd" "$n-kubelet" "$n-kube-proxy")
done

# --- helpers ----------------------------------------------------------------

# pid_of NAME: the recorded pid, if that process is still ours (its command
# line mentions DIR; guards against pid reuse). Prints nothing otherwise.
pid_of() {
  local f="$DIR/$1.pid" pid
  [[ -f "$f" ]] || return 0
  pid="$(cat "$f" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 0
  [[ -r "/proc/$pid/cmdline" ]] || return 0
  # zombies (state Z) count as gone
  [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]] || return 0
  tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF -- "$DIR" || return 0
  echo "$pid"
}

# Ports that something listens on (TCP, v4 and v6), decimal, one per line.
listening_ports() {
  local f local_addr st
  for f in /proc/net/tcp /proc/net/tcp6; do
    [[ -r $f ]] || continue
    while read -r _ local_addr _ st _; do
      [[ $st == 0A ]] && echo $((16#${local_addr##*:}))
    done < <(tail -n +2 "$f")
  done
  return 0
}

# Local ports of every TCP socket (any state, v4 and v6), decimal.
used_ports() {
  local f local_addr
  for f in /proc/net/tcp /proc/net/tcp6; do
    [[ -r $f ]] || continue
    while read -r _ local_addr _; do echo $((16#${local_addr##*:})); done < <(tail -n +2 "$f")
  done
  return 0
}

# free_port EXCLUDED...: a random port that no socket uses, from 20000 up to
# the kernel's ephemeral range (a port picked inside it can be taken by an
# outgoing connection before the component binds it).
free_port() {
  local used p low
  low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  ((low > 21000)) || low=60000
  used=" $(used_ports | tr '\n' ' ') $* "
  for _ in $(seq 1 200); do
    p=$((20000 + (RANDOM * 32768 + RANDOM) % (low - 20000)))
    [[ "$used" == *" $p "* ]] || { echo "$p"; return; }
  done
  die "no free port found"
}

find_tools() {
  local envlines
  if [[ "${SANDFORK_CLUSTER_NO_BUILD:-0}" == 1 ]]; then
    envlines="$("$BUILD_TOOLS" --env)" || die "binaries missing and SANDFORK_CLUSTER_NO_BUILD=1"
  else
    if ! "$BUILD_TOOLS" --check 2>/dev/null; then
      log "binaries not cached yet: building them now (this takes a long time once)"
    fi
    envlines="$("$BUILD_TOOLS")" || die "e2e/tools/build-tools.sh failed"
  fi
  eval "$envlines"
  ETCD="$SANDFORK_ETCD_BIN/etcd"
  APISERVER="$SANDFORK_K8S_BIN/kube-apiserver"
  KCM="$SANDFORK_K8S_BIN/kube-controller-manager"
  KUBECTL="$SANDFORK_K8S_BIN/kubectl"
  SCHEDULER="$SANDFORK_K8S_BIN/kube-scheduler"
  KUBELET="$SANDFORK_K8S_BIN/kubelet"
  KUBE_PROXY="$SANDFORK_K8S_BIN/kube-proxy"
  CONTAINERD_BIN="$SANDFORK_CONTAINERD_BIN"
  PAUSE_PROGRAM="$SANDFORK_PAUSE_BIN/pause"
}

# The pause image, built here from the pause binary (no registry to pull it from).
PAUSE_IMAGE=sandfork.local/pause:local
PAUSE_ARCHIVE=""
pause_archive() {
  PAUSE_ARCHIVE="$DIR/images/pause.tar"
  mkdir -p "$DIR/images"
  if [[ ! -f $PAUSE_ARCHIVE || $PAUSE_PROGRAM -nt $PAUSE_ARCHIVE ]]; then
    "$HERE/oci-image.sh" "$PAUSE_ARCHIVE" "$PAUSE_IMAGE" "$PAUSE_PROGRAM"
  fi
}

kubectl_() { "$KUBECTL" --kubeconfig "$DIR/kubeconfig" --request-timeout=5s "$@"; }

print_env() {
  local envlines
  envlines="$("$BUILD_TOOLS" --env 2>/dev/null || true)"
  [[ -n "$envlines" ]] && echo "$envlines"
  echo "export KUBECONFIG='$DIR/kubeconfig'"
  if [[ -f "$DIR/ports.env" ]]; then
    # shellcheck disable=SC1091
    . "$DIR/ports.env"
    echo "export SANDFORK_APISERVER_URL='https://$BRIDGE_IP:$APISERVER_PORT'"
  fi
}

# --- certificates -------------------------------------------------------------

# sign_with_ca PKI NAME SUBJECT EXTENSIONS: NAME.key and NAME.crt in the current
# directory, signed by PKI/ca.
sign_with_ca() {
  openssl ecparam -name prime256v1 -genkey -noout -out "$2.key"
  openssl req -new -key "$2.key" -subj "$3" -out "$2.csr"
  printf '%s\n' "$4" >"$2.ext"
  openssl x509 -req -in "$2.csr" -CA "$1/ca.crt" -CAkey "$1/ca.key" -CAcreateserial -sha256 \
    -days 3650 -extfile "$2.ext" -out "$2.crt"
  rm -f "$2.csr" "$2.ext"
  chmod 600 "$2.key"
}

CLIENT_EXT="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"

gen_pki() {
  local pki="$DIR/pki"
  if [[ -f "$pki/.complete" ]]; then return; fi
  command -v openssl >/dev/null || die "openssl not found (Debian: apt-get install openssl)"
  rm -rf "$pki" && mkdir -p "$pki" && chmod 700 "$pki"
  log "generating certificates in $pki"
  (
    cd "$pki"
    set -e
    exec 3>&2 2>openssl.log
    # CA
    openssl ecparam -name prime256v1 -genkey -noout -out ca.key
    openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=sandfork-local-ca" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" -out ca.crt
    sign_with_ca . apiserver "/CN=kube-apiserver" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:$BRIDGE_IP,IP:$SERVICE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    sign_with_ca . admin "/O=system:masters/CN=sandfork-admin" "$CLIENT_EXT"
    # The API server towards the kubelets (logs, exec, port-forward).
    sign_with_ca . apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "$CLIENT_EXT"
    # The identities the bootstrap RBAC policy knows.
    sign_with_ca . kube-scheduler "/CN=system:kube-scheduler" "$CLIENT_EXT"
    sign_with_ca . kube-proxy "/CN=system:kube-proxy" "$CLIENT_EXT"
    # Service-account token signing key pair.
    openssl genrsa -out sa.key 2048
    openssl rsa -in sa.key -pubout -out sa.pub
    chmod 600 ./*.key
    exec 2>&3
  ) || { cat "$pki/openssl.log" >&2 2>/dev/null; die "certificate generation failed"; }
  touch "$pki/.complete"
}

# write_kubeconfig_file FILE CERT KEY: a kubeconfig for that client certificate.
write_kubeconfig_file() {
  b64() { base64 -w0 <"$1"; }
  (
    umask 077
    cat >"$1.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: sandfork-local
  cluster:
    server: https://$BRIDGE_IP:$APISERVER_PORT
    certificate-authority-data: $(b64 "$DIR/pki/ca.crt")
users:
- name: user
  user:
    client-certificate-data: $(b64 "$2")
    client-key-data: $(b64 "$3")
contexts:
- name: sandfork-local
  context:
    cluster: sandfork-local
    user: user
current-context: sandfork-local
EOF
    mv -f "$1.tmp" "$1"
  )
}

write_kubeconfigs() {
  write_kubeconfig_file "$DIR/kubeconfig" "$DIR/pki/admin.crt" "$DIR/pki/admin.key"
  write_kubeconfig_file "$DIR/kube-scheduler.kubeconfig" "$DIR/pki/kube-scheduler.crt" "$DIR/pki/kube-scheduler.key"
  write_kubeconfig_file "$DIR/kube-proxy.kubeconfig" "$DIR/pki/kube-proxy.crt" "$DIR/pki/kube-proxy.key"
}

# --- process control ----------------------------------------------------------

# start NAME BIN ARGS...: run in the background, stdout/stderr to DIR/NAME.log.
start() {
  local name=$1; shift
  {
    echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) starting: $*"
  } >>"$DIR/$name.log"
  "$@" </dev/null >>"$DIR/$name.log" 2>&1 &
  echo $! >"$DIR/$name.pid"
}

fail_with_logs() {
  local msg=$1 c
  echo "local-cluster: ERROR: $msg" >&2
  for c in "${COMPONENTS[@]}"; do
    [[ -f "$DIR/$c.log" ]] || continue
    echo "----- last lines of $DIR/$c.log$( [[ -n "$(pid_of "$c")" ]] || echo ' (process not running)') -----" >&2
    tail -n 25 "$DIR/$c.log" >&2
  done
  if [[ "${SANDFORK_CLUSTER_KEEP_ON_FAILURE:-0}" != 1 ]]; then
    do_down >&2 || true
    if [[ "${FORGET_PORTS_ON_FAILURE:-0}" == 1 ]]; then rm -f "$DIR/ports.env"; fi
  fi
  exit 1
}

# check_alive NAME...: fail loudly if any of them died. A process in the
# middle of execve shows an empty cmdline for a moment (longer on a loaded
# machine), so one that seems gone is looked at again before it counts as dead.
check_alive() {
  local c
  for c in "$@"; do
    [[ -n "$(pid_of "$c")" ]] || { sleep 0.3; [[ -n "$(pid_of "$c")" ]]; } ||
      fail_with_logs "$c exited during startup"
  done
}

# wait_for DESC TIMEOUT COMPONENTS CMD...: poll CMD every 0.5s.
wait_for() {
  local desc=$1 deadline=$((SECONDS + $2)) comps=$3; shift 3
  until "$@" >/dev/null 2>&1; do
    # shellcheck disable=SC2086
    check_alive $comps
    ((SECONDS < deadline)) || fail_with_logs "timed out after $(($2))s waiting for $desc"
    sleep 0.5
  done
}

# stop_component NAME: TERM, then KILL after the stop timeout.
STOPPED=()
stop_component() {
  local c=$1 pid deadline
  local timeout="${SANDFORK_CLUSTER_STOP_TIMEOUT:-15}"
  pid="$(pid_of "$c")"
  if [[ -n "$pid" ]]; then
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + timeout))
    while [[ -n "$(pid_of "$c")" ]] && ((SECONDS < deadline)); do sleep 0.2; done
    if [[ -n "$(pid_of "$c")" ]]; then
      log "$c (pid $pid) ignored TERM for ${timeout}s: sending KILL"
      kill -KILL "$pid" 2>/dev/null || true
      while [[ -n "$(pid_of "$c")" ]]; do sleep 0.1; done
    fi
    STOPPED+=("$pid")
  fi
  rm -f "$DIR/$c.pid"
}

# Everything `up` made, also after a failed `up` or a killed test: the nodes
# (their processes, containers, mounts, network namespaces, cgroups), the
# control plane, the bridge.
do_down() {
  local c n pid
  for n in "${NODES[@]}"; do node_down "$n"; done
  for c in kube-scheduler kube-controller-manager kube-apiserver etcd; do stop_component "$c"; done
  network_down
  host_paths_down
  # Reap, if these were our own children (up failing in this same shell).
  for pid in "${STOPPED[@]}"; do wait "$pid" 2>/dev/null || true; done
  log "stopped ${#STOPPED[@]} process(es) of $DIR"
}

all_running() {
  local c
  for c in "${COMPONENTS[@]}"; do [[ -n "$(pid_of "$c")" ]] || return 1; done
}

# --- up -------------------------------------------------------------------------

do_up() {
  find_tools
  command -v base64 >/dev/null || die "base64 (coreutils) not found"

  if all_running && [[ -f "$DIR/kubeconfig" ]] && kubectl_ get --raw /readyz >/dev/null 2>&1; then
    log "already up: $DIR"
    print_env
    return 0
  fi
  # Half-started or stale: clean up first.
  do_down 2>/dev/null || true

  local t0=$SECONDS t0ns
  t0ns=$(date +%s%N)
  # Ports: env > DIR/ports.env (restart of the same DIR) > random free ports.
  local ETCD_PORT='' ETCD_PEER_PORT='' APISERVER_PORT='' KCM_PORT='' SCHEDULER_PORT=''
  # Ports picked at random now are forgotten again if this `up` fails, so a
  # retry on the same DIR picks new ones.
  FORGET_PORTS_ON_FAILURE=1
  if [[ -f "$DIR/ports.env" ]]; then
    FORGET_PORTS_ON_FAILURE=0
    # shellcheck disable=SC1091
    . "$DIR/ports.env"
  fi
  ETCD_PORT="${SANDFORK_ETCD_PORT:-${ETCD_PORT:-$(free_port)}}"
  ETCD_PEER_PORT="${SANDFORK_ETCD_PEER_PORT:-${ETCD_PEER_PORT:-$(free_port "$ETCD_PORT")}}"
  APISERVER_PORT="${SANDFORK_APISERVER_PORT:-${APISERVER_PORT:-$(free_port "$ETCD_PORT" "$ETCD_PEER_PORT")}}"
  KCM_PORT="${SANDFORK_KCM_PORT:-${KCM_PORT:-$(free_port "$ETCD_PORT" "$ETCD_PEER_PORT" "$APISERVER_PORT")}}"
  SCHEDULER_PORT="${SCHEDULER_PORT:-$(free_port "$ETCD_PORT" "$ETCD_PEER_PORT" "$APISERVER_PORT" "$KCM_PORT")}"
  cat >"$DIR/ports.env" <<EOF
ETCD_PORT=$ETCD_PORT
ETCD_PEER_PORT=$ETCD_PEER_PORT
APISERVER_PORT=$APISERVER_PORT
KCM_PORT=$KCM_PORT
SCHEDULER_PORT=$SCHEDULER_PORT
EOF
  local p
  for p in "$ETCD_PORT" "$ETCD_PEER_PORT" "$APISERVER_PORT" "$KCM_PORT" "$SCHEDULER_PORT"; do
    if listening_ports | grep -qx "$p"; then
      if [[ $FORGET_PORTS_ON_FAILURE == 1 ]]; then rm -f "$DIR/ports.env"; fi
      die "port $p is already in use (set SANDFORK_*_PORT or remove $DIR/ports.env)"
    fi
  done

  save_cluster_env
  network_up
  gen_pki
  write_kubeconfigs
  pause_archive
  mkdir -p "$DIR/etcd" "$DIR/apiserver-certs" "$DIR/kcm-certs"
  chmod 700 "$DIR/etcd"

  log "starting etcd on 127.0.0.1:$ETCD_PORT"
  start etcd "$ETCD" \
    --name=sandfork \
    --data-dir="$DIR/etcd" \
    --listen-client-urls="http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster="sandfork=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync \
    --log-level=warn
  # shellcheck disable=SC2317
  etcd_ready() { (: <>"/dev/tcp/127.0.0.1/$ETCD_PORT") 2>/dev/null; }
  wait_for "etcd to listen" 30 etcd etcd_ready

  log "starting kube-apiserver on https://$BRIDGE_IP:$APISERVER_PORT"
  # shellcheck disable=SC2086
  start kube-apiserver "$APISERVER" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --cert-dir="$DIR/apiserver-certs" \
    --tls-cert-file="$DIR/pki/apiserver.crt" \
    --tls-private-key-file="$DIR/pki/apiserver.key" \
    --client-ca-file="$DIR/pki/ca.crt" \
    --secure-port="$APISERVER_PORT" \
    --bind-address="$BRIDGE_IP" \
    --advertise-address="$BRIDGE_IP" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --authorization-mode=Node,RBAC \
    --enable-admission-plugins=NodeRestriction \
    --kubelet-client-certificate="$DIR/pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$DIR/pki/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$DIR/pki/ca.crt" \
    --kubelet-preferred-address-types=InternalIP \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$DIR/pki/sa.pub" \
    --service-account-signing-key-file="$DIR/pki/sa.key" \
    --allow-privileged=true \
    --profiling=false \
    ${SANDFORK_APISERVER_EXTRA_ARGS:-}

  local timeout="${SANDFORK_CLUSTER_TIMEOUT:-180}"
  # The controller manager exits at once if the apiserver does not answer yet.
  wait_for "kube-apiserver /readyz" "$timeout" "etcd kube-apiserver" kubectl_ get --raw /readyz

  log "starting kube-controller-manager"
  # shellcheck disable=SC2086
  start kube-controller-manager "$KCM" \
    --kubeconfig="$DIR/kubeconfig" \
    --authentication-kubeconfig="$DIR/kubeconfig" \
    --authorization-kubeconfig="$DIR/kubeconfig" \
    --bind-address=127.0.0.1 \
    --secure-port="$KCM_PORT" \
    --cert-dir="$DIR/kcm-certs" \
    --service-account-private-key-file="$DIR/pki/sa.key" \
    --root-ca-file="$DIR/pki/ca.crt" \
    --use-service-account-credentials=true \
    --controllers='*' \
    --leader-elect=false \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --profiling=false \
    ${SANDFORK_KCM_EXTRA_ARGS:-}

  log "starting kube-scheduler"
  start kube-scheduler "$SCHEDULER" \
    --kubeconfig="$DIR/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig="$DIR/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig="$DIR/kube-scheduler.kubeconfig" \
    --bind-address=127.0.0.1 \
    --secure-port="$SCHEDULER_PORT" \
    --leader-elect=false \
    --profiling=false

  local left=$((timeout - (SECONDS - t0))); ((left > 5)) || left=5
  wait_for "the default namespace" "$left" "${CONTROL_PLANE[*]}" kubectl_ get namespace default
  left=$((timeout - (SECONDS - t0))); ((left > 5)) || left=5
  wait_for "the default ServiceAccount" "$left" "${CONTROL_PLANE[*]}" \
    kubectl_ -n default get serviceaccount default
  local cp_ms=$((($(date +%s%N) - t0ns) / 1000000)) n
  for n in "${NODES[@]}"; do
    log "starting node $n ($(node_ip "$n"))"
    node_up "$n"
  done
  if ((${#NODES[@]})); then
    left=$((timeout - (SECONDS - t0))); ((left > 5)) || left=5
    wait_for "the nodes to be Ready" "$left" "${COMPONENTS[*]}" nodes_ready
    log "nodes ${NODES[*]} Ready $(( ($(date +%s%N) - t0ns) / 1000000 - cp_ms )) ms after the control plane"
  fi
  local ms=$((($(date +%s%N) - t0ns) / 1000000))
  log "up in $((ms / 1000)).$(printf %03d $((ms % 1000)))s: KUBECONFIG=$DIR/kubeconfig (https://$BRIDGE_IP:$APISERVER_PORT)"
  print_env
}

do_status() {
  local c rc=0 pid
  for c in "${COMPONENTS[@]}"; do
    pid="$(pid_of "$c")"
    if [[ -n "$pid" ]]; then echo "$c: running (pid $pid)"; else echo "$c: not running"; rc=1; fi
  done
  if [[ $rc == 0 ]]; then
    envlines="$("$BUILD_TOOLS" --env 2>/dev/null)" || { echo "binaries missing"; return 1; }
    eval "$envlines"
    KUBECTL="$SANDFORK_K8S_BIN/kubectl"
    if kubectl_ get --raw /readyz >/dev/null 2>&1; then echo "readyz: ok"; else echo "readyz: not ok"; rc=1; fi
    if ((${#NODES[@]})); then
      if nodes_ready; then echo "nodes: ${NODES[*]} Ready"; else echo "nodes: not all Ready"; rc=1; fi
    fi
  fi
  return $rc
}

# do_image NAME PROGRAM: PROGRAM as image NAME in every node's runtime.
do_image() {
  [[ $# -eq 2 ]] || usage
  find_tools
  mkdir -p "$DIR/images"
  local archive n
  archive="$DIR/images/$(printf '%s' "$1" | tr '/:' '__').tar"
  "$HERE/oci-image.sh" "$archive" "$1" "$2"
  for n in "${NODES[@]}"; do import_image_into "$n" "$archive"; done
  log "image $1 imported into ${NODES[*]}"
}

case "$CMD" in
  up) do_up ;;
  down) do_down ;;
  env) print_env ;;
  status) do_status ;;
  image) shift 2; do_image "$@" ;;
  *) usage ;;
esac
