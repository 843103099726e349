#!/usr/bin/env bash
# The measurement of results/remote-edge: an edge started on its own (`covspec edge serve`, here on this
# machine as its own process; on a GPU server in a deployment), then the bench against it from the device
# side: one device over no emulator and over 4g, then an open-loop load of 4 devices at 1, 2 and 4
# answers/s. Run from the repository root: bash results/remote-edge/run.sh
set -euo pipefail
out=results/remote-edge
target=$(python -c 'from covspec import demo; print(demo.default_target_path())')
draft=$(python -c 'from covspec import demo; print(demo.default_draft_path())')
# the edge's side
covspec edge serve --model "$target" --draft "$draft" --auth none --bind tcp://127.0.0.1:5601 --threads 1 \
    --metrics 127.0.0.1:9601 > $out/edge.log 2>&1 &
edge=$!
trap 'kill $edge; wait $edge || true' EXIT
python -c "from covspec.tools.procs import wait_for_edge; wait_for_edge('tcp://127.0.0.1:5601')"
# the device's side
covspec bench --edge tcp://127.0.0.1:5601 --edge-metrics 127.0.0.1:9601 --prompts-file $out/prompts/prompts.jsonl \
    --links direct,4g --modes target_only,edge_sd,covspec --out $out/bench
covspec bench --edge tcp://127.0.0.1:5601 --edge-metrics 127.0.0.1:9601 --prompts-file $out/prompts/prompts.jsonl \
    --devices 4 --rate 1,2,4 --replay --modes target_only,edge_sd,covspec --prompts 6 --out $out/load
