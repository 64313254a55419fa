"""Watching a running cluster's nodes: heartbeats, lost-node detection and restarts.

Several times per ``heartbeat_timeout`` the monitor sends every live node a
heartbeat (the agent answers with its counters, and a silent client makes the
agent exit); a node silent for longer than ``heartbeat_timeout`` is declared lost
to the scheduler, which reruns its tasks elsewhere. A lost node is restarted
in the background through its launcher's replacement (a new machine where the
provider has one, e.g. a new EC2 instance), ``restarts`` times at most per node,
while queued work waits for it.

Nodes that join late (an elastic start: ``Compute(min_nodes=...)``) come in
through :meth:`NodeMonitor.joined`; a late node that fails to start is retried
within the same ``restarts`` budget and never fails the cluster.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from skyward.agent import spot
from skyward.node import Node
from skyward.scheduler import Scheduler
from skyward.startup import NodeStarter

log = logging.getLogger("skyward")


@dataclass(eq=False)
class NodeMonitor:
    """Heartbeats and restarts for the nodes of one cluster.

    Args:
        nodes: the cluster's live nodes; a restarted node replaces its predecessor
            in this list, a late one is appended.
        scheduler: told of lost and restarted nodes.
        starter: opens the replacement of a lost node (:meth:`NodeStarter.replace`).
        heartbeat_timeout: seconds of silence after which a node is lost.
        restarts: times each node may be restarted.
    """

    nodes: list[Node]
    scheduler: Scheduler
    starter: NodeStarter
    heartbeat_timeout: float
    restarts: int
    _restarted: Counter[int] = field(default_factory=Counter, init=False)
    reclaimed: list[Node] = field(default_factory=list, init=False)
    """Nodes whose spot interruption notice came, in order."""
    # Nodes being reclaimed and the time.monotonic() by which they are let go.
    _reclaiming: dict[Node, float] = field(default_factory=dict, init=False)
    _closed: bool = field(default=False, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    def start(self) -> None:
        """Begin sending heartbeats and watching for silent nodes."""
        self._thread = threading.Thread(target=self._run, name="skyward-monitor", daemon=True)
        self._thread.start()

    def stop_restarts(self) -> None:
        """Restart no more nodes; a restart in progress stops the node it starts."""
        with self._lock:
            self._closed = True

    def close(self) -> None:
        """Stop restarts and heartbeats (waits a few seconds at most)."""
        self.stop_restarts()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def replace(self, node: Node, reason: str) -> bool:
        """The scheduler's ``replace`` hook: restart a lost node in the background,
        ``restarts`` times at most; whether a restart began."""
        with self._lock:
            if self._closed or self._restarted[node.index] >= self.restarts:
                return False
            self._restarted[node.index] += 1
        threading.Thread(
            target=self._restart, args=(node,), name=f"skyward-restart-{node.name}", daemon=True
        ).start()
        return True

    def joined(self, index: int, outcome: Future[Node]) -> None:
        """The outcome of node ``index``'s start, after the cluster was entered: a
        started node joins the scheduler; a failed start is retried within ``restarts``."""
        error = outcome.exception()
        if error is not None:
            self._start_failed(index, error)
            return
        self.add([outcome.result()])

    def add(self, nodes: list[Node]) -> None:
        """Started nodes join the cluster: read by their threads, given to the scheduler
        (stopped instead once the cluster is shutting down)."""
        with self._lock:
            kept = not self._closed
            if kept:
                self.nodes.extend(nodes)
                for node in nodes:
                    node.start(self.scheduler)
        if not kept:
            for node in nodes:
                node.stop(timeout=1.0, kill=True)
            self.scheduler.add_nodes([], starts_ended=len(nodes))
            return
        self.scheduler.add_nodes(nodes, starts_ended=len(nodes))
        for node in nodes:
            log.debug("node %s joined: %d slot(s) live", node.name, self.scheduler.live_slots)

    def _start_failed(self, index: int, error: BaseException) -> None:
        name = self.starter.launchers[index].name
        with self._lock:
            if self._closed:
                return
            giving_up = self._restarted[index] >= self.restarts
            if not giving_up:
                self._restarted[index] += 1
        if giving_up:
            log.warning("%s did not start, giving up (restarts=%d): %s", name, self.restarts, error)
            self.scheduler.add_nodes([], starts_ended=1)
            return
        log.warning("%s did not start, retrying: %s", name, error)
        threading.Thread(
            target=self._start_late, args=(index,), name=f"skyward-start-{name}", daemon=True
        ).start()

    def _start_late(self, index: int) -> None:
        """Start node ``index`` again after a failed start: through its launcher's
        replacement (on AWS a new instance, the one that failed is terminated)."""
        outcome: Future[Node] = Future()
        try:
            outcome.set_result(self.starter.replace(index))
        except Exception as exc:  # noqa: BLE001 - retried or logged by joined()
            outcome.set_exception(exc)
        self.joined(index, outcome)

    def _restart(self, old: Node) -> None:
        old.stop(timeout=1.0, kill=True)
        new: Node | None = None
        try:
            if not self._closed:
                new = self.starter.replace(old.index)
        except Exception as exc:  # noqa: BLE001 - the node stays down; the cluster goes on
            if not self._closed:
                log.warning("could not restart %s: %s", old.name, exc)
        kept: Node | None = None
        with self._lock:
            if new is not None and not self._closed:
                self.nodes[self.nodes.index(old)] = kept = new
                new.start(self.scheduler)
                log.info("node %s restarted", new.name)
        if new is not None and kept is None:
            new.stop(timeout=1.0, kill=True)  # the cluster is shutting down
        self.scheduler.node_replaced(old, kept)

    def reclaim(self, node: Node, notice: dict[str, Any]) -> None:
        """``node``'s spot instance announced its reclaim: it gets no new work, its
        running tasks finish while the notice allows (up to :data:`spot.MARGIN`
        seconds before the reclaim), then it is let go: what it still runs is rerun
        elsewhere and a replacement starts (within ``restarts``)."""
        left = spot.seconds_left(notice, time.time())
        window = max(0.0, (left if left is not None else 120.0) - spot.MARGIN)
        with self._lock:
            if node in self._reclaiming or not node.alive:
                return
            self._reclaiming[node] = time.monotonic() + window
            self.reclaimed.append(node)
        log.warning(
            "node %s: spot interruption notice (%s); no new work, %.0fs for its %d running task(s)",
            node.name,
            notice,
            window,
            len(node.inflight),
        )
        self.scheduler.drain(node)

    def _let_go(self, now: float) -> None:
        """Declare lost the reclaimed nodes that are done or out of time."""
        with self._lock:
            due = [
                node
                for node, deadline in self._reclaiming.items()
                if node.alive and (not node.inflight or now >= deadline)
            ]
            for node in due:
                del self._reclaiming[node]
        for node in due:
            self.scheduler.node_lost(node, "its spot instance is being reclaimed")
            threading.Thread(target=node.stop, kwargs={"kill": True}, daemon=True).start()

    def _run(self) -> None:
        """Send heartbeats; declare a node lost when it has been silent too long."""
        interval = min(1.0, self.heartbeat_timeout / 5)
        while not self._stop.wait(interval):
            now = time.monotonic()
            self._let_go(now)
            self.scheduler.speculate_stragglers()
            for node in list(self.nodes):
                if not node.alive:
                    continue
                silent = now - node.last_heard
                if silent > self.heartbeat_timeout:
                    self.scheduler.node_lost(
                        node,
                        f"no heartbeat for {silent:.1f}s (heartbeat_timeout="
                        f"{self.heartbeat_timeout}s)",
                    )
                    threading.Thread(target=node.stop, kwargs={"kill": True}, daemon=True).start()
                else:
                    node.heartbeat()
