#!/usr/bin/env bash
# demo.sh (`make demo`): a real backup end to end on a throw-away btrfs filesystem.
#
#   1. a 256 MiB btrfs image on a loop device, a subvolume with sample data
#   2. a key made by `snapveil init` and a config with one job to a local target
#   3. `snapveil run` twice, with a change and a deletion in between
#   4. shows the target: current/ (encrypted names), the generation, status, list
#   5. restores: the generation with `snapveil decrypt`, current/ with stock gocryptfs
#
# Everything lives under DEMO_DIR (default /var/tmp/snapveil-demo) and is removed on every
# way out (loop device detached, mounts unmounted), unless DEMO_KEEP=1.
# Env: SNAPVEIL_BIN (default target/release/snapveil).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
BIN=${SNAPVEIL_BIN:-$REPO/target/release/snapveil}
DIR=${DEMO_DIR:-/var/tmp/snapveil-demo}
[[ -x $BIN ]] || { echo "demo: $BIN is missing: run 'cargo build --release'" >&2; exit 1; }
[[ $(id -u) == 0 ]] || { echo "demo: run as root (loop devices, btrfs snapshots, FUSE)" >&2; exit 1; }

LOOP=
cleanup() {
    set +e
    [[ ${DEMO_KEEP:-} == 1 ]] && { echo "demo: kept $DIR (DEMO_KEEP=1)"; return; }
    mountpoint -q "$DIR/restore-gocryptfs" && fusermount3 -u "$DIR/restore-gocryptfs"
    [[ -f $DIR/snapveil.toml ]] && "$BIN" cleanup --config "$DIR/snapveil.toml" >/dev/null 2>&1
    mountpoint -q "$DIR/fs" && umount "$DIR/fs"
    [[ -n $LOOP ]] && losetup -d "$LOOP"
    rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

if [[ -e $DIR ]]; then
    # A previous demo that was killed: remove its leftovers first.
    mountpoint -q "$DIR/fs" && { "$BIN" cleanup --config "$DIR/snapveil.toml" >/dev/null 2>&1 || true; umount "$DIR/fs"; }
    for l in $(losetup -j "$DIR/fs.img" -O NAME -n 2>/dev/null); do losetup -d "$l"; done
    rm -rf "$DIR"
fi
mkdir -p "$DIR/fs" "$DIR/keys"
chmod 700 "$DIR/keys"

step "1. a btrfs filesystem on a loop device, with sample data"
truncate -s 256M "$DIR/fs.img"
LOOP=$(losetup -f --show "$DIR/fs.img")
mkfs.btrfs -q "$LOOP"
mount "$LOOP" "$DIR/fs"
btrfs -q subvolume create "$DIR/fs/data"
D=$DIR/fs/data
mkdir -p "$D/docs/letters" "$D/photos" "$D/db"
echo "Dear bank, ..." >"$D/docs/letters/bank.txt"
echo "shopping: milk, bread" >"$D/docs/todo.txt"
echo "the quarterly numbers" >"$D/docs/report.txt"
head -c 5M /dev/urandom >"$D/photos/holiday.jpg"
head -c 64K /dev/urandom >"$D/db/table.ibd"
ln -s docs/todo.txt "$D/todo-link"
show find "$D" -printf '%y %8s %P\n'

step "2. a key (gocryptfs format) and a job"
show "$BIN" init --config "$DIR/keys/demo.conf" --passfile "$DIR/keys/demo.pass" --scrypt-n 14
cat >"$DIR/snapveil.toml" <<EOF
state_dir = "$DIR/state"

[[job]]
name = "demo"
source = "btrfs:$D"
target = "$DIR/target"
key_config = "$DIR/keys/demo.conf"
passfile = "$DIR/keys/demo.pass"
excludes = ["*.tmp"]

[[job.hooks]]
phase = "post_snapshot"
command = "echo \"hook: snapshot of \$SNAPVEIL_SOURCE at \$SNAPVEIL_SNAPSHOT_PATH\""
EOF
show cat "$DIR/snapveil.toml"
show "$BIN" check-config --config "$DIR/snapveil.toml"

step "3a. first run"
show "$BIN" run --config "$DIR/snapveil.toml"
sleep 1 # stamps have one-second resolution

step "3b. change a file, delete one, add one; second run"
echo "the quarterly numbers, corrected" >"$D/docs/report.txt"
rm "$D/docs/todo.txt"
echo "new letter" >"$D/docs/letters/new.txt"
show "$BIN" run --config "$DIR/snapveil.toml"

step "4. the target never sees plaintext"
show find "$DIR/target" -maxdepth 3 -printf '%y %8s %P\n'
GEN=$(ls "$DIR/target/generations")
echo
echo "generation $GEN holds what run 2 replaced or deleted (encrypted):"
show find "$DIR/target/generations/$GEN" -printf '%y %8s %P\n'
echo
show "$BIN" status --config "$DIR/snapveil.toml"
echo
show "$BIN" list --config "$DIR/snapveil.toml" demo

step "5a. restore the generation with snapveil (the versions before run 2)"
show "$BIN" decrypt --config "$DIR/keys/demo.conf" --passfile "$DIR/keys/demo.pass" \
    "$DIR/target/generations/$GEN" "$DIR/restore-generation"
show find "$DIR/restore-generation" -type f -printf '%P\n'
show cat "$DIR/restore-generation/docs/report.txt" "$DIR/restore-generation/docs/todo.txt"

step "5b. read current/ with the stock gocryptfs binary: no snapveil needed to restore"
mkdir -p "$DIR/restore-gocryptfs"
show gocryptfs -q -nosyslog -ro -passfile "$DIR/keys/demo.pass" "$DIR/target/current" "$DIR/restore-gocryptfs"
show cat "$DIR/restore-gocryptfs/docs/report.txt"
if diff -r --no-dereference "$D" "$DIR/restore-gocryptfs"; then
    echo "demo: current/ decrypted by gocryptfs equals the source: OK"
else
    echo "demo: current/ differs from the source" >&2
    exit 1
fi
fusermount3 -u "$DIR/restore-gocryptfs"
cmp "$DIR/restore-generation/docs/report.txt" <(echo "the quarterly numbers") >/dev/null ||
    { echo "demo: the generation does not hold the old report" >&2; exit 1; }

step "done: no snapshot, mount or lock left behind"
show btrfs subvolume list "$DIR/fs"
if grep -q "$DIR/state" /proc/self/mountinfo; then
    echo "demo: a view is still mounted" >&2
    exit 1
fi
echo "demo: OK"
