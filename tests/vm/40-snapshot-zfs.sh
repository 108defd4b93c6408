#!/usr/bin/env bash
# The ZFS snapshot provider (src/snapshot/zfs.rs) on real OpenZFS: the snapshot read
# through MOUNTPOINT/.zfs/snapshot/NAME (zfs-fuse has no .zfs, so elsewhere only recorded),
# through a read-only clone when the dataset is not mounted, recursive with child
# datasets, released on every path out, and stale ones removed by `snapveil cleanup` after
# a kill -9 while user snapshots and look-alikes stay.
# disks: snapzfs:1G
# seconds: 111
# needs: snapshot cleanup
. "$(dirname "$0")/lib.sh"
ST=$PWD/state P=snappool DS=snappool/data
cleanup() { zpool destroy -f $P 2>/dev/null; true; }
trap cleanup EXIT
modprobe zfs

# ours JOB: the names of job JOB's snapveil snapshots and clones still in the pool
ours() { zfs list -H -o name -t all -r $P | grep -E "[@/]snapveil-$1-[0-9]{8}T[0-9]{6}Z" || true; }

check "pool, dataset with a tree" \
    "zpool create -f -O mountpoint=/$P $P $(disk snapzfs) && zfs create $DS && random_tree /$DS 4"

# --- .zfs/snapshot path, --hold, then cleanup
want=$(tree_digest /$DS)
check "snapshot --hold: prints name, path under .zfs/snapshot, consistent yes" \
    "snapveil snapshot --source zfs:$DS --job dot --state-dir $ST --hold >out.dot && grep -qx 'snapshot snapveil-dot-[0-9]*T[0-9]*Z' out.dot && grep -qx \"path /$DS/.zfs/snapshot/\$(sed -n 's/^snapshot //p' out.dot)\" out.dot && grep -qx 'consistent yes' out.dot"
NAME=$(sed -n 's/^snapshot //p' out.dot) SP=$(sed -n 's/^path //p' out.dot)
echo changed >/$DS/etc/motd; head -c 1M /dev/urandom >>/$DS/var/lib/app/data.bin; sync
check "held snapshot exists in ZFS and keeps the old tree while the origin changes" \
    "zfs list -H -t snapshot $DS@$NAME && [ \"\$(tree_digest /$DS)\" != $want ] && [ \"\$(tree_digest $SP)\" = $want ]"
zfs snapshot $DS@user; zfs snapshot "$DS@snapveil-dot-manual"; zfs snapshot "$DS@snapveil-other-20200101T000000Z"
check "cleanup removes the held snapshot, prints it, keeps user and look-alike snapshots" \
    "snapveil cleanup --source zfs:$DS --job dot --state-dir $ST >out.clean && grep -qE \"^removed (.*@)?$NAME\$\" out.clean && [ -z \"\$(ours dot)\" ] && zfs list -H $DS@user $DS@snapveil-dot-manual $DS@snapveil-other-20200101T000000Z"

check "snapshot without --hold is released at once" \
    "snapveil snapshot --source zfs:$DS --job rel --state-dir $ST >out.rel && grep -q '^path /$DS/.zfs/snapshot/' out.rel && [ -z \"\$(ours rel)\" ]"

# child datasets from here on (a non-recursive snapshot shows their mountpoints empty)
check "child datasets a and a/b" "zfs create $DS/a && zfs create $DS/a/b && echo deep >/$DS/a/b/f"

# --- read-only clone path: the dataset is not mounted, so .zfs/snapshot is not there
zfs set canmount=noauto $DS/a/b; zfs set canmount=noauto $DS/a; zfs unmount $DS/a/b; zfs unmount $DS/a
echo clone-me >/tmp/clone-marker
check "unmounted dataset: --hold gives a read-only clone mounted under the state dir" \
    "snapveil snapshot --source zfs:$DS/a --job cl --state-dir $ST --hold >out.cl && SP=\$(sed -n 's/^path //p' out.cl) && [[ \$SP == $ST/work/cl/* ]] && findmnt -n -o FSTYPE,OPTIONS \"\$SP\" | grep -q '^zfs .*ro' && [ \"\$(zfs get -H -o value readonly $P/\$(sed -n 's/^snapshot //p' out.cl))\" = on ] && ! touch \"\$SP/x\""
check "cleanup removes clone and snapshot, no mount left under the state dir" \
    "snapveil cleanup --source zfs:$DS/a --job cl --state-dir $ST && [ -z \"\$(ours cl)\" ] && ! findmnt -rn -o TARGET | grep -q '^$ST'"
zfs set canmount=on $DS/a; zfs set canmount=on $DS/a/b; zfs mount $DS/a; zfs mount $DS/a/b

# --- recursive: the child datasets' files appear beneath the path
check "--recursive --hold: one snapshot per dataset, child files beneath the path" \
    "snapveil snapshot --source zfs:$DS --job rec --state-dir $ST --recursive --hold >out.rec && [ \"\$(zfs list -H -t snapshot -o name -r $DS | grep -c @snapveil-rec-)\" = 3 ] && SP=\$(sed -n 's/^path //p' out.rec) && [ \"\$(cat \$SP/a/b/f)\" = deep ] && [ -e \$SP/etc/motd ]"
echo deeper >/$DS/a/b/f
check "recursive snapshot unchanged when a child changes" "SP=\$(sed -n 's/^path //p' out.rec) && [ \"\$(cat \$SP/a/b/f)\" = deep ]"
check "cleanup removes the recursive snapshots and their clones" \
    "snapveil cleanup --source zfs:$DS --job rec --state-dir $ST && [ -z \"\$(ours rec)\" ] && ! findmnt -rn -o TARGET | grep -q '^$ST'"

# --- kill -9 while held (--wait), then cleanup: the stale-snapshot path of a crashed run
# waitfor FILE: until snapveil has printed its path (the snapshot exists)
waitfor() { for _ in $(seq 1 150); do grep -q '^path ' "$1" 2>/dev/null && return 0; sleep 0.2; done; return 1; }
for mode in plain recursive; do
    opt=(); [[ $mode == recursive ]] && opt=(--recursive)
    "$SNAPVEIL" snapshot --source zfs:$DS --job k9$mode --state-dir "$ST" --wait "${opt[@]}" >out.k9$mode 2>&1 &
    pid=$!
    check "$mode: snapshot --wait taken, then snapveil killed with SIGKILL" "waitfor out.k9$mode && kill -9 $pid"
    wait "$pid" 2>/dev/null
    check "$mode: the killed run's snapshot is still there" "[ -n \"\$(ours k9$mode)\" ]"
    check "$mode: cleanup removes it all; nothing of the job left, no mount" \
        "snapveil cleanup --source zfs:$DS --job k9$mode --state-dir $ST && [ -z \"\$(ours k9$mode)\" ] && ! findmnt -rn -o TARGET | grep -q '^$ST'"
done

# --- SIGTERM during --wait releases
"$SNAPVEIL" snapshot --source zfs:$DS --job term --state-dir "$ST" --wait --recursive >out.term 2>&1 &
pid=$!
waitfor out.term && kill -TERM $pid
rc=0; wait $pid || rc=$?
check "snapshot --wait released on SIGTERM, exit 0" "[ $rc = 0 ] && [ -z \"\$(ours term)\" ]"

check "missing dataset: error names it, nothing created" \
    "! snapveil snapshot --source zfs:$P/nope --job miss --state-dir $ST 2>err.miss && grep -q '$P/nope' err.miss && [ -z \"\$(ours miss)\" ]"
check "user snapshots untouched by all of it" "zfs list -H $DS@user $DS@snapveil-dot-manual $DS@snapveil-other-20200101T000000Z"
check "pool healthy" "[ \"\$(zpool status -x $P)\" = \"pool '$P' is healthy\" ]"
