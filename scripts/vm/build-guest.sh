#!/usr/bin/env bash
# build-guest.sh: build (once per cache key) the Debian bookworm guest of the real-kernel
# test tier, and print its directory on stdout.
#
# The guest: debootstrap minbase + Debian's kernel, lvm2, xfsprogs, e2fsprogs, btrfs-progs,
# OpenZFS (zfsutils-linux + zfs-dkms from contrib, zfs.ko built in the chroot for the
# guest's kernel), openssh-server, rsync, fuse3, gocryptfs. Booted by qemu straight from
# kernel + initrd + an ext4 image (no partition table, no boot loader).
#
# Usage: build-guest.sh            build if needed; print the guest dir
#        build-guest.sh --key      print the cache key only (resolves package versions)
#        build-guest.sh --force    rebuild even if the guest for the key exists
#        build-guest.sh --gc       remove cached guests and build dirs not used for 14 days
#
# Output in $SNAPVEIL_VM_CACHE/<key>/: vmlinuz initrd.img root.img id_ed25519{,.pub}
# versions.txt build-times.txt. See vmlib.sh for the cache and the mirror.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=vmlib.sh
. "$HERE/vmlib.sh"
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8

# ================================================================== inside the namespace
# `build-guest.sh --in-namespace DIR` runs the build in a private mount namespace
# (started by the outer invocation below): the chroot's proc/sys/dev mounts exist only
# there and vanish with its last process, whatever way the build ends (even kill -9).
build_in_namespace() {
    local work=$1 root=$1/rootfs out=$1/guest
    local t_all step_t0
    t_all=$(date +%s)
    mkdir -p "$out"
    step() { step_t0=$(date +%s); vm_log "build: $1 ..."; }
    step_done() {
        local s=$(($(date +%s) - step_t0))
        vm_log "build: $1 done in ${s}s"
        echo "$1 ${s}s" >>"$out/build-times.txt"
        touch "$work/.done-$1"
    }
    is_done() { [[ -e $work/.done-$1 ]]; }
    in_chroot() {
        chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
            DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 HOME=/root "$@"
    }
    chroot_mounts() {
        mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
        mountpoint -q "$root/sys" || mount -t sysfs sys "$root/sys"
        mountpoint -q "$root/dev" || mount --bind /dev "$root/dev"
        mountpoint -q "$root/dev/pts" || mount -t devpts -o newinstance devpts "$root/dev/pts"
    }
    chroot_umounts() {
        local m
        for m in dev/pts dev sys proc; do
            if mountpoint -q "$root/$m"; then umount "$root/$m"; fi
        done
    }
    # apt pinned to the versions the cache key was computed from ("pkg=version").
    pinned() {
        local p
        for p in "$@"; do
            printf '%s=%s\n' "$p" "$(awk -v p="$p" '$1 == p { print $2 }' "$work/versions.wanted")"
        done
    }
    logged() {   # logged LOGNAME CMD...: output to a log; its tail on failure
        "${@:2}" >"$work/$1.log" 2>&1 || { tail -n 40 "$work/$1.log" >&2; vm_die "$1 failed (log: $work/$1.log)"; }
    }

    if ! is_done debootstrap; then
        step debootstrap
        rm -rf "$root"
        logged debootstrap debootstrap --variant=minbase --components=main,contrib \
            --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
            --include=systemd-sysv,udev,kmod,iproute2,openssh-server,procps \
            "$VM_SUITE" "$root" "$VM_MIRROR"
        step_done debootstrap
    fi

    chroot_mounts
    if ! is_done packages; then
        step packages
        vm_sources_list >"$root/etc/apt/sources.list"
        # no daemon may start inside the chroot
        printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
        chmod 755 "$root/usr/sbin/policy-rc.d"
        logged apt-update in_chroot apt-get -q update
        mapfile -t base < <(pinned "${VM_BASE_PKGS[@]}")
        logged apt-base in_chroot apt-get install -y -q --no-install-recommends "${base[@]}"
        step_done packages
    fi

    local kver
    kver=$(find "$root/lib/modules" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)
    [[ -n $kver && -e $root/boot/vmlinuz-$kver ]] || vm_die "no kernel installed in $root"

    if ! is_done zfs; then
        step zfs
        local release=()
        [[ $VM_ZFS_SUITE == *-backports ]] && release=(-t "$VM_ZFS_SUITE")
        mapfile -t zfs < <(pinned "${VM_ZFS_PKGS[@]}")
        logged apt-zfs in_chroot apt-get install -y -q --no-install-recommends "${release[@]}" "${zfs[@]}"
        if ! compgen -G "$root/lib/modules/$kver/updates/dkms/zfs.ko*" >/dev/null; then
            vm_log "build: zfs-dkms postinst built no zfs.ko for $kver; running dkms autoinstall"
            logged dkms in_chroot dkms autoinstall -k "$kver"
        fi
        compgen -G "$root/lib/modules/$kver/updates/dkms/zfs.ko*" >/dev/null \
            || vm_die "zfs.ko was not built for the guest kernel $kver"
        in_chroot depmod -a "$kver"
        step_done zfs
    fi

    if ! is_done config; then
        step config
        rm -f "$out/id_ed25519" "$out/id_ed25519.pub"
        ssh-keygen -q -t ed25519 -N '' -C snapveil-vm -f "$out/id_ed25519"
        echo snapveil-vm >"$root/etc/hostname"
        printf '127.0.0.1 localhost\n127.0.1.1 snapveil-vm\n' >"$root/etc/hosts"
        {
            echo 'LABEL=snapveilroot / ext4 rw,errors=remount-ro 0 1'
            echo 'hostshare /mnt/host 9p ro,trans=virtio,version=9p2000.L,msize=262144,nofail 0 0'
        } >"$root/etc/fstab"
        mkdir -p "$root/mnt/host"
        install -d -m 700 "$root/root/.ssh"
        install -m 600 "$out/id_ed25519.pub" "$root/root/.ssh/authorized_keys"
        printf 'UseDNS no\nPermitRootLogin prohibit-password\n' >"$root/etc/ssh/sshd_config.d/10-snapveil-vm.conf"
        # qemu's user network answers DHCP; the guest reaches nothing (restrict=on)
        mkdir -p "$root/etc/systemd/network"
        printf '[Match]\nName=en* eth*\n[Network]\nDHCP=ipv4\n' >"$root/etc/systemd/network/20-wired.network"
        in_chroot systemctl enable systemd-networkd ssh >/dev/null 2>&1
        # units that only slow a throw-away guest down (missing ones are fine)
        in_chroot systemctl mask systemd-networkd-wait-online.service apt-daily.timer \
            apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
            man-db.timer systemd-timesyncd.service >/dev/null 2>&1 || true
        # debugging with the console log / -serial stdio: root logs in on ttyS0 (no
        # password; the guest has no network but the 127.0.0.1 ssh forward)
        in_chroot passwd -d root >/dev/null
        mkdir -p "$root/etc/systemd/system/serial-getty@ttyS0.service.d"
        printf '[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin root --keep-baud 115200,38400,9600 %%I $TERM\n' \
            >"$root/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf"
        # no dmeventd (not installed): nothing auto-extends a snapshot, an overflow
        # invalidates it deterministically, and lvcreate does not warn about monitoring
        sed -i 's/^\(\s*\)# *monitoring = 1/\1monitoring = 0/' "$root/etc/lvm/lvm.conf"
        grep -q '^\s*monitoring = 0' "$root/etc/lvm/lvm.conf" || vm_die "could not set monitoring = 0 in lvm.conf"
        rm -f "$root/usr/sbin/policy-rc.d"
        step_done config
    fi

    step image
    {
        echo "kernel $kver"
        in_chroot dpkg-query -W -f '${Package} ${Version}\n' "${VM_BASE_PKGS[@]}" "${VM_ZFS_PKGS[@]}" systemd libc6
    } >"$out/versions.txt"
    in_chroot apt-get clean
    chroot_umounts
    rm -rf "$root"/var/lib/apt/lists/* "$root"/tmp/* "$root"/var/tmp/*
    cp "$root/boot/vmlinuz-$kver" "$out/vmlinuz"
    cp "$root/boot/initrd.img-$kver" "$out/initrd.img"
    local used_mb
    used_mb=$(du -sm --exclude=./boot "$root" | cut -f1)
    rm -f "$out/root.img"
    truncate -s "$((used_mb + 1024))M" "$out/root.img" # 1 GiB free in the guest, sparse
    mkfs.ext4 -q -F -L snapveilroot -d "$root" "$out/root.img"
    step_done image
    echo "total $(($(date +%s) - t_all))s" >>"$out/build-times.txt"
}

if [[ ${1:-} == --in-namespace ]]; then
    VM_MIRROR=$3 VM_SECURITY_MIRROR=$4
    build_in_namespace "$2"
    exit 0
fi

# ================================================================== outer
gc() {
    local d
    for d in "$VM_CACHE"/*/; do
        d=${d%/}
        [[ $(basename "$d") =~ ^[0-9a-f]{16}(\.build)?$ ]] || continue
        if [[ -z $(find "$d" -maxdepth 1 -name last-used -mtime -14) && -z $(find "$d" -maxdepth 0 -mtime -14) ]]; then
            vm_log "gc: removing $d"
            rm -rf "$d"
        fi
    done
}

force=0
case ${1:-} in
    --key) vm_cache_key; echo "$VM_KEY"; exit 0 ;;
    --gc) gc; exit 0 ;;
    --force) force=1 ;;
    "") ;;
    *) vm_die "usage: build-guest.sh [--key|--force|--gc]" ;;
esac

for tool in debootstrap mkfs.ext4 ssh-keygen unshare setpriv chroot apt-cache; do
    command -v "$tool" >/dev/null || vm_die "$tool is missing: run scripts/install-deps.sh"
done
[[ -r /usr/share/keyrings/debian-archive-keyring.gpg ]] || vm_die "debian-archive-keyring is missing: run scripts/install-deps.sh"

mkdir -p "$VM_CACHE"
vm_cache_key
dir=$VM_CACHE/$VM_KEY
vm_log "guest key $VM_KEY (mirror $VM_MIRROR)"

# One build per key at a time (two worktrees may ask at once); the lock dies with us.
exec 9>"$VM_CACHE/.lock-$VM_KEY"
flock 9
if ((force)); then rm -rf "$dir" "$dir.build"; fi
if [[ ! -e $dir/complete ]]; then
    vm_log "building the guest in $dir.build (cold build: ~6 minutes, most of it the OpenZFS module)"
    t0=$(date +%s)
    mkdir -p "$dir.build"
    echo "$VM_VERSIONS" >"$dir.build/versions.wanted"
    # A private mount namespace (the chroot mounts die with it) and a PID namespace whose
    # init is the build: when this shell dies, even by SIGKILL, setpriv's pdeathsig kills
    # unshare, --kill-child kills the build's init, and the kernel kills every process
    # left in the namespace (apt, dkms, compilers); no mount or process outlives us.
    setpriv --pdeathsig KILL -- unshare --mount --propagation private --pid --fork --kill-child=KILL -- \
        "$0" --in-namespace "$dir.build" "$VM_MIRROR" "$VM_SECURITY_MIRROR"
    rm -rf "$dir"
    mv "$dir.build/guest" "$dir"
    touch "$dir/complete"
    rm -rf "$dir.build"
    vm_log "guest built in $(($(date +%s) - t0))s: $dir"
fi
touch "$dir/last-used"
echo "$dir"
