"""`covspec demo show`: a few held-out questions answered by the demo target, with each image written
as a PNG so that it can be looked at."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from covspec.demo import default_target_path
from covspec.demo.evaluate import MAX_NEW_TOKENS, score_answer
from covspec.demo.task import sample_split
from covspec.generation import generate
from covspec.models import load_adapter
from covspec.sampling import SamplingParams


def show(n: int = 6, out_dir: Path = Path("runs/demo"), model: Path | None = None, split: str = "heldout",
         seed: int = 0, console: Console | None = None) -> float:
    """Answers the first n items of the split (every third one a "describe"); returns the mean score."""
    console = console or Console()
    adapter = load_adapter(model or default_target_path())
    table = Table(title=f"demo target on {split} questions (images in {out_dir})", show_lines=True)
    for column in ("image", "question", "answer", "expected", "right"):
        table.add_column(column)
    scores = []
    for item in sample_split(split, n, seed):
        path = item.save_image(out_dir)
        result = generate(adapter, item.image, item.question, SamplingParams(), max_new_tokens=MAX_NEW_TOKENS)
        score = score_answer(item, result.text)
        scores.append(score)
        mark = f"F1 {score:.2f}" if item.qtype == "describe" else ("yes" if score == 1.0 else "NO")
        table.add_row(str(path), item.question, result.text, item.answer, mark)
    console.print(table)
    return sum(scores) / max(1, len(scores))
