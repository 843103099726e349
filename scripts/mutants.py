"""Fault injection into the code, to check the default test run catches a broken device (scripts/mutants.sh).

Each mutant is one realistic fault: a line of the source replaced. One at a time it is applied in the
working tree, the default-run tests that cover the device path run (`-m "not slow"`, stopping at the first
failure), and the source is restored. A mutant is caught when a test fails; the table names the first one.

    bash scripts/mutants.sh                  # every mutant, the table to results/mutants/table.md
    bash scripts/mutants.sh bundle_noise     # only the ones named
    bash scripts/mutants.sh --list

Greedy answers stay the target's whatever the draft does, so most of these faults leave every answer
right: the tests that catch them check the draft itself (tests/draft_checks.py) and the sampled
distributions (chi-square).
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the default-run tests that exercise the device's draft, verification and sampling, fastest-failing first
TESTS = ["tests/scenarios/test_headline_paths.py", "tests/device/test_device_correction.py",
         "tests/scenarios/test_wire_sampling.py", "tests/core/test_lossless_sampling.py",
         "tests/device/test_device_answer.py", "tests/core/test_speculative.py", "tests/device/test_placement.py"]


@dataclass(frozen=True)
class Mutant:
    name: str
    kind: str  # the kind of fault
    path: str
    old: str  # exact text replaced (must occur once)
    new: str


MUTANTS = [
    Mutant("bundle_noise", "noisy logits in the bundle path (N(0, 1) on every logit)", "covspec/bundles/adapter.py",
           "            chunks.append(logits[0])  # [k, V]",
           "            chunks.append(logits[0] + np.random.default_rng().normal(0, 1.0, logits[0].shape).astype(np.float32))"),
    Mutant("bundle_shift", "logits shifted by one position (a row late)", "covspec/bundles/adapter.py",
           "        return np.concatenate(chunks).astype(np.float32, copy=False)",
           "        out = np.concatenate(chunks).astype(np.float32, copy=False)\n"
           "        return np.concatenate([out[:1], out[:-1]])"),
    Mutant("onnx_scaled", "logits scaled (x0.8) in the ONNX program path only", "covspec/bundles/programs.py",
           "        logits, new_cache = self._decoder.run(None, feeds)\n        return logits, new_cache",
           "        logits, new_cache = self._decoder.run(None, feeds)\n        return logits * 0.8, new_cache"),
    Mutant("bundle_position", "off-by-one RoPE position when decoding", "covspec/bundles/adapter.py",
           "positions = self.rules.step_positions(state.length, state.extra, k)",
           "positions = self.rules.step_positions(state.length + 1, state.extra, k)"),
    Mutant("bundle_slot", "off-by-one cache slot written by the decoder", "covspec/bundles/adapter.py",
           "c(is_image[None, start:end]), c(positions[..., start:end]), state.length)",
           "c(is_image[None, start:end]), c(positions[..., start:end]), state.length + 1)"),
    Mutant("stale_kv_rollback", "a stale KV slot left after a rejection's rollback", "covspec/drafter.py",
           "        self.adapter.truncate(self.state, self.prompt_length + self.fed)\n        if next_token_id",
           "        self.adapter.truncate(self.state, self.prompt_length + self.fed + (accepted < fed_drafts))\n"
           "        if next_token_id"),
    Mutant("bundle_truncate", "the bundle's rollback ignored (cache length never moves back)", "covspec/bundles/adapter.py",
           "        state.length = length  # slots from `length` on are overwritten by the next forward",
           "        pass"),
    Mutant("correction_dropped", "the edge's correction token dropped after a rejection",
           "device_runtime/speculation.py",
           "            self.drafting.commit(drafted, result.accepted, next_token)",
           "            self.drafting.commit(drafted, result.accepted,\n"
           "                                next_token if result.accepted == len(drafted) else None)"),
    Mutant("residual_edge_p", "the edge's residual drawn from p instead of norm(max(0, p - q))",
           "covspec/speculative.py", "    r = (p - q).clamp_min(0.0)", "    r = p.clone()"),
    Mutant("residual_device_p", "the device's decoupled correction drawn from p, not the residual",
           "covspec/sampling.py", "    r = np.maximum(p - np.asarray(q, dtype=np.float32)[ids], 0.0)  # [m]",
           "    r = p.copy()  # [m]"),
    Mutant("residual_device_q_row", "the device's correction uses q of the wrong position",
           "device_runtime/speculation.py", "            q = pad_vocab(drafted.q[result.accepted], self.vocab)",
           "            q = pad_vocab(drafted.q[max(result.accepted - 1, 0)], self.vocab)"),
    Mutant("accept_ratio_flipped", "acceptance test min(1, q/p) instead of min(1, p/q)", "covspec/speculative.py",
           "    ratio = (p_draft / q_draft.clamp_min(1e-30)).clamp(max=1.0)  # [k]",
           "    ratio = (q_draft / p_draft.clamp_min(1e-30)).clamp(max=1.0)  # [k]"),
]


def first_failure(output: str) -> str:
    found = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.M)
    return found[0] if found else ""


def run_one(mutant: Mutant, tests: list[str], timeout_s: float) -> dict:
    path = ROOT / mutant.path
    original = path.read_text()
    if original.count(mutant.old) != 1:
        return {"name": mutant.name, "status": "NOT APPLIED (its line is not in the source once)", "test": "", "s": 0}
    path.write_text(original.replace(mutant.old, mutant.new))
    start = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider",
                               "-p", "no:warnings", "-rfE", *tests], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout_s)
        failed = first_failure(done.stdout)
        status = "caught" if done.returncode != 0 and failed else (
            "MISSED" if done.returncode == 0 else f"error (rc {done.returncode})")
    except subprocess.TimeoutExpired:
        failed, status = "", "timed out"
    finally:
        path.write_text(original)
    return {"name": mutant.name, "status": status, "test": failed, "s": round(time.monotonic() - start)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="mutants to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--tests", nargs="+", default=TESTS, help="default-run test files to run on each mutant")
    p.add_argument("--timeout-s", type=float, default=900)
    p.add_argument("--out", default="results/mutants/table.md")
    args = p.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:24} {m.path:32} {m.kind}")
        return 0
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        p.error(f"unknown mutants {sorted(unknown)} (see --list)")
    dirty = subprocess.run(["git", "status", "--porcelain", *{m.path for m in MUTANTS}], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    if dirty:
        p.error(f"commit or stash these first (a mutant is applied to them and they are restored from memory):\n{dirty}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # finally-blocks restore the source
    rows = []
    for mutant in (m for m in MUTANTS if not args.names or m.name in args.names):
        row = run_one(mutant, args.tests, args.timeout_s)
        rows.append({**row, "kind": mutant.kind, "path": mutant.path})
        print(f"{row['name']:24} {row['status']:8} {row['s']:4d} s  {row['test']}", flush=True)
    lines = ["| fault | mutant | file | result | first default-run test that failed | s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['name']} | {r['path']} | {r['status']} | `{r['test']}` | {r['s']} |" for r in rows]
    table = "\n".join(lines) + "\n"
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"`bash scripts/mutants.sh {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n{table}")
    print(table)
    return 0 if all(r["status"] == "caught" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
