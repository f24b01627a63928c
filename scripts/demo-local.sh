#!/usr/bin/env bash
# Sandfork without Kubernetes: the node agent's own command line starts a
# counter sandbox, captures it live while it runs, starts branches from the
# capture, shows that they continue from the captured instant, and cleans up.
# (scripts/demo.sh does the same through the API server.)
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sandfork/target}"
cargo build --release --locked -p sandfork-node-agent
agent="$CARGO_TARGET_DIR/release/sandfork-agent"
state=$(mktemp -d /dev/shm/sandfork-demo.XXXXXX)
run() { echo "+ sandfork-agent $*" >&2; "$agent" --state-dir "$state" "$@"; }
cleanup() {
  for name in demo-b1 demo-b2 demo; do "$agent" --state-dir "$state" delete "$name" 2>/dev/null || true; done
  rm -rf "$state"
}
trap cleanup EXIT

run run demo --guest counter --memory-mib 512 --vcpus 2 >/dev/null
sleep 2
run capture demo snap --mode live --verify
run branch snap demo-b1 >/dev/null
run branch snap demo-b2 >/dev/null
sleep 2
run list
