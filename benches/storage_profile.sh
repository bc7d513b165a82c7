#!/bin/sh
# Profile of one write scenario of `storage_figures` (chatlog only): `perf stat` (task
# clock, context switches) for 2 s, then `perf record -F 999 -g` for 3 s, both inside the
# timed window of one 7 s run. Session 8's profiles in RESULTS.md came from it.
#
#   benches/storage_profile.sh BINARY SIZE SCENARIO OUT_PREFIX
#
# SCENARIO is append_durable or append_durable_8w. Writes OUT_PREFIX.run (the figures
# row), OUT_PREFIX.stat and OUT_PREFIX.data; read the split per thread with
# `perf report -i OUT_PREFIX.data --no-children --sort comm,sym --stdio -g none`.
set -eu
B=$1 SIZE=$2 SC=$3 OUT=$4
CHATLOG_FIGURES_REPEATS=1 CHATLOG_FIGURES_SECS=7 CHATLOG_FIGURES_SIZES=$SIZE \
  CHATLOG_FIGURES_ENGINES=chatlog "$B" write >"$OUT.run" 2>&1 &
pid=$!
if [ "$SC" = append_durable_8w ]; then
  while ! grep -q '^| append_durable | chatlog' "$OUT.run"; do sleep 0.1; done
fi
sleep 1.5
perf stat -e task-clock,context-switches,cpu-migrations -p "$pid" -- sleep 2 2>"$OUT.stat" >/dev/null
perf record -F 999 -g -o "$OUT.data" -p "$pid" -- sleep 3 >/dev/null 2>&1
while ! grep -q "^| $SC | chatlog" "$OUT.run"; do sleep 0.2; done
kill "$pid" 2>/dev/null || true
wait "$pid" 2>/dev/null || true
grep "^| $SC | chatlog" "$OUT.run"
grep -v '^$' "$OUT.stat"
