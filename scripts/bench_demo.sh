#!/usr/bin/env bash
# Reproduces the committed figures in results/ on the demo pair (the machine should be otherwise idle;
# about 20 minutes on 2 cores). Each step writes its own folder with summary.md and the command.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
covspec demo build
D=covspec/demo/weights/draft
T=covspec/demo/weights/target
# the pair itself: held-out accuracy per type, draft agreement, both decode steps
python -m covspec.demo.report --limit 1000 --agreement 60 --json results/demo/measure.json
# lossless greedy on 50 held-out prompts (mixed question types), loopback
covspec bench --links loopback --modes target_only,vanilla_sd,covspec --prompts 50 --question-type mixed --out results/lossless
# throughput per link profile and mode, long answers ("describe the image"), ablations side by side
covspec bench --links loopback,wifi,4g,weak --question-type describe --prompts 16 \
  --modes target_only,draft_only,vanilla_sd@2,vanilla_sd@4,vanilla_sd@8,covspec,covspec_no_prune,covspec_no_adaptive,covspec_no_branch,covspec_no_ahead \
  --out results/bench-describe
# edge_sd (the edge drafts itself) beside covspec with placement and every ablation, paired comparison
covspec bench --modes target_only,vanilla_sd@8,edge_sd,covspec,covspec_no_prune,covspec_no_adaptive,covspec_no_branch,covspec_no_ahead,covspec_no_placement \
  --links loopback,wifi,4g,weak --prompts 16 --question-type describe --out results/bench-edge-sd
python -m benchmarks.paired results/bench-edge-sd --a covspec --b edge_sd
# sampling: bytes per token of full-distribution upload vs decoupled verification
covspec bench --links loopback --question-type describe --prompts 8 --temperature 1 --top-p 0.9 --seed 1 \
  --modes target_only,vanilla_sd,covspec,covspec_no_decoupled --out results/bench-sampling
# pruning: draft accuracy per method and keep ratio
mkdir -p results/prune
python -m benchmarks.prune_eval --draft "$D" --target "$T" --limit 300 --ratios 0.1 0.25 0.5 0.75 1.0 --json results/prune/sweep.json
# the pruning study's fine-patch draft (144 visual tokens, merging), and its end-to-end cost
python -m benchmarks.prune_eval --draft covspec/demo/weights/draft_fine --target "$T" --limit 300 \
  --ratios 0.1 0.25 0.5 0.75 1.0 --merge --json results/prune-fine/sweep.json
covspec bench --draft covspec/demo/weights/draft_fine --links loopback,wifi --question-type describe --prompts 16 \
  --modes target_only,vanilla_sd@8,covspec,covspec_no_prune --keep 0.25 --merge --out results/bench-fine
# what pruning saves the draft's prefill, selection included
python -m benchmarks.prefill_cost --draft "$D" --reps 50 --json results/prefill/draft.json
python -m benchmarks.prefill_cost --draft covspec/demo/weights/draft_fine --merge --reps 50 --json results/prefill/draft_fine.json
python -m benchmarks.prefill_cost --shape qwen2-0.5b --tokens 576 --reps 10 --threads 2 --json results/prefill/qwen2-0.5b-576.json
# ... and on the exported int8 bundles the device runs (ExecuTorch and ONNX Runtime)
covspec export --draft "$D" --target "$T" --out runs/export-int8 --quant int8
covspec export --draft covspec/demo/weights/draft_fine --target "$T" --out runs/export-fine-int8 --quant int8 --edge-backend pytorch
for backend in executorch onnx; do
  tag=$([ "$backend" = executorch ] && echo pte || echo onnx)
  python -m benchmarks.prefill_cost --bundle runs/export-int8/device --backend "$backend" --reps 50 \
    --json "results/prefill/draft-$tag-int8.json"
  python -m benchmarks.prefill_cost --bundle runs/export-fine-int8/device --backend "$backend" --merge --reps 50 \
    --json "results/prefill/draft_fine-$tag-int8.json"
done
# load: N devices against one edge (replayed draft windows), batched verification
covspec bench --devices 1,2,4,8,16 --replay --modes target_only,covspec --prompts 8 --question-type describe --out results/load
# export: fp32 and int8 device bundles (ExecuTorch + ONNX), then the backends side by side on 50 prompts
covspec export --draft "$D" --target "$T" --out runs/export-fp32 --quant none
python -m covspec.calibration.backends --draft "$D" --items 50 --out results/export \
  --bundle "pte fp32=runs/export-fp32/device:executorch" --bundle "pte int8=runs/export-int8/device:executorch" \
  --bundle "onnx fp32=runs/export-fp32/device:onnx" --bundle "onnx int8=runs/export-int8/device:onnx"
# calibration profile: the int8 bundle's backends against an edge serving the exported edge bundle
covspec edge serve --model runs/export-int8/edge --bind tcp://127.0.0.1:5591 --auth none --threads 1 &
edge=$!
sleep 10
covspec calibrate --edge tcp://127.0.0.1:5591 --draft "$D" --bundle runs/export-int8/device --out results/calibration/profile.json
kill $edge; wait $edge || true  # SIGTERM: a background job ignores SIGINT
# fuzz: 100,000 messages to the decoder, 50,000 to a running edge
covspec fuzz --decoder 100000 --edge 50000 --out results/fuzz
# load through an emulated wifi link per device
covspec bench --devices 1,2,4,8,16 --replay --modes target_only,covspec --prompts 16 --question-type describe --load-link wifi --out results/load-wifi
