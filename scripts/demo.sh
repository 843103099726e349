#!/usr/bin/env bash
# The main job on the embedded default, in a few minutes: the demo draft/target pair (shipped weights
# checked against their manifest, or trained from the seed); the draft exported to an int8 device
# bundle and the target to an edge bundle (cached in runs/demo-export); then an edge process on the
# edge bundle answers held-out "describe" questions for a device process running the exported draft,
# over loopback and an emulated 4g link, in target_only (the edge alone) and covspec (speculative
# decoding): each answer, whether it is the target's own, a short table and the plots.
# Extra arguments go to `covspec bench` (e.g. --prompts 8 --links loopback,wifi,4g).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
weights=covspec/demo/weights
covspec demo build
covspec export --draft "$weights/draft" --target "$weights/target" --out runs/demo-export --quant int8 --reuse
covspec bench --bundle runs/demo-export/device --target runs/demo-export/edge \
  --links loopback,4g --modes target_only,covspec --question-type describe --prompts 4 \
  --show-answers --out runs/demo-bench "$@"
