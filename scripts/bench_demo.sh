#!/usr/bin/env bash
# Reproduces the committed figures in results/ on the demo pair (the machine should be otherwise idle;
# about 25 minutes on 2 cores). Each step writes its own folder with summary.md and the command.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
covspec demo build
D=covspec/demo/weights/draft
T=covspec/demo/weights/target
# lossless greedy on 50 held-out prompts (mixed question types), loopback
covspec bench --links loopback --modes target_only,vanilla_sd,covspec --prompts 50 --out results/lossless
# throughput per link profile and mode, long answers ("describe the image"), ablations side by side
covspec bench --links loopback,wifi,4g,weak --question-type describe --prompts 8 \
  --modes target_only,draft_only,vanilla_sd@2,vanilla_sd@4,vanilla_sd@8,covspec,covspec_no_prune,covspec_no_adaptive,covspec_no_branch \
  --out results/bench-describe
# sampling: bytes per token of full-distribution upload vs decoupled verification
covspec bench --links loopback --question-type describe --prompts 8 --temperature 1 --top-p 0.9 --seed 1 \
  --modes target_only,vanilla_sd,covspec,covspec_no_decoupled --out results/bench-sampling
# pruning: draft accuracy per method and keep ratio
mkdir -p results/prune
python -m covspec.prune_eval --draft "$D" --target "$T" --limit 60 --ratios 0.1 0.25 0.5 1.0 --json results/prune/sweep.json
# load: N devices against one edge (replayed draft windows), batched verification
covspec bench --devices 1,2,4,8,16 --replay --modes target_only,covspec --prompts 4 --question-type describe --out results/load
