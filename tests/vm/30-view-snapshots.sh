#!/usr/bin/env bash
# snapveil's encrypted view over real snapshots: a ZFS snapshot read through
# .zfs/snapshot/NAME, and LVM snapshots of mounted ext4 (ro,noload) and XFS (ro,nouuid)
# origins. Each is viewed with `snapveil mount`, copied by rsync while the origin keeps
# changing, and restored with `snapveil decrypt` and with stock gocryptfs (the oracle):
# both restores must equal the snapshot, not the changed origin.
# disks: viewzfs:1G viewlvm:1G
# seconds: 213
. "$(dirname "$0")/lib.sh"
VG=viewvg
KEY=$PWD/key.conf PASS=$PWD/key.pass
cleanup() {
    for m in /mnt/view-*; do mountpoint -q "$m" && { fusermount3 -u "$m" 2>/dev/null || umount -l "$m"; }; done
    umount /mnt/lvm-* 2>/dev/null
    vgremove -f -y $VG >/dev/null 2>&1
    zpool destroy -f viewpool 2>/dev/null
    true
}
trap cleanup EXIT
mkdir -p /mnt/view-zfs /mnt/view-ext4 /mnt/view-xfs /mnt/view-oracle /mnt/lvm-ext4 /mnt/lvm-ext4-snap /mnt/lvm-xfs /mnt/lvm-xfs-snap

check "snapveil init (key config + passfile, 0600)" \
    "snapveil init --scrypt-n 12 --config $KEY --passfile $PASS && [ \"\$(stat -c %a $KEY $PASS | tr '\n' ' ')\" = '600 600 ' ]"

# backup SNAPDIR NAME ORIGIN: view SNAPDIR, change ORIGIN while rsync copies the view,
# restore two ways, compare with the snapshot's digest taken before the origin changed
backup() {
    local snap=$1 name=$2 origin=$3 want
    want=$(tree_digest "$snap")
    check "$name: snapveil mount --background of the snapshot" \
        "snapveil mount --config $KEY --passfile $PASS --background $snap /mnt/view-$name && [ -e /mnt/view-$name/gocryptfs.conf ]"
    check "$name: the view shows no plaintext name" "! find /mnt/view-$name | grep -q -e motd -e data.bin"
    # the origin changes during the copy: the snapshot, hence the backup, must not
    (for i in 1 2 3 4 5; do echo "changed $i" >"$origin/etc/motd"; head -c 1M /dev/urandom >>"$origin/var/lib/app/data.bin"; sync; sleep 0.3; done) &
    local writer=$!
    check "$name: rsync the view to a target while the origin is written" "rsync -a --delete /mnt/view-$name/ $PWD/target-$name/"
    wait "$writer"
    check "$name: origin did change" "[ \"\$(tree_digest $origin)\" != $want ]"
    check "$name: snapveil umount" "snapveil umount /mnt/view-$name && ! mountpoint -q /mnt/view-$name"
    check "$name: snapveil decrypt of the target equals the snapshot" \
        "snapveil decrypt --passfile $PASS $PWD/target-$name $PWD/restore-$name && [ \"\$(tree_digest $PWD/restore-$name)\" = $want ]"
    check "$name: stock gocryptfs mounts the target; equals the snapshot" \
        "gocryptfs -q -ro -passfile $PASS $PWD/target-$name /mnt/view-oracle && [ \"\$(tree_digest /mnt/view-oracle)\" = $want ]; rc=\$?; fusermount3 -u /mnt/view-oracle; exit \$rc"
}

# ---- ZFS: .zfs/snapshot/NAME of a dataset
modprobe zfs
check "zfs: pool and dataset with a small tree" \
    "zpool create -f -O mountpoint=/viewpool viewpool $(disk viewzfs) && zfs create viewpool/data && random_tree /viewpool/data 6 && zfs snapshot viewpool/data@snapveil-test"
backup /viewpool/data/.zfs/snapshot/snapveil-test zfs /viewpool/data

# ---- LVM: ext4 and XFS snapshots of mounted origins
check "lvm: VG with a mounted ext4 LV and a mounted XFS LV" \
    "pvcreate -q $(disk viewlvm) && vgcreate -q $VG $(disk viewlvm) && lvcreate -q -y -L 96M -n ext4 $VG && mkfs.ext4 -q /dev/$VG/ext4 && mount /dev/$VG/ext4 /mnt/lvm-ext4 && lvcreate -q -y -L 320M -n xfs $VG && mkfs.xfs -q /dev/$VG/xfs && mount /dev/$VG/xfs /mnt/lvm-xfs"
random_tree /mnt/lvm-ext4 6; random_tree /mnt/lvm-xfs 6; sync
check "lvm: ext4 snapshot mounted ro,noload" "lvcreate -q -y -s -L 48M -n ext4snap $VG/ext4 && mount -o ro,noload /dev/$VG/ext4snap /mnt/lvm-ext4-snap"
backup /mnt/lvm-ext4-snap ext4 /mnt/lvm-ext4
check "lvm: xfs snapshot mounted ro,nouuid" "lvcreate -q -y -s -L 48M -n xfssnap $VG/xfs && mount -o ro,nouuid /dev/$VG/xfssnap /mnt/lvm-xfs-snap"
backup /mnt/lvm-xfs-snap xfs /mnt/lvm-xfs
check "lvm: both snapshots still valid after the backups" \
    "[ \"\$(lvs --noheadings -o lv_attr $VG/ext4snap $VG/xfssnap | tr -d ' ' | cut -c5 | tr -d '\n')\" = aa ]"
