"""Interactive use: ``compute = sky.Compute(...).start()`` ... ``compute.close()`` across
notebook-like steps, with the ``with`` block's guarantees, and a readable ``repr``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest
from conftest import wait_until

import skyward as sky
from skyward.errors import ComputeStateError

pytestmark = pytest.mark.timeout(90)

CLIENT = textwrap.dedent(
    """
    import json, os, sys, time
    import joblib
    import skyward as sky

    compute = sky.Compute(nodes=2, worker=sky.Worker(2), plugins=[sky.plugins.joblib()]).start()
    print(json.dumps([node.pid for node in compute.nodes]), flush=True)

    # step 1 (one notebook cell)
    with joblib.parallel_config(backend="skyward"):
        pids = joblib.Parallel(n_jobs=-1)(joblib.delayed(os.getpid)() for _ in range(16))
    print("step 1", len(set(pids)), flush=True)

    # step 2 (a later cell)
    with joblib.parallel_config(backend="skyward"):
        values = joblib.Parallel(n_jobs=-1)(joblib.delayed(abs)(-i) for i in range(40))
    assert values == list(range(40))
    print("step 2", repr(compute), flush=True)

    if sys.argv[1] == "close":
        compute.close()
        print("closed", repr(compute), flush=True)
    time.sleep(120)
    """
)


@pytest.mark.parametrize("end", ["sigkill", "sigterm", "close"])
def test_started_cluster_leaves_nothing_when_the_client_is_killed_or_closes_it(end: str) -> None:
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, end],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None
        pids = json.loads(client.stdout.readline())
        agents = [psutil.Process(pid) for pid in pids]
        assert len(agents) == 2 and all(a.is_running() for a in agents)
        assert client.stdout.readline().split() == ["step", "1", "2"]  # both nodes took work
        step2 = client.stdout.readline()
        assert step2.startswith("step 2 <Compute ") and "running" in step2, step2
        if end == "close":
            closed = client.stdout.readline()
            assert closed.startswith("closed <Compute ") and " closed:" in closed, closed
            assert client.poll() is None  # the agents stopped because of close(), not exit
        else:
            client.send_signal(signal.SIGKILL if end == "sigkill" else signal.SIGTERM)
        gone = lambda: not any(a.is_running() and a.status() != "zombie" for a in agents)  # noqa: E731
        assert wait_until(gone, 5.0), f"agents left running: {pids}"
    finally:
        client.kill()
        _, err = client.communicate(timeout=30)
    assert "Traceback" not in err or end == "sigterm", err


def test_repr_shows_state_nodes_slots_and_tasks(no_agents_left: None) -> None:
    compute = sky.Compute(nodes=2, worker=sky.Worker(3))
    assert repr(compute).startswith("<Compute ") and " new: Local, 0/2 node(s) up" in repr(compute)
    assert compute.start() is compute
    try:
        assert list(compute.map(abs, [-1, -2, -3])) == [1, 2, 3]
        text = repr(compute)
        assert " running: Local, 2/2 node(s) up, 6 slot(s) (3/node, thread)" in text, text
        assert "tasks 3 done, 0 running, 0 queued, 0 failed" in text, text
    finally:
        compute.close()
    assert " closed: " in repr(compute)
    compute.close()  # a second close does nothing
    with pytest.raises(ComputeStateError, match="already used and shut down"):
        compute.start()
    with pytest.raises(ComputeStateError, match=r"compute\.start\(\)"):
        compute.submit(abs, -1)
