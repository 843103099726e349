"""What differs per model family when a device bundle runs, torch-free (numpy + PIL):

- `pixels(image)`: the vision program's input, of the fixed shape it was exported for (the manifest's
  vision.pixels): the family's processor's resize and normalization, to that size.
  llava: CLIP's resize + center crop; idefics3 (SmolVLM): longest edge to size.longest_edge, then the
  square tower size, one global image (no splitting); qwen2_5_vl: resized to the fixed side chosen at
  export (vision.image_side; native resolution is what the bundle cannot do), then cut into patches
  in the tower's merge-block order ([rows * cols, C * t * p * p]).
- `prompt(tokenizer, prompt, n)`: the prompt's ids around n image tokens (the manifest's prompt entry)
  and where the first image token stands.
- `prefill_positions(...)`: RoPE positions of a (pruned) prefill where every token keeps its unpruned
  position, and the state extras decoding continues from; `step_positions(...)`: the next k tokens'.
  1-D families: [T] and decode at slot + position_offset; qwen2_5_vl: M-RoPE [3, T] (image tokens at
  (s, s + row, s + col), the text after the image from s + max(rows, cols)) and decode at slot +
  rope_delta on all three rows, as `Qwen25VLAdapter` (covspec/models/qwen2_5_vl.py) does.
- `limits`: what the family cannot do in the bundle (the manifest's "limits", or said here for bundles
  exported before the manifest recorded them).

`rules_for(manifest, settings)` picks the family's rules. `longest_edge_size` and `patchify` live here
so that the Hugging Face adapters and the bundle share one definition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from covspec.models.common import check_no_placeholder, encode_text, normalize, pil_resize

MAX_IMAGE_SIZE = 4096  # the Idefics3 processor's bound on its first resize


def longest_edge_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """The Idefics3 processor's first resize: longest edge to `longest_edge`, the other side even,
    then kept under MAX_IMAGE_SIZE."""
    aspect = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


def patchify(pixels: np.ndarray, patch: int, merge: int, temporal: int) -> np.ndarray:
    """Qwen2.5-VL's patches: [C, H, W] -> [rows * cols, C * temporal * patch * patch], ordered by merge
    block (block row, block col, row in block, col in block); the still image repeated in time."""
    c, h, w = pixels.shape
    p, m, t = patch, merge, temporal
    rows, cols = h // p, w // p
    x = pixels.reshape(c, rows // m, m, p, cols // m, m, p)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # [rows/m, cols/m, m, m, C, p, p]
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
    return np.ascontiguousarray(x.reshape(rows * cols, c * t * p * p), dtype=np.float32)






def unpruned_positions(t: int, image_start: int, kept: np.ndarray, n_visual: int) -> tuple[np.ndarray, dict[str, int]]:
    """1-D RoPE positions [T] of a prompt of t tokens whose visual tokens (the `kept` of n_visual) start at
    image_start: kept ones at image_start + index, the text after shifted past all n_visual
    (CachedDecoderAdapter.pruned_inputs)."""
    n_kept = int(kept.size)
    offset = n_visual - n_kept
    positions = np.concatenate([np.arange(image_start), image_start + kept,
                                np.arange(image_start + n_kept, t) + offset]).astype(np.int64)
    return positions, {"position_offset": offset}






@dataclass
class FamilyRules:
    """The 1-D RoPE family shape shared by llava and idefics3; subclasses say the rest."""

    manifest: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)  # the bundle's preprocessor_config.json

    name = ""

    @property
    def image_token_id(self) -> int:
        return int(self.manifest["prompt"]["image_token_id"])

    @property
    def side(self) -> int:
        return int(self.manifest["vision"]["pixels"][-1])

    @property
    def placeholder_ids(self) -> set[int]:
        return {int(i) for i in self.manifest["prompt"].get("placeholder_ids", [self.image_token_id])}

    @property
    def limits(self) -> list[str]:
        return list(self.manifest.get("limits", self.default_limits()))

    def default_limits(self) -> list[str]:
        return []

    def grid(self, n: int) -> tuple[int, int] | None:
        side = int(round(n ** 0.5))
        return (side, side) if side * side == n else None

    def pixels(self, image: Image.Image) -> np.ndarray:
        raise NotImplementedError

    def prompt(self, tokenizer: Any, prompt: str, n: int) -> tuple[list[int], int]:
        """ids with n image tokens where the manifest's before_image / after_image text says, and where
        the first stands."""
        entry = self.manifest["prompt"]
        before = encode_text(tokenizer, entry["before_image"])
        after = encode_text(tokenizer, entry["after_image"].format(prompt=prompt))
        check_no_placeholder(after[1:], self.placeholder_ids, tokenizer)
        return before + [self.image_token_id] * n + after, len(before)

    def prefill_positions(self, t: int, image_start: int, kept: np.ndarray, n_visual: int,
                          grid: tuple[int, int] | None) -> tuple[np.ndarray, dict[str, int]]:
        """Positions [T] (or [3, T]) of a prefill of t tokens, and the state's extras."""
        return unpruned_positions(t, image_start, kept, n_visual)

    def step_positions(self, length: int, extra: dict[str, Any], k: int) -> np.ndarray:
        """Positions [k] (or [3, k]) of the next k tokens of a state holding `length` slots."""
        start = length + int(extra.get("position_offset", 0))
        return np.arange(start, start + k, dtype=np.int64)


class LlavaRules(FamilyRules):
    name = "llava"

    def pixels(self, image: Image.Image) -> np.ndarray:
        from covspec.models.llava_inputs import ClipPreprocessor

        return ClipPreprocessor(self.settings or None, self.side)(image)  # [1, 3, S, S]

    def prompt(self, tokenizer: Any, prompt: str, n: int) -> tuple[list[int], int]:
        from covspec.models.llava_inputs import llava_prompt_ids

        ids = llava_prompt_ids(tokenizer, prompt, n, self.image_token_id)
        return ids, ids.index(self.image_token_id) if n else len(ids)


class Idefics3Rules(FamilyRules):
    name = "idefics3"

    def default_limits(self) -> list[str]:
        return [f"one global {self.side}x{self.side} image: no image splitting (any image is resized to it)"]

    def pixels(self, image: Image.Image) -> np.ndarray:
        """pixel_values [1, 3, S, S]: as Idefics3Preprocessor (covspec/models/idefics3.py), splitting off."""
        s = self.settings
        resample = int(s.get("resample", Image.Resampling.LANCZOS))
        image = image.convert("RGB")
        longest = (s.get("size") or {}).get("longest_edge")
        if bool(s.get("do_resize", True)) and longest:
            image = pil_resize(image, *longest_edge_size(image.height, image.width, int(longest)), resample)
        image = pil_resize(image, self.side, self.side, resample)
        pixels = normalize(np.asarray(image), float(s.get("rescale_factor", 1 / 255)),
                           s.get("image_mean", (0.5, 0.5, 0.5)), s.get("image_std", (0.5, 0.5, 0.5)))
        return pixels[None]


class QwenRules(FamilyRules):
    name = "qwen2_5_vl"

    @property
    def patch_grid(self) -> tuple[int, int]:
        _, rows, cols = (int(v) for v in self.manifest["vision"]["grid_thw"])
        return rows, cols

    @property
    def merge(self) -> int:
        """The patch merger's side (2: 2x2 patches per visual token)."""
        rows, cols = self.patch_grid
        return int(round((rows * cols / int(self.manifest["vision"]["tokens"])) ** 0.5))

    @property
    def side(self) -> int:
        return int(self.manifest["vision"]["image_side"])

    def default_limits(self) -> list[str]:
        rows, cols = self.patch_grid
        return [f"one fixed grid of {rows}x{cols} patches: no native resolution (any image is resized to "
                f"{self.side}x{self.side} px, its aspect ratio not kept)", "images only: no video",
                "ExecuTorch's own MultimodalRunner runs model.pte on text-only prompts only (its image path "
                "passes an RGB image, not the vision encoder's patches, and 1-D cache positions, not the image "
                "tokens' M-RoPE [3, k] positions); the CoVSpec runtime runs images"]

    def grid(self, n: int) -> tuple[int, int]:
        rows, cols = self.patch_grid
        return rows // self.merge, cols // self.merge

    def pixels(self, image: Image.Image) -> np.ndarray:
        """pixel_values [rows * cols, C * t * p * p]: QwenPreprocessor's (covspec/models/qwen2_5_vl.py)
        for an image of the exported side."""
        s = self.settings
        n, width = (int(v) for v in self.manifest["vision"]["pixels"])
        rows, cols = self.patch_grid
        patch = self.side // rows
        temporal = width // (3 * patch * patch)
        image = pil_resize(image.convert("RGB"), self.side, self.side, int(s.get("resample", Image.Resampling.BICUBIC)))
        pixels = normalize(np.asarray(image), float(s.get("rescale_factor", 1 / 255)),
                           s.get("image_mean", (0.48145466, 0.4578275, 0.40821073)),
                           s.get("image_std", (0.26862954, 0.26130258, 0.27577711)))
        out = patchify(pixels, patch, self.merge, temporal)
        assert out.shape == (n, width), (out.shape, n, width)
        return out

    def prefill_positions(self, t: int, image_start: int, kept: np.ndarray, n_visual: int,
                          grid: tuple[int, int] | None) -> tuple[np.ndarray, dict[str, int]]:
        """M-RoPE [3, T]: text before the image 0..s-1 on all rows; kept image token i at (s, s + i // cols,
        s + i % cols); the text after it from s + max(rows, cols) (get_rope_index's, for the unpruned
        prompt, then the pruned tokens left out). rope_delta: next text position minus the slots."""
        rows, cols = grid or self.grid(n_visual)
        n_kept = int(kept.size)
        after = t - image_start - n_kept
        text = np.arange(image_start)
        image = np.stack([np.full(n_kept, image_start), image_start + kept // cols, image_start + kept % cols])
        tail = image_start + max(rows, cols) + np.arange(after)
        positions = np.concatenate([np.broadcast_to(text, (3, image_start)), image,
                                    np.broadcast_to(tail, (3, after))], axis=1).astype(np.int64)  # [3, T]
        return positions, {"rope_delta": int(positions.max(initial=-1)) + 1 - t}

    def step_positions(self, length: int, extra: dict[str, Any], k: int) -> np.ndarray:
        text = np.arange(length, length + k, dtype=np.int64) + int(extra["rope_delta"])
        return np.ascontiguousarray(np.broadcast_to(text, (3, k)))  # [3, k]


RULES: dict[str, type[FamilyRules]] = {"llava": LlavaRules, "idefics3": Idefics3Rules, "qwen2_5_vl": QwenRules}


def rules_for(manifest: dict[str, Any], settings: dict[str, Any] | None = None) -> FamilyRules:
    """The rules of the manifest's family; KeyError naming the families that run when it has none."""
    family = manifest.get("family")
    if family not in RULES:
        raise KeyError(f"family {family!r} has no bundle runtime (families: {', '.join(RULES)})")
    return RULES[family](manifest, settings or {})
