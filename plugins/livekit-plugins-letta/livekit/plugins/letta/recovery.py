"""A turn interrupted by its process dying: was it answered? Asked of Letta, which has the conversation.

Every user message this plugin sends carries the chat item's id as Letta's `otid` (stored with the message and
returned when the conversation's messages are listed). A process that takes a session over and finds its saved chat
history ending with a user message nobody answered looks that id up in the conversation:

- found, with assistant text after it: **answered** (Letta finished the run after the client went away: a streaming
  run is shielded from its client's disconnect in Letta 0.16.8) → the reply, to be said once;
- not found, and no run of the conversation active: **unanswered** (Letta never got it, or the run was cancelled or
  failed: Letta writes a turn's messages only when its first step completes, so a run that did not leaves nothing)
  → ask Letta again, once;
- a run still active: wait for it (bounded by `recover_timeout`), then look again; past the bound, cancel it, wait
  for it to stop (`settle_timeout`), look again;
- found without a reply and nothing running (a later step failed), or Letta unreachable: **unknown** → the agent
  says it lost the turn and asks the user to repeat it (never a guess that could answer twice).

Standalone: no session guard needed (`LettaSessions.recover_turn` is the guard's way in).
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from typing import Any

from letta_client import APIStatusError

from . import _logfmt as lf
from ._calls import is_not_found
from .conversation import ConversationMode, LettaConversation, _content_text
from .errors import LettaError

__all__ = ["RecoveryKind", "TurnRecovery", "find_turn"]

_PAGE = 50
"""Messages read, newest first: the interrupted turn is the newest user message, so this is plenty."""


class RecoveryKind(enum.StrEnum):
    NOTHING_PENDING = "nothing_pending"
    """The history does not end with an unanswered user message."""
    ANSWERED = "answered"
    """Letta has the message and a reply to it: say the reply."""
    UNANSWERED = "unanswered"
    """Letta does not have the message (and nothing runs that could still write it): ask Letta again."""
    UNKNOWN = "unknown"
    """Cannot tell (Letta unreachable, or it kept the message without a reply): ask the user to repeat it."""


@dataclass(frozen=True)
class TurnRecovery:
    kind: RecoveryKind
    user_text: str = ""
    reply: str = ""
    """The reply Letta wrote (ANSWERED)."""
    detail: str = ""
    """Why (for logs): what was found, what failed."""
    waited_runs: int = 0
    """Runs of the conversation that were still active and waited for (or cancelled)."""


@dataclass(frozen=True)
class _Seen:
    stored: bool
    reply: str


async def find_turn(conv: LettaConversation, otid: str, user_text: str) -> TurnRecovery:
    """Ask Letta about the turn whose user message carries `otid`. Holds the conversation meanwhile (a new turn
    waits). Never raises for Letta's errors (UNKNOWN)."""
    b = conv.backend
    opts = b.options

    def out(kind: RecoveryKind, detail: str, reply: str = "", waited: int = 0) -> TurnRecovery:
        return TurnRecovery(kind, user_text=user_text, reply=reply, detail=detail, waited_runs=waited)

    async with conv.exclusive():
        if conv.mode is ConversationMode.AGENT:
            return out(RecoveryKind.UNKNOWN, "no conversations API: the agent's own history is not searched")
        conv_id = conv.conversation_id
        if conv_id is None:
            return out(RecoveryKind.UNANSWERED, "the session has no Letta conversation yet: Letta never got it")
        try:
            seen = await _look(conv, conv_id, otid)
            if seen.reply:
                return out(RecoveryKind.ANSWERED, "Letta answered it after its client went away", seen.reply)
            active = await _active_runs(conv, conv_id)
            if active:
                lf.info("waiting for a run of the interrupted turn", runs=active, **_ids(conv))
                try:
                    async with asyncio.timeout(opts.recover_timeout):
                        for run in active:
                            await conv.wait_run(run)
                except TimeoutError:
                    lf.warning(
                        "the interrupted turn's run is still going: cancelling it",
                        runs=active,
                        waited_s=opts.recover_timeout,
                        **_ids(conv),
                    )
                    await b.cancel_runs(conv.agent_id, conv_id)
                    async with asyncio.timeout(opts.settle_timeout):
                        for run in active:
                            await conv.wait_run(run)
                seen = await _look(conv, conv_id, otid)
                if seen.reply:
                    return out(RecoveryKind.ANSWERED, "Letta's run finished the reply", seen.reply, len(active))
            if seen.stored:
                return out(
                    RecoveryKind.UNKNOWN,
                    "Letta kept the message but wrote no reply (its run failed after its first step)",
                    waited=len(active),
                )
            return out(RecoveryKind.UNANSWERED, "Letta does not have the message", waited=len(active))
        except TimeoutError:
            return out(RecoveryKind.UNKNOWN, "a cancelled run did not stop in time")
        except LettaError as e:
            return out(RecoveryKind.UNKNOWN, str(e))
        except APIStatusError as e:
            if is_not_found(e):
                await conv.replace_gone()
                return out(RecoveryKind.UNANSWERED, "Letta no longer has the conversation: a new one answers")
            return out(RecoveryKind.UNKNOWN, f"Letta answered {e.status_code}")


async def _look(conv: LettaConversation, conv_id: str, otid: str) -> _Seen:
    b = conv.backend
    page = await b.call(
        f"reading conversation {conv_id}",
        lambda t: b.client.conversations.messages.list(conv_id, order="desc", limit=_PAGE, timeout=t),
        op="messages_list",
    )
    replies: list[str] = []  # newest first, since the newest user message
    for m in page.items:
        kind = getattr(m, "message_type", None)
        if kind == "assistant_message":
            text = _content_text(getattr(m, "content", None)).strip()
            if text:
                replies.append(text)
        elif kind == "user_message":
            if getattr(m, "otid", None) == otid:
                return _Seen(stored=True, reply=" ".join(reversed(replies)))
            replies = []
    return _Seen(stored=False, reply="")


async def _active_runs(conv: LettaConversation, conv_id: str) -> list[str]:
    b = conv.backend
    page = await b.call(
        f"listing the active runs of conversation {conv_id}",
        lambda t: b.client.runs.list(conversation_id=conv_id, active=True, limit=10, timeout=t),
        op="runs_list",
    )
    return [str(r.id) for r in page.items]


def _ids(conv: LettaConversation) -> dict[str, Any]:
    return {
        "room": conv.room,
        "identity": conv.identity,
        "agent_id": conv.agent_id,
        "conversation_id": conv.conversation_id,
    }
