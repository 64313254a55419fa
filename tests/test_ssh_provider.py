"""sky.SSH over three real loopback sshd hosts: tasks, joblib, process slots, errors, bootstrap.

Every environment is installed offline from a wheelhouse repacked from this
interpreter's packages (tests talk to loopback only). Functions of this module
are pickled by value (``cloudpickle.register_pickle_by_value``): the hosts'
environments do not have the test modules, exactly like a real remote host.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import psutil
import pytest
from sshd_hosts import PORT, SSHDCluster

import skyward as sky
from skyward.bootstrap import INSTALL_STEPS
from skyward.errors import NodeStartError

pytestmark = pytest.mark.timeout(180)


PICKLE_BY_VALUE = True  # see conftest: hosts do not have this module


def make_provider(cluster: SSHDCluster, env_root: str, **kwargs: object) -> sky.SSH:
    """An SSH provider for the test hosts, with the client's own interpreter."""
    options: dict[str, object] = {
        "key_filename": cluster.key_filename,
        "known_hosts": cluster.known_hosts,
        "python": sys.executable,
        "env_root": env_root,
        **kwargs,
    }
    hosts = options.pop("hosts", cluster.specs())
    return sky.SSH(hosts, **options)  # type: ignore[arg-type]


@pytest.fixture
def image(ssh_wheelhouse: str) -> sky.Image:
    return sky.Image(pip=["threadpoolctl"], wheelhouse=ssh_wheelhouse)


@pytest.fixture
def provider(ssh_clean: SSHDCluster, ssh_env_root: str) -> sky.SSH:
    return make_provider(ssh_clean, ssh_env_root)


def steps(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """(host, step) of every bootstrap log record so far."""
    return [
        (r.host, r.step)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "skyward.bootstrap" and hasattr(r, "step")
    ]


def where() -> dict[str, object]:
    import threadpoolctl

    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "executable": sys.executable,
        "threadpoolctl": threadpoolctl.__file__,
    }


def square(x: int) -> int:
    return x * x


def fail(x: int) -> None:
    if x == 3:
        raise ValueError(f"bad input {x}")


def shout(text: str) -> str:
    print(text, flush=True)
    return text


def test_cold_then_warm_bootstrap(
    ssh_clean: SSHDCluster, image: sky.Image, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="skyward.bootstrap")
    provider = make_provider(ssh_clean, str(tmp_path / "envs"))
    with sky.Compute(provider, nodes=3, image=image) as compute:
        assert [compute.submit(square, i).result() for i in range(3)] == [0, 1, 4]
    cold = steps(caplog)
    done = {step for _, step in cold}
    assert {"upload", "create venv", "install packages", "install skyward"} <= done
    assert (tmp_path / "envs" / image.digest() / "bin" / "python").exists()

    caplog.clear()
    with sky.Compute(provider, nodes=3, image=image) as compute:
        assert compute.submit(square, 5).result() == 25
    warm = steps(caplog)
    assert not [s for s in warm if s[1] in INSTALL_STEPS], warm
    assert sorted(host for host, step in warm if step == "ready") == [
        f"{h.address}:{h.port}" for h in ssh_clean.hosts
    ]


def test_tasks_run_in_agents_started_by_sshd(
    ssh_clean: SSHDCluster, provider: sky.SSH, image: sky.Image, ssh_env_root: str
) -> None:
    with sky.Compute(provider, nodes=3, worker=sky.Worker(2), image=image) as compute:
        agents = {node.pid: node.name for node in compute.nodes}
        daemons = {daemon_of(pid) for pid in agents if pid is not None}
        seen = [compute.submit(where).result() for _ in range(12)]
    assert sorted(agents.values()) == [f"127.0.0.{i}:{PORT}" for i in (2, 3, 4)]
    assert daemons == {h.pid for h in ssh_clean.hosts}
    assert {s["pid"] for s in seen} <= set(agents)
    env = Path(ssh_env_root) / image.digest()
    for info in seen:
        assert info["executable"] == str(env / "bin" / "python")
        # threadpoolctl came from the wheelhouse into the host's environment.
        assert str(info["threadpoolctl"]).startswith(str(env))


def daemon_of(pid: int) -> int:
    """The listening sshd daemon whose session started process ``pid``."""
    sshd = [p for p in psutil.Process(pid).parents() if p.name() == "sshd"]
    assert sshd, f"process {pid} was not started by sshd"
    return sshd[-1].pid


def test_map_spreads_over_all_hosts(provider: sky.SSH, image: sky.Image) -> None:
    with sky.Compute(provider, nodes=3, worker=sky.Worker(4), image=image) as compute:
        assert compute.total_slots == 12
        assert list(compute.map(square, range(200), chunksize=7)) == [i * i for i in range(200)]
        stats = compute.stats(refresh=True)
    assert all(node["tasks_done"] > 0 for node in stats["nodes"].values()), stats


def test_joblib_parallel_all_slots(provider: sky.SSH, image: sky.Image) -> None:
    from joblib import Parallel, delayed

    with sky.Compute(
        provider, nodes=3, worker=sky.Worker(2), image=image, plugins=[sky.plugins.joblib()]
    ) as compute:
        out = Parallel(n_jobs=-1)(delayed(where)() for _ in range(30))
        agents = {node.pid for node in compute.nodes}
    assert {o["pid"] for o in out} <= agents
    assert len({o["pid"] for o in out}) > 1


def test_process_executor(provider: sky.SSH, image: sky.Image) -> None:
    worker = sky.Worker(concurrency=2, executor="process")
    with sky.Compute(provider, nodes=3, worker=worker, image=image) as compute:
        agents = {node.pid for node in compute.nodes}
        seen = [compute.submit(where).result() for _ in range(12)]
    assert all(s["ppid"] in agents and s["pid"] not in agents for s in seen), seen


def test_remote_exception_keeps_type_and_traceback(provider: sky.SSH, image: sky.Image) -> None:
    with sky.Compute(provider, nodes=3, image=image) as compute:
        futures = [compute.submit(fail, i) for i in range(6)]
        with pytest.raises(ValueError, match="bad input 3") as info:
            futures[3].result()
        assert [f.result() for i, f in enumerate(futures) if i != 3] == [None] * 5
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "in fail" in notes and "127.0.0." in notes, notes


def test_worker_output_is_forwarded_with_node_prefix(
    provider: sky.SSH, image: sky.Image, capfd: pytest.CaptureFixture[str]
) -> None:
    with sky.Compute(provider, nodes=1, image=image) as compute:
        compute.submit(shout, "hello from the host").result()
        deadline = time.monotonic() + 5
        err = ""
        while time.monotonic() < deadline and "hello from the host" not in err:
            time.sleep(0.05)
            err += capfd.readouterr().err
    assert f"[127.0.0.2:{PORT}] hello from the host" in err


def test_unreachable_host_fails_entry_and_stops_the_others(
    ssh_clean: SSHDCluster, ssh_env_root: str, image: sky.Image
) -> None:
    hosts = [*ssh_clean.specs()[:2], f"{ssh_clean.user}@127.0.0.9:{PORT}"]
    provider = make_provider(ssh_clean, ssh_env_root, hosts=hosts, connect_timeout=5.0)
    with pytest.raises(NodeStartError, match=rf"127\.0\.0\.9:{PORT}: .*\(step: connect\)"):
        with sky.Compute(provider, nodes=3, image=image):
            pytest.fail("the cluster must not start")


def test_missing_python_names_the_step(
    ssh_clean: SSHDCluster, tmp_path: Path, image: sky.Image
) -> None:
    # A fresh env_root: the interpreter is only needed to create an environment.
    provider = make_provider(ssh_clean, str(tmp_path), python="/nonexistent/python3")
    with pytest.raises(NodeStartError, match=r"nonexistent/python3.*\(step: probe\)"):
        with sky.Compute(provider, nodes=2, image=image):
            pytest.fail("the cluster must not start")


def test_python_version_mismatch_is_explained(
    ssh_clean: SSHDCluster, ssh_env_root: str, ssh_wheelhouse: str
) -> None:
    provider = make_provider(ssh_clean, ssh_env_root)
    other = sky.Image(python="3.7", wheelhouse=ssh_wheelhouse)
    with pytest.raises(NodeStartError, match=r"image needs 3\.7.*\(step: probe\)"):
        with sky.Compute(provider, nodes=1, image=other):
            pytest.fail("the cluster must not start")


def test_more_nodes_than_hosts_is_refused(provider: sky.SSH) -> None:
    with pytest.raises(ValueError, match=r"nodes=4.*has 3"):
        with sky.Compute(provider, nodes=4):
            pytest.fail("the cluster must not start")


def test_fewer_nodes_use_the_first_hosts(provider: sky.SSH, image: sky.Image) -> None:
    with sky.Compute(provider, nodes=2, image=image) as compute:
        assert [n.name for n in compute.nodes] == [f"127.0.0.2:{PORT}", f"127.0.0.3:{PORT}"]
        assert compute.submit(square, 9).result() == 81


def test_url_and_marker_requirements_install_on_the_host(
    ssh_clean: SSHDCluster, tmp_path: Path, ssh_wheelhouse: str
) -> None:
    """A ``name @ URL`` requirement installs that file; a requirement whose marker is false
    on the host (a package no index has) is skipped by the installer, as pip does."""
    wheel = next(Path(ssh_wheelhouse).glob("threadpoolctl-*.whl"))
    image = sky.Image(
        pip=[f"threadpoolctl @ {wheel.as_uri()}", "no-such-package-xyz; python_version < '3'"],
        wheelhouse=ssh_wheelhouse,
    )
    provider = make_provider(ssh_clean, str(tmp_path / "envs"))
    with sky.Compute(provider, nodes=1, image=image) as compute:
        info = compute.submit(where).result(timeout=60)
    assert str(info["threadpoolctl"]).startswith(str(tmp_path / "envs" / image.digest()))
