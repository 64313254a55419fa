"""What a channel forwards and kills: worker stderr reaches the terminal without control
sequences; a remote kill needs an agent pid above 1."""

from __future__ import annotations

import os
from typing import Any

import pytest

from skyward.channel import AGENT_PID_MARK, SSHChannel, _remote_kill, forward_line


def forwarded(lines: list[bytes], capsys: pytest.CaptureFixture[str]) -> list[str]:
    for line in lines:
        forward_line("gpu-1", line)
    return capsys.readouterr().err.splitlines()


def test_forwarded_stderr_loses_escape_sequences_and_control_characters(
    capsys: pytest.CaptureFixture[str],
) -> None:
    lines = [
        b"\x1b[31mred\x1b[0m text\tafter a tab\r\n",  # colours, carriage return
        b"\x1b]0;owned title\x07visible\n",  # window title (OSC ... BEL)
        b"\x1b]8;;http://evil.example\x1b\\link\x1b]8;;\x1b\\\n",  # hyperlink (OSC ... ST)
        b"a\x08\x08\x08bell\x07 erase\x1b[2K\x1b[1A up\x1bc reset\n",  # cursor, erase, RIS
        "c1 \u009b31m csi and \u0085 nel\n".encode(),  # 8-bit (C1) controls
        b"\x00nul \x7fdel \x1b(0 charset\n",
    ]
    assert forwarded(lines, capsys) == [
        "[gpu-1] red text\tafter a tab",
        "[gpu-1] visible",
        "[gpu-1] link",
        "[gpu-1] abell erase up reset",
        "[gpu-1] c1  csi and  nel",
        "[gpu-1] nul del  charset",
    ]


def test_plain_text_is_forwarded_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    text = "epoch 3 done: loss=0.25\tacc=97% [ok] (été, 数据, emoji \U0001f600)"
    assert forwarded([text.encode() + b"\n"], capsys) == [f"[gpu-1] {text}"]


class FakeTransport:
    """Records the sessions a kill would open."""

    def __init__(self) -> None:
        self.commands: list[str] = []
        self.closed = False

    def is_active(self) -> bool:
        return not self.closed

    def open_session(self, timeout: float | None = None) -> Any:
        transport = self

        class Session:
            class status_event:  # noqa: N801 - mimics paramiko's attribute
                @staticmethod
                def wait(timeout: float) -> bool:
                    return True

            def exec_command(self, command: str) -> None:
                transport.commands.append(command)

            def close(self) -> None:
                pass

        return Session()

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("pid", [0, -1, 1])
def test_remote_kill_refuses_a_pid_that_is_not_one_agent(pid: int) -> None:
    transport = FakeTransport()
    with pytest.raises(ValueError, match=f"refusing to kill remote pid {pid}"):
        _remote_kill(transport, pid)  # type: ignore[arg-type]
    assert transport.commands == []


def test_remote_kill_kills_the_agent_group() -> None:
    transport = FakeTransport()
    _remote_kill(transport, 4321)  # type: ignore[arg-type]
    assert transport.commands == ["kill -9 -- -4321 4321 2>/dev/null"]


class FakeChannel:
    """A paramiko channel whose remote command printed ``stderr`` and ended: what the I/O
    loop uses of one (its readiness pipe, the buffers' state, the end)."""

    def __init__(self, stderr: bytes) -> None:
        self.stderr = stderr
        self.transport = FakeTransport()
        self._ready, write = os.pipe()
        os.write(write, b"*")  # data buffered, and then the end: readable for good
        os.close(write)
        self.eof_received = True
        self.closed = False

    def fileno(self) -> int:
        return self._ready

    def settimeout(self, timeout: float) -> None:
        pass

    def recv_ready(self) -> bool:
        return False

    def recv_stderr_ready(self) -> bool:
        return bool(self.stderr)

    def recv_stderr(self, n: int) -> bytes:
        data, self.stderr = self.stderr[:n], self.stderr[n:]
        return data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._ready)

    def get_transport(self) -> FakeTransport:
        return self.transport


@pytest.mark.parametrize("announced", [b"0", b"-1", b"1", b"x"])
def test_an_announced_pid_of_1_or_less_is_not_kept_nor_killed(
    announced: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeChannel(AGENT_PID_MARK + announced + b"\n")
    channel = SSHChannel("gpu-1", fake)  # type: ignore[arg-type]
    assert channel.started(5) is False and channel.pid is None
    channel.kill()
    assert fake.transport.commands == [] and fake.transport.closed
    assert capsys.readouterr().err == f"[gpu-1] {(AGENT_PID_MARK + announced).decode()}\n"


def test_an_announced_agent_pid_is_kept_and_killed_with_its_group() -> None:
    fake = FakeChannel(AGENT_PID_MARK + b"4321\n")
    channel = SSHChannel("gpu-1", fake)  # type: ignore[arg-type]
    assert channel.started(5) is True and channel.pid == 4321
    channel.kill()
    assert fake.transport.commands == ["kill -9 -- -4321 4321 2>/dev/null"]
