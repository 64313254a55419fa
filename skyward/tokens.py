"""Free capacity as tokens, which the scheduler dispatches with in O(1).

There is a *slot token* per free slot, interleaved across nodes: dispatch pops
one, a result pushes one back. Both are O(1), spread work evenly and need no scan
over nodes. Tokens of a dead node are dropped lazily when popped.

Each node also has a few *prefetch* tokens (tasks queued on the agent behind its
busy slots, hiding the round trip of tiny tasks). They are used only while more
than one wave of work is queued: in the last wave, a task queued behind a busy
slot would wait there while another node's slot sits idle.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from skyward.node import Node


class Tokens:
    """The free slots and prefetch places of a cluster's nodes (the scheduler's lock held).

    Args:
        prefetch: prefetch tokens per node (default: one per slot).
    """

    def __init__(self, prefetch: int | None = None) -> None:
        self.prefetch = prefetch
        self._slots: deque[Node] = deque()
        self._extra: deque[Node] = deque()
        self.live = 0  # slots of the nodes that take work
        # Nodes being reclaimed (spot notice): no new work, their running tasks go on.
        self.draining: set[Node] = set()

    def add(self, nodes: list[Node]) -> None:
        """Tokens for the slots (and prefetch places) of nodes that joined."""
        width = max((n.concurrency for n in nodes), default=0)
        for i in range(width):  # one slot of every node, then the next slot of every node
            self._slots.extend(n for n in nodes if i < n.concurrency)
        for n in nodes:
            extra = self.prefetch if self.prefetch is not None else n.concurrency
            self._extra.extend([n] * extra)
            self.live += n.concurrency

    def takes_work(self, node: Node) -> bool:
        """Whether ``node`` may be given tasks (alive, not being reclaimed)."""
        return node.alive and node not in self.draining

    def take(self, queued: int) -> tuple[Node, deque[Node]] | None:
        """A node with room for one of ``queued`` tasks, and the deque its token came from
        (to give it back with ``appendleft`` if the task is not sent after all)."""
        for tokens in (self._slots, self._extra):
            if tokens is self._extra and queued <= self.live:
                return None
            while tokens:
                node = tokens.popleft()
                if self.takes_work(node):
                    return node, tokens
        return None

    def release(self, node: Node) -> None:
        """Give back the token of a task of ``node`` that ended."""
        if self.takes_work(node):
            busy = len(node.inflight) >= node.concurrency
            (self._extra if busy else self._slots).append(node)

    def idle_slot(self, avoid: Node | None) -> Node | None:
        """Take a free slot token of a node other than ``avoid`` (a straggler's twin)."""
        for node in list(self._slots):
            if node is not avoid and self.takes_work(node):
                self._slots.remove(node)
                return node
        return None

    def drain(self, node: Node) -> bool:
        """``node`` gets no more work (its spot instance is being reclaimed); whether it
        was taking work until now."""
        if not self.takes_work(node):
            return False
        self.draining.add(node)
        self.live -= node.concurrency
        return True

    def lost(self, node: Node) -> bool:
        """``node`` was lost (call before marking it dead); whether it was being reclaimed."""
        if node in self.draining:
            self.draining.discard(node)
            return True
        if node.alive:
            self.live -= node.concurrency
        return False
