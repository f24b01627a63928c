#!/usr/bin/env bash
# The main job, locally: start a counter sandbox, capture it live while it
# runs, start branches from the capture, show that they continue from the
# captured instant, and clean up.
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
