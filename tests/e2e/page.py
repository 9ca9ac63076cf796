"""Drives the selector page like a person would (clicks, typing, Enter) and reads what it shows."""

from __future__ import annotations

import re
import time
from typing import Any

from playwright.sync_api import BrowserContext, ConsoleMessage, Error, Page

LIVE_STATES = ("listening", "thinking", "speaking", "initializing")


def turn(reply: str) -> int:
    m = re.search(r"\(turn (\d+)\)", reply)
    assert m, f"unexpected reply {reply!r}"
    return int(m.group(1))


class BrowserPage:
    def __init__(self, context: BrowserContext, base_url: str) -> None:
        self.context = context
        self.base_url = base_url
        self.console_errors: list[str] = []
        self.console_log: list[str] = []
        self.page: Page = context.pages[0] if context.pages else context.new_page()
        self.page.on("console", self._on_console)
        self.page.on("pageerror", self._on_pageerror)

    # --- console ---------------------------------------------------------------------------------------------

    def _on_console(self, msg: ConsoleMessage) -> None:
        line = f"[{msg.type}] {msg.text}"
        if msg.text.startswith("Failed to load resource") and msg.location.get("url"):
            line += f" ({msg.location['url']})"
        self.console_log.append(line)
        if msg.type == "error":
            self.console_errors.append(line)

    def _on_pageerror(self, err: Error) -> None:
        self.console_errors.append(f"[pageerror] {err}")

    def assert_no_console_errors(self) -> None:
        assert not self.console_errors, "console errors:\n" + "\n".join(self.console_errors[:20])

    def close(self) -> None:
        try:
            self.context.close()
        except Error:
            pass

    # --- navigation and controls -----------------------------------------------------------------------------

    def poll(self, js: str, arg: Any = None, *, timeout: float = 30.0, what: str = "") -> Any:
        """Evaluate `js` (a function of `arg`) until it returns something truthy. (Playwright's wait_for_function
        evaluates strings, which the page's Content-Security-Policy forbids; `evaluate` goes through CDP.)"""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = self.page.evaluate(js, arg)
            if last:
                return last
            time.sleep(0.05)
        raise AssertionError(
            f"timed out after {timeout} s waiting for {what or js[:80]} (last: {last!r}); "
            f"status: {self.status_text()!r}; transcript: {self.entries()[-6:]}"
        )

    def open(self) -> BrowserPage:
        self.page.goto(self.base_url + "/")
        self.poll("() => document.querySelectorAll('#agent option[value^=agent-]').length > 0", what="the agent list")
        return self

    def pick_agent(self, agent_id: str) -> None:
        self.page.select_option("#agent", agent_id)

    def selected_agent(self) -> str:
        return str(self.page.input_value("#agent"))

    def state(self) -> str:
        return str(self.page.get_attribute("#status-box", "data-state"))

    def status_text(self) -> str:
        return str(self.page.text_content("#status"))

    def wait_state(self, *states: str, timeout: float = 30.0) -> str:
        self.poll(
            "states => states.includes(document.getElementById('status-box').dataset.state)",
            list(states),
            timeout=timeout,
            what=f"state in {states}",
        )
        return self.state()

    def connect(self, timeout: float = 30.0) -> None:
        """Click Connect and wait until the agent is in the room (any live agent state)."""
        self.page.click("#connect")
        self.wait_state(*LIVE_STATES, timeout=timeout)

    def disconnect(self) -> None:
        self.page.click("#disconnect")
        self.wait_state("idle", timeout=15)

    def room(self) -> str:
        return str(self.page.text_content("#d-room"))

    def identity(self) -> str:
        return str(self.page.text_content("#d-identity"))

    # --- transcript ------------------------------------------------------------------------------------------

    def entries(self, who: str | None = None) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self.page.evaluate(
            """() => [...document.querySelectorAll('#transcript li')].map(li => ({
                who: li.dataset.who, via: li.dataset.via || '', interim: li.classList.contains('interim'),
                text: (li.querySelector('.text') || li).textContent }))"""
        )
        return [e for e in data if who is None or e["who"] == who]

    def count(self, who: str) -> int:
        return len(self.entries(who))

    def wait_agent_text(self, contains: str, *, after: int = 0, timeout: float = 30.0) -> str:
        """The first complete agent entry with index >= `after` that contains `contains`."""
        return str(
            self.poll(
                """([after, needle]) => {
                const items = [...document.querySelectorAll('#transcript li.agent')].slice(after);
                const hit = items.find(li => !li.classList.contains('interim')
                    && li.querySelector('.text').textContent.includes(needle));
                return hit ? hit.querySelector('.text').textContent : null;
            }""",
                [after, contains],
                timeout=timeout,
                what=f"an agent reply containing {contains!r}",
            )
        )

    def say(self, text: str) -> None:
        """Type into the message box and press Enter."""
        box = self.page.locator("#message")
        box.click()
        box.fill(text)
        box.press("Enter")

    def ask(self, text: str, expect: str = "You said:", timeout: float = 30.0) -> str:
        before = self.count("agent")
        self.say(text)
        return self.wait_agent_text(expect, after=before, timeout=timeout)

    def wait_greeting(self, timeout: float = 30.0) -> str:
        return self.wait_agent_text("listening", timeout=timeout)

    # --- measurements ----------------------------------------------------------------------------------------

    def mark_ms(self, name: str) -> float | None:
        value = self.page.evaluate(
            "n => { const e = performance.getEntriesByName(n); return e.length ? e[e.length - 1].startTime : null }",
            name,
        )
        return None if value is None else float(value)

    def wait_mark(self, name: str, timeout: float = 30.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = self.mark_ms(name)
            if v is not None:
                return v
            time.sleep(0.05)
        raise AssertionError(f"no performance mark {name!r} within {timeout} s")
