#!/usr/bin/env bash
# The real-size device runs of results/realsize-device/README.md (this machine, 2 cores shared with other sessions).
set -euo pipefail
cd "$(dirname "$0")/../.."
# 1. one device, an idle edge that drafts (edge_sd possible): covspec (joins) against covspec_no_join (waits)
covspec bench --modes target_only,edge_sd,covspec,covspec_no_join --links loopback,wifi,4g --prompts 16 \
  --question-type describe --device-profile smolvlm-256m --out results/realsize-device/bench
# 2. an edge that does not draft (as a loaded edge declines to): the device's draft is what speeds the answer
covspec bench --modes target_only,covspec,covspec_no_join --links loopback,wifi,4g --prompts 16 \
  --question-type describe --device-profile smolvlm-256m --edge-draft none --out results/realsize-device/bench-no-edge-draft
# 3. a device whose prefill is short enough to join within a demo answer (Jetson Orin Nano GPU profile), the
# edge not drafting: the hand-over mid-answer
covspec bench --modes target_only,covspec,covspec_no_join --links loopback,wifi,4g --prompts 16 \
  --question-type describe --device-profile jetson-orin-nano-gpu --edge-draft none --out results/realsize-device/bench-jetson-no-edge-draft
