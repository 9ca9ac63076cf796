"""Room hygiene: what every guarded agent needs around its sessions, on by default (``SessionGuardOptions``).

- ``no_show_timeout``: dispatched to a room whose user left before the agent joined (connect, then disconnect at
  once): no session ever starts, so "last human gone" never fires; without this the job waits for LiveKit's
  departure timeout in an empty room. After this long with no session and no human: delete the room, end the job.
- ``delete_room_when_empty``: when the last human session has finished its cleanup, delete the room and end the
  job, unless a human just joined (the guard starts their session). Deleting, not just leaving: a client that
  rejoins the same room name gets a new room and a newly dispatched agent, never a room where no agent answers.
- ``leave_if_older_agent``: after a livekit-server restart the room is created again by the first client to
  rejoin; the old job's ``rtc.Room`` rejoins it and the human's token dispatches a new job into it as well. Two
  agents would answer every turn: the older one (which resumed the sessions) stays, the newer one leaves.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from livekit import rtc
from livekit.agents.types import ATTRIBUTE_AGENT_NAME

from .log import logger

if TYPE_CHECKING:
    from livekit.agents import JobContext

    from .guard import SessionGuard

__all__ = ["RoomHygiene", "humans_present", "older_agent_of_this_name"]


def humans_present(room: rtc.Room, human_kinds: frozenset[int]) -> bool:
    return any(int(p.kind) in human_kinds for p in room.remote_participants.values())


def older_agent_of_this_name(room: rtc.Room, agent_name: str) -> rtc.RemoteParticipant | None:
    """Another agent of ``agent_name`` that joined the room before this one, if any."""
    me = room.local_participant
    if me.joined_at is None:
        return None
    for p in room.remote_participants.values():
        if p.kind != rtc.ParticipantKind.PARTICIPANT_KIND_AGENT or p.identity == me.identity or p.joined_at is None:
            continue
        joined_first = (p.joined_at, p.identity) < (me.joined_at, me.identity)
        if joined_first and p.attributes.get(ATTRIBUTE_AGENT_NAME) == agent_name:
            return p
    return None


class RoomHygiene:
    def __init__(self, ctx: JobContext, guard: SessionGuard) -> None:
        self._ctx = ctx
        self._guard = guard
        self._opts = guard.options
        self._no_show: asyncio.TimerHandle | None = None
        if self._opts.delete_room_when_empty:
            guard.on_last_human_gone(self._last_human_gone)

    @property
    def _room(self) -> rtc.Room:
        return self._ctx.room

    def _humans(self) -> bool:
        return humans_present(self._room, frozenset(int(k) for k in self._opts.human_kinds))

    async def _last_human_gone(self) -> None:
        room = self._room.name
        if self._guard.closed and self._guard.ownership is not None:
            return  # the sessions moved to another job (or this job is parking them): the room lives on
        if self._humans():
            logger.info(
                "[SHUTDOWN] last session ended but a human just joined %s: keeping the room", room, extra={"room": room}
            )
            return
        logger.info("[SHUTDOWN] last human gone: deleting room %s and ending the job", room, extra={"room": room})
        if self._guard.ownership is not None:
            # let go of the room first: a call to the same room name right after gets a job that must own it
            await self._guard.ownership.finish(parked=False)
        await self._ctx.delete_room()
        self._ctx.shutdown(reason="last human gone")

    def leave_if_second_agent(self, *_: object) -> bool:
        """True (and the job is ending) when an older agent of this agent name already serves the room."""
        if not self._opts.leave_if_older_agent:
            return False
        older = older_agent_of_this_name(self._room, self._ctx.job.agent_name)
        if older is None:
            return False
        logger.warning(
            "[SESSION] agent %s already serves room %s (it joined first): this job leaves",
            older.identity,
            self._room.name,
            extra={"room": self._room.name},
        )
        self._ctx.shutdown(reason="another agent of this name serves the room")
        return True

    def watch(self) -> None:
        """After connect: keep checking for an older agent, and start the no-show timer."""
        if self._opts.leave_if_older_agent and self._opts.cluster is None:
            self._room.on("participant_connected", self.leave_if_second_agent)
            self._room.on("reconnected", self.leave_if_second_agent)
        if self._opts.no_show_timeout is not None:
            self._no_show = asyncio.get_running_loop().call_later(self._opts.no_show_timeout, self._no_show_expired)

            async def cancel(_: str) -> None:
                if self._no_show is not None:
                    self._no_show.cancel()

            self._ctx.add_shutdown_callback(cancel)

    def _no_show_expired(self) -> None:
        if self._guard.totals.started == 0 and not self._humans():
            room = self._room.name
            logger.info(
                "[SHUTDOWN] no human joined room %s within %.0f s: deleting it and ending the job",
                room,
                self._opts.no_show_timeout,
                extra={"room": room},
            )
            self._ctx.delete_room()  # a task of the job context; shutdown waits for it
            self._ctx.shutdown(reason="no human joined")
