"""A capacity plan on paper for one GPU edge (docs/capacity.md): how many devices, each always mid-answer,
one H100-class edge serves for a 7B-class target within a per-token latency SLO, for target_only,
edge_sd and covspec, and with replicas. A model of means, with every input labelled measured (on this
machine, results/...) or assumed (published figures, or a guess said as such). No GPU was used.

    python scripts/capacity_plan.py --out results/capacity-plan/plan.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Edge:
    """One target pass of b sessions and n tokens in all: T(b, n) = weights + n * per_token + b * kv_per_session."""

    params_b: float = 6.74  # the 7B-class language model (LLaMA-2-7B / Vicuna-7B, LLaVA-1.5-7B's): published
    bytes_per_param: float = 2.0  # bfloat16
    bandwidth_tbs: float = 3.35  # H100 SXM HBM3, NVIDIA's datasheet: published
    bandwidth_use: float = 0.7  # share of it a decode pass reaches: assumed
    tflops: float = 989.0  # H100 SXM dense bf16 tensor: published
    mfu: float = 0.5  # share of it a pass over many tokens reaches: assumed
    layers: int = 32
    hidden: int = 4096  # LLaMA-2-7B: no grouped KV heads, so K+V is 2 * 32 * 4096 values a token
    context: int = 700  # tokens a session attends to: 576 visual (LLaVA-1.5) + ~60 prompt + half an answer: assumed
    draft_step_ms: float = 1.5  # edge_sd: one step of the draft on the GPU, eager (launch-bound): assumed
    draft_params_b: float = 0.26  # a SmolVLM-256M-class draft (its per-token compute in a batched step)
    draft_layers: int = 30  # SmolVLM-256M's text model: 30 layers, 3 KV heads of 64 (its KV cache per token)
    draft_kv_dim: int = 192

    def draft_step_ms_for(self, sessions: float) -> float:
        """One batched step of the edge's draft for `sessions` sessions (edge_sd)."""
        per_token = 2 * self.draft_params_b * 1e9 / (self.tflops * 1e12 * self.mfu) * 1e3
        kv = 2 * self.draft_layers * self.draft_kv_dim * self.bytes_per_param * self.context
        kv_ms = kv / (self.bandwidth_tbs * 1e12 * self.bandwidth_use) * 1e3
        return self.draft_step_ms + sessions * (per_token + kv_ms)

    def weights_ms(self) -> float:
        return self.params_b * 1e9 * self.bytes_per_param / (self.bandwidth_tbs * 1e12 * self.bandwidth_use) * 1e3

    def token_ms(self) -> float:
        return 2 * self.params_b * 1e9 / (self.tflops * 1e12 * self.mfu) * 1e3

    def kv_ms(self, context: int | None = None) -> float:
        """Reading one session's KV cache in a pass."""
        kv_bytes = 2 * self.layers * self.hidden * self.bytes_per_param * (self.context if context is None else context)
        return kv_bytes / (self.bandwidth_tbs * 1e12 * self.bandwidth_use) * 1e3

    def pass_ms(self, sessions: float, tokens: float, context: int | None = None) -> float:
        return self.weights_ms() + tokens * self.token_ms() + sessions * self.kv_ms(context)


@dataclass(frozen=True)
class Devices:
    k: int = 4  # drafted tokens per window (the plan takes the best of 1..8 for each mode and load)
    accept_device: float = 0.72  # per-token acceptance of the device's draft (visual tokens pruned): assumed
    accept_edge: float = 0.75  # of the same draft on the edge (all visual tokens): assumed
    step_ms: float = 10.0  # device draft step, Jetson-class (SmolVLM-256M int8 .pte: 7.4 ms on one x86 core here)
    rtt_ms: float = 10.0  # the link emulator's wifi profile (transport/link.py)
    answer_tokens: int = 128  # assumed: a short description


@dataclass(frozen=True)
class Slo:
    tpot_ms: float = 50.0  # p99 per-token latency target (20 tokens/s a device): assumed
    headroom: float = 0.7  # a mean this far under the p99 target: assumed


def tokens_per_round(accept: float, k: int) -> float:
    """Expected tokens a verify round commits: accepted drafts + the target's own (i.i.d. acceptance)."""
    return (1 - accept ** (k + 1)) / (1 - accept)


def tpot_ms(mode: str, n: int, edge: Edge, dev: Devices) -> float:
    """Mean per-token latency with n devices, each always mid-answer, served by one edge; the speculative
    modes at their best window (the device's cost model picks it: K_RANGE)."""
    if mode == "target_only":  # one decode pass for every session, a token each
        return edge.pass_ms(n, n)
    if mode == "covspec_placed":  # drafting placed where it is faster at this load (the goal of placement)
        return min(tpot_ms("edge_sd", n, edge, dev), tpot_ms("covspec", n, edge, dev))
    return min(_spec_tpot_ms(mode, n, edge, replace(dev, k=k)) for k in K_RANGE)


K_RANGE = range(1, 9)


def _spec_tpot_ms(mode: str, n: int, edge: Edge, dev: Devices) -> float:
    k = dev.k
    if mode == "edge_sd":  # the edge drafts k steps and verifies k+1 tokens a session, every round
        rnd = k * edge.draft_step_ms_for(n) + edge.pass_ms(n, n * (k + 1))
        return rnd / tokens_per_round(dev.accept_edge, k)
    if mode == "covspec":  # devices draft; the edge verifies groups of sessions while the others draft
        best = float("inf")
        for groups in (1, 2, 3, 4):
            m = n / groups
            verify = edge.pass_ms(m, m * (k + 1))
            cycle = max(groups * verify, k * dev.step_ms + dev.rtt_ms + verify)
            best = min(best, cycle)
        return best / tokens_per_round(dev.accept_device, k)
    raise ValueError(mode)


def capacity(mode: str, edge: Edge, dev: Devices, slo: Slo) -> dict:
    """The most devices whose mean TPOT stays within slo.tpot_ms * slo.headroom, and what they get."""
    limit = slo.tpot_ms * slo.headroom
    n = 0
    while n < 4096 and tpot_ms(mode, n + 1, edge, dev) <= limit:
        n += 1
    t = tpot_ms(mode, max(n, 1), edge, dev)
    return {"devices": n, "tpot_ms": round(t, 2), "tokens_per_s": round(n * 1000 / t, 0) if n else 0.0,
            "tpot_1_device_ms": round(tpot_ms(mode, 1, edge, dev), 2)}


def published_check(edge: Edge) -> list[dict]:
    """The pass model against TensorRT-LLM's published H100 FP8 LLaMA-7B figures (docs/source/performance.md,
    v0.5/v0.6.1): FP8 halves weight, KV and per-token cost."""
    fp8 = replace(edge, bytes_per_param=1.0, tflops=2 * edge.tflops)
    rows = []
    for prompt, published in ((128, 7.0), (2048, 36.0)):  # batch 1, first-token latency, ms
        rows.append({"what": f"first token, batch 1, {prompt} prompt tokens (ms)", "published": published,
                     "model": round(fp8.pass_ms(1, prompt, context=prompt), 1)})
    batch, context = 768, 192  # 128 in / 128 out: mean context over the decode
    t = fp8.pass_ms(batch, batch, context=context)
    rows.append({"what": "output tokens/s, batch 768, 128 in / 128 out", "published": 19694,
                 "model": round(batch * 1000 / t)})
    return rows


def plan(edge: Edge, dev: Devices, slo: Slo) -> dict:
    modes = ("target_only", "edge_sd", "covspec", "covspec_placed")
    curves = {m: [{"devices": n, "tpot_ms": round(tpot_ms(m, n, edge, dev), 2)} for n in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
              for m in modes}
    caps = {m: capacity(m, edge, dev, slo) for m in modes}
    sensitivity = []
    for name, e, d in (("as planned", edge, dev),
                       ("equal acceptance 0.75 (pruning costs the device's draft nothing)", edge,
                        replace(dev, accept_device=0.75)),
                       ("acceptance 0.6 (device) / 0.65 (edge)", edge, replace(dev, accept_device=0.6, accept_edge=0.65)),
                       ("acceptance 0.85 / 0.87", edge, replace(dev, accept_device=0.85, accept_edge=0.87)),
                       ("edge draft step 0.4 ms (CUDA graphs)", replace(edge, draft_step_ms=0.4), dev),
                       ("the edge's draft 1B-class (step 3 ms, 24 layers, KV 256; devices keep theirs)",
                        replace(edge, draft_params_b=1.0, draft_step_ms=3.0, draft_layers=24, draft_kv_dim=256), dev),
                       ("SLO 100 ms a token", edge, dev),
                       ("device step 25 ms (a phone's slower core)", edge, replace(dev, step_ms=25.0)),
                       ("link rtt 60 ms (4g profile)", edge, replace(dev, rtt_ms=60.0)),
                       ("H100 PCIe (2.0 TB/s, 756 TFLOPS)", replace(edge, bandwidth_tbs=2.0, tflops=756.0), dev)):
        row = {"case": name}
        case_slo = replace(slo, tpot_ms=100.0) if name.startswith("SLO 100") else slo
        for m in modes:
            row[m] = capacity(m, e, d, case_slo)["devices"]
        sensitivity.append(row)
    replicas = [{"replicas": r, **{m: r * caps[m]["devices"] for m in modes},
                 **{f"{m}_n_plus_1": (r - 1) * caps[m]["devices"] for m in modes}} for r in (1, 2, 3, 4, 8)]
    return {"inputs": {"edge": asdict(edge), "devices": asdict(dev), "slo": asdict(slo)},
            "derived": {"weights_ms": round(edge.weights_ms(), 3), "token_ms": round(edge.token_ms(), 4),
                        "kv_ms_per_session": round(edge.kv_ms(), 3),
                        "tokens_per_round_device": round(tokens_per_round(dev.accept_device, dev.k), 3),
                        "tokens_per_round_edge": round(tokens_per_round(dev.accept_edge, dev.k), 3)},
            "published_check": published_check(edge), "capacity": caps, "curves": curves,
            "sensitivity": sensitivity, "replicas": replicas}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/capacity-plan/plan.json"))
    parser.add_argument("--tpot-ms", type=float, default=Slo.tpot_ms, help="per-token latency SLO (p99), ms")
    args = parser.parse_args()
    result = plan(Edge(), Devices(), Slo(tpot_ms=args.tpot_ms))
    result["command"] = f"python scripts/capacity_plan.py --out {args.out}" + (
        "" if args.tpot_ms == Slo.tpot_ms else f" --tpot-ms {args.tpot_ms:g}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("derived", "published_check", "capacity", "sensitivity", "replicas")},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
