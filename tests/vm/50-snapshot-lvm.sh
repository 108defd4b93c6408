#!/usr/bin/env bash
# The LVM snapshot provider (src/snapshot/lvm.rs) on real device-mapper (elsewhere only
# recorded): ext4 (ro,noload) and XFS (ro,nouuid) snapshots of mounted origins, frozen
# while the origin is written; a too-small snapshot that overflows is reported invalid;
# the snapshot LV is unmounted and removed on every path out (release, SIGTERM, error,
# and `snapveil cleanup` after a kill -9).
# disks: snaplvm:1G
# seconds: 226
# needs: snapshot cleanup
. "$(dirname "$0")/lib.sh"
ST=$PWD/state VG=snapvg
cleanup() {
    findmnt -rn -o TARGET | grep "^$ST" | sort -r | xargs -r umount -l
    umount /mnt/snaplvm-* 2>/dev/null
    vgremove -f -y $VG >/dev/null 2>&1
    true
}
trap cleanup EXIT
mkdir -p /mnt/snaplvm-ext4 /mnt/snaplvm-xfs

snaps() { lvs --noheadings -o lv_name $VG | tr -d ' ' | grep '^snapveil-' || true; }
mounts() { findmnt -rn -o TARGET | grep "^$ST" || true; }
waitfor() { for _ in $(seq 1 150); do grep -q '^path ' "$1" 2>/dev/null && return 0; sleep 0.2; done; return 1; }

check "VG with a mounted ext4 LV (128M) and a mounted XFS LV (320M), small trees" \
    "pvcreate -q $(disk snaplvm) && vgcreate -q $VG $(disk snaplvm) && lvcreate -q -y -L 128M -n ext4 $VG && mkfs.ext4 -q /dev/$VG/ext4 && mount /dev/$VG/ext4 /mnt/snaplvm-ext4 && lvcreate -q -y -L 320M -n xfs $VG && mkfs.xfs -q /dev/$VG/xfs && mount /dev/$VG/xfs /mnt/snaplvm-xfs && random_tree /mnt/snaplvm-ext4 4 && random_tree /mnt/snaplvm-xfs 4 && sync"

for fs in ext4 xfs; do
    origin=/mnt/snaplvm-$fs want=$(tree_digest /mnt/snaplvm-$fs)
    opt=noload; [[ $fs == xfs ]] && opt=nouuid
    check "$fs: snapshot --hold: LV snapveil-*, mounted read-only with $opt under the state dir" \
        "snapveil snapshot --source lvm:$VG/$fs --job $fs --state-dir $ST --hold >out.$fs && grep -qx 'consistent yes' out.$fs && SP=\$(sed -n 's/^path //p' out.$fs) && [[ \$SP == $ST/work/$fs/* ]] && [ \"\$(snaps)\" = \"\$(sed -n 's/^snapshot //p' out.$fs)\" ] && findmnt -n -o OPTIONS \"\$SP\" | grep -q '^ro,' && ! touch \"\$SP/x\""
    SP=$(sed -n 's/^path //p' out.$fs)
    echo changed >"$origin/etc/motd"; head -c 2M /dev/urandom >"$origin/var/lib/app/data.bin"; rm "$origin/var/motd-link"; sync
    echo 3 >/proc/sys/vm/drop_caches
    check "$fs: origin written; snapshot unchanged (caches dropped)" \
        "[ \"\$(tree_digest $origin)\" != $want ] && [ \"\$(tree_digest $SP)\" = $want ]"
    check "$fs: cleanup unmounts and lvremoves it" \
        "snapveil cleanup --source lvm:$VG/$fs --job $fs --state-dir $ST >out.c$fs && grep -qE '^removed ($VG/)?snapveil-$fs-' out.c$fs && [ -z \"\$(snaps)\" ] && [ -z \"\$(mounts)\" ]"
done

check "snapshot without --hold: released at once, no LV, no mount" \
    "snapveil snapshot --source lvm:$VG/ext4 --job rel --state-dir $ST >out.rel && grep -q '^path ' out.rel && [ -z \"\$(snaps)\" ] && [ -z \"\$(mounts)\" ]"
check "--size 16M: the snapshot LV gets 16 MiB of copy-on-write space" \
    "snapveil snapshot --source lvm:$VG/ext4 --job sz --state-dir $ST --size 16M --hold >out.sz && [ \"\$(lvs --noheadings --units m --nosuffix -o lv_size $VG/\$(sed -n 's/^snapshot //p' out.sz) | tr -d ' ')\" = 16.00 ] && snapveil cleanup --source lvm:$VG/ext4 --job sz --state-dir $ST && [ -z \"\$(snaps)\" ]"

# --- overflow: an 8 MiB snapshot, 32 MiB written to the origin while it is held
"$SNAPVEIL" snapshot --source lvm:$VG/ext4 --job ovf --state-dir "$ST" --size 8M --wait >out.ovf 2>&1 &
pid=$!
waitfor out.ovf
dd if=/dev/urandom of=/mnt/snaplvm-ext4/fill bs=1M count=32 conv=fsync status=none; sync
check "overflow: LVM itself marks the snapshot invalid" \
    "[ \"\$(lvs --noheadings -o lv_attr $VG/\$(sed -n 's/^snapshot //p' out.ovf) | tr -d ' ' | cut -c5)\" = I ]"
kill -TERM $pid
rc=0; wait $pid || rc=$?
check "overflow: snapveil reports the overflow (non-zero exit, says so)" \
    "[ $rc != 0 ] && grep -qi 'overflow' out.ovf"
check "overflow: the invalid snapshot is unmounted and removed all the same" "[ -z \"\$(snaps)\" ] && [ -z \"\$(mounts)\" ]"
rm -f /mnt/snaplvm-ext4/fill

# --- SIGTERM during --wait
"$SNAPVEIL" snapshot --source lvm:$VG/xfs --job term --state-dir "$ST" --wait >out.term 2>&1 &
pid=$!
waitfor out.term && kill -TERM $pid
rc=0; wait $pid || rc=$?
check "SIGTERM during --wait: exit 0, LV removed, nothing mounted" "[ $rc = 0 ] && [ -z \"\$(snaps)\" ] && [ -z \"\$(mounts)\" ]"

# --- kill -9 while held, then cleanup
"$SNAPVEIL" snapshot --source lvm:$VG/ext4 --job k9 --state-dir "$ST" --wait >out.k9 2>&1 &
pid=$!
check "kill -9 while the snapshot is held" "waitfor out.k9 && kill -9 $pid"
wait $pid 2>/dev/null
lvcreate -q -y -s -L 8M -n user-snap $VG/ext4 >/dev/null
check "after kill -9 the LV and its mount are still there" "[ -n \"\$(snaps)\" ] && [ -n \"\$(mounts)\" ]"
check "cleanup removes them; a user's snapshot of the same origin stays" \
    "snapveil cleanup --source lvm:$VG/ext4 --job k9 --state-dir $ST && [ -z \"\$(snaps)\" ] && [ -z \"\$(mounts)\" ] && lvs $VG/user-snap"

# --- errors leave nothing behind
check "missing LV: error names it, nothing created" \
    "! snapveil snapshot --source lvm:$VG/nope --job miss --state-dir $ST 2>err.miss && grep -q 'nope' err.miss && [ -z \"\$(snaps)\" ]"
# (lvcreate caps a snapshot at its origin's size, so the VG is filled up first)
check "VG full: clear error, nothing left" \
    "lvcreate -q -y -l 100%FREE -n filler $VG && ! snapveil snapshot --source lvm:$VG/xfs --job full --state-dir $ST 2>err.full && grep -qi -e 'free space' -e 'full' err.full && [ -z \"\$(snaps)\" ] && [ -z \"\$(mounts)\" ]; rc=\$?; lvremove -q -f -y $VG/filler; exit \$rc"
check "origins intact: ext4 fsck clean, xfs_repair -n clean" \
    "umount /mnt/snaplvm-ext4 && e2fsck -fn /dev/$VG/ext4 && umount /mnt/snaplvm-xfs && xfs_repair -n /dev/$VG/xfs"
