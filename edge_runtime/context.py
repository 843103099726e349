"""The values a request travels with on the edge: as received, as handled, and the round's batched
work it may take up. Light: no model code runs here."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from covspec.edge_runtime.batching import WindowPass
from covspec.models.base import DecodeState, VisualTokens
from covspec.transport import protocol as wire
from covspec.transport.channel import Request


@dataclass(eq=False)
class Incoming:
    """A received request and its decoded message (None when it does not decode: `handle` answers it).
    Compared and hashed by identity: two copies of one message are two requests."""

    request: Request
    msg: wire.Message | None
    at: float = field(default_factory=time.monotonic)  # when the edge received it
    held_over: bool = False  # a round left it held for a later one


@dataclass
class Prefilled:
    """An OPEN's prefill, done in a batched pass before its handler runs."""

    seq: int
    visual: VisualTokens
    logits: torch.Tensor  # [V] the prompt's last position
    state: DecodeState
    pass_s: float


@dataclass
class Prepared:
    """A round's batched passes, each taken (popped) by the handler of the request it was made for."""

    windows: dict[int, WindowPass] = field(default_factory=dict)  # sid -> its VERIFY's window
    prefills: dict[int, Prefilled] = field(default_factory=dict)  # sid -> its OPEN's prefill


@dataclass
class RequestContext:
    """Who sent the request being handled, and the round's batched work it may use."""

    device: str  # the device's public key (z85) when authenticated, else its connection (SessionUsage.device)
    prepared: Prepared = field(default_factory=Prepared)
