"""The conversation-quality score of the offline default, per model, through the real stack (issue 14).
  eval "$(scripts/stack --profile test env)"; scripts/score-conversations [ID=GGUF ...] [--no-memory-step] [--recall N]

For each model (default: the packaged one; `ID=PATH` serves another GGUF under that id) it starts a local model
server (the localmodels venv, 1 llama.cpp thread, its own port), points the `sg-local-models` BYOK provider of the
stack's Letta at it, creates a throw-away Letta agent on it and plays tests/support/conversations.py: each session a
new Letta conversation of that agent (a hang-up: in-session history gone, memory blocks kept). Prints every reply,
the rule score per model, the `human` block at the end, the first-token latency through Letta and the model server's
own numbers (prompt tokens, first token, tokens/s from its `chat done` lines), then `--recall N` times (default
10) issue 14's own check on a fresh agent: "My favorite color is blue.", a new conversation, "What is my favorite
color?" - whether the answer says blue and the `human` block holds it. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from letta_client import Letta
from letta_client.types import AgentState

from localmodels.chat import FRAME, STYLE
from localmodels.paths import ROOT, venv_path
from perf.exit import exit_process
from perf.procs import loadavg
from perf.stack import free_port
from sgapp.letta_admin import DEFAULT_HUMAN, DEFAULT_PERSONA, LOCAL_MODEL
from tests.support.conversations import RULES, SESSIONS, Judge, Score, count, summary, words
from tests.support.voice import ensure_local_provider

SCORE_PROVIDER = "sg-score-models"
SCORE_PREFIX = f"score{os.getpid()}-"
"""Its own BYOK provider in Letta and model ids of its own, new each run: the tests' `sg-local-models` is left
alone, and Letta 0.16.8 never re-creates a model id its provider once stopped listing (the soft-deleted row keeps
the handle: "already exists (concurrent insert), skipping")."""


@dataclass
class Result:
    model: str
    scores: list[Score] = field(default_factory=list)
    first_token_s: list[float] = field(default_factory=list)
    human_block: str = ""
    server: dict[str, list[float]] = field(default_factory=dict)
    recall: list[tuple[bool, bool, str]] = field(default_factory=list)
    """Per recall run: the new session's answer says blue, the `human` block holds blue, the answer."""


def start_server(
    model_id: str, gguf: Path | None, memory: bool, log: Path, chat_format: str | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [str(venv_path() / "bin" / "python"), "-m", "localmodels", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--threads", os.environ.get("LOCALMODELS_THREADS", "1"), "--model-id", SCORE_PREFIX + model_id]
    if gguf is not None:
        cmd += ["--gguf", str(gguf)]
    if not memory:
        cmd.append("--no-memory-step")
    if chat_format:
        cmd += ["--chat-format", chat_format]
    out = log.open("wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if "localmodels listening on" in log.read_text(errors="replace"):
            return proc, f"http://127.0.0.1:{port}/v1"
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError(f"the model server for {model_id} did not start:\n{log.read_text(errors='replace')}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def say(letta: Letta, conversation: str, text: str) -> tuple[str, float | None]:
    t0 = time.perf_counter()
    first: float | None = None
    pieces: list[str] = []
    stream = letta.conversations.messages.create(conversation, input=text, streaming=True, stream_tokens=True)
    for event in stream:
        if getattr(event, "message_type", None) == "assistant_message":
            content = getattr(event, "content", None)
            piece = content if isinstance(content, str) else "".join(getattr(c, "text", "") for c in content or [])
            if piece and first is None:
                first = time.perf_counter() - t0
            pieces.append(piece)
    return "".join(pieces).strip(), first


def new_agent(letta: Letta, handle: str, emb: str, model_id: str) -> AgentState:
    return letta.agents.create(
        name=f"score-{re.sub(r'[^A-Za-z0-9_-]', '-', model_id)}-{uuid.uuid4().hex[:6]}",
        model=handle,
        embedding=emb,
        memory_blocks=[{"label": "human", "value": DEFAULT_HUMAN}, {"label": "persona", "value": DEFAULT_PERSONA}],
        tags=["session-guard-test"],
    )


RECALL_FACT = "My favorite color is blue."
RECALL_QUESTION = "What is my favorite color?"


def recall_run(letta: Letta, handle: str, emb: str, model_id: str) -> tuple[bool, bool, str]:
    """Issue 14's own test, on a fresh agent: the fact in one conversation, the question in a new one (a hang-up
    between them: only Letta's memory carries it)."""
    agent = new_agent(letta, handle, emb, model_id)
    try:
        say(letta, letta.conversations.create(agent_id=agent.id).id, RECALL_FACT)
        block = next(str(b.value) for b in letta.agents.blocks.list(agent.id) if b.label == "human")
        answer, _ = say(letta, letta.conversations.create(agent_id=agent.id).id, RECALL_QUESTION)
    finally:
        letta.agents.delete(agent.id)
    return "blue" in words(answer), "blue" in words(block), answer


def run_model(
    letta: Letta,
    letta_url: str,
    model_id: str,
    gguf: Path | None,
    memory: bool,
    tmp: Path,
    chat_format: str | None,
    recall_runs: int,
) -> Result:
    log = tmp / f"localmodels-{model_id}.log"
    proc, url = start_server(model_id, gguf, memory, log, chat_format)
    res = Result(model_id)
    agent_id = None
    try:
        ensure_local_provider(letta_url, url, SCORE_PROVIDER)
        handle = next(m.handle for m in letta.models.list() if m.model == SCORE_PREFIX + model_id and m.handle)
        emb = next(e.handle for e in letta.models.embeddings.list() if e.handle and e.handle.startswith(SCORE_PROVIDER))
        agent = new_agent(letta, handle, emb, model_id)
        agent_id = agent.id
        judge = Judge([DEFAULT_PERSONA, DEFAULT_HUMAN, agent.system or "", FRAME, STYLE])
        for n, session in enumerate(SESSIONS, 1):
            conv = letta.conversations.create(agent_id=agent_id)
            print(f"  -- session {n} (new conversation)")
            for ex in session:
                reply, first = say(letta, conv.id, ex.say)
                if first is not None:
                    res.first_token_s.append(first)
                s = judge.score(ex, reply)
                res.scores.append(s)
                fails = ",".join(r for r in RULES if not s.passed[r]) or "ok"
                print(f"  [{ex.kind:17}] {ex.say!r} -> {reply!r}  ({fails})")
        res.human_block = next(b.value for b in letta.agents.blocks.list(agent_id) if b.label == "human")
        for n in range(recall_runs):
            said, held, answer = recall_run(letta, handle, emb, model_id)
            res.recall.append((said, held, answer))
            print(
                f"  [recall {n + 1:2}/{recall_runs}] {RECALL_FACT!r}, new session, {RECALL_QUESTION!r} -> {answer!r}"
                f" (says blue: {said}, block holds blue: {held})"
            )
    finally:
        if agent_id is not None:
            letta.agents.delete(agent_id)
        stop_server(proc)
    text = log.read_text(errors="replace")
    for m in re.finditer(r"chat done: (\d+) prompt tokens, first token ([\d.na]+) s, (\d+) tokens in ([\d.]+) s", text):
        res.server.setdefault("prompt_tokens", []).append(float(m.group(1)))
        if m.group(2) != "nan":
            res.server.setdefault("first_token_s", []).append(float(m.group(2)))
        toks, secs = int(m.group(3)), float(m.group(4))
        if toks >= 5 and secs > 0:
            res.server.setdefault("tokens_per_s", []).append(toks / secs)
    for m in re.finditer(r"memory decision in ([\d.]+) s", text):
        res.server.setdefault("memory_step_s", []).append(float(m.group(1)))
    return res


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f}" if xs else "-"


def main() -> int:
    ap = argparse.ArgumentParser(prog="score-conversations", description=__doc__.splitlines()[0])
    ap.add_argument(
        "models",
        nargs="*",
        help="ID=PATH[:CHAT_FORMAT] of a GGUF chat model (default: the packaged model); CHAT_FORMAT for a GGUF "
        "without a chat template, e.g. gemma",
    )
    ap.add_argument("--no-memory-step", action="store_true")
    ap.add_argument(
        "--recall",
        type=int,
        default=10,
        metavar="N",
        help="recall runs per model (fresh agent: the fact, a new conversation, the question); default 10",
    )
    args = ap.parse_args()
    letta_url = os.environ.get("LETTA_BASE_URL")
    if not letta_url:
        print('error: LETTA_BASE_URL is not set (eval "$(scripts/stack --profile test env)")', file=sys.stderr)
        return 2
    models: list[tuple[str, Path | None, str | None]] = []
    for spec in args.models:
        mid, sep, rest = spec.partition("=")
        path, _, fmt = rest.partition(":")
        if not sep or not Path(path).is_file():
            ap.error(f"expected ID=PATH[:CHAT_FORMAT] of an existing GGUF file: {spec!r}")
        models.append((mid, Path(path), fmt or None))
    models = models or [(LOCAL_MODEL, None, None)]
    letta = Letta(base_url=letta_url, max_retries=0, timeout=120)
    tmp = Path(tempfile.mkdtemp(prefix="score-conversations-"))
    results = []
    print(f"{count()} exchanges in {len(SESSIONS)} sessions; load before: {loadavg()}")
    for mid, path, fmt in models:
        print(f"== {mid} ({path or 'packaged'}{', chat format ' + fmt if fmt else ''})")
        try:
            results.append(run_model(letta, letta_url, mid, path, not args.no_memory_step, tmp, fmt, args.recall))
        except Exception as e:  # one model failing must not lose the others' scores
            print(f"  {mid} failed: {type(e).__name__}: {e}")
    print(f"\nload after: {loadavg()}")
    print("| model | score | exchanges all ok | " + " | ".join(RULES) + " | memory (human block) |")
    print("|---|---:|---:|" + "---:|" * len(RULES) + "---|")
    for r in results:
        s = summary(r.scores)
        block = " / ".join(r.human_block.splitlines())
        print(
            f"| {r.model} | {s['score']:.0%} | {s['exchanges_ok']:.0%} | "
            + " | ".join(f"{s[k]:.0%}" for k in RULES)
            + f" | {block} |"
        )
    print("\nper kind (exchanges all ok):")
    for r in results:
        kinds: dict[str, list[bool]] = {}
        for sc in r.scores:
            kinds.setdefault(sc.exchange.kind, []).append(sc.ok)
        print(f"  {r.model}: " + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in kinds.items()))
    print(f"\nrecall across sessions ({RECALL_FACT!r}, hang up, {RECALL_QUESTION!r}; a fresh agent each run):")
    for r in results:
        said = sum(x[0] for x in r.recall)
        held = sum(x[1] for x in r.recall)
        print(
            f"  {r.model}: the answer says blue {said}/{len(r.recall)}, "
            f"the human block holds blue {held}/{len(r.recall)}"
        )
    print("\nspeed (medians; 1 llama.cpp thread):")
    for r in results:
        sv = r.server
        print(
            f"  {r.model}: first token through Letta {med(r.first_token_s)} s; server: prompt "
            f"{med(sv.get('prompt_tokens', []))} tokens, first token {med(sv.get('first_token_s', []))} s, "
            f"{med(sv.get('tokens_per_s', []))} tokens/s, memory step {med(sv.get('memory_step_s', []))} s"
        )
    print(f"server logs: {tmp}")
    return 0


if __name__ == "__main__":
    exit_process(main())
