"""The retirement journal: the Letta conversations created for sessions and not retired yet, so that another job
retires what a crashed one left behind.

`RetirementJournal` / `JournalHandle` are the seam (async, so a shared store such as Redis can implement them);
`FileJournal` is the implementation on one machine's disk, `redis_journal.RedisJournal` the one every machine of a
deployment shares (with a grace before an unheld entry counts as an orphan, so that a session another job adopts
keeps its conversation). One JSON file per conversation, written when the
conversation is created and removed once it is deleted from Letta. The process that owns a conversation holds an
exclusive `flock` on its file for as long as it lives, so:

- a later job (any process) can tell an orphan (no lock: its owner ended, crashed or was killed before the
  retirement reached Letta) from a live session (locked), claim the orphan and retire it;
- nothing here needs pids, clocks or a database; the kernel drops the lock when the owner dies.

Entries name the Letta server (base URL): a job only claims entries of the server it talks to.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from . import _logfmt as lf

__all__ = ["FileJournal", "JournalEntry", "JournalHandle", "RetirementJournal"]

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class JournalEntry:
    letta_url: str
    agent_id: str
    conversation_id: str
    room: str = ""
    identity: str = ""
    created_at: float = 0.0
    summarize: bool = False
    """Write an end-of-session summary to archival memory before deleting (end_summary was on)."""


class JournalHandle(Protocol):
    """An entry this process holds: no other job claims it while it is held."""

    @property
    def entry(self) -> JournalEntry: ...

    @property
    def held(self) -> bool: ...

    async def done(self) -> None:
        """The conversation is retired: forget the entry."""

    async def release(self) -> None:
        """Stop holding the entry (job end with the retirement still pending): a later job will claim it."""


class RetirementJournal(Protocol):
    """Where live conversations are recorded until retired; any implementation must let a job tell an orphan (its
    owner is gone) from an entry a live process holds, and let exactly one job claim an orphan."""

    async def record(self, entry: JournalEntry) -> JournalHandle | None:
        """Record (and hold) a new conversation. None, logged, when the journal cannot be written: the session
        goes on without durability rather than failing."""

    async def claim_orphans(self, letta_url: str) -> list[JournalHandle]:
        """Claim (and hold) every entry of the Letta server at `letta_url` that nobody holds (and, where the
        journal has a grace, nobody held for that long)."""

    async def adopt(self, entry: JournalEntry) -> JournalHandle | None:
        """Hold the entry of a conversation this process takes over *live* (a session adopted from another
        process): its existing entry if there is one (waiting, bounded, while its previous holder lets go), else
        a new one. None, logged, when it cannot be held."""

    @property
    def orphan_scan_interval(self) -> float | None:
        """How often a live job should look for orphans again (None: only at start and when Letta is back)."""

    def describe(self) -> str:
        """Where it is, for logs."""

    async def aclose(self) -> None:
        """Stop background work (renewing holds) and let go of what is still held. Idempotent."""


class _FileHandle:
    """An entry this process holds (locked). `done()` removes it; `release()` unlocks and leaves it for later."""

    def __init__(self, path: Path, fd: int, entry: JournalEntry) -> None:
        self.path = path
        self._fd: int | None = fd
        self._entry = entry

    @property
    def entry(self) -> JournalEntry:
        return self._entry

    @property
    def held(self) -> bool:
        return self._fd is not None

    async def done(self) -> None:
        """The conversation is retired: forget the entry."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._close()

    async def release(self) -> None:
        """Stop holding the entry (job end with the retirement still pending): a later job will claim it."""
        self._close()

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing drops the flock

    def __repr__(self) -> str:
        return f"FileJournal.handle({self.path.name}, held={self.held})"


class FileJournal:
    """A `RetirementJournal` in a directory: the kernel's `flock` tells held entries from orphans. Its calls are
    short local file operations, run inline."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory).expanduser()

    def _path(self, conversation_id: str) -> Path:
        return self.directory / f"conv-{_SAFE.sub('_', conversation_id.removeprefix('conv-'))}.json"

    def describe(self) -> str:
        return str(self.directory)

    @property
    def orphan_scan_interval(self) -> float | None:
        return None

    async def aclose(self) -> None:
        """Nothing runs in the background: each held entry is let go by its handle (or by the process ending)."""

    async def adopt(self, entry: JournalEntry, *, wait: float = 3.0) -> JournalHandle | None:
        """Lock the existing entry of `entry.conversation_id` (retrying up to `wait` seconds while its previous
        owner still holds it), or record a new one. There is no grace here: a job that starts meanwhile may claim an
        unheld entry as an orphan first; use `RedisJournal` where sessions move between processes."""
        path = self._path(entry.conversation_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                return await self.record(entry)
            except OSError as e:
                lf.warning("cannot open a journal entry to adopt", path=str(path), error=repr(e))
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                if loop.time() >= deadline:
                    lf.warning(
                        "the adopted conversation's journal entry is still held by another process",
                        path=str(path),
                        conversation_id=entry.conversation_id,
                    )
                    return None
                await asyncio.sleep(0.1)
                continue
            if os.fstat(fd).st_nlink == 0:  # removed between open and lock: write it anew
                os.close(fd)
                continue
            return _FileHandle(path, fd, entry)

    async def record(self, entry: JournalEntry) -> JournalHandle | None:
        """Write a locked entry for a new conversation. None (logged) if the journal cannot be written: the
        session goes on without durability rather than failing."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self._path(entry.conversation_id)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # locked before anyone can see it
                os.write(fd, json.dumps(asdict(entry)).encode())
                os.replace(tmp, path)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            return _FileHandle(path, fd, entry)
        except OSError as e:
            lf.warning(
                "cannot write the retirement journal; this conversation is not journaled",
                journal=str(self.directory),
                conversation_id=entry.conversation_id,
                error=repr(e),
            )
            return None

    async def claim_orphans(self, letta_url: str) -> list[JournalHandle]:
        """Lock and return every entry of `letta_url` that nobody holds (its owner is gone)."""
        out: list[JournalHandle] = []
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return out
        except OSError as e:
            lf.warning("cannot read the retirement journal", journal=str(self.directory), error=repr(e))
            return out
        for name in names:
            if not (name.startswith("conv-") and name.endswith(".json")):
                continue
            handle = self._claim(self.directory / name, letta_url)
            if handle is not None:
                out.append(handle)
        return out

    def _claim(self, path: Path, letta_url: str) -> _FileHandle | None:
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return None  # retired (removed) meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None  # a live owner holds it
        try:
            if os.fstat(fd).st_nlink == 0:
                os.close(fd)
                return None  # removed between open and lock
            raw = os.read(fd, 1 << 16)
            entry = _parse(raw)
        except (OSError, ValueError) as e:
            os.close(fd)
            lf.warning("ignoring an unreadable journal entry", path=str(path), error=repr(e))
            return None
        if entry.letta_url.rstrip("/") != letta_url.rstrip("/"):
            os.close(fd)
            return None
        return _FileHandle(path, fd, entry)


def _parse(raw: bytes) -> JournalEntry:
    data: Any = json.loads(raw.decode())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    fields = {k: data[k] for k in JournalEntry.__dataclass_fields__ if k in data}
    for required in ("letta_url", "agent_id", "conversation_id"):
        if not isinstance(fields.get(required), str) or not fields[required]:
            raise ValueError(f"missing {required}")
    fields.setdefault("created_at", time.time())
    return JournalEntry(**fields)
