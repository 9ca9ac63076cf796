"""End-to-end check of a real Letta server whose model provider is this test provider.

    python -m testprovider.letta_check --letta http://127.0.0.1:8283 --provider http://127.0.0.1:8399/v1

(defaults: ``LETTA_BASE_URL`` and ``SG_TEST_PROVIDER_URL`` from the environment, as ``scripts/stack env`` sets them).

It creates a throwaway agent (blocks ``human`` + ``persona``), says "Remember that my favorite color is blue",
checks the tool call, the reply and the ``human`` block, then in a NEW conversation streams "What is my favorite
color?" and checks the answer comes from memory only ("Memory says: blue. This conversation says: nothing."),
token by token, and that the provider was shown only that one user turn. Prints timings; exit status 0 = pass.
Needs ``letta-client`` (in the app venv). The agent and conversation are deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

FACT = "my favorite color is blue"
REMEMBER = "Remember that my favorite color is blue"
QUESTION = "What is my favorite color?"
EXPECTED_ACK = "Got it, I will remember that my favorite color is blue."
EXPECTED_RECALL = "Memory says: blue. This conversation says: nothing."


@dataclass
class CheckResult:
    ok: bool = True
    failures: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    timings_ms: dict[str, Any] = field(default_factory=dict)

    def expect(self, condition: bool, what: str) -> None:
        if not condition:
            self.ok = False
            self.failures.append(what)


def _http_json(method: str, url: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _root(provider_url: str) -> str:
    url = provider_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def pick_llm_handle(models: list[Any], model_name: str = "gpt-4o-mini") -> str | None:
    """Letta names LLM handles ``openai/<id>`` against api.openai.com and ``openai-proxy/<id>`` otherwise."""
    handles = [m.handle for m in models if getattr(m, "model", None) == model_name and getattr(m, "handle", None)]
    for prefix in ("openai-proxy/", "openai/"):
        for handle in handles:
            if handle.startswith(prefix):
                return str(handle)
    return str(handles[0]) if handles else None


def _request_for(root: str, agent_id: str, last_user_turn: str) -> dict[str, Any] | None:
    """The latest chat request the provider got from this agent whose last user turn is ``last_user_turn``."""
    for entry in reversed(_http_json("GET", f"{root}/_test/requests?n=200")["requests"]):
        messages = entry.get("messages") or []
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
        if f"AGENT_ID: {agent_id}" in system and entry["user_turns"][-1:] == [last_user_turn]:
            return dict(entry)
    return None


def _text(event: Any) -> str:
    content = getattr(event, "content", "")
    return content if isinstance(content, str) else str(content)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def run(
    letta_url: str, provider_url: str, *, round_trips: int = 5, token_delay_ms: float = 30.0, keep: bool = False
) -> CheckResult:
    from letta_client import Letta

    result = CheckResult()
    root = _root(provider_url)
    client = Letta(base_url=letta_url, timeout=60, max_retries=0)

    handle = pick_llm_handle(list(client.models.list()))
    result.facts["llm_handle"] = handle
    if handle is None:
        result.expect(False, "Letta lists no gpt-4o-mini model: was the provider up when Letta started?")
        return result
    start = time.perf_counter()
    agent = client.agents.create(
        name=f"testprovider-check-{int(time.time() * 1000)}",
        model=handle,
        embedding="openai/text-embedding-3-small",
        memory_blocks=[
            {"label": "human", "value": "The human's name is Sam."},
            {"label": "persona", "value": "I am a test agent."},
        ],
    )
    result.timings_ms["agent_create"] = _ms(time.perf_counter() - start)
    result.facts.update(
        agent_id=agent.id,
        agent_type=str(agent.agent_type),
        tools=sorted(t.name for t in agent.tools if t.name),
        model_endpoint=getattr(agent.llm_config, "model_endpoint", None)
        or getattr(agent.llm_config, "api_model_endpoint", None),
    )
    endpoint = str(result.facts["model_endpoint"] or "").rstrip("/")
    result.expect(
        endpoint == provider_url.rstrip("/"),
        f"Letta's agents call {endpoint}, not {provider_url}: Letta keeps the base URL of the first start on this "
        "database (providers table); see testprovider/README.md",
    )
    conversation_id: str | None = None
    try:
        # 1. remember: a memory tool call, then the acknowledgement as plain assistant text
        start = time.perf_counter()
        response = client.agents.messages.create(agent_id=agent.id, messages=[{"role": "user", "content": REMEMBER}])
        result.timings_ms["remember_round_trip"] = _ms(time.perf_counter() - start)
        types = [m.message_type for m in response.messages]
        tool_calls = [m.tool_call.name for m in response.messages if m.message_type == "tool_call_message"]
        texts = [m.content for m in response.messages if m.message_type == "assistant_message"]
        result.facts["remember_messages"] = types
        result.expect(
            bool(tool_calls) and tool_calls[0] in ("memory_insert", "core_memory_append"), f"tools {tool_calls}"
        )
        result.expect(texts == [EXPECTED_ACK], f"remember reply was {texts!r}")
        human = client.agents.blocks.retrieve("human", agent_id=agent.id).value
        result.facts["human_block"] = human
        result.expect(FACT in human, f"human block lacks the fact: {human!r}")

        # 2. a new conversation: history is fresh, the memory block is shared
        start = time.perf_counter()
        conversation = client.conversations.create(agent_id=agent.id)
        conversation_id = conversation.id
        result.timings_ms["conversation_create"] = _ms(time.perf_counter() - start)
        # a per-token delay at the provider makes pass-through streaming measurable at the Letta client
        previous_delay = _http_json("GET", f"{root}/_test/config")["token_delay_ms"]
        _http_json("POST", f"{root}/_test/config", {"token_delay_ms": token_delay_ms})
        start = time.perf_counter()
        first_token: float | None = None
        chunks: list[str] = []
        arrivals: list[float] = []
        stream = client.conversations.messages.create(
            conversation_id=conversation.id, messages=[{"role": "user", "content": QUESTION}], stream_tokens=True
        )
        for event in stream:
            if getattr(event, "message_type", None) == "assistant_message":
                arrivals.append(time.perf_counter() - start)
                if first_token is None:
                    first_token = arrivals[-1]
                chunks.append(_text(event))
        result.timings_ms["recall_stream_total"] = _ms(time.perf_counter() - start)
        result.timings_ms["recall_first_token"] = _ms(first_token) if first_token is not None else None
        _http_json("POST", f"{root}/_test/config", {"token_delay_ms": previous_delay})
        result.facts["recall_chunks"] = chunks
        result.expect("".join(chunks) == EXPECTED_RECALL, f"recall reply was {''.join(chunks)!r}")
        result.expect(len(chunks) >= 5, f"expected token-by-token streaming, got {len(chunks)} chunk(s)")
        if len(arrivals) >= 2:
            spread = arrivals[-1] - arrivals[0]
            result.timings_ms["recall_first_to_last_chunk"] = _ms(spread)
            expected = 0.5 * token_delay_ms / 1000 * (len(arrivals) - 1)
            result.expect(spread >= expected, f"chunks arrived together ({_ms(spread)} ms), not as they were produced")
        seen = _request_for(root, agent.id, QUESTION)
        if seen is None:
            result.expect(False, "the provider log has no request for the recall question")
            return result
        result.facts["recall_request_user_turns"] = seen["user_turns"]
        result.expect(seen["user_turns"] == [QUESTION], f"model was shown user turns {seen['user_turns']!r}")
        result.expect(seen["stream"] is True, "Letta did not stream from the provider")
        result.expect(seen["params"].get("stream_options") == {"include_usage": True}, "no include_usage")

        # 3. plain round trips in the conversation: the turn counter shows the history the model sees
        samples: list[float] = []
        for i in range(round_trips):
            start = time.perf_counter()
            text = ""
            for event in client.conversations.messages.create(
                conversation_id=conversation.id, messages=[{"role": "user", "content": f"hello {i}"}]
            ):
                if getattr(event, "message_type", None) == "assistant_message":
                    text += _text(event)
            samples.append(time.perf_counter() - start)
            result.expect(text == f"You said: hello {i}. (turn {i + 2})", f"round trip {i} reply {text!r}")
        if samples:
            result.timings_ms["round_trip_median"] = _ms(statistics.median(samples))
            result.timings_ms["round_trip_max"] = _ms(max(samples))
    except Exception as exc:  # report like any other failed expectation, after cleaning up
        result.expect(False, f"{type(exc).__name__}: {exc}")
    finally:
        if not keep:
            if conversation_id is not None:
                try:
                    client.conversations.delete(conversation_id)
                except Exception as exc:  # best effort: report, do not mask the check's outcome
                    result.facts["cleanup_error"] = repr(exc)
            client.agents.delete(agent.id)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testprovider.letta_check", description=__doc__)
    parser.add_argument("--letta", default=os.environ.get("LETTA_BASE_URL", "http://127.0.0.1:8283"))
    parser.add_argument("--provider", default=os.environ.get("SG_TEST_PROVIDER_URL", "http://127.0.0.1:8799/v1"))
    parser.add_argument("--round-trips", type=int, default=5)
    parser.add_argument("--token-delay-ms", type=float, default=30.0, help="provider delay per token while streaming")
    parser.add_argument("--keep", action="store_true", help="keep the agent and conversation")
    args = parser.parse_args(argv)
    result = run(
        args.letta, args.provider, round_trips=args.round_trips, token_delay_ms=args.token_delay_ms, keep=args.keep
    )
    print(
        json.dumps(
            {"ok": result.ok, "failures": result.failures, "timings_ms": result.timings_ms, **result.facts}, indent=2
        )
    )
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
