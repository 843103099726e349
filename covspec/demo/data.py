"""Training data for the demo pair: a pool of rendered training scenes, dense per-token labels for the
vision stage, and token sequences in the exact format the LLaVA adapter builds at inference."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from covspec.demo.task import (
    CANVAS,
    COLOURS,
    DESCRIBE_PROMPT,
    GRID,
    N_VISUAL_TOKENS,
    PATCH,
    POSITIONS,
    SHAPES,
    Scene,
    draw_scene,
    make_question,
    scene_for,
)
from covspec.demo.word_tokenizer import IMAGE
from covspec.models.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize
from covspec.models.llava import llava_prompt_ids

PATCHES_PER_SIDE = CANVAS // PATCH  # 6: the target's 12-pixel patches
COLOUR_IDS = {c: i + 1 for i, c in enumerate(COLOURS)}  # 0 = no object
SHAPE_IDS = {s: i + 1 for i, s in enumerate(SHAPES)}
SHORT_TYPES = ("color", "shape", "count", "position", "existence", "relation")


def token_cells(side: int = PATCHES_PER_SIDE) -> list[int]:
    """The grid cell (row-major) each visual token (row-major patch, `side` patches a side: 6 for
    12-pixel patches, 12 for 6-pixel ones) falls in."""
    if side % GRID:
        raise ValueError(f"{side} patches a side do not tile the {GRID}x{GRID} grid")
    per_cell = side // GRID
    return [(r // per_cell) * GRID + c // per_cell for r in range(side) for c in range(side)]


@lru_cache(maxsize=4)
def tokens_by_cell(side: int = PATCHES_PER_SIDE) -> dict[int, tuple[int, ...]]:
    """The visual tokens of each grid cell."""
    cells = token_cells(side)
    return {cell: tuple(t for t, c in enumerate(cells) if c == cell) for cell in sorted(set(cells))}


def per_side(n_tokens: int) -> int:
    """Patches a side of a square token grid of n_tokens."""
    side = int(round(n_tokens ** 0.5))
    if side * side != n_tokens:
        raise ValueError(f"{n_tokens} visual tokens do not form a square grid")
    return side


def pixel_values(image_array: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, H, W] float32, exactly as the adapter's CLIP preprocessing does it
    (the demo images are already at the model's size, so its resize and crop leave them as they are)."""
    assert image_array.shape[0] == CANVAS == image_array.shape[1]
    return torch.from_numpy(normalize(image_array, 1 / 255, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))


@dataclass
class ScenePool:
    scenes: list[Scene]
    images: np.ndarray  # [N, H, W, 3] uint8

    def pixels(self, idx: list[int] | torch.Tensor) -> torch.Tensor:
        return torch.stack([pixel_values(self.images[int(i)]) for i in idx])

    def token_labels(self, side: int = PATCHES_PER_SIDE) -> tuple[torch.Tensor, torch.Tensor]:
        """(colour, shape) ids [N, tokens] of each visual token's cell (0: background), `side`
        patches a side."""
        cells = token_cells(side)
        colours, shapes = [], []
        for scene in self.scenes:
            by_cell = {o.cell: o for o in scene.objects}
            colours.append([COLOUR_IDS[by_cell[c].colour] if c in by_cell else 0 for c in cells])
            shapes.append([SHAPE_IDS[by_cell[c].shape] if c in by_cell else 0 for c in cells])
        return torch.tensor(colours), torch.tensor(shapes)


def build_pool(split: str, n: int, seed: int) -> ScenePool:
    """Rendered scenes for training or validation; never the report split, which no training run
    or settings search reads."""
    if split == "report":
        raise ValueError("the report split is for reported figures only: draw training and validation pools "
                         "from 'train' and 'val'")
    scenes = [scene_for(split, i, seed) for i in range(n)]
    return ScenePool(scenes, np.stack([np.asarray(draw_scene(scene), dtype=np.uint8) for scene in scenes]))


def alignment_word_ids(tokenizer, scene: Scene, side: int = PATCHES_PER_SIDE) -> list[list[int]]:
    """Per visual token, the word ids whose embeddings its projected feature is pulled towards:
    its cell's colour and shape (or "nothing") and position words."""
    out = []
    for cell in token_cells(side):
        obj = scene.at(cell)
        words = [obj.colour, obj.shape] if obj else ["nothing"]
        words += POSITIONS[cell].split()
        out.append(tokenizer.convert_tokens_to_ids(words))
    return out


def alignment_targets(embed: torch.Tensor, word_ids: list[list[list[int]]]) -> torch.Tensor:
    """[B, tokens, d]: sum of the word embeddings named for each visual token."""
    flat = [ids for scene in word_ids for ids in scene]
    width = max(len(ids) for ids in flat)
    index = torch.tensor([ids + [-1] * (width - len(ids)) for ids in flat])
    mask = (index >= 0).unsqueeze(-1).to(embed.dtype)
    vectors = (embed[index.clamp(min=0)] * mask).sum(1)
    return vectors.view(len(word_ids), -1, embed.shape[1])


@lru_cache(maxsize=200_000)
def _encode(tokenizer, question: str, answer: str, n_image_tokens: int) -> tuple[tuple[int, ...], int]:
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    prompt = llava_prompt_ids(tokenizer, question, n_image_tokens, image_id)
    answer_ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    return tuple(prompt + answer_ids), len(prompt)


@dataclass
class Batch:
    ids: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T] next-token targets aligned with ids (-100 where no loss)
    mask: torch.Tensor  # [B, T]
    scene_idx: torch.Tensor  # [B]
    qtypes: list[str]


def collate(tokenizer, questions: list[tuple[int, str, str, str]], n_image_tokens: int) -> Batch:
    """questions: (scene index, question, answer, type). Labels are shifted: labels[t] is the token
    position t must predict (ids[t + 1])."""
    encoded = [_encode(tokenizer, q, a, n_image_tokens) for _, q, a, _ in questions]
    width = -(-max(len(ids) for ids, _ in encoded) // 8) * 8  # few distinct shapes: faster CPU kernels
    pad = tokenizer.pad_token_id
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (seq, n_prompt) in enumerate(encoded):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
        labels[row, n_prompt - 1:len(seq) - 1] = torch.tensor(seq[n_prompt:])
    return Batch(ids, labels, mask, torch.tensor([s for s, _, _, _ in questions]), [t for *_, t in questions])


def sample_questions(pool: ScenePool, rng: random.Random, batch_size: int, describe_share: float,
                     type_weights: dict[str, float] | None = None,
                     short_batch: int = 0, mixed: bool = False) -> list[tuple[int, str, str, str]]:
    """One question per drawn scene: a batch of "describe" with probability describe_share, else a
    batch of short questions; `mixed`: each question is "describe" with that probability instead."""
    out = []
    weights = type_weights or {t: 1.0 for t in SHORT_TYPES}
    describe_batch = rng.random() < describe_share  # whole batches of one length class: less padding
    if not describe_batch and short_batch and not mixed:
        batch_size = short_batch
    for _ in range(batch_size):
        idx = rng.randrange(len(pool.scenes))
        scene = pool.scenes[idx]
        if mixed:
            describe_batch = rng.random() < describe_share
        if describe_batch:
            qtype = "describe"
        else:
            qtype = rng.choices(list(weights), weights=list(weights.values()))[0]
        question, answer = make_question(scene, qtype, rng, allow_unseen=False)
        assert qtype != "describe" or question == DESCRIBE_PROMPT
        out.append((idx, question, answer, qtype))
    return out


@dataclass
class PrunedBatch:
    """A batch some of whose rows lost visual tokens, as the device's pruned prefill sees them: the
    dropped image slots are removed and every remaining token keeps its unpruned position."""

    batch: Batch
    positions: torch.Tensor  # [B, T'] position ids
    kept: list[torch.Tensor]  # per row, sorted kept visual-token indices


def kept_tokens(scene: Scene, n_keep: int, rng: random.Random, n_visual: int = N_VISUAL_TOKENS) -> list[int]:
    """n_keep of n_visual visual-token indices: one token of every object's cell first (as a pruner
    that works would keep), then random others."""
    by_cell = tokens_by_cell(per_side(n_visual))
    keep = {rng.choice(by_cell[o.cell]) for o in scene.objects}
    rest = [t for t in range(n_visual) if t not in keep]
    rng.shuffle(rest)
    keep.update(rest[: max(0, n_keep - len(keep))])
    return sorted(keep)


def prune_rows(batch: Batch, scenes: list[Scene], image_id: int, pad_id: int, rng: random.Random,
               share: float, min_keep: float, n_visual: int, orders: list[list[int]] | None = None,
               device_share: float = 0.0) -> PrunedBatch:
    """Each row, with probability `share`, keeps a random ratio in [min_keep, 1) of its visual tokens:
    with probability `device_share` the first ones of `orders[row]` (the device pruner's picks, in
    order), else one token per object first, then random others."""
    rows_ids, rows_labels, rows_pos, kept_all = [], [], [], []
    for row in range(batch.ids.shape[0]):
        ids, labels = batch.ids[row], batch.labels[row]
        positions = torch.arange(ids.shape[0])
        kept = torch.arange(n_visual)
        if rng.random() < share:
            n_keep = max(1, round(rng.uniform(min_keep, 1.0) * n_visual))
            if orders is not None and rng.random() < device_share:
                kept = torch.tensor(sorted(orders[row][:n_keep]))
            else:
                kept = torch.tensor(kept_tokens(scenes[row], n_keep, rng, n_visual))
            slots = (ids == image_id).nonzero().flatten()  # [n_visual] positions of the image tokens
            keep_mask = torch.ones_like(ids, dtype=torch.bool)
            keep_mask[slots] = False
            keep_mask[slots[kept]] = True
            ids, labels, positions = ids[keep_mask], labels[keep_mask], positions[keep_mask]
        rows_ids.append(ids)
        rows_labels.append(labels)
        rows_pos.append(positions)
        kept_all.append(kept)
    width = max(len(r) for r in rows_ids)

    def pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
        return torch.stack([torch.cat([r, torch.full((width - len(r),), value, dtype=r.dtype)]) for r in rows])

    positions = torch.stack([torch.cat([p, p[-1] + 1 + torch.arange(width - len(p))]) for p in rows_pos])
    ids = pad(rows_ids, pad_id)
    pruned = Batch(ids, pad(rows_labels, -100), (ids != pad_id).long(), batch.scene_idx, batch.qtypes)
    return PrunedBatch(pruned, positions, kept_all)
