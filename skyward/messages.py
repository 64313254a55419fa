"""Messages from running tasks to the client: ``skyward.agent.emit`` and ``Compute.on_message``.

A task's message arrives as a ``MESSAGE`` frame on its node's reader thread,
which only queues it here: the handler runs on a thread of this registry's
small pool, so a slow handler never delays heartbeats or results. The agent
gets a ``MESSAGE`` frame back when the handler returns (its value or its
exception), and only then does the task's ``emit`` return.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from skyward import wire
from skyward.wire import Kind, Status

if TYPE_CHECKING:
    from skyward.node import Node

Handler = Callable[[Any], Any]


class MessageHandlers:
    """The client's handlers for task messages, by topic, and the threads that run them.

    Args:
        threads: handlers running at once, at most; further messages wait their turn
            (and so do the tasks that sent them).
    """

    def __init__(self, threads: int = 8) -> None:
        self._handlers: dict[str, Handler] = {}
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def set(self, topic: str, handler: Handler | None) -> None:
        """Call ``handler(message)`` for each message on ``topic``; ``None`` removes it."""
        if not isinstance(topic, str):
            raise TypeError(f"a message topic is a str, got {topic!r}")
        if handler is not None and not callable(handler):
            raise TypeError(f"the handler for topic {topic!r} must be callable, got {handler!r}")
        with self._lock:
            if handler is None:
                self._handlers.pop(topic, None)
            else:
                self._handlers[topic] = handler

    def deliver(self, node: Node, body: bytes) -> None:
        """Queue one ``MESSAGE`` frame's body from ``node`` (called on its reader thread)."""
        with self._lock:
            if not self._closed:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self._threads, "skyward-message")
                self._pool.submit(self._handle, node, body)
                return
        message_id = pickle.loads(body)[0]
        closed = RuntimeError("the Compute is shutting down: its message handlers are gone")
        self._answer(node, message_id, Status.ERROR, wire.dumps_error(closed, "the client"))

    def _handle(self, node: Node, body: bytes) -> None:
        message_id, topic, payload = pickle.loads(body)
        try:
            handler = self._handlers.get(topic)
            if handler is None:
                raise LookupError(
                    f"no handler for task messages on topic {topic!r} on the client: register "
                    "one with compute.on_message(topic, handler), or enable the plugin that does"
                )
            status, answer = Status.OK, wire.dumps_result(handler(pickle.loads(payload)))
        except BaseException as exc:  # noqa: BLE001 - the task's emit raises it
            status, answer = Status.ERROR, wire.dumps_error(exc, "the client")
        self._answer(node, message_id, status, answer)

    @staticmethod
    def _answer(node: Node, message_id: int, status: Status, answer: bytes) -> None:
        node.outbox.put(wire.encode_obj(Kind.MESSAGE, (message_id, int(status), answer)))

    def close(self) -> None:
        """Drop queued messages and refuse new ones; handlers already running finish."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
