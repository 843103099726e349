"""The edge's open sessions: who owns which, the quotas on opening one, idle-time expiry, and the
OPENs of closed sessions (a late duplicate must not bring one back).

Ownership: with CURVE keys a session answers only the device (public key) that opened it; another
device's session is treated as if it did not exist. Without authentication devices cannot be told
apart (a device's connection changes with every reconnection), so every device owns every session.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from covspec.edge_runtime.counters import log_completion
from covspec.edge_runtime.session import TargetSession
from covspec.edge_runtime.settings import EdgeSettings
from covspec.modes import STREAMING_MODES
from covspec.transport import protocol as wire

log = logging.getLogger("covspec.edge")

CLOSED_REMEMBERED = 4096  # sessions whose OPEN is remembered after CLOSE (a late duplicate is refused)


@dataclass
class SessionTable:
    settings: EdgeSettings
    sessions: dict[int, TargetSession] = field(default_factory=dict)
    closed: OrderedDict[int, int] = field(default_factory=OrderedDict)  # sid -> seq of its OPEN, closed sessions

    def owns(self, session: TargetSession, device: str) -> bool:
        """Whether `device` opened `session` (always, without authentication)."""
        return self.settings.keys is None or session.usage.device == device

    def find(self, sid: int, device: str) -> TargetSession | None:
        """`device`'s open session `sid`, or None (none, or another device's). Changes nothing."""
        session = self.sessions.get(sid)
        return session if session is not None and self.owns(session, device) else None

    def active(self, msg: wire.Message, device: str) -> TargetSession:
        """The message's session, marked active now; UNKNOWN_SESSION when `device` has none of that id."""
        session = self.find(msg.sid, device)
        if session is None:  # another device's session is answered as if it did not exist
            raise wire.ProtocolError(wire.ErrorCode.UNKNOWN_SESSION, f"no open session {msg.sid} (closed, expired or never opened)")
        session.last_active = time.monotonic()
        return session

    def admit(self, msg: wire.Open, device: str) -> TargetSession | None:
        """The session a retried OPEN made (its OPENED is sent again), or None when `device` may open
        session msg.sid now; ProtocolError when it may not (id, ownership, a late copy, quotas). The
        owner's new OPEN of an open session replaces it (a device resuming with a prefix)."""
        existing = self.sessions.get(msg.sid)
        if existing is not None and existing.open_seq == msg.seq and self.owns(existing, device):
            return existing
        if msg.sid == 0:
            raise wire.ProtocolError(wire.ErrorCode.BAD_MESSAGE, "OPEN.sid: must be a nonzero session id")
        if existing is not None and not self.owns(existing, device):
            raise wire.ProtocolError(wire.ErrorCode.BAD_STATE, f"OPEN.sid: session {msg.sid} is another device's")
        if existing is None and self.closed.get(msg.sid) == msg.seq:
            raise wire.ProtocolError(wire.ErrorCode.BAD_STATE, f"OPEN: a late copy of session {msg.sid}'s OPEN, closed since")
        s = self.settings
        if existing is None and len(self.sessions) >= s.max_sessions:
            raise wire.ProtocolError(wire.ErrorCode.BUSY, f"the edge holds its limit of {s.max_sessions} sessions")
        mine = sum(1 for sid, other in self.sessions.items() if sid != msg.sid and other.usage.device == device)
        if mine >= s.max_sessions_per_device:
            raise wire.ProtocolError(wire.ErrorCode.LIMIT,
                                     f"this device holds its limit of {s.max_sessions_per_device} open sessions: close one")
        return None

    def add(self, sid: int, session: TargetSession) -> None:
        self.sessions[sid] = session

    def close(self, sid: int, device: str) -> TargetSession | None:
        """Frees `device`'s session `sid` and logs its completion: the session, or None when it had none
        (closing twice is fine)."""
        session = self.find(sid, device)
        if session is None:
            return None
        del self.sessions[sid]
        self.closed[sid] = session.open_seq
        while len(self.closed) > CLOSED_REMEMBERED:
            self.closed.popitem(last=False)
        log_completion(sid, session.usage, len(session.committed), "closed")
        return session

    def free_idle(self) -> int:
        """Frees the sessions idle for over idle_timeout_s, logging each: how many."""
        now, timeout = time.monotonic(), self.settings.idle_timeout_s
        idle = [sid for sid, session in self.sessions.items() if now - session.last_active > timeout]
        for sid in idle:
            log.info("session %d idle for over %g s: freed", sid, timeout)
            session = self.sessions.pop(sid)
            log_completion(sid, session.usage, len(session.committed), "idle")
        return len(idle)

    def may_verify(self) -> int:
        """Sessions that may send a VERIFY now: open, not finished, not streaming-only (target_only, edge_sd)
        and not streaming the rest (a device that sent STREAM sends no VERIFY after it)."""
        return sum(1 for s in self.sessions.values() if not s.done and s.usage is not None and not s.stream_seqs
                   and s.usage.mode not in STREAMING_MODES)
