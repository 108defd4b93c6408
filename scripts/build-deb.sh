#!/usr/bin/env bash
# build-deb.sh (`make deb`): a Debian package from the release binary, with dpkg-deb alone
# (no cargo-deb or debhelper needed), checked by lintian (no errors, no warnings).
#
# Ships: /usr/bin/snapveil (stripped), the mount helper link /usr/sbin/mount.fuse.snapveil,
# systemd units, hooks, man pages snapveil(8) and
# snapveil-SUBCOMMAND(8) and bash/zsh/fish completions (all from `snapveil gen-docs`, the
# packaged binary's own clap tree), /etc/snapveil/snapveil.toml (a conffile: dpkg keeps
# local changes on upgrade and keeps the file on remove), the example config and pull-mode examples, README,
# changelog.Debian.gz and a DEP-5 copyright generated from Cargo.lock
# (scripts/deb-copyright.py). /etc/snapveil/keys (0700) and /var/lib/snapveil (0700) are
# made by postinst, not shipped, and no maintainer script ever deletes them: keys and
# state outlive a purge, which says so.
#
# Usage: scripts/build-deb.sh [OUT_DIR]     prints the .deb's path
# Env: SNAPVEIL_BIN            binary to package (default target/release/snapveil)
#      SNAPVEIL_DEB_VERSION    a rebuild's version, newer than packaging/debian/changelog's
#                              (e.g. 0.1.0-1+local1); an entry for it is added to the
#                              packaged changelog
#      SNAPVEIL_DEB_COMPRESS   xz (default) | gzip (faster; lintian refuses none)
#      SNAPVEIL_DEB_LINTIAN    1 (default): run lintian, fail on any error or warning; 0: skip
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
BIN=${SNAPVEIL_BIN:-$REPO/target/release/snapveil}
OUT=${1:-$REPO/target/debian}
LINTIAN=${SNAPVEIL_DEB_LINTIAN:-1}
die() { echo "build-deb: $*" >&2; exit 1; }
[[ -x $BIN ]] || die "$BIN is missing: run 'cargo build --release'"

# The build's own apt step: only what is missing, so a prepared machine stays offline.
need=()
for t in dpkg-deb:dpkg strip:binutils python3:python3 gzip:gzip; do
    command -v "${t%%:*}" >/dev/null || need+=("${t#*:}")
done
if ((LINTIAN)) && ! command -v lintian >/dev/null; then need+=(lintian); fi
if ((${#need[@]})); then
    echo "build-deb: installing ${need[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; } \
        || die "could not install ${need[*]}"
fi

CRATE_VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/Cargo.toml" | head -1)
CHANGELOG=$REPO/packaging/debian/changelog
# "snapveil (0.1.0-1) unstable; urgency=medium"
VERSION=$(sed -n '1s/^snapveil (\([^)]*\)).*/\1/p' "$CHANGELOG")
[[ -n $VERSION ]] || die "$CHANGELOG: first line is not 'snapveil (VERSION) ...'"
[[ ${VERSION%-*} == "$CRATE_VERSION" ]] \
    || die "$CHANGELOG: version $VERSION is not Cargo.toml's $CRATE_VERSION plus a Debian revision: add an entry"
if [[ -n ${SNAPVEIL_DEB_VERSION:-} ]]; then
    dpkg --compare-versions "$SNAPVEIL_DEB_VERSION" gt "$VERSION" \
        || die "SNAPVEIL_DEB_VERSION=$SNAPVEIL_DEB_VERSION is not newer than $VERSION ($CHANGELOG)"
    VERSION=$SNAPVEIL_DEB_VERSION
fi
ARCH=$(dpkg --print-architecture)
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
ROOT=$STAGE/root DOC=$STAGE/root/usr/share/doc/snapveil
umask 022

install -d "$ROOT/usr/bin"
strip --strip-unneeded --remove-section=.comment -o "$ROOT/usr/bin/snapveil" "$BIN"
chmod 755 "$ROOT/usr/bin/snapveil"
# mount(8) runs /sbin/mount.fuse.TYPE for fstab lines and `mount -t fuse.snapveil`
# (/sbin is /usr/sbin on merged-/usr systems); snapveil knows the name.
install -d "$ROOT/usr/sbin"
ln -s ../bin/snapveil "$ROOT/usr/sbin/mount.fuse.snapveil"
for u in "$REPO"/packaging/systemd/*; do
    install -D -m 644 "$u" "$ROOT/lib/systemd/system/$(basename "$u")"
done
for h in "$REPO"/hooks/*; do
    install -D -m 755 "$h" "$ROOT/usr/share/snapveil/hooks/$(basename "$h")"
done
install -D -m 644 "$REPO/packaging/debian/snapveil.toml" "$ROOT/etc/snapveil/snapveil.toml"

# Man pages and completions from the packaged binary itself.
"$BIN" gen-docs "$STAGE/docs" >/dev/null || die "$BIN gen-docs failed"
install -d "$ROOT/usr/share/man/man8"
for m in "$STAGE"/docs/man8/*.8; do
    gzip -9n <"$m" >"$ROOT/usr/share/man/man8/$(basename "$m").gz"
done
# The mount helper is snapveil itself; snapveil(8) describes `mount -t fuse.snapveil`.
ln -s snapveil.8.gz "$ROOT/usr/share/man/man8/mount.fuse.snapveil.8.gz"
install -D -m 644 "$STAGE/docs/completions/bash/snapveil" "$ROOT/usr/share/bash-completion/completions/snapveil"
install -D -m 644 "$STAGE/docs/completions/zsh/_snapveil" "$ROOT/usr/share/zsh/vendor-completions/_snapveil"
install -D -m 644 "$STAGE/docs/completions/fish/snapveil.fish" "$ROOT/usr/share/fish/vendor_completions.d/snapveil.fish"

install -D -m 644 "$REPO/examples/snapveil.toml" "$DOC/examples/snapveil.toml"
for e in "$REPO"/packaging/pull/*; do
    install -D -m 644 "$e" "$DOC/examples/pull/$(basename "$e")"
done
install -D -m 644 "$REPO/README.md" "$DOC/README.md"
python3 "$REPO/scripts/deb-copyright.py" "$REPO" >"$DOC/copyright" || die "generating the copyright file failed"
{
    if [[ $VERSION != "$(sed -n '1s/^snapveil (\([^)]*\)).*/\1/p' "$CHANGELOG")" ]]; then
        printf 'snapveil (%s) unstable; urgency=medium\n\n  * Local rebuild.\n\n -- %s  %s\n\n' \
            "$VERSION" "snapveil developers <snapveil@example.org>" "$(date -R)"
    fi
    cat "$CHANGELOG"
} | gzip -9n >"$DOC/changelog.Debian.gz"

# The one lintian override, with its reason: a package made outside Debian has no ITP bug
# for its first changelog entry to close.
install -d "$ROOT/usr/share/lintian/overrides"
printf '%s\n' '# Not (yet) in Debian: there is no ITP bug for the first upload to close.' \
    'snapveil: initial-upload-closes-no-bugs' >"$ROOT/usr/share/lintian/overrides/snapveil"
chmod 644 "$ROOT/usr/share/lintian/overrides/snapveil"

install -d "$ROOT/DEBIAN"
echo /etc/snapveil/snapveil.toml >"$ROOT/DEBIAN/conffiles"
cat >"$ROOT/DEBIAN/postinst" <<'POST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    # Private directories, made here rather than shipped: dpkg would reset a shipped
    # directory's mode on upgrade, and must never own (or remove) the keys.
    [ -d /etc/snapveil/keys ] || install -d -m 0700 /etc/snapveil/keys
    [ -d /var/lib/snapveil ] || install -d -m 0700 /var/lib/snapveil
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null 2>&1 || true
    fi
fi
POST
cat >"$ROOT/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
if [ "$1" = purge ]; then
    # Never deleted: without the keys no backup decrypts; the state directory may hold
    # a killed run's mounts (`snapveil cleanup` before removing it).
    for d in /etc/snapveil/keys /etc/snapveil /var/lib/snapveil; do
        if [ -d "$d" ]; then
            echo "snapveil: purge leaves $d in place (keys, your own files, run state); remove it by hand once no backup needs it" >&2
        fi
    done
fi
POSTRM
chmod 755 "$ROOT/DEBIAN/postinst" "$ROOT/DEBIAN/postrm"
SIZE=$(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
cat >"$ROOT/DEBIAN/control" <<CTRL
Package: snapveil
Version: $VERSION
Architecture: $ARCH
Maintainer: snapveil developers <snapveil@example.org>
Installed-Size: $SIZE
Depends: libc6 (>= 2.34), libgcc-s1, fuse3, rsync, openssh-client
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
(cd "$ROOT" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z |
    grep -zv '^etc/' | xargs -0 md5sum) >"$ROOT/DEBIAN/md5sums"

mkdir -p "$OUT"
DEB="$OUT/snapveil_${VERSION}_${ARCH}.deb"
dpkg-deb --root-owner-group -Z"${SNAPVEIL_DEB_COMPRESS:-xz}" --build "$ROOT" "$DEB" >/dev/null
if ((LINTIAN)); then
    # lintian refuses to run as root without this (it unpacks untrusted packages).
    lintian --allow-root --fail-on error,warning --display-level '>=warning' "$DEB" >&2 \
        || die "lintian reports errors or warnings on $DEB (above)"
fi
echo "$DEB"
