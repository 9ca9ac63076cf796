"""The one translation of the SDK's errors (`_calls.translate`), the one run-cancel helper, and the framework's view
of a Letta failure (`llm.api_error`)."""

from __future__ import annotations

import httpx
import pytest
from letta_client import APIConnectionError, APITimeoutError
from livekit import agents
from livekit.plugins.letta import LettaConfigError, LettaError, LettaUnavailableError
from livekit.plugins.letta._calls import translate
from livekit.plugins.letta._scope import TaskScope
from livekit.plugins.letta.errors import LettaTimeoutError, LettaTurnError
from livekit.plugins.letta.llm import api_error

from tests.unit.letta.conftest import make_backend
from tests.unit.letta.fake_letta import FakeLetta, status_error

URL = "http://letta.fake:8283"
REQ = httpx.Request("GET", URL)


@pytest.mark.parametrize(
    ("error", "expected", "text"),
    [
        (TimeoutError(), LettaUnavailableError, "no answer from Letta at http://letta.fake:8283 within 2.0 s"),
        (APITimeoutError(request=REQ), LettaUnavailableError, "no answer from Letta"),
        (APIConnectionError(request=REQ), LettaUnavailableError, "cannot reach Letta at http://letta.fake:8283"),
        (status_error(503, "overloaded"), LettaUnavailableError, "Letta answered 503: overloaded"),
        (status_error(429, "slow down"), LettaUnavailableError, "Letta answered 429"),
        (status_error(401, "bad key"), LettaConfigError, "check LETTA_API_KEY"),
        (status_error(403, "no"), LettaConfigError, "refused the credentials (403"),
        (status_error(200, "model failed"), LettaTurnError, "Letta error in the stream: model failed"),
    ],
)
def test_sdk_errors_become_letta_errors(error: Exception, expected: type[LettaError], text: str) -> None:
    got = translate(error, "reading", URL, 2.0)
    assert type(got) is expected and text in str(got) and str(got).startswith("reading: ")


@pytest.mark.parametrize("status", [404, 409, 422])
def test_other_refusals_are_left_to_the_caller(status: int) -> None:
    assert translate(status_error(status, "x"), "reading", URL) is None


def test_the_framework_sees_each_failure_as_a_non_retryable_api_error() -> None:
    cases: list[tuple[LettaError, type[agents.APIError], int | None]] = [
        (LettaTimeoutError("slow"), agents.APITimeoutError, None),
        (LettaUnavailableError("down"), agents.APIConnectionError, None),
        (LettaConfigError("bad"), agents.APIStatusError, 400),
        (LettaTurnError("refused", status_code=422), agents.APIStatusError, 422),
        (LettaTurnError("in the stream"), agents.APIStatusError, 500),
    ]
    for err, kind, status in cases:
        got = api_error(err)
        assert type(got) is kind and not got.retryable and str(err) in str(got)
        if status is not None:
            assert isinstance(got, agents.APIStatusError) and got.status_code == status


async def test_cancelling_runs_is_done_when_nothing_runs(fake: FakeLetta, scope: TaskScope) -> None:
    agent = fake.add_agent()
    backend = make_backend(fake, scope)
    conv_id = (await fake.conversations.create(agent_id=agent)).id
    await backend.cancel_runs(agent, conv_id)  # 409 "no active runs": not an error
    fake.fail_next["conversations.cancel"] = [404]
    await backend.cancel_runs(agent, conv_id)  # gone: not an error
    await backend.cancel_runs(agent)  # the agent's own history
    assert fake.count("conversations.cancel") == 2 and fake.count("agents.cancel") == 1
    fake.fail_next["conversations.cancel"] = [500]
    with pytest.raises(LettaUnavailableError):
        await backend.cancel_runs(agent, conv_id)
