"""Starting a cluster's nodes: every launcher opened at once, each agent greeted, all abortable.

An ordinary failure waits for every start and raises the first error in node
order, after stopping the nodes that did start. Ctrl-C or SIGTERM does not wait:
the starts in progress are aborted (a launcher still opening is told to, an agent
not yet greeted is killed), and a start that still finishes later stops what it
started itself.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any

from skyward.channel import Channel
from skyward.errors import NodeStartError
from skyward.node import Node
from skyward.providers import Launcher

log = logging.getLogger("skyward")

# Seconds an interrupted start-up waits for the aborted node starts to end (each kills
# what it started itself if it ends later).
ABORT_GRACE = 1.0

# Threads opening nodes at once, at most.
START_THREADS = 32


@dataclass(eq=False)
class NodeStarter:
    """Opens the nodes of one cluster through their launchers.

    Args:
        launchers: one per node, from the provider; node ``i`` is ``launchers[i]``'s.
        hello: what the client's HELLO tells every agent (its node name is added).
        new_node: makes the client's end of node ``index`` from its agent's channel.
        timeout: seconds each agent has to say hello.
    """

    launchers: list[Launcher]
    hello: dict[str, Any]
    new_node: Callable[[int, Channel], Node]
    timeout: float
    ready: int = field(default=0, init=False)
    """Nodes started so far (restarts included)."""
    # Starts in progress (index -> its channel once the launcher returned it), and
    # whether they are being aborted (Ctrl-C, shutdown).
    _starting: dict[int, Channel | None] = field(default_factory=dict, init=False)
    _aborted: bool = field(default=False, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def open_all(
        self,
        need: int | None = None,
        late: Callable[[int, Future[Node]], None] | None = None,
    ) -> list[Node]:
        """Open every node concurrently; return once ``need`` of them (default: all) are up.

        The nodes still starting then go on in the background: ``late(index, future)``
        is called with each one's outcome (a started node or its error), and so is each
        failure among the first ones. Too many failures to reach ``need`` stop every
        node and raise the first error in node order; with ``need`` equal to the node
        count, every start is awaited first, as before.

        On Ctrl-C (or SIGTERM) the starts in progress are aborted without waiting
        (each bounded in time): one that still finishes later stops what it started
        itself (see :meth:`open`). The start threads are daemons, so none delays exit.
        """
        count = len(self.launchers)
        need = count if need is None else need
        futures: list[Future[Node]] = [Future() for _ in range(count)]
        indices = iter(range(count))
        take = threading.Lock()

        def work() -> None:
            while True:
                with take:
                    index = next(indices, None)
                if index is None or not futures[index].set_running_or_notify_cancel():
                    return
                try:
                    futures[index].set_result(self.open(index))
                except BaseException as exc:  # noqa: BLE001 - reported by the caller
                    futures[index].set_exception(exc)

        for i in range(min(START_THREADS, count)):
            threading.Thread(target=work, name=f"skyward-connect-{i}", daemon=True).start()
        try:
            while True:
                done = [f.done() for f in futures]
                failed = [f for f, d in zip(futures, done, strict=True) if d and f.exception()]
                up = sum(done) - len(failed)
                # All nodes needed: await every start, so the error reported is node order's.
                if all(done) or (need < count and (up >= need or len(failed) > count - need)):
                    break
                pending = [f for f, d in zip(futures, done, strict=True) if not d]
                wait(pending, return_when=FIRST_COMPLETED)
            if up < need:
                raise failed[0].exception()  # type: ignore[misc]
            if late is not None:
                for index, (future, finished) in enumerate(zip(futures, done, strict=True)):
                    if not finished:
                        future.add_done_callback(functools.partial(late, index))
                    elif future.exception() is not None:
                        late(index, future)
            return [
                f.result() for f, d in zip(futures, done, strict=True) if d and not f.exception()
            ]
        except BaseException:
            self.abort()
            for future in futures:
                future.cancel()
            try:
                wait(futures, timeout=ABORT_GRACE)
            finally:
                for future in futures:
                    if future.done() and not future.cancelled() and future.exception() is None:
                        future.result().stop(timeout=1.0, kill=True)
            raise

    def open(self, index: int) -> Node:
        """Start node ``index``'s agent through its launcher and shake hands (bounded).

        :meth:`abort` can end it from another thread at any step; whatever it started
        is then stopped here.
        """
        launcher = self.launchers[index]
        t0 = time.monotonic()
        with self._lock:
            if self._aborted:
                raise NodeStartError(f"{launcher.name}: start aborted (step: start agent)")
            self._starting[index] = None
        try:
            node = self._start_and_greet(index, launcher)
        finally:
            with self._lock:
                self._starting.pop(index, None)
                aborted = self._aborted
        if aborted:
            node.stop(timeout=1.0, kill=True)
            raise NodeStartError(f"{launcher.name}: start aborted (step: handshake)")
        log.info("node %s ready in %.2fs (pid %s)", node.name, time.monotonic() - t0, node.pid)
        with self._lock:
            self.ready += 1
        return node

    def replace(self, index: int) -> Node:
        """Start a replacement for lost node ``index``: through its launcher's
        :meth:`~skyward.providers.Launcher.replacement` (a new machine where the
        provider has one), which becomes node ``index``'s launcher, then as :meth:`open`."""
        with self._lock:
            if self._aborted:
                raise NodeStartError(f"{self.launchers[index].name}: start aborted")
            self.launchers[index] = self.launchers[index].replacement()
        return self.open(index)

    def _start_and_greet(self, index: int, launcher: Launcher) -> Node:
        try:
            channel = launcher.open()
        except NodeStartError:
            raise
        except Exception as exc:
            raise NodeStartError(
                f"{launcher.name}: {type(exc).__name__}: {exc} (step: start agent)"
            ) from exc
        with self._lock:
            aborted = self._aborted
            if not aborted:
                self._starting[index] = channel
        if aborted:
            channel.kill()
            raise NodeStartError(f"{launcher.name}: start aborted (step: start agent)")
        node = self.new_node(index, channel)
        try:
            node.handshake({"node": launcher.name, **self.hello}, self.timeout)
        except BaseException:
            node.stop(timeout=1.0, kill=True)
            raise
        return node

    def abort(self) -> None:
        """End every node start in progress now, and any that begins later.

        A launcher still opening is aborted (e.g. its SSH connection closed); an agent
        started but not yet greeted is killed. Each start then fails at once.
        """
        with self._lock:
            self._aborted = True
            starting = list(self._starting.items())
        for index, _ in starting:
            self.launchers[index].abort()
        for _, channel in starting:
            if channel is not None:
                channel.kill()
