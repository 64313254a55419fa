"""A loopback instance metadata service (IMDSv2) announcing one spot interruption, as a
pytest plugin: the ``metadata`` fixture (tests load it with ``pytest_plugins``), and
``by_value``, which ships the spot tests' tasks (``spot_tasks.py``) to remote hosts.

It speaks the token ``PUT``, then ``/latest/meta-data/spot/instance-action``; local agents
find it through ``SKYWARD_SPOT_ENDPOINT`` (set by the fixture), remote ones through their
HELLO (``sky.AWS(spot_endpoint=metadata.url)``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cloudpickle
import pytest
import spot_tasks

from skyward.agent import spot


class Metadata(ThreadingHTTPServer):
    """Announces one interruption (to the first agent that asks once armed), then none."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), MetadataHandler)
        self.armed = threading.Event()
        self.window = 0.0  # seconds the notice leaves beyond spot.MARGIN
        self.announced = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class MetadataHandler(BaseHTTPRequestHandler):
    server: Metadata

    def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
        if self.path != "/latest/api/token" or not self.headers.get(
            "X-aws-ec2-metadata-token-ttl-seconds"
        ):
            self._send(400, b"bad token request")
        else:
            self._send(200, b"test-token")

    def do_GET(self) -> None:  # noqa: N802
        if self.headers.get("X-aws-ec2-metadata-token") != "test-token":
            self._send(401, b"")
            return
        if self.path != "/latest/meta-data/spot/instance-action":
            self._send(404, b"")
            return
        with self.server.lock:
            announce = self.server.armed.is_set() and not self.server.announced
            if announce:
                self.server.announced += 1
        if not announce:
            self._send(404, b"")
            return
        when = datetime.fromtimestamp(
            time.time() + spot.MARGIN + self.server.window, tz=timezone.utc
        ).strftime("%Y-%m-%dT%H:%M:%SZ")
        self._send(200, json.dumps({"action": "terminate", "time": when}).encode())

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def metadata(monkeypatch: pytest.MonkeyPatch) -> Iterator[Metadata]:
    server = Metadata()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(spot.ENDPOINT_ENV, server.url)
    monkeypatch.setenv(spot.INTERVAL_ENV, "0.2")
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def by_value() -> Iterator[None]:
    """Ship :mod:`spot_tasks` by value (remote hosts do not have it)."""
    cloudpickle.register_pickle_by_value(spot_tasks)
    try:
        yield
    finally:
        cloudpickle.unregister_pickle_by_value(spot_tasks)
