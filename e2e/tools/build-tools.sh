#!/usr/bin/env bash
# Build the control-plane tools used by Sandfork's e2e tests and demo, from
# source, at pinned versions, into a cache directory outside the repository.
#
#   e2e/tools/build-tools.sh            build whatever is missing, then print
#                                       shell `export` lines (eval-able)
#   e2e/tools/build-tools.sh --check    build nothing; exit 1 if anything is missing
#   e2e/tools/build-tools.sh --env      same as --check but print the export lines
#
# Cache layout (keyed by version; a directory only appears once complete):
#   $SANDFORK_TOOLS_DIR/k8s-v1.37.2/bin/{kube-apiserver,kube-controller-manager,kube-scheduler,
#                                        kube-proxy,kubelet,kubectl}
#   $SANDFORK_TOOLS_DIR/containerd-v2.2.9/bin/{containerd,containerd-shim-runc-v2,ctr}
#   $SANDFORK_TOOLS_DIR/pause-v1.37.2/bin/pause  the pause container's binary (static, from
#                                        Kubernetes' own build/pause/linux/pause.c)
#   $SANDFORK_TOOLS_DIR/etcd-v3.7.3/bin/etcd
#   $SANDFORK_TOOLS_DIR/helm-v3.22.0/bin/helm
#   $SANDFORK_TOOLS_DIR/env.sh           the export lines printed on stdout
#
# Progress and build logs go to stderr; stdout carries only the export lines,
# so `eval "$(e2e/tools/build-tools.sh)"` works.
#
# Environment:
#   SANDFORK_TOOLS_DIR     cache dir (default: $HOME/.cache/sandfork/tools)
#   SANDFORK_K8S_VERSION   default v1.37.2
#   SANDFORK_ETCD_VERSION  default v3.7.3
#   SANDFORK_HELM_VERSION  default v3.22.0
#   SANDFORK_CONTAINERD_VERSION default v2.2.9
#   SANDFORK_BUILD_JOBS    go build -p value (default 2)
#   SANDFORK_BUILD_ETCDCTL set to 1 to also build etcdctl
#   GO                     path of the go binary (default: `go` on PATH,
#                          then /usr/local/go/bin/go, then /usr/lib/go*/bin/go)
set -euo pipefail

K8S_VERSION="${SANDFORK_K8S_VERSION:-v1.37.2}"
ETCD_VERSION="${SANDFORK_ETCD_VERSION:-v3.7.3}"
HELM_VERSION="${SANDFORK_HELM_VERSION:-v3.22.0}"
CONTAINERD_VERSION="${SANDFORK_CONTAINERD_VERSION:-v2.2.9}"
TOOLS_DIR="${SANDFORK_TOOLS_DIR:-${HOME:-/root}/.cache/sandfork/tools}"
JOBS="${SANDFORK_BUILD_JOBS:-2}"

MODE=build
case "${1:-}" in
  "") ;;
  --check) MODE=check ;;
  --env) MODE="env" ;;
  -h|--help) sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "build-tools.sh: unknown argument: $1 (try --help)" >&2; exit 2 ;;
esac

log() { echo "build-tools: $*" >&2; }
die() { echo "build-tools: ERROR: $*" >&2; exit 1; }

K8S_DIR="$TOOLS_DIR/k8s-$K8S_VERSION"
ETCD_DIR="$TOOLS_DIR/etcd-$ETCD_VERSION"
HELM_DIR="$TOOLS_DIR/helm-$HELM_VERSION"
CONTAINERD_DIR="$TOOLS_DIR/containerd-$CONTAINERD_VERSION"
PAUSE_DIR="$TOOLS_DIR/pause-$K8S_VERSION"
K8S_BINS=(kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubelet kubectl)
ETCD_BINS=(etcd)
if [[ "${SANDFORK_BUILD_ETCDCTL:-0}" == 1 ]]; then ETCD_BINS+=(etcdctl); fi
HELM_BINS=(helm)
CONTAINERD_BINS=(containerd containerd-shim-runc-v2 ctr)
PAUSE_BINS=(pause)

# complete DIR BIN... : true when every BIN is an executable file in DIR/bin.
complete() {
  local dir=$1; shift
  local b
  for b in "$@"; do [[ -x "$dir/bin/$b" ]] || return 1; done
}

env_lines() {
  cat <<EOF
export SANDFORK_TOOLS_DIR='$TOOLS_DIR'
export SANDFORK_K8S_BIN='$K8S_DIR/bin'
export SANDFORK_ETCD_BIN='$ETCD_DIR/bin'
export SANDFORK_HELM_BIN='$HELM_DIR/bin'
export SANDFORK_CONTAINERD_BIN='$CONTAINERD_DIR/bin'
export SANDFORK_PAUSE_BIN='$PAUSE_DIR/bin'
export PATH='$K8S_DIR/bin:$ETCD_DIR/bin:$HELM_DIR/bin':"\$PATH"
EOF
}

all_complete() {
  complete "$K8S_DIR" "${K8S_BINS[@]}" &&
    complete "$ETCD_DIR" "${ETCD_BINS[@]}" &&
    complete "$HELM_DIR" "${HELM_BINS[@]}" &&
    complete "$CONTAINERD_DIR" "${CONTAINERD_BINS[@]}" &&
    complete "$PAUSE_DIR" "${PAUSE_BINS[@]}"
}

if [[ $MODE != build ]]; then
  if all_complete; then
    [[ $MODE == env ]] && env_lines
    exit 0
  fi
  complete "$K8S_DIR" "${K8S_BINS[@]}" || log "missing: $K8S_DIR/bin/{${K8S_BINS[*]}}"
  complete "$ETCD_DIR" "${ETCD_BINS[@]}" || log "missing: $ETCD_DIR/bin/{${ETCD_BINS[*]}}"
  complete "$HELM_DIR" "${HELM_BINS[@]}" || log "missing: $HELM_DIR/bin/{${HELM_BINS[*]}}"
  complete "$CONTAINERD_DIR" "${CONTAINERD_BINS[@]}" || log "missing: $CONTAINERD_DIR/bin/{${CONTAINERD_BINS[*]}}"
  complete "$PAUSE_DIR" "${PAUSE_BINS[@]}" || log "missing: $PAUSE_DIR/bin/pause"
  log "run e2e/tools/build-tools.sh (without arguments) to build them"
  exit 1
fi

mkdir -p "$TOOLS_DIR"

# Fast path: everything cached, no Go needed.
if all_complete; then
  env_lines | tee "$TOOLS_DIR/env.sh.tmp.$$" && mv -f "$TOOLS_DIR/env.sh.tmp.$$" "$TOOLS_DIR/env.sh"
  exit 0
fi

# --- Go toolchain ----------------------------------------------------------
find_go() {
  if [[ -n "${GO:-}" ]]; then echo "$GO"; return; fi
  if command -v go >/dev/null 2>&1; then command -v go; return; fi
  local g
  for g in /usr/local/go/bin/go /usr/lib/go/bin/go /usr/lib/go-*/bin/go; do
    [[ -x "$g" ]] && { echo "$g"; return; }
  done
  return 1
}
GO_BIN="$(find_go)" || die "no Go toolchain found (looked for \$GO, 'go' on PATH, /usr/local/go/bin/go, /usr/lib/go*/bin/go).
  Install Go >= 1.21 first (Debian 12: a golang package from bookworm-backports, or the official
  toolchain); the newer toolchain the pinned modules require is then fetched through the Go module proxy."
"$GO_BIN" version >/dev/null 2>&1 || die "$GO_BIN does not run"
# Debian's go.env may set GOTOOLCHAIN=local; the pinned modules need go >= 1.26,
# which an older go can fetch from the module proxy when GOTOOLCHAIN=auto.
export GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"
export CGO_ENABLED=0
export GOFLAGS="-mod=mod ${GOFLAGS:-}"
export GOWORK=off
log "using $("$GO_BIN" version) ($GO_BIN), GOTOOLCHAIN=$GOTOOLCHAIN"

# Serialize concurrent builders on the same cache.
exec 9>"$TOOLS_DIR/.lock"
if command -v flock >/dev/null 2>&1; then
  flock 9 || die "cannot lock $TOOLS_DIR/.lock"
fi

# Leftovers of builders that were killed (safe: we hold the lock).
rm -rf "$TOOLS_DIR"/.build.* "$TOOLS_DIR"/*.old.*
WORK="$(mktemp -d "$TOOLS_DIR/.build.XXXXXX")"
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

# install_dir FINAL STAGED: move a fully built staging dir into place.
install_dir() {
  local final=$1 staged=$2
  rm -rf "$final.old.$$"
  if [[ -e "$final" ]]; then mv "$final" "$final.old.$$"; fi
  mv "$staged" "$final"
  rm -rf "$final.old.$$"
}

gomod_dir() { # module@version -> directory of its go.mod in the module cache
  "$GO_BIN" mod download -json "$1" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p'
}

build_k8s() {
  local minor_ver=${K8S_VERSION#v1.}          # 37.2
  local staging_ver="v0.$minor_ver"           # v0.37.2
  local major=1 minor=${minor_ver%%.*}        # 1, 37
  local mod="$WORK/k8s" out="$WORK/k8s-out"
  mkdir -p "$mod" "$out/bin"
  log "k8s $K8S_VERSION: resolving staging modules"
  local gomod
  gomod="$(gomod_dir "k8s.io/kubernetes@$K8S_VERSION")"
  [[ -f "$gomod" ]] || die "could not download k8s.io/kubernetes@$K8S_VERSION"
  local staging
  staging="$(sed -n 's#^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\)[[:space:]]*=>[[:space:]]*\./staging/.*#\1#p' "$gomod" | sort -u)"
  [[ -n "$staging" ]] || die "no staging replace lines found in $gomod"
  {
    echo "module sandfork.local/k8s-tools"
    echo
    sed -n 's/^go \([0-9.]*\)$/go \1/p' "$gomod" | head -n1
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    local m
    for m in $staging; do echo "	$m => $m $staging_ver"; done
    echo ")"
  } >"$mod/go.mod"
  local ldflags="-s -w"
  local pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  done
  local pkgs=()
  for m in "${K8S_BINS[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$m"); done
  log "k8s $K8S_VERSION: building ${K8S_BINS[*]} (go build -p $JOBS; many minutes on 2 cores)"
  (cd "$mod" && "$GO_BIN" build -p "$JOBS" -trimpath -ldflags "$ldflags" -o "$out/bin/" "${pkgs[@]}") >&2 ||
    die "k8s build failed"
  complete "$out" "${K8S_BINS[@]}" || die "k8s build produced no binaries"
  "$out/bin/kube-apiserver" --version >&2
  install_dir "$K8S_DIR" "$out"
}

build_etcd() {
  local mod="$WORK/etcd" out="$WORK/etcd-out"
  mkdir -p "$mod" "$out/bin"
  local gomod
  gomod="$(gomod_dir "go.etcd.io/etcd/server/v3@$ETCD_VERSION")"
  [[ -f "$gomod" ]] || die "could not download go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  # The server's own go.mod replaces its sibling modules with ../ paths, which
  # is why `go install` refuses it; its require lines already name the same
  # released versions, so a wrapper module needs no replace at all.
  {
    echo "module sandfork.local/etcd-tools"
    echo
    sed -n 's/^go \([0-9.]*\)$/go \1/p' "$gomod" | head -n1
    echo
    echo "require go.etcd.io/etcd/server/v3 $ETCD_VERSION"
    if [[ " ${ETCD_BINS[*]} " == *" etcdctl "* ]]; then
      echo "require go.etcd.io/etcd/etcdctl/v3 $ETCD_VERSION"
    fi
  } >"$mod/go.mod"
  log "etcd $ETCD_VERSION: building ${ETCD_BINS[*]}"
  (cd "$mod" && "$GO_BIN" build -p "$JOBS" -trimpath -ldflags "-s -w" -o "$out/bin/etcd" go.etcd.io/etcd/server/v3) >&2 ||
    die "etcd build failed"
  if [[ " ${ETCD_BINS[*]} " == *" etcdctl "* ]]; then
    (cd "$mod" && "$GO_BIN" build -p "$JOBS" -trimpath -ldflags "-s -w" -o "$out/bin/etcdctl" go.etcd.io/etcd/etcdctl/v3) >&2 ||
      die "etcdctl build failed"
  fi
  "$out/bin/etcd" --version >&2
  install_dir "$ETCD_DIR" "$out"
}

build_helm() {
  local out="$WORK/helm-out"
  mkdir -p "$out/bin"
  local gomod
  gomod="$(gomod_dir "helm.sh/helm/v3@$HELM_VERSION")"
  [[ -f "$gomod" ]] || die "could not download helm.sh/helm/v3@$HELM_VERSION"
  # Like helm's Makefile: the default Capabilities.KubeVersion follows the
  # client-go it was built with (client-go v0.X.Y -> Kubernetes 1.X).
  local cg kmaj kmin
  cg="$(sed -n 's#^[[:space:]]*k8s\.io/client-go v0\.\([0-9]*\)\..*#\1#p' "$gomod" | head -n1)"
  [[ -n "$cg" ]] || die "cannot read the client-go version from $gomod"
  kmaj=1 kmin=$cg
  local v=helm.sh/helm/v3/internal/version
  local ldflags="-s -w -X $v.version=$HELM_VERSION -X $v.metadata= -X $v.gitTreeState=clean"
  ldflags+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=$kmaj -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$kmin"
  ldflags+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=$kmaj -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$kmin"
  log "helm $HELM_VERSION: go install helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  # `go install pkg@version` builds outside any main module; keep -mod out of GOFLAGS.
  (cd "$WORK" && GOFLAGS="" GOBIN="$out/bin" "$GO_BIN" install -p "$JOBS" -trimpath -ldflags "$ldflags" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION") >&2 || die "helm build failed"
  "$out/bin/helm" version --short >&2
  install_dir "$HELM_DIR" "$out"
}

build_containerd() {
  local out="$WORK/containerd-out"
  mkdir -p "$out/bin"
  local m=github.com/containerd/containerd/v2
  local v=$m/version
  local ldflags="-s -w -X $v.Version=$CONTAINERD_VERSION -X $v.Revision=sandfork-build -X $v.Package=$m"
  log "containerd $CONTAINERD_VERSION: go install $m/cmd/{${CONTAINERD_BINS[*]}}"
  # No btrfs, devmapper or zfs snapshotters: they need C headers, and the
  # nodes use overlayfs.
  (cd "$WORK" && GOFLAGS="" GOBIN="$out/bin" "$GO_BIN" install -p "$JOBS" -trimpath \
    -tags "no_btrfs no_devmapper no_zfs" -ldflags "$ldflags" \
    "$m/cmd/containerd@$CONTAINERD_VERSION" "$m/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION" \
    "$m/cmd/ctr@$CONTAINERD_VERSION") >&2 || die "containerd build failed"
  "$out/bin/containerd" --version >&2
  install_dir "$CONTAINERD_DIR" "$out"
}

# The pause container: Kubernetes' own pause.c, from the module that the
# other binaries are built from, linked statically (no registry to pull from).
build_pause() {
  local out="$WORK/pause-out" src
  mkdir -p "$out/bin"
  src="$("$GO_BIN" mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')/build/pause/linux/pause.c"
  [[ -f "$src" ]] || die "no pause.c in k8s.io/kubernetes@$K8S_VERSION"
  command -v gcc >/dev/null || die "gcc not found (Debian: build-essential)"
  log "pause: gcc -static $src"
  gcc -Os -static -DVERSION="sandfork-$K8S_VERSION" -o "$out/bin/pause" "$src" >&2 || die "pause build failed"
  strip "$out/bin/pause"
  install_dir "$PAUSE_DIR" "$out"
}

start=$SECONDS
# Re-check after taking the lock: another builder may have finished meanwhile.
# (`if` rather than `||`, so that `set -e` stays in force inside the builders.)
if ! complete "$ETCD_DIR" "${ETCD_BINS[@]}"; then build_etcd; fi
if ! complete "$HELM_DIR" "${HELM_BINS[@]}"; then build_helm; fi
if ! complete "$K8S_DIR" "${K8S_BINS[@]}"; then build_k8s; fi
if ! complete "$CONTAINERD_DIR" "${CONTAINERD_BINS[@]}"; then build_containerd; fi
if ! complete "$PAUSE_DIR" "${PAUSE_BINS[@]}"; then build_pause; fi
log "done in $((SECONDS - start))s; cache: $TOOLS_DIR"

env_lines | tee "$TOOLS_DIR/env.sh.tmp.$$"
mv -f "$TOOLS_DIR/env.sh.tmp.$$" "$TOOLS_DIR/env.sh"
