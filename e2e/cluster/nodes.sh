# Nodes of the local cluster: each a kubelet, a kube-proxy and a containerd
# (with runc and the CNI plugins) in a network namespace and a mount
# namespace of its own. Sourced by local-cluster.sh, which defines DIR, log,
# die, start, pid_of and the tool paths.
#
# Network (PREFIX defaults to 10.213; nothing here routes off the machine):
#   bridge sfk<ID> on this host        PREFIX.0.1/24, the API server's address
#   node i (1-based), in netns         PREFIX.0.(10+i) on its eth0 (a veth on the bridge)
#   pods of node i                     PREFIX.i.0/24 on that node's cni0 bridge
#   Services                           PREFIX.128.0/24 (kube-proxy, iptables, in each node)
# A node has routes to the bridge's subnet, the Service range and the other
# nodes' pod ranges, and no default route: pod traffic to any other address
# is dropped inside the node. This host routes each pod range to its node
# (routes that go with the bridge) and does not forward (ip_forward stays 0).
#
# Per node, under DIR/nodes/NAME: containerd/ (root, state, socket, config),
# kubelet/ (root dir, config, kubeconfig, pki), cni/ (config, IPAM state),
# pods/ and containers/ (container logs), kube-proxy.yaml, node.env (its
# netns, address, the pid that holds its mount namespace). Its cgroups live
# under /sandfork-<ID>-NAME in every cgroup v1 hierarchy. In its mount
# namespace, /dev/shm is a tmpfs of its own, as on a real node, and the
# paths that kubelet, containerd's shims and the CNI plugins use whatever
# they are told (NODE_PATHS) are the node's own directories; /run stays this
# host's (on disk here).

# What `up` chose is kept in DIR/cluster.env, so later commands on DIR find
# the same nodes and addresses whatever their environment says.
CLUSTER_NODES=${SANDFORK_CLUSTER_NODES-node-a node-b}
CLUSTER_PREFIX=${SANDFORK_CLUSTER_SUBNET_PREFIX:-10.213}
# shellcheck disable=SC1091
[[ -f $DIR/cluster.env ]] && . "$DIR/cluster.env"
PREFIX=$CLUSTER_PREFIX
[[ $PREFIX =~ ^[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "SANDFORK_CLUSTER_SUBNET_PREFIX must look like 10.213"
BRIDGE_IP="$PREFIX.0.1"
SERVICE_CIDR="$PREFIX.128.0/24"
SERVICE_IP="$PREFIX.128.1"
CLUSTER_ID="$(printf '%s' "$DIR" | sha256sum | cut -c1-6)"
BRIDGE="sfk$CLUSTER_ID"
CGROUP_HIERARCHIES=(blkio cpu cpuacct cpuset devices freezer hugetlb memory net_cls perf_event pids systemd)
# Host path -> the node's directory (under DIR/nodes/NAME) mounted there.
NODE_PATHS=(
  "/var/lib/kubelet=kubelet/root"         # its device-plugins directory is fixed
  "/var/log/pods=pods"
  "/var/log/containers=containers"
  "/var/lib/cni=cni/cache"                 # the CNI library's result cache
  "/run/containerd=containerd/run"         # the shims' sockets
)

read -r -a NODES <<<"$CLUSTER_NODES"
((${#NODES[@]} <= 100)) || die "at most 100 nodes"

# Nodes that get the label the chart's agent selects on: all of them when this
# machine has the devices sandboxes need, else none (a cluster without KVM
# nodes runs no agent).
kvm_nodes() {
  if [[ -n "${SANDFORK_CLUSTER_KVM_NODES+set}" ]]; then
    echo "$SANDFORK_CLUSTER_KVM_NODES"
  elif [[ -c /dev/kvm && -c /dev/userfaultfd ]]; then
    echo "${NODES[*]}"
  fi
}

node_index() { # NAME -> 1-based index
  local i
  for i in "${!NODES[@]}"; do [[ ${NODES[$i]} == "$1" ]] && { echo $((i + 1)); return; }; done
  die "unknown node $1"
}
node_ip() { echo "$PREFIX.0.$((10 + $(node_index "$1")))"; }
node_netns() { echo "sfk$CLUSTER_ID-$1"; }
node_dir() { echo "$DIR/nodes/$1"; }
node_cgroup() { echo "sandfork-$CLUSTER_ID-$1"; }

# --- network --------------------------------------------------------------------

network_up() {
  command -v ip >/dev/null || die "ip not found (Debian: iproute2)"
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    if ip -o -4 addr show | grep -qF " $BRIDGE_IP/"; then
      die "$BRIDGE_IP is taken on this host (another local cluster?); set SANDFORK_CLUSTER_SUBNET_PREFIX"
    fi
    ip link add "$BRIDGE" type bridge
    ip addr add "$BRIDGE_IP/24" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
}

network_down() {
  ip link del "$BRIDGE" 2>/dev/null || true
}

# node_network_up NAME: its netns, veth pair, addresses and routes.
node_network_up() {
  local name=$1 i ns ip host_if j
  i=$(node_index "$name"); ns=$(node_netns "$name"); ip=$(node_ip "$name")
  host_if="sfk${CLUSTER_ID}v$i"
  ip netns del "$ns" 2>/dev/null || true
  ip netns add "$ns"
  ip link del "$host_if" 2>/dev/null || true
  ip link add "$host_if" type veth peer name eth0 netns "$ns"
  ip link set "$host_if" master "$BRIDGE" up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "$ip/24" dev eth0
  ip -n "$ns" link set eth0 up
  # Service IPs are rewritten by kube-proxy; the route only lets host-network
  # clients connect (an address no one answers ARP for goes nowhere).
  ip -n "$ns" route add "$SERVICE_CIDR" dev eth0
  for j in "${!NODES[@]}"; do
    ((j + 1 == i)) && continue
    ip -n "$ns" route add "$PREFIX.$((j + 1)).0/24" via "$PREFIX.0.$((11 + j))"
  done
  ip route replace "$PREFIX.$i.0/24" via "$ip" dev "$BRIDGE"
  # Forwarding between the node's pods and its eth0, inside the node only.
  ip netns exec "$ns" sysctl -q -w net.ipv4.ip_forward=1
}

# --- cgroups --------------------------------------------------------------------

node_cgroups_up() {
  local cg h base
  cg=$(node_cgroup "$1")
  for h in "${CGROUP_HIERARCHIES[@]}"; do
    base=/sys/fs/cgroup/$h
    [[ -d $base ]] || continue
    mkdir -p "$base/$cg"
    if [[ $h == cpuset ]]; then
      cat "$base/cpuset.cpus" >"$base/$cg/cpuset.cpus"
      cat "$base/cpuset.mems" >"$base/$cg/cpuset.mems"
    fi
  done
}

# rmdir_tree DIR: remove a cgroup directory and the ones below it, deepest first.
rmdir_tree() {
  [[ -d $1 ]] || return 0
  find "$1" -depth -type d -exec rmdir {} + 2>/dev/null || true
}

node_cgroups_down() {
  local cg h deadline=$((SECONDS + 20)) left
  cg=$(node_cgroup "$1")
  # A killed process keeps its cgroup busy until it is reaped: retry a while.
  while :; do
    left=0
    for h in "${CGROUP_HIERARCHIES[@]}" unified; do
      rmdir_tree "/sys/fs/cgroup/$h/$cg"
      [[ -d /sys/fs/cgroup/$h/$cg ]] && left=1
    done
    ((left && SECONDS < deadline)) || break
    sleep 0.2
  done
  ((left == 0)) || log "node $1: cgroup $cg could not be removed (processes not yet reaped)"
}

# --- PKI ------------------------------------------------------------------------

# node_pki NAME: the kubelet's client certificate (system:node:NAME) and its
# serving certificate (the node's address), signed by the cluster CA.
node_pki() {
  local name=$1 pki ip
  pki="$(node_dir "$name")/kubelet/pki"
  [[ -f $pki/.complete ]] && return 0
  ip=$(node_ip "$name")
  mkdir -p "$pki" && chmod 700 "$pki"
  (
    cd "$pki"
    exec 2>openssl.log
    sign_with_ca "$DIR/pki" client "/O=system:nodes/CN=system:node:$name" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
    sign_with_ca "$DIR/pki" serving "/CN=$name" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:$ip,DNS:$name"
  ) || { cat "$pki/openssl.log" >&2; die "certificates of node $name"; }
  touch "$pki/.complete"
}

# --- configuration ----------------------------------------------------------------

node_configs() {
  local name=$1 nd i ip mem_total_kib reserved_mib
  nd=$(node_dir "$name"); i=$(node_index "$name"); ip=$(node_ip "$name")
  mkdir -p "$nd"/{containerd/run,kubelet/root,cni/net.d,cni/ipam,cni/cache,pods,containers}

  cat >"$nd/containerd/config.toml" <<EOF
version = 3
root = "$nd/containerd/root"
state = "$nd/containerd/state"
[grpc]
  address = "$nd/containerd/containerd.sock"
[ttrpc]
  address = "$nd/containerd/containerd.sock.ttrpc"
[plugins.'io.containerd.internal.v1.opt']
  path = "$nd/containerd/opt"
[plugins.'io.containerd.nri.v1.nri']
  disable = true
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "$PAUSE_IMAGE"
[plugins.'io.containerd.cri.v1.runtime']
  # This host's root cannot lower oom_score_adj (no CAP_SYS_RESOURCE).
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        Root = "$nd/containerd/runc"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "$nd/cni/net.d"
EOF

  cat >"$nd/cni/net.d/10-sandfork.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "sandfork",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$PREFIX.$i.0/24"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$nd/cni/ipam"
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF

  # Each node offers an equal share of this machine's memory: the rest is
  # reserved, so the scheduler never places more on the machine than it has.
  mem_total_kib=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
  reserved_mib=$((mem_total_kib / 1024 - mem_total_kib / 1024 / ${#NODES[@]} + 256))
  cat >"$nd/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $DIR/pki/ca.crt}
authorization:
  mode: Webhook
tlsCertFile: $nd/kubelet/pki/serving.crt
tlsPrivateKeyFile: $nd/kubelet/pki/serving.key
containerRuntimeEndpoint: unix://$nd/containerd/containerd.sock
cgroupDriver: cgroupfs
cgroupRoot: /$(node_cgroup "$name")
failCgroupV1: false
# No cluster DNS and no name servers: pods resolve nothing, so nothing they
# look up leaves the machine.
resolvConf: ""
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  imagefs.available: 1%
systemReserved:
  memory: ${reserved_mib}Mi
enforceNodeAllocatable: [pods]
serializeImagePulls: false
EOF
  write_kubeconfig_file "$nd/kubelet/kubeconfig" "$nd/kubelet/pki/client.crt" "$nd/kubelet/pki/client.key"

  cat >"$nd/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: $DIR/kube-proxy.kubeconfig
hostnameOverride: $name
mode: iptables
iptables:
  # Masquerade Service traffic so replies from a pod on the same bridge come
  # back through the node (no br_netfilter needed).
  masqueradeAll: true
conntrack:
  # Leave this host's conntrack limits and timeouts alone.
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
EOF
}

# --- processes --------------------------------------------------------------------

save_cluster_env() {
  printf 'CLUSTER_NODES=%q\nCLUSTER_PREFIX=%q\n' "$CLUSTER_NODES" "$CLUSTER_PREFIX" >"$DIR/cluster.env"
}

# exec_in_node NAME CMD...: become CMD in the node's network and mount namespaces.
exec_in_node() {
  local name=$1; shift
  local holder
  holder="$(pid_of "$name-ns")"
  [[ -n $holder ]] || die "node $name has no namespace holder"
  exec nsenter --mount="/proc/$holder/ns/mnt" --net="/run/netns/$(node_netns "$name")" -- "$@"
}

# node_up NAME: start its namespace holder, containerd, kubelet and kube-proxy.
node_up() {
  local name=$1 nd ns
  nd=$(node_dir "$name"); ns=$(node_netns "$name")
  node_network_up "$name"
  node_cgroups_up "$name"
  node_pki "$name"
  node_configs "$name"
  # The mount namespace, held by a process that does nothing else: /dev/shm
  # becomes the node's own tmpfs, and every mount the node's runtime and
  # kubelet make dies with the namespace. Slave propagation: this host's
  # mounts reach the node, the node's do not come back.
  local binds=() entry
  for entry in "${NODE_PATHS[@]}"; do
    host_path_made "${entry%%=*}"
    binds+=("$nd/${entry#*=}" "${entry%%=*}")
  done
  start "$name-ns" unshare --mount --propagation slave -- bash -c '
    set -e
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
    argv0=$1; shift
    while (($#)); do mount --bind "$1" "$2"; shift 2; done
    exec -a "$argv0" sleep infinity' \
    bash "sandfork-node $nd" "${binds[@]}"
  local deadline=$((SECONDS + 10)) holder
  # Up once the node's /dev/shm is another file system than this host's.
  until holder="$(pid_of "$name-ns")" && [[ -n $holder ]] &&
    [[ "$(stat -c %d "/proc/$holder/root/dev/shm" 2>/dev/null)" != "$(stat -c %d /dev/shm)" ]]; do
    ((SECONDS < deadline)) || fail_with_logs "node $name: its mount namespace did not come up"
    sleep 0.1
  done
  cat >"$nd/node.env" <<EOF
NODE_NAME=$name
NODE_IP=$(node_ip "$name")
NODE_NETNS=$ns
NODE_HOLDER_PID=$holder
NODE_MNTNS=$(readlink "/proc/$holder/ns/mnt")
EOF

  start "$name-containerd" exec_in_node "$name" "$CONTAINERD_BIN/containerd" --config "$nd/containerd/config.toml"
  wait_for "node $name: containerd" 30 "$name-containerd" \
    "$CONTAINERD_BIN/ctr" --address "$nd/containerd/containerd.sock" version
  import_image_into "$name" "$PAUSE_ARCHIVE"

  start "$name-kubelet" exec_in_node "$name" "$KUBELET" \
    --config="$nd/kubelet/config.yaml" \
    --kubeconfig="$nd/kubelet/kubeconfig" \
    --cert-dir="$nd/kubelet/pki" \
    --hostname-override="$name" \
    --node-ip="$(node_ip "$name")" \
    --node-labels="$(node_labels "$name")" \
    --v=1
  start "$name-kube-proxy" exec_in_node "$name" "$KUBE_PROXY" --config="$nd/kube-proxy.yaml" --v=1
}

node_labels() {
  local labels="sandfork.dev/local-node=true" k
  for k in $(kvm_nodes); do [[ $k == "$1" ]] && labels+=",sandfork.dev/kvm=true"; done
  echo "$labels"
}

node_components() { # NAME -> its processes, in stop order
  echo "$1-kube-proxy $1-kubelet $1-containerd $1-ns"
}

# node_down NAME: stop its processes, then every process left in its mount
# namespace (shims, containers, sandboxes), then remove its netns and cgroups.
node_down() {
  local name=$1 nd mntns pid c
  nd=$(node_dir "$name")
  # Recorded at up, so that it is found even when its holder was killed.
  mntns=$(sed -n 's/^NODE_MNTNS=//p' "$nd/node.env" 2>/dev/null || true)
  for c in $(node_components "$name"); do
    [[ $c == "$name-ns" ]] && continue
    stop_component "$c"
  done
  # The shims and anything else still in the node's mount namespace, or
  # started for it (their command lines name the node's directory).
  for pid in $( [[ -n $mntns ]] && pids_in_mntns "$mntns"; pids_naming "$nd/"); do
    kill -KILL "$pid" 2>/dev/null || true
  done
  # Processes of the node's pods that left the namespace (none should).
  kill_cgroup_tasks "$(node_cgroup "$name")"
  stop_component "$name-ns"
  local deadline=$((SECONDS + 10))
  while [[ -n $mntns && -n "$(pids_in_mntns "$mntns")" ]] && ((SECONDS < deadline)); do sleep 0.1; done
  rm -f "$nd/node.env"
  ip netns del "$(node_netns "$name")" 2>/dev/null || true
  ip link del "sfk${CLUSTER_ID}v$(node_index "$name")" 2>/dev/null || true
  node_cgroups_down "$name"
}

# host_path_made PATH: make sure PATH exists on this host to mount over;
# what had to be made is removed again by host_paths_down.
host_path_made() {
  local path=$1 missing=""
  while [[ ! -e $path ]]; do missing=$path; path=$(dirname "$path"); done
  [[ -n $missing ]] || return 0
  mkdir -p "$1"
  echo "$missing" >>"$DIR/host-paths-made"
}

host_paths_down() {
  [[ -f $DIR/host-paths-made ]] || return 0
  local path
  # Only if empty: another node or cluster may still use it.
  while read -r path; do
    find "$path" -depth -type d -empty -delete 2>/dev/null || true
  done < <(sort -ru "$DIR/host-paths-made")
  rm -f "$DIR/host-paths-made"
}

pids_naming() {
  local f
  for f in /proc/[0-9]*; do
    [[ ${f#/proc/} == "$$" || ${f#/proc/} == "$BASHPID" ]] && continue
    tr '\0' ' ' <"$f/cmdline" 2>/dev/null | grep -qF -- "$1" && echo "${f#/proc/}"
  done
  return 0
}

pids_in_mntns() {
  local f pid
  for f in /proc/[0-9]*/ns/mnt; do
    [[ "$(readlink "$f" 2>/dev/null)" == "$1" ]] || continue
    pid=${f#/proc/}; echo "${pid%%/*}"
  done
}

kill_cgroup_tasks() {
  local h pid
  for h in "${CGROUP_HIERARCHIES[@]}"; do
    [[ -d /sys/fs/cgroup/$h/$1 ]] || continue
    find "/sys/fs/cgroup/$h/$1" -name tasks -exec cat {} + 2>/dev/null | while read -r pid; do
      kill -KILL "$pid" 2>/dev/null || true
    done
  done
}

# --- images -----------------------------------------------------------------------

# import_image_into NAME ARCHIVE: an OCI archive into the node's runtime,
# pinned (the kubelet never collects it).
import_image_into() {
  local out
  out=$("$CONTAINERD_BIN/ctr" --address "$(node_dir "$1")/containerd/containerd.sock" -n k8s.io \
    images import --label io.cri-containerd.pinned=pinned "$2" 2>&1) ||
    die "node $1: importing $2 failed: $out"
}

nodes_ready() {
  local ready
  ready=$(kubectl_ get nodes -o jsonpath='{range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}')
  local n
  for n in "${NODES[@]}"; do grep -qx "$n=True" <<<"$ready" || return 1; done
}
