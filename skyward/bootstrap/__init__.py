"""Prepare a host's Python environment for the agent (SSH and AWS nodes).

Each host gets a virtualenv under ``<env_root>/<image digest>`` (``uv`` when the
host has it, else ``python -m venv`` and pip) holding the image's packages and
the client's own skyward build, so both ends run the same code. A second
cluster with the same image finds the environment ready and installs nothing.

- :mod:`~skyward.bootstrap.host`: the standard-library-only script that does the
  work on the host; the only file shipped there.
- :mod:`~skyward.bootstrap.remote`: running it over SSH, uploading over SFTP.
- :mod:`~skyward.bootstrap.wheels`: the client's skyward and plugins as wheels.
- :mod:`~skyward.bootstrap.environment`: one image's environment: its plan, the
  warm-start command, and :func:`prepare`, which logs each step on the
  ``skyward.bootstrap`` logger (``record.step``, ``record.host``) through its caller.
"""

from __future__ import annotations

from skyward.bootstrap.environment import INSTALL_STEPS, NOT_READY, Plan, agent_command, prepare
from skyward.errors import BootstrapError

__all__ = ["INSTALL_STEPS", "NOT_READY", "BootstrapError", "Plan", "agent_command", "prepare"]
