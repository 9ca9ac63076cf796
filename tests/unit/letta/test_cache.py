from __future__ import annotations

import asyncio

from livekit.plugins.letta.cache import BlockCache, MemoryBlock


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def blocks(human: str) -> list[MemoryBlock]:
    return [MemoryBlock("b1", "human", human), MemoryBlock("b2", "persona", "Friendly.")]


async def test_concurrent_reads_of_one_agent_make_one_request() -> None:
    calls = 0

    async def fetch(agent_id: str) -> list[MemoryBlock]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return blocks("x")

    cache = BlockCache(fetch)
    snaps = await asyncio.gather(*(cache.get("agent-1") for _ in range(5)))
    assert calls == 1
    assert len({s.fingerprint for s in snaps}) == 1
    assert cache.stats.fetches == 1 and cache.stats.hits == 4


async def test_cached_copy_is_used_until_invalidated_or_too_old() -> None:
    values = iter(["a", "a", "b"])
    clock = Clock()

    async def fetch(agent_id: str) -> list[MemoryBlock]:
        return blocks(next(values))

    cache = BlockCache(fetch, clock=clock)
    first = await cache.get("agent-1")
    assert (await cache.get("agent-1", max_age=5)).fingerprint == first.fingerprint
    assert cache.stats.fetches == 1  # fresh: no request

    clock.now += 10
    again = await cache.get("agent-1", max_age=5)  # too old: read again, unchanged
    assert cache.stats.fetches == 2 and again.fingerprint == first.fingerprint and cache.stats.changes == 0

    cache.invalidate("agent-1", why="test")
    changed = await cache.get("agent-1")
    assert cache.stats.fetches == 3 and changed.value("human") == "b"
    assert changed.fingerprint != first.fingerprint and cache.stats.changes == 1
    assert cache.peek("agent-1") is changed


async def test_agents_are_cached_separately_and_prime_avoids_the_first_read() -> None:
    fetched: list[str] = []

    async def fetch(agent_id: str) -> list[MemoryBlock]:
        fetched.append(agent_id)
        return blocks(agent_id)

    clock = Clock()
    cache = BlockCache(fetch, clock=clock)
    cache.prime("agent-2", blocks("agent-2"), read_at=clock())
    assert (await cache.get("agent-2")).value("human") == "agent-2"
    assert (await cache.get("agent-1")).value("human") == "agent-1"
    assert fetched == ["agent-1"]
    assert "agent-2" in cache and "agent-3" not in cache


def test_fingerprint_covers_value_limit_and_description() -> None:
    from livekit.plugins.letta.cache import fingerprint

    base = MemoryBlock("b1", "human", "v", limit=10, description="d")
    assert fingerprint([base]) != fingerprint([MemoryBlock("b1", "human", "w", limit=10, description="d")])
    assert fingerprint([base]) != fingerprint([MemoryBlock("b1", "human", "v", limit=11, description="d")])
    assert fingerprint([base]) != fingerprint([MemoryBlock("b1", "human", "v", limit=10, description="e")])
    other = MemoryBlock("b2", "persona", "p")
    assert fingerprint([base, other]) == fingerprint([other, base])


async def test_an_invalidation_during_a_read_keeps_the_entry_stale() -> None:
    gate = asyncio.Event()
    values = iter(["old", "new"])

    async def fetch(agent_id: str) -> list[MemoryBlock]:
        value = next(values)
        if value == "old":
            await gate.wait()
        return blocks(value)

    cache = BlockCache(fetch)
    reading = asyncio.ensure_future(cache.get("agent-1"))
    await asyncio.sleep(0)
    cache.invalidate("agent-1", why="a memory tool ran while the read was under way")
    gate.set()
    assert (await reading).value("human") == "old"
    assert (await cache.get("agent-1")).value("human") == "new"
