"""The procedural visual question-answering task: coloured shapes on a 3x3 grid.

Everything is deterministic from a seed. A scene's split (train / val / heldout / report) is decided
by a hash of its layout, so no held-out or report layout can ever be drawn for training; the colour-shape
combinations in `UNSEEN_COMBOS` never appear in a training or validation scene and make the
held-out "unseen" slice.

The "report" split is for figures only: layouts of a hash bucket of its own, which no other split
draws (`scene_split`: 1 in REPORT_SHARE of the layouts the first hash gives to training, by a second
hash, so that the held-out and validation layouts stay exactly what they were; the shipped demo
weights were trained on 12,000 scenes drawn before the report had a bucket, and the report skips
those layouts: `legacy_training_layouts`; tests/core/test_demo.py checks all 2,000 report items), drawn from a generator seed
of its own (`REPORT_SEED`, which no training run or settings search reads; settings are chosen on "val"), with
every question type and the unseen slice in exact proportion (each block of `REPORT_BLOCK` items
holds `TYPE_WEIGHTS[t]` items of each type t and `UNSEEN_FRACTION` of unseen scenes, shuffled).

The canvas is 72x72 pixels: 3x3 cells of 24 pixels, read by the vision tower in 12-pixel patches,
so each image gives 36 visual tokens, most of them background (3 to 5 objects in 9 cells).
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CANVAS = 72
GRID = 3
CELL = CANVAS // GRID
PATCH = 12
N_VISUAL_TOKENS = (CANVAS // PATCH) ** 2

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 200, 20),
    "purple": (135, 55, 185),
    "orange": (245, 125, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond")
PLURALS = {s: s + "s" for s in SHAPES}
# row-major cell index -> position words
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}

# colour-shape combinations never drawn for train or val (one per shape, each colour at most once)
UNSEEN_COMBOS = frozenset({("red", "triangle"), ("green", "diamond"), ("blue", "circle"), ("yellow", "square")})
ALL_COMBOS = tuple((c, s) for c in COLOURS for s in SHAPES)
SEEN_COMBOS = tuple(cs for cs in ALL_COMBOS if cs not in UNSEEN_COMBOS)

SPLITS = ("train", "val", "heldout", "report")
HELD_OUT_SPLITS = ("heldout", "report")  # layouts no training run draws: questions may name unseen combinations
REPORT_SHARE = 64  # 1 in this many of the training bucket's layouts is the report's (by a second hash)
REPORT_SEED = 90_417  # the report split's generator seed: read by no training run or settings search
SEED_OFFSETS = {"train": 0, "val": 0, "heldout": 0, "report": REPORT_SEED}  # split_seed: seed + offset
QUESTION_TYPES = ("color", "shape", "count", "position", "existence", "relation", "describe")
CORE_TYPES = ("color", "shape", "count", "position", "existence")
DESCRIBE_PROMPT = "describe the image ."
# mix of question types per drawn item (describe is long, so it weighs most in tokens)
TYPE_WEIGHTS = {"color": 14, "shape": 14, "count": 14, "position": 14, "existence": 14,
                "relation": 10, "describe": 20}
MIN_OBJECTS, MAX_OBJECTS = 3, 5
UNSEEN_FRACTION = 0.25  # share of held-out scenes holding an unseen combination
REPORT_BLOCK = sum(TYPE_WEIGHTS.values())  # 100: the report split is stratified in blocks of this many items
REPORT_SIZE = 2000  # items of the report split the reported figures read (a whole number of blocks)


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    cell: int  # row-major 0..8

    @property
    def row(self) -> int:
        return self.cell // GRID

    @property
    def col(self) -> int:
        return self.cell % GRID

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class Scene:
    objects: tuple[Shape, ...]  # sorted by cell
    background: tuple[int, int, int]
    texture: str  # "plain", "noise" or "stripes"
    texture_seed: int

    def at(self, cell: int) -> Shape | None:
        for obj in self.objects:
            if obj.cell == cell:
                return obj
        return None

    def key(self) -> str:
        return ";".join(f"{o.cell}:{o.colour}:{o.shape}" for o in self.objects)

    @property
    def has_unseen(self) -> bool:
        return any((o.colour, o.shape) in UNSEEN_COMBOS for o in self.objects)


@dataclass
class Item:
    """One question about one image."""

    image: Image.Image
    question: str
    answer: str
    qtype: str
    scene: Scene
    split: str
    index: int
    seed: int
    slices: dict[str, bool] = field(default_factory=dict)  # "unseen": scene holds an unseen combination

    @property
    def file_name(self) -> str:
        return f"{self.split}-s{self.seed}-{self.index:05d}.png"

    def save_image(self, folder: str | Path) -> Path:
        path = Path(folder) / self.file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        self.image.save(path, format="PNG")
        return path


# --- scenes ------------------------------------------------------------------------------------

def scene_split(scene: Scene) -> str:
    """The split a layout belongs to, from a hash of its objects (background ignored): of ten buckets
    8 train, 1 val, 1 heldout; a second hash gives 1 in REPORT_SHARE of the train bucket to the report."""
    digest = hashlib.sha256(scene.key().encode()).digest()
    bucket = int.from_bytes(digest[:4], "big") % 10
    if bucket < 8:
        return "report" if int.from_bytes(digest[4:8], "big") % REPORT_SHARE == 0 else "train"
    return "val" if bucket == 8 else "heldout"


def random_scene(rng: random.Random, want_unseen: bool = False) -> Scene:
    n = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
    cells = sorted(rng.sample(range(GRID * GRID), n))
    combos = rng.sample(SEEN_COMBOS, n)
    if want_unseen:
        combos[rng.randrange(n)] = rng.choice(sorted(UNSEEN_COMBOS))
        if len(set(combos)) < n:  # the unseen one duplicated nothing, but keep the rule explicit
            combos = list(dict.fromkeys(combos))
            while len(combos) < n:
                extra = rng.choice(SEEN_COMBOS)
                if extra not in combos:
                    combos.append(extra)
    objects = tuple(Shape(c, s, cell) for cell, (c, s) in zip(cells, combos, strict=True))
    shade = rng.randint(205, 250)
    tint = tuple(min(255, shade + rng.randint(-8, 8)) for _ in range(3))
    texture = rng.choice(("plain", "plain", "noise", "stripes"))
    return Scene(objects, tint, texture, rng.randrange(1 << 30))


def draw_scene(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (CANVAS, CANVAS), scene.background)
    draw = ImageDraw.Draw(image)
    trng = random.Random(scene.texture_seed)
    if scene.texture == "noise":
        noise = np.random.default_rng(scene.texture_seed).integers(-12, 13, size=(CANVAS, CANVAS, 1))
        pixels = np.clip(np.asarray(scene.background)[None, None, :] + noise, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
        draw = ImageDraw.Draw(image)
    elif scene.texture == "stripes":
        step = trng.choice((4, 6, 8))
        darker = tuple(max(0, v - 14) for v in scene.background)
        vertical = trng.random() < 0.5
        for k in range(0, CANVAS, step):
            box = [k, 0, k + step // 2 - 1, CANVAS] if vertical else [0, k, CANVAS, k + step // 2 - 1]
            draw.rectangle(box, fill=darker)
    for obj in scene.objects:
        rgb = tuple(max(0, min(255, v + trng.randint(-12, 12))) for v in COLOURS[obj.colour])
        size = trng.randint(14, 18)
        cx = obj.col * CELL + CELL // 2 + trng.randint(-1, 1)
        cy = obj.row * CELL + CELL // 2 + trng.randint(-1, 1)
        h = size / 2
        if obj.shape == "circle":
            draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=rgb)
        elif obj.shape == "square":
            h *= 0.85
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=rgb)
        elif obj.shape == "triangle":
            draw.polygon([(cx, cy - h), (cx - h, cy + h * 0.8), (cx + h, cy + h * 0.8)], fill=rgb)
        else:  # diamond
            draw.polygon([(cx, cy - h), (cx + h * 0.8, cy), (cx, cy + h), (cx - h * 0.8, cy)], fill=rgb)
    return image


# --- questions ---------------------------------------------------------------------------------

def describe(scene: Scene) -> str:
    n = len(scene.objects)
    parts = [f"a {o.name} at the {o.position}" for o in scene.objects]
    return f"there are {NUMBERS[n]} objects : " + " , ".join(parts) + " ."


def _unique(scene: Scene, attr: str) -> list[Shape]:
    values = [getattr(o, attr) for o in scene.objects]
    return [o for o in scene.objects if values.count(getattr(o, attr)) == 1]


def make_question(scene: Scene, qtype: str, rng: random.Random, allow_unseen: bool) -> tuple[str, str]:
    objs = scene.objects
    if qtype == "color":
        uniq = _unique(scene, "shape")
        if uniq and rng.random() < 0.5:
            o = rng.choice(uniq)
            return f"what color is the {o.shape} ?", o.colour
        o = rng.choice(objs)
        return f"what color is the object at the {o.position} ?", o.colour
    if qtype == "shape":
        uniq = _unique(scene, "colour")
        if uniq and rng.random() < 0.5:
            o = rng.choice(uniq)
            return f"what shape is the {o.colour} object ?", o.shape
        o = rng.choice(objs)
        return f"what shape is at the {o.position} ?", o.shape
    if qtype == "count":
        kind = rng.choice(("all", "colour", "shape"))
        if kind == "all":
            return "how many objects are there ?", NUMBERS[len(objs)]
        if kind == "colour":
            c = rng.choice(objs).colour if rng.random() < 0.7 else rng.choice(list(COLOURS))
            return f"how many {c} objects are there ?", NUMBERS[sum(o.colour == c for o in objs)]
        s = rng.choice(objs).shape if rng.random() < 0.7 else rng.choice(SHAPES)
        return f"how many {PLURALS[s]} are there ?", NUMBERS[sum(o.shape == s for o in objs)]
    if qtype == "position":
        o = rng.choice(objs)
        return f"where is the {o.name} ?", o.position
    if qtype == "existence":
        if rng.random() < 0.5:
            o = rng.choice(objs)
            return f"is there a {o.name} ?", "yes"
        present = {(o.colour, o.shape) for o in objs}
        pool = ALL_COMBOS if allow_unseen else SEEN_COMBOS
        # prefer near misses: a present colour or shape in another combination
        near = [cs for cs in pool if cs not in present
                and any(cs[0] == o.colour or cs[1] == o.shape for o in objs)]
        c, s = rng.choice(near or [cs for cs in pool if cs not in present])
        return f"is there a {c} {s} ?", "no"
    if qtype == "relation":
        o = rng.choice(objs)
        rel = rng.choice(list(RELATIONS))
        dr, dc = RELATIONS[rel]
        # prefer relations that have an answer, so "nothing" is not the usual reply
        pairs = [(a, r) for a in objs for r, (rr, cc) in RELATIONS.items()
                 if 0 <= a.row + rr < GRID and 0 <= a.col + cc < GRID
                 and scene.at((a.row + rr) * GRID + a.col + cc) is not None]
        if pairs and rng.random() < 0.75:
            o, rel = rng.choice(pairs)
            dr, dc = RELATIONS[rel]
        r, c = o.row + dr, o.col + dc
        other = scene.at(r * GRID + c) if 0 <= r < GRID and 0 <= c < GRID else None
        return f"what is {rel} the {o.name} ?", other.name if other else "nothing"
    if qtype == "describe":
        return DESCRIBE_PROMPT, describe(scene)
    raise ValueError(f"unknown question type {qtype!r}")


def _rng(seed: int, split: str, index: int, salt: str = "") -> random.Random:
    return random.Random(f"covspec-demo:{seed}:{split}:{index}{salt}")


def report_plan(index: int, seed: int = REPORT_SEED) -> tuple[str, bool]:
    """(question type, unseen scene?) of the report split's index-th item: every block of
    REPORT_BLOCK items holds exactly TYPE_WEIGHTS[t] items of type t and round(UNSEEN_FRACTION *
    REPORT_BLOCK) unseen scenes, each assignment shuffled within the block on its own."""
    block, slot = divmod(index, REPORT_BLOCK)
    types = [t for t, w in TYPE_WEIGHTS.items() for _ in range(w)]
    unseen = [i < round(UNSEEN_FRACTION * REPORT_BLOCK) for i in range(REPORT_BLOCK)]
    _rng(seed, "report", block, ":types").shuffle(types)
    _rng(seed, "report", block, ":unseen").shuffle(unseen)
    return types[slot], unseen[slot]


LEGACY_TRAINING = (0, 12_000)  # (seed, pool size) of the shipped demo weights' training scenes (covspec_demo.json)


@functools.cache
def legacy_training_layouts() -> frozenset[str]:
    """The layouts of the scenes the shipped demo weights were trained on, drawn by the rule before the
    report had a bucket (train: the first hash's buckets 0-7): the report split skips them."""
    seed, size = LEGACY_TRAINING
    keys = set()
    for index in range(size):
        rng = _rng(seed, "train", index)
        while True:
            scene = random_scene(rng, False)
            if int.from_bytes(hashlib.sha256(scene.key().encode()).digest()[:4], "big") % 10 < 8:
                keys.add(scene.key())
                break
    return frozenset(keys)


def scene_for(split: str, index: int, seed: int) -> Scene:
    """The index-th scene of a split: drawn until its layout hashes into the split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    rng = _rng(seed, split, index)
    if split == "report":
        want_unseen = report_plan(index, seed)[1]
    else:
        want_unseen = split == "heldout" and rng.random() < UNSEEN_FRACTION
    while True:
        scene = random_scene(rng, want_unseen)
        if scene_split(scene) == split and (split != "report" or scene.key() not in legacy_training_layouts()):
            return scene


def make_item(split: str, index: int, seed: int, qtype: str | None = None, scene: Scene | None = None,
              q_salt: str = "") -> Item:
    scene = scene or scene_for(split, index, seed)
    qrng = _rng(seed, split, index, ":q" + q_salt)
    if qtype is None:
        if split == "report":
            qtype = report_plan(index, seed)[0]
        else:
            qtype = qrng.choices(list(TYPE_WEIGHTS), weights=list(TYPE_WEIGHTS.values()))[0]
    held_out = split in HELD_OUT_SPLITS
    question, answer = make_question(scene, qtype, qrng, allow_unseen=held_out)
    return Item(image=draw_scene(scene), question=question, answer=answer, qtype=qtype, scene=scene,
                split=split, index=index, seed=seed, slices={"unseen": scene.has_unseen})


def split_seed(split: str, seed: int = 0) -> int:
    """The generator seed sample_split draws a split's items with: `seed` itself, except for the
    report split, whose seeds start at REPORT_SEED (seed 0 is REPORT_SEED)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    return seed + SEED_OFFSETS[split]


def sample_split(split: str, n: int, seed: int = 0, start: int = 0) -> Iterator[Item]:
    """The first n items of a split (one question per image), the same for the same seed (the report
    split's drawn with generator seed split_seed("report", seed), seed 0 being REPORT_SEED)."""
    for index in range(start, start + n):
        yield make_item(split, index, split_seed(split, seed))


# --- scoring -----------------------------------------------------------------------------------

def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


_OBJECT_RE = re.compile(
    r"(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r") at the ("
    + "|".join(sorted(POSITIONS, key=len, reverse=True)) + r")(?![a-z])")


def parse_objects(text: str) -> set[tuple[str, str, str]]:
    """(colour, shape, position) triples named in a description."""
    return set(_OBJECT_RE.findall(normalise(text)))


def object_f1(predicted: str, truth: str) -> float:
    pred, gold = parse_objects(predicted), parse_objects(truth)
    if not pred or not gold:
        return float(pred == gold)
    tp = len(pred & gold)
    if tp == 0:
        return 0.0
    precision, recall = tp / len(pred), tp / len(gold)
    return 2 * precision * recall / (precision + recall)


def vocabulary() -> list[str]:
    """Every word the task's questions and answers use (the tokenizer adds the template words)."""
    words = set(NUMBERS) | set(COLOURS) | set(SHAPES) | set(PLURALS.values()) | {"nothing", "yes", "no"}
    for pos in POSITIONS:
        words.update(pos.split())
    for rel in RELATIONS:
        words.update(rel.split())
    text = ("what color is the object at shape how many objects are there where is there a describe image "
            "there are : , . ?")
    words.update(text.split())
    return sorted(words)
