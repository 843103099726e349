"""Communication with sampling on a real vocabulary (tiny random Qwen2.5-VL pair, 151,936 logits):
covspec's decoupled verification uploads q(x_i) per drafted token instead of vanilla_sd's full
distribution, and must send at most 4% of vanilla_sd's bytes per generated token."""

from __future__ import annotations

import tiny_models
from test_runtimes import RunningEdge, png

from covspec.device_runtime.client import DeviceRuntime
from covspec.models import load_adapter
from covspec.sampling import SamplingParams

QWEN_VOCAB = 151936


def test_decoupled_upload_is_under_4_percent_of_full_distributions(tmp_path):
    target = tiny_models.build_qwen2_5_vl(tmp_path / "target", seed=0, vocab_size=QWEN_VOCAB)
    draft = tiny_models.build_qwen2_5_vl(tmp_path / "draft", seed=1, vocab_size=QWEN_VOCAB)
    edge = RunningEdge(target)
    try:
        device = DeviceRuntime(load_adapter(draft), edge.endpoint, timeout_s=60)
        assert device.welcome.vocab_size == QWEN_VOCAB
        params = SamplingParams(temperature=1.0, top_p=0.9, seed=3)
        per_token = {}
        for mode in ("vanilla_sd", "covspec"):
            sent = tokens = 0
            for i in range(3):
                answer = device.answer(png(i), "describe this image .", mode, params, max_new_tokens=16, window=4)
                sent += answer.decode_bytes_up
                tokens += len(answer.ids)
            per_token[mode] = sent / tokens
        device.close()
    finally:
        edge.close()
    ratio = per_token["covspec"] / per_token["vanilla_sd"]
    print(f"\nbytes up per generated token, sampling, V={QWEN_VOCAB}: vanilla_sd {per_token['vanilla_sd']:.0f}, "
          f"covspec {per_token['covspec']:.1f} ({100 * ratio:.3f}%)")
    assert per_token["vanilla_sd"] > 4 * QWEN_VOCAB * 0.5  # full rows of float32 went up
    assert ratio <= 0.04
