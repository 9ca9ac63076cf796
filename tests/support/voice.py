"""A participant that talks with real audio: publishes speech (made with the packaged piper voice), records the
agent's audio and every lk.transcription stream. Used by tests/integration/test_voice_local.py and
scripts/bench-voice."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import wave
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import livekit.plugins.offline as offline
import numpy as np
from livekit import rtc

RATE = 48000
LOCAL_PROVIDER = "sg-local-models"
"""The name of the local model server as a BYOK provider in Letta (beside the stack's base provider)."""

Transcript = tuple[float, str, dict[str, str], str]
"""(monotonic time received, sender identity, stream attributes, text)"""
PCM = np.ndarray[Any, np.dtype[np.int16]]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def ensure_local_provider(letta_url: str, localmodels_url: str, name: str = LOCAL_PROVIDER) -> None:
    """The local model server as a BYOK `openai` provider in Letta: created, or moved to this URL. Creating it makes
    Letta list the server's models (handle `openai-proxy/smollm2-135m-instruct`) and embeddings
    (`sg-local-models/text-embedding-3-small`, served by MiniLM)."""
    url = letta_url.rstrip("/") + "/v1/providers/"
    body = {
        "name": name,
        "provider_type": "openai",
        "api_key": "sk-local-models",
        "base_url": localmodels_url,
    }
    with httpx.Client(timeout=60) as http:
        existing = http.get(url, params={"name": name}).raise_for_status().json()
        if not existing:
            http.post(url, json=body).raise_for_status()
        else:
            pid = existing[0]["id"]
            if existing[0].get("base_url") != localmodels_url:
                http.patch(
                    f"{url}{pid}", json={"api_key": body["api_key"], "base_url": localmodels_url}
                ).raise_for_status()
            # always: a refresh made while the server was down (a restart, another provider's refresh) lists nothing
            http.patch(f"{url}{pid}/refresh").raise_for_status()


def create_local_agent(letta: Any, letta_url: str, localmodels_url: str, name: str) -> str:
    """A Letta agent (sync client) on the local model server: its model and a MiniLM embedding handle."""
    from sgapp.letta_admin import DEFAULT_HUMAN, DEFAULT_PERSONA, LOCAL_MODEL

    ensure_local_provider(letta_url, localmodels_url)
    models = [m for m in letta.models.list() if m.handle and m.model == LOCAL_MODEL]
    assert models, f"Letta lists no {LOCAL_MODEL} model after registering {LOCAL_PROVIDER}"
    embedding = next(e.handle for e in letta.models.embeddings.list() if (e.handle or "").startswith(LOCAL_PROVIDER))
    agent = letta.agents.create(
        name=name,
        model=str(models[0].handle),
        embedding=embedding,
        memory_blocks=[{"label": "human", "value": DEFAULT_HUMAN}, {"label": "persona", "value": DEFAULT_PERSONA}],
        tags=["session-guard-test"],
    )
    assert agent.llm_config.model == LOCAL_MODEL
    assert agent.llm_config.api_model_endpoint == localmodels_url
    return str(agent.id)


def speech_wav(voice: offline.PiperTTS, text: str, path: Path) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(voice.sample_rate)
        w.writeframes(b"".join(voice.synthesize_sync(text)))
    return path


def read_wav_48k(path: Path) -> PCM:
    with wave.open(str(path), "rb") as w:
        rate, pcm = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    resampler = rtc.AudioResampler(rate, RATE, num_channels=1)
    out = [*resampler.push(rtc.AudioFrame(pcm.tobytes(), rate, 1, len(pcm))), *resampler.flush()]
    return np.concatenate([np.frombuffer(f.data, dtype=np.int16) for f in out])


def voiced_seconds(frames: list[rtc.AudioFrame], threshold: float = 300.0) -> float:
    """Seconds of 10 ms windows louder than `threshold` RMS (16-bit scale)."""
    if not frames:
        return 0.0
    rate = frames[0].sample_rate
    pcm = np.concatenate([np.frombuffer(f.data, dtype=np.int16) for f in frames]).astype(np.float32)
    win = rate // 100
    n = len(pcm) // win
    rms = np.sqrt((pcm[: n * win].reshape(n, win) ** 2).mean(axis=1))
    return float((rms > threshold).sum()) * 0.01


@dataclass
class VoiceParticipant:
    """Joins with a microphone track; `speak()` plays speech into it, silence otherwise (the VAD needs audio to see
    the end of speech). Owns its tasks: `aclose()` cancels and awaits them."""

    room: rtc.Room = field(default_factory=rtc.Room)
    transcripts: list[Transcript] = field(default_factory=list)
    audio: list[tuple[float, rtc.AudioFrame]] = field(default_factory=list)
    """The agent's audio as received, 16 kHz mono, stamped with the monotonic time it arrived."""
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    track_sid: str = ""

    def __post_init__(self) -> None:
        self.source = rtc.AudioSource(RATE, 1, queue_size_ms=50)
        self._queue: asyncio.Queue[tuple[PCM, asyncio.Future[float]]] = asyncio.Queue()
        self.room.register_text_stream_handler("lk.transcription", self._on_transcription)
        self.room.on("track_subscribed", self._on_track)

    def _spawn(self, coro: Awaitable[None]) -> None:
        t = asyncio.ensure_future(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    def _on_transcription(self, reader: rtc.TextStreamReader, sender: str) -> None:
        async def read() -> None:
            text = await reader.read_all()
            self.transcripts.append((time.monotonic(), sender, dict(reader.info.attributes or {}), text))

        self._spawn(read())

    def _on_track(self, track: rtc.Track, _pub: rtc.RemoteTrackPublication, p: rtc.RemoteParticipant) -> None:
        if track.kind == rtc.TrackKind.KIND_AUDIO and p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT:
            self._spawn(self._record(track))

    async def _record(self, track: rtc.Track) -> None:
        stream = rtc.AudioStream(track, sample_rate=16000, num_channels=1)
        try:
            async for ev in stream:
                self.audio.append((time.monotonic(), ev.frame))
        finally:
            await stream.aclose()

    async def _mic(self) -> None:
        step = RATE // 100
        silence = np.zeros(step, dtype=np.int16)
        while True:
            if not self._queue.empty():
                speech, done = self._queue.get_nowait()
                for i in range(0, len(speech), step):
                    chunk = speech[i : i + step]
                    if len(chunk) < step:
                        chunk = np.concatenate([chunk, silence[: step - len(chunk)]])
                    await self.source.capture_frame(rtc.AudioFrame(chunk.tobytes(), RATE, 1, step))
                done.set_result(time.monotonic())
            await self.source.capture_frame(rtc.AudioFrame(silence.tobytes(), RATE, 1, step))

    async def join(self, url: str, token: str) -> None:
        await asyncio.wait_for(self.room.connect(url, token), 20)
        track = rtc.LocalAudioTrack.create_audio_track("mic", self.source)
        pub = await self.room.local_participant.publish_track(
            track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        )
        self.track_sid = pub.sid
        self._spawn(self._mic())

    async def speak(self, speech: PCM) -> float:
        """Play `speech` (48 kHz mono) into the microphone; returns the monotonic time its last sample was sent."""
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((speech, done))
        return await done

    def agent_identity(self) -> str | None:
        for p in self.room.remote_participants.values():
            if p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT:
                return p.identity
        return None

    def is_agent_speech(self, item: Transcript) -> bool:
        """A final transcript of the agent's own speech."""
        _, sender, attrs, text = item
        return (
            sender == self.agent_identity()
            and attrs.get("lk.transcribed_track_id") != self.track_sid
            and attrs.get("lk.transcription_final", "true") == "true"
            and bool(text.strip())
        )

    def is_user_transcript(self, item: Transcript) -> bool:
        """A final transcript the agent made of our microphone."""
        _, _, attrs, text = item
        return (
            attrs.get("lk.transcribed_track_id") == self.track_sid
            and attrs.get("lk.transcription_final", "true") == "true"
            and bool(text.strip())
        )

    async def wait_for(self, pred: Callable[[Transcript], bool], timeout: float, what: str) -> Transcript:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for item in self.transcripts:
                        if pred(item):
                            return item
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise AssertionError(f"{what} within {timeout} s; transcripts: {self.transcripts!r}") from None

    def first_voiced_after(self, t: float) -> float | None:
        """When the first loud 10 ms of agent audio arrived after `t`."""
        for ts, frame in self.audio:
            if ts > t and voiced_seconds([frame]) > 0:
                return ts
        return None

    async def wait_reply_audio(self, after: float, timeout: float = 90.0) -> list[rtc.AudioFrame]:
        """The agent's audio after `after`, once it has spoken (> 0.4 s of loud audio) and then been quiet for 1.5 s."""
        frames: list[rtc.AudioFrame] = []
        recent: list[rtc.AudioFrame] = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    frames = [f for t, f in self.audio if t > after]
                    recent = [f for t, f in self.audio if t > time.monotonic() - 1.5]
                    if voiced_seconds(frames) > 0.4 and voiced_seconds(recent) == 0.0:
                        return frames
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise AssertionError(
                f"no complete reply audio within {timeout} s: {len(self.audio)} frames received, "
                f"{voiced_seconds(frames):.2f} s voiced after {after:.1f}, "
                f"{voiced_seconds(recent):.2f} s in the last 1.5 s"
            ) from None

    async def aclose(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        for t in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.room.disconnect()
        await self.source.aclose()
