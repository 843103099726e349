"""A ZeroMQ-level fault injector for tests: sits between devices (DEALERs) and an edge (ROUTER) and
duplicates and delays messages in both directions.

Devices connect to `FaultProxy.endpoint` (a ROUTER); each device gets a DEALER of its own towards the
edge, so the edge still sees one peer per device. Every message is delivered once, or twice with
probability `duplicate`; each copy is held back `delay_s` with probability `delay` (held copies are
overtaken by later messages: delays reorder). `injected` counts what was done.
"""

from __future__ import annotations

import heapq
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass

import zmq

from .channel import make_socket


@dataclass(frozen=True)
class Faults:
    duplicate: float = 0.0  # probability that a message is delivered twice
    delay: float = 0.0  # probability that a copy is held back
    delay_s: float = 0.05
    seed: int = 0


class FaultProxy:
    def __init__(self, upstream: str, faults: Faults, bind: str = "tcp://127.0.0.1:*") -> None:
        self.upstream = upstream
        self.faults = faults
        self.injected: Counter[str] = Counter()
        self._rng = random.Random(faults.seed)
        self._ctx = zmq.Context()
        self._front = make_socket(self._ctx, zmq.ROUTER)
        self._front.bind(bind)
        self.endpoint = self._front.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        backs: dict[bytes, zmq.Socket] = {}  # device identity -> its DEALER towards the edge
        owners: dict[zmq.Socket, bytes] = {}
        poller = zmq.Poller()
        poller.register(self._front, zmq.POLLIN)
        held: list[tuple[float, int, zmq.Socket, list[bytes]]] = []
        n = 0
        try:
            while not self._stop.is_set():
                wait = 20 if not held else max(0, min(20, int((held[0][0] - time.monotonic()) * 1000)))
                for sock, _ in poller.poll(wait):
                    frames = sock.recv_multipart()
                    if sock is self._front:
                        device, frames = frames[0], frames[1:]
                        if device not in backs:
                            back = make_socket(self._ctx, zmq.DEALER)
                            back.connect(self.upstream)
                            backs[device], owners[back] = back, device
                            poller.register(back, zmq.POLLIN)
                        target, out = backs[device], frames
                    else:
                        target, out = self._front, [owners[sock], *frames]
                    for copy in range(2 if self._rng.random() < self.faults.duplicate else 1):
                        self.injected["duplicated"] += copy
                        delayed = self._rng.random() < self.faults.delay
                        self.injected["delayed"] += delayed
                        n += 1
                        heapq.heappush(held, (time.monotonic() + (self.faults.delay_s if delayed else 0.0), n, target, out))
                now = time.monotonic()
                while held and held[0][0] <= now:
                    _, _, target, out = heapq.heappop(held)
                    target.send_multipart(out)
                    self.injected["forwarded"] += 1
        finally:
            for sock in [self._front, *backs.values()]:
                sock.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._ctx.term()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
