"""Reliability over real loopback sshd: a frozen agent, Ctrl-C and SIGTERM of the client,
refused authentication. (SIGKILL of the client and a frozen network: test_ssh_faults.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import wait_until
from sshd_hosts import PORT, SSHDCluster, bootstrapped_agents

import skyward as sky
from skyward.errors import NodeStartError

pytestmark = pytest.mark.timeout(180)
PICKLE_BY_VALUE = True  # see conftest: hosts do not have this module


def provider_for(cluster: SSHDCluster, env_root: str, **options: object) -> sky.SSH:
    return sky.SSH(
        cluster.specs(), key_filename=cluster.key_filename, known_hosts=cluster.known_hosts,
        python=sys.executable, env_root=env_root, **options,  # type: ignore[arg-type]
    )


def slow_identity(i: int) -> tuple[int, int]:
    time.sleep(0.05)
    return i, os.getpid()


def test_sigstopped_agent_is_detected_by_heartbeat_and_its_tasks_rerun(
    ssh_clean: SSHDCluster, ssh_env_root: str, ssh_wheelhouse: str
) -> None:
    image = sky.Image(pip=["threadpoolctl"], wheelhouse=ssh_wheelhouse)
    timeout = 2.0
    with sky.Compute(
        provider_for(ssh_clean, ssh_env_root), nodes=3, worker=sky.Worker(concurrency=2),
        image=image, heartbeat_timeout=timeout,
    ) as compute:
        frozen = compute.nodes[0]
        frozen_pid = frozen.pid
        assert frozen_pid is not None
        futures = [compute.submit(slow_identity, i) for i in range(150)]
        assert wait_until(lambda: frozen.tasks_done >= 2, 60)
        os.kill(frozen_pid, signal.SIGSTOP)  # a silent partition: nothing closes
        try:
            assert wait_until(lambda: not frozen.alive, timeout + 3)
            results = [f.result(timeout=120) for f in futures]
        finally:
            try:
                os.kill(frozen_pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        assert [value for value, _ in results] == list(range(150))
        assert compute.stats()["tasks"]["failed"] == 0


CLIENT = textwrap.dedent(
    """
    import json, sys, time
    import skyward as sky

    cfg = json.loads(sys.argv[1])
    provider = sky.SSH(cfg["hosts"], key_filename=cfg["key"], known_hosts=cfg["known_hosts"],
                       python=sys.executable, env_root=cfg["env_root"])
    image = sky.Image(pip=["threadpoolctl"], wheelhouse=cfg["wheelhouse"])
    with sky.Compute(provider, nodes=3, worker=sky.Worker(2), image=image) as compute:
        futures = [compute.submit(time.sleep, 0.5) for _ in range(200)]
        print(json.dumps([node.pid for node in compute.nodes]), flush=True)
        [f.result() for f in futures]
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_the_client_leaves_no_agent_and_no_sshd_session(
    sig: int, ssh_clean: SSHDCluster, ssh_env_root: str, ssh_wheelhouse: str
) -> None:
    cfg = {
        "hosts": ssh_clean.specs(), "key": ssh_clean.key_filename,
        "known_hosts": ssh_clean.known_hosts, "env_root": ssh_env_root,
        "wheelhouse": ssh_wheelhouse,
    }
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, json.dumps(cfg)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        assert client.stdout is not None
        agents = json.loads(client.stdout.readline() or "[]")
        assert len(agents) == 3
        client.send_signal(sig)
        client.wait(timeout=5)  # back at the prompt within 5 s
        assert wait_until(
            lambda: not ({p.pid for p in bootstrapped_agents()} & set(agents)), 5
        )
        assert wait_until(lambda: not ssh_clean.sessions(), 5), "sshd sessions left open"
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)
        for stream in (client.stdout, client.stderr):
            if stream is not None:
                stream.close()


def test_refused_authentication_names_the_host_and_step(
    ssh_clean: SSHDCluster, ssh_env_root: str, tmp_path: Path
) -> None:
    stranger = tmp_path / "stranger_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True
    )
    provider = sky.SSH(
        ssh_clean.specs()[:1], key_filename=str(stranger), known_hosts=ssh_clean.known_hosts,
        python=sys.executable, env_root=ssh_env_root, connect_timeout=10.0,
    )
    with pytest.raises(NodeStartError, match=rf"127\.0\.0\.2:{PORT}.*(?i:auth)"):
        with sky.Compute(provider, nodes=1):
            pytest.fail("the cluster must not start")
