#!/bin/sh
# Skyward dead-man switch: power the instance off (which terminates it) once no client
# has been logged in for $1 seconds. "Logged in" means a process of the login user $2
# runs: only an authenticated SSH session starts one (a connection that has not logged
# in runs as sshd's own user, so port scans do not keep the instance alive). The agent
# exits when its client stops sending heartbeats, and sshd drops a vanished client
# after ~1 min of missed keepalives.
idle="$1"
user="$2"
last=$(date +%s)
while sleep 15; do
  now=$(date +%s)
  if pgrep -u "$user" >/dev/null 2>&1; then
    last=$now
  fi
  if [ $((now - last)) -ge "$idle" ]; then
    logger -t skyward "no client for ${idle}s: powering off"
    systemctl poweroff
    exit 0
  fi
done
