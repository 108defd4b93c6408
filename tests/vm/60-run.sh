#!/usr/bin/env bash
# Whole `snapveil run` jobs on real OpenZFS (recursive: a dataset with a child) and a real
# LVM ext4 volume: two runs with a change, current/ and the generation restored and
# compared; kill -9 mid-transfer, then the next run removes the stale snapshot/clone/LV
# and completes; an LVM snapshot that overflows during the run fails the run, reported,
# with nothing left behind.
# disks: runzfs:1G runlvm:1G
# seconds: 456
. "$(dirname "$0")/lib.sh"
P=runpool VG=runvg
KEY=$PWD/key.conf PASS=$PWD/key.pass ST=$PWD/state CFG=$PWD/c.toml
cleanup() {
    [[ -f $CFG ]] && snapveil cleanup --config "$CFG" >/dev/null 2>&1
    mountpoint -q /mnt/run-ext4 && umount /mnt/run-ext4
    vgremove -f -y $VG >/dev/null 2>&1
    zpool destroy -f $P 2>/dev/null
    true
}
trap cleanup EXIT

# config [RSYNC_ARGS_LINE] [LVM_SIZE] [EXT4_JOB_EXTRA (appended to the ext4 job, last)]
config() {
    cat >"$CFG" <<EOF
state_dir = "$ST"

[[job]]
name = "zfs"
source = "zfs:$P/data"
target = "$PWD/t-zfs"
key_config = "$KEY"
passfile = "$PASS"
${1:-}
[job.snapshot]
recursive = true

[[job]]
name = "ext4"
source = "lvm:$VG/ext4"
target = "$PWD/t-ext4"
key_config = "$KEY"
passfile = "$PASS"
${1:-}
[job.snapshot]
size = "${2:-64M}"
${3:-}
EOF
}
ours() { zfs list -H -o name -t all -r $P | grep snapveil- || true; lvs --noheadings -o lv_name $VG | grep snapveil- || true; }
# left: nothing of ours is left (no snapshot, no mount under the state directory); else it
# names what is, for the failure's output
left() {
    local o m
    o=$(ours) m=$(grep " $ST" /proc/self/mountinfo)
    [ -z "$o$m" ] || { echo "left behind: ${o:+snapshots: $o }${m:+mounts: $m}"; return 1; }
}
restore_equals() { # TARGET_TREE DIGEST
    rm -rf "$PWD/r" && snapveil decrypt --passfile "$PASS" "$1" "$PWD/r" >/dev/null && [ "$(tree_digest "$PWD/r")" = "$2" ]
}

check "setup: pool, dataset with a child dataset, ext4 LV, key" "
    snapveil init --scrypt-n 12 --config $KEY --passfile $PASS >/dev/null &&
    zpool create -f -O mountpoint=/$P $P $(disk runzfs) && zfs create $P/data && random_tree /$P/data 2 &&
    zfs create $P/data/child && echo kid >/$P/data/child/f &&
    pvcreate -q -y $(disk runlvm) && vgcreate -q $VG $(disk runlvm) && lvcreate -q -y -L 300M -n ext4 $VG &&
    mkfs.ext4 -q /dev/$VG/ext4 && mkdir -p /mnt/run-ext4 && mount /dev/$VG/ext4 /mnt/run-ext4 && random_tree /mnt/run-ext4 2"
config
check "check-config accepts both jobs" "snapveil check-config --config $CFG"

z1=$(tree_digest /$P/data) e1=$(tree_digest /mnt/run-ext4)
check "run 1: both jobs succeed, nothing left behind" "snapveil run --config $CFG && left"
check "run 1: zfs current/ restores to the dataset tree, child dataset included" \
    "restore_equals $PWD/t-zfs/current $z1 && [ \"\$(cat $PWD/r/child/f)\" = kid ]"
check "run 1: ext4 current/ restores to the volume" "restore_equals $PWD/t-ext4/current $e1"

for root in /$P/data /mnt/run-ext4; do
    echo "changed for run 2" >"$root/etc/motd"
    rm "$root/with space/odd name ü.txt"
done
echo kid2 >/$P/data/child/f
sleep 1
z2=$(tree_digest /$P/data) e2=$(tree_digest /mnt/run-ext4)
check "run 2 after a change and a deletion: both succeed, nothing left" "snapveil run --config $CFG && left"
check "run 2: current/ restores to the changed trees" \
    "restore_equals $PWD/t-zfs/current $z2 && restore_equals $PWD/t-ext4/current $e2"
for j in zfs ext4; do
    check "run 2: $j generation holds the old motd, the deleted file and (zfs) the old child file" "
        g=\$(ls $PWD/t-$j/generations) && [ \$(echo \"\$g\" | wc -l) = 1 ] &&
        rm -rf $PWD/g && snapveil decrypt --config $KEY --passfile $PASS $PWD/t-$j/generations/\$g $PWD/g >/dev/null &&
        [ \"\$(cat $PWD/g/etc/motd)\" != 'changed for run 2' ] && [ -f '$PWD/g/with space/odd name ü.txt' ] &&
        { [ $j = ext4 ] || [ \"\$(cat $PWD/g/child/f)\" = kid ]; }"
done

# kill -9 in the middle of a slow transfer; the next run cleans up and completes
head -c 6M /dev/urandom >/$P/data/big.bin
head -c 6M /dev/urandom >/mnt/run-ext4/big.bin
config 'rsync_args = ["--bwlimit=300"]'
for j in zfs ext4; do
    check "$j: kill -9 mid-transfer leaves its snapshot behind" "
        \"\$SNAPVEIL\" run --config $CFG $j >/dev/null 2>&1 & pid=\$!
        for _ in \$(seq 600); do mountpoint -q $ST/view/$j && break; sleep 0.1; done
        mountpoint -q $ST/view/$j && sleep 2 && kill -9 \$pid && wait \$pid; [ -n \"\$(ours)\" ]"
done
config
z3=$(tree_digest /$P/data) e3=$(tree_digest /mnt/run-ext4)
check "next run removes the stale snapshots, clones, LVs and mounts and completes" \
    "snapveil run --config $CFG && left && restore_equals $PWD/t-zfs/current $z3 && restore_equals $PWD/t-ext4/current $e3"

# An LVM snapshot too small for what the origin writes during the run. The writes come
# from a post_snapshot hook: after the snapshot exists and before the view is read, so
# the overflow happens at the same point of every run, whatever the machine's speed (a
# writer started N seconds after the run raced the transfer under load). 40 MiB of
# fsync'ed writes against 8 MiB of copy-on-write space: invalid when the hook returns.
config '' 8M '[[job.hooks]]
phase = "post_snapshot"
command = "dd if=/dev/urandom of=/mnt/run-ext4/fill bs=1M count=40 conv=fsync status=none"'
head -c 3M /dev/urandom >/mnt/run-ext4/big.bin
check "overflow: the run fails, says the snapshot overflowed, leaves nothing" "
    ! snapveil run --config $CFG ext4 >out.ovf 2>&1 &&
    [ -s /mnt/run-ext4/fill ] && grep -qi -e invalid -e overflow out.ovf && left"
check "origins healthy: pool ok, ext4 fsck clean" \
    "zpool status -x $P | grep -q healthy && umount /mnt/run-ext4 && e2fsck -fn /dev/$VG/ext4 >/dev/null"
