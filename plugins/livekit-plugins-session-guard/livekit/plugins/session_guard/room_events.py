"""The room-event adapter: ``rtc.Room`` events in, core events out. Plain-function handlers (as the SDK requires):
each only builds the core event, with references to the live participant / publication objects it names."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from livekit import rtc

from . import _logfmt as lf
from .core import EndReason, Event, Joined, Left, Present, Resync, Shutdown, TrackPublished, TrackUnpublished
from .observe import reason_name

__all__ = ["RoomEvents"]

Dispatch = Callable[[Event, dict[str, Any]], None]


class RoomEvents:
    def __init__(self, room: rtc.Room, dispatch: Dispatch, now: Callable[[], float], room_name: Callable[[], str]):
        self._room = room
        self._dispatch = dispatch
        self._now = now
        self._room_name = room_name
        self._handlers: list[tuple[str, Callable[..., None]]] = []

    def attach(self) -> None:
        handlers: list[tuple[str, Callable[..., None]]] = [
            ("participant_connected", self._on_participant_connected),
            ("participant_disconnected", self._on_participant_disconnected),
            ("track_published", self._on_track_published),
            ("track_unpublished", self._on_track_unpublished),
            ("connected", self.resync),
            ("disconnected", self._on_disconnected),
            ("reconnecting", self._on_reconnecting),
            ("reconnected", self._on_reconnected),
        ]
        for event, handler in handlers:
            self._room.on(event, handler)  # type: ignore[arg-type]
        self._handlers = handlers

    def detach(self) -> None:
        for event, handler in self._handlers:
            with contextlib.suppress(Exception):
                self._room.off(event, handler)  # type: ignore[arg-type]
        self._handlers = []

    def resync(self) -> None:
        """Hand the core who the room holds right now (after connect, attach, or the agent's reconnect)."""
        refs: dict[str, Any] = {}
        present: list[Present] = []
        try:
            participants = list(self._room.remote_participants.values())
        except Exception:
            participants = []
        for p in participants:
            pubs = dict(p.track_publications)
            refs[p.sid] = p
            refs.update(pubs)
            present.append(Present(p.identity, p.sid, int(p.kind), tuple(pubs)))
        self._dispatch(Resync(tuple(present), self._now()), refs)

    def _on_participant_connected(self, participant: rtc.RemoteParticipant) -> None:
        self._dispatch(
            Joined(participant.identity, participant.sid, int(participant.kind), self._now()),
            {participant.sid: participant},
        )

    def _on_participant_disconnected(self, participant: rtc.RemoteParticipant) -> None:
        reason = participant.disconnect_reason
        self._dispatch(
            Left(
                participant.identity,
                participant.sid,
                int(participant.kind),
                int(reason) if reason is not None else None,
                self._now(),
            ),
            {},
        )

    def _on_track_published(self, publication: rtc.RemoteTrackPublication, participant: rtc.RemoteParticipant) -> None:
        self._dispatch(
            TrackPublished(participant.identity, participant.sid, int(participant.kind), publication.sid, self._now()),
            {publication.sid: publication},
        )

    def _on_track_unpublished(
        self, publication: rtc.RemoteTrackPublication, participant: rtc.RemoteParticipant
    ) -> None:
        self._dispatch(
            TrackUnpublished(
                participant.identity, participant.sid, int(participant.kind), publication.sid, self._now()
            ),
            {},
        )

    def _on_disconnected(self, reason: Any = None) -> None:
        lf.warning(
            "SHUTDOWN",
            "the agent left the room: ending every session",
            room=self._room_name(),
            reason=reason_name(reason if isinstance(reason, int) else None) or "room_disconnected",
            state="disconnected",
        )
        self._dispatch(Shutdown(EndReason.ROOM_DISCONNECTED, self._now()), {})

    def _on_reconnecting(self) -> None:
        lf.warning("CONNECT", "the agent is reconnecting to the room", room=self._room_name(), state="reconnecting")

    def _on_reconnected(self) -> None:
        lf.info("CONNECT", "the agent reconnected: re-reading the room", room=self._room_name(), state="reconnected")
        self.resync()
