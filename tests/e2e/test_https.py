"""The deployment recipe (docs/deploy.md) end to end: the page from a non-localhost HTTPS origin, through caddy.

caddy (Debian's package, `tls internal`, loopback only, a free port, its config and data under the test's tmp dir)
serves `https://sg.test:<port>`: `/rtc*` goes to livekit-server (its signalling, as in deploy.md), everything else
to a web server of this test's own, which listens on `::1` and trusts only `::1` (SG_TRUSTED_PROXIES), so the
browser (which reaches caddy over 127.0.0.1) and caddy (which reaches the web server over ::1) are told apart.
Chromium maps `sg.test` to 127.0.0.1 (`--host-resolver-rules`) and trusts exactly caddy's leaf certificate
(`--ignore-certificate-errors-spki-list` with its SPKI hash: no blanket ignoring of certificate errors). The origin
is not localhost, so the microphone is there only because the page is a secure context; the test talks to the agent
by voice through the proxy and checks the spoken answer in the transcript.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import E2E_AGENT_NAME, WebServer, browsers, run_web_server, stop_process, write_wav
from tests.e2e.page import LIVE_STATES, BrowserPage
from tests.integration.conftest import Stack, WorkerProc, free_port, wait_until

HOST = "sg.test"
CADDY = shutil.which("caddy") or "/usr/bin/caddy"
SPOOFED = "203.0.113.66"
"""What the browser claims in its own X-Forwarded-For: caddy must overwrite it, the web server must never see it."""


def _der_element(der: bytes, at: int) -> tuple[int, int]:
    """(start of the content, end of the element) of the DER element at `at`."""
    length = der[at + 1]
    start = at + 2
    if length & 0x80:
        n = length & 0x7F
        length = int.from_bytes(der[start : start + n], "big")
        start += n
    return start, start + length


def spki_sha256(cert_pem: str) -> str:
    """base64 SHA-256 of the certificate's SubjectPublicKeyInfo (what Chromium's SPKI allow-list takes)."""
    b64 = "".join(line for line in cert_pem.splitlines() if line and not line.startswith("-----"))
    der = base64.b64decode(b64)
    tbs_start, _ = _der_element(der, 0)  # Certificate ::= SEQUENCE { tbsCertificate, ... }
    at, _ = _der_element(der, tbs_start)  # the fields of tbsCertificate
    fields: list[tuple[int, int]] = []
    while len(fields) < 7:
        _, end = _der_element(der, at)
        fields.append((at, end))
        at = end
    # [0] version, serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo
    if der[fields[0][0]] != 0xA0:
        fields.insert(0, (0, 0))
    spki_at, spki_end = fields[6]
    return base64.b64encode(hashlib.sha256(der[spki_at:spki_end]).digest()).decode()


@dataclass
class Front:
    url: str
    """https://sg.test:<port>"""
    port: int
    spki: str
    web: WebServer
    log: Path


def _caddyfile(data: Path, https_port: int, http_port: int, livekit: str, web: str) -> str:
    return f"""{{
	admin off
	auto_https disable_redirects
	skip_install_trust
	storage file_system {data}
	http_port {http_port}
	https_port {https_port}
	servers {{
		protocols h1 h2
	}}
}}

https://{HOST}:{https_port} {{
	bind 127.0.0.1
	tls internal
	@livekit path /rtc /rtc/*
	handle @livekit {{
		reverse_proxy {livekit}
	}}
	handle {{
		reverse_proxy {web}
	}}
}}
"""


@contextlib.contextmanager
def run_caddy(directory: Path, port: int, livekit: str, web: str) -> Iterator[tuple[str, Path]]:
    """caddy on 127.0.0.1:`port` in front of `livekit` and `web` (host:port each): (its leaf's SPKI hash, its log).
    Stopped (SIGTERM, then SIGKILL after 10 s) when the block ends."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "Caddyfile"
    config.write_text(_caddyfile(directory / "data", port, free_port(), livekit, web))
    log = directory / "caddy.log"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(directory),
        "XDG_CONFIG_HOME": str(directory / "config"),
        "XDG_DATA_HOME": str(directory / "data"),
    }
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            [CADDY, "run", "--config", str(config), "--adapter", "caddyfile"],
            cwd=directory,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    leaf = directory / "data" / "certificates" / "local" / HOST / f"{HOST}.crt"
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"caddy exited with {proc.returncode}: {log.read_text()[-2000:]}")
            if not leaf.exists():
                return False
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
            return False

        wait_until(up, 20, 0.1, "caddy to listen with its certificate")
        yield spki_sha256(leaf.read_text()), log
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def front(stack: Stack, worker: WorkerProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    """The web server on ::1 behind caddy on 127.0.0.1, as docs/deploy.md sets them up."""
    if not Path(CADDY).exists():
        pytest.fail("caddy is missing: scripts/lib/setup.sh installs it (apt-get install caddy)")
    livekit = stack.info.livekit_url.split("://", 1)[1].rstrip("/")
    port = free_port()  # caddy's: the web server hands out wss://sg.test:<port> as the LiveKit URL
    extra_env = {"SG_TRUSTED_PROXIES": "::1", "SG_PUBLIC_LIVEKIT_URL": f"wss://{HOST}:{port}"}
    with run_web_server(stack, worker, E2E_AGENT_NAME, host="::1", extra_env=extra_env, name="web-https") as web:
        directory = tmp_path_factory.mktemp("caddy")
        with run_caddy(directory, port, livekit, web.url.removeprefix("http://")) as (spki, log):
            yield Front(url=f"https://{HOST}:{port}", port=port, spki=spki, web=web, log=log)


@pytest.fixture
def https_browser(tmp_path: Path, front: Front, request: pytest.FixtureRequest) -> Iterator[Callable[..., BrowserPage]]:
    args = (
        f"--host-resolver-rules=MAP {HOST} 127.0.0.1",
        f"--ignore-certificate-errors-spki-list={front.spki}",
    )
    with browsers(tmp_path, front.url, request, args) as open_page:
        yield open_page


def test_voice_through_tls_from_a_non_localhost_origin(
    stack: Stack,
    worker: WorkerProc,
    front: Front,
    https_browser: Callable[..., BrowserPage],
    letta_agent: str,
    tmp_path: Path,
) -> None:
    """Page, token API and LiveKit signalling through caddy over TLS; the microphone through the secure context;
    a spoken question answered in the transcript; the web server saw the browser, not caddy, as the client."""
    text = "hello over a secure line"
    wav = write_wav(tmp_path / "speech.wav", text=text, lead_s=4.0, tail_s=1.0)
    r = httpx.post(
        stack.provider_url.removesuffix("/v1") + "/_test/stt", json={"texts": [text], "replace": True}, timeout=5
    )
    r.raise_for_status()
    ui = https_browser(wav=wav, loop=False)
    # A made-up X-Forwarded-For from the browser itself: caddy does not trust it, so the web server never sees it.
    ui.page.set_extra_http_headers({"X-Forwarded-For": SPOOFED})
    ui.open()
    page = ui.page
    assert page.evaluate("() => location.origin") == front.url
    assert page.evaluate("() => window.isSecureContext") is True
    assert page.evaluate("() => typeof navigator.mediaDevices?.getUserMedia") == "function"
    ui.pick_agent(letta_agent)

    with page.expect_response(lambda resp: resp.url.endswith("/api/token")) as answer:
        page.click("#connect")
    token = answer.value.json()
    assert answer.value.status == 200, token
    assert token["url"] == f"wss://{HOST}:{front.port}", "the page is handed the proxied wss:// URL"
    ui.wait_state(*LIVE_STATES, timeout=30)
    room, identity = ui.room(), ui.identity()
    ui.poll("() => document.getElementById('level').value > 0.02", timeout=15, what="the mic level meter to move")
    reply = ui.wait_agent_text("secure line", timeout=40)
    assert reply == f"You said: {text}. (turn 1)"
    assert any(e["via"] == "voice" and "secure line" in e["text"] for e in ui.entries("user"))
    assert [s["state"] for s in stack.sessions()["sessions"] if s["room"] == room] == ["active"]

    # Health through the proxy answers for a load balancer.
    health = page.evaluate("() => fetch('/api/health').then(r => r.status)")
    assert health == 200

    # The web server keyed its rate limiter (and its log) on the browser's address, not on caddy's (::1), and
    # never on what the browser made up.
    log = front.web.log.read_text()
    lines = [line for line in log.splitlines() if f"token for {identity} in {room}" in line]
    assert lines, f"no token line for {identity} in {front.web.log}"
    assert all(re.search(r"client 127\.0\.0\.1$", line) for line in lines), lines
    assert SPOOFED not in log
    # ... while caddy itself is what connected to it (the access log names the TCP peer).
    assert "::1" in log
    ui.disconnect()
    wait_until(
        lambda: not [s for s in stack.sessions()["sessions"] if s["room"] == room], 15, 0.1, "the session to end"
    )
