"""Loopback OpenSSH test hosts (filled by the SSH provider work)."""
