#!/usr/bin/env bash
# The capacity run (issue 33): goodput at the SLO and p99 latencies over wifi, replayed devices, at 1, 2, 4, 8, 16
# and 32 devices, 32 answers at each count (each of N devices asks ceil(32/N) prompts), two repeats at 4 and 8
# (where the edge stops offering to draft: EdgeSettings.draft_sessions = 4). covspec_no_placement is the other
# side covspec must not lose to (devices always drafting).
# Usage: bash results/capacity-offer4/run.sh [OUT] [DEVICES] [ANSWERS]   (defaults: results/capacity-offer4, the full run, 32)
# The edge at its default drafting offer (--draft-sessions 4): the run before the hand-over moved (results/capacity).
set -euo pipefail
OUT=${1:-results/capacity-offer4}
DEVICES=${2:-1,2,4,4,8,8,16,32}
ANSWERS=${3:-32}
covspec bench --devices "$DEVICES" --answers "$ANSWERS" --replay \
  --modes target_only,edge_sd,covspec,covspec_no_placement --load-link wifi --question-type describe \
  --slo ttft=500,tpot=25 --out "$OUT"
