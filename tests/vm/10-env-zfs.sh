#!/usr/bin/env bash
# The real OpenZFS the providers rely on: what zfs-fuse cannot show (raw send of an
# encrypted dataset, resume tokens, bookmarks, holds, .zfs/snapshot) works here.
# disks: envzfs1:1G envzfs2:1G
# seconds: 80
. "$(dirname "$0")/lib.sh"
PW='correct horse battery staple'
cleanup() { zpool destroy -f envsrc 2>/dev/null; zpool destroy -f envdst 2>/dev/null; true; }
trap cleanup EXIT

check "modprobe zfs; kernel module and userland versions agree" \
    "modprobe zfs && zfs version && [ \"\$(zfs version | sed -n 1p | sed 's/^zfs-//')\" = \"\$(zfs version | sed -n 2p | sed 's/^zfs-kmod-//')\" ]"
zfs version | sed 's/^/   /'
check "zpool create on a virtio disk" \
    "zpool create -f -o ashift=12 -O mountpoint=/envsrc envsrc $(disk envzfs1) && zpool create -f -O mountpoint=none envdst $(disk envzfs2)"

check "encrypted dataset (passphrase)" \
    "echo '$PW' | zfs create -o encryption=on -o keyformat=passphrase envsrc/enc && [ \"\$(zfs get -H -o value keystatus envsrc/enc)\" = available ]"
echo v1 >/envsrc/enc/file.txt; head -c 4M /dev/urandom >/envsrc/enc/blob; B1=$(sha /envsrc/enc/blob)
check "snapshot s1" "zfs snapshot envsrc/enc@s1"
echo v2 >/envsrc/enc/file.txt; head -c 4M /dev/urandom >/envsrc/enc/blob; B2=$(sha /envsrc/enc/blob)
check "snapshot s2" "zfs snapshot envsrc/enc@s2"
check ".zfs/snapshot/s1 visible with the old content" \
    "[ \"\$(ls /envsrc/enc/.zfs/snapshot | tr '\n' ' ')\" = 's1 s2 ' ] && [ \"\$(cat /envsrc/enc/.zfs/snapshot/s1/file.txt)\" = v1 ] && [ \"\$(sha /envsrc/enc/.zfs/snapshot/s1/blob)\" = $B1 ]"
check "read-only clone of s1 shows s1, refuses writes" \
    "zfs clone -o readonly=on -o mountpoint=/envclone envsrc/enc@s1 envsrc/clone && [ \"\$(cat /envclone/file.txt)\" = v1 ] && ! touch /envclone/x && zfs destroy envsrc/clone"

check "send -w full | receive: stays encrypted, key unavailable" \
    "zfs send -w envsrc/enc@s1 | zfs receive -u envdst/enc && [ \"\$(zfs get -H -o value encryption,keystatus envdst/enc | tr '\n' ' ')\" = 'aes-256-gcm unavailable ' ]"
check "send -w -i s1 s2 | receive" "zfs send -w -i @s1 envsrc/enc@s2 | zfs receive -u envdst/enc"
# mountpoint set while the key is unloaded, mounted ro: a rw mount's atime updates would
# make the next incremental receive fail ("modified since most recent snapshot")
check "received data decrypts to s2" \
    "zfs set mountpoint=/envdst-enc envdst/enc && echo '$PW' | zfs load-key envdst/enc && zfs mount -o ro envdst/enc && [ \"\$(cat /envdst-enc/file.txt)\" = v2 ] && [ \"\$(sha /envdst-enc/blob)\" = $B2 ] && zfs unmount envdst/enc && zfs unload-key envdst/enc"

head -c 24M /dev/urandom >/envsrc/enc/big; B3=$(sha /envsrc/enc/big)
check "receive -s of a stream cut short fails and leaves a resume token" \
    "zfs snapshot envsrc/enc@s3 && ! (zfs send -w envsrc/enc@s3 | head -c 8000000 | zfs receive -s -u envdst/part) && [ \"\$(zfs get -H -o value receive_resume_token envdst/part)\" != - ]"
check "send -t TOKEN resumes; token gone, data complete" \
    "zfs send -t \"\$(zfs get -H -o value receive_resume_token envdst/part)\" | zfs receive -s -u envdst/part && [ \"\$(zfs get -H -o value receive_resume_token envdst/part)\" = - ] && zfs set mountpoint=/envdst-part envdst/part && echo '$PW' | zfs load-key envdst/part && zfs mount -o ro envdst/part && [ \"\$(sha /envdst-part/big)\" = $B3 ] && zfs unmount envdst/part"

check "bookmark survives its snapshot" \
    "zfs bookmark envsrc/enc@s2 envsrc/enc#b2 && zfs destroy envsrc/enc@s2 && zfs list -H -t bookmark -o name -r envsrc/enc | grep -qx 'envsrc/enc#b2'"
echo v4 >/envsrc/enc/file.txt
check "incremental send -w from the bookmark" \
    "zfs snapshot envsrc/enc@s4 && zfs send -w -i envsrc/enc#b2 envsrc/enc@s4 | zfs receive -u envdst/enc && echo '$PW' | zfs load-key envdst/enc && zfs mount -o ro envdst/enc && [ \"\$(cat /envdst-enc/file.txt)\" = v4 ] && zfs unmount envdst/enc"

check "hold: held snapshot refuses destroy; release, then destroy works" \
    "zfs hold keep envsrc/enc@s1 && zfs holds -H envsrc/enc@s1 | grep -q keep && ! zfs destroy envsrc/enc@s1 && zfs release keep envsrc/enc@s1 && zfs destroy envsrc/enc@s1"

check "recursive snapshot covers child datasets, each with .zfs/snapshot" \
    "zfs create envsrc/tree && zfs create envsrc/tree/a && zfs create envsrc/tree/a/b && echo deep >/envsrc/tree/a/b/f && zfs snapshot -r envsrc/tree@r && [ \"\$(zfs list -H -t snapshot -o name -r envsrc/tree | tr '\n' ' ')\" = 'envsrc/tree@r envsrc/tree/a@r envsrc/tree/a/b@r ' ] && [ \"\$(cat /envsrc/tree/a/b/.zfs/snapshot/r/f)\" = deep ] && zfs destroy -r envsrc/tree@r"
check "pools healthy" "[ \"\$(zpool status -x)\" = 'all pools are healthy' ]"
