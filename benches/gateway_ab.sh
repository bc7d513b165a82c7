#!/bin/sh
# A/B of the gateway figures: two builds of `gateway_figures`, run alternately (one
# repeat each per round), same host, same run; every line each prints, per round.
#
#   benches/gateway_ab.sh BASE_BINARY NEW_BINARY [ROUNDS]
#
# Build each binary with `cargo bench --bench gateway_figures --no-run` (in a checkout
# of each commit) and pass the printed executables. ROUNDS defaults to 3;
# CHATLOG_GW_SECS (default 4) is each column's measured time. Compare within a round
# (the host's load moves between rounds), then take medians (RESULTS.md, "Gateway
# (session 6)"); the CPU µs per post columns are the steadiest.
set -eu
BASE=$1 NEW=$2 ROUNDS=${3:-3}
export CHATLOG_GW_SECS=${CHATLOG_GW_SECS:-4} CHATLOG_GW_REPEATS=1
round=0
while [ "$round" -lt "$ROUNDS" ]; do
  for b in "$BASE" "$NEW"; do
    echo "### round=$round binary=$b $(date -u +%H:%M:%S) load=$(cut -d' ' -f1 /proc/loadavg)"
    "$b" --bench 2>&1 | grep -E '^run|^\|'
  done
  round=$((round + 1))
done
