#!/bin/sh
# A/B of the storage write figures: two builds of `storage_figures`, interleaved per entry
# size, same host, same run; then this build's I/O backends and segment preallocations.
#
#   benches/storage_ab.sh BASE_BINARY NEW_BINARY
#
# Build each binary with `cargo bench --bench storage_figures --features peers --no-run`
# (in a checkout of each commit) and pass the printed executables. Figures are markdown
# rows; compare ratios within one run only (see RESULTS.md).
# CHATLOG_AB_SIZES (default "256 64 4096") picks the entry sizes; CHATLOG_AB_EXTRAS=0 skips
# the backend and preallocation comparisons of the new binary at the end.
set -eu
BASE=$1 NEW=$2
export CHATLOG_FIGURES_REPEATS=${CHATLOG_FIGURES_REPEATS:-3} CHATLOG_FIGURES_SECS=${CHATLOG_FIGURES_SECS:-2}
export CHATLOG_FIGURES_ENGINES=${CHATLOG_FIGURES_ENGINES:-chatlog,chatlog-tokio,bound,bound-prealloc,raft-engine}
for size in ${CHATLOG_AB_SIZES:-256 64 4096}; do
  for b in "$NEW" "$BASE"; do
    echo "### binary=$b size=$size $(date -u +%H:%M:%S)"
    CHATLOG_FIGURES_SIZES=$size "$b" write | grep '^|'
  done
done
[ "${CHATLOG_AB_EXTRAS:-1}" = 0 ] && exit 0
for io in syscall uring; do
  echo "### new binary, io=$io"
  CHATLOG_FIGURES_IO=$io CHATLOG_FIGURES_SIZES=256 CHATLOG_FIGURES_ENGINES=chatlog,bound "$NEW" write | grep '^|'
done
echo "### new binary, preallocation"
CHATLOG_FIGURES_SIZES=256,4096 "$NEW" prealloc | grep '^|'
