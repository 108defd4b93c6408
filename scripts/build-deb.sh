#!/usr/bin/env bash
# build-deb.sh (`make deb`): a Debian package from the release binary, with dpkg-deb alone
# (no cargo-deb needed; Cargo.toml's [package.metadata.deb] describes the same package
# for those who use cargo-deb). Installs: /usr/bin/snapveil, the mount helper link
# /usr/sbin/mount.fuse.snapveil, systemd units, hooks, man page, example config, pull
# mode examples and README.
# Usage: scripts/build-deb.sh [OUT_DIR]
# Env: SNAPVEIL_BIN (default target/release/snapveil), SNAPVEIL_DEB_COMPRESS (xz|gzip|none)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
BIN=${SNAPVEIL_BIN:-$REPO/target/release/snapveil}
OUT=${1:-$REPO/target/debian}
[[ -x $BIN ]] || { echo "build-deb: $BIN is missing: run 'cargo build --release'" >&2; exit 1; }
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/Cargo.toml" | head -1)
ARCH=$(dpkg --print-architecture)
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
install -D -m 755 "$BIN" "$STAGE/usr/bin/snapveil"
# mount(8) runs /sbin/mount.fuse.TYPE for fstab lines and `mount -t fuse.snapveil`
# (/sbin is /usr/sbin on merged-/usr systems); snapveil knows the name.
install -d "$STAGE/usr/sbin"
ln -s ../bin/snapveil "$STAGE/usr/sbin/mount.fuse.snapveil"
for u in "$REPO"/packaging/systemd/*; do
    install -D -m 644 "$u" "$STAGE/lib/systemd/system/$(basename "$u")"
done
for h in "$REPO"/hooks/*; do
    install -D -m 755 "$h" "$STAGE/usr/share/snapveil/hooks/$(basename "$h")"
done
install -D -m 644 "$REPO/examples/snapveil.toml" "$STAGE/usr/share/doc/snapveil/examples/snapveil.toml"
for e in "$REPO"/packaging/pull/*; do
    install -D -m 644 "$e" "$STAGE/usr/share/doc/snapveil/examples/pull/$(basename "$e")"
done
install -D -m 644 "$REPO/README.md" "$STAGE/usr/share/doc/snapveil/README.md"
install -d -m 755 "$STAGE/usr/share/man/man8"
gzip -9n <"$REPO/packaging/snapveil.8" >"$STAGE/usr/share/man/man8/snapveil.8.gz"
install -d -m 700 "$STAGE/etc/snapveil/keys"
install -d "$STAGE/DEBIAN"
SIZE=$(du -sk "$STAGE" | cut -f1)
cat >"$STAGE/DEBIAN/control" <<CTRL
Package: snapveil
Version: $VERSION
Architecture: $ARCH
Maintainer: snapveil developers <snapveil@example.org>
Installed-Size: $SIZE
Depends: libc6 (>= 2.34), fuse3, rsync, openssh-client
Recommends: gocryptfs, btrfs-progs, zfsutils-linux | zfs-fuse, lvm2
Section: admin
Priority: optional
Homepage: https://example.org/snapveil
Description: encrypted snapshot backups, restorable with stock gocryptfs
 snapveil takes temporary ZFS, btrfs or LVM snapshots, shows them through an
 encrypting FUSE view byte-compatible with gocryptfs -reverse, and rsyncs that
 view to local, ssh or rsync-daemon targets that never see plaintext, keeping
 replaced files as dated generations pruned by a retention policy.
CTRL
cat >"$STAGE/DEBIAN/postinst" <<'POST'
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
POST
chmod 755 "$STAGE/DEBIAN/postinst"
mkdir -p "$OUT"
DEB="$OUT/snapveil_${VERSION}_${ARCH}.deb"
dpkg-deb --root-owner-group -Z"${SNAPVEIL_DEB_COMPRESS:-xz}" --build "$STAGE" "$DEB" >/dev/null
echo "$DEB"
