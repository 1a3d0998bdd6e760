"""The tmux requirement: a missing tmux fails the interactive test in CI and skips it elsewhere."""
from __future__ import annotations

import pytest

from . import tmux_driver


def test_missing_tmux_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tmux_driver.shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="tmux is not installed"):
        tmux_driver.require_tmux()


def test_missing_tmux_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tmux_driver.shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        tmux_driver.require_tmux()
