#!/usr/bin/env bash
# Issue 32's load run: 8 and 16 replayed devices at real-size device paces (the device profiles of
# device_runtime/profiles.json: a labelled emulation of each device's pace, not a measurement of it), over wifi,
# 32 answers at each count, every mode of a count back to back; goodput at the SLO and p99 TTFT per mode.
# Usage: bash results/realsize-device/run_load.sh [PROFILE ...]   (default: smolvlm-256m jetson-orin-nano-gpu)
set -euo pipefail
cd "$(dirname "$0")/../.."
profiles=("$@")
[ "${#profiles[@]}" -gt 0 ] || profiles=(smolvlm-256m jetson-orin-nano-gpu)
for p in "${profiles[@]}"; do
  covspec bench --devices 8,16 --answers 32 --replay --device-profile "$p" \
    --modes target_only,edge_sd,covspec --load-link wifi --question-type describe \
    --slo ttft=500,tpot=25 --out "results/realsize-device/load-$p"
done
