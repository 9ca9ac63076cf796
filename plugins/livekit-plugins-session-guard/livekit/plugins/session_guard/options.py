from __future__ import annotations

from dataclasses import dataclass, field

from livekit import rtc

from .cluster.options import ClusterOptions
from .core import CoreConfig, NoticeKind

__all__ = [
    "DEFAULT_END_REASONS",
    "DEFAULT_HUMAN_KINDS",
    "FINAL_DISCONNECT_REASONS",
    "SessionGuardOptions",
]

DEFAULT_END_REASONS: frozenset[int] = frozenset({rtc.DisconnectReason.CLIENT_INITIATED})
"""Disconnect reasons that end a session at once (the issue's contract: only a hang-up). Every other
reason (DUPLICATE_IDENTITY, SIGNAL_CLOSE, CONNECTION_TIMEOUT, MEDIA_FAILURE, ...) opens the reconnect
window."""

FINAL_DISCONNECT_REASONS: frozenset[int] = frozenset(
    {
        rtc.DisconnectReason.CLIENT_INITIATED,  # the user hung up
        rtc.DisconnectReason.PARTICIPANT_REMOVED,  # removed through the API: not coming back on its own
        rtc.DisconnectReason.ROOM_DELETED,
        rtc.DisconnectReason.ROOM_CLOSED,
        rtc.DisconnectReason.USER_REJECTED,  # SIP: callee rejected
        rtc.DisconnectReason.USER_UNAVAILABLE,  # SIP: callee did not answer
    }
)
"""A stricter opt-in set for ``end_on_disconnect_reasons``: every reason after which the same
participant does not come back on its own."""

DEFAULT_HUMAN_KINDS: frozenset[int] = frozenset(
    {
        rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD,
        rtc.ParticipantKind.PARTICIPANT_KIND_SIP,
        rtc.ParticipantKind.PARTICIPANT_KIND_CONNECTOR,  # a phone user through a WhatsApp/Twilio connector
    }
)
"""Participant kinds that get sessions. AGENT, EGRESS, INGRESS (a media feed, not a conversation) and
BRIDGE are never sessions and never count as the last human."""

_DEFAULT_NOTICE_TEXTS: dict[NoticeKind, str] = {
    NoticeKind.IDLE_WARNING: "Are you still there? I'll end our conversation soon if I don't hear from you.",
    NoticeKind.IDLE_END: "I haven't heard from you in a while, so I'm ending our conversation. Goodbye!",
    NoticeKind.MAX_DURATION_END: "We've reached the maximum length of a conversation, so I have to end it "
    "here. Goodbye!",
    NoticeKind.ERRORS_END: "I'm sorry, I'm having technical trouble and have to end our conversation. "
    "Please try again in a moment.",
}


@dataclass(frozen=True)
class SessionGuardOptions:
    """Limits and bounds of a :class:`SessionGuard`. Durations are in seconds; ``None`` disables."""

    reconnect_window: float = 30.0
    """How long an AWAY session waits for the same identity to come back (0 = end at once)."""
    max_duration: float | None = 2 * 60 * 60
    idle_timeout: float | None = 5 * 60
    """End the session when the user stays away this long after the AgentSession reported them away (its
    ``user_away_timeout`` of silence, default 15 s: one silence timer, the framework's; ``note_away`` /
    ``note_activity`` for apps without an AgentSession)."""
    idle_warning_before: float = 30.0
    """Send the IDLE_WARNING notice this long before the idle end (0 = no warning)."""
    max_consecutive_errors: int | None = None
    """Off by default: the breaker is the AgentSession's own (``SessionConnectOptions.max_unrecoverable_errors``);
    when it closes the AgentSession with reason ERROR the session ends (``EndReason.ERRORS``). Set this only to
    also count errors the app reports itself (``note_error``; ``note_success`` resets)."""
    end_on_disconnect_reasons: frozenset[int] = DEFAULT_END_REASONS
    human_kinds: frozenset[int] = DEFAULT_HUMAN_KINDS

    hook_timeout: float = 10.0
    """Bound of each start/resume/away/end/last-human hook call."""
    notice_timeout: float = 10.0
    """Bound of delivering one notice (speaking a warning or the goodbye)."""
    task_cancel_timeout: float = 5.0
    """Bound of cancelling and awaiting the tasks of one scope (connection or session)."""
    leak_grace: float = 1.0
    """After a hook timed out it is cancelled; still running after this, it is reported leaked."""
    shutdown_timeout: float = 10.0
    """Total bound of ``SessionGuard.aclose()``: every session ends in parallel within it."""

    publish_debounce: float = 0.25
    """Snapshot publishing (cross-process /sessions): at most one write per this interval."""
    publish_interval: float = 5.0
    """Snapshot publishing heartbeat, so task counts and ``updated_at`` stay fresh."""

    notice_texts: dict[NoticeKind, str] = field(default_factory=lambda: dict(_DEFAULT_NOTICE_TEXTS))

    # room hygiene (``SessionGuard.serve``; see hygiene.py)
    no_show_timeout: float | None = 20.0
    """No human joined this long after the agent did (and no session ever started): delete the room, end the job."""
    delete_room_when_empty: bool = True
    """The last human session finished its cleanup and no human is in the room: delete the room, end the job."""
    leave_if_older_agent: bool = True
    """An older agent of this agent name is in the room (a livekit-server restart): this job leaves. Not used with
    ``cluster``: the room's lease decides who serves it."""
    cluster: ClusterOptions | None = None
    """Sessions that outlive their process (``cluster.ClusterOptions``: saved in Redis, one owner per room, takeover
    after a crash, handoff on a deploy). None: sessions live and die with this job's process."""

    def __post_init__(self) -> None:
        for name in (
            "reconnect_window",
            "hook_timeout",
            "notice_timeout",
            "task_cancel_timeout",
            "leak_grace",
            "shutdown_timeout",
            "publish_debounce",
            "publish_interval",
            "idle_warning_before",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("max_duration", "idle_timeout", "no_show_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 or None")
        if self.max_consecutive_errors is not None and self.max_consecutive_errors < 1:
            raise ValueError("max_consecutive_errors must be >= 1 or None")

    def core_config(self) -> CoreConfig:
        return CoreConfig(
            reconnect_window=self.reconnect_window,
            max_duration=self.max_duration,
            idle_timeout=self.idle_timeout,
            idle_warning_before=self.idle_warning_before,
            max_consecutive_errors=self.max_consecutive_errors,
            end_reasons=frozenset(int(r) for r in self.end_on_disconnect_reasons),
            human_kinds=frozenset(int(k) for k in self.human_kinds),
        )

    def notice_text(self, kind: NoticeKind) -> str:
        return self.notice_texts.get(kind, _DEFAULT_NOTICE_TEXTS.get(kind, ""))
