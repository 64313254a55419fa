#!/bin/sh
# Skyward's Python on this instance: runs once the user-data set-up is done. Waits up to
# {wait}s per call (less than the client's probe timeout); the client retries while the
# marker below says the set-up is still running.
n=0
while [ ! -e {state}/ready ]; do
  if [ -e {state}/failed ]; then
    cat {state}/failed >&2
    tail -n 20 /var/log/cloud-init-output.log >&2 2>/dev/null
    exit 1
  fi
  n=$((n + 1))
  if [ "$n" -gt {wait} ]; then
    echo "{pending}" >&2
    exit 75
  fi
  sleep 1
done
exec "$(cat {state}/python)" "$@"
