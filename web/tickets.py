"""Resume tickets: what lets one browser tab rejoin its own room after a refresh or a network drop, and nobody else.

A ticket is `v1.<payload>.<signature>`: `payload` is base64url (no padding) of compact JSON
`{"room", "identity", "agent", "iat", "exp"}` (unix seconds), `signature` is base64url of HMAC-SHA256 over
`"v1." + payload` with the server's ticket secret. The server keeps no state: a ticket is valid when its signature
matches and `exp` is in the future. It expires about one reconnect window (plus a margin) after it was issued; the page
renews it while it is connected, so it lapses that long after the tab is gone.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

VERSION = "v1"
MAX_TICKET_LENGTH = 1024


class TicketError(ValueError):
    """A ticket that must not be honoured; `code` says why (`invalid_ticket` or `ticket_expired`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Ticket:
    room: str
    identity: str
    agent: str
    issued_at: int
    expires_at: int


def derive_secret(livekit_api_secret: str) -> bytes:
    """A ticket key derived from the LiveKit API secret (stable across restarts, never the secret itself)."""
    return hmac.new(livekit_api_secret.encode(), b"session-guard resume ticket v1", hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not text or any(c not in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_" for c in text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: bytes, signed_part: str) -> str:
    return _b64(hmac.new(secret, signed_part.encode("ascii"), hashlib.sha256).digest())


def issue(secret: bytes, *, room: str, identity: str, agent: str, ttl: float, now: float | None = None) -> str:
    now = time.time() if now is None else now
    payload = {"room": room, "identity": identity, "agent": agent, "iat": int(now), "exp": int(now + ttl)}
    body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    signed_part = f"{VERSION}.{body}"
    return f"{signed_part}.{_sign(secret, signed_part)}"


def verify(secret: bytes, ticket: str, *, now: float | None = None) -> Ticket:
    """The ticket's claims, or TicketError. The signature is checked before anything in the payload is read."""
    if not isinstance(ticket, str) or not ticket or len(ticket) > MAX_TICKET_LENGTH:
        raise TicketError("invalid_ticket", "the resume ticket is malformed")
    parts = ticket.split(".")
    if len(parts) != 3 or parts[0] != VERSION:
        raise TicketError("invalid_ticket", "the resume ticket is malformed")
    signed_part = f"{parts[0]}.{parts[1]}"
    if not hmac.compare_digest(_sign(secret, signed_part), parts[2]):
        raise TicketError("invalid_ticket", "the resume ticket's signature does not match")
    try:
        claims = json.loads(_unb64(parts[1]))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise TicketError("invalid_ticket", "the resume ticket is malformed") from None
    if not isinstance(claims, dict):
        raise TicketError("invalid_ticket", "the resume ticket is malformed")
    room, identity, agent = claims.get("room"), claims.get("identity"), claims.get("agent")
    iat, exp = claims.get("iat"), claims.get("exp")
    if not all(isinstance(v, str) and v for v in (room, identity, agent)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in (iat, exp)
    ):
        raise TicketError("invalid_ticket", "the resume ticket is malformed")
    assert isinstance(room, str) and isinstance(identity, str) and isinstance(agent, str)
    assert isinstance(iat, int) and isinstance(exp, int)
    now = time.time() if now is None else now
    if now >= exp:
        raise TicketError("ticket_expired", "the resume ticket has expired: connect again for a new session")
    return Ticket(room=room, identity=identity, agent=agent, issued_at=iat, expires_at=exp)
