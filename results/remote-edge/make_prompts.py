"""Writes the prompts file of results/remote-edge: 12 held-out demo scenes (indices 200-211, outside the
bench's default prompts) saved as image files, half PNG and half JPEG, each with its question and the
task's answer as `reference`; even ones asked to describe the scene (long answers), odd ones the task's
own question (short answers). Run: python results/remote-edge/make_prompts.py"""

import json
from pathlib import Path

from covspec.demo.task import make_item, split_seed

here = Path(__file__).parent / "prompts"
(here / "images").mkdir(parents=True, exist_ok=True)
lines = []
for n, index in enumerate(range(200, 212)):
    item = make_item("heldout", index, split_seed("heldout", 0), qtype="describe" if n % 2 == 0 else None)
    name = f"images/scene{index}.{'png' if n % 2 == 0 else 'jpg'}"
    item.image.save(here / name, quality=95) if name.endswith("jpg") else item.image.save(here / name)
    lines.append({"image": name, "prompt": item.question, "reference": item.answer})
(here / "prompts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
print(f"{len(lines)} prompts: {here / 'prompts.jsonl'}")
