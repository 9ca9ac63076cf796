"""A human participant in its own process, driven over stdin/stdout with JSON lines.

    python -m tests.support.participant_proc URL TOKEN

Commands (stdin): {"cmd": "say", "text": ...} | {"cmd": "leave"}.
Events (stdout): {"event": "joined", "sid": ...} | {"event": "agent", "identity": ...} | {"event": "reply", "text": ...}
| {"event": "left"} | {"event": "error", "message": ...}.

A test kills this process with SIGKILL to make a network drop: the server sees the connection vanish, never a
CLIENT_INITIATED leave. The process also exits by itself after --max-seconds, so nothing outlives a test run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from livekit import rtc

from perf.exit import exit_process
from tests.support.human import TOPIC_CHAT, TOPIC_TRANSCRIPTION


def emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def run(url: str, token: str, max_seconds: float) -> None:
    room = rtc.Room()
    readers: set[asyncio.Task[None]] = set()

    def agent() -> rtc.RemoteParticipant | None:
        for p in room.remote_participants.values():
            if p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT:
                return p
        return None

    def on_transcription(reader: rtc.TextStreamReader, sender: str) -> None:
        async def read() -> None:
            attrs = reader.info.attributes or {}
            text = await reader.read_all()
            a = agent()
            track_id = attrs.get("lk.transcribed_track_id", "")
            if a is None or sender != a.identity or (track_id and track_id not in a.track_publications):
                return
            emit(event="reply", text=text)

        t = asyncio.create_task(read())
        readers.add(t)
        t.add_done_callback(readers.discard)

    def on_participant(p: rtc.RemoteParticipant) -> None:
        if p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT:
            emit(event="agent", identity=p.identity)

    room.register_text_stream_handler(TOPIC_TRANSCRIPTION, on_transcription)
    room.on("participant_connected", on_participant)
    await room.connect(url, token)
    emit(event="joined", sid=room.local_participant.sid, identity=room.local_participant.identity)
    if agent() is not None:
        emit(event="agent", identity=agent().identity)  # type: ignore[union-attr]

    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    try:
        async with asyncio.timeout(max_seconds):
            while True:
                line = await stdin.readline()
                if not line:
                    break
                cmd = json.loads(line)
                if cmd["cmd"] == "say":
                    await room.local_participant.send_text(cmd["text"], topic=TOPIC_CHAT)
                elif cmd["cmd"] == "leave":
                    break
    except TimeoutError:
        emit(event="error", message=f"no command for {max_seconds} s: leaving")
    finally:
        await room.disconnect()
        for t in list(readers):
            t.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        emit(event="left")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("token")
    ap.add_argument("--max-seconds", type=float, default=300.0)
    args = ap.parse_args()
    asyncio.run(run(args.url, args.token, args.max_seconds))
    exit_process(0)


if __name__ == "__main__":
    main()
