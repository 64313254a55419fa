"""Start many local agents fast: fork them from one template process that has imported
the agent once.

Starting ``python -m skyward.agent`` costs an interpreter start and the agent's
imports per node: with 100 nodes on 2 cores that is seconds of CPU. Instead the
client starts one small template (``python -c <serve> skyward.agent``) that
imports the agent's dependencies and then waits on a Unix socket that is its
stdin. For each node the client makes the agent's three pipes and sends the
agent's ends to the template (``SCM_RIGHTS``); the template forks, and the child
puts the pipes on fds 0, 1, 2, closes every other descriptor, leads its own
session (a Ctrl-C at the terminal reaches only the client) and runs the agent as
``__main__``, as ``python -m`` does. The template answers with the child's pid
and a pidfd, so the client waits for and kills exactly that process, though it
is the template's child and not its own.

Nothing of the client leaks into an agent: the template was started with only
its socket and stderr, and the agent gets only its own pipes. An agent exits when
its stdin ends, like any agent, so a client that dies leaves none behind; the
template exits when its socket ends.
"""

from __future__ import annotations

import importlib
import os
import runpy
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
from typing import IO

from skyward.channel import LoopPipes

_PID = struct.Struct("!q")
_TEMPLATE = "import sys; from skyward.providers.forkserver import serve; serve(sys.argv[1])"
REQUEST_TIMEOUT = 30.0


class ForkServer:
    """The client's handle on one template process (started at once, stopped by ``close``).

    Args:
        python: the interpreter of the template, hence of every agent forked from it.
        env: the template's environment, which every agent inherits.
        module: the module each forked child runs (``main()`` is called).
    """

    def __init__(self, python: str, env: dict[str, str], module: str = "skyward.agent") -> None:
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(REQUEST_TIMEOUT)
        self._lock = threading.Lock()
        self._forked: list[ForkedChannel] = []
        try:
            self.process = subprocess.Popen(
                # -c, not -m: this module is imported by the package already.
                [python, "-c", _TEMPLATE, module],
                stdin=theirs.fileno(),
                stdout=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        except BaseException:
            self._sock.close()
            raise
        finally:
            theirs.close()

    def spawn(self, name: str) -> ForkedChannel:
        """Fork one agent from the template; its channel (the agent's pipes)."""
        ours: list[int] = []
        theirs: list[int] = []
        try:
            for _ in range(3):
                read, write = os.pipe()
                ours.append(read)
                theirs.append(write)
            # stdin: the agent reads, we write; stdout and stderr: the other way round.
            ours[0], theirs[0] = theirs[0], ours[0]
            try:
                with self._lock:
                    socket.send_fds(self._sock, [b"f"], theirs)
                    data, fds, _, _ = socket.recv_fds(self._sock, _PID.size, 1)
            except OSError as exc:  # the template is gone, or silent for REQUEST_TIMEOUT
                raise RuntimeError(self._failure()) from exc
            if len(data) != _PID.size or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise RuntimeError(self._failure())
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        channel = ForkedChannel(name, _PID.unpack(data)[0], fds[0], *ours)
        with self._lock:
            self._forked.append(channel)
        return channel

    def _failure(self) -> str:
        code = self.process.poll()
        state = f"exited with code {code}" if code is not None else "stopped answering"
        return (
            f"the local agent template process {state}; its error is on stderr above "
            "(can this interpreter import skyward? or use sky.Local(fork=False))"
        )

    def close(self) -> None:
        """Stop the template, and kill any agent it forked that is still running (the
        cluster stopped them before: this is the last resort of an unusual exit)."""
        with self._lock:
            forked, self._forked = self._forked, []
        for channel in forked:
            if channel.running():
                channel.kill()
        self._sock.close()  # EOF on its stdin: it exits
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


class ForkedChannel(LoopPipes):
    """An agent forked by the template, spoken to over its pipes; waited for and killed
    through a pidfd, as it is not this process's child."""

    def __init__(self, name: str, pid: int, pidfd: int, stdin: int, stdout: int, stderr: int):
        self.name = name
        self._pid = pid
        self._pidfd = pidfd
        self.writer = os.fdopen(stdin, "wb")
        self.reader = os.fdopen(stdout, "rb")
        self._errors: IO[bytes] = os.fdopen(stderr, "rb")
        self._serve(stderr)

    @property
    def pid(self) -> int | None:
        return self._pid

    def running(self) -> bool:
        """Whether the agent process is still running."""
        return self._pidfd >= 0 and not self._wait(0)

    def _wait(self, timeout: float) -> bool:
        try:
            return bool(select.select([self._pidfd], [], [], timeout)[0])
        except (OSError, ValueError):
            return True  # pidfd closed: released already

    def close(self, timeout: float = 2.0) -> None:
        try:
            self.writer.close()
        except (OSError, ValueError):
            pass
        if not self._wait(timeout):
            self.kill()
        self._release()

    def kill(self) -> None:
        try:
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        except (OSError, ValueError):
            pass  # exited (or released) already
        self._wait(5)
        self._release()

    def _release(self) -> None:
        self._detach()
        for stream in (self.writer, self.reader, self._errors):
            try:
                stream.close()
            except (OSError, ValueError):
                pass
        if self._pidfd >= 0:
            try:
                os.close(self._pidfd)
            except OSError:
                pass
            self._pidfd = -1


# --- the template process ------------------------------------------------------------------


def _reap(_signum: int = 0, _frame: object = None) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _child(fds: list[int], module: str) -> None:
    """In the forked child: become the agent on ``fds`` and nothing else."""
    try:
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(3, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 1 << 16)
        # As `python -m module` would: a module that looks at __main__ (joblib's in_agent)
        # sees the agent there; the template imported its dependencies already.
        sys.argv = [""]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # noqa: BLE001 - the child must never return into the loop
        try:
            sys.stderr.write(f"skyward agent template: {type(exc).__name__}: {exc}\n")
            sys.stderr.flush()
        finally:
            code = 2
    try:
        sys.stderr.flush()
    finally:
        os._exit(code)


def serve(module: str) -> None:
    """The template's loop: import ``module`` once, then fork a child per request on fd 0."""
    importlib.import_module(module)
    # Keep what it imported, not the module itself: each child runs it as __main__, as
    # `python -m` does, where the module is not also imported under its own name.
    del sys.modules[module]
    package, _, name = module.rpartition(".")
    if package and hasattr(sys.modules[package], name):
        delattr(sys.modules[package], name)
    sock = socket.socket(fileno=os.dup(0))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, _reap)
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(sock, 1, 3)
        except OSError:
            return
        if len(fds) != 3:
            return  # EOF: the client is gone or done
        # A child that exits at once must stay unreaped until its pidfd exists.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            pid = os.fork()
            if pid == 0:
                sock.close()
                _child(fds, module)
            pidfd = os.pidfd_open(pid)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            for fd in fds:
                os.close(fd)
        try:
            socket.send_fds(sock, [_PID.pack(pid)], [pidfd])
        except OSError:
            return
        finally:
            os.close(pidfd)
