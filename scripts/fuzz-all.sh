#!/usr/bin/env bash
# Runs every fuzz target for SECS seconds (default 600), PAR at a time (default 4), and
# prints one line per target: executions, and whether it found anything (a crash leaves
# its input in fuzz/artifacts/TARGET/). Needs cargo-fuzz; stable toolchain.
set -uo pipefail
cd "$(dirname "$0")/../fuzz"
SECS=${1:-600}
PAR=${PAR:-4}
OUT=${OUT:-/tmp/hasp-fuzz}
mkdir -p "$OUT"
export RUSTC_BOOTSTRAP=1
cargo fuzz build >"$OUT/build.log" 2>&1 || { echo "build failed (see $OUT/build.log)"; exit 1; }
run() {
  local t=$1
  cargo fuzz run "$t" -- -max_total_time="$SECS" -print_final_stats=1 >"$OUT/$t.log" 2>&1
  local rc=$? runs
  runs=$(grep -a "stat::number_of_executed_units" "$OUT/$t.log" | awk '{print $2}')
  if [ $rc -eq 0 ]; then echo "$t: ${SECS} s, ${runs:-?} runs, no findings"; else echo "$t: FOUND something (exit $rc), see $OUT/$t.log"; fi
}
targets=$(ls fuzz_targets | sed 's/\.rs$//')
n=0
for t in $targets; do
  run "$t" &
  n=$((n + 1))
  if [ $((n % PAR)) -eq 0 ]; then wait; fi
done
wait
