#!/usr/bin/env bash
# The test command: formatting, lints, the local cluster's smoke test (its
# nodes, and that `down` leaves nothing behind), then every test of the
# workspace (unit tests, the tests that need real /dev/kvm and
# /dev/userfaultfd, and the end-to-end tests against the chart's Pods on a
# local cluster with real nodes).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
# Heavy builds are cached outside the checkout, so a fresh clone reuses them.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sandfork/target}"
# Tests that need KVM and userfaultfd fail instead of skipping.
export SANDFORK_REQUIRE_DEVICES=1

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== local cluster smoke test"
e2e/cluster/smoke-test.sh

echo "== cargo test"
cargo test --workspace --locked -- --test-threads 2
