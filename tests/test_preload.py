"""verify.preload(): what the process that forks verification children does once, before the first."""

from __future__ import annotations

import importlib
import os

import pytest

import normfold.verify as verify


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.fixture
def cold(monkeypatch):
    monkeypatch.setattr(verify, "_WARM", False)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_warming_onnxruntime_leaves_no_thread_for_a_fork_to_lose(cold):
    importlib.import_module("onnxruntime")  # its import starts a thread of its own: not ours to count
    before = threads()
    verify.preload()
    assert verify._WARM and threads() == before


def test_onnxruntime_is_warmed_once_per_process(cold, monkeypatch):
    sessions = []
    real = verify.open_session
    monkeypatch.setattr(verify, "open_session", lambda *a, **k: sessions.append(a[1]) or real(*a, **k))
    verify.preload()
    verify.preload()
    assert sessions == ["warm-up"]


def test_the_warm_up_model_runs():
    """A warm-up that failed would be silent (preload ignores its result) and every child would
    build onnxruntime's environment again."""
    assert verify._warm_onnxruntime() is True


def test_a_broken_onnxruntime_is_left_for_the_run_to_report(cold, monkeypatch):
    def broken(*args, **kwargs):
        raise verify.VerificationUnavailable("onnxruntime cannot load the warm-up model: no CPU provider")

    monkeypatch.setattr(verify, "open_session", broken)
    verify.preload()  # no error here: the run itself says what is wrong
    assert verify._WARM and verify._warm_onnxruntime() is False
