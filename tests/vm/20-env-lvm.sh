#!/usr/bin/env bash
# Real device-mapper snapshots the LVM provider relies on: ext4 (ro,noload) and XFS
# (ro,nouuid) snapshots of mounted origins stay frozen while the origin changes, and a
# too-small snapshot overflows into a state LVM reports as invalid.
# disks: envlvm:1G
# seconds: 54
. "$(dirname "$0")/lib.sh"
VG=envvg
cleanup() {
    umount /mnt/envlvm-* 2>/dev/null
    vgremove -f -y $VG >/dev/null 2>&1
    true
}
trap cleanup EXIT
mkdir -p /mnt/envlvm-data /mnt/envlvm-snap /mnt/envlvm-x /mnt/envlvm-xsnap /mnt/envlvm-big /mnt/envlvm-tiny

check "pvcreate + vgcreate on a virtio disk" "pvcreate -q $(disk envlvm) && vgcreate -q $VG $(disk envlvm)"
lvm version | sed -n 1,2p | sed 's/^/   /'

check "ext4 LV mounted" "lvcreate -q -y -L 128M -n data $VG && mkfs.ext4 -q /dev/$VG/data && mount /dev/$VG/data /mnt/envlvm-data"
echo v1 >/mnt/envlvm-data/file.txt; head -c 8M /dev/urandom >/mnt/envlvm-data/blob; sync; L1=$(sha /mnt/envlvm-data/blob)
check "snapshot of the mounted ext4 origin, mounted ro,noload" \
    "lvcreate -q -y -s -L 32M -n snap $VG/data && mount -o ro,noload /dev/$VG/snap /mnt/envlvm-snap"
echo v2 >/mnt/envlvm-data/file.txt; echo new >/mnt/envlvm-data/new.txt; head -c 8M /dev/urandom >/mnt/envlvm-data/blob; sync
echo 3 >/proc/sys/vm/drop_caches
check "origin written; ext4 snapshot unchanged (caches dropped)" \
    "[ \"\$(cat /mnt/envlvm-data/file.txt)\" = v2 ] && [ \"\$(cat /mnt/envlvm-snap/file.txt)\" = v1 ] && [ ! -e /mnt/envlvm-snap/new.txt ] && [ \"\$(sha /mnt/envlvm-snap/blob)\" = $L1 ]"
check "umount + lvremove the ext4 snapshot" "umount /mnt/envlvm-snap && lvremove -f -y $VG/snap && ! lvs $VG/snap"

# xfsprogs 6.1 refuses file systems under 300 MB
check "xfs LV mounted" "lvcreate -q -y -L 320M -n xdata $VG && mkfs.xfs -q /dev/$VG/xdata && mount /dev/$VG/xdata /mnt/envlvm-x"
echo x1 >/mnt/envlvm-x/file.txt; sync
check "snapshot of the mounted xfs origin, mounted ro,nouuid" \
    "lvcreate -q -y -s -L 32M -n xsnap $VG/xdata && mount -o ro,nouuid /dev/$VG/xsnap /mnt/envlvm-xsnap"
echo x2 >/mnt/envlvm-x/file.txt; sync
check "origin written; xfs snapshot unchanged" \
    "[ \"\$(cat /mnt/envlvm-x/file.txt)\" = x2 ] && [ \"\$(cat /mnt/envlvm-xsnap/file.txt)\" = x1 ]"
check "umount + lvremove the xfs snapshot" "umount /mnt/envlvm-xsnap && lvremove -f -y $VG/xsnap"

check "8 MiB snapshot of a 128 MiB ext4 origin" \
    "lvcreate -q -y -L 128M -n big $VG && mkfs.ext4 -q /dev/$VG/big && mount /dev/$VG/big /mnt/envlvm-big && lvcreate -q -y -s -L 8M -n tiny $VG/big"
check "32 MiB written to the origin: writes still succeed" \
    "dd if=/dev/urandom of=/mnt/envlvm-big/fill bs=1M count=32 conv=fsync status=none && sync"
check "overflowed snapshot: lvs attr 5th char I, dmsetup Invalid" \
    "[ \"\$(lvs --noheadings -o lv_attr $VG/tiny | tr -d ' ' | cut -c5)\" = I ] && dmsetup status $VG-tiny | grep -q Invalid"
check "overflowed snapshot cannot be mounted" "! mount -o ro,noload /dev/$VG/tiny /mnt/envlvm-tiny"
check "lvremove of the invalid snapshot; origin fsck clean" \
    "lvremove -f -y $VG/tiny && ! lvs $VG/tiny && umount /mnt/envlvm-big && e2fsck -fn /dev/$VG/big"
