"""CoVSpec: device-edge co-inference for vision-language models via speculative decoding.

The main jobs as functions (covspec/api.py, imported on first use so that `import covspec` stays
quick): `export`, `serve_edge`, `answer` (a `DeviceConfig` and an `AnswerConfig`; `answer_record` for
its figures), `bench`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["AnswerConfig", "DeviceConfig", "answer", "answer_record", "bench", "export", "load_draft", "open_device", "serve_edge"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from covspec import api

        return getattr(api, name)
    raise AttributeError(f"module 'covspec' has no attribute {name!r}")
