#!/bin/sh
# Skyward dead-man switch: power the instance off (which terminates it) once no client
# has been connected for $1 seconds. "Connected" means an agent process is running (an
# agent exits when its client stops sending heartbeats) or an SSH connection is
# established (sshd drops a vanished client after ~1 min of missed keepalives).
idle="$1"
last=$(date +%s)
while sleep 15; do
  now=$(date +%s)
  if pgrep -f 'skyward[.]agent' >/dev/null 2>&1 \
     || ss -Htn state established '( sport = :22 )' 2>/dev/null | grep -q .; then
    last=$now
  fi
  if [ $((now - last)) -ge "$idle" ]; then
    logger -t skyward "no client for ${idle}s: powering off"
    systemctl poweroff
    exit 0
  fi
done
