#!/usr/bin/env bash
# The capacity run (issue 33): goodput at the SLO and p99 latencies over wifi, replayed devices, at 1, 2, 4, 8, 16
# and 32 devices, 32 answers at each count (each of N devices asks ceil(32/N) prompts), four repeats at 1 and 2
# devices (where covspec and edge_sd are closest) and two at the others, every mode of a count back to back, the
# order of the modes reversed on every other repeat (load.md pools the repeats: a drift of the machine cancels).
# covspec_no_placement is the other side covspec must not lose to (devices always drafting). The edge offers to
# draft for covspec devices only while it holds at most OFFER unfinished sessions (--edge-draft-sessions; 1, the
# edge's default; results/capacity-draft-streams ran 4).
# The edge schedules its rounds by SCHEDULE (--edge-schedule: slo, the edge's default, or fifo, arrival order: the
# before of results/capacity/README.md).
# Usage: bash results/capacity/run.sh [OUT] [DEVICES] [ANSWERS] [OFFER] [SCHEDULE]
#        (defaults: results/capacity, 1,1,1,1,2,2,2,2,4,4,8,8,16,16,32,32, 32, 1, slo)
set -euo pipefail
OUT=${1:-results/capacity}
DEVICES=${2:-1,1,1,1,2,2,2,2,4,4,8,8,16,16,32,32}
ANSWERS=${3:-32}
OFFER=${4:-1}
SCHEDULE=${5:-slo}
covspec bench --devices "$DEVICES" --answers "$ANSWERS" --replay --edge-draft-sessions "$OFFER" --edge-schedule "$SCHEDULE" \
  --modes target_only,edge_sd,covspec,covspec_no_placement --load-link wifi --question-type describe \
  --slo ttft=500,tpot=25 --out "$OUT"
