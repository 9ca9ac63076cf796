"""The plugin's public surface stays small, and the pieces an app needs are reachable from it."""

from __future__ import annotations

import inspect

from livekit.plugins import session_guard


def test_the_top_level_exports_at_most_twelve_names() -> None:
    assert len(session_guard.__all__) <= 12, session_guard.__all__
    for name in session_guard.__all__:
        assert hasattr(session_guard, name), name


def test_adoption_needs_only_the_top_level_names() -> None:
    """What examples/starter_agent.py uses: SessionGuard.serve, GuardSession.start / fresh, the on_session_end hook."""
    assert inspect.iscoroutinefunction(session_guard.SessionGuard.serve)
    assert inspect.iscoroutinefunction(session_guard.GuardSession.start)
    assert inspect.iscoroutinefunction(session_guard.end_sessions_before_disconnect)
    options = session_guard.SessionGuardOptions()
    assert options.no_show_timeout and options.delete_room_when_empty and options.leave_if_older_agent
