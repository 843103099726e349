"""The LLaVA-family text model as onnxruntime-genai's decoder convention, with its genai_config.json:

    decoder.genai.onnx: input_ids [B, k] int64, attention_mask [B, P + k] int64, position_ids [B, k] int64,
        past_key_values.{i}.key/value [B, kvH, P, hd] -> logits [B, k, V], present.{i}.key/value [B, kvH, P + k, hd]

(the Hugging Face past/present convention, the cache growing by concatenation; genai_config type
"llama"). An experiment of what onnxruntime-genai can load from our export; what genai cannot
express of CoVSpec (RoPE positions apart from cache slots, pruned visual tokens, the pruner's outputs,
logits of every window token) is recorded in the manifest entry `genai_limits`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from covspec.export.graphs import DecoderShape, TextStack, rotate_half
from covspec.models.base import CachedDecoderAdapter

GENAI_DECODER = "decoder.genai.onnx"
GENAI_LIMITS = [
    "no llava model type: genai's VLM types (phi3v, gemma3, qwen2_5_vl, fara) each need their own "
    "ort-extensions image processor (processor_config.json); the LLaVA draft is exported as a text decoder "
    "(type llama) whose image embeddings genai cannot insert",
    "position_ids are computed by genai from the attention mask (0..n-1): a pruned prefill's unpruned RoPE "
    "positions (positions skipping the dropped visual tokens) cannot be given",
    "the vision program's activity / attention outputs (what the pruner scores) have no place in genai's "
    "vision session contract",
    "logits: genai exposes the last token's logits per step; verifying or drafting a window needs all k",
]


class GenaiDecoder(TextStack):
    def __init__(self, adapter: CachedDecoderAdapter, shape: DecoderShape):
        super().__init__(adapter, shape)
        rotary = adapter.language_model.rotary_emb
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone(), persistent=False)
        self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s = self.shape
        b, k = input_ids.shape
        x = self.embed_tokens(input_ids)  # [B, k, d]
        freqs = position_ids.float()[..., None] * self.inv_freq  # [B, k, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = (emb.cos() * self.rope_scale)[:, None], (emb.sin() * self.rope_scale)[:, None]  # [B, 1, k, hd]
        total = attention_mask.shape[1]
        key_pos = torch.arange(total)[None, :]  # [1, P + k]
        query_pos = (total - k + torch.arange(k))[:, None]  # [k, 1]
        visible = (key_pos <= query_pos)[None, None] & (attention_mask[:, None, None, :] > 0)  # [B, 1, k, P + k]
        bias = torch.where(visible, 0.0, torch.finfo(torch.float32).min)
        groups = s.heads // s.kv_heads
        present = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(b, k, s.heads, s.head_dim).transpose(1, 2)  # [B, H, k, hd]
            kk = attn.k_proj(h).view(b, k, s.kv_heads, s.head_dim).transpose(1, 2)  # [B, kvH, k, hd]
            v = attn.v_proj(h).view(b, k, s.kv_heads, s.head_dim).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            kk = kk * cos + rotate_half(kk) * sin
            keys = torch.cat((past[2 * i], kk), dim=2)  # [B, kvH, P + k, hd]
            values = torch.cat((past[2 * i + 1], v), dim=2)
            present += [keys, values]
            keys_h = keys.repeat_interleave(groups, dim=1)  # [B, H, P + k, hd]
            values_h = values.repeat_interleave(groups, dim=1)
            scores = torch.matmul(q, keys_h.transpose(2, 3)) * attn.scaling + bias  # [B, H, k, P + k]
            out = torch.matmul(torch.softmax(scores, dim=-1), values_h).transpose(1, 2).reshape(b, k, -1)
            x = x + attn.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return (self.lm_head(self.norm(x)).float(), *present)


def write_genai_decoder(adapter: CachedDecoderAdapter, shape: DecoderShape, out: Path) -> dict[str, Any]:
    """Writes out/decoder.genai.onnx and out/genai_config.json; returns the manifest entry."""
    from covspec.export.lower import strip_onnx, to_onnx

    graph = GenaiDecoder(adapter, shape).eval()
    k, p = 3, 5
    past = [torch.zeros(1, shape.kv_heads, p, shape.head_dim) for _ in range(2 * shape.layers)]
    example = (torch.zeros(1, k, dtype=torch.long), torch.ones(1, p + k, dtype=torch.long),
               torch.arange(p, p + k)[None], *past)
    auto = torch.export.Dim.DYNAMIC  # sequence, total and past lengths: related inside the graph
    dynamic = ({1: auto}, {1: auto}, {1: auto}, tuple({2: auto} for _ in past))
    names = [f"past_key_values.{i}.{kind}" for i in range(shape.layers) for kind in ("key", "value")]
    outputs = ["logits", *(n.replace("past_key_values", "present") for n in names)]
    to_onnx(graph, example, out / GENAI_DECODER, ["input_ids", "attention_mask", "position_ids", *names], outputs,
            dynamic)
    strip_onnx(out / GENAI_DECODER)
    config = {"model": {
        "bos_token_id": adapter.tokenizer.bos_token_id, "context_length": shape.max_len,
        "eos_token_id": sorted(adapter.eos_token_ids), "pad_token_id": adapter.tokenizer.pad_token_id or 0,
        "type": "llama", "vocab_size": shape.vocab,
        "decoder": {"session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                    "filename": GENAI_DECODER, "head_size": shape.head_dim, "hidden_size": shape.hidden,
                    "num_attention_heads": shape.heads, "num_hidden_layers": shape.layers,
                    "num_key_value_heads": shape.kv_heads,
                    "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                               "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                               "past_value_names": "past_key_values.%d.value"},
                    "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                                "present_value_names": "present.%d.value"}}},
        "search": {"do_sample": False, "max_length": shape.max_len, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "temperature": 1.0,
                   "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.0, "early_stopping": True}}
    (out / "genai_config.json").write_text(json.dumps(config, indent=1))
    return {"decoder": GENAI_DECODER, "config": "genai_config.json", "type": "llama", "genai_limits": GENAI_LIMITS}
