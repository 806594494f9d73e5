"""A guard for tests of code that must not hang."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest


def run_with_timeout(function: Callable[[], Any], timeout: float = 3.0) -> Any:
    """Run a blocking call in a daemon thread so that a hang fails the test instead of the suite."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(("ok", function()))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            outcome.append(("error", exc))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        pytest.fail(f"the call did not return within {timeout} s (it hangs)")
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value
