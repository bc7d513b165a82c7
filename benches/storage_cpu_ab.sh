#!/bin/sh
# CPU cost per entry of chatlog's `append_durable` (one writer, fdatasync per batch): two
# builds of `storage_figures`, interleaved, same host, same minutes. On a shared host the
# throughput of a durable writer follows the disk's fdatasync latency (which other tenants
# move by 10x), but the CPU the engine spends per entry does not: it is what the write
# path's copies, compression attempts and index updates cost.
#
#   benches/storage_cpu_ab.sh BASE_BINARY NEW_BINARY
#
# Per round, entry size and binary: one 6 s run of `append_durable` on chatlog alone;
# `perf stat -e task-clock` counts the whole process's CPU (every thread: the writer, the
# I/O thread, maintenance; io_uring's kernel workers are not counted) over 4 s of the
# timed window; entries in that window are taken as the run's entries/s x 4 s. Prints one
# row per run: `| size | binary | entries/s | CPU ms | CPU µs per 1,000 entries |`.
# CHATLOG_CPU_ROUNDS (default 3) rounds; take the median per binary and size.
# CHATLOG_CPU_SCENARIO=append_buffered measures the pipelined writer instead (one thread
# submitting without waiting, every batch still fdatasync'ed before it counts): the run
# waits for the `write` section's two durable scenarios to pass, then counts 4 s of it.
# CHATLOG_CPU_SIZES (default "256 4096") picks the entry sizes.
set -eu
BASE=$1 NEW=$2
ROUNDS=${CHATLOG_CPU_ROUNDS:-3}
SCENARIO=${CHATLOG_CPU_SCENARIO:-append_durable}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
echo "| size | binary | entries/s | CPU ms (4 s) | CPU µs / 1,000 entries |"
echo "|---|---|---|---|---|"
r=0
while [ "$r" -lt "$ROUNDS" ]; do
  r=$((r + 1))
  for size in ${CHATLOG_CPU_SIZES:-256 4096}; do
    # Alternate which binary goes first: the second of a pair often meets a busier disk.
    if [ $((r % 2)) = 1 ]; then pair="$NEW $BASE"; else pair="$BASE $NEW"; fi
    for b in $pair; do
      CHATLOG_FIGURES_REPEATS=1 CHATLOG_FIGURES_SECS=6 CHATLOG_FIGURES_SIZES=$size \
        CHATLOG_FIGURES_ENGINES=chatlog "$b" write >"$OUT/run" 2>&1 &
      pid=$!
      if [ "$SCENARIO" = append_buffered ]; then
        while ! grep -q '^| append_durable_8w | chatlog' "$OUT/run"; do sleep 0.1; done
      fi
      sleep 1.5
      perf stat -x, -e task-clock -p "$pid" -- sleep 4 2>"$OUT/stat" >/dev/null
      while ! grep -q "^| $SCENARIO | chatlog" "$OUT/run"; do sleep 0.2; done
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
      rate=$(grep "^| $SCENARIO | chatlog" "$OUT/run" | cut -d'|' -f5 | tr -d ' ')
      ms=$(grep task-clock "$OUT/stat" | cut -d, -f1)
      awk -v s="$size" -v b="$(basename "$b")" -v rate="$rate" -v ms="$ms" \
        'BEGIN { printf "| %s | %s | %d | %.0f | %.1f |\n", s, b, rate, ms, ms * 1000 / (rate * 4) * 1000 }'
    done
  done
done
