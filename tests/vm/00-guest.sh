#!/usr/bin/env bash
# The guest itself: the build under test is shared read-only and runs here, and the tools
# the later files rely on are present (a missing one fails here, loudly, not later).
# seconds: 9
. "$(dirname "$0")/lib.sh"

check "9p share of the build mounted read-only at /mnt/host" \
    "findmnt -n -t 9p -O ro $SHARE && ! touch $SHARE/probe"
check "host-built snapveil runs in the guest" "$SNAPVEIL --version"
check "/dev/fuse and fusermount3 present" "[ -c /dev/fuse ] && command -v fusermount3"
for tool in zpool zfs lvcreate lvs dmsetup mkfs.ext4 mkfs.xfs mkfs.btrfs rsync gocryptfs ssh sshd; do
    check "tool $tool present" "command -v $tool"
done
