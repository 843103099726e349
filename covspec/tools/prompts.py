"""The user's own prompts for `covspec bench --prompts-file`: images and questions, checked before anything runs.

    --prompts-file FILE.jsonl    one JSON object a line: {"image": "photos/a.jpg", "prompt": "what is on the
                                 table?", "reference": "a red cup"}; `image` is a path relative to the file,
                                 `reference` (the expected answer) is optional; blank lines are skipped
    --prompts-file FOLDER --question "describe the image ."
                                 every image in FOLDER (sorted by name), each asked the one question

Every image is opened (as the device would: covspec.images.load_image) before the first answer, so a
broken line, a missing, oversized or unreadable image is a `PromptsError` naming the line (or the file)
and the fix, in seconds. With references, `task_score` is the answer's token F1 against the reference
(SQuAD's: lower case, punctuation and articles dropped), 1.0 for an exact match.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from covspec.errors import CovspecError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FIELDS = {"image", "prompt", "reference"}


class PromptsError(CovspecError):
    """A prompts file or folder that cannot be asked; the message names the line or the file."""


@dataclass(frozen=True)
class UserPrompt:
    image: str  # the image file's path (absolute)
    prompt: str
    reference: str | None = None  # the expected answer, when the file gives one
    where: str = ""  # "FILE:LINE" or the image's path, for messages


def load_prompts(source: str | Path, question: str | None = None) -> list[UserPrompt]:
    """The prompts of a JSON Lines file, or of a folder of images asked `question`; every image checked."""
    from covspec.errors import ImageError
    from covspec.images import load_image

    path = Path(source)
    if path.is_dir():
        prompts = _folder(path, question)
    elif path.is_file():
        if question is not None:
            raise PromptsError(f"--question goes with a folder of images; {path} is a file whose lines carry "
                               "their own prompts")
        prompts = _lines(path)
    else:
        raise PromptsError(f"--prompts-file {path}: no such file or folder")
    if not prompts:
        raise PromptsError(f"--prompts-file {path}: no prompts in it" + (
            f" (no image files: {', '.join(IMAGE_SUFFIXES)})" if path.is_dir() else ""))
    for p in prompts:
        try:
            load_image(p.image)
        except ImageError as err:
            raise PromptsError(f"{p.where}: {err}") from None
    return prompts


def _folder(folder: Path, question: str | None) -> list[UserPrompt]:
    if not question or not question.strip():
        raise PromptsError(f"--prompts-file {folder} is a folder of images: give the question to ask about each "
                           "with --question 'QUESTION'")
    images = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    return [UserPrompt(image=str(f.resolve()), prompt=question, where=str(f)) for f in images]


def _lines(path: Path) -> list[UserPrompt]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise PromptsError(f"--prompts-file {path}: cannot be read as text ({err})") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptsError(f"{where}: not a JSON object ({err.msg} at column {err.colno}); each line is "
                               '{"image": "PATH", "prompt": "QUESTION", "reference": "ANSWER" (optional)}') from None
        if not isinstance(entry, dict):
            raise PromptsError(f"{where}: a JSON {type(entry).__name__}, expected an object with image and prompt")
        unknown = sorted(set(entry) - FIELDS)
        if unknown:
            raise PromptsError(f"{where}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                               f"(fields: {', '.join(sorted(FIELDS))})")
        for name in ("image", "prompt"):
            if not isinstance(entry.get(name), str) or not entry[name].strip():
                raise PromptsError(f"{where}: '{name}' missing or not a non-empty string")
        reference = entry.get("reference")
        if reference is not None and not isinstance(reference, str):
            raise PromptsError(f"{where}: 'reference' must be a string (the expected answer)")
        image = Path(entry["image"]).expanduser()
        image = image if image.is_absolute() else path.parent / image
        prompts.append(UserPrompt(image=str(image.resolve()), prompt=entry["prompt"], reference=reference,
                                  where=where))
    return prompts


def _words(text: str) -> list[str]:
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def task_score(answer: str, reference: str) -> float:
    """Token F1 of `answer` against `reference` (SQuAD's normalisation); 1.0 when they are equal."""
    got, want = _words(answer), _words(reference)
    if not got or not want:
        return float(got == want)
    common = sum((Counter(got) & Counter(want)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)
