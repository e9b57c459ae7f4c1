#!/usr/bin/env bash
# Installs what is needed, builds hasp in release mode, runs `hasp up` (relay, SIP proxy
# and registrar on the embedded store) and places a demo call through it with sipp.
# hasp keeps running afterwards; Ctrl-C stops it. Extra arguments go to `hasp up`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -eq 0 ]; then ./scripts/install-deps.sh; else sudo ./scripts/install-deps.sh; fi
cargo build --release --quiet -p hasp-tools
mkdir -p hasp-data
TOKEN=${HASP_API_TOKEN:-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')}
log=hasp-data/up.log
./target/release/hasp up --api-token "$TOKEN" "$@" >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null' INT TERM
for _ in $(seq 1 100); do
  grep -q " ready " "$log" && break
  kill -0 $pid 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.1
done
ready=$(grep " ready " "$log")
echo "$ready"
echo "API token: $TOKEN"
field() { echo "$ready" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
if [ -n "$(field sip)" ]; then
  ./scripts/demo-call.sh "$(field api)" "$TOKEN" "$(field sip)" "$(field domain)" || echo "demo call failed (see above)"
fi
echo "hasp up is running (pid $pid, log $log); Ctrl-C to stop."
wait $pid
