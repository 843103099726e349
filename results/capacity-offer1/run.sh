#!/usr/bin/env bash
# covspec's hand-over point moved (issue 33): the bench's own edge offers to draft only while it holds at most 1
# unfinished session (--edge-draft-sessions 1; default 4), at the counts where the default hands over (1, 2, 4;
# 4 twice), against edge_sd and covspec_no_placement, every mode of a count back to back.
set -euo pipefail
OUT=${1:-results/capacity-offer1}
covspec bench --devices 1,2,4,4 --answers 32 --replay --edge-draft-sessions 1 \
  --modes target_only,edge_sd,covspec,covspec_no_placement --load-link wifi --question-type describe \
  --slo ttft=500,tpot=25 --out "$OUT"
