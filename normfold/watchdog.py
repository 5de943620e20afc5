"""Time limits and interrupts around work that onnxruntime does.

onnxruntime runs a model in C++ without returning to Python, so neither a signal handler nor a
timer can stop it from inside the process. `run_in_child` therefore runs such a call in a forked
child process (its own process group) while this process waits in Python: a timeout, Ctrl-C or
SIGTERM is seen at once, the child's whole group is killed, and the caller gets
VerificationTimeout or KeyboardInterrupt. The child's result comes back pickled through a pipe.

Any code can use it: `run_in_child(compare_models, a, b, timeout=60)`.
"""

from __future__ import annotations

import os
import pickle
import signal
import time

from normfold.errors import VerificationTimeout, VerificationUnavailable, check_interrupted, one_line

_CHILDREN: set[int] = set()  # process groups of running children, killed on an interrupt


def kill_children() -> None:
    for pgid in list(_CHILDREN):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
        _CHILDREN.discard(pgid)


def silence_onnxruntime() -> None:
    """onnxruntime's own log (warnings such as MergeShapeInfo, printed in colour on stderr) is off:
    normfold's one-line errors say what failed."""
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    except Exception:  # an onnxruntime that cannot be imported fails later with its own message
        pass


def die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this process when `parent` dies, even by SIGKILL, which no handler
    sees; without it onnxruntime would go on alone with a model that may never end (our own
    process group is not the killed run's). Elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl (not Linux)
        return
    if os.getppid() != parent:  # it died before the call
        os._exit(1)


def _child(send, func, args, kwargs, recv=None, parent=None) -> None:
    if parent is not None:
        die_with_parent(parent)
    if recv is not None:
        # The fork inherited the pipe's read end: closed, so that a parent that died makes sending
        # a large result fail at once instead of blocking on a pipe nobody reads.
        recv.close()
    os.setpgid(0, 0)  # our own group: killing it ends whatever onnxruntime started too
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it kills us on Ctrl-C
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    silence_onnxruntime()
    try:
        message = (True, func(*args, **kwargs))
    except BaseException as exc:  # sent back and raised in the parent
        message = (False, exc)
    try:
        data = pickle.dumps(message)
    except Exception as exc:
        data = pickle.dumps((False, RuntimeError(f"{type(message[1]).__name__}: {one_line(message[1])}"
                                                 if not message[0] else f"unpicklable result: {one_line(exc)}")))
    try:
        send.send_bytes(data)
        send.close()
    except OSError:  # the parent stopped waiting (interrupted, timed out): nobody to tell
        pass
    os._exit(0)  # no exit handlers, no traceback printed by multiprocessing: the parent decides


def run_in_child(func, *args, timeout: float | None = None, what: str = "verification", **kwargs):
    """func(*args, **kwargs) in a forked child; its return value, or its exception raised here.
    Past `timeout` seconds the child is killed and VerificationTimeout raised; an interrupt here
    kills it too. A child that dies (a crash inside onnxruntime) gives VerificationUnavailable."""
    return start_in_child(func, *args, what=what, **kwargs).result(timeout)


def start_in_child(func, *args, what: str = "verification", **kwargs) -> "Child":
    """func(*args, **kwargs) started in a forked child, while this process goes on (fold_job
    writes the result while the original runs); `.result()` waits for it, `.cancel()` kills it."""
    import multiprocessing

    silence_onnxruntime()  # also imports onnxruntime once here, not in every child
    check_interrupted()  # an interrupt an import swallowed
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(send, func, args, kwargs, recv, os.getpid()), daemon=False)
    process.start()
    send.close()
    try:
        os.setpgid(process.pid, process.pid)  # also from here: a kill before the child's own call still hits it
    except OSError:
        pass
    _CHILDREN.add(process.pid)
    return Child(process, recv, what)


class Child:
    """A call running in a child process (start_in_child)."""

    def __init__(self, process, recv, what: str):
        self.process, self.recv, self.what = process, recv, what
        self.done = False

    def result(self, timeout: float | None = None):
        """Wait for the child's return value (or raise its exception); past `timeout` seconds
        from now, kill it and raise VerificationTimeout. The child is gone afterwards."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            ok, value = self._wait(deadline, timeout)
        finally:
            self.cancel()
        if ok:
            return value
        if value is None:
            code = self.process.exitcode
            how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
            raise VerificationUnavailable(f"the {self.what} process ended without a result ({how}; onnxruntime crashed?)")
        raise value

    def _wait(self, deadline: float | None, timeout: float | None):
        recv, process = self.recv, self.process
        while True:
            step = 0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic()))
            if recv.poll(step):
                try:
                    return pickle.loads(recv.recv_bytes())
                except EOFError:
                    return False, None
            if not process.is_alive() and not recv.poll(0):
                return False, None
            check_interrupted()
            if deadline is not None and time.monotonic() >= deadline:
                raise VerificationTimeout(f"{self.what} did not finish within --timeout {timeout:g} s; stopped")

    def cancel(self) -> None:
        """Kill the child's whole group (if still running) and reap it; safe to call twice."""
        if self.done:
            return
        self.done, process = True, self.process
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            pass
        if process.is_alive():
            process.kill()
        _CHILDREN.discard(process.pid)
        process.join()
        self.recv.close()
