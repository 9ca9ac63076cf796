"""The store's layout: every Redis key and channel the cluster uses, and the dispatch metadata it adds.

One namespace per agent name (``sg:{agent_name}:...``): pools of workers with different agent names never see each
other's rooms. Room names are used as they are (LiveKit room names carry no ``:`` in practice; a key is only ever
built here, never parsed back, except the ``rooms`` / ``known`` sorted sets whose members are room names).

| key | type | written by | what it holds |
|---|---|---|---|
| ``lease:{room}`` | string, PX ttl | the room's owner (job) | ``"{token}:{job_id}"``: who owns the room now |
| ``fence:{room}`` | counter | a job acquiring the lease | the last fencing token handed out (``INCR``) |
| ``sessions:{room}`` | hash | the owner, fenced by its token | identity → ``SavedSession`` JSON |
| ``room:{room}`` | hash | the owner | ``metadata`` (the app's dispatch metadata), ``job``, ``updated`` |
| ``rooms`` | zset | the owner (score: ms of its last renew) | rooms with saved sessions: live or parked |
| ``known`` | zset | the owner (score: ms when last served) | rooms served in the last day (a rejoin without dispatch) |
| ``handoff:{room}`` | string + channel | the job taking over | the new job's id: "ready, release the room" |
| ``dispatched:{room}`` | string, NX PX | watcher, draining worker | a (re)dispatch is on its way: send no other |
| ``watcher`` | string, PX ttl | one worker's main process | the re-dispatch duty's lock (same scheme as a lease) |
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["METADATA_KEY", "Keys", "ResumeIntent", "app_metadata", "read_intent", "with_intent"]

METADATA_KEY = "session_guard"
"""The dispatch metadata's key for what the cluster adds: ``{"session_guard": {"resume": true}}`` (re-dispatch
after a crash, a dropped dispatch or a rejoin) or ``{"session_guard": {"resume": true, "handoff": "<token>:<job>"}}``
(a deploy: the named owner releases the room once this job is ready)."""


@dataclass(frozen=True)
class Keys:
    namespace: str
    """The agent name the pool registers with ("" → ``default``)."""

    @property
    def base(self) -> str:
        return f"sg:{self.namespace or 'default'}"

    def lease(self, room: str) -> str:
        return f"{self.base}:lease:{room}"

    def fence(self, room: str) -> str:
        return f"{self.base}:fence:{room}"

    def sessions(self, room: str) -> str:
        return f"{self.base}:sessions:{room}"

    def room(self, room: str) -> str:
        return f"{self.base}:room:{room}"

    @property
    def rooms(self) -> str:
        return f"{self.base}:rooms"

    @property
    def known(self) -> str:
        return f"{self.base}:known"

    def handoff(self, room: str) -> str:
        return f"{self.base}:handoff:{room}"

    def dispatched(self, room: str) -> str:
        return f"{self.base}:dispatched:{room}"

    @property
    def watcher(self) -> str:
        return f"{self.base}:watcher"


@dataclass(frozen=True)
class ResumeIntent:
    """What a dispatch's metadata says about taking a room over."""

    resume: bool = False
    """Sessions of this room may be saved in the store: resume them."""
    handoff: str | None = None
    """``"{token}:{job_id}"`` of the owner handing the room over (a deploy), if any."""


def _parse(metadata: str | None) -> dict[str, Any] | None:
    raw = (metadata or "").strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def read_intent(metadata: str | None) -> ResumeIntent:
    """The cluster's part of a dispatch's metadata (none: a plain dispatch). Never raises."""
    meta = _parse(metadata)
    part = meta.get(METADATA_KEY) if meta else None
    if not isinstance(part, dict):
        return ResumeIntent()
    handoff = part.get("handoff")
    return ResumeIntent(resume=bool(part.get("resume")), handoff=handoff if isinstance(handoff, str) else None)


def app_metadata(metadata: str | None) -> str:
    """The dispatch metadata without the cluster's part: what a re-dispatch passes on to the app."""
    meta = _parse(metadata)
    if meta is None:
        return metadata or ""  # not a JSON object: the app's own format, passed on untouched
    meta.pop(METADATA_KEY, None)
    return json.dumps(meta) if meta else ""


def with_intent(metadata: str | None, intent: ResumeIntent) -> str:
    """The app's metadata plus the cluster's part (a JSON object; non-JSON app metadata is kept under ``app``)."""
    meta = _parse(app_metadata(metadata))
    if meta is None:
        meta = {"app": metadata}
    part: dict[str, Any] = {"resume": intent.resume}
    if intent.handoff:
        part["handoff"] = intent.handoff
    meta[METADATA_KEY] = part
    return json.dumps(meta)
