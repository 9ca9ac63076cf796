"""The retirement journal in real Redis (`SG_REDIS_URL`): holds renewed by their holder, let go, expired when the
holder dies; an unheld entry is an orphan only after the grace; a job adopting a session takes its entry's hold;
two journals racing for one orphan, exactly one wins; a SIGKILLed holder process leaves an entry that becomes
claimable after ttl + grace, and not before."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from livekit.plugins.letta.journal import JournalEntry, JournalHandle
from livekit.plugins.letta.redis_journal import RedisJournal

from tests.integration.conftest import ROOT

URL = "http://letta.test:8283"


def redis_url() -> str:
    url = os.environ.get("SG_REDIS_URL")
    if not url:
        pytest.fail("SG_REDIS_URL is not set: these tests need the test stack's Redis (eval scripts/stack env)")
    return url


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    p = f"test-journal-{uuid.uuid4().hex[:8]}"
    yield p
    r = aioredis.Redis.from_url(redis_url())
    keys = [k async for k in r.scan_iter(match=f"{p}:*")]
    if keys:
        await r.delete(*keys)
    await r.aclose()


def entry(conv: str, url: str = URL) -> JournalEntry:
    return JournalEntry(letta_url=url, agent_id="agent-1", conversation_id=conv, room="r", identity="alice")


def journal(prefix: str, **kw: object) -> RedisJournal:
    return RedisJournal.from_url(redis_url(), prefix=prefix, **kw)


async def test_a_held_entry_is_renewed_past_its_ttl_and_never_claimed(prefix: str) -> None:
    j1, j2 = journal(prefix, ttl=0.3, grace=0.0), journal(prefix, ttl=0.3, grace=0.0)
    try:
        h = await j1.record(entry("conv-live"))
        assert h is not None and h.held
        for _ in range(4):  # well past the ttl: its holder renews it
            await asyncio.sleep(0.3)
            assert await j2.claim_orphans(URL) == []
        await h.done()
        r = aioredis.Redis.from_url(redis_url())
        assert [k async for k in r.scan_iter(match=f"{prefix}:*")] == [], "done() left keys behind"
        await r.aclose()
    finally:
        await j1.aclose()
        await j2.aclose()


async def test_a_released_entry_is_an_orphan_only_after_the_grace(prefix: str) -> None:
    j1, j2 = journal(prefix, ttl=0.3, grace=0.8), journal(prefix, ttl=0.3, grace=0.8)
    try:
        h = await j1.record(entry("conv-gone"))
        assert h is not None
        await h.release()  # its job ended with the retirement pending
        assert not h.held
        t0 = time.monotonic()
        assert await j2.claim_orphans(URL) == [], "claimed inside the grace"
        await asyncio.sleep(0.9 - (time.monotonic() - t0))
        (claimed,) = await j2.claim_orphans(URL)
        assert claimed.entry == entry("conv-gone")
        assert await journal(prefix, grace=0.0).claim_orphans(URL) == [], "a claimed orphan is held"
    finally:
        await j1.aclose()
        await j2.aclose()


async def test_an_adopting_job_takes_the_hold_of_the_existing_entry_and_nobody_retires_it(prefix: str) -> None:
    old, new, other = journal(prefix, ttl=0.3, grace=0.3), journal(prefix, ttl=0.3, grace=0.3), journal(prefix)
    try:
        h = await old.record(entry("conv-moved"))
        assert h is not None
        await h.release()  # the session moved (EndReason.MOVED)
        adopted = await new.adopt(entry("conv-moved"))
        assert adopted is not None and adopted.held
        await asyncio.sleep(0.7)  # past ttl and grace: still held, by the adopter
        assert await other.claim_orphans(URL) == []
        # adopting an entry nobody recorded (its owner never journaled it) records it
        fresh = await new.adopt(entry("conv-unjournaled"))
        assert fresh is not None
        r = aioredis.Redis.from_url(redis_url())
        assert await r.hexists(f"{prefix}:entries", "conv-unjournaled")
        await r.aclose()
    finally:
        await old.aclose()
        await new.aclose()
        await other.aclose()


async def test_adopt_waits_for_a_live_holder_to_let_go_and_gives_up_at_its_bound(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    old = journal(prefix, ttl=0.3)
    new = journal(prefix, ttl=0.3, adopt_wait=0.5)
    try:
        h = await old.record(entry("conv-a"))
        assert h is not None
        t0 = time.monotonic()
        assert await new.adopt(entry("conv-a")) is None, "took a hold a live process keeps renewing"
        assert 0.45 < time.monotonic() - t0 < 1.5
        assert "still held by another process" in caplog.text

        async def let_go_soon() -> None:
            await asyncio.sleep(0.2)
            await h.release()

        releasing = asyncio.ensure_future(let_go_soon())
        adopted = await new.adopt(entry("conv-a"))
        await releasing
        assert adopted is not None and adopted.held
    finally:
        await old.aclose()
        await new.aclose()


async def test_two_journals_racing_for_the_same_orphans_exactly_one_wins_each(prefix: str) -> None:
    maker = journal(prefix)
    a, b = journal(prefix, grace=0.0), journal(prefix, grace=0.0)
    try:
        names = [f"conv-{i:02d}" for i in range(20)]
        for n in names:
            h = await maker.record(entry(n))
            assert h is not None
            await h.release()
        got_a, got_b = await asyncio.gather(a.claim_orphans(URL), b.claim_orphans(URL))
        ids_a = {h.entry.conversation_id for h in got_a}
        ids_b = {h.entry.conversation_id for h in got_b}
        assert not ids_a & ids_b, f"claimed twice: {sorted(ids_a & ids_b)}"
        assert ids_a | ids_b == set(names)
    finally:
        await maker.aclose()
        await a.aclose()
        await b.aclose()


async def test_entries_of_another_letta_server_and_unreadable_ones_are_left_alone(prefix: str) -> None:
    j = journal(prefix, grace=0.0)
    try:
        h = await j.record(entry("conv-other", url="http://other:8283"))
        assert h is not None
        await h.release()
        r = aioredis.Redis.from_url(redis_url())
        await r.hset(f"{prefix}:entries", "conv-bad", "{not json")
        await r.aclose()
        assert await j.claim_orphans(URL) == []
        assert [x.entry.conversation_id for x in await j.claim_orphans("http://other:8283/")] == ["conv-other"]
    finally:
        await j.aclose()


async def test_a_redis_that_lost_its_data_gets_the_held_entries_back_on_the_next_renew(prefix: str) -> None:
    j = journal(prefix, ttl=5.0)
    r = aioredis.Redis.from_url(redis_url())
    try:
        h = await j.record(entry("conv-kept"))
        assert h is not None
        await r.delete(f"{prefix}:entries", f"{prefix}:seen", f"{prefix}:hold:conv-kept")  # a restart without data
        await j.renew()
        assert await r.hexists(f"{prefix}:entries", "conv-kept")
        assert (await r.get(f"{prefix}:hold:conv-kept")) == j.holder.encode()
        # another process took the hold meanwhile (this one stalled past its ttl): this one stops renewing it
        await r.set(f"{prefix}:hold:conv-kept", "someone-else")
        await j.renew()
        assert not h.held and j.held == []
    finally:
        await r.aclose()
        await j.aclose()


async def test_redis_unreachable_loses_nothing_and_raises_nothing(caplog: pytest.LogCaptureFixture) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    j = RedisJournal.from_url(f"redis://127.0.0.1:{port}/0", prefix="x")
    try:
        assert await j.record(entry("conv-1")) is None
        assert await j.adopt(entry("conv-1")) is None
        assert await j.claim_orphans(URL) == []
        assert "cannot write the retirement journal" in caplog.text
    finally:
        await j.aclose()


HOLDER = """
import asyncio, sys
from livekit.plugins.letta.journal import JournalEntry, JournalHandle
from livekit.plugins.letta.redis_journal import RedisJournal

async def main(url: str, prefix: str) -> None:
    j = RedisJournal.from_url(url, prefix=prefix, ttl=1.0, grace=1.0)
    h = await j.record(JournalEntry(letta_url="http://letta.test:8283", agent_id="agent-1", conversation_id="conv-k"))
    assert h is not None
    print("held", flush=True)
    await asyncio.sleep(60)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_a_sigkilled_holder_leaves_an_entry_claimable_after_ttl_plus_grace_and_not_before(prefix: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, redis_url(), prefix, cwd=ROOT, stdout=subprocess.PIPE
    )
    claimer = journal(prefix, ttl=1.0, grace=1.0)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.decode().strip() == "held"
        await asyncio.sleep(1.5)  # the holder renews past its ttl
        assert await claimer.claim_orphans(URL) == [], "claimed from a live holder"
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        await asyncio.wait_for(proc.wait(), 10)
        claimed: list[JournalHandle] = []
        while not claimed and time.monotonic() - killed < 10:
            claimed = await claimer.claim_orphans(URL)
            if not claimed:
                await asyncio.sleep(0.1)
        took = time.monotonic() - killed
        assert [h.entry.conversation_id for h in claimed] == ["conv-k"], "never claimable"
        # The last renew was at most ttl/3 before the kill: the hold lasts >= 2/3 ttl after it, then the grace.
        assert took >= 1.0 + 2 / 3 - 0.1, f"claimed {took:.2f} s after the kill: before ttl + grace"
        print(f"claimable {took:.2f} s after SIGKILL (ttl 1 s + grace 1 s)")
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 5)
        await claimer.aclose()
