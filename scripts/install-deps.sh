#!/usr/bin/env bash
# Installs the system packages snapveil's demo and tests use, from Debian's archive.
# Idempotent: runs `apt-get update` once and installs only what is missing.
set -euo pipefail
pkgs=(fuse3 gocryptfs rsync openssh-server openssh-client btrfs-progs zfs-fuse e2fsprogs util-linux procps psmisc python3 systemd)
# tests that need a clock the test sets (a run in the same second, a clock behind the target)
pkgs+=(faketime)
# a target filesystem without hard links (exFAT: src/target/update.rs's tests)
pkgs+=(exfatprogs exfat-fuse)
# raw ZFS mode: stock age is the restore oracle (tests/zfs_raw.rs)
pkgs+=(age)
# the shipped database hooks, tested against real servers (tests/hooks_db.rs)
pkgs+=(mariadb-server mariadb-client postgresql)
# the Debian package (scripts/build-deb.sh, tested in tests/ops.rs): strip, lintian
pkgs+=(binutils lintian)
# the real-kernel tier (scripts/vm, make test-vm): qemu boots a Debian guest that debootstrap builds
pkgs+=(qemu-system-x86 debootstrap debian-archive-keyring shellcheck)
pkgs+=("$@")
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # zfs-fuse's and sshd's postinst try to start daemons; tests start their own.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[ -e /dev/fuse ] || { echo "install-deps: /dev/fuse is missing: FUSE mounts cannot work here" >&2; exit 1; }
