#!/usr/bin/env bash
# The edge's two schedules side by side (issue 33): REPS rounds of (fifo, slo), each a bench run of its own over
# DEVICES (edge_sd and covspec, replayed over wifi, 32 answers a count), so that both schedules share the same
# minutes of the machine. Usage: bash results/capacity-schedule-ab/run.sh [OUT] [DEVICES] [REPS]
#        (defaults: results/capacity-schedule-ab, 8,16,32, 2)
set -euo pipefail
OUT=${1:-results/capacity-schedule-ab}
DEVICES=${2:-8,16,32}
REPS=${3:-2}
for r in $(seq 1 "$REPS"); do
  for schedule in fifo slo; do
    covspec bench --devices "$DEVICES" --answers 32 --replay --edge-draft-sessions 1 --modes edge_sd,covspec \
      --load-link wifi --question-type describe --slo ttft=500,tpot=25 --edge-schedule "$schedule" --out "$OUT/$schedule-$r"
  done
done
