#!/usr/bin/env bash
# Installs what building and testing Sandfork needs on a fresh Debian machine.
# Idempotent: a second run only checks.
set -euo pipefail

need_apt=()
dpkg -s libclang-dev >/dev/null 2>&1 || need_apt+=(libclang-dev)   # bindgen for userfaultfd-sys
dpkg -s clang >/dev/null 2>&1 || need_apt+=(clang)
dpkg -s protobuf-compiler >/dev/null 2>&1 || need_apt+=(protobuf-compiler)  # tonic-prost-build
dpkg -s openssl >/dev/null 2>&1 || need_apt+=(openssl)
dpkg -s build-essential >/dev/null 2>&1 || need_apt+=(build-essential)
dpkg -s curl >/dev/null 2>&1 || need_apt+=(curl)
# The local cluster's nodes: runc under containerd (built by e2e/tools/build-tools.sh),
# the CNI plugins (bridge, host-local, loopback, portmap), iptables and conntrack
# for kube-proxy and the CNI plugins, iproute2 for the nodes' network namespaces.
dpkg -s runc >/dev/null 2>&1 || need_apt+=(runc)
dpkg -s containernetworking-plugins >/dev/null 2>&1 || need_apt+=(containernetworking-plugins)
dpkg -s iptables >/dev/null 2>&1 || need_apt+=(iptables)
dpkg -s conntrack >/dev/null 2>&1 || need_apt+=(conntrack)
dpkg -s iproute2 >/dev/null 2>&1 || need_apt+=(iproute2)
dpkg -s util-linux >/dev/null 2>&1 || need_apt+=(util-linux)
if ((${#need_apt[@]})); then
  echo "setup: installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
  echo "setup: cargo not found; install Rust (rustup) first" >&2
  exit 1
fi
