#!/bin/bash
# with-fuse-ring.sh CMD...: runs CMD with the kernel's FUSE over io_uring on (the `fuse`
# module's enable_uring, Linux 6.14+), so that the views the tests mount are served
# through the ring (src/view/ring.rs); the setting is put back afterwards. On a kernel
# without it, CMD runs as is: every view is then served by fuser's loop.
set -u
knob=/sys/module/fuse/parameters/enable_uring
if [ -w "$knob" ]; then
    was=$(cat "$knob")
    trap 'echo "$was" > "$knob"' EXIT
    echo Y > "$knob"
    echo "with-fuse-ring: FUSE over io_uring on for: $*"
else
    echo "with-fuse-ring: this kernel has no FUSE over io_uring; views use /dev/fuse"
fi
"$@"
