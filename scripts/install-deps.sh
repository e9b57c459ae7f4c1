#!/usr/bin/env bash
# Installs what hasp's build and tests need on Debian. Idempotent: installs only what is
# missing, so a second run does nothing. Run as root (CI does).
set -euo pipefail

# Packages the tests use. Keep this list the single place that names them.
PACKAGES=(
  curl          # README demo, health checks
  iproute2      # network namespaces for multi-host tests
  procps        # pgrep/pkill in scripts and tests
  kamailio      # interop: Kamailio's rtpengine and rtpproxy modules drive hasp
  kamailio-extra-modules
  sip-tester    # sipp: UAC/UAS for the interop tests
  rtpengine-daemon  # interop: the same NG requests answered by rtpengine itself
  cmake         # builds the bundled libopus (opus crate, conference mixing)
  protobuf-compiler  # etcd-client's gRPC code generation
  libprotobuf-dev
  etcd-server   # the shared store's tests (a 3-node cluster on loopback)
  bind9-dnsutils  # dig: the DNS role's tests ask it like any resolver
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
  echo "install-deps: cargo not found; install a Rust toolchain (rustup) first" >&2
  exit 1
fi
echo "install-deps: ok"
