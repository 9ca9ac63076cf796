"""Per-turn voice latency and job-process memory on the offline local models, through the real stack.
  eval "$(scripts/stack --profile test env)"; scripts/bench-voice      (BENCH_TURNS, default 5)
Starts a worker with SG_PROVIDER=local (its own dispatch name), registers the local model server in Letta as a
BYOK provider, creates a throw-away Letta agent on it, joins a room as a participant with a microphone track and
asks BENCH_TURNS spoken questions (piper-made). Per turn it reads the framework's per-turn metrics from the
worker's `[TURN]` log lines (ChatMessage.metrics: end_of_turn_delay, transcription_delay, llm_node_ttft,
tts_node_ttfb, e2e_latency) and measures at the participant: end of its speech -> first agent audio received.
Then the PSS/RSS of the worker's processes (the job process holds the models). Prints numbers; asserts nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import statistics
import subprocess
import tempfile
import uuid
from functools import partial
from pathlib import Path

import livekit.plugins.offline as offline
from letta_client import AsyncLetta

from perf.exit import exit_process
from perf.procs import cmdline, descendants
from perf.stack import free_port, spawn_agent_worker, wait_registered
from sgapp.letta_admin import DEFAULT_HUMAN, DEFAULT_PERSONA, LOCAL_MODEL
from tests.support.human import StackInfo, make_token
from tests.support.voice import (
    LOCAL_PROVIDER,
    Transcript,
    VoiceParticipant,
    ensure_local_provider,
    read_wav_48k,
    speech_wav,
)

QUESTIONS = [
    "What is the capital of France?",
    "My favorite color is blue.",  # statements: the local model server's memory step runs (issue 14)
    "Can you tell me a fun fact about cats?",
    "I have a dog called Max.",
    "What should I cook for dinner tonight?",
    "How far away is the moon?",
    "Tell me something about the ocean.",
    "Why is the sky blue?",
]
TURNS = int(os.environ.get("BENCH_TURNS", "5"))


def mem_kb(pid: int) -> tuple[int, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        k, v = line.split(":", 1)
        fields[k] = int(v.split()[0])
    return fields.get("Pss", 0), fields.get("Rss", 0)


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):6.2f}" if xs else "     -"


def is_reply(human: VoiceParticipant, after: float, item: Transcript) -> bool:
    return item[0] > after and human.is_agent_speech(item)


def read_from(log: Path, offset: int) -> str:
    with open(log, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


async def main() -> int:
    env = os.environ
    agent_name = f"bench-voice-{os.getpid()}"
    log = Path(tempfile.mkdtemp(prefix="bench-voice-")) / "worker.log"
    ensure_local_provider(env["LETTA_BASE_URL"], env["SG_LOCALMODELS_URL"])
    letta = AsyncLetta(base_url=env["LETTA_BASE_URL"], max_retries=0, timeout=60)
    handle = next(m.handle for m in await letta.models.list() if m.model == LOCAL_MODEL and m.handle)
    emb = next(
        e.handle for e in await letta.models.embeddings.list() if e.handle and e.handle.startswith(LOCAL_PROVIDER)
    )
    agent = await letta.agents.create(
        name=f"bench-voice-{uuid.uuid4().hex[:6]}",
        model=handle,
        embedding=emb,
        memory_blocks=[{"label": "human", "value": DEFAULT_HUMAN}, {"label": "persona", "value": DEFAULT_PERSONA}],
    )
    worker_port = free_port()
    wenv = {
        **env,
        "SG_PROVIDER": "local",
        "AGENT_NAME": agent_name,
        "SG_WORKER_PORT": str(worker_port),
        # its own /metrics port: the profile's one (from `scripts/stack env`) may be taken by another worker
        "SG_METRICS_PORT": str(free_port()),
        "SG_MAX_JOBS": "4",
        "PYTHONUNBUFFERED": "1",
        "SG_NO_SHOW_TIMEOUT": "60",
    }
    wenv.pop("OPENAI_API_KEY", None)
    worker, offset = spawn_agent_worker(wenv, log)
    human: VoiceParticipant | None = None
    try:
        try:
            await asyncio.to_thread(
                wait_registered,
                worker,
                partial(read_from, log, offset),
                120,
                lambda: None,
                f"http://127.0.0.1:{worker_port}",
            )
        except RuntimeError as e:
            print(e)
            return 1
        models = offline.OfflineModels.load(threads=1)
        voice = offline.PiperTTS(voice=models.piper)
        tmp = log.parent
        clips = [read_wav_48k(speech_wav(voice, q, tmp / f"q{i}.wav")) for i, q in enumerate(QUESTIONS[:TURNS])]
        info = StackInfo(env["LIVEKIT_URL"], env["LIVEKIT_API_KEY"], env["LIVEKIT_API_SECRET"], agent_name)
        human = VoiceParticipant()
        await human.join(
            info.livekit_url,
            make_token(
                info, room=f"bench-voice-{uuid.uuid4().hex[:6]}", identity="bench-human", letta_agent_id=agent.id
            ),
        )
        await human.wait_for(human.is_agent_speech, 120, "no greeting")
        await human.wait_reply_audio(after=0.0)
        e2e_participant: list[float] = []
        for i, clip in enumerate(clips):
            t_end = await human.speak(clip)
            n_before = len([t for t in human.transcripts if human.is_agent_speech(t)])
            await human.wait_for(partial(is_reply, human, t_end), 120, f"no reply {i}")
            await human.wait_reply_audio(after=t_end)
            first = human.first_voiced_after(t_end)
            if first is not None:
                e2e_participant.append(first - t_end)
            reply = [t for t in human.transcripts if human.is_agent_speech(t)][n_before:]
            heard = [t[3] for t in human.transcripts if human.is_user_transcript(t)]
            print(f"turn {i + 1}: heard {heard[-1] if heard else '?'!r} -> {reply[-1][3] if reply else '?'!r}")
            await asyncio.sleep(0.5)
        # memory of the worker's processes: the job process (models loaded) and any idle prewarmed one
        procs = [(p, *mem_kb(p), cmdline(p) or "?") for p in [worker.pid, *descendants(worker.pid)]]
        lm_pid_file = Path(env.get("SG_STACK_DIR", ".stack-test")) / "run" / "localmodels.pid"
        lm = None
        if lm_pid_file.exists():
            with contextlib.suppress(OSError, ValueError):
                lm = mem_kb(int(lm_pid_file.read_text().split()[0]))
    finally:
        if human is not None:
            await human.aclose()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        await letta.agents.delete(agent.id)
        await letta.close()

    text = log.read_text(errors="replace")
    turns: dict[str, list[float]] = {}
    for m in re.finditer(r"\[TURN\] (user|assistant) (.*)", text):
        for k, v in re.findall(r"(\w+)=([\d.]+)", m.group(2)):
            turns.setdefault(k, []).append(float(v))
    # the greeting is an assistant message too (no e2e/llm metrics): only turns with llm_node_ttft count
    print(f"\nvoice pipeline on local models, {len(e2e_participant)} turns, medians in seconds (2 cores, shared box):")
    print(f"  end of speech -> end of turn (VAD)   {med(turns.get('end_of_turn_delay', []))}")
    print(f"  end of speech -> final transcript    {med(turns.get('transcription_delay', []))}   (whisper tiny.en)")
    print(f"  LLM first token through Letta        {med(turns.get('llm_node_ttft', []))}   (SmolLM2-135M)")
    print(f"  LLM first sentence through Letta     {med(turns.get('llm_node_ttfs', []))}   (the TTS waits for it)")
    print(f"  LLM tokens/s through Letta           {med(turns.get('llm_node_tps', []))}")
    print(f"  TTS first audio                      {med(turns.get('tts_node_ttfb', []))}   (piper joe, per sentence)")
    print(f"  e2e (framework: end of speech -> first agent audio)  {med(turns.get('e2e_latency', []))}")
    print(f"  e2e (participant: last sample sent -> first loud audio received)  {med(e2e_participant)}")
    for k, xs in sorted(turns.items()):
        print(f"    {k}: " + " ".join(f"{x:.2f}" for x in xs))
    print("memory (kB):")
    for pid, pss, rss, c in procs:
        role = "worker main" if pid == worker.pid else "child"
        print(f"  pid {pid} {role:11} PSS {pss:8d}  RSS {rss:8d}  {c[:80]}")
    if lm:
        print(f"  local model server          PSS {lm[0]:8d}  RSS {lm[1]:8d}")
    print(f"worker log: {log}")
    return 0


if __name__ == "__main__":
    exit_process(asyncio.run(main()))
