"""The device `.pte` in ExecuTorch's multimodal layout: ONE program whose methods are

- `vision_encoder(pixels [1, 3, H, W] f32) -> (embeds [1, N, d], activity [N], attention [N])`
  (attention only where the tower is a pre-norm ViT; the runners read output 0, the pruner the rest);
- `token_embedding(ids [1, T] int64) -> embeds [1, T, d]`;
- `text_decoder(embeds [1, T, d], cache_position [T] int64) -> logits [1, T, V]`: the runners'
  convention (RoPE position = cache slot);
- `covspec_decoder(ids [1, k], image_embeds [1, k, d], is_image [1, k] bool, input_pos [k] (or [3, k]
  M-RoPE), start [1])
  -> logits [1, k, V]`: CoVSpec's step (RoPE positions apart from the cache slots start..start+k-1,
  logits for every token, rollback by writing at an earlier start);
- `read_cache() -> cache [L, 2, S, kvH, hd]` and `write_cache(cache) -> [1]`: move the cache out and
  in (a draft branch forks the state);
- constant methods the runners read: get_max_seq_len, get_max_context_len, get_vocab_size,
  get_bos_id, get_eos_ids, use_kv_cache, use_sdpa_with_kv_cache, enable_dynamic_shape.

Every decoder method holds the same `CachedDecoder` as `core`, so with `share_mutable_buffers=True`
they read and write one KV cache (core.k_cache_i / core.v_cache_i).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from covspec.export.cached_decoder import CachedDecoder
from covspec.export.graphs import DecoderShape, position_dims, position_example

METHODS = ("vision_encoder", "token_embedding", "text_decoder", "covspec_decoder", "read_cache", "write_cache")
LAYOUT = "executorch-multimodal"


class VisionEncoder(nn.Module):
    def __init__(self, graph: nn.Module):
        super().__init__()
        self.vision = graph

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        embeds, *rest = self.vision(pixels)  # [N, d], activity [N], (attention [N])
        return (embeds[None], *rest)


class TokenEmbedding(nn.Module):
    def __init__(self, core: CachedDecoder):
        super().__init__()
        self.core = core

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.core.embed_tokens(ids)  # [1, T, d]


class TextDecoder(nn.Module):
    def __init__(self, core: CachedDecoder):
        super().__init__()
        self.core = core

    def forward(self, embeds: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        return self.core(embeds, cache_position, cache_position[:1])


class CovspecDecoder(nn.Module):
    def __init__(self, core: CachedDecoder):
        super().__init__()
        self.core = core

    def forward(self, ids: torch.Tensor, image_embeds: torch.Tensor, is_image: torch.Tensor,
                input_pos: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        x = torch.where(is_image[..., None], image_embeds, self.core.embed_tokens(ids))  # [1, k, d]
        return self.core(x, input_pos, start)


class ReadCache(nn.Module):
    def __init__(self, core: CachedDecoder):
        super().__init__()
        self.core = core

    def forward(self) -> torch.Tensor:
        return torch.stack([torch.cat((self.core.k_cache(i), self.core.v_cache(i))) for i in range(self.core.shape.layers)])


class WriteCache(nn.Module):
    def __init__(self, core: CachedDecoder):
        super().__init__()
        self.core = core

    def forward(self, cache: torch.Tensor) -> torch.Tensor:
        for i in range(self.core.shape.layers):  # cache [L, 2, S, kvH, hd]
            self.core.k_cache(i).copy_(cache[i, 0:1])
            self.core.v_cache(i).copy_(cache[i, 1:2])
        return torch.zeros(1)


def method_programs(vision: nn.Module, core: CachedDecoder, pixels: torch.Tensor,
                    max_chunk: int) -> dict[str, torch.export.ExportedProgram]:
    """torch.export of every method (k symbolic in [1, max_chunk] for the decoder methods)."""
    s = core.shape
    k = torch.export.Dim("k", min=1, max=max_chunk)
    n = 4
    ids = torch.zeros(1, n, dtype=torch.long)
    embeds = torch.zeros(1, n, s.hidden)
    cache = torch.zeros(s.layers, 2, s.max_len, s.kv_heads, s.head_dim)
    specs: dict[str, tuple[nn.Module, tuple[torch.Tensor, ...], Any]] = {
        "vision_encoder": (VisionEncoder(vision), (pixels,), None),
        "token_embedding": (TokenEmbedding(core), (ids,), ({1: k},)),
        "text_decoder": (TextDecoder(core), (embeds, torch.arange(n)), ({1: k}, {0: k})),
        "covspec_decoder": (CovspecDecoder(core), (ids, embeds, torch.zeros(1, n, dtype=torch.bool),
                                                   position_example(s, n), torch.zeros(1, dtype=torch.long)),
                            ({1: k}, {1: k}, {1: k}, position_dims(s, k), None)),
        "read_cache": (ReadCache(core), (), None),
        "write_cache": (WriteCache(core), (cache,), None),
    }
    with torch.no_grad():
        return {name: torch.export.export(module.eval(), example, dynamic_shapes=dynamic, strict=False)
                for name, (module, example, dynamic) in specs.items()}


def runner_metadata(shape: DecoderShape, bos_id: int | None, eos_ids: list[int]) -> dict[str, Any]:
    """The constant methods ExecuTorch's LLM runners read (get_max_seq_len is required)."""
    return {"get_max_seq_len": shape.max_len, "get_max_context_len": shape.max_len, "get_vocab_size": shape.vocab,
            "get_bos_id": -1 if bos_id is None else int(bos_id), "get_eos_ids": [int(i) for i in eos_ids],
            "use_kv_cache": True, "use_sdpa_with_kv_cache": True, "enable_dynamic_shape": True}
