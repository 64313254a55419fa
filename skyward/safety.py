"""The process-wide safety net: running clusters stop however the client process ends.

While a ``Compute`` runs it is registered here. SIGTERM then raises ``SystemExit``
(when the program left SIGTERM at its default), so ``with`` blocks unwind and
tear down what they created; at interpreter exit every cluster still registered
(one entered without ``with`` and never shut down) is shut down.
"""

from __future__ import annotations

import atexit
import logging
import signal
import threading
from contextlib import ExitStack
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from skyward.compute import Compute

log = logging.getLogger("skyward")

_active: list[Compute] = []
_active_lock = threading.Lock()
_sigterm_installed = False


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

    stack.callback(unregister)


def _install_sigterm() -> None:
    """Turn SIGTERM into SystemExit so ``with`` blocks unwind and clusters stop."""
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    _sigterm_installed = True


@atexit.register
def _shutdown_all() -> None:
    with _active_lock:
        running = list(reversed(_active))
    for compute in running:
        try:
            compute.shutdown(wait=False, cancel_futures=True)
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            log.exception("failed to stop cluster %s at exit", compute.cluster_id)
