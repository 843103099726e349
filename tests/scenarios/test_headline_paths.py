"""Fast forms of the headline paths, in every CI run, each checking the draft itself (tests/draft_checks.py),
not only the answers (greedy verification gives the target's answer whatever the draft does):

- the demo pair's exported draft (fp32 .pte and ONNX, exported once per session: conftest.demo_bundle)
  gives its eager self's logits along the target's answers (max difference, greedy agreement), and after
  a rollback or a fork the same logits again;
- a device on that bundle answers through a real edge (ZeroMQ on loopback, the demo target) as
  target_only, and accepts in every round what the eager draft accepts on the same prompts (vanilla_sd
  and covspec without pruning: fixed and adaptive windows, branches, windows sent ahead);
- the same in a process that cannot import torch, transformers or executorch's Python package (an
  import hook refuses them): the .pte on the native shim (device_runtime/et_native) and the ONNX
  programs on ONNX Runtime;
- the native shim against ExecuTorch's Python bindings on the demo model.pte: a prefill and 16 decode
  steps, then a rollback, logits within 1e-4.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from draft_checks import assert_logits_agree, assert_rounds_match, teacher_forced

from covspec.sampling import SamplingParams

N_ITEMS = 6
MAX_NEW = 40
WINDOW = 4
# greedy, no pruning: rounds comparable with the eager draft (vanilla_sd: fixed windows, every answer
# drafted to its end; covspec_no_prune: adaptive, its rounds checked however many it drafted)
CHECKED_MODES = ("vanilla_sd", "covspec_no_prune")


def requests() -> list[tuple[bytes, str]]:
    """Held-out demo items: describe questions (long answers: many rounds) and short ones."""
    from covspec.demo.task import make_item
    from covspec.images import png_bytes

    items = [make_item("heldout", i, 0, qtype="describe" if i % 3 else None) for i in range(N_ITEMS)]
    return [(png_bytes(item.image), item.question) for item in items]


@pytest.fixture(scope="module")
def edge():
    from test_runtimes import RunningEdge

    from covspec.demo import default_target_path

    running = RunningEdge(default_target_path())
    yield running
    running.close()


@pytest.fixture(scope="module")
def eager_draft():
    from covspec.demo import default_draft_path
    from covspec.models import load_adapter

    return load_adapter(default_draft_path())


@pytest.fixture(scope="module")
def reference(edge, eager_draft) -> dict:
    """target_only's answers through the edge, and the eager draft's logits along each."""
    from covspec.device_runtime.client import DeviceRuntime

    device = DeviceRuntime(eager_draft, edge.endpoint, timeout_s=30)
    try:
        answers = [device.answer(image, prompt, "target_only", SamplingParams(), max_new_tokens=MAX_NEW).ids
                   for image, prompt in requests()]
    finally:
        device.close()
    logits = [teacher_forced(eager_draft, image, prompt, ids) for (image, prompt), ids in zip(requests(), answers,
                                                                                                 strict=True)]
    return {"answers": answers, "logits": logits, "eos": set(eager_draft.eos_token_ids)}


@pytest.mark.parametrize("backend", ["executorch", "onnx"])
def test_the_exported_draft_gives_its_eager_logits_then_again_after_rollback_and_fork(demo_bundle, reference,
                                                                                       backend) -> None:
    from covspec.bundles.adapter import BundleAdapter

    bundle = BundleAdapter(demo_bundle, backend=backend)
    worst = {"max_abs_diff": 0.0, "greedy_agreement": 1.0}
    for (image, prompt), ids, want in zip(requests(), reference["answers"], reference["logits"], strict=True):
        got = teacher_forced(bundle, image, prompt, ids)
        found = assert_logits_agree(got, want, atol=1e-3, label=f"{backend} {prompt!r}")
        worst = {"max_abs_diff": max(worst["max_abs_diff"], found["max_abs_diff"]),
                 "greedy_agreement": min(worst["greedy_agreement"], found["greedy_agreement"])}
    print(f"{backend}: exported draft vs eager along {N_ITEMS} answers: {worst}")
    # rollback: 12 tokens, back to 5, then 12 others from there: the rows of the one-pass logits again
    (image, prompt), ids, want = requests()[1], reference["answers"][1], reference["logits"][1]
    assert len(ids) >= 20
    from covspec.images import load_image

    visual = bundle.encode_image(bundle.preprocess(load_image(image)))
    _, state = bundle.prefill(visual, prompt)
    base = state.length
    bundle.forward(state, np.asarray(ids[:12]))
    bundle.truncate(state, base + 5)
    np.testing.assert_allclose(bundle.forward(state, np.asarray(ids[5:17])), want[5:17], atol=1e-3)
    # fork at 17: the branch writes other tokens; the trunk's next logits are unchanged
    branch = bundle.fork_state(state)
    bundle.forward(branch, np.asarray([ids[3], ids[2], ids[1]]))
    np.testing.assert_allclose(bundle.forward(state, np.asarray(ids[17:20])), want[17:20], atol=1e-3)


def _device_rounds(draft, endpoint: str, modes: tuple[str, ...]) -> dict:
    from covspec.device_runtime.client import DeviceRuntime

    device = DeviceRuntime(draft, endpoint, timeout_s=30)
    out: dict = {}
    try:
        for mode in modes:
            answers = [device.answer(image, prompt, mode, SamplingParams(), max_new_tokens=MAX_NEW, window=WINDOW)
                       for image, prompt in requests()]
            out[mode] = {"ids": [a.ids for a in answers],
                         "rounds": [[{"drafted": r.drafted, "accepted": r.accepted} for r in a.rounds] for a in answers]}
    finally:
        device.close()
    return out


def check_device(found: dict, reference: dict, label: str) -> None:
    """Every answer is target_only's, and every checked mode's rounds accept what the eager draft does."""
    for mode, got in found.items():
        assert got["ids"] == reference["answers"], f"{label} {mode}: answers differ from target_only's"
        if mode in CHECKED_MODES:
            keys = range(N_ITEMS)
            summary = assert_rounds_match(dict(zip(keys, reference["logits"], strict=True)),
                                          dict(zip(keys, reference["answers"], strict=True)),
                                          dict(zip(keys, got["rounds"], strict=True)), reference["eos"], MAX_NEW,
                                          label=f"{label} {mode}", min_rounds=10 if mode == "vanilla_sd" else 0)
            print(f"{label} {mode}: {summary}")


@pytest.mark.parametrize("backend", ["executorch", "onnx"])
def test_a_device_on_the_exported_draft_accepts_what_the_eager_draft_does(demo_bundle, edge, reference,
                                                                          backend) -> None:
    from covspec.bundles.adapter import BundleAdapter

    found = _device_rounds(BundleAdapter(demo_bundle, backend=backend), edge.endpoint, (*CHECKED_MODES, "covspec"))
    check_device(found, reference, f"bundle/{backend}")


def test_a_device_on_the_eager_draft_accepts_what_the_eager_draft_does(eager_draft, edge, reference) -> None:
    """The same on the Hugging Face draft (the device's path for a checkpoint folder)."""
    check_device(_device_rounds(eager_draft, edge.endpoint, CHECKED_MODES), reference, "eager")


# --- torch-free ---------------------------------------------------------------------------------------
BLOCKED = ("torch", "transformers", "torchao", "executorch")

# An import hook refuses torch, transformers, torchao and executorch's Python package (the native shim
# needs only the wheel's C++ libraries): the process is what `pip install covspec[device]` gives a phone.
TORCH_FREE = """
import json, sys
BLOCKED = {blocked!r}
refused = []
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            refused.append(name)
            raise ImportError(f"{{name}} is not installed on the device")
        return None
sys.meta_path.insert(0, Refuse())
{body}
out["loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
out["refused"] = sorted(set(refused))
print(json.dumps(out))
"""

DEVICE_BODY = """
from covspec.bundles.adapter import BundleAdapter
from covspec.device_runtime.client import DeviceRuntime
from covspec.sampling import SamplingParams
bundle, edge, backends, modes, window, max_new = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4].split(","), int(sys.argv[5]), int(sys.argv[6])
requests = json.loads(sys.stdin.read())
out = {}
for backend in backends:
    device = DeviceRuntime(BundleAdapter(bundle, backend=backend), edge, timeout_s=30)
    for mode in modes:
        answers = [device.answer(bytes.fromhex(img), prompt, mode, SamplingParams(), max_new_tokens=max_new, window=window)
                   for img, prompt in requests]
        out[f"{backend}/{mode}"] = {"ids": [a.ids for a in answers],
                                    "rounds": [[{"drafted": r.drafted, "accepted": r.accepted} for r in a.rounds] for a in answers]}
    device.close()
"""


def run_torch_free(body: str, argv: list[str], stdin: str = "", env: dict | None = None) -> dict:
    import os

    script = TORCH_FREE.format(blocked=BLOCKED, body=body)
    done = subprocess.run([sys.executable, "-c", script, *argv], input=stdin, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})}, cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out.pop("loaded") == [], "the device process imported torch / transformers / executorch"
    out.pop("refused")
    return out


def test_a_torch_free_device_answers_through_a_real_edge_and_accepts_what_the_eager_draft_does(
        demo_bundle, native_library, edge, reference) -> None:
    """The .pte on the native shim and the ONNX programs, in a process refused torch (the device install)."""
    payload = json.dumps([(image.hex(), prompt) for image, prompt in requests()])
    out = run_torch_free(DEVICE_BODY, [str(demo_bundle), edge.endpoint, "executorch,onnx",
                                       ",".join(("target_only", *CHECKED_MODES, "covspec")), str(WINDOW), str(MAX_NEW)],
                         stdin=payload, env={"COVSPEC_ET_NATIVE": str(native_library), "PYTHONPATH": ""})
    for backend in ("executorch", "onnx"):
        found = {k.split("/")[1]: v for k, v in out.items() if k.startswith(f"{backend}/")}
        assert found.pop("target_only")["ids"] == reference["answers"], backend
        check_device(found, reference, f"torch-free {backend}")


NATIVE_BODY = """
import numpy as np
from covspec.bundles.adapter import BundleAdapter
from covspec.images import load_image
bundle, image, prompt, out_file = sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3], sys.argv[4]
ids = json.loads(sys.stdin.read())
adapter = BundleAdapter(bundle, backend="executorch")
visual = adapter.encode_image(adapter.preprocess(load_image(image)))
first, state = adapter.prefill(visual, prompt)
base = state.length
steps = [adapter.forward(state, np.asarray([t]))[-1] for t in ids[:16]]  # 16 decode steps, one token each
adapter.truncate(state, base + 8)  # a rollback: 8 steps back, 2 other tokens written there, back again,
adapter.forward(state, np.asarray(ids[2:4]))  # then the answer's tokens 8..23 in one window
adapter.truncate(state, base + 8)
window = adapter.forward(state, np.asarray(ids[8:24]))
np.savez(out_file, first=first, steps=np.stack(steps), window=window, embeds=visual.embeds)
out = {"native": type(adapter.programs.methods).__name__}
"""


def test_the_native_shim_gives_the_bindings_logits_on_the_demo_pte(demo_bundle, native_library, reference,
                                                                    tmp_path) -> None:
    """A prefill, 16 decode steps and a rollback on the demo model.pte: the native shim in a process
    refused torch against ExecuTorch's Python bindings in this one (with ExecuTorch's own llama:: ops)."""
    from covspec.bundles.adapter import BundleAdapter
    from covspec.images import load_image

    (image, prompt), ids = requests()[1], reference["answers"][1]
    assert len(ids) >= 24
    out = run_torch_free(NATIVE_BODY, [str(demo_bundle), image.hex(), prompt, str(tmp_path / "native.npz")],
                         stdin=json.dumps(ids), env={"COVSPEC_ET_NATIVE": str(native_library), "PYTHONPATH": ""})
    assert out == {"native": "NativeMethods"}
    native = np.load(tmp_path / "native.npz")
    bindings = BundleAdapter(demo_bundle, backend="executorch")
    assert type(bindings.programs.methods).__name__ == "BindingMethods"
    visual = bindings.encode_image(bindings.preprocess(load_image(image)))
    first, state = bindings.prefill(visual, prompt)
    np.testing.assert_allclose(native["embeds"], visual.embeds, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(native["first"], first, rtol=1e-4, atol=1e-4)
    steps = bindings.forward(state, np.asarray(ids[:16]))
    np.testing.assert_allclose(native["steps"], steps, rtol=1e-4, atol=1e-4)
    assert (native["steps"].argmax(-1) == steps.argmax(-1)).all()
    np.testing.assert_allclose(native["window"], reference["logits"][1][8:24], atol=1e-3)
    print(f"native shim vs bindings, demo model.pte: max |diff| {np.abs(native['steps'] - steps).max():.2e}")


def test_a_folder_flash_of_the_demo_bundle_answers_through_a_real_edge(demo_bundle, native_library, edge, reference,
                                                                       tmp_path) -> None:
    """`covspec device flash` of the exported demo bundle to a folder (the bundle alone: the runtime payload's
    wheelhouse and venv are tests/device/test_flash.py's slow test), then the device on the flashed copy, torch-free,
    through a real edge: target_only's answers and the eager draft's acceptance per round."""
    from covspec.device_runtime.flash import flash

    report = flash(demo_bundle, str(tmp_path / "phone"), runtime="none")
    flashed = tmp_path / "phone" / "bundle"
    assert report.verified == len(report.copied) > 0 and (flashed / "model.pte").is_file()
    payload = json.dumps([(image.hex(), prompt) for image, prompt in requests()])
    out = run_torch_free(DEVICE_BODY, [str(flashed), edge.endpoint, "executorch", "vanilla_sd", str(WINDOW),
                                       str(MAX_NEW)],
                         stdin=payload, env={"COVSPEC_ET_NATIVE": str(native_library), "PYTHONPATH": ""})
    check_device({"vanilla_sd": out["executorch/vanilla_sd"]}, reference, "flashed folder")


def test_executorchs_multimodal_runner_gives_the_target_answers_on_the_demo_pte(demo_bundle, reference) -> None:
    """ExecuTorch's own C++ MultimodalRunner (the wheel's bindings of the runner Android uses) on the demo
    draft's model.pte (LLaVA layout): its greedy text on the held-out image prompts equals our runtime's
    greedy text on the same bundle (Idefics3 and Qwen2.5-VL: tests/export/test_runner_families.py, slow: one
    tiny export each)."""
    from executorch.extension.llm.runner import MultimodalRunner
    from test_export_multimodal import runner_text, visible_words

    from covspec.bundles.adapter import BundleAdapter
    from covspec.generation import generate
    from covspec.images import load_image

    ours = BundleAdapter(demo_bundle, backend="executorch")
    runner = MultimodalRunner(str(demo_bundle / "model.pte"), str(demo_bundle / "runner_tokenizer.json"))
    specials = list(ours.tokenizer.all_special_tokens)
    compared = 0
    for image_bytes, prompt in requests()[:3]:
        image = load_image(image_bytes)
        ids = generate(ours, image, prompt, max_new_tokens=16).ids
        n = next((i for i, t in enumerate(ids) if t >= len(ours.tokenizer) or t in ours.eos_token_ids), len(ids))
        theirs = runner_text(runner, ours, image, prompt, max_new_tokens=max(n, 1))
        assert visible_words(theirs, specials) == ours.decode(ids[:n]).split(), (prompt, theirs)
        compared += n
    assert compared >= 16, compared
