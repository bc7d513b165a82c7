#!/bin/sh
# Chatlog as a share of `bound` for one write scenario, two builds of `storage_figures`
# interleaved round by round: each run measures chatlog and then `bound` seconds apart in
# one process, so the ratio survives a shared host's drift better than absolute figures
# (which moved 2x between passes minutes apart in session 8). Session 8 used it with the
# data on tmpfs (`CHATLOG_BENCH_DIR=/dev/shm/...`: fdatasync is then free, so the ratio
# shows the engine's own cost per batch against bound's) and on the disk.
#
#   benches/storage_ratio_ab.sh BASE_BINARY NEW_BINARY
#
# CHATLOG_RATIO_ROUNDS (default 5) rounds; CHATLOG_RATIO_SIZE (default 256) entry bytes;
# CHATLOG_RATIO_SCENARIO (default append_durable; or append_durable_8w) the scenario;
# CHATLOG_RATIO_SECS (default 2) seconds per run. Prints one row per run:
# `| round | binary | chatlog entries/s | bound entries/s | chatlog / bound | sync µs |`;
# take the median ratio per binary.
set -eu
BASE=$1 NEW=$2
ROUNDS=${CHATLOG_RATIO_ROUNDS:-5}
SIZE=${CHATLOG_RATIO_SIZE:-256}
SC=${CHATLOG_RATIO_SCENARIO:-append_durable}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
echo "| round | binary | chatlog entries/s | bound entries/s | chatlog / bound | sync µs |"
echo "|---|---|---|---|---|---|"
r=0
while [ "$r" -lt "$ROUNDS" ]; do
  r=$((r + 1))
  # Alternate which binary goes first.
  if [ $((r % 2)) = 1 ]; then pair="$NEW $BASE"; else pair="$BASE $NEW"; fi
  for b in $pair; do
    # Removed first: the check below must not read the previous run's rows.
    rm -f "$OUT/run"
    CHATLOG_FIGURES_REPEATS=1 CHATLOG_FIGURES_SECS=${CHATLOG_RATIO_SECS:-2} \
      CHATLOG_FIGURES_SIZES=$SIZE CHATLOG_FIGURES_ENGINES=chatlog,bound \
      "$b" write >"$OUT/run" 2>&1 &
    pid=$!
    while ! grep -qs "^| $SC | bound " "$OUT/run"; do
      kill -0 "$pid" 2>/dev/null || { cat "$OUT/run" >&2; exit 1; }
      sleep 0.2
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    c=$(grep "^| $SC | chatlog " "$OUT/run" | cut -d'|' -f5 | tr -d ' ')
    s=$(grep "^| $SC | chatlog " "$OUT/run" | cut -d'|' -f12 | tr -d ' ')
    k=$(grep "^| $SC | bound " "$OUT/run" | cut -d'|' -f5 | tr -d ' ')
    awk -v r="$r" -v b="$(basename "$b")" -v c="$c" -v k="$k" -v s="$s" \
      'BEGIN { printf "| %d | %s | %d | %d | %.0f%% | %s |\n", r, b, c, k, 100 * c / k, s }'
  done
done
