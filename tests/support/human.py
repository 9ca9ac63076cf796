"""A human test participant: a real `rtc.Room` that joins, talks on `lk.chat`, reads the agent on `lk.transcription`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

from livekit import api, rtc

TOPIC_CHAT = "lk.chat"
TOPIC_TRANSCRIPTION = "lk.transcription"


@dataclass(frozen=True)
class StackInfo:
    livekit_url: str
    api_key: str
    api_secret: str
    agent_name: str


def make_token(
    stack: StackInfo,
    *,
    room: str,
    identity: str,
    letta_agent_id: str | None = None,
    ttl: timedelta = timedelta(minutes=10),
    dispatch: bool = True,
) -> str:
    token = (
        api.AccessToken(stack.api_key, stack.api_secret)
        .with_identity(identity)
        .with_name(identity)
        .with_ttl(ttl)
        .with_grants(
            api.VideoGrants(room_join=True, room=room, can_publish=True, can_subscribe=True, can_publish_data=True)
        )
    )
    if dispatch:
        metadata = json.dumps({"letta_agent_id": letta_agent_id} if letta_agent_id else {})
        token = token.with_room_config(
            api.RoomConfiguration(agents=[api.RoomAgentDispatch(agent_name=stack.agent_name, metadata=metadata)])
        )
    return token.to_jwt()


@dataclass
class Reply:
    text: str
    segment_id: str
    final: bool


@dataclass
class Human:
    stack: StackInfo
    room_name: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex[:10]}")
    identity: str = field(default_factory=lambda: f"human-{uuid.uuid4().hex[:8]}")
    letta_agent_id: str | None = None
    dispatch: bool = True
    """False: the token carries no dispatch (a client that rejoins a room name with a plain token)."""

    def __post_init__(self) -> None:
        self.room = rtc.Room()
        self.replies: asyncio.Queue[Reply] = asyncio.Queue()
        self._readers: set[asyncio.Task[None]] = set()

    async def join(self, timeout: float = 15.0) -> None:
        self.room = rtc.Room()
        self.room.register_text_stream_handler(TOPIC_TRANSCRIPTION, self._on_transcription)
        token = make_token(
            self.stack,
            room=self.room_name,
            identity=self.identity,
            letta_agent_id=self.letta_agent_id,
            dispatch=self.dispatch,
        )
        await asyncio.wait_for(self.room.connect(self.stack.livekit_url, token), timeout)

    def _on_transcription(self, reader: rtc.TextStreamReader, sender: str) -> None:
        async def read() -> None:
            attrs = reader.info.attributes or {}
            text = await reader.read_all()
            # From any agent in the room, not only the newest: while a second job of the agent name is in the room
            # (it claims the room's lease, finds it held and leaves: up to one lease ttl) the owner still answers.
            # A second agent answering too would show as the same turn answered twice (the fault suite checks).
            agents = {a.identity for a in self.agents()}
            # The agent publishes its own speech and, when it transcribes audio, the user's speech on this topic:
            # a stream about one of this human's own tracks is the user's speech, every other one is a reply (the
            # page's rule). Not "a track the agent publishes": after the agent's connection restarts (a LiveKit
            # restart) its audio track is published again under a new sid, while its transcriptions keep naming
            # the first one.
            track_id = attrs.get("lk.transcribed_track_id", "")
            if sender not in agents:
                return
            if track_id and track_id in self.room.local_participant.track_publications:
                return
            await self.replies.put(
                Reply(
                    text=text,
                    segment_id=attrs.get("lk.segment_id", ""),
                    final=attrs.get("lk.transcription_final", "true") == "true",
                )
            )

        t = asyncio.create_task(read(), name=f"read-transcription-{self.identity}")
        self._readers.add(t)
        t.add_done_callback(self._readers.discard)

    def agents(self) -> list[rtc.RemoteParticipant]:
        """Agent participants in the room, oldest first."""
        found = [
            p for p in self.room.remote_participants.values() if p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
        ]
        return sorted(found, key=lambda p: (p.joined_at.timestamp() if p.joined_at else 0.0, p.identity))

    def agent(self) -> rtc.RemoteParticipant | None:
        """The agent this human talks to: the newest one (after a takeover, a dead agent stays listed until
        livekit-server times it out, ~15-20 s, beside the one that took the room over)."""
        found = self.agents()
        return found[-1] if found else None

    async def wait_for_agent(self, timeout: float = 30.0) -> rtc.RemoteParticipant:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            a = self.agent()
            if a is not None:
                return a
            await asyncio.sleep(0.05)
        raise TimeoutError(f"no agent joined room {self.room_name} within {timeout} s")

    async def next_reply(self, timeout: float = 30.0) -> str:
        reply = await asyncio.wait_for(self.replies.get(), timeout)
        return reply.text

    async def say(self, text: str) -> None:
        await self.room.local_participant.send_text(text, topic=TOPIC_CHAT)

    async def ask(self, text: str, timeout: float = 30.0, expect: str | None = None) -> str:
        """Send a message and return the agent's next reply (drops replies that arrived before); with `expect`,
        the next reply containing it (replies to other people in the room are broadcast too)."""
        while not self.replies.empty():
            self.replies.get_nowait()
        await self.say(text)
        async with asyncio.timeout(timeout):
            while True:
                reply = await self.next_reply(timeout)
                if expect is None or expect in reply:
                    return reply

    async def hang_up(self) -> None:
        """Leave like a user who clicked Disconnect (reason CLIENT_INITIATED)."""
        await self.room.disconnect()
        for t in list(self._readers):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t


class RemoteHuman:
    """A human in its own process (tests.support.participant_proc): `kill()` is a network drop, `leave()` a hang-up."""

    def __init__(self, stack: StackInfo, *, room: str, identity: str, letta_agent_id: str | None = None) -> None:
        self.stack = stack
        self.room_name = room
        self.identity = identity
        self.letta_agent_id = letta_agent_id
        self.sid = ""
        self._proc: asyncio.subprocess.Process | None = None
        self._events: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    async def join(self, timeout: float = 20.0) -> None:
        import sys

        token = make_token(self.stack, room=self.room_name, identity=self.identity, letta_agent_id=self.letta_agent_id)
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.support.participant_proc",
            self.stack.livekit_url,
            token,
            "--max-seconds",
            "300",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read(), name=f"remote-human-{self.identity}")
        joined = await self.wait_event("joined", timeout)
        self.sid = str(joined["sid"])

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        while line := await self._proc.stdout.readline():
            with contextlib.suppress(json.JSONDecodeError):
                await self._events.put(json.loads(line))

    async def wait_event(self, kind: str, timeout: float = 30.0) -> dict[str, object]:
        async with asyncio.timeout(timeout):
            while True:
                ev = await self._events.get()
                if ev.get("event") == kind:
                    return ev

    async def _send(self, **cmd: object) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self._proc.stdin.drain()

    async def ask(self, text: str, timeout: float = 30.0) -> str:
        while not self._events.empty():
            self._events.get_nowait()
        await self._send(cmd="say", text=text)
        return str((await self.wait_event("reply", timeout))["text"])

    async def leave(self) -> None:
        """Hang up (CLIENT_INITIATED) and wait for the process to end."""
        await self._send(cmd="leave")
        await self._finish(10.0)

    async def kill(self) -> None:
        """A network drop: the process dies without telling the server."""
        assert self._proc is not None
        self._proc.kill()
        await self._finish(5.0)

    async def _finish(self, timeout: float) -> None:
        assert self._proc is not None
        try:
            await asyncio.wait_for(self._proc.wait(), timeout)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def aclose(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            await self.kill()
