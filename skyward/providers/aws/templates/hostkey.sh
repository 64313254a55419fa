#!/bin/sh
# Print this instance's own SSH host key (generated at first boot) on the serial console.
# The client reads it with ec2:GetConsoleOutput and pins it: only the instance writes
# there, unlike user data, which anyone allowed to describe the instance can read.
f=/etc/ssh/ssh_host_ed25519_key.pub
[ -r "$f" ] && echo "{mark} $(cut -d ' ' -f 1,2 "$f")" > /dev/console
