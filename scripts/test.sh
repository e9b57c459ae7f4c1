#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, data plane tests on real io_uring
# sockets, and end-to-end tests that start the real `hasp` binary. Installs missing
# packages first (as root).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh

# Test relays bind fixed RTP ranges in 40000-47999: keep the kernel's ephemeral ports
# (every port-0 bind, every outgoing connection) above them, or a test's socket can take
# a port a relay is about to bind. Needs root (CI is); elsewhere the tests may collide.
if [ "$(id -u)" -eq 0 ] && [ -w /proc/sys/net/ipv4/ip_local_port_range ]; then
  echo "48000 60999" > /proc/sys/net/ipv4/ip_local_port_range
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# Build every binary first: the end-to-end tests start target/debug/hasp.
cargo build --workspace --all-targets --quiet
export HASP_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/hasp"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
