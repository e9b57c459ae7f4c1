#!/usr/bin/env bash
# Calls/s and registrations/s: hasp side by side with Kamailio (Debian package) in one
# run on this machine. The server under test is pinned to core 0, sipp to core 1; CPU is
# the server's whole process tree (all threads, all children) from /proc schedstat.
#
#   A. registrar lookup: the callee registers, the caller sends INVITE sip:service@PROXY
#      (sipp uac_rr/uas_rr, record-routed). hasp up (lookup + media anchored in its own
#      relay) vs Kamailio's Debian default config (lookup, no media).
#   B. media anchored, R-URI routed: hasp up vs Kamailio + rtpengine (the interop config,
#      rtpengine_offer/answer/delete), CPU of both daemons summed.
#   C. registrations: hasp (digest auth: 401 then 200, 2 transactions) vs Kamailio's
#      default config (no auth, 1 transaction).
#   D. the highest call rate held at <= 0.1 % failed calls, hasp up with 1 and with 2 SIP
#      threads (test A's flow, nothing pinned: on a 2-core machine sipp's caller and
#      callee share the cores with hasp, so this is a floor, not hasp's ceiling).
#
# A-C run hasp with --sip-threads 1 (one pinned core). BASELINE=path/to/hasp adds test A
# for that binary (e.g. a build of an earlier commit) in the same run. D_RATES lists the
# steps of D (default "1000 2000 3000 4000 5000 6000"); D=0 skips it.
#
# Usage: scripts/bench-sip.sh [RATE calls/s] [SECONDS]     (default 500 10)
set -u
cd "$(dirname "$0")/.."
RATE=${1:-500}; SECS=${2:-10}; CALLS=$((RATE * SECS))
SIPP_DIR=${SIPP_DIR:-tests/interop/rr}  # copies of ../shared/sipp/uac_rr.xml, uas_rr.xml
W=$(mktemp -d); trap 'pkill -f "$W" 2>/dev/null; rm -rf "$W"' EXIT
cargo build --release -q -p hasp-tools --bin hasp || exit 1
HASP=target/release/hasp

cpu_tree() { # total CPU ns of a process and its descendants
  local s=0 p t
  for p in $1 $(pgrep -P "$1"); do
    for t in /proc/$p/task/*/schedstat; do [ -r "$t" ] && s=$((s + $(cut -d' ' -f1 "$t"))); done
  done
  echo $s
}
sipp_bg() { taskset -c 1 sipp "$@" -i 127.0.0.1 -nostdin -bg >/dev/null 2>&1; }
result() { # name cpu_ns wall_ns count unit outfile
  local ok bad
  ok=$(grep -a "Successful call" "$6" | awk '{print $NF}'); bad=$(grep -a "Failed call" "$6" | awk '{print $NF}')
  printf '%-44s %6s ok %4s failed  %7.1f %s/s  %6d us CPU per %s  (%.0f%% of a core)\n' "$1" "$ok" "$bad" \
    "$(echo "$ok * 1000000000 / $3" | bc -l)" "$5" $(($2 / 1000 / ($4 > 0 ? $4 : 1))) "$5" \
    "$(echo "$2 * 100 / $3" | bc -l)"
}
wait_port() { for _ in $(seq 100); do ss -lun | grep -q ":$1 " && return 0; sleep 0.1; done; return 1; }
register_uas() { # proxy_addr scenario [auth args]
  local proxy=$1 sc=$2; shift 2
  taskset -c 1 sipp -sf "$sc" -i 127.0.0.1 -p 16002 -m 1 -nostdin -timeout 10s -s service \
    -key domain "$DOMAIN" -key contact_port 16000 "$@" "$proxy" >"$W/reg1.out" 2>&1 || { echo "registration failed"; cat "$W/reg1.out"; }
}
calls() { # name server_pid proxy_addr [-rsa ... target]
  local name=$1 pid=$2; shift 2
  sipp_bg -sf "$SIPP_DIR/uas_rr.xml" -p 16000
  sleep 0.3
  local c0 t0 c1 t1
  c0=$(cpu_tree "$pid"); t0=$(date +%s%N)
  taskset -c 1 sipp -sf "$SIPP_DIR/uac_rr.xml" -i 127.0.0.1 -p 16001 -r "$RATE" -m "$CALLS" -nostdin \
    -timeout $((SECS * 3 + 20))s "$@" >"$W/uac.out" 2>&1
  t1=$(date +%s%N); c1=$(cpu_tree "$pid")
  pkill -f "uas_rr.xml" ; sleep 0.2
  result "$name" $((c1 - c0)) $((t1 - t0)) "$CALLS" call "$W/uac.out"
}
registrations() { # name server_pid proxy_addr scenario [auth args]
  local name=$1 pid=$2 proxy=$3 sc=$4; shift 4
  local c0 t0 c1 t1
  c0=$(cpu_tree "$pid"); t0=$(date +%s%N)
  taskset -c 1 sipp -sf "$sc" -i 127.0.0.1 -p 16003 -r "$RATE" -m "$CALLS" -nostdin -timeout $((SECS * 3 + 20))s \
    -s service -key domain "$DOMAIN" -key contact_port 16000 "$@" "$proxy" >"$W/reg.out" 2>&1
  t1=$(date +%s%N); c1=$(cpu_tree "$pid")
  result "$name" $((c1 - c0)) $((t1 - t0)) "$CALLS" registration "$W/reg.out"
}
start_hasp() { # [binary] [extra args]
  local bin=${1:-$HASP}; shift || true
  rm -rf "$W/store"
  # No per-source limit: sipp sends everything from one address (Kamailio's default
  # configuration has none either).
  taskset -c 0 $bin up "$@" --no-auth --sip-rate-limit 0 --listen-api 127.0.0.1:18999 --listen-sip 127.0.0.1:15090 --domain bench.test \
    --store "embedded:$W/store/h.redb" --rtp-ports 20000-29999 --cores 0 --inactivity-timeout 30 >"$W/hasp.out" 2>&1 &
  HP=$!
  for _ in $(seq 100); do grep -q ready "$W/hasp.out" && break; sleep 0.1; done
  curl -sf -X POST http://127.0.0.1:18999/v1/users -d '{"user":"service","domain":"bench.test","password":"bench"}' >/dev/null
}
start_kamailio() { # cfg [args]
  local cfg=$1; shift
  taskset -c 0 kamailio -DD -E -m 1024 -M 16 -f "$cfg" -Y "$W" -w "$W" "$@" >"$W/kam.out" 2>&1 &
  KP=$!
  wait_port "${KPORT}"
}
stop() { kill "$1" 2>/dev/null; pkill -P "$1" 2>/dev/null; wait "$1" 2>/dev/null; sleep 0.5; }

echo "# $RATE calls/s for $SECS s ($CALLS calls / registrations per run); server on core 0, sipp on core 1"
echo "## A. registrar lookup (INVITE sip:service@PROXY)"
DOMAIN=bench.test; start_hasp "$HASP" --sip-threads 1
register_uas 127.0.0.1:15090 tests/interop/register.xml -au service -ap bench
calls "hasp up (lookup + media anchored)" $HP 127.0.0.1:15090 -s service 127.0.0.1:15090
stop $HP
if [ -n "${BASELINE:-}" ]; then
  start_hasp "$BASELINE"
  register_uas 127.0.0.1:15090 tests/interop/register.xml -au service -ap bench
  calls "baseline $BASELINE" $HP 127.0.0.1:15090 -s service 127.0.0.1:15090
  stop $HP
fi
DOMAIN=127.0.0.1:15091; KPORT=15091; start_kamailio /etc/kamailio/kamailio.cfg -l udp:127.0.0.1:15091
register_uas 127.0.0.1:15091 tests/interop/register_noauth.xml
calls "kamailio default cfg (lookup, no media)" $KP 127.0.0.1:15091 -s service 127.0.0.1:15091
stop $KP

echo "## B. media anchored, routed by R-URI (INVITE sip:service@UAS via the proxy)"
DOMAIN=bench.test; start_hasp "$HASP" --sip-threads 1
calls "hasp up (proxy + relay, one process)" $HP -rsa 127.0.0.1:15090 -s service 127.0.0.1:16000
stop $HP
taskset -c 0 rtpengine --config-file=none --table=-1 --interface=127.0.0.1 --listen-ng=127.0.0.1:2299 \
  --port-min=30000 --port-max=59999 --delete-delay=0 --foreground --log-stderr --log-level=3 >"$W/rtpengine.out" 2>&1 &
RP=$!
sed -e 's/{SIP_PORT}/15092/; s/{NG_PORT}/2299/; s/^debug=.*/debug=1/; s/^children=.*/children=8/' \
  tests/interop/kamailio-rtpengine.cfg >"$W/kam-rtpengine.cfg"
KPORT=15092; start_kamailio "$W/kam-rtpengine.cfg"
# rtpengine runs as its own tree: count it by summing both at each end.
bash -c "true" ; sleep 0.5
sipp_bg -sf "$SIPP_DIR/uas_rr.xml" -p 16000; sleep 0.3
k0=$(cpu_tree $KP); r0=$(cpu_tree $RP); t0=$(date +%s%N)
taskset -c 1 sipp -sf "$SIPP_DIR/uac_rr.xml" -i 127.0.0.1 -p 16001 -r "$RATE" -m "$CALLS" -nostdin \
  -timeout $((SECS * 3 + 20))s -rsa 127.0.0.1:15092 -s service 127.0.0.1:16000 >"$W/uac.out" 2>&1
t1=$(date +%s%N); k1=$(cpu_tree $KP); r1=$(cpu_tree $RP)
pkill -f "uas_rr.xml"; sleep 0.2
result "kamailio + rtpengine (both daemons)" $((k1 - k0 + r1 - r0)) $((t1 - t0)) "$CALLS" call "$W/uac.out"
echo "   of which kamailio $(( (k1 - k0) / 1000 / CALLS )) us, rtpengine $(( (r1 - r0) / 1000 / CALLS )) us per call"
stop $KP; stop $RP

echo "## C. registrations"
DOMAIN=bench.test; start_hasp "$HASP" --sip-threads 1
registrations "hasp up (digest auth, 2 transactions)" $HP 127.0.0.1:15090 tests/interop/register.xml -au service -ap bench
stop $HP
if [ -n "${BASELINE:-}" ]; then
  start_hasp "$BASELINE"
  registrations "baseline $BASELINE" $HP 127.0.0.1:15090 tests/interop/register.xml -au service -ap bench
  stop $HP
fi
DOMAIN=127.0.0.1:15091; KPORT=15091; start_kamailio /etc/kamailio/kamailio.cfg -l udp:127.0.0.1:15091
registrations "kamailio default cfg (no auth, 1 transaction)" $KP 127.0.0.1:15091 tests/interop/register_noauth.xml
stop $KP

[ "${D:-1}" = 0 ] && exit 0
echo "## D. highest call rate at <= 0.1 % failed calls (test A's flow, nothing pinned, sipp shares the cores)"
for threads in 1 2; do
  best=0
  for rate in ${D_RATES:-1000 2000 3000 4000 5000 6000}; do
    rm -rf "$W/store"
    $HASP up --no-auth --listen-api 127.0.0.1:18999 --listen-sip 127.0.0.1:15090 --domain bench.test \
      --store "embedded:$W/store/h.redb" --rtp-ports 20000-29999 --workers 1 --inactivity-timeout 30 \
      --sip-threads $threads >"$W/hasp.out" 2>&1 &
    HP=$!
    for _ in $(seq 100); do grep -q ready "$W/hasp.out" && break; sleep 0.1; done
    curl -sf -X POST http://127.0.0.1:18999/v1/users -d '{"user":"service","domain":"bench.test","password":"bench"}' >/dev/null
    DOMAIN=bench.test
    sipp -sf tests/interop/register.xml -i 127.0.0.1 -p 16002 -m 1 -nostdin -timeout 10s -s service \
      -key domain "$DOMAIN" -key contact_port 16000 -au service -ap bench 127.0.0.1:15090 >/dev/null 2>&1
    sipp -sf "$SIPP_DIR/uas_rr.xml" -i 127.0.0.1 -p 16000 -nostdin -bg >/dev/null 2>&1; sleep 0.3
    n=$((rate * SECS)); c0=$(cpu_tree $HP); t0=$(date +%s%N)
    sipp -sf "$SIPP_DIR/uac_rr.xml" -i 127.0.0.1 -p 16001 -r "$rate" -m "$n" -nostdin \
      -timeout $((SECS * 3 + 20))s -s service 127.0.0.1:15090 >"$W/uac.out" 2>&1
    t1=$(date +%s%N); c1=$(cpu_tree $HP)
    pkill -f "uas_rr.xml"; sleep 0.2; stop $HP
    ok=$(grep -a "Successful call" "$W/uac.out" | awk '{print $NF}'); bad=$(grep -a "Failed call" "$W/uac.out" | awk '{print $NF}')
    ok=${ok:-0}; bad=${bad:-$n}
    printf '   %d thread(s) %5d calls/s offered: %6d ok %5d failed  %7.1f calls/s done  %4d us CPU/call\n' \
      "$threads" "$rate" "$ok" "$bad" "$(echo "$ok * 1000000000 / ($t1 - $t0)" | bc -l)" $(( (c1 - c0) / 1000 / (ok > 0 ? ok : 1) ))
    if [ $((bad * 1000)) -le "$n" ] && [ "$ok" -ge $((n * 999 / 1000)) ]; then best=$rate; else break; fi
  done
  echo "D. $threads SIP thread(s): highest rate held at <= 0.1 % failed: $best calls/s"
done
