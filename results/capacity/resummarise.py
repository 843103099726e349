"""Rewrites a load run's load.md / load.json / load-summary.* / plots from its load.json and load.jsonl with the
current covspec/tools/load.py (the summary's edge counters kept): `python results/capacity/resummarise.py DIR`."""

import argparse
import json
import sys
from pathlib import Path

from covspec.tools.load import write_load

out = Path(sys.argv[1])
saved = json.loads((out / "load.json").read_text())
rows = [json.loads(line) for line in (out / "load.jsonl").read_text().splitlines()]
args = argparse.Namespace(command_line=saved["command"], edge=None, edge_info=None, edge_threads=1, batch_wait_ms=2.0,
                          replay=True, load_link="wifi", slo=saved.get("slo", ""))
write_load(out, saved["summary"], args, rows)
