"""The process-wide safety net: running clusters stop however the client process ends.

While a ``Compute`` runs it is registered here. SIGTERM then raises ``SystemExit``
(when the program left SIGTERM at its default), so ``with`` blocks unwind and
tear down what they created; at interpreter exit every cluster still registered
(one entered without ``with`` and never shut down) is shut down.

None of that may reach a child forked by user code (multiprocessing, joblib's
"multiprocessing" backend): the child does not own the cluster, and a pool
terminates its workers with SIGTERM. The handler is installed only while a
cluster runs, and a forked child forgets the clusters and drops the handler.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
from contextlib import ExitStack
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from skyward.compute import Compute

log = logging.getLogger("skyward")

_active: list[Compute] = []
_active_lock = threading.Lock()


def current() -> Compute | None:
    """The innermost running ``Compute`` of this process, if any."""
    with _active_lock:
        return _active[-1] if _active else None


def register(compute: Compute, stack: ExitStack) -> None:
    """Track ``compute`` until ``stack`` closes, so interpreter exit and SIGTERM stop it."""
    with _active_lock:
        _active.append(compute)
        _install_sigterm()

    def unregister() -> None:
        with _active_lock:
            if compute in _active:
                _active.remove(compute)
            if not _active:
                _restore_sigterm()

    stack.callback(unregister)


def running_here(compute: Compute) -> bool:
    """Whether ``compute`` runs in this process (false in a child forked while it ran)."""
    with _active_lock:
        return any(c is compute for c in _active)


_sigterm_pid = 0  # the process that installed our handler


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM becomes SystemExit so ``with`` blocks unwind and clusters stop."""
    if os.getpid() != _sigterm_pid or not _active:  # no lock: this runs between bytecodes
        # A forked child, or the last cluster ended in another thread: terminate as usual.
        _restore_sigterm()
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            os._exit(128 + signum)
        os.kill(os.getpid(), signum)
        return
    raise SystemExit(128 + signum)


def _install_sigterm() -> None:
    """Install :func:`_on_sigterm` unless SIGTERM already has a handler (or we cannot)."""
    global _sigterm_pid
    if threading.current_thread() is not threading.main_thread():
        return
    current_handler = signal.getsignal(signal.SIGTERM)
    if current_handler is _on_sigterm or current_handler is not signal.SIG_DFL:
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    _sigterm_pid = os.getpid()


def _restore_sigterm() -> None:
    """Put SIGTERM's default action back if our handler is still the one installed.

    Outside the main thread this is not possible; the handler then acts as the default.
    """
    if signal.getsignal(signal.SIGTERM) is not _on_sigterm:
        return
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:  # not the main thread
        pass


# The SIGTERM mask of the thread forking while our handler is installed (see _before_fork).
_fork_mask = threading.local()


def _before_fork() -> None:
    """Hold SIGTERM back in the forking thread while our handler is installed.

    A pool may terminate a worker before the worker has dropped our handler, and
    Python discards signals that arrive before its own after-fork reset: the worker
    would survive its SIGTERM. Blocked, the signal waits for the default action.
    """
    if signal.getsignal(signal.SIGTERM) is _on_sigterm and hasattr(signal, "pthread_sigmask"):
        _fork_mask.previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _unblock_after_fork() -> None:
    previous = getattr(_fork_mask, "previous", None)
    _fork_mask.previous = None
    if previous is not None and signal.SIGTERM not in previous:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _after_fork_in_child() -> None:
    """A forked child owns none of its parent's clusters: forget them, drop the handler."""
    global _active_lock
    _active_lock = threading.Lock()  # a parent thread may have held it while forking
    _active.clear()
    _restore_sigterm()
    _unblock_after_fork()  # a SIGTERM sent meanwhile now takes its default action


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_unblock_after_fork,
    after_in_child=_after_fork_in_child,
)


@atexit.register
def _shutdown_all() -> None:
    with _active_lock:
        running = list(reversed(_active))
    for compute in running:
        try:
            compute.shutdown(wait=False, cancel_futures=True)
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            log.exception("failed to stop cluster %s at exit", compute.cluster_id)
