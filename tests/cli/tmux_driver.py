"""Drive a program in a detached tmux session: type, press keys, read the screen, wait with timeouts.

Each driver runs its own tmux server (``-L``), so tests never touch a person's tmux sessions.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence

import pytest


def require_tmux() -> str:
    """The tmux binary. Absent: a failure in CI (``CI=true``, where .ci/run installs it), else a skip."""
    tmux = shutil.which("tmux")
    if tmux is None:
        message = "tmux is not installed (apt-get install -y tmux); the interactive chat test needs it"
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return tmux


class TmuxDriver:
    """One program in one tmux pane of a fixed size; ``EXIT=<status>`` is printed when it ends."""

    def __init__(self, argv: Sequence[str], width: int = 120, height: int = 40, cwd: str | None = None) -> None:
        self.tmux = require_tmux()
        self.socket = f"edgellm-test-{uuid.uuid4().hex[:8]}"
        self.target = "chat"
        command = f"{shlex.join(argv)}; echo EXIT=$?; sleep 3600"
        self._run("-f", "/dev/null", "new-session", "-d", "-s", self.target, "-x", str(width), "-y", str(height),
                  "-c", cwd or os.getcwd(), command)
        self._run("set-option", "-t", self.target, "history-limit", "20000")

    def _run(self, *args: str) -> str:
        done = subprocess.run([self.tmux, "-L", self.socket, *args], capture_output=True, text=True, timeout=30,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args[:2])} failed: {done.stderr.strip()}")
        return done.stdout

    def screen(self) -> str:
        """The whole pane, scrollback included, wrapped lines joined."""
        return self._run("capture-pane", "-p", "-J", "-S", "-", "-t", self.target)

    def last_line(self) -> str:
        lines = [line for line in self.screen().splitlines() if line.strip()]
        return lines[-1].rstrip() if lines else ""

    def type(self, text: str, enter: bool = True) -> None:
        self._run("send-keys", "-t", self.target, "-l", text)
        if enter:
            self._run("send-keys", "-t", self.target, "Enter")

    def press(self, key: str) -> None:
        self._run("send-keys", "-t", self.target, key)

    def wait_for(self, what: str, condition: Callable[[str], bool], timeout: float) -> str:
        """Poll the screen until ``condition(screen)``; fail showing the screen after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if condition(screen):
                return screen
            if "EXIT=" in screen and "EXIT=" not in what:
                pytest.fail(f"the program ended while waiting for {what}:\n{screen[-3000:]}", pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; screen:\n{screen[-3000:]}",
                            pytrace=False)
            time.sleep(0.2)

    def close(self) -> None:
        subprocess.run([self.tmux, "-L", self.socket, "kill-server"], capture_output=True, timeout=30, check=False)
