#!/usr/bin/env bash
# A demo call through a running `hasp up`: provisions bob@DOMAIN, lets a sipp callee
# register as bob (digest auth) and answer, places one call to him from a sipp caller
# through the proxy, and shows the relay session that anchored its media.
# Usage: scripts/demo-call.sh [API_URL] [TOKEN] [SIP_ADDR] [DOMAIN]
set -euo pipefail
cd "$(dirname "$0")/.."
API=${1:-http://127.0.0.1:8080}; TOKEN=${2:-${HASP_API_TOKEN:-}}; SIP=${3:-127.0.0.1:5060}; DOMAIN=${4:-hasp.local}
AUTH=(-H "Authorization: Bearer $TOKEN")
curl -sf "${AUTH[@]}" -X POST "$API/v1/users" -d "{\"user\":\"bob\",\"domain\":\"$DOMAIN\",\"password\":\"demo-secret\"}" >/dev/null
work=$(mktemp -d)
# The callee registers (digest auth) with its contact on port 5092, then answers there.
sipp -sf tests/interop/register.xml -i 127.0.0.1 -p 5093 -m 1 -nostdin -timeout 10s \
     -s bob -key domain "$DOMAIN" -key contact_port 5092 -au bob -ap demo-secret "$SIP" >"$work/reg.out" 2>&1 \
  && echo "demo call: bob registered (digest auth)" || { echo "registration FAILED"; cat "$work/reg.out"; exit 1; }
sipp -sf tests/interop/uas_media.xml -i 127.0.0.1 -p 5092 -m 1 -nostdin -timeout 20s \
     -key media_b 6100 >"$work/uas.out" 2>&1 &
uas=$!
sleep 0.5  # let the callee bind its port
sipp -sf tests/interop/uac_demo.xml -i 127.0.0.1 -p 5091 -m 1 -nostdin -timeout 20s \
     -key domain "$DOMAIN" -key media_port 6000 "$SIP" >"$work/uac.out" 2>&1 &
uac=$!
sleep 1
echo "relay sessions during the call:"
curl -sf "${AUTH[@]}" "$API/v1/sessions" | head -c 600; echo
wait $uac && echo "demo call: caller OK" || { echo "demo call: caller FAILED"; cat "$work/uac.out"; exit 1; }
wait $uas && echo "demo call: callee OK" || { echo "demo call: callee FAILED"; cat "$work/uas.out"; exit 1; }
echo "relay sessions after the BYE: $(curl -sf "${AUTH[@]}" "$API/v1/sessions" | head -c 80)"
