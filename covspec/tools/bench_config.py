"""`covspec bench`'s settings, one dataclass: the CLI's flags and their defaults derive from it, and the
Python API (`covspec.bench(**options)`) builds one directly, so neither asks argparse for a default.

Each field is one flag (`--name-with-dashes`, or `flag=` where it differs); its metadata carries the help
text and argparse's `type`/`choices`/`metavar`; a bool field is an on/off switch.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields

from covspec.modes import MODES, mode_labels

QUESTION_TYPES = ("describe", "mixed", "color", "shape", "count", "position", "existence", "relation")
LOCAL_LINKS = "loopback,4g"  # the link profiles of a bench that starts its own edge
REMOTE_LINKS = "direct"  # a bench against a running edge: no emulator ("direct"), unless --links asks


def option(default, help: str, **argparse_options):
    """A BenchConfig field: its default, its flag's help, and argparse's type/choices/metavar/group."""
    return field(default=default, metadata={"help": help, **argparse_options})


@dataclass
class BenchConfig:
    # what runs
    target: str | None = option(None, "target checkpoint, or an edge bundle (covspec export's OUT/edge) the bench "
                                "serves itself (default: the demo target; not with --edge)")
    draft: str | None = option(None, "draft checkpoint (default: the demo draft)")
    bundle: str | None = option(None, "the devices run this exported device bundle (covspec export's OUT/device) "
                                "instead of --draft (default: none, the draft checkpoint on PyTorch)")
    backend: str = option("auto", "what runs --bundle on the devices (auto: ExecuTorch when the bundle has its .pte, "
                          "else ONNX Runtime)", choices=("auto", "executorch", "onnx"))
    show_answers: bool = option(False, "print every answer's text under its row")
    modes: tuple[str, ...] = option(
        ("target_only", "vanilla_sd", "covspec", "draft_only"),
        f"comma-separated, target_only first (the reference answer): {', '.join(MODES)}; MODE@K sets a fixed "
        "window K (e.g. vanilla_sd@8) (default: target_only,vanilla_sd,covspec,draft_only)",
        type=mode_labels, metavar="MODE[@K],...")
    links: str | None = option(None, "link profiles, comma-separated, each an emulator (covspec link) in front of "
                               f"the edge; 'direct': none (default: {LOCAL_LINKS} for the bench's own edge, "
                               f"{REMOTE_LINKS} with --edge)")
    # the remote edge
    edge: str | None = option(None, "an edge already running (covspec edge serve) at tcp://HOST:PORT: the bench "
                              "starts no edge of its own, asks this one what it serves, and runs the devices "
                              "against it (default: none, the bench serves --target itself)")
    key: str | None = option(None, "with --edge: this device's CURVE secret key file (NAME.key_secret), for an edge "
                             "with --auth curve")
    edge_key: str | None = option(None, "with --edge: the edge's CURVE public key file (NAME.key)")
    edge_metrics: str | None = option(None, "the edge's Prometheus address (edge serve --metrics HOST:PORT), read "
                                      "before and after each run: verify batches, busy share, CPU per answer "
                                      "(default: none; the bench's own edge is read over STATS)")
    # the prompts
    prompts_file: str | None = option(None, "the user's prompts: a JSON Lines file ({\"image\": PATH relative to the "
                                      "file, \"prompt\": ..., \"reference\": optional expected answer} a line) or a "
                                      "folder of images asked --question (default: the demo's held-out prompts)")
    question: str | None = option(None, "with a --prompts-file folder: the question asked about every image")
    prompts: int | None = option(None, "prompts per link (default: 10 held-out demo prompts, or every prompt of "
                                 "--prompts-file)", type=int)
    start: int = option(0, "index of the first prompt", type=int)
    question_type: str = option("describe", "demo prompts: ask every scene this kind of question: describe gives "
                                "long answers, so decode tokens/s means something; mixed: the task's mix, mostly "
                                "one-word answers", choices=QUESTION_TYPES)
    window: int = option(4, "drafted tokens per verification (modes without @K)", type=int)
    keep: float | None = option(None, "share of visual tokens the pruning covspec modes keep (default: the mode's "
                                "own)", type=float)
    merge: bool = option(False, "pruning modes merge the dropped tokens into the kept ones (a draft trained so)")
    device_profile: str | None = option(None, "the devices run the draft at a named device's pace "
                                        "(device_runtime/profiles.json: smolvlm-256m, phone-xnnpack, jetson-orin-cpu..."
                                        "), a labelled emulation named in every row, never a measurement of that "
                                        "device (default: this machine's own pace)", metavar="NAME")
    # sampling (temperature 0 = greedy)
    temperature: float = option(0.0, "sampling temperature (0: greedy)", type=float, group="sampling")
    top_k: int = option(0, "keep the k most likely tokens (0: off)", type=int, group="sampling")
    top_p: float = option(1.0, "nucleus mass to keep (1: off)", type=float, group="sampling")
    seed: int | None = option(None, "sampling seed (default: none, unseeded)", type=int, group="sampling")
    max_new_tokens: int = option(48, "tokens of the answer at most", type=int, group="sampling")
    out: str = option("runs/bench", "output folder: rows, summary, plots, the workers' settings and the processes' logs")
    # load
    devices: str | None = option(None, "a load run instead: comma-separated device counts (e.g. 1,2,4,8), each that "
                                 "many device processes against one edge (--edge, or the bench's own), every device "
                                 "asking --prompts prompts in each mode; per-device and aggregate tokens/s, request "
                                 "latency percentiles, the edge's batches (see covspec/tools/load.py) (default: "
                                 "none, the link bench)")
    rate: str | None = option(None, "with --devices: open loop, requests arriving at R answers/s in all (Poisson), "
                              "comma-separated rates each a run of its own (default: none, closed loop: each "
                              "device asks its next prompt when it has its answer)")
    edge_device: str = option("cpu", "the bench's own edge's --device (cpu, cuda, cuda:N)")
    edge_dtype: str = option("float32", "the bench's own edge's --dtype", choices=("float32", "bfloat16", "float16"))
    edge_draft: str | None = option(None, "the draft the bench's own edge runs beside its target for edge_sd and "
                                    "covspec's placement ('none': no draft on the edge) (default: --draft, when a "
                                    "mode drafts there)")
    edge_draft_sessions: int | None = option(None, "the bench's own edge's --draft-sessions: it offers to draft for "
                                             "devices that can draft themselves while it holds at most this many "
                                             "unfinished sessions; a replayed load run records the hand-over for the "
                                             "device counts within it (default: the edge's own, 1)", type=int)
    batch_wait_ms: float = option(2.0, "the bench's own edge's batch_wait_ms (0: no batching)", type=float)
    edge_schedule: str = option("slo", "with --devices: the bench's own edge's --schedule (slo: windows first, OPENs "
                                "held while --slo allows; fifo: arrival order)", choices=("slo", "fifo"))
    edge_threads: int = option(1, "with --devices: the bench's own edge's torch threads (1: devices running the draft "
                               "on this machine need the other core; with --replay the devices hardly use one, so "
                               "the edge may take 2)", type=int)
    load_link: str = option("loopback", "with --devices: the link profile every device connection goes through "
                            "(loopback: straight to the edge)")
    slo: str = option("ttft=500,tpot=25", "with --devices: the latency SLO the goodput counts answers against, in ms: "
                      "time to first token (from arrival) and time per output token after the first; an answer meets "
                      "it when both are within, a run when its p99s are (default: ttft=500,tpot=25)",
                      metavar="ttft=MS,tpot=MS")
    answers: int | None = option(None, "with --devices: answers per device count in all, each of the N devices asking "
                                 "ceil(answers/N) prompts (default: none, --prompts per device)", type=int)
    replay: bool = option(False, "with --devices: one real device first answers every device's prompts (recording "
                          "its messages), then the N devices replay those messages (load generators: no draft runs "
                          "on them, so they leave the cores to the edge)")

    def __post_init__(self) -> None:
        if isinstance(self.modes, str):
            self.modes = mode_labels(self.modes)
        self.modes = tuple(self.modes)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """BenchConfig's fields as `covspec bench` flags, with `merge DIR...` (rows of several runs into one)."""
    p.add_argument("action", nargs="?", choices=("merge",),
                   help="merge: the rows of several bench or load runs (DIR..., e.g. one per machine that loaded the "
                        "same edge) into one summary in --out")
    p.add_argument("dirs", nargs="*", metavar="DIR", help="with merge: the output folders to merge")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(BenchConfig):
        meta = dict(f.metadata)
        group = meta.pop("group", None)
        target = p if group is None else groups.setdefault(group, p.add_argument_group(
            "sampling (temperature 0 = greedy)"))
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()
        if f.type in ("bool",) or isinstance(default, bool):
            target.add_argument(flag, action="store_true", default=default, help=meta["help"])
        else:
            target.add_argument(flag, default=default, **meta)


def config_from(args: argparse.Namespace) -> BenchConfig:
    """The BenchConfig of parsed `covspec bench` flags."""
    return BenchConfig(**{f.name: getattr(args, f.name) for f in fields(BenchConfig)})
