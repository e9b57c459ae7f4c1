#!/usr/bin/env bash
# Installs what is needed, builds hasp in release mode and runs `hasp up`: every role on
# this machine with the embedded defaults. Extra arguments go to `hasp up`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -eq 0 ]; then ./scripts/install-deps.sh; else sudo ./scripts/install-deps.sh; fi
cargo build --release --quiet -p hasp-tools
exec ./target/release/hasp up "$@"
