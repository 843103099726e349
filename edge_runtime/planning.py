"""What a VERIFY comes to, decided once for both paths: the handler that answers it, and the batched
pass that scores the round's windows ahead (only windows that will be verified are scored).

Order of the checks (the first that fails decides the reply):
1. the message (ProtocolError): scheme against the session's sampling, dists width, token ids below
   the vocabulary, a root when the device drew the last correction;
2. a retry of the round just answered: REPEAT (its stored answer is sent again);
3. the session's state (`TargetSession.round_problem`): a window sent ahead (`pos`) that does not
   fit is DROP (a BAD_ROUND reply, counted in windows_dropped); any other misfit is REFUSE (an error);
4. otherwise VERIFY, feeding the target `ids`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

from covspec.edge_runtime.session import TargetSession
from covspec.modes import VerifyScheme
from covspec.transport import protocol as wire


class Outcome(Enum):
    VERIFY = "verify"  # a new round: the target scores `ids`
    REPEAT = "repeat"  # the round just answered, retried
    DROP = "drop"  # a window sent ahead on an outcome that did not happen: BAD_ROUND, not an error
    REFUSE = "refuse"  # a round that does not fit the session: an error


@dataclass(frozen=True)
class VerifyPlan:
    outcome: Outcome
    scheme: VerifyScheme
    root: int  # the token the window follows
    draft: torch.Tensor  # [k] int64, the drafted tokens as sent
    problem: str = ""  # why dropped or refused
    ids: torch.Tensor | None = None  # [k'+1] the root and the drafts within the token limit (VERIFY only)


def scheme_of(msg: wire.Verify) -> VerifyScheme:
    """full: the draft's whole distributions came along; decoupled: its probability of each token; greedy: neither."""
    if msg.dists is not None:
        return VerifyScheme.FULL
    return VerifyScheme.DECOUPLED if msg.q is not None else VerifyScheme.GREEDY


def check_message(session: TargetSession, msg: wire.Verify, scheme: VerifyScheme, vocab: int) -> None:
    """Raises ProtocolError when the VERIFY does not fit its session whatever the round."""
    if scheme != VerifyScheme.GREEDY and session.params.greedy:
        raise wire.ProtocolError(wire.ErrorCode.BAD_MESSAGE, "VERIFY: q/dists sent for a greedy session")
    if scheme == VerifyScheme.GREEDY and not session.params.greedy:
        raise wire.ProtocolError(wire.ErrorCode.BAD_MESSAGE, "VERIFY: a sampling session needs q or dists")
    if msg.dists is not None and msg.dists.shape[1] != vocab:
        raise wire.ProtocolError(wire.ErrorCode.BAD_MESSAGE,
                                 f"VERIFY.dists: width {msg.dists.shape[1]}, the target's vocabulary is {vocab}")
    if (len(msg.tokens) and int(msg.tokens.max()) >= vocab) or (msg.root is not None and msg.root >= vocab):
        raise wire.ProtocolError(wire.ErrorCode.BAD_MESSAGE, f"VERIFY.tokens: token ids must be below the vocabulary size {vocab}")
    if msg.root is None and not session.root_known:
        raise wire.ProtocolError(wire.ErrorCode.BAD_STATE,
                                 "VERIFY.root: the last round was corrected on the device; send the correction as root")


def plan_verify(session: TargetSession, msg: wire.Verify, vocab: int) -> VerifyPlan:
    """What `msg` comes to on `session` (ProtocolError for a message that does not fit it). Changes nothing."""
    scheme = scheme_of(msg)
    check_message(session, msg, scheme, vocab)
    root = msg.root if msg.root is not None else session.committed[-1]
    draft = torch.from_numpy(msg.tokens.astype(np.int64))
    if session.is_repeat(msg.round):
        return VerifyPlan(Outcome.REPEAT, scheme, root, draft)
    problem = session.round_problem(msg.round, root, msg.pos)
    if problem is not None:
        return VerifyPlan(Outcome.DROP if msg.pos is not None else Outcome.REFUSE, scheme, root, draft, problem)
    return VerifyPlan(Outcome.VERIFY, scheme, root, draft, ids=session.feed_ids(root, draft))
