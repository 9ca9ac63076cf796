"""Two voice sessions on one Letta agent at once (two rooms, two jobs): each talks in its own conversation over the
agent's shared memory blocks; neither sees the other's turns; ending one leaves the other intact."""

from __future__ import annotations

from letta_client import Letta

from tests.integration.conftest import Stack, WorkerProc
from tests.support.human import Human
from tests.support.letta_checks import conversations, model_request, user_messages, wait_for


async def test_two_sessions_on_one_agent_never_see_each_other_and_one_ending_leaves_the_other(
    stack: Stack, worker: WorkerProc, letta_sync: Letta, letta_agent: str
) -> None:
    alice = Human(stack.info, identity="alice", letta_agent_id=letta_agent)
    bob = Human(stack.info, identity="bob", letta_agent_id=letta_agent)
    assert alice.room_name != bob.room_name
    await alice.join()
    await bob.join()
    try:
        await alice.wait_for_agent()
        await bob.wait_for_agent()
        await alice.next_reply()
        await bob.next_reply()
        assert await alice.ask("alice one") == "You said: alice one. (turn 1)"
        assert await bob.ask("bob one") == "You said: bob one. (turn 1)"
        assert await alice.ask("alice two") == "You said: alice two. (turn 2)"
        shown = model_request(stack, letta_agent, "alice two")
        assert shown is not None and shown["user_turns"] == ["alice one", "alice two"], "alice saw bob's turns"

        live = conversations(letta_sync, letta_agent)
        assert len(live) == 2
        by_owner = {user_messages(letta_sync, c)[0]: c for c in live}
        assert user_messages(letta_sync, by_owner["alice one"]) == ["alice one", "alice two"]
        assert user_messages(letta_sync, by_owner["bob one"]) == ["bob one"]

        await alice.hang_up()

        async def alice_retired() -> bool:
            return conversations(letta_sync, letta_agent) == [by_owner["bob one"]]

        await wait_for(alice_retired, 10, "alice's conversation to be retired, bob's kept")
        assert await bob.ask("bob two") == "You said: bob two. (turn 2)", "bob's history was reset"
        shown = model_request(stack, letta_agent, "bob two")
        assert shown is not None and shown["user_turns"] == ["bob one", "bob two"]
    finally:
        await alice.hang_up()
        await bob.hang_up()

    async def all_retired() -> bool:
        return not conversations(letta_sync, letta_agent)

    await wait_for(all_retired, 10, "bob's conversation to be retired")
