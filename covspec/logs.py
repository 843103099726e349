"""Logging for every covspec process: our own loggers (`covspec.*`) to stderr at the chosen level,
and library noise a user cannot act on (torchao's optional kernels that fail to load, torch's
pytree deprecation notices, transformers' weight-loading bars, Python warnings from libraries)
kept out unless `verbose`. Called first thing by the CLI, before torch or transformers import."""

from __future__ import annotations

import logging
import os
import warnings

LEVELS = ("debug", "info", "warning", "error")
NOISY = ("torchao", "torch", "torch.utils._pytree", "transformers", "executorch", "onnxruntime", "onnxscript", "onnx_ir", "zmq.auth",
         "urllib3", "PIL", "matplotlib", "huggingface_hub")


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def setup(level: str = "info", verbose: bool = False) -> None:
    """`level`: covspec's own messages (one of LEVELS). `verbose`: let the libraries speak too."""
    if level not in LEVELS:
        raise ValueError(f"log level {level!r}: choose one of {', '.join(LEVELS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    ours = logging.getLogger("covspec")
    ours.handlers[:] = [handler]
    ours.setLevel(level.upper())
    ours.propagate = False
    if verbose:
        return
    for name in NOISY:  # a filter, not a level: torch resets its loggers' levels when it is imported
        logging.getLogger(name).addFilter(_errors_only)
    logging.getLogger().addFilter(_errors_only)  # libraries that log on the root logger (onnxruntime's quantizer)
    os.environ.setdefault("TORCH_LOGS", "-all")  # torch's own handlers (its submodules' warnings): errors only
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|torchao|transformers|executorch|onnx).*")
