"""One owner for the room's `lk.chat` topic: every typed message reaches the AgentSession of its sender's current
connection, and none is lost while a connection is being replaced.

Why not RoomIO's own text input: an `rtc.Room` has one handler per text-stream topic and each AgentSession's RoomIO
claims `lk.chat` for itself. With a new AgentSession per (re)connection, or one per human, that breaks twice:
- a second RoomIO finds the topic taken ("already set, ignoring"): that human's text never reaches its session;
- during a reconnect, text arrives while the old AgentSession is closing ("AgentSession is closing, cannot use
  generate_reply()") and before the new one exists: the message is dropped.
`ChatRouter` registers the topic once, routes by sender identity, and holds a sender's messages (bounded in count and
age) until that sender's next AgentSession is ready. AgentSessions are started with `text_input=False`.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from livekit import rtc
from livekit.agents import AgentSession
from livekit.agents.voice.room_io import TextInputEvent, TextInputOptions

from .log import logger
from .scope import TaskScope

__all__ = ["TOPIC_CHAT", "ChatRouter", "TextDelivery"]

TOPIC_CHAT = "lk.chat"

TextDelivery = Callable[[AgentSession[Any], TextInputEvent], Awaitable[None] | None]
"""How a message is handed to an AgentSession; default: the framework's own text input callback (interrupt the
agent, then reply), the same one RoomIO uses."""


@dataclass
class _Pending:
    text: str
    info: rtc.TextStreamInfo
    received: float


class ChatRouter:
    def __init__(
        self,
        room: rtc.Room,
        *,
        max_pending: int = 20,
        max_age: float = 60.0,
        deliver: TextDelivery | None = None,
    ) -> None:
        self._room = room
        self._deliver_cb: TextDelivery = deliver or TextInputOptions().text_input_cb
        self._max_pending = max_pending
        self._max_age = max_age
        self._targets: dict[str, AgentSession[Any]] = {}
        self._pending: dict[str, collections.deque[_Pending]] = {}
        self._scope = TaskScope("chat_router")
        self._registered = False
        self.dropped = 0

    def attach(self) -> None:
        self._room.register_text_stream_handler(TOPIC_CHAT, self._on_stream)
        self._registered = True

    def discard(self) -> None:
        """This job will not serve the room (another job owns it): stop taking its typed text and drop what is held,
        quietly (every agent in the room receives the same messages; the owner's router has them)."""
        if self._registered:
            self._room.unregister_text_stream_handler(TOPIC_CHAT)
            self._registered = False
        self._pending.clear()

    async def aclose(self) -> None:
        if self._registered:
            self._room.unregister_text_stream_handler(TOPIC_CHAT)
            self._registered = False
        self._targets.clear()
        for identity, queue in self._pending.items():
            if queue:
                logger.warning("[SESSION] %d typed message(s) from %s never reached a session", len(queue), identity)
                self.dropped += len(queue)
        self._pending.clear()
        await self._scope.aclose(timeout=2.0)

    def set_target(self, identity: str, session: AgentSession[Any]) -> None:
        """`session` is now where `identity`'s messages go; anything held for it is delivered in order."""
        self._targets[identity] = session

        def on_close(_: Any) -> None:
            self.clear_target(identity, session)

        session.once("close", on_close)
        queue = self._pending.pop(identity, None)
        if queue:
            self._scope.spawn(self._flush(identity, session, queue), name=f"chat_flush_{identity}")

    def clear_target(self, identity: str, session: AgentSession[Any]) -> None:
        if self._targets.get(identity) is session:
            del self._targets[identity]

    def forget(self, identity: str) -> None:
        """The sender's session ended: nothing held for it will ever be delivered."""
        self._targets.pop(identity, None)
        queue = self._pending.pop(identity, None)
        if queue:
            self.dropped += len(queue)
            logger.info("[SESSION] dropped %d typed message(s) of ended session %s", len(queue), identity)

    def _on_stream(self, reader: rtc.TextStreamReader, identity: str) -> None:
        # A plain function, as room handlers must be; the read happens in a task this router owns.
        self._scope.spawn(self._read(reader, identity), name=f"chat_read_{identity}")

    async def _read(self, reader: rtc.TextStreamReader, identity: str) -> None:
        text = await reader.read_all()
        if not self._registered:  # discarded (or closed) while the message was being read
            return
        item = _Pending(text=text, info=reader.info, received=time.monotonic())
        session = self._targets.get(identity)
        if session is not None and await self._deliver(identity, session, item):
            return
        self._hold(identity, item)

    def _hold(self, identity: str, item: _Pending) -> None:
        queue = self._pending.setdefault(identity, collections.deque())
        queue.append(item)
        while len(queue) > self._max_pending:
            queue.popleft()
            self.dropped += 1
            logger.warning("[SESSION] typed-message queue of %s is full: oldest dropped", identity)
        logger.info("[SESSION] held a typed message from %s until its session is ready", identity)

    async def _flush(self, identity: str, session: AgentSession[Any], queue: collections.deque[_Pending]) -> None:
        now = time.monotonic()
        while queue:
            item = queue.popleft()
            if now - item.received > self._max_age:
                self.dropped += 1
                logger.warning(
                    "[SESSION] dropped a typed message from %s held for %.0f s", identity, now - item.received
                )
                continue
            if not await self._deliver(identity, session, item):
                for rest in (item, *queue):  # the session went away mid-flush: hold the rest, in order
                    self._hold(identity, rest)
                return

    async def _deliver(self, identity: str, session: AgentSession[Any], item: _Pending) -> bool:
        participant = self._room.remote_participants.get(identity)
        if participant is None:
            return False
        try:
            result = self._deliver_cb(session, TextInputEvent(text=item.text, info=item.info, participant=participant))
            if asyncio.iscoroutine(result):
                await result
        except RuntimeError as e:  # the session started closing under us: hold it for the next one
            logger.info("[SESSION] session of %s is closing (%s): holding the message", identity, e)
            self.clear_target(identity, session)
            return False
        return True
