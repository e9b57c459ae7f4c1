#!/usr/bin/env bash
# Runs every fuzz target for SECS seconds each (default 600), one after another, and
# prints one line per target: executions, and whether it found anything (a crash
# leaves its input in fuzz/artifacts/TARGET/). Needs cargo-fuzz; stable toolchain.
set -uo pipefail
cd "$(dirname "$0")/../fuzz"
SECS=${1:-600}
OUT=${OUT:-/tmp/hasp-fuzz}
mkdir -p "$OUT"
export RUSTC_BOOTSTRAP=1
for t in $(ls fuzz_targets | sed 's/\.rs$//'); do
  cargo fuzz build "$t" >"$OUT/$t.build.log" 2>&1 || { echo "$t: build failed (see $OUT/$t.build.log)"; continue; }
  cargo fuzz run "$t" -- -max_total_time="$SECS" -print_final_stats=1 >"$OUT/$t.log" 2>&1
  rc=$?
  runs=$(grep -a "stat::number_of_executed_units" "$OUT/$t.log" | awk '{print $2}')
  if [ $rc -eq 0 ]; then echo "$t: ${SECS} s, ${runs:-?} runs, no findings"; else echo "$t: FOUND something (exit $rc), see $OUT/$t.log"; fi
done
