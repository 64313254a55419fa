"""The agent's spot watcher: polls the instance metadata service for the interruption notice.

AWS announces the reclaim of a spot instance two minutes ahead at
``/latest/meta-data/spot/instance-action`` (404 until then; then a JSON body
``{"action": "terminate", "time": "2026-01-01T00:02:00Z"}``), read with an IMDSv2
token. The agent polls it every few seconds and sends the notice to the client
once, as a ``MESSAGE`` on :data:`TOPIC`; the client stops sending work to the node,
lets its running tasks finish while the notice allows, and reruns the rest.

Standard library only: the agent runs it. The endpoint comes from the agent's
HELLO config (``spot_endpoint``, set by ``sky.AWS(spot=True)``) or, for tests and
other clouds' emulations, the environment variable :data:`ENDPOINT_ENV`.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime
from typing import Any

__all__ = ["ENDPOINT_ENV", "IMDS", "MARGIN", "TOPIC", "fetch_notice", "seconds_left", "watch"]

IMDS = "http://169.254.169.254"
ENDPOINT_ENV = "SKYWARD_SPOT_ENDPOINT"
INTERVAL_ENV = "SKYWARD_SPOT_POLL_SECONDS"
TOPIC = "skyward.spot"
# AWS's advice: poll every 5 s.
INTERVAL = 5.0
# Seconds before the announced reclaim at which the client gives up on a node's
# running tasks and reruns them elsewhere.
MARGIN = 15.0
TOKEN_TTL = 21600


def fetch_notice(endpoint: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """The pending interruption notice at ``endpoint`` (an IMDS base URL), or None."""
    base = endpoint.rstrip("/")
    token_request = urllib.request.Request(
        f"{base}/latest/api/token",
        method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL)},
    )
    with urllib.request.urlopen(token_request, timeout=timeout) as response:  # noqa: S310
        token = response.read().decode()
    request = urllib.request.Request(
        f"{base}/latest/meta-data/spot/instance-action",
        headers={"X-aws-ec2-metadata-token": token},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            notice = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
    return notice if isinstance(notice, dict) else {"action": str(notice)}


def watch(
    endpoint: str,
    notify: Callable[[dict[str, Any]], None],
    log: Callable[[str], None],
    interval: float | None = None,
) -> threading.Event:
    """Poll ``endpoint`` on a daemon thread until a notice comes (``notify(notice)``, once)
    or the returned event is set. A failing poll is logged once and tried again."""
    if interval is None:
        interval = float(os.environ.get(INTERVAL_ENV, INTERVAL))
    stop = threading.Event()

    def run() -> None:
        failed = False
        while not stop.wait(interval):
            try:
                notice = fetch_notice(endpoint)
            except (OSError, ValueError) as exc:
                if not failed:
                    log(f"spot watcher: cannot read {endpoint}: {exc} (retrying)")
                failed = True
                continue
            if notice is not None:
                log(f"spot interruption notice: {notice}")
                notify(notice)
                return

    threading.Thread(target=run, name="skyward-spot", daemon=True).start()
    return stop


def seconds_left(notice: dict[str, Any], now: float) -> float | None:
    """Seconds from ``now`` (a ``time.time()``) to the notice's reclaim time, if it has one."""
    when = notice.get("time")
    if not isinstance(when, str):
        return None
    try:
        moment = datetime.fromisoformat(when.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment.timestamp() - now
