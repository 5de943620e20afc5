"""run_in_child: what comes back from the forked child (value, exception, death, timeout)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from normfold.errors import VerificationTimeout, VerificationUnavailable
from normfold.watchdog import _CHILDREN, run_in_child


def _add(a, b, *, c=0):
    return a + b + c


def _raise():
    raise ValueError("bad\nthing")


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _exit_quietly():
    os._exit(7)


def _sleep():
    time.sleep(30)


def _unpicklable():
    return lambda: None


def test_the_value_and_keyword_arguments_come_back():
    assert run_in_child(_add, 1, 2, c=3, timeout=30) == 6
    assert not _CHILDREN


def test_the_childs_exception_is_raised_here():
    with pytest.raises(ValueError, match="bad\nthing"):
        run_in_child(_raise)


@pytest.mark.parametrize("func, how", [(_die, "signal SIGKILL"), (_exit_quietly, "exit code 7")])
def test_a_child_that_dies_is_unavailable_and_says_how(func, how):
    with pytest.raises(VerificationUnavailable, match=f"the check process ended without a result \\({how};"):
        run_in_child(func, what="check")
    assert not _CHILDREN


def test_past_the_timeout_the_child_is_killed():
    started = time.monotonic()
    with pytest.raises(VerificationTimeout, match=r"^check did not finish within --timeout 0.3 s; stopped$"):
        run_in_child(_sleep, timeout=0.3, what="check")
    assert time.monotonic() - started < 10
    assert not _CHILDREN


def test_an_unpicklable_result_is_an_error_on_one_line():
    with pytest.raises(RuntimeError, match="^unpicklable result: "):
        run_in_child(_unpicklable)
