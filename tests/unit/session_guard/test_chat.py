"""ChatRouter: one owner of lk.chat; messages reach the sender's current AgentSession; none lost in a switchover."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from livekit import rtc
from livekit.agents import AgentSession
from livekit.agents.voice.room_io import TextInputEvent
from livekit.plugins.session_guard.chat import TOPIC_CHAT, ChatRouter

from .fakes import wait_for


class FakeReader:
    def __init__(self, text: str) -> None:
        self.text = text
        self.info = cast(rtc.TextStreamInfo, object())

    async def read_all(self) -> str:
        await asyncio.sleep(0)
        return self.text


class ChatRoom:
    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}
        self.remote_participants: dict[str, object] = {}

    def register_text_stream_handler(self, topic: str, handler: Any) -> None:
        if topic in self.handlers:
            raise ValueError(f"text stream handler for topic '{topic}' already set")
        self.handlers[topic] = handler

    def unregister_text_stream_handler(self, topic: str) -> None:
        self.handlers.pop(topic, None)

    def send(self, identity: str, text: str) -> None:
        self.remote_participants.setdefault(identity, object())
        self.handlers[TOPIC_CHAT](FakeReader(text), identity)


class Sess(rtc.EventEmitter[str]):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.closing = False

    def close(self) -> None:
        self.closing = True
        self.emit("close", None)


def make(room: ChatRoom, got: list[tuple[str, str]]) -> ChatRouter:
    def deliver(session: AgentSession[Any], ev: TextInputEvent) -> None:
        s = cast(Sess, session)
        if s.closing:
            raise RuntimeError("AgentSession is closing, cannot use generate_reply()")
        got.append((s.name, ev.text))

    router = ChatRouter(cast(rtc.Room, room), deliver=deliver, max_pending=3, max_age=60)
    router.attach()
    return router


def agent_session(s: Sess) -> AgentSession[Any]:
    return cast(AgentSession[Any], s)


async def test_messages_reach_the_senders_own_session() -> None:
    room, got = ChatRoom(), list[tuple[str, str]]()
    router = make(room, got)
    alice, bob = Sess("alice-1"), Sess("bob-1")
    router.set_target("alice", agent_session(alice))
    router.set_target("bob", agent_session(bob))
    room.send("alice", "hi from alice")
    room.send("bob", "hi from bob")
    await wait_for(lambda: len(got) == 2)
    assert sorted(got) == [("alice-1", "hi from alice"), ("bob-1", "hi from bob")]
    await router.aclose()


async def test_text_sent_during_a_switchover_is_held_and_delivered_in_order_to_the_new_session() -> None:
    room, got = ChatRoom(), list[tuple[str, str]]()
    router = make(room, got)
    old = Sess("old")
    router.set_target("u", agent_session(old))
    old.close()  # the connection stopped: no session for "u" until the next one starts
    room.send("u", "one")
    room.send("u", "two")
    await asyncio.sleep(0.05)
    assert got == []
    router.set_target("u", agent_session(Sess("new")))
    await wait_for(lambda: len(got) == 2)
    assert got == [("new", "one"), ("new", "two")]
    await router.aclose()


async def test_a_session_that_starts_closing_under_delivery_keeps_the_message() -> None:
    room, got = ChatRoom(), list[tuple[str, str]]()
    router = make(room, got)
    closing = Sess("closing")
    router.set_target("u", agent_session(closing))
    closing.closing = True  # closing, but its close event has not fired yet
    room.send("u", "not lost")
    await asyncio.sleep(0.05)
    router.set_target("u", agent_session(Sess("next")))
    await wait_for(lambda: got == [("next", "not lost")])
    await router.aclose()


async def test_held_messages_are_bounded_and_dropped_when_the_session_ends() -> None:
    room, got = ChatRoom(), list[tuple[str, str]]()
    router = make(room, got)
    for i in range(5):
        room.send("u", f"m{i}")
    await asyncio.sleep(0.05)
    assert router.dropped == 2  # max_pending=3 keeps the newest three
    router.forget("u")
    assert router.dropped == 5
    router.set_target("u", agent_session(Sess("later")))
    await asyncio.sleep(0.05)
    assert got == []
    await router.aclose()


async def test_the_router_owns_the_topic_once_and_gives_it_back() -> None:
    room = ChatRoom()
    router = make(room, [])
    with pytest.raises(ValueError):
        room.register_text_stream_handler(TOPIC_CHAT, lambda *_: None)
    await router.aclose()
    assert TOPIC_CHAT not in room.handlers


async def test_a_job_that_does_not_serve_the_room_discards_what_it_held_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    room, got = ChatRoom(), list[tuple[str, str]]()
    router = make(room, got)  # attached before the job knows whether it owns the room
    room.send("u", "typed while the job was claiming the room")
    await asyncio.sleep(0.05)
    router.discard()  # another job owns the room
    assert TOPIC_CHAT not in room.handlers
    await router.aclose()
    assert got == [] and router.dropped == 0
    assert "never reached a session" not in caplog.text
