"""A real headless Chromium, driven over the DevTools protocol on a pipe: standard library only.

::

    with Browser.start(tmp_path) as browser:
        browser.open("http://127.0.0.1:8000/dashboard")
        browser.wait_for("document.querySelector('#leader').textContent === 'node-8001'")
        browser.screenshot(tmp_path / "page.png")

Chromium is started with ``--remote-debugging-pipe``: it reads the protocol's commands from its
fd 3 and writes replies and events to its fd 4, one JSON message per NUL-terminated chunk. No
port is opened, no WebSocket client or driver (selenium, playwright) is needed, and nothing is
downloaded: the browser is Debian's ``chromium`` package. Leaving the ``with`` block closes the
browser and kills whatever is left of its process group.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

# Debian's package installs /usr/bin/chromium; other names for the same browser elsewhere.
_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
# A protocol command answers in milliseconds; a page load on a loaded 2-core box in a second.
COMMAND_TIMEOUT = 30.0
# Waits for what a page shows: it updates four times a second, a failover takes about one.
WAIT = 20.0
POLL = 0.1
CLOSE_TIMEOUT = 10.0
# Where the browser's pipe ends wait before the shell moves them to fds 3 and 4.
_HIGH_FD = 100


class BrowserError(Exception):
    """The browser answered a command with an error, did not answer, or exited."""


def find_chromium() -> str | None:
    """The path of a Chromium binary on PATH, or None."""
    for name in _CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """One headless Chromium process and one page (a tab) in it."""

    def __init__(self, process: subprocess.Popen[bytes], commands: int, replies: int) -> None:
        self.process = process
        self._commands = commands  # we write here; the browser reads it as its fd 3
        self._replies = replies  # the browser writes its fd 4 here
        self._buffer = b""
        self._next_id = 0
        self._session: str | None = None
        self.console: list[str] = []  # what the page logged, and its uncaught errors

    @classmethod
    def start(cls, profile_dir: Path, width: int = 1100, height: int = 900) -> Browser:
        """Start Chromium headless with a fresh profile in ``profile_dir`` and open a blank page."""
        binary = find_chromium()
        if binary is None:
            raise BrowserError("no chromium on PATH")
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        # The browser's ends go on fds far above 3 and 4 first: pipes made where 3 or 4 are
        # free (pytest's capture moves fds around) would be clobbered by the redirections.
        for_browser = [
            fcntl.fcntl(fd, fcntl.F_DUPFD, _HIGH_FD) for fd in (to_browser_r, from_browser_w)
        ]
        os.close(to_browser_r)
        os.close(from_browser_w)
        to_browser_r, from_browser_w = for_browser
        args = [
            "--headless",
            "--remote-debugging-pipe",
            # Tests run as root in CI, where Chromium's sandbox refuses to start.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--metrics-recording-only",
            "--mute-audio",
            f"--user-data-dir={profile_dir}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        # bash puts our pipe ends on the fds Chromium expects, then becomes Chromium (dash, the
        # usual /bin/sh, cannot redirect from fds above 9).
        redirect = f'exec "$@" 3<&{to_browser_r} 4>&{from_browser_w}'
        process = subprocess.Popen(
            ["/bin/bash", "-c", redirect, "bash", binary, *args],
            pass_fds=(to_browser_r, from_browser_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own process group: its renderers and helpers are killed with it.
            start_new_session=True,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        browser = cls(process, to_browser_w, from_browser_r)
        try:
            target = browser.call("Target.createTarget", url="about:blank")["targetId"]
            attached = browser.call("Target.attachToTarget", targetId=target, flatten=True)
            browser._session = attached["sessionId"]
            browser.call("Page.enable")
            browser.call("Runtime.enable")
        except BaseException:
            browser.close()
            raise
        return browser

    def __enter__(self) -> Browser:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def call(self, method: str, timeout: float = COMMAND_TIMEOUT, **params: Any) -> Any:
        """Send one command (to the page once one is attached) and return its result."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if self._session is not None and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self._session
        data = json.dumps(message).encode() + b"\0"
        try:
            while data:
                data = data[os.write(self._commands, data) :]
        except OSError as exc:
            raise BrowserError(f"{method}: the browser is gone ({exc})") from None
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline, method)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            self._note(reply)

    def open(self, url: str) -> None:
        """Load ``url`` in the page and wait until it has loaded."""
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"cannot open {url}: {result['errorText']}")
        self.wait_for("document.readyState === 'complete'")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            detail = result["exceptionDetails"]
            text = detail.get("exception", {}).get("description") or detail.get("text")
            raise BrowserError(f"{expression!r} threw: {text}")
        return result["result"].get("value")

    def text(self, selector: str) -> str:
        """The text of the first element matching the CSS ``selector``, or '' if there is none."""
        found = self.evaluate(
            f"(document.querySelector({json.dumps(selector)}) || {{}}).textContent || ''"
        )
        return str(found)

    def wait_for(self, expression: str, timeout: float = WAIT) -> Any:
        """Evaluate ``expression`` every 0.1 s until it is truthy, and return its value; fail
        (AssertionError) after ``timeout`` seconds, naming the expression."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() >= deadline:
                console = "\n".join(self.console[-10:]) or "(nothing)"
                raise AssertionError(
                    f"timed out after {timeout} s waiting for {expression!r}; "
                    f"the page's console said:\n{console}"
                )
            time.sleep(POLL)

    def screenshot(self, path: Path) -> Path:
        """Save a PNG of the page (the whole window) at ``path``."""
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        """Ask the browser to quit, then kill its process group if it has not. Idempotent."""
        if self.process.poll() is None:
            with contextlib.suppress(BrowserError, AssertionError):
                self._session = None
                self.call("Browser.close", timeout=CLOSE_TIMEOUT)
            with contextlib.suppress(subprocess.TimeoutExpired):  # killed just below
                self.process.wait(CLOSE_TIMEOUT)
        # Its helpers (zygote, renderers) may outlive the main process for a moment.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait()
        for fd in (self._commands, self._replies):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._commands = self._replies = -1

    def _read(self, deadline: float, method: str) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrowserError(f"{method}: no answer from the browser")
            ready, _, _ = select.select([self._replies], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(self._replies, 1 << 16)
            if not chunk:
                raise BrowserError(f"{method}: the browser exited ({self.process.poll()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        parsed: dict[str, Any] = json.loads(message)
        return parsed

    def _note(self, event: dict[str, Any]) -> None:
        """Keep what the page says on its console, to explain a failed wait."""
        params = event.get("params", {})
        if event.get("method") == "Runtime.consoleAPICalled":
            values = [str(arg.get("value", arg.get("description", ""))) for arg in params["args"]]
            self.console.append(f"console.{params.get('type')}: {' '.join(values)}")
        elif event.get("method") == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text")
            self.console.append(f"uncaught: {text}")
