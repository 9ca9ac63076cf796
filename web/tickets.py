"""Resume tickets: what lets one browser tab rejoin its own room after a refresh or a network drop, and nobody else.

A ticket is a standard JWT (RFC 7519, PyJWT), HS256 under the server's ticket key, with the claims
`{"room", "identity", "agent", "iat", "exp"}` (unix seconds). The server keeps no state: a ticket is valid when its
signature matches, its header names HS256 (nothing else is accepted: no `none`, no other HMAC, no RS/ES key
confusion) and `exp` is in the future. It expires about one reconnect window (plus a margin) after it was issued; the
page renews it while it is connected, so it lapses that long after the tab is gone.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Any

import jwt

ALGORITHM = "HS256"
MAX_TICKET_LENGTH = 1024
_CLAIMS = ("room", "identity", "agent", "iat", "exp")


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


def issue(secret: bytes, *, room: str, identity: str, agent: str, ttl: float, now: float | None = None) -> str:
    now = time.time() if now is None else now
    payload = {"room": room, "identity": identity, "agent": agent, "iat": int(now), "exp": int(now + ttl)}
    return jwt.encode(payload, secret, algorithm=ALGORITHM)


def _malformed() -> TicketError:
    return TicketError("invalid_ticket", "the resume ticket is malformed")


def verify(secret: bytes, ticket: str, *, now: float | None = None) -> Ticket:
    """The ticket's claims, or TicketError. PyJWT checks the algorithm and the signature before it reads a claim."""
    if not isinstance(ticket, str) or not ticket or len(ticket) > MAX_TICKET_LENGTH:
        raise _malformed()
    try:
        claims: dict[str, Any] = jwt.decode(
            ticket,
            secret,
            algorithms=[ALGORITHM],
            # exp is checked below against `now` (PyJWT reads the clock itself); iat must not be in the future.
            options={"require": list(_CLAIMS), "verify_exp": False, "verify_iat": True},
        )
    except jwt.InvalidAlgorithmError:
        raise TicketError("invalid_ticket", "the resume ticket is not signed with HS256") from None
    except jwt.InvalidSignatureError:
        raise TicketError("invalid_ticket", "the resume ticket's signature does not match") from None
    except jwt.ImmatureSignatureError:
        raise TicketError("invalid_ticket", "the resume ticket was issued in the future") from None
    except jwt.InvalidTokenError:  # DecodeError, MissingRequiredClaimError, a non-integer iat, ...
        raise _malformed() from None
    room, identity, agent = claims["room"], claims["identity"], claims["agent"]
    iat, exp = claims["iat"], claims["exp"]
    if not all(isinstance(v, str) and v for v in (room, identity, agent)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in (iat, exp)
    ):
        raise _malformed()
    now = time.time() if now is None else now
    if now >= exp:
        raise TicketError("ticket_expired", "the resume ticket has expired: connect again for a new session")
    return Ticket(room=room, identity=identity, agent=agent, issued_at=iat, expires_at=exp)
