"""An audio round trip on the offline local models through the real stack.

A real `rtc.Room` participant publishes a WAV of a spoken question (made here with the packaged piper voice); a
worker started with SG_PROVIDER=local hears it with whisper (the user transcript it publishes on lk.transcription is
checked), Letta answers on the local model server (SmolLM2, registered in Letta as a BYOK provider beside the test
provider that every other test keeps using), and the agent speaks the answer with piper; the audio the participant
receives is transcribed back with whisper here and must be speech.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import livekit.plugins.offline as offline
import numpy as np
import pytest
from letta_client import Letta
from livekit import rtc

from sgapp.letta_admin import DEFAULT_HUMAN, DEFAULT_PERSONA, LOCAL_MODEL
from tests.support.human import StackInfo, make_token

from .conftest import AGENT_NAME, Stack, WorkerProc, start_worker

pytestmark = [pytest.mark.stack, pytest.mark.slow]

QUESTION = "What is the capital of France?"
LOCAL_PROVIDER = "sg-local-models"
RATE = 48000


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


@pytest.fixture(scope="module")
def models() -> offline.OfflineModels:
    return offline.OfflineModels.load(threads=1)


def ensure_local_provider(stack: Stack) -> None:
    """The local model server as a BYOK `openai` provider in Letta (created, or moved to this stack's port)."""
    url = stack.env.get("SG_LOCALMODELS_URL")
    assert url, "the test stack runs no local model server (SG_LOCALMODELS_URL unset): scripts/stack --profile test up"
    letta = stack.letta_url + "/v1/providers/"
    body = {"name": LOCAL_PROVIDER, "provider_type": "openai", "api_key": "sk-local-models", "base_url": url}
    with httpx.Client(timeout=60) as http:
        existing = http.get(letta, params={"name": LOCAL_PROVIDER}).raise_for_status().json()
        if not existing:
            http.post(letta, json=body).raise_for_status()
        elif existing[0].get("base_url") != url:
            pid = existing[0]["id"]
            http.patch(f"{letta}{pid}", json={"api_key": body["api_key"], "base_url": url}).raise_for_status()
            http.patch(f"{letta}{pid}/refresh").raise_for_status()


@pytest.fixture
def local_agent(stack: Stack, letta_sync: Letta) -> Iterator[str]:
    ensure_local_provider(stack)
    models = [m for m in letta_sync.models.list() if m.handle and m.model == LOCAL_MODEL]
    embeddings = [e.handle for e in letta_sync.models.embeddings.list() if e.handle]
    assert models, f"Letta lists no {LOCAL_MODEL} model after registering {LOCAL_PROVIDER}"
    embedding = next(h for h in embeddings if h.startswith(LOCAL_PROVIDER + "/"))
    agent = letta_sync.agents.create(
        name=f"test-local-{uuid.uuid4().hex[:8]}",
        model=str(models[0].handle),
        embedding=embedding,
        memory_blocks=[{"label": "human", "value": DEFAULT_HUMAN}, {"label": "persona", "value": DEFAULT_PERSONA}],
        tags=["session-guard-test"],
    )
    assert agent.llm_config.model == LOCAL_MODEL
    assert agent.llm_config.api_model_endpoint == stack.env["SG_LOCALMODELS_URL"]
    yield agent.id
    with contextlib.suppress(Exception):
        letta_sync.agents.delete(agent.id)


@pytest.fixture(scope="module")
def local_worker(stack: Stack) -> Iterator[WorkerProc]:
    w = start_worker(
        stack,
        name=f"local-{uuid.uuid4().hex[:6]}",
        extra_env={
            "SG_PROVIDER": "local",
            "SG_LOCALMODELS_URL": stack.env.get("SG_LOCALMODELS_URL", ""),
            # its own dispatch name: the suite's `worker` (test provider) must not get these rooms
            "AGENT_NAME": AGENT_NAME + "-local",
        },
        timeout=120,
    )
    yield w
    w.stop()
    assert "Task was destroyed but it is pending" not in w.log_text()


def question_wav(models: offline.OfflineModels, path: Path) -> Path:
    frames = []
    tts = offline.PiperTTS(voice=models.piper)
    for pcm in tts.synthesize_sync(QUESTION):
        frames.append(pcm)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(tts.sample_rate)
        w.writeframes(b"".join(frames))
    return path


def read_wav_48k(path: Path) -> np.ndarray[Any, np.dtype[np.int16]]:
    with wave.open(str(path), "rb") as w:
        rate, pcm = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    resampler = rtc.AudioResampler(rate, RATE, num_channels=1)
    out = [*resampler.push(rtc.AudioFrame(pcm.tobytes(), rate, 1, len(pcm))), *resampler.flush()]
    return np.concatenate([np.frombuffer(f.data, dtype=np.int16) for f in out])


@dataclass
class Listener:
    """What the participant receives: transcription streams and the agent's audio, time-stamped."""

    transcripts: list[tuple[float, str, dict[str, str], str]] = field(default_factory=list)
    audio: list[tuple[float, rtc.AudioFrame]] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def on_transcription(self, reader: rtc.TextStreamReader, sender: str) -> None:
        async def read() -> None:
            text = await reader.read_all()
            self.transcripts.append((time.monotonic(), sender, dict(reader.info.attributes or {}), text))

        self.spawn(read())

    def spawn(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def record(self, track: rtc.Track) -> None:
        stream = rtc.AudioStream(track, sample_rate=16000, num_channels=1)
        try:
            async for ev in stream:
                self.audio.append((time.monotonic(), ev.frame))
        finally:
            await stream.aclose()

    async def aclose(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        for t in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def wait_for(self, pred: Any, timeout: float, what: str) -> tuple[float, str, dict[str, str], str]:
        async with asyncio.timeout(timeout):
            while True:
                for item in self.transcripts:
                    if pred(item):
                        return item
                await asyncio.sleep(0.1)
        raise AssertionError(what)  # unreachable: the timeout raises


async def mic(source: rtc.AudioSource, speech: np.ndarray[Any, np.dtype[np.int16]], go: asyncio.Event) -> None:
    """Silence until `go`, then the question, then silence for ever (the VAD needs audio to see the end of speech)."""
    step = RATE // 100
    silence = np.zeros(step, dtype=np.int16)
    spoken = False
    while True:
        if go.is_set() and not spoken:
            spoken = True
            for i in range(0, len(speech), step):
                chunk = speech[i : i + step]
                if len(chunk) < step:
                    chunk = np.concatenate([chunk, silence[: step - len(chunk)]])
                await source.capture_frame(rtc.AudioFrame(chunk.tobytes(), RATE, 1, step))
        await source.capture_frame(rtc.AudioFrame(silence.tobytes(), RATE, 1, step))


def voiced_seconds(frames: list[rtc.AudioFrame]) -> float:
    if not frames:
        return 0.0
    pcm = np.concatenate([np.frombuffer(f.data, dtype=np.int16) for f in frames]).astype(np.float32)
    win = 160  # 10 ms at 16 kHz
    n = len(pcm) // win
    rms = np.sqrt((pcm[: n * win].reshape(n, win) ** 2).mean(axis=1))
    return float((rms > 300).sum()) * 0.01


async def test_spoken_question_gets_a_spoken_answer_from_the_local_models(
    stack: Stack,
    local_worker: WorkerProc,
    local_agent: str,
    models: offline.OfflineModels,
    tmp_path: Path,
) -> None:
    wav = question_wav(models, tmp_path / "question.wav")
    speech = read_wav_48k(wav)
    info = StackInfo(stack.info.livekit_url, stack.info.api_key, stack.info.api_secret, AGENT_NAME + "-local")
    room_name = f"test-voice-{uuid.uuid4().hex[:8]}"
    identity = f"human-{uuid.uuid4().hex[:6]}"
    room = rtc.Room()
    listener = Listener()
    room.register_text_stream_handler("lk.transcription", listener.on_transcription)

    @room.on("track_subscribed")
    def _subscribed(track: rtc.Track, pub: rtc.RemoteTrackPublication, p: rtc.RemoteParticipant) -> None:
        if track.kind == rtc.TrackKind.KIND_AUDIO and p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT:
            listener.spawn(listener.record(track))

    source = rtc.AudioSource(RATE, 1)
    go = asyncio.Event()
    try:
        token = make_token(info, room=room_name, identity=identity, letta_agent_id=local_agent)
        await asyncio.wait_for(room.connect(info.livekit_url, token), 20)
        track = rtc.LocalAudioTrack.create_audio_track("mic", source)
        opts = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        pub = await room.local_participant.publish_track(track, opts)
        listener.spawn(mic(source, speech, go))

        def agent_identity() -> str | None:
            for p in room.remote_participants.values():
                if p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT:
                    return p.identity
            return None

        def is_agent_speech(item: tuple[float, str, dict[str, str], str]) -> bool:
            _, sender, attrs, text = item
            return (
                sender == agent_identity()
                and attrs.get("lk.transcribed_track_id") != pub.sid
                and attrs.get("lk.transcription_final", "true") == "true"
                and bool(text.strip())
            )

        # the greeting first (spoken with piper), so the question does not talk over it
        await listener.wait_for(is_agent_speech, 120, "no greeting from the agent")
        await asyncio.sleep(1.0)
        t_speak = time.monotonic()
        go.set()

        _, _, _, heard = await listener.wait_for(
            lambda it: (
                it[2].get("lk.transcribed_track_id") == pub.sid
                and it[2].get("lk.transcription_final", "true") == "true"
                and bool(it[3].strip())
            ),
            90,
            "the agent published no transcript of the question",
        )
        assert {"capital", "france"} <= set(words(heard)), heard

        t_reply, _, _, reply = await listener.wait_for(
            lambda it: it[0] > t_speak and is_agent_speech(it), 120, "no spoken reply from the agent"
        )
        assert words(reply), reply
        assert not reply.startswith("You said:"), "answered by the test provider, not the local model"
        # Letta asked the local model server, not the test provider, for this answer
        for req in stack.provider_requests(50):
            assert QUESTION.lower() not in " ".join(req.get("user_turns") or []).lower()

        # the reply's audio, as received: wait until it has been playing and then went quiet for 1.5 s
        async with asyncio.timeout(90):
            while True:
                after = [f for t, f in listener.audio if t > t_speak + len(speech) / RATE]
                recent = [f for t, f in listener.audio if t > time.monotonic() - 1.5]
                if voiced_seconds(after) > 1.0 and voiced_seconds(recent) == 0.0:
                    break
                await asyncio.sleep(0.25)
        received = rtc.combine_audio_frames(after)
        text, _ = offline.WhisperSTT(model=models.whisper).transcribe_sync(offline.to_whisper_input(received))
        assert words(text), "the agent's audio transcribes to nothing"
        overlap = set(words(text)) & set(words(reply))
        assert len(overlap) >= max(1, len(set(words(reply))) // 3), (text, reply)
        print(f"question heard as {heard!r}; reply {reply!r}; reply audio heard as {text!r}")
        print(f"spoken at {t_speak:.1f}, reply transcript after {t_reply - t_speak:.1f} s")
    finally:
        await listener.aclose()
        await room.disconnect()
        await source.aclose()
